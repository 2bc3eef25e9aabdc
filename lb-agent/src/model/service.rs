//! Service objects to frontends: whether a service is ours to proxy, its
//! validated addresses, ports and session affinity.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};

use super::{Frontend, FrontendKind, ModelError, NodeIdentity, Protocol, ServiceRef, SourceRange};
use crate::source::ObjectKey;

/// Label that hands a service to a specific proxy implementation.
const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;
/// The API's bounds for that timeout (one day at most).
const AFFINITY_TIMEOUT_RANGE: std::ops::RangeInclusive<i32> = 1..=86400;

/// A service that is ours to proxy, with only its valid parts.
pub(super) struct ParsedService {
    pub service: ServiceRef,
    /// `Service namespace/name`, for errors.
    pub object: String,
    /// Distinct cluster IPs, in the order of `spec.clusterIPs`.
    pub cluster_ips: Vec<IpAddr>,
    /// Valid ports, first of each (port, protocol) only.
    pub ports: Vec<ParsedPort>,
    pub affinity_timeout: Option<u32>,
    /// Valid `status.loadBalancer.ingress[].ip` with ipMode VIP or unset.
    pub load_balancer_ips: Vec<IpAddr>,
    /// Valid `spec.externalIPs`.
    pub external_ips: Vec<IpAddr>,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `spec.healthCheckNodePort` of a Local LoadBalancer service.
    pub health_check_node_port: Option<u16>,
    /// Valid `spec.loadBalancerSourceRanges`.
    pub source_ranges: Vec<SourceRange>,
}

/// One valid entry of `spec.ports`.
pub(super) struct ParsedPort {
    /// `spec.ports[i]`, for errors about this port.
    pub field: String,
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    /// A valid `nodePort` of a NodePort or LoadBalancer service.
    pub node_port: Option<u16>,
}

impl ParsedService {
    /// The frontends one service port opens: its cluster IPs, its node port
    /// on every NodePort address of this node, and its LoadBalancer and
    /// external IPs.
    pub fn frontends(
        &self,
        port: &ParsedPort,
        node: &NodeIdentity,
    ) -> Vec<(Frontend, FrontendKind)> {
        let at = |addr, number| Frontend::new(addr, number, port.protocol);
        let mut out: Vec<(Frontend, FrontendKind)> = self
            .cluster_ips
            .iter()
            .map(|&addr| (at(addr, port.port), FrontendKind::ClusterIp))
            .collect();
        if let Some(node_port) = port.node_port {
            // NodePorts open on the node addresses of the service's families.
            out.extend(
                node.nodeport_addresses
                    .iter()
                    .filter(|addr| {
                        self.cluster_ips
                            .iter()
                            .any(|c| c.is_ipv4() == addr.is_ipv4())
                    })
                    .map(|&addr| (at(addr, node_port), FrontendKind::NodePort)),
            );
        }
        out.extend(
            self.load_balancer_ips
                .iter()
                .map(|&addr| (at(addr, port.port), FrontendKind::LoadBalancer)),
        );
        out.extend(
            self.external_ips
                .iter()
                .map(|&addr| (at(addr, port.port), FrontendKind::ExternalIp)),
        );
        out
    }
}

