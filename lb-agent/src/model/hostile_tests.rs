//! Hostile and broken input (issue 8): every case gets an error naming the
//! object and the field (or none, when the input is legal), a well-formed
//! service next to it keeps its frontends, and nothing panics. Also the
//! model and the programmer at 100k endpoints in one service, and the
//! programmer against maps that are too small. No kernel, no I/O.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use lb_common::{
    backend::Lb4Backend,
    member::Lb4MemberKey,
    service::{Lb4Service, Lb4ServiceKey},
    slot::{Lb4Slot, Lb4SlotKey},
};

use super::*;
use crate::datapath::{Programmer, SourceRangeEntry, TableWriter};
use crate::source::files::parse_manifest;

const NODE: &str = "node-a";

/// The well-formed neighbour of every case.
const GOOD: &str = r#"
apiVersion: v1
kind: Service
metadata: {namespace: default, name: good}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: default
  name: good-1
  labels: {kubernetes.io/service-name: good}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.0.1.1]
  conditions: {ready: true}
"#;

fn node() -> NodeIdentity {
    NodeIdentity {
        name: NODE.to_owned(),
        nodeport_addresses: vec!["192.0.2.1".parse().expect("address")],
        ..NodeIdentity::default()
    }
}

/// Loads `yaml` after [`GOOD`], returning the source's and the model's
/// errors as `object: field` strings, and the tables.
fn run(yaml: &str) -> (DesiredTables, Vec<String>, Vec<String>) {
    let mut state = ClusterState::default();
    let text = format!("{GOOD}---\n{yaml}");
    let source_errors = parse_manifest(Path::new("hostile.yaml"), text.as_bytes(), &mut state)
        .iter()
        .map(ToString::to_string)
        .collect();
    let (tables, errors) = desired_tables(&state, &node());
    let located = errors
        .iter()
        .map(|e| {
            assert!(!e.message.is_empty(), "{e:?} says nothing");
            format!("{}: {}", e.object, e.field)
        })
        .collect();
    (tables, source_errors, located)
}

fn frontends_of(tables: &DesiredTables, name: &str) -> Vec<String> {
    tables
        .frontends
        .iter()
        .filter(|(_, spec)| spec.service.name == name)
        .map(|(frontend, _)| frontend.to_string())
        .collect()
}

fn assert_good(tables: &DesiredTables, case: &str) {
    assert_eq!(
        frontends_of(tables, "good"),
        ["10.96.0.10:80/TCP"],
        "{case}: the good service lost its frontend"
    );
    let spec = &tables.frontends
        [&Frontend::new("10.96.0.10".parse().expect("address"), 80, Protocol::Tcp)];
    assert_eq!(spec.backends.len(), 1, "{case}: the good service's backend");
}

fn service(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{namespace: default, name: {name}}}\nspec:\n{spec}\n---\n"
    )
}

fn slice(name: &str, service: &str, body: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  namespace: default\n  name: {name}\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\n{body}\n---\n"
    )
}

struct Case {
    name: &'static str,
    yaml: String,
    /// Model errors, `object: field`, in order.
    errors: Vec<&'static str>,
    /// Frontends of the service `x`.
    frontends: Vec<&'static str>,
}

