//! In-kernel fixtures for the rest of the Service semantics: session
//! affinity, ICMP port unreachable for services without endpoints and for
//! undefined ClusterIP ports, hairpin, internalTrafficPolicy Local, and the
//! UDP conntrack flush when a backend leaves.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use lb_agent::model::{DesiredTables, Frontend, FrontendKind, FrontendSpec, Protocol};
use lb_common::{HAIRPIN_ADDR4, stats::Reason};
use lb_tests::{
    fixture::{Fixture, Hook, spec},
    packet::{ACK, Packet, SYN, Transport},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 12);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 11);
const STICKY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const SELF_ONLY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const LOCAL_ONLY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
const EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(
    HAIRPIN_ADDR4[0],
    HAIRPIN_ADDR4[1],
    HAIRPIN_ADDR4[2],
    HAIRPIN_ADDR4[3],
);
const TC_ACT_REDIRECT: u32 = 7;
const XDP_TX: u32 = 3;

fn fe(addr: Ipv4Addr, port: u16, protocol: Protocol) -> Frontend {
    Frontend::new(IpAddr::V4(addr), port, protocol)
}

fn sticky(backends: &[(Ipv4Addr, u16, bool)], timeout: u32) -> FrontendSpec {
    let mut s = spec("sticky", "http", FrontendKind::ClusterIp, backends);
    s.affinity_timeout = Some(timeout);
    s
}

fn desired(sticky_backends: &[(Ipv4Addr, u16, bool)], timeout: u32) -> DesiredTables {
    let ab = [(POD_A, 8080, true), (POD_B, 8080, true)];
    let mut local = spec("itp-local", "http", FrontendKind::ClusterIp, &[]);
    local.local_only = true;
    DesiredTables {
        frontends: [
            (
                fe(STICKY, 80, Protocol::Tcp),
                sticky(sticky_backends, timeout),
            ),
            (
                fe(STICKY, 53, Protocol::Udp),
                spec("dns", "dns", FrontendKind::ClusterIp, &ab),
            ),
            (
                fe(EMPTY, 80, Protocol::Tcp),
                spec("empty", "http", FrontendKind::ClusterIp, &[]),
            ),
            (
                fe(EMPTY, 53, Protocol::Udp),
                spec("empty", "dns", FrontendKind::ClusterIp, &[]),
            ),
            (
                fe(SELF_ONLY, 80, Protocol::Tcp),
                spec(
                    "self",
                    "http",
                    FrontendKind::ClusterIp,
                    &[(POD_A, 8080, true)],
                ),
            ),
            (fe(LOCAL_ONLY, 80, Protocol::Tcp), local),
            (
                fe(NODE, 30080, Protocol::Tcp),
                spec("np-empty", "http", FrontendKind::NodePort, &[]),
            ),
        ]
        .into_iter()
        .collect(),
        ..DesiredTables::default()
    }
}

fn syn(from: (Ipv4Addr, u16), to: (Ipv4Addr, u16)) -> Packet {
    Packet::tcp(from, to, SYN, b"")
}

/// Checks an ICMP port unreachable answering `original`, and returns it.
fn assert_port_unreachable(out: &[u8], original: &Packet, from: Ipv4Addr) {
    let icmp = Packet::parse(out).unwrap_or_else(|e| panic!("reject is broken: {e}"));
    assert_eq!(
        icmp.transport,
        Transport::Other { protocol: 1 },
        "not ICMP: {icmp:?}"
    );
    assert_eq!((icmp.src, icmp.dst), (from, original.src), "ICMP addresses");
    let body = &icmp.payload;
    assert_eq!(
        (body[0], body[1]),
        (3, 3),
        "not destination/port unreachable"
    );
    let sum: u32 = body
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    assert_eq!(
        (folded & 0xffff) + (folded >> 16),
        0xffff,
        "ICMP checksum is wrong"
    );
    // The quote is the original IPv4 header and the first 8 bytes of L4.
    let sent = original.emit();
    assert_eq!(
        &body[8..36],
        &sent[14..42],
        "the quote is not the original packet"
    );
    assert_eq!(
        &out[0..6],
        &sent[6..12],
        "not sent back to the sender's MAC"
    );
}

