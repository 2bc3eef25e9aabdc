//! In-kernel fixtures for the IPv6 datapath: the real TC and XDP programs,
//! with LB6 maps programmed by the real agent code, run on crafted IPv6
//! packets through BPF_PROG_TEST_RUN. Each case checks the verdict, the
//! rewritten bytes (the L4 checksum recomputed here over the IPv6
//! pseudo-header, never trusted from the kernel) and the counters.

use std::net::{IpAddr, Ipv6Addr};

use lb_agent::model::{DesiredTables, Frontend, FrontendKind, Protocol, Scope, SourceRange};
use lb_common::{
    HAIRPIN_ADDR6,
    conntrack::{DIR_FORWARD, DIR_REPLY},
    stats::Reason,
};
use lb_tests::{
    Trace,
    fixture::{Fixture, Hook, spec6},
    lbctl_json,
    packet::{ACK, SYN, Transport},
    packet6::{ExtHeader, Packet6, icmpv6_error, neighbour_solicitation, quoted_packet},
};

const CLIENT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 2);
const VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const EMPTY_VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x20);
/// A ClusterIP whose only endpoint is POD_A.
const SELF_VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x30);
const HAIRPIN: Ipv6Addr = Ipv6Addr::from_octets(HAIRPIN_ADDR6);
/// TC's verdict for a packet sent straight back out of its device.
const TC_ACT_REDIRECT: u32 = 7;
const POD_A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0x11);
const POD_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0x12);
/// A pod of another node.
const REMOTE_POD: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 2, 0, 0, 0, 0, 0x11);
/// This node's address, and a client outside the cluster.
const NODE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11);
const EXT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);

/// A LoadBalancer address with loadBalancerSourceRanges 2001:db8::/64, and
/// a client outside it.
const LB_IP: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x10);
const DENIED: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb9, 0, 0, 0, 0, 0, 0x100);
const NODE_PORT: u16 = 30080;
/// A port of the ClusterIP with sessionAffinity ClientIP.
const STICKY_PORT: u16 = 443;
const NODE_PORT_REMOTE: u16 = 30081;
/// externalTrafficPolicy Local: one endpoint here and one elsewhere, and
/// one with its only endpoint elsewhere.
const LOCAL_POLICY: u16 = 30090;
const LOCAL_POLICY_EMPTY: u16 = 30091;

fn frontend(addr: Ipv6Addr, port: u16, protocol: Protocol) -> Frontend {
    Frontend::new(IpAddr::V6(addr), port, protocol)
}

/// The entry this node's pods use for a frontend with externalTrafficPolicy
/// Local.
fn internal(addr: Ipv6Addr, port: u16) -> Frontend {
    Frontend {
        scope: Scope::Internal,
        ..frontend(addr, port, Protocol::Tcp)
    }
}

fn desired() -> DesiredTables {
    let np = FrontendKind::NodePort;
    let ci = FrontendKind::ClusterIp;
    let pods = [(POD_A, 8080, true), (POD_B, 8080, true)];
    DesiredTables {
        frontends: [
            (
                frontend(VIP, 80, Protocol::Tcp),
                spec6("web", "http", ci, &pods),
            ),
            (
                frontend(VIP, 53, Protocol::Udp),
                spec6("web", "dns", ci, &[(POD_A, 5353, true)]),
            ),
            (
                frontend(EMPTY_VIP, 80, Protocol::Tcp),
                spec6("empty", "http", ci, &[]),
            ),
            (
                frontend(SELF_VIP, 80, Protocol::Tcp),
                spec6("self", "http", ci, &[(POD_A, 8080, true)]),
            ),
            (
                frontend(EMPTY_VIP, 53, Protocol::Udp),
                spec6("empty", "dns", ci, &[]),
            ),
            (frontend(VIP, STICKY_PORT, Protocol::Tcp), {
                let mut sticky = spec6("sticky", "https", ci, &pods);
                sticky.affinity_timeout = Some(10800);
                sticky
            }),
            (frontend(LB_IP, 443, Protocol::Tcp), {
                let mut lb = spec6("lb", "https", FrontendKind::LoadBalancer, &pods);
                lb.source_ranges = vec![SourceRange {
                    addr: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0)),
                    prefix_len: 64,
                }];
                lb
            }),
            (
                frontend(NODE, NODE_PORT, Protocol::Tcp),
                spec6("web", "http", np, &[(POD_A, 8080, true)]),
            ),
            (frontend(NODE, LOCAL_POLICY, Protocol::Tcp), {
                let mut local = spec6("etp-local", "http", np, &[(POD_A, 8080, true)]);
                local.local_only = true;
                local
            }),
            (
                internal(NODE, LOCAL_POLICY),
                spec6(
                    "etp-local",
                    "http",
                    np,
                    &[(POD_A, 8080, true), (REMOTE_POD, 8080, false)],
                ),
            ),
            (frontend(NODE, LOCAL_POLICY_EMPTY, Protocol::Tcp), {
                let mut local = spec6("etp-local-empty", "http", np, &[]);
                local.local_only = true;
                local
            }),
            (
                internal(NODE, LOCAL_POLICY_EMPTY),
                spec6("etp-local-empty", "http", np, &[(REMOTE_POD, 8080, false)]),
            ),
            (
                frontend(NODE, NODE_PORT_REMOTE, Protocol::Tcp),
                spec6("remote", "http", np, &[(REMOTE_POD, 8080, false)]),
            ),
        ]
        .into_iter()
        .collect(),
        ..DesiredTables::default()
    }
}

