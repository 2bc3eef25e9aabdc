//! The in-kernel datapath fixture: the real programs loaded with small
//! maps, programmed by the real agent code (`Programmer`), run on crafted
//! packets through BPF_PROG_TEST_RUN (kernel 4.12+ for skb programs, 4.15+
//! for XDP). The kernel does not reset the packet between repeats, so each
//! case runs once per packet.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun, TestRunOptions};
use lb_agent::{
    datapath::{
        Datapath, KernelTables, MapSizes, Programmer, TC_EGRESS_PROGRAM, TC_NODE_PROGRAM,
        TC_POD_PROGRAM,
    },
    model::{Backend, DesiredTables, FrontendKind, FrontendSpec, ServiceRef},
};
use lb_common::{config::LbConfig, stats::Reason};
use xtask::BpffsDir;

use crate::{packet::Packet, packet6::Packet6, require_root};

/// TC verdicts.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
/// XDP verdicts.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// Which program a packet is run through.
#[derive(Clone, Copy, Debug)]
pub enum Hook {
    /// `lb_tc_pod`: a pod-facing device.
    TcPod,
    /// `lb_tc_node`: a node device without XDP.
    TcNode,
    /// `lb_xdp_node`: a node device.
    Xdp,
    /// `lb_tc_egress`: leaving a pod or node device.
    TcEgress,
}

impl Hook {
    /// The verdict that passes a packet on.
    pub fn pass(self) -> u32 {
        match self {
            Hook::TcPod | Hook::TcNode | Hook::TcEgress => TC_ACT_OK,
            Hook::Xdp => XDP_PASS,
        }
    }

    /// The verdict that drops it.
    pub fn drop(self) -> u32 {
        match self {
            Hook::TcPod | Hook::TcNode | Hook::TcEgress => TC_ACT_SHOT,
            Hook::Xdp => XDP_DROP,
        }
    }
}

pub struct Fixture {
    pub datapath: Datapath,
    pub tables: KernelTables,
    pub programmer: Programmer,
    _pins: BpffsDir,
}

impl Fixture {
    /// Loads the programs with small maps and programs `desired`.
    pub fn new(test: &str, desired: &DesiredTables) -> Self {
        Self::with_algorithm(test, desired, None)
    }

    /// Loads the programs as an agent with `--lb-algorithm maglev
    /// --maglev-table-size M` would, and programs `desired`.
    pub fn with_maglev(test: &str, desired: &DesiredTables, table_size: u32) -> Self {
        Self::with_algorithm(test, desired, Some(table_size))
    }

    fn with_algorithm(test: &str, desired: &DesiredTables, maglev: Option<u32>) -> Self {
        require_root(test);
        let pins = BpffsDir::new().expect("bpffs directory");
        let sizes = MapSizes {
            services: 64,
            slots: 256,
            backends: 64,
            // Room for both directions of every SNAT port of one backend
            // (datapath_north_south fills the range), LRU slack included.
            conntrack: 16_384,
            maglev_chunks: 8192,
        };
        let mut datapath = Datapath::load(pins.path(), sizes).expect("load datapath");
        let mut tables = datapath.take_tables().expect("tables");
        let config = LbConfig {
            maglev_table_size: maglev.unwrap_or(0),
            ..LbConfig::default()
        };
        tables.set_config(&config).expect("write config");
        let mut fixture = Self {
            datapath,
            tables,
            programmer: Programmer::default().with_maglev(maglev),
            _pins: pins,
        };
        fixture.apply(desired);
        fixture
    }

    /// Programs `desired` (a diff against what is programmed).
    pub fn apply(&mut self, desired: &DesiredTables) {
        let report = self.programmer.apply(desired, &mut self.tables);
        assert!(
            report.errors.is_empty(),
            "programming failed: {:?}",
            report.errors
        );
    }

    /// Sets the node IPv6 address IPv6 SNAT uses.
    pub fn set_node_address6(&mut self, addr: Ipv6Addr) {
        let config = lb_common::config::Lb6Config {
            node_addr6: addr.octets(),
        };
        self.tables.set_config6(&config).expect("write config6");
    }

    /// Sets the node address SNAT uses.
    pub fn set_node_address(&mut self, addr: Ipv4Addr) {
        let config = LbConfig {
            node_addr4: addr.octets(),
            ..self.tables.config().expect("read config")
        };
        self.tables.set_config(&config).expect("write config");
    }

