//! NetworkPolicy as the engines that enforce it with netfilter do, on a node of the lab:
//! the Kubernetes matrix installs them to prove that our datapath lets through and
//! stops exactly what they let through and stop when the kernel forwards, also between
//! pods on different nodes (where only the target's node enforces).
//!
//! The model is one kind of policy ([`Policy`]): ingress isolation of one pod, as a
//! NetworkPolicy with `policyTypes: [Ingress]` selecting it, and one ingress rule whose
//! peers are `ipBlock`s (`from`) and whose ports are `ports` (all ports when empty).
//! An empty `from` is `ingress: []`: nothing may connect. Policies live in namespace
//! `default`. Three enforcers:
//!
//! - [`Engine::KubeRouter`]: the filter-table chains of kube-router's network policy
//!   controller (cloudnativelabs/kube-router v2.8.1, commit bed22a2c,
//!   pkg/controllers/netpol/network_policy_controller.go, pod.go, policy.go; the one
//!   k3s ships with flannel). Jumps at the top of INPUT, FORWARD and OUTPUT into
//!   KUBE-ROUTER-INPUT/FORWARD/OUTPUT; there, every local pod's traffic (to it, routed
//!   or bridged: `physdev --physdev-is-bridged`; from it, in all three) jumps to its
//!   KUBE-POD-FW-<hash> chain: KUBE-NWPLCY-COMMON (INVALID dropped, RELATED/ESTABLISHED
//!   and ICMP echo-request, destination-unreachable, time-exceeded accepted), the node's
//!   own sources accepted, then the pod's policy chains KUBE-NWPLCY-<hash> (ipsets
//!   KUBE-SRC-/KUBE-DST-<hash> matched, mark 0x10000) or KUBE-NWPLCY-DEFAULT (marks
//!   everything) when no policy selects it, NFLOG and REJECT of what is unmarked, and
//!   mark 0x20000, which the top-level chains accept. So a pod on another node is
//!   rejected in the FORWARD hook of the target's node. Differences: names hash what
//!   kube-router hashes (namespace, the pod's address as its name, a fixed sync version)
//!   with FNV-1a instead of SHA-256; comments name pods by address; the RETURNs for the
//!   service ranges and node ports at the top of KUBE-ROUTER-INPUT are left out (they
//!   only exempt pods' traffic to the node's own service addresses from egress
//!   policies, which this model has none of).
//! - [`Engine::KubeNetworkPolicies`]: kubernetes-sigs/kube-network-policies v1.0.0
//!   (commit d97bacf4, the release flannel's Helm chart deploys with `netpol.enabled`
//!   at flannel v0.28.9), pkg/dataplane/controller.go, which carries on
//!   pkg/networkpolicy/controller.go of the 0.x releases, with its defaults
//!   (`--fail-open`, `--netfilter-bug-1766-fix`, `--strict-mode`). Table `inet
//!   kube-network-policies` with set `podips-v4` (local pods some policy selects), a
//!   `postrouting` chain at priority srcnat - 5 (where FORWARD-hook traffic and IPVS's
//!   both pass; releases up to 0.4 hooked forward at filter - 5) and a `prerouting` one
//!   at dstnat + 5 for DNS, with their rules in order: DNS, neighbour discovery and the
//!   node's root-owned sockets accepted; established flows accepted when they carry
//!   the controller's conntrack label (its `generateLabelMask(100)`, written big-endian
//!   into the kernel's little-endian bitmap, is bit 28); flows from or to a set member
//!   queued (NFQUEUE 100, bypass) for the controller to judge; anything else labelled.
//!   This kernel has no nftables `queue` expression (CONFIG_NFT_QUEUE unset), so each
//!   queue rule jumps instead, in the same position, to a chain `queue-100` holding the
//!   verdict the controller would give (its `EvaluatePacket`: the destination's ingress
//!   policies), accept with the label or drop. Strict mode (policy changes reach
//!   established flows) is the controller clearing the label of flows the policies no
//!   longer admit; here `install` deletes those conntrack entries, which ends them the
//!   same way: their next packet is judged afresh, and dropped.
//! - [`Engine::HostFirewall`]: what an operator writes by hand on the target's node: in
//!   the filter FORWARD chain, traffic to the target that `from` and `ports` do not
//!   admit is REJECTed. Stateless: unlike the engines it accepts no established flow
//!   first, so it also cuts connections opened before it.
//!
//! [`install`] replaces whatever an earlier install of the same engine left in the
//! namespace; [`remove`] leaves nothing of it (chains, ipsets, tables; the filter table
//! too when nothing else is left in it).

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::Ipv4Addr,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use ipnet::Ipv4Net;

use crate::lab::machinery::netns;

/// The namespace of every policy of the model.
const NAMESPACE: &str = "default";

/// A port's protocol in a NetworkPolicy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The name iptables and nftables know it by.
    fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

/// Ingress isolation of one pod, as a NetworkPolicy with policyTypes [Ingress] selecting
/// it: only `from` may open connections to it (on `ports`, all when empty); replies of
/// what it admits pass. Flows opened before it: see the module's documentation, per
/// engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Policy {
    pub name: String,
    pub target: Ipv4Addr,
    /// The node the target runs on: the one that enforces.
    pub target_node: String,
    pub from: Vec<Ipv4Net>,
    pub ports: Vec<(Protocol, u16)>,
}

impl Policy {
    /// A match per port, as `render` writes it, or one empty match: all ports.
    fn port_matches(&self, render: impl Fn(Protocol, u16) -> String) -> Vec<String> {
        if self.ports.is_empty() {
            vec![String::new()]
        } else {
            self.ports.iter().map(|&(p, n)| render(p, n)).collect()
        }
    }

    /// [`Self::port_matches`] for iptables.
    fn iptables_ports(&self) -> Vec<String> {
        self.port_matches(|proto, port| format!(" -p {} --dport {port}", proto.name()))
    }

    /// Whether this policy lets `src` open a flow of IP protocol `proto` to `port` of
    /// its target.
    fn admits(&self, src: Ipv4Addr, proto: u8, port: u16) -> bool {
        self.from.iter().any(|net| net.contains(&src))
            && (self.ports.is_empty()
                || self
                    .ports
                    .iter()
                    .any(|&(p, n)| p.number() == proto && n == port))
    }
}

/// Whether `policies` together let `src` open a flow to `dst`: yes unless some policy
/// isolates `dst` and none of those admits it (ingress rules add up).
fn admitted(policies: &[Policy], src: Ipv4Addr, dst: Ipv4Addr, proto: u8, port: u16) -> bool {
    let mut isolating = policies.iter().filter(|p| p.target == dst).peekable();
    isolating.peek().is_none() || isolating.any(|p| p.admits(src, proto, port))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Engine {
    KubeRouter,
    KubeNetworkPolicies,
    HostFirewall,
}

impl Engine {
    pub(crate) const ALL: [Engine; 3] = [
        Engine::KubeRouter,
        Engine::KubeNetworkPolicies,
        Engine::HostFirewall,
    ];

    pub(crate) fn describe(self) -> &'static str {
        match self {
            Engine::KubeRouter => "kube-router's network policy controller",
            Engine::KubeNetworkPolicies => "kube-network-policies",
            Engine::HostFirewall => "a host firewall (iptables REJECT in FORWARD)",
        }
    }
}

