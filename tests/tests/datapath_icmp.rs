//! In-kernel fixtures for ICMP errors about translated flows: the error a
//! backend, a router or a client sends quotes the packet as it was after
//! translation; the datapath translates the error like a packet of the
//! flow (outer and quoted headers) so the other end's stack matches it to
//! its socket. Every checksum (outer IPv4, ICMP, quoted IPv4, quoted L4) is
//! verified independently here.

use std::net::{IpAddr, Ipv4Addr};

use lb_agent::model::{DesiredTables, Frontend, FrontendKind, Protocol};
use lb_common::stats::Reason;
use lb_tests::{
    fixture::{Fixture, Hook, spec},
    packet::{IcmpError, Packet, SYN, icmp_error},
};

const NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
const EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 11);
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_PORT: u16 = 30081;
/// Destination unreachable: port unreachable, fragmentation needed.
const UNREACH: u8 = 3;
const PORT_UNREACH: u8 = 3;
const FRAG_NEEDED: u8 = 4;
/// "Next-hop MTU" 1400 in the 4 bytes after the checksum.
const MTU_1400: [u8; 4] = [0, 0, 0x05, 0x78];

fn desired() -> DesiredTables {
    let mut tables = DesiredTables::default();
    tables.frontends.insert(
        Frontend::new(IpAddr::V4(VIP), 53, Protocol::Udp),
        spec(
            "dns",
            "dns",
            FrontendKind::ClusterIp,
            &[(LOCAL, 5353, true)],
        ),
    );
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        tables.frontends.insert(
            Frontend::new(IpAddr::V4(NODE), NODE_PORT, protocol),
            spec(
                "remote",
                "p",
                FrontendKind::NodePort,
                &[(REMOTE, 8080, false)],
            ),
        );
    }
    tables
}

fn fixture(test: &str) -> Fixture {
    let mut fx = Fixture::new(test, &desired());
    fx.set_node_address(NODE);
    fx
}

fn icmp_of(packet: &Packet) -> IcmpError {
    IcmpError::of(packet).unwrap_or_else(|e| panic!("{e}: {packet:?}"))
}

#[test]
fn a_backends_port_unreachable_reaches_the_client_as_the_cluster_ips() {
    let mut fx = fixture("a_backends_port_unreachable_reaches_the_client_as_the_cluster_ips");
    let query = Packet::udp((CLIENT, 40000), (VIP, 53), b"query");
    let sent = fx.pass(Hook::TcPod, &query);
    assert_eq!((sent.dst, sent.ports()), (LOCAL, Some((40000, 5353))));

    // Nothing listens on the backend: its kernel quotes the whole datagram.
    let error = icmp_error(
        LOCAL,
        CLIENT,
        UNREACH,
        PORT_UNREACH,
        [0; 4],
        &sent,
        usize::MAX,
    );
    let before = fx.count(Reason::IcmpErrorTranslated);
    let out = fx.pass(Hook::TcPod, &error);
    assert_eq!(fx.count(Reason::IcmpErrorTranslated), before + 1);
    assert_eq!((out.src, out.dst), (VIP, CLIENT), "outer header");
    let icmp = icmp_of(&out);
    assert_eq!((icmp.kind, icmp.code), (UNREACH, PORT_UNREACH));
    let quoted = icmp.quoted_packet().expect("quoted datagram checksums");
    assert_eq!(
        (quoted.src, quoted.dst, quoted.ports()),
        (CLIENT, VIP, Some((40000, 53))),
        "the quote must be the datagram the client sent"
    );
    assert_eq!(quoted.payload, b"query");
}

