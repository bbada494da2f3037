//! A real etcd in a network namespace of the test's own (`olab-t<random>-etcd`),
//! listening on 127.0.0.1 there, its data in a temporary directory; killed and the
//! namespace deleted on drop. The test's client code runs in a thread that has
//! entered the namespace ([`Etcd::run`]).

use std::{
    collections::hash_map::RandomState,
    future::Future,
    hash::BuildHasher as _,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::Duration,
};

use etcd_client::Client;
use overlay_agent::nodes::etcd::{DEFAULT_PREFIX, EtcdOptions};
use tempfile::TempDir;

use crate::etcd_member;

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn create() -> Self {
        let name = format!("olab-t{:08x}-etcd", RandomState::new().hash_one(0u8) as u32);
        ip(&["netns", "add", &name]);
        // From here on the guard deletes it, whatever fails next.
        let ns = Self(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("running ip");
    assert!(status.success(), "ip {args:?} failed (needs root)");
}

/// Client certificate files signed by the run's own CA, for the agent (etcd finds its
/// own in the same directory).
pub(super) struct Certs {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Certs {
    fn generate(dir: &Path) -> Self {
        let p = |name: &str| dir.join(name);
        etcd_member::make(dir, Ipv4Addr::LOCALHOST, "olab-test").expect("making the certificates");
        Self {
            ca: p(etcd_member::CA),
            client_cert: p(etcd_member::CLIENT_CERT),
            client_key: p(etcd_member::CLIENT_KEY),
        }
    }
}

pub(super) struct Etcd {
    child: Mutex<Option<Child>>,
    pub certs: Option<Certs>,
    dir: TempDir,
    ns: Netns,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Etcd {
    /// etcd over plain HTTP.
    pub(super) fn start() -> Self {
        Self::start_with(false)
    }

    /// etcd over TLS that demands client certificates.
    pub(super) fn start_tls() -> Self {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Self {
        let ns = Netns::create();
        let dir = tempfile::tempdir().unwrap();
        let certs = tls.then(|| Certs::generate(dir.path()));
        let etcd = Self {
            child: Mutex::new(None),
            certs,
            dir,
            ns,
        };
        etcd.spawn();
        etcd
    }

    pub(super) fn url(&self) -> String {
        let scheme = if self.certs.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:2379")
    }

    /// Starts etcd on the data directory (again, after [`Etcd::stop`]) and waits
    /// until it answers.
    pub(super) fn spawn(&self) {
        let url = self.url();
        let data = self.dir.path().join("data");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns.0, "etcd"])
            .args(etcd_member::single_member(
                "t",
                &data,
                &url,
                self.certs.as_ref().map(|_| self.dir.path()),
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // `ip netns exec` execs etcd: the child is etcd itself.
        *self.child.lock().unwrap() = Some(
            cmd.spawn()
                .expect("starting etcd (apt-get install etcd-server)"),
        );
        let opts = self.options();
        self.run(|| async move {
            let ready = async {
                loop {
                    if let Ok(mut c) = opts.connect().await
                        && c.status().await.is_ok()
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            tokio::time::timeout(Duration::from_secs(30), ready)
                .await
                .expect("etcd did not come up");
        });
    }

    /// Kills etcd; the data stays for [`Etcd::spawn`].
    pub(super) fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The agent's settings for this etcd: client certificates with TLS.
    pub(super) fn options(&self) -> EtcdOptions {
        EtcdOptions {
            endpoints: vec![self.url()],
            prefix: DEFAULT_PREFIX.into(),
            keyfile: self.certs.as_ref().map(|c| c.client_key.clone()),
            certfile: self.certs.as_ref().map(|c| c.client_cert.clone()),
            cafile: self.certs.as_ref().map(|c| c.ca.clone()),
            username: None,
            password: None,
            renew_margin: Duration::from_secs(3600),
            subnet_file: self.dir.path().join("subnet.env"),
        }
    }

    /// The directory of this etcd's data and certificates.
    pub(super) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A client with the agent's settings.
    pub(super) async fn client(&self) -> Client {
        self.options().connect().await.unwrap()
    }

    /// Runs `f`'s future to its end on a runtime of its own in a thread inside the
    /// namespace, where etcd's 127.0.0.1 is.
    pub(super) fn run<F, T>(&self, f: impl FnOnce() -> F + Send) -> T
    where
        F: Future<Output = T>,
        T: Send,
    {
        let path = format!("/var/run/netns/{}", self.ns.0);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).expect("opening the namespace");
                // SAFETY: moves only this thread, which ends with the closure; the
                // runtime and its connections live and die in it.
                let entered = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(f())
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}
