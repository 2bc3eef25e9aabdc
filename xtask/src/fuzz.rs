//! `cargo xtask fuzz --seconds N`: every cargo-fuzz target under `fuzz/`
//! for N seconds each, with the pinned nightly (libFuzzer's coverage
//! instrumentation needs nightly flags). The crate is a workspace of its
//! own, so none of this touches the main build.
//!
//! A crash stops the run with the target's name and the artifact libFuzzer
//! wrote (`fuzz/artifacts/<target>/crash-*`); reproduce it with
//! `cargo +nightly-2026-05-19 fuzz run <target> <artifact>`, fix it, and
//! add the input as a unit test next to the code that crashed.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::setup::{BPF_TOOLCHAIN, cargo_bin_dir};
use crate::workspace_root;

/// The targets, and the directories of real inputs each starts from (read
/// only; libFuzzer writes what it finds to `fuzz/corpus/<target>/`).
pub const TARGETS: &[(&str, &[&str])] = &[
    ("manifest_model", &["examples/manifests", "deploy"]),
    ("packet_parse", &[]),
    ("packet_roundtrip", &[]),
];

/// Runs every target for `seconds` seconds.
pub fn fuzz(seconds: u64) -> Result<()> {
    let root = workspace_root();
    let fuzz_dir = root.join("fuzz");
    // One build for all targets; the runs below only link-check.
    run(
        fuzz_command(&fuzz_dir).args(["build", "-s", "none", "-a"]),
        "building the fuzz targets",
    )?;
    for (target, seeds) in TARGETS {
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        println!("fuzz: {target} for {seconds} s");
        let mut command = fuzz_command(&fuzz_dir);
        command
            .args(["run", "-s", "none", "-a", target])
            .arg(&corpus)
            .args(seeds.iter().map(|seed| root.join(seed)))
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                // Quiet: the final stats line is enough.
                "-print_final_stats=1",
            ]);
        if let Err(e) = run(&mut command, target) {
            let artifacts = fuzz_dir.join("artifacts").join(target);
            bail!(
                "{e:#}\nfuzz target {target} failed; inputs that crashed it are in {} \
                 (reproduce: cd fuzz && cargo +{BPF_TOOLCHAIN} fuzz run -s none -a {target} <file>)",
                artifacts.display()
            );
        }
    }
    Ok(())
}

/// `cargo fuzz` under the pinned nightly, from `fuzz/`.
fn fuzz_command(fuzz_dir: &Path) -> Command {
    let mut command = Command::new("rustup");
    command
        .args(["run", BPF_TOOLCHAIN, "cargo", "fuzz"])
        .current_dir(fuzz_dir)
        // The outer (stable) cargo's choice must not leak into the nightly one.
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR");
    if let Some(bin) = cargo_bin_dir() {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<_> = std::env::split_paths(&path).collect();
        if !dirs.contains(&bin) {
            dirs.push(bin);
        }
        if let Ok(joined) = std::env::join_paths(dirs) {
            command.env("PATH", joined);
        }
    }
    command
}

fn run(command: &mut Command, what: &str) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("{what}: starting cargo fuzz (is rustup installed?)"))?;
    if !status.success() {
        bail!("{what}: cargo fuzz exited with {status}");
    }
    Ok(())
}
