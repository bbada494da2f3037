//! What flanneld's ipip backend leaves on a node that the agent takes over, found and
//! removed, so that no packet goes around the BPF datapath (through flanneld's
//! tunnel device) and nothing is masqueraded twice (by flanneld's rules and then by
//! ours). From flannel-io/flannel v0.28.9:
//!
//! - the device `flannel.ipip` (`pkg/backend/ipip/ipip.go`: an ipip tunnel with only
//!   `local` set) and, with it, the `podCIDR via <node> dev flannel.ipip onlink`
//!   routes through it (`pkg/backend/route_network.go`);
//! - iptables mode (`pkg/trafficmngr/iptables/iptables.go`): the nat chain
//!   `FLANNEL-POSTRTG` and the jump to it from `POSTROUTING` (comment
//!   `flanneld masq`), in the legacy and the nft backend alike, through the
//!   `iptables-{legacy,nft}[-save]` binaries (plain `iptables` when neither exists);
//! - nftables mode (`pkg/trafficmngr/nftables/nftables.go`): the chain `postrtg` of
//!   table `ip flannel-ipv4`. Its `forward` chain stays, as do iptables' `FLANNEL-FWD`:
//!   they only accept pod traffic, and they are the forward rules' business.
//!
//! The agent calls [`remove`] only once its maps are filled, its programs attached and
//! its routes in place (which replaced flanneld's routes to the same subnets): from
//! then on the device carries nothing, and a flow flanneld's rules masqueraded keeps
//! its translation in the kernel's connection tracking while the datapath leaves
//! alone what leaves from the node's own address. Removing the device earlier would
//! send packets to remote pods down the default route. A node without leftovers is
//! untouched; a second call finds nothing.

use std::{fmt, io::ErrorKind, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use super::Host;
use super::legacy_tables::{LEGACY_TABLES, legacy_tables};

pub const DEVICE: &str = "flannel.ipip";
pub const CHAIN: &str = "FLANNEL-POSTRTG";
const NFT_TABLE: &str = "flannel-ipv4";
const NFT_CHAIN: &str = "postrtg";

/// One thing of flanneld's that was removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leftover {
    /// The tunnel device (its routes went with it).
    Device,
    /// A `POSTROUTING` rule jumping to `FLANNEL-POSTRTG`, in an iptables backend.
    IptablesJump { backend: &'static str, rule: String },
    /// The `FLANNEL-POSTRTG` chain itself, in an iptables backend.
    IptablesChain { backend: &'static str },
    /// nftables mode's masquerade chain.
    NftChain,
}

impl fmt::Display for Leftover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Leftover::Device => write!(f, "device {DEVICE} and its routes"),
            Leftover::IptablesJump { backend, rule } => {
                write!(f, "iptables ({backend}) nat rule `{rule}`")
            }
            Leftover::IptablesChain { backend } => {
                write!(f, "iptables ({backend}) nat chain {CHAIN}")
            }
            Leftover::NftChain => write!(f, "nftables chain ip {NFT_TABLE} {NFT_CHAIN}"),
        }
    }
}

/// Removes what flanneld left; returns what it removed and, separately, the tools it
/// could not look with (absent binaries: the node may still hold such rules).
pub async fn remove(host: &Host) -> Result<(Vec<Leftover>, Vec<&'static str>)> {
    let mut removed = Vec::new();
    let mut unseen = Vec::new();
    if let Some(index) = host.ipip_device(DEVICE).await? {
        host.delete_link(index)
            .await
            .with_context(|| format!("removing {DEVICE}"))?;
        removed.push(Leftover::Device);
    }
    match iptables_backends() {
        None => unseen.push("iptables"),
        Some(backends) => {
            for backend in backends {
                removed.extend(remove_iptables(backend)?);
            }
        }
    }
    match nft(&["list", "chain", "ip", NFT_TABLE, NFT_CHAIN]) {
        Err(e) if is_absent(&e) => unseen.push("nft"),
        // No such table or chain.
        Err(_) => {}
        Ok(_) => {
            // One transaction: the chain's rules and the chain go together.
            let script = format!(
                "flush chain ip {NFT_TABLE} {NFT_CHAIN}\ndelete chain ip {NFT_TABLE} {NFT_CHAIN}\n"
            );
            run_with_input(Command::new("nft").args(["-f", "-"]), &script)
                .context("removing flanneld's nftables masquerade chain")?;
            removed.push(Leftover::NftChain);
        }
    }
    Ok((removed, unseen))
}

/// An iptables backend: its name and its two binaries.
#[derive(Debug, Clone, Copy)]
struct Backend {
    name: &'static str,
    iptables: &'static str,
    save: &'static str,
}

