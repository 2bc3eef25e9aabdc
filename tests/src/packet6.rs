//! Ethernet + IPv6 (+ extension headers) + TCP/UDP packets, the IPv6 twin
//! of [`crate::packet`]: [`Packet6::emit`] builds the bytes with a correct
//! L4 checksum over the IPv6 pseudo-header (RFC 8200 section 8.1),
//! [`Packet6::parse`] walks the extension headers and verifies it. IPv6
//! has no header checksum.

use std::net::Ipv6Addr;

use crate::packet::{
    Transport, ethernet_frame, fold, ip_part, l4_bytes, parse_l4, set_l4_checksum, sum_words,
};

const IPV6_HLEN: usize = 40;

/// Next-header values of the extension headers [`Packet6`] knows.
pub const HOP_BY_HOP: u8 = 0;
pub const ROUTING: u8 = 43;
pub const FRAGMENT: u8 = 44;
pub const DEST_OPTIONS: u8 = 60;
/// ICMPv6, whose checksum [`Packet6::parse`] verifies too.
pub const ICMPV6: u8 = 58;

/// One extension header: its type and its bytes after the first two (the
/// next-header byte and the length or reserved byte, which
/// [`Packet6::emit`] writes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtHeader {
    pub kind: u8,
    pub data: Vec<u8>,
}

impl ExtHeader {
    /// Hop-by-hop options: one PadN option, 8 bytes in all.
    pub fn hop_by_hop() -> Self {
        Self {
            kind: HOP_BY_HOP,
            data: vec![1, 4, 0, 0, 0, 0],
        }
    }

    /// Destination options of `8 * units` bytes (PadN filling them).
    pub fn dest_options(units: usize) -> Self {
        let mut data = vec![0u8; 8 * units - 2];
        data[0] = 1;
        data[1] = (8 * units - 4) as u8;
        Self {
            kind: DEST_OPTIONS,
            data,
        }
    }

    /// A segment routing header with no segments left (24 bytes).
    pub fn routing(segment: Ipv6Addr) -> Self {
        let mut data = vec![4, 0, 0, 0, 0, 0];
        data.extend_from_slice(&segment.octets());
        Self {
            kind: ROUTING,
            data,
        }
    }

    /// A fragment header: offset in 8-byte units, more-fragments flag.
    pub fn fragment(offset: u16, more: bool, id: u32) -> Self {
        let mut data = ((offset << 3) | u16::from(more)).to_be_bytes().to_vec();
        data.extend_from_slice(&id.to_be_bytes());
        Self {
            kind: FRAGMENT,
            data,
        }
    }

    fn len(&self) -> usize {
        2 + self.data.len()
    }

    /// The second byte: the length in 8-byte units beyond the first, or
    /// (fragment) reserved.
    fn len_byte(&self) -> u8 {
        if self.kind == FRAGMENT {
            0
        } else {
            (self.len() / 8 - 1) as u8
        }
    }
}

/// A parsed or to-be-built IPv6 packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub hop_limit: u8,
    /// Between the IPv6 header and the transport, in order.
    pub ext: Vec<ExtHeader>,
    /// What follows the extension headers: after a non-first fragment
    /// header, `Transport::Other` with the L4 protocol (the bytes are
    /// payload, no header).
    pub transport: Transport,
    pub payload: Vec<u8>,
}

