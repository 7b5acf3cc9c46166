//! The flow model: connections keyed by what the kernel saw, counted once
//! across interfaces, oriented client → server, and the per-interval
//! records the agent prints and the graph builder aggregates.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::datapath::{RawKey, Sample};
use crate::host::HostView;

/// A connection, whatever interface saw it; side 0/1 as the kernel key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub proto: u8,
    pub addr: [IpAddr; 2],
    pub port: [u16; 2],
}

fn ip_of(raw: &[u8; 16], family: u8) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(raw[12], raw[13], raw[14], raw[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*raw))
    }
}

impl From<&RawKey> for ConnKey {
    fn from(k: &RawKey) -> Self {
        ConnKey {
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

pub fn protocol_name(proto: u8) -> Cow<'static, str> {
    match proto {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        136 => "udplite".into(),
        _ => proto.to_string().into(),
    }
}

/// RFC 3339 with microseconds, UTC: how times appear in JSON output.
pub fn rfc3339_micros<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_micros(*t))
}

fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 132 | 136)
}

const TCP_FLAG_NAMES: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];
const TCP_RST: u32 = 0x04;
const TCP_FIN: u32 = 0x01;

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
}

impl FlowRecord {
    /// A connection `src` → `dst` with nothing counted yet, seen at `at`:
    /// where records are built without the kernel (tests, benchmarks).
    pub fn between(
        protocol: impl Into<Cow<'static, str>>,
        src: (IpAddr, u16),
        dst: (IpAddr, u16),
        at: SystemTime,
    ) -> FlowRecord {
        FlowRecord {
            interface: "eth0".into(),
            ifindex: 2,
            also_seen_on: Vec::new(),
            protocol: protocol.into(),
            src_ip: src.0,
            src_port: src.1,
            dst_ip: dst.0,
            dst_port: dst.1,
            src_to_dst: Counters::default(),
            dst_to_src: Counters::default(),
            tcp_flags: Vec::new(),
            first_seen: at,
            last_seen: at,
            handshake_rtt_us: None,
            orientation: Orientation::Syn,
            opened: false,
            reset: false,
            handshake_this_interval: None,
        }
    }
}

