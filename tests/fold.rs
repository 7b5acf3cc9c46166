//! Folding external endpoints past the cap (`max_external_endpoints`):
//! which stay named, the aggregates and their totals, and the worst-case
//! batch size.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flowmap::config::FlowsSource;
use flowmap::enrich::host::HostView;
use flowmap::enrich::server::ServerResolver;
use flowmap::enrich::EndpointKind;
use flowmap::flow::{Counters, FlowRecord};
use flowmap::graph::fold::{self, Limits};
use flowmap::graph::Graph;
use flowmap::sinks::coordimap::{body_len, write_body, Batch, MAX_BODY_BYTES};
use flowmap_testkit::records::{at, between};

const HOST: &str = "10.0.0.1";

fn host() -> HostView {
    HostView {
        hostname: "node-a".into(),
        addrs: vec![HOST.parse().unwrap()],
        ..Default::default()
    }
}

/// A connection `src:40000 → dst:port` with (packets, bytes) each way.
fn conn(
    proto: &'static str,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    c2s: (u64, u64),
    s2c: (u64, u64),
) -> FlowRecord {
    FlowRecord {
        src_to_dst: Counters {
            packets: c2s.0,
            bytes: c2s.1,
        },
        dst_to_src: Counters {
            packets: s2c.0,
            bytes: s2c.1,
        },
        opened: true,
        ..between(proto, (src, 40000), (dst, port), at(1))
    }
}

fn v4(i: u32) -> IpAddr {
    Ipv4Addr::from(0x0b00_0000 + i).into()
}

fn build(recs: &[FlowRecord]) -> Graph {
    let h = host();
    let r = ServerResolver {
        data_source_id: "ds",
        host: &h,
    };
    Graph::build(recs, &r)
}

/// Sums over every edge: (connections, packets c2s, bytes c2s, packets
/// s2c, bytes s2c).
fn totals(g: &Graph) -> [u64; 5] {
    g.edges.values().fold([0; 5], |t, s| {
        [
            t[0] + s.connections_active,
            t[1] + s.packets_client_to_server,
            t[2] + s.bytes_client_to_server,
            t[3] + s.packets_server_to_client,
            t[4] + s.bytes_server_to_client,
        ]
    })
}

fn lim(max_external: usize, edges: usize, groups: usize) -> Limits {
    Limits {
        max_external,
        edges_per_external: edges,
        port_groups: groups,
    }
}

fn host_id() -> String {
    "ds-flows.host-node-a".into()
}

#[test]
fn the_busiest_addresses_stay_named_and_the_rest_fold_per_port() {
    let h: IpAddr = HOST.parse().unwrap();
    // 10 addresses to port 80 (address i sends i*100 bytes), 5 to udp 53,
    // and the host dials out to 2 on 443.
    let mut recs: Vec<FlowRecord> = (1..=10)
        .map(|i| conn("tcp", v4(i), h, 80, (i as u64, i as u64 * 100), (1, 60)))
        .collect();
    recs.extend((11..=15).map(|i| conn("udp", v4(i), h, 53, (1, 70), (0, 0))));
    recs.extend((16..=17).map(|i| conn("tcp", h, v4(i), 443, (3, 300), (2, 2000))));
    let full = build(&recs);
    let (g, f) = fold::bound(&full, "ds", &lim(4, 16, 32));
    // Kept: the two 443 servers (2300 bytes each) and addresses 10 and 9.
    let named: Vec<&str> = g
        .endpoints
        .values()
        .filter(|e| e.kind == EndpointKind::External)
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(
        named,
        vec!["11.0.0.10", "11.0.0.16", "11.0.0.17", "11.0.0.9"]
    );
    assert_eq!(
        f,
        fold::Folded {
            named: 4,
            addresses: 13,
            flows: 13,
            aggregates: 2
        }
    );
    let tcp80 = fold::aggregate_id("ds", Some(("tcp", 80)));
    let udp53 = fold::aggregate_id("ds", Some(("udp", 53)));
    assert_eq!(tcp80, "ds-flows.external-other-tcp-80");
    let a = &g.endpoints[tcp80.as_str()];
    assert_eq!(a.kind, EndpointKind::ExternalGroup);
    assert_eq!(a.kind.element_type(), "flows.external_group");
    assert_eq!(
        serde_json::to_value(a).unwrap(),
        serde_json::json!({
            "id": tcp80, "kind": "external_group", "name": "other external peers (tcp/80)",
            "addresses": [],
            "group": {"protocol": "tcp", "port": 80, "peers": 8, "connections": 8,
                      "packets_from_peers": 36, "bytes_from_peers": 3600,
                      "packets_to_peers": 8, "bytes_to_peers": 480}
        })
    );
    let e = &g.edges.iter().find(|(k, _)| *k.client == *tcp80).unwrap();
    assert_eq!((&*e.0.server, e.0.port), (host_id().as_str(), 80));
    assert_eq!(
        (
            e.1.connections_active,
            e.1.packets_client_to_server,
            e.1.bytes_client_to_server
        ),
        (8, 36, 3600)
    );
    assert_eq!(g.endpoints[udp53.as_str()].group.as_ref().unwrap().peers, 5);
    assert_eq!(totals(&g), totals(&full));
    // Endpoints: host, 4 named, 2 aggregates; edges: 4 named, 2 folded.
    assert_eq!((g.endpoints.len(), g.edges.len()), (7, 6));
}

