//! Faults under continuous traffic (issue 8), each reporting the number of
//! failed requests (asserted zero): a rolling update of a deployment's
//! pods driven through the manifest directory, and an API server restart
//! plus a cut watch stream while the service changes. The agent's own
//! SIGKILL and restart is `restart.rs`.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_tests::cluster::{ApiCluster, Cluster, POD_TCP_PORT, objects, write_manifest};
use xtask::{NetNs, TempDir};

const TIMEOUT: Duration = Duration::from_secs(2);
/// Bounds of every traffic loop, whatever happens.
const MAX_REQUESTS: u64 = 20_000;
const MAX_LOAD_TIME: Duration = Duration::from_secs(120);

/// New TCP connections to `vip:80` from a thread in `ns`, one after the
/// other, until stopped; counts answers per pod and failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    pods: Arc<Mutex<std::collections::BTreeMap<String, u64>>>,
    thread: Option<JoinHandle<()>>,
}

impl Load {
    fn start(ns: &NetNs, vip: Ipv4Addr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let pods = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
        let (s, o, f, p) = (stop.clone(), ok.clone(), failures.clone(), pods.clone());
        let thread = ns
            .spawn_thread("load", move || {
                let started = Instant::now();
                for n in 0..MAX_REQUESTS {
                    if s.load(Ordering::Relaxed) || started.elapsed() > MAX_LOAD_TIME {
                        break;
                    }
                    match request(SocketAddrV4::new(vip, 80)) {
                        Ok(pod) => {
                            o.fetch_add(1, Ordering::Relaxed);
                            *p.lock().expect("pods").entry(pod).or_insert(0) += 1;
                        }
                        Err(e) => f
                            .lock()
                            .expect("failures")
                            .push(format!("request {n} at {:?}: {e:#}", started.elapsed())),
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
            .expect("load thread");
        Load {
            stop,
            ok,
            failures,
            pods,
            thread: Some(thread),
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits (bounded) until `more` further requests were answered.
    fn wait_for(&self, more: u64) {
        let target = self.ok() + more;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.ok() < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the loop: (answered, failures, answers per pod).
    fn finish(mut self) -> (u64, Vec<String>, std::collections::BTreeMap<String, u64>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("load thread");
        }
        let failures = self.failures.lock().expect("failures").clone();
        let pods = self.pods.lock().expect("pods").clone();
        (self.ok(), failures, pods)
    }
}

/// One HTTP request on a new connection; the pod that answered.
fn request(addr: SocketAddrV4) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr.into(), TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    anyhow::ensure!(
        response.starts_with("HTTP/1.0 200"),
        "bad answer {response:?}"
    );
    xtask::pod_of(&response)
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no pod in {response:?}"))
}

/// `(pod, ip, ready, serving, terminating)` endpoints of the `web` slice.
fn web_slice(endpoints: &[(&str, Ipv4Addr, bool, bool, bool)]) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{namespace: default, name: web}}\nspec:\n  \
         clusterIP: 10.96.0.70\n  ports: [{{name: http, port: 80, targetPort: {POD_TCP_PORT}}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  namespace: default\n  \
         name: web-1\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\n\
         ports: [{{name: http, port: {POD_TCP_PORT}}}]\nendpoints:\n"
    );
    for (pod, ip, ready, serving, terminating) in endpoints {
        yaml += &format!(
            "- addresses: [{ip}]\n  conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}\n  \
             nodeName: node-1\n  targetRef: {{kind: Pod, namespace: default, name: {pod}}}\n"
        );
    }
    yaml
}

#[test]
fn a_rolling_update_drops_no_new_connection() {
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 70);
    let old = [
        ("web-old-1", Ipv4Addr::new(10, 244, 1, 21)),
        ("web-old-2", Ipv4Addr::new(10, 244, 1, 22)),
    ];
    let new = [
        ("web-new-1", Ipv4Addr::new(10, 244, 1, 31)),
        ("web-new-2", Ipv4Addr::new(10, 244, 1, 32)),
    ];
    let all: Vec<(&str, Ipv4Addr)> = old.iter().chain(new.iter()).copied().collect();
    let mut cluster = Cluster::new("a_rolling_update_drops_no_new_connection", &all);
    let manifests = TempDir::new("lbt", "manifests").expect("manifest dir");
    let mut endpoints: Vec<(&str, Ipv4Addr, bool, bool, bool)> = old
        .iter()
        .map(|(pod, ip)| (*pod, *ip, true, true, false))
        .collect();
    write_manifest(manifests.path(), "web.yaml", &web_slice(&endpoints));
    cluster.start_agent(&["--manifests".into(), manifests.path().display().to_string()]);
    let ips = |e: &[(&str, Ipv4Addr, bool, bool, bool)]| -> Vec<Ipv4Addr> {
        e.iter().filter(|x| x.2).map(|x| x.1).collect()
    };
    cluster.wait_for_backends(VIP, 80, Some(ips(&endpoints)), Duration::from_secs(30));
    let load = Load::start(cluster.client(), VIP);
    load.wait_for(20);

    // maxSurge 1, maxUnavailable 0, one pod at a time, as a Deployment does.
    for (step, (old_pod, new_pod)) in old.iter().zip(new.iter()).enumerate() {
        // The new pod becomes ready.
        endpoints.push((new_pod.0, new_pod.1, true, true, false));
        write_manifest(manifests.path(), "web.yaml", &web_slice(&endpoints));
        cluster.wait_for_backends(VIP, 80, Some(ips(&endpoints)), Duration::from_secs(30));
        load.wait_for(10);
        // The old pod is deleted: terminating, not ready, still serving
        // (its preStop / grace period).
        let index = endpoints
            .iter()
            .position(|e| e.0 == old_pod.0)
            .expect("old endpoint");
        endpoints[index] = (old_pod.0, old_pod.1, false, true, true);
        write_manifest(manifests.path(), "web.yaml", &web_slice(&endpoints));
        cluster.wait_for_backends(VIP, 80, Some(ips(&endpoints)), Duration::from_secs(30));
        load.wait_for(10);
        // The grace period ends: the endpoint goes, then the process.
        endpoints.remove(index);
        write_manifest(manifests.path(), "web.yaml", &web_slice(&endpoints));
        cluster.wait_for_backends(VIP, 80, Some(ips(&endpoints)), Duration::from_secs(30));
        cluster.servers.retain(|s| s.pod_name() != old_pod.0);
        load.wait_for(10);
        println!("rolling update: step {} done", step + 1);
    }
    load.wait_for(20);
    let (ok, failures, pods) = load.finish();
    println!(
        "rolling update: {ok} requests answered, {} failed; per pod {pods:?}",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} requests failed during the rollout: {failures:#?}\nagent log:\n{}",
        failures.len(),
        cluster.agent_log()
    );
    for (pod, _) in &new {
        assert!(pods.contains_key(*pod), "{pod} never answered: {pods:?}");
    }
}

#[test]
fn api_restart_and_a_cut_watch_under_traffic_drop_nothing() {
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 71);
    let pods = [
        ("echo-a", Ipv4Addr::new(10, 244, 1, 11)),
        ("echo-b", Ipv4Addr::new(10, 244, 1, 12)),
    ];
    let cluster = ApiCluster::start(
        "api_restart_and_a_cut_watch_under_traffic_drop_nothing",
        &pods,
        &[
            objects::service("echo", VIP),
            objects::endpoint_slice("echo", "echo-1", &pods[..1]),
        ],
    );
    cluster.wait_for_backends(VIP, 80, Some(vec![pods[0].1]), Duration::from_secs(30));
    let load = Load::start(cluster.client(), VIP);
    load.wait_for(20);

    // The watch stream is cut, then a change: it arrives after the re-watch.
    cluster.api.drop_watches();
    cluster
        .api
        .apply(objects::endpoint_slice("echo", "echo-1", &pods))
        .expect("scale up");
    cluster.wait_for_backends(
        VIP,
        80,
        Some(pods.iter().map(|p| p.1).collect()),
        Duration::from_secs(30),
    );
    load.wait_for(20);
    // The API server restarts; a change made right after is picked up.
    cluster.api.restart().expect("restart the API fixture");
    cluster
        .api
        .apply(objects::endpoint_slice("echo", "echo-1", &pods[1..]))
        .expect("scale down");
    cluster.wait_for_backends(VIP, 80, Some(vec![pods[1].1]), Duration::from_secs(30));
    load.wait_for(20);
    let (ok, failures, per_pod) = load.finish();
    println!(
        "API faults: {ok} requests answered, {} failed; per pod {per_pod:?}",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} requests failed: {failures:#?}\nagent log:\n{}",
        failures.len(),
        cluster.agent_log()
    );
}
