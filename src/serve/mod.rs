//! The local listeners: the live map page (every asset served by the
//! agent, none from a CDN) and its JSON API behind access.rs's checks, and
//! /metrics and /healthz (on the same listener, or on one of their own).

pub mod access;
pub mod diff;
pub mod metrics;
pub mod view;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::sinks::store::{ReadError, ReadPool, Window};
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
    /// `flowmap serve`: no datapath here; /healthz is the store's health.
    pub hub: bool,
}

#[derive(Debug, Deserialize)]
pub struct GraphQuery {
    since: Option<String>,
    from: Option<String>,
    to: Option<String>,
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
    let window = match window_of(q.since.as_deref(), q.from.as_deref(), q.to.as_deref()) {
        Ok(w) => w,
        Err(e) => return bad(e),
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
    let max_edges = st.max_edges;
    let res = reads
        .read(move |s| view::graph_bounded(s, &window, &filter, max_edges))
        .await;
    match res {
        Ok(view) => {
            // Written straight from the rows: no JSON tree of the whole
            // graph in between (tens of MB at cluster size).
            Json(GraphBody {
                view: &view,
                refresh_seconds: st.interval.as_secs().max(1),
            })
            .into_response()
        }
        Err(e) => read_failed(e),
    }
}

/// `/api/graph`'s answer: the window's graph and the page's refresh.
#[derive(serde::Serialize)]
struct GraphBody<'a> {
    #[serde(flatten)]
    view: &'a view::GraphView,
    refresh_seconds: u64,
}

/// A store read that gave no answer: 503 when busy or past the deadline.
fn read_failed(e: ReadError) -> Response {
    let code = match e {
        ReadError::Busy | ReadError::Timeout => StatusCode::SERVICE_UNAVAILABLE,
        ReadError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (code, Json(json!({"error": e.to_string()}))).into_response()
}

/// A time of the API: Unix milliseconds.
fn ms_param(name: &str, v: &str) -> Result<i64, String> {
    v.trim()
        .parse::<i64>()
        .ok()
        .filter(|ms| *ms >= 0)
        .ok_or_else(|| format!("{name}: {v:?} is not a time in Unix milliseconds"))
}

/// The window of `/api/graph`: `from` (and `to`, default now) in Unix
/// ms, else the `since` (default 15m) that ends now, live.
fn window_of(since: Option<&str>, from: Option<&str>, to: Option<&str>) -> Result<Window, String> {
    let (from, to) = (
        from.filter(|v| !v.trim().is_empty()),
        to.filter(|v| !v.trim().is_empty()),
    );
    let Some(from) = from else {
        if to.is_some() {
            return Err("to: needs from".into());
        }
        return match crate::config::parse_go_duration(since.unwrap_or("15m")) {
            Ok(d) if !d.is_zero() => Ok(Window::live(d)),
            _ => Err(format!(
                "since: {:?} is not a duration like 15m",
                since.unwrap_or_default()
            )),
        };
    };
    let from = ms_param("from", from)?;
    let w = match to {
        Some(to) => Window::between(from, ms_param("to", to)?),
        None => Window {
            from_ms: from,
            to_ms: i64::MAX,
            live: true,
        },
    };
    if w.to_ms < w.from_ms {
        return Err(format!("to ({}) is before from ({})", w.to_ms, w.from_ms));
    }
    Ok(w)
}

#[derive(Debug, Deserialize)]
pub struct DiffQuery {
    a_from: Option<String>,
    a_to: Option<String>,
    b_from: Option<String>,
    b_to: Option<String>,
    factor: Option<String>,
}

/// `GET /api/diff?a_from&a_to&b_from&b_to&factor` (times in Unix ms,
/// factor default 2).
async fn api_diff(State(st): State<AppState>, Query(q): Query<DiffQuery>) -> Response {
    let Some(reads) = st.reads.clone() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "the local store is disabled (--no-store)"})),
        )
            .into_response();
    };
    let need = |name: &str, v: &Option<String>| -> Result<i64, String> {
        match v.as_deref().filter(|v| !v.trim().is_empty()) {
            Some(v) => ms_param(name, v),
            None => Err(format!("{name}: required (Unix milliseconds)")),
        }
    };
    let parsed = (|| -> Result<(Window, Window, f64), String> {
        let a = Window::between(need("a_from", &q.a_from)?, need("a_to", &q.a_to)?);
        let b = Window::between(need("b_from", &q.b_from)?, need("b_to", &q.b_to)?);
        for (n, w) in [("a", &a), ("b", &b)] {
            if w.to_ms < w.from_ms {
                return Err(format!("{n}_to is before {n}_from"));
            }
        }
        let factor = match q.factor.as_deref().filter(|v| !v.trim().is_empty()) {
            None => 2.0,
            Some(v) => parse_factor(v)?,
        };
        Ok((a, b, factor))
    })();
    let (a, b, factor) = match parsed {
        Ok(p) => p,
        Err(e) => return bad(e),
    };
    let limit = st.max_edges.saturating_mul(4);
    match reads
        .read(move |s| diff::diff(s, &a, &b, factor, Some(limit)))
        .await
    {
        Ok(d) => Json(d).into_response(),
        Err(e) => read_failed(e),
    }
}

