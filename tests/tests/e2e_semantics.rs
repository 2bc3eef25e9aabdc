//! The rest of the Service semantics end to end, in network namespaces with
//! real sockets: session affinity, named ports, internalTrafficPolicy,
//! terminating endpoints, topology hints, rejects, the UDP conntrack flush,
//! hairpin, and services that must not be proxied.

use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use lb_agent::datapath::KernelTables;
use lb_common::stats::Reason;
use lb_tests::cluster::{Cluster, write_manifest};
use xtask::{EchoServer, HoldConnection, NetNs, TempDir, http_get, pod_of, udp_request};

const TIMEOUT: Duration = Duration::from_secs(2);
const A: (&str, Ipv4Addr) = ("echo-a", Ipv4Addr::new(10, 244, 1, 11));
const B: (&str, Ipv4Addr) = ("echo-b", Ipv4Addr::new(10, 244, 1, 12));
const C: (&str, Ipv4Addr) = ("echo-c", Ipv4Addr::new(10, 244, 1, 13));

/// One endpoint of a slice.
#[derive(Clone, Copy)]
struct Ep {
    pod: (&'static str, Ipv4Addr),
    node: &'static str,
    ready: bool,
    terminating: bool,
    zone_hint: Option<&'static str>,
}

fn ep(pod: (&'static str, Ipv4Addr)) -> Ep {
    Ep {
        pod,
        node: "node-1",
        ready: true,
        terminating: false,
        zone_hint: None,
    }
}

fn service(name: &str, vip: Ipv4Addr, extra: &str, ports: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  \
         clusterIP: {vip}\n{extra}  ports: {ports}\n"
    )
}

/// An EndpointSlice of `service` with `ports` (YAML flow list) and endpoints.
fn slice(service: &str, name: &str, ports: &str, endpoints: &[Ep]) -> String {
    let mut yaml = format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
         namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\n\
         ports: {ports}\nendpoints:\n"
    );
    for e in endpoints {
        yaml.push_str(&format!(
            "- addresses: [\"{}\"]\n  conditions: {{ready: {}, serving: true, terminating: {}}}\n  \
             nodeName: {}\n  targetRef: {{kind: Pod, namespace: default, name: {}}}\n",
            e.pod.1, e.ready, e.terminating, e.node, e.pod.0
        ));
        if let Some(zone) = e.zone_hint {
            yaml.push_str(&format!("  hints: {{forZones: [{{name: {zone}}}]}}\n"));
        }
    }
    yaml
}

const NODE: &str = "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node-1\n  labels: {topology.kubernetes.io/zone: zone-a}\n";
const HTTP: &str = "[{name: http, port: 80, targetPort: 8080, protocol: TCP}]";
const HTTP_EP: &str = "[{name: http, port: 8080, protocol: TCP}]";

struct Env {
    cluster: Cluster,
    manifests: TempDir,
}

impl Env {
    fn start(test: &str, pods: &[(&str, Ipv4Addr)], manifests: &str) -> Env {
        let mut cluster = Cluster::new(test, pods);
        let dir = TempDir::new("lbt", "manifests").expect("manifest dir");
        write_manifest(dir.path(), "all.yaml", manifests);
        cluster.start_agent(&["--manifests".to_string(), dir.path().display().to_string()]);
        Env {
            cluster,
            manifests: dir,
        }
    }

    fn update(&self, manifests: &str) {
        write_manifest(self.manifests.path(), "all.yaml", manifests);
    }

    fn client(&self) -> &NetNs {
        self.cluster.client()
    }

