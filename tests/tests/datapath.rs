//! In-kernel datapath fixtures: the real TC program, loaded with maps
//! programmed by the real agent code, run on crafted packets through
//! BPF_PROG_TEST_RUN (kernel 4.12+ for skb programs). Each case checks the
//! verdict, the rewritten bytes (checksums recomputed here, not trusted from
//! the kernel) and the counters.

use std::net::{IpAddr, Ipv4Addr};

use lb_agent::model::{DesiredTables, Frontend, FrontendKind, Protocol};
use lb_common::{conntrack::DIR_REPLY, stats::Reason};
use lb_tests::{
    fixture::{Fixture, Hook, spec},
    packet::{ACK, Packet, SYN, Transport, arp_request},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 12);
const POD: Hook = Hook::TcPod;

fn frontend(addr: Ipv4Addr, port: u16, protocol: Protocol) -> Frontend {
    Frontend::new(IpAddr::V4(addr), port, protocol)
}

fn desired(web_backends: &[(Ipv4Addr, u16)]) -> DesiredTables {
    let web: Vec<(Ipv4Addr, u16, bool)> =
        web_backends.iter().map(|(a, p)| (*a, *p, true)).collect();
    DesiredTables {
        frontends: [
            (
                frontend(VIP, 80, Protocol::Tcp),
                spec("web", "http", FrontendKind::ClusterIp, &web),
            ),
            (
                frontend(VIP, 53, Protocol::Udp),
                spec(
                    "web",
                    "dns",
                    FrontendKind::ClusterIp,
                    &[(POD_A, 5353, true)],
                ),
            ),
            (
                frontend(EMPTY_VIP, 80, Protocol::Tcp),
                spec("empty", "http", FrontendKind::ClusterIp, &[]),
            ),
        ]
        .into_iter()
        .collect(),
        ..DesiredTables::default()
    }
}

fn fixture(test: &str) -> Fixture {
    Fixture::new(test, &desired(&[(POD_A, 8080), (POD_B, 8080)]))
}

fn syn(src_port: u16) -> Packet {
    Packet::tcp((CLIENT, src_port), (VIP, 80), SYN, b"")
}

#[test]
fn tcp_syn_to_a_cluster_ip_is_translated_to_a_backend() {
    let mut fx = fixture("tcp_syn_to_a_cluster_ip_is_translated_to_a_backend");
    let before = fx.count(Reason::NewFlow);
    let out = fx.pass(POD, &syn(40000));
    assert!(
        out.dst == POD_A || out.dst == POD_B,
        "dst IP hasn't been NATed: {}",
        out.dst
    );
    assert_eq!(
        out.ports(),
        Some((40000, 8080)),
        "dst port hasn't been NATed"
    );
    assert_eq!(out.src, CLIENT, "src IP must not change on the way in");
    assert_eq!(fx.count(Reason::NewFlow), before + 1, "new_flow counter");

    // Both directions are tracked.
    let ct = fx.tables.dump_conntrack().expect("conntrack");
    assert!(
        ct.iter().any(|(k, v)| k.src_addr == out.dst.octets()
            && k.dst_addr == CLIENT.octets()
            && k.src_port == 8080
            && k.dst_port == 40000
            && v.direction == DIR_REPLY
            && v.src_addr == VIP.octets()
            && v.src_port == 80),
        "no reply entry for the flow: {ct:?}"
    );
}

#[test]
fn established_flow_keeps_its_backend_and_replies_are_reverse_translated() {
    let mut fx = fixture("established_flow_keeps_its_backend_and_replies_are_reverse_translated");
    let chosen = fx.pass(POD, &syn(40001)).dst;
    for i in 0..20u8 {
        let out = fx.pass(POD, &Packet::tcp((CLIENT, 40001), (VIP, 80), ACK, &[i; 10]));
        assert_eq!(
            out.dst, chosen,
            "packet {i} of an established flow changed backend"
        );
        assert_eq!(out.payload, vec![i; 10], "payload changed");
    }
    let before = fx.count(Reason::CtReply);
    let reply = fx.pass(
        POD,
        &Packet::tcp((chosen, 8080), (CLIENT, 40001), SYN | ACK, b""),
    );
    assert_eq!(reply.src, VIP, "reply src IP hasn't been reverse-NATed");
    assert_eq!(
        reply.ports(),
        Some((80, 40001)),
        "reply src port hasn't been reverse-NATed"
    );
    assert_eq!(reply.dst, CLIENT);
    assert!(matches!(reply.transport, Transport::Tcp { flags, .. } if flags == SYN | ACK));
    assert_eq!(fx.count(Reason::CtReply), before + 1, "ct_reply counter");
}

#[test]
fn udp_datagram_is_translated_both_ways_with_valid_checksums() {
    let mut fx = fixture("udp_datagram_is_translated_both_ways_with_valid_checksums");
    let out = fx.pass(POD, &Packet::udp((CLIENT, 50000), (VIP, 53), b"query"));
    assert_eq!(
        (out.dst, out.ports()),
        (POD_A, Some((50000, 5353))),
        "UDP not NATed"
    );
    assert_eq!(out.payload, b"query");
    let reply = fx.pass(POD, &Packet::udp((POD_A, 5353), (CLIENT, 50000), b"answer"));
    assert_eq!(
        (reply.src, reply.ports()),
        (VIP, Some((53, 50000))),
        "UDP reply not reverse-NATed"
    );

    // A datagram without checksum keeps "no checksum" after translation.
    let mut unchecked = Packet::udp((CLIENT, 50001), (VIP, 53), b"q");
    unchecked.udp_zero_checksum = true;
    let out = fx.pass(POD, &unchecked);
    assert_eq!(out.dst, POD_A);
    assert!(out.udp_zero_checksum, "a zero UDP checksum must stay zero");
}

