//! Ethernet + IPv4 + TCP/UDP/SCTP packets: [`Packet::emit`] builds the
//! bytes with correct checksums, [`Packet::parse`] reads them back and
//! verifies both the IPv4 header checksum and the L4 checksum (over the
//! pseudo-header; SCTP's CRC32c over the SCTP packet alone).

use std::net::Ipv4Addr;

const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const SCTP_HLEN: usize = 12;
/// SCTP chunk types (RFC 9260 section 3.2).
pub const SCTP_INIT: u8 = 1;
pub const SCTP_INIT_ACK: u8 = 2;
pub const SCTP_DATA: u8 = 0;

/// TCP flag bits.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// The transport part of a packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp {
        src_port: u16,
        dst_port: u16,
        flags: u8,
        seq: u32,
    },
    Udp {
        src_port: u16,
        dst_port: u16,
    },
    /// SCTP's common header; the payload holds its chunks.
    Sctp {
        src_port: u16,
        dst_port: u16,
        verification_tag: u32,
    },
    /// Another IP protocol, carried as opaque payload.
    Other {
        protocol: u8,
    },
}

/// A parsed or to-be-built packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub transport: Transport,
    pub payload: Vec<u8>,
    /// For UDP: send a zero checksum ("none"), as some senders do.
    pub udp_zero_checksum: bool,
}

impl Packet {
    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8, payload: &[u8]) -> Self {
        Self {
            src: src.0,
            dst: dst.0,
            ttl: 64,
            transport: Transport::Tcp {
                src_port: src.1,
                dst_port: dst.1,
                flags,
                seq: 0x1234_5678,
            },
            payload: payload.to_vec(),
            udp_zero_checksum: false,
        }
    }

    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Self {
        Self {
            src: src.0,
            dst: dst.0,
            ttl: 64,
            transport: Transport::Udp {
                src_port: src.1,
                dst_port: dst.1,
            },
            payload: payload.to_vec(),
            udp_zero_checksum: false,
        }
    }

    /// An SCTP packet of `chunks` (see [`sctp_init`]); the verification
    /// tag is 0, as an INIT's is.
    pub fn sctp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), chunks: &[u8]) -> Self {
        Self {
            src: src.0,
            dst: dst.0,
            ttl: 64,
            transport: Transport::Sctp {
                src_port: src.1,
                dst_port: dst.1,
                verification_tag: 0,
            },
            payload: chunks.to_vec(),
            udp_zero_checksum: false,
        }
    }

    /// (source port, destination port) for TCP, UDP and SCTP.
    pub fn ports(&self) -> Option<(u16, u16)> {
        self.transport.ports()
    }

    fn protocol(&self) -> u8 {
        self.transport.protocol()
    }

    /// The frame as it would be on the wire.
    pub fn emit(&self) -> Vec<u8> {
        let mut l4 = l4_bytes(&self.transport, &self.payload);
        let pseudo = pseudo_sum(self.src, self.dst, self.protocol(), l4.len());
        set_l4_checksum(&self.transport, &mut l4, pseudo, self.udp_zero_checksum);

        let mut ip = vec![0u8; IPV4_HLEN];
        ip[0] = 0x45;
        let total = (IPV4_HLEN + l4.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
        ip[6] = 0x40; // don't fragment
        ip[8] = self.ttl;
        ip[9] = self.protocol();
        ip[12..16].copy_from_slice(&self.src.octets());
        ip[16..20].copy_from_slice(&self.dst.octets());
        let sum = fold(sum_words(&ip));
        ip[10..12].copy_from_slice(&(!sum).to_be_bytes());

        ethernet_frame(0x0800, &[&ip, &l4])
    }

    /// Parses a frame, verifying both checksums; the error says which is wrong.
    pub fn parse(frame: &[u8]) -> Result<Packet, String> {
        let ip = ip_part(frame, (0x0800, "IPv4"), IPV4_HLEN)?;
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        if ip[0] >> 4 != 4 || ihl < IPV4_HLEN || total > ip.len() || total < ihl {
            return Err("bad IPv4 header".into());
        }
        if fold(sum_words(&ip[..ihl])) != 0xffff {
            return Err("IPv4 header checksum is wrong".into());
        }
        let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        let protocol = ip[9];
        let l4 = &ip[ihl..total];
        let pseudo = pseudo_sum(src, dst, protocol, l4.len());
        let (transport, payload, udp_zero_checksum) = parse_l4(protocol, l4, pseudo)?;
        Ok(Packet {
            src,
            dst,
            ttl: ip[8],
            transport,
            payload,
            udp_zero_checksum,
        })
    }
}

