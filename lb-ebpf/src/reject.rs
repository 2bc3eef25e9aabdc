//! Rejecting a connection attempt with ICMP port unreachable (what
//! kube-proxy's REJECT does for a service without endpoints): the packet is
//! rewritten in place into the ICMP error and sent back out of the device it
//! came in on, so the client fails at once instead of timing out.
//!
//! The reply is built inside the packet itself (no copy on the stack) and
//! in functions that are not inlined, so the main path keeps its share of
//! the verifier's 512-byte stack. IPv6 gets ICMPv6 destination unreachable
//! / port unreachable (RFC 4443) the same way.
//!
//! Each CPU answers at most `LB_REJECT_LIMIT_V1`'s rate (default 1000 per
//! second after a burst of 50, the kernel's own ICMP limit): a token
//! bucket per CPU ([`allow`]); above it the packet is dropped unanswered
//! (`drop_reject_rate_limited`), so the reject path cannot be used to
//! reflect a flood at a forged source.

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, xdp_action},
    helpers::{
        bpf_csum_diff, bpf_ktime_get_ns, bpf_redirect, bpf_skb_change_tail, bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
};
use lb_common::{
    PROTO_ICMP, PROTO_ICMPV6,
    reject_limit::{DEFAULT_BURST, DEFAULT_RATE_PER_SEC, MAX_RATE_PER_SEC},
    stats::Reason,
};

use crate::{
    LB_REJECT_BUCKET_V1, LB_REJECT_LIMIT_V1,
    parse::{ETH_HLEN, PacketBuf, ptr_at},
};

/// One token, in the bucket's unit (billionths of a token): a refill is
/// then `elapsed_ns * rate`, no division.
const TOKEN: u64 = 1_000_000_000;
/// The longest quiet time a refill counts: `MAX_REFILL_NS * MAX_RATE_PER_SEC`
/// plus a full bucket (at most `u32::MAX` tokens) stays within 64 bits.
const MAX_REFILL_NS: u64 = 10_000 * TOKEN;
const _: () = assert!(
    MAX_REFILL_NS as u128 * MAX_RATE_PER_SEC as u128 + u32::MAX as u128 * TOKEN as u128
        <= u64::MAX as u128
);

/// Takes a token from this CPU's reject bucket: whether a reject may be
/// sent now. The bucket holds `burst` tokens and gains `rate_per_sec` a
/// second (`LB_REJECT_LIMIT_V1`, zeros meaning the defaults); per CPU, so
/// no two programs ever update one bucket at once.
#[inline(never)]
pub fn allow() -> bool {
    let Some(bucket) = LB_REJECT_BUCKET_V1.get_ptr_mut(0) else {
        return false;
    };
    let (mut rate, mut burst) = match LB_REJECT_LIMIT_V1.get(0) {
        Some(limit) => (limit.rate_per_sec, limit.burst),
        None => (0, 0),
    };
    if rate == 0 {
        rate = DEFAULT_RATE_PER_SEC;
    }
    if rate > MAX_RATE_PER_SEC {
        rate = MAX_RATE_PER_SEC;
    }
    if burst == 0 {
        burst = DEFAULT_BURST;
    }
    let full = burst as u64 * TOKEN;
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: this CPU's bucket; nothing else runs on it meanwhile.
    let bucket = unsafe { &mut *bucket };
    let mut tokens = if bucket.last_ns == 0 {
        full
    } else {
        let mut elapsed = now.saturating_sub(bucket.last_ns);
        if elapsed > MAX_REFILL_NS {
            elapsed = MAX_REFILL_NS;
        }
        bucket.nano_tokens + elapsed * rate as u64
    };
    if tokens > full {
        tokens = full;
    }
    bucket.last_ns = now;
    if tokens < TOKEN {
        bucket.nano_tokens = tokens;
        return false;
    }
    bucket.nano_tokens = tokens - TOKEN;
    true
}

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

/// IPv6 header + ICMPv6 header + the original IPv6 header and the 8 bytes
/// after it (RFC 4443 allows any quote that keeps the error within the
/// minimum MTU; this one names the flow).
const IPV6_HLEN: usize = 40;
const QUOTED6: usize = IPV6_HLEN + 8;
const REPLY6_LEN: usize = ETH_HLEN + IPV6_HLEN + ICMP_HLEN + QUOTED6;
const ICMP6: usize = IP + IPV6_HLEN;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;

/// Whether the packet to answer is IPv6 (the EtherType; the parser let
/// nothing else through to a reject).
#[inline(always)]
fn is_ipv6<C: PacketBuf>(ctx: &C) -> Result<bool, Reason> {
    let ether_type = ptr_at::<C, [u8; 2]>(ctx, 12)?;
    // SAFETY: bounds-checked by ptr_at.
    Ok(unsafe { *ether_type } == [0x86, 0xdd])
}

