//! `lb-bench`: the parts of `cargo xtask bench` that need the agent's
//! library (xtask itself must build before the BPF toolchain exists).
//!
//! - `packet`: per-packet cost of the real programs through
//!   BPF_PROG_TEST_RUN, next to a trivial XDP/TC program (the floor), at
//!   several service counts, each service dual-stack so that every IPv4
//!   case has an IPv6 twin (`6` suffix) measured in the same repetition;
//! - `program`: time to install N services x 10 endpoints through the real
//!   `Programmer` into real maps, one endpoint change, and the delay from a
//!   change being written to the first packet that picks the new backend;
//! - `maglev`: time to build a Maglev lookup table (`maglev::build_table`,
//!   pure user-space code) for N backends at table size M.
//!
//! Results are printed one per line as `RESULT metric=.. variant=.. size=..
//! rep=.. value=..`; xtask parses them. Each case's verdict and output are
//! checked once (and the per-reason counters after every repeated run), so
//! a figure always belongs to the path it is named after. Nothing here
//! asserts a timing.
//!
//! Usage: `lb-bench packet|program|maglev key=value...` (see [`Options`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::programs::{TestRun, TestRunOptions};
use lb_agent::{
    datapath::{Datapath, KernelTables, MapSizes, Programmer, TC_EGRESS_PROGRAM, TC_POD_PROGRAM},
    maglev::{BackendIdentity, build_table},
    model::{Backend, DesiredTables, Frontend, FrontendKind, FrontendSpec, Protocol, ServiceRef},
};
use lb_common::{
    config::{Lb6Config, LbConfig},
    stats::Reason,
};
use lb_tests::{
    packet::{ACK, Packet, SYN, arp_request},
    packet6::Packet6,
};
use xtask::BpffsDir;

/// Name prefix of the bench's bpffs directories (removed by `cargo xtask clean`).
const PREFIX: &str = "lbd";
const ENDPOINTS_PER_SERVICE: u32 = 10;
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
/// The node address SNAT uses on the XDP path.
const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
const POD_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const EXTERNAL_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
/// A service whose only backend is its own address and port (marked local,
/// so no SNAT): the established-flow packet is rewritten to itself, so the
/// kernel's repeats (which do not reset the packet) all take the same
/// conntrack-hit path, rewrite included.
const MIRROR_VIP: Ipv4Addr = Ipv4Addr::new(10, 111, 255, 1);
/// No service listens here.
const NOT_A_SERVICE: Ipv4Addr = Ipv4Addr::new(10, 111, 255, 2);

/// The IPv6 twins of the addresses above: every generated service is
/// dual-stack (a frontend per family, the same number of endpoints), and
/// the mirror service has an IPv6 frontend whose only backend is itself.
const NODE_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11);
const POD_CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 2);
const EXTERNAL_CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
const MIRROR_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x111, 0xffff, 0, 0, 0, 0, 1);
const NOT_A_SERVICE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x111, 0xffff, 0, 0, 0, 0, 2);

/// The address family of a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// The suffix of the case names (`xdp_established6`).
    fn suffix(self) -> &'static str {
        match self {
            Family::V4 => "",
            Family::V6 => "6",
        }
    }
}

/// Service `i` (0-based) of a generated set: 10.96.0.0/12 from .0.1 on.
fn service_vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i)
}

/// Endpoint `j` of service `i`: 10.128.0.0/9, never routed (only the
/// datapath's choice is looked at).
fn endpoint_addr(i: u32, j: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * ENDPOINTS_PER_SERVICE + j)
}

/// The IPv6 frontend of service `i`: fd00:96::/108 from ::1 on.
fn service_vip6(i: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 1)) + u128::from(i))
}

/// Endpoint `j` of service `i`, IPv6: fd00:128::/64, never routed.
fn endpoint_addr6(i: u32, j: u32) -> Ipv6Addr {
    Ipv6Addr::from(
        u128::from(Ipv6Addr::new(0xfd00, 0x128, 0, 0, 0, 0, 0, 0))
            + u128::from(i * ENDPOINTS_PER_SERVICE + j),
    )
}

/// Service `i`'s frontend address of `family`.
fn service_ip(family: Family, i: u32) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(service_vip(i)),
        Family::V6 => IpAddr::V6(service_vip6(i)),
    }
}

/// Endpoint `j` of service `i` of `family`.
fn endpoint_ip(family: Family, i: u32, j: u32) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(endpoint_addr(i, j)),
        Family::V6 => IpAddr::V6(endpoint_addr6(i, j)),
    }
}

fn backend(addr: impl Into<IpAddr>, port: u16, local: bool) -> Backend {
    Backend {
        addr: addr.into(),
        port,
        node_local: local,
        terminating: false,
        pod: None,
    }
}

