//! The service graph of one interval: endpoints and the edges between
//! them, aggregated from the interval's flow records. Ephemeral client
//! ports disappear: an edge is client endpoint → server endpoint on
//! (protocol, server port).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

use crate::enrich::{is_link_control_flow, Endpoint, EndpointKind, Resolve};
use crate::flow::{EndNames, FlowRecord};

pub mod fold;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeKey {
    pub client: Arc<str>,
    pub server: Arc<str>,
    pub protocol: Cow<'static, str>,
    pub port: u16,
}

/// The derived order (client, server, protocol, port, each as a string or
/// number), with IDs that share their allocation taken as equal without
/// comparing their bytes: a graph's keys share the endpoints' IDs, and
/// the comparisons of the edge tree were a third of building it for
/// 100k edges (issue 16's profile).
impl Ord for EdgeKey {
    fn cmp(&self, o: &EdgeKey) -> std::cmp::Ordering {
        fn id(a: &Arc<str>, b: &Arc<str>) -> std::cmp::Ordering {
            if Arc::ptr_eq(a, b) {
                std::cmp::Ordering::Equal
            } else {
                a.cmp(b)
            }
        }
        id(&self.client, &o.client)
            .then_with(|| id(&self.server, &o.server))
            .then_with(|| self.protocol.cmp(&o.protocol))
            .then_with(|| self.port.cmp(&o.port))
    }
}

impl PartialOrd for EdgeKey {
    fn partial_cmp(&self, o: &EdgeKey) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Handshake {
    pub count: u64,
    pub min_us: f64,
    pub mean_us: f64,
    pub max_us: f64,
}

/// One (protocol, server port) entry of an edge over one interval.
///
/// Its JSON (hand-written below, without serde's `flatten`, in this
/// order): `protocol`, `port`, the connection and traffic counts,
/// `handshake` (absent when none), `tcp_resets`, `first_seen`,
/// `last_seen`, then the fields of [`crate::status::EdgeHealth`] (its
/// `drops` and `srtt_us` absent when none), `status` last.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeStats {
    pub protocol: Cow<'static, str>,
    pub port: u16,
    /// Connections first seen in this interval.
    pub connections_opened: u64,
    /// Connections with traffic in this interval.
    pub connections_active: u64,
    pub packets_client_to_server: u64,
    pub bytes_client_to_server: u64,
    pub packets_server_to_client: u64,
    pub bytes_server_to_client: u64,
    /// Out of line: most edges of a busy interval have none, and it was
    /// 40 of the edge's 312 bytes (issue 16).
    pub handshake: Option<Box<Handshake>>,
    pub tcp_resets: u64,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    /// Failed attempts, retransmits, resets and the status (`status`).
    pub health: crate::status::EdgeHealth,
    /// The sum of the handshake times (not written).
    rtt_sum: f64,
}

impl Serialize for EdgeStats {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use crate::flow::Micros;
        use serde::ser::SerializeMap;
        // A map, as the derived serialisation with a flattened `health`
        // wrote it (same keys, order and values).
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("protocol", &*self.protocol)?;
        m.serialize_entry("port", &self.port)?;
        m.serialize_entry("connections_opened", &self.connections_opened)?;
        m.serialize_entry("connections_active", &self.connections_active)?;
        m.serialize_entry("packets_client_to_server", &self.packets_client_to_server)?;
        m.serialize_entry("bytes_client_to_server", &self.bytes_client_to_server)?;
        m.serialize_entry("packets_server_to_client", &self.packets_server_to_client)?;
        m.serialize_entry("bytes_server_to_client", &self.bytes_server_to_client)?;
        if let Some(h) = &self.handshake {
            m.serialize_entry("handshake", h)?;
        }
        m.serialize_entry("tcp_resets", &self.tcp_resets)?;
        m.serialize_entry("first_seen", &Micros(&self.first_seen))?;
        m.serialize_entry("last_seen", &Micros(&self.last_seen))?;
        let h = &self.health;
        m.serialize_entry("connections_attempted", &h.connections_attempted)?;
        m.serialize_entry("connections_failed", &h.connections_failed)?;
        crate::flow::health::serialize_tcp_counts(
            &mut m,
            [
                h.syn_retransmits,
                h.resets_client,
                h.resets_server,
                h.retransmits_client_to_server,
                h.retransmits_server_to_client,
            ],
        )?;
        if !h.drops.is_empty() {
            m.serialize_entry("drops", &h.drops)?;
        }
        if let Some(v) = &h.srtt_us {
            m.serialize_entry("srtt_us", v)?;
        }
        m.serialize_entry("status", &h.status)?;
        m.end()
    }
}

