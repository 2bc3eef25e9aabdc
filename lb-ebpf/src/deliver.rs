//! Delivery of translated replies straight to the device the FIB names.
//!
//! A reply translated on its way into the node carries a source the node
//! never routes back through the device it came in on: a service address,
//! or a node address arriving on a pod device. Handed to the stack, it
//! fails the reverse-path check of `rp_filter=1` (strict, the RHEL and
//! CIS default) and is dropped as a martian. Redirected to its egress
//! device here, it never takes the input route lookup that checks it.
//!
//! TC does the redirect. XDP cannot redirect into a veth without the
//! peer's cooperation (an XDP program or GRO there), so a reply XDP
//! translated is delivered by the TC companion on the same device
//! ([`crate::lb_tc_node_deliver`]), which knows it by its source.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_REDIRECT,
        bpf_fib_lookup as FibParams,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use lb_common::stats::Reason;

use crate::{
    LB6_SCRATCH,
    parse::{
        self, ETH_HLEN, IP_DST_OFF, IP_SRC_OFF, IP6_DST_OFF, IP6_SRC_OFF, Packet, Packet6, ptr_at,
    },
    service,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Whether a packet with this verdict had its source translated back (a
/// reply), and so needs [`redirect_tc`] to reach its destination under
/// strict reverse-path filtering.
#[inline(always)]
pub fn is_translated_reply(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::CtReply | Reason::PassFragmentTranslated | Reason::IcmpErrorTranslated
    )
}

/// Sends the (already rewritten) packet out of the device the FIB routes
/// its destination to, with that next hop's addresses. A destination that
/// is the node itself, or one the FIB cannot route, goes up the stack as
/// before (`TC_ACT_OK`).
#[inline(never)]
pub fn redirect_tc(ctx: &TcContext) -> i32 {
    match try_redirect_tc(ctx) {
        Ok(verdict) => verdict,
        Err(_) => TC_ACT_OK,
    }
}

#[inline(always)]
fn try_redirect_tc(ctx: &TcContext) -> Result<i32, Reason> {
    // SAFETY: plain data, every field written before the lookup reads it.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    let proto = ptr_at::<TcContext, [u8; 2]>(ctx, ETH_HLEN - 2)?;
    // SAFETY: bounds-checked by ptr_at.
    match u16::from_be_bytes(unsafe { *proto }) {
        ETH_P_IP => {
            let src = ptr_at::<TcContext, [u8; 4]>(ctx, IP_SRC_OFF)?;
            let dst = ptr_at::<TcContext, [u8; 4]>(ctx, IP_DST_OFF)?;
            fib.family = AF_INET;
            // SAFETY: bounds-checked by ptr_at; the union member of IPv4.
            unsafe {
                fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(*src);
                fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(*dst);
            }
        }
        ETH_P_IPV6 => {
            let src = ptr_at::<TcContext, [u32; 4]>(ctx, IP6_SRC_OFF)?;
            let dst = ptr_at::<TcContext, [u32; 4]>(ctx, IP6_DST_OFF)?;
            fib.family = AF_INET6;
            // SAFETY: bounds-checked by ptr_at; the union member of IPv6.
            unsafe {
                fib.__bindgen_anon_3.ipv6_src = *src;
                fib.__bindgen_anon_4.ipv6_dst = *dst;
            }
        }
        _ => return Ok(TC_ACT_OK),
    }
    // The lookup as the packet's input route would make it: from the
    // device it arrived on. tot_len stays 0: the skb's own length is
    // checked against the egress MTU.
    // SAFETY: reading the ingress ifindex of the program's own skb.
    fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the skb is the program's own, `fib` a valid parameter block.
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    let action = match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let mut macs = [0u8; 12];
            macs[0..6].copy_from_slice(&fib.dmac);
            macs[6..12].copy_from_slice(&fib.smac);
            ctx.store(0, &macs, 0).map_err(|_| Reason::DropRewrite)?;
            // SAFETY: a plain helper call on the FIB's egress device.
            unsafe { bpf_redirect(fib.ifindex, 0) }
        }
        // The next hop's address is not resolved yet: the kernel resolves
        // it on the way out.
        // SAFETY: as above; no next hop given, the kernel looks it up.
        BPF_FIB_LKUP_RET_NO_NEIGH => unsafe {
            bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0)
        },
        // Local delivery (NOT_FWDED), no route, forwarding off: the stack
        // decides, as without this stage.
        _ => return Ok(TC_ACT_OK),
    };
    if action != TC_ACT_REDIRECT as i64 {
        return Ok(TC_ACT_OK);
    }
    Ok(action as i32)
}

/// Whether the packet comes from a frontend (its source address, port and
/// protocol are a service's): a reply XDP translated on this device,
/// recognised by its source rather than by an XDP metadata mark, whose
/// support varies with the driver. One hash lookup per packet from the
/// network. A later fragment carries no ports: its source must be a
/// ClusterIP (the replies of NodePorts come from the node's own address,
/// which passes the check; those of LoadBalancer IPs and externalIPs are
/// not recognised in later fragments).
#[inline(always)]
pub fn from_frontend(ctx: &TcContext) -> bool {
    match parse::parse_packet(ctx) {
        Ok(Packet::Flow(flow)) => service::is_frontend_source(&flow.key),
        Ok(Packet::Fragment) => ptr_at::<TcContext, [u8; 4]>(ctx, IP_SRC_OFF)
            // SAFETY: bounds-checked by ptr_at.
            .is_ok_and(|src| service::is_cluster_ip(unsafe { *src })),
        Ok(Packet::Ipv6) => from_frontend6(ctx),
        _ => false,
    }
}

/// [`from_frontend`] for IPv6, its tuple parsed into the scratch space.
#[inline(never)]
fn from_frontend6(ctx: &TcContext) -> bool {
    let Some(scratch) = LB6_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch entry; nothing else runs on it meanwhile.
    let flow = unsafe { &mut (*scratch).flow };
    match parse::parse_ipv6(ctx, flow) {
        Ok(Packet6::Flow) => service::is_frontend_source6(&flow.key),
        Ok(Packet6::Fragment) => ptr_at::<TcContext, [u8; 16]>(ctx, IP6_SRC_OFF)
            // SAFETY: bounds-checked by ptr_at.
            .is_ok_and(|src| service::is_cluster_ip6(unsafe { *src })),
        _ => false,
    }
}
