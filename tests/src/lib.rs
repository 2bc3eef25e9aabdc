//! Support for the integration tests: a small packet builder and parser that
//! checks checksums independently of the kernel, the shared one-node
//! cluster of the end-to-end tests, and a Kubernetes API list/watch test
//! double.

pub mod apiserver;
pub mod cluster;
pub mod fixture;
pub mod packet;
pub mod packet6;

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

/// `$LBCTL_BIN` or the workspace's debug build of `lbctl`.
pub fn lbctl_binary() -> std::path::PathBuf {
    std::env::var_os("LBCTL_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| xtask::debug_binary("lbctl"))
}

/// `lbctl --bpffs PINS ARGS -o json`, parsed; panics with lbctl's error.
pub fn lbctl_json(pins: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(lbctl_binary())
        .arg("--bpffs")
        .arg(pins)
        .args(args)
        .args(["-o", "json"])
        .output()
        .expect("run lbctl");
    assert!(
        out.status.success(),
        "lbctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "lbctl {args:?}: {e}:\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}
