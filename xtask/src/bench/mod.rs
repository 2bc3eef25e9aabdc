//! `cargo xtask bench`: this datapath against kube-proxy's iptables and
//! nftables rulesets and a direct-to-pod baseline, in one run on one
//! machine, every variant on a namespace topology of its own, loaded once
//! per size and measured interleaved (DESIGN.md section 6,
//! docs/benchmarks.md).
//!
//! - [`services`]: the generated service population and its manifests;
//! - [`kubeproxy`]: kube-proxy's rulesets for it (iptables and nftables);
//! - [`variants`]: the topology with one variant active;
//! - [`traffic`]: the server and the closed-loop clients;
//! - [`socket_lb`]: socket-level balancing against direct and the packet
//!   path, its client run as a process in the client pod's cgroup;
//! - [`report`]: min/median/max, per-repetition ratios, the SVG chart.
//!
//! The per-packet cost, our programming times and the Maglev table build
//! times come from `lb-bench`
//! (tests/src/bin/lb-bench.rs), which links the agent's library; this crate
//! cannot (it builds before the BPF toolchain exists).
//!
//! Every measurement is bounded in count and time, and everything that adds
//! addresses, routes or rules, attaches programs or sends traffic does so
//! inside namespaces created here. Nothing asserts a timing.

mod kubeproxy;
mod report;
mod services;
mod snat;
mod socket_lb;
mod traffic;
mod variants;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use xtask::{BpffsDir, NetNs, TempDir, cargo, cleanup_stale, setup, target_dir, workspace_root};

use report::{BarChart, Record, Results, Spread};
use services::ServiceSet;
pub use socket_lb::{ClientArgs, client};
use variants::{
    AgentConfig, Attach, Bench, PREFIX, Variant, run_timed_in, start_agent, write_file,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Tiny sizes, one repetition, seconds: proves the benchmark works.
    Smoke,
    /// A few minutes, three repetitions.
    Quick,
    /// Five repetitions at every size.
    Full,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Smoke => "smoke",
            Mode::Quick => "quick",
            Mode::Full => "full",
        }
    }
}

/// Maglev tables of the quick and full runs: the default M with 100
/// backends, and 1000 backends at the largest prime below 2^16.
const MAGLEV_CASES: [(u32, u32); 2] = [(100, 16381), (1000, 65521)];

/// What one mode measures.
struct Plan {
    reps: u32,
    packet_sizes: Vec<u32>,
    packet_repeat: u32,
    new_flows: u32,
    install_sizes: Vec<u32>,
    change_size: u32,
    changes: u32,
    churn: u32,
    conn_sizes: Vec<u32>,
    conn_duration: Duration,
    conn_threads: usize,
    /// How long each repetition of the SNAT run opens connections.
    snat_duration: Duration,
    flow_duration: Duration,
    agent_sizes: Vec<u32>,
    agent_reps: u32,
    load_timeout: Duration,
    /// Maglev tables built: (backends, table size M).
    maglev_cases: Vec<(u32, u32)>,
    /// Builds per case and repetition (the median is the repetition's value).
    maglev_builds: u32,
    /// Per-packet cost with Maglev selection: (services, table size M).
    maglev_packet: (u32, u32),
}

impl Plan {
    fn of(mode: Mode) -> Plan {
        match mode {
            Mode::Smoke => Plan {
                reps: 1,
                packet_sizes: vec![100, 1000],
                packet_repeat: 10_000,
                new_flows: 200,
                install_sizes: vec![100, 1000],
                change_size: 1000,
                changes: 3,
                churn: 20,
                conn_sizes: vec![100],
                conn_duration: Duration::from_millis(500),
                conn_threads: 2,
                snat_duration: Duration::from_secs(1),
                flow_duration: Duration::from_millis(300),
                agent_sizes: vec![1000],
                agent_reps: 1,
                load_timeout: Duration::from_secs(60),
                maglev_cases: vec![(10, 1021), (100, 16381)],
                maglev_builds: 3,
                maglev_packet: (100, 1021),
            },
            Mode::Quick => Plan {
                reps: 3,
                packet_sizes: vec![100, 1000, 10_000, 100_000],
                packet_repeat: 100_000,
                new_flows: 3000,
                install_sizes: vec![1000, 10_000],
                change_size: 10_000,
                changes: 10,
                churn: 200,
                conn_sizes: vec![1000, 10_000],
                conn_duration: Duration::from_secs(2),
                conn_threads: 4,
                snat_duration: Duration::from_secs(10),
                flow_duration: Duration::from_secs(2),
                agent_sizes: vec![10_000, 100_000],
                agent_reps: 1,
                load_timeout: Duration::from_secs(180),
                maglev_cases: MAGLEV_CASES.to_vec(),
                maglev_builds: 20,
                maglev_packet: (1000, 16381),
            },
            Mode::Full => Plan {
                reps: 5,
                packet_sizes: vec![100, 1000, 10_000, 100_000],
                packet_repeat: 1_000_000,
                new_flows: 20_000,
                install_sizes: vec![1000, 10_000, 100_000],
                change_size: 10_000,
                changes: 20,
                churn: 1000,
                conn_sizes: vec![1000, 10_000, 30_000, 100_000],
                conn_duration: Duration::from_secs(5),
                conn_threads: 4,
                snat_duration: Duration::from_secs(60),
                flow_duration: Duration::from_secs(5),
                agent_sizes: vec![10_000, 100_000],
                agent_reps: 3,
                load_timeout: Duration::from_secs(900),
                maglev_cases: MAGLEV_CASES.to_vec(),
                maglev_builds: 50,
                maglev_packet: (1000, 16381),
            },
        }
    }
}

pub struct BenchOptions {
    pub mode: Mode,
    /// Where benchmarks.md and the charts go (default: docs/, or
    /// target/bench-smoke for --smoke).
    pub out: Option<PathBuf>,
}

