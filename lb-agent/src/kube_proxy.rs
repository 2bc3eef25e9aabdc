//! What a cluster migrating from kube-proxy brings along: its command line
//! and its `KubeProxyConfiguration` file (`--config`, the `kube-proxy`
//! ConfigMap kubeadm writes). This module knows kube-proxy's names; it maps
//! the ones that mean something to this agent onto typed values and names
//! the others so the agent can say it ignores them, never silently.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde_yaml::Value;

use crate::{
    conntrack_config::parse_go_duration,
    model::{SourceRange, parse_cidr},
};

/// The config file's apiVersion and kind.
pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

/// kube-proxy's proxy modes: a config file written for kube-proxy names one
/// of these; it says how kube-proxy programs the kernel, which this agent
/// replaces, so it is reported and not refused.
pub const KUBE_PROXY_MODES: &[&str] = &["iptables", "ipvs", "nftables", "kernelspace", "userspace"];

/// This agent's one mode, for `--proxy-mode` / `mode`.
pub const MODE: &str = "ebpf";

/// A kube-proxy flag this agent accepts and ignores: its name, whether it
/// takes a value (`--flag VALUE`) or is a boolean (`--flag[=true|false]`),
/// and why it means nothing here.
#[derive(Clone, Copy, Debug)]
pub struct IgnoredFlag {
    pub name: &'static str,
    pub takes_value: bool,
    pub why: &'static str,
}

const fn value(name: &'static str, why: &'static str) -> IgnoredFlag {
    IgnoredFlag {
        name,
        takes_value: true,
        why,
    }
}

const fn switch(name: &'static str, why: &'static str) -> IgnoredFlag {
    IgnoredFlag {
        name,
        takes_value: false,
        why,
    }
}

const IPTABLES: &str = "no iptables rules are written";
const IPVS: &str = "no IPVS services are written";
const KLOG: &str = "klog output option; logs go to stderr (RUST_LOG, --v)";
const NETFILTER_CT: &str =
    "netfilter conntrack is not used; the datapath has its own (--max-conntrack)";

/// kube-proxy's documented flags (and a few removed ones still found in
/// old manifests) that have no meaning for this agent. The ones that do
/// mean something are real flags of the agent.
pub const IGNORED_FLAGS: &[IgnoredFlag] = &[
    switch("add_dir_header", KLOG),
    switch("alsologtostderr", KLOG),
    value(
        "bind-address",
        "the node's addresses come from its devices and Node object",
    ),
    switch(
        "bind-address-hard-fail",
        "a port that cannot be bound is always fatal",
    ),
    value("boot-id-file", "no boot-id check"),
    value("boot_id_file", "no boot-id check"),
    switch("cleanup-ipvs", IPVS),
    value(
        "config-sync-period",
        "no periodic resync; watches are the only trigger",
    ),
    value("conntrack-max-per-core", NETFILTER_CT),
    value("conntrack-min", NETFILTER_CT),
    switch("conntrack-tcp-be-liberal", NETFILTER_CT),
    value("feature-gates", "no kube-proxy feature gates here"),
    value(
        "healthz-port",
        "removed from kube-proxy; use --healthz-bind-address",
    ),
    switch("init-only", "no init phase: no sysctls to set"),
    switch("iptables-localhost-nodeports", IPTABLES),
    value("iptables-masquerade-bit", IPTABLES),
    value("iptables-min-sync-period", IPTABLES),
    value("iptables-sync-period", IPTABLES),
    value("ipvs-exclude-cidrs", IPVS),
    value("ipvs-min-sync-period", IPVS),
    value("ipvs-scheduler", IPVS),
    switch("ipvs-strict-arp", IPVS),
    value("ipvs-sync-period", IPVS),
    value("ipvs-tcp-timeout", IPVS),
    value("ipvs-tcpfin-timeout", IPVS),
    value("ipvs-udp-timeout", IPVS),
    value(
        "kube-api-burst",
        "kube-rs watchers make no bursts of requests",
    ),
    value("kube-api-content-type", "the API is read as JSON"),
    value(
        "kube-api-qps",
        "kube-rs watchers make no bursts of requests",
    ),
    value("log-flush-frequency", KLOG),
    value("log-json-info-buffer-size", KLOG),
    switch("log-json-split-stream", KLOG),
    value("log-text-info-buffer-size", KLOG),
    switch("log-text-split-stream", KLOG),
    value("log_backtrace_at", KLOG),
    value("log_dir", KLOG),
    value("log_file", KLOG),
    value("log_file_max_size", KLOG),
    value("logging-format", KLOG),
    switch("logtostderr", KLOG),
    switch(
        "masquerade-all",
        "SNAT happens only where it must (externalTrafficPolicy Cluster to another node)",
    ),
    value(
        "metrics-port",
        "removed from kube-proxy; use --metrics-bind-address",
    ),
    value(
        "oom-score-adj",
        "the DaemonSet's priority class and resources set this",
    ),
    switch("one_output", KLOG),
    switch("profiling", "no profiling endpoint"),
    value(
        "proxy-port-range",
        "removed from kube-proxy (userspace mode)",
    ),
    value("show-hidden-metrics-for-version", "no hidden metrics"),
    switch("skip_headers", KLOG),
    switch("skip_log_headers", KLOG),
    value("stderrthreshold", KLOG),
    value(
        "udp-timeout",
        "removed from kube-proxy (userspace mode); see --conntrack-udp-timeout",
    ),
    value("vmodule", KLOG),
    switch("windows-service", "Linux only"),
    value("write-config-to", "no default configuration to write"),
];

