//! Ctrl-C (and SIGTERM/SIGHUP) handling, and waiting on conditions.
//!
//! The signal handler only raises a flag. Every step of the lab is short and checks the
//! flag, so an interrupted run unwinds through the normal error path and the lab guard
//! removes what was created. Tearing down from the handler itself would race with the
//! main thread, which may be creating namespaces at that very moment.

use std::{
    fmt,
    sync::{
        Once,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(50);

/// The error of an interrupted run (exit status 130, as a shell reports Ctrl-C).
#[derive(Debug)]
pub(crate) struct Interrupted;

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Installs the handler (once per process: the integration test runs several labs).
pub(crate) fn install() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = ctrlc::set_handler(|| {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                eprintln!("\ninterrupted again: still cleaning up, please wait");
            } else {
                eprintln!("\ninterrupted: cleaning up");
            }
        });
    });
    Ok(result?)
}

/// Names a factor for every timeout of the lab: the kernel matrix's VM emulates its
/// CPUs (no KVM), and everything there takes several times as long.
pub(crate) const SLOWDOWN: &str = "OVERLAY_LAB_SLOWDOWN";

/// The [`SLOWDOWN`] factor (1 when unset).
pub(crate) fn slowdown() -> u32 {
    std::env::var(SLOWDOWN)
        .ok()
        .and_then(|f| f.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1)
}

/// `timeout` times the [`SLOWDOWN`] factor.
pub(crate) fn scaled(timeout: Duration) -> Duration {
    timeout * slowdown()
}

/// Fails with [`Interrupted`] once Ctrl-C was pressed.
pub(crate) fn check() -> Result<()> {
    if requested() {
        return Err(Interrupted.into());
    }
    Ok(())
}

/// The state of a condition being waited for.
pub(crate) enum Wait<T> {
    Done(T),
    /// Not yet, and what is still missing (reported if the wait times out).
    Pending(String),
}

/// Whether Ctrl-C was pressed: then any failure is a consequence (a child process
/// killed by the same SIGINT) and the run counts as interrupted.
pub(crate) fn requested() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Polls `condition` until it is done, fails, `timeout` passes, or Ctrl-C.
pub(crate) fn wait_until<T>(
    what: &str,
    timeout: Duration,
    condition: impl FnMut() -> Result<Wait<T>>,
) -> Result<T> {
    poll(what, timeout, check, condition)
}

/// Like [`wait_until`], but carries on after Ctrl-C: for short waits that clean up.
pub(crate) fn wait_briefly<T>(
    what: &str,
    timeout: Duration,
    condition: impl FnMut() -> Result<Wait<T>>,
) -> Result<T> {
    poll(what, timeout, || Ok(()), condition)
}

fn poll<T>(
    what: &str,
    timeout: Duration,
    stop: impl Fn() -> Result<()>,
    mut condition: impl FnMut() -> Result<Wait<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        stop()?;
        match condition()? {
            Wait::Done(value) => return Ok(value),
            Wait::Pending(missing) if Instant::now() >= deadline => {
                bail!("timed out after {timeout:?} waiting for {what}: {missing}")
            }
            Wait::Pending(_) => thread::sleep(POLL),
        }
    }
}
