//! A whole interval without root: fake flows in through the testkit's flow
//! source → the real pipeline → exact graph in the SQLite store, exact
//! Coordimap batch in the spool.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowmap::agent::pipeline::{HostSource, Pipeline};
use flowmap::datapath::Drained;
use flowmap::enrich::host::HostView;
use flowmap::flow::{proto, ConnKey, FlowKey, Sample};
use flowmap::serve::metrics::Metrics;
use flowmap::sinks::coordimap::spool::{DeliveryStats, Spool};
use flowmap::sinks::coordimap::{Batch, SpoolSink};
use flowmap::sinks::store::{self, Location, Store};
use flowmap::sinks::Sink;
use flowmap_testkit::source::FakeSource;
use flowmap_testkit::tempdir::TempDir;
use serde_json::{json, Value};

const CONFIG: &str = "coordimap:
  data_sources:
    - type: flows
      data_source_id: pl
      config:
        - name: interface_name
          value: all
        - name: crawl_interval
          value: 30s
";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// side 0 = the lower address of the pair, as the kernel orders keys.
fn entry(p: u8, a: (&str, u16), b: (&str, u16), sample: Sample) -> (FlowKey, Sample) {
    let key = FlowKey {
        ifindex: 2,
        conn: ConnKey {
            proto: p,
            addr: [ip(a.0), ip(b.0)],
            port: [a.1, b.1],
        },
    };
    (key, sample)
}

fn host() -> HostView {
    HostView {
        hostname: "node-a".into(),
        addrs: vec![ip("10.0.0.1")],
        listeners: HashSet::from([(proto::UDP, None, 53)]),
    }
}

/// A spool in `dir`, and the sink that fills it.
fn spool_in(dir: &TempDir) -> (Arc<Mutex<Spool>>, Box<dyn Sink>) {
    let stats = Arc::new(DeliveryStats::default());
    let spool = Arc::new(Mutex::new(
        Spool::open(&dir.path().join("spool"), 1 << 20, stats).unwrap(),
    ));
    let sink = SpoolSink {
        spool: spool.clone(),
        wake: Arc::new(tokio::sync::Notify::new()),
    };
    (spool, Box::new(sink))
}

/// The payload of every element of the batch, by element ID, without the
/// time fields.
fn payloads(batch: &Batch) -> BTreeMap<String, (String, Value)> {
    batch
        .cloud_crawl_data
        .crawled_data
        .data
        .iter()
        .map(|e| {
            let mut v: Value = serde_json::from_slice(&e.payload().unwrap()).unwrap();
            if let Some(o) = v.as_object_mut() {
                o.remove("interval_start");
                o.remove("interval_end");
                for f in o
                    .get_mut("flows")
                    .and_then(Value::as_array_mut)
                    .into_iter()
                    .flatten()
                {
                    let f = f.as_object_mut().unwrap();
                    f.remove("first_seen");
                    f.remove("last_seen");
                }
            }
            (e.id.clone(), (e.kind.clone(), v))
        })
        .collect()
}

