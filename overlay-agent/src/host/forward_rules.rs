//! flanneld's `--iptables-forward-rules`: rules that accept the pod network's traffic
//! in the host's FORWARD hook, so that a host whose FORWARD policy is DROP (Docker sets
//! it) still forwards pods' packets. This datapath hands every pod flow to the host
//! stack (decapsulated packets too), so without them such a host drops pod traffic
//! across nodes, as it does under flanneld without its rules.
//!
//! Written as flanneld writes them, so that a node that ran flanneld finds its chain
//! and rules taken over rather than doubled (read, nothing copied: flannel-io/flannel
//! v0.28.9, commit 5cd0d52):
//!
//! - iptables (`pkg/trafficmngr/iptables/iptables.go`, `forwardRules`,
//!   `SetupAndEnsureForwardRules`, `ipTablesCleanAndBuild`, `ensureIPTables`): in the
//!   filter table, a chain `FLANNEL-FWD` emptied at start (`CreateIP4Chain`), a jump to
//!   it appended to FORWARD, and in it `-s NETWORK` and `-d NETWORK` ACCEPT, each rule
//!   with the comment `flanneld forward`. Every resync period (`--iptables-resync`) it
//!   checks (`iptables -C`, exit status 1 meaning absent, as go-iptables' `Exists`)
//!   that the chain and all three rules exist; when one is missing it deletes those
//!   still there and appends all three again in one `iptables-restore --noflush`, to
//!   keep their order. Through the `iptables` and `iptables-restore` binaries
//!   (go-iptables runs them).
//! - nftables, when net-conf.json has `EnableNFTables` (`pkg/trafficmngr/nftables/
//!   nftables.go`, `Init`, `SetupAndEnsureForwardRules`, `CleanUp`, through
//!   sigs.k8s.io/knftables, which runs `nft`): table `ip flannel-ipv4`, a base chain
//!   `forward` (filter hook forward, priority filter) flushed and refilled with
//!   `ip saddr NETWORK accept` and `ip daddr NETWORK accept`, in one transaction.
//!   flanneld writes it once; this agent checks it every resync period as well.
//!   An accept there ends the packet's walk of that chain only: a DROP policy in
//!   another base chain on the hook (iptables-nft's FORWARD) still drops it, as under
//!   flanneld.
//!
//! `overlay-agent cleanup` removes both forms ([`remove`]); flanneld removes neither
//! on exit.
//!
//! Which iptables backend: in a container the image's alternatives, not the host's,
//! decide what `iptables` is, and rules written through the other backend than the
//! host's firewall uses sit in tables nobody reads the same way (legacy and nft
//! chains are evaluated apart, and each side's tools show only their own). flannel's
//! image therefore ships both and the kubernetes-sigs/iptables-wrappers wrapper,
//! which picks the host's backend on first use. Where both `iptables-legacy` and
//! `iptables-nft` are installed (the agent's image: Debian's `iptables` package) the
//! agent picks as that wrapper does ([`choose_backend`], once, logged): kubelet's
//! chains `KUBE-IPTABLES-HINT`/`KUBE-KUBELET-CANARY` in iptables-nft's tables mean
//! nft, in iptables-legacy's mean legacy; without them, legacy if its saves hold more
//! rules (`-A` lines) than nft's, else nft (IPv6's saves count only where the kernel
//! has IPv6: booted with `ipv6.disable=1`, ip6tables-save fails). A save that fails (iptables-legacy-save
//! without CAP_NET_RAW where legacy tables exist) is an error where the wrapper
//! would count it empty, so that a legacy host is never taken for an nft one; the
//! choice is tried again every period until it succeeds. With one backend only,
//! plain `iptables`.
//! Read (nothing copied): kubernetes-sigs/iptables-wrappers `iptables-wrapper-installer.sh`
//! (the shell wrapper it installed up to v3: rule counts) and `internal/iptables/detect.go`
//! (commit 52bfd7a: kubelet's chains first); flannel v0.28.9 `images/Dockerfile`.

