//! Flow keys: a connection as the kernel keyed it, protocol numbers and
//! names, TCP flags, and the per-drain sample of counters.

use std::borrow::Cow;
use std::net::IpAddr;

/// A connection, whatever interface saw it; side 0/1 as the kernel key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConnKey {
    pub proto: u8,
    pub addr: [IpAddr; 2],
    pub port: [u16; 2],
}

/// Three word writes instead of the derived hash's field-by-field bytes
/// with length prefixes (the flow table hashes every key of an interval;
/// issue 16's profile). An IPv4 address hashes as its IPv4-mapped IPv6
/// form with the family in the last word, so equal keys hash equal.
impl std::hash::Hash for ConnKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        let bits = |a: &IpAddr| -> u128 {
            match a {
                IpAddr::V4(v) => v.to_ipv6_mapped().to_bits(),
                IpAddr::V6(v) => v.to_bits(),
            }
        };
        let v6 = matches!(self.addr[0], IpAddr::V6(_)) as u64;
        h.write_u128(bits(&self.addr[0]));
        h.write_u128(bits(&self.addr[1]));
        h.write_u64(
            (self.port[0] as u64)
                | (self.port[1] as u64) << 16
                | (self.proto as u64) << 32
                | v6 << 40,
        );
    }
}

/// One entry the datapath hands over: the interface that saw it and the
/// connection as the kernel keyed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub ifindex: u32,
    pub conn: ConnKey,
}

/// The IP protocol numbers flowmap knows by name (IANA), defined once.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
    pub const UDPLITE: u8 = 136;
}

/// Protocols by number and name, as records and the store write them.
const PROTOCOL_NAMES: [(u8, &str); 6] = [
    (proto::TCP, "tcp"),
    (proto::UDP, "udp"),
    (proto::ICMP, "icmp"),
    (proto::ICMPV6, "icmpv6"),
    (proto::SCTP, "sctp"),
    (proto::UDPLITE, "udplite"),
];

pub fn protocol_name(p: u8) -> Cow<'static, str> {
    match PROTOCOL_NAMES.iter().find(|(n, _)| *n == p) {
        Some((_, name)) => (*name).into(),
        None => p.to_string().into(),
    }
}

pub fn has_ports(p: u8) -> bool {
    matches!(p, proto::TCP | proto::UDP | proto::SCTP | proto::UDPLITE)
}

pub const TCP_FLAG_NAMES: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];
pub const TCP_RST: u32 = 0x04;
pub const TCP_FIN: u32 = 0x01;

pub fn tcp_flag_names(bits: u32) -> Vec<&'static str> {
    TCP_FLAG_NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, n)| *n)
        .collect()
}

/// One flow entry of one drain period, with kernel ticks turned into
/// CLOCK_MONOTONIC nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    pub first_seen_ns: u64,
    /// Resolution: one kernel tick (1 to 10 ms).
    pub last_seen_ns: u64,
    pub syn_ns: u64,
    pub synack_ns: u64,
    pub tcp_flags: [u32; 2],
    /// 0 unknown, 1/2: side 0/1 opened (SYN, echo request).
    pub open_side: u8,
    /// 1/2: the side whose packet created the entry.
    pub first_side: u8,
    /// TCP SYNs without ACK: the first and its retransmissions.
    pub syns: u32,
    /// ICMP/ICMPv6 destination-unreachable errors that quote this flow.
    pub unreach: u32,
    /// 1/2: the side whose packet the first of those errors quoted.
    pub unreach_side: u8,
}
