//! The node's own kernel networking that the overlay needs: interface lookups, MTU,
//! forwarding, the routes that steer host traffic for remote pod subnets to the
//! uplink (where `uplink_egress` encapsulates it), and the blackhole route for this
//! node's own pod subnet (`--ip-blackhole-route`). All through rtnetlink, in the
//! network namespace the agent runs in.

pub mod flanneld_leftovers;
pub mod forward_rules;
pub mod legacy_tables;
pub mod uplink;

use std::{ffi::CString, net::Ipv4Addr};

use anyhow::{Context as _, Result, bail};
use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use rtnetlink::{
    Handle, LinkUnspec, RouteMessageBuilder,
    packet_route::{
        link::{InfoKind, LinkAttribute, LinkInfo},
        route::{
            RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteProtocol, RouteScope,
            RouteType,
        },
        tc::TcAttribute,
    },
};

/// Route protocol number marking routes this agent owns (`ip route ... proto 191`), so
/// that reconciliation never touches anyone else's routes.
pub const RTPROT_OVERLAY: u8 = 191;
const MAIN_TABLE: u8 = 254;
/// The metric of the blackhole route: the highest, so that it only takes what no other
/// route to the subnet does. flanneld's (metric 0) has the metric of the connected
/// route the kernel adds for the pod bridge's address, and the kernel takes the first
/// of two routes with the same prefix and metric: a blackhole added before the bridge
/// has its address swallows the node's pods' traffic, and one added after is refused
/// (EEXIST).
pub const BLACKHOLE_METRIC: u32 = u32::MAX;

/// The ifindex of `name` in this network namespace.
pub fn ifindex_by_name(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call, which only reads it.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => None,
        i => Some(i),
    }
}

/// The MAC address of `name` in this network namespace (sysfs), if it has one.
pub fn mac_by_name(name: &str) -> Option<[u8; 6]> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/address")).ok()?;
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    bytes.try_into().ok()
}

/// A route for a remote pod subnet, as this agent installs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct OverlayRoute {
    pub dst: Ipv4Net,
    /// Next hop towards the owning node: the node itself when it is on-link, otherwise
    /// the underlay gateway to it.
    pub via: Ipv4Addr,
    pub oif: u32,
    /// Preferred source for the host's own packets.
    pub src: Option<Ipv4Addr>,
    /// Uplink MTU minus the outer header, so the host fragments or signals PMTU itself.
    pub mtu: u32,
}

/// How the kernel reaches an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextHop {
    /// None when the address is on a link of this host.
    pub gateway: Option<Ipv4Addr>,
    pub oif: u32,
}

/// A netlink connection to this network namespace.
#[derive(Clone)]
pub struct Host {
    handle: Handle,
}

impl Host {
    /// Opens a connection; its driver runs on the current tokio runtime.
    pub fn connect() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The tc filters on what `ifindex` receives (of its clsact or ingress qdisc), each
    /// as (priority, kind); none without such a qdisc.
    pub async fn ingress_filters(&self, ifindex: u32) -> Result<Vec<(u16, String)>> {
        let mut dump = self
            .handle
            .clone()
            .traffic_filter(ifindex as i32)
            .get()
            .ingress()
            .execute();
        let mut out = Vec::new();
        while let Some(msg) = dump.try_next().await.context("listing tc filters")? {
            let kind = msg.attributes.iter().find_map(|a| match a {
                TcAttribute::Kind(k) => Some(k.clone()),
                _ => None,
            });
            // tcm_info holds the priority above the protocol.
            out.push(((msg.header.info >> 16) as u16, kind.unwrap_or_default()));
        }
        Ok(out)
    }

    pub async fn mtu(&self, ifindex: u32) -> Result<u32> {
        let mut links = self.handle.link().get().match_index(ifindex).execute();
        let link = links
            .try_next()
            .await?
            .with_context(|| format!("no link with index {ifindex}"))?;
        link.attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
            .with_context(|| format!("link {ifindex} reports no MTU"))
    }

