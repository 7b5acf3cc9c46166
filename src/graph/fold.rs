//! Bounds on one interval's graph against hostile traffic: past a cap,
//! external addresses fold into aggregate endpoints per server port, so
//! spoofed sources cannot grow the batch, the store or memory, and no
//! packet goes uncounted.
//!
//! Which external endpoints keep their name: the `max_external` with the
//! most bytes (both ways, over all their edges), ties broken by ID, so the
//! choice is deterministic. A named external endpoint keeps its
//! `edges_per_external` busiest edges; its other edges fold too (one
//! address scanning every port stays one endpoint with a bounded payload).
//! Folded edges go to the aggregate of their (protocol, server port); the
//! `port_groups` busiest of those keep one aggregate each, the others share
//! one "other ports" aggregate whose edges carry port 0.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Maps keyed by IDs and groups: foldhash, not SipHash (issue 16's
/// profile: hashing was most of folding 100k edges). Nothing here depends
/// on their order: every list made from them is sorted.
type Fast<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

use super::{Draft, EdgeKey, EdgeStats, Graph};
use crate::enrich::{Endpoint, EndpointKind, GroupStats};
use crate::flow::FlowRecord;

/// The caps of one data source's graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// External endpoints that keep their own name (`max_external_endpoints`).
    pub max_external: usize,
    /// Edges a named external endpoint keeps; its others fold.
    pub edges_per_external: usize,
    /// (protocol, port) aggregates; past them, one "other ports" aggregate.
    pub port_groups: usize,
}

/// Default of `max_external_endpoints`.
pub const DEFAULT_MAX_EXTERNAL: usize = 2000;
/// Edges a named external endpoint keeps.
pub const EDGES_PER_EXTERNAL: usize = 16;
/// Aggregates of one (protocol, port) per graph.
pub const PORT_GROUPS: usize = 32;

impl Limits {
    pub fn new(max_external: usize) -> Limits {
        Limits {
            max_external,
            edges_per_external: EDGES_PER_EXTERNAL,
            port_groups: PORT_GROUPS,
        }
    }
}

/// What folding did to one graph (for the log line and /metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Folded {
    /// External endpoints that kept their name.
    pub named: u64,
    /// Distinct external addresses with at least one edge folded.
    pub addresses: u64,
    /// Connections (flow records) counted into aggregates.
    pub flows: u64,
    /// Aggregate endpoints made.
    pub aggregates: u64,
}

/// The ID of the aggregate of (protocol, port), or of the "other ports"
/// aggregate (`None`).
pub fn aggregate_id(data_source_id: &str, group: Option<(&str, u16)>) -> String {
    match group {
        Some((proto, port)) => format!("{data_source_id}-flows.external-other-{proto}-{port}"),
        None => format!("{data_source_id}-flows.external-other-ports"),
    }
}

fn bytes(s: &EdgeStats) -> u64 {
    s.bytes_client_to_server + s.bytes_server_to_client
}

/// One edge as folding reads it: its ends and protocol as small numbers
/// (indices into [`Flat`]'s lists), so folding hashes and compares
/// numbers, not IDs, per edge (issue 16's profile: hashing and comparing
/// IDs was most of folding 100k edges).
#[derive(Clone, Copy)]
struct FlatEdge<'g> {
    client: u32,
    server: u32,
    /// Index into `Flat::protos`.
    proto: u32,
    port: u16,
    protocol: &'g Cow<'static, str>,
    /// Bytes both ways, and connections (`connections_active`).
    bytes: u64,
    active: u64,
    stats: Stats<'g>,
}

/// Where an edge's statistics come from: a built graph's entry, or a
/// draft's records, summed when folding needs them.
#[derive(Clone, Copy)]
enum Stats<'g> {
    Built(&'g EdgeStats),
    Records(&'g [&'g FlowRecord]),
}

impl<'g> FlatEdge<'g> {
    fn stats(&self) -> Cow<'g, EdgeStats> {
        match self.stats {
            Stats::Built(s) => Cow::Borrowed(s),
            Stats::Records(r) => Cow::Owned(Draft::stats(r)),
        }
    }
}

/// A graph's edges in the tree's order (`EdgeKey`'s), with each endpoint
/// ID as an index: made from a built [`Graph`] or straight from a
/// [`Draft`], whose 100k edges then never become a tree (issue 16).
pub struct Flat<'g> {
    /// Per endpoint index: its ID and whether it is external.
    ids: Vec<&'g Arc<str>>,
    external: Vec<bool>,
    /// The protocols of the edges, by index.
    protos: Vec<&'g str>,
    edges: Vec<FlatEdge<'g>>,
    /// Endpoints, link-control count and containment (its edges unused).
    graph: &'g Graph,
}

