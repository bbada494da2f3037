//! `--ip-blackhole-route`: the blackhole route for this node's pod subnet that a
//! reconcile pass installs, as the kernel then routes with it (the pod bridge's route
//! first, the blackhole for what no other route takes), its removal when the flag goes,
//! and cleanup's.

use overlay_agent::host::Host;

use super::{
    fixture::{Node, Passes, ip, run_tool, with_node},
    topology::{NODE_IP, POD, POD_SUBNET, POD_UNRESOLVED, W2},
};

/// One pass for this node (w1, POD_SUBNET) and w2, with the flag `on`.
fn pass(passes: &Passes, node: &mut Node, on: bool) {
    let nodes = [("w1", POD_SUBNET, NODE_IP), ("w2", W2.subnet, W2.node)];
    passes.run(node, &nodes, |s| s.blackhole_route = on);
}

#[test]
fn the_own_subnet_is_blackholed_behind_the_bridge_and_removed_with_the_flag() {
    with_node(|node| {
        let passes = Passes::new();
        let blackholes = || ip("-4 route show table main proto 191 type blackhole").unwrap();

        pass(&passes, node, false);
        assert_eq!(blackholes(), "");

        pass(&passes, node, true);
        assert_eq!(
            blackholes(),
            format!("blackhole {POD_SUBNET} metric 4294967295 \n")
        );
        // Idempotent: a second pass leaves the one route.
        pass(&passes, node, true);
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
        pass(&passes, node, false);
        assert_eq!(blackholes(), "");

        // `overlay-agent cleanup` removes it with the agent's other routes.
        pass(&passes, node, true);
        let overlay_routes = ip("-4 route show proto 191").unwrap().lines().count();
        assert!(overlay_routes >= 2, "w2's route and the blackhole");
        let removed = passes
            .block_on(async { Host::connect().unwrap().remove_overlay_routes().await })
            .unwrap();
        assert_eq!(removed, overlay_routes);
        assert_eq!(ip("-4 route show proto 191").unwrap(), "");
    });
}