#[test]
fn the_choice_is_deterministic_ties_broken_by_id() {
    let h: IpAddr = HOST.parse().unwrap();
    let recs: Vec<FlowRecord> = (1..=50)
        .rev()
        .map(|i| conn("tcp", v4(i), h, 22, (1, 100), (1, 100)))
        .collect();
    let (a, _) = fold::bound(&build(&recs), "ds", &lim(3, 16, 32));
    let mut shuffled = recs.clone();
    shuffled.reverse();
    let (b, _) = fold::bound(&build(&shuffled), "ds", &lim(3, 16, 32));
    let ids = |g: &Graph| {
        g.endpoints
            .keys()
            .map(|k| k.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&a), ids(&b));
    assert!(ids(&a).contains(&"ds-flows.external-11.0.0.1".to_string()));
    assert!(ids(&a).contains(&"ds-flows.external-11.0.0.10".to_string()));
    assert!(ids(&a).contains(&"ds-flows.external-11.0.0.11".to_string()));
}

#[test]
fn under_the_cap_nothing_changes() {
    let h: IpAddr = HOST.parse().unwrap();
    let recs: Vec<FlowRecord> = (1..=5)
        .map(|i| conn("tcp", v4(i), h, 22, (1, 100), (1, 100)))
        .collect();
    let full = build(&recs);
    assert!(!fold::needed(&full, &Limits::new(5)));
    assert!(fold::needed(&full, &Limits::new(4)));
    let (g, f) = fold::bound(&full, "ds", &Limits::new(5));
    assert_eq!(f.addresses, 0);
    assert_eq!(f.named, 5);
    assert_eq!(g.endpoints, full.endpoints);
    assert_eq!(g.edges, full.edges);
}

#[test]
fn one_address_scanning_many_ports_keeps_its_busiest_edges() {
    let h: IpAddr = HOST.parse().unwrap();
    let recs: Vec<FlowRecord> = (1..=100u16)
        .map(|p| conn("tcp", v4(1), h, p, (1, 60 + p as u64), (1, 54)))
        .collect();
    let full = build(&recs);
    assert!(fold::needed(&full, &lim(10, 4, 8)));
    let (g, f) = fold::bound(&full, "ds", &lim(10, 4, 8));
    let named: Vec<u16> = g
        .edges
        .keys()
        .filter(|k| &*k.client == "ds-flows.external-11.0.0.1")
        .map(|k| k.port)
        .collect();
    assert_eq!(named, vec![97, 98, 99, 100]);
    // 96 ports folded: the 8 busiest (89..=96) keep an aggregate each, the
    // other 88 share "other ports" on port 0.
    assert_eq!(f.aggregates, 9);
    assert_eq!(f.addresses, 1);
    let other = fold::aggregate_id("ds", None);
    let o = g
        .edges
        .iter()
        .find(|(k, _)| *k.client == *other)
        .expect("an other-ports edge");
    assert_eq!((o.0.port, o.1.connections_active), (0, 88));
    let gs = g.endpoints[other.as_str()].group.clone().unwrap();
    assert_eq!(
        (gs.protocol, gs.port, gs.peers, gs.connections),
        (None, None, 1, 88)
    );
    assert_eq!(totals(&g), totals(&full));
}

