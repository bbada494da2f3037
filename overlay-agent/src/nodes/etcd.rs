//! Node source: flannel's etcd subnet manager (flanneld without `--kube-subnet-mgr`),
//! so that an etcd-backed flannel network can swap flanneld for the agent node by node.
//!
//! Imitates flannel-io/flannel, v0.28 line: `pkg/subnet/etcd/registry.go` (commit
//! 016ef83), `pkg/subnet/etcd/local_manager.go` (commit 1ba5635), `pkg/lease/lease.go`
//! (commit 00014d0); the network configuration's defaults and checks are in
//! [`crate::net_conf`]. The data in etcd is flannel's, byte for byte:
//!
//! - `<prefix>/config` holds the net-conf JSON. Missing or invalid, the agent stops
//!   with the `etcdctl put` that would fix it.
//! - `<prefix>/subnets/10.244.1.0-24` holds one node's lease: its [`LeaseAttrs`] as
//!   JSON, attached to an etcd lease of 24 h that the node renews `--subnet-lease-
//!   renew-margin` minutes before it ends. A key without an etcd lease is an
//!   operator's reservation: never taken, and ours when it names our address.
//!
//! Acquisition goes as flannel's `tryAcquireLease`: the lease that already names our
//! public address, else the subnet of the last `subnet.env` if free, else one at
//! random among the first 100 free subnets from SubnetMin to SubnetMax. A new lease is
//! created in a transaction that only succeeds while the key does not exist, so two
//! nodes never share a subnet; the loser of a race picks again. Unlike flannel, the
//! renewal is conditional on the key still being on our etcd lease, so that a renewal
//! never takes back a subnet that another node leased after ours was deleted.
//!
//! Peers: the subnets are listed, then watched from the list's revision on. A PUT
//! adds or updates a peer, a DELETE (also how an expired lease arrives) removes it;
//! a compacted or failed watch lists again. Every change publishes a complete
//! [`NodeSet`]: each peer as a node named by its subnet key, tunnel address its
//! PublicIP, pod subnet its subnet, and this node under its own name with the subnet
//! it holds, which is how the agent learns its subnet (and writes `subnet.env`). Where
//! flanneld shuts down when its lease is deleted, the agent leases again (the same
//! subnet while free) and the node set carries the change.
//!
//! While etcd cannot be reached nothing new is published (the datapath keeps the last
//! peers), the failure is reported in [`Status`], and the source tries again with
//! backoff.
//!
//! The client is the `etcd-client` crate (etcdv3/etcd-client, 0.21): the maintained
//! etcd v3 gRPC client for Rust, built on tonic over tokio 1 (the agent's runtime, no
//! second one), with rustls on ring (as kube-rs here) for client certificates, and
//! username/password authentication that refreshes its token. It compiles etcd's
//! protobuf definitions when built, which needs `protoc` and the well-known types
//! (Debian: protobuf-compiler, libprotobuf-dev).

use std::{
    collections::{BTreeMap, hash_map::RandomState},
    fmt,
    hash::BuildHasher as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, Event, EventType, GetOptions,
    Identity, KeyValue, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions, WatchStream,
};
use ipnet::Ipv4Net;
use kube::runtime::utils::Backoff as _;
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, time::Instant};
use tracing::{info, warn};

use super::{
    address::OwnAddress,
    annotations::BACKEND,
    kube::Retry,
    node_set::{NodeInfo, NodeSet},
};
use crate::{
    net_conf::{NetConf, SubnetRange},
    status::Status,
    subnet_env,
};

/// flanneld's `--etcd-prefix` default.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";
/// How long a lease lasts (flannel's `subnetTTL`).
pub const LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Picks after a lost race before giving up (flannel's `raceRetries`).
const RACE_RETRIES: usize = 10;
/// flannel picks at random among at most this many free subnets, the lowest ones.
const PICK_AMONG: usize = 100;

/// How to reach etcd and where flannel's keys are: flanneld's `--etcd-*` flags.
#[derive(Clone)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub keyfile: Option<PathBuf>,
    pub certfile: Option<PathBuf>,
    pub cafile: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// `--subnet-lease-renew-margin`: renew this long before the lease ends.
    pub renew_margin: Duration,
    /// The `subnet.env` an earlier run wrote: its subnet is preferred.
    pub subnet_file: PathBuf,
}

/// Without the password.
impl fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("keyfile", &self.keyfile)
            .field("certfile", &self.certfile)
            .field("cafile", &self.cafile)
            .field("username", &self.username)
            .field("renew_margin", &self.renew_margin)
            .field("subnet_file", &self.subnet_file)
            .finish_non_exhaustive()
    }
}

