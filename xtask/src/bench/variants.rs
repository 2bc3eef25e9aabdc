//! One topology per variant (and size), so that exactly one way of
//! translating services acts on the packets: our agent (packet path, or
//! with socket-level balancing for the client pod's cgroup), kube-proxy's
//! iptables or nftables ruleset (loaded inside the node namespace), or
//! nothing (the direct baseline, which talks to the pod address).
//!
//! ```text
//!   client pod 10.244.1.2 --lbv1--+                 +--lbv2-- server pod 10.244.1.10-19
//!                                 node-1 (198.51.100.11)
//!   ext 198.51.100.100 ---- underlay br0 ---- eth0
//! ```

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use xtask::{AgentProcess, BpffsDir, Cgroup, Cluster, NODE_DEVICE, NetNs, TempDir};

use super::kubeproxy;
use super::services::{
    CLIENT_POD_IP, ENDPOINTS_PER_SERVICE, NODE_NAME, NODE_PORT, SERVER_POD_IP, ServiceSet,
    TARGET_PORT,
};
use super::traffic::{BenchServer, wait_until_answering};

/// Name prefix: `cargo xtask clean` removes leftovers.
pub const PREFIX: &str = "lbd";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Variant {
    Direct,
    Ours,
    Iptables,
    Nftables,
    /// Our agent with `--socket-lb-cgroup` on the client pod's cgroup:
    /// the client's connect() is translated at the socket.
    SocketLb,
}

impl Variant {
    /// The variants of the connection and established-flow runs.
    pub const ALL: [Variant; 4] = [
        Variant::Direct,
        Variant::Ours,
        Variant::Iptables,
        Variant::Nftables,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::Ours => "ours",
            Variant::Iptables => "iptables",
            Variant::Nftables => "nftables",
            Variant::SocketLb => "socketlb",
        }
    }
}