/// An ARP request frame: something that is not IPv4 at all.
pub fn arp_request() -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    frame.extend_from_slice(&0x0806u16.to_be_bytes());
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&[0u8; 20]);
    frame
}

/// An Ethernet frame (fixed test MAC addresses) of `ether_type` carrying
/// `parts` one after the other.
pub(crate) fn ethernet_frame(ether_type: u16, parts: &[&[u8]]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ETH_HLEN + parts.iter().map(|p| p.len()).sum::<usize>());
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // dst MAC
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // src MAC
    frame.extend_from_slice(&ether_type.to_be_bytes());
    for part in parts {
        frame.extend_from_slice(part);
    }
    frame
}

/// What follows the Ethernet header of a frame of `ether_type` (named
/// `family`) holding at least `min_len` bytes of it; `Err` says what is
/// wrong.
pub(crate) fn ip_part<'a>(
    frame: &'a [u8],
    (ether_type, family): (u16, &str),
    min_len: usize,
) -> Result<&'a [u8], String> {
    if frame.len() < ETH_HLEN + min_len {
        return Err(format!("frame of {} bytes is too short", frame.len()));
    }
    if frame[12..14] != ether_type.to_be_bytes() {
        return Err(format!("not {family}"));
    }
    Ok(&frame[ETH_HLEN..])
}

impl Transport {
    /// The IP protocol number (IPv4) or last next-header (IPv6).
    pub fn protocol(&self) -> u8 {
        match self {
            Transport::Tcp { .. } => 6,
            Transport::Udp { .. } => 17,
            Transport::Sctp { .. } => 132,
            Transport::Other { protocol } => *protocol,
        }
    }

    /// (source port, destination port) for TCP, UDP and SCTP.
    pub fn ports(&self) -> Option<(u16, u16)> {
        match *self {
            Transport::Tcp {
                src_port, dst_port, ..
            }
            | Transport::Udp { src_port, dst_port }
            | Transport::Sctp {
                src_port, dst_port, ..
            } => Some((src_port, dst_port)),
            Transport::Other { .. } => None,
        }
    }
}

/// An SCTP INIT chunk (RFC 9260 section 3.3.2) as a kernel sends it: its
/// initiate tag, a 64 KiB window, 10 streams each way, and a supported
/// address types parameter (IPv4 and IPv6).
pub fn sctp_init(initiate_tag: u32) -> Vec<u8> {
    let mut chunk = vec![SCTP_INIT, 0];
    chunk.extend_from_slice(&28u16.to_be_bytes());
    chunk.extend_from_slice(&initiate_tag.to_be_bytes());
    chunk.extend_from_slice(&65536u32.to_be_bytes());
    chunk.extend_from_slice(&10u16.to_be_bytes());
    chunk.extend_from_slice(&10u16.to_be_bytes());
    chunk.extend_from_slice(&0x0102_0304u32.to_be_bytes());
    // Supported Address Types: IPv4 (5), IPv6 (6).
    chunk.extend_from_slice(&[0, 12, 0, 8, 0, 5, 0, 6]);
    chunk
}

/// An SCTP DATA chunk carrying `data` (padded to 4 bytes).
pub fn sctp_data(tsn: u32, data: &[u8]) -> Vec<u8> {
    let mut chunk = vec![SCTP_DATA, 0x03];
    chunk.extend_from_slice(&((16 + data.len()) as u16).to_be_bytes());
    chunk.extend_from_slice(&tsn.to_be_bytes());
    chunk.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
    chunk.extend_from_slice(data);
    chunk.resize(chunk.len().next_multiple_of(4), 0);
    chunk
}

/// CRC32c (Castagnoli, reflected polynomial 0x82f63b78) bit by bit: the
/// reference the datapath's update is checked against, sharing none of
/// its method.
pub fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// SCTP's checksum of a packet: the CRC32c with the checksum field zero,
/// stored little-endian (RFC 9260 appendix A, as Linux stores it).
fn sctp_checksum(l4: &[u8]) -> [u8; 4] {
    let mut zeroed = l4.to_vec();
    zeroed[8..12].copy_from_slice(&[0; 4]);
    crc32c(&zeroed).to_le_bytes()
}

