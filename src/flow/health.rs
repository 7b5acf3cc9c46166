//! Health of one connection over one interval: how its attempt to connect
//! failed (refused, unanswered, unreachable), SYN retransmissions, and
//! resets after establishment by the side that sent them.

use std::time::Duration;

use serde::Serialize;

use super::*;

/// Why an attempt to connect failed. Each attempt fails at most once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// The SYN was answered by a RST.
    Refused,
    /// No SYN/ACK within [`UNANSWERED_AFTER`] of the first SYN.
    Unanswered,
    /// An ICMP/ICMPv6 destination unreachable quoted the flow's packet (a
    /// TCP SYN not yet answered, or any packet of another protocol: UDP to
    /// a closed port).
    Unreachable,
}

impl Failure {
    pub fn name(self) -> &'static str {
        match self {
            Failure::Refused => "refused",
            Failure::Unanswered => "unanswered",
            Failure::Unreachable => "unreachable",
        }
    }
}

/// A SYN without SYN/ACK for this long is unanswered (TCP has sent the SYN
/// again after 1 s and 3 s by then).
pub const UNANSWERED_AFTER: Duration = Duration::from_secs(3);

/// The state of a connection's current attempt to connect, across intervals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attempt {
    /// SYNs seen of this attempt so far.
    pub syns: u32,
    /// Established or failed: nothing more to decide.
    pub decided: bool,
}

/// What a record says about the connection's health this interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Health {
    /// How the attempt to connect failed (decided this interval), or null.
    pub failure: Option<Failure>,
    /// SYNs sent again this interval (all but the first SYN of an attempt).
    pub syn_retransmits: u32,
    /// 1 when the client (server) sent a RST after establishment this
    /// interval.
    pub resets_client: u32,
    pub resets_server: u32,
    /// TCP segments sent again by each side (the kernel's TcpRetransSegs,
    /// from the tcp_retransmit_skb / tcp_retransmit_synack tracepoints).
    pub retransmits_client_to_server: u64,
    pub retransmits_server_to_client: u64,
}

/// Writes the TCP counters a flow record and an edge both carry, under the
/// same keys and in the same order: SYN retransmits, resets per side,
/// retransmitted segments per direction.
pub fn serialize_tcp_counts<M: serde::ser::SerializeMap>(
    m: &mut M,
    [syn, rc, rs, c2s, s2c]: [u64; 5],
) -> Result<(), M::Error> {
    m.serialize_entry("syn_retransmits", &syn)?;
    m.serialize_entry("resets_client", &rc)?;
    m.serialize_entry("resets_server", &rs)?;
    m.serialize_entry("retransmits_client_to_server", &c2s)?;
    m.serialize_entry("retransmits_server_to_client", &s2c)
}

/// The handshake times the table keeps for a connection.
pub struct Handshake {
    pub client_side: usize,
    pub syn_ns: u64,
    pub synack_ns: u64,
}

/// Judges one interval's sample of a connection; updates its attempt.
pub fn judge(proto: u8, s: &Sample, h: &Handshake, a: &mut Attempt, now_ns: u64) -> Health {
    let mut out = Health::default();
    if proto != proto::TCP {
        if s.unreach > 0 {
            out.failure = Some(Failure::Unreachable);
        }
        return out;
    }
    let before = a.syns;
    a.syns = a.syns.saturating_add(s.syns);
    out.syn_retransmits = a.syns.saturating_sub(1) - before.saturating_sub(1);
    let (cs, ss) = (h.client_side, 1 - h.client_side);
    let pending = h.syn_ns != 0 && h.synack_ns == 0 && !a.decided;
    if pending {
        if s.tcp_flags[ss] & TCP_RST != 0 {
            out.failure = Some(Failure::Refused);
        } else if s.unreach > 0 {
            out.failure = Some(Failure::Unreachable);
        } else if now_ns.saturating_sub(h.syn_ns) >= UNANSWERED_AFTER.as_nanos() as u64 {
            out.failure = Some(Failure::Unanswered);
        }
        a.decided = out.failure.is_some();
        return out;
    }
    if h.synack_ns != 0 {
        a.decided = true;
    }
    out.resets_client = (s.tcp_flags[cs] & TCP_RST != 0) as u32;
    out.resets_server = (s.tcp_flags[ss] & TCP_RST != 0) as u32;
    out
}

/// True while the attempt waits for its SYN/ACK.
pub fn is_pending(proto: u8, h: &Handshake, a: &Attempt) -> bool {
    proto == proto::TCP && h.syn_ns != 0 && h.synack_ns == 0 && !a.decided
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syn_only(syns: u32, at: u64) -> Sample {
        Sample {
            packets: [syns as u64, 0],
            syn_ns: at,
            syns,
            tcp_flags: [0x02, 0],
            open_side: 1,
            first_side: 1,
            ..Default::default()
        }
    }

    #[test]
    fn refused_unanswered_and_resets() {
        let h = Handshake {
            client_side: 0,
            syn_ns: 1_000,
            synack_ns: 0,
        };
        // SYN answered by RST|ACK: refused, once.
        let mut a = Attempt::default();
        let s = Sample {
            tcp_flags: [0x02, 0x14],
            ..syn_only(1, 1_000)
        };
        let got = judge(6, &s, &h, &mut a, 2_000);
        assert_eq!(got.failure, Some(Failure::Refused));
        assert_eq!((got.resets_client, got.resets_server), (0, 0));
        assert!(!is_pending(6, &h, &a));
        // Two SYNs, then the timeout in a later interval without packets.
        let mut a = Attempt::default();
        let got = judge(6, &syn_only(2, 1_000), &h, &mut a, 2_000_000_000);
        assert_eq!((got.failure, got.syn_retransmits), (None, 1));
        assert!(is_pending(6, &h, &a));
        let got = judge(6, &syn_only(1, 0), &h, &mut a, 3_000_001_000);
        assert_eq!(
            (got.failure, got.syn_retransmits),
            (Some(Failure::Unanswered), 1)
        );
        // Established, then the server resets.
        let est = Handshake {
            synack_ns: 1_500,
            ..h
        };
        let mut a = Attempt::default();
        let s = Sample {
            tcp_flags: [0x10, 0x14],
            ..Default::default()
        };
        let got = judge(6, &s, &est, &mut a, 9_000);
        assert_eq!(
            (got.failure, got.resets_server, got.resets_client),
            (None, 1, 0)
        );
    }
}
