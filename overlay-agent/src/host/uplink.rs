//! Which interface carries the tunnel: the uplink (the address this node is known by is
//! decided in `nodes::address`).
//!
//! The interface is chosen as flanneld chooses it: `--iface` (a name or one of its
//! addresses, repeatable, first match wins), then `--iface-regex` (matched against
//! addresses, then names), then `--iface-can-reach` (the interface and source address
//! of the route to that address, as `ip route get`: flanneld's `LookupExtIface` with
//! `GetInterfaceBySpecificIPRouting`, flannel-io/flannel v0.28.9 `main.go`,
//! `pkg/ipmatch/match.go`, `pkg/ip/iface.go`), else the interface holding
//! `--public-ip`, else the one of the default route.
//!
//! The chosen interface is the [`Uplink`]: its MTU less the outer header is the pods'.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use anyhow::{Context as _, Result, bail};
use futures::TryStreamExt as _;
use regex::Regex;
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::{
        address::AddressAttribute,
        link::LinkAttribute,
        route::{RouteAddress, RouteAttribute, RouteMessage},
    },
};
use thiserror::Error;
use tracing::info;

const MAIN_TABLE: u32 = 254;

/// Outer IPv4 header overhead.
pub const IPIP_OVERHEAD: u32 = overlay_common::ip::IPV4_HEADER_LEN as u32;

/// The node's uplink.
#[derive(Debug, Clone)]
pub struct Uplink {
    pub name: String,
    pub ifindex: u32,
    pub mtu: u32,
    /// The address that selected it, else its first IPv4 address: what masquerade
    /// translates pod traffic to (rule 5).
    pub address: Ipv4Addr,
}

impl Uplink {
    /// MTU left for pods once the outer header is added.
    pub fn pod_mtu(&self) -> u32 {
        self.mtu - IPIP_OVERHEAD
    }
}

/// One `--iface` value: an interface name, or an address of the wanted interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfaceSpec {
    Name(String),
    Address(Ipv4Addr),
}

impl FromStr for IfaceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = s.parse::<Ipv4Addr>() {
            return Ok(Self::Address(ip));
        }
        if s.parse::<std::net::Ipv6Addr>().is_ok() {
            return Err(format!(
                "{s} is an IPv6 address; the IPIP overlay runs over IPv4"
            ));
        }
        // The kernel's rules for interface names (dev_valid_name).
        if s.is_empty()
            || s.len() > 15
            || s == "."
            || s == ".."
            || s.contains(['/', ':'])
            || s.contains(char::is_whitespace)
        {
            return Err(format!(
                "{s:?} is neither an IPv4 address nor a valid interface name"
            ));
        }
        Ok(Self::Name(s.to_owned()))
    }
}

impl fmt::Display for IfaceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IfaceSpec::Name(n) => f.write_str(n),
            IfaceSpec::Address(a) => a.fmt(f),
        }
    }
}

/// What the operator asked for (`--iface`, `--iface-regex`, `--iface-can-reach`,
/// `--public-ip`).
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub ifaces: Vec<IfaceSpec>,
    pub regexes: Vec<Regex>,
    pub can_reach: Option<Ipv4Addr>,
    pub public_ip: Option<Ipv4Addr>,
}

/// A network interface of this node, as the selection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    /// IPv4 addresses in kernel order (primary first).
    pub addresses: Vec<Ipv4Addr>,
}

/// The node's interfaces and the interface of its default route.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interfaces {
    pub list: Vec<Interface>,
    /// ifindex of the default route with the lowest metric.
    pub default_route: Option<u32>,
    /// The route to the `--iface-can-reach` address, when there is one.
    pub reach: Option<Reach>,
}

/// The route the kernel picks to an address (`ip route get`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    /// Its output interface.
    pub oif: u32,
    /// Its source address.
    pub source: Option<Ipv4Addr>,
}

/// The interface chosen to carry the tunnel, and its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    pub interface: Interface,
    /// The address that selected it (`--iface ADDRESS`, a regex match, `--public-ip`),
    /// else its first IPv4 address.
    pub address: Ipv4Addr,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SelectError {
    #[error("no interface matches: {}; interfaces here: {available}", tried.join("; "))]
    NoMatch {
        tried: Vec<String>,
        available: String,
    },
    #[error(
        "--public-ip {0} is not an address of this node, so it cannot pick the interface; add --iface (interfaces here: {1})"
    )]
    PublicIpNotLocal(Ipv4Addr, String),
    #[error(
        "this node has no default route to pick the tunnel interface from; give --iface (interfaces here: {0})"
    )]
    NoDefaultRoute(String),
    #[error("the default route's interface {0} has no IPv4 address; give --iface")]
    DefaultRouteNoAddress(String),
}

