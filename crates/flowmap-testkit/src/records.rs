//! Flow records for the tests of what follows the datapath (graph, store,
//! Kubernetes resolution), on a fixed clock.

use std::time::{Duration, SystemTime};

use std::borrow::Cow;
use std::net::IpAddr;

use flowmap::flow::{Counters, FlowRecord, Orientation};

/// The tests' clock: `s` seconds after 1_800_000_000 s past the epoch.
pub fn at(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
}

/// A record of `proto` from `src` to `dst`, first and last seen at
/// `at(t)`, with (packets, bytes) client to server and back.
pub fn record(
    proto: &'static str,
    src: (&str, u16),
    dst: (&str, u16),
    t: u64,
    c2s: (u64, u64),
    s2c: (u64, u64),
) -> FlowRecord {
    let addr = |a: &str| a.parse().unwrap_or_else(|e| panic!("address {a}: {e}"));
    FlowRecord {
        src_to_dst: Counters {
            packets: c2s.0,
            bytes: c2s.1,
        },
        dst_to_src: Counters {
            packets: s2c.0,
            bytes: s2c.1,
        },
        ..between(proto, (addr(src.0), src.1), (addr(dst.0), dst.1), at(t))
    }
}

/// A connection `src` → `dst` on `eth0` with nothing counted yet, seen at
/// `at`: records built without the kernel (tests, benchmarks).
pub fn between(
    protocol: impl Into<Cow<'static, str>>,
    src: (IpAddr, u16),
    dst: (IpAddr, u16),
    at: SystemTime,
) -> FlowRecord {
    FlowRecord {
        interface: "eth0".into(),
        ifindex: 2,
        protocol: protocol.into(),
        src_ip: src.0,
        src_port: src.1,
        dst_ip: dst.0,
        dst_port: dst.1,
        src_to_dst: Counters::default(),
        dst_to_src: Counters::default(),
        tcp_flags: Default::default(),
        first_seen: at,
        last_seen: at,
        handshake_rtt_us: None,
        orientation: Orientation::Syn,
        opened: false,
        reset: false,
        handshake_this_interval: None,
        health: Default::default(),
        srtt_us: None,
        src_process: None,
        dst_process: None,
        rare: None,
    }
}
