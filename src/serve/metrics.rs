//! The agent's own metrics, in Prometheus text format on /metrics.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::sinks::coordimap::spool::DeliveryStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropReason {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Cause {
    pub cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Direction {
    pub direction: String,
}

/// Health as /healthz reports it.
#[derive(Debug, Default)]
pub struct Health {
    pub interfaces_attached: AtomicU64,
    pub datapath_loaded: AtomicBool,
    pub store_ok: Arc<AtomicBool>,
    pub store_enabled: AtomicBool,
    pub collector_enabled: AtomicBool,
    pub kube_enabled: AtomicBool,
    /// Every watch cache has had its first full list.
    pub kube_synced: AtomicBool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub packets: Family<Direction, Counter>,
    pub bytes: Family<Direction, Counter>,
    pub flows_active: Gauge,
    pub flows_interval: Gauge,
    pub kernel_map_entries: Gauge,
    pub kernel_map_capacity: Gauge,
    pub kernel_events: Family<Reason, Counter>,
    pub interfaces_attached: Gauge,
    pub batches_built: Counter,
    pub link_control_flows: Counter,
    pub external_addresses_folded: Counter,
    pub external_flows_folded: Counter,
    pub batches_shrunk: Counter,
    pub batch_bytes: Gauge,
    pub delivery: Arc<DeliveryStats>,
    pub store_written: Counter,
    pub store_errors: Counter,
    pub store_dropped: Counter,
    pub health: Arc<Health>,
    pub flush_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub resident_memory: Gauge,
    pub kernel_map_memory: Gauge,
    pub kube_objects: Family<KindLabel, Gauge>,
    pub kube_watch_errors: Counter,
    pub kube_relists: Counter,
    /// Edges of the last interval by status (all data sources).
    pub edges_by_status: Family<StatusLabel, Gauge>,
    /// Failed attempts to connect, by cause.
    pub connection_failures: Family<Cause, Counter>,
    /// Packets the kernel dropped, by reason (one series per reason seen;
    /// the kernel's enum is bounded, and at most 1024 names are kept).
    pub kernel_drops: Family<DropReason, Counter>,
    /// Issue 14: what the name resolver did, and its DNS table's size.
    pub names_events: Family<KindLabel, Counter>,
    pub names_dns_entries: Gauge,
    pub names_dns_bytes: Gauge,
    /// Issue 14: what the process table did, and how many sockets it knows.
    pub process_events: Family<KindLabel, Counter>,
    pub process_sockets: Gauge,
    last_kernel: [AtomicU64; crate::datapath::STAT_NAMES.len()],
}

impl Metrics {
    pub fn new(delivery: Arc<DeliveryStats>) -> Metrics {
        let mut r = Registry::with_prefix("flowmap");
        let m = Metrics {
            registry: Registry::default(),
            packets: Family::default(),
            bytes: Family::default(),
            flows_active: Gauge::default(),
            flows_interval: Gauge::default(),
            kernel_map_entries: Gauge::default(),
            kernel_map_capacity: Gauge::default(),
            kernel_events: Family::default(),
            interfaces_attached: Gauge::default(),
            batches_built: Counter::default(),
            link_control_flows: Counter::default(),
            external_addresses_folded: Counter::default(),
            external_flows_folded: Counter::default(),
            batches_shrunk: Counter::default(),
            batch_bytes: Gauge::default(),
            delivery,
            store_written: Counter::default(),
            store_errors: Counter::default(),
            store_dropped: Counter::default(),
            health: Arc::new(Health::default()),
            flush_seconds: Gauge::default(),
            resident_memory: Gauge::default(),
            kernel_map_memory: Gauge::default(),
            kube_objects: Family::default(),
            kube_watch_errors: Counter::default(),
            kube_relists: Counter::default(),
            edges_by_status: Family::default(),
            connection_failures: Family::default(),
            kernel_drops: Family::default(),
            names_events: Family::default(),
            names_dns_entries: Gauge::default(),
            names_dns_bytes: Gauge::default(),
            process_events: Family::default(),
            process_sockets: Gauge::default(),
            last_kernel: Default::default(),
        };
        m.register_flows(&mut r);
        m.register_sinks(&mut r);
        m.register_agent(&mut r);
        m.register_health(&mut r);
        m.register_names(&mut r);
        Metrics { registry: r, ..m }
    }

    /// Edge health: a fixed set of series (four statuses, three causes),
    /// never one per edge.
    fn register_health(&self, r: &mut Registry) {
        for s in crate::status::Status::ALL {
            let _ = self.edges_by_status.get_or_create(&StatusLabel {
                status: s.name().into(),
            });
        }
        for c in ["refused", "unanswered", "unreachable"] {
            let _ = self
                .connection_failures
                .get_or_create(&Cause { cause: c.into() });
        }
        r.register(
            "edges_by_status",
            "Edges of the last interval by status (NoStatus, Green, Orange, Red), all data sources",
            self.edges_by_status.clone(),
        );
        r.register(
            "connection_failures",
            "Failed attempts to connect, by cause (refused, unanswered, unreachable)",
            self.connection_failures.clone(),
        );
        r.register(
            "kernel_drops",
            "Packets the kernel dropped (skb:kfree_skb), by the reason of its enum skb_drop_reason",
            self.kernel_drops.clone(),
        );
    }

