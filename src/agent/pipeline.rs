//! One interval, as a pipeline of small steps: drain the flow source →
//! ingest into connection records → resolve addresses and build each data
//! source's graph → hand records and graphs to every sink → count. It runs
//! on the agent's pipeline thread, never on the async runtime.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use tracing::{error, info, warn};

use super::kube::KubeView;
use super::source::FlowSource;
use crate::config::{Config, DeployedAt, FlowsSource};
use crate::datapath::clock::{clock_ns, Clock};
use crate::datapath::ifaces::Selection;
use crate::datapath::{Drained, STAT_NAMES};
use crate::enrich::host::HostView;
use crate::enrich::kube::KubeResolver;
use crate::enrich::names::Names;
use crate::enrich::process::Processes;
use crate::enrich::server::ServerResolver;
use crate::enrich::Endpoint;
use crate::flow::{Context, FlowRecord, FlowTable};
use crate::graph::fold::{self, Limits};
use crate::graph::{Draft, Graph};
use crate::serve::metrics::{Direction, Metrics};
use crate::sinks::coordimap::{body_within, MAX_BODY_BYTES};
use crate::sinks::{Sink, SourceGraph};

/// Whether a record belongs to a data source: every record for `all`, else
/// a flow seen on one of the interfaces it names (`interface_name`),
/// whichever interface it was counted on.
fn on_interfaces_of(src: &FlowsSource, r: &FlowRecord) -> bool {
    match &src.interfaces {
        Selection::All => true,
        Selection::Names(names) => {
            let mine = |n: &str| names.iter().any(|x| x == n);
            mine(&r.interface) || r.also_seen_on().iter().any(|n| mine(n))
        }
    }
}

/// The full graph of a data source in `bound`: a draft until it is the
/// graph sent (or judged).
enum Full<'r> {
    Draft(Draft<'r>),
    Graph(Graph),
}

impl Full<'_> {
    fn flat(&self) -> fold::Flat<'_> {
        match self {
            Full::Draft(d) => fold::Flat::of_draft(d),
            Full::Graph(g) => fold::Flat::of(g),
        }
    }

    fn into_graph(self) -> Graph {
        match self {
            Full::Draft(d) => d.into_graph(),
            Full::Graph(g) => g,
        }
    }
}

/// Where the host view comes from: read from /proc each interval, or
/// fixed (tests).
pub enum HostSource {
    Live,
    Fixed(HostView),
}

/// What one interval did, for the log line and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub flows: usize,
    pub connections: usize,
    pub packets: u64,
    /// Graphs handed to the sinks (one per data source).
    pub graphs: usize,
}

pub struct Pipeline {
    table: FlowTable,
    sources: Vec<FlowsSource>,
    skip_fields: Vec<String>,
    sinks: Vec<Box<dyn Sink>>,
    metrics: Arc<Metrics>,
    kube: Option<KubeView>,
    host: HostSource,
    interval_start: SystemTime,
    last_stats: [u64; STAT_NAMES.len()],
    max_flows: u32,
    /// Issue 14: names of external peers (None: `capture_names` off).
    names: Option<Names>,
    /// Issue 14: the processes of local sockets (None: `processes` off).
    processes: Option<Processes>,
}

impl Pipeline {
    /// `interval` and `max_flows` bound the connection table the way the
    /// kernel maps are bounded.
    pub fn new(
        cfg: &Config,
        (interval, max_flows): (Duration, u32),
        sinks: Vec<Box<dyn Sink>>,
        metrics: Arc<Metrics>,
        kube: Option<KubeView>,
    ) -> Pipeline {
        Pipeline {
            table: FlowTable::new(
                max_flows as usize * 4,
                (interval * 4).max(Duration::from_secs(120)),
                u64::MAX,
            ),
            sources: cfg.flows.clone(),
            skip_fields: cfg.skip_fields.clone(),
            sinks,
            metrics,
            kube,
            host: HostSource::Live,
            interval_start: SystemTime::now(),
            last_stats: [0; STAT_NAMES.len()],
            max_flows,
            names: cfg
                .flows
                .iter()
                .all(|f| f.capture_names)
                .then(Names::default),
            processes: cfg
                .flows
                .iter()
                .all(|f| f.processes)
                .then(Processes::default),
        }
    }

