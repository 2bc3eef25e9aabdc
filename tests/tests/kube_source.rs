//! The agent's Kubernetes API source end to end: the agent runs in a node
//! namespace with `--kubeconfig` pointing at the list/watch fixture
//! (`lb_tests::apiserver`) listening inside that namespace; changes made
//! through the fixture must reach the pinned maps and real traffic.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use lb_tests::cluster::{ApiCluster, objects, spread};
use xtask::{http_get, udp_request};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const TIMEOUT: Duration = Duration::from_secs(2);
/// The bound for a change to reach the datapath.
const ONE_SECOND: Duration = Duration::from_secs(1);
/// Convergence deadline after a watch was cut (the watcher backs off first).
const RECOVERY: Duration = Duration::from_secs(20);

const A: (&str, Ipv4Addr) = ("echo-a", Ipv4Addr::new(10, 244, 1, 11));
const B: (&str, Ipv4Addr) = ("echo-b", Ipv4Addr::new(10, 244, 1, 12));
const C: (&str, Ipv4Addr) = ("echo-c", Ipv4Addr::new(10, 244, 1, 13));

fn ips(pods: &[(&str, Ipv4Addr)]) -> Option<Vec<Ipv4Addr>> {
    Some(pods.iter().map(|(_, ip)| *ip).collect())
}

fn tcp(cluster: &ApiCluster) -> anyhow::Result<String> {
    http_get(cluster.client(), SocketAddrV4::new(VIP, 80), TIMEOUT)
}

#[test]
fn service_created_scaled_and_deleted_through_the_api_within_a_second() {
    let cluster = ApiCluster::start(
        "service_created_scaled_and_deleted_through_the_api_within_a_second",
        &[A, B, C],
        &[],
    );
    assert_eq!(cluster.programmed_backends(VIP, 80), None);

    cluster
        .api
        .apply(objects::service("echo", VIP))
        .expect("apply");
    cluster
        .api
        .apply(objects::endpoint_slice("echo", "echo-1", &[A, B]))
        .expect("apply");
    let created = cluster.wait_for_backends(VIP, 80, ips(&[A, B]), ONE_SECOND);
    let answers = spread(200, &["echo-a", "echo-b"], 2, || tcp(&cluster));
    assert!(!answers.contains_key("echo-c"), "{answers:?}");
    let udp = udp_request(cluster.client(), SocketAddrV4::new(VIP, 53), b"q", TIMEOUT)
        .expect("UDP through the ClusterIP");
    assert!(udp.starts_with("pod=echo-"), "{udp}");

    cluster
        .api
        .apply(objects::endpoint_slice("echo", "echo-1", &[A, B, C]))
        .expect("scale up");
    let scaled = cluster.wait_for_backends(VIP, 80, ips(&[A, B, C]), ONE_SECOND);
    let answers = spread(300, &["echo-a", "echo-b", "echo-c"], 2, || tcp(&cluster));
    assert!(
        answers.get("echo-c").copied().unwrap_or(0) >= 2,
        "{answers:?}"
    );

    cluster
        .api
        .apply(objects::endpoint_slice("echo", "echo-1", &[C]))
        .expect("scale down");
    let shrunk = cluster.wait_for_backends(VIP, 80, ips(&[C]), ONE_SECOND);
    let served_a = cluster.server("echo-a").tcp_served();
    let answers = spread(20, &[], 0, || tcp(&cluster));
    assert_eq!(answers.get("echo-c"), Some(&20), "{answers:?}");
    assert_eq!(cluster.server("echo-a").tcp_served(), served_a);

    cluster
        .api
        .delete("Service", "default", "echo")
        .expect("delete");
    let deleted = cluster.wait_for_backends(VIP, 80, None, ONE_SECOND);
    assert!(tcp(&cluster).is_err(), "the deleted service still answers");
    println!(
        "API change -> maps: create {created:?}, scale up {scaled:?}, scale down {shrunk:?}, \
         delete {deleted:?}"
    );
}

