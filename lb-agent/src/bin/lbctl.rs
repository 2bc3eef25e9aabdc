//! `lbctl`: reads the pinned maps directly, so it works while the agent is down.
//!
//! Every command builds JSON rows first; `-o table` renders those same rows,
//! so both formats always carry the same facts.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use aya::maps::{Map, MapData, RingBuf};
use clap::{Parser, Subcommand, ValueEnum};
use lb_agent::datapath::{BackendEntry, KernelTables, ServiceKey, ct_sweep::BackendFlows};
use lb_agent::model::SourceRange;
use lb_common::{
    PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    backend::{FLAG_LOCAL, FLAG_TERMINATING},
    config::FLAG_TRACE,
    conntrack::{CtEntry, CtState, DIR_FORWARD, REWRITE_SRC, is_expired, timeout_ns},
    service::{
        FLAG_ADDRESS, FLAG_LOCAL_ONLY, FLAG_MAGLEV, KIND_CLUSTER_IP, KIND_EXTERNAL_IP,
        KIND_LOAD_BALANCER, KIND_NODE_PORT, Lb4Service, SCOPE_INTERNAL,
    },
    service_name::LbServiceName,
    slot::Lb4SlotKey,
    stats::{Counter, Reason},
    trace::{
        self, EVENT_DROP, EVENT_NEW_FLOW, FAMILY_IPV6, HOOK_HOST, HOOK_NETWORK, HOOK_POD,
        SELECT_AFFINITY, SELECT_LOCAL, SELECT_MAGLEV, SELECT_RANDOM, TraceEvent,
    },
};
use serde_json::{Value, json};

/// Inspect the load balancer's pinned BPF maps.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The agent's pin directory (its --bpffs).
    #[arg(long, default_value = "/sys/fs/bpf/lb", global = true)]
    bpffs: PathBuf,
    /// Output format (`trace -o json` prints one JSON object per line).
    #[arg(short, long, value_enum, default_value_t = Format::Table, global = true)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One row per frontend, with the Service it came from and its backends.
    Services,
    /// Every backend, with the services that use it.
    Backends,
    /// Tracked flows (one row per flow, forward direction).
    Conntrack {
        /// Only flows of this Service (NAMESPACE/NAME).
        #[arg(long, value_name = "NS/NAME")]
        service: Option<String>,
        /// At most this many rows.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Session-affinity entries (sessionAffinity ClientIP).
    Affinity,
    /// Packets and bytes per verdict and drop reason, and per service.
    Stats,
    /// Streams which backend each new flow gets and why, and every drop.
    /// Turns tracing on in the datapath while it runs (one trace at a time).
    Trace {
        /// Only events of this Service (NAMESPACE/NAME).
        #[arg(long, value_name = "NS/NAME")]
        service: Option<String>,
        /// Only events from clients in this CIDR (or address).
        #[arg(long, value_name = "CIDR")]
        client: Option<String>,
        /// Stop after this many (matching) events.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long, value_name = "N")]
        seconds: Option<u64>,
    },
}

fn proto_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        PROTO_SCTP => "SCTP".into(),
        other => other.to_string(),
    }
}

fn kind_name(kind: u32) -> &'static str {
    match kind {
        KIND_CLUSTER_IP => "ClusterIP",
        KIND_NODE_PORT => "NodePort",
        KIND_LOAD_BALANCER => "LoadBalancer",
        KIND_EXTERNAL_IP => "ExternalIP",
        _ => "unknown",
    }
}

/// `10.96.0.10:80`, `[fd00::10]:80`.
fn endpoint(addr: impl Into<IpAddr>, port: u16) -> String {
    SocketAddr::new(addr.into(), port).to_string()
}

/// A frontend key of either family's service map.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct FrontendRow {
    addr: IpAddr,
    port: u16,
    proto: u8,
    scope: u8,
}

/// A backend of either family's backend map.
#[derive(Clone, Copy)]
struct BackendRow {
    addr: IpAddr,
    port: u16,
    proto: u8,
    flags: u8,
}

// The IPv4 and IPv6 map types share their field names: one conversion
// each serves both.
macro_rules! frontend_row {
    ($k:expr) => {
        FrontendRow {
            addr: IpAddr::from($k.addr),
            port: $k.port,
            proto: $k.proto,
            scope: $k.scope,
        }
    };
}
macro_rules! backend_row {
    ($b:expr) => {
        BackendRow {
            addr: IpAddr::from($b.addr),
            port: $b.port,
            proto: $b.proto,
            flags: $b.flags,
        }
    };
}

