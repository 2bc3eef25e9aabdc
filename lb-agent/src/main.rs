//! `lb-agent`: the node agent. Reads cluster state from a source, computes the
//! desired tables for this node and programs the kernel datapath.

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::{CommandFactory as _, FromArgMatches as _, Parser};
use lb_agent::{
    conntrack_config::{ConntrackTimeouts, format_go_duration},
    datapath::{self, Datapath, DeviceRole, KernelTables, MapSizes, Programmer},
    health::{HealthCheckServers, Healthz},
    kube_proxy::{self, DetectLocal, NodePortAddresses},
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
///
/// kube-proxy's flags and its KubeProxyConfiguration file (`--config`) are
/// accepted: the ones that mean something here are honoured, the others
/// are accepted and named in a warning.
#[derive(Debug, Parser)]
#[command(version, args_override_self = true)]
struct Args {
    /// Name of the node this agent runs on (as in the Node object).
    /// Required, here or as --hostname-override.
    #[arg(long)]
    node_name: Option<String>,
    /// kube-proxy's name for --node-name.
    #[arg(long)]
    hostname_override: Option<String>,
    /// Directory of Kubernetes manifests (Service, EndpointSlice, Node), watched for changes.
    #[arg(long, group = "source")]
    manifests: Option<PathBuf>,
    /// Kubeconfig of the cluster to watch. Without it, --master and
    /// --manifests: in-cluster configuration.
    #[arg(long, group = "source")]
    kubeconfig: Option<PathBuf>,
    /// Address of the Kubernetes API server (`https://host:6443`); overrides
    /// the kubeconfig's server, or the in-cluster one without --kubeconfig.
    #[arg(long, conflicts_with = "manifests")]
    master: Option<String>,
    /// A KubeProxyConfiguration file (kubeproxy.config.k8s.io/v1alpha1), as
    /// kube-proxy reads it from its ConfigMap. Flags given on the command
    /// line win over it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Remove everything the agent installed on this node (program links,
    /// cgroup attachments, pinned maps and the --bpffs directory) and exit.
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value_t = false,
          value_parser = clap::builder::BoolishValueParser::new())]
    cleanup: bool,
    /// Where Prometheus metrics are served (`/metrics`); empty: nowhere.
    #[arg(long, default_value = "127.0.0.1:10249",
          value_parser = |s: &str| BindAddress::parse(s, 10249))]
    metrics_bind_address: BindAddress,
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
    /// NodePorts open on, or `primary` (the node's primary address of each
    /// family); default: the addresses of --devices.
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<String>,
    /// The pods' CIDRs (comma-separated, at most one per family). Validated
    /// and reported; pod traffic is told apart by its device (--pod-devices).
    #[arg(long, value_parser = parse_cluster_cidr_arg)]
    cluster_cidr: Option<ClusterCidr>,
    /// kube-proxy's mode; this agent has one, `ebpf` (empty means the same).
    #[arg(long, value_parser = parse_proxy_mode)]
    proxy_mode: Option<String>,
    /// kube-proxy's way to tell pod traffic: `InterfaceNamePrefix` and
    /// `BridgeInterface` give the pod devices (when --pod-devices is not
    /// given); `ClusterCIDR`/`NodeCIDR` add nothing here.
    #[arg(long)]
    detect_local_mode: Option<String>,
    /// With --detect-local-mode=BridgeInterface: the pods' bridge.
    #[arg(long)]
    pod_bridge_interface: Option<String>,
    /// With --detect-local-mode=InterfaceNamePrefix: the pod devices' prefix.
    #[arg(long)]
    pod_interface_name_prefix: Option<String>,
    /// Log verbosity as kube-proxy's (klog) levels: 0-2 info, 3-4 debug,
    /// 5+ trace. Without it: RUST_LOG, else info.
    #[arg(short = 'v', long = "v", value_name = "LEVEL")]
    verbosity: Option<u8>,
    /// Idle timeout of established TCP connections (Go duration).
    #[arg(long, default_value = "24h0m0s", value_parser = parse_duration_arg)]
    conntrack_tcp_timeout_established: Duration,
    /// Idle timeout of TCP connections in CLOSE_WAIT (Go duration).
    #[arg(long, default_value = "1h0m0s", value_parser = parse_duration_arg)]
    conntrack_tcp_timeout_close_wait: Duration,
    /// Idle timeout of UDP flows without replies (Go duration).
    #[arg(long, default_value = "30s", value_parser = parse_duration_arg)]
    conntrack_udp_timeout: Duration,
    /// Idle timeout of UDP flows with replies (Go duration).
    #[arg(long, default_value = "2m0s", value_parser = parse_duration_arg)]
    conntrack_udp_timeout_stream: Duration,
    /// NodePort numbers the cluster allows (kube-apiserver's --service-node-port-range).
    #[arg(long, default_value = "30000-32767", value_parser = parse_port_range)]
    service_node_port_range: std::ops::RangeInclusive<u16>,
    /// A cgroup v2 directory: sockets of its processes get socket-level
    /// balancing (connect/sendmsg time). Absent: off.
    #[arg(long)]
    socket_lb_cgroup: Option<PathBuf>,
    /// Where `/healthz` and `/livez` are served; empty: nowhere.
    #[arg(long, default_value = "0.0.0.0:10256",
          value_parser = |s: &str| BindAddress::parse(s, 10256))]
    healthz_bind_address: BindAddress,
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
    /// Idle timeout of TCP connections whose SYN has no answer yet (Go
    /// duration; not a kube-proxy flag: netfilter's is 2m, ours 1m).
    #[arg(long, default_value = "1m0s", value_parser = parse_duration_arg)]
    conntrack_tcp_timeout_syn_sent: Duration,
    /// Idle timeout of TCP connections after FINs both ways (TIME_WAIT;
    /// their SNAT ports may be claimed again before it ends).
    #[arg(long, default_value = "2m0s", value_parser = parse_duration_arg)]
    conntrack_tcp_timeout_time_wait: Duration,
    /// Idle timeout of TCP connections after a RST.
    #[arg(long, default_value = "10s", value_parser = parse_duration_arg)]
    conntrack_tcp_timeout_close: Duration,
    /// How often expired conntrack entries are collected (each sweep reads
    /// a bounded slice of the tables and resumes there next time).
    #[arg(long, default_value = "5s", value_parser = parse_duration_arg)]
    conntrack_gc_interval: Duration,
    /// At most this many backends in each `lb_backend_*` metric (the
    /// busiest; the rest are counted in `lb_backend_series_omitted`), so a
    /// large cluster cannot blow up the scrape. 0 turns them off.
    #[arg(long, default_value_t = metrics::DEFAULT_BACKEND_SERIES)]
    backend_metrics_limit: usize,
    /// Forward the programs' aya-log output (a debug line per new flow and
    /// per drop) to this log, target `lb_ebpf`. Off by default: costly.
    #[arg(long)]
    bpf_log: bool,
    /// --nodeport-addresses (or `nodePortAddresses`), parsed.
    #[arg(skip)]
    nodeport: NodePortAddresses,
    /// `--detect-local-mode` (or `detectLocalMode`), resolved.
    #[arg(skip)]
    detect_local: Option<DetectLocal>,
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

