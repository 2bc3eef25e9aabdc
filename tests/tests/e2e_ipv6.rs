//! IPv6 end to end: the dual-stack two-node cluster (see
//! xtask::topology), one agent per node, pods and the external client
//! talking over IPv6 with real sockets to IPv6 and dual-stack services:
//! ClusterIPs across nodes (TCP and UDP), both addresses of a dual-stack
//! service, NodePorts, LoadBalancer addresses and externalIPs from outside
//! with both traffic policies and source ranges, the reject of a service
//! without endpoints, session affinity, and a pod reaching itself through
//! its service (hairpin).

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpStream, UdpSocket},
    time::Duration,
};

use lb_common::{HAIRPIN_ADDR6, stats::Reason};
use lb_tests::{
    cluster::{NodeAgents, dual_stack_echo_servers, pod_ip6, write_manifest},
    require_root,
};
use xtask::{Cluster, EchoServer, NetNs, TempDir, client_of, http_get, pod_of, udp_request};

/// Pods: (name, IPv4 address, node). Their IPv6 addresses are the
/// topology's mirrors (`10.244.1.11` -> `fd00:10:244:1::11`).
const ECHO_A: (&str, Ipv4Addr, usize) = ("echo-a", Ipv4Addr::new(10, 244, 1, 11), 1);
const ECHO_B: (&str, Ipv4Addr, usize) = ("echo-b", Ipv4Addr::new(10, 244, 2, 11), 2);
const CLIENT_1: (&str, Ipv4Addr, usize) = ("client-1", Ipv4Addr::new(10, 244, 1, 2), 1);
const CLIENT_2: (&str, Ipv4Addr, usize) = ("client-2", Ipv4Addr::new(10, 244, 2, 2), 2);

/// IPv6 ClusterIPs, inside the topology's service range fd00:10:96::/112.
const ECHO6: Ipv6Addr = vip6(0x10);
const DUAL6: Ipv6Addr = vip6(0x11);
const DUAL4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const LOCAL6: Ipv6Addr = vip6(0x12);
const REMOTE6: Ipv6Addr = vip6(0x13);
const EMPTY6: Ipv6Addr = vip6(0x14);
const STICKY6: Ipv6Addr = vip6(0x15);
const SELF6: Ipv6Addr = vip6(0x16);
const LB_LOCAL6: Ipv6Addr = vip6(0x17);
const EXTERNAL6: Ipv6Addr = vip6(0x18);
const LB_ALLOW6: Ipv6Addr = vip6(0x19);
const LB_DENY6: Ipv6Addr = vip6(0x1a);
const NODE_PORT_LOCAL: u16 = 30081;
const NODE_PORT_REMOTE: u16 = 30080;
/// Addresses outside the cluster that the external client routes to a
/// node (LoadBalancer ingress and externalIPs, documentation prefix).
const LB_LOCAL_IP: Ipv6Addr = outside6(0x10);
const EXTERNAL_IP: Ipv6Addr = outside6(0x20);
const LB_ALLOW_IP: Ipv6Addr = outside6(0x30);
const LB_DENY_IP: Ipv6Addr = outside6(0x31);
const TIMEOUT: Duration = Duration::from_secs(2);

const fn vip6(last: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, last)
}

const fn outside6(last: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0x203, 0, 0, 0, 0, last)
}

const HTTP_DNS: &str = "[{name: http, port: 80, targetPort: 8080, protocol: TCP}, \
                        {name: dns, port: 53, targetPort: 5353, protocol: UDP}]";
const HTTP_DNS_EP: &str =
    "[{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]";

/// A Service `name`: `extra` (indented spec lines) and the HTTP/DNS ports.
fn service(name: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n\
         {extra}  ports: {HTTP_DNS}\n"
    )
}

/// An IPv6-only ClusterIP service spec at `vip` (with `extra` lines).
fn v6_only(vip: Ipv6Addr, extra: &str) -> String {
    format!("  clusterIP: {vip}\n  clusterIPs: [\"{vip}\"]\n  ipFamilies: [IPv6]\n{extra}")
}

