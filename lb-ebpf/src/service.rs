//! Service lookup and backend selection.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{
    backend::Lb4Backend,
    conntrack::Lb4CtKey,
    service::{
        FLAG_HAS_INTERNAL, FLAG_LOCAL_ONLY, Lb4Service, Lb4ServiceKey, SCOPE_EXTERNAL,
        SCOPE_INTERNAL,
    },
    slot::Lb4SlotKey,
    stats::Reason,
};

use crate::{Hook, LB4_BACKENDS_V1, LB4_SERVICES_V1, LB4_SLOTS_V1};

/// The service whose frontend is the flow's destination, if any, in the
/// view the hook gets: pods see the internal entry of a frontend that has
/// one. Non-service traffic costs one lookup.
#[inline(always)]
pub fn lookup_service(flow: &Lb4CtKey, hook: Hook) -> Option<Lb4Service> {
    let mut key = Lb4ServiceKey {
        addr: flow.dst_addr,
        port: flow.dst_port,
        proto: flow.proto,
        scope: SCOPE_EXTERNAL,
    };
    let external = unsafe { LB4_SERVICES_V1.get(key) }.copied()?;
    if hook == Hook::FromPod && external.flags & FLAG_HAS_INTERNAL != 0 {
        key.scope = SCOPE_INTERNAL;
        if let Some(internal) = unsafe { LB4_SERVICES_V1.get(key) } {
            return Some(*internal);
        }
    }
    Some(external)
}

/// Picks a backend uniformly at random among the service's slots.
#[inline(always)]
pub fn select_backend(service: &Lb4Service) -> Result<(u32, Lb4Backend), Reason> {
    if service.backend_count == 0 {
        return Err(if service.flags & FLAG_LOCAL_ONLY != 0 {
            Reason::DropNoLocalBackend
        } else {
            Reason::DropNoBackend
        });
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
