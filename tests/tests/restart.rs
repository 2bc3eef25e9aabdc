//! An agent restart drops nothing: continuous new TCP connections and UDP
//! requests through a ClusterIP, plus one held TCP connection, while the
//! agent is SIGKILLed and started again on the same `--bpffs`. The pinned
//! TCX links keep the program attached while no agent runs; the pinned maps
//! keep services and conntrack; the new agent adopts both.
//!
//! A map layout upgrade drops nothing either: the new agent finds only
//! pins of an older version, creates its maps empty, and must fill them
//! before its programs replace the old ones on the devices.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::cluster::{ApiCluster, objects};
use xtask::{HoldConnection, pod_of};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const TIMEOUT: Duration = Duration::from_secs(2);
/// Bounds of the traffic loop, whatever happens.
const MAX_ROUNDS: u64 = 5000;
const MAX_LOAD_TIME: Duration = Duration::from_secs(90);

#[derive(Default)]
struct Tally {
    tcp_ok: AtomicU64,
    udp_ok: AtomicU64,
    failures: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    fn ok(&self) -> u64 {
        self.tcp_ok.load(Ordering::Relaxed) + self.udp_ok.load(Ordering::Relaxed)
    }
}

/// One HTTP request on a new connection (runs inside the client pod).
fn tcp_request() -> anyhow::Result<()> {
    let addr = SocketAddrV4::new(VIP, 80);
    let mut stream = TcpStream::connect_timeout(&addr.into(), TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    anyhow::ensure!(
        response.starts_with("HTTP/1.0 200") && response.contains("pod=echo-"),
        "bad answer {response:?}"
    );
    Ok(())
}

/// One UDP request from a new socket (runs inside the client pod).
fn udp_request() -> anyhow::Result<()> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(SocketAddrV4::new(VIP, 53))?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.send(b"query")?;
    let mut answer = [0u8; 512];
    let n = socket.recv(&mut answer)?;
    anyhow::ensure!(
        answer[..n].starts_with(b"pod=echo-"),
        "bad answer {:?}",
        String::from_utf8_lossy(&answer[..n])
    );
    Ok(())
}

