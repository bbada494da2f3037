//! What the host's netfilter tells of changes the fast path must follow at once:
//!
//! - every commit of an nftables transaction (nft, iptables-nft, kube-proxy in either
//!   mode, policy engines) ends with a `NFT_MSG_NEWGEN` notification to the
//!   `NFNLGRP_NFTABLES` group (`nf_tables_gen_notify` in net/netfilter/nf_tables_api.c):
//!   the fast path moves to a new generation, so that every flow meets the new rules on
//!   its next packet;
//! - the destruction of a conntrack entry (`NFNLGRP_CONNTRACK_DESTROY`): a policy engine
//!   cutting a flow it no longer admits (kube-network-policies' strict mode), `conntrack
//!   -D`, a timeout. An admitted flow whose entry is gone leaves the fast path, so that
//!   its next packet meets the host's rules as a new one.
//!
//! Notifications the kernel could not queue are lost: that counts as a commit. The
//! legacy iptables backend (x_tables) tells nobody of its changes: while it holds
//! tables, the fast path stays off.

use std::io;

use anyhow::{Context as _, Result};
use overlay_common::flows::FlowKey;
use rtnetlink::sys::{
    AsyncSocket as _, AsyncSocketExt as _, SocketAddr, TokioSocket, protocols::NETLINK_NETFILTER,
};

use super::{conntrack, nfnetlink::messages};

/// `NFNLGRP_CONNTRACK_DESTROY` and `NFNLGRP_NFTABLES` (linux/netfilter/nfnetlink.h).
const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;
const NFNLGRP_NFTABLES: u32 = 7;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `NFT_MSG_NEWGEN` (linux/netfilter/nf_tables.h).
const NFT_MSG_NEWGEN: u16 = 15;
/// A rule set of thousands of rules is announced rule by rule before its generation,
/// and a busy node destroys thousands of conntrack entries a second: room for much of
/// either, and an overflow counts as a commit anyway.
const RECEIVE_BUFFER: usize = 8 << 20;
const DATAGRAM: usize = 64 * 1024;

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The ruleset changed, or notifications were lost.
    Committed,
    /// These flows (by their original direction) lost their conntrack entries.
    Destroyed(Vec<FlowKey>),
}

/// The subscription to ruleset commits and conntrack destructions.
pub struct NetfilterEvents {
    socket: TokioSocket,
    buf: Vec<u8>,
}

impl NetfilterEvents {
    /// Subscribes in the agent's network namespace.
    pub fn subscribe() -> Result<Self> {
        let mut socket =
            TokioSocket::new(NETLINK_NETFILTER).context("opening an nfnetlink socket")?;
        socket
            .socket_mut()
            .bind(&SocketAddr::new(0, 0))
            .context("binding an nfnetlink socket")?;
        for group in [NFNLGRP_NFTABLES, NFNLGRP_CONNTRACK_DESTROY] {
            socket
                .socket_ref()
                .add_membership(group)
                .with_context(|| format!("subscribing to nfnetlink group {group}"))?;
        }
        socket
            .socket_ref()
            .set_rx_buf_sz(RECEIVE_BUFFER)
            .context("sizing the nfnetlink notification buffer")?;
        Ok(Self {
            socket,
            buf: Vec::with_capacity(DATAGRAM),
        })
    }

    /// Waits for the next commit or destruction. An error means the socket is unusable.
    pub async fn next(&mut self) -> Result<Event> {
        loop {
            self.buf.clear();
            match self.socket.recv(&mut self.buf).await {
                Ok(()) => {
                    if let Some(event) = read(&self.buf) {
                        return Ok(event);
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(Event::Committed),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading netfilter notifications"),
            }
        }
    }
}

/// What a datagram of notifications tells: a commit if it holds one (a malformed
/// datagram may have), else the TCP and UDP flows it says were destroyed.
pub fn read(datagram: &[u8]) -> Option<Event> {
    let Ok(msgs) = messages(datagram) else {
        return Some(Event::Committed);
    };
    if msgs
        .iter()
        .any(|m| m.kind == NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN)
    {
        return Some(Event::Committed);
    }
    let gone: Vec<FlowKey> = msgs.into_iter().filter_map(conntrack::destroyed).collect();
    (!gone.is_empty()).then_some(Event::Destroyed(gone))
}

#[cfg(test)]
mod tests {
    use super::{super::nfnetlink::Request, *};

    #[test]
    fn a_generation_message_is_a_commit_and_a_rule_alone_is_nothing() {
        let rule = Request::new(10, 6, 0, 0, 2).finish();
        assert_eq!(read(&rule), None);
        let mut both = rule.clone();
        both.extend(Request::new(10, NFT_MSG_NEWGEN as u8, 0, 0, 0).finish());
        assert_eq!(read(&both), Some(Event::Committed));
        let malformed = [64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(read(&malformed), Some(Event::Committed), "assume a commit");
    }

    #[test]
    fn destroyed_flows_are_read_from_their_original_tuple() {
        let key = FlowKey {
            src: [10, 244, 1, 2],
            dst: [10, 244, 2, 2],
            sport: 40000u16.to_be_bytes(),
            dport: 80u16.to_be_bytes(),
            proto: 6,
            _pad: [0; 3],
        };
        let destroy = conntrack::destroy_message(&key);
        assert_eq!(read(&destroy), Some(Event::Destroyed(vec![key])));
        let mut icmp = key;
        icmp.proto = 1;
        assert_eq!(
            read(&conntrack::destroy_message(&icmp)),
            None,
            "not TCP or UDP"
        );
    }
}