/// `--healthz-bind-address` / `--metrics-bind-address`: kube-proxy's
/// `ipport` (a bare address gets the default port); empty turns the
/// server off, as in kube-proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BindAddress(Option<SocketAddr>);

impl BindAddress {
    fn parse(value: &str, default_port: u16) -> Result<Self, String> {
        kube_proxy::parse_bind_address(value, default_port).map(BindAddress)
    }
}

/// `--cluster-cidr`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ClusterCidr(Vec<SourceRange>);

fn parse_cluster_cidr_arg(value: &str) -> Result<ClusterCidr, String> {
    kube_proxy::parse_cluster_cidr(value).map(ClusterCidr)
}

fn parse_proxy_mode(value: &str) -> Result<String, String> {
    match value.trim() {
        "" | kube_proxy::MODE => Ok(kube_proxy::MODE.to_owned()),
        other => Err(format!(
            "this agent has one mode, {:?}; {other:?} is not it",
            kube_proxy::MODE
        )),
    }
}

fn parse_duration_arg(value: &str) -> Result<Duration, String> {
    lb_agent::conntrack_config::parse_go_duration(value)
}

impl Args {
    /// The conntrack timeouts asked for. A zero keeps the default, as
    /// kube-proxy's zero keeps the kernel's setting.
    fn conntrack_timeouts(&self) -> ConntrackTimeouts {
        let default = ConntrackTimeouts::default();
        let or = |value: Duration, default: Duration| {
            if value.is_zero() { default } else { value }
        };
        ConntrackTimeouts {
            tcp_established: or(
                self.conntrack_tcp_timeout_established,
                default.tcp_established,
            ),
            tcp_close_wait: or(
                self.conntrack_tcp_timeout_close_wait,
                default.tcp_close_wait,
            ),
            udp: or(self.conntrack_udp_timeout, default.udp),
            udp_stream: or(self.conntrack_udp_timeout_stream, default.udp_stream),
        }
    }
}

