//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016, section 3.4): pure code that
//! builds a service's lookup table and says which slots changed.
//!
//! Every backend gets a permutation of the M slots from two hashes of its
//! address and port (`offset`, `skip`); backends take turns claiming their
//! next free preferred slot until the table is full. The result depends only
//! on the set of (address, port) pairs and M, never on the order the
//! EndpointSlice listed them or on ids this agent assigned, so every node
//! builds the same table and a flow keeps its backend whichever node it
//! reaches. Removing one of N backends moves its own slots and only a small
//! fraction of the others'.
//!
//! ```text
//! let table = build_table(&identities, m)?;             // indices into `identities`
//! let ids: Vec<u32> = table.iter().map(|&i| backend_ids[i as usize]).collect();
//! let changes = diff(&programmed_ids, &ids);            // only what moved
//! for chunk in changed_chunks(&changes) { write chunk_value(&ids, chunk) }
//! ```

use std::{collections::BTreeSet, net::IpAddr};

use lb_common::maglev::{CHUNK_SLOTS, Lb4MaglevChunk, MAX_TABLE_SIZE, chunk_count};

/// What makes a backend the same backend on every node: its address and
/// port (a service's backends share its protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendIdentity {
    pub addr: IpAddr,
    pub port: u16,
}

impl From<(IpAddr, u16)> for BackendIdentity {
    fn from((addr, port): (IpAddr, u16)) -> Self {
        Self { addr, port }
    }
}

impl BackendIdentity {
    /// The bytes the permutation is derived from: a family tag (so that
    /// 10.0.0.1 and ::ffff:10.0.0.1 differ), the address in network order,
    /// the port big-endian.
    fn hash_input(&self) -> ([u8; 19], usize) {
        let mut bytes = [0u8; 19];
        let len = match self.addr {
            IpAddr::V4(addr) => {
                bytes[0] = 4;
                bytes[1..5].copy_from_slice(&addr.octets());
                5
            }
            IpAddr::V6(addr) => {
                bytes[0] = 6;
                bytes[1..17].copy_from_slice(&addr.octets());
                17
            }
        };
        bytes[len..len + 2].copy_from_slice(&self.port.to_be_bytes());
        (bytes, len + 2)
    }

    /// (offset, skip) of this backend's permutation of `m` slots: slot
    /// `j` of its preference list is `(offset + j * skip) % m`. `skip` is in
    /// `1..m`, coprime with a prime `m`, so the list visits every slot.
    fn permutation(&self, m: u32) -> (u64, u64) {
        let (bytes, len) = self.hash_input();
        let h = fnv1a64(&bytes[..len]);
        let m = m as u64;
        let offset = mix64(h ^ OFFSET_KEY) % m;
        let skip = mix64(h ^ SKIP_KEY) % (m - 1) + 1;
        (offset, skip)
    }
}

/// Fixed keys separating the offset and skip hashes. Changing them (or the
/// hash) changes every table: nodes running different versions during a
/// rolling upgrade would disagree, so treat it like a map layout change.
const OFFSET_KEY: u64 = 0x6d61_676c_6576_6f66; // "maglevof"
const SKIP_KEY: u64 = 0x6d61_676c_6576_736b; // "maglevsk"

/// FNV-1a, 64-bit: portable and byte-order independent.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// SplitMix64's finalizer: spreads FNV's weak high bits over the word.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A table size the builder refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableSizeError {
    #[error("Maglev table size {0} is not a prime")]
    NotPrime(u32),
    #[error("Maglev table size {0} is larger than the maximum {MAX_TABLE_SIZE}")]
    TooLarge(u32),
    #[error(
        "Maglev table size {table_size} must be larger than the number of backends ({backends})"
    )]
    TooFewSlots { table_size: u32, backends: usize },
}