/// Every frontend entry of both families, IPv4 first, each sorted.
fn all_services(tables: &KernelTables) -> anyhow::Result<Vec<(FrontendRow, Lb4Service)>> {
    let mut rows: Vec<(FrontendRow, Lb4Service)> = tables
        .dump_all_services()?
        .into_iter()
        .map(|(key, svc)| match key {
            ServiceKey::V4(k) => (frontend_row!(k), svc),
            ServiceKey::V6(k) => (frontend_row!(k), svc),
        })
        .collect();
    rows.sort_by_key(|(k, _)| *k);
    Ok(rows)
}

/// Every backend of both families by id (ids are one space).
fn all_backends(tables: &KernelTables) -> anyhow::Result<BTreeMap<u32, BackendRow>> {
    Ok(tables
        .dump_all_backends()?
        .into_iter()
        .map(|(id, b)| match b {
            BackendEntry::V4(b) => (id, backend_row!(b)),
            BackendEntry::V6(b) => (id, backend_row!(b)),
        })
        .collect())
}

/// `namespace/name` and the port name of a service id, from the name map.
struct Names(BTreeMap<u32, LbServiceName>);

impl Names {
    fn service(&self, id: u32) -> Option<String> {
        self.0.get(&id).map(|n| {
            format!(
                "{}/{}",
                String::from_utf8_lossy(n.namespace_bytes()),
                String::from_utf8_lossy(n.name_bytes())
            )
        })
    }

    fn port_name(&self, id: u32) -> Option<String> {
        self.0
            .get(&id)
            .map(|n| String::from_utf8_lossy(n.port_name_bytes()).into_owned())
    }

    /// The service ids programmed from `namespace/name`.
    fn ids_of(&self, service: &str) -> Vec<u32> {
        self.0
            .keys()
            .copied()
            .filter(|id| self.service(*id).as_deref() == Some(service))
            .collect()
    }
}

fn backend_json(id: u32, b: &BackendRow) -> Value {
    let state = if b.flags & FLAG_TERMINATING != 0 {
        "terminating"
    } else {
        "active"
    };
    json!({
        "id": id,
        "address": endpoint(b.addr, b.port),
        "protocol": proto_name(b.proto),
        "state": state,
        "local": b.flags & FLAG_LOCAL != 0,
    })
}

fn services(tables: &KernelTables, names: &Names) -> anyhow::Result<Vec<Value>> {
    let table_size = tables.config()?.maglev_table_size;
    let slots = tables.dump_slots()?;
    let backends = all_backends(tables)?;
    let mut ranges: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for range in tables.dump_source_ranges()? {
        ranges
            .entry(range.service_id)
            .or_default()
            .push(format!("{}/{}", range.addr, range.prefix_len));
    }
    let services = all_services(tables)?;
    Ok(services
        .iter()
        // Address markers (port 0) say "this is a ClusterIP"; not frontends.
        .filter(|(_, svc)| svc.flags & FLAG_ADDRESS == 0)
        .map(|(key, svc)| {
            // Slots per backend of the Maglev table the programs read.
            let maglev = (svc.flags & FLAG_MAGLEV != 0 && table_size != 0)
                .then(|| tables.maglev_table(svc.service_id, table_size))
                .flatten();
            let mut shares: BTreeMap<u32, u64> = BTreeMap::new();
            for id in maglev.iter().flatten() {
                *shares.entry(*id).or_default() += 1;
            }
            let members: Vec<Value> = (0..svc.backend_count)
                .map(|slot| {
                    let slot_key = Lb4SlotKey {
                        service_id: svc.service_id,
                        revision: svc.revision,
                        slot,
                    };
                    match slots
                        .get(&slot_key)
                        .and_then(|s| backends.get(&s.backend_id).map(|b| (s.backend_id, b)))
                    {
                        Some((id, b)) => {
                            let mut row = backend_json(id, b);
                            if maglev.is_some() {
                                let share = shares.get(&id).copied().unwrap_or(0);
                                row["maglev_slots"] = json!(share);
                                row["maglev_share"] =
                                    json!(share as f64 / f64::from(table_size.max(1)));
                            }
                            row
                        }
                        None => json!({ "slot": slot, "state": "missing" }),
                    }
                })
                .collect();
            json!({
                "frontend": format!("{}/{}", endpoint(key.addr, key.port), proto_name(key.proto)),
                "address": key.addr.to_string(),
                "port": key.port,
                "protocol": proto_name(key.proto),
                "type": kind_name(svc.kind),
                "scope": if key.scope == SCOPE_INTERNAL { "internal" } else { "external" },
                "policy": if svc.flags & FLAG_LOCAL_ONLY != 0 { "Local" } else { "Cluster" },
                "service": names.service(svc.service_id),
                "port_name": names.port_name(svc.service_id),
                "service_id": svc.service_id,
                "revision": svc.revision,
                "affinity_timeout": svc.affinity_timeout,
                "algorithm": if maglev.is_some() { "maglev" } else { "random" },
                "maglev_table_size": maglev.as_ref().map(|t| t.len()),
                "source_ranges": ranges.get(&svc.service_id).cloned().unwrap_or_default(),
                "backends": members,
            })
        })
        .collect())
}

