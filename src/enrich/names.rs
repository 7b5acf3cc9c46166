//! Names of external peers (issue 14), from what the node itself saw: the
//! DNS answers its clients received (client, answer address → the name the
//! client asked for, CNAME chains followed) and the TLS server names (SNI)
//! of their ClientHellos, reassembled when split across segments, and the
//! Host header of plain HTTP requests (used when neither gave a name), and
//! the server names of QUIC connections from their clients' Initial packets
//! (enrich/quic.rs). Every
//! table is bounded in entries, bytes and age. Only extracted names are
//! kept; the captured bytes are dropped once parsed.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::quic;
use crate::datapath::names::{Captured, CapturedKind};
use crate::flow::{proto, EndNames, FlowRecord};

/// A DNS name stays usable this long past its record's TTL (clients and
/// their libraries keep answers longer than the TTL says).
pub const DNS_GRACE: Duration = Duration::from_secs(300);
/// TTLs above this are taken as this.
const DNS_TTL_MAX: Duration = Duration::from_secs(86_400);
/// (client, address) → name entries, and the bytes of their names.
const DNS_MAX_ENTRIES: usize = 65_536;
const DNS_MAX_BYTES: usize = 4 << 20;
/// Connections that got a name, forgotten when not seen for this long.
const CONN_MAX: usize = 131_072;
const CONN_IDLE: Duration = Duration::from_secs(600);
/// ClientHellos being reassembled: how many, how large, how long.
const HELLO_MAX: usize = 1024;
const HELLO_MAX_BYTES: usize = 16 * 1024;
const HELLO_AGE: Duration = Duration::from_secs(10);
/// Longest DNS name (RFC 1035).
const NAME_MAX: usize = 253;

/// What the resolver did, for /metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NameCounts {
    pub dns_answers: u64,
    pub dns_unparsed: u64,
    pub tls_names: u64,
    pub tls_unparsed: u64,
    pub http_hosts: u64,
    pub http_unparsed: u64,
    pub quic_names: u64,
    pub quic_unparsed: u64,
    pub evicted: u64,
}

struct DnsName {
    name: Arc<str>,
    expires: Instant,
    generation: u64,
}

/// A connection: protocol, client address and port, server address and port.
type Conn = (u8, IpAddr, u16, IpAddr, u16);

struct ConnNames {
    dst: EndNames,
    src: EndNames,
    seen: Instant,
}

struct Hello {
    base_seq: u32,
    total: usize,
    buf: Vec<u8>,
    started: Instant,
}

/// The CRYPTO frames of a QUIC connection's Initial packets so far, and
/// the connection ID their keys come from.
struct QuicHello {
    dcid: Vec<u8>,
    chunks: Vec<(u64, Vec<u8>)>,
    bytes: usize,
    started: Instant,
}

/// The name resolver's state, owned by the pipeline.
#[derive(Default)]
pub struct Names {
    dns: HashMap<(IpAddr, IpAddr), DnsName>,
    /// Insertion order of `dns` for eviction (stale generations skipped).
    order: VecDeque<((IpAddr, IpAddr), u64)>,
    dns_bytes: usize,
    generation: u64,
    conns: HashMap<Conn, ConnNames>,
    hellos: HashMap<(IpAddr, u16, IpAddr, u16), Hello>,
    quics: HashMap<(IpAddr, u16, IpAddr, u16), QuicHello>,
    pub counts: NameCounts,
}

/// A name as it goes on the map: lower case, no trailing dot, only the
/// characters of host names; None for anything else.
pub fn clean_name(raw: &str) -> Option<Arc<str>> {
    let n = raw.trim_end_matches('.').to_ascii_lowercase();
    let ok = !n.is_empty()
        && n.len() <= NAME_MAX
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    ok.then(|| n.into())
}

impl Names {
    /// Learns from the packets captured since the last drain.
    pub fn learn(&mut self, captured: &[Captured], now: Instant) {
        for c in captured {
            match c.kind {
                CapturedKind::DnsUdp => self.dns_message(&c.bytes, c.receiver.0, now),
                CapturedKind::DnsTcp if c.bytes.len() > 2 => {
                    self.dns_message(&c.bytes[2..], c.receiver.0, now)
                }
                CapturedKind::DnsTcp => {}
                CapturedKind::Tls => self.hello_segment(c, now),
                CapturedKind::Http => self.http_request(c, now),
                CapturedKind::Quic => self.quic_initial(c, now),
            }
        }
    }

