//! In-kernel fixtures for Maglev selection (`--lb-algorithm maglev`): the
//! real programs, loaded twice as two nodes' agents would load them, each
//! programmed by its own `Programmer` from the same EndpointSlice, pick the
//! same backend for the same 5-tuple; the pick is the one the table builder
//! and the flow hash predict; removing a backend moves almost no other
//! flow; conntrack still pins established flows.

use std::net::{IpAddr, Ipv4Addr};

use lb_agent::{
    maglev::{BackendIdentity, build_table},
    model::{DesiredTables, Frontend, FrontendKind, Protocol},
};
use lb_common::{
    conntrack::Lb4CtKey,
    maglev::{DEFAULT_TABLE_SIZE, flow_hash},
    stats::Reason,
};
use lb_tests::{
    fixture::{Fixture, Hook, spec},
    packet::{ACK, Packet, SYN},
};

const M: u32 = DEFAULT_TABLE_SIZE;
const NODE_1: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
const NODE_2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 12);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const OTHER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
const PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;

/// Backends on node 1 (10.244.1.0/24) and node 2 (10.244.2.0/24).
fn backends(count: u8) -> Vec<Ipv4Addr> {
    (0..count)
        .map(|i| Ipv4Addr::new(10, 244, 1 + i % 2, 11 + i))
        .collect()
}

/// The LoadBalancer frontend as `node` sees it (its own pods are local),
/// with the EndpointSlice listed in `order`; `other` adds an unrelated
/// service first, so this agent hands out other ids.
fn desired(pods: &[Ipv4Addr], node: u8, other: bool) -> DesiredTables {
    let list: Vec<(Ipv4Addr, u16, bool)> = pods
        .iter()
        .map(|a| (*a, TARGET_PORT, a.octets()[2] == node))
        .collect();
    let mut tables = DesiredTables::default();
    if other {
        tables.frontends.insert(
            Frontend::new(IpAddr::V4(OTHER_IP), PORT, Protocol::Tcp),
            spec(
                "other",
                "http",
                FrontendKind::LoadBalancer,
                &[(Ipv4Addr::new(10, 244, 9, 9), 9090, false)],
            ),
        );
    }
    tables.frontends.insert(
        Frontend::new(IpAddr::V4(LB_IP), PORT, Protocol::Tcp),
        spec("web", "http", FrontendKind::LoadBalancer, &list),
    );
    tables
}

fn node(test: &str, address: Ipv4Addr, desired: &DesiredTables) -> Fixture {
    let mut fx = Fixture::with_maglev(test, desired, M);
    fx.set_node_address(address);
    fx
}

/// The backend the first packet of `(CLIENT, port) -> LB_IP:PORT` reaches
/// through `fx`'s XDP program.
fn first_packet(fx: &mut Fixture, port: u16) -> Ipv4Addr {
    let out = fx.pass(
        Hook::Xdp,
        &Packet::tcp((CLIENT, port), (LB_IP, PORT), SYN, b""),
    );
    assert_eq!(out.ports().map(|p| p.1), Some(TARGET_PORT));
    out.dst
}

/// What the builder and the flow hash say the backend of that flow is.
fn predicted(pods: &[Ipv4Addr], port: u16) -> Ipv4Addr {
    let identities: Vec<BackendIdentity> = pods
        .iter()
        .map(|a| BackendIdentity {
            addr: IpAddr::V4(*a),
            port: TARGET_PORT,
        })
        .collect();
    let table = build_table(&identities, M).expect("table");
    let key = Lb4CtKey {
        src_addr: CLIENT.octets(),
        dst_addr: LB_IP.octets(),
        src_port: port,
        dst_port: PORT,
        proto: 6,
        _pad: [0; 3],
    };
    pods[table[(flow_hash(&key) % M) as usize] as usize]
}

