//! `LB_BACKEND_STATS_V1`: per-CPU counters per (service id, backend id):
//! the new flows the service gave the backend and how their connection
//! attempts ended. Counted only when a flow starts and when its first
//! answer (or an ICMP error before one) arrives, never per packet of an
//! established flow; bytes and active flows come from the conntrack
//! entries, which count them already.
//!
//! A hash shared by all CPUs (atomic adds: only new flows and first
//! answers count, so contention is low), not preallocated: the agent
//! creates an entry with each membership and deletes it with it, so the
//! programs never insert (their new-flow path has no stack left for a
//! value to insert).

use bytemuck::{Pod, Zeroable};

use crate::{assert_layout, user_pod};

/// Pinned name of the per-backend counter map.
pub const NAME: &str = "LB_BACKEND_STATS_V1";
/// Default capacity: one entry per membership.
pub const MAX_ENTRIES: u32 = crate::member::MAX_ENTRIES;

/// Counters of one backend of one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct LbBackendStats {
    /// Flows the service balanced to the backend.
    pub new_flows: u64,
    /// Connection attempts answered: a TCP flow's first reply other than
    /// a RST, a UDP flow's first reply.
    pub answered: u64,
    /// Connection attempts that failed: a TCP flow whose first reply is a
    /// RST, or an ICMP destination unreachable (other than "fragmentation
    /// needed") about a flow not answered yet.
    pub failed: u64,
    /// `bpf_ktime_get_coarse_ns` of the last failure.
    pub last_failed_ns: u64,
}
assert_layout!(
    LbBackendStats,
    size = 32,
    new_flows = 0,
    answered = 8,
    failed = 16,
    last_failed_ns = 24
);

user_pod!(LbBackendStats);
