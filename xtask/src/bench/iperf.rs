//! TCP throughput with iperf3: a one-off server in the destination pod, the client in
//! the source pod, JSON out.

use std::{
    net::Ipv4Addr,
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::lab::netns;

/// The server's port (each pod has its own namespace: no clash between labs).
const PORT: &str = "5201";
const STARTS: usize = 50;

/// A server for one test, killed when dropped if it has not exited by then.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Bits per second received over `streams` parallel connections for `seconds`, sent
/// with the TCP congestion control `congestion`.
pub fn throughput(
    client_ns: &str,
    server_ns: &str,
    server: Ipv4Addr,
    streams: usize,
    congestion: &str,
    seconds: u64,
) -> Result<f64> {
    let addr = server.to_string();
    let _server = Server(
        netns::command(server_ns, "iperf3")
            .args(["-s", "-1", "-B", &addr, "-p", PORT])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s")?,
    );
    // The server needs a moment to listen: the client retries until it connects.
    let mut last = String::new();
    for _ in 0..STARTS {
        let out = netns::command(client_ns, "iperf3")
            .args(["-c", &addr, "-p", PORT, "-J", "-t", &seconds.to_string()])
            .args(["-P", &streams.to_string(), "-C", congestion])
            .stdin(Stdio::null())
            .output()
            .context("running iperf3 -c")?;
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        if let Some(bps) = report["end"]["sum_received"]["bits_per_second"].as_f64() {
            return Ok(bps);
        }
        last = report["error"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned());
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("iperf3 to {addr} failed: {last}")
}
