//! This node's addresses as the datapath needs them: where NodePorts open
//! (`--nodeport-addresses`) and which address SNAT uses. Pure: the agent
//! lists the interfaces, this decides.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::model::SourceRange;

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
/// `nodeport_cidrs`: `--nodeport-addresses`; when empty, NodePorts open on
/// the node devices' addresses, otherwise on every local address inside one
/// of the ranges (kube-proxy's rule).
pub fn node_addresses(
    interfaces: &BTreeMap<String, Vec<IpAddr>>,
    devices: &[String],
    nodeport_cidrs: &[SourceRange],
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
    let mut nodeport: Vec<IpAddr> = if nodeport_cidrs.is_empty() {
        on_devices.clone()
    } else {
        interfaces
            .values()
            .flatten()
            .copied()
            .filter(|addr| usable(addr) && nodeport_cidrs.iter().any(|r| r.contains(*addr)))
            .collect()
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
        let a = node_addresses(&interfaces(), &["eth0".into()], &[]);
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
        let cidrs = [
            parse_cidr("192.168.0.0/16").unwrap(),
            parse_cidr("10.244.1.1/32").unwrap(),
        ];
        let a = node_addresses(&interfaces(), &["eth0".into()], &cidrs);
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
        let a = node_addresses(&interfaces(), &[], &[]);
        assert!(!a.nodeport.iter().any(|addr| addr.is_loopback()));
        assert_eq!(a.nodeport.len(), 4, "{:?}", a.nodeport);
    }
}
