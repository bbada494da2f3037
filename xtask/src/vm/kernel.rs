//! The kernels a VM can boot, fetched from Debian's archive into the project's cache.
//!
//! A kernel is named by its series (`6.1`). Debian publishes each series as versioned
//! image packages (`linux-image-6.1.0-56-amd64`) and a metapackage that depends on the
//! current one (`linux-image-amd64` on bookworm). We pin the image package that was
//! last checked, but the archive drops old images after a point release: then the
//! metapackage names the current one, which is fetched instead, and every run says
//! which package and version it booted.
//!
//! Cache layout: `<cache>/kernels/<series>/<image package>/{ROOT/,package.json}`, where
//! `ROOT` is the package extracted with `dpkg-deb -x` (`boot/vmlinuz-*`,
//! `lib/modules/*`). virtme-ng finds the modules next to the image (it looks for
//! `lib/modules` above the image's directory), so nothing is copied into the host's
//! own /lib/modules.

use std::{
    fmt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{deps, lab::machinery::netns};

/// A kernel series the project knows how to fetch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Spec {
    /// What `--kernel` takes.
    pub name: &'static str,
    /// The image package last checked (tried first).
    pub pinned: &'static str,
    /// Debian's metapackage that depends on the series' current image package.
    pub meta: &'static str,
    /// The prefix every image package of the series has (guards the metapackage
    /// fallback against a distribution upgrade that moved it to another series).
    pub series_prefix: &'static str,
    /// Why this kernel is in the matrix.
    pub why: &'static str,
}

/// The kernels of the matrix besides the host's. To add one, see docs/KERNELS.md.
pub(crate) const KERNELS: &[Spec] = &[
    Spec {
        name: "6.1",
        pinned: "linux-image-6.1.0-56-amd64",
        meta: "linux-image-amd64",
        series_prefix: "linux-image-6.1.",
        why: "Debian 12's kernel: has the ipip module (kernel tunl0), no TCX (clsact + cls_bpf)",
    },
    Spec {
        name: "6.12",
        pinned: "linux-image-6.12.118+deb12-amd64",
        meta: "linux-image-6.12-amd64",
        series_prefix: "linux-image-6.12.",
        why: "Debian 13's kernel series (in Debian 12's security archive): TCX and the ipip module",
    },
];

pub(crate) fn spec(name: &str) -> Result<Spec> {
    match KERNELS.iter().find(|k| k.name == name) {
        Some(spec) => Ok(*spec),
        None => bail!(
            "no kernel {name:?}; known: {} (see docs/KERNELS.md to add one)",
            KERNELS
                .iter()
                .map(|k| k.name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A kernel extracted in the cache, ready to boot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Kernel {
    /// The series (`6.1`).
    pub name: String,
    /// The Debian package it came from, and its version.
    pub package: String,
    pub version: String,
    /// `uname -r` of the kernel (`6.1.0-56-amd64`).
    pub release: String,
    pub image: PathBuf,
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (Debian {} {})",
            self.release, self.package, self.version
        )
    }
}

const RECORD: &str = "package.json";

/// The kernel of `spec`, fetched first if the cache has none.
pub(crate) fn fetch(spec: &Spec) -> Result<Kernel> {
    let dir = deps::cache_dir()?.join("kernels").join(spec.name);
    if let Some(kernel) = cached(&dir.join(spec.pinned))? {
        return Ok(kernel);
    }
    // A kernel of the series resolved earlier through the metapackage.
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut others: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        others.sort();
        for other in others.iter().rev() {
            if let Some(kernel) = cached(other)? {
                eprintln!(
                    "kernel {}: {} is not cached; using {kernel} fetched earlier",
                    spec.name, spec.pinned
                );
                return Ok(kernel);
            }
        }
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let package = match download(&dir, spec.pinned) {
        Ok(deb) => (spec.pinned.to_owned(), deb),
        Err(e) => {
            eprintln!(
                "kernel {}: {} is not in the archive ({e:#}); resolving {}",
                spec.name, spec.pinned, spec.meta
            );
            let image = resolve(&dir, spec)?;
            let deb = download(&dir, &image)?;
            (image, deb)
        }
    };
    extract(&dir.join(&package.0), &package.0, &package.1)
}

/// The kernel extracted in `dir`, if complete.
fn cached(dir: &Path) -> Result<Option<Kernel>> {
    let record = dir.join(RECORD);
    let Ok(text) = std::fs::read(&record) else {
        return Ok(None);
    };
    let kernel: Kernel =
        serde_json::from_slice(&text).with_context(|| format!("reading {}", record.display()))?;
    Ok(kernel.image.exists().then_some(kernel))
}

/// `apt-get download <package>` into `dir`; returns the .deb. Retries once after
/// `apt-get update` (a fresh machine has no package lists).
fn download(dir: &Path, package: &str) -> Result<PathBuf> {
    let get = || {
        netns::run(
            deps::privileged("apt-get")?
                .args(["download", "-qq", package])
                .current_dir(dir),
        )
    };
    if get().is_err() {
        deps::run(deps::privileged("apt-get")?.args(["update", "-qq"]))?;
        get()?;
    }
    let prefix = format!("{package}_");
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(path);
        }
    }
    bail!(
        "apt-get download {package} left no .deb in {}",
        dir.display()
    )
}

/// The image package the metapackage depends on now.
fn resolve(dir: &Path, spec: &Spec) -> Result<String> {
    let meta = download(dir, spec.meta)?;
    let depends = netns::run(Command::new("dpkg-deb").arg("-f").arg(&meta).arg("Depends"))?;
    let _ = std::fs::remove_file(&meta);
    let image = depends
        .split(',')
        .map(|d| d.split_whitespace().next().unwrap_or_default())
        .find(|name| name.starts_with(spec.series_prefix))
        .with_context(|| {
            format!(
                "{} depends on no {}* package ({depends:?}): the series moved on; add a kernel (docs/KERNELS.md)",
                spec.meta, spec.series_prefix
            )
        })?;
    Ok(image.to_owned())
}

/// Extracts `deb` into `dir/ROOT` and records what it is.
fn extract(dir: &Path, package: &str, deb: &Path) -> Result<Kernel> {
    let version = netns::run(Command::new("dpkg-deb").arg("-f").arg(deb).arg("Version"))?
        .trim()
        .to_owned();
    let partial = dir.join("ROOT.partial");
    let root = dir.join("ROOT");
    for stale in [&partial, &root] {
        if stale.exists() {
            std::fs::remove_dir_all(stale)?;
        }
    }
    std::fs::create_dir_all(&partial)?;
    eprintln!("extracting {package} {version} into {}", root.display());
    deps::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&partial))?;
    std::fs::rename(&partial, &root)?;
    std::fs::remove_file(deb)?;
    let modules = root.join("lib/modules");
    let release = std::fs::read_dir(&modules)
        .with_context(|| format!("{package} has no {}", modules.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .with_context(|| format!("{} is empty", modules.display()))?;
    let image = root.join("boot").join(format!("vmlinuz-{release}"));
    if !image.exists() {
        bail!("{package} has no {}", image.display());
    }
    let kernel = Kernel {
        name: dir
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        package: package.to_owned(),
        version,
        release,
        image,
    };
    std::fs::write(dir.join(RECORD), serde_json::to_vec_pretty(&kernel)?)?;
    Ok(kernel)
}
