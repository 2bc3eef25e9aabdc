//! Conntrack lifecycle end to end, on the two-node topology with one agent
//! per node: long runs of short connections through SNAT (a NodePort whose
//! only endpoint is on the other node) and through hairpin (a pod calling
//! its own single-replica service), each far more than the 4523 SNAT ports
//! of one backend; one client port used towards two services that share a
//! backend at the same time; and source ports reused after a backend left
//! a service (still serving another one) never reaching it.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::fd::FromRawFd,
    time::{Duration, Instant},
};

use lb_tests::{
    cluster::{NodeAgents, write_manifest},
    require_root,
};
use xtask::{Cluster, EchoServer, NetNs, TempDir, client_of, pod_of};

const ECHO_A: (&str, Ipv4Addr) = ("echo-a", Ipv4Addr::new(10, 244, 1, 12));
const ECHO_C: (&str, Ipv4Addr) = ("echo-c", Ipv4Addr::new(10, 244, 1, 13));
const SOLO: (&str, Ipv4Addr) = ("solo", Ipv4Addr::new(10, 244, 1, 11));
const CLIENT: (&str, Ipv4Addr) = ("client", Ipv4Addr::new(10, 244, 1, 2));
const ECHO_B: (&str, Ipv4Addr) = ("echo-b", Ipv4Addr::new(10, 244, 2, 11));

const NODE_PORT: u16 = 30080;
const SOLO_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);
const UDP_X: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 70);
const UDP_Y: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 71);
const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
const KEEP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 81);
const TIMEOUT: Duration = Duration::from_secs(3);
/// Short connections per long run: over four times the SNAT ports of one
/// backend and address.
const RUN: usize = 20_000;

fn service(name: &str, vip: Ipv4Addr, port: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  clusterIP: {vip}\n  ports: [{port}]\n"
    )
}

fn slice(service: &str, proto: &str, port: u16, pods: &[((&str, Ipv4Addr), &str)]) -> String {
    let mut yaml = format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-x1\n  \
         namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\n\
         ports: [{{name: p, port: {port}, protocol: {proto}}}]\nendpoints:\n"
    );
    for ((name, ip), node) in pods {
        yaml.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n  nodeName: {node}\n  \
             targetRef: {{kind: Pod, namespace: default, name: {name}}}\n"
        ));
    }
    yaml
}

fn services() -> String {
    let tcp = "{name: p, port: 80, targetPort: 8080, protocol: TCP}";
    let udp = "{name: p, port: 53, targetPort: 5353, protocol: UDP}";
    [
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: np-remote, namespace: default}}\n\
             spec:\n  type: NodePort\n  clusterIP: 10.96.0.50\n  \
             ports: [{{name: p, port: 80, targetPort: 8080, nodePort: {NODE_PORT}, protocol: TCP}}]\n"
        ),
        service("solo", SOLO_VIP, tcp),
        service("udp-x", UDP_X, udp),
        service("udp-y", UDP_Y, udp),
        service("web", WEB, tcp),
        service("keep", KEEP, tcp),
    ]
    .concat()
}

fn slices(web: &[((&str, Ipv4Addr), &str)]) -> String {
    let n1 = "node-1";
    [
        slice("np-remote", "TCP", 8080, &[(ECHO_B, "node-2")]),
        slice("solo", "TCP", 8080, &[(SOLO, n1)]),
        slice("udp-x", "UDP", 5353, &[(ECHO_A, n1)]),
        slice("udp-y", "UDP", 5353, &[(ECHO_A, n1)]),
        slice("web", "TCP", 8080, web),
        slice("keep", "TCP", 8080, &[(ECHO_A, n1)]),
    ]
    .concat()
}

struct TwoNodes {
    cluster: Cluster,
    manifests: TempDir,
    agents: NodeAgents,
    _servers: Vec<EchoServer>,
}