/// Runs TCP and UDP requests from the client pod until `stop` (bounded by
/// [`MAX_ROUNDS`] and [`MAX_LOAD_TIME`]), counting them in `tally`.
fn start_load(
    cluster: &ApiCluster,
    stop: &Arc<AtomicBool>,
    tally: &Arc<Tally>,
) -> std::thread::JoinHandle<()> {
    let (thread_stop, thread_tally) = (stop.clone(), tally.clone());
    cluster
        .client()
        .spawn_thread("load", move || {
            let started = Instant::now();
            for round in 0..MAX_ROUNDS {
                if thread_stop.load(Ordering::Relaxed) || started.elapsed() > MAX_LOAD_TIME {
                    break;
                }
                match tcp_request() {
                    Ok(()) => _ = thread_tally.tcp_ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => thread_tally.failures.lock().expect("tally").push(format!(
                        "round {round} TCP at {:?}: {e:#}",
                        started.elapsed()
                    )),
                }
                match udp_request() {
                    Ok(()) => _ = thread_tally.udp_ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => thread_tally.failures.lock().expect("tally").push(format!(
                        "round {round} UDP at {:?}: {e:#}",
                        started.elapsed()
                    )),
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .expect("start the load thread")
}

/// What a previous agent of an older layout leaves: every versioned pin
/// under `pins` one version lower (`LB4_SERVICES_V1` -> `_V0`), except
/// conntrack's, whose layout this simulated upgrade keeps. Returns the new
/// names. (A conntrack layout change also loses the flows that cross two
/// devices while their programs are replaced one after the other; see
/// docs/decisions.md.)
fn age_pins(pins: &std::path::Path) -> Vec<String> {
    let keep = [lb_common::conntrack::NAME, lb_common::conntrack::NAME6];
    let mut aged = Vec::new();
    for entry in std::fs::read_dir(pins).expect("list pins") {
        let name = entry
            .expect("entry")
            .file_name()
            .into_string()
            .expect("utf-8");
        if keep.contains(&name.as_str()) {
            continue;
        }
        let Some((base, version)) = name.rsplit_once("_V") else {
            continue;
        };
        let Ok(version) = version.parse::<u32>() else {
            continue;
        };
        let older = format!("{base}_V{}", version.saturating_sub(1));
        std::fs::rename(pins.join(&name), pins.join(&older)).expect("rename a pin");
        aged.push(older);
    }
    aged.sort();
    aged
}

#[test]
fn a_map_layout_upgrade_drops_no_request() {
    let pods = [
        ("echo-a", Ipv4Addr::new(10, 244, 1, 11)),
        ("echo-b", Ipv4Addr::new(10, 244, 1, 12)),
    ];
    let mut cluster = ApiCluster::start(
        "a_map_layout_upgrade_drops_no_request",
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
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let load = start_load(&cluster, &stop, &tally);

    std::thread::sleep(Duration::from_millis(500));
    cluster.kill_agent();
    let aged = age_pins(cluster.pins.path());
    assert!(
        aged.iter().any(|n| n.starts_with("LB4_SERVICES_V")),
        "no service map pin to age: {aged:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let before_upgrade = tally.ok();
    cluster.restart_agent();
    cluster
        .agent_mut()
        .wait_for_log("removed pins of older map layouts", Duration::from_secs(30))
        .expect("the new agent created its maps fresh and dropped the old pins");
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    load.join().expect("load thread");
    let after_upgrade = tally.ok() - before_upgrade;

    let failures = tally.failures.lock().expect("tally").clone();
    println!(
        "layout upgrade: {} requests answered ({after_upgrade} from the agent's restart on), \
         {} failed",
        tally.ok(),
        failures.len()
    );
    assert!(after_upgrade > 0, "no request completed after the upgrade");
    assert!(
        failures.is_empty(),
        "{} requests failed across the upgrade: {failures:#?}\nagent log:\n{}",
        failures.len(),
        cluster.agent_log()
    );
    // The new maps hold the service: the old ones are gone.
    assert!(
        !cluster.pins.path().join("LB4_SERVICES_V0").exists(),
        "old pins left"
    );
}

#[test]
fn sigkill_and_restart_of_the_agent_drop_no_request() {
    let pods = [
        ("echo-a", Ipv4Addr::new(10, 244, 1, 11)),
        ("echo-b", Ipv4Addr::new(10, 244, 1, 12)),
    ];
    let mut cluster = ApiCluster::start(
        "sigkill_and_restart_of_the_agent_drop_no_request",
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
    let mut held = HoldConnection::open(cluster.client(), SocketAddrV4::new(VIP, 80), TIMEOUT)
        .expect("open the held connection");
    let held_pod = pod_of(&held.ask().expect("first answer"))
        .expect("pod name")
        .to_owned();

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let load = start_load(&cluster, &stop, &tally);

    std::thread::sleep(Duration::from_millis(500));
    cluster.kill_agent();
    let killed_at = tally.ok();
    // No agent at all for a while: the datapath must keep translating.
    std::thread::sleep(Duration::from_secs(1));
    let answer = held.ask().expect("held connection while no agent runs");
    assert_eq!(pod_of(&answer), Some(held_pod.as_str()));
    let agentless = tally.ok() - killed_at;

    cluster.restart_agent();
    cluster
        .agent_mut()
        .wait_for_log("programmed", Duration::from_secs(30))
        .expect("the restarted agent programmed");
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    load.join().expect("load thread");
    let answer = held.ask().expect("held connection after the restart");
    assert_eq!(
        pod_of(&answer),
        Some(held_pod.as_str()),
        "held connection moved"
    );

    let failures = tally.failures.lock().expect("tally").clone();
    let (tcp_ok, udp_ok) = (
        tally.tcp_ok.load(Ordering::Relaxed),
        tally.udp_ok.load(Ordering::Relaxed),
    );
    println!(
        "restart: {tcp_ok} TCP and {udp_ok} UDP requests answered ({agentless} while no agent \
         ran), {} failed",
        failures.len()
    );
    assert!(
        agentless > 0,
        "no request completed while the agent was down"
    );
    assert!(
        failures.is_empty(),
        "{} requests failed across the restart: {failures:#?}\nagent log:\n{}",
        failures.len(),
        cluster.agent_log()
    );
}
