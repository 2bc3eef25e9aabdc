//! In-kernel fixtures for the conntrack lifecycle, each run for IPv4 and
//! IPv6: the state bits both entries of a flow carry, an expired entry
//! treated as absent, a SYN on a closed tuple or on a backend that left the
//! service balanced afresh, SNAT ports of closed flows claimed again (ten
//! thousand short flows through one SNAT backend), `drop_snat_exhausted`
//! when live flows hold every port, two frontends sharing a backend and a
//! client port, and the agent's collector.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use lb_agent::{
    datapath::ct_sweep::{Sweeper, coarse_now_ns},
    model::{DesiredTables, Frontend, FrontendKind, FrontendSpec, Protocol},
};
use lb_common::{
    PROTO_TCP, PROTO_UDP,
    conntrack::{
        CT_FIN_FORWARD, CT_FIN_REPLY, CT_REPLIED, CT_RST, CtState, CtTimeouts, Lb4CtKey, Lb6CtKey,
    },
    stats::Reason,
};
use lb_tests::{
    fixture::{Fixture, Hook, spec, spec6},
    packet::{ACK, FIN, Packet, RST, SYN},
    packet6::Packet6,
};

/// The addresses of one family's scenario.
struct Family {
    name: &'static str,
    client: IpAddr,
    vip: IpAddr,
    vip2: IpAddr,
    backend_a: IpAddr,
    backend_b: IpAddr,
    node: IpAddr,
    external: IpAddr,
    remote: IpAddr,
}

const V4: Family = Family {
    name: "ipv4",
    client: IpAddr::V4(Ipv4Addr::new(10, 244, 1, 2)),
    vip: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)),
    vip2: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 20)),
    backend_a: IpAddr::V4(Ipv4Addr::new(10, 244, 1, 11)),
    backend_b: IpAddr::V4(Ipv4Addr::new(10, 244, 1, 12)),
    node: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 11)),
    external: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 100)),
    remote: IpAddr::V4(Ipv4Addr::new(10, 244, 2, 11)),
};

const V6: Family = Family {
    name: "ipv6",
    client: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 2)),
    vip: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10)),
    vip2: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x20)),
    backend_a: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0x11)),
    backend_b: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0x12)),
    node: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11)),
    external: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100)),
    remote: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x244, 2, 0, 0, 0, 0, 0x11)),
};

const NODE_PORT: u16 = 30080;
const SNAT_PORTS: std::ops::RangeInclusive<u16> = 61000..=65522;

fn sa(addr: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(addr, port)
}

/// A frontend spec of `default/<name>` with `backends` (address, port,
/// on this node) of either family.
fn spec_of(name: &str, kind: FrontendKind, backends: &[(IpAddr, u16, bool)]) -> FrontendSpec {
    let v4: Vec<_> = backends
        .iter()
        .filter_map(|(a, p, l)| match a {
            IpAddr::V4(a) => Some((*a, *p, *l)),
            IpAddr::V6(_) => None,
        })
        .collect();
    let v6: Vec<_> = backends
        .iter()
        .filter_map(|(a, p, l)| match a {
            IpAddr::V6(a) => Some((*a, *p, *l)),
            IpAddr::V4(_) => None,
        })
        .collect();
    if v6.is_empty() {
        spec(name, "http", kind, &v4)
    } else {
        spec6(name, "http", kind, &v6)
    }
}

