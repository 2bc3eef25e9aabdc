//! New connections with socket-level balancing (`--socket-lb-cgroup`)
//! against the direct-to-pod baseline and our packet path, side by side.
//!
//! cgroup membership is per process, so the closed-loop client runs as a
//! process of its own: this binary again (`xtask bench-client`, hidden),
//! started inside the client pod's network namespace, which moves itself
//! into the client pod's cgroup before it opens a socket. All three
//! variants use that same client in the same kind of cgroup; only the
//! socket-level variant's agent attaches to it. The datapath's counters
//! (read with `lbctl stats`) prove which path each figure took.

use std::fmt::Write as _;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use xtask::AgentProcess;
use xtask::cgroup::{cgroup2_root, move_process};

use super::report::{BarChart, Results, Spread};
use super::services::ServiceSet;
use super::traffic::{self, ConnSummary};
use super::variants::{AgentConfig, Bench, Variant};
use super::{Plan, median, record_connections, show, size_label};

/// Metric suffix of these runs: `conn_rate_sock`, `conn_p50_us_sock`, ...
const PATH: &str = "sock";
/// The variants compared, in the order of the report.
const VARIANTS: [Variant; 3] = [Variant::Direct, Variant::Ours, Variant::SocketLb];
/// The goal: at most 5% more per connection than connecting to the pod.
const GOAL_COST: f64 = 1.05;

/// Arguments of `xtask bench-client`.
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// cgroup v2 directory to join before the first connection.
    #[arg(long)]
    cgroup: PathBuf,
    /// Where to connect.
    #[arg(long)]
    addr: SocketAddrV4,
    #[arg(long)]
    threads: usize,
    /// How long the closed loop runs.
    #[arg(long)]
    millis: u64,
}

/// The client process: joins the cgroup, checks that it is in it, runs the
/// closed loop in its own namespace and prints the summary line.
pub fn client(args: &ClientArgs) -> Result<()> {
    move_process(&args.cgroup, std::process::id())
        .with_context(|| format!("joining cgroup {}", args.cgroup.display()))?;
    let root = cgroup2_root().context("no cgroup v2 hierarchy")?;
    let relative = args
        .cgroup
        .strip_prefix(&root)
        .with_context(|| format!("{} is not below {}", args.cgroup.display(), root.display()))?;
    let expected = format!("0::/{}", relative.display());
    let mine = std::fs::read_to_string("/proc/self/cgroup").context("/proc/self/cgroup")?;
    ensure!(
        mine.lines().any(|line| line == expected),
        "not in {} after joining it: {mine:?}",
        args.cgroup.display()
    );
    let stats = traffic::connection_rate(
        None,
        args.addr,
        args.threads,
        Duration::from_millis(args.millis),
    )?;
    println!("{}", stats.summary().line());
    Ok(())
}

