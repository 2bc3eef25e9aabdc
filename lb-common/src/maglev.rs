//! `LB4_MAGLEV_V1`: Maglev lookup tables, (service id, table size, chunk) ->
//! 64 backend ids; and [`flow_hash`], the 5-tuple hash both sides use to
//! pick a slot.
//!
//! A Maglev service (flagged [`crate::service::FLAG_MAGLEV`]) picks the backend of a new
//! flow as `table[flow_hash(5-tuple) % M]`, where the agent builds the table
//! of M (prime) slots from the backends' addresses and ports only. Every node
//! builds the same table from the same EndpointSlice and hashes a flow the
//! same way, so a flow that moves to another node (ECMP rehash, node
//! failure) keeps its backend without shared conntrack, and a backend change
//! moves only about 1/N of the flows.
//!
//! # Layout: why chunks of a hash map
//!
//! Tables are large (M = 16381 is the usual default, 65521 for big
//! services), so the layout is chosen for kernel memory and write count:
//!
//! - one hash entry per slot, keyed like `LB4_SLOTS_V1`: simplest, but a
//!   preallocated hash element costs about 72 bytes for 4 bytes of payload
//!   (~1.2 MB per table at M = 16381), and a table switch is 2 x M
//!   syscalls;
//! - one big array indexed by `table * M + slot` (Katran's `ch_rings`):
//!   4 bytes per slot but the capacity is fixed for the maximum number of
//!   tables, M is baked into the index, and table numbers must be allocated;
//! - hash-of-maps, service -> inner array of M ids (Cilium's
//!   `cilium_lb4_maglev`): 4 bytes per slot and an atomic switch by
//!   replacing the inner map, but the inner map's size is fixed by the
//!   object's template, and the agent must create, pin and adopt one inner
//!   map per service;
//! - **chosen**: a hash map whose value holds [`CHUNK_SLOTS`] consecutive
//!   slots. It keeps the slot map's key shape and its adoption code,
//!   M stays a run-time setting, a full table is `M / 64` writes, and the
//!   per-entry overhead is ~25% instead of ~1700% (~80 KB per table at
//!   M = 16381). The hash-of-maps is the upgrade path if tables ever need
//!   to be bigger than that (`_V2`).
//!
//! The map is meant to be created with `BPF_F_NO_PREALLOC`: memory is then
//! spent only on chunks that exist (a capacity for thousands of tables
//! costs nothing until they are written), and a removed or replaced chunk
//! is freed after an RCU grace period, so a program that just looked one up
//! never reads a recycled element (a preallocated hash reuses it at once).
//! Only the agent inserts, so the allocation on update is not on the packet
//! path.
//!
//! # Updating a table
//!
//! Tables are keyed by (service id, M, chunk) and rewritten **in place**
//! (Katran's approach): when a service's backends change, the agent writes
//! the new backends, then only the chunks that hold changed slots
//! (`lb_agent::maglev::{diff, changed_chunks}`), then the service entry,
//! and deletes removed backends last. Each chunk update is atomic (the
//! kernel links a new element in place of the old one); a packet may see
//! some chunks new and others old, which is harmless: every slot names a
//! live backend and established flows follow conntrack. The slot map keeps
//! its revision switch, so random selection and the fallback below always
//! see a consistent set.
//!
//! The table size is part of the key and comes from
//! [`crate::config::LbConfig::maglev_table_size`], so a table built for
//! another M (an agent restarted with a new `--maglev-table-size`) is never
//! read with the wrong modulus: the lookup misses and the datapath falls
//! back to a random slot until the new table is written. A missing chunk, a
//! zero slot or a backend id that no longer resolves falls back the same
//! way, so a half-written table never drops a packet.
//!
//! Capacity is in chunks: `MAX_ENTRIES` must cover, over all Maglev
//! services, `chunk_count(M)` per frontend.

use bytemuck::{Pod, Zeroable};

use crate::{
    assert_layout,
    conntrack::{Lb4CtKey, Lb6CtKey},
    user_pod,
};

