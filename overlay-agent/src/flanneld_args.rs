//! flanneld's command line and environment, turned into ours.
//!
//! A DaemonSet written for flanneld (flannel's `kube-flannel.yml`) runs
//! `/opt/bin/flanneld --ip-masq --kube-subnet-mgr` and sets some flags through
//! `FLANNELD_*` variables. [`translate`] rewrites such an invocation into the
//! clap command line of the agent, so that the manifest runs unchanged:
//!
//! - No subcommand means the daemon: `run` is put in front, as flanneld has no
//!   subcommands (the inspection commands stay subcommands).
//! - Go's `flag` package syntax: `-flag` is `--flag`; a value follows as
//!   `-flag=value` or as the next argument (`-flag value`), whatever it looks like
//!   (`-v -1` gives `-1` to `-v`); a boolean flag takes no next argument, only
//!   `-flag=BOOL` with the values of Go's `strconv.ParseBool`, and the last
//!   occurrence of a flag wins.
//! - coreos/pkg `flagutil.SetFlagsFromEnv(fs, "FLANNELD")`: every flag the command
//!   line does not set is read from `FLANNELD_<FLAG>` (upper-cased, `-` and `.` to
//!   `_`) when that is not empty; booleans again with ParseBool's values. It applies
//!   to every flag of the daemon, flanneld's and the agent's own, as flanneld applies
//!   it to its whole flag set. A list flag (`--iface`) takes the variable as one
//!   value, as Go's `Set` appends one.
//!
//! Where flanneld is lax this is strict: a bad value in the environment is an error
//! (flanneld logs it and runs on with the flag at Go's zero value, false or 0), and
//! arguments that are not flags are
//! refused by clap (Go stops parsing at the first one and ignores the rest, so that
//! `--ip-masq false --kube-subnet-mgr` silently drops `--kube-subnet-mgr`).
//! `FLANNELD_*` variables that name no flag of ours are returned, to be logged as
//! ignored, since flanneld would have acted on them.
//!
//! Read (nothing copied): flannel-io/flannel v0.28.9 (commit 5cd0d52) `main.go`
//! (flag set, `flagutil.SetFlagsFromEnv(flannelFlags, "FLANNELD")`, klog's `v`);
//! coreos/pkg `flagutil/env.go` (commit c61a0e3); Go's `flag` package documentation
//! (command-line flag syntax) and `strconv.ParseBool`.

use std::ffi::OsString;

use anyhow::{Result, bail};
use clap::{Arg, ArgAction, Command};

/// The prefix of flanneld's environment variables.
pub const ENV_PREFIX: &str = "FLANNELD_";
/// The subcommand an invocation without one runs.
pub const DAEMON: &str = "run";

/// A command line ready for clap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translated {
    pub args: Vec<OsString>,
    /// `(variable, flag)` of every flag taken from the environment, to name the
    /// variable when clap refuses its value.
    pub from_env: Vec<(String, String)>,
    /// `FLANNELD_*` variables (non-empty) that name no flag of the daemon: ignored.
    pub ignored_env: Vec<String>,
}

/// Go's `strconv.ParseBool`.
pub fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// A clap value parser for booleans written as Go's `strconv.ParseBool` takes them: for
/// a flag that is on by default (`--flag=false` turns it off), declared with
/// [`ArgAction::Set`], `num_args = 0..=1`, `require_equals = true` and
/// `default_missing_value = "true"`.
pub fn go_bool(s: &str) -> Result<bool, String> {
    parse_go_bool(s).ok_or_else(|| {
        format!("{s:?} is not a boolean (1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False)")
    })
}

/// The variable flanneld reads a flag from.
pub fn env_name(flag: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        flag.replace(['-', '.'], "_").to_uppercase()
    )
}

