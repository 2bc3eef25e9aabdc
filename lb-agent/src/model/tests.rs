//! Table tests of the model, from manifests as `kubectl get -o yaml` prints
//! them. No kernel, no I/O.

use std::net::IpAddr;
use std::path::Path;

use super::*;
use crate::source::files::parse_manifest;

const NODE: &str = "node-a";

/// A well-formed service that every bad-input case runs next to, to prove
/// one object's mistakes never cost another its frontends.
const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {namespace: default, name: web}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, protocol: TCP, targetPort: http}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: default
  name: web-abc
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.0.1.1]
  conditions: {ready: true}
  nodeName: node-a
  targetRef: {kind: Pod, namespace: default, name: web-1}
- addresses: [10.0.1.2]
  conditions: {ready: true}
  nodeName: node-b
  targetRef: {kind: Pod, namespace: default, name: web-2}
- addresses: [10.0.1.3]
  conditions: {ready: true}
  nodeName: node-b
  targetRef: {kind: Pod, namespace: default, name: web-3}
"#;

fn node() -> NodeIdentity {
    NodeIdentity {
        name: NODE.to_owned(),
        service_proxy_name: None,
        ..NodeIdentity::default()
    }
}

fn state(yaml: &str) -> ClusterState {
    let mut state = ClusterState::default();
    let errors = parse_manifest(Path::new("test.yaml"), yaml.as_bytes(), &mut state);
    assert!(errors.is_empty(), "fixture does not load: {errors:?}");
    state
}

fn tables(yaml: &str) -> (DesiredTables, Vec<ModelError>) {
    desired_tables(&state(yaml), &node())
}

fn frontend(addr: &str, port: u16, protocol: Protocol) -> Frontend {
    Frontend::new(addr.parse().expect("test address"), port, protocol)
}

fn spec<'a>(
    tables: &'a DesiredTables,
    addr: &str,
    port: u16,
    protocol: Protocol,
) -> &'a FrontendSpec {
    let key = frontend(addr, port, protocol);
    tables
        .frontends
        .get(&key)
        .unwrap_or_else(|| panic!("no frontend {key}; have {:?}", tables.frontends.keys()))
}

fn endpoints_of(spec: &FrontendSpec) -> Vec<String> {
    spec.backends
        .iter()
        .map(|backend| format!("{}:{}", backend.addr, backend.port))
        .collect()
}

/// Frontends of one service, as `addr:port/proto` strings.
fn frontends_of(tables: &DesiredTables, namespace: &str, name: &str) -> Vec<String> {
    tables
        .frontends
        .iter()
        .filter(|(_, spec)| spec.service.namespace == namespace && spec.service.name == name)
        .map(|(frontend, _)| frontend.to_string())
        .collect()
}

fn assert_web_programmed(tables: &DesiredTables) {
    assert_eq!(
        frontends_of(tables, "default", "web"),
        ["10.96.0.10:53/UDP", "10.96.0.10:80/TCP"],
        "the good service lost frontends"
    );
    assert_eq!(
        spec(tables, "10.96.0.10", 80, Protocol::Tcp).backends.len(),
        3
    );
}

fn slice(name: &str, service: &str, body: &str) -> String {
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  namespace: default\n  name: {name}\n  labels: {{kubernetes.io/service-name: {service}}}\n{body}\n"
    )
}

fn service(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{namespace: default, name: {name}}}\nspec:\n{spec}\n"
    )
}

#[test]
fn two_ports_three_ready_endpoints() {
    let (tables, errors) = tables(WEB);
    assert_eq!(errors, []);
    assert_eq!(tables.frontends.len(), 2);

    let http = spec(&tables, "10.96.0.10", 80, Protocol::Tcp);
    assert_eq!(
        endpoints_of(http),
        ["10.0.1.1:8080", "10.0.1.2:8080", "10.0.1.3:8080"]
    );
    assert_eq!(http.port_name, "http");
    assert_eq!(http.kind, FrontendKind::ClusterIp);
    assert_eq!(http.service.to_string(), "default/web");
    assert_eq!(http.affinity_timeout, None);
    let first = &http.backends[0];
    assert!(first.node_local, "10.0.1.1 runs on {NODE}");
    assert!(!first.terminating);
    assert_eq!(first.pod.as_deref(), Some("web-1"));
    assert!(!http.backends[1].node_local);

    let dns = spec(&tables, "10.96.0.10", 53, Protocol::Udp);
    assert_eq!(
        endpoints_of(dns),
        ["10.0.1.1:5353", "10.0.1.2:5353", "10.0.1.3:5353"]
    );
    assert_eq!(dns.port_name, "dns");
}

