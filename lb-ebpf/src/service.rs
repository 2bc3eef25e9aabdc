//! Service lookup and backend selection: the client's session affinity
//! backend, else the frontend's Maglev table (when it has one), else a
//! random slot.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_get_prandom_u32};
use lb_common::{
    affinity::{Lb4Affinity, Lb4AffinityKey, Lb6AffinityKey},
    backend::{Lb4Backend, Lb6Backend},
    conntrack::{Lb4CtKey, Lb6CtKey},
    maglev::{CHUNK_SLOTS, Lb4MaglevKey, flow_hash, flow_hash6_words},
    member::Lb4MemberKey,
    service::{
        FLAG_ADDRESS, FLAG_HAS_INTERNAL, FLAG_LOCAL_ONLY, FLAG_MAGLEV, Lb4Service, Lb4ServiceKey,
        Lb6ServiceKey, SCOPE_EXTERNAL, SCOPE_INTERNAL,
    },
    slot::Lb4SlotKey,
    stats::Reason,
};

use crate::{
    Hook, LB_CONFIG_V3, LB4_AFFINITY_V1, LB4_BACKENDS_V1, LB4_MAGLEV_V1, LB4_MEMBERS_V1,
    LB4_SERVICES_V1, LB4_SLOTS_V1, LB6_AFFINITY_V1, LB6_BACKENDS_V1, LB6_SERVICES_V1,
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

/// Whether the flow's source is a frontend (address, port, protocol): a
/// reply already translated back.
#[inline(always)]
pub fn is_frontend_source(flow: &Lb4CtKey) -> bool {
    let key = Lb4ServiceKey {
        addr: flow.src_addr,
        port: flow.src_port,
        proto: flow.proto,
        scope: SCOPE_EXTERNAL,
    };
    unsafe { LB4_SERVICES_V1.get(key) }.is_some()
}

/// Whether `addr` is a ClusterIP (its address marker exists): the source
/// of a later fragment of a translated reply, which carries no ports.
#[inline(always)]
pub fn is_cluster_ip(addr: [u8; 4]) -> bool {
    let key = Lb4ServiceKey {
        addr,
        port: 0,
        proto: 0,
        scope: SCOPE_EXTERNAL,
    };
    unsafe { LB4_SERVICES_V1.get(key) }.is_some_and(|s| s.flags & FLAG_ADDRESS != 0)
}

/// [`is_cluster_ip`] for an IPv6 address.
#[inline(always)]
pub fn is_cluster_ip6(addr: [u8; 16]) -> bool {
    let key = Lb6ServiceKey {
        addr,
        port: 0,
        proto: 0,
        scope: SCOPE_EXTERNAL,
    };
    unsafe { LB6_SERVICES_V1.get(key) }.is_some_and(|s| s.flags & FLAG_ADDRESS != 0)
}

/// [`is_frontend_source`] for an IPv6 flow.
#[inline(always)]
pub fn is_frontend_source6(flow: &Lb6CtKey) -> bool {
    let key = Lb6ServiceKey {
        addr: flow.src_addr,
        port: flow.src_port,
        proto: flow.proto,
        scope: SCOPE_EXTERNAL,
    };
    unsafe { LB6_SERVICES_V1.get(key) }.is_some()
}

/// How a backend was chosen.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    Random,
    Affinity,
    Maglev,
}

/// A chosen backend, and how it was chosen.
pub struct Choice {
    pub backend_id: u32,
    pub backend: Lb4Backend,
    pub how: Selection,
}

/// Picks the backend of a new flow: the client's affinity backend while it
/// is younger than the service's timeout and still a member of the service,
/// else (a Maglev frontend) `table[flow_hash(5-tuple) % M]`, else one
/// uniformly at random among the slots; then remembered for affinity. A
/// Maglev table that is missing or names a backend that is gone (a table
/// being rewritten, another M) falls back to the random slot: never a drop.
#[inline(always)]
pub fn select_backend(service: &Lb4Service, flow: &Lb4CtKey, now: u64) -> Result<Choice, Reason> {
    check_not_empty(service)?;
    let affinity_key = Lb4AffinityKey {
        client: flow.src_addr,
        service_id: service.service_id,
    };
    if service.affinity_timeout != 0
        && let Some(choice) = affinity_backend(service, &affinity_key, now)
    {
        return Ok(choice);
    }
    let maglev = if service.flags & FLAG_MAGLEV != 0 {
        maglev_backend(service, flow)
    } else {
        None
    };
    let (backend_id, backend, how) = match maglev {
        Some((id, backend)) => (id, backend, Selection::Maglev),
        None => {
            let (id, backend) = random_backend(service)?;
            (id, backend, Selection::Random)
        }
    };
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
        how,
    })
}

