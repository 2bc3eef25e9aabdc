//! Conntrack garbage collection: a sweep over both families' tables that
//! removes entries past their state's timeout (the datapath already treats
//! them as absent), so the tables and the SNAT ports recover without
//! waiting for LRU pressure.
//!
//! The sweep reads the tables with `BPF_MAP_LOOKUP_BATCH` (one syscall per
//! few thousand entries instead of two per entry) and re-reads each expired
//! entry just before removing it, so a flow that came back to life since
//! the batch stays (one that does so between that read and the removal,
//! a window of one syscall, loses its entry and is balanced afresh). Each call does a bounded amount of work and resumes where
//! the previous one stopped; a full pass over a table publishes its counts.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
};

use aya::maps::{HashMap, IterableMap, MapData};
use lb_common::conntrack::{
    CtEntry, CtState, CtTimeouts, DIR_REPLY, Lb4CtKey, Lb6CtKey, REWRITE_DST, is_expired,
};

use super::KernelTables;

/// The clock the datapath stamps entries with (`bpf_ktime_get_coarse_ns`).
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Entries read per `BPF_MAP_LOOKUP_BATCH` call.
const BATCH: u32 = 4096;

/// What a completed pass over one family's table found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableCensus {
    /// Live entries by state (both directions counted).
    pub by_state: BTreeMap<&'static str, u64>,
    /// Live reply entries whose flow has a translated source, by that
    /// source address (the node's, the hairpin address, or a client's own
    /// for a remapped port): the SNAT ports in use.
    pub snat_ports: BTreeMap<IpAddr, u64>,
    /// Live flows and their bytes by (service id, backend id).
    pub by_backend: BTreeMap<(u32, u32), BackendFlows>,
}

/// What the live conntrack entries of one (service, backend) hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendFlows {
    /// Flows not closed (their forward entries: one per flow).
    pub active: u64,
    /// Bytes both ways of every live flow, closed ones included.
    pub bytes: u64,
}

/// What one [`Sweeper::sweep`] call did.
#[derive(Clone, Debug, Default)]
pub struct SweepReport {
    /// Entries removed, by family (`"ipv4"`, `"ipv6"`).
    pub collected: BTreeMap<&'static str, u64>,
    /// The census of each family whose pass completed during this call.
    pub completed: BTreeMap<&'static str, TableCensus>,
}

/// A family's table as the sweeper walks it.
struct Walk {
    /// The batch token to resume from (`None`: the table's start).
    cursor: Option<u32>,
    census: TableCensus,
}

impl Walk {
    fn new() -> Self {
        Walk {
            cursor: None,
            census: TableCensus::default(),
        }
    }
}

/// Sweeps both conntrack tables a bounded slice at a time.
pub struct Sweeper {
    v4: Walk,
    v6: Walk,
}

impl Default for Sweeper {
    fn default() -> Self {
        Sweeper {
            v4: Walk::new(),
            v6: Walk::new(),
        }
    }
}

impl Sweeper {
    /// Reads up to `budget` entries of each table from where the last call
    /// stopped and removes those expired at `now_ns` under `timeouts`.
    pub fn sweep(
        &mut self,
        tables: &mut KernelTables,
        timeouts: &CtTimeouts,
        now_ns: u64,
        budget: usize,
    ) -> anyhow::Result<SweepReport> {
        let mut report = SweepReport::default();
        sweep_table(
            &mut tables.conntrack,
            &mut self.v4,
            (timeouts, now_ns, budget),
            ("ipv4", &mut report),
        )?;
        sweep_table(
            &mut tables.conntrack6,
            &mut self.v6,
            (timeouts, now_ns, budget),
            ("ipv6", &mut report),
        )?;
        Ok(report)
    }
}

/// The protocol and tuple fields the sweep reads from a key of either
/// family.
trait SweptKey: aya::Pod {
    fn proto(&self) -> u8;
    fn dst(&self) -> IpAddr;
}

macro_rules! swept_key {
    ($($key:ty),*) => {$(
        impl SweptKey for $key {
            fn proto(&self) -> u8 {
                self.proto
            }
            fn dst(&self) -> IpAddr {
                IpAddr::from(self.dst_addr)
            }
        }
    )*};
}
swept_key!(Lb4CtKey, Lb6CtKey);

