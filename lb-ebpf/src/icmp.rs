//! ICMP errors about translated flows: destination unreachable (including
//! fragmentation needed), time exceeded and parameter problem quote the
//! packet that caused them, as it was after translation. Left alone, the
//! error names the backend (or the SNAT address) the client never talked
//! to, so the client's stack drops it: path-MTU discovery stalls and a
//! refused UDP port times out instead of failing at once.
//!
//! The quoted packet's reverse 5-tuple is the key of the conntrack entry of
//! the direction the error travels in (an error about a forward packet
//! travels like a reply), so the error is translated like a packet of that
//! direction: the outer destination as that entry says, the outer source too
//! when the error comes from the quoted packet's destination itself, and
//! the quoted header mirrored (its source gets the entry's new
//! destination, its destination the entry's new source). Every checksum
//! that covers a changed field is updated incrementally: the outer IPv4
//! header, the ICMP message, the quoted IPv4 header and, when the quote
//! holds it, the quoted TCP or UDP checksum. Each changed region's own
//! checksum absorbs its change, so the packet's overall sum (what a
//! CHECKSUM_COMPLETE skb carries) stays the same.

use lb_common::{
    PROTO_TCP, PROTO_UDP,
    conntrack::{Lb4CtKey, REWRITE_DST, REWRITE_SRC},
    stats::Reason,
};

use crate::{
    ct,
    nat::{csum_replace2, csum_replace4},
    parse::{
        ETH_HLEN, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, Ipv4Fields, Ipv4Hdr, L4Ports, PacketBuf,
        ipv4_at, ptr_at,
    },
    trace::Observation,
};

/// ICMP types that quote the offending packet.
pub const DEST_UNREACH: u8 = 3;
pub const TIME_EXCEEDED: u8 = 11;
pub const PARAMETER_PROBLEM: u8 = 12;

/// An ICMP error quoting a TCP or UDP packet.
pub struct IcmpError {
    /// Outer source and destination.
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// Offset of the ICMP header.
    pub icmp_off: usize,
    /// Offset of the quoted IPv4 header.
    pub inner_ip_off: usize,
    /// Offset of the quoted TCP/UDP header.
    pub inner_l4_off: usize,
    /// The quoted packet's 5-tuple as it was sent.
    pub inner: Lb4CtKey,
}