/// Runs the benchmark and writes the report.
pub fn bench(options: &BenchOptions) -> Result<()> {
    let started = Instant::now();
    let cpu_at_start = CpuSample::now();
    setup()?;
    for line in cleanup_stale().lines() {
        println!("stale leftover: {line}");
    }
    let mode = options.mode;
    let plan = Plan::of(mode);
    let (profile, build): (&str, Vec<&str>) = match mode {
        // The smoke run reuses the debug build `cargo xtask test` made.
        Mode::Smoke => (
            "debug",
            vec!["build", "-p", "lb-agent", "-p", "lb-tests", "--bins"],
        ),
        _ => (
            "release",
            vec![
                "build",
                "--release",
                "-p",
                "lb-agent",
                "-p",
                "lb-tests",
                "--bins",
            ],
        ),
    };
    println!("==> bench ({}): cargo {}", mode.name(), build.join(" "));
    let status = cargo(&build).status().context("starting cargo build")?;
    if !status.success() {
        bail!("cargo {} failed ({status})", build.join(" "));
    }
    let bin_dir = target_dir().join(profile);
    let lb_bench = bin_dir.join("lb-bench");
    let agent = AgentConfig {
        binary: bin_dir.join("lb-agent"),
        lbctl: bin_dir.join("lbctl"),
    };
    let mut results = Results::default();
    let mut notes: Vec<String> = Vec::new();

    println!("==> per-packet cost (BPF_PROG_TEST_RUN)");
    let list = |sizes: &[u32]| {
        sizes
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    results.records.extend(run_lb_bench(
        &lb_bench,
        &[
            "packet".into(),
            format!("sizes={}", list(&plan.packet_sizes)),
            format!("reps={}", plan.reps),
            format!("repeat={}", plan.packet_repeat),
            format!("new_flows={}", plan.new_flows),
            format!("maglev_size={}", plan.maglev_packet.0),
            format!("maglev_m={}", plan.maglev_packet.1),
        ],
    )?);

    println!("==> programming: ours (Programmer into real maps)");
    results.records.extend(run_lb_bench(
        &lb_bench,
        &[
            "program".into(),
            format!("sizes={}", list(&plan.install_sizes)),
            format!("reps={}", plan.reps),
            format!("change_size={}", plan.change_size),
            format!("changes={}", plan.changes),
            format!("churn={}", plan.churn),
        ],
    )?);

    println!("==> Maglev table build (lb_agent::maglev::build_table)");
    let cases: Vec<String> = plan
        .maglev_cases
        .iter()
        .map(|(backends, m)| format!("{backends}:{m}"))
        .collect();
    results.records.extend(run_lb_bench(
        &lb_bench,
        &[
            "maglev".into(),
            format!("cases={}", cases.join(",")),
            format!("reps={}", plan.reps),
            format!("builds={}", plan.maglev_builds),
        ],
    )?);

    println!("==> programming: iptables-restore and nft -f");
    // The kube-proxy rulesets' load times, shared by the installs and the
    // connection runs: a size that did not install in time is not loaded
    // again for traffic.
    let mut loads = LoadHistory::default();
    program_kube_proxy(&plan, &mut loads, &mut results, &mut notes)?;

    println!("==> connections and established flows, one live topology per variant and size");
    traffic_runs(&plan, &agent, &mut loads, &mut results, &mut notes)?;

    println!(
        "==> socket-level balancing: direct, packet path, socket-level, one fresh topology each"
    );
    socket_lb::socket_lb_runs(&plan, &agent, &mut results, &mut notes)?;

    println!("==> sustained connections through SNAT (two nodes, remote endpoint)");
    snat::snat_runs(&plan, &agent, &mut results, &mut notes)?;

    println!("==> agent memory and CPU");
    agent_runs(&plan, &agent, &mut results, &mut notes)?;

    if mode == Mode::Full {
        // The robustness load in its full form (`cargo xtask test` runs it
        // with 2000 services for 10 s): 10k services x 10 endpoints, 500
        // endpoint changes per second for 60 s, traffic to an unchanged
        // service must lose nothing.
        println!("==> churn under load: 10k services, 500 changes/s for 60 s");
        let status = cargo(&[
            "test",
            "--release",
            "-p",
            "lb-tests",
            "--test",
            "faults",
            "endpoint_churn",
            "--",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("LB_LOAD_SERVICES", "10000")
        .env("LB_LOAD_SECONDS", "60")
        .env("LB_AGENT_BIN", &agent.binary)
        .status()
        .context("starting the churn load")?;
        if !status.success() {
            notes.push(format!(
                "churn under load (10k services, 60 s) failed: {status}"
            ));
        }
    }

    let out = match &options.out {
        Some(dir) => dir.clone(),
        None if mode == Mode::Smoke => target_dir().join("bench-smoke"),
        None => workspace_root().join("docs"),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let other_cpu_s = CpuSample::now().other_since(&cpu_at_start);
    let report = write_report(
        &out,
        mode,
        &plan,
        &results,
        &notes,
        started.elapsed(),
        other_cpu_s,
    )?;
    println!("{}", headline(&results, &plan));
    println!(
        "==> bench done in {:.0?}: {}",
        started.elapsed(),
        report.display()
    );
    Ok(())
}

/// Runs `lb-bench args`, echoing its progress (stderr) and collecting results.
fn run_lb_bench(binary: &Path, args: &[String]) -> Result<Vec<Record>> {
    let mut child = Command::new(binary)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let mut records = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            if let Some(record) = Record::parse(&line) {
                println!(
                    "  {} {} size={} rep={}: {:.1}",
                    record.metric, record.variant, record.size, record.rep, record.value
                );
                records.push(record);
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{} {args:?} failed ({status})", binary.display());
    }
    Ok(records)
}

fn program_kube_proxy(
    plan: &Plan,
    loads: &mut LoadHistory,
    results: &mut Results,
    notes: &mut Vec<String>,
) -> Result<()> {
    let files = TempDir::new(PREFIX, "bench-rules")?;
    for rep in 0..plan.reps {
        let mut sizes = plan.install_sizes.clone();
        if !sizes.contains(&plan.change_size) {
            sizes.push(plan.change_size);
        }
        for size in sizes {
            let set = ServiceSet::new(size);
            for variant in ["iptables", "nftables"] {
                if let Some(reason) = loads.skip(variant, size, plan.load_timeout) {
                    if rep == 0 {
                        notes.push(format!("{variant}: installing {size} services: {reason}"));
                    }
                    continue;
                }
                let (program, file, text) = match variant {
                    "iptables" => (
                        "iptables-restore",
                        "rules.iptables",
                        kubeproxy::iptables_ruleset(&set),
                    ),
                    _ => ("nft", "rules.nft", kubeproxy::nft_ruleset(&set)),
                };
                let path = write_file(files.path(), file, &text)?.display().to_string();
                drop(text);
                let args: Vec<&str> = match variant {
                    "iptables" => vec![&path],
                    _ => vec!["-f", &path],
                };
                // A fresh namespace per load: nothing programmed before.
                let ns = NetNs::with_prefix(PREFIX, "bench-load")?;
                match run_timed_in(&ns, program, &args, plan.load_timeout) {
                    Ok(took) => {
                        loads.record(variant, size, took);
                        let ms = took.as_secs_f64() * 1e3;
                        println!("  install_ms {variant} size={size} rep={rep}: {ms:.1}");
                        if plan.install_sizes.contains(&size) {
                            results.push("install_ms", variant, size, rep, ms);
                        }
                    }
                    Err(e) => {
                        notes.push(format!(
                            "{variant}: installing {size} services failed: {e:#}"
                        ));
                        loads.fail(variant, size);
                        continue;
                    }
                }
                if size == plan.change_size {
                    let median = endpoint_changes(plan, &ns, &files, variant, &set, rep)?;
                    println!("  endpoint_change_ms {variant} rep={rep}: {median:.2}");
                    results.push("endpoint_change_ms", variant, size, rep, median);
                }
            }
        }
    }
    Ok(())
}

/// Median time of `plan.changes` single-endpoint changes, each on another
/// service, into `ns`, which holds the whole ruleset of `set`.
fn endpoint_changes(
    plan: &Plan,
    ns: &NetNs,
    files: &TempDir,
    variant: &str,
    set: &ServiceSet,
    rep: u32,
) -> Result<f64> {
    let mut times = Vec::new();
    for k in 0..plan.changes {
        // A different service each time, so every delta applies to the
        // ruleset as generated.
        let i = (k * 7919 + rep * 613) % set.count;
        let new = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 1)) + rep * 1000 + k);
        let (program, delta, mut args): (&str, String, Vec<&str>) = match variant {
            "iptables" => (
                "iptables-restore",
                kubeproxy::iptables_endpoint_change(set, i, new),
                vec!["--noflush"],
            ),
            _ => (
                "nft",
                kubeproxy::nft_endpoint_change(set, i, new),
                vec!["-f"],
            ),
        };
        let delta_path = write_file(files.path(), "delta", &delta)?
            .display()
            .to_string();
        args.push(&delta_path);
        let took = run_timed_in(ns, program, &args, plan.load_timeout)?;
        times.push(took.as_secs_f64() * 1e3);
    }
    Ok(Spread::of(&times).map_or(f64::NAN, |s| s.median))
}

/// A size's variants are loaded once, then measured in turn for every
/// repetition (order rotating), so the slow loads (nft -f at 30k services
/// takes minutes) happen once per (variant, size) and every repetition's
/// ratios compare runs made minutes apart on the same live topologies.
/// netfilter's conntrack table of the kube-proxy variants is flushed before
/// each run, as a fresh topology would have it (its TIME_WAIT entries would
/// otherwise fill the table over repetitions).
fn traffic_runs(
    plan: &Plan,
    agent: &AgentConfig,
    loads: &mut LoadHistory,
    results: &mut Results,
    notes: &mut Vec<String>,
) -> Result<()> {
    for &size in &plan.conn_sizes {
        let mut live: Vec<Bench> = Vec::new();
        for variant in Variant::ALL {
            let name = variant.name();
            if let Some(reason) = loads.skip(name, size, plan.load_timeout) {
                notes.push(format!("{name} at {size} services: not measured: {reason}"));
                continue;
            }
            let started = Instant::now();
            match Bench::start(variant, ServiceSet::new(size), agent, plan.load_timeout) {
                Ok(bench) => {
                    let took = started.elapsed();
                    println!("  loaded {name} size={size} in {took:.1?}");
                    loads.record(name, size, took);
                    live.push(bench);
                }
                Err(e) => {
                    notes.push(format!("{name} at {size} services: not measured: {e:#}"));
                    loads.fail(name, size);
                }
            }
        }
        for rep in 0..plan.reps {
            // Rotate the order so no variant always runs first.
            let shift = (rep as usize + size as usize) % live.len().max(1);
            let order = (0..live.len()).map(|k| &live[(k + shift) % live.len()]);
            for bench in order {
                let name = bench.variant().name();
                for path in ["cip", "np"] {
                    let (ns, addr) = match path {
                        "cip" => (bench.client()?, bench.cluster_ip_target()),
                        _ => (bench.external(), bench.node_port_target()),
                    };
                    bench.flush_conntrack()?;
                    let stats = traffic::connection_rate(
                        Some(ns),
                        addr,
                        plan.conn_threads,
                        plan.conn_duration,
                    )?;
                    let label = format!("{path} {name} size={size} rep={rep}");
                    println!("  conn {}", stats.summary().show(&label));
                    record_connections(results, path, name, size, rep, &stats.summary());
                }
                if size == plan.conn_sizes[0] {
                    let client = bench.client()?;
                    bench.flush_conntrack()?;
                    let rr = traffic::request_response_rate(
                        client,
                        bench.cluster_ip_target(),
                        plan.flow_duration,
                    )?;
                    let bulk = traffic::bulk_throughput(
                        client,
                        bench.cluster_ip_target(),
                        plan.flow_duration,
                    )?;
                    println!(
                        "  flow {name} rep={rep}: {rr:.0} req/s, {:.2} Gbit/s",
                        bulk / 1e9
                    );
                    results.push("rr_rate", name, size, rep, rr);
                    results.push("bulk_bps", name, size, rep, bulk);
                }
            }
        }
    }
    Ok(())
}

/// How long each variant's loads took, to skip sizes that cannot load in
/// time: a size is skipped when a smaller one failed, or when the load time
/// extrapolated from the two largest measured sizes (with their growth
/// exponent, at least linear) exceeds the budget.
#[derive(Default)]
struct LoadHistory {
    /// (variant, size, seconds) of the latest successful load per size.
    loads: Vec<(String, u32, f64)>,
    failed: Vec<(String, u32)>,
}

impl LoadHistory {
    fn record(&mut self, variant: &str, size: u32, took: Duration) {
        self.loads.retain(|(v, s, _)| v != variant || *s != size);
        self.loads
            .push((variant.to_owned(), size, took.as_secs_f64()));
    }

    fn fail(&mut self, variant: &str, size: u32) {
        self.failed.push((variant.to_owned(), size));
    }

    /// Predicted seconds to load `variant` at `size`, from its two largest
    /// measured sizes below it: t(b) * (size/b)^k, k from t(a) and t(b)
    /// and at least 1 (one measured size: linear).
    fn predict(&self, variant: &str, size: u32) -> Option<(f64, String)> {
        let mut below: Vec<(u32, f64)> = self
            .loads
            .iter()
            .filter(|(v, s, _)| v == variant && *s < size)
            .map(|(_, s, t)| (*s, *t))
            .collect();
        below.sort_by_key(|(s, _)| *s);
        let &(b, tb) = below.last()?;
        let (k, basis) = match below.len() {
            1 => (1.0, format!("{b} services took {tb:.0} s")),
            n => {
                let (a, ta) = below[n - 2];
                let k = ((tb / ta).ln() / (f64::from(b) / f64::from(a)).ln()).max(1.0);
                (
                    k,
                    format!(
                        "{a} services took {ta:.1} s and {b} took {tb:.0} s (growth exponent {k:.2})"
                    ),
                )
            }
        };
        Some((tb * (f64::from(size) / f64::from(b)).powf(k), basis))
    }

    /// Why `variant` is not loaded at `size` within `budget`, if it is not.
    fn skip(&self, variant: &str, size: u32, budget: Duration) -> Option<String> {
        if let Some((_, failed)) = self.failed.iter().find(|(v, s)| v == variant && *s <= size) {
            return Some(format!("loading {failed} services already failed"));
        }
        let (predicted, basis) = self.predict(variant, size)?;
        (predicted > budget.as_secs_f64()).then(|| {
            format!(
                "not attempted: {basis}, so {size} would take about {predicted:.0} s, over the \
                 {:.0} s budget",
                budget.as_secs_f64()
            )
        })
    }
}

/// Per repetition, `variant`'s ClusterIP p50 over the direct baseline's at
/// `size`, divided by the same at 1k: latency growth with the service count
/// with the machine's drift between the sizes' runs taken out.
fn latency_flatness(results: &Results, variant: &str, size: u32) -> Option<Spread> {
    let relative = |size| {
        let ours = results.per_rep("conn_p50_us_cip", variant, size);
        let direct = results.per_rep("conn_p50_us_cip", "direct", size);
        ours.into_iter()
            .filter_map(|(rep, v)| direct.get(&rep).map(|d| (rep, v / d)))
            .collect::<std::collections::BTreeMap<u32, f64>>()
    };
    let (at_size, at_base) = (relative(size), relative(1000));
    let ratios: Vec<f64> = at_size
        .iter()
        .filter_map(|(rep, v)| at_base.get(rep).map(|b| v / b))
        .collect();
    Spread::of(&ratios)
}

/// Records a connection run as `conn_{rate,p50_us,p99_us,failed}_<path>`.
fn record_connections(
    results: &mut Results,
    path: &str,
    variant: &str,
    size: u32,
    rep: u32,
    summary: &traffic::ConnSummary,
) {
    for (metric, value) in [
        ("rate", summary.rate),
        ("p50_us", summary.p50_us),
        ("p99_us", summary.p99_us),
        ("failed", summary.failed as f64),
    ] {
        results.push(&format!("conn_{metric}_{path}"), variant, size, rep, value);
    }
}

/// Reads (VmRSS in MiB, user+system CPU seconds) of `pid`.
fn rss_and_cpu(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command: utime is the 14th field overall.
    let after = stat.rsplit_once(')').context("stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((rss_kib / 1024.0, ticks / hz))
}

fn agent_runs(
    plan: &Plan,
    agent: &AgentConfig,
    results: &mut Results,
    notes: &mut Vec<String>,
) -> Result<()> {
    for rep in 0..plan.agent_reps {
        for &size in &plan.agent_sizes {
            let ns = NetNs::with_prefix(PREFIX, "bench-agent")?;
            let manifests = TempDir::new(PREFIX, "bench-manifests")?;
            ServiceSet::new(size).write_manifests(manifests.path())?;
            let pins = BpffsDir::with_prefix(PREFIX)?;
            match start_agent(
                agent,
                (services::NODE_NAME, &ns),
                manifests.path(),
                &pins,
                size,
                Attach::Nothing,
                Duration::from_secs(900),
            ) {
                Ok((mut process, took)) => {
                    let (rss, cpu) = rss_and_cpu(process.pid())?;
                    println!(
                        "  agent size={size} rep={rep}: {rss:.0} MiB RSS, {cpu:.2} s CPU, programmed after {took:.1?}"
                    );
                    results.push("agent_rss_mib", "ours", size, rep, rss);
                    results.push("agent_cpu_s", "ours", size, rep, cpu);
                    results.push("agent_ready_s", "ours", size, rep, took.as_secs_f64());
                    let _ = process.stop();
                }
                Err(e) => notes.push(format!("agent at {size} services: {e:#}")),
            }
        }
    }
    Ok(())
}

/// User-mode CPU seconds of the whole machine (`/proc/stat`: user + nice)
/// and of this process with its waited-for children, so that what other
/// processes used during the run can be reported beside the figures.
struct CpuSample {
    machine_s: f64,
    own_s: f64,
}

impl CpuSample {
    fn now() -> CpuSample {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let jiffies: f64 = stat
            .lines()
            .next()
            .and_then(|line| line.strip_prefix("cpu "))
            .map(|fields| {
                fields
                    .split_whitespace()
                    .take(2)
                    .filter_map(|v| v.parse::<f64>().ok())
                    .sum()
            })
            .unwrap_or(0.0);
        let user = |who| {
            // SAFETY: getrusage fills the struct it is given.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            unsafe { libc::getrusage(who, &mut usage) };
            usage.ru_utime.tv_sec as f64 + usage.ru_utime.tv_usec as f64 / 1e6
        };
        CpuSample {
            machine_s: jiffies / hz,
            own_s: user(libc::RUSAGE_SELF) + user(libc::RUSAGE_CHILDREN),
        }
    }

    /// Seconds the rest of the machine used since `start`.
    fn other_since(&self, start: &CpuSample) -> f64 {
        ((self.machine_s - start.machine_s) - (self.own_s - start.own_s)).max(0.0)
    }
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{cores} CPUs ({model}), {mem_gib:.1} GiB memory, Linux {}, {}, {}",
        kernel.trim(),
        variants::command_output("iptables-restore", &["--version"]),
        variants::command_output("nft", &["--version"]),
    )
}

fn size_label(size: u32) -> String {
    if size >= 1000 && size.is_multiple_of(1000) {
        format!("{}k", size / 1000)
    } else {
        size.to_string()
    }
}

fn show(spread: Option<Spread>, digits: usize) -> String {
    spread.map_or_else(|| "-".into(), |s| s.show(digits))
}

/// `median` of a spread, NaN when missing.
fn median(spread: Option<Spread>) -> f64 {
    spread.map_or(f64::NAN, |s| s.median)
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "**met**",
        Some(false) => "**not met**",
        None => "not measured",
    }
}

