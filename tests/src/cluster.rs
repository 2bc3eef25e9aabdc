//! The one-node mini-cluster the end-to-end tests share: a node namespace
//! with echo pods and a client pod, the agent running in the node, and
//! helpers to look at what it programmed (the pinned maps) and to send
//! traffic through a ClusterIP.
//!
//! The agent's source is up to the test (`--manifests DIR` or
//! `--kubeconfig PATH`): [`Cluster::start_agent`] takes those arguments.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use lb_agent::datapath::KernelTables;
use serde_json::Value;
use xtask::{
    AgentProcess, BpffsDir, EchoServer, NetNs, SingleNode, TempDir, client_of, http_get, pod_of,
};

use crate::apiserver::ApiServer;
use crate::require_root;

/// The client pod every test sends from.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
/// Ports every echo pod listens on.
pub const POD_TCP_PORT: u16 = 8080;
pub const POD_UDP_PORT: u16 = 5353;

/// `$LB_AGENT_BIN` or the workspace's debug build of `lb-agent`.
pub fn agent_binary() -> PathBuf {
    std::env::var_os("LB_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| xtask::debug_binary("lb-agent"))
}

/// A node with echo pods (TCP 8080, UDP 5353) and a `client` pod, its own
/// bpffs directory, and (once started) the agent. Field order is drop
/// order: the agent stops before the pins and namespaces go.
pub struct Cluster {
    agent: Option<AgentProcess>,
    agent_args: Vec<String>,
    pub servers: Vec<EchoServer>,
    pub pins: BpffsDir,
    pub topology: SingleNode,
}

impl Cluster {
    /// Creates the namespaces and starts the echo servers; no agent yet.
    pub fn new(test: &str, backends: &[(&str, Ipv4Addr)]) -> Cluster {
        require_root(test);
        let mut pods: Vec<(&str, Ipv4Addr)> = backends.to_vec();
        pods.push(("client", CLIENT_IP));
        let topology = SingleNode::new(&pods).expect("topology");
        let servers = backends
            .iter()
            .map(|(name, _)| {
                let pod = topology.pod(name).expect("pod");
                EchoServer::start(pod.ns(), name, &[POD_TCP_PORT], &[POD_UDP_PORT])
                    .expect("echo server")
            })
            .collect();
        Cluster {
            agent: None,
            agent_args: Vec::new(),
            servers,
            pins: BpffsDir::new().expect("bpffs dir"),
            topology,
        }
    }

    /// Starts the agent in the node namespace with `source_args` (and the
    /// node name, pod devices and pin directory of this cluster).
    pub fn start_agent(&mut self, source_args: &[String]) {
        let mut args: Vec<String> = vec![
            "--node-name".into(),
            xtask::topology::SINGLE_NODE_NAME.into(),
        ];
        args.extend(source_args.iter().cloned());
        self.start_agent_unnamed(&args);
    }

    /// Like [`Cluster::start_agent`] without `--node-name`: `args` name the
    /// node their own way (`--hostname-override`, `--config`).
    pub fn start_agent_unnamed(&mut self, source_args: &[String]) {
        let binary = agent_binary();
        assert!(
            binary.exists(),
            "agent binary {} not built (cargo build --bins)",
            binary.display()
        );
        let mut args: Vec<String> = vec![
            "--pod-devices".into(),
            xtask::topology::POD_DEVICE_GLOB.into(),
            "--bpffs".into(),
            self.pins.path().display().to_string(),
        ];
        args.extend(source_args.iter().cloned());
        self.agent_args = args;
        self.spawn_agent();
    }

    fn spawn_agent(&mut self) {
        let agent = AgentProcess::spawn(
            self.topology.node_ns(),
            &agent_binary(),
            &self.agent_args,
            &[("RUST_LOG", "info")],
            None,
        )
        .expect("start agent");
        self.agent = Some(agent);
    }

    /// SIGKILLs the agent (no clean-up of any kind) and waits until it is
    /// gone. The pins stay.
    pub fn kill_agent(&mut self) {
        let mut agent = self.agent.take().expect("an agent is running");
        // SAFETY: kill(2) on our own child, not reaped yet.
        unsafe { libc::kill(agent.pid() as libc::pid_t, libc::SIGKILL) };
        let status = agent.stop().expect("reap the killed agent");
        assert!(!status.success(), "the agent survived SIGKILL: {status}");
    }

    /// Starts the agent again with the arguments of [`Cluster::start_agent`].
    pub fn restart_agent(&mut self) {
        assert!(self.agent.is_none(), "kill the running agent first");
        self.spawn_agent();
    }

    pub fn agent(&self) -> &AgentProcess {
        self.agent.as_ref().expect("an agent is running")
    }

    pub fn agent_mut(&mut self) -> &mut AgentProcess {
        self.agent.as_mut().expect("an agent is running")
    }

    /// The agent's log tail, or a note that none runs.
    pub fn agent_log(&self) -> String {
        self.agent
            .as_ref()
            .map_or_else(|| "(no agent running)".to_owned(), |a| a.log_tail(40))
    }

    pub fn client(&self) -> &NetNs {
        self.topology.pod("client").expect("client pod").ns()
    }

    pub fn server(&self, pod: &str) -> &EchoServer {
        self.servers
            .iter()
            .find(|s| s.pod_name() == pod)
            .unwrap_or_else(|| panic!("no echo server for {pod}"))
    }

    /// Waits (bounded) until a request to `addr` from the client is answered.
    pub fn wait_until_serving(&self, addr: SocketAddrV4) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(self.client(), addr, Duration::from_millis(500)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{addr} never answered; agent log:\n{}",
                self.agent_log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits (at most `within`) until every pod device has a pinned link:
    /// the agent attaches only after its first program, so filled maps
    /// alone do not yet mean translated traffic.
    pub fn wait_for_attached(&self, within: Duration) {
        let started = Instant::now();
        for pod in self.topology.pods() {
            let pin = self
                .pins
                .path()
                .join(format!("link_tcx_ingress_{}", pod.host_if()));
            while !pin.exists() {
                assert!(
                    started.elapsed() < within,
                    "{} never attached; agent log:\n{}",
                    pod.host_if(),
                    self.agent_log()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Backends (pod IPs) the pinned maps give the frontend `vip:port`
    /// (any protocol); `None` when there is no such frontend.
    pub fn programmed_backends(&self, vip: Ipv4Addr, port: u16) -> Option<Vec<Ipv4Addr>> {
        let tables = KernelTables::open(self.pins.path()).ok()?;
        let services = tables.dump_services().expect("services");
        let slots = tables.dump_slots().expect("slots");
        let backends = tables.dump_backends().expect("backends");
        let (_, service) = services
            .iter()
            .find(|(key, _)| key.addr == vip.octets() && key.port == port)?;
        let mut out: Vec<Ipv4Addr> = (0..service.backend_count)
            .filter_map(|slot| {
                let key = lb_common::slot::Lb4SlotKey {
                    service_id: service.service_id,
                    revision: service.revision,
                    slot,
                };
                slots
                    .get(&key)
                    .and_then(|s| backends.get(&s.backend_id))
                    .map(|b| Ipv4Addr::from(b.addr))
            })
            .collect();
        out.sort();
        Some(out)
    }

    /// Waits until the frontend `vip:port` has exactly `want` as backends
    /// (`None`: the frontend is gone), at most `within`; returns how long
    /// it took. Polls the maps every 5 ms.
    pub fn wait_for_backends(
        &self,
        vip: Ipv4Addr,
        port: u16,
        want: Option<Vec<Ipv4Addr>>,
        within: Duration,
    ) -> Duration {
        let want = want.map(|mut want| {
            want.sort();
            want
        });
        let started = Instant::now();
        loop {
            let programmed = self.programmed_backends(vip, port);
            if programmed == want {
                let took = started.elapsed();
                if want.is_some() {
                    self.wait_for_attached(within);
                }
                return took;
            }
            assert!(
                started.elapsed() < within,
                "{vip}:{port} did not converge to {want:?} within {within:?} (has {programmed:?}); \
                 agent log:\n{}",
                self.agent_log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Sends up to `max` requests with `send`, stopping early once every pod in
/// a non-empty `want` has answered at least `min_each` times; returns the
/// answers per pod. Every answer must come from a pod and show the real
/// client address.
pub fn spread(
    max: usize,
    want: &[&str],
    min_each: usize,
    mut send: impl FnMut() -> anyhow::Result<String>,
) -> BTreeMap<String, usize> {
    let mut answers = BTreeMap::new();
    for _ in 0..max {
        let reply = send().expect("request through the ClusterIP failed");
        let pod = pod_of(&reply).unwrap_or_else(|| panic!("reply without pod name: {reply:?}"));
        let client = client_of(&reply).unwrap_or_else(|| panic!("reply without client: {reply:?}"));
        assert_eq!(
            client.ip(),
            CLIENT_IP,
            "the backend did not see the real client address"
        );
        *answers.entry(pod.to_string()).or_insert(0) += 1;
        if !want.is_empty()
            && want
                .iter()
                .all(|p| answers.get(*p).copied().unwrap_or(0) >= min_each)
        {
            break;
        }
    }
    answers
}

/// `GET path` over HTTP/1.0 to `addr` from a thread inside `ns`; returns
/// the body of a 200 answer.
pub fn http_get_path(ns: &NetNs, addr: SocketAddrV4, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let path = path.to_owned();
    ns.run(move || -> anyhow::Result<String> {
        let timeout = Duration::from_secs(5);
        let mut stream = std::net::TcpStream::connect_timeout(&addr.into(), timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow::anyhow!("no header end in {response:?}"))?;
        anyhow::ensure!(
            head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
            "{head}"
        );
        Ok(body.to_owned())
    })?
}

/// A [`Cluster`] whose agent watches an [`ApiServer`] listening inside the
/// node namespace, through a kubeconfig file.
pub struct ApiCluster {
    // Field order is drop order: the agent (inside `cluster`) first.
    pub cluster: Cluster,
    pub api: ApiServer,
    pub kubeconfig_dir: TempDir,
}

impl ApiCluster {
    /// The cluster, a fixture holding the Node `node-1` and `objects`, and
    /// the agent, started and synced (bounded wait).
    pub fn start(test: &str, backends: &[(&str, Ipv4Addr)], objects: &[Value]) -> ApiCluster {
        let mut cluster = Cluster::new(test, backends);
        let api = ApiServer::start_in(cluster.topology.node_ns().path()).expect("API fixture");
        api.apply(objects::node(xtask::topology::SINGLE_NODE_NAME))
            .expect("apply node");
        for object in objects {
            api.apply(object.clone()).expect("apply object");
        }
        let kubeconfig_dir = TempDir::new("lbt", "kubeconfig").expect("kubeconfig dir");
        let kubeconfig = api
            .write_kubeconfig(kubeconfig_dir.path())
            .expect("write kubeconfig");
        cluster.start_agent(&["--kubeconfig".into(), kubeconfig.display().to_string()]);
        cluster
            .agent_mut()
            .wait_for_log("API: synced", Duration::from_secs(30))
            .expect("agent synced with the API fixture");
        ApiCluster {
            cluster,
            api,
            kubeconfig_dir,
        }
    }
}

impl std::ops::Deref for ApiCluster {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl std::ops::DerefMut for ApiCluster {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.cluster
    }
}

/// Real API JSON for the objects the tests serve.
pub mod objects {
    use std::net::Ipv4Addr;

    use serde_json::{Value, json};

    use super::{POD_TCP_PORT, POD_UDP_PORT};

    /// A ClusterIP Service `name` at `vip`: TCP 80 -> 8080 (`http`), UDP 53
    /// -> 5353 (`dns`).
    pub fn service(name: &str, vip: Ipv4Addr) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "default", "name": name,
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "spec": {
                "type": "ClusterIP", "clusterIP": vip.to_string(), "clusterIPs": [vip.to_string()],
                "ports": [
                    {"name": "http", "port": 80, "targetPort": POD_TCP_PORT, "protocol": "TCP"},
                    {"name": "dns", "port": 53, "targetPort": POD_UDP_PORT, "protocol": "UDP"}
                ],
                "selector": {"app": name}
            },
            "status": {"loadBalancer": {}}
        })
    }

    /// An EndpointSlice `name` of `service` with the given ready pods on
    /// node-1.
    pub fn endpoint_slice(service: &str, name: &str, pods: &[(&str, Ipv4Addr)]) -> Value {
        let endpoints: Vec<Value> = pods
            .iter()
            .map(|(pod, ip)| {
                json!({
                    "addresses": [ip.to_string()],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": xtask::topology::SINGLE_NODE_NAME,
                    "targetRef": {"kind": "Pod", "namespace": "default", "name": pod}
                })
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "default", "name": name,
                         "labels": {"kubernetes.io/service-name": service,
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": "IPv4",
            "ports": [
                {"name": "http", "port": POD_TCP_PORT, "protocol": "TCP"},
                {"name": "dns", "port": POD_UDP_PORT, "protocol": "UDP"}
            ],
            "endpoints": endpoints
        })
    }

    /// A Node with an internal address.
    pub fn node(name: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}
        })
    }
}

/// Writes a manifest the way a careful tool does: a hidden temp file, then a
/// rename, so the agent's directory watcher never reads half a file.
pub fn write_manifest(dir: &std::path::Path, file: &str, content: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, content).expect("write manifest");
    std::fs::rename(&tmp, dir.join(file)).expect("rename manifest");
}

/// Echo servers of both families (TCP [`POD_TCP_PORT`], UDP
/// [`POD_UDP_PORT`]) on the named pods of a dual-stack [`xtask::Cluster`].
pub fn dual_stack_echo_servers(cluster: &xtask::Cluster, pods: &[&str]) -> Vec<EchoServer> {
    pods.iter()
        .map(|name| {
            let pod = cluster.pod(name).expect("pod");
            EchoServer::start_dual_stack(pod.ns(), name, &[POD_TCP_PORT], &[POD_UDP_PORT])
                .expect("echo server")
        })
        .collect()
}

/// The IPv6 address of pod `name` of a dual-stack [`xtask::Cluster`].
pub fn pod_ip6(cluster: &xtask::Cluster, name: &str) -> std::net::Ipv6Addr {
    cluster.pod(name).expect("pod").ip6().expect("dual stack")
}

/// One agent per node of a multi-node [`xtask::Cluster`], each in its node's
/// namespace with its own pin directory, all fed from `manifests`, with
/// `extra` arguments. Field order is drop order: agents stop before their
/// pins go.
pub struct NodeAgents {
    pub agents: Vec<AgentProcess>,
    pins: Vec<BpffsDir>,
}

impl NodeAgents {
    /// Starts one agent per node and waits until each has attached its
    /// programs (it does so after its first program: a map that is
    /// programmed is not yet a device that translates).
    pub fn start(cluster: &xtask::Cluster, manifests: &std::path::Path, extra: &[&str]) -> Self {
        let agents = Self::start_restricted(cluster, manifests, extra, None);
        agents.wait_attached();
        agents
    }

    /// [`NodeAgents::start`], each agent under `restrictions` (a container's
    /// capabilities and read-only /proc/sys) when given.
    pub fn start_restricted(
        cluster: &xtask::Cluster,
        manifests: &std::path::Path,
        extra: &[&str],
        restrictions: Option<&xtask::Restrictions>,
    ) -> Self {
        let mut pins = Vec::new();
        let mut agents = Vec::new();
        for k in 1..=cluster.node_count() {
            let pin = BpffsDir::new().expect("bpffs");
            let mut args: Vec<String> = vec![
                "--node-name".into(),
                format!("node-{k}"),
                "--manifests".into(),
                manifests.display().to_string(),
                "--devices".into(),
                xtask::NODE_DEVICE.into(),
                "--pod-devices".into(),
                xtask::topology::POD_DEVICE_GLOB.into(),
                "--bpffs".into(),
                pin.path().display().to_string(),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            let agent = AgentProcess::spawn_restricted(
                cluster.node(k).ns(),
                &agent_binary(),
                &args,
                &[("RUST_LOG", "info")],
                None,
                restrictions,
            )
            .expect("start agent");
            pins.push(pin);
            agents.push(agent);
        }
        Self { agents, pins }
    }

    /// Waits (bounded: 30 s) until `done`; panics naming `what`, with the
    /// agents' logs, if it never is.
    pub fn wait_until(&self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(
                Instant::now() < deadline,
                "{what}: not reached; agent logs:\n{}{}",
                self.logs(),
                self.stats()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every node's counters (`lbctl stats`), for assertion messages.
    pub fn stats(&self) -> String {
        self.pins
            .iter()
            .enumerate()
            .map(|(i, pin)| {
                let stats = std::process::Command::new(crate::lbctl_binary())
                    .arg("--bpffs")
                    .arg(pin.path())
                    .arg("stats")
                    .output()
                    .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
                    .unwrap_or_else(|e| format!("lbctl: {e}"));
                format!("--- node-{} stats\n{stats}\n", i + 1)
            })
            .collect()
    }

    /// Waits (bounded, as [`Self::wait_until`]) until every agent has
    /// attached its programs, which it does after its first program: from
    /// then on each node translates.
    pub fn wait_attached(&self) {
        for (k, agent) in self.agents.iter().enumerate() {
            self.wait_until(&format!("node-{}'s programs attached", k + 1), || {
                agent
                    .log_contents()
                    .contains("programs attached after the first program")
            });
        }
    }

    /// The last lines of every agent's log, for assertion messages.
    pub fn logs(&self) -> String {
        self.agents
            .iter()
            .enumerate()
            .map(|(i, a)| format!("--- node-{}\n{}\n", i + 1, a.log_tail(30)))
            .collect()
    }

    /// The pinned maps of node `k`'s agent (1-based).
    pub fn tables(&self, k: usize) -> KernelTables {
        KernelTables::open(self.pins_of(k)).expect("open pinned maps")
    }

    /// The pin directory of node `k`'s agent (1-based).
    pub fn pins_of(&self, k: usize) -> &std::path::Path {
        self.pins[k - 1].path()
    }
}
