//! North-south end to end: two node namespaces on an underlay, an external
//! client that reaches them only through it, one agent per node (XDP on the
//! node device, TC on pod devices), real TCP through NodePorts,
//! LoadBalancer IPs and externalIPs, and the healthCheckNodePort servers.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use lb_tests::{
    cluster::{NodeAgents, write_manifest},
    require_root,
};
use xtask::{Cluster, EchoServer, NetNs, TempDir, client_of, http_get, pod_of};

const EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
const ECHO_A: (&str, Ipv4Addr) = ("echo-a", Ipv4Addr::new(10, 244, 1, 11));
const ECHO_B: (&str, Ipv4Addr) = ("echo-b", Ipv4Addr::new(10, 244, 2, 11));
const CLIENT: (&str, Ipv4Addr) = ("client", Ipv4Addr::new(10, 244, 1, 2));
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const LB_LOCAL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const LB_ALLOW: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 30);
const LB_DENY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 31);
const HEALTH_PORT: u16 = 32000;
const TIMEOUT: Duration = Duration::from_secs(2);
/// How long a request that must fail may take to do so.
const REFUSED_WITHIN: Duration = Duration::from_millis(700);

fn services(np_cluster_port: u16) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: np-cluster, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.50
  externalIPs: [{EXTERNAL_IP}]
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: {np_cluster_port}, protocol: TCP}}]
---
apiVersion: v1
kind: Service
metadata: {{name: lb-local, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.51
  externalTrafficPolicy: Local
  healthCheckNodePort: {HEALTH_PORT}
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30081, protocol: TCP}}]
status:
  loadBalancer:
    ingress: [{{ip: {LB_LOCAL}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: lb-allow, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.52
  loadBalancerSourceRanges: [{EXT}/32]
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30082, protocol: TCP}}]
status:
  loadBalancer:
    ingress: [{{ip: {LB_ALLOW}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: lb-deny, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.53
  loadBalancerSourceRanges: [192.0.2.0/24]
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30083, protocol: TCP}}]
status:
  loadBalancer:
    ingress: [{{ip: {LB_DENY}}}]
"#
    )
}

/// An EndpointSlice of `service` with the given pods (name, IP, node).
fn slice(service: &str, pods: &[((&str, Ipv4Addr), &str)]) -> String {
    let mut yaml = format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-x1\n  \
         namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\n\
         ports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n"
    );
    for ((name, ip), node) in pods {
        yaml.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n  nodeName: {node}\n  \
             targetRef: {{kind: Pod, namespace: default, name: {name}}}\n"
        ));
    }
    yaml
}

fn slices(local_pod: ((&str, Ipv4Addr), &str)) -> String {
    let both = [(ECHO_A, "node-1"), (ECHO_B, "node-2")];
    [
        slice("np-cluster", &both),
        slice("lb-local", &[local_pod]),
        slice("lb-allow", &[(ECHO_A, "node-1")]),
        slice("lb-deny", &[(ECHO_A, "node-1")]),
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
        cluster.add_pod(1, ECHO_A.0, ECHO_A.1).expect("pod");
        cluster.add_pod(2, ECHO_B.0, ECHO_B.1).expect("pod");
        cluster.add_pod(1, CLIENT.0, CLIENT.1).expect("pod");
        for (ip, node) in [(EXTERNAL_IP, 2), (LB_LOCAL, 1), (LB_ALLOW, 1), (LB_DENY, 1)] {
            cluster.route_via(&format!("{ip}/32"), node).expect("route");
        }
        let servers = [ECHO_A.0, ECHO_B.0]
            .iter()
            .map(|name| {
                let pod = cluster.pod(name).expect("pod");
                EchoServer::start(pod.ns(), name, &[8080], &[]).expect("echo server")
            })
            .collect();
        let manifests = TempDir::new("lbt", "manifests").expect("manifest dir");
        write_manifest(manifests.path(), "services.yaml", &services(30080));
        write_manifest(manifests.path(), "slices.yaml", &slices((ECHO_A, "node-1")));
        let agents = NodeAgents::start(&cluster, manifests.path(), &[]);
        let me = Self {
            cluster,
            manifests,
            agents,
            _servers: servers,
        };
        for k in 1..=2 {
            me.wait_until(&format!("node-{k} NodePort answering"), || {
                me.get(me.node(k, 30080)).is_ok()
            });
        }
        me
    }

    fn node(&self, k: usize, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.cluster.node_ip(k), port)
    }

    fn external(&self) -> &NetNs {
        self.cluster.external()
    }

    /// One request from the external client: (pod, client address seen).
    fn get(&self, addr: SocketAddrV4) -> anyhow::Result<(String, Ipv4Addr)> {
        let reply = http_get(self.external(), addr, TIMEOUT)?;
        let pod = pod_of(&reply).ok_or_else(|| anyhow::anyhow!("no pod in {reply:?}"))?;
        let client = client_of(&reply).ok_or_else(|| anyhow::anyhow!("no client in {reply:?}"))?;
        let std::net::IpAddr::V4(client) = client.ip() else {
            anyhow::bail!("IPv6 client in {reply:?}");
        };
        Ok((pod.to_string(), client))
    }

    /// Asserts that a request to `addr` from the external client fails.
    fn assert_refused(&self, addr: SocketAddrV4, why: &str) {
        let result = http_get(self.external(), addr, REFUSED_WITHIN);
        assert!(result.is_err(), "{why}: {addr} answered {result:?}");
    }

    fn wait_until(&self, what: &str, done: impl FnMut() -> bool) {
        self.agents.wait_until(what, done);
    }

    /// (HTTP status, body) of `GET path` from the external client.
    fn status(&self, addr: SocketAddrV4, path: &str) -> anyhow::Result<(u16, String)> {
        use std::io::{Read, Write};
        let path = path.to_owned();
        self.external()
            .run(move || -> anyhow::Result<(u16, String)> {
                let mut stream = std::net::TcpStream::connect_timeout(&addr.into(), TIMEOUT)?;
                stream.set_read_timeout(Some(TIMEOUT))?;
                stream
                    .write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())?;
                let mut response = String::new();
                stream.read_to_string(&mut response)?;
                let (head, body) = response
                    .split_once("\r\n\r\n")
                    .ok_or_else(|| anyhow::anyhow!("no header end in {response:?}"))?;
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| anyhow::anyhow!("no status in {head:?}"))?;
                Ok((status, body.to_owned()))
            })?
    }
}