impl Packet6 {
    pub fn tcp(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), flags: u8, payload: &[u8]) -> Self {
        Self {
            src: src.0,
            dst: dst.0,
            hop_limit: 64,
            ext: Vec::new(),
            transport: Transport::Tcp {
                src_port: src.1,
                dst_port: dst.1,
                flags,
                seq: 0x1234_5678,
            },
            payload: payload.to_vec(),
        }
    }

    pub fn udp(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), payload: &[u8]) -> Self {
        Self {
            src: src.0,
            dst: dst.0,
            hop_limit: 64,
            ext: Vec::new(),
            transport: Transport::Udp {
                src_port: src.1,
                dst_port: dst.1,
            },
            payload: payload.to_vec(),
        }
    }

    /// The same packet with extension headers `ext` before its transport.
    pub fn with_ext(mut self, ext: Vec<ExtHeader>) -> Self {
        self.ext = ext;
        self
    }

    /// An SCTP packet of `chunks`, verification tag 0 (an INIT's).
    pub fn sctp(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), chunks: &[u8]) -> Self {
        Self {
            src: src.0,
            dst: dst.0,
            hop_limit: 64,
            ext: Vec::new(),
            transport: Transport::Sctp {
                src_port: src.1,
                dst_port: dst.1,
                verification_tag: 0,
            },
            payload: chunks.to_vec(),
        }
    }

    /// (source port, destination port) for TCP, UDP and SCTP.
    pub fn ports(&self) -> Option<(u16, u16)> {
        self.transport.ports()
    }

    /// The frame as it would be on the wire.
    pub fn emit(&self) -> Vec<u8> {
        let proto = self.transport.protocol();
        let mut l4 = l4_bytes(&self.transport, &self.payload);
        let pseudo = pseudo_sum6(self.src, self.dst, proto, l4.len());
        set_l4_checksum(&self.transport, &mut l4, pseudo, false);

        let mut ext = Vec::new();
        for (i, header) in self.ext.iter().enumerate() {
            let next = self.ext.get(i + 1).map_or(proto, |h| h.kind);
            ext.push(next);
            ext.push(header.len_byte());
            ext.extend_from_slice(&header.data);
        }
        let mut ip = vec![0u8; IPV6_HLEN];
        ip[0] = 0x60;
        let payload_len = (ext.len() + l4.len()) as u16;
        ip[4..6].copy_from_slice(&payload_len.to_be_bytes());
        ip[6] = self.ext.first().map_or(proto, |h| h.kind);
        ip[7] = self.hop_limit;
        ip[8..24].copy_from_slice(&self.src.octets());
        ip[24..40].copy_from_slice(&self.dst.octets());

        ethernet_frame(0x86dd, &[&ip, &ext, &l4])
    }

    /// Parses a frame, walking the extension headers and verifying the L4
    /// checksum; the error says what is wrong.
    pub fn parse(frame: &[u8]) -> Result<Packet6, String> {
        let ip = ip_part(frame, (0x86dd, "IPv6"), IPV6_HLEN)?;
        let payload_len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
        if ip[0] >> 4 != 6 || IPV6_HLEN + payload_len > ip.len() {
            return Err("bad IPv6 header".into());
        }
        let octets = |b: &[u8]| -> [u8; 16] { b.try_into().unwrap_or([0; 16]) };
        let src = Ipv6Addr::from(octets(&ip[8..24]));
        let dst = Ipv6Addr::from(octets(&ip[24..40]));
        let rest = &ip[IPV6_HLEN..IPV6_HLEN + payload_len];
        let mut next = ip[6];
        let mut off = 0;
        let mut ext = Vec::new();
        let mut non_first_fragment = false;
        while matches!(next, HOP_BY_HOP | ROUTING | DEST_OPTIONS | FRAGMENT) {
            if rest.len() < off + 8 {
                return Err("extension header truncated".into());
            }
            let len = if next == FRAGMENT {
                8
            } else {
                (rest[off + 1] as usize + 1) * 8
            };
            if rest.len() < off + len {
                return Err("extension header truncated".into());
            }
            ext.push(ExtHeader {
                kind: next,
                data: rest[off + 2..off + len].to_vec(),
            });
            if next == FRAGMENT && u16::from_be_bytes([rest[off + 2], rest[off + 3]]) >> 3 != 0 {
                non_first_fragment = true;
            }
            next = rest[off];
            off += len;
            if non_first_fragment {
                break;
            }
        }
        let l4 = &rest[off..];
        let (transport, payload) = if non_first_fragment {
            (Transport::Other { protocol: next }, l4.to_vec())
        } else if next == ICMPV6 {
            if fold(sum_words(l4) + pseudo_sum6(src, dst, next, l4.len())) != 0xffff {
                return Err("ICMPv6 checksum is wrong".into());
            }
            (Transport::Other { protocol: next }, l4.to_vec())
        } else {
            let pseudo = pseudo_sum6(src, dst, next, l4.len());
            let (transport, payload, zero) = parse_l4(next, l4, pseudo)?;
            if zero {
                return Err("UDP over IPv6 without a checksum".into());
            }
            (transport, payload)
        };
        Ok(Packet6 {
            src,
            dst,
            hop_limit: ip[7],
            ext,
            transport,
            payload,
        })
    }
}

/// The IPv6 pseudo-header's sum: addresses, upper-layer length, next header.
fn pseudo_sum6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, len: usize) -> u32 {
    sum_words(&src.octets())
        + sum_words(&dst.octets())
        + sum_words(&(len as u32).to_be_bytes())
        + next_header as u32
}

