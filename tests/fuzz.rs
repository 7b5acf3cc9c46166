//! Parser fuzz: tens of thousands of seeded random and mutated frames through
//! BPF_PROG_TEST_RUN. Every frame must load and return "continue", be counted
//! exactly once (in a flow, or as one statistics reason), and no flow may
//! carry impossible fields. FLOWMAP_FUZZ_SEED and FLOWMAP_FUZZ_FRAMES change
//! the seed and the number of frames; a failure prints the seed and frame.

use flowmap_testkit::net as common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flowmap::datapath::{Datapath, Entry, Options, STAT_NAMES};
use flowmap::flow::{FlowKey, Sample};
use flowmap_testkit::frames::*;

const TC_ACT_UNSPEC: u32 = u32::MAX;
/// Frames between drains (well below the flow map's size unless the test
/// shrinks the map on purpose).
const DRAIN_EVERY: usize = 2000;
/// BPF_PROG_TEST_RUN refuses a tc program input shorter than an Ethernet
/// header (EINVAL, before the program runs); a real skb on a hook is never
/// shorter either.
const MIN_FRAME: usize = 14;

/// The input the kernel accepts: at least an Ethernet header, and (6.18)
/// whole fixed IPv4/IPv6 headers after an untagged IP ethertype. Such short
/// frames are padded; truncation inside the IP header is still reached
/// behind VLAN tags, and inside L4 through the IP length fields.
fn runnable(f: &mut Vec<u8>) {
    let min = match f.get(12..14) {
        Some([0x08, 0x00]) => MIN_FRAME + 20,
        Some([0x86, 0xdd]) => MIN_FRAME + 40,
        _ => MIN_FRAME,
    };
    if f.len() < min {
        f.resize(min, 0);
    }
}

/// splitmix64: small, seeded, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Addresses from a small pool, so flows repeat and fragments meet heads.
fn addr(rng: &mut Rng, v6: bool) -> IpAddr {
    let n = rng.below(6) as u8 + 1;
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, n as u16))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 9, 0, n))
    }
}

fn l4(rng: &mut Rng) -> L4 {
    let port = |rng: &mut Rng| [53, 80, 443, 5432, 40000, 0][rng.below(6) as usize] as u16;
    let payload = rng.below(300) as usize;
    match rng.below(5) {
        0 => L4::Tcp {
            sport: port(rng),
            dport: port(rng),
            flags: rng.next() as u8,
            payload,
        },
        1 => L4::Udp {
            sport: port(rng),
            dport: port(rng),
            payload,
        },
        2 => L4::Icmp {
            kind: [0, 3, 8, 11, 128, 129, 135][rng.below(7) as usize],
            code: rng.below(4) as u8,
            payload,
        },
        3 => L4::Raw {
            proto: [47, 50, 132, 136, 0, 43, 44, 60][rng.below(8) as usize],
            payload,
        },
        _ => L4::Raw {
            proto: rng.next() as u8,
            payload,
        },
    }
}

/// An IPv4 packet, sometimes with options or as a fragment.
fn ipv4(rng: &mut Rng, l4: &L4) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (addr(rng, false), addr(rng, false)) else {
        unreachable!()
    };
    let body = l4.bytes();
    let options = vec![1u8; 4 * rng.below(3) as usize];
    let frag = if rng.chance(25) {
        // More-fragments and/or an offset, with a small id so heads and
        // tails of one packet meet.
        (rng.below(2) as u16) << 13 | (rng.below(3) as u16 * 64)
    } else {
        0x4000 // don't fragment
    };
    let id = rng.below(4) as u16;
    let mut p = ipv4_header(
        s.octets(),
        d.octets(),
        l4.proto(false),
        body.len(),
        &options,
        frag,
        id,
    );
    p.extend_from_slice(&body);
    p
}

/// An IPv6 packet, sometimes behind extension headers (hop-by-hop,
/// destination options, fragment).
fn ipv6(rng: &mut Rng, l4: &L4) -> Vec<u8> {
    let (IpAddr::V6(s), IpAddr::V6(d)) = (addr(rng, true), addr(rng, true)) else {
        unreachable!()
    };
    let mut ext = Vec::new();
    let mut next = l4.proto(true);
    for _ in 0..rng.below(4) {
        let kind = [0u8, 60, 44][rng.below(3) as usize];
        let mut h = vec![0u8; 8];
        h[0] = next;
        if kind == 44 {
            let off = (rng.below(3) as u16 * 8) << 3 | rng.below(2) as u16;
            h[2..4].copy_from_slice(&off.to_be_bytes());
            h[4..8].copy_from_slice(&(rng.below(4) as u32).to_be_bytes());
        }
        h.extend_from_slice(&ext);
        ext = h;
        next = kind;
    }
    let body = l4.bytes();
    let mut p = ipv6_header(s.octets(), d.octets(), next, ext.len() + body.len());
    p.extend_from_slice(&ext);
    p.extend_from_slice(&body);
    p
}

