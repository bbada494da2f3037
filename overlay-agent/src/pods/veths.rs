//! `pod_ingress` on the pods' veths: a pod's packet for a remote pod is encapsulated
//! as it enters the host, before the bridge (its forwarding, and br_netfilter's hooks
//! where that module is loaded) and the bridge's own ingress hook see it (what that
//! saves: docs/BENCHMARKS.md). `bridge_ingress` stays attached to the bridge and does
//! the same for every pod whose veth does not carry the program.
//!
//! A veth carries it only while nobody else filters what the pod sends: the CNI
//! bandwidth plugin shapes a pod's egress with an ingress qdisc on that veth, and a
//! packet redirected by our program would skip the shaping. Such a veth is left to the
//! bridge, and one where such filters appear later is given back to it.
//!
//! A veth is taken only once it has been there for [`SETTLE`]: the CNI plugins chained
//! after the bridge plugin (bandwidth among them) have set it up by then. Without TCX,
//! our clsact qdisc on the veth would make the bandwidth plugin's ingress qdisc fail,
//! and with it the pod's creation.
//!
//! These attachments are not pinned: they end with the agent, and traffic flows
//! through the bridge's pinned attachment until the next agent puts them back (a
//! second after it starts). Without TCX (Debian 12's 6.1) a filter an agent
//! killed outright left behind is replaced in place, as on the bridge, and
//! `overlay-agent cleanup` removes it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Result;
use aya::programs::{SchedClassifier, TcAttachType};
use overlay_common::{Hook, kernel::has_tcx};
use tracing::{debug, info, warn};

use super::ports::{VethPort, veth_ports};
use crate::{
    datapath::{Attachment, NL_PRIORITY},
    host::Host,
};

/// The kind of tc filter aya attaches.
const FILTER_KIND: &str = "bpf";

/// How long a new veth is left to the bridge, for the CNI plugins chained after the
/// bridge plugin.
pub const SETTLE: Duration = Duration::from_secs(1);

/// What a [`PodHooks::sync`] pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    pub attached: usize,
    pub detached: usize,
    pub gone: usize,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl fmt::Display for Changes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} attached, {} given back to the bridge, {} gone",
            self.attached, self.detached, self.gone
        )
    }
}

/// The pods' veths that carry `pod_ingress`, by ifindex.
#[derive(Default)]
pub struct PodHooks {
    attached: BTreeMap<u32, Attachment>,
    /// Veths left to the bridge (others' filters, or attaching failed): said once.
    reported: BTreeSet<u32>,
    /// When each veth of the bridge was first seen.
    first_seen: BTreeMap<u32, Instant>,
    /// The time the last pass went by.
    last_pass: Option<Instant>,
}