impl EtcdOptions {
    /// Client settings, without the user: TLS when any certificate file is given
    /// (client certificate and key go together).
    fn connect_options(&self) -> Result<ConnectOptions> {
        // Pings find a dead connection under a watch that would otherwise wait
        // forever (only while a stream is open: etcd refuses idle pings); requests
        // and watches need a member with a leader, as flannel's watch asks, so that a
        // partitioned member's stale view is not taken for the cluster's.
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(false)
            .with_require_leader(true);
        let read = |path: &Path, what: &str| {
            std::fs::read(path)
                .with_context(|| format!("reading the etcd {what} {}", path.display()))
        };
        let identity = match (&self.certfile, &self.keyfile) {
            (Some(cert), Some(key)) => Some(Identity::from_pem(
                read(cert, "certificate (--etcd-certfile)")?,
                read(key, "key (--etcd-keyfile)")?,
            )),
            (None, None) => None,
            _ => bail!("--etcd-certfile and --etcd-keyfile go together"),
        };
        if identity.is_some() || self.cafile.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.cafile {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca, "CA (--etcd-cafile)")?));
            }
            if let Some(identity) = identity {
                tls = tls.identity(identity);
            }
            options = options.with_tls(tls);
        }
        Ok(options)
    }

    /// `--etcd-username` with its password.
    fn user(&self) -> Result<Option<(&str, &str)>> {
        match (&self.username, &self.password) {
            (Some(user), password) => Ok(Some((user, password.as_deref().unwrap_or_default()))),
            (None, Some(_)) => bail!("--etcd-password needs --etcd-username"),
            (None, None) => Ok(None),
        }
    }

    fn tls(&self) -> bool {
        self.certfile.is_some() || self.cafile.is_some()
    }

    /// The endpoints as the client takes them: with TLS, `http://` would be refused.
    fn urls(&self) -> Vec<String> {
        self.endpoints
            .iter()
            .map(|e| match e.strip_prefix("http://") {
                Some(rest) if self.tls() => format!("https://{rest}"),
                _ => e.clone(),
            })
            .collect()
    }

    /// A client of the endpoints. Settings etcd can never accept are errors: files
    /// that hold no usable certificate or key, a server certificate the CA does not
    /// vouch for, a wrong password. An etcd that cannot be reached yet is waited
    /// for, with backoff.
    pub async fn connect(&self) -> Result<Client> {
        if self.endpoints.is_empty() {
            bail!("no etcd endpoints (--etcd-endpoints)");
        }
        let urls = self.urls();
        let options = self.connect_options()?;
        // The client parses the certificates and key as it builds its endpoints, and
        // talks to etcd in `connect` only to log a user in: without one, whatever
        // fails here is the files.
        let anonymous = Client::connect(&urls, Some(options.clone()))
            .await
            .with_context(|| {
                format!(
                    "the etcd TLS files are unusable (--etcd-certfile {:?}, --etcd-keyfile {:?}, --etcd-cafile {:?})",
                    self.certfile, self.keyfile, self.cafile
                )
            })?;
        let Some((user, password)) = self.user()? else {
            return Ok(anonymous);
        };
        let options = options
            .with_user(user, password)
            .with_auto_token_refresh(true);
        let mut retry = Retry::exponential(Duration::from_millis(500), Duration::from_secs(10));
        loop {
            match Client::connect(&urls, Some(options.clone())).await {
                Ok(client) => return Ok(client),
                Err(e) => {
                    let error = self.judge(&e)?;
                    let wait = retry.next().expect("Retry never ends");
                    warn!(endpoints = ?urls, error, retry_in = ?wait, "cannot connect to etcd");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Says which setting etcd will never accept (an error), or describes a
    /// failure worth retrying. With client certificates, etcd closing the connection
    /// at once may also be its refusal of ours, which its own log names: the client
    /// cannot tell that from a restart, so the description gives the hint.
    fn judge(&self, e: &etcd_client::Error) -> Result<String> {
        let etcd_client::Error::GRpcStatus(status) = e else {
            return Ok(e.to_string());
        };
        let message = status.message();
        // rustls' words for a server certificate it does not trust.
        if message.contains("invalid peer certificate") {
            bail!(
                "etcd's certificate is not one the CA in --etcd-cafile {:?} vouches for: {message}",
                self.cafile
            );
        }
        if message.contains("authentication failed") {
            bail!(
                "etcd refuses --etcd-username {:?} with this password: {message}",
                self.username
            );
        }
        Ok(if self.certfile.is_some() && message.contains("canceled") {
            format!(
                "{e} (if etcd's log says it rejected our client certificate, check --etcd-certfile against its --trusted-ca-file)"
            )
        } else {
            e.to_string()
        })
    }
}

/// flannel's `LeaseAttrs` (pkg/lease/lease.go), the value of a subnet key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<Ipv6Addr>,
    #[serde(
        rename = "BackendType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub backend_type: String,
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_data: Option<serde_json::Value>,
    #[serde(
        rename = "BackendV6Data",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_v6_data: Option<serde_json::Value>,
}

impl LeaseAttrs {
    /// What this node's ipip backend announces, as flanneld's.
    pub fn ipip(public_ip: Ipv4Addr) -> Self {
        Self {
            public_ip,
            public_ipv6: None,
            backend_type: BACKEND.to_owned(),
            backend_data: None,
            backend_v6_data: None,
        }
    }
}

/// The last part of a subnet's key: `10.244.1.0-24` (flannel's `MakeSubnetKey`).
pub fn subnet_key(net: Ipv4Net) -> String {
    format!("{}-{}", net.network(), net.prefix_len())
}

/// The subnet of a key (or its last part), as flannel's `ParseSubnetKey`: the IPv6
/// half of a dual-stack key (`…-24&fc00::-64`) is ignored, the overlay carries IPv4.
pub fn parse_subnet_key(key: &str) -> Option<Ipv4Net> {
    let last = key.rsplit('/').next()?;
    let v4 = last.split('&').next()?;
    let (address, len) = v4.split_once('-')?;
    let net = Ipv4Net::new(address.parse().ok()?, len.parse().ok()?).ok()?;
    (net.trunc() == net).then_some(net)
}

/// One subnet key's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub subnet: Ipv4Net,
    pub attrs: LeaseAttrs,
    /// The etcd lease the key is attached to; 0 for a reservation.
    pub lease_id: i64,
}

impl Lease {
    fn from_kv(kv: &KeyValue) -> Result<Self> {
        let key = String::from_utf8_lossy(kv.key());
        let subnet =
            parse_subnet_key(&key).with_context(|| format!("{key:?} is not a subnet key"))?;
        let attrs = serde_json::from_slice(kv.value())
            .with_context(|| format!("{key}: the value is not flannel's lease JSON"))?;
        Ok(Self {
            subnet,
            attrs,
            lease_id: kv.lease(),
        })
    }

    pub fn reservation(&self) -> bool {
        self.lease_id == 0
    }
}

/// The lease this node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnLease {
    pub subnet: Ipv4Net,
    /// None for a reservation, which needs no renewal.
    pub lease_id: Option<i64>,
    /// When the etcd lease ends (a reservation does not: it is never renewed).
    pub expires: Instant,
}