/// One family's slice of a sweep.
fn sweep_table<K, V>(
    map: &mut HashMap<MapData, K, V>,
    walk: &mut Walk,
    (timeouts, now_ns, budget): (&CtTimeouts, u64, usize),
    (family, report): (&'static str, &mut SweepReport),
) -> anyhow::Result<()>
where
    K: SweptKey,
    V: aya::Pod + CtEntry,
    V::Addr: Into<IpAddr>,
{
    let mut read = 0;
    let mut collected = 0;
    loop {
        let (entries, next) = lookup_batch::<K, V>(map, walk.cursor)?;
        read += entries.len();
        for (key, entry) in &entries {
            let proto = key.proto();
            let expired = |e: &V| is_expired(timeouts, proto, e.state(), e.last_seen_ns(), now_ns);
            if expired(entry) {
                // Re-read: a packet may have refreshed it since the batch.
                if map.get(key, 0).is_ok_and(|now| expired(&now)) && map.remove(key).is_ok() {
                    collected += 1;
                }
                continue;
            }
            let state = CtState::of(proto, entry.state());
            *walk.census.by_state.entry(state.name()).or_default() += 1;
            let flows = walk
                .census
                .by_backend
                .entry(entry.service_backend())
                .or_default();
            flows.bytes += entry.bytes();
            if entry.direction() != DIR_REPLY && !state.is_closed() {
                flows.active += 1;
            }
            // A reply entry that rewrites its destination back to the
            // client came to a translated source: its key's destination
            // is the SNAT address (the node's or the hairpin address; a
            // client's own address, for a remapped port, is not counted),
            // and a live flow holds one of its ports.
            if entry.direction() == DIR_REPLY
                && entry.rewrite() & REWRITE_DST != 0
                && entry.dst().0.into() != key.dst()
                && !state.is_closed()
            {
                *walk.census.snat_ports.entry(key.dst()).or_default() += 1;
            }
        }
        walk.cursor = next;
        if next.is_none() {
            report
                .completed
                .insert(family, std::mem::take(&mut walk.census));
            break;
        }
        if read >= budget {
            break;
        }
    }
    *report.collected.entry(family).or_default() += collected;
    Ok(())
}

/// `union bpf_attr` for the `BPF_MAP_*_BATCH` commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries read by one batch, and the cursor to continue from.
type Batch<K, V> = (Vec<(K, V)>, Option<u32>);

/// One `BPF_MAP_LOOKUP_BATCH` of up to [`BATCH`] entries from `cursor`;
/// the cursor to continue from, `None` at the table's end.
fn lookup_batch<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    cursor: Option<u32>,
) -> anyhow::Result<Batch<K, V>> {
    let fd = map.map().fd().as_fd().as_raw_fd();
    let mut keys: Vec<K> = Vec::with_capacity(BATCH as usize);
    let mut values: Vec<V> = Vec::with_capacity(BATCH as usize);
    let mut in_batch = cursor.unwrap_or(0);
    let mut out_batch = 0u32;
    let mut attr = BatchAttr {
        in_batch: if cursor.is_some() {
            &mut in_batch as *mut u32 as u64
        } else {
            0
        },
        out_batch: &mut out_batch as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: BATCH,
        map_fd: fd as u32,
        ..BatchAttr::default()
    };
    // SAFETY: attr points at buffers of BATCH keys and values of the
    // map's sizes (aya checked them when the map was opened) and at the
    // two batch tokens, all alive for the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    let error = (ret < 0).then(std::io::Error::last_os_error);
    let done = match &error {
        None => false,
        // The end of the table: `count` entries were still filled in.
        Some(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
        Some(e) => return Err(anyhow::anyhow!("BPF_MAP_LOOKUP_BATCH: {e}")),
    };
    let filled = (attr.count as usize).min(BATCH as usize);
    // SAFETY: the kernel wrote `filled` keys and values.
    unsafe {
        keys.set_len(filled);
        values.set_len(filled);
    }
    let next = (!done).then_some(out_batch);
    Ok((keys.into_iter().zip(values).collect(), next))
}

/// Entries of both families in the census, as `lbctl` and the tests read
/// them: `(family, state) -> count`.
pub fn census_rows(report: &SweepReport) -> Vec<(&'static str, &'static str, u64)> {
    report
        .completed
        .iter()
        .flat_map(|(family, census)| {
            CtState::ALL.iter().map(move |state| {
                (
                    *family,
                    state.name(),
                    census.by_state.get(state.name()).copied().unwrap_or(0),
                )
            })
        })
        .collect()
}
