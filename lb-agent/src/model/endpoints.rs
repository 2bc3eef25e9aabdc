//! EndpointSlices to backends: which slices belong to which service, their
//! validated addresses and ports, and which endpoints a frontend uses
//! (ready first, serving+terminating as the fallback).

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

use super::service::{ParsedPort, port_number};
use super::{Backend, ClusterState, ModelError, NodeIdentity, Protocol, ServiceRef};
use crate::source::ObjectKey;

/// Label the EndpointSlice controller sets to the owning service's name.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label of EndpointSlices of headless services.
const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// The raw slices of each service, by the service they name.
pub(super) struct SliceIndex<'a> {
    by_service: BTreeMap<ServiceRef, Vec<(&'a ObjectKey, &'a EndpointSlice)>>,
}

/// Groups slices by service. A slice naming a service that does not exist is
/// normal while objects arrive (slices may come before their service), so it
/// is reported for information only; a slice without the label is not for
/// a service proxy at all and is skipped silently.
pub(super) fn index_slices<'a>(
    state: &'a ClusterState,
    errors: &mut Vec<ModelError>,
) -> SliceIndex<'a> {
    let mut by_service: BTreeMap<ServiceRef, Vec<_>> = BTreeMap::new();
    for (key, slice) in state.endpoint_slices() {
        // The controller marks slices of headless services; nothing to proxy.
        if slice
            .metadata
            .labels
            .as_ref()
            .is_some_and(|labels| labels.contains_key(HEADLESS_LABEL))
        {
            continue;
        }
        let Some(service_name) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        if state.service(&key.namespace, service_name).is_none() {
            errors.push(ModelError::new(
                &format!("EndpointSlice {key}"),
                format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
                format!(
                    "Service {}/{service_name} does not exist (yet); the slice is not used",
                    key.namespace
                ),
            ));
            continue;
        }
        let service = ServiceRef {
            namespace: key.namespace.clone(),
            name: service_name.clone(),
        };
        by_service.entry(service).or_default().push((key, slice));
    }
    SliceIndex { by_service }
}

