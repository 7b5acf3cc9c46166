//! Aggregation of flow records into edges, and the exact Coordimap encoding.

use std::net::IpAddr;

use base64::Engine;
use flowmap::config::FlowsSource;
use flowmap::enrich::host::HostView;
use flowmap::enrich::server::ServerResolver;
use flowmap::flow::FlowRecord;
use flowmap::graph::{EdgeKey, Graph};
use flowmap::sinks::coordimap::{encode, hex_sha256, Batch};
use flowmap_testkit::records::{at, record};
use serde_json::json;

fn rec(
    src: &str,
    sport: u16,
    dst: &str,
    dport: u16,
    proto: &'static str,
    c2s: (u64, u64),
    s2c: (u64, u64),
) -> FlowRecord {
    FlowRecord {
        last_seen: at(2),
        ..record(proto, (src, sport), (dst, dport), 1, c2s, s2c)
    }
}

fn host() -> HostView {
    HostView {
        hostname: "node-a".into(),
        addrs: vec![
            "10.0.0.1".parse::<IpAddr>().unwrap(),
            "127.0.0.1".parse().unwrap(),
        ],
        ..Default::default()
    }
}

#[test]
fn records_become_edges_without_client_ports() {
    let h = host();
    let r = ServerResolver {
        data_source_id: "ds1",
        host: &h,
    };
    let mut a = rec(
        "10.0.0.1",
        40000,
        "93.184.216.34",
        443,
        "tcp",
        (10, 1000),
        (8, 9000),
    );
    a.opened = true;
    a.handshake_this_interval = Some(100.0);
    let mut b = rec(
        "10.0.0.1",
        40001,
        "93.184.216.34",
        443,
        "tcp",
        (2, 200),
        (1, 100),
    );
    b.opened = true;
    b.handshake_this_interval = Some(300.0);
    b.first_seen = at(0);
    let c = rec("10.0.0.1", 5353, "1.1.1.1", 53, "udp", (1, 80), (1, 120));
    let mut d = rec(
        "198.51.100.7",
        51000,
        "10.0.0.1",
        22,
        "tcp",
        (5, 500),
        (4, 400),
    );
    d.reset = true;
    let selfie = rec("10.0.0.1", 1, "127.0.0.1", 2, "tcp", (1, 1), (1, 1));
    let g = Graph::build(&[a, b, c, d, selfie], &r);

    let ids: Vec<&str> = g.endpoints.keys().map(|k| &**k).collect();
    assert_eq!(
        ids,
        vec![
            "ds1-flows.external-1.1.1.1",
            "ds1-flows.external-198.51.100.7",
            "ds1-flows.external-93.184.216.34",
            "ds1-flows.host-node-a"
        ]
    );
    let keys: Vec<(String, String, String, u16)> = g
        .edges
        .keys()
        .map(|k| {
            (
                k.client.to_string(),
                k.server.to_string(),
                k.protocol.to_string(),
                k.port,
            )
        })
        .collect();
    assert_eq!(
        keys,
        vec![
            (
                "ds1-flows.external-198.51.100.7".into(),
                "ds1-flows.host-node-a".into(),
                "tcp".into(),
                22
            ),
            (
                "ds1-flows.host-node-a".into(),
                "ds1-flows.external-1.1.1.1".into(),
                "udp".into(),
                53
            ),
            (
                "ds1-flows.host-node-a".into(),
                "ds1-flows.external-93.184.216.34".into(),
                "tcp".into(),
                443
            ),
        ]
    );
    let https = &g.edges[&EdgeKey {
        client: "ds1-flows.host-node-a".into(),
        server: "ds1-flows.external-93.184.216.34".into(),
        protocol: "tcp".into(),
        port: 443,
    }];
    assert_eq!(
        serde_json::to_value(https).unwrap(),
        json!({
            "protocol": "tcp", "port": 443,
            "connections_opened": 2, "connections_active": 2,
            "packets_client_to_server": 12, "bytes_client_to_server": 1200,
            "packets_server_to_client": 9, "bytes_server_to_client": 9100,
            "handshake": {"count": 2, "min_us": 100.0, "mean_us": 200.0, "max_us": 300.0},
            "tcp_resets": 0,
            "first_seen": "2027-01-15T08:00:00.000000Z",
            "last_seen": "2027-01-15T08:00:02.000000Z",
            "connections_attempted": 2,
            "connections_failed": {"refused": 0, "unanswered": 0, "unreachable": 0},
            "syn_retransmits": 0, "resets_client": 0, "resets_server": 0,
            "retransmits_client_to_server": 0, "retransmits_server_to_client": 0,
            "status": "NoStatus"
        })
    );
    let ssh = g.edges.values().find(|e| e.port == 22).unwrap();
    assert_eq!(
        (
            ssh.tcp_resets,
            ssh.connections_opened,
            ssh.handshake.is_none()
        ),
        (1, 0, true)
    );
}

