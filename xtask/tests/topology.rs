//! The multi-node [`Cluster`] against the real kernel: pods reach pods on
//! other nodes over the underlay, the external client reaches node
//! addresses and routed prefixes but no pod, everything arriving on a
//! node's `eth0` carries a full checksum, and nothing is left after drop.
//! Needs root, ethtool and tcpdump (`cargo xtask setup`).

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use xtask::{Cluster, EchoServer, NODE_DEVICE, NetNs, client_of, http_get, pod_of};

const TIMEOUT: Duration = Duration::from_secs(2);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
const NODE_PORT: u16 = 9000;

fn require_root() {
    // SAFETY: geteuid(2) has no side effects.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests need root: they create network namespaces and veth pairs (run `cargo xtask test` as root)"
    );
}

fn netns_list() -> String {
    let output = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `traffic` while tcpdump watches TCP arriving on `dev` in `ns`
/// (ingress only: what an XDP program there sees) and returns tcpdump's
/// `-vv` lines. Bounded: tcpdump stops after `packets` or 3 s.
fn capture_ingress(ns: &NetNs, dev: &str, packets: usize, traffic: impl FnOnce()) -> String {
    let count = packets.to_string();
    let mut child = ns
        .command("timeout")
        .args(["3", "tcpdump", "-l", "-n", "-vv", "-Q", "in", "-c", &count])
        .args(["-i", dev, "tcp"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting tcpdump (run `cargo xtask setup`)");
    // tcpdump says "listening on" once its socket is bound to the device.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap() > 0 && !line.contains("listening on") {}
    assert!(line.contains("listening on"), "tcpdump: {line}");
    traffic();
    let output = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Routes, addresses and link names of the root namespace (no counters or
/// lifetimes, which change by themselves).
fn root_view() -> String {
    let ip = |args: &[&str]| {
        let output = Command::new("ip").args(args).output().unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let mut view = ip(&["route", "show"]);
    for line in ip(&["-o", "addr", "show"]).lines() {
        // `2: eth0    inet 192.0.2.2/24 ...`: index, device, family, address.
        let fields: Vec<&str> = line.split_whitespace().take(4).collect();
        view.push_str(&fields.join(" "));
        view.push('\n');
    }
    for line in ip(&["-o", "link", "show"]).lines() {
        view.push_str(line.split(':').nth(1).unwrap_or_default().trim());
        view.push('\n');
    }
    view
}

#[test]
fn two_node_cluster_routes_pods_nodes_and_the_external_client() {
    require_root();
    let root_before = root_view();
    let mut cluster = Cluster::new(2).expect("creating a 2-node cluster");
    cluster.add_pod(1, "client", CLIENT_IP).unwrap();
    cluster.add_pod(2, "server", SERVER_IP).unwrap();
    assert!(
        cluster
            .add_pod(2, "other", Ipv4Addr::new(10, 244, 1, 9))
            .is_err(),
        "a node-1 address accepted on node-2"
    );
    assert!(
        cluster
            .add_pod(2, "gateway", Ipv4Addr::new(10, 244, 2, 1))
            .is_err(),
        "the gateway address accepted as a pod address"
    );
    assert!(
        cluster
            .add_pod(2, "client", Ipv4Addr::new(10, 244, 2, 3))
            .is_err(),
        "a pod name used twice across nodes"
    );
    assert!(
        cluster
            .add_pod(3, "x", Ipv4Addr::new(10, 244, 3, 2))
            .is_err(),
        "pod on a node that does not exist"
    );

    // Addressing plan and lookups (nodes are 1-based).
    assert_eq!(cluster.node_count(), 2);
    assert_eq!(cluster.node(1).name(), "node-1");
    assert_eq!(cluster.node(2).gateway(), Ipv4Addr::new(10, 244, 2, 1));
    assert_eq!(cluster.node_by_name("node-2").unwrap().name(), "node-2");
    assert!(cluster.node_by_name("node-3").is_err());
    assert_eq!(cluster.node_ip(1), Ipv4Addr::new(198, 51, 100, 11));
    assert_eq!(cluster.node_ip(2), Ipv4Addr::new(198, 51, 100, 12));
    assert_eq!(cluster.external_ip(), Ipv4Addr::new(198, 51, 100, 100));
    assert_eq!(cluster.pod("server").unwrap().ip(), SERVER_IP);
    assert_eq!(cluster.pod("server").unwrap().host_if(), "lbv1");
    assert!(cluster.pod("nobody").is_err());

    let mut names = vec![
        cluster.underlay().name().to_owned(),
        cluster.external().name().to_owned(),
    ];
    for node in cluster.nodes() {
        names.push(node.ns().name().to_owned());
        names.extend(node.pods().iter().map(|pod| pod.ns().name().to_owned()));
    }
    assert_eq!(names.len(), 6);
    let listed = netns_list();
    for name in &names {
        assert!(name.starts_with("lbt-"), "{name}");
        assert!(listed.contains(name.as_str()), "{name} not in:\n{listed}");
    }

    // Wiring: host-gw routes, sysctls, bridge ports, offloads.
    let routes = cluster
        .node(1)
        .ns()
        .sh_ok(&["ip", "route", "show"])
        .unwrap();
    assert!(
        routes.contains("10.244.2.0/24 via 198.51.100.12 dev eth0"),
        "node-1 routes:\n{routes}"
    );
    let routes = cluster
        .node(2)
        .ns()
        .sh_ok(&["ip", "route", "show"])
        .unwrap();
    assert!(
        routes.contains("10.244.1.0/24 via 198.51.100.11 dev eth0")
            && routes.contains("10.244.2.2 dev lbv1"),
        "node-2 routes:\n{routes}"
    );
    for node in cluster.nodes() {
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "1"),
            ("net.ipv4.conf.default.rp_filter", "1"),
            ("net.ipv4.conf.eth0.rp_filter", "1"),
        ] {
            let seen = node.ns().sh_ok(&["sysctl", "-n", key]).unwrap();
            assert_eq!(seen.trim(), value, "{key} on {}", node.name());
        }
    }
    let underlay = cluster.underlay();
    let forward = underlay
        .sh_ok(&["sysctl", "-n", "net.ipv4.ip_forward"])
        .unwrap();
    assert_eq!(forward.trim(), "0", "ip_forward in the underlay");
    let ports = underlay
        .sh_ok(&["ip", "-o", "link", "show", "master", "br0"])
        .unwrap();
    for port in ["n1@", "n2@", "ext0@"] {
        assert!(ports.contains(port), "br0 ports:\n{ports}");
    }
    for ns in std::iter::once(cluster.external()).chain(cluster.nodes().iter().map(|n| n.ns())) {
        let features = ns.sh_ok(&["ethtool", "-k", NODE_DEVICE]).unwrap();
        assert!(
            features.lines().any(|l| l.trim() == "tx-checksumming: off"),
            "{}: ethtool -k eth0:\n{features}",
            ns.name()
        );
    }

    // Pod on node-1 to pod on node-2, over the underlay, no SNAT. What
    // arrives on node-2's eth0 (where XDP would run) has full checksums.
    let server =
        EchoServer::start(cluster.pod("server").unwrap().ns(), "server", &[8080], &[]).unwrap();
    let client = cluster.pod("client").unwrap();
    let server_addr = SocketAddrV4::new(SERVER_IP, 8080);
    let mut body = String::new();
    let dump = capture_ingress(cluster.node(2).ns(), NODE_DEVICE, 4, || {
        body = http_get(client.ns(), server_addr, TIMEOUT).unwrap();
    });
    assert_eq!(pod_of(&body), Some("server"), "answer: {body:?}");
    assert_eq!(
        client_of(&body).unwrap().ip(),
        CLIENT_IP,
        "answer: {body:?}"
    );
    assert_eq!(server.tcp_served(), 1);
    let checked = dump.matches("cksum").count();
    assert!(checked >= 4, "tcpdump saw {checked} packets:\n{dump}");
    assert!(
        !dump.contains("incorrect"),
        "partial checksums arrived on node-2's eth0:\n{dump}"
    );

    // The external client reaches a node address directly.
    let node_server = EchoServer::start(cluster.node(2).ns(), "node-2", &[NODE_PORT], &[]).unwrap();
    let node_addr = SocketAddrV4::new(cluster.node_ip(2), NODE_PORT);
    let body = http_get(cluster.external(), node_addr, TIMEOUT).unwrap();
    assert_eq!(pod_of(&body), Some("node-2"), "answer: {body:?}");
    assert_eq!(
        client_of(&body).unwrap().ip(),
        cluster.external_ip(),
        "answer: {body:?}"
    );

    // ... but no pod address: no route, so connect fails at once.
    let started = Instant::now();
    let error = http_get(cluster.external(), server_addr, TIMEOUT).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "failing took {:?}: {error:#}",
        started.elapsed()
    );
    assert!(format!("{error:#}").contains("connecting"), "{error:#}");

    // route_via: an address on node-2 (as a LoadBalancer IP would be
    // handled there) becomes reachable from outside; re-routing replaces.
    let lb_ip = "203.0.113.10";
    cluster
        .node(2)
        .ns()
        .ip(&["addr", "add", &format!("{lb_ip}/32"), "dev", "lo"])
        .unwrap();
    cluster.route_via("203.0.113.0/24", 2).unwrap();
    let ext_routes = cluster.external().sh_ok(&["ip", "route", "show"]).unwrap();
    assert!(
        ext_routes.contains("203.0.113.0/24 via 198.51.100.12 dev eth0")
            && !ext_routes.contains("default"),
        "external routes:\n{ext_routes}"
    );
    let lb_addr = SocketAddrV4::new(lb_ip.parse().unwrap(), NODE_PORT);
    let body = http_get(cluster.external(), lb_addr, TIMEOUT).unwrap();
    assert_eq!(pod_of(&body), Some("node-2"), "answer: {body:?}");
    assert_eq!(node_server.tcp_served(), 2);
    cluster.route_via("203.0.113.0/24", 1).unwrap();
    let ext_routes = cluster.external().sh_ok(&["ip", "route", "show"]).unwrap();
    assert!(
        ext_routes.contains("203.0.113.0/24 via 198.51.100.11 dev eth0")
            && !ext_routes.contains("via 198.51.100.12"),
        "external routes:\n{ext_routes}"
    );
    assert!(cluster.route_via("203.0.113.0/24", 3).is_err());

    // Nothing leaked into the root namespace (which may well use
    // a documentation range itself: the underlay is a separate namespace).
    assert_eq!(root_view(), root_before, "the root namespace changed");

    drop(node_server);
    drop(server);
    drop(cluster);
    let listed = netns_list();
    for name in &names {
        assert!(
            !listed.contains(name.as_str()),
            "{name} left behind:\n{listed}"
        );
    }
}

#[test]
fn cluster_sizes_are_checked() {
    require_root();
    let before = netns_list();
    assert!(Cluster::new(0).is_err());
    assert!(Cluster::new(90).is_err());
    assert_eq!(netns_list(), before, "a refused cluster created namespaces");
}