#[test]
fn endpoint_port_is_resolved_per_slice_by_name_and_protocol() {
    let yaml = [
        service(
            "api",
            "  clusterIP: 10.96.0.20\n  ports:\n  - {name: http, port: 80, targetPort: web}\n  - {name: metrics, port: 9100}",
        ),
        // Two pod generations listen on different ports for the same name.
        slice(
            "api-old",
            "api",
            "addressType: IPv4\nports: [{name: http, port: 8080}, {name: metrics, port: 9100, protocol: UDP}]\nendpoints: [{addresses: [10.0.2.1]}]",
        ),
        slice(
            "api-new",
            "api",
            "addressType: IPv4\nports: [{name: http, port: 9090}, {name: metrics, port: 9101}]\nendpoints: [{addresses: [10.0.2.2]}]",
        ),
        // A lone unnamed service port matches an unnamed slice port.
        service("solo", "  clusterIP: 10.96.0.21\n  ports: [{port: 443}]"),
        slice(
            "solo-1",
            "solo",
            "addressType: IPv4\nports: [{port: 8443}]\nendpoints: [{addresses: [10.0.3.1]}]",
        ),
    ]
    .concat();
    let (tables, errors) = tables(&yaml);
    assert_eq!(errors, []);
    assert_eq!(
        endpoints_of(spec(&tables, "10.96.0.20", 80, Protocol::Tcp)),
        ["10.0.2.1:8080", "10.0.2.2:9090"]
    );
    // api-old's metrics port is UDP, so only api-new serves TCP metrics.
    assert_eq!(
        endpoints_of(spec(&tables, "10.96.0.20", 9100, Protocol::Tcp)),
        ["10.0.2.2:9101"]
    );
    assert_eq!(
        endpoints_of(spec(&tables, "10.96.0.21", 443, Protocol::Tcp)),
        ["10.0.3.1:8443"]
    );
}

#[test]
fn slice_without_the_port_contributes_nothing() {
    let yaml = [
        service("api", "  clusterIP: 10.96.0.20\n  ports: [{name: http, port: 80}]"),
        slice(
            "api-1",
            "api",
            "addressType: IPv4\nports: [{name: grpc, port: 8080}]\nendpoints: [{addresses: [10.0.2.1]}]",
        ),
    ]
    .concat();
    let (tables, errors) = tables(&yaml);
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["spec.ports[0].targetPort"], "{errors:?}");
    // Still a frontend: with no backend the datapath rejects the traffic.
    assert_eq!(spec(&tables, "10.96.0.20", 80, Protocol::Tcp).backends, []);
}

#[test]
fn not_ready_endpoints_are_excluded() {
    let yaml = [
        service("api", "  clusterIP: 10.96.0.20\n  ports: [{port: 80}]"),
        slice(
            "api-1",
            "api",
            "addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n\
             - {addresses: [10.0.2.1], conditions: {ready: true}}\n\
             - {addresses: [10.0.2.2], conditions: {ready: false}}\n\
             - {addresses: [10.0.2.3]}\n\
             - {addresses: [10.0.2.4], conditions: {ready: false, serving: true, terminating: true}}",
        ),
    ]
    .concat();
    let (tables, errors) = tables(&yaml);
    assert_eq!(errors, []);
    // Unset `ready` counts as ready; terminating ones are not needed while
    // ready ones exist.
    let api = spec(&tables, "10.96.0.20", 80, Protocol::Tcp);
    assert_eq!(endpoints_of(api), ["10.0.2.1:8080", "10.0.2.3:8080"]);
    assert!(api.backends.iter().all(|backend| !backend.terminating));
}

#[test]
fn serving_terminating_endpoints_are_the_fallback() {
    let yaml = [
        service("api", "  clusterIP: 10.96.0.20\n  ports: [{port: 80}]"),
        slice(
            "api-1",
            "api",
            "addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n\
             - {addresses: [10.0.2.1], conditions: {ready: false, serving: true, terminating: true}}\n\
             - {addresses: [10.0.2.2], conditions: {ready: false, serving: false, terminating: true}}\n\
             - {addresses: [10.0.2.3], conditions: {ready: false}}",
        ),
    ]
    .concat();
    let (tables, errors) = tables(&yaml);
    assert_eq!(errors, []);
    let api = spec(&tables, "10.96.0.20", 80, Protocol::Tcp);
    assert_eq!(endpoints_of(api), ["10.0.2.1:8080"]);
    assert!(api.backends[0].terminating);
}

#[test]
fn services_that_are_not_ours_are_not_programmed() {
    let not_ours = [
        ("headless", "  clusterIP: None\n  ports: [{port: 80}]"),
        (
            "headless-list",
            "  clusterIP: None\n  clusterIPs: [None]\n  ports: [{port: 80}]",
        ),
        (
            "external-name",
            "  type: ExternalName\n  externalName: example.com\n  ports: [{port: 80}]",
        ),
        ("unallocated", "  ports: [{port: 80}]"),
    ];
    let mut yaml = WEB.to_owned();
    for (name, spec) in not_ours {
        yaml += &service(name, spec);
        yaml += &slice(
            &format!("{name}-1"),
            name,
            "addressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.0.9.1]}]",
        );
    }
    yaml += "---\napiVersion: v1\nkind: Service\nmetadata:\n  namespace: default\n  name: other-proxy\n  labels: {service.kubernetes.io/service-proxy-name: other}\nspec: {clusterIP: 10.96.0.30, ports: [{port: 80}]}\n";
    let (tables, errors) = tables(&yaml);
    assert_eq!(errors, [], "not proxying is silent");
    assert_eq!(
        tables.frontends.len(),
        2,
        "only web: {:?}",
        tables.frontends.keys()
    );
    assert_web_programmed(&tables);
}

