//! Sustained new connections through the SNAT path: two nodes, a NodePort
//! whose only endpoint is on the other node, and the external client
//! opening connection after connection through the first node for a long
//! run (60 s in full mode). Every connection takes a SNAT port of the one
//! backend's 4523 and gives it back when it ends; the run shows the rate
//! that can be sustained and that none fails (before conntrack had a
//! lifecycle, every connection after the first ~4,500 timed out).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::Result;
use xtask::{BpffsDir, Cluster, TempDir};

use super::Plan;
use super::report::Results;
use super::services::TARGET_PORT;
use super::traffic::{self, BenchServer};
use super::variants::{AgentConfig, Attach, PREFIX, start_agent, write_file};

/// The NodePort, and its only endpoint, a pod of node 2.
const SNAT_NODE_PORT: u16 = 30090;
const REMOTE_SERVER: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);

fn manifests() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: snat, namespace: bench}}\n\
         spec: {{type: NodePort, clusterIP: 10.96.0.90, ports: [{{name: http, port: 80, \
         targetPort: {TARGET_PORT}, nodePort: {SNAT_NODE_PORT}, protocol: TCP}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
         metadata: {{name: snat-x1, namespace: bench, labels: {{kubernetes.io/service-name: snat}}}}\n\
         ports: [{{name: http, port: {TARGET_PORT}, protocol: TCP}}]\n\
         endpoints:\n- {{addresses: [\"{REMOTE_SERVER}\"], conditions: {{ready: true}}, nodeName: node-2}}\n"
    )
}

/// `plan.snat_duration` of closed-loop connections to node 1's NodePort,
/// once per repetition: `snat_rate` (connections per second) and
/// `snat_failed`, variant `ours`, size 1.
pub fn snat_runs(
    plan: &Plan,
    agent: &AgentConfig,
    results: &mut Results,
    notes: &mut Vec<String>,
) -> Result<()> {
    let mut cluster = Cluster::with_prefix(PREFIX, 2)?;
    let server = cluster.add_pod(2, "server", REMOTE_SERVER)?;
    let _server = BenchServer::start(server.ns(), TARGET_PORT, 4)?;
    cluster
        .external()
        .sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
    let files = TempDir::new(PREFIX, "bench-snat")?;
    write_file(files.path(), "snat.yaml", &manifests())?;
    // Agents and their pins live until the end of the run.
    let mut agents = Vec::new();
    for k in 1..=2 {
        let pins = BpffsDir::with_prefix(PREFIX)?;
        let node = format!("node-{k}");
        let (process, _) = start_agent(
            agent,
            (&node, cluster.node(k).ns()),
            files.path(),
            &pins,
            1,
            Attach::Devices,
            plan.load_timeout,
        )?;
        agents.push((process, pins));
    }
    let target = SocketAddrV4::new(cluster.node_ip(1), SNAT_NODE_PORT);
    traffic::wait_until_answering(cluster.external(), target, Duration::from_secs(30))?;
    for rep in 0..plan.reps {
        let stats = traffic::connection_rate(
            Some(cluster.external()),
            target,
            plan.conn_threads,
            plan.snat_duration,
        )?;
        let summary = stats.summary();
        println!("  {}", summary.show(&format!("snat rep={rep}")));
        results.push("snat_rate", "ours", 1, rep, summary.rate);
        results.push("snat_completed", "ours", 1, rep, summary.completed as f64);
        results.push("snat_failed", "ours", 1, rep, summary.failed as f64);
        if summary.failed > 0 {
            notes.push(format!(
                "SNAT run {rep}: {} of {} connections failed",
                summary.failed,
                summary.completed + summary.failed
            ));
        }
    }
    Ok(())
}

/// The report's section on the SNAT run.
pub fn report(md: &mut String, results: &Results, plan: &Plan) {
    use std::fmt::Write as _;
    let _ = writeln!(
        md,
        "\n### Sustained connections through SNAT\n\n\
         The external client opens connection after connection ({} threads, {:.0} s per\n\
         repetition) to node 1's NodePort, whose only endpoint is on node 2: each takes one\n\
         of the backend's 4523 SNAT ports and gives it back when it ends.\n\n\
         | conn/s | connections | failed |\n|---|---|---|",
        plan.conn_threads,
        plan.snat_duration.as_secs_f64()
    );
    let show = |metric: &str, digits: usize| {
        results
            .spread(metric, "ours", 1)
            .map_or("-".to_owned(), |s| s.show(digits))
    };
    let _ = writeln!(
        md,
        "| {} | {} | {} |",
        show("snat_rate", 0),
        show("snat_completed", 0),
        show("snat_failed", 0)
    );
}
