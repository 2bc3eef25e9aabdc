//! Socket-level balancing end to end: processes inside the cgroup given to
//! the agent (`--socket-lb-cgroup`) connect to service addresses and get the
//! backend at connect() time, while the application keeps seeing the
//! service address; processes outside keep using the packet path.
//!
//! The client is this test binary run again as a child process, moved into
//! the cgroup and the namespace before it execs (cgroup membership is per
//! process, so a thread of the test could not be moved alone).
//!
//! IPv4 runs on the one-node cluster of the other end-to-end tests; IPv6
//! on a one-node dual-stack [`xtask::Cluster`] with IPv6-only services.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{
        IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream, UdpSocket,
    },
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use lb_agent::datapath::KernelTables;
use lb_common::stats::Reason;
use lb_tests::cluster::{Cluster, NodeAgents, dual_stack_echo_servers, pod_ip6, write_manifest};
use xtask::{EchoServer, TempDir, http_get, pod_of};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const LOCAL_NP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 1), 30090);
const A: (&str, Ipv4Addr) = ("echo-a", Ipv4Addr::new(10, 244, 1, 11));
const B: (&str, Ipv4Addr) = ("echo-b", Ipv4Addr::new(10, 244, 1, 12));
/// IPv6 ClusterIPs (the dual-stack topology's service range).
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);
const EMPTY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x11);
/// The client pod of the dual-stack cluster (node-1, like the echo pods).
const CLIENT6: (&str, Ipv4Addr) = ("client", Ipv4Addr::new(10, 244, 1, 2));
/// Environment variable that turns this binary into the client.
const CLIENT_ROLE: &str = "LBT_SOCK_CLIENT";

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo-1, namespace: default, labels: {kubernetes.io/service-name: echo}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: ["10.244.1.11"], conditions: {ready: true}, nodeName: node-1}
- {addresses: ["10.244.1.12"], conditions: {ready: true}, nodeName: node-1}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  clusterIP: 10.96.0.11
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.12
  externalTrafficPolicy: Local
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30090, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: default, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: ["10.244.1.12"], conditions: {ready: true}, nodeName: node-2}
"#;

/// A cgroup v2 directory this test created, removed on drop.
struct TestCgroup(PathBuf);

