//! Hostile traffic: a flood of spoofed source addresses into a veth the
//! agent binary watches. The batch stays bounded (named external
//! endpoints capped, the rest in aggregates per server port), every packet
//! is still counted, the counters say what folded, and the agent's memory
//! stays small.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use flowmap::sinks::coordimap::{Batch, MAX_BODY_BYTES};
use flowmap_testkit::agent::{proc_rss, wait_until, Agent};
use flowmap_testkit::collector;
use flowmap_testkit::frames::{eth_frame, L4, TCP_ACK, TCP_PSH, TCP_SYN};
use flowmap_testkit::net::{privileged, Netns};
use flowmap_testkit::traffic::inject;

/// Named external endpoints allowed per interval.
const CAP: usize = 50;
/// Spoofed sources with one SYN each, spread over `PORTS` ports.
const LIGHT: u32 = 20_000;
const PORTS: u32 = 40;
/// Heavy sources: a SYN and 4 segments of 1000 bytes each, to port 80.
const HEAVY: u32 = 10;
/// A frame of Ethernet + IPv4 + TCP headers.
const SYN_BYTES: u64 = 14 + 20 + 20;
const RSS_LIMIT: u64 = 128 << 20;

/// The flood, and (packets, bytes) it holds. Heavy sources are 11.0.0.x,
/// light ones 12.x.y.z: a heavy source wins any tie of bytes by its ID.
/// The destination MAC is not the host's, so the host drops every frame
/// after the agent's hook counted it (as it drops spoofed traffic).
fn flood(dst: IpAddr) -> (Vec<Vec<u8>>, u64, u64) {
    let mut frames = Vec::new();
    for i in 1..=HEAVY {
        let src = IpAddr::V4(Ipv4Addr::new(11, 0, 0, i as u8));
        let seg = |flags, payload| L4::Tcp {
            sport: 40000,
            dport: 80,
            flags,
            payload,
        };
        frames.push(eth_frame(src, dst, &seg(TCP_SYN, 0), &[]));
        for _ in 0..4 {
            frames.push(eth_frame(src, dst, &seg(TCP_ACK | TCP_PSH, 1000), &[]));
        }
    }
    for i in 1..=LIGHT {
        let src = IpAddr::V4(Ipv4Addr::from(0x0c00_0000 + i));
        let l4 = L4::Tcp {
            sport: 50000,
            dport: 1000 + (i % PORTS) as u16,
            flags: TCP_SYN,
            payload: 0,
        };
        frames.push(eth_frame(src, dst, &l4, &[]));
    }
    let bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();
    assert_eq!(
        bytes,
        HEAVY as u64 * (5 * SYN_BYTES + 4 * 1000) + LIGHT as u64 * SYN_BYTES
    );
    (frames, HEAVY as u64 * 5 + LIGHT as u64, bytes)
}

/// What the batches say, summed.
#[derive(Debug, Default)]
struct Seen {
    batches: usize,
    /// Packets and bytes of TCP edges into the host, named and aggregate.
    named: (u64, u64),
    folded: (u64, u64),
    /// Named external endpoints, over all batches.
    names: HashSet<String>,
    /// Aggregate peers and connections, over all batches.
    peers: u64,
    connections: u64,
    largest_body: usize,
}

fn payload(e: &flowmap::sinks::coordimap::Element) -> serde_json::Value {
    serde_json::from_slice(&e.payload().expect("base64")).expect("JSON payload")
}