use std::{
    fmt::Write as _,
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use ipnet::Ipv4Net;
use tracing::{error, info, warn};

use super::legacy_tables::legacy_tables;

/// flanneld's chain in the filter table.
pub const CHAIN: &str = "FLANNEL-FWD";
/// The comment on each of flanneld's rules.
pub const COMMENT: &str = "flanneld forward";
/// flanneld's nftables table and its forward chain.
pub const NFT_TABLE: &str = "flannel-ipv4";
pub const NFT_CHAIN: &str = "forward";

/// The netfilter frontend the rules are written through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frontend {
    Iptables,
    /// net-conf.json's `EnableNFTables`.
    Nftables,
}

/// The iptables binaries the rules go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `iptables`: one backend installed, whichever it is.
    Only,
    /// `iptables-legacy` (x_tables).
    Legacy,
    /// `iptables-nft` (nf_tables).
    Nft,
}

impl Backend {
    pub fn iptables(self) -> &'static str {
        match self {
            Self::Only => "iptables",
            Self::Legacy => "iptables-legacy",
            Self::Nft => "iptables-nft",
        }
    }

    /// Its iptables-restore, `iptables-save` (IPv4) and `ip6tables-save` (IPv6).
    fn companions(self) -> [String; 3] {
        let name = self.iptables();
        let save = format!("{name}-save");
        [
            format!("{name}-restore"),
            format!("ip6{}", &save[2..]),
            save,
        ]
    }
}

/// A backend chosen, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub backend: Backend,
    pub why: String,
}

/// Whether `save` (iptables-save output) holds kubelet's chains, which kubelet (1.17
/// and later) creates through the host's backend.
fn kubelet_chains(save: &str) -> bool {
    save.lines()
        .any(|l| l.starts_with(":KUBE-IPTABLES-HINT ") || l.starts_with(":KUBE-KUBELET-CANARY "))
}

/// The rules in `save` (its `-A` lines).
fn rule_count(save: &str) -> usize {
    save.lines().filter(|l| l.starts_with('-')).count()
}

/// The host's backend from what each holds (`iptables-*-save` and `ip6tables-*-save`
/// output, concatenated), as iptables-wrappers picks it.
pub fn choose_backend(legacy_save: &str, nft_save: &str) -> Choice {
    let choice = |backend, why: String| Choice { backend, why };
    if kubelet_chains(nft_save) {
        return choice(Backend::Nft, "kubelet's chains are in iptables-nft".into());
    }
    if kubelet_chains(legacy_save) {
        return choice(
            Backend::Legacy,
            "kubelet's chains are in iptables-legacy".into(),
        );
    }
    let (legacy, nft) = (rule_count(legacy_save), rule_count(nft_save));
    let counts = format!("{legacy} rules in iptables-legacy, {nft} in iptables-nft");
    if legacy > nft {
        choice(Backend::Legacy, counts)
    } else {
        choice(Backend::Nft, counts)
    }
}

