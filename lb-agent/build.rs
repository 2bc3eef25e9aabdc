//! Builds the kernel programs (`lb-ebpf`) for the BPF target with the pinned
//! nightly toolchain; the object is embedded by `datapath::EBPF_OBJECT`.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// The nightly that builds `core` for the BPF target; `cargo xtask setup`
/// installs the same one.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-19";

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .iter()
        .find(|p| p.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("package lb-ebpf not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("lb-ebpf manifest has no parent directory"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}