/// A diff factor: a number above 1.
pub fn parse_factor(v: &str) -> Result<f64, String> {
    match v.trim().parse::<f64>() {
        Ok(f) if f.is_finite() && f > 1.0 => Ok(f),
        _ => Err(format!("factor: {v:?} is not a number above 1")),
    }
}

/// `flowmap serve`'s /metrics: the store's counts (bounded: no series per
/// node or edge): agents and edges by status of the last 15 minutes,
/// intervals kept, and whether the store answered.
async fn hub_metrics(st: &AppState) -> String {
    let read = match st.reads.clone() {
        Some(r) => r
            .read(|s| {
                let w = Window::live(Duration::from_secs(15 * 60));
                let agents = s.agents(&w)?.len();
                let (edges, _) = s.edges_in(&w, None)?;
                Ok((agents, edges, s.runs()?))
            })
            .await
            .ok(),
        None => None,
    };
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, lines: Vec<(String, u64)>| {
        out += &format!("# HELP flowmap_hub_{name} {help}\n# TYPE flowmap_hub_{name} gauge\n");
        for (labels, v) in lines {
            out += &format!("flowmap_hub_{name}{labels} {v}\n");
        }
    };
    gauge(
        "store_up",
        "1 when the last read of the store succeeded",
        vec![(String::new(), read.is_some() as u64)],
    );
    if let Some((agents, edges, runs)) = &read {
        gauge(
            "agents",
            "Agents (nodes) that wrote an interval in the last 15 minutes",
            vec![(String::new(), *agents as u64)],
        );
        gauge(
            "intervals",
            "Intervals kept in the store",
            vec![(String::new(), *runs)],
        );
        let by = |s: crate::status::Status| {
            (
                format!("{{status=\"{}\"}}", s.name()),
                edges.iter().filter(|e| e.health.status == s).count() as u64,
            )
        };
        gauge(
            "edges",
            "Edges of the cluster map of the last 15 minutes, by status",
            crate::status::Status::ALL.iter().map(|s| by(*s)).collect(),
        );
    }
    out += &format!(
        "# HELP flowmap_build_info Version and git commit of this binary\n# TYPE flowmap_build_info gauge\nflowmap_build_info{{version=\"{}\",commit=\"{}\"}} 1\n# EOF\n",
        env!("CARGO_PKG_VERSION"),
        env!("FLOWMAP_GIT_COMMIT")
    );
    out
}

async fn metrics(State(st): State<AppState>) -> Response {
    let body = if st.hub {
        hub_metrics(&st).await
    } else {
        st.metrics.encode()
    };
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// `flowmap serve`'s health: the store answers a read.
async fn hub_healthz(st: &AppState) -> Response {
    let res = match st.reads.clone() {
        Some(r) => r.read(|s| s.runs()).await.map_err(|e| e.to_string()),
        None => Err("no store".into()),
    };
    let (code, body) = match res {
        Ok(n) => (
            StatusCode::OK,
            json!({"status": "ok", "store": {"ok": true, "intervals": n}}),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "unhealthy", "store": {"ok": false, "error": e}}),
        ),
    };
    (code, Json(body)).into_response()
}

async fn healthz(State(st): State<AppState>) -> Response {
    if st.hub {
        return hub_healthz(&st).await;
    }
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
        .route("/api/graph", get(api_graph))
        .route("/api/diff", get(api_diff));
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
