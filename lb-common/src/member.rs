//! `LB4_MEMBERS_V1`: (service id, backend id) -> present, for the checks
//! that need "is this backend still part of the service" in one lookup
//! (session affinity). The agent adds members before the service entry
//! switches to a set that has them and removes them after it switched away.
//! IPv6 services' memberships live here too (ids are one space for both
//! families).

use bytemuck::{Pod, Zeroable};

use crate::{assert_layout, user_pod};

/// Pinned name of the membership map.
pub const NAME: &str = "LB4_MEMBERS_V1";
/// Default capacity (same as the slots).
pub const MAX_ENTRIES: u32 = 262144;

/// One membership.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Lb4MemberKey {
    pub service_id: u32,
    pub backend_id: u32,
}
assert_layout!(Lb4MemberKey, size = 8, service_id = 0, backend_id = 4);

/// The value of a membership (its presence is what matters).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Lb4Member {
    /// 1 for a member.
    pub present: u32,
}
assert_layout!(Lb4Member, size = 4, present = 0);

user_pod!(Lb4MemberKey, Lb4Member);
