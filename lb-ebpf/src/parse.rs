//! Header parsing: Ethernet -> IPv4 -> TCP/UDP/SCTP (SCTP on TC only,
//! [`PacketBuf::SCTP`]), and Ethernet -> IPv6 -> extension headers ->
//! TCP/UDP. Every read goes through [`ptr_at`], the one bounds-checked
//! accessor.

use crate::sctp;
use aya_ebpf::programs::{TcContext, XdpContext};
use lb_common::{
    PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    conntrack::{Lb4CtKey, Lb6CtKey},
    stats::Reason,
};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// Offsets inside the IPv6 header (fixed 40 bytes; no header checksum).
pub const IP6_HLEN: usize = 40;
pub const IP6_SRC_OFF: usize = ETH_HLEN + 8;
pub const IP6_DST_OFF: usize = ETH_HLEN + 24;
/// IPv6 extension headers the parser walks (RFC 8200 section 4).
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers walked before giving up (a constant bound for the
/// verifier); real traffic carries one or two.
const MAX_EXT_HEADERS: usize = 6;
/// The L4 header must start within this many bytes of the frame start
/// (bounds every offset the walk computes).
const MAX_L4_OFF6: usize = 512;
/// Bytes made directly readable for the IPv6 walk on TC.
const MAX_HEADERS6: u32 = (MAX_L4_OFF6 + 20) as u32;
/// Offsets inside the IPv4 header.
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SRC_OFF: usize = ETH_HLEN + 12;
pub const IP_DST_OFF: usize = ETH_HLEN + 16;
/// Offsets of the checksum inside the TCP and UDP headers.
const TCP_CSUM_OFF: usize = 16;
const UDP_CSUM_OFF: usize = 6;
const TCP_FLAGS_OFF: usize = 13;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
/// Longest header run we ever read: Ethernet + IPv4 with options + ICMP +
/// a quoted IPv4 header with options + TCP.
const MAX_HEADERS: u32 = (ETH_HLEN + 60 + 8 + 60 + 20) as u32;

#[repr(C)]
struct EthHdr {
    dst: [u8; 6],
    src: [u8; 6],
    ether_type: [u8; 2],
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

/// The first four bytes of TCP, UDP and SCTP.
#[repr(C)]
pub struct L4Ports {
    pub src: [u8; 2],
    pub dst: [u8; 2],
}

/// A TCP, UDP or SCTP packet with what the later stages need.
pub struct Flow {
    /// The 5-tuple as on the wire (ports host order).
    pub key: Lb4CtKey,
    /// Offset of the L4 header.
    pub l4_off: usize,
    /// Offset of the L4 checksum field (SCTP: its CRC32c).
    pub csum_off: usize,
    /// TCP flags byte, 0 for UDP and SCTP.
    pub tcp_flags: u8,
}

impl Flow {
    /// A connection opener (SYN without ACK).
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.key.proto == PROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    /// What a reject answers: a TCP SYN, or any UDP or SCTP packet (as
    /// kube-proxy's REJECT rules do).
    #[inline(always)]
    pub fn is_connection_attempt(&self) -> bool {
        self.key.proto == PROTO_UDP || self.key.proto == PROTO_SCTP || self.is_syn()
    }
}

/// An IPv6 TCP or UDP packet: [`Flow`] with 128-bit addresses. It lives
/// in the per-CPU scratch map (`LB6_SCRATCH`), not on the stack.
#[repr(C)]
pub struct Flow6 {
    /// The 5-tuple as on the wire (ports host order, `proto` the L4's).
    pub key: Lb6CtKey,
    /// Offset of the L4 header (after every extension header).
    pub l4_off: usize,
    /// Offset of the L4 checksum field.
    pub csum_off: usize,
    /// TCP flags byte, 0 for UDP.
    pub tcp_flags: u8,
    /// Offset of the fragment header of a fragment that has others after
    /// it (a first fragment with more to come, or a non-first one); 0
    /// otherwise (`crate::frag` reads it).
    pub frag_hdr_off: usize,
}

impl Flow6 {
    /// A connection opener (SYN without ACK).
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.key.proto == PROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    /// What a reject answers: a TCP SYN, or any UDP datagram.
    #[inline(always)]
    pub fn is_connection_attempt(&self) -> bool {
        self.key.proto == PROTO_UDP || self.is_syn()
    }
}

/// What the IPv6 parser found.
pub enum Packet6 {
    /// TCP or UDP: the [`Flow6`] given to the parser is filled in.
    Flow,
    /// Neither TCP nor UDP (ICMPv6 and SCTP included: neighbour discovery
    /// passes).
    OtherL4,
    /// A non-first fragment: no L4 header, its bytes are payload.
    Fragment,
    /// More extension headers than the walk follows.
    ExtHeaderLimit,
}

pub enum Packet {
    NotIpv4,
    /// IPv6: `crate::process_ipv6` parses it in its own stack frame.
    Ipv6,
    OtherL4,
    Fragment,
    Flow(Flow),
    /// ICMP, with the offset of its header (`crate::icmp` reads on).
    Icmp(usize),
}

/// What parsing needs from a program context: the packet's bounds.
pub trait PacketBuf {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
    /// Length of the whole packet, for the byte counters.
    fn len(&self) -> u32;
    /// Makes the first `MAX_HEADERS` bytes directly readable, if possible.
    fn pull_headers(&self) {}
    /// The same for the longer run an IPv6 extension-header walk may read.
    fn pull_headers6(&self) {}
    /// Whether IPv4 SCTP is parsed as a flow (translated) on this hook:
    /// TC only. XDP passes SCTP untouched: its entry point's frame is at
    /// the verifier's combined stack limit beside the IPv6 new-flow frame,
    /// and the CRC32c update does not fit it (see docs/decisions.md).
    const SCTP: bool = true;
}

impl PacketBuf for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }
    /// GRO'd or paged skbs may hold less than the headers in the linear
    /// part, where direct packet access can see them.
    #[inline(always)]
    fn pull_headers(&self) {
        let len = TcContext::len(self);
        let want = if len < MAX_HEADERS { len } else { MAX_HEADERS };
        if ((self.data_end() - self.data()) as u32) < want {
            let _ = self.pull_data(want);
        }
    }
    #[inline(always)]
    fn pull_headers6(&self) {
        let len = TcContext::len(self);
        let want = if len < MAX_HEADERS6 {
            len
        } else {
            MAX_HEADERS6
        };
        if ((self.data_end() - self.data()) as u32) < want {
            let _ = self.pull_data(want);
        }
    }
}

