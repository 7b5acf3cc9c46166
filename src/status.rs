//! Edge health and Coordimap's status: what an edge's connections suffered
//! in one interval (failed attempts by cause, SYN retransmits, resets) and
//! the Green / Orange / Red each relationship and server endpoint gets from
//! it, by the rules in the README ("Edge health and status").

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use crate::flow::{Failure, FlowRecord};
use crate::graph::Graph;

/// Coordimap's element status, ordered from best to worst.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Status {
    /// No traffic in the interval.
    #[default]
    NoStatus,
    Green,
    Orange,
    Red,
}

impl Status {
    pub const ALL: [Status; 4] = [Status::NoStatus, Status::Green, Status::Orange, Status::Red];

    pub fn name(self) -> &'static str {
        match self {
            Status::NoStatus => "NoStatus",
            Status::Green => "Green",
            Status::Orange => "Orange",
            Status::Red => "Red",
        }
    }
}

/// The thresholds of the status rules, per data source (`flows` options
/// `status_failed_percent`, `status_retransmit_percent`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Red at or above this share of failed attempts (percent).
    pub failed_percent: f64,
    /// Orange above this share of retransmitted segments (percent).
    pub retransmit_percent: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            failed_percent: 5.0,
            retransmit_percent: 2.0,
        }
    }
}

/// Failed attempts to connect, by cause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Failures {
    pub refused: u64,
    pub unanswered: u64,
    pub unreachable: u64,
}

impl Failures {
    pub fn total(&self) -> u64 {
        self.refused + self.unanswered + self.unreachable
    }

    fn add(&mut self, f: Failure) {
        match f {
            Failure::Refused => self.refused += 1,
            Failure::Unanswered => self.unanswered += 1,
            Failure::Unreachable => self.unreachable += 1,
        }
    }
}

/// The health of one edge (protocol, port) over one interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EdgeHealth {
    /// Connections opened this interval plus attempts decided failed this
    /// interval that were opened earlier: the denominator of the Red rule.
    pub connections_attempted: u64,
    pub connections_failed: Failures,
    pub syn_retransmits: u64,
    /// Connections reset after establishment by the client / the server.
    pub resets_client: u64,
    pub resets_server: u64,
    /// TCP segments sent again, by direction (kernel tracepoints).
    pub retransmits_client_to_server: u64,
    pub retransmits_server_to_client: u64,
    /// Packets the kernel dropped, by reason (absent when none).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub drops: BTreeMap<Arc<str>, u64>,
    /// Smoothed RTT of the connections that closed (absent when none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub srtt_us: Option<Srtt>,
    pub status: Status,
}

/// Smoothed RTT samples of an edge's connections in one interval, in µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Srtt {
    /// Connections sampled.
    pub samples: u64,
    pub min: u32,
    pub mean: f64,
    pub max: u32,
    #[serde(skip)]
    sum: u64,
}

impl Srtt {
    fn add(this: &mut Option<Srtt>, o: &Srtt) {
        let s = this.get_or_insert(Srtt {
            min: o.min,
            max: o.max,
            ..Default::default()
        });
        s.samples += o.samples;
        s.sum += o.sum;
        s.min = s.min.min(o.min);
        s.max = s.max.max(o.max);
        s.mean = s.sum as f64 / s.samples.max(1) as f64;
    }

    fn one(us: u32) -> Srtt {
        Srtt {
            samples: 1,
            min: us,
            mean: us as f64,
            max: us,
            sum: us as u64,
        }
    }
}

impl EdgeHealth {
    /// Adds another edge's health (edges folded into one); the status is
    /// judged again afterwards.
    pub fn merge(&mut self, o: &EdgeHealth) {
        self.connections_attempted += o.connections_attempted;
        self.connections_failed.refused += o.connections_failed.refused;
        self.connections_failed.unanswered += o.connections_failed.unanswered;
        self.connections_failed.unreachable += o.connections_failed.unreachable;
        self.syn_retransmits += o.syn_retransmits;
        self.resets_client += o.resets_client;
        self.resets_server += o.resets_server;
        self.retransmits_client_to_server += o.retransmits_client_to_server;
        self.retransmits_server_to_client += o.retransmits_server_to_client;
        add_drops(&mut self.drops, &o.drops);
        if let Some(s) = &o.srtt_us {
            Srtt::add(&mut self.srtt_us, s);
        }
        self.status = self.status.max(o.status);
    }

