//! Support for the integration tests: a small packet builder and parser that
//! checks checksums independently of the kernel, the shared one-node
//! cluster of the end-to-end tests, and a Kubernetes API list/watch test
//! double.

pub mod apiserver;
pub mod cluster;
pub mod deploy;
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

/// A running `lbctl trace ... -o json`: started with [`Trace::start`],
/// which returns once lbctl says tracing is on; [`Trace::events`] waits
/// (bounded) for it to end and parses its events.
pub struct Trace {
    child: std::process::Child,
}

impl Trace {
    /// `lbctl --bpffs PINS trace ARGS -o json`; `args` should bound it
    /// (`--count`, `--seconds`).
    pub fn start(pins: &std::path::Path, args: &[&str]) -> Trace {
        use std::io::BufRead;
        let mut child = std::process::Command::new(lbctl_binary())
            .arg("--bpffs")
            .arg(pins)
            .arg("trace")
            .args(args)
            .args(["-o", "json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start lbctl trace");
        // Wait (bounded) until tracing is on: lbctl says so on stderr.
        let stderr = child.stderr.take().expect("stderr");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("tracing") {
                    let _ = ready_tx.send(());
                }
            }
        });
        ready_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("lbctl trace never started");
        Trace { child }
    }

    /// Waits up to 20 s for lbctl to end, then its events, one JSON object
    /// per line.
    pub fn events(mut self) -> Vec<serde_json::Value> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "lbctl trace did not end"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert!(status.success(), "lbctl trace failed: {status}");
        let mut out = String::new();
        std::io::Read::read_to_string(&mut self.child.stdout.take().expect("stdout"), &mut out)
            .expect("read trace");
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        // A test that panicked before `events` must not leave lbctl behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
