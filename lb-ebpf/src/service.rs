//! Service lookup and backend selection (random, or the client's session
//! affinity backend).

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_get_prandom_u32};
use lb_common::{
    affinity::{Lb4Affinity, Lb4AffinityKey},
    backend::Lb4Backend,
    conntrack::Lb4CtKey,
    member::Lb4MemberKey,
    service::{
        FLAG_ADDRESS, FLAG_HAS_INTERNAL, FLAG_LOCAL_ONLY, Lb4Service, Lb4ServiceKey,
        SCOPE_EXTERNAL, SCOPE_INTERNAL,
    },
    slot::Lb4SlotKey,
    stats::Reason,
};

use crate::{
    Hook, LB4_AFFINITY_V1, LB4_BACKENDS_V1, LB4_MEMBERS_V1, LB4_SERVICES_V1, LB4_SLOTS_V1,
};

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

/// Whether the flow's destination address is a ClusterIP (an address
/// marker entry exists), whatever the port.
#[inline(always)]
pub fn is_service_address(flow: &Lb4CtKey) -> bool {
    let key = Lb4ServiceKey {
        addr: flow.dst_addr,
        port: 0,
        proto: 0,
        scope: SCOPE_EXTERNAL,
    };
    unsafe { LB4_SERVICES_V1.get(key) }.is_some_and(|s| s.flags & FLAG_ADDRESS != 0)
}

/// A chosen backend, and whether session affinity chose it.
pub struct Choice {
    pub backend_id: u32,
    pub backend: Lb4Backend,
    pub by_affinity: bool,
}

/// Picks the backend of a new flow: the client's affinity backend while it
/// is younger than the service's timeout and still a member of the service,
/// else one uniformly at random among the slots (then remembered for
/// affinity).
#[inline(always)]
pub fn select_backend(service: &Lb4Service, flow: &Lb4CtKey, now: u64) -> Result<Choice, Reason> {
    if service.backend_count == 0 {
        return Err(if service.flags & FLAG_LOCAL_ONLY != 0 {
            Reason::DropNoLocalBackend
        } else {
            Reason::DropNoBackend
        });
    }
    let affinity_key = Lb4AffinityKey {
        client: flow.src_addr,
        service_id: service.service_id,
    };
    if service.affinity_timeout != 0
        && let Some(choice) = affinity_backend(service, &affinity_key, now)
    {
        return Ok(choice);
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
    let backend = *unsafe { LB4_BACKENDS_V1.get(backend_id) }.ok_or(Reason::DropBackendMissing)?;
    if service.affinity_timeout != 0 {
        let entry = Lb4Affinity {
            backend_id,
            _pad: 0,
            last_seen_ns: now,
        };
        // A full LRU evicts the oldest client; losing affinity is no drop.
        let _ = LB4_AFFINITY_V1.insert(affinity_key, entry, BPF_ANY as u64);
    }
    Ok(Choice {
        backend_id,
        backend,
        by_affinity: false,
    })
}

#[inline(always)]
fn affinity_backend(service: &Lb4Service, key: &Lb4AffinityKey, now: u64) -> Option<Choice> {
    let entry = LB4_AFFINITY_V1.get_ptr_mut(*key)?;
    // SAFETY: the pointer is the map's value for this key; only its
    // timestamp is written, racing writers store the same kind of value.
    let (backend_id, last_seen) = unsafe { ((*entry).backend_id, (*entry).last_seen_ns) };
    let timeout_ns = service.affinity_timeout as u64 * 1_000_000_000;
    if now.wrapping_sub(last_seen) >= timeout_ns {
        return None;
    }
    let member = Lb4MemberKey {
        service_id: service.service_id,
        backend_id,
    };
    // A backend that left the service does not hold its clients.
    unsafe { LB4_MEMBERS_V1.get(member) }?;
    let backend = *unsafe { LB4_BACKENDS_V1.get(backend_id) }?;
    unsafe { (*entry).last_seen_ns = now };
    Some(Choice {
        backend_id,
        backend,
        by_affinity: true,
    })
}
