//! kube-proxy's nftables mode (`pkg/proxy/nftables/proxier.go`): the whole
//! `table ip kube-proxy` as one `nft -f` transaction, as `setupNFTables` and a full
//! `syncProxyRules` on a clean node write it. Services are dispatched by verdict maps
//! (`service-ips`, `service-nodeports`) to per-service chains named
//! `<prefix>-<hash>-namespace/name/protocol/port`, which pick an endpoint chain with
//! `numgen random mod N`.

use std::fmt::Write as _;

use anyhow::Result;

use super::services::{Ep, MASQUERADE_MARK, NodeView, SvcPort, hash, pipe};
use crate::lab::machinery::netns;

/// The nftables mode sets no sysctl of its own (it has no localhost NodePorts).
pub(super) const SYSCTLS: &[(&str, &str)] = &[];

const TABLE: &str = "ip kube-proxy";

/// Base chains (`nftablesBaseChains`): the filter chains that must see the destination
/// before DNAT run just before it (-110), the others at the filter priority (0).
const BASE_CHAINS: &[(&str, &str, &str, i32)] = &[
    ("filter-prerouting-pre-dnat", "filter", "prerouting", -110),
    ("filter-output-pre-dnat", "filter", "output", -110),
    ("filter-input", "filter", "input", 0),
    ("filter-forward", "filter", "forward", 0),
    ("filter-output", "filter", "output", 0),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
];

/// `nftablesJumpChains`: (to, from, match).
const JUMP_CHAINS: &[(&str, &str, &str)] = &[
    ("nodeport-endpoints-check", "filter-input", "ct state new "),
    ("service-endpoints-check", "filter-input", "ct state new "),
    ("service-endpoints-check", "filter-forward", "ct state new "),
    ("service-endpoints-check", "filter-output", "ct state new "),
    (
        "firewall-check",
        "filter-prerouting-pre-dnat",
        "ct state new ",
    ),
    ("firewall-check", "filter-output-pre-dnat", "ct state new "),
    ("services", "nat-output", ""),
    ("services", "nat-prerouting", ""),
    ("masquerading", "nat-postrouting", ""),
    ("cluster-ips-check", "filter-forward", "ct state new "),
    ("cluster-ips-check", "filter-output", "ct state new "),
];

