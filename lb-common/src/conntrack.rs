//! `LB4_CT_V3`: the connection tracking table, an LRU hash keyed by 5-tuple.
//!
//! The first packet of a flow to a service writes two entries: the forward one
//! (client -> frontend, rewritten to the backend) and the reply one
//! (backend -> client, source rewritten back to the frontend). `_V2` added
//! source rewriting (SNAT) to the entry; `_V3` gave the entry a lifecycle:
//! `state` holds the flow's [`CT_REPLIED`]/`CT_FIN_*`/[`CT_RST`] bits, the
//! same in both entries of a flow, and `last_seen_ns` is a coarse monotonic
//! time refreshed only when it moved by a fraction of the state's timeout.
//! An entry older than [`timeout_ns`] is absent to the datapath and is
//! collected by the agent.
//!
//! `LB6_CT_V2` is the IPv6 table: the same entries with 128-bit addresses
//! ([`Lb6CtKey`], [`Lb6CtEntry`]) and the same `DIR_*`, `REWRITE_*` and
//! `CT_*` values.

use bytemuck::{Pod, Zeroable};

use crate::{assert_layout, user_pod};

/// Pinned name of the IPv4 conntrack map.
pub const NAME: &str = "LB4_CT_V3";
/// Pinned name of the IPv6 conntrack map.
pub const NAME6: &str = "LB6_CT_V2";
/// Default capacity (two entries per tracked flow).
pub const MAX_ENTRIES: u32 = 524288;

/// 5-tuple as seen on the wire before translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Lb4CtKey {
    /// Source address, network order.
    pub src_addr: [u8; 4],
    /// Destination address, network order.
    pub dst_addr: [u8; 4],
    /// Source port, host order.
    pub src_port: u16,
    /// Destination port, host order.
    pub dst_port: u16,
    /// IANA protocol number.
    pub proto: u8,
    /// Explicit padding, always zero (the key is hashed bytewise).
    pub _pad: [u8; 3],
}
assert_layout!(
    Lb4CtKey,
    size = 16,
    src_addr = 0,
    dst_addr = 4,
    src_port = 8,
    dst_port = 10,
    proto = 12,
    _pad = 13
);

/// Forward direction of a flow (client -> frontend).
pub const DIR_FORWARD: u8 = 1;
/// Reply direction of a flow (backend -> client, or -> the SNAT address).
pub const DIR_REPLY: u8 = 2;

/// Rewrite the destination to `dst_addr:dst_port`.
pub const REWRITE_DST: u8 = 1;
/// Rewrite the source to `src_addr:src_port`.
pub const REWRITE_SRC: u8 = 2;
/// A hairpin flow (a pod balanced to itself): after the rewrite the packet
/// goes straight back out of the device it came in on.
pub const REWRITE_HAIRPIN: u8 = 4;

/// Flow state bits, kept equal in both entries of a flow (`state`).
///
/// The reply direction has carried a packet (TCP: the SYN-ACK; UDP: an
/// answer): the flow is established, or a UDP stream.
pub const CT_REPLIED: u8 = 1;
/// A TCP FIN went from the client towards the backend.
pub const CT_FIN_FORWARD: u8 = 2;
/// A TCP FIN went from the backend back towards the client.
pub const CT_FIN_REPLY: u8 = 4;
/// A TCP RST went either way: the connection is over.
pub const CT_RST: u8 = 8;
/// Both FINs: the connection is over (its peers may be in TIME_WAIT).
pub const CT_FIN_BOTH: u8 = CT_FIN_FORWARD | CT_FIN_REPLY;

/// What a flow's state bits say, for the timeouts and for display.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtState {
    /// TCP: a SYN and no answer yet.
    SynSent,
    /// TCP: answered, no FIN or RST.
    Established,
    /// TCP: a FIN one way (half closed).
    CloseWait,
    /// TCP: FINs both ways.
    TimeWait,
    /// TCP: a RST.
    Closed,
    /// Not TCP, nothing came back yet.
    Unreplied,
    /// Not TCP, answered (a stream).
    Replied,
}

impl CtState {
    /// The state of a flow of protocol `proto` with `state` bits.
    #[inline(always)]
    pub const fn of(proto: u8, state: u8) -> CtState {
        if proto != crate::PROTO_TCP {
            return if state & CT_REPLIED != 0 {
                CtState::Replied
            } else {
                CtState::Unreplied
            };
        }
        if state & CT_RST != 0 {
            CtState::Closed
        } else if state & CT_FIN_BOTH == CT_FIN_BOTH {
            CtState::TimeWait
        } else if state & CT_FIN_BOTH != 0 {
            CtState::CloseWait
        } else if state & CT_REPLIED != 0 {
            CtState::Established
        } else {
            CtState::SynSent
        }
    }

