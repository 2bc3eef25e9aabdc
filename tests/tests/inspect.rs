//! Inspection: `lbctl` and `bpftool` over the pinned maps of the demo's
//! topology (three echo pods and a client behind `default/echo` from
//! `examples/manifests`), checked against the manifests and against the
//! traffic the test itself sends.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    process::Command,
    time::Duration,
};

use lb_tests::cluster::{CLIENT_IP, Cluster};
use serde_json::Value;
use xtask::TempDir;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PODS: [(&str, Ipv4Addr); 3] = [
    ("echo-a", Ipv4Addr::new(10, 244, 1, 11)),
    ("echo-b", Ipv4Addr::new(10, 244, 1, 12)),
    ("echo-c", Ipv4Addr::new(10, 244, 1, 13)),
];
const TIMEOUT: Duration = Duration::from_secs(2);

/// `$LBCTL_BIN` or the workspace's debug build of `lbctl`.
/// The demo's cluster: the example manifests copied to a temp dir, the
/// agent on them, the service answering.
struct Demo {
    cluster: Cluster,
    manifests: TempDir,
}

impl Demo {
    fn start(test: &str) -> Demo {
        Self::start_with(test, &[])
    }

    /// [`Demo::start`] with more agent arguments.
    fn start_with(test: &str, agent_args: &[&str]) -> Demo {
        let mut cluster = Cluster::new(test, &PODS);
        let manifests = TempDir::new("lbt", "manifests").expect("manifest dir");
        let from = xtask::workspace_root().join("examples/manifests");
        for entry in std::fs::read_dir(&from).expect("examples/manifests") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "yaml") {
                std::fs::copy(
                    &path,
                    manifests.path().join(path.file_name().expect("name")),
                )
                .expect("copy manifest");
            }
        }
        let mut args = vec![
            "--manifests".to_owned(),
            manifests.path().display().to_string(),
        ];
        args.extend(agent_args.iter().map(|a| a.to_string()));
        cluster.start_agent(&args);
        cluster.wait_until_serving(SocketAddrV4::new(VIP, 80));
        Demo { cluster, manifests }
    }

    fn lbctl(&self, args: &[&str]) -> String {
        let out = Command::new(lb_tests::lbctl_binary())
            .arg("--bpffs")
            .arg(self.cluster.pins.path())
            .args(args)
            .output()
            .expect("run lbctl");
        assert!(
            out.status.success(),
            "lbctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// The service id of `frontend` (`10.96.0.10:53/UDP`): the
    /// dual-stack service has a frontend of each name per family, so the
    /// per-service counters are told apart by id.
    fn service_id(&self, frontend: &str) -> Value {
        let services = self.lbctl_json(&["services"]);
        services
            .as_array()
            .expect("array")
            .iter()
            .find(|row| row["frontend"] == frontend)
            .map(|row| row["service_id"].clone())
            .unwrap_or_else(|| panic!("no frontend {frontend}:\n{services:#}"))
    }

    fn lbctl_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let text = self.lbctl(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("lbctl {args:?}: {e}:\n{text}"))
    }

    /// Sends one datagram from `client_port` (explicit, so each is a new
    /// flow the datapath has never seen) to the DNS port and waits for the
    /// answer.
    fn udp_from_port(&self, client_port: u16) -> String {
        self.cluster
            .client()
            .run(move || -> anyhow::Result<String> {
                let socket =
                    UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, client_port))?;
                socket.connect(SocketAddrV4::new(VIP, 53))?;
                socket.set_read_timeout(Some(TIMEOUT))?;
                socket.send(b"query")?;
                let mut buf = [0u8; 2048];
                let n = socket.recv(&mut buf)?;
                Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
            })
            .expect("run in client")
            .unwrap_or_else(|e| panic!("UDP request from port {client_port}: {e:#}"))
    }
}

/// The counters of the frontend with service id `id`; `null` (all zero)
/// before its first packet, when the datapath has no entry for it yet.
fn service_stats(stats: &Value, id: &Value) -> Value {
    stats["services"]
        .as_array()
        .expect("services array")
        .iter()
        .find(|s| s["service_id"] == *id)
        .cloned()
        .unwrap_or(Value::Null)
}