fn frontend_spec(name: &str, backends: Vec<Backend>) -> FrontendSpec {
    FrontendSpec {
        service: ServiceRef {
            namespace: "bench".into(),
            name: name.into(),
        },
        port_name: "http".into(),
        kind: FrontendKind::ClusterIp,
        backends,
        affinity_timeout: None,
        local_only: false,
        source_ranges: Vec::new(),
    }
}

/// `services` ClusterIP services with 10 endpoints each, plus the mirror
/// service: IPv4 only, or dual-stack (`families` both).
fn desired(services: u32, families: &[Family]) -> DesiredTables {
    let mut tables = DesiredTables::default();
    for &family in families {
        for i in 0..services {
            let backends = (0..ENDPOINTS_PER_SERVICE)
                .map(|j| backend(endpoint_ip(family, i, j), TARGET_PORT, false))
                .collect();
            tables.frontends.insert(
                Frontend::new(service_ip(family, i), SERVICE_PORT, Protocol::Tcp),
                frontend_spec(&format!("svc-{i}"), backends),
            );
        }
        let mirror = mirror_ip(family);
        tables.frontends.insert(
            Frontend::new(mirror, SERVICE_PORT, Protocol::Tcp),
            frontend_spec("mirror", vec![backend(mirror, SERVICE_PORT, true)]),
        );
    }
    tables
}

fn mirror_ip(family: Family) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(MIRROR_VIP),
        Family::V6 => IpAddr::V6(MIRROR_VIP6),
    }
}

fn not_a_service(family: Family) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(NOT_A_SERVICE),
        Family::V6 => IpAddr::V6(NOT_A_SERVICE6),
    }
}

fn sizes_for(services: u32, maglev: Option<u32>) -> MapSizes {
    let backends = services * ENDPOINTS_PER_SERVICE + 1024;
    MapSizes {
        // A table per frontend (and the mirror's).
        maglev_chunks: maglev.map_or(MapSizes::default().maglev_chunks, |m| {
            (services + 16) * lb_common::maglev::chunk_count(m)
        }),
        // A frontend and a ClusterIP address marker per service.
        services: 2 * services + 1024,
        // Room for a second revision of every set during updates.
        slots: 2 * backends,
        backends,
        conntrack: 1 << 20,
    }
}

/// Loaded programs with their maps, pinned in a directory of their own.
struct Loaded {
    datapath: Datapath,
    tables: KernelTables,
    programmer: Programmer,
    /// The families of the programmed services and mirror flows.
    families: Vec<Family>,
    _pins: BpffsDir,
}

impl Loaded {
    fn new(services: u32) -> Result<Loaded> {
        Self::with_maglev(services, None)
    }

    /// Loaded as an agent with `--lb-algorithm maglev --maglev-table-size
    /// M` would be (`None`: random selection).
    fn with_maglev(services: u32, maglev: Option<u32>) -> Result<Loaded> {
        let pins = BpffsDir::with_prefix(PREFIX)?;
        let mut datapath = Datapath::load(pins.path(), sizes_for(services, maglev))?;
        let mut tables = datapath.take_tables()?;
        tables.set_config(&LbConfig {
            node_addr4: NODE_ADDR.octets(),
            maglev_table_size: maglev.unwrap_or(0),
            ..LbConfig::default()
        })?;
        tables.set_config6(&Lb6Config {
            node_addr6: NODE_ADDR6.octets(),
        })?;
        Ok(Loaded {
            datapath,
            tables,
            programmer: Programmer::default().with_maglev(maglev),
            families: vec![Family::V4],
            _pins: pins,
        })
    }

    /// `services` of each of `families` programmed, the mirror flow of each
    /// family established once per hook (a new flow), and a single
    /// established run checked to rewrite the packet to itself.
    fn mirrored(services: u32, maglev: Option<u32>, families: &[Family]) -> Result<Loaded> {
        let mut one = Self::with_maglev(services, maglev)?;
        one.families = families.to_vec();
        one.apply(&desired(services, families))?;
        one.establish_mirrors()?;
        for &family in families {
            for hook in [Hook::Xdp, Hook::Tc] {
                let ack = established_packet(hook, family, ACK);
                let (_, out, _) = one.run(hook, &ack, 1)?;
                ensure!(
                    out == ack,
                    "{}{}: the mirror service does not rewrite the packet to itself",
                    hook.name(),
                    family.suffix()
                );
            }
        }
        Ok(one)
    }

    /// Programs `desired`; returns the time `Programmer::apply` took.
    fn apply(&mut self, desired: &DesiredTables) -> Result<Duration> {
        let started = Instant::now();
        let report = self.programmer.apply(desired, &mut self.tables);
        let took = started.elapsed();
        ensure!(
            report.errors.is_empty(),
            "programming failed: {:?}",
            &report.errors[..report.errors.len().min(3)]
        );
        Ok(took)
    }