/// `web` (ClusterIP `vip`) and `other` (ClusterIP `vip2`), each on port
/// 80 with the backends given, and a NodePort whose only backend is on
/// another node.
fn desired(f: &Family, web: &[IpAddr], other: &[IpAddr]) -> DesiredTables {
    let local = |addrs: &[IpAddr]| -> Vec<(IpAddr, u16, bool)> {
        addrs.iter().map(|a| (*a, 8080, true)).collect()
    };
    let udp = |addrs: &[IpAddr]| -> Vec<(IpAddr, u16, bool)> {
        addrs.iter().map(|a| (*a, 5353, true)).collect()
    };
    DesiredTables {
        frontends: [
            (
                Frontend::new(f.vip, 80, Protocol::Tcp),
                spec_of("web", FrontendKind::ClusterIp, &local(web)),
            ),
            (
                Frontend::new(f.vip2, 80, Protocol::Tcp),
                spec_of("other", FrontendKind::ClusterIp, &local(other)),
            ),
            (
                Frontend::new(f.vip, 53, Protocol::Udp),
                spec_of("dns", FrontendKind::ClusterIp, &udp(web)),
            ),
            (
                Frontend::new(f.node, NODE_PORT, Protocol::Tcp),
                spec_of("remote", FrontendKind::NodePort, &[(f.remote, 8080, false)]),
            ),
        ]
        .into_iter()
        .collect(),
        ..DesiredTables::default()
    }
}

fn fixture(test: &str, f: &Family, web: &[IpAddr], other: &[IpAddr]) -> Fixture {
    let mut fx = Fixture::new(&format!("{test}_{}", f.name), &desired(f, web, other));
    match f.node {
        IpAddr::V4(node) => fx.set_node_address(node),
        IpAddr::V6(node) => fx.set_node_address6(node),
    }
    fx
}

/// A TCP frame of either family.
fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8) -> Vec<u8> {
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            Packet::tcp((s, src.port()), (d, dst.port()), flags, b"").emit()
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            Packet6::tcp((s, src.port()), (d, dst.port()), flags, b"").emit()
        }
        _ => panic!("mixed families {src} -> {dst}"),
    }
}

/// A UDP frame of either family.
fn udp(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            Packet::udp((s, src.port()), (d, dst.port()), b"query").emit()
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            Packet6::udp((s, src.port()), (d, dst.port()), b"query").emit()
        }
        _ => panic!("mixed families {src} -> {dst}"),
    }
}

/// Runs `frame` through `hook`, expects it passed, and returns its
/// (source, destination) after the program, checksums verified.
fn pass(fx: &mut Fixture, hook: Hook, frame: &[u8]) -> (SocketAddr, SocketAddr) {
    let (verdict, out) = fx.run(hook, frame);
    assert_eq!(verdict, hook.pass(), "{hook:?}: frame was not passed");
    if let Ok(p) = Packet::parse(&out) {
        let (s, d) = p.ports().expect("ports");
        return (sa(IpAddr::V4(p.src), s), sa(IpAddr::V4(p.dst), d));
    }
    let p = Packet6::parse(&out).unwrap_or_else(|e| panic!("{hook:?}: broken output: {e}"));
    let (s, d) = p.ports().expect("ports");
    (sa(IpAddr::V6(p.src), s), sa(IpAddr::V6(p.dst), d))
}

/// The (state bits, last seen) of the TCP entry at `src -> dst`.
fn entry(fx: &Fixture, src: SocketAddr, dst: SocketAddr) -> Option<(u8, u64)> {
    entry_of(fx, PROTO_TCP, src, dst)
}

/// The (state bits, last seen) of the `proto` entry at `src -> dst`.
fn entry_of(fx: &Fixture, proto: u8, src: SocketAddr, dst: SocketAddr) -> Option<(u8, u64)> {
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let key = Lb4CtKey {
                proto,
                ..key4(s, d, src.port(), dst.port())
            };
            let e = fx.tables.conntrack.get(&key, 0).ok()?;
            Some((e.state, e.last_seen_ns))
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let key = Lb6CtKey {
                proto,
                ..key6(s, d, src.port(), dst.port())
            };
            let e = fx.tables.conntrack6.get(&key, 0).ok()?;
            Some((e.state, e.last_seen_ns))
        }
        _ => None,
    }
}

