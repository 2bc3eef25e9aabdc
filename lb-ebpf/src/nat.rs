//! Address and port rewriting with incremental checksum updates: through the
//! skb helpers on TC (which also handle partial checksums of locally sent
//! packets) and by hand on XDP (whose packets carry full checksums).
//! SCTP's CRC32c covers no address and gets its own update for ports
//! (`crate::sctp`; TC only, see `PacketBuf::SCTP`).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    helpers::bpf_csum_diff,
    programs::{TcContext, XdpContext},
};
use lb_common::{
    PROTO_SCTP, PROTO_UDP,
    conntrack::{Lb4CtEntry, Lb4CtKey, Lb6CtEntry, REWRITE_DST, REWRITE_HAIRPIN, REWRITE_SRC},
    stats::Reason,
};

use crate::{
    parse::{
        ETH_HLEN, Flow, Flow6, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP6_DST_OFF, IP6_SRC_OFF,
        Ipv4Hdr, PacketBuf, copy_addr, ptr_at,
    },
    sctp,
};

/// One endpoint (address and port) of the packet, before and after.
#[derive(Clone, Copy)]
pub struct Rewrite {
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    old_port: u16,
    new_port: u16,
}

/// What to do with a packet: rewrite it (possibly not at all) and pass it
/// on, or answer the connection attempt with ICMP port unreachable.
///
/// A struct, not an enum with data: the kernel rejects the BTF Rust emits
/// for such enums (union members at a non-zero offset).
pub struct Action {
    pub translation: Translation,
    pub reject: bool,
}

impl Action {
    #[inline(always)]
    pub fn forward(translation: Translation) -> Self {
        Self {
            translation,
            reject: false,
        }
    }

    #[inline(always)]
    pub fn reject() -> Self {
        Self {
            translation: Translation::none(),
            reject: true,
        }
    }
}

/// What to change in one packet.
pub struct Translation {
    l4_off: usize,
    csum_off: usize,
    udp: bool,
    /// SCTP: rewritten by `apply_sctp4_tc`.
    sctp: bool,
    src: Option<Rewrite>,
    dst: Option<Rewrite>,
    /// A hairpin flow: after the rewrite, straight back out of the device.
    pub hairpin: bool,
}

impl Translation {
    /// Leave the packet as it is.
    #[inline(always)]
    pub fn none() -> Self {
        Self {
            l4_off: 0,
            csum_off: 0,
            udp: false,
            sctp: false,
            src: None,
            dst: None,
            hairpin: false,
        }
    }

    /// No rewrite (the IPv6 path has made it already), and the hairpin
    /// redirect if `hairpin`.
    #[inline(always)]
    pub fn hairpin_only(hairpin: bool) -> Self {
        Self {
            hairpin,
            ..Self::none()
        }
    }

    /// The rewrite a conntrack entry asks for on this flow's packet.
    #[inline(always)]
    pub fn of(flow: &Flow, entry: &Lb4CtEntry) -> Self {
        let k = &flow.key;
        Self {
            l4_off: flow.l4_off,
            csum_off: flow.csum_off,
            udp: k.proto == PROTO_UDP,
            sctp: k.proto == PROTO_SCTP,
            src: (entry.rewrite & REWRITE_SRC != 0).then_some(Rewrite {
                old_addr: k.src_addr,
                new_addr: entry.src_addr,
                old_port: k.src_port,
                new_port: entry.src_port,
            }),
            dst: (entry.rewrite & REWRITE_DST != 0).then_some(Rewrite {
                old_addr: k.dst_addr,
                new_addr: entry.dst_addr,
                old_port: k.dst_port,
                new_port: entry.dst_port,
            }),
            hairpin: entry.rewrite & REWRITE_HAIRPIN != 0,
        }
    }
}

/// The four port bytes of `t`'s packet before and after (see
/// [`sctp::ports_word`]); a port left alone is 0 on both sides.
#[inline(always)]
fn sctp_ports(t: &Translation) -> (u32, u32) {
    let (mut old, mut new) = ((0, 0), (0, 0));
    if let Some(r) = t.src {
        (old.0, new.0) = (r.old_port, r.new_port);
    }
    if let Some(r) = t.dst {
        (old.1, new.1) = (r.old_port, r.new_port);
    }
    (
        sctp::ports_word(old.0, old.1),
        sctp::ports_word(new.0, new.1),
    )
}

