//! The agent as a drop-in for kube-proxy, end to end in a one-node
//! cluster: kubeadm's kube-proxy command line and ConfigMap file start it,
//! `--master` alone reaches the API, `--cleanup` leaves nothing behind, and
//! `/healthz`, `/livez` and the healthCheckNodePort servers answer as
//! kube-proxy's do.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    time::{Duration, Instant},
};

use lb_tests::cluster::{ApiCluster, Cluster, objects, spread};
use serde_json::{Value, json};
use xtask::{NetNs, TempDir, http_get};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const A: (&str, Ipv4Addr) = ("echo-a", Ipv4Addr::new(10, 244, 1, 11));
const B: (&str, Ipv4Addr) = ("echo-b", Ipv4Addr::new(10, 244, 1, 12));
const SYNCED: Duration = Duration::from_secs(30);
const CONVERGED: Duration = Duration::from_secs(10);

/// `config.conf` of the kube-proxy ConfigMap `kubeadm init` writes.
fn kubeadm_config_conf() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lb-agent/src/testdata/kubeadm-kube-proxy-configmap.yaml");
    let text = std::fs::read_to_string(&path).expect("kubeadm ConfigMap");
    let configmap: serde_yaml::Value = serde_yaml::from_str(&text).expect("ConfigMap YAML");
    configmap["data"]["config.conf"]
        .as_str()
        .expect("data.config.conf")
        .to_owned()
}

/// The cluster with an API fixture holding Node `node-1` and `objects`; the
/// agent is not started.
fn api_cluster(test: &str, backends: &[(&str, Ipv4Addr)], objects: &[Value]) -> ApiCluster {
    let cluster = Cluster::new(test, backends);
    let api = lb_tests::apiserver::ApiServer::start_in(cluster.topology.node_ns().path())
        .expect("API fixture");
    api.apply(objects::node(xtask::topology::SINGLE_NODE_NAME))
        .expect("apply node");
    for object in objects {
        api.apply(object.clone()).expect("apply object");
    }
    let kubeconfig_dir = TempDir::new("lbt", "kubeconfig").expect("kubeconfig dir");
    ApiCluster {
        cluster,
        api,
        kubeconfig_dir,
    }
}

fn echo_objects() -> Vec<Value> {
    vec![
        objects::service("echo", VIP),
        objects::endpoint_slice("echo", "echo-1", &[A, B]),
    ]
}

