//! The flag table of deploy/README.md ("flanneld compatibility") checked against the
//! built agent, so that it cannot go stale: the table lists flanneld v0.28.9's flags
//! (flannel-io/flannel `main.go`, commit 5cd0d52, with klog's `v`, `vmodule` and
//! `log_backtrace_at`) and says, per flag, what the agent does. A row's status is
//! the start of its agent cell:
//!
//! - `same`, `accepted, no effect`: the agent's command line takes the example
//!   (given with `--help`, so that nothing starts);
//! - `refused`: the agent parses the example and then stops with an error naming
//!   the flag (run in empty network and mount namespaces, as a stray start must not
//!   touch the host);
//! - `not yet`: the agent does not know the flag, so adding it fails this test
//!   until the row is updated.

use std::{
    path::Path,
    process::{Command, Output},
};

use super::manifests::{AGENT, is_root, read};

const README: &str = "deploy/README.md";
const SECTION: &str = "## flanneld compatibility";
const FLAG_TABLE: &str = "### Flags";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Same,
    NoEffect,
    Refused,
    NotYet,
}

impl Status {
    /// The status an agent cell starts with.
    fn of(cell: &str) -> Option<Self> {
        [
            ("same", Self::Same),
            ("accepted, no effect:", Self::NoEffect),
            ("refused:", Self::Refused),
            ("not yet:", Self::NotYet),
        ]
        .into_iter()
        .find_map(|(prefix, status)| cell.starts_with(prefix).then_some(status))
    }
}

#[derive(Debug, PartialEq, Eq)]
struct FlagRow {
    /// The flag with an example value, as the agent is given it: `--iface=eth0`.
    example: String,
    status: Status,
}

impl FlagRow {
    /// `--iface` of `--iface=eth0`.
    fn flag(&self) -> &str {
        self.example.split('=').next().unwrap_or(&self.example)
    }
}

/// The rows of the flag table: the first table after [`FLAG_TABLE`] within
/// [`SECTION`], header and separator skipped.
fn flag_rows(markdown: &str) -> Result<Vec<FlagRow>, String> {
    let mut lines = markdown.lines();
    lines
        .by_ref()
        .find(|l| l.trim() == SECTION)
        .ok_or(format!("no {SECTION:?} heading"))?;
    lines
        .by_ref()
        .take_while(|l| !l.starts_with("## "))
        .find(|l| l.trim() == FLAG_TABLE)
        .ok_or(format!("no {FLAG_TABLE:?} heading in {SECTION:?}"))?;
    let table = lines
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2);
    let rows = table
        .map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            let [flag, _flanneld, agent] = cells[..] else {
                return Err(format!("not 3 cells: {line}"));
            };
            let example = flag
                .strip_prefix('`')
                .and_then(|f| f.strip_suffix('`'))
                .filter(|f| f.starts_with("--"))
                .ok_or(format!("flag cell is not `--flag[=value]`: {line}"))?;
            let status = Status::of(agent).ok_or(format!(
                "agent cell starts with no status (same, accepted, no effect:, refused:, not yet:): {line}"
            ))?;
            Ok(FlagRow {
                example: example.to_owned(),
                status,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if rows.is_empty() {
        return Err(format!("{FLAG_TABLE:?} has no table"));
    }
    Ok(rows)
}

/// Runs `cmd` with only `env` (no FLANNELD_* or RUST_LOG of the caller's).
fn run(cmd: &mut Command, env: &[(&str, &str)]) -> Output {
    cmd.env_clear()
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The start of `text`, for a message (not a whole help text).
fn excerpt(text: &str) -> String {
    text.lines().take(6).collect::<Vec<_>>().join("\n")
}

/// What is wrong with `row` for the agent at `agent`; None when the agent does what
/// the row says. `daemon` allows starting the daemon (the refused rows need it).
fn disagreement(agent: &Path, row: &FlagRow, daemon: bool) -> Option<String> {
    let flag = row.flag();
    match row.status {
        Status::Same | Status::NoEffect => {
            let out = run(
                Command::new(agent).args([row.example.as_str(), "--help"]),
                &[],
            );
            (!out.status.success()).then(|| {
                format!(
                    "{flag}: the table says the agent takes it, the agent says ({}):\n{}",
                    out.status,
                    excerpt(&text(&out))
                )
            })
        }
        Status::NotYet => {
            let out = run(
                Command::new(agent).args([row.example.as_str(), "--help"]),
                &[],
            );
            let all = text(&out);
            let unknown = out.status.code() == Some(2)
                && all.contains("unexpected argument")
                && all.contains(flag);
            (!unknown).then(|| {
                format!(
                    "{flag}: the table says \"not yet\", but the agent knows it ({}):\n{}",
                    out.status,
                    excerpt(&all)
                )
            })
        }
        Status::Refused if daemon => {
            // A node source that does not exist, no listener: should the refusal be
            // gone, the daemon stops on these instead, in namespaces of its own.
            let out = run(
                Command::new("unshare")
                    .args(["--net", "--mount", "--propagation", "private"])
                    .arg(agent)
                    .args([
                        row.example.as_str(),
                        "--nodes-file=/nonexistent/nodes.json",
                        "--http-addr=off",
                        "--bpffs=/nonexistent/bpffs",
                    ]),
                &[("NODE_NAME", "a")],
            );
            let all = text(&out);
            // 1: the agent's own error, after parsing (2 would be clap's usage error).
            let refused = out.status.code() == Some(1) && all.contains(flag);
            (!refused).then(|| {
                format!(
                    "{flag}: the table says \"refused\", the agent ({}) says:\n{}",
                    out.status,
                    excerpt(&all)
                )
            })
        }
        Status::Refused => {
            eprintln!("{flag}: refusal not checked: needs root (namespaces)");
            None
        }
    }
}

#[test]
fn parses_the_flag_table() {
    let doc = format!(
        "# x\n{SECTION}\n\ntext\n\n{FLAG_TABLE}\n\n| flag | flanneld | agent |\n|---|---|---|\n\
         | `--a=1` | A | same |\n| `--b` | B | not yet: later |\n\n| `--c` | C | same |\n"
    );
    assert_eq!(
        flag_rows(&doc).unwrap(),
        [
            FlagRow {
                example: "--a=1".into(),
                status: Status::Same
            },
            FlagRow {
                example: "--b".into(),
                status: Status::NotYet
            },
        ]
    );
    assert_eq!(flag_rows(&doc).unwrap()[0].flag(), "--a");
    let bad = doc.replace("not yet: later", "maybe");
    assert!(flag_rows(&bad).unwrap_err().contains("no status"));
    let bad = doc.replace("`--a=1`", "a");
    assert!(flag_rows(&bad).unwrap_err().contains("flag cell"));
    let bad = doc.replace(SECTION, "## other");
    assert!(flag_rows(&bad).unwrap_err().contains("heading"));
    // The flag table must be in the section, not after it.
    let bad = doc.replace(FLAG_TABLE, &format!("## next\n{FLAG_TABLE}"));
    assert!(flag_rows(&bad).unwrap_err().contains("heading"));
}

#[test]
fn the_flag_table_matches_the_agents_command_line() {
    let rows = flag_rows(&read(README)).unwrap_or_else(|e| panic!("{README}: {e}"));
    let agent = Path::new(AGENT);
    let daemon = is_root();
    let wrong: Vec<String> = rows
        .iter()
        .filter_map(|row| disagreement(agent, row, daemon))
        .collect();
    assert!(
        wrong.is_empty(),
        "{README} disagrees with the agent:\n{}",
        wrong.join("\n")
    );
}
