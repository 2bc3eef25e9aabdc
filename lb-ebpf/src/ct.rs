//! Connection tracking: one LRU entry per direction of each balanced flow.

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    backend::Lb4Backend,
    conntrack::{DIR_FORWARD, DIR_REPLY, Lb4CtEntry, Lb4CtKey, TCP_FIN, TCP_RST},
    service::Lb4Service,
    stats::Reason,
};

use crate::{
    LB4_BACKENDS_V1, LB4_CT_V1,
    parse::{self, Flow},
};

/// A copy of the flow's entry, if it is tracked.
#[inline(always)]
pub fn lookup(key: &Lb4CtKey) -> Option<Lb4CtEntry> {
    unsafe { LB4_CT_V1.get(key) }.copied()
}

/// Whether the backend a forward entry points at is still programmed at the
/// same address (a removed backend must not get new connections).
#[inline(always)]
pub fn backend_still_valid(entry: &Lb4CtEntry) -> bool {
    match unsafe { LB4_BACKENDS_V1.get(entry.backend_id) } {
        Some(backend) => backend.addr == entry.nat_addr && backend.port == entry.nat_port,
        None => false,
    }
}

/// Updates the entry's activity: last seen, counters, TCP close flags.
#[inline(always)]
pub fn touch(flow: &Flow, len: u32, now: u64) {
    if let Some(entry) = LB4_CT_V1.get_ptr_mut(flow.key) {
        // Plain (not atomic) updates: counters are approximate by design.
        unsafe {
            (*entry).last_seen_ns = now;
            (*entry).packets += 1;
            (*entry).bytes += len as u64;
            if flow.tcp_flags & parse::TCP_FIN != 0 {
                (*entry).tcp_flags |= TCP_FIN;
            }
            if flow.tcp_flags & parse::TCP_RST != 0 {
                (*entry).tcp_flags |= TCP_RST;
            }
        }
    }
}

/// Records a new flow: the forward entry (client -> frontend, to rewrite
/// the destination) and the reply entry (backend -> client, to rewrite the
/// source back to the frontend).
#[inline(always)]
pub fn create(
    flow: &Flow,
    service: &Lb4Service,
    backend_id: u32,
    backend: &Lb4Backend,
    len: u32,
    now: u64,
) -> Result<(), Reason> {
    let forward = Lb4CtEntry {
        nat_addr: backend.addr,
        nat_port: backend.port,
        direction: DIR_FORWARD,
        tcp_flags: 0,
        service_id: service.service_id,
        backend_id,
        created_ns: now,
        last_seen_ns: now,
        packets: 1,
        bytes: len as u64,
    };
    let reply_key = Lb4CtKey {
        src_addr: backend.addr,
        dst_addr: flow.key.src_addr,
        src_port: backend.port,
        dst_port: flow.key.src_port,
        proto: flow.key.proto,
        _pad: [0; 3],
    };
    let reply = Lb4CtEntry {
        nat_addr: flow.key.dst_addr,
        nat_port: flow.key.dst_port,
        direction: DIR_REPLY,
        packets: 0,
        bytes: 0,
        ..forward
    };
    // Reply first: once the forward entry exists, replies must find theirs.
    LB4_CT_V1
        .insert(reply_key, reply, BPF_ANY as u64)
        .map_err(|_| Reason::DropCtFull)?;
    LB4_CT_V1
        .insert(flow.key, forward, BPF_ANY as u64)
        .map_err(|_| Reason::DropCtFull)
}