/// Whether `program` is an executable file in a directory of `PATH`.
fn installed(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Both backends when both are installed, else the one `iptables` is.
fn installed_backends() -> Vec<Backend> {
    if installed(Backend::Legacy.iptables()) && installed(Backend::Nft.iptables()) {
        vec![Backend::Legacy, Backend::Nft]
    } else {
        vec![Backend::Only]
    }
}

/// What `backend`'s save commands print. Unlike the wrapper, which counts a failing
/// one as empty, a failure is an error: without CAP_NET_RAW iptables-legacy-save
/// fails where legacy tables exist, and a legacy host would look like an nft one
/// (where the legacy backend holds no tables it succeeds without the socket).
fn saved(backend: Backend) -> Result<String> {
    let mut out = String::new();
    for save in save_commands(backend, Path::new("/proc/net/if_inet6").exists()) {
        out.push_str(&run(&save, &[], None)?.check(&save)?);
    }
    Ok(out)
}

/// The save commands that show what `backend` holds: IPv4's, and IPv6's where the
/// kernel has IPv6. On a kernel booted with `ipv6.disable=1` (no
/// /proc/net/if_inet6) ip6tables-save fails for want of the address family, and the
/// backend could never be chosen.
fn save_commands(backend: Backend, ipv6: bool) -> Vec<String> {
    let [_, v6, v4] = backend.companions();
    if ipv6 { vec![v4, v6] } else { vec![v4] }
}

/// The backend of the host's firewall: see the module documentation.
pub fn host_backend() -> Result<Choice> {
    Ok(match installed_backends().as_slice() {
        [Backend::Legacy, Backend::Nft] => {
            choose_backend(&saved(Backend::Legacy)?, &saved(Backend::Nft)?)
        }
        _ => Choice {
            backend: Backend::Only,
            why: "one iptables backend installed".into(),
        },
    })
}

/// One iptables rule of flanneld's: the chain it is in and its spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: &'static str,
    pub spec: Vec<String>,
}

/// flanneld's three rules for `network`, in their order.
pub fn iptables_rules(network: Ipv4Net) -> [Rule; 3] {
    let commented = |head: &[&str], target: &str| -> Vec<String> {
        head.iter()
            .chain(&["-m", "comment", "--comment", COMMENT, "-j", target])
            .map(|s| (*s).to_owned())
            .collect()
    };
    let net = network.to_string();
    [
        Rule {
            chain: "FORWARD",
            spec: commented(&[], CHAIN),
        },
        Rule {
            chain: CHAIN,
            spec: commented(&["-s", &net], "ACCEPT"),
        },
        Rule {
            chain: CHAIN,
            spec: commented(&["-d", &net], "ACCEPT"),
        },
    ]
}

/// A word of an iptables-restore line, quoted when it holds a space.
fn restore_word(w: &str) -> String {
    if w.contains(' ') {
        format!("\"{w}\"")
    } else {
        w.to_owned()
    }
}

/// The `iptables-restore --noflush` input that deletes the rules in `present` and
/// appends all of `rules` in order.
pub fn restore_payload(rules: &[Rule], present: &[bool]) -> String {
    let mut out = String::from("*filter\n");
    let line = |out: &mut String, action: &str, r: &Rule| {
        let spec: Vec<String> = r.spec.iter().map(|w| restore_word(w)).collect();
        let _ = writeln!(out, "{action} {} {}", r.chain, spec.join(" "));
    };
    for (r, _) in rules.iter().zip(present).filter(|(_, p)| **p) {
        line(&mut out, "-D", r);
    }
    for r in rules {
        line(&mut out, "-A", r);
    }
    out.push_str("COMMIT\n");
    out
}

/// The `nft -f` transaction that creates flanneld's table and chain and (re)fills the
/// chain.
pub fn nft_transaction(network: Ipv4Net) -> String {
    format!(
        "add table ip {NFT_TABLE} {{ comment \"rules for {NFT_TABLE}\" ; }}\n\
         add chain ip {NFT_TABLE} {NFT_CHAIN} {{ type filter hook forward priority filter ; comment \"chain to accept flannel traffic\" ; }}\n\
         flush chain ip {NFT_TABLE} {NFT_CHAIN}\n\
         {}",
        nft_rules(network)
            .iter()
            .map(|r| format!("add rule ip {NFT_TABLE} {NFT_CHAIN} {r}\n"))
            .collect::<String>()
    )
}

/// The nftables rules as `nft list` prints them.
fn nft_rules(network: Ipv4Net) -> [String; 2] {
    [
        format!("ip saddr {network} accept"),
        format!("ip daddr {network} accept"),
    ]
}

/// Whether `nft list chain` output holds flanneld's forward chain with both rules.
pub fn nft_listing_complete(listing: &str, network: Ipv4Net) -> bool {
    let lines: Vec<&str> = listing.lines().map(str::trim).collect();
    let hooked = lines
        .iter()
        .any(|l| l.starts_with("type filter hook forward priority filter;"));
    hooked
        && nft_rules(network)
            .iter()
            .all(|r| lines.contains(&r.as_str()))
}

