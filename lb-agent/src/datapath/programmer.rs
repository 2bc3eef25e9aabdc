//! Turns desired tables into map writes: only the difference is written, and
//! a service's backend set switches atomically.
//!
//! A new backend set is written as slots under the next revision beside the
//! old ones; the service entry is then rewritten to point at that revision
//! (one map update, atomic for readers), and only then are the old slots
//! deleted. A packet therefore sees the old set or the new one, never a mix.
//! Ids are stable: a frontend keeps its service id and a backend (address,
//! port, protocol) its backend id for as long as they are programmed.
//!
//! With Maglev on ([`Programmer::with_maglev`]), each frontend also has a
//! lookup table of M slots built from its backends' addresses and ports
//! (`crate::maglev`); it is rewritten in place, only the chunks that hold
//! changed slots, after new backends are written and before the service
//! entry (see `lb_common::maglev` for why that order is safe).
//!
//! Both families are programmed by one image: IPv4 frontends and backends
//! into the `LB4_*` maps, IPv6 ones into `LB6_*`, with service and backend
//! ids handed out from one space, so the slot and membership maps (keyed by
//! ids) serve both.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use lb_common::service_name::LbServiceName;
use lb_common::{
    backend::{FLAG_LOCAL, FLAG_TERMINATING, Lb4Backend, Lb6Backend},
    maglev::{Lb4MaglevChunk, Lb4MaglevKey, chunk_count},
    member::Lb4MemberKey,
    service::{
        FLAG_ADDRESS, FLAG_HAS_INTERNAL, FLAG_LOCAL_ONLY, FLAG_MAGLEV, FLAG_SOURCE_RANGES,
        KIND_CLUSTER_IP, KIND_EXTERNAL_IP, KIND_LOAD_BALANCER, KIND_NODE_PORT, Lb4Service,
        Lb4ServiceKey, Lb6ServiceKey, SCOPE_EXTERNAL, SCOPE_INTERNAL,
    },
    slot::{Lb4Slot, Lb4SlotKey},
};

use crate::maglev::{self, BackendIdentity};
use crate::model::{DesiredTables, Frontend, FrontendKind, FrontendSpec, Scope};

/// Where the programmer writes; the kernel maps in production, a recording
/// fake in tests.
pub trait TableWriter {
    fn put_service(&mut self, key: &Lb4ServiceKey, value: &Lb4Service) -> anyhow::Result<()>;
    fn delete_service(&mut self, key: &Lb4ServiceKey) -> anyhow::Result<()>;
    fn put_slot(&mut self, key: &Lb4SlotKey, value: &Lb4Slot) -> anyhow::Result<()>;
    fn delete_slot(&mut self, key: &Lb4SlotKey) -> anyhow::Result<()>;
    fn put_backend(&mut self, id: u32, value: &Lb4Backend) -> anyhow::Result<()>;
    fn delete_backend(&mut self, id: u32) -> anyhow::Result<()>;
    /// The IPv6 frontend map (`LB6_SERVICES_V1`).
    fn put_service6(&mut self, key: &Lb6ServiceKey, value: &Lb4Service) -> anyhow::Result<()>;
    fn delete_service6(&mut self, key: &Lb6ServiceKey) -> anyhow::Result<()>;
    /// The IPv6 backend map (`LB6_BACKENDS_V1`).
    fn put_backend6(&mut self, id: u32, value: &Lb6Backend) -> anyhow::Result<()>;
    fn delete_backend6(&mut self, id: u32) -> anyhow::Result<()>;
    /// Backend `key.backend_id` is part of service `key.service_id`.
    fn put_member(&mut self, key: &Lb4MemberKey) -> anyhow::Result<()>;
    fn delete_member(&mut self, key: &Lb4MemberKey) -> anyhow::Result<()>;
    /// An allowed client range of a service: (service id, network) / length.
    fn put_source_range(&mut self, range: &SourceRangeEntry) -> anyhow::Result<()>;
    fn delete_source_range(&mut self, range: &SourceRangeEntry) -> anyhow::Result<()>;
    /// One chunk of a frontend's Maglev table.
    fn put_maglev_chunk(
        &mut self,
        key: &Lb4MaglevKey,
        value: &Lb4MaglevChunk,
    ) -> anyhow::Result<()>;
    fn delete_maglev_chunk(&mut self, key: &Lb4MaglevKey) -> anyhow::Result<()>;
    // Inspection (issue 6): the Kubernetes name of each service id, read
    // by lbctl only. Defaults do nothing, so fakes need not care.
    /// Records which Service (and port) a service id was programmed from.
    fn put_service_name(&mut self, _service_id: u32, _name: &LbServiceName) -> anyhow::Result<()> {
        Ok(())
    }
    /// Forgets the name (and per-service counters) of a removed service id.
    fn delete_service_name(&mut self, _service_id: u32) -> anyhow::Result<()> {
        Ok(())
    }
}

/// One loadBalancerSourceRanges entry, in its family's trie.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SourceRangeEntry {
    pub service_id: u32,
    /// The network address; its family picks the trie.
    pub addr: IpAddr,
    /// Prefix length of the address part (the service id's 32 bits come on top).
    pub prefix_len: u8,
}

/// What one `apply` did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Frontends programmed after the apply.
    pub frontends: usize,
    /// Backends programmed after the apply.
    pub backends: usize,
    /// Map entries written or deleted.
    pub writes: usize,
    /// Failures, each naming the service; the service keeps its previous
    /// programming and every other service is unaffected.
    pub errors: Vec<String>,
    /// (service id, backend id) pairs that stopped being members: their
    /// UDP conntrack entries are to be flushed.
    pub removed_members: Vec<(u32, u32)>,
    /// UDP backends that left a frontend: sockets socket-level balancing
    /// connected to them are to be destroyed.
    pub removed_udp: Vec<RemovedUdpBackend>,
}

/// A UDP backend that stopped serving a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemovedUdpBackend {
    /// Frontend address and port (IPv4 or IPv6).
    pub frontend: SocketAddr,
    /// Backend address and port, of the frontend's family.
    pub backend: SocketAddr,
}

#[derive(Clone, Debug)]
struct ProgrammedService {
    entry: Lb4Service,
    backend_ids: Vec<u32>,
    ranges: Vec<SourceRangeEntry>,
    /// The Maglev table as the map holds it, a backend id per slot (its
    /// length is M); empty when the frontend has none.
    maglev: Vec<u32>,
    /// Whether `maglev` is known to be the table of `backend_ids`: false
    /// for a table adopted from a previous agent, which the first apply
    /// rebuilds (and rewrites where it differs).
    maglev_checked: bool,
}

/// Backend identity: what makes two endpoints the same backend.
type BackendKey = (IpAddr, u16, u8);

/// A frontend's key in its family's service map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ServiceKey {
    /// `LB4_SERVICES_V1`.
    V4(Lb4ServiceKey),
    /// `LB6_SERVICES_V1`.
    V6(Lb6ServiceKey),
}

impl ServiceKey {
    fn proto(&self) -> u8 {
        match self {
            ServiceKey::V4(k) => k.proto,
            ServiceKey::V6(k) => k.proto,
        }
    }

    fn is_ipv4(&self) -> bool {
        matches!(self, ServiceKey::V4(_))
    }

    fn put(&self, maps: &mut impl TableWriter, entry: &Lb4Service) -> anyhow::Result<()> {
        match self {
            ServiceKey::V4(k) => maps.put_service(k, entry),
            ServiceKey::V6(k) => maps.put_service6(k, entry),
        }
    }

    fn delete(&self, maps: &mut impl TableWriter) -> anyhow::Result<()> {
        match self {
            ServiceKey::V4(k) => maps.delete_service(k),
            ServiceKey::V6(k) => maps.delete_service6(k),
        }
    }
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServiceKey::V4(k) => write!(f, "{:?}:{}/{}", k.addr, k.port, k.proto),
            ServiceKey::V6(k) => write!(
                f,
                "[{}]:{}/{}",
                std::net::Ipv6Addr::from(k.addr),
                k.port,
                k.proto
            ),
        }
    }
}

/// A backend as its family's backend map holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendEntry {
    /// `LB4_BACKENDS_V1`.
    V4(Lb4Backend),
    /// `LB6_BACKENDS_V1`.
    V6(Lb6Backend),
}

impl BackendEntry {
    fn identity(&self) -> BackendKey {
        match self {
            BackendEntry::V4(b) => (IpAddr::from(b.addr), b.port, b.proto),
            BackendEntry::V6(b) => (IpAddr::from(b.addr), b.port, b.proto),
        }
    }

    fn put(&self, maps: &mut impl TableWriter, id: u32) -> anyhow::Result<()> {
        match self {
            BackendEntry::V4(b) => maps.put_backend(id, b),
            BackendEntry::V6(b) => maps.put_backend6(id, b),
        }
    }

    fn delete(&self, maps: &mut impl TableWriter, id: u32) -> anyhow::Result<()> {
        match self {
            BackendEntry::V4(_) => maps.delete_backend(id),
            BackendEntry::V6(_) => maps.delete_backend6(id),
        }
    }
}

/// The agent's image of what the maps hold.
#[derive(Debug)]
pub struct Programmer {
    services: BTreeMap<ServiceKey, ProgrammedService>,
    /// ClusterIP addresses (both families) with a marker entry (port 0,
    /// protocol 0).
    markers: BTreeSet<IpAddr>,
    backends: BTreeMap<BackendKey, (u32, BackendEntry)>,
    next_service_id: u32,
    next_backend_id: u32,
    /// Inspection only: names written to the service-name map, by service
    /// id. Empty after `adopt`, so a restarted agent writes each name once.
    names: BTreeMap<u32, LbServiceName>,
    /// M of every frontend's Maglev table; `None`: random selection.
    maglev_table_size: Option<u32>,
    /// The specs of the last apply, to find what the next one changes.
    applied: BTreeMap<Frontend, FrontendSpec>,
    /// Frontends whose last programming failed: tried again each apply.
    retry: BTreeSet<Frontend>,
    /// Compare the next apply with the maps' image, not with `applied`
    /// (the first apply, and the first after [`Self::adopt`]).
    full_sync: bool,
    /// A ClusterIP marker write failed: sync the markers again.
    markers_retry: bool,
    /// Programmed frontends per backend id; a backend with none is deleted.
    backend_refs: BTreeMap<u32, u32>,
    /// Backend ids that may have lost their last frontend in this apply.
    maybe_unused: BTreeSet<u32>,
    /// Backend id -> its key in `backends`.
    backend_keys: BTreeMap<u32, BackendKey>,
}

impl Default for Programmer {
    fn default() -> Self {
        Self {
            services: BTreeMap::new(),
            markers: BTreeSet::new(),
            backends: BTreeMap::new(),
            next_service_id: 1,
            next_backend_id: 1,
            names: BTreeMap::new(),
            maglev_table_size: None,
            applied: BTreeMap::new(),
            retry: BTreeSet::new(),
            full_sync: true,
            markers_retry: false,
            backend_refs: BTreeMap::new(),
            maybe_unused: BTreeSet::new(),
            backend_keys: BTreeMap::new(),
        }
    }
}

