//! Typed handles on the pinned maps, for the agent (writes) and for readers
//! such as `lbctl` and the tests (reads of a running datapath).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{
        Array, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap,
        lpm_trie::{Key, LpmTrie},
    },
};
use lb_common::{
    PROTO_UDP,
    affinity::{self, Lb4Affinity, Lb4AffinityKey, Lb6AffinityKey},
    backend::{self, Lb4Backend, Lb6Backend},
    config::{self, Lb6Config, LbConfig},
    conntrack::{self, Lb4CtEntry, Lb4CtKey, Lb6CtEntry, Lb6CtKey},
    maglev::{self, Lb4MaglevChunk, Lb4MaglevKey},
    member::{self, Lb4Member, Lb4MemberKey},
    reject_limit::{self, LbRejectLimit},
    service::{self, Lb4Service, Lb4ServiceKey, Lb6ServiceKey},
    slot::{self, Lb4Slot, Lb4SlotKey},
    sock::{self, Lb4SockKey, Lb4SockRevnat, Lb6SockKey, Lb6SockRevnat},
    source_range::{self, Lb4SourceRange, Lb4SourceRangeKey, Lb6SourceRangeKey, SERVICE_ID_BITS},
    stats::{self, Counter, Reason},
};
// Inspection maps (lbctl): names and per-service counters.
use lb_common::{
    backend_stats::{self, LbBackendStats},
    service_name::{self, LbServiceName},
    service_stats::{self, LbServiceStats},
};

use super::programmer::{
    BackendEntry, RemovedUdpBackend, ServiceKey, SourceRangeEntry, TableWriter,
};

/// `BPF_NOEXIST`: an update that only creates.
const BPF_NOEXIST: u64 = 1;

/// The keys of a socket reverse map whose (backend, frontend), as `peers`
/// reads them from an entry, is one of `removed`.
fn doomed_sockets<'a, K: aya::Pod, V: aya::Pod>(
    map: &'a HashMap<MapData, K, V>,
    removed: &'a [RemovedUdpBackend],
    peers: impl Fn(&K, &V) -> (SocketAddr, SocketAddr) + 'a,
) -> impl Iterator<Item = K> + 'a {
    map.iter()
        .filter_map(Result::ok)
        .filter_map(move |(key, value)| {
            let (backend, frontend) = peers(&key, &value);
            removed
                .iter()
                .any(|r| r.backend == backend && r.frontend == frontend)
                .then_some(key)
        })
}

/// A socket-level reverse-map key of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockRevnatKey {
    V4(Lb4SockKey),
    V6(Lb6SockKey),
}

impl SockRevnatKey {
    /// The translated socket's cookie.
    pub fn cookie(&self) -> u64 {
        match self {
            SockRevnatKey::V4(k) => k.cookie,
            SockRevnatKey::V6(k) => k.cookie,
        }
    }

    /// The backend the socket was given.
    pub fn backend(&self) -> SocketAddr {
        match self {
            SockRevnatKey::V4(k) => SocketAddr::from((k.addr, k.port)),
            SockRevnatKey::V6(k) => SocketAddr::from((k.addr, k.port)),
        }
    }
}

