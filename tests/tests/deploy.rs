//! The deployment manifests under `deploy/` parse into the Kubernetes API
//! types (k8s-openapi, the same schema the API server enforces), so they
//! cannot rot silently, and they keep the properties the README promises.

use std::path::{Path, PathBuf};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::Deserialize;

#[derive(Default)]
struct Manifests {
    daemon_sets: Vec<DaemonSet>,
    config_maps: Vec<ConfigMap>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of every `*.yaml` file, decoded by its kind; anything
/// unknown or malformed fails the test naming the file and document.
fn load() -> Manifests {
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
                "ConfigMap" => manifests.config_maps.push(decode(value, &at)),
                "ServiceAccount" => manifests.service_accounts.push(decode(value, &at)),
                "ClusterRole" => manifests.cluster_roles.push(decode(value, &at)),
                "ClusterRoleBinding" => manifests.bindings.push(decode(value, &at)),
                other => panic!("{at}: unexpected kind {other:?}"),
            }
        }
    }
    manifests
}

#[test]
fn every_manifest_parses_into_api_types() {
    let manifests = load();
    assert_eq!(manifests.daemon_sets.len(), 1);
    assert_eq!(manifests.config_maps.len(), 1);
    assert_eq!(manifests.service_accounts.len(), 1);
    assert_eq!(manifests.cluster_roles.len(), 1);
    assert_eq!(manifests.bindings.len(), 1);
}

#[test]
fn the_role_only_reads_services_endpointslices_and_nodes() {
    let manifests = load();
    let rules = manifests.cluster_roles[0].rules.clone().unwrap_or_default();
    let mut granted: Vec<(String, String)> = Vec::new();
    for rule in &rules {
        let mut verbs = rule.verbs.clone();
        verbs.sort();
        assert_eq!(verbs, ["get", "list", "watch"], "{rule:?}");
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                granted.push((group.clone(), resource.clone()));
            }
        }
    }
    granted.sort();
    assert_eq!(
        granted,
        [
            (String::new(), "nodes".to_owned()),
            (String::new(), "services".to_owned()),
            ("discovery.k8s.io".to_owned(), "endpointslices".to_owned()),
        ]
    );
    let binding = &manifests.bindings[0];
    let account = &manifests.service_accounts[0];
    assert_eq!(
        binding.role_ref.name,
        manifests.cluster_roles[0]
            .metadata
            .name
            .clone()
            .unwrap_or_default()
    );
    let subject = &binding.subjects.as_ref().expect("subjects")[0];
    assert_eq!(Some(&subject.name), account.metadata.name.as_ref());
    assert_eq!(subject.namespace, account.metadata.namespace);
}

#[test]
fn the_daemon_set_runs_everywhere_with_minimal_capabilities() {
    let manifests = load();
    let daemon_set = &manifests.daemon_sets[0];
    let pod = daemon_set
        .spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.service_account_name,
        manifests.service_accounts[0].metadata.name
    );
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "must tolerate every taint"
    );
    let container = &pod.containers[0];
    let security = container
        .security_context
        .as_ref()
        .expect("securityContext");
    assert_ne!(security.privileged, Some(true));
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    let mut added = capabilities.add.clone().unwrap_or_default();
    added.sort();
    assert_eq!(added, ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"]);
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));

    let probe = container
        .liveness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("HTTP liveness probe");
    // /livez: a node being deleted fails /healthz, which must not restart
    // the agent.
    assert_eq!(probe.path.as_deref(), Some("/livez"));
    assert_eq!(
        probe.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(10256)
    );

    let mounts: Vec<&str> = container
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(
        mounts.contains(&"/sys/fs/bpf") && mounts.contains(&"/sys/fs/cgroup"),
        "{mounts:?}"
    );
    let args = container.args.clone().unwrap_or_default();
    // In-cluster configuration: no file source, no kubeconfig.
    assert!(
        !args
            .iter()
            .any(|a| a.starts_with("--manifests") || a.starts_with("--kubeconfig")),
        "{args:?}"
    );
    assert!(
        args.iter().any(|a| a.starts_with("--bpffs=/sys/fs/bpf/")),
        "{args:?}"
    );
}

/// The DaemonSet reads the ConfigMap's KubeProxyConfiguration with
/// `--config`, as kube-proxy's does: mounted where the flag points, and a
/// file the agent takes whole (no field ignored or unknown).
#[test]
fn the_daemon_set_reads_the_config_map_with_config() {
    let manifests = load();
    let config_map = &manifests.config_maps[0];
    let pod = manifests.daemon_sets[0]
        .spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .expect("pod spec");
    let container = &pod.containers[0];
    let args = container.args.clone().unwrap_or_default();
    let config = args
        .iter()
        .find_map(|a| a.strip_prefix("--config="))
        .expect("--config in the args");
    let config = Path::new(config);
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| config.starts_with(&m.mount_path))
        .expect("a volume mounted where --config points");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("the mounted volume");
    assert_eq!(
        volume.config_map.as_ref().map(|c| c.name.as_str()),
        config_map.metadata.name.as_deref(),
        "the volume is the ConfigMap"
    );
    let key = config
        .strip_prefix(&mount.mount_path)
        .expect("under the mount")
        .to_str()
        .expect("utf-8");
    let text = config_map
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .unwrap_or_else(|| panic!("ConfigMap key {key}"));
    let loaded = lb_agent::kube_proxy::parse(text).unwrap_or_else(|e| panic!("{key}: {e}"));
    assert!(loaded.ignored.is_empty(), "{:?}", loaded.ignored);
    assert!(loaded.unknown.is_empty(), "{:?}", loaded.unknown);
    assert!(loaded.notes.is_empty(), "{:?}", loaded.notes);
    assert_eq!(loaded.config.mode.as_deref(), Some("ebpf"));
    assert_eq!(
        loaded.config.healthz_bind_address.map(|a| a.port()),
        Some(10256),
        "the probes' port"
    );
    assert_eq!(
        loaded.config.udp_timeout,
        Some(std::time::Duration::from_secs(30))
    );
}
