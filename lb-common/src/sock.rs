//! `LB4_SOCK_REVNAT_V1` and `LB6_SOCK_REVNAT_V1`: socket-level balancing's
//! reverse maps, LRU hashes (socket cookie, backend address, backend port)
//! -> service address and port, one per family, so `getpeername()` and
//! `recvmsg()` show the application the address it asked for, not the
//! backend it was given. LRU because sockets close without telling the
//! programs.

use bytemuck::{Pod, Zeroable};

use crate::{assert_layout, user_pod};

/// Pinned name of the socket reverse map.
pub const NAME: &str = "LB4_SOCK_REVNAT_V1";
/// Pinned name of the IPv6 socket reverse map.
pub const NAME6: &str = "LB6_SOCK_REVNAT_V1";
/// Default capacity (translated sockets and, for unconnected UDP, peers).
pub const MAX_ENTRIES: u32 = 65536;

/// A translated socket and the backend it talks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Lb4SockKey {
    /// `bpf_get_socket_cookie()`.
    pub cookie: u64,
    /// Backend address, network order.
    pub addr: [u8; 4],
    /// Backend port, host order.
    pub port: u16,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}
assert_layout!(
    Lb4SockKey,
    size = 16,
    cookie = 0,
    addr = 8,
    port = 12,
    _pad = 14
);

/// The service address the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Lb4SockRevnat {
    /// Frontend address, network order.
    pub addr: [u8; 4],
    /// Frontend port, host order.
    pub port: u16,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}
assert_layout!(Lb4SockRevnat, size = 8, addr = 0, port = 4, _pad = 6);

/// An IPv6 translated socket and the backend it talks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Lb6SockKey {
    /// `bpf_get_socket_cookie()`.
    pub cookie: u64,
    /// Backend address, network order.
    pub addr: [u8; 16],
    /// Backend port, host order.
    pub port: u16,
    /// Explicit padding, always zero (the key is hashed bytewise).
    pub _pad: [u8; 6],
}
assert_layout!(
    Lb6SockKey,
    size = 32,
    cookie = 0,
    addr = 8,
    port = 24,
    _pad = 26
);

/// The IPv6 service address the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Lb6SockRevnat {
    /// Frontend address, network order.
    pub addr: [u8; 16],
    /// Frontend port, host order.
    pub port: u16,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}
assert_layout!(Lb6SockRevnat, size = 20, addr = 0, port = 16, _pad = 18);

user_pod!(Lb4SockKey, Lb4SockRevnat, Lb6SockKey, Lb6SockRevnat);
