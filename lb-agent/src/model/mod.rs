//! The model: a pure function from cluster state and this node's identity to
//! the datapath tables the node should hold ([`desired_tables`]).
//!
//! No I/O, no kernel: the datapath layer diffs [`DesiredTables`] against the
//! maps and writes the difference; sources feed [`ClusterState`]. The shape
//! holds [`IpAddr`], never a family-specific type, so dual-stack is data, not
//! a new layout.
//!
//! Bad input is reported as [`ModelError`]s naming the object and the field;
//! it never panics and never costs another service its frontends.
//!
//! Implemented so far: ClusterIP, NodePort, LoadBalancer and externalIP
//! frontends (`service.rs`, `ParsedService::frontends`), endpoint selection
//! (ready, then serving+terminating) and externalTrafficPolicy Local
//! (`endpoints.rs`, `select_backends`), healthCheckNodePort, source ranges,
//! session affinity.

mod endpoints;
mod service;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;

pub use crate::source::ClusterState;

/// The Node label that names its zone.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Who "this node" is: decides node-local backends and which services are
/// ours to proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    pub name: String,
    /// `--service-proxy-name`: with it, only services labelled
    /// `service.kubernetes.io/service-proxy-name: <it>` are proxied; without
    /// it, only services without that label (kube-proxy's rule).
    pub service_proxy_name: Option<String>,
    /// The addresses NodePorts open on (the node's addresses filtered by
    /// `--nodeport-addresses`), found by the agent.
    pub nodeport_addresses: Vec<IpAddr>,
    /// NodePort numbers the cluster allows (kube-apiserver's
    /// `--service-node-port-range`).
    pub nodeport_range: RangeInclusive<u16>,
}

/// kube-apiserver's default `--service-node-port-range`.
pub const DEFAULT_NODEPORT_RANGE: RangeInclusive<u16> = 30000..=32767;

impl Default for NodeIdentity {
    fn default() -> Self {
        NodeIdentity {
            name: String::new(),
            service_proxy_name: None,
            nodeport_addresses: Vec::new(),
            nodeport_range: DEFAULT_NODEPORT_RANGE,
        }
    }
}

/// L4 protocol of a frontend, as Kubernetes names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The IP protocol number, as it appears in packet headers and map keys.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// Parses a Kubernetes `protocol` field; absent means TCP (API default).
    /// The API accepts only the upper-case spellings, so do we.
    pub fn from_k8s(protocol: Option<&str>) -> Option<Protocol> {
        match protocol {
            None | Some("TCP") => Some(Protocol::Tcp),
            Some("UDP") => Some(Protocol::Udp),
            Some("SCTP") => Some(Protocol::Sctp),
            Some(_) => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// Which service field a frontend comes from; policies differ per kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

/// Which traffic a frontend entry serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Every packet to the frontend (the only entry most frontends have).
    #[default]
    External,
    /// Traffic from this node's pods, where it must differ from the
    /// external entry: externalTrafficPolicy Local sends outside clients to
    /// local endpoints only but pods to all of them.
    Internal,
}

/// What packets are matched on: destination address, port and protocol,
/// and the scope of the entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

impl Frontend {
    /// The external entry of a frontend.
    pub fn new(addr: IpAddr, port: u16, protocol: Protocol) -> Self {
        Frontend {
            addr,
            port,
            protocol,
            scope: Scope::External,
        }
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(addr) => write!(f, "{addr}:{}/{}", self.port, self.protocol)?,
            IpAddr::V6(addr) => write!(f, "[{addr}]:{}/{}", self.port, self.protocol)?,
        }
        if self.scope == Scope::Internal {
            f.write_str(" (internal)")?;
        }
        Ok(())
    }
}

/// A CIDR, as in `spec.loadBalancerSourceRanges`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange {
    /// The network address (host bits cleared).
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl SourceRange {
    /// Whether `addr` is inside the range.
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.addr, addr) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let shift = 32 - u32::from(self.prefix_len.min(32));
                shift == 32 || (u32::from(net) >> shift) == (u32::from(a) >> shift)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let shift = 128 - u32::from(self.prefix_len.min(128));
                shift == 128 || (u128::from(net) >> shift) == (u128::from(a) >> shift)
            }
            _ => false,
        }
    }
}

pub use service::parse_cidr;

/// The service a frontend belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One destination a frontend's traffic may be sent to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    /// The endpoint runs on this node (policies Local, SNAT decisions).
    pub node_local: bool,
    /// Chosen only as a fallback: serving but terminating, used because the
    /// port has no ready endpoint at all.
    pub terminating: bool,
    /// The pod behind the endpoint, for inspection output.
    pub pod: Option<String>,
}

/// Everything the datapath needs to know about one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendSpec {
    pub service: ServiceRef,
    /// The service port's `name` ("" for a lone unnamed port).
    pub port_name: String,
    pub kind: FrontendKind,
    /// Sorted and deduplicated by (addr, port); empty means the service has
    /// no usable endpoint and traffic is rejected.
    pub backends: Vec<Backend>,
    /// `sessionAffinity: ClientIP` timeout in seconds; `None` is no affinity.
    pub affinity_timeout: Option<u32>,
    /// externalTrafficPolicy Local: `backends` are this node's only, and
    /// the client address is kept (never SNAT).
    pub local_only: bool,
    /// Allowed client ranges (LoadBalancer frontends with
    /// loadBalancerSourceRanges); empty allows everyone.
    pub source_ranges: Vec<SourceRange>,
}