/// `nft -f` input for `ports` on `node`.
pub(super) fn render(node: &NodeView, ports: &[SvcPort]) -> String {
    let mut out = String::new();
    setup(&mut out);
    let cidr = node.cluster_cidr;
    let mut last_cluster_ip = None;
    for p in ports {
        let name = &p.name;
        let proto = p.protocol();
        let base = hash_and_name(&format!(
            "{}/{}/{proto}/{}",
            p.service.namespace, p.service.name, p.port.name
        ));
        let service_chain = format!("service-{base}");
        let local_chain = format!("local-{base}");
        let external_chain = format!("external-{base}");
        let cluster_ip = p.service.cluster_ip;
        let port = p.port.port;
        let has_endpoints = p.has_endpoints();
        let has_external = p.has_external_endpoints();
        let local: Vec<&Ep> = p.local_endpoints().collect();
        let uses_local_chain = p.external_local && !local.is_empty();
        let uses_external_chain = has_endpoints && p.port.node_port.is_some();

        // Chains first: the rules and map elements below refer to them.
        for ep in &p.endpoints {
            writeln!(out, "add chain {TABLE} {}", endpoint_chain(p, ep)).unwrap();
        }
        if has_endpoints {
            writeln!(out, "add chain {TABLE} {service_chain}").unwrap();
        }
        if uses_local_chain {
            writeln!(out, "add chain {TABLE} {local_chain}").unwrap();
        }
        if uses_external_chain {
            writeln!(out, "add chain {TABLE} {external_chain}").unwrap();
        }

        if has_endpoints {
            writeln!(
                out,
                "add rule {TABLE} {service_chain} ip daddr {cluster_ip} ip saddr != {cidr} jump mark-for-masquerade"
            )
            .unwrap();
            to_endpoints(&mut out, p, &service_chain, p.endpoints.iter());
        }
        if uses_external_chain {
            if p.external_local {
                writeln!(
                    out,
                    "add rule {TABLE} {external_chain} ip saddr {cidr} goto {service_chain} comment \"short-circuit pod traffic\""
                )
                .unwrap();
                writeln!(
                    out,
                    "add rule {TABLE} {external_chain} fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\""
                )
                .unwrap();
                writeln!(
                    out,
                    "add rule {TABLE} {external_chain} fib saddr type local goto {service_chain} comment \"short-circuit local traffic\""
                )
                .unwrap();
            } else {
                writeln!(
                    out,
                    "add rule {TABLE} {external_chain} jump mark-for-masquerade"
                )
                .unwrap();
            }
            if has_external {
                let policy_chain = if p.external_local {
                    &local_chain
                } else {
                    &service_chain
                };
                writeln!(out, "add rule {TABLE} {external_chain} goto {policy_chain}").unwrap();
            }
        }
        if uses_local_chain {
            to_endpoints(&mut out, p, &local_chain, local.iter().copied());
        }
        for ep in &p.endpoints {
            let chain = endpoint_chain(p, ep);
            writeln!(
                out,
                "add rule {TABLE} {chain} ip saddr {} jump mark-for-masquerade",
                ep.ip
            )
            .unwrap();
            writeln!(
                out,
                "add rule {TABLE} {chain} meta l4proto {proto} dnat to {}",
                ep.text
            )
            .unwrap();
        }

        // Map elements. kube-proxy keeps each element once: a Service's ClusterIP
        // is the same for all its ports.
        if last_cluster_ip != Some(cluster_ip) {
            writeln!(out, "add element {TABLE} cluster-ips {{ {cluster_ip} }}").unwrap();
            last_cluster_ip = Some(cluster_ip);
        }
        if has_endpoints {
            writeln!(
                out,
                "add element {TABLE} service-ips {{ {cluster_ip} . {proto} . {port} : goto {service_chain} }}"
            )
            .unwrap();
        } else {
            writeln!(
                out,
                "add element {TABLE} no-endpoint-services {{ {cluster_ip} . {proto} . {port} comment \"{name}\" : goto reject-chain }}"
            )
            .unwrap();
        }
        if let Some(node_port) = p.port.node_port {
            if has_endpoints {
                writeln!(
                    out,
                    "add element {TABLE} service-nodeports {{ {proto} . {node_port} : goto {external_chain} }}"
                )
                .unwrap();
            }
            if !has_external {
                // No endpoints at all: reject; none here with Local policy: drop.
                let verdict = if has_endpoints {
                    "drop"
                } else {
                    "goto reject-chain"
                };
                writeln!(
                    out,
                    "add element {TABLE} no-endpoint-nodeports {{ {proto} . {node_port} comment \"{name}\" : {verdict} }}"
                )
                .unwrap();
            }
        }
    }
    out
}