/// The frame of an ICMPv6 `message` (type, code, checksum, ...) from `src`
/// to `dst`, its checksum filled in.
pub fn icmpv6(src: Ipv6Addr, dst: Ipv6Addr, mut message: Vec<u8>) -> Vec<u8> {
    message[2..4].copy_from_slice(&[0, 0]);
    let sum = !fold(sum_words(&message) + pseudo_sum6(src, dst, ICMPV6, message.len()));
    message[2..4].copy_from_slice(&sum.to_be_bytes());
    Packet6 {
        src,
        dst,
        hop_limit: 255,
        ext: Vec::new(),
        transport: Transport::Other { protocol: ICMPV6 },
        payload: message,
    }
    .emit()
}

/// An ICMPv6 neighbour solicitation for `target` from `src`: IPv6 that is
/// neither TCP nor UDP.
pub fn neighbour_solicitation(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let mut message = vec![135, 0, 0, 0, 0, 0, 0, 0];
    message.extend_from_slice(&target.octets());
    // The solicited-node multicast address (close enough for a parser).
    icmpv6(
        src,
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 1),
        message,
    )
}

/// An ICMPv6 error (`kind`, `code`, the 4-byte `param`: the MTU of a
/// Packet Too Big) from `src` to `dst` quoting `quote` (an IPv6 packet from
/// its header on).
pub fn icmpv6_error(
    (src, dst): (Ipv6Addr, Ipv6Addr),
    kind: u8,
    code: u8,
    param: u32,
    quote: &[u8],
) -> Vec<u8> {
    let mut message = vec![kind, code, 0, 0];
    message.extend_from_slice(&param.to_be_bytes());
    message.extend_from_slice(quote);
    icmpv6(src, dst, message)
}

/// The IPv6 packet an ICMPv6 error's message quotes (after its 8-byte
/// header), parsed and its checksum verified; it must be quoted whole.
pub fn quoted_packet(message: &[u8]) -> Result<Packet6, String> {
    let quote = message.get(8..).ok_or("ICMPv6 message too short")?;
    Packet6::parse(&ethernet_frame(0x86dd, &[quote]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{ACK, PSH, SYN};

    const A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 2);
    const B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);

    #[test]
    fn round_trips_tcp_and_udp_with_and_without_extension_headers() {
        for p in [
            Packet6::tcp((A, 40000), (B, 80), SYN, b""),
            Packet6::tcp((A, 40000), (B, 80), ACK | PSH, b"GET / HTTP/1.0\r\n\r\n"),
            Packet6::udp((A, 40001), (B, 53), b"odd"),
            Packet6::tcp((A, 40002), (B, 80), SYN, b"").with_ext(vec![
                ExtHeader::hop_by_hop(),
                ExtHeader::dest_options(2),
                ExtHeader::routing(B),
                ExtHeader::fragment(0, true, 7),
            ]),
        ] {
            assert_eq!(Packet6::parse(&p.emit()).expect("parse"), p);
        }
    }

    #[test]
    fn detects_a_wrong_checksum_and_reads_no_ports_after_a_later_fragment() {
        let mut tcp = Packet6::tcp((A, 40000), (B, 80), SYN, b"x").emit();
        let last = tcp.len() - 1;
        tcp[last] ^= 1;
        assert_eq!(
            Packet6::parse(&tcp),
            Err("TCP checksum is wrong".to_string())
        );
        // An address change shows through the pseudo-header.
        let mut udp = Packet6::udp((A, 1), (B, 2), b"").emit();
        udp[14 + 39] ^= 1; // the last byte of the destination address
        assert_eq!(
            Packet6::parse(&udp),
            Err("UDP checksum is wrong".to_string())
        );
        let fragment = Packet6 {
            transport: Transport::Other { protocol: 6 },
            payload: vec![0x9c, 0x40, 0, 80, 1, 2, 3, 4],
            ..Packet6::tcp((A, 1), (B, 2), 0, b"")
        }
        .with_ext(vec![ExtHeader::fragment(185, false, 7)]);
        assert_eq!(Packet6::parse(&fragment.emit()), Ok(fragment));
        let mut ns = neighbour_solicitation(A, B);
        assert!(Packet6::parse(&ns).is_ok(), "a valid ICMPv6 checksum");
        let last = ns.len() - 1;
        ns[last] ^= 1;
        assert_eq!(
            Packet6::parse(&ns),
            Err("ICMPv6 checksum is wrong".to_string())
        );
    }
}

