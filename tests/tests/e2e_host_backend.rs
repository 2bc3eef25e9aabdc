//! Host-network backends end to end: a service whose endpoint is node-1's
//! own address (as the `kubernetes` service's API server endpoint on a
//! control-plane node, a hostNetwork ingress controller, node-local DNS),
//! served by a process in node-1's namespace. Reached through its
//! ClusterIP and its NodePort, from a pod on node-1 (the reply leaves the
//! node's own stack through the pod's device, translated by TC egress
//! there), from a pod on node-2 and from outside (the reply leaves through
//! node-1's device, translated by TC egress there), over both families,
//! under the topology's strict reverse-path filtering. The backend must see
//! the client's own address.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use lb_agent::datapath::KernelTables;
use lb_tests::{
    cluster::{NodeAgents, POD_TCP_PORT, POD_UDP_PORT, pod_ip6, write_manifest},
    lbctl_json, require_root,
};
use xtask::{
    Cluster, EchoServer, NetNs, TempDir, client_of, http_get, pod_of,
    topology::{cluster_node_ip, cluster_node_ip6},
    udp_request,
};

const CLIENT_1: (&str, Ipv4Addr, usize) = ("client-1", Ipv4Addr::new(10, 244, 1, 2), 1);
const CLIENT_2: (&str, Ipv4Addr, usize) = ("client-2", Ipv4Addr::new(10, 244, 2, 2), 2);
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x60);
const NODE_PORT: u16 = 30090;
/// The ClusterIP's (TCP, UDP) ports.
const CLUSTER_PORTS: (u16, u16) = (80, 53);
/// node-1's addresses (`xtask::topology::cluster_node_ip(1)` and its IPv6
/// twin), as the echo server binds them.
const NODE_1_IP: &str = "198.51.100.11";
const NODE_1_IP6: &str = "2001:db8:100::11";
/// The name the host's echo server answers with.
const HOST: &str = "host-node-1";
const TIMEOUT: Duration = Duration::from_secs(2);

/// One dual-stack NodePort service, TCP and UDP, whose endpoints are
/// node-1's own addresses.
fn service_manifests() -> String {
    let ports = format!(
        "[{{name: http, port: 80, targetPort: {POD_TCP_PORT}, nodePort: {NODE_PORT}, protocol: TCP}}, \
         {{name: dns, port: 53, targetPort: {POD_UDP_PORT}, nodePort: {NODE_PORT}, protocol: UDP}}]"
    );
    let endpoint_ports = format!(
        "[{{name: http, port: {POD_TCP_PORT}, protocol: TCP}}, \
         {{name: dns, port: {POD_UDP_PORT}, protocol: UDP}}]"
    );
    let slice = |family: &str, addr: IpAddr| {
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
             name: host-{family}\n  namespace: default\n  \
             labels: {{kubernetes.io/service-name: host}}\naddressType: {family}\n\
             ports: {endpoint_ports}\nendpoints:\n- addresses: [\"{addr}\"]\n  \
             conditions: {{ready: true, serving: true, terminating: false}}\n  nodeName: node-1\n"
        )
    };
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: host, namespace: default}}\nspec:\n  \
         type: NodePort\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  \
         clusterIP: {VIP4}\n  clusterIPs: [\"{VIP4}\", \"{VIP6}\"]\n  ports: {ports}\n{}{}",
        slice("IPv4", IpAddr::V4(cluster_node_ip(1))),
        slice("IPv6", IpAddr::V6(cluster_node_ip6(1))),
    )
}

struct HostBackend {
    cluster: Cluster,
    agents: NodeAgents,
    _manifests: TempDir,
    _server: EchoServer,
}

impl HostBackend {
    fn start(test: &str) -> Self {
        require_root(test);
        let mut cluster = Cluster::new(2).expect("two-node cluster");
        for (name, ip, node) in [CLIENT_1, CLIENT_2] {
            cluster.add_pod(node, name, ip).expect("pod");
        }
        // Bound to node-1's addresses, as host-network servers usually are:
        // a UDP answer of a wildcard socket would leave from the address
        // the route to the client prefers (a pod device's gateway), not the
        // one the client's datagram was translated to.
        let server = EchoServer::start_on(
            cluster.node(1).ns(),
            HOST,
            &[NODE_1_IP, NODE_1_IP6],
            &[POD_TCP_PORT],
            &[POD_UDP_PORT],
        )
        .expect("echo server in node-1's namespace");
        let manifests = TempDir::new("lbt", "manifests").expect("manifest dir");
        write_manifest(manifests.path(), "all.yaml", &service_manifests());
        let agents = NodeAgents::start(&cluster, manifests.path(), &[]);
        let me = Self {
            cluster,
            agents,
            _manifests: manifests,
            _server: server,
        };
        // Programmed on both nodes, NodePorts of both families included
        // (they follow the node's addresses).
        me.agents
            .wait_until("both agents programming the service", || {
                (1..=2).all(|k| {
                    KernelTables::open(me.agents.pins_of(k)).is_ok_and(|tables| {
                        let v4 = tables.dump_services().unwrap_or_default();
                        let v6 = tables.dump_services6().unwrap_or_default();
                        v4.iter().any(|(key, _)| {
                            key.addr == cluster_node_ip(k).octets() && key.port == NODE_PORT
                        }) && v6.iter().any(|(key, _)| {
                            key.addr == cluster_node_ip6(k).octets() && key.port == NODE_PORT
                        })
                    })
                })
            });
        me
    }