/// The TCP or UDP header (checksum zero) and the payload.
pub(crate) fn l4_bytes(transport: &Transport, payload: &[u8]) -> Vec<u8> {
    let mut l4 = match *transport {
        Transport::Tcp {
            src_port,
            dst_port,
            flags,
            seq,
        } => {
            let mut h = vec![0u8; TCP_HLEN];
            h[0..2].copy_from_slice(&src_port.to_be_bytes());
            h[2..4].copy_from_slice(&dst_port.to_be_bytes());
            h[4..8].copy_from_slice(&seq.to_be_bytes());
            h[12] = ((TCP_HLEN / 4) as u8) << 4;
            h[13] = flags;
            h[14..16].copy_from_slice(&65535u16.to_be_bytes());
            h
        }
        Transport::Udp { src_port, dst_port } => {
            let mut h = vec![0u8; UDP_HLEN];
            h[0..2].copy_from_slice(&src_port.to_be_bytes());
            h[2..4].copy_from_slice(&dst_port.to_be_bytes());
            let len = (UDP_HLEN + payload.len()) as u16;
            h[4..6].copy_from_slice(&len.to_be_bytes());
            h
        }
        Transport::Sctp {
            src_port,
            dst_port,
            verification_tag,
        } => {
            let mut h = vec![0u8; SCTP_HLEN];
            h[0..2].copy_from_slice(&src_port.to_be_bytes());
            h[2..4].copy_from_slice(&dst_port.to_be_bytes());
            h[4..8].copy_from_slice(&verification_tag.to_be_bytes());
            h
        }
        Transport::Other { .. } => Vec::new(),
    };
    l4.extend_from_slice(payload);
    l4
}

/// Fills in the TCP or UDP checksum of `l4`, whose pseudo-header sums to
/// `pseudo`.
pub(crate) fn set_l4_checksum(transport: &Transport, l4: &mut [u8], pseudo: u32, udp_zero: bool) {
    match transport {
        Transport::Tcp { .. } => {
            let sum = !fold(sum_words(l4) + pseudo);
            l4[16..18].copy_from_slice(&sum.to_be_bytes());
        }
        Transport::Udp { .. } if !udp_zero => {
            let mut sum = !fold(sum_words(l4) + pseudo);
            if sum == 0 {
                sum = 0xffff;
            }
            l4[6..8].copy_from_slice(&sum.to_be_bytes());
        }
        Transport::Sctp { .. } => {
            let sum = sctp_checksum(l4);
            l4[8..12].copy_from_slice(&sum);
        }
        _ => {}
    }
}

/// Reads a TCP or UDP header, verifying its checksum against the
/// pseudo-header sum `pseudo`: (transport, payload, UDP sent without
/// checksum).
pub(crate) fn parse_l4(
    protocol: u8,
    l4: &[u8],
    pseudo: u32,
) -> Result<(Transport, Vec<u8>, bool), String> {
    Ok(match protocol {
        6 => {
            if l4.len() < TCP_HLEN {
                return Err("TCP header truncated".into());
            }
            if fold(sum_words(l4) + pseudo) != 0xffff {
                return Err("TCP checksum is wrong".into());
            }
            let off = ((l4[12] >> 4) as usize) * 4;
            (
                Transport::Tcp {
                    src_port: u16::from_be_bytes([l4[0], l4[1]]),
                    dst_port: u16::from_be_bytes([l4[2], l4[3]]),
                    flags: l4[13],
                    seq: u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
                },
                l4[off.min(l4.len())..].to_vec(),
                false,
            )
        }
        17 => {
            if l4.len() < UDP_HLEN {
                return Err("UDP header truncated".into());
            }
            let zero = l4[6..8] == [0, 0];
            if !zero && fold(sum_words(l4) + pseudo) != 0xffff {
                return Err("UDP checksum is wrong".into());
            }
            (
                Transport::Udp {
                    src_port: u16::from_be_bytes([l4[0], l4[1]]),
                    dst_port: u16::from_be_bytes([l4[2], l4[3]]),
                },
                l4[UDP_HLEN..].to_vec(),
                zero,
            )
        }
        132 => {
            if l4.len() < SCTP_HLEN {
                return Err("SCTP header truncated".into());
            }
            if sctp_checksum(l4) != l4[8..12] {
                return Err("SCTP checksum (CRC32c) is wrong".into());
            }
            (
                Transport::Sctp {
                    src_port: u16::from_be_bytes([l4[0], l4[1]]),
                    dst_port: u16::from_be_bytes([l4[2], l4[3]]),
                    verification_tag: u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
                },
                l4[SCTP_HLEN..].to_vec(),
                false,
            )
        }
        other => (Transport::Other { protocol: other }, l4.to_vec(), false),
    })
}

pub(crate) fn sum_words(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, len: usize) -> u32 {
    sum_words(&src.octets()) + sum_words(&dst.octets()) + protocol as u32 + len as u32
}

