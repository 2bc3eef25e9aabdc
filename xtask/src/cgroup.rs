//! cgroup v2 directories owned by RAII guards, for socket-level balancing
//! (`lb-agent --socket-lb-cgroup`): always a directory of its own below the
//! cgroup v2 root, never the root itself.
//!
//! Names follow the namespaces' scheme (`<prefix>-<pid>-<counter>-<role>`),
//! so [`crate::cleanup_stale`] can remove what a crashed run left.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::netns::unique_name;

/// Mount points tried for the cgroup v2 hierarchy, in order: the hybrid
/// layout's `unified` mount, then a pure cgroup v2 system's.
const CGROUP2_MOUNTS: [&str; 2] = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"];

/// Where cgroup v2 is mounted, if it is.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let cgroup2: Vec<&str> = mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let mount_point = fields.nth(1)?;
            (fields.next() == Some("cgroup2")).then_some(mount_point)
        })
        .collect();
    CGROUP2_MOUNTS
        .iter()
        .find(|mount| cgroup2.contains(mount))
        .map(PathBuf::from)
}

/// Moves process `pid` into the cgroup v2 directory `dir`.
pub fn move_process(dir: &Path, pid: u32) -> std::io::Result<()> {
    std::fs::write(dir.join("cgroup.procs"), pid.to_string())
}

/// The processes in the cgroup v2 directory `dir`.
pub fn processes(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

/// Moves every process of `dir` to its parent and removes it; retries for
/// up to a second (a process may be entering while we look).
pub fn remove(dir: &Path) -> Result<()> {
    let parent = dir
        .parent()
        .with_context(|| format!("{} has no parent", dir.display()))?;
    for _ in 0..50 {
        for pid in processes(dir) {
            let _ = move_process(parent, pid);
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
    bail!("cgroup {} still holds {:?}", dir.display(), processes(dir))
}

/// A cgroup v2 directory created below the root, removed on drop after
/// its processes are moved to the parent.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2 root>/<prefix>-<pid>-<counter>-<role>`.
    pub fn with_prefix(prefix: &str, role: &str) -> Result<Cgroup> {
        let Some(root) = cgroup2_root() else {
            bail!("no cgroup v2 hierarchy mounted (tried {CGROUP2_MOUNTS:?})");
        };
        let path = root.join(unique_name(prefix, role));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Cgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = remove(&self.path) {
            eprintln!("warning: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::TEST_PREFIX;

    #[test]
    fn a_cgroup_is_removed_with_a_process_still_inside() {
        let cgroup = Cgroup::with_prefix(TEST_PREFIX, "cgroup-test").expect("cgroup");
        let path = cgroup.path().to_owned();
        let root = cgroup2_root().expect("cgroup v2 root");
        assert_eq!(
            path.parent(),
            Some(root.as_path()),
            "not directly below the root"
        );
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        move_process(&path, child.id()).expect("moving the child in");
        assert_eq!(processes(&path), vec![child.id()]);
        drop(cgroup);
        let gone = !path.exists();
        let moved = processes(&root).contains(&child.id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(gone, "{} still exists", path.display());
        assert!(moved, "the child was not moved to the parent");
    }
}
