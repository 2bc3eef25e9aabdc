//! Connection tracking: one LRU entry per direction of each balanced flow.

use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use lb_common::{
    HAIRPIN_ADDR4, HAIRPIN_ADDR6,
    backend::{Lb4Backend, Lb6Backend},
    conntrack::{
        DIR_FORWARD, DIR_REPLY, Lb4CtEntry, Lb4CtKey, Lb6CtEntry, Lb6CtKey, REWRITE_DST,
        REWRITE_HAIRPIN, REWRITE_SRC, TCP_FIN, TCP_RST,
    },
    service::Lb4Service,
    stats::Reason,
};

use crate::{
    LB4_BACKENDS_V1, LB4_CT_V2, LB6_BACKENDS_V1, LB6_CT_V1,
    parse::{self, Flow, Flow6},
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
/// (`claim(port)` inserts the reply entry at `port` if that tuple is free);
/// a full table when every try is taken.
#[inline(always)]
fn claim_snat_port(hash: u32, mut claim: impl FnMut(u16) -> bool) -> Result<u16, Reason> {
    for i in 0..SNAT_PORT_TRIES {
        let candidate = snat_candidate(hash, i);
        if claim(candidate) {
            return Ok(candidate);
        }
    }
    Err(Reason::DropCtFull)
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

impl Snat6 {
    /// The rewrite flags the flow's entries get beyond the address ones.
    #[inline(always)]
    fn hairpin_flag(self) -> u8 {
        match self {
            Snat6::Node(_) => 0,
            Snat6::Hairpin => REWRITE_HAIRPIN,
        }
    }

    /// Writes the translated source address into `to` (map memory: no
    /// 16-byte copy on the stack).
    #[inline(always)]
    fn write_addr(self, to: &mut [u8; 16]) {
        match self {
            Snat6::Node(addr) => *to = *addr,
            Snat6::Hairpin => *to = HAIRPIN_ADDR6,
        }
    }
}

/// A copy of the flow's entry, if it is tracked.
#[inline(always)]
pub fn lookup(key: &Lb4CtKey) -> Option<Lb4CtEntry> {
    unsafe { LB4_CT_V2.get(key) }.copied()
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
    // The forward entry: from the client (the reply's destination, or what
    // the reply rewrote it back to) to the frontend (what the reply's
    // source became).
    let (client, client_port) = client_of(
        entry.rewrite,
        (entry.dst_addr, entry.dst_port),
        (k.src_addr, k.src_port),
    );
    let forward = Lb4CtKey {
        src_addr: client,
        dst_addr: entry.src_addr,
        src_port: client_port,
        dst_port: entry.src_port,
        proto: k.proto,
        _pad: [0; 3],
    };
    let _ = LB4_CT_V2.remove(reverse);
    let _ = LB4_CT_V2.remove(forward);
}

/// The client end of a reply entry's flow: what the reply's destination is
/// rewritten back to (after SNAT), or that destination itself.
#[inline(always)]
fn client_of<A>(rewrite: u8, rewritten: (A, u16), destination: (A, u16)) -> (A, u16) {
    if rewrite & REWRITE_DST != 0 {
        rewritten
    } else {
        destination
    }
}

/// Whether the backend a forward entry points at is still programmed at the
/// same address (a removed backend must not get new connections).
#[inline(always)]
pub fn backend_still_valid(entry: &Lb4CtEntry) -> bool {
    match unsafe { LB4_BACKENDS_V1.get(entry.backend_id) } {
        Some(backend) => backend.addr == entry.dst_addr && backend.port == entry.dst_port,
        None => false,
    }
}

/// Updates the entry's activity: last seen, counters, TCP close flags.
#[inline(always)]
pub fn touch(flow: &Flow, len: u32, now: u64) {
    if let Some(entry) = LB4_CT_V2.get_ptr_mut(flow.key) {
        // Plain (not atomic) updates: counters are approximate by design.
        unsafe {
            (*entry).last_seen_ns = now;
            (*entry).packets += 1;
            (*entry).bytes += len as u64;
            if flow.tcp_flags & parse::TCP_FIN != 0 {
                (*entry).tcp_flags |= TCP_FIN;
            }
            if flow.tcp_flags & parse::TCP_RST != 0 {
                (*entry).tcp_flags |= TCP_RST;
            }
        }
    }
}

/// Records a new flow and returns its forward entry: the forward entry
/// (client -> frontend: to the backend, from `snat` when given) and the
/// reply entry (backend -> client or SNAT address: back to the frontend and
/// the client).
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
    let (snat_addr, hairpin) = match snat {
        None => ([0; 4], 0),
        Some(Snat::Node(addr)) => (addr, 0),
        Some(Snat::Hairpin) => (HAIRPIN_ADDR4, REWRITE_HAIRPIN),
    };
    // One entry on the stack, first as the reply entry, then turned into
    // the forward one: the verifier's stack budget is small.
    let mut entry = Lb4CtEntry {
        dst_addr: k.src_addr,
        dst_port: k.src_port,
        direction: DIR_REPLY,
        rewrite: REWRITE_SRC,
        src_addr: k.dst_addr,
        src_port: k.dst_port,
        tcp_flags: 0,
        _pad: 0,
        service_id: service.service_id,
        backend_id,
        created_ns: now,
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
    // Reply first: once the forward entry exists, replies must find theirs.
    let mut snat_port = 0;
    if snat.is_none() {
        LB4_CT_V2
            .insert(reply_key, entry, BPF_ANY as u64)
            .map_err(|_| Reason::DropCtFull)?;
    } else {
        entry.rewrite |= REWRITE_DST | hairpin;
        reply_key.dst_addr = snat_addr;
        // A port whose reply tuple is free.
        snat_port = claim_snat_port(snat_hash(k.src_addr, k.src_port), |port| {
            reply_key.dst_port = port;
            LB4_CT_V2
                .insert(reply_key, entry, BPF_NOEXIST as u64)
                .is_ok()
        })?;
    }
    entry.direction = DIR_FORWARD;
    entry.dst_addr = backend.addr;
    entry.dst_port = backend.port;
    entry.packets = 1;
    entry.bytes = len as u64;
    if snat.is_some() {
        entry.rewrite = REWRITE_DST | REWRITE_SRC | hairpin;
        entry.src_addr = snat_addr;
        entry.src_port = snat_port;
    } else {
        entry.rewrite = REWRITE_DST;
        entry.src_addr = [0; 4];
        entry.src_port = 0;
    }
    LB4_CT_V2
        .insert(k, entry, BPF_ANY as u64)
        .map_err(|_| Reason::DropCtFull)?;
    Ok(entry)
}

/// The IPv6 flow's entry, if it is tracked: a pointer into the map (the
/// 80-byte entry is not copied onto the stack), through which [`touch6`]
/// writes; shared references to it are made only after that.
#[inline(always)]
pub fn lookup6(key: &Lb6CtKey) -> Option<*mut Lb6CtEntry> {
    LB6_CT_V1.get_ptr_mut(key)
}

/// [`forget_stale_reply`] for an IPv6 SYN; `key` is scratch space for the
/// keys (`LB6_SCRATCH`), not stack.
#[inline(always)]
// The borrows keep the key in the scratch space (see `create6`).
#[allow(clippy::needless_borrows_for_generic_args)]
pub fn forget_stale_reply6(flow: &Flow6, key: &mut Lb6CtKey) {
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
    // SAFETY: a map value; only read.
    let entry = unsafe { &*entry };
    if entry.direction != DIR_REPLY {
        return;
    }
    // Copied before the entry goes: the forward entry's key, from the
    // client to the frontend.
    let (client, client_port) = client_of(
        entry.rewrite,
        (entry.dst_addr, entry.dst_port),
        (k.src_addr, k.src_port),
    );
    let (frontend, frontend_port) = (entry.src_addr, entry.src_port);
    let _ = LB6_CT_V1.remove(&*key);
    key.src_addr = client;
    key.dst_addr = frontend;
    key.src_port = client_port;
    key.dst_port = frontend_port;
    let _ = LB6_CT_V1.remove(&*key);
}

/// [`backend_still_valid`] for an IPv6 forward entry.
#[inline(always)]
pub fn backend_still_valid6(entry: &Lb6CtEntry) -> bool {
    match unsafe { LB6_BACKENDS_V1.get(entry.backend_id) } {
        Some(backend) => backend.addr == entry.dst_addr && backend.port == entry.dst_port,
        None => false,
    }
}

/// [`touch`] for an IPv6 entry.
#[inline(always)]
pub fn touch6(entry: *mut Lb6CtEntry, tcp_flags: u8, len: u32, now: u64) {
    // SAFETY: a map value (from `lookup6`); plain, not atomic, updates:
    // counters are approximate by design.
    unsafe {
        (*entry).last_seen_ns = now;
        (*entry).packets += 1;
        (*entry).bytes += len as u64;
        if tcp_flags & parse::TCP_FIN != 0 {
            (*entry).tcp_flags |= TCP_FIN;
        }
        if tcp_flags & parse::TCP_RST != 0 {
            (*entry).tcp_flags |= TCP_RST;
        }
    }
}

/// Records a new IPv6 flow: the reply entry first, as in [`create`], then
/// the forward one, which is left in `entry`. With `snat` (the node's
/// address or the hairpin address) the reply entry is inserted at a free
/// port of the SNAT range, probed as for IPv4. `entry` and `reply_key` are scratch space
/// (`LB6_SCRATCH`), not stack.
#[inline(always)]
// The borrows are the point: the map helpers read the scratch space in
// place, where passing by value would copy 120 bytes onto the stack.
#[allow(clippy::needless_borrows_for_generic_args)]
pub fn create6(
    flow: &Flow6,
    service: &Lb4Service,
    (backend_id, backend): (u32, &Lb6Backend),
    (entry, reply_key): (&mut Lb6CtEntry, &mut Lb6CtKey),
    snat: Option<Snat6>,
    len: u32,
) -> Result<(), Reason> {
    let k = &flow.key;
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    entry.dst_addr = k.src_addr;
    entry.dst_port = k.src_port;
    entry.direction = DIR_REPLY;
    entry.rewrite = REWRITE_SRC;
    entry.src_addr = k.dst_addr;
    entry.src_port = k.dst_port;
    entry.tcp_flags = 0;
    entry._pad = 0;
    entry.service_id = service.service_id;
    entry.backend_id = backend_id;
    entry.created_ns = now;
    entry.last_seen_ns = now;
    entry.packets = 0;
    entry.bytes = 0;
    reply_key.src_addr = backend.addr;
    reply_key.dst_addr = k.src_addr;
    reply_key.src_port = backend.port;
    reply_key.dst_port = k.src_port;
    reply_key.proto = k.proto;
    reply_key._pad = [0; 3];
    let mut snat_port = 0;
    match snat {
        None => {
            LB6_CT_V1
                .insert(&*reply_key, &*entry, BPF_ANY as u64)
                .map_err(|_| Reason::DropCtFull)?;
        }
        Some(source) => {
            // The reply goes back to the client too.
            entry.rewrite |= REWRITE_DST | source.hairpin_flag();
            source.write_addr(&mut reply_key.dst_addr);
            // The client's low 32 address bits: as for IPv4.
            let low = [
                k.src_addr[12],
                k.src_addr[13],
                k.src_addr[14],
                k.src_addr[15],
            ];
            snat_port = claim_snat_port(snat_hash(low, k.src_port), |port| {
                reply_key.dst_port = port;
                LB6_CT_V1
                    .insert(&*reply_key, &*entry, BPF_NOEXIST as u64)
                    .is_ok()
            })?;
        }
    }
    entry.direction = DIR_FORWARD;
    entry.dst_addr = backend.addr;
    entry.dst_port = backend.port;
    entry.packets = 1;
    entry.bytes = len as u64;
    match snat {
        None => {
            entry.rewrite = REWRITE_DST;
            entry.src_addr = [0; 16];
            entry.src_port = 0;
        }
        Some(source) => {
            entry.rewrite = REWRITE_DST | REWRITE_SRC | source.hairpin_flag();
            source.write_addr(&mut entry.src_addr);
            entry.src_port = snat_port;
        }
    }
    LB6_CT_V1
        .insert(k, &*entry, BPF_ANY as u64)
        .map_err(|_| Reason::DropCtFull)?;
    Ok(())
}