/// Rewrites `argv` (program name first) for `cli`, taking flags of the daemon that
/// the command line leaves unset from `env` (a variable's value, None when unset);
/// `env_names` lists the `FLANNELD_*` variables present, to report the unknown ones.
pub fn translate(
    cli: &Command,
    argv: impl IntoIterator<Item = OsString>,
    env: impl Fn(&str) -> Option<String>,
    env_names: impl IntoIterator<Item = String>,
) -> Result<Translated> {
    let mut cli = cli.clone();
    cli.build();
    let mut argv = argv.into_iter();
    let mut out: Vec<OsString> = argv.next().into_iter().collect();
    let rest: Vec<OsString> = argv.collect();

    // The top level's own flags (--log-format, --help, --version) may come before a
    // subcommand; anything else starts the daemon's arguments.
    let mut i = 0;
    let mut top = Flags::default();
    while i < rest.len() {
        match Token::of(&cli, &rest[i]) {
            Token::Flag { arg, value } => {
                i += 1 + top.take(arg, value, rest.get(i + 1), &mut out)?;
            }
            _ => break,
        }
    }
    let asked_top = top.bools.iter().any(|(_, v, _)| *v) || top.other;
    let sub = match rest.get(i).and_then(|a| a.to_str()) {
        Some(name) if cli.find_subcommand(name).is_some() => {
            i += 1;
            name.to_owned()
        }
        // `overlay-agent --help` stays the top level's help.
        None if asked_top => {
            top.finish(&mut out);
            return Ok(Translated {
                args: out,
                from_env: Vec::new(),
                ignored_env: Vec::new(),
            });
        }
        _ => DAEMON.to_owned(),
    };
    top.finish(&mut out);
    out.push(sub.clone().into());
    let command = cli
        .find_subcommand(&sub)
        .expect("a subcommand of cli")
        .clone();

    let mut flags = Flags::default();
    while i < rest.len() {
        match Token::of(&command, &rest[i]) {
            Token::Flag { arg, value } => {
                i += 1 + flags.take(arg, value, rest.get(i + 1), &mut out)?;
            }
            Token::End => {
                out.extend(rest[i..].iter().cloned());
                break;
            }
            Token::Other(token) => {
                out.push(token);
                i += 1;
            }
        }
    }

    let mut from_env = Vec::new();
    let mut ignored_env = Vec::new();
    if sub == DAEMON {
        let mut known = Vec::new();
        for arg in command.get_arguments().filter(|a| from_environment(a)) {
            let names = long_names(arg);
            known.extend(names.iter().map(|n| env_name(n)));
            if flags.seen.iter().any(|s| s == arg.get_id().as_str()) {
                continue;
            }
            let Some((var, value)) = names
                .iter()
                .map(|n| env_name(n))
                .find_map(|var| env(&var).filter(|v| !v.is_empty()).map(|v| (var, v)))
            else {
                continue;
            };
            let long = names[0];
            if is_bool(arg) {
                let Some(on) = parse_go_bool(&value) else {
                    bail!(
                        "invalid value {value:?} for {var}: a boolean is one of 1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False"
                    );
                };
                flags.bools.push((long.to_owned(), on, on_by_default(arg)));
            } else {
                let mut flag = OsString::from(format!("--{long}="));
                flag.push(&value);
                insert_before_end(&mut out, flag);
            }
            from_env.push((var, format!("--{long}")));
        }
        ignored_env = env_names
            .into_iter()
            .filter(|n| n.starts_with(ENV_PREFIX) && !known.contains(n))
            .filter(|n| env(n).is_some_and(|v| !v.is_empty()))
            .collect();
        ignored_env.sort();
    }
    let mut bools = Vec::new();
    flags.finish(&mut bools);
    for flag in bools {
        insert_before_end(&mut out, flag);
    }
    Ok(Translated {
        args: out,
        from_env,
        ignored_env,
    })
}

/// Whether a flag of the daemon can come from `FLANNELD_*`: all but the global
/// ones (`--log-format`), help and version.
fn from_environment(arg: &Arg) -> bool {
    !arg.is_global_set()
        && arg.get_long().is_some()
        && !matches!(arg.get_action(), ArgAction::Help | ArgAction::Version)
}

fn long_names(arg: &Arg) -> Vec<&str> {
    arg.get_long()
        .into_iter()
        .chain(arg.get_all_aliases().unwrap_or_default())
        .collect()
}

fn is_bool(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::SetTrue) || on_by_default(arg)
}

/// A boolean flag that is on unless `--flag=false` (see [`go_bool`]).
fn on_by_default(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::Set)
        && arg.get_num_args().is_some_and(|n| n.min_values() == 0)
        && arg.get_default_values().iter().any(|v| v == "true")
}

/// Adds `flag` before a `--` terminator, if there is one.
fn insert_before_end(out: &mut Vec<OsString>, flag: OsString) {
    match out.iter().position(|a| a == "--") {
        Some(at) => out.insert(at, flag),
        None => out.push(flag),
    }
}

enum Token<'a> {
    /// A long flag of the command, with or without `=value`.
    Flag { arg: &'a Arg, value: Option<String> },
    /// `--`: the rest is not flags.
    End,
    /// Anything else, as clap is to read it: a positional argument, an unknown flag
    /// (clap says what is wrong with it).
    Other(OsString),
}