/// The index of protocol `p` in `protos`, added if new (a handful per graph).
fn proto_index<'g>(protos: &mut Vec<&'g str>, p: &'g str) -> u32 {
    (match protos.iter().position(|x| *x == p) {
        Some(i) => i,
        None => {
            protos.push(p);
            protos.len() - 1
        }
    }) as u32
}

impl<'g> Flat<'g> {
    /// A built graph's edges: each distinct ID looked up once (by its
    /// allocation, which the graph's keys share, then by its text).
    pub fn of(g: &'g Graph) -> Flat<'g> {
        let mut by_ptr: Fast<(usize, usize), u32> = Fast::default();
        let mut by_str: Fast<&'g str, u32> = Fast::default();
        let mut ids: Vec<&'g Arc<str>> = Vec::new();
        let mut external = Vec::new();
        let mut protos = Vec::new();
        let mut edges = Vec::with_capacity(g.edges.len());
        for (k, s) in &g.edges {
            let mut ends = [0u32; 2];
            for (i, id) in [&k.client, &k.server].into_iter().enumerate() {
                ends[i] = *by_ptr
                    .entry((id.as_ptr() as usize, id.len()))
                    .or_insert_with(|| {
                        *by_str.entry(&**id).or_insert_with(|| {
                            ids.push(id);
                            external.push(
                                g.endpoints
                                    .get(id)
                                    .is_some_and(|e| e.kind == EndpointKind::External),
                            );
                            (ids.len() - 1) as u32
                        })
                    });
            }
            edges.push(FlatEdge {
                client: ends[0],
                server: ends[1],
                proto: proto_index(&mut protos, &k.protocol),
                port: k.port,
                protocol: &k.protocol,
                bytes: bytes(s),
                active: s.connections_active,
                stats: Stats::Built(s),
            });
        }
        Flat {
            ids,
            external,
            protos,
            edges,
            graph: g,
        }
    }

    /// A draft's edges, without building its tree.
    pub fn of_draft(d: &'g Draft<'_>) -> Flat<'g> {
        let g = d.graph();
        let ids: Vec<&'g Arc<str>> = d.ids().iter().collect();
        let external = ids
            .iter()
            .map(|id| {
                g.endpoints
                    .get(*id)
                    .is_some_and(|e| e.kind == EndpointKind::External)
            })
            .collect();
        let mut protos = Vec::new();
        let edges = d
            .sorted()
            .iter()
            .map(|e| {
                let records = d.records_of(e);
                let protocol = &records[0].protocol;
                FlatEdge {
                    client: e.client,
                    server: e.server,
                    proto: proto_index(&mut protos, protocol),
                    port: e.port,
                    protocol,
                    bytes: e.bytes,
                    active: records.len() as u64,
                    stats: Stats::Records(records),
                }
            })
            .collect();
        Flat {
            ids,
            external,
            protos,
            edges,
            graph: g,
        }
    }

    fn external(&self, i: u32) -> bool {
        self.external[i as usize]
    }
}

/// Orders `v` so its first `k` elements are its `k` least by `cmp` (a
/// total order), and drops the others; their order among themselves is
/// not kept. Where a full sort only served to take the first `k`.
fn least<T>(v: &mut Vec<T>, k: usize, cmp: impl FnMut(&T, &T) -> std::cmp::Ordering) {
    if v.len() > k {
        if k > 0 {
            v.select_nth_unstable_by(k - 1, cmp);
        }
        v.truncate(k);
    }
}