/// Reads every batch; checks each one's cap as it goes.
fn read(bodies: &[Vec<u8>], host: &str) -> Seen {
    let mut s = Seen::default();
    for body in bodies {
        s.batches += 1;
        s.largest_body = s.largest_body.max(body.len());
        let b: Batch = serde_json::from_slice(body).expect("a Coordimap batch");
        let (mut named, mut distinct) = (0usize, 0u64);
        for e in &b.cloud_crawl_data.crawled_data.data {
            let p = payload(e);
            match e.kind.as_str() {
                "flows.external" => {
                    named += 1;
                    s.names.insert(e.name.clone());
                }
                "flows.external_group" => {
                    distinct += p["group"]["peers"].as_u64().unwrap();
                    s.peers += p["group"]["peers"].as_u64().unwrap();
                    s.connections += p["group"]["connections"].as_u64().unwrap();
                }
                "coordimap.relationship_skipinsert" if p["destination_id"] == host => {
                    let into = if p["source_id"]
                        .as_str()
                        .unwrap()
                        .contains("flows.external-other-")
                    {
                        &mut s.folded
                    } else {
                        &mut s.named
                    };
                    for f in p["flows"].as_array().unwrap() {
                        if f["protocol"] == "tcp" {
                            into.0 += f["packets_client_to_server"].as_u64().unwrap();
                            into.1 += f["bytes_client_to_server"].as_u64().unwrap();
                        }
                    }
                }
                _ => {}
            }
        }
        // Exactly the cap is named whenever more addresses came.
        assert_eq!(
            named as u64,
            (named as u64 + distinct).min(CAP as u64),
            "named external endpoints of one batch ({distinct} folded)"
        );
    }
    s
}

#[test]
fn a_flood_of_spoofed_sources_stays_bounded_and_fully_counted() {
    if !privileged("a_flood_of_spoofed_sources_stays_bounded_and_fully_counted") {
        return;
    }
    let v = Netns::builder().no_v6().build().unwrap();
    let col = collector::Server::start();
    let agent = Agent::builder(env!("CARGO_BIN_EXE_flowmap"))
        // Host-level edges: this test is not about processes (tests/process.rs).
        .option("processes", "false")
        .id("flood")
        .iface(&v.host)
        .interval("1s")
        .option("max_external_endpoints", CAP)
        .api_key("k")
        .args(&["--endpoint", &col.url()])
        .output("none")
        .start()
        .unwrap();
    let host = format!("flood-flows.host-{}", flowmap::enrich::host::hostname());
    let (frames, packets, bytes) = flood(v.host_v4.parse().unwrap());
    let mut rss = proc_rss(agent.pid());
    assert_eq!(inject(&v, &v.peer, frames).unwrap() as u64, packets);
    let mut seen = Seen::default();
    wait_until(
        Instant::now() + Duration::from_secs(90),
        "every flooded packet in the batches",
        || {
            rss = rss.max(proc_rss(agent.pid()));
            seen = read(&col.bodies(), &host);
            seen.named.0 + seen.folded.0 >= packets
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}: {seen:?}\n{}", agent.stderr()));
    rss = rss.max(proc_rss(agent.pid()));
    // Exact totals: named plus aggregates is what was sent.
    assert_eq!(
        (seen.named.0 + seen.folded.0, seen.named.1 + seen.folded.1),
        (packets, bytes)
    );
    let heavy: HashSet<String> = (1..=HEAVY).map(|i| format!("11.0.0.{i}")).collect();
    assert!(
        heavy.is_subset(&seen.names),
        "the heavy sources keep their names: {:?}",
        heavy.difference(&seen.names).collect::<Vec<_>>()
    );
    // Every source is named or in an aggregate, once (one port each).
    let named_light = seen.names.len() as u64 - HEAVY as u64;
    assert_eq!(seen.peers + named_light, LIGHT as u64);
    assert_eq!(seen.connections, seen.peers);
    assert!(seen.largest_body <= MAX_BODY_BYTES);
    let folded = agent
        .metric("flowmap_external_addresses_folded_total")
        .unwrap();
    let flows = agent.metric("flowmap_external_flows_folded_total").unwrap();
    assert_eq!(
        (folded as u64, flows as u64),
        (seen.peers, seen.connections)
    );
    let last_body = agent.metric("flowmap_batch_bytes").unwrap();
    assert!(last_body as usize <= MAX_BODY_BYTES);
    let lines = agent.count_log("external endpoints past the cap folded into aggregates");
    assert!(
        (1..=seen.batches).contains(&lines),
        "one log line per interval that folded, not one per address: {lines}"
    );
    println!(
        "flood: {packets} packets, {} batches, largest body {} bytes, {} named, {} folded, peak RSS {} KiB",
        seen.batches,
        seen.largest_body,
        seen.names.len(),
        seen.peers,
        rss / 1024
    );
    assert!(rss < RSS_LIMIT, "agent RSS {rss} bytes");
    agent.stop().unwrap();
}