impl TwoNodes {
    fn start(test: &str) -> Self {
        require_root(test);
        let mut cluster = Cluster::new(2).expect("two-node cluster");
        for pod in [ECHO_A, ECHO_C, SOLO, CLIENT] {
            cluster.add_pod(1, pod.0, pod.1).expect("pod");
        }
        cluster.add_pod(2, ECHO_B.0, ECHO_B.1).expect("pod");
        let servers = [ECHO_A.0, ECHO_C.0, SOLO.0, ECHO_B.0]
            .iter()
            .map(|name| {
                let pod = cluster.pod(name).expect("pod");
                EchoServer::start(pod.ns(), name, &[8080], &[5353]).expect("echo server")
            })
            .collect();
        let manifests = TempDir::new("lbt", "manifests").expect("manifest dir");
        write_manifest(manifests.path(), "services.yaml", &services());
        let web = [(ECHO_A, "node-1"), (ECHO_C, "node-1")];
        write_manifest(manifests.path(), "slices.yaml", &slices(&web));
        let agents = NodeAgents::start(
            &cluster,
            manifests.path(),
            &["--conntrack-gc-interval", "1s"],
        );
        let me = Self {
            cluster,
            manifests,
            agents,
            _servers: servers,
        };
        let node1 = SocketAddrV4::new(me.cluster.node_ip(1), NODE_PORT);
        me.agents.wait_until("node-1's NodePort answering", || {
            get(me.cluster.external(), None, node1.into()).is_ok()
        });
        let client = me.ns(CLIENT.0);
        me.agents.wait_until("ClusterIPs answering", || {
            get(client, None, SocketAddr::from((WEB, 80))).is_ok()
        });
        me
    }

    fn ns(&self, pod: &str) -> &NetNs {
        self.cluster.pod(pod).expect("pod").ns()
    }
}

/// One HTTP/1.0 request to `to` from inside the current namespace, from
/// `from` if given (SO_REUSEADDR: the port may have been used before):
/// the answer's body.
fn get_here(from: Option<SocketAddr>, to: SocketAddr) -> anyhow::Result<String> {
    let stream = match from {
        None => TcpStream::connect_timeout(&to, TIMEOUT)?,
        Some(from) => connect_from(from, to)?,
    };
    let mut stream = stream;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    stream.write_all(format!("GET / HTTP/1.0\r\nHost: {to}\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (_, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no header end in {response:?}"))?;
    Ok(body.to_owned())
}

/// A TCP connection from the IPv4 address and port `from` (bound with
/// SO_REUSEADDR; connect bounded by SO_SNDTIMEO).
fn connect_from(from: SocketAddr, to: SocketAddr) -> anyhow::Result<TcpStream> {
    let (SocketAddr::V4(from), SocketAddr::V4(to)) = (from, to) else {
        anyhow::bail!("IPv4 only");
    };
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: plain socket calls on a descriptor this function owns; on
    // success it is handed to TcpStream, on failure closed here.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let timeout = libc::timeval {
            tv_sec: TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        let local = sockaddr(from);
        let remote = sockaddr(to);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let ok = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
            && libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            ) == 0
            && libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) == 0
            && libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) == 0;
        if !ok {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(stream)
    }
}

/// [`get_here`] from inside `ns`.
fn get(ns: &NetNs, from: Option<SocketAddr>, to: SocketAddr) -> anyhow::Result<String> {
    ns.run(move || get_here(from, to))?
}

/// `RUN` sequential short connections to `to` from inside `ns` (bounded:
/// at most ten minutes): the failures, with the first few errors, and the
/// pods that answered.
fn long_run(ns: &NetNs, to: SocketAddr) -> (usize, Vec<String>, BTreeMap<String, usize>) {
    ns.run(move || {
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut failures = 0;
        let mut errors = Vec::new();
        let mut pods = BTreeMap::new();
        for _ in 0..RUN {
            if Instant::now() > deadline {
                failures += 1;
                errors.push("out of time".to_owned());
                break;
            }
            match get_here(None, to) {
                Ok(body) => {
                    *pods
                        .entry(pod_of(&body).unwrap_or("?").to_owned())
                        .or_insert(0) += 1;
                }
                Err(e) => {
                    failures += 1;
                    if errors.len() < 5 {
                        errors.push(format!("{e:#}"));
                    }
                }
            }
        }
        (failures, errors, pods)
    })
    .expect("run in the namespace")
}

#[test]
fn twenty_thousand_short_connections_through_a_snat_nodeport_all_succeed() {
    let env =
        TwoNodes::start("twenty_thousand_short_connections_through_a_snat_nodeport_all_succeed");
    let node1 = SocketAddr::from((env.cluster.node_ip(1), NODE_PORT));
    let (failures, errors, pods) = long_run(env.cluster.external(), node1);
    assert_eq!(failures, 0, "{errors:?}\n{}", env.agents.logs());
    assert_eq!(pods.get(ECHO_B.0), Some(&RUN), "{pods:?}");
    let stats = env.agents.tables(1).stats;
    let exhausted = stats
        .get(lb_common::stats::Reason::DropSnatExhausted)
        .expect("stats")
        .packets;
    assert_eq!(exhausted, 0);
}

