//! `POD_PORTS`: the agent learns each local pod's port from the bridge's forwarding
//! table, and `uplink_ingress` hands decapsulated packets for a known pod straight to
//! its veth (`bpf_redirect_peer`) instead of to the bridge.

use overlay_agent::pods::ports::{self, learned};
use overlay_common::{Hook::UplinkIngress, Reason, maps::PodPort};

use super::{
    expect::{TO_POD, decapsulated},
    fixture::{Act, ifindex, namespace_sysfs, with_node},
    packet::{Transport, datagram, from_peer, ipv4},
    topology::{POD, POD_MAC, W2},
};

fn pod_port() -> PodPort {
    PodPort {
        ifindex: ifindex("pod0"),
        bridge: ifindex("cni0"),
    }
}

/// `bridge fdb <action> <mac> dev pod0 master static` in this thread's namespace.
fn fdb(action: &str, mac: &str) {
    let status = std::process::Command::new("bridge")
        .args(["fdb", action, mac, "dev", "pod0", "master", "static"])
        .status()
        .expect("running bridge");
    assert!(status.success(), "bridge fdb {action} {mac}");
}

#[test]
fn ports_come_from_the_bridge_forwarding_table() {
    with_node(|node| {
        let (sys, _unmount) = namespace_sysfs();
        let net = sys.path().join("class/net");
        assert!(learned(&net, "no-such-bridge").unwrap().is_empty());
        // What the bridge learns from a pod's first frame, here as a static entry. (The
        // bridge may have learned the fixture's pod already from its own frames.)
        let mac = [0x02, 0x00, 0x0a, 0xf4, 0x01, 0x77];
        let text = mac.map(|b| format!("{b:02x}")).join(":");
        fdb("add", &text);
        let found = learned(&net, "cni0").unwrap();
        assert_eq!(found.get(&mac), Some(&pod_port()));
        // Only veth ports, and never the bridge's own (local) addresses.
        assert!(found.values().all(|p| *p == pod_port()), "{found:?}");
        let changes = ports::sync(&mut node.dp.pod_ports, &net, "cni0").unwrap();
        assert_eq!(changes.added, found.len());
        assert_eq!(node.dp.pod_ports.entries().unwrap(), found);
        // The pod leaves: its entry goes.
        fdb("del", &text);
        let changes = ports::sync(&mut node.dp.pod_ports, &net, "cni0").unwrap();
        assert_eq!(changes.removed, 1);
        assert!(!node.dp.pod_ports.entries().unwrap().contains_key(&mac));
    });
}

#[test]
fn a_pod_with_a_known_port_gets_the_same_packet() {
    with_node(|node| {
        let (sys, _unmount) = namespace_sysfs();
        let net = sys.path().join("class/net");
        fdb("replace", &POD_MAC.to_string());
        ports::sync(&mut node.dp.pod_ports, &net, "cni0").unwrap();
        assert_eq!(
            node.dp.pod_ports.entries().unwrap().get(&POD_MAC.0),
            Some(&pod_port())
        );
        for transport in [Transport::Tcp, Transport::Udp] {
            let frame = from_peer(
                W2.node,
                etherparse::IpEcn::NotEct,
                &datagram(ipv4(W2.pod, POD), transport, 90),
            );
            node.admit(&frame);
            node.expect_frame(
                UplinkIngress,
                &frame,
                Act::Redirect,
                Reason::Decapsulated,
                &decapsulated(&frame, 1, TO_POD),
            );
        }
    });
}
