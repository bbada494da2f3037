//! The lab's processes (its agents, its etcd), found by their command line and stopped
//! through pidfds, so that a signal never hits a process that took over a pid meanwhile.

use std::{
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::{
        signal::Signal,
        wait::{WaitPidFlag, waitpid},
    },
    unistd::Pid,
};

use super::interrupt;

/// How long a process gets to exit after a signal: an agent detaches and removes its
/// routes after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Every process, with its command line (`/proc/<pid>/cmdline`); those gone meanwhile
/// (or zombies, whose command line is empty) left out.
pub(crate) fn processes() -> Result<Vec<(u32, Vec<u8>)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").context("listing /proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            found.push((pid, cmdline));
        }
    }
    Ok(found)
}

/// Sends `signal` to the processes (pid, what it is) that `still_ours` still
/// recognizes, waits for each to exit, and kills any that does not in time.
pub(crate) fn stop_processes(
    processes: &[(u32, String)],
    still_ours: impl Fn(u32) -> bool,
    signal: Signal,
) -> Result<()> {
    let mut stopping = Vec::new();
    for (pid, what) in processes {
        // A pidfd pins the process: checked once more through it, a signal cannot hit
        // a process that took over the pid meanwhile.
        let Ok(pidfd) = pidfd_open(*pid) else {
            continue;
        };
        if !still_ours(*pid) {
            continue;
        }
        pidfd_signal(&pidfd, signal)?;
        stopping.push((pid, what, pidfd));
    }
    let deadline = Instant::now() + interrupt::scaled(STOP_TIMEOUT);
    let mut errors = Vec::new();
    for (pid, what, pidfd) in &stopping {
        if !wait_exit(pidfd, deadline.saturating_duration_since(Instant::now()))? {
            errors.push(format!(
                "{what} (pid {pid}) ignored {signal} for {:?}: killed",
                interrupt::scaled(STOP_TIMEOUT)
            ));
            pidfd_signal(pidfd, Signal::SIGKILL)?;
            wait_exit(pidfd, interrupt::scaled(STOP_TIMEOUT))?;
        }
        // Reap it if it is our child; ECHILD otherwise, which is fine.
        let _ = waitpid(Pid::from_raw(**pid as i32), Some(WaitPidFlag::WNOHANG));
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(())
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just returned to us and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_signal(pidfd: &OwnedFd, signal: Signal) -> Result<()> {
    // SAFETY: a valid pidfd, a valid signal number, no siginfo, no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    match rc {
        0 => Ok(()),
        // Already gone.
        _ if std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) => Ok(()),
        _ => Err(std::io::Error::last_os_error()).context(format!("sending {signal}")),
    }
}

/// Whether the process exited within `timeout` (a pidfd becomes readable on exit).
fn wait_exit(pidfd: &OwnedFd, timeout: Duration) -> Result<bool> {
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, timeout) {
            Ok(n) => return Ok(n > 0),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("waiting for a process to exit"),
        }
    }
}