    /// The pod that answers one HTTP request to `addr` from the client.
    fn who(&self, addr: SocketAddrV4) -> anyhow::Result<String> {
        let reply = http_get(self.client(), addr, TIMEOUT)?;
        pod_of(&reply)
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("no pod in {reply:?}"))
    }

    /// Pods that answered `n` requests to `addr`.
    fn pods_answering(&self, addr: SocketAddrV4, n: usize) -> BTreeSet<String> {
        (0..n)
            .map(|_| {
                self.who(addr)
                    .unwrap_or_else(|e| panic!("request to {addr}: {e:#}"))
            })
            .collect()
    }

    /// Waits (bounded) until `check` holds, re-evaluating it.
    fn eventually(&self, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !check() {
            assert!(
                Instant::now() < deadline,
                "{what}: not reached; agent log:\n{}",
                self.cluster.agent_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn count(&self, reason: Reason) -> u64 {
        KernelTables::open(self.cluster.pins.path())
            .and_then(|t| t.stats.get(reason))
            .map_or(0, |c| c.packets)
    }
}

fn addr(vip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(vip, port)
}

#[test]
fn session_affinity_sticks_for_cluster_ip_and_node_port_and_follows_the_manifest() {
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    let sticky = "  type: NodePort\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n";
    let ports = "[{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}]";
    let eps = [ep(A), ep(B), ep(C)];
    let manifests = |extra: &str| {
        format!(
            "{}{}{NODE}",
            service("sticky", vip, extra, ports),
            slice("sticky", "sticky-1", HTTP_EP, &eps)
        )
    };
    let env = Env::start(
        "session_affinity_sticks_for_cluster_ip_and_node_port_and_follows_the_manifest",
        &[A, B, C],
        &manifests(sticky),
    );
    env.cluster.wait_until_serving(addr(vip, 80));
    let pods = env.pods_answering(addr(vip, 80), 20);
    assert_eq!(pods.len(), 1, "ClusterIP affinity did not stick: {pods:?}");
    // The node's address is the pod gateway here (no node device).
    let node_port = addr(Ipv4Addr::new(10, 244, 1, 1), 30080);
    env.eventually("NodePort answering", || env.who(node_port).is_ok());
    let pods = env.pods_answering(node_port, 20);
    assert_eq!(pods.len(), 1, "NodePort affinity did not stick: {pods:?}");

    // Affinity off in the manifest: connections spread again.
    env.update(&manifests("  type: NodePort\n"));
    env.eventually("affinity switched off", || {
        env.pods_answering(addr(vip, 80), 20).len() > 1
    });
}

#[test]
fn named_target_ports_resolve_per_endpoint_and_tcp_and_udp_share_a_port_number() {
    let vip = Ipv4Addr::new(10, 96, 0, 11);
    let ports = "[{name: http, port: 80, targetPort: http, protocol: TCP}, {name: dns-tcp, port: 53, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]";
    let manifests = format!(
        "{}{}{}",
        service("named", vip, "", ports),
        // echo-a names port 80 "http", echo-b names port 81 "http".
        slice(
            "named",
            "named-a",
            "[{name: http, port: 80}, {name: dns-tcp, port: 8080}, {name: dns, port: 5353, protocol: UDP}]",
            &[ep(A)]
        ),
        slice(
            "named",
            "named-b",
            "[{name: http, port: 81}, {name: dns-tcp, port: 8080}, {name: dns, port: 5353, protocol: UDP}]",
            &[ep(B)]
        ),
    );
    let env = Env::start(
        "named_target_ports_resolve_per_endpoint_and_tcp_and_udp_share_a_port_number",
        &[A, B],
        &manifests,
    );
    let _a80 = EchoServer::start(
        env.cluster.topology.pod(A.0).expect("pod").ns(),
        A.0,
        &[80],
        &[],
    )
    .expect("server on 80");
    let _b81 = EchoServer::start(
        env.cluster.topology.pod(B.0).expect("pod").ns(),
        B.0,
        &[81],
        &[],
    )
    .expect("server on 81");
    env.cluster.wait_until_serving(addr(vip, 80));
    let pods = env.pods_answering(addr(vip, 80), 40);
    assert_eq!(
        pods,
        BTreeSet::from(["echo-a".to_string(), "echo-b".to_string()]),
        "named port"
    );
    // 53/TCP and 53/UDP are two frontends with their own targets.
    assert!(env.who(addr(vip, 53)).is_ok(), "53/TCP");
    let reply = udp_request(env.client(), addr(vip, 53), b"q", TIMEOUT).expect("53/UDP");
    assert!(pod_of(&reply).is_some(), "{reply}");
}

#[test]
fn internal_traffic_policy_local_uses_only_this_nodes_endpoints() {
    let vip = Ipv4Addr::new(10, 96, 0, 12);
    let itp = "  internalTrafficPolicy: Local\n";
    // echo-b "runs" on node-2 (it is reachable, but not local to node-1).
    let remote_b = Ep {
        node: "node-2",
        ..ep(B)
    };
    let with_local = format!(
        "{}{}",
        service("itp", vip, itp, HTTP),
        slice("itp", "itp-1", HTTP_EP, &[ep(A), remote_b])
    );
    let env = Env::start(
        "internal_traffic_policy_local_uses_only_this_nodes_endpoints",
        &[A, B],
        &with_local,
    );
    env.cluster.wait_until_serving(addr(vip, 80));
    assert_eq!(
        env.pods_answering(addr(vip, 80), 20),
        BTreeSet::from(["echo-a".to_string()])
    );

    let before = env.count(Reason::DropNoLocalBackend);
    env.update(&format!(
        "{}{}",
        service("itp", vip, itp, HTTP),
        slice("itp", "itp-1", HTTP_EP, &[remote_b])
    ));
    env.eventually("no local endpoint left", || {
        http_get(env.client(), addr(vip, 80), Duration::from_millis(300)).is_err()
    });
    assert!(
        env.count(Reason::DropNoLocalBackend) > before,
        "drop not counted"
    );
}

#[test]
fn terminating_endpoints_serve_only_as_a_fallback_and_keep_their_connections() {
    let vip = Ipv4Addr::new(10, 96, 0, 13);
    let manifests = |eps: &[Ep]| {
        format!(
            "{}{}",
            service("term", vip, "", HTTP),
            slice("term", "term-1", HTTP_EP, eps)
        )
    };
    let env = Env::start(
        "terminating_endpoints_serve_only_as_a_fallback_and_keep_their_connections",
        &[A, B],
        &manifests(&[ep(A)]),
    );
    env.cluster.wait_until_serving(addr(vip, 80));
    let mut held = HoldConnection::open(env.client(), addr(vip, 80), TIMEOUT).expect("hold");
    assert_eq!(pod_of(&held.ask().expect("ask")), Some(A.0));

    // echo-a starts terminating while echo-b is ready: new connections go
    // to echo-b only; the held one stays on echo-a.
    let terminating_a = Ep {
        ready: false,
        terminating: true,
        ..ep(A)
    };
    env.update(&manifests(&[terminating_a, ep(B)]));
    env.eventually("new connections on echo-b only", || {
        env.pods_answering(addr(vip, 80), 10) == BTreeSet::from(["echo-b".to_string()])
    });
    assert_eq!(pod_of(&held.ask().expect("held connection")), Some(A.0));

    // Only terminating endpoints left: they serve as the fallback.
    let terminating_b = Ep {
        ready: false,
        terminating: true,
        ..ep(B)
    };
    env.update(&manifests(&[terminating_a, terminating_b]));
    env.eventually("fallback to terminating endpoints", || {
        env.pods_answering(addr(vip, 80), 20).len() == 2
    });
    assert_eq!(pod_of(&held.ask().expect("held connection")), Some(A.0));
}

#[test]
fn topology_hints_keep_traffic_in_the_zone() {
    let vip = Ipv4Addr::new(10, 96, 0, 14);
    let extra = "  trafficDistribution: PreferClose\n";
    let hinted = |zone_b: &'static str| {
        format!(
            "{}{}{NODE}",
            service("topo", vip, extra, HTTP),
            slice(
                "topo",
                "topo-1",
                HTTP_EP,
                &[
                    Ep {
                        zone_hint: Some("zone-a"),
                        ..ep(A)
                    },
                    Ep {
                        zone_hint: Some(zone_b),
                        ..ep(B)
                    },
                    Ep {
                        zone_hint: Some("zone-b"),
                        ..ep(C)
                    },
                ]
            )
        )
    };
    let env = Env::start(
        "topology_hints_keep_traffic_in_the_zone",
        &[A, B, C],
        &hinted("zone-b"),
    );
    env.cluster.wait_until_serving(addr(vip, 80));
    assert_eq!(
        env.pods_answering(addr(vip, 80), 20),
        BTreeSet::from(["echo-a".to_string()])
    );
    env.update(&hinted("zone-a"));
    env.eventually("echo-b joins zone-a", || {
        env.pods_answering(addr(vip, 80), 30).len() == 2
    });
}

/// Connects from `ns` to `addr`; how fast and how it failed.
fn connect_result(ns: &NetNs, addr: SocketAddrV4) -> (Duration, Option<ErrorKind>) {
    ns.run(move || {
        let started = Instant::now();
        let result = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(3));
        (started.elapsed(), result.err().map(|e| e.kind()))
    })
    .expect("thread in namespace")
}