impl SliceIndex<'_> {
    /// Validates the slices of one service. Called once per proxied service,
    /// so slices of services we do not proxy are never checked (their
    /// errors would be noise) and each error is reported once.
    pub fn parse_for_service(
        &self,
        service: &ServiceRef,
        node: &NodeIdentity,
        errors: &mut Vec<ModelError>,
    ) -> Vec<ParsedSlice> {
        self.by_service
            .get(service)
            .map(|slices| {
                slices
                    .iter()
                    .filter_map(|(key, slice)| parse_slice(key, slice, node, errors))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The usable parts of one EndpointSlice.
pub(super) struct ParsedSlice {
    ports: Vec<SlicePort>,
    endpoints: Vec<ParsedEndpoint>,
}

struct SlicePort {
    name: String,
    protocol: Protocol,
    port: u16,
}

struct ParsedEndpoint {
    addr: IpAddr,
    conditions: Conditions,
    node_local: bool,
    pod: Option<String>,
    hints: Hints,
}

/// Topology hints of an endpoint (`hints.forZones`, `hints.forNodes`).
#[derive(Clone, Debug, Default)]
struct Hints {
    zones: Vec<String>,
    nodes: Vec<String>,
}

/// Where this node is, for topology-aware routing.
pub(super) struct Topology<'a> {
    pub node: &'a str,
    /// The Node's `topology.kubernetes.io/zone` label.
    pub zone: Option<&'a str>,
}

/// Endpoint conditions with the API's defaults for unset values applied.
#[derive(Clone, Copy)]
struct Conditions {
    ready: bool,
    serving: bool,
    terminating: bool,
}

impl Conditions {
    fn of(endpoint: &Endpoint) -> Self {
        let conditions = endpoint.conditions.as_ref();
        // Unset `ready` means ready; unset `serving` follows `ready`; unset
        // `terminating` means not terminating (EndpointConditions docs).
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        Conditions {
            ready,
            serving,
            terminating,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

fn parse_slice(
    key: &ObjectKey,
    slice: &EndpointSlice,
    node: &NodeIdentity,
    errors: &mut Vec<ModelError>,
) -> Option<ParsedSlice> {
    let object = format!("EndpointSlice {key}");
    let family = match slice.address_type.as_str() {
        "IPv4" => Family::V4,
        "IPv6" => Family::V6,
        // Names cannot be programmed into a datapath; kube-proxy ignores them too.
        "FQDN" => return None,
        other => {
            errors.push(ModelError::new(
                &object,
                "addressType",
                format!("{other:?} is not IPv4, IPv6 or FQDN"),
            ));
            return None;
        }
    };

    let mut ports = Vec::new();
    for (index, port) in slice.ports.iter().flatten().enumerate() {
        let Some(protocol) = Protocol::from_k8s(port.protocol.as_deref()) else {
            errors.push(ModelError::new(
                &object,
                format!("ports[{index}].protocol"),
                format!(
                    "{:?} is not a protocol (TCP, UDP or SCTP)",
                    port.protocol.as_deref().unwrap_or_default()
                ),
            ));
            continue;
        };
        // An unset port means "not restricted" in the API, which gives no
        // number to translate to: such an entry contributes nothing.
        let Some(number) = port.port else { continue };
        let Some(number) = port_number(number) else {
            errors.push(ModelError::new(
                &object,
                format!("ports[{index}].port"),
                format!("{number} is out of range 1..=65535"),
            ));
            continue;
        };
        ports.push(SlicePort {
            name: port.name.clone().unwrap_or_default(),
            protocol,
            port: number,
        });
    }

    let mut endpoints = Vec::new();
    for (index, endpoint) in slice.endpoints.iter().enumerate() {
        let Some(addr) = endpoint_address(&object, index, endpoint, family, errors) else {
            continue;
        };
        let node_local =
            !node.name.is_empty() && endpoint.node_name.as_deref() == Some(node.name.as_str());
        let pod = endpoint
            .target_ref
            .as_ref()
            .filter(|target| target.kind.as_deref() == Some("Pod"))
            .and_then(|target| target.name.clone());
        let hints = endpoint
            .hints
            .as_ref()
            .map(|h| Hints {
                zones: h
                    .for_zones
                    .iter()
                    .flatten()
                    .map(|z| z.name.clone())
                    .collect(),
                nodes: h
                    .for_nodes
                    .iter()
                    .flatten()
                    .map(|n| n.name.clone())
                    .collect(),
            })
            .unwrap_or_default();
        endpoints.push(ParsedEndpoint {
            addr,
            conditions: Conditions::of(endpoint),
            node_local,
            pod,
            hints,
        });
    }
    Some(ParsedSlice { ports, endpoints })
}

/// The endpoint's address. The API says an endpoint's addresses are
/// fungible and kube-proxy uses only the first; we use the first valid one
/// and report every invalid one.
fn endpoint_address(
    object: &str,
    index: usize,
    endpoint: &Endpoint,
    family: Family,
    errors: &mut Vec<ModelError>,
) -> Option<IpAddr> {
    let mut chosen = None;
    for (address_index, value) in endpoint.addresses.iter().enumerate() {
        let field = format!("endpoints[{index}].addresses[{address_index}]");
        match value.parse::<IpAddr>() {
            Ok(addr) if Family::of(addr) == family => {
                chosen = chosen.or(Some(addr));
            }
            Ok(_) => errors.push(ModelError::new(
                object,
                field,
                format!(
                    "{value:?} does not match addressType {}",
                    if family == Family::V4 { "IPv4" } else { "IPv6" }
                ),
            )),
            Err(_) => errors.push(ModelError::new(
                object,
                field,
                format!("{value:?} is not an IP address"),
            )),
        }
    }
    chosen
}

/// An endpoint that serves one service port, before selection.
pub(super) struct Candidate {
    backend: Backend,
    conditions: Conditions,
    hints: Hints,
}

/// The endpoints of `slices` that serve `port`. Each slice resolves the port
/// by its own `ports[]`: the entry with the service port's name (unnamed
/// matches unnamed) and protocol gives the backend port, which is how a named
/// targetPort can differ per pod. A slice without such an entry contributes
/// nothing to this port.
pub(super) fn candidates_for_port(slices: &[ParsedSlice], port: &ParsedPort) -> Vec<Candidate> {
    let mut candidates = Vec::new();
    for slice in slices {
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|candidate| candidate.name == port.name && candidate.protocol == port.protocol)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            candidates.push(Candidate {
                backend: Backend {
                    addr: endpoint.addr,
                    port: slice_port.port,
                    node_local: endpoint.node_local,
                    terminating: false,
                    pod: endpoint.pod.clone(),
                },
                conditions: endpoint.conditions,
                hints: endpoint.hints.clone(),
            });
        }
    }
    candidates
}

/// Which hints decide, kube-proxy's rule: node hints when every ready
/// endpoint has some and one names this node; else zone hints when every
/// ready endpoint has some and one names this node's zone; else none (all
/// endpoints). Hints are what the EndpointSlice controller derives from
/// `trafficDistribution` and the topology-mode annotation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TopologyMode {
    Node,
    Zone,
    All,
}

fn topology_mode(candidates: &[&Candidate], topology: &Topology<'_>) -> TopologyMode {
    let ready: Vec<&&Candidate> = candidates.iter().filter(|c| c.conditions.ready).collect();
    if ready.is_empty() {
        return TopologyMode::All;
    }
    if ready.iter().all(|c| !c.hints.nodes.is_empty())
        && ready
            .iter()
            .any(|c| c.hints.nodes.iter().any(|n| n == topology.node))
    {
        return TopologyMode::Node;
    }
    if let Some(zone) = topology.zone
        && ready.iter().all(|c| !c.hints.zones.is_empty())
        && ready
            .iter()
            .any(|c| c.hints.zones.iter().any(|z| z == zone))
    {
        return TopologyMode::Zone;
    }
    TopologyMode::All
}

fn available(candidate: &Candidate, mode: TopologyMode, topology: &Topology<'_>) -> bool {
    match mode {
        TopologyMode::All => true,
        TopologyMode::Node => candidate.hints.nodes.iter().any(|n| n == topology.node),
        TopologyMode::Zone => candidate
            .hints
            .zones
            .iter()
            .any(|z| Some(z.as_str()) == topology.zone),
    }
}

/// The backends a frontend at `frontend_addr` sends to: candidates of its
/// address family (only this node's with `local_only`; else filtered by
/// topology hints) that are ready; when there is none, those serving while
/// terminating (so connections drain instead of being refused during a
/// rollout) — decided separately for the node-local and the cluster-wide
/// set, as kube-proxy does. Sorted and deduplicated by (addr, port) so
/// equal input gives equal output whatever the slice layout.
pub(super) fn select_backends(
    candidates: &[Candidate],
    frontend_addr: IpAddr,
    local_only: bool,
    topology: &Topology<'_>,
) -> Vec<Backend> {
    let family = Family::of(frontend_addr);
    let eligible: Vec<&Candidate> = candidates
        .iter()
        .filter(|candidate| {
            Family::of(candidate.backend.addr) == family
                && (!local_only || candidate.backend.node_local)
        })
        .collect();
    // Policy Local already is the tightest topology; hints apply to the
    // cluster-wide set only.
    let mode = if local_only {
        TopologyMode::All
    } else {
        topology_mode(&eligible, topology)
    };
    let in_scope = || {
        eligible
            .iter()
            .copied()
            .filter(move |candidate| available(candidate, mode, topology))
    };
    let mut backends: Vec<Backend> = in_scope()
        .filter(|candidate| candidate.conditions.ready)
        .map(|candidate| candidate.backend.clone())
        .collect();
    if backends.is_empty() {
        backends = in_scope()
            .filter(|candidate| candidate.conditions.serving && candidate.conditions.terminating)
            .map(|candidate| Backend {
                terminating: true,
                ..candidate.backend.clone()
            })
            .collect();
    }
    backends.sort();
    // Sorting puts equal (addr, port) next to each other, as they lead the
    // ordering; the first of each kept is the same whatever the input order.
    backends.dedup_by(|later, first| later.addr == first.addr && later.port == first.port);
    backends
}

/// Whether any slice of the service has an endpoint at all.
pub(super) fn has_endpoints(slices: &[ParsedSlice]) -> bool {
    slices.iter().any(|slice| !slice.endpoints.is_empty())
}

/// Ready endpoints of a service on this node (distinct addresses), what a
/// healthCheckNodePort reports.
pub(super) fn local_ready_endpoints(slices: &[ParsedSlice]) -> usize {
    let mut addresses: Vec<IpAddr> = slices
        .iter()
        .flat_map(|slice| &slice.endpoints)
        .filter(|endpoint| endpoint.node_local && endpoint.conditions.ready)
        .map(|endpoint| endpoint.addr)
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses.len()
}
