//! In-kernel fixtures for SCTP: real INIT, INIT-ACK and DATA packets
//! through the pod TC program and the node TC program, IPv4, ClusterIP,
//! NodePort with SNAT and LoadBalancer; the node XDP program and IPv6 pass
//! SCTP untouched (not translated yet, see docs/decisions.md). SCTP's
//! checksum is a CRC32c over the SCTP packet (no pseudo-header), so every
//! output's CRC is recomputed here with an independent bitwise CRC32c
//! ([`lb_tests::packet::crc32c`]) and compared: a port rewrite without
//! its CRC update fails to parse.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_agent::model::{DesiredTables, Frontend, FrontendKind, Protocol};
use lb_common::stats::Reason;
use lb_tests::{
    fixture::{Fixture, Hook, spec, spec6},
    packet::{Packet, SYN, Transport, fragments, sctp_data, sctp_init},
    packet6::Packet6,
};

const POD_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 11);
const NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
const EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

const POD_CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 2);
const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x50);
const LOCAL6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0x11);
const REMOTE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 2, 0, 0, 0, 0, 0x11);
const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11);

/// The Service port and the endpoints' targetPort (Diameter's): they
/// differ, so every translation rewrites a port.
const PORT: u16 = 80;
const TARGET: u16 = 3868;
const NODE_PORT: u16 = 30868;
/// A ClusterIP port equal to its targetPort: only addresses change.
const SAME_PORT: u16 = 3868;

fn sctp(addr: IpAddr, port: u16) -> Frontend {
    Frontend::new(addr, port, Protocol::Sctp)
}

fn desired() -> DesiredTables {
    let (ci, np, lb) = (
        FrontendKind::ClusterIp,
        FrontendKind::NodePort,
        FrontendKind::LoadBalancer,
    );
    let local = [(LOCAL, TARGET, true)];
    let remote = [(REMOTE, TARGET, false)];
    let local6 = [(LOCAL6, TARGET, true)];
    let remote6 = [(REMOTE6, TARGET, false)];
    DesiredTables {
        frontends: [
            (
                sctp(CLUSTER_IP.into(), PORT),
                spec("diameter", "sctp", ci, &local),
            ),
            (
                sctp(CLUSTER_IP.into(), SAME_PORT),
                spec("diameter-same", "sctp", ci, &local),
            ),
            (
                sctp(NODE.into(), NODE_PORT),
                spec("diameter", "sctp", np, &remote),
            ),
            (
                sctp(LB_IP.into(), PORT),
                spec("diameter", "sctp", lb, &local),
            ),
            (
                sctp(CLUSTER_IP6.into(), PORT),
                spec6("diameter6", "sctp", ci, &local6),
            ),
            (
                sctp(NODE6.into(), NODE_PORT),
                spec6("diameter6", "sctp", np, &remote6),
            ),
        ]
        .into_iter()
        .collect(),
        ..DesiredTables::default()
    }
}

fn fixture(test: &str) -> Fixture {
    let mut fx = Fixture::new(test, &desired());
    fx.set_node_address(NODE);
    fx.set_node_address6(NODE6);
    fx
}

/// The INIT-ACK chunk a server answers an INIT with (its own initiate
/// tag, a state cookie), of a realistic size.
fn init_ack() -> Vec<u8> {
    let mut chunk = sctp_init(0x5eed_0001);
    chunk[0] = lb_tests::packet::SCTP_INIT_ACK;
    // A state cookie parameter makes it as long as a real one.
    let cookie = [0xc0u8; 200];
    chunk.extend_from_slice(&7u16.to_be_bytes());
    chunk.extend_from_slice(&((4 + cookie.len()) as u16).to_be_bytes());
    chunk.extend_from_slice(&cookie);
    let len = chunk.len() as u16;
    chunk[2..4].copy_from_slice(&len.to_be_bytes());
    chunk
}

fn verification_tag(transport: &Transport) -> u32 {
    match transport {
        Transport::Sctp {
            verification_tag, ..
        } => *verification_tag,
        other => panic!("not SCTP: {other:?}"),
    }
}