/// The bytes an IPv4 SCTP packet's CRC32c covers (L4 header to the end of
/// the datagram; `tot_len`, not the frame, which may be padded); 0 in a
/// first fragment, whose datagram's length is unknown. Read again here
/// rather than carried from the parser: the entry points' frames have no
/// byte to spare.
#[inline(always)]
fn sctp_len4<C: PacketBuf>(ctx: &C) -> Result<u32, Reason> {
    let ip = ptr_at::<C, Ipv4Hdr>(ctx, ETH_HLEN)?;
    // SAFETY: bounds-checked by ptr_at.
    let (version_ihl, tot_len, frag_off) =
        unsafe { ((*ip).version_ihl, (*ip).tot_len, (*ip).frag_off) };
    // More fragments follow (MF).
    if u16::from_be_bytes(frag_off) & 0x2000 != 0 {
        return Ok(0);
    }
    let ihl = u32::from(version_ihl & 0x0f) * 4;
    Ok(u32::from(u16::from_be_bytes(tot_len)).saturating_sub(ihl))
}

/// [`sctp::crc_delta`] for ports `old` -> `new` of an SCTP packet of
/// `l4_len` bytes (0: a first fragment).
#[inline(always)]
fn crc_delta_of(old: u32, new: u32, l4_len: u32) -> Result<u32, Reason> {
    if old == new {
        return Ok(0);
    }
    if l4_len == 0 {
        return Err(Reason::DropSctpFragment);
    }
    Ok(sctp::crc_delta(old, new, l4_len))
}

/// Xors `delta` into the CRC32c at `csum_off` (stored little-endian) of
/// an skb; `BPF_F_RECOMPUTE_CSUM` keeps a CHECKSUM_COMPLETE skb's sum
/// right. A locally sent packet whose CRC is still to be computed
/// (CHECKSUM_PARTIAL) gets it computed over the rewritten bytes later.
#[inline(always)]
fn update_crc_tc(ctx: &TcContext, csum_off: usize, delta: u32) -> Result<(), Reason> {
    if delta == 0 {
        return Ok(());
    }
    let crc: [u8; 4] = ctx.load(csum_off).map_err(|_| Reason::DropRewrite)?;
    let crc = u32::from_le_bytes(crc) ^ delta;
    ctx.store(csum_off, &crc.to_le_bytes(), BPF_F_RECOMPUTE_CSUM as u64)
        .map_err(|_| Reason::DropRewrite)
}

/// Applies `t` through the skb helpers.
#[inline(always)]
pub fn apply_tc(ctx: &TcContext, t: &Translation) -> Result<(), Reason> {
    // One test of the protocol, then separate bodies: `t` lives on the
    // stack as bytes the verifier reads back as unknown, so each test
    // would split every path again.
    if t.sctp {
        return apply_sctp4_tc(ctx, t);
    }
    if let Some(r) = t.src {
        rewrite_tc(ctx, t, IP_SRC_OFF, t.l4_off, &r)?;
    }
    if let Some(r) = t.dst {
        rewrite_tc(ctx, t, IP_DST_OFF, t.l4_off + 2, &r)?;
    }
    Ok(())
}

/// [`apply_tc`] for IPv4 SCTP: the CRC32c updated for the ports (before
/// they are written: the update needs only the two), the IPv4 header
/// checksum absorbs the addresses; the port stores keep a
/// CHECKSUM_COMPLETE skb's sum right.
#[inline(always)]
fn apply_sctp4_tc(ctx: &TcContext, t: &Translation) -> Result<(), Reason> {
    let (old, new) = sctp_ports(t);
    if old != new {
        update_sctp_crc4_tc(ctx, t.csum_off, old, new)?;
    }
    for (r, addr_off, port_off) in [
        (t.src, IP_SRC_OFF, t.l4_off),
        (t.dst, IP_DST_OFF, t.l4_off + 2),
    ] {
        let Some(r) = r else { continue };
        if r.old_addr != r.new_addr {
            let (old_a, new_a) = (
                u32::from_ne_bytes(r.old_addr) as u64,
                u32::from_ne_bytes(r.new_addr) as u64,
            );
            ctx.l3_csum_replace(IP_CSUM_OFF, old_a, new_a, 4)
                .map_err(|_| Reason::DropRewrite)?;
            ctx.store(addr_off, &r.new_addr, 0)
                .map_err(|_| Reason::DropRewrite)?;
        }
        if r.old_port != r.new_port {
            let flags = BPF_F_RECOMPUTE_CSUM as u64;
            ctx.store(port_off, &r.new_port.to_be_bytes(), flags)
                .map_err(|_| Reason::DropRewrite)?;
        }
    }
    Ok(())
}

