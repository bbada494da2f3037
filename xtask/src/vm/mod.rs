//! Running commands under another kernel: a VM booted with virtme-ng on the host's own
//! root filesystem (read-only, with writable overlays), so the binaries built here run
//! inside unchanged. QEMU emulates (TCG): nested KVM hangs on these machines.
//!
//! Output and exit status come back through a host directory shared read-write with
//! the guest (`--rwdir`), not through virtme-ng's script ports: those are virtio-serial
//! ports that the guest finds through udev's `/dev/virtio-ports` links, and without udev
//! (as here) virtme-ng-init falls back to the serial console, which mixes the kernel's
//! log into the output and loses the exit status. The command's output is streamed
//! from the shared file while the VM runs; the console goes to a log kept for failures.
//!
//! `cargo xtask vm [--kernel 6.1] -- <command>` runs one command (a shell line).

#[cfg(test)]
mod interop;
pub(crate) mod kernel;

use std::{
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use self::kernel::Kernel;
use crate::{deps, lab::machinery::interrupt};

/// Guest CPUs: the machines have two cores, and emulation runs one thread per CPU.
const CPUS: u32 = 2;
const MEMORY: &str = "2G";
/// Files in the shared directory.
const SCRIPT: &str = "run.sh";
const OUTPUT: &str = "output";
const STATUS: &str = "status";
const CONSOLE: &str = "console.log";
/// The guest's per-CPU input queue (`net.core.netdev_max_backlog`, 1,000 by default):
/// the emulated guest stands still for seconds at a time, and packets that arrive
/// meanwhile wait there. A setting of the guest's own kernel, nothing of this machine.
const BACKLOG: u32 = 100_000;
/// How much longer the lab's timeouts are under emulation (see `interrupt::SLOWDOWN`).
const SLOWDOWN_FACTOR: u32 = 5;

#[derive(clap::Args)]
pub(crate) struct VmArgs {
    /// The kernel to boot (see `cargo xtask kernels --list`).
    #[arg(long, default_value = "6.1")]
    kernel: String,
    /// Give up after this many minutes.
    #[arg(long, default_value_t = 30)]
    timeout_minutes: u64,
    /// The command, run by `sh -c` inside the VM as root.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

pub(crate) fn run(args: VmArgs) -> Result<()> {
    let vm = Vm::prepare(&args.kernel)?;
    let done = vm.run(
        &args.command.join(" "),
        Duration::from_secs(args.timeout_minutes * 60),
    )?;
    if done.status != 0 {
        bail!(
            "the command exited with status {} in the VM (console log in {})",
            done.status,
            done.shared.display()
        );
    }
    done.remove()
}

/// A kernel ready to boot, and virtme-ng to boot it.
pub(crate) struct Vm {
    pub kernel: Kernel,
    vng: PathBuf,
}

/// What a command did inside the VM.
#[derive(Debug)]
pub(crate) struct Finished {
    pub status: i32,
    /// The shared directory: whatever the command wrote under `$VM_SHARED` is here.
    pub shared: PathBuf,
    pub elapsed: Duration,
}

impl Finished {
    /// Removes the shared directory.
    pub(crate) fn remove(self) -> Result<()> {
        std::fs::remove_dir_all(&self.shared)
            .with_context(|| format!("removing {}", self.shared.display()))
    }
}

impl Vm {
    /// Installs what is missing (QEMU, virtme-ng, the kernel) and returns the VM.
    pub(crate) fn prepare(kernel: &str) -> Result<Self> {
        let vng = deps::ensure_vm()?;
        let kernel = kernel::fetch(&kernel::spec(kernel)?)?;
        Ok(Self { kernel, vng })
    }

    /// Boots the kernel, runs `command` (a shell script) as root in `cwd` = the
    /// workspace, streams its output here, and returns when the VM is off. The
    /// environment variable `VM_SHARED` names a directory the command may write results
    /// to; it is returned as [`Finished::shared`] and stays until the caller removes it.
    pub(crate) fn run(&self, command: &str, timeout: Duration) -> Result<Finished> {
        interrupt::install()?;
        let shared = new_run_dir()?;
        let script = format!(
            "#!/bin/sh\n\
             # Written by cargo xtask: runs inside the VM.\n\
             export PATH={path}\n\
             export HOME={home}\n\
             export VM_SHARED={shared}\n\
             export NO_COLOR=1\n\
             export {slowdown}={SLOWDOWN_FACTOR}\n\
             echo {BACKLOG} > /proc/sys/net/core/netdev_max_backlog\n\
             cd {cwd}\n\
             ( echo \"== VM: kernel $(uname -r), $(uname -v), $(nproc) CPUs\"\n{command}\n) > {shared}/{OUTPUT} 2>&1 < /dev/null\n\
             echo $? > {shared}/{STATUS}.tmp && mv {shared}/{STATUS}.tmp {shared}/{STATUS}\n",
            path = std::env::var("PATH").unwrap_or_default(),
            home = std::env::var("HOME").unwrap_or_else(|_| "/root".into()),
            shared = shared.display(),
            cwd = workspace().display(),
            slowdown = interrupt::SLOWDOWN,
        );
        std::fs::write(shared.join(SCRIPT), script)?;
        eprintln!(
            "booting {} under emulation ({CPUS} CPUs, {MEMORY}); shared directory {}",
            self.kernel,
            shared.display()
        );
        let console = std::fs::File::create(shared.join(CONSOLE))?;
        let mut child = Command::new(&self.vng)
            // vng starts its sibling `virtme-run` by name: the virtualenv's bin directory
            // must be on the path.
            .env("PATH", with_dir_of(&self.vng)?)
            .arg("--run")
            .arg(&self.kernel.image)
            .args([
                "--disable-kvm",
                "--cpus",
                &CPUS.to_string(),
                "--memory",
                MEMORY,
            ])
            .arg("--verbose")
            .arg("--rwdir")
            .arg(&shared)
            .arg("--cwd")
            .arg("/")
            .arg("--exec")
            .arg(format!("sh {}", shared.join(SCRIPT).display()))
            .stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console)
            // Its own process group: Ctrl-C reaches only us, and we stop QEMU with it.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", self.vng.display()))?;
        let started = Instant::now();
        let waited = self.follow(&mut child, &shared, started, timeout);
        if waited.is_err() {
            kill_group(&child);
            let _ = child.wait();
        }
        waited?;
        let Ok(status) = std::fs::read_to_string(shared.join(STATUS)) else {
            bail!(
                "the VM stopped before the command finished; the end of its console ({}):\n{}",
                shared.join(CONSOLE).display(),
                tail(&shared.join(CONSOLE), 25)
            );
        };
        let status = status.trim().parse().context("reading the exit status")?;
        Ok(Finished {
            status,
            shared,
            elapsed: started.elapsed(),
        })
    }

    /// Streams the output file to our stdout until the VM exits. The guest may grow
    /// the shared file before its data lands, so a read can end in NUL bytes that are
    /// not output yet: while the VM runs, a read stops at the first NUL and reads
    /// there again next time.
    fn follow(
        &self,
        child: &mut Child,
        shared: &Path,
        started: Instant,
        timeout: Duration,
    ) -> Result<()> {
        let mut offset = 0u64;
        loop {
            let exited = child.try_wait()?;
            if let Ok(mut file) = std::fs::File::open(shared.join(OUTPUT)) {
                file.seek(SeekFrom::Start(offset))?;
                let mut new = Vec::new();
                file.read_to_end(&mut new)?;
                if exited.is_none()
                    && let Some(nul) = new.iter().position(|&b| b == 0)
                {
                    new.truncate(nul);
                }
                offset += new.len() as u64;
                let mut out = std::io::stdout().lock();
                out.write_all(&new)?;
                out.flush()?;
            }
            if exited.is_some() {
                return Ok(());
            }
            if started.elapsed() > timeout {
                bail!(
                    "the VM did not finish within {timeout:?} (console: {})",
                    shared.join(CONSOLE).display()
                );
            }
            interrupt::check()?;
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn kill_group(child: &Child) {
    // SAFETY: plain syscall; the group is the one the child leads (process_group(0)).
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
}

/// The last `lines` lines of a file.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// This process's `PATH` with the directory of `exe` in front.
fn with_dir_of(exe: &Path) -> Result<std::ffi::OsString> {
    let dir = exe
        .parent()
        .with_context(|| format!("{} has no directory", exe.display()))?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::join_paths(std::iter::once(dir.to_path_buf()).chain(std::env::split_paths(&path)))
        .context("building PATH")
}

/// A fresh directory to share with a VM run.
fn new_run_dir() -> Result<PathBuf> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = deps::cache_dir()?.join("vm-runs").join(format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The workspace root (the VM sees it at the same path).
pub(crate) fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Whether this kernel can make ipip devices: probed in a namespace of our own, so
/// nothing of the machine's changes (creating the device loads the module if there is
/// one).
pub(crate) fn has_ipip() -> bool {
    let ns = format!("oprobe-{}", std::process::id());
    let made = crate::lab::machinery::netns::add(&ns).is_ok();
    let ok = made
        && crate::lab::machinery::netns::run(Command::new("ip").args([
            "-n",
            &ns,
            "link",
            "add",
            "oprobe",
            "type",
            "ipip",
            "local",
            "192.0.2.1",
        ]))
        .is_ok();
    if made {
        let _ = crate::lab::machinery::netns::delete(&ns);
    }
    ok
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn the_tools_directory_goes_in_front_of_the_path() {
        let path = super::with_dir_of(Path::new("/opt/venv/bin/vng")).unwrap();
        let dirs: Vec<_> = std::env::split_paths(&path).collect();
        let before = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).count();
        assert_eq!(dirs[0], Path::new("/opt/venv/bin"));
        assert_eq!(dirs.len(), before + 1);
    }
}