fn fixture(test: &str) -> Fixture {
    Fixture::new(test, &desired())
}

fn syn(src_port: u16) -> Packet6 {
    Packet6::tcp((CLIENT, src_port), (VIP, 80), SYN, b"")
}

fn is_backend(addr: Ipv6Addr) -> bool {
    addr == POD_A || addr == POD_B
}

#[test]
fn ipv6_syn_to_a_cluster_ip_is_translated_and_the_flow_is_tracked_both_ways() {
    let mut fx =
        fixture("ipv6_syn_to_a_cluster_ip_is_translated_and_the_flow_is_tracked_both_ways");
    let before = fx.count(Reason::NewFlow);
    let out = fx.pass6(Hook::TcPod, &syn(40000));
    assert!(is_backend(out.dst), "dst IP hasn't been NATed: {}", out.dst);
    assert_eq!(
        out.ports(),
        Some((40000, 8080)),
        "dst port hasn't been NATed"
    );
    assert_eq!(out.src, CLIENT, "src IP must not change on the way in");
    assert_eq!(fx.count(Reason::NewFlow), before + 1, "new_flow counter");

    let ct = fx.tables.dump_conntrack6().expect("conntrack6");
    assert!(
        ct.iter().any(|(k, v)| k.src_addr == out.dst.octets()
            && k.dst_addr == CLIENT.octets()
            && k.src_port == 8080
            && k.dst_port == 40000
            && k.proto == 6
            && v.direction == DIR_REPLY
            && v.src_addr == VIP.octets()
            && v.src_port == 80),
        "no reply entry for the flow: {ct:?}"
    );
    assert!(
        ct.iter().any(|(k, v)| k.src_addr == CLIENT.octets()
            && k.dst_addr == VIP.octets()
            && v.direction == DIR_FORWARD
            && v.dst_addr == out.dst.octets()
            && v.dst_port == 8080),
        "no forward entry for the flow: {ct:?}"
    );
    assert!(
        fx.tables.dump_conntrack().expect("conntrack").is_empty(),
        "an IPv6 flow was written into the IPv4 table"
    );
}

#[test]
fn ipv6_established_flow_keeps_its_backend_and_replies_are_reverse_translated() {
    let mut fx =
        fixture("ipv6_established_flow_keeps_its_backend_and_replies_are_reverse_translated");
    let chosen = fx.pass6(Hook::TcPod, &syn(40001)).dst;
    let forward = fx.count(Reason::CtForward);
    for i in 0..10u8 {
        let data = Packet6::tcp((CLIENT, 40001), (VIP, 80), ACK, &[i; 33]);
        let out = fx.pass6(Hook::TcPod, &data);
        assert_eq!(
            out.dst, chosen,
            "packet {i} of an established flow changed backend"
        );
        assert_eq!(out.payload, vec![i; 33], "payload changed");
    }
    assert_eq!(
        fx.count(Reason::CtForward),
        forward + 10,
        "ct_forward counter"
    );
    let before = fx.count(Reason::CtReply);
    let reply = Packet6::tcp((chosen, 8080), (CLIENT, 40001), SYN | ACK, b"");
    // The backend's reply comes in on its own veth (TC) or, from another
    // node, through the node device (XDP): both translate it back.
    for hook in [Hook::TcPod, Hook::Xdp] {
        let out = fx.pass6(hook, &reply);
        assert_eq!(
            out.src, VIP,
            "{hook:?}: reply src IP hasn't been reverse-NATed"
        );
        assert_eq!(
            out.ports(),
            Some((80, 40001)),
            "{hook:?}: reply src port hasn't been reverse-NATed"
        );
        assert_eq!(out.dst, CLIENT, "{hook:?}: reply dst must stay the client");
        assert!(
            matches!(out.transport, Transport::Tcp { flags, .. } if flags == SYN | ACK),
            "{hook:?}: TCP flags changed"
        );
    }
    assert_eq!(fx.count(Reason::CtReply), before + 2, "ct_reply counter");
}

#[test]
fn ipv6_udp_is_translated_both_ways_with_valid_checksums() {
    let mut fx = fixture("ipv6_udp_is_translated_both_ways_with_valid_checksums");
    let query = Packet6::udp((CLIENT, 41000), (VIP, 53), b"which pod are you?");
    for hook in [Hook::TcPod, Hook::Xdp] {
        let out = fx.pass6(hook, &query);
        assert_eq!(out.dst, POD_A, "{hook:?}: dst IP hasn't been NATed");
        assert_eq!(out.ports(), Some((41000, 5353)), "{hook:?}: dst port");
        assert_eq!(out.payload, query.payload, "{hook:?}: payload changed");
        let answer = Packet6::udp((POD_A, 5353), (CLIENT, 41000), b"pod-a");
        let back = fx.pass6(hook, &answer);
        assert_eq!(
            back.src, VIP,
            "{hook:?}: reply src IP hasn't been reverse-NATed"
        );
        assert_eq!(back.ports(), Some((53, 41000)), "{hook:?}: reply src port");
    }
}

