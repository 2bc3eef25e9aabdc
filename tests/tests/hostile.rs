//! Hostile and broken input end to end (issue 8): the agent with maps too
//! small for what it is given, and a manifest directory full of junk. Each
//! case checks the error names the object, what was programmed stays, the
//! other services keep answering, the agent stays up, and it recovers when
//! room (or a fixed file) comes back.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_tests::cluster::{Cluster, POD_TCP_PORT, http_get_path, write_manifest};
use xtask::{TempDir, http_get, pod_of};

const ECHO_A: (&str, Ipv4Addr) = ("echo-a", Ipv4Addr::new(10, 244, 1, 11));
const ECHO_B: (&str, Ipv4Addr) = ("echo-b", Ipv4Addr::new(10, 244, 1, 12));
const TIMEOUT: Duration = Duration::from_secs(2);

const ECHO_C: (&str, Ipv4Addr) = ("echo-c", Ipv4Addr::new(10, 244, 1, 13));

/// A one-port TCP ClusterIP Service with its EndpointSlice of `pods`.
fn service_of(name: &str, vip: Ipv4Addr, pods: &[(&str, Ipv4Addr)]) -> String {
    let mut yaml = service(name, vip, pods[0]);
    for pod in &pods[1..] {
        yaml += &format!(
            "- addresses: [{}]\n  conditions: {{ready: true}}\n  nodeName: node-1\n  targetRef: {{kind: Pod, namespace: default, name: {}}}\n",
            pod.1, pod.0
        );
    }
    yaml
}

/// A one-port TCP ClusterIP Service with its EndpointSlice.
fn service(name: &str, vip: Ipv4Addr, pod: (&str, Ipv4Addr)) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{namespace: default, name: {name}}}\nspec:\n  \
         clusterIP: {vip}\n  ports: [{{name: http, port: 80, targetPort: {POD_TCP_PORT}}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  namespace: default\n  \
         name: {name}-1\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\n\
         ports: [{{name: http, port: {POD_TCP_PORT}}}]\nendpoints:\n- addresses: [{}]\n  \
         conditions: {{ready: true}}\n  nodeName: node-1\n  targetRef: {{kind: Pod, namespace: default, name: {}}}\n",
        pod.1, pod.0
    )
}

fn wait_until(cluster: &Cluster, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what}: not reached; agent log:\n{}",
            cluster.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn answers(cluster: &Cluster, vip: Ipv4Addr) -> Option<String> {
    http_get(cluster.client(), SocketAddrV4::new(vip, 80), TIMEOUT)
        .ok()
        .and_then(|reply| pod_of(&reply).map(str::to_owned))
}

