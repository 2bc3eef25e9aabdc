//! The agent under test as a child process inside a node namespace.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::{NetNs, TEST_PREFIX};
use crate::tempdir::TempDir;

/// How long the agent gets to exit after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// Capability names (as a Kubernetes securityContext spells them, without
/// `CAP_`) by number, from linux/capability.h.
const CAPABILITY_NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// What a container that is not privileged gives the process, as a
/// DaemonSet's securityContext asks: only `capabilities` (every other one
/// dropped from the bounding set, so not even root gets them back at
/// exec), no privilege gain (`allowPrivilegeEscalation: false`), and
/// /proc/sys read-only (as container runtimes mount it) in a mount
/// namespace of the child's own, so nothing outside the child changes.
#[derive(Clone, Debug)]
pub struct Restrictions {
    /// Bit N: keep capability N.
    keep: u64,
}

impl Restrictions {
    /// `names` as a securityContext's `capabilities.add` spells them
    /// (`NET_ADMIN`, `CAP_BPF`); an unknown name is an error.
    pub fn container(names: &[impl AsRef<str>]) -> Result<Restrictions> {
        let mut keep = 0u64;
        for name in names {
            let name = name.as_ref();
            let bare = name.trim_start_matches("CAP_");
            let number = CAPABILITY_NAMES
                .iter()
                .position(|n| n.eq_ignore_ascii_case(bare))
                .with_context(|| format!("unknown capability {name:?}"))?;
            keep |= 1 << number;
        }
        Ok(Restrictions { keep })
    }

    /// The capability mask kept, as /proc/PID/status prints `CapEff`.
    pub fn mask(&self) -> u64 {
        self.keep
    }

    /// Runs in the child between fork and exec: only syscalls, no
    /// allocation (async-signal-safe).
    fn apply_in_child(&self) -> std::io::Result<()> {
        fn check(ret: libc::c_int) -> std::io::Result<()> {
            if ret < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
        // SAFETY: plain syscalls on constant, NUL-terminated paths; they
        // change only this (forked) process.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Nothing mounted here propagates back to the machine.
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"/proc/sys".as_ptr(),
                c"/proc/sys".as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                std::ptr::null(),
                c"/proc/sys".as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                std::ptr::null(),
            ))?;
            // Bounding set last: dropping CAP_SYS_ADMIN ends mounting. The
            // kernel refuses numbers past its last capability (EINVAL).
            for cap in 0..64u64 {
                if self.keep & (1 << cap) == 0
                    && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) < 0
                    && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            check(libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            ))?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        }
        Ok(())
    }
}

/// A running agent (or any program) inside a namespace, its stdout and
/// stderr in one log file. Dropping it stops it: SIGTERM, SIGKILL after 3 s.
#[derive(Debug)]
pub struct AgentProcess {
    child: Child,
    exit_status: Option<ExitStatus>,
    log_path: PathBuf,
    // Keeps the default log directory alive as long as the process.
    _log_dir: Option<TempDir>,
}

impl AgentProcess {
    /// Starts `binary args...` inside `ns` with extra environment `env`.
    /// The log goes to `log_path`, or to `agent.log` in a temp directory
    /// removed on drop. The child also gets SIGTERM if the thread that
    /// spawned it dies (PR_SET_PDEATHSIG), so a crashed test leaves no
    /// agent behind: spawn it from the thread that owns it.
    pub fn spawn<I, S>(
        ns: &NetNs,
        binary: &Path,
        args: I,
        env: &[(&str, &str)],
        log_path: Option<&Path>,
    ) -> Result<AgentProcess>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::spawn_restricted(ns, binary, args, env, log_path, None)
    }

    /// [`AgentProcess::spawn`], with `restrictions` applied to the child
    /// (after it entered `ns`, before exec) when given.
    pub fn spawn_restricted<I, S>(
        ns: &NetNs,
        binary: &Path,
        args: I,
        env: &[(&str, &str)],
        log_path: Option<&Path>,
        restrictions: Option<&Restrictions>,
    ) -> Result<AgentProcess>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let (log_path, log_dir) = match log_path {
            Some(path) => (path.to_owned(), None),
            None => {
                let dir = TempDir::new(TEST_PREFIX, "agent-log")?;
                (dir.path().join("agent.log"), Some(dir))
            }
        };
        let log = File::create(&log_path)
            .with_context(|| format!("creating log file {}", log_path.display()))?;
        let mut command = ns.command(binary);
        command
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl(2) is async-signal-safe and touches no shared state.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        if let Some(restrictions) = restrictions.cloned() {
            // SAFETY: apply_in_child makes only async-signal-safe syscalls.
            unsafe {
                command.pre_exec(move || restrictions.apply_in_child());
            }
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {} in {}", binary.display(), ns.name()))?;
        Ok(AgentProcess {
            child,
            exit_status: None,
            log_path,
            _log_dir: log_dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process has written so far.
    pub fn log_contents(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log_contents();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `Some(status)` once the process has exited.
    pub fn exit_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.exit_status.is_none() {
            self.exit_status = self.child.try_wait().context("waiting for the agent")?;
        }
        Ok(self.exit_status)
    }

    /// Waits until the log contains `needle`; fails at the deadline or as
    /// soon as the process exits, with the log tail in the error.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_contents().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.exit_status()? {
                bail!(
                    "agent exited ({status}) before logging {needle:?}; log tail:\n{}",
                    self.log_tail(30)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "agent did not log {needle:?} within {timeout:?}; log tail:\n{}",
                    self.log_tail(30)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then SIGKILL after 3 s; returns the exit status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.exit_status()? {
            return Ok(status);
        }
        // SAFETY: kill(2) on our own child, which has not been reaped yet
        // (try_wait above returned None), so the pid is still ours.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = self.exit_status()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let status = self.child.wait().context("waiting for the agent")?;
        self.exit_status = Some(status);
        Ok(status)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
