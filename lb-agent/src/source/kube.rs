//! The Kubernetes API source (`lb-agent --kubeconfig PATH`, or in-cluster
//! configuration when neither `--manifests` nor `--kubeconfig` is given).
//!
//! Owns three kube-rs watchers (Services and EndpointSlices in all
//! namespaces, and this agent's own Node through the field selector
//! `metadata.name=<node>`) and the reflector-style store they feed: one
//! [`ClusterState`], published as whole snapshots into the same
//! `tokio::sync::watch` channel the manifest source uses.
//!
//! - **Nothing is published before every kind is listed once**, so a
//!   restarted agent never programs a half-known cluster over the maps it
//!   adopted.
//! - **A relist replaces a kind's objects at its end** (`InitDone`), like
//!   kube-rs's reflector: objects gone while the watch was down are removed,
//!   and readers never see a kind half-listed.
//! - **Bursts are coalesced**: events that are already waiting are applied
//!   before one snapshot is published, and the channel keeps only the latest.
//! - **A watch error never stops the datapath**: it is logged and counted,
//!   the watcher backs off (kube-rs's default backoff) and re-watches or
//!   relists; the last published state stays programmed meanwhile.
//! - **Objects are decoded one by one** ([`RawObject`]): a list holding one
//!   object that does not match its schema still delivers all the others.
//!   The bad object is logged with its name and field and skipped; a version
//!   of it that was good before stays in force until it is fixed or deleted.
//!   (k8s-openapi 0.29 decodes a missing required field as its default, so
//!   such objects reach the model, which reports the field by name.)

use std::{
    borrow::Cow, collections::BTreeMap, fmt::Debug, marker::PhantomData, path::Path, sync::Arc,
};

use anyhow::Context as _;
use futures::{FutureExt as _, StreamExt as _, stream::BoxStream};
use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event},
    },
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::model::ClusterState;
use crate::source::{ClusterObject, ObjectKey};

/// A client from `--kubeconfig PATH`, or inferred (`$KUBECONFIG`,
/// `~/.kube/config`, then the in-cluster service account) without it.
/// `--master URL` replaces the server either gives; alone, with no
/// in-cluster service account either, it is the whole configuration (no
/// credentials), as kube-proxy's `--master` without `--kubeconfig`.
/// Plain `http://` servers are accepted as well as `https://`.
pub async fn client(kubeconfig: Option<&Path>, master: Option<&str>) -> anyhow::Result<Client> {
    let master = master
        .map(|url| {
            url.parse()
                .with_context(|| format!("--master {url:?}: not a URL"))
        })
        .transpose()?;
    let config = match (kubeconfig, master) {
        (Some(path), master) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}: cannot read", path.display()))?;
            let mut config = Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}: unusable", path.display()))?;
            if let Some(url) = master {
                config.cluster_url = url;
            }
            config
        }
        (None, Some(url)) => match Config::incluster() {
            Ok(mut config) => {
                config.cluster_url = url;
                config
            }
            Err(_) => Config::new(url),
        },
        (None, None) => Config::infer()
            .await
            .context("no --manifests, --kubeconfig or --master, and no in-cluster configuration")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// An API object as the watcher delivers it: metadata for the watcher's
/// bookkeeping (resource version) and the whole body, decoded into its real
/// type later, one object at a time, by [`decode`].
///
/// Deserializing never fails on a JSON object, whatever its fields hold, so
/// one bad item cannot fail the list it is in.
#[derive(Clone, Debug)]
pub struct RawObject<K> {
    metadata: ObjectMeta,
    body: Value,
    kind: PhantomData<fn() -> K>,
}

impl<'de, K> serde::Deserialize<'de> for RawObject<K> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let body = Value::deserialize(deserializer)?;
        if !body.is_object() {
            return Err(serde::de::Error::custom("API object is not a JSON object"));
        }
        Ok(RawObject {
            metadata: lenient_metadata(&body),
            body,
            kind: PhantomData,
        })
    }
}