#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub endpoints: BTreeMap<Arc<str>, Endpoint>,
    pub edges: BTreeMap<EdgeKey, EdgeStats>,
    /// Link-scope control flows (neighbour discovery, broadcasts) left off
    /// the graph; counted in /metrics.
    pub link_control: u64,
    /// Status of server endpoints: the worst of their incoming edges
    /// (set by `status::apply`).
    pub endpoint_status: BTreeMap<Arc<str>, crate::status::Status>,
    /// Containment (issue 14): (host, process of that host), sent as
    /// parent-child relationships (relation type 3).
    pub children: std::collections::BTreeSet<(Arc<str>, Arc<str>)>,
}

impl Graph {
    /// Aggregates one interval's records. A connection whose both ends are
    /// the same endpoint (this host talking to itself) makes no edge, and
    /// neither does link-local control traffic (to ff02::/16, 224.0.0.0/24
    /// or 255.255.255.255: neighbour discovery, MLD, IGMP, DHCP): it is
    /// no service. Both stay in the flow records.
    ///
    /// A connection to a Service ClusterIP is seen twice on a node: before
    /// kube-proxy's DNAT (client → ClusterIP:port) and after it (client →
    /// pod:targetPort), with the same client address and port. The first
    /// makes the edge client → service; the second, matched on (protocol,
    /// client address, client port), makes service → pod instead of
    /// client → pod.
    pub fn build(records: &[FlowRecord], resolve: &dyn Resolve) -> Graph {
        Graph::build_from(records.iter(), resolve)
    }

    /// `build` over any selection of the interval's records (a data
    /// source's interfaces), without copying them.
    pub fn build_from<'r>(
        records: impl IntoIterator<Item = &'r FlowRecord>,
        resolve: &dyn Resolve,
    ) -> Graph {
        Draft::build_from(records, resolve).into_graph()
    }

    /// Issue 14: an external end with a name becomes the endpoint of that
    /// name, `<data_source_id>-flows.external-<name>`, which gathers every
    /// address and name seen for it this interval. Any other end keeps `ep`.
    fn named(
        &mut self,
        resolve: &dyn Resolve,
        ep: (u32, EndpointKind),
        ip: IpAddr,
        names: &EndNames,
        ids: &mut Ids,
        renamed: &mut Vec<u32>,
    ) -> u32 {
        let (id, kind) = ep;
        let Some(name) = names.name().filter(|_| kind == EndpointKind::External) else {
            return id;
        };
        let named = resolve.named_external(name);
        let key: Arc<str> = match self.endpoints.get_key_value(named.id.as_str()) {
            Some((k, _)) => k.clone(),
            None => named.id.as_str().into(),
        };
        let e = self.endpoints.entry(key.clone()).or_insert(named);
        let add = |list: &mut Vec<String>, v: Option<&Arc<str>>| {
            if let Some(v) = v.filter(|v| !list.iter().any(|x| x == &***v)) {
                list.push(v.to_string());
            }
        };
        add(&mut e.dns_names, names.dns.as_ref());
        add(&mut e.tls_server_names, names.tls.as_ref());
        add(&mut e.http_hosts, names.http.as_ref());
        if !e.addresses.contains(&ip) {
            e.addresses.push(ip);
        }
        renamed.push(id);
        ids.of(&key)
    }

    /// Issue 14: a local end whose process is known goes to the endpoint
    /// the resolver gives that process (server mode: the process endpoint,
    /// a child of the host, gathering the addresses and pids seen for it).
    fn owned(
        &mut self,
        resolve: &dyn Resolve,
        ep: (u32, EndpointKind),
        ip: IpAddr,
        p: &Option<Arc<crate::enrich::process::Process>>,
        ids: &mut Ids,
    ) -> (u32, EndpointKind) {
        let Some(p) = p else {
            return ep;
        };
        let Some(owner) = self
            .endpoints
            .get(&ids.ids[ep.0 as usize])
            .and_then(|e| resolve.process(e, ip, p))
        else {
            return ep;
        };
        let kind = owner.kind;
        let key: Arc<str> = match self.endpoints.get_key_value(owner.id.as_str()) {
            Some((k, _)) => k.clone(),
            None => owner.id.as_str().into(),
        };
        let e = self.endpoints.entry(key.clone()).or_insert(owner);
        if !e.addresses.contains(&ip) {
            e.addresses.push(ip);
        }
        if let Some(pp) = &mut e.process {
            if !pp.pids.contains(&p.pid) && pp.pids.len() < crate::enrich::PROCESS_PIDS_MAX {
                pp.pids.push(p.pid);
                pp.pids.sort_unstable();
            }
            if pp.exe.is_none() {
                pp.exe = p.exe.as_deref().map(str::to_string);
            }
        }
        if kind == EndpointKind::Process {
            self.children
                .insert((ids.ids[ep.0 as usize].clone(), key.clone()));
        }
        (ids.of(&key), kind)
    }
}

