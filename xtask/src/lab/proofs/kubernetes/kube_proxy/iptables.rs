//! kube-proxy's iptables mode (`pkg/proxy/iptables/proxier.go`): one
//! `iptables-restore --noflush` input with the filter and nat tables as
//! `syncProxyRules` writes them, preceded by what kube-proxy sets up with single
//! iptables calls (its canary chains, and the jumps from the built-in chains, inserted
//! at the top in its order so that they end in its order). Also the iptables plumbing
//! IPVS mode shares: the jumps, the restore, and the removal.

use std::fmt::Write as _;

use anyhow::Result;

use super::services::{Ep, MASQUERADE_MARK, NodeView, SvcPort, hash, pipe};
use crate::lab::machinery::netns;

/// `route_localnet`, which `iptables.localhostNodePorts` (on by default) needs for
/// NodePorts on 127.0.0.1; KUBE-FIREWALL then drops what arrives from elsewhere for
/// 127.0.0.0/8.
pub(super) const SYSCTLS: &[(&str, &str)] = &[("net/ipv4/conf/all/route_localnet", "1")];

/// Above this many endpoints kube-proxy leaves the comments out of the endpoint rules
/// (`largeClusterEndpointsThreshold`): the benchmark's 2,000 endpoints are past it.
const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// The chains a mode creates: these names, and per-service chains with these prefixes.
pub(super) struct Chains {
    pub names: &'static [&'static str],
    pub prefixes: &'static [&'static str],
}

impl Chains {
    fn contains(&self, chain: &str) -> bool {
        self.names.contains(&chain) || self.prefixes.iter().any(|p| chain.starts_with(p))
    }
}

/// The iptables mode's (KUBE-FIREWALL is kubelet's, which kube-proxy duplicates).
pub(super) const CHAINS: &Chains = &Chains {
    names: &[
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
        "KUBE-PROXY-CANARY",
        "KUBE-FIREWALL",
    ],
    prefixes: &[
        "KUBE-SVC-",
        "KUBE-SVL-",
        "KUBE-EXT-",
        "KUBE-FW-",
        "KUBE-SEP-",
    ],
};

/// `ctstate NEW`, as the jumps to the filter table's service chains match it.
const NEW: &str = "-m conntrack --ctstate NEW";

/// A rule kube-proxy puts at the top of a chain to jump to one of its own:
/// (from, match, comment, to).
pub(super) type Jump = (&'static str, &'static str, &'static str, &'static str);

