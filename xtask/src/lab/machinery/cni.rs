//! Pods as a Kubernetes node gets them: the runtime (containerd) creates a pod
//! sandbox's network namespace, then runs the node's CNI configuration on it. Here that
//! is flannel's, run through the real plugins of Debian's containernetworking-plugins
//! 1.1.1 (`loopback`, `bridge`, `host-local`, `portmap` in /usr/lib/cni), with the
//! delegate configuration flannel's own CNI plugin (not packaged) builds from the
//! node's subnet.env.
//!
//! What is imitated, from:
//!
//! - **The conflist**: `cni-conf.json` of flannel-io/flannel
//!   Documentation/kube-flannel.yml (v0.28.9, commit 5cd0d526), byte for byte: network
//!   `cbr0`, cniVersion 0.3.1, the `flannel` plugin with the delegate section
//!   `{hairpinMode, isDefaultGateway}`, then `portmap` with the capability
//!   `portMappings`.
//! - **flannel's plugin** (flannel-io/cni-plugin v1.9.1-flannel1, commit 4c87e5d4,
//!   flannel.go and flannel_linux.go; HEAD 092e6d2 changes only the build): `cmdAdd`
//!   refuses a delegate section with a `name`, an `ipam` or a type that is not a
//!   string, and hands on the plugin's `runtimeConfig`; `doCmdAdd` sets the delegate's
//!   `name` to the network's, `type` to `bridge`, `ipMasq` to !FLANNEL_IPMASQ (when
//!   flanneld does not masquerade, the bridge plugin does), `mtu` to FLANNEL_MTU (each
//!   only when the section lacks it), `isGateway` true for a bridge, `cniVersion` to
//!   the network's; `getDelegateIPAM` gives it the plugin's `ipam` (or none) with
//!   `type` host-local by default, `ranges` [[{subnet: FLANNEL_SUBNET}]] (the subnet's
//!   network: Go's `net.ParseCIDR`) and `routes`: the plugin's, then one per
//!   FLANNEL_NETWORK. `delegateAdd` stores the delegate's JSON (Go's map encoding:
//!   compact, keys sorted) under /var/lib/cni/flannel/<container id> and runs the
//!   delegate with its own environment (`invoke.DelegateAdd`), printing its result;
//!   DEL runs the delegate's DEL with what it stored (nothing stored: nothing to do)
//!   and removes it. [`delegate`] and `Runtime::flannel` do the same.
//! - **The runtime**: containerd's CRI (containerd/containerd
//!   internal/cri/server/sandbox_run.go at 00824d40: `cniNamespaceOpts`, `toCNILabels`,
//!   `toCNIPortMappings`) through containerd/go-cni (v1.1.13, commit 784f94e6: cni.go,
//!   namespace.go, namespace_opts.go, opts.go `WithLoNetwork`) and libcni
//!   (containernetworking/cni v1.3.0, commit a28faab9: libcni/api.go,
//!   pkg/invoke/args.go and raw_exec.go). Two networks: go-cni's `cni-loopback`
//!   (plugin `loopback`) on `lo`, then the node's conflist on `eth0`. ADD runs a list's
//!   plugins in order, each given the list's `name` and `cniVersion`, the previous
//!   plugin's result as `prevResult` and, under `runtimeConfig`, those of the runtime's
//!   capability arguments it declares (portmap: `portMappings`, spelled as go-cni's
//!   `PortMapping` struct marshals: `HostPort`, `ContainerPort`, `Protocol`, `HostIP`),
//!   then caches the result, the list and the arguments in
//!   /var/lib/cni/results/<network>-<container id>-<ifname>. DEL runs the plugins in
//!   reverse order with the same configuration and arguments (not the cached result:
//!   that came with cniVersion 0.4.0), and drops the cache. Every plugin gets
//!   CNI_COMMAND, CNI_CONTAINERID (64 hex digits, as containerd's ids), CNI_NETNS,
//!   CNI_IFNAME, CNI_PATH and CNI_ARGS `K8S_POD_NAMESPACE`, `K8S_POD_NAME`,
//!   `K8S_POD_INFRA_CONTAINER_ID`, `K8S_POD_UID`, `IgnoreUnknown=1`; a failing plugin
//!   prints a JSON error (`code`, `msg`, `details`) on stdout.
//!
//! Where the lab differs from a node, and why:
//!
//! - The plugins run in the node's network namespace (`ip netns exec`), where
//!   containerd runs in the host's; CNI_NETNS is the pod's `/run/netns/<namespace>`.
//! - Each runs in a mount namespace of its own where the node's directory of the lab
//!   (`<node dir>/var/lib`) is /var/lib, so that host-local's leases
//!   (`cni/networks/cbr0`), flannel's delegates (`cni/flannel`) and the runtime's cache
//!   (`cni/results`) are the node's and go with the lab, the configurations stay
//!   exactly flannel's (a `dataDir` would change them), and the machine's own /var/lib
//!   is never written (where /var/lib/cni does not exist there is nothing to bind over).
//! - The runtime adds its two networks one after the other (containerd's
//!   `setup_serially`).
//! - No CHECK: containerd's CRI never runs it (containerd/containerd#13332); go-cni's
//!   `Check` would stop at its loopback network, cniVersion 0.3.1, where libcni refuses
//!   CHECK (`ErrorCheckNotSupp`) before any plugin runs, and flannel's conflist is 0.3.1
//!   too; flannel's plugin's CHECK does nothing ("TODO: implement"); and Debian's
//!   portmap 1.1.1 fails it for every IPv4-only pod with a hostPort, looking for IPv6
//!   rules it never made (containernetworking/plugins#819). Conflists of 0.4.0 and
//!   later, which would take CHECK and the cached result on DEL, are refused.
//! - The runtime's other capability arguments (pod annotations, DNS, cgroup path) are
//!   not passed: no plugin of this chain declares them.
//! - flannel's step reads the subnet.env the lab hands it (the agent's, or what a
//!   baseline's flanneld would write), not /run/flannel/subnet.env.
//! - At teardown (and on a failed ADD, as containerd's cleanup does) the lab runs DEL
//!   from the runtime's cache on disk, which stands in for containerd's sandbox store:
//!   `cargo xtask lab down` is another process than the one that created the pods.