#[test]
fn ipv6_node_port_from_outside_reaches_a_local_backend_with_the_client_address_kept() {
    let mut fx =
        fixture("ipv6_node_port_from_outside_reaches_a_local_backend_with_the_client_address_kept");
    for (hook, port) in [(Hook::Xdp, 50000), (Hook::TcNode, 50001)] {
        let out = fx.pass6(
            hook,
            &Packet6::tcp((EXT, port), (NODE, NODE_PORT), SYN, b""),
        );
        assert_eq!(
            out.dst, POD_A,
            "{hook:?}: NodePort dst IP hasn't been NATed"
        );
        assert_eq!(out.ports(), Some((port, 8080)), "{hook:?}: dst port");
        assert_eq!(out.src, EXT, "{hook:?}: a local backend sees the client");
        // The pod's reply leaves through its veth.
        let reply = Packet6::tcp((POD_A, 8080), (EXT, port), SYN | ACK, b"");
        let back = fx.pass6(Hook::TcPod, &reply);
        assert_eq!(
            back.src, NODE,
            "{hook:?}: reply src IP hasn't been reverse-NATed"
        );
        assert_eq!(
            back.ports(),
            Some((NODE_PORT, port)),
            "{hook:?}: reply src port"
        );
        assert_eq!(back.dst, EXT);
    }
}

#[test]
fn ipv6_node_port_to_a_remote_backend_is_sent_from_the_node_address() {
    let mut fx = fixture("ipv6_node_port_to_a_remote_backend_is_sent_from_the_node_address");
    // Without a node IPv6 address there is nothing to SNAT to: dropped,
    // and no state is left behind.
    let before = fx.count(Reason::DropNoNodeAddress);
    let first = Packet6::tcp((EXT, 50002), (NODE, NODE_PORT_REMOTE), SYN, b"");
    fx.dropped6(Hook::Xdp, &first);
    assert_eq!(fx.count(Reason::DropNoNodeAddress), before + 1);
    assert!(
        fx.tables.dump_conntrack6().expect("conntrack6").is_empty(),
        "a dropped flow left conntrack state"
    );

    fx.set_node_address6(NODE);
    for (hook, port) in [(Hook::Xdp, 50003), (Hook::TcNode, 50004)] {
        let syn = Packet6::tcp((EXT, port), (NODE, NODE_PORT_REMOTE), SYN, b"");
        let out = fx.pass6(hook, &syn);
        assert_eq!(out.dst, REMOTE_POD, "{hook:?}: dst IP hasn't been NATed");
        assert_eq!(
            out.src, NODE,
            "{hook:?}: src IP hasn't been SNATed to the node"
        );
        let (snat_port, dst_port) = out.ports().expect("ports");
        assert_eq!(dst_port, 8080, "{hook:?}: dst port");
        assert!(
            (61000..=65522).contains(&snat_port),
            "{hook:?}: SNAT port {snat_port} outside 61000-65522"
        );
        // The reply comes back from the other node through this one's
        // device: back to the frontend and to the client.
        let reply = Packet6::tcp((REMOTE_POD, 8080), (NODE, snat_port), SYN | ACK, b"");
        let back = fx.pass6(Hook::Xdp, &reply);
        assert_eq!(
            back.src, NODE,
            "{hook:?}: reply src hasn't been reverse-NATed"
        );
        assert_eq!(
            back.dst, EXT,
            "{hook:?}: reply dst hasn't been reverse-SNATed"
        );
        assert_eq!(
            back.ports(),
            Some((NODE_PORT_REMOTE, port)),
            "{hook:?}: reply ports"
        );
        // And the flow goes on with the same translation.
        let data = Packet6::tcp((EXT, port), (NODE, NODE_PORT_REMOTE), ACK, b"data");
        let again = fx.pass6(hook, &data);
        assert_eq!((again.src, again.dst), (NODE, REMOTE_POD), "{hook:?}");
        assert_eq!(again.ports(), Some((snat_port, 8080)), "{hook:?}");
    }
}

#[test]
fn ipv6_extension_headers_before_tcp_are_walked_and_kept() {
    let mut fx = fixture("ipv6_extension_headers_before_tcp_are_walked_and_kept");
    let chain = vec![
        ExtHeader::hop_by_hop(),
        ExtHeader::dest_options(2),
        ExtHeader::routing(VIP),
        // A first fragment carries the TCP header.
        ExtHeader::fragment(0, true, 0x0bad_cafe),
        ExtHeader::dest_options(1),
    ];
    for (hook, port) in [(Hook::TcPod, 42000), (Hook::Xdp, 42001)] {
        let packet = syn(port).with_ext(chain.clone());
        let out = fx.pass6(hook, &packet);
        assert!(
            is_backend(out.dst),
            "{hook:?}: dst IP hasn't been NATed behind the chain"
        );
        assert_eq!(out.ports(), Some((port, 8080)), "{hook:?}: dst port");
        assert_eq!(out.ext, chain, "{hook:?}: extension headers changed");
    }
}

