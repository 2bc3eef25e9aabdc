//! A new pod's device is attached on its link notification (RTM_NEWLINK),
//! not at the next once-a-second resync: the pod's very first connection to
//! a ClusterIP, made as soon as its veth is wired, is translated. Also
//! measures link-up-to-attached: from just before `ip link add` until the
//! agent's pinned link for the device exists.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::cluster::{ApiCluster, objects};
use xtask::{http_get, pod_of};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 70);
const NEW_PODS: u8 = 8;

/// Polls (every 200 us, at most 5 s) until `pin` exists; the time since
/// `since`, or `None`.
fn wait_for_pin(pin: PathBuf, since: Instant, stop: Arc<AtomicBool>) -> Option<Duration> {
    while since.elapsed() < Duration::from_secs(5) && !stop.load(Ordering::Relaxed) {
        if pin.exists() {
            return Some(since.elapsed());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    None
}

#[test]
fn a_new_pods_first_connection_is_translated() {
    let pods = [
        ("echo-a", Ipv4Addr::new(10, 244, 1, 11)),
        ("echo-b", Ipv4Addr::new(10, 244, 1, 12)),
    ];
    let mut cluster = ApiCluster::start(
        "a_new_pods_first_connection_is_translated",
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
    // Past the agent's first resync, so only notifications attach new pods
    // in time (the resync runs once a second).
    std::thread::sleep(Duration::from_millis(1200));

    let mut latencies = Vec::new();
    for n in 0..NEW_PODS {
        let name = format!("new-{n}");
        let ip = Ipv4Addr::new(10, 244, 1, 100 + n);
        // The topology names host sides lbv1, lbv2, ... in order: the
        // clients and echo pods took the first ones.
        let host_if = format!("lbv{}", cluster.topology.pods().len() + 1);
        let pin = cluster
            .pins
            .path()
            .join(format!("link_tcx_ingress_{host_if}"));
        assert!(!pin.exists(), "{} exists already", pin.display());
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (pin, stop) = (pin.clone(), stop.clone());
            let since = Instant::now();
            std::thread::spawn(move || wait_for_pin(pin, since, stop))
        };
        cluster.topology.add_pod(&name, ip).expect("add a pod");
        let pod = cluster.topology.pod(&name).expect("pod");
        assert_eq!(pod.host_if(), host_if);
        // The first connection of the pod, as soon as its network is up.
        let first = http_get(pod.ns(), SocketAddrV4::new(VIP, 80), Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        let attached = watcher.join().expect("pin watcher");
        let reply = first.unwrap_or_else(|e| {
            panic!(
                "{name}'s first connection to {VIP}:80 failed: {e:#}\nagent log:\n{}",
                cluster.agent_log()
            )
        });
        assert!(
            pod_of(&reply).is_some_and(|p| p.starts_with("echo-")),
            "{name}: {reply:?}"
        );
        let attached = attached.unwrap_or_else(|| {
            panic!(
                "{host_if} was not attached before the first connection ended; agent log:\n{}",
                cluster.agent_log()
            )
        });
        latencies.push(attached);
    }
    latencies.sort();
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let notified: Vec<String> = cluster
        .agent()
        .log_contents()
        .lines()
        .filter(|l| l.contains("after its link notification"))
        .filter_map(|l| l.split(", ").last().map(str::to_owned))
        .collect();
    println!(
        "link-up-to-attached over {} new pods: min {:.1} ms, median {:.1} ms, max {:.1} ms; \
         agent, notification to pinned link: {notified:?}",
        latencies.len(),
        ms(&latencies[0]),
        ms(&latencies[latencies.len() / 2]),
        ms(&latencies[latencies.len() - 1]),
    );
    assert_eq!(
        notified.len(),
        usize::from(NEW_PODS),
        "not every new pod was attached on its notification; agent log:\n{}",
        cluster.agent_log()
    );
    // Far under the resync period: attached on the notification.
    assert!(
        latencies[latencies.len() / 2] < Duration::from_millis(250),
        "{latencies:?}"
    );
}
