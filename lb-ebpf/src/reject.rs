//! Rejecting a connection attempt with ICMP port unreachable (what
//! kube-proxy's REJECT does for a service without endpoints): the packet is
//! rewritten in place into the ICMP error and sent back out of the device it
//! came in on, so the client fails at once instead of timing out.
//!
//! The reply is built inside the packet itself (no copy on the stack) and
//! in functions that are not inlined, so the main path keeps its share of
//! the verifier's 512-byte stack.

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, xdp_action},
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_xdp_adjust_tail},
    programs::{TcContext, XdpContext},
};
use lb_common::{PROTO_ICMP, stats::Reason};

use crate::parse::{ETH_HLEN, PacketBuf, ptr_at};

/// IPv4 header (no options) + ICMP header + the original IPv4 header and
/// the first 8 bytes of its payload (RFC 792).
const IPV4_HLEN: usize = 20;
const ICMP_HLEN: usize = 8;
const QUOTED: usize = IPV4_HLEN + 8;
const REPLY_LEN: usize = ETH_HLEN + IPV4_HLEN + ICMP_HLEN + QUOTED;
const IP: usize = ETH_HLEN;
const ICMP: usize = IP + IPV4_HLEN;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;

/// Only plain 20-byte IPv4 headers are answered (anything else is dropped).
#[inline(always)]
fn check_original<C: PacketBuf>(ctx: &C) -> Result<(), Reason> {
    let version_ihl = ptr_at::<C, u8>(ctx, IP)?;
    // SAFETY: bounds-checked by ptr_at.
    if unsafe { *version_ihl } != 0x45 {
        return Err(Reason::DropMalformed);
    }
    Ok(())
}

/// Rewrites a frame of exactly `REPLY_LEN` bytes whose start still holds the
/// original Ethernet and IPv4 headers and 8 bytes of L4 into the ICMP error.
#[inline(always)]
fn build_in_place(frame: &mut [u8; REPLY_LEN]) {
    // The quote first, back to front: it overlaps where it comes from.
    let mut i = QUOTED;
    while i > 0 {
        i -= 1;
        frame[ICMP + ICMP_HLEN + i] = frame[IP + i];
    }
    // Ethernet: back to where the packet came from.
    let mut m = 0;
    while m < 6 {
        frame.swap(m, m + 6);
        m += 1;
    }
    // IPv4: from the address the client tried, to the client (both are in
    // the quote now: source at 12, destination at 16).
    let q = ICMP + ICMP_HLEN;
    let mut a = 0;
    while a < 4 {
        frame[IP + 12 + a] = frame[q + 16 + a];
        frame[IP + 16 + a] = frame[q + 12 + a];
        a += 1;
    }
    frame[IP] = 0x45;
    frame[IP + 1] = 0;
    let total = (IPV4_HLEN + ICMP_HLEN + QUOTED) as u16;
    frame[IP + 2..IP + 4].copy_from_slice(&total.to_be_bytes());
    frame[IP + 4..IP + 8].copy_from_slice(&[0, 0, 0x40, 0]);
    frame[IP + 8] = 64;
    frame[IP + 9] = PROTO_ICMP;
    frame[IP + 10] = 0;
    frame[IP + 11] = 0;
    let ip_sum = checksum(frame, IP, IPV4_HLEN);
    frame[IP + 10..IP + 12].copy_from_slice(&ip_sum.to_be_bytes());
    // ICMP destination unreachable / port unreachable.
    frame[ICMP..ICMP + ICMP_HLEN].copy_from_slice(&[
        ICMP_DEST_UNREACH,
        ICMP_PORT_UNREACH,
        0,
        0,
        0,
        0,
        0,
        0,
    ]);
    let icmp_sum = checksum(frame, ICMP, ICMP_HLEN + QUOTED);
    frame[ICMP + 2..ICMP + 4].copy_from_slice(&icmp_sum.to_be_bytes());
}

/// Internet checksum of `len` (even) bytes of `frame` from `start`.
#[inline(always)]
fn checksum(frame: &[u8; REPLY_LEN], start: usize, len: usize) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i + 1 < len && start + i + 1 < REPLY_LEN {
        sum += u16::from_be_bytes([frame[start + i], frame[start + i + 1]]) as u32;
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Turns the packet into the ICMP error and sends it back out of its
/// device: the TC verdict to return.
#[inline(never)]
pub fn reply_tc(ctx: &TcContext) -> Result<i32, Reason> {
    check_original(ctx)?;
    // SAFETY: plain helper calls on the program's own skb.
    unsafe {
        if bpf_skb_change_tail(ctx.skb.skb, REPLY_LEN as u32, 0) != 0 {
            return Err(Reason::DropRewrite);
        }
    }
    // The resize may have moved the data: bounds are checked afresh.
    let frame = ptr_at::<TcContext, [u8; REPLY_LEN]>(ctx, 0)?;
    // SAFETY: bounds-checked by ptr_at; TC may write packet data directly.
    unsafe { build_in_place(&mut *frame) };
    // SAFETY: reading the ingress ifindex of the program's own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let action = unsafe { bpf_redirect(ifindex, 0) };
    if action != TC_ACT_REDIRECT as i64 {
        return Err(Reason::DropRewrite);
    }
    Ok(action as i32)
}

/// The same for XDP: the XDP verdict to return (XDP_TX).
#[inline(never)]
pub fn reply_xdp(ctx: &XdpContext) -> Result<u32, Reason> {
    check_original(ctx)?;
    let delta = REPLY_LEN as i32 - (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: plain helper call on the program's own frame.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return Err(Reason::DropRewrite);
    }
    let frame = ptr_at::<XdpContext, [u8; REPLY_LEN]>(ctx, 0)?;
    // SAFETY: bounds-checked by ptr_at after the resize.
    unsafe { build_in_place(&mut *frame) };
    Ok(xdp_action::XDP_TX)
}