/// `metadata` as far as it can be read: the whole of it when it matches its
/// schema, else the strings the store and the watcher need.
fn lenient_metadata(body: &Value) -> ObjectMeta {
    let metadata = body.get("metadata").cloned().unwrap_or(Value::Null);
    if let Ok(parsed) = serde_json::from_value::<ObjectMeta>(metadata.clone()) {
        return parsed;
    }
    let text = |field: &str| {
        metadata
            .get(field)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    ObjectMeta {
        name: text("name"),
        namespace: text("namespace"),
        resource_version: text("resourceVersion"),
        uid: text("uid"),
        ..ObjectMeta::default()
    }
}

impl<K: k8s_openapi::Resource> kube::Resource for RawObject<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(_: &()) -> Cow<'_, str> {
        K::KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        K::GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        K::VERSION.into()
    }
    fn api_version(_: &()) -> Cow<'_, str> {
        K::API_VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        K::URL_PATH_SEGMENT.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The kinds this source watches, and how each sits in the store.
pub trait WatchedKind:
    k8s_openapi::Resource + DeserializeOwned + Clone + Debug + Send + Sync + 'static
{
    /// Cluster-scoped kinds are keyed with an empty namespace.
    const NAMESPACED: bool;
    fn into_object(self) -> ClusterObject;
    fn stored_keys(state: &ClusterState) -> Vec<ObjectKey>;
    fn stored(state: &ClusterState, key: &ObjectKey) -> Option<ClusterObject>;
    fn remove(state: &mut ClusterState, key: &ObjectKey);
}

impl WatchedKind for Service {
    const NAMESPACED: bool = true;
    fn into_object(self) -> ClusterObject {
        ClusterObject::Service(self)
    }
    fn stored_keys(state: &ClusterState) -> Vec<ObjectKey> {
        state.services().map(|(key, _)| key.clone()).collect()
    }
    fn stored(state: &ClusterState, key: &ObjectKey) -> Option<ClusterObject> {
        state
            .service(&key.namespace, &key.name)
            .cloned()
            .map(ClusterObject::Service)
    }
    fn remove(state: &mut ClusterState, key: &ObjectKey) {
        state.remove_service(&key.namespace, &key.name);
    }
}

impl WatchedKind for EndpointSlice {
    const NAMESPACED: bool = true;
    fn into_object(self) -> ClusterObject {
        ClusterObject::EndpointSlice(self)
    }
    fn stored_keys(state: &ClusterState) -> Vec<ObjectKey> {
        state
            .endpoint_slices()
            .map(|(key, _)| key.clone())
            .collect()
    }
    fn stored(state: &ClusterState, key: &ObjectKey) -> Option<ClusterObject> {
        state
            .endpoint_slice(&key.namespace, &key.name)
            .cloned()
            .map(ClusterObject::EndpointSlice)
    }
    fn remove(state: &mut ClusterState, key: &ObjectKey) {
        state.remove_endpoint_slice(&key.namespace, &key.name);
    }
}

impl WatchedKind for Node {
    const NAMESPACED: bool = false;
    fn into_object(self) -> ClusterObject {
        ClusterObject::Node(self)
    }
    fn stored_keys(state: &ClusterState) -> Vec<ObjectKey> {
        state
            .nodes()
            .map(|(name, _)| ObjectKey::new("", name.clone()))
            .collect()
    }
    fn stored(state: &ClusterState, key: &ObjectKey) -> Option<ClusterObject> {
        state.node(&key.name).cloned().map(ClusterObject::Node)
    }
    fn remove(state: &mut ClusterState, key: &ObjectKey) {
        state.remove_node(&key.name);
    }
}

/// The store key of a raw object, if it has a name.
fn key_of<K: WatchedKind>(raw: &RawObject<K>) -> Option<ObjectKey> {
    let name = raw.metadata.name.clone().filter(|name| !name.is_empty())?;
    let namespace = if K::NAMESPACED {
        raw.metadata
            .namespace
            .clone()
            .filter(|namespace| !namespace.is_empty())
            .unwrap_or_else(|| "default".to_owned())
    } else {
        String::new()
    };
    Some(ObjectKey::new(namespace, name))
}

