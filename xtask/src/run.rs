//! `cargo xtask run`: build overlay-agent and run it on this machine, as root. Meant for
//! a node run by hand (a kind node, say) instead of through the DaemonSet: everything
//! after `--` goes to the agent unchanged, e.g.
//!
//!     cargo xtask run -- run --kube-subnet-mgr --ip-masq
//!     cargo xtask run -- counters
//!
//! The agent replaces this process (exec), so that it gets the terminal's signals
//! itself (SIGINT runs its cleanup) and its exit status is the command's.

use std::{
    ffi::OsString,
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::deps;

#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// Build and run the release profile.
    #[arg(long)]
    release: bool,
    /// overlay-agent's arguments, after `--`.
    #[arg(last = true)]
    agent_args: Vec<OsString>,
}

/// Variables the agent reads, which sudo would reset: its node's name, the log filter,
/// and where the API server is (a kubeconfig, or the in-cluster service address).
const AGENT_ENV: &[&str] = &[
    "NODE_NAME",
    "RUST_LOG",
    "NO_COLOR",
    "KUBECONFIG",
    "KUBERNETES_SERVICE_HOST",
    "KUBERNETES_SERVICE_PORT",
];

pub(crate) fn run(args: RunArgs) -> Result<()> {
    deps::ensure()?;
    let agent = build(args.release)?;
    let env: Vec<(&str, OsString)> = AGENT_ENV
        .iter()
        .filter_map(|&name| Some((name, std::env::var_os(name)?)))
        .collect();
    let mut cmd = command(&agent, &args.agent_args, &env)?;
    // Only returns when the exec failed.
    Err(cmd.exec()).with_context(|| format!("running {cmd:?}"))
}

/// Builds overlay-agent (its build script builds and embeds the eBPF object) and
/// returns the executable, as cargo reports it: the right path whatever the target
/// directory or profile.
pub(crate) fn build(release: bool) -> Result<PathBuf> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace()?).args([
        "build",
        "--package",
        "overlay-agent",
        "--bin",
        "overlay-agent",
        // Messages as JSON on stdout; the diagnostics rendered on stderr as usual.
        "--message-format=json-render-diagnostics",
    ]);
    if release {
        cmd.arg("--release");
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo build")?;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    let mut executable = None;
    for line in BufReader::new(stdout).lines() {
        if let Some(path) = artifact_executable(&line?, "overlay-agent") {
            executable = Some(path);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("building overlay-agent failed ({status})");
    }
    executable.context("cargo build reported no overlay-agent executable")
}

fn workspace() -> Result<&'static Path> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")
}

/// The executable of binary target `name`, if `line` is cargo's message about it.
fn artifact_executable(line: &str, name: &str) -> Option<PathBuf> {
    let msg: serde_json::Value = serde_json::from_str(line).ok()?;
    if msg["reason"] != "compiler-artifact" || msg["target"]["name"] != name {
        return None;
    }
    msg["executable"].as_str().map(PathBuf::from)
}