#[test]
fn service_proxy_name_selects_labelled_services_only() {
    let yaml = format!(
        "{WEB}---\napiVersion: v1\nkind: Service\nmetadata:\n  namespace: default\n  name: ours\n  labels: {{service.kubernetes.io/service-proxy-name: lb}}\nspec: {{clusterIP: 10.96.0.30, ports: [{{port: 80}}]}}\n"
    );
    let state = state(&yaml);
    let ours = NodeIdentity {
        name: NODE.to_owned(),
        service_proxy_name: Some("lb".to_owned()),
        ..NodeIdentity::default()
    };
    let (tables, errors) = desired_tables(&state, &ours);
    assert_eq!(errors, []);
    // kube-proxy's rule: a named proxy takes only what is labelled for it.
    assert_eq!(
        frontends_of(&tables, "default", "ours"),
        ["10.96.0.30:80/TCP"]
    );
    assert_eq!(
        frontends_of(&tables, "default", "web"),
        Vec::<String>::new()
    );
}

/// Each case: the bad objects (loaded next to WEB), the errors expected as
/// (object, field), and the frontends the bad service (`x-bad`, sorted after
/// `web`) still gets.
struct BadInputCase {
    name: &'static str,
    yaml: String,
    errors: Vec<(&'static str, &'static str)>,
    frontends: Vec<&'static str>,
}

