//! Traffic policy decisions: source ranges, and when the source address
//! must be translated (externalTrafficPolicy Cluster to another node).

use aya_ebpf::btf_maps::lpm_trie::Key;
use lb_common::{
    backend::{FLAG_LOCAL, Lb4Backend, Lb6Backend},
    conntrack::Lb4CtKey,
    service::{FLAG_LOCAL_ONLY, FLAG_SOURCE_RANGES, Lb4Service},
    source_range::{Lb4SourceRangeKey, Lb6SourceRangeKey, SERVICE_ID_BITS},
    stats::Reason,
};

use crate::{
    Hook, LB_CONFIG_V3, LB4_SRC_RANGES_V1, LB6_CONFIG_V1, LB6_SRC_RANGES_V1,
    ct::{Snat, Snat6},
};

/// Drops a new flow whose client is outside the service's
/// loadBalancerSourceRanges.
#[inline(always)]
pub fn check_source_range(service: &Lb4Service, flow: &Lb4CtKey) -> Result<(), Reason> {
    if service.flags & FLAG_SOURCE_RANGES == 0 {
        return Ok(());
    }
    let key = Key::new(
        SERVICE_ID_BITS + 32,
        Lb4SourceRangeKey {
            service_id_be: service.service_id.to_be_bytes(),
            addr: flow.src_addr,
        },
    );
    match LB4_SRC_RANGES_V1.get(&key) {
        Some(_) => Ok(()),
        None => Err(Reason::DropSourceRange),
    }
}

/// [`check_source_range`] for an IPv6 client, in `LB6_SRC_RANGES_V1`.
#[inline(always)]
pub fn check_source_range6(service: &Lb4Service, client: &[u8; 16]) -> Result<(), Reason> {
    if service.flags & FLAG_SOURCE_RANGES == 0 {
        return Ok(());
    }
    let key = Key::new(
        SERVICE_ID_BITS + 128,
        Lb6SourceRangeKey {
            service_id_be: service.service_id.to_be_bytes(),
            addr: *client,
        },
    );
    match LB6_SRC_RANGES_V1.get(&key) {
        Some(_) => Ok(()),
        None => Err(Reason::DropSourceRange),
    }
}

/// Traffic from outside balanced to a backend on another node must leave
/// with this node's address, or the reply would skip the reverse
/// translation here. externalTrafficPolicy Local never gets here with a
/// remote backend, and keeps the client address by design.
#[inline(always)]
fn needs_snat(service: &Lb4Service, backend_flags: u8, hook: Hook) -> bool {
    hook == Hook::FromNetwork
        && service.flags & FLAG_LOCAL_ONLY == 0
        && backend_flags & FLAG_LOCAL == 0
}

/// The node address SNAT uses; a node without one cannot SNAT.
#[inline(always)]
fn node_addr() -> Result<[u8; 4], Reason> {
    match LB_CONFIG_V3.get(0) {
        Some(config) if config.node_addr4 != [0; 4] => Ok(config.node_addr4),
        _ => Err(Reason::DropNoNodeAddress),
    }
}

/// The source translation a new flow needs, if any: the node address for
/// traffic from outside to another node's backend, the hairpin address for
/// a pod balanced to itself (its own address as both ends would never
/// leave the pod's stack).
#[inline(always)]
pub fn snat_for(
    service: &Lb4Service,
    backend: &Lb4Backend,
    flow: &Lb4CtKey,
    hook: Hook,
) -> Result<Option<Snat>, Reason> {
    if needs_snat(service, backend.flags, hook) {
        return Ok(Some(Snat::Node(node_addr()?)));
    }
    if hook == Hook::FromPod && backend.addr == flow.src_addr {
        return Ok(Some(Snat::Hairpin));
    }
    Ok(None)
}

/// The source translation a new IPv6 flow needs, as [`snat_for`]: the
/// node's IPv6 address (`LB6_CONFIG_V1`) for traffic from outside to
/// another node's backend (`drop_no_node_address` when the node has none),
/// the IPv6 hairpin address for a pod balanced to itself.
#[inline(always)]
pub fn snat6_for(
    service: &Lb4Service,
    backend: &Lb6Backend,
    client: &[u8; 16],
    hook: Hook,
) -> Result<Option<Snat6>, Reason> {
    if needs_snat(service, backend.flags, hook) {
        return match LB6_CONFIG_V1.get(0) {
            Some(config) if config.node_addr6 != [0; 16] => {
                Ok(Some(Snat6::Node(&config.node_addr6)))
            }
            _ => Err(Reason::DropNoNodeAddress),
        };
    }
    if hook == Hook::FromPod && backend.addr == *client {
        return Ok(Some(Snat6::Hairpin));
    }
    Ok(None)
}
