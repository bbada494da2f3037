//! `--ip-blackhole-route`: the blackhole route for this node's pod subnet that a
//! reconcile pass installs, as the kernel then routes with it (the pod bridge's route
//! first, the blackhole for what no other route takes), its removal when the flag goes,
//! and cleanup's.

use std::process::Command;

use overlay_agent::{
    host::Host,
    masq,
    nodes::{
        NodeInfo, NodeSet,
        address::{Authority, OwnAddress},
    },
    reconcile::{Desired, NodeSettings, Reconciler, Uplink},
};

use super::{
    fixture::{Node, ifindex, run_tool, with_node},
    topology::{CLUSTER, NODE_IP, POD, POD_SUBNET, POD_UNRESOLVED, UPLINK_MTU, W2},
};

/// `ip ARGS` in this thread's namespace: its output, or its error.
fn ip(args: &str) -> Result<String, String> {
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

/// One pass for this node (w1, POD_SUBNET) and w2, with the flag `on`.
async fn pass(node: &mut Node, on: bool, subnet_file: &std::path::Path) {
    let nodes = [("w1", POD_SUBNET, NODE_IP), ("w2", W2.subnet, W2.node)];
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
        interface: NODE_IP,
    };
    let desired = Desired::compute(&set, "w1", &own, CLUSTER).unwrap();
    let settings = NodeSettings {
        uplink: Uplink {
            name: "eth0".into(),
            ifindex: ifindex("eth0"),
            mtu: u32::from(UPLINK_MTU),
            address: NODE_IP,
        },
        bridge: "cni0".into(),
        network: CLUSTER,
        subnet_file: subnet_file.to_owned(),
        masq: masq::Settings::default(),
        blackhole_route: on,
    };
    Reconciler::new(Host::connect().unwrap(), settings)
        .apply(&mut node.dp, &desired)
        .await
        .unwrap();
}

#[test]
fn the_own_subnet_is_blackholed_behind_the_bridge_and_removed_with_the_flag() {
    with_node(|node| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let subnet_file = dir.path().join("subnet.env");
        let blackholes = || ip("-4 route show table main proto 191 type blackhole").unwrap();

        rt.block_on(pass(node, false, &subnet_file));
        assert_eq!(blackholes(), "");

        rt.block_on(pass(node, true, &subnet_file));
        assert_eq!(
            blackholes(),
            format!("blackhole {POD_SUBNET} metric 4294967295 \n")
        );
        // Idempotent: a second pass leaves the one route.
        rt.block_on(pass(node, true, &subnet_file));
        assert_eq!(blackholes().lines().count(), 1);
        // The bridge's route keeps the subnet's pods; without it the blackhole takes
        // their traffic, which would otherwise follow the default route out.
        let route = ip(&format!("-4 route get {POD}")).unwrap();
        assert!(route.contains("dev cni0"), "{route}");
        run_tool("ip", "route del 10.244.1.0/24 dev cni0 proto kernel");
        let refused = ip(&format!("-4 route get {POD_UNRESOLVED}")).unwrap_err();
        assert!(refused.contains("Invalid argument"), "{refused}");
        run_tool(
            "ip",
            "route add 10.244.1.0/24 dev cni0 proto kernel scope link src 10.244.1.1",
        );

        // The flag gone: the route goes at the next pass.
        rt.block_on(pass(node, false, &subnet_file));
        assert_eq!(blackholes(), "");

        // `overlay-agent cleanup` removes it with the agent's other routes.
        rt.block_on(pass(node, true, &subnet_file));
        let overlay_routes = ip("-4 route show proto 191").unwrap().lines().count();
        assert!(overlay_routes >= 2, "w2's route and the blackhole");
        let removed = rt
            .block_on(async { Host::connect().unwrap().remove_overlay_routes().await })
            .unwrap();
        assert_eq!(removed, overlay_routes);
        assert_eq!(ip("-4 route show proto 191").unwrap(), "");
    });
}
