//! The kernel parser, case by case, through BPF_PROG_TEST_RUN on crafted
//! frames: exact flow keys and counters, and no flow from a malformed frame.

use flowmap_testkit::net as common;

use std::net::IpAddr;

use flowmap::datapath::{Datapath, Entry, Options, STAT_NAMES};
use flowmap::flow::{FlowKey, Sample};
use flowmap_testkit::frames::*;

const TC_ACT_UNSPEC: u32 = u32::MAX; // -1

fn dp() -> Datapath {
    Datapath::load(&Options::default()).expect("load the BPF program")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn stat(d: &[u64], name: &str) -> u64 {
    d[STAT_NAMES.iter().position(|n| *n == name).unwrap()]
}

/// Runs frames, checks every verdict is "continue", returns the flows.
fn run(dp: &mut Datapath, entry: Entry, frames: &[Vec<u8>]) -> (Vec<(FlowKey, Sample)>, Vec<u64>) {
    for f in frames {
        let v = dp
            .test_run(entry, f)
            .unwrap_or_else(|e| panic!("{entry:?} frame of {} bytes: {e:#}", f.len()));
        assert_eq!(v, TC_ACT_UNSPEC, "verdict must be TC_ACT_UNSPEC");
    }
    let d = dp.drain().unwrap();
    (d.flows, d.stats.to_vec())
}

fn expect_key(k: &FlowKey, a: &str, pa: u16, b: &str, pb: u16, proto: u8) {
    assert_eq!(k.conn.addr[0], ip(a), "side 0 address");
    assert_eq!(k.conn.addr[1], ip(b), "side 1 address");
    assert_eq!(k.conn.port, [pa, pb]);
    assert_eq!(k.conn.proto, proto);
    assert_eq!(
        k.ifindex, 1,
        "BPF_PROG_TEST_RUN runs on the loopback device"
    );
}

#[test]
fn ipv4_tcp_handshake_both_directions() {
    if !common::privileged("ipv4_tcp_handshake_both_directions") {
        return;
    }
    let mut dp = dp();
    let (c, s) = (ip("10.0.0.2"), ip("10.0.0.1"));
    let syn = eth_frame(
        c,
        s,
        &L4::Tcp {
            sport: 40000,
            dport: 80,
            flags: TCP_SYN,
            payload: 0,
        },
        &[],
    );
    let synack = eth_frame(
        s,
        c,
        &L4::Tcp {
            sport: 80,
            dport: 40000,
            flags: TCP_SYN | TCP_ACK,
            payload: 0,
        },
        &[],
    );
    let data = eth_frame(
        c,
        s,
        &L4::Tcp {
            sport: 40000,
            dport: 80,
            flags: TCP_ACK | TCP_PSH,
            payload: 100,
        },
        &[],
    );
    let (flows, _) = run(
        &mut dp,
        Entry::EthIngress,
        &[syn.clone(), synack.clone(), data.clone()],
    );
    assert_eq!(flows.len(), 1);
    let (k, v) = &flows[0];
    // 10.0.0.1:80 sorts before 10.0.0.2:40000: the server is side 0.
    expect_key(k, "10.0.0.1", 80, "10.0.0.2", 40000, 6);
    assert_eq!(v.packets, [1, 2]);
    assert_eq!(
        v.bytes,
        [synack.len() as u64, (syn.len() + data.len()) as u64]
    );
    assert_eq!((syn.len(), data.len()), (54, 154));
    assert_eq!(v.tcp_flags, [0x12, 0x02 | 0x10 | 0x08]);
    assert_eq!(v.open_side, 2, "the client (side 1) sent the SYN");
    assert_eq!(v.first_side, 2);
    assert!(v.syn_ns > 0 && v.synack_ns >= v.syn_ns);
}

#[test]
fn ipv6_udp_and_icmp_and_other_protocol() {
    if !common::privileged("ipv6_udp_and_icmp_and_other_protocol") {
        return;
    }
    let mut dp = dp();
    let (a, b) = (ip("fd00::1"), ip("fd00::2"));
    let udp = eth_frame(
        a,
        b,
        &L4::Udp {
            sport: 5000,
            dport: 53,
            payload: 33,
        },
        &[],
    );
    let echo = eth_frame(
        ip("192.0.2.9"),
        ip("192.0.2.1"),
        &L4::Icmp {
            kind: 8,
            code: 0,
            payload: 56,
        },
        &[],
    );
    let reply = eth_frame(
        ip("192.0.2.1"),
        ip("192.0.2.9"),
        &L4::Icmp {
            kind: 0,
            code: 0,
            payload: 56,
        },
        &[],
    );
    let echo6 = eth_frame(
        b,
        a,
        &L4::Icmp {
            kind: 128,
            code: 0,
            payload: 8,
        },
        &[],
    );
    let gre = eth_frame(
        ip("10.9.9.9"),
        ip("10.9.9.8"),
        &L4::Raw {
            proto: 47,
            payload: 30,
        },
        &[],
    );
    let (mut flows, _) = run(
        &mut dp,
        Entry::EthEgress,
        &[
            udp.clone(),
            echo.clone(),
            reply.clone(),
            echo6.clone(),
            gre.clone(),
        ],
    );
    flows.sort_by_key(|(k, _)| (k.conn.proto, k.conn.addr[0].is_ipv6()));
    assert_eq!(flows.len(), 4);
    // ICMPv4: the echo sender 192.0.2.9 is side 1 and opened.
    expect_key(&flows[0].0, "192.0.2.1", 0, "192.0.2.9", 0, 1);
    assert_eq!(flows[0].1.packets, [1, 1]);
    assert_eq!(flows[0].1.bytes, [98, 98]);
    assert_eq!(flows[0].1.open_side, 2);
    expect_key(&flows[1].0, "fd00::1", 5000, "fd00::2", 53, 17);
    assert_eq!(flows[1].1.packets, [1, 0]);
    assert_eq!(flows[1].1.bytes, [udp.len() as u64, 0]);
    assert_eq!(udp.len(), 14 + 40 + 8 + 33);
    expect_key(&flows[2].0, "10.9.9.8", 0, "10.9.9.9", 0, 47);
    assert_eq!(flows[2].1.bytes, [0, gre.len() as u64]);
    expect_key(&flows[3].0, "fd00::1", 0, "fd00::2", 0, 58);
    assert_eq!(flows[3].1.packets, [0, 1]);
    assert_eq!(flows[3].1.open_side, 2);
}

#[test]
fn vlan_tags_single_and_double() {
    if !common::privileged("vlan_tags_single_and_double") {
        return;
    }
    let mut dp = dp();
    let l4 = L4::Tcp {
        sport: 1234,
        dport: 443,
        flags: TCP_ACK,
        payload: 10,
    };
    let one = eth_frame(ip("10.1.1.1"), ip("10.1.1.2"), &l4, &[(0x8100, 7)]);
    let two = eth_frame(
        ip("10.1.1.1"),
        ip("10.1.1.2"),
        &l4,
        &[(0x88a8, 100), (0x8100, 7)],
    );
    let (flows, _) = run(&mut dp, Entry::EthIngress, &[one.clone(), two.clone()]);
    assert_eq!(flows.len(), 1);
    expect_key(&flows[0].0, "10.1.1.1", 1234, "10.1.1.2", 443, 6);
    assert_eq!(flows[0].1.packets, [2, 0]);
    assert_eq!(flows[0].1.bytes, [(one.len() + two.len()) as u64, 0]);
    assert_eq!(
        (one.len(), two.len()),
        (18 + 20 + 20 + 10, 22 + 20 + 20 + 10)
    );
}

#[test]
fn ipv4_options_are_skipped() {
    if !common::privileged("ipv4_options_are_skipped") {
        return;
    }
    let mut dp = dp();
    for opt_len in [4usize, 12, 40] {
        let body = L4::Udp {
            sport: 999,
            dport: 1000,
            payload: 5,
        }
        .bytes();
        let mut f = ethernet(0x0800, &[]);
        f.extend(ipv4_header(
            [10, 2, 0, 1],
            [10, 2, 0, 2],
            17,
            body.len(),
            &vec![1u8; opt_len],
            0,
            1,
        ));
        f.extend(&body);
        let (flows, _) = run(&mut dp, Entry::EthIngress, &[f.clone()]);
        assert_eq!(flows.len(), 1, "options of {opt_len} bytes");
        expect_key(&flows[0].0, "10.2.0.1", 999, "10.2.0.2", 1000, 17);
        assert_eq!(flows[0].1.bytes, [f.len() as u64, 0]);
    }
}

#[test]
fn ipv4_fragments_count_into_the_flow_of_the_first() {
    if !common::privileged("ipv4_fragments_count_into_the_flow_of_the_first") {
        return;
    }
    let mut dp = dp();
    let udp = L4::Udp {
        sport: 7000,
        dport: 7001,
        payload: 1472,
    }
    .bytes();
    // First fragment: MF set, offset 0, with the UDP header.
    let mut first = ethernet(0x0800, &[]);
    first.extend(ipv4_header(
        [10, 3, 0, 1],
        [10, 3, 0, 2],
        17,
        1480,
        &[],
        0x2000,
        77,
    ));
    first.extend(&udp[..1480]);
    // Last fragment: offset 1480/8, no L4 header.
    let mut last = ethernet(0x0800, &[]);
    last.extend(ipv4_header(
        [10, 3, 0, 1],
        [10, 3, 0, 2],
        17,
        0,
        &[],
        185,
        77,
    ));
    last.extend(vec![0u8; 0]);
    last.extend(vec![0u8; 20]);
    // A later fragment of a datagram whose first fragment was never seen.
    let mut orphan = ethernet(0x0800, &[]);
    orphan.extend(ipv4_header(
        [10, 3, 0, 1],
        [10, 3, 0, 2],
        17,
        20,
        &[],
        185,
        78,
    ));
    orphan.extend(vec![0u8; 20]);
    let (mut flows, stats) = run(
        &mut dp,
        Entry::EthIngress,
        &[first.clone(), last.clone(), orphan.clone()],
    );
    flows.sort_by_key(|(k, _)| k.conn.port[0]);
    assert_eq!(flows.len(), 2);
    expect_key(&flows[0].0, "10.3.0.1", 0, "10.3.0.2", 0, 17);
    assert_eq!(flows[0].1.bytes, [orphan.len() as u64, 0]);
    expect_key(&flows[1].0, "10.3.0.1", 7000, "10.3.0.2", 7001, 17);
    assert_eq!(flows[1].1.packets, [2, 0]);
    assert_eq!(flows[1].1.bytes, [(first.len() + last.len()) as u64, 0]);
    assert_eq!(stat(&stats, "frag_no_head"), 1);
}

/// Later fragments of protocols without ports (ICMP, GRE, ESP) join the
/// port-less flow, head seen or not: no `frag_no_head` for them.
#[test]
fn later_fragments_without_ports_are_not_orphans() {
    if !common::privileged("later_fragments_without_ports_are_not_orphans") {
        return;
    }
    let mut dp = dp();
    let frag = |proto: u8, frag: u16, id: u16, len: usize| {
        let mut f = ethernet(0x0800, &[]);
        f.extend(ipv4_header(
            [10, 4, 0, 1],
            [10, 4, 0, 2],
            proto,
            len,
            &[],
            frag,
            id,
        ));
        f.extend(vec![0u8; len]);
        f
    };
    // An ICMP echo request in two fragments (head: type 8 and MF), a
    // later GRE fragment and a later ESP fragment whose heads never came.
    let mut icmp_head = frag(1, 0x2000, 90, 32);
    let at = icmp_head.len() - 32;
    icmp_head[at..at + 8].copy_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
    let frames = [
        icmp_head,
        frag(1, 4, 90, 40),
        frag(47, 185, 91, 40),
        frag(50, 185, 92, 40),
    ];
    let (mut flows, stats) = run(&mut dp, Entry::EthIngress, &frames);
    flows.sort_by_key(|(k, _)| k.conn.proto);
    let got: Vec<(u8, u64, u64)> = flows
        .iter()
        .map(|(k, s)| (k.conn.proto, s.packets[0], s.bytes[0]))
        .collect();
    let len = |i: usize| frames[i].len() as u64;
    assert_eq!(
        got,
        vec![(1, 2, len(0) + len(1)), (47, 1, len(2)), (50, 1, len(3))]
    );
    assert_eq!(stat(&stats, "frag_no_head"), 0);
}

fn ext(next: u8, len_units: u8) -> Vec<u8> {
    let mut e = vec![0u8; (len_units as usize + 1) * 8];
    e[0] = next;
    e[1] = len_units;
    e
}

#[test]
fn ipv6_extension_headers_and_fragments() {
    if !common::privileged("ipv6_extension_headers_and_fragments") {
        return;
    }
    let mut dp = dp();
    let (a, b) = (
        [0xfdu8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        [0xfdu8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
    );
    let tcp = L4::Tcp {
        sport: 50000,
        dport: 22,
        flags: TCP_SYN,
        payload: 0,
    }
    .bytes();
    // hop-by-hop → routing → destination options → TCP
    let mut chain = ext(43, 0);
    chain.extend(ext(60, 1));
    chain.extend(ext(6, 0));
    let mut f = ethernet(0x86dd, &[]);
    f.extend(ipv6_header(a, b, 0, chain.len() + tcp.len()));
    f.extend(&chain);
    f.extend(&tcp);
    // Fragment header, first fragment (offset 0, M=1) then a later one.
    let udp = L4::Udp {
        sport: 8000,
        dport: 8001,
        payload: 16,
    }
    .bytes();
    let frag = |off_units: u16, more: bool, body: &[u8]| {
        let mut h = vec![17u8, 0, 0, 0, 0, 0, 0x12, 0x34];
        let fo = (off_units << 3) | more as u16;
        h[2..4].copy_from_slice(&fo.to_be_bytes());
        let mut p = ethernet(0x86dd, &[]);
        p.extend(ipv6_header(a, b, 44, h.len() + body.len()));
        p.extend(&h);
        p.extend(body);
        p
    };
    let f1 = frag(0, true, &udp);
    let f2 = frag(3, false, &[0u8; 24]);
    let (mut flows, _) = run(
        &mut dp,
        Entry::EthIngress,
        &[f.clone(), f1.clone(), f2.clone()],
    );
    flows.sort_by_key(|(k, _)| k.conn.proto);
    assert_eq!(flows.len(), 2);
    expect_key(&flows[0].0, "fd00::1", 50000, "fd00::2", 22, 6);
    assert_eq!(flows[0].1.bytes, [f.len() as u64, 0]);
    assert_eq!(flows[0].1.open_side, 1);
    expect_key(&flows[1].0, "fd00::1", 8000, "fd00::2", 8001, 17);
    assert_eq!(flows[1].1.packets, [2, 0]);
    assert_eq!(flows[1].1.bytes, [(f1.len() + f2.len()) as u64, 0]);
}

#[test]
fn no_ethernet_devices() {
    if !common::privileged("no_ethernet_devices") {
        return;
    }
    let mut dp = dp();
    let p4 = ip_packet(
        ip("100.64.0.1"),
        ip("100.64.0.2"),
        &L4::Tcp {
            sport: 51820,
            dport: 443,
            flags: TCP_ACK,
            payload: 50,
        },
    );
    let p6 = ip_packet(
        ip("fd10::1"),
        ip("fd10::2"),
        &L4::Udp {
            sport: 51820,
            dport: 51821,
            payload: 30,
        },
    );
    let (mut flows, _) = run(&mut dp, Entry::L3Ingress, std::slice::from_ref(&p4));
    let (f6, _) = run(&mut dp, Entry::L3Egress, std::slice::from_ref(&p6));
    flows.extend(f6);
    assert_eq!(flows.len(), 2);
    expect_key(&flows[0].0, "100.64.0.1", 51820, "100.64.0.2", 443, 6);
    assert_eq!(flows[0].1.bytes, [p4.len() as u64, 0]);
    assert_eq!(p4.len(), 20 + 20 + 50);
    expect_key(&flows[1].0, "fd10::1", 51820, "fd10::2", 51821, 17);
    assert_eq!(flows[1].1.bytes, [p6.len() as u64, 0]);
}

#[test]
fn over_long_extension_chain_and_bogus_lengths_make_no_flow() {
    if !common::privileged("over_long_extension_chain_and_bogus_lengths_make_no_flow") {
        return;
    }
    let mut dp = dp();
    let (a, b) = ([0xfdu8; 16], [0xfeu8; 16]);
    // Nine destination-options headers: one more than the program follows.
    let mut chain = Vec::new();
    for i in 0..9 {
        chain.extend(ext(if i == 8 { 17 } else { 60 }, 0));
    }
    let udp = L4::Udp {
        sport: 1,
        dport: 2,
        payload: 0,
    }
    .bytes();
    let mut long = ethernet(0x86dd, &[]);
    long.extend(ipv6_header(a, b, 60, chain.len() + udp.len()));
    long.extend(&chain);
    long.extend(&udp);
    // IPv4 IHL of 3 words (less than the minimum 5).
    let mut ihl3 = eth_frame(
        ip("10.4.0.1"),
        ip("10.4.0.2"),
        &L4::Udp {
            sport: 1,
            dport: 2,
            payload: 8,
        },
        &[],
    );
    ihl3[14] = 0x43;
    // IPv4 IHL of 15 words on a packet shorter than that.
    let mut ihl15 = ethernet(0x0800, &[]);
    ihl15.extend(ipv4_header([10, 4, 0, 1], [10, 4, 0, 2], 17, 0, &[], 0, 1));
    ihl15[14] = 0x4f;
    // TCP data offset of 2 words.
    let mut doff = eth_frame(
        ip("10.4.0.1"),
        ip("10.4.0.2"),
        &L4::Tcp {
            sport: 1,
            dport: 2,
            flags: TCP_ACK,
            payload: 0,
        },
        &[],
    );
    doff[14 + 20 + 12] = 0x20;
    // IPv6 extension header whose length runs past the packet.
    let mut past = ethernet(0x86dd, &[]);
    past.extend(ipv6_header(a, b, 0, 8));
    past.extend(ext(17, 0));
    past[14 + 40 + 1] = 200;
    // IP version 5 in an IPv4 ethertype.
    let mut v5 = eth_frame(
        ip("10.4.0.1"),
        ip("10.4.0.2"),
        &L4::Udp {
            sport: 1,
            dport: 2,
            payload: 8,
        },
        &[],
    );
    v5[14] = 0x55;
    // ARP: not IP, not an error.
    let mut arp = ethernet(0x0806, &[]);
    arp.extend(vec![0u8; 28]);
    let (flows, stats) = run(
        &mut dp,
        Entry::EthIngress,
        &[long, ihl3, ihl15, doff, past, v5, arp],
    );
    assert!(flows.is_empty(), "no flow from malformed frames: {flows:?}");
    assert_eq!(stat(&stats, "ext_chain_too_long"), 1);
    assert_eq!(stat(&stats, "bad_header"), 3, "ihl 3, doff 2, version 5");
    assert_eq!(
        stat(&stats, "truncated"),
        2,
        "ihl 15, extension past the end"
    );
    assert_eq!(stat(&stats, "non_ip"), 1);
}

#[test]
fn frames_cut_at_every_header_byte_make_no_flow() {
    if !common::privileged("frames_cut_at_every_header_byte_make_no_flow") {
        return;
    }
    let mut dp = dp();
    // (entry, frame, header bytes, every cut must run). The kernel refuses
    // test frames of 14 bytes or fewer, and frames whose ethertype says
    // IPv4/IPv6 but that are shorter than that header; tagged frames
    // carry the same headers past that check, so every cut runs there.
    let v4 = |tags: &[(u16, u16)]| {
        eth_frame(
            ip("10.5.0.1"),
            ip("10.5.0.2"),
            &L4::Tcp {
                sport: 1,
                dport: 2,
                flags: TCP_SYN,
                payload: 0,
            },
            tags,
        )
    };
    let v6 = |tags: &[(u16, u16)]| {
        eth_frame(
            ip("fd00::5"),
            ip("fd00::6"),
            &L4::Udp {
                sport: 1,
                dport: 2,
                payload: 0,
            },
            tags,
        )
    };
    let cases: Vec<(Entry, Vec<u8>, usize, bool)> = vec![
        (Entry::EthIngress, v4(&[(0x8100, 5)]), 18 + 20 + 20, true),
        (
            Entry::EthIngress,
            v6(&[(0x88a8, 5), (0x8100, 6)]),
            22 + 40 + 8,
            true,
        ),
        (Entry::EthIngress, v4(&[]), 14 + 20 + 20, false),
        (Entry::EthIngress, v6(&[]), 14 + 40 + 8, false),
        (
            Entry::EthEgress,
            eth_frame(
                ip("10.5.0.1"),
                ip("10.5.0.2"),
                &L4::Icmp {
                    kind: 8,
                    code: 0,
                    payload: 0,
                },
                &[],
            ),
            14 + 20 + 8,
            false,
        ),
        (
            Entry::L3Ingress,
            ip_packet(
                ip("10.5.0.1"),
                ip("10.5.0.2"),
                &L4::Udp {
                    sport: 1,
                    dport: 2,
                    payload: 0,
                },
            ),
            28,
            false,
        ),
    ];
    for (entry, frame, headers, all_cuts) in cases {
        let mut ran = 0;
        for cut in 15..headers {
            match dp.test_run(entry, &frame[..cut]) {
                Ok(v) => assert_eq!(v, TC_ACT_UNSPEC),
                Err(_) if !all_cuts => continue,
                Err(e) => panic!("{entry:?} cut at {cut}: {e:#}"),
            }
            ran += 1;
            let d = dp.drain().unwrap();
            assert!(
                d.flows.is_empty(),
                "{entry:?} cut at {cut} of {headers} made a flow: {:?}",
                d.flows
            );
        }
        if all_cuts {
            assert_eq!(ran, headers - 15);
        }
        let (flows, _) = run(&mut dp, entry, &[frame[..headers].to_vec()]);
        assert_eq!(flows.len(), 1, "{entry:?} whole headers make one flow");
    }
}

#[test]
fn counts_survive_a_drain_between_packets() {
    if !common::privileged("counts_survive_a_drain_between_packets") {
        return;
    }
    let mut dp = dp();
    let f = eth_frame(
        ip("10.6.0.1"),
        ip("10.6.0.2"),
        &L4::Udp {
            sport: 1,
            dport: 2,
            payload: 100,
        },
        &[],
    );
    let mut total = 0;
    for round in 0..5u64 {
        let (flows, _) = run(
            &mut dp,
            Entry::EthIngress,
            &vec![f.clone(); round as usize + 1],
        );
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].1.packets, [round + 1, 0]);
        total += flows[0].1.packets[0];
    }
    assert_eq!(total, 15);
}

#[test]
fn a_full_flow_map_hands_packets_to_user_space_without_loss() {
    if !common::privileged("a_full_flow_map_hands_packets_to_user_space_without_loss") {
        return;
    }
    let mut dp = Datapath::load(&Options {
        max_flows: 4,
        ..Options::default()
    })
    .unwrap();
    // 10 flows, 3 packets each: 4 fit in the map, 6 go through the ring.
    let mut frames = Vec::new();
    for i in 0..10u16 {
        let f = eth_frame(
            ip("10.7.0.1"),
            ip("10.7.0.2"),
            &L4::Udp {
                sport: 1000 + i,
                dport: 53,
                payload: 20 + i as usize,
            },
            &[],
        );
        for _ in 0..3 {
            frames.push(f.clone());
        }
    }
    let (mut flows, stats) = run(&mut dp, Entry::EthIngress, &frames);
    flows.sort_by_key(|(k, _)| k.conn.port[0]);
    assert_eq!(
        flows.len(),
        10,
        "{stats:?} {:?}",
        flows
            .iter()
            .map(|(k, v)| (k.conn.port[0], v.packets))
            .collect::<Vec<_>>()
    );
    for (i, (k, v)) in flows.iter().enumerate() {
        expect_key(k, "10.7.0.1", 1000 + i as u16, "10.7.0.2", 53, 17);
        assert_eq!(v.packets, [3, 0]);
        assert_eq!(v.bytes, [3 * (14 + 20 + 8 + 20 + i as u64), 0]);
    }
    assert_eq!(
        stat(&stats, "map_full"),
        18,
        "6 flows x 3 packets through the ring"
    );
    assert_eq!(stat(&stats, "ring_lost"), 0);
}

fn tcp(src: &str, dst: &str, sport: u16, dport: u16, flags: u8, payload: usize) -> Vec<u8> {
    eth_frame(
        ip(src),
        ip(dst),
        &L4::Tcp {
            sport,
            dport,
            flags,
            payload,
        },
        &[],
    )
}

/// A connection's established packets past its first CACHE_YOUNG (8) per
/// side are counted in the CPU's flow cache (bpf/flows.bpf.c, account4);
/// the drain adds the cache to the entry and zeroes it, so each period's
/// counts and flags are exact, in the periods that use either cache.
#[test]
fn packets_counted_in_the_cpu_cache_reach_each_drain_exactly() {
    if !common::privileged("packets_counted_in_the_cpu_cache_reach_each_drain_exactly") {
        return;
    }
    let mut dp = dp();
    let (c, s) = ("10.9.0.1", "10.9.0.2");
    let mut frames = vec![
        tcp(c, s, 41000, 443, TCP_SYN, 0),
        tcp(s, c, 443, 41000, TCP_SYN | TCP_ACK, 0),
    ];
    for i in 0..60 {
        frames.push(tcp(c, s, 41000, 443, TCP_ACK | TCP_PSH, 100 + i));
        frames.push(tcp(s, c, 443, 41000, TCP_ACK, 1000));
    }
    let (flows, _) = run(&mut dp, Entry::EthIngress, &frames);
    assert_eq!(flows.len(), 1);
    let v = flows[0].1;
    assert_eq!(v.packets, [61, 61]);
    let client: u64 = (0..60).map(|i| 54 + 100 + i).sum::<u64>() + 54;
    assert_eq!(v.bytes, [client, 54 + 60 * 1054]);
    assert_eq!(
        v.tcp_flags,
        [
            (TCP_SYN | TCP_ACK | TCP_PSH) as u32,
            (TCP_SYN | TCP_ACK) as u32
        ]
    );
    assert_eq!(v.open_side, 1);
    // Three more periods (the other cache, then the first one again): the
    // flow stays in the cache across drains, counted from its entry again.
    for round in 0..3u64 {
        let mut frames = Vec::new();
        for _ in 0..20 + round {
            frames.push(tcp(c, s, 41000, 443, TCP_ACK, 10));
        }
        frames.push(tcp(s, c, 443, 41000, TCP_ACK | TCP_FIN, 0));
        let (flows, _) = run(&mut dp, Entry::EthIngress, &frames);
        assert_eq!(flows.len(), 1, "round {round}");
        let v = flows[0].1;
        assert_eq!(v.packets, [20 + round, 1], "round {round}");
        assert_eq!(v.bytes, [(20 + round) * 64, 54], "round {round}");
        assert_eq!(
            v.tcp_flags,
            [TCP_ACK as u32, (TCP_ACK | TCP_FIN) as u32],
            "round {round}"
        );
    }
}

/// The cache slot an IPv4 flow (canonical key, BPF_PROG_TEST_RUN's
/// ifindex 1) uses: the program's slot_of() on the little-endian key.
fn cache_slot(a: [u8; 4], b: [u8; 4], ports: [u16; 2], proto: u8) -> u64 {
    let mut k = [0u8; 16];
    k[..4].copy_from_slice(&a);
    k[4..8].copy_from_slice(&b);
    k[8..10].copy_from_slice(&ports[0].to_le_bytes());
    k[10..12].copy_from_slice(&ports[1].to_le_bytes());
    k[12..].copy_from_slice(&((1u32 << 8) | proto as u32).to_le_bytes());
    let x = u64::from_le_bytes(k[..8].try_into().unwrap());
    let y = u64::from_le_bytes(k[8..].try_into().unwrap());
    ((x ^ y.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xc2b2_ae3d_27d4_eb4f)) >> 55
}

/// Two flows on one cache slot: the second takes the slot once the first
/// has been idle for CACHE_IDLE (32) ticks, and the first's cached counts
/// go to its entry (flush_slot); none is lost or counted twice.
#[test]
fn two_flows_on_one_cache_slot_keep_exact_counts() {
    if !common::privileged("two_flows_on_one_cache_slot_keep_exact_counts") {
        return;
    }
    let (a, b) = ([10, 10, 0, 1], [10, 10, 0, 2]);
    let first = cache_slot(a, b, [5000, 9000], 17);
    let other = (5001..u16::MAX)
        .find(|p| cache_slot(a, b, [*p, 9000], 17) == first)
        .expect("a port whose flow shares the slot");
    let udp = |sport: u16, payload: usize| {
        eth_frame(
            ip("10.10.0.1"),
            ip("10.10.0.2"),
            &L4::Udp {
                sport,
                dport: 9000,
                payload,
            },
            &[],
        )
    };
    let mut dp = dp();
    let mut sent = std::collections::BTreeMap::<u16, (u64, u64)>::new();
    for round in 0..3u64 {
        for (port, n) in [(5000, 12 + round), (other, 15 + round)] {
            for i in 0..n {
                let f = udp(port, 30 + i as usize);
                let v = dp.test_run(Entry::EthIngress, &f).unwrap();
                assert_eq!(v, TC_ACT_UNSPEC);
                let e = sent.entry(port).or_default();
                e.0 += 1;
                e.1 += f.len() as u64;
            }
            // Longer than 32 ticks at any CONFIG_HZ (100 to 1000): the
            // slot's flow is idle.
            std::thread::sleep(std::time::Duration::from_millis(340));
        }
    }
    let mut flows = dp.drain().unwrap().flows;
    flows.sort_by_key(|(k, _)| k.conn.port[0]);
    let got: Vec<(u16, [u64; 2], [u64; 2])> = flows
        .iter()
        .map(|(k, v)| (k.conn.port[0], v.packets, v.bytes))
        .collect();
    let want: Vec<(u16, [u64; 2], [u64; 2])> = sent
        .iter()
        .map(|(p, (n, bytes))| (*p, [*n, 0], [*bytes, 0]))
        .collect();
    assert_eq!(got, want);
}
