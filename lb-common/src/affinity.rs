//! `LB4_AFFINITY_V1`: sessionAffinity ClientIP, an LRU hash
//! (client address, service id) -> (backend id, when last chosen).
//! `LB6_AFFINITY_V1` is the same keyed by the 128-bit client address.

use bytemuck::{Pod, Zeroable};

use crate::{assert_layout, user_pod};

/// Pinned name of the affinity map.
pub const NAME: &str = "LB4_AFFINITY_V1";
/// Pinned name of the IPv6 affinity map.
pub const NAME6: &str = "LB6_AFFINITY_V1";
/// Default capacity (client and service pairs).
pub const MAX_ENTRIES: u32 = 65536;

/// Whose affinity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Lb4AffinityKey {
    /// Client address, network order.
    pub client: [u8; 4],
    /// [`crate::service::Lb4Service::service_id`].
    pub service_id: u32,
}
assert_layout!(Lb4AffinityKey, size = 8, client = 0, service_id = 4);

/// The backend a client sticks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Lb4Affinity {
    /// Key into the backend map; valid while it is a member of the service.
    pub backend_id: u32,
    /// Explicit padding, always zero.
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` when a new flow last went to it.
    pub last_seen_ns: u64,
}
assert_layout!(
    Lb4Affinity,
    size = 16,
    backend_id = 0,
    _pad = 4,
    last_seen_ns = 8
);

/// Whose affinity, for an IPv6 client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Lb6AffinityKey {
    /// Client address, network order.
    pub client: [u8; 16],
    /// [`crate::service::Lb4Service::service_id`].
    pub service_id: u32,
}
assert_layout!(Lb6AffinityKey, size = 20, client = 0, service_id = 16);

user_pod!(Lb4AffinityKey, Lb6AffinityKey, Lb4Affinity);