#[test]
fn bad_input_is_reported_and_contained() {
    let cases = [
        BadInputCase {
            name: "invalid clusterIP skips the service",
            yaml: service("x-bad", "  clusterIP: 10.96.0.300\n  ports: [{port: 80}]"),
            errors: vec![("Service default/x-bad", "spec.clusterIP")],
            frontends: vec![],
        },
        BadInputCase {
            name: "invalid entry of clusterIPs skips the service",
            yaml: service(
                "x-bad",
                "  clusterIP: 10.96.0.40\n  clusterIPs: [10.96.0.40, 'fd00::zz']\n  ports: [{port: 80}]",
            ),
            errors: vec![("Service default/x-bad", "spec.clusterIPs[1]")],
            frontends: vec![],
        },
        BadInputCase {
            name: "ports out of range are skipped, others kept",
            yaml: service(
                "x-bad",
                "  clusterIP: 10.96.0.40\n  ports:\n  - {name: a, port: 0}\n  - {name: b, port: 65536}\n  - {name: c, port: -1}\n  - {name: d, port: 8080}",
            ),
            errors: vec![
                ("Service default/x-bad", "spec.ports[0].port"),
                ("Service default/x-bad", "spec.ports[1].port"),
                ("Service default/x-bad", "spec.ports[2].port"),
            ],
            frontends: vec!["10.96.0.40:8080/TCP"],
        },
        BadInputCase {
            name: "unknown protocol",
            yaml: service(
                "x-bad",
                "  clusterIP: 10.96.0.40\n  ports: [{name: a, port: 80, protocol: tcp}, {name: b, port: 81}]",
            ),
            errors: vec![("Service default/x-bad", "spec.ports[0].protocol")],
            frontends: vec!["10.96.0.40:81/TCP"],
        },
        BadInputCase {
            name: "duplicate port keeps the first",
            yaml: service(
                "x-bad",
                "  clusterIP: 10.96.0.40\n  ports: [{name: a, port: 80}, {name: b, port: 80}, {name: c, port: 80, protocol: UDP}]",
            ),
            errors: vec![("Service default/x-bad", "spec.ports[1].port")],
            frontends: vec!["10.96.0.40:80/TCP", "10.96.0.40:80/UDP"],
        },
        BadInputCase {
            name: "EndpointSlice for an unknown service is informative",
            yaml: slice(
                "orphan-xyz",
                "orphan",
                "addressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.0.9.1]}]",
            ),
            errors: vec![(
                "EndpointSlice default/orphan-xyz",
                "metadata.labels[kubernetes.io/service-name]",
            )],
            frontends: vec![],
        },
        BadInputCase {
            name: "invalid endpoint address is skipped, others kept",
            yaml: service("x-bad", "  clusterIP: 10.96.0.40\n  ports: [{port: 80}]")
                + &slice(
                    "x-bad-1",
                    "x-bad",
                    "addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.0.9.1]}, {addresses: [not-an-ip]}, {addresses: ['fd00::1']}]",
                ),
            errors: vec![
                ("EndpointSlice default/x-bad-1", "endpoints[1].addresses[0]"),
                ("EndpointSlice default/x-bad-1", "endpoints[2].addresses[0]"),
            ],
            frontends: vec!["10.96.0.40:80/TCP"],
        },
        BadInputCase {
            name: "endpoint port out of range",
            yaml: service("x-bad", "  clusterIP: 10.96.0.40\n  ports: [{port: 80}]")
                + &slice(
                    "x-bad-1",
                    "x-bad",
                    "addressType: IPv4\nports: [{port: 70000}]\nendpoints: [{addresses: [10.0.9.1]}]",
                ),
            // The slice's only port is refused, so the service port is
            // reported as having no endpoint port either.
            errors: vec![
                ("EndpointSlice default/x-bad-1", "ports[0].port"),
                ("Service default/x-bad", "spec.ports[0].targetPort"),
            ],
            frontends: vec!["10.96.0.40:80/TCP"],
        },
        BadInputCase {
            name: "affinity timeout out of range disables affinity only",
            yaml: service(
                "x-bad",
                "  clusterIP: 10.96.0.40\n  ports: [{port: 80}]\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}",
            ),
            errors: vec![(
                "Service default/x-bad",
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            )],
            frontends: vec!["10.96.0.40:80/TCP"],
        },
        BadInputCase {
            name: "two cluster IPs of one family",
            yaml: service(
                "x-bad",
                "  clusterIP: 10.96.0.40\n  clusterIPs: [10.96.0.40, 10.96.0.41]\n  ports: [{port: 80}]",
            ),
            errors: vec![("Service default/x-bad", "spec.clusterIPs[1]")],
            frontends: vec![],
        },
        BadInputCase {
            name: "clusterIP that is not clusterIPs[0]",
            yaml: service(
                "x-bad",
                "  clusterIP: 10.96.0.41\n  clusterIPs: [10.96.0.40, 'fd00:96::40']\n  ports: [{port: 80}]",
            ),
            errors: vec![("Service default/x-bad", "spec.clusterIP")],
            frontends: vec![],
        },
        BadInputCase {
            name: "cluster IP of the wrong family for ipFamilies",
            yaml: service(
                "x-bad",
                "  clusterIP: 'fd00:96::40'\n  ipFamilies: [IPv4]\n  ports: [{port: 80}]",
            ),
            errors: vec![("Service default/x-bad", "spec.clusterIPs[0]")],
            frontends: vec![],
        },
        BadInputCase {
            name: "SingleStack with an address of each family",
            yaml: service(
                "x-bad",
                "  clusterIP: 10.96.0.40\n  clusterIPs: [10.96.0.40, 'fd00:96::40']\n  ipFamilyPolicy: SingleStack\n  ports: [{port: 80}]",
            ),
            errors: vec![("Service default/x-bad", "spec.ipFamilyPolicy")],
            frontends: vec![],
        },
        BadInputCase {
            name: "RequireDualStack with one family",
            yaml: service(
                "x-bad",
                "  clusterIP: 10.96.0.40\n  ipFamilyPolicy: RequireDualStack\n  ports: [{port: 80}]",
            ),
            errors: vec![("Service default/x-bad", "spec.ipFamilyPolicy")],
            frontends: vec![],
        },
        BadInputCase {
            name: "an IPv6 externalIP on an IPv4-only service is skipped",
            yaml: service(
                "x-bad",
                "  clusterIP: 10.96.0.40\n  externalIPs: ['2001:db8::7', 203.0.113.7]\n  ports: [{port: 80}]",
            ),
            errors: vec![("Service default/x-bad", "spec.externalIPs[0]")],
            frontends: vec!["10.96.0.40:80/TCP", "203.0.113.7:80/TCP"],
        },
        BadInputCase {
            name: "frontend taken by another service",
            yaml: service(
                "x-bad",
                "  clusterIP: 10.96.0.10\n  ports: [{port: 80}, {port: 81}]",
            ),
            errors: vec![("Service default/x-bad", "spec.ports[0]")],
            frontends: vec!["10.96.0.10:81/TCP"],
        },
    ];
    for case in cases {
        let (tables, errors) = tables(&format!("{WEB}{}", case.yaml));
        let located: Vec<(&str, &str)> = errors
            .iter()
            .map(|error| (error.object.as_str(), error.field.as_str()))
            .collect();
        assert_eq!(located, case.errors, "{}: errors {errors:#?}", case.name);
        assert!(
            errors.iter().all(|error| !error.message.is_empty()),
            "{}: every error says what is wrong",
            case.name
        );
        assert_eq!(
            frontends_of(&tables, "default", "x-bad"),
            case.frontends,
            "{}: frontends of the bad service",
            case.name
        );
        assert_web_programmed(&tables);
    }
}