#[test]
fn batch_encoding_is_exact() {
    let h = host();
    let r = ServerResolver {
        data_source_id: "ds1",
        host: &h,
    };
    let g = Graph::build(
        &[rec(
            "10.0.0.1",
            40000,
            "192.0.2.5",
            80,
            "tcp",
            (3, 300),
            (2, 2000),
        )],
        &r,
    );
    let mut src = FlowsSource::default_server();
    src.id = "ds1".into();
    src.name = "edge hosts".into();
    src.pairs = vec![
        ("interface_name".into(), "all".into()),
        ("crawl_interval".into(), "30s".into()),
        ("DB_Password".into(), "hunter2".into()),
        ("auth_token".into(), "t0k".into()),
        ("deployedAt".into(), "server".into()),
    ];
    let batch = encode(
        &g,
        &[r.host_endpoint()],
        &src,
        &["deployedat".to_string()],
        at(0),
        at(30),
    )
    .unwrap();
    let body = serde_json::to_string(&batch).unwrap();
    assert!(
        !body.contains("hunter2") && !body.contains("t0k"),
        "secrets never reach a payload"
    );
    assert!(body.starts_with("{\"cloud_crawl_data\":{\"data_source\":{\"data_source_info\":{\"name\":\"edge hosts\",\"desc\":\"\",\"type\":\"flows\"},\"data_source_id\":\"ds1\",\"data_source_config\":{\"value_pairs\":[{\"key\":\"interface_name\",\"value\":\"all\"},{\"key\":\"crawl_interval\",\"value\":\"30s\"}]}},\"crawled_data\":{\"data\":["));
    assert!(body.ends_with(
        "]},\"timestamp\":\"2027-01-15T08:00:30.000000000Z\",\"crawl_internal_id\":\"ds1\"}}"
    ));

    let back: Batch = serde_json::from_str(&body).unwrap();
    let data = &back.cloud_crawl_data.crawled_data.data;
    let summary: Vec<(&str, &str, &str)> = data
        .iter()
        .map(|e| (e.kind.as_str(), e.id.as_str(), e.name.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("flows.host", "ds1-flows.host-node-a", "node-a"),
            (
                "flows.external",
                "ds1-flows.external-192.0.2.5",
                "192.0.2.5"
            ),
            (
                "coordimap.relationship_skipinsert",
                "ds1-flows.host-node-a.ds1-flows.external-192.0.2.5",
                "ds1-flows.host-node-a.ds1-flows.external-192.0.2.5"
            ),
        ]
    );
    for e in data {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&e.data)
            .unwrap();
        assert_eq!(e.hash, hex_sha256(&bytes));
        assert_eq!(
            (e.is_json_data, e.version.as_str(), e.status.as_str()),
            (true, "", "NoStatus")
        );
        assert_eq!(e.retrieved_at, "2027-01-15T08:00:30.000000000Z");
    }
    let host_payload = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(&data[0].data)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        host_payload,
        r#"{"id":"ds1-flows.host-node-a","kind":"host","name":"node-a","addresses":["10.0.0.1"]}"#
    );
    let rel = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(&data[2].data)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        rel,
        concat!(
            r#"{"source_id":"ds1-flows.host-node-a","destination_id":"ds1-flows.external-192.0.2.5","#,
            r#""relationship_type":"coordimap.relationship_skipinsert","relation_type":104,"#,
            r#""interval_start":"2027-01-15T08:00:00.000000000Z","interval_end":"2027-01-15T08:00:30.000000000Z","#,
            r#""flows":[{"protocol":"tcp","port":80,"connections_opened":0,"connections_active":1,"#,
            r#""packets_client_to_server":3,"bytes_client_to_server":300,"packets_server_to_client":2,"#,
            r#""bytes_server_to_client":2000,"tcp_resets":0,"first_seen":"2027-01-15T08:00:01.000000Z","#,
            r#""last_seen":"2027-01-15T08:00:02.000000Z","connections_attempted":0,"#,
            r#""connections_failed":{"refused":0,"unanswered":0,"unreachable":0},"syn_retransmits":0,"#,
            r#""resets_client":0,"resets_server":0,"retransmits_client_to_server":0,"#,
            r#""retransmits_server_to_client":0,"status":"NoStatus"}]}"#
        )
    );
}

#[test]
fn the_same_element_is_sent_once_per_batch() {
    let h = host();
    let r = ServerResolver {
        data_source_id: "flows",
        host: &h,
    };
    let g = Graph::build(
        &[
            rec("10.0.0.1", 40000, "192.0.2.5", 80, "tcp", (1, 1), (1, 1)),
            rec("10.0.0.1", 40001, "192.0.2.5", 443, "tcp", (1, 1), (1, 1)),
            rec("192.0.2.5", 40001, "10.0.0.1", 8080, "tcp", (1, 1), (1, 1)),
        ],
        &r,
    );
    let b = encode(
        &g,
        &[r.host_endpoint(), r.host_endpoint()],
        &FlowsSource::default_server(),
        &[],
        at(0),
        at(1),
    )
    .unwrap();
    let ids: Vec<&str> = b
        .cloud_crawl_data
        .crawled_data
        .data
        .iter()
        .map(|e| e.id.as_str())
        .collect();
    assert_eq!(ids.len(), 4, "host, external, two directions: {ids:?}");
    let rel = b
        .cloud_crawl_data
        .crawled_data
        .data
        .iter()
        .find(|e| e.id == "flows-flows.host-node-a.flows-flows.external-192.0.2.5")
        .expect("outbound relationship");
    let payload: serde_json::Value = serde_json::from_slice(&rel.payload().unwrap()).unwrap();
    let ports: Vec<u64> = payload["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["port"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ports,
        vec![80, 443],
        "one relationship per endpoint pair, one flow entry per port"
    );
}