/// [`lookup_service`] for an IPv6 flow, in `LB6_SERVICES_V1`.
#[inline(always)]
pub fn lookup_service6(flow: &Lb6CtKey, hook: Hook) -> Option<Lb4Service> {
    let mut key = Lb6ServiceKey {
        addr: flow.dst_addr,
        port: flow.dst_port,
        proto: flow.proto,
        scope: SCOPE_EXTERNAL,
    };
    let external = unsafe { LB6_SERVICES_V1.get(key) }.copied()?;
    if hook == Hook::FromPod && external.flags & FLAG_HAS_INTERNAL != 0 {
        key.scope = SCOPE_INTERNAL;
        if let Some(internal) = unsafe { LB6_SERVICES_V1.get(key) } {
            return Some(*internal);
        }
    }
    Some(external)
}

/// [`is_service_address`] for an IPv6 flow.
#[inline(always)]
pub fn is_service_address6(flow: &Lb6CtKey) -> bool {
    let key = Lb6ServiceKey {
        addr: flow.dst_addr,
        port: 0,
        proto: 0,
        scope: SCOPE_EXTERNAL,
    };
    unsafe { LB6_SERVICES_V1.get(key) }.is_some_and(|s| s.flags & FLAG_ADDRESS != 0)
}

/// The backend of a new IPv6 flow: the client's affinity backend (as
/// [`select_backend`], in `LB6_AFFINITY_V1`), else (a Maglev frontend) the
/// table's, else one of the service's slots (shared with IPv4 in
/// `LB4_SLOTS_V1`, ids are one space) at random, read in `LB6_BACKENDS_V1`,
/// and remembered for affinity.
#[inline(always)]
pub fn select_backend6(
    service: &Lb4Service,
    flow: &Lb6CtKey,
    now: u64,
) -> Result<(u32, Lb6Backend, Selection), Reason> {
    check_not_empty(service)?;
    let key = Lb6AffinityKey {
        client: flow.src_addr,
        service_id: service.service_id,
    };
    if service.affinity_timeout != 0
        && let Some(entry) = LB6_AFFINITY_V1.get_ptr_mut(key)
    {
        // SAFETY: the map's value for this key; only its timestamp is
        // written, racing writers store the same kind of value.
        let (backend_id, last_seen) = unsafe { ((*entry).backend_id, (*entry).last_seen_ns) };
        if affinity_holds(service, backend_id, last_seen, now)
            && let Some(backend) = unsafe { LB6_BACKENDS_V1.get(backend_id) }
        {
            unsafe { (*entry).last_seen_ns = now };
            return Ok((backend_id, *backend, Selection::Affinity));
        }
    }
    let maglev = if service.flags & FLAG_MAGLEV != 0 {
        maglev_slot(service, hash6(flow))
            .and_then(|id| unsafe { LB6_BACKENDS_V1.get(id) }.map(|b| (id, *b)))
    } else {
        None
    };
    let (backend_id, backend, how) = match maglev {
        Some((id, backend)) => (id, backend, Selection::Maglev),
        None => {
            let id = random_slot(service)?;
            let backend = *unsafe { LB6_BACKENDS_V1.get(id) }.ok_or(Reason::DropBackendMissing)?;
            (id, backend, Selection::Random)
        }
    };
    if service.affinity_timeout != 0 {
        let entry = Lb4Affinity {
            backend_id,
            _pad: 0,
            last_seen_ns: now,
        };
        // A full LRU evicts the oldest client; losing affinity is no drop.
        let _ = LB6_AFFINITY_V1.insert(key, entry, BPF_ANY as u64);
    }
    Ok((backend_id, backend, how))
}

/// Whether a client's affinity to `backend_id`, last used at `last_seen`,
/// still holds: younger than the service's timeout, and the backend still
/// a member of the service (one that left does not hold its clients).
#[inline(always)]
fn affinity_holds(service: &Lb4Service, backend_id: u32, last_seen: u64, now: u64) -> bool {
    let timeout_ns = service.affinity_timeout as u64 * 1_000_000_000;
    if now.saturating_sub(last_seen) >= timeout_ns {
        return false;
    }
    let member = Lb4MemberKey {
        service_id: service.service_id,
        backend_id,
    };
    unsafe { LB4_MEMBERS_V1.get(member) }.is_some()
}