/// An EndpointSlice `name` of `service` in `family` (`IPv4`, `IPv6`) with
/// the given pods, each at its address of that family, on its node.
fn slice(
    service: &str,
    name: &str,
    family: &str,
    pods: &[(&str, Ipv4Addr, usize)],
    cluster: &Cluster,
) -> String {
    let mut yaml = format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
         namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\n\
         addressType: {family}\nports: {HTTP_DNS_EP}\nendpoints:\n"
    );
    for (pod, ip, node) in pods {
        let addr: IpAddr = if family == "IPv6" {
            pod_ip6(cluster, pod).into()
        } else {
            (*ip).into()
        };
        yaml.push_str(&format!(
            "- addresses: [\"{addr}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  \
             nodeName: node-{node}\n  targetRef: {{kind: Pod, namespace: default, name: {pod}}}\n"
        ));
    }
    yaml
}

/// Every service of this file, with its slices.
fn all_manifests(cluster: &Cluster) -> String {
    let both = [ECHO_A, ECHO_B];
    let dual = format!(
        "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: {DUAL4}\n  \
         clusterIPs: [\"{DUAL4}\", \"{DUAL6}\"]\n"
    );
    let node_port = |port: u16, policy: &str| {
        format!(
            "  type: NodePort\n  externalTrafficPolicy: {policy}\n  ports: [{{name: http, port: 80, \
             targetPort: 8080, nodePort: {port}, protocol: TCP}}]\n"
        )
    };
    let sticky =
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n";
    let load_balancer = |port: u16, extra: &str, ingress: Ipv6Addr| {
        format!(
            "  type: LoadBalancer\n{extra}  ports: [{{name: http, port: 80, targetPort: 8080, \
             nodePort: {port}, protocol: TCP}}]\nstatus:\n  loadBalancer:\n    ingress: \
             [{{ip: \"{ingress}\"}}]\n"
        )
    };
    let ext = cluster.external_ip6();
    let external_ips = format!("  externalIPs: [\"{EXTERNAL_IP}\"]\n");
    [
        service("echo6", &v6_only(ECHO6, "")),
        slice("echo6", "echo6-1", "IPv6", &both, cluster),
        service("dual", &dual),
        slice("dual", "dual-v4", "IPv4", &both, cluster),
        slice("dual", "dual-v6", "IPv6", &both, cluster),
        // NodePort services carry their own ports line (a later `ports`
        // key would win in YAML, so these are written whole).
        node_port_service("local6", LOCAL6, &node_port(NODE_PORT_LOCAL, "Local")),
        slice("local6", "local6-1", "IPv6", &[ECHO_A], cluster),
        node_port_service("remote6", REMOTE6, &node_port(NODE_PORT_REMOTE, "Cluster")),
        slice("remote6", "remote6-1", "IPv6", &[ECHO_B], cluster),
        service("empty6", &v6_only(EMPTY6, "")),
        service("sticky6", &v6_only(STICKY6, sticky)),
        slice("sticky6", "sticky6-1", "IPv6", &both, cluster),
        service("self6", &v6_only(SELF6, "")),
        slice("self6", "self6-1", "IPv6", &[ECHO_A], cluster),
        node_port_service(
            "lb-local6",
            LB_LOCAL6,
            &load_balancer(30082, "  externalTrafficPolicy: Local\n", LB_LOCAL_IP),
        ),
        slice("lb-local6", "lb-local6-1", "IPv6", &[ECHO_A], cluster),
        service("ext6", &v6_only(EXTERNAL6, &external_ips)),
        slice("ext6", "ext6-1", "IPv6", &both, cluster),
        node_port_service(
            "lb-allow6",
            LB_ALLOW6,
            &load_balancer(
                30083,
                &format!("  loadBalancerSourceRanges: [\"{ext}/128\"]\n"),
                LB_ALLOW_IP,
            ),
        ),
        slice("lb-allow6", "lb-allow6-1", "IPv6", &[ECHO_A], cluster),
        node_port_service(
            "lb-deny6",
            LB_DENY6,
            &load_balancer(
                30084,
                "  loadBalancerSourceRanges: [\"2001:db8:ffff::/48\"]\n",
                LB_DENY_IP,
            ),
        ),
        slice("lb-deny6", "lb-deny6-1", "IPv6", &[ECHO_A], cluster),
    ]
    .concat()
}

fn node_port_service(name: &str, vip: Ipv6Addr, spec: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n\
         {}{spec}",
        v6_only(vip, "")
    )
}

struct DualStack {
    cluster: Cluster,
    agents: NodeAgents,
    _manifests: TempDir,
    servers: Vec<EchoServer>,
}

