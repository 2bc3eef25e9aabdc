//! The deployment manifests under `deploy/` parse into the Kubernetes API
//! types (k8s-openapi, the same schema the API server enforces), so they
//! cannot rot silently, and they keep the properties the README promises.

use std::path::Path;

use lb_tests::deploy::{self, load};

#[test]
fn every_manifest_parses_into_api_types() {
    let manifests = load();
    assert_eq!(manifests.daemon_sets.len(), 1);
    assert_eq!(manifests.service_accounts.len(), 1);
    assert_eq!(manifests.cluster_roles.len(), 1);
    assert_eq!(manifests.bindings.len(), 1);
    assert_eq!(manifests.config_maps.len(), 1);
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

#[test]
fn an_init_container_sets_what_the_read_only_agent_checks() {
    let manifests = load();
    let commands = deploy::init_commands(&manifests);
    // The agent refuses to start without it (tests/e2e_as_shipped.rs runs
    // this very command line in each node before the agent).
    let sets_accept_local = commands.iter().any(|(line, privileged)| {
        *privileged
            && line
                .join(" ")
                .contains("echo 1 > /proc/sys/net/ipv4/conf/all/accept_local")
    });
    assert!(sets_accept_local, "{commands:?}");
    // Same image as the agent: nothing else to pull or trust.
    let pod = deploy::pod_spec(&manifests);
    let agent_image = &deploy::agent_container(&manifests).image;
    for init in pod.init_containers.iter().flatten() {
        assert_eq!(&init.image, agent_image, "init container {}", init.name);
    }
}

#[test]
fn a_slow_first_sync_is_not_killed_by_the_liveness_probe() {
    let manifests = load();
    let container = deploy::agent_container(&manifests);
    let startup = container.startup_probe.as_ref().expect("startupProbe");
    let get = startup.http_get.as_ref().expect("HTTP startup probe");
    // /livez: the node's eligibility is no reason to restart the agent.
    assert_eq!(get.path.as_deref(), Some("/livez"));
    let budget = startup.period_seconds.unwrap_or(10) * startup.failure_threshold.unwrap_or(3);
    // The first program of 100k services took 11 s on the benchmark
    // machine (docs/benchmarks.md): ten times that and more.
    assert!(budget >= 120, "startup budget {budget} s");
    let liveness = container.liveness_probe.as_ref().expect("livenessProbe");
    assert_eq!(
        liveness.initial_delay_seconds, None,
        "startupProbe gates it"
    );
}

/// MiB in a Kubernetes quantity (`192Mi`, `1536Mi`, `2Gi`).
fn mebibytes(quantity: &str) -> f64 {
    if let Some(n) = quantity.strip_suffix("Mi") {
        n.parse().expect("Mi quantity")
    } else if let Some(n) = quantity.strip_suffix("Gi") {
        n.parse::<f64>().expect("Gi quantity") * 1024.0
    } else {
        panic!("memory quantity {quantity:?}: use Mi or Gi")
    }
}

/// The agent's RSS in MiB at `services` (`10k`, `100k`) from
/// docs/benchmarks.md's agent memory table: (median, highest).
fn measured_rss(services: &str) -> (f64, f64) {
    let doc = std::fs::read_to_string(deploy::deploy_dir().join("../docs/benchmarks.md"))
        .expect("docs/benchmarks.md");
    let section = doc
        .split("## 5. Agent memory")
        .nth(1)
        .expect("benchmarks.md has the agent memory section");
    let row = section
        .lines()
        .find(|l| l.starts_with(&format!("| {services} |")))
        .unwrap_or_else(|| panic!("no {services} row in the agent memory table"));
    // | 10k | 132 (132-143) | ...
    let cell = row.split('|').nth(2).expect("RSS cell").trim();
    let (median, range) = cell.split_once(' ').expect("median (low-high)");
    let high = range
        .trim_matches(|c| c == '(' || c == ')')
        .split('-')
        .nth(1)
        .expect("high");
    (median.parse().expect("median"), high.parse().expect("high"))
}

#[test]
fn memory_request_and_limit_come_from_the_measured_rss() {
    let manifests = load();
    let resources = deploy::agent_container(&manifests)
        .resources
        .as_ref()
        .expect("resources");
    let quantity = |map: &Option<
        std::collections::BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    >| {
        mebibytes(&map.as_ref().expect("set").get("memory").expect("memory").0)
    };
    let request = quantity(&resources.requests);
    let limit = quantity(&resources.limits);
    let (_, high_10k) = measured_rss("10k");
    let (median_100k, high_100k) = measured_rss("100k");
    // A 10k-service node is scheduled with room to spare, a 100k-service
    // one is not OOM-killed on its first sync, and neither is far off.
    assert!(
        request >= high_10k * 1.2 && request <= high_10k * 2.0,
        "request {request} MiB against 10k services' {high_10k} MiB"
    );
    assert!(
        limit >= high_100k * 1.2 && limit <= median_100k * 2.0,
        "limit {limit} MiB against 100k services' {high_100k} MiB"
    );
}

#[test]
fn the_api_server_address_can_come_from_the_config_map() {
    let manifests = load();
    let config = &manifests.config_maps[0];
    let name = config.metadata.name.clone().expect("ConfigMap name");
    assert_eq!(
        config.metadata.namespace,
        manifests.daemon_sets[0].metadata.namespace
    );
    let env = deploy::agent_container(&manifests)
        .env
        .clone()
        .unwrap_or_default();
    for var in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"] {
        let from = env
            .iter()
            .find(|e| e.name == var)
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.config_map_key_ref.as_ref())
            .unwrap_or_else(|| panic!("{var} does not come from a ConfigMap"));
        assert_eq!(from.name, name, "{var}");
        assert_eq!(from.key, var);
        // Unset keys keep the kubelet's value (a cluster with kube-proxy).
        assert_eq!(from.optional, Some(true), "{var}");
    }
    // Shipped unset: an address only the cluster's owner knows.
    let data = config.data.clone().unwrap_or_default();
    for var in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"] {
        assert!(
            !data.contains_key(var),
            "{var} is set in the shipped ConfigMap"
        );
    }
}