use std::{
    collections::BTreeMap,
    ffi::{CStr, CString},
    io::{Read as _, Write as _},
    os::unix::{
        ffi::OsStrExt as _,
        fs::{DirBuilderExt as _, OpenOptionsExt as _},
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};
use base64::Engine as _;
use ipnet::Ipv4Net;
use nix::{
    mount::{MsFlags, mount},
    sched::{CloneFlags, unshare},
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::{
    agents::{BRIDGE, SubnetEnv},
    netns,
    state::LabState,
    topology::{Node, Pod, Topology},
};

/// Where Debian installs the plugins (containerd's default is /opt/cni/bin).
const BIN_DIR: &str = "/usr/lib/cni";
/// The hostPort of every node's first pod (`<node>-pod1`), for TCP and for UDP: kubelet
/// hands a Pod's `ports[].hostPort` to the runtime, which hands it to portmap, which
/// DNATs the node's port to [`CONTAINER_PORT`] on the pod.
pub(crate) const HOST_PORT: u16 = 8081;
/// The pod's port behind [`HOST_PORT`].
pub(crate) const CONTAINER_PORT: u16 = 8080;

/// kube-flannel.yml's `cni-conf.json`, as flannel's install-cni container copies it to
/// /etc/cni/net.d/10-flannel.conflist.
const FLANNEL_CONFLIST: &str = r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "flannel",
      "delegate": {
        "hairpinMode": true,
        "isDefaultGateway": true
      }
    },
    {
      "type": "portmap",
      "capabilities": {
        "portMappings": true
      }
    }
  ]
}
"#;
/// go-cni's loopback network (`WithLoNetwork`).
const LOOPBACK_CONFLIST: &str = r#"{
"cniVersion": "0.3.1",
"name": "cni-loopback",
"plugins": [{
  "type": "loopback"
}]
}"#;
/// The plugin type the lab runs in-process, as flannel's plugin would run.
const FLANNEL: &str = "flannel";
/// The pod's interface (CRI's `defaultIfName`).
const POD_IFNAME: &str = "eth0";
const LOOPBACK_IFNAME: &str = "lo";
/// The Kubernetes namespace of the lab's pods.
const POD_NAMESPACE: &str = "default";
/// libcni's cache format (`CNICacheV1`).
const CACHE_KIND: &str = "cniCacheV1";

/// What ADD gave a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Attached {
    /// The pod's address, host-local's lease.
    pub address: Ipv4Net,
    /// The host end of its veth (`vethXXXXXXXX`, named by the bridge plugin).
    pub host_veth: String,
}

/// Creates `pod`'s network as containerd does for a sandbox whose namespace exists:
/// CNI ADD of the loopback network and of flannel's (configured from `env`). Every
/// node's first pod declares [`HOST_PORT`]. On failure, what was added is deleted
/// again before the error returns.
pub(crate) fn add(lab: &LabState, node: &Node, pod: &Pod, env: &SubnetEnv) -> Result<Attached> {
    let runtime = Runtime::new(
        &lab.netns(&node.name),
        state_dir(lab, node),
        FLANNEL_CONFLIST,
    )?;
    let sandbox = Sandbox::new(
        netns_path(&lab.netns(&pod.name)),
        &pod.name,
        port_mappings(&lab.topology, pod),
    )?;
    runtime
        .setup(&sandbox, env)
        .with_context(|| format!("CNI ADD for {} on {}", pod.name, node.name))
}

/// What [`del_all`] did.
#[derive(Debug, Default)]
pub(crate) struct Deleted {
    /// Pods whose networks were all deleted.
    pub pods: usize,
    /// What failed, one line per pod.
    pub failures: Vec<String>,
}

/// CNI DEL for every pod the lab's nodes attached (their runtime caches say which), as
/// containerd tears down a sandbox's network: its networks in order, each list's
/// plugins in reverse. Best effort: goes on after a failure.
pub(crate) fn del_all(lab: &LabState) -> Deleted {
    let mut deleted = Deleted::default();
    for node in &lab.topology.nodes {
        let found = Runtime::new(
            &lab.netns(&node.name),
            state_dir(lab, node),
            FLANNEL_CONFLIST,
        )
        .and_then(|runtime| {
            let sandboxes = runtime.cached_sandboxes()?;
            Ok((runtime, sandboxes))
        });
        let (runtime, sandboxes) = match found {
            Ok(found) => found,
            Err(e) => {
                deleted.failures.push(format!("{}: {e:#}", node.name));
                continue;
            }
        };
        for (pod, attachments) in sandboxes {
            let errors: Vec<String> = attachments
                .iter()
                .filter_map(|a| runtime.del_cached(a).err())
                .map(|e| format!("{e:#}"))
                .collect();
            if errors.is_empty() {
                deleted.pods += 1;
            } else {
                deleted
                    .failures
                    .push(format!("{pod} on {}: {}", node.name, errors.join("; ")));
            }
        }
    }
    deleted
}

/// The node's /var/lib as its plugins see it.
fn state_dir(lab: &LabState, node: &Node) -> PathBuf {
    lab.node_dir(&node.name).join("var/lib")
}

fn netns_path(ns: &str) -> String {
    format!("/run/netns/{ns}")
}

/// The hostPorts of `pod`: [`HOST_PORT`] over TCP and UDP on its node's first pod.
fn port_mappings(topology: &Topology, pod: &Pod) -> Vec<PortMapping> {
    let first = topology
        .node(&pod.node)
        .ok()
        .and_then(|node| topology.pods_of(node).into_iter().next());
    if first.as_ref() != Some(pod) {
        return Vec::new();
    }
    ["tcp", "udp"]
        .map(|protocol| PortMapping {
            host_port: HOST_PORT,
            container_port: CONTAINER_PORT,
            protocol: protocol.to_owned(),
            host_ip: String::new(),
        })
        .into()
}

/// go-cni's `PortMapping`: a struct without JSON tags, so its fields keep their Go
/// names (portmap's decoder matches them regardless of case).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct PortMapping {
    #[serde(rename = "HostPort")]
    host_port: u16,
    #[serde(rename = "ContainerPort")]
    container_port: u16,
    #[serde(rename = "Protocol")]
    protocol: String,
    #[serde(rename = "HostIP")]
    host_ip: String,
}

