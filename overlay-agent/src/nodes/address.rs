//! Which address this node is known by (the interface that carries the tunnel is
//! chosen in `host::uplink`).
//!
//! The address other nodes reach this node at, the one it publishes, is one
//! value ([`OwnAddress::resolve`]): with several NICs, what is published cannot be a
//! stale NIC's (the failure of calico's multi-NIC case, where replies left from an
//! address the peer did not know). It is flannel's public IP: `--public-ip` (or the
//! `node-public-ip` annotation) and `public-ip-overwrite` may name an address that is
//! not on the node at all, one a router translates to the interface's. The outer
//! headers therefore carry the interface's own address, as flannel's tunnel device
//! keeps `Local` = the interface address (`pkg/backend/ipip/ipip.go`): the router
//! maps it to the published one on the way out and back on the way in.

use std::net::Ipv4Addr;

use super::node_set::NodeInfo;

/// Who has the last word on this node's tunnel address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authority {
    /// The agent: it picks the address and publishes it on its Node, where every
    /// other node reads it (the Kubernetes API source).
    Agent,
    /// The node list: every agent reads the same file, so this node is reached at
    /// the address the file gives it unless `--public-ip` says otherwise.
    NodeList,
}

/// How this node's tunnel address is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnAddress {
    pub authority: Authority,
    /// `--public-ip`.
    pub public_ip: Option<Ipv4Addr>,
    /// The selected interface's address.
    pub interface: Ipv4Addr,
}

impl OwnAddress {
    /// The address this node is reached at: what peers send to, and (API source)
    /// what it publishes. It need not be on the node (a NAT).
    ///
    /// Agent: the public-ip-overwrite annotation, else `--public-ip`, else the
    /// interface's address, as flanneld publishes it. The Node's own public-ip
    /// annotation is not consulted: it is what we write, possibly stale.
    /// Node list: `--public-ip`, else what the list says.
    pub fn resolve(&self, own: &NodeInfo) -> Ipv4Addr {
        match self.authority {
            Authority::Agent => own.overwrite.or(self.public_ip).unwrap_or(self.interface),
            Authority::NodeList => self.public_ip.unwrap_or(own.tunnel_ip),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn node(tunnel_ip: &str, overwrite: Option<&str>) -> NodeInfo {
        NodeInfo {
            name: "node2".into(),
            pod_cidr: "10.122.124.128/26".parse().unwrap(),
            tunnel_ip: ip(tunnel_ip),
            overwrite: overwrite.map(ip),
            foreign_backend: None,
        }
    }

    #[test]
    fn own_address_precedence() {
        let agent = |public_ip: Option<&str>| OwnAddress {
            authority: Authority::Agent,
            public_ip: public_ip.map(ip),
            interface: ip("192.168.3.111"),
        };
        // A stale public-ip from an earlier run on eth0 does not count: we publish ours.
        let stale = node("192.168.0.111", None);
        assert_eq!(agent(None).resolve(&stale), ip("192.168.3.111"));
        assert_eq!(
            agent(Some("192.168.3.99")).resolve(&stale),
            ip("192.168.3.99")
        );
        let overwritten = node("192.168.0.111", Some("10.9.9.9"));
        assert_eq!(
            agent(Some("192.168.3.99")).resolve(&overwritten),
            ip("10.9.9.9"),
            "the overwrite annotation wins"
        );

        let list = |public_ip: Option<&str>| OwnAddress {
            authority: Authority::NodeList,
            ..agent(public_ip)
        };
        assert_eq!(list(None).resolve(&overwritten), ip("192.168.0.111"));
        assert_eq!(
            list(Some("192.168.3.99")).resolve(&overwritten),
            ip("192.168.3.99")
        );
    }
}