    fn ns(&self, pod: &str) -> &NetNs {
        self.cluster.pod(pod).expect("pod").ns()
    }

    /// The agents' logs and each node's non-zero counters, for failures.
    fn state(&self) -> String {
        let mut out = self.agents.logs();
        for k in 1..=2 {
            let stats = lbctl_json(self.agents.pins_of(k), &["stats"]);
            out.push_str(&format!("--- node-{k} stats: {stats}\n"));
        }
        out
    }

    /// One TCP request and one UDP datagram from `client` (a pod name, or
    /// the external client) to `addr`; both must be answered by the host's
    /// server, which must have seen `seen` as the client address.
    fn check(&self, what: &str, ns: &NetNs, ip: IpAddr, ports: (u16, u16), seen: IpAddr) {
        let (tcp_addr, udp_addr) = (SocketAddr::new(ip, ports.0), SocketAddr::new(ip, ports.1));
        let tcp = http_get(ns, tcp_addr, TIMEOUT)
            .unwrap_or_else(|e| panic!("{what}: TCP to {tcp_addr}: {e:#}\n{}", self.state()));
        let udp = udp_request(ns, udp_addr, b"hello", TIMEOUT)
            .unwrap_or_else(|e| panic!("{what}: UDP to {udp_addr}: {e:#}\n{}", self.state()));
        for (proto, answer) in [("TCP", &tcp), ("UDP", &udp)] {
            let addr = if proto == "TCP" { tcp_addr } else { udp_addr };
            assert_eq!(
                pod_of(answer),
                Some(HOST),
                "{what}: {proto} to {addr} answered by {answer:?}, not the host's server"
            );
            assert_eq!(
                client_of(answer).map(|a| a.ip()),
                Some(seen),
                "{what}: {proto} to {addr}: the host-network backend saw {answer:?}, not the \
                 client's own address {seen}"
            );
        }
    }
}

#[test]
fn a_host_network_backend_answers_pods_of_both_nodes_through_its_cluster_ip() {
    let t = HostBackend::start(
        "a_host_network_backend_answers_pods_of_both_nodes_through_its_cluster_ip",
    );
    for (name, ip, _) in [CLIENT_1, CLIENT_2] {
        let ns = t.ns(name);
        t.check(
            &format!("{name}, IPv4 ClusterIP"),
            ns,
            VIP4.into(),
            CLUSTER_PORTS,
            ip.into(),
        );
        t.check(
            &format!("{name}, IPv6 ClusterIP"),
            ns,
            VIP6.into(),
            CLUSTER_PORTS,
            pod_ip6(&t.cluster, name).into(),
        );
    }
}

#[test]
fn a_host_network_backend_answers_through_its_node_port() {
    let t = HostBackend::start("a_host_network_backend_answers_through_its_node_port");
    // node-1's own address from both nodes' pods (the reply leaves node-1
    // through a pod device for client-1, through eth0 for client-2), and
    // node-2's address from its pod (balanced on node-2, answered by
    // node-1's stack across the underlay).
    let targets: [(&str, usize, usize); 3] =
        [(CLIENT_1.0, 1, 1), (CLIENT_2.0, 2, 1), (CLIENT_2.0, 2, 2)];
    for (name, _, node) in targets {
        let ns = t.ns(name);
        let pod = t.cluster.pod(name).expect("pod");
        t.check(
            &format!("{name}, IPv4 NodePort of node-{node}"),
            ns,
            cluster_node_ip(node).into(),
            (NODE_PORT, NODE_PORT),
            pod.ip().into(),
        );
        t.check(
            &format!("{name}, IPv6 NodePort of node-{node}"),
            ns,
            cluster_node_ip6(node).into(),
            (NODE_PORT, NODE_PORT),
            pod_ip6(&t.cluster, name).into(),
        );
    }
    // From outside the cluster.
    let ext = t.cluster.external();
    t.check(
        "external client, IPv4 NodePort of node-1",
        ext,
        cluster_node_ip(1).into(),
        (NODE_PORT, NODE_PORT),
        t.cluster.external_ip().into(),
    );
    t.check(
        "external client, IPv6 NodePort of node-1",
        ext,
        cluster_node_ip6(1).into(),
        (NODE_PORT, NODE_PORT),
        t.cluster.external_ip6().into(),
    );
}
