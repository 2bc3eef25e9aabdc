//! Connection tracking: one LRU entry per direction of each balanced flow,
//! with a lifecycle. Both entries of a flow carry its state bits (answered,
//! FIN each way, RST) and a coarse last-seen time; an entry older than its
//! state's timeout is absent here and collected by the agent. The lifecycle
//! ([`follow`], [`claim_tuple`]) is written once over [`CtTable`], which
//! each family's table implements.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
};
use lb_common::{
    HAIRPIN_ADDR4, HAIRPIN_ADDR6, PROTO_TCP,
    backend::{Lb4Backend, Lb6Backend},
    conntrack::{
        CT_FIN_FORWARD, CT_FIN_REPLY, CT_REPLIED, CT_RST, CtEntry, CtState, CtTimeouts,
        DIR_FORWARD, DIR_REPLY, Lb4CtEntry, Lb4CtKey, Lb6CtEntry, Lb6CtKey, REWRITE_DST,
        REWRITE_HAIRPIN, REWRITE_SRC, is_expired, needs_refresh, peer_tuple,
    },
    member::Lb4MemberKey,
    service::Lb4Service,
    stats::Reason,
};

use crate::{
    LB_CONFIG_V3, LB4_BACKENDS_V1, LB4_CT_V3, LB4_MEMBERS_V1, LB6_BACKENDS_V1, LB6_CT_V2,
    parse::{self, Flow, Flow6},
    stats,
};

/// SNAT source ports are taken from 61000-65522 (the kernel's default
/// ephemeral range sits below it, so the node's own connections and ours
/// do not meet). The count is prime, so every probe step visits the whole
/// range.
const SNAT_PORT_MIN: u16 = 61000;
const SNAT_PORT_COUNT: u32 = 4523;
/// Candidates tried before giving up on a port (a constant bound for the
/// verifier). Probes follow a per-flow step (double hashing), so a range
/// three quarters full still finds a free port within a few tries; 64
/// misses in a row only happen when it is nearly exhausted.
const SNAT_PORT_TRIES: u32 = 64;
/// `-EEXIST`: a `BPF_NOEXIST` insert lost a race for the key.
const EEXIST: i32 = -17;

/// The clock of every conntrack and affinity time: coarse (a tick, a few
/// milliseconds) and cheaper than `bpf_ktime_get_ns`; user space reads
/// the same clock as `CLOCK_MONOTONIC_COARSE`.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: no arguments, no side effects.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// A new flow's creation stamp: `now` with random bits below the
/// microsecond. A coarse tick is the same for every flow created in it,
/// and the stamp is part of the identity both entries of a flow share
/// ([`CtTable::flow_id`]); the noise keeps two flows of one tick and one
/// backend apart, and is invisible in an age shown in tenths of seconds.
#[inline(always)]
pub fn creation_stamp(now: u64) -> u64 {
    // SAFETY: no arguments, no side effects.
    let noise = unsafe { bpf_get_prandom_u32() } & 0x3ff;
    (now & !0x3ff) | u64::from(noise)
}

/// The node's conntrack timeouts; kube-proxy's defaults while the agent
/// has not written its own (an all-zero config).
#[inline(always)]
fn timeouts() -> &'static CtTimeouts {
    match LB_CONFIG_V3.get(0) {
        Some(config) if config.ct.tcp_established != 0 => &config.ct,
        _ => &CtTimeouts::DEFAULT,
    }
}

/// A family's conntrack table, for the stages written once over both.
pub trait CtTable {
    type Key: PartialEq;
    type Entry: CtEntry + Copy + 'static;
    /// The entry at `key`, in the map (written in place).
    fn get(key: &Self::Key) -> Option<*mut Self::Entry>;
    fn insert(key: &Self::Key, entry: &Self::Entry, flags: u64) -> Result<(), i32>;
    fn remove(key: &Self::Key);
    /// Writes into `out` the key of the other direction's entry of the
    /// flow whose entry at `key` is `entry`.
    fn peer_key(key: &Self::Key, entry: &Self::Entry, out: &mut Self::Key);
    /// Whether a forward entry's backend is still programmed at the
    /// address the entry translates to.
    fn backend_programmed(entry: &Self::Entry) -> bool;
    /// The flow's identity shared by both entries: (service, backend,
    /// creation time).
    fn flow_id(entry: &Self::Entry) -> (u32, u32, u64);
    /// Counts a packet of `len` bytes on the entry.
    fn count(entry: &mut Self::Entry, len: u32);
}

