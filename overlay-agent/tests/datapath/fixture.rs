//! A node of the overlay in a network namespace of its own, with the datapath loaded
//! and its maps filled, and the means to run one frame through a program.
//!
//! `BPF_PROG_TEST_RUN` resolves devices, routes and neighbours in the network namespace
//! of the calling thread, so every test runs on a thread of its own that first moves
//! into a fresh anonymous namespace (`unshare(CLONE_NEWNET)`). The namespace lives
//! exactly as long as that thread: nothing to name, nothing to clean up, and nothing
//! here can reach the machine's own interfaces.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    net::Ipv4Addr,
    panic,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use aya::{
    maps::{Array, HashMap, Map, MapData, MapInfo},
    programs::{ProgramError, TestRun as _, TestRunOptions},
};
use ipnet::Ipv4Net;
use overlay_agent::{
    datapath::{Datapath, LoadOptions, conntrack::monotonic_ns},
    host::{Host, uplink::Uplink},
    masq,
    nodes::{
        NodeInfo, NodeSet,
        address::{Authority, OwnAddress},
    },
    reconcile::{self, Desired, NodeSettings, Reconciler},
};
use overlay_common::{
    Counter, DatapathConfig, Hook, PeerStats, Reason, Route,
    config::{FLAG_FAST_PATH, FLAG_MASQUERADE},
    conntrack::{CtEntry, CtKey},
    counters::NatEvent,
    flows::{FlowKey, FlowState},
    maps::names,
};

use super::{expect, topology};

/// TC verdicts (`linux/pkt_cls.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub(super) enum Act {
    /// TC_ACT_UNSPEC (TCX_NEXT): on to the next filter, else the kernel's path.
    Next = -1,
    Shot = 2,
    Redirect = 7,
}

/// `struct __sk_buff` (`linux/bpf.h`), the context `BPF_PROG_TEST_RUN` takes for TC
/// programs. aya does not export it. The kernel accepts only a few fields as input
/// (mark, priority, ingress_ifindex, ifindex, cb, tstamp, wire_len, gso_segs, gso_size,
/// hwtstamp) and refuses any other non-zero byte with EINVAL.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct SkBuff {
    pub len: u32,
    pub pkt_type: u32,
    pub mark: u32,
    pub queue_mapping: u32,
    pub protocol: u32,
    pub vlan_present: u32,
    pub vlan_tci: u32,
    pub vlan_proto: u32,
    pub priority: u32,
    pub ingress_ifindex: u32,
    pub ifindex: u32,
    pub tc_index: u32,
    pub cb: [u32; 5],
    pub hash: u32,
    pub tc_classid: u32,
    pub data: u32,
    pub data_end: u32,
    pub napi_id: u32,
    pub family: u32,
    pub remote_ip4: u32,
    pub local_ip4: u32,
    pub remote_ip6: [u32; 4],
    pub local_ip6: [u32; 4],
    pub remote_port: u32,
    pub local_port: u32,
    pub data_meta: u32,
    pub flow_keys: u64,
    pub tstamp: u64,
    pub wire_len: u32,
    pub gso_segs: u32,
    pub sk: u64,
    pub gso_size: u32,
    pub tstamp_type: u8,
    pub _pad: [u8; 3],
    pub hwtstamp: u64,
}

// The layout must match the kernel's byte for byte, or the kernel reads our ifindex as
// some other field.
const _: () = {
    assert!(size_of::<SkBuff>() == 192);
    assert!(core::mem::offset_of!(SkBuff, ifindex) == 40);
    assert!(core::mem::offset_of!(SkBuff, data_end) == 80);
    assert!(core::mem::offset_of!(SkBuff, wire_len) == 160);
    assert!(core::mem::offset_of!(SkBuff, gso_segs) == 164);
    assert!(core::mem::offset_of!(SkBuff, gso_size) == 176);
    assert!(core::mem::offset_of!(SkBuff, hwtstamp) == 184);
};

