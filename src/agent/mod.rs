//! `flowmap run`: starts the sinks, the listener and Kubernetes mode, then
//! runs the interval pipeline on a thread of its own (the datapath, /proc
//! reads, encoding and writes never run on the async runtime, so /healthz
//! and /metrics always answer) until a signal or `--duration` stops it.

pub mod kube;
pub mod pipeline;
pub mod source;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{oneshot, watch, Notify};
use tracing::{info, warn};

use crate::config::{format_duration, Config};
use crate::datapath::clock::clock_ns;
use crate::datapath::ifaces::{self, Selection};
use crate::datapath::{AttachMode, Datapath, Options, STAT_NAMES};
use crate::serve::metrics::Metrics;
use crate::sinks::coordimap::sender::{self, Collector, Retry};
use crate::sinks::coordimap::spool::{DeliveryStats, Spool};
use crate::sinks::coordimap::SpoolSink;
use crate::sinks::stdout::{Print, Stdout};
use crate::sinks::store::{self, Location};
use crate::sinks::Sink;
use pipeline::Pipeline;
use source::{FlowSource, KernelSource};

/// How often the interface list is re-read (new veths are attached within
/// this period) and the overflow ring buffer is emptied.
pub const IFACE_POLL: Duration = Duration::from_millis(250);

/// UDP flows first seen this soon after the agent attached may have been
/// running before it; their direction comes from sockets and ports.
pub const STARTUP_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// One JSON object per flow per interval.
    #[value(alias = "jsonl")]
    Flows,
    /// Each interval's Coordimap batch, one JSON document per line.
    Graph,
    None,
}

pub struct RunOptions {
    pub output: Output,
    pub duration: Option<Duration>,
    pub attach_mode: Option<AttachMode>,
    pub endpoint: Option<String>,
    /// Accept an `http://` endpoint that is not loopback (the key in clear).
    pub allow_plain_http: bool,
    pub state_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub retry: Retry,
    /// How long a stopping agent keeps trying to deliver the spool.
    pub shutdown_timeout: Duration,
    /// The local store (None: disabled).
    pub store: Option<Location>,
    pub retention: Duration,
    /// The map page and its API (None: disabled); also /metrics and
    /// /healthz unless `metrics_listen` is set.
    pub web: Option<crate::serve::WebOptions>,
    /// /metrics and /healthz on a listener of their own.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Everything the flows data sources of the file ask of the one datapath
/// of this host: the union of their interfaces, the shortest interval.
pub fn plan(cfg: &Config) -> (Selection, Duration, u32, AttachMode) {
    let mut sel: Option<Selection> = None;
    for f in &cfg.flows {
        sel = Some(match (sel, &f.interfaces) {
            (None, s) => s.clone(),
            (Some(Selection::All), _) | (_, Selection::All) => Selection::All,
            (Some(Selection::Names(mut a)), Selection::Names(b)) => {
                for n in b {
                    if !a.contains(n) {
                        a.push(n.clone());
                    }
                }
                Selection::Names(a)
            }
        });
    }
    let interval = cfg
        .flows
        .iter()
        .map(|f| f.crawl_interval)
        .min()
        .unwrap_or(Duration::from_secs(30));
    let max_flows = cfg
        .flows
        .iter()
        .map(|f| f.max_flows)
        .max()
        .unwrap_or(crate::datapath::DEFAULT_MAX_FLOWS);
    let mode = cfg.flows.first().map(|f| f.attach_mode).unwrap_or_default();
    (sel.unwrap_or(Selection::All), interval, max_flows, mode)
}

/// The collector side of delivery: the spool and the sender task.
struct Delivery {
    spool: Arc<Mutex<Spool>>,
    wake: Arc<Notify>,
    sender: tokio::task::JoinHandle<()>,
    finish: watch::Sender<bool>,
}

impl Delivery {
    /// With an endpoint: opens the spool and starts the sender.
    fn start(
        cfg: &Config,
        opts: &RunOptions,
        stats: &Arc<DeliveryStats>,
        metrics: &Metrics,
    ) -> Result<Option<Delivery>> {
        let Some(endpoint) = opts.endpoint.as_deref().filter(|e| !e.is_empty()) else {
            return Ok(None);
        };
        let key = cfg
            .api_key
            .clone()
            .context("coordimap.api_key is required with an endpoint")?;
        let dir = opts.state_dir.join("spool");
        let spool = Spool::open(&dir, opts.spool_max_bytes, stats.clone())
            .with_context(|| format!("opening the spool {}", dir.display()))?;
        let spool = Arc::new(Mutex::new(spool));
        let collector = Collector::new(endpoint, key, opts.allow_plain_http)?;
        let wake = Arc::new(Notify::new());
        let (finish, finish_rx) = watch::channel(false);
        let sender = tokio::spawn(sender::run_sender(
            spool.clone(),
            collector,
            opts.retry,
            wake.clone(),
            finish_rx,
            stats.clone(),
        ));
        metrics
            .health
            .collector_enabled
            .store(true, Ordering::Relaxed);
        Ok(Some(Delivery {
            spool,
            wake,
            sender,
            finish,
        }))
    }

