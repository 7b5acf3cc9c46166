//! What changed between two windows of the store (issue 15): endpoints
//! and edges that appeared or vanished, edges whose status worsened, and
//! edges whose traffic (bytes) changed by more than a factor.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use anyhow::Result;
use serde::Serialize;

use crate::sinks::store::{EdgeRow, Store, Window};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Span {
    pub from: i64,
    pub to: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct EdgeId {
    pub source: String,
    pub destination: String,
    pub protocol: String,
    pub port: u16,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Worsened {
    #[serde(flatten)]
    pub edge: EdgeId,
    pub status_a: crate::status::Status,
    pub status_b: crate::status::Status,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Changed {
    #[serde(flatten)]
    pub edge: EdgeId,
    pub bytes_a: u64,
    pub bytes_b: u64,
    /// bytes_b / bytes_a (null when window A had none).
    pub factor: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Endpoints {
    pub appeared: Vec<String>,
    pub vanished: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Edges {
    pub appeared: Vec<EdgeId>,
    pub vanished: Vec<EdgeId>,
    pub worsened: Vec<Worsened>,
    pub changed: Vec<Changed>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Diff {
    pub a: Span,
    pub b: Span,
    pub endpoints: Endpoints,
    pub edges: Edges,
    /// A window had more (edge, agent) rows than were read (the API's
    /// bound): its busiest ones were compared.
    pub truncated: bool,
}

/// Compares window `a` with window `b` (edges counted once across nodes,
/// each window's status the worst of its intervals). With `limit`, each
/// window's busiest `limit` (edge, agent) rows are read.
pub fn diff(
    store: &mut Store,
    a: &Window,
    b: &Window,
    factor: f64,
    limit: Option<usize>,
) -> Result<Diff> {
    let (ea, ta) = store.edges_in(a, limit)?;
    let (eb, tb) = store.edges_in(b, limit)?;
    Ok(compare(a, b, &ea, &eb, factor, ta || tb))
}

fn id(e: &EdgeRow) -> EdgeId {
    EdgeId {
        source: e.source.clone(),
        destination: e.target.clone(),
        protocol: e.protocol.clone(),
        port: e.port,
    }
}

/// The diff of two windows' edges.
pub fn compare(
    a: &Window,
    b: &Window,
    ea: &[EdgeRow],
    eb: &[EdgeRow],
    factor: f64,
    truncated: bool,
) -> Diff {
    let ma: BTreeMap<EdgeId, &EdgeRow> = ea.iter().map(|e| (id(e), e)).collect();
    let mb: BTreeMap<EdgeId, &EdgeRow> = eb.iter().map(|e| (id(e), e)).collect();
    let ends = |m: &BTreeMap<EdgeId, &EdgeRow>| -> BTreeSet<String> {
        m.keys()
            .flat_map(|k| [k.source.clone(), k.destination.clone()])
            .collect()
    };
    let (na, nb) = (ends(&ma), ends(&mb));
    let mut d = Diff {
        a: Span {
            from: a.from_ms,
            to: a.to_ms,
        },
        b: Span {
            from: b.from_ms,
            to: b.to_ms,
        },
        endpoints: Endpoints {
            appeared: nb.difference(&na).cloned().collect(),
            vanished: na.difference(&nb).cloned().collect(),
        },
        edges: Edges::default(),
        truncated,
    };
    for (k, x) in &ma {
        let Some(y) = mb.get(k) else {
            d.edges.vanished.push(k.clone());
            continue;
        };
        if y.health.status > x.health.status {
            d.edges.worsened.push(Worsened {
                edge: k.clone(),
                status_a: x.health.status,
                status_b: y.health.status,
            });
        }
        let (ba, bb) = (x.bytes(), y.bytes());
        let f = (ba > 0).then(|| bb as f64 / ba as f64);
        let big = match f {
            Some(f) => f > factor || (f > 0.0 && 1.0 / f > factor) || f == 0.0,
            None => bb > 0,
        };
        if big {
            d.edges.changed.push(Changed {
                edge: k.clone(),
                bytes_a: ba,
                bytes_b: bb,
                factor: f,
            });
        }
    }
    d.edges.appeared = mb
        .keys()
        .filter(|k| !ma.contains_key(*k))
        .cloned()
        .collect();
    d
}

/// The diff as a table (`flowmap diff --format table`).
pub fn table(d: &Diff) -> String {
    let mut out = String::new();
    let edge = |e: &EdgeId| {
        format!(
            "{} -> {} {}/{}",
            e.source, e.destination, e.protocol, e.port
        )
    };
    for id in &d.endpoints.appeared {
        let _ = writeln!(out, "endpoint appeared  {id}");
    }
    for id in &d.endpoints.vanished {
        let _ = writeln!(out, "endpoint vanished  {id}");
    }
    for e in &d.edges.appeared {
        let _ = writeln!(out, "edge appeared      {}", edge(e));
    }
    for e in &d.edges.vanished {
        let _ = writeln!(out, "edge vanished      {}", edge(e));
    }
    for w in &d.edges.worsened {
        let _ = writeln!(
            out,
            "edge worsened      {}  {} -> {}",
            edge(&w.edge),
            w.status_a.name(),
            w.status_b.name()
        );
    }
    for c in &d.edges.changed {
        let f = c
            .factor
            .map(|f| format!("x{f:.2}"))
            .unwrap_or_else(|| "new traffic".into());
        let _ = writeln!(
            out,
            "edge changed       {}  {} B -> {} B ({f})",
            edge(&c.edge),
            c.bytes_a,
            c.bytes_b
        );
    }
    if out.is_empty() {
        out.push_str("no change\n");
    }
    out
}