    /// Names the ends of this interval's records, and forgets what is past
    /// its age.
    pub fn label(&mut self, records: &mut [FlowRecord], now: Instant) {
        for r in records.iter_mut() {
            let key: Conn = (
                proto_number(&r.protocol),
                r.src_ip,
                r.src_port,
                r.dst_ip,
                r.dst_port,
            );
            let dst_dns = self.dns_name(r.src_ip, r.dst_ip, now);
            let src_dns = self.dns_name(r.dst_ip, r.src_ip, now);
            let known = self.conns.contains_key(&key);
            if !known && (dst_dns.is_none() && src_dns.is_none() || self.conns.len() >= CONN_MAX) {
                continue;
            }
            let c = self.conns.entry(key).or_insert_with(|| ConnNames {
                dst: EndNames::default(),
                src: EndNames::default(),
                seen: now,
            });
            // The name a connection got when it began stays its name.
            c.dst.dns = c.dst.dns.take().or(dst_dns);
            c.src.dns = c.src.dns.take().or(src_dns);
            c.seen = now;
            r.set_names(c.dst.clone(), c.src.clone());
        }
        self.expire(now);
    }

    /// The name `client` most recently resolved `addr` by, if still valid.
    fn dns_name(&self, client: IpAddr, addr: IpAddr, now: Instant) -> Option<Arc<str>> {
        self.dns
            .get(&(client, addr))
            .filter(|d| d.expires > now)
            .map(|d| d.name.clone())
    }

    /// One DNS response received by `client`: every address its answer
    /// section gives for the question's name (through CNAMEs) is named by
    /// that name for that client.
    fn dns_message(&mut self, bytes: &[u8], client: IpAddr, now: Instant) {
        let Some((name, ttl, addrs)) = parse_dns_answer(bytes) else {
            self.counts.dns_unparsed += 1;
            return;
        };
        self.counts.dns_answers += 1;
        let expires = now + ttl.min(DNS_TTL_MAX) + DNS_GRACE;
        for addr in addrs {
            self.insert_dns((client, addr), name.clone(), expires);
        }
    }

    fn insert_dns(&mut self, key: (IpAddr, IpAddr), name: Arc<str>, expires: Instant) {
        self.generation += 1;
        let generation = self.generation;
        self.dns_bytes += name.len();
        if let Some(old) = self.dns.insert(
            key,
            DnsName {
                name,
                expires,
                generation,
            },
        ) {
            self.dns_bytes -= old.name.len();
        }
        self.order.push_back((key, generation));
        while self.dns.len() > DNS_MAX_ENTRIES || self.dns_bytes > DNS_MAX_BYTES {
            let Some((k, g)) = self.order.pop_front() else {
                break;
            };
            if self.dns.get(&k).is_some_and(|d| d.generation == g) {
                if let Some(d) = self.dns.remove(&k) {
                    self.dns_bytes -= d.name.len();
                }
                self.counts.evicted += 1;
            }
        }
        if self.order.len() > 2 * DNS_MAX_ENTRIES {
            let dns = &self.dns;
            self.order
                .retain(|(k, g)| dns.get(k).is_some_and(|d| d.generation == *g));
        }
    }

    /// A segment of a ClientHello: the first starts a reassembly (unless it
    /// holds the whole hello), later ones are appended in sequence order.
    fn hello_segment(&mut self, c: &Captured, now: Instant) {
        let key = (c.sender.0, c.sender.1, c.receiver.0, c.receiver.1);
        if let Some(h) = self.hellos.get_mut(&key) {
            if c.seq == h.base_seq.wrapping_add(h.buf.len() as u32) {
                let room = HELLO_MAX_BYTES.saturating_sub(h.buf.len());
                h.buf.extend_from_slice(&c.bytes[..c.bytes.len().min(room)]);
                if h.buf.len() >= h.total || h.buf.len() >= HELLO_MAX_BYTES {
                    if let Some(h) = self.hellos.remove(&key) {
                        self.hello_done(key, &h.buf, now);
                    }
                }
                return;
            }
        }
        let b = &c.bytes;
        if b.len() < 6 || b[0] != 0x16 || b[5] != 0x01 {
            return;
        }
        let total = ((b[3] as usize) << 8 | b[4] as usize) + 5;
        if b.len() >= total {
            self.hello_done(key, b, now);
            return;
        }
        if self.hellos.len() >= HELLO_MAX {
            self.hellos
                .retain(|_, h| now.duration_since(h.started) < HELLO_AGE);
        }
        if self.hellos.len() >= HELLO_MAX {
            self.counts.evicted += 1;
            return;
        }
        self.hellos.insert(
            key,
            Hello {
                base_seq: c.seq,
                total: total.min(HELLO_MAX_BYTES),
                buf: b[..b.len().min(HELLO_MAX_BYTES)].to_vec(),
                started: now,
            },
        );
    }