const BACKENDS: [Backend; 2] = [
    Backend {
        name: "legacy",
        iptables: "iptables-legacy",
        save: "iptables-legacy-save",
    },
    Backend {
        name: "nft",
        iptables: "iptables-nft",
        save: "iptables-nft-save",
    },
];

/// Plain `iptables`: whichever backend it is linked to.
const PLAIN: Backend = Backend {
    name: "iptables",
    iptables: "iptables",
    save: "iptables-save",
};

/// The backends whose binaries this node has (both of Debian's and the like, else the
/// plain one), but the legacy one only when it holds a nat table: asking it for one
/// would create it, and a legacy table turns the fast path off (`fast_path`). None
/// when there is no iptables binary at all.
fn iptables_backends() -> Option<Vec<Backend>> {
    let present = |b: &Backend| {
        !Command::new(b.save)
            .arg("--version")
            .output()
            .is_err_and(|e| is_absent(&e))
    };
    let found: Vec<Backend> = BACKENDS.into_iter().filter(present).collect();
    if found.is_empty() {
        return present(&PLAIN).then(|| vec![PLAIN]);
    }
    let legacy_nat = legacy_tables(Path::new(LEGACY_TABLES))
        .is_ok_and(|tables| tables.iter().any(|t| t == "nat"));
    Some(
        found
            .into_iter()
            .filter(|b| b.name != "legacy" || legacy_nat)
            .collect(),
    )
}

fn remove_iptables(backend: Backend) -> Result<Vec<Leftover>> {
    let saved = run(Command::new(backend.save).args(["-t", "nat"]))
        .with_context(|| format!("reading the nat table with {}", backend.save))?;
    let found = find_in_nat(&saved);
    let mut removed = Vec::new();
    for rule in found.jumps {
        let mut args = vec![
            "-w".to_owned(),
            "-t".to_owned(),
            "nat".to_owned(),
            "-D".to_owned(),
        ];
        args.extend(split(&rule)?);
        run(Command::new(backend.iptables).args(&args))
            .with_context(|| format!("removing `{rule}` with {}", backend.iptables))?;
        removed.push(Leftover::IptablesJump {
            backend: backend.name,
            rule,
        });
    }
    if found.chain {
        for op in ["-F", "-X"] {
            run(Command::new(backend.iptables).args(["-w", "-t", "nat", op, CHAIN]))
                .with_context(|| format!("{} -t nat {op} {CHAIN}", backend.iptables))?;
        }
        removed.push(Leftover::IptablesChain {
            backend: backend.name,
        });
    }
    Ok(removed)
}

/// flanneld's masquerade in an `iptables-save -t nat` dump.
#[derive(Debug, Default, PartialEq, Eq)]
struct InNat {
    /// `POSTROUTING` rules jumping to the chain, as saved without `-A`.
    jumps: Vec<String>,
    chain: bool,
}

fn find_in_nat(saved: &str) -> InNat {
    let mut found = InNat::default();
    for line in saved.lines() {
        if line.split_whitespace().next() == Some(format!(":{CHAIN}").as_str()) {
            found.chain = true;
        }
        if let Some(rule) = line.strip_prefix("-A ")
            && rule.starts_with("POSTROUTING ")
            && rule.ends_with(&format!(" -j {CHAIN}"))
        {
            found.jumps.push(rule.to_owned());
        }
    }
    found
}

/// A rule as iptables-save prints it, split into arguments: double quotes group
/// words (`--comment "flanneld masq"`), `\"` and `\\` inside them are literal.
fn split(rule: &str) -> Result<Vec<String>> {
    let mut args = Vec::new();
    let mut current: Option<String> = None;
    let mut chars = rule.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                let arg = current.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(escaped) => arg.push(escaped),
                            None => bail!("a rule ends in an escape: {rule}"),
                        },
                        Some(c) => arg.push(c),
                        None => bail!("unbalanced quotes in a rule: {rule}"),
                    }
                }
            }
            c if c.is_whitespace() => args.extend(current.take()),
            c => current.get_or_insert_with(String::new).push(c),
        }
    }
    args.extend(current);
    Ok(args)
}

