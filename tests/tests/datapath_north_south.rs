//! In-kernel fixtures for traffic from outside the cluster: the XDP program
//! of node devices (and its TC fallback) on NodePort, LoadBalancer and
//! externalIP frontends, with externalTrafficPolicy Cluster (SNAT to this
//! node when the backend is elsewhere) and Local (client address kept, local
//! endpoints only), and loadBalancerSourceRanges.

use std::net::{IpAddr, Ipv4Addr};

use lb_agent::model::{
    DesiredTables, Frontend, FrontendKind, FrontendSpec, Protocol, Scope, SourceRange,
};
use lb_common::stats::Reason;
use lb_tests::{
    fixture::{Fixture, Hook, spec},
    packet::{ACK, Packet, SYN},
};

/// This node, the external client, one outside the allowed range, and a pod
/// of this node acting as a client.
const NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
const EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
const DENIED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 50);
const POD_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
/// A backend on this node and one on another node.
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 11);
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);

const CLUSTER_MIXED: u16 = 30080;
const CLUSTER_REMOTE: u16 = 30081;
const CLUSTER_LOCAL: u16 = 30082;
const LOCAL_POLICY: u16 = 30090;
const LOCAL_POLICY_EMPTY: u16 = 30091;

fn fe(addr: Ipv4Addr, port: u16) -> Frontend {
    Frontend::new(IpAddr::V4(addr), port, Protocol::Tcp)
}

fn internal(addr: Ipv4Addr, port: u16) -> Frontend {
    Frontend {
        scope: Scope::Internal,
        ..fe(addr, port)
    }
}

fn local_only(mut s: FrontendSpec) -> FrontendSpec {
    s.local_only = true;
    s
}

