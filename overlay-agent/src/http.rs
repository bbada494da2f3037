//! The agent's HTTP endpoints: `/healthz` (liveness), `/readyz` (readiness) and
//! `/metrics` (OpenMetrics text).

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{info, warn};

use crate::{metrics, status::Status};

/// The run loop turns at least once a second (its bridge check); this many seconds
/// without a turn means it is stuck, and the process should be restarted.
pub const STALL_AFTER: Duration = Duration::from_secs(30);

/// `--http-addr`: an address to listen on, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

impl FromStr for Listen {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        if s == "off" {
            return Ok(Self(None));
        }
        let addr = s
            .parse()
            .with_context(|| format!("expected ADDRESS:PORT or off, got {s:?}"))?;
        Ok(Self(Some(addr)))
    }
}

/// What the endpoints report on.
#[derive(Clone)]
pub struct Endpoints {
    pub status: Arc<Status>,
    pub metrics: Arc<Registry>,
    /// `/healthz` fails when the run loop has not turned for this long.
    pub stall_after: Duration,
}

pub fn router(endpoints: Endpoints) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(endpoints)
}

/// Binds `addr` (given by `flag`) and serves the agent's endpoints there in a task of
/// their own. A failure to bind is a startup error (another process holds the port).
pub async fn start(
    addr: SocketAddr,
    flag: &str,
    status: Arc<Status>,
    pin_dir: PathBuf,
    bridge: String,
    per_peer: metrics::PerPeer,
) -> Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} ({flag})"))?;
    let endpoints = Endpoints {
        metrics: Arc::new(metrics::registry(
            Arc::clone(&status),
            pin_dir,
            bridge,
            per_peer,
        )),
        status,
        stall_after: STALL_AFTER,
    };
    Ok(tokio::spawn(serve(listener, endpoints)))
}

/// Serves the endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, endpoints: Endpoints) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /healthz, /readyz and /metrics");
    }
    if let Err(e) = axum::serve(listener, router(endpoints)).await {
        warn!(error = %e, "the HTTP server stopped");
    }
}

fn plain(code: StatusCode, text: String) -> Response {
    (code, format!("{text}\n")).into_response()
}

async fn healthz(State(e): State<Endpoints>) -> Response {
    match e.status.alive(e.stall_after) {
        Ok(()) => plain(StatusCode::OK, "ok".into()),
        Err(why) => plain(StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

async fn readyz(State(e): State<Endpoints>) -> Response {
    match e.status.ready() {
        Ok(()) => match e.status.degraded() {
            None => plain(StatusCode::OK, "ready".into()),
            Some(why) => plain(StatusCode::OK, format!("ready, degraded: {why}")),
        },
        Err(why) => plain(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}")),
    }
}

async fn metrics(State(e): State<Endpoints>) -> Response {
    // Reading the maps is a series of syscalls: keep it off the async workers.
    let scrape = tokio::task::spawn_blocking(move || metrics::encode(&e.metrics)).await;
    match scrape {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response(),
        Ok(Err(fmt::Error)) => plain(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed".into()),
        Err(join) => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("scrape failed: {join}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!("off".parse::<Listen>().unwrap(), Listen(None));
        for addr in ["0.0.0.0:9101", "127.0.0.1:0", "[::1]:80"] {
            let want: SocketAddr = addr.parse().unwrap();
            assert_eq!(addr.parse::<Listen>().unwrap(), Listen(Some(want)));
        }
        assert!("9101".parse::<Listen>().is_err());
    }
}