    /// Tries to deliver what is spooled for at most `timeout`.
    async fn finish(self, timeout: Duration) {
        let _ = self.finish.send(true);
        if tokio::time::timeout(timeout, self.sender).await.is_ok() {
            info!("spool delivered");
            return;
        }
        let left = self.spool.lock().map(|s| s.len()).unwrap_or(0);
        warn!(
            batches = left,
            "collector not reached before stopping; the spool keeps them for the next start"
        );
    }
}

/// The sinks of `opts`, in the order they get each interval. The store is
/// opened here (off the runtime: its drivers block).
async fn open_sinks(
    opts: &RunOptions,
    metrics: &Arc<Metrics>,
    delivery: Option<&Delivery>,
) -> Result<Vec<Box<dyn Sink>>> {
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    match opts.output {
        Output::Flows => sinks.push(Box::new(Stdout(Print::Flows))),
        Output::Graph => sinks.push(Box::new(Stdout(Print::Graph))),
        Output::None => {}
    }
    if let Some(d) = delivery {
        sinks.push(Box::new(SpoolSink {
            spool: d.spool.clone(),
            wake: d.wake.clone(),
        }));
    }
    if let Some(loc) = opts.store.clone() {
        let counters = store::Counters {
            written: metrics.store_written.clone(),
            errors: metrics.store_errors.clone(),
            dropped: metrics.store_dropped.clone(),
            healthy: metrics.health.store_ok.clone(),
        };
        let retention = opts.retention;
        // Rows carry the node and the instance ID the spool keeps.
        let who = store::Agent {
            node: kube::node_name(),
            instance_id: crate::sinks::coordimap::spool::agent_instance_id(
                &opts.state_dir.join("spool"),
            )
            .with_context(|| format!("the agent instance ID in {}", opts.state_dir.display()))?,
        };
        let w = tokio::task::spawn_blocking(move || {
            store::Writer::start_as(loc, who, retention, 1024, counters)
        })
        .await??;
        metrics.health.store_enabled.store(true, Ordering::Relaxed);
        sinks.push(Box::new(w));
    }
    Ok(sinks)
}

pub async fn run(cfg: &Config, opts: RunOptions) -> Result<()> {
    let (sel, interval, max_flows, mut mode) = plan(cfg);
    if let Some(m) = opts.attach_mode {
        mode = m;
    }
    // Before anything starts: a SIGTERM that comes while the agent is
    // still starting (a quick `systemctl stop`) waits for it, then stops it
    // cleanly, instead of killing it with the default disposition.
    let signals = Signals {
        int: signal(SignalKind::interrupt())?,
        term: signal(SignalKind::terminate())?,
    };
    // Sinks and the listener first: a store, spool or address that cannot
    // be used is an error before anything is attached.
    let stats = Arc::new(DeliveryStats::default());
    let metrics = Arc::new(Metrics::new(stats.clone()));
    metrics.kernel_stats(&[0; STAT_NAMES.len()]);
    let delivery = Delivery::start(cfg, &opts, &stats, &metrics)?;
    let sinks = open_sinks(&opts, &metrics, delivery.as_ref()).await?;
    let reads = match (&opts.web, &opts.store) {
        (Some(w), Some(loc)) => Some(Arc::new(store::ReadPool::new(
            loc.clone(),
            w.readers,
            w.timeout,
        ))),
        _ => None,
    };
    let st = crate::serve::AppState {
        reads,
        metrics: metrics.clone(),
        interval,
        max_edges: opts.web.as_ref().map(|w| w.max_edges).unwrap_or(0),
        hub: false,
    };
    let web = crate::serve::start(opts.web.as_ref(), opts.metrics_listen, st).await?;
    // Kubernetes mode: the API and the caches before anything is attached.
    let (kube, kube_tasks) = match kube::start(cfg, interval, &metrics).await? {
        Some((v, t)) => (Some(v), t),
        None => (None, Vec::new()),
    };
    let pipeline = Pipeline::new(cfg, (interval, max_flows), sinks, metrics.clone(), kube);
    let worker = Worker::start(
        Plan {
            sel,
            interval,
            options: Options {
                max_flows,
                mode,
                // Payloads are looked at only when no data source said no.
                capture_names: cfg.flows.iter().all(|f| f.capture_names),
                // Like names: processes only when no data source said no.
                processes: cfg.flows.iter().all(|f| f.processes),
            },
        },
        pipeline,
        metrics.clone(),
    )
    .await?;
    let result = worker.until_stopped(signals, opts.duration).await;
    for t in kube_tasks {
        t.abort();
    }
    for t in web {
        t.abort();
    }
    if let Some(d) = delivery {
        d.finish(opts.shutdown_timeout).await;
    }
    result
}

/// SIGINT and SIGTERM, caught from the start of `run`.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

/// What the pipeline thread attaches, and how often it drains.
struct Plan {
    sel: Selection,
    interval: Duration,
    options: Options,
}

/// The pipeline thread: owns the datapath and the pipeline; polls the
/// interfaces every IFACE_POLL and runs an interval every crawl interval.
struct Worker {
    stop: mpsc::Sender<()>,
    done: oneshot::Receiver<Result<()>>,
}

impl Worker {
    /// Starts the thread and waits until it has attached (or failed to).
    async fn start(plan: Plan, pipeline: Pipeline, metrics: Arc<Metrics>) -> Result<Worker> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (done_tx, done) = oneshot::channel();
        let (stop, stop_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("flowmap-pipeline".into())
            .spawn(move || {
                let r = match attach(&plan, &metrics) {
                    Ok(src) => {
                        let _ = ready_tx.send(Ok(()));
                        run_intervals(src, pipeline, &plan, stop_rx)
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        Ok(())
                    }
                };
                let _ = done_tx.send(r);
            })
            .context("starting the pipeline thread")?;
        ready_rx
            .await
            .context("the pipeline thread ended before attaching")??;
        Ok(Worker { stop, done })
    }