impl OwnLease {
    fn renew_at(&self, margin: Duration) -> Option<Instant> {
        self.lease_id.map(|_| {
            self.expires
                .checked_sub(margin)
                .unwrap_or_else(Instant::now)
        })
    }

    /// Whether `lease` is still this one.
    fn is(&self, lease: &Lease, attrs: &LeaseAttrs) -> bool {
        lease.subnet == self.subnet
            && lease.attrs.public_ip == attrs.public_ip
            && lease.lease_id == self.lease_id.unwrap_or(0)
    }
}

/// The subnet for a new lease, in flannel's order: `previous` (the last subnet.env's)
/// when it is in the range and overlaps no lease, else one at random (`pick`, given
/// how many there are) among the first [`PICK_AMONG`] free subnets of the range.
pub fn choose(
    range: &SubnetRange,
    leases: &[Lease],
    previous: Option<Ipv4Net>,
    pick: impl FnOnce(usize) -> usize,
) -> Result<Ipv4Net> {
    let free = |net: &Ipv4Net| {
        !leases
            .iter()
            .any(|l| l.subnet.contains(net) || net.contains(&l.subnet))
    };
    if let Some(previous) = previous.filter(|p| range.holds(*p) && free(p)) {
        return Ok(previous);
    }
    let candidates: Vec<Ipv4Net> = range.iter().filter(free).take(PICK_AMONG).collect();
    if candidates.is_empty() {
        bail!(
            "out of subnets: every /{} from {} to {} is leased or reserved",
            range.len,
            range.min,
            range.max
        );
    }
    Ok(candidates[pick(candidates.len()).min(candidates.len() - 1)])
}

/// A number below `n` that differs between calls and processes: the std hasher's
/// keys are random per process and step per instance.
fn random_below(n: usize) -> usize {
    (RandomState::new().hash_one(0u8) % n as u64) as usize
}

/// flannel's keys in one etcd.
#[derive(Clone)]
pub struct Registry {
    client: Client,
    prefix: String,
}

