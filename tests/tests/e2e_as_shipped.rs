//! The agent run the way deploy/daemonset.yaml runs it: only the
//! capabilities its securityContext adds (read from the manifest), no
//! privilege gain, /proc/sys read-only, and the node's sysctls set by the
//! manifest's init container command. Two nodes on an underlay, an
//! external client; ClusterIP TCP and UDP from a pod, NodePort from outside
//! (a local and a remote backend, so SNAT and the replies it needs).

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use lb_tests::{
    cluster::{NodeAgents, write_manifest},
    deploy, require_root,
};
use xtask::{Cluster, EchoServer, Restrictions, TempDir, http_get, pod_of, udp_request};

const ECHO_A: (&str, Ipv4Addr) = ("echo-a", Ipv4Addr::new(10, 244, 1, 11));
const ECHO_B: (&str, Ipv4Addr) = ("echo-b", Ipv4Addr::new(10, 244, 2, 11));
const CLIENT: (&str, Ipv4Addr) = ("client", Ipv4Addr::new(10, 244, 1, 2));
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);
const NODE_PORT: u16 = 30090;
const TIMEOUT: Duration = Duration::from_secs(2);

const MANIFESTS: &str = r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.60
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30090, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-x1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- addresses: ["10.244.1.11"]
  conditions: {ready: true}
  nodeName: node-1
  targetRef: {kind: Pod, namespace: default, name: echo-a}
- addresses: ["10.244.2.11"]
  conditions: {ready: true}
  nodeName: node-2
  targetRef: {kind: Pod, namespace: default, name: echo-b}
"#;

/// The DaemonSet's capabilities, as the manifest lists them.
fn shipped_restrictions() -> Restrictions {
    let names = deploy::agent_capabilities(&deploy::load());
    Restrictions::container(&names).expect("capability names of the DaemonSet")
}

/// Runs the DaemonSet's init containers' commands in every node
/// namespace (they are privileged: no restriction), as the kubelet would
/// before the agent starts.
fn run_init_containers(cluster: &Cluster) {
    let manifests = deploy::load();
    let commands = deploy::init_commands(&manifests);
    assert!(!commands.is_empty(), "the DaemonSet has no init container");
    for k in 1..=cluster.node_count() {
        for (line, privileged) in &commands {
            assert!(
                *privileged,
                "init container {line:?} writes sysctls: it must be privileged"
            );
            let status = cluster
                .node(k)
                .ns()
                .command(&line[0])
                .args(&line[1..])
                .status()
                .unwrap_or_else(|e| panic!("running {line:?}: {e}"));
            assert!(status.success(), "init container {line:?}: {status}");
        }
    }
}

struct Shipped {
    cluster: Cluster,
    _manifests: TempDir,
    agents: NodeAgents,
    _servers: Vec<EchoServer>,
}

impl Shipped {
    fn start(test: &str, init_containers: bool) -> Shipped {
        require_root(test);
        let mut cluster = Cluster::new(2).expect("two-node cluster");
        cluster.add_pod(1, ECHO_A.0, ECHO_A.1).expect("pod");
        cluster.add_pod(2, ECHO_B.0, ECHO_B.1).expect("pod");
        cluster.add_pod(1, CLIENT.0, CLIENT.1).expect("pod");
        let servers = [ECHO_A.0, ECHO_B.0]
            .iter()
            .map(|name| {
                let pod = cluster.pod(name).expect("pod");
                EchoServer::start(pod.ns(), name, &[8080], &[5353]).expect("echo server")
            })
            .collect();
        if init_containers {
            run_init_containers(&cluster);
        }
        let manifests = TempDir::new("lbt", "manifests").expect("manifest dir");
        write_manifest(manifests.path(), "web.yaml", MANIFESTS);
        let restrictions = shipped_restrictions();
        let agents =
            NodeAgents::start_restricted(&cluster, manifests.path(), &[], Some(&restrictions));
        Shipped {
            cluster,
            _manifests: manifests,
            agents,
            _servers: servers,
        }
    }

    /// Pods that answered `send` within `rounds` tries, panicking on any
    /// failure.
    fn answering(
        &self,
        what: &str,
        rounds: usize,
        send: impl Fn() -> anyhow::Result<String>,
    ) -> BTreeSet<String> {
        let mut pods = BTreeSet::new();
        for round in 0..rounds {
            let reply = send().unwrap_or_else(|e| {
                panic!(
                    "{what}, round {round}: {e:#}\nagent logs:\n{}",
                    self.agents.logs()
                )
            });
            pods.insert(pod_of(&reply).expect("pod name in the answer").to_owned());
            if pods.len() == 2 {
                break;
            }
        }
        pods
    }
}