#[test]
fn session_affinity_keeps_a_client_on_its_backend_until_the_timeout() {
    let both = [(POD_A, 8080, true), (POD_B, 8080, true)];
    let mut fx = Fixture::new(
        "session_affinity_keeps_a_client_on_its_backend_until_the_timeout",
        &desired(&both, 1),
    );
    let first = fx
        .pass(Hook::TcPod, &syn((CLIENT, 40000), (STICKY, 80)))
        .dst;
    let before = fx.count(Reason::NewFlowAffinity);
    for port in 40001..40031 {
        let out = fx.pass(Hook::TcPod, &syn((CLIENT, port), (STICKY, 80)));
        assert_eq!(out.dst, first, "a new connection of the same client moved");
    }
    assert_eq!(fx.count(Reason::NewFlowAffinity), before + 30);

    // Older than the timeout: a fresh choice (counted as a plain new flow).
    std::thread::sleep(Duration::from_millis(1100));
    let plain = fx.count(Reason::NewFlow);
    fx.pass(Hook::TcPod, &syn((CLIENT, 40100), (STICKY, 80)));
    assert_eq!(
        fx.count(Reason::NewFlow),
        plain + 1,
        "an expired affinity was used"
    );

    // Other clients are balanced independently: both backends get some.
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..60u8 {
        let client = Ipv4Addr::new(10, 244, 3, i + 1);
        seen.insert(
            fx.pass(Hook::TcPod, &syn((client, 41000), (STICKY, 80)))
                .dst,
        );
    }
    assert_eq!(seen.len(), 2, "affinity pinned every client to one backend");
}

#[test]
fn an_affinity_to_a_backend_that_left_is_ignored() {
    let both = [(POD_A, 8080, true), (POD_B, 8080, true)];
    let mut fx = Fixture::new(
        "an_affinity_to_a_backend_that_left_is_ignored",
        &desired(&both, 3600),
    );
    let first = fx
        .pass(Hook::TcPod, &syn((OTHER_CLIENT, 40000), (STICKY, 80)))
        .dst;
    let (left, stays) = if first == POD_A {
        (POD_A, POD_B)
    } else {
        (POD_B, POD_A)
    };
    fx.apply(&desired(&[(stays, 8080, true)], 3600));
    for port in 40001..40011 {
        let out = fx.pass(Hook::TcPod, &syn((OTHER_CLIENT, port), (STICKY, 80)));
        assert_eq!(
            out.dst, stays,
            "affinity kept a client on {left}, which left"
        );
    }
    // Switching affinity off in the manifest takes effect.
    let mut off = desired(&both, 3600);
    off.frontends
        .get_mut(&fe(STICKY, 80, Protocol::Tcp))
        .expect("sticky")
        .affinity_timeout = None;
    fx.apply(&off);
    let before = fx.count(Reason::NewFlowAffinity);
    for port in 40100..40120 {
        fx.pass(Hook::TcPod, &syn((OTHER_CLIENT, port), (STICKY, 80)));
    }
    assert_eq!(
        fx.count(Reason::NewFlowAffinity),
        before,
        "affinity used while off"
    );
}

#[test]
fn a_service_without_endpoints_answers_port_unreachable() {
    let mut fx = Fixture::new(
        "a_service_without_endpoints_answers_port_unreachable",
        &desired(&[], 0),
    );
    for packet in [
        syn((CLIENT, 40000), (EMPTY, 80)),
        Packet::udp((CLIENT, 40001), (EMPTY, 53), b"query"),
    ] {
        let before = fx.count(Reason::DropNoBackend);
        let (verdict, out) = fx.run(Hook::TcPod, &packet.emit());
        assert_eq!(verdict, TC_ACT_REDIRECT, "{packet:?} not sent back as ICMP");
        assert_port_unreachable(&out, &packet, EMPTY);
        assert_eq!(fx.count(Reason::DropNoBackend), before + 1);
    }
    // Not a connection attempt: dropped silently.
    fx.dropped(
        Hook::TcPod,
        &Packet::tcp((CLIENT, 40002), (EMPTY, 80), ACK, b""),
    );
    // The same from outside, through XDP (XDP_TX back out).
    let packet = syn((EXT, 40003), (NODE, 30080));
    let (verdict, out) = fx.run(Hook::Xdp, &packet.emit());
    assert_eq!(verdict, XDP_TX);
    assert_port_unreachable(&out, &packet, NODE);
}