/// Sets the last-seen time of the TCP entry at `src -> dst`, as if its
/// last packet came at `last_seen_ns`.
fn age(fx: &mut Fixture, src: SocketAddr, dst: SocketAddr, last_seen_ns: u64) {
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let key = key4(s, d, src.port(), dst.port());
            let mut e = fx.tables.conntrack.get(&key, 0).expect("entry");
            e.last_seen_ns = last_seen_ns;
            fx.tables.conntrack.insert(key, e, 0).expect("write");
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let key = key6(s, d, src.port(), dst.port());
            let mut e = fx.tables.conntrack6.get(&key, 0).expect("entry");
            e.last_seen_ns = last_seen_ns;
            fx.tables.conntrack6.insert(key, e, 0).expect("write");
        }
        _ => panic!("mixed families"),
    }
}

fn key4(s: Ipv4Addr, d: Ipv4Addr, sp: u16, dp: u16) -> Lb4CtKey {
    Lb4CtKey {
        src_addr: s.octets(),
        dst_addr: d.octets(),
        src_port: sp,
        dst_port: dp,
        proto: PROTO_TCP,
        _pad: [0; 3],
    }
}

fn key6(s: Ipv6Addr, d: Ipv6Addr, sp: u16, dp: u16) -> Lb6CtKey {
    Lb6CtKey {
        src_addr: s.octets(),
        dst_addr: d.octets(),
        src_port: sp,
        dst_port: dp,
        proto: PROTO_TCP,
        _pad: [0; 3],
    }
}

/// Shortens the established timeout to 10 s (as
/// `--conntrack-tcp-timeout-established 10s` would; the machine may have
/// been up for less than the default day) and returns a last-seen time
/// past it.
fn idle_past_established(fx: &mut Fixture) -> u64 {
    let mut config = fx.tables.config().expect("config");
    config.ct = CtTimeouts {
        tcp_established: 10,
        ..CtTimeouts::DEFAULT
    };
    fx.tables.set_config(&config).expect("write config");
    let now = coarse_now_ns();
    assert!(now > 30_000_000_000, "the machine has been up for 30 s");
    now - 20_000_000_000
}

fn state_of(bits: u8) -> CtState {
    CtState::of(PROTO_TCP, bits)
}

/// Both entries of the flow `client -> frontend` balanced to `backend`
/// (no SNAT): their states, which must agree.
fn flow_state(fx: &Fixture, client: SocketAddr, frontend: SocketAddr, backend: SocketAddr) -> u8 {
    let (forward, _) = entry(fx, client, frontend).expect("forward entry");
    let (reply, _) = entry(fx, backend, client).expect("reply entry");
    assert_eq!(forward, reply, "both entries of a flow carry its state");
    forward
}

