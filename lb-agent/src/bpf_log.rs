//! `--bpf-log`: the programs' aya-log records (one debug line per new flow
//! and per drop), forwarded to the agent's logger under the target
//! `lb_ebpf`. Off by default and free when off: the programs log only while
//! `FLAG_LOG` is set in `LB_CONFIG_V2`, which the agent sets at start with
//! the flag and clears when it stops.

use std::os::fd::AsRawFd;

use anyhow::Context as _;
use lb_common::config::FLAG_LOG;
use tokio::io::unix::AsyncFd;

use crate::datapath::{Datapath, KernelTables};

/// The log target of the records (the eBPF crate's module path).
pub const TARGET: &str = "lb_ebpf";

/// Sets or clears `FLAG_LOG` in the pinned config, keeping every other bit
/// (`lbctl trace` owns `FLAG_TRACE`) and the node address.
pub fn set_flag(tables: &mut KernelTables, on: bool) -> anyhow::Result<()> {
    let mut config = tables.config().unwrap_or_default();
    if on {
        config.flags |= FLAG_LOG;
    } else {
        config.flags &= !FLAG_LOG;
    }
    tables
        .set_config(&config)
        .with_context(|| format!("writing the log flag into {}", lb_common::config::NAME))
}

/// Starts forwarding the programs' log records to the `log` crate; the
/// task runs until the agent stops.
pub fn spawn(datapath: &mut Datapath) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let logger = datapath.bpf_logger()?;
    // SAFETY: the fd is the logger's ring buffer, owned by the value the
    // AsyncFd owns, open and unchanged until it is dropped.
    let mut ready =
        unsafe { AsyncFd::register_with_interest(Readable(logger), tokio::io::Interest::READABLE) }
            .map_err(|e| {
                anyhow::anyhow!("watching the aya-log ring buffer: {}", e.into_parts().1)
            })?;
    Ok(tokio::spawn(async move {
        loop {
            let mut guard = match ready.readable_mut().await {
                Ok(guard) => guard,
                Err(e) => {
                    log::warn!("--bpf-log: waiting for records: {e}");
                    return;
                }
            };
            guard.get_inner_mut().0.flush();
            guard.clear_ready();
        }
    }))
}

/// The logger, watchable by `AsyncFd` (through its ring buffer's fd).
struct Readable(aya_log::EbpfLogger<&'static dyn log::Log>);

impl AsRawFd for Readable {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}