fn packets(service: &Value, counter: &str) -> u64 {
    service[counter]["packets"].as_u64().unwrap_or(0)
}

#[test]
fn lbctl_services_json_matches_the_example_manifests() {
    let demo = Demo::start("lbctl_services_json_matches_the_example_manifests");
    let services = demo.lbctl_json(&["services"]);
    let rows = services.as_array().expect("array");
    assert_eq!(
        rows.len(),
        4,
        "two frontends (80/TCP, 53/UDP) per ClusterIP of the dual-stack service:\n{services:#}"
    );
    for (frontend, port_name, target) in [
        ("10.96.0.10:80/TCP", "http", 8080),
        ("10.96.0.10:53/UDP", "dns", 5353),
        ("[fd00:10:96::10]:80/TCP", "http", 8080),
        ("[fd00:10:96::10]:53/UDP", "dns", 5353),
    ] {
        let row = rows
            .iter()
            .find(|r| r["frontend"] == frontend)
            .unwrap_or_else(|| panic!("no frontend {frontend}:\n{services:#}"));
        assert_eq!(row["type"], "ClusterIP", "{row:#}");
        assert_eq!(row["scope"], "external", "{row:#}");
        assert_eq!(row["policy"], "Cluster", "{row:#}");
        assert_eq!(row["service"], "default/echo", "{row:#}");
        assert_eq!(row["port_name"], port_name, "{row:#}");
        assert_eq!(row["affinity_timeout"], 0, "sessionAffinity None: {row:#}");
        let backends: BTreeSet<String> = row["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .map(|b| {
                assert_eq!(b["state"], "active", "{b:#}");
                assert_eq!(b["local"], true, "all pods are on node-1: {b:#}");
                b["address"].as_str().expect("address").to_owned()
            })
            .collect();
        // Each family's backends come from its own EndpointSlice.
        let want: BTreeSet<String> = PODS
            .iter()
            .map(|(_, ip)| {
                if frontend.starts_with('[') {
                    format!("[{}]:{target}", xtask::topology::mirror6(*ip))
                } else {
                    format!("{ip}:{target}")
                }
            })
            .collect();
        assert_eq!(backends, want, "{frontend}");
    }

    // The table view says the same, with the name.
    let table = demo.lbctl(&["services"]);
    assert!(table.contains("default/echo (http)"), "{table}");
    let backends = demo.lbctl_json(&["backends"]);
    assert_eq!(backends.as_array().map(Vec::len), Some(12), "{backends:#}");
}