/// `env NAME=VALUE... AGENT ARGS...`, as root: directly when we are root, else
/// through sudo (`deps::privileged`). `env` carries `vars` across sudo, which starts
/// the program with a reset environment.
fn command(agent: &Path, args: &[OsString], vars: &[(&str, OsString)]) -> Result<Command> {
    let mut cmd = deps::privileged("env")?;
    for (name, value) in vars {
        let mut assignment = OsString::from(format!("{name}="));
        assignment.push(value);
        cmd.arg(assignment);
    }
    cmd.arg(agent).args(args);
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use std::{
        ffi::OsStr,
        os::unix::{ffi::OsStrExt as _, fs::PermissionsExt as _, process::CommandExt as _},
    };

    use super::*;

    /// Arguments that a careless pass-through would mangle: spaces, an empty one, one
    /// that looks like an option of `env`, one that looks like an assignment, and
    /// bytes that are not UTF-8.
    fn awkward_args() -> Vec<OsString> {
        vec![
            "run".into(),
            "--kube-subnet-mgr".into(),
            "--iface".into(),
            "eth0 with spaces".into(),
            "".into(),
            "-i".into(),
            "A=B".into(),
            OsStr::from_bytes(b"\xff\xfe").to_owned(),
        ]
    }

    fn executable(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        executable(&path, 0o755);
        path
    }

    #[test]
    fn finds_the_executable_in_cargo_messages() {
        let bin = r#"{"reason":"compiler-artifact","target":{"name":"overlay-agent","kind":["bin"]},"executable":"/t/debug/overlay-agent"}"#;
        let lib = r#"{"reason":"compiler-artifact","target":{"name":"overlay-agent","kind":["lib"]},"executable":null}"#;
        let other = r#"{"reason":"compiler-artifact","target":{"name":"xtask"},"executable":"/t/debug/xtask"}"#;
        assert_eq!(
            artifact_executable(bin, "overlay-agent"),
            Some(PathBuf::from("/t/debug/overlay-agent"))
        );
        assert_eq!(artifact_executable(lib, "overlay-agent"), None);
        assert_eq!(artifact_executable(other, "overlay-agent"), None);
        assert_eq!(artifact_executable("not json", "overlay-agent"), None);
    }

    /// What the agent receives, end to end, when we are root (the command runs as is):
    /// a stand-in agent writes out its arguments and environment.
    #[test]
    fn as_root_arguments_and_environment_reach_the_agent_unchanged() {
        if !deps::is_root() {
            eprintln!("not root: the sudo path is privilege_decision_when_not_root's");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let agent = script(
            dir.path(),
            "overlay-agent",
            &format!(
                r#"for a in "$@"; do printf '%s\0' "$a"; done > {0}; printf '%s' "$NODE_NAME" > {0}.env"#,
                out.display()
            ),
        );
        let vars = [("NODE_NAME", OsString::from("kind-worker 2"))];
        let mut cmd = command(&agent, &awkward_args(), &vars).unwrap();
        // Root runs it directly: no sudo in front.
        assert_eq!(cmd.get_program(), "env");
        assert!(cmd.status().unwrap().success());
        let written = std::fs::read(&out).unwrap();
        let mut received: Vec<&[u8]> = written.split(|&b| b == 0).collect();
        // Every argument ends in a NUL: the split leaves an empty tail.
        assert_eq!(received.pop(), Some(&b""[..]));
        let sent = awkward_args();
        let sent: Vec<&[u8]> = sent.iter().map(|a| a.as_bytes()).collect();
        assert_eq!(received, sent);
        let env = std::fs::read(out.with_extension("env")).unwrap();
        assert_eq!(env, b"kind-worker 2");
    }

    /// The decision `command` leaves to `deps::privileged`, for a user who is not
    /// root: through sudo when there is one, else a clear error. This test binary runs
    /// its probe below again as that user (nobody, when we are root), with a PATH
    /// that holds a sudo or does not.
    #[test]
    fn privilege_decision_when_not_root() {
        let dir = tempfile::tempdir().unwrap();
        executable(dir.path(), 0o755);
        // A copy the unprivileged user can run, wherever the target directory is.
        let probe = dir.path().join("probe");
        std::fs::copy(std::env::current_exe().unwrap(), &probe).unwrap();
        executable(&probe, 0o755);
        let path_with = |sudo: bool| {
            let bin = dir
                .path()
                .join(if sudo { "with-sudo" } else { "without-sudo" });
            std::fs::create_dir(&bin).unwrap();
            executable(&bin, 0o755);
            // `deps::which` asks the shell.
            std::os::unix::fs::symlink("/bin/sh", bin.join("sh")).unwrap();
            if sudo {
                script(&bin, "sudo", "exit 0");
            }
            bin
        };
        let run_probe = |bin: &Path| {
            let mut cmd = Command::new(&probe);
            cmd.args([
                "--exact",
                "run::tests::privilege_probe",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env_clear()
            .env("PATH", bin);
            if deps::is_root() {
                cmd.uid(65534).gid(65534);
            }
            let out = cmd.output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            stdout
                .lines()
                .find_map(|l| Some(l.split_once("PROBE ")?.1.to_owned()))
                .unwrap_or_else(|| panic!("no probe result in: {stdout}"))
        };
        assert_eq!(
            run_probe(&path_with(true)),
            r#""sudo" ["env", "NODE_NAME=w1", "/opt/overlay-agent", "counters", "--all"]"#
        );
        assert_eq!(
            run_probe(&path_with(false)),
            "error: env needs root, and there is no sudo: run this command as root"
        );
    }

    #[test]
    #[ignore = "a probe that privilege_decision_when_not_root runs as another user"]
    fn privilege_probe() {
        let args = ["counters".into(), "--all".into()];
        let vars = [("NODE_NAME", OsString::from("w1"))];
        match command(Path::new("/opt/overlay-agent"), &args, &vars) {
            Ok(cmd) => println!(
                "PROBE {:?} {:?}",
                cmd.get_program(),
                cmd.get_args().collect::<Vec<_>>()
            ),
            Err(e) => println!("PROBE error: {e:#}"),
        }
    }
}
