//! Per-CPU counters: per verdict and drop reason, and per service.

use aya_ebpf::bindings::BPF_NOEXIST;
use lb_common::{service_stats::LbServiceStats, stats::Reason};

use crate::{LB_SERVICE_STATS_V1, LB_STATS_V1, trace::Observation};

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
