//! Network namespaces and bpffs directories owned by RAII guards, plus the
//! clean-up of leftovers by name prefix.
//!
//! Every namespace this crate creates is named `<prefix>-<pid>-<counter>-<role>`
//! (`lbt` for tests, `lbd` for the demo), so leftovers of a crashed run can be
//! recognised and removed, and the ones of a run that is still alive can be
//! told apart (its pid is still running).
//!
//! Code runs inside a namespace in one of two ways, never `ip netns exec`
//! (which remounts /sys and hides bpffs):
//! - threads: [`NetNs::run`] / [`NetNs::spawn_thread`] call `setns` on a fresh
//!   thread (the network namespace is per thread; sockets created there stay
//!   in that namespace wherever they are used afterwards);
//! - processes: [`NetNs::command`] calls `setns` in the child before `exec`,
//!   [`NetNs::sh`] uses `nsenter --net=`.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Name prefix of everything created by tests.
pub const TEST_PREFIX: &str = "lbt";
/// Name prefix of everything created by `cargo xtask demo`.
pub const DEMO_PREFIX: &str = "lbd";
/// Prefixes `cargo xtask clean` removes.
pub const PREFIXES: [&str; 2] = [TEST_PREFIX, DEMO_PREFIX];

/// Where `ip netns add` puts its bind mounts.
pub const NETNS_DIR: &str = "/run/netns";
/// Where bpffs is mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Longest name we generate; short names keep `ip netns list` readable.
const MAX_NAME_LEN: usize = 40;

static NAME_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A process-unique name `<prefix>-<pid>-<counter>[-<role>]`, at most 40
/// characters; the role is reduced to `[A-Za-z0-9-]` and truncated.
pub fn unique_name(prefix: &str, role: &str) -> String {
    let counter = NAME_COUNTER.fetch_add(1, Ordering::Relaxed);
    let head = format!("{prefix}-{}-{counter}", std::process::id());
    let role: String = role
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let room = MAX_NAME_LEN.saturating_sub(head.len() + 1);
    if role.is_empty() || room == 0 {
        head
    } else {
        format!("{head}-{}", &role[..role.len().min(room)])
    }
}

/// A network namespace created with `ip netns add`, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    path: PathBuf,
}

impl NetNs {
    /// Creates a test namespace (`lbt-<pid>-<counter>-<role>`).
    pub fn new(role: &str) -> Result<NetNs> {
        NetNs::with_prefix(TEST_PREFIX, role)
    }

    /// Creates a namespace named `<prefix>-<pid>-<counter>-<role>`, with `lo` up.
    pub fn with_prefix(prefix: &str, role: &str) -> Result<NetNs> {
        // A leftover of an earlier process with the same pid may hold the
        // name; the counter moves on, so a few attempts always find a free one.
        let mut last_error = None;
        for _ in 0..8 {
            let name = unique_name(prefix, role);
            let path = Path::new(NETNS_DIR).join(&name);
            if path.exists() {
                continue;
            }
            match run_checked(Command::new("ip").args(["netns", "add", &name])) {
                Ok(_) => {
                    let ns = NetNs { name, path };
                    ns.ip(&["link", "set", "lo", "up"])?;
                    return Ok(ns);
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("no free namespace name")))
            .with_context(|| format!("creating network namespace for {role:?}"))
    }

    /// The name as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, usable with `nsenter --net=` and `setns`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `ip -n <name> <args>`; the error carries ip's stderr.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run_checked(Command::new("ip").arg("-n").arg(&self.name).args(args)).map(drop)
    }

    /// Runs a program inside the namespace with `nsenter --net=<path>` and
    /// returns its output whatever its exit status (check `status`); fails
    /// only if it cannot be started.
    pub fn sh(&self, cmd: &[&str]) -> Result<Output> {
        let (program, args) = cmd.split_first().context("sh: empty command")?;
        Command::new("nsenter")
            .arg(format!("--net={}", self.path.display()))
            .arg("--")
            .arg(program)
            .args(args)
            .output()
            .with_context(|| format!("running nsenter {cmd:?} in {}", self.name))
    }