fn nft(args: &[&str]) -> std::io::Result<String> {
    let out = Command::new("nft").args(args).output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(std::io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

fn is_absent(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::NotFound
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_with_input(cmd: &mut Command, input: &str) -> Result<String> {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `iptables-nft-save -t nat` of a node running flanneld v0.28.9 with `--ip-masq`
    /// beside kube-proxy and portmap.
    const SAVED: &str = r#"# Generated by iptables-nft-save v1.8.9 (nf_tables) on Sun Dec  6 23:00:00 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:CNI-HOSTPORT-MASQ - [0:0]
:FLANNEL-POSTRTG - [0:0]
:KUBE-POSTROUTING - [0:0]
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A POSTROUTING -m comment --comment "CNI portfwd requiring masquerade" -j CNI-HOSTPORT-MASQ
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
COMMIT
"#;

    #[test]
    fn flanneld_s_jump_and_chain_are_found_and_nothing_else() {
        assert_eq!(
            find_in_nat(SAVED),
            InNat {
                jumps: vec![
                    r#"POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG"#
                        .to_owned()
                ],
                chain: true,
            }
        );
        let without: String = SAVED
            .lines()
            .filter(|l| !l.contains(CHAIN))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(find_in_nat(&without), InNat::default());
    }

    #[test]
    fn saved_rules_split_into_iptables_arguments() {
        assert_eq!(
            split(r#"POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG"#)
                .unwrap(),
            [
                "POSTROUTING",
                "-m",
                "comment",
                "--comment",
                "flanneld masq",
                "-j",
                "FLANNEL-POSTRTG"
            ]
        );
        assert_eq!(
            split(r#"X --comment "say \"hi\"" -j Y"#).unwrap(),
            ["X", "--comment", r#"say "hi""#, "-j", "Y"]
        );
        assert!(split(r#"X --comment "open"#).is_err());
    }

    /// In a network namespace of its own (this thread's): flanneld's rules in both of
    /// its modes, its forward rules, someone else's nat rule and a device of another
    /// kind named `flannel.ipip`. Only the masquerade goes, once. (The ipip device
    /// itself needs the ipip module: `cargo xtask lab --migrate` covers it.)
    #[test]
    fn flanneld_s_masquerade_goes_and_nothing_else_twice() {
        // SAFETY: geteuid only reads the caller's credentials.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: moves only this thread, which ends with the test.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let sh = |script: &str| {
                let ok = Command::new("sh")
                    .args(["-ec", script])
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "{script}");
            };
            let c = r#"-m comment --comment "flanneld masq""#;
            sh(&format!(
                "ip link add {DEVICE} type veth peer name fl-peer
                 iptables-nft -t nat -N {CHAIN}
                 iptables-nft -t nat -A POSTROUTING {c} -j {CHAIN}
                 iptables-nft -t nat -A {CHAIN} -s 10.244.0.0/16 ! -d 224.0.0.0/4 {c} -j MASQUERADE --random-fully
                 iptables-nft -t nat -A POSTROUTING -s 10.244.1.0/24 -j RETURN
                 iptables-nft -N FLANNEL-FWD
                 iptables-nft -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD
                 nft add table ip {NFT_TABLE}
                 nft 'add chain ip {NFT_TABLE} forward {{ type filter hook forward priority 0; }}'
                 nft add rule ip {NFT_TABLE} forward ip saddr 10.244.0.0/16 accept
                 nft 'add chain ip {NFT_TABLE} {NFT_CHAIN} {{ type nat hook postrouting priority 100; }}'
                 nft add rule ip {NFT_TABLE} {NFT_CHAIN} ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random"
            ));
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            // The netlink socket is the runtime's, and of this thread's namespace.
            let _runtime = runtime.enter();
            let host = Host::connect().unwrap();
            let (removed, unseen) = runtime.block_on(remove(&host)).unwrap();
            assert_eq!(unseen, Vec::<&str>::new());
            assert_eq!(
                removed,
                [
                    Leftover::IptablesJump {
                        backend: "nft",
                        rule: format!(r#"POSTROUTING {c} -j {CHAIN}"#),
                    },
                    Leftover::IptablesChain { backend: "nft" },
                    Leftover::NftChain,
                ]
            );
            let nat = run(Command::new("iptables-nft-save").args(["-t", "nat"])).unwrap();
            assert!(!nat.contains(CHAIN), "{nat}");
            assert!(nat.contains("-A POSTROUTING -s 10.244.1.0/24 -j RETURN"), "{nat}");
            let filter = run(Command::new("iptables-nft-save").args(["-t", "filter"])).unwrap();
            assert!(filter.contains("-j FLANNEL-FWD"), "{filter}");
            let table = nft(&["list", "table", "ip", NFT_TABLE]).unwrap();
            assert!(table.contains("chain forward") && !table.contains(NFT_CHAIN), "{table}");
            assert!(
                runtime.block_on(host.ipip_device(DEVICE)).unwrap().is_none()
                    && super::super::ifindex_by_name(DEVICE).is_some(),
                "not an ipip device: kept"
            );
            // Idempotent, and no legacy table was made by looking.
            let (again, _) = runtime.block_on(remove(&host)).unwrap();
            assert_eq!(again, []);
            let legacy = std::fs::read_to_string("/proc/thread-self/net/ip_tables_names").unwrap_or_default();
            assert!(!legacy.lines().any(|t| t == "nat"), "{legacy}");
        })
        .join()
        .unwrap();
    }
}
