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
    conntrack::{CT_REPLIED, CtEntry, DIR_REPLY, Lb4CtKey, REWRITE_DST, REWRITE_SRC},
    stats::Reason,
};

use crate::{
    LB6_SCRATCH, ct,
    nat::{csum_replace2, csum_replace4, csum_replace16},
    parse::{
        ETH_HLEN, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP6_DST_OFF, IP6_HLEN, IP6_SRC_OFF,
        Ipv4Fields, Ipv4Hdr, L4Ports, PacketBuf, ipv4_at, ptr_at,
    },
    stats,
    trace::Observation,
};

/// ICMP types that quote the offending packet.
pub const DEST_UNREACH: u8 = 3;
pub const TIME_EXCEEDED: u8 = 11;
pub const PARAMETER_PROBLEM: u8 = 12;
/// The destination-unreachable code of path-MTU discovery.
const FRAG_NEEDED: u8 = 4;

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
    /// Whether the error refuses a connection attempt: destination
    /// unreachable other than "fragmentation needed" (path-MTU discovery
    /// is no failure).
    pub refuses: bool,
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
    count_refusal(err.refuses, &entry);
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
    let (kind, code) = unsafe { ((*icmp)[0], (*icmp)[1]) };
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
        refuses: kind == DEST_UNREACH && code != FRAG_NEEDED,
    }))
}

/// A refusing error about a flow not answered yet fails its connection
/// attempt (the entry is the one the error travels by: a reply entry for
/// an error about the client's packets).
#[inline(always)]
fn count_refusal<E: CtEntry>(refuses: bool, entry: &E) {
    if refuses && entry.direction() == DIR_REPLY && entry.state() & CT_REPLIED == 0 {
        let (service_id, backend_id) = entry.service_backend();
        stats::count_backend(service_id, backend_id, stats::BACKEND_FAILED);
    }
}

/// ICMPv6 types that quote the offending packet (RFC 4443).
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const ICMPV6_PARAM_PROBLEM: u8 = 4;

/// [`translate`] for ICMPv6: the error whose header is at the offset the
/// IPv6 parser left in the scratch space, quoting an IPv6 TCP or UDP packet
/// right after its fixed header (a quote with extension headers passes
/// untouched). The same translation, with the IPv6 twist that the outer
/// addresses reach the ICMPv6 checksum through the pseudo-header (there is
/// no IPv6 header checksum): every changed field is folded into the
/// checksum that covers it, so the packet's overall sum is unchanged.
/// Returns the pass reason; not inlined (its own frame on top of the entry
/// point's), a plain reason for the same reason as the IPv6 flow path.
#[inline(never)]
pub fn translate6<C: PacketBuf>(ctx: &C, obs: &mut Observation) -> Reason {
    match try_translate6(ctx, obs) {
        Ok(reason) | Err(reason) => reason,
    }
}