#[test]
fn an_undefined_port_of_a_cluster_ip_is_rejected_and_other_addresses_are_not() {
    let mut fx = Fixture::new(
        "an_undefined_port_of_a_cluster_ip_is_rejected_and_other_addresses_are_not",
        &desired(&[(POD_A, 8080, true)], 0),
    );
    let packet = syn((CLIENT, 40000), (STICKY, 8443));
    let before = fx.count(Reason::DropUnknownPort);
    let (verdict, out) = fx.run(Hook::TcPod, &packet.emit());
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_port_unreachable(&out, &packet, STICKY);
    assert_eq!(fx.count(Reason::DropUnknownPort), before + 1);
    // A UDP port the service does not define is refused too.
    let (verdict, _) = fx.run(
        Hook::TcPod,
        &Packet::udp((CLIENT, 40001), (STICKY, 54), b"").emit(),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    // A pod address is not a ClusterIP: untouched.
    let pod = syn((CLIENT, 40002), (POD_B, 8443));
    let (verdict, out) = fx.run(Hook::TcPod, &pod.emit());
    assert_eq!((verdict, out), (Hook::TcPod.pass(), pod.emit()));
}

#[test]
fn a_pod_balanced_to_itself_gets_its_replies_through_the_hairpin_address() {
    let mut fx = Fixture::new(
        "a_pod_balanced_to_itself_gets_its_replies_through_the_hairpin_address",
        &desired(&[(POD_A, 8080, true)], 0),
    );
    let request = syn((POD_A, 40000), (SELF_ONLY, 80));
    let (verdict, out) = fx.run(Hook::TcPod, &request.emit());
    assert_eq!(verdict, TC_ACT_REDIRECT, "hairpin not sent straight back");
    let out_packet = Packet::parse(&out).expect("valid hairpin packet");
    assert_eq!(out_packet.dst, POD_A, "dst hasn't been NATed");
    assert_eq!(
        out_packet.src, HAIRPIN,
        "src hasn't been SNATed to the hairpin address"
    );
    let sent = request.emit();
    assert_eq!(
        (&out[0..6], &out[6..12]),
        (&sent[6..12], &sent[0..6]),
        "MACs not swapped"
    );
    let (snat_port, dport) = out_packet.ports().expect("ports");
    assert_eq!(dport, 8080);

    let reply = Packet::tcp((POD_A, 8080), (HAIRPIN, snat_port), SYN | ACK, b"");
    let (verdict, out) = fx.run(Hook::TcPod, &reply.emit());
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let back = Packet::parse(&out).expect("valid reply");
    assert_eq!(
        (back.src, back.dst, back.ports()),
        (SELF_ONLY, POD_A, Some((80, 40000)))
    );
}

#[test]
fn internal_traffic_policy_local_without_local_endpoints_drops_and_counts() {
    let mut fx = Fixture::new(
        "internal_traffic_policy_local_without_local_endpoints_drops_and_counts",
        &desired(&[(POD_A, 8080, true)], 0),
    );
    let before = fx.count(Reason::DropNoLocalBackend);
    fx.dropped(Hook::TcPod, &syn((CLIENT, 40000), (LOCAL_ONLY, 80)));
    assert_eq!(fx.count(Reason::DropNoLocalBackend), before + 1);
}

#[test]
fn udp_flows_to_a_removed_backend_are_flushed_and_rebalanced() {
    let both = [(POD_A, 8080, true), (POD_B, 8080, true)];
    let mut fx = Fixture::new(
        "udp_flows_to_a_removed_backend_are_flushed_and_rebalanced",
        &desired(&both, 0),
    );
    // Find a UDP flow on each backend.
    let mut on = std::collections::BTreeMap::new();
    for port in 42000..42100 {
        let out = fx.pass(
            Hook::TcPod,
            &Packet::udp((CLIENT, port), (STICKY, 53), b"q"),
        );
        on.entry(out.dst).or_insert(port);
    }
    let (port_a, port_b) = (on[&POD_A], on[&POD_B]);
    // POD_B leaves the dns service.
    let mut after = desired(&both, 0);
    after.frontends.insert(
        fe(STICKY, 53, Protocol::Udp),
        spec(
            "dns",
            "dns",
            FrontendKind::ClusterIp,
            &[(POD_A, 8080, true)],
        ),
    );
    let report = fx.programmer.apply(&after, &mut fx.tables);
    let flushed = fx
        .tables
        .flush_udp_conntrack(&report.removed_members)
        .expect("flush");
    assert!(
        flushed >= 2,
        "the flow to the removed backend was not flushed ({flushed})"
    );
    let out = fx.pass(
        Hook::TcPod,
        &Packet::udp((CLIENT, port_b), (STICKY, 53), b"again"),
    );
    assert_eq!(
        out.dst, POD_A,
        "UDP flow kept sending to the removed backend"
    );
    // The flow on the remaining backend was not disturbed (same CT entry).
    let before = fx.count(Reason::CtForward);
    fx.pass(
        Hook::TcPod,
        &Packet::udp((CLIENT, port_a), (STICKY, 53), b"again"),
    );
    assert_eq!(fx.count(Reason::CtForward), before + 1);
}

#[test]
fn remote_backend_of_a_hairpin_free_pod_is_untouched() {
    // A pod reaching a service whose backend is another pod: no hairpin.
    let mut d = desired(&[(REMOTE, 8080, false)], 0);
    d.frontends.insert(
        fe(SELF_ONLY, 80, Protocol::Tcp),
        spec(
            "self",
            "http",
            FrontendKind::ClusterIp,
            &[(REMOTE, 8080, false)],
        ),
    );
    let mut fx = Fixture::new("remote_backend_of_a_hairpin_free_pod_is_untouched", &d);
    let out = fx.pass(Hook::TcPod, &syn((POD_A, 40000), (SELF_ONLY, 80)));
    assert_eq!(
        (out.src, out.dst),
        (POD_A, REMOTE),
        "pod traffic was SNATed"
    );
}