/// The body is written element by element without building each
/// `Element` (issue 16): it must be byte for byte the JSON of the batch
/// made of `each_element`'s elements, escapes included; and a capped
/// encoding gives the same bytes, or nothing past its cap.
#[test]
fn the_written_body_is_the_json_of_its_elements() {
    use flowmap::sinks::coordimap::{
        body_within, data_source_block, each_element, rfc3339, write_body, CloudCrawlData,
        CrawledData,
    };
    let h = HostView {
        hostname: "node-\"a\"\\\u{1}\u{e9}/\u{2028}".into(),
        ..host()
    };
    let r = ServerResolver {
        data_source_id: "ds\"1",
        host: &h,
    };
    let g = Graph::build(
        &[
            rec("10.0.0.1", 40000, "192.0.2.5", 80, "tcp", (3, 300), (2, 20)),
            rec("10.0.0.1", 40001, "192.0.2.5", 443, "tcp", (1, 1), (1, 1)),
            rec("192.0.2.5", 40001, "10.0.0.1", 8080, "udp", (1, 1), (0, 0)),
            rec(
                "10.0.0.1",
                40002,
                "2001:db8::7",
                53,
                "udp",
                (1, 60),
                (1, 90),
            ),
        ],
        &r,
    );
    let mut src = FlowsSource::default_server();
    src.id = "ds\"1".into();
    src.name = "edge \"hosts\"".into();
    let always = [r.host_endpoint()];
    let iv = (at(0), at(30));
    let mut body = Vec::new();
    let n = write_body(&mut body, &g, &always, &src, &[], iv).unwrap();
    let mut data = Vec::new();
    each_element(&g, &always, iv, |e| {
        data.push(e);
        Ok::<(), ()>(())
    })
    .unwrap();
    let batch = Batch {
        cloud_crawl_data: CloudCrawlData {
            data_source: data_source_block(&src, &[]),
            crawled_data: CrawledData { data },
            timestamp: rfc3339(at(30)),
            crawl_internal_id: src.id.clone(),
        },
    };
    assert_eq!(n, 6);
    assert_eq!(n, batch.cloud_crawl_data.crawled_data.data.len());
    let body = String::from_utf8(body).unwrap();
    assert_eq!(body, serde_json::to_string(&batch).unwrap());
    assert!(body.contains(r#"node-\"a\"\\\u0001"#), "{body}");
    let len = body.len();
    let (capped, m) = body_within(&g, &always, &src, &[], iv, len).unwrap();
    assert_eq!((String::from_utf8(capped).unwrap(), m), (body, n));
    assert_eq!(body_within(&g, &always, &src, &[], iv, len - 1), None);
}

/// Neighbour discovery and router solicitation (ICMPv6 between fe80::
/// addresses, or to ff02::) and broadcasts stay off the map, counted.
#[test]
fn link_scope_control_traffic_is_counted_not_drawn() {
    let h = host();
    let r = ServerResolver {
        data_source_id: "ds1",
        host: &h,
    };
    let records = vec![
        rec("fe80::1", 0, "fe80::2", 0, "icmpv6", (1, 86), (1, 78)),
        rec("fe80::1", 0, "ff02::2", 0, "icmpv6", (1, 70), (0, 0)),
        rec(
            "10.0.0.9",
            68,
            "255.255.255.255",
            67,
            "udp",
            (1, 342),
            (0, 0),
        ),
        rec(
            "2001:db8::9",
            0,
            "2001:db8::1",
            0,
            "icmpv6",
            (3, 300),
            (3, 300),
        ),
        rec("10.0.0.9", 5000, "10.0.0.1", 53, "udp", (2, 200), (2, 300)),
    ];
    let g = Graph::build(&records, &r);
    assert_eq!(g.link_control, 3);
    let edges: Vec<(&str, &str, &str, u16)> = g
        .edges
        .keys()
        .map(|k| (&*k.client, &*k.server, &*k.protocol, k.port))
        .collect();
    assert_eq!(
        edges,
        vec![
            (
                "ds1-flows.external-10.0.0.9",
                "ds1-flows.host-node-a",
                "udp",
                53
            ),
            (
                "ds1-flows.external-2001:db8::9",
                "ds1-flows.external-2001:db8::1",
                "icmpv6",
                0
            ),
        ]
    );
}