impl DualStack {
    /// The cluster, echo servers (both families) on echo-a and echo-b, the
    /// agents, and a bounded wait until the IPv6 ClusterIP answers on both
    /// nodes.
    fn start(test: &str) -> Self {
        require_root(test);
        let mut cluster = Cluster::new(2).expect("two-node cluster");
        for (name, ip, node) in [ECHO_A, ECHO_B, CLIENT_1, CLIENT_2] {
            cluster.add_pod(node, name, ip).expect("pod");
        }
        // The router in front of the cluster: LoadBalancer addresses to
        // node-1, the externalIP to node-2.
        for (ip, node) in [
            (LB_LOCAL_IP, 1),
            (LB_ALLOW_IP, 1),
            (LB_DENY_IP, 1),
            (EXTERNAL_IP, 2),
        ] {
            cluster
                .route_via(&format!("{ip}/128"), node)
                .expect("route");
        }
        let servers = dual_stack_echo_servers(&cluster, &[ECHO_A.0, ECHO_B.0]);
        let manifests = TempDir::new("lbt", "manifests").expect("manifest dir");
        write_manifest(manifests.path(), "all.yaml", &all_manifests(&cluster));
        let agents = NodeAgents::start(&cluster, manifests.path(), &[]);
        let me = Self {
            cluster,
            agents,
            _manifests: manifests,
            servers,
        };
        for client in [CLIENT_1.0, CLIENT_2.0] {
            me.agents
                .wait_until(&format!("{client} reaching [{ECHO6}]:80"), || {
                    http_get(me.ns(client), v6(ECHO6, 80), TIMEOUT).is_ok()
                });
        }
        me
    }

    /// Packets node `k`'s datapath counted under `reason`.
    fn drops(&self, k: usize, reason: Reason) -> u64 {
        self.agents
            .tables(k)
            .stats
            .get(reason)
            .expect("stats")
            .packets
    }

    /// The external client's namespace and IPv6 address.
    fn outside(&self) -> (&NetNs, IpAddr) {
        let ip = IpAddr::V6(self.cluster.external_ip6());
        (self.cluster.external(), ip)
    }

    fn ns(&self, pod: &str) -> &NetNs {
        self.cluster.pod(pod).expect("pod").ns()
    }

    fn ip6(&self, pod: &str) -> Ipv6Addr {
        pod_ip6(&self.cluster, pod)
    }

    fn server(&self, pod: &str) -> &EchoServer {
        self.servers
            .iter()
            .find(|s| s.pod_name() == pod)
            .unwrap_or_else(|| panic!("no echo server for {pod}"))
    }
}

fn v6(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddrV6::new(ip, port, 0, 0).into()
}

/// (pod, client address it saw) of one answer.
fn parse(reply: &str) -> (String, IpAddr) {
    let pod = pod_of(reply).unwrap_or_else(|| panic!("no pod in {reply:?}"));
    let client = client_of(reply).unwrap_or_else(|| panic!("no client in {reply:?}"));
    (pod.to_owned(), client.ip())
}

/// Sends up to `max` requests with `send` until both echo pods answered
/// `min_each` times; every answer must show `client` as the peer address.
/// Returns the answers per pod.
fn spread_both(
    max: usize,
    min_each: usize,
    client: IpAddr,
    mut send: impl FnMut() -> anyhow::Result<String>,
) -> BTreeMap<String, usize> {
    let mut answers = BTreeMap::new();
    for _ in 0..max {
        let reply = send().unwrap_or_else(|e| panic!("request failed: {e:#}"));
        let (pod, seen) = parse(&reply);
        assert_eq!(seen, client, "{pod} saw the wrong client address");
        *answers.entry(pod).or_insert(0) += 1;
        if [ECHO_A.0, ECHO_B.0]
            .iter()
            .all(|p| answers.get(*p).copied().unwrap_or(0) >= min_each)
        {
            break;
        }
    }
    answers
}

fn assert_both(answers: &BTreeMap<String, usize>, min_each: usize, what: &str) {
    for pod in [ECHO_A.0, ECHO_B.0] {
        assert!(
            answers.get(pod).copied().unwrap_or(0) >= min_each,
            "{what}: {pod} answered too rarely: {answers:?}"
        );
    }
}

