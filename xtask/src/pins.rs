//! What `deps` installs, pinned, as data: the Debian packages, the eBPF toolchain's
//! versions, and where the PyPI tools go. Shared with overlay-agent's deploy tests
//! (`overlay-agent/tests/deploy.rs` includes this file), which hold deploy/Dockerfile
//! to the same toolchain and find kubernetes-validate where `deps` put it; hence std
//! only.

use std::path::{Path, PathBuf};

/// Debian packages: LLVM for bpf-linker and protoc for the etcd client (installed
/// before anything builds the agent: `cargo xtask` itself does not), and the tools
/// the lab and tests drive.
pub(crate) const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // protoc: the agent's etcd client (etcd-client) compiles etcd's .proto files in
    // its build script, in every build of the workspace.
    "protobuf-compiler",
    // The google/protobuf/*.proto that etcd's .proto files import.
    "libprotobuf-dev",
    "iproute2",
    "iputils-ping",
    "tcpdump",
    // kubernetes-validate goes into a virtualenv (below); Debian's python3 needs this
    // package for `python3 -m venv`.
    "python3-venv",
    // The masquerade proof's baseline: flanneld's rules, with the nft backend.
    "iptables",
    "nftables",
    // The lab's pods: the real CNI plugins (bridge, host-local, portmap, loopback in
    // /usr/lib/cni), run as containerd runs them with flannel's delegate.
    "containernetworking-plugins",
    // The lab's cluster DNS: a real DNS server in a pod.
    "dnsmasq-base",
    // The NetworkPolicy engines: kube-router's ipsets, and kube-network-policies'
    // strict mode, which ends conntrack entries its policies no longer admit.
    "ipset",
    "conntrack",
    // The etcd that flannel's etcd subnet manager keeps its leases in (`lab --etcd`,
    // the agent's etcd tests).
    "etcd-server",
    // etcdctl: `lab --etcd` seeds the network configuration and lists the leases.
    "etcd-client",
    // The certificates of each etcd run's TLS (`lab --etcd`, the etcd tests).
    "openssl",
];
pub(crate) const BPF_LINKER_VERSION: &str = "0.13";
pub(crate) const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Validates the deploy manifests against the Kubernetes OpenAPI schemas, offline: it
/// carries the schemas of Kubernetes 1.25 to 1.37.
pub(crate) const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
/// The nightly the eBPF crate builds with (`overlay-ebpf/rust-toolchain`, which the
/// agent's build script hands to aya-build): pinned, because bpf-linker reads the
/// LLVM bitcode rustc writes, and a newer nightly's LLVM (23 from late 2026) is one
/// bpf-linker built against Debian's LLVM 22 cannot read ("Invalid record").
pub(crate) fn nightly() -> &'static str {
    include_str!("../../overlay-ebpf/rust-toolchain").trim()
}

/// The project's cache on this machine (`$XDG_CACHE_HOME/overlay-xtask`, else
/// `~/.cache/overlay-xtask`): tools and kernels that outlive a clean of `target/`.
/// None when HOME is not set either.
pub(crate) fn cache_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".cache"),
    };
    Some(base.join("overlay-xtask"))
}

/// The executable `exe` of the PyPI package `package` at `version`, in the
/// virtualenv of its own that `deps` gives it in `cache`.
pub(crate) fn venv_exe(cache: &Path, package: &str, version: &str, exe: &str) -> PathBuf {
    cache
        .join(format!("{package}-{version}"))
        .join("bin")
        .join(exe)
}

/// The kubernetes-validate executable, where `deps` installs it.
pub(crate) fn kubernetes_validate(cache: &Path) -> PathBuf {
    venv_exe(
        cache,
        "kubernetes-validate",
        KUBERNETES_VALIDATE_VERSION,
        "kubernetes-validate",
    )
}