    pub fn set_host(&mut self, host: HostSource) {
        self.host = host;
    }

    /// Flows that begin after monotonic `ns` were seen from their first
    /// packet (see `FlowTable::set_started`).
    pub fn set_started(&mut self, ns: u64) {
        self.table.set_started(ns);
        // The sockets already open, and their processes (issue 14).
        if let Some(p) = &mut self.processes {
            p.scan(Instant::now());
        }
    }

    /// Runs one interval end to end.
    pub fn interval(&mut self, src: &mut dyn FlowSource) -> Result<Report> {
        let t0 = Instant::now();
        let drained = src.drain()?;
        let t_drain = t0.elapsed();
        let end = SystemTime::now();
        let host = match &self.host {
            HostSource::Live => HostView::read(),
            HostSource::Fixed(h) => h.clone(),
        };
        let t_host = t0.elapsed();
        let mut records = self.ingest(&drained, &host, src);
        self.name(&drained, &mut records);
        self.own(&drained, &mut records, &host);
        let t_ingest = t0.elapsed();
        for s in &mut self.sinks {
            s.records(&records)?;
        }
        self.refresh_kube(end);
        let mut graphs = 0;
        let mut by_status = crate::status::Status::ALL.map(|s| (s, 0i64));
        for i in 0..self.sources.len() {
            let (full, always) = self.build(&self.sources[i], &records, &host);
            self.metrics.link_control_flows.inc_by(full.link_control());
            let (graph, body, elements) = self.bound(&self.sources[i], full, &always, end);
            for e in graph.edges.values() {
                by_status[e.health.status as usize].1 += 1;
            }
            let sg = SourceGraph::new(
                &self.sources[i],
                &self.skip_fields,
                (self.interval_start, end),
                Arc::new(graph),
                vec![always],
            )
            .with_body(body, elements);
            for s in &mut self.sinks {
                s.graph(&sg)?;
            }
            self.metrics.batches_built.inc();
            graphs += 1;
        }
        self.metrics.set_edge_status(&by_status);
        for s in &mut self.sinks {
            s.finish()?;
        }
        self.interval_start = end;
        let report = self.count(&drained, &records, graphs);
        let t_all = t0.elapsed();
        self.metrics.flush_seconds.set(t_all.as_secs_f64());
        info!(
            flows = report.flows,
            connections = report.connections,
            packets = report.packets,
            drain_ms = t_drain.as_millis() as u64,
            host_ms = (t_host - t_drain).as_millis() as u64,
            ingest_ms = (t_ingest - t_host).as_millis() as u64,
            total_ms = t_all.as_millis() as u64,
            "interval"
        );
        Ok(report)
    }

    /// Drained kernel entries → one record per connection.
    fn ingest(
        &mut self,
        drained: &Drained,
        host: &HostView,
        src: &dyn FlowSource,
    ) -> Vec<FlowRecord> {
        let name = |idx: u32| src.interface_name(idx);
        let cx = Context {
            now_mono_ns: clock_ns(libc::CLOCK_MONOTONIC),
            clock: Clock::now(),
            host,
            name: &name,
        };
        self.table
            .set_retransmits(drained.retransmits.iter().copied());
        self.table.set_drops(
            drained
                .drops
                .iter()
                .filter_map(|d| Some((d.conn?, d.reason.clone(), d.count))),
        );
        self.table.set_srtt(drained.srtt.iter().copied());
        self.table.ingest(&drained.flows, &cx)
    }

    /// Learns names from the captured DNS answers and ClientHellos, then
    /// names the records' ends (issue 14).
    fn name(&mut self, drained: &Drained, records: &mut [FlowRecord]) {
        let Some(n) = &mut self.names else {
            return;
        };
        let now = Instant::now();
        n.learn(&drained.names, now);
        n.label(records, now);
        let (entries, bytes) = n.dns_size();
        let counts = std::mem::take(&mut n.counts);
        self.metrics
            .names(&counts, entries, bytes, drained.names_dropped);
    }

