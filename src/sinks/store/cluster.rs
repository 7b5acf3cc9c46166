//! One map of many agents: the rule that counts a connection once when
//! several agents of the store saw it, applied when a window is read.
//!
//! 1. A peer address that belongs to another agent's host (server mode,
//!    the `addresses` of its `flows.host` element) *is* that host: the
//!    external endpoint is replaced by the host.
//! 2. Each edge (client, server, protocol, port) is then taken from one
//!    agent only: the agent of the client's node when it reported the
//!    edge; else, when the client's node has an agent in the window, the
//!    edge is left out (that agent saw every connection of the client, so
//!    another node's view of it is the same traffic after a Service's
//!    DNAT: pod → pod behind pod → service → pod); else the agent of the
//!    server's node when it reported it; else the first reporting node by
//!    name. A connection only one agent saw is that agent's.
//! 3. In a live window (ending now), an edge without traffic in its
//!    agent's latest interval of the window is NoStatus (idle).

use std::collections::HashMap;

use super::{AgentRow, EdgeRow};
use crate::status::Status;

/// Agents' hosts read for rule 1 at most.
pub const MAX_HOSTS: usize = 4096;

/// Applies the rule to per-node rows of a window; the edges come out
/// busiest first. `hosts` are (host element ID, node, addresses).
///
/// The rows are grouped by edge in a hash map of indices and each edge's
/// rows ordered by node: no tree of rows (a page's 20,000 rows in tree
/// nodes cost a third of a second in fresh memory).
pub fn merge(
    mut rows: Vec<EdgeRow>,
    agents: &[AgentRow],
    hosts: &[(String, String, Vec<String>)],
    live: bool,
) -> Vec<EdgeRow> {
    let by_addr: HashMap<&str, (&str, &str)> = hosts
        .iter()
        .flat_map(|(id, node, addrs)| {
            addrs
                .iter()
                .map(move |a| (a.as_str(), (id.as_str(), node.as_str())))
        })
        .collect();
    let latest: HashMap<&str, i64> = agents
        .iter()
        .map(|a| (a.node.as_str(), a.last_interval_end_ms))
        .collect();
    // Rule 1.
    let marker = format!("-{}-", crate::enrich::server::EXTERNAL_TYPE);
    for r in &mut rows {
        for (id, node) in [
            (&mut r.source, &mut r.client_node),
            (&mut r.target, &mut r.server_node),
        ] {
            if let Some((host, host_node)) = external_addr(id, &marker).and_then(|a| by_addr.get(a))
            {
                *id = host.to_string();
                *node = host_node.to_string();
            }
        }
    }
    // The rows of each edge, in the order of their nodes' names.
    let mut groups: Vec<Vec<usize>> = {
        let mut at: HashMap<(&str, &str, &str, u16), usize> = HashMap::with_capacity(rows.len());
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            let key = (
                r.source.as_str(),
                r.target.as_str(),
                r.protocol.as_str(),
                r.port,
            );
            let g = *at.entry(key).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(i);
        }
        groups
    };
    for g in &mut groups {
        g.sort_by(|a, b| rows[*a].node.cmp(&rows[*b].node));
    }
    let mut rows: Vec<Option<EdgeRow>> = rows.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(groups.len());
    for g in groups {
        // One row per node (two peer addresses of one host, rule 1).
        let mut per_node: Vec<EdgeRow> = Vec::with_capacity(g.len());
        for i in g {
            let Some(r) = rows[i].take() else { continue };
            match per_node.last_mut() {
                Some(last) if last.node == r.node => add(last, &r),
                _ => per_node.push(r),
            }
        }
        let seen_by: Vec<String> = per_node.iter().map(|r| r.node.clone()).collect();
        let Some(any) = per_node.first() else {
            continue;
        };
        let (client_node, server_node) = (any.client_node.as_str(), any.server_node.as_str());
        // The row of a (named) node's agent.
        let of = |n: &str| {
            (!n.is_empty())
                .then(|| per_node.iter().position(|r| r.node == n))
                .flatten()
        };
        let owner = match of(client_node) {
            Some(i) => i,
            None if !client_node.is_empty() && latest.contains_key(client_node) => continue,
            None => of(server_node).unwrap_or(0),
        };
        let mut e = per_node.swap_remove(owner);
        if live
            && latest
                .get(e.node.as_str())
                .is_some_and(|l| e.last_interval_end_ms < *l)
        {
            e.health.status = Status::NoStatus;
        }
        e.seen_by = seen_by;
        out.push(e);
    }
    out.sort_by(EdgeRow::busiest_first);
    out
}

/// The address of an external endpoint's ID (`<ds>-flows.external-<ip>`;
/// `marker` is `-flows.external-`).
fn external_addr<'a>(id: &'a str, marker: &str) -> Option<&'a str> {
    let (_, tail) = id.rsplit_once(marker)?;
    tail.parse::<std::net::IpAddr>().ok().map(|_| tail)
}

/// Adds one node's row of an edge to another of the same node (two peer
/// addresses of one host, rule 1).
fn add(a: &mut EdgeRow, b: &EdgeRow) {
    a.connections_opened += b.connections_opened;
    a.connections_active += b.connections_active;
    a.packets_client_to_server += b.packets_client_to_server;
    a.bytes_client_to_server += b.bytes_client_to_server;
    a.packets_server_to_client += b.packets_server_to_client;
    a.bytes_server_to_client += b.bytes_server_to_client;
    let hs = a.handshake_count + b.handshake_count;
    if hs > 0 {
        let w = |m: Option<f64>, n: u64| m.unwrap_or(0.0) * n as f64;
        a.handshake_mean_us = Some(
            (w(a.handshake_mean_us, a.handshake_count) + w(b.handshake_mean_us, b.handshake_count))
                / hs as f64,
        );
    }
    a.handshake_count = hs;
    a.handshake_min_us = min_opt(a.handshake_min_us, b.handshake_min_us, f64::min);
    a.handshake_max_us = min_opt(a.handshake_max_us, b.handshake_max_us, f64::max);
    a.tcp_resets += b.tcp_resets;
    a.first_seen_ms = a.first_seen_ms.min(b.first_seen_ms);
    a.last_seen_ms = a.last_seen_ms.max(b.last_seen_ms);
    a.last_interval_end_ms = a.last_interval_end_ms.max(b.last_interval_end_ms);
    let srtt = match (a.health.srtt_us.take(), b.health.srtt_us) {
        (Some(x), Some(y)) => {
            let mut s = x;
            s.samples = x.samples + y.samples;
            s.mean =
                (x.mean * x.samples as f64 + y.mean * y.samples as f64) / s.samples.max(1) as f64;
            s.min = x.min.min(y.min);
            s.max = x.max.max(y.max);
            Some(s)
        }
        (x, y) => x.or(y),
    };
    let mut bh = b.health.clone();
    bh.srtt_us = None;
    a.health.merge(&bh);
    a.health.srtt_us = srtt;
}

fn min_opt(a: Option<f64>, b: Option<f64>, f: fn(f64, f64) -> f64) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(f(x, y)),
        (x, y) => x.or(y),
    }
}
