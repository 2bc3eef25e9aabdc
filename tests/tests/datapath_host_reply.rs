//! In-kernel fixtures of the two delivery paths a real node needs, both
//! families:
//! - the node's own stack answering a pod through a service whose backend
//!   is the node (`lb_tc_egress`, TCX egress): the reply gets its reverse
//!   translation, while untracked packets and forward tuples leave
//!   untouched and uncounted;
//! - a reply translated on a pod device is redirected to the device the
//!   FIB names, with the next hop's MAC addresses (`deliver.rs`), so it
//!   never meets the reverse-path check of the input route. Run in a
//!   namespace of the test's own with forwarding on and a route and
//!   neighbour for the client: BPF_PROG_TEST_RUN looks the FIB up in the
//!   namespace of the thread that runs it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_agent::model::{DesiredTables, Frontend, FrontendKind, Protocol};
use lb_common::stats::Reason;
use lb_tests::{
    fixture::{Fixture, Hook, TC_ACT_REDIRECT, spec, spec6},
    packet::{ACK, Packet, SYN},
    packet6::Packet6,
    require_root,
};
use xtask::NetNs;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The node's own address: a host-network backend.
const NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);
const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x11);
const POD_A6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x11);
/// The client's next hop and the egress device, as the test namespace
/// has them.
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const DEVICE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// One TCP ClusterIP per family whose only endpoint is `backend4` /
/// `backend6` on this node.
fn desired(backend4: Ipv4Addr, backend6: Ipv6Addr) -> DesiredTables {
    DesiredTables {
        frontends: [
            (
                Frontend::new(IpAddr::V4(VIP), 80, Protocol::Tcp),
                spec(
                    "web",
                    "http",
                    FrontendKind::ClusterIp,
                    &[(backend4, 8080, true)],
                ),
            ),
            (
                Frontend::new(IpAddr::V6(VIP6), 80, Protocol::Tcp),
                spec6(
                    "web",
                    "http",
                    FrontendKind::ClusterIp,
                    &[(backend6, 8080, true)],
                ),
            ),
        ]
        .into_iter()
        .collect(),
        ..DesiredTables::default()
    }
}

/// Counters that a packet passing untouched through egress must not move.
fn untouched_counts(fx: &Fixture) -> [u64; 3] {
    [
        fx.count(Reason::CtReply),
        fx.count(Reason::CtForward),
        fx.count(Reason::PassNotService),
    ]
}

#[test]
fn a_host_reply_leaving_for_the_pod_is_translated_back_and_nothing_else_is() {
    let test = "a_host_reply_leaving_for_the_pod_is_translated_back_and_nothing_else_is";
    let mut fx = Fixture::new(test, &desired(NODE, NODE6));

    // IPv4: the pod's SYN is balanced to the node itself.
    let syn = fx.pass(
        Hook::TcPod,
        &Packet::tcp((CLIENT, 40000), (VIP, 80), SYN, b""),
    );
    assert_eq!((syn.dst, syn.ports()), (NODE, Some((40000, 8080))));

    let before = untouched_counts(&fx);
    for (what, packet) in [
        (
            "an untracked packet",
            Packet::tcp((NODE, 22), (CLIENT, 40000), ACK, b"x"),
        ),
        (
            "the flow's forward tuple",
            Packet::tcp((CLIENT, 40000), (VIP, 80), ACK, b"x"),
        ),
    ] {
        let frame = packet.emit();
        let (verdict, out) = fx.run(Hook::TcEgress, &frame);
        assert_eq!(verdict, Hook::TcEgress.pass(), "{what} was not passed");
        assert_eq!(out, frame, "{what} was changed on egress");
    }
    assert_eq!(
        untouched_counts(&fx),
        before,
        "untouched egress packets were counted"
    );

    let reply = fx.pass(
        Hook::TcEgress,
        &Packet::tcp((NODE, 8080), (CLIENT, 40000), SYN | ACK, b""),
    );
    assert_eq!(
        reply.src, VIP,
        "the host's reply src IP hasn't been reverse-NATed"
    );
    assert_eq!(
        reply.ports(),
        Some((80, 40000)),
        "reply src port hasn't been reverse-NATed"
    );
    assert_eq!(reply.dst, CLIENT);
    assert_eq!(fx.count(Reason::CtReply), before[0] + 1, "ct_reply counter");

    // IPv6, the same.
    let syn = fx.pass6(
        Hook::TcPod,
        &Packet6::tcp((CLIENT6, 40000), (VIP6, 80), SYN, b""),
    );
    assert_eq!(syn.dst, NODE6, "IPv6 dst hasn't been NATed to the node");
    let before = untouched_counts(&fx);
    for (what, packet) in [
        (
            "an untracked IPv6 packet",
            Packet6::tcp((NODE6, 22), (CLIENT6, 40000), ACK, b"x"),
        ),
        (
            "the IPv6 flow's forward tuple",
            Packet6::tcp((CLIENT6, 40000), (VIP6, 80), ACK, b"x"),
        ),
    ] {
        let frame = packet.emit();
        let (verdict, out) = fx.run(Hook::TcEgress, &frame);
        assert_eq!(verdict, Hook::TcEgress.pass(), "{what} was not passed");
        assert_eq!(out, frame, "{what} was changed on egress");
    }
    assert_eq!(
        untouched_counts(&fx),
        before,
        "untouched IPv6 egress packets were counted"
    );
    let reply = fx.pass6(
        Hook::TcEgress,
        &Packet6::tcp((NODE6, 8080), (CLIENT6, 40000), SYN | ACK, b""),
    );
    assert_eq!(
        reply.src, VIP6,
        "the host's IPv6 reply hasn't been reverse-NATed"
    );
    assert_eq!(reply.ports(), Some((80, 40000)));
    assert_eq!(
        fx.count(Reason::CtReply),
        before[0] + 1,
        "IPv6 ct_reply counter"
    );
}

