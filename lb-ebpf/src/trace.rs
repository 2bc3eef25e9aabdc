//! Flow tracing and program logging, both off unless asked for: what a
//! packet matched is collected in an [`Observation`] on the stack while it
//! is processed, and only a new flow or a drop looks at the config flags
//! (one array lookup); established traffic never does.
//!
//! - `FLAG_TRACE` (set by `lbctl trace` while it runs): one
//!   [`TraceEvent`] per new flow and per drop into the `LB_TRACE_V2` ring
//!   buffer. A full ring loses the event, never the packet.
//! - `FLAG_LOG` (agent `--bpf-log`): the same as an aya-log debug line.

use aya_ebpf::EbpfContext;
use lb_common::{
    config::{FLAG_LOG, FLAG_TRACE},
    service::{FLAG_LOCAL_ONLY, Lb4Service},
    stats::Reason,
    trace::{
        EVENT_DROP, EVENT_NEW_FLOW, FAMILY_IPV4, FAMILY_IPV6, HOOK_HOST, HOOK_NETWORK, HOOK_POD,
        SELECT_AFFINITY, SELECT_LOCAL, SELECT_MAGLEV, SELECT_NONE, SELECT_RANDOM,
    },
};

use crate::{Hook, LB_CONFIG_V3, LB_TRACE_V2, LB6_SCRATCH};

/// What processing learned about a packet, for per-service counters and
/// tracing. Zero ids mean "not known" (ids start at 1).
#[derive(Clone, Copy, Default)]
pub struct Observation {
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// `SELECT_*` of a new flow's backend.
    pub selection: u8,
    pub service_id: u32,
    pub backend_id: u32,
    pub backend_addr: [u8; 4],
    pub backend_port: u16,
    /// An IPv6 hairpin flow (the IPv6 path rewrites the packet itself and
    /// leaves the redirect back out of the device to the TC entry point).
    /// In what was padding: the struct does not grow.
    pub hairpin: bool,
    /// An IPv6 packet whose TCP/UDP tuple was parsed: the addresses above
    /// stay zero, the trace reads the 128-bit ones from the IPv6 path's
    /// scratch space (`LB6_SCRATCH`), which holds this packet's tuple and
    /// backend. Padding as well.
    pub ipv6: bool,
}

impl Observation {
    /// Records the service a packet matched and how its backends are chosen.
    #[inline(always)]
    pub fn service(&mut self, service: &Lb4Service) {
        self.service_id = service.service_id;
        self.selection = if service.flags & FLAG_LOCAL_ONLY != 0 {
            SELECT_LOCAL
        } else {
            SELECT_RANDOM
        };
    }

    /// Records the backend a flow was given (or is tracked to).
    #[inline(always)]
    pub fn backend(&mut self, backend_id: u32, addr: [u8; 4], port: u16) {
        self.backend_id = backend_id;
        self.backend_addr = addr;
        self.backend_port = port;
    }
}

/// Emits the trace event and log line of a new flow or a drop, if enabled.
#[inline(always)]
pub fn record<C: EbpfContext>(ctx: &C, obs: &Observation, reason: Reason, hook: Hook) {
    let new_flow = matches!(
        reason,
        Reason::NewFlow | Reason::NewFlowAffinity | Reason::NewFlowMaglev
    );
    if !new_flow && !reason.is_drop() {
        return;
    }
    let flags = match LB_CONFIG_V3.get(0) {
        Some(config) => config.flags,
        None => return,
    };
    if flags & (FLAG_TRACE | FLAG_LOG) == 0 {
        return;
    }
    let selection = match reason {
        Reason::NewFlowAffinity => SELECT_AFFINITY,
        Reason::NewFlowMaglev => SELECT_MAGLEV,
        _ if new_flow => obs.selection,
        _ => SELECT_NONE,
    };
    if flags & FLAG_TRACE != 0 {
        emit_event(obs, reason, hook, new_flow, selection);
    }
    if flags & FLAG_LOG != 0 {
        log_event(ctx, obs, reason, new_flow);
    }
}

