//! The shipped manifests under `deploy/`, decoded into the Kubernetes API
//! types, and what the end-to-end tests take from them to run the agent the
//! way the DaemonSet does (its capabilities, its init container).

use std::path::{Path, PathBuf};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::Deserialize;

#[derive(Default)]
pub struct Manifests {
    pub daemon_sets: Vec<DaemonSet>,
    pub service_accounts: Vec<ServiceAccount>,
    pub cluster_roles: Vec<ClusterRole>,
    pub bindings: Vec<ClusterRoleBinding>,
    pub config_maps: Vec<ConfigMap>,
}

pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of every `*.yaml` file, decoded by its kind; anything
/// unknown or malformed panics naming the file and document.
pub fn load() -> Manifests {
    let mut manifests = Manifests::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/ exists")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in deploy/");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read manifest");
        for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value = serde_yaml::Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{} document {}: {e}", file.display(), index + 1));
            let kind = value["kind"].as_str().unwrap_or_default().to_owned();
            let at = format!("{} document {} ({kind})", file.display(), index + 1);
            fn decode<T: serde::de::DeserializeOwned>(value: serde_yaml::Value, at: &str) -> T {
                serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{at}: {e}"))
            }
            match kind.as_str() {
                "DaemonSet" => manifests.daemon_sets.push(decode(value, &at)),
                "ServiceAccount" => manifests.service_accounts.push(decode(value, &at)),
                "ClusterRole" => manifests.cluster_roles.push(decode(value, &at)),
                "ClusterRoleBinding" => manifests.bindings.push(decode(value, &at)),
                "ConfigMap" => manifests.config_maps.push(decode(value, &at)),
                other => panic!("{at}: unexpected kind {other:?}"),
            }
        }
    }
    manifests
}

/// The DaemonSet's pod spec.
pub fn pod_spec(manifests: &Manifests) -> &k8s_openapi::api::core::v1::PodSpec {
    assert_eq!(manifests.daemon_sets.len(), 1, "one DaemonSet in deploy/");
    manifests.daemon_sets[0]
        .spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .expect("the DaemonSet has a pod spec")
}

/// The agent's container (the first).
pub fn agent_container(manifests: &Manifests) -> &Container {
    pod_spec(manifests)
        .containers
        .first()
        .expect("the DaemonSet has a container")
}

/// The agent container's capabilities as the DaemonSet ships them: every
/// one is dropped (`drop: [ALL]` is required) and these are added back,
/// as upper-case names without `CAP_` (`BPF`, `NET_ADMIN`), sorted.
pub fn agent_capabilities(manifests: &Manifests) -> Vec<String> {
    let security = agent_container(manifests)
        .security_context
        .as_ref()
        .expect("the agent container has a securityContext");
    assert_ne!(
        security.privileged,
        Some(true),
        "the agent is not privileged"
    );
    let capabilities = security
        .capabilities
        .as_ref()
        .expect("the agent container lists its capabilities");
    assert_eq!(
        capabilities.drop.as_deref(),
        Some(&["ALL".to_owned()][..]),
        "the agent container drops every capability it does not add"
    );
    let mut added: Vec<String> = capabilities
        .add
        .iter()
        .flatten()
        .map(|c| c.trim_start_matches("CAP_").to_ascii_uppercase())
        .collect();
    added.sort();
    added.dedup();
    added
}

/// The command lines of the init containers, in order (`command` then
/// `args`), each with whether it runs privileged.
pub fn init_commands(manifests: &Manifests) -> Vec<(Vec<String>, bool)> {
    pod_spec(manifests)
        .init_containers
        .iter()
        .flatten()
        .map(|c| {
            let mut line: Vec<String> = c.command.clone().unwrap_or_default();
            line.extend(c.args.clone().unwrap_or_default());
            let privileged = c
                .security_context
                .as_ref()
                .and_then(|s| s.privileged)
                .unwrap_or(false);
            (line, privileged)
        })
        .collect()
}
