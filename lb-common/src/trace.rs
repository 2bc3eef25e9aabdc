//! `LB_TRACE_V2`: a ring buffer of flow-trace events, written by the
//! programs only while the agent's config has [`crate::config::FLAG_TRACE`]
//! (set by `lbctl trace` for as long as it runs): one event per new flow
//! (which backend and why) and one per drop (with its reason).

use bytemuck::{Pod, Zeroable};

use crate::{assert_layout, user_pod};

/// Pinned name of the trace ring buffer.
pub const NAME: &str = "LB_TRACE_V2";
/// Size of the ring buffer in bytes (a power of two, a multiple of the page
/// size): room for about 5000 events between two reads.
pub const RING_BYTES: u32 = 256 * 1024;

/// A new flow was given a backend.
pub const EVENT_NEW_FLOW: u8 = 1;
/// A packet was dropped; [`TraceEvent::reason`] says why.
pub const EVENT_DROP: u8 = 2;

/// No backend was selected (drops).
pub const SELECT_NONE: u8 = 0;
/// Uniformly random among the service's backends.
pub const SELECT_RANDOM: u8 = 1;
/// The client's session-affinity entry named the backend.
pub const SELECT_AFFINITY: u8 = 2;
/// Random among node-local backends only (externalTrafficPolicy Local).
pub const SELECT_LOCAL: u8 = 3;
/// The service's Maglev table named the backend (`hash(5-tuple) % M`).
pub const SELECT_MAGLEV: u8 = 4;

/// [`TraceEvent::family`] of an IPv4 packet: its addresses fill the first
/// four bytes of the address fields, the rest is zero.
pub const FAMILY_IPV4: u8 = 4;
/// [`TraceEvent::family`] of an IPv6 packet.
pub const FAMILY_IPV6: u8 = 6;

/// The packet came from a pod-facing device.
pub const HOOK_POD: u8 = 1;
/// The packet came from a node device (TC or XDP).
pub const HOOK_NETWORK: u8 = 2;
/// The packet left the node's own stack (egress of a pod or node device).
pub const HOOK_HOST: u8 = 3;

/// One trace event. Addresses network order, ports host order, as in the
/// maps; both families in one layout (version 2: version 1 had 4-byte
/// addresses only).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TraceEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub timestamp_ns: u64,
    /// Client (source) address as received.
    pub src_addr: [u8; 16],
    /// Destination (frontend) address as received.
    pub dst_addr: [u8; 16],
    /// Backend address (new flows).
    pub backend_addr: [u8; 16],
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Backend port (new flows).
    pub backend_port: u16,
    /// IANA protocol number.
    pub proto: u8,
    /// `EVENT_*`.
    pub kind: u8,
    /// `SELECT_*`: how the backend was chosen.
    pub selection: u8,
    /// `HOOK_*`.
    pub hook: u8,
    /// `FAMILY_*`: how long the addresses are.
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
    /// [`crate::stats::Reason`] of the verdict.
    pub reason: u32,
    /// Service the packet matched, 0 if none.
    pub service_id: u32,
    /// Backend chosen, 0 if none.
    pub backend_id: u32,
}
assert_layout!(
    TraceEvent,
    size = 80,
    timestamp_ns = 0,
    src_addr = 8,
    dst_addr = 24,
    backend_addr = 40,
    src_port = 56,
    dst_port = 58,
    backend_port = 60,
    proto = 62,
    kind = 63,
    selection = 64,
    hook = 65,
    family = 66,
    _pad = 67,
    reason = 68,
    service_id = 72,
    backend_id = 76
);

user_pod!(TraceEvent);