/// The table, its base chains, sets, maps and fixed rules (`setupNFTables`, with no
/// `--nodeport-addresses`: NodePorts on every local address but 127.0.0.0/8).
fn setup(out: &mut String) {
    let mark = MASQUERADE_MARK;
    writeln!(
        out,
        "add table {TABLE} {{ comment \"rules for kube-proxy\" ; }}"
    )
    .unwrap();
    for (chain, kind, hook, priority) in BASE_CHAINS {
        writeln!(
            out,
            "add chain {TABLE} {chain} {{ type {kind} hook {hook} priority {priority} ; }}"
        )
        .unwrap();
    }
    let mut created: Vec<&str> = Vec::new();
    for (to, from, matches) in JUMP_CHAINS {
        if !created.contains(to) {
            writeln!(out, "add chain {TABLE} {to}").unwrap();
            created.push(to);
        }
        writeln!(out, "add rule {TABLE} {from} {matches}jump {to}").unwrap();
    }
    for chain in ["mark-for-masquerade", "masquerading"] {
        writeln!(out, "add chain {TABLE} {chain}").unwrap();
    }
    writeln!(
        out,
        "add rule {TABLE} mark-for-masquerade mark set mark or {mark}"
    )
    .unwrap();
    writeln!(
        out,
        "add rule {TABLE} masquerading mark and {mark} == 0 return"
    )
    .unwrap();
    writeln!(
        out,
        "add rule {TABLE} masquerading mark set mark xor {mark}"
    )
    .unwrap();
    writeln!(out, "add rule {TABLE} masquerading masquerade fully-random").unwrap();

    let service_map = "ipv4_addr . inet_proto . inet_service : verdict";
    let port_map = "inet_proto . inet_service : verdict";
    writeln!(
        out,
        "add set {TABLE} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    )
    .unwrap();
    writeln!(
        out,
        "add rule {TABLE} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
    )
    .unwrap();
    writeln!(
        out,
        "add map {TABLE} no-endpoint-services {{ type {service_map} ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
    )
    .unwrap();
    writeln!(
        out,
        "add map {TABLE} no-endpoint-nodeports {{ type {port_map} ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
    )
    .unwrap();
    writeln!(
        out,
        "add chain {TABLE} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
    )
    .unwrap();
    writeln!(out, "add rule {TABLE} reject-chain reject").unwrap();
    writeln!(
        out,
        "add rule {TABLE} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services"
    )
    .unwrap();
    writeln!(
        out,
        "add rule {TABLE} nodeport-endpoints-check ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports"
    )
    .unwrap();
    writeln!(
        out,
        "add map {TABLE} firewall-ips {{ type {service_map} ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
    )
    .unwrap();
    writeln!(
        out,
        "add rule {TABLE} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"
    )
    .unwrap();
    writeln!(
        out,
        "add map {TABLE} service-ips {{ type {service_map} ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    )
    .unwrap();
    writeln!(
        out,
        "add map {TABLE} service-nodeports {{ type {port_map} ; comment \"NodePort traffic\" ; }}"
    )
    .unwrap();
    writeln!(
        out,
        "add rule {TABLE} services ip daddr . meta l4proto . th dport vmap @service-ips"
    )
    .unwrap();
    writeln!(
        out,
        "add rule {TABLE} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"
    )
    .unwrap();
}

/// `hashAndTruncate`: the name prefixed with 8 characters of its hash. (kube-proxy
/// truncates past 240 characters, which IPv4 names, at most 227, never reach.)
fn hash_and_name(name: &str) -> String {
    format!("{}-{name}", hash(name, 8))
}

/// endpoint-<hash>-namespace/name/protocol/port__ip/port.
fn endpoint_chain(p: &SvcPort, ep: &Ep) -> String {
    let base = format!(
        "{}/{}/{}/{}__{}/{}",
        p.service.namespace,
        p.service.name,
        p.protocol(),
        p.port.name,
        ep.ip,
        p.port.target_port
    );
    format!("endpoint-{}", hash_and_name(&base))
}

/// `writeServiceToEndpointRules`: one rule picking endpoint i with `numgen random mod n`.
fn to_endpoints<'a>(
    out: &mut String,
    p: &SvcPort,
    chain: &str,
    endpoints: impl ExactSizeIterator<Item = &'a Ep>,
) {
    let n = endpoints.len();
    let choices: Vec<String> = endpoints
        .enumerate()
        .map(|(i, ep)| format!("{i} : goto {}", endpoint_chain(p, ep)))
        .collect();
    writeln!(
        out,
        "add rule {TABLE} {chain} numgen random mod {n} vmap {{ {} }}",
        choices.join(" , ")
    )
    .unwrap();
}

/// Removes the table, whether or not it exists (adding it first makes the delete
/// succeed either way, in one transaction).
pub(super) fn remove(ns: &str) -> Result<()> {
    pipe(
        netns::command(ns, "nft").args(["-f", "-"]),
        &format!("add table {TABLE}\ndelete table {TABLE}\n"),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::{super::fixture::*, *};

    /// TestOverallNFTablesRules' expected output (pkg/proxy/nftables/proxier_test.go:
    /// `baseRules` and the per-service rules), less what the model has no equivalent
    /// for: svc5, and svc2's and svc4's external IPs and LoadBalancer IP. The test's
    /// proxier has `--nodeport-addresses=192.168.0.2/32` and a ServiceCIDR; kube-proxy
    /// without them writes no `nodeport-ips` set, matches NodePorts by `fib daddr
    /// type local ip daddr != 127.0.0.0/8` (setupNFTables' MatchAll branch), and has
    /// no "Drop traffic to unallocated ClusterIPs" rule: those lines are changed
    /// accordingly.
    const OVERALL: &str = r#"
add table ip kube-proxy { comment "rules for kube-proxy" ; }

add set ip kube-proxy cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }

add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }
add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }
add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }

add chain ip kube-proxy cluster-ips-check
add chain ip kube-proxy filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }
add chain ip kube-proxy filter-output-pre-dnat { type filter hook output priority -110 ; }
add chain ip kube-proxy filter-forward { type filter hook forward priority 0 ; }
add chain ip kube-proxy filter-input { type filter hook input priority 0 ; }
add chain ip kube-proxy filter-output { type filter hook output priority 0 ; }
add chain ip kube-proxy firewall-check
add chain ip kube-proxy mark-for-masquerade
add chain ip kube-proxy masquerading
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy nodeport-endpoints-check
add chain ip kube-proxy reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }
add chain ip kube-proxy services
add chain ip kube-proxy service-endpoints-check

add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
add rule ip kube-proxy filter-prerouting-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check
add rule ip kube-proxy filter-input ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-output ct state new jump cluster-ips-check
add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x4000
add rule ip kube-proxy masquerading masquerade fully-random
add rule ip kube-proxy nat-output jump services
add rule ip kube-proxy nat-postrouting jump masquerading
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy nodeport-endpoints-check ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports
add rule ip kube-proxy reject-chain reject
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports
add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services

# svc1
add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }

add chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80
add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade
add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80

add element ip kube-proxy cluster-ips { 172.30.0.41 }
add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }

# svc2
add chain ip kube-proxy service-42NFTM6N-ns2/svc2/tcp/p80
add rule ip kube-proxy service-42NFTM6N-ns2/svc2/tcp/p80 ip daddr 172.30.0.42 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-42NFTM6N-ns2/svc2/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80 }
add chain ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80
add rule ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80 ip saddr 10.0.0.0/8 goto service-42NFTM6N-ns2/svc2/tcp/p80 comment "short-circuit pod traffic"
add rule ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80 fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"
add rule ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80 fib saddr type local goto service-42NFTM6N-ns2/svc2/tcp/p80 comment "short-circuit local traffic"
add chain ip kube-proxy endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80
add rule ip kube-proxy endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80 ip saddr 10.180.0.2 jump mark-for-masquerade
add rule ip kube-proxy endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80 meta l4proto tcp dnat to 10.180.0.2:80

add element ip kube-proxy cluster-ips { 172.30.0.42 }
add element ip kube-proxy service-ips { 172.30.0.42 . tcp . 80 : goto service-42NFTM6N-ns2/svc2/tcp/p80 }
add element ip kube-proxy service-nodeports { tcp . 3001 : goto external-42NFTM6N-ns2/svc2/tcp/p80 }

add element ip kube-proxy no-endpoint-nodeports { tcp . 3001 comment "ns2/svc2:p80" : drop }

# svc3
add chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80
add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 ip daddr 172.30.0.43 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 }
add chain ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80
add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 jump mark-for-masquerade
add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 goto service-4AT6LBPK-ns3/svc3/tcp/p80
add chain ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80
add rule ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 ip saddr 10.180.0.3 jump mark-for-masquerade
add rule ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 meta l4proto tcp dnat to 10.180.0.3:80

add element ip kube-proxy cluster-ips { 172.30.0.43 }
add element ip kube-proxy service-ips { 172.30.0.43 . tcp . 80 : goto service-4AT6LBPK-ns3/svc3/tcp/p80 }
add element ip kube-proxy service-nodeports { tcp . 3003 : goto external-4AT6LBPK-ns3/svc3/tcp/p80 }