/// The IPv4 table, `LB4_CT_V3`.
pub struct V4;
/// The IPv6 table, `LB6_CT_V2`.
pub struct V6;

macro_rules! ct_table {
    ($family:ty, $map:ident, $key:ty, $entry:ty, $backends:ident) => {
        impl CtTable for $family {
            type Key = $key;
            type Entry = $entry;
            #[inline(always)]
            fn get(key: &$key) -> Option<*mut $entry> {
                $map.get_ptr_mut(key)
            }
            #[inline(always)]
            fn insert(key: &$key, entry: &$entry, flags: u64) -> Result<(), i32> {
                $map.insert(key, entry, flags)
            }
            #[inline(always)]
            fn remove(key: &$key) {
                let _ = $map.remove(key);
            }
            #[inline(always)]
            fn peer_key(key: &$key, entry: &$entry, out: &mut $key) {
                let (src, dst, src_port, dst_port) = peer_tuple(
                    entry,
                    (key.src_addr, key.dst_addr),
                    (key.src_port, key.dst_port),
                );
                out.src_addr = src;
                out.dst_addr = dst;
                out.src_port = src_port;
                out.dst_port = dst_port;
                out.proto = key.proto;
                out._pad = [0; 3];
            }
            #[inline(always)]
            fn backend_programmed(entry: &$entry) -> bool {
                match unsafe { $backends.get(entry.backend_id) } {
                    Some(backend) => {
                        backend.addr == entry.dst_addr && backend.port == entry.dst_port
                    }
                    None => false,
                }
            }
            #[inline(always)]
            fn flow_id(entry: &$entry) -> (u32, u32, u64) {
                (entry.service_id, entry.backend_id, entry.created_ns)
            }
            #[inline(always)]
            fn count(entry: &mut $entry, len: u32) {
                // Plain (not atomic) updates: counters are approximate by design.
                entry.packets += 1;
                entry.bytes += len as u64;
            }
        }
    };
}
ct_table!(V4, LB4_CT_V3, Lb4CtKey, Lb4CtEntry, LB4_BACKENDS_V1);
ct_table!(V6, LB6_CT_V2, Lb6CtKey, Lb6CtEntry, LB6_BACKENDS_V1);

/// What a packet shows the lifecycle.
#[derive(Clone, Copy)]
pub struct Seen {
    pub proto: u8,
    /// The TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    pub len: u32,
}

impl Seen {
    #[inline(always)]
    pub fn of(flow: &Flow, len: u32) -> Self {
        Seen {
            proto: flow.key.proto,
            tcp_flags: flow.tcp_flags,
            len,
        }
    }

    #[inline(always)]
    pub fn of6(flow: &Flow6, len: u32) -> Self {
        Seen {
            proto: flow.key.proto,
            tcp_flags: flow.tcp_flags,
            len,
        }
    }

    /// A connection opener (SYN without ACK).
    #[inline(always)]
    fn is_syn(&self) -> bool {
        self.proto == PROTO_TCP
            && self.tcp_flags & (parse::TCP_SYN | parse::TCP_ACK) == parse::TCP_SYN
    }
}

/// Whether a tracked packet follows its flow or starts a new one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// Translate it as the entry says.
    Track,
    /// Treat the tuple as untracked: the entry expired, or a SYN reuses
    /// the tuple of a flow that is over or whose backend left.
    New,
}