fn backends(tables: &KernelTables, names: &Names) -> anyhow::Result<Vec<Value>> {
    let mut used_by: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    let slots = tables.dump_slots()?;
    for (_, svc) in all_services(tables)? {
        for slot in 0..svc.backend_count {
            let key = Lb4SlotKey {
                service_id: svc.service_id,
                revision: svc.revision,
                slot,
            };
            if let Some(s) = slots.get(&key) {
                let name = names
                    .service(svc.service_id)
                    .unwrap_or_else(|| format!("id {}", svc.service_id));
                let list = used_by.entry(s.backend_id).or_default();
                if !list.contains(&name) {
                    list.push(name);
                }
            }
        }
    }
    let counters = tables.dump_backend_stats()?;
    let flows = live_flows_by_backend(tables)?;
    Ok(all_backends(tables)?
        .iter()
        .map(|(id, b)| {
            let mut row = backend_json(*id, b);
            row["services"] = json!(used_by.get(id).cloned().unwrap_or_default());
            // Per service: the datapath's counters and the live flows.
            let mut traffic: BTreeMap<u32, [u64; 5]> = BTreeMap::new();
            for (key, c) in &counters {
                if key.backend_id == *id {
                    let t = traffic.entry(key.service_id).or_default();
                    t[0] += c.new_flows;
                    t[1] += c.answered;
                    t[2] += c.failed;
                }
            }
            for ((service_id, backend_id), live) in &flows {
                if backend_id == id {
                    let t = traffic.entry(*service_id).or_default();
                    t[3] += live.active;
                    t[4] += live.bytes;
                }
            }
            let total = traffic.values().fold([0u64; 5], |mut acc, t| {
                for (a, v) in acc.iter_mut().zip(t) {
                    *a += v;
                }
                acc
            });
            for (i, field) in TRAFFIC_FIELDS.iter().enumerate() {
                row[*field] = json!(total[i]);
            }
            row["traffic"] = traffic
                .iter()
                .map(|(service_id, t)| {
                    let mut per = json!({
                        "service_id": service_id,
                        "service": names.service(*service_id),
                        "port_name": names.port_name(*service_id),
                    });
                    for (i, field) in TRAFFIC_FIELDS.iter().enumerate() {
                        per[*field] = json!(t[i]);
                    }
                    per
                })
                .collect();
            row
        })
        .collect())
}

/// The per-backend traffic fields of `lbctl backends`: the datapath's
/// counters, then what the live conntrack entries hold.
const TRAFFIC_FIELDS: [&str; 5] = ["new_flows", "answered", "failed", "active_flows", "bytes"];

/// Live (not expired) flows per (service id, backend id): flows not
/// closed, and bytes both ways of every live entry.
fn live_flows_by_backend(
    tables: &KernelTables,
) -> anyhow::Result<BTreeMap<(u32, u32), BackendFlows>> {
    let now = coarse_monotonic_ns();
    let timeouts = tables.config()?.ct;
    let mut flows: BTreeMap<(u32, u32), BackendFlows> = BTreeMap::new();
    let mut add = |proto: u8, e: &dyn CtEntryView| {
        if is_expired(&timeouts, proto, e.state(), e.last_seen_ns(), now) {
            return;
        }
        let f = flows.entry(e.service_backend()).or_default();
        f.bytes += e.bytes();
        if e.direction() == DIR_FORWARD && !CtState::of(proto, e.state()).is_closed() {
            f.active += 1;
        }
    };
    for (k, e) in tables.dump_conntrack()? {
        add(k.proto, &e);
    }
    for (k, e) in tables.dump_conntrack6()? {
        add(k.proto, &e);
    }
    Ok(flows)
}

/// The [`CtEntry`] reads of either family, object-safe.
trait CtEntryView {
    fn state(&self) -> u8;
    fn last_seen_ns(&self) -> u64;
    fn service_backend(&self) -> (u32, u32);
    fn bytes(&self) -> u64;
    fn direction(&self) -> u8;
}