#[test]
fn services_without_endpoints_and_undefined_ports_are_refused_at_once() {
    let vip = Ipv4Addr::new(10, 96, 0, 15);
    let empty = Ipv4Addr::new(10, 96, 0, 16);
    let manifests = format!(
        "{}{}{}",
        service("full", vip, "", HTTP),
        slice("full", "full-1", HTTP_EP, &[ep(A)]),
        service(
            "empty",
            empty,
            "",
            "[{name: http, port: 80, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]"
        ),
    );
    let env = Env::start(
        "services_without_endpoints_and_undefined_ports_are_refused_at_once",
        &[A],
        &manifests,
    );
    env.cluster.wait_until_serving(addr(vip, 80));
    for target in [addr(empty, 80), addr(vip, 8443)] {
        let (took, error) = connect_result(env.client(), target);
        assert_eq!(
            error,
            Some(ErrorKind::ConnectionRefused),
            "{target}: {error:?}"
        );
        assert!(
            took < Duration::from_secs(1),
            "{target}: refused only after {took:?}"
        );
    }
    // UDP: the ICMP error reaches the connected socket.
    let error = env
        .client()
        .run(move || {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(addr(empty, 53))?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            socket.send(b"query")?;
            let mut buf = [0u8; 64];
            Ok::<_, std::io::Error>(socket.recv(&mut buf).err().map(|e| e.kind()))
        })
        .expect("thread")
        .expect("socket");
    assert_eq!(error, Some(ErrorKind::ConnectionRefused), "UDP not refused");
}

