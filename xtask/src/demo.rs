//! `cargo xtask demo`: one dual-stack node, three echo pods behind the
//! dual-stack Service `default/echo` (one ClusterIP per family), the agent
//! in between, and what happens when an endpoint goes away.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::agent::AgentProcess;
use crate::echo::{EchoServer, http_get, pod_of, udp_request};
use crate::netns::{BpffsDir, DEMO_PREFIX};
use crate::tempdir::TempDir;
use crate::topology::{POD_DEVICE_GLOB, SINGLE_NODE_NAME, SingleNode, mirror6};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);
/// The service's two ClusterIPs, each with its HTTP (TCP) and DNS (UDP)
/// port: the demo sends the same requests to both.
const FAMILIES: [Family; 2] = [
    Family {
        name: "IPv4",
        http: SocketAddr::V4(SocketAddrV4::new(CLUSTER_IP, 80)),
        dns: SocketAddr::V4(SocketAddrV4::new(CLUSTER_IP, 53)),
        slice_file: "endpointslices.yaml",
        slice_name: "echo-7x2kq",
    },
    Family {
        name: "IPv6",
        http: SocketAddr::V6(SocketAddrV6::new(CLUSTER_IP6, 80, 0, 0)),
        dns: SocketAddr::V6(SocketAddrV6::new(CLUSTER_IP6, 53, 0, 0)),
        slice_file: "endpointslices-ipv6.yaml",
        slice_name: "echo-v6m9p",
    },
];

/// One address family of the dual-stack service, and its EndpointSlice.
struct Family {
    name: &'static str,
    http: SocketAddr,
    dns: SocketAddr,
    slice_file: &'static str,
    slice_name: &'static str,
}

impl Family {
    /// A pod's address in this family (IPv6: the topology's mirror).
    fn pod_addr(&self, ip: Ipv4Addr) -> IpAddr {
        match self.http {
            SocketAddr::V4(_) => IpAddr::V4(ip),
            SocketAddr::V6(_) => IpAddr::V6(mirror6(ip)),
        }
    }
}
const TARGET_TCP_PORT: u16 = 8080;
const TARGET_UDP_PORT: u16 = 5353;

const BACKENDS: [(&str, Ipv4Addr); 3] = [
    ("echo-a", Ipv4Addr::new(10, 244, 1, 11)),
    ("echo-b", Ipv4Addr::new(10, 244, 1, 12)),
    ("echo-c", Ipv4Addr::new(10, 244, 1, 13)),
];
const CLIENT: (&str, Ipv4Addr) = ("client", Ipv4Addr::new(10, 244, 1, 2));
/// The endpoint the demo removes.
const REMOVED: (&str, Ipv4Addr) = BACKENDS[2];

const TCP_REQUESTS: usize = 60;
const UDP_REQUESTS: usize = 30;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(15);
/// Consecutive answers without the removed pod, after the agent logged that
/// it programmed the change, that count as converged ((2/3)^20: a still
/// present echo-c passes unnoticed once in 3000 runs).
const CONVERGED_STREAK: usize = 20;
/// What the agent logs (info) after writing a change into the maps.
const PROGRAMMED_LOG: &str = "programmed";
const RETRY_EVERY: Duration = Duration::from_millis(200);

/// The pinned maps, as named by lb-common.
const MAP_NAMES: [&str; 5] = [
    lb_common::service::NAME,
    lb_common::slot::NAME,
    lb_common::backend::NAME,
    lb_common::conntrack::NAME,
    lb_common::stats::NAME,
];

#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    /// Wait before tearing down so the maps can be inspected.
    pub keep: bool,
    /// With `keep`: wait this long instead of for Enter.
    pub keep_seconds: Option<u64>,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