impl<E: CtEntry> CtEntryView for E {
    fn state(&self) -> u8 {
        CtEntry::state(self)
    }
    fn last_seen_ns(&self) -> u64 {
        CtEntry::last_seen_ns(self)
    }
    fn service_backend(&self) -> (u32, u32) {
        CtEntry::service_backend(self)
    }
    fn bytes(&self) -> u64 {
        CtEntry::bytes(self)
    }
    fn direction(&self) -> u8 {
        CtEntry::direction(self)
    }
}

/// The datapath's clock (`bpf_ktime_get_coarse_ns`).
fn coarse_monotonic_ns() -> u64 {
    lb_agent::datapath::ct_sweep::coarse_now_ns()
}

fn seconds_since(now: u64, then: u64) -> f64 {
    (now.saturating_sub(then) as f64 / 1e9 * 10.0).round() / 10.0
}

/// A conntrack key of either family: (source, destination, source port,
/// destination port, protocol), in the maps' order.
type CtTuple = (IpAddr, IpAddr, u16, u16, u8);

/// A conntrack entry of either family, addresses widened.
struct CtSide {
    dst_addr: IpAddr,
    dst_port: u16,
    direction: u8,
    rewrite: u8,
    src_addr: IpAddr,
    src_port: u16,
    state: u8,
    service_id: u32,
    backend_id: u32,
    created_ns: u64,
    last_seen_ns: u64,
    packets: u64,
    bytes: u64,
}

// The IPv4 and IPv6 conntrack types share their field names.
macro_rules! ct_row {
    ($k:expr, $e:expr) => {
        (
            (
                IpAddr::from($k.src_addr),
                IpAddr::from($k.dst_addr),
                $k.src_port,
                $k.dst_port,
                $k.proto,
            ),
            CtSide {
                dst_addr: IpAddr::from($e.dst_addr),
                dst_port: $e.dst_port,
                direction: $e.direction,
                rewrite: $e.rewrite,
                src_addr: IpAddr::from($e.src_addr),
                src_port: $e.src_port,
                state: $e.state,
                service_id: $e.service_id,
                backend_id: $e.backend_id,
                created_ns: $e.created_ns,
                last_seen_ns: $e.last_seen_ns,
                packets: $e.packets,
                bytes: $e.bytes,
            },
        )
    };
}

fn conntrack(
    tables: &KernelTables,
    names: &Names,
    service: Option<&str>,
    limit: Option<usize>,
) -> anyhow::Result<Vec<Value>> {
    let wanted = service.map(|s| names.ids_of(s));
    let v4 = tables
        .dump_conntrack()?
        .into_iter()
        .map(|(k, e)| ct_row!(k, e));
    let v6 = tables
        .dump_conntrack6()?
        .into_iter()
        .map(|(k, e)| ct_row!(k, e));
    let all: BTreeMap<CtTuple, CtSide> = v4.chain(v6).collect();
    // The datapath's clock and timeouts: an entry past its timeout is gone
    // to the datapath, and the agent collects it.
    let now = coarse_monotonic_ns();
    let timeouts = tables.config()?.ct;
    Ok(all
        .iter()
        .filter(|(_, e)| e.direction == DIR_FORWARD)
        .filter(|(_, e)| {
            wanted
                .as_ref()
                .is_none_or(|ids| ids.contains(&e.service_id))
        })
        .take(limit.unwrap_or(usize::MAX))
        .map(|(&(src, dst, sport, dport, proto), e)| {
            let snat = e.rewrite & REWRITE_SRC != 0;
            // The reply comes from the backend to the client, or to the SNAT address.
            let reply_key = (
                e.dst_addr,
                if snat { e.src_addr } else { src },
                e.dst_port,
                if snat { e.src_port } else { sport },
                proto,
            );
            let reply = all.get(&reply_key);
            let state = CtState::of(proto, e.state);
            let last_seen = e.last_seen_ns.max(reply.map_or(0, |r| r.last_seen_ns));
            let left = timeout_ns(&timeouts, proto, e.state) as i128
                - now.saturating_sub(last_seen) as i128;
            json!({
                "client": endpoint(src, sport),
                "frontend": endpoint(dst, dport),
                "backend": endpoint(e.dst_addr, e.dst_port),
                "snat": snat.then(|| endpoint(e.src_addr, e.src_port)),
                "protocol": proto_name(proto),
                "state": state.name(),
                "service": names.service(e.service_id),
                "service_id": e.service_id,
                "backend_id": e.backend_id,
                "age_s": seconds_since(now, e.created_ns),
                "idle_s": seconds_since(now, last_seen),
                "expires_in_s": (left.max(0) as f64 / 1e8).round() / 10.0,
                "packets": e.packets,
                "bytes": e.bytes,
                "reply_packets": reply.map_or(0, |r| r.packets),
                "reply_bytes": reply.map_or(0, |r| r.bytes),
            })
        })
        .collect())
}

