//! `cargo xtask setup`: everything building and testing needs, installed
//! only when missing. Silent when nothing is missing; one line per install.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::netns::{BPFFS_ROOT, bpffs_mounted, run_checked};

/// Debian packages: LLVM for bpf-linker, and the tools tests drive.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "bpftool",
    "iproute2",
    "iptables",
    "nftables",
    "conntrack",
    "ethtool",
    "tcpdump",
    "util-linux",
    "procps",
];

/// The nightly that builds lb-ebpf (`-Z build-std=core` needs `rust-src`).
pub const BPF_TOOLCHAIN: &str = "nightly-2026-05-19";
/// Where Debian puts LLVM 22; bpf-linker's build must not find LLVM 14.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Installs whatever is missing. Needs root.
pub fn setup() -> Result<()> {
    require_root()?;
    install_debian_packages()?;
    install_toolchain()?;
    install_bpf_linker()?;
    install_cargo_fuzz()?;
    mount_bpffs()?;
    Ok(())
}

/// Fails with an explanation unless running as root.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid(2) cannot fail and has no side effects.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "must run as root: setup installs Debian packages and mounts bpffs, and \
             test/demo create network namespaces and load BPF programs"
        );
    }
    Ok(())
}

fn missing_debian_packages() -> Result<Vec<&'static str>> {
    // One dpkg-query for all; unknown packages only print to stderr.
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\n"])
        .args(DEBIAN_PACKAGES)
        .output()
        .context("running dpkg-query (is this Debian?)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let installed: Vec<&str> = stdout
        .lines()
        .filter(|line| line.contains("install ok installed"))
        .filter_map(|line| line.split_whitespace().next())
        // Multi-arch packages print as `name:arch`.
        .map(|package| package.split(':').next().unwrap_or(package))
        .collect();
    Ok(DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|package| !installed.contains(package))
        .collect())
}

fn install_debian_packages() -> Result<()> {
    let missing = missing_debian_packages()?;
    if missing.is_empty() {
        return Ok(());
    }
    for package in &missing {
        println!("setup: installing Debian package {package}");
    }
    run_checked(Command::new("apt-get").arg("update")).context("apt-get update")?;
    run_checked(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )
    .context("apt-get install")?;
    Ok(())
}

/// `~/.cargo/bin` (or `$CARGO_HOME/bin`).
pub fn cargo_bin_dir() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .map(|home| home.join("bin"))
}

/// A program from PATH, else from `~/.cargo/bin`.
fn find_program(name: &str) -> Option<PathBuf> {
    let in_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(name));
    in_path
        .chain(cargo_bin_dir().map(|dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

fn install_toolchain() -> Result<()> {
    let rustup = find_program("rustup")
        .context("rustup not found in PATH or ~/.cargo/bin; install it from https://rustup.rs")?;
    let toolchains = run_checked(Command::new(&rustup).args(["toolchain", "list"]))?;
    let has_toolchain = String::from_utf8_lossy(&toolchains.stdout)
        .lines()
        .any(|line| line.starts_with(BPF_TOOLCHAIN));
    if !has_toolchain {
        println!("setup: installing Rust toolchain {BPF_TOOLCHAIN} with rust-src");
        run_checked(Command::new(&rustup).args([
            "toolchain",
            "install",
            BPF_TOOLCHAIN,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
        .with_context(|| format!("installing {BPF_TOOLCHAIN}"))?;
        return Ok(());
    }
    let components = run_checked(Command::new(&rustup).args([
        "component",
        "list",
        "--toolchain",
        BPF_TOOLCHAIN,
        "--installed",
    ]))?;
    let has_rust_src = String::from_utf8_lossy(&components.stdout)
        .lines()
        .any(|line| line.trim() == "rust-src");
    if !has_rust_src {
        println!("setup: installing rust-src for {BPF_TOOLCHAIN}");
        run_checked(Command::new(&rustup).args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            BPF_TOOLCHAIN,
        ]))
        .context("installing rust-src")?;
    }
    Ok(())
}

fn install_bpf_linker() -> Result<()> {
    let runs = find_program("bpf-linker").is_some_and(|linker| {
        Command::new(linker)
            .arg("--version")
            .output()
            .is_ok_and(|output| output.status.success())
    });
    if runs {
        return Ok(());
    }
    println!("setup: installing bpf-linker 0.13 (builds against LLVM 22, takes a few minutes)");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run_checked(
        Command::new(cargo)
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
            .args([
                "install",
                "bpf-linker",
                "--version",
                "^0.13",
                "--no-default-features",
                "--features",
                "llvm-22",
            ]),
    )
    .context("installing bpf-linker")?;
    Ok(())
}

/// cargo-fuzz (`cargo xtask fuzz`); built with the stable toolchain, it
/// drives the pinned nightly. 0.13.2 builds with Rust 1.95.
fn install_cargo_fuzz() -> Result<()> {
    let runs = find_program("cargo-fuzz").is_some_and(|fuzz| {
        Command::new(fuzz)
            .args(["fuzz", "--version"])
            .output()
            .is_ok_and(|output| output.status.success())
    });
    if runs {
        return Ok(());
    }
    println!("setup: installing cargo-fuzz 0.13.2");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run_checked(Command::new(cargo).args([
        "install",
        "cargo-fuzz",
        "--version",
        "0.13.2",
        "--locked",
    ]))
    .context("installing cargo-fuzz")?;
    Ok(())
}

fn mount_bpffs() -> Result<()> {
    if bpffs_mounted() {
        return Ok(());
    }
    println!("setup: mounting bpffs at {BPFFS_ROOT}");
    run_checked(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS_ROOT]))
        .context("mounting bpffs")?;
    Ok(())
}
