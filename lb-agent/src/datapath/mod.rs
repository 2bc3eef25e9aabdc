//! The only part of the agent that touches the kernel: loads the programs,
//! pins and adopts the maps under `--bpffs`, attaches to devices, and writes
//! the difference between desired and programmed tables.

mod devices;
mod maps;
mod programmer;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use lb_common::{backend, conntrack, service, slot, stats};

pub use devices::{glob_match, list_interfaces};
pub use maps::{KernelTables, StatsReader};
pub use programmer::{ApplyReport, Programmer, TableWriter};

/// The kernel programs, built by this crate's build script.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Name of the TC program in [`EBPF_OBJECT`].
pub const TC_PROGRAM: &str = "lb_tc_ingress";

/// Capacity of each map, in entries.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    pub services: u32,
    pub slots: u32,
    pub backends: u32,
    pub conntrack: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: service::MAX_ENTRIES,
            slots: slot::MAX_ENTRIES,
            backends: backend::MAX_ENTRIES,
            conntrack: conntrack::MAX_ENTRIES,
        }
    }
}

/// Every map the programs use, with its pinned name.
pub const MAP_NAMES: [&str; 5] = [
    service::NAME,
    slot::NAME,
    backend::NAME,
    conntrack::NAME,
    stats::NAME,
];

/// The loaded programs and their maps.
pub struct Datapath {
    ebpf: Ebpf,
    bpffs: PathBuf,
    /// Devices the TC program is attached to: name -> ifindex at attach time.
    attached: BTreeMap<String, u32>,
}

impl Datapath {
    /// Loads the programs. Maps already pinned under `bpffs` (a previous run
    /// of the agent) are adopted as they are, so conntrack and services
    /// survive a restart; missing ones are created and pinned.
    pub fn load(bpffs: &Path, sizes: MapSizes) -> anyhow::Result<Self> {
        std::fs::create_dir_all(bpffs)
            .with_context(|| format!("creating the pin directory {}", bpffs.display()))?;
        let pins: Vec<(&str, PathBuf)> = MAP_NAMES.iter().map(|n| (*n, bpffs.join(n))).collect();
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(service::NAME, sizes.services)
            .map_max_entries(slot::NAME, sizes.slots)
            .map_max_entries(backend::NAME, sizes.backends)
            .map_max_entries(conntrack::NAME, sizes.conntrack);
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT).with_context(|| {
            format!(
                "loading the kernel programs (maps pinned under {})",
                bpffs.display()
            )
        })?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(TC_PROGRAM)
            .ok_or_else(|| anyhow!("program {TC_PROGRAM} missing from the object"))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("verifying program {TC_PROGRAM}"))?;
        Ok(Self {
            ebpf,
            bpffs: bpffs.to_owned(),
            attached: BTreeMap::new(),
        })
    }

    /// The pin directory.
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// Takes typed handles on the service tables. Call once.
    pub fn take_tables(&mut self) -> anyhow::Result<KernelTables> {
        KernelTables::take(&mut self.ebpf)
    }

    /// The TC program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn tc_program(&mut self) -> anyhow::Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(TC_PROGRAM)
            .ok_or_else(|| anyhow!("program {TC_PROGRAM} missing"))?
            .try_into()?)
    }

    /// Where the TCX link of `ifname` is pinned. Pinned links keep the
    /// program attached while no agent runs (a crash or an upgrade).
    fn link_pin(&self, ifname: &str) -> PathBuf {
        self.bpffs.join(format!("link_tcx_ingress_{ifname}"))
    }

    /// Attaches the TC program to `ifname` ingress through TCX (kernel
    /// 6.6+), unless this agent already did for the same device. A link a
    /// previous agent pinned for the device is adopted: this program replaces
    /// the old one inside the link atomically (`BPF_LINK_UPDATE`), so no
    /// packet passes untranslated during a restart.
    pub fn attach(&mut self, ifname: &str, ifindex: u32) -> anyhow::Result<bool> {
        if self.attached.get(ifname) == Some(&ifindex) {
            return Ok(false);
        }
        let pin = self.link_pin(ifname);
        let program = self.tc_program()?;
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
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .with_context(|| format!("attaching {TC_PROGRAM} to {ifname} (TCX ingress)"))?,
        };
        let link: FdLink = program.take_link(id)?.try_into()?;
        link.pin(&pin)
            .with_context(|| format!("pinning the link of {ifname} at {}", pin.display()))?;
        self.attached.insert(ifname.to_owned(), ifindex);
        Ok(true)
    }

    /// Forgets devices that no longer exist (their links went with them),
    /// removing their link pins.
    pub fn forget_missing(&mut self, present: &BTreeMap<String, u32>) -> Vec<String> {
        let gone: Vec<String> = self
            .attached
            .iter()
            .filter(|(name, index)| present.get(*name) != Some(index))
            .map(|(name, _)| name.clone())
            .collect();
        for name in &gone {
            self.attached.remove(name);
            let _ = std::fs::remove_file(self.link_pin(name));
        }
        gone
    }

    /// Devices currently attached.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }
}