/// The service, slot, backend and conntrack maps, plus the stats.
pub struct KernelTables {
    pub services: HashMap<MapData, Lb4ServiceKey, Lb4Service>,
    pub slots: HashMap<MapData, Lb4SlotKey, Lb4Slot>,
    pub backends: HashMap<MapData, u32, Lb4Backend>,
    pub conntrack: HashMap<MapData, Lb4CtKey, Lb4CtEntry>,
    /// IPv6 frontends, backends and conntrack (slots and memberships are
    /// shared with IPv4).
    pub services6: HashMap<MapData, Lb6ServiceKey, Lb4Service>,
    pub backends6: HashMap<MapData, u32, Lb6Backend>,
    pub conntrack6: HashMap<MapData, Lb6CtKey, Lb6CtEntry>,
    pub source_ranges: LpmTrie<MapData, Lb4SourceRangeKey, Lb4SourceRange>,
    pub source_ranges6: LpmTrie<MapData, Lb6SourceRangeKey, Lb4SourceRange>,
    pub config: Array<MapData, LbConfig>,
    /// The node's IPv6 address (SNAT source).
    pub config6: Array<MapData, Lb6Config>,
    /// The per-CPU rate limit of ICMP rejects (zeros: the defaults).
    pub reject_limit: Array<MapData, LbRejectLimit>,
    pub affinity: HashMap<MapData, Lb4AffinityKey, Lb4Affinity>,
    pub affinity6: HashMap<MapData, Lb6AffinityKey, Lb4Affinity>,
    pub members: HashMap<MapData, Lb4MemberKey, Lb4Member>,
    /// Socket-level balancing: (cookie, backend) -> service address.
    pub sock_revnat: HashMap<MapData, Lb4SockKey, Lb4SockRevnat>,
    /// The same for IPv6 sockets.
    pub sock_revnat6: HashMap<MapData, Lb6SockKey, Lb6SockRevnat>,
    /// Maglev tables, (service id, M, chunk) -> 64 slots.
    pub maglev: HashMap<MapData, Lb4MaglevKey, Lb4MaglevChunk>,
    pub stats: StatsReader,
    /// Service id -> Kubernetes namespace/name/port (written, never read, by the programs' side).
    pub service_names: HashMap<MapData, u32, LbServiceName>,
    /// Per-CPU counters per service id.
    pub service_stats: PerCpuHashMap<MapData, u32, LbServiceStats>,
    /// New flows and attempt outcomes per (service, backend).
    pub backend_stats: HashMap<MapData, Lb4MemberKey, LbBackendStats>,
    /// Inserts refused because the map was full, by map name, since the
    /// last [`KernelTables::take_map_full`] (`lb_map_full_total`).
    full: BTreeMap<&'static str, u64>,
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the object (taken twice?)"))
}

fn open_pinned(dir: &Path, name: &str) -> anyhow::Result<Map> {
    let path = dir.join(name);
    if !path.exists() {
        return Err(anyhow!(
            "no pinned map {} (is the agent running with --bpffs {}?)",
            path.display(),
            dir.display()
        ));
    }
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("reading {}", path.display()))
}

