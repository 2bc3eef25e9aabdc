//! Address and port rewriting with incremental checksum updates.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{PROTO_UDP, stats::Reason};

use crate::parse::{Flow, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF};

/// Rewrites the destination address and port (DNAT to a backend).
#[inline(always)]
pub fn rewrite_dst(ctx: &TcContext, flow: &Flow, addr: [u8; 4], port: u16) -> Result<(), Reason> {
    rewrite(
        ctx,
        flow,
        IP_DST_OFF,
        flow.l4_off + 2,
        (flow.key.dst_addr, flow.key.dst_port),
        (addr, port),
    )
}

/// Rewrites the source address and port (reply back to the frontend).
#[inline(always)]
pub fn rewrite_src(ctx: &TcContext, flow: &Flow, addr: [u8; 4], port: u16) -> Result<(), Reason> {
    rewrite(
        ctx,
        flow,
        IP_SRC_OFF,
        flow.l4_off,
        (flow.key.src_addr, flow.key.src_port),
        (addr, port),
    )
}

#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    flow: &Flow,
    addr_off: usize,
    port_off: usize,
    (old_addr, old_port): ([u8; 4], u16),
    (new_addr, new_port): ([u8; 4], u16),
) -> Result<(), Reason> {
    // The helpers take the raw network-order field values.
    let old_a = u32::from_ne_bytes(old_addr) as u64;
    let new_a = u32::from_ne_bytes(new_addr) as u64;
    let old_p = old_port.to_be() as u64;
    let new_p = new_port.to_be() as u64;
    // A UDP checksum of zero means "none" and must stay zero.
    let mangled = if flow.key.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };

    if old_addr != new_addr {
        ctx.l4_csum_replace(
            flow.csum_off,
            old_a,
            new_a,
            BPF_F_PSEUDO_HDR as u64 | mangled | 4,
        )
        .map_err(|_| Reason::DropRewrite)?;
        ctx.l3_csum_replace(IP_CSUM_OFF, old_a, new_a, 4)
            .map_err(|_| Reason::DropRewrite)?;
        ctx.store(addr_off, &new_addr, 0)
            .map_err(|_| Reason::DropRewrite)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(flow.csum_off, old_p, new_p, mangled | 2)
            .map_err(|_| Reason::DropRewrite)?;
        ctx.store(port_off, &new_port.to_be_bytes(), 0)
            .map_err(|_| Reason::DropRewrite)?;
    }
    Ok(())
}