/// The goals of issues 7, 10 and 11 with their measured ratios.
fn goals(results: &Results, plan: &Plan) -> Vec<(String, String, Option<bool>)> {
    let mut goals = Vec::new();
    let sizes = &plan.packet_sizes;
    let worst = sizes
        .iter()
        .filter_map(|&s| {
            results.ratio(
                ("pkt_ns", "xdp_established", s),
                ("pkt_ns", "xdp_pass_floor", s),
            )
        })
        .map(|s| s.median)
        .fold(f64::NAN, f64::max);
    goals.push((
        "per-packet established path (XDP) within 2.5x of the XDP_PASS floor, at every size".into(),
        format!("worst median ratio {worst:.2}x"),
        worst.is_finite().then_some(worst <= 2.5),
    ));
    let (small, large) = (1000, *sizes.last().unwrap_or(&1000));
    let flat = results.ratio(
        ("pkt_ns", "xdp_established", large),
        ("pkt_ns", "xdp_established", small),
    );
    goals.push((
        format!(
            "per-packet established path flat within 10% from 1k to {}",
            size_label(large)
        ),
        format!("t({})/t(1k) = {}", size_label(large), show(flat, 3)),
        flat.filter(|_| large > small).map(|s| s.median <= 1.10),
    ));
    // Issue 10: IPv6 against IPv4, same repetition, both hooks.
    let v6 = sizes
        .iter()
        .flat_map(|&s| {
            ["xdp_established", "tc_established"]
                .map(|case| results.ratio(("pkt_ns", &format!("{case}6"), s), ("pkt_ns", case, s)))
        })
        .flatten()
        .map(|s| s.median)
        .fold(f64::NAN, f64::max);
    goals.push((
        "IPv6 established path (XDP and TC) at most 1.2x the IPv4 one, at every size".into(),
        format!("worst median ratio {v6:.2}x"),
        v6.is_finite().then_some(v6 <= 1.2),
    ));
    let mid = 10_000;
    let vs_ipt = results.ratio(
        ("conn_rate_cip", "ours", mid),
        ("conn_rate_cip", "iptables", mid),
    );
    let vs_nft = results.ratio(
        ("conn_rate_cip", "ours", mid),
        ("conn_rate_cip", "nftables", mid),
    );
    goals.push((
        "new-connection rate at 10k services >= 2x iptables mode".into(),
        format!("ours/iptables = {}", show(vs_ipt, 2)),
        vs_ipt.map(|s| s.median >= 2.0),
    ));
    goals.push((
        "new-connection rate at 10k services >= nftables mode".into(),
        format!("ours/nftables = {}", show(vs_nft, 2)),
        vs_nft.map(|s| s.median >= 1.0),
    ));
    // The goal's range ends at 30k (larger sizes are reported, not judged).
    let top = plan
        .conn_sizes
        .iter()
        .copied()
        .filter(|&s| s <= 30_000)
        .max()
        .unwrap_or(1000);
    let raw = results.ratio(
        ("conn_p50_us_cip", "ours", top),
        ("conn_p50_us_cip", "ours", 1000),
    );
    let lat = latency_flatness(results, "ours", top);
    goals.push((
        format!(
            "connection latency (p50, ClusterIP) flat within 10% from 1k to {}",
            size_label(top)
        ),
        format!(
            "against direct: {}; raw p50({})/p50(1k) = {}",
            show(lat, 3),
            size_label(top),
            show(raw, 3)
        ),
        lat.filter(|_| top > 1000).map(|s| s.median <= 1.10),
    ));
    let install = results.ratio(("install_ms", "iptables", mid), ("install_ms", "ours", mid));
    goals.push((
        "install of 10k services x 10 endpoints >= 10x faster than iptables-restore".into(),
        format!("iptables-restore/ours = {}", show(install, 1)),
        install.map(|s| s.median >= 10.0),
    ));
    let change = results.spread("endpoint_change_ms", "ours", plan.change_size);
    goals.push((
        format!(
            "one endpoint change at {} services under 10 ms",
            size_label(plan.change_size)
        ),
        format!("{} ms", show(change, 3)),
        change.map(|s| s.median < 10.0),
    ));
    goals.push(socket_lb::goal(results, plan));
    goals
}

