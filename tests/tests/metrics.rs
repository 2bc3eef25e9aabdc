//! The agent's Prometheus endpoint, scraped from inside the node namespace:
//! its numbers must match what the datapath and the source really did.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use lb_tests::cluster::{ApiCluster, http_get_path, objects};
use xtask::{http_get, udp_request};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const TIMEOUT: Duration = Duration::from_secs(2);

/// The value of the series `name{labels}` in an OpenMetrics text.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let series = if labels.is_empty() {
        name.to_owned()
    } else {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        format!("{name}{{{}}}", labels.join(","))
    };
    text.lines().find_map(|line| {
        let (head, number) = line.rsplit_once(' ')?;
        (head == series).then(|| number.parse().ok())?
    })
}

fn scrape(cluster: &ApiCluster) -> String {
    http_get_path(
        cluster.topology.node_ns(),
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249),
        "/metrics",
    )
    .expect("scrape /metrics")
}

fn must(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(text, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} missing:\n{text}"))
}

#[test]
fn metrics_report_programming_maps_datapath_counters_and_relists() {
    let pods = [
        ("echo-a", Ipv4Addr::new(10, 244, 1, 11)),
        ("echo-b", Ipv4Addr::new(10, 244, 1, 12)),
    ];
    let cluster = ApiCluster::start(
        "metrics_report_programming_maps_datapath_counters_and_relists",
        &pods,
        &[
            objects::service("echo", VIP),
            objects::endpoint_slice("echo", "echo-1", &pods),
        ],
    );
    cluster.wait_for_backends(
        VIP,
        80,
        Some(pods.iter().map(|(_, ip)| *ip).collect()),
        Duration::from_secs(20),
    );
    let before = scrape(&cluster);
    // Two frontends (TCP 80, UDP 53), two pods on two ports each.
    assert_eq!(must(&before, "lb_programmed_frontends", &[]), 2.0);
    assert_eq!(must(&before, "lb_programmed_backends", &[]), 4.0);
    // The two frontends and the ClusterIP's address marker (port 0), which
    // lets the programs reject ports the service does not define.
    assert_eq!(
        must(
            &before,
            "lb_map_entries",
            &[("map", lb_common::service::NAME)]
        ),
        3.0
    );
    assert_eq!(
        must(
            &before,
            "lb_map_capacity",
            &[("map", lb_common::service::NAME)]
        ),
        f64::from(lb_common::service::MAX_ENTRIES)
    );
    assert!(
        must(
            &before,
            "lb_network_programming_duration_seconds_count",
            &[]
        ) >= 1.0
    );
    let new_flow = [("verdict", "pass"), ("reason", "new_flow")];
    let flows_before = must(&before, "lb_datapath_packets_total", &new_flow);

    const TCP_REQUESTS: usize = 20;
    const UDP_REQUESTS: usize = 5;
    for _ in 0..TCP_REQUESTS {
        http_get(cluster.client(), SocketAddrV4::new(VIP, 80), TIMEOUT).expect("TCP request");
    }
    for _ in 0..UDP_REQUESTS {
        udp_request(cluster.client(), SocketAddrV4::new(VIP, 53), b"q", TIMEOUT)
            .expect("UDP request");
    }
    // A 410 relist shows in the source metrics.
    cluster.api.compact();
    cluster
        .api
        .apply(objects::endpoint_slice("echo", "echo-1", &pods[..1]))
        .expect("apply");
    cluster.wait_for_backends(VIP, 80, Some(vec![pods[0].1]), Duration::from_secs(20));
    // Past the fill-level cache.
    std::thread::sleep(lb_agent::metrics::FILL_REFRESH + Duration::from_millis(200));

    let after = scrape(&cluster);
    let flows = must(&after, "lb_datapath_packets_total", &new_flow) - flows_before;
    assert!(
        flows >= (TCP_REQUESTS + UDP_REQUESTS) as f64,
        "new_flow grew by {flows} after {TCP_REQUESTS} connections and {UDP_REQUESTS} datagrams"
    );
    assert!(
        must(
            &after,
            "lb_datapath_packets_total",
            &[("verdict", "pass"), ("reason", "ct_reply")]
        ) > 0.0
    );
    assert!(
        must(
            &after,
            "lb_map_entries",
            &[("map", lb_common::conntrack::NAME)]
        ) >= (2 * TCP_REQUESTS) as f64,
        "every flow has a forward and a reply entry"
    );
    assert!(
        must(
            &after,
            "lb_source_relists_total",
            &[("kind", "EndpointSlice")]
        ) >= 1.0
    );
    assert_eq!(must(&after, "lb_programmed_backends", &[]), 2.0);
    assert!(
        must(&after, "lb_network_programming_duration_seconds_count", &[])
            > must(
                &before,
                "lb_network_programming_duration_seconds_count",
                &[]
            )
    );
}

#[test]
fn programming_latency_is_measured_from_the_endpoint_slices_trigger_time() {
    let pods = [
        ("echo-a", Ipv4Addr::new(10, 244, 1, 11)),
        ("echo-b", Ipv4Addr::new(10, 244, 1, 12)),
    ];
    let test_start = std::time::Instant::now();
    let cluster = ApiCluster::start(
        "programming_latency_is_measured_from_the_endpoint_slices_trigger_time",
        &pods,
        &[
            objects::service("echo", VIP),
            objects::endpoint_slice("echo", "echo-1", &pods),
        ],
    );
    cluster.wait_for_backends(
        VIP,
        80,
        Some(pods.iter().map(|(_, ip)| *ip).collect()),
        Duration::from_secs(20),
    );
    let from_change = "lb_network_programming_from_change_duration_seconds";
    let before = scrape(&cluster);
    // The initial list carried no trigger time: nothing observed yet.
    assert_eq!(must(&before, &format!("{from_change}_count"), &[]), 0.0);
    // echo-b left 2 s ago; the controller's annotation says so, and the
    // change reaches the agent only now. The agent started over 2 s
    // earlier still (changes from before its start are not measured).
    if let Some(wait) = Duration::from_secs(3).checked_sub(test_start.elapsed()) {
        std::thread::sleep(wait);
    }
    let trigger =
        k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(2);
    let mut slice = objects::endpoint_slice("echo", "echo-1", &pods[..1]);
    slice["metadata"]["annotations"] = serde_json::json!({
        "endpoints.kubernetes.io/last-change-trigger-time": trigger.to_string(),
    });
    cluster.api.apply(slice).expect("apply");
    cluster.wait_for_backends(VIP, 80, Some(vec![pods[0].1]), Duration::from_secs(20));
    let after = scrape(&cluster);
    assert_eq!(must(&after, &format!("{from_change}_count"), &[]), 1.0);
    let took = must(&after, &format!("{from_change}_sum"), &[]);
    assert!(
        (2.0..60.0).contains(&took),
        "from the trigger 2 s ago, not from receipt: {took} s"
    );
    // From receipt, the same program took far less.
    let receipt = "lb_network_programming_duration_seconds";
    let receipt_took = must(&after, &format!("{receipt}_sum"), &[])
        - must(&before, &format!("{receipt}_sum"), &[]);
    assert!(
        receipt_took < took,
        "{receipt_took} s from receipt vs {took} s from the trigger"
    );
}
