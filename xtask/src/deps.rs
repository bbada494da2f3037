//! Installs what a fresh machine lacks to build and test the dataplane: Debian
//! packages, the eBPF crate's pinned nightly with rust-src and clippy, bpf-linker
//! built against Debian's LLVM (the pins below say why each version), and
//! kubernetes-validate for the deploy manifests.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::pins::{
    self, BPF_LINKER_VERSION, KUBERNETES_VALIDATE_VERSION, LLVM_PREFIX, PACKAGES, nightly,
};

/// What running a second kernel takes (`cargo xtask test --kernel`, `kernels`, `bench`):
/// QEMU (software emulation: nested KVM hangs on these machines), kmod (virtme-ng runs
/// depmod on the kernel's modules), busybox (virtme-ng's initramfs), and the tools the
/// benchmark drives inside the VM; ipvsadm and ipset for kube-proxy's IPVS mode, which
/// needs a kernel with ip_vs (Debian's, in the VM, has it).
const VM_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "kmod",
    "busybox-static",
    "ethtool",
    "ipvsadm",
    "ipset",
];
/// Boots a kernel on the host's own root filesystem (read-only, with writable overlays),
/// so the binaries built here run inside unchanged.
const VIRTME_NG_VERSION: &str = "1.42";
/// The benchmark's plot: a font for its labels.
const BENCH_PACKAGES: &[&str] = &["fonts-dejavu-core"];

/// Makes sure everything is installed; does nothing when it already is.
pub(crate) fn ensure() -> Result<()> {
    if ensure_packages(PACKAGES)?.contains(&"etcd-server") {
        stop_packaged_etcd()?;
    }
    ensure_nightly()?;
    ensure_lint_tools()?;
    ensure_bpf_linker()?;
    kubernetes_validate().map(drop)
}

/// Runs `cmd`, failing with its rendering when it does not succeed.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

/// Output of `cmd` if it ran and succeeded.
pub(crate) fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments, touches no memory and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A command run as root: directly when we are root, else through sudo if present.
pub(crate) fn privileged(program: &str) -> Result<Command> {
    if is_root() {
        return Ok(Command::new(program));
    }
    if which("sudo").is_none() {
        bail!("{program} needs root, and there is no sudo: run this command as root");
    }
    let mut cmd = Command::new("sudo");
    cmd.arg(program);
    Ok(cmd)
}

fn which(program: &str) -> Option<String> {
    output(
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {program}")),
    )
}

/// Everything [`ensure`] installs, plus what booting a kernel in a VM needs; returns
/// the virtme-ng executable.
pub(crate) fn ensure_vm() -> Result<PathBuf> {
    ensure()?;
    ensure_packages(VM_PACKAGES)?;
    ensure_packages(BENCH_PACKAGES)?;
    let exe = pins::venv_exe(&cache_dir()?, "virtme-ng", VIRTME_NG_VERSION, "vng");
    venv_tool("virtme-ng", VIRTME_NG_VERSION, exe)
}

/// Installs the packages that are missing; returns them.
fn ensure_packages<'a>(packages: &[&'a str]) -> Result<Vec<&'a str>> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(missing);
    }
    eprintln!("installing Debian packages: {}", missing.join(" "));
    run(privileged("apt-get")?.args(["update", "-qq"]))?;
    run(privileged("apt-get")?
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(missing)
}

/// Debian's etcd-server enables and starts an etcd of the machine's own (on its
/// 127.0.0.1:2379, data in /var/lib/etcd) wherever the init system lets it. Nothing
/// here uses it: the tests and the lab start their own etcd inside their namespaces.
/// So the service a fresh install brought is stopped and disabled again.
fn stop_packaged_etcd() -> Result<()> {
    if Path::new("/run/systemd/system").is_dir() {
        return run(privileged("systemctl")?.args(["disable", "--now", "etcd.service"]));
    }
    // Without systemd, invoke-rc.d started it only if policy-rc.d allowed it (a
    // container's usually does not); stopping what did not start is no error.
    let _ = privileged("invoke-rc.d")?.args(["etcd", "stop"]).status();
    run(privileged("update-rc.d")?.args(["etcd", "disable"]))
}