/// Translates the ICMP packet whose header is at `icmp_off` in place if it
/// is an error about a tracked flow: returns the pass reason
/// (`IcmpErrorTranslated`, or `PassOtherL4` for other ICMP, left
/// untouched). Not inlined: its own stack frame, beside the flow paths'.
#[inline(never)]
pub fn translate<C: PacketBuf>(
    ctx: &C,
    icmp_off: usize,
    obs: &mut Observation,
) -> Result<Reason, Reason> {
    let Some(err) = parse(ctx, icmp_off & 0xff)? else {
        return Ok(Reason::PassOtherL4);
    };
    let err = &err;
    let q = &err.inner;
    let key = Lb4CtKey {
        src_addr: q.dst_addr,
        dst_addr: q.src_addr,
        src_port: q.dst_port,
        dst_port: q.src_port,
        proto: q.proto,
        _pad: [0; 3],
    };
    let Some(entry) = ct::lookup(&key) else {
        return Ok(Reason::PassOtherL4);
    };
    obs.service_id = entry.service_id;
    obs.backend_id = entry.backend_id;
    let dst_rw = entry.rewrite & REWRITE_DST != 0;
    let src_rw = entry.rewrite & REWRITE_SRC != 0;
    // The quote mirrored: its source is the entry's destination side.
    let (inner_src, inner_sport) = if dst_rw {
        (entry.dst_addr, entry.dst_port)
    } else {
        (q.src_addr, q.src_port)
    };
    let (inner_dst, inner_dport) = if src_rw {
        (entry.src_addr, entry.src_port)
    } else {
        (q.dst_addr, q.dst_port)
    };
    let outer_dst = if dst_rw && err.dst == key.dst_addr {
        entry.dst_addr
    } else {
        err.dst
    };
    let outer_src = if src_rw && err.src == key.src_addr {
        entry.src_addr
    } else {
        err.src
    };

    // Offsets bounded for the verifier (all below 256).
    let icmp_off = err.icmp_off & 0xff;
    let ip_off = err.inner_ip_off & 0xff;
    let l4_off = err.inner_l4_off & 0xff;
    let outer_csum = ptr_at::<C, [u8; 2]>(ctx, IP_CSUM_OFF)?;
    let outer_src_p = ptr_at::<C, [u8; 4]>(ctx, IP_SRC_OFF)?;
    let outer_dst_p = ptr_at::<C, [u8; 4]>(ctx, IP_DST_OFF)?;
    let icmp_csum = ptr_at::<C, [u8; 2]>(ctx, icmp_off + 2)?;
    let inner_csum = ptr_at::<C, [u8; 2]>(ctx, ip_off + 10)?;
    let inner_src_p = ptr_at::<C, [u8; 4]>(ctx, ip_off + 12)?;
    let inner_dst_p = ptr_at::<C, [u8; 4]>(ctx, ip_off + 16)?;
    let ports = ptr_at::<C, [u8; 4]>(ctx, l4_off)?;
    // The quoted L4 checksum, when the quote is long enough to hold it.
    let l4_csum = if q.proto == PROTO_UDP {
        ptr_at::<C, [u8; 2]>(ctx, l4_off + 6).ok()
    } else if q.proto == PROTO_TCP {
        ptr_at::<C, [u8; 2]>(ctx, l4_off + 16).ok()
    } else {
        None
    };

    // SAFETY: every pointer was bounds-checked by ptr_at.
    unsafe {
        let mut outer = u16::from_be_bytes(*outer_csum);
        outer = csum_replace4(outer, err.src, outer_src);
        outer = csum_replace4(outer, err.dst, outer_dst);

        let old_inner = u16::from_be_bytes(*inner_csum);
        let mut inner = csum_replace4(old_inner, q.src_addr, inner_src);
        inner = csum_replace4(inner, q.dst_addr, inner_dst);

        let mut icmp = u16::from_be_bytes(*icmp_csum);
        icmp = csum_replace4(icmp, q.src_addr, inner_src);
        icmp = csum_replace4(icmp, q.dst_addr, inner_dst);
        icmp = csum_replace2(icmp, q.src_port, inner_sport);
        icmp = csum_replace2(icmp, q.dst_port, inner_dport);
        icmp = csum_replace2(icmp, old_inner, inner);

        if let Some(p) = l4_csum {
            let old = u16::from_be_bytes(*p);
            // A UDP datagram sent without checksum keeps none.
            if !(q.proto == PROTO_UDP && old == 0) {
                let mut l4 = csum_replace4(old, q.src_addr, inner_src);
                l4 = csum_replace4(l4, q.dst_addr, inner_dst);
                l4 = csum_replace2(l4, q.src_port, inner_sport);
                l4 = csum_replace2(l4, q.dst_port, inner_dport);
                if q.proto == PROTO_UDP && l4 == 0 {
                    l4 = 0xffff;
                }
                icmp = csum_replace2(icmp, old, l4);
                *p = l4.to_be_bytes();
            }
        }

        *outer_src_p = outer_src;
        *outer_dst_p = outer_dst;
        *outer_csum = outer.to_be_bytes();
        *inner_src_p = inner_src;
        *inner_dst_p = inner_dst;
        *inner_csum = inner.to_be_bytes();
        let mut new_ports = [0u8; 4];
        new_ports[0..2].copy_from_slice(&inner_sport.to_be_bytes());
        new_ports[2..4].copy_from_slice(&inner_dport.to_be_bytes());
        *ports = new_ports;
        *icmp_csum = icmp.to_be_bytes();
    }
    Ok(Reason::IcmpErrorTranslated)
}

/// An ICMP error and the TCP/UDP packet it quotes; `None` for anything
/// else ICMP (echo, a quote of another protocol, a quoted fragment).
#[inline(always)]
fn parse<C: PacketBuf>(ctx: &C, icmp_off: usize) -> Result<Option<IcmpError>, Reason> {
    let outer = ptr_at::<C, Ipv4Hdr>(ctx, ETH_HLEN)?;
    let (saddr, daddr) = unsafe { ((*outer).saddr, (*outer).daddr) };
    let icmp = ptr_at::<C, [u8; 8]>(ctx, icmp_off)?;
    let kind = unsafe { (*icmp)[0] };
    if kind != DEST_UNREACH && kind != TIME_EXCEEDED && kind != PARAMETER_PROBLEM {
        return Ok(None);
    }
    let inner_ip_off = icmp_off + 8;
    let Ok(Some(Ipv4Fields {
        ihl,
        proto,
        fragment,
        saddr: src,
        daddr: dst,
    })) = ipv4_at(ctx, inner_ip_off)
    else {
        return Ok(None);
    };
    if fragment || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return Ok(None);
    }
    let inner_l4_off = inner_ip_off + ihl;
    // RFC 792 quotes at least 8 bytes of the L4 header: the ports.
    let Ok(ports) = ptr_at::<C, L4Ports>(ctx, inner_l4_off) else {
        return Ok(None);
    };
    let (sport, dport) = unsafe { ((*ports).src, (*ports).dst) };
    Ok(Some(IcmpError {
        src: saddr,
        dst: daddr,
        icmp_off,
        inner_ip_off,
        inner_l4_off,
        inner: Lb4CtKey {
            src_addr: src,
            dst_addr: dst,
            src_port: u16::from_be_bytes(sport),
            dst_port: u16::from_be_bytes(dport),
            proto,
            _pad: [0; 3],
        },
    }))
}
