//! Kernel programs of the load balancer: map declarations, entry points and
//! the dispatch between stages. The stages live in their own modules.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// On the host this crate is only type-checked (clippy); nothing here runs there.
#![cfg_attr(not(target_arch = "bpf"), allow(dead_code, unused_imports))]

mod ct;
mod deliver;
mod frag;
mod icmp;
mod nat;
mod parse;
mod policy;
mod reject;
mod sctp;
mod service;
mod sock;
mod stats;
mod trace;

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
    macros::{btf_map, cgroup_sock, cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, SockContext, TcContext, XdpContext},
};
use lb_common::{
    affinity::{self, Lb4Affinity, Lb4AffinityKey, Lb6AffinityKey},
    backend::{self, Lb4Backend, Lb6Backend},
    config::{self, Lb6Config, LbConfig},
    conntrack::{self, DIR_FORWARD, Lb4CtEntry, Lb4CtKey, Lb6CtEntry, Lb6CtKey, REWRITE_HAIRPIN},
    frag::{self as fr, Lb4FragKey, Lb6FragKey, LbFragFlow},
    maglev::{self, Lb4MaglevChunk, Lb4MaglevKey},
    member::{self, Lb4Member, Lb4MemberKey},
    reject_limit::{self as rl, LbRejectBucket, LbRejectLimit},
    service::{self as svc, Lb4Service, Lb4ServiceKey, Lb6ServiceKey},
    slot::{self, Lb4Slot, Lb4SlotKey},
    sock::{self as sk, Lb4SockKey, Lb4SockRevnat, Lb6SockKey, Lb6SockRevnat},
    source_range::{self, Lb4SourceRange, Lb4SourceRangeKey, Lb6SourceRangeKey},
    stats::{self as st, Counter, Reason},
};
// Inspection (lbctl): service names, per-service counters, flow trace.
use lb_common::{
    backend_stats::{self, LbBackendStats},
    service_name::{self, LbServiceName},
    service_stats::{self, LbServiceStats},
    trace::{self as tr, TraceEvent},
};