/// An error in the config file, naming the field (`conntrack.udpTimeout`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not YAML: {source}")]
    Yaml {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("{path}: {message}")]
    Document { path: PathBuf, message: String },
    #[error("{path}: {field}: {message}")]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// `detectLocalMode` / `--detect-local-mode`: how kube-proxy tells pod
/// traffic apart. Only the interface-based modes name something this
/// agent uses (its pod devices).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DetectLocal {
    /// `ClusterCIDR`, `NodeCIDR` or unset: by source address; here the
    /// device already tells, so nothing to take from it.
    ByAddress(String),
    /// `BridgeInterface` with `detectLocal.bridgeInterface`.
    Bridge(String),
    /// `InterfaceNamePrefix` with `detectLocal.interfaceNamePrefix`.
    InterfacePrefix(String),
}

impl DetectLocal {
    /// Resolves kube-proxy's mode and its two parameters; `names` are how
    /// the bridge and the prefix are given (`detectLocal.bridgeInterface`,
    /// `--pod-bridge-interface`), for errors. Callers name the mode's field.
    pub fn resolve(
        mode: &str,
        bridge: &str,
        prefix: &str,
        names: [&str; 2],
    ) -> Result<Self, String> {
        match mode {
            "" | "ClusterCIDR" | "NodeCIDR" => Ok(DetectLocal::ByAddress(mode.to_owned())),
            "BridgeInterface" if bridge.is_empty() => {
                Err(format!("BridgeInterface needs {}", names[0]))
            }
            "BridgeInterface" => Ok(DetectLocal::Bridge(bridge.to_owned())),
            "InterfaceNamePrefix" if prefix.is_empty() => {
                Err(format!("InterfaceNamePrefix needs {}", names[1]))
            }
            "InterfaceNamePrefix" => Ok(DetectLocal::InterfacePrefix(prefix.to_owned())),
            other => Err(format!(
                "unknown mode {other:?} (ClusterCIDR, NodeCIDR, BridgeInterface, \
                 InterfaceNamePrefix)"
            )),
        }
    }

    /// The pod-device glob it amounts to, if any.
    pub fn pod_devices(&self) -> Option<String> {
        match self {
            DetectLocal::ByAddress(_) => None,
            DetectLocal::Bridge(bridge) => Some(bridge.clone()),
            DetectLocal::InterfacePrefix(prefix) => Some(format!("{prefix}*")),
        }
    }
}