#[test]
fn ipv6_unknown_non_first_fragment_is_never_read_as_ports() {
    let mut fx = fixture("ipv6_unknown_non_first_fragment_is_never_read_as_ports");
    // Payload that reads as ports 40000 -> 80 if misparsed as TCP: a
    // misreading datapath would translate it to a backend. Its first
    // fragment was never seen, so there is nothing to translate it by:
    // to a ClusterIP it is dropped, elsewhere it passes untouched
    // (`tests/datapath_fragments.rs` has the fragments of known datagrams).
    let fragment = |dst: Ipv6Addr| {
        Packet6 {
            dst,
            transport: Transport::Other { protocol: 6 },
            payload: vec![
                0x9c, 0x40, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, SYN, 0xff, 0xff,
            ],
            ..syn(40000)
        }
        .with_ext(vec![
            ExtHeader::hop_by_hop(),
            ExtHeader::fragment(185, false, 7),
        ])
        .emit()
    };
    let (to_vip, to_pod) = (fragment(VIP), fragment(POD_B));
    for hook in [Hook::TcPod, Hook::Xdp, Hook::TcNode] {
        let before = fx.count(Reason::DropFragmentUnknown);
        let (verdict, _) = fx.run(hook, &to_vip);
        assert_eq!(
            verdict,
            hook.drop(),
            "{hook:?}: unknown fragment to a ClusterIP passed"
        );
        assert_eq!(
            fx.count(Reason::DropFragmentUnknown),
            before + 1,
            "{hook:?}: drop_fragment_unknown"
        );
        let before = fx.count(Reason::PassFragment);
        let (verdict, out) = fx.run(hook, &to_pod);
        assert_eq!(verdict, hook.pass(), "{hook:?}: fragment not passed");
        assert_eq!(out, to_pod, "{hook:?}: a non-first fragment was changed");
        assert_eq!(
            fx.count(Reason::PassFragment),
            before + 1,
            "{hook:?}: pass_fragment"
        );
    }
    assert!(fx.tables.dump_conntrack6().expect("conntrack6").is_empty());
}

#[test]
fn ipv6_chain_longer_than_the_walk_passes_untouched() {
    let mut fx = fixture("ipv6_chain_longer_than_the_walk_passes_untouched");
    let chain = (0..7).map(|_| ExtHeader::dest_options(1)).collect();
    let frame = syn(43000).with_ext(chain).emit();
    let before = fx.count(Reason::PassExtHeaderLimit);
    let (verdict, out) = fx.run(Hook::TcPod, &frame);
    assert_eq!(verdict, Hook::TcPod.pass());
    assert_eq!(out, frame, "an unparsed packet was changed");
    assert_eq!(fx.count(Reason::PassExtHeaderLimit), before + 1);
}

#[test]
fn ipv6_traffic_not_for_a_service_is_untouched() {
    let mut fx = fixture("ipv6_traffic_not_for_a_service_is_untouched");
    let cases = [
        (
            Packet6::tcp((CLIENT, 40000), (POD_B, 80), SYN, b"").emit(),
            Reason::PassNotService,
        ),
        // Not a connection attempt, to a port the ClusterIP does not define.
        (
            Packet6::tcp((CLIENT, 40000), (VIP, 81), ACK, b"").emit(),
            Reason::PassNotService,
        ),
        (neighbour_solicitation(CLIENT, POD_A), Reason::PassOtherL4),
    ];
    for (frame, reason) in cases {
        for hook in [Hook::TcPod, Hook::Xdp] {
            let before = fx.count(reason);
            let (verdict, out) = fx.run(hook, &frame);
            assert_eq!(
                verdict,
                hook.pass(),
                "{hook:?}: {reason:?} packet not passed"
            );
            assert_eq!(out, frame, "{hook:?}: {reason:?} packet changed");
            assert_eq!(fx.count(reason), before + 1, "{hook:?}: {reason:?} counter");
        }
    }
}

#[test]
fn ipv6_service_without_endpoints_answers_port_unreachable() {
    let mut fx = fixture("ipv6_service_without_endpoints_answers_port_unreachable");
    let attempts = [
        Packet6::tcp((CLIENT, 40000), (EMPTY_VIP, 80), SYN, b""),
        Packet6::udp((CLIENT, 40001), (EMPTY_VIP, 53), b"query"),
    ];
    // TC sends it back with bpf_redirect (TC_ACT_REDIRECT), XDP with XDP_TX.
    for (hook, sent_back) in [(Hook::TcPod, 7), (Hook::Xdp, 3)] {
        for packet in &attempts {
            let frame = packet.emit();
            let before = fx.count(Reason::DropNoBackend);
            let (verdict, out) = fx.run(hook, &frame);
            assert_eq!(verdict, sent_back, "{hook:?}: {packet:?} not answered");
            assert_eq!(fx.count(Reason::DropNoBackend), before + 1);
            assert_eq!(out[0..6], frame[6..12], "{hook:?}: not addressed back");
            // parse verifies the ICMPv6 checksum over the pseudo-header.
            let reply = Packet6::parse(&out)
                .unwrap_or_else(|e| panic!("{hook:?}: reply to {packet:?} is broken: {e}"));
            assert_eq!(reply.src, EMPTY_VIP, "{hook:?}: from the address tried");
            assert_eq!(reply.dst, CLIENT, "{hook:?}: to the client");
            assert_eq!(reply.transport, Transport::Other { protocol: 58 });
            let icmp = &reply.payload;
            assert_eq!(
                icmp[0..2],
                [1, 4],
                "{hook:?}: not destination/port unreachable"
            );
            assert_eq!(
                icmp[8..],
                frame[14..14 + 48],
                "{hook:?}: the quote is not the original IPv6 header and 8 bytes"
            );
        }
    }
    // Not a connection attempt: dropped silently.
    let before = fx.count(Reason::DropNoBackend);
    fx.dropped6(
        Hook::TcPod,
        &Packet6::tcp((CLIENT, 40002), (EMPTY_VIP, 80), ACK, b""),
    );
    assert_eq!(fx.count(Reason::DropNoBackend), before + 1);
}

