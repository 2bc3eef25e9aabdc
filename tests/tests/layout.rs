//! The kernel side and the agent side agree on every shared struct: sizes and
//! field offsets read from the BTF of the compiled BPF object (built by the
//! nightly BPF toolchain) must equal those of `lb-common` as compiled for the
//! host. `bpftool` reads the BTF, so the check does not trust our own parser.

use std::{collections::BTreeMap, mem::size_of, process::Command};

use lb_agent::datapath::EBPF_OBJECT;
use lb_common::{
    affinity::Lb6AffinityKey,
    backend::{Lb4Backend, Lb6Backend},
    config::{Lb6Config, LbConfig},
    conntrack::{CtTimeouts, Lb4CtEntry, Lb4CtKey, Lb6CtEntry, Lb6CtKey},
    frag::{Lb4FragKey, Lb6FragKey, LbFragFlow},
    maglev::{Lb4MaglevChunk, Lb4MaglevKey},
    reject_limit::{LbRejectBucket, LbRejectLimit},
    service::{Lb4Service, Lb4ServiceKey, Lb6ServiceKey},
    slot::{Lb4Slot, Lb4SlotKey},
    sock::{Lb4SockKey, Lb4SockRevnat, Lb6SockKey, Lb6SockRevnat},
    source_range::{Lb4SourceRange, Lb4SourceRangeKey, Lb6SourceRangeKey},
    stats::Counter,
};
use lb_common::{
    backend_stats::LbBackendStats, service_name::LbServiceName, service_stats::LbServiceStats,
    trace::TraceEvent,
};
use xtask::TempDir;

/// struct name -> (size, [(field, byte offset)]), as bpftool prints them.
fn btf_structs() -> BTreeMap<String, (usize, Vec<(String, usize)>)> {
    let dir = TempDir::new("lbt", "btf").expect("temp dir");
    let object = dir.path().join("lb-ebpf.o");
    std::fs::write(&object, EBPF_OBJECT).expect("write object");
    let out = Command::new("bpftool")
        .args(["btf", "dump", "file"])
        .arg(&object)
        .args(["format", "raw"])
        .output()
        .expect("run bpftool (installed by cargo xtask setup)");
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut structs = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(rest) = line.split("] STRUCT '").nth(1) {
            let (name, tail) = rest.split_once('\'').expect("struct name");
            let size = tail
                .split_whitespace()
                .find_map(|w| w.strip_prefix("size="))
                .and_then(|s| s.parse().ok())
                .expect("struct size");
            structs.insert(name.to_string(), (size, Vec::new()));
            current = Some(name.to_string());
        } else if line.starts_with('\t') {
            if let (Some(name), Some(field)) = (&current, line.trim().strip_prefix('\'')) {
                let (field, tail) = field.split_once('\'').expect("field name");
                let bits: usize = tail
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("bits_offset="))
                    .and_then(|s| s.parse().ok())
                    .expect("bits_offset");
                if let Some(entry) = structs.get_mut(name) {
                    entry.1.push((field.to_string(), bits / 8));
                }
            }
        } else {
            current = None;
        }
    }
    structs
}

macro_rules! host_layout {
    ($ty:ident { $($field:ident),* $(,)? }) => {
        (
            stringify!($ty).to_string(),
            (
                size_of::<$ty>(),
                vec![$((stringify!($field).to_string(), std::mem::offset_of!($ty, $field))),*],
            ),
        )
    };
}

