//! Socket-level balancing: cgroup hooks that translate at the socket, once
//! per connection (or per unconnected datagram) instead of once per packet.
//! `connect4`/`connect6` and `sendmsg4`/`sendmsg6` rewrite a service
//! destination to the chosen backend, with the same selection as the packet
//! path; `getpeername4`/`getpeername6` and `recvmsg4`/`recvmsg6` show the
//! service address back through `LB4_SOCK_REVNAT_V1` / `LB6_SOCK_REVNAT_V1`.
//! Translated sockets talk to the backend directly, so the packet path sees
//! plain pod traffic and nothing is translated twice.

use aya_ebpf::{
    bindings::{BPF_ANY, bpf_sock_addr},
    helpers::{bpf_get_socket_cookie, bpf_set_retval},
    programs::{SockAddrContext, SockContext},
};
use lb_common::{
    PROTO_TCP, PROTO_UDP,
    conntrack::{Lb4CtKey, Lb6CtKey},
    sock::{Lb4SockKey, Lb4SockRevnat, Lb6SockKey, Lb6SockRevnat},
    stats::Reason,
};

use crate::{Hook, LB4_SOCK_REVNAT_V1, LB6_SOCK_REVNAT_V1, service, stats};

const ECONNREFUSED: i32 = 111;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = PROTO_TCP as u32;
const IPPROTO_UDP: u32 = PROTO_UDP as u32;
const AF_INET6: u32 = 10;

/// What the hook tells the kernel: 1 lets the call go on, 0 fails it.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[inline(always)]
fn sock_addr(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
    ctx.sock_addr
}

/// The protocol of a socket the programs balance: TCP streams and UDP
/// datagrams. SCTP sockets (SOCK_STREAM or SOCK_SEQPACKET with
/// IPPROTO_SCTP) are left to the packet path: a multi-homed association
/// reaches addresses that connect() never shows.
#[inline(always)]
fn proto_of(type_: u32, protocol: u32) -> Option<u8> {
    match (type_, protocol) {
        (SOCK_STREAM, IPPROTO_TCP) => Some(PROTO_TCP),
        (SOCK_DGRAM, IPPROTO_UDP) => Some(PROTO_UDP),
        _ => None,
    }
}

/// A selection that found no backend: counted, and `DENY` with
/// ECONNREFUSED when the service has no endpoint at all.
#[inline(always)]
fn refuse(reason: Reason) -> i32 {
    stats::count(Reason::SockRefused, 0);
    if reason == Reason::DropNoBackend {
        // SAFETY: sets the syscall's return value (kernel 5.18+).
        unsafe { bpf_set_retval(-ECONNREFUSED) };
    }
    DENY
}

/// An IPv6 address held as four 32-bit words in network order (the
/// context's `user_ip6`, the socket's `dst_ip6`), read one aligned word at
/// a time: the kernel accepts no wider access to these fields.
#[inline(always)]
unsafe fn read_ip6(words: *const [u32; 4]) -> [u8; 16] {
    let at = words.cast::<u32>();
    // SAFETY: the caller's pointer is to four readable words.
    let w: [u32; 4] = unsafe {
        [
            core::ptr::read_volatile(at),
            core::ptr::read_volatile(at.add(1)),
            core::ptr::read_volatile(at.add(2)),
            core::ptr::read_volatile(at.add(3)),
        ]
    };
    // SAFETY: [u32; 4] and [u8; 16] have the same size, any bits are valid;
    // the bytes come out in memory (network) order.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(w) }
}

/// Writes an IPv6 address into `user_ip6`, one aligned word at a time.
#[inline(always)]
unsafe fn write_ip6(words: *mut [u32; 4], addr: [u8; 16]) {
    // SAFETY: as in read_ip6.
    let w = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(addr) };
    let at = words.cast::<u32>();
    // SAFETY: the caller's pointer is to four writable words.
    unsafe {
        core::ptr::write_volatile(at, w[0]);
        core::ptr::write_volatile(at.add(1), w[1]);
        core::ptr::write_volatile(at.add(2), w[2]);
        core::ptr::write_volatile(at.add(3), w[3]);
    }
}