impl<'a> Token<'a> {
    fn of(command: &'a Command, token: &OsString) -> Self {
        let Some(s) = token.to_str() else {
            return Token::Other(token.clone());
        };
        if s == "--" {
            return Token::End;
        }
        let single = !s.starts_with("--");
        let Some(body) = s.strip_prefix("--").or_else(|| s.strip_prefix('-')) else {
            return Token::Other(token.clone());
        };
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (body, None),
        };
        if name.is_empty() || name.starts_with('-') {
            return Token::Other(token.clone());
        }
        // `-h`, `-V`: written long, as every flag handled here has a long name.
        let short = |a: &Arg| single && a.get_long().is_some() && name.chars().eq(a.get_short());
        if let Some(arg) = command
            .get_arguments()
            .find(|a| long_names(a).contains(&name) || short(a))
        {
            return Token::Flag { arg, value };
        }
        // An unknown Go flag: as a long one, so that clap names it whole rather than
        // as a cluster of short flags.
        if single && name.chars().count() > 1 {
            return Token::Other(format!("-{s}").into());
        }
        Token::Other(token.clone())
    }
}

/// The flags of one command as they are read.
#[derive(Default)]
struct Flags {
    /// Ids of the flags the command line set.
    seen: Vec<String>,
    /// Boolean flags by long name, in order (the last one counts): the value given,
    /// and the flag's default.
    bools: Vec<(String, bool, bool)>,
    /// A flag that is neither a boolean nor takes a value (help, version).
    other: bool,
}

impl Flags {
    /// Takes one flag, writes its clap form to `out` (booleans wait for
    /// [`Flags::finish`]) and returns how many following arguments it consumed.
    fn take(
        &mut self,
        arg: &Arg,
        value: Option<String>,
        next: Option<&OsString>,
        out: &mut Vec<OsString>,
    ) -> Result<usize> {
        let long = arg.get_long().expect("found by a long name");
        self.seen.push(arg.get_id().to_string());
        if is_bool(arg) {
            let on = match value {
                None => true,
                Some(v) => match parse_go_bool(&v) {
                    Some(on) => on,
                    None => bail!("invalid boolean value {v:?} for -{long}: parse error"),
                },
            };
            self.bools.push((long.to_owned(), on, on_by_default(arg)));
            return Ok(0);
        }
        if !arg.get_action().takes_values() {
            self.other = true;
            out.push(format!("--{long}").into());
            return Ok(0);
        }
        // Joined with `=`, so that clap takes a value that starts with `-` as one.
        let mut flag = OsString::from(format!("--{long}"));
        let consumed = match (value, next) {
            (Some(v), _) => {
                flag.push(format!("={v}"));
                0
            }
            (None, Some(next)) => {
                flag.push("=");
                flag.push(next);
                1
            }
            // clap says that the value is missing.
            (None, None) => 0,
        };
        out.push(flag);
        Ok(consumed)
    }

    /// The boolean flags whose last word was true, as clap flags.
    fn finish(self, out: &mut Vec<OsString>) {
        let mut last: Vec<(String, bool, bool)> = Vec::new();
        for (name, on, default) in self.bools {
            last.retain(|(n, _, _)| *n != name);
            last.push((name, on, default));
        }
        out.extend(
            last.into_iter()
                .filter(|(_, on, default)| on != default)
                .map(|(name, on, _)| match on {
                    true => OsString::from(format!("--{name}")),
                    false => OsString::from(format!("--{name}=false")),
                }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Parser, Subcommand};

    /// A command shaped like the agent's: a top-level global flag, the daemon and an
    /// inspection subcommand.
    #[derive(Parser)]
    #[command(version)]
    struct Cli {
        #[command(subcommand)]
        command: Sub,
        #[arg(long, global = true, default_value = "text")]
        log_format: String,
    }

    #[derive(Subcommand)]
    enum Sub {
        Run {
            #[arg(long)]
            ip_masq: bool,
            #[arg(long)]
            kube_subnet_mgr: bool,
            #[arg(long, alias = "net-config-path")]
            net_conf: Option<String>,
            #[arg(long)]
            iface: Vec<String>,
            #[arg(long)]
            v: Option<i32>,
            #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1,
                  require_equals = true, default_missing_value = "true", value_parser = go_bool)]
            set_node_network_unavailable: bool,
        },
        Counters {
            #[arg(long)]
            json: bool,
        },
    }