#[test]
fn lbctl_stats_count_exactly_the_flows_sent() {
    let demo = Demo::start("lbctl_stats_count_exactly_the_flows_sent");
    let (dns, http) = (
        demo.service_id("10.96.0.10:53/UDP"),
        demo.service_id("10.96.0.10:80/TCP"),
    );
    let before = demo.lbctl_json(&["stats"]);
    let dns_before = service_stats(&before, &dns);

    // UDP from fresh source ports: each datagram is exactly one new flow
    // and its answer exactly one translated reply; nothing else talks to
    // the DNS frontend in this topology.
    const DATAGRAMS: u16 = 12;
    for i in 0..DATAGRAMS {
        demo.udp_from_port(41000 + i);
    }
    const CONNECTIONS: usize = 5;
    for _ in 0..CONNECTIONS {
        xtask::http_get(demo.cluster.client(), SocketAddrV4::new(VIP, 80), TIMEOUT)
            .expect("TCP request");
    }
    let after = demo.lbctl_json(&["stats"]);
    let dns_after = service_stats(&after, &dns);
    assert!(
        !dns_after.is_null(),
        "no stats for default/echo dns:\n{after:#}"
    );
    for (counter, want) in [
        ("new_flow", DATAGRAMS),
        ("ct_reply", DATAGRAMS),
        ("ct_forward", 0),
    ] {
        assert_eq!(
            packets(&dns_after, counter) - packets(&dns_before, counter),
            u64::from(want),
            "{counter} of default/echo dns after {DATAGRAMS} datagrams from fresh ports:\n\
             before {dns_before:#}\nafter {dns_after:#}"
        );
    }
    assert_eq!(packets(&dns_after, "dropped"), 0, "{dns_after:#}");

    // TCP: one new flow per connection (a retransmitted SYN would hit the
    // conntrack entry, not balance again); its other packets are forward
    // and reply packets.
    let http_before = service_stats(&before, &http);
    let http_after = service_stats(&after, &http);
    let new_flows = packets(&http_after, "new_flow") - packets(&http_before, "new_flow");
    assert_eq!(
        new_flows, CONNECTIONS as u64,
        "new_flow of default/echo http after {CONNECTIONS} connections"
    );
    assert!(
        packets(&http_after, "ct_forward") - packets(&http_before, "ct_forward")
            >= 3 * CONNECTIONS as u64,
        "every connection sends at least ACK, request and FIN: {http_after:#}"
    );

    // The global per-reason counters include these flows.
    let reason = |stats: &Value, name: &str| {
        stats["reasons"]
            .as_array()
            .expect("reasons")
            .iter()
            .find(|r| r["reason"] == name)
            .and_then(|r| r["packets"].as_u64())
            .unwrap_or_else(|| panic!("no reason {name}"))
    };
    assert!(
        reason(&after, "new_flow") - reason(&before, "new_flow")
            >= u64::from(DATAGRAMS) + CONNECTIONS as u64
    );

    // Conntrack shows the flows with their service.
    let flows = demo.lbctl_json(&["conntrack", "--service", "default/echo"]);
    let udp: Vec<&Value> = flows
        .as_array()
        .expect("array")
        .iter()
        .filter(|f| {
            f["protocol"] == "UDP" && f["client"].as_str().is_some_and(|c| c.contains(":410"))
        })
        .collect();
    assert_eq!(udp.len(), usize::from(DATAGRAMS), "{flows:#}");
    for flow in udp {
        assert_eq!(flow["state"], "replied", "{flow:#}");
        assert_eq!(flow["service"], "default/echo", "{flow:#}");
        assert!(
            flow["age_s"]
                .as_f64()
                .is_some_and(|a| (0.0..60.0).contains(&a)),
            "{flow:#}"
        );
    }
}

#[test]
fn lbctl_trace_shows_each_new_flow_with_its_backend() {
    let demo = Demo::start("lbctl_trace_shows_each_new_flow_with_its_backend");
    const FLOWS: u16 = 6;
    let client = format!("{CLIENT_IP}/32");
    let count = FLOWS.to_string();
    let trace = lb_tests::Trace::start(
        demo.cluster.pins.path(),
        &[
            "--service",
            "default/echo",
            "--client",
            &client,
            "--count",
            &count,
            "--seconds",
            "30",
        ],
    );
    let config = lb_agent::datapath::KernelTables::open(demo.cluster.pins.path())
        .expect("tables")
        .config()
        .expect("config");
    assert_ne!(
        config.flags & lb_common::config::FLAG_TRACE,
        0,
        "tracing is not on in the datapath"
    );

    let mut answered_by = Vec::new();
    for i in 0..FLOWS {
        let answer = demo.udp_from_port(42000 + i);
        answered_by.push(xtask::pod_of(&answer).expect("pod name").to_owned());
    }
    let events = trace.events();
    assert_eq!(events.len(), usize::from(FLOWS), "{events:#?}");
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event["event"], "new_flow", "{event:#}");
        assert_eq!(event["service"], "default/echo", "{event:#}");
        assert_eq!(event["selection"], "random", "{event:#}");
        assert_eq!(
            event["client"],
            format!("{CLIENT_IP}:{}", 42000 + i),
            "{event:#}"
        );
        assert_eq!(event["frontend"], "10.96.0.10:53", "{event:#}");
        // The backend the trace names is the pod that answered.
        let pod_ip = PODS
            .iter()
            .find(|(name, _)| *name == answered_by[i])
            .map(|(_, ip)| *ip)
            .expect("known pod");
        assert_eq!(event["backend"], format!("{pod_ip}:5353"), "{event:#}");
    }
    // Tracing is off again once lbctl is done.
    let config = lb_agent::datapath::KernelTables::open(demo.cluster.pins.path())
        .expect("tables")
        .config()
        .expect("config");
    assert_eq!(config.flags & lb_common::config::FLAG_TRACE, 0);
}

