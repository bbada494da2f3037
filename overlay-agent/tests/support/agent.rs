//! The real agent binary as the benchmarks run it: in the caller's network namespace
//! and a mount namespace of its own (its bpffs mount never shows outside), logging
//! JSON lines that the benchmark reads as they come, stopped with SIGTERM on drop.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;

pub(crate) const AGENT: &str = env!("CARGO_BIN_EXE_overlay-agent");
/// Longest wait for one log line: a pass over thousands of nodes takes seconds.
const LINE_TIMEOUT: Duration = Duration::from_secs(180);

/// One JSON log line of the agent, with when it arrived.
pub(crate) struct Line {
    pub at: Instant,
    pub json: Value,
}

impl Line {
    pub(crate) fn message(&self) -> &str {
        self.json["fields"]["message"].as_str().unwrap_or("")
    }

    /// The remote subnets of a "converged" line.
    pub(crate) fn converged(&self) -> Option<u64> {
        (self.message() == "converged")
            .then(|| self.json["fields"]["remote_subnets"].as_u64())
            .flatten()
    }
}

pub(crate) struct Agent {
    child: Child,
    lines: mpsc::Receiver<Line>,
}

impl Agent {
    /// Runs `command` (the agent with `--log-format json` and its arguments).
    /// `OVERLAY_BENCH_LOG=1` echoes its log.
    pub(crate) fn spawn(mut command: Command) -> Self {
        command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: async-signal-safe syscalls only, between fork and exec.
        unsafe {
            command.pre_exec(|| {
                if libc::unshare(libc::CLONE_NEWNS) != 0
                    || libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let echo = std::env::var_os("OVERLAY_BENCH_LOG").is_some();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if echo {
                    eprintln!("agent: {line}");
                }
                let at = Instant::now();
                let json = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if tx.send(Line { at, json }).is_err() {
                    return;
                }
            }
        });
        Self { child, lines }
    }

    /// The first line from now on that `pred` accepts; an ERROR line fails.
    pub(crate) fn wait_for(&mut self, what: &str, pred: impl Fn(&Line) -> bool) -> Line {
        let deadline = Instant::now() + LINE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return line,
                Ok(line) if line.json["level"] == "ERROR" => panic!("agent: {}", line.json),
                Ok(_) => {}
                Err(e) => panic!("waiting for {what}: {e}"),
            }
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// A `Name:   123 kB` field of a /proc file, in KiB.
pub(crate) fn proc_kib(path: &str, name: &str) -> u64 {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {path}"))
}

pub(crate) fn ip(args: &str) {
    let status = Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .unwrap();
    assert!(status.success(), "ip {args}");
}

/// The routes the agent installed (its protocol number) in this namespace.
pub(crate) fn overlay_routes() -> usize {
    let out = Command::new("ip")
        .args(["route", "show", "proto", "191"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().lines().count()
}
