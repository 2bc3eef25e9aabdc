//! End to end in network namespaces: the real agent, fed from a manifest
//! directory, programs the datapath of a node namespace; pods behind veths
//! talk to a ClusterIP with real TCP and UDP sockets.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use lb_tests::cluster::{Cluster, spread, write_manifest};
use xtask::{EchoServer, HoldConnection, TempDir, http_get, pod_of, udp_request};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const TIMEOUT: Duration = Duration::from_secs(2);

const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: default
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
  selector: {app: echo}
"#;

/// An EndpointSlice for the `echo` service with the given ready pods.
fn endpoint_slice(pods: &[(&str, Ipv4Addr)]) -> String {
    let mut yaml = String::from(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-abcde\n  \
         namespace: default\n  labels:\n    kubernetes.io/service-name: echo\naddressType: IPv4\n\
         ports:\n- {name: http, port: 8080, protocol: TCP}\n- {name: dns, port: 5353, protocol: UDP}\n\
         endpoints:\n",
    );
    for (name, ip) in pods {
        yaml.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  \
             nodeName: node-1\n  targetRef: {{kind: Pod, namespace: default, name: {name}}}\n"
        ));
    }
    yaml
}

/// The shared cluster fed from a manifest directory holding the `echo`
/// service and its slice.
struct ManifestCluster {
    cluster: Cluster,
    manifests: TempDir,
}

impl ManifestCluster {
    fn start(test: &str, backends: &[(&str, Ipv4Addr)]) -> Self {
        let mut cluster = Cluster::new(test, backends);
        let manifests = TempDir::new("lbt", "manifests").expect("manifest dir");
        write_manifest(manifests.path(), "service.yaml", SERVICE);
        write_manifest(manifests.path(), "slice.yaml", &endpoint_slice(backends));
        cluster.start_agent(&["--manifests".into(), manifests.path().display().to_string()]);
        cluster.wait_until_serving(SocketAddrV4::new(VIP, 80));
        ManifestCluster { cluster, manifests }
    }

    /// Waits (bounded) until the datapath holds exactly `want` as backends.
    fn wait_for_backends(&self, want: Vec<Ipv4Addr>) {
        self.cluster
            .wait_for_backends(VIP, 80, Some(want), Duration::from_secs(15));
    }
}

impl std::ops::Deref for ManifestCluster {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl std::ops::DerefMut for ManifestCluster {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.cluster
    }
}

