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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// Maps keyed by IDs and groups: foldhash, not SipHash (issue 16's
/// profile: hashing was most of folding 100k edges). Nothing here depends
/// on their order: every list made from them is sorted.
type Fast<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

use super::{EdgeKey, EdgeStats, Graph};
use crate::enrich::{Endpoint, EndpointKind, GroupStats};

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

/// Which ends of each edge keep their name: (client, server) per edge,
/// true when the end is not external or is named and the edge is among
/// its busiest.
fn keep_ends(g: &Graph, lim: &Limits) -> (Vec<(bool, bool)>, u64) {
    let ext = external_ends(g);
    let mut score: Fast<&str, u64> = Fast::default();
    for ((k, s), (ec, es)) in g.edges.iter().zip(&ext) {
        for (end, e) in [(&*k.client, ec), (&*k.server, es)] {
            if *e {
                *score.entry(end).or_default() += bytes(s);
            }
        }
    }
    let mut ranked: Vec<(&str, u64)> = score.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    ranked.truncate(lim.max_external);
    let named: FastSet<&str> = ranked.iter().map(|(id, _)| *id).collect();
    // Each named endpoint's edges, busiest first (ties by key).
    let mut edges_of: Fast<&str, Vec<(u64, usize)>> = Fast::default();
    for (i, ((k, s), (ec, es))) in g.edges.iter().zip(&ext).enumerate() {
        for (end, e) in [(&*k.client, ec), (&*k.server, es)] {
            if *e && named.contains(end) {
                edges_of.entry(end).or_default().push((bytes(s), i));
            }
        }
    }
    // The ends each named endpoint keeps, by edge index.
    let keys: Vec<&EdgeKey> = g.edges.keys().collect();
    let mut kept = vec![(false, false); keys.len()];
    for (id, mut v) in edges_of {
        v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for (_, i) in v.iter().take(lim.edges_per_external) {
            kept[*i].0 |= *keys[*i].client == *id;
            kept[*i].1 |= *keys[*i].server == *id;
        }
    }
    let ends = ext
        .iter()
        .zip(kept)
        .map(|((ec, es), (kc, ks))| (!ec || kc, !es || ks))
        .collect();
    (ends, named.len() as u64)
}

/// Whether each edge's (client, server) is an external endpoint, looked
/// up once per endpoint (by its ID's allocation: the graph's keys share
/// them) rather than twice per edge in the endpoint tree.
fn external_ends(g: &Graph) -> Vec<(bool, bool)> {
    let mut memo: Fast<(usize, usize), bool> = Fast::default();
    let mut external = |id: &Arc<str>| {
        *memo
            .entry((id.as_ptr() as usize, id.len()))
            .or_insert_with(|| {
                g.endpoints
                    .get(id)
                    .is_some_and(|e| e.kind == EndpointKind::External)
            })
    };
    g.edges
        .keys()
        .map(|k| (external(&k.client), external(&k.server)))
        .collect()
}

/// The aggregate each folded (protocol, port) goes to: the busiest
/// `port_groups` keep their own, the others share "other ports".
fn choose_groups<'g>(
    g: &'g Graph,
    ends: &[(bool, bool)],
    lim: &Limits,
) -> Fast<(&'g str, u16), bool> {
    let mut load: Fast<(&str, u16), u64> = Fast::default();
    for ((k, s), (c, sv)) in g.edges.iter().zip(ends) {
        if !(c & sv) {
            *load.entry((&*k.protocol, k.port)).or_default() += bytes(s);
        }
    }
    let mut ranked: Vec<((&str, u16), u64)> = load.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked
        .into_iter()
        .enumerate()
        .map(|(i, (grp, _))| (grp, i < lim.port_groups))
        .collect()
}

/// One aggregate being built: its endpoint and the addresses in it.
struct Agg {
    ep: Endpoint,
    peers: FastSet<Arc<str>>,
}

