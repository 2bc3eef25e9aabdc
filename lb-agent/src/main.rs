//! `lb-agent`: the node agent. Reads cluster state from a source, computes the
//! desired tables for this node and programs the kernel datapath.

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use lb_agent::{
    datapath::{self, Datapath, DeviceRole, KernelTables, MapSizes, Programmer},
    health::{HealthCheckServers, Healthz},
    metrics::{self, DatapathCollector, Metrics},
    model::{self, ClusterState, DesiredTables, NodeIdentity, SourceRange},
    node::{self, NodeAddresses},
    source::{files, kube},
    upgrade,
};
use log::{error, info, warn};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

/// eBPF service load balancer agent (kube-proxy replacement).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Name of the node this agent runs on (as in the Node object).
    #[arg(long)]
    node_name: String,
    /// Directory of Kubernetes manifests (Service, EndpointSlice, Node), watched for changes.
    #[arg(long, group = "source")]
    manifests: Option<PathBuf>,
    /// Kubeconfig of the cluster to watch. Without it and without
    /// --manifests: in-cluster configuration.
    #[arg(long, group = "source")]
    kubeconfig: Option<PathBuf>,
    /// Where Prometheus metrics are served (`/metrics`).
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: SocketAddr,
    /// How often the manifest directory is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 250)]
    manifests_poll_ms: u64,
    /// Node devices (comma-separated interface names).
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,
    /// Pod-facing devices (comma-separated globs); new ones are picked up as they appear.
    #[arg(long, value_delimiter = ',')]
    pod_devices: Vec<String>,
    /// Directory on a bpffs where this agent pins its maps (one per agent instance).
    #[arg(long, default_value = "/sys/fs/bpf/lb")]
    bpffs: PathBuf,
    /// Only proxy services whose `service.kubernetes.io/service-proxy-name` label is this.
    #[arg(long)]
    service_proxy_name: Option<String>,
    /// CIDRs (comma-separated, IPv4 and IPv6 may mix) of the local addresses
    /// NodePorts open on; default: the addresses of --devices.
    #[arg(long, value_delimiter = ',', value_parser = parse_cidr_arg)]
    nodeport_addresses: Vec<SourceRange>,
    /// NodePort numbers the cluster allows (kube-apiserver's --service-node-port-range).
    #[arg(long, default_value = "30000-32767", value_parser = parse_port_range)]
    service_node_port_range: std::ops::RangeInclusive<u16>,
    /// A cgroup v2 directory: sockets of its processes get socket-level
    /// balancing (connect/sendmsg time). Absent: off.
    #[arg(long)]
    socket_lb_cgroup: Option<PathBuf>,
    /// Where `/healthz` is served.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: SocketAddr,
    /// Capacity of the service (frontend) map.
    #[arg(long, default_value_t = MapSizes::default().services)]
    max_services: u32,
    /// Capacity of the backend-slot map.
    #[arg(long, default_value_t = MapSizes::default().slots)]
    max_slots: u32,
    /// Capacity of the backend map.
    #[arg(long, default_value_t = MapSizes::default().backends)]
    max_backends: u32,
    /// Capacity of the conntrack map (two entries per flow).
    #[arg(long, default_value_t = MapSizes::default().conntrack)]
    max_conntrack: u32,
    /// How new flows pick a backend: `random` (kube-proxy's choice) or
    /// `maglev` (consistent hashing of the 5-tuple: every node picks the
    /// same backend for a flow, and a backend change moves few flows).
    #[arg(long, value_enum, default_value_t = Algorithm::Random)]
    lb_algorithm: Algorithm,
    /// Slots of each frontend's Maglev table (a prime, larger than any
    /// service's number of endpoints; ~100x that number for evenness).
    #[arg(long, default_value_t = lb_common::maglev::DEFAULT_TABLE_SIZE,
          value_parser = parse_table_size)]
    maglev_table_size: u32,
    /// Capacity of the Maglev table map, in chunks of 64 slots (a table
    /// of M slots takes M/64 of them).
    #[arg(long, default_value_t = MapSizes::default().maglev_chunks)]
    max_maglev_chunks: u32,
    /// How long a TCP conntrack entry lives after its last packet once
    /// established (kube-proxy's flag; Go duration).
    #[arg(long, default_value = "24h0m0s", value_parser = parse_duration_arg)]
    conntrack_tcp_timeout_established: Duration,
    /// ... after a FIN one way (kube-proxy's flag).
    #[arg(long, default_value = "1h0m0s", value_parser = parse_duration_arg)]
    conntrack_tcp_timeout_close_wait: Duration,
    /// ... a UDP flow nothing answered yet (kube-proxy's flag).
    #[arg(long, default_value = "30s", value_parser = parse_duration_arg)]
    conntrack_udp_timeout: Duration,
    /// ... a UDP flow answered (a stream; kube-proxy's flag).
    #[arg(long, default_value = "2m0s", value_parser = parse_duration_arg)]
    conntrack_udp_timeout_stream: Duration,
    /// ... a TCP SYN with no answer yet.
    #[arg(long, default_value = "1m0s", value_parser = parse_duration_arg)]
    conntrack_tcp_timeout_syn_sent: Duration,
    /// ... after FINs both ways (its SNAT port may be reused before).
    #[arg(long, default_value = "2m0s", value_parser = parse_duration_arg)]
    conntrack_tcp_timeout_time_wait: Duration,
    /// ... after a RST.
    #[arg(long, default_value = "10s", value_parser = parse_duration_arg)]
    conntrack_tcp_timeout_close: Duration,
    /// How often expired conntrack entries are collected (each sweep reads
    /// a bounded slice of the tables and resumes there next time).
    #[arg(long, default_value = "5s", value_parser = parse_duration_arg)]
    conntrack_gc_interval: Duration,
    /// Forward the programs' aya-log output (a debug line per new flow and
    /// per drop) to this log, target `lb_ebpf`. Off by default: costly.
    #[arg(long)]
    bpf_log: bool,
}

