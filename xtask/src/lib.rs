//! Developer tasks (`cargo xtask setup|demo|test|clean`) and the
//! network-namespace toolkit the integration tests and the demo share:
//! namespaces and bpffs directories as RAII guards ([`netns`]), cgroup v2
//! directories ([`cgroup`]), CNI-like topologies ([`topology`]), echo
//! servers and clients ([`echo`]) and the agent as a child process inside a
//! namespace ([`agent`]).
//!
//! Nothing here depends on lb-agent or on the BPF toolchain: `setup` must
//! run before either exists.

pub mod agent;
pub mod cgroup;
pub mod demo;
pub mod echo;
pub mod fuzz;
pub mod netns;
pub mod setup;
pub mod tempdir;
pub mod topology;

use std::path::{Path, PathBuf};
use std::process::Command;

pub use agent::{AgentProcess, Restrictions};
pub use cgroup::Cgroup;
pub use echo::{ECHO_PREFIX, EchoServer, HoldConnection, client_of, http_get, pod_of, udp_request};
pub use netns::{BpffsDir, CleanupReport, NetNs, cleanup_leftovers, cleanup_stale};
pub use setup::setup;
pub use tempdir::TempDir;
pub use topology::{Cluster, NODE_DEVICE, Node, Pod, SingleNode};

/// The workspace root (the directory holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_owned()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                std::env::current_dir().unwrap_or_default().join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// A dev-profile binary of the workspace (`target/debug/<name>`).
pub fn debug_binary(name: &str) -> PathBuf {
    target_dir().join("debug").join(name)
}

/// `cargo <args>` run from the workspace root, with `~/.cargo/bin` on PATH
/// (lb-agent's build script needs `bpf-linker`, which lives there).
pub fn cargo(args: &[&str]) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(args).current_dir(workspace_root());
    if let Some(bin) = setup::cargo_bin_dir() {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
        if !dirs.contains(&bin) {
            dirs.push(bin);
            if let Ok(joined) = std::env::join_paths(dirs) {
                command.env("PATH", joined);
            }
        }
    }
    command
}