#[derive(Debug, Clone)]
struct Conn {
    owner: u32,
    client_side: usize,
    rule: Orientation,
    first_seen_ns: u64,
    last_seen_ns: u64,
    syn_ns: u64,
    synack_ns: u64,
    flags: u32,
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
    /// A clock whose wall time is `offset_ns` after the monotonic value (tests).
    pub fn fixed(offset_ns: i128) -> Clock {
        Clock { offset_ns }
    }
    pub fn wall(&self, mono_ns: u64) -> SystemTime {
        let ns = (mono_ns as i128 + self.offset_ns).max(0) as u64;
        SystemTime::UNIX_EPOCH + Duration::from_nanos(ns)
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

/// What one ingest needs besides the kernel entries.
pub struct Context<'a> {
    pub now_mono_ns: u64,
    pub clock: Clock,
    pub host: &'a HostView,
    pub name: &'a dyn Fn(u32) -> Arc<str>,
}

/// Connections across intervals, bounded in entries and idle time.
pub struct FlowTable {
    conns: HashMap<ConnKey, Conn, foldhash::fast::RandomState>,
    cap: usize,
    idle: Duration,
    /// Flows that start later than this (monotonic ns) were seen from their
    /// first packet; earlier ones may have been open before the agent.
    started_ns: u64,
    pub evicted: u64,
}

impl FlowTable {
    pub fn new(cap: usize, idle: Duration, started_ns: u64) -> FlowTable {
        FlowTable {
            conns: HashMap::default(),
            cap: cap.max(1),
            idle,
            started_ns,
            evicted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Flows first seen after `ns` (monotonic) are taken as seen from their
    /// first packet.
    pub fn set_started(&mut self, ns: u64) {
        self.started_ns = ns;
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Merges one drain period's kernel entries and returns one record per
    /// connection. A connection seen on several interfaces is counted on
    /// one of them only (see `owner_of`).
    pub fn ingest(&mut self, entries: &[(RawKey, Sample)], cx: &Context) -> Vec<FlowRecord> {
        // Group the entries of one connection (several interfaces, map and
        // overflow) by sorting, not by a map of vectors: no allocation per
        // connection (and measured faster than hashing here). Records keep
        // the order of first appearance.
        let mut rows: Vec<(ConnKey, u32, u32)> = entries
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (ConnKey::from(k), k.ifindex, i as u32))
            .collect();
        rows.sort_unstable();
        // (first index, range in rows) per connection
        let mut groups: Vec<(u32, usize, usize)> = Vec::new();
        let mut i = 0;
        while i < rows.len() {
            let mut j = i + 1;
            while j < rows.len() && rows[j].0 == rows[i].0 {
                j += 1;
            }
            let first = rows[i..j].iter().map(|r| r.2).min().unwrap_or(0);
            groups.push((first, i, j));
            i = j;
        }
        groups.sort_unstable();
        let mut out = Vec::with_capacity(groups.len());
        let mut per_if: Vec<(u32, Sample)> = Vec::new();
        self.conns.reserve(groups.len().min(self.cap));
        for (_, a, b) in groups {
            let key = rows[a].0;
            per_if.clear();
            for (_, ifindex, idx) in &rows[a..b] {
                let s = &entries[*idx as usize].1;
                match per_if.last_mut() {
                    Some((i, m)) if i == ifindex => merge(m, s),
                    _ => per_if.push((*ifindex, *s)),
                }
            }
            let prev_owner = self.conns.get(&key).map(|c| c.owner);
            let owner = owner_of(prev_owner, &per_if);
            let Some((_, s)) = per_if.iter().find(|(i, _)| *i == owner).copied() else {
                continue;
            };
            let others: Vec<String> = per_if
                .iter()
                .filter(|(i, _)| *i != owner)
                .map(|(i, _)| (cx.name)(*i).to_string())
                .collect();
            let (conn, opened) = self.update_conn(&key, owner, &s, cx.host);
            out.push(record(&key, &s, &conn, opened, others, cx));
        }
        self.expire(cx.now_mono_ns);
        out
    }

    /// Updates (or creates: `true`) the connection.
    fn update_conn(
        &mut self,
        key: &ConnKey,
        owner: u32,
        s: &Sample,
        host: &HostView,
    ) -> (Conn, bool) {
        let started_ns = self.started_ns;
        let mut opened = false;
        let c = self.conns.entry(*key).or_insert_with(|| {
            opened = true;
            let (client_side, rule) = orient(key, s, host, s.first_seen_ns > started_ns);
            Conn {
                owner,
                client_side,
                rule,
                first_seen_ns: s.first_seen_ns,
                last_seen_ns: s.last_seen_ns,
                syn_ns: 0,
                synack_ns: 0,
                flags: 0,
            }
        });
        c.owner = owner;
        // A handshake seen later (the tuple reused by a new connection)
        // decides the direction.
        if s.open_side != 0 && !matches!(c.rule, Orientation::Syn | Orientation::IcmpEcho) {
            let (side, rule) = orient(key, s, host, true);
            c.client_side = side;
            c.rule = rule;
        }
        // A SYN after a completed handshake starts a new one (tuple reuse).
        if s.syn_ns != 0 && (c.syn_ns == 0 || (c.synack_ns != 0 && s.syn_ns > c.synack_ns)) {
            c.syn_ns = s.syn_ns;
            c.synack_ns = 0;
        }
        if s.synack_ns != 0 && c.synack_ns == 0 && s.synack_ns >= c.syn_ns {
            c.synack_ns = s.synack_ns;
        }
        c.first_seen_ns = c.first_seen_ns.min(s.first_seen_ns);
        c.last_seen_ns = c.last_seen_ns.max(s.last_seen_ns);
        c.flags |= s.tcp_flags[0] | s.tcp_flags[1];
        (c.clone(), opened)
    }

    fn expire(&mut self, now: u64) {
        let idle = self.idle.as_nanos() as u64;
        let closed_idle = idle / 4;
        self.conns.retain(|_, c| {
            let quiet = now.saturating_sub(c.last_seen_ns);
            quiet
                < if c.flags & (TCP_FIN | TCP_RST) != 0 {
                    closed_idle
                } else {
                    idle
                }
        });
        if self.conns.len() > self.cap {
            let mut by_age: Vec<(u64, ConnKey)> = self
                .conns
                .iter()
                .map(|(k, c)| (c.last_seen_ns, *k))
                .collect();
            by_age.sort_unstable();
            let excess = self.conns.len() - self.cap;
            for (_, k) in by_age.into_iter().take(excess) {
                self.conns.remove(&k);
                self.evicted += 1;
            }
        }
    }
}

/// The interface a connection is counted on: the one that first saw it,
/// as long as it keeps reporting it; when it no longer does (a pod's veth
/// went away, a route changed) the earliest of the others.
fn owner_of(prev: Option<u32>, g: &[(u32, Sample)]) -> u32 {
    if let Some(o) = prev.filter(|o| g.iter().any(|(i, _)| i == o)) {
        return o;
    }
    g.iter()
        .min_by_key(|(i, s)| (s.first_seen_ns, *i))
        .map(|(i, _)| *i)
        .unwrap_or(0)
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
/// `saw_start`: the flow began while the agent was running.
pub fn orient(key: &ConnKey, s: &Sample, host: &HostView, saw_start: bool) -> (usize, Orientation) {
    let first = (s.first_side.saturating_sub(1).min(1)) as usize;
    if s.open_side != 0 {
        let rule = if key.proto == 6 {
            Orientation::Syn
        } else {
            Orientation::IcmpEcho
        };
        return (((s.open_side - 1) as usize).min(1), rule);
    }
    if !has_ports(key.proto) {
        return (first, Orientation::FirstSeen);
    }
    if key.proto != 6 && saw_start {
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

fn record(
    key: &ConnKey,
    s: &Sample,
    c: &Conn,
    opened: bool,
    also: Vec<String>,
    cx: &Context,
) -> FlowRecord {
    let cs = c.client_side;
    let ss = 1 - cs;
    let rtt = if c.syn_ns != 0 && c.synack_ns >= c.syn_ns {
        Some((c.synack_ns - c.syn_ns) as f64 / 1000.0)
    } else {
        None
    };
    let flags_now = s.tcp_flags[0] | s.tcp_flags[1];
    FlowRecord {
        interface: (cx.name)(c.owner),
        ifindex: c.owner,
        also_seen_on: also,
        protocol: protocol_name(key.proto),
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
        first_seen: cx.clock.wall(c.first_seen_ns),
        last_seen: cx.clock.wall(c.last_seen_ns),
        handshake_rtt_us: rtt,
        orientation: c.rule,
        opened,
        reset: key.proto == 6 && flags_now & TCP_RST != 0,
        handshake_this_interval: if s.synack_ns != 0 { rtt } else { None },
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

    fn key_on(ifindex: u32, proto: u8, p0: u16, p1: u16) -> RawKey {
        RawKey {
            addr: [v4([10, 0, 0, 1]), v4([10, 0, 0, 2])],
            ifindex,
            port: [p0, p1],
            proto,
            family: 4,
            pad: [0; 2],
        }
    }

    fn key(proto: u8, p0: u16, p1: u16) -> RawKey {
        key_on(7, proto, p0, p1)
    }

    fn names(i: u32) -> Arc<str> {
        format!("if{i}").into()
    }

    fn ingest(
        t: &mut FlowTable,
        host: &HostView,
        now: u64,
        e: &[(RawKey, Sample)],
    ) -> Vec<FlowRecord> {
        let cx = Context {
            now_mono_ns: now,
            clock: Clock::fixed(1_700_000_000_000_000_000),
            host,
            name: &names,
        };
        t.ingest(e, &cx)
    }

    #[test]
    fn syn_decides_even_against_ports() {
        // Side 1 (port 40000) sent the SYN: it is the client.
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
        };
        let mut t = FlowTable::new(10, Duration::from_secs(60), 0);
        let recs = ingest(
            &mut t,
            &HostView::default(),
            10_000,
            &[(key(6, 80, 40000), s)],
        );
        assert_eq!(recs.len(), 1);
        assert_eq!(
            serde_json::to_string(&recs[0]).unwrap(),
            "{\"interface\":\"if7\",\"ifindex\":7,\"protocol\":\"tcp\",\"src_ip\":\"10.0.0.2\",\"src_port\":40000,\
             \"dst_ip\":\"10.0.0.1\",\"dst_port\":80,\"src_to_dst\":{\"packets\":4,\"bytes\":400},\
             \"dst_to_src\":{\"packets\":3,\"bytes\":300},\"tcp_flags\":[\"SYN\",\"ACK\"],\
             \"first_seen\":\"2023-11-14T22:13:20.000001Z\",\"last_seen\":\"2023-11-14T22:13:20.000009Z\",\
             \"handshake_rtt_us\":0.5,\"orientation\":\"syn\",\"opened\":true,\"reset\":false}"
        );
        assert_eq!(recs[0].handshake_this_interval, Some(0.5));
    }

    #[test]
    fn handshake_split_over_two_drains_keeps_rtt_and_direction() {
        let mut t = FlowTable::new(10, Duration::from_secs(60), 0);
        let h = HostView::default();
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
        let r = ingest(&mut t, &h, 200, &[(key(6, 40000, 80), a)]);
        assert!(r[0].opened);
        assert_eq!(r[0].handshake_rtt_us, None);
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
        let r = ingest(&mut t, &h, 1000, &[(key(6, 40000, 80), b)]);
        assert_eq!(r[0].src_port, 40000);
        assert!(!r[0].opened);
        assert_eq!(r[0].orientation, Orientation::Syn);
        assert_eq!(r[0].handshake_rtt_us, Some(0.25));
        assert_eq!(r[0].handshake_this_interval, Some(0.25));
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
    fn orientation_rules_in_order() {
        let mut h = HostView {
            addrs: vec!["10.0.0.2".parse().unwrap()],
            ..Default::default()
        };
        h.listeners.insert((6, None, 50000));
        h.listeners.insert((17, None, 40000));
        // started at 1000 ns: first_seen 5 is before → start not seen.
        let mut t = FlowTable::new(10, Duration::from_secs(60), 1_000);
        let old = Sample {
            packets: [1, 1],
            bytes: [60, 60],
            first_seen_ns: 5,
            last_seen_ns: 5,
            first_side: 1,
            ..Default::default()
        };
        let new = Sample {
            first_seen_ns: 2_000,
            last_seen_ns: 2_000,
            ..old
        };
        let r = ingest(
            &mut t,
            &h,
            3_000,
            &[
                // TCP, no SYN, 10.0.0.2:50000 listens: it is the server.
                (key(6, 443, 50000), old),
                // TCP, no SYN, nothing listens: the lower port is the server.
                (key(6, 50001, 8443), old),
                // UDP that started while running: the first sender is the client.
                (key(17, 5353, 40000), new),
                // Equal ports, nothing else: first seen.
                (key(17, 7000, 7000), old),
                // GRE: no ports.
                (key(47, 0, 0), old),
            ],
        );
        let got: Vec<(u16, u16, Orientation)> = r
            .iter()
            .map(|r| (r.src_port, r.dst_port, r.orientation))
            .collect();
        assert_eq!(
            got,
            vec![
                (443, 50000, Orientation::ListenSocket),
                (50001, 8443, Orientation::Port),
                (5353, 40000, Orientation::FirstPacket),
                (7000, 7000, Orientation::FirstSeen),
                (0, 0, Orientation::FirstSeen),
            ]
        );
        // The same UDP flow already open at start: 10.0.0.2:40000 is bound.
        let mut t = FlowTable::new(10, Duration::from_secs(60), 1_000);
        let r = ingest(&mut t, &h, 3_000, &[(key(17, 5353, 40000), old)]);
        assert_eq!(
            (r[0].src_port, r[0].orientation),
            (5353, Orientation::ListenSocket)
        );
    }

    #[test]
    fn a_connection_on_two_interfaces_is_counted_once() {
        let mut t = FlowTable::new(10, Duration::from_secs(60), 0);
        let h = HostView::default();
        let on_veth = Sample {
            packets: [10, 8],
            bytes: [1000, 800],
            first_seen_ns: 100,
            last_seen_ns: 500,
            first_side: 1,
            ..Default::default()
        };
        let on_eth0 = Sample {
            first_seen_ns: 101,
            ..on_veth
        };
        let r = ingest(
            &mut t,
            &h,
            600,
            &[
                (key_on(3, 17, 1, 2), on_eth0),
                (key_on(9, 17, 1, 2), on_veth),
            ],
        );
        assert_eq!(r.len(), 1);
        assert_eq!(
            (&*r[0].interface, r[0].also_seen_on.clone()),
            ("if9", vec!["if3".to_string()])
        );
        assert_eq!(
            r[0].src_to_dst,
            Counters {
                packets: 10,
                bytes: 1000
            }
        );
        // Next interval the owner keeps it even if the other saw it first.
        let later = Sample {
            first_seen_ns: 700,
            last_seen_ns: 800,
            ..on_veth
        };
        let r = ingest(
            &mut t,
            &h,
            900,
            &[
                (
                    key_on(3, 17, 1, 2),
                    Sample {
                        first_seen_ns: 650,
                        ..later
                    },
                ),
                (key_on(9, 17, 1, 2), later),
            ],
        );
        assert_eq!(&*r[0].interface, "if9");
        // The owner is gone: the other interface takes over.
        let r = ingest(&mut t, &h, 1000, &[(key_on(3, 17, 1, 2), later)]);
        assert_eq!((&*r[0].interface, r[0].also_seen_on.len()), ("if3", 0));
    }

    #[test]
    fn table_is_bounded_and_idle_connections_expire() {
        let h = HostView::default();
        let mut t = FlowTable::new(2, Duration::from_secs(60), 0);
        let s = Sample {
            packets: [2, 0],
            bytes: [200, 0],
            first_seen_ns: 5,
            last_seen_ns: 5,
            first_side: 1,
            ..Default::default()
        };
        ingest(
            &mut t,
            &h,
            10,
            &[(key(17, 3, 4), s), (key(17, 5, 6), s), (key(17, 7, 8), s)],
        );
        assert_eq!((t.len(), t.evicted), (2, 1));
        let mut t = FlowTable::new(10, Duration::from_secs(1), 0);
        let s = Sample {
            packets: [1, 0],
            bytes: [60, 0],
            first_side: 1,
            ..Default::default()
        };
        ingest(&mut t, &h, 500_000_000, &[(key(17, 1, 2), s)]);
        assert_eq!(t.len(), 1);
        ingest(&mut t, &h, 1_000_000_001, &[]);
        assert_eq!(t.len(), 0);
    }
}