    /// Empties conntrack of both families (earlier rounds' new flows would
    /// otherwise pile up and, with SNAT, crowd the node address's ports
    /// towards one backend), then re-establishes the mirror flows of both
    /// hooks.
    fn reset_flows(&mut self) -> Result<()> {
        let keys: Vec<_> = self.tables.conntrack.keys().collect::<Result<_, _>>()?;
        for key in keys {
            let _ = self.tables.conntrack.remove(&key);
        }
        let keys: Vec<_> = self.tables.conntrack6.keys().collect::<Result<_, _>>()?;
        for key in keys {
            let _ = self.tables.conntrack6.remove(&key);
        }
        self.establish_mirrors()
    }

    /// Sends the SYN of the mirror flow of each family through both hooks.
    fn establish_mirrors(&mut self) -> Result<()> {
        for family in self.families.clone() {
            for hook in [Hook::Xdp, Hook::Tc] {
                let syn = established_packet(hook, family, SYN);
                let (verdict, _, _) = self.run(hook, &syn, 1)?;
                ensure!(
                    verdict == hook.pass(),
                    "{}{}: mirror SYN dropped",
                    hook.name(),
                    family.suffix()
                );
            }
        }
        Ok(())
    }

    /// Every reason's counter, to name what moved in an error message.
    fn snapshot(&self) -> Vec<(Reason, u64)> {
        Reason::ALL
            .iter()
            .map(|reason| (*reason, self.count(*reason).unwrap_or(0)))
            .collect()
    }

    fn moved(&self, before: &[(Reason, u64)]) -> Vec<Reason> {
        before
            .iter()
            .filter(|(reason, count)| self.count(*reason).is_ok_and(|now| now != *count))
            .map(|(reason, _)| *reason)
            .collect()
    }

    fn count(&self, reason: Reason) -> Result<u64> {
        Ok(self.tables.stats.get(reason)?.packets)
    }

    /// One BPF_PROG_TEST_RUN of `lb_tc_egress` (TCX egress of pod and node
    /// devices): (verdict, output, kernel's ns per repeat).
    fn run_egress(&mut self, frame: &[u8], repeat: u32) -> Result<(u32, Vec<u8>, u64)> {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        };
        let result = self
            .datapath
            .tc_program(TC_EGRESS_PROGRAM)?
            .test_run(opts)
            .context("BPF_PROG_TEST_RUN")?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out, result.duration.as_nanos() as u64))
    }

    /// One BPF_PROG_TEST_RUN: (verdict, output, kernel's ns per repeat).
    fn run(&mut self, hook: Hook, frame: &[u8], repeat: u32) -> Result<(u32, Vec<u8>, u64)> {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        };
        let result = match hook {
            Hook::Xdp => self.datapath.xdp_program()?.test_run(opts),
            Hook::Tc => self.datapath.tc_program(TC_POD_PROGRAM)?.test_run(opts),
        }
        .context("BPF_PROG_TEST_RUN")?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out, result.duration.as_nanos() as u64))
    }
}

#[derive(Clone, Copy, Debug)]
enum Hook {
    /// `lb_xdp_node`: traffic from the network (external client).
    Xdp,
    /// `lb_tc_pod`: traffic from a pod.
    Tc,
}

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
        }
    }
    fn pass(self) -> u32 {
        match self {
            Hook::Xdp => 2, // XDP_PASS
            Hook::Tc => 0,  // TC_ACT_OK
        }
    }
    fn client(self) -> Ipv4Addr {
        match self {
            Hook::Xdp => EXTERNAL_CLIENT,
            Hook::Tc => POD_CLIENT,
        }
    }
    fn client6(self) -> Ipv6Addr {
        match self {
            Hook::Xdp => EXTERNAL_CLIENT6,
            Hook::Tc => POD_CLIENT6,
        }
    }
    fn client_ip(self, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(self.client()),
            Family::V6 => IpAddr::V6(self.client6()),
        }
    }
}

/// Trivial programs loaded straight through bpf(2): `r0 = verdict; exit`.
/// They are the floor: what BPF_PROG_TEST_RUN itself costs per packet.
mod floor {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use anyhow::{Result, bail};

    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    pub const PROG_TYPE_SCHED_CLS: u32 = 3;
    pub const PROG_TYPE_XDP: u32 = 6;

    /// `union bpf_attr`, large enough for both commands.
    #[repr(C, align(8))]
    struct Attr([u8; 128]);