/// Which ends of each edge keep their name: (client, server) per edge,
/// true when the end is not external or is named and the edge is among
/// its busiest.
fn keep_ends(fl: &Flat, lim: &Limits) -> (Vec<(bool, bool)>, u64) {
    // Bytes per external endpoint with an edge (None: not external or no
    // edge).
    let mut score: Vec<Option<u64>> = vec![None; fl.ids.len()];
    for e in &fl.edges {
        for end in [e.client, e.server] {
            if fl.external(end) {
                *score[end as usize].get_or_insert(0) += e.bytes;
            }
        }
    }
    let mut ranked: Vec<(&str, u64, u32)> = score
        .iter()
        .enumerate()
        .filter_map(|(i, b)| b.map(|b| (&**fl.ids[i], b, i as u32)))
        .collect();
    // The most bytes, ties by ID (IDs are distinct: a total order).
    least(&mut ranked, lim.max_external, |a, b| {
        b.1.cmp(&a.1).then(a.0.cmp(b.0))
    });
    let mut named = vec![false; fl.ids.len()];
    for (_, _, i) in &ranked {
        named[*i as usize] = true;
    }
    // Each named endpoint's edges, busiest first (ties by key).
    let mut edges_of: Vec<Vec<(u64, usize)>> = vec![Vec::new(); fl.ids.len()];
    for (i, e) in fl.edges.iter().enumerate() {
        for end in [e.client, e.server] {
            if fl.external(end) && named[end as usize] {
                edges_of[end as usize].push((e.bytes, i));
            }
        }
    }
    // The ends each named endpoint keeps, by edge index.
    let mut kept = vec![(false, false); fl.edges.len()];
    for (id, v) in edges_of.iter_mut().enumerate() {
        let id = id as u32;
        least(v, lim.edges_per_external, |a, b| {
            b.0.cmp(&a.0).then(a.1.cmp(&b.1))
        });
        for (_, i) in v.iter() {
            kept[*i].0 |= fl.edges[*i].client == id;
            kept[*i].1 |= fl.edges[*i].server == id;
        }
    }
    let keep = fl
        .edges
        .iter()
        .zip(kept)
        .map(|(e, (kc, ks))| (!fl.external(e.client) || kc, !fl.external(e.server) || ks))
        .collect();
    (keep, ranked.len() as u64)
}

/// The (protocol, port) groups of the folded edges: per edge its group
/// (None: not folded), and per group (protocol index, port) and whether it
/// keeps an aggregate of its own (the busiest `port_groups` do; the others
/// share "other ports").
#[allow(clippy::type_complexity)]
fn choose_groups(
    fl: &Flat,
    keep: &[(bool, bool)],
    lim: &Limits,
) -> (Vec<Option<u32>>, Vec<((u32, u16), bool)>) {
    let mut index: Fast<(u32, u16), u32> = Fast::default();
    let mut load: Vec<((u32, u16), u64)> = Vec::new();
    let mut of_edge = Vec::with_capacity(keep.len());
    for (e, (c, sv)) in fl.edges.iter().zip(keep) {
        if c & sv {
            of_edge.push(None);
            continue;
        }
        let grp = (e.proto, e.port);
        let i = *index.entry(grp).or_insert_with(|| {
            load.push((grp, 0));
            (load.len() - 1) as u32
        });
        load[i as usize].1 += e.bytes;
        of_edge.push(Some(i));
    }
    // The busiest, ties by (protocol, port) (distinct: a total order).
    let mut ranked: Vec<u32> = (0..load.len() as u32).collect();
    least(&mut ranked, lim.port_groups, |a, b| {
        let (a, b) = (&load[*a as usize], &load[*b as usize]);
        b.1.cmp(&a.1)
            .then((fl.protos[a.0 .0 as usize], a.0 .1).cmp(&(fl.protos[b.0 .0 as usize], b.0 .1)))
    });
    let mut groups: Vec<((u32, u16), bool)> = load.iter().map(|(grp, _)| (*grp, false)).collect();
    for i in ranked {
        groups[i as usize].1 = true;
    }
    (of_edge, groups)
}

/// One aggregate being built: its endpoint, its end in the result's edges
/// (see `bound_in`) and the addresses in it (by endpoint index).
struct Agg {
    id: Arc<str>,
    end: u32,
    ep: Endpoint,
    peers: FastSet<u32>,
}

/// Whether `g` has anything to fold under `lim`: more external endpoints
/// than the cap, or one with more edges than it may keep.
pub fn needed(g: &Graph, lim: &Limits) -> bool {
    needed_in(&Flat::of(g), lim)
}

/// `needed` on a graph's edges as folding reads them.
pub fn needed_in(fl: &Flat, lim: &Limits) -> bool {
    let mut edges: Vec<usize> = vec![0; fl.ids.len()];
    for e in &fl.edges {
        for end in [e.client, e.server] {
            if fl.external(end) {
                edges[end as usize] += 1;
            }
        }
    }
    edges.iter().filter(|n| **n > 0).count() > lim.max_external
        || edges.iter().any(|n| *n > lim.edges_per_external)
}