    /// Whether the connection is over: a SYN on its tuple starts a new
    /// flow, and its SNAT port may be claimed again.
    #[inline(always)]
    pub const fn is_closed(self) -> bool {
        matches!(self, CtState::TimeWait | CtState::Closed)
    }

    /// Stable name for `lbctl` and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            CtState::SynSent => "syn_sent",
            CtState::Established => "established",
            CtState::CloseWait => "close_wait",
            CtState::TimeWait => "time_wait",
            CtState::Closed => "closed",
            CtState::Unreplied => "unreplied",
            CtState::Replied => "replied",
        }
    }

    /// Every state, for readers that list them all.
    pub const ALL: [CtState; 7] = [
        CtState::SynSent,
        CtState::Established,
        CtState::CloseWait,
        CtState::TimeWait,
        CtState::Closed,
        CtState::Unreplied,
        CtState::Replied,
    ];
}

/// How long an entry lives after its last packet, per state, in seconds
/// (part of [`crate::config::LbConfig`]). Defaults follow kube-proxy (which
/// sets netfilter's established and close-wait timeouts) and netfilter.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct CtTimeouts {
    /// [`CtState::SynSent`].
    pub tcp_syn: u32,
    /// [`CtState::Established`] (`--conntrack-tcp-timeout-established`).
    pub tcp_established: u32,
    /// [`CtState::CloseWait`] (`--conntrack-tcp-timeout-close-wait`).
    pub tcp_close_wait: u32,
    /// [`CtState::TimeWait`].
    pub tcp_time_wait: u32,
    /// [`CtState::Closed`].
    pub tcp_close: u32,
    /// [`CtState::Unreplied`] (`--conntrack-udp-timeout`).
    pub udp: u32,
    /// [`CtState::Replied`] (`--conntrack-udp-timeout-stream`).
    pub udp_stream: u32,
    /// Explicit padding, always zero.
    pub _pad: u32,
}
assert_layout!(
    CtTimeouts,
    size = 32,
    tcp_syn = 0,
    tcp_established = 4,
    tcp_close_wait = 8,
    tcp_time_wait = 12,
    tcp_close = 16,
    udp = 20,
    udp_stream = 24,
    _pad = 28
);

impl CtTimeouts {
    /// kube-proxy's and netfilter's defaults: established 24 h, close-wait
    /// 1 h, time-wait 2 min, SYN 1 min, closed (RST) 10 s, UDP 30 s, a UDP
    /// stream 2 min.
    pub const DEFAULT: CtTimeouts = CtTimeouts {
        tcp_syn: 60,
        tcp_established: 86400,
        tcp_close_wait: 3600,
        tcp_time_wait: 120,
        tcp_close: 10,
        udp: 30,
        udp_stream: 120,
        _pad: 0,
    };

    /// Seconds an entry in `state` lives after its last packet.
    #[inline(always)]
    pub const fn seconds(&self, state: CtState) -> u32 {
        match state {
            CtState::SynSent => self.tcp_syn,
            CtState::Established => self.tcp_established,
            CtState::CloseWait => self.tcp_close_wait,
            CtState::TimeWait => self.tcp_time_wait,
            CtState::Closed => self.tcp_close,
            CtState::Unreplied => self.udp,
            CtState::Replied => self.udp_stream,
        }
    }
}

impl Default for CtTimeouts {
    fn default() -> Self {
        CtTimeouts::DEFAULT
    }
}

/// Nanoseconds an entry of protocol `proto` with `state` bits lives after
/// `last_seen_ns`.
#[inline(always)]
pub const fn timeout_ns(timeouts: &CtTimeouts, proto: u8, state: u8) -> u64 {
    timeouts.seconds(CtState::of(proto, state)) as u64 * 1_000_000_000
}

/// Whether an entry last seen at `last_seen_ns` is gone at `now_ns` (both
/// coarse monotonic nanoseconds, `bpf_ktime_get_coarse_ns` and
/// `CLOCK_MONOTONIC_COARSE`).
#[inline(always)]
pub const fn is_expired(
    timeouts: &CtTimeouts,
    proto: u8,
    state: u8,
    last_seen_ns: u64,
    now_ns: u64,
) -> bool {
    now_ns.saturating_sub(last_seen_ns) > timeout_ns(timeouts, proto, state)
}