#[test]
fn lbctl_shows_ipv6_services_and_flows_as_readable_addresses() {
    let mut fx = fixture("lbctl_shows_ipv6_services_and_flows_as_readable_addresses");
    let chosen = fx.pass6(Hook::TcPod, &syn(44000)).dst;
    let services = lbctl_json(fx.pins(), &["services"]);
    let web = services
        .as_array()
        .and_then(|rows| {
            rows.iter()
                .find(|r| r["frontend"] == "[fd00:96::10]:80/TCP")
        })
        .unwrap_or_else(|| panic!("no IPv6 frontend row: {services:#}"));
    assert_eq!(web["address"], "fd00:96::10");
    assert_eq!(web["service"], "default/web");
    let mut backends: Vec<String> = web["backends"]
        .as_array()
        .map(|b| b.iter().map(|b| b["address"].to_string()).collect())
        .unwrap_or_default();
    backends.sort();
    assert_eq!(
        backends,
        vec!["\"[fd00:244:1::11]:8080\"", "\"[fd00:244:1::12]:8080\""],
        "{web:#}"
    );
    let flows = lbctl_json(fx.pins(), &["conntrack"]);
    let flow = flows
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["client"] == "[fd00:244:1::2]:44000"))
        .unwrap_or_else(|| panic!("no IPv6 flow row: {flows:#}"));
    assert_eq!(flow["frontend"], "[fd00:96::10]:80");
    assert_eq!(flow["backend"], format!("[{chosen}]:8080"));
    assert_eq!(flow["protocol"], "TCP");
    assert_eq!(flow["state"], "syn_sent");
}

#[test]
fn ipv6_udp_flows_of_a_removed_backend_are_flushed() {
    let mut fx = fixture("ipv6_udp_flows_of_a_removed_backend_are_flushed");
    let query = Packet6::udp((CLIENT, 41001), (VIP, 53), b"q");
    assert_eq!(fx.pass6(Hook::TcPod, &query).dst, POD_A);
    let udp_entries = |fx: &Fixture| {
        let ct = fx.tables.dump_conntrack6().expect("conntrack6");
        ct.iter().filter(|(k, _)| k.proto == 17).count()
    };
    assert_eq!(udp_entries(&fx), 2, "both directions tracked");
    // POD_A leaves the UDP port: what the agent does after such an apply.
    let mut tables = desired();
    let dns = frontend(VIP, 53, Protocol::Udp);
    let ci = FrontendKind::ClusterIp;
    tables
        .frontends
        .insert(dns, spec6("web", "dns", ci, &[(POD_B, 5353, true)]));
    let report = fx.programmer.apply(&tables, &mut fx.tables);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let flushed = fx
        .tables
        .flush_udp_conntrack(&report.removed_members)
        .expect("flush");
    assert_eq!(flushed, 2, "the flow's two entries");
    assert_eq!(udp_entries(&fx), 0);
    // The client's next datagram is balanced afresh, to the live backend.
    assert_eq!(fx.pass6(Hook::TcPod, &query).dst, POD_B);
}

#[test]
fn ipv6_session_affinity_keeps_a_client_on_its_backend() {
    let mut fx = fixture("ipv6_session_affinity_keeps_a_client_on_its_backend");
    let sticky = |port| Packet6::tcp((CLIENT, port), (VIP, STICKY_PORT), SYN, b"");
    let first = fx.pass6(Hook::TcPod, &sticky(45000)).dst;
    assert!(is_backend(first), "dst IP hasn't been NATed: {first}");
    let before = fx.count(Reason::NewFlowAffinity);
    for port in 45001..45021 {
        let out = fx.pass6(Hook::TcPod, &sticky(port));
        assert_eq!(
            out.dst, first,
            "flow from port {port} left its affinity backend"
        );
        assert_eq!(out.ports(), Some((port, 8080)));
    }
    assert_eq!(fx.count(Reason::NewFlowAffinity), before + 20);
    let entries = fx.tables.dump_affinity6().expect("affinity6");
    assert!(
        entries.iter().any(|(k, _)| k.client == CLIENT.octets()),
        "no affinity entry keyed by the 128-bit client: {entries:?}"
    );
    // Without affinity the same client spreads over both backends.
    let mut seen = std::collections::BTreeSet::new();
    for port in 46000..46100 {
        seen.insert(fx.pass6(Hook::TcPod, &syn(port)).dst);
    }
    assert_eq!(
        seen.len(),
        2,
        "100 flows did not reach both backends: {seen:?}"
    );
}

