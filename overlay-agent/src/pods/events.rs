//! rtnetlink notifications of what the agent follows on its own node: devices (the
//! bridge appearing, pods' veths plugged in and gone), addresses (the bridge's gateway
//! address), the bridge's forwarding table (a pod's MAC learned on its port) and tc
//! qdiscs and filters (traffic shaping on a pod's veth). The agent looks at the node
//! again when one of these arrives, instead of every second whatever happens: with a
//! hundred pods, polling cost a netlink dump and a TCX query per veth per second.
//!
//! Only the kind of each message is read, never its attributes: the look that follows
//! reads the state itself, so a message this crate's parsers would not know costs
//! nothing. Nothing tells of another program attached through TCX; the agent's slow
//! periodic look covers that, and a full receive buffer (messages lost) counts as a
//! change. A change to the bridge's forwarding table alone is told apart: reading that
//! table is cheap, and until the agent has a new pod's port, packets for the pod go
//! through the bridge.

use std::io;

use anyhow::{Context as _, Result};
use rtnetlink::{
    packet_core::{NLMSG_OVERRUN, NetlinkBuffer},
    sys::{AsyncSocket as _, AsyncSocketExt as _, SocketAddr, TokioSocket, protocols},
};

/// Notifications queued in the kernel before it drops them: a burst of pod starts, or
/// a node's neighbour churn, fits.
const RECEIVE_BUFFER: usize = 1 << 20;
/// Multicast datagrams carry at most a page or two of messages.
const DATAGRAM: usize = 64 * 1024;

/// What notifications told of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    /// Only the bridge's forwarding table: a pod's MAC learned on its port, moved or
    /// forgotten.
    Forwarding,
    /// Devices, addresses, tc qdiscs or filters, or notifications lost.
    Node,
}

/// The notifications of this network namespace that concern the pods' side of the node.
pub struct HostEvents {
    socket: TokioSocket,
    buf: Vec<u8>,
}

impl HostEvents {
    /// Subscribes to the notifications, in the network namespace the agent runs in.
    pub fn subscribe() -> Result<Self> {
        let mut socket =
            TokioSocket::new(protocols::NETLINK_ROUTE).context("opening an rtnetlink socket")?;
        let groups =
            libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_NEIGH | libc::RTMGRP_TC;
        socket
            .socket_mut()
            .bind(&SocketAddr::new(0, groups as u32))
            .context("subscribing to rtnetlink notifications")?;
        socket
            .socket_ref()
            .set_rx_buf_sz(RECEIVE_BUFFER)
            .context("sizing the notification buffer")?;
        Ok(Self {
            socket,
            buf: Vec::with_capacity(DATAGRAM),
        })
    }

    /// Waits for a notification that may change what the agent sees of the bridge, its
    /// ports or their filters. An error means the socket is unusable.
    pub async fn changed(&mut self) -> Result<Change> {
        loop {
            self.buf.clear();
            match self.socket.recv(&mut self.buf).await {
                Ok(()) => {
                    if let Some(change) = what_changed(&self.buf) {
                        return Ok(change);
                    }
                }
                // The kernel dropped notifications: anything may have changed.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(Change::Node),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading rtnetlink notifications"),
            }
        }
    }
}

/// What the netlink messages in `datagram` tell of that concerns the pods: a change
/// to devices, addresses, tc qdiscs and filters ([`Change::Node`]), or to the bridge's
/// forwarding entries alone ([`Change::Forwarding`]). IPv4 and IPv6 neighbour entries
/// (ARP and NDP, which change all the time on a busy node) tell of nothing.
pub fn what_changed(datagram: &[u8]) -> Option<Change> {
    let mut told = None;
    let mut rest = datagram;
    while let Ok(msg) = NetlinkBuffer::new_checked(rest) {
        let change = match msg.message_type() {
            libc::RTM_NEWLINK | libc::RTM_DELLINK => Some(Change::Node),
            libc::RTM_NEWADDR | libc::RTM_DELADDR => Some(Change::Node),
            libc::RTM_NEWQDISC | libc::RTM_DELQDISC => Some(Change::Node),
            libc::RTM_NEWTFILTER | libc::RTM_DELTFILTER => Some(Change::Node),
            // The first byte of `struct ndmsg` is its family.
            libc::RTM_NEWNEIGH | libc::RTM_DELNEIGH
                if msg.payload().first() == Some(&(libc::AF_BRIDGE as u8)) =>
            {
                Some(Change::Forwarding)
            }
            NLMSG_OVERRUN => Some(Change::Node),
            _ => None,
        };
        told = told.max(change);
        if told == Some(Change::Node) {
            break;
        }
        // Messages are aligned to 4 bytes within a datagram.
        let next = (msg.length() as usize).next_multiple_of(4);
        if next >= rest.len() {
            break;
        }
        rest = &rest[next..];
    }
    told
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A netlink message of `kind` whose payload starts with `family`, padded to 4.
    fn message(kind: u16, family: u8, payload_len: usize) -> Vec<u8> {
        let len = 16 + payload_len;
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]); // flags, sequence, port
        m.push(family);
        m.resize(len.next_multiple_of(4), 0);
        m
    }

    #[test]
    fn devices_addresses_and_tc_changes_are_the_nodes() {
        for kind in [
            libc::RTM_NEWLINK,
            libc::RTM_DELLINK,
            libc::RTM_NEWADDR,
            libc::RTM_DELADDR,
            libc::RTM_NEWQDISC,
            libc::RTM_DELQDISC,
            libc::RTM_NEWTFILTER,
            libc::RTM_DELTFILTER,
        ] {
            assert_eq!(
                what_changed(&message(kind, libc::AF_INET as u8, 16)),
                Some(Change::Node),
                "{kind}"
            );
        }
    }

    #[test]
    fn only_the_bridges_neighbour_entries_concern_pods() {
        for kind in [libc::RTM_NEWNEIGH, libc::RTM_DELNEIGH] {
            let bridge = message(kind, libc::AF_BRIDGE as u8, 12);
            assert_eq!(what_changed(&bridge), Some(Change::Forwarding));
            assert_eq!(what_changed(&message(kind, libc::AF_INET as u8, 12)), None);
            assert_eq!(what_changed(&message(kind, libc::AF_INET6 as u8, 12)), None);
        }
    }

    #[test]
    fn every_message_of_a_datagram_is_looked_at() {
        let mut datagram = message(libc::RTM_NEWNEIGH, libc::AF_INET as u8, 13);
        datagram.extend(message(libc::RTM_NEWROUTE, libc::AF_INET as u8, 12));
        assert_eq!(what_changed(&datagram), None);
        datagram.extend(message(libc::RTM_NEWNEIGH, libc::AF_BRIDGE as u8, 12));
        assert_eq!(what_changed(&datagram), Some(Change::Forwarding));
        // Whatever else the node tells of outweighs the forwarding entries.
        datagram.extend(message(libc::RTM_NEWTFILTER, 0, 20));
        datagram.extend(message(libc::RTM_NEWNEIGH, libc::AF_BRIDGE as u8, 12));
        assert_eq!(what_changed(&datagram), Some(Change::Node));
    }

    #[test]
    fn a_truncated_or_empty_datagram_concerns_nothing() {
        assert_eq!(what_changed(&[]), None);
        let m = message(libc::RTM_NEWLINK, 0, 16);
        assert_eq!(what_changed(&m[..10]), None);
        // A header that claims more than the datagram holds.
        let mut m = message(libc::RTM_NEWLINK, 0, 16);
        m[0] = 200;
        assert_eq!(what_changed(&m), None);
    }
}