/// The command line: [`Args`] plus kube-proxy's flags that mean nothing
/// here, accepted (hidden from `--help`) so a kube-proxy command line
/// starts the agent; [`settle`] names each one given in a warning.
fn command() -> clap::Command {
    Args::command()
        .args(kube_proxy::IGNORED_FLAGS.iter().map(|flag| {
            let arg = clap::Arg::new(flag.name)
                .long(flag.name)
                .hide(true)
                .help(flag.why);
            if flag.takes_value {
                arg.num_args(1).allow_hyphen_values(true)
            } else {
                arg.num_args(0..=1)
                    .require_equals(true)
                    .default_missing_value("true")
                    .value_parser(clap::builder::BoolishValueParser::new())
            }
        }))
        .after_help(
            "kube-proxy's other flags (--iptables-*, --ipvs-*, --conntrack-min, ...) are \
             accepted and ignored, each with a warning naming it.",
        )
}

/// Messages for the log, kept until the logger exists.
type Notes = Vec<(log::Level, String)>;

/// Completes `args` from what clap cannot do alone: the ignored flags
/// (named in warnings), `--config` (under the flags given on the command
/// line, as kube-proxy does), and checks across flags.
fn settle(args: &mut Args, matches: &clap::ArgMatches) -> Result<Notes, String> {
    let mut notes = Notes::new();
    for flag in kube_proxy::IGNORED_FLAGS {
        if matches.value_source(flag.name) == Some(clap::parser::ValueSource::CommandLine) {
            let value: Vec<String> = matches
                .get_raw(flag.name)
                .into_iter()
                .flatten()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            notes.push((
                log::Level::Warn,
                format!(
                    "--{}={}: a kube-proxy flag, ignored: {}",
                    flag.name,
                    value.join(","),
                    flag.why
                ),
            ));
        }
    }
    args.nodeport = NodePortAddresses::parse(&args.nodeport_addresses)
        .map_err(|e| format!("--nodeport-addresses: {e}"))?;
    if let Some(mode) = &args.detect_local_mode {
        args.detect_local = Some(
            DetectLocal::resolve(
                mode,
                args.pod_bridge_interface.as_deref().unwrap_or_default(),
                args.pod_interface_name_prefix
                    .as_deref()
                    .unwrap_or_default(),
                ["--pod-bridge-interface", "--pod-interface-name-prefix"],
            )
            .map_err(|e| format!("--detect-local-mode: {e}"))?,
        );
    }
    if let Some(path) = args.config.clone() {
        let loaded = kube_proxy::load(&path).map_err(|e| format!("--config {e}"))?;
        apply_config(args, matches, loaded, &mut notes);
    }
    match (&args.node_name, &args.hostname_override) {
        (Some(name), Some(other)) if name != other => {
            return Err(format!(
                "--node-name {name:?} and --hostname-override {other:?} name different nodes"
            ));
        }
        (None, Some(other)) => args.node_name = Some(other.clone()),
        _ => {}
    }
    if let Some(glob) = args
        .detect_local
        .as_ref()
        .and_then(DetectLocal::pod_devices)
    {
        if args.pod_devices.is_empty() {
            notes.push((
                log::Level::Info,
                format!("pod devices from the detect-local mode: {glob}"),
            ));
            args.pod_devices = vec![glob];
        } else if !args.pod_devices.contains(&glob) {
            notes.push((
                log::Level::Warn,
                format!(
                    "detect-local mode names pod devices {glob:?}; --pod-devices {} is used",
                    args.pod_devices.join(",")
                ),
            ));
        }
    }
    Ok(notes)
}

