//! SCTP's checksum under port translation. SCTP carries a CRC32c of the
//! whole SCTP packet (RFC 9260 appendix A), not a ones'-complement sum, and
//! no pseudo-header: an address rewrite leaves it valid, a port rewrite
//! does not.
//!
//! The CRC is updated, not recomputed. For messages of one length a CRC is
//! affine in the message, so `crc(m ^ d) = crc(m) ^ crc0(d)`, where `crc0`
//! has no initial value and no final xor; `d` is the port change followed
//! by zeros, and `crc0` of that is the change, as a polynomial, times
//! `x^(8 * len)` modulo the CRC polynomial. Two carry-less products do it,
//! whatever the packet's length, with no read past the SCTP common header
//! (paged skbs included). A packet whose CRC was wrong
//! stays wrong, as an incremental TCP or UDP checksum update keeps it.

/// The CRC32c polynomial, bit-reflected (the CRC is computed LSB first).
const POLY: u32 = 0x82f6_3b78;
/// `x^0` in the reflected representation.
const ONE: u32 = 0x8000_0000;

/// `a * b` modulo the CRC32c polynomial, both reflected; branch-free so
/// the verifier walks one path.
#[inline(always)]
const fn mul_mod(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    let mut i = 0;
    while i < 32 {
        // The coefficient of x^i in `a` is its bit 31 - i.
        product ^= b & 0u32.wrapping_sub((a >> (31 - i)) & 1);
        // b *= x
        b = (b >> 1) ^ (POLY & 0u32.wrapping_sub(b & 1));
        i += 1;
    }
    product
}

/// `x^(8 * i * step)` for `i` in 0..256, reflected, where `x_8step` is
/// `x^(8 * step)`.
const fn powers(x_8step: u32) -> [u32; 256] {
    let mut table = [0; 256];
    table[0] = ONE;
    let mut i = 1;
    while i < 256 {
        table[i] = mul_mod(table[i - 1], x_8step);
        i += 1;
    }
    table
}

/// `x^(8 * n)` for the low byte of a length `n`.
static X8N_LOW: [u32; 256] = powers(ONE >> 8);
/// `x^(8 * 256 * n)` for the high byte of a length `n`.
static X8N_HIGH: [u32; 256] = powers(mul_mod(powers(ONE >> 8)[255], ONE >> 8));

/// What to xor into the CRC32c field (read as a little-endian `u32`, as
/// the field is stored) when the four port bytes at the start of an SCTP
/// packet of `len` bytes change from `old` to `new`. Not inlined: one copy
/// of the two products serves every rewrite of a program.
#[inline(never)]
pub fn crc_delta(old: u32, new: u32, len: u32) -> u32 {
    // The first byte of a message is the low byte of the reflected CRC.
    let change = old ^ new;
    // Masks: the verifier needs the table indexes bounded.
    let low = X8N_LOW[(len & 0xff) as usize];
    let high = X8N_HIGH[((len >> 8) & 0xff) as usize];
    mul_mod(mul_mod(change, low), high)
}

/// The four port bytes of a packet (source, destination, network order)
/// as [`crc_delta`] takes them.
#[inline(always)]
pub fn ports_word(src: u16, dst: u16) -> u32 {
    let [s0, s1] = src.to_be_bytes();
    let [d0, d1] = dst.to_be_bytes();
    u32::from_le_bytes([s0, s1, d0, d1])
}

/// Offset of the CRC32c inside the SCTP common header.
pub const SCTP_CSUM_OFF: usize = 8;
/// Length of the SCTP common header (ports, verification tag, CRC).
pub const SCTP_HLEN: usize = 12;
