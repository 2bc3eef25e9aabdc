//! The node agent: cluster state (`source`) -> desired tables (`model`) ->
//! BPF maps (`datapath`). Data flows one way; only `datapath` touches the kernel.

pub mod datapath;
pub mod model;
pub mod source;
