//! The local listeners: the live map page (every asset served by the
//! agent, none from a CDN) and its JSON API behind access.rs's checks, and
//! /metrics and /healthz (on the same listener, or on one of their own).

pub mod access;
pub mod metrics;
pub mod view;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::sinks::store::{ReadError, ReadPool};
use access::Access;
use metrics::Metrics;
use view::Filter;

const INDEX: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/web/index.html"));
const APP_JS: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/web/app.js"));
const CYTOSCAPE: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/web/node_modules/cytoscape/dist/cytoscape.min.js"
));

/// The map page's listener, as `flowmap run` was told.
#[derive(Debug, Clone)]
pub struct WebOptions {
    pub listen: SocketAddr,
    /// The bearer token's file (required off loopback).
    pub token_file: Option<std::path::PathBuf>,
    /// More host names the page is served under (--web-host).
    pub hosts: Vec<String>,
    /// Longest a request may take (store reads included).
    pub timeout: Duration,
    pub max_edges: usize,
    /// Store connections kept for reads.
    pub readers: usize,
}

/// The listeners of `flowmap run`: the map page (with /metrics and /healthz
/// unless `metrics_listen` gives them their own). Everything is checked and
/// bound before the task starts: a bad address or token is an error here.
pub async fn start(
    web: Option<&WebOptions>,
    metrics_listen: Option<SocketAddr>,
    st: AppState,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    if let Some(addr) = metrics_listen {
        let l = bind(addr, "/metrics and /healthz").await?;
        tasks.push(spawn(l, metrics_router(st.clone())));
        tracing::info!(url = %format!("http://{addr}/metrics"), "/metrics and /healthz listening");
    }
    if let Some(w) = web {
        if Some(w.listen) == metrics_listen {
            anyhow::bail!(
                "--listen and --metrics-listen are both {}; give them different ports",
                w.listen
            );
        }
        let token = w
            .token_file
            .as_deref()
            .map(access::read_token)
            .transpose()?;
        let access = Arc::new(Access::new(w.listen, token, &w.hosts, w.timeout)?);
        let l = bind(w.listen, "the map page").await?;
        let with_metrics = metrics_listen.is_none();
        tracing::info!(
            url = %format!("http://{}/", w.listen),
            token = access.requires_token(),
            metrics = with_metrics,
            "map page and API listening"
        );
        tasks.push(spawn(l, web_router(st, access, with_metrics)));
    }
    Ok(tasks)
}

#[derive(Clone)]
pub struct AppState {
    /// Reads of the local store (None: disabled).
    pub reads: Option<Arc<ReadPool>>,
    pub metrics: Arc<Metrics>,
    pub interval: Duration,
    /// Edges of a window /api/graph reads at most (the busiest).
    pub max_edges: usize,
}

#[derive(Debug, Deserialize)]
pub struct GraphQuery {
    since: Option<String>,
    port: Option<String>,
    protocol: Option<String>,
    q: Option<String>,
}

fn bad(msg: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": msg }))).into_response()
}

async fn api_graph(State(st): State<AppState>, Query(q): Query<GraphQuery>) -> Response {
    let Some(reads) = st.reads.clone() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "the local store is disabled (--no-store)"})),
        )
            .into_response();
    };
    let since = match crate::config::parse_go_duration(q.since.as_deref().unwrap_or("15m")) {
        Ok(d) if !d.is_zero() => d,
        _ => {
            return bad(format!(
                "since: {:?} is not a duration like 15m",
                q.since.unwrap_or_default()
            ))
        }
    };
    let port = match q.port.as_deref().map(str::trim).filter(|p| !p.is_empty()) {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(v) => Some(v),
            Err(_) => return bad(format!("port: {p:?} is not a port number")),
        },
    };
    let filter = Filter {
        port,
        protocol: q.protocol,
        q: q.q,
    };
    let from = SystemTime::now()
        .checked_sub(since)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let max_edges = st.max_edges;
    let res = reads
        .read(move |s| view::graph_bounded(s, from, &filter, max_edges))
        .await;
    match res {
        Ok(v) => {
            let mut body = serde_json::to_value(&v).unwrap_or_default();
            body["refresh_seconds"] = json!(st.interval.as_secs().max(1));
            Json(body).into_response()
        }
        Err(e @ (ReadError::Busy | ReadError::Timeout)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": e.to_string()})),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}

async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.encode(),
    )
        .into_response()
}

async fn healthz(State(st): State<AppState>) -> Response {
    let h = &st.metrics.health;
    let attached = h.interfaces_attached.load(Ordering::Relaxed);
    let loaded = h.datapath_loaded.load(Ordering::Relaxed);
    let store_on = h.store_enabled.load(Ordering::Relaxed);
    let store_ok = !store_on || h.store_ok.load(Ordering::Relaxed);
    let d = &st.metrics.delivery;
    let ok = loaded && attached > 0 && store_ok;
    let body = json!({
        "status": if ok { "ok" } else { "unhealthy" },
        "datapath": { "loaded": loaded, "interfaces_attached": attached },
        "store": if store_on { json!({"ok": store_ok}) } else { json!("disabled") },
        // A collector outage is reported but does not make the agent
        // unhealthy: the spool keeps the batches, and a restart would not help.
        "collector": if h.collector_enabled.load(Ordering::Relaxed) {
            json!({"spooled_batches": d.spool_batches.get(), "last_delivery_unix": d.last_delivery_unix.get()})
        } else { json!("disabled") },
        // Nor does an API server outage: the caches keep their last state.
        "kubernetes": if h.kube_enabled.load(Ordering::Relaxed) {
            json!({"synced": h.kube_synced.load(Ordering::Relaxed)})
        } else { json!("disabled") },
    });
    (
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(body),
    )
        .into_response()
}

/// /metrics and /healthz.
pub fn metrics_router(st: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(st)
}

/// The map page and its API (with /metrics and /healthz when they have no
/// listener of their own), every route behind `access`.
pub fn web_router(st: AppState, access: Arc<Access>, with_metrics: bool) -> Router {
    let mut r = Router::new()
        .route("/", get(|| async { Html(INDEX) }))
        .route(
            "/assets/app.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    APP_JS,
                )
            }),
        )
        .route(
            "/assets/cytoscape.min.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    CYTOSCAPE,
                )
            }),
        )
        .route("/api/graph", get(api_graph));
    if with_metrics {
        r = r
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz));
    }
    r.with_state(st)
        .layer(axum::middleware::from_fn_with_state(access, access::check))
}

/// Binds `addr` for `what` (an error names both).
pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {addr} for {what}: {e}"))
}

/// Serves `app` on `listener` until the task is dropped.
pub fn spawn(listener: tokio::net::TcpListener, app: Router) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}