    fn hello_done(&mut self, key: (IpAddr, u16, IpAddr, u16), hello: &[u8], now: Instant) {
        let Some(sni) = parse_client_hello_sni(hello) else {
            self.counts.tls_unparsed += 1;
            return;
        };
        self.counts.tls_names += 1;
        if let Some(c) = self.conn_of(proto::TCP, key, now) {
            c.dst.tls = Some(sni);
        }
    }

    /// The head of a plain HTTP request: its Host names the server end.
    fn http_request(&mut self, c: &Captured, now: Instant) {
        let Some(host) = parse_http_host(&c.bytes) else {
            self.counts.http_unparsed += 1;
            return;
        };
        self.counts.http_hosts += 1;
        let key = (c.sender.0, c.sender.1, c.receiver.0, c.receiver.1);
        if let Some(c) = self.conn_of(proto::TCP, key, now) {
            c.dst.http = Some(host);
        }
    }

    /// A client's QUIC Initial datagram: its CRYPTO frames are gathered
    /// (bounded like ClientHellos) until they hold the whole ClientHello,
    /// whose server name names the connection's server end.
    fn quic_initial(&mut self, c: &Captured, now: Instant) {
        let key = (c.sender.0, c.sender.1, c.receiver.0, c.receiver.1);
        let conn: Conn = (proto::UDP, key.0, key.1, key.2, key.3);
        if self.conns.get(&conn).is_some_and(|n| n.dst.tls.is_some()) {
            return; // named already: a retransmission or an ACK
        }
        let Some(dcid) = quic::initial_dcid(&c.bytes) else {
            self.counts.quic_unparsed += 1;
            return;
        };
        // Every Initial of a client is protected with the keys of its
        // first Destination Connection ID.
        let first = match self.quics.get(&key) {
            Some(q) => q.dcid.clone(),
            None => dcid.to_vec(),
        };
        let Some(chunks) =
            quic::InitialKeys::client(&first).and_then(|k| quic::initial_crypto(&c.bytes, &k))
        else {
            self.counts.quic_unparsed += 1;
            return;
        };
        if !self.quics.contains_key(&key) {
            if self.quics.len() >= HELLO_MAX {
                self.quics
                    .retain(|_, q| now.duration_since(q.started) < HELLO_AGE);
            }
            if self.quics.len() >= HELLO_MAX {
                self.counts.evicted += 1;
                return;
            }
        }
        let q = self.quics.entry(key).or_insert_with(|| QuicHello {
            dcid: first,
            chunks: Vec::new(),
            bytes: 0,
            started: now,
        });
        for (off, data) in chunks {
            if q.bytes + data.len() > HELLO_MAX_BYTES || off > HELLO_MAX_BYTES as u64 {
                break;
            }
            q.bytes += data.len();
            q.chunks.push((off, data));
        }
        let hello = quic::contiguous(&q.chunks, HELLO_MAX_BYTES);
        if hello.len() < 4 {
            return;
        }
        let total = 4 + ((hello[1] as usize) << 16 | (hello[2] as usize) << 8 | hello[3] as usize);
        if hello[0] != 1 || total > HELLO_MAX_BYTES {
            self.quics.remove(&key);
            self.counts.quic_unparsed += 1;
            return;
        }
        if hello.len() < total {
            return; // more Initials to come
        }
        self.quics.remove(&key);
        let Some(sni) = handshake_sni(&hello[..total]) else {
            self.counts.quic_unparsed += 1;
            return;
        };
        self.counts.quic_names += 1;
        if let Some(c) = self.conn_of(proto::UDP, key, now) {
            c.dst.tls = Some(sni);
        }
    }