/// `GET path` from inside `ns`; the status and body whatever the status.
fn get(ns: &NetNs, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let path = path.to_owned();
    ns.run(move || -> anyhow::Result<(u16, String)> {
        let timeout = Duration::from_secs(3);
        let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow::anyhow!("no header end in {response:?}"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no status in {head:?}"))?;
        Ok((status, body.to_owned()))
    })?
}

/// Polls `GET path` until it answers `status` (bounded); returns the body.
fn wait_for_status(cluster: &Cluster, addr: SocketAddr, path: &str, status: u16) -> String {
    let deadline = Instant::now() + CONVERGED;
    loop {
        let got = get(cluster.topology.node_ns(), addr, path);
        match &got {
            Ok((s, body)) if *s == status => return body.clone(),
            _ if Instant::now() > deadline => panic!(
                "{addr}{path} never answered {status} (last: {got:?}); agent log:\n{}",
                cluster.agent_log()
            ),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn errors_in(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains(" ERROR ") || l.starts_with("error"))
        .collect()
}

/// kubeadm's DaemonSet runs `kube-proxy --config=/var/lib/kube-proxy/config.conf
/// --hostname-override=$(NODE_NAME)`; the same line and the same file (its
/// kubeconfig pointing at the fixture) start the agent, which then serves.
#[test]
fn kubeadms_command_line_and_config_file_start_the_agent() {
    let mut cluster = api_cluster(
        "kubeadms_command_line_and_config_file_start_the_agent",
        &[A, B],
        &echo_objects(),
    );
    let kubeconfig = cluster
        .api
        .write_kubeconfig(cluster.kubeconfig_dir.path())
        .expect("kubeconfig");
    let config = kubeadm_config_conf().replace(
        "/var/lib/kube-proxy/kubeconfig.conf",
        &kubeconfig.display().to_string(),
    );
    let config_path = cluster.kubeconfig_dir.path().join("config.conf");
    std::fs::write(&config_path, config).expect("write config.conf");
    cluster.start_agent_unnamed(&[
        format!("--config={}", config_path.display()),
        format!("--hostname-override={}", xtask::topology::SINGLE_NODE_NAME),
    ]);
    cluster
        .agent_mut()
        .wait_for_log("API: synced", SYNCED)
        .expect("agent synced with the API fixture");
    cluster.wait_for_backends(VIP, 80, Some(vec![A.1, B.1]), CONVERGED);
    let answers = spread(100, &["echo-a", "echo-b"], 2, || {
        http_get(
            cluster.client(),
            SocketAddrV4::new(VIP, 80),
            Duration::from_secs(2),
        )
    });
    assert_eq!(answers.len(), 2, "{answers:?}");
    // The file's empty healthzBindAddress is kube-proxy's default.
    wait_for_status(
        &cluster,
        "127.0.0.1:10256".parse().unwrap(),
        "/healthz",
        200,
    );
    let log = cluster.agent().log_contents();
    assert!(errors_in(&log).is_empty(), "errors logged:\n{log}");
    for needle in [
        "ignored: bindAddress",
        "cluster CIDR 10.244.0.0/16,fd00:10:244::/56",
        "conntrack timeouts: TCP established 24h0m0s, TCP close-wait 1h0m0s, UDP 30s, UDP stream 2m0s",
    ] {
        assert!(log.contains(needle), "{needle:?} not logged:\n{log}");
    }
}

/// `--master URL` alone (no kubeconfig, no in-cluster account) is the
/// whole client configuration; kube-proxy's other flags on the same line
/// are accepted and each named in a warning; `--nodeport-addresses
/// primary` takes the Node's InternalIP once the Node arrives.
#[test]
fn master_alone_reaches_the_api() {
    let mut cluster = api_cluster("master_alone_reaches_the_api", &[A], &echo_objects()[..1]);
    let url = cluster.api.url();
    cluster.start_agent(&[
        "--master".into(),
        url,
        "--nodeport-addresses=primary".into(),
        "--proxy-mode=".into(),
        "--v=2".into(),
        "--iptables-sync-period=30s".into(),
        "--conntrack-max-per-core".into(),
        "0".into(),
        "--masquerade-all".into(),
    ]);
    cluster
        .agent_mut()
        .wait_for_log("API: synced", SYNCED)
        .expect("agent synced through --master");
    cluster.wait_for_backends(VIP, 80, Some(vec![]), CONVERGED);
    cluster
        .api
        .apply(objects::endpoint_slice("echo", "echo-1", &[A]))
        .expect("apply");
    cluster.wait_for_backends(VIP, 80, Some(vec![A.1]), CONVERGED);
    let reply = http_get(
        cluster.client(),
        SocketAddrV4::new(VIP, 80),
        Duration::from_secs(2),
    )
    .expect("through the ClusterIP");
    assert!(reply.contains("pod=echo-a"), "{reply}");
    let log = cluster.agent().log_contents();
    for needle in [
        "WARN  lb_agent] --iptables-sync-period=30s: a kube-proxy flag, ignored",
        "WARN  lb_agent] --conntrack-max-per-core=0: a kube-proxy flag, ignored",
        "WARN  lb_agent] --masquerade-all=true: a kube-proxy flag, ignored",
        // objects::node's InternalIP.
        "NodePorts on [192.0.2.1]",
    ] {
        assert!(log.contains(needle), "{needle:?} not logged:\n{log}");
    }
    assert!(errors_in(&log).is_empty(), "errors logged:\n{log}");
}

/// The links pinned under `pins`: (pin name, link id, program id).
fn pinned_links(pins: &Path) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(pins).expect("pins") {
        let name = entry
            .expect("entry")
            .file_name()
            .into_string()
            .expect("utf-8");
        if !name.starts_with("link_") {
            continue;
        }
        let path = pins.join(&name);
        let shown = std::process::Command::new("bpftool")
            .args(["link", "show", "pinned"])
            .arg(&path)
            .arg("-j")
            .output()
            .expect("bpftool");
        assert!(shown.status.success(), "bpftool link show pinned {name}");
        let link: Value = serde_json::from_slice(&shown.stdout).expect("bpftool JSON");
        out.push((
            name,
            link["id"].as_u64().expect("link id"),
            link["prog_id"].as_u64().expect("program id"),
        ));
    }
    out.sort();
    out
}

/// Whether the kernel still has program `id`.
fn program_exists(id: u64) -> bool {
    std::process::Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .expect("bpftool")
        .status
        .success()
}

fn live_link_ids() -> Vec<u64> {
    let shown = std::process::Command::new("bpftool")
        .args(["link", "show", "-j"])
        .output()
        .expect("bpftool");
    assert!(shown.status.success(), "bpftool link show");
    let links: Value = serde_json::from_slice(&shown.stdout).expect("bpftool JSON");
    links
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|l| l["id"].as_u64())
        .collect()
}

/// `lb-agent --cleanup --bpffs PINS` inside the node namespace.
fn run_cleanup(cluster: &Cluster) -> std::process::Output {
    cluster
        .topology
        .node_ns()
        .sh(&[
            &lb_tests::cluster::agent_binary().display().to_string(),
            "--cleanup",
            "--bpffs",
            &cluster.pins.path().display().to_string(),
        ])
        .expect("run lb-agent --cleanup")
}

/// After an agent ran with device links (TCX on the pod devices) and
/// socket-level balancing on a cgroup, `--cleanup` leaves no program on
/// any device or cgroup and no pin; a second run finds nothing and
/// succeeds.
#[test]
fn cleanup_after_the_agent_stopped_removes_every_link_and_pin() {
    cleanup_case(
        "cleanup_after_the_agent_stopped_removes_every_link_and_pin",
        false,
    );
}

/// The same while another process holds the links open (a tool that
/// inspects them, an agent still shutting down): unpinning alone would
/// leave them attached, so this case shows they are detached.
#[test]
fn cleanup_detaches_links_another_process_holds_open() {
    cleanup_case("cleanup_detaches_links_another_process_holds_open", true);
}

fn cleanup_case(test: &str, links_held: bool) {
    let mut cluster = api_cluster(test, &[A, B], &echo_objects());
    let kubeconfig = cluster
        .api
        .write_kubeconfig(cluster.kubeconfig_dir.path())
        .expect("kubeconfig");
    let cgroup = xtask::Cgroup::with_prefix(xtask::netns::TEST_PREFIX, "cleanup").expect("cgroup");
    cluster.start_agent(&[
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--socket-lb-cgroup".into(),
        cgroup.path().display().to_string(),
    ]);
    cluster.wait_for_backends(VIP, 80, Some(vec![A.1, B.1]), SYNCED);
    cluster.wait_until_serving(SocketAddrV4::new(VIP, 80));
    // Every pod device carries its link before the clean-up.
    let deadline = Instant::now() + CONVERGED;
    let links = loop {
        let links = pinned_links(cluster.pins.path());
        let tcx = links
            .iter()
            .filter(|(n, _, _)| n.starts_with("link_tcx_ingress_"))
            .count();
        if tcx >= 3 {
            break links;
        }
        assert!(
            Instant::now() < deadline,
            "pod devices never attached: {links:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        links.iter().any(|(n, _, _)| n.starts_with("link_cgroup_")),
        "{links:?}"
    );
    let cgroup_path = cgroup.path().display().to_string();
    let cgroup_before = cluster
        .topology
        .node_ns()
        .sh_ok(&["bpftool", "cgroup", "show", &cgroup_path])
        .expect("bpftool cgroup");
    assert!(
        cgroup_before.contains("lb_sock_connect4"),
        "{cgroup_before}"
    );

    // kube-proxy --cleanup runs while kube-proxy does not.
    cluster.kill_agent();
    let held: Vec<aya::programs::links::PinnedLink> = if links_held {
        links
            .iter()
            .map(|(name, _, _)| {
                aya::programs::links::PinnedLink::from_pin(cluster.pins.path().join(name))
                    .expect("open a pinned link")
            })
            .collect()
    } else {
        Vec::new()
    };
    let out = run_cleanup(&cluster);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "--cleanup failed: {stderr}");
    assert!(stderr.contains("cleanup: detached"), "{stderr}");
    assert!(
        !cluster.pins.path().exists(),
        "pin directory left: {:?}",
        std::fs::read_dir(cluster.pins.path()).map(|d| d.count())
    );
    // Off the cgroup and off the pod devices: the ClusterIP is no longer
    // translated, even while links are held open.
    let cgroup_after = cluster
        .topology
        .node_ns()
        .sh_ok(&["bpftool", "cgroup", "show", &cgroup_path])
        .expect("bpftool cgroup");
    assert!(!cgroup_after.contains("lb_sock"), "{cgroup_after}");
    assert!(
        http_get(
            cluster.client(),
            SocketAddrV4::new(VIP, 80),
            Duration::from_millis(500)
        )
        .is_err(),
        "the service still answers after the clean-up"
    );
    drop(held);
    // No link is left, and no program: one attached anywhere (device or
    // cgroup) would be held by its attachment.
    let deadline = Instant::now() + CONVERGED;
    loop {
        let live = live_link_ids();
        let left: Vec<_> = links
            .iter()
            .filter(|(_, id, prog)| live.contains(id) || program_exists(*prog))
            .collect();
        if left.is_empty() {
            break;
        }
        // The kernel frees them after an RCU grace period.
        assert!(
            Instant::now() < deadline,
            "links or programs still alive: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let again = run_cleanup(&cluster);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "second --cleanup failed: {stderr}");
    assert!(stderr.contains("nothing to remove"), "{stderr}");
}

fn node_with(extra: Value) -> Value {
    let mut node = objects::node(xtask::topology::SINGLE_NODE_NAME);
    for (key, value) in extra.as_object().expect("object") {
        match key.as_str() {
            "metadata" => {
                for (k, v) in value.as_object().expect("metadata") {
                    node["metadata"][k] = v.clone();
                }
            }
            _ => node[key] = value.clone(),
        }
    }
    node
}

/// kube-proxy's `/healthz` fails while the node should get no new traffic
/// (the cluster autoscaler's deletion taint, a deletionTimestamp), with
/// `nodeEligible` saying why; `/livez` stays healthy throughout.
#[test]
fn healthz_follows_node_eligibility_and_livez_does_not() {
    let cluster = ApiCluster::start(
        "healthz_follows_node_eligibility_and_livez_does_not",
        &[A],
        &echo_objects(),
    );
    let healthz: SocketAddr = "127.0.0.1:10256".parse().unwrap();
    let body = wait_for_status(&cluster, healthz, "/healthz", 200);
    assert!(body.contains("\"nodeEligible\":true"), "{body}");

    cluster
        .api
        .apply(node_with(json!({"spec": {"taints": [
            {"key": "ToBeDeletedByClusterAutoscaler", "value": "1733500000", "effect": "NoSchedule"}
        ]}})))
        .expect("taint the node");
    let body = wait_for_status(&cluster, healthz, "/healthz", 503);
    assert!(body.contains("\"nodeEligible\":false"), "{body}");
    let (status, body) = get(cluster.topology.node_ns(), healthz, "/livez").expect("livez");
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("nodeEligible"), "{body}");

    // Another taint is no reason.
    cluster
        .api
        .apply(node_with(json!({"spec": {"taints": [
            {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
        ]}})))
        .expect("other taint");
    wait_for_status(&cluster, healthz, "/healthz", 200);

    cluster
        .api
        .apply(node_with(json!({"metadata": {
            "deletionTimestamp": "2026-12-07T00:00:00Z",
            "finalizers": ["example.com/hold"]
        }})))
        .expect("delete the node");
    let body = wait_for_status(&cluster, healthz, "/healthz", 503);
    assert!(body.contains("\"nodeEligible\":false"), "{body}");
    let (status, _) = get(cluster.topology.node_ns(), healthz, "/livez").expect("livez");
    assert_eq!(status, 200);
}

/// A healthCheckNodePort answers on IPv4 and on IPv6.
#[test]
fn health_check_node_ports_listen_on_both_families() {
    const HEALTH_PORT: u16 = 32110;
    let mut service = objects::service("local", Ipv4Addr::new(10, 96, 0, 41));
    service["spec"]["type"] = json!("LoadBalancer");
    service["spec"]["externalTrafficPolicy"] = json!("Local");
    service["spec"]["healthCheckNodePort"] = json!(HEALTH_PORT);
    service["spec"]["ports"][0]["nodePort"] = json!(30110);
    service["spec"]["ports"][1]["nodePort"] = json!(30111);
    service["status"] = json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.41"}]}});
    let cluster = ApiCluster::start(
        "health_check_node_ports_listen_on_both_families",
        &[A],
        &[service, objects::endpoint_slice("local", "local-1", &[A])],
    );
    for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), "::1".parse().unwrap()] {
        let body = wait_for_status(&cluster, SocketAddr::new(ip, HEALTH_PORT), "/", 200);
        assert!(body.contains("\"localEndpoints\":1"), "{ip}: {body}");
    }
}

/// The DaemonSet of `deploy/` with its ConfigMap: its args (the node name
/// substituted, the ConfigMap's file where --config points, the test's pod
/// devices and pins, `--master` for the in-cluster address) start the
/// agent, and its liveness probe's `/livez` answers.
#[test]
fn the_deploy_daemon_set_and_config_map_start_the_agent() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let read = |file: &str| -> serde_yaml::Value {
        let text = std::fs::read_to_string(deploy.join(file)).expect("manifest");
        serde_yaml::from_str(&text).expect("YAML")
    };
    let daemon_set = read("daemonset.yaml");
    let config_map = read("configmap.yaml");
    let container = &daemon_set["spec"]["template"]["spec"]["containers"][0];
    let mut cluster = api_cluster(
        "the_deploy_daemon_set_and_config_map_start_the_agent",
        &[A],
        &[
            objects::service("echo", VIP),
            objects::endpoint_slice("echo", "echo-1", &[A]),
        ],
    );
    let config_path = cluster.kubeconfig_dir.path().join("config.conf");
    std::fs::write(
        &config_path,
        config_map["data"]["config.conf"]
            .as_str()
            .expect("config.conf"),
    )
    .expect("write config.conf");
    let mut args: Vec<String> = container["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_owned())
        .filter(|a| !a.starts_with("--pod-devices=") && !a.starts_with("--bpffs="))
        .map(|a| match a.split_once('=') {
            Some(("--config", _)) => format!("--config={}", config_path.display()),
            _ => a.replace("$(NODE_NAME)", xtask::topology::SINGLE_NODE_NAME),
        })
        .collect();
    assert!(args.iter().any(|a| a.starts_with("--config=")), "{args:?}");
    args.push(format!("--master={}", cluster.api.url()));
    cluster.start_agent_unnamed(&args);
    cluster
        .agent_mut()
        .wait_for_log("API: synced", SYNCED)
        .expect("agent synced");
    cluster.wait_for_backends(VIP, 80, Some(vec![A.1]), CONVERGED);
    let probe = &container["livenessProbe"]["httpGet"];
    let port = probe["port"].as_u64().expect("probe port") as u16;
    let path = probe["path"].as_str().expect("probe path");
    wait_for_status(
        &cluster,
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        path,
        200,
    );
    let log = cluster.agent().log_contents();
    assert!(errors_in(&log).is_empty(), "errors logged:\n{log}");
    assert!(
        !log.contains("ignored"),
        "the deploy file is taken whole:\n{log}"
    );
}
