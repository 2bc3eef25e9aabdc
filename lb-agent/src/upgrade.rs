//! Map layout upgrades: what happens to pins of an older layout version.
//!
//! Every map name carries its layout version (`LB4_SERVICES_V1`); a layout
//! change is a new name (`_V2`), never a reinterpretation of pinned bytes.
//! An agent of the new version finds no pin under the new name and creates
//! the map fresh (`Datapath::load`), while the old maps stay pinned and in
//! use by the old program until the new program replaces it. Once the new
//! agent has attached and programmed its maps, the old version's pins are
//! dead weight (and a trap for readers such as `bpftool`), so
//! [`remove_superseded_pins`] unlinks them. Conntrack starts empty under a
//! new layout: established flows of multi-backend services may be reset by
//! the switch, which is why a layout change is a rare, announced upgrade.

use std::{io, path::Path};

/// Splits `LB4_SERVICES_V2` into (`LB4_SERVICES`, 2).
fn versioned(name: &str) -> Option<(&str, u32)> {
    let (base, version) = name.rsplit_once("_V")?;
    if base.is_empty() || version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((base, version.parse().ok()?))
}

/// Unlinks the pins under `bpffs` that are an older version of a map in
/// `current` (the names this agent pins). Anything else in the directory
/// (other maps, pinned links or programs, newer versions) is left alone.
/// Returns the names removed. Call it only after the first successful
/// program: until then the old maps may still be what packets use.
pub fn remove_superseded_pins(bpffs: &Path, current: &[&str]) -> io::Result<Vec<String>> {
    let current: Vec<(&str, u32)> = current.iter().filter_map(|name| versioned(name)).collect();
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(bpffs)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let Some((base, version)) = versioned(&name) else {
            continue;
        };
        let superseded = current.iter().any(|&(current_base, current_version)| {
            current_base == base && version < current_version
        });
        if superseded {
            std::fs::remove_file(entry.path())?;
            removed.push(name);
        }
    }
    removed.sort();
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_into_base_and_version() {
        assert_eq!(versioned("LB4_SERVICES_V1"), Some(("LB4_SERVICES", 1)));
        assert_eq!(versioned("LB_STATS_V12"), Some(("LB_STATS", 12)));
        assert_eq!(versioned("LB4_SERVICES"), None);
        assert_eq!(versioned("LB4_SERVICES_V"), None);
        assert_eq!(versioned("LB4_SERVICES_Vx"), None);
        assert_eq!(versioned("_V1"), None);
    }

    #[test]
    fn only_older_versions_of_current_maps_are_removed() {
        let dir = std::env::temp_dir().join(format!("lb-agent-upgrade-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create dir");
        for name in [
            "LB4_SERVICES_V1",
            "LB4_SERVICES_V2",
            "LB4_SERVICES_V3",
            "LB4_BACKENDS_V1",
            "LB_STATS_V1",
            "OTHER_MAP_V1",
            "link_lbv1",
        ] {
            std::fs::write(dir.join(name), b"").expect("write pin stand-in");
        }
        let removed =
            remove_superseded_pins(&dir, &["LB4_SERVICES_V2", "LB4_BACKENDS_V2", "LB_STATS_V1"])
                .expect("remove");
        assert_eq!(removed, ["LB4_BACKENDS_V1", "LB4_SERVICES_V1"]);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "LB4_SERVICES_V2",
                "LB4_SERVICES_V3",
                "LB_STATS_V1",
                "OTHER_MAP_V1",
                "link_lbv1"
            ]
        );
        let again = remove_superseded_pins(&dir, &["LB4_SERVICES_V2"]).expect("idempotent");
        assert!(again.is_empty());
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