/// What a command did: its exit status code and standard error.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// A failure as an error naming the command.
    fn check(self, what: &str) -> Result<String> {
        if self.ok() {
            return Ok(self.stdout);
        }
        bail!(
            "{what} failed (exit status {}): {}",
            self.code.map_or("none".into(), |c| c.to_string()),
            self.stderr.trim()
        )
    }
}

/// Runs `program args`, feeding `stdin`; a missing binary is an error that says so.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<Ran> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| match program {
            "nft" => "running nft (is the nftables package installed?)".to_owned(),
            p => format!("running {p} (is the iptables package installed?)"),
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .with_context(|| format!("writing to {program}"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {program}"))?;
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    Ok(Ran {
        code: out.status.code(),
        stdout: text(out.stdout),
        stderr: text(out.stderr),
    })
}

/// `iptables -w -t filter ARGS` through `backend`.
fn iptables(backend: Backend, args: &[&str]) -> Result<Ran> {
    let all: Vec<&str> = ["-w", "-t", "filter"].iter().chain(args).copied().collect();
    run(backend.iptables(), &all, None)
}

/// Whether the outcome of a check (`-C`, `-S CHAIN`) means present: exit status 1 is
/// absent, as go-iptables reads it; anything else but success is an error.
fn present(ran: Ran, what: &str) -> Result<bool> {
    match ran.code {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => ran.check(what).map(|_| false),
    }
}

fn chain_exists(backend: Backend) -> Result<bool> {
    let what = format!("{} -S {CHAIN}", backend.iptables());
    present(iptables(backend, &["-S", CHAIN])?, &what)
}

fn rule_exists(backend: Backend, r: &Rule) -> Result<bool> {
    let mut args = vec!["-C", r.chain];
    args.extend(r.spec.iter().map(String::as_str));
    let what = format!("{} -C {}", backend.iptables(), r.chain);
    present(iptables(backend, &args)?, &what)
}

/// What a pass of [`ForwardRules::ensure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    /// All rules were there.
    InPlace,
    /// Some were missing (or it was the first pass): written again.
    Written,
}

/// flanneld's forward rules for one network, kept in place.
#[derive(Debug)]
pub struct ForwardRules {
    frontend: Frontend,
    network: Ipv4Net,
    /// The iptables backend, chosen on the first pass.
    backend: Option<Backend>,
    /// The first pass empties flanneld's chain, as flanneld does at start (rules of an
    /// earlier network go).
    started: bool,
}

impl ForwardRules {
    pub fn new(frontend: Frontend, network: Ipv4Net) -> Self {
        Self {
            frontend,
            network,
            backend: None,
            started: false,
        }
    }

    /// Puts the rules in place where they are not. Blocking (it runs the binaries).
    pub fn ensure(&mut self) -> Result<Ensured> {
        let ensured = match self.frontend {
            Frontend::Iptables => self.ensure_iptables(),
            Frontend::Nftables => self.ensure_nftables(),
        }?;
        self.started = true;
        Ok(ensured)
    }

    /// The iptables backend the rules go through: the host's, chosen once (logged);
    /// a failed choice is tried again at the next call.
    pub fn backend(&mut self) -> Result<Backend> {
        if let Some(backend) = self.backend {
            return Ok(backend);
        }
        let choice = host_backend().context("choosing the host's iptables backend")?;
        info!(
            iptables = choice.backend.iptables(),
            why = choice.why,
            "iptables backend for the forward rules"
        );
        Ok(*self.backend.insert(choice.backend))
    }