    /// Sets the edges-by-status gauges from one interval's counts.
    pub fn set_edge_status(&self, counts: &[(crate::status::Status, i64)]) {
        for (s, n) in counts {
            self.edges_by_status
                .get_or_create(&StatusLabel {
                    status: s.name().into(),
                })
                .set(*n);
        }
    }

    /// Traffic and the kernel program.
    fn register_flows(&self, r: &mut Registry) {
        r.register(
            "packets",
            "Packets counted into flows, by direction (client_to_server, server_to_client)",
            self.packets.clone(),
        );
        r.register(
            "bytes",
            "Bytes counted into flows, by direction",
            self.bytes.clone(),
        );
        r.register(
            "flows_active",
            "Connections the agent keeps track of",
            self.flows_active.clone(),
        );
        r.register(
            "flows_last_interval",
            "Connections with traffic in the last interval",
            self.flows_interval.clone(),
        );
        r.register(
            "kernel_map_entries",
            "Entries the kernel flow map held at the last drain",
            self.kernel_map_entries.clone(),
        );
        r.register(
            "kernel_map_capacity",
            "Entries each kernel flow map can hold (max_flows)",
            self.kernel_map_capacity.clone(),
        );
        r.register(
            "kernel_events",
            "Kernel statistics by reason: non_ip, truncated, bad_header, ext_chain_too_long, frag_no_head, map_full (handed over by ring buffer), ring_lost (lost)",
            self.kernel_events.clone(),
        );
        r.register(
            "interfaces_attached",
            "Interfaces the program is attached to",
            self.interfaces_attached.clone(),
        );
        r.register(
            "batches_built",
            "Coordimap batches built (one per data source per interval)",
            self.batches_built.clone(),
        );
        r.register(
            "link_control_flows",
            "Link-scope control flows (ICMPv6 between fe80:: addresses, broadcast, link-local multicast) left off the graph",
            self.link_control_flows.clone(),
        );
        self.register_bounds(r);
    }

    /// The caps against hostile traffic (graph folding, batch size).
    fn register_bounds(&self, r: &mut Registry) {
        r.register(
            "external_addresses_folded",
            "External addresses folded into aggregate endpoints (past max_external_endpoints), summed over intervals and data sources",
            self.external_addresses_folded.clone(),
        );
        r.register(
            "external_flows_folded",
            "Connections (flow records) counted into aggregate endpoints instead of named ones",
            self.external_flows_folded.clone(),
        );
        r.register(
            "batches_shrunk",
            "Batches whose graph was folded further to stay under the batch size cap (8 MiB)",
            self.batches_shrunk.clone(),
        );
        r.register(
            "batch_bytes",
            "Size of the last Coordimap batch body built",
            self.batch_bytes.clone(),
        );
    }

    /// Delivery to the collector and the local store.
    fn register_sinks(&self, r: &mut Registry) {
        r.register(
            "batches_spooled",
            "Batches written to the delivery spool",
            self.delivery.batches_spooled.clone(),
        );
        r.register(
            "batches_shipped",
            "Batches the collector accepted",
            self.delivery.batches_delivered.clone(),
        );
        r.register(
            "delivery_failures",
            "Failed delivery attempts (retried)",
            self.delivery.attempts_failed.clone(),
        );
        r.register(
            "batches_dropped",
            "Batches dropped because the spool was full",
            self.delivery.batches_dropped.clone(),
        );
        r.register(
            "batches_rejected",
            "Batches the collector refused for good",
            self.delivery.batches_rejected.clone(),
        );
        r.register(
            "batches_lost",
            "Batches that could not be written to the spool (never sent)",
            self.delivery.batches_lost.clone(),
        );
        r.register(
            "spool_quarantined",
            "Spool files that could not be read or parsed, moved to the quarantine",
            self.delivery.spool_quarantined.clone(),
        );
        r.register(
            "spool_batches",
            "Batches waiting in the spool",
            self.delivery.spool_batches.clone(),
        );
        r.register(
            "last_delivery_timestamp_seconds",
            "Unix time of the last accepted batch (0: never)",
            self.delivery.last_delivery_unix.clone(),
        );
        r.register(
            "store_intervals_written",
            "Intervals written to the local store",
            self.store_written.clone(),
        );
        r.register(
            "store_errors",
            "Failed writes to the local store",
            self.store_errors.clone(),
        );
        r.register(
            "store_intervals_dropped",
            "Intervals dropped because the store could not keep up",
            self.store_dropped.clone(),
        );
    }