    /// Waits for SIGINT, SIGTERM, `duration` or the thread's own end, then
    /// stops the thread (it flushes the last interval and detaches).
    async fn until_stopped(mut self, sig: Signals, duration: Option<Duration>) -> Result<()> {
        let Signals {
            int: mut sigint,
            term: mut sigterm,
        } = sig;
        let until = async {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sigint.recv() => info!("SIGINT: flushing and stopping"),
            _ = sigterm.recv() => info!("SIGTERM: flushing and stopping"),
            _ = until => info!("duration reached: flushing and stopping"),
            r = &mut self.done => return r.context("the pipeline thread panicked")?,
        }
        let _ = self.stop.send(());
        self.done.await.context("the pipeline thread panicked")?
    }
}

/// Loads the kernel program and attaches to the interfaces of the plan.
fn attach(plan: &Plan, metrics: &Arc<Metrics>) -> Result<KernelSource> {
    let present = ifaces::list().context("listing interfaces")?;
    plan.sel
        .check_exists(&present)
        .map_err(anyhow::Error::msg)?;
    let dp = Datapath::load(&plan.options)?;
    metrics
        .health
        .datapath_loaded
        .store(true, Ordering::Relaxed);
    let map_bytes: u64 = dp.map_memory().iter().map(|(_, b)| *b).sum();
    metrics.kernel_map_memory.set(map_bytes as i64);
    info!(kernel_map_bytes = map_bytes, "BPF program loaded");
    dp.remove_stale(&present);
    let mut src = KernelSource::new(dp, plan.sel.clone(), plan.interval, metrics.clone());
    if src.poll() == 0 {
        warn!("no interface to attach to yet; waiting for one to appear");
    }
    Ok(src)
}

/// The pipeline thread's loop: polls and intervals until told to stop,
/// then the last interval, detach, and the sinks' close.
fn run_intervals(
    mut src: KernelSource,
    mut pipeline: Pipeline,
    plan: &Plan,
    stop: mpsc::Receiver<()>,
) -> Result<()> {
    // Every packet is seen after the attach, so "first seen after start"
    // says nothing about flows that were already running then: only flows
    // that begin STARTUP_GRACE after the first attach count as seen from
    // their first packet.
    pipeline.set_started(clock_ns(libc::CLOCK_MONOTONIC) + STARTUP_GRACE.as_nanos() as u64);
    let interval = plan.interval;
    info!(interval = %format_duration(interval), max_flows = plan.options.max_flows, "flowmap running");
    let mut next_poll = Instant::now() + IFACE_POLL;
    let mut next_tick = Instant::now() + interval;
    let result = loop {
        let wait = next_poll
            .min(next_tick)
            .saturating_duration_since(Instant::now());
        match stop.recv_timeout(wait) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break Ok(()),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        if now >= next_tick {
            next_tick += interval;
            if let Err(e) = pipeline.interval(&mut src) {
                break Err(e);
            }
            give_back_memory();
        }
        if now >= next_poll {
            src.poll();
            next_poll = Instant::now() + IFACE_POLL;
        }
    };
    let last = pipeline.interval(&mut src);
    src.detach_all();
    info!("detached from every interface");
    pipeline.close();
    result.and(last.map(|_| ()))
}

/// Gives the interval's freed buffers back to the system, so resident
/// memory follows the live state, not the largest interval seen (the
/// records, the graph and the batch of 100k flows are ~100 MB for a few
/// ms). Lost when the interval became a pipeline; issue 16 found it.
pub fn give_back_memory() {
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
}