/// The filter table's jumps, `iptablesJumpChains` then `iptablesKubeletJumpChains`.
const FILTER_JUMPS: &[Jump] = &[
    (
        "INPUT",
        NEW,
        "kubernetes externally-visible service portals",
        "KUBE-EXTERNAL-SERVICES",
    ),
    (
        "FORWARD",
        NEW,
        "kubernetes externally-visible service portals",
        "KUBE-EXTERNAL-SERVICES",
    ),
    (
        "INPUT",
        "",
        "kubernetes health check service ports",
        "KUBE-NODEPORTS",
    ),
    (
        "FORWARD",
        NEW,
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    ("OUTPUT", NEW, "kubernetes service portals", "KUBE-SERVICES"),
    ("FORWARD", "", "kubernetes forwarding rules", "KUBE-FORWARD"),
    (
        "INPUT",
        NEW,
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "OUTPUT",
        NEW,
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "FORWARD",
        NEW,
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    ("INPUT", "", "", "KUBE-FIREWALL"),
    ("OUTPUT", "", "", "KUBE-FIREWALL"),
];

/// The nat table's jumps, the same in IPVS mode.
pub(super) const NAT_JUMPS: &[Jump] = &[
    ("OUTPUT", "", "kubernetes service portals", "KUBE-SERVICES"),
    (
        "PREROUTING",
        "",
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    (
        "POSTROUTING",
        "",
        "kubernetes postrouting rules",
        "KUBE-POSTROUTING",
    ),
];

/// The lines that insert `jumps`, as kube-proxy's `EnsureRule(Prepend, ...)` calls
/// leave them (each inserted at the top, in order).
pub(super) fn jumps(out: &mut String, jumps: &[Jump]) {
    for (from, matches, comment, to) in jumps {
        out.push_str("-I ");
        out.push_str(from);
        if !matches.is_empty() {
            write!(out, " {matches}").unwrap();
        }
        if !comment.is_empty() {
            write!(out, " -m comment --comment \"{comment}\"").unwrap();
        }
        writeln!(out, " -j {to}").unwrap();
    }
}

/// `iptables-restore --noflush` input for `ports` on `node`.
pub(super) fn render(node: &NodeView, ports: &[SvcPort]) -> String {
    let cidr = node.cluster_cidr;
    let large = ports.iter().map(|p| p.endpoints.len()).sum::<usize>() > LARGE_CLUSTER_ENDPOINTS;
    let mut filter = String::new();
    let mut nat_chains = String::new();
    let mut nat = String::new();

    filter.push_str(
        "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" \
         -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n",
    );
    masquerading(&mut nat);

    for p in ports {
        let name = &p.name;
        let proto = p.protocol();
        let match_proto = format!("-m {proto} -p {proto}");
        let chain_hash = hash(&format!("{name}{proto}"), 16);
        let svc_chain = format!("KUBE-SVC-{chain_hash}");
        let svl_chain = format!("KUBE-SVL-{chain_hash}");
        let ext_chain = format!("KUBE-EXT-{chain_hash}");
        let cluster_ip = format!("-d {} --dport {}", p.service.cluster_ip, p.port.port);
        let local: Vec<&Ep> = p.local_endpoints().collect();
        let has_endpoints = p.has_endpoints();
        let has_external = p.has_external_endpoints();
        let (filter_target, filter_comment) = if has_endpoints {
            ("DROP", format!("\"{name} has no local endpoints\""))
        } else {
            ("REJECT", format!("\"{name} has no endpoints\""))
        };

        // Capture the ClusterIP, or reject what comes for it.
        if has_endpoints {
            writeln!(
                nat,
                "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" {match_proto} {cluster_ip} -j {svc_chain}"
            )
            .unwrap();
        } else {
            writeln!(
                filter,
                "-A KUBE-SERVICES -m comment --comment {filter_comment} {match_proto} {cluster_ip} -j REJECT"
            )
            .unwrap();
        }

        // Capture the NodePort on every local address; drop or reject it without
        // endpoints for outside traffic.
        if let Some(node_port) = p.port.node_port {
            if has_endpoints {
                writeln!(
                    nat,
                    "-A KUBE-NODEPORTS -m comment --comment {name} {match_proto} --dport {node_port} -j {ext_chain}"
                )
                .unwrap();
            }
            if !has_external {
                writeln!(
                    filter,
                    "-A KUBE-EXTERNAL-SERVICES -m comment --comment {filter_comment} \
                     -m addrtype --dst-type LOCAL {match_proto} --dport {node_port} -j {filter_target}"
                )
                .unwrap();
            }
        }

        // Masquerade what comes to the ClusterIP from outside the pod network.
        if has_endpoints {
            writeln!(
                nat,
                "-A {svc_chain} -m comment --comment \"{name} cluster IP\" {match_proto} {cluster_ip} \
                 ! -s {cidr} -j KUBE-MARK-MASQ"
            )
            .unwrap();
        }

        // The external (NodePort) chain: masquerade and go to every endpoint, or with
        // Local policy keep the source and go to this node's endpoints, except for
        // pods and the node itself, which go to every endpoint.
        if has_endpoints && p.port.node_port.is_some() {
            writeln!(nat_chains, ":{ext_chain} - [0:0]").unwrap();
            if p.external_local {
                writeln!(
                    nat,
                    "-A {ext_chain} -m comment --comment \"pod traffic for {name} external destinations\" \
                     -s {cidr} -j {svc_chain}"
                )
                .unwrap();
                writeln!(
                    nat,
                    "-A {ext_chain} -m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" \
                     -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"
                )
                .unwrap();
                writeln!(
                    nat,
                    "-A {ext_chain} -m comment --comment \"route LOCAL traffic for {name} external destinations\" \
                     -m addrtype --src-type LOCAL -j {svc_chain}"
                )
                .unwrap();
            } else {
                writeln!(
                    nat,
                    "-A {ext_chain} -m comment --comment \"masquerade traffic for {name} external destinations\" \
                     -j KUBE-MARK-MASQ"
                )
                .unwrap();
            }
            if has_external {
                let policy_chain = if p.external_local {
                    &svl_chain
                } else {
                    &svc_chain
                };
                writeln!(nat, "-A {ext_chain} -j {policy_chain}").unwrap();
            }
        }

        if has_endpoints {
            writeln!(nat_chains, ":{svc_chain} - [0:0]").unwrap();
            to_endpoints(&mut nat, p, &svc_chain, p.endpoints.iter(), large);
        }
        if p.external_local && !local.is_empty() {
            writeln!(nat_chains, ":{svl_chain} - [0:0]").unwrap();
            to_endpoints(&mut nat, p, &svl_chain, local.iter().copied(), large);
        }

        // One chain per endpoint: masquerade hairpin traffic, then DNAT.
        for ep in &p.endpoints {
            let chain = endpoint_chain(p, ep);
            writeln!(nat_chains, ":{chain} - [0:0]").unwrap();
            let comment = comment(large, name);
            writeln!(nat, "-A {chain}{comment} -s {} -j KUBE-MARK-MASQ", ep.ip).unwrap();
            writeln!(
                nat,
                "-A {chain}{comment} {match_proto} -j DNAT --to-destination {}",
                ep.text
            )
            .unwrap();
        }
    }

    nat.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule \
         in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    // kube-proxy leaves the INVALID drop out only where nf_conntrack_tcp_be_liberal
    // is set, which no lab namespace sets.
    filter.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    forwarding(&mut filter);

    let mut out = String::from("*mangle\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n*filter\n");
    for chain in [
        "KUBE-PROXY-CANARY",
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-FIREWALL",
    ] {
        writeln!(out, ":{chain} - [0:0]").unwrap();
    }
    jumps(&mut out, FILTER_JUMPS);
    out.push_str(&filter);
    out.push_str("COMMIT\n*nat\n");
    for chain in [
        "KUBE-PROXY-CANARY",
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        writeln!(out, ":{chain} - [0:0]").unwrap();
    }
    out.push_str(&nat_chains);
    jumps(&mut out, NAT_JUMPS);
    out.push_str(&nat);
    out.push_str("COMMIT\n");
    out
}

/// KUBE-POSTROUTING masquerades what KUBE-MARK-MASQ marked, and clears the mark lest
/// it be masqueraded again; the same in IPVS mode.
pub(super) fn masquerading(nat: &mut String) {
    let mark = MASQUERADE_MARK;
    writeln!(
        nat,
        "-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN"
    )
    .unwrap();
    writeln!(nat, "-A KUBE-POSTROUTING -j MARK --xor-mark {mark}").unwrap();
    nat.push_str(
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" \
         -j MASQUERADE --random-fully\n",
    );
    writeln!(nat, "-A KUBE-MARK-MASQ -j MARK --or-mark {mark}").unwrap();
}

/// KUBE-FORWARD accepts marked traffic (NodePorts forwarded under a FORWARD policy of
/// DROP) and what follows it; the same in IPVS mode.
pub(super) fn forwarding(filter: &mut String) {
    let mark = MASQUERADE_MARK;
    writeln!(
        filter,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"
    )
    .unwrap();
    filter.push_str(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" \
         -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
    );
}

/// ` -m comment --comment <text>` unless the cluster is large.
fn comment(large: bool, text: &str) -> String {
    if large {
        String::new()
    } else {
        format!(" -m comment --comment {text}")
    }
}

/// KUBE-SEP-<hash of service port name, protocol and endpoint>.
fn endpoint_chain(p: &SvcPort, ep: &Ep) -> String {
    format!(
        "KUBE-SEP-{}",
        hash(&format!("{}{}{}", p.name, p.protocol(), ep.text), 16)
    )
}

/// `writeServiceToEndpointRules`: endpoint i of n is taken with probability 1/(n-i),
/// which spreads connections evenly; the last one takes what is left.
fn to_endpoints<'a>(
    nat: &mut String,
    p: &SvcPort,
    chain: &str,
    endpoints: impl ExactSizeIterator<Item = &'a Ep>,
    large: bool,
) {
    let n = endpoints.len();
    for (i, ep) in endpoints.enumerate() {
        let comment = comment(large, &format!("\"{} -> {}\"", p.name, ep.text));
        let statistic = if i + 1 < n {
            format!(
                " -m statistic --mode random --probability {:.10}",
                1.0 / (n - i) as f64
            )
        } else {
            String::new()
        };
        writeln!(
            nat,
            "-A {chain}{comment}{statistic} -j {}",
            endpoint_chain(p, ep)
        )
        .unwrap();
    }
}

/// Feeds `input` to `iptables-restore --noflush` in `ns`.
pub(super) fn restore(ns: &str, input: &str) -> Result<()> {
    pipe(
        netns::command(ns, "iptables-restore").arg("--noflush"),
        input,
    )
}

/// Removes `chains` from every table of `ns`, and the rules elsewhere that jump to them.
pub(super) fn remove(ns: &str, chains: &Chains) -> Result<()> {
    let saved = netns::run(&mut netns::command(ns, "iptables-save"))?;
    let input = removal(&saved, chains);
    if input.is_empty() {
        return Ok(());
    }
    restore(ns, &input)
}

/// `iptables-restore --noflush` input that removes `chains` from the tables in
/// `saved` (`iptables-save` output): their chain lines flush them (with --noflush a
/// chain line flushes only that chain), `-D` drops the jumps from other chains, `-X`
/// deletes them.
fn removal(saved: &str, chains: &Chains) -> String {
    let mut out = String::new();
    let mut table = "";
    let (mut ours, mut jumps) = (Vec::new(), Vec::new());
    for line in saved.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = name;
        } else if let Some(chain) = line.strip_prefix(':') {
            let chain = chain.split(' ').next().unwrap_or_default();
            if chains.contains(chain) {
                ours.push(chain);
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split(' ').next().unwrap_or_default();
            if !chains.contains(chain) && target(rule).is_some_and(|t| chains.contains(t)) {
                jumps.push(rule);
            }
        } else if line == "COMMIT" {
            if !ours.is_empty() || !jumps.is_empty() {
                writeln!(out, "*{table}").unwrap();
                for chain in &ours {
                    writeln!(out, ":{chain} - [0:0]").unwrap();
                }
                for rule in &jumps {
                    writeln!(out, "-D {rule}").unwrap();
                }
                for chain in &ours {
                    writeln!(out, "-X {chain}").unwrap();
                }
                out.push_str("COMMIT\n");
            }
            ours.clear();
            jumps.clear();
        }
    }
    out
}

/// The chain an `iptables-save` rule jumps or goes to (outside quoted comments).
fn target(rule: &str) -> Option<&str> {
    let mut quoted = false;
    let mut escaped = false;
    let mut start = 0;
    let mut words = Vec::new();
    for (i, c) in rule.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                words.push(&rule[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    words.push(&rule[start..]);
    words
        .windows(2)
        .find(|w| w[0] == "-j" || w[0] == "-g")
        .map(|w| w[1])
}

#[cfg(test)]
mod tests {
    use super::{super::fixture::*, *};

    /// What every sync writes, whatever the Services: the base chains of both tables,
    /// the firewall and forwarding rules, and the masquerading ones. Both expected
    /// outputs below are this plus their own lines ([`tables`] sorts, so where the
    /// base stands does not matter).
    const BASE_FILTER: &str = r#"
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
"#;
    const BASE_NAT: &str = r#"
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
"#;

    /// The restore input of `filter` and `nat` rules on top of the base.
    fn expected(filter: &str, nat: &str) -> String {
        format!("*filter{BASE_FILTER}{filter}COMMIT\n*nat{BASE_NAT}{nat}COMMIT\n")
    }

    /// TestOverallIPTablesRules' expected output (pkg/proxy/iptables/proxier_test.go)
    /// beyond the base,
    /// less what the model has no equivalent for: svc5 (a LoadBalancer with source
    /// ranges and affinity), svc2's external IP, LoadBalancer IP and health check
    /// port, and the nfacct-counted rules (see the module documentation: the
    /// INVALID drop without its `-m nfacct`, no localhost NodePort rules). Its fake
    /// iptables has no --random-fully; Debian's iptables has, which kube-proxy then
    /// uses.
    const OVERALL_FILTER: &str = r#"
-A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001 -j DROP
"#;
    const OVERALL_NAT: &str = r#"
:KUBE-EXT-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-EXT-X27LE4BHSL4DOUIK - [0:0]
:KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]
:KUBE-SEP-OYPFS5VJICHGATKP - [0:0]
:KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:KUBE-SEP-UKSFD7AGPMPPLUHC - [0:0]
:KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
:KUBE-SVC-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
-A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK
-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "pod traffic for ns2/svc2:p80 external destinations" -s 10.0.0.0/8 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "masquerade LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "route LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment "masquerade traffic for ns3/svc3:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -s 10.180.0.5 -j KUBE-MARK-MASQ
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.5:80
-A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
-A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -s 10.180.0.4 -j KUBE-MARK-MASQ
-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.4:80
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.5:80" -j KUBE-SEP-C6EBXVWJJZMIWKLZ
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> 10.180.0.2:80" -j KUBE-SEP-RS4RBKLTHTF2IUXJ
-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.180.0.3:80" -j KUBE-SEP-OYPFS5VJICHGATKP
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
"#;

    /// TestExternalTrafficPolicyLocal's expected output (the same file) beyond the
    /// base (its filter table has nothing more), less the
    /// external IP, LoadBalancer IP and health check port the model has no equivalent
    /// for: a NodePort Service with Local policy, one endpoint here, one elsewhere.
    const LOCAL_POLICY_NAT: &str = r#"
:KUBE-EXT-XPGD46QRK7WJZT7O - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:KUBE-SEP-ZX7GRIZKSNUQ3LAJ - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
:KUBE-SVL-XPGD46QRK7WJZT7O - [0:0]
-A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-XPGD46QRK7WJZT7O
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment "pod traffic for ns1/svc1:p80 external destinations" -s 10.0.0.0/8 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment "masquerade LOCAL traffic for ns1/svc1:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
-A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment "route LOCAL traffic for ns1/svc1:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-EXT-XPGD46QRK7WJZT7O -j KUBE-SVL-XPGD46QRK7WJZT7O
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SEP-ZX7GRIZKSNUQ3LAJ -m comment --comment ns1/svc1:p80 -s 10.180.2.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-ZX7GRIZKSNUQ3LAJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.2.1:80
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.2.1:80" -j KUBE-SEP-ZX7GRIZKSNUQ3LAJ
-A KUBE-SVL-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.2.1:80" -j KUBE-SEP-ZX7GRIZKSNUQ3LAJ
"#;

    fn rendered(services: &[Service]) -> String {
        render(&node(), &resolved(services))
    }

    /// The filter and nat tables of `restore`, less what kube-proxy does outside its
    /// restore (the jumps and the canary chains), as sorted lines per table, the way
    /// kube-proxy's assertIPTablesRulesEqual compares them.
    fn tables(restore: &str) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for line in restore.lines().filter(|l| !l.is_empty()) {
            if let Some(table) = line.strip_prefix('*') {
                out.push((table.to_owned(), Vec::new()));
            } else if line != "COMMIT"
                && !line.starts_with("-I ")
                && !line.contains("KUBE-PROXY-CANARY")
            {
                out.last_mut()
                    .expect("a table header first")
                    .1
                    .push(line.to_owned());
            }
        }
        out.retain(|(table, _)| table != "mangle");
        for (_, lines) in &mut out {
            lines.sort();
        }
        out
    }

    #[test]
    fn the_overall_fixture_renders_as_kube_proxys_own_test_expects() {
        assert_eq!(
            tables(&rendered(&overall())),
            tables(&expected(OVERALL_FILTER, OVERALL_NAT))
        );
    }

    #[test]
    fn local_policy_goes_to_this_nodes_endpoints_as_kube_proxys_test_expects() {
        assert_eq!(
            tables(&rendered(&local_policy())),
            tables(&expected("", LOCAL_POLICY_NAT))
        );
    }

    #[test]
    fn udp_ports_get_their_own_chains_and_udp_matches() {
        let text = rendered(&[dns()]);
        let tcp = hash("ns7/svc7:dns-tcptcp", 16);
        let udp = hash("ns7/svc7:dns-udpudp", 16);
        assert_ne!(tcp, udp);
        assert!(text.contains(&format!(
            "-A KUBE-SERVICES -m comment --comment \"ns7/svc7:dns-udp cluster IP\" -m udp -p udp -d 172.30.0.47 --dport 53 -j KUBE-SVC-{udp}\n"
        )));
        assert!(text.contains("-m udp -p udp -j DNAT --to-destination 10.180.0.7:53\n"));
        assert!(text.contains("-m tcp -p tcp -j DNAT --to-destination 10.180.0.7:5353\n"));
    }

    #[test]
    fn endpoints_are_taken_with_even_odds() {
        let text = rendered(&[spread(3)]);
        let odds: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split("--probability ").nth(1))
            .map(|rest| rest.split(' ').next().unwrap())
            .collect();
        assert_eq!(odds, ["0.3333333333", "0.5000000000"]);
    }

    #[test]
    fn past_a_thousand_endpoints_the_endpoint_rules_lose_their_comments() {
        let text = rendered(&[spread(1001)]);
        let sep_rules = text.lines().filter(|l| l.starts_with("-A KUBE-SEP-"));
        assert!(
            sep_rules.clone().count() == 2002 && sep_rules.clone().all(|l| !l.contains("comment"))
        );
        assert!(
            !rendered(&[spread(1000)])
                .lines()
                .any(|l| l.starts_with("-A KUBE-SEP-") && !l.contains("comment"))
        );
    }

    #[test]
    fn the_jumps_end_in_kube_proxys_order() {
        let text = rendered(&[]);
        let mut input: Vec<&str> = Vec::new();
        // Replays the inserts: each goes to the top of its chain.
        for line in text.lines().filter_map(|l| l.strip_prefix("-I INPUT ")) {
            input.insert(0, line);
        }
        assert_eq!(
            input,
            [
                "-j KUBE-FIREWALL",
                "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
                "-m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS",
                "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
            ]
        );
    }

    #[test]
    fn removal_flushes_unlinks_and_deletes_only_kube_proxys_chains() {
        let saved = r#"# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-ROUTER-INPUT - [0:0]
-A INPUT -m comment --comment "a -j KUBE-FORWARD lookalike" -j ACCEPT
-A INPUT -j KUBE-ROUTER-INPUT
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
-A KUBE-SVC-XPGD46QRK7WJZT7O -j KUBE-SEP-SXIVWICOYRO3J4NJ
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
COMMIT
"#;
        assert_eq!(
            removal(saved, CHAINS),
            "*filter\n:KUBE-FORWARD - [0:0]\n-D FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
             -X KUBE-FORWARD\nCOMMIT\n*nat\n:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]\n:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]\n\
             -X KUBE-SVC-XPGD46QRK7WJZT7O\n-X KUBE-SEP-SXIVWICOYRO3J4NJ\nCOMMIT\n"
        );
        assert_eq!(
            removal("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n", CHAINS),
            ""
        );
    }
}