/// The fields of a KubeProxyConfiguration this agent uses, each `None`
/// when the file leaves it unset (absent, null or empty, which kube-proxy
/// defaults the same way).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KubeProxyConfig {
    /// `clientConnection.kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// `hostnameOverride`.
    pub hostname_override: Option<String>,
    /// `healthzBindAddress`.
    pub healthz_bind_address: Option<SocketAddr>,
    /// `metricsBindAddress`.
    pub metrics_bind_address: Option<SocketAddr>,
    /// `mode`, when it is ours (`ebpf`).
    pub mode: Option<String>,
    /// `clusterCIDR`.
    pub cluster_cidr: Option<Vec<SourceRange>>,
    /// `nodePortAddresses`.
    pub nodeport_addresses: Option<NodePortAddresses>,
    /// `conntrack.tcpEstablishedTimeout`.
    pub tcp_established_timeout: Option<Duration>,
    /// `conntrack.tcpCloseWaitTimeout`.
    pub tcp_close_wait_timeout: Option<Duration>,
    /// `conntrack.udpTimeout`.
    pub udp_timeout: Option<Duration>,
    /// `conntrack.udpStreamTimeout`.
    pub udp_stream_timeout: Option<Duration>,
    /// `detectLocalMode` with `detectLocal.*`.
    pub detect_local: Option<DetectLocal>,
    /// `logging.verbosity`.
    pub verbosity: Option<u8>,
}

/// A config file as read: the fields used, and the ones that are not.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadedConfig {
    pub config: KubeProxyConfig,
    /// Fields kube-proxy knows that carry a value this agent ignores
    /// (`iptables.masqueradeAll`), by path.
    pub ignored: Vec<String>,
    /// Fields kube-proxy would not know either (a typo?), by path.
    pub unknown: Vec<String>,
    /// Values kept but worth a word (`mode: ipvs`).
    pub notes: Vec<String>,
}

/// `--nodeport-addresses` / `nodePortAddresses`: CIDRs, or `primary`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Unset: the addresses of the node devices.
    #[default]
    Devices,
    /// Every local address inside one of these ranges.
    Cidrs(Vec<SourceRange>),
    /// The node's primary address of each family (kube-proxy's `primary`).
    Primary,
}

impl NodePortAddresses {
    /// Parses the list (callers name the flag or field in errors).
    pub fn parse<S: AsRef<str>>(values: &[S]) -> Result<Self, String> {
        let values: Vec<&str> = values
            .iter()
            .map(|v| v.as_ref().trim())
            .filter(|v| !v.is_empty())
            .collect();
        if values.is_empty() {
            return Ok(NodePortAddresses::Devices);
        }
        if values.contains(&"primary") {
            if values.len() > 1 {
                return Err("\"primary\" cannot be mixed with CIDRs".to_owned());
            }
            return Ok(NodePortAddresses::Primary);
        }
        let cidrs = values
            .iter()
            .map(|v| {
                parse_cidr(v).ok_or_else(|| {
                    format!("{v:?} is not a CIDR (address/prefix length) or \"primary\"")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(NodePortAddresses::Cidrs(cidrs))
    }
}

/// Parses a comma-separated CIDR list (`--cluster-cidr`, `clusterCIDR`):
/// at most one range per family, as kube-proxy validates it. Callers name
/// the flag or field in errors.
pub fn parse_cluster_cidr(text: &str) -> Result<Vec<SourceRange>, String> {
    let mut out: Vec<SourceRange> = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let range = Some(part)
            .filter(|p| p.contains('/'))
            .and_then(parse_cidr)
            .ok_or_else(|| format!("{part:?} is not a CIDR (address/prefix length)"))?;
        if out.iter().any(|r| r.addr.is_ipv4() == range.addr.is_ipv4()) {
            return Err(format!(
                "more than one {} range in {text:?}; a dual-stack list has one per family",
                if range.addr.is_ipv4() { "IPv4" } else { "IPv6" }
            ));
        }
        out.push(range);
    }
    Ok(out)
}

/// Parses kube-proxy's `ipport` (`0.0.0.0:10256`, `[::]:10256`, or a bare
/// address, which gets `default_port`). `Ok(None)` for the empty string.
pub fn parse_bind_address(text: &str, default_port: u16) -> Result<Option<SocketAddr>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(Some(address));
    }
    let bare = text.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => Ok(Some(SocketAddr::new(ip, default_port))),
        Err(_) => Err(format!(
            "{text:?} is not an address with port (0.0.0.0:{default_port}, [::]:{default_port})"
        )),
    }
}