/// A packet of an association (its verification tag set).
fn in_association(mut packet: Packet, tag: u32) -> Packet {
    if let Transport::Sctp {
        verification_tag, ..
    } = &mut packet.transport
    {
        *verification_tag = tag;
    }
    packet
}

#[test]
fn sctp_to_a_cluster_ip_is_translated_with_a_valid_crc_and_replies_return() {
    let mut fx = fixture("sctp_to_a_cluster_ip_is_translated_with_a_valid_crc_and_replies_return");
    let before = fx.count(Reason::NewFlow);
    let init = Packet::sctp((POD_CLIENT, 40000), (CLUSTER_IP, PORT), &sctp_init(0xa1));
    // `pass` parses the output, which checks the CRC32c.
    let out = fx.pass(Hook::TcPod, &init);
    assert_eq!(
        (out.src, out.dst, out.ports()),
        (POD_CLIENT, LOCAL, Some((40000, TARGET))),
        "INIT not DNATed to the backend's targetPort"
    );
    assert_eq!(out.payload, init.payload, "the chunks must be untouched");
    assert_eq!(fx.count(Reason::NewFlow), before + 1);

    let reply = fx.pass(
        Hook::TcPod,
        &in_association(
            Packet::sctp((LOCAL, TARGET), (POD_CLIENT, 40000), &init_ack()),
            0xa1,
        ),
    );
    assert_eq!(
        (reply.src, reply.dst, reply.ports()),
        (CLUSTER_IP, POD_CLIENT, Some((PORT, 40000))),
        "INIT-ACK not reverse-NATed"
    );
    assert_eq!(verification_tag(&reply.transport), 0xa1);

    // DATA of several lengths (the CRC update depends on the length, in
    // both of its bytes): each follows the flow with a valid CRC.
    for (tsn, len) in [(1, 1), (2, 243), (3, 1000), (4, 1400)] {
        let data = Packet::sctp(
            (POD_CLIENT, 40000),
            (CLUSTER_IP, PORT),
            &sctp_data(tsn, &vec![tsn as u8; len]),
        );
        let out = fx.pass(Hook::TcPod, &in_association(data, 0x5eed_0001));
        assert_eq!((out.dst, out.ports()), (LOCAL, Some((40000, TARGET))));
    }
}

#[test]
fn sctp_address_only_translation_leaves_the_crc_as_it_was() {
    let mut fx = fixture("sctp_address_only_translation_leaves_the_crc_as_it_was");
    let init = Packet::sctp(
        (POD_CLIENT, 40001),
        (CLUSTER_IP, SAME_PORT),
        &sctp_init(0xa2),
    );
    let frame = init.emit();
    let (verdict, out) = fx.run(Hook::TcPod, &frame);
    assert_eq!(verdict, Hook::TcPod.pass());
    let parsed = Packet::parse(&out).expect("valid output");
    assert_eq!(parsed.dst, LOCAL);
    // The CRC covers no address: its bytes (after Ethernet, IPv4 and
    // eight SCTP bytes) must not move.
    let crc = 14 + 20 + 8;
    assert_eq!(out[crc..crc + 4], frame[crc..crc + 4]);
}

