//! Views of the store for people: the busiest edges (`flowmap top`), the
//! graph as JSON, DOT or Mermaid (`flowmap graph`), and the map page's API.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::time::SystemTime;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::sinks::store::{AgentRow, EdgeRow, NodeRow, Store, Window};

/// Filters of the map page and the CLI.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Filter {
    pub port: Option<u16>,
    pub protocol: Option<String>,
    /// Matches endpoint names and IDs, case-insensitively.
    pub q: Option<String>,
}

impl Filter {
    fn keep(&self, e: &EdgeRow, nodes: &[NodeRow]) -> bool {
        if self.port.is_some_and(|p| p != e.port) {
            return false;
        }
        if let Some(p) = self.protocol.as_deref().filter(|p| !p.is_empty()) {
            if !e.protocol.eq_ignore_ascii_case(p) {
                return false;
            }
        }
        if let Some(q) = self
            .q
            .as_deref()
            .map(str::to_lowercase)
            .filter(|q| !q.is_empty())
        {
            let name = |id: &str| {
                nodes
                    .iter()
                    .find(|n| n.id == id)
                    .map(|n| n.name.to_lowercase())
                    .unwrap_or_default()
            };
            let hay = [
                e.source.to_lowercase(),
                e.target.to_lowercase(),
                name(&e.source),
                name(&e.target),
            ];
            if !hay.iter().any(|h| h.contains(&q)) {
                return false;
            }
        }
        true
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct GraphView {
    /// The window's start (kept for the page: `from_ms`).
    pub since_ms: i64,
    /// The window: intervals that ended in `[from_ms, to_ms]` (`to_ms`
    /// null for a live window, which ends now).
    pub from_ms: i64,
    pub to_ms: Option<i64>,
    pub nodes: Vec<NodeRow>,
    pub edges: Vec<EdgeRow>,
    /// The window had more edges than were read (the map page's bound):
    /// these are its busiest ones.
    pub truncated: bool,
    /// The agents that wrote intervals in the window.
    pub agents: Vec<AgentRow>,
}

/// Host and node endpoints the map page reads at most.
const MAX_HOSTS: usize = 256;

/// The graph of the window: edges that pass the filter and the endpoints
/// they join (plus, without a filter, every host endpoint of the window).
pub fn graph(store: &mut Store, since: SystemTime, f: &Filter) -> Result<GraphView> {
    graph_in(store, &Window::since(since), f)
}

/// [`graph`] of any window, every edge of it.
pub fn graph_in(store: &mut Store, w: &Window, f: &Filter) -> Result<GraphView> {
    let nodes = store.nodes(ms_time(w.from_ms))?;
    let (edges, _) = store.edges_in(w, None)?;
    let agents = store.agents(w)?;
    Ok(assemble(nodes, edges, w, f, false, agents))
}

fn ms_time(ms: i64) -> SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64)
}

/// The map page's graph: as [`graph`], but of the `max_edges` busiest
/// edges of the window only (the filter applies to those), and only the
/// endpoints they join (plus at most MAX_HOSTS host endpoints) are read.
/// The busiest (edge, agent) rows are read: two per edge (`max_edges ×
/// 2`: a connection is reported by its client's agent and its server's,
/// and a Service's connection is two edges of the client's agent and one
/// row of the server's), four when those rows made fewer edges than
/// asked for; `truncated` says the window had more.
pub fn graph_bounded(
    store: &mut Store,
    w: &Window,
    f: &Filter,
    max_edges: usize,
) -> Result<GraphView> {
    let (mut edges, mut truncated) = {
        let mut per_edge = 2;
        loop {
            let (e, t) = store.edges_in(w, Some(max_edges.saturating_mul(per_edge)))?;
            if !t || e.len() >= max_edges || per_edge >= 4 {
                break (e, t);
            }
            per_edge = 4;
        }
    };
    truncated |= edges.len() > max_edges;
    edges.truncate(max_edges);
    let ids: BTreeSet<&str> = edges
        .iter()
        .flat_map(|e| [e.source.as_str(), e.target.as_str()])
        .collect();
    let mut nodes = store.nodes_by_ids(&ids.into_iter().collect::<Vec<_>>())?;
    let hosts = store.nodes_of_types(
        ms_time(w.from_ms),
        &[
            crate::enrich::server::HOST_TYPE,
            crate::enrich::kube::index::NODE_TYPE,
        ],
        MAX_HOSTS,
    )?;
    for h in hosts {
        if let Err(at) = nodes.binary_search_by(|n| n.id.cmp(&h.id)) {
            nodes.insert(at, h);
        }
    }
    let agents = store.agents(w)?;
    Ok(assemble(nodes, edges, w, f, truncated, agents))
}

