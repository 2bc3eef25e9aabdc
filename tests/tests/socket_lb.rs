//! Socket-level balancing end to end: processes inside the cgroup given to
//! the agent (`--socket-lb-cgroup`) connect to service addresses and get the
//! backend at connect() time, while the application keeps seeing the
//! service address; processes outside keep using the packet path.
//!
//! The client is this test binary run again as a child process, moved into
//! the cgroup and the namespace before it execs (cgroup membership is per
//! process, so a thread of the test could not be moved alone).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use lb_agent::datapath::KernelTables;
use lb_common::stats::Reason;
use lb_tests::cluster::{Cluster, write_manifest};
use xtask::{TempDir, http_get, pod_of};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const LOCAL_NP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 1), 30090);
const A: (&str, Ipv4Addr) = ("echo-a", Ipv4Addr::new(10, 244, 1, 11));
const B: (&str, Ipv4Addr) = ("echo-b", Ipv4Addr::new(10, 244, 1, 12));
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

impl TestCgroup {
    fn new() -> Self {
        let root = Path::new("/sys/fs/cgroup/unified");
        let root = if root.join("cgroup.procs").exists() {
            root
        } else {
            Path::new("/sys/fs/cgroup")
        };
        let path = root.join(format!("lbt-{}-socklb", std::process::id()));
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
    match action.as_str() {
        "tcp" => {
            let mut stream = TcpStream::connect((VIP, 80)).expect("connect");
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
            let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
            socket
                .set_read_timeout(Some(Duration::from_secs(3)))
                .expect("timeout");
            socket.send_to(b"query", (VIP, 53)).expect("sendto");
            let mut buf = [0u8; 256];
            let (n, from) = socket.recv_from(&mut buf).expect("recvfrom");
            writeln!(out, "FROM {from}").ok();
            writeln!(out, "REPLY {}", String::from_utf8_lossy(&buf[..n]).trim()).ok();
        }
        "udp-held" => {
            // Connected sockets to the ClusterIP until one reaches each pod.
            let mut held: std::collections::BTreeMap<String, UdpSocket> = Default::default();
            for _ in 0..64 {
                let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
                socket.connect((VIP, 53)).expect("connect");
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
                TcpStream::connect_timeout(&SocketAddr::from((EMPTY, 80)), Duration::from_secs(3))
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
    // The kernel's own view of the socket: its peer is a backend pod.
    let ss = cluster
        .client()
        .sh_ok(&["ss", "-Htn", "state", "established"])
        .expect("ss");
    assert!(
        ss.contains("10.244.1.11:8080") || ss.contains("10.244.1.12:8080"),
        "the socket's real peer is not a backend: {ss}"
    );
    assert!(
        !ss.contains("10.96.0.10"),
        "the socket still points at the ClusterIP: {ss}"
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
    // Released with the socket (lb_sock_release), not left to the LRU.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while reverse_entries() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the closed socket's reverse entry is still there"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

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
    let mut child = spawn_client(&cgroup.0, cluster.client().path(), "refused");
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

#[test]
fn a_connected_udp_socket_to_a_removed_backend_is_destroyed_and_the_others_live() {
    let (cluster, dir, cgroup) =
        start("a_connected_udp_socket_to_a_removed_backend_is_destroyed_and_the_others_live");
    let tables = || KernelTables::open(cluster.pins.path()).expect("maps");
    let destroyed_before = tables().stats.agent_sock_destroyed().expect("stats");
    let mut child = spawn_client(&cgroup.0, cluster.client().path(), "udp-held");
    let stdout = child.stdout.take().expect("stdout");
    let mut reader = BufReader::new(stdout).lines();
    let held = read_lines(&mut reader, 2);
    assert_eq!(held, ["HELD echo-a", "HELD echo-b"], "one socket per pod");

    // echo-a leaves the service.
    let without_a = MANIFESTS.replace(
        "- {addresses: [\"10.244.1.11\"], conditions: {ready: true}, nodeName: node-1}\n",
        "",
    );
    assert_ne!(without_a, MANIFESTS);
    write_manifest(dir.path(), "all.yaml", &without_a);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while tables().stats.agent_sock_destroyed().expect("stats") == destroyed_before {
        assert!(
            std::time::Instant::now() < deadline,
            "no socket destroyed; agent log:\n{}",
            cluster.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        tables().stats.agent_sock_destroyed().expect("stats"),
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
    // lbctl, from the pinned maps alone, counts both kinds of events.
    let stats = lb_tests::lbctl_json(cluster.pins.path(), &["stats"]);
    let sock = &stats["socket_lb"];
    assert_eq!(sock["sockets_destroyed"], destroyed_before + 1, "{sock}");
    assert!(sock["translated"].as_u64() >= Some(2), "{sock}");
}
