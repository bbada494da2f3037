//! Offline checks of `deploy/` against the agent: the manifests, the Dockerfile, the
//! kind config and the install script (`deploy/manifests.rs`), and the flag table of
//! deploy/README.md (`deploy/flag_table.rs`). kubernetes-validate and the toolchain
//! pins come from where `cargo xtask test` installs them (xtask/src/pins.rs, shared
//! as it is), so that these tests hold deploy/ to what the project's own machines use.

#[path = "../../xtask/src/pins.rs"]
mod pins;

mod deploy {
    mod flag_table;
    mod manifests;
}