/// The map key of a frontend, in its family's map.
fn service_key(frontend: &Frontend) -> ServiceKey {
    let port = frontend.port;
    let proto = frontend.protocol.number();
    let scope = match frontend.scope {
        Scope::External => SCOPE_EXTERNAL,
        Scope::Internal => SCOPE_INTERNAL,
    };
    match frontend.addr {
        IpAddr::V4(addr) => ServiceKey::V4(Lb4ServiceKey {
            addr: addr.octets(),
            port,
            proto,
            scope,
        }),
        IpAddr::V6(addr) => ServiceKey::V6(Lb6ServiceKey {
            addr: addr.octets(),
            port,
            proto,
            scope,
        }),
    }
}

fn kind_code(kind: FrontendKind) -> u32 {
    match kind {
        FrontendKind::ClusterIp => KIND_CLUSTER_IP,
        FrontendKind::NodePort => KIND_NODE_PORT,
        FrontendKind::LoadBalancer => KIND_LOAD_BALANCER,
        FrontendKind::ExternalIp => KIND_EXTERNAL_IP,
    }
}

impl Programmer {
    /// Gives every frontend a Maglev table of `table_size` slots (a prime,
    /// checked by the caller with [`maglev::validate_table_size`]); `None`
    /// keeps random selection. Call before the first apply, after
    /// [`Self::adopt`] and before [`Self::adopt_maglev`].
    pub fn with_maglev(mut self, table_size: Option<u32>) -> Self {
        self.maglev_table_size = table_size;
        self
    }

    /// Takes over the Maglev tables a previous agent left pinned: chunks of
    /// this agent's table size for adopted frontends become their image
    /// (rebuilt and compared by the first apply, so only differences are
    /// written). Returns the chunks nobody will use (another table size, a
    /// frontend that is gone, Maglev now off), to delete with
    /// [`Self::delete_maglev_chunks`] after the first apply.
    pub fn adopt_maglev(
        &mut self,
        chunks: impl IntoIterator<Item = (Lb4MaglevKey, Lb4MaglevChunk)>,
    ) -> Vec<Lb4MaglevKey> {
        let by_id: BTreeMap<u32, ServiceKey> = self
            .services
            .iter()
            .map(|(key, s)| (s.entry.service_id, *key))
            .collect();
        let mut stale = Vec::new();
        for (key, chunk) in chunks {
            let service = match self.maglev_table_size {
                Some(m) if key.table_size == m && key.chunk < chunk_count(m) => by_id
                    .get(&key.service_id)
                    .and_then(|k| self.services.get_mut(k)),
                _ => None,
            };
            let Some(service) = service else {
                stale.push(key);
                continue;
            };
            let m = key.table_size as usize;
            if service.maglev.len() != m {
                // Missing chunks read as "no backend": the apply writes them.
                service.maglev = vec![0; m];
            }
            let start = key.chunk as usize * chunk.backend_ids.len();
            let end = (start + chunk.backend_ids.len()).min(m);
            service.maglev[start..end].copy_from_slice(&chunk.backend_ids[..end - start]);
        }
        stale
    }

    /// Deletes Maglev chunks no frontend uses (from [`Self::adopt_maglev`]),
    /// except those a frontend uses by now: an agent killed after writing a
    /// new frontend's table but before its entry leaves chunks under the
    /// id the next agent hands that frontend again, and its first apply
    /// writes them for real.
    pub fn delete_maglev_chunks(
        &self,
        stale: &[Lb4MaglevKey],
        maps: &mut impl TableWriter,
    ) -> Vec<String> {
        let live: BTreeSet<u32> = self
            .services
            .values()
            .filter(|s| !s.maglev.is_empty())
            .map(|s| s.entry.service_id)
            .collect();
        stale
            .iter()
            .filter(|k| {
                !(self.maglev_table_size == Some(k.table_size)
                    && k.chunk < chunk_count(k.table_size)
                    && live.contains(&k.service_id))
            })
            .filter_map(|k| {
                maps.delete_maglev_chunk(k)
                    .err()
                    .map(|e| format!("Maglev chunk {k:?}: {e:#}"))
            })
            .collect()
    }

    /// Rebuilds the image from maps a previous agent left pinned, so that the
    /// first apply rewrites only what changed and ids stay the same. Slots
    /// of other revisions (a half-finished update) are deleted by the apply.
    pub fn adopt(
        services: impl IntoIterator<Item = (ServiceKey, Lb4Service)>,
        slots: &BTreeMap<Lb4SlotKey, Lb4Slot>,
        backends: impl IntoIterator<Item = (u32, BackendEntry)>,
        ranges: impl IntoIterator<Item = SourceRangeEntry>,
    ) -> (Self, Vec<Lb4SlotKey>) {
        let mut ranges_by_service: BTreeMap<u32, Vec<SourceRangeEntry>> = BTreeMap::new();
        for range in ranges {
            ranges_by_service
                .entry(range.service_id)
                .or_default()
                .push(range);
        }
        let mut me = Self::default();
        for (id, backend) in backends {
            me.next_backend_id = me.next_backend_id.max(id.saturating_add(1));
            let identity = backend.identity();
            me.backends.insert(identity, (id, backend));
            me.backend_keys.insert(id, identity);
        }
        let mut live_slots = BTreeSet::new();
        for (key, entry) in services {
            if entry.flags & FLAG_ADDRESS != 0 {
                me.markers.insert(match key {
                    ServiceKey::V4(k) => IpAddr::from(k.addr),
                    ServiceKey::V6(k) => IpAddr::from(k.addr),
                });
                continue;
            }
            me.next_service_id = me.next_service_id.max(entry.service_id.saturating_add(1));
            let mut backend_ids = Vec::with_capacity(entry.backend_count as usize);
            for slot in 0..entry.backend_count {
                let slot_key = Lb4SlotKey {
                    service_id: entry.service_id,
                    revision: entry.revision,
                    slot,
                };
                // A missing slot makes the set differ from any desired one,
                // so the apply rewrites it under a new revision.
                backend_ids.push(slots.get(&slot_key).map_or(0, |s| s.backend_id));
                live_slots.insert(slot_key);
            }
            let ranges = ranges_by_service
                .remove(&entry.service_id)
                .unwrap_or_default();
            me.count_refs(&[], &backend_ids);
            me.services.insert(
                key,
                ProgrammedService {
                    entry,
                    backend_ids,
                    ranges,
                    maglev: Vec::new(),
                    maglev_checked: false,
                },
            );
        }
        // Backends no adopted frontend uses go with the first apply.
        me.maybe_unused = me
            .backend_keys
            .keys()
            .filter(|id| !me.backend_refs.contains_key(id))
            .copied()
            .collect();
        let stale = slots
            .keys()
            .filter(|k| !live_slots.contains(k))
            .copied()
            .collect();
        (me, stale)
    }

    /// Number of frontends programmed.
    pub fn frontends(&self) -> usize {
        self.services.len()
    }

    /// Writes what differs between `desired` and the maps.
    pub fn apply(&mut self, desired: &DesiredTables, maps: &mut impl TableWriter) -> ApplyReport {
        let mut report = ApplyReport::default();
        let changes = self.changes(desired);
        // Removals first: a full map then has the room they free for what
        // this apply adds.
        for key in &changes.removed {
            if let Err(e) = self.remove_service(key, maps, &mut report) {
                report
                    .errors
                    .push(format!("removing frontend {key}: {e:#}"));
            }
        }
        for frontend in &changes.gone {
            self.applied.remove(frontend);
            self.retry.remove(frontend);
        }
        for (frontend, spec) in changes.programmed {
            let errors_before = report.errors.len();
            self.program_frontend(desired, frontend, spec, maps, &mut report);
            if report.errors.len() == errors_before {
                self.retry.remove(frontend);
            } else {
                self.retry.insert(frontend.clone());
            }
            if self.applied.get(frontend) != Some(spec) {
                self.applied.insert(frontend.clone(), spec.clone());
            }
        }
        if changes.cluster_ips || self.markers_retry {
            // ClusterIP -> its Service, for errors.
            let cluster_ips: BTreeMap<IpAddr, String> = desired
                .frontends
                .iter()
                .filter(|(f, spec)| {
                    f.scope == Scope::External && spec.kind == FrontendKind::ClusterIp
                })
                .map(|(f, spec)| (f.addr, spec.service.to_string()))
                .collect();
            let errors_before = report.errors.len();
            self.sync_markers(&cluster_ips, maps, &mut report);
            self.markers_retry = report.errors.len() != errors_before;
        }
        self.collect_backends(maps, &mut report);
        self.full_sync = false;
        report.frontends = self.services.len();
        report.backends = self.backends.len();
        report
    }