#[test]
fn ipv6_load_balancer_source_ranges_admit_only_their_clients() {
    let mut fx = fixture("ipv6_load_balancer_source_ranges_admit_only_their_clients");
    let out = fx.pass6(
        Hook::Xdp,
        &Packet6::tcp((EXT, 47000), (LB_IP, 443), SYN, b""),
    );
    assert!(
        is_backend(out.dst),
        "an allowed client was not balanced: {}",
        out.dst
    );
    assert_eq!(out.src, EXT);
    let before = fx.count(Reason::DropSourceRange);
    fx.dropped6(
        Hook::Xdp,
        &Packet6::tcp((DENIED, 47001), (LB_IP, 443), SYN, b""),
    );
    assert_eq!(fx.count(Reason::DropSourceRange), before + 1);
}

#[test]
fn ipv6_icmp_errors_about_a_flow_are_translated_back() {
    let mut fx = fixture("ipv6_icmp_errors_about_a_flow_are_translated_back");
    for (hook, port) in [(Hook::TcPod, 41100), (Hook::Xdp, 41101)] {
        // The backend's port is closed: its port unreachable quotes the
        // datagram as it got it, from the client to the pod.
        let query = Packet6::udp((CLIENT, port), (VIP, 53), b"anyone?");
        let forwarded = fx.pass6(hook, &query).emit();
        let error = icmpv6_error((POD_A, CLIENT), 1, 4, 0, &forwarded[14..]);
        let before = fx.count(Reason::IcmpErrorTranslated);
        let (verdict, out) = fx.run(hook, &error);
        assert_eq!(verdict, hook.pass(), "{hook:?}: error not passed");
        assert_eq!(fx.count(Reason::IcmpErrorTranslated), before + 1);
        // parse verifies the ICMPv6 checksum, quoted_packet the UDP one.
        let reply = Packet6::parse(&out).unwrap_or_else(|e| panic!("{hook:?}: {e}"));
        assert_eq!(
            reply.src, VIP,
            "{hook:?}: the error must come from the service"
        );
        assert_eq!(reply.dst, CLIENT);
        assert_eq!(reply.payload[0..2], [1, 4], "{hook:?}: type and code kept");
        let quoted = quoted_packet(&reply.payload).unwrap_or_else(|e| panic!("{hook:?}: {e}"));
        assert_eq!((quoted.src, quoted.dst), (CLIENT, VIP), "{hook:?}: quote");
        assert_eq!(quoted.ports(), Some((port, 53)), "{hook:?}: quoted ports");
        assert_eq!(quoted.payload, query.payload);
    }
    // A router's Packet Too Big about a TCP flow keeps the router's
    // address and names the service in its quote: path-MTU discovery
    // reaches the client's socket.
    let router = Ipv6Addr::new(0xfd00, 0x244, 0xff, 0, 0, 0, 0, 1);
    let data = Packet6::tcp((CLIENT, 41102), (VIP, 80), ACK, &[7; 100]);
    fx.pass6(Hook::TcPod, &syn(41102));
    let forwarded = fx.pass6(Hook::TcPod, &data);
    let error = icmpv6_error((router, CLIENT), 2, 0, 1280, &forwarded.emit()[14..]);
    let (verdict, out) = fx.run(Hook::Xdp, &error);
    assert_eq!(verdict, Hook::Xdp.pass());
    let reply = Packet6::parse(&out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((reply.src, reply.dst), (router, CLIENT), "outer addresses");
    assert_eq!(reply.payload[4..8], 1280u32.to_be_bytes(), "MTU kept");
    let quoted = quoted_packet(&reply.payload).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((quoted.src, quoted.dst), (CLIENT, VIP), "quote");
    assert_eq!(quoted.ports(), Some((41102, 80)));
    // An error about a flow nobody tracks passes untouched.
    let stranger = Packet6::udp((CLIENT, 41199), (POD_B, 9), b"").emit();
    let error = icmpv6_error((POD_B, CLIENT), 1, 4, 0, &stranger[14..]);
    let (verdict, out) = fx.run(Hook::TcPod, &error);
    assert_eq!(verdict, Hook::TcPod.pass());
    assert_eq!(out, error, "an unrelated error was changed");
}

#[test]
fn ipv6_local_policy_keeps_outside_clients_on_local_endpoints_and_pods_reach_all() {
    let mut fx =
        fixture("ipv6_local_policy_keeps_outside_clients_on_local_endpoints_and_pods_reach_all");
    for port in 48000..48020 {
        let out = fx.pass6(
            Hook::Xdp,
            &Packet6::tcp((EXT, port), (NODE, LOCAL_POLICY), SYN, b""),
        );
        assert_eq!(
            out.dst, POD_A,
            "an outside client left the node's endpoints"
        );
        assert_eq!(out.src, EXT, "Local keeps the client address");
    }
    let before = fx.count(Reason::DropNoLocalBackend);
    fx.dropped6(
        Hook::Xdp,
        &Packet6::tcp((EXT, 48100), (NODE, LOCAL_POLICY_EMPTY), SYN, b""),
    );
    assert_eq!(fx.count(Reason::DropNoLocalBackend), before + 1);
    // This node's pods get the internal entry: every endpoint.
    let out = fx.pass6(
        Hook::TcPod,
        &Packet6::tcp((CLIENT, 48200), (NODE, LOCAL_POLICY_EMPTY), SYN, b""),
    );
    assert_eq!(out.dst, REMOTE_POD, "a pod did not get the internal entry");
    let mut seen = std::collections::BTreeSet::new();
    for port in 48300..48400 {
        let packet = Packet6::tcp((CLIENT, port), (NODE, LOCAL_POLICY), SYN, b"");
        seen.insert(fx.pass6(Hook::TcPod, &packet).dst);
    }
    assert_eq!(seen.len(), 2, "pods did not reach both endpoints: {seen:?}");
}

#[test]
fn ipv6_connection_attempt_to_an_undefined_cluster_ip_port_is_refused() {
    let mut fx = fixture("ipv6_connection_attempt_to_an_undefined_cluster_ip_port_is_refused");
    for packet in [
        Packet6::tcp((CLIENT, 49000), (VIP, 8443), SYN, b""),
        Packet6::udp((CLIENT, 49001), (VIP, 54), b""),
    ] {
        let before = fx.count(Reason::DropUnknownPort);
        let (verdict, out) = fx.run(Hook::TcPod, &packet.emit());
        assert_eq!(
            verdict, 7,
            "{packet:?} not sent back as ICMPv6 (TC_ACT_REDIRECT)"
        );
        assert_eq!(fx.count(Reason::DropUnknownPort), before + 1);
        let reply = Packet6::parse(&out).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((reply.src, reply.dst), (VIP, CLIENT));
        assert_eq!(reply.payload[0..2], [1, 4], "not port unreachable");
    }
    // A pod address is no ClusterIP: untouched.
    let frame = Packet6::tcp((CLIENT, 49002), (POD_A, 8443), SYN, b"").emit();
    let (verdict, out) = fx.run(Hook::TcPod, &frame);
    assert_eq!(verdict, Hook::TcPod.pass());
    assert_eq!(out, frame);
}

#[test]
fn ipv6_direct_connection_reusing_a_balanced_flows_port_gets_its_replies_untranslated() {
    let mut fx = fixture(
        "ipv6_direct_connection_reusing_a_balanced_flows_port_gets_its_replies_untranslated",
    );
    let chosen = fx.pass6(Hook::TcPod, &syn(40500)).dst;
    // The client now talks to that pod directly from the same port.
    let direct = Packet6::tcp((CLIENT, 40500), (chosen, 8080), SYN, b"").emit();
    let (verdict, out) = fx.run(Hook::TcPod, &direct);
    assert_eq!(verdict, Hook::TcPod.pass());
    assert_eq!(out, direct, "a direct connection was translated");
    let ct = fx.tables.dump_conntrack6().expect("conntrack6");
    assert!(
        ct.iter()
            .all(|(k, _)| k.src_port != 40500 && k.dst_port != 40500),
        "the old flow's entries are still there: {ct:?}"
    );
    let reply = Packet6::tcp((chosen, 8080), (CLIENT, 40500), SYN | ACK, b"").emit();
    let (_, out) = fx.run(Hook::TcPod, &reply);
    assert_eq!(
        out, reply,
        "the direct connection's reply was rewritten to the service"
    );
}

#[test]
fn ipv6_maglev_picks_the_backend_the_table_and_the_flow_hash_predict() {
    use lb_agent::maglev::{BackendIdentity, build_table};
    use lb_common::{conntrack::Lb6CtKey, maglev::flow_hash6};
    const M: u32 = 251;
    let pods = [POD_A, POD_B, REMOTE_POD];
    let spec = spec6(
        "maglev",
        "http",
        FrontendKind::ClusterIp,
        &pods.map(|p| (p, 8080, true)),
    );
    let tables = DesiredTables {
        frontends: [(frontend(VIP, 80, Protocol::Tcp), spec)]
            .into_iter()
            .collect(),
        ..DesiredTables::default()
    };
    let mut fx = Fixture::with_maglev(
        "ipv6_maglev_picks_the_backend_the_table_and_the_flow_hash_predict",
        &tables,
        M,
    );
    let identities: Vec<BackendIdentity> = pods
        .iter()
        .map(|p| BackendIdentity {
            addr: IpAddr::V6(*p),
            port: 8080,
        })
        .collect();
    let table = build_table(&identities, M).expect("table");
    let before = fx.count(Reason::NewFlowMaglev);
    let mut seen = std::collections::BTreeSet::new();
    for port in 50000..50060 {
        let key = Lb6CtKey {
            src_addr: CLIENT.octets(),
            dst_addr: VIP.octets(),
            src_port: port,
            dst_port: 80,
            proto: 6,
            _pad: [0; 3],
        };
        let predicted = pods[table[(flow_hash6(&key) % M) as usize] as usize];
        let out = fx.pass6(Hook::TcPod, &syn(port));
        assert_eq!(
            out.dst, predicted,
            "flow from port {port} left its Maglev backend"
        );
        seen.insert(out.dst);
    }
    assert_eq!(fx.count(Reason::NewFlowMaglev), before + 60);
    assert_eq!(
        seen.len(),
        3,
        "60 flows did not reach every backend: {seen:?}"
    );
    // XDP picks the same backend for the same 5-tuple.
    let key = Lb6CtKey {
        src_addr: EXT.octets(),
        dst_addr: VIP.octets(),
        src_port: 51000,
        dst_port: 80,
        proto: 6,
        _pad: [0; 3],
    };
    let out = fx.pass6(Hook::Xdp, &Packet6::tcp((EXT, 51000), (VIP, 80), SYN, b""));
    assert_eq!(
        out.dst,
        pods[table[(flow_hash6(&key) % M) as usize] as usize]
    );
}

#[test]
fn ipv6_pod_balanced_to_itself_gets_its_replies_through_the_hairpin_address() {
    let mut fx =
        fixture("ipv6_pod_balanced_to_itself_gets_its_replies_through_the_hairpin_address");
    let request = Packet6::tcp((POD_A, 40000), (SELF_VIP, 80), SYN, b"");
    let sent = request.emit();
    let (verdict, out) = fx.run(Hook::TcPod, &sent);
    assert_eq!(verdict, TC_ACT_REDIRECT, "hairpin not sent straight back");
    let there = Packet6::parse(&out).unwrap_or_else(|e| panic!("hairpin packet: {e}"));
    assert_eq!(there.dst, POD_A, "dst not translated to the pod");
    assert_eq!(
        there.src, HAIRPIN,
        "src not translated to the hairpin address"
    );
    assert_eq!(
        (&out[0..6], &out[6..12]),
        (&sent[6..12], &sent[0..6]),
        "MACs not swapped"
    );
    let (snat_port, dport) = there.ports().expect("ports");
    assert_eq!(dport, 8080);

    // The pod answers the hairpin address; the reply goes back to it from
    // the service address.
    let reply = Packet6::tcp((POD_A, 8080), (HAIRPIN, snat_port), SYN | ACK, b"");
    let (verdict, out) = fx.run(Hook::TcPod, &reply.emit());
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "hairpin reply not sent straight back"
    );
    let back = Packet6::parse(&out).unwrap_or_else(|e| panic!("hairpin reply: {e}"));
    assert_eq!(
        (back.src, back.dst, back.ports()),
        (SELF_VIP, POD_A, Some((80, 40000)))
    );
    // The established forward direction keeps the hairpin too.
    let ack = Packet6::tcp((POD_A, 40000), (SELF_VIP, 80), ACK, b"data");
    let (verdict, out) = fx.run(Hook::TcPod, &ack.emit());
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let again = Packet6::parse(&out).unwrap_or_else(|e| panic!("hairpin ack: {e}"));
    assert_eq!(
        (again.src, again.dst, again.ports()),
        (HAIRPIN, POD_A, Some((snat_port, 8080)))
    );
    // Another pod reaching the same service is not hairpinned.
    let other = fx.pass6(
        Hook::TcPod,
        &Packet6::tcp((CLIENT, 40001), (SELF_VIP, 80), SYN, b""),
    );
    assert_eq!((other.src, other.dst), (CLIENT, POD_A));
}

