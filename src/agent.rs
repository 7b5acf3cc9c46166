//! `flowmap run`: the agent loop. Attaches, follows interfaces, drains the
//! kernel map every crawl interval, builds the interval's graph and hands
//! it to the sinks (collector spool, stdout).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::config::{format_duration, Config, DeployedAt, FlowsSource};
use crate::coordimap;
use crate::datapath::ifaces::{self, Selection};
use crate::datapath::{AttachMode, Datapath, Drained, Options, STAT_NAMES};
use crate::delivery::{self, Collector, DeliveryStats, Retry, Spool};
use crate::flow::{clock_ns, Clock, Context, FlowTable};
use crate::graph::{Graph, ServerResolver};
use crate::host::HostView;
use crate::k8s::{self, KubeResolver};
use crate::metrics::{Direction, Metrics};
use crate::store::{self, Location};
use crate::web;

/// How often the interface list is re-read (new veths are attached within
/// this period) and the overflow ring buffer is emptied.
pub const IFACE_POLL: Duration = Duration::from_millis(250);

/// UDP flows first seen this soon after the agent attached may have been
/// running before it; their direction comes from sockets and ports.
pub const STARTUP_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// One JSON object per flow per interval.
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
    pub state_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub retry: Retry,
    /// How long a stopping agent keeps trying to deliver the spool.
    pub shutdown_timeout: Duration,
    /// The local store (None: disabled).
    pub store: Option<Location>,
    pub retention: Duration,
    /// The map page, API, /metrics and /healthz (None: disabled).
    pub listen: Option<std::net::SocketAddr>,
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

struct Loop {
    dp: Datapath,
    sel: Selection,
    table: FlowTable,
    /// Interface names by ifindex, with when each was last present; names
    /// of vanished interfaces are kept a while for their last flows.
    names: HashMap<u32, (Arc<str>, std::time::Instant)>,
    interval: Duration,
    last_stats: [u64; STAT_NAMES.len()],
    output: Output,
    sources: Vec<FlowsSource>,
    skip_fields: Vec<String>,
    spool: Option<Arc<Mutex<Spool>>>,
    wake: Arc<Notify>,
    interval_start: SystemTime,
    writer: Option<store::Writer>,
    metrics: Arc<Metrics>,
    max_flows: u32,
    kube: Option<Kube>,
}

/// Kubernetes mode: the watch caches, this node's name and the cluster UID
/// of each kubernetes data source.
struct Kube {
    cluster: k8s::watch::Shared,
    node: String,
    uids: HashMap<String, String>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// How long the agent waits for the first full list of every watched kind
/// before it attaches anyway.
pub const KUBE_SYNC_WAIT: Duration = Duration::from_secs(30);

/// The node this agent runs on: `NODE_NAME` (the DaemonSet sets it from
/// `spec.nodeName`), else the host name.
pub fn node_name() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| HostView::read().hostname)
}

async fn start_kube(
    cfg: &Config,
    interval: Duration,
    metrics: &Arc<Metrics>,
) -> Result<Option<Kube>> {
    let kube_sources: Vec<&FlowsSource> = cfg
        .flows
        .iter()
        .filter(|f| f.deployed_at == DeployedAt::Kubernetes)
        .collect();
    if kube_sources.is_empty() {
        return Ok(None);
    }
    let node = node_name();
    let mut uids = HashMap::new();
    for src in &kube_sources {
        let uid = src.cluster_uid(&node).with_context(|| {
            format!(
                "data source {:?}: no external_mappings key matches this node {node:?}; add \"*@<cluster UID>\" or \"{node}@<cluster UID>\"",
                src.id
            )
        })?;
        uids.insert(src.id.clone(), uid.to_string());
    }
    let client = k8s::watch::client().await?;
    // A wrong UID would file every edge under objects the Kubernetes
    // crawler never made: say so (it may be a deliberate scope_id).
    if let Some(actual) = k8s::watch::cluster_uid(&client).await {
        for (id, uid) in &uids {
            if *uid != actual {
                warn!(data_source = %id, configured = %uid, cluster = %actual,
                    "external_mappings names a cluster UID that differs from this cluster's (the kube-system namespace UID); flow edges will not attach to the Kubernetes crawler's objects unless its scope_id is the configured value");
            }
        }
    }
    let cluster = Arc::new(std::sync::RwLock::new(k8s::index::Cluster::new(
        interval * 2 + Duration::from_secs(60),
    )));
    let tasks = k8s::watch::start(client, cluster.clone(), metrics.clone());
    if k8s::watch::wait_synced(&cluster, KUBE_SYNC_WAIT).await {
        let c = k8s::watch::read(&cluster);
        k8s::watch::publish(&c, metrics);
        info!(node = %node, counts = ?c.counts(), "Kubernetes watch caches in sync");
    } else {
        warn!(wait = ?KUBE_SYNC_WAIT, "the Kubernetes watch caches are not in sync yet; attaching anyway, they keep trying");
    }
    Ok(Some(Kube {
        cluster,
        node,
        uids,
        tasks,
    }))
}

