//! `lb-agent`: the node agent. Reads cluster state from a source, computes the
//! desired tables for this node and programs the kernel datapath.

use std::{collections::BTreeSet, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use lb_agent::{
    datapath::{self, Datapath, KernelTables, MapSizes, Programmer},
    model::{self, ClusterState, NodeIdentity},
    source::files,
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
    #[arg(long)]
    manifests: PathBuf,
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
}

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
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
    };
    let mut datapath = Datapath::load(&args.bpffs, sizes)?;
    let mut tables = datapath.take_tables()?;
    let (mut programmer, stale_slots) = Programmer::adopt(
        tables.dump_services()?,
        &tables.dump_slots()?,
        tables.dump_backends()?,
    );
    info!(
        "datapath loaded, maps pinned under {} ({} frontends adopted)",
        args.bpffs.display(),
        programmer.frontends()
    );

    let (sender, mut states) = watch::channel(Arc::new(ClusterState::default()));
    let watcher = tokio::spawn(files::watch_dir(
        args.manifests.clone(),
        Duration::from_millis(args.manifests_poll_ms.max(10)),
        sender,
    ));
    let node = NodeIdentity {
        name: args.node_name.clone(),
        service_proxy_name: args.service_proxy_name.clone(),
    };

    let mut devices = DeviceTracker::default();
    devices.sync(&mut datapath, &args);
    let mut device_tick = tokio::time::interval(Duration::from_secs(1));
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut stale_slots = Some(stale_slots);

    loop {
        tokio::select! {
            changed = states.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the manifest source stopped");
                }
                let state = states.borrow_and_update().clone();
                program(&state, &node, &mut programmer, &mut tables);
                // Only after the first full program: slots an interrupted
                // update of a previous agent left behind.
                if let Some(stale) = stale_slots.take() {
                    for e in programmer.delete_slots(&stale, &mut tables) {
                        warn!("cleaning up after the previous agent: {e}");
                    }
                }
            }
            _ = device_tick.tick() => devices.sync(&mut datapath, &args),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    watcher.abort();
    info!("stopping; maps stay pinned under {}", args.bpffs.display());
    Ok(())
}

fn program(
    state: &ClusterState,
    node: &NodeIdentity,
    programmer: &mut Programmer,
    tables: &mut KernelTables,
) {
    let started = std::time::Instant::now();
    let (desired, errors) = model::desired_tables(state, node);
    for e in &errors {
        warn!("{e}");
    }
    let report = programmer.apply(&desired, tables);
    for e in &report.errors {
        error!("{e}");
    }
    if report.unsupported > 0 {
        warn!(
            "{} IPv6 frontends not programmed: this datapath serves IPv4 only",
            report.unsupported
        );
    }
    info!(
        "programmed {} frontends, {} backends ({} map writes, {} ms)",
        report.frontends,
        report.backends,
        report.writes,
        started.elapsed().as_millis()
    );
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
            match datapath.attach(name, *index) {
                Ok(true) => info!("attached to {name} (ifindex {index})"),
                Ok(false) => {}
                Err(e) => {
                    warn!("{e:#}");
                    self.failed.insert((name.clone(), *index));
                }
            }
        }
    }
}