impl SkBuff {
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: repr(C) plain integers, no padding bytes (checked above: every field
        // is naturally aligned and `_pad` fills the only hole).
        unsafe { core::slice::from_raw_parts((self as *const Self).cast(), size_of::<Self>()) }
    }

    fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above; every bit pattern is a valid SkBuff.
        unsafe { core::slice::from_raw_parts_mut((self as *mut Self).cast(), size_of::<Self>()) }
    }
}

/// What one program run did.
#[derive(Debug)]
pub(super) struct Outcome {
    pub rc: u32,
    /// The packet as the program left it.
    pub data: Vec<u8>,
    /// The context as the kernel wrote it back.
    pub ctx: SkBuff,
    /// Counter slots that changed, with their increments.
    pub counted: Vec<(Hook, Reason, Counter)>,
    /// PEERS entries that changed, with their increments.
    pub peers: BTreeMap<Ipv4Addr, PeerStats>,
    /// Masquerade events that happened, with their increments.
    pub events: BTreeMap<NatEvent, u64>,
}

/// This node: its namespace's devices and the loaded datapath.
pub(super) struct Node {
    pub dp: Datapath,
    /// ifindex of the uplink.
    pub eth0: u32,
    /// ifindex of the pod bridge.
    pub cni0: u32,
    /// ifindex of the pod's veth (the bridge's port).
    pub pod0: u32,
    /// What CONFIG holds.
    pub config: DatapathConfig,
}

/// Runs `test` on a thread of its own, in a fresh network namespace holding this node's
/// topology, with the datapath loaded and configured. Panics of `test` propagate.
pub(super) fn with_node(test: impl FnOnce(&mut Node) + Send + 'static) {
    with_node_setup(LoadOptions::default(), |_| {}, test);
}

/// [`with_node`] with masquerade on (flanneld `--ip-masq`).
pub(super) fn with_masquerading_node(test: impl FnOnce(&mut Node) + Send + 'static) {
    with_node_setup(LoadOptions::default(), masquerade, test);
}

/// Turns masquerade on in `config`.
pub(super) fn masquerade(config: &mut DatapathConfig) {
    config.flags |= FLAG_MASQUERADE;
}

/// Turns the fast path off in `config` (`--fast-path=off`).
pub(super) fn no_fast_path(config: &mut DatapathConfig) {
    config.flags &= !FLAG_FAST_PATH;
}

/// The ruleset generation the suite's nodes start with.
pub(super) const GENERATION: u32 = 1;

/// [`with_node`], with the datapath loaded with `options` and the configuration the agent
/// would write changed by `adjust`.
pub(super) fn with_node_setup(
    options: LoadOptions,
    adjust: impl FnOnce(&mut DatapathConfig) + Send + 'static,
    test: impl FnOnce(&mut Node) + Send + 'static,
) {
    in_new_netns(move || {
        build_topology();
        let mut node = Node::new(&options);
        node.configure(adjust);
        test(&mut node);
    });
}

/// [`with_node_setup`] with the maps pinned as the agent pins them, for whatever reads
/// the pins (inspection, metrics): under a bpffs that the agent's own code mounts, in a
/// mount namespace private to the test's thread. `test` gets the pin directory.
pub(super) fn with_pinned_node(
    adjust: impl FnOnce(&mut DatapathConfig) + Send + 'static,
    test: impl FnOnce(&mut Node, &Path) + Send + 'static,
) {
    in_new_netns(move || {
        private_mounts();
        let root = tempfile::tempdir().expect("a directory for the bpffs");
        let pin_dir = overlay_agent::bpffs::prepare(root.path()).expect("mounting a bpffs");
        let _unmount = Unmount(root.path().to_owned());
        build_topology();
        let mut node = Node::new(&LoadOptions {
            pin_dir: Some(pin_dir.clone()),
            ..LoadOptions::default()
        });
        node.configure(adjust);
        test(&mut node, &pin_dir);
    });
}