/// Cgroups created by this process so far (each test gets its own name).
static CGROUPS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl TestCgroup {
    fn new() -> Self {
        let root = Path::new("/sys/fs/cgroup/unified");
        let root = if root.join("cgroup.procs").exists() {
            root
        } else {
            Path::new("/sys/fs/cgroup")
        };
        let n = CGROUPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = root.join(format!("lbt-{}-{n}-socklb", std::process::id()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TestCgroup(path)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // The clients have exited; an empty cgroup can be removed.
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Runs this binary as the client, inside `cgroup` and the namespace at
/// `netns`, doing `action`; returns its stdout lines (read as they come)
/// and a handle to end it.
fn spawn_client(cgroup: &Path, netns: &Path, action: &str) -> std::process::Child {
    let procs = cgroup.join("cgroup.procs");
    let netns = netns.to_owned();
    let mut command = Command::new(std::env::current_exe().expect("test binary"));
    command
        .args([
            "--exact",
            "socket_client_role",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CLIENT_ROLE, action)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    // SAFETY: only async-signal-safe calls between fork and exec: open,
    // write, setns, close.
    unsafe {
        command.pre_exec(move || {
            std::fs::write(&procs, b"0")?;
            let ns = std::fs::File::open(&netns)?;
            if libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn().expect("spawn the client")
}

/// The client side, run only as the child process of the tests below
/// (ignored in a normal run, so it is never counted as a test that passed).
#[test]
#[ignore = "the client of the socket-level tests, started by them"]
fn socket_client_role() {
    let action = std::env::var(CLIENT_ROLE)
        .unwrap_or_else(|_| panic!("run by the socket-level tests with {CLIENT_ROLE} set"));
    let out = &mut std::io::stdout();
    // "tcp6", "udp6", ...: the same action against the IPv6 services.
    let (action, vip, empty, any): (&str, IpAddr, IpAddr, &str) = match action.strip_suffix('6') {
        Some(base) => (base, VIP6.into(), EMPTY6.into(), "[::]:0"),
        None => (action.as_str(), VIP.into(), EMPTY.into(), "0.0.0.0:0"),
    };
    match action {
        "tcp" => {
            let mut stream = TcpStream::connect((vip, 80)).expect("connect");
            let peer = stream.peer_addr().expect("getpeername");
            // The echo server's held-connection protocol: a HOLD line, then
            // one answer per line (sent separately, as HoldConnection does).
            stream.write_all(b"HOLD\n").expect("send");
            std::thread::sleep(Duration::from_millis(100));
            stream.write_all(b"ask\n").expect("send");
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut reply = String::new();
            reader.read_line(&mut reply).expect("reply");
            writeln!(out, "PEER {peer}").ok();
            writeln!(out, "REPLY {}", reply.trim()).ok();
            out.flush().ok();
            // Keep the connection open until the test has looked at it.
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).ok();
        }
        "udp" => {
            let socket = UdpSocket::bind(any).expect("bind");
            socket
                .set_read_timeout(Some(Duration::from_secs(3)))
                .expect("timeout");
            socket.send_to(b"query", (vip, 53)).expect("sendto");
            let mut buf = [0u8; 256];
            let (n, from) = socket.recv_from(&mut buf).expect("recvfrom");
            writeln!(out, "FROM {from}").ok();
            writeln!(out, "REPLY {}", String::from_utf8_lossy(&buf[..n]).trim()).ok();
        }
        "udp-held" => {
            // Connected sockets to the ClusterIP until one reaches each pod.
            let mut held: std::collections::BTreeMap<String, UdpSocket> = Default::default();
            for _ in 0..64 {
                let socket = UdpSocket::bind(any).expect("bind");
                socket.connect((vip, 53)).expect("connect");
                socket
                    .set_read_timeout(Some(Duration::from_secs(3)))
                    .expect("timeout");
                socket.send(b"query").expect("send");
                let mut buf = [0u8; 256];
                let n = socket.recv(&mut buf).expect("recv");
                let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
                let pod = pod_of(&reply).expect("pod in reply").to_string();
                held.entry(pod).or_insert(socket);
                if held.len() == 2 {
                    break;
                }
            }
            for pod in held.keys() {
                writeln!(out, "HELD {pod}").ok();
            }
            out.flush().ok();
            // The test removes a backend, then says go.
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).ok();
            for (pod, socket) in &held {
                let mut buf = [0u8; 256];
                // A destroyed socket reports its error to the next call.
                socket
                    .set_read_timeout(Some(Duration::from_millis(300)))
                    .expect("timeout");
                let outcome = match socket.recv(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        socket.send(b"again").expect("send");
                        socket
                            .set_read_timeout(Some(Duration::from_secs(3)))
                            .expect("timeout");
                        match socket.recv(&mut buf) {
                            Ok(n) => format!("ALIVE {}", String::from_utf8_lossy(&buf[..n]).trim()),
                            Err(e) => format!("FAILED {e}"),
                        }
                    }
                    Err(e) => format!("ERRNO {}", e.raw_os_error().unwrap_or(0)),
                    Ok(n) => format!("STRAY {}", String::from_utf8_lossy(&buf[..n]).trim()),
                };
                writeln!(out, "AFTER {pod} {outcome}").ok();
            }
        }
        "refused" => {
            let started = std::time::Instant::now();
            let error =
                TcpStream::connect_timeout(&SocketAddr::from((empty, 80)), Duration::from_secs(3))
                    .err()
                    .map(|e| format!("{:?}", e.kind()));
            writeln!(
                out,
                "ERROR {error:?} AFTER_MS {}",
                started.elapsed().as_millis()
            )
            .ok();
        }
        "nodeport" => {
            let mut stream = TcpStream::connect(LOCAL_NP).expect("connect NodePort");
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("send");
            let mut body = String::new();
            stream.read_to_string(&mut body).ok();
            writeln!(out, "REPLY {}", body.lines().last().unwrap_or_default()).ok();
        }
        other => panic!("unknown client action {other}"),
    }
}

fn lines_of(child: &mut std::process::Child, n: usize) -> Vec<String> {
    let stdout = child.stdout.take().expect("stdout");
    let mut reader = BufReader::new(stdout).lines();
    let lines = read_lines(&mut reader, n);
    // Keep reading what the client still prints (libtest's summary), so
    // it never writes into a closed pipe.
    std::thread::spawn(move || reader.for_each(drop));
    lines
}

/// The next `n` marked lines of the client's output.
fn read_lines(
    reader: &mut std::io::Lines<BufReader<std::process::ChildStdout>>,
    n: usize,
) -> Vec<String> {
    let mut lines = Vec::new();
    for line in reader.by_ref() {
        let line = line.expect("client output");
        // libtest may print "test socket_client_role ... " before the
        // client's first line, on the same line.
        let found = ["PEER ", "REPLY ", "FROM ", "ERROR ", "HELD ", "AFTER "]
            .iter()
            .find_map(|marker| line.find(marker));
        if let Some(at) = found {
            lines.push(line[at..].to_string());
            if lines.len() == n {
                break;
            }
        }
    }
    lines
}

fn start(test: &str) -> (Cluster, TempDir, TestCgroup) {
    let mut cluster = Cluster::new(test, &[A, B]);
    let cgroup = TestCgroup::new();
    let dir = TempDir::new("lbt", "manifests").expect("manifest dir");
    write_manifest(dir.path(), "all.yaml", MANIFESTS);
    cluster.start_agent(&[
        "--manifests".to_string(),
        dir.path().display().to_string(),
        "--socket-lb-cgroup".to_string(),
        cgroup.0.display().to_string(),
    ]);
    cluster.wait_until_serving(SocketAddrV4::new(VIP, 80));
    (cluster, dir, cgroup)
}

/// The kernel's own view of the client's established TCP socket: its peer
/// is one of `backends` (`addr:port` as `ss` prints them), not `vip`.
fn assert_peer_is_a_backend(client: &xtask::NetNs, backends: &[String], vip: &str) {
    let ss = client
        .sh_ok(&["ss", "-Htn", "state", "established"])
        .expect("ss");
    assert!(
        backends.iter().any(|b| ss.contains(b.as_str())),
        "the socket's real peer is not a backend {backends:?}: {ss}"
    );
    assert!(
        !ss.contains(vip),
        "the socket still points at the ClusterIP: {ss}"
    );
}

/// Waits (2 s at most) until `released`: a closed socket's reverse entry
/// goes with the socket (lb_sock_release), it is not left to the LRU.
fn wait_for_release(released: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while !released() {
        assert!(
            std::time::Instant::now() < deadline,
            "the closed socket's reverse entry is still there"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_client_in_the_cgroup_talks_to_the_backend_but_sees_the_cluster_ip() {
    let (cluster, _dir, cgroup) =
        start("a_client_in_the_cgroup_talks_to_the_backend_but_sees_the_cluster_ip");
    let client_ns = cluster.client().path().to_owned();
    let before = KernelTables::open(cluster.pins.path())
        .expect("maps")
        .stats
        .get(Reason::SockTranslated)
        .expect("stats")
        .packets;
    let new_flows = KernelTables::open(cluster.pins.path())
        .expect("maps")
        .stats
        .get(Reason::NewFlow)
        .expect("stats")
        .packets;

    let mut child = spawn_client(&cgroup.0, &client_ns, "tcp");
    let lines = lines_of(&mut child, 2);
    assert_eq!(
        lines[0],
        format!("PEER {VIP}:80"),
        "getpeername() must show the ClusterIP"
    );
    assert!(lines[1].contains("pod=echo-"), "{lines:?}");
    assert_peer_is_a_backend(
        cluster.client(),
        &[A, B].map(|(_, ip)| format!("{ip}:8080")),
        &VIP.to_string(),
    );
    let reverse_entries = || {
        KernelTables::open(cluster.pins.path())
            .expect("maps")
            .sock_revnat
            .keys()
            .count()
    };
    assert_eq!(reverse_entries(), 1, "the open socket's reverse entry");
    drop(child.stdin.take());
    child.wait().expect("client exit");
    wait_for_release(|| reverse_entries() == 0);

    let tables = KernelTables::open(cluster.pins.path()).expect("maps");
    assert!(
        tables
            .stats
            .get(Reason::SockTranslated)
            .expect("stats")
            .packets
            > before
    );
    // Translated at the socket: the packet path balanced nothing new.
    assert_eq!(
        tables.stats.get(Reason::NewFlow).expect("stats").packets,
        new_flows,
        "translated twice"
    );

    // A client outside the cgroup (a thread of this test) uses the packet path.
    let reply = http_get(
        cluster.client(),
        SocketAddrV4::new(VIP, 80),
        Duration::from_secs(2),
    )
    .expect("outside client");
    assert!(pod_of(&reply).is_some(), "{reply}");
}

#[test]
fn unconnected_udp_replies_come_from_the_cluster_ip() {
    let (cluster, _dir, cgroup) = start("unconnected_udp_replies_come_from_the_cluster_ip");
    let mut child = spawn_client(&cgroup.0, cluster.client().path(), "udp");
    let lines = lines_of(&mut child, 2);
    child.wait().expect("client exit");
    assert_eq!(
        lines[0],
        format!("FROM {VIP}:53"),
        "recvfrom() must show the ClusterIP"
    );
    assert!(lines[1].contains("pod=echo-"), "{lines:?}");
}

#[test]
fn connect_to_a_service_without_endpoints_is_refused_at_once() {
    let (cluster, _dir, cgroup) =
        start("connect_to_a_service_without_endpoints_is_refused_at_once");
    assert_refused_at_once(&cgroup.0, cluster.client().path(), "refused");
}

/// The client's `action` connect() fails with ECONNREFUSED, in well under
/// a second (no SYN retransmissions).
fn assert_refused_at_once(cgroup: &Path, netns: &Path, action: &str) {
    let mut child = spawn_client(cgroup, netns, action);
    let lines = lines_of(&mut child, 1);
    child.wait().expect("client exit");
    assert!(lines[0].contains("ConnectionRefused"), "{lines:?}");
    let ms: u64 = lines[0]
        .rsplit(' ')
        .next()
        .and_then(|m| m.parse().ok())
        .expect("elapsed");
    assert!(ms < 1000, "refused only after {ms} ms: {lines:?}");
}

#[test]
fn the_nodes_own_processes_reach_every_endpoint_of_a_local_service() {
    let (cluster, _dir, cgroup) =
        start("the_nodes_own_processes_reach_every_endpoint_of_a_local_service");
    // A process of the node itself (in the node namespace), in the cgroup:
    // the NodePort of a Local service whose only endpoint is "elsewhere".
    let node_ns = cluster.topology.node_ns().path().to_owned();
    let mut child = spawn_client(&cgroup.0, &node_ns, "nodeport");
    let lines = lines_of(&mut child, 1);
    child.wait().expect("client exit");
    assert!(
        lines[0].contains("pod=echo-b"),
        "the node's own process was not served: {lines:?}"
    );
}

/// The destroy scenario of either family: the client (`action`) holds a
/// connected UDP socket to each pod, `remove_a` takes echo-a out of the
/// service; exactly one socket is destroyed (`destroyed` counts), and
/// after it the client finds that one aborted and the other alive.
/// Returns the count before.
fn held_udp_socket_of_the_removed_backend_is_destroyed(
    cgroup: &Path,
    netns: &Path,
    action: &str,
    destroyed: impl Fn() -> u64,
    remove_a: impl FnOnce(),
    logs: impl Fn() -> String,
) -> u64 {
    let destroyed_before = destroyed();
    let mut child = spawn_client(cgroup, netns, action);
    let stdout = child.stdout.take().expect("stdout");
    let mut reader = BufReader::new(stdout).lines();
    let held = read_lines(&mut reader, 2);
    assert_eq!(held, ["HELD echo-a", "HELD echo-b"], "one socket per pod");

    remove_a();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while destroyed() == destroyed_before {
        assert!(
            std::time::Instant::now() < deadline,
            "no socket destroyed; agent log:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        destroyed(),
        destroyed_before + 1,
        "only the socket of the removed backend goes"
    );

    child
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("tell the client");
    let after = read_lines(&mut reader, 2);
    std::thread::spawn(move || reader.for_each(drop));
    child.wait().expect("client exit");
    assert_eq!(
        after[0],
        format!("AFTER echo-a ERRNO {}", libc::ECONNABORTED),
        "the socket to the removed backend was not destroyed: {after:?}"
    );
    assert!(
        after[1].starts_with("AFTER echo-b ALIVE") && after[1].contains("pod=echo-b"),
        "the socket to the remaining backend broke: {after:?}"
    );
    destroyed_before
}

#[test]
fn a_connected_udp_socket_to_a_removed_backend_is_destroyed_and_the_others_live() {
    let (cluster, dir, cgroup) =
        start("a_connected_udp_socket_to_a_removed_backend_is_destroyed_and_the_others_live");
    let tables = || KernelTables::open(cluster.pins.path()).expect("maps");
    let destroyed_before = held_udp_socket_of_the_removed_backend_is_destroyed(
        &cgroup.0,
        cluster.client().path(),
        "udp-held",
        || tables().stats.agent_sock_destroyed().expect("stats"),
        || {
            // echo-a leaves the service.
            let without_a = MANIFESTS.replace(
                "- {addresses: [\"10.244.1.11\"], conditions: {ready: true}, nodeName: node-1}\n",
                "",
            );
            assert_ne!(without_a, MANIFESTS);
            write_manifest(dir.path(), "all.yaml", &without_a);
        },
        || cluster.agent_log(),
    );
    // lbctl, from the pinned maps alone, counts both kinds of events.
    let stats = lb_tests::lbctl_json(cluster.pins.path(), &["stats"]);
    let sock = &stats["socket_lb"];
    assert_eq!(sock["sockets_destroyed"], destroyed_before + 1, "{sock}");
    assert!(sock["translated"].as_u64() >= Some(2), "{sock}");
}

/// The dual-stack one-node cluster of the IPv6 tests: echo-a and echo-b
/// serving both families, the client pod, one agent with socket-level
/// balancing on `cgroup`. Field order is drop order: the agent stops
/// before the pods and namespaces go.
struct DualStack {
    agents: NodeAgents,
    _servers: Vec<EchoServer>,
    cluster: xtask::Cluster,
    dir: TempDir,
    cgroup: TestCgroup,
}

impl DualStack {
    fn start(test: &str) -> Self {
        lb_tests::require_root(test);
        let mut cluster = xtask::Cluster::new(1).expect("one-node dual-stack cluster");
        for (name, ip) in [A, B, CLIENT6] {
            cluster.add_pod(1, name, ip).expect("pod");
        }
        let servers = dual_stack_echo_servers(&cluster, &[A.0, B.0]);
        let dir = TempDir::new("lbt", "manifests").expect("manifest dir");
        let cgroup = TestCgroup::new();
        let me_manifests = manifests6(&cluster, &[A.0, B.0]);
        write_manifest(dir.path(), "all.yaml", &me_manifests);
        let cgroup_arg = cgroup.0.display().to_string();
        let agents = NodeAgents::start(
            &cluster,
            dir.path(),
            &["--socket-lb-cgroup", cgroup_arg.as_str()],
        );
        let me = Self {
            agents,
            _servers: servers,
            cluster,
            dir,
            cgroup,
        };
        me.agents
            .wait_until(&format!("the client reaching [{VIP6}]:80"), || {
                http_get(me.client(), v6(VIP6, 80), Duration::from_millis(500)).is_ok()
            });
        me
    }

    fn client(&self) -> &xtask::NetNs {
        self.cluster.pod(CLIENT6.0).expect("client pod").ns()
    }

    fn ip6(&self, pod: &str) -> Ipv6Addr {
        pod_ip6(&self.cluster, pod)
    }

    fn tables(&self) -> KernelTables {
        self.agents.tables(1)
    }

    fn counter(&self, reason: Reason) -> u64 {
        self.tables().stats.get(reason).expect("stats").packets
    }
}

fn v6(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddrV6::new(ip, port, 0, 0).into()
}

/// The IPv6-only services: `echo6` (HTTP and DNS) with an IPv6
/// EndpointSlice of `pods`, and `empty6` without endpoints.
fn manifests6(cluster: &xtask::Cluster, pods: &[&str]) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: echo6, namespace: default}}\nspec:\n  \
         clusterIP: {VIP6}\n  clusterIPs: [\"{VIP6}\"]\n  ipFamilies: [IPv6]\n  ports:\n  \
         - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}\n  \
         - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: echo6-1, \
         namespace: default, labels: {{kubernetes.io/service-name: echo6}}}}\naddressType: IPv6\n\
         ports: [{{name: http, port: 8080, protocol: TCP}}, {{name: dns, port: 5353, protocol: UDP}}]\n\
         endpoints:\n"
    );
    for pod in pods {
        let ip6 = pod_ip6(cluster, pod);
        yaml.push_str(&format!(
            "- {{addresses: [\"{ip6}\"], conditions: {{ready: true}}, nodeName: node-1}}\n"
        ));
    }
    yaml.push_str(&format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: empty6, namespace: default}}\nspec:\n  \
         clusterIP: {EMPTY6}\n  clusterIPs: [\"{EMPTY6}\"]\n  ipFamilies: [IPv6]\n  \
         ports: [{{name: http, port: 80, protocol: TCP}}]\n"
    ));
    yaml
}

#[test]
fn an_ipv6_client_in_the_cgroup_talks_to_the_backend_but_sees_the_cluster_ip() {
    let dual = DualStack::start(
        "an_ipv6_client_in_the_cgroup_talks_to_the_backend_but_sees_the_cluster_ip",
    );
    let before = dual.counter(Reason::SockTranslated);
    let new_flows = dual.counter(Reason::NewFlow);

    let mut child = spawn_client(&dual.cgroup.0, dual.client().path(), "tcp6");
    let lines = lines_of(&mut child, 2);
    assert_eq!(
        lines[0],
        format!("PEER [{VIP6}]:80"),
        "getpeername() must show the IPv6 ClusterIP"
    );
    assert!(lines[1].contains("pod=echo-"), "{lines:?}");
    let backends = [A.0, B.0].map(|pod| format!("[{}]:8080", dual.ip6(pod)));
    assert_peer_is_a_backend(dual.client(), &backends, &VIP6.to_string());
    let reverse_entries = || {
        let tables = dual.tables();
        (
            tables.sock_revnat.keys().count(),
            tables.sock_revnat6.keys().count(),
        )
    };
    assert_eq!(
        reverse_entries(),
        (0, 1),
        "the open socket's reverse entry, in the IPv6 map"
    );
    let (key, revnat) = dual
        .tables()
        .sock_revnat6
        .iter()
        .next()
        .expect("one entry")
        .expect("readable");
    assert_eq!(revnat.addr, VIP6.octets(), "the service address kept");
    assert_eq!(revnat.port, 80);
    assert!(
        backends.contains(&format!("[{}]:{}", Ipv6Addr::from(key.addr), key.port)),
        "the entry's backend {key:?} is none of {backends:?}"
    );
    drop(child.stdin.take());
    child.wait().expect("client exit");
    wait_for_release(|| reverse_entries() == (0, 0));

    assert!(dual.counter(Reason::SockTranslated) > before);
    // Translated at the socket: the packet path balanced nothing new.
    assert_eq!(dual.counter(Reason::NewFlow), new_flows, "translated twice");

    // A client outside the cgroup (a thread of this test) uses the packet path.
    let reply =
        http_get(dual.client(), v6(VIP6, 80), Duration::from_secs(2)).expect("outside client");
    assert!(pod_of(&reply).is_some(), "{reply}");
    assert!(
        dual.counter(Reason::NewFlow) > new_flows,
        "the outside client was not balanced by the packet path"
    );
}

#[test]
fn unconnected_ipv6_udp_replies_come_from_the_cluster_ip() {
    let dual = DualStack::start("unconnected_ipv6_udp_replies_come_from_the_cluster_ip");
    let before = dual.counter(Reason::SockTranslated);
    let mut child = spawn_client(&dual.cgroup.0, dual.client().path(), "udp6");
    let lines = lines_of(&mut child, 2);
    child.wait().expect("client exit");
    assert_eq!(
        lines[0],
        format!("FROM [{VIP6}]:53"),
        "recvfrom() must show the IPv6 ClusterIP"
    );
    assert!(lines[1].contains("pod=echo-"), "{lines:?}");
    assert!(
        dual.counter(Reason::SockTranslated) > before,
        "sendto() was not translated at the socket"
    );
    // The datagram's reverse entry (an unconnected socket's peers age out).
    let entries: Vec<_> = dual
        .tables()
        .sock_revnat6
        .iter()
        .filter_map(Result::ok)
        .map(|(key, revnat)| (key.port, revnat.addr, revnat.port))
        .collect();
    assert_eq!(entries, [(5353, VIP6.octets(), 53)], "{entries:?}");
}

#[test]
fn ipv6_connect_to_a_service_without_endpoints_is_refused_at_once() {
    let dual = DualStack::start("ipv6_connect_to_a_service_without_endpoints_is_refused_at_once");
    let refused = dual.counter(Reason::SockRefused);
    assert_refused_at_once(&dual.cgroup.0, dual.client().path(), "refused6");
    assert_eq!(
        dual.counter(Reason::SockRefused),
        refused + 1,
        "refused at the socket, not by the packet path"
    );
}

#[test]
fn a_connected_ipv6_udp_socket_to_a_removed_backend_is_destroyed_and_the_others_live() {
    let dual = DualStack::start(
        "a_connected_ipv6_udp_socket_to_a_removed_backend_is_destroyed_and_the_others_live",
    );
    let destroyed_before = held_udp_socket_of_the_removed_backend_is_destroyed(
        &dual.cgroup.0,
        dual.client().path(),
        "udp-held6",
        || dual.tables().stats.agent_sock_destroyed().expect("stats"),
        // echo-a leaves the service.
        || {
            write_manifest(
                dual.dir.path(),
                "all.yaml",
                &manifests6(&dual.cluster, &[B.0]),
            )
        },
        || dual.agents.logs(),
    );
    // lbctl, from the pinned maps alone, counts the IPv6 reverse map too.
    let stats = lb_tests::lbctl_json(dual.agents.pins_of(1), &["stats"]);
    assert!(
        stats["maps"]
            .as_array()
            .is_some_and(|maps| maps.iter().any(|m| m["map"] == lb_common::sock::NAME6)),
        "{}",
        stats["maps"]
    );
    let sock = &stats["socket_lb"];
    assert_eq!(sock["sockets_destroyed"], destroyed_before + 1, "{sock}");
    assert!(sock["translated"].as_u64() >= Some(2), "{sock}");
}
