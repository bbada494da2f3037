//! The rtnetlink notifications the agent looks at the pods' side of the node on
//! (`overlay_agent::pods::events`): what a pod's start and its shaping change wakes
//! it, the node's ARP churn does not, and a forwarding entry alone is told apart.

use std::time::Duration;

use overlay_agent::pods::events::{
    Change::{self, Forwarding, Node},
    HostEvents,
};
use tokio::{runtime::Runtime, time::timeout};

use super::fixture::{run_tool as run, with_node};

/// Longer than the kernel's link watcher takes to report a carrier change (up to a
/// second), so that no late notification of one step is taken for the next one's.
const QUIET: Duration = Duration::from_millis(1200);

/// What the notifications that concern the pods told of, if one comes within `wait`;
/// the ones after it, up to a [`QUIET`] spell, are read too (and count), so that each
/// step starts afresh.
fn woken(rt: &Runtime, events: &mut HostEvents, wait: Duration) -> Option<Change> {
    rt.block_on(async {
        let mut told = match timeout(wait, events.changed()).await {
            Ok(r) => Some(r.expect("reading notifications")),
            Err(_) => None,
        };
        while let Ok(r) = timeout(QUIET, events.changed()).await {
            told = told.max(Some(r.expect("reading notifications")));
        }
        told
    })
}

#[test]
fn a_pods_start_and_its_shaping_wake_the_agent_arp_churn_does_not() {
    with_node(|_| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let mut events = rt
            .block_on(async { HostEvents::subscribe() })
            .expect("subscribing");
        let wait = Duration::from_secs(2);
        // What the topology's links report once up.
        woken(&rt, &mut events, QUIET);
        let quiet = Duration::from_millis(500);

        // The node's neighbours come and go all the time: not ours to look at.
        run(
            "ip",
            "neigh add 172.18.0.99 lladdr 02:00:00:00:00:99 dev eth0",
        );
        run(
            "ip",
            "neigh change 172.18.0.99 lladdr 02:00:00:00:00:98 dev eth0",
        );
        run("ip", "neigh del 172.18.0.99 dev eth0");
        assert_eq!(woken(&rt, &mut events, quiet), None, "woken by ARP entries");

        // A pod starts: its veth, plugged into the bridge.
        run("ip", "link add podx type veth peer name podx-peer");
        assert_eq!(woken(&rt, &mut events, wait), Some(Node), "a new veth");
        run("ip", "link set podx master cni0 up");
        assert_eq!(
            woken(&rt, &mut events, wait),
            Some(Node),
            "a veth plugged into the bridge"
        );
        // The bridge learns the pod's MAC on that port.
        run("bridge", "fdb add 02:00:00:00:00:77 dev podx master");
        assert_eq!(
            woken(&rt, &mut events, wait),
            Some(Forwarding),
            "a forwarding entry"
        );
        // The bandwidth plugin shapes it.
        run("tc", "qdisc add dev podx ingress");
        assert_eq!(woken(&rt, &mut events, wait), Some(Node), "a qdisc");
        run(
            "tc",
            "filter add dev podx parent ffff: prio 5 protocol all u32 match u32 0 0",
        );
        assert_eq!(woken(&rt, &mut events, wait), Some(Node), "a filter");
        run("tc", "qdisc del dev podx ingress");
        assert_eq!(
            woken(&rt, &mut events, wait),
            Some(Node),
            "the shaping gone"
        );
        // The bridge gets a gateway address.
        run("ip", "addr add 10.99.0.1/24 dev cni0");
        assert_eq!(
            woken(&rt, &mut events, wait),
            Some(Node),
            "a bridge address"
        );
        // The pod leaves.
        run("ip", "link del podx");
        assert_eq!(woken(&rt, &mut events, wait), Some(Node), "a veth gone");
    });
}
