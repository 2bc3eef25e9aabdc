//! Types shared by the kernel programs (`lb-ebpf`) and the agent (`lb-agent`).
//!
//! One module per map: its key, its value, its pinned `NAME` and its default
//! `MAX_ENTRIES`. Every struct is `#[repr(C)]` with explicit padding so that the
//! layout is the same on both sides and bytemuck can prove it has no holes.
//! Addresses are stored as byte arrays in network order and ports as host-order
//! integers, so that `bpftool map dump` prints `"addr": [10,96,0,10]` and
//! `"port": 80` instead of byte-swapped numbers. A layout change bumps the
//! version suffix of the map name (`_V1` -> `_V2`), never reinterprets in place.
#![no_std]

pub mod affinity;
pub mod backend;
pub mod backend_stats;
pub mod config;
pub mod conntrack;
pub mod frag;
pub mod maglev;
pub mod member;
pub mod reject_limit;
pub mod service;
pub mod service_name;
pub mod service_stats;
pub mod slot;
pub mod sock;
pub mod source_range;
pub mod stats;
pub mod trace;

/// IANA protocol numbers, as they appear in the IPv4 header (and as the
/// last next-header of an IPv6 packet).
pub const PROTO_TCP: u8 = 6;
/// See [`PROTO_TCP`].
pub const PROTO_UDP: u8 = 17;
/// See [`PROTO_TCP`].
pub const PROTO_SCTP: u8 = 132;
/// See [`PROTO_TCP`].
pub const PROTO_ICMP: u8 = 1;
/// ICMPv6, as the last next-header of an IPv6 packet.
pub const PROTO_ICMPV6: u8 = 58;

/// Source address of hairpin traffic (a pod balanced to itself): a
/// link-local address that routes back to the node from every pod, so the
/// pod's reply returns through the node to be translated back.
pub const HAIRPIN_ADDR4: [u8; 4] = [169, 254, 42, 1];

/// [`HAIRPIN_ADDR4`] for IPv6: `fd00:a9fe:2a01::1` (a unique local
/// address spelling 169.254.42.1 in its second and third groups). Not
/// link-local: a pod reaches it through its default route, which is what
/// brings the reply back through the node. Like the IPv4 one it must not
/// be a pod or service address of the cluster.
pub const HAIRPIN_ADDR6: [u8; 16] = [
    0xfd, 0x00, 0xa9, 0xfe, 0x2a, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
];

/// Implements `aya::Pod` for the user-space side of a shared type.
macro_rules! user_pod {
    ($($ty:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: the type is #[repr(C)], Copy, and bytemuck::Pod (no padding, every bit pattern valid).
            unsafe impl aya::Pod for $ty {}
        )*
    };
}
pub(crate) use user_pod;

/// Compile-time layout check: size and field offsets.
macro_rules! assert_layout {
    ($ty:ty, size = $size:expr $(, $field:ident = $off:expr)* $(,)?) => {
        const _: () = {
            assert!(core::mem::size_of::<$ty>() == $size);
            $(assert!(core::mem::offset_of!($ty, $field) == $off);)*
        };
    };
}
pub(crate) use assert_layout;