fn headline(results: &Results, plan: &Plan) -> String {
    let mut out = String::from("headline (median of per-repetition ratios):\n");
    for (goal, measured, met) in goals(results, plan) {
        let _ = writeln!(
            out,
            "  {goal}: {measured} -> {}",
            verdict(met).trim_matches('*')
        );
    }
    out
}

fn write_report(
    dir: &Path,
    mode: Mode,
    plan: &Plan,
    results: &Results,
    notes: &[String],
    elapsed: Duration,
    other_cpu_s: f64,
) -> Result<PathBuf> {
    let variants = ["ours", "iptables", "nftables", "direct"];
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Benchmarks\n\n\
         Generated by `cargo xtask bench{}` ({} mode, {} repetitions, {:.0} s). Do not edit by hand:\n\
         rerun the benchmark.\n\n\
         **Machine:** {}.\n\n\
         **Other load:** while the benchmark ran, processes outside it used {:.0} s of\n\
         user-mode CPU ({:.0}% of one CPU over the run).\n\n\
         Absolute figures come from a small shared VM and move from run to run; the\n\
         result is the **ratios** between variants measured side by side (same\n\
         repetition, interleaved), shown as median (min-max) over repetitions.{}\n",
        match mode {
            Mode::Smoke => " --smoke",
            Mode::Quick => " --quick",
            Mode::Full => "",
        },
        mode.name(),
        plan.reps,
        elapsed.as_secs_f64(),
        machine(),
        other_cpu_s,
        100.0 * other_cpu_s / elapsed.as_secs_f64().max(1.0),
        if mode == Mode::Quick {
            " Quick mode: 3 repetitions instead of 5, shorter runs, smaller sizes."
        } else {
            ""
        }
    );
    md.push_str(METHOD);

    // 1. per packet
    let _ = writeln!(
        md,
        "\n## 1. Per-packet cost in the kernel\n\n\
         BPF_PROG_TEST_RUN, {} repeats per repeated run, {} single runs per new-flow figure.\n\
         Ratio to the floor of the same hook (a trivial program `r0 = XDP_PASS/TC_ACT_OK; exit`\n\
         loaded through bpf(2)); new flows are single runs and are compared with single runs of\n\
         the trivial XDP program (`xdp_pass_floor_single`). Absolute ns in the last column; the\n\
         kernel reports whole nanoseconds per repeat, so a 5 ns floor carries +-1 ns (20%) of\n\
         rounding, the same in every repetition. The XDP_PASS floor does not touch the packet;\n\
         `xdp_arp` is our XDP program on an ARP frame (returns at the first check, counts it).\n",
        plan.packet_repeat, plan.new_flows
    );
    let cases: [(&str, &str); 11] = [
        ("xdp_established", "xdp_pass_floor"),
        ("xdp_not_service", "xdp_pass_floor"),
        ("xdp_new_flow", "xdp_pass_floor_single"),
        ("xdp_arp", "xdp_pass_floor"),
        ("tc_established", "tc_pass_floor"),
        ("tc_not_service", "tc_pass_floor"),
        // TCX egress: what every packet leaving a device pays, and a
        // host-network backend's reply.
        ("tc_egress_untracked", "tc_pass_floor"),
        ("tc_egress_host_reply", "tc_pass_floor"),
        ("tc_new_flow", "xdp_pass_floor_single"),
        ("xdp_pass_floor_single", "xdp_pass_floor"),
        ("tc_pass_floor", "xdp_pass_floor"),
    ];
    md.push_str("| case | services | ratio to floor | ns (median) |\n|---|---|---|---|\n");
    for (case, floor) in cases {
        for &size in &plan.packet_sizes {
            let ratio = results.ratio(("pkt_ns", case, size), ("pkt_ns", floor, size));
            let ns = results.spread("pkt_ns", case, size);
            let _ = writeln!(
                md,
                "| {case} (vs {floor}) | {} | {} | {:.0} |",
                size_label(size),
                show(ratio, 2),
                median(ns)
            );
        }
    }
    md.push_str("\nFlatness, t(largest)/t(1k) of the same case:\n\n| case | ratio |\n|---|---|\n");
    let largest = *plan.packet_sizes.last().unwrap_or(&1000);
    for case in [
        "xdp_established",
        "xdp_new_flow",
        "xdp_not_service",
        "tc_established",
        "tc_new_flow",
    ] {
        let flat = results.ratio(("pkt_ns", case, largest), ("pkt_ns", case, 1000));
        let _ = writeln!(
            md,
            "| {case} {}/1k | {} |",
            size_label(largest),
            show(flat, 3)
        );
    }

    md.push_str(
        "\nIPv6 / IPv4, same repetition: every generated service is dual-stack (an IPv6\n\
         frontend with 10 IPv6 endpoints beside the IPv4 one), and each IPv6 case is the IPv4\n\
         case's twin (`6` suffix): the same hook, flow and checks, on IPv6 packets.\n\n\
         | case | services | IPv6 ns (median) | IPv4 ns (median) | IPv6 / IPv4 |\n|---|---|---|---|---|\n",
    );
    for case in [
        "xdp_established",
        "tc_established",
        "xdp_new_flow",
        "tc_new_flow",
        "xdp_not_service",
        "tc_not_service",
    ] {
        let v6 = format!("{case}6");
        for &size in &plan.packet_sizes {
            let ratio = results.ratio(("pkt_ns", &v6, size), ("pkt_ns", case, size));
            let _ = writeln!(
                md,
                "| {case} | {} | {} | {} | {} |",
                size_label(size),
                show(results.spread("pkt_ns", &v6, size), 0),
                show(results.spread("pkt_ns", case, size), 0),
                show(ratio, 2)
            );
        }
    }

    let (maglev_size, maglev_m) = plan.maglev_packet;
    let _ = writeln!(
        md,
        "\nMaglev selection (`--lb-algorithm maglev`, M = {maglev_m}) against random, at {} \
         services, same\nrepetitions: established packets take the same conntrack path; a new flow \
         looks up one\ntable chunk (`hash(5-tuple) % M`) instead of drawing a random slot.\n\n\
         | case | maglev ns (median) | random ns (median) | maglev / random |\n|---|---|---|---|",
        size_label(maglev_size)
    );
    for case in [
        "xdp_established",
        "xdp_new_flow",
        "tc_established",
        "tc_new_flow",
    ] {
        let with = format!("{case}_maglev");
        let ratio = results.ratio(
            ("pkt_ns", &with, maglev_size),
            ("pkt_ns", case, maglev_size),
        );
        let _ = writeln!(
            md,
            "| {case} | {:.0} | {:.0} | {} |",
            median(results.spread("pkt_ns", &with, maglev_size)),
            median(results.spread("pkt_ns", case, maglev_size)),
            show(ratio, 2)
        );
    }

    // 2. connections
    let _ = writeln!(
        md,
        "\n## 2. New connections\n\n\
         Closed loop, {} client threads for {:.1} s per run: connect, send a 33-byte HTTP/1.0\n\
         request, read the answer to EOF, close. `ClusterIP`: from the client pod to the\n\
         target service's ClusterIP; `NodePort`: from the external client to node-1:30080.\n\
         The direct baseline connects to the server pod's address instead. Rate ratios are\n\
         ours / other (above 1: ours faster).\n",
        plan.conn_threads,
        plan.conn_duration.as_secs_f64()
    );
    for (path, label) in [("cip", "ClusterIP"), ("np", "NodePort")] {
        let _ = writeln!(
            md,
            "\n### {label}\n\n| services | variant | conn/s | p50 us | p99 us | failed | ours/variant (rate) |\n|---|---|---|---|---|---|---|"
        );
        for &size in &plan.conn_sizes {
            for variant in variants {
                let rate = results.spread(&format!("conn_rate_{path}"), variant, size);
                if rate.is_none() {
                    continue;
                }
                let ratio = results.ratio(
                    (&format!("conn_rate_{path}"), "ours", size),
                    (&format!("conn_rate_{path}"), variant, size),
                );
                let _ = writeln!(
                    md,
                    "| {} | {variant} | {} | {} | {} | {} | {} |",
                    size_label(size),
                    show(rate, 0),
                    show(
                        results.spread(&format!("conn_p50_us_{path}"), variant, size),
                        0
                    ),
                    show(
                        results.spread(&format!("conn_p99_us_{path}"), variant, size),
                        0
                    ),
                    show(
                        results.spread(&format!("conn_failed_{path}"), variant, size),
                        0
                    ),
                    if variant == "ours" {
                        "-".into()
                    } else {
                        show(ratio, 2)
                    },
                );
            }
        }
    }
    let mut lat_rows = String::new();
    for &size in &plan.conn_sizes {
        for variant in ["ours", "iptables", "nftables"] {
            let r = results.ratio(
                ("conn_p50_us_cip", variant, size),
                ("conn_p50_us_cip", variant, 1000),
            );
            if r.is_some() {
                let _ = writeln!(
                    lat_rows,
                    "| {variant} | {} | {} | {} |",
                    size_label(size),
                    show(r, 3),
                    show(latency_flatness(results, variant, size), 3)
                );
            }
        }
    }
    let _ = writeln!(
        md,
        "\nLatency flatness: ClusterIP p50 at N / p50 at 1k, same variant; and the same\n\
         against the direct baseline of the same repetition and size ((p50 / direct p50) at N\n\
         over the same at 1k). The sizes run one after the other, so a change in the machine's\n\
         load between them moves every variant, the untranslated direct one included; the\n\
         second column removes it and is the one the goal is judged on.\n\n\
         | variant | services | p50(N)/p50(1k) | against direct |\n|---|---|---|---|\n{lat_rows}"
    );
    let socket_chart = socket_lb::report(&mut md, results, plan);
    snat::report(&mut md, results, plan);

    // 3. established
    let first = plan.conn_sizes[0];
    let _ = writeln!(
        md,
        "## 3. Established flows\n\n\
         One connection from the client pod to the ClusterIP (direct: to the pod), {} services,\n\
         {:.1} s each: request/response with 64-byte messages, and bulk send (64 KiB writes,\n\
         the server counts bytes). Ratio: variant / direct.\n\n\
         | variant | req/s | ratio | Gbit/s | ratio |\n|---|---|---|---|---|",
        size_label(first),
        plan.flow_duration.as_secs_f64()
    );
    for variant in variants {
        let rr = results.spread("rr_rate", variant, first);
        let bulk = results
            .spread("bulk_bps", variant, first)
            .map(|s| s.scaled(1e-9));
        let _ = writeln!(
            md,
            "| {variant} | {} | {} | {} | {} |",
            show(rr, 0),
            show(
                results.ratio(("rr_rate", variant, first), ("rr_rate", "direct", first)),
                2
            ),
            show(bulk, 2),
            show(
                results.ratio(("bulk_bps", variant, first), ("bulk_bps", "direct", first)),
                2
            ),
        );
    }

    // 4. programming
    let _ = writeln!(
        md,
        "\n## 4. Programming\n\n\
         Install N services x 10 endpoints into empty tables: ours is `Programmer::apply` of\n\
         the desired tables into freshly loaded maps (the model, YAML and API are not in\n\
         the figure); iptables and nftables are `iptables-restore FILE` and `nft -f FILE` of\n\
         the generated ruleset into a fresh namespace (the text is generated beforehand and\n\
         not in the figure). Ratio: variant / ours (above 1: ours faster).\n\n\
         | services | variant | ms | variant/ours |\n|---|---|---|---|"
    );
    for &size in &plan.install_sizes {
        for variant in ["ours", "iptables", "nftables"] {
            let ms = results.spread("install_ms", variant, size);
            let ratio = results.ratio(("install_ms", variant, size), ("install_ms", "ours", size));
            let _ = writeln!(
                md,
                "| {} | {variant} | {} | {} |",
                size_label(size),
                show(ms, 1),
                if variant == "ours" {
                    "-".into()
                } else {
                    show(ratio, 1)
                }
            );
        }
    }
    let cs = plan.change_size;
    let _ = writeln!(
        md,
        "\nOne endpoint change at {} services (median of {} changes per repetition, each on\n\
         another service): ours is one `Programmer::apply` of the changed desired tables\n\
         (new slot set under the next revision, the service entry, the old slots and backend\n\
         deleted); iptables is what kube-proxy (MinimizeIPTablesRestore) sends with\n\
         `iptables-restore --noflush`: the top-level chains in full, the changed KUBE-SVC chain,\n\
         the new KUBE-SEP chain and the deletion of the old one; nftables is kube-proxy's\n\
         incremental transaction (new endpoint chain, the service chain flushed and rewritten,\n\
         the old endpoint chain deleted) with `nft -f`.\n\n\
         | variant | ms | variant/ours |\n|---|---|---|",
        size_label(cs),
        plan.changes
    );
    for variant in ["ours", "iptables", "nftables"] {
        let _ = writeln!(
            md,
            "| {variant} | {} | {} |",
            show(results.spread("endpoint_change_ms", variant, cs), 3),
            if variant == "ours" {
                "-".into()
            } else {
                show(
                    results.ratio(
                        ("endpoint_change_ms", variant, cs),
                        ("endpoint_change_ms", "ours", cs),
                    ),
                    0,
                )
            }
        );
    }
    let _ = writeln!(
        md,
        "\nChurn (ours only): {} back-to-back changes of one service's only endpoint at {}\n\
         services; the delay runs from the start of the map write (`Programmer::apply`) to the\n\
         first probe, a SYN of a new flow run through `lb_tc_pod` with BPF_PROG_TEST_RUN right\n\
         after the write, that is rewritten to the new endpoint (probes per change: {}).\n\
         This is the datapath's side of \"change to first packet\"; the agent's reaction time\n\
         to a watch event comes on top.\n\n\
         | p50 us | p99 us |\n|---|---|\n| {} | {} |",
        plan.churn,
        size_label(cs),
        show(results.spread("churn_probes_per_change", "ours", cs), 2),
        show(results.spread("churn_us_p50", "ours", cs), 1),
        show(results.spread("churn_us_p99", "ours", cs), 1),
    );
    let _ = writeln!(
        md,
        "\nMaglev lookup tables (`lb_agent::maglev::build_table`, the pure user-space builder\n\
         of Maglev consistent hashing that the agent runs for each frontend whose backends change;\n\
         one thread, run by `lb-bench maglev`):\n\
         N backends (distinct addresses, one port) into a table of M slots; a repetition's\n\
         value is the median of {} builds. Each table is checked once: M slots, every backend\n\
         holds at least one. Per slot: ms / M.\n\n\
         | backends | M | ms | ns per slot |\n|---|---|---|---|",
        plan.maglev_builds
    );
    for &(backends, m) in &plan.maglev_cases {
        let ms = results.spread("maglev_build_ms", &format!("m{m}"), backends);
        let per_slot = ms.map(|s| s.scaled(1e6 / f64::from(m)));
        let _ = writeln!(
            md,
            "| {} | {m} | {} | {} |",
            size_label(backends),
            show(ms, 2),
            show(per_slot, 1)
        );
    }

    // 5. agent
    let _ = writeln!(
        md,
        "\n## 5. Agent memory and CPU\n\n\
         The agent (`--manifests` on a generated directory, no devices attached) in a namespace\n\
         of its own, N services x 10 endpoints; VmRSS from /proc/PID/status and user+system\n\
         CPU seconds from /proc/PID/stat once it logged the services programmed ({} repetitions).\n\n\
         | services | RSS MiB | CPU s | programmed after s |\n|---|---|---|---|",
        plan.agent_reps
    );
    for &size in &plan.agent_sizes {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            size_label(size),
            show(results.spread("agent_rss_mib", "ours", size), 0),
            show(results.spread("agent_cpu_s", "ours", size), 2),
            show(results.spread("agent_ready_s", "ours", size), 1),
        );
    }

    // Goals
    md.push_str("\n## Goals\n\n| goal | measured | |\n|---|---|---|\n");
    for (goal, measured, met) in goals(results, plan) {
        let _ = writeln!(md, "| {goal} | {measured} | {} |", verdict(met));
    }
    if !notes.is_empty() {
        md.push_str("\n## Not measured in this run\n\n");
        for note in notes {
            let first_line = note.lines().next().unwrap_or_default();
            let _ = writeln!(md, "- {first_line}");
        }
    }

    // Charts
    let series: Vec<String> = variants.iter().map(|v| v.to_string()).collect();
    let conn = BarChart {
        title: "New connections per second, ClusterIP (median)".into(),
        y_label: "connections/s".into(),
        groups: plan
            .conn_sizes
            .iter()
            .map(|&s| format!("{} services", size_label(s)))
            .collect(),
        series: series.clone(),
        values: plan
            .conn_sizes
            .iter()
            .map(|&s| {
                variants
                    .iter()
                    .map(|v| median(results.spread("conn_rate_cip", v, s)))
                    .collect()
            })
            .collect(),
        log_scale: false,
    };
    let install = BarChart {
        title: "Install N services x 10 endpoints (median, log scale)".into(),
        y_label: "milliseconds".into(),
        groups: plan
            .install_sizes
            .iter()
            .map(|&s| format!("{} services", size_label(s)))
            .collect(),
        series: vec!["ours".into(), "iptables".into(), "nftables".into()],
        values: plan
            .install_sizes
            .iter()
            .map(|&s| {
                ["ours", "iptables", "nftables"]
                    .iter()
                    .map(|v| median(results.spread("install_ms", v, s)))
                    .collect()
            })
            .collect(),
        log_scale: true,
    };
    let packet = BarChart {
        title: "Per-packet cost, ratio to the XDP_PASS floor (median)".into(),
        y_label: "x floor".into(),
        groups: plan
            .packet_sizes
            .iter()
            .map(|&s| format!("{} services", size_label(s)))
            .collect(),
        series: vec![
            "xdp established".into(),
            "xdp new flow".into(),
            "tc established".into(),
            "xdp not service".into(),
        ],
        values: plan
            .packet_sizes
            .iter()
            .map(|&s| {
                [
                    ("xdp_established", "xdp_pass_floor"),
                    ("xdp_new_flow", "xdp_pass_floor_single"),
                    ("tc_established", "xdp_pass_floor"),
                    ("xdp_not_service", "xdp_pass_floor"),
                ]
                .iter()
                .map(|(c, f)| median(results.ratio(("pkt_ns", c, s), ("pkt_ns", f, s))))
                .collect()
            })
            .collect(),
        log_scale: false,
    };
    md.push_str("\n## Charts\n\n");
    for (file, chart) in [
        ("benchmarks-connections.svg", conn),
        ("benchmarks-programming.svg", install),
        ("benchmarks-packet.svg", packet),
        ("benchmarks-socket-lb.svg", socket_chart),
    ] {
        write_file(dir, file, &chart.svg())?;
        let _ = writeln!(md, "![{}]({file})\n", chart.title);
    }

    // Raw records, for anyone who wants to recompute.
    let mut csv = String::from("metric,variant,size,rep,value\n");
    for r in &results.records {
        let _ = writeln!(
            csv,
            "{},{},{},{},{}",
            r.metric, r.variant, r.size, r.rep, r.value
        );
    }
    write_file(dir, "benchmarks.csv", &csv)?;
    md.push_str("Raw values: [benchmarks.csv](benchmarks.csv).\n");
    write_file(dir, "benchmarks.md", &md)
}