pub fn demo(options: &DemoOptions) -> Result<()> {
    // Ctrl-C ends the demo through the normal error path, so the RAII
    // guards still remove the namespaces and pins.
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }

    heading("setup and build");
    crate::setup::setup()?;
    let agent_bin = build_agent()?;
    println!("  built {}", agent_bin.display());

    heading("topology");
    let mut pods: Vec<(&str, Ipv4Addr)> = BACKENDS.to_vec();
    pods.push(CLIENT);
    let topology = SingleNode::dual_stack(DEMO_PREFIX, &pods)?;
    let _servers = BACKENDS
        .iter()
        .map(|&(name, _)| {
            EchoServer::start_dual_stack(
                topology.pod(name)?.ns(),
                name,
                &[TARGET_TCP_PORT],
                &[TARGET_UDP_PORT],
            )
        })
        .collect::<Result<Vec<_>>>()?;
    println!(
        "  {SINGLE_NODE_NAME} (namespace {}), pods: {}",
        topology.node_ns().name(),
        pods.iter()
            .map(|(name, ip)| format!("{name} {ip} {}", mirror6(*ip)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  Service default/echo (PreferDualStack) {CLUSTER_IP} and {CLUSTER_IP6}: 80/TCP -> {TARGET_TCP_PORT}, 53/UDP -> {TARGET_UDP_PORT}"
    );

    let manifests = TempDir::new(DEMO_PREFIX, "manifests")?;
    copy_manifests(manifests.path())?;
    let bpffs = BpffsDir::with_prefix(DEMO_PREFIX)?;
    let log_dir = TempDir::new(DEMO_PREFIX, "log")?;
    let log_path = log_dir.path().join("lb-agent.log");

    heading("agent");
    let mut agent = AgentProcess::spawn(
        topology.node_ns(),
        &agent_bin,
        [
            "--node-name".as_ref(),
            SINGLE_NODE_NAME.as_ref(),
            "--manifests".as_ref(),
            manifests.path().as_os_str(),
            "--pod-devices".as_ref(),
            POD_DEVICE_GLOB.as_ref(),
            "--bpffs".as_ref(),
            bpffs.path().as_os_str(),
        ] as [&std::ffi::OsStr; 8],
        &[("RUST_LOG", "info")],
        Some(&log_path),
    )?;
    println!(
        "  lb-agent pid {} in {}, pins in {}",
        agent.pid(),
        topology.node_ns().name(),
        bpffs.path().display()
    );

    let result = run_scenario(&topology, &mut agent, manifests.path());
    if let Err(error) = &result {
        eprintln!("\ndemo failed: {error:#}");
        eprintln!(
            "--- lb-agent log, last 30 lines ({}) ---\n{}",
            log_path.display(),
            agent.log_tail(30)
        );
    }

    if options.keep {
        keep_for_inspection(options, &topology, &bpffs, &log_path);
    } else if result.is_ok() {
        show_lbctl(bpffs.path());
        dump_services_map(bpffs.path());
    }

    heading("teardown");
    drop(agent);
    drop(_servers);
    drop(topology);
    drop(bpffs);
    if result.is_ok() {
        println!("  done: namespaces, pins and temp files removed");
    }
    result.context("demo failed (the agent log tail is above)")
}

/// `lbctl services` and `lbctl stats`: the project's own view of the maps.
fn show_lbctl(bpffs: &Path) {
    let lbctl = crate::debug_binary("lbctl");
    for command in ["services", "stats"] {
        heading(&format!("lbctl --bpffs {} {command}", bpffs.display()));
        match std::process::Command::new(&lbctl)
            .arg("--bpffs")
            .arg(bpffs)
            .arg(command)
            .output()
        {
            Ok(out) => {
                let text = String::from_utf8_lossy(if out.status.success() {
                    &out.stdout
                } else {
                    &out.stderr
                });
                for line in text.lines() {
                    println!("  {line}");
                }
            }
            Err(e) => println!("  (could not run {}: {e})", lbctl.display()),
        }
    }
}

fn heading(title: &str) {
    println!("\n== {title}");
}

/// Builds the agent (dev profile) and returns its path.
fn build_agent() -> Result<PathBuf> {
    let status = crate::cargo(&["build", "--quiet", "-p", "lb-agent", "--bins"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build -p lb-agent --bins failed ({status})");
    }
    let binary = crate::debug_binary("lb-agent");
    if !binary.is_file() {
        bail!("built lb-agent but {} does not exist", binary.display());
    }
    Ok(binary)
}

fn copy_manifests(to: &Path) -> Result<()> {
    let from = crate::workspace_root().join("examples/manifests");
    for entry in std::fs::read_dir(&from).with_context(|| format!("reading {}", from.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "yaml") {
            let target = to.join(path.file_name().expect("a file name"));
            std::fs::copy(&path, &target)
                .with_context(|| format!("copying {} to {}", path.display(), target.display()))?;
        }
    }
    Ok(())
}

fn run_scenario(topology: &SingleNode, agent: &mut AgentProcess, manifests: &Path) -> Result<()> {
    let client = topology.pod(CLIENT.0)?.ns();

    let started = Instant::now();
    for family in &FAMILIES {
        let http = family.http;
        loop {
            check_interrupted()?;
            if let Some(status) = agent.exit_status()? {
                bail!("lb-agent exited ({status}) before the service answered");
            }
            match http_get(client, http, REQUEST_TIMEOUT) {
                Ok(_) => break,
                Err(error) if started.elapsed() > READY_TIMEOUT => {
                    return Err(error).context(format!(
                        "no answer from {http} within {READY_TIMEOUT:?} of starting the agent"
                    ));
                }
                Err(_) => std::thread::sleep(RETRY_EVERY),
            }
        }
    }
    println!(
        "  service answers on both ClusterIPs from the client pod after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    heading(&format!(
        "{TCP_REQUESTS} TCP requests to port 80 and {UDP_REQUESTS} UDP requests to port 53 of each ClusterIP, from {} {} {}",
        CLIENT.0,
        CLIENT.1,
        mirror6(CLIENT.1)
    ));
    let before = send_round(client)?;
    before.print();
    let mut silent = Vec::new();
    for (index, family) in FAMILIES.iter().enumerate() {
        for &(name, _) in &BACKENDS {
            if before.answers_in(name, index) == 0 {
                silent.push(format!("{name} over {}", family.name));
            }
        }
    }
    if !silent.is_empty() {
        bail!("pods that never answered: {}", silent.join(", "));
    }

    heading(&format!(
        "remove {} ({} {}) from EndpointSlices default/{} and default/{}",
        REMOVED.0,
        REMOVED.1,
        mirror6(REMOVED.1),
        FAMILIES[0].slice_name,
        FAMILIES[1].slice_name
    ));
    let programmed_before = agent.log_contents().matches(PROGRAMMED_LOG).count();
    for family in &FAMILIES {
        let slice_path = manifests.join(family.slice_file);
        let slice = std::fs::read_to_string(&slice_path)?;
        let edited = remove_endpoint(&slice, family.pod_addr(REMOVED.1))
            .with_context(|| format!("editing {}", slice_path.display()))?;
        write_atomically(&slice_path, &edited)?;
    }
    let converged_after = wait_until_gone(agent, programmed_before, client, REMOVED.0)?;
    println!(
        "  agent reprogrammed; {} stopped answering after {:.1} s ({CONVERGED_STREAK} answers in a row without it)",
        REMOVED.0,
        converged_after.as_secs_f64()
    );

    heading("the same requests again");
    let after = send_round(client)?;
    after.print();
    if after.answers_from(REMOVED.0) > 0 {
        bail!(
            "{} answered {} requests after it was removed from the EndpointSlice",
            REMOVED.0,
            after.answers_from(REMOVED.0)
        );
    }
    println!(
        "\n  ok: traffic over both ClusterIPs spread over every endpoint, and none went to a removed one"
    );
    Ok(())
}

/// Answers per pod, one column per (family, protocol): IPv4 TCP, IPv4
/// UDP, IPv6 TCP, IPv6 UDP.
#[derive(Debug, Default)]
struct Tally {
    answers: BTreeMap<String, [usize; 4]>,
    failures: usize,
    first_failure: Option<String>,
}

impl Tally {
    fn answers_from(&self, pod: &str) -> usize {
        self.answers
            .get(pod)
            .map_or(0, |counts| counts.iter().sum())
    }

    /// Answers from `pod` to the ClusterIP of `FAMILIES[family]`.
    fn answers_in(&self, pod: &str, family: usize) -> usize {
        self.answers
            .get(pod)
            .map_or(0, |counts| counts[2 * family] + counts[2 * family + 1])
    }

    /// Records one answer in `column` (see [`Tally`]).
    fn record(&mut self, answer: Result<String>, column: usize) {
        match answer {
            Ok(reply) => {
                let pod = pod_of(&reply).unwrap_or("(unparsable answer)").to_owned();
                self.answers.entry(pod).or_default()[column] += 1;
            }
            Err(error) => {
                self.failures += 1;
                self.first_failure.get_or_insert(format!("{error:#}"));
            }
        }
    }

    fn print(&self) {
        println!(
            "  {:<10} {:>9} {:>9} {:>9} {:>9}",
            "pod", "IPv4 TCP", "IPv4 UDP", "IPv6 TCP", "IPv6 UDP"
        );
        let mut pods: Vec<&str> = BACKENDS.iter().map(|&(name, _)| name).collect();
        pods.extend(
            self.answers
                .keys()
                .map(String::as_str)
                .filter(|pod| !pods.contains(pod))
                .collect::<Vec<_>>(),
        );
        for pod in pods {
            let [tcp4, udp4, tcp6, udp6] = self.answers.get(pod).copied().unwrap_or_default();
            println!("  {pod:<10} {tcp4:>9} {udp4:>9} {tcp6:>9} {udp6:>9}");
        }
        if self.failures > 0 {
            println!("  {:<10} {:>9}", "failed", self.failures);
        }
    }
}

fn send_round(client: &crate::NetNs) -> Result<Tally> {
    let mut tally = Tally::default();
    for (index, family) in FAMILIES.iter().enumerate() {
        for _ in 0..TCP_REQUESTS {
            check_interrupted()?;
            tally.record(http_get(client, family.http, REQUEST_TIMEOUT), 2 * index);
        }
        for i in 0..UDP_REQUESTS {
            check_interrupted()?;
            let payload = format!("query {i}\n");
            let answer = udp_request(client, family.dns, payload.as_bytes(), REQUEST_TIMEOUT);
            tally.record(answer, 2 * index + 1);
        }
    }
    if let Some(first) = &tally.first_failure {
        tally.print();
        bail!(
            "{} of {} requests failed; the first: {first}",
            tally.failures,
            FAMILIES.len() * (TCP_REQUESTS + UDP_REQUESTS)
        );
    }
    Ok(tally)
}

/// Waits until the agent logs a new `programmed` line (it had logged
/// `programmed_before`), then polls both ClusterIPs in turn until `pod` is
/// absent from CONVERGED_STREAK answers in a row; returns how long that
/// took.
fn wait_until_gone(
    agent: &mut AgentProcess,
    programmed_before: usize,
    client: &crate::NetNs,
    pod: &str,
) -> Result<Duration> {
    let started = Instant::now();
    while agent.log_contents().matches(PROGRAMMED_LOG).count() <= programmed_before {
        check_interrupted()?;
        if let Some(status) = agent.exit_status()? {
            bail!("lb-agent exited ({status}) after the EndpointSlice changed");
        }
        if started.elapsed() > CONVERGE_TIMEOUT {
            bail!(
                "lb-agent logged no new {PROGRAMMED_LOG:?} line within {CONVERGE_TIMEOUT:?} of the EndpointSlice change"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut streak = 0;
    let mut turn = 0;
    while started.elapsed() < CONVERGE_TIMEOUT {
        check_interrupted()?;
        turn += 1;
        let http = FAMILIES[turn % FAMILIES.len()].http;
        match http_get(client, http, REQUEST_TIMEOUT) {
            Ok(reply) if pod_of(&reply) != Some(pod) => {
                streak += 1;
                if streak == CONVERGED_STREAK {
                    return Ok(started.elapsed());
                }
            }
            Ok(_) => streak = 0,
            Err(_) => {
                streak = 0;
                std::thread::sleep(RETRY_EVERY);
            }
        }
    }
    bail!("{pod} still answered {CONVERGE_TIMEOUT:?} after it was removed from the EndpointSlice")
}

/// Replaces a file the way editors do, so a watcher
/// never reads half a file: write a dot-file next to it, then rename.
fn write_atomically(path: &Path, contents: &str) -> Result<()> {
    let name = path.file_name().context("a file name")?.to_string_lossy();
    let staging = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&staging, contents).with_context(|| format!("writing {}", staging.display()))?;
    std::fs::rename(&staging, path).with_context(|| format!("replacing {}", path.display()))
}

/// Removes the endpoint with `address` from an EndpointSlice in
/// `kubectl get -o yaml` layout (a top-level `endpoints:` list whose items
/// start with `- ` in column 0).
fn remove_endpoint(slice: &str, address: IpAddr) -> Result<String> {
    let address_line = format!("- {address}");
    let mut out = Vec::new();
    let mut in_endpoints = false;
    let mut item: Vec<&str> = Vec::new();
    let mut removed = false;
    let mut flush = |item: &mut Vec<&str>, out: &mut Vec<String>| {
        if item.iter().any(|line| line.trim() == address_line) {
            removed = true;
        } else {
            out.extend(item.iter().map(|line| line.to_string()));
        }
        item.clear();
    };
    for line in slice.lines() {
        if in_endpoints {
            if line.starts_with("- ") {
                flush(&mut item, &mut out);
                item.push(line);
                continue;
            }
            if line.starts_with(' ') {
                item.push(line);
                continue;
            }
            flush(&mut item, &mut out);
            in_endpoints = false;
        }
        if line == "endpoints:" {
            in_endpoints = true;
        }
        out.push(line.to_owned());
    }
    flush(&mut item, &mut out);
    if !removed {
        bail!("EndpointSlice has no endpoint {address}");
    }
    Ok(out.join("\n") + "\n")
}

/// Where the agent pinned a map: `<bpffs>/<NAME>`, or deeper if it uses
/// subdirectories.
fn find_pinned(root: &Path, map: &str) -> Option<PathBuf> {
    let direct = root.join(map);
    if direct.exists() {
        return Some(direct);
    }
    std::fs::read_dir(root)
        .ok()?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.is_dir())
        .find_map(|dir| find_pinned(&dir, map))
}

fn dump_services_map(bpffs: &Path) {
    heading(&format!("bpftool map dump pinned .../{}", MAP_NAMES[0]));
    let Some(pinned) = find_pinned(bpffs, MAP_NAMES[0]) else {
        println!("  (no {} pinned under {})", MAP_NAMES[0], bpffs.display());
        return;
    };
    match std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&pinned)
        .output()
    {
        Ok(output) if output.status.success() => {
            let text = String::from_utf8_lossy(&output.stdout);
            let lines: Vec<&str> = text.lines().collect();
            for line in lines.iter().take(20) {
                println!("  {line}");
            }
            if lines.len() > 20 {
                println!("  ... ({} more lines)", lines.len() - 20);
            }
        }
        Ok(output) => println!(
            "  bpftool failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(error) => println!("  bpftool not runnable: {error}"),
    }
}

fn keep_for_inspection(
    options: &DemoOptions,
    topology: &SingleNode,
    bpffs: &BpffsDir,
    log_path: &Path,
) {
    heading("kept for inspection");
    println!("  pins:      {}", bpffs.path().display());
    for map in MAP_NAMES {
        let path = find_pinned(bpffs.path(), map).unwrap_or_else(|| bpffs.path().join(map));
        println!("  bpftool map dump pinned {}", path.display());
    }
    println!("  agent log: {}", log_path.display());
    println!(
        "  node:      nsenter --net={} ip addr",
        topology.node_ns().path().display()
    );
    match options.keep_seconds {
        Some(seconds) => {
            println!("  tearing down in {seconds} s (Ctrl-C to do it now)");
            let deadline = Instant::now() + Duration::from_secs(seconds);
            while Instant::now() < deadline && !INTERRUPTED.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        None => {
            println!("  press Enter to tear down");
            wait_for_enter();
        }
    }
}

/// Blocks until a line (or EOF) on stdin, or Ctrl-C.
fn wait_for_enter() {
    let mut stdin_fd = libc::pollfd {
        fd: libc::STDIN_FILENO,
        events: libc::POLLIN,
        revents: 0,
    };
    while !INTERRUPTED.load(Ordering::Relaxed) {
        // SAFETY: one valid pollfd, count 1.
        let ready = unsafe { libc::poll(&mut stdin_fd, 1, 200) };
        if ready != 0 {
            // Readable, EOF or error: read the line (if any) and go on.
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_one_endpoint_from_each_example_slice() {
        for family in &FAMILIES {
            let path = crate::workspace_root()
                .join("examples/manifests")
                .join(family.slice_file);
            let slice = std::fs::read_to_string(path).unwrap();
            removes_one_endpoint(&slice, family);
        }
    }

    fn removes_one_endpoint(slice: &str, family: &Family) {
        let removed = family.pod_addr(REMOVED.1);
        let edited = remove_endpoint(slice, removed).unwrap();
        assert!(!edited.contains(&format!("- {removed}")), "{edited}");
        assert!(!edited.contains("echo-c"), "{edited}");
        let kept: Vec<String> = BACKENDS[..2]
            .iter()
            .map(|(_, ip)| format!("- {}", family.pod_addr(*ip)))
            .collect();
        for kept in kept.iter().map(String::as_str).chain([
            "echo-a",
            "echo-b",
            "kind: EndpointSlice",
            family.slice_name,
        ]) {
            assert!(edited.contains(kept), "{kept} missing from:\n{edited}");
        }
        // Everything after the endpoints list survives.
        assert!(
            edited.contains("ports:\n- name: http\n  port: 8080"),
            "{edited}"
        );
        assert_eq!(
            edited.lines().count(),
            slice.lines().count() - 12,
            "exactly one 12-line item removed"
        );
        assert!(remove_endpoint(&edited, removed).is_err());
    }
}
