//! The only part of the agent that touches the kernel: loads the programs,
//! pins and adopts the maps under `--bpffs`, attaches to devices, and writes
//! the difference between desired and programmed tables.

mod cleanup;
pub mod ct_sweep;
mod devices;
mod link_events;
mod maps;
mod programmer;
pub mod sockdiag;

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType,
        Xdp,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::{XdpLink, XdpMode},
    },
};
use lb_common::{
    affinity, backend, config, conntrack, maglev, member, service, slot, sock, source_range, stats,
};

pub use cleanup::{CleanupReport, cleanup};
pub use devices::{
    AcceptLocal, accept_local_sources, check_accept_local_at_start, glob_match,
    interface_addresses, list_interfaces,
};
pub use link_events::{LinkChange, LinkEvents};
pub use maps::{KernelTables, SockRevnatKey, StatsReader};
pub use programmer::{
    ApplyReport, BackendEntry, Programmer, RemovedUdpBackend, ServiceKey, SourceRangeEntry,
    TableWriter,
};

/// The kernel programs, built by this crate's build script.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// TC program for pod-facing devices (traffic from pods).
pub const TC_POD_PROGRAM: &str = "lb_tc_pod";
/// TC egress program for pod and node devices (replies of the node's own
/// stack: host-network backends).
pub const TC_EGRESS_PROGRAM: &str = "lb_tc_egress";
/// TC ingress program beside XDP on node devices: delivers the replies
/// XDP translated past the reverse-path check.
pub const TC_NODE_DELIVER_PROGRAM: &str = "lb_tc_node_deliver";
/// TC program for node devices where XDP does not attach.
pub const TC_NODE_PROGRAM: &str = "lb_tc_node";
/// XDP program for node devices (traffic from the network).
pub const XDP_NODE_PROGRAM: &str = "lb_xdp_node";

/// The socket-level balancing programs (cgroup hooks), by name: IPv4,
/// then IPv6.
pub const SOCK_PROGRAMS: [&str; 8] = [
    "lb_sock_connect4",
    "lb_sock_sendmsg4",
    "lb_sock_recvmsg4",
    "lb_sock_getpeername4",
    "lb_sock_connect6",
    "lb_sock_sendmsg6",
    "lb_sock_recvmsg6",
    "lb_sock_getpeername6",
];
/// Socket-level balancing's clean-up: a released socket's reverse entry
/// (either family).
pub const SOCK_RELEASE_PROGRAM: &str = "lb_sock_release";

/// Link pin name kinds: `link_<kind>_<device>`.
const PIN_TCX_INGRESS: &str = "tcx_ingress";
const PIN_TCX_EGRESS: &str = "tcx_egress";
const PIN_XDP: &str = "xdp";

/// cgroup2's statfs magic number.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// What a device is to the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRole {
    /// Pod-facing (`--pod-devices`): TC ingress, pod semantics.
    Pod,
    /// Node device (`--devices`): XDP, or TC where XDP will not attach.
    Node,
}

/// How a device ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    TcPod,
    TcNode,
    Xdp,
}

impl fmt::Display for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Attachment::TcPod => "TCX ingress and egress (pod)",
            Attachment::TcNode => "TCX ingress and egress (node, XDP unavailable)",
            Attachment::Xdp => "XDP, TCX ingress (delivery) and egress",
        })
    }
}

/// Capacity of each map, in entries.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    pub services: u32,
    pub slots: u32,
    pub backends: u32,
    pub conntrack: u32,
    /// Maglev table chunks (64 slots each).
    pub maglev_chunks: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: service::MAX_ENTRIES,
            slots: slot::MAX_ENTRIES,
            backends: backend::MAX_ENTRIES,
            conntrack: conntrack::MAX_ENTRIES,
            maglev_chunks: maglev::MAX_ENTRIES,
        }
    }
}

/// Every map the programs use, with its pinned name.
pub const MAP_NAMES: [&str; 23] = [
    service::NAME,
    slot::NAME,
    backend::NAME,
    conntrack::NAME,
    // IPv6: the maps keyed or valued by an address; slots and memberships
    // are shared with IPv4 (ids are one space).
    service::NAME6,
    backend::NAME6,
    conntrack::NAME6,
    config::NAME6,
    affinity::NAME6,
    source_range::NAME6,
    sock::NAME6,
    affinity::NAME,
    member::NAME,
    maglev::NAME,
    sock::NAME,
    source_range::NAME,
    config::NAME,
    lb_common::reject_limit::NAME,
    stats::NAME,
    // Inspection: names, per-service counters, flow trace (lbctl).
    lb_common::service_name::NAME,
    lb_common::service_stats::NAME,
    lb_common::trace::NAME,
    // Per-backend new flows and connection-attempt outcomes.
    lb_common::backend_stats::NAME,
];

