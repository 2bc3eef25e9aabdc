//! Kernel programs of the load balancer: map declarations, entry points and
//! the dispatch between stages. The stages live in their own modules.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// On the host this crate is only type-checked (clippy); nothing here runs there.
#![cfg_attr(not(target_arch = "bpf"), allow(dead_code, unused_imports))]

mod ct;
mod nat;
mod parse;
mod service;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::{HashMap, LruHashMap, PerCpuArray},
    helpers::bpf_ktime_get_ns,
    macros::{btf_map, classifier},
    programs::TcContext,
};
use lb_common::{
    backend::{self, Lb4Backend},
    conntrack::{self, DIR_FORWARD, Lb4CtEntry, Lb4CtKey},
    service::{self as svc, Lb4Service, Lb4ServiceKey},
    slot::{self, Lb4Slot, Lb4SlotKey},
    stats::{self as st, Counter, Reason},
};

use crate::parse::Packet;

/// Frontends: (address, port, protocol, scope) -> service entry.
#[btf_map]
static LB4_SERVICES_V1: HashMap<Lb4ServiceKey, Lb4Service, { svc::MAX_ENTRIES as usize }> =
    HashMap::new();

/// Backend slots of each service revision: (service, revision, slot) -> backend id.
#[btf_map]
static LB4_SLOTS_V1: HashMap<Lb4SlotKey, Lb4Slot, { slot::MAX_ENTRIES as usize }> = HashMap::new();

/// Backends: id -> address, port, state.
#[btf_map]
static LB4_BACKENDS_V1: HashMap<u32, Lb4Backend, { backend::MAX_ENTRIES as usize }> =
    HashMap::new();

/// Connection tracking: 5-tuple -> translation, both directions of each flow.
#[btf_map]
static LB4_CT_V1: LruHashMap<Lb4CtKey, Lb4CtEntry, { conntrack::MAX_ENTRIES as usize }> =
    LruHashMap::new();

/// Per-CPU packet/byte counters indexed by [`Reason`].
#[btf_map]
static LB_STATS_V1: PerCpuArray<Counter, { st::MAX_ENTRIES as usize }> = PerCpuArray::new();

/// TC ingress on pod-facing and node devices: translates traffic to service
/// frontends into traffic to a backend, and replies back to the frontend.
#[classifier]
pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let reason = process_packet(&ctx).unwrap_or_else(|drop| drop);
    stats::count(reason, len);
    if reason.is_drop() {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}

/// Parses the packet, then either follows its tracked flow or balances a new
/// one. `Ok` carries the pass verdict's reason, `Err` a drop reason.
#[inline(always)]
fn process_packet(ctx: &TcContext) -> Result<Reason, Reason> {
    let flow = match parse::parse_packet(ctx)? {
        Packet::Flow(flow) => flow,
        Packet::NotIpv4 => return Ok(Reason::PassNotIpv4),
        Packet::OtherL4 => return Ok(Reason::PassOtherL4),
        Packet::Fragment => return Ok(Reason::PassFragment),
    };
    let now = unsafe { bpf_ktime_get_ns() };

    if let Some(entry) = ct::lookup(&flow.key) {
        // A SYN that hits an entry is a new connection reusing the tuple:
        // keep the old choice only while its backend is still programmed.
        let reuse = !flow.is_syn() || ct::backend_still_valid(&entry);
        if reuse {
            ct::touch(&flow, ctx.len(), now);
            return if entry.direction == DIR_FORWARD {
                nat::rewrite_dst(ctx, &flow, entry.nat_addr, entry.nat_port)?;
                Ok(Reason::CtForward)
            } else {
                nat::rewrite_src(ctx, &flow, entry.nat_addr, entry.nat_port)?;
                Ok(Reason::CtReply)
            };
        }
    }

    let Some(service) = service::lookup_service(&flow.key) else {
        return Ok(Reason::PassNotService);
    };
    let (backend_id, backend) = service::select_backend(&service)?;
    ct::create(&flow, &service, backend_id, &backend, ctx.len(), now)?;
    nat::rewrite_dst(ctx, &flow, backend.addr, backend.port)?;
    Ok(Reason::NewFlow)
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
