//! In-kernel fixtures for fragmented datagrams: the later fragments of a
//! translated UDP datagram (no L4 header, so no ports to look up) get the
//! address translation of their first fragment, both families, on every
//! hook, both directions, through SNAT; a later fragment of an unknown
//! datagram addressed to a ClusterIP is dropped. Every output fragment's
//! header checksum and the reassembled datagram's L4 checksum are
//! recomputed here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_agent::model::{DesiredTables, Frontend, FrontendKind, Protocol};
use lb_common::stats::Reason;
use lb_tests::{
    fixture::{Fixture, Hook, spec, spec6},
    packet::{Packet, fragments, reassemble},
    packet6::{Packet6, fragments6, reassemble6},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 12);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 11);
const NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
const EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);

const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const POD_A6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0x11);
const POD_B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0x12);
const REMOTE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 2, 0, 0, 0, 0, 0x11);
const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11);
const EXT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);

const DNS: u16 = 53;
const POD_DNS: u16 = 5353;
const NODE_PORT: u16 = 30053;
/// IP payload bytes per fragment: a 3,000-byte datagram in three.
const CHUNK: usize = 1232;

fn udp_frontend(addr: IpAddr, port: u16) -> Frontend {
    Frontend::new(addr, port, Protocol::Udp)
}

