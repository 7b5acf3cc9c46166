//! Records: one connection over one interval, oriented client → server,
//! as `--output flows` prints it and the graph aggregates it.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use super::*;

/// RFC 3339 with microseconds, UTC: how times appear in JSON output.
pub fn rfc3339_micros<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_micros(*t))
}

/// A time written as [`rfc3339_micros`] (a field of a hand-written
/// serialisation).
pub(crate) struct Micros<'a>(pub &'a SystemTime);

impl Serialize for Micros<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        rfc3339_micros(self.0, s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// The TCP flags a connection has shown so far (the kernel's flag bits:
/// FIN 0x01 … CWR 0x80), written as the list of their names in bit
/// order (`["SYN","ACK"]`); empty for other protocols. A byte rather than
/// a list: no allocation per TCP record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    /// The names of the flags set, in bit order.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        TCP_FLAG_NAMES
            .iter()
            .enumerate()
            .filter(move |(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, n)| *n)
    }
}

impl Serialize for TcpFlags {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.names())
    }
}

/// The fields of a record that most records leave empty, kept out of
/// line so a record stays small (issue 16: 100k records were 42 MB of
/// fresh memory per interval with them inline).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rare {
    /// Other interfaces that saw the same connection this interval; their
    /// packets are not counted again.
    pub also_seen_on: Vec<String>,
    /// Names of the server end and of the client end (issue 14).
    pub dst_names: EndNames,
    pub src_names: EndNames,
    /// Packets of this connection the kernel dropped this interval, by
    /// reason (skb:kfree_skb).
    pub drops: BTreeMap<Arc<str>, u64>,
}

impl Rare {
    fn is_empty(&self) -> bool {
        self.also_seen_on.is_empty()
            && self.dst_names.is_empty()
            && self.src_names.is_empty()
            && self.drops.is_empty()
    }
}

/// One connection over one interval, oriented client (`src`) → server (`dst`).
///
/// Its JSON (hand-written below, in this field order) is: `interface`,
/// `ifindex`, `also_seen_on` (absent when empty), `protocol`, the
/// addresses and ports, the counters, `tcp_flags`, `first_seen`,
/// `last_seen`, `handshake_rtt_us` (absent when none), `orientation`,
/// `opened`, `reset`, the fields of [`Health`], `dst_names` and
/// `src_names` (absent when empty), `drops` (absent when none),
/// `srtt_us`, `src_process` and `dst_process` (absent when none).
#[derive(Debug, Clone, PartialEq)]
pub struct FlowRecord {
    /// The interface that counted it (the first that saw the connection).
    pub interface: Arc<str>,
    pub ifindex: u32,
    pub protocol: Cow<'static, str>,
    pub src_ip: IpAddr,
    pub src_port: u16,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    pub src_to_dst: Counters,
    pub dst_to_src: Counters,
    pub tcp_flags: TcpFlags,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    pub handshake_rtt_us: Option<f64>,
    pub orientation: Orientation,
    /// The connection was first seen in this interval.
    pub opened: bool,
    /// A TCP RST was seen in this interval.
    pub reset: bool,
    /// Handshake time measured in this interval (for interval statistics;
    /// not written).
    pub handshake_this_interval: Option<f64>,
    /// Failure, SYN retransmits and resets (see `health`).
    pub health: Health,
    /// The kernel's smoothed RTT of the connection in µs this interval:
    /// the client socket's sample when the client is on this host and was
    /// sampled (at its first segment received while ESTABLISHED in the
    /// interval, or as it left ESTABLISHED), else the server socket's;
    /// absent when neither was sampled.
    pub srtt_us: Option<u32>,
    /// The processes of the local ends (issue 14): `{pid, comm, unit,
    /// container_id}`; absent for an end on another host or not known.
    pub src_process: Option<Arc<crate::enrich::process::Process>>,
    pub dst_process: Option<Arc<crate::enrich::process::Process>>,
    /// Other interfaces, names and drops: `None` when all are empty (use
    /// the accessors and setters below, which keep it so).
    pub rare: Option<Box<Rare>>,
}

static NO_NAMES: EndNames = EndNames {
    dns: None,
    tls: None,
    http: None,
};

static NO_DROPS: BTreeMap<Arc<str>, u64> = BTreeMap::new();

impl FlowRecord {
    /// Other interfaces that saw the same connection this interval.
    pub fn also_seen_on(&self) -> &[String] {
        self.rare.as_ref().map_or(&[], |r| &r.also_seen_on)
    }

    /// The names of the server end.
    pub fn dst_names(&self) -> &EndNames {
        self.rare.as_ref().map_or(&NO_NAMES, |r| &r.dst_names)
    }