#[test]
fn ipv6_cluster_ip_reaches_backends_on_both_nodes_over_tcp_and_udp() {
    let env = DualStack::start("ipv6_cluster_ip_reaches_backends_on_both_nodes_over_tcp_and_udp");
    for client in [CLIENT_1.0, CLIENT_2.0] {
        let ns = env.ns(client);
        let me = IpAddr::V6(env.ip6(client));
        let tcp = spread_both(200, 3, me, || http_get(ns, v6(ECHO6, 80), TIMEOUT));
        assert_both(&tcp, 3, &format!("TCP from {client}"));
        let udp = spread_both(200, 3, me, || {
            udp_request(ns, v6(ECHO6, 53), b"query", TIMEOUT)
        });
        assert_both(&udp, 3, &format!("UDP from {client}"));
    }
    // The answers crossed the datapath to real sockets on both pods.
    for pod in [ECHO_A.0, ECHO_B.0] {
        assert!(env.server(pod).tcp_served() >= 6, "{pod}: TCP");
        assert!(env.server(pod).udp_served() >= 6, "{pod}: UDP");
    }
}

#[test]
fn a_dual_stack_service_answers_on_both_cluster_ips() {
    let env = DualStack::start("a_dual_stack_service_answers_on_both_cluster_ips");
    let ns = env.ns(CLIENT_1.0);
    let four = spread_both(200, 3, IpAddr::V4(CLIENT_1.1), || {
        http_get(ns, std::net::SocketAddrV4::new(DUAL4, 80), TIMEOUT)
    });
    assert_both(&four, 3, "IPv4 ClusterIP");
    let six = spread_both(200, 3, IpAddr::V6(env.ip6(CLIENT_1.0)), || {
        http_get(ns, v6(DUAL6, 80), TIMEOUT)
    });
    assert_both(&six, 3, "IPv6 ClusterIP");
}

#[test]
fn ipv6_node_ports_keep_the_client_with_local_policy_and_snat_to_a_remote_backend() {
    let env = DualStack::start(
        "ipv6_node_ports_keep_the_client_with_local_policy_and_snat_to_a_remote_backend",
    );
    let (ext, ext_ip) = env.outside();
    let node1 = env.cluster.node_ip6(1);
    env.agents.wait_until("IPv6 NodePorts answering", || {
        http_get(ext, v6(node1, NODE_PORT_LOCAL), TIMEOUT).is_ok()
            && http_get(ext, v6(node1, NODE_PORT_REMOTE), TIMEOUT).is_ok()
    });
    // Local: node-1's own backend, and it sees the external client.
    for _ in 0..5 {
        let reply = http_get(ext, v6(node1, NODE_PORT_LOCAL), TIMEOUT).expect("Local NodePort");
        assert_eq!(parse(&reply), (ECHO_A.0.to_owned(), ext_ip), "{reply}");
    }
    // Node-2 has no local endpoint for it: refused, not forwarded.
    let node2 = env.cluster.node_ip6(2);
    let refused = http_get(ext, v6(node2, NODE_PORT_LOCAL), TIMEOUT);
    assert!(
        refused.is_err(),
        "node-2 served a Local NodePort: {refused:?}"
    );
    // Cluster, backend only on node-2: SNAT to node-1's IPv6 address, so
    // the reply comes back through node-1.
    for _ in 0..5 {
        let reply = http_get(ext, v6(node1, NODE_PORT_REMOTE), TIMEOUT).expect("Cluster NodePort");
        assert_eq!(
            parse(&reply),
            (ECHO_B.0.to_owned(), IpAddr::V6(node1)),
            "{reply}"
        );
    }
}

#[test]
fn an_ipv6_service_without_endpoints_is_refused_at_once() {
    let env = DualStack::start("an_ipv6_service_without_endpoints_is_refused_at_once");
    let ns = env.ns(CLIENT_1.0);
    let tcp = ns
        .run(|| {
            TcpStream::connect_timeout(&v6(EMPTY6, 80), Duration::from_secs(3))
                .err()
                .map(|e| e.kind())
        })
        .expect("thread in namespace");
    assert_eq!(
        tcp,
        Some(ErrorKind::ConnectionRefused),
        "TCP to [{EMPTY6}]:80"
    );
    let udp = ns
        .run(|| -> std::io::Result<Option<ErrorKind>> {
            let socket = UdpSocket::bind("[::]:0")?;
            socket.connect(v6(EMPTY6, 53))?;
            socket.set_read_timeout(Some(Duration::from_secs(3)))?;
            socket.send(b"query")?;
            let mut buf = [0u8; 64];
            Ok(socket.recv(&mut buf).err().map(|e| e.kind()))
        })
        .expect("thread in namespace")
        .expect("socket");
    assert_eq!(
        udp,
        Some(ErrorKind::ConnectionRefused),
        "UDP to [{EMPTY6}]:53"
    );
}