#[test]
fn kernel_and_agent_agree_on_every_shared_struct() {
    let kernel = btf_structs();
    let host = [
        host_layout!(Lb4ServiceKey {
            addr,
            port,
            proto,
            scope
        }),
        host_layout!(Lb4Service {
            service_id,
            backend_count,
            revision,
            kind,
            flags,
            affinity_timeout
        }),
        host_layout!(Lb4SlotKey {
            service_id,
            revision,
            slot
        }),
        host_layout!(Lb4Slot { backend_id }),
        host_layout!(Lb4Backend {
            addr,
            port,
            proto,
            flags
        }),
        host_layout!(Lb4CtKey {
            src_addr,
            dst_addr,
            src_port,
            dst_port,
            proto,
            _pad
        }),
        host_layout!(Lb4CtEntry {
            dst_addr,
            dst_port,
            direction,
            rewrite,
            src_addr,
            src_port,
            state,
            _pad,
            service_id,
            backend_id,
            created_ns,
            last_seen_ns,
            packets,
            bytes
        }),
        host_layout!(Lb6ServiceKey {
            addr,
            port,
            proto,
            scope
        }),
        host_layout!(Lb6Backend {
            addr,
            port,
            proto,
            flags
        }),
        host_layout!(Lb6CtKey {
            src_addr,
            dst_addr,
            src_port,
            dst_port,
            proto,
            _pad
        }),
        host_layout!(Lb6CtEntry {
            dst_addr,
            dst_port,
            direction,
            rewrite,
            src_addr,
            src_port,
            state,
            _pad,
            service_id,
            backend_id,
            created_ns,
            last_seen_ns,
            packets,
            bytes
        }),
        host_layout!(Lb4SourceRangeKey {
            service_id_be,
            addr
        }),
        host_layout!(Lb4SourceRange { allow }),
        host_layout!(LbConfig {
            node_addr4,
            flags,
            maglev_table_size,
            _pad,
            ct
        }),
        host_layout!(CtTimeouts {
            tcp_syn,
            tcp_established,
            tcp_close_wait,
            tcp_time_wait,
            tcp_close,
            udp,
            udp_stream,
            _pad
        }),
        host_layout!(Lb6Config { node_addr6 }),
        host_layout!(Lb4FragKey {
            src_addr,
            dst_addr,
            id,
            proto,
            _pad
        }),
        host_layout!(Lb6FragKey {
            src_addr,
            dst_addr,
            id,
            next_header,
            _pad
        }),
        host_layout!(LbFragFlow {
            src_port,
            dst_port,
            proto,
            _pad
        }),
        host_layout!(LbRejectLimit {
            rate_per_sec,
            burst
        }),
        host_layout!(LbRejectBucket {
            nano_tokens,
            last_ns
        }),
        host_layout!(Lb6SourceRangeKey {
            service_id_be,
            addr
        }),
        host_layout!(Lb6AffinityKey { client, service_id }),
        host_layout!(Lb4MaglevKey {
            service_id,
            table_size,
            chunk
        }),
        host_layout!(Lb4MaglevChunk { backend_ids }),
        host_layout!(Counter { packets, bytes }),
        host_layout!(LbServiceName {
            namespace,
            name,
            port_name
        }),
        host_layout!(LbServiceStats {
            new_flow,
            ct_forward,
            ct_reply,
            dropped
        }),
        host_layout!(LbBackendStats {
            new_flows,
            answered,
            failed,
            last_failed_ns
        }),
        host_layout!(Lb4SockKey {
            cookie,
            addr,
            port,
            _pad
        }),
        host_layout!(Lb4SockRevnat { addr, port, _pad }),
        host_layout!(Lb6SockKey {
            cookie,
            addr,
            port,
            _pad
        }),
        host_layout!(Lb6SockRevnat { addr, port, _pad }),
        host_layout!(TraceEvent {
            timestamp_ns,
            src_addr,
            dst_addr,
            backend_addr,
            src_port,
            dst_port,
            backend_port,
            proto,
            kind,
            selection,
            hook,
            family,
            _pad,
            reason,
            service_id,
            backend_id
        }),
    ];
    for (name, layout) in host {
        let in_kernel = kernel
            .get(&name)
            .unwrap_or_else(|| panic!("struct {name} is not in the BPF object's BTF"));
        assert_eq!(
            in_kernel, &layout,
            "{name}: kernel (left) and agent (right) layouts differ"
        );
    }
}