#[test]
fn fragmentation_needed_from_a_router_follows_the_snat_back_to_the_client() {
    let mut fx = fixture("fragmentation_needed_from_a_router_follows_the_snat_back_to_the_client");
    let syn = Packet::tcp((EXT, 40000), (NODE, NODE_PORT), SYN, b"");
    let sent = fx.pass(Hook::Xdp, &syn);
    assert_eq!(sent.src, NODE, "a remote backend is reached through SNAT");
    let snat_port = sent.ports().expect("ports").0;

    // A router towards the backend quotes 28 bytes: IPv4 header and the
    // first 8 of TCP (no TCP checksum in the quote).
    let error = icmp_error(ROUTER, NODE, UNREACH, FRAG_NEEDED, MTU_1400, &sent, 28);
    let out = fx.pass(Hook::Xdp, &error);
    assert_eq!(out.src, ROUTER, "a router's address stays");
    assert_eq!(out.dst, EXT, "the error goes to the real client");
    let icmp = icmp_of(&out);
    assert_eq!(
        (icmp.kind, icmp.code, icmp.rest),
        (UNREACH, FRAG_NEEDED, MTU_1400)
    );
    assert_eq!(icmp.quoted.len(), 28);
    assert_eq!(
        icmp.quoted_tuple().expect("quoted header"),
        (EXT, NODE, 6, 40000, NODE_PORT),
        "the quote must be the segment the client sent (SNAT port {snat_port} undone)"
    );

    // The TC fallback of node devices translates the same way.
    let out = fx.pass(Hook::TcNode, &error);
    assert_eq!((out.src, out.dst), (ROUTER, EXT));
    assert_eq!(
        icmp_of(&out).quoted_tuple().expect("quoted header"),
        (EXT, NODE, 6, 40000, NODE_PORT)
    );
}

#[test]
fn a_clients_error_about_a_reply_reaches_the_backend_in_its_terms() {
    let mut fx = fixture("a_clients_error_about_a_reply_reaches_the_backend_in_its_terms");
    let request = Packet::udp((EXT, 40001), (NODE, NODE_PORT), b"ask");
    let sent = fx.pass(Hook::Xdp, &request);
    let snat_port = sent.ports().expect("ports").0;
    // The backend's answer, as the client receives it.
    let answer = Packet::udp((REMOTE, 8080), (NODE, snat_port), b"answer");
    let delivered = fx.pass(Hook::Xdp, &answer);
    assert_eq!(
        (delivered.src, delivered.dst, delivered.ports()),
        (NODE, EXT, Some((NODE_PORT, 40001)))
    );

    // The client's socket is gone: its kernel refuses the answer.
    let error = icmp_error(
        EXT,
        NODE,
        UNREACH,
        PORT_UNREACH,
        [0; 4],
        &delivered,
        usize::MAX,
    );
    let out = fx.pass(Hook::Xdp, &error);
    assert_eq!(
        (out.src, out.dst),
        (NODE, REMOTE),
        "outer: from the SNAT address to the backend"
    );
    let quoted = icmp_of(&out).quoted_packet().expect("quoted checksums");
    assert_eq!(
        (quoted.src, quoted.dst, quoted.ports()),
        (REMOTE, NODE, Some((8080, snat_port))),
        "the quote must be the datagram the backend sent"
    );
}

#[test]
fn errors_about_other_flows_and_other_icmp_pass_untouched() {
    let mut fx = fixture("errors_about_other_flows_and_other_icmp_pass_untouched");
    let stranger = Packet::udp((CLIENT, 41000), (Ipv4Addr::new(10, 244, 3, 3), 53), b"x");
    let error = icmp_error(
        Ipv4Addr::new(10, 244, 3, 3),
        CLIENT,
        UNREACH,
        PORT_UNREACH,
        [0; 4],
        &stranger,
        usize::MAX,
    );
    let echo = Packet {
        transport: lb_tests::packet::Transport::Other { protocol: 1 },
        payload: vec![8, 0, 0xf7, 0xff, 0, 0, 0, 0],
        ..Packet::udp((CLIENT, 0), (VIP, 0), b"")
    };
    for packet in [error, echo] {
        let frame = packet.emit();
        let (verdict, out) = fx.run(Hook::TcPod, &frame);
        assert_eq!(verdict, Hook::TcPod.pass());
        assert_eq!(out, frame, "an unrelated ICMP packet was changed");
    }
    assert_eq!(fx.count(Reason::IcmpErrorTranslated), 0);
}