    /// Adds one connection's record of the interval.
    pub fn add(&mut self, r: &FlowRecord) {
        let h = &r.health;
        if r.opened || h.failure.is_some() {
            self.connections_attempted += 1;
        }
        if let Some(f) = h.failure {
            self.connections_failed.add(f);
        }
        self.syn_retransmits += h.syn_retransmits as u64;
        self.resets_client += h.resets_client as u64;
        self.resets_server += h.resets_server as u64;
        self.retransmits_client_to_server += h.retransmits_client_to_server;
        self.retransmits_server_to_client += h.retransmits_server_to_client;
        add_drops(&mut self.drops, r.drops());
        if let Some(us) = r.srtt_us {
            Srtt::add(&mut self.srtt_us, &Srtt::one(us));
        }
    }

    /// The status by the rules, given the edge's packets this interval.
    pub fn judge(&self, packets: u64, t: &Thresholds) -> Status {
        let failed = self.connections_failed.total();
        let attempts = self.connections_attempted.max(failed);
        if failed > 0
            && (failed == attempts || failed as f64 * 100.0 >= t.failed_percent * attempts as f64)
        {
            return Status::Red;
        }
        let retransmits = self.retransmits_client_to_server + self.retransmits_server_to_client;
        if self.resets_client + self.resets_server > 0
            || !self.drops.is_empty()
            || retransmits as f64 * 100.0 > t.retransmit_percent * packets as f64
        {
            return Status::Orange;
        }
        if packets == 0 {
            return Status::NoStatus;
        }
        Status::Green
    }
}

fn add_drops(to: &mut BTreeMap<Arc<str>, u64>, from: &BTreeMap<Arc<str>, u64>) {
    for (reason, n) in from {
        *to.entry(reason.clone()).or_default() += n;
    }
}

/// Sets the status of every edge and of every server endpoint (the worst
/// of its incoming edges) of one interval's graph.
pub fn apply(g: &mut Graph, t: &Thresholds) {
    let mut servers: BTreeMap<Arc<str>, Status> = BTreeMap::new();
    for (k, e) in g.edges.iter_mut() {
        let packets = e.packets_client_to_server + e.packets_server_to_client;
        e.health.status = e.health.judge(packets, t);
        let s = servers.entry(k.server.clone()).or_default();
        *s = (*s).max(e.health.status);
    }
    g.endpoint_status = servers;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_in_order() {
        let t = Thresholds::default();
        let mut h = EdgeHealth {
            connections_attempted: 100,
            ..Default::default()
        };
        assert_eq!(h.judge(10, &t), Status::Green);
        assert_eq!(h.judge(0, &t), Status::NoStatus);
        h.drops.insert("NETFILTER_DROP".into(), 1);
        assert_eq!(h.judge(10, &t), Status::Orange);
        h.drops.clear();
        h.resets_server = 1;
        assert_eq!(h.judge(10, &t), Status::Orange);
        h.connections_failed.refused = 4;
        assert_eq!(h.judge(10, &t), Status::Orange);
        h.connections_failed.unanswered = 1;
        assert_eq!(h.judge(10, &t), Status::Red);
        // Every attempt failed: Red whatever the threshold.
        let strict = Thresholds {
            failed_percent: 100.0,
            ..t
        };
        let all = EdgeHealth {
            connections_attempted: 3,
            connections_failed: Failures {
                refused: 3,
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(all.judge(0, &strict), Status::Red);
        assert!(Status::Red > Status::Orange && Status::Green > Status::NoStatus);
    }
}
