//! The host's connection tracking, through ctnetlink: reading a flow's entry, marking
//! it liberal, and keeping it from timing out while the fast path carries its packets.
//! Attribute numbers and flags from the kernel's uapi headers
//! (`linux/netfilter/nfnetlink_conntrack.h`, `linux/netfilter/nf_conntrack_common.h`,
//! `linux/netfilter/nf_conntrack_tcp.h`); what an update may change, from
//! `ctnetlink_change_conntrack` and `nlattr_to_tcp` in net/netfilter.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, Result, bail};
use overlay_common::{
    flows::FlowKey,
    ip::{IPPROTO_TCP, IPPROTO_UDP},
};
use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use super::nfnetlink::{Attrs, Message, NLM_F_ACK, NLM_F_REQUEST, Request, messages};

const NFNL_SUBSYS_CTNETLINK: u8 = 1;
const IPCTNL_MSG_CT_NEW: u8 = 0;
const IPCTNL_MSG_CT_GET: u8 = 1;
const IPCTNL_MSG_CT_DELETE: u8 = 2;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_HELP: u16 = 5;
const CTA_TIMEOUT: u16 = 7;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
const CTA_PROTOINFO_TCP_FLAGS_ORIGINAL: u16 = 4;
const CTA_PROTOINFO_TCP_FLAGS_REPLY: u16 = 5;

/// `enum ip_conntrack_status` bits.
const IPS_SEEN_REPLY: u32 = 1 << 1;
const IPS_ASSURED: u32 = 1 << 2;
const IPS_CONFIRMED: u32 = 1 << 3;
const IPS_SRC_NAT: u32 = 1 << 4;
const IPS_DST_NAT: u32 = 1 << 5;
const IPS_SEQ_ADJUST: u32 = 1 << 6;
const IPS_DYING: u32 = 1 << 9;
const IPS_UNTRACKED: u32 = 1 << 12;
const IPS_HELPER: u32 = 1 << 13;
/// `TCP_CONNTRACK_ESTABLISHED`.
const TCP_ESTABLISHED: u8 = 3;
/// `IP_CT_TCP_FLAG_BE_LIBERAL`: the window of this direction is not checked.
const TCP_FLAG_BE_LIBERAL: u8 = 0x08;

const AF_INET: u8 = libc::AF_INET as u8;
/// How long an answer may take: the kernel answers at once.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// What the fast path needs to know of a connection tracking entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub status: u32,
    pub original: FlowKey,
    pub reply: FlowKey,
    /// TCP's state (`TCP_CONNTRACK_*`), None for other protocols.
    pub tcp_state: Option<u8>,
    /// A conntrack helper (FTP, SIP...) follows the flow: it must see every packet.
    pub helper: bool,
    /// TCP: neither direction's window is checked (made so by an admission before).
    pub liberal: bool,
}

impl Entry {
    /// Whether the host translates nothing of the flow: neither NAT nor sequence
    /// adjustment, and each direction's tuple the mirror of the other.
    pub fn untranslated(&self) -> bool {
        self.status & (IPS_SRC_NAT | IPS_DST_NAT | IPS_SEQ_ADJUST) == 0
            && self.reply == self.original.reversed()
    }

    /// Whether the fast path may take the flow (see `overlay_common::flows`): the host
    /// confirmed and assured it (it forwarded both ways), nothing translates it or
    /// helps with it, and a TCP flow is established.
    pub fn admissible(&self) -> bool {
        let need = IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED;
        self.status & need == need
            && self.status & (IPS_DYING | IPS_UNTRACKED | IPS_HELPER) == 0
            && !self.helper
            && self.untranslated()
            && self.tcp_state.is_none_or(|s| s == TCP_ESTABLISHED)
    }
}

/// A ctnetlink socket in the agent's network namespace.
pub struct Ctnetlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// What an update found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Updated {
    Done,
    /// No entry of that tuple (it expired, or was removed).
    Gone,
}

