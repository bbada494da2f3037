//! The agent's HTTP endpoints, served on the loopback of the test's own network
//! namespace: `/readyz` follows the agent's status, `/healthz` its run loop, and
//! `/metrics` reports what packets run through the programs did.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use overlay_agent::{
    datapath::conntrack::Collected,
    http::{self, Endpoints},
    metrics::{self, PerPeer},
    status::{Convergence, Status},
};
use overlay_common::{
    Hook, Reason,
    maps::{CONNTRACK_ENTRIES, MAX_NODES},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use super::{
    fixture::{Node, with_pinned_node},
    topology::{PEERS, REMOTES, W2, W3},
    traffic::{Exchange, exchange},
};

/// Runs `test` against the endpoints of a fresh `Status`, served on 127.0.0.1 of the
/// node's namespace. The runtime runs on the node's thread: the server must read the
/// pins in the thread's own mount namespace.
fn with_server(
    stall_after: Duration,
    test: impl AsyncFnOnce(&mut Node, SocketAddr, Arc<Status>) + Send + 'static,
) {
    with_server_of(stall_after, PerPeer::Auto, test);
}

/// [`with_server`] with the per-peer series as `per_peer` decides.
fn with_server_of(
    stall_after: Duration,
    per_peer: PerPeer,
    test: impl AsyncFnOnce(&mut Node, SocketAddr, Arc<Status>) + Send + 'static,
) {
    with_pinned_node(
        |_| {},
        move |node, pin_dir| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            runtime.block_on(async {
                let status = Arc::new(Status::default());
                let addr = serve(Arc::clone(&status), pin_dir, stall_after, per_peer).await;
                test(node, addr, status).await;
            });
        },
    );
}

async fn serve(
    status: Arc<Status>,
    pin_dir: &Path,
    stall_after: Duration,
    per_peer: PerPeer,
) -> SocketAddr {
    status.set_uplink("eth0");
    let pins = pin_dir.to_owned();
    let registry = metrics::registry(Arc::clone(&status), pins, "cni0".into(), per_peer);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
    let addr = listener.local_addr().unwrap();
    let endpoints = Endpoints {
        status,
        metrics: Arc::new(registry),
        stall_after,
    };
    tokio::spawn(http::serve(listener, endpoints));
    addr
}

struct Response {
    code: u16,
    headers: String,
    body: String,
}