    /// Like [`NetNs::sh`] but fails on a non-zero exit; returns stdout.
    pub fn sh_ok(&self, cmd: &[&str]) -> Result<String> {
        let output = self.sh(cmd)?;
        if !output.status.success() {
            bail!(
                "{cmd:?} in {} failed ({}): {}",
                self.name,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Sets a sysctl (`net.ipv4.ip_forward`) inside the namespace. Written
    /// from a thread that entered the namespace: /proc/sys/net shows the
    /// namespace of the thread that opens it.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        let value = value.to_owned();
        let written = path.clone();
        self.run(move || std::fs::write(&written, value))?
            .with_context(|| format!("writing {} in {}", path.display(), self.name))
    }

    /// Runs `f` on a new thread inside the namespace and returns its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let name = self.name.clone();
        self.spawn_thread(&format!("in-{name}"), f)?
            .join()
            .map_err(|_| anyhow!("thread inside {name} panicked"))
    }

    /// Spawns a (long-running) thread inside the namespace. Returns once the
    /// thread has entered it, so a failing `setns` is reported here.
    pub fn spawn_thread<T: Send + 'static>(
        &self,
        thread_name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<JoinHandle<T>> {
        let ns_file = self.open()?;
        let (entered_tx, entered_rx) = mpsc::channel::<std::io::Result<()>>();
        let handle = thread::Builder::new()
            .name(thread_name.chars().take(15).collect())
            .spawn(move || {
                let entered = enter_netns(&ns_file);
                let ok = entered.is_ok();
                // The receiver waits for this message; it cannot be gone.
                let _ = entered_tx.send(entered);
                if !ok {
                    // Never run `f` in the wrong namespace. resume_unwind
                    // skips the panic hook: the error is reported by the
                    // caller, not printed here.
                    std::panic::resume_unwind(Box::new("setns failed"));
                }
                f()
            })
            .context("spawning thread")?;
        match entered_rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(error)) => {
                let _ = handle.join();
                Err(error).with_context(|| format!("setns into {}", self.name))
            }
            Err(_) => Err(anyhow!("thread for {} died before setns", self.name)),
        }
    }

    /// A `Command` whose child enters the namespace (setns before exec).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new(program);
        match self.open() {
            Ok(ns_file) => {
                // SAFETY: the closure only calls setns(2), which is
                // async-signal-safe, and allocates nothing.
                unsafe {
                    command.pre_exec(move || enter_netns(&ns_file));
                }
            }
            Err(_) => {
                // The namespace is gone: make the spawn fail rather than run
                // the child in the root namespace.
                // SAFETY: returns an error without touching any state.
                unsafe {
                    command.pre_exec(|| Err(std::io::Error::from_raw_os_error(libc::ENOENT)));
                }
            }
        }
        command
    }

    /// The namespace's inode, as `/proc/PID/ns/net` shows it (`net:[INODE]`).
    pub fn inode(&self) -> Result<u64> {
        Ok(std::fs::metadata(&self.path)
            .with_context(|| format!("stat {}", self.path.display()))?
            .ino())
    }

    fn open(&self) -> Result<File> {
        File::open(&self.path).with_context(|| format!("opening {}", self.path.display()))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn enter_netns(ns_file: &File) -> std::io::Result<()> {
    // SAFETY: plain syscall on a valid, open namespace file descriptor.
    if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Runs a command, failing with its stderr if it exits non-zero.
pub(crate) fn run_checked(command: &mut Command) -> Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// Whether bpffs is mounted at /sys/fs/bpf.
pub fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(1) == Some(&BPFFS_ROOT) && fields.get(2) == Some(&"bpf")
        })
    })
}

/// A directory of its own under /sys/fs/bpf (one per agent), removed with
/// everything pinned in it on drop.
#[derive(Debug)]
pub struct BpffsDir {
    path: PathBuf,
}

impl BpffsDir {
    /// Creates `/sys/fs/bpf/lbt-<pid>-<counter>`.
    pub fn new() -> Result<BpffsDir> {
        BpffsDir::with_prefix(TEST_PREFIX)
    }

