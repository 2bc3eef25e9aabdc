//! Kernel programs of the load balancer: map declarations, entry points and
//! the dispatch between stages. The stages live in their own modules.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// On the host this crate is only type-checked (clippy); nothing here runs there.
#![cfg_attr(not(target_arch = "bpf"), allow(dead_code, unused_imports))]

mod ct;
mod nat;
mod parse;
mod policy;
mod service;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    helpers::bpf_ktime_get_ns,
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    backend::{self, Lb4Backend},
    config::{self, LbConfig},
    conntrack::{self, DIR_FORWARD, Lb4CtEntry, Lb4CtKey},
    service::{self as svc, Lb4Service, Lb4ServiceKey},
    slot::{self, Lb4Slot, Lb4SlotKey},
    source_range::{self, Lb4SourceRange, Lb4SourceRangeKey},
    stats::{self as st, Counter, Reason},
};

use crate::{
    nat::Translation,
    parse::{Flow, Packet, PacketBuf},
};

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
static LB4_CT_V2: LruHashMap<Lb4CtKey, Lb4CtEntry, { conntrack::MAX_ENTRIES as usize }> =
    LruHashMap::new();

/// loadBalancerSourceRanges: (service id, client prefix) -> allowed.
#[btf_map]
static LB4_SRC_RANGES_V1: LpmTrie<
    Lb4SourceRangeKey,
    Lb4SourceRange,
    { source_range::MAX_ENTRIES as usize },
> = LpmTrie::new();

/// Node-wide settings (index 0).
#[btf_map]
static LB_CONFIG_V1: Array<LbConfig, { config::MAX_ENTRIES as usize }> = Array::new();

/// Per-CPU packet/byte counters indexed by [`Reason`].
#[btf_map]
static LB_STATS_V1: PerCpuArray<Counter, { st::MAX_ENTRIES as usize }> = PerCpuArray::new();

/// Where a packet entered, which decides the service semantics it gets.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// From a pod on this node (pod-facing device): the internal view of
    /// externalTrafficPolicy=Local services, no SNAT.
    FromPod,
    /// From the network (node device): external view, SNAT when a backend
    /// on another node must send its reply back through this node.
    FromNetwork,
}

/// TC ingress on pod-facing devices.
#[classifier]
pub fn lb_tc_pod(ctx: TcContext) -> i32 {
    tc_verdict(&ctx, Hook::FromPod)
}

/// TC ingress on node devices where XDP is not available.
#[classifier]
pub fn lb_tc_node(ctx: TcContext) -> i32 {
    tc_verdict(&ctx, Hook::FromNetwork)
}

/// XDP on node devices: traffic from outside and replies from other nodes.
#[xdp]
pub fn lb_xdp_node(ctx: XdpContext) -> u32 {
    let len = ctx.len();
    let reason = match process_packet(&ctx, Hook::FromNetwork) {
        Ok((reason, translation)) => match nat::apply_xdp(&ctx, &translation) {
            Ok(()) => reason,
            Err(drop) => drop,
        },
        Err(drop) => drop,
    };
    stats::count(reason, len);
    if reason.is_drop() {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

#[inline(always)]
fn tc_verdict(ctx: &TcContext, hook: Hook) -> i32 {
    let len = ctx.len();
    let reason = match process_packet(ctx, hook) {
        Ok((reason, translation)) => match nat::apply_tc(ctx, &translation) {
            Ok(()) => reason,
            Err(drop) => drop,
        },
        Err(drop) => drop,
    };
    stats::count(reason, len);
    if reason.is_drop() {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}

/// Parses the packet, then follows its tracked flow or balances a new one.
/// `Ok` carries the pass reason and the rewrite to apply, `Err` a drop reason.
#[inline(always)]
fn process_packet<C: PacketBuf>(ctx: &C, hook: Hook) -> Result<(Reason, Translation), Reason> {
    let flow = match parse::parse_packet(ctx)? {
        Packet::Flow(flow) => flow,
        Packet::NotIpv4 => return Ok((Reason::PassNotIpv4, Translation::none())),
        Packet::OtherL4 => return Ok((Reason::PassOtherL4, Translation::none())),
        Packet::Fragment => return Ok((Reason::PassFragment, Translation::none())),
    };
    let len = ctx.len();
    let now = unsafe { bpf_ktime_get_ns() };

    if let Some(entry) = ct::lookup(&flow.key) {
        // A SYN that hits a forward entry is a new connection reusing the
        // tuple: it keeps the old choice only while that backend is still
        // programmed.
        let forward = entry.direction == DIR_FORWARD;
        if !forward || !flow.is_syn() || ct::backend_still_valid(&entry) {
            ct::touch(&flow, len, now);
            let reason = if forward {
                Reason::CtForward
            } else {
                Reason::CtReply
            };
            return Ok((reason, Translation::of(&flow, &entry)));
        }
    }
    balance_new_flow(&flow, hook, len, now)
}

#[inline(always)]
fn balance_new_flow(
    flow: &Flow,
    hook: Hook,
    len: u32,
    now: u64,
) -> Result<(Reason, Translation), Reason> {
    let Some(service) = service::lookup_service(&flow.key, hook) else {
        return Ok((Reason::PassNotService, Translation::none()));
    };
    policy::check_source_range(&service, &flow.key)?;
    let (backend_id, backend) = service::select_backend(&service)?;
    let snat = if policy::needs_snat(&service, &backend, hook) {
        Some(policy::node_addr()?)
    } else {
        None
    };
    let entry = ct::create(flow, &service, backend_id, &backend, snat, len, now)?;
    Ok((Reason::NewFlow, Translation::of(flow, &entry)))
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