/// flannel's delegate for the flannel plugin configuration `conf` (as the runtime
/// passes it: with the network's `name` and `cniVersion`) and the node's `env`.
fn delegate(conf: &Map<String, Value>, env: &SubnetEnv) -> Result<Map<String, Value>> {
    let mut delegate = match conf.get("delegate") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(d)) => d.clone(),
        Some(other) => bail!("flannel's 'delegate' must be a dictionary, not {other}"),
    };
    if delegate.get("type").is_some_and(|t| !t.is_string()) {
        bail!("'delegate' dictionary, if present, must have (string) 'type' field");
    }
    if delegate.contains_key("name") {
        bail!("'delegate' dictionary must not have 'name' field, it'll be set by flannel");
    }
    if delegate.contains_key("ipam") {
        bail!("'delegate' dictionary must not have 'ipam' field, it'll be set by flannel");
    }
    if let Some(runtime) = conf.get("runtimeConfig") {
        delegate.insert("runtimeConfig".into(), runtime.clone());
    }
    let name = conf.get("name").and_then(Value::as_str).unwrap_or_default();
    delegate.insert("name".into(), name.into());
    delegate.entry("type").or_insert_with(|| "bridge".into());
    delegate
        .entry("ipMasq")
        .or_insert_with(|| (!env.ipmasq).into());
    delegate.entry("mtu").or_insert_with(|| env.mtu.into());
    if delegate["type"] == "bridge" {
        delegate.entry("isGateway").or_insert(true.into());
    }
    if let Some(version) = conf
        .get("cniVersion")
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty())
    {
        delegate.insert("cniVersion".into(), version.into());
    }
    let mut ipam = match conf.get("ipam") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(ipam)) => ipam.clone(),
        Some(other) => bail!("flannel's 'ipam' must be a dictionary, not {other}"),
    };
    ipam.entry("type").or_insert_with(|| "host-local".into());
    ipam.insert(
        "ranges".into(),
        json!([[{ "subnet": env.subnet.trunc().to_string() }]]),
    );
    let mut routes = match ipam.get("routes") {
        None => Vec::new(),
        Some(Value::Array(routes)) => routes.clone(),
        Some(other) => bail!("failed to parse ipam.routes: {other} is not a list"),
    };
    routes.push(json!({ "dst": env.network.to_string() }));
    ipam.insert("routes".into(), routes.into());
    delegate.insert("ipam".into(), ipam.into());
    Ok(delegate)
}

/// A node's runtime: its namespace, its /var/lib, the conflist it reads.
struct Runtime {
    ns: String,
    var_lib: PathBuf,
    /// The runtime's networks in order, with the interface each configures.
    networks: Vec<(ConfList, &'static str)>,
}

/// A parsed conflist (libcni's `NetworkConfigList`).
#[derive(Debug, Clone)]
struct ConfList {
    name: String,
    cni_version: String,
    plugins: Vec<Map<String, Value>>,
    /// The file as read: the runtime's cache keeps it.
    bytes: Vec<u8>,
}

impl ConfList {
    fn parse(bytes: &[u8]) -> Result<Self> {
        let list: Map<String, Value> =
            serde_json::from_slice(bytes).context("parsing a CNI conflist")?;
        let text = |key: &str| {
            list.get(key)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .with_context(|| format!("the conflist has no {key}"))
        };
        let plugins = list
            .get("plugins")
            .and_then(Value::as_array)
            .context("the conflist has no plugins")?
            .iter()
            .map(|p| {
                let plugin = p.as_object().context("a plugin that is not an object")?;
                ensure!(
                    plugin.get("type").is_some_and(Value::is_string),
                    "a plugin without a type: {p}"
                );
                Ok(plugin.clone())
            })
            .collect::<Result<_>>()?;
        let cni_version = text("cniVersion")?;
        let version: Vec<u32> = cni_version
            .split('.')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("cniVersion {cni_version:?}"))?;
        // What 0.4.0 added (CHECK, the cached result on DEL) is not imitated.
        ensure!(
            version < vec![0, 4, 0],
            "cniVersion {cni_version}: the lab's runtime runs conflists before 0.4.0 only"
        );
        Ok(Self {
            name: text("name")?,
            cni_version,
            plugins,
            bytes: bytes.to_vec(),
        })
    }
}

/// A plugin's type, as libcni names it in errors (`type="portmap"`).
fn describe(plugin: &Map<String, Value>) -> String {
    format!("type={}", plugin["type"])
}

/// A pod sandbox as the runtime knows it.
#[derive(Debug, Clone)]
struct Sandbox {
    id: String,
    uid: String,
    netns: String,
    pod: String,
    port_mappings: Vec<PortMapping>,
}

impl Sandbox {
    fn new(netns: String, pod: &str, port_mappings: Vec<PortMapping>) -> Result<Self> {
        let [id, uid] = [32, 16].map(random_bytes);
        Ok(Self {
            // containerd's `util.GenerateID`: 32 random bytes in hex.
            id: hex(&id?),
            uid: uuid(uid?),
            netns,
            pod: pod.to_owned(),
            port_mappings,
        })
    }

    /// What the runtime passes with every plugin of the network on `ifname`.
    fn runtime_conf(&self, ifname: &str) -> RuntimeConf {
        let args = [
            ("K8S_POD_NAMESPACE", POD_NAMESPACE),
            ("K8S_POD_NAME", &self.pod),
            ("K8S_POD_INFRA_CONTAINER_ID", &self.id),
            ("K8S_POD_UID", &self.uid),
            ("IgnoreUnknown", "1"),
        ]
        .map(|(k, v)| [k.to_owned(), v.to_owned()])
        .into();
        let mut capability_args = Map::new();
        if !self.port_mappings.is_empty() {
            capability_args.insert("portMappings".into(), json!(self.port_mappings));
        }
        RuntimeConf {
            container_id: self.id.clone(),
            netns: self.netns.clone(),
            ifname: ifname.to_owned(),
            args,
            capability_args,
        }
    }
}

fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut bytes = vec![0; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random (version 4) UUID, as the API server gives a Pod's `metadata.uid`.
fn uuid(mut bytes: Vec<u8>) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = hex(&bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// libcni's `RuntimeConf`: one invocation's arguments but the configuration.
#[derive(Debug, Clone, PartialEq)]
struct RuntimeConf {
    container_id: String,
    netns: String,
    ifname: String,
    args: Vec<[String; 2]>,
    capability_args: Map<String, Value>,
}

impl RuntimeConf {
    /// CNI_ARGS: `K=V` pairs joined by `;`.
    fn args_env(&self) -> String {
        self.args
            .iter()
            .map(|kv| kv.join("="))
            .collect::<Vec<_>>()
            .join(";")
    }

    fn pod(&self) -> &str {
        self.args
            .iter()
            .find(|[k, _]| k == "K8S_POD_NAME")
            .map_or("?", |[_, v]| v)
    }
}

/// libcni's cache of one network's attachment (`cachedInfo`, fields in its order).
#[derive(Debug, Serialize, Deserialize)]
struct Cached {
    kind: String,
    #[serde(rename = "containerId")]
    container_id: String,
    /// The conflist's bytes, base64 (Go's encoding of a `[]byte`).
    config: String,
    #[serde(rename = "ifName")]
    ifname: String,
    #[serde(rename = "networkName")]
    network: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    netns: String,
    #[serde(rename = "cniArgs", default, skip_serializing_if = "Vec::is_empty")]
    args: Vec<[String; 2]>,
    #[serde(
        rename = "capabilityArgs",
        default,
        skip_serializing_if = "Map::is_empty"
    )]
    capability_args: Map<String, Value>,
    result: Value,
}

