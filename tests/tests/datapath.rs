//! In-kernel datapath fixtures: the real TC program, loaded with maps
//! programmed by the real agent code, run on crafted packets through
//! BPF_PROG_TEST_RUN (kernel 4.12+ for skb programs). Each case checks the
//! verdict, the rewritten bytes (checksums recomputed here, not trusted from
//! the kernel) and the counters.

use std::net::{IpAddr, Ipv4Addr};

use aya::programs::{TestRun, TestRunOptions};
use lb_agent::{
    datapath::{Datapath, KernelTables, MapSizes, Programmer},
    model::{Backend, DesiredTables, Frontend, FrontendKind, FrontendSpec, Protocol, ServiceRef},
};
use lb_common::{conntrack::DIR_REPLY, stats::Reason};
use lb_tests::{
    packet::{ACK, Packet, SYN, Transport, arp_request},
    require_root,
};
use xtask::netns::BpffsDir;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 12);

struct Fixture {
    datapath: Datapath,
    tables: KernelTables,
    programmer: Programmer,
    _pins: BpffsDir,
}

fn spec(name: &str, port_name: &str, backends: &[(Ipv4Addr, u16)]) -> FrontendSpec {
    FrontendSpec {
        service: ServiceRef {
            namespace: "default".into(),
            name: name.into(),
        },
        port_name: port_name.into(),
        kind: FrontendKind::ClusterIp,
        backends: backends
            .iter()
            .map(|(addr, port)| Backend {
                addr: IpAddr::V4(*addr),
                port: *port,
                node_local: true,
                terminating: false,
                pod: None,
            })
            .collect(),
        affinity_timeout: None,
    }
}

fn frontend(addr: Ipv4Addr, port: u16, protocol: Protocol) -> Frontend {
    Frontend {
        addr: IpAddr::V4(addr),
        port,
        protocol,
    }
}

fn desired(web_backends: &[(Ipv4Addr, u16)]) -> DesiredTables {
    DesiredTables {
        frontends: [
            (
                frontend(VIP, 80, Protocol::Tcp),
                spec("web", "http", web_backends),
            ),
            (
                frontend(VIP, 53, Protocol::Udp),
                spec("web", "dns", &[(POD_A, 5353)]),
            ),
            (
                frontend(EMPTY_VIP, 80, Protocol::Tcp),
                spec("empty", "http", &[]),
            ),
        ]
        .into_iter()
        .collect(),
    }
}

impl Fixture {
    fn new(test: &str) -> Self {
        require_root(test);
        let pins = BpffsDir::new().expect("bpffs directory");
        let sizes = MapSizes {
            services: 64,
            slots: 256,
            backends: 64,
            conntrack: 1024,
        };
        let mut datapath = Datapath::load(pins.path(), sizes).expect("load datapath");
        let mut tables = datapath.take_tables().expect("tables");
        let mut programmer = Programmer::default();
        let report = programmer.apply(&desired(&[(POD_A, 8080), (POD_B, 8080)]), &mut tables);
        assert!(
            report.errors.is_empty(),
            "programming failed: {:?}",
            report.errors
        );
        Self {
            datapath,
            tables,
            programmer,
            _pins: pins,
        }
    }

    /// Runs the TC program once on `frame`: (verdict, output frame).
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let program = self.datapath.tc_program().expect("program");
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// Runs `packet` and expects it passed on; returns the (checksum-verified) output.
    fn pass(&mut self, packet: &Packet) -> Packet {
        let (verdict, out) = self.run(&packet.emit());
        assert_eq!(verdict, TC_ACT_OK, "packet {packet:?} was not passed");
        Packet::parse(&out).unwrap_or_else(|e| panic!("output of {packet:?} is broken: {e}"))
    }

    fn count(&self, reason: Reason) -> u64 {
        self.tables.stats.get(reason).expect("stats").packets
    }
}

fn syn(src_port: u16) -> Packet {
    Packet::tcp((CLIENT, src_port), (VIP, 80), SYN, b"")
}

#[test]
fn tcp_syn_to_a_cluster_ip_is_translated_to_a_backend() {
    let mut fx = Fixture::new("tcp_syn_to_a_cluster_ip_is_translated_to_a_backend");
    let before = fx.count(Reason::NewFlow);
    let out = fx.pass(&syn(40000));
    assert!(
        out.dst == POD_A || out.dst == POD_B,
        "dst IP hasn't been NATed: {}",
        out.dst
    );
    assert_eq!(
        out.ports(),
        Some((40000, 8080)),
        "dst port hasn't been NATed"
    );
    assert_eq!(out.src, CLIENT, "src IP must not change on the way in");
    assert_eq!(fx.count(Reason::NewFlow), before + 1, "new_flow counter");

    // Both directions are tracked.
    let ct = fx.tables.dump_conntrack().expect("conntrack");
    assert!(
        ct.iter().any(|(k, v)| k.src_addr == out.dst.octets()
            && k.dst_addr == CLIENT.octets()
            && k.src_port == 8080
            && k.dst_port == 40000
            && v.direction == DIR_REPLY
            && v.nat_addr == VIP.octets()
            && v.nat_port == 80),
        "no reply entry for the flow: {ct:?}"
    );
}

