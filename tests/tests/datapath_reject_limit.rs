//! In-kernel fixtures for the reject rate limit: connection attempts to a
//! service without endpoints are answered with ICMP (ICMPv6) port
//! unreachable only while this CPU's token bucket has tokens
//! (`LB_REJECT_LIMIT_V1`); the rest are dropped as
//! `drop_reject_rate_limited`. BPF_PROG_TEST_RUN runs the program on the
//! calling thread's CPU with the real clock, so the thread is pinned to one
//! CPU (one bucket) and each SYN is a separate run (a run's reject
//! overwrites its packet; repeats would see the ICMP error).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use lb_agent::model::{DesiredTables, Frontend, FrontendKind, Protocol};
use lb_common::{reject_limit::LbRejectLimit, stats::Reason};
use lb_tests::{
    fixture::{Fixture, Hook, spec, spec6},
    packet::{Packet, SYN},
    packet6::Packet6,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 2);
const EMPTY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x20);
const TC_ACT_REDIRECT: u32 = 7;
const XDP_TX: u32 = 3;

/// A TCP ClusterIP without endpoints, in each family.
fn desired() -> DesiredTables {
    let empty = |addr: IpAddr| Frontend::new(addr, 80, Protocol::Tcp);
    DesiredTables {
        frontends: [
            (
                empty(EMPTY.into()),
                spec("empty", "http", FrontendKind::ClusterIp, &[]),
            ),
            (
                empty(EMPTY6.into()),
                spec6("empty6", "http", FrontendKind::ClusterIp, &[]),
            ),
        ]
        .into_iter()
        .collect(),
        ..DesiredTables::default()
    }
}

/// Pins the calling thread to the CPU it runs on: every run then meets the
/// same per-CPU bucket.
fn pin_to_this_cpu() {
    // SAFETY: plain libc calls on a zeroed, then filled, CPU set.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let size = std::mem::size_of::<libc::cpu_set_t>();
        assert_eq!(
            libc::sched_setaffinity(0, size, &set),
            0,
            "sched_setaffinity"
        );
    }
}

/// Sends `count` SYNs (`frame(i)`) through `hook`, one run each: which
/// were answered (`answer` verdict; anything else must be `hook.drop()`),
/// and the time the runs took.
fn send_syns(
    fx: &mut Fixture,
    hook: Hook,
    answer: u32,
    count: u16,
    frame: impl Fn(u16) -> Vec<u8>,
) -> (Vec<bool>, f64) {
    let start = Instant::now();
    let answered = (0..count)
        .map(|i| {
            let (verdict, _) = fx.run(hook, &frame(i));
            assert!(
                verdict == answer || verdict == hook.drop(),
                "{hook:?}: SYN {i} got verdict {verdict}"
            );
            verdict == answer
        })
        .collect();
    (answered, start.elapsed().as_secs_f64())
}

/// Checks that the first `burst` SYNs were answered, and at most the
/// tokens `rate` refilled during `elapsed` (plus one for the rounding)
/// after them; the rest dropped and counted.
fn assert_limited(
    fx: &Fixture,
    (answered, elapsed): (Vec<bool>, f64),
    (rate, burst): (u32, usize),
    dropped_before: u64,
    what: &str,
) {
    assert!(
        answered[..burst].iter().all(|a| *a),
        "{what}: the first {burst} SYNs were not all answered: {answered:?}"
    );
    let extra = answered[burst..].iter().filter(|a| **a).count();
    let refilled = (elapsed * f64::from(rate)).ceil() as usize + 1;
    assert!(
        extra <= refilled,
        "{what}: {extra} answers beyond the burst of {burst} in {elapsed:.4} s at {rate}/s"
    );
    let dropped = (answered.len() - burst - extra) as u64;
    eprintln!(
        "{what}: {} answered, {dropped} rate-limited of {} SYNs in {elapsed:.4} s",
        burst + extra,
        answered.len()
    );
    assert!(dropped > 0, "{what}: nothing was rate-limited");
    assert_eq!(
        fx.count(Reason::DropRejectRateLimited),
        dropped_before + dropped,
        "{what}: drop_reject_rate_limited counter"
    );
}

#[test]
fn rejects_beyond_the_configured_burst_are_dropped_both_families() {
    pin_to_this_cpu();
    let (rate, burst) = (1, 5);
    for family in ["IPv4 on TC", "IPv6 on XDP"] {
        // A fresh fixture per family: a full bucket each.
        let mut fx = Fixture::new(
            "rejects_beyond_the_configured_burst_are_dropped_both_families",
            &desired(),
        );
        fx.tables
            .set_reject_limit(&LbRejectLimit {
                rate_per_sec: rate,
                burst: burst as u32,
            })
            .expect("write the reject limit");
        let before = (
            fx.count(Reason::DropRejectRateLimited),
            fx.count(Reason::DropNoBackend),
        );
        let runs = if family.starts_with("IPv4") {
            send_syns(&mut fx, Hook::TcPod, TC_ACT_REDIRECT, 20, |i| {
                Packet::tcp((CLIENT, 40000 + i), (EMPTY, 80), SYN, b"").emit()
            })
        } else {
            send_syns(&mut fx, Hook::Xdp, XDP_TX, 20, |i| {
                Packet6::tcp((CLIENT6, 40000 + i), (EMPTY6, 80), SYN, b"").emit()
            })
        };
        let answered = runs.0.iter().filter(|a| **a).count() as u64;
        assert_limited(&fx, runs, (rate, burst), before.0, family);
        assert_eq!(
            fx.count(Reason::DropNoBackend),
            before.1 + answered,
            "{family}: every answered reject counts as drop_no_backend"
        );
    }
}

#[test]
fn rejects_follow_the_default_limit_when_none_is_configured() {
    pin_to_this_cpu();
    let mut fx = Fixture::new(
        "rejects_follow_the_default_limit_when_none_is_configured",
        &desired(),
    );
    assert_eq!(
        fx.tables.reject_limit().expect("read the reject limit"),
        LbRejectLimit::default(),
        "no limit written"
    );
    let before = fx.count(Reason::DropRejectRateLimited);
    let runs = send_syns(&mut fx, Hook::Xdp, XDP_TX, 300, |i| {
        Packet::tcp((CLIENT, 40000 + i), (EMPTY, 80), SYN, b"").emit()
    });
    let (rate, burst) = (
        lb_common::reject_limit::DEFAULT_RATE_PER_SEC,
        lb_common::reject_limit::DEFAULT_BURST as usize,
    );
    assert_limited(&fx, runs, (rate, burst), before, "defaults on XDP");
}