#[test]
fn hostile_fields_are_named_and_contained() {
    let cases = [
        Case {
            name: "clusterIP with a leading zero (ambiguous octal) is refused",
            yaml: service("x", "  clusterIP: 010.96.0.40\n  ports: [{port: 80}]"),
            errors: vec!["Service default/x: spec.clusterIP"],
            frontends: vec![],
        },
        Case {
            name: "clusterIP with three octets",
            yaml: service("x", "  clusterIP: 10.96.40\n  ports: [{port: 80}]"),
            errors: vec!["Service default/x: spec.clusterIP"],
            frontends: vec![],
        },
        Case {
            name: "clusterIP that is a CIDR",
            yaml: service("x", "  clusterIP: 10.96.0.40/32\n  ports: [{port: 80}]"),
            errors: vec!["Service default/x: spec.clusterIP"],
            frontends: vec![],
        },
        Case {
            name: "externalIP with spaces and a hostname",
            yaml: service(
                "x",
                "  clusterIP: 10.96.0.40\n  externalIPs: [' 203.0.113.1', example.com, 203.0.113.2]\n  ports: [{port: 80}]",
            ),
            errors: vec![
                "Service default/x: spec.externalIPs[0]",
                "Service default/x: spec.externalIPs[1]",
            ],
            frontends: vec!["10.96.0.40:80/TCP", "203.0.113.2:80/TCP"],
        },
        Case {
            name: "source ranges: prefix too long, negative, missing, garbage",
            yaml: service(
                "x",
                "  type: LoadBalancer\n  clusterIP: 10.96.0.40\n  loadBalancerSourceRanges: [10.0.0.0/33, 10.0.0.0/-1, 10.0.0.0/, /8, 10.0.0.0/8/8, 198.51.100.0/24]\n  ports: [{port: 80, nodePort: 30080}]\nstatus:\n  loadBalancer: {ingress: [{ip: 203.0.113.9}]}",
            ),
            errors: vec![
                "Service default/x: spec.loadBalancerSourceRanges[0]",
                "Service default/x: spec.loadBalancerSourceRanges[1]",
                "Service default/x: spec.loadBalancerSourceRanges[2]",
                "Service default/x: spec.loadBalancerSourceRanges[3]",
                "Service default/x: spec.loadBalancerSourceRanges[4]",
            ],
            frontends: vec![
                "10.96.0.40:80/TCP",
                "192.0.2.1:30080/TCP",
                "203.0.113.9:80/TCP",
            ],
        },
        Case {
            name: "nodePort 0 is 'unallocated', 65536 and in-range-only",
            yaml: service(
                "x",
                "  type: NodePort\n  clusterIP: 10.96.0.40\n  ports: [{name: a, port: 80, nodePort: 65536}, {name: b, port: 81, nodePort: 30081}]",
            ),
            errors: vec!["Service default/x: spec.ports[0].nodePort"],
            frontends: vec![
                "10.96.0.40:80/TCP",
                "10.96.0.40:81/TCP",
                "192.0.2.1:30081/TCP",
            ],
        },
        Case {
            // kube-proxy never reads targetPort (the EndpointSlice carries
            // the resolved port), and neither do we: no error, the ports
            // exist and reject until a slice gives them endpoints.
            name: "targetPort 0 and 65536 are not the proxy's business",
            yaml: service(
                "x",
                "  clusterIP: 10.96.0.40\n  ports: [{name: a, port: 80, targetPort: 0}, {name: b, port: 81, targetPort: 65536}]",
            ),
            errors: vec![],
            frontends: vec!["10.96.0.40:80/TCP", "10.96.0.40:81/TCP"],
        },
        Case {
            name: "duplicate port on the same protocol, different names",
            yaml: service(
                "x",
                "  clusterIP: 10.96.0.40\n  ports: [{name: a, port: 80}, {name: a, port: 80}]",
            ),
            errors: vec!["Service default/x: spec.ports[1].port"],
            frontends: vec!["10.96.0.40:80/TCP"],
        },
        Case {
            name: "huge affinity timeouts disable affinity only",
            yaml: service(
                "x",
                "  clusterIP: 10.96.0.40\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2147483647}}\n  ports: [{port: 80}]",
            ),
            errors: vec!["Service default/x: spec.sessionAffinityConfig.clientIP.timeoutSeconds"],
            frontends: vec!["10.96.0.40:80/TCP"],
        },
        Case {
            name: "negative affinity timeout",
            yaml: service(
                "x",
                "  clusterIP: 10.96.0.40\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: -5}}\n  ports: [{port: 80}]",
            ),
            errors: vec!["Service default/x: spec.sessionAffinityConfig.clientIP.timeoutSeconds"],
            frontends: vec!["10.96.0.40:80/TCP"],
        },
        Case {
            name: "healthCheckNodePort out of range",
            yaml: service(
                "x",
                "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 65536\n  clusterIP: 10.96.0.40\n  ports: [{port: 80, nodePort: 30082}]",
            ),
            errors: vec!["Service default/x: spec.healthCheckNodePort"],
            frontends: vec![
                "10.96.0.40:80/TCP",
                "192.0.2.1:30082/TCP",
                "192.0.2.1:30082/TCP (internal)",
            ],
        },
        Case {
            name: "endpoint addresses: leading zero, CIDR, empty list",
            yaml: service("x", "  clusterIP: 10.96.0.40\n  ports: [{port: 80}]")
                + &slice(
                    "x-1",
                    "x",
                    "ports: [{port: 8080}]\nendpoints: [{addresses: [010.0.9.1]}, {addresses: [10.0.9.2/32]}, {addresses: []}, {addresses: [10.0.9.3]}]",
                ),
            errors: vec![
                "EndpointSlice default/x-1: endpoints[0].addresses[0]",
                "EndpointSlice default/x-1: endpoints[1].addresses[0]",
            ],
            frontends: vec!["10.96.0.40:80/TCP"],
        },
        Case {
            name: "endpoint port 0",
            yaml: service("x", "  clusterIP: 10.96.0.40\n  ports: [{port: 80}]")
                + &slice(
                    "x-1",
                    "x",
                    "ports: [{port: 0}]\nendpoints: [{addresses: [10.0.9.1]}]",
                ),
            errors: vec![
                "EndpointSlice default/x-1: ports[0].port",
                "Service default/x: spec.ports[0].targetPort",
            ],
            frontends: vec!["10.96.0.40:80/TCP"],
        },
    ];
    for case in cases {
        let (tables, source_errors, errors) = run(&case.yaml);
        assert!(
            source_errors.is_empty(),
            "{}: the source refused valid YAML: {source_errors:?}",
            case.name
        );
        let mut want = case.errors.clone();
        want.sort();
        let mut got = errors.clone();
        got.sort();
        assert_eq!(got, want, "{}: errors", case.name);
        assert_eq!(frontends_of(&tables, "x"), case.frontends, "{}", case.name);
        assert_good(&tables, case.name);
    }
}

