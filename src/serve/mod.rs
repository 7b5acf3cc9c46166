//! The local listener: the live map page (every asset served by the agent,
//! none from a CDN), its JSON API, /metrics and /healthz.

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

use crate::sinks::store::{Location, Store};
use metrics::Metrics;
use view::Filter;

const INDEX: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/web/index.html"));
const APP_JS: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/web/app.js"));
const CYTOSCAPE: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/web/node_modules/cytoscape/dist/cytoscape.min.js"
));

#[derive(Clone)]
pub struct AppState {
    pub store: Option<Location>,
    pub metrics: Arc<Metrics>,
    pub interval: Duration,
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
    let Some(loc) = st.store.clone() else {
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
    let res = tokio::task::spawn_blocking(move || -> anyhow::Result<view::GraphView> {
        let mut s = Store::open(&loc)?;
        view::graph(&mut s, from, &filter)
    })
    .await;
    match res {
        Ok(Ok(v)) => {
            let mut body = serde_json::to_value(&v).unwrap_or_default();
            body["refresh_seconds"] = json!(st.interval.as_secs().max(1));
            Json(body).into_response()
        }
        Ok(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": format!("{e:#}")})),
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

pub fn router(st: AppState) -> Router {
    Router::new()
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
        .route("/api/graph", get(api_graph))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(st)
}

/// Binds the listener (an error names the address) and serves until the
/// task is dropped.
pub async fn serve(addr: SocketAddr, st: AppState) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {addr} for the map page: {e}"))?;
    let app = router(st);
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    }))
}