/// Validates a service; `None` when it is not ours to proxy or cannot be
/// programmed at all (the reason, if it is an error, is pushed).
pub(super) fn parse_service(
    key: &ObjectKey,
    service: &Service,
    node: &NodeIdentity,
    errors: &mut Vec<ModelError>,
) -> Option<ParsedService> {
    if !is_ours(service.metadata.labels.as_ref(), node) {
        return None;
    }
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let object = format!("Service {key}");
    let cluster_ips = match cluster_ips(spec) {
        Ok(addresses) => addresses,
        Err((field, message)) => {
            errors.push(ModelError::new(&object, field, message));
            return None;
        }
    };
    // Headless, or not allocated yet: nothing to match packets on.
    if cluster_ips.is_empty() {
        return None;
    }
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    let opens_node_ports = matches!(type_, "NodePort" | "LoadBalancer");
    let is_load_balancer = type_ == "LoadBalancer";
    let ports = parse_ports(
        &object,
        spec.ports.as_deref().unwrap_or_default(),
        opens_node_ports.then_some(&node.nodeport_range),
        errors,
    );
    let affinity_timeout = affinity_timeout(&object, spec, errors);
    let load_balancer_ips = if is_load_balancer {
        let found = load_balancer_ips(&object, service, errors);
        of_families(
            &object,
            found,
            &cluster_ips,
            |i| format!("status.loadBalancer.ingress[{i}].ip"),
            errors,
        )
    } else {
        Vec::new()
    };
    let found = addresses(
        &object,
        "spec.externalIPs",
        spec.external_ips.as_deref().unwrap_or_default(),
        errors,
    );
    let external_ips = of_families(
        &object,
        found,
        &cluster_ips,
        |i| format!("spec.externalIPs[{i}]"),
        errors,
    );
    let external_local = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            errors.push(ModelError::new(
                &object,
                "spec.externalTrafficPolicy",
                format!("{other:?} is not Cluster or Local; using Cluster"),
            ));
            false
        }
    };
    let internal_local = match spec.internal_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            errors.push(ModelError::new(
                &object,
                "spec.internalTrafficPolicy",
                format!("{other:?} is not Cluster or Local; using Cluster"),
            ));
            false
        }
    };
    match spec.traffic_distribution.as_deref() {
        // Carried out through the EndpointSlice hints the controller
        // derives from it (see endpoints::select_backends).
        None | Some("PreferClose" | "PreferSameZone" | "PreferSameNode") => {}
        Some(other) => errors.push(ModelError::new(
            &object,
            "spec.trafficDistribution",
            format!(
                "{other:?} is not PreferClose, PreferSameZone or PreferSameNode; hints are used as the slices give them"
            ),
        )),
    }
    let health_check_node_port = match spec.health_check_node_port {
        Some(port) if is_load_balancer && external_local => match port_number(port) {
            Some(port) => Some(port),
            None => {
                errors.push(ModelError::new(
                    &object,
                    "spec.healthCheckNodePort",
                    format!("{port} is out of range 1..=65535"),
                ));
                None
            }
        },
        _ => None,
    };
    let source_ranges = if is_load_balancer {
        source_ranges(
            &object,
            spec.load_balancer_source_ranges
                .as_deref()
                .unwrap_or_default(),
            errors,
        )
    } else {
        Vec::new()
    };
    Some(ParsedService {
        service: ServiceRef {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        },
        object,
        cluster_ips,
        ports,
        affinity_timeout,
        load_balancer_ips,
        external_ips,
        external_local,
        internal_local,
        health_check_node_port,
        source_ranges,
    })
}