/// Updates an IPv4 SCTP packet's CRC32c for its ports going from `old` to
/// `new`. Not inlined, and given plain numbers: the entry point's frame
/// has no byte to spare. A packet whose CRC is still to be computed
/// (CHECKSUM_PARTIAL, sent by a local pod) gets it computed later, over
/// the rewritten bytes.
#[inline(never)]
fn update_sctp_crc4_tc(ctx: &TcContext, csum_off: usize, old: u32, new: u32) -> Result<(), Reason> {
    let delta = crc_delta_of(old, new, sctp_len4(ctx)?)?;
    update_crc_tc(ctx, csum_off, delta)
}

#[inline(always)]
fn rewrite_tc(
    ctx: &TcContext,
    t: &Translation,
    addr_off: usize,
    port_off: usize,
    r: &Rewrite,
) -> Result<(), Reason> {
    // The helpers take the raw network-order field values.
    let old_a = u32::from_ne_bytes(r.old_addr) as u64;
    let new_a = u32::from_ne_bytes(r.new_addr) as u64;
    let old_p = r.old_port.to_be() as u64;
    let new_p = r.new_port.to_be() as u64;
    // A UDP checksum of zero means "none" and must stay zero.
    let mangled = if t.udp {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };

    if r.old_addr != r.new_addr {
        ctx.l4_csum_replace(
            t.csum_off,
            old_a,
            new_a,
            BPF_F_PSEUDO_HDR as u64 | mangled | 4,
        )
        .map_err(|_| Reason::DropRewrite)?;
        ctx.l3_csum_replace(IP_CSUM_OFF, old_a, new_a, 4)
            .map_err(|_| Reason::DropRewrite)?;
        ctx.store(addr_off, &r.new_addr, 0)
            .map_err(|_| Reason::DropRewrite)?;
    }
    if r.old_port != r.new_port {
        ctx.l4_csum_replace(t.csum_off, old_p, new_p, mangled | 2)
            .map_err(|_| Reason::DropRewrite)?;
        ctx.store(port_off, &r.new_port.to_be_bytes(), 0)
            .map_err(|_| Reason::DropRewrite)?;
    }
    Ok(())
}

/// Applies `t` by writing the packet directly (RFC 1624 incremental
/// checksum updates).
#[inline(always)]
pub fn apply_xdp(ctx: &XdpContext, t: &Translation) -> Result<(), Reason> {
    if t.src.is_none() && t.dst.is_none() {
        return Ok(());
    }
    // The offsets may come back from a non-inlined call as plain numbers:
    // the masks give the verifier the bounds it needs (they are below 128).
    let csum_off = t.csum_off & 0xff;
    let l4_off = t.l4_off & 0xff;
    let ip_csum = ptr_at::<XdpContext, [u8; 2]>(ctx, IP_CSUM_OFF)?;
    let l4_csum = ptr_at::<XdpContext, [u8; 2]>(ctx, csum_off)?;
    let src_port = ptr_at::<XdpContext, [u8; 2]>(ctx, l4_off)?;
    let dst_port = ptr_at::<XdpContext, [u8; 2]>(ctx, l4_off + 2)?;
    let src = ptr_at::<XdpContext, [u8; 4]>(ctx, IP_SRC_OFF)?;
    let dst = ptr_at::<XdpContext, [u8; 4]>(ctx, IP_DST_OFF)?;
    // SAFETY: every pointer was bounds-checked against data_end above.
    unsafe {
        let mut sums = Sums {
            ip: u16::from_be_bytes(*ip_csum),
            l4: u16::from_be_bytes(*l4_csum),
            // A UDP datagram without checksum keeps none.
            l4_on: !(t.udp && u16::from_be_bytes(*l4_csum) == 0),
        };
        if let Some(r) = t.src {
            sums.update(&r);
            *src = r.new_addr;
            *src_port = r.new_port.to_be_bytes();
        }
        if let Some(r) = t.dst {
            sums.update(&r);
            *dst = r.new_addr;
            *dst_port = r.new_port.to_be_bytes();
        }
        if sums.l4_on && t.udp && sums.l4 == 0 {
            // A computed zero is sent as all ones (RFC 768).
            sums.l4 = 0xffff;
        }
        *ip_csum = sums.ip.to_be_bytes();
        *l4_csum = sums.l4.to_be_bytes();
    }
    Ok(())
}