impl Registry {
    pub fn new(client: Client, prefix: &str) -> Self {
        Self {
            client,
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }

    fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    pub fn key(&self, subnet: Ipv4Net) -> String {
        format!("{}{}", self.subnets_prefix(), subnet_key(subnet))
    }

    /// The network configuration, flannel's defaults and checks applied.
    pub async fn net_conf(&mut self) -> Result<(NetConf, SubnetRange)> {
        let key = self.config_key();
        let put = format!(
            "etcdctl put {key} '{{\"Network\": \"10.244.0.0/16\", \"Backend\": {{\"Type\": \"ipip\"}}}}'"
        );
        let resp = self
            .client
            .get(key.as_str(), None)
            .await
            .with_context(|| format!("reading {key} from etcd"))?;
        let Some(kv) = resp.kvs().first() else {
            bail!("no flannel network configuration at {key} in etcd; create it, e.g. {put}");
        };
        let text = String::from_utf8_lossy(kv.value());
        let unusable = || {
            format!("the flannel network configuration at {key} is unusable; fix it, e.g. {put}")
        };
        let conf = NetConf::parse(&text).with_context(unusable)?;
        let range = conf.subnets().with_context(unusable)?;
        Ok((conf, range))
    }

    /// Every subnet key's lease (keys that are not leases are warned about and
    /// skipped, as flannel does), and the revision they are as of.
    pub async fn leases(&mut self) -> Result<(Vec<Lease>, i64)> {
        let prefix = self.subnets_prefix();
        let resp = self
            .client
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .with_context(|| format!("listing {prefix} in etcd"))?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let leases = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                Lease::from_kv(kv)
                    .inspect_err(|e| warn!(error = format!("{e:#}"), "ignoring a subnet key"))
                    .ok()
            })
            .collect();
        Ok((leases, revision))
    }

    /// An etcd lease of `ttl` for a new lease of ours.
    async fn grant(&mut self, ttl: Duration) -> Result<(i64, Instant)> {
        let now = Instant::now();
        let grant = self
            .client
            .lease_grant(ttl.as_secs() as i64, None)
            .await
            .context("granting an etcd lease")?;
        Ok((
            grant.id(),
            now + Duration::from_secs(grant.ttl().max(0) as u64),
        ))
    }

    async fn revoke(&mut self, id: i64) {
        if let Err(e) = self.client.lease_revoke(id).await {
            warn!(lease = id, error = %e, "revoking an unused etcd lease failed; it expires by itself");
        }
    }

    /// Puts `attrs` at `subnet` on a new etcd lease, if `when` holds; the old etcd
    /// lease (`replaces`) is revoked once the key has left it.
    async fn put_leased(
        &mut self,
        subnet: Ipv4Net,
        attrs: &LeaseAttrs,
        ttl: Duration,
        when: Compare,
        replaces: Option<i64>,
    ) -> Result<Option<OwnLease>> {
        let key = self.key(subnet);
        let value = serde_json::to_string(attrs)?;
        let (id, expires) = self.grant(ttl).await?;
        let put = TxnOp::put(key.as_str(), value, Some(PutOptions::new().with_lease(id)));
        let txn = Txn::new().when([when]).and_then([put]);
        let done = match self.client.txn(txn).await {
            Ok(resp) => resp.succeeded(),
            Err(e) => {
                self.revoke(id).await;
                return Err(e).with_context(|| format!("writing {key}"));
            }
        };
        if !done {
            self.revoke(id).await;
            return Ok(None);
        }
        if let Some(old) = replaces.filter(|old| *old != 0) {
            self.revoke(old).await;
        }
        Ok(Some(OwnLease {
            subnet,
            lease_id: Some(id),
            expires,
        }))
    }

    /// Leases a subnet for `attrs.public_ip`, in flannel's order (see the module doc).
    pub async fn acquire(
        &mut self,
        range: &SubnetRange,
        attrs: &LeaseAttrs,
        previous: Option<Ipv4Net>,
        ttl: Duration,
    ) -> Result<OwnLease> {
        for _ in 0..RACE_RETRIES {
            let (mut leases, _) = self.leases().await?;
            if let Some(i) = leases
                .iter()
                .position(|l| l.attrs.public_ip == attrs.public_ip)
            {
                let ours = leases.remove(i);
                let key = self.key(ours.subnet);
                if !range.holds(ours.subnet) {
                    info!(subnet = %ours.subnet, "deleting our lease: its subnet is not one of the network configuration's");
                    self.client
                        .delete(key.as_str(), None)
                        .await
                        .with_context(|| format!("deleting {key}"))?;
                } else if ours.reservation() {
                    // Still a reservation: the value is brought up to date, without a lease.
                    let same = [
                        Compare::create_revision(key.as_str(), CompareOp::Greater, 0),
                        Compare::lease(key.as_str(), CompareOp::Equal, 0),
                    ];
                    let put = TxnOp::put(key.as_str(), serde_json::to_string(attrs)?, None);
                    let resp = self
                        .client
                        .txn(Txn::new().when(same).and_then([put]))
                        .await
                        .with_context(|| format!("writing {key}"))?;
                    if resp.succeeded() {
                        info!(subnet = %ours.subnet, "using the subnet reserved for this node");
                        return Ok(OwnLease {
                            subnet: ours.subnet,
                            lease_id: None,
                            expires: Instant::now() + ttl,
                        });
                    }
                    continue;
                } else {
                    let same = Compare::lease(key.as_str(), CompareOp::Equal, ours.lease_id);
                    if let Some(own) = self
                        .put_leased(ours.subnet, attrs, ttl, same, Some(ours.lease_id))
                        .await?
                    {
                        info!(subnet = %own.subnet, "found this node's lease, reusing it");
                        return Ok(own);
                    }
                    continue;
                }
            }
            let subnet = choose(range, &leases, previous, random_below)?;
            let key = self.key(subnet);
            let absent = Compare::create_revision(key.as_str(), CompareOp::Equal, 0);
            match self.put_leased(subnet, attrs, ttl, absent, None).await? {
                Some(own) => {
                    info!(%subnet, public_ip = %attrs.public_ip, "leased a subnet");
                    return Ok(own);
                }
                None => info!(%subnet, "another node leased the subnet first; picking again"),
            }
        }
        bail!("another node leased the subnet first {RACE_RETRIES} times in a row; giving up")
    }

    /// Renews `own` on a fresh etcd lease, only while the key is still on its etcd
    /// lease: None when it is not (deleted, or leased by someone else since).
    pub async fn renew(
        &mut self,
        own: &OwnLease,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<OwnLease>> {
        let key = self.key(own.subnet);
        let id = own.lease_id.unwrap_or(0);
        let same = Compare::lease(key.as_str(), CompareOp::Equal, id);
        self.put_leased(own.subnet, attrs, ttl, same, Some(id))
            .await
    }

    /// Changes under the subnet keys after `revision`.
    async fn watch(&mut self, revision: i64) -> Result<WatchStream> {
        let prefix = self.subnets_prefix();
        self.client
            .watch(
                prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await
            .with_context(|| format!("watching {prefix} in etcd"))
    }
}

/// The etcd node source of one node.
pub struct EtcdSource {
    registry: Registry,
    net_conf: NetConf,
    range: SubnetRange,
    node_name: String,
    attrs: LeaseAttrs,
    previous: Option<Ipv4Net>,
    renew_margin: Duration,
    ttl: Duration,
    retry: Retry,
}

/// Why a watch session ended.
enum Ended {
    /// The receiver went away.
    Closed,
    /// The watch fell behind compaction: list again at once.
    Relist,
}

impl EtcdSource {
    /// Connects and reads the network configuration. This node announces the address
    /// it is reached at: `--public-ip`, else the tunnel interface's, as flanneld.
    pub async fn open(
        opts: &EtcdOptions,
        node_name: &str,
        own_address: OwnAddress,
    ) -> Result<Self> {
        let client = opts.connect().await?;
        let mut registry = Registry::new(client, &opts.prefix);
        let mut retry = Retry::exponential(Duration::from_millis(500), Duration::from_secs(10));
        let (net_conf, range) = loop {
            match registry.net_conf().await {
                Ok(conf) => break conf,
                Err(e) => match e.downcast_ref::<etcd_client::Error>() {
                    // etcd answered: the configuration itself is wrong.
                    None => return Err(e),
                    Some(failure) => {
                        let error = opts.judge(failure)?;
                        let wait = retry.next().expect("Retry never ends");
                        warn!(error, retry_in = ?wait, "cannot read the network configuration");
                        tokio::time::sleep(wait).await;
                    }
                },
            }
        };
        let previous = subnet_env::read_subnet(&opts.subnet_file);
        info!(network = %net_conf.network, subnet_len = range.len, subnet_min = %range.min, subnet_max = %range.max, previous = ?previous, "flannel network configuration read from etcd");
        Ok(Self {
            registry,
            net_conf,
            range,
            node_name: node_name.to_owned(),
            attrs: LeaseAttrs::ipip(own_address.public_ip.unwrap_or(own_address.interface)),
            previous,
            renew_margin: opts.renew_margin,
            ttl: LEASE_TTL,
            retry: Retry::Default(Default::default()),
        })
    }

    pub fn net_conf(&self) -> &NetConf {
        &self.net_conf
    }

    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// Another lease length than flannel's 24 h (tests of the renewal).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Runs until the receiver of `tx` goes away.
    pub async fn run(mut self, tx: watch::Sender<Option<NodeSet>>, status: Arc<Status>) {
        let mut own = None;
        loop {
            match self.session(&mut own, &tx, &status).await {
                Ok(Ended::Closed) => return,
                Ok(Ended::Relist) => continue,
                Err(e) => {
                    let error = format!("{e:#}");
                    let wait = self.retry.next().expect("Retry never ends");
                    warn!(error, retry_in = ?wait, "etcd subnet manager failed, keeping the last node set");
                    status.source_failed(error);
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = tx.closed() => return,
                    }
                }
            }
        }
    }

    /// Leases a subnet, preferring the one we `had` (else the last subnet.env's), and
    /// tells when the subnet changed.
    async fn lease(&mut self, had: Option<Ipv4Net>) -> Result<OwnLease> {
        let own = self
            .registry
            .acquire(&self.range, &self.attrs, had.or(self.previous), self.ttl)
            .await?;
        if let Some(had) = had.filter(|h| *h != own.subnet) {
            warn!(old = %had, new = %own.subnet, "this node's subnet changed: pods of the old subnet lose their routes");
        }
        Ok(own)
    }

    /// Lists, leases when we hold no lease (or lost it), publishes and follows the
    /// watch until it fails. `own` is kept at the lease held, for the next session.
    async fn session(
        &mut self,
        own: &mut Option<OwnLease>,
        tx: &watch::Sender<Option<NodeSet>>,
        status: &Status,
    ) -> Result<Ended> {
        let (leases, revision) = self.registry.leases().await?;
        let mut peers: BTreeMap<Ipv4Net, Lease> =
            leases.into_iter().map(|l| (l.subnet, l)).collect();
        let held = own
            .as_ref()
            .filter(|o| peers.get(&o.subnet).is_some_and(|l| o.is(l, &self.attrs)));
        let mut current = match held {
            Some(current) => current.clone(),
            None => self.lease(own.as_ref().map(|o| o.subnet)).await?,
        };
        let mut stream = self.registry.watch(revision).await?;
        status.source_synced();
        self.retry.reset();
        loop {
            *own = Some(current.clone());
            if tx.is_closed() {
                return Ok(Ended::Closed);
            }
            self.publish(&peers, &current, tx);
            let renew_at = current.renew_at(self.renew_margin);
            let lost = tokio::select! {
                () = tx.closed() => return Ok(Ended::Closed),
                () = sleep_until(renew_at) => {
                    match self.registry.renew(&current, &self.attrs, self.ttl).await? {
                        Some(renewed) => {
                            info!(subnet = %renewed.subnet, "lease renewed");
                            current = renewed;
                            false
                        }
                        None => true,
                    }
                }
                message = stream.message() => {
                    let Some(resp) = message.context("the etcd watch failed")? else {
                        bail!("the etcd watch ended");
                    };
                    if resp.compact_revision() > 0 {
                        warn!(compacted = resp.compact_revision(), "the etcd watch fell behind compaction; listing again");
                        return Ok(Ended::Relist);
                    }
                    if resp.canceled() {
                        bail!("etcd canceled the watch: {}", resp.cancel_reason());
                    }
                    let mut lost = false;
                    for event in resp.events() {
                        match take_event(&mut peers, event) {
                            Ok(subnet) if subnet == current.subnet => {
                                lost = !peers.get(&subnet).is_some_and(|l| current.is(l, &self.attrs));
                            }
                            Ok(_) => {}
                            Err(e) => warn!(error = format!("{e:#}"), "ignoring a subnet key"),
                        }
                    }
                    lost
                }
            };
            if lost {
                warn!(subnet = %current.subnet, "this node's lease was deleted or taken over; leasing again");
                let had = current.subnet;
                current = self.lease(Some(had)).await?;
                status.lease_lost(current.subnet != had);
            }
        }
    }

    /// Publishes the node set when it changed.
    fn publish(
        &self,
        peers: &BTreeMap<Ipv4Net, Lease>,
        own: &OwnLease,
        tx: &watch::Sender<Option<NodeSet>>,
    ) {
        let set = node_set(&self.node_name, own.subnet, &self.attrs, peers.values());
        tx.send_if_modified(|current| {
            let differs = current.as_ref() != Some(&set);
            if differs {
                *current = Some(set);
            }
            differs
        });
    }
}