#[test]
fn ipv6_session_affinity_sticks_per_client() {
    let env = DualStack::start("ipv6_session_affinity_sticks_per_client");
    // Without affinity both backends answer (so one pod only below is the
    // affinity, not a lone backend).
    let spread = spread_both(200, 1, IpAddr::V6(env.ip6(CLIENT_1.0)), || {
        http_get(env.ns(CLIENT_1.0), v6(ECHO6, 80), TIMEOUT)
    });
    assert_both(&spread, 1, "without affinity");
    for client in [CLIENT_1.0, CLIENT_2.0] {
        let ns = env.ns(client);
        let me = IpAddr::V6(env.ip6(client));
        let mut pods = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let reply = http_get(ns, v6(STICKY6, 80), TIMEOUT).expect("sticky request");
            let (pod, seen) = parse(&reply);
            assert_eq!(seen, me, "{reply}");
            pods.insert(pod);
        }
        assert_eq!(
            pods.len(),
            1,
            "affinity did not stick for {client}: {pods:?}"
        );
    }
}

#[test]
fn ipv6_load_balancer_and_external_ips_from_outside_keep_the_client_under_local_policy() {
    let env = DualStack::start(
        "ipv6_load_balancer_and_external_ips_from_outside_keep_the_client_under_local_policy",
    );
    let (ext, ext_ip) = env.outside();
    env.agents
        .wait_until("IPv6 LoadBalancer address answering", || {
            http_get(ext, v6(LB_LOCAL_IP, 80), TIMEOUT).is_ok()
        });
    // Local: node-1's own endpoint, which sees the external client.
    for _ in 0..5 {
        let reply = http_get(ext, v6(LB_LOCAL_IP, 80), TIMEOUT).expect("LoadBalancer address");
        assert_eq!(parse(&reply), (ECHO_A.0.to_owned(), ext_ip), "{reply}");
    }
    // The externalIP reaches node-2 (Cluster policy): both endpoints serve
    // it, node-1's through SNAT to node-2's address, node-2's own with the
    // client kept.
    let node2 = IpAddr::V6(env.cluster.node_ip6(2));
    let mut seen = BTreeMap::new();
    for _ in 0..200 {
        let reply = http_get(ext, v6(EXTERNAL_IP, 80), TIMEOUT).expect("externalIP");
        let (pod, client) = parse(&reply);
        let expected = if pod == ECHO_B.0 { ext_ip } else { node2 };
        assert_eq!(client, expected, "{pod} saw the wrong client: {reply}");
        *seen.entry(pod).or_insert(0) += 1;
        if seen.len() == 2 {
            break;
        }
    }
    assert_both(&seen, 1, "externalIP");
}

#[test]
fn ipv6_load_balancer_source_ranges_admit_only_their_clients() {
    let env = DualStack::start("ipv6_load_balancer_source_ranges_admit_only_their_clients");
    let (ext, ext_ip) = env.outside();
    env.agents
        .wait_until("allowed IPv6 LoadBalancer address answering", || {
            http_get(ext, v6(LB_ALLOW_IP, 80), TIMEOUT).is_ok()
        });
    let reply = http_get(ext, v6(LB_ALLOW_IP, 80), TIMEOUT).expect("allowed client");
    assert_eq!(parse(&reply), (ECHO_A.0.to_owned(), ext_ip), "{reply}");
    let before = env.drops(1, Reason::DropSourceRange);
    let denied = http_get(ext, v6(LB_DENY_IP, 80), Duration::from_millis(700));
    assert!(
        denied.is_err(),
        "a client outside the ranges got {denied:?}"
    );
    let after = env.drops(1, Reason::DropSourceRange);
    assert!(
        after > before,
        "the refused attempt was not dropped by the source ranges"
    );
    // The ranges restrict the LoadBalancer address, not the NodePort.
    let node1 = env.cluster.node_ip6(1);
    let reply = http_get(ext, v6(node1, 30084), TIMEOUT).expect("NodePort of a restricted service");
    assert_eq!(parse(&reply).0, ECHO_A.0, "{reply}");
}

#[test]
fn an_ipv6_pod_reaching_its_own_service_gets_its_replies_through_the_hairpin_address() {
    let env = DualStack::start(
        "an_ipv6_pod_reaching_its_own_service_gets_its_replies_through_the_hairpin_address",
    );
    let ns = env.ns(ECHO_A.0);
    for _ in 0..5 {
        let reply = http_get(ns, v6(SELF6, 80), TIMEOUT).expect("hairpin request");
        // The pod answered itself, and saw the request come from the
        // hairpin address (its own would never have left its stack).
        assert_eq!(
            parse(&reply),
            (
                ECHO_A.0.to_owned(),
                IpAddr::V6(Ipv6Addr::from_octets(HAIRPIN_ADDR6))
            ),
            "{reply}"
        );
    }
}