/// `--lb-algorithm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Algorithm {
    Random,
    Maglev,
}

fn parse_table_size(value: &str) -> Result<u32, String> {
    let size: u32 = value
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not a number"))?;
    // Any service with fewer endpoints than slots fits; the count is
    // checked per service when its table is built.
    lb_agent::maglev::validate_table_size(size, 0).map_err(|e| e.to_string())?;
    Ok(size)
}

fn parse_duration_arg(value: &str) -> Result<Duration, String> {
    lb_agent::duration::parse_go_duration(value).map_err(|e| e.to_string())
}

fn parse_cidr_arg(value: &str) -> Result<SourceRange, String> {
    model::parse_cidr(value)
        .ok_or_else(|| format!("{value:?} is not a CIDR (address/prefix length)"))
}

fn parse_port_range(value: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (low, high) = value
        .split_once('-')
        .ok_or_else(|| format!("{value:?} is not a port range LOW-HIGH"))?;
    let low: u16 = low
        .trim()
        .parse()
        .map_err(|_| format!("{low:?} is not a port"))?;
    let high: u16 = high
        .trim()
        .parse()
        .map_err(|_| format!("{high:?} is not a port"))?;
    if low == 0 || low > high {
        return Err(format!(
            "{value:?} is not a port range LOW-HIGH with 1 <= LOW <= HIGH"
        ));
    }
    Ok(low..=high)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if args.bpf_log {
        // The programs log at debug level; --bpf-log asks to see them.
        logger.filter_module(lb_agent::bpf_log::TARGET, log::LevelFilter::Debug);
    }
    logger.init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let sizes = MapSizes {
        services: args.max_services,
        slots: args.max_slots,
        backends: args.max_backends,
        conntrack: args.max_conntrack,
        maglev_chunks: args.max_maglev_chunks,
    };
    let maglev_table_size =
        (args.lb_algorithm == Algorithm::Maglev).then_some(args.maglev_table_size);
    let mut datapath = Datapath::load(&args.bpffs, sizes)?;
    let mut tables = datapath.take_tables()?;
    if let Some(cgroup) = &args.socket_lb_cgroup {
        datapath.attach_socket_lb(cgroup)?;
        info!("socket-level balancing attached to {}", cgroup.display());
    }
    lb_agent::bpf_log::set_flag(&mut tables, args.bpf_log)?;
    let bpf_log = if args.bpf_log {
        Some(lb_agent::bpf_log::spawn(&mut datapath)?)
    } else {
        None
    };
    let (programmer, stale_slots) = Programmer::adopt(
        tables.dump_all_services()?,
        &tables.dump_slots()?,
        tables.dump_all_backends()?,
        tables.dump_source_ranges()?,
    );
    let mut programmer = programmer.with_maglev(maglev_table_size);
    let stale_chunks = programmer.adopt_maglev(tables.dump_maglev()?);
    // Before the first apply: tables of another size are never read.
    let ct_timeouts = conntrack_timeouts(&args)?;
    let mut config = tables.config()?;
    config.maglev_table_size = maglev_table_size.unwrap_or(0);
    config.ct = ct_timeouts;
    tables.set_config(&config).with_context(|| {
        format!(
            "writing the Maglev table size and conntrack timeouts into {}",
            lb_common::config::NAME
        )
    })?;
    match maglev_table_size {
        Some(m) => info!("new flows pick backends by Maglev (table size {m})"),
        None => info!("new flows pick backends at random"),
    }
    info!(
        "datapath loaded, maps pinned under {} ({} frontends adopted)",
        args.bpffs.display(),
        programmer.frontends()
    );

    let metrics = Arc::new(Metrics::new(Some(DatapathCollector::new(&args.bpffs))));
    let metrics_listener = metrics::bind(args.metrics_bind_address).await?;
    let metrics_server = tokio::spawn(metrics::serve(metrics_listener, metrics.clone()));

    let (sender, mut states) = watch::channel(Arc::new(ClusterState::default()));
    let watcher = match &args.manifests {
        Some(dir) => tokio::spawn(files::watch_dir(
            dir.clone(),
            Duration::from_millis(args.manifests_poll_ms.max(10)),
            sender,
        )),
        None => {
            let client = kube::client(args.kubeconfig.as_deref()).await?;
            tokio::spawn(kube::watch_cluster(
                client,
                args.node_name.clone(),
                sender,
                metrics.clone(),
            ))
        }
    };
    let mut addresses = NodeAddresses::default();
    let mut node = NodeIdentity {
        name: args.node_name.clone(),
        service_proxy_name: args.service_proxy_name.clone(),
        nodeport_range: args.service_node_port_range.clone(),
        ..NodeIdentity::default()
    };
    refresh_addresses(&args, &mut addresses, &mut node, &mut tables);

    let healthz = Healthz::default();
    let healthz_listener = tokio::net::TcpListener::bind(args.healthz_bind_address)
        .await
        .with_context(|| {
            format!(
                "--healthz-bind-address {}: cannot listen",
                args.healthz_bind_address
            )
        })?;
    let healthz_server = tokio::spawn(healthz.clone().serve(healthz_listener));
    let mut health_checks = HealthCheckServers::new(healthz.clone());

    let mut devices = DeviceTracker::default();
    devices.sync(&mut datapath, &args);
    let mut device_tick = tokio::time::interval(Duration::from_secs(1));
    // A write that failed (a full map) is retried without waiting for an
    // unrelated change: room may have come back.
    let mut retry_tick = tokio::time::interval(APPLY_RETRY);
    let mut gc_tick = tokio::time::interval(args.conntrack_gc_interval);
    let mut sweeper = datapath::ct_sweep::Sweeper::default();
    let mut apply_failed = false;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut stale_slots = Some((stale_slots, stale_chunks));
    let mut last_state: Option<Arc<ClusterState>> = None;

    loop {
        tokio::select! {
            changed = states.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the cluster-state source stopped");
                }
                let arrived = metrics.take_pending().unwrap_or_else(std::time::Instant::now);
                healthz.queued();
                let state = states.borrow_and_update().clone();
                let (report, desired) = program(&state, &node, &mut programmer, &mut tables, args.socket_lb_cgroup.as_deref());
                metrics.programmed(arrived, report.frontends, report.backends, report.errors.len());
                apply_failed = !report.errors.is_empty();
                retry_tick.reset();
                count_full_maps(&metrics, &mut tables);
                for e in health_checks.sync(&desired.health_checks).await {
                    error!("{e}");
                }
                healthz.set_node_eligible(node_eligible(&state, &node));
                healthz.updated();
                last_state = Some(state);
                if stale_slots.is_some() {
                    // The first program is done: pins of older map layouts are dead.
                    match upgrade::remove_superseded_pins(&args.bpffs, &datapath::MAP_NAMES) {
                        Ok(removed) if !removed.is_empty() => {
                            info!("removed pins of older map layouts: {}", removed.join(", "));
                        }
                        Ok(_) => {}
                        Err(e) => warn!("removing pins of older map layouts: {e}"),
                    }
                }
                // Only after the first full program: slots an interrupted
                // update of a previous agent left behind.
                if let Some((slots, chunks)) = stale_slots.take() {
                    let mut errors = programmer.delete_slots(&slots, &mut tables);
                    errors.extend(programmer.delete_maglev_chunks(&chunks, &mut tables));
                    for e in errors {
                        warn!("cleaning up after the previous agent: {e}");
                    }
                }
            }
            _ = device_tick.tick() => {
                devices.sync(&mut datapath, &args);
                let changed = refresh_addresses(&args, &mut addresses, &mut node, &mut tables);
                if let (true, Some(state)) = (changed, &last_state) {
                    let (_, desired) = program(state, &node, &mut programmer, &mut tables, args.socket_lb_cgroup.as_deref());
                    for e in health_checks.sync(&desired.health_checks).await {
                        error!("{e}");
                    }
                }
            }
            _ = retry_tick.tick(), if apply_failed => {
                if let Some(state) = &last_state {
                    info!("retrying the writes that failed");
                    let (report, desired) = program(state, &node, &mut programmer, &mut tables, args.socket_lb_cgroup.as_deref());
                    apply_failed = !report.errors.is_empty();
                    count_full_maps(&metrics, &mut tables);
                    for e in health_checks.sync(&desired.health_checks).await {
                        error!("{e}");
                    }
                }
            }
            _ = gc_tick.tick() => {
                let now = datapath::ct_sweep::coarse_now_ns();
                match sweeper.sweep(&mut tables, &ct_timeouts, now, GC_BUDGET) {
                    Ok(report) => metrics.conntrack_swept(&report),
                    Err(e) => warn!("collecting expired conntrack entries: {e:#}"),
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    watcher.abort();
    metrics_server.abort();
    if let Some(task) = bpf_log {
        task.abort();
        if let Err(e) = lb_agent::bpf_log::set_flag(&mut tables, false) {
            warn!("{e:#}");
        }
    }
    healthz_server.abort();
    info!("stopping; maps stay pinned under {}", args.bpffs.display());
    Ok(())
}

/// Conntrack entries one collection tick reads per family, at most: a
/// full table of the default size takes a few ticks, each a few
/// milliseconds of batch reads.
const GC_BUDGET: usize = 131_072;

/// The conntrack timeouts of the flags, as the datapath reads them.
fn conntrack_timeouts(args: &Args) -> anyhow::Result<lb_common::conntrack::CtTimeouts> {
    let seconds = |flag: &str, d: Duration| -> anyhow::Result<u32> {
        let s =
            u32::try_from(d.as_secs()).map_err(|_| anyhow::anyhow!("--{flag} {d:?}: too long"))?;
        if s == 0 {
            anyhow::bail!("--{flag} {d:?}: must be at least one second");
        }
        Ok(s)
    };
    Ok(lb_common::conntrack::CtTimeouts {
        tcp_syn: seconds(
            "conntrack-tcp-timeout-syn-sent",
            args.conntrack_tcp_timeout_syn_sent,
        )?,
        tcp_established: seconds(
            "conntrack-tcp-timeout-established",
            args.conntrack_tcp_timeout_established,
        )?,
        tcp_close_wait: seconds(
            "conntrack-tcp-timeout-close-wait",
            args.conntrack_tcp_timeout_close_wait,
        )?,
        tcp_time_wait: seconds(
            "conntrack-tcp-timeout-time-wait",
            args.conntrack_tcp_timeout_time_wait,
        )?,
        tcp_close: seconds(
            "conntrack-tcp-timeout-close",
            args.conntrack_tcp_timeout_close,
        )?,
        udp: seconds("conntrack-udp-timeout", args.conntrack_udp_timeout)?,
        udp_stream: seconds(
            "conntrack-udp-timeout-stream",
            args.conntrack_udp_timeout_stream,
        )?,
        _pad: 0,
    })
}

/// How soon writes that failed are tried again.
const APPLY_RETRY: Duration = Duration::from_secs(5);

/// Moves the kernel tables' full-map counts into `lb_map_full_total`.
fn count_full_maps(metrics: &Metrics, tables: &mut KernelTables) {
    for (map, count) in tables.take_map_full() {
        metrics.map_full(map, count);
        // Also where `lbctl stats` can see it, with no agent to ask.
        if let Err(e) = tables.stats.add_agent_map_full(count) {
            warn!(
                "counting refused inserts in {}: {e:#}",
                lb_common::stats::NAME
            );
        }
    }
}

fn program(
    state: &ClusterState,
    node: &NodeIdentity,
    programmer: &mut Programmer,
    tables: &mut KernelTables,
    socket_lb: Option<&std::path::Path>,
) -> (datapath::ApplyReport, DesiredTables) {
    let started = std::time::Instant::now();
    let (desired, errors) = model::desired_tables(state, node);
    for e in &errors {
        warn!("{e}");
    }
    let report = programmer.apply(&desired, tables);
    for e in &report.errors {
        error!("{e}");
    }
    // UDP has no end of connection: flows to a backend that left a service
    // would stick to it forever.
    match tables.flush_udp_conntrack(&report.removed_members) {
        Ok(0) => {}
        Ok(n) => info!("flushed {n} UDP conntrack entries of removed backends"),
        Err(e) => warn!("flushing UDP conntrack of removed backends: {e:#}"),
    }
    // Their socket-level twin: connected UDP sockets keep their backend.
    if let Some(cgroup) = socket_lb {
        destroy_sockets_of_removed(cgroup, &report.removed_udp, tables);
    }
    info!(
        "programmed {} frontends, {} backends ({} map writes, {} ms)",
        report.frontends,
        report.backends,
        report.writes,
        started.elapsed().as_millis()
    );
    (report, desired)
}

/// Destroys the connected UDP sockets of `cgroup`'s processes that
/// socket-level balancing gave a backend that has now left the service.
fn destroy_sockets_of_removed(
    cgroup: &std::path::Path,
    removed: &[datapath::RemovedUdpBackend],
    tables: &mut KernelTables,
) {
    let keys = tables.sockets_of_removed(removed);
    if keys.is_empty() {
        return;
    }
    let doomed: BTreeSet<(u64, std::net::SocketAddr)> =
        keys.iter().map(|k| (k.cookie(), k.backend())).collect();
    let doomed = Arc::new(doomed);
    match datapath::sockdiag::destroy_udp_sockets(cgroup, move |id| {
        doomed.contains(&(id.cookie, id.peer))
    }) {
        Ok(0) => {}
        Ok(n) => {
            info!("destroyed {n} UDP sockets connected to removed backends");
            if let Err(e) = tables.stats.add_agent_sock_destroyed(n as u64) {
                warn!("counting destroyed sockets: {e:#}");
            }
        }
        Err(e) => warn!("destroying UDP sockets of removed backends: {e:#}"),
    }
    // The sockets are gone (or were already); so are their reverse entries.
    for key in &keys {
        let _ = tables.remove_sock_revnat(key);
    }
}

/// Re-reads this node's addresses; on a change updates the NodePort
/// addresses the model uses and the SNAT address the programs use.
/// Returns whether anything changed.
fn refresh_addresses(
    args: &Args,
    current: &mut NodeAddresses,
    node: &mut NodeIdentity,
    tables: &mut KernelTables,
) -> bool {
    let interfaces = match datapath::interface_addresses() {
        Ok(i) => i,
        Err(e) => {
            warn!("listing addresses: {e}");
            return false;
        }
    };
    let found = node::node_addresses(&interfaces, &args.devices, &args.nodeport_addresses);
    if found == *current {
        return false;
    }
    info!(
        "node addresses: NodePorts on {:?}, SNAT from {:?} and {:?}",
        found.nodeport, found.snat4, found.snat6
    );
    // Read-modify-write: the flags belong to others (`lbctl trace`,
    // --bpf-log), the Maglev table size was set at start.
    let config = lb_common::config::LbConfig {
        node_addr4: found.snat4.map_or([0; 4], |a| a.octets()),
        ..tables.config().unwrap_or_default()
    };
    if let Err(e) = tables.set_config(&config) {
        error!(
            "writing the node address into {}: {e:#}",
            lb_common::config::NAME
        );
    }
    let config6 = lb_common::config::Lb6Config {
        node_addr6: found.snat6.map_or([0; 16], |a| a.octets()),
    };
    if let Err(e) = tables.set_config6(&config6) {
        error!(
            "writing the node address into {}: {e:#}",
            lb_common::config::NAME6
        );
    }
    node.nodeport_addresses = found.nodeport.clone();
    *current = found;
    true
}

/// kube-proxy's rule for `nodeEligible`: a Node being deleted should get no
/// new external traffic.
fn node_eligible(state: &ClusterState, node: &NodeIdentity) -> bool {
    state
        .node(&node.name)
        .is_none_or(|n| n.metadata.deletion_timestamp.is_none())
}

/// Attaches to node devices and to pod devices as they appear.
#[derive(Default)]
struct DeviceTracker {
    /// Devices whose attach failed, so the warning is logged once.
    failed: BTreeSet<(String, u32)>,
    missing_logged: BTreeSet<String>,
}

impl DeviceTracker {
    fn sync(&mut self, datapath: &mut Datapath, args: &Args) {
        let present = match datapath::list_interfaces() {
            Ok(p) => p,
            Err(e) => {
                warn!("listing interfaces: {e}");
                return;
            }
        };
        for gone in datapath.forget_missing(&present) {
            info!("device {gone} is gone");
        }
        for name in &args.devices {
            if !present.contains_key(name) && self.missing_logged.insert(name.clone()) {
                warn!("--devices: interface {name} does not exist (yet)");
            }
        }
        for (name, index) in &present {
            let wanted = args.devices.iter().any(|d| d == name)
                || args
                    .pod_devices
                    .iter()
                    .any(|g| datapath::glob_match(g, name));
            if !wanted || self.failed.contains(&(name.clone(), *index)) {
                continue;
            }
            let role = if args.devices.iter().any(|d| d == name) {
                DeviceRole::Node
            } else {
                DeviceRole::Pod
            };
            if !datapath.is_attached(name, *index)
                && let Err(e) = datapath::accept_local_sources(name)
            {
                warn!("{name}: setting accept_local: {e}");
            }
            match datapath.attach(name, *index, role) {
                Ok(Some(how)) => info!("attached to {name} (ifindex {index}): {how}"),
                Ok(None) => {}
                Err(e) => {
                    warn!("{e:#}");
                    self.failed.insert((name.clone(), *index));
                }
            }
        }
    }
}
