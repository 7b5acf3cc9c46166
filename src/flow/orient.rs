//! Orientation: which side of a connection is the client, and which rule
//! decided it.

use serde::Serialize;

use super::*;
use crate::enrich::host::HostView;

/// Which rule decided who the client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Orientation {
    /// The client sent the TCP SYN (without ACK) and the agent saw it.
    Syn,
    /// The client sent the ICMP echo request.
    IcmpEcho,
    /// A socket of this host listens on the server's address and port.
    ListenSocket,
    /// The side that sent the first packet, for a UDP (or other) flow that
    /// started while the agent was running.
    FirstPacket,
    /// The lower port is the server's (well-known and registered ports are
    /// below the ephemeral range).
    Port,
    /// Nothing better: the side of the first packet the agent saw.
    FirstSeen,
}

/// Decides which side (0/1) of the key is the client, and why.
/// `saw_start`: the flow began while the agent was running.
pub fn orient(key: &ConnKey, s: &Sample, host: &HostView, saw_start: bool) -> (usize, Orientation) {
    let first = (s.first_side.saturating_sub(1).min(1)) as usize;
    if s.open_side != 0 {
        let rule = if key.proto == proto::TCP {
            Orientation::Syn
        } else {
            Orientation::IcmpEcho
        };
        return (((s.open_side - 1) as usize).min(1), rule);
    }
    if !has_ports(key.proto) {
        return (first, Orientation::FirstSeen);
    }
    if key.proto != proto::TCP && saw_start {
        return (first, Orientation::FirstPacket);
    }
    let listens: Vec<bool> = (0..2)
        .map(|i| host.is_listening(key.proto, key.addr[i], key.port[i]))
        .collect();
    if listens[0] != listens[1] {
        let server = if listens[0] { 0 } else { 1 };
        return (1 - server, Orientation::ListenSocket);
    }
    if key.port[0] != key.port[1] {
        let server = if key.port[0] < key.port[1] { 0 } else { 1 };
        return (1 - server, Orientation::Port);
    }
    (first, Orientation::FirstSeen)
}