#[test]
fn a_connection_goes_through_its_states_in_both_entries() {
    for f in [V4, V6] {
        let mut fx = fixture(
            "a_connection_goes_through_its_states_in_both_entries",
            &f,
            &[f.backend_a],
            &[],
        );
        let client = sa(f.client, 40000);
        let vip = sa(f.vip, 80);
        let backend = sa(f.backend_a, 8080);
        let (_, to) = pass(&mut fx, Hook::TcPod, &tcp(client, vip, SYN));
        assert_eq!(to, backend, "{}: dst hasn't been NATed", f.name);
        let state = flow_state(&fx, client, vip, backend);
        assert_eq!(state_of(state), CtState::SynSent, "{}", f.name);

        let (from, _) = pass(&mut fx, Hook::TcPod, &tcp(backend, client, SYN | ACK));
        assert_eq!(from, vip, "{}: reply not reverse-NATed", f.name);
        let state = flow_state(&fx, client, vip, backend);
        assert_eq!(state, CT_REPLIED, "{}: the SYN-ACK established it", f.name);
        assert_eq!(state_of(state), CtState::Established);

        // Within a second of the last write, a packet that changes nothing
        // does not write the time again.
        let (_, stamped) = entry(&fx, client, vip).expect("entry");
        pass(&mut fx, Hook::TcPod, &tcp(client, vip, ACK));
        let (_, after) = entry(&fx, client, vip).expect("entry");
        assert_eq!(after, stamped, "{}: last seen written per packet", f.name);

        pass(&mut fx, Hook::TcPod, &tcp(client, vip, ACK));
        pass(&mut fx, Hook::TcPod, &tcp(client, vip, FIN | ACK));
        let state = flow_state(&fx, client, vip, backend);
        assert_eq!(state, CT_REPLIED | CT_FIN_FORWARD, "{}", f.name);
        assert_eq!(state_of(state), CtState::CloseWait);

        pass(&mut fx, Hook::TcPod, &tcp(backend, client, FIN | ACK));
        let state = flow_state(&fx, client, vip, backend);
        assert_eq!(
            state,
            CT_REPLIED | CT_FIN_FORWARD | CT_FIN_REPLY,
            "{}",
            f.name
        );
        assert_eq!(state_of(state), CtState::TimeWait);

        // A FIN before any answer closes nothing.
        let early = sa(f.client, 40002);
        pass(&mut fx, Hook::TcPod, &tcp(early, vip, SYN));
        pass(&mut fx, Hook::TcPod, &tcp(early, vip, FIN | ACK));
        let state = flow_state(&fx, early, vip, backend);
        assert_eq!(state_of(state), CtState::SynSent, "{}", f.name);

        // A UDP flow: unreplied until the backend answers.
        let dns = sa(f.vip, 53);
        let dns_backend = sa(f.backend_a, 5353);
        let (_, to) = pass(&mut fx, Hook::TcPod, &udp(client, dns));
        assert_eq!(to, dns_backend, "{}", f.name);
        let (bits, _) = entry_of(&fx, PROTO_UDP, client, dns).expect("UDP entry");
        assert_eq!(CtState::of(PROTO_UDP, bits), CtState::Unreplied);
        pass(&mut fx, Hook::TcPod, &udp(dns_backend, client));
        for (src, dst) in [(client, dns), (dns_backend, client)] {
            let (bits, _) = entry_of(&fx, PROTO_UDP, src, dst).expect("UDP entry");
            assert_eq!(CtState::of(PROTO_UDP, bits), CtState::Replied, "{}", f.name);
        }

        // Another connection, reset by the backend.
        let client2 = sa(f.client, 40001);
        pass(&mut fx, Hook::TcPod, &tcp(client2, vip, SYN));
        pass(&mut fx, Hook::TcPod, &tcp(backend, client2, RST | ACK));
        let state = flow_state(&fx, client2, vip, backend);
        assert_eq!(state, CT_REPLIED | CT_RST, "{}", f.name);
        assert_eq!(state_of(state), CtState::Closed);
    }
}

#[test]
fn an_expired_entry_is_absent_and_the_packet_starts_a_new_flow() {
    for f in [V4, V6] {
        let mut fx = fixture(
            "an_expired_entry_is_absent_and_the_packet_starts_a_new_flow",
            &f,
            &[f.backend_a],
            &[],
        );
        let client = sa(f.client, 40000);
        let vip = sa(f.vip, 80);
        let backend = sa(f.backend_a, 8080);
        pass(&mut fx, Hook::TcPod, &tcp(client, vip, SYN));
        pass(&mut fx, Hook::TcPod, &tcp(backend, client, SYN | ACK));
        let forwarded = fx.count(Reason::CtForward);
        pass(&mut fx, Hook::TcPod, &tcp(client, vip, ACK));
        assert_eq!(fx.count(Reason::CtForward), forwarded + 1, "{}", f.name);

        // Idle for longer than the established timeout.
        let long_ago = idle_past_established(&mut fx);
        age(&mut fx, client, vip, long_ago);
        let new_flows = fx.count(Reason::NewFlow);
        let (_, to) = pass(&mut fx, Hook::TcPod, &tcp(client, vip, ACK));
        assert_eq!(to, backend, "{}", f.name);
        assert_eq!(
            fx.count(Reason::NewFlow),
            new_flows + 1,
            "{}: an expired entry must not be followed",
            f.name
        );
        assert_eq!(fx.count(Reason::CtForward), forwarded + 1, "{}", f.name);
        let (state, last_seen) = entry(&fx, client, vip).expect("a fresh entry");
        assert_eq!(state, 0, "{}: the new flow starts over", f.name);
        assert!(last_seen > long_ago, "{}", f.name);
    }
}

