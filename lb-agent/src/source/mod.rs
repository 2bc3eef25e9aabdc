//! Where cluster state comes from, and the store it is kept in.
//!
//! A source's contract is small: it keeps a [`ClusterState`] up to date from
//! whole-object updates ([`ClusterState::upsert`] and the `remove_*` calls) and
//! publishes whole snapshots, `Arc<ClusterState>`, into a
//! `tokio::sync::watch` channel. The channel keeps only the latest snapshot, so
//! a burst of updates costs the model one recomputation, and the consumer
//! never sees a half-applied change.
//!
//! Sources:
//! - [`files`]: a directory of manifests in `kubectl get -o yaml` shape
//!   (`lb-agent --manifests DIR`), polled for changes.
//! - [`kube`]: the Kubernetes API (`--kubeconfig PATH` or in-cluster),
//!   kube-rs watchers feeding the same store and the same channel; nothing
//!   downstream knows which source is in use.

pub mod files;
pub mod kube;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// One object as a source delivers it: the whole object, never a patch.
// Unboxed on purpose: a value lives only from the source to `upsert`, where
// it is moved into the store; boxing would cost an allocation per update to
// save a short-lived memcpy.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum ClusterObject {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Node(Node),
}

impl ClusterObject {
    /// The object's metadata, whatever its kind.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            ClusterObject::Service(service) => &service.metadata,
            ClusterObject::EndpointSlice(slice) => &slice.metadata,
            ClusterObject::Node(node) => &node.metadata,
        }
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            ClusterObject::Service(service) => &mut service.metadata,
            ClusterObject::EndpointSlice(slice) => &mut slice.metadata,
            ClusterObject::Node(node) => &mut node.metadata,
        }
    }

    /// The Kubernetes kind, as written in manifests and in error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            ClusterObject::Service(_) => "Service",
            ClusterObject::EndpointSlice(_) => "EndpointSlice",
            ClusterObject::Node(_) => "Node",
        }
    }
}

/// Identity of a namespaced object in the store.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Annotations that proxy semantics read (kube-proxy consults them for
/// topology-aware routing), so stripping must keep them. Everything else in
/// `metadata.annotations` is dead weight for us (last-applied configuration
/// alone can be kilobytes per object).
const KEPT_ANNOTATIONS: &[&str] = &[
    "service.kubernetes.io/topology-mode",
    "service.kubernetes.io/topology-aware-hints",
    TRIGGER_TIME_ANNOTATION,
];

/// When the change an EndpointSlice carries happened (a pod became ready,
/// went away...), set by the endpointslice controller: kube-proxy measures
/// its programming latency from it, and so do we.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The trigger times of the EndpointSlice changes `new` holds that `old`
/// did not (a new slice, or a new value of its annotation), at or after
/// `since` (the agent's start: the initial list's slices changed before
/// anything could program them, as kube-proxy's tracker ignores them).
/// An absent or unparsable annotation gives nothing.
pub fn new_trigger_times(
    old: Option<&ClusterState>,
    new: &ClusterState,
    since: std::time::SystemTime,
) -> Vec<std::time::SystemTime> {
    let trigger = |slice: &EndpointSlice| {
        slice
            .metadata
            .annotations
            .as_ref()?
            .get(TRIGGER_TIME_ANNOTATION)
            .cloned()
    };
    new.endpoint_slices()
        .filter_map(|(key, slice)| {
            let value = trigger(slice)?;
            let before = old.and_then(|old| old.endpoint_slice(&key.namespace, &key.name));
            if before.and_then(trigger).as_deref() == Some(value.as_str()) {
                return None;
            }
            let at: k8s_openapi::jiff::Timestamp = value.parse().ok()?;
            let at = std::time::SystemTime::from(at);
            (at >= since).then_some(at)
        })
        .collect()
}

/// The current objects of the cluster that matter to a service proxy.
///
/// Services and EndpointSlices are keyed by (namespace, name), Nodes by name.
/// Ordered maps make iteration, and so everything derived from the store,
/// deterministic.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterState {
    services: BTreeMap<ObjectKey, Service>,
    endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    nodes: BTreeMap<String, Node>,
}