use crate::{
    ct::CtTable,
    nat::{Action, Nat6, NatFragment, Translation},
    parse::{Flow, Flow6, Packet, Packet6, PacketBuf},
    trace::Observation,
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

/// Connection tracking: 5-tuple -> translation and lifecycle, both
/// directions of each flow.
#[btf_map]
static LB4_CT_V3: LruHashMap<Lb4CtKey, Lb4CtEntry, { conntrack::MAX_ENTRIES as usize }> =
    LruHashMap::new();

/// IPv6 frontends: (address, port, protocol, scope) -> service entry. Their
/// slots and memberships share `LB4_SLOTS_V1` and `LB4_MEMBERS_V1` (keyed
/// by ids, one space for both families).
#[btf_map]
static LB6_SERVICES_V1: HashMap<Lb6ServiceKey, Lb4Service, { svc::MAX_ENTRIES as usize }> =
    HashMap::new();

/// IPv6 backends: id -> address, port, state.
#[btf_map]
static LB6_BACKENDS_V1: HashMap<u32, Lb6Backend, { backend::MAX_ENTRIES as usize }> =
    HashMap::new();

/// IPv6 connection tracking: 5-tuple -> translation and lifecycle, both
/// directions.
#[btf_map]
static LB6_CT_V2: LruHashMap<Lb6CtKey, Lb6CtEntry, { conntrack::MAX_ENTRIES as usize }> =
    LruHashMap::new();

/// Session affinity: (client, service id) -> backend, last chosen.
#[btf_map]
static LB4_AFFINITY_V1: LruHashMap<
    Lb4AffinityKey,
    Lb4Affinity,
    { affinity::MAX_ENTRIES as usize },
> = LruHashMap::new();

/// IPv6 session affinity: (128-bit client, service id) -> backend, last chosen.
#[btf_map]
static LB6_AFFINITY_V1: LruHashMap<
    Lb6AffinityKey,
    Lb4Affinity,
    { affinity::MAX_ENTRIES as usize },
> = LruHashMap::new();

/// Backend membership: (service id, backend id) -> present.
#[btf_map]
static LB4_MEMBERS_V1: HashMap<Lb4MemberKey, Lb4Member, { member::MAX_ENTRIES as usize }> =
    HashMap::new();

/// loadBalancerSourceRanges: (service id, client prefix) -> allowed.
#[btf_map]
static LB4_SRC_RANGES_V1: LpmTrie<
    Lb4SourceRangeKey,
    Lb4SourceRange,
    { source_range::MAX_ENTRIES as usize },
> = LpmTrie::new();

/// IPv6 loadBalancerSourceRanges: (service id, client prefix) -> allowed.
#[btf_map]
static LB6_SRC_RANGES_V1: LpmTrie<
    Lb6SourceRangeKey,
    Lb4SourceRange,
    { source_range::MAX_ENTRIES as usize },
> = LpmTrie::new();

/// Maglev lookup tables: (service id, M, chunk) -> 64 slots' backend ids.
/// Not preallocated: memory goes only to the chunks that exist, and a
/// replaced chunk is freed after an RCU grace period, never reused under a
/// reader (see `lb_common::maglev`).
#[btf_map]
static LB4_MAGLEV_V1: HashMap<
    Lb4MaglevKey,
    Lb4MaglevChunk,
    { maglev::MAX_ENTRIES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Node-wide settings (index 0), conntrack timeouts included.
#[btf_map]
static LB_CONFIG_V3: Array<LbConfig, { config::MAX_ENTRIES as usize }> = Array::new();

/// Node-wide IPv6 settings (index 0): the SNAT source address.
#[btf_map]
static LB6_CONFIG_V1: Array<Lb6Config, { config::MAX_ENTRIES as usize }> = Array::new();

/// Fragments of translated IPv4 datagrams: (addresses, protocol, IP id)
/// -> the flow's ports. Not pinned: an entry lives as long as one
/// datagram's fragments take to pass.
#[btf_map]
static LB4_FRAGS_V1: LruHashMap<Lb4FragKey, LbFragFlow, { fr::MAX_ENTRIES as usize }> =
    LruHashMap::new();

/// Fragments of translated IPv6 datagrams: (addresses, fragment
/// identification, next header) -> the flow's ports and protocol.
#[btf_map]
static LB6_FRAGS_V1: LruHashMap<Lb6FragKey, LbFragFlow, { fr::MAX_ENTRIES as usize }> =
    LruHashMap::new();

/// Node-wide reject rate limit (index 0; zeros: the defaults).
#[btf_map]
static LB_REJECT_LIMIT_V1: Array<LbRejectLimit, { rl::MAX_ENTRIES as usize }> = Array::new();

/// Each CPU's reject token bucket. Not pinned: program state.
#[btf_map]
static LB_REJECT_BUCKET_V1: PerCpuArray<LbRejectBucket, 1> = PerCpuArray::new();

/// Per-CPU packet/byte counters indexed by [`Reason`].
#[btf_map]
static LB_STATS_V1: PerCpuArray<Counter, { st::MAX_ENTRIES as usize }> = PerCpuArray::new();

/// Service id -> Kubernetes namespace/name/port, for `lbctl` and bpftool
/// only: no program reads it, it is declared so the agent creates and pins it.
#[btf_map]
static LB_SERVICE_NAMES_V1: HashMap<u32, LbServiceName, { service_name::MAX_ENTRIES as usize }> =
    HashMap::new();

/// Per-CPU packet/byte counters per service id (see `lb_common::service_stats`).
#[btf_map]
static LB_SERVICE_STATS_V1: LruPerCpuHashMap<
    u32,
    LbServiceStats,
    { service_stats::MAX_ENTRIES as usize },
> = LruPerCpuHashMap::new();

/// New flows and connection-attempt outcomes per (service, backend): an
/// entry per membership, made and removed by the agent with it (see
/// `lb_common::backend_stats`).
#[btf_map]
static LB_BACKEND_STATS_V1: HashMap<
    Lb4MemberKey,
    LbBackendStats,
    { backend_stats::MAX_ENTRIES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Flow-trace events while `FLAG_TRACE` is set (`lbctl trace`).
#[btf_map]
static LB_TRACE_V2: RingBuf<TraceEvent, { tr::RING_BYTES as usize }> = RingBuf::new();

/// Socket-level balancing: (socket cookie, backend) -> the service address.
#[btf_map]
static LB4_SOCK_REVNAT_V1: LruHashMap<Lb4SockKey, Lb4SockRevnat, { sk::MAX_ENTRIES as usize }> =
    LruHashMap::new();

/// IPv6 socket-level balancing: (socket cookie, backend) -> the service address.
#[btf_map]
static LB6_SOCK_REVNAT_V1: LruHashMap<Lb6SockKey, Lb6SockRevnat, { sk::MAX_ENTRIES as usize }> =
    LruHashMap::new();

/// Socket-level balancing (`--socket-lb-cgroup`): connect() of TCP and
/// connected UDP sockets to a service address.
#[cgroup_sock_addr(connect4)]
pub fn lb_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::connect4(&ctx)
}

/// Socket-level balancing: each datagram of an unconnected UDP socket.
#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::sendmsg4(&ctx)
}

/// Socket-level balancing: replies of unconnected UDP show the service.
#[cgroup_sock_addr(recvmsg4)]
pub fn lb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::recvmsg4(&ctx)
}

