//! `POD_PORTS` filled: where each local pod's veth plugs into the pod bridge, so that
//! `uplink_ingress` can hand a decapsulated packet straight to the pod
//! (`bpf_redirect_peer`) instead of to the bridge (see `overlay-ebpf/src/decap.rs`).
//!
//! The bridge's own forwarding table says it: each pod's MAC address, learned from its
//! first frame, on the port of its veth. It is read from sysfs (`brforward`, `brif/`):
//! no netlink request, and nothing the CNI plugin has to tell us. A pod the bridge has
//! not learned yet, or that left, is simply not in the map, and the bridge delivers its
//! packets as before.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context as _, Result};
use overlay_common::maps::PodPort;

use crate::datapath::{PodPorts, maps::Changes};

/// `struct __fdb_entry` (linux/if_bridge.h), as `brforward` lists them.
const FDB_ENTRY: usize = 16;

/// Makes `map` hold the pods `bridge` has learned now (nothing when it does not exist
/// yet), from the sysfs tree `net` (`/sys/class/net`; a sysfs mounted in this network
/// namespace shows its devices).
pub fn sync(map: &mut PodPorts, net: &Path, bridge: &str) -> Result<Changes> {
    map.sync(&learned(net, bridge)?)
}

fn read_u32(path: &Path) -> Result<u32> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let text = text.trim();
    Ok(match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16)?,
        None => text.parse()?,
    })
}

/// A veth plugged into the bridge: the host end of a pod's link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethPort {
    /// The bridge's number for the port (`brif/<name>/port_no`).
    pub number: u32,
    pub ifindex: u32,
    pub name: String,
}

/// The veth ports of `bridge`, from the sysfs tree `net` (none when the bridge does not
/// exist). Other kinds of ports can take neither a peer redirect nor a pod's packets.
pub fn veth_ports(net: &Path, bridge: &str) -> Result<Vec<VethPort>> {
    let dir = net.join(bridge);
    let mut out = Vec::new();
    let Ok(ports) = std::fs::read_dir(dir.join("brif")) else {
        return Ok(out);
    };
    for port in ports {
        let name = port?.file_name();
        let dev = net.join(&name);
        let (Ok(number), Ok(ifindex), Ok(iflink)) = (
            read_u32(&dir.join("brif").join(&name).join("port_no")),
            read_u32(&dev.join("ifindex")),
            read_u32(&dev.join("iflink")),
        ) else {
            // The port went away while we looked.
            continue;
        };
        // A veth's peer is another device: `iflink` differs from `ifindex`.
        if iflink != ifindex {
            out.push(VethPort {
                number,
                ifindex,
                name: name.to_string_lossy().into_owned(),
            });
        }
    }
    Ok(out)
}

/// The MAC addresses `bridge` has learned on its veth ports, with each port, from the
/// sysfs tree `net` (`/sys/class/net`).
pub fn learned(net: &Path, bridge: &str) -> Result<BTreeMap<[u8; 6], PodPort>> {
    let mut out = BTreeMap::new();
    let veths: BTreeMap<u32, u32> = veth_ports(net, bridge)?
        .into_iter()
        .map(|p| (p.number, p.ifindex))
        .collect();
    if veths.is_empty() {
        return Ok(out);
    }
    let dir = net.join(bridge);
    let bridge_index = read_u32(&dir.join("ifindex"))?;
    let table = std::fs::read(dir.join("brforward"))
        .with_context(|| format!("reading {}", dir.join("brforward").display()))?;
    for entry in table.chunks_exact(FDB_ENTRY) {
        let (mac, port_no, is_local, port_hi) = (&entry[..6], entry[6], entry[7], entry[12]);
        if is_local != 0 {
            continue;
        }
        let number = u32::from(port_hi) << 8 | u32::from(port_no);
        if let Some(&ifindex) = veths.get(&number) {
            let mac: [u8; 6] = mac.try_into().expect("six bytes");
            out.insert(
                mac,
                PodPort {
                    ifindex,
                    bridge: bridge_index,
                },
            );
        }
    }
    Ok(out)
}