    /// The agent itself and Kubernetes mode.
    fn register_agent(&self, r: &mut Registry) {
        r.register(
            "interval_processing_seconds",
            "Time the last interval took from drain to stored/spooled batch",
            self.flush_seconds.clone(),
        );
        r.register(
            "resident_memory_bytes",
            "Resident memory of the agent process",
            self.resident_memory.clone(),
        );
        r.register(
            "kernel_map_memory_bytes",
            "Kernel memory charged for the program's maps",
            self.kernel_map_memory.clone(),
        );
        r.register(
            "kube_objects",
            "Kubernetes mode: objects in the watch caches (pods, pod_ip_records incl. deleted pods within grace, replicasets, jobs, services, nodes)",
            self.kube_objects.clone(),
        );
        r.register(
            "kube_watch_errors",
            "Kubernetes mode: watch or list errors (each retried with backoff)",
            self.kube_watch_errors.clone(),
        );
        r.register(
            "kube_relists",
            "Kubernetes mode: full lists of a watched kind (one per kind at start, again after 410 Gone)",
            self.kube_relists.clone(),
        );
        r.register(
            "build",
            "Version and git commit of this binary",
            prometheus_client::metrics::info::Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION")),
                ("commit", env!("FLOWMAP_GIT_COMMIT")),
            ]),
        );
    }

    /// The name resolver (issue 14).
    fn register_names(&self, r: &mut Registry) {
        r.register(
            "names_events",
            "Name resolver events: dns_answers, dns_unparsed, tls_names, tls_unparsed, http_hosts, http_unparsed, quic_names, quic_unparsed, evicted, queue_dropped",
            self.names_events.clone(),
        );
        r.register(
            "names_dns_entries",
            "(client, address) -> DNS name entries kept",
            self.names_dns_entries.clone(),
        );
        r.register(
            "names_dns_bytes",
            "Bytes of the DNS names kept",
            self.names_dns_bytes.clone(),
        );
        r.register(
            "process_events",
            "Process table events: scans (sock_diag + /proc), scan_errors, evicted, queue_dropped",
            self.process_events.clone(),
        );
        r.register(
            "process_sockets",
            "Local sockets whose process is known",
            self.process_sockets.clone(),
        );
    }

    /// One interval of the process table (issue 14): its counts since the
    /// last call (they are cumulative there).
    pub fn processes(
        &self,
        c: &crate::enrich::process::ProcessCounts,
        sockets: usize,
        queue_dropped: u64,
    ) {
        for (kind, v) in [
            ("scans", c.scans),
            ("scan_errors", c.scan_errors),
            ("evicted", c.evicted),
        ] {
            let ctr = self
                .process_events
                .get_or_create(&KindLabel { kind: kind.into() });
            let now = ctr.get();
            ctr.inc_by(v.saturating_sub(now));
        }
        self.process_events
            .get_or_create(&KindLabel {
                kind: "queue_dropped".into(),
            })
            .inc_by(queue_dropped);
        self.process_sockets.set(sockets as i64);
    }

    /// One interval of the name resolver: its counts since the last call.
    pub fn names(
        &self,
        c: &crate::enrich::names::NameCounts,
        entries: usize,
        bytes: usize,
        queue_dropped: u64,
    ) {
        for (kind, v) in [
            ("dns_answers", c.dns_answers),
            ("dns_unparsed", c.dns_unparsed),
            ("tls_names", c.tls_names),
            ("tls_unparsed", c.tls_unparsed),
            ("http_hosts", c.http_hosts),
            ("http_unparsed", c.http_unparsed),
            ("quic_names", c.quic_names),
            ("quic_unparsed", c.quic_unparsed),
            ("evicted", c.evicted),
            ("queue_dropped", queue_dropped),
        ] {
            self.names_events
                .get_or_create(&KindLabel { kind: kind.into() })
                .inc_by(v);
        }
        self.names_dns_entries.set(entries as i64);
        self.names_dns_bytes.set(bytes as i64);
    }

    /// Kernel statistics are cumulative; counters move by the difference.
    pub fn kernel_stats(&self, now: &[u64]) {
        for (i, name) in crate::datapath::STAT_NAMES.iter().enumerate() {
            let prev = self.last_kernel[i].swap(now[i], Ordering::Relaxed);
            let d = now[i].saturating_sub(prev);
            self.kernel_events
                .get_or_create(&Reason {
                    reason: name.to_string(),
                })
                .inc_by(d);
        }
    }

    pub fn encode(&self) -> String {
        self.resident_memory.set(resident_bytes() as i64);
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Resident memory of this process (VmRSS), in bytes.
pub fn resident_bytes() -> u64 {
    resident_bytes_of("self")
}

/// Resident memory (VmRSS) of a process, `pid` a number or `self`.
pub fn resident_bytes_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}