/// The `log` level kube-proxy's `--v` / `logging.verbosity` amounts to:
/// klog's V(0)-V(2) are what this agent logs at info, V(3)-V(4) debug, the
/// rest trace.
pub fn log_level(verbosity: u8) -> log::LevelFilter {
    match verbosity {
        0..=2 => log::LevelFilter::Info,
        3..=4 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

/// Whether a YAML value carries something (kube-proxy treats null, "",
/// zero, false and empty collections as unset).
fn is_set(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !(s.is_empty() || s == "0s" || s == "0"),
        Value::Sequence(s) => !s.is_empty(),
        Value::Mapping(m) => !m.is_empty(),
        Value::Tagged(t) => is_set(&t.value),
    }
}

/// Reads a KubeProxyConfiguration file.
pub fn load(path: &Path) -> Result<LoadedConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text).map_err(|e| match e {
        ParseError::Yaml(source) => ConfigError::Yaml {
            path: path.to_owned(),
            source,
        },
        ParseError::Document(message) => ConfigError::Document {
            path: path.to_owned(),
            message,
        },
        ParseError::Field(field, message) => ConfigError::Field {
            path: path.to_owned(),
            field,
            message,
        },
    })
}

/// [`load`]'s errors before the file name is known.
#[derive(Debug)]
pub enum ParseError {
    Yaml(serde_yaml::Error),
    Document(String),
    /// The field's path and what is wrong with it.
    Field(String, String),
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::Yaml(e) => write!(f, "not YAML: {e}"),
            ParseError::Document(m) => f.write_str(m),
            ParseError::Field(field, m) => write!(f, "{field}: {m}"),
        }
    }
}

/// The fields kube-proxy knows and this agent does not use, as path
/// prefixes: everything under them that is set is reported.
const IGNORED_FIELDS: &[&str] = &[
    "bindAddress",
    "bindAddressHardFail",
    "clientConnection.acceptContentTypes",
    "clientConnection.burst",
    "clientConnection.contentType",
    "clientConnection.qps",
    "configSyncPeriod",
    "conntrack.maxPerCore",
    "conntrack.min",
    "conntrack.tcpBeLiberal",
    "enableProfiling",
    "featureGates",
    "iptables",
    "ipvs",
    "logging.flushFrequency",
    "logging.format",
    "logging.options",
    "logging.vmodule",
    "minSyncPeriod",
    "nftables",
    "oomScoreAdj",
    "portRange",
    "showHiddenMetricsForVersion",
    "syncPeriod",
    "udpIdleTimeout",
    "winkernel",
];

/// The fields used (leaves) and the sections that hold them.
const USED_FIELDS: &[&str] = &[
    "apiVersion",
    "kind",
    "clientConnection.kubeconfig",
    "hostnameOverride",
    "healthzBindAddress",
    "metricsBindAddress",
    "mode",
    "clusterCIDR",
    "nodePortAddresses",
    "conntrack.tcpEstablishedTimeout",
    "conntrack.tcpCloseWaitTimeout",
    "conntrack.udpTimeout",
    "conntrack.udpStreamTimeout",
    "detectLocalMode",
    "detectLocal.bridgeInterface",
    "detectLocal.interfaceNamePrefix",
    "logging.verbosity",
];
const SECTIONS: &[&str] = &["clientConnection", "conntrack", "detectLocal", "logging"];