/// A minimal HTTP/1.1 GET (the response ends with the connection).
async fn get(addr: SocketAddr, path: &str) -> Response {
    let mut stream = TcpStream::connect(addr).await.expect("connecting");
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.expect("reading");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let (status_line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    let code = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    Response {
        code,
        headers: headers.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

fn pass(ok: bool) -> Convergence {
    Convergence {
        at: Instant::now(),
        took: Duration::from_millis(3),
        ok,
        nodes: 5,
        remote_subnets: 4,
    }
}

#[test]
fn readyz_follows_the_status() {
    with_server(http::STALL_AFTER, async |_, addr, status| {
        let readyz = async || {
            let r = get(addr, "/readyz").await;
            (r.code, r.body)
        };
        let not_ready = |why: &str| (503, format!("not ready: {why}\n"));
        let ready = (200, "ready\n".to_owned());
        assert_eq!(readyz().await, not_ready("the node set is not known yet"));
        status.source_synced();
        assert_eq!(readyz().await, not_ready("not converged yet"));
        status.converged(pass(true));
        assert_eq!(readyz().await, ready);
        status.converged(pass(false));
        assert_eq!(readyz().await, not_ready("the last reconcile pass failed"));
        status.converged(pass(true));
        assert_eq!(readyz().await, ready);
        status.source_failed("etcd: connection refused".into());
        let (code, body) = readyz().await;
        assert_eq!(code, 200, "the datapath works on: {body}");
        assert!(
            body.starts_with("ready, degraded: the node source is failing")
                && body.ends_with(": etcd: connection refused\n"),
            "{body}"
        );
        status.source_synced();
        assert_eq!(readyz().await, ready);
        assert_eq!(get(addr, "/nope").await.code, 404);
    });
}

#[test]
fn healthz_follows_the_run_loop() {
    // Long enough that the first request comes while the process is still young even
    // under emulation (the kernel matrix's VM), where starting the server takes time.
    let stall = Duration::from_secs(2);
    with_server(stall, async move |_, addr, status| {
        // Starting: no heartbeat yet, but the process is young.
        assert_eq!(get(addr, "/healthz").await.code, 200);
        tokio::time::sleep(stall * 2).await;
        let r = get(addr, "/healthz").await;
        assert_eq!(r.code, 503, "{}", r.body);
        assert!(r.body.contains("has not started"), "{}", r.body);
        status.heartbeat();
        assert_eq!(get(addr, "/healthz").await.code, 200);
        // The loop stops turning: the server still answers, and says so.
        tokio::time::sleep(stall * 2).await;
        let r = get(addr, "/healthz").await;
        assert_eq!(r.code, 503, "{}", r.body);
        assert!(
            r.body.starts_with("the run loop last made progress"),
            "{}",
            r.body
        );
        status.heartbeat();
        assert_eq!(get(addr, "/healthz").await.code, 200);
    });
}

/// A series as Prometheus identifies it: name and sorted labels.
type Series = (String, BTreeMap<String, String>);

/// The samples of an OpenMetrics text exposition, whose label values must be single
/// words (no spaces, commas or quotes).
fn samples(body: &str) -> BTreeMap<Series, f64> {
    let mut out = BTreeMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').expect("NAME VALUE");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.strip_suffix('}').expect("closing brace")),
            None => (series, ""),
        };
        let labels = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').expect("KEY=VALUE");
                let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"'));
                let v = v.unwrap_or_else(|| panic!("a quoted label value in {line}"));
                assert!(
                    !v.contains(|c: char| c.is_whitespace() || c == '"'),
                    "label value {v:?} is not one word: {line}"
                );
                (k.to_owned(), v.to_owned())
            })
            .collect();
        let value = value.parse().expect("a number");
        assert!(
            out.insert((name.to_owned(), labels), value).is_none(),
            "duplicate series {line}"
        );
    }
    out
}

fn series(name: &str, labels: &[(&str, &str)]) -> Series {
    let labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    (name.to_owned(), labels)
}

fn outcome(hook: Hook, reason: Reason) -> Vec<(&'static str, &'static str)> {
    let interface = if hook == Hook::BridgeIngress {
        "cni0"
    } else {
        "eth0"
    };
    let kind = reason.kind().name();
    vec![
        ("hook", hook.name()),
        ("interface", interface),
        ("reason", reason.name()),
        ("kind", kind),
    ]
}