/// The IPv4 header and L4 checksums being updated.
struct Sums {
    ip: u16,
    l4: u16,
    l4_on: bool,
}

impl Sums {
    #[inline(always)]
    fn update(&mut self, r: &Rewrite) {
        self.ip = csum_replace4(self.ip, r.old_addr, r.new_addr);
        if self.l4_on {
            // The L4 checksum covers the addresses through the pseudo-header.
            self.l4 = csum_replace4(self.l4, r.old_addr, r.new_addr);
            self.l4 = csum_replace2(self.l4, r.old_port, r.new_port);
        }
    }
}

/// One's-complement sum of 16-bit words folded to 16 bits.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// HC' = ~(~HC + ~m + m') for one 16-bit word (RFC 1624, eqn. 3).
#[inline(always)]
pub fn csum_replace2(check: u16, old: u16, new: u16) -> u16 {
    !fold(!check as u32 + !old as u32 + new as u32)
}

/// The same for a 32-bit field, as two 16-bit words.
#[inline(always)]
pub fn csum_replace4(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let sum = !check as u32
        + !u16::from_be_bytes([old[0], old[1]]) as u32
        + !u16::from_be_bytes([old[2], old[3]]) as u32
        + u16::from_be_bytes([new[0], new[1]]) as u32
        + u16::from_be_bytes([new[2], new[3]]) as u32;
    !fold(sum)
}

/// Rewrites an IPv6 packet as its conntrack entry says. IPv6 has no
/// header checksum; the addresses reach the L4 checksum through the
/// pseudo-header, so each rewritten address and port is folded into it.
pub trait Nat6 {
    fn rewrite6(&self, flow: &Flow6, entry: &Lb6CtEntry) -> Result<(), Reason>;
}

impl Nat6 for TcContext {
    /// Through the skb helpers, like [`apply_tc`]: the address change goes
    /// in as a `bpf_csum_diff` of the 16 bytes with `BPF_F_PSEUDO_HDR`
    /// (size 0: "by difference"), which also keeps partial checksums of
    /// locally sent packets and a CHECKSUM_COMPLETE skb's sum right.
    #[inline(always)]
    fn rewrite6(&self, flow: &Flow6, entry: &Lb6CtEntry) -> Result<(), Reason> {
        let k = &flow.key;
        let udp = k.proto == PROTO_UDP;
        if entry.rewrite & REWRITE_SRC != 0 {
            let old = (&k.src_addr, k.src_port);
            let new = (&entry.src_addr, entry.src_port);
            rewrite6_tc(self, flow, udp, (IP6_SRC_OFF, flow.l4_off), old, new)?;
        }
        if entry.rewrite & REWRITE_DST != 0 {
            let old = (&k.dst_addr, k.dst_port);
            let new = (&entry.dst_addr, entry.dst_port);
            rewrite6_tc(self, flow, udp, (IP6_DST_OFF, flow.l4_off + 2), old, new)?;
        }
        Ok(())
    }
}