pub(crate) fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
    const B: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

    #[test]
    fn round_trips_tcp_and_udp() {
        for p in [
            Packet::tcp((A, 40000), (B, 80), SYN, b""),
            Packet::tcp((A, 40000), (B, 80), ACK | PSH, b"GET / HTTP/1.0\r\n\r\n"),
            Packet::udp((A, 40001), (B, 53), b"odd"),
        ] {
            assert_eq!(Packet::parse(&p.emit()).expect("parse"), p);
        }
    }

    #[test]
    fn detects_a_wrong_checksum() {
        let mut tcp = Packet::tcp((A, 40000), (B, 80), SYN, b"x").emit();
        let last = tcp.len() - 1;
        tcp[last] ^= 1;
        assert_eq!(
            Packet::parse(&tcp),
            Err("TCP checksum is wrong".to_string())
        );
        let mut ip = Packet::udp((A, 1), (B, 2), b"").emit();
        ip[ETH_HLEN + 8] ^= 1; // TTL
        assert_eq!(
            Packet::parse(&ip),
            Err("IPv4 header checksum is wrong".to_string())
        );
    }

    #[test]
    fn crc32c_matches_the_published_check_values() {
        // The CRC catalogue's check value, and RFC 3720 appendix B.4's
        // 32 zero bytes.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn round_trips_sctp_and_detects_a_wrong_crc() {
        let p = Packet::sctp((A, 40000), (B, 3868), &sctp_init(0xdead_beef));
        assert_eq!(Packet::parse(&p.emit()).expect("parse"), p);
        let mut frame = p.emit();
        // A port changed without its CRC: what a sum-style update leaves.
        frame[ETH_HLEN + IPV4_HLEN + 3] ^= 1;
        assert_eq!(
            Packet::parse(&frame),
            Err("SCTP checksum (CRC32c) is wrong".to_string())
        );
    }

    #[test]
    fn known_checksum_vector() {
        // IPv4 header from RFC 1071-style worked examples: checksum 0xb861.
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(!fold(sum_words(&header)), 0xb861);
    }
}

/// An ICMP error (`kind`, `code`, the 4 bytes after the checksum) from
/// `src` to `dst` quoting the first `quote` bytes of `inner`'s IP packet
/// (`usize::MAX`: all of it), with a correct ICMP checksum.
pub fn icmp_error(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    kind: u8,
    code: u8,
    rest: [u8; 4],
    inner: &Packet,
    quote: usize,
) -> Packet {
    let frame = inner.emit();
    let ip = &frame[ETH_HLEN..];
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(&ip[..quote.min(ip.len())]);
    let sum = !fold(sum_words(&icmp));
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    Packet {
        src,
        dst,
        ttl: 64,
        transport: Transport::Other { protocol: 1 },
        payload: icmp,
        udp_zero_checksum: false,
    }
}

/// What an ICMP error carries, its checksum verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcmpError {
    pub kind: u8,
    pub code: u8,
    pub rest: [u8; 4],
    /// The quoted IP packet (or its first bytes).
    pub quoted: Vec<u8>,
}

impl IcmpError {
    /// Reads an ICMP error out of a parsed packet; the error says what is
    /// wrong (not ICMP, bad checksum).
    pub fn of(packet: &Packet) -> Result<IcmpError, String> {
        if packet.transport != (Transport::Other { protocol: 1 }) {
            return Err(format!("not ICMP: {:?}", packet.transport));
        }
        let icmp = &packet.payload;
        if icmp.len() < 8 {
            return Err("ICMP header truncated".into());
        }
        if fold(sum_words(icmp)) != 0xffff {
            return Err("ICMP checksum is wrong".into());
        }
        Ok(IcmpError {
            kind: icmp[0],
            code: icmp[1],
            rest: [icmp[4], icmp[5], icmp[6], icmp[7]],
            quoted: icmp[8..].to_vec(),
        })
    }

    /// The quoted header's (source, destination, protocol, source port,
    /// destination port), its IPv4 checksum verified.
    pub fn quoted_tuple(&self) -> Result<(Ipv4Addr, Ipv4Addr, u8, u16, u16), String> {
        let ip = &self.quoted;
        if ip.len() < IPV4_HLEN + 4 {
            return Err("quote too short".into());
        }
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        if ip.len() < ihl + 4 {
            return Err("quote too short for the ports".into());
        }
        if fold(sum_words(&ip[..ihl])) != 0xffff {
            return Err("quoted IPv4 header checksum is wrong".into());
        }
        Ok((
            Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
            Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
            ip[9],
            u16::from_be_bytes([ip[ihl], ip[ihl + 1]]),
            u16::from_be_bytes([ip[ihl + 2], ip[ihl + 3]]),
        ))
    }

