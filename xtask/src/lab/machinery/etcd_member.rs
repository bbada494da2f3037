//! One etcd member for a run: its TLS, made with openssl (a CA, the server's
//! certificate for its address, serverAuth, and the agents' client certificate,
//! clientAuth, without which etcd with `--client-cert-auth` refuses it), and its
//! command line. Shared with overlay-agent's etcd tests (`overlay-agent/tests/etcd.rs`
//! includes this file), hence std and anyhow only.

use std::{ffi::OsString, net::Ipv4Addr, path::Path, process::Command};

use anyhow::{Context as _, Result, ensure};

/// The files [`make`] writes, by name in its directory.
pub(crate) const CA: &str = "ca.pem";
pub(crate) const SERVER_CERT: &str = "server.pem";
pub(crate) const SERVER_KEY: &str = "server.key";
pub(crate) const CLIENT_CERT: &str = "client.pem";
pub(crate) const CLIENT_KEY: &str = "client.key";

/// Long enough for any run, short enough that a leftover is soon worthless.
const DAYS: &str = "2";
const CA_KEY: &str = "ca.key";
/// openssl's arguments for a new unencrypted RSA key, whose file follows.
const NEW_KEY: [&str; 4] = ["-newkey", "rsa:2048", "-nodes", "-keyout"];

/// Writes the CA, the server's and the client's certificates into `dir`; subjects are
/// `/CN=<subject>-ca`, `-server` and `-client`.
pub(crate) fn make(dir: &Path, server: Ipv4Addr, subject: &str) -> Result<()> {
    let openssl = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running openssl (apt-get install openssl)")?;
        ensure!(
            out.status.success(),
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    };
    let ca_subject = format!("/CN={subject}-ca");
    openssl(
        &[
            &["req", "-x509"][..],
            &NEW_KEY,
            &[CA_KEY, "-out", CA, "-days", DAYS, "-subj", &ca_subject],
        ]
        .concat(),
    )?;
    for (name, cert, key, extensions) in [
        (
            "server",
            SERVER_CERT,
            SERVER_KEY,
            format!("subjectAltName=IP:{server}\nextendedKeyUsage=serverAuth\n"),
        ),
        (
            "client",
            CLIENT_CERT,
            CLIENT_KEY,
            "extendedKeyUsage=clientAuth\n".to_owned(),
        ),
    ] {
        let (ext, csr) = (format!("{name}.ext"), format!("{name}.csr"));
        std::fs::write(dir.join(&ext), extensions)
            .with_context(|| format!("writing {}", dir.join(&ext).display()))?;
        let subj = format!("/CN={subject}-{name}");
        openssl(&[&["req"][..], &NEW_KEY, &[key, "-out", &csr, "-subj", &subj]].concat())?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            CA,
            "-CAkey",
            CA_KEY,
            "-CAcreateserial",
            "-out",
            cert,
            "-days",
            DAYS,
            "-extfile",
            &ext,
        ])?;
    }
    Ok(())
}

/// etcd's arguments for a single member called `name`, its data in `data`, serving
/// clients at `url`; its peer port only on its own loopback. With `tls`, the directory
/// [`make`] wrote: clients over TLS, with a certificate.
pub(crate) fn single_member(
    name: &str,
    data: &Path,
    url: &str,
    tls: Option<&Path>,
) -> Vec<OsString> {
    let peer = "http://127.0.0.1:2380";
    let mut args: Vec<OsString> = vec![
        "--name".into(),
        name.into(),
        "--data-dir".into(),
        data.into(),
    ];
    for (flag, value) in [
        ("--listen-client-urls", url.to_owned()),
        ("--advertise-client-urls", url.to_owned()),
        ("--listen-peer-urls", peer.to_owned()),
        ("--initial-advertise-peer-urls", peer.to_owned()),
        ("--initial-cluster", format!("{name}={peer}")),
    ] {
        args.extend([flag.into(), value.into()]);
    }
    if let Some(dir) = tls {
        for (flag, file) in [
            ("--cert-file", SERVER_CERT),
            ("--key-file", SERVER_KEY),
            ("--trusted-ca-file", CA),
        ] {
            args.extend([flag.into(), dir.join(file).into()]);
        }
        args.push("--client-cert-auth".into());
    }
    args
}