fn desired() -> DesiredTables {
    let np = FrontendKind::NodePort;
    let local = (LOCAL, 8080, true);
    let remote = (REMOTE, 8080, false);
    let mut lb = spec("lb", "http", FrontendKind::LoadBalancer, &[local]);
    lb.source_ranges = vec![SourceRange {
        addr: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 0)),
        prefix_len: 24,
    }];
    DesiredTables {
        frontends: [
            (
                fe(NODE, CLUSTER_MIXED),
                spec("mixed", "http", np, &[local, remote]),
            ),
            (
                fe(NODE, CLUSTER_REMOTE),
                spec("remote", "http", np, &[remote]),
            ),
            (fe(NODE, CLUSTER_LOCAL), spec("local", "http", np, &[local])),
            (
                fe(NODE, LOCAL_POLICY),
                local_only(spec("etp-local", "http", np, &[local])),
            ),
            (
                internal(NODE, LOCAL_POLICY),
                spec("etp-local", "http", np, &[local, remote]),
            ),
            (
                fe(NODE, LOCAL_POLICY_EMPTY),
                local_only(spec("etp-local-empty", "http", np, &[])),
            ),
            (
                internal(NODE, LOCAL_POLICY_EMPTY),
                spec("etp-local-empty", "http", np, &[remote]),
            ),
            (fe(LB_IP, 80), lb),
            (
                fe(EXTERNAL_IP, 80),
                spec("ext-ip", "http", FrontendKind::ExternalIp, &[remote]),
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
    fx
}

fn syn(from: (Ipv4Addr, u16), to: (Ipv4Addr, u16)) -> Packet {
    Packet::tcp(from, to, SYN, b"")
}

#[test]
fn nodeport_to_a_local_backend_is_translated_without_snat_and_replies_return() {
    let mut fx =
        fixture("nodeport_to_a_local_backend_is_translated_without_snat_and_replies_return");
    let out = fx.pass(Hook::Xdp, &syn((EXT, 40000), (NODE, CLUSTER_LOCAL)));
    assert_eq!(
        (out.dst, out.ports()),
        (LOCAL, Some((40000, 8080))),
        "dst hasn't been NATed"
    );
    assert_eq!(out.src, EXT, "a local backend must see the client address");

    // The pod answers through its veth (TC), straight back to the client.
    let reply = fx.pass(
        Hook::TcPod,
        &Packet::tcp((LOCAL, 8080), (EXT, 40000), SYN | ACK, b""),
    );
    assert_eq!(
        (reply.src, reply.ports()),
        (NODE, Some((CLUSTER_LOCAL, 40000))),
        "reply not reverse-NATed"
    );
    assert_eq!(reply.dst, EXT);
}

#[test]
fn nodeport_to_a_remote_backend_is_snatted_and_both_translations_reverse() {
    let mut fx = fixture("nodeport_to_a_remote_backend_is_snatted_and_both_translations_reverse");
    let before = fx.count(Reason::NewFlow);
    let out = fx.pass(Hook::Xdp, &syn((EXT, 40001), (NODE, CLUSTER_REMOTE)));
    assert_eq!(out.dst, REMOTE, "dst IP hasn't been NATed");
    assert_eq!(out.src, NODE, "src IP hasn't been SNATed to the node");
    let (snat_port, dst_port) = out.ports().expect("ports");
    assert_eq!(dst_port, 8080);
    assert!(
        (61000..=65522).contains(&snat_port),
        "SNAT port {snat_port} outside its range"
    );
    assert_eq!(fx.count(Reason::NewFlow), before + 1);

    // The same flow keeps both translations.
    let again = fx.pass(
        Hook::Xdp,
        &Packet::tcp((EXT, 40001), (NODE, CLUSTER_REMOTE), ACK, b"data"),
    );
    assert_eq!(
        (again.src, again.dst, again.ports()),
        (NODE, REMOTE, Some((snat_port, 8080)))
    );

    // The reply comes back over the underlay to this node's device.
    let reply = fx.pass(
        Hook::Xdp,
        &Packet::tcp((REMOTE, 8080), (NODE, snat_port), SYN | ACK, b""),
    );
    assert_eq!(
        reply.src, NODE,
        "reply src hasn't been reverse-NATed to the frontend"
    );
    assert_eq!(
        reply.dst, EXT,
        "reply dst hasn't been reverse-SNATed to the client"
    );
    assert_eq!(reply.ports(), Some((CLUSTER_REMOTE, 40001)));

    // Another client gets its own SNAT port.
    let other = fx.pass(
        Hook::Xdp,
        &syn(
            (Ipv4Addr::new(198, 51, 100, 101), 40001),
            (NODE, CLUSTER_REMOTE),
        ),
    );
    assert_ne!(
        other.ports().map(|p| p.0),
        Some(snat_port),
        "two clients share one SNAT port"
    );
}

#[test]
fn cluster_policy_uses_local_and_remote_backends() {
    let mut fx = fixture("cluster_policy_uses_local_and_remote_backends");
    let mut seen = std::collections::BTreeSet::new();
    for port in 41000..41200 {
        let out = fx.pass(Hook::Xdp, &syn((EXT, port), (NODE, CLUSTER_MIXED)));
        // SNAT exactly when the backend is on another node.
        assert_eq!(
            out.src == NODE,
            out.dst == REMOTE,
            "SNAT decision wrong for {out:?}"
        );
        seen.insert(out.dst);
    }
    assert_eq!(seen.len(), 2, "not both backends chosen: {seen:?}");
}

#[test]
fn local_policy_keeps_the_client_address_and_uses_local_endpoints_only() {
    let mut fx = fixture("local_policy_keeps_the_client_address_and_uses_local_endpoints_only");
    for port in 42000..42100 {
        let out = fx.pass(Hook::Xdp, &syn((EXT, port), (NODE, LOCAL_POLICY)));
        assert_eq!(
            out.dst, LOCAL,
            "external traffic of a Local service left the node"
        );
        assert_eq!(out.src, EXT, "the client address was not kept");
    }
}

#[test]
fn local_policy_without_local_endpoints_drops_and_counts() {
    let mut fx = fixture("local_policy_without_local_endpoints_drops_and_counts");
    let before = fx.count(Reason::DropNoLocalBackend);
    fx.dropped(Hook::Xdp, &syn((EXT, 40002), (NODE, LOCAL_POLICY_EMPTY)));
    assert_eq!(
        fx.count(Reason::DropNoLocalBackend),
        before + 1,
        "drop_no_local_backend counter"
    );
}

#[test]
fn pods_reach_every_endpoint_of_a_local_policy_service() {
    let mut fx = fixture("pods_reach_every_endpoint_of_a_local_policy_service");
    // No local endpoint, yet pods are served (by the internal entry).
    let out = fx.pass(
        Hook::TcPod,
        &syn((POD_CLIENT, 43000), (NODE, LOCAL_POLICY_EMPTY)),
    );
    assert_eq!(
        (out.src, out.dst),
        (POD_CLIENT, REMOTE),
        "pod traffic not sent to the remote endpoint"
    );
    let mut seen = std::collections::BTreeSet::new();
    for port in 43001..43200 {
        seen.insert(
            fx.pass(Hook::TcPod, &syn((POD_CLIENT, port), (NODE, LOCAL_POLICY)))
                .dst,
        );
    }
    assert_eq!(seen.len(), 2, "pods did not reach every endpoint: {seen:?}");
}

#[test]
fn load_balancer_source_ranges_allow_and_deny() {
    let mut fx = fixture("load_balancer_source_ranges_allow_and_deny");
    let out = fx.pass(Hook::Xdp, &syn((EXT, 40003), (LB_IP, 80)));
    assert_eq!(out.dst, LOCAL, "an allowed client was not translated");
    let before = fx.count(Reason::DropSourceRange);
    fx.dropped(Hook::Xdp, &syn((DENIED, 40003), (LB_IP, 80)));
    assert_eq!(
        fx.count(Reason::DropSourceRange),
        before + 1,
        "drop_source_range counter"
    );
}

#[test]
fn external_ip_to_a_remote_backend_is_snatted() {
    let mut fx = fixture("external_ip_to_a_remote_backend_is_snatted");
    let out = fx.pass(Hook::Xdp, &syn((EXT, 40004), (EXTERNAL_IP, 80)));
    assert_eq!((out.src, out.dst), (NODE, REMOTE));
    let snat_port = out.ports().expect("ports").0;
    let reply = fx.pass(
        Hook::Xdp,
        &Packet::tcp((REMOTE, 8080), (NODE, snat_port), ACK, b"ok"),
    );
    assert_eq!(
        (reply.src, reply.dst, reply.ports()),
        (EXTERNAL_IP, EXT, Some((80, 40004)))
    );
}

#[test]
fn the_tc_fallback_on_node_devices_translates_like_xdp() {
    let mut fx = fixture("the_tc_fallback_on_node_devices_translates_like_xdp");
    let out = fx.pass(Hook::TcNode, &syn((EXT, 40005), (NODE, CLUSTER_REMOTE)));
    assert_eq!(
        (out.src, out.dst),
        (NODE, REMOTE),
        "TC fallback did not DNAT+SNAT"
    );
    let snat_port = out.ports().expect("ports").0;
    let reply = fx.pass(
        Hook::TcNode,
        &Packet::tcp((REMOTE, 8080), (NODE, snat_port), ACK, b""),
    );
    assert_eq!((reply.src, reply.dst), (NODE, EXT));
}

#[test]
fn snat_without_a_node_address_drops_and_counts() {
    let mut fx = Fixture::new("snat_without_a_node_address_drops_and_counts", &desired());
    let before = fx.count(Reason::DropNoNodeAddress);
    fx.dropped(Hook::Xdp, &syn((EXT, 40006), (NODE, CLUSTER_REMOTE)));
    assert_eq!(fx.count(Reason::DropNoNodeAddress), before + 1);
}

#[test]
fn udp_through_xdp_keeps_valid_checksums() {
    let mut desired = desired();
    desired.frontends.insert(
        Frontend::new(IpAddr::V4(NODE), 30053, Protocol::Udp),
        spec(
            "dns",
            "dns",
            FrontendKind::NodePort,
            &[(REMOTE, 5353, false)],
        ),
    );
    let mut fx = Fixture::new("udp_through_xdp_keeps_valid_checksums", &desired);
    fx.set_node_address(NODE);
    let out = fx.pass(
        Hook::Xdp,
        &Packet::udp((EXT, 50000), (NODE, 30053), b"query"),
    );
    assert_eq!((out.src, out.dst), (NODE, REMOTE));
    let snat_port = out.ports().expect("ports").0;
    let reply = fx.pass(
        Hook::Xdp,
        &Packet::udp((REMOTE, 5353), (NODE, snat_port), b"answer"),
    );
    assert_eq!(
        (reply.src, reply.dst, reply.ports()),
        (NODE, EXT, Some((30053, 50000)))
    );
    let mut unchecked = Packet::udp((EXT, 50001), (NODE, 30053), b"q");
    unchecked.udp_zero_checksum = true;
    assert!(
        fx.pass(Hook::Xdp, &unchecked).udp_zero_checksum,
        "a zero UDP checksum must stay zero"
    );
}