/// Installs `engine`'s rules for `policies` in `ns`, the namespace of node `node`, whose
/// pods are `pods` (kube-router gives each a chain; targets on `node` count as its pods
/// anyway; the other engines only look at the targets).
pub(crate) fn install(
    ns: &str,
    engine: Engine,
    node: &str,
    pods: &[Ipv4Addr],
    policies: &[Policy],
) -> Result<()> {
    validate(node, pods, policies)?;
    let installed = match engine {
        Engine::KubeRouter => kube_router::install(ns, node, pods, policies),
        Engine::KubeNetworkPolicies => kube_network_policies::install(ns, node, policies),
        Engine::HostFirewall => host_firewall::install(ns, node, policies),
    };
    installed.with_context(|| format!("installing {} on {node} ({ns})", engine.describe()))
}

/// Removes everything `engine` installed in `ns`; does nothing where it installed
/// nothing.
pub(crate) fn remove(ns: &str, engine: Engine) -> Result<()> {
    let removed = match engine {
        Engine::KubeRouter => kube_router::remove(ns),
        Engine::KubeNetworkPolicies => kube_network_policies::remove(ns),
        Engine::HostFirewall => host_firewall::remove(ns),
    };
    removed.with_context(|| format!("removing {} from {ns}", engine.describe()))
}

fn validate(node: &str, pods: &[Ipv4Addr], policies: &[Policy]) -> Result<()> {
    let mut names = BTreeSet::new();
    for p in policies {
        ensure!(
            !p.name.is_empty()
                && p.name.len() <= 253
                && p.name.bytes().all(|b| b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || b == b'-'
                    || b == b'.'),
            "policy name {:?} is not a Kubernetes object name (lowercase letters, digits, \
             '-' and '.', at most 253)",
            p.name
        );
        ensure!(names.insert(&p.name), "two policies are named {:?}", p.name);
        ensure!(
            !p.target_node.is_empty(),
            "policy {}: no target node",
            p.name
        );
        ensure!(
            p.ports.iter().all(|&(_, port)| port != 0),
            "policy {}: port 0",
            p.name
        );
        ensure!(
            p.target_node == node || !pods.contains(&p.target),
            "policy {}: its target {} is a pod of {node}, not of {}",
            p.name,
            p.target,
            p.target_node
        );
    }
    Ok(())
}

/// The pods of `node`: `pods` and the targets that run there.
fn local_pods(node: &str, pods: &[Ipv4Addr], policies: &[Policy]) -> BTreeSet<Ipv4Addr> {
    pods.iter()
        .copied()
        .chain(
            policies
                .iter()
                .filter(|p| p.target_node == node)
                .map(|p| p.target),
        )
        .collect()
}

/// `-m comment --comment "text"`.
fn comment(text: &str) -> String {
    format!("-m comment --comment \"{text}\"")
}

/// kube-router's names: a prefix and 16 base32 characters of a hash of the object's
/// identity. kube-router hashes with SHA-256; FNV-1a (128 bits) makes names of the
/// same shape without a hash crate.
fn hashed(prefix: &str, identity: &str) -> String {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let hash = identity
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u128::from(b)).wrapping_mul(PRIME));
    let encoded: String = (0..16)
        .map(|i| char::from(BASE32[((hash >> (123 - 5 * i)) & 31) as usize]))
        .collect();
    format!("{prefix}{encoded}")
}

/// An iptables-restore document for the filter table, applied with `--noflush`: only
/// the chains it declares are created (or emptied).
#[derive(Default)]
struct Filter {
    chains: Vec<String>,
    rules: Vec<String>,
}

impl Filter {
    fn chain(&mut self, name: &str) {
        self.chains.push(name.to_owned());
    }

    fn rule(&mut self, rule: String) {
        self.rules.push(rule);
    }

    fn render(&self) -> String {
        let mut doc = String::from("*filter\n");
        for chain in &self.chains {
            writeln!(doc, ":{chain} - [0:0]").expect("writing to a String");
        }
        for rule in &self.rules {
            doc.push_str(rule);
            doc.push('\n');
        }
        doc.push_str("COMMIT\n");
        doc
    }
}

fn nft_table_exists(ns: &str, family: &str, table: &str) -> bool {
    netns::run(netns::command(ns, "nft").args(["list", "table", family, table])).is_ok()
}

fn iptables_restore(ns: &str, filter: &Filter) -> Result<()> {
    netns::run_with_input(
        netns::command(ns, "iptables-restore").arg("--noflush"),
        &filter.render(),
    )
    .map(drop)
}

/// Deletes the filter table's chains that `ours` names, and the rules elsewhere that
/// jump to them; then the table itself if nothing else is left in it.
fn remove_chains(ns: &str, ours: impl Fn(&str) -> bool) -> Result<()> {
    if !nft_table_exists(ns, "ip", "filter") {
        return Ok(());
    }
    let saved = netns::run(netns::command(ns, "iptables-save").args(["-t", "filter"]))?;
    let chains: Vec<&str> = saved
        .lines()
        .filter_map(|l| l.strip_prefix(':')?.split(' ').next())
        .filter(|c| ours(c))
        .collect();
    let mut filter = Filter::default();
    for rule in saved.lines().filter_map(|l| l.strip_prefix("-A ")) {
        let mut words = rule.split(' ');
        let in_ours = words.next().is_some_and(&ours);
        let target = words
            .skip_while(|w| *w != "-j" && *w != "-g")
            .nth(1)
            .unwrap_or_default();
        if !in_ours && ours(target) {
            filter.rule(format!("-D {rule}"));
        }
    }
    for verb in ["-F", "-X"] {
        for chain in &chains {
            filter.rule(format!("{verb} {chain}"));
        }
    }
    if !filter.rules.is_empty() {
        iptables_restore(ns, &filter)?;
    }
    // Only the built-in chains' policies left, all ACCEPT: the table is as if it never
    // was (its presence alone changes nothing, but others look for leftovers).
    let left = netns::run(netns::command(ns, "iptables").args(["-w", "-S"]))?;
    if left
        .lines()
        .all(|l| l.starts_with("-P ") && l.ends_with(" ACCEPT"))
    {
        netns::run(netns::command(ns, "nft").args(["delete", "table", "ip", "filter"]))?;
    }
    Ok(())
}

mod kube_router {
    //! network_policy_controller.go (top-level, common and default chains), pod.go (a
    //! chain per local pod), policy.go (a chain and ipsets per policy).

    use super::*;

    /// The built-in chains and kube-router's chains they jump to.
    const TOP: [(&str, &str); 3] = [
        ("INPUT", "KUBE-ROUTER-INPUT"),
        ("FORWARD", "KUBE-ROUTER-FORWARD"),
        ("OUTPUT", "KUBE-ROUTER-OUTPUT"),
    ];
    const FORWARD: &str = "KUBE-ROUTER-FORWARD";
    const OUTPUT: &str = "KUBE-ROUTER-OUTPUT";
    const DEFAULT: &str = "KUBE-NWPLCY-DEFAULT";
    const COMMON: &str = "KUBE-NWPLCY-COMMON";
    const POD_CHAIN: &str = "KUBE-POD-FW-";
    const POLICY_CHAIN: &str = "KUBE-NWPLCY-";
    const SRC_SET: &str = "KUBE-SRC-";
    const DST_SET: &str = "KUBE-DST-";
    /// Set by a policy chain that admits the packet, or by the default chain.
    const MARK_ADMITTED: &str = "0x10000/0x10000";
    /// Set at the end of a pod's chain; the top-level chains accept what carries it.
    const MARK_ACCEPT: &str = "0x20000/0x20000";
    /// Part of the chain names kube-router hashes: the sync's timestamp there.
    const VERSION: &str = "0";
    const FAMILY: &str = "IPv4";

