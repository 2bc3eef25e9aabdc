//! ICMP errors through a service address, end to end: a UDP client in a
//! pod sends to a ClusterIP port whose backend has nothing listening; the
//! backend's kernel answers with ICMP port unreachable about the datagram
//! as it arrived (to the pod address). The datapath translates the error
//! back into the ClusterIP's terms, so the client's connected socket
//! matches it and fails at once with ECONNREFUSED instead of waiting for
//! a timeout.

use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use lb_common::stats::Reason;
use lb_tests::cluster::{Cluster, write_manifest};
use xtask::TempDir;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: closed, namespace: default}
spec:
  clusterIP: 10.96.0.20
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  - {name: closed, port: 54, targetPort: 5399, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: closed-1, namespace: default, labels: {kubernetes.io/service-name: closed}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: closed, port: 5399, protocol: UDP}]
endpoints:
- {addresses: ["10.244.1.11"], conditions: {ready: true}, nodeName: node-1}
"#;

#[test]
fn a_closed_udp_port_behind_a_cluster_ip_is_refused_at_once() {
    let mut cluster = Cluster::new(
        "a_closed_udp_port_behind_a_cluster_ip_is_refused_at_once",
        &[("echo-a", Ipv4Addr::new(10, 244, 1, 11))],
    );
    let dir = TempDir::new("lbt", "manifests").expect("manifest dir");
    write_manifest(dir.path(), "closed.yaml", MANIFESTS);
    cluster.start_agent(&["--manifests".to_string(), dir.path().display().to_string()]);
    cluster.wait_until_serving(SocketAddrV4::new(VIP, 80));

    let outcome = cluster
        .client()
        .run(|| -> std::io::Result<(ErrorKind, Duration)> {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.connect((VIP, 54))?;
            socket.set_read_timeout(Some(Duration::from_secs(3)))?;
            let started = Instant::now();
            socket.send(b"anyone?")?;
            let mut buf = [0u8; 64];
            let kind = match socket.recv(&mut buf) {
                Ok(_) => ErrorKind::Other,
                Err(e) => e.kind(),
            };
            Ok((kind, started.elapsed()))
        })
        .expect("client thread")
        .expect("client socket");
    assert_eq!(
        outcome.0,
        ErrorKind::ConnectionRefused,
        "the port unreachable did not reach the socket as the ClusterIP's (after {:?}); agent log:\n{}",
        outcome.1,
        cluster.agent_log()
    );
    let tables = lb_agent::datapath::KernelTables::open(cluster.pins.path()).expect("maps");
    let translated = tables
        .stats
        .get(Reason::IcmpErrorTranslated)
        .expect("stats")
        .packets;
    assert!(translated >= 1, "no ICMP error counted as translated");
}