#[test]
fn node_port_with_cluster_policy_answers_on_every_node_from_every_pod() {
    let ns = TwoNodes::start("node_port_with_cluster_policy_answers_on_every_node_from_every_pod");
    for k in 1..=2 {
        let node_ip = ns.cluster.node_ip(k);
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..200 {
            let (pod, client) = ns.get(ns.node(k, 30080)).expect("NodePort request");
            let local_pod = if k == 1 { ECHO_A.0 } else { ECHO_B.0 };
            // A backend on this node sees the client; one on the other node
            // sees this node (SNAT), so its reply comes back through here.
            let want = if pod == local_pod { EXT } else { node_ip };
            assert_eq!(client, want, "via node-{k}, {pod} saw client {client}");
            *seen.entry(pod).or_insert(0) += 1;
            if seen.len() == 2 && seen.values().all(|n| *n >= 3) {
                break;
            }
        }
        assert_eq!(
            seen.len(),
            2,
            "via node-{k} not every pod answered: {seen:?}"
        );
    }
    // The externalIP is routed to node-2 and served there.
    let (pod, _) = ns
        .get(SocketAddrV4::new(EXTERNAL_IP, 80))
        .expect("externalIP request");
    assert!(pod == ECHO_A.0 || pod == ECHO_B.0);
    // The agent's own health endpoint.
    let (status, body) = ns.status(ns.node(1, 10256), "/healthz").expect("healthz");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"nodeEligible\":true") && body.contains("lastUpdated"),
        "{body}"
    );
}

#[test]
fn local_policy_keeps_the_client_address_and_the_health_check_follows_the_pod() {
    let ns = TwoNodes::start(
        "local_policy_keeps_the_client_address_and_the_health_check_follows_the_pod",
    );
    let lb = SocketAddrV4::new(LB_LOCAL, 80);
    for addr in [ns.node(1, 30081), lb] {
        for _ in 0..10 {
            let (pod, client) = ns.get(addr).expect("Local service request");
            assert_eq!((pod.as_str(), client), (ECHO_A.0, EXT), "via {addr}");
        }
    }
    ns.assert_refused(ns.node(2, 30081), "node-2 has no local endpoint");

    let (status, body) = ns
        .status(ns.node(1, HEALTH_PORT), "/")
        .expect("health check node-1");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"localEndpoints\":1") && body.contains("\"name\":\"lb-local\""),
        "{body}"
    );
    let (status, body) = ns
        .status(ns.node(2, HEALTH_PORT), "/any/path")
        .expect("health check node-2");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"localEndpoints\":0"), "{body}");

    // The pod moves to node-2: the health checks flip, and so does traffic.
    write_manifest(
        ns.manifests.path(),
        "slices.yaml",
        &slices((ECHO_B, "node-2")),
    );
    ns.wait_until("health checks flipped", || {
        matches!(ns.status(ns.node(1, HEALTH_PORT), "/"), Ok((503, _)))
            && matches!(ns.status(ns.node(2, HEALTH_PORT), "/"), Ok((200, _)))
    });
    let (pod, client) = ns.get(ns.node(2, 30081)).expect("request via node-2");
    assert_eq!((pod.as_str(), client), (ECHO_B.0, EXT));
    ns.assert_refused(ns.node(1, 30081), "node-1 has no local endpoint any more");

    // Pods on node-1 still reach the (now remote) endpoint through node-1's
    // NodePort: Local applies to outside clients only.
    let client = ns.cluster.pod(CLIENT.0).expect("client pod").ns();
    let reply = http_get(client, ns.node(1, 30081), TIMEOUT).expect("pod to Local NodePort");
    assert_eq!(pod_of(&reply), Some(ECHO_B.0), "{reply}");
}

#[test]
fn load_balancer_source_ranges_allow_and_deny() {
    let ns = TwoNodes::start("load_balancer_source_ranges_allow_and_deny");
    let (pod, client) = ns
        .get(SocketAddrV4::new(LB_ALLOW, 80))
        .expect("allowed client");
    assert_eq!((pod.as_str(), client), (ECHO_A.0, EXT));
    ns.assert_refused(
        SocketAddrV4::new(LB_DENY, 80),
        "client outside loadBalancerSourceRanges",
    );
    // The ranges restrict the LoadBalancer address, not the service's NodePort.
    assert!(
        ns.get(ns.node(1, 30083)).is_ok(),
        "NodePort of a restricted service refused"
    );
}

#[test]
fn a_changed_node_port_takes_effect_and_the_old_one_stops_answering() {
    let ns = TwoNodes::start("a_changed_node_port_takes_effect_and_the_old_one_stops_answering");
    write_manifest(ns.manifests.path(), "services.yaml", &services(30090));
    ns.wait_until("new NodePort answering on both nodes", || {
        ns.get(ns.node(1, 30090)).is_ok() && ns.get(ns.node(2, 30090)).is_ok()
    });
    for k in 1..=2 {
        ns.assert_refused(ns.node(k, 30080), "old NodePort");
    }
}
