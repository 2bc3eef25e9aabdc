//! `LB_STATS_V1`: per-CPU packet and byte counters, one slot per verdict or
//! drop reason.

use bytemuck::{Pod, Zeroable};

use crate::{assert_layout, user_pod};

/// Pinned name of the stats map.
pub const NAME: &str = "LB_STATS_V1";
/// Number of counter slots (room for reasons added later).
pub const MAX_ENTRIES: u32 = 64;

/// Packets and bytes counted under one reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counter {
    /// Packets.
    pub packets: u64,
    /// Bytes (skb length as the program saw it).
    pub bytes: u64,
}
assert_layout!(Counter, size = 16, packets = 0, bytes = 8);

user_pod!(Counter);

/// Not a packet reason: the slot where the agent counts map inserts it
/// could not make because a map was full, so `lbctl stats` (which reads
/// only the pinned maps) can report them. Written by user space on CPU 0.
pub const AGENT_MAP_FULL: u32 = 40;
const _: () = assert!(AGENT_MAP_FULL < MAX_ENTRIES);
/// Not a packet reason: the slot where the agent counts the sockets it
/// destroyed because their socket-level backend left the service (UDP
/// sockets connected to a removed backend). Written by user space on CPU 0.
pub const AGENT_SOCK_DESTROYED: u32 = 41;
const _: () = assert!(AGENT_SOCK_DESTROYED < MAX_ENTRIES);

/// Why a packet got its verdict. Values below [`Reason::FIRST_DROP`] pass the
/// packet on; the rest drop it. The discriminant is the counter's index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Neither IPv4 nor IPv6 (the name predates IPv6 support).
    PassNotIpv4 = 0,
    /// IPv4 or IPv6 but neither TCP, UDP nor SCTP.
    PassOtherL4 = 1,
    /// A non-first IPv4 or IPv6 fragment (no L4 header to read).
    PassFragment = 2,
    /// TCP, UDP or SCTP not addressed to a service and not part of a tracked flow.
    PassNotService = 3,
    /// First packet of a flow: backend chosen, destination translated.
    NewFlow = 4,
    /// Established flow, forward direction translated.
    CtForward = 5,
    /// Established flow, reply translated back to the frontend.
    CtReply = 6,
    /// First packet of a flow: the client's session-affinity backend.
    NewFlowAffinity = 7,
    /// First packet of a flow: the backend came from the Maglev table.
    NewFlowMaglev = 9,
    /// An ICMP error about a tracked flow, translated like the flow's
    /// packets (outer and quoted headers).
    IcmpErrorTranslated = 10,
    /// An IPv6 packet whose extension-header chain is longer than the
    /// parser walks (a constant bound for the verifier): passed untouched.
    PassExtHeaderLimit = 11,
    /// A non-first fragment of a translated datagram: its addresses
    /// rewritten as its first fragment's (`LB4_FRAGS_V1`, `LB6_FRAGS_V1`).
    PassFragmentTranslated = 12,
    /// The service has no usable backend.
    DropNoBackend = 16,
    /// A header ended before the packet did.
    DropMalformed = 17,
    /// The conntrack entry could not be written.
    DropCtFull = 18,
    /// A slot or backend the service entry points at is missing.
    DropBackendMissing = 19,
    /// A rewrite or checksum helper failed.
    DropRewrite = 20,
    /// externalTrafficPolicy Local and this node has no endpoint.
    DropNoLocalBackend = 21,
    /// The client is outside the service's loadBalancerSourceRanges.
    DropSourceRange = 22,
    /// SNAT was needed but the agent has not configured a node address.
    DropNoNodeAddress = 23,
    /// A connection attempt to a ClusterIP on a port no frontend defines.
    DropUnknownPort = 24,
    /// Socket-level balancing translated a connect() or a datagram.
    SockTranslated = 8,
    /// Socket-level balancing refused a connect() (no endpoint).
    SockRefused = 25,
    /// Every SNAT port tried for a new flow is held by a live flow to the
    /// same backend (the pool of that backend and SNAT address is used up).
    DropSnatExhausted = 26,
    /// A non-first fragment addressed to a ClusterIP whose first fragment
    /// was not seen (lost, evicted, or arriving later): it cannot be
    /// translated, and untranslated it could only be misdelivered.
    DropFragmentUnknown = 27,
    /// A reject (ICMP port unreachable) above the per-CPU rate limit
    /// (`LB_REJECT_LIMIT_V1`): the packet is dropped unanswered.
    DropRejectRateLimited = 28,
    /// The first fragment of an SCTP datagram whose ports a translation
    /// changes: SCTP's CRC32c covers the whole datagram, whose length the
    /// first fragment does not carry, so its checksum cannot be updated.
    DropSctpFragment = 32,
}

