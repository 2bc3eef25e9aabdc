//! Typed handles on the pinned maps, for the agent (writes) and for readers
//! such as `lbctl` and the tests (reads of a running datapath).

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData, PerCpuArray},
};
use lb_common::{
    backend::{self, Lb4Backend},
    conntrack::{self, Lb4CtEntry, Lb4CtKey},
    service::{self, Lb4Service, Lb4ServiceKey},
    slot::{self, Lb4Slot, Lb4SlotKey},
    stats::{self, Counter, Reason},
};

use super::programmer::TableWriter;

/// The service, slot, backend and conntrack maps, plus the stats.
pub struct KernelTables {
    pub services: HashMap<MapData, Lb4ServiceKey, Lb4Service>,
    pub slots: HashMap<MapData, Lb4SlotKey, Lb4Slot>,
    pub backends: HashMap<MapData, u32, Lb4Backend>,
    pub conntrack: HashMap<MapData, Lb4CtKey, Lb4CtEntry>,
    pub stats: StatsReader,
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
            stats: StatsReader(
                PerCpuArray::try_from(get(stats::NAME)?).with_context(|| layout(stats::NAME))?,
            ),
        })
    }

    /// Every frontend entry.
    pub fn dump_services(&self) -> anyhow::Result<Vec<(Lb4ServiceKey, Lb4Service)>> {
        Ok(self.services.iter().collect::<Result<_, _>>()?)
    }

    /// Every slot entry.
    pub fn dump_slots(&self) -> anyhow::Result<BTreeMap<Lb4SlotKey, Lb4Slot>> {
        Ok(self.slots.iter().collect::<Result<_, _>>()?)
    }

    /// Every backend entry.
    pub fn dump_backends(&self) -> anyhow::Result<BTreeMap<u32, Lb4Backend>> {
        Ok(self.backends.iter().collect::<Result<_, _>>()?)
    }

    /// Every conntrack entry (both directions).
    pub fn dump_conntrack(&self) -> anyhow::Result<Vec<(Lb4CtKey, Lb4CtEntry)>> {
        Ok(self.conntrack.iter().collect::<Result<_, _>>()?)
    }
}

impl TableWriter for KernelTables {
    fn put_service(&mut self, key: &Lb4ServiceKey, value: &Lb4Service) -> anyhow::Result<()> {
        Ok(self.services.insert(key, value, 0)?)
    }
    fn delete_service(&mut self, key: &Lb4ServiceKey) -> anyhow::Result<()> {
        Ok(self.services.remove(key)?)
    }
    fn put_slot(&mut self, key: &Lb4SlotKey, value: &Lb4Slot) -> anyhow::Result<()> {
        Ok(self.slots.insert(key, value, 0)?)
    }
    fn delete_slot(&mut self, key: &Lb4SlotKey) -> anyhow::Result<()> {
        Ok(self.slots.remove(key)?)
    }
    fn put_backend(&mut self, id: u32, value: &Lb4Backend) -> anyhow::Result<()> {
        Ok(self.backends.insert(id, value, 0)?)
    }
    fn delete_backend(&mut self, id: u32) -> anyhow::Result<()> {
        Ok(self.backends.remove(&id)?)
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

    /// Every known reason with its summed counter.
    pub fn all(&self) -> anyhow::Result<Vec<(Reason, Counter)>> {
        Reason::ALL
            .iter()
            .map(|r| Ok((*r, self.get(*r)?)))
            .collect()
    }
}
