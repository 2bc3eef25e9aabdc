//! The namespace toolkit against the real kernel: pods reach each other
//! through the node, echo servers answer with who they are and whom they
//! saw, and everything is gone after drop. Needs root.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use xtask::echo::client_of;
use xtask::{
    AgentProcess, BpffsDir, EchoServer, HoldConnection, NetNs, SingleNode, cleanup_stale, http_get,
    pod_of, udp_request,
};

const TIMEOUT: Duration = Duration::from_secs(2);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);

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

fn two_pods() -> SingleNode {
    SingleNode::new(&[("client", CLIENT_IP), ("server", SERVER_IP)])
        .expect("creating a node with two pods")
}

#[test]
fn tcp_udp_and_held_connections_between_pods() {
    require_root();
    let topology = two_pods();
    let names: Vec<String> = std::iter::once(topology.node_ns())
        .chain(topology.pods().iter().map(|pod| pod.ns()))
        .map(|ns| ns.name().to_owned())
        .collect();
    let listed = netns_list();
    for name in &names {
        assert!(listed.contains(name.as_str()), "{name} not in:\n{listed}");
    }
    let client = topology.pod("client").unwrap();
    let server_pod = topology.pod("server").unwrap();
    assert_eq!(client.host_if(), "lbv1");
    assert_eq!(server_pod.host_if(), "lbv2");

    let server = EchoServer::start(server_pod.ns(), "server", &[8080], &[5353]).unwrap();

    let body = http_get(client.ns(), server_pod.addr(8080), TIMEOUT).unwrap();
    assert_eq!(pod_of(&body), Some("server"), "answer: {body:?}");
    let seen = client_of(&body).expect("answer names the client");
    assert_eq!(
        seen.ip(),
        CLIENT_IP,
        "server saw the client as {seen} (SNAT?)"
    );
    assert_eq!(server.tcp_served(), 1);

    let answer = udp_request(client.ns(), server_pod.addr(5353), b"hello", TIMEOUT).unwrap();
    assert_eq!(pod_of(&answer), Some("server"), "answer: {answer:?}");
    assert_eq!(
        client_of(&answer).unwrap().ip(),
        CLIENT_IP,
        "answer: {answer:?}"
    );
    assert_eq!(server.udp_served(), 1);

    // One connection, several answers, all naming the same client port.
    let mut held = HoldConnection::open(client.ns(), server_pod.addr(8080), TIMEOUT).unwrap();
    let local = held.local_addr().unwrap();
    for _ in 0..3 {
        let answer = held.ask().unwrap();
        assert_eq!(pod_of(&answer), Some("server"), "answer: {answer:?}");
        assert_eq!(client_of(&answer), Some(local), "answer: {answer:?}");
    }
    assert_eq!(server.tcp_served(), 4);

    // Nobody listens on 9: refused, not hanging.
    let started = Instant::now();
    assert!(http_get(client.ns(), server_pod.addr(9), TIMEOUT).is_err());
    assert!(
        started.elapsed() < TIMEOUT,
        "refusal took {:?}",
        started.elapsed()
    );

    // The root namespace cannot reach pod addresses: nothing leaked into it.
    let root_routes = Command::new("ip").args(["route", "show"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&root_routes.stdout).contains("10.244.1."),
        "pod routes leaked into the root namespace"
    );

    let stopped = Instant::now();
    drop(held);
    drop(server);
    assert!(
        stopped.elapsed() < Duration::from_secs(2),
        "server took {:?} to stop",
        stopped.elapsed()
    );
    drop(topology);
    let listed = netns_list();
    for name in &names {
        assert!(
            !listed.contains(name.as_str()),
            "{name} left behind:\n{listed}"
        );
    }
}