/// Pinned name of the IPv4 Maglev table map.
pub const NAME: &str = "LB4_MAGLEV_V1";
/// Default capacity, in chunks (agent `--max-maglev-chunks`): 1024
/// frontends' tables at M = 16381. Mostly a bound, not an allocation, with
/// `BPF_F_NO_PREALLOC`: each existing chunk costs ~320 bytes, and the
/// kernel allocates only the bucket array up front (16 bytes per entry of
/// capacity, 4 MiB here).
pub const MAX_ENTRIES: u32 = 1 << 18;

/// Slots per map entry. A power of two, so the slot within a chunk is a mask
/// the verifier sees as bounded.
pub const CHUNK_SLOTS: u32 = 64;

/// Usual table size (Cilium's default): a prime, ~100 x a large service's
/// backends, which is where Maglev's imbalance drops under ~1%.
pub const DEFAULT_TABLE_SIZE: u32 = 16381;
/// Largest table size the agent accepts (the largest Cilium offers).
pub const MAX_TABLE_SIZE: u32 = 131_071;

/// Number of chunks of a table of `table_size` slots.
pub const fn chunk_count(table_size: u32) -> u32 {
    table_size.div_ceil(CHUNK_SLOTS)
}

/// Key of one chunk of one frontend's table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Lb4MaglevKey {
    /// [`crate::service::Lb4Service::service_id`].
    pub service_id: u32,
    /// M, the table size the table was built for
    /// ([`crate::config::LbConfig::maglev_table_size`]).
    pub table_size: u32,
    /// `slot / CHUNK_SLOTS`, `0..chunk_count(M)`.
    pub chunk: u32,
}
assert_layout!(
    Lb4MaglevKey,
    size = 12,
    service_id = 0,
    table_size = 4,
    chunk = 8
);

/// [`CHUNK_SLOTS`] consecutive slots of a table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Lb4MaglevChunk {
    /// Slot `chunk * CHUNK_SLOTS + i` -> key into [`crate::backend::NAME`].
    /// 0 (never a backend id) past the end of the last, partial chunk.
    pub backend_ids: [u32; CHUNK_SLOTS as usize],
}
assert_layout!(Lb4MaglevChunk, size = 256, backend_ids = 0);

// `Default` is derived only for arrays of up to 32 elements.
impl Default for Lb4MaglevChunk {
    fn default() -> Self {
        Self::zeroed()
    }
}

user_pod!(Lb4MaglevKey, Lb4MaglevChunk);

/// Fixed seed of [`flow_hash`]: the same on every node and every boot, so
/// every node maps a flow to the same slot.
pub const FLOW_HASH_SEED: u32 = 0x6c62_6d67; // "lbmg"

/// Hash of the 13 meaningful bytes of a 5-tuple (the padding is ignored):
/// MurmurHash3 (x86, 32-bit) of the four words below as 16 little-endian
/// bytes, written as straight-line code with no loop and no indexing, so it
/// costs the verifier a few dozen instructions.
/// Addresses enter as big-endian numbers and ports and protocol as numbers,
/// so the value does not depend on the host's byte order.
#[inline(always)]
pub fn flow_hash(key: &Lb4CtKey) -> u32 {
    let words = [
        u32::from_be_bytes(key.src_addr),
        u32::from_be_bytes(key.dst_addr),
        (key.src_port as u32) << 16 | key.dst_port as u32,
        key.proto as u32,
    ];
    let mut h = FLOW_HASH_SEED;
    h = murmur_round(h, words[0]);
    h = murmur_round(h, words[1]);
    h = murmur_round(h, words[2]);
    h = murmur_round(h, words[3]);
    fmix32(h ^ 16)
}

