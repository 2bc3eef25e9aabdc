//! `LB_CONFIG_V3`: node-wide settings the agent writes once and the programs
//! read per packet (a one-entry array). `LB6_CONFIG_V1` holds the node's
//! IPv6 address beside it, so the IPv4 layout did not change for IPv6.
//! `_V3` added the conntrack timeouts.

use bytemuck::{Pod, Zeroable};

use crate::{assert_layout, conntrack::CtTimeouts, user_pod};

/// Pinned name of the config map.
pub const NAME: &str = "LB_CONFIG_V3";
/// One entry, at index 0.
pub const MAX_ENTRIES: u32 = 1;

/// Write a [`crate::trace::TraceEvent`] per new flow and per drop into
/// `LB_TRACE_V2`. Set by `lbctl trace` while it runs; the agent preserves it.
pub const FLAG_TRACE: u32 = 1;
/// Log a line per new flow and per drop with aya-log (agent `--bpf-log`).
pub const FLAG_LOG: u32 = 2;
/// The bits only the agent's `--bpf-log` setting owns; everything else in
/// `flags` belongs to whoever set it (`lbctl trace`), and the agent keeps it
/// when it rewrites the node address.
pub const AGENT_OWNED_FLAGS: u32 = FLAG_LOG;

/// Node-wide settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct LbConfig {
    /// The node's IPv4 address, network order: the source of SNAT for
    /// traffic from outside balanced to a backend on another node.
    pub node_addr4: [u8; 4],
    /// `FLAG_*` bits.
    pub flags: u32,
    /// M of every Maglev table ([`crate::maglev`]); 0 when the agent runs
    /// without `--lb-algorithm maglev`. Part of each table's key, so tables
    /// built for another size are never read.
    pub maglev_table_size: u32,
    /// Explicit padding, always zero.
    pub _pad: u32,
    /// How long conntrack entries live, per state.
    pub ct: CtTimeouts,
}
assert_layout!(
    LbConfig,
    size = 48,
    node_addr4 = 0,
    flags = 4,
    maglev_table_size = 8,
    _pad = 12,
    ct = 16
);

/// Pinned name of the IPv6 settings map.
pub const NAME6: &str = "LB6_CONFIG_V1";

/// Node-wide IPv6 settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Lb6Config {
    /// The node's IPv6 address, network order: the source of SNAT for IPv6
    /// traffic from outside balanced to a backend on another node; all
    /// zeros when the node has none.
    pub node_addr6: [u8; 16],
}
assert_layout!(Lb6Config, size = 16, node_addr6 = 0);

user_pod!(LbConfig, Lb6Config);