    /// What `desired` changes against the last apply: a merge of the two
    /// sorted frontend maps, so an apply that changes one endpoint costs a
    /// walk of the frontends plus the writes of that one (no map lookups,
    /// no copies of unchanged specs). The first apply (and the first after
    /// [`Self::adopt`]) compares against the maps' image instead.
    fn changes<'a>(&self, desired: &'a DesiredTables) -> Changes<'a> {
        let mut changes = Changes::default();
        let mut dirty: BTreeSet<&'a Frontend> = BTreeSet::new();
        if self.full_sync {
            let wanted: BTreeSet<ServiceKey> = desired.frontends.keys().map(service_key).collect();
            changes.removed = self
                .services
                .keys()
                .filter(|k| !wanted.contains(k))
                .copied()
                .collect();
            changes.gone = self
                .applied
                .keys()
                .filter(|f| !desired.frontends.contains_key(*f))
                .cloned()
                .collect();
            dirty.extend(desired.frontends.keys());
            changes.cluster_ips = true;
        } else {
            let mut twins: Vec<Frontend> = Vec::new();
            let mut old = self.applied.iter().peekable();
            let mut new = desired.frontends.iter().peekable();
            loop {
                let order = match (old.peek(), new.peek()) {
                    (None, None) => break,
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (Some((a, _)), Some((b, _))) => a.cmp(b),
                };
                match order {
                    std::cmp::Ordering::Less => {
                        let Some((frontend, spec)) = old.next() else {
                            break;
                        };
                        changes.removed.push(service_key(frontend));
                        changes.gone.push(frontend.clone());
                        changes.cluster_ips |= spec.kind == FrontendKind::ClusterIp;
                        if frontend.scope == Scope::Internal {
                            twins.push(frontend.clone());
                        }
                    }
                    std::cmp::Ordering::Greater => {
                        let Some((frontend, spec)) = new.next() else {
                            break;
                        };
                        dirty.insert(frontend);
                        changes.cluster_ips |= spec.kind == FrontendKind::ClusterIp;
                        if frontend.scope == Scope::Internal {
                            twins.push(frontend.clone());
                        }
                    }
                    std::cmp::Ordering::Equal => {
                        let (Some((_, was)), Some((frontend, spec))) = (old.next(), new.next())
                        else {
                            break;
                        };
                        if was != spec {
                            dirty.insert(frontend);
                            changes.cluster_ips |= was.kind != spec.kind;
                        }
                    }
                }
            }
            // An internal entry appearing or going changes its external
            // twin's flags.
            for twin in twins {
                let external = Frontend {
                    scope: Scope::External,
                    ..twin
                };
                if let Some((frontend, _)) = desired.frontends.get_key_value(&external) {
                    dirty.insert(frontend);
                }
            }
            for frontend in &self.retry {
                if let Some((frontend, _)) = desired.frontends.get_key_value(frontend) {
                    dirty.insert(frontend);
                }
            }
        }
        for frontend in dirty {
            if let Some(spec) = desired.frontends.get(frontend) {
                changes.programmed.push((frontend, spec));
            }
        }
        changes
    }

    /// Programs one (new or changed) frontend; errors go to the report.
    fn program_frontend(
        &mut self,
        desired: &DesiredTables,
        frontend: &Frontend,
        spec: &FrontendSpec,
        maps: &mut impl TableWriter,
        report: &mut ApplyReport,
    ) {
        let key = service_key(frontend);
        let what = || format!("{} port {} ({frontend})", spec.service, spec.port_name);
        let has_internal = frontend.scope == Scope::External
            && desired.frontends.contains_key(&Frontend {
                scope: Scope::Internal,
                ..frontend.clone()
            });
        let ids = match self.ensure_backends(&key, spec, maps, &mut report.writes) {
            Ok(ids) => ids,
            Err(e) => {
                report.errors.push(format!("{}: {e:#}", what()));
                return;
            }
        };
        if let Err(e) = self.program_service(key, spec, has_internal, ids, maps, report) {
            report.errors.push(format!("{}: {e:#}", what()));
        }
        // Inspection only (lbctl): not counted as a datapath write.
        if let Err(e) = self.sync_service_name(&key, spec, maps) {
            report
                .errors
                .push(format!("{}: writing its name: {e:#}", what()));
        }
    }

    /// Deletes slots left by an interrupted update (from [`Self::adopt`]),
    /// except those a service entry points at by now. An agent killed
    /// between writing a new revision's slots and switching the entry
    /// leaves exactly the keys the next agent's first apply writes again
    /// (same service id, same next revision, same backends): stale at
    /// adoption, live once that apply switched to them.
    pub fn delete_slots(&self, stale: &[Lb4SlotKey], maps: &mut impl TableWriter) -> Vec<String> {
        let live: BTreeMap<u32, (u32, u32)> = self
            .services
            .values()
            .map(|s| {
                (
                    s.entry.service_id,
                    (s.entry.revision, s.entry.backend_count),
                )
            })
            .collect();
        stale
            .iter()
            .filter(|k| {
                live.get(&k.service_id)
                    .is_none_or(|&(revision, count)| k.revision != revision || k.slot >= count)
            })
            .filter_map(|k| {
                maps.delete_slot(k)
                    .err()
                    .map(|e| format!("slot {k:?}: {e:#}"))
            })
            .collect()
    }

    fn ensure_backends(
        &mut self,
        key: &ServiceKey,
        spec: &FrontendSpec,
        maps: &mut impl TableWriter,
        writes: &mut usize,
    ) -> anyhow::Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(spec.backends.len());
        let proto = key.proto();
        for backend in &spec.backends {
            let mut flags = 0;
            if backend.node_local {
                flags |= FLAG_LOCAL;
            }
            if backend.terminating {
                flags |= FLAG_TERMINATING;
            }
            // A frontend's backends are of its family (the model keeps
            // them so); anything else is skipped.
            let value = match (key, backend.addr) {
                (ServiceKey::V4(_), IpAddr::V4(addr)) => BackendEntry::V4(Lb4Backend {
                    addr: addr.octets(),
                    port: backend.port,
                    proto,
                    flags,
                }),
                (ServiceKey::V6(_), IpAddr::V6(addr)) => BackendEntry::V6(Lb6Backend {
                    addr: addr.octets(),
                    port: backend.port,
                    proto,
                    flags,
                }),
                _ => continue,
            };
            let identity = value.identity();
            let id = match self.backends.get(&identity) {
                Some((id, current)) if *current == value => *id,
                Some((id, _)) => {
                    // Same backend, new state: update in place, same id.
                    let id = *id;
                    value.put(maps, id)?;
                    *writes += 1;
                    self.backends.insert(identity, (id, value));
                    id
                }
                None => {
                    let id = self.next_backend_id;
                    value.put(maps, id).map_err(|e| {
                        e.context(format!(
                            "backend {}",
                            SocketAddr::new(backend.addr, backend.port)
                        ))
                    })?;
                    *writes += 1;
                    self.next_backend_id += 1;
                    self.backends.insert(identity, (id, value));
                    self.backend_keys.insert(id, identity);
                    // Unreferenced until a frontend programs it.
                    self.maybe_unused.insert(id);
                    id
                }
            };
            ids.push(id);
        }
        Ok(ids)
    }

    /// Writes one frontend: new source ranges first, then (if the backend set
    /// changed) the slots of the next revision, then the service entry that
    /// switches to them, then the cleanup of what the old entry used. Every
    /// step a packet can observe is consistent; a failure undoes what this
    /// call added and leaves the previous programming in force.
    fn program_service(
        &mut self,
        key: ServiceKey,
        spec: &FrontendSpec,
        has_internal: bool,
        ids: Vec<u32>,
        maps: &mut impl TableWriter,
        report: &mut ApplyReport,
    ) -> anyhow::Result<()> {
        let current = self.services.get(&key).cloned();
        let service_id = current
            .as_ref()
            .map_or(self.next_service_id, |c| c.entry.service_id);
        // The ranges of the frontend's family go into its trie. Each family
        // is restricted by its own ranges alone, as kube-proxy filters the
        // list per family: a frontend whose family has none is open (a
        // dual-stack service restricted in one family only).
        let ranges: Vec<SourceRangeEntry> = spec
            .source_ranges
            .iter()
            .filter(|range| range.addr.is_ipv4() == key.is_ipv4())
            .map(|range| SourceRangeEntry {
                service_id,
                addr: range.addr,
                prefix_len: range.prefix_len,
            })
            .collect();
        let mut flags = 0;
        if spec.local_only {
            flags |= FLAG_LOCAL_ONLY;
        }
        if has_internal {
            flags |= FLAG_HAS_INTERNAL;
        }
        if !ranges.is_empty() {
            flags |= FLAG_SOURCE_RANGES;
        }
        let ids_changed = current.as_ref().is_none_or(|c| c.backend_ids != ids);
        let old_table: &[u32] = current.as_ref().map_or(&[], |c| &c.maglev);
        let table = self.plan_maglev(current.as_ref(), (&key, spec), &ids, ids_changed, report);
        if !matches!(table, TablePlan::None) {
            flags |= FLAG_MAGLEV;
        }
        let old_revision = current.as_ref().map_or(0, |c| c.entry.revision);
        let entry = Lb4Service {
            service_id,
            backend_count: ids.len() as u32,
            revision: if ids_changed {
                old_revision.wrapping_add(1)
            } else {
                old_revision
            },
            kind: kind_code(spec.kind),
            flags,
            affinity_timeout: spec.affinity_timeout.unwrap_or(0),
        };
        let old_ranges = current
            .as_ref()
            .map(|c| c.ranges.clone())
            .unwrap_or_default();
        let table_unchanged = match &table {
            TablePlan::Keep => true,
            TablePlan::None => old_table.is_empty(),
            TablePlan::Write(_) => false,
        };
        if current.as_ref().is_some_and(|c| c.entry == entry)
            && old_ranges == ranges
            && table_unchanged
        {
            return Ok(());
        }

        // What this call adds before the switch, undone if it fails.
        let mut added: Vec<Added> = Vec::new();
        for range in ranges.iter().filter(|r| !old_ranges.contains(r)) {
            if let Err(e) = maps.put_source_range(range) {
                undo(&added, maps);
                return Err(e.context("writing a source range"));
            }
            added.push(Added::Range(*range));
            report.writes += 1;
        }
        let old_ids: BTreeSet<u32> = current
            .as_ref()
            .map(|c| c.backend_ids.iter().copied().collect())
            .unwrap_or_default();
        let new_ids: BTreeSet<u32> = ids.iter().copied().collect();
        // Slots first: they are the larger table, so a full map shows there.
        if ids_changed && let Err(e) = write_slots(&entry, &ids, maps, &mut report.writes) {
            undo(&added, maps);
            return Err(e);
        }
        for backend_id in new_ids.difference(&old_ids) {
            let member = Lb4MemberKey {
                service_id,
                backend_id: *backend_id,
            };
            if let Err(e) = maps.put_member(&member) {
                if ids_changed {
                    delete_slot_range(&entry, ids.len() as u32, maps, &mut report.writes);
                }
                undo(&added, maps);
                return Err(e.context("writing a backend membership"));
            }
            added.push(Added::Member(member));
            report.writes += 1;
        }
        // The table after the backends it names, before the entry that
        // turns it on.
        if let TablePlan::Write(new_table) = &table
            && let Err(e) = write_table(service_id, old_table, new_table, maps, &mut report.writes)
        {
            if ids_changed {
                delete_slot_range(&entry, ids.len() as u32, maps, &mut report.writes);
            }
            undo(&added, maps);
            return Err(e);
        }
        let entry_changed = current.as_ref().is_none_or(|c| c.entry != entry);
        if entry_changed && let Err(e) = key.put(maps, &entry) {
            if let TablePlan::Write(new_table) = &table {
                restore_table(service_id, old_table, new_table, maps);
            }
            if ids_changed {
                delete_slot_range(&entry, ids.len() as u32, maps, &mut report.writes);
            }
            undo(&added, maps);
            return Err(e);
        }
        report.writes += usize::from(entry_changed);
        if matches!(table, TablePlan::None) {
            delete_table(service_id, old_table, maps, &mut report.writes);
        }
        // Switched: now what only the old entry used can go.
        if ids_changed && let Some(old) = &current {
            delete_slot_range(
                &old.entry,
                old.backend_ids.len() as u32,
                maps,
                &mut report.writes,
            );
        }
        for backend_id in old_ids.difference(&new_ids) {
            let member = Lb4MemberKey {
                service_id,
                backend_id: *backend_id,
            };
            if maps.delete_member(&member).is_ok() {
                report.writes += 1;
            }
            report.removed_members.push((service_id, *backend_id));
            self.note_removed_udp(&key, *backend_id, report);
        }
        for range in old_ranges.iter().filter(|r| !ranges.contains(r)) {
            if maps.delete_source_range(range).is_ok() {
                report.writes += 1;
            }
        }
        if current.is_none() {
            self.next_service_id += 1;
        }
        self.count_refs(current.as_ref().map_or(&[], |c| &c.backend_ids), &ids);
        let maglev = match table {
            TablePlan::Write(new_table) => new_table,
            TablePlan::Keep => current.map(|c| c.maglev).unwrap_or_default(),
            TablePlan::None => Vec::new(),
        };
        self.services.insert(
            key,
            ProgrammedService {
                entry,
                backend_ids: ids,
                ranges,
                maglev,
                maglev_checked: true,
            },
        );
        Ok(())
    }

    /// What a frontend's Maglev table needs: none (Maglev off, no
    /// backends, or a table that cannot be built, reported as an error and
    /// served at random), the programmed one as it is, or a new one.
    fn plan_maglev(
        &self,
        current: Option<&ProgrammedService>,
        (key, spec): (&ServiceKey, &FrontendSpec),
        ids: &[u32],
        ids_changed: bool,
        report: &mut ApplyReport,
    ) -> TablePlan {
        let Some(table_size) = self.maglev_table_size else {
            return TablePlan::None;
        };
        if ids.is_empty() {
            return TablePlan::None;
        }
        if let Some(c) = current
            && !ids_changed
            && c.maglev_checked
            && c.maglev.len() == table_size as usize
        {
            return TablePlan::Keep;
        }
        // The same order as `ids` (`ensure_backends` keeps the backends of
        // the frontend's family).
        let identities: Vec<BackendIdentity> = spec
            .backends
            .iter()
            .filter(|b| b.addr.is_ipv4() == key.is_ipv4())
            .map(|b| BackendIdentity {
                addr: b.addr,
                port: b.port,
            })
            .collect();
        match maglev::build_table(&identities, table_size) {
            Ok(indices) => {
                let table: Vec<u32> = indices
                    .iter()
                    .map(|&i| ids.get(i as usize).copied().unwrap_or(0))
                    .collect();
                // An adopted table that is already right stays as it is.
                if current.is_some_and(|c| c.maglev == table) {
                    TablePlan::Keep
                } else {
                    TablePlan::Write(table)
                }
            }
            Err(e) => {
                report.errors.push(format!(
                    "{} port {}: {e}; its new flows are balanced at random",
                    spec.service, spec.port_name
                ));
                TablePlan::None
            }
        }
    }

    fn remove_service(
        &mut self,
        key: &ServiceKey,
        maps: &mut impl TableWriter,
        report: &mut ApplyReport,
    ) -> anyhow::Result<()> {
        let Some(current) = self.services.remove(key) else {
            return Ok(());
        };
        // Entry first: after it is gone no packet reaches the rest.
        if let Err(e) = key.delete(maps) {
            self.services.insert(*key, current);
            return Err(e);
        }
        report.writes += 1;
        let entry = current.entry;
        self.count_refs(&current.backend_ids, &[]);
        delete_table(entry.service_id, &current.maglev, maps, &mut report.writes);
        // Inspection only; a name already gone is what we want.
        self.names.remove(&entry.service_id);
        let _ = maps.delete_service_name(entry.service_id);
        delete_slot_range(
            &entry,
            current.backend_ids.len() as u32,
            maps,
            &mut report.writes,
        );
        let ids: BTreeSet<u32> = current.backend_ids.iter().copied().collect();
        for backend_id in ids {
            let member = Lb4MemberKey {
                service_id: entry.service_id,
                backend_id,
            };
            if maps.delete_member(&member).is_ok() {
                report.writes += 1;
            }
            report.removed_members.push((entry.service_id, backend_id));
            self.note_removed_udp(key, backend_id, report);
        }
        for range in &current.ranges {
            if maps.delete_source_range(range).is_ok() {
                report.writes += 1;
            }
        }
        Ok(())
    }

    /// Records a UDP backend leaving a frontend (the backend is still in
    /// the image: unreferenced backends are collected at the end).
    fn note_removed_udp(&self, key: &ServiceKey, backend_id: u32, report: &mut ApplyReport) {
        if key.proto() != lb_common::PROTO_UDP {
            return;
        }
        let backend = self
            .backend_keys
            .get(&backend_id)
            .and_then(|k| self.backends.get(k));
        let removed = match (key, backend) {
            (ServiceKey::V4(key), Some((_, BackendEntry::V4(backend)))) => RemovedUdpBackend {
                frontend: SocketAddr::from((key.addr, key.port)),
                backend: SocketAddr::from((backend.addr, backend.port)),
            },
            (ServiceKey::V6(key), Some((_, BackendEntry::V6(backend)))) => RemovedUdpBackend {
                frontend: SocketAddr::from((key.addr, key.port)),
                backend: SocketAddr::from((backend.addr, backend.port)),
            },
            _ => return,
        };
        report.removed_udp.push(removed);
    }

    /// Keeps one marker entry (port 0, protocol 0) per ClusterIP address,
    /// so the programs can reject connection attempts to ports no service
    /// port defines.
    fn sync_markers(
        &mut self,
        wanted: &BTreeMap<IpAddr, String>,
        maps: &mut impl TableWriter,
        report: &mut ApplyReport,
    ) {
        let marker_key = |addr: IpAddr| match addr {
            IpAddr::V4(addr) => ServiceKey::V4(Lb4ServiceKey {
                addr: addr.octets(),
                port: 0,
                proto: 0,
                scope: SCOPE_EXTERNAL,
            }),
            IpAddr::V6(addr) => ServiceKey::V6(Lb6ServiceKey {
                addr: addr.octets(),
                port: 0,
                proto: 0,
                scope: SCOPE_EXTERNAL,
            }),
        };
        let marker = Lb4Service {
            service_id: 0,
            backend_count: 0,
            revision: 0,
            kind: KIND_CLUSTER_IP,
            flags: FLAG_ADDRESS,
            affinity_timeout: 0,
        };
        let stale: Vec<IpAddr> = self
            .markers
            .iter()
            .filter(|addr| !wanted.contains_key(*addr))
            .copied()
            .collect();
        for addr in &stale {
            if marker_key(*addr).delete(maps).is_ok() {
                report.writes += 1;
            }
            self.markers.remove(addr);
        }
        for (addr, service) in wanted {
            if self.markers.contains(addr) {
                continue;
            }
            match marker_key(*addr).put(maps, &marker) {
                Ok(()) => {
                    report.writes += 1;
                    self.markers.insert(*addr);
                }
                Err(e) => report
                    .errors
                    .push(format!("{service}: marking {addr} as a ClusterIP: {e:#}")),
            }
        }
    }

    /// Writes the Kubernetes name of a programmed frontend's service id when
    /// it is not the one written last (inspection only, see `names`).
    fn sync_service_name(
        &mut self,
        key: &ServiceKey,
        spec: &FrontendSpec,
        maps: &mut impl TableWriter,
    ) -> anyhow::Result<()> {
        let Some(service_id) = self.services.get(key).map(|s| s.entry.service_id) else {
            return Ok(());
        };
        let name = LbServiceName::new(&spec.service.namespace, &spec.service.name, &spec.port_name);
        if self.names.get(&service_id) != Some(&name) {
            maps.put_service_name(service_id, &name)?;
            self.names.insert(service_id, name);
        }
        Ok(())
    }

    /// Moves a frontend's references from the backends of `old` to those
    /// of `new` (each backend counted once per frontend).
    fn count_refs(&mut self, old: &[u32], new: &[u32]) {
        let old: BTreeSet<u32> = old.iter().copied().collect();
        let new: BTreeSet<u32> = new.iter().copied().collect();
        for id in new.difference(&old) {
            *self.backend_refs.entry(*id).or_default() += 1;
        }
        for id in old.difference(&new) {
            if let Some(count) = self.backend_refs.get_mut(id) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.backend_refs.remove(id);
                    self.maybe_unused.insert(*id);
                }
            }
        }
    }

    /// Deletes backends no programmed frontend refers to any more (only
    /// those that lost a reference or were written in this apply).
    fn collect_backends(&mut self, maps: &mut impl TableWriter, report: &mut ApplyReport) {
        let candidates = std::mem::take(&mut self.maybe_unused);
        let unused: Vec<(BackendKey, u32, BackendEntry)> = candidates
            .into_iter()
            .filter(|id| !self.backend_refs.contains_key(id))
            .filter_map(|id| {
                let identity = self.backend_keys.get(&id)?;
                let (_, entry) = self.backends.get(identity)?;
                Some((*identity, id, *entry))
            })
            .collect();
        for (identity, id, entry) in unused {
            match entry.delete(maps, id) {
                Ok(()) => {
                    report.writes += 1;
                    self.backends.remove(&identity);
                    self.backend_keys.remove(&id);
                }
                Err(e) => {
                    report.errors.push(format!("removing backend {id}: {e:#}"));
                    self.maybe_unused.insert(id);
                }
            }
        }
    }
}