#[test]
fn cluster_ip_spreads_tcp_and_udp_and_follows_a_scale_down() {
    let pods = [
        ("echo-a", Ipv4Addr::new(10, 244, 1, 11)),
        ("echo-b", Ipv4Addr::new(10, 244, 1, 12)),
        ("echo-c", Ipv4Addr::new(10, 244, 1, 13)),
    ];
    let cluster = ManifestCluster::start(
        "cluster_ip_spreads_tcp_and_udp_and_follows_a_scale_down",
        &pods,
    );
    let names = ["echo-a", "echo-b", "echo-c"];

    let tcp = spread(300, &names, 3, || {
        http_get(cluster.client(), SocketAddrV4::new(VIP, 80), TIMEOUT)
    });
    for pod in names {
        assert!(
            tcp.get(pod).copied().unwrap_or(0) >= 3,
            "{pod} got too few TCP connections: {tcp:?}"
        );
    }
    let udp = spread(300, &names, 3, || {
        udp_request(
            cluster.client(),
            SocketAddrV4::new(VIP, 53),
            b"query",
            TIMEOUT,
        )
    });
    for pod in names {
        assert!(
            udp.get(pod).copied().unwrap_or(0) >= 3,
            "{pod} got too few UDP datagrams: {udp:?}"
        );
    }

    // A long-lived connection, then remove a pod it is NOT on.
    let mut held = HoldConnection::open(cluster.client(), SocketAddrV4::new(VIP, 80), TIMEOUT)
        .expect("open long-lived connection");
    let held_pod = pod_of(&held.ask().expect("first answer on the held connection"))
        .expect("pod name")
        .to_string();
    let (removed, _) = *pods
        .iter()
        .find(|(name, _)| *name != held_pod)
        .expect("another pod");
    let kept: Vec<(&str, Ipv4Addr)> = pods
        .iter()
        .copied()
        .filter(|(n, _)| *n != removed)
        .collect();
    write_manifest(
        cluster.manifests.path(),
        "slice.yaml",
        &endpoint_slice(&kept),
    );
    cluster.wait_for_backends(kept.iter().map(|(_, ip)| *ip).collect());

    let served_before = cluster
        .servers
        .iter()
        .find(|s| s.pod_name() == removed)
        .expect("server")
        .tcp_served();
    let kept_names: Vec<&str> = kept.iter().map(|(n, _)| *n).collect();
    let after = spread(60, &[], 0, || {
        http_get(cluster.client(), SocketAddrV4::new(VIP, 80), TIMEOUT)
    });
    assert!(
        !after.contains_key(removed),
        "{removed} still got new connections: {after:?}"
    );
    assert_eq!(
        after.values().sum::<usize>(),
        60,
        "not every request was answered: {after:?}"
    );
    for pod in &kept_names {
        assert!(
            after.contains_key(*pod),
            "{pod} got no connections after the scale-down: {after:?}"
        );
    }
    let served_after = cluster
        .servers
        .iter()
        .find(|s| s.pod_name() == removed)
        .expect("server")
        .tcp_served();
    assert_eq!(
        served_before, served_after,
        "{removed}'s server accepted connections after removal"
    );

    // The established connection survived the change, on the same backend.
    for i in 0..5 {
        let reply = held
            .ask()
            .unwrap_or_else(|e| panic!("held connection broke at {i}: {e:#}"));
        assert_eq!(
            pod_of(&reply),
            Some(held_pod.as_str()),
            "held connection moved: {reply}"
        );
    }
}

#[test]
fn a_pod_device_created_after_start_is_picked_up() {
    let first = [("echo-a", Ipv4Addr::new(10, 244, 1, 11))];
    let mut cluster =
        ManifestCluster::start("a_pod_device_created_after_start_is_picked_up", &first);
    let late_ip = Ipv4Addr::new(10, 244, 1, 14);
    cluster
        .topology
        .add_pod("echo-late", late_ip)
        .expect("add pod");
    let late = EchoServer::start(
        cluster.topology.pod("echo-late").expect("pod").ns(),
        "echo-late",
        &[8080],
        &[5353],
    )
    .expect("server");
    write_manifest(
        cluster.manifests.path(),
        "slice.yaml",
        &endpoint_slice(&[first[0], ("echo-late", late_ip)]),
    );
    cluster.wait_for_backends(vec![first[0].1, late_ip]);

    // Replies from the new pod come back through its (new) device: they are
    // only correct if the agent attached there too.
    let answers = spread(200, &["echo-a", "echo-late"], 2, || {
        http_get(cluster.client(), SocketAddrV4::new(VIP, 80), TIMEOUT)
    });
    assert!(
        answers.get("echo-late").copied().unwrap_or(0) >= 2,
        "new pod never answered: {answers:?}"
    );
    assert!(late.tcp_served() >= 2);
}

#[test]
fn bpftool_dump_of_the_pinned_service_map_has_field_names() {
    let pods = [("echo-a", Ipv4Addr::new(10, 244, 1, 11))];
    let cluster = ManifestCluster::start(
        "bpftool_dump_of_the_pinned_service_map_has_field_names",
        &pods,
    );
    let map = cluster.pins.path().join(lb_common::service::NAME);
    let out = std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&map)
        .output()
        .expect("run bpftool");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bpftool failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for field in [
        "addr",
        "port",
        "proto",
        "service_id",
        "backend_count",
        "revision",
    ] {
        assert!(
            text.contains(&format!("\"{field}\"")),
            "bpftool output lacks field {field}:\n{text}"
        );
    }
    // The frontend is there with a readable address and port.
    assert!(
        text.contains("10,96,0,10") || text.contains("10, 96, 0, 10"),
        "VIP not in dump:\n{text}"
    );
}