/// Sorts every field of the document into used, ignored (set ones only)
/// and unknown.
fn classify(prefix: &str, mapping: &serde_yaml::Mapping, out: &mut LoadedConfig) {
    for (key, value) in mapping {
        let Some(key) = key.as_str() else {
            out.unknown.push(format!("{prefix}{key:?}"));
            continue;
        };
        let path = format!("{prefix}{key}");
        if USED_FIELDS.contains(&path.as_str()) {
            continue;
        }
        if IGNORED_FIELDS.contains(&path.as_str()) {
            collect_set(&path, value, &mut out.ignored);
            continue;
        }
        if SECTIONS.contains(&path.as_str()) {
            match value {
                Value::Mapping(inner) => classify(&format!("{path}."), inner, out),
                Value::Null => {}
                _ => out.unknown.push(path),
            }
            continue;
        }
        out.unknown.push(path);
    }
}

/// The set leaves under `path` (the path itself for a scalar or list).
fn collect_set(path: &str, value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Mapping(mapping) if !mapping.is_empty() => {
            for (key, inner) in mapping {
                let key = key
                    .as_str()
                    .map_or_else(|| format!("{key:?}"), str::to_owned);
                collect_set(&format!("{path}.{key}"), inner, out);
            }
        }
        other if is_set(other) => out.push(path.to_owned()),
        _ => {}
    }
}