#[test]
fn a_syn_on_a_closed_tuple_or_a_departed_backend_is_balanced_among_current_members() {
    for f in [V4, V6] {
        let test =
            "a_syn_on_a_closed_tuple_or_a_departed_backend_is_balanced_among_current_members";
        // Backend A serves `web` and `other`; `web` then drops it, so A
        // stays programmed (the old check only asked that).
        let mut fx = fixture(test, &f, &[f.backend_a], &[f.backend_a]);
        let vip = sa(f.vip, 80);
        let a = sa(f.backend_a, 8080);
        let b = sa(f.backend_b, 8080);
        let closed = sa(f.client, 40000);
        let live = sa(f.client, 40001);
        for client in [closed, live] {
            let (_, to) = pass(&mut fx, Hook::TcPod, &tcp(client, vip, SYN));
            assert_eq!(to, a, "{}", f.name);
            pass(&mut fx, Hook::TcPod, &tcp(a, client, SYN | ACK));
        }
        // While A is a member, a SYN reusing the live tuple keeps it.
        let (_, to) = pass(&mut fx, Hook::TcPod, &tcp(live, vip, SYN));
        assert_eq!(to, a, "{}: a retransmitted SYN keeps its backend", f.name);
        pass(&mut fx, Hook::TcPod, &tcp(closed, vip, RST | ACK));

        fx.apply(&desired(&f, &[f.backend_b], &[f.backend_a]));
        for client in [closed, live] {
            let (_, to) = pass(&mut fx, Hook::TcPod, &tcp(client, vip, SYN));
            assert_eq!(
                to, b,
                "{}: a new connection on {client} went to the backend that left",
                f.name
            );
        }
        // The closed tuple, back on a member: a fresh SYN after its close
        // is a new flow even when the backend is the same.
        pass(&mut fx, Hook::TcPod, &tcp(closed, vip, RST | ACK));
        let new_flows = fx.count(Reason::NewFlow);
        pass(&mut fx, Hook::TcPod, &tcp(closed, vip, SYN));
        assert_eq!(fx.count(Reason::NewFlow), new_flows + 1, "{}", f.name);
    }
}

/// The SNAT port a NodePort SYN from `client` was given, after checking it
/// went to the remote backend from this node.
fn snat_syn(fx: &mut Fixture, f: &Family, client: SocketAddr) -> SocketAddr {
    let node_port = sa(f.node, NODE_PORT);
    let (from, to) = pass(fx, Hook::Xdp, &tcp(client, node_port, SYN));
    assert_eq!(to, sa(f.remote, 8080), "{}: dst hasn't been NATed", f.name);
    assert_eq!(from.ip(), f.node, "{}: src hasn't been SNATed", f.name);
    assert!(SNAT_PORTS.contains(&from.port()), "{}: {from}", f.name);
    from
}

#[test]
fn ten_thousand_short_flows_through_one_snat_backend_leave_ports_for_the_next() {
    for f in [V4, V6] {
        let mut fx = fixture(
            "ten_thousand_short_flows_through_one_snat_backend_leave_ports_for_the_next",
            &f,
            &[],
            &[],
        );
        let node_port = sa(f.node, NODE_PORT);
        let remote = sa(f.remote, 8080);
        // More flows than the 4523 ports, each closed before the next:
        // half reset by the client, half closed with FINs both ways.
        for i in 0..10_000u32 {
            let client = sa(f.external, 10_000 + (i % 50_000) as u16);
            let snat = snat_syn(&mut fx, &f, client);
            pass(&mut fx, Hook::Xdp, &tcp(remote, snat, SYN | ACK));
            if i % 2 == 0 {
                pass(&mut fx, Hook::Xdp, &tcp(client, node_port, RST | ACK));
            } else {
                pass(&mut fx, Hook::Xdp, &tcp(client, node_port, FIN | ACK));
                let (from, to) = pass(&mut fx, Hook::Xdp, &tcp(remote, snat, FIN | ACK));
                assert_eq!((from, to), (node_port, client), "{}", f.name);
            }
        }
        let client = sa(f.external, 65000);
        snat_syn(&mut fx, &f, client);
        assert_eq!(fx.count(Reason::DropSnatExhausted), 0, "{}", f.name);
        assert_eq!(fx.count(Reason::DropCtFull), 0, "{}", f.name);
    }
}