impl Cached {
    fn runtime_conf(&self) -> RuntimeConf {
        RuntimeConf {
            container_id: self.container_id.clone(),
            netns: self.netns.clone(),
            ifname: self.ifname.clone(),
            args: self.args.clone(),
            capability_args: self.capability_args.clone(),
        }
    }
}

/// What a plugin is asked to do.
#[derive(Clone, Copy)]
enum Verb<'a> {
    /// flannel's step needs the node's subnet.env.
    Add(&'a SubnetEnv),
    Del,
}

impl Verb<'_> {
    fn name(self) -> &'static str {
        match self {
            Verb::Add(_) => "ADD",
            Verb::Del => "DEL",
        }
    }
}

impl Runtime {
    fn new(ns: &str, var_lib: PathBuf, conflist: &str) -> Result<Self> {
        Ok(Self {
            ns: ns.to_owned(),
            var_lib,
            networks: vec![
                (
                    ConfList::parse(LOOPBACK_CONFLIST.as_bytes())?,
                    LOOPBACK_IFNAME,
                ),
                (ConfList::parse(conflist.as_bytes())?, POD_IFNAME),
            ],
        })
    }

    fn cni_dir(&self) -> PathBuf {
        self.var_lib.join("cni")
    }

    fn cache_file(&self, network: &str, rt: &RuntimeConf) -> PathBuf {
        self.cni_dir()
            .join("results")
            .join(format!("{network}-{}-{}", rt.container_id, rt.ifname))
    }

    /// go-cni's `SetupSerially`: every network's ADD; on a failure, containerd's
    /// cleanup (DEL of the sandbox's networks) before the error returns.
    fn setup(&self, sandbox: &Sandbox, env: &SubnetEnv) -> Result<Attached> {
        let mut pod = None;
        for (list, ifname) in &self.networks {
            let rt = sandbox.runtime_conf(ifname);
            match self.add_list(list, &rt, env) {
                Ok(result) if *ifname == POD_IFNAME => pod = Some(attached(&result, &rt)?),
                Ok(_) => {}
                Err(e) => {
                    let cleanup: Vec<String> = self
                        .networks
                        .iter()
                        .filter_map(|(list, ifname)| {
                            self.del_list(list, &sandbox.runtime_conf(ifname)).err()
                        })
                        .map(|e| format!("{e:#}"))
                        .collect();
                    if cleanup.is_empty() {
                        return Err(e);
                    }
                    return Err(e.context(format!(
                        "and deleting what was added failed too: {}",
                        cleanup.join("; ")
                    )));
                }
            }
        }
        pod.context("the runtime has no network on eth0")
    }

    /// libcni's `AddNetworkList`.
    fn add_list(&self, list: &ConfList, rt: &RuntimeConf, env: &SubnetEnv) -> Result<Value> {
        let mut result = None;
        for plugin in &list.plugins {
            result = self
                .plugin(Verb::Add(env), list, plugin, result.as_ref(), rt)
                .with_context(|| format!("plugin {} failed (add)", describe(plugin)))?;
        }
        let result = result.with_context(|| format!("{} has no plugins", list.name))?;
        self.cache_add(&result, list, rt)
            .with_context(|| format!("failed to set network {:?} cached result", list.name))?;
        Ok(result)
    }

    /// libcni's `DelNetworkList`.
    fn del_list(&self, list: &ConfList, rt: &RuntimeConf) -> Result<()> {
        for plugin in list.plugins.iter().rev() {
            self.plugin(Verb::Del, list, plugin, None, rt)
                .with_context(|| format!("plugin {} failed (delete)", describe(plugin)))?;
        }
        // Nothing cached is fine: DEL may run more than once.
        let _ = std::fs::remove_file(self.cache_file(&list.name, rt));
        Ok(())
    }

