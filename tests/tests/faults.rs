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

use lb_tests::cluster::{ApiCluster, Cluster, NodeAgents, POD_TCP_PORT, objects, write_manifest};
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
        Load::start_at(ns, SocketAddrV4::new(vip, 80))
    }

    /// The same loop against any address (a NodePort, say).
    fn start_at(ns: &NetNs, target: SocketAddrV4) -> Load {
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
                    match request(target) {
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

/// Two nodes serve a NodePort; node-1's agent is stopped under traffic.
/// Its pinned programs keep translating, and node-2 is unaffected: no
/// request through either node fails.
#[test]
fn a_stopped_agent_on_one_node_loses_no_request_on_either_node() {
    lb_tests::require_root("a_stopped_agent_on_one_node_loses_no_request_on_either_node");
    let mut cluster = xtask::Cluster::new(2).expect("two-node cluster");
    let pods = [
        ("echo-a", Ipv4Addr::new(10, 244, 1, 11), 1),
        ("echo-b", Ipv4Addr::new(10, 244, 2, 11), 2),
    ];
    let mut servers = Vec::new();
    for (name, ip, node) in pods {
        let pod = cluster.add_pod(node, name, ip).expect("pod");
        servers
            .push(xtask::EchoServer::start(pod.ns(), name, &[POD_TCP_PORT], &[]).expect("server"));
    }
    let manifests = TempDir::new("lbt", "manifests").expect("dir");
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{namespace: default, name: np}}\nspec:\n  type: NodePort\n  \
         clusterIP: 10.96.0.80\n  ports: [{{name: http, port: 80, targetPort: {POD_TCP_PORT}, nodePort: 30080}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  namespace: default\n  name: np-1\n  \
         labels: {{kubernetes.io/service-name: np}}\naddressType: IPv4\nports: [{{name: http, port: {POD_TCP_PORT}}}]\nendpoints:\n"
    );
    for (name, ip, node) in pods {
        yaml += &format!(
            "- addresses: [{ip}]\n  nodeName: node-{node}\n  targetRef: {{kind: Pod, name: {name}}}\n"
        );
    }
    write_manifest(manifests.path(), "np.yaml", &yaml);
    let mut nodes = NodeAgents::start(&cluster, manifests.path(), &[]);
    let targets: Vec<SocketAddrV4> = (1..=2)
        .map(|k| SocketAddrV4::new(cluster.node_ip(k), 30080))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    // Every request runs on a thread inside the external client's namespace.
    let answers = |t: SocketAddrV4| matches!(cluster.external().run(move || request(t)), Ok(Ok(_)));
    while !targets.iter().all(|t| answers(*t)) {
        assert!(
            Instant::now() < deadline,
            "NodePorts never answered: {}",
            nodes.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let loads: Vec<Load> = targets
        .iter()
        .map(|t| Load::start_at(cluster.external(), *t))
        .collect();
    for load in &loads {
        load.wait_for(20);
    }
    let stopped = nodes.agents[0].stop().expect("stop node-1's agent");
    assert!(
        stopped.success() || stopped.code().is_some(),
        "agent stop: {stopped}"
    );
    for load in &loads {
        load.wait_for(100);
    }
    for (k, load) in loads.into_iter().enumerate() {
        let (ok, failures, per_pod) = load.finish();
        println!(
            "via node-{}: {ok} answered, {} failed, {per_pod:?}",
            k + 1,
            failures.len()
        );
        assert!(failures.is_empty(), "via node-{}: {failures:#?}", k + 1);
        assert!(ok >= 120, "via node-{}: only {ok} answered", k + 1);
        assert_eq!(
            per_pod.len(),
            2,
            "via node-{}: not every pod served: {per_pod:?}",
            k + 1
        );
    }
    drop(nodes);
    drop(servers);
}

/// Services and endpoints of the churn load, from the environment (the
/// full form: `LB_LOAD_SERVICES=10000 LB_LOAD_SECONDS=60`).
fn load_size() -> (u32, u64) {
    let services = std::env::var("LB_LOAD_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let seconds = std::env::var("LB_LOAD_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    (services, seconds)
}

fn load_service(name: &str, vip: Ipv4Addr, endpoints: &[Ipv4Addr]) -> String {
    let mut yaml = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{namespace: load, name: {name}}}\nspec:\n  clusterIP: {vip}\n  \
         ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{namespace: load, name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\n\
         ports: [{{name: http, port: 8080}}]\nendpoints:\n"
    );
    for ip in endpoints {
        yaml += &format!("- addresses: [{ip}]\n");
    }
    yaml
}

/// Endpoints of churned service `i` at generation `g` (10 addresses that
/// move with the generation; nothing ever sends to them).
fn churned_endpoints(i: u32, g: u32) -> Vec<Ipv4Addr> {
    (0..10)
        .map(|e| Ipv4Addr::new(10, 251, (i % 250) as u8, ((g * 10 + e) % 250 + 1) as u8))
        .collect()
}

/// Many services installed, then 500 endpoint changes per second (50
/// services rewritten every 100 ms) while traffic flows to a service that
/// does not change: no request fails, and the churned services end on
/// their final endpoints.
#[test]
fn endpoint_churn_under_load_drops_nothing_and_converges() {
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 90);
    const CHURNED: u32 = 50;
    let (services, seconds) = load_size();
    let a = ("echo-a", Ipv4Addr::new(10, 244, 1, 11));
    let b = ("echo-b", Ipv4Addr::new(10, 244, 1, 12));
    let mut cluster = Cluster::new(
        "endpoint_churn_under_load_drops_nothing_and_converges",
        &[a, b],
    );
    let dir = TempDir::new("lbt", "manifests").expect("dir");
    // The static bulk: `services` services of 10 endpoints each.
    let mut bulk = String::new();
    for i in 0..services {
        let vip = Ipv4Addr::new(
            10,
            100 + (i / 65536) as u8,
            ((i / 256) % 256) as u8,
            (i % 256) as u8,
        );
        let endpoints: Vec<Ipv4Addr> = (0..10)
            .map(|e| Ipv4Addr::new(10, 250, (i % 250) as u8, (e + 1) as u8))
            .collect();
        bulk += &load_service(&format!("bulk-{i}"), vip, &endpoints);
    }
    write_manifest(dir.path(), "bulk.yaml", &bulk);
    write_manifest(
        dir.path(),
        "web.yaml",
        &load_service("web", VIP, &[a.1, b.1])
            .replace("targetPort: 8080", &format!("targetPort: {POD_TCP_PORT}")),
    );
    let churn = |g: u32| -> String {
        (0..CHURNED)
            .map(|i| {
                load_service(
                    &format!("churn-{i}"),
                    Ipv4Addr::new(10, 99, 0, i as u8 + 1),
                    &churned_endpoints(i, g),
                )
            })
            .collect()
    };
    write_manifest(dir.path(), "churn.yaml", &churn(0));
    cluster.start_agent(&["--manifests".to_string(), dir.path().display().to_string()]);
    let installed = Instant::now();
    cluster.wait_for_backends(VIP, 80, Some(vec![a.1, b.1]), Duration::from_secs(120));
    println!(
        "{services} services x 10 endpoints installed, traffic flowing after {:?}",
        installed.elapsed()
    );

    let load = Load::start(cluster.client(), VIP);
    load.wait_for(20);
    let started = Instant::now();
    let mut generation = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        generation += 1;
        write_manifest(dir.path(), "churn.yaml", &churn(generation));
        std::thread::sleep(Duration::from_millis(100));
    }
    let changes = generation * CHURNED;
    println!(
        "{changes} endpoint changes in {:?} ({:.0}/s)",
        started.elapsed(),
        changes as f64 / started.elapsed().as_secs_f64()
    );
    // The final state reaches the maps.
    for i in [0, CHURNED / 2, CHURNED - 1] {
        let vip = Ipv4Addr::new(10, 99, 0, i as u8 + 1);
        cluster.wait_for_backends(
            vip,
            80,
            Some(churned_endpoints(i, generation)),
            Duration::from_secs(60),
        );
    }
    let (ok, failures, _) = load.finish();
    println!(
        "traffic to the unchanged service: {ok} answered, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "requests failed under churn: {failures:#?}"
    );
    assert!(ok > 50, "too little traffic to judge: {ok}");
}