/// `g` with its external endpoints bounded by `lim` (see the module's
/// comment); the counts of what folded. Totals are unchanged: every edge's
/// statistics land on exactly one edge of the result.
pub fn bound(g: &Graph, data_source_id: &str, lim: &Limits) -> (Graph, Folded) {
    bound_in(&Flat::of(g), data_source_id, lim)
}

/// The result's edges while they are made: one per distinct (client,
/// server, protocol, port), its ends as indices (an endpoint's, or past
/// them an aggregate's), each merged in the graph's edge order as the tree
/// merged them.
#[derive(Default)]
struct Out {
    at: Fast<(u32, u32, u32, u16), u32>,
    edges: Vec<(EdgeKey, EdgeStats)>,
}

impl Out {
    /// Merges `s` into the edge `at`, made with `key()` if new (`port`:
    /// the port it is written with, when it changes).
    fn add(
        &mut self,
        at: (u32, u32, u32, u16),
        key: impl FnOnce() -> EdgeKey,
        s: Cow<EdgeStats>,
        port: Option<u16>,
    ) {
        match self.at.get(&at) {
            Some(i) => self.edges[*i as usize].1.merge(&s),
            None => {
                let mut s = s.into_owned();
                if let Some(p) = port {
                    s.port = p;
                }
                self.edges.push((key(), s));
                self.at.insert(at, (self.edges.len() - 1) as u32);
            }
        }
    }

    /// The edges in the tree.
    fn into_tree(self) -> std::collections::BTreeMap<EdgeKey, EdgeStats> {
        let mut order: Vec<u32> = (0..self.edges.len() as u32).collect();
        order.sort_unstable_by(|a, b| self.edges[*a as usize].0.cmp(&self.edges[*b as usize].0));
        let mut slots: Vec<Option<(EdgeKey, EdgeStats)>> =
            self.edges.into_iter().map(Some).collect();
        let sorted: Vec<(EdgeKey, EdgeStats)> = order
            .iter()
            .filter_map(|i| slots[*i as usize].take())
            .collect();
        sorted.into_iter().collect()
    }
}

/// `bound` on a graph's edges as folding reads them.
pub fn bound_in(fl: &Flat, data_source_id: &str, lim: &Limits) -> (Graph, Folded) {
    let g = fl.graph;
    let (keep, named) = keep_ends(fl, lim);
    let (edge_group, groups) = choose_groups(fl, &keep, lim);
    let mut out = Graph {
        link_control: g.link_control,
        children: g.children.clone(),
        ..Graph::default()
    };
    // The aggregates, each made once (not per folded edge): by group
    // index, and the shared "other ports" one.
    let mut aggs: Vec<Agg> = Vec::new();
    let mut agg_of_group: Vec<Option<usize>> = vec![None; groups.len()];
    let mut other_agg: Option<usize> = None;
    // An aggregate's end is past the endpoints' indices, unless an
    // endpoint or an earlier aggregate has its ID (then the tree keyed by
    // IDs merged their edges: so does `Out`).
    let mut end_of_id: Option<Fast<Arc<str>, u32>> = None;
    let mut edges = Out::default();
    // Endpoints already copied into `out`.
    let mut copied = vec![false; fl.ids.len()];
    let mut folded = Folded {
        named,
        ..Folded::default()
    };
    for (i, e) in fl.edges.iter().enumerate() {
        let (keep_c, keep_s) = keep[i];
        let (ci, si) = (e.client, e.server);
        if keep_c && keep_s {
            copy_endpoint(g, &mut out, &mut copied, fl, ci);
            copy_endpoint(g, &mut out, &mut copied, fl, si);
            let key = || EdgeKey {
                client: fl.ids[ci as usize].clone(),
                server: fl.ids[si as usize].clone(),
                protocol: e.protocol.clone(),
                port: e.port,
            };
            edges.add((ci, si, e.proto, e.port), key, e.stats(), None);
            continue;
        }
        let gi = edge_group[i].unwrap_or(0) as usize;
        let ((gp, gport), own) = groups[gi];
        let group = own.then_some((fl.protos[gp as usize], gport));
        let slot = if own {
            &mut agg_of_group[gi]
        } else {
            &mut other_agg
        };
        let a = *slot.get_or_insert_with(|| {
            let id: Arc<str> = aggregate_id(data_source_id, group).into();
            let ends = end_of_id.get_or_insert_with(|| {
                fl.ids
                    .iter()
                    .enumerate()
                    .map(|(i, id)| ((*id).clone(), i as u32))
                    .collect()
            });
            let next = (fl.ids.len() + aggs.len()) as u32;
            let end = *ends.entry(id.clone()).or_insert(next);
            aggs.push(Agg {
                ep: aggregate_endpoint(&id, group),
                id,
                end,
                peers: FastSet::default(),
            });
            aggs.len() - 1
        });
        let mut end = |e: u32, keep: bool, out: &mut Graph| -> u32 {
            if keep {
                copy_endpoint(g, out, &mut copied, fl, e);
                e
            } else {
                aggs[a].peers.insert(e);
                aggs[a].end
            }
        };
        let client = end(ci, keep_c, &mut out);
        let server = end(si, keep_s, &mut out);
        let stats = e.stats();
        add_group_totals(aggs[a].ep.group.as_mut(), &stats, !keep_c);
        folded.flows += e.active;
        let port = if own { e.port } else { 0 };
        let id_of = |end: u32, kept: bool| {
            if kept {
                fl.ids[end as usize].clone()
            } else {
                aggs[a].id.clone()
            }
        };
        let key = || EdgeKey {
            client: id_of(ci, keep_c),
            server: id_of(si, keep_s),
            protocol: e.protocol.clone(),
            port,
        };
        edges.add((client, server, e.proto, port), key, stats, Some(port));
    }
    out.edges = edges.into_tree();
    let mut all_peers = vec![false; fl.ids.len()];
    for a in &aggs {
        for p in &a.peers {
            all_peers[*p as usize] = true;
        }
    }
    folded.addresses = all_peers.iter().filter(|p| **p).count() as u64;
    folded.aggregates = aggs.len() as u64;
    for mut a in aggs {
        if let Some(gs) = a.ep.group.as_mut() {
            gs.peers = a.peers.len() as u64;
        }
        out.endpoints.insert(a.id, a.ep);
    }
    (out, folded)
}