/// `Kind namespace/name` (or `Kind name`), for messages.
fn describe<K: WatchedKind>(key: Option<&ObjectKey>) -> String {
    match key {
        Some(key) if K::NAMESPACED => format!("{} {key}", K::KIND),
        Some(key) => format!("{} {}", K::KIND, key.name),
        None => format!("{} without metadata.name", K::KIND),
    }
}

/// Decodes one object into its real type. The error names the object and
/// the field: `Service default/web: spec.ports: invalid type: ...`.
pub fn decode<K: WatchedKind>(raw: &RawObject<K>) -> Result<(ObjectKey, K), String> {
    let key = key_of(raw);
    let Some(key) = key else {
        return Err(format!("{}: metadata.name is missing", describe::<K>(None)));
    };
    serde_path_to_error::deserialize::<_, K>(&raw.body)
        .map(|object| (key.clone(), object))
        .map_err(|error| {
            let path = error.path().to_string();
            let field = if path == "." { "(object)" } else { &path };
            format!("{}: {field}: {}", describe::<K>(Some(&key)), error.inner())
        })
}

/// One kind's share of the store: what a relist in progress has collected.
struct KindStore<K> {
    listed_once: bool,
    relist: Option<BTreeMap<ObjectKey, ClusterObject>>,
    kind: PhantomData<fn() -> K>,
}

impl<K: WatchedKind> KindStore<K> {
    fn new() -> Self {
        KindStore {
            listed_once: false,
            relist: None,
            kind: PhantomData,
        }
    }

    /// Applies one watcher event to `state`; true when `state` changed.
    fn apply(
        &mut self,
        event: Event<RawObject<K>>,
        state: &mut ClusterState,
        metrics: &Metrics,
    ) -> bool {
        match event {
            Event::Init => {
                if self.listed_once {
                    log::info!("{}: relisting", K::KIND);
                    metrics.source_relist(K::KIND);
                }
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(raw) => {
                let Some(buffer) = self.relist.as_mut() else {
                    return false;
                };
                match decode(&raw) {
                    Ok((key, object)) => {
                        buffer.insert(key, object.into_object());
                    }
                    Err(error) => {
                        log::warn!("{error}; skipped");
                        metrics.source_bad_object(K::KIND);
                        // The last good version, if any, stays in force.
                        if let Some(key) = key_of(&raw)
                            && let Some(previous) = K::stored(state, &key)
                        {
                            buffer.insert(key, previous);
                        }
                    }
                }
                false
            }
            Event::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                for key in K::stored_keys(state) {
                    if !listed.contains_key(&key) {
                        K::remove(state, &key);
                    }
                }
                let count = listed.len();
                for (_, object) in listed {
                    state.upsert(object);
                }
                if !self.listed_once {
                    log::info!("{}: listed {count}", K::KIND);
                }
                self.listed_once = true;
                true
            }
            Event::Apply(raw) => match decode(&raw) {
                Ok((_, object)) => state.upsert(object.into_object()),
                Err(error) => {
                    log::warn!("{error}; skipped");
                    metrics.source_bad_object(K::KIND);
                    false
                }
            },
            Event::Delete(raw) => match key_of(&raw) {
                Some(key) => {
                    K::remove(state, &key);
                    true
                }
                None => false,
            },
        }
    }
}

/// A watcher event of one of the three kinds.
enum Update {
    Service(Result<Event<RawObject<Service>>, watcher::Error>),
    EndpointSlice(Result<Event<RawObject<EndpointSlice>>, watcher::Error>),
    Node(Result<Event<RawObject<Node>>, watcher::Error>),
}

fn watch_kind<K: WatchedKind>(
    client: &Client,
    config: watcher::Config,
    wrap: fn(Result<Event<RawObject<K>>, watcher::Error>) -> Update,
) -> BoxStream<'static, Update> {
    let api: Api<RawObject<K>> = Api::all(client.clone());
    watcher::watcher(api, config)
        .default_backoff()
        .map(wrap)
        .boxed()
}

/// The three stores and the state they make up.
struct Reflector {
    state: ClusterState,
    services: KindStore<Service>,
    slices: KindStore<EndpointSlice>,
    nodes: KindStore<Node>,
}

