//! A temporary directory removed on drop (std has none; one struct is not
//! worth a dependency).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::netns::unique_name;

/// `$TMPDIR/<prefix>-<pid>-<counter>-<role>`, removed recursively on drop.
/// The name follows the namespace scheme, so `cargo xtask clean` finds
/// leftovers of crashed runs.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str, role: &str) -> Result<TempDir> {
        let path = std::env::temp_dir().join(unique_name(prefix, role));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