    /// DEL of one cached attachment, with the list and arguments it was added with.
    fn del_cached(&self, cached: &Cached) -> Result<()> {
        let rt = cached.runtime_conf();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&cached.config)
            .context("decoding a cached conflist")?;
        let list = ConfList::parse(&bytes)?;
        self.del_list(&list, &rt)
            .with_context(|| format!("DEL of {} on {}", list.name, rt.ifname))
    }

    /// The cached attachments of every sandbox, by pod, each sandbox's in the order
    /// of the runtime's networks (go-cni's `Remove` goes through them in that order).
    fn cached_sandboxes(&self) -> Result<BTreeMap<String, Vec<Cached>>> {
        let dir = self.cni_dir().join("results");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(e).context(format!("listing {}", dir.display())),
        };
        let mut sandboxes: BTreeMap<String, Vec<Cached>> = BTreeMap::new();
        for entry in entries {
            let path = entry?.path();
            let text =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let cached: Cached = serde_json::from_slice(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            ensure!(
                cached.kind == CACHE_KIND,
                "{} is not a libcni cache ({:?})",
                path.display(),
                cached.kind
            );
            let pod = format!("{} ({})", cached.runtime_conf().pod(), cached.container_id);
            sandboxes.entry(pod).or_default().push(cached);
        }
        let position = |cached: &Cached| {
            self.networks
                .iter()
                .position(|(list, ifname)| list.name == cached.network && *ifname == cached.ifname)
        };
        for attachments in sandboxes.values_mut() {
            attachments.sort_by_key(position);
        }
        Ok(sandboxes)
    }

    /// libcni's `cacheAdd`.
    fn cache_add(&self, result: &Value, list: &ConfList, rt: &RuntimeConf) -> Result<()> {
        let cached = Cached {
            kind: CACHE_KIND.to_owned(),
            container_id: rt.container_id.clone(),
            config: base64::engine::general_purpose::STANDARD.encode(&list.bytes),
            ifname: rt.ifname.clone(),
            network: list.name.clone(),
            netns: rt.netns.clone(),
            args: rt.args.clone(),
            capability_args: rt.capability_args.clone(),
            result: result.clone(),
        };
        write_private(
            &self.cache_file(&list.name, rt),
            &serde_json::to_vec(&cached)?,
        )
    }

    /// One plugin of `list` (libcni's `buildOneConfig`, then the plugin): its result
    /// for ADD.
    fn plugin(
        &self,
        verb: Verb,
        list: &ConfList,
        plugin: &Map<String, Value>,
        prev: Option<&Value>,
        rt: &RuntimeConf,
    ) -> Result<Option<Value>> {
        let conf = plugin_conf(list, plugin, prev, rt);
        let kind = conf["type"].as_str().unwrap_or_default();
        if kind == FLANNEL {
            return self.flannel(verb, &conf, rt);
        }
        let out = self.exec(kind, verb.name(), &serde_json::to_vec(&conf)?, rt)?;
        match verb {
            Verb::Add(_) => Ok(Some(parse_result(kind, &out)?)),
            Verb::Del => Ok(None),
        }
    }

    /// What flannel's plugin does (see the module's documentation).
    fn flannel(
        &self,
        verb: Verb,
        conf: &Map<String, Value>,
        rt: &RuntimeConf,
    ) -> Result<Option<Value>> {
        let scratch = self.cni_dir().join("flannel").join(&rt.container_id);
        match verb {
            Verb::Add(env) => {
                let delegate = delegate(conf, env)?;
                let bytes = serde_json::to_vec(&delegate)?;
                write_private(&scratch, &bytes)?;
                let kind = delegate["type"].as_str().unwrap_or_default();
                let out = self
                    .exec(kind, "ADD", &bytes, rt)
                    .context("failed to delegate add")?;
                Ok(Some(parse_result(kind, &out)?))
            }
            Verb::Del => {
                let bytes = match std::fs::read(&scratch) {
                    Ok(bytes) => bytes,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(e).context(format!("reading {}", scratch.display())),
                };
                // flannel leaves a delegate it cannot parse to the node's next reboot.
                let Some(kind) = serde_json::from_slice::<Value>(&bytes)
                    .ok()
                    .and_then(|d| d["type"].as_str().map(str::to_owned))
                else {
                    return Ok(None);
                };
                self.exec(&kind, "DEL", &bytes, rt)?;
                let _ = std::fs::remove_file(&scratch);
                Ok(None)
            }
        }
    }

    /// Runs plugin `kind` with `command` in the node's namespace, `conf` on its stdin;
    /// its stdout, or its error.
    fn exec(&self, kind: &str, command: &str, conf: &[u8], rt: &RuntimeConf) -> Result<Vec<u8>> {
        let path = Path::new(BIN_DIR).join(kind);
        ensure!(
            path.exists(),
            "no CNI plugin {kind} in {BIN_DIR} (package containernetworking-plugins)"
        );
        std::fs::create_dir_all(self.cni_dir())
            .with_context(|| format!("creating {}", self.cni_dir().display()))?;
        let mut cmd = netns::command(&self.ns, &path);
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &rt.container_id)
            .env("CNI_NETNS", &rt.netns)
            .env("CNI_ARGS", rt.args_env())
            .env("CNI_IFNAME", &rt.ifname)
            .env("CNI_PATH", BIN_DIR)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        private_var_lib(&mut cmd, &self.var_lib)?;
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", path.display()))?;
        // Plugins read all of stdin before they write: no deadlock on the pipes.
        child
            .stdin
            .take()
            .context("the plugin's stdin")?
            .write_all(conf)?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("{}", plugin_error(kind, command, &out));
        }
        Ok(out.stdout)
    }
}

/// libcni's `buildOneConfig`: the plugin's configuration with the list's name and
/// version, the previous result, and the capability arguments it declares.
fn plugin_conf(
    list: &ConfList,
    plugin: &Map<String, Value>,
    prev: Option<&Value>,
    rt: &RuntimeConf,
) -> Map<String, Value> {
    let mut conf = plugin.clone();
    conf.insert("name".into(), list.name.clone().into());
    conf.insert("cniVersion".into(), list.cni_version.clone().into());
    if let Some(prev) = prev {
        conf.insert("prevResult".into(), prev.clone());
    }
    let runtime: Map<String, Value> = plugin
        .get("capabilities")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter(|(_, declared)| **declared == Value::Bool(true))
        .filter_map(|(capability, _)| {
            let arg = rt.capability_args.get(capability)?;
            Some((capability.clone(), arg.clone()))
        })
        .collect();
    if !runtime.is_empty() {
        conf.insert("runtimeConfig".into(), runtime.into());
    }
    conf
}

/// A failed plugin's error, from the JSON error object it prints on stdout (or from
/// its stderr when it printed none, as libcni's `pluginErr`).
fn plugin_error(kind: &str, command: &str, out: &Output) -> String {
    #[derive(Deserialize)]
    struct Error {
        code: u32,
        msg: String,
        #[serde(default)]
        details: String,
    }
    let stderr = lossy(&out.stderr);
    let mut message = format!("CNI plugin {kind} {command} failed ({}): ", out.status);
    match serde_json::from_slice::<Error>(&out.stdout) {
        Ok(e) => {
            message += &format!("{} (code {})", e.msg, e.code);
            if !e.details.is_empty() {
                message += &format!("; {}", e.details);
            }
            if !stderr.is_empty() {
                message += &format!("\n  stderr: {stderr}");
            }
        }
        Err(_) if out.stdout.is_empty() && stderr.is_empty() => message += "no error message",
        Err(_) if out.stdout.is_empty() => message += &stderr,
        Err(_) => message += &format!("{:?} {stderr}", lossy(&out.stdout)),
    }
    message
}

/// What plugin `kind` printed for ADD.
fn parse_result(kind: &str, out: &[u8]) -> Result<Value> {
    serde_json::from_slice(out)
        .with_context(|| format!("{kind} printed no result: {:?}", lossy(out)))
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_owned()
}

