//! Fragmented UDP end to end: the dual-stack two-node cluster, one agent
//! per node, a 3,000-byte datagram (three fragments on 1,500-byte links)
//! through UDP ClusterIPs and a UDP NodePort, both families, answered by
//! the echo server with a datagram as large (fragmented on the way back
//! too). Every fragment of both datagrams must be translated: the first
//! alone carries the ports, the others only the addresses.
//!
//! Paths covered: ClusterIP to a pod of the same node (TC on the client's
//! and the backend's pod devices), ClusterIP to a pod of the other node (TC
//! on the client's device; the reply through XDP on the client's node),
//! NodePort from outside to a pod of the other node (XDP with SNAT, the
//! reply through XDP on the same node).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use lb_common::stats::Reason;
use lb_tests::{
    cluster::{NodeAgents, dual_stack_echo_servers, pod_ip6, write_manifest},
    require_root,
};
use xtask::{Cluster, ECHO_PREFIX, EchoServer, NetNs, TempDir, client_of, pod_of, udp_request};

const ECHO_A: (&str, Ipv4Addr, usize) = ("echo-a", Ipv4Addr::new(10, 244, 1, 11), 1);
const ECHO_B: (&str, Ipv4Addr, usize) = ("echo-b", Ipv4Addr::new(10, 244, 2, 11), 2);
const CLIENT: (&str, Ipv4Addr, usize) = ("client", Ipv4Addr::new(10, 244, 1, 2), 1);
const LOCAL4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);
const LOCAL6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x60);
const REMOTE4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 61);
const REMOTE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x61);
const NP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 62);
const NP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x62);
const DNS: u16 = 53;
const NODE_PORT: u16 = 30053;
const TIMEOUT: Duration = Duration::from_secs(2);
/// The datagram's size: more than two 1,500-byte frames can carry.
const DATAGRAM: usize = 3000;

/// A dual-stack UDP service `name` at (`v4`, `v6`) with `extra` spec lines.
fn service(name: &str, (v4, v6): (Ipv4Addr, Ipv6Addr), extra: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n\
         {extra}  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: {v4}\n  \
         clusterIPs: [\"{v4}\", \"{v6}\"]\n  ports: [{{name: dns, port: {DNS}, targetPort: 5353, \
         protocol: UDP{}}}]\n",
        if extra.contains("NodePort") {
            format!(", nodePort: {NODE_PORT}")
        } else {
            String::new()
        }
    )
}

/// The IPv4 and IPv6 EndpointSlices of `service` with one pod.
fn slices(service: &str, (pod, ip, node): (&str, Ipv4Addr, usize), cluster: &Cluster) -> String {
    let mut yaml = String::new();
    for (family, addr) in [
        ("IPv4", IpAddr::V4(ip)),
        ("IPv6", IpAddr::V6(pod_ip6(cluster, pod))),
    ] {
        yaml.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
             name: {service}-{family}\n  namespace: default\n  labels: \
             {{kubernetes.io/service-name: {service}}}\naddressType: {family}\nports: \
             [{{name: dns, port: 5353, protocol: UDP}}]\nendpoints:\n- addresses: [\"{addr}\"]\n  \
             conditions: {{ready: true, serving: true, terminating: false}}\n  nodeName: \
             node-{node}\n  targetRef: {{kind: Pod, namespace: default, name: {pod}}}\n"
        ));
    }
    yaml
}

struct Env {
    cluster: Cluster,
    agents: NodeAgents,
    _manifests: TempDir,
    _servers: Vec<EchoServer>,
}

impl Env {
    fn start(test: &str) -> Self {
        require_root(test);
        let mut cluster = Cluster::new(2).expect("two-node cluster");
        for (name, ip, node) in [ECHO_A, ECHO_B, CLIENT] {
            cluster.add_pod(node, name, ip).expect("pod");
        }
        let servers = dual_stack_echo_servers(&cluster, &[ECHO_A.0, ECHO_B.0]);
        let manifests = TempDir::new("lbt", "manifests").expect("manifest dir");
        let all = [
            service("frag-local", (LOCAL4, LOCAL6), ""),
            slices("frag-local", ECHO_A, &cluster),
            service("frag-remote", (REMOTE4, REMOTE6), ""),
            slices("frag-remote", ECHO_B, &cluster),
            service(
                "frag-np",
                (NP4, NP6),
                "  type: NodePort\n  externalTrafficPolicy: Cluster\n",
            ),
            slices("frag-np", ECHO_B, &cluster),
        ]
        .concat();
        write_manifest(manifests.path(), "all.yaml", &all);
        let agents = NodeAgents::start(&cluster, manifests.path(), &[]);
        Env {
            cluster,
            agents,
            _manifests: manifests,
            _servers: servers,
        }
    }