/// One backend behind the node address has 4523 SNAT ports (61000-65522):
/// new flows from many clients (addresses and ports spread as real ones
/// are), each left open and unanswered (live for a minute), keep getting
/// distinct free ports until the range is nearly full; the next is dropped
/// as `drop_snat_exhausted`, and established flows are untouched.
#[test]
fn live_flows_on_every_snat_port_drop_the_next_as_exhausted() {
    for f in [V4, V6] {
        let mut fx = fixture(
            "live_flows_on_every_snat_port_drop_the_next_as_exhausted",
            &f,
            &[],
            &[],
        );
        let node_port = sa(f.node, NODE_PORT);
        let mut taken = std::collections::BTreeSet::new();
        let mut x: u32 = 12_345;
        let clients: Vec<SocketAddr> = (0..4600u32)
            .map(|k| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345) & 0x7fff_ffff;
                let [_, _, c, d] = k.to_be_bytes();
                let addr = match f.external {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(198, 18, c, d)),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(
                        0x2001,
                        0xdb8,
                        0x18,
                        0,
                        0,
                        0,
                        u16::from(c),
                        u16::from(d),
                    )),
                };
                sa(addr, 1024 + ((x >> 8) % 60_000) as u16)
            })
            .collect();
        let mut refused = None;
        for (k, client) in clients.iter().enumerate() {
            let (verdict, out) = fx.run(Hook::Xdp, &tcp(*client, node_port, SYN));
            if verdict != Hook::Xdp.pass() {
                refused = Some(k);
                break;
            }
            let from = match Packet::parse(&out) {
                Ok(p) => p.ports().expect("ports").0,
                Err(_) => {
                    Packet6::parse(&out)
                        .expect("packet")
                        .ports()
                        .expect("ports")
                        .0
                }
            };
            assert!(SNAT_PORTS.contains(&from), "{}: flow {k}: {from}", f.name);
            assert!(taken.insert(from), "{}: port {from} given twice", f.name);
        }
        let refused = refused.expect("4600 flows cannot fit 4523 ports");
        eprintln!(
            "{}: {} of 4523 SNAT ports taken before the first refusal",
            f.name,
            taken.len()
        );
        // Probing is bounded (64 candidates), so the last few percent of
        // free ports may go unfound; before 3900 ports would mean the
        // probing itself is broken (linear probing of 8 ports refused a
        // flow after 1674).
        assert!(taken.len() >= 3900, "{}: refused at flow {refused}", f.name);
        assert_eq!(fx.count(Reason::DropSnatExhausted), 1, "{}", f.name);
        assert_eq!(fx.count(Reason::DropCtFull), 0, "{}", f.name);
        let (from, to) = pass(&mut fx, Hook::Xdp, &tcp(clients[0], node_port, ACK));
        assert_eq!((from.ip(), to), (f.node, sa(f.remote, 8080)), "{}", f.name);
    }
}

