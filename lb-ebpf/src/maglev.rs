//! Maglev backend choice: the slot of a new flow is
//! `flow_hash(5-tuple) % M`, its backend the one the agent wrote there in
//! `LB4_MAGLEV_V1` under the service entry's revision. The hash and the
//! table are the same on every node (`lb_common::maglev`), so is the choice.

use lb_common::{
    conntrack::Lb4CtKey,
    maglev::{CHUNK_SLOTS, Lb4MaglevKey, flow_hash},
    service::Lb4Service,
};

use crate::LB4_MAGLEV_V1;

/// The backend id Maglev assigns to a new flow of `service`, whose table
/// has `table_size` (M) slots; `None` when the table, its chunk or the slot
/// is missing (0: past the end of the table), which the caller counts as a
/// missing backend.
#[inline(always)]
pub fn lookup(service: &Lb4Service, key: &Lb4CtKey, table_size: u32) -> Option<u32> {
    // Also spares the `%` below its divide-by-zero panic path.
    if table_size == 0 {
        return None;
    }
    let slot = flow_hash(key) % table_size;
    let chunk_key = Lb4MaglevKey {
        service_id: service.service_id,
        revision: service.revision,
        chunk: slot / CHUNK_SLOTS,
    };
    let chunk = LB4_MAGLEV_V1.get_ptr(chunk_key)?;
    // CHUNK_SLOTS is a power of two: the mask bounds the index below the
    // array length, so there is no bounds-check panic and the verifier sees
    // an offset within the 256-byte value.
    let index = (slot & (CHUNK_SLOTS - 1)) as usize;
    // SAFETY: the pointer is the map's value for `chunk_key`, valid for the
    // rest of this program run (the map is BPF_F_NO_PREALLOC: a removed
    // chunk is freed after an RCU grace period); one aligned u32 is read.
    let backend_id = unsafe { (*chunk).backend_ids.get(index).copied() }?;
    (backend_id != 0).then_some(backend_id)
}
