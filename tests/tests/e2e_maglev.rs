//! Maglev end to end (`--lb-algorithm maglev`): two nodes, each with its
//! own agent fed from the same manifests, and an external client whose
//! router sends a LoadBalancer IP to one node or the other. The same client
//! 5-tuple reaches the same backend pod whichever node receives it (no
//! shared state between the nodes: both build the same table from the same
//! EndpointSlice), the pod is the one the table builder and the flow hash
//! predict. When one backend goes, established flows on the other pods keep
//! their pod (conntrack), and even flows that reach a node which never saw
//! them move only if Maglev's table moved their slot (at most 2%).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddrV4, UdpSocket},
    time::Duration,
};

use lb_agent::maglev::{BackendIdentity, build_table};
use lb_common::{
    conntrack::Lb4CtKey,
    maglev::{DEFAULT_TABLE_SIZE, flow_hash},
    stats::Reason,
};
use lb_tests::{
    cluster::{NodeAgents, POD_TCP_PORT, POD_UDP_PORT, write_manifest},
    require_root,
};
use xtask::{Cluster, EchoServer, NetNs, TempDir, pod_of};

const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 40);
const DNS_PORT: u16 = 53;
const PODS: [(&str, Ipv4Addr, usize); 6] = [
    ("mg-a", Ipv4Addr::new(10, 244, 1, 11), 1),
    ("mg-b", Ipv4Addr::new(10, 244, 1, 12), 1),
    ("mg-c", Ipv4Addr::new(10, 244, 1, 13), 1),
    ("mg-d", Ipv4Addr::new(10, 244, 2, 11), 2),
    ("mg-e", Ipv4Addr::new(10, 244, 2, 12), 2),
    ("mg-f", Ipv4Addr::new(10, 244, 2, 13), 2),
];
/// The backend the test removes.
const REMOVED: &str = "mg-b";
const FLOWS: u16 = 150;
const TIMEOUT: Duration = Duration::from_secs(2);

fn manifests(pods: &[(&str, Ipv4Addr, usize)]) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: mg, namespace: default}}\nspec:\n  \
         type: LoadBalancer\n  clusterIP: 10.96.0.60\n  ports:\n  \
         - {{name: dns, port: {DNS_PORT}, targetPort: {POD_UDP_PORT}, nodePort: 30053, protocol: UDP}}\n  \
         - {{name: http, port: 80, targetPort: {POD_TCP_PORT}, nodePort: 30054, protocol: TCP}}\n\
         status:\n  loadBalancer:\n    ingress: [{{ip: {LB_IP}}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: mg-1\n  \
         namespace: default\n  labels: {{kubernetes.io/service-name: mg}}\naddressType: IPv4\n\
         ports: [{{name: dns, port: {POD_UDP_PORT}, protocol: UDP}}, {{name: http, port: {POD_TCP_PORT}, protocol: TCP}}]\n\
         endpoints:\n"
    );
    for (name, ip, node) in pods {
        yaml += &format!(
            "- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n  nodeName: node-{node}\n  \
             targetRef: {{kind: Pod, namespace: default, name: {name}}}\n"
        );
    }
    yaml
}

/// One datagram from the external client's UDP port `port` to the
/// LoadBalancer IP; the pod that answered.
fn ask_from(ns: &NetNs, port: u16) -> anyhow::Result<String> {
    let target = SocketAddrV4::new(LB_IP, DNS_PORT);
    let answer = ns.run(move || -> anyhow::Result<String> {
        let socket = UdpSocket::bind(("0.0.0.0", port))?;
        socket.connect(target)?;
        socket.set_read_timeout(Some(TIMEOUT))?;
        socket.send(b"which pod?")?;
        let mut buf = [0u8; 2048];
        let n = socket.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })??;
    pod_of(&answer)
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no pod in {answer:?}"))
}

/// Which pod each of `ports` reaches.
fn ask_all(ns: &NetNs, ports: std::ops::Range<u16>) -> BTreeMap<u16, String> {
    ports
        .map(|port| {
            let pod = ask_from(ns, port).unwrap_or_else(|e| panic!("flow from port {port}: {e:#}"));
            (port, pod)
        })
        .collect()
}

/// The pod the Maglev table of `pods` gives the flow from `client:port`.
fn predicted(pods: &[(&str, Ipv4Addr, usize)], client: Ipv4Addr, port: u16) -> String {
    let identities: Vec<BackendIdentity> = pods
        .iter()
        .map(|(_, ip, _)| BackendIdentity {
            addr: IpAddr::V4(*ip),
            port: POD_UDP_PORT,
        })
        .collect();
    let table = build_table(&identities, DEFAULT_TABLE_SIZE).expect("table");
    let key = Lb4CtKey {
        src_addr: client.octets(),
        dst_addr: LB_IP.octets(),
        src_port: port,
        dst_port: DNS_PORT,
        proto: 17,
        _pad: [0; 3],
    };
    let slot = flow_hash(&key) % DEFAULT_TABLE_SIZE;
    pods[table[slot as usize] as usize].0.to_string()
}

