//! Prometheus metrics (`--metrics-bind-address`, default 127.0.0.1:10249,
//! path `/metrics`), in the OpenMetrics text format.
//!
//! Owns the agent's metric registry and its small HTTP server. Two kinds of
//! metric live here:
//! - instruments the agent updates as it works: the programming latency
//!   histogram (event arrival to map write done, kube-proxy's
//!   `network_programming_duration_seconds`), the frontends and backends
//!   programmed, and the source's errors, relists and skipped objects;
//! - values read from the kernel at scrape time ([`DatapathCollector`]): the
//!   per-CPU verdict and drop counters of `LB_STATS_V1`, and the fill level
//!   of every map (entries counted by iterating keys, at most once per
//!   [`FILL_REFRESH`], against the map's real capacity).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use aya::maps::MapInfo;
use lb_common::{
    backend, backend_stats::LbBackendStats, conntrack, member::Lb4MemberKey, service, slot,
    stats::Reason,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
    },
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::datapath::{
    BackendEntry, KernelTables, StatsReader,
    ct_sweep::{self, BackendFlows, SweepReport},
};
use crate::http::{self, Handler, Response};

/// How long counted map entries are reused before the maps are walked again.
pub const FILL_REFRESH: Duration = Duration::from_secs(2);

/// Label set of the source metrics: the Kubernetes kind they are about.
type KindLabel = Vec<(&'static str, String)>;
/// Label set of the map metrics: the pinned map's name.
type MapLabel = Vec<(&'static str, String)>;

/// The agent's metrics. Cheap to share (`Arc`); every instrument is
/// internally synchronised.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    programming_duration: Histogram,
    /// From each EndpointSlice change's trigger time (kube-proxy's figure).
    programming_from_change: Histogram,
    programmed_frontends: Gauge,
    programmed_backends: Gauge,
    program_errors: Counter,
    source_errors: Family<KindLabel, Counter>,
    source_relists: Family<KindLabel, Counter>,
    source_bad_objects: Family<KindLabel, Counter>,
    /// Inserts refused by a full map, by map name.
    map_full: Family<MapLabel, Counter>,
    /// Live conntrack entries by family and state, from the last full
    /// pass of the collector.
    conntrack_entries: Family<MapLabel, Gauge>,
    /// Conntrack entries the collector removed, by family.
    conntrack_collected: Family<MapLabel, Counter>,
    /// SNAT ports held by live flows, by translated source address, from
    /// the last full pass; and the most seen since the agent started.
    snat_ports: Family<MapLabel, Gauge>,
    snat_ports_max: Family<MapLabel, Gauge>,
    /// Every SNAT address seen in use, so one no longer in use reads 0.
    snat_addresses: Mutex<std::collections::BTreeSet<std::net::IpAddr>>,
    /// When the oldest change not yet programmed arrived.
    pending_since: Mutex<Option<Instant>>,
    /// The collector's per-backend census, read at scrape time.
    backend_flows: BackendCensus,
}

/// Live flows per (service id, backend id) of each family, from the
/// collector's last full pass of that family's table.
pub type BackendCensus = Arc<Mutex<BTreeMap<&'static str, BTreeMap<(u32, u32), BackendFlows>>>>;

impl Metrics {
    /// The registry with the agent's instruments and, when `datapath` is
    /// given, the scrape-time kernel readings.
    pub fn new(datapath: Option<DatapathCollector>) -> Self {
        let backend_flows = BackendCensus::default();
        let mut registry = Registry::with_prefix("lb");
        // 1 ms .. ~16 s: programming is milliseconds; the tail shows a
        // source that lags (a relist, a slow API server).
        let programming_duration = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
        );
        registry.register_with_unit(
            "network_programming_duration",
            "Time from a cluster change arriving at the agent to its map writes being done",
            prometheus_client::registry::Unit::Seconds,
            programming_duration.clone(),
        );
        // The same buckets: the controller's batching and the API server
        // add seconds before the change even arrives.
        let programming_from_change = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
        );
        registry.register_with_unit(
            "network_programming_from_change_duration",
            "Time from an EndpointSlice change's trigger (its \
             endpoints.kubernetes.io/last-change-trigger-time annotation) to its map writes \
             being done, as kube-proxy's network_programming_duration_seconds measures it",
            prometheus_client::registry::Unit::Seconds,
            programming_from_change.clone(),
        );
        let programmed_frontends = Gauge::default();
        registry.register(
            "programmed_frontends",
            "Frontends (service address, port, protocol) in the service map",
            programmed_frontends.clone(),
        );
        let programmed_backends = Gauge::default();
        registry.register(
            "programmed_backends",
            "Backends in the backend map",
            programmed_backends.clone(),
        );
        let program_errors = Counter::default();
        registry.register(
            "program_errors",
            "Map writes that failed (the service kept its previous programming)",
            program_errors.clone(),
        );
        let source_errors = Family::<KindLabel, Counter>::default();
        registry.register(
            "source_errors",
            "List/watch failures of the cluster-state source, by kind; the source retries",
            source_errors.clone(),
        );
        let source_relists = Family::<KindLabel, Counter>::default();
        registry.register(
            "source_relists",
            "Full relists after the initial list (410 Gone, lost watch), by kind",
            source_relists.clone(),
        );
        let source_bad_objects = Family::<KindLabel, Counter>::default();
        registry.register(
            "source_bad_objects",
            "Objects skipped because they do not match their schema, by kind",
            source_bad_objects.clone(),
        );
        let map_full = Family::<MapLabel, Counter>::default();
        registry.register(
            "map_full",
            "Map inserts refused because the map was full, by map; the service named in the log \
             keeps its previous programming and is retried",
            map_full.clone(),
        );
        let conntrack_entries = Family::<MapLabel, Gauge>::default();
        registry.register(
            "conntrack_entries",
            "Live conntrack entries (both directions of each flow), by family and state, \
             at the collector's last full pass",
            conntrack_entries.clone(),
        );
        let conntrack_collected = Family::<MapLabel, Counter>::default();
        registry.register(
            "conntrack_collected",
            "Conntrack entries removed after their state's timeout, by family",
            conntrack_collected.clone(),
        );
        let snat_ports = Family::<MapLabel, Gauge>::default();
        registry.register(
            "snat_ports_in_use",
            "SNAT ports held by live flows, by translated source address, at the collector's \
             last full pass (a port is per backend: 4523 per backend and address)",
            snat_ports.clone(),
        );
        let snat_ports_max = Family::<MapLabel, Gauge>::default();
        registry.register(
            "snat_ports_in_use_max",
            "The most SNAT ports seen in use since the agent started, by address",
            snat_ports_max.clone(),
        );
        if let Some(mut collector) = datapath {
            collector.backend_flows = backend_flows.clone();
            registry.register_collector(Box::new(collector));
        }
        Metrics {
            registry,
            programming_duration,
            programming_from_change,
            programmed_frontends,
            programmed_backends,
            program_errors,
            source_errors,
            source_relists,
            source_bad_objects,
            map_full,
            conntrack_entries,
            conntrack_collected,
            snat_ports,
            snat_ports_max,
            snat_addresses: Mutex::default(),
            pending_since: Mutex::new(None),
            backend_flows,
        }
    }

    /// A source calls this when a change arrives; only the first change
    /// since the last program is remembered, so the latency measured is the
    /// one of the oldest change a program covers.
    pub fn change_arrived(&self) {
        lock(&self.pending_since).get_or_insert_with(Instant::now);
    }

    /// Takes the arrival time of the oldest unprogrammed change. Call it
    /// before reading the snapshot: a change arriving in between is then
    /// programmed early and measured late, never the other way round.
    pub fn take_pending(&self) -> Option<Instant> {
        lock(&self.pending_since).take()
    }

    /// Records one program: latency from `arrived`, and what is programmed.
    pub fn programmed(&self, arrived: Instant, frontends: usize, backends: usize, errors: usize) {
        self.programming_duration
            .observe(arrived.elapsed().as_secs_f64());
        self.programmed_frontends
            .set(i64::try_from(frontends).unwrap_or(i64::MAX));
        self.programmed_backends
            .set(i64::try_from(backends).unwrap_or(i64::MAX));
        self.program_errors.inc_by(errors as u64);
    }

    /// Records the programming of EndpointSlice changes triggered at
    /// `triggers` (see [`crate::source::new_trigger_times`]), done now. A
    /// trigger time ahead of this node's clock counts as zero.
    pub fn changes_programmed(&self, triggers: &[std::time::SystemTime]) {
        let now = std::time::SystemTime::now();
        for at in triggers {
            let took = now.duration_since(*at).unwrap_or_default();
            self.programming_from_change.observe(took.as_secs_f64());
        }
    }

    pub fn source_error(&self, kind: &str) {
        self.source_errors.get_or_create(&kind_label(kind)).inc();
    }

    pub fn source_relist(&self, kind: &str) {
        self.source_relists.get_or_create(&kind_label(kind)).inc();
    }

    pub fn source_bad_object(&self, kind: &str) {
        self.source_bad_objects
            .get_or_create(&kind_label(kind))
            .inc();
    }

    /// `count` inserts into `map` were refused: the map is full.
    pub fn map_full(&self, map: &str, count: u64) {
        self.map_full
            .get_or_create(&vec![("map", map.to_owned())])
            .inc_by(count);
    }

    /// Records what a conntrack collection tick did and, for each family
    /// whose pass completed, what the tables hold.
    pub fn conntrack_swept(&self, report: &SweepReport) {
        for (family, collected) in &report.collected {
            self.conntrack_collected
                .get_or_create(&vec![("family", (*family).to_owned())])
                .inc_by(*collected);
        }
        for (family, state, count) in ct_sweep::census_rows(report) {
            self.conntrack_entries
                .get_or_create(&vec![
                    ("family", family.to_owned()),
                    ("state", state.to_owned()),
                ])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        for (family, census) in &report.completed {
            lock(&self.backend_flows).insert(family, census.by_backend.clone());
        }
        let mut known = lock(&self.snat_addresses);
        for (family, census) in &report.completed {
            // Addresses of this family no longer in use.
            for addr in known.iter() {
                let ipv6 = addr.is_ipv6();
                if (*family == "ipv6") == ipv6 && !census.snat_ports.contains_key(addr) {
                    self.snat_ports
                        .get_or_create(&vec![("address", addr.to_string())])
                        .set(0);
                }
            }
            known.extend(census.snat_ports.keys().copied());
            for (addr, ports) in &census.snat_ports {
                let label = vec![("address", addr.to_string())];
                let ports = i64::try_from(*ports).unwrap_or(i64::MAX);
                self.snat_ports.get_or_create(&label).set(ports);
                let max = self.snat_ports_max.get_or_create(&label);
                if ports > max.get() {
                    max.set(ports);
                }
            }
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

fn kind_label(kind: &str) -> KindLabel {
    vec![("kind", kind.to_owned())]
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One map's fill level.
#[derive(Clone, Debug)]
struct MapFill {
    name: &'static str,
    entries: u64,
    capacity: u64,
}

/// Reads the pinned maps under `bpffs` at scrape time.
#[derive(Debug)]
pub struct DatapathCollector {
    bpffs: PathBuf,
    fill: Mutex<Option<(Instant, Vec<MapFill>)>>,
    /// At most this many `lb_backend_*` series per metric.
    backend_series: usize,
    /// Shared with [`Metrics`], which fills it from the collector.
    backend_flows: BackendCensus,
}

/// Default of `--backend-metrics-limit`.
pub const DEFAULT_BACKEND_SERIES: usize = 1000;

impl DatapathCollector {
    pub fn new(bpffs: impl Into<PathBuf>) -> Self {
        DatapathCollector {
            bpffs: bpffs.into(),
            fill: Mutex::new(None),
            backend_series: DEFAULT_BACKEND_SERIES,
            backend_flows: BackendCensus::default(),
        }
    }

    /// Bounds the `lb_backend_*` series per metric (`--backend-metrics-limit`;
    /// 0 turns them off).
    pub fn with_backend_series(mut self, limit: usize) -> Self {
        self.backend_series = limit;
        self
    }

    /// The per-backend rows, busiest first, at most `backend_series`, and
    /// how many were left out.
    fn backend_rows(&self) -> anyhow::Result<(Vec<BackendRow>, usize)> {
        if self.backend_series == 0 {
            return Ok((Vec::new(), 0));
        }
        let tables = KernelTables::open(&self.bpffs)?;
        let counters = tables.dump_backend_stats()?;
        let names = tables.dump_service_names()?;
        let addresses: BTreeMap<u32, (IpAddr, u16)> = tables
            .dump_all_backends()?
            .into_iter()
            .map(|(id, b)| match b {
                BackendEntry::V4(b) => (id, (IpAddr::from(b.addr), b.port)),
                BackendEntry::V6(b) => (id, (IpAddr::from(b.addr), b.port)),
            })
            .collect();
        let census = lock(&self.backend_flows).clone();
        let flows = census.values().flat_map(|family| family.iter());
        Ok(backend_rows(
            &counters,
            flows,
            |service_id| {
                names.get(&service_id).map(|n| {
                    [
                        String::from_utf8_lossy(n.namespace_bytes()).into_owned(),
                        String::from_utf8_lossy(n.name_bytes()).into_owned(),
                        String::from_utf8_lossy(n.port_name_bytes()).into_owned(),
                    ]
                })
            },
            |backend_id| {
                addresses
                    .get(&backend_id)
                    .map(|(addr, port)| SocketAddr::new(*addr, *port).to_string())
            },
            self.backend_series,
        ))
    }

    /// Entries and capacity of every table map, walked at most once per
    /// [`FILL_REFRESH`].
    fn map_fill(&self) -> Vec<MapFill> {
        let mut cached = lock(&self.fill);
        if let Some((at, fill)) = cached.as_ref()
            && at.elapsed() < FILL_REFRESH
        {
            return fill.clone();
        }
        let fill = match self.count_entries() {
            Ok(fill) => fill,
            Err(error) => {
                log::warn!("metrics: reading map fill levels: {error:#}");
                Vec::new()
            }
        };
        *cached = Some((Instant::now(), fill.clone()));
        fill
    }

    fn count_entries(&self) -> anyhow::Result<Vec<MapFill>> {
        let tables = KernelTables::open(&self.bpffs)?;
        let counts = [
            (service::NAME, tables.services.keys().count()),
            (slot::NAME, tables.slots.keys().count()),
            (backend::NAME, tables.backends.keys().count()),
            (conntrack::NAME, tables.conntrack.keys().count()),
        ];
        counts
            .into_iter()
            .map(|(name, entries)| {
                let info = MapInfo::from_pin(self.bpffs.join(name))?;
                Ok(MapFill {
                    name,
                    entries: entries as u64,
                    capacity: u64::from(info.max_entries()),
                })
            })
            .collect()
    }
}

impl DatapathCollector {
    /// The `lb_backend_*` families.
    fn encode_backends(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (rows, omitted) = match self.backend_rows() {
            Ok(rows) => rows,
            Err(error) => {
                log::warn!("metrics: reading per-backend counters: {error:#}");
                return Ok(());
            }
        };
        let counter = ConstCounter::new(0u64);
        let gauge = ConstGauge::new(0i64);
        let families: [BackendFamily; 5] = [
            (
                "backend_new_flows",
                "Flows balanced to the backend by the service port",
                true,
                |r| r.new_flows,
            ),
            (
                "backend_answered_attempts",
                "Connection attempts the backend answered (first reply not a RST)",
                true,
                |r| r.answered,
            ),
            (
                "backend_failed_attempts",
                "Connection attempts that failed: a RST as the first reply, or an ICMP \
                 destination unreachable before any reply",
                true,
                |r| r.failed,
            ),
            (
                "backend_active_flows",
                "Flows to the backend not closed, at the conntrack collector's last full pass",
                false,
                |r| r.active_flows,
            ),
            (
                "backend_conntrack_bytes",
                "Bytes both ways of the backend's flows still in conntrack, at the collector's \
                 last full pass",
                false,
                |r| r.bytes,
            ),
        ];
        for (name, help, is_counter, value) in families {
            let kind = if is_counter {
                counter.metric_type()
            } else {
                gauge.metric_type()
            };
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for row in &rows {
                let labels = [
                    ("namespace", row.labels[0].as_str()),
                    ("service", row.labels[1].as_str()),
                    ("port", row.labels[2].as_str()),
                    ("backend", row.labels[3].as_str()),
                ];
                let encoder = family.encode_family(&labels)?;
                if is_counter {
                    ConstCounter::new(value(row)).encode(encoder)?;
                } else {
                    ConstGauge::new(i64::try_from(value(row)).unwrap_or(i64::MAX))
                        .encode(encoder)?;
                }
            }
        }
        let family = encoder.encode_descriptor(
            "backend_series_omitted",
            "Backends left out of the lb_backend_* metrics by --backend-metrics-limit \
             (the least busy)",
            None,
            gauge.metric_type(),
        )?;
        ConstGauge::new(i64::try_from(omitted).unwrap_or(i64::MAX)).encode(family)?;
        Ok(())
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        match StatsReader::open(&self.bpffs).and_then(|stats| stats.all()) {
            Ok(counters) => {
                let packets = ConstCounter::new(0u64);
                let mut family = encoder.encode_descriptor(
                    "datapath_packets",
                    "Packets the kernel program handled, by verdict and reason",
                    None,
                    packets.metric_type(),
                )?;
                for (reason, counter) in &counters {
                    let labels = verdict_labels(*reason);
                    ConstCounter::new(counter.packets).encode(family.encode_family(&labels)?)?;
                }
                let mut family = encoder.encode_descriptor(
                    "datapath_bytes",
                    "Bytes the kernel program handled, by verdict and reason",
                    None,
                    packets.metric_type(),
                )?;
                for (reason, counter) in &counters {
                    let labels = verdict_labels(*reason);
                    ConstCounter::new(counter.bytes).encode(family.encode_family(&labels)?)?;
                }
            }
            Err(error) => log::warn!("metrics: reading {}: {error:#}", lb_common::stats::NAME),
        }
        self.encode_backends(&mut encoder)?;
        let fill = self.map_fill();
        let gauge = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            "map_entries",
            "Entries in each pinned map (counted at most every 2 s)",
            None,
            gauge.metric_type(),
        )?;
        for map in &fill {
            let labels = [("map", map.name)];
            ConstGauge::new(i64::try_from(map.entries).unwrap_or(i64::MAX))
                .encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "map_capacity",
            "Capacity (max_entries) of each pinned map",
            None,
            gauge.metric_type(),
        )?;
        for map in &fill {
            let labels = [("map", map.name)];
            ConstGauge::new(i64::try_from(map.capacity).unwrap_or(i64::MAX))
                .encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// An `lb_backend_*` family: name, help, counter (or gauge), its value.
type BackendFamily = (&'static str, &'static str, bool, fn(&BackendRow) -> u64);

/// One `lb_backend_*` series' labels and values: a backend of a service
/// port, summed over the frontends (ClusterIP, NodePort, ...) of that port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendRow {
    /// namespace, service, port (the service port's name), backend.
    pub labels: [String; 4],
    pub new_flows: u64,
    pub answered: u64,
    pub failed: u64,
    pub active_flows: u64,
    pub bytes: u64,
}

/// Builds the per-backend rows from the datapath's counters and the
/// conntrack census, labelled through `service` (id -> namespace, name,
/// port name) and `backend` (id -> address); rows whose service or backend
/// is gone are skipped. Keeps the `limit` busiest (new flows, then active
/// flows) and returns how many were left out.
pub fn backend_rows<'a>(
    counters: &BTreeMap<Lb4MemberKey, LbBackendStats>,
    flows: impl Iterator<Item = (&'a (u32, u32), &'a BackendFlows)>,
    service: impl Fn(u32) -> Option<[String; 3]>,
    backend: impl Fn(u32) -> Option<String>,
    limit: usize,
) -> (Vec<BackendRow>, usize) {
    let mut rows: BTreeMap<[String; 4], BackendRow> = BTreeMap::new();
    let labels = |service_id: u32, backend_id: u32| {
        let [namespace, name, port] = service(service_id)?;
        Some([namespace, name, port, backend(backend_id)?])
    };
    for (key, stats) in counters {
        if let Some(labels) = labels(key.service_id, key.backend_id) {
            let row = rows.entry(labels.clone()).or_insert_with(|| BackendRow {
                labels,
                ..BackendRow::default()
            });
            row.new_flows += stats.new_flows;
            row.answered += stats.answered;
            row.failed += stats.failed;
        }
    }
    for ((service_id, backend_id), live) in flows {
        if let Some(labels) = labels(*service_id, *backend_id) {
            let row = rows.entry(labels.clone()).or_insert_with(|| BackendRow {
                labels,
                ..BackendRow::default()
            });
            row.active_flows += live.active;
            row.bytes += live.bytes;
        }
    }
    let mut rows: Vec<BackendRow> = rows.into_values().collect();
    rows.sort_by(|a, b| {
        (b.new_flows, b.active_flows)
            .cmp(&(a.new_flows, a.active_flows))
            .then_with(|| a.labels.cmp(&b.labels))
    });
    let omitted = rows.len().saturating_sub(limit);
    rows.truncate(limit);
    (rows, omitted)
}

fn verdict_labels(reason: Reason) -> [(&'static str, &'static str); 2] {
    let verdict = if reason as u32 >= Reason::FIRST_DROP {
        "drop"
    } else {
        "pass"
    };
    [("verdict", verdict), ("reason", reason.name())]
}

/// Binds the metrics listener; fails (at start, before anything is
/// programmed) when the address is taken or invalid.
pub async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context as _;
    TcpListener::bind(address)
        .await
        .with_context(|| format!("--metrics-bind-address {address}: cannot listen"))
}

/// Content type of the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let handler: Handler = Arc::new(move |method, path| match (method, path) {
        ("GET", "/metrics") => match metrics.encode() {
            Ok(body) => Response {
                status: 200,
                content_type: OPENMETRICS,
                body,
            },
            Err(_) => Response {
                status: 500,
                content_type: "text/plain",
                body: "encoding failed\n".to_owned(),
            },
        },
        _ => Response {
            status: 404,
            content_type: "text/plain",
            body: "GET /metrics\n".to_owned(),
        },
    });
    http::serve(listener, handler).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_measured_from_the_oldest_pending_change() {
        let metrics = Metrics::new(None);
        assert_eq!(metrics.take_pending(), None);
        metrics.change_arrived();
        let first = metrics.take_pending().expect("pending");
        assert_eq!(metrics.take_pending(), None, "taken once");
        metrics.change_arrived();
        std::thread::sleep(Duration::from_millis(5));
        metrics.change_arrived();
        let oldest = metrics.take_pending().expect("pending");
        assert!(oldest > first);
        assert!(
            oldest.elapsed() >= Duration::from_millis(5),
            "kept the older stamp"
        );
        metrics.programmed(oldest, 3, 7, 1);
        metrics.source_relist("Service");
        let text = metrics.encode().expect("encode");
        for line in [
            "lb_network_programming_duration_seconds_count 1",
            "lb_programmed_frontends 3",
            "lb_programmed_backends 7",
            "lb_program_errors_total 1",
            "lb_source_relists_total{kind=\"Service\"} 1",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
    }

    #[test]
    fn full_maps_are_counted_by_name() {
        let metrics = Metrics::new(None);
        metrics.map_full("LB4_SLOTS_V1", 2);
        metrics.map_full("LB4_SLOTS_V1", 1);
        let text = metrics.encode().expect("encode");
        assert!(
            text.contains("lb_map_full_total{map=\"LB4_SLOTS_V1\"} 3"),
            "{text}"
        );
    }

    #[test]
    fn conntrack_sweeps_show_states_collections_and_snat_ports() {
        use crate::datapath::ct_sweep::TableCensus;
        let metrics = Metrics::new(None);
        let node: std::net::IpAddr = "198.51.100.11".parse().expect("address");
        let pass = |ports: Option<u64>, collected: u64| {
            let mut census = TableCensus::default();
            census.by_state.insert("established", 4);
            if let Some(ports) = ports {
                census.snat_ports.insert(node, ports);
            }
            SweepReport {
                collected: [("ipv4", collected)].into_iter().collect(),
                completed: [("ipv4", census)].into_iter().collect(),
            }
        };
        metrics.conntrack_swept(&pass(Some(7), 3));
        metrics.conntrack_swept(&pass(Some(5), 2));
        let text = metrics.encode().expect("encode");
        for line in [
            "lb_conntrack_entries{family=\"ipv4\",state=\"established\"} 4",
            "lb_conntrack_entries{family=\"ipv4\",state=\"time_wait\"} 0",
            "lb_conntrack_collected_total{family=\"ipv4\"} 5",
            "lb_snat_ports_in_use{address=\"198.51.100.11\"} 5",
            "lb_snat_ports_in_use_max{address=\"198.51.100.11\"} 7",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        // An address no longer in use reads 0, its high-water mark stays.
        metrics.conntrack_swept(&pass(None, 0));
        let text = metrics.encode().expect("encode");
        assert!(
            text.contains("lb_snat_ports_in_use{address=\"198.51.100.11\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("lb_snat_ports_in_use_max{address=\"198.51.100.11\"} 7"),
            "{text}"
        );
    }

    #[test]
    fn backend_rows_merge_frontends_and_keep_the_busiest() {
        let stats = |new_flows, failed| LbBackendStats {
            new_flows,
            answered: new_flows - failed,
            failed,
            last_failed_ns: 0,
        };
        let key = |service_id, backend_id| Lb4MemberKey {
            service_id,
            backend_id,
        };
        // Services 1 and 2 are the ClusterIP and NodePort frontends of
        // default/web:http; 3 is another service.
        let counters = BTreeMap::from([
            (key(1, 10), stats(5, 1)),
            (key(2, 10), stats(2, 2)),
            (key(1, 11), stats(1, 0)),
            (key(3, 12), stats(9, 0)),
            // A service the name map no longer knows: skipped.
            (key(4, 10), stats(100, 0)),
        ]);
        let flows = BTreeMap::from([(
            (2, 10),
            BackendFlows {
                active: 3,
                bytes: 700,
            },
        )]);
        let service = |id: u32| match id {
            1 | 2 => Some(["default".into(), "web".into(), "http".into()]),
            3 => Some(["default".into(), "db".into(), "".into()]),
            _ => None,
        };
        let backend = |id: u32| Some(format!("10.244.1.{id}:8080"));
        let (rows, omitted) = backend_rows(&counters, flows.iter(), service, backend, 2);
        assert_eq!(omitted, 1, "three backends, two kept");
        assert_eq!(rows[0].labels[1], "db", "busiest first");
        assert_eq!(
            rows[1],
            BackendRow {
                labels: [
                    "default".into(),
                    "web".into(),
                    "http".into(),
                    "10.244.1.10:8080".into()
                ],
                new_flows: 7,
                answered: 4,
                failed: 3,
                active_flows: 3,
                bytes: 700,
            },
            "both frontends of the port in one series"
        );
        let (rows, omitted) = backend_rows(&counters, flows.iter(), service, backend, 0);
        assert_eq!((rows.len(), omitted), (0, 3), "--backend-metrics-limit 0");
    }

    #[test]
    fn verdicts_follow_the_drop_threshold() {
        assert_eq!(verdict_labels(Reason::NewFlow)[0].1, "pass");
        assert_eq!(verdict_labels(Reason::DropNoBackend)[0].1, "drop");
        assert_eq!(
            verdict_labels(Reason::DropNoBackend)[1].1,
            "drop_no_backend"
        );
    }
}