/// The pod's attachment from the eth0 network's result: its address on the interface
/// in its namespace, and the host end of its veth (the interface outside any
/// namespace that is not the bridge).
fn attached(result: &Value, rt: &RuntimeConf) -> Result<Attached> {
    let interfaces = result["interfaces"]
        .as_array()
        .with_context(|| format!("a result without interfaces: {result}"))?;
    let pod = interfaces
        .iter()
        .position(|i| i["sandbox"] == rt.netns.as_str() && i["name"] == rt.ifname.as_str())
        .with_context(|| format!("no {} in {} in the result: {result}", rt.ifname, rt.netns))?;
    let address = result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|ip| ip["interface"] == pod)
        .and_then(|ip| ip["address"].as_str())
        .with_context(|| format!("no address on {} in the result: {result}", rt.ifname))?;
    let host_veth = interfaces
        .iter()
        .filter(|i| i.get("sandbox").is_none() && i["name"] != BRIDGE)
        .find_map(|i| i["name"].as_str())
        .with_context(|| format!("no host veth in the result: {result}"))?;
    Ok(Attached {
        address: address
            .parse()
            .with_context(|| format!("the pod's address {address}"))?,
        host_veth: host_veth.to_owned(),
    })
}

/// Writes `path` as flannel and libcni write their state: directories 0700, the file
/// 0600.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("a state file without a directory")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()
        .with_context(|| format!("writing {}", path.display()))
}