/// A UDP ClusterIP (both families) to a pod of this node, and a UDP
/// NodePort (both families) to a pod of another node (SNAT from outside).
fn desired() -> DesiredTables {
    DesiredTables {
        frontends: [
            (
                udp_frontend(VIP.into(), DNS),
                spec(
                    "dns",
                    "dns",
                    FrontendKind::ClusterIp,
                    &[(POD_A, POD_DNS, true)],
                ),
            ),
            (
                udp_frontend(NODE.into(), NODE_PORT),
                spec(
                    "np",
                    "dns",
                    FrontendKind::NodePort,
                    &[(REMOTE, POD_DNS, false)],
                ),
            ),
            (
                udp_frontend(VIP6.into(), DNS),
                spec6(
                    "dns6",
                    "dns",
                    FrontendKind::ClusterIp,
                    &[(POD_A6, POD_DNS, true)],
                ),
            ),
            (
                udp_frontend(NODE6.into(), NODE_PORT),
                spec6(
                    "np6",
                    "dns",
                    FrontendKind::NodePort,
                    &[(REMOTE6, POD_DNS, false)],
                ),
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

/// A 3,000-byte UDP payload whose bytes differ along the datagram.
fn big_payload(seed: u8) -> Vec<u8> {
    (0..2992u32)
        .map(|i| (i as u8).wrapping_mul(7) ^ seed)
        .collect()
}

/// Runs every frame through `hook`, expecting each passed; the outputs.
fn pass_all(fx: &mut Fixture, hook: Hook, frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    frames
        .iter()
        .enumerate()
        .map(|(i, frame)| {
            let (verdict, out) = fx.run(hook, frame);
            assert_eq!(
                verdict,
                hook.pass(),
                "{hook:?}: fragment {i} was not passed"
            );
            out
        })
        .collect()
}

/// Sends `packet` as three IPv4 fragments through `hook`: the reassembled
/// output (checksums verified), and checks the counters: `first` once, two
/// later fragments translated.
fn datagram4(fx: &mut Fixture, hook: Hook, packet: &Packet, id: u16, first: Reason) -> Packet {
    let frames = fragments(packet, id, CHUNK);
    assert_eq!(frames.len(), 3, "three fragments");
    let (before, later) = (fx.count(first), fx.count(Reason::PassFragmentTranslated));
    let out = pass_all(fx, hook, &frames);
    let whole = reassemble(&out).unwrap_or_else(|e| {
        let (src, dst) = (packet.src, packet.dst);
        panic!("{hook:?}: fragments of {src} -> {dst} broken: {e}")
    });
    assert_eq!(whole.payload, packet.payload, "{hook:?}: payload changed");
    assert_eq!(fx.count(first), before + 1, "{hook:?}: {first:?} counter");
    assert_eq!(
        fx.count(Reason::PassFragmentTranslated),
        later + 2,
        "{hook:?}: the two later fragments were not translated"
    );
    whole
}

/// [`datagram4`] for IPv6.
fn datagram6(fx: &mut Fixture, hook: Hook, packet: &Packet6, id: u32, first: Reason) -> Packet6 {
    let frames = fragments6(packet, id, CHUNK);
    assert_eq!(frames.len(), 3, "three fragments");
    let (before, later) = (fx.count(first), fx.count(Reason::PassFragmentTranslated));
    let out = pass_all(fx, hook, &frames);
    let whole = reassemble6(&out).unwrap_or_else(|e| {
        let (src, dst) = (packet.src, packet.dst);
        panic!("{hook:?}: fragments of {src} -> {dst} broken: {e}")
    });
    assert_eq!(whole.payload, packet.payload, "{hook:?}: payload changed");
    assert_eq!(fx.count(first), before + 1, "{hook:?}: {first:?} counter");
    assert_eq!(
        fx.count(Reason::PassFragmentTranslated),
        later + 2,
        "{hook:?}: the two later fragments were not translated"
    );
    whole
}

#[test]
fn fragments_of_a_udp_datagram_to_a_cluster_ip_are_all_translated_both_ways() {
    let mut fx =
        fixture("fragments_of_a_udp_datagram_to_a_cluster_ip_are_all_translated_both_ways");
    let request = Packet::udp((CLIENT, 40000), (VIP, DNS), &big_payload(1));
    let out = datagram4(&mut fx, Hook::TcPod, &request, 0x1001, Reason::NewFlow);
    assert_eq!(
        (out.src, out.dst, out.ports()),
        (CLIENT, POD_A, Some((40000, POD_DNS))),
        "fragments not translated to the backend"
    );
    let reply = Packet::udp((POD_A, POD_DNS), (CLIENT, 40000), &big_payload(2));
    let out = datagram4(&mut fx, Hook::TcPod, &reply, 0x2002, Reason::CtReply);
    assert_eq!(
        (out.src, out.dst, out.ports()),
        (VIP, CLIENT, Some((DNS, 40000))),
        "reply fragments not translated back to the ClusterIP"
    );

    let request = Packet6::udp((CLIENT6, 40000), (VIP6, DNS), &big_payload(3));
    let out = datagram6(&mut fx, Hook::TcPod, &request, 0x3003_0001, Reason::NewFlow);
    assert_eq!(
        (out.src, out.dst, out.ports()),
        (CLIENT6, POD_A6, Some((40000, POD_DNS))),
        "IPv6 fragments not translated to the backend"
    );
    let reply = Packet6::udp((POD_A6, POD_DNS), (CLIENT6, 40000), &big_payload(4));
    let out = datagram6(&mut fx, Hook::TcPod, &reply, 0x4004_0001, Reason::CtReply);
    assert_eq!(
        (out.src, out.dst, out.ports()),
        (VIP6, CLIENT6, Some((DNS, 40000))),
        "IPv6 reply fragments not translated back to the ClusterIP"
    );
}

#[test]
fn fragments_through_a_node_port_with_snat_are_all_translated_both_ways() {
    let mut fx = fixture("fragments_through_a_node_port_with_snat_are_all_translated_both_ways");
    for (i, hook) in [Hook::Xdp, Hook::TcNode].into_iter().enumerate() {
        let client_port = 41000 + i as u16;
        let id = 0x5000 + i as u16;
        let request = Packet::udp((EXT, client_port), (NODE, NODE_PORT), &big_payload(5));
        let out = datagram4(&mut fx, hook, &request, id, Reason::NewFlow);
        let (snat_port, backend_port) = out.ports().expect("UDP");
        assert_eq!(
            (out.src, out.dst, backend_port),
            (NODE, REMOTE, POD_DNS),
            "{hook:?}: fragments not translated to the backend through SNAT"
        );
        assert!(snat_port >= 61000, "{hook:?}: no SNAT port: {snat_port}");
        let reply = Packet::udp((REMOTE, POD_DNS), (NODE, snat_port), &big_payload(6));
        let out = datagram4(&mut fx, hook, &reply, id + 0x100, Reason::CtReply);
        assert_eq!(
            (out.src, out.dst, out.ports()),
            (NODE, EXT, Some((NODE_PORT, client_port))),
            "{hook:?}: reply fragments not translated back to the client"
        );

        let request = Packet6::udp((EXT6, client_port), (NODE6, NODE_PORT), &big_payload(7));
        let out = datagram6(&mut fx, hook, &request, u32::from(id) << 8, Reason::NewFlow);
        let (snat_port, backend_port) = out.ports().expect("UDP");
        assert_eq!(
            (out.src, out.dst, backend_port),
            (NODE6, REMOTE6, POD_DNS),
            "{hook:?}: IPv6 fragments not translated to the backend through SNAT"
        );
        assert!(
            snat_port >= 61000,
            "{hook:?}: no IPv6 SNAT port: {snat_port}"
        );
        let reply = Packet6::udp((REMOTE6, POD_DNS), (NODE6, snat_port), &big_payload(8));
        let id6 = (u32::from(id) << 8) + 1;
        let out = datagram6(&mut fx, hook, &reply, id6, Reason::CtReply);
        assert_eq!(
            (out.src, out.dst, out.ports()),
            (NODE6, EXT6, Some((NODE_PORT, client_port))),
            "{hook:?}: IPv6 reply fragments not translated back to the client"
        );
    }
}

#[test]
fn a_later_fragment_of_an_unknown_datagram_to_a_cluster_ip_is_dropped() {
    let mut fx = fixture("a_later_fragment_of_an_unknown_datagram_to_a_cluster_ip_is_dropped");
    let hook = Hook::TcPod;
    // Its first fragment never came (or comes last): nothing to translate
    // it by.
    let to_vip = fragments(
        &Packet::udp((CLIENT, 42000), (VIP, DNS), &big_payload(9)),
        7,
        CHUNK,
    );
    let to_vip6 = fragments6(
        &Packet6::udp((CLIENT6, 42000), (VIP6, DNS), &big_payload(9)),
        7,
        CHUNK,
    );
    for frame in [&to_vip[1], &to_vip[2], &to_vip6[1], &to_vip6[2]] {
        let before = fx.count(Reason::DropFragmentUnknown);
        let (verdict, _) = fx.run(hook, frame);
        assert_eq!(
            verdict,
            hook.drop(),
            "an unknown fragment to a ClusterIP passed"
        );
        assert_eq!(fx.count(Reason::DropFragmentUnknown), before + 1);
    }
    // Fragments of a datagram not to a service (its first fragment is not
    // translated, so not remembered) pass untouched, every one.
    let to_pod = fragments(
        &Packet::udp((CLIENT, 42001), (POD_B, 9), &big_payload(10)),
        8,
        CHUNK,
    );
    let to_pod6 = fragments6(
        &Packet6::udp((CLIENT6, 42001), (POD_B6, 9), &big_payload(10)),
        8,
        CHUNK,
    );
    for frames in [&to_pod, &to_pod6] {
        let before = fx.count(Reason::PassFragment);
        for frame in frames.iter() {
            let (verdict, out) = fx.run(hook, frame);
            assert_eq!(
                (verdict, &out),
                (hook.pass(), frame),
                "a fragment to a pod changed"
            );
        }
        assert_eq!(
            fx.count(Reason::PassFragment),
            before + 2,
            "pass_fragment counter"
        );
    }
}