type Fast<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The endpoint IDs of a graph being built, each once, by index.
#[derive(Default)]
struct Ids {
    ids: Vec<Arc<str>>,
    index: Fast<Arc<str>, u32>,
}

impl Ids {
    /// The index of `id` (by its text), added if new.
    fn of(&mut self, id: &Arc<str>) -> u32 {
        if let Some(i) = self.index.get(&**id) {
            return *i;
        }
        self.ids.push(id.clone());
        let i = (self.ids.len() - 1) as u32;
        self.index.insert(id.clone(), i);
        i
    }
}

/// A graph as built, before its edges go into the tree: endpoints as
/// indices, and each edge as its ends, protocol, port and byte count with
/// the records it sums, not as an `EdgeStats`: a graph that folds (issue
/// 16: 100k edges to a few addresses, each its own port) then never makes
/// a tree node, an `EdgeStats` (280 bytes of fresh memory) or an ID clone
/// per edge; only the folded graph's edges are. `into_graph` gives the
/// same `Graph` as inserting each record's edge into the tree.
pub struct Draft<'r> {
    /// The endpoints, link-control count and containment; no edges.
    graph: Graph,
    /// Endpoint index → ID (each ID once).
    ids: Vec<Arc<str>>,
    /// The edges, in the tree's order (`EdgeKey`'s).
    edges: Vec<DraftEdge>,
    /// The records of the edges: each edge's together, in the edges'
    /// order, and in the order they came within an edge.
    records: Vec<&'r FlowRecord>,
}

/// One edge of a [`Draft`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct DraftEdge {
    pub client: u32,
    pub server: u32,
    pub port: u16,
    /// Bytes both ways over its records.
    pub bytes: u64,
    /// Its records: a range of `Draft::records`.
    pub start: u32,
    pub end: u32,
}

