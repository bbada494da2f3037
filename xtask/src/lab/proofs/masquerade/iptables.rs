//! flanneld's masquerade rules, installed with iptables (nft backend) in every node's
//! namespace: the baseline the BPF masquerade is compared with, on nodes with no BPF
//! (the benchmark) or on agents that run without `--ip-masq` (the lab's equivalence
//! test).
//!
//! The rules and their order are those of flanneld's `masqRules()`
//! (flannel-io/flannel, pkg/trafficmngr/iptables/iptables.go at commit 5c96864f, with
//! `KubeProxyMark = "0x4000/0x4000"` from pkg/trafficmngr/trafficmngr.go):
//!
//! ```text
//! -A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
//! -A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -j RETURN        (1)
//! -A FLANNEL-POSTRTG -s <podCIDR> -d <Network> -j RETURN           (2)
//! -A FLANNEL-POSTRTG -s <Network> -d <podCIDR> -j RETURN           (3)
//! -A FLANNEL-POSTRTG ! -s <Network> -d <podCIDR> -j RETURN         (4)
//! -A FLANNEL-POSTRTG -s <Network> ! -d 224.0.0.0/4 -j MASQUERADE --random-fully    (5)
//! -A FLANNEL-POSTRTG ! -s <Network> -d <Network> -j MASQUERADE --random-fully      (6)
//! ```
//!
//! (each with `-m comment --comment "flanneld masq"`).
//!
//! MASQUERADE takes the address of the device a packet leaves through. flanneld's
//! packets to remote pods leave through `flannel.ipip`, which holds the node's pod
//! subnet address as a /32, so rule 6 gives them a source inside the pod network and the
//! remote pod answers through the tunnel. Here there is no tunnel device (the datapath
//! encapsulates on `eth0`): MASQUERADE takes `eth0`'s node address instead.
//! [`Variant::Flanneld`] therefore gives rule 6 the address flanneld's device would give
//! it, our datapath's equivalent: the pod gateway (`SNAT --to-source`), except towards
//! the pods of a node DirectRouting reaches by a plain route through `eth0`, where
//! flanneld's MASQUERADE takes `eth0`'s address too (so it stays); and, as our
//! datapath does, it leaves alone what already leaves from the node's own address (a
//! socket bound to it, or the host's own masquerade: translating that again would be a
//! second NAT), with a RETURN before rule 6. [`Variant::Verbatim`] keeps flanneld's
//! rules word for word, to show what those differences do.

use anyhow::{Context as _, Result};
use ipnet::Ipv4Net;

use crate::lab::machinery::{netns, state::LabState, topology::Node};

pub(crate) const CHAIN: &str = "FLANNEL-POSTRTG";
const COMMENT: &str = "flanneld masq";
const KUBE_PROXY_MARK: &str = "0x4000/0x4000";
const MULTICAST: &str = "224.0.0.0/4";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Variant {
    /// flanneld's rules, rule 6 translating to the address flanneld's tunnel device
    /// would give it (see the module's documentation).
    Flanneld,
    /// flanneld's rules word for word.
    Verbatim,
}

impl Variant {
    /// The run's name in the comparison.
    pub(crate) fn short(self) -> &'static str {
        match self {
            Variant::Flanneld => "iptables",
            Variant::Verbatim => "verbatim",
        }
    }

    pub(crate) fn describe(self) -> &'static str {
        match self {
            Variant::Flanneld => "flanneld's rules (rule 6: SNAT to the pod gateway)",
            Variant::Verbatim => "flanneld's rules word for word (rule 6: MASQUERADE)",
        }
    }
}