#[test]
fn errors_display_object_field_and_message() {
    let yaml = format!(
        "{WEB}{}",
        service(
            "x-bad",
            "  clusterIP: 10.96.0.40\n  ports: [{port: 1}, {port: 70000}]"
        )
    );
    let (_, errors) = tables(&yaml);
    assert_eq!(
        errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["Service default/x-bad: spec.ports[1].port: 70000 is out of range 1..=65535"]
    );
}

#[test]
fn session_affinity_timeout() {
    let yaml = [
        service(
            "sticky-default",
            "  clusterIP: 10.96.0.50\n  ports: [{port: 80}]\n  sessionAffinity: ClientIP",
        ),
        service(
            "sticky-short",
            "  clusterIP: 10.96.0.51\n  ports: [{port: 80}]\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}",
        ),
        service(
            "not-sticky",
            "  clusterIP: 10.96.0.52\n  ports: [{port: 80}]\n  sessionAffinity: None",
        ),
    ]
    .concat();
    let (tables, errors) = tables(&yaml);
    assert_eq!(errors, []);
    let timeout = |addr| spec(&tables, addr, 80, Protocol::Tcp).affinity_timeout;
    assert_eq!(timeout("10.96.0.50"), Some(10800));
    assert_eq!(timeout("10.96.0.51"), Some(60));
    assert_eq!(timeout("10.96.0.52"), None);
}

#[test]
fn dual_stack_frontends_get_backends_of_their_family() {
    let yaml = [
        service(
            "dual",
            "  clusterIP: 10.96.0.60\n  clusterIPs: [10.96.0.60, 'fd00:96::60']\n  ports: [{port: 80}]",
        ),
        slice(
            "dual-v4",
            "dual",
            "addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.0.6.1]}]",
        ),
        slice(
            "dual-v6",
            "dual",
            "addressType: IPv6\nports: [{port: 8080}]\nendpoints: [{addresses: ['fd00:6::1']}]",
        ),
        slice(
            "dual-fqdn",
            "dual",
            "addressType: FQDN\nports: [{port: 8080}]\nendpoints: [{addresses: [pod.example.com]}]",
        ),
    ]
    .concat();
    let (tables, errors) = tables(&yaml);
    assert_eq!(errors, []);
    assert_eq!(
        endpoints_of(spec(&tables, "10.96.0.60", 80, Protocol::Tcp)),
        ["10.0.6.1:8080"]
    );
    let v6 = spec(&tables, "fd00:96::60", 80, Protocol::Tcp);
    assert_eq!(v6.backends.len(), 1);
    assert_eq!(
        v6.backends[0].addr,
        "fd00:6::1".parse::<IpAddr>().expect("test address")
    );
}

#[test]
fn backends_in_two_slices_are_deduplicated_and_sorted() {
    let endpoints = "addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.0.7.2]}, {addresses: [10.0.7.1]}]";
    let yaml = [
        service("api", "  clusterIP: 10.96.0.70\n  ports: [{port: 80}]"),
        slice("api-1", "api", endpoints),
        slice("api-2", "api", endpoints),
    ]
    .concat();
    let (tables, errors) = tables(&yaml);
    assert_eq!(errors, []);
    assert_eq!(
        endpoints_of(spec(&tables, "10.96.0.70", 80, Protocol::Tcp)),
        ["10.0.7.1:8080", "10.0.7.2:8080"]
    );
}

#[test]
fn equal_input_gives_equal_output() {
    let state = state(WEB);
    assert_eq!(
        desired_tables(&state, &node()),
        desired_tables(&state.clone(), &node())
    );
}

#[test]
fn protocol_numbers() {
    assert_eq!(Protocol::Tcp.number(), 6);
    assert_eq!(Protocol::Udp.number(), 17);
    assert_eq!(Protocol::Sctp.number(), 132);
}

/// node-a with one node address, as the agent finds it.
fn node_with_address() -> NodeIdentity {
    NodeIdentity {
        nodeport_addresses: vec!["198.51.100.11".parse().expect("address")],
        ..node()
    }
}

/// `web`'s endpoints (node-a has 10.0.1.1, node-b the others) behind a
/// service of the given spec.
fn north_south(name: &str, spec_yaml: &str) -> String {
    let slice_body = WEB.split("addressType: IPv4").nth(1).unwrap_or_default();
    format!(
        "{}{}",
        service(name, spec_yaml),
        slice(
            &format!("{name}-abc"),
            name,
            &format!("addressType: IPv4{slice_body}")
        )
    )
}