/// The lifecycle step of a packet whose tuple `key` has `entry`: expiry,
/// a SYN on a closed tuple or on a backend that left, the state bits the
/// packet adds (written to both entries of the flow), the last-seen
/// refresh (only when it moved by a fraction of the timeout, so a busy
/// flow does not write its time per packet) and the counters. `peer` is
/// room for the other entry's key (scratch space for IPv6).
#[inline(always)]
pub fn follow<T: CtTable>(
    key: &T::Key,
    entry: *mut T::Entry,
    peer: &mut T::Key,
    seen: &Seen,
    now: u64,
) -> Follow {
    let timeouts = timeouts();
    // SAFETY: a map value; racing writers store the same kind of value.
    let e = unsafe { &mut *entry };
    let state = e.state();
    if is_expired(timeouts, seen.proto, state, e.last_seen_ns(), now) {
        return Follow::New;
    }
    let forward = e.direction() == DIR_FORWARD;
    let closed = CtState::of(seen.proto, state).is_closed();
    if forward && seen.is_syn() && (closed || !backend_current::<T>(e)) {
        return Follow::New;
    }
    // A flow that is over may have lost its reply tuple to a newer flow
    // (its SNAT port claimed again): its stragglers must not reach the
    // backend as that flow's packets, nor touch its state. Only packets
    // after a close pay this lookup.
    if closed {
        T::peer_key(key, e, peer);
        match T::get(peer) {
            // SAFETY: a map value, only read.
            Some(other) if T::flow_id(unsafe { &*other }) == T::flow_id(e) => {}
            _ => return Follow::New,
        }
    }
    let mut next = state;
    if !forward {
        next |= CT_REPLIED;
        if state & CT_REPLIED == 0 {
            // The first answer: a RST refuses the connection attempt.
            // Counted here, on the state change: established packets never
            // reach this.
            let refused = seen.proto == PROTO_TCP && seen.tcp_flags & parse::TCP_RST != 0;
            let (service_id, backend_id, _) = T::flow_id(e);
            stats::count_backend(
                service_id,
                backend_id,
                if refused {
                    stats::BACKEND_FAILED
                } else {
                    stats::BACKEND_ANSWERED
                },
            );
        }
    }
    if seen.proto == PROTO_TCP {
        // A FIN before any answer closes nothing (netfilter ignores it in
        // SYN_SENT): it must not hold the tuple for close-wait's hour.
        if seen.tcp_flags & parse::TCP_FIN != 0 && next & CT_REPLIED != 0 {
            next |= if forward {
                CT_FIN_FORWARD
            } else {
                CT_FIN_REPLY
            };
        }
        if seen.tcp_flags & parse::TCP_RST != 0 {
            next |= CT_RST;
        }
    }
    let changed = next != state;
    if changed || needs_refresh(timeouts, seen.proto, state, e.last_seen_ns(), now) {
        e.set_state(next, now);
        // The other entry lives as long and knows the same: a SYN on the
        // forward tuple must see the backend's FIN, and a flow answered
        // only one way must not lose its reply entry early.
        T::peer_key(key, e, peer);
        if let Some(other) = T::get(peer) {
            // SAFETY: a map value, as above.
            let other = unsafe { &mut *other };
            // Only the same flow's entry: a reply tuple claimed again by a
            // newer flow is not this one's any more.
            if T::flow_id(other) == T::flow_id(e) {
                other.set_state(other.state() | next, now);
            }
        }
    }
    T::count(e, seen.len);
    Follow::Track
}

/// Whether a forward entry's backend may keep a SYN reusing its tuple:
/// still programmed at the same address, and still a member of the
/// service (a backend that left the service serves no new connection,
/// even while another service keeps it).
#[inline(always)]
fn backend_current<T: CtTable>(entry: &T::Entry) -> bool {
    if !T::backend_programmed(entry) {
        return false;
    }
    let (service_id, backend_id, _) = T::flow_id(entry);
    let member = Lb4MemberKey {
        service_id,
        backend_id,
    };
    unsafe { LB4_MEMBERS_V1.get(member) }.is_some()
}

/// What [`claim_tuple`] found at a reply tuple.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The tuple is the new flow's now.
    Taken,
    /// A live flow holds it.
    Busy,
}