/// The destination the application asked for, as a 5-tuple with an
/// unknown source (the socket may not be bound yet).
#[inline(always)]
fn requested(ctx: &SockAddrContext) -> Option<Lb4CtKey> {
    let sa = sock_addr(ctx);
    // SAFETY: the context is the kernel's bpf_sock_addr for this call.
    let (ip, port, type_, protocol) =
        unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).type_, (*sa).protocol) };
    let proto = proto_of(type_, protocol)?;
    Some(Lb4CtKey {
        src_addr: [0; 4],
        dst_addr: ip.to_ne_bytes(),
        src_port: 0,
        // user_port holds the port in network order in its low 16 bits.
        dst_port: u16::from_be(port as u16),
        proto,
        _pad: [0; 3],
    })
}

/// Translates the destination to a backend; `DENY` with ECONNREFUSED when
/// the service has no endpoint at all.
#[inline(always)]
fn translate(ctx: &SockAddrContext) -> i32 {
    let Some(key) = requested(ctx) else {
        return ALLOW;
    };
    // The node's own processes get the view pods get: every endpoint of an
    // externalTrafficPolicy Local service (kube-proxy's rule).
    let Some(svc) = service::lookup_service(&key, Hook::FromPod) else {
        return ALLOW;
    };
    let now = crate::ct::now();
    let choice = match service::select_backend(&svc, &key, now) {
        Ok(choice) => choice,
        Err(reason) => return refuse(reason),
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let reverse_key = Lb4SockKey {
        cookie,
        addr: choice.backend.addr,
        port: choice.backend.port,
        _pad: [0; 2],
    };
    let reverse = Lb4SockRevnat {
        addr: key.dst_addr,
        port: key.dst_port,
        _pad: [0; 2],
    };
    // Without the reverse entry the application would see the backend as
    // its peer; better not translate than lie later.
    if LB4_SOCK_REVNAT_V1
        .insert(reverse_key, reverse, BPF_ANY as u64)
        .is_err()
    {
        return ALLOW;
    }
    let sa = sock_addr(ctx);
    // SAFETY: connect4/sendmsg4 may write the destination.
    unsafe {
        (*sa).user_ip4 = u32::from_ne_bytes(choice.backend.addr);
        (*sa).user_port = u32::from(choice.backend.port.to_be());
    }
    stats::count(Reason::SockTranslated, 0);
    ALLOW
}

/// Shows the service address instead of the backend (getpeername, recvmsg).
#[inline(always)]
fn reverse(ctx: &SockAddrContext) -> i32 {
    let sa = sock_addr(ctx);
    // SAFETY: reading the call's address.
    let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let key = Lb4SockKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) },
        addr: ip.to_ne_bytes(),
        port: u16::from_be(port as u16),
        _pad: [0; 2],
    };
    if let Some(original) = unsafe { LB4_SOCK_REVNAT_V1.get(key) } {
        // SAFETY: getpeername4/recvmsg4 may write the address they return.
        unsafe {
            (*sa).user_ip4 = u32::from_ne_bytes(original.addr);
            (*sa).user_port = u32::from(original.port.to_be());
        }
    }
    ALLOW
}

/// [`requested`] for an IPv6 destination.
#[inline(always)]
fn requested6(ctx: &SockAddrContext) -> Option<Lb6CtKey> {
    let sa = sock_addr(ctx);
    // SAFETY: the context is the kernel's bpf_sock_addr for this call.
    let (port, type_, protocol) = unsafe { ((*sa).user_port, (*sa).type_, (*sa).protocol) };
    let proto = proto_of(type_, protocol)?;
    // SAFETY: user_ip6 of the same context, read word by word.
    let dst_addr = unsafe { read_ip6(core::ptr::addr_of!((*sa).user_ip6)) };
    Some(Lb6CtKey {
        src_addr: [0; 16],
        dst_addr,
        src_port: 0,
        dst_port: u16::from_be(port as u16),
        proto,
        _pad: [0; 3],
    })
}