#[test]
fn one_interval_gives_the_exact_graph_store_rows_and_batch() {
    let dir = TempDir::new("pipeline");
    let cfg = flowmap::config::parse(CONFIG, &|_| None).unwrap();
    let metrics = Arc::new(Metrics::new(Arc::new(DeliveryStats::default())));

    // A UDP client 10.0.0.2:40000 → this host's DNS server on port 53, and
    // a TCP client 10.0.0.3:50000 that opened (SYN) to 10.0.0.1:443.
    let mut src = FakeSource::new(&[(2, "eth0")]);
    src.push(Drained {
        flows: vec![
            entry(
                proto::UDP,
                ("10.0.0.1", 53),
                ("10.0.0.2", 40000),
                Sample {
                    packets: [2, 3],
                    bytes: [200, 300],
                    first_seen_ns: 1_000,
                    last_seen_ns: 2_000,
                    first_side: 2,
                    ..Default::default()
                },
            ),
            entry(
                proto::TCP,
                ("10.0.0.1", 443),
                ("10.0.0.3", 50000),
                Sample {
                    packets: [4, 5],
                    bytes: [4000, 500],
                    first_seen_ns: 1_000,
                    last_seen_ns: 3_000,
                    syn_ns: 1_000,
                    synack_ns: 1_200,
                    tcp_flags: [0x12, 0x02],
                    open_side: 2,
                    first_side: 2,
                    syns: 1,
                    ..Default::default()
                },
            ),
        ],
        ..Default::default()
    });

    let (spool, spool_sink) = spool_in(&dir);
    let db = Location::Sqlite(dir.path().join("flowmap.db"));
    let counters = store::Counters {
        written: metrics.store_written.clone(),
        errors: metrics.store_errors.clone(),
        dropped: metrics.store_dropped.clone(),
        healthy: metrics.health.store_ok.clone(),
    };
    let writer = store::Writer::start(db.clone(), Duration::from_secs(3600), 8, counters).unwrap();
    let sinks: Vec<Box<dyn Sink>> = vec![spool_sink, Box::new(writer)];
    let mut p = Pipeline::new(
        &cfg,
        (Duration::from_secs(30), 1024),
        sinks,
        metrics.clone(),
        None,
    );
    p.set_host(HostSource::Fixed(host()));
    p.set_started(0);
    let report = p.interval(&mut src).unwrap();
    p.close();
    assert_eq!((report.flows, report.packets, report.graphs), (2, 14, 1));

    // The batch in the spool.
    let (seq, body) = spool.lock().unwrap().oldest().unwrap();
    assert_eq!(seq, 1);
    let batch: Batch = serde_json::from_slice(&body).unwrap();
    assert_eq!(batch.cloud_crawl_data.crawl_internal_id, "pl");
    let got = payloads(&batch);
    let host_id = "pl-flows.host-node-a";
    let ids: Vec<&str> = got.keys().map(String::as_str).collect();
    assert_eq!(
        ids,
        vec![
            "pl-flows.external-10.0.0.2",
            "pl-flows.external-10.0.0.2.pl-flows.host-node-a",
            "pl-flows.external-10.0.0.3",
            "pl-flows.external-10.0.0.3.pl-flows.host-node-a",
            host_id,
        ]
    );
    assert_eq!(
        got[host_id],
        (
            "flows.host".to_string(),
            json!({"id": host_id, "kind": "host", "name": "node-a", "addresses": ["10.0.0.1"]})
        )
    );
    let edge = |client: &str, flows: Value| {
        (
            "coordimap.relationship_skipinsert".to_string(),
            json!({
                "source_id": client,
                "destination_id": host_id,
                "relationship_type": "coordimap.relationship_skipinsert",
                "relation_type": 104,
                "flows": flows,
            }),
        )
    };
    assert_eq!(
        got["pl-flows.external-10.0.0.2.pl-flows.host-node-a"],
        edge(
            "pl-flows.external-10.0.0.2",
            json!([{"protocol": "udp", "port": 53, "connections_opened": 1, "connections_active": 1,
                "packets_client_to_server": 3, "bytes_client_to_server": 300,
                "packets_server_to_client": 2, "bytes_server_to_client": 200, "tcp_resets": 0,
                "connections_attempted": 1,
                "connections_failed": {"refused": 0, "unanswered": 0, "unreachable": 0},
                "syn_retransmits": 0, "resets_client": 0, "resets_server": 0,
                "retransmits_client_to_server": 0, "retransmits_server_to_client": 0,
                "status": "Green"}])
        )
    );
    let tcp = &got["pl-flows.external-10.0.0.3.pl-flows.host-node-a"].1["flows"][0];
    assert_eq!(
        (
            &tcp["protocol"],
            &tcp["port"],
            &tcp["packets_client_to_server"],
            &tcp["bytes_client_to_server"]
        ),
        (&json!("tcp"), &json!(443), &json!(5), &json!(500))
    );
    assert_eq!(
        (
            &tcp["packets_server_to_client"],
            &tcp["bytes_server_to_client"],
            &tcp["handshake"]["count"]
        ),
        (&json!(4), &json!(4000), &json!(1))
    );

    // The same two edges in the store.
    let mut st = Store::open(&db).unwrap();
    assert_eq!(st.runs().unwrap(), 1);
    let v =
        flowmap::serve::view::graph(&mut st, std::time::UNIX_EPOCH, &Default::default()).unwrap();
    type Row = (String, String, String, u16, u64, u64, u64, u64);
    let edges: Vec<Row> = v
        .edges
        .iter()
        .map(|e| {
            (
                e.source.clone(),
                e.target.clone(),
                e.protocol.clone(),
                e.port,
                e.packets_client_to_server,
                e.bytes_client_to_server,
                e.packets_server_to_client,
                e.bytes_server_to_client,
            )
        })
        .collect();
    assert_eq!(
        edges,
        vec![
            // The busiest first.
            (
                "pl-flows.external-10.0.0.3".into(),
                host_id.into(),
                "tcp".into(),
                443,
                5,
                500,
                4,
                4000
            ),
            (
                "pl-flows.external-10.0.0.2".into(),
                host_id.into(),
                "udp".into(),
                53,
                3,
                300,
                2,
                200
            ),
        ]
    );
    assert_eq!(metrics.store_written.get(), 1);
}

