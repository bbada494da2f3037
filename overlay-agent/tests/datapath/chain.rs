//! Ours is seldom the only program on a node's interfaces (monitoring, shaping,
//! firewalls attach there too): what ours leaves to the kernel must go on to the
//! filters and TCX programs after ours on the same hook.

use std::net::UdpSocket;

use aya::{
    Ebpf,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        tc::{NlOptions, TcAttachOptions, TcHandle},
    },
};
use overlay_agent::datapath::{Counters, OBJECT};
use overlay_common::kernel::has_tcx;
use overlay_common::{Hook, maps::names};

use super::{fixture::with_node, topology::W2};

/// Packets `hook`'s program counted, whatever the outcome.
fn seen(counters: &Counters, hook: Hook) -> u64 {
    counters
        .all()
        .expect("reading COUNTERS")
        .into_iter()
        .filter(|(h, _, _)| *h == hook)
        .map(|(_, _, c)| c.packets)
        .sum()
}

#[test]
fn a_program_after_ours_sees_what_ours_passes() {
    with_node(|node| {
        // Nothing but the datagrams below leaves eth0 (its neighbours are permanent).
        std::fs::write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1")
            .expect("turning IPv6 off in the test namespace");
        node.dp
            .attach(Hook::UplinkEgress, "eth0")
            .expect("attaching ours");
        // A second copy of the object stands for someone else's program: maps of its
        // own, attached after ours (last among TCX links, or a filter at a later
        // priority than our cls_bpf filter's).
        let mut other = Ebpf::load(OBJECT).expect("loading a second copy");
        let prog: &mut SchedClassifier = other
            .program_mut(Hook::UplinkEgress.program())
            .expect("the program")
            .try_into()
            .expect("a TC program");
        prog.load().expect("loading the other program");
        let options = if has_tcx() {
            TcAttachOptions::TcxOrder(LinkOrder::last())
        } else {
            TcAttachOptions::Netlink(NlOptions {
                priority: 2,
                handle: TcHandle::new(0, 1),
                ..NlOptions::default()
            })
        };
        prog.attach_with_options("eth0", TcAttachType::Egress, options)
            .expect("attaching the other program after ours");
        let others = Counters::new(other.take_map(names::COUNTERS).expect("its counters"))
            .expect("its counters");

        // The host's own datagrams to a peer node: not pod traffic, ours passes them.
        let socket = UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
        for _ in 0..3 {
            socket.send_to(b"x", (W2.node, 9)).expect("sending");
        }
        let ours = seen(&node.dp.counters, Hook::UplinkEgress);
        assert_eq!(ours, 3, "ours saw the host's datagrams");
        assert_eq!(
            seen(&others, Hook::UplinkEgress),
            ours,
            "the program after ours saw every packet ours passed"
        );
    });
}