#[test]
fn bpftool_dumps_of_the_inspection_maps_have_field_names() {
    let demo = Demo::start("bpftool_dumps_of_the_inspection_maps_have_field_names");
    demo.udp_from_port(43000);
    for (map, fields) in [
        (
            lb_common::service_name::NAME,
            &["namespace", "name", "port_name"][..],
        ),
        (
            lb_common::service_stats::NAME,
            &[
                "new_flow",
                "ct_forward",
                "ct_reply",
                "dropped",
                "packets",
                "bytes",
            ][..],
        ),
        (
            lb_common::backend::NAME,
            &["addr", "port", "proto", "flags"][..],
        ),
        (
            lb_common::conntrack::NAME,
            &[
                "src_addr",
                "dst_addr",
                "service_id",
                "backend_id",
                "created_ns",
            ][..],
        ),
    ] {
        let out = Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(demo.cluster.pins.path().join(map))
            .output()
            .expect("run bpftool");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "bpftool {map}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for field in fields {
            assert!(
                text.contains(&format!("\"{field}\"")),
                "{map}: bpftool output lacks field {field}:\n{text}"
            );
        }
    }
}

#[test]
fn bpf_log_prints_a_line_per_new_flow_only_with_the_flag() {
    let mut demo = Demo::start_with(
        "bpf_log_prints_a_line_per_new_flow_only_with_the_flag",
        &["--bpf-log"],
    );
    demo.udp_from_port(44000);
    demo.cluster
        .agent_mut()
        .wait_for_log(
            &format!("new flow {CLIENT_IP}:44000 -> {VIP}:53"),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| {
            panic!(
                "no aya-log line for the flow: {e:#}\n{}",
                demo.cluster.agent_log()
            )
        });
    let config = lb_agent::datapath::KernelTables::open(demo.cluster.pins.path())
        .expect("tables")
        .config()
        .expect("config");
    assert_ne!(config.flags & lb_common::config::FLAG_LOG, 0);
}

/// A Service whose endpoint is echo-a on ports nothing listens on: TCP
/// attempts are refused with a RST, UDP datagrams with ICMP port
/// unreachable, both from the pod's own stack.
const CLOSED_MANIFEST: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: closed
  namespace: default
spec:
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20]
  ipFamilies: [IPv4]
  ports:
  - {name: web, port: 80, protocol: TCP, targetPort: 9999}
  - {name: dns, port: 53, protocol: UDP, targetPort: 9999}
  type: ClusterIP
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: closed-1
  namespace: default
  labels: {kubernetes.io/service-name: closed}
addressType: IPv4
endpoints:
- addresses: [10.244.1.11]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-1
ports:
- {name: web, port: 9999, protocol: TCP}
- {name: dns, port: 9999, protocol: UDP}
"#;

/// The `lbctl backends -o json` row of `address`/`protocol`.
fn backend_row(rows: &Value, address: &str, protocol: &str) -> Value {
    rows.as_array()
        .expect("array")
        .iter()
        .find(|r| r["address"] == address && r["protocol"] == protocol)
        .cloned()
        .unwrap_or_else(|| panic!("no backend {address}/{protocol}:\n{rows:#}"))
}

