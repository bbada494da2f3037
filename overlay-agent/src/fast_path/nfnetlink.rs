//! The little of nfnetlink (netlink's netfilter family) the fast path speaks: building a
//! request with nested attributes, and walking the messages and attributes of an
//! answer. Layouts from the kernel's uapi headers: `linux/netlink.h` (message and
//! attribute headers, 4-byte alignment) and `linux/netfilter/nfnetlink.h` (the
//! `nfgenmsg` after each message header).

use anyhow::{Result, bail};

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLA_HDRLEN: usize = 4;
/// `NLA_F_NESTED`: the attribute holds attributes.
const NLA_F_NESTED: u16 = 1 << 15;
/// Both flag bits of an attribute's type.
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));
pub(super) const NLM_F_REQUEST: u16 = 0x01;
pub(super) const NLM_F_ACK: u16 = 0x04;
/// `NLMSG_ERROR`: an error code (0 for an acknowledgement) and the request's header.
pub(super) const NLMSG_ERROR: u16 = 2;
const NFNETLINK_V0: u8 = 0;

const fn align(n: usize) -> usize {
    n.next_multiple_of(4)
}

/// A request being built: the message header, the `nfgenmsg`, then attributes.
pub(super) struct Request {
    buf: Vec<u8>,
}

impl Request {
    /// A message of `subsystem`'s type `kind` (`NFNL_SUBSYS_* << 8 | msg`), for
    /// address `family`.
    pub(super) fn new(subsystem: u8, kind: u8, flags: u16, seq: u32, family: u8) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
        buf.extend_from_slice(&(u16::from(subsystem) << 8 | u16::from(kind)).to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        buf.extend_from_slice(&[family, NFNETLINK_V0, 0, 0]);
        Self { buf }
    }

    /// An attribute holding `data`.
    pub(super) fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        let len = NLA_HDRLEN + data.len();
        self.buf
            .extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align(self.buf.len()), 0);
        self
    }

    /// An attribute holding the attributes `inner` adds.
    pub(super) fn nested(&mut self, kind: u16, inner: impl FnOnce(&mut Self)) -> &mut Self {
        let start = self.buf.len();
        self.attr(kind | NLA_F_NESTED, &[]);
        inner(self);
        let len = u16::try_from(self.buf.len() - start).unwrap_or(u16::MAX);
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    pub(super) fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// One message of a datagram.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub kind: u16,
    pub seq: u32,
    /// What follows the message header (for nfnetlink: the `nfgenmsg`, then
    /// attributes).
    pub payload: &'a [u8],
}

impl<'a> Message<'a> {
    /// The attributes after the `nfgenmsg`.
    pub fn attrs(&self) -> Attrs<'a> {
        Attrs(self.payload.get(NFGENMSG_LEN..).unwrap_or_default())
    }

    /// For `NLMSG_ERROR`: the (negative) errno, 0 for an acknowledgement.
    pub fn error(&self) -> Option<i32> {
        (self.kind == NLMSG_ERROR)
            .then(|| self.payload.get(..4))
            .flatten()
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// The messages of a datagram; a malformed one ends it with an error.
pub(super) fn messages(datagram: &[u8]) -> Result<Vec<Message<'_>>> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            bail!("a netlink message claims {len} bytes of {}", rest.len());
        }
        out.push(Message {
            kind: u16::from_ne_bytes([rest[4], rest[5]]),
            seq: u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]),
            payload: &rest[NLMSG_HDRLEN..len],
        });
        rest = rest.get(align(len)..).unwrap_or_default();
    }
    Ok(out)
}

/// Attributes, as (type without flags, payload); stops at the first malformed one.
#[derive(Debug, Clone, Copy)]
pub struct Attrs<'a>(pub &'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.0;
        let len = usize::from(u16::from_ne_bytes([*rest.first()?, *rest.get(1)?]));
        let kind = u16::from_ne_bytes([*rest.get(2)?, *rest.get(3)?]);
        let payload = rest.get(NLA_HDRLEN..len)?;
        self.0 = rest.get(align(len)..).unwrap_or_default();
        Some((kind & NLA_TYPE_MASK, payload))
    }
}

impl<'a> Attrs<'a> {
    /// The payload of the first attribute of type `kind`.
    pub fn get(self, kind: u16) -> Option<&'a [u8]> {
        self.into_iter().find(|(k, _)| *k == kind).map(|(_, p)| p)
    }

    /// The attributes nested in the first attribute of type `kind`.
    pub fn nested(self, kind: u16) -> Option<Attrs<'a>> {
        self.get(kind).map(Attrs)
    }

    /// A big-endian u32 attribute.
    pub fn be32(self, kind: u16) -> Option<u32> {
        let b = self.get(kind)?;
        Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_reads_back_as_built() {
        let mut req = Request::new(1, 1, NLM_F_REQUEST | NLM_F_ACK, 7, 2);
        req.nested(1, |r| {
            r.nested(1, |r| {
                r.attr(1, &[10, 244, 1, 2]);
            });
            r.attr(2, &[6]);
        })
        .attr(7, &30u32.to_be_bytes());
        let bytes = req.finish();
        assert_eq!(bytes.len() % 4, 0);
        let msgs = messages(&bytes).unwrap();
        assert_eq!(msgs.len(), 1);
        let m = msgs[0];
        assert_eq!((m.kind, m.seq), (0x0101, 7));
        assert_eq!(
            m.payload[..4],
            [2, 0, 0, 0],
            "nfgenmsg: family, version, res_id"
        );
        let attrs = m.attrs();
        assert_eq!(attrs.be32(7), Some(30));
        let tuple = attrs.nested(1).unwrap();
        assert_eq!(tuple.nested(1).unwrap().get(1), Some(&[10, 244, 1, 2][..]));
        // The one-byte attribute is padded, and the next one still found.
        assert_eq!(tuple.get(2), Some(&[6][..]));
    }

    #[test]
    fn malformed_input_ends_the_walk_without_panicking() {
        assert!(messages(&[32, 0, 0, 0, 2, 0]).unwrap().is_empty());
        assert!(messages(&[64, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert_eq!(Attrs(&[200, 0, 1, 0, 9]).count(), 0);
        assert_eq!(Attrs(&[2, 0, 1, 0]).count(), 0, "length below the header");
    }
}
