//! `lbctl` only reads (issue 8). aya opens pinned maps read-write, so the
//! guarantee is lbctl's code: it never calls a map write API, except
//! `lbctl trace`, which sets the trace flag in `LB_CONFIG_V3` while it runs
//! (and clears it). This test runs every other subcommand, in both output
//! formats, against a programmed datapath with conntrack and affinity
//! entries, and checks every map holds exactly what it held before. Also:
//! the pins are root's only (directory 0700, maps 0600).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use lb_agent::datapath::KernelTables;
use lb_tests::cluster::{Cluster, POD_TCP_PORT, write_manifest};
use xtask::{TempDir, http_get};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
const ECHO_A: (&str, Ipv4Addr) = ("echo-a", Ipv4Addr::new(10, 244, 1, 11));

/// Every map's content, as sorted debug lines.
/// The snapshot without the packet counters: the programs keep counting
/// the namespaces' own background traffic (IPv6 router solicitations, ARP)
/// while lbctl runs, and lbctl could not write those per-CPU counters
/// anyway.
fn written_by_the_agent(snapshot: &[String]) -> Vec<String> {
    snapshot
        .iter()
        .filter(|line| !line.starts_with("stats (") && !line.starts_with("sstats ("))
        .cloned()
        .collect()
}

fn snapshot(pins: &Path) -> Vec<String> {
    let tables = KernelTables::open(pins).expect("open the pinned maps");
    let mut lines: Vec<String> = Vec::new();
    lines.extend(
        tables
            .dump_services()
            .expect("services")
            .iter()
            .map(|e| format!("service {e:?}")),
    );
    lines.extend(
        tables
            .dump_slots()
            .expect("slots")
            .iter()
            .map(|e| format!("slot {e:?}")),
    );
    lines.extend(
        tables
            .dump_backends()
            .expect("backends")
            .iter()
            .map(|e| format!("backend {e:?}")),
    );
    lines.extend(
        tables
            .dump_conntrack()
            .expect("conntrack")
            .iter()
            .map(|e| format!("ct {e:?}")),
    );
    lines.extend(
        tables
            .dump_affinity()
            .expect("affinity")
            .iter()
            .map(|e| format!("affinity {e:?}")),
    );
    lines.extend(
        tables
            .dump_service_names()
            .expect("names")
            .iter()
            .map(|e| format!("name {e:?}")),
    );
    lines.extend(
        tables
            .dump_service_stats()
            .expect("service stats")
            .iter()
            .map(|e| format!("sstats {e:?}")),
    );
    lines.extend(
        tables
            .stats
            .all()
            .expect("stats")
            .iter()
            .map(|e| format!("stats {e:?}")),
    );
    lines.push(format!("config {:?}", tables.config().expect("config")));
    lines.sort();
    lines
}

#[test]
fn pins_are_for_root_only() {
    use std::os::unix::fs::PermissionsExt as _;
    let mut cluster = Cluster::new("pins_are_for_root_only", &[ECHO_A]);
    let manifests = TempDir::new("lbt", "manifests").expect("manifest dir");
    cluster.start_agent(&["--manifests".into(), manifests.path().display().to_string()]);
    cluster
        .agent_mut()
        .wait_for_log("datapath loaded", Duration::from_secs(30))
        .expect("agent loaded");
    let mode = |path: &Path| {
        std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(cluster.pins.path()), 0o700, "pin directory");
    for name in lb_agent::datapath::MAP_NAMES {
        let pin = cluster.pins.path().join(name);
        assert_eq!(mode(&pin), 0o600, "{name}");
    }
}

#[test]
fn lbctl_changes_no_map() {
    let mut cluster = Cluster::new("lbctl_changes_no_map", &[ECHO_A]);
    let manifests = TempDir::new("lbt", "manifests").expect("manifest dir");
    write_manifest(
        manifests.path(),
        "web.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{namespace: default, name: web}}\nspec:\n  \
             clusterIP: {VIP}\n  sessionAffinity: ClientIP\n  ports: [{{name: http, port: 80, targetPort: {POD_TCP_PORT}}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  namespace: default\n  \
             name: web-1\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\n\
             ports: [{{name: http, port: {POD_TCP_PORT}}}]\nendpoints:\n- addresses: [{}]\n  nodeName: node-1\n",
            ECHO_A.1
        ),
    );
    cluster.start_agent(&["--manifests".into(), manifests.path().display().to_string()]);
    cluster.wait_for_backends(VIP, 80, Some(vec![ECHO_A.1]), Duration::from_secs(30));
    for _ in 0..5 {
        http_get(
            cluster.client(),
            SocketAddrV4::new(VIP, 80),
            Duration::from_secs(2),
        )
        .expect("request through the ClusterIP");
    }
    // No traffic from here on: the maps are still.
    std::thread::sleep(Duration::from_millis(500));
    let before = snapshot(cluster.pins.path());
    assert!(
        before.iter().any(|l| l.starts_with("ct ")),
        "no conntrack entry to read"
    );
    assert!(
        before.iter().any(|l| l.starts_with("affinity ")),
        "no affinity entry to read"
    );

    let pins = cluster.pins.path().display().to_string();
    let subcommands: [&[&str]; 6] = [
        &["services"],
        &["backends"],
        &["conntrack"],
        &["conntrack", "--service", "default/web", "--limit", "1"],
        &["affinity"],
        &["stats"],
    ];
    for output in ["table", "json"] {
        for args in subcommands {
            let result = std::process::Command::new(lb_tests::lbctl_binary())
                .args(["--bpffs", &pins, "-o", output])
                .args(args)
                .output()
                .expect("run lbctl");
            assert!(
                result.status.success(),
                "lbctl {args:?} -o {output} failed: {}",
                String::from_utf8_lossy(&result.stderr)
            );
            let after = snapshot(cluster.pins.path());
            assert_eq!(
                written_by_the_agent(&before),
                written_by_the_agent(&after),
                "lbctl {args:?} -o {output} changed a map"
            );
        }
    }
}
