//! A little of each kind of outcome, for the tests of what observes the datapath (program
//! logs, metrics, inspection).

use etherparse::IpEcn;
use overlay_common::{Hook, Reason};

use super::{
    fixture::{Act, Node},
    packet::{Transport, datagram, from_peer, from_pod, ipv4, tunnelled_tcp},
    topology::{POD, STRANGER, W2},
};

/// The frames [`exchange`] ran.
pub(super) struct Exchange {
    /// A pod's packet to a pod of w2: encapsulated on the bridge.
    pub to_w2: Vec<u8>,
    /// w2's answer: decapsulated on the uplink.
    pub from_w2: Vec<u8>,
    /// IPIP from a stranger: dropped on the uplink (`DropUnknownPeer`).
    pub spoofed: Vec<u8>,
}

/// Runs the frames of an [`Exchange`] through `node`, checking each verdict. The flow
/// is admitted to the fast path first.
pub(super) fn exchange(node: &mut Node) -> Exchange {
    let to_w2 = from_pod(&datagram(ipv4(POD, W2.pod), Transport::Udp, 50));
    node.admit(&to_w2);
    node.expect(
        Hook::BridgeIngress,
        &to_w2,
        Act::Redirect,
        Reason::Encapsulated,
    );
    let answer = datagram(ipv4(W2.pod, POD), Transport::Udp, 70);
    let from_w2 = from_peer(W2.node, IpEcn::NotEct, &answer);
    node.admit(&from_w2);
    node.expect(
        Hook::UplinkIngress,
        &from_w2,
        Act::Redirect,
        Reason::DecapsulatedToBridge,
    );
    let spoofed = tunnelled_tcp(STRANGER, W2.pod, POD, 40);
    node.expect(
        Hook::UplinkIngress,
        &spoofed,
        Act::Shot,
        Reason::DropUnknownPeer,
    );
    Exchange {
        to_w2,
        from_w2,
        spoofed,
    }
}