/// How it is measured; the fixed part of docs/benchmarks.md.
const METHOD: &str = r#"
## How to run

```sh
cargo xtask bench --quick   # ~20 minutes on 2 vCPUs, 3 repetitions
cargo xtask bench           # full: 5 repetitions, larger sizes
cargo xtask bench --smoke   # seconds, tiny sizes (part of `cargo xtask test`)
```

Root on a machine with the BPF toolchain (`cargo xtask setup` runs first) and
cgroup v2 mounted (`/sys/fs/cgroup/unified` or `/sys/fs/cgroup`) for the
socket-level comparison. The release builds of `lb-agent`, `lbctl` and
`lb-bench` (tests/src/bin/lb-bench.rs) are used; the eBPF object is always
optimized. The traffic clients and servers are xtask's own code (its dev build,
the same for every variant).

## Setup

Variants: **ours** (the agent on a manifest directory, XDP on the node device,
TC on pod devices), **iptables** (kube-proxy's iptables-mode ruleset loaded
with `iptables-restore` inside the node namespace), **nftables** (kube-proxy's
nftables-mode ruleset loaded with `nft -f` inside the node namespace),
**direct** (no service translation: the client connects to the pod address),
and, for the socket-level comparison only, **socketlb** (the same agent with
`--socket-lb-cgroup` on the client pod's cgroup). Each variant runs on a
topology of its own (`xtask::Cluster`: node-1, a client pod 10.244.1.2, a
server pod holding the ten endpoint addresses 10.244.1.10-19, an external
client 198.51.100.100 on the underlay), so only one translation acts on any
packet. For the connection and established-flow runs every variant is loaded
once per size and all of them stay up while the repetitions run: within each
repetition the variants run in turn, their order rotating, and netfilter's
conntrack table of the kube-proxy variants is flushed (`conntrack -F`) before
each run, as a fresh namespace would have it. A size a variant cannot load
within the load budget is skipped once a smaller size failed, or when the
time extrapolated from its two largest loads (growth exponent at least 1)
exceeds the budget; the notes say which. The socket-level comparison and the
installs use a fresh topology or namespace per run.

Services: N services, port 80 -> 8080/TCP, ClusterIPs from 10.96.0.1 on, 10
endpoints each. The filler services' endpoints are addresses no packet
reaches; the target service is the last one, in every rule order, and is also
a NodePort (30080) whose endpoints are the server pod's ten addresses.

### kube-proxy's layout

Taken from kubernetes/kubernetes `pkg/proxy/iptables/proxier.go`,
`pkg/proxy/nftables/proxier.go` and `pkg/proxy/nftables/README.md` (the
rulesets are generated by `xtask/src/bench/kubeproxy.rs`; chain-name hashes
are FNV-based instead of SHA-256, same shape):

- iptables, nat table: `PREROUTING`/`OUTPUT -j KUBE-SERVICES`; in
  `KUBE-SERVICES` one rule per ClusterIP `-d VIP/32 -p tcp --dport 80 -j
  KUBE-SVC-<hash>`, and last `-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS`;
  `KUBE-SVC-<hash>`: `! -s 10.244.0.0/16 ... -j KUBE-MARK-MASQ`, then per
  endpoint `-m statistic --mode random --probability 1/(n-k) -j
  KUBE-SEP-<hash>` (the last unconditional); `KUBE-SEP-<hash>`: `-s EP -j
  KUBE-MARK-MASQ`, `-p tcp -j DNAT --to-destination EP:8080`;
  `KUBE-NODEPORTS -p tcp --dport 30080 -j KUBE-EXT-<hash>` (mark, then the
  KUBE-SVC chain); `POSTROUTING -j KUBE-POSTROUTING` (masquerade marked
  packets, `--random-fully`); `KUBE-MARK-MASQ` sets 0x4000. Filter table:
  `KUBE-FORWARD` (drop INVALID, accept marked and RELATED/ESTABLISHED) and the
  other kube-proxy chains, empty as for services that all have endpoints.
  Above 1000 endpoints per-endpoint rules carry no comments (kube-proxy's
  large-cluster mode).
- nftables, `table ip kube-proxy`: `nat-prerouting`/`nat-output` jump to
  `services`: `ip daddr . meta l4proto . th dport vmap @service-ips` and
  `fib daddr type local ... meta l4proto . th dport vmap @service-nodeports`;
  `service-<hash>-bench/svc-i/tcp/http`: mark off-cluster sources, then
  `numgen random mod 10 vmap { 0 : goto endpoint-..., ... }`;
  `endpoint-<hash>-...__EP/8080`: `ip saddr EP jump mark-for-masquerade`,
  `meta l4proto tcp dnat to EP:8080`; `nat-postrouting` -> `masquerading`
  (`masquerade fully-random` for marked packets); `filter-forward` checks
  `no-endpoint-services` and rejects stray `cluster-ips` traffic.

The kernel's nf_conntrack is loaded by the first NAT rule inside the node
namespace; our variant's namespace has no netfilter rules.
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_goal_takes_the_worst_hook_and_size_of_same_repetition_ratios() {
        let plan = Plan::of(Mode::Smoke);
        let goal = |results: &Results| {
            goals(results, &plan)
                .into_iter()
                .find(|(goal, _, _)| goal.starts_with("IPv6 established"))
                .expect("the IPv6 goal")
        };
        assert_eq!(goal(&Results::default()).2, None, "not measured");
        // IPv6 costs `tc_factor` x IPv4 through TC at the first size, 1.1x elsewhere.
        let measured = |tc_factor: f64| {
            let mut results = Results::default();
            for (i, &size) in plan.packet_sizes.iter().enumerate() {
                for rep in 0..3 {
                    let v4 = 100.0 + f64::from(rep) * 10.0;
                    let tc = if i == 0 { tc_factor } else { 1.1 };
                    results.push("pkt_ns", "xdp_established", size, rep, v4);
                    results.push("pkt_ns", "xdp_established6", size, rep, v4 * 1.1);
                    results.push("pkt_ns", "tc_established", size, rep, v4);
                    results.push("pkt_ns", "tc_established6", size, rep, v4 * tc);
                }
            }
            let (_, measured, met) = goal(&results);
            (measured, met)
        };
        assert_eq!(
            measured(1.15),
            ("worst median ratio 1.15x".into(), Some(true))
        );
        assert_eq!(
            measured(1.3),
            ("worst median ratio 1.30x".into(), Some(false))
        );
    }

    #[test]
    fn load_history_skips_what_cannot_load_in_time() {
        let budget = Duration::from_secs(900);
        let mut loads = LoadHistory::default();
        assert_eq!(loads.skip("nft", 1000, budget), None, "nothing known yet");
        loads.record("nft", 1000, Duration::from_secs(1));
        // One size: linear, 30 s at 30k.
        assert_eq!(
            loads.predict("nft", 30_000).map(|p| p.0.round()),
            Some(30.0)
        );
        loads.record("nft", 10_000, Duration::from_secs(60));
        // 1 s -> 60 s over 10x: exponent log10(60) = 1.78; 100k: 60 * 10^1.78.
        let (at_100k, basis) = loads.predict("nft", 100_000).expect("predicted");
        assert!((at_100k - 3600.0).abs() < 1.0, "{at_100k}");
        assert!(basis.contains("1.78"), "{basis}");
        assert!(loads.skip("nft", 30_000, budget).is_none(), "about 420 s");
        assert!(loads.skip("nft", 100_000, budget).is_some());
        // Sub-linear growth is taken as linear.
        loads.record("ipt", 1000, Duration::from_secs(10));
        loads.record("ipt", 10_000, Duration::from_secs(20));
        let (linear, _) = loads.predict("ipt", 100_000).expect("predicted");
        assert!((linear - 200.0).abs() < 1e-6, "{linear}");
        // A failure skips every larger size; other variants are unaffected.
        loads.fail("ipt", 30_000);
        assert!(loads.skip("ipt", 100_000, budget).is_some());
        assert!(loads.skip("ipt", 10_000, budget).is_none());
        assert!(loads.skip("nft", 30_000, budget).is_none());
        // A repeated size replaces its earlier time.
        loads.record("nft", 10_000, Duration::from_secs(100));
        let (again, _) = loads.predict("nft", 20_000).expect("predicted");
        assert!(again > 200.0, "{again}");
    }
}