/// An empty backend set is a drop: `drop_no_local_backend` for a Local
/// entry, `drop_no_backend` otherwise.
#[inline(always)]
fn check_not_empty(service: &Lb4Service) -> Result<(), Reason> {
    if service.backend_count == 0 {
        return Err(if service.flags & FLAG_LOCAL_ONLY != 0 {
            Reason::DropNoLocalBackend
        } else {
            Reason::DropNoBackend
        });
    }
    Ok(())
}

/// The backend id in one of the service's slots, uniformly at random
/// (the set is not empty).
#[inline(always)]
fn random_slot(service: &Lb4Service) -> Result<u32, Reason> {
    let slot = unsafe { bpf_get_prandom_u32() } % service.backend_count;
    let key = Lb4SlotKey {
        service_id: service.service_id,
        revision: service.revision,
        slot,
    };
    Ok(unsafe { LB4_SLOTS_V1.get(key) }
        .ok_or(Reason::DropBackendMissing)?
        .backend_id)
}

/// One of the service's backends, uniformly at random.
#[inline(always)]
fn random_backend(service: &Lb4Service) -> Result<(u32, Lb4Backend), Reason> {
    let backend_id = random_slot(service)?;
    let backend = *unsafe { LB4_BACKENDS_V1.get(backend_id) }.ok_or(Reason::DropBackendMissing)?;
    Ok((backend_id, backend))
}

/// The backend the frontend's Maglev table gives this 5-tuple, the same on
/// every node that has the same EndpointSlice.
#[inline(always)]
fn maglev_backend(service: &Lb4Service, flow: &Lb4CtKey) -> Option<(u32, Lb4Backend)> {
    let backend_id = maglev_slot(service, flow_hash(flow))?;
    let backend = *unsafe { LB4_BACKENDS_V1.get(backend_id) }?;
    Some((backend_id, backend))
}

/// `flow_hash6` of a tuple in the scratch space, whose addresses sit at
/// 4-byte aligned offsets of the map value: read a word at a time.
#[inline(always)]
fn hash6(flow: &Lb6CtKey) -> u32 {
    let src = flow.src_addr.as_ptr() as *const u32;
    let dst = flow.dst_addr.as_ptr() as *const u32;
    // SAFETY: 16 readable bytes each, 4-aligned (the key starts the
    // scratch entry, an 8-aligned map value; the addresses are at 0, 16).
    let (src, dst) = unsafe {
        (
            [0, 1, 2, 3].map(|i| u32::from_be(src.add(i).read())),
            [0, 1, 2, 3].map(|i| u32::from_be(dst.add(i).read())),
        )
    };
    flow_hash6_words(&src, &dst, flow)
}

/// The backend id at `table[hash % M]` of the frontend's Maglev table
/// (`LB4_MAGLEV_V1`, keyed by service id: both families); `None` when the
/// table, its chunk or the slot is missing.
#[inline(always)]
fn maglev_slot(service: &Lb4Service, hash: u32) -> Option<u32> {
    let table_size = LB_CONFIG_V3.get(0)?.maglev_table_size;
    if table_size == 0 {
        return None;
    }
    let slot = hash % table_size;
    let key = Lb4MaglevKey {
        service_id: service.service_id,
        table_size,
        chunk: slot / CHUNK_SLOTS,
    };
    let chunk = unsafe { LB4_MAGLEV_V1.get(key) }?;
    // A power-of-two mask: the verifier sees the index in bounds.
    let backend_id = chunk.backend_ids[(slot & (CHUNK_SLOTS - 1)) as usize];
    (backend_id != 0).then_some(backend_id)
}

#[inline(always)]
fn affinity_backend(service: &Lb4Service, key: &Lb4AffinityKey, now: u64) -> Option<Choice> {
    let entry = LB4_AFFINITY_V1.get_ptr_mut(*key)?;
    // SAFETY: the pointer is the map's value for this key; only its
    // timestamp is written, racing writers store the same kind of value.
    let (backend_id, last_seen) = unsafe { ((*entry).backend_id, (*entry).last_seen_ns) };
    if !affinity_holds(service, backend_id, last_seen, now) {
        return None;
    }
    let backend = *unsafe { LB4_BACKENDS_V1.get(backend_id) }?;
    unsafe { (*entry).last_seen_ns = now };
    Some(Choice {
        backend_id,
        backend,
        how: Selection::Affinity,
    })
}
