//! This node's addresses as the datapath needs them: where NodePorts open
//! (`--nodeport-addresses`) and which address SNAT uses. Pure: the agent
//! lists the interfaces, this decides.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::kube_proxy::NodePortAddresses;

/// The node's addresses, decided from its interfaces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAddresses {
    /// Addresses NodePort frontends open on.
    pub nodeport: Vec<IpAddr>,
    /// Source address for SNAT of traffic from outside sent to another
    /// node's backend: the first IPv4 address of the node devices.
    pub snat4: Option<Ipv4Addr>,
    /// The same for IPv6: the first usable (not link-local) IPv6 address
    /// of the node devices.
    pub snat6: Option<Ipv6Addr>,
}

/// The Node object's addresses as kube-proxy ranks them for its primary
/// IPs: InternalIP first, then ExternalIP (`status.addresses`).
pub fn node_ips(node: &k8s_openapi::api::core::v1::Node) -> Vec<IpAddr> {
    let addresses = node
        .status
        .as_ref()
        .and_then(|status| status.addresses.as_deref())
        .unwrap_or_default();
    ["InternalIP", "ExternalIP"]
        .iter()
        .flat_map(|kind| {
            addresses
                .iter()
                .filter(move |a| a.type_ == *kind)
                .filter_map(|a| a.address.parse().ok())
        })
        .collect()
}

fn usable(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_unspecified(),
        // Link-local IPv6 needs a zone to be reached; nobody sends to a
        // NodePort that way.
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unspecified() && !v6.is_unicast_link_local(),
    }
}

/// `interfaces`: name -> addresses. `devices`: `--devices` (the node's
/// network-facing interfaces; when empty, every interface but loopback).
/// `selector`: `--nodeport-addresses`; unset, NodePorts open on the node
/// devices' addresses; CIDRs, on every local address inside one of the
/// ranges (kube-proxy's rule); `primary`, on the node's primary address of
/// each family: the Node object's (`node_ips`, InternalIP first, as
/// kube-proxy reads them), else the first address of the first device.
pub fn node_addresses(
    interfaces: &BTreeMap<String, Vec<IpAddr>>,
    devices: &[String],
    selector: &NodePortAddresses,
    node_ips: &[IpAddr],
) -> NodeAddresses {
    let on_devices: Vec<IpAddr> = if devices.is_empty() {
        interfaces
            .iter()
            .filter(|(name, _)| name.as_str() != "lo")
            .flat_map(|(_, addrs)| addrs.iter().copied())
            .filter(usable)
            .collect()
    } else {
        devices
            .iter()
            .filter_map(|d| interfaces.get(d))
            .flatten()
            .copied()
            .filter(usable)
            .collect()
    };
    let mut nodeport: Vec<IpAddr> = match selector {
        NodePortAddresses::Devices => on_devices.clone(),
        NodePortAddresses::Cidrs(cidrs) => interfaces
            .values()
            .flatten()
            .copied()
            .filter(|addr| usable(addr) && cidrs.iter().any(|r| r.contains(*addr)))
            .collect(),
        NodePortAddresses::Primary => [true, false]
            .into_iter()
            .filter_map(|v4| {
                let family = |addr: &&IpAddr| addr.is_ipv4() == v4 && usable(addr);
                node_ips
                    .iter()
                    .find(family)
                    .or_else(|| on_devices.iter().find(family))
                    .copied()
            })
            .collect(),
    };
    nodeport.sort();
    nodeport.dedup();
    let snat4 = on_devices.iter().find_map(|addr| match addr {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    });
    let snat6 = on_devices.iter().find_map(|addr| match addr {
        IpAddr::V4(_) => None,
        IpAddr::V6(v6) => Some(*v6),
    });
    NodeAddresses {
        nodeport,
        snat4,
        snat6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_cidr;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    fn interfaces() -> BTreeMap<String, Vec<IpAddr>> {
        let ip = |s: &str| s.parse::<IpAddr>().expect("address");
        BTreeMap::from([
            ("lo".to_string(), vec![ip("127.0.0.1"), ip("::1")]),
            (
                "eth0".to_string(),
                vec![ip("198.51.100.11"), ip("fe80::1"), ip("2001:db8::11")],
            ),
            ("eth1".to_string(), vec![ip("192.168.50.3")]),
            ("lbv1".to_string(), vec![ip("10.244.1.1")]),
        ])
    }

    #[test]
    fn node_ports_open_on_the_node_devices_by_default() {
        let a = node_addresses(
            &interfaces(),
            &["eth0".into()],
            &NodePortAddresses::Devices,
            &[],
        );
        let want: Vec<IpAddr> = vec![
            "198.51.100.11".parse().unwrap(),
            "2001:db8::11".parse().unwrap(),
        ];
        assert_eq!(a.nodeport, want);
        assert_eq!(a.snat4, Some(Ipv4Addr::new(198, 51, 100, 11)));
        // Not the link-local fe80::1.
        assert_eq!(a.snat6, Some("2001:db8::11".parse().unwrap()));
    }

    #[test]
    fn nodeport_addresses_select_by_cidr_across_interfaces() {
        let cidrs = NodePortAddresses::Cidrs(vec![
            parse_cidr("192.168.0.0/16").unwrap(),
            parse_cidr("10.244.1.1/32").unwrap(),
        ]);
        let a = node_addresses(&interfaces(), &["eth0".into()], &cidrs, &[]);
        let want: Vec<IpAddr> = vec![
            "10.244.1.1".parse().unwrap(),
            "192.168.50.3".parse().unwrap(),
        ];
        assert_eq!(a.nodeport, want);
        // SNAT still leaves through the node device.
        assert_eq!(a.snat4, Some(Ipv4Addr::new(198, 51, 100, 11)));
    }

    #[test]
    fn without_devices_every_interface_but_loopback_counts() {
        let a = node_addresses(&interfaces(), &[], &NodePortAddresses::Devices, &[]);
        assert!(!a.nodeport.iter().any(|addr| addr.is_loopback()));
        assert_eq!(a.nodeport.len(), 4, "{:?}", a.nodeport);
    }

    #[test]
    fn primary_is_the_nodes_address_of_each_family() {
        let devices = ["eth1".to_string(), "eth0".to_string()];
        // The Node object's InternalIP wins (kube-proxy reads it there).
        let a = node_addresses(
            &interfaces(),
            &devices,
            &NodePortAddresses::Primary,
            &[ip("192.168.50.3"), ip("198.51.100.11")],
        );
        // No IPv6 in the Node: the first device with one gives it.
        assert_eq!(a.nodeport, vec![ip("192.168.50.3"), ip("2001:db8::11")]);
        // Without a Node: the first address of the first device per family.
        let a = node_addresses(&interfaces(), &devices, &NodePortAddresses::Primary, &[]);
        assert_eq!(a.nodeport, vec![ip("192.168.50.3"), ip("2001:db8::11")]);
        let a = node_addresses(
            &interfaces(),
            &["eth0".into()],
            &NodePortAddresses::Primary,
            &[],
        );
        assert_eq!(a.nodeport, vec![ip("198.51.100.11"), ip("2001:db8::11")]);
    }
}