/// [`flow_hash`] of an IPv6 5-tuple: the same rounds over its ten words
/// (each address as four big-endian words), the length 40 in the finalizer.
#[inline(always)]
pub fn flow_hash6(key: &Lb6CtKey) -> u32 {
    let word = |a: &[u8; 16], i: usize| u32::from_be_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    let src = [0, 4, 8, 12].map(|i| word(&key.src_addr, i));
    let dst = [0, 4, 8, 12].map(|i| word(&key.dst_addr, i));
    flow_hash6_words(&src, &dst, key)
}

/// [`flow_hash6`] with the addresses already read as big-endian words (the
/// kernel side loads them four bytes at a time: byte by byte, the loads
/// spill past the verifier's stack budget).
#[inline(always)]
pub fn flow_hash6_words(src: &[u32; 4], dst: &[u32; 4], key: &Lb6CtKey) -> u32 {
    let mut h = FLOW_HASH_SEED;
    h = murmur_round(h, src[0]);
    h = murmur_round(h, src[1]);
    h = murmur_round(h, src[2]);
    h = murmur_round(h, src[3]);
    h = murmur_round(h, dst[0]);
    h = murmur_round(h, dst[1]);
    h = murmur_round(h, dst[2]);
    h = murmur_round(h, dst[3]);
    h = murmur_round(h, (key.src_port as u32) << 16 | key.dst_port as u32);
    h = murmur_round(h, key.proto as u32);
    fmix32(h ^ 40)
}

