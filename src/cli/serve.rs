//! `flowmap serve`: the map page, its API, /metrics and /healthz for a
//! whole store, with no datapath and no privilege.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::serve::{AppState, WebOptions};
use crate::sinks::coordimap::spool::DeliveryStats;
use crate::sinks::store::{Location, ReadPool, Store, Unreachable};

pub fn serve(
    loc: Location,
    web: WebOptions,
    metrics_listen: Option<SocketAddr>,
    refresh: Duration,
) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(loc, web, metrics_listen, refresh)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    loc: Location,
    web: WebOptions,
    metrics_listen: Option<SocketAddr>,
    refresh: Duration,
) -> Result<()> {
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    // A bad connection string or a store newer than this flowmap stops
    // here; a server not reachable yet does not (/healthz says so).
    let probe = loc.clone();
    // (The connection is dropped on the blocking thread: the driver blocks.)
    match tokio::task::spawn_blocking(move || Store::open(&probe).map(drop)).await? {
        Ok(_) => info!(store = %loc.describe(), "store ready"),
        Err(e) if e.downcast_ref::<Unreachable>().is_some() => {
            warn!(store = %loc.describe(), error = %format!("{e:#}"), "the store cannot be reached yet; /healthz answers 503 until it can")
        }
        Err(e) => return Err(e.context(format!("opening the store ({})", loc.describe()))),
    }
    let st = AppState {
        reads: Some(Arc::new(ReadPool::new(loc, web.readers, web.timeout))),
        metrics: Arc::new(crate::serve::metrics::Metrics::new(Arc::new(
            DeliveryStats::default(),
        ))),
        interval: refresh,
        max_edges: web.max_edges,
        hub: true,
    };
    let tasks = crate::serve::start(Some(&web), metrics_listen, st).await?;
    info!("flowmap serve running");
    tokio::select! {
        _ = sigint.recv() => info!("SIGINT: stopping"),
        _ = sigterm.recv() => info!("SIGTERM: stopping"),
    }
    for t in tasks {
        t.abort();
    }
    Ok(())
}