    /// The names of the connection `key` (client first) of protocol
    /// `proto`, made when there is room.
    fn conn_of(
        &mut self,
        proto: u8,
        key: (IpAddr, u16, IpAddr, u16),
        now: Instant,
    ) -> Option<&mut ConnNames> {
        let conn: Conn = (proto, key.0, key.1, key.2, key.3);

        if self.conns.len() >= CONN_MAX && !self.conns.contains_key(&conn) {
            self.counts.evicted += 1;
            return None;
        }
        let c = self.conns.entry(conn).or_insert_with(|| ConnNames {
            dst: EndNames::default(),
            src: EndNames::default(),
            seen: now,
        });
        c.seen = now;
        Some(c)
    }

    fn expire(&mut self, now: Instant) {
        self.conns
            .retain(|_, c| now.duration_since(c.seen) < CONN_IDLE);
        self.hellos
            .retain(|_, h| now.duration_since(h.started) < HELLO_AGE);
        self.quics
            .retain(|_, q| now.duration_since(q.started) < HELLO_AGE);
        let before = self.dns.len();
        self.dns.retain(|_, d| d.expires > now);
        if self.dns.len() != before {
            self.dns_bytes = self.dns.values().map(|d| d.name.len()).sum();
            let dns = &self.dns;
            self.order
                .retain(|(k, g)| dns.get(k).is_some_and(|d| d.generation == *g));
        }
    }

    /// Entries of the DNS table and the bytes of their names.
    pub fn dns_size(&self) -> (usize, usize) {
        (self.dns.len(), self.dns_bytes)
    }
}

fn proto_number(name: &str) -> u8 {
    match name {
        "tcp" => proto::TCP,
        "udp" => proto::UDP,
        other => other.parse().unwrap_or(0),
    }
}

