//! The flow table: connections across intervals, merged from each drain,
//! counted once across interfaces, bounded in entries and idle time.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::datapath::clock::Clock;
use crate::enrich::host::HostView;

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
    attempt: Attempt,
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
    /// TCP connections whose SYN waits for its SYN/ACK (a subset of conns).
    pending: HashSet<ConnKey, foldhash::fast::RandomState>,
    /// Segments sent again per connection (side 0/1) in the drain period,
    /// from the socket tracepoints; taken by the next `ingest`.
    retransmits: HashMap<ConnKey, [u64; 2], foldhash::fast::RandomState>,
    /// Packets dropped per connection and reason in the drain period (the
    /// skb:kfree_skb tracepoint); taken by the next `ingest`.
    drops: HashMap<ConnKey, std::collections::BTreeMap<Arc<str>, u64>, foldhash::fast::RandomState>,
    /// Smoothed RTT samples (µs, side 0/1) of the drain period.
    srtt: HashMap<ConnKey, [u32; 2], foldhash::fast::RandomState>,
}

impl FlowTable {
    pub fn new(cap: usize, idle: Duration, started_ns: u64) -> FlowTable {
        FlowTable {
            conns: HashMap::default(),
            cap: cap.max(1),
            idle,
            started_ns,
            evicted: 0,
            pending: HashSet::default(),
            retransmits: HashMap::default(),
            drops: HashMap::default(),
            srtt: HashMap::default(),
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

    /// The retransmitted segments of the drain period (per connection,
    /// side 0/1), for the next `ingest`. Connections it does not report
    /// (their packets were not seen on an attached interface) are dropped.
    pub fn set_retransmits(&mut self, r: impl IntoIterator<Item = (ConnKey, [u64; 2])>) {
        self.retransmits.clear();
        for (k, v) in r {
            let e = self.retransmits.entry(k).or_default();
            e[0] += v[0];
            e[1] += v[1];
        }
    }

    /// The kernel drops of the drain period that parsed to a connection,
    /// for the next `ingest`; like retransmits, those of connections no
    /// attached interface saw are dropped.
    pub fn set_drops(&mut self, d: impl IntoIterator<Item = (ConnKey, Arc<str>, u64)>) {
        self.drops.clear();
        for (k, reason, n) in d {
            *self.drops.entry(k).or_default().entry(reason).or_default() += n;
        }
    }

    /// The smoothed RTT samples of the drain period (see `set_drops`).
    pub fn set_srtt(&mut self, s: impl IntoIterator<Item = (ConnKey, [u32; 2])>) {
        self.srtt.clear();
        for (k, v) in s {
            let e = self.srtt.entry(k).or_default();
            for i in 0..2 {
                if v[i] != 0 {
                    e[i] = v[i];
                }
            }
        }
    }

    /// Merges one drain period's kernel entries and returns one record per
    /// connection. A connection seen on several interfaces is counted on
    /// one of them only (see `owner_of`).
    pub fn ingest(&mut self, entries: &[(FlowKey, Sample)], cx: &Context) -> Vec<FlowRecord> {
        // Group the entries of one connection (several interfaces, map and
        // overflow) by sorting, not by a map of vectors: no allocation per
        // connection (and measured faster than hashing here). Records keep
        // the order of first appearance.
        // Rows are (hash of the connection, interface, entry index),
        // sorted by hash first: 16 bytes each and mostly one integer
        // compare, where sorting by the key itself compared addresses
        // (issue 16's profile). Equal hashes fall back on the key, so a
        // connection's rows stay together even if two keys collide.
        let conn_of = |i: u32| &entries[i as usize].0.conn;
        let hasher = self.conns.hasher();
        let mut rows: Vec<(u64, u32, u32)> = entries
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (hasher.hash_one(k.conn), k.ifindex, i as u32))
            .collect();
        rows.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| conn_of(a.2).cmp(conn_of(b.2)))
                .then(a.1.cmp(&b.1))
                .then(a.2.cmp(&b.2))
        });
        let same =
            |a: &(u64, u32, u32), b: &(u64, u32, u32)| a.0 == b.0 && conn_of(a.2) == conn_of(b.2);
        // Per entry index: the range in rows of the connection whose first
        // entry it is (empty: none). Read in index order it gives the
        // connections in order of first appearance, without sorting them.
        let mut first_of: Vec<(u32, u32)> = vec![(0, 0); entries.len()];
        let mut connections = 0;
        let mut i = 0;
        while i < rows.len() {
            let mut j = i + 1;
            while j < rows.len() && same(&rows[j], &rows[i]) {
                j += 1;
            }
            let first = rows[i..j].iter().map(|r| r.2).min().unwrap_or(0);
            first_of[first as usize] = (i as u32, j as u32);
            connections += 1;
            i = j;
        }
        let groups = first_of
            .iter()
            .enumerate()
            .filter(|(_, (a, b))| b > a)
            .map(|(first, (a, b))| (first as u32, *a as usize, *b as usize));
        let mut out = Vec::with_capacity(connections);
        crate::mem::huge_pages_for(&mut out);
        let mut per_if: Vec<(u32, Sample)> = Vec::new();
        let mut last_name: Option<(u32, Arc<str>)> = None;
        // Room for the connections of this drain, counting those the table
        // already holds as known: reserving `groups` more on top of a
        // full table doubled it (and rehashed every entry) at every
        // interval of long-lived connections (issue 16's profile).
        self.conns
            .reserve(connections.min(self.cap).saturating_sub(self.conns.len()));
        for (first, a, b) in groups {
            // The entry that came first is one of the connection's: read
            // in the drain's order, not through `rows` (in hash order:
            // a cache miss per connection in issue 16's profile).
            let (k, s) = &entries[first as usize];
            let key = k.conn;
            per_if.clear();
            if b - a == 1 {
                per_if.push((k.ifindex, *s));
            } else {
                for (_, ifindex, idx) in &rows[a..b] {
                    let s = &entries[*idx as usize].1;
                    match per_if.last_mut() {
                        Some((i, m)) if i == ifindex => merge(m, s),
                        _ => per_if.push((*ifindex, *s)),
                    }
                }
            }
            // One lookup per connection: the entry gives the previous
            // owner and is then updated or filled.
            let entry = self.conns.entry(key);
            let prev_owner = match &entry {
                Entry::Occupied(o) => Some(o.get().owner),
                Entry::Vacant(_) => None,
            };
            let owner = owner_of(prev_owner, &per_if);
            let Some((_, s)) = per_if.iter().find(|(i, _)| *i == owner).copied() else {
                continue;
            };
            let others: Vec<String> = per_if
                .iter()
                .filter(|(i, _)| *i != owner)
                .map(|(i, _)| (cx.name)(*i).to_string())
                .collect();
            let (conn, opened, mut health) =
                Self::update_conn(entry, &mut self.pending, self.started_ns, owner, &s, cx);
            // Most intervals have none of these: no hashing then.
            let rt = (!self.retransmits.is_empty())
                .then(|| self.retransmits.remove(&key))
                .flatten();
            if let Some(rt) = rt {
                health.retransmits_client_to_server = rt[conn.client_side];
                health.retransmits_server_to_client = rt[1 - conn.client_side];
            }
            // Every record of an interface shares its name: looked up once
            // per run of records on the same interface.
            let name = match &last_name {
                Some((i, n)) if *i == conn.owner => n.clone(),
                _ => {
                    let n = (cx.name)(conn.owner);
                    last_name = Some((conn.owner, n.clone()));
                    n
                }
            };
            let mut r = record(&key, &s, &conn, opened, others, cx, health, name);
            if !self.drops.is_empty() {
                if let Some(d) = self.drops.remove(&key) {
                    r.set_drops(d);
                }
            }
            if !self.srtt.is_empty() {
                if let Some(v) = self.srtt.remove(&key) {
                    r.srtt_us = srtt_of(v, conn.client_side);
                }
            }
            out.push(r);
        }
        self.retransmits.clear();
        self.drops_without_packets(cx, &mut out);
        self.unanswered(cx, &mut out);
        self.expire(cx.now_mono_ns);
        out
    }

    /// Drops and RTT samples of known connections that had no packet
    /// counted this drain period (the packet was counted before the maps
    /// were swapped, its drop after): a record of their own without
    /// packets. Others are let go.
    fn drops_without_packets(&mut self, cx: &Context, out: &mut Vec<FlowRecord>) {
        let mut drops = std::mem::take(&mut self.drops);
        let mut srtt = std::mem::take(&mut self.srtt);
        let keys: Vec<ConnKey> = drops.keys().chain(srtt.keys()).copied().collect();
        for key in keys {
            let d = drops.remove(&key);
            let s = srtt.remove(&key);
            if d.is_none() && s.is_none() {
                continue; // both maps had it: done
            }
            let Some(c) = self.conns.get(&key) else {
                continue;
            };
            let empty = Sample::default();
            let name = (cx.name)(c.owner);
            let mut r = record(
                &key,
                &empty,
                c,
                false,
                Vec::new(),
                cx,
                Health::default(),
                name,
            );
            r.handshake_this_interval = None;
            r.set_drops(d.unwrap_or_default());
            r.srtt_us = s.and_then(|v| srtt_of(v, c.client_side));
            if r.srtt_us.is_some() || !r.drops().is_empty() {
                out.push(r);
            }
        }
    }

    /// Decides the attempts still waiting for a SYN/ACK that had no packet
    /// this interval: past [`UNANSWERED_AFTER`] they are unanswered, in a
    /// record of their own without packets.
    fn unanswered(&mut self, cx: &Context, out: &mut Vec<FlowRecord>) {
        let now = cx.now_mono_ns;
        let conns = &mut self.conns;
        self.pending.retain(|key| {
            let Some(c) = conns.get_mut(key) else {
                return false;
            };
            let h = c.handshake();
            if !is_pending(key.proto, &h, &c.attempt) {
                return false;
            }
            let empty = Sample::default();
            let health = judge(key.proto, &empty, &h, &mut c.attempt, now);
            if health.failure.is_none() {
                return true;
            }
            let mut r = record(
                key,
                &empty,
                c,
                false,
                Vec::new(),
                cx,
                health,
                (cx.name)(c.owner),
            );
            r.handshake_this_interval = None;
            out.push(r);
            false
        });
    }

    /// Updates (or creates: `true`) the connection and judges its health.
    fn update_conn(
        entry: Entry<'_, ConnKey, Conn>,
        pending: &mut HashSet<ConnKey, foldhash::fast::RandomState>,
        started_ns: u64,
        owner: u32,
        s: &Sample,
        cx: &Context,
    ) -> (Conn, bool, Health) {
        let host = cx.host;
        let key = *entry.key();
        let key = &key;
        let mut opened = false;
        let c = entry.or_insert_with(|| {
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
                attempt: Attempt::default(),
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
            if c.syn_ns != 0 {
                c.attempt = Attempt::default();
            }
            c.syn_ns = s.syn_ns;
            c.synack_ns = 0;
        }
        if s.synack_ns != 0 && c.synack_ns == 0 && s.synack_ns >= c.syn_ns {
            c.synack_ns = s.synack_ns;
        }
        c.first_seen_ns = c.first_seen_ns.min(s.first_seen_ns);
        c.last_seen_ns = c.last_seen_ns.max(s.last_seen_ns);
        c.flags |= s.tcp_flags[0] | s.tcp_flags[1];
        let h = c.handshake();
        let health = judge(key.proto, s, &h, &mut c.attempt, cx.now_mono_ns);
        if is_pending(key.proto, &h, &c.attempt) {
            pending.insert(*key);
        }
        (c.clone(), opened, health)
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

impl Conn {
    fn handshake(&self) -> Handshake {
        Handshake {
            client_side: self.client_side,
            syn_ns: self.syn_ns,
            synack_ns: self.synack_ns,
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
    m.syns += s.syns;
    m.unreach += s.unreach;
    if m.unreach_side == 0 {
        m.unreach_side = s.unreach_side;
    }
    m.synack_ns = min_nonzero(m.synack_ns, s.synack_ns);
}

fn min_nonzero(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (x, y) => x.min(y),
    }
}

/// The record of one connection over this interval, counted on the
/// interface named `interface`.
#[allow(clippy::too_many_arguments)]
fn record(
    key: &ConnKey,
    s: &Sample,
    c: &Conn,
    opened: bool,
    also: Vec<String>,
    cx: &Context,
    health: Health,
    interface: Arc<str>,
) -> FlowRecord {
    let cs = c.client_side;
    let ss = 1 - cs;
    let rtt = if c.syn_ns != 0 && c.synack_ns >= c.syn_ns {
        Some((c.synack_ns - c.syn_ns) as f64 / 1000.0)
    } else {
        None
    };
    let flags_now = s.tcp_flags[0] | s.tcp_flags[1];
    let mut r = FlowRecord {
        interface,
        ifindex: c.owner,
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
        tcp_flags: if key.proto == proto::TCP {
            TcpFlags(c.flags as u8)
        } else {
            TcpFlags::default()
        },
        first_seen: cx.clock.wall(c.first_seen_ns),
        last_seen: cx.clock.wall(c.last_seen_ns),
        handshake_rtt_us: rtt,
        orientation: c.rule,
        opened,
        reset: key.proto == proto::TCP && flags_now & TCP_RST != 0,
        handshake_this_interval: if s.synack_ns != 0 { rtt } else { None },
        health,
        srtt_us: None,
        src_process: None,
        dst_process: None,
        rare: None,
    };
    r.set_also_seen_on(also);
    r
}

/// The client socket's smoothed RTT when it has one, else the server's.
fn srtt_of(v: [u32; 2], client_side: usize) -> Option<u32> {
    [v[client_side], v[1 - client_side]]
        .into_iter()
        .find(|us| *us != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4]) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::from(a)
    }

    fn key_on(ifindex: u32, proto: u8, p0: u16, p1: u16) -> FlowKey {
        FlowKey {
            ifindex,
            conn: ConnKey {
                proto,
                addr: [v4([10, 0, 0, 1]).into(), v4([10, 0, 0, 2]).into()],
                port: [p0, p1],
            },
        }
    }

    fn key(proto: u8, p0: u16, p1: u16) -> FlowKey {
        key_on(7, proto, p0, p1)
    }

    fn names(i: u32) -> Arc<str> {
        format!("if{i}").into()
    }

    fn ingest(
        t: &mut FlowTable,
        host: &HostView,
        now: u64,
        e: &[(FlowKey, Sample)],
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
            syns: 1,
            ..Default::default()
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
             \"handshake_rtt_us\":0.5,\"orientation\":\"syn\",\"opened\":true,\"reset\":false,\
             \"failure\":null,\"syn_retransmits\":0,\"resets_client\":0,\"resets_server\":0,\
             \"retransmits_client_to_server\":0,\"retransmits_server_to_client\":0}"
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
        assert_eq!(r[0].tcp_flags.names().collect::<Vec<_>>(), ["SYN", "ACK"]);
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
            (&*r[0].interface, r[0].also_seen_on().to_vec()),
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
        assert_eq!((&*r[0].interface, r[0].also_seen_on().len()), ("if3", 0));
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