#[test]
fn twenty_thousand_hairpin_connections_to_a_pods_own_service_all_succeed() {
    let env =
        TwoNodes::start("twenty_thousand_hairpin_connections_to_a_pods_own_service_all_succeed");
    let (failures, errors, pods) = long_run(env.ns(SOLO.0), SocketAddr::from((SOLO_VIP, 80)));
    assert_eq!(failures, 0, "{errors:?}\n{}", env.agents.logs());
    assert_eq!(pods.get(SOLO.0), Some(&RUN), "{pods:?}");
}

#[test]
fn one_client_port_reaches_two_services_sharing_a_backend_at_the_same_time() {
    let env =
        TwoNodes::start("one_client_port_reaches_two_services_sharing_a_backend_at_the_same_time");
    let answers = env
        .ns(CLIENT.0)
        .run(|| -> anyhow::Result<Vec<(SocketAddr, String)>> {
            let socket = UdpSocket::bind((CLIENT.1, 45000))?;
            socket.set_read_timeout(Some(TIMEOUT))?;
            let mut answers = Vec::new();
            // Both flows live at once, from the same port, a few rounds.
            for round in 0..3 {
                socket.send_to(format!("x{round}").as_bytes(), (UDP_X, 53))?;
                socket.send_to(format!("y{round}").as_bytes(), (UDP_Y, 53))?;
                for _ in 0..2 {
                    let mut buf = [0u8; 2048];
                    let (n, from) = socket.recv_from(&mut buf)?;
                    answers.push((from, String::from_utf8_lossy(&buf[..n]).into_owned()));
                }
            }
            Ok(answers)
        })
        .expect("run")
        .unwrap_or_else(|e| panic!("{e:#}\n{}", env.agents.logs()));
    let from_x = answers
        .iter()
        .filter(|(from, _)| *from == SocketAddr::from((UDP_X, 53)));
    let from_y = answers
        .iter()
        .filter(|(from, _)| *from == SocketAddr::from((UDP_Y, 53)));
    assert_eq!(from_x.clone().count(), 3, "{answers:?}");
    assert_eq!(from_y.clone().count(), 3, "{answers:?}");
    for (_, answer) in answers.iter() {
        assert_eq!(pod_of(answer), Some(ECHO_A.0), "{answer}");
    }
    // The backend saw two different client ports: the second flow's was
    // remapped so that both replies find their way back.
    let seen: std::collections::BTreeSet<u16> = answers
        .iter()
        .filter_map(|(_, a)| client_of(a))
        .map(|c| c.port())
        .collect();
    assert_eq!(seen.len(), 2, "{answers:?}");
    assert!(seen.contains(&45000), "{answers:?}");
}

#[test]
fn source_ports_reused_after_a_backend_left_the_service_never_reach_it() {
    let env =
        TwoNodes::start("source_ports_reused_after_a_backend_left_the_service_never_reach_it");
    let client = env.ns(CLIENT.0);
    let web = SocketAddr::from((WEB, 80));
    let ports: Vec<u16> = (42000..42200).collect();
    let mut reached_a = Vec::new();
    for &port in &ports {
        let from = SocketAddr::from((CLIENT.1, port));
        let body = get(client, Some(from), web).unwrap_or_else(|e| panic!("{port}: {e:#}"));
        if pod_of(&body) == Some(ECHO_A.0) {
            reached_a.push(port);
        }
    }
    assert!(
        reached_a.len() > 20,
        "random selection sent {} of 200 to echo-a",
        reached_a.len()
    );
    // echo-a leaves `web` but still serves `keep`.
    write_manifest(
        env.manifests.path(),
        "slices.yaml",
        &slices(&[(ECHO_C, "node-1")]),
    );
    env.agents.wait_until("web without echo-a", || {
        (0..20).all(|_| {
            get(client, None, web)
                .map(|b| pod_of(&b) == Some(ECHO_C.0))
                .unwrap_or(false)
        })
    });
    for &port in &reached_a {
        let from = SocketAddr::from((CLIENT.1, port));
        let body = get(client, Some(from), web).unwrap_or_else(|e| panic!("{port}: {e:#}"));
        assert_eq!(
            pod_of(&body),
            Some(ECHO_C.0),
            "port {port} reached the backend that left: {body}"
        );
    }
    // echo-a still serves the other service.
    let body = get(client, None, SocketAddr::from((KEEP, 80))).expect("keep");
    assert_eq!(pod_of(&body), Some(ECHO_A.0));
}
