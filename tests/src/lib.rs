//! Support for the integration tests: a small packet builder and parser that
//! checks checksums independently of the kernel, the shared one-node
//! cluster of the end-to-end tests, and a Kubernetes API list/watch test
//! double.

pub mod apiserver;
pub mod cluster;
pub mod fixture;
pub mod packet;

/// Panics with a clear message unless the test runs as root: the datapath
/// and network-namespace tests load BPF programs and create namespaces.
pub fn require_root(test: &str) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "{test} needs root (CAP_BPF, CAP_NET_ADMIN): run it through `cargo xtask test` as root"
        );
    }
}