/// IPv6 socket-level balancing: connect() to an IPv6 service address.
#[cgroup_sock_addr(connect6)]
pub fn lb_sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::connect6(&ctx)
}

/// IPv6 socket-level balancing: each datagram of an unconnected UDP socket.
#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::sendmsg6(&ctx)
}

/// IPv6 socket-level balancing: replies of unconnected UDP show the service.
#[cgroup_sock_addr(recvmsg6)]
pub fn lb_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::recvmsg6(&ctx)
}

/// IPv6 socket-level balancing: getpeername() shows the service.
#[cgroup_sock_addr(getpeername6)]
pub fn lb_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::getpeername6(&ctx)
}

/// Socket-level balancing: a released socket's reverse entry goes (either
/// family).
#[cgroup_sock(sock_release)]
pub fn lb_sock_release(ctx: SockContext) -> i32 {
    sock::release(&ctx)
}

/// Socket-level balancing: getpeername() shows the service.
#[cgroup_sock_addr(getpeername4)]
pub fn lb_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::getpeername4(&ctx)
}

/// Where a packet entered, which decides the service semantics it gets.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// From a pod on this node (pod-facing device): the internal view of
    /// externalTrafficPolicy=Local services, no SNAT.
    FromPod,
    /// From the network (node device): external view, SNAT when a backend
    /// on another node must send its reply back through this node.
    FromNetwork,
    /// From the node's own stack (egress of pod and node devices):
    /// replies of host-network backends, reverse translation only.
    FromHost,
}

/// TC ingress on pod-facing devices.
#[classifier]
pub fn lb_tc_pod(ctx: TcContext) -> i32 {
    tc_verdict(&ctx, Hook::FromPod)
}

/// TCX egress on pod-facing and node devices: the node's own stack
/// answering a client through a service (a host-network backend on this
/// node, e.g. the API server behind the `kubernetes` service) gets its
/// reply translated back here, the only hook such a reply passes: to a
/// local pod out of its device, to anything else out of a node device.
/// Untouched packets are not counted: every packet leaving passes here.
#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let mut obs = Observation::default();
    let (reason, verdict) = match reverse_host_reply(&ctx, &mut obs) {
        None => return TC_ACT_OK,
        Some(Ok((reason, translation))) => match nat::apply_tc(&ctx, &translation) {
            Ok(()) => (reason, TC_ACT_OK),
            Err(drop) => (drop, TC_ACT_SHOT),
        },
        Some(Err(drop)) => (drop, TC_ACT_SHOT),
    };
    stats::count(reason, len);
    stats::count_service(&obs, reason, len);
    trace::record(&ctx, &obs, reason, Hook::FromHost);
    verdict
}

