//! `LB4_SERVICES_V1` / `LB6_SERVICES_V1`: frontend (address, port,
//! protocol, scope) -> service entry, one map per address family. The
//! entry ([`Lb4Service`]) holds no address, so both maps share it.
//!
//! The agent writes a service's backend slots first and this entry last, so a
//! packet either sees the old backend set or the new one, never a mix.

use bytemuck::{Pod, Zeroable};

use crate::{assert_layout, user_pod};

/// Pinned name of the IPv4 service map.
pub const NAME: &str = "LB4_SERVICES_V1";
/// Pinned name of the IPv6 service map.
pub const NAME6: &str = "LB6_SERVICES_V1";
/// Default capacity (frontends).
pub const MAX_ENTRIES: u32 = 65536;

/// Scope of a frontend: the entry every hook looks up.
pub const SCOPE_EXTERNAL: u8 = 0;
/// Scope of a frontend: the entry traffic from this node's pods uses
/// instead, when the external entry has [`FLAG_HAS_INTERNAL`] (an
/// externalTrafficPolicy=Local service: outside clients get the node-local
/// endpoints, pods get all of them).
pub const SCOPE_INTERNAL: u8 = 1;

/// Only node-local backends (externalTrafficPolicy Local): never SNAT, and
/// an empty set is counted as `drop_no_local_backend`.
pub const FLAG_LOCAL_ONLY: u32 = 1;
/// Traffic from pods must use the `SCOPE_INTERNAL` entry of this frontend.
pub const FLAG_HAS_INTERNAL: u32 = 2;
/// Sources are restricted (loadBalancerSourceRanges) by `LB4_SRC_RANGES_V1`.
pub const FLAG_SOURCE_RANGES: u32 = 4;
/// An address marker (port 0, protocol 0): the address is a ClusterIP, so
/// connection attempts to a port no frontend defines are rejected.
pub const FLAG_ADDRESS: u32 = 8;
/// Connection attempts to a frontend with no usable backend are answered
/// with ICMP port unreachable (kube-proxy's REJECT) instead of dropped.
pub const FLAG_REJECT_EMPTY: u32 = 16;
/// New flows pick their backend from the frontend's Maglev table
/// (`LB4_MAGLEV_V1`, [`crate::maglev`]) instead of a random slot.
pub const FLAG_MAGLEV: u32 = 32;

/// Lookup key of a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Lb4ServiceKey {
    /// Frontend address, network order.
    pub addr: [u8; 4],
    /// Frontend port, host order.
    pub port: u16,
    /// IANA protocol number.
    pub proto: u8,
    /// `SCOPE_*`; a `u8` so the key has no implicit padding.
    pub scope: u8,
}
assert_layout!(
    Lb4ServiceKey,
    size = 8,
    addr = 0,
    port = 4,
    proto = 6,
    scope = 7
);

/// Lookup key of an IPv6 frontend: [`Lb4ServiceKey`] with a 128-bit address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Lb6ServiceKey {
    /// Frontend address, network order.
    pub addr: [u8; 16],
    /// Frontend port, host order.
    pub port: u16,
    /// IANA protocol number (the L4 header's, after any extension headers).
    pub proto: u8,
    /// `SCOPE_*`; a `u8` so the key has no implicit padding.
    pub scope: u8,
}
assert_layout!(
    Lb6ServiceKey,
    size = 20,
    addr = 0,
    port = 16,
    proto = 18,
    scope = 19
);

/// Kind of frontend, kept for inspection (`lbctl services`).
pub const KIND_CLUSTER_IP: u32 = 0;
/// See [`KIND_CLUSTER_IP`].
pub const KIND_NODE_PORT: u32 = 1;
/// See [`KIND_CLUSTER_IP`].
pub const KIND_LOAD_BALANCER: u32 = 2;
/// See [`KIND_CLUSTER_IP`].
pub const KIND_EXTERNAL_IP: u32 = 3;

/// What a frontend resolves to, in either family's map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Lb4Service {
    /// Agent-assigned id, stable for the frontend's lifetime; keys its slots.
    pub service_id: u32,
    /// Number of slots `0..backend_count` valid under `revision`.
    pub backend_count: u32,
    /// Generation of the slot set this entry points at.
    pub revision: u32,
    /// `KIND_*` of the frontend.
    pub kind: u32,
    /// `FLAG_*` bits; a `u32`, not `bool`s, so there is no implicit padding.
    pub flags: u32,
    /// Session affinity timeout in seconds, 0 when affinity is off.
    pub affinity_timeout: u32,
}
assert_layout!(
    Lb4Service,
    size = 24,
    service_id = 0,
    backend_count = 4,
    revision = 8,
    kind = 12,
    flags = 16,
    affinity_timeout = 20,
);

user_pod!(Lb4ServiceKey, Lb6ServiceKey, Lb4Service);
