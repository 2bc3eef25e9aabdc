//! `LB4_SLOTS_V1`: (service id, revision, slot) -> backend id.
//!
//! Slots carry the revision of the service entry they belong to, so the agent
//! can write a complete new set beside the old one and switch with a single
//! write of the service entry.
//!
//! The IPv6 services' slots live here too: the key and value hold ids only,
//! which the agent hands out from one space for both families, and a slot's
//! backend id is read in the backend map of its service's family.

use bytemuck::{Pod, Zeroable};

use crate::{assert_layout, user_pod};

/// Pinned name of the IPv4 slot map.
pub const NAME: &str = "LB4_SLOTS_V1";
/// Default capacity (slots over all services and revisions in flight).
pub const MAX_ENTRIES: u32 = 262144;

/// Key of one backend slot of one service revision.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Lb4SlotKey {
    /// [`crate::service::Lb4Service::service_id`].
    pub service_id: u32,
    /// [`crate::service::Lb4Service::revision`].
    pub revision: u32,
    /// Index `0..backend_count`.
    pub slot: u32,
}
assert_layout!(
    Lb4SlotKey,
    size = 12,
    service_id = 0,
    revision = 4,
    slot = 8
);

/// The backend a slot points at.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Lb4Slot {
    /// Key into [`crate::backend::NAME`].
    pub backend_id: u32,
}
assert_layout!(Lb4Slot, size = 4, backend_id = 0);

user_pod!(Lb4SlotKey, Lb4Slot);
