//! `LB4_SOCK_REVNAT_V1`: socket-level balancing's reverse map, an LRU hash
//! (socket cookie, backend address, backend port) -> service address and
//! port, so `getpeername()` and `recvmsg()` show the application the
//! address it asked for, not the backend it was given. LRU because sockets
//! close without telling the programs.

use bytemuck::{Pod, Zeroable};

use crate::{assert_layout, user_pod};

/// Pinned name of the socket reverse map.
pub const NAME: &str = "LB4_SOCK_REVNAT_V1";
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

user_pod!(Lb4SockKey, Lb4SockRevnat);