#[test]
fn udp_clients_of_a_removed_backend_move_within_a_second() {
    let vip = Ipv4Addr::new(10, 96, 0, 17);
    let dns = "[{name: dns, port: 53, targetPort: 5353, protocol: UDP}]";
    let dns_ep = "[{name: dns, port: 5353, protocol: UDP}]";
    let manifests = |eps: &[Ep]| {
        format!(
            "{}{}",
            service("dns", vip, "", dns),
            slice("dns", "dns-1", dns_ep, eps)
        )
    };
    let env = Env::start(
        "udp_clients_of_a_removed_backend_move_within_a_second",
        &[A, B],
        &manifests(&[ep(A), ep(B)]),
    );
    env.eventually("dns answering", || {
        udp_request(env.client(), addr(vip, 53), b"q", TIMEOUT).is_ok()
    });
    // One socket, one source port, for the whole test.
    let socket = env
        .client()
        .run(|| {
            let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
            socket
                .set_read_timeout(Some(Duration::from_millis(300)))
                .expect("timeout");
            socket
        })
        .expect("thread");
    let ask = |socket: &UdpSocket| -> Option<String> {
        socket.send_to(b"q", addr(vip, 53)).ok()?;
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).ok()?;
        pod_of(&String::from_utf8_lossy(&buf[..n])).map(str::to_string)
    };
    let first = ask(&socket).expect("first answer");
    let stays = if first == A.0 { ep(B) } else { ep(A) };
    env.update(&manifests(&[stays]));
    let removed_at = Instant::now();
    let mut moved = None;
    while removed_at.elapsed() < Duration::from_secs(10) {
        if let Some(pod) = ask(&socket)
            && pod != first
        {
            moved = Some(removed_at.elapsed());
            break;
        }
    }
    let moved = moved.unwrap_or_else(|| {
        panic!(
            "the UDP client stayed on {first}; log:\n{}",
            env.cluster.agent_log()
        )
    });
    // The manifest poll (250 ms) plus programming must fit in a second.
    assert!(moved < Duration::from_secs(1), "moved only after {moved:?}");
}