/// The session-affinity entries, with how long ago each was last used.
fn affinity_rows(tables: &KernelTables, names: &Names) -> anyhow::Result<Vec<Value>> {
    let backends = all_backends(tables)?;
    let services: BTreeMap<u32, u32> = all_services(tables)?
        .into_iter()
        .map(|(_, s)| (s.service_id, s.affinity_timeout))
        .collect();
    let now = coarse_monotonic_ns();
    let v4 = tables
        .dump_affinity()?
        .into_iter()
        .map(|(k, v)| (IpAddr::from(k.client), k.service_id, v));
    let v6 = tables
        .dump_affinity6()?
        .into_iter()
        .map(|(k, v)| (IpAddr::from(k.client), k.service_id, v));
    let mut rows = Vec::new();
    for (client, service_id, value) in v4.chain(v6) {
        let age = seconds_since(now, value.last_seen_ns);
        let timeout = services.get(&service_id).copied();
        rows.push(json!({
            "client": client.to_string(),
            "service": names.service(service_id),
            "service_id": service_id,
            "backend_id": value.backend_id,
            "backend": backends.get(&value.backend_id).map(|b| endpoint(b.addr, b.port)),
            "age_s": age,
            "expired": timeout.is_none_or(|t| age > f64::from(t)),
        }));
    }
    Ok(rows)
}

fn counter_json(c: &Counter) -> Value {
    json!({ "packets": c.packets, "bytes": c.bytes })
}

/// Entries and capacity of the maps the agent fills: a map at capacity
/// refuses new services or backends (the agent logs and counts it, and
/// keeps what is programmed).
fn map_fill(tables: &KernelTables, bpffs: &std::path::Path) -> anyhow::Result<Vec<Value>> {
    let counts = [
        (lb_common::service::NAME, tables.services.keys().count()),
        (lb_common::slot::NAME, tables.slots.keys().count()),
        (lb_common::backend::NAME, tables.backends.keys().count()),
        (lb_common::member::NAME, tables.members.keys().count()),
        (lb_common::conntrack::NAME, tables.conntrack.keys().count()),
        (lb_common::service::NAME6, tables.services6.keys().count()),
        (lb_common::backend::NAME6, tables.backends6.keys().count()),
        (
            lb_common::conntrack::NAME6,
            tables.conntrack6.keys().count(),
        ),
        (lb_common::affinity::NAME, tables.affinity.keys().count()),
        (lb_common::maglev::NAME, tables.maglev.keys().count()),
        (lb_common::sock::NAME, tables.sock_revnat.keys().count()),
        (lb_common::sock::NAME6, tables.sock_revnat6.keys().count()),
    ];
    counts
        .iter()
        .map(|(name, entries)| {
            let info = aya::maps::MapInfo::from_pin(bpffs.join(name))
                .with_context(|| format!("reading {name}"))?;
            let capacity = info.max_entries() as usize;
            Ok(json!({
                "map": name,
                "entries": entries,
                "capacity": capacity,
                "full": *entries >= capacity,
            }))
        })
        .collect()
}

