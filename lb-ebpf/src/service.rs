//! Service lookup and backend selection.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{
    backend::Lb4Backend,
    conntrack::Lb4CtKey,
    service::{Lb4Service, Lb4ServiceKey, SCOPE_EXTERNAL},
    slot::Lb4SlotKey,
    stats::Reason,
};

use crate::{LB4_BACKENDS_V1, LB4_SERVICES_V1, LB4_SLOTS_V1};

/// The service whose frontend is the flow's destination, if any.
#[inline(always)]
pub fn lookup_service(flow: &Lb4CtKey) -> Option<Lb4Service> {
    let key = Lb4ServiceKey {
        addr: flow.dst_addr,
        port: flow.dst_port,
        proto: flow.proto,
        scope: SCOPE_EXTERNAL,
    };
    unsafe { LB4_SERVICES_V1.get(key) }.copied()
}

/// Picks a backend uniformly at random among the service's slots.
#[inline(always)]
pub fn select_backend(service: &Lb4Service) -> Result<(u32, Lb4Backend), Reason> {
    if service.backend_count == 0 {
        return Err(Reason::DropNoBackend);
    }
    let slot = unsafe { bpf_get_prandom_u32() } % service.backend_count;
    let key = Lb4SlotKey {
        service_id: service.service_id,
        revision: service.revision,
        slot,
    };
    let backend_id = unsafe { LB4_SLOTS_V1.get(key) }
        .ok_or(Reason::DropBackendMissing)?
        .backend_id;
    let backend = unsafe { LB4_BACKENDS_V1.get(backend_id) }.ok_or(Reason::DropBackendMissing)?;
    Ok((backend_id, *backend))
}