/// The loaded programs and their maps.
pub struct Datapath {
    ebpf: Ebpf,
    bpffs: PathBuf,
    /// Devices the programs are attached to: name -> ifindex at attach time.
    attached: BTreeMap<String, (u32, Attachment)>,
}

impl Datapath {
    /// Loads the programs. Maps already pinned under `bpffs` (a previous run
    /// of the agent) are adopted as they are, so conntrack and services
    /// survive a restart; missing ones are created and pinned.
    pub fn load(bpffs: &Path, sizes: MapSizes) -> anyhow::Result<Self> {
        std::fs::create_dir_all(bpffs)
            .with_context(|| format!("creating the pin directory {}", bpffs.display()))?;
        restrict_mode(bpffs, 0o700)?;
        let pins: Vec<(&str, PathBuf)> = MAP_NAMES.iter().map(|n| (*n, bpffs.join(n))).collect();
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(service::NAME, sizes.services)
            .map_max_entries(slot::NAME, sizes.slots)
            .map_max_entries(backend::NAME, sizes.backends)
            .map_max_entries(conntrack::NAME, sizes.conntrack)
            .map_max_entries(service::NAME6, sizes.services)
            .map_max_entries(backend::NAME6, sizes.backends)
            .map_max_entries(conntrack::NAME6, sizes.conntrack)
            .map_max_entries(maglev::NAME, sizes.maglev_chunks)
            // One membership per backend of a service: as many as the slots
            // of one revision, so --max-slots bounds both.
            .map_max_entries(member::NAME, sizes.slots)
            // A counter entry per membership.
            .map_max_entries(lb_common::backend_stats::NAME, sizes.slots)
            // One name and one counter entry per frontend.
            .map_max_entries(lb_common::service_name::NAME, sizes.services)
            .map_max_entries(lb_common::service_stats::NAME, sizes.services);
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT).with_context(|| {
            format!(
                "loading the kernel programs (maps pinned under {})",
                bpffs.display()
            )
        })?;
        for (_, path) in &pins {
            restrict_mode(path, 0o600)?;
        }
        // Every program type has its own `load`; the steps are the same.
        macro_rules! load {
            ($kind:ty, $name:expr) => {{
                let name: &str = $name;
                let program: &mut $kind = ebpf
                    .program_mut(name)
                    .ok_or_else(|| anyhow!("program {name} missing from the object"))?
                    .try_into()?;
                program
                    .load()
                    .with_context(|| format!("verifying program {name}"))?;
            }};
        }
        for name in [
            TC_POD_PROGRAM,
            TC_EGRESS_PROGRAM,
            TC_NODE_PROGRAM,
            TC_NODE_DELIVER_PROGRAM,
        ] {
            load!(SchedClassifier, name);
        }
        for name in SOCK_PROGRAMS {
            load!(CgroupSockAddr, name);
        }
        load!(CgroupSock, SOCK_RELEASE_PROGRAM);
        load!(Xdp, XDP_NODE_PROGRAM);
        Ok(Self {
            ebpf,
            bpffs: bpffs.to_owned(),
            attached: BTreeMap::new(),
        })
    }

    /// Starts reading the programs' aya-log records (agent `--bpf-log`).
    /// Call once.
    pub fn bpf_logger(&mut self) -> anyhow::Result<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).context("starting aya-log for the programs")
    }

    /// Attaches socket-level balancing to the cgroup v2 directory `cgroup`
    /// (`--socket-lb-cgroup`): sockets of processes in it are translated at
    /// connect/sendmsg time. The links are pinned so the hooks stay while no
    /// agent runs; a new agent attaches its own first (several programs may
    /// run, a translated address is no service address any more, so nothing
    /// is translated twice) and then drops the old pins.
    pub fn attach_socket_lb(&mut self, cgroup: &Path) -> anyhow::Result<()> {
        let dir = open_cgroup2(cgroup)?;
        // Links always coexist with other programs on the cgroup; the
        // flags of the legacy attach modes must stay 0 for them. The two
        // program types share the steps but not a type.
        macro_rules! attach_pinned {
            ($kind:ty, $name:expr) => {{
                let name: &str = $name;
                let pin = self.bpffs.join(format!("link_cgroup_{name}"));
                let old = PinnedLink::from_pin(&pin).ok();
                let program: &mut $kind = self
                    .ebpf
                    .program_mut(name)
                    .ok_or_else(|| anyhow!("program {name} missing"))?
                    .try_into()?;
                let id = program
                    .attach(&dir, CgroupAttachMode::Single)
                    .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
                replace_pin(program.take_link(id)?.try_into()?, &pin, old, name)?;
            }};
        }
        for name in SOCK_PROGRAMS {
            attach_pinned!(CgroupSockAddr, name);
        }
        attach_pinned!(CgroupSock, SOCK_RELEASE_PROGRAM);
        Ok(())
    }

    /// The pin directory.
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// Takes typed handles on the service tables. Call once.
    pub fn take_tables(&mut self) -> anyhow::Result<KernelTables> {
        KernelTables::take(&mut self.ebpf)
    }

    /// A TC program by name, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn tc_program(&mut self, name: &str) -> anyhow::Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()?)
    }

    /// The XDP program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn xdp_program(&mut self) -> anyhow::Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(XDP_NODE_PROGRAM)
            .ok_or_else(|| anyhow!("program {XDP_NODE_PROGRAM} missing"))?
            .try_into()?)
    }

    /// Where the link of `ifname` is pinned. Pinned links keep the programs
    /// attached while no agent runs (a crash or an upgrade).
    fn link_pin(&self, ifname: &str, kind: &str) -> PathBuf {
        self.bpffs.join(format!("link_{kind}_{ifname}"))
    }

    /// The pins of every link an attachment makes on a device.
    fn link_pins(&self, ifname: &str, attachment: Attachment) -> Vec<PathBuf> {
        let kinds: &[&str] = match attachment {
            Attachment::TcPod => &[PIN_TCX_INGRESS, PIN_TCX_EGRESS],
            Attachment::TcNode => &[PIN_TCX_INGRESS, PIN_TCX_EGRESS],
            Attachment::Xdp => &[PIN_XDP, PIN_TCX_INGRESS, PIN_TCX_EGRESS],
        };
        kinds
            .iter()
            .map(|kind| self.link_pin(ifname, kind))
            .collect()
    }

    /// Attaches to `ifname` as its role asks, unless this agent already did
    /// for the same device: TCX ingress on pod devices; XDP on node devices,
    /// TCX ingress where XDP will not attach. A link a previous agent pinned
    /// for the device is adopted: this program replaces the old one inside
    /// the link atomically (`BPF_LINK_UPDATE`), so no packet passes
    /// untranslated during a restart. Returns `None` when nothing changed.
    pub fn attach(
        &mut self,
        ifname: &str,
        ifindex: u32,
        role: DeviceRole,
    ) -> anyhow::Result<Option<Attachment>> {
        if self
            .attached
            .get(ifname)
            .is_some_and(|(index, _)| *index == ifindex)
        {
            return Ok(None);
        }
        let attachment = match role {
            DeviceRole::Pod => {
                // Egress first: a reply of the node's own stack must never
                // find ingress translating its flow and egress missing.
                self.attach_tc(ifname, TC_EGRESS_PROGRAM, TcAttachType::Egress)?;
                self.attach_tc(ifname, TC_POD_PROGRAM, TcAttachType::Ingress)?;
                Attachment::TcPod
            }
            DeviceRole::Node => {
                // Replies of host-network backends to other nodes and the
                // network leave here.
                self.attach_tc(ifname, TC_EGRESS_PROGRAM, TcAttachType::Egress)?;
                match self.attach_xdp(ifname, ifindex) {
                    Ok(attachment) => {
                        // Delivers the replies XDP translated and marked.
                        self.attach_tc(ifname, TC_NODE_DELIVER_PROGRAM, TcAttachType::Ingress)?;
                        attachment
                    }
                    Err(e) => {
                        log::warn!("{e:#}; using TC on {ifname} instead");
                        self.attach_tc(ifname, TC_NODE_PROGRAM, TcAttachType::Ingress)?;
                        Attachment::TcNode
                    }
                }
            }
        };
        self.attached
            .insert(ifname.to_owned(), (ifindex, attachment));
        Ok(Some(attachment))
    }

    fn attach_tc(
        &mut self,
        ifname: &str,
        program_name: &str,
        direction: TcAttachType,
    ) -> anyhow::Result<()> {
        let (kind, direction_name) = match direction {
            TcAttachType::Egress => (PIN_TCX_EGRESS, "egress"),
            _ => (PIN_TCX_INGRESS, "ingress"),
        };
        let pin = self.link_pin(ifname, kind);
        let program = self.tc_program(program_name)?;
        let mut adopted = None;
        if let Ok(pinned) = PinnedLink::from_pin(&pin) {
            // The fd keeps the link alive between unpin and the new pin.
            let fd_link = pinned
                .unpin()
                .with_context(|| format!("unpinning {}", pin.display()))?;
            match SchedClassifierLink::try_from(fd_link)
                .map_err(anyhow::Error::from)
                .and_then(|link| Ok(program.attach_to_link(link)?))
            {
                Ok(id) => adopted = Some(id),
                // The device the link was made for is gone (a defunct
                // link): attach afresh below.
                Err(e) => log::debug!("pinned link for {ifname} not reusable: {e:#}"),
            }
        }
        let id = match adopted {
            Some(id) => id,
            None => program
                .attach_with_options(
                    ifname,
                    direction,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .with_context(|| {
                    format!("attaching {program_name} to {ifname} (TCX {direction_name})")
                })?,
        };
        let link: FdLink = program.take_link(id)?.try_into()?;
        link.pin(&pin)
            .with_context(|| format!("pinning the link of {ifname} at {}", pin.display()))?;
        Ok(())
    }

    fn attach_xdp(&mut self, ifname: &str, ifindex: u32) -> anyhow::Result<Attachment> {
        let pin = self.link_pin(ifname, PIN_XDP);
        let program = self.xdp_program()?;
        let mut adopted = None;
        if let Ok(pinned) = PinnedLink::from_pin(&pin) {
            let fd_link = pinned
                .unpin()
                .with_context(|| format!("unpinning {}", pin.display()))?;
            match XdpLink::try_from(fd_link)
                .map_err(anyhow::Error::from)
                .and_then(|link| Ok(program.attach_to_link(link)?))
            {
                Ok(id) => adopted = Some(id),
                Err(e) => log::debug!("pinned XDP link for {ifname} not reusable: {e:#}"),
            }
        }
        let id = match adopted {
            Some(id) => id,
            None => program
                .attach_to_if_index(ifindex, XdpMode::Default)
                .with_context(|| format!("attaching {XDP_NODE_PROGRAM} to {ifname} (XDP)"))?,
        };
        let link: FdLink = program.take_link(id)?.try_into()?;
        link.pin(&pin)
            .with_context(|| format!("pinning the XDP link of {ifname} at {}", pin.display()))?;
        Ok(Attachment::Xdp)
    }

    /// Forgets devices that no longer exist (their links went with them),
    /// removing their link pins.
    pub fn forget_missing(&mut self, present: &BTreeMap<String, u32>) -> Vec<String> {
        let gone: Vec<(String, Attachment)> = self
            .attached
            .iter()
            .filter(|(name, (index, _))| present.get(*name) != Some(index))
            .map(|(name, (_, attachment))| (name.clone(), *attachment))
            .collect();
        for (name, attachment) in &gone {
            self.attached.remove(name);
            for pin in self.link_pins(name, *attachment) {
                let _ = std::fs::remove_file(pin);
            }
        }
        gone.into_iter().map(|(name, _)| name).collect()
    }

    /// Whether `ifname` (at `ifindex`) is attached already.
    pub fn is_attached(&self, ifname: &str, ifindex: u32) -> bool {
        self.attached
            .get(ifname)
            .is_some_and(|(index, _)| *index == ifindex)
    }

    /// Devices currently attached.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }
}