/// See [`Programmer::changes`].
#[derive(Default)]
struct Changes<'a> {
    /// Programmed frontends to remove.
    removed: Vec<ServiceKey>,
    /// Frontends of the last apply that `desired` no longer has.
    gone: Vec<Frontend>,
    /// New or changed frontends, in order.
    programmed: Vec<(&'a Frontend, &'a FrontendSpec)>,
    /// Whether the set of ClusterIP addresses may have changed.
    cluster_ips: bool,
}

/// See [`Programmer::plan_maglev`].
enum TablePlan {
    None,
    Keep,
    Write(Vec<u32>),
}

fn chunk_key(service_id: u32, table: &[u32], chunk: u32) -> Lb4MaglevKey {
    Lb4MaglevKey {
        service_id,
        table_size: table.len() as u32,
        chunk,
    }
}

/// Rewrites the chunks of a Maglev table that hold slots where `new`
/// differs from `old` (all of them for a first table). On a failure the
/// chunks already written are put back, so the map holds `old` again.
fn write_table(
    service_id: u32,
    old: &[u32],
    new: &[u32],
    maps: &mut impl TableWriter,
    writes: &mut usize,
) -> anyhow::Result<()> {
    // A table of another size has other keys: nothing to compare with.
    let old = if old.len() == new.len() { old } else { &[] };
    let chunks = maglev::changed_chunks(&maglev::diff(old, new));
    for (done, chunk) in chunks.iter().enumerate() {
        let key = chunk_key(service_id, new, *chunk);
        if let Err(e) = maps.put_maglev_chunk(&key, &maglev::chunk_value(new, *chunk)) {
            for chunk in &chunks[..done] {
                restore_chunk(service_id, old, new, *chunk, maps);
            }
            return Err(e.context(format!("writing Maglev table chunk {chunk}")));
        }
        *writes += 1;
    }
    Ok(())
}

/// Puts `old` back where [`write_table`] wrote `new` (best effort).
fn restore_table(service_id: u32, old: &[u32], new: &[u32], maps: &mut impl TableWriter) {
    let old = if old.len() == new.len() { old } else { &[] };
    for chunk in maglev::changed_chunks(&maglev::diff(old, new)) {
        restore_chunk(service_id, old, new, chunk, maps);
    }
}

fn restore_chunk(
    service_id: u32,
    old: &[u32],
    new: &[u32],
    chunk: u32,
    maps: &mut impl TableWriter,
) {
    let key = chunk_key(service_id, new, chunk);
    let _ = if old.is_empty() {
        maps.delete_maglev_chunk(&key)
    } else {
        maps.put_maglev_chunk(&key, &maglev::chunk_value(old, chunk))
    };
}

/// Deletes every chunk of a programmed table (nothing for an empty one).
fn delete_table(service_id: u32, table: &[u32], maps: &mut impl TableWriter, writes: &mut usize) {
    for chunk in 0..chunk_count(table.len() as u32) {
        // A chunk already gone is what we want.
        if maps
            .delete_maglev_chunk(&chunk_key(service_id, table, chunk))
            .is_ok()
        {
            *writes += 1;
        }
    }
}

/// Something written ahead of a service entry switch.
enum Added {
    Range(SourceRangeEntry),
    Member(Lb4MemberKey),
}

/// Deletes what a failed update added (best effort: it was just written).
fn undo(added: &[Added], maps: &mut impl TableWriter) {
    for item in added.iter().rev() {
        let _ = match item {
            Added::Range(range) => maps.delete_source_range(range),
            Added::Member(member) => maps.delete_member(member),
        };
    }
}