/// `packet`'s frame (without extension headers) split into IPv6 fragments
/// with identification `id`, each carrying at most `chunk` bytes of the
/// fragmentable part (rounded down to a multiple of 8), in order.
pub fn fragments6(packet: &Packet6, id: u32, chunk: usize) -> Vec<Vec<u8>> {
    assert!(packet.ext.is_empty(), "a packet without extension headers");
    let frame = packet.emit();
    let header = &frame[14..14 + IPV6_HLEN];
    let payload = &frame[14 + IPV6_HLEN..];
    let chunk = chunk / 8 * 8;
    assert!(chunk > 0, "fragments of at least 8 bytes");
    payload
        .chunks(chunk)
        .enumerate()
        .map(|(i, part)| {
            let offset = i * chunk;
            let more = offset + part.len() < payload.len();
            let mut ip = header.to_vec();
            ip[4..6].copy_from_slice(&((8 + part.len()) as u16).to_be_bytes());
            ip[6] = FRAGMENT;
            let mut fragment = vec![header[6], 0];
            fragment.extend_from_slice(&((offset as u16) | u16::from(more)).to_be_bytes());
            fragment.extend_from_slice(&id.to_be_bytes());
            ethernet_frame(0x86dd, &[&ip, &fragment, part])
        })
        .collect()
}

/// One IPv6 fragment as read back (a fragment header right after the
/// fixed header).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fragment6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub id: u32,
    pub next_header: u8,
    /// Offset in bytes.
    pub offset: usize,
    pub more: bool,
    pub payload: Vec<u8>,
}

impl Fragment6 {
    /// Parses a fragment's frame; the error says what is wrong.
    pub fn parse(frame: &[u8]) -> Result<Fragment6, String> {
        let ip = ip_part(frame, (0x86dd, "IPv6"), IPV6_HLEN + 8)?;
        let payload_len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
        if ip[0] >> 4 != 6 || IPV6_HLEN + payload_len > ip.len() || payload_len < 8 {
            return Err("bad IPv6 header".into());
        }
        if ip[6] != FRAGMENT {
            return Err(format!("next header {} is not a fragment header", ip[6]));
        }
        let octets = |b: &[u8]| -> [u8; 16] { b.try_into().unwrap_or([0; 16]) };
        let hdr = &ip[IPV6_HLEN..IPV6_HLEN + 8];
        let offset_flags = u16::from_be_bytes([hdr[2], hdr[3]]);
        Ok(Fragment6 {
            src: Ipv6Addr::from(octets(&ip[8..24])),
            dst: Ipv6Addr::from(octets(&ip[24..40])),
            id: u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]),
            next_header: hdr[0],
            offset: usize::from(offset_flags & 0xfff8),
            more: offset_flags & 1 != 0,
            payload: ip[IPV6_HLEN + 8..IPV6_HLEN + payload_len].to_vec(),
        })
    }
}

/// [`crate::packet::reassemble`] for IPv6 fragments: agreement on
/// addresses, id and next header, contiguity, and the reassembled L4
/// checksum verified.
pub fn reassemble6(frames: &[Vec<u8>]) -> Result<Packet6, String> {
    let mut parts = frames
        .iter()
        .enumerate()
        .map(|(i, f)| Fragment6::parse(f).map_err(|e| format!("fragment {i}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    parts.sort_by_key(|f| f.offset);
    let first = parts.first().ok_or("no fragments")?.clone();
    let mut payload = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        if (part.src, part.dst, part.id, part.next_header)
            != (first.src, first.dst, first.id, first.next_header)
        {
            return Err(format!(
                "fragment at {} has {}->{} id {} next {}, the first {}->{} id {} next {}",
                part.offset,
                part.src,
                part.dst,
                part.id,
                part.next_header,
                first.src,
                first.dst,
                first.id,
                first.next_header
            ));
        }
        if part.offset != payload.len() {
            return Err(format!("a hole before offset {}", part.offset));
        }
        if part.more != (i + 1 < parts.len()) {
            return Err(format!("fragment at {} has the wrong M flag", part.offset));
        }
        payload.extend_from_slice(&part.payload);
    }
    let mut ip = vec![0u8; IPV6_HLEN];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    ip[6] = first.next_header;
    ip[7] = 64;
    ip[8..24].copy_from_slice(&first.src.octets());
    ip[24..40].copy_from_slice(&first.dst.octets());
    Packet6::parse(&ethernet_frame(0x86dd, &[&ip, &payload]))
        .map_err(|e| format!("reassembled datagram: {e}"))
}