/// Whether `g` has anything to fold under `lim`: more external endpoints
/// than the cap, or one with more edges than it may keep.
pub fn needed(g: &Graph, lim: &Limits) -> bool {
    let mut edges: Fast<&str, usize> = Fast::default();
    for (k, (ec, es)) in g.edges.keys().zip(external_ends(g)) {
        for (end, e) in [(&*k.client, ec), (&*k.server, es)] {
            if e {
                *edges.entry(end).or_default() += 1;
            }
        }
    }
    edges.len() > lim.max_external || edges.values().any(|n| *n > lim.edges_per_external)
}

/// `g` with its external endpoints bounded by `lim` (see the module's
/// comment); the counts of what folded. Totals are unchanged: every edge's
/// statistics land on exactly one edge of the result.
pub fn bound(g: &Graph, data_source_id: &str, lim: &Limits) -> (Graph, Folded) {
    let (ends, named) = keep_ends(g, lim);
    let groups = choose_groups(g, &ends, lim);
    let mut out = Graph {
        link_control: g.link_control,
        children: g.children.clone(),
        ..Graph::default()
    };
    let mut aggs: BTreeMap<Arc<str>, Agg> = BTreeMap::new();
    // Each aggregate's ID, made once (not per folded edge).
    let mut ids: Fast<Option<(&str, u16)>, Arc<str>> = Fast::default();
    let mut folded = Folded {
        named,
        ..Folded::default()
    };
    for ((k, s), (keep_c, keep_s)) in g.edges.iter().zip(ends) {
        if keep_c && keep_s {
            copy_endpoint(g, &mut out, &k.client);
            copy_endpoint(g, &mut out, &k.server);
            merge_edge(&mut out, k.clone(), s);
            continue;
        }
        let own = groups
            .get(&(&*k.protocol, k.port))
            .copied()
            .unwrap_or(false);
        let group = own.then_some((&*k.protocol, k.port));
        let id = ids
            .entry(group)
            .or_insert_with(|| aggregate_id(data_source_id, group).into())
            .clone();
        let agg = aggs.entry(id.clone()).or_insert_with(|| Agg {
            ep: aggregate_endpoint(&id, group),
            peers: FastSet::default(),
        });
        let (client, server) = (
            fold_end(&mut out, g, &k.client, keep_c, &id, agg),
            fold_end(&mut out, g, &k.server, keep_s, &id, agg),
        );
        add_group_totals(agg.ep.group.as_mut(), s, !keep_c);
        folded.flows += s.connections_active;
        let port = if own { k.port } else { 0 };
        let key = EdgeKey {
            client,
            server,
            protocol: k.protocol.clone(),
            port,
        };
        match out.edges.get_mut(&key) {
            Some(e) => e.merge(s),
            None => {
                let mut s = s.clone();
                s.port = port;
                out.edges.insert(key, s);
            }
        }
    }
    let all_peers: FastSet<&Arc<str>> = aggs.values().flat_map(|a| &a.peers).collect();
    folded.addresses = all_peers.len() as u64;
    folded.aggregates = aggs.len() as u64;
    for (id, mut a) in aggs {
        if let Some(gs) = a.ep.group.as_mut() {
            gs.peers = a.peers.len() as u64;
        }
        out.endpoints.insert(id, a.ep);
    }
    (out, folded)
}

/// The end of a folded edge: itself when it keeps its name, else the
/// aggregate (and the address counts as one of its peers).
fn fold_end(
    out: &mut Graph,
    g: &Graph,
    end: &Arc<str>,
    keep: bool,
    agg_id: &Arc<str>,
    agg: &mut Agg,
) -> Arc<str> {
    if keep {
        copy_endpoint(g, out, end);
        return end.clone();
    }
    agg.peers.insert(end.clone());
    agg_id.clone()
}

fn copy_endpoint(g: &Graph, out: &mut Graph, id: &Arc<str>) {
    if !out.endpoints.contains_key(id) {
        if let Some(ep) = g.endpoints.get(id) {
            out.endpoints.insert(id.clone(), ep.clone());
        }
    }
}

fn merge_edge(out: &mut Graph, key: EdgeKey, s: &EdgeStats) {
    match out.edges.get_mut(&key) {
        Some(e) => e.merge(s),
        None => {
            out.edges.insert(key, s.clone());
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