#[inline(always)]
fn murmur_round(h: u32, word: u32) -> u32 {
    let k = word
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// MurmurHash3's finalizer: every input bit affects every output bit.
#[inline(always)]
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    fn key(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8) -> Lb4CtKey {
        Lb4CtKey {
            src_addr: src,
            dst_addr: dst,
            src_port: sport,
            dst_port: dport,
            proto,
            _pad: [0; 3],
        }
    }

    /// Pinned values, cross-checked against a reference MurmurHash3
    /// x86_32 (seed `FLOW_HASH_SEED`) of the four words as 16 little-endian
    /// bytes. A change here changes the backend of flows on nodes
    /// running different agent versions side by side (a rolling upgrade).
    /// Changing the hash is a datapath layout change (bump the map version).
    #[test]
    fn flow_hash_known_values() {
        let cases = [
            (key([0; 4], [0; 4], 0, 0, 0), 0xe9e1_0714_u32),
            (
                key([10, 244, 1, 5], [10, 96, 0, 10], 40000, 80, 6),
                0xe899_0bbd,
            ),
            (
                key([10, 244, 1, 5], [10, 96, 0, 10], 40001, 80, 6),
                0xb1d7_5d00,
            ),
            (
                key([10, 244, 1, 5], [10, 96, 0, 10], 40000, 80, 17),
                0x1101_8bc3,
            ),
            (
                key([198, 51, 100, 100], [198, 51, 100, 11], 55555, 30080, 6),
                0xb008_ff6d,
            ),
        ];
        for (key, expected) in cases {
            assert_eq!(flow_hash(&key), expected, "flow_hash({key:?}) changed");
        }
    }

    const PINNED6: u32 = 0xf02f_ad94;

    /// Pinned like [`flow_hash_known_values`]; every field matters.
    #[test]
    fn flow_hash6_known_values_and_every_field_matters() {
        let base = Lb6CtKey {
            src_addr: [0xfd, 0, 2, 0x44, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            dst_addr: [0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10],
            src_port: 40000,
            dst_port: 80,
            proto: 6,
            _pad: [0; 3],
        };
        assert_eq!(flow_hash6(&base), PINNED6, "flow_hash6 changed");
        let mut changed = [base; 5];
        changed[0].src_addr[15] ^= 1;
        changed[1].dst_addr[0] ^= 1;
        changed[2].src_port += 1;
        changed[3].dst_port += 1;
        changed[4].proto = 17;
        for key in changed {
            assert_ne!(flow_hash6(&key), flow_hash6(&base), "{key:?}");
        }
        let padded = Lb6CtKey {
            _pad: [1, 2, 3],
            ..base
        };
        assert_eq!(flow_hash6(&padded), flow_hash6(&base));
    }

    #[test]
    fn flow_hash_ignores_padding() {
        let a = key([10, 0, 0, 1], [10, 96, 0, 1], 1234, 443, 6);
        let b = Lb4CtKey {
            _pad: [1, 2, 3],
            ..a
        };
        assert_eq!(flow_hash(&a), flow_hash(&b));
    }

    #[test]
    fn flow_hash_every_field_matters() {
        let base = key([10, 0, 0, 1], [10, 96, 0, 1], 1234, 443, 6);
        let variants = [
            Lb4CtKey {
                src_addr: [10, 0, 0, 2],
                ..base
            },
            Lb4CtKey {
                dst_addr: [10, 96, 0, 2],
                ..base
            },
            Lb4CtKey {
                src_port: 1235,
                ..base
            },
            Lb4CtKey {
                dst_port: 444,
                ..base
            },
            Lb4CtKey { proto: 17, ..base },
            // Swapped ports must not collide (the ports share one word).
            Lb4CtKey {
                src_port: 443,
                dst_port: 1234,
                ..base
            },
        ];
        for variant in variants {
            assert_ne!(flow_hash(&base), flow_hash(&variant), "{variant:?}");
        }
    }

    /// Bucket counts pass a chi-square test against the uniform
    /// distribution: the statistic stays within 5 standard deviations of
    /// its expectation (buckets - 1). Deterministic input, so this is a
    /// check of the hash, not a flaky random test.
    fn assert_spread(hashes: impl Iterator<Item = u32>, buckets: u32, what: &str) {
        let mut counts = std::vec![0u32; buckets as usize];
        let mut total = 0u32;
        for h in hashes {
            counts[(h % buckets) as usize] += 1;
            total += 1;
        }
        let mean = total as f64 / buckets as f64;
        let chi2: f64 = counts
            .iter()
            .map(|&c| (c as f64 - mean).powi(2) / mean)
            .sum();
        let dof = (buckets - 1) as f64;
        let bound = dof + 5.0 * (2.0 * dof).sqrt();
        let (min, max) = counts
            .iter()
            .fold((u32::MAX, 0), |(lo, hi), &c| (lo.min(c), hi.max(c)));
        std::println!(
            "{what}: {buckets} buckets, mean {mean:.1}, min {min}, max {max}, chi2 {chi2:.0} (dof {dof}, bound {bound:.0})"
        );
        assert!(
            chi2 <= bound,
            "{what}: {buckets} buckets: chi2 {chi2:.0} > {bound:.0}"
        );
    }

    /// One client, every source port, to one frontend: the common case of a
    /// busy client, where only 16 bits vary.
    #[test]
    fn flow_hash_spreads_source_ports() {
        let hashes = (0..=u16::MAX)
            .map(|port| flow_hash(&key([10, 244, 1, 5], [10, 96, 0, 10], port, 80, 6)));
        for buckets in [64, 101, 1021, DEFAULT_TABLE_SIZE] {
            assert_spread(hashes.clone(), buckets, "source ports");
        }
    }

    /// Many clients of one /16, one source port each.
    #[test]
    fn flow_hash_spreads_clients() {
        let hashes = (0..=u16::MAX).map(|i| {
            let [hi, lo] = i.to_be_bytes();
            flow_hash(&key([10, 244, hi, lo], [203, 0, 113, 7], 33000, 443, 6))
        });
        for buckets in [64, 101, 1021, DEFAULT_TABLE_SIZE] {
            assert_spread(hashes.clone(), buckets, "client addresses");
        }
    }

    #[test]
    fn chunk_counts() {
        assert_eq!(chunk_count(0), 0);
        assert_eq!(chunk_count(1), 1);
        assert_eq!(chunk_count(64), 1);
        assert_eq!(chunk_count(65), 2);
        assert_eq!(chunk_count(DEFAULT_TABLE_SIZE), 256);
        assert_eq!(chunk_count(65521), 1024);
    }
}