    fn ensure_iptables(&mut self) -> Result<Ensured> {
        let backend = self.backend()?;
        let program = backend.iptables();
        let rules = iptables_rules(self.network);
        let had_chain = chain_exists(backend)?;
        let make = |action: &str| {
            iptables(backend, &[action, CHAIN])?.check(&format!("{program} {action} {CHAIN}"))
        };
        if !self.started {
            // go-iptables' ClearChain: create it, or empty it.
            make(if had_chain { "-F" } else { "-N" })?;
        }
        // Without the chain no rule can be there: iptables refuses a jump to a chain
        // that does not exist.
        let present = if had_chain || !self.started {
            rules
                .iter()
                .map(|r| rule_exists(backend, r))
                .collect::<Result<Vec<_>>>()?
        } else {
            make("-N")?;
            vec![false; rules.len()]
        };
        if self.started && present.iter().all(|p| *p) {
            return Ok(Ensured::InPlace);
        }
        let [restore, ..] = backend.companions();
        run(
            &restore,
            &["--noflush", "-w"],
            Some(&restore_payload(&rules, &present)),
        )?
        .check(&format!("{restore} --noflush"))?;
        Ok(Ensured::Written)
    }

    fn ensure_nftables(&self) -> Result<Ensured> {
        let listing = run("nft", &["list", "chain", "ip", NFT_TABLE, NFT_CHAIN], None)?;
        if self.started && listing.ok() && nft_listing_complete(&listing.stdout, self.network) {
            return Ok(Ensured::InPlace);
        }
        run("nft", &["-f", "-"], Some(&nft_transaction(self.network)))?
            .check("nft -f (flannel's forward chain)")?;
        Ok(Ensured::Written)
    }
}

/// Removes flanneld's forward rules in both forms, whichever exist (cleanup); returns
/// what was removed, one line each. A frontend whose binary is missing holds nothing
/// to remove.
pub fn remove() -> Result<String> {
    let mut report = String::new();
    let missing = |e: &anyhow::Error| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound)
    };
    // Through every backend installed: the rules may predate a change of the host's.
    for backend in installed_backends() {
        match remove_iptables(backend) {
            Ok(true) => writeln!(
                report,
                "removed iptables chain filter {CHAIN} and its jump ({})",
                backend.iptables()
            )?,
            Ok(false) => {}
            Err(e) if missing(&e) => {}
            Err(e) => return Err(e),
        }
    }
    match run("nft", &["delete", "table", "ip", NFT_TABLE], None) {
        Ok(r) if r.ok() => writeln!(report, "removed nftables table ip {NFT_TABLE}")?,
        // Absent: nothing to remove.
        Ok(r) if r.stderr.contains("No such file or directory") => {}
        Ok(r) => {
            r.check(&format!("nft delete table ip {NFT_TABLE}"))?;
        }
        Err(e) if missing(&e) => {}
        Err(e) => return Err(e),
    }
    Ok(report)
}

/// The legacy backend's tables in the calling thread's network namespace (the
/// iptables binaries run in it; `/proc/net` is the main thread's).
const THREAD_LEGACY_TABLES: &str = "/proc/thread-self/net/ip_tables_names";

/// Deletes every jump to flanneld's chain from FORWARD, then the chain, through
/// `backend`; whether there was one.
fn remove_iptables(backend: Backend) -> Result<bool> {
    // Asking iptables-legacy about the filter table would create it where the legacy
    // backend holds none (and that turns the fast path off).
    if backend == Backend::Legacy
        && !legacy_tables(Path::new(THREAD_LEGACY_TABLES))?
            .iter()
            .any(|t| t == "filter")
    {
        return Ok(false);
    }
    if !chain_exists(backend)? {
        return Ok(false);
    }
    let program = backend.iptables();
    let jump = &iptables_rules(Ipv4Net::default())[0];
    // The jump's text does not depend on the network.
    while rule_exists(backend, jump)? {
        let mut args = vec!["-D", jump.chain];
        args.extend(jump.spec.iter().map(String::as_str));
        iptables(backend, &args)?.check(&format!("{program} -D FORWARD"))?;
    }
    for action in ["-F", "-X"] {
        iptables(backend, &[action, CHAIN])?.check(&format!("{program} {action} {CHAIN}"))?;
    }
    Ok(true)
}