    /// Runs `hook`'s program once on `frame`: (verdict, output frame).
    pub fn run(&mut self, hook: Hook, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let result = match hook {
            Hook::TcPod => self
                .datapath
                .tc_program(TC_POD_PROGRAM)
                .expect("program")
                .test_run(opts),
            Hook::TcNode => self
                .datapath
                .tc_program(TC_NODE_PROGRAM)
                .expect("program")
                .test_run(opts),
            Hook::TcEgress => self
                .datapath
                .tc_program(TC_EGRESS_PROGRAM)
                .expect("program")
                .test_run(opts),
            Hook::Xdp => self.datapath.xdp_program().expect("program").test_run(opts),
        }
        .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// Runs `packet` and expects it passed on; returns the output, whose
    /// checksums [`Packet::parse`] verified.
    pub fn pass(&mut self, hook: Hook, packet: &Packet) -> Packet {
        let (verdict, out) = self.run(hook, &packet.emit());
        assert_eq!(
            verdict,
            hook.pass(),
            "{hook:?}: packet {packet:?} was not passed"
        );
        Packet::parse(&out)
            .unwrap_or_else(|e| panic!("{hook:?}: output of {packet:?} is broken: {e}"))
    }

    /// Runs `packet` and expects it dropped.
    pub fn dropped(&mut self, hook: Hook, packet: &Packet) {
        self.dropped_frame(hook, &packet.emit(), &format!("{packet:?}"));
    }

    /// [`Self::pass`] for an IPv6 packet: the output's L4 checksum was
    /// verified by [`Packet6::parse`].
    pub fn pass6(&mut self, hook: Hook, packet: &Packet6) -> Packet6 {
        let (verdict, out) = self.run(hook, &packet.emit());
        assert_eq!(
            verdict,
            hook.pass(),
            "{hook:?}: packet {packet:?} was not passed"
        );
        Packet6::parse(&out)
            .unwrap_or_else(|e| panic!("{hook:?}: output of {packet:?} is broken: {e}"))
    }

    /// Runs an IPv6 packet and expects it dropped.
    pub fn dropped6(&mut self, hook: Hook, packet: &Packet6) {
        self.dropped_frame(hook, &packet.emit(), &format!("{packet:?}"));
    }

    fn dropped_frame(&mut self, hook: Hook, frame: &[u8], what: &str) {
        let (verdict, _) = self.run(hook, frame);
        assert_eq!(
            verdict,
            hook.drop(),
            "{hook:?}: packet {what} was not dropped"
        );
    }

    /// The pin directory of the fixture's maps (for `lbctl --bpffs`).
    pub fn pins(&self) -> &std::path::Path {
        self._pins.path()
    }

    /// Packets counted under `reason` so far.
    pub fn count(&self, reason: Reason) -> u64 {
        self.tables.stats.get(reason).expect("stats").packets
    }
}

/// A frontend spec of `default/<name>` with the given backends; `local`
/// marks which backends run on this node.
pub fn spec(
    name: &str,
    port_name: &str,
    kind: FrontendKind,
    backends: &[(Ipv4Addr, u16, bool)],
) -> FrontendSpec {
    let backends: Vec<_> = backends
        .iter()
        .map(|(a, p, l)| (IpAddr::V4(*a), *p, *l))
        .collect();
    spec_of(name, port_name, kind, &backends)
}

/// [`spec`] with IPv6 backends.
pub fn spec6(
    name: &str,
    port_name: &str,
    kind: FrontendKind,
    backends: &[(Ipv6Addr, u16, bool)],
) -> FrontendSpec {
    let backends: Vec<_> = backends
        .iter()
        .map(|(a, p, l)| (IpAddr::V6(*a), *p, *l))
        .collect();
    spec_of(name, port_name, kind, &backends)
}

fn spec_of(
    name: &str,
    port_name: &str,
    kind: FrontendKind,
    backends: &[(IpAddr, u16, bool)],
) -> FrontendSpec {
    FrontendSpec {
        service: ServiceRef {
            namespace: "default".into(),
            name: name.into(),
        },
        port_name: port_name.into(),
        kind,
        backends: backends
            .iter()
            .map(|(addr, port, local)| Backend {
                addr: *addr,
                port: *port,
                node_local: *local,
                terminating: false,
                pod: None,
            })
            .collect(),
        affinity_timeout: None,
        local_only: false,
        source_ranges: Vec::new(),
    }
}