/// Whether `last_seen_ns` is stale enough to be written again at `now_ns`:
/// it moved by more than 1/64 of the state's timeout (at least a second),
/// so a busy flow writes its time a few times per timeout, not per packet.
#[inline(always)]
pub const fn needs_refresh(
    timeouts: &CtTimeouts,
    proto: u8,
    state: u8,
    last_seen_ns: u64,
    now_ns: u64,
) -> bool {
    let slack = timeout_ns(timeouts, proto, state) >> 6;
    let slack = if slack < 1_000_000_000 {
        1_000_000_000
    } else {
        slack
    };
    now_ns.saturating_sub(last_seen_ns) >= slack
}

/// Translation and bookkeeping for one direction of a flow.
///
/// Forward entries always rewrite the destination (to the backend) and,
/// for traffic from outside balanced to another node, the source too (to
/// the node's address and an allocated port). Reply entries always rewrite
/// the source (back to the frontend) and, after SNAT, the destination (back
/// to the client).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Lb4CtEntry {
    /// New destination address (with `REWRITE_DST`), network order.
    pub dst_addr: [u8; 4],
    /// New destination port, host order.
    pub dst_port: u16,
    /// `DIR_*`.
    pub direction: u8,
    /// `REWRITE_*` bits.
    pub rewrite: u8,
    /// New source address (with `REWRITE_SRC`), network order.
    pub src_addr: [u8; 4],
    /// New source port, host order.
    pub src_port: u16,
    /// The flow's `CT_*` state bits (equal in both of its entries).
    pub state: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
    /// Service the flow was balanced by.
    pub service_id: u32,
    /// Backend the flow was given.
    pub backend_id: u32,
    /// Coarse monotonic nanoseconds at creation.
    pub created_ns: u64,
    /// Coarse monotonic nanoseconds at a recent packet (refreshed per
    /// [`needs_refresh`], and on every state change).
    pub last_seen_ns: u64,
    /// Packets seen in this direction (approximate under concurrency).
    pub packets: u64,
    /// Bytes seen in this direction (approximate under concurrency).
    pub bytes: u64,
}
assert_layout!(
    Lb4CtEntry,
    size = 56,
    dst_addr = 0,
    dst_port = 4,
    direction = 6,
    rewrite = 7,
    src_addr = 8,
    src_port = 12,
    state = 14,
    _pad = 15,
    service_id = 16,
    backend_id = 20,
    created_ns = 24,
    last_seen_ns = 32,
    packets = 40,
    bytes = 48
);

/// IPv6 5-tuple as seen on the wire before translation; `proto` is the L4
/// header's (the last next-header of the extension chain).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Lb6CtKey {
    /// Source address, network order.
    pub src_addr: [u8; 16],
    /// Destination address, network order.
    pub dst_addr: [u8; 16],
    /// Source port, host order.
    pub src_port: u16,
    /// Destination port, host order.
    pub dst_port: u16,
    /// IANA protocol number.
    pub proto: u8,
    /// Explicit padding, always zero (the key is hashed bytewise).
    pub _pad: [u8; 3],
}
assert_layout!(
    Lb6CtKey,
    size = 40,
    src_addr = 0,
    dst_addr = 16,
    src_port = 32,
    dst_port = 34,
    proto = 36,
    _pad = 37
);

/// [`Lb4CtEntry`] with 128-bit addresses: the translation and bookkeeping
/// of one direction of an IPv6 flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Lb6CtEntry {
    /// New destination address (with `REWRITE_DST`), network order.
    pub dst_addr: [u8; 16],
    /// New destination port, host order.
    pub dst_port: u16,
    /// `DIR_*`.
    pub direction: u8,
    /// `REWRITE_*` bits.
    pub rewrite: u8,
    /// New source address (with `REWRITE_SRC`), network order.
    pub src_addr: [u8; 16],
    /// New source port, host order.
    pub src_port: u16,
    /// The flow's `CT_*` state bits (equal in both of its entries).
    pub state: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
    /// Service the flow was balanced by.
    pub service_id: u32,
    /// Backend the flow was given.
    pub backend_id: u32,
    /// Coarse monotonic nanoseconds at creation.
    pub created_ns: u64,
    /// Coarse monotonic nanoseconds at a recent packet (refreshed per
    /// [`needs_refresh`], and on every state change).
    pub last_seen_ns: u64,
    /// Packets seen in this direction (approximate under concurrency).
    pub packets: u64,
    /// Bytes seen in this direction (approximate under concurrency).
    pub bytes: u64,
}
assert_layout!(
    Lb6CtEntry,
    size = 80,
    dst_addr = 0,
    dst_port = 16,
    direction = 18,
    rewrite = 19,
    src_addr = 20,
    src_port = 36,
    state = 38,
    _pad = 39,
    service_id = 40,
    backend_id = 44,
    created_ns = 48,
    last_seen_ns = 56,
    packets = 64,
    bytes = 72
);