impl<'r> Draft<'r> {
    /// See `Graph::build`.
    pub fn build_from(
        records: impl IntoIterator<Item = &'r FlowRecord>,
        resolve: &dyn Resolve,
    ) -> Draft<'r> {
        let mut g = Graph::default();
        let mut ids = Ids::default();
        // Each (address, holder) is resolved once per interval.
        let mut resolved: Fast<(IpAddr, usize), (u32, EndpointKind)> = Fast::default();
        let mut id_of =
            |ip: IpAddr, at: SystemTime, g: &mut Graph, ids: &mut Ids| -> (u32, EndpointKind) {
                *resolved
                    .entry((ip, resolve.holder(ip, at)))
                    .or_insert_with(|| {
                        let ep = resolve.endpoint(ip, at);
                        let kind = ep.kind;
                        let id = match g.endpoints.get_key_value(ep.id.as_str()) {
                            Some((k, _)) => k.clone(),
                            None => {
                                let id: Arc<str> = ep.id.as_str().into();
                                g.endpoints.insert(id.clone(), ep);
                                id
                            }
                        };
                        (ids.of(&id), kind)
                    })
            };
        let (records, control): (Vec<&'r FlowRecord>, Vec<&'r FlowRecord>) = records
            .into_iter()
            .partition(|r| !is_link_control_flow(&r.protocol, r.src_ip, r.dst_ip));
        g.link_control = control.len() as u64;
        let mut servers = Vec::with_capacity(records.len());
        // (protocol, client address, client port) → the service it dialled.
        let mut via: Fast<(&str, IpAddr, u16), u32> = Fast::default();
        // IP-based external endpoints a name replaced (issue 14).
        let mut renamed: Vec<u32> = Vec::new();
        for r in &records {
            let server = id_of(r.dst_ip, r.last_seen, &mut g, &mut ids);
            let (server, kind) = g.owned(resolve, server, r.dst_ip, &r.dst_process, &mut ids);
            let server = g.named(
                resolve,
                (server, kind),
                r.dst_ip,
                r.dst_names(),
                &mut ids,
                &mut renamed,
            );
            if kind == EndpointKind::Service {
                via.insert((&*r.protocol, r.src_ip, r.src_port), server);
            }
            servers.push((server, kind));
        }
        // The protocols seen, by index (a handful per interval).
        let mut protos: Vec<&str> = Vec::new();
        // (client, server, protocol, port) → edge index, in the order the
        // edges came.
        let mut edge_at: Fast<(u32, u32, u32, u16), u32> = Fast::default();
        let mut edges: Vec<(DraftEdge, u32)> = Vec::new();
        // Per record with an edge: its edge.
        let mut of_record: Vec<(u32, &'r FlowRecord)> = Vec::with_capacity(records.len());
        for (r, (server, kind)) in records.iter().zip(servers) {
            let through = match kind {
                EndpointKind::Pod => via.get(&(&*r.protocol, r.src_ip, r.src_port)).copied(),
                _ => None,
            };
            let client = match through {
                Some(svc) => svc,
                None => {
                    let ep = id_of(r.src_ip, r.last_seen, &mut g, &mut ids);
                    let ep = g.owned(resolve, ep, r.src_ip, &r.src_process, &mut ids);
                    g.named(resolve, ep, r.src_ip, r.src_names(), &mut ids, &mut renamed)
                }
            };
            if client == server {
                continue;
            }
            let proto = match protos.iter().position(|p| **p == *r.protocol) {
                Some(i) => i,
                None => {
                    protos.push(&r.protocol);
                    protos.len() - 1
                }
            } as u32;
            let i = *edge_at
                .entry((client, server, proto, r.dst_port))
                .or_insert_with(|| {
                    let e = DraftEdge {
                        client,
                        server,
                        port: r.dst_port,
                        bytes: 0,
                        start: 0,
                        end: 0,
                    };
                    edges.push((e, proto));
                    (edges.len() - 1) as u32
                });
            let e = &mut edges[i as usize].0;
            e.bytes += r.src_to_dst.bytes + r.dst_to_src.bytes;
            // (Its record count until the ranges are laid out below.)
            e.end += 1;
            of_record.push((i, r));
        }
        drop(edge_at);
        // The tree's order: IDs and protocols by their text, then the port.
        let rank_of = |n: usize, cmp: &dyn Fn(usize, usize) -> std::cmp::Ordering| {
            let mut by: Vec<usize> = (0..n).collect();
            by.sort_unstable_by(|a, b| cmp(*a, *b));
            let mut rank = vec![0u32; n];
            for (r, i) in by.into_iter().enumerate() {
                rank[i] = r as u32;
            }
            rank
        };
        let id_rank = rank_of(ids.ids.len(), &|a, b| ids.ids[a].cmp(&ids.ids[b]));
        let proto_rank = rank_of(protos.len(), &|a, b| protos[a].cmp(protos[b]));
        let mut keys: Vec<(u64, u32, u32)> = edges
            .iter()
            .enumerate()
            .map(|(i, (e, p))| {
                (
                    (id_rank[e.client as usize] as u64) << 32 | id_rank[e.server as usize] as u64,
                    proto_rank[*p as usize] << 16 | e.port as u32,
                    i as u32,
                )
            })
            .collect();
        keys.sort_unstable();
        // Each edge's records in one range, edges in the tree's order
        // (a counting sort: records keep their order within an edge).
        let mut at = vec![0u32; edges.len()];
        let mut sorted = Vec::with_capacity(keys.len());
        let mut next = 0u32;
        for (_, _, i) in keys {
            let mut e = edges[i as usize].0;
            at[i as usize] = next;
            e.start = next;
            next += e.end;
            e.end = next;
            sorted.push(e);
        }
        drop(edges);
        let mut grouped: Vec<Option<&'r FlowRecord>> = vec![None; of_record.len()];
        for (i, r) in of_record {
            let slot = &mut at[i as usize];
            grouped[*slot as usize] = Some(r);
            *slot += 1;
        }
        let mut d = Draft {
            graph: g,
            ids: ids.ids,
            edges: sorted,
            records: grouped.into_iter().flatten().collect(),
        };
        d.drop_unused(renamed);
        d
    }

