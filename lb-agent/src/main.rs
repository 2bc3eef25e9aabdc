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
    // Before anything is attached: a container that cannot write
    // /proc/sys must find what it needs set already.
    if datapath::check_accept_local_at_start(&args.devices, !args.pod_devices.is_empty())? {
        info!("accept_local: set per device as devices are attached");
    } else {
        info!("accept_local: on for every device (net.ipv4.conf.all.accept_local=1)");
    }
    if let Some(cgroup) = &args.socket_lb_cgroup {
        // Attached after the first program; a wrong path stops us now.
        datapath::open_cgroup2(cgroup)?;
    }
    let mut datapath = Datapath::load(&args.bpffs, sizes)?;
    let mut tables = datapath.take_tables()?;
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
    let mut config = tables.config()?;
    config.maglev_table_size = maglev_table_size.unwrap_or(0);
    tables.set_config(&config).with_context(|| {
        format!(
            "writing the Maglev table size into {}",
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

    // Nothing is attached before the first program: after a map layout
    // upgrade the maps this agent created are empty until then, while the
    // programs a previous agent left attached still translate with theirs.
    let mut devices = DeviceTracker::default();
    // New pod devices are attached on their link notification; the
    // once-a-second resync stays as the fallback for anything missed.
    let mut link_events = match datapath::LinkEvents::open() {
        Ok(events) => Some(events),
        Err(e) => {
            warn!("link notifications unavailable ({e}); new devices are found by the 1 s resync");
            None
        }
    };
    let mut device_tick = tokio::time::interval(Duration::from_secs(1));
    // A write that failed (a full map) is retried without waiting for an
    // unrelated change: room may have come back.
    let mut retry_tick = tokio::time::interval(APPLY_RETRY);
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
                if !devices.started {
                    // The maps hold this state now: only from here may
                    // packets meet this agent's programs.
                    devices.started = true;
                    devices.sync(&mut datapath, &args, None);
                    if let Some(cgroup) = &args.socket_lb_cgroup {
                        datapath.attach_socket_lb(cgroup)?;
                        info!("socket-level balancing attached to {}", cgroup.display());
                    }
                    info!("{ATTACHED_LOG}: {} devices", datapath.attached().count());
                }
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
            change = next_link_change(&mut link_events) => {
                match change {
                    Ok(change) if devices.started => devices.sync(&mut datapath, &args, Some(change)),
                    Ok(_) => {}
                    Err(e) => {
                        warn!("reading link notifications: {e}; falling back to the 1 s resync");
                        link_events = None;
                    }
                }
            }
            _ = device_tick.tick() => {
                if devices.started {
                    devices.sync(&mut datapath, &args, None);
                }
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

/// Logged once the first program is done and everything is attached
/// (benchmarks and tools wait for it).
const ATTACHED_LOG: &str = "programs attached after the first program";

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

/// The next batch of link notifications; never, without a socket.
async fn next_link_change(
    events: &mut Option<datapath::LinkEvents>,
) -> std::io::Result<datapath::LinkChange> {
    match events {
        Some(events) => events.next().await,
        None => std::future::pending().await,
    }
}

/// Attaches to node devices and to pod devices as they appear.
#[derive(Default)]
struct DeviceTracker {
    /// The first program is done: devices may be attached.
    started: bool,
    /// Devices whose attach failed, so the warning is logged once.
    failed: BTreeSet<(String, u32)>,
    missing_logged: BTreeSet<String>,
}

impl DeviceTracker {
    /// Attaches what is missing; `trigger` is the link notification that
    /// asked, whose age the attach log line reports.
    fn sync(
        &mut self,
        datapath: &mut Datapath,
        args: &Args,
        trigger: Option<datapath::LinkChange>,
    ) {
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
                error!("{e:#}");
            }
            match datapath.attach(name, *index, role) {
                Ok(Some(how)) => match trigger {
                    Some(change) => info!(
                        "attached to {name} (ifindex {index}): {how}, {} us after its link \
                         notification",
                        change.at.elapsed().as_micros()
                    ),
                    None => info!("attached to {name} (ifindex {index}): {how}"),
                },
                Ok(None) => {}
                Err(e) => {
                    warn!("{e:#}");
                    self.failed.insert((name.clone(), *index));
                }
            }
        }
    }
}