impl Selection {
    /// The interface this selection picks among the node's, as the uplink.
    pub async fn uplink(&self) -> Result<Uplink> {
        let selected = self.select(&Interfaces::read(self.can_reach).await?)?;
        let iface = selected.interface;
        // The pod MTU is the uplink's minus the outer header, and IPv4 needs 68.
        if iface.mtu < IPIP_OVERHEAD + 68 {
            bail!("MTU {} of {} is too small for IPIP", iface.mtu, iface.name);
        }
        info!(
            iface = iface.name,
            address = %selected.address,
            "tunnel interface selected"
        );
        Ok(Uplink {
            name: iface.name,
            ifindex: iface.index,
            mtu: iface.mtu,
            address: selected.address,
        })
    }

    pub fn select(&self, host: &Interfaces) -> Result<Selected, SelectError> {
        if self.ifaces.is_empty() && self.regexes.is_empty() && self.can_reach.is_none() {
            return match self.public_ip {
                Some(ip) => host
                    .by_address(ip)
                    .ok_or_else(|| SelectError::PublicIpNotLocal(ip, host.describe())),
                None => host.by_default_route(),
            };
        }
        let mut tried = Vec::new();
        for spec in &self.ifaces {
            match host.by_spec(spec) {
                Ok(found) => return Ok(found),
                Err(why) => tried.push(format!("--iface {spec}: {why}")),
            }
        }
        for re in &self.regexes {
            match host.by_regex(re) {
                Some(found) => return Ok(found),
                None => tried.push(format!(
                    "--iface-regex {re}: matches no IPv4 address and no interface with one"
                )),
            }
        }
        if let Some(target) = self.can_reach {
            match host.by_reach() {
                Ok(found) => return Ok(found),
                Err(why) => tried.push(format!("--iface-can-reach {target}: {why}")),
            }
        }
        Err(SelectError::NoMatch {
            tried,
            available: host.describe(),
        })
    }
}

impl Interface {
    fn selected(&self, address: Ipv4Addr) -> Selected {
        Selected {
            interface: self.clone(),
            address,
        }
    }

    fn first(&self) -> Option<Selected> {
        self.addresses.first().map(|a| self.selected(*a))
    }
}

impl Interfaces {
    fn by_address(&self, ip: Ipv4Addr) -> Option<Selected> {
        self.list
            .iter()
            .find(|i| i.addresses.contains(&ip))
            .map(|i| i.selected(ip))
    }