impl PodHooks {
    /// The names of the veths carrying the program.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.values().map(|a| a.iface.as_str())
    }

    /// When the next veth that the last pass found still waiting for [`SETTLE`] may be
    /// taken, if any waits. (A veth the last pass could not check is not waiting: the
    /// next notification or periodic pass takes it up.)
    pub fn next_settled(&self) -> Option<Instant> {
        let last = self.last_pass?;
        (self.first_seen.values())
            .map(|seen| *seen + SETTLE)
            .filter(|at| *at > last)
            .min()
    }

    /// Makes the program sit on every veth of `bridge` (seen in the sysfs tree `net`)
    /// that nobody else filters and that has been there for [`SETTLE`] at `now`, and on
    /// no other.
    pub async fn sync(
        &mut self,
        prog: &mut SchedClassifier,
        host: &Host,
        net: &Path,
        bridge: &str,
        now: Instant,
    ) -> Result<Changes> {
        let ports = veth_ports(net, bridge)?;
        let present: BTreeSet<u32> = ports.iter().map(|p| p.ifindex).collect();
        let mut changes = Changes::default();
        // Gone with their pods: the kernel removed the attachments with the devices;
        // letting go of the links is all that is left.
        let gone: Vec<u32> = (self.attached.keys().copied())
            .filter(|i| !present.contains(i))
            .collect();
        for ifindex in gone {
            if let Some(a) = self.attached.remove(&ifindex) {
                let _ = a.detach(prog);
                changes.gone += 1;
            }
        }
        self.reported.retain(|i| present.contains(i));
        self.last_pass = Some(now);
        self.first_seen.retain(|i, _| present.contains(i));
        for &ifindex in &present {
            self.first_seen.entry(ifindex).or_insert(now);
        }
        let settled = |p: &VethPort| {
            self.first_seen
                .get(&p.ifindex)
                .is_some_and(|seen| now.saturating_duration_since(*seen) >= SETTLE)
        };
        let settled: Vec<_> = ports.into_iter().filter(settled).collect();
        let ours = prog.info().ok().map(|i| i.id());
        for port in settled {
            let others = match others_filter(host, &port.name, port.ifindex, ours).await {
                Ok(others) => others,
                Err(e) => {
                    debug!(
                        veth = port.name,
                        error = format!("{e:#}"),
                        "reading a pod veth's filters"
                    );
                    continue;
                }
            };
            match (self.attached.contains_key(&port.ifindex), others) {
                (false, false) => match Attachment::new(prog, Hook::PodIngress, &port.name, None) {
                    Ok(a) => {
                        self.attached.insert(port.ifindex, a);
                        self.reported.remove(&port.ifindex);
                        changes.attached += 1;
                    }
                    Err(e) if self.reported.insert(port.ifindex) => warn!(
                        veth = port.name,
                        error = format!("{e:#}"),
                        "could not attach to a pod's veth; its packets go through the bridge"
                    ),
                    Err(_) => {}
                },
                (true, true) => {
                    if let Some(a) = self.attached.remove(&port.ifindex)
                        && let Err(e) = a.detach(prog)
                    {
                        debug!(veth = port.name, error = %e, "detaching from a pod's veth");
                    }
                    self.reported.insert(port.ifindex);
                    changes.detached += 1;
                    info!(
                        veth = port.name,
                        "other tc filters appeared on a pod's veth; its packets go through the bridge again"
                    );
                }
                (false, true) => {
                    if self.reported.insert(port.ifindex) {
                        info!(
                            veth = port.name,
                            "a pod's veth has other tc filters (traffic shaping?); its packets go through the bridge"
                        );
                    }
                }
                (true, false) => {}
            }
        }
        Ok(changes)
    }
}

/// Whether anything but our program filters what `iface` receives: a tc filter other
/// than ours (a bpf filter at our priority, on kernels without TCX), or another TCX
/// program (`ours` is our program's id).
async fn others_filter(host: &Host, iface: &str, ifindex: u32, ours: Option<u32>) -> Result<bool> {
    let tcx = has_tcx();
    if !only_ours(&host.ingress_filters(ifindex).await?, tcx) {
        return Ok(true);
    }
    if !tcx {
        return Ok(false);
    }
    let (_, programs) = SchedClassifier::query_tcx(iface, TcAttachType::Ingress)?;
    Ok(programs.iter().any(|p| Some(p.id()) != ours))
}

/// Whether the tc filters `filters` ((priority, kind) each) are only ours: with TCX we
/// add none, without it only a bpf filter at [`NL_PRIORITY`].
fn only_ours(filters: &[(u16, String)], tcx: bool) -> bool {
    filters
        .iter()
        .all(|(prio, kind)| !tcx && *prio == NL_PRIORITY && kind == FILTER_KIND)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(prio: u16, kind: &str) -> (u16, String) {
        (prio, kind.to_owned())
    }

    #[test]
    fn only_our_own_filter_leaves_a_veth_to_us() {
        assert!(only_ours(&[], true));
        assert!(only_ours(&[], false));
        // Ours, from an earlier agent, without TCX.
        assert!(only_ours(&[f(1, "bpf"), f(1, "bpf")], false));
        // With TCX we add no tc filter: a bpf filter at priority 1 is someone else's.
        assert!(!only_ours(&[f(1, "bpf")], true));
        // The bandwidth plugin's shaping (u32 to an ifb), or any other priority.
        assert!(!only_ours(&[f(1, "u32")], false));
        assert!(!only_ours(&[f(1, "bpf"), f(49152, "bpf")], false));
    }
}