impl Loop {
    fn refresh_interfaces(&mut self) {
        match ifaces::list() {
            Ok(present) => {
                for i in &present {
                    let now = std::time::Instant::now();
                    match self.names.get_mut(&i.ifindex) {
                        Some((n, seen)) if **n == *i.name => *seen = now,
                        _ => {
                            self.names.insert(i.ifindex, (i.name.as_str().into(), now));
                        }
                    }
                }
                self.dp.reconcile(&self.sel, &present);
                // Interfaces attached in a batch with classic filters move
                // to TCX a few at a time, so the loop is never held long.
                self.dp.hand_over_some(Duration::from_millis(150));
                let keep = self.interval * 2 + Duration::from_secs(5);
                self.names.retain(|_, (_, seen)| seen.elapsed() < keep);
            }
            Err(e) => warn!(error = %e, "reading /sys/class/net failed"),
        }
        let n = self.dp.attached().count();
        self.metrics.interfaces_attached.set(n as i64);
        self.metrics
            .health
            .interfaces_attached
            .store(n as u64, Ordering::Relaxed);
        self.dp.poll_overflow();
    }

    fn flush(&mut self) -> Result<()> {
        let t0 = std::time::Instant::now();
        let drained: Drained = self.dp.drain()?;
        let t_drain = t0.elapsed();
        let end = SystemTime::now();
        let host = HostView::read();
        let t_host = t0.elapsed();
        let names = &self.names;
        let name_of = |idx: u32| {
            names
                .get(&idx)
                .map(|(n, _)| n.clone())
                .unwrap_or_else(|| format!("if{idx}").into())
        };
        let cx = Context {
            now_mono_ns: clock_ns(libc::CLOCK_MONOTONIC),
            clock: Clock::now(),
            host: &host,
            name: &name_of,
        };
        let records = self.table.ingest(&drained.flows, &cx);
        let t_ingest = t0.elapsed();
        let stdout = std::io::stdout();
        let mut w = std::io::BufWriter::new(stdout.lock());
        if self.output == Output::Flows {
            for r in &records {
                serde_json::to_writer(&mut w, r)?;
                w.write_all(b"\n")?;
            }
        }
        if let Some(k) = &self.kube {
            let mut c = k8s::watch::write(&k.cluster);
            c.prune(end);
            k8s::watch::publish(&c, &self.metrics);
            if !c.all_synced() {
                warn!("the Kubernetes watch caches are not in sync yet; addresses they do not know yet resolve as external");
            }
        }
        for src in &self.sources {
            let (graph, always) = match (&self.kube, src.deployed_at) {
                (Some(k), DeployedAt::Kubernetes) => {
                    let cluster = k8s::watch::read(&k.cluster);
                    let resolver = KubeResolver {
                        cluster: &cluster,
                        cluster_uid: k.uids.get(&src.id).map(String::as_str).unwrap_or_default(),
                        data_source_id: &src.id,
                        node: &k.node,
                        host: &host,
                    };
                    (
                        Graph::build(&records, &resolver),
                        resolver.node_endpoint(&k.node),
                    )
                }
                _ => {
                    let resolver = ServerResolver {
                        data_source_id: &src.id,
                        host: &host,
                    };
                    (Graph::build(&records, &resolver), resolver.host_endpoint())
                }
            };
            let graph = Arc::new(graph);
            self.metrics.batches_built.inc();
            if let Some(wr) = &self.writer {
                wr.submit(store::Job {
                    data_source_id: src.id.clone(),
                    start: self.interval_start,
                    end,
                    graph: graph.clone(),
                    always: vec![always.clone()],
                });
            }
            // The Coordimap encoding only for a sink that takes it.
            if self.spool.is_none() && self.output != Output::Graph {
                continue;
            }
            let batch = coordimap::encode(
                &graph,
                &[always],
                src,
                &self.skip_fields,
                self.interval_start,
                end,
            );
            let body = serde_json::to_vec(&batch)?;
            if self.output == Output::Graph {
                w.write_all(&body)?;
                w.write_all(b"\n")?;
            }
            if let Some(spool) = &self.spool {
                let pushed = spool
                    .lock()
                    .map_err(|_| anyhow::anyhow!("spool lock poisoned"))?
                    .push(&body);
                match pushed {
                    Ok(seq) => {
                        info!(seq, data_source = %src.id, elements = batch.cloud_crawl_data.crawled_data.data.len(), edges = graph.edges.len(), "batch spooled");
                        self.wake.notify_one();
                    }
                    Err(e) => {
                        warn!(error = %e, "writing the batch to the spool failed; batch lost")
                    }
                }
            }
        }
        w.flush()?;
        drop(w);
        self.interval_start = end;
        let t_all = t0.elapsed();
        self.metrics.flush_seconds.set(t_all.as_secs_f64());

        let d: Vec<u64> = drained
            .stats
            .iter()
            .zip(self.last_stats.iter())
            .map(|(a, b)| a.saturating_sub(*b))
            .collect();
        self.last_stats = drained.stats;
        let m = &self.metrics;
        for (dir, p, b) in [
            (
                "client_to_server",
                records.iter().map(|r| r.src_to_dst.packets).sum::<u64>(),
                records.iter().map(|r| r.src_to_dst.bytes).sum::<u64>(),
            ),
            (
                "server_to_client",
                records.iter().map(|r| r.dst_to_src.packets).sum(),
                records.iter().map(|r| r.dst_to_src.bytes).sum(),
            ),
        ] {
            let d = Direction {
                direction: dir.into(),
            };
            m.packets.get_or_create(&d).inc_by(p);
            m.bytes.get_or_create(&d).inc_by(b);
        }
        m.flows_active.set(self.table.len() as i64);
        m.flows_interval.set(records.len() as i64);
        m.kernel_map_entries.set(drained.flows.len() as i64);
        m.kernel_map_capacity.set(self.max_flows as i64);
        m.kernel_stats(&drained.stats);
        if let Some(wr) = &self.writer {
            m.health
                .store_ok
                .store(wr.healthy.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let packets: u64 = records
            .iter()
            .map(|r| r.src_to_dst.packets + r.dst_to_src.packets)
            .sum();
        info!(
            flows = records.len(),
            connections = self.table.len(),
            packets,
            attached = self.dp.attached().count(),
            drain_ms = t_drain.as_millis() as u64,
            host_ms = (t_host - t_drain).as_millis() as u64,
            ingest_ms = (t_ingest - t_host).as_millis() as u64,
            total_ms = t_all.as_millis() as u64,
            "interval"
        );
        // Index 0 (non-IP) is not a loss.
        let losses: Vec<String> = (1..STAT_NAMES.len())
            .filter(|i| d[*i] > 0)
            .map(|i| format!("{}={}", STAT_NAMES[i], d[i]))
            .collect();
        if !losses.is_empty() || drained.overflow_dropped > 0 {
            warn!(
                losses = %losses.join(" "),
                overflow_dropped_in_user_space = drained.overflow_dropped,
                "packets not counted normally this interval (see README: kernel statistics)"
            );
        }
        drop(records);
        drop(drained);
        // Give the interval's buffers back to the system: resident memory
        // follows the live state, not the largest interval seen.
        // SAFETY: malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) };
        Ok(())
    }
}

pub async fn run(cfg: &Config, opts: RunOptions) -> Result<()> {
    let (sel, interval, max_flows, mut mode) = plan(cfg);
    if let Some(m) = opts.attach_mode {
        mode = m;
    }
    // Sinks and the listener first: a store, spool or address that cannot
    // be used is an error before anything is attached.
    let stats = Arc::new(DeliveryStats::default());
    let metrics = Arc::new(Metrics::new(stats.clone()));
    metrics.kernel_stats(&[0; STAT_NAMES.len()]);
    let wake = Arc::new(Notify::new());
    let (finish_tx, finish_rx) = watch::channel(false);
    let mut sender = None;
    let mut spool = None;
    if let Some(endpoint) = opts.endpoint.as_deref().filter(|e| !e.is_empty()) {
        let key = cfg
            .api_key
            .clone()
            .context("coordimap.api_key is required with an endpoint")?;
        let dir = opts.state_dir.join("spool");
        let s = Spool::open(&dir, opts.spool_max_bytes, stats.clone())
            .with_context(|| format!("opening the spool {}", dir.display()))?;
        let s = Arc::new(Mutex::new(s));
        let collector = Collector::new(endpoint, key)?;
        sender = Some(tokio::spawn(delivery::run_sender(
            s.clone(),
            collector,
            opts.retry,
            wake.clone(),
            finish_rx,
            stats.clone(),
        )));
        spool = Some(s);
        metrics
            .health
            .collector_enabled
            .store(true, Ordering::Relaxed);
    }
    let writer = match &opts.store {
        Some(loc) => {
            let counters = (
                metrics.store_written.clone(),
                metrics.store_errors.clone(),
                metrics.store_dropped.clone(),
            );
            let w = store::Writer::start(loc.clone(), opts.retention, 1024, counters)?;
            metrics.health.store_enabled.store(true, Ordering::Relaxed);
            metrics.health.store_ok.store(true, Ordering::Relaxed);
            Some(w)
        }
        None => None,
    };
    let mut web_task = None;
    if let Some(addr) = opts.listen {
        let st = web::AppState {
            store: opts.store.clone(),
            metrics: metrics.clone(),
            interval,
        };
        web_task = Some(web::serve(addr, st).await?);
        info!(url = %format!("http://{addr}/"), "map page, /metrics and /healthz listening");
    }

    // Kubernetes mode: the API and the caches before anything is attached.
    let kube = start_kube(cfg, interval, &metrics).await?;

    let present = ifaces::list().context("listing interfaces")?;
    sel.check_exists(&present).map_err(anyhow::Error::msg)?;
    let dp = Datapath::load(&Options { max_flows, mode })?;
    metrics
        .health
        .datapath_loaded
        .store(true, Ordering::Relaxed);
    let map_bytes: u64 = dp.map_memory().iter().map(|(_, b)| *b).sum();
    metrics.kernel_map_memory.set(map_bytes as i64);
    info!(kernel_map_bytes = map_bytes, "BPF program loaded");
    dp.remove_stale(&present);
    let mut lp = Loop {
        dp,
        sel,
        table: FlowTable::new(
            max_flows as usize * 4,
            (interval * 4).max(Duration::from_secs(120)),
            u64::MAX,
        ),
        names: HashMap::new(),
        interval,
        last_stats: [0; STAT_NAMES.len()],
        output: opts.output,
        sources: cfg.flows.clone(),
        skip_fields: cfg.skip_fields.clone(),
        spool: spool.clone(),
        wake,
        interval_start: SystemTime::now(),
        writer,
        metrics: metrics.clone(),
        max_flows,
        kube,
    };
    lp.refresh_interfaces();
    // Every packet is seen after the attach, so "first seen after start"
    // says nothing about flows that were already running then: only flows
    // that begin STARTUP_GRACE after the first attach count as seen from
    // their first packet.
    lp.table
        .set_started(clock_ns(libc::CLOCK_MONOTONIC) + STARTUP_GRACE.as_nanos() as u64);
    if lp.dp.attached().count() == 0 {
        warn!("no interface to attach to yet; waiting for one to appear");
    }
    info!(interval = %format_duration(interval), max_flows, "flowmap running");

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut poll = tokio::time::interval(IFACE_POLL);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let until = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until);
    loop {
        tokio::select! {
            _ = poll.tick() => lp.refresh_interfaces(),
            _ = tick.tick() => lp.flush()?,
            _ = sigint.recv() => { info!("SIGINT: flushing and stopping"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: flushing and stopping"); break; }
            _ = &mut until => { info!("duration reached: flushing and stopping"); break; }
        }
    }
    lp.flush()?;
    lp.dp.detach_all();
    metrics
        .health
        .interfaces_attached
        .store(0, Ordering::Relaxed);
    info!("detached from every interface");
    if let Some(w) = lp.writer.take() {
        w.close();
    }
    if let Some(t) = web_task {
        t.abort();
    }
    if let Some(k) = lp.kube.take() {
        for t in k.tasks {
            t.abort();
        }
    }
    if let Some(handle) = sender {
        let _ = finish_tx.send(true);
        if tokio::time::timeout(opts.shutdown_timeout, handle)
            .await
            .is_err()
        {
            let left = spool
                .as_ref()
                .and_then(|s| s.lock().ok().map(|s| s.len()))
                .unwrap_or(0);
            warn!(
                batches = left,
                "collector not reached before stopping; the spool keeps them for the next start"
            );
        } else {
            info!("spool delivered");
        }
    }
    Ok(())
}