#[test]
fn selector_less_service_uses_hand_written_slices() {
    // No selector: the EndpointSlice controller does nothing, a person or
    // another controller writes the slices (here with a custom managed-by).
    let yaml = service(
        "x",
        "  clusterIP: 10.96.0.40\n  ports: [{port: 80, targetPort: 9000}]",
    ) + "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  namespace: default\n  name: x-manual\n  labels: {kubernetes.io/service-name: x, endpointslice.kubernetes.io/managed-by: admin}\naddressType: IPv4\nports: [{port: 9000}]\nendpoints: [{addresses: [192.0.2.50]}, {addresses: [192.0.2.51], conditions: {ready: false}}]\n";
    let (tables, source_errors, errors) = run(&yaml);
    assert!(
        source_errors.is_empty() && errors.is_empty(),
        "{source_errors:?} {errors:?}"
    );
    let spec = &tables.frontends
        [&Frontend::new("10.96.0.40".parse().expect("address"), 80, Protocol::Tcp)];
    let backends: Vec<String> = spec
        .backends
        .iter()
        .map(|b| format!("{}:{}", b.addr, b.port))
        .collect();
    // Absent conditions mean ready (the API's rule); ready: false is out.
    assert_eq!(backends, ["192.0.2.50:9000"]);
    assert_good(&tables, "selector-less");
}

#[test]
fn endpoint_slice_before_its_service_is_used_once_the_service_comes() {
    let slice_yaml = slice(
        "x-1",
        "x",
        "ports: [{port: 8080}]\nendpoints: [{addresses: [10.0.9.1]}]",
    );
    // The slice alone: reported as pointing at no Service, nothing programmed.
    let (tables, _, errors) = run(&slice_yaml);
    assert_eq!(
        errors,
        ["EndpointSlice default/x-1: metadata.labels[kubernetes.io/service-name]"]
    );
    assert!(frontends_of(&tables, "x").is_empty());
    // The slice first in the file, the Service after it: both used.
    let (tables, _, errors) =
        run(&(slice_yaml + &service("x", "  clusterIP: 10.96.0.40\n  ports: [{port: 80}]")));
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(frontends_of(&tables, "x"), ["10.96.0.40:80/TCP"]);
    assert_eq!(
        tables.frontends[&Frontend::new("10.96.0.40".parse().expect("address"), 80, Protocol::Tcp)]
            .backends
            .len(),
        1
    );
}