# svc4
add chain ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80
add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 ip daddr 172.30.0.44 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 numgen random mod 2 vmap { 0 : goto endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 , 1 : goto endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 }
add chain ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80
add rule ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 ip saddr 10.180.0.5 jump mark-for-masquerade
add rule ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 meta l4proto tcp dnat to 10.180.0.5:80
add chain ip kube-proxy endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80
add rule ip kube-proxy endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 ip saddr 10.180.0.4 jump mark-for-masquerade
add rule ip kube-proxy endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 meta l4proto tcp dnat to 10.180.0.4:80

add element ip kube-proxy cluster-ips { 172.30.0.44 }
add element ip kube-proxy service-ips { 172.30.0.44 . tcp . 80 : goto service-LAUZTJTB-ns4/svc4/tcp/p80 }

# svc6
add element ip kube-proxy cluster-ips { 172.30.0.46 }
add element ip kube-proxy no-endpoint-services { 172.30.0.46 . tcp . 80 comment "ns6/svc6:p80" : goto reject-chain }
"#;

    fn rendered(services: &[Service]) -> String {
        render(&node(), &resolved(services))
    }

    /// The statements of a transaction, in no order (as kube-proxy's
    /// assertNFTablesTransactionEqual compares them).
    fn statements(text: &str) -> BTreeSet<&str> {
        text.lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect()
    }

    #[test]
    fn the_overall_fixture_renders_as_kube_proxys_own_test_expects() {
        let text = rendered(&overall());
        assert_eq!(statements(&text), statements(OVERALL));
    }

    #[test]
    fn chains_exist_before_rules_and_elements_refer_to_them() {
        let text = rendered(&overall());
        let mut chains = BTreeSet::new();
        for line in text.lines() {
            let words: Vec<&str> = line.split(' ').collect();
            if words[..2] == ["add", "chain"] {
                chains.insert(words[4]);
            } else if words[..2] == ["add", "rule"] {
                assert!(chains.contains(words[4]), "rule before its chain: {line}");
            }
            for target in words
                .windows(2)
                .filter(|w| w[0] == "goto" || w[0] == "jump")
            {
                assert!(
                    chains.contains(target[1]),
                    "goes to a chain not yet added: {line}"
                );
            }
        }
    }

    #[test]
    fn local_policy_goes_to_this_nodes_endpoints_unless_the_source_is_a_pod_or_the_node() {
        let text = rendered(&local_policy());
        let local_endpoint = format!(
            "endpoint-{}",
            hash_and_name("ns1/svc1/tcp/p80__10.180.2.1/80")
        );
        let local_rules: Vec<&str> = text
            .lines()
            .filter(|l| l.split(' ').nth(4) == Some("local-ULMVA6XW-ns1/svc1/tcp/p80"))
            .collect();
        assert_eq!(
            local_rules,
            [
                "add chain ip kube-proxy local-ULMVA6XW-ns1/svc1/tcp/p80".to_owned(),
                format!(
                    "add rule ip kube-proxy local-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap {{ 0 : goto {local_endpoint} }}"
                ),
            ]
        );
        assert!(text.contains(
            "add rule ip kube-proxy external-ULMVA6XW-ns1/svc1/tcp/p80 goto local-ULMVA6XW-ns1/svc1/tcp/p80\n"
        ));
        assert!(text.contains("numgen random mod 2 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 , "));
        assert!(!text.contains("add element ip kube-proxy no-endpoint-nodeports"));
    }

    #[test]
    fn a_services_ports_share_its_cluster_ip_element_and_keep_their_protocols() {
        let text = rendered(&[dns()]);
        assert_eq!(
            text.matches("add element ip kube-proxy cluster-ips")
                .count(),
            1
        );
        assert!(text.contains(
            "add element ip kube-proxy service-ips { 172.30.0.47 . udp . 53 : goto service-"
        ));
        assert!(text.contains("meta l4proto udp dnat to 10.180.0.7:53\n"));
        assert!(text.contains("meta l4proto tcp dnat to 10.180.0.7:5353\n"));
    }
}