/// TCX ingress beside XDP on node devices: delivers the replies XDP
/// translated past the stack's reverse-path check (`deliver`).
#[classifier]
pub fn lb_tc_node_deliver(ctx: TcContext) -> i32 {
    if deliver::from_frontend(&ctx) {
        deliver::redirect_tc(&ctx)
    } else {
        TC_ACT_OK
    }
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
    let mut obs = Observation::default();
    let (reason, verdict) = match process_packet(&ctx, Hook::FromNetwork, &mut obs) {
        // The reply is built after the counters and the trace have read
        // the packet: it overwrites it.
        Ok((reason, action)) if action.reject => match reject::allow() {
            true => (reason, xdp_action::XDP_TX),
            false => (Reason::DropRejectRateLimited, xdp_action::XDP_DROP),
        },
        Ok((reason, action)) => match nat::apply_xdp(&ctx, &action.translation) {
            Ok(()) => (reason, xdp_action::XDP_PASS),
            Err(drop) => (drop, xdp_action::XDP_DROP),
        },
        Err(drop) => (drop, xdp_action::XDP_DROP),
    };
    stats::count(reason, len);
    stats::count_service(&obs, reason, len);
    trace::record(&ctx, &obs, reason, Hook::FromNetwork);
    if verdict == xdp_action::XDP_TX {
        return reject::reply_xdp(&ctx).unwrap_or(xdp_action::XDP_DROP);
    }
    verdict
}

#[inline(always)]
fn tc_verdict(ctx: &TcContext, hook: Hook) -> i32 {
    let len = ctx.len();
    let mut obs = Observation::default();
    let mut reject = false;
    let (reason, verdict) = match process_packet(ctx, hook, &mut obs) {
        Ok((reason, action)) if action.reject => {
            if reject::allow() {
                reject = true;
                (reason, TC_ACT_SHOT)
            } else {
                (Reason::DropRejectRateLimited, TC_ACT_SHOT)
            }
        }
        Ok((reason, action)) => match nat::apply_tc(ctx, &action.translation) {
            Ok(()) if action.translation.hairpin => match nat::hairpin_tc(ctx) {
                Ok(verdict) => (reason, verdict),
                Err(drop) => (drop, TC_ACT_SHOT),
            },
            // Past the stack's reverse-path check (`deliver`).
            Ok(()) if deliver::is_translated_reply(reason) => (reason, deliver::redirect_tc(ctx)),
            Ok(()) => (reason, TC_ACT_OK),
            Err(drop) => (drop, TC_ACT_SHOT),
        },
        Err(drop) => (drop, TC_ACT_SHOT),
    };
    stats::count(reason, len);
    stats::count_service(&obs, reason, len);
    trace::record(ctx, &obs, reason, hook);
    if reject {
        // Built last: it overwrites the packet the counters and trace read.
        return reject::reply_tc(ctx).unwrap_or(TC_ACT_SHOT);
    }
    verdict
}

/// Parses the packet, then follows its tracked flow or balances a new one.
/// `Ok` carries the pass reason and the rewrite to apply, `Err` a drop reason.
/// `obs` collects what the packet matched, for per-service counters and tracing.
#[inline(always)]
fn process_packet<C: PacketBuf + Nat6 + NatFragment>(
    ctx: &C,
    hook: Hook,
    obs: &mut Observation,
) -> Result<(Reason, Action), Reason> {
    let untouched = |reason| Ok((reason, Action::forward(Translation::none())));
    let flow = match parse::parse_packet(ctx)? {
        Packet::Flow(flow) => flow,
        Packet::NotIpv4 => return untouched(Reason::PassNotIpv4),
        // The IPv6 path rewrites the packet itself.
        Packet::Ipv6 => {
            let mut reason = follow_flow6(ctx, obs, false);
            if reason == Reason::PassNotService {
                reason = balance_new_flow6(ctx, hook, obs);
            } else if reason == Reason::PassOtherL4 && parsed_icmp6() {
                reason = icmp::translate6(ctx, obs);
            } else if reason == Reason::PassFragment {
                reason = frag::follow6(ctx, obs);
            }
            if frag::translated(reason) {
                frag::remember6(ctx);
            }
            if rejects6(reason) {
                return Ok((reason, Action::reject()));
            }
            return if reason.is_drop() {
                Err(reason)
            } else {
                Ok((
                    reason,
                    Action::forward(Translation::hairpin_only(obs.hairpin)),
                ))
            };
        }
        Packet::OtherL4 => return untouched(Reason::PassOtherL4),
        Packet::Fragment => {
            let reason = frag::follow4(ctx, obs);
            if reason.is_drop() {
                return Err(reason);
            }
            return Ok((
                reason,
                Action::forward(Translation::hairpin_only(obs.hairpin)),
            ));
        }
        Packet::Icmp(icmp_off) => return untouched(icmp::translate(ctx, icmp_off, obs)?),
    };
    obs.src_addr = flow.key.src_addr;
    obs.dst_addr = flow.key.dst_addr;
    obs.src_port = flow.key.src_port;
    obs.dst_port = flow.key.dst_port;
    obs.proto = flow.key.proto;
    let len = ctx.len();
    let now = ct::now();

    if let Some(entry) = ct::V4::get(&flow.key) {
        let mut peer = Lb4CtKey::default();
        let seen = ct::Seen::of(&flow, len);
        if ct::follow::<ct::V4>(&flow.key, entry, &mut peer, &seen, now) == ct::Follow::Track {
            // SAFETY: a map value, read from here on.
            let entry = unsafe { &*entry };
            obs.service_id = entry.service_id;
            obs.backend_id = entry.backend_id;
            let reason = if entry.direction == DIR_FORWARD {
                Reason::CtForward
            } else {
                Reason::CtReply
            };
            frag::remember4(ctx, &flow.key);
            return Ok((reason, Action::forward(Translation::of(&flow, entry))));
        }
    }
    let verdict = balance_new_flow(&flow, hook, len, obs);
    if let Ok((reason, _)) = &verdict
        && frag::translated(*reason)
    {
        frag::remember4(ctx, &flow.key);
    }
    verdict
}