/// The arguments of each `iptables -t nat` call that installs `node`'s rules, in order;
/// `direct` are the pod subnets it routes plainly (DirectRouting).
pub(crate) fn rules(
    node: &Node,
    network: &str,
    direct: &[Ipv4Net],
    variant: Variant,
) -> Vec<Vec<String>> {
    let pod = node.pod_cidr.to_string();
    let comment = ["-m", "comment", "--comment", COMMENT];
    let rule = |matches: &[&str], target: &[&str]| -> Vec<String> {
        ["-A", CHAIN]
            .iter()
            .chain(matches)
            .chain(&comment)
            .chain(&["-j"])
            .chain(target)
            .map(|s| (*s).to_owned())
            .collect()
    };
    let gateway = node.gateway().to_string();
    let rule6_target: Vec<&str> = match variant {
        Variant::Flanneld => vec!["SNAT", "--to-source", &gateway, "--random-fully"],
        Variant::Verbatim => vec!["MASQUERADE", "--random-fully"],
    };
    let jump: Vec<String> = ["-A", "POSTROUTING"]
        .iter()
        .chain(&comment)
        .chain(&["-j", CHAIN])
        .map(|s| (*s).to_owned())
        .collect();
    let mut rules = vec![
        vec!["-N".to_owned(), CHAIN.to_owned()],
        jump,
        rule(&["-m", "mark", "--mark", KUBE_PROXY_MARK], &["RETURN"]),
        rule(&["-s", &pod, "-d", network], &["RETURN"]),
        rule(&["-s", network, "-d", &pod], &["RETURN"]),
        rule(&["!", "-s", network, "-d", &pod], &["RETURN"]),
        rule(
            &["-s", network, "!", "-d", MULTICAST],
            &["MASQUERADE", "--random-fully"],
        ),
    ];
    if variant == Variant::Flanneld {
        let own = format!("{}/32", node.address);
        rules.push(rule(&["-s", &own, "-d", network], &["RETURN"]));
        for subnet in direct {
            let subnet = subnet.to_string();
            rules.push(rule(
                &["!", "-s", network, "-d", &subnet],
                &["MASQUERADE", "--random-fully"],
            ));
        }
    }
    rules.push(rule(&["!", "-s", network, "-d", network], &rule6_target));
    rules
}

/// flanneld's rules in every node's namespace, removed when dropped.
pub(crate) struct FlannelRules<'a> {
    lab: &'a LabState,
}

impl<'a> FlannelRules<'a> {
    pub(crate) fn install(lab: &'a LabState, variant: Variant) -> Result<Self> {
        // Removes whatever was installed should a node fail halfway.
        let installed = Self { lab };
        for node in &lab.topology.nodes {
            install_on(lab, node, variant)?;
            // NAT rules bind a flow when its conntrack entry is made: an entry left by
            // an earlier run (a UDP exchange whose source port comes round again
            // within its timeout) would carry the flow past the rules under test.
            netns::run(netns::command(&lab.netns(&node.name), "conntrack").arg("-F"))
                .with_context(|| format!("emptying the conntrack table of {}", node.name))?;
        }
        Ok(installed)
    }
}

/// flanneld's rules on one node, as flanneld adds them when it starts there.
pub(crate) fn install_on(lab: &LabState, node: &Node, variant: Variant) -> Result<()> {
    let network = lab.topology.pod_network.to_string();
    let direct = lab.topology.direct_subnets(node);
    for args in rules(node, &network, &direct, variant) {
        iptables(lab, node, &args)?;
    }
    Ok(())
}

impl Drop for FlannelRules<'_> {
    fn drop(&mut self) {
        if let Err(e) = remove_all(self.lab) {
            eprintln!("removing flanneld's rules: {e:#}");
        }
    }
}

fn iptables(lab: &LabState, node: &Node, args: &[String]) -> Result<String> {
    netns::run(
        netns::command(&lab.netns(&node.name), "iptables")
            .args(["-w", "-t", "nat"])
            .args(args),
    )
    .with_context(|| format!("on {}", node.name))
}