    fn run(argv: &[&str], env: &[(&str, &str)]) -> Result<Translated> {
        use clap::CommandFactory as _;
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        translate(
            &Cli::command(),
            std::iter::once("overlay-agent")
                .chain(argv.iter().copied())
                .map(OsString::from),
            |k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()),
            env.iter().map(|(k, _)| k.clone()),
        )
    }

    fn args(argv: &[&str], env: &[(&str, &str)]) -> Vec<String> {
        run(argv, env)
            .unwrap()
            .args
            .into_iter()
            .skip(1)
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn no_subcommand_is_the_daemon() {
        assert_eq!(
            args(&["--ip-masq", "--kube-subnet-mgr"], &[]),
            ["run", "--ip-masq", "--kube-subnet-mgr"]
        );
        assert_eq!(args(&["run", "--ip-masq"], &[]), ["run", "--ip-masq"]);
        assert_eq!(args(&[], &[]), ["run"]);
        assert_eq!(args(&["counters", "-json"], &[]), ["counters", "--json"]);
        assert_eq!(
            args(&["--log-format", "json", "counters"], &[]),
            ["--log-format=json", "counters"]
        );
        assert_eq!(
            args(&["-log-format=json", "-ip-masq"], &[]),
            ["--log-format=json", "run", "--ip-masq"]
        );
        // Help and version stay the top level's.
        assert_eq!(args(&["-help"], &[]), ["--help"]);
        assert_eq!(args(&["--version"], &[]), ["--version"]);
        assert_eq!(args(&["-h"], &[]), ["--help"]);
        assert_eq!(args(&["run", "-h"], &[]), ["run", "--help"]);
    }

    #[test]
    fn go_flag_syntax() {
        assert_eq!(args(&["-ip-masq"], &[]), ["run", "--ip-masq"]);
        assert_eq!(
            args(&["-ip-masq=true", "--kube-subnet-mgr=1"], &[]),
            ["run", "--ip-masq", "--kube-subnet-mgr"]
        );
        assert_eq!(args(&["--ip-masq=false"], &[]), ["run"]);
        assert_eq!(args(&["-ip-masq", "-ip-masq=F"], &[]), ["run"]);
        assert_eq!(
            args(&["-ip-masq=0", "--ip-masq=T"], &[]),
            ["run", "--ip-masq"]
        );
        assert_eq!(
            args(&["-net-config-path", "/n.json", "-iface=eth0"], &[]),
            ["run", "--net-conf=/n.json", "--iface=eth0"]
        );
        // What follows a flag that takes a value is its value, dash or not.
        assert_eq!(args(&["-v", "-1"], &[]), ["run", "--v=-1"]);
        assert_eq!(args(&["-v=2"], &[]), ["run", "--v=2"]);
        assert_eq!(args(&["--v", "2"], &[]), ["run", "--v=2"]);
        assert_eq!(
            args(&["--iface", "-ip-masq"], &[]),
            ["run", "--iface=-ip-masq"]
        );
        // A boolean takes no next argument: clap refuses the stray one.
        assert_eq!(
            args(&["--ip-masq", "false"], &[]),
            ["run", "false", "--ip-masq"]
        );
        // Unknown flags and `--` are left for clap.
        assert_eq!(
            args(&["-nope=1", "-x", "--", "-ip-masq"], &[]),
            ["run", "--nope=1", "-x", "--", "-ip-masq"]
        );
        assert_eq!(args(&["-v"], &[]), ["run", "--v"]);
        let e = format!("{:#}", run(&["-ip-masq=yes"], &[]).unwrap_err());
        assert!(e.contains("\"yes\"") && e.contains("-ip-masq"), "{e}");
    }

    #[test]
    fn environment_fills_what_the_command_line_leaves_unset() {
        let t = run(
            &["--kube-subnet-mgr"],
            &[
                ("FLANNELD_IP_MASQ", "True"),
                ("FLANNELD_NET_CONFIG_PATH", "/etc/n.json"),
                ("FLANNELD_IFACE", "eth0,eth1"),
                ("FLANNELD_V", "3"),
            ],
        )
        .unwrap();
        assert_eq!(
            t.args
                .iter()
                .skip(1)
                .map(|a| a.to_str().unwrap())
                .collect::<Vec<_>>(),
            [
                "run",
                "--net-conf=/etc/n.json",
                "--iface=eth0,eth1",
                "--v=3",
                "--kube-subnet-mgr",
                "--ip-masq"
            ]
        );
        assert_eq!(
            t.from_env,
            [
                ("FLANNELD_IP_MASQ".to_owned(), "--ip-masq".to_owned()),
                ("FLANNELD_NET_CONFIG_PATH".into(), "--net-conf".into()),
                ("FLANNELD_IFACE".into(), "--iface".into()),
                ("FLANNELD_V".into(), "--v".into()),
            ]
        );
        assert!(t.ignored_env.is_empty());
    }

    #[test]
    fn command_line_wins_over_the_environment() {
        let env = [
            ("FLANNELD_IP_MASQ", "true"),
            ("FLANNELD_NET_CONF", "/env.json"),
            ("FLANNELD_IFACE", "eth9"),
        ];
        assert_eq!(
            args(
                &[
                    "-ip-masq=false",
                    "--net-config-path=/cli.json",
                    "--iface",
                    "eth0"
                ],
                &env
            ),
            ["run", "--net-conf=/cli.json", "--iface=eth0"]
        );
        // Empty variables are unset, as in flagutil.
        assert_eq!(args(&[], &[("FLANNELD_IP_MASQ", "")]), ["run"]);
        assert_eq!(args(&[], &[("FLANNELD_KUBE_SUBNET_MGR", "0")]), ["run"]);
        // The inspection commands do not read the daemon's environment.
        assert_eq!(args(&["counters"], &env), ["counters"]);
        // Before a `--`, so that clap reads them as flags.
        assert_eq!(
            args(&["--", "x"], &[("FLANNELD_V", "2")]),
            ["run", "--v=2", "--", "x"]
        );
    }

    #[test]
    fn environment_errors_and_unknown_variables() {
        let e = format!(
            "{:#}",
            run(&[], &[("FLANNELD_IP_MASQ", "yes")]).unwrap_err()
        );
        assert!(
            e.contains("FLANNELD_IP_MASQ") && e.contains("\"yes\""),
            "{e}"
        );
        let t = run(
            &[],
            &[
                ("FLANNELD_IPTABLES_RESYNC", "5"),
                ("FLANNELD_EMPTY", ""),
                ("FLANNELD_LOG_FORMAT", "json"),
                ("NODE_NAME", "w1"),
            ],
        )
        .unwrap();
        // --log-format is the top level's, not flanneld's.
        assert_eq!(
            t.ignored_env,
            ["FLANNELD_IPTABLES_RESYNC", "FLANNELD_LOG_FORMAT"]
        );
        assert_eq!(t.args.len(), 2);
    }

    #[test]
    fn booleans_on_by_default_are_turned_off_with_false() {
        const FLAG: &str = "-set-node-network-unavailable";
        assert_eq!(args(&[], &[]), ["run"]);
        assert_eq!(args(&[FLAG], &[]), ["run"]);
        assert_eq!(args(&[&format!("{FLAG}=true")], &[]), ["run"]);
        let off = "--set-node-network-unavailable=false";
        assert_eq!(args(&[&format!("{FLAG}=f")], &[]), ["run", off]);
        assert_eq!(
            args(&[&format!("{FLAG}=0"), "-ip-masq"], &[]),
            ["run", off, "--ip-masq"]
        );
        // The last word counts; the environment fills in when the command line is silent.
        assert_eq!(args(&[&format!("{FLAG}=false"), FLAG], &[]), ["run"]);
        let var = ("FLANNELD_SET_NODE_NETWORK_UNAVAILABLE", "False");
        assert_eq!(args(&[], &[var]), ["run", off]);
        assert_eq!(args(&[FLAG], &[var]), ["run"]);
        // It takes no next argument, as any boolean.
        assert_eq!(args(&[FLAG, "-ip-masq"], &[]), ["run", "--ip-masq"]);
        // What clap then makes of it.
        let parse = |argv: &[&str]| {
            let Sub::Run {
                set_node_network_unavailable,
                ..
            } = Cli::try_parse_from(run(argv, &[]).unwrap().args)
                .unwrap()
                .command
            else {
                unreachable!("the daemon")
            };
            set_node_network_unavailable
        };
        assert!(parse(&[]));
        assert!(!parse(&[&format!("{FLAG}=F")]));
        assert!(go_bool("yes").unwrap_err().contains("not a boolean"));
    }

    #[test]
    fn go_bools_and_variable_names() {
        for t in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_go_bool(t), Some(true), "{t}");
        }
        for f in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_go_bool(f), Some(false), "{f}");
        }
        for bad in ["", "yes", "tRUE", "2", " true"] {
            assert_eq!(parse_go_bool(bad), None, "{bad}");
        }
        assert_eq!(
            env_name("subnet-lease-renew-margin"),
            "FLANNELD_SUBNET_LEASE_RENEW_MARGIN"
        );
        assert_eq!(env_name("v"), "FLANNELD_V");
        assert_eq!(env_name("log_backtrace_at"), "FLANNELD_LOG_BACKTRACE_AT");
    }
}