fn stats(tables: &KernelTables, names: &Names, bpffs: &std::path::Path) -> anyhow::Result<Value> {
    let reasons: Vec<Value> = tables
        .stats
        .all()?
        .iter()
        .map(|(reason, c)| {
            json!({
                "reason": reason.name(),
                "verdict": if reason.is_drop() { "drop" } else { "pass" },
                "packets": c.packets,
                "bytes": c.bytes,
            })
        })
        .collect();
    let mut verdicts = [Counter::default(), Counter::default()];
    for (reason, c) in tables.stats.all()? {
        let v = &mut verdicts[usize::from(reason.is_drop())];
        v.packets += c.packets;
        v.bytes += c.bytes;
    }
    let services: Vec<Value> = tables
        .dump_service_stats()?
        .iter()
        .map(|(id, s)| {
            json!({
                "service_id": id,
                "service": names.service(*id),
                "port_name": names.port_name(*id),
                "new_flow": counter_json(&s.new_flow),
                "ct_forward": counter_json(&s.ct_forward),
                "ct_reply": counter_json(&s.ct_reply),
                "dropped": counter_json(&s.dropped),
            })
        })
        .collect();
    Ok(json!({
        "verdicts": {"pass": counter_json(&verdicts[0]), "drop": counter_json(&verdicts[1])},
        "reasons": reasons,
        "services": services,
        "maps": map_fill(tables, bpffs)?,
        "refused_by_full_maps": tables.stats.agent_map_full()?,
        "socket_lb": {
            "translated": tables.stats.get(Reason::SockTranslated)?.packets,
            "refused": tables.stats.get(Reason::SockRefused)?.packets,
            "sockets_destroyed": tables.stats.agent_sock_destroyed()?,
        },
    }))
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Sets or clears `FLAG_TRACE`, keeping the other bits and the node address.
fn set_trace_flag(tables: &mut KernelTables, on: bool) -> anyhow::Result<()> {
    let mut config = tables.config()?;
    if on {
        config.flags |= FLAG_TRACE;
    } else {
        config.flags &= !FLAG_TRACE;
    }
    tables.set_config(&config)
}

/// `--client`: an address or CIDR of either family.
fn parse_client(text: &str) -> anyhow::Result<SourceRange> {
    lb_agent::model::parse_cidr(text.trim())
        .ok_or_else(|| anyhow!("--client {text:?}: not an IPv4 or IPv6 address or CIDR"))
}

/// An event's address field as the address of the event's family.
fn event_addr(event: &TraceEvent, addr: [u8; 16]) -> IpAddr {
    if event.family == FAMILY_IPV6 {
        IpAddr::from(addr)
    } else {
        IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
    }
}

fn trace_json(event: &TraceEvent, names: &Names) -> Value {
    let kind = match event.kind {
        EVENT_NEW_FLOW => "new_flow",
        EVENT_DROP => "drop",
        _ => "unknown",
    };
    let selection = match event.selection {
        SELECT_RANDOM => Some("random"),
        SELECT_AFFINITY => Some("affinity"),
        SELECT_LOCAL => Some("local"),
        SELECT_MAGLEV => Some("maglev"),
        _ => None,
    };
    let reason = Reason::ALL
        .iter()
        .find(|r| **r as u32 == event.reason)
        .map_or_else(|| event.reason.to_string(), |r| r.name().to_owned());
    let new_flow = event.kind == EVENT_NEW_FLOW;
    json!({
        "time_ns": event.timestamp_ns,
        "event": kind,
        "client": endpoint(event_addr(event, event.src_addr), event.src_port),
        "frontend": endpoint(event_addr(event, event.dst_addr), event.dst_port),
        "protocol": proto_name(event.proto),
        "hook": match event.hook { HOOK_POD => "pod", HOOK_NETWORK => "network", HOOK_HOST => "host", _ => "unknown" },
        "service_id": event.service_id,
        "service": (event.service_id != 0).then(|| names.service(event.service_id)).flatten(),
        "backend_id": new_flow.then_some(event.backend_id),
        "backend": new_flow
            .then(|| endpoint(event_addr(event, event.backend_addr), event.backend_port)),
        "selection": selection,
        "reason": reason,
    })
}

fn print_trace_line(row: &Value, format: Format) {
    match format {
        Format::Json => println!("{row}"),
        Format::Table => {
            let text = |v: &Value| match v {
                Value::String(s) => s.clone(),
                Value::Null => "-".into(),
                other => other.to_string(),
            };
            let what = if row["event"] == "new_flow" {
                format!("-> {} ({})", text(&row["backend"]), text(&row["selection"]))
            } else {
                format!("DROP {}", text(&row["reason"]))
            };
            println!(
                "{:>16.6} {:<8} {:<5} {:<21} -> {:<21} {:<22} {what}",
                row["time_ns"].as_u64().unwrap_or(0) as f64 / 1e9,
                text(&row["event"]),
                text(&row["protocol"]),
                text(&row["client"]),
                text(&row["frontend"]),
                text(&row["service"]),
            );
        }
    }
}

struct TraceOptions<'a> {
    service: Option<&'a str>,
    client: Option<&'a str>,
    count: Option<u64>,
    seconds: Option<u64>,
}