/// The egress path: a TCP/UDP packet whose tuple is the reply
/// entry of a tracked flow gets that flow's reverse translation. `None`
/// for everything else, which passes untouched: nothing is balanced here
/// (the node's own connections are socket-level balancing's), and a packet
/// the parser refuses is the node's own, not ours to drop.
#[inline(always)]
fn reverse_host_reply(
    ctx: &TcContext,
    obs: &mut Observation,
) -> Option<Result<(Reason, Translation), Reason>> {
    let flow = match parse::parse_packet(ctx).ok()? {
        Packet::Flow(flow) => flow,
        Packet::Ipv6 => {
            let reason = follow_flow6(ctx, obs, true);
            return match reason {
                Reason::CtReply => Some(Ok((reason, Translation::none()))),
                // A rewrite that failed half-way; a parse failure passes.
                Reason::DropRewrite => Some(Err(reason)),
                _ => None,
            };
        }
        _ => return None,
    };
    let entry = ct::V4::get(&flow.key)?;
    // SAFETY: a map value; the direction never changes after insertion.
    if unsafe { (*entry).direction } == DIR_FORWARD {
        return None;
    }
    let mut peer = Lb4CtKey::default();
    let seen = ct::Seen::of(&flow, ctx.len());
    if ct::follow::<ct::V4>(&flow.key, entry, &mut peer, &seen, ct::now()) != ct::Follow::Track {
        return None;
    }
    // SAFETY: a map value, read from here on.
    let entry = unsafe { &*entry };
    obs.service_id = entry.service_id;
    obs.backend_id = entry.backend_id;
    Some(Ok((Reason::CtReply, Translation::of(&flow, entry))))
}

/// Not inlined: the new-flow path gets its own stack frame beside the
/// established path's, which keeps each within the verifier's budget.
#[inline(never)]
fn balance_new_flow(
    flow: &Flow,
    hook: Hook,
    len: u32,
    obs: &mut Observation,
) -> Result<(Reason, Action), Reason> {
    // Read here rather than passed: BPF calls take at most five arguments.
    let now = ct::now();
    let Some(service) = service::lookup_service(&flow.key, hook) else {
        // kube-proxy rejects a connection attempt to a ClusterIP port that
        // no service port defines.
        if flow.is_connection_attempt() && service::is_service_address(&flow.key) {
            return Ok((Reason::DropUnknownPort, Action::reject()));
        }
        if flow.is_syn() {
            ct::forget_stale_reply(flow);
        }
        return Ok((Reason::PassNotService, Action::forward(Translation::none())));
    };
    obs.service(&service);
    policy::check_source_range(&service, &flow.key)?;
    let choice = match service::select_backend(&service, &flow.key, now) {
        Ok(choice) => choice,
        // No endpoint at all: refuse at once (a Local service without a
        // local endpoint drops instead, so load balancers go elsewhere).
        Err(Reason::DropNoBackend) if flow.is_connection_attempt() => {
            return Ok((Reason::DropNoBackend, Action::reject()));
        }
        Err(drop) => return Err(drop),
    };
    obs.backend(choice.backend_id, choice.backend.addr, choice.backend.port);
    let snat = policy::snat_for(&service, &choice.backend, &flow.key, hook)?;
    let entry = ct::create(
        flow,
        &service,
        choice.backend_id,
        &choice.backend,
        snat,
        len,
        now,
    )?;
    let reason = match choice.how {
        service::Selection::Affinity => Reason::NewFlowAffinity,
        service::Selection::Maglev => Reason::NewFlowMaglev,
        service::Selection::Random => Reason::NewFlow,
    };
    Ok((reason, Action::forward(Translation::of(flow, &entry))))
}