    /// Sets the processes of the records' local ends: those the kernel saw
    /// connect or accept, else those of the sockets read from sock_diag and
    /// /proc (again, at most every RESCAN_EVERY, while an end is unknown).
    fn own(&mut self, drained: &Drained, records: &mut [FlowRecord], host: &HostView) {
        let Some(p) = &mut self.processes else {
            return;
        };
        let now = Instant::now();
        p.learn(&drained.procs, now);
        p.scan_if_due(now);
        p.label(records, host, now);
        self.metrics
            .processes(&p.counts, p.len(), drained.procs_dropped);
    }

    /// Kubernetes mode: forget pods past their grace, publish cache sizes.
    fn refresh_kube(&self, now: SystemTime) {
        if let Some(k) = &self.kube {
            k.refresh(now, &self.metrics);
        }
    }

    /// One data source's graph, as a draft (its edges not yet in the tree:
    /// `bound` folds most graphs of many edges), and the endpoint it always
    /// reports (this host, or this node).
    fn build<'r>(
        &self,
        src: &FlowsSource,
        records: &'r [FlowRecord],
        host: &HostView,
    ) -> (Draft<'r>, Endpoint) {
        let records = || records.iter().filter(|r| on_interfaces_of(src, r));
        if let (Some(k), DeployedAt::Kubernetes) = (&self.kube, src.deployed_at) {
            let cluster = crate::enrich::kube::watch::read(&k.cluster);
            let resolver = KubeResolver {
                cluster: &cluster,
                cluster_uid: k.uids.get(&src.id).map(String::as_str).unwrap_or_default(),
                data_source_id: &src.id,
                node: &k.node,
                host,
            };
            return (
                Draft::build_from(records(), &resolver),
                resolver.node_endpoint(&k.node),
            );
        }
        let resolver = ServerResolver {
            data_source_id: &src.id,
            host,
        };
        (
            Draft::build_from(records(), &resolver),
            resolver.host_endpoint(),
        )
    }

    /// `full` with its external endpoints folded to the data source's cap
    /// (`max_external_endpoints`), then further until its Coordimap batch
    /// fits `MAX_BODY_BYTES`; one log line when anything folded, and the
    /// counters on /metrics.
    /// Folds past the caps and judges the status of what is left (a folded
    /// edge on its merged health), so the size measured is the size sent.
    /// Returns the graph with its batch (body and element count): the
    /// bytes that measured it are the bytes the sinks get, encoded once,
    /// and a try that goes past the cap stops encoding there.
    fn bound(
        &self,
        src: &FlowsSource,
        full: Draft<'_>,
        always: &Endpoint,
        end: SystemTime,
    ) -> (Graph, Vec<u8>, usize) {
        // The full graph stays a draft while it folds (issue 16: its edges
        // never become a tree then); it becomes the graph, and is judged,
        // only if it is the one sent, or the one a smaller cap folds.
        let mut full = Full::Draft(full);
        let mut judged = false;
        let mut cap = src.max_external_endpoints;
        let interval = (self.interval_start, end);
        let always = std::slice::from_ref(always);
        // The graph as built when nothing needs folding (no copy).
        let (folded, (body, elements)) = loop {
            let lim = Limits::new(cap);
            let cand = {
                let flat = full.flat();
                fold::needed_in(&flat, &lim).then(|| {
                    let (mut g, f) = fold::bound_in(&flat, &src.id, &lim);
                    crate::status::apply(&mut g, &src.status);
                    (g, f)
                })
            };
            if cand.is_none() && !judged {
                let mut g = full.into_graph();
                crate::status::apply(&mut g, &src.status);
                full = Full::Graph(g);
                judged = true;
            }
            let g = match (&cand, &full) {
                (Some((g, _)), _) | (None, Full::Graph(g)) => g,
                (None, Full::Draft(_)) => unreachable!("judged above"),
            };
            // With nothing left to fold the batch goes whatever its size.
            let limit = if cap == 0 { usize::MAX } else { MAX_BODY_BYTES };
            if let Some(b) = body_within(g, always, src, &self.skip_fields, interval, limit) {
                break (cand, b);
            }
            cap /= 2;
        };
        let (g, f) = folded.unwrap_or_else(|| (full.into_graph(), fold::Folded::default()));
        self.count_folded(src, &f, cap, body.len());
        (g, body, elements)
    }

    /// The counters and the one log line of what `bound` folded.
    fn count_folded(&self, src: &FlowsSource, f: &fold::Folded, cap: usize, len: usize) {
        let m = &self.metrics;
        m.batch_bytes.set(len as i64);
        m.external_addresses_folded.inc_by(f.addresses);
        m.external_flows_folded.inc_by(f.flows);
        if cap < src.max_external_endpoints {
            m.batches_shrunk.inc();
        }
        if f.addresses > 0 {
            warn!(
                data_source = %src.id,
                named = f.named,
                folded_addresses = f.addresses,
                folded_flows = f.flows,
                aggregates = f.aggregates,
                cap,
                batch_bytes = len,
                "external endpoints past the cap folded into aggregates"
            );
        }
        if len > MAX_BODY_BYTES {
            error!(data_source = %src.id, batch_bytes = len, limit = MAX_BODY_BYTES, "the batch is over the size cap even with every external address folded (its own endpoints alone are that many)");
        }
    }

    /// Metrics and the warning about packets not counted normally.
    fn count(&mut self, drained: &Drained, records: &[FlowRecord], graphs: usize) -> Report {
        let m = &self.metrics;
        let c2s = records.iter().fold((0, 0), |(p, b), r| {
            (p + r.src_to_dst.packets, b + r.src_to_dst.bytes)
        });
        let s2c = records.iter().fold((0, 0), |(p, b), r| {
            (p + r.dst_to_src.packets, b + r.dst_to_src.bytes)
        });
        for (dir, (p, b)) in [("client_to_server", c2s), ("server_to_client", s2c)] {
            let d = Direction {
                direction: dir.into(),
            };
            m.packets.get_or_create(&d).inc_by(p);
            m.bytes.get_or_create(&d).inc_by(b);
        }
        for r in records {
            if let Some(f) = r.health.failure {
                m.connection_failures
                    .get_or_create(&crate::serve::metrics::Cause {
                        cause: f.name().into(),
                    })
                    .inc();
            }
        }
        for d in &drained.drops {
            m.kernel_drops
                .get_or_create(&crate::serve::metrics::DropReason {
                    reason: d.reason.to_string(),
                })
                .inc_by(d.count);
        }
        m.flows_active.set(self.table.len() as i64);
        m.flows_interval.set(records.len() as i64);
        m.kernel_map_entries.set(drained.flows.len() as i64);
        m.kernel_map_capacity.set(self.max_flows as i64);
        m.kernel_stats(&drained.stats);
        // Index 0 (non-IP) is not a loss.
        let losses: Vec<String> = (1..STAT_NAMES.len())
            .filter_map(|i| {
                let d = drained.stats[i].saturating_sub(self.last_stats[i]);
                (d > 0).then(|| format!("{}={d}", STAT_NAMES[i]))
            })
            .collect();
        self.last_stats = drained.stats;
        if !losses.is_empty() || drained.overflow_dropped > 0 {
            warn!(
                losses = %losses.join(" "),
                overflow_dropped_in_user_space = drained.overflow_dropped,
                "packets not counted normally this interval (see README: kernel statistics)"
            );
        }
        Report {
            flows: records.len(),
            connections: self.table.len(),
            packets: c2s.0 + s2c.0,
            graphs,
        }
    }

    /// The agent stops: every sink writes what it has queued.
    pub fn close(&mut self) {
        for s in self.sinks.drain(..) {
            s.close();
        }
    }
}
