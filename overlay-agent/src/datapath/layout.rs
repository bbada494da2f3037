//! The layout of the pinned maps this build expects, and the check that pins left by
//! an earlier run match it before they are reused. A build with another layout uses
//! another pin directory (`LAYOUT_VERSION`); a mismatch inside one directory means the
//! pins were not made by a compatible build and must not be read as ours.

use std::path::Path;

use anyhow::{Result, bail};
use aya::maps::{MapInfo, MapType};
use overlay_common::{
    Counter, DatapathConfig, PeerStats, Route,
    conntrack::{CtEntry, CtKey},
    counters::{COUNTER_SLOTS, NAT_EVENT_SLOTS},
    flows::{FILTER_WORDS, FLOW_ENTRIES, FlowKey, FlowState},
    maps::{MAX_NODES, names},
};

/// What a map must look like.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MapLayout {
    pub name: &'static str,
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

const fn size<T>() -> u32 {
    size_of::<T>() as u32
}

/// Every map of the datapath as this build defines it.
pub fn expected(conntrack_entries: u32) -> [MapLayout; 8] {
    let map = |name, map_type, key_size, value_size, max_entries| MapLayout {
        name,
        map_type,
        key_size,
        value_size,
        max_entries,
    };
    [
        // LPM keys carry their prefix length in front of the address.
        map(
            names::ROUTES,
            MapType::LpmTrie,
            4 + 4,
            size::<Route>(),
            MAX_NODES,
        ),
        map(
            names::PEERS,
            MapType::PerCpuHash,
            4,
            size::<PeerStats>(),
            MAX_NODES,
        ),
        map(
            names::CONFIG,
            MapType::Array,
            4,
            size::<DatapathConfig>(),
            1,
        ),
        map(
            names::COUNTERS,
            MapType::PerCpuArray,
            4,
            size::<Counter>(),
            COUNTER_SLOTS,
        ),
        map(
            names::CONNTRACK,
            MapType::Hash,
            size::<CtKey>(),
            size::<CtEntry>(),
            conntrack_entries,
        ),
        map(
            names::NAT_EVENTS,
            MapType::PerCpuArray,
            4,
            8,
            NAT_EVENT_SLOTS,
        ),
        map(
            names::FLOWS,
            MapType::LruHash,
            size::<FlowKey>(),
            size::<FlowState>(),
            FLOW_ENTRIES,
        ),
        map(names::FLOW_FILTER, MapType::Array, 4, 8, FILTER_WORDS),
    ]
}

/// Refuses pins in `pin_dir` that do not match `expected`.
pub fn check_pinned(pin_dir: &Path, expected: &[MapLayout]) -> Result<()> {
    for want in expected {
        let path = pin_dir.join(want.name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)?;
        let have = MapLayout {
            name: want.name,
            map_type: info.map_type()?,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
        };
        if have.name == names::CONNTRACK
            && have.max_entries != want.max_entries
            && have.map_type == want.map_type
        {
            bail!(
                "the pinned connection table {} holds {} entries, not the {} asked for: restart with --conntrack-size {} to keep the tracked flows, or run `overlay-agent cleanup` first to resize it",
                path.display(),
                have.max_entries,
                want.max_entries,
                have.max_entries
            );
        }
        if have != *want {
            bail!(
                "pinned map {} does not have this build's layout (found {have:?}, expected {want:?}): it was left by an incompatible build; run `overlay-agent cleanup` to remove it",
                path.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use overlay_common::maps::LAYOUT_VERSION;

    use super::*;

    /// Changing a shared type's size or a capacity without bumping LAYOUT_VERSION would
    /// let a new build read old pins as its own: this test makes that a conscious step.
    #[test]
    fn layout_changes_bump_the_version() {
        let fingerprint: Vec<(u32, u32, u32)> = expected(1)
            .iter()
            .map(|m| (m.key_size, m.value_size, m.max_entries))
            .collect();
        assert_eq!(
            (LAYOUT_VERSION, fingerprint),
            (
                7,
                vec![
                    (8, 8, 16384),
                    (4, 16, 16384),
                    (4, 72, 1),
                    (4, 16, 320),
                    (16, 32, 1),
                    (4, 8, 16),
                    (16, 32, 65536),
                    (4, 8, 16384)
                ]
            ),
            "the map layout changed: bump overlay_common::maps::LAYOUT_VERSION and update this test"
        );
    }
}