fn write_slots(
    entry: &Lb4Service,
    ids: &[u32],
    maps: &mut impl TableWriter,
    writes: &mut usize,
) -> anyhow::Result<()> {
    for (slot, backend_id) in ids.iter().enumerate() {
        let key = Lb4SlotKey {
            service_id: entry.service_id,
            revision: entry.revision,
            slot: slot as u32,
        };
        if let Err(e) = maps.put_slot(
            &key,
            &Lb4Slot {
                backend_id: *backend_id,
            },
        ) {
            // Leave nothing half-written behind.
            delete_slot_range(entry, slot as u32, maps, writes);
            return Err(e.context(format!("writing slot {slot}")));
        }
        *writes += 1;
    }
    Ok(())
}

fn delete_slot_range(
    entry: &Lb4Service,
    count: u32,
    maps: &mut impl TableWriter,
    writes: &mut usize,
) {
    for slot in 0..count {
        let key = Lb4SlotKey {
            service_id: entry.service_id,
            revision: entry.revision,
            slot,
        };
        // A slot already gone is what we want; nothing to report.
        if maps.delete_slot(&key).is_ok() {
            *writes += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::{Backend, Frontend, Protocol, ServiceRef};

    /// In-memory maps that check, after every single write, that no service
    /// entry points at a missing slot or a missing backend: what a packet
    /// arriving between two writes would see.
    #[derive(Clone, Default)]
    struct CheckedMaps {
        services: BTreeMap<Lb4ServiceKey, Lb4Service>,
        services6: BTreeMap<Lb6ServiceKey, Lb4Service>,
        slots: BTreeMap<Lb4SlotKey, Lb4Slot>,
        backends: BTreeMap<u32, Lb4Backend>,
        backends6: BTreeMap<u32, Lb6Backend>,
        ranges: BTreeSet<SourceRangeEntry>,
        members: BTreeSet<Lb4MemberKey>,
        maglev: BTreeMap<Lb4MaglevKey, Lb4MaglevChunk>,
        /// After this many more chunk writes, one write fails (map full).
        fail_chunk_write_after: Option<usize>,
        maglev_writes: usize,
        capacity_slots: usize,
        ops: usize,
        /// The next service entry write kills the agent: the maps as it
        /// left them are kept in `at_kill` (every later write of the dying
        /// apply, its undo included, never happened).
        kill_before_service_put: bool,
        at_kill: Option<Box<CheckedMaps>>,
    }

    impl CheckedMaps {
        fn check(&self) {
            let v4 = self.services.iter().map(|(k, s)| (ServiceKey::V4(*k), s));
            let v6 = self.services6.iter().map(|(k, s)| (ServiceKey::V6(*k), s));
            for (key, svc) in v4.chain(v6) {
                // A slot's backend id is read in its service's family's map.
                let backend_exists = |id: &u32| match key {
                    ServiceKey::V4(_) => self.backends.contains_key(id),
                    ServiceKey::V6(_) => self.backends6.contains_key(id),
                };
                for slot in 0..svc.backend_count {
                    let k = Lb4SlotKey {
                        service_id: svc.service_id,
                        revision: svc.revision,
                        slot,
                    };
                    let s = self.slots.get(&k).unwrap_or_else(|| {
                        panic!(
                            "after op {}: {key:?} points at missing slot {k:?}",
                            self.ops
                        )
                    });
                    let member = Lb4MemberKey {
                        service_id: svc.service_id,
                        backend_id: s.backend_id,
                    };
                    assert!(
                        self.members.contains(&member),
                        "after op {}: backend {} of {key:?} is not a member",
                        self.ops,
                        s.backend_id
                    );
                    let s = self.slots.get(&k).unwrap_or_else(|| {
                        panic!(
                            "after op {}: {key:?} points at missing slot {k:?}",
                            self.ops
                        )
                    });
                    assert!(
                        backend_exists(&s.backend_id),
                        "after op {}: slot {k:?} points at missing backend {}",
                        self.ops,
                        s.backend_id
                    );
                }
                // Every slot of a Maglev entry's tables names a live
                // backend (a missing chunk falls back to random: harmless
                // while a table of a new size is being written).
                if svc.flags & FLAG_MAGLEV != 0 {
                    let dangling = self
                        .maglev
                        .iter()
                        .filter(|(k, _)| k.service_id == svc.service_id)
                        .flat_map(|(_, chunk)| chunk.backend_ids)
                        .find(|id| *id != 0 && !backend_exists(id));
                    assert_eq!(
                        dangling, None,
                        "after op {}: {key:?}'s Maglev table names a missing backend",
                        self.ops
                    );
                }
                // A restricted service with no allowed range would drop
                // every client.
                if svc.flags & FLAG_SOURCE_RANGES != 0 {
                    assert!(
                        self.ranges.iter().any(|r| r.service_id == svc.service_id),
                        "after op {}: {key:?} is restricted but has no range",
                        self.ops
                    );
                }
            }
        }
        /// The Maglev table of M slots of a service id, empty when a chunk
        /// is missing.
        fn table_of(&self, service_id: u32, m: u32) -> Vec<u32> {
            let mut table = Vec::with_capacity(m as usize);
            for chunk in 0..chunk_count(m) {
                let key = Lb4MaglevKey {
                    service_id,
                    table_size: m,
                    chunk,
                };
                let Some(value) = self.maglev.get(&key) else {
                    return Vec::new();
                };
                table.extend_from_slice(&value.backend_ids);
            }
            table.truncate(m as usize);
            table
        }
        /// The frontends of both families, as `Programmer::adopt` takes them.
        fn all_services(&self) -> Vec<(ServiceKey, Lb4Service)> {
            let v4 = self.services.iter().map(|(k, v)| (ServiceKey::V4(*k), *v));
            let v6 = self.services6.iter().map(|(k, v)| (ServiceKey::V6(*k), *v));
            v4.chain(v6).collect()
        }
        /// The backends of both families, as `Programmer::adopt` takes them.
        fn all_backends(&self) -> Vec<(u32, BackendEntry)> {
            let v4 = self
                .backends
                .iter()
                .map(|(id, b)| (*id, BackendEntry::V4(*b)));
            let v6 = self
                .backends6
                .iter()
                .map(|(id, b)| (*id, BackendEntry::V6(*b)));
            v4.chain(v6).collect()
        }
        /// Counts a write and checks what a packet would see now.
        fn wrote(&mut self) -> anyhow::Result<()> {
            self.ops += 1;
            self.check();
            Ok(())
        }
        fn backends_of(&self, key: &Lb4ServiceKey) -> Vec<Lb4Backend> {
            let svc = self.services[key];
            (0..svc.backend_count)
                .map(|slot| {
                    let k = Lb4SlotKey {
                        service_id: svc.service_id,
                        revision: svc.revision,
                        slot,
                    };
                    self.backends[&self.slots[&k].backend_id]
                })
                .collect()
        }
    }

    impl TableWriter for CheckedMaps {
        fn put_member(&mut self, key: &Lb4MemberKey) -> anyhow::Result<()> {
            self.members.insert(*key);
            self.wrote()
        }
        fn delete_member(&mut self, key: &Lb4MemberKey) -> anyhow::Result<()> {
            self.members.remove(key);
            self.wrote()
        }
        fn put_source_range(&mut self, range: &SourceRangeEntry) -> anyhow::Result<()> {
            self.ranges.insert(*range);
            self.wrote()
        }
        fn delete_source_range(&mut self, range: &SourceRangeEntry) -> anyhow::Result<()> {
            self.ranges.remove(range);
            self.wrote()
        }
        fn put_maglev_chunk(
            &mut self,
            key: &Lb4MaglevKey,
            value: &Lb4MaglevChunk,
        ) -> anyhow::Result<()> {
            match self.fail_chunk_write_after {
                Some(0) => {
                    self.fail_chunk_write_after = None;
                    anyhow::bail!("map LB4_MAGLEV_V1 is full");
                }
                Some(n) => self.fail_chunk_write_after = Some(n - 1),
                None => {}
            }
            self.maglev.insert(*key, *value);
            self.maglev_writes += 1;
            self.wrote()
        }
        fn delete_maglev_chunk(&mut self, key: &Lb4MaglevKey) -> anyhow::Result<()> {
            self.maglev.remove(key);
            self.wrote()
        }
        fn put_service(&mut self, key: &Lb4ServiceKey, value: &Lb4Service) -> anyhow::Result<()> {
            if self.kill_before_service_put {
                self.kill_before_service_put = false;
                self.at_kill = Some(Box::new(self.clone()));
                anyhow::bail!("killed");
            }
            self.services.insert(*key, *value);
            self.wrote()
        }
        fn delete_service(&mut self, key: &Lb4ServiceKey) -> anyhow::Result<()> {
            self.services.remove(key);
            self.wrote()
        }
        fn put_slot(&mut self, key: &Lb4SlotKey, value: &Lb4Slot) -> anyhow::Result<()> {
            if self.capacity_slots != 0
                && self.slots.len() >= self.capacity_slots
                && !self.slots.contains_key(key)
            {
                anyhow::bail!("map full");
            }
            self.slots.insert(*key, *value);
            self.wrote()
        }
        fn delete_slot(&mut self, key: &Lb4SlotKey) -> anyhow::Result<()> {
            self.slots
                .remove(key)
                .ok_or_else(|| anyhow::anyhow!("no such slot"))?;
            self.wrote()
        }
        fn put_backend(&mut self, id: u32, value: &Lb4Backend) -> anyhow::Result<()> {
            self.backends.insert(id, *value);
            self.wrote()
        }
        fn delete_backend(&mut self, id: u32) -> anyhow::Result<()> {
            self.backends.remove(&id);
            self.wrote()
        }
        fn put_service6(&mut self, key: &Lb6ServiceKey, value: &Lb4Service) -> anyhow::Result<()> {
            self.services6.insert(*key, *value);
            self.wrote()
        }
        fn delete_service6(&mut self, key: &Lb6ServiceKey) -> anyhow::Result<()> {
            self.services6.remove(key);
            self.wrote()
        }
        fn put_backend6(&mut self, id: u32, value: &Lb6Backend) -> anyhow::Result<()> {
            self.backends6.insert(id, *value);
            self.wrote()
        }
        fn delete_backend6(&mut self, id: u32) -> anyhow::Result<()> {
            self.backends6.remove(&id);
            self.wrote()
        }
    }

    fn frontend(last: u8, port: u16) -> Frontend {
        Frontend::new(
            IpAddr::V4(Ipv4Addr::new(10, 96, 0, last)),
            port,
            Protocol::Tcp,
        )
    }

    fn spec(name: &str, pods: &[u8]) -> FrontendSpec {
        FrontendSpec {
            service: ServiceRef {
                namespace: "default".into(),
                name: name.into(),
            },
            port_name: "http".into(),
            kind: FrontendKind::ClusterIp,
            backends: pods
                .iter()
                .map(|p| Backend {
                    addr: IpAddr::V4(Ipv4Addr::new(10, 244, 1, *p)),
                    port: 8080,
                    node_local: true,
                    terminating: false,
                    pod: None,
                })
                .collect(),
            affinity_timeout: None,
            local_only: false,
            source_ranges: Vec::new(),
        }
    }

    fn tables(entries: &[(Frontend, FrontendSpec)]) -> DesiredTables {
        DesiredTables {
            frontends: entries.iter().cloned().collect(),
            ..DesiredTables::default()
        }
    }

    fn key(last: u8, port: u16) -> Lb4ServiceKey {
        Lb4ServiceKey {
            addr: [10, 96, 0, last],
            port,
            proto: 6,
            scope: SCOPE_EXTERNAL,
        }
    }

    fn addrs(backends: &[Lb4Backend]) -> Vec<u8> {
        backends.iter().map(|b| b.addr[3]).collect()
    }

    #[test]
    fn programs_then_switches_then_removes_without_a_half_written_state() {
        let mut maps = CheckedMaps::default();
        let mut prog = Programmer::default();

        let r = prog.apply(
            &tables(&[(frontend(10, 80), spec("web", &[11, 12, 13]))]),
            &mut maps,
        );
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(addrs(&maps.backends_of(&key(10, 80))), vec![11, 12, 13]);
        let first_rev = maps.services[&key(10, 80)].revision;

        // Same input again: nothing is written.
        let r = prog.apply(
            &tables(&[(frontend(10, 80), spec("web", &[11, 12, 13]))]),
            &mut maps,
        );
        assert_eq!(r.writes, 0, "an unchanged apply wrote to the maps");

        // Scale down: new revision, old slots gone, removed backend deleted.
        let r = prog.apply(
            &tables(&[(frontend(10, 80), spec("web", &[11, 12]))]),
            &mut maps,
        );
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        let svc = maps.services[&key(10, 80)];
        assert_eq!(svc.revision, first_rev + 1);
        assert_eq!(addrs(&maps.backends_of(&key(10, 80))), vec![11, 12]);
        assert_eq!(
            maps.slots.len(),
            2,
            "old revision's slots left behind: {:?}",
            maps.slots
        );
        assert_eq!(
            maps.backends.len(),
            2,
            "unreferenced backend kept: {:?}",
            maps.backends
        );
        assert_eq!(r.removed_members.len(), 1, "{:?}", r.removed_members);
        assert_eq!(maps.members.len(), 2, "stale membership kept");
        // The ClusterIP address has its marker (port 0, protocol 0).
        let marker = Lb4ServiceKey {
            port: 0,
            proto: 0,
            ..key(10, 80)
        };
        assert_eq!(maps.services[&marker].flags, FLAG_ADDRESS);

        // Service gone: everything gone.
        prog.apply(&tables(&[]), &mut maps);
        assert!(maps.services.is_empty() && maps.slots.is_empty() && maps.backends.is_empty());
        assert!(
            maps.members.is_empty(),
            "memberships left: {:?}",
            maps.members
        );
    }

    #[test]
    fn backends_shared_between_frontends_keep_one_id() {
        let mut maps = CheckedMaps::default();
        let mut prog = Programmer::default();
        prog.apply(
            &tables(&[
                (frontend(10, 80), spec("a", &[11, 12])),
                (frontend(20, 80), spec("b", &[12])),
            ]),
            &mut maps,
        );
        assert_eq!(maps.backends.len(), 2);
        prog.apply(&tables(&[(frontend(20, 80), spec("b", &[12]))]), &mut maps);
        assert_eq!(addrs(&maps.backends_of(&key(20, 80))), vec![12]);
        assert_eq!(maps.backends.len(), 1);
    }

    #[test]
    fn a_full_map_fails_one_service_and_keeps_the_others() {
        let mut maps = CheckedMaps {
            capacity_slots: 3,
            ..Default::default()
        };
        let mut prog = Programmer::default();
        let r = prog.apply(
            &tables(&[
                (frontend(10, 80), spec("a", &[11, 12])),
                (frontend(20, 80), spec("b", &[13, 14])),
            ]),
            &mut maps,
        );
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        assert!(
            r.errors[0].contains("default/b"),
            "error does not name the service: {}",
            r.errors[0]
        );
        assert_eq!(addrs(&maps.backends_of(&key(10, 80))), vec![11, 12]);
        assert!(!maps.services.contains_key(&key(20, 80)));
        assert_eq!(
            maps.slots.len(),
            2,
            "half-written slots left: {:?}",
            maps.slots
        );
    }

    #[test]
    fn adopting_pinned_maps_rewrites_nothing_that_is_unchanged() {
        let mut maps = CheckedMaps::default();
        let desired = tables(&[(frontend(10, 80), spec("web", &[11, 12, 13]))]);
        Programmer::default().apply(&desired, &mut maps);

        let (mut adopted, stale) = Programmer::adopt(
            maps.all_services(),
            &maps.slots.clone(),
            maps.all_backends(),
            maps.ranges.clone(),
        );
        assert!(stale.is_empty());
        let r = adopted.apply(&desired, &mut maps);
        assert_eq!(r.writes, 0, "restart rewrote unchanged entries");

        // And ids continue after the adopted ones.
        let r = adopted.apply(
            &tables(&[(frontend(10, 80), spec("web", &[11, 14]))]),
            &mut maps,
        );
        assert!(r.errors.is_empty());
        let ids: BTreeSet<u32> = maps.backends.keys().copied().collect();
        assert_eq!(ids.len(), 2);
        assert!(
            ids.contains(&4),
            "new backend did not get a fresh id: {ids:?}"
        );
    }

    /// An agent killed between writing a new revision's slots (and Maglev
    /// chunks) and switching the service entry; the next agent adopts the
    /// maps, applies the same desired state and cleans up what it found
    /// stale. `check` runs after every write, so a live slot deleted by the
    /// clean-up fails right there.
    #[test]
    fn a_restart_after_a_kill_before_the_switch_never_deletes_live_slots() {
        let web = || (frontend(10, 80), spec("web", &[11, 12, 13]));
        // A changed backend set (new revision of an adopted service), and a
        // new service (its id and first revision handed out again).
        let scenarios = [
            ("changed", vec![(frontend(10, 80), spec("web", &[11, 14]))]),
            ("new", vec![web(), (frontend(20, 80), spec("api", &[15]))]),
        ];
        for maglev_size in [None, Some(M)] {
            for (scenario, after) in &scenarios {
                let at = format!("{scenario} service, Maglev {maglev_size:?}");
                let mut maps = CheckedMaps::default();
                let mut prog = Programmer::default().with_maglev(maglev_size);
                let r = prog.apply(&tables(&[web()]), &mut maps);
                assert!(r.errors.is_empty(), "{:?}", r.errors);

                let after = tables(after);
                maps.kill_before_service_put = true;
                prog.apply(&after, &mut maps);
                let mut maps = *maps
                    .at_kill
                    .take()
                    .expect("the apply reached a service write");
                let (adopted, stale) = Programmer::adopt(
                    maps.all_services(),
                    &maps.slots.clone(),
                    maps.all_backends(),
                    maps.ranges.clone(),
                );
                let mut adopted = adopted.with_maglev(maglev_size);
                let stale_chunks = adopted.adopt_maglev(maps.maglev.clone());
                assert!(!stale.is_empty(), "{at}: the kill left no slots behind");
                if *scenario == "new" && maglev_size.is_some() {
                    assert!(!stale_chunks.is_empty(), "{at}: the kill left no chunks");
                }

                let r = adopted.apply(&after, &mut maps);
                assert!(r.errors.is_empty(), "{at}: {:?}", r.errors);
                let errors = adopted.delete_slots(&stale, &mut maps);
                assert!(errors.is_empty(), "{at}: {errors:?}");
                let errors = adopted.delete_maglev_chunks(&stale_chunks, &mut maps);
                assert!(errors.is_empty(), "{at}: {errors:?}");

                maps.check();
                for (frontend, spec) in &after.frontends {
                    let IpAddr::V4(addr) = frontend.addr else {
                        unreachable!("IPv4 frontends only")
                    };
                    let k = key(addr.octets()[3], frontend.port);
                    let want: Vec<u8> = spec
                        .backends
                        .iter()
                        .map(|b| match b.addr {
                            IpAddr::V4(a) => a.octets()[3],
                            IpAddr::V6(_) => 0,
                        })
                        .collect();
                    assert_eq!(addrs(&maps.backends_of(&k)), want, "{at}");
                    if let Some(m) = maglev_size {
                        let id = maps.services[&k].service_id;
                        assert!(
                            !maps.table_of(id, m).is_empty(),
                            "{at}: {k:?}'s Maglev table lost chunks to the clean-up"
                        );
                    }
                }
                // Only the live revisions' slots are left.
                let live: u32 = maps.services.values().map(|s| s.backend_count).sum();
                assert_eq!(maps.slots.len(), live as usize, "{at}: {:?}", maps.slots);
            }
        }
    }

    #[test]
    fn source_ranges_are_written_before_the_flag_and_removed_after_it() {
        use crate::model::SourceRange;
        let mut maps = CheckedMaps::default();
        let mut prog = Programmer::default();
        let mut lb = spec("lb", &[11]);
        lb.kind = FrontendKind::LoadBalancer;
        lb.source_ranges = vec![SourceRange {
            addr: "198.51.100.0".parse().expect("addr"),
            prefix_len: 24,
        }];
        let r = prog.apply(&tables(&[(frontend(10, 80), lb.clone())]), &mut maps);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        let svc = maps.services[&key(10, 80)];
        assert_ne!(svc.flags & FLAG_SOURCE_RANGES, 0);
        assert_eq!(maps.ranges.len(), 1);

        // Swap the range: the new one is in before the old one goes.
        lb.source_ranges[0].addr = "203.0.113.0".parse().expect("addr");
        prog.apply(&tables(&[(frontend(10, 80), lb.clone())]), &mut maps);
        assert_eq!(maps.ranges.len(), 1);
        assert_eq!(
            maps.ranges.iter().next().map(|r| r.addr),
            Some("203.0.113.0".parse().expect("addr"))
        );

        // Open the service again: flag off first, then the range goes.
        lb.source_ranges.clear();
        prog.apply(&tables(&[(frontend(10, 80), lb)]), &mut maps);
        assert_eq!(maps.services[&key(10, 80)].flags & FLAG_SOURCE_RANGES, 0);
        assert!(maps.ranges.is_empty());
    }

    #[test]
    fn an_internal_entry_sets_the_flag_on_its_external_twin() {
        let mut maps = CheckedMaps::default();
        let mut prog = Programmer::default();
        let mut local = spec("np", &[11]);
        local.kind = FrontendKind::NodePort;
        local.local_only = true;
        let mut all = spec("np", &[11, 12]);
        all.kind = FrontendKind::NodePort;
        let internal = Frontend {
            scope: Scope::Internal,
            ..frontend(10, 30080)
        };
        prog.apply(
            &tables(&[(frontend(10, 30080), local), (internal, all)]),
            &mut maps,
        );
        let external = maps.services[&key(10, 30080)];
        assert_eq!(
            external.flags & (FLAG_LOCAL_ONLY | FLAG_HAS_INTERNAL),
            FLAG_LOCAL_ONLY | FLAG_HAS_INTERNAL
        );
        let internal_key = Lb4ServiceKey {
            scope: SCOPE_INTERNAL,
            ..key(10, 30080)
        };
        assert_eq!(addrs(&maps.backends_of(&internal_key)), vec![11, 12]);
        assert_eq!(addrs(&maps.backends_of(&key(10, 30080))), vec![11]);
    }

    const M: u32 = 16381;

    /// The programmed table of a frontend as backend addresses' last octet.
    fn table_addrs(maps: &CheckedMaps, key: &Lb4ServiceKey) -> Vec<u8> {
        let svc = maps.services[key];
        let table = maps.table_of(svc.service_id, M);
        assert_eq!(table.len(), M as usize, "{key:?}: incomplete Maglev table");
        table.iter().map(|id| maps.backends[id].addr[3]).collect()
    }

    #[test]
    fn maglev_tables_are_written_before_the_entry_and_go_with_it() {
        let mut maps = CheckedMaps::default();
        let mut prog = Programmer::default().with_maglev(Some(M));
        let r = prog.apply(
            &tables(&[(frontend(10, 80), spec("web", &[11, 12, 13]))]),
            &mut maps,
        );
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        let svc = maps.services[&key(10, 80)];
        assert_ne!(svc.flags & FLAG_MAGLEV, 0);
        assert_eq!(maps.maglev.len(), chunk_count(M) as usize);
        let table = table_addrs(&maps, &key(10, 80));
        assert_eq!(table.len(), M as usize);
        for pod in [11, 12, 13] {
            let share = table.iter().filter(|&&a| a == pod).count();
            assert!(share > M as usize / 4, "pod {pod} has {share} of {M} slots");
        }

        // No endpoints: the flag goes (then the table), random selection
        // reports the empty service as before.
        prog.apply(&tables(&[(frontend(10, 80), spec("web", &[]))]), &mut maps);
        assert_eq!(maps.services[&key(10, 80)].flags & FLAG_MAGLEV, 0);
        assert!(maps.maglev.is_empty(), "table of an empty service kept");

        prog.apply(
            &tables(&[(frontend(10, 80), spec("web", &[11, 12]))]),
            &mut maps,
        );
        assert_eq!(maps.maglev.len(), chunk_count(M) as usize);
        prog.apply(&tables(&[]), &mut maps);
        assert!(maps.maglev.is_empty(), "table of a removed service kept");
    }

    #[test]
    fn maglev_rewrites_only_the_chunks_that_changed() {
        let pods: Vec<u8> = (11..111).collect();
        let mut maps = CheckedMaps::default();
        let mut prog = Programmer::default().with_maglev(Some(M));
        prog.apply(
            &tables(&[(frontend(10, 80), spec("web", &pods))]),
            &mut maps,
        );
        let before = table_addrs(&maps, &key(10, 80));
        let writes_before = maps.maglev_writes;

        // One of 100 backends goes.
        let r = prog.apply(
            &tables(&[(frontend(10, 80), spec("web", &pods[1..]))]),
            &mut maps,
        );
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        let after = table_addrs(&maps, &key(10, 80));
        let rewritten = maps.maglev_writes - writes_before;
        let moved: Vec<usize> = (0..M as usize).filter(|&s| before[s] != after[s]).collect();
        let chunks: BTreeSet<usize> = moved.iter().map(|s| s / 64).collect();
        assert!(!after.contains(&11), "the removed backend kept slots");
        assert_eq!(
            rewritten,
            chunks.len(),
            "wrote {rewritten} chunks for {} changed ones",
            chunks.len()
        );
        assert!(rewritten < chunk_count(M) as usize);
        println!(
            "{} of {M} slots moved, {rewritten} of {} chunks rewritten",
            moved.len(),
            chunk_count(M)
        );
        // The table equals one built from scratch for the new set.
        let mut fresh_maps = CheckedMaps::default();
        Programmer::default().with_maglev(Some(M)).apply(
            &tables(&[(frontend(10, 80), spec("web", &pods[1..]))]),
            &mut fresh_maps,
        );
        assert_eq!(table_addrs(&fresh_maps, &key(10, 80)), after);
    }

    #[test]
    fn maglev_tables_agree_between_agents_whatever_their_ids() {
        // Agent one saw another service first, so its backend ids differ,
        // and its EndpointSlice lists the pods in another order.
        let mut one = CheckedMaps::default();
        let mut prog_one = Programmer::default().with_maglev(Some(M));
        prog_one.apply(
            &tables(&[
                (frontend(10, 80), spec("web", &[13, 11, 12, 14])),
                (frontend(20, 80), spec("other", &[40, 41])),
            ]),
            &mut one,
        );
        let mut two = CheckedMaps::default();
        let mut prog_two = Programmer::default().with_maglev(Some(M));
        prog_two.apply(
            &tables(&[(frontend(20, 80), spec("other", &[41, 40]))]),
            &mut two,
        );
        prog_two.apply(
            &tables(&[
                (frontend(20, 80), spec("other", &[41, 40])),
                (frontend(10, 80), spec("web", &[11, 12, 13, 14])),
            ]),
            &mut two,
        );
        assert_ne!(
            one.services[&key(10, 80)].service_id,
            two.services[&key(10, 80)].service_id,
            "the test wants different ids on the two agents"
        );
        assert_eq!(
            table_addrs(&one, &key(10, 80)),
            table_addrs(&two, &key(10, 80))
        );
    }

    #[test]
    fn a_restarted_agent_adopts_maglev_tables_and_drops_other_sizes() {
        let desired = tables(&[(frontend(10, 80), spec("web", &[11, 12, 13]))]);
        let mut maps = CheckedMaps::default();
        Programmer::default()
            .with_maglev(Some(M))
            .apply(&desired, &mut maps);
        let adopt = |maps: &CheckedMaps, m: Option<u32>| {
            let (prog, stale) = Programmer::adopt(
                maps.all_services(),
                &maps.slots.clone(),
                maps.all_backends(),
                maps.ranges.clone(),
            );
            assert!(stale.is_empty());
            let mut prog = prog.with_maglev(m);
            let stale = prog.adopt_maglev(maps.maglev.clone());
            (prog, stale)
        };

        // Same size: nothing to rewrite.
        let (mut prog, stale) = adopt(&maps, Some(M));
        assert!(stale.is_empty(), "{stale:?}");
        let r = prog.apply(&desired, &mut maps);
        assert_eq!(r.writes, 0, "restart rewrote an unchanged table");

        // A damaged chunk is found and mended by the first apply.
        let first = Lb4MaglevKey {
            service_id: maps.services[&key(10, 80)].service_id,
            table_size: M,
            chunk: 0,
        };
        let good = maps.maglev[&first];
        maps.maglev.insert(first, Lb4MaglevChunk::default());
        let (mut prog, _) = adopt(&maps, Some(M));
        let r = prog.apply(&desired, &mut maps);
        assert_eq!(r.writes, 1, "expected one chunk rewritten");
        assert_eq!(maps.maglev[&first], good);

        // Another size: a new table, the old one is stale.
        let (mut prog, stale) = adopt(&maps, Some(4093));
        assert_eq!(stale.len(), chunk_count(M) as usize);
        prog.apply(&desired, &mut maps);
        assert_eq!(
            prog.delete_maglev_chunks(&stale, &mut maps),
            Vec::<String>::new()
        );
        assert!(maps.maglev.keys().all(|k| k.table_size == 4093));
        assert_eq!(maps.maglev.len(), chunk_count(4093) as usize);

        // Maglev off: the flag goes, every chunk is stale.
        let (mut prog, stale) = adopt(&maps, None);
        assert_eq!(stale.len(), chunk_count(4093) as usize);
        prog.apply(&desired, &mut maps);
        assert_eq!(maps.services[&key(10, 80)].flags & FLAG_MAGLEV, 0);
        prog.delete_maglev_chunks(&stale, &mut maps);
        assert!(maps.maglev.is_empty());
    }

    #[test]
    fn a_failed_maglev_write_fails_the_service_and_keeps_its_old_table() {
        let mut maps = CheckedMaps {
            fail_chunk_write_after: Some(chunk_count(M) as usize + 10),
            ..Default::default()
        };
        let mut prog = Programmer::default().with_maglev(Some(M));
        let r = prog.apply(
            &tables(&[
                (frontend(10, 80), spec("a", &[11, 12])),
                (frontend(20, 80), spec("b", &[13, 14])),
            ]),
            &mut maps,
        );
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        assert!(r.errors[0].contains("default/b"), "{}", r.errors[0]);
        assert!(r.errors[0].contains("LB4_MAGLEV_V1"), "{}", r.errors[0]);
        // b is not programmed and left no chunk behind; a is whole.
        assert!(!maps.services.contains_key(&key(20, 80)));
        assert_eq!(maps.maglev.len(), chunk_count(M) as usize);
        let old = table_addrs(&maps, &key(10, 80));
        let old_entry = maps.services[&key(10, 80)];

        // An in-place update that fails half-way puts the old chunks back
        // and leaves the entry as it was.
        maps.fail_chunk_write_after = Some(3);
        let pods: Vec<u8> = (11..60).collect();
        let r = prog.apply(&tables(&[(frontend(10, 80), spec("a", &pods))]), &mut maps);
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        assert_eq!(table_addrs(&maps, &key(10, 80)), old);
        assert_eq!(maps.services[&key(10, 80)], old_entry);

        // The next apply gets it through.
        let r = prog.apply(&tables(&[(frontend(10, 80), spec("a", &pods))]), &mut maps);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        let new = table_addrs(&maps, &key(10, 80));
        assert_eq!(new.iter().collect::<BTreeSet<_>>().len(), pods.len());
    }

    #[test]
    fn a_service_with_more_backends_than_slots_is_balanced_at_random() {
        let mut maps = CheckedMaps::default();
        let mut prog = Programmer::default().with_maglev(Some(7));
        let r = prog.apply(
            &tables(&[
                (
                    frontend(10, 80),
                    spec("big", &(11..21).collect::<Vec<u8>>()),
                ),
                (frontend(20, 80), spec("small", &[11, 12])),
            ]),
            &mut maps,
        );
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        assert!(r.errors[0].contains("default/big"), "{}", r.errors[0]);
        assert_eq!(maps.services[&key(10, 80)].flags & FLAG_MAGLEV, 0);
        assert_eq!(maps.services[&key(10, 80)].backend_count, 10);
        assert_ne!(maps.services[&key(20, 80)].flags & FLAG_MAGLEV, 0);
    }

    /// What a packet can observe of the maps: per frontend its flags and
    /// backends, the address markers, the backend set.
    fn observable(maps: &CheckedMaps) -> Vec<String> {
        let mut out: Vec<String> = maps
            .services
            .iter()
            .map(|(key, svc)| {
                let mut backends: Vec<Lb4Backend> = if svc.flags & FLAG_ADDRESS != 0 {
                    Vec::new()
                } else {
                    maps.backends_of(key)
                };
                backends.sort_by_key(|b| (b.addr, b.port));
                format!(
                    "{key:?} flags={} kind={} affinity={} {:?}",
                    svc.flags, svc.kind, svc.affinity_timeout, backends
                )
            })
            .collect();
        let mut backends: Vec<String> = maps.backends.values().map(|b| format!("{b:?}")).collect();
        backends.sort();
        out.extend(backends);
        out
    }

    #[test]
    fn incremental_applies_end_where_a_fresh_apply_of_the_same_tables_ends() {
        // A deterministic walk through adds, removals, endpoint changes,
        // internal twins appearing and going, and kind changes.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut desired = DesiredTables::default();
        let mut maps = CheckedMaps::default();
        let mut prog = Programmer::default();
        for step in 0..300 {
            let last = 10 + next(20) as u8;
            let port = 80 + next(2) as u16;
            let external = frontend(last, port);
            match next(6) {
                0 => {
                    desired.frontends.remove(&external);
                }
                1 => {
                    let internal = Frontend {
                        scope: Scope::Internal,
                        ..external.clone()
                    };
                    if desired.frontends.remove(&internal).is_none() {
                        let mut all = spec("twin", &[11, 12, 13]);
                        all.kind = FrontendKind::NodePort;
                        desired.frontends.insert(internal, all);
                    }
                }
                2 => {
                    if let Some(s) = desired.frontends.get_mut(&external) {
                        s.kind = if s.kind == FrontendKind::ClusterIp {
                            FrontendKind::NodePort
                        } else {
                            FrontendKind::ClusterIp
                        };
                    }
                }
                _ => {
                    let pods: Vec<u8> = (0..next(4)).map(|_| 11 + next(8) as u8).collect();
                    desired
                        .frontends
                        .insert(external, spec(&format!("s{last}"), &pods));
                }
            }
            let r = prog.apply(&desired, &mut maps);
            assert!(r.errors.is_empty(), "step {step}: {:?}", r.errors);
            let mut fresh = CheckedMaps::default();
            Programmer::default().apply(&desired, &mut fresh);
            assert_eq!(observable(&maps), observable(&fresh), "step {step}");
        }
    }

    #[test]
    fn one_endpoint_change_among_many_writes_only_that_frontend() {
        let mut desired = DesiredTables::default();
        for i in 0..200u16 {
            desired.frontends.insert(
                frontend((i % 250) as u8, 1000 + i),
                spec(&format!("s{i}"), &[11, 12, 13]),
            );
        }
        let mut maps = CheckedMaps::default();
        let mut prog = Programmer::default();
        prog.apply(&desired, &mut maps);
        let ops = maps.ops;
        if let Some(s) = desired.frontends.get_mut(&frontend(7, 1007)) {
            s.backends[0].addr = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 99));
        }
        let r = prog.apply(&desired, &mut maps);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        // New backend, its membership, 3 slots of the new revision, the
        // entry, 3 old slots, the old membership: 10 writes.
        assert_eq!(r.writes, 10, "one change rewrote more than its frontend");
        assert_eq!(maps.ops - ops, 10);
    }

    #[test]
    fn a_frontend_that_failed_is_retried_and_removed_like_any_other() {
        let mut maps = CheckedMaps {
            capacity_slots: 3,
            ..Default::default()
        };
        let mut prog = Programmer::default();
        let both = tables(&[
            (frontend(10, 80), spec("a", &[11, 12])),
            (frontend(20, 80), spec("b", &[13, 14])),
        ]);
        assert_eq!(prog.apply(&both, &mut maps).errors.len(), 1);
        // Same tables, still no room: still an error (retried, not skipped).
        assert_eq!(prog.apply(&both, &mut maps).errors.len(), 1);
        // Room: the unchanged frontend is programmed now.
        maps.capacity_slots = 0;
        assert!(prog.apply(&both, &mut maps).errors.is_empty());
        assert_eq!(addrs(&maps.backends_of(&key(20, 80))), vec![13, 14]);
        // Gone from the tables: gone from the maps.
        prog.apply(
            &tables(&[(frontend(10, 80), spec("a", &[11, 12]))]),
            &mut maps,
        );
        assert!(!maps.services.contains_key(&key(20, 80)));
        assert_eq!(maps.backends.len(), 2, "{:?}", maps.backends);
    }

    #[test]
    fn a_restarted_agent_removes_what_vanished_while_it_was_down() {
        let mut maps = CheckedMaps::default();
        Programmer::default().apply(
            &tables(&[
                (frontend(10, 80), spec("a", &[11])),
                (frontend(20, 80), spec("b", &[12])),
            ]),
            &mut maps,
        );
        let (mut adopted, _) = Programmer::adopt(
            maps.all_services(),
            &maps.slots.clone(),
            maps.all_backends(),
            maps.ranges.clone(),
        );
        adopted.apply(&tables(&[(frontend(10, 80), spec("a", &[11]))]), &mut maps);
        assert!(!maps.services.contains_key(&key(20, 80)));
        assert_eq!(maps.backends.len(), 1, "{:?}", maps.backends);
        let marker = Lb4ServiceKey {
            port: 0,
            proto: 0,
            ..key(20, 80)
        };
        assert!(
            !maps.services.contains_key(&marker),
            "stale ClusterIP marker"
        );
    }

    fn frontend6(last: u16, port: u16) -> Frontend {
        Frontend::new(
            IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, last)),
            port,
            Protocol::Tcp,
        )
    }

    /// [`spec`] with IPv6 pods fd00:244::<pod>.
    fn spec6(name: &str, pods: &[u16]) -> FrontendSpec {
        let mut spec = spec(name, &[]);
        spec.backends = pods
            .iter()
            .map(|p| Backend {
                addr: IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, *p)),
                port: 8080,
                node_local: true,
                terminating: false,
                pod: None,
            })
            .collect();
        spec
    }

    fn key6(last: u16, port: u16) -> Lb6ServiceKey {
        Lb6ServiceKey {
            addr: std::net::Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, last).octets(),
            port,
            proto: 6,
            scope: SCOPE_EXTERNAL,
        }
    }

    #[test]
    fn a_dual_stack_service_gets_one_entry_per_family_with_ids_from_one_space() {
        let mut maps = CheckedMaps::default();
        let mut prog = Programmer::default();
        let desired = tables(&[
            (frontend(10, 80), spec("web", &[11, 12])),
            (frontend6(10, 80), spec6("web", &[11, 12, 13])),
        ]);
        let report = prog.apply(&desired, &mut maps);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.frontends, 2);
        assert_eq!(report.backends, 5);
        let v4 = maps.services[&key(10, 80)];
        let v6 = maps.services6[&key6(10, 80)];
        assert_ne!(v4.service_id, v6.service_id, "service ids are one space");
        assert_eq!(v6.backend_count, 3);
        assert_eq!(maps.backends.len(), 2);
        assert_eq!(maps.backends6.len(), 3);
        assert!(
            maps.backends
                .keys()
                .all(|id| !maps.backends6.contains_key(id)),
            "backend ids are one space"
        );
        // The IPv6 slots live in the shared slot map and name IPv6 backends.
        let mut pods: Vec<u8> = (0..v6.backend_count)
            .map(|slot| {
                let k = Lb4SlotKey {
                    service_id: v6.service_id,
                    revision: v6.revision,
                    slot,
                };
                maps.backends6[&maps.slots[&k].backend_id].addr[15]
            })
            .collect();
        pods.sort_unstable();
        assert_eq!(pods, vec![11, 12, 13]);
        // Both ClusterIPs are marked, so unknown ports are rejected.
        let marker6 = maps.services6[&Lb6ServiceKey {
            proto: 0,
            ..key6(10, 0)
        }];
        assert_ne!(marker6.flags & FLAG_ADDRESS, 0, "no IPv6 ClusterIP marker");
        assert!(
            maps.services
                .keys()
                .any(|k| k.port == 0 && k.addr == [10, 96, 0, 10])
        );
    }

    #[test]
    fn an_ipv6_frontend_changes_and_goes_like_an_ipv4_one() {
        let mut maps = CheckedMaps::default();
        let mut prog = Programmer::default();
        prog.apply(
            &tables(&[(frontend6(10, 80), spec6("web", &[11, 12]))]),
            &mut maps,
        );
        let before = maps.services6[&key6(10, 80)];
        let report = prog.apply(
            &tables(&[(frontend6(10, 80), spec6("web", &[12, 13]))]),
            &mut maps,
        );
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let after = maps.services6[&key6(10, 80)];
        assert_eq!(after.service_id, before.service_id);
        assert_eq!(after.revision, before.revision.wrapping_add(1));
        let addrs: BTreeSet<u8> = maps.backends6.values().map(|b| b.addr[15]).collect();
        assert_eq!(addrs, BTreeSet::from([12, 13]), "pod 11 is collected");
        // A restart adopts both families and writes nothing.
        let (mut adopted, stale) = Programmer::adopt(
            maps.all_services(),
            &maps.slots.clone(),
            maps.all_backends(),
            maps.ranges.clone(),
        );
        assert!(stale.is_empty(), "IPv6 slots are live: {stale:?}");
        let report = adopted.apply(
            &tables(&[(frontend6(10, 80), spec6("web", &[12, 13]))]),
            &mut maps,
        );
        assert_eq!(report.writes, 0, "adopted IPv6 state rewritten");
        let report = adopted.apply(&tables(&[]), &mut maps);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(maps.services6.is_empty());
        assert!(maps.backends6.is_empty());
        assert!(maps.slots.is_empty());
        assert!(maps.members.is_empty());
    }

    #[test]
    fn each_familys_source_ranges_restrict_its_frontend_alone() {
        let mut maps = CheckedMaps::default();
        let mut prog = Programmer::default();
        let range = |addr: &str, prefix_len| crate::model::SourceRange {
            addr: addr.parse().expect("addr"),
            prefix_len,
        };
        let mut restricted = spec6("lb", &[11]);
        restricted.kind = FrontendKind::LoadBalancer;
        restricted.source_ranges = vec![range("2001:db8::", 32), range("198.51.100.0", 24)];
        let mut v4_only = spec6("lb4", &[11]);
        v4_only.kind = FrontendKind::LoadBalancer;
        v4_only.source_ranges = vec![range("198.51.100.0", 24)];
        let mut v6_only = spec("lb6", &[11]);
        v6_only.kind = FrontendKind::LoadBalancer;
        v6_only.source_ranges = vec![range("2001:db8::", 32)];
        let report = prog.apply(
            &tables(&[
                (frontend6(20, 443), restricted),
                (frontend6(21, 443), v4_only),
                (frontend(22, 443), v6_only),
            ]),
            &mut maps,
        );
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let entry = maps.services6[&key6(20, 443)];
        assert_ne!(entry.flags & FLAG_SOURCE_RANGES, 0);
        let written: Vec<_> = maps.ranges.iter().collect();
        assert_eq!(written.len(), 1, "only the IPv6 range: {written:?}");
        assert_eq!(written[0].service_id, entry.service_id);
        assert_eq!(
            written[0].addr,
            "2001:db8::".parse::<IpAddr>().expect("addr")
        );
        assert_eq!(written[0].prefix_len, 32);
        // A family without ranges is open, in both directions alike.
        let other = maps.services6[&key6(21, 443)];
        assert_eq!(
            other.flags & FLAG_SOURCE_RANGES,
            0,
            "IPv4-only ranges restricted an IPv6 frontend"
        );
        let other = maps.services[&key(22, 443)];
        assert_eq!(
            other.flags & FLAG_SOURCE_RANGES,
            0,
            "IPv6-only ranges restricted an IPv4 frontend"
        );
    }
}