/// Rewrites a frame of exactly `REPLY6_LEN` bytes whose start still holds
/// the original Ethernet and IPv6 headers and 8 bytes after them into the
/// ICMPv6 error.
#[inline(always)]
fn build6_in_place(frame: &mut [u8; REPLY6_LEN]) {
    // The quote first, back to front: it overlaps where it comes from.
    let mut i = QUOTED6;
    while i > 0 {
        i -= 1;
        frame[ICMP6 + ICMP_HLEN + i] = frame[IP + i];
    }
    let mut m = 0;
    while m < 6 {
        frame.swap(m, m + 6);
        m += 1;
    }
    // From the address the client tried, to the client (in the quote:
    // source at 8, destination at 24).
    let q = ICMP6 + ICMP_HLEN;
    let mut a = 0;
    while a < 16 {
        frame[IP + 8 + a] = frame[q + 24 + a];
        frame[IP + 24 + a] = frame[q + 8 + a];
        a += 1;
    }
    frame[IP..IP + 4].copy_from_slice(&[0x60, 0, 0, 0]);
    let payload = (ICMP_HLEN + QUOTED6) as u16;
    frame[IP + 4..IP + 6].copy_from_slice(&payload.to_be_bytes());
    frame[IP + 6] = PROTO_ICMPV6;
    frame[IP + 7] = 64;
    frame[ICMP6..ICMP6 + ICMP_HLEN].copy_from_slice(&[
        ICMPV6_DEST_UNREACH,
        ICMPV6_PORT_UNREACH,
        0,
        0,
        0,
        0,
        0,
        0,
    ]);
    // The ICMPv6 checksum covers the pseudo-header: both addresses, the
    // length and the next header. Summed by `bpf_csum_diff` over the frame
    // (byte loops here would spill past the stack budget); the helper sums
    // in memory order, which the one's-complement sum survives as a byte
    // swap.
    let base = frame.as_mut_ptr();
    // SAFETY: both ranges lie inside the frame, whose bounds the caller
    // checked; the sizes are multiples of 4 as the helper wants.
    let sum = unsafe {
        let addrs = bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            base.add(IP + 8) as *mut u32,
            32,
            0,
        );
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            base.add(ICMP6) as *mut u32,
            (ICMP_HLEN + QUOTED6) as u32,
            addrs as u32,
        )
    };
    let mut folded = sum as u32;
    folded = (folded & 0xffff) + (folded >> 16);
    folded = (folded & 0xffff) + (folded >> 16);
    let mut sum = u16::from_be(folded as u16) as u32 + payload as u32 + PROTO_ICMPV6 as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    frame[ICMP6 + 2..ICMP6 + 4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// Turns the packet into the ICMP (ICMPv6) error and sends it back out of
/// its device: the TC verdict to return. Each family's builder has its own
/// frame on top of the entry point's.
#[inline(always)]
pub fn reply_tc(ctx: &TcContext) -> Result<i32, Reason> {
    if is_ipv6(ctx)? {
        reply6_tc(ctx)
    } else {
        reply4_tc(ctx)
    }
}

/// The same for XDP: the XDP verdict to return (XDP_TX).
#[inline(always)]
pub fn reply_xdp(ctx: &XdpContext) -> Result<u32, Reason> {
    if is_ipv6(ctx)? {
        reply6_xdp(ctx)
    } else {
        reply4_xdp(ctx)
    }
}

#[inline(never)]
fn reply4_tc(ctx: &TcContext) -> Result<i32, Reason> {
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
    redirect_back(ctx)
}

#[inline(never)]
fn reply6_tc(ctx: &TcContext) -> Result<i32, Reason> {
    // The quote must be there to copy.
    ptr_at::<TcContext, [u8; ETH_HLEN + QUOTED6]>(ctx, 0)?;
    // SAFETY: plain helper calls on the program's own skb.
    unsafe {
        if bpf_skb_change_tail(ctx.skb.skb, REPLY6_LEN as u32, 0) != 0 {
            return Err(Reason::DropRewrite);
        }
    }
    let frame = ptr_at::<TcContext, [u8; REPLY6_LEN]>(ctx, 0)?;
    // SAFETY: bounds-checked by ptr_at; TC may write packet data directly.
    unsafe { build6_in_place(&mut *frame) };
    redirect_back(ctx)
}

/// Out of the device the packet came in on.
#[inline(always)]
fn redirect_back(ctx: &TcContext) -> Result<i32, Reason> {
    // SAFETY: reading the ingress ifindex of the program's own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let action = unsafe { bpf_redirect(ifindex, 0) };
    if action != TC_ACT_REDIRECT as i64 {
        return Err(Reason::DropRewrite);
    }
    Ok(action as i32)
}

#[inline(never)]
fn reply4_xdp(ctx: &XdpContext) -> Result<u32, Reason> {
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

#[inline(never)]
fn reply6_xdp(ctx: &XdpContext) -> Result<u32, Reason> {
    ptr_at::<XdpContext, [u8; ETH_HLEN + QUOTED6]>(ctx, 0)?;
    let delta = REPLY6_LEN as i32 - (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: plain helper call on the program's own frame.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return Err(Reason::DropRewrite);
    }
    let frame = ptr_at::<XdpContext, [u8; REPLY6_LEN]>(ctx, 0)?;
    // SAFETY: bounds-checked by ptr_at after the resize.
    unsafe { build6_in_place(&mut *frame) };
    Ok(xdp_action::XDP_TX)
}