fn trace(args: &Args, tables: &mut KernelTables, options: &TraceOptions) -> anyhow::Result<()> {
    let client = options.client.map(parse_client).transpose()?;
    let path = args.bpffs.join(trace::NAME);
    let map = Map::from_map_data(
        MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?,
    )?;
    let mut ring =
        RingBuf::try_from(map).with_context(|| format!("{} is not a ring buffer", trace::NAME))?;
    // Events a previous trace left unread are not ours.
    while ring.next().is_some() {}

    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
    set_trace_flag(tables, true)?;
    eprintln!(
        "lbctl: tracing new flows and drops under {} (Ctrl-C to stop)",
        args.bpffs.display()
    );
    if args.output == Format::Table {
        println!(
            "{:>16} {:<8} {:<5} {:<21}    {:<21} {:<22} RESULT",
            "TIME", "EVENT", "PROTO", "CLIENT", "FRONTEND", "SERVICE"
        );
    }
    let result = follow_ring(&mut ring, tables, args.output, options, client);
    // Always clear the flag, even after an error: tracing must not stay on.
    let cleared = set_trace_flag(tables, false);
    result.and(cleared)
}

fn follow_ring(
    ring: &mut RingBuf<MapData>,
    tables: &KernelTables,
    format: Format,
    options: &TraceOptions,
    client: Option<SourceRange>,
) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let deadline = options
        .seconds
        .map(|s| Instant::now() + Duration::from_secs(s));
    let mut names = Names(tables.dump_service_names()?);
    let mut seen = 0u64;
    while !STOP.load(Ordering::Relaxed) {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let mut pollfd = libc::pollfd {
            fd: ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a bounded wait so signals and the
        // deadline are noticed.
        unsafe { libc::poll(&mut pollfd, 1, 100) };
        while let Some(item) = ring.next() {
            if item.len() < size_of::<TraceEvent>() {
                continue;
            }
            let event: TraceEvent = bytemuck::pod_read_unaligned(&item[..size_of::<TraceEvent>()]);
            drop(item);
            if let Some(range) = &client
                && !range.contains(event_addr(&event, event.src_addr))
            {
                continue;
            }
            if event.service_id != 0 && !names.0.contains_key(&event.service_id) {
                // A service programmed after we started.
                names = Names(tables.dump_service_names()?);
            }
            if let Some(service) = options.service
                && names.service(event.service_id).as_deref() != Some(service)
            {
                continue;
            }
            print_trace_line(&trace_json(&event, &names), format);
            seen += 1;
            if options.count.is_some_and(|n| seen >= n) {
                return Ok(());
            }
        }
    }
    Ok(())
}

fn run(args: &Args) -> anyhow::Result<()> {
    let mut tables = KernelTables::open(&args.bpffs)?;
    let names = Names(tables.dump_service_names()?);
    let rows: Value = match &args.command {
        Command::Services => Value::Array(services(&tables, &names)?),
        Command::Backends => Value::Array(backends(&tables, &names)?),
        Command::Conntrack { service, limit } => {
            Value::Array(conntrack(&tables, &names, service.as_deref(), *limit)?)
        }
        Command::Affinity => Value::Array(affinity_rows(&tables, &names)?),
        Command::Stats => stats(&tables, &names, &args.bpffs)?,
        Command::Trace {
            service,
            client,
            count,
            seconds,
        } => {
            let options = TraceOptions {
                service: service.as_deref(),
                client: client.as_deref(),
                count: *count,
                seconds: *seconds,
            };
            return trace(args, &mut tables, &options);
        }
    };
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Format::Table => print_table(&args.command, &rows),
    }
    Ok(())
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(items) if items.is_empty() => "-".into(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Columns padded to their widest cell.
fn print_columns(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    println!(
        "{}",
        line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>())
    );
    for row in rows {
        println!("{}", line(row));
    }
}

