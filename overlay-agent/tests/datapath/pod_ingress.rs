//! `pod_ingress`: on a pod's veth, the bridge's work done before the bridge, for frames
//! the pod sends to its gateway; and the agent's choice of the veths that carry it.

use std::{path::Path, process::Command, time::Instant};

use overlay_agent::{
    datapath::{Datapath, LoadOptions},
    host::Host,
    pods::veths::{PodHooks, SETTLE},
};
use overlay_common::{DatapathConfig, Hook, Reason};
use tokio::runtime::Runtime;

use super::{
    fixture::{
        Act, Node, assert_bytes_eq, ifindex, namespace_sysfs, run_tool as run, with_node,
        with_node_setup,
    },
    packet::{Transport, datagram, ethernet, from_pod, ipv4},
    topology::{CNI0_MAC, POD, POD_MAC, POD_PORT_MAC, W2, W3},
};

#[test]
fn a_pods_veth_forwards_as_the_bridge_does() {
    with_node(|node| {
        for (to, transport) in [
            (W2.pod, Transport::Tcp),
            (W2.pod, Transport::Udp),
            (W3.pod, Transport::Tcp),
        ] {
            let frame = from_pod(&datagram(ipv4(POD, to), transport, 300));
            node.admit(&frame);
            let bridge = node.expect_outcome(
                Hook::BridgeIngress,
                &frame,
                Act::Redirect,
                Reason::Encapsulated,
            );
            let veth = node.expect_outcome(
                Hook::PodIngress,
                &frame,
                Act::Redirect,
                Reason::Encapsulated,
            );
            // The encapsulated bytes are checked against the wire format in `encap`.
            assert_bytes_eq(&veth.data, &bridge.data, "pod_ingress output");
        }
    });
}

#[test]
fn only_frames_for_the_gateway_are_taken() {
    with_node(|node| {
        let packet = datagram(ipv4(POD, W2.pod), Transport::Udp, 40);
        // To another pod of this node (which may route it on): the bridge's to deliver.
        let frame = ethernet(POD_PORT_MAC, POD_MAC, etherparse::EtherType::IPV4, &packet);
        node.expect_untouched(Hook::PodIngress, &frame, Reason::PassNotForGateway);
        // The same frame to the gateway is encapsulated.
        node.admit(&from_pod(&packet));
        node.expect(
            Hook::PodIngress,
            &from_pod(&packet),
            Act::Redirect,
            Reason::Encapsulated,
        );
    });
}

#[test]
fn nothing_is_taken_before_the_bridge_address_is_known() {
    let unknown = |c: &mut DatapathConfig| c.bridge_mac = [0; 6];
    with_node_setup(LoadOptions::default(), unknown, |node| {
        let frame = from_pod(&datagram(ipv4(POD, W2.pod), Transport::Udp, 40));
        assert_eq!(&frame[..6], &CNI0_MAC.0);
        node.expect_untouched(Hook::PodIngress, &frame, Reason::PassNotForGateway);
    });
}

/// The veths that carry `pod_ingress` after one pass of the agent's sync at `now`, by
/// name.
fn sync(
    rt: &Runtime,
    (dp, hooks): (&mut Datapath, &mut PodHooks),
    host: &Host,
    net: &Path,
    now: Instant,
) -> Vec<String> {
    let prog = dp.program_mut(Hook::PodIngress);
    rt.block_on(hooks.sync(prog, host, net, "cni0", now))
        .expect("syncing the pod veths");
    let mut names: Vec<String> = hooks.attached().map(str::to_owned).collect();
    names.sort();
    names
}

/// Whether the kernel shows `pod_ingress` on `veth`'s ingress (TCX or a tc filter).
fn kernel_shows_it(rt: &Runtime, host: &Host, veth: &str) -> bool {
    let tcx = aya::programs::SchedClassifier::query_tcx(veth, aya::programs::TcAttachType::Ingress)
        .map(|(_, progs)| {
            progs
                .iter()
                .any(|p| p.name_as_str() == Some(Hook::PodIngress.program()))
        })
        .unwrap_or(false);
    let filters = rt
        .block_on(host.ingress_filters(ifindex(veth)))
        .expect("listing filters");
    tcx || filters
        .iter()
        .any(|(prio, kind)| *prio == 1 && kind == "bpf")
}

#[test]
fn the_agent_takes_the_veths_nobody_else_filters() {
    with_node(|node: &mut Node| {
        let (sys, _unmount) = namespace_sysfs();
        let net = sys.path().join("class/net");
        // Two more pods; pod2's egress is filtered the way the CNI bandwidth plugin
        // shapes it: an ingress qdisc on the host end, with a u32 filter (the plugin's
        // sends packets to an ifb device).
        for pod in ["pod1", "pod2"] {
            run(
                "ip",
                &format!("link add {pod} type veth peer name {pod}-peer"),
            );
            run("ip", &format!("link set {pod} master cni0 up"));
        }
        run("tc", "qdisc add dev pod2 ingress");
        run(
            "tc",
            "filter add dev pod2 parent ffff: prio 5 protocol all u32 match u32 0 0",
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let _guard = rt.enter();
        let host = Host::connect().expect("rtnetlink");
        let dp = &mut node.dp;
        let mut hooks = PodHooks::default();
        // New veths wait a while, for the CNI plugins chained after the bridge's; the
        // agent is told when to look again.
        let t0 = Instant::now();
        assert!(sync(&rt, (dp, &mut hooks), &host, &net, t0).is_empty());
        assert_eq!(hooks.next_settled(), Some(t0 + SETTLE));
        assert!(sync(&rt, (dp, &mut hooks), &host, &net, t0 + SETTLE / 2).is_empty());
        let mut now = t0 + SETTLE;
        assert_eq!(
            sync(&rt, (dp, &mut hooks), &host, &net, now),
            ["pod0", "pod1"]
        );
        // pod2 is left to the bridge: nothing is left to wait for.
        assert_eq!(hooks.next_settled(), None);
        assert!(kernel_shows_it(&rt, &host, "pod0") && kernel_shows_it(&rt, &host, "pod1"));
        assert!(!kernel_shows_it(&rt, &host, "pod2"));
        // A pass changes nothing that is right already.
        now += SETTLE;
        assert_eq!(
            sync(&rt, (dp, &mut hooks), &host, &net, now),
            ["pod0", "pod1"]
        );
        // A filter appears on pod1 after we took it: it goes back to the bridge. (The
        // qdisc is there already without TCX: our filter's.)
        let _ = Command::new("tc")
            .args(["qdisc", "add", "dev", "pod1", "clsact"])
            .output();
        run(
            "tc",
            "filter add dev pod1 ingress prio 5 protocol all u32 match u32 0 0",
        );
        assert_eq!(sync(&rt, (dp, &mut hooks), &host, &net, now), ["pod0"]);
        assert!(!kernel_shows_it(&rt, &host, "pod1"));
        // The shaping goes from pod2: it is taken.
        run("tc", "qdisc del dev pod2 ingress");
        assert_eq!(
            sync(&rt, (dp, &mut hooks), &host, &net, now),
            ["pod0", "pod2"]
        );
        // A pod leaves.
        run("ip", "link del pod0");
        assert_eq!(sync(&rt, (dp, &mut hooks), &host, &net, now), ["pod2"]);
    });
}