/// Filters and orders the edges (busiest first) and keeps the endpoints
/// they join.
fn assemble(
    nodes: Vec<NodeRow>,
    edges: Vec<EdgeRow>,
    w: &Window,
    f: &Filter,
    truncated: bool,
    agents: Vec<AgentRow>,
) -> GraphView {
    let mut edges: Vec<EdgeRow> = edges.into_iter().filter(|e| f.keep(e, &nodes)).collect();
    edges.sort_by(|a, b| {
        b.bytes()
            .cmp(&a.bytes())
            .then_with(|| (&a.source, &a.target, a.port).cmp(&(&b.source, &b.target, b.port)))
    });
    let used: BTreeSet<&str> = edges
        .iter()
        .flat_map(|e| [e.source.as_str(), e.target.as_str()])
        .collect();
    let unfiltered = f.port.is_none()
        && f.protocol.as_deref().unwrap_or("").is_empty()
        && f.q.as_deref().unwrap_or("").is_empty();
    let nodes: Vec<NodeRow> = nodes
        .into_iter()
        .filter(|n| {
            used.contains(n.id.as_str())
                || (unfiltered
                    && (n.kind == crate::enrich::server::HOST_TYPE
                        || n.kind == crate::enrich::kube::index::NODE_TYPE))
        })
        .collect();
    GraphView {
        since_ms: w.from_ms,
        from_ms: w.from_ms,
        to_ms: (w.to_ms != i64::MAX).then_some(w.to_ms),
        nodes,
        edges,
        truncated,
        agents,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    Bytes,
    Connections,
    Packets,
    /// Failed attempts to connect (all causes), then resets after
    /// establishment.
    Failures,
}

pub fn top(
    store: &mut Store,
    since: SystemTime,
    by: By,
    limit: usize,
) -> Result<(Vec<EdgeRow>, Vec<NodeRow>)> {
    top_in(store, &Window::since(since), by, limit)
}

/// [`top`] of any window.
pub fn top_in(
    store: &mut Store,
    w: &Window,
    by: By,
    limit: usize,
) -> Result<(Vec<EdgeRow>, Vec<NodeRow>)> {
    let since = ms_time(w.from_ms);
    let (mut edges, _) = store.edges_in(w, None)?;
    let key = |e: &EdgeRow| match by {
        By::Bytes => (e.bytes(), 0),
        By::Connections => (e.connections_active, 0),
        By::Packets => (e.packets(), 0),
        By::Failures => (
            e.health.connections_failed.total(),
            e.health.resets_client + e.health.resets_server,
        ),
    };
    edges.sort_by(|a, b| {
        key(b)
            .cmp(&key(a))
            .then_with(|| (&a.source, &a.target, a.port).cmp(&(&b.source, &b.target, b.port)))
    });
    edges.truncate(limit);
    Ok((edges, store.nodes(since)?))
}

fn name_of<'a>(nodes: &'a [NodeRow], id: &'a str) -> &'a str {
    nodes
        .iter()
        .find(|n| n.id == id)
        .map(|n| n.name.as_str())
        .unwrap_or(id)
}

pub fn top_table(edges: &[EdgeRow], nodes: &[NodeRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<28} {:<28} {:>11} {:>8} {:>10} {:>14} {:>10} {:>7} {:>7} {:>7} {:>10} STATUS",
        "CLIENT",
        "SERVER",
        "PROTO/PORT",
        "CONNS",
        "PACKETS",
        "BYTES",
        "RTT_US",
        "FAILED",
        "RESETS",
        "DROPS",
        "SRTT_US"
    );
    for e in edges {
        let rtt = e
            .handshake_mean_us
            .map(|r| format!("{r:.1}"))
            .unwrap_or_else(|| "-".into());
        let srtt = e
            .health
            .srtt_us
            .map(|s| format!("{:.1}", s.mean))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<28} {:<28} {:>11} {:>8} {:>10} {:>14} {:>10} {:>7} {:>7} {:>7} {:>10} {}",
            name_of(nodes, &e.source),
            name_of(nodes, &e.target),
            format!("{}/{}", e.protocol, e.port),
            e.connections_active,
            e.packets(),
            e.bytes(),
            rtt,
            e.health.connections_failed.total(),
            e.health.resets_client + e.health.resets_server,
            e.health.drops.values().sum::<u64>(),
            srtt,
            e.health.status.name()
        );
    }
    out
}

/// Drops and smoothed RTT for an edge's label (empty when it has neither).
fn health_note(e: &EdgeRow) -> String {
    let mut s = String::new();
    let drops: u64 = e.health.drops.values().sum();
    if drops > 0 {
        let _ = write!(s, ", {drops} dropped");
    }
    if let Some(r) = e.health.srtt_us {
        let _ = write!(s, ", srtt {:.0} us", r.mean);
    }
    s
}

fn dot_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

pub fn to_dot(v: &GraphView) -> String {
    let mut out = String::from("digraph flowmap {\n  rankdir=LR;\n");
    for n in &v.nodes {
        let shape = if n.kind == crate::enrich::server::HOST_TYPE
            || n.kind == crate::enrich::kube::index::NODE_TYPE
        {
            "box"
        } else {
            "ellipse"
        };
        let _ = writeln!(
            out,
            "  {} [label={}, shape={shape}];",
            dot_quote(&n.id),
            dot_quote(&n.name)
        );
    }
    for e in &v.edges {
        let _ = writeln!(
            out,
            "  {} -> {} [label={}];",
            dot_quote(&e.source),
            dot_quote(&e.target),
            dot_quote(&format!(
                "{}/{} {} B{}",
                e.protocol,
                e.port,
                e.bytes(),
                health_note(e)
            ))
        );
    }
    out.push_str("}\n");
    out
}

pub fn to_mermaid(v: &GraphView) -> String {
    let ids: Vec<&str> = v.nodes.iter().map(|n| n.id.as_str()).collect();
    let short = |id: &str| {
        format!(
            "n{}",
            ids.iter().position(|i| *i == id).unwrap_or(usize::MAX)
        )
    };
    let esc = |s: &str| s.replace('"', "#quot;");
    let mut out = String::from("flowchart LR\n");
    for n in &v.nodes {
        let _ = writeln!(out, "  {}[\"{}\"]", short(&n.id), esc(&n.name));
    }
    for e in &v.edges {
        let _ = writeln!(
            out,
            "  {} -->|\"{}/{} {} B{}\"| {}",
            short(&e.source),
            e.protocol,
            e.port,
            e.bytes(),
            health_note(e),
            short(&e.target)
        );
    }
    out
}