/// Per-CPU scratch space of the IPv6 path: its 128-bit tuples and
/// conntrack entries do not fit the verifier's 512-byte stack beside the
/// IPv4 path's frame. Not pinned: nothing outlives one packet.
#[repr(C)]
pub struct Scratch6 {
    flow: Flow6,
    entry: Lb6CtEntry,
    reply_key: Lb6CtKey,
    /// The other direction's key of a tracked flow (conntrack lifecycle).
    peer_key: Lb6CtKey,
    /// The datagram of a fragment (`frag`).
    frag_key: Lb6FragKey,
    /// The backend a new flow was given (read by the flow trace).
    backend_addr: [u8; 16],
    /// The key of a per-backend counter (`stats::count_backend`, both
    /// families): the IPv4 new-flow frame has no stack left for it.
    member_key: Lb4MemberKey,
}

#[btf_map]
static LB6_SCRATCH: PerCpuArray<Scratch6, 1> = PerCpuArray::new();

/// The IPv6 path, first half: parses the packet into the scratch space and
/// translates it if its flow is tracked. Returns the reason of the verdict
/// (a drop reason drops), `PassNotService` for a TCP/UDP flow that is not
/// tracked ([`balance_new_flow6`] goes on). Not inlined, and the new-flow
/// half is called beside it, not from it: each frame sits alone on top of
/// the entry point's. A plain `u32` reason, not a `Result`, so nothing
/// returns through the caller's stack.
/// With `replies_only`, a forward entry is left alone (`PassNotService`).
#[inline(never)]
fn follow_flow6<C: PacketBuf + Nat6>(ctx: &C, obs: &mut Observation, replies_only: bool) -> Reason {
    match try_follow_flow6(ctx, obs, replies_only) {
        Ok(reason) | Err(reason) => reason,
    }
}

#[inline(always)]
fn try_follow_flow6<C: PacketBuf + Nat6>(
    ctx: &C,
    obs: &mut Observation,
    replies_only: bool,
) -> Result<Reason, Reason> {
    // Index 0 of a one-entry array always exists.
    let scratch = LB6_SCRATCH.get_ptr_mut(0).ok_or(Reason::DropRewrite)?;
    // SAFETY: this CPU's scratch entry; nothing else runs on it meanwhile.
    let flow = unsafe { &mut (*scratch).flow };
    match parse::parse_ipv6(ctx, flow)? {
        Packet6::Flow => {}
        Packet6::OtherL4 => return Ok(Reason::PassOtherL4),
        Packet6::Fragment => return Ok(Reason::PassFragment),
        Packet6::ExtHeaderLimit => return Ok(Reason::PassExtHeaderLimit),
    }
    // The addresses do not fit the (IPv4) observation: the trace reads
    // them from the scratch space, which holds this packet's tuple from
    // here on (a packet that failed to parse may leave an earlier one's).
    obs.ipv6 = true;
    obs.src_port = flow.key.src_port;
    obs.dst_port = flow.key.dst_port;
    obs.proto = flow.key.proto;
    let Some(entry_ptr) = ct::lookup6(&flow.key) else {
        return Ok(Reason::PassNotService);
    };
    // SAFETY: a map value; the direction never changes after insertion.
    if replies_only && unsafe { (*entry_ptr).direction } == DIR_FORWARD {
        return Ok(Reason::PassNotService);
    }
    // SAFETY: this CPU's scratch entry, as above.
    let peer = unsafe { &mut (*scratch).peer_key };
    let seen = ct::Seen::of6(flow, ctx.len());
    if ct::follow::<ct::V6>(&flow.key, entry_ptr, peer, &seen, ct::now()) == ct::Follow::New {
        return Ok(Reason::PassNotService);
    }
    // SAFETY: a map value, read from here on.
    let entry = unsafe { &*entry_ptr };
    obs.service_id = entry.service_id;
    obs.backend_id = entry.backend_id;
    obs.hairpin = entry.rewrite & REWRITE_HAIRPIN != 0;
    let forward = entry.direction == DIR_FORWARD;
    ctx.rewrite6(flow, entry)?;
    Ok(if forward {
        Reason::CtForward
    } else {
        Reason::CtReply
    })
}