    pub(super) fn is_chain(chain: &str) -> bool {
        chain.starts_with("KUBE-ROUTER-")
            || chain.starts_with(POD_CHAIN)
            || chain.starts_with(POLICY_CHAIN)
    }

    fn is_set(set: &str) -> bool {
        set.starts_with(SRC_SET) || set.starts_with(DST_SET)
    }

    fn policy_chain(p: &Policy) -> String {
        hashed(
            POLICY_CHAIN,
            &format!("{NAMESPACE}{}{VERSION}{FAMILY}", p.name),
        )
    }

    fn dst_set(p: &Policy) -> String {
        hashed(DST_SET, &format!("{NAMESPACE}{}{FAMILY}", p.name))
    }

    /// The set of the ipBlocks of the policy's first (only) ingress rule.
    fn src_set(p: &Policy) -> String {
        hashed(
            SRC_SET,
            &format!("{NAMESPACE}{}ingressrule0{FAMILY}ipblock", p.name),
        )
    }

    fn pod_chain(pod: Ipv4Addr) -> String {
        hashed(POD_CHAIN, &format!("{NAMESPACE}{pod}{VERSION}"))
    }

    /// What `ipset restore` and `iptables-restore` are given.
    pub(super) struct Rendered {
        pub ipsets: String,
        pub filter: Filter,
    }

    pub(super) fn render(node: &str, pods: &[Ipv4Addr], policies: &[Policy]) -> Rendered {
        let pods = local_pods(node, pods, policies);
        let mut filter = Filter::default();
        for (_, chain) in TOP {
            filter.chain(chain);
        }
        filter.chain(DEFAULT);
        filter.chain(COMMON);
        for p in policies {
            filter.chain(&policy_chain(p));
        }
        for &pod in &pods {
            filter.chain(&pod_chain(pod));
        }
        for (builtin, chain) in TOP {
            // ensureTopLevelChains: the comment carries a hash of the rule, its "uuid".
            let uuid = hashed(
                "",
                &format!("{builtin}-mcomment--commentkube-router netpol-j{chain}"),
            );
            let netpol = comment(&format!("kube-router netpol - {uuid}"));
            filter.rule(format!("-I {builtin} 1 {netpol} -j {chain}"));
        }
        filter.rule(format!(
            "-A {DEFAULT} {} -j MARK --set-xmark {MARK_ADMITTED}",
            comment("rule to mark traffic matching a network policy")
        ));
        for (text, matches, verdict) in [
            (
                "rule to drop invalid state for pod",
                "-m conntrack --ctstate INVALID",
                "DROP",
            ),
            (
                "rule for stateful firewall for pod",
                "-m conntrack --ctstate RELATED,ESTABLISHED",
                "ACCEPT",
            ),
            (
                "allow icmp echo requests",
                "-p icmp --icmp-type echo-request",
                "ACCEPT",
            ),
            (
                "allow icmp destination unreachable messages",
                "-p icmp --icmp-type destination-unreachable",
                "ACCEPT",
            ),
            (
                "allow icmp time exceeded messages",
                "-p icmp --icmp-type time-exceeded",
                "ACCEPT",
            ),
        ] {
            filter.rule(format!(
                "-A {COMMON} {} {matches} -j {verdict}",
                comment(text)
            ));
        }
        let mut ipsets = String::new();
        for p in policies {
            policy_rules(p, &mut filter, &mut ipsets);
        }
        for &pod in &pods {
            let isolating: Vec<&Policy> = policies.iter().filter(|p| p.target == pod).collect();
            pod_rules(pod, &isolating, &mut filter);
        }
        for (_, chain) in TOP {
            // ensureExplicitAccept, after everything else.
            filter.rule(format!(
                "-A {chain} {} -m mark --mark {MARK_ACCEPT} -j ACCEPT",
                comment("rule to explicitly ACCEPT traffic that comply to network policies")
            ));
        }
        Rendered { ipsets, filter }
    }