    /// The names of the client end.
    pub fn src_names(&self) -> &EndNames {
        self.rare.as_ref().map_or(&NO_NAMES, |r| &r.src_names)
    }

    /// The kernel's drops of this connection this interval, by reason.
    pub fn drops(&self) -> &BTreeMap<Arc<str>, u64> {
        self.rare.as_ref().map_or(&NO_DROPS, |r| &r.drops)
    }

    /// Changes the rarely set fields; `rare` stays `None` while they are
    /// all empty.
    fn with_rare(&mut self, f: impl FnOnce(&mut Rare)) {
        let mut r = self.rare.take().unwrap_or_default();
        f(&mut r);
        if !r.is_empty() {
            self.rare = Some(r);
        }
    }

    pub fn set_also_seen_on(&mut self, v: Vec<String>) {
        if !v.is_empty() || self.rare.is_some() {
            self.with_rare(|r| r.also_seen_on = v);
        }
    }

    /// Sets the names of the server end and of the client end.
    pub fn set_names(&mut self, dst: EndNames, src: EndNames) {
        if !dst.is_empty() || !src.is_empty() || self.rare.is_some() {
            self.with_rare(|r| {
                r.dst_names = dst;
                r.src_names = src;
            });
        }
    }

    pub fn set_drops(&mut self, d: BTreeMap<Arc<str>, u64>) {
        if !d.is_empty() || self.rare.is_some() {
            self.with_rare(|r| r.drops = d);
        }
    }

    /// The record with these drops (tests, benchmarks).
    pub fn with_drops(mut self, d: BTreeMap<Arc<str>, u64>) -> FlowRecord {
        self.set_drops(d);
        self
    }
}