impl Ctnetlink {
    pub fn open() -> Result<Self> {
        let mut socket = Socket::new(NETLINK_NETFILTER).context("opening a ctnetlink socket")?;
        socket
            .bind(&SocketAddr::new(0, 0))
            .context("binding a ctnetlink socket")?;
        set_receive_timeout(&socket, ANSWER_TIMEOUT)?;
        Ok(Self {
            socket,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// The entry tracking `key`'s direction (as its original or its reply tuple), if
    /// any.
    pub fn get(&mut self, key: &FlowKey) -> Result<Option<Entry>> {
        let mut request = self.request(IPCTNL_MSG_CT_GET);
        tuple(&mut request, CTA_TUPLE_ORIG, key);
        let mut entry = None;
        match self.exchange(request, |msg| entry = parse_entry(msg))? {
            Updated::Gone => Ok(None),
            Updated::Done => Ok(entry),
        }
    }

    /// Stops the window checks of both directions of `key`'s flow: the packets the host
    /// sees after the fast path took others are in no window it still knows.
    pub fn make_liberal(&mut self, key: &FlowKey) -> Result<Updated> {
        let mut request = self.request(IPCTNL_MSG_CT_NEW);
        tuple(&mut request, CTA_TUPLE_ORIG, key);
        // `struct nf_ct_tcp_flags`: the flags, then the mask of those to change.
        let liberal = [TCP_FLAG_BE_LIBERAL, TCP_FLAG_BE_LIBERAL];
        request.nested(CTA_PROTOINFO, |r| {
            r.nested(CTA_PROTOINFO_TCP, |r| {
                r.attr(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, &liberal)
                    .attr(CTA_PROTOINFO_TCP_FLAGS_REPLY, &liberal);
            });
        });
        self.exchange(request, |_| {})
    }

    /// Sets the entry's timeout to `seconds` from now, as a packet of an established
    /// flow would.
    pub fn refresh(&mut self, key: &FlowKey, seconds: u32) -> Result<Updated> {
        let mut request = self.request(IPCTNL_MSG_CT_NEW);
        tuple(&mut request, CTA_TUPLE_ORIG, key);
        request.attr(CTA_TIMEOUT, &seconds.to_be_bytes());
        self.exchange(request, |_| {})
    }

    fn request(&mut self, kind: u8) -> Request {
        self.seq = self.seq.wrapping_add(1);
        Request::new(
            NFNL_SUBSYS_CTNETLINK,
            kind,
            NLM_F_REQUEST | NLM_F_ACK,
            self.seq,
            AF_INET,
        )
    }

    /// Sends `request` and reads its answer up to the acknowledgement, handing every
    /// other message of it to `each`.
    fn exchange(&mut self, request: Request, mut each: impl FnMut(Message<'_>)) -> Result<Updated> {
        let seq = self.seq;
        self.socket
            .send(&request.finish(), 0)
            .context("sending a ctnetlink request")?;
        loop {
            let n = self
                .socket
                .recv(&mut &mut self.buf[..], 0)
                .context("reading a ctnetlink answer")?;
            for msg in messages(&self.buf[..n])? {
                if msg.seq != seq {
                    continue;
                }
                match msg.error() {
                    None => each(msg),
                    Some(0) => return Ok(Updated::Done),
                    Some(e) if -e == libc::ENOENT => return Ok(Updated::Gone),
                    Some(e) => bail!(
                        "ctnetlink refused a request: {}",
                        std::io::Error::from_raw_os_error(-e)
                    ),
                }
            }
        }
    }
}

fn set_receive_timeout(socket: &Socket, timeout: Duration) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid socket and a timeval that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setting a ctnetlink timeout");
    }
    Ok(())
}

/// Adds `key` as the tuple attribute `kind`.
fn tuple(request: &mut Request, kind: u16, key: &FlowKey) {
    request.nested(kind, |r| {
        r.nested(CTA_TUPLE_IP, |r| {
            r.attr(CTA_IP_V4_SRC, &key.src)
                .attr(CTA_IP_V4_DST, &key.dst);
        })
        .nested(CTA_TUPLE_PROTO, |r| {
            r.attr(CTA_PROTO_NUM, &[key.proto])
                .attr(CTA_PROTO_SRC_PORT, &key.sport)
                .attr(CTA_PROTO_DST_PORT, &key.dport);
        });
    });
}

fn parse_tuple(attrs: Attrs<'_>) -> Option<FlowKey> {
    let ip = attrs.nested(CTA_TUPLE_IP)?;
    let proto = attrs.nested(CTA_TUPLE_PROTO)?;
    let addr = |kind| -> Option<[u8; 4]> { ip.get(kind)?.get(..4)?.try_into().ok() };
    let port = |kind| -> Option<[u8; 2]> { proto.get(kind)?.get(..2)?.try_into().ok() };
    Some(FlowKey {
        src: addr(CTA_IP_V4_SRC)?,
        dst: addr(CTA_IP_V4_DST)?,
        sport: port(CTA_PROTO_SRC_PORT)?,
        dport: port(CTA_PROTO_DST_PORT)?,
        proto: *proto.get(CTA_PROTO_NUM)?.first()?,
        _pad: [0; 3],
    })
}

/// The entry an `IPCTNL_MSG_CT_NEW` message holds.
fn parse_entry(msg: Message<'_>) -> Option<Entry> {
    let attrs = msg.attrs();
    let original = parse_tuple(attrs.nested(CTA_TUPLE_ORIG)?)?;
    let (tcp_state, liberal) = if original.proto == IPPROTO_TCP {
        let tcp = attrs.nested(CTA_PROTOINFO)?.nested(CTA_PROTOINFO_TCP)?;
        // `struct nf_ct_tcp_flags`: the direction's flags come first.
        let liberal = |kind| {
            tcp.get(kind)
                .and_then(|f| f.first())
                .is_some_and(|f| f & TCP_FLAG_BE_LIBERAL != 0)
        };
        (
            Some(*tcp.get(CTA_PROTOINFO_TCP_STATE)?.first()?),
            liberal(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL) && liberal(CTA_PROTOINFO_TCP_FLAGS_REPLY),
        )
    } else {
        (None, false)
    };
    Some(Entry {
        status: attrs.be32(CTA_STATUS)?,
        original,
        reply: parse_tuple(attrs.nested(CTA_TUPLE_REPLY)?)?,
        tcp_state,
        helper: attrs.get(CTA_HELP).is_some(),
        liberal,
    })
}

/// The TCP or UDP flow, by its original tuple, whose destruction a
/// `IPCTNL_MSG_CT_DELETE` notification tells of.
pub fn destroyed(msg: Message<'_>) -> Option<FlowKey> {
    if msg.kind != u16::from(NFNL_SUBSYS_CTNETLINK) << 8 | u16::from(IPCTNL_MSG_CT_DELETE) {
        return None;
    }
    let key = parse_tuple(msg.attrs().nested(CTA_TUPLE_ORIG)?)?;
    matches!(key.proto, IPPROTO_TCP | IPPROTO_UDP).then_some(key)
}

/// A destruction notification of `key`'s flow, as the kernel sends it (the parts the
/// agent reads).
#[cfg(test)]
pub fn destroy_message(key: &FlowKey) -> Vec<u8> {
    let mut msg = Request::new(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_DELETE, 0, 0, AF_INET);
    tuple(&mut msg, CTA_TUPLE_ORIG, key);
    tuple(&mut msg, CTA_TUPLE_REPLY, &key.reversed());
    msg.finish()
}

/// How a flow key reads in logs.
pub fn describe(key: &FlowKey) -> String {
    format!(
        "{} {}:{} -> {}:{}",
        if key.proto == IPPROTO_TCP {
            "tcp"
        } else {
            "udp"
        },
        Ipv4Addr::from(key.src),
        u16::from_be_bytes(key.sport),
        Ipv4Addr::from(key.dst),
        u16::from_be_bytes(key.dport)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> FlowKey {
        FlowKey {
            src: [10, 244, 1, 2],
            dst: [10, 244, 2, 2],
            sport: 40000u16.to_be_bytes(),
            dport: 8080u16.to_be_bytes(),
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        }
    }

    fn established() -> Entry {
        Entry {
            status: IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED,
            original: key(),
            reply: key().reversed(),
            tcp_state: Some(TCP_ESTABLISHED),
            helper: false,
            liberal: false,
        }
    }

    #[test]
    fn only_established_untranslated_unhelped_flows_are_admissible() {
        assert!(established().admissible());
        let nat = |status| Entry {
            status: established().status | status,
            ..established()
        };
        assert!(!nat(IPS_DST_NAT).admissible(), "kube-proxy's DNAT");
        assert!(!nat(IPS_SRC_NAT).admissible(), "a masquerade");
        assert!(!nat(IPS_HELPER).admissible());
        // A translation shows in the tuples even without the status bits.
        let mut moved = established();
        moved.reply.src = [10, 244, 2, 9];
        assert!(!moved.admissible());
        let mut syn = established();
        syn.tcp_state = Some(1);
        assert!(!syn.admissible());
        let mut unassured = established();
        unassured.status &= !IPS_ASSURED;
        assert!(!unassured.admissible());
        let udp = Entry {
            tcp_state: None,
            ..established()
        };
        assert!(udp.admissible());
    }

    /// An answer as the kernel writes it (`ctnetlink_fill_info`), read back.
    #[test]
    fn an_entry_reads_from_its_attributes() {
        let mut msg = Request::new(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_NEW, 0, 1, AF_INET);
        tuple(&mut msg, CTA_TUPLE_ORIG, &key());
        tuple(&mut msg, CTA_TUPLE_REPLY, &key().reversed());
        msg.attr(CTA_STATUS, &(IPS_CONFIRMED | IPS_DST_NAT).to_be_bytes());
        msg.nested(CTA_PROTOINFO, |r| {
            r.nested(CTA_PROTOINFO_TCP, |r| {
                r.attr(CTA_PROTOINFO_TCP_STATE, &[TCP_ESTABLISHED])
                    .attr(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, &[TCP_FLAG_BE_LIBERAL, 0])
                    .attr(CTA_PROTOINFO_TCP_FLAGS_REPLY, &[0, 0]);
            });
        });
        let bytes = msg.finish();
        let parsed = messages(&bytes).unwrap();
        let entry = parse_entry(parsed[0]).unwrap();
        assert_eq!(entry.original, key());
        assert_eq!(entry.reply, key().reversed());
        assert_eq!(entry.status, IPS_CONFIRMED | IPS_DST_NAT);
        assert_eq!(entry.tcp_state, Some(TCP_ESTABLISHED));
        assert!(!entry.helper);
        assert!(!entry.liberal, "only one direction is");
        assert_eq!(describe(&key()), "tcp 10.244.1.2:40000 -> 10.244.2.2:8080");
    }
}