/// A DNS response's question name, the smallest TTL along its answer
/// chain, and the addresses (A, AAAA) the chain ends at.
pub fn parse_dns_answer(bytes: &[u8]) -> Option<(Arc<str>, Duration, Vec<IpAddr>)> {
    use simple_dns::rdata::RData;
    let p = simple_dns::Packet::parse(bytes).ok()?;
    if !p.has_flags(simple_dns::PacketFlag::RESPONSE) || p.rcode() != simple_dns::RCODE::NoError {
        return None;
    }
    let q = p.questions.first()?;
    let asked = clean_name(&q.qname.to_string())?;
    // Follow the CNAME chain from the question's name (bounded by the
    // answer count: each step adds a name or stops).
    let mut chain: Vec<Arc<str>> = vec![asked.clone()];
    let mut ttl = u32::MAX;
    for _ in 0..p.answers.len() {
        let last = chain.last().cloned()?;
        let next = p.answers.iter().find_map(|rr| match &rr.rdata {
            RData::CNAME(c) if clean_name(&rr.name.to_string()).as_ref() == Some(&last) => {
                Some((clean_name(&c.0.to_string())?, rr.ttl))
            }
            _ => None,
        });
        match next {
            Some((n, t)) if !chain.contains(&n) => {
                ttl = ttl.min(t);
                chain.push(n);
            }
            _ => break,
        }
    }
    let mut addrs = Vec::new();
    for rr in &p.answers {
        let owner = clean_name(&rr.name.to_string());
        if !owner.is_some_and(|o| chain.contains(&o)) {
            continue;
        }
        let addr = match &rr.rdata {
            RData::A(a) => IpAddr::from(std::net::Ipv4Addr::from(a.address)),
            RData::AAAA(a) => IpAddr::from(std::net::Ipv6Addr::from(a.address)),
            _ => continue,
        };
        ttl = ttl.min(rr.ttl);
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    (!addrs.is_empty()).then(|| (asked, Duration::from_secs(ttl as u64), addrs))
}

/// The host name of a TLS ClientHello's server_name extension, from a
/// TLS record.
pub fn parse_client_hello_sni(bytes: &[u8]) -> Option<Arc<str>> {
    let (_, rec) = tls_parser::parse_tls_plaintext(bytes).ok()?;
    rec.msg.iter().find_map(message_sni)
}

/// The same from a bare handshake message (QUIC's CRYPTO frames carry
/// handshake messages without TLS records).
pub fn handshake_sni(bytes: &[u8]) -> Option<Arc<str>> {
    let (_, m) = tls_parser::parse_tls_message_handshake(bytes).ok()?;
    message_sni(&m)
}

fn message_sni(m: &tls_parser::TlsMessage) -> Option<Arc<str>> {
    use tls_parser::{
        parse_tls_extensions, SNIType, TlsExtension, TlsMessage, TlsMessageHandshake,
    };
    match m {
        TlsMessage::Handshake(TlsMessageHandshake::ClientHello(ch)) => {
            let (_, exts) = parse_tls_extensions(ch.ext?).ok()?;
            exts.iter().find_map(|e| match e {
                TlsExtension::SNI(names) => names
                    .iter()
                    .find(|(t, _)| *t == SNIType::HostName)
                    .and_then(|(_, n)| clean_name(std::str::from_utf8(n).ok()?)),
                _ => None,
            })
        }
        _ => None,
    }
}

/// The host of an HTTP/1 request's Host header, without its port; None
/// when the head has no Host, or the Host is an address. The capture may
/// end inside the head: what is cut off is left out.
pub fn parse_http_host(bytes: &[u8]) -> Option<Arc<str>> {
    fn host_of(bytes: &[u8]) -> Option<Option<Arc<str>>> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(bytes) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return None,
            Err(_) => return Some(None),
        }
        let host = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("host"))?;
        let v = std::str::from_utf8(host.value).ok()?.trim();
        if v.starts_with('[') {
            return Some(None); // an IPv6 address
        }
        let name = match v.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => v,
        };
        if name.parse::<IpAddr>().is_ok() {
            return Some(None);
        }
        Some(clean_name(name))
    }
    if let Some(found) = host_of(bytes) {
        return found;
    }
    // Cut off inside the head: the lines that arrived whole, then the
    // empty line that ends a head.
    let end = bytes.windows(2).rposition(|w| w == b"\r\n")? + 2;
    let mut head = bytes[..end].to_vec();
    head.extend_from_slice(b"\r\n");
    host_of(&head).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use simple_dns::rdata::{RData, A, CNAME};
    use simple_dns::{Name, Packet, Question, ResourceRecord, CLASS, QCLASS, QTYPE, TYPE};

    fn answer(asked: &str, chain: &[&str], addrs: &[[u8; 4]], ttl: u32) -> Vec<u8> {
        let mut p = Packet::new_reply(7);
        p.questions.push(Question::new(
            Name::new_unchecked(asked),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        let mut owner = asked;
        for c in chain {
            let rd = RData::CNAME(CNAME(Name::new_unchecked(c)));
            p.answers.push(ResourceRecord::new(
                Name::new_unchecked(owner),
                CLASS::IN,
                600,
                rd,
            ));
            owner = c;
        }
        for a in addrs {
            let rd = RData::A(A {
                address: u32::from_be_bytes(*a),
            });
            p.answers.push(ResourceRecord::new(
                Name::new_unchecked(owner),
                CLASS::IN,
                ttl,
                rd,
            ));
        }
        p.build_bytes_vec().unwrap()
    }

    fn cap(kind: CapturedKind, from: (&str, u16), to: (&str, u16), seq: u32, b: &[u8]) -> Captured {
        Captured {
            kind,
            sender: (from.0.parse().unwrap(), from.1),
            receiver: (to.0.parse().unwrap(), to.1),
            seq,
            bytes: b.to_vec(),
        }
    }

    fn record(src: &str, dst: &str) -> FlowRecord {
        crate::flow::FlowRecord {
            interface: "eth0".into(),
            ifindex: 2,
            protocol: "tcp".into(),
            src_ip: src.parse().unwrap(),
            src_port: 40000,
            dst_ip: dst.parse().unwrap(),
            dst_port: 443,
            src_to_dst: Default::default(),
            dst_to_src: Default::default(),
            tcp_flags: Default::default(),
            first_seen: std::time::UNIX_EPOCH,
            last_seen: std::time::UNIX_EPOCH,
            handshake_rtt_us: None,
            orientation: crate::flow::Orientation::Syn,
            opened: true,
            reset: false,
            handshake_this_interval: None,
            srtt_us: None,
            src_process: None,
            dst_process: None,
            rare: None,
            health: Default::default(),
        }
    }

    #[test]
    fn a_cname_chain_names_every_address_by_the_asked_name_with_the_smallest_ttl() {
        let b = answer(
            "WWW.Example.com",
            &["edge.cdn.net", "origin.cdn.net"],
            &[[192, 0, 2, 1], [192, 0, 2, 2]],
            30,
        );
        let (name, ttl, addrs) = parse_dns_answer(&b).unwrap();
        assert_eq!(&*name, "www.example.com");
        assert_eq!(ttl, Duration::from_secs(30));
        assert_eq!(
            addrs,
            [
                "192.0.2.1".parse::<IpAddr>().unwrap(),
                "192.0.2.2".parse().unwrap()
            ]
        );
        // A query is no answer.
        let mut q = Packet::new_query(1);
        q.questions.push(Question::new(
            Name::new_unchecked("a.b"),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        assert!(parse_dns_answer(&q.build_bytes_vec().unwrap()).is_none());
    }

    #[test]
    fn only_the_client_that_asked_gets_the_name_and_the_latest_name_wins() {
        let mut n = Names::default();
        let t0 = Instant::now();
        let dns = |name: &str| {
            cap(
                CapturedKind::DnsUdp,
                ("10.0.0.53", 53),
                ("10.0.0.2", 5353),
                0,
                &answer(name, &[], &[[192, 0, 2, 1]], 60),
            )
        };
        n.learn(&[dns("old.example"), dns("new.example")], t0);
        let mut rs = vec![
            record("10.0.0.2", "192.0.2.1"),
            record("10.0.0.3", "192.0.2.1"),
        ];
        n.label(&mut rs, t0);
        assert_eq!(rs[0].dst_names().dns.as_deref(), Some("new.example"));
        assert!(
            rs[1].dst_names().is_empty(),
            "another client's lookup names nothing"
        );
        // Past TTL + grace a new connection gets no name; the one named
        // keeps its name while it lives.
        let later = t0 + Duration::from_secs(60) + DNS_GRACE + Duration::from_secs(1);
        let mut fresh = vec![record("10.0.0.2", "192.0.2.1")];
        fresh[0].src_port = 40001;
        n.label(&mut fresh, later);
        assert!(fresh[0].dst_names().is_empty());
        assert_eq!(n.dns_size(), (0, 0));
    }

    #[test]
    fn the_dns_table_is_bounded_in_entries() {
        let mut n = Names::default();
        let t0 = Instant::now();
        let client: IpAddr = "10.0.0.2".parse().unwrap();
        for i in 0..(DNS_MAX_ENTRIES as u32 + 10) {
            n.insert_dns(
                (client, IpAddr::from(std::net::Ipv4Addr::from(i))),
                "x.example".into(),
                t0 + DNS_GRACE,
            );
        }
        assert_eq!(n.dns_size(), (DNS_MAX_ENTRIES, DNS_MAX_ENTRIES * 9));
        assert_eq!(n.counts.evicted, 10);
        // The oldest went first.
        assert!(n
            .dns_name(client, IpAddr::from(std::net::Ipv4Addr::from(0)), t0)
            .is_none());
        assert!(n
            .dns_name(client, IpAddr::from(std::net::Ipv4Addr::from(10)), t0)
            .is_some());
    }

    /// A ClientHello record with the server_name `sni` and `pad` bytes of
    /// padding extension.
    fn client_hello(sni: &str, pad: usize) -> Vec<u8> {
        let mut ext = Vec::new();
        let name = sni.as_bytes();
        ext.extend([0, 0]);
        ext.extend(((name.len() + 5) as u16).to_be_bytes());
        ext.extend(((name.len() + 3) as u16).to_be_bytes());
        ext.push(0);
        ext.extend((name.len() as u16).to_be_bytes());
        ext.extend(name);
        ext.extend([0, 21]);
        ext.extend((pad as u16).to_be_bytes());
        ext.extend(std::iter::repeat_n(0u8, pad));
        let mut body = vec![3, 3];
        body.extend([0u8; 32]);
        body.push(0);
        body.extend([0, 2, 0x13, 0x01, 1, 0]);
        body.extend((ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut hs = vec![1];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn a_client_hello_split_in_three_is_reassembled_in_order() {
        let h = client_hello("API.Example.com", 3000);
        assert_eq!(
            parse_client_hello_sni(&h).as_deref(),
            Some("api.example.com")
        );
        let mut n = Names::default();
        let t0 = Instant::now();
        let seg = |from: usize, to: usize| {
            cap(
                CapturedKind::Tls,
                ("10.0.0.2", 40000),
                ("192.0.2.9", 443),
                1000 + from as u32,
                &h[from..to],
            )
        };
        // The first segment alone does not parse; out of order is ignored.
        n.learn(&[seg(0, 1400), seg(2800, h.len())], t0);
        let mut rs = vec![record("10.0.0.2", "192.0.2.9")];
        n.label(&mut rs, t0);
        assert!(rs[0].dst_names().is_empty());
        n.learn(&[seg(1400, 2800), seg(2800, h.len())], t0);
        n.label(&mut rs, t0);
        assert_eq!(rs[0].dst_names().tls.as_deref(), Some("api.example.com"));
        assert_eq!((n.counts.tls_names, n.counts.tls_unparsed), (1, 0));
    }

    #[test]
    fn the_host_of_an_http_request_names_its_server_and_nothing_else_is_kept() {
        let req = b"POST /orders HTTP/1.1\r\nAuthorization: Bearer s3cret\r\nHost: Shop.Example.com:8080\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_http_host(req).as_deref(), Some("shop.example.com"));
        // Cut off by the capture after the Host line, and inside it.
        let cut = b"GET / HTTP/1.1\r\nHost: www.example.org\r\nCookie: a=1234567";
        assert_eq!(parse_http_host(cut).as_deref(), Some("www.example.org"));
        assert_eq!(parse_http_host(b"GET / HTTP/1.1\r\nHost: www.exa"), None);
        // Addresses, no Host, not HTTP.
        for b in [
            &b"GET / HTTP/1.1\r\nHost: 192.0.2.7:80\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"GET\x00 / HTTP/1.1\r\nHost: a.b\r\n\r\n",
        ] {
            assert_eq!(parse_http_host(b), None, "{:?}", String::from_utf8_lossy(b));
        }

        let mut n = Names::default();
        let t0 = Instant::now();
        let c = cap(
            CapturedKind::Http,
            ("10.0.0.2", 40000),
            ("192.0.2.9", 443),
            1,
            req,
        );
        n.learn(&[c], t0);
        let mut rs = vec![record("10.0.0.2", "192.0.2.9")];
        n.label(&mut rs, t0);
        let want = EndNames {
            http: Some("shop.example.com".into()),
            ..Default::default()
        };
        assert_eq!(rs[0].dst_names(), &want);
        assert_eq!(
            rs[0].dst_names().name().map(|n| &**n),
            Some("shop.example.com")
        );
        assert_eq!((n.counts.http_hosts, n.counts.http_unparsed), (1, 0));
    }

    #[test]
    fn a_client_hello_in_two_quic_initials_names_the_udp_connection() {
        use crate::enrich::quic::tests::{client_initial, crypto};
        let rec = client_hello("Video.Example.net", 1500);
        let msg = &rec[5..]; // CRYPTO frames carry the bare handshake message
        let dcid = [0x5a; 8];
        let mut first = crypto(0, &msg[..1000]);
        first.extend(crypto(1000, &msg[1000..1100]));
        let second = crypto(1100, &msg[1100..]);
        let quic = |pkt: Vec<u8>| Captured {
            kind: CapturedKind::Quic,
            sender: ("10.0.0.2".parse().unwrap(), 50000),
            receiver: ("192.0.2.9".parse().unwrap(), 443),
            seq: 0,
            bytes: pkt,
        };
        let mut n = Names::default();
        let t0 = Instant::now();
        let mut rs = vec![record("10.0.0.2", "192.0.2.9")];
        rs[0].protocol = "udp".into();
        rs[0].src_port = 50000;
        // The second Initial first: nothing yet.
        n.learn(&[quic(client_initial(&dcid, 1, &second))], t0);
        n.label(&mut rs, t0);
        assert!(rs[0].dst_names().is_empty());
        n.learn(&[quic(client_initial(&dcid, 0, &first))], t0);
        n.label(&mut rs, t0);
        assert_eq!(rs[0].dst_names().tls.as_deref(), Some("video.example.net"));
        assert_eq!((n.counts.quic_names, n.counts.quic_unparsed), (1, 0));
        // The same ports over TCP are another connection.
        let mut tcp = vec![record("10.0.0.2", "192.0.2.9")];
        tcp[0].src_port = 50000;
        n.label(&mut tcp, t0);
        assert!(tcp[0].dst_names().is_empty());
        // Not an Initial (another connection): counted, nothing named.
        let mut other = quic(vec![0x40; 1200]);
        other.sender.1 = 50001;
        n.learn(&[other], t0);
        assert_eq!(n.counts.quic_unparsed, 1);
    }
}