    fn client(&self) -> &NetNs {
        self.cluster.pod(CLIENT.0).expect("pod").ns()
    }

    /// Node `k`'s counter under `reason`.
    fn count(&self, k: usize, reason: Reason) -> u64 {
        self.agents
            .tables(k)
            .stats
            .get(reason)
            .expect("stats")
            .packets
    }
}

/// The 3,000-byte request: the echo prefix, then letters (no whitespace,
/// so the answer's words stay readable).
fn request() -> Vec<u8> {
    let mut payload = ECHO_PREFIX.to_vec();
    payload.extend((0..DATAGRAM - ECHO_PREFIX.len()).map(|i| b'a' + (i % 26) as u8));
    payload
}

/// Sends the large request from `ns` to `to` (a few tries: the first
/// datagram may wait on neighbour resolution) and checks the large answer:
/// from `pod`, which saw `seen` as the client, with the request echoed
/// whole.
fn large_exchange(ns: &NetNs, to: SocketAddr, pod: &str, seen: IpAddr) {
    let payload = request();
    let mut last = None;
    for _ in 0..3 {
        match udp_request(ns, to, &payload, TIMEOUT) {
            Ok(answer) => {
                let (line, echoed) = answer.split_once('\n').unwrap_or((&answer, ""));
                assert_eq!(pod_of(line), Some(pod), "{to}: answered by {line:?}");
                assert_eq!(
                    client_of(line).map(|c| c.ip()),
                    Some(seen),
                    "{to}: the backend saw the wrong client"
                );
                assert_eq!(
                    echoed.as_bytes(),
                    &payload[..],
                    "{to}: the answer does not carry the request whole ({} bytes)",
                    echoed.len()
                );
                return;
            }
            Err(error) => last = Some(error),
        }
    }
    panic!(
        "{to}: no answer to a {DATAGRAM}-byte datagram: {:#}",
        last.expect("an error")
    );
}

#[test]
fn large_udp_datagrams_and_their_answers_cross_cluster_ips_and_a_node_port_in_fragments() {
    let env = Env::start(
        "large_udp_datagrams_and_their_answers_cross_cluster_ips_and_a_node_port_in_fragments",
    );
    let client = env.client();
    let client4 = IpAddr::V4(CLIENT.1);
    let client6 = IpAddr::V6(pod_ip6(&env.cluster, CLIENT.0));
    let (ext, node4, node6) = (
        env.cluster.external(),
        env.cluster.node_ip(1),
        env.cluster.node_ip6(1),
    );
    // (from, to, answering pod, client address it sees): the NodePort's
    // backend is on node-2, so node-1 SNATs to its own address.
    let exchanges: [(&NetNs, SocketAddr, &str, IpAddr); 6] = [
        (client, (LOCAL4, DNS).into(), ECHO_A.0, client4),
        (client, (LOCAL6, DNS).into(), ECHO_A.0, client6),
        (client, (REMOTE4, DNS).into(), ECHO_B.0, client4),
        (client, (REMOTE6, DNS).into(), ECHO_B.0, client6),
        (ext, (node4, NODE_PORT).into(), ECHO_B.0, node4.into()),
        (ext, (node6, NODE_PORT).into(), ECHO_B.0, node6.into()),
    ];
    // Small datagrams first: every path is programmed and answering.
    for (ns, to, _, _) in exchanges {
        env.agents.wait_until(&format!("{to} answering"), || {
            udp_request(ns, to, b"query", TIMEOUT).is_ok()
        });
    }
    let before = env.count(1, Reason::PassFragmentTranslated);
    for (ns, to, pod, seen) in exchanges {
        large_exchange(ns, to, pod, seen);
    }
    // Six requests and six answers, two later fragments each, all
    // translated on node-1 (the answers from node-2 included).
    let translated = env.count(1, Reason::PassFragmentTranslated) - before;
    eprintln!("node-1 translated {translated} later fragments");
    assert!(
        translated >= 24,
        "node-1 translated {translated} later fragments, expected at least 24"
    );
    assert_eq!(
        env.count(1, Reason::DropFragmentUnknown) + env.count(2, Reason::DropFragmentUnknown),
        0,
        "fragments dropped as unknown"
    );
}