impl ClusterState {
    /// Inserts or replaces an object. Like kube-rs's `.modify()`, it first
    /// strips `metadata.managedFields` and the annotations proxying does not
    /// read; labels are kept whole (`service.kubernetes.io/service-proxy-name`
    /// and `kubernetes.io/service-name` are labels).
    ///
    /// An object without `metadata.name` cannot be keyed and is not stored;
    /// the return value says whether it was. A missing namespace means
    /// `default`, as `kubectl apply` reads it.
    pub fn upsert(&mut self, mut object: ClusterObject) -> bool {
        strip_metadata(object.metadata_mut());
        let metadata = object.metadata();
        let Some(name) = metadata.name.clone().filter(|name| !name.is_empty()) else {
            return false;
        };
        let namespace = metadata
            .namespace
            .clone()
            .filter(|namespace| !namespace.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        match object {
            ClusterObject::Service(service) => {
                self.services
                    .insert(ObjectKey::new(namespace, name), service);
            }
            ClusterObject::EndpointSlice(slice) => {
                self.endpoint_slices
                    .insert(ObjectKey::new(namespace, name), slice);
            }
            ClusterObject::Node(node) => {
                self.nodes.insert(name, node);
            }
        }
        true
    }

    /// Removes a Service; returns it if it was present.
    pub fn remove_service(&mut self, namespace: &str, name: &str) -> Option<Service> {
        self.services.remove(&ObjectKey::new(namespace, name))
    }

    /// Removes an EndpointSlice; returns it if it was present.
    pub fn remove_endpoint_slice(&mut self, namespace: &str, name: &str) -> Option<EndpointSlice> {
        self.endpoint_slices
            .remove(&ObjectKey::new(namespace, name))
    }

    /// Removes a Node; returns it if it was present.
    pub fn remove_node(&mut self, name: &str) -> Option<Node> {
        self.nodes.remove(name)
    }

    /// All Services, ordered by (namespace, name).
    pub fn services(&self) -> impl Iterator<Item = (&ObjectKey, &Service)> {
        self.services.iter()
    }

    /// All EndpointSlices, ordered by (namespace, name).
    pub fn endpoint_slices(&self) -> impl Iterator<Item = (&ObjectKey, &EndpointSlice)> {
        self.endpoint_slices.iter()
    }

    /// All Nodes, ordered by name.
    pub fn nodes(&self) -> impl Iterator<Item = (&String, &Node)> {
        self.nodes.iter()
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.services.get(&ObjectKey::new(namespace, name))
    }

    pub fn endpoint_slice(&self, namespace: &str, name: &str) -> Option<&EndpointSlice> {
        self.endpoint_slices.get(&ObjectKey::new(namespace, name))
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.endpoint_slices.is_empty() && self.nodes.is_empty()
    }
}

fn strip_metadata(metadata: &mut ObjectMeta) {
    metadata.managed_fields = None;
    if let Some(annotations) = metadata.annotations.as_mut() {
        annotations.retain(|key, _| KEPT_ANNOTATIONS.contains(&key.as_str()));
        if annotations.is_empty() {
            metadata.annotations = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(namespace: Option<&str>, name: Option<&str>) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: namespace.map(str::to_owned),
                name: name.map(str::to_owned),
                ..ObjectMeta::default()
            },
            ..Service::default()
        }
    }

    #[test]
    fn upsert_replaces_and_remove_removes() {
        let mut state = ClusterState::default();
        assert!(state.upsert(ClusterObject::Service(service(Some("ns"), Some("web")))));
        let mut replacement = service(Some("ns"), Some("web"));
        replacement.metadata.resource_version = Some("2".to_owned());
        assert!(state.upsert(ClusterObject::Service(replacement.clone())));
        assert_eq!(state.services().count(), 1);
        assert_eq!(state.service("ns", "web"), Some(&replacement));
        assert_eq!(state.remove_service("ns", "web"), Some(replacement));
        assert!(state.is_empty());
    }

