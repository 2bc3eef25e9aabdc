//! `lb-agent --cleanup`: removes what the agent installed on the node, like
//! `kube-proxy --cleanup`. Everything it installs is pinned under its
//! `--bpffs` directory (the device and cgroup links, the maps), so that
//! directory is the whole inventory: links are detached (`BPF_LINK_DETACH`,
//! which takes the programs off their device or cgroup even if some
//! process still holds the link open), then every pin is unlinked, then the
//! directory removed. Only names the agent creates are touched: a
//! `--bpffs` shared with other software keeps their pins.

use std::{
    ffi::CString,
    fmt,
    os::{fd::FromRawFd as _, fd::OwnedFd, unix::ffi::OsStrExt as _},
    path::Path,
};

use anyhow::Context as _;

/// What a clean-up removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Links detached (device and cgroup attachments), by pin name.
    pub links: Vec<String>,
    /// Other pins removed (maps).
    pub pins: Vec<String>,
    /// Whether the pin directory itself was removed.
    pub directory_removed: bool,
}

impl fmt::Display for CleanupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.links.is_empty() && self.pins.is_empty() && !self.directory_removed {
            return f.write_str("nothing to remove");
        }
        write!(
            f,
            "detached {} links ({}), removed {} pinned maps{}",
            self.links.len(),
            self.links.join(", "),
            self.pins.len(),
            if self.directory_removed {
                " and the pin directory"
            } else {
                ""
            }
        )
    }
}

/// Whether `name` is a pin the agent creates: a link (`link_xdp_eth0`,
/// `link_tcx_ingress_lxc1`, `link_cgroup_lb_sock_connect4`) or a map
/// (`LB4_SERVICES_V1`, any layout version).
fn ours(name: &str) -> Option<bool> {
    if name.starts_with("link_") {
        return Some(true);
    }
    let versioned = name
        .rsplit_once("_V")
        .is_some_and(|(_, v)| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()));
    (name.starts_with("LB") && versioned).then_some(false)
}

// From <linux/bpf.h>.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `bpf(cmd, attr)` with a zeroed attribute union of the kernel's size
/// whose first bytes are `head`.
fn bpf(cmd: libc::c_long, head: &[u8]) -> std::io::Result<libc::c_long> {
    let mut attr = [0u8; 128];
    attr[..head.len()].copy_from_slice(head);
    // SAFETY: attr is a valid, zero-padded bpf_attr for `cmd`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Detaches the link pinned at `path`.
fn detach_link(path: &Path) -> std::io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // bpf_attr for BPF_OBJ_GET: pathname (u64 pointer), bpf_fd, file_flags.
    let mut head = [0u8; 16];
    head[..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(BPF_OBJ_GET, &head)?;
    // SAFETY: the kernel just gave us this descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // bpf_attr for BPF_LINK_DETACH: link_fd.
    let link_fd = std::os::fd::AsRawFd::as_raw_fd(&fd) as u32;
    match bpf(BPF_LINK_DETACH, &link_fd.to_ne_bytes()) {
        Ok(_) => Ok(()),
        // Already detached (its device is gone): nothing to take off.
        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes what the agent installed under `bpffs`; see the module docs.
/// A missing directory is nothing to do, so running it twice is harmless.
pub fn cleanup(bpffs: &Path) -> anyhow::Result<CleanupReport> {
    let mut report = CleanupReport::default();
    let entries = match std::fs::read_dir(bpffs) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(report),
        Err(e) => {
            return Err(e).with_context(|| format!("--bpffs {}: cannot list", bpffs.display()));
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    // Links first: programs come off devices and cgroups before the maps
    // they use lose their pins.
    for want_links in [true, false] {
        for name in &names {
            if ours(name) != Some(want_links) {
                continue;
            }
            let path = bpffs.join(name);
            if want_links {
                detach_link(&path)
                    .with_context(|| format!("detaching the link pinned at {}", path.display()))?;
            }
            std::fs::remove_file(&path)
                .with_context(|| format!("removing the pin {}", path.display()))?;
            if want_links {
                report.links.push(name.clone());
            } else {
                report.pins.push(name.clone());
            }
        }
    }
    match std::fs::remove_dir(bpffs) {
        Ok(()) => report.directory_removed = true,
        Err(e) => log::warn!(
            "--bpffs {}: kept ({e}): it holds pins that are not the agent's",
            bpffs.display()
        ),
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_agents_names_are_ours() {
        assert_eq!(ours("link_xdp_eth0"), Some(true));
        assert_eq!(ours("link_tcx_ingress_lxc12"), Some(true));
        assert_eq!(ours("link_cgroup_lb_sock_connect4"), Some(true));
        assert_eq!(ours("LB4_SERVICES_V1"), Some(false));
        assert_eq!(ours("LB4_CT_V3"), Some(false));
        assert_eq!(ours("LB_STATS_V12"), Some(false));
        assert_eq!(ours("cilium_lb4_services_v2"), None);
        assert_eq!(ours("LB4_SERVICES"), None);
        assert_eq!(ours("tc"), None);
    }

    #[test]
    fn a_missing_directory_is_nothing_to_do() {
        let report = cleanup(Path::new("/nonexistent/lb-agent-cleanup")).expect("no error");
        assert_eq!(report, CleanupReport::default());
        assert_eq!(report.to_string(), "nothing to remove");
    }
}
