//! Records: one connection over one interval, oriented client → server,
//! as `--output flows` prints it and the graph aggregates it.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

use super::*;

/// RFC 3339 with microseconds, UTC: how times appear in JSON output.
pub fn rfc3339_micros<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_micros(*t))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// One connection over one interval, oriented client (`src`) → server (`dst`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlowRecord {
    /// The interface that counted it (the first that saw the connection).
    pub interface: Arc<str>,
    pub ifindex: u32,
    /// Other interfaces that saw the same connection this interval; their
    /// packets are not counted again.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub also_seen_on: Vec<String>,
    pub protocol: Cow<'static, str>,
    pub src_ip: IpAddr,
    pub src_port: u16,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    pub src_to_dst: Counters,
    pub dst_to_src: Counters,
    pub tcp_flags: Vec<&'static str>,
    #[serde(serialize_with = "rfc3339_micros")]
    pub first_seen: SystemTime,
    #[serde(serialize_with = "rfc3339_micros")]
    pub last_seen: SystemTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshake_rtt_us: Option<f64>,
    pub orientation: Orientation,
    /// The connection was first seen in this interval.
    pub opened: bool,
    /// A TCP RST was seen in this interval.
    pub reset: bool,
    /// Handshake time measured in this interval (for interval statistics).
    #[serde(skip)]
    pub handshake_this_interval: Option<f64>,
    /// Failure, SYN retransmits and resets (see `health`).
    #[serde(flatten)]
    pub health: Health,
    /// Names of the server end and of the client end (issue 14).
    #[serde(skip_serializing_if = "EndNames::is_empty")]
    pub dst_names: EndNames,
    #[serde(skip_serializing_if = "EndNames::is_empty")]
    pub src_names: EndNames,
    /// Packets of this connection the kernel dropped this interval, by
    /// reason (skb:kfree_skb); absent when none.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub drops: std::collections::BTreeMap<Arc<str>, u64>,
    /// The kernel's smoothed RTT of the connection in µs this interval:
    /// the client socket's sample when the client is on this host and was
    /// sampled (at its first segment received while ESTABLISHED in the
    /// interval, or as it left ESTABLISHED), else the server socket's;
    /// absent when neither was sampled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub srtt_us: Option<u32>,
}