fn map_full_count(cluster: &Cluster, map: &str) -> u64 {
    let metrics = http_get_path(
        cluster.topology.node_ns(),
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249),
        "/metrics",
    )
    .expect("scrape /metrics");
    metrics
        .lines()
        .filter(|line| line.starts_with(&format!("lb_map_full_total{{map=\"{map}\"}}")))
        .filter_map(|line| line.split_whitespace().last()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn a_full_slot_map_refuses_one_service_keeps_the_rest_and_recovers() {
    let mut cluster = Cluster::new(
        "a_full_slot_map_refuses_one_service_keeps_the_rest_and_recovers",
        &[ECHO_A, ECHO_B, ECHO_C],
    );
    let manifests = TempDir::new("lbt", "manifests").expect("manifest dir");
    let (vip_a, vip_b, vip_c) = (
        Ipv4Addr::new(10, 96, 0, 61),
        Ipv4Addr::new(10, 96, 0, 62),
        Ipv4Addr::new(10, 96, 0, 63),
    );
    write_manifest(manifests.path(), "a.yaml", &service("svc-a", vip_a, ECHO_A));
    write_manifest(manifests.path(), "b.yaml", &service("svc-b", vip_b, ECHO_B));
    write_manifest(
        manifests.path(),
        "c.yaml",
        &service_of("svc-c", vip_c, &[ECHO_A, ECHO_B, ECHO_C]),
    );
    // One slot per endpoint: svc-a and svc-b take one each, svc-c needs
    // three and finds two.
    cluster.start_agent(&[
        "--manifests".into(),
        manifests.path().display().to_string(),
        "--max-slots".into(),
        "4".into(),
    ]);
    cluster.wait_for_backends(vip_a, 80, Some(vec![ECHO_A.1]), Duration::from_secs(30));
    cluster.wait_for_backends(vip_b, 80, Some(vec![ECHO_B.1]), Duration::from_secs(30));
    wait_until(&cluster, "the refusal logged", || {
        let log = cluster.agent().log_contents();
        log.contains("default/svc-c") && log.contains("LB4_SLOTS_V1 is full")
    });
    assert_eq!(cluster.programmed_backends(vip_c, 80), None);
    assert_eq!(answers(&cluster, vip_a).as_deref(), Some("echo-a"));
    assert_eq!(answers(&cluster, vip_b).as_deref(), Some("echo-b"));
    assert!(
        map_full_count(&cluster, "LB4_SLOTS_V1") > 0,
        "lb_map_full_total not counted"
    );
    // lbctl, reading only the pinned maps, reports it too.
    let stats = lb_tests::lbctl_json(cluster.pins.path(), &["stats"]);
    assert!(
        stats["refused_by_full_maps"].as_u64().unwrap_or(0) > 0,
        "lbctl stats does not report the refusal: {stats}"
    );
    let slots = stats["maps"]
        .as_array()
        .and_then(|maps| maps.iter().find(|m| m["map"] == "LB4_SLOTS_V1"))
        .expect("slot map in lbctl stats");
    assert_eq!(slots["capacity"], 4, "{slots}");

    // Room comes back: svc-b goes, svc-c is programmed with no other change.
    std::fs::remove_file(manifests.path().join("b.yaml")).expect("remove b.yaml");
    cluster.wait_for_backends(vip_b, 80, None, Duration::from_secs(30));
    cluster.wait_for_backends(
        vip_c,
        80,
        Some(vec![ECHO_A.1, ECHO_B.1, ECHO_C.1]),
        Duration::from_secs(30),
    );
    wait_until(&cluster, "svc-c answering", || {
        answers(&cluster, vip_c).is_some()
    });
    assert_eq!(answers(&cluster, vip_a).as_deref(), Some("echo-a"));

    // svc-b written again: now it is the one refused, svc-c keeps its place.
    let full_before = map_full_count(&cluster, "LB4_SLOTS_V1");
    write_manifest(manifests.path(), "b.yaml", &service("svc-b", vip_b, ECHO_B));
    wait_until(&cluster, "svc-b refused", || {
        map_full_count(&cluster, "LB4_SLOTS_V1") > full_before
    });
    assert_eq!(cluster.programmed_backends(vip_b, 80), None);
    assert!(answers(&cluster, vip_c).is_some());
    // Removed again (a second delete of the same object): nothing else moves.
    std::fs::remove_file(manifests.path().join("b.yaml")).expect("remove b.yaml again");
    assert!(
        std::fs::remove_file(manifests.path().join("b.yaml")).is_err(),
        "the file is gone"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(answers(&cluster, vip_a).as_deref(), Some("echo-a"));
    assert!(answers(&cluster, vip_c).is_some());
    assert!(
        cluster.agent_mut().exit_status().expect("status").is_none(),
        "the agent exited:\n{}",
        cluster.agent_log()
    );
    let log = cluster.agent().log_contents();
    assert!(!log.contains("panicked"), "the agent panicked:\n{log}");
}

#[test]
fn junk_in_the_manifest_directory_is_named_and_the_rest_served() {
    let mut cluster = Cluster::new(
        "junk_in_the_manifest_directory_is_named_and_the_rest_served",
        &[ECHO_A],
    );
    let manifests = TempDir::new("lbt", "manifests").expect("manifest dir");
    let vip = Ipv4Addr::new(10, 96, 0, 64);
    let dir = manifests.path();
    write_manifest(dir, "good.yaml", &service("good", vip, ECHO_A));
    write_manifest(dir, "binary.yaml", "\u{0}\u{1}\u{2}\u{ff}not yaml: [");
    write_manifest(
        dir,
        "ansible.yaml",
        "- hosts: all\n  tasks:\n  - ping: {}\n",
    );
    write_manifest(
        dir,
        "bad-service.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 99999}]}\n",
    );
    // An EndpointSlice whose Service arrives later.
    write_manifest(
        dir,
        "early-slice.yaml",
        service("late", Ipv4Addr::new(10, 96, 0, 65), ECHO_A)
            .split("---\n")
            .nth(1)
            .expect("the slice part"),
    );
    cluster.start_agent(&["--manifests".into(), dir.display().to_string()]);
    cluster.wait_for_backends(vip, 80, Some(vec![ECHO_A.1]), Duration::from_secs(30));
    assert_eq!(answers(&cluster, vip).as_deref(), Some("echo-a"));
    wait_until(&cluster, "each bad file named", || {
        let log = cluster.agent().log_contents();
        [
            "binary.yaml",
            "ansible.yaml",
            "Service default/bad",
            "EndpointSlice default/late-1",
        ]
        .iter()
        .all(|needle| log.contains(needle))
    });
    // The Service of the early slice comes: both used.
    let late = service("late", Ipv4Addr::new(10, 96, 0, 65), ECHO_A);
    write_manifest(
        dir,
        "late.yaml",
        late.split("---\n").next().expect("service part"),
    );
    cluster.wait_for_backends(
        Ipv4Addr::new(10, 96, 0, 65),
        80,
        Some(vec![ECHO_A.1]),
        Duration::from_secs(30),
    );
    assert!(
        cluster.agent_mut().exit_status().expect("status").is_none(),
        "the agent exited:\n{}",
        cluster.agent_log()
    );
}