/// Runs `program args` inside `ns`, killed after `timeout`; returns how
/// long it ran, or an error naming what it printed.
pub fn run_timed_in(
    ns: &NetNs,
    program: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    let mut child: Child = ns
        .command(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program} in {}", ns.name()))?;
    loop {
        if let Some(status) = child.try_wait()? {
            let took = started.elapsed();
            if !status.success() {
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    use std::io::Read;
                    let _ = pipe.read_to_string(&mut stderr);
                }
                let tail: String = stderr.lines().take(5).collect::<Vec<_>>().join("; ");
                bail!(
                    "{program} {args:?} in {} failed ({status}): {tail}",
                    ns.name()
                );
            }
            return Ok(took);
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{program} {args:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Writes `content` to `dir/file` and returns the path.
pub fn write_file(dir: &Path, file: &str, content: &str) -> Result<PathBuf> {
    let path = dir.join(file);
    std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The agent's binaries.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub binary: PathBuf,
    /// `lbctl`, to read the datapath's counters.
    pub lbctl: PathBuf,
}

/// Map-size flags for `services` services x 10 endpoints.
pub fn agent_size_args(services: u32) -> Vec<String> {
    let backends = services * ENDPOINTS_PER_SERVICE + 1024;
    vec![
        "--max-services".into(),
        (2 * services + 1024).to_string(),
        "--max-slots".into(),
        (2 * backends).to_string(),
        "--max-backends".into(),
        backends.to_string(),
    ]
}

/// How the agent is attached.
#[derive(Clone, Copy, Debug)]
pub enum Attach<'a> {
    /// Nothing: the maps are programmed, no device or cgroup attached.
    Nothing,
    /// XDP/TC on the node and pod devices.
    Devices,
    /// The devices, and socket-level balancing for this cgroup.
    DevicesAndCgroup(&'a Path),
}

/// Starts the agent of `node` (its name) in `ns` on `manifests`; waits
/// until it logged that `services` frontends (or more) are programmed.
pub fn start_agent(
    config: &AgentConfig,
    (node, ns): (&str, &NetNs),
    manifests: &Path,
    pins: &BpffsDir,
    services: u32,
    attach: Attach,
    timeout: Duration,
) -> Result<(AgentProcess, Duration)> {
    let mut args: Vec<String> = vec![
        "--node-name".into(),
        node.into(),
        "--manifests".into(),
        manifests.display().to_string(),
        "--bpffs".into(),
        pins.path().display().to_string(),
    ];
    if let Attach::Devices | Attach::DevicesAndCgroup(_) = attach {
        args.extend(["--pod-devices".into(), "lbv*".into()]);
        args.extend(["--devices".into(), NODE_DEVICE.into()]);
    }
    if let Attach::DevicesAndCgroup(cgroup) = attach {
        args.extend(["--socket-lb-cgroup".into(), cgroup.display().to_string()]);
    }
    args.extend(agent_size_args(services));
    let started = Instant::now();
    let mut agent = AgentProcess::spawn(ns, &config.binary, &args, &[("RUST_LOG", "info")], None)?;
    let deadline = started + timeout;
    loop {
        let log = agent.log_contents();
        let programmed = log.lines().any(|line| {
            line.split("programmed ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| n >= services)
        });
        // The agent attaches only after its first program.
        let attached = matches!(attach, Attach::Nothing)
            || log.contains("programs attached after the first program");
        if programmed && attached {
            return Ok((agent, started.elapsed()));
        }
        if let Some(status) = agent.exit_status()? {
            bail!("agent exited ({status}); log tail:\n{}", agent.log_tail(20));
        }
        if Instant::now() > deadline {
            bail!(
                "agent did not program {services} services within {timeout:?}; log tail:\n{}",
                agent.log_tail(20)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A one-node topology with a client pod, a server pod holding the ten
/// target endpoints, and one variant active. The client pod has a cgroup
/// of its own where cgroup v2 is mounted, as the kubelet gives every pod
/// one; only the socket-level variant attaches anything to it (and needs it).
pub struct Bench {
    // Drop order: agent, server, pins (detaching the socket-level hooks)
    // and files, the client cgroup, then the namespaces.
    _agent: Option<AgentProcess>,
    _server: BenchServer,
    pins: Option<BpffsDir>,
    _files: TempDir,
    client_cgroup: Option<Cgroup>,
    cluster: Cluster,
    variant: Variant,
    set: ServiceSet,
}

impl Bench {
    pub fn start(
        variant: Variant,
        set: ServiceSet,
        agent: &AgentConfig,
        load_timeout: Duration,
    ) -> Result<Bench> {
        let mut cluster = Cluster::with_prefix(PREFIX, 1)?;
        cluster.add_pod(1, "client", CLIENT_POD_IP)?;
        let client_cgroup = match Cgroup::with_prefix(PREFIX, "bench-client") {
            Ok(cgroup) => Some(cgroup),
            Err(e) if variant == Variant::SocketLb => return Err(e),
            Err(_) => None,
        };
        let server_if = cluster
            .add_pod(1, "server", SERVER_POD_IP)?
            .host_if()
            .to_owned();
        let node = cluster.node(1);
        let server = cluster.pod("server")?;
        for j in 1..ENDPOINTS_PER_SERVICE {
            let addr = Ipv4Addr::from(u32::from(SERVER_POD_IP) + j);
            server
                .ns()
                .ip(&["addr", "add", &format!("{addr}/32"), "dev", "eth0"])?;
            node.ns().ip(&[
                "route",
                "add",
                &format!("{addr}/32"),
                "dev",
                &server_if,
                "scope",
                "link",
            ])?;
        }
        for ns in [cluster.pod("client")?.ns(), cluster.external()] {
            ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
        }
        let server = BenchServer::start(server.ns(), TARGET_PORT, 4)?;
        let files = TempDir::new(PREFIX, "bench")?;
        let mut agent_process = None;
        let mut pins = None;
        let node_ns = cluster.node(1).ns();
        match variant {
            Variant::Direct => {
                // The external client reaches pods through the node, as a
                // router with a route to the pod network would.
                cluster.external().ip(&[
                    "route",
                    "add",
                    "10.244.1.0/24",
                    "via",
                    &cluster.node_ip(1).to_string(),
                    "dev",
                    NODE_DEVICE,
                ])?;
            }
            Variant::Ours | Variant::SocketLb => {
                set.write_manifests(files.path())?;
                let pin = BpffsDir::with_prefix(PREFIX)?;
                let attach = match (variant, &client_cgroup) {
                    (Variant::SocketLb, Some(cgroup)) => Attach::DevicesAndCgroup(cgroup.path()),
                    _ => Attach::Devices,
                };
                let (process, _) = start_agent(
                    agent,
                    (NODE_NAME, node_ns),
                    files.path(),
                    &pin,
                    set.count,
                    attach,
                    load_timeout,
                )?;
                agent_process = Some(process);
                pins = Some(pin);
            }
            Variant::Iptables => {
                let path = write_file(
                    files.path(),
                    "rules.iptables",
                    &kubeproxy::iptables_ruleset(&set),
                )?;
                run_timed_in(
                    node_ns,
                    "iptables-restore",
                    &[&path.display().to_string()],
                    load_timeout,
                )?;
            }
            Variant::Nftables => {
                let path = write_file(files.path(), "rules.nft", &kubeproxy::nft_ruleset(&set))?;
                run_timed_in(
                    node_ns,
                    "nft",
                    &["-f", &path.display().to_string()],
                    load_timeout,
                )?;
            }
        }
        let bench = Bench {
            _agent: agent_process,
            _server: server,
            pins,
            _files: files,
            client_cgroup,
            cluster,
            variant,
            set,
        };
        let client = bench.client()?;
        wait_until_answering(client, bench.cluster_ip_target(), Duration::from_secs(30))?;
        wait_until_answering(
            bench.cluster.external(),
            bench.node_port_target(),
            Duration::from_secs(30),
        )?;
        Ok(bench)
    }

    pub fn client(&self) -> Result<&NetNs> {
        Ok(self.cluster.pod("client")?.ns())
    }

    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// Empties netfilter's conntrack table in the node namespace of the
    /// kube-proxy variants (`conntrack -F`), so a run starts with the table
    /// a fresh topology has; nothing for the others (no netfilter rules).
    pub fn flush_conntrack(&self) -> Result<()> {
        if let Variant::Iptables | Variant::Nftables = self.variant {
            run_timed_in(
                self.cluster.node(1).ns(),
                "conntrack",
                &["-F"],
                Duration::from_secs(60),
            )?;
        }
        Ok(())
    }

    /// The client pod's cgroup.
    pub fn client_cgroup(&self) -> Result<&Path> {
        self.client_cgroup
            .as_ref()
            .map(Cgroup::path)
            .context("the client pod has no cgroup (no cgroup v2 hierarchy mounted)")
    }

    /// The agent's pin directory (variants with an agent).
    pub fn pins(&self) -> Option<&Path> {
        self.pins.as_ref().map(BpffsDir::path)
    }

    pub fn external(&self) -> &NetNs {
        self.cluster.external()
    }

    /// What the client pod connects to: the ClusterIP, or the pod directly.
    pub fn cluster_ip_target(&self) -> SocketAddrV4 {
        match self.variant {
            Variant::Direct => SocketAddrV4::new(SERVER_POD_IP, TARGET_PORT),
            _ => self.set.target_vip(),
        }
    }

    /// What the external client connects to: the NodePort, or the pod.
    pub fn node_port_target(&self) -> SocketAddrV4 {
        match self.variant {
            Variant::Direct => SocketAddrV4::new(SERVER_POD_IP, TARGET_PORT),
            _ => SocketAddrV4::new(self.cluster.node_ip(1), NODE_PORT),
        }
    }
}

/// For `Command`-less callers: a command's stdout, trimmed, or "".
pub fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