/// Takes a watch event into `peers`: a PUT adds or replaces the lease, a DELETE
/// removes it. Returns the subnet concerned.
fn take_event(peers: &mut BTreeMap<Ipv4Net, Lease>, event: &Event) -> Result<Ipv4Net> {
    let kv = event.kv().context("a watch event without its key")?;
    match event.event_type() {
        EventType::Put => {
            let lease = Lease::from_kv(kv)?;
            let subnet = lease.subnet;
            peers.insert(subnet, lease);
            Ok(subnet)
        }
        EventType::Delete => {
            let key = String::from_utf8_lossy(kv.key());
            let subnet =
                parse_subnet_key(&key).with_context(|| format!("{key:?} is not a subnet key"))?;
            peers.remove(&subnet);
            Ok(subnet)
        }
    }
}

/// This node under `node_name` with `own_subnet`, and every other lease as a node
/// named by its subnet key.
pub fn node_set<'a>(
    node_name: &str,
    own_subnet: Ipv4Net,
    own: &LeaseAttrs,
    leases: impl IntoIterator<Item = &'a Lease>,
) -> NodeSet {
    let this = NodeInfo {
        name: node_name.to_owned(),
        pod_cidr: own_subnet,
        tunnel_ip: own.public_ip,
        overwrite: None,
        foreign_backend: None,
    };
    let others = leases
        .into_iter()
        .filter(|l| l.subnet != own_subnet)
        .map(|l| NodeInfo {
            name: subnet_key(l.subnet),
            pod_cidr: l.subnet,
            tunnel_ip: l.attrs.public_ip,
            overwrite: None,
            // As flanneld, peers of another backend are not routed to (the agent
            // reports them as skipped).
            foreign_backend: (l.attrs.backend_type != BACKEND)
                .then(|| l.attrs.backend_type.clone()),
        });
    std::iter::once(this).chain(others).map(Ok).collect()
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn lease(subnet: &str, ip: &str, lease_id: i64) -> Lease {
        Lease {
            subnet: net(subnet),
            attrs: LeaseAttrs::ipip(ip.parse().unwrap()),
            lease_id,
        }
    }

    fn range(min: &str, max: &str) -> SubnetRange {
        SubnetRange {
            len: 24,
            min: min.parse().unwrap(),
            max: max.parse().unwrap(),
        }
    }

    #[test]
    fn subnet_keys_both_ways() {
        assert_eq!(subnet_key(net("10.244.1.0/24")), "10.244.1.0-24");
        for key in [
            "10.244.1.0-24",
            "/coreos.com/network/subnets/10.244.1.0-24",
            "/coreos.com/network/subnets/10.244.1.0-24&fc00:0:0:1::-64",
        ] {
            assert_eq!(parse_subnet_key(key), Some(net("10.244.1.0/24")), "{key}");
        }
        for bad in [
            "config",
            "10.244.1.0",
            "10.244.1.0-33",
            "10.244.1.5-24",
            "x-24",
            "10.244.1.0-",
        ] {
            assert_eq!(parse_subnet_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn lease_json_as_flannel_writes_and_reads_it() {
        let ours = LeaseAttrs::ipip(Ipv4Addr::new(172, 18, 0, 3));
        assert_eq!(
            serde_json::to_string(&ours).unwrap(),
            r#"{"PublicIP":"172.18.0.3","PublicIPv6":null,"BackendType":"ipip"}"#
        );
        // A vxlan node's lease, as flanneld writes it.
        let vxlan: LeaseAttrs = serde_json::from_str(
            r#"{"PublicIP":"172.18.0.4","PublicIPv6":"fc00::4","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#,
        )
        .unwrap();
        assert_eq!(vxlan.backend_type, "vxlan");
        assert_eq!(vxlan.public_ipv6, Some("fc00::4".parse().unwrap()));
        assert_eq!(vxlan.backend_data.as_ref().unwrap()["VNI"], 1);
        let back: LeaseAttrs =
            serde_json::from_str(&serde_json::to_string(&vxlan).unwrap()).unwrap();
        assert_eq!(back, vxlan);
        // The oldest flannel wrote only the address.
        let old: LeaseAttrs = serde_json::from_str(r#"{"PublicIP":"172.18.0.5"}"#).unwrap();
        assert_eq!(old.backend_type, "");
        assert!(serde_json::from_str::<LeaseAttrs>(r#"{"PublicIP":"x"}"#).is_err());
    }

    #[test]
    fn choose_in_flannels_order() {
        let r = range("10.244.1.0", "10.244.4.0");
        let leases = [lease("10.244.2.0/24", "192.0.2.2", 7)];
        // The previous subnet while free and in the range.
        assert_eq!(
            choose(&r, &leases, Some(net("10.244.3.0/24")), |_| unreachable!()).unwrap(),
            net("10.244.3.0/24")
        );
        // Taken, outside the range, or of another length: a free one at random.
        for previous in ["10.244.2.0/24", "10.244.9.0/24", "10.244.3.0/25"] {
            let mut offered = 0;
            let got = choose(&r, &leases, Some(net(previous)), |n| {
                offered = n;
                n - 1
            })
            .unwrap();
            assert_eq!((offered, got), (3, net("10.244.4.0/24")), "{previous}");
        }
        // A reservation or an overlapping key counts as taken.
        let leases = [
            lease("10.244.1.0/24", "192.0.2.1", 0),
            lease("10.244.2.0/23", "192.0.2.2", 7),
        ];
        assert_eq!(
            choose(&r, &leases, None, |_| 0).unwrap(),
            net("10.244.4.0/24")
        );
        let full = [lease("10.244.0.0/16", "192.0.2.1", 0)];
        let e = choose(&r, &full, None, |_| 0).unwrap_err().to_string();
        assert!(
            e.contains("out of subnets") && e.contains("10.244.1.0 to 10.244.4.0"),
            "{e}"
        );
    }

    #[test]
    fn picks_among_the_first_hundred() {
        let r = SubnetRange {
            len: 24,
            min: "10.0.1.0".parse().unwrap(),
            max: "10.255.255.0".parse().unwrap(),
        };
        let mut offered = 0;
        let last = choose(&r, &[], None, |n| {
            offered = n;
            n - 1
        })
        .unwrap();
        assert_eq!((offered, last), (100, net("10.0.100.0/24")));
        assert!((0..50).all(|_| random_below(7) < 7));
    }

    #[test]
    fn node_set_names_peers_by_subnet_and_this_node_by_name() {
        let attrs = LeaseAttrs::ipip("192.0.2.1".parse().unwrap());
        let mut vxlan = lease("10.244.3.0/24", "192.0.2.3", 9);
        vxlan.attrs.backend_type = "vxlan".into();
        let leases = [
            lease("10.244.1.0/24", "192.0.2.1", 5),
            lease("10.244.2.0/24", "192.0.2.2", 0),
            vxlan,
        ];
        let set = node_set("w1", net("10.244.1.0/24"), &attrs, &leases);
        let got: Vec<_> = set
            .nodes
            .iter()
            .map(|n| {
                (
                    n.name.as_str(),
                    n.pod_cidr.to_string(),
                    n.tunnel_ip.to_string(),
                    n.foreign_backend.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "10.244.2.0-24",
                    "10.244.2.0/24".into(),
                    "192.0.2.2".into(),
                    None
                ),
                (
                    "10.244.3.0-24",
                    "10.244.3.0/24".into(),
                    "192.0.2.3".into(),
                    Some("vxlan".into())
                ),
                ("w1", "10.244.1.0/24".into(), "192.0.2.1".into(), None),
            ]
        );
    }

    #[test]
    fn settings_are_checked() {
        let opts = |cert: Option<&str>,
                    key: Option<&str>,
                    user: Option<&str>,
                    pass: Option<&str>| EtcdOptions {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: DEFAULT_PREFIX.into(),
            keyfile: key.map(Into::into),
            certfile: cert.map(Into::into),
            cafile: None,
            username: user.map(Into::into),
            password: pass.map(Into::into),
            renew_margin: Duration::from_secs(3600),
            subnet_file: "/nonexistent".into(),
        };
        let e = |o: EtcdOptions| format!("{:#}", o.connect_options().expect_err("refused"));
        assert!(e(opts(Some("/c"), None, None, None)).contains("go together"));
        assert!(e(opts(Some("/nonexistent/c"), Some("/k"), None, None)).contains("/nonexistent/c"));
        let user = |o: EtcdOptions| {
            o.user()
                .map(|u| u.map(|(u, p)| (u.to_owned(), p.to_owned())))
        };
        assert!(
            format!("{:#}", user(opts(None, None, None, Some("p"))).unwrap_err())
                .contains("needs --etcd-username")
        );
        assert_eq!(
            user(opts(None, None, Some("u"), None)).unwrap(),
            Some(("u".into(), "".into()))
        );
        let o = opts(None, None, None, Some("secret"));
        assert!(!format!("{o:?}").contains("secret"));
        assert_eq!(o.urls(), ["http://127.0.0.1:2379"]);
        let mut o = opts(None, None, None, None);
        o.cafile = Some("/ca.pem".into());
        assert_eq!(o.urls(), ["https://127.0.0.1:2379"]);
    }
}
