//! `LB4_BACKENDS_V1` / `LB6_BACKENDS_V1`: backend id -> backend address,
//! port and state, one map per address family. The agent hands out backend
//! ids from one space for both families, so an id names one backend.

use bytemuck::{Pod, Zeroable};

use crate::{assert_layout, user_pod};

/// Pinned name of the IPv4 backend map.
pub const NAME: &str = "LB4_BACKENDS_V1";
/// Pinned name of the IPv6 backend map.
pub const NAME6: &str = "LB6_BACKENDS_V1";
/// Default capacity (distinct backend address:port/protocol).
pub const MAX_ENTRIES: u32 = 262144;

/// The endpoint runs on this node.
pub const FLAG_LOCAL: u8 = 1;
/// The endpoint is terminating (serving only as a fallback).
pub const FLAG_TERMINATING: u8 = 2;

/// One backend endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Lb4Backend {
    /// Endpoint address, network order.
    pub addr: [u8; 4],
    /// Endpoint port, host order.
    pub port: u16,
    /// IANA protocol number.
    pub proto: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
}
assert_layout!(
    Lb4Backend,
    size = 8,
    addr = 0,
    port = 4,
    proto = 6,
    flags = 7
);

/// One IPv6 backend endpoint: [`Lb4Backend`] with a 128-bit address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Lb6Backend {
    /// Endpoint address, network order.
    pub addr: [u8; 16],
    /// Endpoint port, host order.
    pub port: u16,
    /// IANA protocol number.
    pub proto: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
}
assert_layout!(
    Lb6Backend,
    size = 20,
    addr = 0,
    port = 16,
    proto = 18,
    flags = 19
);

user_pod!(Lb4Backend, Lb6Backend);