/// Takes from a KubeProxyConfiguration every field that maps onto a flag
/// not given on the command line; names the fields it ignores.
fn apply_config(
    args: &mut Args,
    matches: &clap::ArgMatches,
    loaded: kube_proxy::LoadedConfig,
    notes: &mut Notes,
) {
    let explicit =
        |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
    let file = args
        .config
        .as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let c = loaded.config;
    if let Some(name) = c.hostname_override
        && !explicit("node_name")
        && !explicit("hostname_override")
    {
        args.hostname_override = Some(name);
    }
    if let Some(path) = c.kubeconfig
        && !explicit("kubeconfig")
    {
        if args.manifests.is_some() {
            notes.push((
                log::Level::Info,
                format!("--config {file}: clientConnection.kubeconfig unused with --manifests"),
            ));
        } else {
            args.kubeconfig = Some(path);
        }
    }
    if let Some(address) = c.healthz_bind_address
        && !explicit("healthz_bind_address")
    {
        args.healthz_bind_address = BindAddress(Some(address));
    }
    if let Some(address) = c.metrics_bind_address
        && !explicit("metrics_bind_address")
    {
        args.metrics_bind_address = BindAddress(Some(address));
    }
    if let Some(cidrs) = c.cluster_cidr
        && !explicit("cluster_cidr")
    {
        args.cluster_cidr = Some(ClusterCidr(cidrs));
    }
    if let Some(nodeport) = c.nodeport_addresses
        && !explicit("nodeport_addresses")
    {
        args.nodeport = nodeport;
    }
    for (id, value, field) in [
        (
            "conntrack_tcp_timeout_established",
            c.tcp_established_timeout,
            &mut args.conntrack_tcp_timeout_established,
        ),
        (
            "conntrack_tcp_timeout_close_wait",
            c.tcp_close_wait_timeout,
            &mut args.conntrack_tcp_timeout_close_wait,
        ),
        (
            "conntrack_udp_timeout",
            c.udp_timeout,
            &mut args.conntrack_udp_timeout,
        ),
        (
            "conntrack_udp_timeout_stream",
            c.udp_stream_timeout,
            &mut args.conntrack_udp_timeout_stream,
        ),
    ] {
        if let Some(value) = value
            && !explicit(id)
        {
            *field = value;
        }
    }
    if let Some(detect_local) = c.detect_local
        && !explicit("detect_local_mode")
    {
        args.detect_local = Some(detect_local);
    }
    // Level 0 is the default; it leaves RUST_LOG in charge.
    if let Some(level) = c.verbosity.filter(|v| *v > 0)
        && !explicit("verbosity")
    {
        args.verbosity = Some(level);
    }
    if !loaded.ignored.is_empty() {
        notes.push((
            log::Level::Warn,
            format!(
                "--config {file}: fields of kube-proxy's that mean nothing here, ignored: {}",
                loaded.ignored.join(", ")
            ),
        ));
    }
    if !loaded.unknown.is_empty() {
        notes.push((
            log::Level::Warn,
            format!(
                "--config {file}: unknown fields, ignored: {}",
                loaded.unknown.join(", ")
            ),
        ));
    }
    for note in loaded.notes {
        notes.push((log::Level::Warn, format!("--config {file}: {note}")));
    }
}