#[test]
fn objects_deleted_twice_are_no_ops() {
    let mut state = ClusterState::default();
    let errors = parse_manifest(Path::new("good.yaml"), GOOD.as_bytes(), &mut state);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(state.remove_endpoint_slice("default", "good-1").is_some());
    assert!(state.remove_endpoint_slice("default", "good-1").is_none());
    let (tables, errors) = desired_tables(&state, &node());
    // A Service whose slices went away: a frontend with no backends (rejects).
    assert!(errors.is_empty(), "{errors:?}");
    assert!(
        tables
            .frontends
            .values()
            .all(|spec| spec.backends.is_empty())
    );
    assert!(state.remove_service("default", "good").is_some());
    assert!(state.remove_service("default", "good").is_none());
    assert!(state.remove_node("never-there").is_none());
    assert_eq!(
        desired_tables(&state, &node()),
        (DesiredTables::default(), vec![])
    );
}

#[test]
fn yaml_that_is_not_kubernetes_is_reported_per_document() {
    let documents = [
        ("a scalar", "just a string"),
        ("a list", "[1, 2, 3]"),
        ("no kind", "apiVersion: v1\nmetadata: {name: y}"),
        (
            "kind is a list",
            "apiVersion: v1\nkind: [Service]\nmetadata: {name: y}",
        ),
        (
            "spec is a string",
            "apiVersion: v1\nkind: Service\nmetadata: {name: y}\nspec: hello",
        ),
        (
            "ports is a map",
            "apiVersion: v1\nkind: Service\nmetadata: {name: y}\nspec: {ports: {port: 80}}",
        ),
        (
            "port is a string",
            "apiVersion: v1\nkind: Service\nmetadata: {name: y}\nspec: {clusterIP: 10.96.0.41, ports: [{port: eighty}]}",
        ),
        (
            "items is not a list",
            "apiVersion: v1\nkind: List\nitems: 7",
        ),
        ("a deeply nested value", &"[".repeat(200)),
    ];
    for (what, document) in documents {
        let mut state = ClusterState::default();
        let text = format!("{GOOD}---\n{document}\n");
        let source_errors = parse_manifest(Path::new("junk.yaml"), text.as_bytes(), &mut state);
        let (tables, model_errors) = desired_tables(&state, &node());
        println!("{what}: {source_errors:?} {model_errors:?}");
        assert!(
            !source_errors.is_empty() || !model_errors.is_empty() || what == "no kind",
            "{what}: accepted silently"
        );
        for e in &source_errors {
            let text = e.to_string();
            assert!(
                text.starts_with("junk.yaml document"),
                "{what}: {text} names no document"
            );
        }
        assert_good(&tables, what);
    }
    // A kind we do not read and a foreign apiVersion of a kind we do are
    // ignored without noise (kubectl output mixes kinds).
    let (tables, source_errors, errors) = run(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {replicas: 3}\n---\napiVersion: example.com/v1\nkind: Service\nmetadata: {name: z}\nspec: 12\n",
    );
    println!("foreign kinds: {source_errors:?} {errors:?}");
    assert!(errors.is_empty(), "{errors:?}");
    assert_good(&tables, "foreign kinds");
}

/// `n` ready endpoints in slices of 1000 (the API's maximum per slice is
/// 1000), addresses 10.(n/65536).x.y.
fn big_service(n: usize) -> String {
    let mut yaml = service(
        "big",
        "  clusterIP: 10.96.0.99\n  ports: [{port: 80, targetPort: 8080}]",
    );
    for (index, chunk) in (0..n).collect::<Vec<_>>().chunks(1000).enumerate() {
        let endpoints: Vec<String> = chunk
            .iter()
            .map(|i| {
                format!(
                    "- addresses: [10.{}.{}.{}]",
                    100 + i / 65536,
                    (i / 256) % 256,
                    i % 256
                )
            })
            .collect();
        yaml += &slice(
            &format!("big-{index}"),
            "big",
            &format!(
                "ports: [{{port: 8080}}]\nendpoints:\n{}",
                endpoints.join("\n")
            ),
        );
    }
    yaml
}