/// A healthCheckNodePort server this node must run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ServiceRef,
    /// Ready endpoints of the service on this node.
    pub local_endpoints: usize,
}

/// The tables this node's datapath should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredTables {
    pub frontends: BTreeMap<Frontend, FrontendSpec>,
    /// healthCheckNodePort -> the service it reports on.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

/// A problem with one field of one object; the rest of the object (when
/// possible) and every other object are still programmed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {message}")]
pub struct ModelError {
    /// `Kind namespace/name`, e.g. `Service default/web`.
    pub object: String,
    /// Path of the field, e.g. `spec.ports[1].port`.
    pub field: String,
    pub message: String,
}

impl ModelError {
    fn new(object: &str, field: impl Into<String>, message: impl Into<String>) -> Self {
        ModelError {
            object: object.to_owned(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Computes the tables this node should hold for `state`.
///
/// Deterministic: equal inputs give equal outputs (errors included, in
/// object order), so callers can compare results to skip no-op updates.
pub fn desired_tables(
    state: &ClusterState,
    node: &NodeIdentity,
) -> (DesiredTables, Vec<ModelError>) {
    let mut errors = Vec::new();
    let slices = endpoints::index_slices(state, &mut errors);
    let zone = state
        .node(&node.name)
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|labels| labels.get(ZONE_LABEL))
        .map(String::as_str);
    let topology = endpoints::Topology {
        node: &node.name,
        zone,
    };
    let mut tables = DesiredTables::default();
    // Who took each frontend first, to name it when a later service collides.
    let mut owners: BTreeMap<Frontend, ServiceRef> = BTreeMap::new();

    for (key, object) in state.services() {
        let Some(service) = service::parse_service(key, object, node, &mut errors) else {
            continue;
        };
        let service_slices = slices.parse_for_service(&service.service, node, &mut errors);
        for port in &service.ports {
            let candidates = endpoints::candidates_for_port(&service_slices, port);
            if candidates.is_empty() && endpoints::has_endpoints(&service_slices) {
                // The endpoints exist but none publishes this port: a named
                // targetPort no pod defines. The port answers as a service
                // without endpoints (connection refused).
                errors.push(ModelError::new(
                    &service.object,
                    format!("{}.targetPort", port.field),
                    format!(
                        "no EndpointSlice of the service has a port named {:?} ({}); the port has no endpoints",
                        port.name, port.protocol
                    ),
                ));
            }
            for (frontend, kind) in service.frontends(port, node) {
                if let Some(owner) = owners.get(&frontend) {
                    let field = match kind {
                        FrontendKind::NodePort => format!("{}.nodePort", port.field),
                        _ => port.field.clone(),
                    };
                    errors.push(ModelError::new(
                        &service.object,
                        field,
                        format!("frontend {frontend} is already used by Service {owner}"),
                    ));
                    continue;
                }
                owners.insert(frontend.clone(), service.service.clone());
                // internalTrafficPolicy Local narrows the ClusterIP to this
                // node's endpoints (dropped, counted, when there is none).
                let internal_local = kind == FrontendKind::ClusterIp && service.internal_local;
                let all = endpoints::select_backends(
                    &candidates,
                    frontend.addr,
                    internal_local,
                    &topology,
                );
                let source_ranges = match kind {
                    FrontendKind::LoadBalancer => service.source_ranges.clone(),
                    _ => Vec::new(),
                };
                let spec = |backends, local_only| FrontendSpec {
                    service: service.service.clone(),
                    port_name: port.name.clone(),
                    kind,
                    backends,
                    affinity_timeout: service.affinity_timeout,
                    local_only,
                    source_ranges: source_ranges.clone(),
                };
                if kind != FrontendKind::ClusterIp && service.external_local {
                    // kube-proxy's rule: outside clients get this node's
                    // endpoints only (client address kept); pods and the
                    // node itself still reach every endpoint.
                    let local =
                        endpoints::select_backends(&candidates, frontend.addr, true, &topology);
                    let internal = Frontend {
                        scope: Scope::Internal,
                        ..frontend.clone()
                    };
                    tables.frontends.insert(internal, spec(all, false));
                    tables.frontends.insert(frontend, spec(local, true));
                } else {
                    tables.frontends.insert(frontend, spec(all, internal_local));
                }
            }
        }
        if let Some(port) = service.health_check_node_port {
            if let Some(existing) = tables.health_checks.get(&port) {
                errors.push(ModelError::new(
                    &service.object,
                    "spec.healthCheckNodePort",
                    format!("{port} is already used by Service {}", existing.service),
                ));
            } else {
                tables.health_checks.insert(
                    port,
                    HealthCheck {
                        service: service.service.clone(),
                        local_endpoints: endpoints::local_ready_endpoints(&service_slices),
                    },
                );
            }
        }
    }
    (tables, errors)
}

#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod tests;