/// `interface_name` per data source: a source for `wg0` reports only what
/// crossed `wg0`, one for `eth0` only what crossed `eth0`.
#[test]
fn each_data_source_gets_the_flows_of_its_own_interfaces() {
    let dir = TempDir::new("pipeline-ifaces");
    let cfg = flowmap::config::parse(
        "coordimap:
  data_sources:
    - type: flows
      data_source_id: lan
      config:
        - name: interface_name
          value: eth0
    - type: flows
      data_source_id: vpn
      config:
        - name: interface_name
          value: wg0
",
        &|_| None,
    )
    .unwrap();
    let metrics = Arc::new(Metrics::new(Arc::new(DeliveryStats::default())));
    let mut src = FakeSource::new(&[(2, "eth0"), (3, "wg0")]);
    let udp = |ifindex: u32, peer: &str, packets: u64| {
        let (mut k, s) = entry(
            proto::UDP,
            ("10.0.0.1", 53),
            (peer, 40000),
            Sample {
                packets: [packets, packets],
                bytes: [100 * packets, 100 * packets],
                first_seen_ns: 1_000,
                last_seen_ns: 2_000,
                first_side: 2,
                ..Default::default()
            },
        );
        k.ifindex = ifindex;
        (k, s)
    };
    src.push(Drained {
        flows: vec![udp(2, "10.0.0.2", 1), udp(3, "10.9.0.2", 7)],
        ..Default::default()
    });
    let (spool, spool_sink) = spool_in(&dir);
    let sinks: Vec<Box<dyn Sink>> = vec![spool_sink];
    let mut p = Pipeline::new(&cfg, (Duration::from_secs(30), 1024), sinks, metrics, None);
    p.set_host(HostSource::Fixed(host()));
    p.interval(&mut src).unwrap();
    p.close();
    let mut edges = Vec::new();
    let mut s = spool.lock().unwrap();
    while let Some((seq, body)) = s.oldest() {
        let batch: Batch = serde_json::from_slice(&body).unwrap();
        for (id, (kind, v)) in payloads(&batch) {
            if kind == "coordimap.relationship_skipinsert" {
                edges.push((
                    batch.cloud_crawl_data.crawl_internal_id.clone(),
                    id,
                    v["flows"][0]["packets_client_to_server"].as_u64().unwrap(),
                ));
            }
        }
        s.remove(seq);
    }
    assert_eq!(
        edges,
        vec![
            (
                "lan".to_string(),
                "lan-flows.external-10.0.0.2.lan-flows.host-node-a".to_string(),
                1
            ),
            (
                "vpn".to_string(),
                "vpn-flows.external-10.9.0.2.vpn-flows.host-node-a".to_string(),
                7
            ),
        ]
    );
}