#[inline(always)]
fn try_translate6<C: PacketBuf>(ctx: &C, obs: &mut Observation) -> Result<Reason, Reason> {
    let scratch = LB6_SCRATCH.get_ptr_mut(0).ok_or(Reason::DropRewrite)?;
    // SAFETY: this CPU's scratch entry, filled by the parser for this
    // packet; nothing else runs on it meanwhile.
    let (flow, key) = unsafe { (&(*scratch).flow, &mut (*scratch).reply_key) };
    // Bounded for the verifier (the walk keeps it below 1024).
    let icmp_off = flow.l4_off & 0x3ff;
    let icmp = ptr_at::<C, [u8; 8]>(ctx, icmp_off)?;
    // SAFETY: bounds-checked by ptr_at.
    let kind = unsafe { (*icmp)[0] };
    if !matches!(
        kind,
        ICMPV6_DEST_UNREACH | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED | ICMPV6_PARAM_PROBLEM
    ) {
        return Ok(Reason::PassOtherL4);
    }
    let inner_ip = icmp_off + 8;
    let Ok(quoted) = ptr_at::<C, [u8; IP6_HLEN]>(ctx, inner_ip) else {
        return Ok(Reason::PassOtherL4);
    };
    // SAFETY: bounds-checked by ptr_at.
    let proto = unsafe { (*quoted)[6] };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(Reason::PassOtherL4);
    }
    let inner_l4 = inner_ip + IP6_HLEN;
    // RFC 4443 quotes as much as fits: at least the ports.
    let Ok(ports) = ptr_at::<C, [u8; 4]>(ctx, inner_l4) else {
        return Ok(Reason::PassOtherL4);
    };
    let outer_src = ptr_at::<C, [u8; 16]>(ctx, IP6_SRC_OFF)?;
    let outer_dst = ptr_at::<C, [u8; 16]>(ctx, IP6_DST_OFF)?;
    let quoted_src = ptr_at::<C, [u8; 16]>(ctx, inner_ip + 8)?;
    let quoted_dst = ptr_at::<C, [u8; 16]>(ctx, inner_ip + 24)?;
    let icmp_csum = ptr_at::<C, [u8; 2]>(ctx, icmp_off + 2)?;
    let l4_csum = if proto == PROTO_UDP {
        ptr_at::<C, [u8; 2]>(ctx, inner_l4 + 6).ok()
    } else {
        ptr_at::<C, [u8; 2]>(ctx, inner_l4 + 16).ok()
    };
    // SAFETY: every pointer was bounds-checked by ptr_at; the packet is
    // only written after everything is read.
    unsafe {
        let (qsport, qdport) = (
            u16::from_be_bytes([(*ports)[0], (*ports)[1]]),
            u16::from_be_bytes([(*ports)[2], (*ports)[3]]),
        );
        // The entry of the direction the error travels in: the quote's
        // reverse.
        key.src_addr = *quoted_dst;
        key.dst_addr = *quoted_src;
        key.src_port = qdport;
        key.dst_port = qsport;
        key.proto = proto;
        key._pad = [0; 3];
        let Some(entry) = ct::lookup6(key) else {
            return Ok(Reason::PassOtherL4);
        };
        // A map value; only read.
        let entry = &*entry;
        obs.service_id = entry.service_id;
        obs.backend_id = entry.backend_id;
        let dst_rw = entry.rewrite & REWRITE_DST != 0;
        let src_rw = entry.rewrite & REWRITE_SRC != 0;
        // The outer addresses change when they are the quote's ends
        // (a router between keeps its own).
        let outer_dst_rw = dst_rw && *outer_dst == key.dst_addr;
        let outer_src_rw = src_rw && *outer_src == key.src_addr;
        let mut icmp_sum = u16::from_be_bytes(*icmp_csum);
        if outer_dst_rw {
            icmp_sum = csum_replace16(icmp_sum, &*outer_dst, &entry.dst_addr)?;
        }
        if outer_src_rw {
            icmp_sum = csum_replace16(icmp_sum, &*outer_src, &entry.src_addr)?;
        }
        // The quote mirrored: its source is the entry's destination side.
        let mut l4_sum = l4_csum.map(|p| u16::from_be_bytes(*p));
        // A UDP datagram sent without checksum keeps none.
        if proto == PROTO_UDP && l4_sum == Some(0) {
            l4_sum = None;
        }
        let old_l4_sum = l4_sum;
        if dst_rw {
            icmp_sum = csum_replace16(icmp_sum, &*quoted_src, &entry.dst_addr)?;
            icmp_sum = csum_replace2(icmp_sum, qsport, entry.dst_port);
            if let Some(sum) = l4_sum {
                let sum = csum_replace16(sum, &*quoted_src, &entry.dst_addr)?;
                l4_sum = Some(csum_replace2(sum, qsport, entry.dst_port));
            }
        }
        if src_rw {
            icmp_sum = csum_replace16(icmp_sum, &*quoted_dst, &entry.src_addr)?;
            icmp_sum = csum_replace2(icmp_sum, qdport, entry.src_port);
            if let Some(sum) = l4_sum {
                let sum = csum_replace16(sum, &*quoted_dst, &entry.src_addr)?;
                l4_sum = Some(csum_replace2(sum, qdport, entry.src_port));
            }
        }
        if let (Some(p), Some(old), Some(mut new)) = (l4_csum, old_l4_sum, l4_sum) {
            if proto == PROTO_UDP && new == 0 {
                new = 0xffff;
            }
            icmp_sum = csum_replace2(icmp_sum, old, new);
            *p = new.to_be_bytes();
        }
        if outer_dst_rw {
            *outer_dst = entry.dst_addr;
        }
        if outer_src_rw {
            *outer_src = entry.src_addr;
        }
        if dst_rw {
            *quoted_src = entry.dst_addr;
            let port = entry.dst_port.to_be_bytes();
            (*ports)[0] = port[0];
            (*ports)[1] = port[1];
        }
        if src_rw {
            *quoted_dst = entry.src_addr;
            let port = entry.src_port.to_be_bytes();
            (*ports)[2] = port[0];
            (*ports)[3] = port[1];
        }
        *icmp_csum = icmp_sum.to_be_bytes();
        // Last: fewer live values around its branches.
        count_refusal(kind == ICMPV6_DEST_UNREACH, entry);
    }
    Ok(Reason::IcmpErrorTranslated)
}