/// One endpoint of an IPv6 packet, `(address offset, port offset)`, from
/// `old` to `new` (address, port).
#[inline(always)]
fn rewrite6_tc(
    ctx: &TcContext,
    flow: &Flow6,
    udp: bool,
    (addr_off, port_off): (usize, usize),
    (old_addr, old_port): (&[u8; 16], u16),
    (new_addr, new_port): (&[u8; 16], u16),
) -> Result<(), Reason> {
    // A UDP checksum of zero means "none" and must stay zero.
    let mangled = if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    if old_addr != new_addr {
        // SAFETY: both buffers are 16 readable bytes (stack or map value).
        let diff = unsafe {
            bpf_csum_diff(
                old_addr.as_ptr() as *mut u32,
                16,
                new_addr.as_ptr() as *mut u32,
                16,
                0,
            )
        };
        if diff < 0 {
            return Err(Reason::DropRewrite);
        }
        ctx.l4_csum_replace(
            flow.csum_off,
            0,
            diff as u64,
            BPF_F_PSEUDO_HDR as u64 | mangled,
        )
        .map_err(|_| Reason::DropRewrite)?;
        ctx.store(addr_off, new_addr, 0)
            .map_err(|_| Reason::DropRewrite)?;
    }
    if old_port != new_port {
        let (old_p, new_p) = (old_port.to_be() as u64, new_port.to_be() as u64);
        ctx.l4_csum_replace(flow.csum_off, old_p, new_p, mangled | 2)
            .map_err(|_| Reason::DropRewrite)?;
        ctx.store(port_off, &new_port.to_be_bytes(), 0)
            .map_err(|_| Reason::DropRewrite)?;
    }
    Ok(())
}

impl Nat6 for XdpContext {
    /// By direct writes, like [`apply_xdp`] (RFC 1624 updates).
    #[inline(always)]
    fn rewrite6(&self, flow: &Flow6, entry: &Lb6CtEntry) -> Result<(), Reason> {
        let k = &flow.key;
        // Offsets that come back from a non-inlined call are plain numbers
        // to the verifier: the masks bound them (the walk keeps them below
        // 1024).
        let csum_off = flow.csum_off & 0x3ff;
        let l4_off = flow.l4_off & 0x3ff;
        let l4_csum = ptr_at::<XdpContext, [u8; 2]>(self, csum_off)?;
        let src_port = ptr_at::<XdpContext, [u8; 2]>(self, l4_off)?;
        let dst_port = ptr_at::<XdpContext, [u8; 2]>(self, l4_off + 2)?;
        let src = ptr_at::<XdpContext, [u8; 16]>(self, IP6_SRC_OFF)?;
        let dst = ptr_at::<XdpContext, [u8; 16]>(self, IP6_DST_OFF)?;
        // SAFETY: every pointer was bounds-checked against data_end above;
        // the packet overlaps neither the flow nor the entry (map values);
        // their addresses are 4-byte aligned (the assertions after
        // `csum_replace16_aligned`).
        unsafe {
            let mut sum = u16::from_be_bytes(*l4_csum);
            // A UDP datagram without checksum keeps none.
            let udp = k.proto == PROTO_UDP;
            let sum_on = !(udp && sum == 0);
            if entry.rewrite & REWRITE_SRC != 0 {
                if sum_on {
                    sum = csum_replace16_aligned(sum, &k.src_addr, &entry.src_addr);
                    sum = csum_replace2(sum, k.src_port, entry.src_port);
                }
                copy_addr(src, &entry.src_addr);
                *src_port = entry.src_port.to_be_bytes();
            }
            if entry.rewrite & REWRITE_DST != 0 {
                if sum_on {
                    sum = csum_replace16_aligned(sum, &k.dst_addr, &entry.dst_addr);
                    sum = csum_replace2(sum, k.dst_port, entry.dst_port);
                }
                copy_addr(dst, &entry.dst_addr);
                *dst_port = entry.dst_port.to_be_bytes();
            }
            if sum_on && udp && sum == 0 {
                // A computed zero is sent as all ones (RFC 768).
                sum = 0xffff;
            }
            *l4_csum = sum.to_be_bytes();
        }
        Ok(())
    }
}

