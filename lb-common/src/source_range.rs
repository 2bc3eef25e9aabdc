//! `LB4_SRC_RANGES_V1`: loadBalancerSourceRanges as an LPM trie keyed by
//! (service id, client address). The service id is always matched whole
//! (the prefix length counts its 32 bits first), so one trie holds the
//! ranges of every service. `LB6_SRC_RANGES_V1` is the IPv6 trie, the
//! same keyed by 128-bit addresses.

use bytemuck::{Pod, Zeroable};

use crate::{assert_layout, user_pod};

/// Pinned name of the source-range trie.
pub const NAME: &str = "LB4_SRC_RANGES_V1";
/// Pinned name of the IPv6 source-range trie.
pub const NAME6: &str = "LB6_SRC_RANGES_V1";
/// Default capacity (ranges over all services).
pub const MAX_ENTRIES: u32 = 16384;
/// Bits of the key's `service_id` that lead every prefix.
pub const SERVICE_ID_BITS: u32 = 32;

/// The data part of the LPM key (the trie adds the prefix length in front).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Lb4SourceRangeKey {
    /// [`crate::service::Lb4Service::service_id`], big-endian so that the
    /// trie's bytewise match sees it most significant byte first.
    pub service_id_be: [u8; 4],
    /// Range or client address, network order.
    pub addr: [u8; 4],
}
assert_layout!(Lb4SourceRangeKey, size = 8, service_id_be = 0, addr = 4);

/// Value stored for an allowed range (the presence is what matters).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Lb4SourceRange {
    /// 1 for an allowed range.
    pub allow: u32,
}
assert_layout!(Lb4SourceRange, size = 4, allow = 0);

/// [`Lb4SourceRangeKey`] with a 128-bit address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Lb6SourceRangeKey {
    /// The service id, big-endian.
    pub service_id_be: [u8; 4],
    /// Range or client address, network order.
    pub addr: [u8; 16],
}
assert_layout!(Lb6SourceRangeKey, size = 20, service_id_be = 0, addr = 4);

user_pod!(Lb4SourceRangeKey, Lb6SourceRangeKey, Lb4SourceRange);