#[test]
fn hundred_thousand_endpoints_in_one_service() {
    const ENDPOINTS: usize = 100_000;
    let yaml = format!("{GOOD}---\n{}", big_service(ENDPOINTS));
    let started = Instant::now();
    let mut state = ClusterState::default();
    let errors = parse_manifest(Path::new("big.yaml"), yaml.as_bytes(), &mut state);
    assert!(errors.is_empty(), "{errors:?}");
    let parsed = started.elapsed();
    let started = Instant::now();
    let (tables, errors) = desired_tables(&state, &node());
    let modelled = started.elapsed();
    println!("{ENDPOINTS} endpoints: manifest parsed in {parsed:?}, model in {modelled:?}");
    assert!(errors.is_empty(), "{errors:?}");
    let spec = &tables.frontends
        [&Frontend::new("10.96.0.99".parse().expect("address"), 80, Protocol::Tcp)];
    assert_eq!(spec.backends.len(), ENDPOINTS);

    // Maps of the default sizes hold it; maps that are too small refuse the
    // service with an error naming it, and keep what they held.
    let mut maps = CapacityMaps::new(usize::MAX, usize::MAX, usize::MAX);
    let mut programmer = Programmer::default();
    let started = Instant::now();
    let report = programmer.apply(&tables, &mut maps);
    println!(
        "{ENDPOINTS} endpoints programmed in {:?} ({} writes)",
        started.elapsed(),
        report.writes
    );
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(maps.slots.len(), ENDPOINTS + 1);

    let mut small = CapacityMaps::new(16, 1024, 1024);
    let mut programmer = Programmer::default();
    let only_good = desired_tables(&state_of(GOOD), &node()).0;
    assert!(programmer.apply(&only_good, &mut small).errors.is_empty());
    let before = small.clone();
    let report = programmer.apply(&tables, &mut small);
    assert!(
        report.errors.iter().any(|e| e.contains("default/big")),
        "no error names the service: {:?}",
        report.errors
    );
    // Every entry held before is still there, unchanged (the new
    // ClusterIP's marker may have been written: it only rejects).
    for (key, value) in &before.services {
        assert_eq!(
            small.services.get(key),
            Some(value),
            "service entry {key:?} changed"
        );
    }
    assert!(
        small
            .services
            .keys()
            .all(|k| before.services.contains_key(k) || k.port == 0),
        "a frontend of the refused service was programmed"
    );
    assert_eq!(small.slots, before.slots, "slots changed");
    assert_eq!(
        small.backends, before.backends,
        "backends left behind or lost"
    );
}

fn state_of(yaml: &str) -> ClusterState {
    let mut state = ClusterState::default();
    let errors = parse_manifest(Path::new("x.yaml"), yaml.as_bytes(), &mut state);
    assert!(errors.is_empty(), "{errors:?}");
    state
}

/// In-memory maps with a capacity each, failing inserts of new keys beyond
/// it as the kernel does (E2BIG).
#[derive(Clone, Debug, Default)]
struct CapacityMaps {
    services: BTreeMap<Lb4ServiceKey, Lb4Service>,
    slots: BTreeMap<Lb4SlotKey, Lb4Slot>,
    backends: BTreeMap<u32, Lb4Backend>,
    services6: BTreeMap<lb_common::service::Lb6ServiceKey, Lb4Service>,
    backends6: BTreeMap<u32, lb_common::backend::Lb6Backend>,
    members: std::collections::BTreeSet<Lb4MemberKey>,
    capacity: (usize, usize, usize),
}

impl CapacityMaps {
    fn new(services: usize, slots: usize, backends: usize) -> Self {
        CapacityMaps {
            capacity: (services, slots, backends),
            ..CapacityMaps::default()
        }
    }
}

fn put<K: Ord + Clone, V: Clone>(
    map: &mut BTreeMap<K, V>,
    capacity: usize,
    key: &K,
    value: &V,
) -> anyhow::Result<()> {
    if !map.contains_key(key) && map.len() >= capacity {
        anyhow::bail!("map full (E2BIG)");
    }
    map.insert(key.clone(), value.clone());
    Ok(())
}