/// Whether `n` is prime (trial division by 6k +/- 1: at most ~22,000
/// divisions for any `u32`).
pub fn is_prime(n: u32) -> bool {
    let n = n as u64;
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let mut d = 5u64;
    while d * d <= n {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

/// Checks a table size for `backends` distinct backends: a prime (so
/// every skip is coprime with it and each permutation visits every slot),
/// at most `MAX_TABLE_SIZE`, and larger than the number of backends (so each
/// gets a slot). Imbalance is about N/M: the paper keeps M > 100 x N.
pub fn validate_table_size(table_size: u32, backends: usize) -> Result<(), TableSizeError> {
    if !is_prime(table_size) {
        return Err(TableSizeError::NotPrime(table_size));
    }
    if table_size > MAX_TABLE_SIZE {
        return Err(TableSizeError::TooLarge(table_size));
    }
    if backends as u64 >= table_size as u64 {
        return Err(TableSizeError::TooFewSlots {
            table_size,
            backends,
        });
    }
    Ok(())
}

/// Builds the Maglev lookup table of `table_size` (M) slots: element `s`
/// is the index into `backends` of the backend slot `s` belongs to.
///
/// Indices refer to the caller's slice, so the caller maps them back with
/// its own parallel data (`backend_ids[table[s] as usize]`). The backend at
/// each slot depends only on the set of identities, not on their order:
/// the input is sorted and deduplicated inside, the table is built in that
/// canonical order, and each identity is then reported as the index of its
/// first occurrence in `backends`. No backends: an empty table.
pub fn build_table(
    backends: &[BackendIdentity],
    table_size: u32,
) -> Result<Vec<u32>, TableSizeError> {
    // Canonical order: sorted identities, each with its first caller index.
    let mut canonical: Vec<(BackendIdentity, u32)> = backends
        .iter()
        .enumerate()
        .map(|(index, identity)| (*identity, index as u32))
        .collect();
    canonical.sort_unstable();
    canonical.dedup_by_key(|(identity, _)| *identity);
    validate_table_size(table_size, canonical.len())?;
    if canonical.is_empty() {
        return Ok(Vec::new());
    }

    let m = table_size as u64;
    let (mut next, skips): (Vec<u64>, Vec<u64>) = canonical
        .iter()
        .map(|(identity, _)| identity.permutation(table_size))
        .unzip();
    const EMPTY: u32 = u32::MAX;
    let mut table = vec![EMPTY; table_size as usize];
    let mut filled = 0u64;
    // Round-robin: each backend in turn takes the next slot of its
    // permutation that nobody holds yet. Terminates: every permutation
    // visits all M slots, and the loop stops when they are all taken.
    'fill: loop {
        for (backend, (candidate, skip)) in next.iter_mut().zip(&skips).enumerate() {
            while table[*candidate as usize] != EMPTY {
                *candidate = (*candidate + skip) % m;
            }
            table[*candidate as usize] = canonical[backend].1;
            *candidate = (*candidate + skip) % m;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    Ok(table)
}

/// The positions where `new` differs from `old`, as (slot, new value), in
/// slot order: what the agent rewrites when it updates a table in place
/// (Katran's approach). Slots past the end of `old` count as changed; slots
/// past the end of `new` are not reported (a table size change rewrites the
/// whole table under a new key anyway). Compare tables of backend ids,
/// not of [`build_table`] indices: indices into two different backend lists
/// are not comparable.
pub fn diff(old: &[u32], new: &[u32]) -> Vec<(u32, u32)> {
    new.iter()
        .enumerate()
        .filter(|&(slot, value)| old.get(slot) != Some(value))
        .map(|(slot, value)| (slot as u32, *value))
        .collect()
}

/// The `LB4_MAGLEV_V1` chunks (`slot / CHUNK_SLOTS`) that hold the changes
/// of a [`diff`], sorted and without repeats.
pub fn changed_chunks(changes: &[(u32, u32)]) -> Vec<u32> {
    let chunks: BTreeSet<u32> = changes.iter().map(|(slot, _)| slot / CHUNK_SLOTS).collect();
    chunks.into_iter().collect()
}

/// The map value of chunk `chunk` of a table of backend ids: its
/// `CHUNK_SLOTS` slots, 0 (no backend) past the end of the table.
pub fn chunk_value(backend_ids: &[u32], chunk: u32) -> Lb4MaglevChunk {
    let mut value = Lb4MaglevChunk::default();
    if chunk < chunk_count(backend_ids.len() as u32) {
        let start = (chunk * CHUNK_SLOTS) as usize;
        let end = (start + CHUNK_SLOTS as usize).min(backend_ids.len());
        value.backend_ids[..end - start].copy_from_slice(&backend_ids[start..end]);
    }
    value
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        net::{Ipv4Addr, Ipv6Addr},
        time::Instant,
    };

    use super::*;

    /// `count` backends 10.244.(i / 250).(i % 250 + 1):8080.
    fn backends(count: usize) -> Vec<BackendIdentity> {
        (0..count)
            .map(|i| BackendIdentity {
                addr: IpAddr::V4(Ipv4Addr::new(10, 244, (i / 250) as u8, (i % 250) as u8 + 1)),
                port: 8080,
            })
            .collect()
    }

    /// The identity at every slot.
    fn identities(table: &[u32], backends: &[BackendIdentity]) -> Vec<BackendIdentity> {
        table.iter().map(|&i| backends[i as usize]).collect()
    }

    /// A deterministic Fisher-Yates shuffle (no rand dependency).
    fn shuffled<T: Clone>(items: &[T], mut seed: u64) -> Vec<T> {
        let mut out = items.to_vec();
        for i in (1..out.len()).rev() {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            out.swap(i, (seed >> 33) as usize % (i + 1));
        }
        out
    }

    #[test]
    fn shares_are_even() {
        let backends = backends(100);
        let table = build_table(&backends, 16381).unwrap();
        assert_eq!(table.len(), 16381);
        let mut shares = vec![0u32; backends.len()];
        for &index in &table {
            shares[index as usize] += 1;
        }
        let (min, max) = (*shares.iter().min().unwrap(), *shares.iter().max().unwrap());
        let ratio = max as f64 / min as f64;
        println!("100 backends, M = 16381: slots per backend {min}..{max}, max/min {ratio:.4}");
        assert!(min > 0, "a backend got no slot");
        assert!(
            ratio <= 1.1,
            "max/min share {ratio:.4} > 1.1 ({min}..{max})"
        );
    }

    /// Share of the surviving backends' slots that moved when `removed`
    /// left; panics if a slot still points at the removed backend.
    fn disruption(all: &[BackendIdentity], removed: usize, m: u32) -> f64 {
        let before = identities(&build_table(all, m).unwrap(), all);
        let mut rest = all.to_vec();
        let gone = rest.remove(removed);
        let after = identities(&build_table(&rest, m).unwrap(), &rest);
        let (mut kept, mut moved) = (0u32, 0u32);
        for (old, new) in before.iter().zip(&after) {
            assert_ne!(*new, gone, "a slot still points at the removed backend");
            if *old != gone {
                kept += 1;
                if old != new {
                    moved += 1;
                }
            }
        }
        moved as f64 / kept as f64
    }

    #[test]
    fn removing_a_backend_moves_few_other_slots() {
        let all = backends(100);
        let figures: Vec<f64> = [0, 1, 37, 50, 73, 99]
            .iter()
            .map(|&removed| disruption(&all, removed, 16381))
            .collect();
        let worst = figures.iter().cloned().fold(0.0, f64::max);
        let mean = figures.iter().sum::<f64>() / figures.len() as f64;
        println!(
            "remove 1 of 100 backends, M = 16381: other backends' slots moved: mean {:.3}%, worst {:.3}% (removed index 0, 1, 37, 50, 73, 99: {})",
            mean * 100.0,
            worst * 100.0,
            figures
                .iter()
                .map(|f| format!("{:.3}%", f * 100.0))
                .collect::<Vec<_>>()
                .join(", ")
        );
        assert!(
            worst <= 0.02,
            "{:.3}% of the other slots moved",
            worst * 100.0
        );
    }

    #[test]
    fn adding_a_backend_moves_about_its_share() {
        let all = backends(101);
        let before_set = &all[..100];
        let before = identities(&build_table(before_set, 16381).unwrap(), before_set);
        let after = identities(&build_table(&all, 16381).unwrap(), &all);
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        let to_new = after.iter().filter(|b| **b == all[100]).count();
        println!(
            "add a 101st backend, M = 16381: {moved} slots moved, {to_new} of them to the new backend ({:.3}% moved elsewhere)",
            (moved - to_new) as f64 / 16381.0 * 100.0
        );
        assert!((moved - to_new) as f64 / 16381.0 <= 0.02);
    }

    #[test]
    fn input_order_and_duplicates_do_not_matter() {
        let mut all = backends(100);
        all.push(BackendIdentity {
            addr: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7)),
            port: 80,
        });
        let reference = identities(&build_table(&all, 16381).unwrap(), &all);
        for seed in [1, 2, 3] {
            let mut input = shuffled(&all, seed);
            // Duplicates (the same endpoint in two slices) are one backend.
            input.push(input[5]);
            input.push(input[17]);
            let table = build_table(&input, 16381).unwrap();
            assert_eq!(identities(&table, &input), reference, "seed {seed}");
            // Indices point at first occurrences.
            let first: BTreeMap<BackendIdentity, u32> = input
                .iter()
                .enumerate()
                .rev()
                .map(|(i, b)| (*b, i as u32))
                .collect();
            assert!(table.iter().all(|&i| first[&input[i as usize]] == i));
        }
    }

    /// Pinned: the hash and the fill order are part of the cross-node
    /// contract (all nodes of a rolling upgrade must agree). The values were
    /// cross-checked against a literal transcription of the paper's
    /// pseudocode (full permutation matrix, `next[i]` counters) using the
    /// same hash.
    #[test]
    fn known_tables() {
        let three = backends(3);
        assert_eq!(
            build_table(&three, 13).unwrap(),
            [0, 0, 0, 1, 2, 2, 1, 2, 2, 1, 1, 0, 0]
        );
        let hundred = backends(100);
        assert_eq!(
            build_table(&hundred, 4099).unwrap()[..16],
            [
                19, 68, 57, 58, 72, 89, 47, 26, 90, 85, 29, 0, 33, 37, 27, 76
            ]
        );
    }

    #[test]
    fn large_table_builds() {
        let all = backends(1000);
        let start = Instant::now();
        let table = build_table(&all, 65521).unwrap();
        let elapsed = start.elapsed();
        println!("1000 backends, M = 65521: built in {elapsed:?}");
        assert_eq!(table.len(), 65521);
        let used: BTreeSet<u32> = table.iter().copied().collect();
        assert_eq!(used.len(), 1000, "every backend has a slot");
    }

    #[test]
    fn table_sizes_are_validated() {
        let three = backends(3);
        assert_eq!(
            build_table(&three, 16383),
            Err(TableSizeError::NotPrime(16383))
        );
        assert_eq!(
            build_table(&three, 3),
            Err(TableSizeError::TooFewSlots {
                table_size: 3,
                backends: 3
            })
        );
        assert_eq!(
            build_table(&three, 131_101),
            Err(TableSizeError::TooLarge(131_101))
        );
        // Duplicates count once.
        let dup = [three[0], three[0], three[1]];
        assert_eq!(build_table(&dup, 3).unwrap().len(), 3);
        assert_eq!(build_table(&[], 16381), Ok(Vec::new()));
        assert_eq!(
            build_table(&[], 16380),
            Err(TableSizeError::NotPrime(16380))
        );
        // The smallest prime works: skip is always 1.
        assert_eq!(build_table(&three[..1], 2), Ok(vec![0, 0]));
    }

    #[test]
    fn primes() {
        for n in [
            2,
            3,
            5,
            7,
            13,
            251,
            16381,
            65521,
            65537,
            131_071,
            4_294_967_291,
        ] {
            assert!(is_prime(n), "{n} is prime");
        }
        // 561 and 41041 are Carmichael numbers; 16383 = 3 x 43 x 127;
        // 4294967295 = 3 x 5 x 17 x 257 x 65537; 4294836225 = 65535^2.
        for n in [
            0,
            1,
            4,
            9,
            25,
            561,
            41041,
            16383,
            65535,
            4_294_967_295,
            4_294_836_225,
        ] {
            assert!(!is_prime(n), "{n} is not prime");
        }
    }

    #[test]
    fn diff_reports_only_changed_slots() {
        assert_eq!(diff(&[1, 2, 3], &[1, 2, 3]), []);
        assert_eq!(diff(&[1, 2, 3, 4], &[1, 9, 3, 8]), [(1, 9), (3, 8)]);
        assert_eq!(diff(&[], &[5, 6]), [(0, 5), (1, 6)]);
        assert_eq!(diff(&[1, 2], &[1, 2, 7]), [(2, 7)]);
        assert_eq!(diff(&[1, 2, 3], &[1]), []);

        // Applying the diff to the old table gives the new one.
        let all = backends(50);
        let ids: Vec<u32> = (1..=50).collect();
        let old: Vec<u32> = build_table(&all, 4099)
            .unwrap()
            .iter()
            .map(|&i| ids[i as usize])
            .collect();
        let (rest, rest_ids) = (
            [&all[..20], &all[21..]].concat(),
            [&ids[..20], &ids[21..]].concat(),
        );
        let new: Vec<u32> = build_table(&rest, 4099)
            .unwrap()
            .iter()
            .map(|&i| rest_ids[i as usize])
            .collect();
        let changes = diff(&old, &new);
        let mut patched = old.clone();
        for (slot, value) in &changes {
            patched[*slot as usize] = *value;
        }
        assert_eq!(patched, new);
        assert!(
            changes
                .iter()
                .all(|(slot, _)| old[*slot as usize] != new[*slot as usize])
        );
    }

    #[test]
    fn chunks() {
        let table: Vec<u32> = (1..=130).collect();
        assert_eq!(
            changed_chunks(&[(0, 1), (63, 1), (64, 1), (129, 1)]),
            [0, 1, 2]
        );
        assert_eq!(changed_chunks(&[]), Vec::<u32>::new());
        assert_eq!(chunk_value(&table, 0).backend_ids[0], 1);
        assert_eq!(chunk_value(&table, 1).backend_ids[63], 128);
        let last = chunk_value(&table, 2).backend_ids;
        assert_eq!(&last[..2], [129, 130]);
        assert!(last[2..].iter().all(|&id| id == 0));
        assert_eq!(chunk_value(&table, 3), Lb4MaglevChunk::default());
    }
}