impl KernelTables {
    pub(super) fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Self::from_maps(|name| take_map(ebpf, name))
    }

    /// Opens the maps pinned under `dir` by a running (or stopped) agent.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        Self::from_maps(|name| open_pinned(dir, name))
    }

    fn from_maps(mut get: impl FnMut(&str) -> anyhow::Result<Map>) -> anyhow::Result<Self> {
        // A map whose key or value size differs from ours is another layout
        // version: try_from checks the sizes and says so.
        let layout = |name: &str| format!("map {name} does not have this agent's layout");
        Ok(Self {
            services: HashMap::try_from(get(service::NAME)?)
                .with_context(|| layout(service::NAME))?,
            slots: HashMap::try_from(get(slot::NAME)?).with_context(|| layout(slot::NAME))?,
            backends: HashMap::try_from(get(backend::NAME)?)
                .with_context(|| layout(backend::NAME))?,
            conntrack: HashMap::try_from(get(conntrack::NAME)?)
                .with_context(|| layout(conntrack::NAME))?,
            services6: HashMap::try_from(get(service::NAME6)?)
                .with_context(|| layout(service::NAME6))?,
            backends6: HashMap::try_from(get(backend::NAME6)?)
                .with_context(|| layout(backend::NAME6))?,
            conntrack6: HashMap::try_from(get(conntrack::NAME6)?)
                .with_context(|| layout(conntrack::NAME6))?,
            source_ranges: LpmTrie::try_from(get(source_range::NAME)?)
                .with_context(|| layout(source_range::NAME))?,
            source_ranges6: LpmTrie::try_from(get(source_range::NAME6)?)
                .with_context(|| layout(source_range::NAME6))?,
            config: Array::try_from(get(config::NAME)?).with_context(|| layout(config::NAME))?,
            config6: Array::try_from(get(config::NAME6)?).with_context(|| layout(config::NAME6))?,
            reject_limit: Array::try_from(get(reject_limit::NAME)?)
                .with_context(|| layout(reject_limit::NAME))?,
            affinity: HashMap::try_from(get(affinity::NAME)?)
                .with_context(|| layout(affinity::NAME))?,
            affinity6: HashMap::try_from(get(affinity::NAME6)?)
                .with_context(|| layout(affinity::NAME6))?,
            members: HashMap::try_from(get(member::NAME)?).with_context(|| layout(member::NAME))?,
            maglev: HashMap::try_from(get(maglev::NAME)?).with_context(|| layout(maglev::NAME))?,
            sock_revnat: HashMap::try_from(get(sock::NAME)?).with_context(|| layout(sock::NAME))?,
            sock_revnat6: HashMap::try_from(get(sock::NAME6)?)
                .with_context(|| layout(sock::NAME6))?,
            stats: StatsReader(
                PerCpuArray::try_from(get(stats::NAME)?).with_context(|| layout(stats::NAME))?,
            ),
            service_names: HashMap::try_from(get(service_name::NAME)?)
                .with_context(|| layout(service_name::NAME))?,
            service_stats: PerCpuHashMap::try_from(get(service_stats::NAME)?)
                .with_context(|| layout(service_stats::NAME))?,
            backend_stats: HashMap::try_from(get(backend_stats::NAME)?)
                .with_context(|| layout(backend_stats::NAME))?,
            full: BTreeMap::new(),
        })
    }

    /// Inserts refused since the last call because the map was full, by
    /// map name.
    pub fn take_map_full(&mut self) -> BTreeMap<&'static str, u64> {
        std::mem::take(&mut self.full)
    }

    /// An insert's result; a full map (E2BIG from hash maps, ENOSPC from
    /// the LPM trie) is counted and named.
    fn inserted(
        &mut self,
        map: &'static str,
        result: Result<(), aya::maps::MapError>,
    ) -> anyhow::Result<()> {
        let Err(error) = result else {
            return Ok(());
        };
        let full = matches!(
            &error,
            aya::maps::MapError::SyscallError(e)
                if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC))
        );
        if full {
            *self.full.entry(map).or_insert(0) += 1;
            return Err(anyhow!(error).context(format!("map {map} is full")));
        }
        Err(error.into())
    }

    /// Every frontend entry.
    pub fn dump_services(&self) -> anyhow::Result<Vec<(Lb4ServiceKey, Lb4Service)>> {
        Ok(self.services.iter().collect::<Result<_, _>>()?)
    }

    /// Every IPv6 frontend entry.
    pub fn dump_services6(&self) -> anyhow::Result<Vec<(Lb6ServiceKey, Lb4Service)>> {
        Ok(self.services6.iter().collect::<Result<_, _>>()?)
    }

    /// Every frontend entry of both families, as the programmer adopts them.
    pub fn dump_all_services(&self) -> anyhow::Result<Vec<(ServiceKey, Lb4Service)>> {
        let v4 = self.dump_services()?.into_iter();
        let v6 = self.dump_services6()?.into_iter();
        Ok(v4
            .map(|(k, v)| (ServiceKey::V4(k), v))
            .chain(v6.map(|(k, v)| (ServiceKey::V6(k), v)))
            .collect())
    }

    /// Every slot entry.
    pub fn dump_slots(&self) -> anyhow::Result<BTreeMap<Lb4SlotKey, Lb4Slot>> {
        Ok(self.slots.iter().collect::<Result<_, _>>()?)
    }

    /// Every backend entry.
    pub fn dump_backends(&self) -> anyhow::Result<BTreeMap<u32, Lb4Backend>> {
        Ok(self.backends.iter().collect::<Result<_, _>>()?)
    }

    /// Every IPv6 backend entry.
    pub fn dump_backends6(&self) -> anyhow::Result<BTreeMap<u32, Lb6Backend>> {
        Ok(self.backends6.iter().collect::<Result<_, _>>()?)
    }

    /// Every backend entry of both families, as the programmer adopts them.
    pub fn dump_all_backends(&self) -> anyhow::Result<Vec<(u32, BackendEntry)>> {
        let v4 = self.dump_backends()?.into_iter();
        let v6 = self.dump_backends6()?.into_iter();
        Ok(v4
            .map(|(id, b)| (id, BackendEntry::V4(b)))
            .chain(v6.map(|(id, b)| (id, BackendEntry::V6(b))))
            .collect())
    }

    /// Every source-range entry of both tries.
    pub fn dump_source_ranges(&self) -> anyhow::Result<Vec<SourceRangeEntry>> {
        // The two key types share their field names.
        macro_rules! entries {
            ($trie:expr) => {
                $trie.iter().map(|entry| {
                    let (key, _) = entry?;
                    let data = key.data();
                    Ok(SourceRangeEntry {
                        service_id: u32::from_be_bytes(data.service_id_be),
                        addr: IpAddr::from(data.addr),
                        prefix_len: key.prefix_len().saturating_sub(SERVICE_ID_BITS) as u8,
                    })
                })
            };
        }
        entries!(self.source_ranges)
            .chain(entries!(self.source_ranges6))
            .collect()
    }

    /// The node-wide settings.
    pub fn config(&self) -> anyhow::Result<LbConfig> {
        Ok(self.config.get(&0, 0)?)
    }

    /// Writes the node-wide settings.
    pub fn set_config(&mut self, value: &LbConfig) -> anyhow::Result<()> {
        Ok(self.config.set(0, value, 0)?)
    }

    /// The node-wide IPv6 settings.
    pub fn config6(&self) -> anyhow::Result<Lb6Config> {
        Ok(self.config6.get(&0, 0)?)
    }

    /// Writes the node-wide IPv6 settings.
    pub fn set_config6(&mut self, value: &Lb6Config) -> anyhow::Result<()> {
        Ok(self.config6.set(0, value, 0)?)
    }

    /// The reject rate limit (zeros: the defaults of
    /// `lb_common::reject_limit`).
    pub fn reject_limit(&self) -> anyhow::Result<LbRejectLimit> {
        Ok(self.reject_limit.get(&0, 0)?)
    }

    /// Writes the reject rate limit every CPU's bucket follows.
    pub fn set_reject_limit(&mut self, value: &LbRejectLimit) -> anyhow::Result<()> {
        Ok(self.reject_limit.set(0, value, 0)?)
    }

    /// Removes the UDP conntrack entries (both directions) of flows that
    /// `removed` (service id, backend id) pairs carried, so a client that
    /// keeps sending from the same port is balanced afresh to a live
    /// backend (kube-proxy flushes UDP conntrack the same way). TCP flows
    /// are left to finish. Both families' tables. Returns how many entries
    /// went.
    pub fn flush_udp_conntrack(&mut self, removed: &[(u32, u32)]) -> anyhow::Result<usize> {
        if removed.is_empty() {
            return Ok(0);
        }
        // The two families' tables hold entries with the same field names.
        macro_rules! flush {
            ($map:expr) => {{
                let doomed: Vec<_> = $map
                    .iter()
                    .filter_map(Result::ok)
                    .filter(|(key, entry)| {
                        key.proto == PROTO_UDP
                            && removed.contains(&(entry.service_id, entry.backend_id))
                    })
                    .map(|(key, _)| key)
                    .collect();
                // An entry the LRU evicted meanwhile is already gone.
                doomed.iter().filter(|key| $map.remove(key).is_ok()).count()
            }};
        }
        let flushed = flush!(self.conntrack) + flush!(self.conntrack6);
        Ok(flushed)
    }

    /// Every Maglev table chunk.
    pub fn dump_maglev(&self) -> anyhow::Result<BTreeMap<Lb4MaglevKey, Lb4MaglevChunk>> {
        Ok(self.maglev.iter().collect::<Result<_, _>>()?)
    }

    /// One frontend's Maglev table of `table_size` slots, a backend id per
    /// slot (0 where a chunk is missing); `None` when it has no chunk.
    pub fn maglev_table(&self, service_id: u32, table_size: u32) -> Option<Vec<u32>> {
        let mut table = vec![0u32; table_size as usize];
        let mut found = false;
        for chunk in 0..maglev::chunk_count(table_size) {
            let key = Lb4MaglevKey {
                service_id,
                table_size,
                chunk,
            };
            let Ok(value) = self.maglev.get(&key, 0) else {
                continue;
            };
            found = true;
            let start = (chunk * maglev::CHUNK_SLOTS) as usize;
            let end = (start + maglev::CHUNK_SLOTS as usize).min(table.len());
            table[start..end].copy_from_slice(&value.backend_ids[..end - start]);
        }
        found.then_some(table)
    }

    /// The sockets socket-level balancing connected to a UDP backend that
    /// has left the frontend they asked for, as reverse-map keys (socket
    /// cookie, backend address and port) of either family.
    pub fn sockets_of_removed(&self, removed: &[RemovedUdpBackend]) -> Vec<SockRevnatKey> {
        if removed.is_empty() {
            return Vec::new();
        }
        let v4 = doomed_sockets(&self.sock_revnat, removed, |k, v| {
            ((k.addr, k.port).into(), (v.addr, v.port).into())
        });
        let v6 = doomed_sockets(&self.sock_revnat6, removed, |k, v| {
            ((k.addr, k.port).into(), (v.addr, v.port).into())
        });
        v4.map(SockRevnatKey::V4)
            .chain(v6.map(SockRevnatKey::V6))
            .collect()
    }

    /// Removes a socket-level reverse entry (its socket is gone).
    pub fn remove_sock_revnat(&mut self, key: &SockRevnatKey) -> anyhow::Result<()> {
        match key {
            SockRevnatKey::V4(key) => self.sock_revnat.remove(key)?,
            SockRevnatKey::V6(key) => self.sock_revnat6.remove(key)?,
        }
        Ok(())
    }

    /// Every session-affinity entry.
    pub fn dump_affinity(&self) -> anyhow::Result<Vec<(Lb4AffinityKey, Lb4Affinity)>> {
        Ok(self.affinity.iter().collect::<Result<_, _>>()?)
    }

    /// Every IPv6 session-affinity entry.
    pub fn dump_affinity6(&self) -> anyhow::Result<Vec<(Lb6AffinityKey, Lb4Affinity)>> {
        Ok(self.affinity6.iter().collect::<Result<_, _>>()?)
    }

    /// Every service id's Kubernetes name.
    pub fn dump_service_names(&self) -> anyhow::Result<BTreeMap<u32, LbServiceName>> {
        Ok(self.service_names.iter().collect::<Result<_, _>>()?)
    }

    /// Every service's counters, summed over CPUs.
    pub fn dump_service_stats(&self) -> anyhow::Result<BTreeMap<u32, LbServiceStats>> {
        self.service_stats
            .iter()
            .map(|entry| {
                let (id, per_cpu) = entry?;
                let sum = per_cpu
                    .iter()
                    .fold(LbServiceStats::default(), |acc, s| acc.add(s));
                Ok((id, sum))
            })
            .collect()
    }

    /// Every (service, backend)'s counters.
    pub fn dump_backend_stats(&self) -> anyhow::Result<BTreeMap<Lb4MemberKey, LbBackendStats>> {
        Ok(self.backend_stats.iter().collect::<Result<_, _>>()?)
    }

    /// Makes the counter entry of every membership that has none (maps
    /// pinned by an agent that had no such map, or a membership whose
    /// entry could not be made): the programs only count into existing
    /// entries. Returns how many were made.
    pub fn backfill_backend_stats(&mut self) -> anyhow::Result<usize> {
        let members: Vec<Lb4MemberKey> = self.members.keys().collect::<Result<_, _>>()?;
        let mut made = 0;
        for key in members {
            if self
                .backend_stats
                .insert(key, LbBackendStats::default(), BPF_NOEXIST)
                .is_ok()
            {
                made += 1;
            }
        }
        Ok(made)
    }

    /// Every conntrack entry (both directions).
    pub fn dump_conntrack(&self) -> anyhow::Result<Vec<(Lb4CtKey, Lb4CtEntry)>> {
        Ok(self.conntrack.iter().collect::<Result<_, _>>()?)
    }

    /// Every IPv6 conntrack entry (both directions).
    pub fn dump_conntrack6(&self) -> anyhow::Result<Vec<(Lb6CtKey, Lb6CtEntry)>> {
        Ok(self.conntrack6.iter().collect::<Result<_, _>>()?)
    }
}

