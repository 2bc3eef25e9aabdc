//! Counters: per verdict and drop reason, and per service (per CPU), and
//! per (service, backend).

use aya_ebpf::bindings::BPF_NOEXIST;
use lb_common::{member::Lb4MemberKey, service_stats::LbServiceStats, stats::Reason};

use crate::{
    LB_BACKEND_STATS_V1, LB_SERVICE_STATS_V1, LB_STATS_V1, LB6_SCRATCH, trace::Observation,
};

/// [`count_backend`] events: a new flow balanced to the backend.
pub const BACKEND_NEW_FLOW: u8 = 0;
/// The flow's first answer (not a RST).
pub const BACKEND_ANSWERED: u8 = 1;
/// The flow's attempt refused: a RST as its first answer, or an ICMP
/// destination unreachable before any.
pub const BACKEND_FAILED: u8 = 2;

/// Counts one packet of `len` bytes under `reason`.
#[inline(always)]
pub fn count(reason: Reason, len: u32) {
    if let Some(counter) = LB_STATS_V1.get_ptr_mut(reason as u32) {
        // Per-CPU slot: no other writer runs concurrently on this CPU.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += len as u64;
        }
    }
}

/// Counts one packet of `len` bytes for the service it matched (if any)
/// in `LB_SERVICE_STATS_V1`.
#[inline(always)]
pub fn count_service(obs: &Observation, reason: Reason, len: u32) {
    if obs.service_id == 0 {
        return;
    }
    let mut counter = LB_SERVICE_STATS_V1.get_ptr_mut(obs.service_id);
    if counter.is_none() {
        // The service's first packet on this CPU since the entry was made or
        // evicted; another CPU may race us to it, which BPF_NOEXIST settles.
        let _ = LB_SERVICE_STATS_V1.insert(
            obs.service_id,
            LbServiceStats::default(),
            BPF_NOEXIST as u64,
        );
        counter = LB_SERVICE_STATS_V1.get_ptr_mut(obs.service_id);
    }
    let Some(stats) = counter else {
        return;
    };
    // Per-CPU value: no other writer runs concurrently on this CPU.
    unsafe {
        let counter = match reason {
            Reason::NewFlow | Reason::NewFlowAffinity | Reason::NewFlowMaglev => {
                // Here, in the new-flow arm that is there anyway: the
                // new-flow frames have no stack left for the count, and a
                // branch of its own would multiply the verifier's states.
                count_backend(obs.service_id, obs.backend_id, BACKEND_NEW_FLOW);
                &mut (*stats).new_flow
            }
            Reason::CtForward => &mut (*stats).ct_forward,
            Reason::CtReply => &mut (*stats).ct_reply,
            _ if reason.is_drop() => &mut (*stats).dropped,
            _ => return,
        };
        counter.packets += 1;
        counter.bytes += len as u64;
    }
}

/// Counts `event` (`BACKEND_*`) for (service, backend) in
/// `LB_BACKEND_STATS_V1`. Called where a flow starts and where its state
/// changes, never per established packet. The agent makes the entry with
/// the membership, so there is nothing to insert here (and no value on the
/// stack: the new-flow path is at the verifier's stack limit). Plain
/// adds, as the conntrack counters: two CPUs counting the same backend at
/// the same instant may lose one (the BPF target has no 64-bit atomic
/// read-modify-write in `core`).
#[inline(always)]
pub fn count_backend(service_id: u32, backend_id: u32, event: u8) {
    // Index 0 of a one-entry array always exists.
    let Some(scratch) = LB6_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch entry; nothing else runs on it meanwhile.
    let key = unsafe { &mut (*scratch).member_key };
    key.service_id = service_id;
    key.backend_id = backend_id;
    // The key in place (scratch memory): a copy would take stack.
    let Some(stats) = LB_BACKEND_STATS_V1.get_ptr_mut(key as &Lb4MemberKey) else {
        return;
    };
    // SAFETY: a map value, alive while the program runs.
    unsafe {
        match event {
            BACKEND_NEW_FLOW => (*stats).new_flows += 1,
            BACKEND_ANSWERED => (*stats).answered += 1,
            _ => {
                (*stats).failed += 1;
                (*stats).last_failed_ns = crate::ct::now();
            }
        }
    }
}
