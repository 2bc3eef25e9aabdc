//! Arbitrary bytes as a manifest file: the manifest source turns them into a
//! cluster state (or errors naming file, document and object) and the model
//! turns that state into desired tables (or errors naming object and field).
//! Neither may panic, and the model must be deterministic.
#![no_main]

use std::path::Path;

use lb_agent::model::{self, ClusterState, NodeIdentity};
use lb_agent::source::files;
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        // serde_yaml 0.9 panics on some input; the manifest source catches
        // that (a file error). libFuzzer's hook would abort on the caught
        // panic, so let panics raised inside serde_yaml unwind to the catch.
        let abort = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.location().is_some_and(|at| at.file().contains("serde_yaml")) {
                return;
            }
            abort(info);
        }));
    },
    |data: &[u8]| {
    let mut state = ClusterState::default();
    let _ = files::parse_manifest(Path::new("fuzz.yaml"), data, &mut state);
    let node = NodeIdentity {
        name: "node-1".into(),
        nodeport_addresses: vec!["192.0.2.1".parse().unwrap_or(std::net::Ipv4Addr::LOCALHOST.into())],
        ..NodeIdentity::default()
    };
    let first = model::desired_tables(&state, &node);
    let second = model::desired_tables(&state, &node);
    assert_eq!(first, second, "desired_tables is not deterministic");
});