/// [`translate`] for an IPv6 destination, with `LB6_SOCK_REVNAT_V1`.
#[inline(always)]
fn translate6(ctx: &SockAddrContext) -> i32 {
    let Some(key) = requested6(ctx) else {
        return ALLOW;
    };
    let Some(svc) = service::lookup_service6(&key, Hook::FromPod) else {
        return ALLOW;
    };
    let now = crate::ct::now();
    let backend = match service::select_backend6(&svc, &key, now) {
        Ok((_, backend, _)) => backend,
        Err(reason) => return refuse(reason),
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let reverse_key = Lb6SockKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: [0; 6],
    };
    let reverse = Lb6SockRevnat {
        addr: key.dst_addr,
        port: key.dst_port,
        _pad: [0; 2],
    };
    if LB6_SOCK_REVNAT_V1
        .insert(reverse_key, reverse, BPF_ANY as u64)
        .is_err()
    {
        return ALLOW;
    }
    let sa = sock_addr(ctx);
    // SAFETY: connect6/sendmsg6 may write the destination, word by word.
    unsafe {
        write_ip6(core::ptr::addr_of_mut!((*sa).user_ip6), backend.addr);
        (*sa).user_port = u32::from(backend.port.to_be());
    }
    stats::count(Reason::SockTranslated, 0);
    ALLOW
}

/// [`reverse`] for an IPv6 peer.
#[inline(always)]
fn reverse6(ctx: &SockAddrContext) -> i32 {
    let sa = sock_addr(ctx);
    // SAFETY: reading the call's address, word by word.
    let (addr, port) = unsafe {
        (
            read_ip6(core::ptr::addr_of!((*sa).user_ip6)),
            (*sa).user_port,
        )
    };
    let key = Lb6SockKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) },
        addr,
        port: u16::from_be(port as u16),
        _pad: [0; 6],
    };
    if let Some(original) = unsafe { LB6_SOCK_REVNAT_V1.get(key) } {
        let (addr, port) = (original.addr, original.port);
        // SAFETY: getpeername6/recvmsg6 may write the address they return.
        unsafe {
            write_ip6(core::ptr::addr_of_mut!((*sa).user_ip6), addr);
            (*sa).user_port = u32::from(port.to_be());
        }
    }
    ALLOW
}

#[inline(always)]
pub fn connect4(ctx: &SockAddrContext) -> i32 {
    translate(ctx)
}

#[inline(always)]
pub fn sendmsg4(ctx: &SockAddrContext) -> i32 {
    translate(ctx)
}

#[inline(always)]
pub fn recvmsg4(ctx: &SockAddrContext) -> i32 {
    reverse(ctx)
}

#[inline(always)]
pub fn getpeername4(ctx: &SockAddrContext) -> i32 {
    reverse(ctx)
}

#[inline(always)]
pub fn connect6(ctx: &SockAddrContext) -> i32 {
    translate6(ctx)
}

#[inline(always)]
pub fn sendmsg6(ctx: &SockAddrContext) -> i32 {
    translate6(ctx)
}

#[inline(always)]
pub fn recvmsg6(ctx: &SockAddrContext) -> i32 {
    reverse6(ctx)
}

#[inline(always)]
pub fn getpeername6(ctx: &SockAddrContext) -> i32 {
    reverse6(ctx)
}

/// A socket of the cgroup is being released (closed by its last user):
/// its reverse entry for the peer it was connected to goes with it, so the
/// LRU holds live sockets only and inserts for new connections do not have
/// to evict (an unconnected UDP socket's per-peer entries age out).
#[inline(always)]
pub fn release(ctx: &SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: the context is the kernel's bpf_sock of the released socket.
    if unsafe { (*sk).family } == AF_INET6 {
        return release6(ctx);
    }
    // SAFETY: as above.
    let (ip, port) = unsafe { ((*sk).dst_ip4, (*sk).dst_port) };
    if ip == 0 {
        return ALLOW;
    }
    let key = Lb4SockKey {
        cookie: unsafe { bpf_get_socket_cookie(sk.cast()) },
        addr: ip.to_ne_bytes(),
        // dst_port is network order.
        port: u16::from_be(port),
        _pad: [0; 2],
    };
    let _ = LB4_SOCK_REVNAT_V1.remove(key);
    ALLOW
}

/// [`release`] for an IPv6 socket, in `LB6_SOCK_REVNAT_V1`.
#[inline(always)]
fn release6(ctx: &SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: the released socket's peer, word by word.
    let (addr, port) = unsafe { (read_ip6(core::ptr::addr_of!((*sk).dst_ip6)), (*sk).dst_port) };
    if addr == [0; 16] {
        return ALLOW;
    }
    let key = Lb6SockKey {
        cookie: unsafe { bpf_get_socket_cookie(sk.cast()) },
        addr,
        port: u16::from_be(port),
        _pad: [0; 6],
    };
    let _ = LB6_SOCK_REVNAT_V1.remove(key);
    ALLOW
}