/// `status.loadBalancer.ingress[].ip` entries the datapath should serve:
/// ipMode `VIP` or unset. `Proxy` means the load balancer itself proxies to
/// the nodes, so kube-proxy does not capture that address (and neither do we).
fn load_balancer_ips(
    object: &str,
    service: &Service,
    errors: &mut Vec<ModelError>,
) -> Vec<(usize, IpAddr)> {
    let ingress = service
        .status
        .as_ref()
        .and_then(|status| status.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default();
    let mut out = Vec::new();
    for (index, entry) in ingress.iter().enumerate() {
        match entry.ip_mode.as_deref() {
            None | Some("VIP") => {}
            Some("Proxy") => continue,
            Some(other) => {
                errors.push(ModelError::new(
                    object,
                    format!("status.loadBalancer.ingress[{index}].ipMode"),
                    format!("{other:?} is not VIP or Proxy; the address is not programmed"),
                ));
                continue;
            }
        }
        let Some(value) = entry.ip.as_deref() else {
            // A hostname-only ingress has nothing to match packets on.
            continue;
        };
        match value.parse::<IpAddr>() {
            Ok(addr) if !out.iter().any(|(_, a)| *a == addr) => out.push((index, addr)),
            Ok(_) => {}
            Err(_) => errors.push(ModelError::new(
                object,
                format!("status.loadBalancer.ingress[{index}].ip"),
                format!("{value:?} is not an IP address"),
            )),
        }
    }
    out
}

/// A list of addresses; each invalid one is reported and skipped.
fn addresses(
    object: &str,
    field: &str,
    values: &[String],
    errors: &mut Vec<ModelError>,
) -> Vec<(usize, IpAddr)> {
    let mut out: Vec<(usize, IpAddr)> = Vec::new();
    for (index, value) in values.iter().enumerate() {
        match value.parse::<IpAddr>() {
            Ok(addr) if !out.iter().any(|(_, a)| *a == addr) => out.push((index, addr)),
            Ok(_) => {}
            Err(_) => errors.push(ModelError::new(
                object,
                format!("{field}[{index}]"),
                format!("{value:?} is not an IP address"),
            )),
        }
    }
    out
}

/// `spec.loadBalancerSourceRanges`: CIDRs, host bits cleared. An invalid
/// entry is reported and skipped; if every entry is invalid the service is
/// left open rather than closed (the error says so), as kube-proxy does.
fn source_ranges(
    object: &str,
    values: &[String],
    errors: &mut Vec<ModelError>,
) -> Vec<SourceRange> {
    let mut out = Vec::new();
    for (index, value) in values.iter().enumerate() {
        match parse_cidr(value.trim()) {
            Some(range) if !out.contains(&range) => out.push(range),
            Some(_) => {}
            None => errors.push(ModelError::new(
                object,
                format!("spec.loadBalancerSourceRanges[{index}]"),
                format!("{value:?} is not a CIDR (address/prefix length)"),
            )),
        }
    }
    out
}

/// `10.0.0.0/8` or `2001:db8::/32` with host bits cleared; a bare address is
/// a single-host range.
pub fn parse_cidr(value: &str) -> Option<SourceRange> {
    let (addr, len) = match value.split_once('/') {
        Some((addr, len)) => (addr.parse::<IpAddr>().ok()?, Some(len.parse::<u8>().ok()?)),
        None => (value.parse::<IpAddr>().ok()?, None),
    };
    match addr {
        IpAddr::V4(v4) => {
            let len = len.unwrap_or(32);
            if len > 32 {
                return None;
            }
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            Some(SourceRange {
                addr: IpAddr::V4((u32::from(v4) & mask).into()),
                prefix_len: len,
            })
        }
        IpAddr::V6(v6) => {
            let len = len.unwrap_or(128);
            if len > 128 {
                return None;
            }
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            Some(SourceRange {
                addr: IpAddr::V6((u128::from(v6) & mask).into()),
                prefix_len: len,
            })
        }
    }
}

/// kube-proxy's rule: with a proxy name, only services carrying it; without
/// one, only services that name no proxy at all.
fn is_ours(labels: Option<&BTreeMap<String, String>>, node: &NodeIdentity) -> bool {
    let claimed_by = labels.and_then(|labels| labels.get(SERVICE_PROXY_NAME_LABEL));
    claimed_by == node.service_proxy_name.as_ref()
}

/// The service's cluster IPs: all of `spec.clusterIPs` (dual-stack) when
/// set, else `spec.clusterIP`. Empty for headless (`None`) or unallocated
/// services. Any unparseable entry rejects the service: programming a
/// partial address set would hide the mistake.
fn cluster_ips(spec: &ServiceSpec) -> Result<Vec<IpAddr>, (String, String)> {
    let (field, values): (&str, Vec<&str>) = match spec.cluster_ips.as_deref() {
        Some(list) if !list.is_empty() => {
            ("spec.clusterIPs", list.iter().map(String::as_str).collect())
        }
        _ => (
            "spec.clusterIP",
            spec.cluster_ip.as_deref().into_iter().collect(),
        ),
    };
    let mut addresses = Vec::new();
    for (index, value) in values.iter().enumerate() {
        if value.is_empty() || *value == "None" {
            // "None" marks a headless service; it stands alone in the list.
            return Ok(Vec::new());
        }
        let field = if field == "spec.clusterIPs" {
            format!("{field}[{index}]")
        } else {
            field.to_owned()
        };
        let addr: IpAddr = value
            .parse()
            .map_err(|_| (field, format!("{value:?} is not an IP address")))?;
        if !addresses.contains(&addr) {
            addresses.push(addr);
        }
    }
    check_families(spec, &addresses)?;
    Ok(addresses)
}

fn family_name(addr: &IpAddr) -> &'static str {
    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// The cluster IPs against the service's family fields, as the API server
/// allocates them: at most one address per family, `spec.clusterIP` equal
/// to the first, each address of the family `spec.ipFamilies` names at its
/// index, and as many families as `spec.ipFamilyPolicy` allows.
fn check_families(spec: &ServiceSpec, addresses: &[IpAddr]) -> Result<(), (String, String)> {
    if addresses.len() > 2 {
        return Err((
            "spec.clusterIPs".into(),
            format!("{} addresses: at most one per family", addresses.len()),
        ));
    }
    if let [first, second] = addresses
        && first.is_ipv4() == second.is_ipv4()
    {
        return Err((
            "spec.clusterIPs[1]".into(),
            format!(
                "{second} is {} like spec.clusterIPs[0]: a dual-stack service has one address per family",
                family_name(second)
            ),
        ));
    }
    if let (Some(single), Some(first)) = (spec.cluster_ip.as_deref(), addresses.first())
        && spec.cluster_ips.as_deref().is_some_and(|l| !l.is_empty())
        && single.parse::<IpAddr>().ok() != Some(*first)
    {
        return Err((
            "spec.clusterIP".into(),
            format!("{single:?} is not spec.clusterIPs[0] ({first})"),
        ));
    }
    let families = spec.ip_families.as_deref().unwrap_or_default();
    for (index, family) in families.iter().enumerate() {
        if family != "IPv4" && family != "IPv6" {
            return Err((
                format!("spec.ipFamilies[{index}]"),
                format!("{family:?} is not IPv4 or IPv6"),
            ));
        }
        if let Some(addr) = addresses.get(index)
            && family_name(addr) != family
        {
            return Err((
                format!("spec.clusterIPs[{index}]"),
                format!(
                    "{addr} is {} but spec.ipFamilies[{index}] is {family}",
                    family_name(addr)
                ),
            ));
        }
    }
    match spec.ip_family_policy.as_deref() {
        None | Some("PreferDualStack") => Ok(()),
        Some("SingleStack") if addresses.len() > 1 => Err((
            "spec.ipFamilyPolicy".into(),
            "SingleStack, but spec.clusterIPs has an address of each family".into(),
        )),
        Some("RequireDualStack") if addresses.len() < 2 => Err((
            "spec.ipFamilyPolicy".into(),
            "RequireDualStack, but spec.clusterIPs has one family only".into(),
        )),
        Some("SingleStack" | "RequireDualStack") => Ok(()),
        Some(other) => Err((
            "spec.ipFamilyPolicy".into(),
            format!("{other:?} is not SingleStack, PreferDualStack or RequireDualStack"),
        )),
    }
}

/// Keeps the addresses of the service's families; each other one is
/// reported under `field(index)` and skipped (a family the service does
/// not have is not programmed for it).
fn of_families(
    object: &str,
    addresses: Vec<(usize, IpAddr)>,
    cluster_ips: &[IpAddr],
    field: impl Fn(usize) -> String,
    errors: &mut Vec<ModelError>,
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for (index, addr) in addresses {
        if cluster_ips.iter().any(|c| c.is_ipv4() == addr.is_ipv4()) {
            out.push(addr);
        } else {
            errors.push(ModelError::new(
                object,
                field(index),
                format!(
                    "{addr} is {} but the service has no {} cluster IP; not programmed",
                    family_name(&addr),
                    family_name(&addr)
                ),
            ));
        }
    }
    out
}

fn parse_ports(
    object: &str,
    ports: &[ServicePort],
    nodeport_range: Option<&std::ops::RangeInclusive<u16>>,
    errors: &mut Vec<ModelError>,
) -> Vec<ParsedPort> {
    let mut parsed: Vec<ParsedPort> = Vec::new();
    for (index, port) in ports.iter().enumerate() {
        let field = format!("spec.ports[{index}]");
        let Some(protocol) = Protocol::from_k8s(port.protocol.as_deref()) else {
            errors.push(ModelError::new(
                object,
                format!("{field}.protocol"),
                format!(
                    "{:?} is not a protocol (TCP, UDP or SCTP)",
                    port.protocol.as_deref().unwrap_or_default()
                ),
            ));
            continue;
        };
        let Some(number) = port_number(port.port) else {
            errors.push(ModelError::new(
                object,
                format!("{field}.port"),
                format!("{} is out of range 1..=65535", port.port),
            ));
            continue;
        };
        if let Some(first) = parsed
            .iter()
            .find(|earlier| earlier.port == number && earlier.protocol == protocol)
        {
            errors.push(ModelError::new(
                object,
                format!("{field}.port"),
                format!("{number}/{protocol} is already defined by {}", first.field),
            ));
            continue;
        }
        // An unset nodePort is not allocated yet: the port still serves
        // its cluster IP. One outside the range is refused for the node port
        // only.
        let node_port = match (nodeport_range, port.node_port) {
            (Some(range), Some(value)) => match port_number(value) {
                Some(number) if range.contains(&number) => Some(number),
                _ => {
                    errors.push(ModelError::new(
                        object,
                        format!("{field}.nodePort"),
                        format!(
                            "{value} is outside the node port range {}-{}",
                            range.start(),
                            range.end()
                        ),
                    ));
                    None
                }
            },
            _ => None,
        };
        parsed.push(ParsedPort {
            field,
            name: port.name.clone().unwrap_or_default(),
            port: number,
            protocol,
            node_port,
        });
    }
    parsed
}

/// A Kubernetes port number (an `i32` in the API) as a real port: 1..=65535.
pub(super) fn port_number(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|&port| port != 0)
}

/// `sessionAffinity: ClientIP` to its timeout. A bad timeout turns affinity
/// off rather than dropping the service: traffic still flows, only
/// stickiness is lost, and the error says why.
fn affinity_timeout(object: &str, spec: &ServiceSpec, errors: &mut Vec<ModelError>) -> Option<u32> {
    match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|config| config.client_ip.as_ref())
                .and_then(|client_ip| client_ip.timeout_seconds);
            match timeout {
                None => Some(DEFAULT_AFFINITY_TIMEOUT),
                Some(seconds) if AFFINITY_TIMEOUT_RANGE.contains(&seconds) => {
                    u32::try_from(seconds).ok()
                }
                Some(seconds) => {
                    errors.push(ModelError::new(
                        object,
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!(
                            "{seconds} is out of range {}..={}; session affinity disabled",
                            AFFINITY_TIMEOUT_RANGE.start(),
                            AFFINITY_TIMEOUT_RANGE.end()
                        ),
                    ));
                    None
                }
            }
        }
        Some(other) => {
            errors.push(ModelError::new(
                object,
                "spec.sessionAffinity",
                format!("{other:?} is not ClientIP or None; session affinity disabled"),
            ));
            None
        }
    }
}