/// Writes the event straight into the ring (no copy on the stack, whose
/// 512 bytes the dispatch mostly needs). A full ring loses the event; the
/// packet goes on regardless.
#[inline(never)]
fn emit_event(obs: &Observation, reason: Reason, hook: Hook, new_flow: bool, selection: u8) {
    let Some(mut entry) = LB_TRACE_V2.reserve(0) else {
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved, exclusively owned TraceEvent;
    // every field is written before submit.
    unsafe {
        (*event).timestamp_ns = aya_ebpf::helpers::bpf_ktime_get_ns();
        let scratch = if obs.ipv6 { LB6_SCRATCH.get(0) } else { None };
        match scratch {
            Some(scratch) => {
                (*event).family = FAMILY_IPV6;
                (*event).src_addr = scratch.flow.key.src_addr;
                (*event).dst_addr = scratch.flow.key.dst_addr;
                (*event).backend_addr = if new_flow {
                    scratch.backend_addr
                } else {
                    [0; 16]
                };
            }
            None => {
                (*event).family = FAMILY_IPV4;
                (*event).src_addr = widen(obs.src_addr);
                (*event).dst_addr = widen(obs.dst_addr);
                (*event).backend_addr = widen(obs.backend_addr);
            }
        }
        (*event).src_port = obs.src_port;
        (*event).dst_port = obs.dst_port;
        (*event).proto = obs.proto;
        (*event).kind = if new_flow { EVENT_NEW_FLOW } else { EVENT_DROP };
        (*event).selection = selection;
        (*event).hook = match hook {
            Hook::FromPod => HOOK_POD,
            Hook::FromNetwork => HOOK_NETWORK,
            Hook::FromHost => HOOK_HOST,
        };
        (*event).reason = reason as u32;
        (*event).service_id = obs.service_id;
        (*event).backend_id = obs.backend_id;
        (*event).backend_port = obs.backend_port;
        (*event)._pad = 0;
    }
    entry.submit(0);
}

/// An IPv4 address in the first four bytes of an event's address field.
#[inline(always)]
fn widen(addr: [u8; 4]) -> [u8; 16] {
    let mut wide = [0; 16];
    wide[..4].copy_from_slice(&addr);
    wide
}

/// Out of line: the log macros' buffers must not add to the dispatch's stack.
#[inline(never)]
fn log_event<C: EbpfContext>(ctx: &C, obs: &Observation, reason: Reason, new_flow: bool) {
    if obs.ipv6 {
        log_event6(ctx, obs, reason, new_flow);
        return;
    }
    if new_flow {
        aya_log_ebpf::debug!(
            ctx,
            "new flow {:i}:{} -> {:i}:{} proto {} service {} -> backend {} {:i}:{}",
            obs.src_addr,
            obs.src_port,
            obs.dst_addr,
            obs.dst_port,
            obs.proto,
            obs.service_id,
            obs.backend_id,
            obs.backend_addr,
            obs.backend_port
        );
    } else {
        aya_log_ebpf::debug!(
            ctx,
            "drop {:i}:{} -> {:i}:{} proto {} service {} reason {}",
            obs.src_addr,
            obs.src_port,
            obs.dst_addr,
            obs.dst_port,
            obs.proto,
            obs.service_id,
            reason as u32
        );
    }
}

/// [`log_event`] of an IPv6 packet: the addresses from the scratch space,
/// as for the trace event.
#[inline(always)]
fn log_event6<C: EbpfContext>(ctx: &C, obs: &Observation, reason: Reason, new_flow: bool) {
    let Some(scratch) = LB6_SCRATCH.get(0) else {
        return;
    };
    let key = &scratch.flow.key;
    if new_flow {
        aya_log_ebpf::debug!(
            ctx,
            "new flow [{:i}]:{} -> [{:i}]:{} proto {} service {} -> backend {} [{:i}]:{}",
            key.src_addr,
            obs.src_port,
            key.dst_addr,
            obs.dst_port,
            obs.proto,
            obs.service_id,
            obs.backend_id,
            scratch.backend_addr,
            obs.backend_port
        );
    } else {
        aya_log_ebpf::debug!(
            ctx,
            "drop [{:i}]:{} -> [{:i}]:{} proto {} service {} reason {}",
            key.src_addr,
            obs.src_port,
            key.dst_addr,
            obs.dst_port,
            obs.proto,
            obs.service_id,
            reason as u32
        );
    }
}
