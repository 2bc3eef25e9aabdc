//! The node agent: cluster state (`source`) -> desired tables (`model`) ->
//! BPF maps (`datapath`). Data flows one way; only `datapath` touches the kernel.

pub mod bpf_log;
pub mod conntrack_config;
pub mod datapath;
pub mod health;
pub mod http;
pub mod kube_proxy;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod node;
pub mod outlier;
pub mod source;
pub mod upgrade;