/// The IPv6 ClusterIP of `closed6`, whose endpoint (echo-a) listens on
/// neither of its target ports.
const CLOSED6: Ipv6Addr = vip6(0x1b);

/// Node 1's per-backend counters of the IPv6 backend `addr:port`/`proto`,
/// summed over the services that use it: (new flows, answered, failed).
fn backend_counters6(env: &DualStack, addr: Ipv6Addr, port: u16, proto: u8) -> (u64, u64, u64) {
    let tables = env.agents.tables(1);
    let ids: Vec<u32> = tables
        .dump_backends6()
        .expect("backends")
        .into_iter()
        .filter(|(_, b)| b.addr == addr.octets() && b.port == port && b.proto == proto)
        .map(|(id, _)| id)
        .collect();
    assert!(!ids.is_empty(), "no backend [{addr}]:{port}/{proto}");
    tables
        .dump_backend_stats()
        .expect("backend stats")
        .into_iter()
        .filter(|(key, _)| ids.contains(&key.backend_id))
        .fold((0, 0, 0), |(n, a, f), (_, s)| {
            (n + s.new_flows, a + s.answered, f + s.failed)
        })
}

#[test]
fn ipv6_backend_counters_count_answered_and_refused_attempts() {
    let env = DualStack::start("ipv6_backend_counters_count_answered_and_refused_attempts");
    let a6 = env.ip6(ECHO_A.0);
    write_manifest(
        env._manifests.path(),
        "closed6.yaml",
        &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: closed6, namespace: default}}\n\
             spec:\n{}  ports: [{{name: web, port: 80, targetPort: 9999, protocol: TCP}}, \
             {{name: dns, port: 53, targetPort: 9999, protocol: UDP}}]\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: closed6-1\n  \
             namespace: default\n  labels: {{kubernetes.io/service-name: closed6}}\n\
             addressType: IPv6\nports: [{{name: web, port: 9999, protocol: TCP}}, \
             {{name: dns, port: 9999, protocol: UDP}}]\nendpoints:\n\
             - addresses: [\"{a6}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  \
             nodeName: node-1\n",
            v6_only(CLOSED6, "")
        ),
    );
    env.agents.wait_until("closed6 programmed on node 1", || {
        env.agents.tables(1).dump_backends6().is_ok_and(|b| {
            b.iter()
                .any(|(_, b)| b.addr == a6.octets() && b.port == 9999)
        })
    });
    // The echo service's probes in start() were answered.
    let (new, answered, failed) = backend_counters6(&env, a6, 8080, lb_common::PROTO_TCP);
    let (new_b, answered_b, failed_b) =
        backend_counters6(&env, env.ip6(ECHO_B.0), 8080, lb_common::PROTO_TCP);
    assert!(new + new_b > 0, "new flows counted");
    assert_eq!((answered + answered_b, failed + failed_b), (new + new_b, 0));
    // Refused: three TCP connects (RST from echo-a's stack) and two
    // datagrams (ICMPv6 port unreachable), from the same node.
    let ns = env.ns(CLIENT_1.0);
    for _ in 0..3 {
        let result = ns
            .run(|| TcpStream::connect_timeout(&v6(CLOSED6, 80), TIMEOUT).map(|_| ()))
            .expect("run");
        let error = result.expect_err("port 9999 is closed");
        assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "{error}");
    }
    for _ in 0..2 {
        let answer = ns
            .run(|| -> std::io::Result<usize> {
                let socket = UdpSocket::bind("[::]:0")?;
                socket.connect(v6(CLOSED6, 53))?;
                socket.set_read_timeout(Some(TIMEOUT))?;
                socket.send(b"query")?;
                socket.recv(&mut [0u8; 64])
            })
            .expect("run");
        let error = answer.expect_err("port 9999 is closed");
        assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "{error}");
    }
    assert_eq!(
        backend_counters6(&env, a6, 9999, lb_common::PROTO_TCP),
        (3, 0, 3),
        "TCP to the closed port: (new, answered, failed)"
    );
    assert_eq!(
        backend_counters6(&env, a6, 9999, lb_common::PROTO_UDP),
        (2, 0, 2),
        "UDP to the closed port: (new, answered, failed)"
    );
}