impl TableWriter for CapacityMaps {
    fn put_service(&mut self, key: &Lb4ServiceKey, value: &Lb4Service) -> anyhow::Result<()> {
        put(&mut self.services, self.capacity.0, key, value)
    }
    fn delete_service(&mut self, key: &Lb4ServiceKey) -> anyhow::Result<()> {
        self.services.remove(key);
        Ok(())
    }
    fn put_slot(&mut self, key: &Lb4SlotKey, value: &Lb4Slot) -> anyhow::Result<()> {
        put(&mut self.slots, self.capacity.1, key, value)
    }
    fn delete_slot(&mut self, key: &Lb4SlotKey) -> anyhow::Result<()> {
        self.slots.remove(key);
        Ok(())
    }
    fn put_backend(&mut self, id: u32, value: &Lb4Backend) -> anyhow::Result<()> {
        put(&mut self.backends, self.capacity.2, &id, value)
    }
    fn delete_backend(&mut self, id: u32) -> anyhow::Result<()> {
        self.backends.remove(&id);
        Ok(())
    }
    fn put_service6(
        &mut self,
        key: &lb_common::service::Lb6ServiceKey,
        value: &Lb4Service,
    ) -> anyhow::Result<()> {
        put(&mut self.services6, self.capacity.0, key, value)
    }
    fn delete_service6(&mut self, key: &lb_common::service::Lb6ServiceKey) -> anyhow::Result<()> {
        self.services6.remove(key);
        Ok(())
    }
    fn put_backend6(
        &mut self,
        id: u32,
        value: &lb_common::backend::Lb6Backend,
    ) -> anyhow::Result<()> {
        put(&mut self.backends6, self.capacity.2, &id, value)
    }
    fn delete_backend6(&mut self, id: u32) -> anyhow::Result<()> {
        self.backends6.remove(&id);
        Ok(())
    }
    fn put_member(&mut self, key: &Lb4MemberKey) -> anyhow::Result<()> {
        self.members.insert(*key);
        Ok(())
    }
    fn delete_member(&mut self, key: &Lb4MemberKey) -> anyhow::Result<()> {
        self.members.remove(key);
        Ok(())
    }
    fn put_source_range(&mut self, _range: &SourceRangeEntry) -> anyhow::Result<()> {
        Ok(())
    }
    fn delete_source_range(&mut self, _range: &SourceRangeEntry) -> anyhow::Result<()> {
        Ok(())
    }
    fn put_maglev_chunk(
        &mut self,
        _key: &lb_common::maglev::Lb4MaglevKey,
        _value: &lb_common::maglev::Lb4MaglevChunk,
    ) -> anyhow::Result<()> {
        Ok(())
    }
    fn delete_maglev_chunk(
        &mut self,
        _key: &lb_common::maglev::Lb4MaglevKey,
    ) -> anyhow::Result<()> {
        Ok(())
    }
}

#[test]
fn more_services_than_the_map_holds_then_room_returns() {
    let many: String = (0..6)
        .map(|i| {
            service(
                &format!("s{i}"),
                &format!("  clusterIP: 10.96.1.{i}\n  ports: [{{port: 80}}]"),
            )
        })
        .collect();
    // 1 + 6 frontends plus 7 ClusterIP markers; room for 10 entries.
    let mut maps = CapacityMaps::new(10, 100, 100);
    let mut programmer = Programmer::default();
    let first = programmer.apply(
        &desired_tables(&state_of(&format!("{GOOD}---\n{many}")), &node()).0,
        &mut maps,
    );
    assert!(!first.errors.is_empty(), "everything fitted?");
    println!("full: {:?}", first.errors);
    let kept = maps.services.clone();
    // The same input again: the same failures, nothing programmed lost.
    let again = programmer.apply(
        &desired_tables(&state_of(&format!("{GOOD}---\n{many}")), &node()).0,
        &mut maps,
    );
    assert!(!again.errors.is_empty());
    assert_eq!(maps.services, kept);
    // Two services go: the next apply programs the rest.
    let fewer: String = (0..4)
        .map(|i| {
            service(
                &format!("s{i}"),
                &format!("  clusterIP: 10.96.1.{i}\n  ports: [{{port: 80}}]"),
            )
        })
        .collect();
    let report = programmer.apply(
        &desired_tables(&state_of(&format!("{GOOD}---\n{fewer}")), &node()).0,
        &mut maps,
    );
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.frontends, 5);
    assert_eq!(maps.services.len(), 10);
}