/// Copies endpoint `e` of `g` into `out`, once.
fn copy_endpoint(g: &Graph, out: &mut Graph, copied: &mut [bool], fl: &Flat, e: u32) {
    if !std::mem::replace(&mut copied[e as usize], true) {
        let id = fl.ids[e as usize];
        if let Some(ep) = g.endpoints.get(id) {
            out.endpoints.insert(id.clone(), ep.clone());
        }
    }
}

fn aggregate_endpoint(id: &str, group: Option<(&str, u16)>) -> Endpoint {
    let name = match group {
        Some((proto, port)) => format!("other external peers ({proto}/{port})"),
        None => "other external peers (other ports)".to_string(),
    };
    let mut ep = Endpoint::new(
        id.to_string(),
        EndpointKind::ExternalGroup,
        name,
        Vec::new(),
    );
    ep.group = Some(GroupStats {
        protocol: group.map(|(p, _)| p.to_string()),
        port: group.map(|(_, p)| p),
        ..GroupStats::default()
    });
    ep
}

/// Adds one folded edge to its aggregate's totals: from the peers is the
/// client's direction when the client folded, else the server's.
fn add_group_totals(gs: Option<&mut GroupStats>, s: &EdgeStats, client_folded: bool) {
    let Some(gs) = gs else { return };
    let (from, to) = if client_folded {
        (
            (s.packets_client_to_server, s.bytes_client_to_server),
            (s.packets_server_to_client, s.bytes_server_to_client),
        )
    } else {
        (
            (s.packets_server_to_client, s.bytes_server_to_client),
            (s.packets_client_to_server, s.bytes_client_to_server),
        )
    };
    gs.connections += s.connections_active;
    gs.packets_from_peers += from.0;
    gs.bytes_from_peers += from.1;
    gs.packets_to_peers += to.0;
    gs.bytes_to_peers += to.1;
}

/// A generous estimate of the memory a graph holds (for the store's queue
/// bound): per endpoint and per edge, the structs, their strings and the
/// map's nodes.
pub fn approx_bytes(g: &Graph) -> usize {
    let ep: usize = g
        .endpoints
        .iter()
        .map(|(k, e)| {
            let opt = |o: &Option<String>| o.as_ref().map_or(0, |s| s.len());
            256 + k.len()
                + e.id.len()
                + e.name.len()
                + e.addresses.len() * 17
                + opt(&e.namespace)
                + opt(&e.workload)
                + opt(&e.workload_kind)
                + opt(&e.workload_name)
                + opt(&e.node)
        })
        .sum();
    ep + g.edges.len() * 320
}