fn main() -> std::process::ExitCode {
    let matches = command().get_matches();
    let mut args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let notes = match settle(&mut args, &matches) {
        Ok(notes) => notes,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let mut logger = match args.verbosity {
        // kube-proxy's -v is about kube-proxy's own messages: the
        // libraries stay at info.
        Some(level) => {
            let mut builder = env_logger::Builder::new();
            builder
                .filter_level(log::LevelFilter::Info)
                .filter_module("lb_agent", kube_proxy::log_level(level));
            builder
        }
        None => env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")),
    };
    if args.bpf_log {
        // The programs log at debug level; --bpf-log asks to see them.
        logger.filter_module(lb_agent::bpf_log::TARGET, log::LevelFilter::Debug);
    }
    logger.init();
    for (level, note) in notes {
        log::log!(level, "{note}");
    }
    if args.cleanup {
        return match datapath::cleanup(&args.bpffs) {
            Ok(report) => {
                info!("cleanup: {report}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                error!("cleanup: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let Some(node_name) = args.node_name.clone() else {
        error!("--node-name or --hostname-override (or hostnameOverride in --config) is required");
        return std::process::ExitCode::from(2);
    };
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
    match runtime.block_on(run(args, node_name)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, node_name: String) -> anyhow::Result<()> {
    // EndpointSlice changes triggered before this are not ours to measure
    // (kube-proxy's tracker start time).
    let started_at = std::time::SystemTime::now();
    if let Some(ClusterCidr(cidrs)) = &args.cluster_cidr {
        let cidrs: Vec<String> = cidrs
            .iter()
            .map(|r| format!("{}/{}", r.addr, r.prefix_len))
            .collect();
        info!(
            "cluster CIDR {}: pod traffic is told apart by its device (--pod-devices)",
            cidrs.join(",")
        );
    }
    let timeouts = args.conntrack_timeouts();
    info!(
        "conntrack timeouts: TCP established {}, TCP close-wait {}, UDP {}, UDP stream {}",
        format_go_duration(timeouts.tcp_established),
        format_go_duration(timeouts.tcp_close_wait),
        format_go_duration(timeouts.udp),
        format_go_duration(timeouts.udp_stream)
    );
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
    // Memberships adopted from pins made before the counters existed.
    match tables.backfill_backend_stats() {
        Ok(0) => {}
        Ok(made) => log::info!("per-backend counters made for {made} adopted memberships"),
        Err(error) => log::warn!("making per-backend counters: {error:#}"),
    }
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
    let ct_timeouts = datapath_ct_timeouts(&args)?;
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

    let metrics = Arc::new(Metrics::new(Some(
        DatapathCollector::new(&args.bpffs).with_backend_series(args.backend_metrics_limit),
    )));
    let metrics_server = match args.metrics_bind_address {
        BindAddress(Some(address)) => {
            let listener = metrics::bind(address).await?;
            Some(tokio::spawn(metrics::serve(listener, metrics.clone())))
        }
        BindAddress(None) => None,
    };

    let (sender, mut states) = watch::channel(Arc::new(ClusterState::default()));
    let watcher = match &args.manifests {
        Some(dir) => tokio::spawn(files::watch_dir(
            dir.clone(),
            Duration::from_millis(args.manifests_poll_ms.max(10)),
            sender,
        )),
        None => {
            let client = kube::client(args.kubeconfig.as_deref(), args.master.as_deref()).await?;
            tokio::spawn(kube::watch_cluster(
                client,
                node_name.clone(),
                sender,
                metrics.clone(),
            ))
        }
    };
    let mut addresses = NodeAddresses::default();
    let mut node = NodeIdentity {
        name: node_name.clone(),
        service_proxy_name: args.service_proxy_name.clone(),
        nodeport_range: args.service_node_port_range.clone(),
        ..NodeIdentity::default()
    };
    let mut node_ips: Vec<std::net::IpAddr> = Vec::new();
    refresh_addresses(&args, &node_ips, &mut addresses, &mut node, &mut tables);

    let healthz = Healthz::default();
    let healthz_server = match args.healthz_bind_address {
        BindAddress(Some(address)) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("--healthz-bind-address {address}: cannot listen"))?;
            Some(tokio::spawn(healthz.clone().serve(listener)))
        }
        BindAddress(None) => None,
    };
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
                let ips = state.node(&node.name).map(node::node_ips).unwrap_or_default();
                if ips != node_ips {
                    node_ips = ips;
                    refresh_addresses(&args, &node_ips, &mut addresses, &mut node, &mut tables);
                }
                let triggers = lb_agent::source::new_trigger_times(last_state.as_deref(), &state, started_at);
                let (report, desired) = program(&state, &node, &mut programmer, &mut tables, args.socket_lb_cgroup.as_deref());
                metrics.programmed(arrived, report.frontends, report.backends, report.errors.len());
                metrics.changes_programmed(&triggers);
                apply_failed = !report.errors.is_empty();
                retry_tick.reset();
                count_full_maps(&metrics, &mut tables);
                for e in health_checks.sync(&desired.health_checks).await {
                    error!("{e}");
                }
                healthz.set_node_eligible(
                    state.node(&node.name).is_none_or(lb_agent::health::node_eligible),
                );
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
                let changed = refresh_addresses(&args, &node_ips, &mut addresses, &mut node, &mut tables);
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
    if let Some(task) = metrics_server {
        task.abort();
    }
    if let Some(task) = bpf_log {
        task.abort();
        if let Err(e) = lb_agent::bpf_log::set_flag(&mut tables, false) {
            warn!("{e:#}");
        }
    }
    if let Some(task) = healthz_server {
        task.abort();
    }
    info!("stopping; maps stay pinned under {}", args.bpffs.display());
    Ok(())
}

/// Conntrack entries one collection tick reads per family, at most: a
/// full table of the default size takes a few ticks, each a few
/// milliseconds of batch reads.
const GC_BUDGET: usize = 131_072;

/// The conntrack timeouts of the flags (and `--config`), as the datapath
/// reads them.
fn datapath_ct_timeouts(args: &Args) -> anyhow::Result<lb_common::conntrack::CtTimeouts> {
    let kube_proxy = args.conntrack_timeouts();
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
            kube_proxy.tcp_established,
        )?,
        tcp_close_wait: seconds(
            "conntrack-tcp-timeout-close-wait",
            kube_proxy.tcp_close_wait,
        )?,
        tcp_time_wait: seconds(
            "conntrack-tcp-timeout-time-wait",
            args.conntrack_tcp_timeout_time_wait,
        )?,
        tcp_close: seconds(
            "conntrack-tcp-timeout-close",
            args.conntrack_tcp_timeout_close,
        )?,
        udp: seconds("conntrack-udp-timeout", kube_proxy.udp)?,
        udp_stream: seconds("conntrack-udp-timeout-stream", kube_proxy.udp_stream)?,
        _pad: 0,
    })
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
    node_ips: &[std::net::IpAddr],
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
    let found = node::node_addresses(&interfaces, &args.devices, &args.nodeport, node_ips);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The command line as the agent reads it: clap, then [`settle`].
    fn parse(argv: &[&str]) -> Result<(Args, Notes), String> {
        let matches = command()
            .try_get_matches_from(std::iter::once("lb-agent").chain(argv.iter().copied()))
            .map_err(|e| e.to_string())?;
        let mut args = Args::from_arg_matches(&matches).map_err(|e| e.to_string())?;
        let notes = settle(&mut args, &matches)?;
        Ok((args, notes))
    }

    fn warnings(notes: &Notes) -> Vec<&str> {
        notes
            .iter()
            .filter(|(level, _)| *level == log::Level::Warn)
            .map(|(_, text)| text.as_str())
            .collect()
    }

    /// A kubeadm-era kube-proxy command line, flags of every kind.
    #[test]
    fn a_kube_proxy_command_line_starts_the_agent() {
        let (args, notes) = parse(&[
            "--hostname-override=node-1",
            "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56",
            "--master",
            "https://10.0.0.1:6443",
            "--proxy-mode=ebpf",
            "--v=2",
            "--nodeport-addresses=primary",
            "--healthz-bind-address=0.0.0.0:10256",
            "--metrics-bind-address=0.0.0.0",
            "--conntrack-max-per-core=0",
            "--conntrack-tcp-timeout-established=2h0m0s",
            "--iptables-sync-period",
            "30s",
            "--ipvs-scheduler=rr",
            "--masquerade-all",
            "--oom-score-adj",
            "-999",
            "--feature-gates=Foo=true,Bar=false",
            "--bind-address-hard-fail=false",
            "--alsologtostderr",
            "--logtostderr=true",
        ])
        .expect("accepted");
        assert_eq!(args.node_name.as_deref(), Some("node-1"));
        assert_eq!(args.master.as_deref(), Some("https://10.0.0.1:6443"));
        assert_eq!(args.verbosity, Some(2));
        assert_eq!(args.nodeport, NodePortAddresses::Primary);
        assert_eq!(args.cluster_cidr.as_ref().map(|c| c.0.len()), Some(2));
        assert_eq!(
            args.metrics_bind_address,
            BindAddress(Some("0.0.0.0:10249".parse().unwrap()))
        );
        assert_eq!(
            args.conntrack_timeouts(),
            ConntrackTimeouts {
                tcp_established: Duration::from_secs(7200),
                ..ConntrackTimeouts::default()
            }
        );
        let warned = warnings(&notes);
        for flag in [
            "--conntrack-max-per-core=0:",
            "--iptables-sync-period=30s:",
            "--ipvs-scheduler=rr:",
            "--masquerade-all=true:",
            "--oom-score-adj=-999:",
            "--feature-gates=Foo=true,Bar=false:",
            "--bind-address-hard-fail=false:",
            "--alsologtostderr=true:",
            "--logtostderr=true:",
        ] {
            assert_eq!(
                warned.iter().filter(|w| w.starts_with(flag)).count(),
                1,
                "{flag} not warned once: {warned:#?}"
            );
        }
        assert_eq!(warned.len(), 9, "{warned:#?}");
    }

    /// As Go's flag package: a repeated flag's last value wins, a repeated
    /// list flag accumulates.
    #[test]
    fn repeated_flags_behave_like_kube_proxys() {
        let (args, _) = parse(&[
            "--node-name=a",
            "--node-name=b",
            "--pod-devices=lxc*",
            "--pod-devices=veth*,cali*",
            "--iptables-sync-period=1s",
            "--iptables-sync-period=2s",
        ])
        .expect("parse");
        assert_eq!(args.node_name.as_deref(), Some("b"));
        assert_eq!(args.pod_devices, ["lxc*", "veth*", "cali*"]);
    }

    #[test]
    fn unknown_flags_still_fail() {
        let error = parse(&["--node-name=n", "--no-such-flag=1"]).expect_err("refused");
        assert!(error.contains("--no-such-flag"), "{error}");
    }

    #[test]
    fn proxy_mode_accepts_ours_and_empty_only() {
        for ok in ["--proxy-mode=ebpf", "--proxy-mode="] {
            parse(&["--node-name=n", ok]).expect(ok);
        }
        for bad in ["iptables", "ipvs", "nftables"] {
            let error = parse(&["--node-name=n", &format!("--proxy-mode={bad}")]).expect_err(bad);
            assert!(
                error.contains("--proxy-mode") && error.contains("ebpf"),
                "{error}"
            );
        }
    }

    #[test]
    fn conntrack_timeouts_parse_go_durations_and_name_the_flag() {
        let (args, _) = parse(&[
            "--node-name=n",
            "--conntrack-tcp-timeout-established=24h0m0s",
            "--conntrack-tcp-timeout-close-wait=1m30s",
            "--conntrack-udp-timeout=500ms",
            "--conntrack-udp-timeout-stream=0s",
        ])
        .expect("parse");
        assert_eq!(
            args.conntrack_timeouts(),
            ConntrackTimeouts {
                tcp_established: Duration::from_secs(86_400),
                tcp_close_wait: Duration::from_secs(90),
                udp: Duration::from_millis(500),
                // Zero: kube-proxy's "leave it", the default here.
                udp_stream: Duration::from_secs(120),
            }
        );
        let (args, _) = parse(&["--node-name=n"]).expect("parse");
        assert_eq!(args.conntrack_timeouts(), ConntrackTimeouts::default());
        let error = parse(&["--node-name=n", "--conntrack-udp-timeout=30"]).expect_err("no unit");
        assert!(
            error.contains("--conntrack-udp-timeout") && error.contains("no unit"),
            "{error}"
        );
    }

    #[test]
    fn verbosity_takes_both_spellings() {
        for argv in [["-v", "4"], ["--v", "4"]] {
            let (args, _) = parse(&["--node-name=n", argv[0], argv[1]]).expect("parse");
            assert_eq!(args.verbosity, Some(4));
        }
        let (args, _) = parse(&["--node-name=n", "-v=5"]).expect("parse");
        assert_eq!(args.verbosity, Some(5));
    }

    #[test]
    fn node_name_from_either_flag_and_they_must_agree() {
        let (args, _) = parse(&["--node-name=a"]).expect("parse");
        assert_eq!(args.node_name.as_deref(), Some("a"));
        let (args, _) = parse(&["--node-name=a", "--hostname-override=a"]).expect("parse");
        assert_eq!(args.node_name.as_deref(), Some("a"));
        let error = parse(&["--node-name=a", "--hostname-override=b"]).expect_err("disagree");
        assert!(error.contains("--hostname-override"), "{error}");
        // None at all is caught once the cleanup case is ruled out.
        let (args, _) = parse(&[]).expect("parse");
        assert_eq!(args.node_name, None);
    }

    #[test]
    fn cluster_cidr_and_nodeport_addresses_are_validated() {
        for (argv, needle) in [
            ("--cluster-cidr=10.244.0.0", "--cluster-cidr"),
            (
                "--cluster-cidr=10.0.0.0/8,10.1.0.0/16",
                "more than one IPv4",
            ),
            (
                "--nodeport-addresses=primary,10.0.0.0/8",
                "--nodeport-addresses",
            ),
            ("--nodeport-addresses=nonsense", "--nodeport-addresses"),
            ("--healthz-bind-address=here", "--healthz-bind-address"),
        ] {
            let error = parse(&["--node-name=n", argv]).expect_err(argv);
            assert!(error.contains(needle), "{argv}: {error}");
        }
        let (args, _) = parse(&["--node-name=n", "--healthz-bind-address="]).expect("parse");
        assert_eq!(args.healthz_bind_address, BindAddress(None));
        let (args, _) =
            parse(&["--node-name=n", "--nodeport-addresses=10.0.0.0/8,fd00::/64"]).expect("parse");
        assert!(matches!(args.nodeport, NodePortAddresses::Cidrs(ref c) if c.len() == 2));
    }

    #[test]
    fn master_needs_no_kubeconfig_but_excludes_manifests() {
        let (args, _) = parse(&["--node-name=n", "--master=http://127.0.0.1:8080"]).expect("alone");
        assert_eq!(args.kubeconfig, None);
        parse(&["--node-name=n", "--master=http://x", "--kubeconfig=/k"]).expect("with kubeconfig");
        let error =
            parse(&["--node-name=n", "--master=http://x", "--manifests=/m"]).expect_err("conflict");
        assert!(error.contains("--manifests"), "{error}");
    }

    #[test]
    fn cleanup_is_a_go_style_switch() {
        for (argv, want) in [
            (vec![], false),
            (vec!["--cleanup"], true),
            (vec!["--cleanup=true"], true),
            (vec!["--cleanup=false"], false),
        ] {
            let (args, _) = parse(&argv).expect("parse");
            assert_eq!(args.cleanup, want, "{argv:?}");
        }
    }

    #[test]
    fn detect_local_mode_gives_pod_devices() {
        let (args, _) = parse(&[
            "--node-name=n",
            "--detect-local-mode=InterfaceNamePrefix",
            "--pod-interface-name-prefix=cali",
        ])
        .expect("parse");
        assert_eq!(args.pod_devices, ["cali*"]);
        let (args, notes) = parse(&[
            "--node-name=n",
            "--detect-local-mode=BridgeInterface",
            "--pod-bridge-interface=cbr0",
            "--pod-devices=lxc*",
        ])
        .expect("parse");
        assert_eq!(args.pod_devices, ["lxc*"]);
        assert!(warnings(&notes)[0].contains("\"cbr0\""), "{notes:?}");
        let error = parse(&["--node-name=n", "--detect-local-mode=BridgeInterface"])
            .expect_err("no bridge");
        assert!(error.contains("--pod-bridge-interface"), "{error}");
    }

    fn write_config(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lb-agent-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    fn kubeadm_config() -> String {
        let configmap: serde_yaml::Value =
            serde_yaml::from_str(include_str!("testdata/kubeadm-kube-proxy-configmap.yaml"))
                .expect("YAML");
        configmap["data"]["config.conf"]
            .as_str()
            .expect("config.conf")
            .to_owned()
    }

    /// kubeadm's DaemonSet: `--config=/var/lib/kube-proxy/config.conf
    /// --hostname-override=$(NODE_NAME)`.
    #[test]
    fn kubeadms_command_line_and_file() {
        let config = write_config("kubeadm.conf", &kubeadm_config());
        let (args, notes) = parse(&[
            &format!("--config={}", config.display()),
            "--hostname-override=node-1",
        ])
        .expect("accepted");
        assert_eq!(args.node_name.as_deref(), Some("node-1"));
        assert_eq!(
            args.kubeconfig.as_deref(),
            Some(std::path::Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
        );
        assert_eq!(args.cluster_cidr.as_ref().map(|c| c.0.len()), Some(2));
        // Empty in the file: the defaults stay.
        assert_eq!(
            args.healthz_bind_address,
            BindAddress(Some("0.0.0.0:10256".parse().unwrap()))
        );
        assert_eq!(args.conntrack_timeouts(), ConntrackTimeouts::default());
        assert_eq!(args.verbosity, None);
        let warned = warnings(&notes);
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(warned[0].contains("ignored: bindAddress"), "{}", warned[0]);
    }

    #[test]
    fn flags_given_win_over_the_file() {
        let config = write_config(
            "mine.conf",
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             hostnameOverride: from-file\nclusterCIDR: 10.244.0.0/16\n\
             healthzBindAddress: 127.0.0.1:1\nmetricsBindAddress: 127.0.0.1:2\n\
             nodePortAddresses: [192.168.0.0/16]\n\
             conntrack: {udpTimeout: 10s, tcpEstablishedTimeout: 1h0m0s}\n\
             logging: {verbosity: 4}\n",
        );
        let file = format!("--config={}", config.display());
        let (args, _) = parse(&[&file]).expect("file only");
        assert_eq!(args.node_name.as_deref(), Some("from-file"));
        assert_eq!(
            args.healthz_bind_address,
            BindAddress(Some("127.0.0.1:1".parse().unwrap()))
        );
        assert_eq!(args.conntrack_timeouts().udp, Duration::from_secs(10));
        assert_eq!(args.verbosity, Some(4));
        assert!(matches!(args.nodeport, NodePortAddresses::Cidrs(_)));

        let (args, _) = parse(&[
            &file,
            "--node-name=from-flag",
            "--cluster-cidr=10.96.0.0/12",
            "--healthz-bind-address=0.0.0.0:3",
            "--conntrack-udp-timeout=20s",
            "--nodeport-addresses=primary",
            "-v",
            "1",
        ])
        .expect("flags and file");
        assert_eq!(args.node_name.as_deref(), Some("from-flag"));
        assert_eq!(
            args.cluster_cidr.as_ref().map(|c| c.0[0].prefix_len),
            Some(12),
            "the flag's CIDR"
        );
        assert_eq!(
            args.healthz_bind_address,
            BindAddress(Some("0.0.0.0:3".parse().unwrap()))
        );
        // The flag's UDP timeout, the file's TCP one.
        assert_eq!(args.conntrack_timeouts().udp, Duration::from_secs(20));
        assert_eq!(
            args.conntrack_timeouts().tcp_established,
            Duration::from_secs(3600)
        );
        assert_eq!(args.nodeport, NodePortAddresses::Primary);
        assert_eq!(args.verbosity, Some(1));
        // The file's metrics address: no flag for it.
        assert_eq!(
            args.metrics_bind_address,
            BindAddress(Some("127.0.0.1:2".parse().unwrap()))
        );
    }

    #[test]
    fn a_bad_file_names_the_field() {
        let config = write_config(
            "bad.conf",
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             conntrack: {udpTimeout: 5 minutes}\n",
        );
        let error =
            parse(&["--node-name=n", &format!("--config={}", config.display())]).expect_err("bad");
        assert!(
            error.contains("--config") && error.contains("conntrack.udpTimeout"),
            "{error}"
        );
        let error =
            parse(&["--node-name=n", "--config=/nonexistent/kp.conf"]).expect_err("missing");
        assert!(error.contains("/nonexistent/kp.conf"), "{error}");
    }
}
