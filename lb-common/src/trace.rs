//! `LB_TRACE_V1`: a ring buffer of flow-trace events, written by the
//! programs only while the agent's config has [`crate::config::FLAG_TRACE`]
//! (set by `lbctl trace` for as long as it runs): one event per new flow
//! (which backend and why) and one per drop (with its reason).

use bytemuck::{Pod, Zeroable};

use crate::{assert_layout, user_pod};

/// Pinned name of the trace ring buffer.
pub const NAME: &str = "LB_TRACE_V1";
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

/// The packet came from a pod-facing device.
pub const HOOK_POD: u8 = 1;
/// The packet came from a node device (TC or XDP).
pub const HOOK_NETWORK: u8 = 2;

/// One trace event. Addresses network order, ports host order, as in the maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TraceEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub timestamp_ns: u64,
    /// Client (source) address as received.
    pub src_addr: [u8; 4],
    /// Destination (frontend) address as received.
    pub dst_addr: [u8; 4],
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// IANA protocol number.
    pub proto: u8,
    /// `EVENT_*`.
    pub kind: u8,
    /// `SELECT_*`: how the backend was chosen.
    pub selection: u8,
    /// `HOOK_*`.
    pub hook: u8,
    /// [`crate::stats::Reason`] of the verdict.
    pub reason: u32,
    /// Service the packet matched, 0 if none.
    pub service_id: u32,
    /// Backend chosen, 0 if none.
    pub backend_id: u32,
    /// Backend address (new flows).
    pub backend_addr: [u8; 4],
    /// Backend port (new flows).
    pub backend_port: u16,
    /// Explicit padding, always zero (the event is 8-byte aligned).
    pub _pad: [u8; 6],
}
assert_layout!(
    TraceEvent,
    size = 48,
    timestamp_ns = 0,
    src_addr = 8,
    dst_addr = 12,
    src_port = 16,
    dst_port = 18,
    proto = 20,
    kind = 21,
    selection = 22,
    hook = 23,
    reason = 24,
    service_id = 28,
    backend_id = 32,
    backend_addr = 36,
    backend_port = 40,
    _pad = 42
);

user_pod!(TraceEvent);