    fn by_spec(&self, spec: &IfaceSpec) -> Result<Selected, &'static str> {
        match spec {
            IfaceSpec::Address(ip) => self.by_address(*ip).ok_or("no interface has this address"),
            IfaceSpec::Name(name) => {
                let iface = self
                    .list
                    .iter()
                    .find(|i| i.name == *name)
                    .ok_or("no such interface")?;
                iface.first().ok_or("it has no IPv4 address")
            }
        }
    }

    /// As flanneld: the first address any interface has that matches, else the first
    /// interface whose name matches (and that has an address to use).
    fn by_regex(&self, re: &Regex) -> Option<Selected> {
        self.list
            .iter()
            .find_map(|i| {
                i.addresses
                    .iter()
                    .find(|a| re.is_match(&a.to_string()))
                    .map(|a| i.selected(*a))
            })
            .or_else(|| {
                self.list
                    .iter()
                    .filter(|i| re.is_match(&i.name))
                    .find_map(Interface::first)
            })
    }

    /// The interface of the route to the `--iface-can-reach` address, with the
    /// route's source address, else the interface's first.
    fn by_reach(&self) -> Result<Selected, &'static str> {
        let reach = self.reach.ok_or("no route to it")?;
        let iface = self
            .list
            .iter()
            .find(|i| i.index == reach.oif)
            .ok_or("its route's interface is gone")?;
        match reach.source {
            Some(source) => Ok(iface.selected(source)),
            None => iface
                .first()
                .ok_or("its route's interface has no IPv4 address"),
        }
    }

    fn by_default_route(&self) -> Result<Selected, SelectError> {
        let iface = self
            .default_route
            .and_then(|index| self.list.iter().find(|i| i.index == index))
            .ok_or_else(|| SelectError::NoDefaultRoute(self.describe()))?;
        iface
            .first()
            .ok_or_else(|| SelectError::DefaultRouteNoAddress(iface.name.clone()))
    }

    /// `lo [127.0.0.1], eth0 [172.18.0.3]`, for error messages.
    fn describe(&self) -> String {
        let each: Vec<String> = self
            .list
            .iter()
            .map(|i| {
                let addrs: Vec<String> = i.addresses.iter().map(ToString::to_string).collect();
                format!("{} [{}]", i.name, addrs.join(" "))
            })
            .collect();
        each.join(", ")
    }

    /// Reads this network namespace's interfaces, addresses and default route, and
    /// the route to `reach` when given.
    pub async fn read(reach: Option<Ipv4Addr>) -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        let driver = tokio::spawn(conn);
        let result = async {
            let mut list = Vec::new();
            let mut links = handle.link().get().execute();
            while let Some(link) = links.try_next().await.context("listing interfaces")? {
                let mut name = None;
                let mut mtu = 0;
                for attr in link.attributes {
                    match attr {
                        LinkAttribute::IfName(n) => name = Some(n),
                        LinkAttribute::Mtu(m) => mtu = m,
                        _ => {}
                    }
                }
                if let Some(name) = name {
                    list.push(Interface {
                        name,
                        index: link.header.index,
                        mtu,
                        addresses: Vec::new(),
                    });
                }
            }
            let mut addrs = handle.address().get().execute();
            while let Some(msg) = addrs.try_next().await.context("listing addresses")? {
                // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's
                // on point-to-point links, and the same otherwise.
                let mut local = None;
                let mut address = None;
                for attr in msg.attributes {
                    match attr {
                        AddressAttribute::Local(std::net::IpAddr::V4(a)) => local = Some(a),
                        AddressAttribute::Address(std::net::IpAddr::V4(a)) => address = Some(a),
                        _ => {}
                    }
                }
                if let (Some(a), Some(iface)) = (
                    local.or(address),
                    list.iter_mut().find(|i| i.index == msg.header.index),
                ) {
                    iface.addresses.push(a);
                }
            }
            let query = RouteMessageBuilder::<Ipv4Addr>::new()
                .table_id(MAIN_TABLE)
                .build();
            let mut routes = handle.route().get(query).execute();
            let mut defaults = Vec::new();
            while let Some(msg) = routes.try_next().await.context("listing routes")? {
                if let Some(d) = default_route(&msg) {
                    defaults.push(d);
                }
            }
            let default_route = defaults.into_iter().min().map(|(_, oif)| oif);
            let reach = match reach {
                Some(target) => route_to(&handle, target).await,
                None => None,
            };
            Ok(Self {
                list,
                default_route,
                reach,
            })
        }
        .await;
        driver.abort();
        result
    }
}

/// The route the kernel picks to `target`; None when it has none (the lookup fails
/// with "network unreachable").
async fn route_to(handle: &rtnetlink::Handle, target: Ipv4Addr) -> Option<Reach> {
    let query = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(target, 32)
        .build();
    let msg = handle
        .route()
        .get(query)
        .execute()
        .try_next()
        .await
        .ok()??;
    let mut reach = Reach {
        oif: 0,
        source: None,
    };
    for attr in msg.attributes {
        match attr {
            RouteAttribute::Oif(i) => reach.oif = i,
            RouteAttribute::PrefSource(RouteAddress::Inet(a)) => reach.source = Some(a),
            _ => {}
        }
    }
    (reach.oif != 0).then_some(reach)
}