    /// The whole quoted packet parsed, every checksum verified (for quotes
    /// of a complete packet).
    pub fn quoted_packet(&self) -> Result<Packet, String> {
        let mut frame = vec![0u8; ETH_HLEN];
        frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        frame.extend_from_slice(&self.quoted);
        Packet::parse(&frame)
    }
}

/// `packet`'s frame split into IPv4 fragments with identification `id`,
/// each carrying at most `chunk` bytes of the IP payload (rounded down to
/// a multiple of 8, as offsets count 8-byte units), in order; DF cleared,
/// every header checksum correct.
pub fn fragments(packet: &Packet, id: u16, chunk: usize) -> Vec<Vec<u8>> {
    let frame = packet.emit();
    let header = &frame[ETH_HLEN..ETH_HLEN + IPV4_HLEN];
    let payload = &frame[ETH_HLEN + IPV4_HLEN..];
    let chunk = chunk / 8 * 8;
    assert!(chunk > 0, "fragments of at least 8 bytes");
    payload
        .chunks(chunk)
        .enumerate()
        .map(|(i, part)| {
            let offset = i * chunk;
            let more = offset + part.len() < payload.len();
            let mut ip = header.to_vec();
            ip[2..4].copy_from_slice(&((IPV4_HLEN + part.len()) as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&id.to_be_bytes());
            let flags_offset = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
            ip[6..8].copy_from_slice(&flags_offset.to_be_bytes());
            ip[10..12].copy_from_slice(&[0, 0]);
            let sum = !fold(sum_words(&ip));
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            ethernet_frame(0x0800, &[&ip, part])
        })
        .collect()
}

/// One IPv4 fragment as read back: header checksum verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fragment {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub id: u16,
    pub protocol: u8,
    /// Offset in bytes.
    pub offset: usize,
    pub more: bool,
    pub payload: Vec<u8>,
}

impl Fragment {
    /// Parses a fragment's frame; the error says what is wrong.
    pub fn parse(frame: &[u8]) -> Result<Fragment, String> {
        let ip = ip_part(frame, (0x0800, "IPv4"), IPV4_HLEN)?;
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        if ip[0] >> 4 != 4 || ihl < IPV4_HLEN || total > ip.len() || total < ihl {
            return Err("bad IPv4 header".into());
        }
        if fold(sum_words(&ip[..ihl])) != 0xffff {
            return Err("IPv4 header checksum is wrong".into());
        }
        let flags_offset = u16::from_be_bytes([ip[6], ip[7]]);
        Ok(Fragment {
            src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
            dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
            id: u16::from_be_bytes([ip[4], ip[5]]),
            protocol: ip[9],
            offset: usize::from(flags_offset & 0x1fff) * 8,
            more: flags_offset & 0x2000 != 0,
            payload: ip[ihl..total].to_vec(),
        })
    }
}

/// Reassembles the frames of one datagram's fragments (any order): every
/// header checksum, the fragments' agreement on addresses, id and
/// protocol, their contiguity, and the reassembled L4 checksum are
/// verified; the error says which is wrong.
pub fn reassemble(frames: &[Vec<u8>]) -> Result<Packet, String> {
    let mut parts = frames
        .iter()
        .enumerate()
        .map(|(i, f)| Fragment::parse(f).map_err(|e| format!("fragment {i}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    parts.sort_by_key(|f| f.offset);
    let first = parts.first().ok_or("no fragments")?.clone();
    let mut payload = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        if (part.src, part.dst, part.id, part.protocol)
            != (first.src, first.dst, first.id, first.protocol)
        {
            return Err(format!(
                "fragment at {} has {}->{} id {} proto {}, the first {}->{} id {} proto {}",
                part.offset,
                part.src,
                part.dst,
                part.id,
                part.protocol,
                first.src,
                first.dst,
                first.id,
                first.protocol
            ));
        }
        if part.offset != payload.len() {
            return Err(format!("a hole before offset {}", part.offset));
        }
        if part.more != (i + 1 < parts.len()) {
            return Err(format!("fragment at {} has the wrong MF flag", part.offset));
        }
        payload.extend_from_slice(&part.payload);
    }
    let mut ip = vec![0u8; IPV4_HLEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((IPV4_HLEN + payload.len()) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = first.protocol;
    ip[12..16].copy_from_slice(&first.src.octets());
    ip[16..20].copy_from_slice(&first.dst.octets());
    let sum = !fold(sum_words(&ip));
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    Packet::parse(&ethernet_frame(0x0800, &[&ip, &payload]))
        .map_err(|e| format!("reassembled datagram: {e}"))
}