    impl Attr {
        fn put_u32(&mut self, offset: usize, value: u32) {
            self.0[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
        }
        fn put_u64(&mut self, offset: usize, value: u64) {
            self.0[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
        }
        fn u32_at(&self, offset: usize) -> u32 {
            u32::from_ne_bytes(self.0[offset..offset + 4].try_into().expect("4 bytes"))
        }
    }

    fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<i64> {
        // SAFETY: bpf(2) reads and writes at most `size_of::<Attr>()` bytes
        // of `attr`, which lives for the whole call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut Attr,
                std::mem::size_of::<Attr>() as u32,
            )
        };
        if ret < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    pub struct Program(OwnedFd);

    impl Program {
        /// `mov64 r0, verdict; exit` as a program of `prog_type`.
        pub fn load(prog_type: u32, verdict: i32) -> Result<Program> {
            let mut insns = [0u8; 16];
            insns[0] = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K, dst r0
            insns[4..8].copy_from_slice(&verdict.to_ne_bytes());
            insns[8] = 0x95; // BPF_JMP | BPF_EXIT
            let license = b"GPL\0";
            let mut attr = Attr([0; 128]);
            attr.put_u32(0, prog_type);
            attr.put_u32(4, 2); // insn_cnt
            attr.put_u64(8, insns.as_ptr() as u64);
            attr.put_u64(16, license.as_ptr() as u64);
            let fd = match bpf(BPF_PROG_LOAD, &mut attr) {
                Ok(fd) => fd,
                Err(e) => bail!("loading the trivial program (type {prog_type}): {e}"),
            };
            // SAFETY: the kernel just returned this fd to us.
            Ok(Program(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
        }

        /// BPF_PROG_TEST_RUN: (verdict, ns per repeat).
        pub fn test_run(&self, frame: &[u8], repeat: u32) -> Result<(u32, u64)> {
            let mut out = vec![0u8; frame.len() + 256];
            let mut attr = Attr([0; 128]);
            attr.put_u32(0, self.0.as_raw_fd() as u32);
            attr.put_u32(8, frame.len() as u32);
            attr.put_u32(12, out.len() as u32);
            attr.put_u64(16, frame.as_ptr() as u64);
            attr.put_u64(24, out.as_mut_ptr() as u64);
            attr.put_u32(32, repeat);
            if let Err(e) = bpf(BPF_PROG_TEST_RUN, &mut attr) {
                bail!("BPF_PROG_TEST_RUN of the trivial program: {e}");
            }
            Ok((attr.u32_at(4), u64::from(attr.u32_at(36))))
        }
    }
}

/// `key=value` arguments with defaults.
struct Options(BTreeMap<String, String>);

impl Options {
    fn parse(args: &[String]) -> Result<Options> {
        let mut map = BTreeMap::new();
        for arg in args {
            let Some((key, value)) = arg.split_once('=') else {
                bail!("argument {arg:?} is not key=value");
            };
            map.insert(key.to_owned(), value.to_owned());
        }
        Ok(Options(map))
    }
    fn u32(&self, key: &str, default: u32) -> Result<u32> {
        match self.0.get(key) {
            Some(v) => v.parse().with_context(|| format!("{key}={v}")),
            None => Ok(default),
        }
    }
    fn list(&self, key: &str, default: &[u32]) -> Result<Vec<u32>> {
        match self.0.get(key) {
            Some(v) => v
                .split(',')
                .map(|s| s.parse().with_context(|| format!("{key}={v}")))
                .collect(),
            None => Ok(default.to_vec()),
        }
    }
    /// `a:b,c:d` as pairs.
    fn pairs(&self, key: &str, default: &[(u32, u32)]) -> Result<Vec<(u32, u32)>> {
        let Some(v) = self.0.get(key) else {
            return Ok(default.to_vec());
        };
        v.split(',')
            .map(|pair| {
                let (a, b) = pair
                    .split_once(':')
                    .with_context(|| format!("{key}={v}: {pair:?} is not a:b"))?;
                Ok((
                    a.parse().with_context(|| format!("{key}={v}"))?,
                    b.parse().with_context(|| format!("{key}={v}"))?,
                ))
            })
            .collect()
    }
}

fn result(metric: &str, variant: &str, size: u32, rep: u32, value: f64) {
    println!("RESULT metric={metric} variant={variant} size={size} rep={rep} value={value:.3}");
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.split_first() {
        Some((mode, rest)) if mode == "packet" => Options::parse(rest).and_then(|o| packet(&o)),
        Some((mode, rest)) if mode == "program" => Options::parse(rest).and_then(|o| program(&o)),
        Some((mode, rest)) if mode == "maglev" => Options::parse(rest).and_then(|o| maglev(&o)),
        _ => Err(anyhow::anyhow!(
            "usage: lb-bench packet|program|maglev key=value... (run by `cargo xtask bench`)"
        )),
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\n\r\n";

/// The established-flow frame: client -> mirror service, with the request
/// as payload (the SYN too).
fn established_packet(hook: Hook, family: Family, flags: u8) -> Vec<u8> {
    tcp_frame(
        (hook.client_ip(family), 40_000),
        mirror_ip(family),
        flags,
        REQUEST,
    )
}

/// A TCP frame to `dst`:80; both addresses of one family.
fn tcp_frame(src: (IpAddr, u16), dst: IpAddr, flags: u8, payload: &[u8]) -> Vec<u8> {
    match (src.0, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            Packet::tcp((s, src.1), (d, SERVICE_PORT), flags, payload).emit()
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            Packet6::tcp((s, src.1), (d, SERVICE_PORT), flags, payload).emit()
        }
        _ => unreachable!("{src:?} -> {dst}: one family per frame"),
    }
}

/// Runs `frame` `repeat` times and checks the verdict, that the output
/// equals `expected_out` (when given) and that `reason` counted every repeat.
fn measure_repeated(
    loaded: &mut Loaded,
    hook: Hook,
    frame: &[u8],
    expected_out: Option<&[u8]>,
    reason: Reason,
    repeat: u32,
) -> Result<u64> {
    let before = loaded.count(reason)?;
    let (verdict, out, ns) = loaded.run(hook, frame, repeat)?;
    let counted = loaded.count(reason)? - before;
    ensure!(
        verdict == hook.pass(),
        "{}: verdict {verdict}, expected pass",
        hook.name()
    );
    ensure!(
        counted == u64::from(repeat),
        "{}: {counted} of {repeat} repeats counted as {reason:?}: another path was taken",
        hook.name()
    );
    if let Some(expected) = expected_out {
        ensure!(
            out == expected,
            "{}: output after {repeat} repeats differs from a single run's",
            hook.name()
        );
    }
    Ok(ns)
}

/// TCX egress (`lb_tc_egress`): every packet leaving a pod or node device
/// pays its untracked case (`tc_egress_untracked`); a reply of a
/// host-network backend its tracked one (`tc_egress_host_reply`: the
/// reply of the flow `forward`, which the pod hook has tracked, leaving
/// the node's stack). The untracked case is not counted (every packet
/// leaving passes), so its output alone is checked.
fn measure_egress(
    one: &mut Loaded,
    family: Family,
    forward: &[u8],
    (size, rep): (u32, u32),
    repeat: u32,
) -> Result<()> {
    let suffix = family.suffix();
    let client = (Hook::Tc.client_ip(family), 40_000);
    let untracked = tcp_frame((not_a_service(family), 8080), client.0, ACK, REQUEST);
    let (verdict, out, ns) = one.run_egress(&untracked, repeat)?;
    ensure!(
        verdict == 0,
        "tc_egress: verdict {verdict} for an untracked packet"
    );
    ensure!(
        out == untracked,
        "tc_egress: an untracked packet was changed"
    );
    result(
        "pkt_ns",
        &format!("tc_egress_untracked{suffix}"),
        size,
        rep,
        ns as f64,
    );

    // The backend the forward packet was translated to answers.
    let (_, translated, _) = one.run(Hook::Tc, forward, 1)?;
    let reply = match family {
        Family::V4 => {
            let p = Packet::parse(&translated).map_err(anyhow::Error::msg)?;
            let (IpAddr::V4(client_ip), Some((_, backend_port))) = (client.0, p.ports()) else {
                bail!("the translated IPv4 packet has no ports, or the client is not IPv4");
            };
            Packet::tcp((p.dst, backend_port), (client_ip, client.1), ACK, REQUEST).emit()
        }
        Family::V6 => {
            let p = Packet6::parse(&translated).map_err(anyhow::Error::msg)?;
            let (IpAddr::V6(client_ip), Some((_, backend_port))) = (client.0, p.ports()) else {
                bail!("the translated IPv6 packet has no ports, or the client is not IPv6");
            };
            Packet6::tcp((p.dst, backend_port), (client_ip, client.1), ACK, REQUEST).emit()
        }
    };
    let before = one.count(Reason::CtReply)?;
    let (verdict, _, ns) = one.run_egress(&reply, repeat)?;
    let counted = one.count(Reason::CtReply)? - before;
    ensure!(
        verdict == 0,
        "tc_egress: verdict {verdict} for a host reply"
    );
    ensure!(
        counted == u64::from(repeat),
        "tc_egress: {counted} of {repeat} host replies counted as ct_reply"
    );
    result(
        "pkt_ns",
        &format!("tc_egress_host_reply{suffix}"),
        size,
        rep,
        ns as f64,
    );
    Ok(())
}

/// New flows measured between two conntrack resets: a few hundred per
/// backend, well inside the node address's SNAT port range.
const FLOWS_PER_BATCH: u32 = 2000;

/// Average kernel-measured cost of `runs` single runs of new flows (distinct
/// source ports and addresses) to the last generated service; each must be
/// counted under `reason` and rewritten to one of its endpoints.
fn measure_new_flows(
    loaded: &mut Loaded,
    (hook, family): (Hook, Family),
    services: u32,
    runs: u32,
    round: u32,
    reason: Reason,
) -> Result<f64> {
    let target = service_ip(family, services - 1);
    let endpoints: Vec<IpAddr> = (0..ENDPOINTS_PER_SERVICE)
        .map(|j| endpoint_ip(family, services - 1, j))
        .collect();
    loaded.reset_flows()?;
    let mut before = loaded.count(reason)?;
    let mut counted = 0;
    let mut total_ns = 0u64;
    for k in 0..runs {
        if k > 0 && k % FLOWS_PER_BATCH == 0 {
            // Empty conntrack between batches (outside the timed runs): the
            // external client's flows are SNATed to the node address, whose
            // port range per backend must not fill up.
            counted += loaded.count(reason)? - before;
            loaded.reset_flows()?;
            before = loaded.count(reason)?;
        }
        // A source no earlier run of any round used: 10.244.(100+round).x
        // or 198.51.(100+round).x-ish with 50000 ports each (IPv6: the
        // client's /64, (100+round) in the last 32 bits).
        let index = k + round * runs;
        let src = match hook.client_ip(family) {
            IpAddr::V4(client) => {
                let [a, b, _, _] = client.octets();
                IpAddr::V4(Ipv4Addr::new(a, b, 100 + (index / 50_000) as u8, 3))
            }
            IpAddr::V6(client) => {
                let prefix = u128::from(client) & !u128::from(u64::MAX);
                IpAddr::V6(Ipv6Addr::from(prefix | u128::from(100 + index / 50_000)))
            }
        };
        let port = 10_000 + (index % 50_000) as u16;
        let frame = tcp_frame((src, port), target, SYN, b"");
        let snapshot = loaded.snapshot();
        let (verdict, out, ns) = loaded.run(hook, &frame, 1)?;
        ensure!(
            verdict == hook.pass(),
            "{}{}: new flow {k} of {runs} not passed: {:?}",
            hook.name(),
            family.suffix(),
            loaded.moved(&snapshot)
        );
        if k == 0 {
            let dst = match family {
                Family::V4 => IpAddr::V4(Packet::parse(&out).map_err(|e| anyhow::anyhow!(e))?.dst),
                Family::V6 => IpAddr::V6(Packet6::parse(&out).map_err(|e| anyhow::anyhow!(e))?.dst),
            };
            ensure!(
                endpoints.contains(&dst),
                "{}{}: new flow to {target} went to {dst}, not an endpoint",
                hook.name(),
                family.suffix()
            );
        }
        total_ns += ns;
    }
    counted += loaded.count(reason)? - before;
    ensure!(
        counted == u64::from(runs),
        "{}{}: {counted} of {runs} new-flow runs counted as {}",
        hook.name(),
        family.suffix(),
        reason.name()
    );
    Ok(total_ns as f64 / f64::from(runs))
}

/// Per-packet cost. Options: sizes (service counts), reps, repeat (per
/// repeated run), new_flows (single runs per new-flow figure).
fn packet(options: &Options) -> Result<()> {
    let sizes = options.list("sizes", &[100, 1000, 10_000, 100_000])?;
    let reps = options.u32("reps", 5)?;
    let repeat = options.u32("repeat", 1_000_000)?;
    let new_flows = options.u32("new_flows", 20_000)?;
    // The same datapath with Maglev selection, at one size (0: skipped).
    let maglev_size = options.u32("maglev_size", 1000)?;
    let maglev_m = options.u32("maglev_m", lb_common::maglev::DEFAULT_TABLE_SIZE)?;

    let xdp_floor = floor::Program::load(floor::PROG_TYPE_XDP, 2)?;
    let tc_floor = floor::Program::load(floor::PROG_TYPE_SCHED_CLS, 0)?;
    let mut loaded = Vec::new();
    for &size in &sizes {
        // Dual-stack: the IPv6 cases beside the IPv4 ones, same maps.
        let one = Loaded::mirrored(size, None, &[Family::V4, Family::V6])?;
        eprintln!("lb-bench: {size} dual-stack services programmed");
        loaded.push((size, one));
    }
    let mut maglev = None;
    if maglev_size > 0 {
        let one = Loaded::mirrored(maglev_size, Some(maglev_m), &[Family::V4])?;
        eprintln!("lb-bench: {maglev_size} services programmed with Maglev (M = {maglev_m})");
        maglev = Some(one);
    }

    let floor_frame = established_packet(Hook::Tc, Family::V4, ACK);
    for rep in 0..reps {
        for (size, one) in loaded.iter_mut() {
            let size = *size;
            // Floors, measured beside every size so drift shows up.
            let (verdict, ns) = xdp_floor.test_run(&floor_frame, repeat)?;
            ensure!(verdict == 2, "trivial XDP program returned {verdict}");
            result("pkt_ns", "xdp_pass_floor", size, rep, ns as f64);
            let (verdict, ns) = tc_floor.test_run(&floor_frame, repeat)?;
            ensure!(verdict == 0, "trivial TC program returned {verdict}");
            result("pkt_ns", "tc_pass_floor", size, rep, ns as f64);
            let single: u64 = (0..new_flows.min(5000))
                .map(|_| xdp_floor.test_run(&floor_frame, 1).map(|(_, ns)| ns))
                .sum::<Result<u64>>()?;
            result(
                "pkt_ns",
                "xdp_pass_floor_single",
                size,
                rep,
                single as f64 / f64::from(new_flows.min(5000)),
            );
            let arp = arp_request();
            let ns = measure_repeated(
                one,
                Hook::Xdp,
                &arp,
                Some(&arp),
                Reason::PassNotIpv4,
                repeat,
            )?;
            result("pkt_ns", "xdp_arp", size, rep, ns as f64);

            for family in [Family::V4, Family::V6] {
                for hook in [Hook::Xdp, Hook::Tc] {
                    let name = |case: &str| format!("{}_{case}{}", hook.name(), family.suffix());
                    let ack = established_packet(hook, family, ACK);
                    let ns =
                        measure_repeated(one, hook, &ack, Some(&ack), Reason::CtForward, repeat)?;
                    result("pkt_ns", &name("established"), size, rep, ns as f64);
                    if let Hook::Tc = hook {
                        measure_egress(one, family, &ack, (size, rep), repeat)?;
                    }

                    let other = tcp_frame(
                        (hook.client_ip(family), 40_001),
                        not_a_service(family),
                        ACK,
                        REQUEST,
                    );
                    let ns = measure_repeated(
                        one,
                        hook,
                        &other,
                        Some(&other),
                        Reason::PassNotService,
                        repeat,
                    )?;
                    result("pkt_ns", &name("not_service"), size, rep, ns as f64);

                    let ns = measure_new_flows(
                        one,
                        (hook, family),
                        size,
                        new_flows,
                        rep,
                        Reason::NewFlow,
                    )?;
                    result("pkt_ns", &name("new_flow"), size, rep, ns);
                }
            }
        }
        // Maglev: established flows take the same path (conntrack); new
        // flows look up one table chunk instead of drawing a slot.
        if let Some(one) = maglev.as_mut() {
            for hook in [Hook::Xdp, Hook::Tc] {
                let ack = established_packet(hook, Family::V4, ACK);
                let ns = measure_repeated(one, hook, &ack, Some(&ack), Reason::CtForward, repeat)?;
                let name = format!("{}_established_maglev", hook.name());
                result("pkt_ns", &name, maglev_size, rep, ns as f64);
                let ns = measure_new_flows(
                    one,
                    (hook, Family::V4),
                    maglev_size,
                    new_flows,
                    rep,
                    Reason::NewFlowMaglev,
                )?;
                let name = format!("{}_new_flow_maglev", hook.name());
                result("pkt_ns", &name, maglev_size, rep, ns);
            }
        }
    }
    Ok(())
}

/// Replaces endpoint 0 of service `i` in `tables` by `addr`.
fn change_endpoint(tables: &mut DesiredTables, i: u32, addr: Ipv4Addr) -> Result<()> {
    let frontend = Frontend::new(IpAddr::V4(service_vip(i)), SERVICE_PORT, Protocol::Tcp);
    let spec = tables
        .frontends
        .get_mut(&frontend)
        .with_context(|| format!("no frontend {frontend}"))?;
    spec.backends[0] = backend(addr, TARGET_PORT, false);
    Ok(())
}

/// Programming. Options: sizes (install), reps, change_size (services for
/// the single change and the churn), changes (single changes timed per
/// rep), churn (changes in the churn run).
fn program(options: &Options) -> Result<()> {
    let sizes = options.list("sizes", &[1000, 10_000, 100_000])?;
    let reps = options.u32("reps", 5)?;
    let change_size = options.u32("change_size", 10_000)?;
    let changes = options.u32("changes", 20)?;
    let churn = options.u32("churn", 1000)?;

    for rep in 0..reps {
        for &size in &sizes {
            let mut one = Loaded::new(size)?;
            let tables = desired(size, &[Family::V4]);
            let took = one.apply(&tables)?;
            result("install_ms", "ours", size, rep, took.as_secs_f64() * 1e3);
        }
    }

    // One endpoint change, then a sustained churn, on one set of maps.
    let mut one = Loaded::new(change_size)?;
    let mut tables = desired(change_size, &[Family::V4]);
    one.apply(&tables)?;
    let mut next_addr = u32::from(Ipv4Addr::new(10, 64, 0, 1));
    for rep in 0..reps {
        let mut times: Vec<f64> = Vec::new();
        for k in 0..changes {
            let i = (k * 7919 + rep * 104_729) % change_size;
            change_endpoint(&mut tables, i, Ipv4Addr::from(next_addr))?;
            next_addr += 1;
            times.push(one.apply(&tables)?.as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        result(
            "endpoint_change_ms",
            "ours",
            change_size,
            rep,
            times[times.len() / 2],
        );
    }

    // Churn: the last service gets a single endpoint that changes on every
    // step; the delay runs from the start of the write to the first probe
    // (a SYN of a new flow through lb_tc_pod) that is sent to the new address.
    let target = change_size - 1;
    let vip = service_vip(target);
    let frontend = Frontend::new(IpAddr::V4(vip), SERVICE_PORT, Protocol::Tcp);
    let mut probe_id = 0u32;
    for rep in 0..reps {
        let mut delays: Vec<f64> = Vec::with_capacity(churn as usize);
        let mut probes = 0u32;
        for step in 0..churn {
            let addr = Ipv4Addr::from(next_addr);
            next_addr += 1;
            tables
                .frontends
                .get_mut(&frontend)
                .context("target frontend")?
                .backends = vec![backend(addr, TARGET_PORT, false)];
            let started = Instant::now();
            one.apply(&tables)?;
            let mut seen = false;
            for _ in 0..1000u32 {
                // Every probe is a flow of its own: 10.240.0.0/12 x 60000 ports.
                probe_id += 1;
                probes += 1;
                let port = 1024 + (probe_id % 60_000) as u16;
                let src =
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 240, 0, 0)) + probe_id / 60_000);
                let syn = Packet::tcp((src, port), (vip, SERVICE_PORT), SYN, b"").emit();
                let (_, out, _) = one.run(Hook::Tc, &syn, 1)?;
                let parsed = Packet::parse(&out).map_err(|e| anyhow::anyhow!(e))?;
                if parsed.dst == addr {
                    seen = true;
                    break;
                }
            }
            ensure!(seen, "churn step {step}: new backend {addr} never chosen");
            delays.push(started.elapsed().as_secs_f64() * 1e6);
        }
        delays.sort_by(f64::total_cmp);
        let pick = |q: f64| delays[((delays.len() as f64 - 1.0) * q).round() as usize];
        result("churn_us_p50", "ours", change_size, rep, pick(0.5));
        result("churn_us_p99", "ours", change_size, rep, pick(0.99));
        result(
            "churn_probes_per_change",
            "ours",
            change_size,
            rep,
            f64::from(probes) / f64::from(churn),
        );
    }
    Ok(())
}

/// Maglev table builds. Options: cases (`backends:M,...`), reps, builds
/// (per case and repetition; their median is the repetition's value).
fn maglev(options: &Options) -> Result<()> {
    let cases = options.pairs("cases", &[(100, 16_381), (1000, 65_521)])?;
    let reps = options.u32("reps", 5)?;
    let builds = options.u32("builds", 50)?.max(1);
    for rep in 0..reps {
        for &(backends, table_size) in &cases {
            // Distinct addresses from 10.128.0.0 on, one port: what a
            // service's EndpointSlices give the builder.
            let identities: Vec<BackendIdentity> = (0..backends)
                .map(|j| BackendIdentity {
                    addr: IpAddr::V4(endpoint_addr(0, j)),
                    port: TARGET_PORT,
                })
                .collect();
            let mut times = Vec::with_capacity(builds as usize);
            for build in 0..builds {
                let started = Instant::now();
                let table = build_table(std::hint::black_box(&identities), table_size)
                    .with_context(|| format!("{backends} backends, M = {table_size}"))?;
                times.push(started.elapsed().as_secs_f64() * 1e3);
                if rep == 0 && build == 0 {
                    let used: BTreeSet<u32> = table.iter().copied().collect();
                    ensure!(
                        table.len() == table_size as usize && used.len() == backends as usize,
                        "{backends} backends, M = {table_size}: {} slots, {} backends used",
                        table.len(),
                        used.len()
                    );
                }
            }
            times.sort_by(f64::total_cmp);
            result(
                "maglev_build_ms",
                &format!("m{table_size}"),
                backends,
                rep,
                times[times.len() / 2],
            );
        }
    }
    Ok(())
}