/// Opens `cgroup` (`--socket-lb-cgroup`), refusing anything but a cgroup v2
/// directory. Also called at start, long before the attach, so a wrong
/// path stops the agent at once.
pub fn open_cgroup2(cgroup: &Path) -> anyhow::Result<std::fs::File> {
    let dir = std::fs::File::open(cgroup)
        .with_context(|| format!("--socket-lb-cgroup {}: cannot open", cgroup.display()))?;
    // SAFETY: statfs on a path we just opened; the struct is plain data.
    let is_cgroup2 = unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        let path = std::ffi::CString::new(cgroup.as_os_str().as_encoded_bytes())
            .map_err(|_| anyhow!("--socket-lb-cgroup {}: NUL in path", cgroup.display()))?;
        libc::statfs(path.as_ptr(), &mut fs) == 0 && fs.f_type as i64 == CGROUP2_SUPER_MAGIC
    };
    if !is_cgroup2 {
        anyhow::bail!(
            "--socket-lb-cgroup {}: not a cgroup v2 directory",
            cgroup.display()
        );
    }
    Ok(dir)
}

/// Only root reads or writes the pins: the directory 0700, each map 0600
/// (bpffs honours the mode on open of a pinned object).
fn restrict_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// Pins a freshly attached cgroup link at `pin`, detaching the link a
/// previous agent pinned there (dropping its pin and our fd to it).
fn replace_pin(
    link: FdLink,
    pin: &Path,
    old: Option<PinnedLink>,
    name: &str,
) -> anyhow::Result<()> {
    if let Some(old) = old {
        let _ = old.unpin();
    }
    link.pin(pin)
        .with_context(|| format!("pinning the {name} link at {}", pin.display()))?;
    Ok(())
}