/// Removes flanneld's rules from every node, and the nat table itself when nothing else
/// is left in it (its mere presence keeps the kernel's connection tracking on).
pub(crate) fn remove_all(lab: &LabState) -> Result<()> {
    for node in &lab.topology.nodes {
        if !nat_table_exists(lab, node) {
            continue;
        }
        let jump = [
            "-D",
            "POSTROUTING",
            "-m",
            "comment",
            "--comment",
            COMMENT,
            "-j",
            CHAIN,
        ]
        .map(str::to_owned);
        while iptables(lab, node, &jump).is_ok() {}
        let _ = iptables(lab, node, &["-F".to_owned(), CHAIN.to_owned()]);
        let _ = iptables(lab, node, &["-X".to_owned(), CHAIN.to_owned()]);
        let left = iptables(lab, node, &["-S".to_owned()])?;
        // Only the built-in chains' policies ("-P ...") remain: the table is ours to drop.
        if left.lines().all(|l| l.starts_with("-P ")) {
            netns::run(
                netns::command(&lab.netns(&node.name), "nft")
                    .args(["delete", "table", "ip", "nat"]),
            )?;
        }
    }
    Ok(())
}

fn nat_table_exists(lab: &LabState, node: &Node) -> bool {
    netns::run(netns::command(&lab.netns(&node.name), "nft").args(["list", "table", "ip", "nat"]))
        .is_ok()
}

/// Nodes that still have flanneld's rules (none after the comparison). The nat table
/// itself stays: portmap's chains for the pods' hostPorts (`cni`) live there.
pub(crate) fn leftovers(lab: &LabState) -> Vec<String> {
    lab.topology
        .nodes
        .iter()
        .filter(|n| {
            netns::run(
                netns::command(&lab.netns(&n.name), "nft")
                    .args(["list", "chain", "ip", "nat", CHAIN]),
            )
            .is_ok()
        })
        .map(|n| n.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::machinery::topology::Topology;

    #[test]
    fn rules_are_flanneld_s_in_flanneld_s_order() {
        let t = Topology::kind();
        let w1 = t.node("w1").unwrap();
        let lines: Vec<String> = rules(w1, "10.244.0.0/16", &[], Variant::Flanneld)
            .iter()
            .map(|r| r.join(" "))
            .collect();
        let c = "-m comment --comment flanneld masq";
        assert_eq!(
            lines,
            [
                "-N FLANNEL-POSTRTG".to_owned(),
                format!("-A POSTROUTING {c} -j FLANNEL-POSTRTG"),
                format!("-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {c} -j RETURN"),
                format!("-A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 {c} -j RETURN"),
                format!("-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.1.0/24 {c} -j RETURN"),
                format!("-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 {c} -j RETURN"),
                format!(
                    "-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 {c} -j MASQUERADE --random-fully"
                ),
                format!("-A FLANNEL-POSTRTG -s 172.18.0.3/32 -d 10.244.0.0/16 {c} -j RETURN"),
                format!(
                    "-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 {c} -j SNAT --to-source 10.244.1.1 --random-fully"
                ),
            ]
        );
        // With DirectRouting, rule 6 towards the nodes of w1's segment is flanneld's
        // MASQUERADE, which there takes eth0's address.
        let direct = t.clone().with_direct_routing().direct_subnets(w1);
        assert_eq!(direct.len(), 2, "cp's and w2's");
        let with_direct: Vec<String> = rules(w1, "10.244.0.0/16", &direct, Variant::Flanneld)
            .iter()
            .map(|r| r.join(" "))
            .collect();
        let masquerade = |subnet| {
            format!(
                "-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d {subnet} {c} -j MASQUERADE --random-fully"
            )
        };
        assert_eq!(
            with_direct[8..],
            [
                masquerade("10.244.0.0/24"),
                masquerade("10.244.2.0/24"),
                lines[8].clone()
            ]
        );
        let verbatim = rules(w1, "10.244.0.0/16", &direct, Variant::Verbatim);
        assert_eq!(
            verbatim.last().unwrap().join(" "),
            format!(
                "-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 {c} -j MASQUERADE --random-fully"
            )
        );
    }
}