    #[test]
    fn upsert_defaults_namespace_and_rejects_nameless() {
        let mut state = ClusterState::default();
        assert!(state.upsert(ClusterObject::Service(service(None, Some("web")))));
        assert!(state.service("default", "web").is_some());
        assert!(!state.upsert(ClusterObject::Service(service(Some("ns"), None))));
        assert!(!state.upsert(ClusterObject::Service(service(Some("ns"), Some("")))));
        assert_eq!(state.services().count(), 1);
    }

    #[test]
    fn upsert_strips_managed_fields_and_unneeded_annotations() {
        let mut object = service(Some("ns"), Some("web"));
        object.metadata.managed_fields = Some(vec![Default::default()]);
        object.metadata.annotations = Some(BTreeMap::from([
            (
                "kubectl.kubernetes.io/last-applied-configuration".to_owned(),
                "{}".to_owned(),
            ),
            (
                "service.kubernetes.io/topology-mode".to_owned(),
                "Auto".to_owned(),
            ),
        ]));
        object.metadata.labels = Some(BTreeMap::from([(
            "service.kubernetes.io/service-proxy-name".to_owned(),
            "other".to_owned(),
        )]));
        let mut state = ClusterState::default();
        state.upsert(ClusterObject::Service(object));
        let stored = &state.service("ns", "web").expect("stored").metadata;
        assert_eq!(stored.managed_fields, None);
        assert_eq!(
            stored.annotations,
            Some(BTreeMap::from([(
                "service.kubernetes.io/topology-mode".to_owned(),
                "Auto".to_owned()
            )]))
        );
        assert_eq!(
            stored
                .labels
                .as_ref()
                .and_then(|labels| labels.get("service.kubernetes.io/service-proxy-name")),
            Some(&"other".to_owned())
        );
    }

    fn slice_triggered(name: &str, trigger: Option<&str>) -> ClusterObject {
        ClusterObject::EndpointSlice(EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some("default".into()),
                name: Some(name.into()),
                annotations: trigger.map(|t| {
                    BTreeMap::from([
                        (TRIGGER_TIME_ANNOTATION.to_owned(), t.to_owned()),
                        ("other".to_owned(), "dropped".to_owned()),
                    ])
                }),
                ..ObjectMeta::default()
            },
            ..EndpointSlice::default()
        })
    }

    #[test]
    fn trigger_times_of_new_and_changed_slices_since_the_start() {
        use std::time::{Duration, UNIX_EPOCH};
        let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(secs);
        let start = at(1_800_000_000);
        let mut old = ClusterState::default();
        old.upsert(slice_triggered("same", Some("2027-01-15T08:00:10Z")));
        old.upsert(slice_triggered("moved", Some("2027-01-15T08:00:10Z")));
        let mut new = old.clone();
        // 2027-01-15T08:00:20Z is 1_800_000_020 s after the epoch.
        new.upsert(slice_triggered("moved", Some("2027-01-15T08:00:20Z")));
        new.upsert(slice_triggered("fresh", Some("2027-01-15T08:00:30.5Z")));
        new.upsert(slice_triggered(
            "before-start",
            Some("2027-01-15T07:59:00Z"),
        ));
        new.upsert(slice_triggered("garbled", Some("yesterday")));
        new.upsert(slice_triggered("unannotated", None));
        let mut times = new_trigger_times(Some(&old), &new, start);
        times.sort();
        assert_eq!(
            times,
            vec![
                at(1_800_000_020),
                at(1_800_000_030) + Duration::from_millis(500)
            ],
            "the changed and the new slice, nothing else"
        );
        // The annotation survives stripping; the others do not.
        let kept = new.endpoint_slice("default", "fresh").expect("stored");
        assert_eq!(
            kept.metadata.annotations.as_ref().map(BTreeMap::len),
            Some(1)
        );
        // With no previous state every annotated slice since the start counts.
        assert_eq!(new_trigger_times(None, &new, start).len(), 3);
        assert!(new_trigger_times(None, &new, at(1_900_000_000)).is_empty());
    }
}
