//! Arbitrary bytes as an Ethernet frame: the test suite's packet parser must
//! answer with a packet or an error, never panic; whatever it accepts must
//! survive emit -> parse unchanged.
#![no_main]

use lb_tests::packet::{Packet, Transport};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(packet) = Packet::parse(data) else {
        return;
    };
    // Emit writes a canonical header (no IP options, 20-byte TCP header), so
    // only what parse reports must match, not the bytes. A TCP header with
    // options is re-emitted without them: its payload is what followed them.
    let again = Packet::parse(&packet.emit());
    let again = again.unwrap_or_else(|e| panic!("re-emitted {packet:?} does not parse: {e}"));
    match (&packet.transport, &again.transport) {
        (Transport::Other { .. }, _) | (_, Transport::Other { .. }) => {}
        _ => assert_eq!(packet, again, "emit -> parse changed the packet"),
    }
});
