//! Fragments of translated datagrams (both families): a first fragment
//! that was translated leaves its datagram's identity and ports in
//! `LB4_FRAGS_V1` / `LB6_FRAGS_V1` (see `lb_common::frag`); a later
//! fragment, which has no L4 header, finds them there, rebuilds the flow's
//! conntrack key and gets the address part of the flow's translation. A
//! later fragment of an unknown datagram addressed to a ClusterIP is
//! dropped: untranslated it could only be misdelivered.

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    conntrack::{Lb4CtKey, REWRITE_HAIRPIN},
    frag::{Lb4FragKey, LbFragFlow},
    stats::Reason,
};

use crate::{
    LB4_FRAGS_V1, LB6_FRAGS_V1, LB6_SCRATCH, ct,
    nat::NatFragment,
    parse::{ETH_HLEN, IP6_DST_OFF, IP6_SRC_OFF, Ipv4Hdr, PacketBuf, copy_addr, ptr_at},
    service,
    trace::Observation,
};

/// IPv4 "more fragments" flag, in the flags/offset field.
const IP_MF: u16 = 0x2000;
/// IPv6 fragment header: the M flag, in its offset/flags field.
const IP6_MF: u16 = 1;

/// Whether a packet under `reason` was translated as part of a flow (so a
/// first fragment's later fragments must be too).
#[inline(always)]
pub fn translated(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::NewFlow
            | Reason::NewFlowAffinity
            | Reason::NewFlowMaglev
            | Reason::CtForward
            | Reason::CtReply
    )
}

/// After the IPv4 flow `key` was translated: if this packet is a first
/// fragment (the parser read its L4 header, so its offset is 0) with more
/// to come, remembers its datagram for the later fragments.
#[inline(always)]
pub fn remember4<C: PacketBuf>(ctx: &C, key: &Lb4CtKey) {
    let Ok(ip) = ptr_at::<C, Ipv4Hdr>(ctx, ETH_HLEN) else {
        return;
    };
    // SAFETY: bounds-checked by ptr_at.
    let (frag_off, id) = unsafe { ((*ip).frag_off, (*ip).id) };
    if u16::from_be_bytes(frag_off) & IP_MF != 0 {
        insert4(key, u16::from_be_bytes(id));
    }
}

/// Not inlined: rare (fragmented datagrams only), kept off the frame of
/// the per-packet path.
#[inline(never)]
fn insert4(key: &Lb4CtKey, id: u16) {
    let datagram = Lb4FragKey {
        src_addr: key.src_addr,
        dst_addr: key.dst_addr,
        id,
        proto: key.proto,
        _pad: 0,
    };
    let flow = LbFragFlow {
        src_port: key.src_port,
        dst_port: key.dst_port,
        proto: key.proto,
        _pad: [0; 3],
    };
    // A failed insert (none in an LRU map) leaves the later fragments
    // unknown: dropped, as if the first had been lost.
    let _ = LB4_FRAGS_V1.insert(datagram, flow, BPF_ANY as u64);
}

/// A non-first IPv4 TCP/UDP fragment: translated like its first fragment
/// (`PassFragmentTranslated`), dropped if unknown and addressed to a
/// ClusterIP (`DropFragmentUnknown`), else passed untouched
/// (`PassFragment`). Not inlined, a plain reason back, as the IPv6 path's
/// stages; the hairpin redirect is left in `obs`.
#[inline(never)]
pub fn follow4<C: PacketBuf + NatFragment>(ctx: &C, obs: &mut Observation) -> Reason {
    match try_follow4(ctx, obs) {
        Ok(reason) | Err(reason) => reason,
    }
}

#[inline(always)]
fn try_follow4<C: PacketBuf + NatFragment>(
    ctx: &C,
    obs: &mut Observation,
) -> Result<Reason, Reason> {
    let ip = ptr_at::<C, Ipv4Hdr>(ctx, ETH_HLEN)?;
    // SAFETY: bounds-checked by ptr_at.
    let (src_addr, dst_addr, proto, id) =
        unsafe { ((*ip).saddr, (*ip).daddr, (*ip).proto, (*ip).id) };
    obs.src_addr = src_addr;
    obs.dst_addr = dst_addr;
    obs.proto = proto;
    let datagram = Lb4FragKey {
        src_addr,
        dst_addr,
        id: u16::from_be_bytes(id),
        proto,
        _pad: 0,
    };
    let mut key = Lb4CtKey {
        src_addr,
        dst_addr,
        src_port: 0,
        dst_port: 0,
        proto,
        _pad: [0; 3],
    };
    // SAFETY: a copy of the map value is taken at once.
    let entry = match unsafe { LB4_FRAGS_V1.get(datagram) } {
        Some(flow) => {
            key.src_port = flow.src_port;
            key.dst_port = flow.dst_port;
            key.proto = flow.proto;
            ct::lookup(&key)
        }
        None => None,
    };
    let Some(entry) = entry else {
        // The first fragment was not seen (or its flow is gone).
        return if service::is_service_address(&key) {
            Err(Reason::DropFragmentUnknown)
        } else {
            Ok(Reason::PassFragment)
        };
    };
    obs.service_id = entry.service_id;
    obs.backend_id = entry.backend_id;
    obs.hairpin = entry.rewrite & REWRITE_HAIRPIN != 0;
    ctx.rewrite_fragment4(&key, &entry)?;
    Ok(Reason::PassFragmentTranslated)
}

