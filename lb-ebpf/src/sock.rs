//! Socket-level balancing: cgroup hooks that translate at the socket, once
//! per connection (or per unconnected datagram) instead of once per packet.
//! `connect4` and `sendmsg4` rewrite a service destination to the chosen
//! backend, with the same selection as the packet path; `getpeername4` and
//! `recvmsg4` show the service address back through `LB4_SOCK_REVNAT_V1`.
//! Translated sockets talk to the backend directly, so the packet path sees
//! plain pod traffic and nothing is translated twice.

use aya_ebpf::{
    bindings::{BPF_ANY, bpf_sock_addr},
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    programs::{SockAddrContext, SockContext},
};
use lb_common::{
    PROTO_TCP, PROTO_UDP,
    conntrack::Lb4CtKey,
    sock::{Lb4SockKey, Lb4SockRevnat},
    stats::Reason,
};

use crate::{Hook, LB4_SOCK_REVNAT_V1, service, stats};

const ECONNREFUSED: i32 = 111;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

/// What the hook tells the kernel: 1 lets the call go on, 0 fails it.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[inline(always)]
fn sock_addr(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
    ctx.sock_addr
}

/// The destination the application asked for, as a 5-tuple with an
/// unknown source (the socket may not be bound yet).
#[inline(always)]
fn requested(ctx: &SockAddrContext) -> Option<Lb4CtKey> {
    let sa = sock_addr(ctx);
    // SAFETY: the context is the kernel's bpf_sock_addr for this call.
    let (ip, port, type_) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).type_) };
    let proto = match type_ {
        SOCK_STREAM => PROTO_TCP,
        SOCK_DGRAM => PROTO_UDP,
        _ => return None,
    };
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
    let now = unsafe { bpf_ktime_get_ns() };
    let choice = match service::select_backend(&svc, &key, now) {
        Ok(choice) => choice,
        Err(reason) => {
            stats::count(Reason::SockRefused, 0);
            if reason == Reason::DropNoBackend {
                // SAFETY: sets the syscall's return value (kernel 5.18+).
                unsafe { bpf_set_retval(-ECONNREFUSED) };
            }
            return DENY;
        }
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

/// A socket of the cgroup is being released (closed by its last user):
/// its reverse entry for the peer it was connected to goes with it, so the
/// LRU holds live sockets only and inserts for new connections do not have
/// to evict (an unconnected UDP socket's per-peer entries age out).
#[inline(always)]
pub fn release(ctx: &SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: the context is the kernel's bpf_sock of the released socket.
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
