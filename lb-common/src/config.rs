//! `LB_CONFIG_V1`: node-wide settings the agent writes once and the programs
//! read per packet (a one-entry array).

use bytemuck::{Pod, Zeroable};

use crate::{assert_layout, user_pod};

/// Pinned name of the config map.
pub const NAME: &str = "LB_CONFIG_V1";
/// One entry, at index 0.
pub const MAX_ENTRIES: u32 = 1;

/// Node-wide settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct LbConfig {
    /// The node's IPv4 address, network order: the source of SNAT for
    /// traffic from outside balanced to a backend on another node.
    pub node_addr4: [u8; 4],
    /// `FLAG_*` bits.
    pub flags: u32,
}
assert_layout!(LbConfig, size = 8, node_addr4 = 0, flags = 4);

user_pod!(LbConfig);