/// [`csum_replace4`] for a 128-bit field, through `bpf_csum_diff`: one
/// helper call, where sixteen byte loads per side (the addresses are byte
/// arrays) would spill past the stack budget. The helper sums in memory
/// order; the one's-complement sum commutes with the byte swap, so the
/// host-order `check` goes in and comes out swapped.
#[inline(always)]
pub fn csum_replace16(check: u16, old: &[u8; 16], new: &[u8; 16]) -> Result<u16, Reason> {
    let seed = !check.to_be() as u32;
    // SAFETY: both buffers are 16 readable bytes (scratch or map value).
    let sum = unsafe {
        bpf_csum_diff(
            old.as_ptr() as *mut u32,
            16,
            new.as_ptr() as *mut u32,
            16,
            seed,
        )
    };
    if sum < 0 {
        return Err(Reason::DropRewrite);
    }
    Ok(u16::from_be(!fold(sum as u32)))
}

/// [`csum_replace16`] computed inline, for addresses in the scratch space
/// and a conntrack entry: four 32-bit loads per side where the helper call
/// costs more than the whole sum. As there, the words are summed in memory
/// order (the one's-complement sum commutes with the byte swap), and the
/// result is the helper's: a non-zero sum folds to the same 1..=0xffff.
///
/// # Safety
/// Both addresses must be 4-byte aligned: the layout assertions below hold
/// the address fields of every `Flow6` key and `Lb6CtEntry` to that.
#[inline(always)]
unsafe fn csum_replace16_aligned(check: u16, old: &[u8; 16], new: &[u8; 16]) -> u16 {
    let (old, new) = (old.as_ptr() as *const u32, new.as_ptr() as *const u32);
    let mut sum = u64::from(!check.to_be());
    for i in 0..4 {
        // SAFETY: in bounds of the 16-byte arrays, 4-byte aligned (the
        // caller's promise).
        unsafe {
            sum += u64::from(!*old.add(i));
            sum += u64::from(*new.add(i));
        }
    }
    // Nine terms below 2^32 fit 36 bits; the first fold leaves 33, the
    // second 32.
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    u16::from_be(!fold(sum as u32))
}

// What `csum_replace16_aligned` is given: the addresses of a `Flow6`'s key
// and of a conntrack entry, through references (so aligned to their types).
const _: () = {
    use core::mem::{align_of, offset_of};
    use lb_common::conntrack::Lb6CtKey;
    assert!(align_of::<Flow6>() >= 4 && offset_of!(Flow6, key) % 4 == 0);
    assert!(offset_of!(Lb6CtKey, src_addr) % 4 == 0);
    assert!(offset_of!(Lb6CtKey, dst_addr) % 4 == 0);
    assert!(align_of::<Lb6CtEntry>() >= 4);
    assert!(offset_of!(Lb6CtEntry, src_addr) % 4 == 0);
    assert!(offset_of!(Lb6CtEntry, dst_addr) % 4 == 0);
};

/// Rewrites the addresses of a non-first fragment as its datagram's
/// conntrack entry says. Nothing else: the ports and the L4 checksum are
/// in the first fragment, whose incremental update (pseudo-header
/// included) already covers the whole datagram.
pub trait NatFragment {
    /// IPv4: the header checksum absorbs the change (so the packet's
    /// overall sum, a CHECKSUM_COMPLETE skb's `csum`, stays the same).
    /// `key` holds the fragment's addresses as they are.
    fn rewrite_fragment4(&self, key: &Lb4CtKey, entry: &Lb4CtEntry) -> Result<(), Reason>;
    /// IPv6: no header checksum to update.
    fn rewrite_fragment6(&self, entry: &Lb6CtEntry) -> Result<(), Reason>;
}

impl NatFragment for TcContext {
    #[inline(always)]
    fn rewrite_fragment4(&self, key: &Lb4CtKey, entry: &Lb4CtEntry) -> Result<(), Reason> {
        if entry.rewrite & REWRITE_SRC != 0 {
            store_addr4_tc(self, IP_SRC_OFF, key.src_addr, entry.src_addr)?;
        }
        if entry.rewrite & REWRITE_DST != 0 {
            store_addr4_tc(self, IP_DST_OFF, key.dst_addr, entry.dst_addr)?;
        }
        Ok(())
    }

