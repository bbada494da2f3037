//! `--ip-blackhole-route`: the blackhole route for this node's pod subnet that a
//! reconcile pass installs, as the kernel then routes with it (the pod bridge's route
//! first, the blackhole for what no other route takes), its removal when the flag goes,
//! and cleanup's.

use overlay_agent::host::Host;

use super::{
    fixture::{Node, ip, reconcile, run_tool, with_node},
    topology::{NODE_IP, POD, POD_SUBNET, POD_UNRESOLVED, W2},
};

/// One pass for this node (w1, POD_SUBNET) and w2, with the flag `on`.
async fn pass(node: &mut Node, on: bool, subnet_file: &std::path::Path) {
    let nodes = [("w1", POD_SUBNET, NODE_IP), ("w2", W2.subnet, W2.node)];
    reconcile(node, &nodes, subnet_file, |s| s.blackhole_route = on).await;
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