#[test]
fn a_flow_reaches_the_same_pod_through_either_node_and_keeps_it_when_another_pod_goes() {
    require_root(
        "a_flow_reaches_the_same_pod_through_either_node_and_keeps_it_when_another_pod_goes",
    );
    let mut cluster = Cluster::new(2).expect("two-node cluster");
    let mut servers = Vec::new();
    for (name, ip, node) in PODS {
        let pod = cluster.add_pod(node, name, ip).expect("pod");
        servers.push(
            EchoServer::start(pod.ns(), name, &[POD_TCP_PORT], &[POD_UDP_PORT])
                .expect("echo server"),
        );
    }
    let dir = TempDir::new("lbt", "manifests").expect("manifest dir");
    write_manifest(dir.path(), "mg.yaml", &manifests(&PODS));
    let agents = NodeAgents::start(&cluster, dir.path(), &["--lb-algorithm", "maglev"]);
    let client = cluster.external_ip();
    let external = cluster.external();
    for k in [1, 2] {
        cluster.route_via(&format!("{LB_IP}/32"), k).expect("route");
        agents.wait_until(&format!("node-{k} serving {LB_IP}"), || {
            ask_from(external, 30999).is_ok()
        });
    }

    // The same 5-tuples through node 1, then through node 2.
    cluster.route_via(&format!("{LB_IP}/32"), 1).expect("route");
    let via_one = ask_all(external, 41000..41000 + FLOWS);
    cluster.route_via(&format!("{LB_IP}/32"), 2).expect("route");
    let via_two = ask_all(external, 41000..41000 + FLOWS);
    for (port, pod) in &via_one {
        assert_eq!(
            &via_two[port], pod,
            "flow from port {port}: node-1 sent it to {pod}, node-2 to {}",
            via_two[port]
        );
        assert_eq!(
            pod,
            &predicted(&PODS, client, *port),
            "flow from port {port}"
        );
    }
    let used: std::collections::BTreeSet<&String> = via_one.values().collect();
    println!(
        "{FLOWS} flows through either node, same pod each time, over {} pods",
        used.len()
    );
    assert!(used.len() >= 4, "flows used only {used:?}");
    for k in [1, 2] {
        let maglev = agents
            .tables(k)
            .stats
            .get(Reason::NewFlowMaglev)
            .expect("stats");
        assert!(
            maglev.packets >= u64::from(FLOWS),
            "node-{k}: {maglev:?} Maglev picks"
        );
    }

    // lbctl shows the algorithm and each backend's share of the table.
    let table = std::process::Command::new(lb_tests::lbctl_binary())
        .arg("--bpffs")
        .arg(agents.pins_of(1))
        .arg("services")
        .output()
        .expect("lbctl");
    println!("{}", String::from_utf8_lossy(&table.stdout));
    let services = lb_tests::lbctl_json(agents.pins_of(1), &["services"]);
    let lb = services
        .as_array()
        .and_then(|rows| {
            rows.iter()
                .find(|r| r["address"] == LB_IP.to_string() && r["protocol"] == "UDP")
        })
        .unwrap_or_else(|| panic!("no {LB_IP}/udp in lbctl services: {services}"));
    assert_eq!(lb["algorithm"], "maglev", "{lb}");
    assert_eq!(lb["maglev_table_size"], DEFAULT_TABLE_SIZE, "{lb}");
    let backends = lb["backends"].as_array().expect("backends");
    assert_eq!(backends.len(), PODS.len(), "{lb}");
    let slots: u64 = backends
        .iter()
        .filter_map(|b| b["maglev_slots"].as_u64())
        .sum();
    assert_eq!(
        slots,
        u64::from(DEFAULT_TABLE_SIZE),
        "shares do not cover the table: {lb}"
    );
    for b in backends {
        let share = b["maglev_share"].as_f64().expect("share");
        assert!((share - 1.0 / 6.0).abs() < 0.01, "uneven share {b}");
    }

    // Fresh flows through node 2 while all six pods serve ...
    let before = ask_all(external, 42000..42000 + FLOWS);
    // ... then one pod goes; the same flows arrive at node 1, which never
    // saw them (no conntrack entry): only the removed pod's flows move.
    let rest: Vec<(&str, Ipv4Addr, usize)> = PODS
        .iter()
        .copied()
        .filter(|(name, _, _)| *name != REMOVED)
        .collect();
    write_manifest(dir.path(), "mg.yaml", &manifests(&rest));
    let removed_ip = PODS
        .iter()
        .find(|p| p.0 == REMOVED)
        .map(|p| p.1)
        .expect("pod");
    for k in [1, 2] {
        agents.wait_until(&format!("node-{k} dropping {REMOVED}"), || {
            let backends = agents.tables(k).dump_backends().expect("backends");
            !backends.values().any(|b| b.addr == removed_ip.octets())
        });
    }
    // Through node 2, which tracks them: the removed pod's flows (their UDP
    // conntrack flushed) go elsewhere, every other flow stays.
    let established = ask_all(external, 42000..42000 + FLOWS);
    for (port, was) in &before {
        let now = &established[port];
        assert_ne!(
            now, REMOVED,
            "flow from port {port} still reaches {REMOVED}"
        );
        if was != REMOVED {
            assert_eq!(now, was, "established flow from port {port} changed pod");
        }
    }
    // Through node 1, which never saw them: a fresh Maglev pick each.
    cluster.route_via(&format!("{LB_IP}/32"), 1).expect("route");
    let fresh = ask_all(external, 42000..42000 + FLOWS);
    let (mut others, mut moved) = (0u32, 0u32);
    for (port, was) in &before {
        let now = &fresh[port];
        assert_ne!(
            now, REMOVED,
            "flow from port {port} still reaches {REMOVED}"
        );
        assert_eq!(
            now,
            &predicted(&rest, client, *port),
            "flow from port {port}"
        );
        if was != REMOVED {
            others += 1;
            moved += u32::from(was != now);
        }
    }
    let share = 100.0 * f64::from(moved) / f64::from(others);
    println!(
        "removing {REMOVED}: {moved} of {others} flows on other pods moved on a node without \
         their conntrack ({share:.2}%), none on the node with it"
    );
    assert!(share <= 2.0, "{share:.2}% of the other pods' flows moved");
    drop(servers);
}
