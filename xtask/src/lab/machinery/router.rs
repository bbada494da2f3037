//! Routes to pod subnets on the router. The router knows none, so that a pod's packets
//! to the outside get no reply unless masqueraded; a check that needs the outside to
//! reach pods installs them on purpose and for as long as it runs.

use std::{collections::BTreeSet, net::Ipv4Addr, process::Command};

use anyhow::{Context as _, Result};
use ipnet::Ipv4Net;

use super::{cluster::ROUTER, netns, state::LabState};

/// The protocol of the checks' routes: the router has no other static routes (its own
/// are the kernel's connected routes), so flushing it removes exactly ours.
const PROTO: &str = "static";

/// Routes installed on the router, removed when dropped.
pub(crate) struct RouterRoutes<'a> {
    lab: &'a LabState,
    routes: Vec<(Ipv4Net, Ipv4Addr)>,
}

impl<'a> RouterRoutes<'a> {
    /// Installs `destination via next hop` for each route.
    pub(crate) fn install(lab: &'a LabState, routes: &[(Ipv4Net, Ipv4Addr)]) -> Result<Self> {
        let mut installed = Self {
            lab,
            routes: Vec::new(),
        };
        for &(dst, via) in routes {
            route(lab, "add", dst, via)?;
            installed.routes.push((dst, via));
        }
        Ok(installed)
    }

    /// Routes every node's pod subnet via the node: the outside reaches pods without
    /// translation.
    pub(crate) fn to_pods(lab: &'a LabState) -> Result<Self> {
        let routes: Vec<_> = lab
            .topology
            .nodes
            .iter()
            .map(|n| (n.pod_cidr, n.address))
            .collect();
        Self::install(lab, &routes)
    }

    /// "10.244.2.0/24 via 172.18.0.3, ..."
    pub(crate) fn describe(&self) -> String {
        let routes: Vec<String> = self
            .routes
            .iter()
            .map(|(dst, via)| format!("{dst} via {via}"))
            .collect();
        routes.join(", ")
    }
}

impl Drop for RouterRoutes<'_> {
    fn drop(&mut self) {
        for &(dst, via) in &self.routes {
            if let Err(e) = route(self.lab, "del", dst, via) {
                eprintln!("removing a route from the router: {e:#}");
            }
        }
    }
}

fn route(lab: &LabState, action: &str, dst: Ipv4Net, via: Ipv4Addr) -> Result<()> {
    netns::run(Command::new("ip").args([
        "-n",
        &lab.netns(ROUTER),
        "route",
        action,
        &dst.to_string(),
        "via",
        &via.to_string(),
        "proto",
        PROTO,
    ]))
    .map(drop)
}

/// Removes every route a check put on the router (after a crash, or Ctrl-C).
pub(crate) fn flush(lab: &LabState) -> Result<()> {
    netns::run(Command::new("ip").args([
        "-n",
        &lab.netns(ROUTER),
        "route",
        "flush",
        "proto",
        PROTO,
    ]))
    .map(drop)
}

/// The router's routes into the pod network: none, outside of a check that put some.
pub(crate) fn pod_routes(lab: &LabState) -> Result<BTreeSet<Ipv4Net>> {
    let routes = netns::ip_json(&lab.netns(ROUTER), &["route", "show"])?;
    let mut found = BTreeSet::new();
    for r in routes
        .as_array()
        .context("ip -json route printed no list")?
    {
        let Some(dst) = r["dst"].as_str() else {
            continue;
        };
        // Host routes print without a prefix length; "default" is no pod route.
        let dst = match (dst.parse::<Ipv4Net>(), dst.parse::<Ipv4Addr>()) {
            (Ok(net), _) => net,
            (_, Ok(host)) => Ipv4Net::from(host),
            _ => continue,
        };
        if lab.topology.pod_network.contains(&dst) || dst.contains(&lab.topology.pod_network) {
            found.insert(dst);
        }
    }
    Ok(found)
}