fn print_table(command: &Command, rows: &Value) {
    let empty = Vec::new();
    let list = rows.as_array().unwrap_or(&empty);
    match command {
        Command::Services => {
            // Like `cilium service list`: the frontend, then one line per backend.
            let mut cells = Vec::new();
            for row in list {
                let service = match (&row["service"], text(&row["port_name"])) {
                    (Value::Null, _) => "-".to_owned(),
                    (s, port) if port.is_empty() || port == "-" => text(s),
                    (s, port) => format!("{} ({port})", text(s)),
                };
                let backends: Vec<String> = row["backends"]
                    .as_array()
                    .unwrap_or(&empty)
                    .iter()
                    .map(|b| {
                        let local = if b["local"] == true { ", local" } else { "" };
                        let share = match (b["maglev_slots"].as_u64(), b["maglev_share"].as_f64()) {
                            (Some(slots), Some(share)) => {
                                format!(", {slots} slots = {:.2}%", 100.0 * share)
                            }
                            _ => String::new(),
                        };
                        format!(
                            "{} => {} ({}{local}{share})",
                            text(&b["id"]),
                            text(&b["address"]),
                            text(&b["state"])
                        )
                    })
                    .collect();
                let affinity = match row["affinity_timeout"].as_u64() {
                    Some(0) | None => "-".to_owned(),
                    Some(t) => format!("{t}s"),
                };
                let mut first = vec![
                    text(&row["service_id"]),
                    text(&row["frontend"]),
                    service,
                    text(&row["type"]),
                    text(&row["scope"]),
                    text(&row["policy"]),
                    text(&row["algorithm"]),
                    affinity,
                    text(&row["source_ranges"]),
                ];
                let mut backends = backends.into_iter();
                first.push(backends.next().unwrap_or_else(|| "(none)".into()));
                cells.push(first);
                for more in backends {
                    let mut line = vec![String::new(); 9];
                    line.push(more);
                    cells.push(line);
                }
            }
            print_columns(
                &[
                    "ID",
                    "FRONTEND",
                    "SERVICE",
                    "TYPE",
                    "SCOPE",
                    "POLICY",
                    "ALGORITHM",
                    "AFFINITY",
                    "SOURCE RANGES",
                    "BACKENDS",
                ],
                &cells,
            );
        }
        Command::Stats => {
            let reasons: Vec<Vec<String>> = rows["reasons"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .map(|r| {
                    ["reason", "verdict", "packets", "bytes"]
                        .iter()
                        .map(|c| text(&r[*c]))
                        .collect()
                })
                .collect();
            print_columns(&["REASON", "VERDICT", "PACKETS", "BYTES"], &reasons);
            let v = &rows["verdicts"];
            println!(
                "total: pass {} packets / {} bytes, drop {} packets / {} bytes",
                v["pass"]["packets"], v["pass"]["bytes"], v["drop"]["packets"], v["drop"]["bytes"]
            );
            println!();
            let services: Vec<Vec<String>> = rows["services"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .map(|s| {
                    let pair = |c: &str| format!("{}/{}", s[c]["packets"], s[c]["bytes"]);
                    vec![
                        text(&s["service_id"]),
                        text(&s["service"]),
                        text(&s["port_name"]),
                        pair("new_flow"),
                        pair("ct_forward"),
                        pair("ct_reply"),
                        pair("dropped"),
                    ]
                })
                .collect();
            print_columns(
                &[
                    "ID",
                    "SERVICE",
                    "PORT",
                    "NEW_FLOW PKTS/BYTES",
                    "CT_FORWARD",
                    "CT_REPLY",
                    "DROPPED",
                ],
                &services,
            );
            println!();
            let maps: Vec<Vec<String>> = rows["maps"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .map(|m| {
                    let full = if m["full"].as_bool() == Some(true) {
                        "FULL"
                    } else {
                        ""
                    };
                    vec![
                        text(&m["map"]),
                        text(&m["entries"]),
                        text(&m["capacity"]),
                        full.to_string(),
                    ]
                })
                .collect();
            print_columns(&["MAP", "ENTRIES", "CAPACITY", ""], &maps);
            println!(
                "map inserts refused because a map was full: {}",
                rows["refused_by_full_maps"]
            );
            let sock = &rows["socket_lb"];
            println!(
                "socket-level balancing: {} translated, {} refused, {} sockets destroyed",
                sock["translated"], sock["refused"], sock["sockets_destroyed"]
            );
        }
        _ => {
            let columns: &[&str] = match command {
                Command::Backends => &[
                    "id",
                    "address",
                    "protocol",
                    "state",
                    "local",
                    "services",
                    "new_flows",
                    "failed",
                    "active_flows",
                    "bytes",
                ],
                Command::Conntrack { .. } => &[
                    "client",
                    "frontend",
                    "backend",
                    "snat",
                    "protocol",
                    "state",
                    "service",
                    "age_s",
                    "idle_s",
                    "expires_in_s",
                    "packets",
                    "bytes",
                ],
                _ => &[
                    "client",
                    "service",
                    "backend",
                    "backend_id",
                    "age_s",
                    "expired",
                ],
            };
            if list.is_empty() {
                println!("(none)");
                return;
            }
            let header: Vec<String> = columns.iter().map(|c| c.to_uppercase()).collect();
            let header: Vec<&str> = header.iter().map(String::as_str).collect();
            let cells: Vec<Vec<String>> = list
                .iter()
                .map(|row| columns.iter().map(|c| text(&row[*c])).collect())
                .collect();
            print_columns(&header, &cells);
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
