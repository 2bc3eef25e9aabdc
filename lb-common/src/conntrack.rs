//! `LB4_CT_V1`: the connection tracking table, an LRU hash keyed by 5-tuple.
//!
//! The first packet of a flow to a service writes two entries: the forward one
//! (client -> frontend, rewritten to the backend) and the reply one
//! (backend -> client, source rewritten back to the frontend). `_V2` added
//! source rewriting (SNAT) to the entry.
//!
//! `LB6_CT_V1` is the IPv6 table: the same entries with 128-bit addresses
//! ([`Lb6CtKey`], [`Lb6CtEntry`]) and the same `DIR_*`, `REWRITE_*` and
//! `TCP_*` values.

use bytemuck::{Pod, Zeroable};

use crate::{assert_layout, user_pod};

/// Pinned name of the IPv4 conntrack map.
pub const NAME: &str = "LB4_CT_V2";
/// Pinned name of the IPv6 conntrack map.
pub const NAME6: &str = "LB6_CT_V1";
/// Default capacity (two entries per tracked flow).
pub const MAX_ENTRIES: u32 = 524288;

/// 5-tuple as seen on the wire before translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Lb4CtKey {
    /// Source address, network order.
    pub src_addr: [u8; 4],
    /// Destination address, network order.
    pub dst_addr: [u8; 4],
    /// Source port, host order.
    pub src_port: u16,
    /// Destination port, host order.
    pub dst_port: u16,
    /// IANA protocol number.
    pub proto: u8,
    /// Explicit padding, always zero (the key is hashed bytewise).
    pub _pad: [u8; 3],
}
assert_layout!(
    Lb4CtKey,
    size = 16,
    src_addr = 0,
    dst_addr = 4,
    src_port = 8,
    dst_port = 10,
    proto = 12,
    _pad = 13
);

/// Forward direction of a flow (client -> frontend).
pub const DIR_FORWARD: u8 = 1;
/// Reply direction of a flow (backend -> client, or -> the SNAT address).
pub const DIR_REPLY: u8 = 2;

/// Rewrite the destination to `dst_addr:dst_port`.
pub const REWRITE_DST: u8 = 1;
/// Rewrite the source to `src_addr:src_port`.
pub const REWRITE_SRC: u8 = 2;
/// A hairpin flow (a pod balanced to itself): after the rewrite the packet
/// goes straight back out of the device it came in on.
pub const REWRITE_HAIRPIN: u8 = 4;

/// A TCP FIN was seen in this direction.
pub const TCP_FIN: u8 = 1;
/// A TCP RST was seen.
pub const TCP_RST: u8 = 2;

/// Translation and bookkeeping for one direction of a flow.
///
/// Forward entries always rewrite the destination (to the backend) and,
/// for traffic from outside balanced to another node, the source too (to
/// the node's address and an allocated port). Reply entries always rewrite
/// the source (back to the frontend) and, after SNAT, the destination (back
/// to the client).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Lb4CtEntry {
    /// New destination address (with `REWRITE_DST`), network order.
    pub dst_addr: [u8; 4],
    /// New destination port, host order.
    pub dst_port: u16,
    /// `DIR_*`.
    pub direction: u8,
    /// `REWRITE_*` bits.
    pub rewrite: u8,
    /// New source address (with `REWRITE_SRC`), network order.
    pub src_addr: [u8; 4],
    /// New source port, host order.
    pub src_port: u16,
    /// `TCP_*` bits seen so far.
    pub tcp_flags: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
    /// Service the flow was balanced by.
    pub service_id: u32,
    /// Backend the flow was given.
    pub backend_id: u32,
    /// `bpf_ktime_get_ns()` at creation.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns()` at the last packet.
    pub last_seen_ns: u64,
    /// Packets seen in this direction (approximate under concurrency).
    pub packets: u64,
    /// Bytes seen in this direction (approximate under concurrency).
    pub bytes: u64,
}
assert_layout!(
    Lb4CtEntry,
    size = 56,
    dst_addr = 0,
    dst_port = 4,
    direction = 6,
    rewrite = 7,
    src_addr = 8,
    src_port = 12,
    tcp_flags = 14,
    _pad = 15,
    service_id = 16,
    backend_id = 20,
    created_ns = 24,
    last_seen_ns = 32,
    packets = 40,
    bytes = 48
);

/// IPv6 5-tuple as seen on the wire before translation; `proto` is the L4
/// header's (the last next-header of the extension chain).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Lb6CtKey {
    /// Source address, network order.
    pub src_addr: [u8; 16],
    /// Destination address, network order.
    pub dst_addr: [u8; 16],
    /// Source port, host order.
    pub src_port: u16,
    /// Destination port, host order.
    pub dst_port: u16,
    /// IANA protocol number.
    pub proto: u8,
    /// Explicit padding, always zero (the key is hashed bytewise).
    pub _pad: [u8; 3],
}
assert_layout!(
    Lb6CtKey,
    size = 40,
    src_addr = 0,
    dst_addr = 16,
    src_port = 32,
    dst_port = 34,
    proto = 36,
    _pad = 37
);

/// [`Lb4CtEntry`] with 128-bit addresses: the translation and bookkeeping
/// of one direction of an IPv6 flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Lb6CtEntry {
    /// New destination address (with `REWRITE_DST`), network order.
    pub dst_addr: [u8; 16],
    /// New destination port, host order.
    pub dst_port: u16,
    /// `DIR_*`.
    pub direction: u8,
    /// `REWRITE_*` bits.
    pub rewrite: u8,
    /// New source address (with `REWRITE_SRC`), network order.
    pub src_addr: [u8; 16],
    /// New source port, host order.
    pub src_port: u16,
    /// `TCP_*` bits seen so far.
    pub tcp_flags: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
    /// Service the flow was balanced by.
    pub service_id: u32,
    /// Backend the flow was given.
    pub backend_id: u32,
    /// `bpf_ktime_get_ns()` at creation.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns()` at the last packet.
    pub last_seen_ns: u64,
    /// Packets seen in this direction (approximate under concurrency).
    pub packets: u64,
    /// Bytes seen in this direction (approximate under concurrency).
    pub bytes: u64,
}
assert_layout!(
    Lb6CtEntry,
    size = 80,
    dst_addr = 0,
    dst_port = 16,
    direction = 18,
    rewrite = 19,
    src_addr = 20,
    src_port = 36,
    tcp_flags = 38,
    _pad = 39,
    service_id = 40,
    backend_id = 44,
    created_ns = 48,
    last_seen_ns = 56,
    packets = 64,
    bytes = 72
);

user_pod!(Lb4CtKey, Lb4CtEntry, Lb6CtKey, Lb6CtEntry);