#[test]
fn a_reply_translated_on_a_pod_device_is_redirected_to_the_fibs_device() {
    let test = "a_reply_translated_on_a_pod_device_is_redirected_to_the_fibs_device";
    require_root(test);
    // A namespace of this test's own: forwarding on, the client routed
    // through `v0` with a known neighbour.
    let ns = NetNs::new("fib").expect("namespace");
    ns.sysctl("net.ipv4.ip_forward", "1").expect("ip_forward");
    ns.sysctl("net.ipv6.conf.all.forwarding", "1")
        .expect("IPv6 forwarding");
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let (client, client6) = (CLIENT.to_string(), CLIENT6.to_string());
    for args in [
        &["link", "add", "v0", "type", "veth", "peer", "name", "v1"][..],
        &["link", "set", "v0", "address", &mac(DEVICE_MAC)],
        &["link", "set", "v0", "up"],
        &["link", "set", "v1", "up"],
        &["route", "add", &client, "dev", "v0"],
        &[
            "neigh",
            "add",
            &client,
            "lladdr",
            &mac(CLIENT_MAC),
            "dev",
            "v0",
            "nud",
            "permanent",
        ],
        &["-6", "route", "add", &client6, "dev", "v0"],
        &[
            "-6",
            "neigh",
            "add",
            &client6,
            "lladdr",
            &mac(CLIENT_MAC),
            "dev",
            "v0",
            "nud",
            "permanent",
        ],
    ] {
        ns.ip(args).unwrap_or_else(|e| panic!("ip {args:?}: {e:#}"));
    }

    let outcome = ns
        .run(move || {
            let mut fx = Fixture::new(test, &desired(POD_A, POD_A6));
            let syn = fx.pass(
                Hook::TcPod,
                &Packet::tcp((CLIENT, 40000), (VIP, 80), SYN, b""),
            );
            assert_eq!(syn.dst, POD_A);
            let reply = Packet::tcp((POD_A, 8080), (CLIENT, 40000), SYN | ACK, b"").emit();
            let v4 = fx.run(Hook::TcPod, &reply);
            let syn = fx.pass6(
                Hook::TcPod,
                &Packet6::tcp((CLIENT6, 40000), (VIP6, 80), SYN, b""),
            );
            assert_eq!(syn.dst, POD_A6);
            let reply = Packet6::tcp((POD_A6, 8080), (CLIENT6, 40000), SYN | ACK, b"").emit();
            let v6 = fx.run(Hook::TcPod, &reply);
            (v4, v6)
        })
        .expect("fixture inside the namespace");

    let ((verdict, out), (verdict6, out6)) = outcome;
    for (family, verdict, out) in [("IPv4", verdict, &out), ("IPv6", verdict6, &out6)] {
        assert_eq!(
            verdict, TC_ACT_REDIRECT,
            "{family}: the translated reply was not redirected"
        );
        assert_eq!(
            out[0..6],
            CLIENT_MAC,
            "{family}: destination MAC is not the client's next hop"
        );
        assert_eq!(
            out[6..12],
            DEVICE_MAC,
            "{family}: source MAC is not the egress device's"
        );
    }
    let reply = Packet::parse(&out).expect("IPv4 output");
    assert_eq!((reply.src, reply.ports()), (VIP, Some((80, 40000))));
    let reply6 = Packet6::parse(&out6).expect("IPv6 output");
    assert_eq!((reply6.src, reply6.ports()), (VIP6, Some((80, 40000))));
}