impl Serialize for FlowRecord {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // A map, as the derived serialisation with a flattened `health`
        // wrote it (same keys, order and values).
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("interface", &*self.interface)?;
        m.serialize_entry("ifindex", &self.ifindex)?;
        let also = self.also_seen_on();
        if !also.is_empty() {
            m.serialize_entry("also_seen_on", also)?;
        }
        m.serialize_entry("protocol", &*self.protocol)?;
        m.serialize_entry("src_ip", &self.src_ip)?;
        m.serialize_entry("src_port", &self.src_port)?;
        m.serialize_entry("dst_ip", &self.dst_ip)?;
        m.serialize_entry("dst_port", &self.dst_port)?;
        m.serialize_entry("src_to_dst", &self.src_to_dst)?;
        m.serialize_entry("dst_to_src", &self.dst_to_src)?;
        m.serialize_entry("tcp_flags", &self.tcp_flags)?;
        m.serialize_entry("first_seen", &Micros(&self.first_seen))?;
        m.serialize_entry("last_seen", &Micros(&self.last_seen))?;
        if let Some(v) = &self.handshake_rtt_us {
            m.serialize_entry("handshake_rtt_us", v)?;
        }
        m.serialize_entry("orientation", &self.orientation)?;
        m.serialize_entry("opened", &self.opened)?;
        m.serialize_entry("reset", &self.reset)?;
        let h = &self.health;
        m.serialize_entry("failure", &h.failure)?;
        crate::flow::health::serialize_tcp_counts(
            &mut m,
            [
                u64::from(h.syn_retransmits),
                u64::from(h.resets_client),
                u64::from(h.resets_server),
                h.retransmits_client_to_server,
                h.retransmits_server_to_client,
            ],
        )?;
        if let Some(r) = &self.rare {
            if !r.dst_names.is_empty() {
                m.serialize_entry("dst_names", &r.dst_names)?;
            }
            if !r.src_names.is_empty() {
                m.serialize_entry("src_names", &r.src_names)?;
            }
            if !r.drops.is_empty() {
                m.serialize_entry("drops", &r.drops)?;
            }
        }
        if let Some(v) = &self.srtt_us {
            m.serialize_entry("srtt_us", v)?;
        }
        if let Some(p) = &self.src_process {
            m.serialize_entry("src_process", p)?;
        }
        if let Some(p) = &self.dst_process {
            m.serialize_entry("dst_process", p)?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    use crate::enrich::process::Process;

    /// The record as serde's derive wrote it before its rare fields went
    /// out of line (every field inline, `health` flattened): the
    /// reference the hand-written serialisation must match byte for byte.
    #[derive(Serialize)]
    struct Derived {
        interface: Arc<str>,
        ifindex: u32,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        also_seen_on: Vec<String>,
        protocol: Cow<'static, str>,
        src_ip: IpAddr,
        src_port: u16,
        dst_ip: IpAddr,
        dst_port: u16,
        src_to_dst: Counters,
        dst_to_src: Counters,
        tcp_flags: Vec<&'static str>,
        #[serde(serialize_with = "rfc3339_micros")]
        first_seen: SystemTime,
        #[serde(serialize_with = "rfc3339_micros")]
        last_seen: SystemTime,
        #[serde(skip_serializing_if = "Option::is_none")]
        handshake_rtt_us: Option<f64>,
        orientation: Orientation,
        opened: bool,
        reset: bool,
        #[serde(skip)]
        _handshake_this_interval: Option<f64>,
        #[serde(flatten)]
        health: Health,
        #[serde(skip_serializing_if = "EndNames::is_empty")]
        dst_names: EndNames,
        #[serde(skip_serializing_if = "EndNames::is_empty")]
        src_names: EndNames,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        drops: BTreeMap<Arc<str>, u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        srtt_us: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        src_process: Option<Arc<Process>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        dst_process: Option<Arc<Process>>,
    }

    fn derived(r: &FlowRecord) -> Derived {
        Derived {
            interface: r.interface.clone(),
            ifindex: r.ifindex,
            also_seen_on: r.also_seen_on().to_vec(),
            protocol: r.protocol.clone(),
            src_ip: r.src_ip,
            src_port: r.src_port,
            dst_ip: r.dst_ip,
            dst_port: r.dst_port,
            src_to_dst: r.src_to_dst,
            dst_to_src: r.dst_to_src,
            tcp_flags: r.tcp_flags.names().collect(),
            first_seen: r.first_seen,
            last_seen: r.last_seen,
            handshake_rtt_us: r.handshake_rtt_us,
            orientation: r.orientation,
            opened: r.opened,
            reset: r.reset,
            _handshake_this_interval: r.handshake_this_interval,
            health: r.health,
            dst_names: r.dst_names().clone(),
            src_names: r.src_names().clone(),
            drops: r.drops().clone(),
            srtt_us: r.srtt_us,
            src_process: r.src_process.clone(),
            dst_process: r.dst_process.clone(),
        }
    }

    fn plain() -> FlowRecord {
        let at = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        FlowRecord {
            interface: "eth0".into(),
            ifindex: 2,
            protocol: "udp".into(),
            src_ip: "10.0.0.1".parse().unwrap(),
            src_port: 40000,
            dst_ip: "2001:db8::1".parse().unwrap(),
            dst_port: 53,
            src_to_dst: Counters {
                packets: 1,
                bytes: 74,
            },
            dst_to_src: Counters::default(),
            tcp_flags: TcpFlags::default(),
            first_seen: at,
            last_seen: at + Duration::from_millis(5),
            handshake_rtt_us: None,
            orientation: Orientation::FirstPacket,
            opened: true,
            reset: false,
            handshake_this_interval: None,
            health: Health::default(),
            srtt_us: None,
            src_process: None,
            dst_process: None,
            rare: None,
        }
    }

    /// Every field set, with characters JSON escapes in the strings.
    fn full() -> FlowRecord {
        let mut r = FlowRecord {
            interface: "veth\"a\\b".into(),
            protocol: "tcp".into(),
            tcp_flags: TcpFlags(0x02 | 0x10 | 0x04 | 0x80),
            handshake_rtt_us: Some(250.5),
            handshake_this_interval: Some(250.5),
            orientation: Orientation::Syn,
            reset: true,
            health: Health {
                failure: Some(Failure::Refused),
                syn_retransmits: 2,
                resets_client: 1,
                resets_server: 0,
                retransmits_client_to_server: 7,
                retransmits_server_to_client: 9,
            },
            srtt_us: Some(1234),
            src_process: Some(Arc::new(Process {
                pid: 42,
                comm: "curl\u{1}".into(),
                exe: Some("/usr/bin/curl".into()),
                unit: Some("a.service".into()),
                container_id: None,
            })),
            dst_process: Some(Arc::new(Process {
                pid: 7,
                comm: "nginx".into(),
                exe: None,
                unit: None,
                container_id: Some("abc\n".into()),
            })),
            ..plain()
        };
        r.set_also_seen_on(vec!["eth1".into(), "lo\t".into()]);
        r.set_names(
            EndNames {
                dns: Some("example.com".into()),
                tls: Some("api.\"x\".example".into()),
                http: None,
            },
            EndNames {
                dns: None,
                tls: None,
                http: Some("h\u{e9}".into()),
            },
        );
        r.set_drops(
            [("NETFILTER_DROP".into(), 3), ("TCP_\"X\"".into(), 1)]
                .into_iter()
                .collect(),
        );
        r
    }

    #[test]
    fn the_written_record_is_the_derived_json() {
        let mut cases = vec![plain(), full()];
        // Each rare field alone, and a failure of each kind.
        let mut r = plain();
        r.set_also_seen_on(vec!["eth1".into()]);
        cases.push(r);
        let mut r = plain();
        r.set_names(
            EndNames::default(),
            EndNames {
                dns: Some("c.example".into()),
                ..Default::default()
            },
        );
        cases.push(r);
        cases.push(plain().with_drops([("X".into(), 1)].into_iter().collect()));
        for f in [Failure::Unanswered, Failure::Unreachable] {
            let mut r = plain();
            r.health.failure = Some(f);
            cases.push(r);
        }
        for r in &cases {
            assert_eq!(
                serde_json::to_string(r).unwrap(),
                serde_json::to_string(&derived(r)).unwrap()
            );
            assert_eq!(
                serde_json::to_value(r).unwrap(),
                serde_json::to_value(derived(r)).unwrap()
            );
        }
        assert_eq!(
            serde_json::to_string(&plain()).unwrap(),
            "{\"interface\":\"eth0\",\"ifindex\":2,\"protocol\":\"udp\",\
             \"src_ip\":\"10.0.0.1\",\"src_port\":40000,\"dst_ip\":\"2001:db8::1\",\"dst_port\":53,\
             \"src_to_dst\":{\"packets\":1,\"bytes\":74},\"dst_to_src\":{\"packets\":0,\"bytes\":0},\
             \"tcp_flags\":[],\"first_seen\":\"2023-11-14T22:13:20.123456Z\",\
             \"last_seen\":\"2023-11-14T22:13:20.128456Z\",\"orientation\":\"first_packet\",\
             \"opened\":true,\"reset\":false,\"failure\":null,\"syn_retransmits\":0,\
             \"resets_client\":0,\"resets_server\":0,\"retransmits_client_to_server\":0,\
             \"retransmits_server_to_client\":0}"
        );
        assert_eq!(
            serde_json::to_string(&full()).unwrap(),
            "{\"interface\":\"veth\\\"a\\\\b\",\"ifindex\":2,\"also_seen_on\":[\"eth1\",\"lo\\t\"],\
             \"protocol\":\"tcp\",\"src_ip\":\"10.0.0.1\",\"src_port\":40000,\
             \"dst_ip\":\"2001:db8::1\",\"dst_port\":53,\"src_to_dst\":{\"packets\":1,\"bytes\":74},\
             \"dst_to_src\":{\"packets\":0,\"bytes\":0},\"tcp_flags\":[\"SYN\",\"RST\",\"ACK\",\"CWR\"],\
             \"first_seen\":\"2023-11-14T22:13:20.123456Z\",\"last_seen\":\"2023-11-14T22:13:20.128456Z\",\
             \"handshake_rtt_us\":250.5,\"orientation\":\"syn\",\"opened\":true,\"reset\":true,\
             \"failure\":\"refused\",\"syn_retransmits\":2,\"resets_client\":1,\"resets_server\":0,\
             \"retransmits_client_to_server\":7,\"retransmits_server_to_client\":9,\
             \"dst_names\":{\"dns\":\"example.com\",\"tls\":\"api.\\\"x\\\".example\"},\
             \"src_names\":{\"http\":\"h\u{e9}\"},\
             \"drops\":{\"NETFILTER_DROP\":3,\"TCP_\\\"X\\\"\":1},\"srtt_us\":1234,\
             \"src_process\":{\"pid\":42,\"comm\":\"curl\\u0001\",\"unit\":\"a.service\"},\
             \"dst_process\":{\"pid\":7,\"comm\":\"nginx\",\"container_id\":\"abc\\n\"}}"
        );
    }

    #[test]
    fn rare_fields_stay_out_of_line_only_when_set() {
        let mut r = plain();
        r.set_also_seen_on(Vec::new());
        r.set_names(EndNames::default(), EndNames::default());
        r.set_drops(BTreeMap::new());
        assert!(r.rare.is_none());
        r.set_drops([("X".into(), 1)].into_iter().collect());
        assert_eq!(r.drops().get("X"), Some(&1));
        assert!(r.rare.is_some());
        // Emptied again: nothing left out of line, equal to a plain record.
        r.set_drops(BTreeMap::new());
        assert!(r.rare.is_none());
        assert_eq!(r, plain());
        // 416 bytes with the rare fields inline (issue 16).
        assert!(std::mem::size_of::<FlowRecord>() <= 248);
    }
}