#[test]
fn external_to_external_folds_onto_the_aggregate_itself() {
    // Forwarded traffic between two outside addresses, both past the cap.
    let recs = vec![
        conn("tcp", v4(1), v4(2), 443, (5, 500), (4, 4000)),
        conn(
            "tcp",
            v4(3),
            HOST.parse().unwrap(),
            443,
            (50, 5000),
            (40, 40000),
        ),
    ];
    let full = build(&recs);
    let (g, f) = fold::bound(&full, "ds", &lim(1, 16, 32));
    let agg = fold::aggregate_id("ds", Some(("tcp", 443)));
    let e = g
        .edges
        .iter()
        .find(|(k, _)| *k.client == *agg && *k.server == *agg)
        .expect("a self edge of the aggregate");
    assert_eq!(e.1.bytes_server_to_client, 4000);
    assert_eq!((f.addresses, f.flows), (2, 1));
    assert_eq!(g.endpoints[agg.as_str()].group.as_ref().unwrap().peers, 2);
    assert_eq!(totals(&g), totals(&full));
}

/// The longest text form of an IPv6 address: 39 characters.
fn long_v6(i: u32) -> IpAddr {
    let s = i.to_be_bytes();
    Ipv6Addr::new(
        0xfd00 + (s[0] as u16),
        0xffff,
        0xffff,
        0xffff,
        0xffff,
        0xffff,
        0x1000 + s[2] as u16,
        0x1000 + s[3] as u16,
    )
    .into()
}

/// Worst cases of the batch size: the default `max_external_endpoints`
/// with every named address (the longest IPv6 text) at its edge cap,
/// which is over the size cap (the pipeline then folds further), and
/// everything folded, the floor the pipeline can always reach, with
/// spoofed sources on 20,000 ports of 3 protocols and one port of each of
/// 256 more protocols.
#[test]
fn worst_case_batches_and_the_floor_fit_the_size_cap() {
    let h: IpAddr = HOST.parse().unwrap();
    let mut src = FlowsSource::default_server();
    src.id = "d".repeat(64);
    let ds = src.id.clone();
    let hv = host();
    let r = ServerResolver {
        data_source_id: &ds,
        host: &hv,
    };
    let mut recs = Vec::new();
    // 2,000 heavy addresses, each to 17 ports of the host, with
    // handshakes and resets.
    for i in 0..2_000u32 {
        for j in 0..17u16 {
            let mut c = conn(
                "tcp",
                long_v6(i),
                h,
                1000 + j,
                (1_000_000, u64::MAX / 1_000_000),
                (1, 1),
            );
            c.handshake_this_interval = Some(123.456789);
            c.reset = true;
            recs.push(c);
        }
    }
    // Spoofed light sources on every port of 3 protocols.
    for p in 0..20_000u16 {
        for proto in ["tcp", "udp", "sctp"] {
            recs.push(conn(
                proto,
                long_v6(100_000 + p as u32),
                h,
                p,
                (1, 60),
                (0, 0),
            ));
        }
    }
    for n in 0..256u32 {
        let proto = format!("ipproto-{n}");
        recs.push(FlowRecord {
            protocol: proto.into(),
            ..conn("tcp", long_v6(200_000 + n), h, 0, (1, 60), (0, 0))
        });
    }
    let full = Graph::build(&recs, &r);
    drop(recs);
    let always = [r.host_endpoint()];
    let iv = (at(0), at(30));
    let (g, f) = fold::bound(&full, &ds, &Limits::new(fold::DEFAULT_MAX_EXTERNAL));
    let top = body_len(&g, &always, &src, &[], iv);
    let (floor, _) = fold::bound(&full, &ds, &Limits::new(0));
    let bottom = body_len(&floor, &always, &src, &[], iv);
    println!(
        "worst case: {} named, {} edges, body {} bytes; all folded: {} endpoints, {} edges, body {} bytes",
        f.named,
        g.edges.len(),
        top,
        floor.endpoints.len(),
        floor.edges.len(),
        bottom
    );
    assert!(top > MAX_BODY_BYTES, "this case needs the further folding");
    assert!(bottom < MAX_BODY_BYTES / 8, "the floor: {bottom} bytes");
    assert_eq!(floor.endpoints.len(), 1 + fold::PORT_GROUPS + 1);
    // The body written equals the body counted, and parses as a batch.
    let mut body = Vec::new();
    write_body(&mut body, &floor, &always, &src, &[], iv).unwrap();
    assert_eq!(body.len(), bottom);
    let b: Batch = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        b.cloud_crawl_data.crawled_data.data.len(),
        floor.endpoints.len() + pairs(&floor)
    );
    assert_eq!(totals(&floor), totals(&full));
}

fn pairs(g: &Graph) -> usize {
    let mut m = BTreeMap::new();
    for k in g.edges.keys() {
        m.insert((k.client.clone(), k.server.clone()), ());
    }
    m.len()
}