/// The eBPF crate's nightly with rust-src (its `core` is built for the BPF target) and
/// clippy (the eBPF crate's gate in `cargo xtask test`).
fn ensure_nightly() -> Result<()> {
    const COMPONENTS: [&str; 2] = ["rust-src", "clippy"];
    let Some(installed) = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        nightly(),
    ])) else {
        eprintln!(
            "installing the {} toolchain with {}",
            nightly(),
            COMPONENTS.join(" and ")
        );
        return run(Command::new("rustup")
            .args(["toolchain", "install", nightly(), "--profile", "minimal"])
            .args(COMPONENTS.into_iter().flat_map(|c| ["--component", c])));
    };
    let missing: Vec<&str> = COMPONENTS
        .into_iter()
        .filter(|c| !installed.lines().any(|l| l.starts_with(c)))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {} for {}", missing.join(" and "), nightly());
    run(Command::new("rustup")
        .args(["component", "add", "--toolchain", nightly()])
        .args(&missing))
}

/// clippy and rustfmt for the gates of `cargo xtask test`, in the toolchain that runs
/// it (a minimal rustup profile has neither).
fn ensure_lint_tools() -> Result<()> {
    let installed = output(Command::new("rustup").args(["component", "list", "--installed"]))
        .unwrap_or_default();
    let missing: Vec<&str> = ["clippy", "rustfmt"]
        .into_iter()
        .filter(|c| !installed.lines().any(|l| l.starts_with(c)))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {}", missing.join(" and "));
    run(Command::new("rustup")
        .args(["component", "add"])
        .args(&missing))
}

fn ensure_bpf_linker() -> Result<()> {
    let version = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if version.contains(&format!(" {BPF_LINKER_VERSION}.")) {
        return Ok(());
    }
    eprintln!("building bpf-linker {BPF_LINKER_VERSION} against {LLVM_PREFIX} (about a minute)");
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            &format!("~{BPF_LINKER_VERSION}"),
        ])
        .args(["--no-default-features", "--features", "llvm-22", "--force"])
        .env("LLVM_PREFIX", LLVM_PREFIX))
}

/// The kubernetes-validate executable, installed first if it is missing.
pub(crate) fn kubernetes_validate() -> Result<PathBuf> {
    let exe = pins::kubernetes_validate(&cache_dir()?);
    venv_tool("kubernetes-validate", KUBERNETES_VALIDATE_VERSION, exe)
}

/// `exe` of the PyPI package `package` at `version` ([`pins::venv_exe`]), installed
/// first if it is missing. Each tool lives in a virtualenv of its own: Debian's Python
/// refuses `pip install` outside one (PEP 668), and the version stays pinned whatever
/// else the machine's Python has.
fn venv_tool(package: &str, version: &str, exe: PathBuf) -> Result<PathBuf> {
    // <venv>/bin/<exe>
    let venv = exe
        .parent()
        .and_then(Path::parent)
        .context("a virtualenv's executable")?
        .to_owned();
    let installed = output(Command::new(venv.join("bin/pip")).args([
        "show",
        "--disable-pip-version-check",
        package,
    ]))
    .unwrap_or_default();
    if exe.exists()
        && installed
            .lines()
            .any(|l| l == format!("Version: {version}"))
    {
        return Ok(exe);
    }
    eprintln!("installing {package} {version} into {}", venv.display());
    // --clear: a venv that an interrupted install left half-made starts over.
    // Debian's own python3 (not a pyenv shim that may shadow it on PATH).
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    run(Command::new(python)
        .args(["-m", "venv", "--clear"])
        .arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("{package}=={version}"),
    ]))?;
    Ok(exe)
}

/// The project's cache on this machine ([`pins::cache_dir`]).
pub(crate) fn cache_dir() -> Result<PathBuf> {
    pins::cache_dir().context("HOME is not set")
}