impl Reflector {
    fn apply(&mut self, update: Update, metrics: &Metrics) -> bool {
        let changed = match update {
            Update::Service(Ok(event)) => self.services.apply(event, &mut self.state, metrics),
            Update::EndpointSlice(Ok(event)) => self.slices.apply(event, &mut self.state, metrics),
            Update::Node(Ok(event)) => self.nodes.apply(event, &mut self.state, metrics),
            Update::Service(Err(error)) => watch_failed::<Service>(&error, metrics),
            Update::EndpointSlice(Err(error)) => watch_failed::<EndpointSlice>(&error, metrics),
            Update::Node(Err(error)) => watch_failed::<Node>(&error, metrics),
        };
        if changed {
            metrics.change_arrived();
        }
        changed
    }

    fn synced(&self) -> bool {
        self.services.listed_once && self.slices.listed_once && self.nodes.listed_once
    }
}

fn watch_failed<K: WatchedKind>(error: &watcher::Error, metrics: &Metrics) -> bool {
    log::warn!(
        "watching {}: {error}; backing off, the datapath keeps its programming",
        K::URL_PATH_SEGMENT
    );
    metrics.source_error(K::KIND);
    false
}

/// Most events applied before one snapshot is published; a long burst is
/// published in pieces rather than delayed.
const MAX_BATCH: usize = 1024;