#[test]
fn a_pod_reaching_its_own_service_gets_its_replies() {
    let vip = Ipv4Addr::new(10, 96, 0, 18);
    let manifests = format!(
        "{}{}",
        service("self", vip, "", HTTP),
        slice("self", "self-1", HTTP_EP, &[ep(A)])
    );
    let env = Env::start(
        "a_pod_reaching_its_own_service_gets_its_replies",
        &[A],
        &manifests,
    );
    env.cluster.wait_until_serving(addr(vip, 80));
    let pod = env.cluster.topology.pod(A.0).expect("pod");
    for _ in 0..5 {
        let reply = http_get(pod.ns(), addr(vip, 80), TIMEOUT).expect("hairpin request");
        assert_eq!(pod_of(&reply), Some(A.0), "{reply}");
    }
}

#[test]
fn unproxied_services_and_type_changes_take_effect_without_a_restart() {
    let vip = Ipv4Addr::new(10, 96, 0, 19);
    let node_port = addr(Ipv4Addr::new(10, 244, 1, 1), 30090);
    let ports = "[{name: http, port: 80, targetPort: 8080, nodePort: 30090, protocol: TCP}]";
    let eps = slice("kind", "kind-1", HTTP_EP, &[ep(A)]);
    let with = |extra: &str| format!("{}{eps}", service("kind", vip, extra, ports));
    let env = Env::start(
        "unproxied_services_and_type_changes_take_effect_without_a_restart",
        &[A],
        &with("  type: ClusterIP\n"),
    );
    env.cluster.wait_until_serving(addr(vip, 80));
    let answers = |a: SocketAddrV4| http_get(env.client(), a, Duration::from_millis(500)).is_ok();
    assert!(!answers(node_port), "NodePort open on a ClusterIP service");
    env.update(&with("  type: NodePort\n"));
    env.eventually("NodePort opened", || answers(node_port));
    env.update(&with("  type: LoadBalancer\n"));
    env.eventually("still served as LoadBalancer", || {
        answers(node_port) && answers(addr(vip, 80))
    });
    env.update(&with("  type: ClusterIP\n"));
    env.eventually("NodePort closed again", || !answers(node_port));
    // ExternalName and a foreign proxy's label: no longer proxied.
    env.update(&with(
        "  type: ExternalName\n  externalName: example.invalid\n",
    ));
    env.eventually("an ExternalName service is dropped", || {
        env.cluster.programmed_backends(vip, 80).is_none()
    });
    env.update(&with("  type: ClusterIP\n"));
    env.eventually("served again", || answers(addr(vip, 80)));
    let labelled = with("  type: ClusterIP\n").replace(
        "metadata: {name: kind, namespace: default}",
        "metadata: {name: kind, namespace: default, labels: {service.kubernetes.io/service-proxy-name: other}}",
    );
    env.update(&labelled);
    env.eventually("a service of another proxy is dropped", || {
        env.cluster.programmed_backends(vip, 80).is_none()
    });
}