    /// syncNetworkPolicyChains and processIngressRules for one policy: its target in a
    /// hash:ip set, its ipBlocks in a hash:net set (a /0 as two /1s, which hash:net can
    /// hold), and per port a rule that marks and one that returns what it marked.
    fn policy_rules(p: &Policy, filter: &mut Filter, ipsets: &mut String) {
        const CREATE: &str = "family inet hashsize 1024 maxelem 65536 timeout 0";
        let chain = policy_chain(p);
        let dst = dst_set(p);
        writeln!(ipsets, "create {dst} hash:ip {CREATE}").expect("writing to a String");
        writeln!(ipsets, "add {dst} {} timeout 0", p.target).expect("writing to a String");
        if p.from.is_empty() {
            // ingress: [] admits nothing: the chain stays empty.
            return;
        }
        let src = src_set(p);
        writeln!(ipsets, "create {src} hash:net {CREATE}").expect("writing to a String");
        for net in &p.from {
            let blocks = if net.prefix_len() == 0 {
                vec![
                    Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 1).expect("a valid prefix"),
                    Ipv4Net::new(Ipv4Addr::new(128, 0, 0, 0), 1).expect("a valid prefix"),
                ]
            } else {
                vec![net.trunc()]
            };
            for block in blocks {
                writeln!(ipsets, "add {src} {block} timeout 0").expect("writing to a String");
            }
        }
        let matches = format!(
            "{} -m set --match-set {src} src -m set --match-set {dst} dst",
            comment(&format!(
                "rule to ACCEPT traffic from specified ipBlocks to dest pods selected by \
                 policy name: {} namespace {NAMESPACE}",
                p.name
            ))
        );
        let ports = p.iptables_ports();
        for port in ports {
            filter.rule(format!(
                "-A {chain} {matches}{port} -j MARK --set-xmark {MARK_ADMITTED}"
            ));
            filter.rule(format!(
                "-A {chain} {matches}{port} -m mark --mark {MARK_ADMITTED} -j RETURN"
            ));
        }
    }

    /// syncPodFirewallChains for one local pod, its chain's rules in their final order
    /// (kube-router inserts the first ones at position 1, last written on top), then
    /// the jumps to it (interceptPodInboundTraffic, interceptPodOutboundTraffic).
    fn pod_rules(pod: Ipv4Addr, isolating: &[&Policy], filter: &mut Filter) {
        let chain = pod_chain(pod);
        filter.rule(format!(
            "-A {chain} {} -j {COMMON}",
            comment("common bi-directional traffic policy rules")
        ));
        filter.rule(format!(
            "-A {chain} {} -m addrtype --src-type LOCAL -d {pod} -j ACCEPT",
            comment(
                "rule to permit the traffic traffic to pods when source is the pod's local node"
            )
        ));
        filter.rule(format!(
            "-A {chain} -s {pod} {} -j {DEFAULT}",
            comment("run through default egress network policy chain")
        ));
        if isolating.is_empty() {
            filter.rule(format!(
                "-A {chain} -d {pod} {} -j {DEFAULT}",
                comment("run through default ingress network policy chain")
            ));
        }
        for p in isolating.iter().rev() {
            filter.rule(format!(
                "-A {chain} -d {pod} {} -j {}",
                comment(&format!("run through nw policy {}", p.name)),
                policy_chain(p)
            ));
        }
        let name = format!("POD name:{pod} namespace: {NAMESPACE}");
        filter.rule(format!(
            "-A {chain} {} -m mark ! --mark {MARK_ADMITTED} -j NFLOG --nflog-group 100 \
             -m limit --limit 10/minute --limit-burst 10",
            comment(&format!("rule to log dropped traffic {name}"))
        ));
        filter.rule(format!(
            "-A {chain} {} -m mark ! --mark {MARK_ADMITTED} -j REJECT",
            comment(&format!("rule to REJECT traffic destined for {name}"))
        ));
        filter.rule(format!("-A {chain} -j MARK --set-mark 0/0x10000"));
        filter.rule(format!(
            "-A {chain} {} -j MARK --set-mark {MARK_ACCEPT}",
            comment("set mark to ACCEPT traffic that comply to network policies")
        ));
        let to = comment(&format!(
            "rule to jump traffic destined to {name} to chain {chain}"
        ));
        filter.rule(format!("-A {FORWARD} {to} -d {pod} -j {chain}"));
        filter.rule(format!("-A {OUTPUT} {to} -d {pod} -j {chain}"));
        filter.rule(format!(
            "-A {FORWARD} -m physdev --physdev-is-bridged {to} -d {pod} -j {chain}"
        ));
        let from = comment(&format!(
            "rule to jump traffic from {name} to chain {chain}"
        ));
        for (_, top) in TOP {
            filter.rule(format!("-A {top} {from} -s {pod} -j {chain}"));
        }
        filter.rule(format!(
            "-A {FORWARD} -m physdev --physdev-is-bridged {from} -s {pod} -j {chain}"
        ));
    }

    pub(super) fn install(
        ns: &str,
        node: &str,
        pods: &[Ipv4Addr],
        policies: &[Policy],
    ) -> Result<()> {
        remove(ns)?;
        let rendered = render(node, pods, policies);
        netns::run_with_input(
            netns::command(ns, "ipset").args(["-exist", "restore"]),
            &rendered.ipsets,
        )?;
        iptables_restore(ns, &rendered.filter)
    }

    /// Cleanup(): the chains, then the sets they referred to.
    pub(super) fn remove(ns: &str) -> Result<()> {
        remove_chains(ns, is_chain)?;
        let sets = netns::run(netns::command(ns, "ipset").args(["list", "-n"]))?;
        for set in sets.lines().filter(|s| is_set(s)) {
            destroy_set(ns, set)?;
        }
        Ok(())
    }

    /// The kernel lets go of a set a deleted rule used only once the rule is freed,
    /// a moment after the deletion returns.
    fn destroy_set(ns: &str, set: &str) -> Result<()> {
        const PATIENCE: Duration = Duration::from_secs(2);
        let started = Instant::now();
        loop {
            match netns::run(netns::command(ns, "ipset").args(["destroy", set])) {
                Ok(_) => return Ok(()),
                Err(e) if started.elapsed() > PATIENCE => return Err(e),
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

mod kube_network_policies {
    //! pkg/dataplane/controller.go: syncNFTablesRules, addDNSRacersWorkaroundRules,
    //! firewallEnforcer; pkg/networkpolicy/engine.go for the verdict.

    use super::*;

    const TABLE: &str = "kube-network-policies";
    /// The conntrack label bit the controller's accept verdict sets (see the module's
    /// documentation).
    const LABEL: u8 = 28;
    /// Where the queue rules send what they would queue to NFQUEUE 100.
    const VERDICT: &str = "queue-100";
    /// IP protocols whose flows strict mode judges again.
    const JUDGED: [(&str, u8); 3] = [("tcp", 6), ("udp", 17), ("sctp", 132)];

    pub(super) fn render(node: &str, policies: &[Policy]) -> String {
        let managed = local_pods(node, &[], policies);
        let elements = if managed.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = managed.iter().map(Ipv4Addr::to_string).collect();
            format!("\n\t\telements = {{ {} }}", list.join(", "))
        };
        let queue = format!(
            "\t\tip saddr @podips-v4 goto {VERDICT}\n\
             \t\tip daddr @podips-v4 goto {VERDICT}\n\
             \t\tip6 saddr @podips-v6 goto {VERDICT}\n\
             \t\tip6 daddr @podips-v6 goto {VERDICT}\n"
        );
        let mut verdicts = String::new();
        let targets: BTreeSet<Ipv4Addr> = policies.iter().map(|p| p.target).collect();
        for target in targets {
            for p in policies
                .iter()
                .filter(|p| p.target == target && !p.from.is_empty())
            {
                let from: Vec<String> = p.from.iter().map(|n| n.trunc().to_string()).collect();
                let matches = format!("ip daddr {target} ip saddr {{ {} }}", from.join(", "));
                let ports = p.port_matches(|proto, port| format!(" {} dport {port}", proto.name()));
                for port in ports {
                    writeln!(verdicts, "\t\t{matches}{port} ct label set {LABEL} accept")
                        .expect("writing to a String");
                }
            }
            writeln!(verdicts, "\t\tip daddr {target} drop").expect("writing to a String");
        }
        // add + delete + add: the table starts empty, in the same transaction.
        format!(
            "add table inet {TABLE}\n\
             delete table inet {TABLE}\n\
             table inet {TABLE} {{\n\
             \tset podips-v4 {{\n\t\ttype ipv4_addr{elements}\n\t}}\n\
             \tset podips-v6 {{\n\t\ttype ipv6_addr\n\t}}\n\
             \tchain postrouting {{\n\
             \t\ttype filter hook postrouting priority srcnat - 5; policy accept;\n\
             \t\tudp dport 53 accept\n\
             \t\tmeta nfproto ipv6 icmpv6 type nd-router-solicit accept\n\
             \t\tmeta nfproto ipv6 icmpv6 type nd-router-advert accept\n\
             \t\tmeta nfproto ipv6 icmpv6 type nd-neighbor-solicit accept\n\
             \t\tmeta nfproto ipv6 icmpv6 type nd-neighbor-advert accept\n\
             \t\tmeta nfproto ipv6 icmpv6 type nd-redirect accept\n\
             \t\tmeta skuid 0 counter accept\n\
             \t\tct label {LABEL} ct state established,related counter accept\n\
             {queue}\
             \t\tct label set {LABEL}\n\
             \t}}\n\
             \tchain prerouting {{\n\
             \t\ttype filter hook prerouting priority dstnat + 5; policy accept;\n\
             \t\tmeta l4proto != udp accept\n\
             \t\tudp dport != 53 accept\n\
             {queue}\
             \t}}\n\
             \tchain {VERDICT} {{\n\
             {verdicts}\
             \t\tct label set {LABEL} accept\n\
             \t}}\n\
             }}\n"
        )
    }

    pub(super) fn install(ns: &str, node: &str, policies: &[Policy]) -> Result<()> {
        netns::run_with_input(
            netns::command(ns, "nft").args(["-f", "-"]),
            &render(node, policies),
        )?;
        enforce(ns, node, policies)
    }

    pub(super) fn remove(ns: &str) -> Result<()> {
        if nft_table_exists(ns, "inet", TABLE) {
            netns::run(netns::command(ns, "nft").args(["delete", "table", "inet", TABLE]))?;
        }
        Ok(())
    }

    /// A conntrack entry, as `conntrack -L` shows it.
    #[derive(Debug, PartialEq, Eq)]
    pub(super) struct Flow {
        pub proto: &'static str,
        pub number: u8,
        pub established: bool,
        /// The original direction: source, destination, ports.
        pub src: Ipv4Addr,
        pub dst: Ipv4Addr,
        pub sport: u16,
        pub dport: u16,
        /// Where replies come from: the destination after any DNAT.
        pub reply_src: Ipv4Addr,
        pub reply_sport: u16,
    }

    /// A line of `conntrack -L` for TCP, UDP or SCTP; None for other protocols.
    pub(super) fn parse_flow(line: &str) -> Result<Option<Flow>> {
        let mut words = line.split_whitespace();
        let Some(&(proto, number)) = words
            .next()
            .and_then(|name| JUDGED.iter().find(|(n, _)| *n == name))
        else {
            return Ok(None);
        };
        let (mut addresses, mut ports) = (Vec::new(), Vec::new());
        let mut established = false;
        for word in words {
            match word.split_once('=') {
                Some(("src" | "dst", a)) => addresses.push(a.parse::<Ipv4Addr>()?),
                Some(("sport" | "dport", p)) => ports.push(p.parse::<u16>()?),
                Some(_) => {}
                None => established |= word == "ESTABLISHED",
            }
        }
        let (&[src, dst, reply_src, _], &[sport, dport, reply_sport, _]) =
            (addresses.as_slice(), ports.as_slice())
        else {
            bail!("unexpected conntrack entry: {line}");
        };
        Ok(Some(Flow {
            proto,
            number,
            established: established || proto != "tcp",
            src,
            dst,
            sport,
            dport,
            reply_src,
            reply_sport,
        }))
    }

    /// firewallEnforcer: established flows of local policy targets that the policies
    /// no longer admit are ended (see the module's documentation).
    fn enforce(ns: &str, node: &str, policies: &[Policy]) -> Result<()> {
        let managed = local_pods(node, &[], policies);
        let table = netns::run(netns::command(ns, "conntrack").args(["-L", "-f", "ipv4"]))?;
        for line in table.lines() {
            let Some(flow) = parse_flow(line)? else {
                continue;
            };
            if !flow.established
                || !(managed.contains(&flow.src) || managed.contains(&flow.reply_src))
                || admitted(
                    policies,
                    flow.src,
                    flow.reply_src,
                    flow.number,
                    flow.reply_sport,
                )
            {
                continue;
            }
            let out = netns::command(ns, "conntrack")
                .args(["-D", "-p", flow.proto, "-s", &flow.src.to_string()])
                .args([
                    "-d",
                    &flow.dst.to_string(),
                    "--sport",
                    &flow.sport.to_string(),
                ])
                .args(["--dport", &flow.dport.to_string()])
                .stdin(Stdio::null())
                .output()
                .context("starting conntrack -D")?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            // The flow may have ended since the listing.
            if !out.status.success() && !stderr.contains(" 0 flow entries") {
                bail!("deleting the conntrack entry {line:?}: {}", stderr.trim());
            }
        }
        Ok(())
    }
}

mod host_firewall {
    use super::*;

    const CHAIN: &str = "HOST-FIREWALL";

    /// None when no target runs on `node`.
    pub(super) fn render(node: &str, policies: &[Policy]) -> Option<Filter> {
        let local: Vec<&Policy> = policies.iter().filter(|p| p.target_node == node).collect();
        if local.is_empty() {
            return None;
        }
        let mut filter = Filter::default();
        filter.chain(CHAIN);
        filter.rule(format!(
            "-I FORWARD 1 {} -j {CHAIN}",
            comment("host firewall: pods only some may reach")
        ));
        for p in &local {
            let ports = p.iptables_ports();
            for net in &p.from {
                for port in &ports {
                    filter.rule(format!(
                        "-A {CHAIN} -s {} -d {}{port} -j RETURN",
                        net.trunc(),
                        p.target
                    ));
                }
            }
        }
        let targets: BTreeSet<Ipv4Addr> = local.iter().map(|p| p.target).collect();
        for target in targets {
            filter.rule(format!("-A {CHAIN} -d {target} -j REJECT"));
        }
        Some(filter)
    }

    pub(super) fn install(ns: &str, node: &str, policies: &[Policy]) -> Result<()> {
        remove(ns)?;
        match render(node, policies) {
            Some(filter) => iptables_restore(ns, &filter),
            None => Ok(()),
        }
    }

    pub(super) fn remove(ns: &str) -> Result<()> {
        remove_chains(ns, |chain| chain == CHAIN)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{self, Read as _, Write as _},
        net::{SocketAddrV4, TcpListener, TcpStream},
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        thread::JoinHandle,
    };

    use socket2::{Domain, Protocol as SocketProtocol, Socket, Type};

    use super::{kube_network_policies::Flow, *};
    use crate::lab::machinery::probe;
    use crate::lab::machinery::scratch::Scratch;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    const TARGET: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
    const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
    const CLIENT_A: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
    const CLIENT_B: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 2);
    const ALLOWED_PORT: u16 = 8080;
    const OTHER_PORT: u16 = 8081;

    fn allow_a() -> Policy {
        Policy {
            name: "allow-a".into(),
            target: TARGET,
            target_node: "n1".into(),
            from: vec![net("10.244.2.0/24")],
            ports: vec![(Protocol::Tcp, ALLOWED_PORT)],
        }
    }

    fn lines(filter: &Filter) -> Vec<&str> {
        filter.rules.iter().map(String::as_str).collect()
    }

    #[test]
    fn names_have_kube_router_s_shape_and_differ() {
        let a = hashed("KUBE-POD-FW-", "default10.244.1.20");
        assert_eq!(a, hashed("KUBE-POD-FW-", "default10.244.1.20"));
        assert_ne!(a, hashed("KUBE-POD-FW-", "default10.244.1.30"));
        let suffix = a.strip_prefix("KUBE-POD-FW-").unwrap();
        assert_eq!(suffix.len(), 16);
        assert!(
            suffix
                .bytes()
                .all(|b| b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567".contains(&b))
        );
        // iptables' limit on chain names.
        assert!(a.len() <= 28);
    }

    #[test]
    fn verdicts_add_up_ingress_rules() {
        let mut web = allow_a();
        web.name = "web".into();
        web.from = vec![net("0.0.0.0/0")];
        web.ports = vec![(Protocol::Udp, 53)];
        let deny_all = Policy {
            name: "deny-all".into(),
            target: LOCAL,
            target_node: "n1".into(),
            from: vec![],
            ports: vec![],
        };
        let policies = [allow_a(), web, deny_all];
        let admitted = |src, dst, proto, port| admitted(&policies, src, dst, proto, port);
        assert!(admitted(CLIENT_A, TARGET, 6, ALLOWED_PORT));
        assert!(!admitted(CLIENT_A, TARGET, 6, OTHER_PORT));
        assert!(!admitted(CLIENT_B, TARGET, 6, ALLOWED_PORT));
        assert!(admitted(CLIENT_B, TARGET, 17, 53), "the second policy adds");
        assert!(!admitted(CLIENT_B, TARGET, 1, 0), "ICMP has no port");
        assert!(!admitted(CLIENT_A, LOCAL, 6, ALLOWED_PORT), "ingress: []");
        assert!(admitted(CLIENT_B, CLIENT_A, 6, 22), "not isolated");
    }

    #[test]
    fn bad_policies_are_refused() {
        let mut bad = allow_a();
        bad.name = "Allow A".into();
        assert!(validate("n1", &[], &[bad]).is_err());
        assert!(validate("n1", &[], &[allow_a(), allow_a()]).is_err());
        let mut port0 = allow_a();
        port0.ports = vec![(Protocol::Tcp, 0)];
        assert!(validate("n1", &[], &[port0]).is_err());
        let err = validate("n2", &[TARGET], &[allow_a()]).unwrap_err();
        assert!(
            err.to_string().contains("is a pod of n2, not of n1"),
            "{err}"
        );
        assert!(validate("n1", &[TARGET, LOCAL], &[allow_a()]).is_ok());
    }

    #[test]
    fn kube_router_gives_each_local_pod_a_chain_and_rejects_what_no_policy_marks() {
        let p = allow_a();
        let rendered = kube_router::render("n1", &[LOCAL], std::slice::from_ref(&p));
        let target_chain = hashed("KUBE-POD-FW-", "default10.244.1.20");
        let local_chain = hashed("KUBE-POD-FW-", "default10.244.1.30");
        let policy_chain = hashed("KUBE-NWPLCY-", "defaultallow-a0IPv4");
        let src = hashed("KUBE-SRC-", "defaultallow-aingressrule0IPv4ipblock");
        let dst = hashed("KUBE-DST-", "defaultallow-aIPv4");
        assert_eq!(
            rendered.ipsets,
            format!(
                "create {dst} hash:ip family inet hashsize 1024 maxelem 65536 timeout 0\n\
                 add {dst} 10.244.1.2 timeout 0\n\
                 create {src} hash:net family inet hashsize 1024 maxelem 65536 timeout 0\n\
                 add {src} 10.244.2.0/24 timeout 0\n"
            )
        );
        let filter = &rendered.filter;
        assert_eq!(
            filter.chains,
            [
                "KUBE-ROUTER-INPUT",
                "KUBE-ROUTER-FORWARD",
                "KUBE-ROUTER-OUTPUT",
                "KUBE-NWPLCY-DEFAULT",
                "KUBE-NWPLCY-COMMON",
                &policy_chain,
                &target_chain,
                &local_chain,
            ]
        );
        let rules = lines(filter);
        for (builtin, chain) in [
            ("INPUT", "KUBE-ROUTER-INPUT"),
            ("FORWARD", "KUBE-ROUTER-FORWARD"),
            ("OUTPUT", "KUBE-ROUTER-OUTPUT"),
        ] {
            assert!(
                rules.iter().any(|r| r.starts_with(&format!(
                    "-I {builtin} 1 -m comment --comment \"kube-router netpol - "
                )) && r.ends_with(&format!(" -j {chain}"))),
                "no jump from {builtin}"
            );
        }
        let in_chain = |chain: &str| -> Vec<&str> {
            rules
                .iter()
                .copied()
                .filter(|r| r.starts_with(&format!("-A {chain} ")))
                .collect()
        };
        let set = format!("-m set --match-set {src} src -m set --match-set {dst} dst");
        let admit = format!(
            "-A {policy_chain} -m comment --comment \"rule to ACCEPT traffic from specified \
             ipBlocks to dest pods selected by policy name: allow-a namespace default\" {set} \
             -p tcp --dport 8080"
        );
        assert_eq!(
            in_chain(&policy_chain),
            [
                format!("{admit} -j MARK --set-xmark 0x10000/0x10000"),
                format!("{admit} -m mark --mark 0x10000/0x10000 -j RETURN"),
            ]
        );
        let pod = "POD name:10.244.1.2 namespace: default";
        assert_eq!(
            in_chain(&target_chain),
            [
                format!(
                    "-A {target_chain} -m comment --comment \"common bi-directional traffic policy rules\" -j KUBE-NWPLCY-COMMON"
                ),
                format!(
                    "-A {target_chain} -m comment --comment \"rule to permit the traffic traffic to pods when source is the pod's local node\" -m addrtype --src-type LOCAL -d 10.244.1.2 -j ACCEPT"
                ),
                format!(
                    "-A {target_chain} -s 10.244.1.2 -m comment --comment \"run through default egress network policy chain\" -j KUBE-NWPLCY-DEFAULT"
                ),
                format!(
                    "-A {target_chain} -d 10.244.1.2 -m comment --comment \"run through nw policy allow-a\" -j {policy_chain}"
                ),
                format!(
                    "-A {target_chain} -m comment --comment \"rule to log dropped traffic {pod}\" -m mark ! --mark 0x10000/0x10000 -j NFLOG --nflog-group 100 -m limit --limit 10/minute --limit-burst 10"
                ),
                format!(
                    "-A {target_chain} -m comment --comment \"rule to REJECT traffic destined for {pod}\" -m mark ! --mark 0x10000/0x10000 -j REJECT"
                ),
                format!("-A {target_chain} -j MARK --set-mark 0/0x10000"),
                format!(
                    "-A {target_chain} -m comment --comment \"set mark to ACCEPT traffic that comply to network policies\" -j MARK --set-mark 0x20000/0x20000"
                ),
            ]
        );
        // The other pod goes through the default chain both ways: nothing is rejected.
        assert!(in_chain(&local_chain)[3].starts_with(&format!(
            "-A {local_chain} -d 10.244.1.3 -m comment --comment \"run through default ingress"
        )));
        for chain in [
            "KUBE-ROUTER-FORWARD",
            "KUBE-ROUTER-OUTPUT",
            "KUBE-ROUTER-INPUT",
        ] {
            let last = rules
                .iter()
                .rev()
                .find(|r| r.starts_with(&format!("-A {chain} ")))
                .unwrap();
            assert!(
                last.ends_with("-m mark --mark 0x20000/0x20000 -j ACCEPT"),
                "{last}"
            );
        }
        let forward: Vec<&str> = rules
            .iter()
            .copied()
            .filter(|r| r.starts_with("-A KUBE-ROUTER-FORWARD ") && r.contains(&target_chain))
            .collect();
        assert_eq!(
            forward.len(),
            4,
            "routed and bridged, to and from: {forward:#?}"
        );
        assert_eq!(
            forward
                .iter()
                .filter(|r| r.contains("--physdev-is-bridged"))
                .count(),
            2
        );

        // On another node: the policy's chain and sets, but no chain for the target.
        let remote = kube_router::render("n2", &[], &[p]);
        assert!(remote.filter.chains.contains(&policy_chain));
        assert!(!remote.filter.chains.contains(&target_chain));
        assert_eq!(remote.ipsets, rendered.ipsets);
    }

    #[test]
    fn kube_router_splits_a_zero_prefix_and_writes_no_rule_for_ingress_none() {
        let mut everyone = allow_a();
        everyone.from = vec![net("0.0.0.0/0")];
        everyone.ports = vec![];
        let rendered = kube_router::render("n1", &[], &[everyone]);
        assert!(rendered.ipsets.contains(" 0.0.0.0/1 timeout 0\n"));
        assert!(rendered.ipsets.contains(" 128.0.0.0/1 timeout 0\n"));
        let chain = hashed("KUBE-NWPLCY-", "defaultallow-a0IPv4");
        let rules: Vec<&str> = lines(&rendered.filter)
            .into_iter()
            .filter(|r| r.starts_with(&format!("-A {chain} ")))
            .collect();
        assert!(
            rules[0].ends_with(" dst -j MARK --set-xmark 0x10000/0x10000"),
            "all ports"
        );

        let mut nobody = allow_a();
        nobody.from = vec![];
        let rendered = kube_router::render("n1", &[], &[nobody]);
        assert!(!rendered.ipsets.contains("KUBE-SRC-"));
        assert!(
            !lines(&rendered.filter)
                .iter()
                .any(|r| r.starts_with(&format!("-A {chain} ")))
        );
    }

    #[test]
    fn kube_network_policies_table_is_the_controller_s_with_verdicts_for_the_queue() {
        let mut second = allow_a();
        second.name = "dns".into();
        second.from = vec![net("10.244.0.0/16")];
        second.ports = vec![(Protocol::Udp, 53), (Protocol::Tcp, 53)];
        let expected = "add table inet kube-network-policies
delete table inet kube-network-policies
table inet kube-network-policies {
	set podips-v4 {
		type ipv4_addr
		elements = { 10.244.1.2 }
	}
	set podips-v6 {
		type ipv6_addr
	}
	chain postrouting {
		type filter hook postrouting priority srcnat - 5; policy accept;
		udp dport 53 accept
		meta nfproto ipv6 icmpv6 type nd-router-solicit accept
		meta nfproto ipv6 icmpv6 type nd-router-advert accept
		meta nfproto ipv6 icmpv6 type nd-neighbor-solicit accept
		meta nfproto ipv6 icmpv6 type nd-neighbor-advert accept
		meta nfproto ipv6 icmpv6 type nd-redirect accept
		meta skuid 0 counter accept
		ct label 28 ct state established,related counter accept
		ip saddr @podips-v4 goto queue-100
		ip daddr @podips-v4 goto queue-100
		ip6 saddr @podips-v6 goto queue-100
		ip6 daddr @podips-v6 goto queue-100
		ct label set 28
	}
	chain prerouting {
		type filter hook prerouting priority dstnat + 5; policy accept;
		meta l4proto != udp accept
		udp dport != 53 accept
		ip saddr @podips-v4 goto queue-100
		ip daddr @podips-v4 goto queue-100
		ip6 saddr @podips-v6 goto queue-100
		ip6 daddr @podips-v6 goto queue-100
	}
	chain queue-100 {
		ip daddr 10.244.1.2 ip saddr { 10.244.2.0/24 } tcp dport 8080 ct label set 28 accept
		ip daddr 10.244.1.2 ip saddr { 10.244.0.0/16 } udp dport 53 ct label set 28 accept
		ip daddr 10.244.1.2 ip saddr { 10.244.0.0/16 } tcp dport 53 ct label set 28 accept
		ip daddr 10.244.1.2 drop
		ct label set 28 accept
	}
}
";
        let policies = [allow_a(), second];
        assert_eq!(kube_network_policies::render("n1", &policies), expected);
        // Another node manages no pod, but would judge a flow its pods open to the
        // target as the target's node does.
        let remote = kube_network_policies::render("n2", &policies);
        assert!(remote.contains("\t\ttype ipv4_addr\n\t}"));
        assert!(remote.contains("\t\tip daddr 10.244.1.2 drop\n"));
    }

    #[test]
    fn conntrack_entries_parse_with_their_reply_direction() {
        let flow = |line| kube_network_policies::parse_flow(line).unwrap();
        assert_eq!(
            flow(
                "tcp      6 431999 ESTABLISHED src=10.244.2.2 dst=10.96.0.20 sport=40000 \
                 dport=80 src=10.244.1.2 dst=10.244.2.2 sport=8080 dport=40000 [ASSURED] \
                 mark=0 use=1"
            ),
            Some(Flow {
                proto: "tcp",
                number: 6,
                established: true,
                src: CLIENT_A,
                dst: Ipv4Addr::new(10, 96, 0, 20),
                sport: 40000,
                dport: 80,
                reply_src: TARGET,
                reply_sport: 8080,
            })
        );
        let syn = flow(
            "tcp      6 118 SYN_SENT src=10.244.2.2 dst=10.244.1.2 sport=1 dport=2 \
             [UNREPLIED] src=10.244.1.2 dst=10.244.2.2 sport=2 dport=1 mark=0 use=1",
        )
        .unwrap();
        assert!(!syn.established);
        let udp = flow(
            "udp      17 29 src=10.244.2.2 dst=10.244.1.2 sport=5353 dport=53 [UNREPLIED] \
             src=10.244.1.2 dst=10.244.2.2 sport=53 dport=5353 mark=0 use=1",
        )
        .unwrap();
        assert!(udp.established, "every UDP flow is judged");
        assert_eq!(
            flow(
                "icmp     1 29 src=10.244.2.2 dst=10.244.1.2 type=8 code=0 id=7 src=10.244.1.2 dst=10.244.2.2 type=0 code=0 id=7 mark=0 use=1"
            ),
            None
        );
        assert!(kube_network_policies::parse_flow("tcp 6 1 ESTABLISHED src=1.2.3.4").is_err());
    }

    #[test]
    fn host_firewall_rejects_in_forward_what_from_does_not_admit() {
        let filter = host_firewall::render("n1", &[allow_a()]).unwrap();
        assert_eq!(filter.chains, ["HOST-FIREWALL"]);
        assert_eq!(
            lines(&filter),
            [
                "-I FORWARD 1 -m comment --comment \"host firewall: pods only some may reach\" -j HOST-FIREWALL",
                "-A HOST-FIREWALL -s 10.244.2.0/24 -d 10.244.1.2 -p tcp --dport 8080 -j RETURN",
                "-A HOST-FIREWALL -d 10.244.1.2 -j REJECT",
            ]
        );
        assert!(host_firewall::render("n2", &[allow_a()]).is_none());
    }

    // --- The root test: a node forwarding between pods, each engine in turn. ---

    const TIMEOUT: Duration = Duration::from_secs(1);

    /// TCP echo servers in one namespace, stopped when dropped.
    struct Echo {
        stop: Arc<AtomicBool>,
        threads: Vec<JoinHandle<()>>,
    }

    impl Echo {
        fn start(ns: &str, at: &[SocketAddrV4]) -> Result<Self> {
            let listeners = netns::enter(ns, || {
                at.iter()
                    .map(|a| Ok(TcpListener::bind(a)?))
                    .collect::<Result<Vec<_>>>()
            })?;
            let stop = Arc::new(AtomicBool::new(false));
            let mut threads = Vec::new();
            for listener in listeners {
                listener.set_nonblocking(true)?;
                let stop = stop.clone();
                threads.push(thread::spawn(move || serve(&listener, &stop)));
            }
            Ok(Self { stop, threads })
        }
    }

    impl Drop for Echo {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }

    fn serve(listener: &TcpListener, stop: &Arc<AtomicBool>) {
        thread::scope(|s| {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        s.spawn(|| echo(stream, stop));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => return,
                }
            }
        });
    }

    fn echo(mut stream: TcpStream, stop: &AtomicBool) {
        let mut buf = [0u8; 64];
        if stream.set_nonblocking(false).is_err()
            || stream
                .set_read_timeout(Some(Duration::from_millis(50)))
                .is_err()
        {
            return;
        }
        while !stop.load(Ordering::Relaxed) {
            match stream.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
        }
    }

    /// How a new connection came out.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Outcome {
        Connects,
        Refused,
        TimesOut,
    }

    fn connect(ns: &str, to: SocketAddrV4) -> io::Result<TcpStream> {
        let socket = netns::enter(ns, || {
            Ok(Socket::new(
                Domain::IPV4,
                Type::STREAM,
                Some(SocketProtocol::TCP),
            )?)
        })
        .map_err(io::Error::other)?;
        socket.connect_timeout(&to.into(), TIMEOUT)?;
        let stream = TcpStream::from(socket);
        stream.set_read_timeout(Some(TIMEOUT))?;
        Ok(stream)
    }

    fn outcome(ns: &str, to: SocketAddrV4) -> Outcome {
        match connect(ns, to) {
            Ok(stream) if echoes(&stream) => Outcome::Connects,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Outcome::Refused,
            _ => Outcome::TimesOut,
        }
    }

    /// Whether a few bytes sent on `stream` come back.
    fn echoes(mut stream: &TcpStream) -> bool {
        let mut answer = [0u8; 4];
        stream.write_all(b"ping").is_ok()
            && stream.read_exact(&mut answer).is_ok()
            && &answer == b"ping"
    }

    /// The node's netfilter and ipset state, to compare before and after.
    fn snapshot(ns: &str) -> String {
        let ruleset = netns::run(netns::command(ns, "nft").args(["list", "ruleset"])).unwrap();
        let sets = netns::run(netns::command(ns, "ipset").args(["list", "-n"])).unwrap();
        format!("{ruleset}---\n{sets}")
    }

    /// A node `node` with a bridge `cni0` (10.244.1.1/24) holding the target and another
    /// pod, and two clients each behind a routed veth (10.244.2.0/24, 10.244.3.0/24).
    fn build(scratch: &Scratch) -> Result<()> {
        let node = scratch.ns("node");
        let mut script = netns::Script::new(&node);
        script
            .bridge("cni0", None)?
            .address(net("10.244.1.1/24"), "cni0");
        for (port, pod) in [("vtarget", "target"), ("vlocal", "local")] {
            script
                .veth(port, None, "eth0", &scratch.ns(pod), None)?
                .attach(port, "cni0");
        }
        for (link, client, gateway) in [("va", "a", "10.244.2.1/24"), ("vb", "b", "10.244.3.1/24")]
        {
            script
                .veth(link, None, "eth0", &scratch.ns(client), None)?
                .address(net(gateway), link)
                .up(link);
        }
        script.apply()?;
        for (host, address, gateway) in [
            ("target", TARGET, [10, 244, 1, 1]),
            ("local", LOCAL, [10, 244, 1, 1]),
            ("a", CLIENT_A, [10, 244, 2, 1]),
            ("b", CLIENT_B, [10, 244, 3, 1]),
        ] {
            netns::Script::new(&scratch.ns(host))
                .address(Ipv4Net::new(address, 24)?, "eth0")
                .up("eth0")
                .default_route(gateway.into())
                .apply()?;
        }
        netns::enable_forwarding(&node)?;
        // A node's connections are tracked from the start (kube-proxy's and the
        // masquerade's rules need it); the kernel tracks only once a rule asks for it.
        netns::run_with_input(
            netns::command(&node, "nft").args(["-f", "-"]),
            "table ip node {\n\tchain track {\n\t\ttype filter hook prerouting priority 0;\n\
             \t\tct state established\n\t}\n}\n",
        )
        .map(drop)
    }

    #[test]
    fn each_engine_admits_from_stops_the_rest_and_leaves_nothing_behind() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (namespaces, netfilter)");
            return;
        }
        let scratch = Scratch::new(&["node", "target", "local", "a", "b"]).unwrap();
        build(&scratch).unwrap();
        let node = scratch.ns("node");
        let allowed = SocketAddrV4::new(TARGET, ALLOWED_PORT);
        let other = SocketAddrV4::new(TARGET, OTHER_PORT);
        let _echo = Echo::start(&scratch.ns("target"), &[allowed, other]).unwrap();
        let pristine = snapshot(&node);
        let mut failures = Vec::new();
        let mut check = |what: String, ok: bool| {
            if !ok {
                failures.push(what);
            }
        };
        for engine in Engine::ALL {
            // The engine runs before the policy exists, as a cluster's does.
            install(&node, engine, "n1", &[TARGET, LOCAL], &[]).unwrap();
            let from_a = connect(&scratch.ns("a"), allowed).unwrap();
            let from_b = connect(&scratch.ns("b"), allowed).unwrap();
            assert!(
                echoes(&from_a) && echoes(&from_b),
                "no echo before {engine:?}"
            );

            install(&node, engine, "n1", &[TARGET, LOCAL], &[allow_a()]).unwrap();
            // The engines' REJECT answers a SYN with port-unreachable; a drop stays silent.
            let denied = match engine {
                Engine::KubeNetworkPolicies => Outcome::TimesOut,
                Engine::KubeRouter | Engine::HostFirewall => Outcome::Refused,
            };
            for (client, to, expected) in [
                ("a", allowed, Outcome::Connects),
                ("b", allowed, denied),
                ("a", other, denied),
                // Same node: bridged, through br_netfilter's hooks.
                ("local", allowed, denied),
            ] {
                let got = outcome(&scratch.ns(client), to);
                check(
                    format!("{engine:?}: {client} -> {to}: {got:?}, expected {expected:?}"),
                    got == expected,
                );
            }
            // Flows opened before: the engines accept established flows, but
            // kube-network-policies' strict mode ends those its policies do not admit;
            // the host firewall knows no flows.
            check(
                format!("{engine:?}: a's earlier connection died"),
                echoes(&from_a),
            );
            let b_lives = echoes(&from_b);
            check(
                format!(
                    "{engine:?}: b's earlier connection {}",
                    if b_lives { "lives" } else { "died" }
                ),
                b_lives == (engine == Engine::KubeRouter),
            );
            // kube-router lets ICMP errors and echo requests through to any pod.
            let ping = probe::ping(&probe::Client::new(scratch.ns("a")), TARGET, probe::token());
            let expected_ping = match engine {
                Engine::KubeRouter => "ok",
                Engine::KubeNetworkPolicies => "timeout",
                Engine::HostFirewall => "unreach",
            };
            let got_ping = ping.as_ref().map_or_else(|f| f.short(), |_| "ok");
            check(
                format!(
                    "{engine:?}: ping from a: {got_ping} ({}), expected {expected_ping}",
                    ping.as_ref()
                        .err()
                        .map_or(String::new(), ToString::to_string)
                ),
                got_ping == expected_ping,
            );

            remove(&node, engine).unwrap();
            let after = snapshot(&node);
            check(
                format!("{engine:?} left behind:\n{after}"),
                after == pristine,
            );
            let got = outcome(&scratch.ns("b"), allowed);
            check(
                format!("{engine:?} removed: b -> target: {got:?}"),
                got == Outcome::Connects,
            );
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }
}
