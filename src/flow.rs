//! The flow model: connections keyed by what the kernel saw, oriented
//! client → server, and the per-interval records the agent prints.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::datapath::{RawKey, Sample};

/// A flow as one interface sees it; side 0 is the lower (address, port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub ifindex: u32,
    pub proto: u8,
    pub addr: [IpAddr; 2],
    pub port: [u16; 2],
}

fn ip_of(raw: &[u8; 16], family: u8) -> IpAddr {
    let v6 = Ipv6Addr::from(*raw);
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(raw[12], raw[13], raw[14], raw[15]))
    } else {
        IpAddr::V6(v6)
    }
}

impl From<&RawKey> for FlowKey {
    fn from(k: &RawKey) -> Self {
        FlowKey {
            ifindex: k.ifindex,
            proto: k.proto,
            addr: [ip_of(&k.addr[0], k.family), ip_of(&k.addr[1], k.family)],
            port: k.port,
        }
    }
}

/// Which rule decided who the client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Orientation {
    /// The client sent the TCP SYN (without ACK) and the agent saw it.
    Syn,
    /// The client sent the ICMP echo request.
    IcmpEcho,
    /// No handshake seen: the side with the lower port is the server.
    Port,
    /// The side that sent the first packet the agent saw.
    FirstPacket,
}

pub fn protocol_name(proto: u8, v6: bool) -> String {
    match proto {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        136 => "udplite".into(),
        _ => {
            let _ = v6;
            proto.to_string()
        }
    }
}

const TCP_FLAG_NAMES: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];

pub fn tcp_flag_names(bits: u32) -> Vec<&'static str> {
    TCP_FLAG_NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, n)| *n)
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// One flow over one interval, oriented client (`src`) → server (`dst`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlowRecord {
    pub interface: String,
    pub ifindex: u32,
    pub protocol: String,
    pub src_ip: IpAddr,
    pub src_port: u16,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    pub src_to_dst: Counters,
    pub dst_to_src: Counters,
    pub tcp_flags: Vec<&'static str>,
    pub first_seen: String,
    pub last_seen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshake_rtt_us: Option<f64>,
    pub orientation: Orientation,
}

/// What the table remembers of a connection across intervals.
#[derive(Debug, Clone)]
struct Conn {
    client_side: usize,
    rule: Orientation,
    first_seen_ns: u64,
    last_seen_ns: u64,
    syn_ns: u64,
    synack_ns: u64,
    flags: u32,
    closed: bool,
}

/// Connections across intervals, bounded in entries and idle time.
pub struct FlowTable {
    conns: HashMap<FlowKey, Conn>,
    cap: usize,
    idle: Duration,
    pub evicted: u64,
}

/// Converts CLOCK_MONOTONIC nanoseconds (the kernel's clock) to wall time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    offset_ns: i128,
}

impl Clock {
    pub fn now() -> Clock {
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        Clock {
            offset_ns: real as i128 - mono as i128,
        }
    }
    pub fn wall(&self, mono_ns: u64) -> SystemTime {
        let ns = (mono_ns as i128 + self.offset_ns).max(0) as u64;
        SystemTime::UNIX_EPOCH + Duration::from_nanos(ns)
    }
    pub fn rfc3339(&self, mono_ns: u64) -> String {
        humantime::format_rfc3339_micros(self.wall(mono_ns)).to_string()
    }
}

pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl FlowTable {
    pub fn new(cap: usize, idle: Duration) -> FlowTable {
        FlowTable {
            conns: HashMap::new(),
            cap: cap.max(1),
            idle,
            evicted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Merges one drain period's kernel entries (several entries of one
    /// flow, e.g. map and overflow, are added up) and returns a record per
    /// flow. `name` gives the interface name of an ifindex.
    pub fn ingest(
        &mut self,
        entries: &[(RawKey, Sample)],
        now_mono_ns: u64,
        clock: &Clock,
        name: &dyn Fn(u32) -> String,
    ) -> Vec<FlowRecord> {
        let mut merged: HashMap<FlowKey, Sample> = HashMap::new();
        let mut order: Vec<FlowKey> = Vec::new();
        for (k, s) in entries {
            let key = FlowKey::from(k);
            match merged.get_mut(&key) {
                Some(m) => merge(m, s),
                None => {
                    order.push(key);
                    merged.insert(key, *s);
                }
            }
        }
        let mut out = Vec::with_capacity(order.len());
        for key in order {
            let s = merged[&key];
            let conn = self.update_conn(&key, &s);
            out.push(record(&key, &s, &conn, clock, name));
        }
        self.expire(now_mono_ns);
        out
    }

    fn update_conn(&mut self, key: &FlowKey, s: &Sample) -> Conn {
        let flags = s.tcp_flags[0] | s.tcp_flags[1];
        let c = self.conns.entry(*key).or_insert_with(|| {
            let (client_side, rule) = orient(key, s);
            Conn {
                client_side,
                rule,
                first_seen_ns: s.first_seen_ns,
                last_seen_ns: s.last_seen_ns,
                syn_ns: 0,
                synack_ns: 0,
                flags: 0,
                closed: false,
            }
        });
        // A handshake seen later (a new connection on the same tuple, or
        // the agent saw the connection start) decides the direction.
        if s.open_side != 0 && !matches!(c.rule, Orientation::Syn | Orientation::IcmpEcho) {
            let (side, rule) = orient(key, s);
            c.client_side = side;
            c.rule = rule;
        }
        if s.syn_ns != 0 && c.syn_ns == 0 {
            c.syn_ns = s.syn_ns;
        }
        if s.synack_ns != 0 && c.synack_ns == 0 {
            c.synack_ns = s.synack_ns;
        }
        c.first_seen_ns = c.first_seen_ns.min(s.first_seen_ns);
        c.last_seen_ns = c.last_seen_ns.max(s.last_seen_ns);
        c.flags |= flags;
        // FIN or RST: the connection may end; it expires once quiet.
        c.closed = c.flags & 0x05 != 0;
        c.clone()
    }

    fn expire(&mut self, now: u64) {
        let idle = self.idle.as_nanos() as u64;
        let closed_idle = idle / 4;
        self.conns.retain(|_, c| {
            let quiet = now.saturating_sub(c.last_seen_ns);
            quiet < if c.closed { closed_idle } else { idle }
        });
        if self.conns.len() > self.cap {
            let mut by_age: Vec<(u64, FlowKey)> = self
                .conns
                .iter()
                .map(|(k, c)| (c.last_seen_ns, *k))
                .collect();
            by_age.sort_unstable_by_key(|(t, _)| *t);
            let excess = self.conns.len() - self.cap;
            for (_, k) in by_age.into_iter().take(excess) {
                self.conns.remove(&k);
                self.evicted += 1;
            }
        }
    }
}

fn merge(m: &mut Sample, s: &Sample) {
    for i in 0..2 {
        m.packets[i] += s.packets[i];
        m.bytes[i] += s.bytes[i];
        m.tcp_flags[i] |= s.tcp_flags[i];
    }
    if s.first_seen_ns < m.first_seen_ns {
        m.first_seen_ns = s.first_seen_ns;
        m.first_side = s.first_side;
    }
    m.last_seen_ns = m.last_seen_ns.max(s.last_seen_ns);
    if m.open_side == 0 {
        m.open_side = s.open_side;
    }
    m.syn_ns = min_nonzero(m.syn_ns, s.syn_ns);
    m.synack_ns = min_nonzero(m.synack_ns, s.synack_ns);
}

fn min_nonzero(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (x, y) => x.min(y),
    }
}

/// Decides which side (0/1) of the key is the client, and why.
fn orient(key: &FlowKey, s: &Sample) -> (usize, Orientation) {
    if s.open_side != 0 {
        let rule = if key.proto == 6 {
            Orientation::Syn
        } else {
            Orientation::IcmpEcho
        };
        return ((s.open_side - 1) as usize, rule);
    }
    let has_ports = matches!(key.proto, 6 | 17 | 132 | 136);
    if key.proto == 6 && has_ports && key.port[0] != key.port[1] {
        // The server listens on the lower port.
        let server = if key.port[0] < key.port[1] { 0 } else { 1 };
        return (1 - server, Orientation::Port);
    }
    (
        s.first_side.saturating_sub(1).min(1) as usize,
        Orientation::FirstPacket,
    )
}

fn record(
    key: &FlowKey,
    s: &Sample,
    c: &Conn,
    clock: &Clock,
    name: &dyn Fn(u32) -> String,
) -> FlowRecord {
    let cs = c.client_side;
    let ss = 1 - cs;
    let rtt = if c.syn_ns != 0 && c.synack_ns >= c.syn_ns {
        Some((c.synack_ns - c.syn_ns) as f64 / 1000.0)
    } else {
        None
    };
    FlowRecord {
        interface: name(key.ifindex),
        ifindex: key.ifindex,
        protocol: protocol_name(key.proto, key.addr[0].is_ipv6()),
        src_ip: key.addr[cs],
        src_port: key.port[cs],
        dst_ip: key.addr[ss],
        dst_port: key.port[ss],
        src_to_dst: Counters {
            packets: s.packets[cs],
            bytes: s.bytes[cs],
        },
        dst_to_src: Counters {
            packets: s.packets[ss],
            bytes: s.bytes[ss],
        },
        tcp_flags: if key.proto == 6 {
            tcp_flag_names(c.flags)
        } else {
            Vec::new()
        },
        first_seen: clock.rfc3339(c.first_seen_ns),
        last_seen: clock.rfc3339(c.last_seen_ns),
        handshake_rtt_us: rtt,
        orientation: c.rule,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut o = [0u8; 16];
        o[10] = 0xff;
        o[11] = 0xff;
        o[12..].copy_from_slice(&a);
        o
    }

    fn key(proto: u8, p0: u16, p1: u16) -> RawKey {
        RawKey {
            addr: [v4([10, 0, 0, 1]), v4([10, 0, 0, 2])],
            ifindex: 7,
            port: [p0, p1],
            proto,
            family: 4,
            pad: [0; 2],
        }
    }

    fn clock0() -> Clock {
        Clock {
            offset_ns: 1_700_000_000_000_000_000,
        }
    }

    #[test]
    fn syn_decides_even_against_ports() {
        // Side 1 (port 22) sent the SYN: it is the client.
        let s = Sample {
            packets: [3, 4],
            bytes: [300, 400],
            first_seen_ns: 1_000,
            last_seen_ns: 9_000,
            syn_ns: 1_000,
            synack_ns: 1_500,
            tcp_flags: [0x12, 0x02],
            open_side: 2,
            first_side: 2,
            ..Default::default()
        };
        let mut t = FlowTable::new(10, Duration::from_secs(60));
        let recs = t.ingest(&[(key(6, 80, 40000), s)], 10_000, &clock0(), &|_| {
            "veth0".into()
        });
        assert_eq!(recs.len(), 1);
        let r = &recs[0];
        assert_eq!(r.src_ip.to_string(), "10.0.0.2");
        assert_eq!((r.src_port, r.dst_port), (40000, 80));
        assert_eq!(
            r.src_to_dst,
            Counters {
                packets: 4,
                bytes: 400
            }
        );
        assert_eq!(
            r.dst_to_src,
            Counters {
                packets: 3,
                bytes: 300
            }
        );
        assert_eq!(r.handshake_rtt_us, Some(0.5));
        assert_eq!(r.orientation, Orientation::Syn);
        assert_eq!(r.tcp_flags, vec!["SYN", "ACK"]);
        assert_eq!(
            serde_json::to_string(r).unwrap(),
            "{\"interface\":\"veth0\",\"ifindex\":7,\"protocol\":\"tcp\",\"src_ip\":\"10.0.0.2\",\"src_port\":40000,\
             \"dst_ip\":\"10.0.0.1\",\"dst_port\":80,\"src_to_dst\":{\"packets\":4,\"bytes\":400},\
             \"dst_to_src\":{\"packets\":3,\"bytes\":300},\"tcp_flags\":[\"SYN\",\"ACK\"],\
             \"first_seen\":\"2023-11-14T22:13:20.000001Z\",\"last_seen\":\"2023-11-14T22:13:20.000009Z\",\
             \"handshake_rtt_us\":0.5,\"orientation\":\"syn\"}"
        );
    }

    #[test]
    fn handshake_split_over_two_drains_keeps_rtt_and_direction() {
        let mut t = FlowTable::new(10, Duration::from_secs(60));
        let c = clock0();
        let a = Sample {
            packets: [1, 0],
            bytes: [74, 0],
            first_seen_ns: 100,
            last_seen_ns: 100,
            syn_ns: 100,
            tcp_flags: [0x02, 0],
            open_side: 1,
            first_side: 1,
            ..Default::default()
        };
        t.ingest(&[(key(6, 40000, 80), a)], 200, &c, &|_| "x".into());
        let b = Sample {
            packets: [5, 6],
            bytes: [500, 600],
            first_seen_ns: 350,
            last_seen_ns: 900,
            synack_ns: 350,
            tcp_flags: [0x10, 0x12],
            first_side: 2,
            ..Default::default()
        };
        let r = t.ingest(&[(key(6, 40000, 80), b)], 1000, &c, &|_| "x".into());
        assert_eq!(r[0].src_port, 40000);
        assert_eq!(r[0].orientation, Orientation::Syn);
        assert_eq!(r[0].handshake_rtt_us, Some(0.25));
        assert_eq!(
            r[0].src_to_dst,
            Counters {
                packets: 5,
                bytes: 500
            }
        );
        assert_eq!(r[0].tcp_flags, vec!["SYN", "ACK"]);
    }

    #[test]
    fn no_handshake_tcp_uses_lower_port_and_udp_first_packet() {
        let mut t = FlowTable::new(10, Duration::from_secs(60));
        let s = Sample {
            packets: [1, 1],
            bytes: [60, 60],
            first_side: 1,
            ..Default::default()
        };
        let r = t.ingest(
            &[(key(6, 443, 50000), s), (key(17, 5353, 40000), s)],
            0,
            &clock0(),
            &|_| "x".into(),
        );
        assert_eq!(
            (r[0].src_port, r[0].dst_port, r[0].orientation),
            (50000, 443, Orientation::Port)
        );
        assert_eq!(
            (r[1].src_port, r[1].dst_port, r[1].orientation),
            (5353, 40000, Orientation::FirstPacket)
        );
    }

    #[test]
    fn entries_of_one_flow_are_added_up_and_table_is_bounded() {
        let mut t = FlowTable::new(2, Duration::from_secs(60));
        let s = Sample {
            packets: [2, 0],
            bytes: [200, 0],
            first_seen_ns: 5,
            last_seen_ns: 5,
            first_side: 1,
            ..Default::default()
        };
        let r = t.ingest(
            &[(key(17, 1, 2), s), (key(17, 1, 2), s)],
            10,
            &clock0(),
            &|_| "x".into(),
        );
        assert_eq!(r.len(), 1);
        assert_eq!(
            r[0].src_to_dst,
            Counters {
                packets: 4,
                bytes: 400
            }
        );
        t.ingest(
            &[(key(17, 3, 4), s), (key(17, 5, 6), s), (key(17, 7, 8), s)],
            10,
            &clock0(),
            &|_| "x".into(),
        );
        assert_eq!(t.len(), 2);
        assert_eq!(t.evicted, 2);
    }

    #[test]
    fn idle_connections_expire() {
        let mut t = FlowTable::new(10, Duration::from_secs(1));
        let s = Sample {
            packets: [1, 0],
            bytes: [60, 0],
            first_seen_ns: 0,
            last_seen_ns: 0,
            first_side: 1,
            ..Default::default()
        };
        t.ingest(&[(key(17, 1, 2), s)], 500_000_000, &clock0(), &|_| {
            "x".into()
        });
        assert_eq!(t.len(), 1);
        t.ingest(&[], 1_000_000_001, &clock0(), &|_| "x".into());
        assert_eq!(t.len(), 0);
    }
}