#[test]
fn lbctl_trace_shows_ipv6_new_flows_and_drops_with_their_addresses() {
    let mut fx = fixture("lbctl_trace_shows_ipv6_new_flows_and_drops_with_their_addresses");
    let trace = Trace::start(fx.pins(), &["--count", "4", "--seconds", "20"]);
    let first = fx.pass6(Hook::TcPod, &syn(45000)).dst;
    let second = fx.pass6(Hook::Xdp, &syn(45001)).dst;
    fx.dropped6(
        Hook::Xdp,
        &Packet6::tcp((DENIED, 45002), (LB_IP, 443), SYN, b""),
    );
    // A TCP header cut short: dropped before its tuple is read, so its
    // event carries no address (not the previous packet's).
    let mut cut = Packet6::tcp((EXT, 45003), (VIP, 80), SYN, b"").emit();
    cut.truncate(14 + 40 + 10);
    let (verdict, _) = fx.run(Hook::Xdp, &cut);
    assert_eq!(
        verdict,
        Hook::Xdp.drop(),
        "a truncated TCP header was not dropped"
    );
    let events = trace.events();
    assert_eq!(events.len(), 4, "{events:#?}");
    for (event, (port, backend, hook)) in events
        .iter()
        .zip([(45000, first, "pod"), (45001, second, "network")])
    {
        assert_eq!(event["event"], "new_flow", "{event:#}");
        assert_eq!(event["client"], format!("[{CLIENT}]:{port}"), "{event:#}");
        assert_eq!(event["frontend"], format!("[{VIP}]:80"), "{event:#}");
        assert_eq!(event["backend"], format!("[{backend}]:8080"), "{event:#}");
        assert_eq!(event["service"], "default/web", "{event:#}");
        assert_eq!(event["hook"], hook, "{event:#}");
    }
    let drop = &events[2];
    assert_eq!(drop["event"], "drop", "{drop:#}");
    assert_eq!(drop["reason"], "drop_source_range", "{drop:#}");
    assert_eq!(drop["client"], format!("[{DENIED}]:45002"), "{drop:#}");
    assert_eq!(drop["frontend"], format!("[{LB_IP}]:443"), "{drop:#}");
    assert_eq!(drop["backend"], serde_json::Value::Null, "{drop:#}");
    let cut = &events[3];
    assert_eq!(cut["reason"], "drop_malformed", "{cut:#}");
    assert_eq!(
        (&cut["client"], &cut["frontend"]),
        (&"0.0.0.0:0".into(), &"0.0.0.0:0".into()),
        "{cut:#}"
    );
}