/// After an IPv6 flow was translated: if the packet the scratch space
/// describes is a first fragment with more to come, remembers its datagram
/// (addresses from the scratch tuple, as they were before the rewrite).
#[inline(never)]
// The borrows keep the key in the scratch space (a copy would be 40 bytes
// of stack).
#[allow(clippy::needless_borrows_for_generic_args)]
pub fn remember6<C: PacketBuf>(ctx: &C) {
    let Some(scratch) = LB6_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch entry, filled by the parser for this
    // packet; nothing else runs on it meanwhile.
    let (flow, datagram) = unsafe { (&(*scratch).flow, &mut (*scratch).frag_key) };
    if flow.frag_hdr_off == 0 {
        return;
    }
    // The parser kept it below 512; the mask shows the verifier.
    let Ok(hdr) = ptr_at::<C, [u8; 8]>(ctx, flow.frag_hdr_off & 0x3ff) else {
        return;
    };
    // SAFETY: bounds-checked by ptr_at.
    let hdr = unsafe { *hdr };
    if u16::from_be_bytes([hdr[2], hdr[3]]) & IP6_MF == 0 {
        return;
    }
    // SAFETY: two 16-byte fields of this CPU's scratch entry.
    unsafe {
        copy_addr(&mut datagram.src_addr, &flow.key.src_addr);
        copy_addr(&mut datagram.dst_addr, &flow.key.dst_addr);
    }
    datagram.id = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
    datagram.next_header = hdr[0];
    zero_pad(&mut datagram._pad);
    let value = LbFragFlow {
        src_port: flow.key.src_port,
        dst_port: flow.key.dst_port,
        proto: flow.key.proto,
        _pad: [0; 3],
    };
    // As for IPv4, a failed insert leaves the later fragments unknown.
    let _ = LB6_FRAGS_V1.insert(&*datagram, value, BPF_ANY as u64);
}

/// [`follow4`] for a non-first IPv6 fragment the parser left in the
/// scratch space (`frag_hdr_off`: its fragment header). The tuple built
/// there is what the trace reads.
#[inline(never)]
pub fn follow6<C: PacketBuf + NatFragment>(ctx: &C, obs: &mut Observation) -> Reason {
    match try_follow6(ctx, obs) {
        Ok(reason) | Err(reason) => reason,
    }
}

#[inline(always)]
// The borrows keep the key in the scratch space, as in `remember6`.
#[allow(clippy::needless_borrows_for_generic_args)]
fn try_follow6<C: PacketBuf + NatFragment>(
    ctx: &C,
    obs: &mut Observation,
) -> Result<Reason, Reason> {
    let scratch = LB6_SCRATCH.get_ptr_mut(0).ok_or(Reason::DropRewrite)?;
    // SAFETY: this CPU's scratch entry; nothing else runs on it meanwhile.
    let (flow, datagram) = unsafe { (&mut (*scratch).flow, &mut (*scratch).frag_key) };
    // The parser kept it below 512; the mask shows the verifier.
    let hdr = ptr_at::<C, [u8; 8]>(ctx, flow.frag_hdr_off & 0x3ff)?;
    let src = ptr_at::<C, [u8; 16]>(ctx, IP6_SRC_OFF)?;
    let dst = ptr_at::<C, [u8; 16]>(ctx, IP6_DST_OFF)?;
    // SAFETY: bounds-checked by ptr_at; the packet and the scratch space
    // do not overlap.
    let hdr = unsafe {
        copy_addr(&mut datagram.src_addr, src);
        copy_addr(&mut datagram.dst_addr, dst);
        copy_addr(&mut flow.key.src_addr, src);
        copy_addr(&mut flow.key.dst_addr, dst);
        *hdr
    };
    datagram.id = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
    datagram.next_header = hdr[0];
    zero_pad(&mut datagram._pad);
    flow.key.src_port = 0;
    flow.key.dst_port = 0;
    flow.key.proto = hdr[0];
    zero_pad(&mut flow.key._pad);
    // The trace reads the addresses from the scratch tuple from here on.
    obs.ipv6 = true;
    obs.proto = hdr[0];
    let mut entry = None;
    // SAFETY: a copy of the map value is taken at once.
    if let Some(known) = unsafe { LB6_FRAGS_V1.get(&*datagram) }.copied() {
        flow.key.src_port = known.src_port;
        flow.key.dst_port = known.dst_port;
        flow.key.proto = known.proto;
        entry = ct::lookup6(&flow.key);
    }
    let Some(entry) = entry else {
        // The first fragment was not seen (or its flow is gone).
        return if service::is_service_address6(&flow.key) {
            Err(Reason::DropFragmentUnknown)
        } else {
            Ok(Reason::PassFragment)
        };
    };
    // SAFETY: a map value, read only.
    let entry = unsafe { &*entry };
    obs.service_id = entry.service_id;
    obs.backend_id = entry.backend_id;
    obs.hairpin = entry.rewrite & REWRITE_HAIRPIN != 0;
    ctx.rewrite_fragment6(entry)?;
    Ok(Reason::PassFragmentTranslated)
}

/// Byte stores: `= [0; 3]` on map memory becomes a call to a `memset`
/// loop (as in `parse::parse_ipv6`).
#[inline(always)]
fn zero_pad(pad: &mut [u8; 3]) {
    for byte in pad {
        // SAFETY: a plain store to a byte of `pad`.
        unsafe { core::ptr::write_volatile(byte, 0) };
    }
}