/// Runs the client process for `bench`'s client pod against `addr`.
fn run_client(bench: &Bench, addr: SocketAddrV4, plan: &Plan) -> Result<ConnSummary> {
    let exe = std::env::current_exe().context("the xtask binary")?;
    let millis = plan.conn_duration.as_millis().to_string();
    let args = [
        "bench-client".to_string(),
        "--cgroup".into(),
        bench.client_cgroup()?.display().to_string(),
        "--addr".into(),
        addr.to_string(),
        "--threads".into(),
        plan.conn_threads.to_string(),
        "--millis".into(),
        millis,
    ];
    // Stopped (SIGTERM, then SIGKILL) when dropped, on every return path.
    let mut process = AgentProcess::spawn(bench.client()?, &exe, &args, &[], None)?;
    let deadline = Instant::now() + plan.conn_duration + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = process.exit_status()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!(
                "client process did not finish by its deadline; output:\n{}",
                process.log_tail(10)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = process.log_contents();
    if !status.success() {
        bail!(
            "client process failed ({status}):\n{}",
            process.log_tail(10)
        );
    }
    ConnSummary::find(&output)
        .with_context(|| format!("no summary in the client's output:\n{output}"))
}

/// Packets counted as (socket-level translations, new flows of the packet
/// path) so far, from `lbctl stats`.
fn translation_counters(agent: &AgentConfig, pins: &Path) -> Result<(u64, u64)> {
    let output = std::process::Command::new(&agent.lbctl)
        .arg("--bpffs")
        .arg(pins)
        .arg("stats")
        .output()
        .with_context(|| format!("starting {}", agent.lbctl.display()))?;
    ensure!(
        output.status.success(),
        "lbctl stats failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let packets = |reason: &str| -> Result<u64> {
        text.lines()
            .find_map(|line| {
                let mut fields = line.split_whitespace();
                (fields.next() == Some(reason)).then(|| fields.nth(1)?.parse().ok())?
            })
            .with_context(|| format!("no {reason} row in lbctl stats:\n{text}"))
    };
    Ok((packets("sock_translated")?, packets("new_flow")?))
}

/// One measurement: the client process against the variant's ClusterIP
/// (direct: the pod), checked to have taken the variant's path.
fn measure(
    bench: &Bench,
    variant: Variant,
    agent: &AgentConfig,
    plan: &Plan,
) -> Result<ConnSummary> {
    let before = bench
        .pins()
        .map(|pins| translation_counters(agent, pins))
        .transpose()?;
    let summary = run_client(bench, bench.cluster_ip_target(), plan)?;
    if let (Some(pins), Some((translated_before, flows_before))) = (bench.pins(), before) {
        let (translated, flows) = translation_counters(agent, pins)?;
        let translated = translated.saturating_sub(translated_before);
        let flows = flows.saturating_sub(flows_before);
        let name = variant.name();
        match variant {
            Variant::SocketLb => ensure!(
                translated >= summary.completed && flows == 0,
                "{name}: {} connections, {translated} translated at the socket, \
                 {flows} new flows on the packet path: not the socket-level path",
                summary.completed
            ),
            // A client port reused for the same ClusterIP finds its
            // conntrack entry, so new flows may be fewer than connections.
            _ => ensure!(
                translated == 0 && flows > 0,
                "{name}: {} connections, {translated} translated at the socket, \
                 {flows} new flows on the packet path: not the packet path",
                summary.completed
            ),
        }
    }
    Ok(summary)
}

/// Direct, packet path and socket-level balancing at the first connection
/// size, interleaved within each repetition (the order rotates).
pub fn socket_lb_runs(
    plan: &Plan,
    agent: &AgentConfig,
    results: &mut Results,
    notes: &mut Vec<String>,
) -> Result<()> {
    let size = plan.conn_sizes[0];
    for rep in 0..plan.reps {
        let mut order = VARIANTS.to_vec();
        order.rotate_left(rep as usize % VARIANTS.len());
        for variant in order {
            let name = variant.name();
            let bench = match Bench::start(variant, ServiceSet::new(size), agent, plan.load_timeout)
            {
                Ok(bench) => bench,
                Err(e) => {
                    notes.push(format!(
                        "{name} (socket-level comparison) at {size} services: not measured: {e:#}"
                    ));
                    continue;
                }
            };
            let summary = measure(&bench, variant, agent, plan)?;
            println!(
                "  conn {}",
                summary.show(&format!("{PATH} {name} size={size} rep={rep}"))
            );
            record_connections(results, PATH, name, size, rep, &summary);
        }
    }
    Ok(())
}

/// The per-connection cost of socket-level balancing relative to the
/// direct baseline: direct rate / socket-level rate (time per connection
/// of a closed loop), and the p50 latency ratio.
fn cost_ratios(results: &Results, size: u32) -> (Option<Spread>, Option<Spread>) {
    let metric = |m: &str| format!("conn_{m}_{PATH}");
    let time = results.ratio(
        (&metric("rate"), "direct", size),
        (&metric("rate"), "socketlb", size),
    );
    let p50 = results.ratio(
        (&metric("p50_us"), "socketlb", size),
        (&metric("p50_us"), "direct", size),
    );
    (time, p50)
}

/// The goal of issue 11 with its measured ratios.
pub fn goal(results: &Results, plan: &Plan) -> (String, String, Option<bool>) {
    let (time, p50) = cost_ratios(results, plan.conn_sizes[0]);
    let met = match (time, p50) {
        (Some(time), Some(p50)) => Some(time.median <= GOAL_COST && p50.median <= GOAL_COST),
        _ => None,
    };
    (
        "a new connection to a ClusterIP with socket-level balancing costs at most 5% more than one to the pod".into(),
        format!(
            "time per connection socket-LB/direct = {}, p50 = {}",
            show(time, 3),
            show(p50, 3)
        ),
        met,
    )
}

/// The report's subsection, appended to `md`; returns its chart.
pub fn report(md: &mut String, results: &Results, plan: &Plan) -> BarChart {
    let size = plan.conn_sizes[0];
    let metric = |m: &str| format!("conn_{m}_{PATH}");
    let _ = writeln!(
        md,
        "\n### Socket-level balancing\n\n\
         The same closed loop ({} threads, {:.1} s) from the client pod at {} services, run as a\n\
         process of its own (`xtask bench-client`) inside the client pod's network namespace\n\
         and a cgroup v2 directory the benchmark creates for the client pod (removed afterwards,\n\
         its processes moved out first). **direct**: to the server pod's address; **ours**: to\n\
         the ClusterIP through the packet path (TC on the pod device); **socketlb**: to the\n\
         ClusterIP with the same agent started with `--socket-lb-cgroup` on the client pod's\n\
         cgroup, so connect() is translated at the socket. Each figure is checked against the\n\
         datapath's counters (`lbctl stats`): every socketlb connection was translated at the\n\
         socket and none reached the packet path's service lookup as a new flow; no ours\n\
         connection was translated at the socket, and the packet path counted new flows.\n\
         Ratios are per repetition; time per connection is the inverse of the closed loop's\n\
         rate.\n\n\
         | variant | conn/s | p50 us | p99 us | failed | rate / direct | p50 / direct |\n\
         |---|---|---|---|---|---|---|",
        plan.conn_threads,
        plan.conn_duration.as_secs_f64(),
        size_label(size)
    );
    for variant in VARIANTS.map(Variant::name) {
        let ratio = |m: &str| {
            if variant == "direct" {
                "-".to_string()
            } else {
                show(
                    results.ratio((&metric(m), variant, size), (&metric(m), "direct", size)),
                    3,
                )
            }
        };
        let _ = writeln!(
            md,
            "| {variant} | {} | {} | {} | {} | {} | {} |",
            show(results.spread(&metric("rate"), variant, size), 0),
            show(results.spread(&metric("p50_us"), variant, size), 0),
            show(results.spread(&metric("p99_us"), variant, size), 0),
            show(results.spread(&metric("failed"), variant, size), 0),
            ratio("rate"),
            ratio("p50_us"),
        );
    }
    let (time, p50) = cost_ratios(results, size);
    let vs_packet = results.ratio(
        (&metric("rate"), "socketlb", size),
        (&metric("rate"), "ours", size),
    );
    let _ = writeln!(
        md,
        "\nsocket-LB / direct, time per connection: {}; p50 latency: {} (goal: at most {GOAL_COST}).\n\
         socket-LB / packet path, rate: {} (above 1: the socket-level path is faster).\n",
        show(time, 3),
        show(p50, 3),
        show(vs_packet, 3),
    );
    BarChart {
        title: "New connections per second, ClusterIP with socket-level balancing (median)".into(),
        y_label: "connections/s".into(),
        groups: vec![format!("{} services", size_label(size))],
        series: VARIANTS.iter().map(|v| v.name().to_string()).collect(),
        values: vec![
            VARIANTS
                .iter()
                .map(|v| median(results.spread(&metric("rate"), v.name(), size)))
                .collect(),
        ],
        log_scale: false,
    }
}