user_pod!(Lb4CtKey, Lb4CtEntry, Lb6CtKey, Lb6CtEntry);

/// What the lifecycle reads and writes in an entry of either family: the
/// stages over both tables, the agent's collector and `lbctl` use this,
/// never the concrete fields.
pub trait CtEntry {
    /// An address of the entry's family.
    type Addr: Copy + PartialEq;
    /// `DIR_*`.
    fn direction(&self) -> u8;
    /// `REWRITE_*` bits.
    fn rewrite(&self) -> u8;
    /// `CT_*` state bits.
    fn state(&self) -> u8;
    /// Coarse monotonic time of a recent packet.
    fn last_seen_ns(&self) -> u64;
    /// The translated destination.
    fn dst(&self) -> (Self::Addr, u16);
    /// The translated source.
    fn src(&self) -> (Self::Addr, u16);
    /// Records new state bits and the time they were seen.
    fn set_state(&mut self, state: u8, now_ns: u64);
    /// Records the time of a packet (see [`needs_refresh`]).
    fn set_last_seen(&mut self, now_ns: u64);
    /// The flow's (service id, backend id).
    fn service_backend(&self) -> (u32, u32);
    /// Bytes counted on this entry (this direction of the flow).
    fn bytes(&self) -> u64;
}

macro_rules! impl_ct_entry {
    ($($entry:ty => $addr:ty),*) => {$(
        impl CtEntry for $entry {
            type Addr = $addr;
            #[inline(always)]
            fn direction(&self) -> u8 {
                self.direction
            }
            #[inline(always)]
            fn rewrite(&self) -> u8 {
                self.rewrite
            }
            #[inline(always)]
            fn state(&self) -> u8 {
                self.state
            }
            #[inline(always)]
            fn last_seen_ns(&self) -> u64 {
                self.last_seen_ns
            }
            #[inline(always)]
            fn dst(&self) -> ($addr, u16) {
                (self.dst_addr, self.dst_port)
            }
            #[inline(always)]
            fn src(&self) -> ($addr, u16) {
                (self.src_addr, self.src_port)
            }
            #[inline(always)]
            fn set_state(&mut self, state: u8, now_ns: u64) {
                self.state = state;
                self.last_seen_ns = now_ns;
            }
            #[inline(always)]
            fn set_last_seen(&mut self, now_ns: u64) {
                self.last_seen_ns = now_ns;
            }
            #[inline(always)]
            fn service_backend(&self) -> (u32, u32) {
                (self.service_id, self.backend_id)
            }
            #[inline(always)]
            fn bytes(&self) -> u64 {
                self.bytes
            }
        }
    )*};
}
impl_ct_entry!(Lb4CtEntry => [u8; 4], Lb6CtEntry => [u8; 16]);

/// The tuple of the other direction's entry of the flow whose entry at
/// `(src, dst, src_port, dst_port)` is `entry`: a forward entry's reply
/// comes from the backend to the client (or to the SNAT address); a reply
/// entry's forward packets come from the client (what the reply's
/// destination is rewritten back to, or that destination itself) to the
/// frontend (what the reply's source becomes). Returns
/// `(src, dst, src_port, dst_port)` of the peer.
#[inline(always)]
pub fn peer_tuple<E: CtEntry>(
    entry: &E,
    (src, dst): (E::Addr, E::Addr),
    (src_port, dst_port): (u16, u16),
) -> (E::Addr, E::Addr, u16, u16) {
    let translated = entry.rewrite() & REWRITE_SRC != 0;
    if entry.direction() == DIR_FORWARD {
        let (backend, backend_port) = entry.dst();
        let (to, to_port) = if translated {
            entry.src()
        } else {
            (src, src_port)
        };
        (backend, to, backend_port, to_port)
    } else {
        let (client, client_port) = if entry.rewrite() & REWRITE_DST != 0 {
            entry.dst()
        } else {
            (dst, dst_port)
        };
        let (frontend, frontend_port) = entry.src();
        (client, frontend, client_port, frontend_port)
    }
}