#[test]
fn two_nodes_pick_the_same_backend_for_the_same_flow() {
    let test = "two_nodes_pick_the_same_backend_for_the_same_flow";
    let pods = backends(5);
    let mut one = node(test, NODE_1, &desired(&pods, 1, false));
    // Node 2's agent saw another service first and lists the slice in
    // another order: its service and backend ids differ.
    let mut reversed = pods.clone();
    reversed.reverse();
    let mut two = node(test, NODE_2, &desired(&reversed, 2, true));

    let flows = 500u16;
    let mut per_backend = std::collections::BTreeMap::new();
    for port in 40000..40000 + flows {
        let a = first_packet(&mut one, port);
        let b = first_packet(&mut two, port);
        assert_eq!(a, b, "flow from port {port}: node 1 chose {a}, node 2 {b}");
        assert_eq!(a, predicted(&pods, port), "flow from port {port}");
        *per_backend.entry(a).or_insert(0u32) += 1;
    }
    println!("{flows} flows, the same backend on both nodes: {per_backend:?}");
    assert_eq!(per_backend.len(), pods.len(), "some backend got no flow");
    for fx in [&one, &two] {
        assert_eq!(fx.count(Reason::NewFlowMaglev), u64::from(flows));
        assert_eq!(fx.count(Reason::NewFlow), 0, "a flow fell back to random");
    }
}

#[test]
fn removing_a_backend_moves_almost_no_other_flow() {
    let test = "removing_a_backend_moves_almost_no_other_flow";
    let pods = backends(10);
    let removed = pods[3];
    let rest: Vec<Ipv4Addr> = pods.iter().copied().filter(|a| *a != removed).collect();
    // Node 1 before the change; node 2 after it (fresh conntrack on both,
    // so each first packet is a Maglev pick).
    let mut before = node(test, NODE_1, &desired(&pods, 1, false));
    let mut after = node(test, NODE_2, &desired(&pods, 2, false));
    after.apply(&desired(&rest, 2, false));

    let (mut others, mut moved) = (0u32, 0u32);
    for port in 20000..22000 {
        let was = first_packet(&mut before, port);
        let now = first_packet(&mut after, port);
        assert_ne!(now, removed, "a flow still reaches the removed backend");
        assert_eq!(now, predicted(&rest, port), "flow from port {port}");
        if was != removed {
            others += 1;
            moved += u32::from(was != now);
        }
    }
    let share = 100.0 * f64::from(moved) / f64::from(others);
    println!("removing 1 of 10 backends moved {moved} of {others} other flows ({share:.2}%)");
    assert!(share <= 2.0, "{share:.2}% of the other flows moved");
}

#[test]
fn conntrack_keeps_an_established_flow_on_its_backend_when_the_table_changes() {
    let test = "conntrack_keeps_an_established_flow_on_its_backend_when_the_table_changes";
    let pods = backends(3);
    let more = backends(6);
    // A flow whose Maglev pick changes when three backends join.
    let port = (30000..31000)
        .find(|p| predicted(&pods, *p) != predicted(&more, *p))
        .expect("some flow moves when backends double");
    let mut fx = node(test, NODE_1, &desired(&pods, 1, false));
    let first = first_packet(&mut fx, port);
    assert_eq!(first, predicted(&pods, port));

    fx.apply(&desired(&more, 1, false));
    let out = fx.pass(
        Hook::Xdp,
        &Packet::tcp((CLIENT, port), (LB_IP, PORT), ACK, b"data"),
    );
    assert_eq!(out.dst, first, "the established flow changed backend");
    // A new flow with that hash would go elsewhere now.
    assert_eq!(first_packet(&mut fx, port + 1), predicted(&more, port + 1));
}

#[test]
fn without_maglev_the_same_flows_are_balanced_at_random() {
    let test = "without_maglev_the_same_flows_are_balanced_at_random";
    let pods = backends(5);
    let mut fx = Fixture::new(test, &desired(&pods, 1, false));
    fx.set_node_address(NODE_1);
    let mut agree = 0;
    for port in 40000..40200 {
        agree += u32::from(first_packet(&mut fx, port) == predicted(&pods, port));
    }
    assert_eq!(fx.count(Reason::NewFlow), 200);
    assert_eq!(fx.count(Reason::NewFlowMaglev), 0);
    // Random picks agree with Maglev's about 1 time in 5, not always.
    assert!(agree < 120, "{agree} of 200 random picks matched Maglev's");
}