#[test]
fn node_port_load_balancer_and_external_ips_open_frontends() {
    let yaml = north_south(
        "lb",
        r#"  type: LoadBalancer
  clusterIP: 10.96.0.30
  externalIPs: [203.0.113.20]
  ports:
  - {name: http, port: 80, nodePort: 30080, protocol: TCP}
status:
  loadBalancer:
    ingress:
    - {ip: 203.0.113.10}
    - {ip: 203.0.113.11, ipMode: VIP}
    - {ip: 203.0.113.12, ipMode: Proxy}
    - {hostname: lb.example.com}"#,
    );
    let (tables, errors) = desired_tables(&state(&yaml), &node_with_address());
    assert_eq!(errors, []);
    assert_eq!(
        frontends_of(&tables, "default", "lb"),
        [
            "10.96.0.30:80/TCP",
            "198.51.100.11:30080/TCP",
            "203.0.113.10:80/TCP",
            "203.0.113.11:80/TCP",
            "203.0.113.20:80/TCP"
        ],
        "ipMode Proxy and hostname-only ingress must not be programmed"
    );
    let node_port = spec(&tables, "198.51.100.11", 30080, Protocol::Tcp);
    assert_eq!(node_port.kind, FrontendKind::NodePort);
    assert_eq!(
        node_port.backends.len(),
        3,
        "Cluster policy uses every endpoint"
    );
    assert!(!node_port.local_only);
    assert_eq!(
        spec(&tables, "203.0.113.10", 80, Protocol::Tcp).kind,
        FrontendKind::LoadBalancer
    );
    assert_eq!(
        spec(&tables, "203.0.113.20", 80, Protocol::Tcp).kind,
        FrontendKind::ExternalIp
    );
    assert!(
        tables.health_checks.is_empty(),
        "Cluster policy has no health check"
    );
}

#[test]
fn local_policy_splits_external_and_internal_views_and_runs_a_health_check() {
    let yaml = north_south(
        "local",
        r#"  type: LoadBalancer
  clusterIP: 10.96.0.31
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  loadBalancerSourceRanges: [198.51.100.0/24, " 192.0.2.7 "]
  ports:
  - {name: http, port: 80, nodePort: 30081, protocol: TCP}
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.10}]"#,
    );
    let (tables, errors) = desired_tables(&state(&yaml), &node_with_address());
    assert_eq!(errors, []);
    for (addr, port) in [("198.51.100.11", 30081), ("203.0.113.10", 80)] {
        let external = spec(&tables, addr, port, Protocol::Tcp);
        assert!(external.local_only);
        assert_eq!(
            endpoints_of(external),
            ["10.0.1.1:8080"],
            "only node-a's endpoint"
        );
        let internal = tables
            .frontends
            .get(&Frontend {
                scope: Scope::Internal,
                ..frontend(addr, port, Protocol::Tcp)
            })
            .expect("internal entry");
        assert_eq!(
            internal.backends.len(),
            3,
            "pods still reach every endpoint"
        );
        assert!(!internal.local_only);
    }
    // The ClusterIP is not subject to externalTrafficPolicy.
    assert_eq!(
        spec(&tables, "10.96.0.31", 80, Protocol::Tcp)
            .backends
            .len(),
        3
    );
    // Source ranges restrict the LoadBalancer address only.
    let lb = spec(&tables, "203.0.113.10", 80, Protocol::Tcp);
    assert_eq!(
        lb.source_ranges,
        [
            parse_cidr("198.51.100.0/24").unwrap(),
            parse_cidr("192.0.2.7/32").unwrap()
        ]
    );
    assert!(
        spec(&tables, "198.51.100.11", 30081, Protocol::Tcp)
            .source_ranges
            .is_empty()
    );
    let check = &tables.health_checks[&32000];
    assert_eq!(check.service.to_string(), "default/local");
    assert_eq!(check.local_endpoints, 1);

    // On node-c, with no local endpoint, the external view is empty and the
    // health check reports zero.
    let node_c = NodeIdentity {
        name: "node-c".into(),
        ..node_with_address()
    };
    let (tables, _) = desired_tables(&state(&yaml), &node_c);
    assert!(
        spec(&tables, "203.0.113.10", 80, Protocol::Tcp)
            .backends
            .is_empty()
    );
    assert_eq!(tables.health_checks[&32000].local_endpoints, 0);
}