/// A well-formed frame: Ethernet (maybe tagged, maybe not IP) or bare IP.
fn valid(rng: &mut Rng) -> (Entry, Vec<u8>) {
    let l4 = l4(rng);
    let v6 = rng.chance(40);
    let ip = if v6 { ipv6(rng, &l4) } else { ipv4(rng, &l4) };
    let egress = rng.chance(50);
    if rng.chance(15) {
        let entry = if egress {
            Entry::L3Egress
        } else {
            Entry::L3Ingress
        };
        return (entry, ip);
    }
    let tags: Vec<(u16, u16)> = (0..rng.below(3))
        .map(|_| {
            (
                [0x8100u16, 0x88a8][rng.below(2) as usize],
                rng.below(4095) as u16,
            )
        })
        .collect();
    let ethertype = match rng.below(10) {
        0 => [0x0806u16, 0x88cc, 0x8100, 0x0000][rng.below(4) as usize],
        _ if v6 => 0x86dd,
        _ => 0x0800,
    };
    let mut f = ethernet(ethertype, &tags);
    f.extend_from_slice(&ip);
    let entry = if egress {
        Entry::EthEgress
    } else {
        Entry::EthIngress
    };
    (entry, f)
}

/// Damage a frame: flip bytes, truncate, extend, or overwrite a header field.
fn mutate(rng: &mut Rng, f: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        match rng.below(4) {
            0 if !f.is_empty() => {
                let i = rng.below(f.len() as u64) as usize;
                f[i] ^= 1 << rng.below(8);
            }
            1 if f.len() > MIN_FRAME => {
                let keep = MIN_FRAME + rng.below((f.len() - MIN_FRAME) as u64 + 1) as usize;
                f.truncate(keep)
            }
            2 => {
                let n = rng.below(40) as usize;
                f.extend(rng.bytes(n));
            }
            _ if f.len() > 1 => {
                // The first 64 bytes hold every length and version field.
                let i = rng.below(f.len().min(64) as u64) as usize;
                f[i] = rng.next() as u8;
            }
            _ => {}
        }
    }
}

fn frame(rng: &mut Rng) -> (Entry, Vec<u8>) {
    match rng.below(10) {
        0 => {
            let entries = [
                Entry::EthIngress,
                Entry::EthEgress,
                Entry::L3Ingress,
                Entry::L3Egress,
            ];
            let n = MIN_FRAME + rng.below(120) as usize;
            (entries[rng.below(4) as usize], rng.bytes(n))
        }
        1..=4 => valid(rng),
        _ => {
            let (e, mut f) = valid(rng);
            mutate(rng, &mut f);
            (e, f)
        }
    }
}

fn stat_index(name: &str) -> usize {
    STAT_NAMES.iter().position(|n| *n == name).unwrap()
}

/// Fields no parse of any frame can produce.
fn check_flow(k: &FlowKey, s: &Sample, max_len: u64, why: &str) {
    let p = k.conn.proto;
    let has_ports = matches!(p, 6 | 17 | 132 | 136);
    assert!(
        has_ports || k.conn.port == [0, 0],
        "{why}: ports on protocol {p}: {k:?}"
    );
    assert_eq!(
        k.conn.addr[0].is_ipv4(),
        k.conn.addr[1].is_ipv4(),
        "{why}: mixed families {k:?}"
    );
    assert_eq!(k.ifindex, 1, "{why}: BPF_PROG_TEST_RUN runs on loopback");
    assert!(
        s.packets[0] + s.packets[1] > 0,
        "{why}: a flow without packets {k:?}"
    );
    for side in 0..2 {
        assert!(
            s.bytes[side] >= s.packets[side] * 20,
            "{why}: bytes below headers {k:?} {s:?}"
        );
        assert!(
            s.bytes[side] <= s.packets[side] * max_len,
            "{why}: bytes above frames {k:?} {s:?}"
        );
        assert!(
            p == 6 || s.tcp_flags[side] == 0,
            "{why}: TCP flags on protocol {p}"
        );
    }
    assert!(
        s.open_side <= 2 && (1..=2).contains(&s.first_side),
        "{why}: sides {s:?}"
    );
    assert!(
        s.first_seen_ns <= s.last_seen_ns,
        "{why}: time runs backwards {s:?}"
    );
}