    /// No checksum absorbs an IPv6 address change: the store folds it
    /// into a CHECKSUM_COMPLETE skb's `csum` (`BPF_F_RECOMPUTE_CSUM`).
    #[inline(always)]
    fn rewrite_fragment6(&self, entry: &Lb6CtEntry) -> Result<(), Reason> {
        let flags = BPF_F_RECOMPUTE_CSUM as u64;
        if entry.rewrite & REWRITE_SRC != 0 {
            self.store(IP6_SRC_OFF, &entry.src_addr, flags)
                .map_err(|_| Reason::DropRewrite)?;
        }
        if entry.rewrite & REWRITE_DST != 0 {
            self.store(IP6_DST_OFF, &entry.dst_addr, flags)
                .map_err(|_| Reason::DropRewrite)?;
        }
        Ok(())
    }
}

/// One IPv4 address of a fragment, from `old` to `new`, at `off`.
#[inline(always)]
fn store_addr4_tc(ctx: &TcContext, off: usize, old: [u8; 4], new: [u8; 4]) -> Result<(), Reason> {
    let (old_a, new_a) = (
        u32::from_ne_bytes(old) as u64,
        u32::from_ne_bytes(new) as u64,
    );
    ctx.l3_csum_replace(IP_CSUM_OFF, old_a, new_a, 4)
        .map_err(|_| Reason::DropRewrite)?;
    ctx.store(off, &new, 0).map_err(|_| Reason::DropRewrite)
}

impl NatFragment for XdpContext {
    #[inline(always)]
    fn rewrite_fragment4(&self, key: &Lb4CtKey, entry: &Lb4CtEntry) -> Result<(), Reason> {
        let ip_csum = ptr_at::<XdpContext, [u8; 2]>(self, IP_CSUM_OFF)?;
        let src = ptr_at::<XdpContext, [u8; 4]>(self, IP_SRC_OFF)?;
        let dst = ptr_at::<XdpContext, [u8; 4]>(self, IP_DST_OFF)?;
        // SAFETY: every pointer was bounds-checked against data_end above.
        unsafe {
            let mut sum = u16::from_be_bytes(*ip_csum);
            if entry.rewrite & REWRITE_SRC != 0 {
                sum = csum_replace4(sum, key.src_addr, entry.src_addr);
                *src = entry.src_addr;
            }
            if entry.rewrite & REWRITE_DST != 0 {
                sum = csum_replace4(sum, key.dst_addr, entry.dst_addr);
                *dst = entry.dst_addr;
            }
            *ip_csum = sum.to_be_bytes();
        }
        Ok(())
    }

    #[inline(always)]
    fn rewrite_fragment6(&self, entry: &Lb6CtEntry) -> Result<(), Reason> {
        let src = ptr_at::<XdpContext, [u8; 16]>(self, IP6_SRC_OFF)?;
        let dst = ptr_at::<XdpContext, [u8; 16]>(self, IP6_DST_OFF)?;
        // SAFETY: bounds-checked above; the packet and the entry (a map
        // value) do not overlap.
        unsafe {
            if entry.rewrite & REWRITE_SRC != 0 {
                copy_addr(src, &entry.src_addr);
            }
            if entry.rewrite & REWRITE_DST != 0 {
                copy_addr(dst, &entry.dst_addr);
            }
        }
        Ok(())
    }
}

/// Sends a hairpin packet straight back out of the device it came in on
/// (the pod is both client and backend): the MAC addresses swap, as the
/// node would have addressed it.
#[inline(always)]
pub fn hairpin_tc(ctx: &TcContext) -> Result<i32, Reason> {
    let eth = ptr_at::<TcContext, [u8; 12]>(ctx, 0)?;
    // SAFETY: bounds-checked by ptr_at.
    let eth = unsafe { *eth };
    let mut swapped = [0u8; 12];
    swapped[0..6].copy_from_slice(&eth[6..12]);
    swapped[6..12].copy_from_slice(&eth[0..6]);
    ctx.store(0, &swapped, 0).map_err(|_| Reason::DropRewrite)?;
    // SAFETY: reading the ingress ifindex of the program's own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    Ok(unsafe { aya_ebpf::helpers::bpf_redirect(ifindex, 0) } as i32)
}