    /// Creates `/sys/fs/bpf/<prefix>-<pid>-<counter>`.
    pub fn with_prefix(prefix: &str) -> Result<BpffsDir> {
        if !bpffs_mounted() {
            bail!("bpffs is not mounted at {BPFFS_ROOT}; run `cargo xtask setup`");
        }
        let path = Path::new(BPFFS_ROOT).join(unique_name(prefix, ""));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(BpffsDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        // Pinned maps, programs and links are files on bpffs: unlinking
        // them drops the pin's reference.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// What a clean-up removed.
#[derive(Debug, Default)]
pub struct CleanupReport {
    pub killed_agents: Vec<u32>,
    pub namespaces: Vec<String>,
    pub bpffs_dirs: Vec<PathBuf>,
    pub temp_dirs: Vec<PathBuf>,
    pub cgroups: Vec<PathBuf>,
}

impl CleanupReport {
    pub fn is_empty(&self) -> bool {
        self.killed_agents.is_empty()
            && self.namespaces.is_empty()
            && self.bpffs_dirs.is_empty()
            && self.temp_dirs.is_empty()
            && self.cgroups.is_empty()
    }

    /// One line per removed thing.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        lines.extend(
            self.killed_agents
                .iter()
                .map(|pid| format!("killed lb-agent pid {pid}")),
        );
        lines.extend(
            self.namespaces
                .iter()
                .map(|name| format!("deleted network namespace {name}")),
        );
        lines.extend(
            self.bpffs_dirs
                .iter()
                .chain(&self.temp_dirs)
                .chain(&self.cgroups)
                .map(|path| format!("removed {}", path.display())),
        );
        lines
    }
}

/// Removes every namespace, bpffs directory, temp directory and cgroup with
/// one of our prefixes (a cgroup's processes are moved to its parent first),
/// killing `lb-agent` processes left inside those namespaces.
/// For `cargo xtask clean`: it also removes what a running test owns.
pub fn cleanup_leftovers() -> CleanupReport {
    cleanup_matching(|_| true)
}

/// Like [`cleanup_leftovers`] but only for names whose pid component is not
/// a running process, so concurrent live runs are left alone.
pub fn cleanup_stale() -> CleanupReport {
    cleanup_matching(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// The owning pid of one of our names, `None` for foreign names.
fn owner_pid(name: &str) -> Option<u32> {
    let (prefix, rest) = name.split_once('-')?;
    if !PREFIXES.contains(&prefix) {
        return None;
    }
    rest.split('-').next()?.parse().ok()
}

fn matching_entries(dir: &Path, is_removable: &impl Fn(u32) -> bool) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let pid = owner_pid(&name)?;
            is_removable(pid).then(|| (name, entry.path()))
        })
        .collect();
    found.sort();
    found
}

fn cleanup_matching(is_removable: impl Fn(u32) -> bool) -> CleanupReport {
    let mut report = CleanupReport::default();
    let namespaces = matching_entries(Path::new(NETNS_DIR), &is_removable);

    let inodes: Vec<u64> = namespaces
        .iter()
        .filter_map(|(_, path)| std::fs::metadata(path).ok().map(|m| m.ino()))
        .collect();
    report.killed_agents = kill_agents_in(&inodes);

    for (name, _) in namespaces {
        let deleted = Command::new("ip")
            .args(["netns", "del", &name])
            .output()
            .is_ok_and(|output| output.status.success());
        if deleted {
            report.namespaces.push(name);
        }
    }
    for (_, path) in matching_entries(Path::new(BPFFS_ROOT), &is_removable) {
        if std::fs::remove_dir_all(&path).is_ok() {
            report.bpffs_dirs.push(path);
        }
    }
    for (_, path) in matching_entries(&std::env::temp_dir(), &is_removable) {
        if path.is_dir() && std::fs::remove_dir_all(&path).is_ok() {
            report.temp_dirs.push(path);
        }
    }
    if let Some(root) = crate::cgroup::cgroup2_root() {
        for (_, path) in matching_entries(&root, &is_removable) {
            if path.is_dir() && crate::cgroup::remove(&path).is_ok() {
                report.cgroups.push(path);
            }
        }
    }
    report
}

/// SIGTERM, then SIGKILL after 3 s, to `lb-agent` processes whose network
/// namespace is one of `inodes`.
fn kill_agents_in(inodes: &[u64]) -> Vec<u32> {
    if inodes.is_empty() {
        return Vec::new();
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let agents: Vec<u32> = procs
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let netns = std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino());
            comm.trim() == "lb-agent" && netns.is_ok_and(|ino| inodes.contains(&ino))
        })
        .collect();
    for &pid in &agents {
        // SAFETY: kill(2) with a pid we just read from /proc.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline
        && agents
            .iter()
            .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
    {
        thread::sleep(Duration::from_millis(50));
    }
    for &pid in &agents {
        if Path::new(&format!("/proc/{pid}")).exists() {
            // SAFETY: as above.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
    agents
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_short_and_parse_back() {
        let name = unique_name(TEST_PREFIX, "a very long role name with spaces/and slashes");
        assert!(name.len() <= MAX_NAME_LEN, "{name} is too long");
        assert!(name.starts_with(&format!("lbt-{}-", std::process::id())));
        assert!(!name.contains(' ') && !name.contains('/'), "{name}");
        assert_eq!(owner_pid(&name), Some(std::process::id()));
        assert_ne!(unique_name(TEST_PREFIX, "x"), unique_name(TEST_PREFIX, "x"));
    }

    #[test]
    fn foreign_names_are_not_ours() {
        assert_eq!(owner_pid("cni-1234-abcd"), None);
        assert_eq!(owner_pid("lbt"), None);
        assert_eq!(owner_pid("lbt-notapid-1"), None);
        assert_eq!(owner_pid("lbd-42-0-node"), Some(42));
    }
}