    pub async fn set_mtu(&self, ifindex: u32, mtu: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(ifindex).mtu(mtu).build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .with_context(|| format!("setting MTU {mtu} on link {ifindex}"))
    }

    /// IPv4 addresses of interface `ifindex`, or of all interfaces, in kernel order
    /// (primary first).
    pub async fn addresses(&self, ifindex: Option<u32>) -> Result<Vec<Ipv4Addr>> {
        use rtnetlink::packet_route::address::AddressAttribute;
        let mut out = Vec::new();
        let mut request = self.handle.address().get();
        if let Some(i) = ifindex {
            request = request.set_link_index_filter(i);
        }
        let mut addrs = request.execute();
        while let Some(msg) = addrs.try_next().await? {
            for attr in msg.attributes {
                if let AddressAttribute::Address(std::net::IpAddr::V4(a)) = attr {
                    out.push(a);
                }
            }
        }
        Ok(out)
    }

    /// The kernel's route to `dst` (`ip route get`): its gateway, if any, and output
    /// interface.
    pub async fn next_hop(&self, dst: Ipv4Addr) -> Result<NextHop> {
        let query = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, 32)
            .build();
        let mut routes = self.handle.route().get(query).execute();
        let route = routes
            .try_next()
            .await
            .with_context(|| format!("looking up the route to {dst}"))?
            .with_context(|| format!("no route to {dst}"))?;
        let mut gateway = None;
        let mut oif = None;
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Gateway(RouteAddress::Inet(gw)) => gateway = Some(*gw),
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        let Some(oif) = oif else {
            bail!("the route to {dst} has no output interface")
        };
        Ok(NextHop { gateway, oif })
    }

    /// The routes this agent owns, from the main table.
    pub async fn overlay_routes(&self) -> Result<Vec<OverlayRoute>> {
        let filter = RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(u32::from(MAIN_TABLE))
            .protocol(RouteProtocol::Other(RTPROT_OVERLAY))
            .build();
        let mut out = Vec::new();
        let mut routes = self.handle.route().get(filter).execute();
        while let Some(msg) = routes.try_next().await? {
            if owned(&msg, RouteType::Unicast)
                && let Some(r) = parse_route(&msg)
            {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// The blackhole routes this agent owns, from the main table.
    pub async fn blackhole_routes(&self) -> Result<Vec<Ipv4Net>> {
        let filter = RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(u32::from(MAIN_TABLE))
            .protocol(RouteProtocol::Other(RTPROT_OVERLAY))
            .kind(RouteType::BlackHole)
            .build();
        let mut out = Vec::new();
        let mut routes = self.handle.route().get(filter).execute();
        while let Some(msg) = routes.try_next().await? {
            if owned(&msg, RouteType::BlackHole)
                && let Some(dst) = msg.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(*a),
                    _ => None,
                })
                && let Ok(net) = Ipv4Net::new(dst, msg.header.destination_prefix_length)
            {
                out.push(net);
            }
        }
        Ok(out)
    }

    /// A blackhole route to `dst` (see [`BLACKHOLE_METRIC`]). Added, not replacing:
    /// a route of someone else's with the same prefix and metric stays (the pass
    /// fails and says so).
    pub async fn add_blackhole(&self, dst: Ipv4Net) -> Result<()> {
        self.handle
            .route()
            .add(blackhole(dst))
            .execute()
            .await
            .with_context(|| format!("installing blackhole route {dst}"))
    }

    pub async fn delete_blackhole(&self, dst: Ipv4Net) -> Result<()> {
        self.handle
            .route()
            .del(blackhole(dst))
            .execute()
            .await
            .with_context(|| format!("removing blackhole route {dst}"))
    }

    /// Installs `route`, replacing any route to the same destination.
    pub async fn replace_route(&self, route: &OverlayRoute) -> Result<()> {
        let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(route.dst.network(), route.dst.prefix_len())
            .gateway(route.via)
            .output_interface(route.oif)
            .protocol(RouteProtocol::Other(RTPROT_OVERLAY))
            .scope(RouteScope::Universe)
            .table_id(u32::from(MAIN_TABLE));
        if let Some(src) = route.src {
            builder = builder.pref_source(src);
        }
        let mut msg = builder.build();
        msg.attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(route.mtu)]));
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .with_context(|| format!("installing route {} via {}", route.dst, route.via))
    }

    /// The index of the ipip device called `name`, if there is one (a device of
    /// another kind by that name is None).
    pub async fn ipip_device(&self, name: &str) -> Result<Option<u32>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        let link = match links.try_next().await {
            Ok(link) => link,
            // The kernel answers a name it does not know with ENODEV.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => None,
            Err(e) => return Err(e).with_context(|| format!("looking up {name}")),
        };
        Ok(link
            .filter(|l| {
                l.attributes.iter().any(|a| {
                    matches!(a, LinkAttribute::LinkInfo(info)
                        if info.contains(&LinkInfo::Kind(InfoKind::IpIp)))
                })
            })
            .map(|l| l.header.index))
    }

    /// Removes a device (and with it its addresses and routes).
    pub async fn delete_link(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .with_context(|| format!("removing device {index}"))
    }

    /// Removes every route this agent owns, blackhole routes included; returns how
    /// many.
    pub async fn remove_overlay_routes(&self) -> Result<usize> {
        let routes = self.overlay_routes().await?;
        for route in &routes {
            self.delete_route(route).await?;
        }
        let blackholes = self.blackhole_routes().await?;
        for dst in &blackholes {
            self.delete_blackhole(*dst).await?;
        }
        Ok(routes.len() + blackholes.len())
    }

    pub async fn delete_route(&self, route: &OverlayRoute) -> Result<()> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(route.dst.network(), route.dst.prefix_len())
            .protocol(RouteProtocol::Other(RTPROT_OVERLAY))
            .table_id(u32::from(MAIN_TABLE))
            .build();
        self.handle
            .route()
            .del(msg)
            .execute()
            .await
            .with_context(|| format!("removing route {}", route.dst))
    }
}