#[test]
fn bad_north_south_input_is_named_and_contained() {
    let yaml = format!(
        "{WEB}{}{}{}",
        service(
            "bad-lb",
            r#"  type: LoadBalancer
  clusterIP: 10.96.0.40
  externalIPs: [203.0.113.30, not-an-ip]
  loadBalancerSourceRanges: [10.0.0.0/33, 198.51.100.0/24]
  ports:
  - {name: a, port: 80, nodePort: 20000, protocol: TCP}
  - {name: b, port: 81, nodePort: 30100, protocol: TCP}
status:
  loadBalancer:
    ingress: [{ip: 300.1.1.1}, {ip: 203.0.113.40}]"#
        ),
        service(
            "dup-nodeport",
            r#"  type: NodePort
  clusterIP: 10.96.0.41
  ports:
  - {name: a, port: 80, nodePort: 30100, protocol: TCP}"#
        ),
        service(
            "bad-policy",
            r#"  type: NodePort
  clusterIP: 10.96.0.42
  externalTrafficPolicy: Sometimes
  ports:
  - {port: 80, nodePort: 30101}"#
        ),
    );
    let (tables, errors) = desired_tables(&state(&yaml), &node_with_address());
    let fields: Vec<(String, String)> = errors
        .iter()
        .map(|e| (e.object.clone(), e.field.clone()))
        .collect();
    for (object, field) in [
        ("Service default/bad-lb", "spec.ports[0].nodePort"),
        ("Service default/bad-lb", "spec.externalIPs[1]"),
        ("Service default/bad-lb", "spec.loadBalancerSourceRanges[0]"),
        (
            "Service default/bad-lb",
            "status.loadBalancer.ingress[0].ip",
        ),
        ("Service default/dup-nodeport", "spec.ports[0].nodePort"),
        ("Service default/bad-policy", "spec.externalTrafficPolicy"),
    ] {
        assert!(
            fields.contains(&(object.to_string(), field.to_string())),
            "no error for {object} {field}: {errors:#?}"
        );
    }
    // What was valid is still programmed, the first owner of a NodePort
    // keeps it, and the good service is untouched.
    let bad_lb = frontends_of(&tables, "default", "bad-lb");
    for want in [
        "10.96.0.40:80/TCP",
        "198.51.100.11:30100/TCP",
        "203.0.113.30:81/TCP",
        "203.0.113.40:80/TCP",
    ] {
        assert!(
            bad_lb.iter().any(|f| f == want),
            "{want} missing from {bad_lb:?}"
        );
    }
    assert!(
        !bad_lb.iter().any(|f| f.contains(":20000")),
        "out-of-range NodePort programmed"
    );
    assert_eq!(
        spec(&tables, "203.0.113.40", 80, Protocol::Tcp).source_ranges,
        [parse_cidr("198.51.100.0/24").unwrap()]
    );
    assert_eq!(
        frontends_of(&tables, "default", "dup-nodeport"),
        ["10.96.0.41:80/TCP"]
    );
    assert!(!frontends_of(&tables, "default", "bad-policy").is_empty());
    assert_web_programmed(&tables);
}

#[test]
fn internal_traffic_policy_local_keeps_cluster_ip_traffic_on_the_node() {
    let yaml = north_south(
        "itp",
        r#"  clusterIP: 10.96.0.60
  internalTrafficPolicy: Local
  ports:
  - {name: http, port: 80, protocol: TCP}"#,
    );
    let (tables, errors) = desired_tables(&state(&yaml), &node());
    assert_eq!(errors, []);
    let cluster_ip = spec(&tables, "10.96.0.60", 80, Protocol::Tcp);
    assert_eq!(
        endpoints_of(cluster_ip),
        ["10.0.1.1:8080"],
        "only node-a's endpoint"
    );
    assert!(
        cluster_ip.local_only,
        "an empty local set must drop, not fall back"
    );
    let node_c = NodeIdentity {
        name: "node-c".into(),
        ..node()
    };
    let (tables, _) = desired_tables(&state(&yaml), &node_c);
    assert!(
        spec(&tables, "10.96.0.60", 80, Protocol::Tcp)
            .backends
            .is_empty()
    );
}

/// A slice of three endpoints with the given hints, one per zone.
fn hinted(zones: [&str; 3], nodes: [&str; 3]) -> String {
    let mut body = String::from(
        "addressType: IPv4\nports:\n- {name: http, port: 8080, protocol: TCP}\nendpoints:\n",
    );
    for (i, (zone, node)) in zones.iter().zip(nodes).enumerate() {
        body.push_str(&format!(
            "- addresses: [10.0.2.{}]\n  conditions: {{ready: true}}\n  nodeName: node-{i}\n",
            i + 1
        ));
        let mut hints = Vec::new();
        if !zone.is_empty() {
            hints.push(format!("forZones: [{{name: {zone}}}]"));
        }
        if !node.is_empty() {
            hints.push(format!("forNodes: [{{name: {node}}}]"));
        }
        if !hints.is_empty() {
            body.push_str(&format!("  hints: {{{}}}\n", hints.join(", ")));
        }
    }
    format!(
        "{}{}---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  labels: {{topology.kubernetes.io/zone: zone-a}}\n",
        service(
            "topo",
            "  clusterIP: 10.96.0.70\n  trafficDistribution: PreferClose\n  ports:\n  - {name: http, port: 80}"
        ),
        slice("topo-1", "topo", &body)
    )
}

#[test]
fn topology_hints_follow_kube_proxy_rules() {
    let endpoints = |yaml: String| {
        let (tables, errors) = tables(&yaml);
        assert_eq!(errors, []);
        endpoints_of(spec(&tables, "10.96.0.70", 80, Protocol::Tcp))
    };
    // Every endpoint has a zone hint and one names node-a's zone: only it.
    assert_eq!(
        endpoints(hinted(["zone-a", "zone-b", "zone-c"], ["", "", ""])),
        ["10.0.2.1:8080"]
    );
    // Node hints for this node win over zones.
    assert_eq!(
        endpoints(hinted(
            ["zone-a", "zone-a", "zone-b"],
            ["node-x", "node-a", "node-y"]
        )),
        ["10.0.2.2:8080"]
    );
    // One endpoint without a hint: hints are ignored, every endpoint used.
    assert_eq!(
        endpoints(hinted(["zone-a", "zone-b", ""], ["", "", ""])).len(),
        3
    );
    // No endpoint hinted for this zone: every endpoint used.
    assert_eq!(
        endpoints(hinted(["zone-b", "zone-b", "zone-c"], ["", "", ""])).len(),
        3
    );
}