/// (metric, ifindex) of a default route of the main table.
fn default_route(msg: &RouteMessage) -> Option<(u32, u32)> {
    if msg.header.destination_prefix_length != 0 {
        return None;
    }
    let mut table = u32::from(msg.header.table);
    let mut oif = None;
    let mut metric = 0;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => metric = *p,
            _ => {}
        }
    }
    (table == MAIN_TABLE).then_some((metric, oif?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, index: u32, addrs: &[[u8; 4]]) -> Interface {
        Interface {
            name: name.into(),
            index,
            mtu: 1500,
            addresses: addrs.iter().map(|a| Ipv4Addr::from(*a)).collect(),
        }
    }

    /// Calico's case 2: every node has 192.168.0.x on eth0 and 192.168.3.x on eth1,
    /// and the default route leaves through eth0.
    fn multi_nic() -> Interfaces {
        Interfaces {
            list: vec![
                iface("lo", 1, &[[127, 0, 0, 1]]),
                iface("eth0", 2, &[[192, 168, 0, 113], [192, 168, 0, 200]]),
                iface("cni0", 3, &[]),
                iface("eth1", 4, &[[192, 168, 3, 113]]),
            ],
            default_route: Some(2),
            reach: None,
        }
    }

    fn select(args: &[&str], host: &Interfaces) -> Result<Selected, SelectError> {
        let mut s = Selection::default();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let value = it.next().unwrap();
            match *flag {
                "--iface" => s.ifaces.push(value.parse().unwrap()),
                "--iface-regex" => s.regexes.push(Regex::new(value).unwrap()),
                "--public-ip" => s.public_ip = Some(value.parse().unwrap()),
                "--iface-can-reach" => s.can_reach = Some(value.parse().unwrap()),
                _ => unreachable!("{flag}"),
            }
        }
        s.select(host)
    }

    fn picked(args: &[&str]) -> (String, Ipv4Addr) {
        let s = select(args, &multi_nic()).unwrap();
        (s.interface.name, s.address)
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn default_route_interface_and_its_first_address() {
        assert_eq!(picked(&[]), ("eth0".into(), ip("192.168.0.113")));
        let mut host = multi_nic();
        host.default_route = Some(4);
        assert_eq!(select(&[], &host).unwrap().interface.name, "eth1");
    }

    #[test]
    fn iface_by_name_or_by_address_first_match_wins() {
        assert_eq!(
            picked(&["--iface", "eth1"]),
            ("eth1".into(), ip("192.168.3.113"))
        );
        // By address: that address, even when it is not the interface's first.
        assert_eq!(
            picked(&["--iface", "192.168.0.200"]),
            ("eth0".into(), ip("192.168.0.200"))
        );
        // Missing, address-less and unknown entries are skipped in order.
        assert_eq!(
            picked(&[
                "--iface", "eth9", "--iface", "cni0", "--iface", "10.0.0.1", "--iface", "eth1",
                "--iface", "eth0"
            ]),
            ("eth1".into(), ip("192.168.3.113"))
        );
    }

    #[test]
    fn regex_matches_addresses_before_names_and_comes_after_iface() {
        assert_eq!(
            picked(&["--iface-regex", r"^192\.168\.3\."]),
            ("eth1".into(), ip("192.168.3.113"))
        );
        assert_eq!(
            picked(&["--iface-regex", "^eth1$"]),
            ("eth1".into(), ip("192.168.3.113"))
        );
        // "1" is in lo's address, which comes before eth1's name.
        assert_eq!(
            picked(&["--iface-regex", "1"]),
            ("lo".into(), ip("127.0.0.1"))
        );
        // A name match without an address goes on to the next interface that matches.
        assert_eq!(picked(&["--iface-regex", "^(cni0|eth1)$"]).0, "eth1");
        assert_eq!(
            picked(&["--iface-regex", "^eth1$", "--iface", "eth0"]).0,
            "eth0",
            "--iface is tried before --iface-regex"
        );
        assert_eq!(
            picked(&[
                "--iface",
                "eth9",
                "--iface-regex",
                "nomatch",
                "--iface-regex",
                "th1"
            ])
            .0,
            "eth1"
        );
    }

    #[test]
    fn public_ip_alone_picks_the_interface_holding_it() {
        assert_eq!(
            picked(&["--public-ip", "192.168.3.113"]),
            ("eth1".into(), ip("192.168.3.113"))
        );
        // With --iface, --public-ip does not choose the interface (it may be NATed).
        assert_eq!(
            picked(&["--public-ip", "203.0.113.7", "--iface", "eth1"]).0,
            "eth1"
        );
        assert!(matches!(
            select(&["--public-ip", "203.0.113.7"], &multi_nic()),
            Err(SelectError::PublicIpNotLocal(..))
        ));
    }

    #[test]
    fn errors_say_what_was_tried_and_what_exists() {
        let e = select(&["--iface", "eth9", "--iface-regex", "^wg"], &multi_nic()).unwrap_err();
        let text = e.to_string();
        for part in [
            "--iface eth9: no such interface",
            "--iface-regex ^wg",
            "eth1 [192.168.3.113]",
            "eth0 [192.168.0.113 192.168.0.200]",
        ] {
            assert!(text.contains(part), "{part:?} missing from {text}");
        }
        let e = select(&["--iface", "cni0"], &multi_nic()).unwrap_err();
        assert!(
            e.to_string().contains("cni0: it has no IPv4 address"),
            "{e}"
        );
        let no_default = Interfaces {
            default_route: None,
            ..multi_nic()
        };
        assert!(matches!(
            select(&[], &no_default),
            Err(SelectError::NoDefaultRoute(_))
        ));
        let bare_default = Interfaces {
            default_route: Some(3),
            ..multi_nic()
        };
        assert_eq!(
            select(&[], &bare_default),
            Err(SelectError::DefaultRouteNoAddress("cni0".into()))
        );
    }

    #[test]
    fn can_reach_picks_the_routes_interface_after_iface_and_regex() {
        let mut host = multi_nic();
        host.reach = Some(Reach {
            oif: 4,
            source: None,
        });
        let picked = |args: &[&str], host: &Interfaces| {
            let s = select(args, host).unwrap();
            (s.interface.name, s.address)
        };
        // Not the default route's: the route's interface, and its first address.
        assert_eq!(
            picked(&["--iface-can-reach", "10.9.0.1"], &host),
            ("eth1".into(), ip("192.168.3.113"))
        );
        // --iface and --iface-regex come first; can-reach when they match nothing.
        assert_eq!(
            picked(&["--iface", "eth0", "--iface-can-reach", "10.9.0.1"], &host).0,
            "eth0"
        );
        assert_eq!(
            picked(&["--iface", "eth7", "--iface-can-reach", "10.9.0.1"], &host).0,
            "eth1"
        );
        // The route's source address, when it has one.
        host.reach = Some(Reach {
            oif: 2,
            source: Some(ip("192.168.0.200")),
        });
        assert_eq!(
            picked(&["--iface-can-reach", "10.9.0.1"], &host),
            ("eth0".into(), ip("192.168.0.200"))
        );
        host.reach = None;
        let e = select(&["--iface-can-reach", "10.9.0.1"], &host).unwrap_err();
        assert!(
            e.to_string()
                .contains("--iface-can-reach 10.9.0.1: no route to it"),
            "{e}"
        );
    }

    #[test]
    fn iface_values_are_checked() {
        assert_eq!("eth0".parse(), Ok(IfaceSpec::Name("eth0".into())));
        assert_eq!("10.1.2.3".parse(), Ok(IfaceSpec::Address(ip("10.1.2.3"))));
        for bad in ["", "a/b", "sixteen-chars-xx", "fe80::1", "eth 0"] {
            assert!(bad.parse::<IfaceSpec>().is_err(), "{bad:?}");
        }
    }

    /// The same choice from what the kernel reports, in a network namespace of the
    /// test's own (needs root): two NICs, a secondary address, two default routes.
    #[test]
    fn reads_interfaces_addresses_and_the_default_route() {
        std::thread::spawn(|| {
            // SAFETY: unshare(2) takes no pointer; CLONE_NEWNET moves only this
            // thread, which ends with the test.
            let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(unshared, 0, "needs root");
            for cmd in [
                "link add a0 type veth peer name a1",
                "link add b0 type veth peer name b1",
                "addr add 192.168.0.113/24 dev a0",
                "addr add 192.168.0.200/24 dev a0",
                "addr add 192.168.3.113/24 dev b0",
                "link set a0 up",
                "link set b0 up",
                "link set a1 up",
                "link set b1 up",
                "route add default via 192.168.3.253 dev b0 metric 100",
                "route add default via 192.168.0.253 dev a0 metric 10",
                "route add 10.9.0.0/16 via 192.168.3.253 dev b0",
            ] {
                let ok = std::process::Command::new("ip")
                    .args(cmd.split(' '))
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "ip {cmd}");
            }
            let host = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(Interfaces::read(Some(ip("10.9.1.1"))))
                .unwrap();
            let a0 = host.list.iter().find(|i| i.name == "a0").unwrap();
            assert_eq!(a0.addresses, [ip("192.168.0.113"), ip("192.168.0.200")]);
            assert_eq!(a0.mtu, 1500);
            assert_eq!(host.default_route, Some(a0.index), "the lower metric");
            let default = select(&[], &host).unwrap();
            assert_eq!(
                (default.interface.name.as_str(), default.address),
                ("a0", ip("192.168.0.113"))
            );
            let by_address = select(&["--iface", "192.168.3.113"], &host).unwrap();
            assert_eq!(by_address.interface.name, "b0");
            // `ip route get 10.9.1.1`: b0, from its address.
            let reach = select(&["--iface-can-reach", "10.9.1.1"], &host).unwrap();
            assert_eq!(
                (reach.interface.name.as_str(), reach.address),
                ("b0", ip("192.168.3.113"))
            );
        })
        .join()
        .unwrap();
    }
}