    /// Drops the address endpoints a name replaced on every edge.
    fn drop_unused(&mut self, renamed: Vec<u32>) {
        if renamed.is_empty() {
            return;
        }
        let mut used = vec![false; self.ids.len()];
        for e in &self.edges {
            used[e.client as usize] = true;
            used[e.server as usize] = true;
        }
        for id in renamed {
            if !used[id as usize] {
                self.graph.endpoints.remove(&self.ids[id as usize]);
            }
        }
    }

    /// The number of edges.
    pub fn edges(&self) -> usize {
        self.edges.len()
    }

    /// Link-scope control flows left off the graph.
    pub fn link_control(&self) -> u64 {
        self.graph.link_control
    }

    /// The records of edge `e`, in the order they came.
    pub(crate) fn records_of(&self, e: &DraftEdge) -> &[&'r FlowRecord] {
        &self.records[e.start as usize..e.end as usize]
    }

    /// The statistics of edge `e`: its records added in the order they
    /// came, as the tree's entry summed them.
    pub(crate) fn stats(records: &[&FlowRecord]) -> EdgeStats {
        let mut s = EdgeStats::new(records[0]);
        for r in records {
            s.add(r);
        }
        s
    }

    /// The graph: each edge keyed by its IDs, in the tree.
    pub fn into_graph(self) -> Graph {
        let sorted: Vec<(EdgeKey, EdgeStats)> = self
            .edges
            .iter()
            .map(|e| {
                let s = Draft::stats(self.records_of(e));
                let key = EdgeKey {
                    client: self.ids[e.client as usize].clone(),
                    server: self.ids[e.server as usize].clone(),
                    protocol: s.protocol.clone(),
                    port: e.port,
                };
                (key, s)
            })
            .collect();
        let mut graph = self.graph;
        // Already in order: the tree is built in one pass.
        graph.edges = sorted.into_iter().collect();
        graph
    }

    /// The edges in the tree's order, with their ends as indices into
    /// `ids()`, for folding.
    pub(crate) fn sorted(&self) -> &[DraftEdge] {
        &self.edges
    }

    pub(crate) fn ids(&self) -> &[Arc<str>] {
        &self.ids
    }

    /// Everything but the edges.
    pub(crate) fn graph(&self) -> &Graph {
        &self.graph
    }
}

impl EdgeStats {
    /// An edge with nothing counted yet, first seen with `r`.
    fn new(r: &FlowRecord) -> EdgeStats {
        EdgeStats {
            protocol: r.protocol.clone(),
            port: r.dst_port,
            connections_opened: 0,
            connections_active: 0,
            packets_client_to_server: 0,
            bytes_client_to_server: 0,
            packets_server_to_client: 0,
            bytes_server_to_client: 0,
            handshake: None,
            tcp_resets: 0,
            first_seen: r.first_seen,
            last_seen: r.last_seen,
            health: Default::default(),
            rtt_sum: 0.0,
        }
    }

    /// Adds another edge's statistics (folding edges together).
    pub fn merge(&mut self, o: &EdgeStats) {
        self.connections_opened += o.connections_opened;
        self.connections_active += o.connections_active;
        self.packets_client_to_server += o.packets_client_to_server;
        self.bytes_client_to_server += o.bytes_client_to_server;
        self.packets_server_to_client += o.packets_server_to_client;
        self.bytes_server_to_client += o.bytes_server_to_client;
        self.tcp_resets += o.tcp_resets;
        self.health.merge(&o.health);
        self.first_seen = self.first_seen.min(o.first_seen);
        self.last_seen = self.last_seen.max(o.last_seen);
        self.rtt_sum += o.rtt_sum;
        if let Some(oh) = &o.handshake {
            let h = self.handshake.get_or_insert_with(|| {
                Box::new(Handshake {
                    count: 0,
                    min_us: oh.min_us,
                    mean_us: 0.0,
                    max_us: oh.max_us,
                })
            });
            h.count += oh.count;
            h.min_us = h.min_us.min(oh.min_us);
            h.max_us = h.max_us.max(oh.max_us);
            h.mean_us = self.rtt_sum / h.count as f64;
        }
    }