/// Has `cmd` run in a mount namespace of its own where `var_lib` is /var/lib.
fn private_var_lib(cmd: &mut Command, var_lib: &Path) -> Result<()> {
    let source = CString::new(var_lib.as_os_str().as_bytes())?;
    let target: &'static CStr = c"/var/lib";
    // SAFETY: the closure runs in the child between fork and exec. It only makes
    // system calls (unshare, mount) on strings allocated before the fork, and returns
    // their errors without allocating.
    unsafe {
        cmd.pre_exec(move || {
            unshare(CloneFlags::CLONE_NEWNS)?;
            // Nothing mounted from here on may reach the machine's mount namespace.
            mount(
                None::<&CStr>,
                c"/",
                None::<&CStr>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&CStr>,
            )?;
            mount(
                Some(source.as_c_str()),
                target,
                None::<&CStr>,
                MsFlags::MS_BIND,
                None::<&CStr>,
            )?;
            Ok(())
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// w1's subnet.env as the agent writes it.
    fn env(ipmasq: bool) -> SubnetEnv {
        SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.1.1/24".parse().unwrap(),
            mtu: 1480,
            ipmasq,
        }
    }

    fn object(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    /// flannel's plugin configuration as libcni hands it over (`buildOneConfig`).
    fn flannel_conf() -> Map<String, Value> {
        let list = ConfList::parse(FLANNEL_CONFLIST.as_bytes()).unwrap();
        let rt = Sandbox::new("/run/netns/p".into(), "w1-pod1", Vec::new())
            .unwrap()
            .runtime_conf(POD_IFNAME);
        plugin_conf(&list, &list.plugins[0], None, &rt)
    }

    #[test]
    fn the_delegate_is_the_bytes_flannel_stores() {
        // What flannel-io/cni-plugin's doCmdAdd + getDelegateIPAM (flannel_linux.go
        // lines 34-119) build, json.Marshal'ed (sorted keys, compact) as delegateAdd
        // stores it (flannel.go lines 249-260): flanneld masquerades, so the bridge
        // does not.
        let stored = delegate(&flannel_conf(), &env(true)).unwrap();
        assert_eq!(
            String::from_utf8(serde_json::to_vec(&stored).unwrap()).unwrap(),
            r#"{"cniVersion":"0.3.1","hairpinMode":true,"ipMasq":false,"ipam":{"ranges":[[{"subnet":"10.244.1.0/24"}]],"routes":[{"dst":"10.244.0.0/16"}],"type":"host-local"},"isDefaultGateway":true,"isGateway":true,"mtu":1480,"name":"cbr0","type":"bridge"}"#
        );
        // flanneld without --ip-masq: the bridge plugin masquerades (lines 91-95).
        assert_eq!(
            delegate(&flannel_conf(), &env(false)).unwrap()["ipMasq"],
            true
        );
    }

    #[test]
    fn flannel_s_own_test_cases_come_out_the_same() {
        // flannel_linux_test.go, "uses dataDir for storing network configuration with
        // ipv4 stack" (lines 164-213): no delegate section, no cniVersion.
        let env = SubnetEnv {
            network: "10.1.0.0/16".parse().unwrap(),
            subnet: "10.1.17.1/24".parse().unwrap(),
            mtu: 1472,
            ipmasq: true,
        };
        let conf = object(json!({
            "name": "cni-flannel", "type": "flannel",
            "subnetFile": "/run/flannel/subnet.env", "dataDir": "/var/lib/cni/flannel",
        }));
        assert_eq!(
            Value::from(delegate(&conf, &env).unwrap()),
            json!({
                "ipMasq": false,
                "ipam": {
                    "routes": [{ "dst": "10.1.0.0/16" }],
                    "ranges": [[{ "subnet": "10.1.17.0/24" }]],
                    "type": "host-local"
                },
                "isGateway": true,
                "mtu": 1472,
                "name": "cni-flannel",
                "type": "bridge"
            })
        );
        // "configures Delegate IPAM accordingly with ipv4 stack" (lines 649-667): the
        // plugin's ipam keeps its type, its other keys and its routes, first.
        let mut conf = conf;
        conf.insert(
            "ipam".into(),
            json!({
                "type": "my-ipam",
                "unknown-param": "unknown-value",
                "routes": [{ "dst": "10.96.0.0/12" }, { "dst": "192.168.244.0/24", "gw": "10.1.17.20" }]
            }),
        );
        assert_eq!(
            delegate(&conf, &env).unwrap()["ipam"],
            json!({
                "type": "my-ipam",
                "unknown-param": "unknown-value",
                "routes": [
                    { "dst": "10.96.0.0/12" },
                    { "dst": "192.168.244.0/24", "gw": "10.1.17.20" },
                    { "dst": "10.1.0.0/16" }
                ],
                "ranges": [[{ "subnet": "10.1.17.0/24" }]]
            })
        );
    }

    #[test]
    fn the_delegate_section_keeps_what_it_sets_and_refuses_what_flannel_sets() {
        let mut conf = flannel_conf();
        conf.insert(
            "delegate".into(),
            json!({ "type": "ipvlan", "ipMasq": false, "mtu": 9000 }),
        );
        conf.insert("runtimeConfig".into(), json!({ "portMappings": [] }));
        let kept = delegate(&conf, &env(false)).unwrap();
        assert_eq!(kept["type"], "ipvlan");
        assert_eq!(kept["ipMasq"], false);
        assert_eq!(kept["mtu"], 9000);
        // isGateway only for a bridge (flannel_linux.go lines 102-106).
        assert!(!kept.contains_key("isGateway"));
        // cmdAdd hands the plugin's runtimeConfig on (flannel.go lines 304-306).
        assert_eq!(kept["runtimeConfig"], json!({ "portMappings": [] }));
        for (section, refused) in [
            (json!({ "name": "x" }), "must not have 'name'"),
            (json!({ "ipam": {} }), "must not have 'ipam'"),
            (json!({ "type": 7 }), "(string) 'type'"),
        ] {
            let mut conf = flannel_conf();
            conf.insert("delegate".into(), section);
            let err = delegate(&conf, &env(true)).unwrap_err();
            assert!(err.to_string().contains(refused), "{err}");
        }
    }

    #[test]
    fn the_conflist_is_kube_flannel_s() {
        // flannel-io/flannel Documentation/kube-flannel.yml, v0.28.9, lines 71-90.
        let list = ConfList::parse(FLANNEL_CONFLIST.as_bytes()).unwrap();
        assert_eq!(
            (list.name.as_str(), list.cni_version.as_str()),
            ("cbr0", "0.3.1")
        );
        assert_eq!(
            list.plugins
                .iter()
                .cloned()
                .map(Value::from)
                .collect::<Vec<_>>(),
            [
                json!({ "type": "flannel", "delegate": { "hairpinMode": true, "isDefaultGateway": true } }),
                json!({ "type": "portmap", "capabilities": { "portMappings": true } }),
            ]
        );
        let lo = ConfList::parse(LOOPBACK_CONFLIST.as_bytes()).unwrap();
        assert_eq!((lo.name.as_str(), lo.plugins.len()), ("cni-loopback", 1));
        // 0.4.0 brought what the runtime does not imitate.
        for version in ["0.4.0", "1.0.0"] {
            let err =
                ConfList::parse(FLANNEL_CONFLIST.replace("0.3.1", version).as_bytes()).unwrap_err();
            assert!(err.to_string().contains("before 0.4.0 only"), "{err}");
        }
    }

    #[test]
    fn each_plugin_gets_the_list_s_name_the_previous_result_and_its_capabilities() {
        let topology = Topology::kind();
        let pods = topology.pods_of(topology.node("w1").unwrap());
        assert_eq!(port_mappings(&topology, &pods[1]), []);
        let sandbox = Sandbox::new(
            "/run/netns/olab-ab12-w1-pod1".into(),
            &pods[0].name,
            port_mappings(&topology, &pods[0]),
        )
        .unwrap();
        let rt = sandbox.runtime_conf(POD_IFNAME);
        let list = ConfList::parse(FLANNEL_CONFLIST.as_bytes()).unwrap();
        let prev = json!({ "cniVersion": "0.3.1", "ips": [] });
        // portmap declares portMappings: it gets them as go-cni's struct marshals.
        assert_eq!(
            Value::from(plugin_conf(&list, &list.plugins[1], Some(&prev), &rt)),
            json!({
                "type": "portmap",
                "capabilities": { "portMappings": true },
                "name": "cbr0",
                "cniVersion": "0.3.1",
                "prevResult": prev,
                "runtimeConfig": { "portMappings": [
                    { "HostPort": 8081, "ContainerPort": 8080, "Protocol": "tcp", "HostIP": "" },
                    { "HostPort": 8081, "ContainerPort": 8080, "Protocol": "udp", "HostIP": "" }
                ] }
            })
        );
        // flannel declares nothing: no runtimeConfig.
        assert!(!plugin_conf(&list, &list.plugins[0], None, &rt).contains_key("runtimeConfig"));
        // CNI_ARGS as containerd's toCNILabels, joined as libcni's stringify.
        let id = &sandbox.id;
        assert_eq!(id.len(), 64);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(
            rt.args_env(),
            format!(
                "K8S_POD_NAMESPACE=default;K8S_POD_NAME=w1-pod1;K8S_POD_INFRA_CONTAINER_ID={id};K8S_POD_UID={};IgnoreUnknown=1",
                sandbox.uid
            )
        );
        assert_eq!(sandbox.uid.len(), 36);
        assert_eq!(&sandbox.uid[14..15], "4");
    }

    /// The bridge plugin's ADD result (0.3.1) for w1-pod1, as it printed it here.
    fn bridge_result() -> Value {
        json!({
            "cniVersion": "0.3.1",
            "interfaces": [
                { "name": "cni0", "mac": "3e:ea:2d:36:77:c4" },
                { "name": "veth15d8dc72", "mac": "ee:94:c8:a3:c2:3a" },
                { "name": "eth0", "mac": "fe:93:e5:10:2a:f2", "sandbox": "/run/netns/olab-ab12-w1-pod1" }
            ],
            "ips": [{ "version": "4", "interface": 2, "address": "10.244.1.2/24", "gateway": "10.244.1.1" }],
            "routes": [{ "dst": "10.244.0.0/16" }, { "dst": "0.0.0.0/0", "gw": "10.244.1.1" }],
            "dns": {}
        })
    }

    #[test]
    fn the_pod_s_address_and_host_veth_come_from_the_result() {
        let rt = Sandbox::new("/run/netns/olab-ab12-w1-pod1".into(), "w1-pod1", Vec::new())
            .unwrap()
            .runtime_conf(POD_IFNAME);
        assert_eq!(
            attached(&bridge_result(), &rt).unwrap(),
            Attached {
                address: "10.244.1.2/24".parse().unwrap(),
                host_veth: "veth15d8dc72".into()
            }
        );
        let mut elsewhere = rt.clone();
        elsewhere.netns = "/run/netns/other".into();
        assert!(attached(&bridge_result(), &elsewhere).is_err());
    }

    #[test]
    fn a_plugin_s_error_is_its_message() {
        use std::os::unix::process::ExitStatusExt as _;
        let out = |stdout: &str, stderr: &str| Output {
            status: std::process::ExitStatus::from_raw(1 << 8),
            stdout: stdout.as_bytes().to_vec(),
            stderr: stderr.as_bytes().to_vec(),
        };
        assert_eq!(
            plugin_error(
                "bridge",
                "ADD",
                &out(
                    r#"{"code": 999, "msg": "failed to open netns \"/run/netns/x\"", "details": "no such file"}"#,
                    ""
                )
            ),
            "CNI plugin bridge ADD failed (exit status: 1): failed to open netns \"/run/netns/x\" (code 999); no such file"
        );
        assert_eq!(
            plugin_error(
                "portmap",
                "DEL",
                &out("", "Cannot open network namespace \"x\"\n")
            ),
            "CNI plugin portmap DEL failed (exit status: 1): Cannot open network namespace \"x\""
        );
    }

    #[test]
    fn the_cache_is_libcni_s() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = Runtime::new("olab-t-node", dir.path().into(), FLANNEL_CONFLIST).unwrap();
        let sandbox =
            Sandbox::new("/run/netns/olab-ab12-w1-pod1".into(), "w1-pod1", Vec::new()).unwrap();
        let rt = sandbox.runtime_conf(POD_IFNAME);
        let list = &runtime.networks[1].0;
        runtime.cache_add(&bridge_result(), list, &rt).unwrap();
        let path = dir
            .path()
            .join(format!("cni/results/cbr0-{}-eth0", sandbox.id));
        let cached: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(cached["kind"], "cniCacheV1");
        assert_eq!(cached["containerId"], sandbox.id.as_str());
        assert_eq!(cached["ifName"], "eth0");
        assert_eq!(cached["networkName"], "cbr0");
        assert_eq!(cached["netns"], "/run/netns/olab-ab12-w1-pod1");
        assert_eq!(cached["cniArgs"][1], json!(["K8S_POD_NAME", "w1-pod1"]));
        assert_eq!(cached["result"], bridge_result());
        // Go encodes a []byte in base64.
        let config = base64::engine::general_purpose::STANDARD
            .decode(cached["config"].as_str().unwrap())
            .unwrap();
        assert_eq!(config, FLANNEL_CONFLIST.as_bytes());
        let sandboxes = runtime.cached_sandboxes().unwrap();
        let [(pod, attachments)] = sandboxes.iter().collect::<Vec<_>>()[..] else {
            panic!("{sandboxes:?}");
        };
        assert_eq!(pod, &format!("w1-pod1 ({})", sandbox.id));
        assert_eq!(attachments[0].runtime_conf(), rt);
    }

    /// Namespaces of a test, deleted when dropped.
    struct Namespaces(Vec<String>);

    impl Drop for Namespaces {
        fn drop(&mut self) {
            for ns in &self.0 {
                if let Err(e) = netns::delete(ns) {
                    eprintln!("{e:#}");
                }
            }
        }
    }

    fn nat_rules(ns: &str) -> String {
        netns::run(netns::command(ns, "iptables").args(["-w", "-t", "nat", "-S"])).unwrap()
    }

    /// Files left under `dir`, relative to it.
    fn files(dir: &Path) -> Vec<String> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                found.extend(
                    files(&path)
                        .into_iter()
                        .map(|f| format!("{}/{f}", path.file_name().unwrap().to_string_lossy())),
                );
            } else {
                found.push(path.file_name().unwrap().to_string_lossy().into_owned());
            }
        }
        found.sort();
        found
    }

    #[test]
    fn the_real_plugins_add_and_delete_pods_and_leave_nothing() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: the plugins need root");
            return;
        }
        let prefix = format!("olab-t{}-", hex(&random_bytes(2).unwrap()));
        let names = ["node", "pod1", "pod2"].map(|h| format!("{prefix}{h}"));
        let _namespaces = Namespaces(names.to_vec());
        for ns in &names {
            netns::add(ns).unwrap();
        }
        let [node, pod1, pod2] = &names;
        let dir = tempfile::tempdir().unwrap();
        let topology = Topology::kind();
        let pods = topology.pods_of(topology.node("w1").unwrap());
        let runtime = Runtime::new(node, dir.path().into(), FLANNEL_CONFLIST).unwrap();
        let sandboxes = [(pod1, &pods[0]), (pod2, &pods[1])].map(|(ns, pod)| {
            Sandbox::new(netns_path(ns), &pod.name, port_mappings(&topology, pod)).unwrap()
        });

        // flanneld without --ip-masq: the bridge plugin masquerades each pod.
        for (sandbox, pod) in sandboxes.iter().zip(&pods) {
            let attached = runtime.setup(sandbox, &env(false)).unwrap();
            assert_eq!(attached.address.addr(), pod.address);
            let veth = netns::ip_json(node, &["link", "show", "dev", &attached.host_veth]).unwrap();
            assert_eq!(veth[0]["master"], BRIDGE);
        }
        let nat = nat_rules(node);
        assert!(
            nat.contains("--dport 8081 -j DNAT --to-destination 10.244.1.2:8080"),
            "{nat}"
        );
        for sandbox in &sandboxes {
            let chain = nat
                .lines()
                .find(|l| l.starts_with("-A POSTROUTING") && l.contains(&sandbox.id));
            assert!(chain.is_some(), "no masquerade for {}:\n{nat}", sandbox.pod);
        }
        assert_eq!(
            std::fs::read(dir.path().join("cni/flannel").join(&sandboxes[0].id)).unwrap(),
            serde_json::to_vec(&delegate(&flannel_conf(), &env(false)).unwrap()).unwrap()
        );

        // DEL from the cache, as the teardown does; then everything is gone, and a
        // second DEL has nothing to do.
        for attachments in runtime.cached_sandboxes().unwrap().values() {
            for cached in attachments {
                runtime.del_cached(cached).unwrap();
            }
        }
        let veths = netns::ip_json(node, &["link", "show", "type", "veth"]).unwrap();
        assert_eq!(veths, json!([]));
        let nat = nat_rules(node);
        assert!(!nat.contains("10.244.1."), "{nat}");
        assert_eq!(
            files(dir.path()),
            [
                "cni/networks/cbr0/last_reserved_ip.0",
                "cni/networks/cbr0/lock"
            ]
        );
        for sandbox in &sandboxes {
            for (list, ifname) in &runtime.networks {
                runtime
                    .del_list(list, &sandbox.runtime_conf(ifname))
                    .unwrap();
            }
        }

        // A failed ADD says which plugin failed and why, and leaves nothing behind.
        let gone =
            Sandbox::new(netns_path(&format!("{prefix}gone")), "w1-pod3", Vec::new()).unwrap();
        let err = format!("{:#}", runtime.setup(&gone, &env(true)).unwrap_err());
        assert!(
            err.contains("plugin type=\"loopback\" failed (add)")
                && err.contains("no such file or directory"),
            "{err}"
        );
        assert_eq!(
            files(dir.path()),
            [
                "cni/networks/cbr0/last_reserved_ip.0",
                "cni/networks/cbr0/lock"
            ]
        );
    }
}