#[test]
fn metrics_report_packets_maps_and_the_agent() {
    with_server(http::STALL_AFTER, async |node, addr, status| {
        let Exchange {
            to_w2,
            from_w2,
            spoofed,
        } = exchange(node);

        // The agent: two passes (one failed), a source error, two sweeps.
        status.source_synced();
        status.converged(pass(false));
        status.converged(pass(true));
        status.source_failed("watch: connection refused".into());
        status.lease_lost(false);
        status.lease_lost(true);
        for (expired, orphans, remaining) in [(2, 1, 6), (1, 0, 4)] {
            status.swept(Collected {
                expired,
                orphans,
                remaining,
            });
        }

        let r = get(addr, "/metrics").await;
        assert_eq!(r.code, 200, "{}", r.body);
        assert!(
            r.headers
                .contains("content-type: application/openmetrics-text"),
            "{}",
            r.headers
        );
        assert!(r.body.ends_with("# EOF\n"));
        let got = samples(&r.body);
        let expect = |name: &str, labels: &[(&str, &str)], value: f64| {
            let key = series(name, labels);
            assert_eq!(got.get(&key), Some(&value), "{key:?} in\n{}", r.body);
        };

        let packets = "overlay_datapath_packets_total";
        let bytes = "overlay_datapath_bytes_total";
        let encapsulated = outcome(Hook::BridgeIngress, Reason::Encapsulated);
        expect(packets, &encapsulated, 1.0);
        expect(bytes, &encapsulated, to_w2.len() as f64);
        let decapsulated = outcome(Hook::UplinkIngress, Reason::DecapsulatedToBridge);
        expect(packets, &decapsulated, 1.0);
        expect(bytes, &decapsulated, from_w2.len() as f64);
        let dropped = outcome(Hook::UplinkIngress, Reason::DropUnknownPeer);
        expect(packets, &dropped, 1.0);
        expect(bytes, &dropped, spoofed.len() as f64);
        // Every outcome of every hook is exported, zero or not; nothing else counted.
        let counted: f64 = got
            .iter()
            .filter(|((name, _), _)| name == packets)
            .map(|(_, v)| v)
            .sum();
        assert_eq!(counted, 3.0);
        let outcomes = got.keys().filter(|(name, _)| name == packets).count();
        assert_eq!(outcomes, Hook::ALL.len() * Reason::ALL.len());

        expect(
            "overlay_nat_events_total",
            &[("event", "flow_created")],
            0.0,
        );
        let (w2, w3) = (W2.node.to_string(), W3.node.to_string());
        let rx_packets = "overlay_peer_received_packets_total";
        expect(rx_packets, &[("peer", &w2)], 1.0);
        expect(rx_packets, &[("peer", &w3)], 0.0);
        let rx_bytes = "overlay_peer_received_bytes_total";
        expect(rx_bytes, &[("peer", &w2)], from_w2.len() as f64);
        expect("overlay_peer_metrics_exported", &[], 1.0);
        let pods = [
            ("hook", Hook::PodIngress.name()),
            ("interface", "pod_veths"),
            ("reason", Reason::PassNotIpv4.name()),
            ("kind", Reason::PassNotIpv4.kind().name()),
        ];
        expect(packets, &pods, 0.0);

        let entries = "overlay_map_entries";
        let capacity = "overlay_map_max_entries";
        expect(entries, &[("map", "routes")], REMOTES.len() as f64);
        expect(entries, &[("map", "peers")], PEERS.len() as f64);
        expect(entries, &[("map", "conntrack")], 4.0);
        expect(capacity, &[("map", "routes")], MAX_NODES.into());
        expect(capacity, &[("map", "peers")], MAX_NODES.into());
        expect(capacity, &[("map", "conntrack")], CONNTRACK_ENTRIES.into());

        expect("overlay_datapath_up", &[], 1.0);
        expect("overlay_ready", &[], 1.0);
        expect("overlay_node_source_synced", &[], 1.0);
        expect("overlay_node_source_failing", &[], 1.0);
        expect("overlay_subnet_leases_lost_total", &[], 2.0);
        expect("overlay_subnet_changes_total", &[], 1.0);
        expect("overlay_node_source_errors_total", &[], 1.0);
        expect("overlay_nodes", &[], 5.0);
        expect("overlay_remote_subnets", &[], 4.0);
        expect("overlay_reconcile_passes_total", &[], 2.0);
        expect("overlay_reconcile_failures_total", &[], 1.0);
        expect("overlay_reconcile_duration_seconds_count", &[], 2.0);
        expect("overlay_reconcile_duration_seconds_sum", &[], 0.006);
        let le = "overlay_reconcile_duration_seconds_bucket";
        expect(le, &[("le", "0.001")], 0.0);
        expect(le, &[("le", "0.005")], 2.0);
        expect(le, &[("le", "+Inf")], 2.0);
        expect("overlay_conntrack_sweeps_total", &[], 2.0);
        for (cause, n) in [("expired", 3.0), ("orphan", 1.0)] {
            expect("overlay_conntrack_removed_total", &[("cause", cause)], n);
        }
        let version = env!("CARGO_PKG_VERSION");
        expect("overlay_build_info", &[("version", version)], 1.0);
    });
}

#[test]
fn per_peer_series_can_be_turned_off() {
    with_server_of(http::STALL_AFTER, PerPeer::Off, async |node, addr, _| {
        exchange(node);
        let r = get(addr, "/metrics").await;
        let got = samples(&r.body);
        let peer_series = got
            .keys()
            .filter(|(name, _)| name.starts_with("overlay_peer_received"))
            .count();
        assert_eq!(peer_series, 0, "{}", r.body);
        let exported = series("overlay_peer_metrics_exported", &[]);
        assert_eq!(got.get(&exported), Some(&0.0), "{}", r.body);
        // The peers are still counted, as the map's fill level.
        let peers = series("overlay_map_entries", &[("map", "peers")]);
        assert_eq!(got.get(&peers), Some(&(PEERS.len() as f64)));
    });
}