#[test]
fn one_client_port_to_two_frontends_sharing_a_backend_keeps_both_flows() {
    for f in [V4, V6] {
        let mut fx = fixture(
            "one_client_port_to_two_frontends_sharing_a_backend_keeps_both_flows",
            &f,
            &[f.backend_a],
            &[f.backend_a],
        );
        let client = sa(f.client, 40000);
        let vip = sa(f.vip, 80);
        let vip2 = sa(f.vip2, 80);
        let backend = sa(f.backend_a, 8080);
        let (from1, to1) = pass(&mut fx, Hook::TcPod, &tcp(client, vip, SYN));
        assert_eq!((from1, to1), (client, backend), "{}", f.name);
        let (from2, to2) = pass(&mut fx, Hook::TcPod, &tcp(client, vip2, SYN));
        assert_eq!(to2, backend, "{}", f.name);
        assert_eq!(
            from2.ip(),
            f.client,
            "{}: the client keeps its address",
            f.name
        );
        assert_ne!(
            from2.port(),
            40000,
            "{}: the second flow needs a port of its own",
            f.name
        );
        // Each reply goes back as its own frontend.
        let reply1 = pass(&mut fx, Hook::TcPod, &tcp(backend, client, SYN | ACK));
        assert_eq!(reply1, (vip, client), "{}: first flow's reply", f.name);
        let reply2 = pass(&mut fx, Hook::TcPod, &tcp(backend, from2, SYN | ACK));
        assert_eq!(reply2, (vip2, client), "{}: second flow's reply", f.name);
        // And both keep going.
        assert_eq!(
            pass(&mut fx, Hook::TcPod, &tcp(client, vip, ACK)),
            (client, backend)
        );
        assert_eq!(
            pass(&mut fx, Hook::TcPod, &tcp(client, vip2, ACK)),
            (from2, backend)
        );
    }
}

#[test]
fn the_collector_removes_expired_entries_and_keeps_live_ones() {
    for f in [V4, V6] {
        let mut fx = fixture(
            "the_collector_removes_expired_entries_and_keeps_live_ones",
            &f,
            &[f.backend_a],
            &[],
        );
        let vip = sa(f.vip, 80);
        let backend = sa(f.backend_a, 8080);
        let old = sa(f.client, 40000);
        let live = sa(f.client, 40001);
        for client in [old, live] {
            pass(&mut fx, Hook::TcPod, &tcp(client, vip, SYN));
            pass(&mut fx, Hook::TcPod, &tcp(backend, client, SYN | ACK));
        }
        let long_ago = idle_past_established(&mut fx);
        age(&mut fx, old, vip, long_ago);
        age(&mut fx, backend, old, long_ago);
        let timeouts = fx.tables.config().expect("config").ct;
        let mut sweeper = Sweeper::default();
        let report = sweeper
            .sweep(&mut fx.tables, &timeouts, coarse_now_ns(), 1 << 20)
            .expect("sweep");
        let collected: u64 = report.collected.values().sum();
        assert_eq!(collected, 2, "{}: both entries of the idle flow", f.name);
        assert!(entry(&fx, old, vip).is_none(), "{}", f.name);
        assert!(entry(&fx, backend, old).is_none(), "{}", f.name);
        assert!(entry(&fx, live, vip).is_some(), "{}", f.name);
        assert!(entry(&fx, backend, live).is_some(), "{}", f.name);
        let census = &report.completed[f.name];
        assert_eq!(census.by_state.get("established"), Some(&2), "{}", f.name);

        // More entries than one batch reads: a small budget walks them in
        // slices, each sweep going on where the last stopped.
        for port in 0..3000u16 {
            pass(
                &mut fx,
                Hook::TcPod,
                &tcp(sa(f.client, 20_000 + port), vip, SYN),
            );
        }
        let mut sweeps = 0;
        let census = loop {
            sweeps += 1;
            let report = sweeper
                .sweep(&mut fx.tables, &timeouts, coarse_now_ns(), 1)
                .expect("sweep");
            if let Some(census) = report.completed.get(f.name) {
                break census.clone();
            }
            assert!(sweeps < 10, "{}: the walk never completed", f.name);
        };
        assert!(sweeps > 1, "{}: 6002 entries read in one slice", f.name);
        assert_eq!(census.by_state.get("syn_sent"), Some(&6000), "{}", f.name);
        assert_eq!(census.by_state.get("established"), Some(&2), "{}", f.name);
    }
}