/// Makes `entry` the reply entry at `key` if the tuple is free, or held
/// by a flow that is over (expired, closed, or reset): its entry is
/// overwritten in place. Looked up first, never inserted blindly: an LRU
/// insert takes a free node (evicting another flow when none is left)
/// before it finds the key taken, so a failed `BPF_NOEXIST` insert is not
/// free. `same_frontend` also takes a live entry that translates back to
/// the same frontend (the same client's flow, whose forward entry is gone).
#[inline(always)]
pub fn claim_tuple<T: CtTable>(
    key: &T::Key,
    entry: &T::Entry,
    (proto, now, timeouts): (u8, u64, &CtTimeouts),
    same_frontend: bool,
) -> Result<Claim, Reason> {
    let Some(held) = T::get(key) else {
        return match T::insert(key, entry, BPF_NOEXIST as u64) {
            Ok(()) => Ok(Claim::Taken),
            Err(EEXIST) => Ok(Claim::Busy),
            Err(_) => Err(Reason::DropCtFull),
        };
    };
    // SAFETY: a map value; overwritten only once its flow is over, or
    // when it is this client's own.
    let held = unsafe { &mut *held };
    let state = held.state();
    let over = is_expired(timeouts, proto, state, held.last_seen_ns(), now)
        || CtState::of(proto, state).is_closed();
    if over || same_frontend && held.src() == entry.src() {
        *held = *entry;
        return Ok(Claim::Taken);
    }
    Ok(Claim::Busy)
}

/// The client's address and port hashed: the first SNAT candidate and the
/// probe step come from it, so flows that collide once take different paths
/// afterwards (linear probing piles them into clusters that fill long
/// before the range).
#[inline(always)]
fn snat_hash(addr: [u8; 4], port: u16) -> u32 {
    (u32::from_be_bytes(addr) ^ (u32::from(port) << 16) ^ u32::from(port)).wrapping_mul(0x9e37_79b1)
}

/// The `i`-th SNAT port candidate of a flow (double hashing: the count is
/// prime, so every step visits the whole range).
#[inline(always)]
fn snat_candidate(hash: u32, i: u32) -> u16 {
    let first = (hash >> 8) % SNAT_PORT_COUNT;
    let step = 1 + (hash.rotate_left(13) % (SNAT_PORT_COUNT - 1));
    SNAT_PORT_MIN + ((first + i * step) % SNAT_PORT_COUNT) as u16
}

/// The first SNAT port of the flow hashed to `hash` that `claim` takes
/// (`claim(port)` claims the reply tuple at `port`);
/// `drop_snat_exhausted` when every try is held by a live flow.
#[inline(always)]
fn claim_snat_port(
    hash: u32,
    mut claim: impl FnMut(u16) -> Result<Claim, Reason>,
) -> Result<u16, Reason> {
    for i in 0..SNAT_PORT_TRIES {
        let candidate = snat_candidate(hash, i);
        if claim(candidate)? == Claim::Taken {
            return Ok(candidate);
        }
    }
    Err(Reason::DropSnatExhausted)
}

/// Source translation of a new flow.
#[derive(Clone, Copy)]
pub enum Snat {
    /// From outside to a backend on another node: this node's address.
    Node([u8; 4]),
    /// A pod balanced to itself: the hairpin address, and back out of the
    /// same device.
    Hairpin,
}