/// Keeps flanneld's forward rules in place, checking them every `period` as flanneld
/// does every --iptables-resync seconds. A failure (no iptables binary, a refused
/// command) is logged and told to `record` (with whether rules were written), and the
/// next period tries again.
pub async fn keep(
    mut rules: ForwardRules,
    period: Duration,
    record: impl Fn(Result<bool, String>),
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for pass in 0u64.. {
        tick.tick().await;
        // The binaries may wait for the xtables lock: off the run loop's thread.
        let ensured = tokio::task::spawn_blocking(move || {
            let ensured = rules.ensure();
            (rules, ensured)
        })
        .await;
        let Ok((back, ensured)) = ensured else {
            error!("the forward rules' task failed; they are no longer kept");
            return;
        };
        rules = back;
        match ensured {
            Ok(Ensured::InPlace) => record(Ok(false)),
            Ok(Ensured::Written) => {
                if pass == 0 {
                    info!(?rules, "forward rules in place");
                } else {
                    warn!(?rules, "some forward rules were missing; wrote them again");
                }
                record(Ok(true));
            }
            Err(e) => {
                let e = format!("{e:#}");
                error!(
                    error = e,
                    "putting the forward rules in place failed; retrying"
                );
                record(Err(e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> Ipv4Net {
        "10.244.0.0/16".parse().unwrap()
    }

    #[test]
    fn iptables_rules_are_flanneld_s() {
        let text: Vec<String> = iptables_rules(net())
            .iter()
            .map(|r| format!("{} {}", r.chain, r.spec.join(" ")))
            .collect();
        assert_eq!(
            text,
            [
                "FORWARD -m comment --comment flanneld forward -j FLANNEL-FWD",
                "FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment flanneld forward -j ACCEPT",
                "FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment flanneld forward -j ACCEPT",
            ]
        );
    }

    #[test]
    fn restore_deletes_what_is_there_and_appends_all_in_order() {
        let rules = iptables_rules(net());
        assert_eq!(
            restore_payload(&rules, &[true, false, true]),
            "*filter\n\
             -D FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
             -D FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
             -A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             -A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             COMMIT\n"
        );
    }

    /// iptables-save output holding `rules` in the filter table, and `chains` of its own.
    fn save(chains: &[&str], rules: usize) -> String {
        let mut out = String::from("# Generated by iptables-save v1.8.9\n*filter\n");
        out.push_str(":INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n");
        for c in chains {
            out.push_str(&format!(":{c} - [0:0]\n"));
        }
        for i in 0..rules {
            out.push_str(&format!("-A INPUT -p tcp --dport {} -j ACCEPT\n", 1000 + i));
        }
        out.push_str("COMMIT\n");
        out
    }

    #[test]
    fn the_backend_is_the_one_kubelet_uses_else_the_fuller_one() {
        let pick = |legacy: &str, nft: &str| choose_backend(legacy, nft).backend;
        // Nothing anywhere: nft, the wrapper's default.
        assert_eq!(pick("", ""), Backend::Nft);
        assert_eq!(
            choose_backend("", "").why,
            "0 rules in iptables-legacy, 0 in iptables-nft"
        );
        // A host whose firewall is legacy: more rules there.
        assert_eq!(pick(&save(&[], 3), &save(&[], 0)), Backend::Legacy);
        assert_eq!(pick(&save(&[], 3), &save(&[], 4)), Backend::Nft);
        // A tie is nft's.
        assert_eq!(pick(&save(&[], 2), &save(&[], 2)), Backend::Nft);
        // Policies, chains and comments are no rules (iptables-nft-save warns in a
        // comment when legacy tables exist).
        let warned = format!(
            "# Warning: iptables-legacy tables present\n{}",
            save(&["X"], 0)
        );
        assert_eq!(pick(&save(&[], 1), &warned), Backend::Legacy);
        // kubelet's chains outweigh any count, nft's first.
        for chain in ["KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"] {
            let c = choose_backend(&save(&[chain], 0), &save(&[], 50));
            assert_eq!(c.backend, Backend::Legacy, "{chain}");
            assert_eq!(c.why, "kubelet's chains are in iptables-legacy");
            assert_eq!(pick(&save(&[], 50), &save(&[chain], 0)), Backend::Nft);
            assert_eq!(pick(&save(&[chain], 50), &save(&[chain], 0)), Backend::Nft);
        }
        // A chain whose name only starts like kubelet's is no hint.
        assert_eq!(
            pick(&save(&[], 0), &save(&["KUBE-KUBELET-CANARY-X"], 0)),
            Backend::Nft
        );
        assert_eq!(
            pick(&save(&["KUBE-IPTABLES-HINTS"], 1), &save(&[], 2)),
            Backend::Nft
        );
    }

    #[test]
    fn each_backend_has_its_binaries() {
        let names = [Backend::Only, Backend::Legacy, Backend::Nft]
            .map(|b| [vec![b.iptables().to_owned()], b.companions().to_vec()].concat());
        assert_eq!(
            names,
            [
                [
                    "iptables",
                    "iptables-restore",
                    "ip6tables-save",
                    "iptables-save"
                ],
                [
                    "iptables-legacy",
                    "iptables-legacy-restore",
                    "ip6tables-legacy-save",
                    "iptables-legacy-save"
                ],
                [
                    "iptables-nft",
                    "iptables-nft-restore",
                    "ip6tables-nft-save",
                    "iptables-nft-save"
                ],
            ]
        );
        assert!(!installed("overlay-agent-no-such-iptables"));
    }

    #[test]
    fn ipv6_tables_are_read_only_where_the_kernel_has_ipv6() {
        assert_eq!(
            save_commands(Backend::Legacy, true),
            ["iptables-legacy-save", "ip6tables-legacy-save"]
        );
        assert_eq!(save_commands(Backend::Nft, false), ["iptables-nft-save"]);
    }

    #[test]
    fn a_missing_binary_says_which_package() {
        let e = run("overlay-agent-no-such-iptables", &[], None)
            .err()
            .unwrap();
        assert!(
            format!("{e:#}").contains("is the iptables package installed?"),
            "{e:#}"
        );
        let e = run("overlay-agent-no-such-iptables", &[], None)
            .err()
            .unwrap();
        assert!(
            e.downcast_ref::<std::io::Error>().is_some(),
            "cleanup tells it apart"
        );
    }

    #[test]
    fn nftables_transaction_and_listing() {
        let tx = nft_transaction(net());
        assert!(tx.contains(
            "add chain ip flannel-ipv4 forward { type filter hook forward priority filter ;"
        ));
        assert!(tx.ends_with(
            "flush chain ip flannel-ipv4 forward\n\
             add rule ip flannel-ipv4 forward ip saddr 10.244.0.0/16 accept\n\
             add rule ip flannel-ipv4 forward ip daddr 10.244.0.0/16 accept\n"
        ));
        // As `nft list chain ip flannel-ipv4 forward` prints it (nftables 1.0.6).
        let listing = "table ip flannel-ipv4 {\n\
            \tchain forward {\n\
            \t\tcomment \"chain to accept flannel traffic\"\n\
            \t\ttype filter hook forward priority filter; policy accept;\n\
            \t\tip saddr 10.244.0.0/16 accept\n\
            \t\tip daddr 10.244.0.0/16 accept\n\
            \t}\n}\n";
        assert!(nft_listing_complete(listing, net()));
        let flushed = listing.replace("\t\tip daddr 10.244.0.0/16 accept\n", "");
        assert!(!nft_listing_complete(&flushed, net()));
        assert!(!nft_listing_complete(
            listing,
            "10.1.0.0/16".parse().unwrap()
        ));
    }
}