/// Watches Services, EndpointSlices and the Node `node_name`, publishing a
/// snapshot through `sender` after every batch of changes, once all three
/// are listed. Meant for `tokio::spawn`; returns when every receiver is gone.
pub async fn watch_cluster(
    client: Client,
    node_name: String,
    sender: watch::Sender<Arc<ClusterState>>,
    metrics: Arc<Metrics>,
) {
    let node_config = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let mut updates = futures::stream::select_all([
        watch_kind::<Service>(&client, watcher::Config::default(), Update::Service),
        watch_kind::<EndpointSlice>(&client, watcher::Config::default(), Update::EndpointSlice),
        watch_kind::<Node>(&client, node_config, Update::Node),
    ]);
    let mut reflector = Reflector {
        state: ClusterState::default(),
        services: KindStore::new(),
        slices: KindStore::new(),
        nodes: KindStore::new(),
    };
    let mut published_once = false;
    loop {
        let update = tokio::select! {
            update = updates.next() => update,
            _ = sender.closed() => return,
        };
        // The watchers never end on their own (errors are items).
        let Some(update) = update else { return };
        let mut changed = reflector.apply(update, &metrics);
        // Coalesce what is already waiting into the same snapshot.
        for _ in 0..MAX_BATCH {
            match updates.next().now_or_never() {
                Some(Some(update)) => changed |= reflector.apply(update, &metrics),
                _ => break,
            }
        }
        // Publish once every kind is listed: the first time, then on changes.
        let due = changed || !published_once;
        if !reflector.synced() || !due {
            continue;
        }
        if !published_once {
            log::info!(
                "API: synced {} services, {} endpoint slices, {} nodes",
                reflector.state.services().count(),
                reflector.state.endpoint_slices().count(),
                reflector.state.nodes().count()
            );
        }
        published_once = true;
        if sender.send(Arc::new(reflector.state.clone())).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw<K>(body: Value) -> RawObject<K> {
        serde_json::from_value(body).expect("any JSON object is a RawObject")
    }

    fn service(name: &str, rv: &str, ports: Value) -> Value {
        json!({
            "metadata": {"namespace": "default", "name": name, "resourceVersion": rv,
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "spec": {"clusterIP": "10.96.0.10", "ports": ports, "unknownField": true}
        })
    }

    #[test]
    fn a_bad_item_does_not_fail_its_list() {
        let list: Vec<RawObject<Service>> = serde_json::from_value(json!([
            service("good", "5", json!([{"port": 80}])),
            service("broken", "6", json!("oops")),
            {"metadata": {"name": ["not", "a", "string"]}, "spec": {}},
        ]))
        .expect("the list decodes whatever its items hold");
        assert_eq!(list.len(), 3);
        assert_eq!(list[1].metadata.resource_version.as_deref(), Some("6"));
        assert!(decode(&list[0]).is_ok());
        assert_eq!(
            decode(&list[1]).expect_err("wrong type"),
            "Service default/broken: spec.ports: invalid type: string \"oops\", expected a sequence"
        );
        assert_eq!(
            decode(&list[2]).expect_err("no name"),
            "Service without metadata.name: metadata.name is missing"
        );
    }

    #[test]
    fn a_wrong_type_is_named_by_its_path() {
        // k8s-openapi 0.29 defaults missing required fields (an absent
        // addressType decodes as ""); the model reports those by name.
        let slice: RawObject<EndpointSlice> = raw(json!({
            "metadata": {"namespace": "default", "name": "web-1"},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": "10.0.0.2"}]
        }));
        assert_eq!(
            decode(&slice).expect_err("addresses is a list"),
            "EndpointSlice default/web-1: endpoints[1].addresses: invalid type: \
             string \"10.0.0.2\", expected a sequence"
        );
    }

    fn apply_all<K: WatchedKind>(
        store: &mut KindStore<K>,
        state: &mut ClusterState,
        events: Vec<Event<RawObject<K>>>,
    ) -> bool {
        let metrics = Metrics::new(None);
        events.into_iter().fold(false, |changed, event| {
            store.apply(event, state, &metrics) | changed
        })
    }

    #[test]
    fn relist_replaces_the_kind_and_keeps_the_last_good_version() {
        let mut state = ClusterState::default();
        let mut store = KindStore::<Service>::new();
        assert!(apply_all(
            &mut store,
            &mut state,
            vec![
                Event::Init,
                Event::InitApply(raw(service("web", "1", json!([{"port": 80}])))),
                Event::InitApply(raw(service("gone", "2", json!([{"port": 81}])))),
                Event::InitApply(raw(service("soon-bad", "3", json!([{"port": 82}])))),
                Event::InitDone,
            ]
        ));
        assert_eq!(state.services().count(), 3);
        let stored = state.service("default", "web").expect("web");
        assert_eq!(stored.metadata.annotations, None, "stripped by upsert");

        // Relist: `gone` was deleted while the watch was down, `soon-bad`
        // became unreadable; nothing changes until the relist is complete.
        assert!(!apply_all(
            &mut store,
            &mut state,
            vec![
                Event::Init,
                Event::InitApply(raw(service("web", "7", json!([{"port": 80}])))),
                Event::InitApply(raw(service("soon-bad", "8", json!("oops")))),
            ]
        ));
        assert_eq!(state.services().count(), 3, "half a relist is not applied");
        assert!(apply_all(&mut store, &mut state, vec![Event::InitDone]));
        let names: Vec<String> = state.services().map(|(key, _)| key.name.clone()).collect();
        assert_eq!(names, ["soon-bad", "web"]);
        assert_eq!(
            state
                .service("default", "soon-bad")
                .and_then(|s| s.metadata.resource_version.as_deref()),
            Some("3"),
            "the last good version stays"
        );

        // Watch events: a bad update is skipped, a delete removes.
        assert!(!apply_all(
            &mut store,
            &mut state,
            vec![Event::Apply(raw(service("web", "9", json!(7))))]
        ));
        assert!(apply_all(
            &mut store,
            &mut state,
            vec![Event::Delete(raw(service("web", "10", json!([]))))]
        ));
        assert!(state.service("default", "web").is_none());
    }

    #[test]
    fn nodes_are_keyed_by_name() {
        let mut state = ClusterState::default();
        let mut store = KindStore::<Node>::new();
        let node = json!({"metadata": {"name": "node-1", "resourceVersion": "4"}});
        apply_all(
            &mut store,
            &mut state,
            vec![
                Event::Init,
                Event::InitApply(raw(node.clone())),
                Event::InitDone,
            ],
        );
        assert!(state.node("node-1").is_some());
        apply_all(&mut store, &mut state, vec![Event::Delete(raw(node))]);
        assert!(state.node("node-1").is_none());
    }
}