/// Source translation of a new IPv6 flow, as [`Snat`]; the node address
/// is the one in `LB6_CONFIG_V1`, read in place.
#[derive(Clone, Copy)]
pub enum Snat6 {
    Node(&'static [u8; 16]),
    Hairpin,
}

/// A copy of the flow's entry, if it is tracked (for ICMP errors about it).
#[inline(always)]
pub fn lookup(key: &Lb4CtKey) -> Option<Lb4CtEntry> {
    unsafe { LB4_CT_V3.get(key) }.copied()
}

/// A new TCP connection that is not to a service, whose reverse tuple is
/// the reply entry of an earlier balanced flow (the client reuses its
/// source port, now talking to the pod address directly, say through
/// socket-level balancing): that flow is over, and its reply entry would
/// rewrite this connection's replies to the old service address. Both of
/// its entries go.
#[inline(always)]
pub fn forget_stale_reply(flow: &Flow) {
    let k = &flow.key;
    let reverse = Lb4CtKey {
        src_addr: k.dst_addr,
        dst_addr: k.src_addr,
        src_port: k.dst_port,
        dst_port: k.src_port,
        proto: k.proto,
        _pad: [0; 3],
    };
    let Some(entry) = lookup(&reverse) else {
        return;
    };
    if entry.direction != DIR_REPLY {
        return;
    }
    let mut forward = Lb4CtKey::default();
    V4::peer_key(&reverse, &entry, &mut forward);
    V4::remove(&reverse);
    V4::remove(&forward);
}

/// Records a new flow and returns its forward entry: the reply entry
/// (backend -> client or SNAT address: back to the frontend and the
/// client) first, so replies find theirs once the forward entry exists,
/// then the forward entry (client -> frontend: to the backend, from `snat`
/// when given). Without SNAT, a reply tuple a live flow to another
/// frontend holds (the same client port to two services that chose the
/// same backend) gets the client's own address with a port of the SNAT
/// range instead, so both flows keep their replies.
#[inline(always)]
pub fn create(
    flow: &Flow,
    service: &Lb4Service,
    backend_id: u32,
    backend: &Lb4Backend,
    snat: Option<Snat>,
    len: u32,
    now: u64,
) -> Result<Lb4CtEntry, Reason> {
    let k = &flow.key;
    let timeouts = timeouts();
    // One entry on the stack, first as the reply entry, then turned into
    // the forward one: the verifier's stack budget is small.
    let mut entry = Lb4CtEntry {
        dst_addr: k.src_addr,
        dst_port: k.src_port,
        direction: DIR_REPLY,
        rewrite: REWRITE_SRC,
        src_addr: k.dst_addr,
        src_port: k.dst_port,
        state: 0,
        _pad: 0,
        service_id: service.service_id,
        backend_id,
        created_ns: creation_stamp(now),
        last_seen_ns: now,
        packets: 0,
        bytes: 0,
    };
    let mut reply_key = Lb4CtKey {
        src_addr: backend.addr,
        dst_addr: k.src_addr,
        src_port: backend.port,
        dst_port: k.src_port,
        proto: k.proto,
        _pad: [0; 3],
    };
    let (source, hairpin) = match snat {
        None if claim_tuple::<V4>(&reply_key, &entry, (k.proto, now, timeouts), true)?
            == Claim::Taken =>
        {
            (None, 0)
        }
        // Held by another frontend's live flow: a port of the client's own.
        None => (Some(k.src_addr), 0),
        Some(Snat::Node(addr)) => (Some(addr), 0),
        Some(Snat::Hairpin) => (Some(HAIRPIN_ADDR4), REWRITE_HAIRPIN),
    };
    let mut snat_port = 0;
    if let Some(addr) = source {
        entry.rewrite |= REWRITE_DST | hairpin;
        reply_key.dst_addr = addr;
        snat_port = claim_snat_port(snat_hash(k.src_addr, k.src_port), |port| {
            reply_key.dst_port = port;
            claim_tuple::<V4>(&reply_key, &entry, (k.proto, now, timeouts), false)
        })?;
    }
    entry.direction = DIR_FORWARD;
    entry.dst_addr = backend.addr;
    entry.dst_port = backend.port;
    entry.packets = 1;
    entry.bytes = len as u64;
    match source {
        Some(addr) => {
            entry.rewrite = REWRITE_DST | REWRITE_SRC | hairpin;
            entry.src_addr = addr;
            entry.src_port = snat_port;
        }
        None => {
            entry.rewrite = REWRITE_DST;
            entry.src_addr = [0; 4];
            entry.src_port = 0;
        }
    }
    V4::insert(k, &entry, BPF_ANY as u64).map_err(|_| Reason::DropCtFull)?;
    Ok(entry)
}

/// The IPv6 flow's entry, if it is tracked: a pointer into the map (the
/// 80-byte entry is not copied onto the stack).
#[inline(always)]
pub fn lookup6(key: &Lb6CtKey) -> Option<*mut Lb6CtEntry> {
    V6::get(key)
}

/// [`forget_stale_reply`] for an IPv6 SYN; `key` and `peer` are scratch
/// space for the keys (`LB6_SCRATCH`), not stack.
#[inline(always)]
pub fn forget_stale_reply6(flow: &Flow6, key: &mut Lb6CtKey, peer: &mut Lb6CtKey) {
    let k = &flow.key;
    key.src_addr = k.dst_addr;
    key.dst_addr = k.src_addr;
    key.src_port = k.dst_port;
    key.dst_port = k.src_port;
    key.proto = k.proto;
    key._pad = [0; 3];
    let Some(entry) = lookup6(key) else {
        return;
    };
    // SAFETY: a map value; only read, before it goes.
    let entry = unsafe { &*entry };
    if entry.direction != DIR_REPLY {
        return;
    }
    V6::peer_key(key, entry, peer);
    V6::remove(key);
    V6::remove(peer);
}

/// Records a new IPv6 flow as [`create`] does, the forward entry left in
/// `entry`. `entry` and `reply_key` are scratch space (`LB6_SCRATCH`),
/// not stack.
#[inline(always)]
pub fn create6(
    flow: &Flow6,
    service: &Lb4Service,
    (backend_id, backend): (u32, &Lb6Backend),
    (entry, reply_key): (&mut Lb6CtEntry, &mut Lb6CtKey),
    snat: Option<Snat6>,
    (len, now): (u32, u64),
) -> Result<(), Reason> {
    let k = &flow.key;
    let timeouts = timeouts();
    entry.dst_addr = k.src_addr;
    entry.dst_port = k.src_port;
    entry.direction = DIR_REPLY;
    entry.rewrite = REWRITE_SRC;
    entry.src_addr = k.dst_addr;
    entry.src_port = k.dst_port;
    entry.state = 0;
    entry._pad = 0;
    entry.service_id = service.service_id;
    entry.backend_id = backend_id;
    entry.created_ns = creation_stamp(now);
    entry.last_seen_ns = now;
    entry.packets = 0;
    entry.bytes = 0;
    reply_key.src_addr = backend.addr;
    reply_key.dst_addr = k.src_addr;
    reply_key.src_port = backend.port;
    reply_key.dst_port = k.src_port;
    reply_key.proto = k.proto;
    reply_key._pad = [0; 3];
    // The source the flow gets, written into the reply key's destination
    // in place (map memory: no 16-byte copy on the stack).
    let (translated, hairpin) = match snat {
        None if claim_tuple::<V6>(reply_key, entry, (k.proto, now, timeouts), true)?
            == Claim::Taken =>
        {
            (false, 0)
        }
        // Held by another frontend's live flow: a port of the client's own
        // (already the reply key's destination).
        None => (true, 0),
        Some(Snat6::Node(addr)) => {
            reply_key.dst_addr = *addr;
            (true, 0)
        }
        Some(Snat6::Hairpin) => {
            reply_key.dst_addr = HAIRPIN_ADDR6;
            (true, REWRITE_HAIRPIN)
        }
    };
    let mut snat_port = 0;
    if translated {
        entry.rewrite |= REWRITE_DST | hairpin;
        // The client's low 32 address bits: as for IPv4.
        let low = [
            k.src_addr[12],
            k.src_addr[13],
            k.src_addr[14],
            k.src_addr[15],
        ];
        snat_port = claim_snat_port(snat_hash(low, k.src_port), |port| {
            reply_key.dst_port = port;
            claim_tuple::<V6>(reply_key, entry, (k.proto, now, timeouts), false)
        })?;
    }
    entry.direction = DIR_FORWARD;
    entry.dst_addr = backend.addr;
    entry.dst_port = backend.port;
    entry.packets = 1;
    entry.bytes = len as u64;
    if translated {
        entry.rewrite = REWRITE_DST | REWRITE_SRC | hairpin;
        entry.src_addr = reply_key.dst_addr;
        entry.src_port = snat_port;
    } else {
        entry.rewrite = REWRITE_DST;
        entry.src_addr = [0; 16];
        entry.src_port = 0;
    }
    V6::insert(k, entry, BPF_ANY as u64).map_err(|_| Reason::DropCtFull)?;
    Ok(())
}