/// Parses the text of a KubeProxyConfiguration.
pub fn parse(text: &str) -> Result<LoadedConfig, ParseError> {
    let document: Value = serde_yaml::from_str(text).map_err(ParseError::Yaml)?;
    let Value::Mapping(root) = &document else {
        return Err(ParseError::Document(format!(
            "not a {KIND} (a YAML mapping with apiVersion {API_VERSION})"
        )));
    };
    let field = |path: &str, message: String| ParseError::Field(path.to_owned(), message);
    let get = |path: &str| -> Option<&Value> {
        let mut current = &document;
        for part in path.split('.') {
            current = current.get(part)?;
        }
        Some(current).filter(|v| !v.is_null())
    };
    let string = |path: &str| -> Result<Option<String>, ParseError> {
        match get(path) {
            None => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim().to_owned())),
            Some(other) => Err(field(path, format!("expected a string, found {other:?}"))),
        }
    };
    match (string("apiVersion")?, string("kind")?) {
        (Some(version), Some(kind)) if version == API_VERSION && kind == KIND => {}
        (version, kind) => {
            return Err(ParseError::Document(format!(
                "apiVersion {:?} kind {:?}: expected apiVersion {API_VERSION}, kind {KIND}",
                version.unwrap_or_default(),
                kind.unwrap_or_default()
            )));
        }
    }
    // Zero is kube-proxy's "leave the kernel's setting": unset here.
    let duration = |path: &str| -> Result<Option<Duration>, ParseError> {
        Ok(string(path)?
            .map(|text| parse_go_duration(&text).map_err(|e| field(path, e)))
            .transpose()?
            .filter(|d| !d.is_zero()))
    };
    let bind = |path: &str, port: u16| -> Result<Option<SocketAddr>, ParseError> {
        Ok(string(path)?
            .map(|text| parse_bind_address(&text, port).map_err(|e| field(path, e)))
            .transpose()?
            .flatten())
    };

    let mut loaded = LoadedConfig::default();
    classify("", root, &mut loaded);
    loaded.ignored.sort();
    loaded.unknown.sort();
    let config = &mut loaded.config;
    config.kubeconfig = string("clientConnection.kubeconfig")?.map(PathBuf::from);
    config.hostname_override = string("hostnameOverride")?;
    config.healthz_bind_address = bind("healthzBindAddress", 10256)?;
    config.metrics_bind_address = bind("metricsBindAddress", 10249)?;
    match string("mode")? {
        None => {}
        Some(mode) if mode == MODE => config.mode = Some(mode),
        Some(mode) if KUBE_PROXY_MODES.contains(&mode.as_str()) => loaded.notes.push(format!(
            "mode {mode:?} is one of kube-proxy's; this agent runs its {MODE} datapath"
        )),
        Some(mode) => {
            return Err(field(
                "mode",
                format!("unknown mode {mode:?} (this agent's is {MODE:?})"),
            ));
        }
    }
    config.cluster_cidr = string("clusterCIDR")?
        .map(|text| parse_cluster_cidr(&text).map_err(|e| field("clusterCIDR", e)))
        .transpose()?
        .filter(|list| !list.is_empty());
    config.nodeport_addresses = match get("nodePortAddresses") {
        None => None,
        Some(Value::Sequence(items)) => {
            let mut values = Vec::new();
            for (index, item) in items.iter().enumerate() {
                match item.as_str() {
                    Some(text) => values.push(text.to_owned()),
                    None => {
                        return Err(field(
                            &format!("nodePortAddresses[{index}]"),
                            format!("expected a string, found {item:?}"),
                        ));
                    }
                }
            }
            Some(NodePortAddresses::parse(&values).map_err(|e| field("nodePortAddresses", e))?)
                .filter(|n| *n != NodePortAddresses::Devices)
        }
        Some(other) => {
            return Err(field(
                "nodePortAddresses",
                format!("expected a list, found {other:?}"),
            ));
        }
    };
    config.tcp_established_timeout = duration("conntrack.tcpEstablishedTimeout")?;
    config.tcp_close_wait_timeout = duration("conntrack.tcpCloseWaitTimeout")?;
    config.udp_timeout = duration("conntrack.udpTimeout")?;
    config.udp_stream_timeout = duration("conntrack.udpStreamTimeout")?;
    let mode = string("detectLocalMode")?.unwrap_or_default();
    let bridge = string("detectLocal.bridgeInterface")?.unwrap_or_default();
    let prefix = string("detectLocal.interfaceNamePrefix")?.unwrap_or_default();
    config.detect_local = Some(
        DetectLocal::resolve(
            &mode,
            &bridge,
            &prefix,
            [
                "detectLocal.bridgeInterface",
                "detectLocal.interfaceNamePrefix",
            ],
        )
        .map_err(|e| field("detectLocalMode", e))?,
    )
    .filter(|d| *d != DetectLocal::ByAddress(String::new()));
    config.verbosity = match get("logging.verbosity") {
        None => None,
        Some(Value::Number(n)) => Some(
            n.as_u64()
                .and_then(|v| u8::try_from(v).ok())
                .ok_or_else(|| field("logging.verbosity", format!("{n} is not a level 0-255")))?,
        ),
        Some(other) => {
            return Err(field(
                "logging.verbosity",
                format!("expected a number, found {other:?}"),
            ));
        }
    };
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `config.conf` of the kube-proxy ConfigMap `kubeadm init` writes.
    pub fn kubeadm_config() -> String {
        let configmap: Value =
            serde_yaml::from_str(include_str!("testdata/kubeadm-kube-proxy-configmap.yaml"))
                .expect("ConfigMap YAML");
        configmap["data"]["config.conf"]
            .as_str()
            .expect("data.config.conf")
            .to_owned()
    }

    #[test]
    fn kubeadms_file_maps_onto_the_agent() {
        let loaded = parse(&kubeadm_config()).expect("kubeadm's config");
        let c = &loaded.config;
        assert_eq!(
            c.kubeconfig.as_deref(),
            Some(Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
        );
        let cidrs: Vec<String> = c
            .cluster_cidr
            .iter()
            .flatten()
            .map(|r| format!("{}/{}", r.addr, r.prefix_len))
            .collect();
        assert_eq!(cidrs, ["10.244.0.0/16", "fd00:10:244::/56"]);
        // kubeadm leaves these empty, null or zero: the defaults apply.
        assert_eq!(c.healthz_bind_address, None);
        assert_eq!(c.metrics_bind_address, None);
        assert_eq!(c.tcp_established_timeout, None);
        assert_eq!(c.udp_timeout, None);
        assert_eq!(c.udp_stream_timeout, None);
        assert_eq!(c.hostname_override, None);
        assert_eq!(c.mode, None);
        assert_eq!(c.nodeport_addresses, None);
        assert_eq!(c.detect_local, None);
        assert_eq!(c.verbosity, Some(0));
        assert!(loaded.unknown.is_empty(), "{:?}", loaded.unknown);
        assert!(loaded.notes.is_empty(), "{:?}", loaded.notes);
        // Only fields that carry a value are reported; kubeadm's zeros
        // and nulls are not.
        assert_eq!(loaded.ignored, ["bindAddress"]);
    }

    #[test]
    fn every_used_field_is_read() {
        let loaded = parse(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             clientConnection: {kubeconfig: /etc/kp.conf, qps: 50}\n\
             hostnameOverride: node-7\nhealthzBindAddress: 0.0.0.0:10266\n\
             metricsBindAddress: '[::]'\nmode: ebpf\nclusterCIDR: fd00::/48,10.0.0.0/8\n\
             nodePortAddresses: [primary]\n\
             conntrack: {tcpEstablishedTimeout: 2h0m0s, tcpCloseWaitTimeout: 30m, \
             udpTimeout: 1m30s, udpStreamTimeout: 500ms, maxPerCore: 0}\n\
             detectLocalMode: InterfaceNamePrefix\ndetectLocal: {interfaceNamePrefix: cali}\n\
             logging: {verbosity: 4, format: text}\nfeatureGates: {Foo: true}\nclusterCIRD: x\n",
        )
        .expect("parse");
        let c = loaded.config;
        assert_eq!(c.kubeconfig, Some(PathBuf::from("/etc/kp.conf")));
        assert_eq!(c.hostname_override.as_deref(), Some("node-7"));
        assert_eq!(
            c.healthz_bind_address,
            Some("0.0.0.0:10266".parse().unwrap())
        );
        assert_eq!(c.metrics_bind_address, Some("[::]:10249".parse().unwrap()));
        assert_eq!(c.mode.as_deref(), Some("ebpf"));
        assert_eq!(c.cluster_cidr.map(|l| l.len()), Some(2));
        assert_eq!(c.nodeport_addresses, Some(NodePortAddresses::Primary));
        assert_eq!(c.tcp_established_timeout, Some(Duration::from_secs(7200)));
        assert_eq!(c.tcp_close_wait_timeout, Some(Duration::from_secs(1800)));
        assert_eq!(c.udp_timeout, Some(Duration::from_secs(90)));
        assert_eq!(c.udp_stream_timeout, Some(Duration::from_millis(500)));
        assert_eq!(
            c.detect_local.and_then(|d| d.pod_devices()).as_deref(),
            Some("cali*")
        );
        assert_eq!(c.verbosity, Some(4));
        assert_eq!(
            loaded.ignored,
            ["clientConnection.qps", "featureGates.Foo", "logging.format"]
        );
        assert_eq!(loaded.unknown, ["clusterCIRD"]);
    }

    #[test]
    fn bad_fields_are_named() {
        let head = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";
        for (body, needle) in [
            (
                "conntrack: {udpTimeout: 5d}\n",
                "conntrack.udpTimeout: \"5d\": unknown unit",
            ),
            (
                "conntrack: {tcpEstablishedTimeout: -1h}\n",
                "conntrack.tcpEstablishedTimeout: \"-1h\" is negative",
            ),
            (
                "conntrack: {udpStreamTimeout: [1]}\n",
                "conntrack.udpStreamTimeout: expected a string",
            ),
            (
                "clusterCIDR: 10.244.0.0\n",
                "clusterCIDR: \"10.244.0.0\" is not a CIDR",
            ),
            (
                "clusterCIDR: 10.0.0.0/8,10.1.0.0/16\n",
                "more than one IPv4 range",
            ),
            (
                "healthzBindAddress: nowhere:1\n",
                "healthzBindAddress: \"nowhere:1\"",
            ),
            (
                "nodePortAddresses: [primary, 10.0.0.0/8]\n",
                "cannot be mixed",
            ),
            (
                "nodePortAddresses: [10.0.0.0/33]\n",
                "nodePortAddresses: \"10.0.0.0/33\"",
            ),
            (
                "nodePortAddresses: [1]\n",
                "nodePortAddresses[0]: expected a string",
            ),
            (
                "nodePortAddresses: 10.0.0.0/8\n",
                "nodePortAddresses: expected a list",
            ),
            ("mode: turbo\n", "mode: unknown mode \"turbo\""),
            (
                "detectLocalMode: InterfaceNamePrefix\n",
                "detectLocalMode: InterfaceNamePrefix needs detectLocal.interfaceNamePrefix",
            ),
            (
                "logging: {verbosity: high}\n",
                "logging.verbosity: expected a number",
            ),
            (
                "hostnameOverride: 7\n",
                "hostnameOverride: expected a string",
            ),
        ] {
            let error = parse(&format!("{head}{body}")).expect_err(body).to_string();
            assert!(error.contains(needle), "{body}: {error}");
        }
    }

    #[test]
    fn wrong_kind_or_version_is_refused() {
        for text in [
            "apiVersion: kubeproxy.config.k8s.io/v1beta1\nkind: KubeProxyConfiguration\n",
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration\n",
            "kind: KubeProxyConfiguration\n",
            "- a list\n",
        ] {
            let error = parse(text).expect_err(text).to_string();
            assert!(
                error.contains("kubeproxy.config.k8s.io/v1alpha1"),
                "{text}: {error}"
            );
        }
        assert!(matches!(parse("a: [b"), Err(ParseError::Yaml(_))));
    }

    #[test]
    fn kube_proxy_modes_are_noted_not_refused() {
        let loaded = parse(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: ipvs\n",
        )
        .expect("parse");
        assert_eq!(loaded.config.mode, None);
        assert!(loaded.notes[0].contains("\"ipvs\""), "{:?}", loaded.notes);
    }

    #[test]
    fn bind_addresses_take_kube_proxys_forms() {
        assert_eq!(
            parse_bind_address("0.0.0.0:10256", 1),
            Ok(Some("0.0.0.0:10256".parse().unwrap()))
        );
        assert_eq!(
            parse_bind_address("[::]:10256", 1),
            Ok(Some("[::]:10256".parse().unwrap()))
        );
        assert_eq!(
            parse_bind_address("127.0.0.1", 10249),
            Ok(Some("127.0.0.1:10249".parse().unwrap()))
        );
        assert_eq!(
            parse_bind_address("::1", 10249),
            Ok(Some("[::1]:10249".parse().unwrap()))
        );
        assert_eq!(parse_bind_address("", 1), Ok(None));
        assert!(parse_bind_address("localhost:1", 1).is_err());
    }

    #[test]
    fn verbosity_maps_onto_levels() {
        assert_eq!(log_level(0), log::LevelFilter::Info);
        assert_eq!(log_level(2), log::LevelFilter::Info);
        assert_eq!(log_level(4), log::LevelFilter::Debug);
        assert_eq!(log_level(9), log::LevelFilter::Trace);
    }

    #[test]
    fn ignored_flags_are_unique_and_not_ours() {
        let mut names: Vec<&str> = IGNORED_FLAGS.iter().map(|f| f.name).collect();
        names.sort();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before, "a flag is listed twice");
        for ours in [
            "cluster-cidr",
            "master",
            "config",
            "cleanup",
            "v",
            "proxy-mode",
        ] {
            assert!(!names.contains(&ours), "{ours} is a real flag");
        }
    }
}