impl TableWriter for KernelTables {
    fn put_service(&mut self, key: &Lb4ServiceKey, value: &Lb4Service) -> anyhow::Result<()> {
        let result = self.services.insert(key, value, 0);
        self.inserted(service::NAME, result)
    }
    fn delete_service(&mut self, key: &Lb4ServiceKey) -> anyhow::Result<()> {
        Ok(self.services.remove(key)?)
    }
    fn put_service6(&mut self, key: &Lb6ServiceKey, value: &Lb4Service) -> anyhow::Result<()> {
        let result = self.services6.insert(key, value, 0);
        self.inserted(service::NAME6, result)
    }
    fn delete_service6(&mut self, key: &Lb6ServiceKey) -> anyhow::Result<()> {
        Ok(self.services6.remove(key)?)
    }
    fn put_backend6(&mut self, id: u32, value: &Lb6Backend) -> anyhow::Result<()> {
        let result = self.backends6.insert(id, value, 0);
        self.inserted(backend::NAME6, result)
    }
    fn delete_backend6(&mut self, id: u32) -> anyhow::Result<()> {
        Ok(self.backends6.remove(&id)?)
    }
    fn put_slot(&mut self, key: &Lb4SlotKey, value: &Lb4Slot) -> anyhow::Result<()> {
        let result = self.slots.insert(key, value, 0);
        self.inserted(slot::NAME, result)
    }
    fn delete_slot(&mut self, key: &Lb4SlotKey) -> anyhow::Result<()> {
        Ok(self.slots.remove(key)?)
    }
    fn put_backend(&mut self, id: u32, value: &Lb4Backend) -> anyhow::Result<()> {
        let result = self.backends.insert(id, value, 0);
        self.inserted(backend::NAME, result)
    }
    fn delete_backend(&mut self, id: u32) -> anyhow::Result<()> {
        Ok(self.backends.remove(&id)?)
    }
    fn put_member(&mut self, key: &Lb4MemberKey) -> anyhow::Result<()> {
        // A new membership starts with fresh counters (ids may be handed
        // out again after an agent restart); the programs count into them.
        if self.members.get(key, 0).is_err() {
            // Not fatal: the service works without its counters (a full
            // map is counted; the entry is made again at the next start).
            let result = self.backend_stats.insert(key, LbBackendStats::default(), 0);
            let _ = self.inserted(backend_stats::NAME, result);
        }
        let result = self.members.insert(key, Lb4Member { present: 1 }, 0);
        self.inserted(member::NAME, result)
    }
    fn delete_member(&mut self, key: &Lb4MemberKey) -> anyhow::Result<()> {
        // The counters go with the membership; missing ones are fine.
        let _ = self.backend_stats.remove(key);
        Ok(self.members.remove(key)?)
    }
    fn put_service_name(&mut self, service_id: u32, name: &LbServiceName) -> anyhow::Result<()> {
        // A fresh id (no name yet) starts with fresh counters: after an
        // agent restart an id may be handed out again.
        if self.service_names.get(&service_id, 0).is_err() {
            let _ = self.service_stats.remove(&service_id);
        }
        Ok(self.service_names.insert(service_id, name, 0)?)
    }
    fn delete_service_name(&mut self, service_id: u32) -> anyhow::Result<()> {
        // The counters go with the frontend; missing ones are fine.
        let _ = self.service_stats.remove(&service_id);
        Ok(self.service_names.remove(&service_id)?)
    }
    fn put_source_range(&mut self, range: &SourceRangeEntry) -> anyhow::Result<()> {
        let allow = Lb4SourceRange { allow: 1 };
        match trie_key(range) {
            TrieKey::V4(key) => {
                let result = self.source_ranges.insert(&key, allow, 0);
                self.inserted(source_range::NAME, result)
            }
            TrieKey::V6(key) => {
                let result = self.source_ranges6.insert(&key, allow, 0);
                self.inserted(source_range::NAME6, result)
            }
        }
    }
    fn delete_source_range(&mut self, range: &SourceRangeEntry) -> anyhow::Result<()> {
        match trie_key(range) {
            TrieKey::V4(key) => Ok(self.source_ranges.remove(&key)?),
            TrieKey::V6(key) => Ok(self.source_ranges6.remove(&key)?),
        }
    }
    fn put_maglev_chunk(
        &mut self,
        key: &Lb4MaglevKey,
        value: &Lb4MaglevChunk,
    ) -> anyhow::Result<()> {
        let result = self.maglev.insert(key, value, 0);
        self.inserted(maglev::NAME, result)
    }
    fn delete_maglev_chunk(&mut self, key: &Lb4MaglevKey) -> anyhow::Result<()> {
        Ok(self.maglev.remove(key)?)
    }
}

