//! `LB_REJECT_LIMIT_V1`: how many ICMP port unreachable (and ICMPv6)
//! rejects each CPU may send, a token bucket like the kernel's own ICMP
//! limit (`net.ipv4.icmp_msgs_per_sec` = 1000, `icmp_msgs_burst` = 50).
//! Without it the reject path answers every packet aimed at a service
//! without endpoints, with a forged source as well: a reflector.
//!
//! A one-entry array the agent (or an operator, through the pin) writes;
//! an entry left at zero means the defaults below. The bucket itself is
//! per-CPU program state (`LB_REJECT_BUCKET_V1`, not pinned).

use bytemuck::{Pod, Zeroable};

use crate::{assert_layout, user_pod};

/// Pinned name of the reject limit map.
pub const NAME: &str = "LB_REJECT_LIMIT_V1";
/// One entry, at index 0.
pub const MAX_ENTRIES: u32 = 1;
/// Rejects per second per CPU when `rate_per_sec` is 0 (the kernel's
/// `icmp_msgs_per_sec`).
pub const DEFAULT_RATE_PER_SEC: u32 = 1000;
/// Rejects sent back to back per CPU when `burst` is 0 (the kernel's
/// `icmp_msgs_burst`).
pub const DEFAULT_BURST: u32 = 50;
/// Highest rate the programs honour (larger values are clamped): keeps the
/// bucket arithmetic within 64 bits.
pub const MAX_RATE_PER_SEC: u32 = 1_000_000;

/// The reject rate limit of every CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct LbRejectLimit {
    /// Tokens added per second; 0: [`DEFAULT_RATE_PER_SEC`].
    pub rate_per_sec: u32,
    /// Bucket size, the rejects sent back to back after a quiet time; 0:
    /// [`DEFAULT_BURST`].
    pub burst: u32,
}
assert_layout!(LbRejectLimit, size = 8, rate_per_sec = 0, burst = 4);

/// Per-CPU bucket state (program-owned).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct LbRejectBucket {
    /// Tokens left, in billionths of a token (a reject costs 10^9), so a
    /// refill of `elapsed_ns * rate` needs no division.
    pub nano_tokens: u64,
    /// `bpf_ktime_get_ns()` of the last refill; 0: never (a full bucket).
    pub last_ns: u64,
}
assert_layout!(LbRejectBucket, size = 16, nano_tokens = 0, last_ns = 8);

user_pod!(LbRejectLimit, LbRejectBucket);