#[test]
fn backends_show_new_flows_failed_attempts_and_active_flows() {
    let demo = Demo::start_with(
        "backends_show_new_flows_failed_attempts_and_active_flows",
        &["--conntrack-gc-interval", "1s"],
    );
    lb_tests::cluster::write_manifest(demo.manifests.path(), "closed.yaml", CLOSED_MANIFEST);
    let closed = Ipv4Addr::new(10, 96, 0, 20);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while demo.cluster.programmed_backends(closed, 80).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "closed never programmed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Refused attempts: five TCP connects (RST) and three datagrams
    // (ICMP port unreachable), each a new flow.
    let refused = demo
        .cluster
        .client()
        .run(move || {
            let mut refused = 0;
            for _ in 0..5 {
                let target = std::net::SocketAddr::from(SocketAddrV4::new(closed, 80));
                if let Err(e) = std::net::TcpStream::connect_timeout(&target, TIMEOUT)
                    && e.kind() == std::io::ErrorKind::ConnectionRefused
                {
                    refused += 1;
                }
            }
            for port in 0..3u16 {
                let socket =
                    UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 44000 + port))
                        .expect("bind");
                socket
                    .connect(SocketAddrV4::new(closed, 53))
                    .expect("connect");
                socket.send(b"query").expect("send");
                socket.set_read_timeout(Some(TIMEOUT)).expect("timeout");
                let mut buf = [0u8; 64];
                // The translated ICMP error reaches the connected socket.
                if socket.recv(&mut buf).is_err() {
                    refused += 1;
                }
            }
            refused
        })
        .expect("run in client");
    assert_eq!(refused, 8, "every attempt to the closed ports is refused");
    // Answered attempts, and one connection held open.
    for _ in 0..4 {
        xtask::http_get(demo.cluster.client(), SocketAddrV4::new(VIP, 80), TIMEOUT)
            .expect("echo answers");
    }
    let held = demo
        .cluster
        .client()
        .run(|| std::net::TcpStream::connect_timeout(&SocketAddrV4::new(VIP, 80).into(), TIMEOUT))
        .expect("run in client")
        .expect("held connection");
    // The collector's census (1 s interval) has seen the held flow.
    std::thread::sleep(Duration::from_millis(2500));

    // The table docs/inspecting.md shows (visible with --nocapture).
    println!("{}", demo.lbctl(&["backends"]));
    let rows = demo.lbctl_json(&["backends"]);
    let tcp = backend_row(&rows, "10.244.1.11:9999", "TCP");
    assert_eq!(tcp["new_flows"], 5, "{tcp:#}");
    assert_eq!(tcp["failed"], 5, "every RST counted: {tcp:#}");
    assert_eq!(tcp["answered"], 0, "{tcp:#}");
    assert_eq!(tcp["traffic"][0]["service"], "default/closed", "{tcp:#}");
    let udp = backend_row(&rows, "10.244.1.11:9999", "UDP");
    assert_eq!(udp["new_flows"], 3, "{udp:#}");
    assert_eq!(udp["failed"], 3, "every ICMP error counted: {udp:#}");
    let echo: Vec<Value> = PODS
        .iter()
        .map(|(_, ip)| backend_row(&rows, &format!("{ip}:8080"), "TCP"))
        .collect();
    let sum = |field: &str| {
        echo.iter()
            .map(|r| r[field].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    // wait_until_serving's probes count too: at least ours.
    assert!(sum("new_flows") >= 5, "{echo:#?}");
    assert_eq!(sum("failed"), 0, "{echo:#?}");
    assert_eq!(
        sum("answered"),
        sum("new_flows"),
        "every echo attempt answered: {echo:#?}"
    );
    assert_eq!(sum("active_flows"), 1, "the held connection: {echo:#?}");
    assert!(sum("bytes") > 0, "{echo:#?}");

    // The same facts in Prometheus, labelled by service port and backend.
    let text = lb_tests::cluster::http_get_path(
        demo.cluster.topology.node_ns(),
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249),
        "/metrics",
    )
    .expect("scrape /metrics");
    for (series, want) in [
        (
            r#"lb_backend_failed_attempts_total{namespace="default",service="closed",port="web",backend="10.244.1.11:9999"}"#,
            5,
        ),
        (
            r#"lb_backend_new_flows_total{namespace="default",service="closed",port="dns",backend="10.244.1.11:9999"}"#,
            3,
        ),
        (
            r#"lb_backend_failed_attempts_total{namespace="default",service="closed",port="dns",backend="10.244.1.11:9999"}"#,
            3,
        ),
    ] {
        let line = format!("{series} {want}");
        assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
    }
    let active: u64 = text
        .lines()
        .filter(|l| {
            l.starts_with(
                r#"lb_backend_active_flows{namespace="default",service="echo",port="http""#,
            )
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum();
    assert_eq!(active, 1, "the held connection:\n{text}");
    drop(held);
}
