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

use std::collections::{HashMap, HashSet};
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

/// The graph's endpoints as small numbers: each edge's (client, server)
/// by index, each distinct ID looked up once (by its allocation, which
/// the graph's keys share, then by its text), so folding hashes numbers,
/// not strings, per edge (issue 16's profile: hashing and comparing IDs
/// was most of folding 100k edges).
struct Ends<'g> {
    /// Per edge, in the graph's order: (client, server).
    edge: Vec<(u32, u32)>,
    /// Per endpoint index: its ID and whether it is external.
    ids: Vec<&'g Arc<str>>,
    external: Vec<bool>,
}

impl<'g> Ends<'g> {
    fn of(g: &'g Graph) -> Ends<'g> {
        let mut by_ptr: Fast<(usize, usize), u32> = Fast::default();
        let mut by_str: Fast<&'g str, u32> = Fast::default();
        let mut ids: Vec<&'g Arc<str>> = Vec::new();
        let mut external = Vec::new();
        let mut edge = Vec::with_capacity(g.edges.len());
        for k in g.edges.keys() {
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
            edge.push((ends[0], ends[1]));
        }
        Ends {
            edge,
            ids,
            external,
        }
    }

    fn external(&self, i: u32) -> bool {
        self.external[i as usize]
    }
}

/// Which ends of each edge keep their name: (client, server) per edge,
/// true when the end is not external or is named and the edge is among
/// its busiest.
fn keep_ends(g: &Graph, ends: &Ends, lim: &Limits) -> (Vec<(bool, bool)>, u64) {
    // Bytes per external endpoint with an edge (None: not external or no
    // edge).
    let mut score: Vec<Option<u64>> = vec![None; ends.ids.len()];
    for (s, (c, sv)) in g.edges.values().zip(&ends.edge) {
        for e in [*c, *sv] {
            if ends.external(e) {
                *score[e as usize].get_or_insert(0) += bytes(s);
            }
        }
    }
    let mut ranked: Vec<(&str, u64, u32)> = score
        .iter()
        .enumerate()
        .filter_map(|(i, b)| b.map(|b| (&**ends.ids[i], b, i as u32)))
        .collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    ranked.truncate(lim.max_external);
    let mut named = vec![false; ends.ids.len()];
    for (_, _, i) in &ranked {
        named[*i as usize] = true;
    }
    // Each named endpoint's edges, busiest first (ties by key).
    let mut edges_of: Vec<Vec<(u64, usize)>> = vec![Vec::new(); ends.ids.len()];
    for (i, (s, (c, sv))) in g.edges.values().zip(&ends.edge).enumerate() {
        for e in [*c, *sv] {
            if ends.external(e) && named[e as usize] {
                edges_of[e as usize].push((bytes(s), i));
            }
        }
    }
    // The ends each named endpoint keeps, by edge index.
    let mut kept = vec![(false, false); ends.edge.len()];
    for (id, v) in edges_of.iter_mut().enumerate() {
        let id = id as u32;
        v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for (_, i) in v.iter().take(lim.edges_per_external) {
            kept[*i].0 |= ends.edge[*i].0 == id;
            kept[*i].1 |= ends.edge[*i].1 == id;
        }
    }
    let keep = ends
        .edge
        .iter()
        .zip(kept)
        .map(|((c, sv), (kc, ks))| (!ends.external(*c) || kc, !ends.external(*sv) || ks))
        .collect();
    (keep, ranked.len() as u64)
}

/// The (protocol, port) groups of the folded edges: per edge its group
/// (None: not folded), and per group whether it keeps an aggregate of its
/// own (the busiest `port_groups` do; the others share "other ports").
#[allow(clippy::type_complexity)]
fn choose_groups<'g>(
    g: &'g Graph,
    keep: &[(bool, bool)],
    lim: &Limits,
) -> (Vec<Option<u32>>, Vec<((&'g str, u16), bool)>) {
    let mut index: Fast<(&str, u16), u32> = Fast::default();
    let mut load: Vec<((&str, u16), u64)> = Vec::new();
    let mut of_edge = Vec::with_capacity(keep.len());
    for ((k, s), (c, sv)) in g.edges.iter().zip(keep) {
        if c & sv {
            of_edge.push(None);
            continue;
        }
        let grp = (&*k.protocol, k.port);
        let i = *index.entry(grp).or_insert_with(|| {
            load.push((grp, 0));
            (load.len() - 1) as u32
        });
        load[i as usize].1 += bytes(s);
        of_edge.push(Some(i));
    }
    let mut ranked: Vec<u32> = (0..load.len() as u32).collect();
    ranked.sort_by(|a, b| {
        let (a, b) = (&load[*a as usize], &load[*b as usize]);
        b.1.cmp(&a.1).then(a.0.cmp(&b.0))
    });
    let mut groups: Vec<((&str, u16), bool)> = load.iter().map(|(grp, _)| (*grp, false)).collect();
    for i in ranked.into_iter().take(lim.port_groups) {
        groups[i as usize].1 = true;
    }
    (of_edge, groups)
}

/// One aggregate being built: its endpoint and the addresses in it (by
/// endpoint index).
struct Agg {
    id: Arc<str>,
    ep: Endpoint,
    peers: FastSet<u32>,
}

/// Whether `g` has anything to fold under `lim`: more external endpoints
/// than the cap, or one with more edges than it may keep.
pub fn needed(g: &Graph, lim: &Limits) -> bool {
    let ends = Ends::of(g);
    let mut edges: Vec<usize> = vec![0; ends.ids.len()];
    for (c, s) in &ends.edge {
        for e in [*c, *s] {
            if ends.external(e) {
                edges[e as usize] += 1;
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
    let ends = Ends::of(g);
    let (keep, named) = keep_ends(g, &ends, lim);
    let (edge_group, groups) = choose_groups(g, &keep, lim);
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
    // Endpoints already copied into `out`.
    let mut copied = vec![false; ends.ids.len()];
    let mut folded = Folded {
        named,
        ..Folded::default()
    };
    for (i, (k, s)) in g.edges.iter().enumerate() {
        let (keep_c, keep_s) = keep[i];
        let (ci, si) = ends.edge[i];
        if keep_c && keep_s {
            copy_endpoint(g, &mut out, &mut copied, &ends, ci);
            copy_endpoint(g, &mut out, &mut copied, &ends, si);
            merge_edge(&mut out, k.clone(), s);
            continue;
        }
        let gi = edge_group[i].unwrap_or(0) as usize;
        let (grp, own) = groups[gi];
        let group = own.then_some(grp);
        let slot = if own {
            &mut agg_of_group[gi]
        } else {
            &mut other_agg
        };
        let a = *slot.get_or_insert_with(|| {
            let id: Arc<str> = aggregate_id(data_source_id, group).into();
            aggs.push(Agg {
                ep: aggregate_endpoint(&id, group),
                id,
                peers: FastSet::default(),
            });
            aggs.len() - 1
        });
        let mut end = |e: u32, keep: bool, out: &mut Graph| -> Arc<str> {
            if keep {
                copy_endpoint(g, out, &mut copied, &ends, e);
                ends.ids[e as usize].clone()
            } else {
                aggs[a].peers.insert(e);
                aggs[a].id.clone()
            }
        };
        let client = end(ci, keep_c, &mut out);
        let server = end(si, keep_s, &mut out);
        add_group_totals(aggs[a].ep.group.as_mut(), s, !keep_c);
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
    let mut all_peers = vec![false; ends.ids.len()];
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
fn copy_endpoint(g: &Graph, out: &mut Graph, copied: &mut [bool], ends: &Ends, e: u32) {
    if !std::mem::replace(&mut copied[e as usize], true) {
        let id = ends.ids[e as usize];
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
