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
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use aya::maps::MapInfo;
use lb_common::{backend, conntrack, service, slot, stats::Reason};
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
    KernelTables, StatsReader,
    ct_sweep::{self, SweepReport},
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
}

impl Metrics {
    /// The registry with the agent's instruments and, when `datapath` is
    /// given, the scrape-time kernel readings.
    pub fn new(datapath: Option<DatapathCollector>) -> Self {
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
        if let Some(collector) = datapath {
            registry.register_collector(Box::new(collector));
        }
        Metrics {
            registry,
            programming_duration,
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
}

impl DatapathCollector {
    pub fn new(bpffs: impl Into<PathBuf>) -> Self {
        DatapathCollector {
            bpffs: bpffs.into(),
            fill: Mutex::new(None),
        }
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
    fn verdicts_follow_the_drop_threshold() {
        assert_eq!(verdict_labels(Reason::NewFlow)[0].1, "pass");
        assert_eq!(verdict_labels(Reason::DropNoBackend)[0].1, "drop");
        assert_eq!(
            verdict_labels(Reason::DropNoBackend)[1].1,
            "drop_no_backend"
        );
    }
}
