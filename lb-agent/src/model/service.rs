//! Service objects to frontends: whether a service is ours to proxy, its
//! validated addresses, ports and session affinity.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};

use super::{Frontend, FrontendKind, ModelError, NodeIdentity, Protocol, ServiceRef};
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
}

/// One valid entry of `spec.ports`.
pub(super) struct ParsedPort {
    /// `spec.ports[i]`, for errors about this port.
    pub field: String,
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

impl ParsedService {
    /// The frontends one service port opens. NodePort, LoadBalancer ingress
    /// and externalIPs will add their own here.
    pub fn frontends(&self, port: &ParsedPort) -> Vec<(Frontend, FrontendKind)> {
        self.cluster_ips
            .iter()
            .map(|&addr| {
                let frontend = Frontend {
                    addr,
                    port: port.port,
                    protocol: port.protocol,
                };
                (frontend, FrontendKind::ClusterIp)
            })
            .collect()
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
    let ports = parse_ports(&object, spec.ports.as_deref().unwrap_or_default(), errors);
    let affinity_timeout = affinity_timeout(&object, spec, errors);
    Some(ParsedService {
        service: ServiceRef {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        },
        object,
        cluster_ips,
        ports,
        affinity_timeout,
    })
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
    Ok(addresses)
}

fn parse_ports(
    object: &str,
    ports: &[ServicePort],
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
        parsed.push(ParsedPort {
            field,
            name: port.name.clone().unwrap_or_default(),
            port: number,
            protocol,
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