/// 2,000 outside addresses, each a client of 17 ports of this host: under
/// the default cap every one stays named with 16 edges, a batch of more
/// than 8 MiB, so the pipeline folds further until it fits; every packet
/// is still in the batch.
#[test]
fn a_batch_over_the_size_cap_is_folded_until_it_fits() {
    use flowmap::sinks::coordimap::MAX_BODY_BYTES;
    let dir = TempDir::new("pipeline-cap");
    let cfg = flowmap::config::parse(CONFIG, &|_| None).unwrap();
    let stats = Arc::new(DeliveryStats::default());
    let metrics = Arc::new(Metrics::new(stats.clone()));
    let mut flows = Vec::new();
    for i in 0..2000u32 {
        let peer = std::net::Ipv4Addr::from(0x0b00_0000 + i).to_string();
        for port in 1000..1017u16 {
            let s = Sample {
                packets: [1, 1],
                bytes: [100, 60],
                first_seen_ns: 1_000,
                last_seen_ns: 2_000,
                open_side: 2,
                first_side: 2,
                ..Default::default()
            };
            flows.push(entry(proto::TCP, ("10.0.0.1", port), (&peer, 40000), s));
        }
    }
    let mut src = FakeSource::new(&[(2, "eth0")]);
    src.push(Drained {
        flows,
        ..Default::default()
    });
    let spool = Arc::new(Mutex::new(
        Spool::open(&dir.path().join("spool"), 64 << 20, stats).unwrap(),
    ));
    let sink = SpoolSink {
        spool: spool.clone(),
        wake: Arc::new(tokio::sync::Notify::new()),
    };
    let mut p = Pipeline::new(
        &cfg,
        (Duration::from_secs(30), 16384),
        vec![Box::new(sink)],
        metrics.clone(),
        None,
    );
    p.set_host(HostSource::Fixed(host()));
    p.set_started(0);
    let report = p.interval(&mut src).unwrap();
    p.close();
    assert_eq!(report.flows, 34_000);
    assert_eq!(metrics.batches_shrunk.get(), 1);
    let (_, body) = spool.lock().unwrap().oldest().unwrap();
    assert!(body.len() <= MAX_BODY_BYTES, "{} bytes", body.len());
    assert_eq!(metrics.batch_bytes.get(), body.len() as i64);
    let batch: Batch = serde_json::from_slice(&body).unwrap();
    let (mut named, mut packets, mut bytes, mut folded) = (0u64, 0u64, 0u64, 0u64);
    for (id, (kind, v)) in payloads(&batch) {
        match kind.as_str() {
            "flows.external" => named += 1,
            "flows.external_group" => folded += v["group"]["connections"].as_u64().unwrap(),
            "coordimap.relationship_skipinsert" => {
                for f in v["flows"].as_array().unwrap() {
                    for d in ["client_to_server", "server_to_client"] {
                        packets += f[format!("packets_{d}")].as_u64().unwrap();
                        bytes += f[format!("bytes_{d}")].as_u64().unwrap();
                    }
                }
            }
            _ => assert_eq!(id, "pl-flows.host-node-a"),
        }
    }
    // Halved from 2000 until it fit; named ones keep 16 edges each.
    assert!([1000, 500, 250].contains(&named), "{named} named");
    assert_eq!((packets, bytes), (68_000, 34_000 * 160));
    assert_eq!(folded, named + (2000 - named) * 17);
    assert_eq!(metrics.external_flows_folded.get(), folded);
    assert_eq!(metrics.external_addresses_folded.get(), 2000);
}