#[test]
fn established_flow_keeps_its_backend_and_replies_are_reverse_translated() {
    let mut fx =
        Fixture::new("established_flow_keeps_its_backend_and_replies_are_reverse_translated");
    let chosen = fx.pass(&syn(40001)).dst;
    for i in 0..20u8 {
        let out = fx.pass(&Packet::tcp((CLIENT, 40001), (VIP, 80), ACK, &[i; 10]));
        assert_eq!(
            out.dst, chosen,
            "packet {i} of an established flow changed backend"
        );
        assert_eq!(out.payload, vec![i; 10], "payload changed");
    }
    let before = fx.count(Reason::CtReply);
    let reply = fx.pass(&Packet::tcp(
        (chosen, 8080),
        (CLIENT, 40001),
        SYN | ACK,
        b"",
    ));
    assert_eq!(reply.src, VIP, "reply src IP hasn't been reverse-NATed");
    assert_eq!(
        reply.ports(),
        Some((80, 40001)),
        "reply src port hasn't been reverse-NATed"
    );
    assert_eq!(reply.dst, CLIENT);
    assert!(matches!(reply.transport, Transport::Tcp { flags, .. } if flags == SYN | ACK));
    assert_eq!(fx.count(Reason::CtReply), before + 1, "ct_reply counter");
}

#[test]
fn udp_datagram_is_translated_both_ways_with_valid_checksums() {
    let mut fx = Fixture::new("udp_datagram_is_translated_both_ways_with_valid_checksums");
    let out = fx.pass(&Packet::udp((CLIENT, 50000), (VIP, 53), b"query"));
    assert_eq!(
        (out.dst, out.ports()),
        (POD_A, Some((50000, 5353))),
        "UDP not NATed"
    );
    assert_eq!(out.payload, b"query");
    let reply = fx.pass(&Packet::udp((POD_A, 5353), (CLIENT, 50000), b"answer"));
    assert_eq!(
        (reply.src, reply.ports()),
        (VIP, Some((53, 50000))),
        "UDP reply not reverse-NATed"
    );

    // A datagram without checksum keeps "no checksum" after translation.
    let mut unchecked = Packet::udp((CLIENT, 50001), (VIP, 53), b"q");
    unchecked.udp_zero_checksum = true;
    let out = fx.pass(&unchecked);
    assert_eq!(out.dst, POD_A);
    assert!(out.udp_zero_checksum, "a zero UDP checksum must stay zero");
}

#[test]
fn traffic_not_for_a_service_is_untouched() {
    let mut fx = Fixture::new("traffic_not_for_a_service_is_untouched");
    for (frame, reason) in [
        (
            Packet::tcp((CLIENT, 40002), (POD_A, 8080), SYN, b"").emit(),
            Reason::PassNotService,
        ),
        (
            Packet::udp((CLIENT, 40002), (VIP, 5353), b"").emit(),
            Reason::PassNotService,
        ),
        (arp_request(), Reason::PassNotIpv4),
    ] {
        let before = fx.count(reason);
        let (verdict, out) = fx.run(&frame);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, frame, "a packet not for a service was modified");
        assert_eq!(fx.count(reason), before + 1, "{} counter", reason.name());
    }
}

#[test]
fn a_service_without_backends_drops_and_counts() {
    let mut fx = Fixture::new("a_service_without_backends_drops_and_counts");
    let before = fx.count(Reason::DropNoBackend);
    let (verdict, _) = fx.run(&Packet::tcp((CLIENT, 40003), (EMPTY_VIP, 80), SYN, b"").emit());
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "packet to a service without backends was not dropped"
    );
    assert_eq!(fx.count(Reason::DropNoBackend), before + 1);
}

#[test]
fn new_flows_spread_over_all_backends() {
    let mut fx = Fixture::new("new_flows_spread_over_all_backends");
    let mut seen = std::collections::BTreeMap::new();
    for port in 41000..41200 {
        *seen.entry(fx.pass(&syn(port)).dst).or_insert(0) += 1;
    }
    assert_eq!(
        seen.len(),
        2,
        "200 flows did not reach both backends: {seen:?}"
    );
}

#[test]
fn removed_backend_gets_no_new_flows_but_established_ones_continue() {
    let mut fx = Fixture::new("removed_backend_gets_no_new_flows_but_established_ones_continue");
    // Find one flow on each backend.
    let mut on = std::collections::BTreeMap::new();
    for port in 42000..42200 {
        let dst = fx.pass(&syn(port)).dst;
        on.entry(dst).or_insert(port);
    }
    let (port_a, port_b) = (on[&POD_A], on[&POD_B]);

    let report = fx
        .programmer
        .apply(&desired(&[(POD_A, 8080)]), &mut fx.tables);
    assert!(report.errors.is_empty(), "{:?}", report.errors);

    // The established flow to the removed backend keeps its translation...
    let out = fx.pass(&Packet::tcp((CLIENT, port_b), (VIP, 80), ACK, b"more"));
    assert_eq!(
        out.dst, POD_B,
        "established flow to a removed backend was moved"
    );
    // ...but a new connection reusing that tuple is balanced afresh.
    assert_eq!(
        fx.pass(&syn(port_b)).dst,
        POD_A,
        "new connection went to a removed backend"
    );
    for port in 43000..43050 {
        assert_eq!(
            fx.pass(&syn(port)).dst,
            POD_A,
            "new flow went to a removed backend"
        );
    }
    // The flow on the remaining backend is undisturbed.
    assert_eq!(
        fx.pass(&Packet::tcp((CLIENT, port_a), (VIP, 80), ACK, b""))
            .dst,
        POD_A
    );
}