/// A source range's key in its family's trie.
enum TrieKey {
    V4(Key<Lb4SourceRangeKey>),
    V6(Key<Lb6SourceRangeKey>),
}

fn trie_key(range: &SourceRangeEntry) -> TrieKey {
    let bits = SERVICE_ID_BITS + u32::from(range.prefix_len);
    let service_id_be = range.service_id.to_be_bytes();
    match range.addr {
        IpAddr::V4(addr) => TrieKey::V4(Key::new(
            bits,
            Lb4SourceRangeKey {
                service_id_be,
                addr: addr.octets(),
            },
        )),
        IpAddr::V6(addr) => TrieKey::V6(Key::new(
            bits,
            Lb6SourceRangeKey {
                service_id_be,
                addr: addr.octets(),
            },
        )),
    }
}

/// Reads the per-CPU counters, summed over CPUs.
pub struct StatsReader(PerCpuArray<MapData, Counter>);

impl StatsReader {
    /// Opens the stats map pinned under `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        Ok(Self(PerCpuArray::try_from(open_pinned(dir, stats::NAME)?)?))
    }

    /// One counter, summed over CPUs.
    pub fn get(&self, reason: Reason) -> anyhow::Result<Counter> {
        let per_cpu = self.0.get(&(reason as u32), 0)?;
        Ok(per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        }))
    }

    /// Map inserts the agent could not make because a map was full, over
    /// the datapath's lifetime ([`lb_common::stats::AGENT_MAP_FULL`]).
    pub fn agent_map_full(&self) -> anyhow::Result<u64> {
        self.agent_count(lb_common::stats::AGENT_MAP_FULL)
    }

    /// Adds `count` refused inserts to [`Self::agent_map_full`].
    pub fn add_agent_map_full(&mut self, count: u64) -> anyhow::Result<()> {
        self.add_agent_count(lb_common::stats::AGENT_MAP_FULL, count)
    }

    /// Sockets the agent destroyed because their socket-level backend left
    /// the service ([`lb_common::stats::AGENT_SOCK_DESTROYED`]).
    pub fn agent_sock_destroyed(&self) -> anyhow::Result<u64> {
        self.agent_count(lb_common::stats::AGENT_SOCK_DESTROYED)
    }

    /// Adds `count` to [`Self::agent_sock_destroyed`].
    pub fn add_agent_sock_destroyed(&mut self, count: u64) -> anyhow::Result<()> {
        self.add_agent_count(lb_common::stats::AGENT_SOCK_DESTROYED, count)
    }

    fn agent_count(&self, index: u32) -> anyhow::Result<u64> {
        let per_cpu = self.0.get(&index, 0)?;
        Ok(per_cpu.iter().map(|c| c.packets).sum())
    }

    fn add_agent_count(&mut self, index: u32, count: u64) -> anyhow::Result<()> {
        let mut per_cpu: Vec<Counter> = self.0.get(&index, 0)?.iter().copied().collect();
        if let Some(first) = per_cpu.first_mut() {
            first.packets += count;
        }
        let values = aya::maps::PerCpuValues::try_from(per_cpu)?;
        Ok(self.0.set(index, values, 0)?)
    }

    /// Every known reason with its summed counter.
    pub fn all(&self) -> anyhow::Result<Vec<(Reason, Counter)>> {
        Reason::ALL
            .iter()
            .map(|r| Ok((*r, self.get(*r)?)))
            .collect()
    }
}