/// A sysfs showing this thread's network namespace (the machine's /sys shows the
/// machine's), in a private mount namespace; unmounted when the guard drops.
pub(super) fn namespace_sysfs() -> (tempfile::TempDir, impl Drop) {
    private_mounts();
    let dir = tempfile::tempdir().expect("a directory for sysfs");
    let path = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: every pointer is a NUL-terminated string that outlives the call, or null
    // for no data.
    let rc = unsafe {
        libc::mount(
            c"sysfs".as_ptr(),
            path.as_ptr(),
            c"sysfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "mounting sysfs: {}", std::io::Error::last_os_error());
    let unmount = Unmount(dir.path().to_owned());
    (dir, unmount)
}

/// Moves this thread into a mount namespace of its own whose mounts do not propagate
/// back to the machine's.
fn private_mounts() {
    // SAFETY: unshare(2) takes no pointer; CLONE_NEWNS (with CLONE_FS) affects only
    // this thread.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNS) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNS): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the strings are NUL-terminated literals; the other pointers are null,
    // which MS_PRIVATE allows.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    assert_eq!(
        rc,
        0,
        "making / private: {}",
        std::io::Error::last_os_error()
    );
}

/// Unmounts a directory on drop, so that its temporary directory can go too.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let path = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `path` is NUL-terminated and outlives the call, which only reads it.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Like [`with_node`], but with empty maps: the datapath as the agent finds it before
/// it has configured anything.
pub(super) fn with_unconfigured_node(test: impl FnOnce(&mut Node) + Send + 'static) {
    in_new_netns(move || {
        build_topology();
        test(&mut Node::new(&LoadOptions::default()));
    });
}

/// The monotonic clock (ns) once it reads more than `past`, so that a time `past`
/// ago exists: a freshly booted machine (the kernel matrix's VM) has run for seconds
/// only, and an earlier time would underflow.
pub(super) fn monotonic_ns_after(past: u64) -> u64 {
    loop {
        let now = monotonic_ns();
        if now > past {
            return now;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `f` on a thread of its own in a fresh, empty network namespace; panics propagate.
pub(super) fn in_new_netns(f: impl FnOnce() + Send + 'static) {
    let result = thread::spawn(move || {
        let before = netns_id();
        // SAFETY: unshare(2) takes no pointer; CLONE_NEWNET moves only this thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {} (the tests need root)",
            std::io::Error::last_os_error()
        );
        // Guard for the house rule: never configure the machine's own namespace.
        assert_ne!(
            netns_id(),
            before,
            "unshare did not move this thread to a new namespace"
        );
        f();
    })
    .join();
    if let Err(payload) = result {
        panic::resume_unwind(payload);
    }
}

fn netns_id() -> PathBuf {
    std::fs::read_link("/proc/thread-self/ns/net").expect("reading /proc/thread-self/ns/net")
}

/// The node w1 of the suite: an uplink with the underlay's neighbours and a bridge with
/// one pod neighbour. See `topology` for what each address is for.
fn build_topology() {
    use topology::*;
    let script = [
        "link set lo up".to_owned(),
        format!(
            "link add eth0 address {ETH0_MAC} type veth peer name eth0-peer address {UNDERLAY_PEER_MAC}"
        ),
        "link set eth0 up".to_owned(),
        "link set eth0-peer up".to_owned(),
        format!("address add {NODE_IP}/16 dev eth0"),
        format!(
            "neighbour add {} lladdr {} dev eth0 nud permanent",
            W2.node, W2_MAC
        ),
        format!("neighbour add {ROUTER} lladdr {ROUTER_MAC} dev eth0 nud permanent"),
        // A locked MTU: the FIB reports it (an unlocked route MTU would be ignored in
        // favour of the device's when forwarding).
        format!("route add {BEHIND_ROUTER} via {ROUTER} dev eth0 mtu lock {BEHIND_ROUTER_MTU}"),
        // The outside server, through the same router (OUTSIDE_2 and W5 have no route).
        format!("route add {OUTSIDE}/32 via {ROUTER} dev eth0"),
        format!("link add cni0 address {CNI0_MAC} type bridge"),
        format!(
            "link add pod0 address {POD_PORT_MAC} type veth peer name pod0-peer address {POD_MAC}"
        ),
        "link set pod0 master cni0".to_owned(),
        "link set pod0 up".to_owned(),
        "link set pod0-peer up".to_owned(),
        "link set cni0 up".to_owned(),
        format!("address add {GATEWAY}/{} dev cni0", POD_SUBNET.prefix_len()),
        format!("neighbour add {POD} lladdr {POD_MAC} dev cni0 nud permanent"),
    ];
    ip_batch(&script);
    // /proc/sys/net resolves to the namespace of the thread that opens it: this one's.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .expect("enabling forwarding in the test namespace");
}

/// Runs `ip -batch -` with `commands` in this thread's namespace.
fn ip_batch(commands: &[String]) {
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running ip (iproute2)");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(commands.join("\n").as_bytes())
        .expect("writing the ip batch");
    let out = child.wait_with_output().expect("waiting for ip");
    assert!(
        out.status.success(),
        "ip -batch failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        commands.join("\n")
    );
}

/// `cmd args` (`ip`, `tc`, `bridge`) in this thread's namespace; panics if it fails.
pub(super) fn run_tool(cmd: &str, args: &str) {
    let out = Command::new(cmd)
        .args(args.split_whitespace())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ip ARGS` in this thread's namespace: its output, or its error.
pub(super) fn ip(args: &str) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .expect("running ip");
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    if out.status.success() {
        Ok(text(out.stdout))
    } else {
        Err(text(out.stderr))
    }
}

/// Reconcile passes of the agent for this node (w1), on a runtime of their own,
/// writing subnet.env into a directory of their own.
pub(super) struct Passes {
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
}

impl Passes {
    pub(super) fn new() -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Self {
            rt,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// One pass among `nodes` (name, pod subnet, tunnel address), with the settings
    /// as `adjust` leaves them.
    pub(super) fn run(
        &self,
        node: &mut Node,
        nodes: &[(&str, Ipv4Net, Ipv4Addr)],
        adjust: impl FnOnce(&mut NodeSettings),
    ) {
        let set = NodeSet {
            nodes: nodes
                .iter()
                .map(|(name, pod_cidr, tunnel_ip)| NodeInfo {
                    name: (*name).into(),
                    pod_cidr: *pod_cidr,
                    tunnel_ip: *tunnel_ip,
                    overwrite: None,
                    foreign_backend: None,
                })
                .collect(),
            errors: vec![],
        };
        let own = OwnAddress {
            authority: Authority::NodeList,
            public_ip: None,
            interface: topology::NODE_IP,
        };
        let desired = Desired::compute(&set, "w1", &own, topology::CLUSTER).unwrap();
        let mut settings = NodeSettings {
            uplink: Uplink {
                name: "eth0".into(),
                ifindex: ifindex("eth0"),
                mtu: u32::from(topology::UPLINK_MTU),
                address: topology::NODE_IP,
            },
            bridge: "cni0".into(),
            network: topology::CLUSTER,
            subnet_file: self.dir.path().join("subnet.env"),
            masq: masq::Settings::default(),
            blackhole_route: false,
            direct_routing: false,
        };
        adjust(&mut settings);
        // The netlink connection's driver is a task of this runtime.
        self.block_on(async {
            Reconciler::new(Host::connect().unwrap(), settings)
                // The fixture's programs are attached by the test when it needs them.
                .apply(&mut node.dp, &desired, |_| Ok(()))
                .await
        })
        .unwrap();
    }

    pub(super) fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.rt.block_on(future)
    }
}

pub(super) fn ifindex(name: &str) -> u32 {
    overlay_agent::host::ifindex_by_name(name).unwrap_or_else(|| panic!("{name} missing"))
}

impl Node {
    fn new(options: &LoadOptions) -> Self {
        let dp = Datapath::load(options)
            .expect("loading the datapath (the verifier must accept all programs)");
        Self {
            dp,
            eth0: ifindex("eth0"),
            cni0: ifindex("cni0"),
            pod0: ifindex("pod0"),
            config: DatapathConfig::default(),
        }
    }

    /// Fills CONFIG (as the agent would, then changed by `adjust`), ROUTES and PEERS.
    fn configure(&mut self, adjust: impl FnOnce(&mut DatapathConfig)) {
        use topology::*;
        let mut config = DatapathConfig {
            node_ip: NODE_IP.octets(),
            pod_subnet: POD_SUBNET.network().octets(),
            pod_prefix_len: POD_SUBNET.prefix_len(),
            cluster_net: CLUSTER.network().octets(),
            cluster_prefix_len: CLUSTER.prefix_len(),
            masq_ip: NODE_IP.octets(),
            bridge_mac: CNI0_MAC.0,
            // As the agent runs by default: the fast path on, for flows admitted.
            flags: FLAG_FAST_PATH,
            ruleset_gen: GENERATION,
            ..DatapathConfig::default()
        };
        adjust(&mut config);
        self.dp.config.set(config).expect("writing CONFIG");
        self.config = config;
        self.route_directly(&[]);
        let peers: BTreeSet<Ipv4Addr> = PEERS.iter().copied().collect();
        self.dp.peers.sync(&peers).expect("writing PEERS");
    }

    /// Fills ROUTES with every remote as the agent does, those of `direct` reached
    /// directly (`Backend.DirectRouting`: their own addresses too), the others
    /// tunnelled.
    pub(super) fn route_directly(&mut self, direct: &[topology::Remote]) {
        let routes: BTreeMap<Ipv4Net, Route> = topology::REMOTES
            .iter()
            .flat_map(|r| {
                let direct = direct.iter().any(|d| d.node == r.node);
                reconcile::map_entries(r.subnet, r.node, direct)
            })
            .collect();
        self.dp.routes.sync(&routes).expect("writing ROUTES");
    }

    /// The device a hook's program sees packets on.
    pub(super) fn device(&self, hook: Hook) -> u32 {
        match hook {
            Hook::BridgeIngress | Hook::BridgeEgress => self.cni0,
            Hook::UplinkIngress | Hook::UplinkEgress => self.eth0,
            Hook::PodIngress => self.pod0,
        }
    }

    /// Writes CONFIG anew, as the agent does when the fast path switches or the host's
    /// ruleset changes.
    pub(super) fn reconfigure(&mut self, adjust: impl FnOnce(&mut DatapathConfig)) {
        adjust(&mut self.config);
        self.dp.config.set(self.config).expect("writing CONFIG");
    }

    /// Admits the flow of `frame` (its inner packet, if it is IPIP) to the fast path, as
    /// the agent does once the host forwarded it unchanged and tracks it established:
    /// seen under the current generation, admitted just now.
    pub(super) fn admit(&mut self, frame: &[u8]) {
        self.set_flow(
            flow_key(frame),
            FlowState {
                seen_gen: self.config.ruleset_gen,
                host_packets: 1,
                refreshed_ns: monotonic_ns(),
                admitted: 1,
                ..FlowState::default()
            },
        );
    }

    /// Writes `state` for `key` in FLOWS.
    /// Writes `key`'s entry through the agent's table, which sets an admitted
    /// direction's bit in the filter first, as the agent admits.
    pub(super) fn set_flow(&mut self, key: FlowKey, state: FlowState) {
        self.dp.flows.insert(&key, state).expect("writing FLOWS");
    }

    /// Whether `key`'s bit is set in the filter.
    pub(super) fn in_filter(&self, key: &FlowKey) -> bool {
        let (word, mask) = key.filter_bit();
        self.filter_map()
            .get(&word, 0)
            .expect("reading FLOW_FILTER")
            & mask
            != 0
    }

    fn filter_map(&self) -> Array<MapData, u64> {
        Array::try_from(self.map_of(Hook::BridgeIngress, names::FLOW_FILTER))
            .expect("FLOW_FILTER is an array")
    }

    /// The FLOWS entry of `key`, if any.
    pub(super) fn flow(&self, key: &FlowKey) -> Option<FlowState> {
        self.flows_map().get(key, 0).ok()
    }

    fn flows_map(&self) -> HashMap<MapData, FlowKey, FlowState> {
        HashMap::try_from(self.map_of(Hook::UplinkEgress, names::FLOWS))
            .expect("FLOWS is an LRU hash map")
    }

    /// Runs `hook`'s program on `frame` as if it arrived on the hook's device.
    pub(super) fn run(&self, hook: Hook, frame: &[u8]) -> Outcome {
        self.run_with(
            hook,
            frame,
            SkBuff {
                ifindex: self.device(hook),
                ..Default::default()
            },
        )
    }

    /// Runs `hook`'s program on `frame` with a context of the caller's choosing.
    pub(super) fn run_with(&self, hook: Hook, frame: &[u8], ctx: SkBuff) -> Outcome {
        self.try_run_with(hook, frame, ctx)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {}: {e:?}", hook.program()))
    }

    /// [`Node::run_with`], returning the kernel's refusal to run the program instead of
    /// panicking.
    pub(super) fn try_run_with(
        &self,
        hook: Hook,
        frame: &[u8],
        ctx: SkBuff,
    ) -> Result<Outcome, ProgramError> {
        let counters_before = self.counters();
        let peers_before = self.peer_stats();
        let events_before = self.nat_events();
        // Room for what encapsulation adds (20 bytes), with some to spare.
        let mut data = vec![0u8; frame.len() + 256];
        let mut ctx_out = SkBuff::default();
        let result = self.dp.program(hook).test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut data),
            ctx_in: Some(ctx.as_bytes()),
            ctx_out: Some(ctx_out.as_bytes_mut()),
            ..TestRunOptions::new()
        })?;
        data.truncate(result.data_size_out as usize);
        Ok(Outcome {
            rc: result.return_value,
            data,
            ctx: ctx_out,
            counted: counter_increments(&counters_before, &self.counters()),
            peers: peer_increments(&peers_before, &self.peer_stats()),
            events: event_increments(&events_before, &self.nat_events()),
        })
    }

    /// What one run of `hook`'s program on `frame` costs: the kernel runs it `repeat`
    /// times in a row (each on a fresh copy of the frame) and reports the mean time of
    /// one run, helpers included. Also returns the last run's return code.
    pub(super) fn cost(&self, hook: Hook, frame: &[u8], repeat: u32) -> (Duration, u32) {
        let ctx = SkBuff {
            ifindex: self.device(hook),
            ..Default::default()
        };
        let mut data = vec![0u8; frame.len() + 256];
        let result = self
            .dp
            .program(hook)
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut data),
                ctx_in: Some(ctx.as_bytes()),
                repeat,
                ..TestRunOptions::new()
            })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {}: {e:?}", hook.program()));
        (result.duration, result.return_value)
    }

    /// Runs `frame` through `hook` and checks the verdict: the return code, exactly one
    /// counter slot (`hook`, `reason`) up by one packet of `frame.len()` bytes, and the
    /// PEERS accounting (only decapsulated packets count, against their outer source).
    /// Returns the packet as the program left it.
    pub(super) fn expect(&self, hook: Hook, frame: &[u8], act: Act, reason: Reason) -> Vec<u8> {
        self.expect_outcome(hook, frame, act, reason).data
    }

    /// [`Node::expect`], returning all the run did.
    pub(super) fn expect_outcome(
        &self,
        hook: Hook,
        frame: &[u8],
        act: Act,
        reason: Reason,
    ) -> Outcome {
        let out = self.run(hook, frame);
        check_verdict(hook, frame, &out, act, reason);
        out
    }

    /// [`Node::expect`] for each of the named `cases`, which all end the same way.
    pub(super) fn expect_each<'a>(
        &self,
        hook: Hook,
        cases: impl IntoIterator<Item = (&'a str, Vec<u8>)>,
        act: Act,
        reason: Reason,
    ) {
        for (what, frame) in cases {
            // libtest shows this output only for a failing test: it names the case.
            eprintln!("case: {} {what}", hook.name());
            self.expect(hook, &frame, act, reason);
        }
    }

    /// [`Node::expect`] for packets the program must leave alone: TC_ACT_UNSPEC, and
    /// the bytes out are the bytes in.
    pub(super) fn expect_untouched(&self, hook: Hook, frame: &[u8], reason: Reason) {
        let out = self.expect(hook, frame, Act::Next, reason);
        assert_bytes_eq(&out, frame, "packet must pass untouched");
    }

    /// [`Node::expect`] for packets the program rewrites: the bytes out must be
    /// `expected`, byte for byte, and every checksum in them right.
    pub(super) fn expect_frame(
        &self,
        hook: Hook,
        frame: &[u8],
        act: Act,
        reason: Reason,
        expected: &[u8],
    ) {
        let out = self.expect(hook, frame, act, reason);
        assert_bytes_eq(&out, expected, &format!("{} output", hook.name()));
        expect::assert_checksums(&out);
    }

    fn counters(&self) -> Vec<(Hook, Reason, Counter)> {
        self.dp.counters.all().expect("reading COUNTERS")
    }

    pub(super) fn peer_stats(&self) -> BTreeMap<Ipv4Addr, PeerStats> {
        self.dp.peers.stats().expect("reading PEERS")
    }

    pub(super) fn nat_events(&self) -> BTreeMap<NatEvent, u64> {
        self.dp
            .nat_events
            .all()
            .expect("reading NAT_EVENTS")
            .into_iter()
            .collect()
    }

    /// The CONNTRACK map of this node's datapath, opened on its own (the agent's
    /// `Conntrack` only lists and collects).
    pub(super) fn conntrack_map(&self) -> HashMap<MapData, CtKey, CtEntry> {
        HashMap::try_from(self.map_of(Hook::UplinkEgress, names::CONNTRACK))
            .expect("CONNTRACK is a hash map")
    }

    /// Whether `uplink_ingress` has found the kernel refusing the flag that clears a
    /// decapsulated packet's tunnel GSO state (`DECAP_FLAG_REFUSED`, the programs'
    /// only zero-initialised global, so the whole of `.bss`).
    pub(super) fn decap_flag_refused(&self) -> bool {
        let bss: Array<MapData, u8> = Array::try_from(self.map_of(Hook::UplinkIngress, ".bss"))
            .expect(".bss is an array of one byte");
        bss.get(&0, 0).expect("reading .bss") != 0
    }

    /// The map `name` that `hook`'s program uses, opened on its own: found among that
    /// program's maps, so that the maps of tests running in parallel are never confused.
    fn map_of(&self, hook: Hook, name: &str) -> Map {
        let ids = self
            .dp
            .program(hook)
            .info()
            .expect("program info")
            .map_ids()
            .expect("map ids")
            .expect("the kernel reports map ids");
        let id = ids
            .into_iter()
            .find(|id| MapInfo::from_id(*id).expect("map info").name_as_str() == Some(name))
            .unwrap_or_else(|| panic!("{} uses no map {name}", hook.program()));
        Map::from_map_data(MapData::from_id(id).expect("opening the map by id")).expect(name)
    }

    /// Every entry of CONNTRACK.
    pub(super) fn conntrack_entries(&self) -> BTreeMap<CtKey, CtEntry> {
        self.conntrack_map()
            .iter()
            .map(|e| e.expect("reading CONNTRACK"))
            .collect()
    }
}

/// The flow key of a TCP or UDP frame (of its inner packet, if it is IPIP).
pub(super) fn flow_key(frame: &[u8]) -> FlowKey {
    const ETH: usize = 14;
    let ihl = |at: usize| usize::from(frame[at] & 0x0f) * 4;
    let mut l3 = ETH;
    if frame[l3 + 9] == 4 {
        l3 += ihl(l3);
    }
    let l4 = l3 + ihl(l3);
    let at = |range: std::ops::Range<usize>| frame[range].to_vec();
    FlowKey {
        src: at(l3 + 12..l3 + 16).try_into().unwrap(),
        dst: at(l3 + 16..l3 + 20).try_into().unwrap(),
        sport: at(l4..l4 + 2).try_into().unwrap(),
        dport: at(l4 + 2..l4 + 4).try_into().unwrap(),
        proto: frame[l3 + 9],
        _pad: [0; 3],
    }
}

/// Asserts what [`Node::expect`] promises about `out`.
pub(super) fn check_verdict(hook: Hook, frame: &[u8], out: &Outcome, act: Act, reason: Reason) {
    let want = vec![(
        hook,
        reason,
        Counter {
            packets: 1,
            bytes: frame.len() as u64,
        },
    )];
    assert_eq!(out.counted, want, "counter increments");
    assert_eq!(out.rc, act as u32, "return code: want {act:?} ({reason:?})");
    // A reply translated back after decapsulation (masquerade rule 6) came through the
    // tunnel too: IPIP to this node.
    let tunnelled =
        frame.get(23) == Some(&4) && frame.get(30..34) == Some(&topology::NODE_IP.octets()[..]);
    let decapsulated = hook == Hook::UplinkIngress
        && (matches!(
            reason,
            Reason::Decapsulated
                | Reason::DecapsulatedToBridge
                | Reason::DecapsulatedToStack
                | Reason::DecapsulatedToHost
                | Reason::DecapsulatedToNode
        ) || matches!(
            reason,
            Reason::Unmasqueraded | Reason::UnmasqueradedToPod | Reason::UnmasqueradedToBridge
        ) && tunnelled);
    let want_peers: BTreeMap<Ipv4Addr, PeerStats> = if decapsulated {
        // The outer source address, read straight from the frame we sent.
        let outer_src = Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]);
        BTreeMap::from([(
            outer_src,
            PeerStats {
                rx_packets: 1,
                rx_bytes: frame.len() as u64,
            },
        )])
    } else {
        BTreeMap::new()
    };
    assert_eq!(out.peers, want_peers, "PEERS increments");
}

fn counter_increments(
    before: &[(Hook, Reason, Counter)],
    after: &[(Hook, Reason, Counter)],
) -> Vec<(Hook, Reason, Counter)> {
    assert_eq!(before.len(), after.len());
    before
        .iter()
        .zip(after)
        .filter(|(b, a)| b.2 != a.2)
        .map(|(b, a)| {
            assert_eq!(
                (b.0, b.1),
                (a.0, a.1),
                "counter order changed between reads"
            );
            let diff = Counter {
                packets: a.2.packets - b.2.packets,
                bytes: a.2.bytes - b.2.bytes,
            };
            (a.0, a.1, diff)
        })
        .collect()
}

fn event_increments(
    before: &BTreeMap<NatEvent, u64>,
    after: &BTreeMap<NatEvent, u64>,
) -> BTreeMap<NatEvent, u64> {
    after
        .iter()
        .filter(|(e, a)| before[*e] != **a)
        .map(|(e, a)| (*e, a - before[e]))
        .collect()
}

fn peer_increments(
    before: &BTreeMap<Ipv4Addr, PeerStats>,
    after: &BTreeMap<Ipv4Addr, PeerStats>,
) -> BTreeMap<Ipv4Addr, PeerStats> {
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "PEERS keys changed"
    );
    after
        .iter()
        .filter(|(k, a)| before[*k] != **a)
        .map(|(k, a)| {
            let b = before[k];
            (
                *k,
                PeerStats {
                    rx_packets: a.rx_packets - b.rx_packets,
                    rx_bytes: a.rx_bytes - b.rx_bytes,
                },
            )
        })
        .collect()
}

/// Byte comparison that shows where two frames first differ.
#[track_caller]
pub(super) fn assert_bytes_eq(actual: &[u8], expected: &[u8], what: &str) {
    if actual == expected {
        return;
    }
    let first = actual
        .iter()
        .zip(expected)
        .position(|(a, e)| a != e)
        .unwrap_or(actual.len().min(expected.len()));
    panic!(
        "{what}: frames differ (lengths {} vs expected {}), first at byte {first}\n  actual:   {}\n  expected: {}",
        actual.len(),
        expected.len(),
        hex(actual),
        hex(expected)
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
