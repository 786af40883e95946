//! The HTTP servers kube-proxy has: health (`/healthz`, `/livez`, 10256) and metrics
//! (`/metrics`, `/healthz`, `/proxyMode`, 10249).

use std::{collections::BTreeSet, net::SocketAddr, sync::Arc};

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use ipvs_netlink::IpvsHandle;
use tokio::net::TcpListener;
use tracing::warn;

use crate::{
    Error,
    health::ProxyHealth,
    inspect::Published,
    metrics::{Code, Metrics, VirtualServerLabels},
};

/// What the servers read.
#[derive(Clone)]
pub struct Shared {
    /// The proxy's health.
    pub health: Arc<ProxyHealth>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The kernel, for per-virtual-server traffic counters (`--service-traffic-metrics`).
    pub traffic: Option<IpvsHandle>,
    /// What the sync loop last programmed.
    pub programmed: Published,
}

fn health_response(shared: &Shared, liveness: bool) -> Response {
    let answer = shared.health.answer(liveness);
    let status = if answer.healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let family = if liveness { &shared.metrics.livez } else { &shared.metrics.healthz };
    family.get_or_create(&Code { code: status.as_u16().to_string() }).inc();
    let body = serde_json::to_string(&answer.body).expect("the body serializes");
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert("X-Content-Type-Options", HeaderValue::from_static("nosniff"));
    response
}

/// How long a request waits for the sync loop, which answers between syncs.
const SNAPSHOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn healthz(State(shared): State<Shared>) -> Response {
    health_response(&shared, false)
}

async fn livez(State(shared): State<Shared>) -> Response {
    health_response(&shared, true)
}

async fn metrics(State(shared): State<Shared>) -> Response {
    if let Some(ipvs) = &shared.traffic {
        match ipvs.list_services().await {
            Ok(services) => {
                let snapshot =
                    shared.programmed.snapshot(SNAPSHOT_TIMEOUT).await.unwrap_or_default();
                let mut seen = BTreeSet::new();
                for entry in services {
                    let Some(service) = snapshot.service_of(&entry.service.key) else { continue };
                    let virtual_server = entry.service.key.to_string();
                    let labels = VirtualServerLabels { service, virtual_server };
                    let c = entry.counters();
                    let values =
                        [c.connections, c.in_packets, c.out_packets, c.in_bytes, c.out_bytes];
                    shared.metrics.set_traffic(labels.clone(), values);
                    seen.insert(labels);
                }
                shared.metrics.retain_traffic(&seen);
            }
            Err(err) => warn!(%err, "cannot read the IPVS counters for /metrics"),
        }
    }
    let mut response = shared.metrics.encode().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

/// `/healthz` and `/livez`.
pub fn health_router(shared: Shared) -> Router {
    Router::new().route("/healthz", get(healthz)).route("/livez", get(livez)).with_state(shared)
}

async fn virtual_servers(State(shared): State<Shared>) -> Response {
    let Some(snapshot) = shared.programmed.snapshot(SNAPSHOT_TIMEOUT).await else {
        return (StatusCode::SERVICE_UNAVAILABLE, "the sync loop did not answer in time\n")
            .into_response();
    };
    let body = serde_json::to_string(&snapshot.programmed()).expect("the view serializes");
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `/metrics`, `/healthz`, `/proxyMode`, and `/virtualservers` (what `kube-ipvs ls` shows).
pub fn metrics_router(shared: Shared) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/proxyMode", get(|| async { "ipvs" }))
        .route("/virtualservers", get(virtual_servers))
        .with_state(shared)
}

/// Binds `address` now (so a port in use is an error at start) and serves `router` on it in
/// the background.
pub async fn serve(what: &str, address: SocketAddr, router: Router) -> Result<SocketAddr, Error> {
    let listen = |source| Error::Listen { what: what.to_owned(), address, source };
    let listener = TcpListener::bind(address).await.map_err(listen)?;
    let bound = listener.local_addr().map_err(listen)?;
    let what = what.to_owned();
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router).await {
            warn!(server = what, %err, "HTTP server failed");
        }
    });
    Ok(bound)
}