/// `CapEff` (`CapBnd` for this process) of process `pid`, and whether /proc/sys is mounted read-only
/// for it.
fn process_view(pid: u32) -> (u64, bool) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = if pid == std::process::id() {
        "CapBnd:"
    } else {
        "CapEff:"
    };
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| u64::from_str_radix(v.trim(), 16).expect("hex"))
        .expect("CapEff line");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    let proc_sys_ro = mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(4) == Some(&"/proc/sys")
            && fields
                .get(5)
                .is_some_and(|options| options.split(',').any(|o| o == "ro"))
    });
    (cap_eff, proc_sys_ro)
}

#[test]
fn the_test_restrictions_are_the_daemon_sets() {
    let names = deploy::agent_capabilities(&deploy::load());
    assert_eq!(names, ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"]);
    // Numbers from linux/capability.h: NET_ADMIN 12, SYS_RESOURCE 24,
    // PERFMON 38, BPF 39.
    let mask = Restrictions::container(&names).expect("names").mask();
    assert_eq!(mask, (1 << 12) | (1 << 24) | (1 << 38) | (1 << 39));
    assert!(Restrictions::container(&["NOT_A_CAPABILITY"]).is_err());
}

#[test]
fn the_agent_as_shipped_serves_cluster_ip_and_node_port() {
    let shipped = Shipped::start("the_agent_as_shipped_serves_cluster_ip_and_node_port", true);
    // A capability this test process lacks cannot be passed on (on some
    // machines the test itself runs without CAP_SYS_RESOURCE); the agent
    // gets the DaemonSet's set, minus those.
    let (own, _) = process_view(std::process::id());
    let shipped_mask = shipped_restrictions().mask();
    let want = shipped_mask & own;
    if want != shipped_mask {
        println!(
            "note: this machine withholds capabilities {:#x} of the DaemonSet's set",
            shipped_mask & !own
        );
    }
    for agent in &shipped.agents.agents {
        let (cap_eff, proc_sys_ro) = process_view(agent.pid());
        assert_eq!(
            cap_eff, want,
            "the agent runs with capabilities {cap_eff:#x}, the DaemonSet gives {shipped_mask:#x}"
        );
        assert!(proc_sys_ro, "/proc/sys is writable for the agent");
        // allowPrivilegeEscalation: false.
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).expect("status");
        assert!(
            status
                .lines()
                .any(|l| l.split_whitespace().eq(["NoNewPrivs:", "1"])),
            "the agent may gain privileges"
        );
    }
    shipped.agents.wait_attached();
    shipped.agents.wait_until("the ClusterIP answers", || {
        http_get(
            shipped.cluster.pod(CLIENT.0).expect("client").ns(),
            SocketAddrV4::new(VIP, 80),
            TIMEOUT,
        )
        .is_ok()
    });
    let both: BTreeSet<String> = [ECHO_A.0, ECHO_B.0].iter().map(|s| s.to_string()).collect();
    let client = shipped.cluster.pod(CLIENT.0).expect("client").ns();

    let tcp = shipped.answering("ClusterIP TCP", 60, || {
        http_get(client, SocketAddrV4::new(VIP, 80), TIMEOUT)
    });
    assert_eq!(tcp, both, "ClusterIP TCP reached {tcp:?}");
    let udp = shipped.answering("ClusterIP UDP", 60, || {
        udp_request(client, SocketAddrV4::new(VIP, 53), b"query", TIMEOUT)
    });
    assert_eq!(udp, both, "ClusterIP UDP reached {udp:?}");
    for k in 1..=2 {
        let node_port = SocketAddrV4::new(shipped.cluster.node_ip(k), NODE_PORT);
        let reached = shipped.answering(&format!("NodePort on node-{k}"), 60, || {
            http_get(shipped.cluster.external(), node_port, TIMEOUT)
        });
        assert_eq!(reached, both, "NodePort on node-{k} reached {reached:?}");
    }
    for (k, agent) in shipped.agents.agents.iter().enumerate() {
        let log = agent.log_contents();
        assert!(
            !log.contains("ERROR") && !log.contains("WARN"),
            "node-{}'s agent complained:\n{log}",
            k + 1
        );
    }
}

#[test]
fn without_the_init_container_the_agent_names_the_sysctl_and_stops() {
    let mut shipped = Shipped::start(
        "without_the_init_container_the_agent_names_the_sysctl_and_stops",
        false,
    );
    let agent = &mut shipped.agents.agents[0];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = agent.exit_status().expect("wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent kept running without accept_local:\n{}",
            agent.log_contents()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "{status}");
    let log = agent.log_contents();
    assert!(
        log.contains("net.ipv4.conf.all.accept_local is 0")
            && log.contains("eth0")
            && log.contains("init container"),
        "the error does not name the sysctl, the device and the fix:\n{log}"
    );
}
