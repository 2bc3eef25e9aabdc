//! Per-CPU verdict and drop-reason counters.

use lb_common::stats::Reason;

use crate::LB_STATS_V1;

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