#[test]
fn traffic_not_for_a_service_is_untouched() {
    let mut fx = fixture("traffic_not_for_a_service_is_untouched");
    for (frame, reason) in [
        (
            Packet::tcp((CLIENT, 40002), (POD_A, 8080), SYN, b"").emit(),
            Reason::PassNotService,
        ),
        (
            Packet::udp((CLIENT, 40002), (POD_B, 5353), b"").emit(),
            Reason::PassNotService,
        ),
        (arp_request(), Reason::PassNotIpv4),
    ] {
        let before = fx.count(reason);
        let (verdict, out) = fx.run(POD, &frame);
        assert_eq!(verdict, POD.pass());
        assert_eq!(out, frame, "a packet not for a service was modified");
        assert_eq!(fx.count(reason), before + 1, "{} counter", reason.name());
    }
}

#[test]
fn a_service_without_backends_drops_and_counts() {
    let mut fx = fixture("a_service_without_backends_drops_and_counts");
    let before = fx.count(Reason::DropNoBackend);
    let (verdict, _) = fx.run(
        POD,
        &Packet::tcp((CLIENT, 40003), (EMPTY_VIP, 80), ACK, b"").emit(),
    );
    assert_eq!(
        verdict,
        POD.drop(),
        "packet to a service without backends was not dropped"
    );
    assert_eq!(fx.count(Reason::DropNoBackend), before + 1);
}

#[test]
fn new_flows_spread_over_all_backends() {
    let mut fx = fixture("new_flows_spread_over_all_backends");
    let mut seen = std::collections::BTreeMap::new();
    for port in 41000..41200 {
        *seen.entry(fx.pass(POD, &syn(port)).dst).or_insert(0) += 1;
    }
    assert_eq!(
        seen.len(),
        2,
        "200 flows did not reach both backends: {seen:?}"
    );
}

#[test]
fn removed_backend_gets_no_new_flows_but_established_ones_continue() {
    let mut fx = fixture("removed_backend_gets_no_new_flows_but_established_ones_continue");
    // Find one flow on each backend.
    let mut on = std::collections::BTreeMap::new();
    for port in 42000..42200 {
        let dst = fx.pass(POD, &syn(port)).dst;
        on.entry(dst).or_insert(port);
    }
    let (port_a, port_b) = (on[&POD_A], on[&POD_B]);

    let report = fx
        .programmer
        .apply(&desired(&[(POD_A, 8080)]), &mut fx.tables);
    assert!(report.errors.is_empty(), "{:?}", report.errors);

    // The established flow to the removed backend keeps its translation...
    let out = fx.pass(POD, &Packet::tcp((CLIENT, port_b), (VIP, 80), ACK, b"more"));
    assert_eq!(
        out.dst, POD_B,
        "established flow to a removed backend was moved"
    );
    // ...but a new connection reusing that tuple is balanced afresh.
    assert_eq!(
        fx.pass(POD, &syn(port_b)).dst,
        POD_A,
        "new connection went to a removed backend"
    );
    for port in 43000..43050 {
        assert_eq!(
            fx.pass(POD, &syn(port)).dst,
            POD_A,
            "new flow went to a removed backend"
        );
    }
    // The flow on the remaining backend is undisturbed.
    assert_eq!(
        fx.pass(POD, &Packet::tcp((CLIENT, port_a), (VIP, 80), ACK, b""))
            .dst,
        POD_A
    );
}

#[test]
fn a_direct_connection_reusing_a_balanced_flows_port_gets_its_replies_untranslated() {
    let mut fx =
        fixture("a_direct_connection_reusing_a_balanced_flows_port_gets_its_replies_untranslated");
    let out = fx.pass(POD, &Packet::tcp((CLIENT, 45000), (VIP, 80), SYN, b""));
    let backend = out.dst;
    // Later the client talks to that pod directly from the same port (a
    // socket-level translated connection, or a plain one).
    let direct = Packet::tcp((CLIENT, 45000), (backend, 8080), SYN, b"");
    let out = fx.pass(POD, &direct);
    assert_eq!(out, direct, "a connection to a pod address was translated");
    let reply = Packet::tcp((backend, 8080), (CLIENT, 45000), SYN | ACK, b"");
    let out = fx.pass(POD, &reply);
    assert_eq!(
        out.src, backend,
        "the reply took the old flow's reverse translation"
    );
    // And the old flow's forward entry went with it: a new SYN to the
    // ClusterIP from that port is balanced afresh, with a reply entry.
    let out = fx.pass(POD, &Packet::tcp((CLIENT, 45000), (VIP, 80), SYN, b""));
    let again = fx.pass(
        POD,
        &Packet::tcp((out.dst, 8080), (CLIENT, 45000), SYN | ACK, b""),
    );
    assert_eq!(
        again.src, VIP,
        "the new flow's reply is not reverse-translated"
    );
}