impl Reason {
    /// Reasons at or above this index drop the packet.
    pub const FIRST_DROP: u32 = 16;

    /// Every reason, for readers that list all counters.
    pub const ALL: [Reason; 27] = [
        Reason::PassNotIpv4,
        Reason::PassOtherL4,
        Reason::PassFragment,
        Reason::PassNotService,
        Reason::NewFlow,
        Reason::CtForward,
        Reason::CtReply,
        Reason::NewFlowAffinity,
        Reason::NewFlowMaglev,
        Reason::IcmpErrorTranslated,
        Reason::PassExtHeaderLimit,
        Reason::PassFragmentTranslated,
        Reason::SockTranslated,
        Reason::DropNoBackend,
        Reason::DropMalformed,
        Reason::DropCtFull,
        Reason::DropBackendMissing,
        Reason::DropRewrite,
        Reason::DropNoLocalBackend,
        Reason::DropSourceRange,
        Reason::DropNoNodeAddress,
        Reason::DropUnknownPort,
        Reason::SockRefused,
        Reason::DropSnatExhausted,
        Reason::DropFragmentUnknown,
        Reason::DropRejectRateLimited,
        Reason::DropSctpFragment,
    ];

    /// Stable name for metrics and `lbctl stats`.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIpv4 => "pass_not_ipv4",
            Reason::PassOtherL4 => "pass_other_l4",
            Reason::PassFragment => "pass_fragment",
            Reason::PassNotService => "pass_not_service",
            Reason::NewFlow => "new_flow",
            Reason::CtForward => "ct_forward",
            Reason::CtReply => "ct_reply",
            Reason::NewFlowAffinity => "new_flow_affinity",
            Reason::NewFlowMaglev => "new_flow_maglev",
            Reason::IcmpErrorTranslated => "icmp_error_translated",
            Reason::PassExtHeaderLimit => "pass_ext_header_limit",
            Reason::PassFragmentTranslated => "pass_fragment_translated",
            Reason::SockTranslated => "sock_translated",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropMalformed => "drop_malformed",
            Reason::DropCtFull => "drop_ct_full",
            Reason::DropBackendMissing => "drop_backend_missing",
            Reason::DropRewrite => "drop_rewrite",
            Reason::DropNoLocalBackend => "drop_no_local_backend",
            Reason::DropSourceRange => "drop_source_range",
            Reason::DropNoNodeAddress => "drop_no_node_address",
            Reason::DropUnknownPort => "drop_unknown_port",
            Reason::SockRefused => "sock_refused",
            Reason::DropSnatExhausted => "drop_snat_exhausted",
            Reason::DropFragmentUnknown => "drop_fragment_unknown",
            Reason::DropRejectRateLimited => "drop_reject_rate_limited",
            Reason::DropSctpFragment => "drop_sctp_fragment",
        }
    }

    /// Whether packets under this reason are dropped.
    pub const fn is_drop(self) -> bool {
        self as u32 >= Self::FIRST_DROP
    }
}

const _: () = assert!((Reason::DropRejectRateLimited as u32) < MAX_ENTRIES);
const _: () = assert!((Reason::DropSctpFragment as u32) < MAX_ENTRIES);