/// A route of this agent's, of type `kind`, in the main table.
fn owned(msg: &RouteMessage, kind: RouteType) -> bool {
    msg.header.protocol == RouteProtocol::Other(RTPROT_OVERLAY)
        && msg.header.table == MAIN_TABLE
        && msg.header.kind == kind
}

fn blackhole(dst: Ipv4Net) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .kind(RouteType::BlackHole)
        .priority(BLACKHOLE_METRIC)
        .protocol(RouteProtocol::Other(RTPROT_OVERLAY))
        .scope(RouteScope::Universe)
        .table_id(u32::from(MAIN_TABLE))
        .build()
}

fn parse_route(msg: &RouteMessage) -> Option<OverlayRoute> {
    let mut dst = None;
    let mut via = None;
    let mut oif = None;
    let mut src = None;
    let mut mtu = 0;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some(*a),
            RouteAttribute::PrefSource(RouteAddress::Inet(a)) => src = Some(*a),
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => via = Some(*a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Metrics(m) => {
                for metric in m {
                    if let RouteMetric::Mtu(v) = metric {
                        mtu = *v;
                    }
                }
            }
            _ => {}
        }
    }
    Some(OverlayRoute {
        dst: Ipv4Net::new(dst?, msg.header.destination_prefix_length).ok()?,
        via: via?,
        oif: oif?,
        src,
        mtu,
    })
}

/// Turns on IPv4 forwarding in this network namespace: pods' traffic is routed by the
/// host, and the FIB lookups of the datapath require it on the devices involved.
pub fn enable_forwarding() -> Result<()> {
    let path = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(path)
        .map(|v| v.trim() == "1")
        .unwrap_or(false)
    {
        return Ok(());
    }
    std::fs::write(path, "1").with_context(|| format!("enabling forwarding ({path})"))
}