/// Runs `frames` seeded frames through a datapath with `max_flows` entries
/// per map and checks that each is counted exactly once.
fn fuzz(name: &str, max_flows: u32, frames: u64) {
    if !common::privileged(name) {
        return;
    }
    let seed = env_u64("FLOWMAP_FUZZ_SEED", 0x5eed_f10a);
    let mut rng = Rng(seed);
    let mut dp = Datapath::load(&Options {
        max_flows,
        ..Options::default()
    })
    .expect("load the BPF program");
    // Reasons that mark a packet that is also counted in a flow.
    let also_in_flow = [stat_index("frag_no_head"), stat_index("map_full")];
    let mut before = dp.stats().unwrap();
    let (mut want_packets, mut want_bytes, mut max_len) = (0u64, 0u64, 0u64);
    let mut reasons = [0u64; STAT_NAMES.len()];
    for i in 0..frames {
        let (entry, mut f) = frame(&mut rng);
        runnable(&mut f);
        let why = format!("seed {seed:#x} frame {i} {entry:?} {:02x?}", f);
        let verdict = dp
            .test_run(entry, &f)
            .unwrap_or_else(|e| panic!("{why}: {e:#}"));
        assert_eq!(verdict, TC_ACT_UNSPEC, "{why}: verdict");
        let after = dp.stats().unwrap();
        let errors: u64 = (0..after.len())
            .filter(|i| !also_in_flow.contains(i))
            .map(|i| after[i] - before[i])
            .sum();
        assert!(errors <= 1, "{why}: counted under {errors} reasons");
        for (r, (a, b)) in reasons.iter_mut().zip(after.iter().zip(before)) {
            *r += a - b;
        }
        if errors == 0 {
            want_packets += 1;
            want_bytes += f.len() as u64;
            max_len = max_len.max(f.len() as u64);
        }
        before = after;
        if ((i + 1) as usize).is_multiple_of(DRAIN_EVERY) || i + 1 == frames {
            let d = dp.drain().unwrap();
            let packets: u64 = d
                .flows
                .iter()
                .map(|(_, s)| s.packets[0] + s.packets[1])
                .sum();
            let bytes: u64 = d.flows.iter().map(|(_, s)| s.bytes[0] + s.bytes[1]).sum();
            for (k, s) in &d.flows {
                check_flow(
                    k,
                    s,
                    max_len,
                    &format!("seed {seed:#x} drain after frame {i}"),
                );
            }
            assert_eq!(
                packets + d.overflow_dropped,
                want_packets,
                "seed {seed:#x}: packets in flows by frame {i}"
            );
            if d.overflow_dropped == 0 {
                assert_eq!(
                    bytes, want_bytes,
                    "seed {seed:#x}: bytes in flows by frame {i}"
                );
            }
            (want_packets, want_bytes) = (0, 0);
        }
    }
    let named: Vec<String> = STAT_NAMES
        .iter()
        .zip(reasons)
        .map(|(n, c)| format!("{n}={c}"))
        .collect();
    eprintln!(
        "{name}: seed {seed:#x}, {frames} frames; reasons {}",
        named.join(" ")
    );
    // The generator must reach every parser outcome, or the test proves little.
    for reason in ["non_ip", "truncated", "bad_header", "frag_no_head"] {
        assert!(reasons[stat_index(reason)] > 0, "no frame reached {reason}");
    }
    if max_flows < 1000 {
        assert!(
            reasons[stat_index("map_full")] > 0,
            "the small map never filled"
        );
    }
}

#[test]
fn random_and_mutated_frames_are_counted_exactly_once() {
    fuzz(
        "random_and_mutated_frames_are_counted_exactly_once",
        flowmap::datapath::DEFAULT_MAX_FLOWS,
        env_u64("FLOWMAP_FUZZ_FRAMES", 30_000),
    );
}

#[test]
fn a_full_flow_map_loses_no_fuzzed_frame() {
    fuzz(
        "a_full_flow_map_loses_no_fuzzed_frame",
        64,
        env_u64("FLOWMAP_FUZZ_FRAMES", 30_000) / 3,
    );
}