impl PacketBuf for XdpContext {
    const SCTP: bool = false;

    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        (self.data_end() - self.data()) as u32
    }
}

/// What the stages read of an IPv4 header.
pub struct Ipv4Fields {
    /// Header length in bytes, 20..=60 (the mask bounds it for the verifier).
    pub ihl: usize,
    pub proto: u8,
    /// A non-first fragment (no L4 header).
    pub fragment: bool,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

/// The IPv4 header at `off`; `None` if it is not a valid IPv4 header,
/// `DropMalformed` if the packet ends first.
#[inline(always)]
pub fn ipv4_at<C: PacketBuf>(ctx: &C, off: usize) -> Result<Option<Ipv4Fields>, Reason> {
    let ip = ptr_at::<C, Ipv4Hdr>(ctx, off)?;
    // SAFETY: bounds-checked by ptr_at.
    let (version_ihl, proto, frag_off, saddr, daddr) = unsafe {
        (
            (*ip).version_ihl,
            (*ip).proto,
            (*ip).frag_off,
            (*ip).saddr,
            (*ip).daddr,
        )
    };
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl < 20 {
        return Ok(None);
    }
    Ok(Some(Ipv4Fields {
        ihl,
        proto,
        fragment: u16::from_be_bytes(frag_off) & 0x1fff != 0,
        saddr,
        daddr,
    }))
}

/// Returns a pointer to a `T` at `off`, or `DropMalformed` if the packet is
/// shorter.
#[inline(always)]
pub fn ptr_at<C: PacketBuf, T>(ctx: &C, off: usize) -> Result<*mut T, Reason> {
    let start = ctx.start();
    let end = ctx.end();
    // The verifier needs the whole access proven inside [data, data_end).
    if start + off + core::mem::size_of::<T>() > end {
        return Err(Reason::DropMalformed);
    }
    Ok((start + off) as *mut T)
}

/// What both families read of a TCP, UDP or SCTP header.
struct L4Fields {
    src: [u8; 2],
    dst: [u8; 2],
    /// Offset of the checksum field.
    csum_off: usize,
    /// TCP flags byte, 0 for UDP and SCTP.
    tcp_flags: u8,
}

/// Whether the parser reads ports of this protocol.
#[inline(always)]
pub fn has_ports(proto: u8) -> bool {
    proto == PROTO_TCP || proto == PROTO_UDP || proto == PROTO_SCTP
}

/// The TCP, UDP or SCTP (`proto`) header at `l4_off`.
#[inline(always)]
fn l4_at<C: PacketBuf>(ctx: &C, l4_off: usize, proto: u8) -> Result<L4Fields, Reason> {
    let ports = ptr_at::<C, L4Ports>(ctx, l4_off)?;
    // SAFETY: bounds-checked by ptr_at.
    let (src, dst) = unsafe { ((*ports).src, (*ports).dst) };
    let (csum_off, tcp_flags) = if proto == PROTO_TCP {
        // The full fixed TCP header must be present to touch its checksum.
        let tcp = ptr_at::<C, [u8; 20]>(ctx, l4_off)?;
        (l4_off + TCP_CSUM_OFF, unsafe { (*tcp)[TCP_FLAGS_OFF] })
    } else if proto == PROTO_SCTP {
        // The common header: ports, verification tag, CRC32c.
        ptr_at::<C, [u8; sctp::SCTP_HLEN]>(ctx, l4_off)?;
        (l4_off + sctp::SCTP_CSUM_OFF, 0)
    } else {
        ptr_at::<C, [u8; 8]>(ctx, l4_off)?;
        (l4_off + UDP_CSUM_OFF, 0)
    };
    Ok(L4Fields {
        src,
        dst,
        csum_off,
        tcp_flags,
    })
}

#[inline(always)]
pub fn parse_packet<C: PacketBuf>(ctx: &C) -> Result<Packet, Reason> {
    ctx.pull_headers();
    let eth = ptr_at::<C, EthHdr>(ctx, 0)?;
    let ether_type = u16::from_be_bytes(unsafe { (*eth).ether_type });
    if ether_type != ETH_P_IP {
        return Ok(if ether_type == ETH_P_IPV6 {
            Packet::Ipv6
        } else {
            Packet::NotIpv4
        });
    }
    let Some(Ipv4Fields {
        ihl,
        proto,
        fragment,
        saddr,
        daddr,
    }) = ipv4_at(ctx, ETH_HLEN)?
    else {
        return Err(Reason::DropMalformed);
    };
    // A non-first fragment carries no L4 header; reading one there would
    // misread payload as ports.
    if fragment {
        return Ok(if has_ports(proto) && (proto != PROTO_SCTP || C::SCTP) {
            Packet::Fragment
        } else {
            Packet::OtherL4
        });
    }
    let l4_off = ETH_HLEN + ihl;
    if proto == PROTO_ICMP {
        return Ok(Packet::Icmp(l4_off));
    }
    if !has_ports(proto) || (proto == PROTO_SCTP && !C::SCTP) {
        return Ok(Packet::OtherL4);
    }
    let L4Fields {
        src,
        dst,
        csum_off,
        tcp_flags,
    } = l4_at(ctx, l4_off, proto)?;
    Ok(Packet::Flow(Flow {
        key: Lb4CtKey {
            src_addr: saddr,
            dst_addr: daddr,
            src_port: u16::from_be_bytes(src),
            dst_port: u16::from_be_bytes(dst),
            proto,
            _pad: [0; 3],
        },
        l4_off,
        csum_off,
        tcp_flags,
    }))
}

/// The first fixed bytes of the IPv6 header the parser reads.
#[repr(C)]
struct Ipv6Hdr {
    version_tc_flow: [u8; 4],
    payload_len: [u8; 2],
    next_header: u8,
    hop_limit: u8,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

/// Parses an IPv6 packet (the EtherType was checked): the fixed header,
/// then up to [`MAX_EXT_HEADERS`] hop-by-hop, routing, fragment,
/// authentication and destination-options headers, then TCP or UDP. A
/// fragment header with a non-zero offset ends the walk: what follows is
/// payload, never read as ports (`flow.frag_hdr_off` says where the
/// fragment header is). A first fragment is parsed like a whole packet (it
/// carries the L4 header).
#[inline(always)]
pub fn parse_ipv6<C: PacketBuf>(ctx: &C, flow: &mut Flow6) -> Result<Packet6, Reason> {
    ctx.pull_headers6();
    let ip = ptr_at::<C, Ipv6Hdr>(ctx, ETH_HLEN)?;
    // SAFETY: bounds-checked by ptr_at.
    let (version, mut next) = unsafe { ((*ip).version_tc_flow[0] >> 4, (*ip).next_header) };
    if version != 6 {
        return Err(Reason::DropMalformed);
    }
    let mut off = ETH_HLEN + IP6_HLEN;
    flow.frag_hdr_off = 0;
    let mut walked = 0;
    while walked < MAX_EXT_HEADERS {
        let len = match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let hdr = ptr_at::<C, [u8; 2]>(ctx, off)?;
                // SAFETY: bounds-checked by ptr_at.
                let hdr = unsafe { *hdr };
                next = hdr[0];
                (hdr[1] as usize + 1) * 8
            }
            NEXTHDR_AUTH => {
                let hdr = ptr_at::<C, [u8; 2]>(ctx, off)?;
                // SAFETY: bounds-checked by ptr_at.
                let hdr = unsafe { *hdr };
                next = hdr[0];
                (hdr[1] as usize + 2) * 4
            }
            NEXTHDR_FRAGMENT => {
                let hdr = ptr_at::<C, [u8; 8]>(ctx, off)?;
                // SAFETY: bounds-checked by ptr_at.
                let hdr = unsafe { *hdr };
                let offset_flags = u16::from_be_bytes([hdr[2], hdr[3]]);
                if offset_flags & 0xfff8 != 0 {
                    flow.frag_hdr_off = off;
                    return Ok(Packet6::Fragment);
                }
                // A first fragment with more to come (M flag): its
                // datagram's later fragments follow it (`crate::frag`).
                if offset_flags & 1 != 0 {
                    flow.frag_hdr_off = off;
                }
                next = hdr[0];
                8
            }
            _ => break,
        };
        off += len;
        // Bounds the offset for the verifier, and the walk for us.
        if off > MAX_L4_OFF6 {
            return Ok(Packet6::ExtHeaderLimit);
        }
        walked += 1;
    }
    // SCTP over IPv6 is not translated yet: the IPv6 path's branches on
    // the protocol (read back from the scratch map, which the verifier
    // does not track) would put it over the verifier's budget.
    if next != PROTO_TCP && next != PROTO_UDP {
        // What follows, for the ICMPv6 error translation.
        flow.key.proto = next;
        flow.l4_off = off & 0x3ff;
        return Ok(if walked == MAX_EXT_HEADERS && is_extension_header(next) {
            Packet6::ExtHeaderLimit
        } else {
            Packet6::OtherL4
        });
    }
    let l4_off = off & 0x3ff;
    let L4Fields {
        src,
        dst,
        csum_off,
        tcp_flags,
    } = l4_at(ctx, l4_off, next)?;
    // SAFETY: bounds-checked by ptr_at (the whole fixed header); the
    // packet and the scratch space do not overlap.
    unsafe {
        copy_addr(&mut flow.key.src_addr, &(*ip).saddr);
        copy_addr(&mut flow.key.dst_addr, &(*ip).daddr);
    }
    flow.key.src_port = u16::from_be_bytes(src);
    flow.key.dst_port = u16::from_be_bytes(dst);
    flow.key.proto = next;
    // Byte stores: `= [0; 3]` becomes a call to a `memset` loop.
    for pad in &mut flow.key._pad {
        // SAFETY: a plain store to a field of `flow`.
        unsafe { core::ptr::write_volatile(pad, 0) };
    }
    flow.l4_off = l4_off;
    flow.csum_off = csum_off;
    flow.tcp_flags = tcp_flags;
    Ok(Packet6::Flow)
}

/// Copies a 16-byte address between two buffers that do not overlap (the
/// packet and a map value). A plain assignment through the raw pointers is
/// a `memmove` to LLVM, which the BPF backend calls out of line as a byte
/// loop (about 130 instructions per address); `copy_nonoverlapping` is a
/// `memcpy`, which it expands inline into 16 byte loads and stores.
///
/// # Safety
/// `src` must be readable and `dst` writable for 16 bytes, and the two must
/// not overlap.
#[inline(always)]
pub unsafe fn copy_addr(dst: *mut [u8; 16], src: *const [u8; 16]) {
    // SAFETY: as the caller promises.
    unsafe { core::ptr::copy_nonoverlapping(src, dst, 1) };
}

/// A next-header value the walk would follow.
#[inline(always)]
fn is_extension_header(next: u8) -> bool {
    matches!(
        next,
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_FRAGMENT | NEXTHDR_AUTH | NEXTHDR_DEST
    )
}