#[test]
fn headless_slices_and_unknown_policies() {
    let yaml = format!(
        "{WEB}{}{}",
        service(
            "odd",
            "  clusterIP: 10.96.0.80\n  internalTrafficPolicy: Nearby\n  trafficDistribution: Anywhere\n  ports:\n  - {name: http, port: 80}"
        ),
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  namespace: default\n  name: odd-headless\n  labels: {kubernetes.io/service-name: odd, service.kubernetes.io/headless: \"\"}\naddressType: IPv4\nports:\n- {name: http, port: 8080}\nendpoints:\n- addresses: [10.0.3.1]\n"
    );
    let (tables, errors) = tables(&yaml);
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert!(fields.contains(&"spec.internalTrafficPolicy"), "{errors:?}");
    assert!(fields.contains(&"spec.trafficDistribution"), "{errors:?}");
    assert!(
        spec(&tables, "10.96.0.80", 80, Protocol::Tcp)
            .backends
            .is_empty(),
        "a slice labelled headless must not be used"
    );
    assert_web_programmed(&tables);
}

#[test]
fn a_named_port_no_endpoint_defines_is_reported() {
    let yaml = format!(
        "{WEB}{}{}",
        service(
            "named",
            "  clusterIP: 10.96.0.90\n  ports:\n  - {name: metrics, port: 9090, targetPort: metrics}"
        ),
        slice(
            "named-1",
            "named",
            "addressType: IPv4\nports:\n- {name: http, port: 8080}\nendpoints:\n- addresses: [10.0.4.1]"
        )
    );
    let (tables, errors) = tables(&yaml);
    assert!(
        errors.iter().any(|e| e.object == "Service default/named"
            && e.field == "spec.ports[0].targetPort"
            && e.message.contains("\"metrics\"")),
        "{errors:?}"
    );
    assert!(
        spec(&tables, "10.96.0.90", 9090, Protocol::Tcp)
            .backends
            .is_empty()
    );
    assert_web_programmed(&tables);
}

#[test]
fn a_dual_stack_service_gets_frontends_and_backends_per_family() {
    let yaml = service(
        "dual",
        "  type: LoadBalancer\n  clusterIP: 10.96.0.50\n  clusterIPs: [10.96.0.50, 'fd00:96::50']\n  \
         ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n  \
         ports: [{port: 80, targetPort: 8080, nodePort: 30080}]",
    ) + "status:\n  loadBalancer:\n    ingress: [{ip: 203.0.113.50}, {ip: '2001:db8::50'}]\n"
        + &slice(
            "dual-v4",
            "dual",
            "addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.0.5.1]}]",
        )
        + &slice(
            "dual-v6",
            "dual",
            "addressType: IPv6\nports: [{port: 8080}]\nendpoints: [{addresses: ['fd00:5::1']}]",
        );
    let state = state(&yaml);
    let mut node = node();
    node.nodeport_addresses = vec![
        "198.51.100.11".parse().expect("addr"),
        "2001:db8:1::11".parse().expect("addr"),
    ];
    let (tables, errors) = desired_tables(&state, &node);
    assert_eq!(errors, []);
    assert_eq!(
        frontends_of(&tables, "default", "dual"),
        [
            "10.96.0.50:80/TCP",
            "198.51.100.11:30080/TCP",
            "203.0.113.50:80/TCP",
            "[2001:db8::50]:80/TCP",
            "[2001:db8:1::11]:30080/TCP",
            "[fd00:96::50]:80/TCP",
        ]
    );
    for (frontend, spec) in &tables.frontends {
        let families: Vec<bool> = spec.backends.iter().map(|b| b.addr.is_ipv4()).collect();
        assert_eq!(
            families,
            [frontend.addr.is_ipv4()],
            "{frontend}: backends of the other family"
        );
    }

    // A single-stack IPv4 service opens its NodePort on IPv4 addresses only.
    let v4 = service(
        "v4",
        "  type: NodePort\n  clusterIP: 10.96.0.51\n  ports: [{port: 80, targetPort: 8080, nodePort: 30081}]",
    );
    let (tables, errors) = desired_tables(&self::state(&v4), &node);
    assert_eq!(errors, []);
    assert_eq!(
        frontends_of(&tables, "default", "v4"),
        ["10.96.0.51:80/TCP", "198.51.100.11:30081/TCP"]
    );
}
