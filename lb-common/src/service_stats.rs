//! `LB_SERVICE_STATS_V1`: per-CPU packet and byte counters per service id
//! (per frontend), counted by the programs whenever a packet was matched to
//! a service: a new flow balanced by it, a tracked flow's forward or reply
//! packet (the conntrack entry carries the service id), or a drop after the
//! service was found (no backend, source range, conntrack full, ...).
//!
//! An LRU per-CPU hash: the programs create an entry on a service's first
//! packet, the agent deletes it with the frontend, and under pressure the
//! least recently counted service loses its counters instead of new
//! services going uncounted.

use bytemuck::{Pod, Zeroable};

use crate::{assert_layout, stats::Counter, user_pod};

/// Pinned name of the per-service counter map.
pub const NAME: &str = "LB_SERVICE_STATS_V1";
/// Default capacity: as many as the service map has frontends.
pub const MAX_ENTRIES: u32 = crate::service::MAX_ENTRIES;

/// Counters of one service on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct LbServiceStats {
    /// First packets of new flows (`new_flow`).
    pub new_flow: Counter,
    /// Forward packets of tracked flows (`ct_forward`).
    pub ct_forward: Counter,
    /// Replies translated back (`ct_reply`).
    pub ct_reply: Counter,
    /// Packets dropped after the service was found.
    pub dropped: Counter,
}
assert_layout!(
    LbServiceStats,
    size = 64,
    new_flow = 0,
    ct_forward = 16,
    ct_reply = 32,
    dropped = 48
);

impl LbServiceStats {
    /// Field-wise sum, for summing the per-CPU values.
    pub fn add(&self, other: &Self) -> Self {
        let sum = |a: &Counter, b: &Counter| Counter {
            packets: a.packets + b.packets,
            bytes: a.bytes + b.bytes,
        };
        Self {
            new_flow: sum(&self.new_flow, &other.new_flow),
            ct_forward: sum(&self.ct_forward, &other.ct_forward),
            ct_reply: sum(&self.ct_reply, &other.ct_reply),
            dropped: sum(&self.dropped, &other.dropped),
        }
    }
}

user_pod!(LbServiceStats);