#[test]
fn a_dropped_watch_and_a_410_relist_lose_no_update() {
    let cluster = ApiCluster::start(
        "a_dropped_watch_and_a_410_relist_lose_no_update",
        &[A, B, C],
        &[
            objects::service("echo", VIP),
            objects::endpoint_slice("echo", "echo-1", &[A]),
        ],
    );
    cluster.wait_for_backends(VIP, 80, ips(&[A]), RECOVERY);

    // Cut every watch mid-stream and change something right away: the
    // update lands while the agent is reconnecting.
    let watches = cluster.api.watches_served();
    cluster.api.drop_watches();
    cluster
        .api
        .apply(objects::endpoint_slice("echo", "echo-1", &[A, B]))
        .expect("apply");
    let resumed = cluster.wait_for_backends(VIP, 80, ips(&[A, B]), RECOVERY);
    assert!(
        cluster.api.watches_served() > watches,
        "the agent never watched again"
    );

    // Forget history: the resumed watches get 410 Gone and must relist.
    let lists = cluster.api.lists_served();
    cluster.api.compact();
    cluster
        .api
        .apply(objects::endpoint_slice("echo", "echo-1", &[B, C]))
        .expect("apply");
    // A service created after the compaction arrives too.
    cluster
        .api
        .apply(objects::service("other", Ipv4Addr::new(10, 96, 0, 21)))
        .expect("apply");
    let relisted = cluster.wait_for_backends(VIP, 80, ips(&[B, C]), RECOVERY);
    cluster.wait_for_backends(Ipv4Addr::new(10, 96, 0, 21), 80, Some(vec![]), RECOVERY);
    assert!(cluster.api.gone_sent() >= 1, "the fixture never sent 410");
    assert!(
        cluster.api.lists_served() > lists,
        "no relist after 410 Gone"
    );
    assert!(
        cluster.agent().log_contents().contains("relisting"),
        "{}",
        cluster.agent_log()
    );
    let answers = spread(200, &["echo-b", "echo-c"], 2, || tcp(&cluster));
    assert!(!answers.contains_key("echo-a"), "{answers:?}");
    println!("recovered: dropped watch {resumed:?}, 410 relist {relisted:?}");
}

#[test]
fn an_api_server_restart_is_recovered() {
    let cluster = ApiCluster::start(
        "an_api_server_restart_is_recovered",
        &[A, B],
        &[
            objects::service("echo", VIP),
            objects::endpoint_slice("echo", "echo-1", &[A]),
        ],
    );
    cluster.wait_for_backends(VIP, 80, ips(&[A]), RECOVERY);

    cluster.api.stop();
    // Changed while the server is down; the agent keeps its programming.
    cluster
        .api
        .apply(objects::endpoint_slice("echo", "echo-1", &[A, B]))
        .expect("apply");
    std::thread::sleep(Duration::from_millis(1500));
    let answers = spread(10, &[], 0, || tcp(&cluster));
    assert_eq!(answers.get("echo-a"), Some(&10), "{answers:?}");
    cluster.api.start_again().expect("restart the fixture");
    let recovered = cluster.wait_for_backends(VIP, 80, ips(&[A, B]), RECOVERY);
    assert!(
        cluster.agent().log_contents().contains("backing off"),
        "the outage was not logged:\n{}",
        cluster.agent_log()
    );
    spread(200, &["echo-a", "echo-b"], 2, || tcp(&cluster));
    println!("recovered {recovered:?} after the fixture came back");
}

#[test]
fn a_bad_object_is_skipped_and_the_others_programmed() {
    let broken_vip = Ipv4Addr::new(10, 96, 0, 30);
    let mut broken = objects::service("broken", broken_vip);
    broken["spec"]["ports"] = serde_json::json!("oops");
    let mut bad_slice = objects::endpoint_slice("echo", "echo-bad", &[B]);
    bad_slice
        .as_object_mut()
        .expect("object")
        .remove("addressType");
    // In the initial list: one bad item must not hide the others.
    let cluster = ApiCluster::start(
        "a_bad_object_is_skipped_and_the_others_programmed",
        &[A, B],
        &[
            broken.clone(),
            objects::service("echo", VIP),
            bad_slice,
            objects::endpoint_slice("echo", "echo-1", &[A]),
        ],
    );
    cluster.wait_for_backends(VIP, 80, ips(&[A]), ONE_SECOND);
    let answers = spread(10, &[], 0, || tcp(&cluster));
    assert_eq!(answers.get("echo-a"), Some(&10), "{answers:?}");
    assert_eq!(cluster.programmed_backends(broken_vip, 80), None);
    let log = cluster.agent().log_contents();
    for needle in [
        "Service default/broken: spec.ports: invalid type",
        "EndpointSlice default/echo-bad: ",
    ] {
        assert!(log.contains(needle), "{needle:?} not logged:\n{log}");
    }

    // The watch keeps working: a bad update is skipped (the last good
    // version stays), a fixed object is programmed.
    let mut bad_update = objects::endpoint_slice("echo", "echo-1", &[A, B]);
    bad_update["endpoints"] = serde_json::json!({"not": "a list"});
    cluster.api.apply(bad_update).expect("apply");
    broken["spec"]["ports"] = objects::service("x", broken_vip)["spec"]["ports"].clone();
    cluster.api.apply(broken).expect("apply");
    cluster.wait_for_backends(broken_vip, 80, Some(vec![]), ONE_SECOND);
    assert_eq!(cluster.programmed_backends(VIP, 80), ips(&[A]));
}