#[test]
fn sctp_nodeport_to_a_remote_backend_is_snatted_with_valid_crcs_on_tc() {
    let mut fx = fixture("sctp_nodeport_to_a_remote_backend_is_snatted_with_valid_crcs_on_tc");
    let (hook, client_port) = (Hook::TcNode, 50001);
    let init = Packet::sctp((EXT, client_port), (NODE, NODE_PORT), &sctp_init(0xb1));
    let out = fx.pass(hook, &init);
    assert_eq!(
        (out.src, out.dst),
        (NODE, REMOTE),
        "{hook:?}: INIT not DNATed and SNATed"
    );
    let (snat_port, dst_port) = out.ports().expect("ports");
    assert_eq!(dst_port, TARGET);
    assert!(
        (61000..=65522).contains(&snat_port),
        "{hook:?}: SNAT port {snat_port} outside its range"
    );

    // The backend's answer comes back over the underlay.
    let reply = fx.pass(
        hook,
        &in_association(
            Packet::sctp((REMOTE, TARGET), (NODE, snat_port), &init_ack()),
            0xb1,
        ),
    );
    assert_eq!(
        (reply.src, reply.dst, reply.ports()),
        (NODE, EXT, Some((NODE_PORT, client_port))),
        "{hook:?}: INIT-ACK not reverse-translated"
    );

    let data = Packet::sctp(
        (EXT, client_port),
        (NODE, NODE_PORT),
        &sctp_data(1, &[7; 900]),
    );
    let out = fx.pass(hook, &in_association(data, 0x5eed_0001));
    assert_eq!(
        (out.src, out.dst, out.ports()),
        (NODE, REMOTE, Some((snat_port, TARGET)))
    );
}

#[test]
fn sctp_to_a_load_balancer_ip_is_translated_on_tc() {
    let mut fx = fixture("sctp_to_a_load_balancer_ip_is_translated_on_tc");
    let out = fx.pass(
        Hook::TcNode,
        &Packet::sctp((EXT, 50002), (LB_IP, PORT), &sctp_init(0xc1)),
    );
    assert_eq!(
        (out.src, out.dst, out.ports()),
        (EXT, LOCAL, Some((50002, TARGET)))
    );
}

#[test]
fn sctp_and_tcp_frontends_of_one_address_and_port_are_distinct() {
    let mut fx = fixture("sctp_and_tcp_frontends_of_one_address_and_port_are_distinct");
    let before = fx.count(Reason::PassNotService);
    let out = fx.pass(
        Hook::Xdp,
        &Packet::tcp((EXT, 50003), (NODE, NODE_PORT), SYN, b""),
    );
    assert_eq!(out.dst, NODE, "TCP took the SCTP frontend");
    assert_eq!(fx.count(Reason::PassNotService), before + 1);
}

#[test]
fn sctp_first_fragment_whose_ports_change_is_dropped_and_counted() {
    let mut fx = fixture("sctp_first_fragment_whose_ports_change_is_dropped_and_counted");
    let data = Packet::sctp(
        (POD_CLIENT, 40002),
        (CLUSTER_IP, PORT),
        &sctp_data(1, &[9; 600]),
    );
    let parts = fragments(&data, 0x7777, 256);
    let before = fx.count(Reason::DropSctpFragment);
    let (verdict, _) = fx.run(Hook::TcPod, &parts[0]);
    assert_eq!(
        verdict,
        Hook::TcPod.drop(),
        "a first fragment cannot get a valid CRC"
    );
    assert_eq!(fx.count(Reason::DropSctpFragment), before + 1);
}

/// Not translated yet: XDP and IPv6 pass SCTP on, untouched and counted
/// as another protocol, never misparsed or half rewritten.
#[test]
fn sctp_on_xdp_and_over_ipv6_passes_untouched() {
    let mut fx = fixture("sctp_on_xdp_and_over_ipv6_passes_untouched");
    let before = fx.count(Reason::PassOtherL4);
    let init = Packet::sctp((EXT, 50000), (NODE, NODE_PORT), &sctp_init(0xe0));
    let (verdict, out) = fx.run(Hook::Xdp, &init.emit());
    assert_eq!(verdict, Hook::Xdp.pass());
    assert_eq!(out, init.emit(), "XDP changed an SCTP packet");
    let init6 = Packet6::sctp((POD_CLIENT6, 40000), (CLUSTER_IP6, PORT), &sctp_init(0xe1));
    let (verdict, out) = fx.run(Hook::TcPod, &init6.emit());
    assert_eq!(verdict, Hook::TcPod.pass());
    assert_eq!(out, init6.emit(), "an IPv6 SCTP packet was changed");
    assert_eq!(fx.count(Reason::PassOtherL4), before + 2);
}