/// Whether the IPv6 packet [`follow_flow6`] passed as "other L4" is ICMPv6
/// (the parser left its protocol and offset in the scratch space).
#[inline(always)]
fn parsed_icmp6() -> bool {
    LB6_SCRATCH
        .get(0)
        .is_some_and(|scratch| scratch.flow.key.proto == lb_common::PROTO_ICMPV6)
}

/// Whether an IPv6 drop is answered with ICMPv6 port unreachable, as for
/// IPv4: a connection attempt to a frontend without any endpoint (a Local
/// one without a local endpoint drops, so load balancers go elsewhere), or
/// to a ClusterIP port no service port defines (only connection attempts
/// get that reason).
#[inline(always)]
fn rejects6(reason: Reason) -> bool {
    reason == Reason::DropUnknownPort
        || reason == Reason::DropNoBackend
            && LB6_SCRATCH
                .get(0)
                .is_some_and(|scratch| scratch.flow.is_connection_attempt())
}

/// The IPv6 path, second half: balances the untracked flow that
/// [`follow_flow6`] left in the scratch space, if it is for a service.
#[inline(never)]
fn balance_new_flow6<C: PacketBuf + Nat6>(ctx: &C, hook: Hook, obs: &mut Observation) -> Reason {
    match try_balance_new_flow6(ctx, hook, obs) {
        Ok(reason) | Err(reason) => reason,
    }
}

#[inline(always)]
fn try_balance_new_flow6<C: PacketBuf + Nat6>(
    ctx: &C,
    hook: Hook,
    obs: &mut Observation,
) -> Result<Reason, Reason> {
    let scratch = LB6_SCRATCH.get_ptr_mut(0).ok_or(Reason::DropRewrite)?;
    // SAFETY: this CPU's scratch entry, filled by follow_flow6 for this
    // packet; nothing else runs on it meanwhile.
    let (flow, entry, reply_key, peer_key, backend_addr) = unsafe {
        (
            &(*scratch).flow,
            &mut (*scratch).entry,
            &mut (*scratch).reply_key,
            &mut (*scratch).peer_key,
            &mut (*scratch).backend_addr,
        )
    };
    let Some(service) = service::lookup_service6(&flow.key, hook) else {
        // As for IPv4: a connection attempt to a ClusterIP port no service
        // port defines is refused.
        if flow.is_connection_attempt() && service::is_service_address6(&flow.key) {
            return Err(Reason::DropUnknownPort);
        }
        if flow.is_syn() {
            ct::forget_stale_reply6(flow, reply_key, peer_key);
        }
        return Ok(Reason::PassNotService);
    };
    obs.service(&service);
    policy::check_source_range6(&service, &flow.key.src_addr)?;
    let now = ct::now();
    let (backend_id, backend, how) = service::select_backend6(&service, &flow.key, now)?;
    obs.backend_id = backend_id;
    obs.backend_port = backend.port;
    *backend_addr = backend.addr;
    let snat = policy::snat6_for(&service, &backend, &flow.key.src_addr, hook)?;
    let chosen = (backend_id, &backend);
    ct::create6(
        flow,
        &service,
        chosen,
        (entry, reply_key),
        snat,
        (ctx.len(), now),
    )?;
    obs.hairpin = entry.rewrite & REWRITE_HAIRPIN != 0;
    ctx.rewrite6(flow, entry)?;
    Ok(match how {
        service::Selection::Affinity => Reason::NewFlowAffinity,
        service::Selection::Maglev => Reason::NewFlowMaglev,
        service::Selection::Random => Reason::NewFlow,
    })
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