    /// Adds one connection's record of the interval.
    fn add(&mut self, r: &FlowRecord) {
        self.connections_opened += r.opened as u64;
        self.connections_active += 1;
        self.packets_client_to_server += r.src_to_dst.packets;
        self.bytes_client_to_server += r.src_to_dst.bytes;
        self.packets_server_to_client += r.dst_to_src.packets;
        self.bytes_server_to_client += r.dst_to_src.bytes;
        self.tcp_resets += r.reset as u64;
        self.health.add(r);
        self.first_seen = self.first_seen.min(r.first_seen);
        self.last_seen = self.last_seen.max(r.last_seen);
        if let Some(rtt) = r.handshake_this_interval {
            self.rtt_sum += rtt;
            let h = self.handshake.get_or_insert_with(|| {
                Box::new(Handshake {
                    count: 0,
                    min_us: rtt,
                    mean_us: 0.0,
                    max_us: rtt,
                })
            });
            h.count += 1;
            h.min_us = h.min_us.min(rtt);
            h.max_us = h.max_us.max(rtt);
            h.mean_us = self.rtt_sum / h.count as f64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{EdgeHealth, Failures, Srtt, Status};
    use std::time::{Duration, UNIX_EPOCH};

    /// The edge as serde's derive wrote it (`health` flattened): the
    /// reference the hand-written serialisation must match byte for byte.
    #[derive(Serialize)]
    struct Derived {
        protocol: Cow<'static, str>,
        port: u16,
        connections_opened: u64,
        connections_active: u64,
        packets_client_to_server: u64,
        bytes_client_to_server: u64,
        packets_server_to_client: u64,
        bytes_server_to_client: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        handshake: Option<Handshake>,
        tcp_resets: u64,
        #[serde(serialize_with = "crate::flow::rfc3339_micros")]
        first_seen: SystemTime,
        #[serde(serialize_with = "crate::flow::rfc3339_micros")]
        last_seen: SystemTime,
        #[serde(flatten)]
        health: EdgeHealth,
    }

    fn derived(e: &EdgeStats) -> Derived {
        Derived {
            protocol: e.protocol.clone(),
            port: e.port,
            connections_opened: e.connections_opened,
            connections_active: e.connections_active,
            packets_client_to_server: e.packets_client_to_server,
            bytes_client_to_server: e.bytes_client_to_server,
            packets_server_to_client: e.packets_server_to_client,
            bytes_server_to_client: e.bytes_server_to_client,
            handshake: e.handshake.as_deref().cloned(),
            tcp_resets: e.tcp_resets,
            first_seen: e.first_seen,
            last_seen: e.last_seen,
            health: e.health.clone(),
        }
    }

    fn plain() -> EdgeStats {
        let at = UNIX_EPOCH + Duration::from_micros(1_700_000_000_000_001);
        EdgeStats {
            protocol: "udp".into(),
            port: 53,
            connections_opened: 1,
            connections_active: 2,
            packets_client_to_server: 3,
            bytes_client_to_server: 4,
            packets_server_to_client: 5,
            bytes_server_to_client: 6,
            handshake: None,
            tcp_resets: 0,
            first_seen: at,
            last_seen: at + Duration::from_secs(1),
            health: EdgeHealth::default(),
            rtt_sum: 0.0,
        }
    }

    /// A record with only a smoothed RTT sample of `us`.
    fn sampled(us: u32) -> FlowRecord {
        FlowRecord {
            interface: "eth0".into(),
            ifindex: 2,
            protocol: "tcp".into(),
            src_ip: "10.0.0.1".parse().unwrap(),
            src_port: 40000,
            dst_ip: "10.0.0.2".parse().unwrap(),
            dst_port: 443,
            src_to_dst: Default::default(),
            dst_to_src: Default::default(),
            tcp_flags: Default::default(),
            first_seen: UNIX_EPOCH,
            last_seen: UNIX_EPOCH,
            handshake_rtt_us: None,
            orientation: crate::flow::Orientation::Syn,
            opened: false,
            reset: false,
            handshake_this_interval: None,
            health: Default::default(),
            srtt_us: Some(us),
            src_process: None,
            dst_process: None,
            rare: None,
        }
    }

    /// Every field set, with characters JSON escapes in a drop reason.
    fn full() -> EdgeStats {
        let mut h = EdgeHealth::default();
        h.add(&sampled(100));
        h.add(&sampled(301));
        let srtt: Option<Srtt> = h.srtt_us;
        EdgeStats {
            protocol: "tcp".into(),
            port: 443,
            handshake: Some(Box::new(Handshake {
                count: 2,
                min_us: 10.5,
                mean_us: 15.25,
                max_us: 20.0,
            })),
            tcp_resets: 1,
            health: EdgeHealth {
                connections_attempted: 9,
                connections_failed: Failures {
                    refused: 1,
                    unanswered: 2,
                    unreachable: 3,
                },
                syn_retransmits: 4,
                resets_client: 5,
                resets_server: 6,
                retransmits_client_to_server: 7,
                retransmits_server_to_client: 8,
                drops: [("NETFILTER_DROP".into(), 2), ("a\"b\\c\n".into(), 1)]
                    .into_iter()
                    .collect(),
                srtt_us: srtt,
                status: Status::Red,
            },
            ..plain()
        }
    }

    #[test]
    fn the_written_edge_is_the_derived_json() {
        let mut cases = vec![plain(), full()];
        for s in Status::ALL {
            let mut e = plain();
            e.health.status = s;
            cases.push(e);
        }
        let mut e = full();
        e.handshake = None;
        cases.push(e);
        // 312 bytes with the handshake inline (issue 16).
        assert!(std::mem::size_of::<EdgeStats>() <= 280);
        for e in &cases {
            assert_eq!(
                serde_json::to_string(e).unwrap(),
                serde_json::to_string(&derived(e)).unwrap()
            );
        }
        assert_eq!(
            serde_json::to_string(&plain()).unwrap(),
            "{\"protocol\":\"udp\",\"port\":53,\"connections_opened\":1,\"connections_active\":2,\
             \"packets_client_to_server\":3,\"bytes_client_to_server\":4,\
             \"packets_server_to_client\":5,\"bytes_server_to_client\":6,\"tcp_resets\":0,\
             \"first_seen\":\"2023-11-14T22:13:20.000001Z\",\"last_seen\":\"2023-11-14T22:13:21.000001Z\",\
             \"connections_attempted\":0,\
             \"connections_failed\":{\"refused\":0,\"unanswered\":0,\"unreachable\":0},\
             \"syn_retransmits\":0,\"resets_client\":0,\"resets_server\":0,\
             \"retransmits_client_to_server\":0,\"retransmits_server_to_client\":0,\
             \"status\":\"NoStatus\"}"
        );
        assert_eq!(
            serde_json::to_string(&full()).unwrap(),
            "{\"protocol\":\"tcp\",\"port\":443,\"connections_opened\":1,\"connections_active\":2,\
             \"packets_client_to_server\":3,\"bytes_client_to_server\":4,\
             \"packets_server_to_client\":5,\"bytes_server_to_client\":6,\
             \"handshake\":{\"count\":2,\"min_us\":10.5,\"mean_us\":15.25,\"max_us\":20.0},\
             \"tcp_resets\":1,\
             \"first_seen\":\"2023-11-14T22:13:20.000001Z\",\"last_seen\":\"2023-11-14T22:13:21.000001Z\",\
             \"connections_attempted\":9,\
             \"connections_failed\":{\"refused\":1,\"unanswered\":2,\"unreachable\":3},\
             \"syn_retransmits\":4,\"resets_client\":5,\"resets_server\":6,\
             \"retransmits_client_to_server\":7,\"retransmits_server_to_client\":8,\
             \"drops\":{\"NETFILTER_DROP\":2,\"a\\\"b\\\\c\\n\":1},\
             \"srtt_us\":{\"samples\":2,\"min\":100,\"mean\":200.5,\"max\":301},\
             \"status\":\"Red\"}"
        );
    }
}
