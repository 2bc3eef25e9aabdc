//! `LB4_FRAGS_V1` / `LB6_FRAGS_V1`: the fragments of a translated datagram.
//!
//! Only the first fragment of a fragmented TCP/UDP datagram carries the
//! ports, so only it can find the flow's conntrack entry. When it is
//! translated, the datagram's identity (addresses, protocol, IP id or IPv6
//! fragment identification) is remembered with its ports: a later fragment
//! of the same datagram finds them here, rebuilds the flow's 5-tuple, looks
//! up the same conntrack entry and gets the address part of its
//! translation (the ports and the L4 checksum live in the first fragment,
//! whose incremental update already covers the whole datagram).
//!
//! LRU hashes shared by all CPUs (a datagram's fragments may arrive on
//! different ones); an entry is needed for the few milliseconds the
//! fragments of one datagram take to pass, so the maps are not pinned: an
//! agent restart loses nothing worth keeping.

use bytemuck::{Pod, Zeroable};

use crate::{assert_layout, user_pod};

/// Name of the IPv4 fragment map.
pub const NAME: &str = "LB4_FRAGS_V1";
/// Name of the IPv6 fragment map.
pub const NAME6: &str = "LB6_FRAGS_V1";
/// Capacity (datagrams in flight), per family.
pub const MAX_ENTRIES: u32 = 8192;

/// One IPv4 datagram, as its fragments carry it before translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Lb4FragKey {
    /// Source address, network order.
    pub src_addr: [u8; 4],
    /// Destination address, network order.
    pub dst_addr: [u8; 4],
    /// The IPv4 identification field, host order.
    pub id: u16,
    /// IANA protocol number.
    pub proto: u8,
    /// Explicit padding, always zero (the key is hashed bytewise).
    pub _pad: u8,
}
assert_layout!(
    Lb4FragKey,
    size = 12,
    src_addr = 0,
    dst_addr = 4,
    id = 8,
    proto = 10,
    _pad = 11
);

/// One IPv6 datagram, as its fragments carry it before translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Lb6FragKey {
    /// Source address, network order.
    pub src_addr: [u8; 16],
    /// Destination address, network order.
    pub dst_addr: [u8; 16],
    /// The fragment header's identification, host order.
    pub id: u32,
    /// The fragment header's next header: the same in every fragment of
    /// the datagram (RFC 8200 section 4.5), and the L4 protocol unless
    /// extension headers follow the fragment header.
    pub next_header: u8,
    /// Explicit padding, always zero (the key is hashed bytewise).
    pub _pad: [u8; 3],
}
assert_layout!(
    Lb6FragKey,
    size = 40,
    src_addr = 0,
    dst_addr = 16,
    id = 32,
    next_header = 36,
    _pad = 37
);

/// What a later fragment needs to rebuild its flow's conntrack key: the
/// ports and the L4 protocol of the first fragment (the addresses are its
/// own). Both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct LbFragFlow {
    /// Source port, host order.
    pub src_port: u16,
    /// Destination port, host order.
    pub dst_port: u16,
    /// The L4 protocol of the conntrack key (TCP or UDP).
    pub proto: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
}
assert_layout!(
    LbFragFlow,
    size = 8,
    src_port = 0,
    dst_port = 2,
    proto = 4,
    _pad = 5
);

user_pod!(Lb4FragKey, Lb6FragKey, LbFragFlow);