#[test]
fn pods_added_later_are_reachable_and_node_sysctls_are_set() {
    require_root();
    let mut topology = SingleNode::new(&[("client", CLIENT_IP)]).unwrap();
    let late_ip = Ipv4Addr::new(10, 244, 1, 20);
    let late = topology.add_pod("late", late_ip).unwrap();
    assert_eq!(late.host_if(), "lbv2");
    assert!(
        topology.add_pod("late", late_ip).is_err(),
        "duplicate pod accepted"
    );

    let late = topology.pod("late").unwrap();
    let _server = EchoServer::start(late.ns(), "late", &[80], &[]).unwrap();
    let body = http_get(
        topology.pod("client").unwrap().ns(),
        SocketAddrV4::new(late_ip, 80),
        TIMEOUT,
    )
    .unwrap();
    assert_eq!(pod_of(&body), Some("late"));

    let node = topology.node_ns();
    for (key, value) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "1"),
        ("net.ipv4.conf.default.rp_filter", "1"),
    ] {
        let seen = node.sh_ok(&["sysctl", "-n", key]).unwrap();
        assert_eq!(seen.trim(), value, "{key} in the node namespace");
    }
    let routes = node.sh_ok(&["ip", "route", "show"]).unwrap();
    assert!(
        routes.contains("10.244.1.20 dev lbv2"),
        "node routes:\n{routes}"
    );
    let addrs = node
        .sh_ok(&["ip", "-o", "addr", "show", "dev", "lbv1"])
        .unwrap();
    assert!(addrs.contains("10.244.1.1/32"), "lbv1 addresses:\n{addrs}");
}

#[test]
fn threads_and_children_run_inside_the_namespace() {
    require_root();
    let ns = NetNs::new("probe").unwrap();
    let inode = ns.inode().unwrap();
    let link = format!("net:[{inode}]");

    let seen = ns
        .run(|| std::fs::read_link("/proc/thread-self/ns/net").unwrap())
        .unwrap();
    assert_eq!(seen.to_string_lossy(), link, "thread namespace");

    let output = ns
        .command("readlink")
        .arg("/proc/self/ns/net")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        link,
        "child namespace"
    );

    // bpffs stays visible in children (the reason not to use `ip netns exec`).
    let output = ns.sh(&["cat", "/proc/self/mounts"]).unwrap();
    assert!(String::from_utf8_lossy(&output.stdout).contains(" /sys/fs/bpf bpf "));

    // The calling thread never moved.
    let own = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    assert_ne!(own.to_string_lossy(), link);
}

#[test]
fn agent_process_logs_and_stops() {
    require_root();
    let ns = NetNs::new("agent").unwrap();
    let inode = ns.inode().unwrap();
    let mut agent = AgentProcess::spawn(
        &ns,
        Path::new("/bin/sh"),
        [
            "-c",
            "echo \"$GREETING\"; readlink /proc/self/ns/net; trap 'echo bye; exit 0' TERM; \
             while :; do sleep 0.1; done",
        ],
        &[("GREETING", "programmed 3 services")],
        None,
    )
    .unwrap();
    agent
        .wait_for_log("programmed", Duration::from_secs(5))
        .unwrap();
    agent
        .wait_for_log(&format!("net:[{inode}]"), Duration::from_secs(5))
        .unwrap();
    assert!(agent.exit_status().unwrap().is_none());
    let error = agent
        .wait_for_log("never printed", Duration::from_millis(300))
        .unwrap_err();
    assert!(
        format!("{error:#}").contains("programmed 3 services"),
        "{error:#}"
    );

    let started = Instant::now();
    let status = agent.stop().unwrap();
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(status.success(), "{status}");
    assert!(agent.log_contents().contains("bye"));
}

#[test]
fn bpffs_dirs_are_removed_with_their_contents() {
    require_root();
    let dir = BpffsDir::new().expect("bpffs must be mounted: run `cargo xtask setup`");
    let path = dir.path().to_owned();
    assert!(
        path.to_string_lossy().starts_with("/sys/fs/bpf/lbt-"),
        "{}",
        path.display()
    );
    std::fs::create_dir(path.join("sub")).unwrap();
    drop(dir);
    assert!(!path.exists(), "{} left behind", path.display());
}

#[test]
fn stale_cleanup_spares_live_namespaces() {
    require_root();
    let live = NetNs::new("live").unwrap();
    // Beyond the kernel's pid_max (4194304): never a running process.
    let stale = "lbt-99999999-0-stale";
    let added = Command::new("ip")
        .args(["netns", "add", stale])
        .status()
        .unwrap();
    assert!(added.success());

    let report = cleanup_stale();
    assert!(
        report.namespaces.iter().any(|name| name == stale),
        "{report:?}"
    );
    let listed = netns_list();
    assert!(
        !listed.contains(stale),
        "stale namespace survived:\n{listed}"
    );
    assert!(
        listed.contains(live.name()),
        "live namespace removed:\n{listed}"
    );
}
