//! Packets built from arbitrary fields: emit -> parse must give the same
//! packet back, with both checksums verified by the parser.
#![no_main]

use std::net::Ipv4Addr;

use lb_tests::packet::{Packet, Transport};
use libfuzzer_sys::fuzz_target;

/// The largest payload an IPv4 packet with a 20-byte TCP header can carry.
const MAX_PAYLOAD: usize = 65535 - 20 - 20;

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let (head, payload) = data.split_at(16);
    let payload = &payload[..payload.len().min(MAX_PAYLOAD)];
    let src = Ipv4Addr::new(head[0], head[1], head[2], head[3]);
    let dst = Ipv4Addr::new(head[4], head[5], head[6], head[7]);
    let src_port = u16::from_be_bytes([head[8], head[9]]);
    let dst_port = u16::from_be_bytes([head[10], head[11]]);
    let mut packet = match head[12] % 3 {
        0 => {
            let mut p = Packet::tcp((src, src_port), (dst, dst_port), head[13], payload);
            if let Transport::Tcp { seq, .. } = &mut p.transport {
                *seq = u32::from_be_bytes([head[12], head[13], head[14], head[15]]);
            }
            p
        }
        1 => {
            let mut p = Packet::udp((src, src_port), (dst, dst_port), payload);
            p.udp_zero_checksum = head[13] & 1 == 1;
            p
        }
        _ => {
            let mut p = Packet::udp((src, src_port), (dst, dst_port), payload);
            // An opaque protocol; 6, 17 and 132 would be read back as
            // TCP, UDP and SCTP.
            let protocol = match head[13] {
                6 | 17 | 132 => 1,
                other => other,
            };
            p.transport = Transport::Other { protocol };
            p
        }
    };
    packet.ttl = head[14];
    let frame = packet.emit();
    let parsed =
        Packet::parse(&frame).unwrap_or_else(|e| panic!("emitted {packet:?} does not parse: {e}"));
    assert_eq!(parsed, packet, "emit -> parse changed the packet");
});
