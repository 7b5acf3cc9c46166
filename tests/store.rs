//! The local store on a real SQLite file and on a real PostgreSQL server:
//! migrations from an empty database, batches in, the exact graph out,
//! retention enforced, and the CLI views.

use std::net::IpAddr;

use flowmap::enrich::host::HostView;
use flowmap::enrich::server::ServerResolver;
use flowmap::flow::FlowRecord;
use flowmap::graph::Graph;
use flowmap::serve::view::{self, By, Filter};
use flowmap::sinks::store::{Location, Store};
use flowmap_testkit::records::{at, record};
use flowmap_testkit::tempdir::TempDir;

fn rec(
    dst: &str,
    dport: u16,
    proto: &'static str,
    c2s: u64,
    s2c: u64,
    t: u64,
    rtt: Option<f64>,
) -> FlowRecord {
    FlowRecord {
        last_seen: at(t + 5),
        handshake_rtt_us: rtt,
        opened: true,
        handshake_this_interval: rtt,
        ..record(
            proto,
            ("10.0.0.1", 40000),
            (dst, dport),
            t,
            (c2s / 100, c2s),
            (s2c / 100, s2c),
        )
    }
}

fn host() -> HostView {
    HostView {
        hostname: "node-a".into(),
        addrs: vec!["10.0.0.1".parse::<IpAddr>().unwrap()],
        ..Default::default()
    }
}

/// Three intervals of 30 s: two with HTTPS to one server, one with DNS.
fn fill(s: &mut Store) {
    let h = host();
    let r = ServerResolver {
        data_source_id: "ds",
        host: &h,
    };
    let intervals = [
        vec![
            rec("192.0.2.10", 443, "tcp", 1000, 50000, 0, Some(100.0)),
            rec("192.0.2.53", 53, "udp", 100, 300, 1, None),
        ],
        vec![rec("192.0.2.10", 443, "tcp", 2000, 70000, 31, Some(300.0))],
        vec![rec("192.0.2.10", 443, "tcp", 500, 500, 61, None)],
    ];
    for (i, recs) in intervals.iter().enumerate() {
        let g = Graph::build(recs, &r);
        let i = i as u64;
        s.write("ds", at(i * 30), at(i * 30 + 30), &g, &[r.host_endpoint()])
            .unwrap();
    }
}

fn check_store(loc: &Location) {
    let mut s = Store::open(loc).unwrap();
    assert_eq!(s.version().unwrap(), 3, "migrated from an empty database");
    fill(&mut s);
    assert_eq!(s.runs().unwrap(), 3);

    let edges = s.edges(at(0)).unwrap();
    assert_eq!(edges.len(), 2);
    let https = edges.iter().find(|e| e.port == 443).unwrap();
    assert_eq!(https.source, "ds-flows.host-node-a");
    assert_eq!(https.target, "ds-flows.external-192.0.2.10");
    assert_eq!(
        (
            https.connections_opened,
            https.connections_active,
            https.bytes_client_to_server,
            https.bytes_server_to_client
        ),
        (3, 3, 3500, 120500)
    );
    assert_eq!(
        (
            https.packets_client_to_server,
            https.packets_server_to_client
        ),
        (35, 1205)
    );
    assert_eq!(
        (
            https.handshake_count,
            https.handshake_min_us,
            https.handshake_mean_us,
            https.handshake_max_us
        ),
        (2, Some(100.0), Some(200.0), Some(300.0))
    );
    assert_eq!(
        (https.first_seen_ms, https.last_seen_ms),
        (1_800_000_000_000, 1_800_000_066_000)
    );
    // Only the intervals that ended at or after the window's start.
    let late = s.edges(at(60)).unwrap();
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].bytes_client_to_server, 2500);

    let nodes = s.nodes(at(0)).unwrap();
    let ids: Vec<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(
        ids,
        vec![
            "ds-flows.external-192.0.2.10",
            "ds-flows.external-192.0.2.53",
            "ds-flows.host-node-a"
        ]
    );
    assert_eq!(
        nodes[2].payload["addresses"],
        serde_json::json!(["10.0.0.1"])
    );
    assert_eq!(
        (nodes[0].first_seen_ms, nodes[0].last_seen_ms),
        (1_800_000_030_000, 1_800_000_090_000)
    );

    let (top, nodes) = view::top(&mut s, at(0), By::Bytes, 10).unwrap();
    assert_eq!(
        top.iter().map(|e| e.port).collect::<Vec<_>>(),
        vec![443, 53]
    );
    assert_eq!(
        view::top_table(&top, &nodes),
        "CLIENT                       SERVER                        PROTO/PORT    CONNS    PACKETS          BYTES     RTT_US  FAILED  RESETS   DROPS    SRTT_US STATUS\n\
         node-a                       192.0.2.10                       tcp/443        3       1240         124000      200.0       0       0       0          - NoStatus\n\
         node-a                       192.0.2.53                        udp/53        1          4            400          -       0       0       0          - NoStatus\n"
    );
    let v = view::graph(
        &mut s,
        at(0),
        &Filter {
            protocol: Some("udp".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        view::to_mermaid(&v),
        "flowchart LR\n  n0[\"192.0.2.53\"]\n  n1[\"node-a\"]\n  n1 -->|\"udp/53 400 B\"| n0\n"
    );
    let v = view::graph(
        &mut s,
        at(0),
        &Filter {
            q: Some("192.0.2.10".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        view::to_dot(&v),
        "digraph flowmap {\n  rankdir=LR;\n  \"ds-flows.external-192.0.2.10\" [label=\"192.0.2.10\", shape=ellipse];\n  \"ds-flows.host-node-a\" [label=\"node-a\", shape=box];\n  \"ds-flows.host-node-a\" -> \"ds-flows.external-192.0.2.10\" [label=\"tcp/443 124000 B\"];\n}\n"
    );

    // Retention: intervals that ended before 65 s go, and what was last seen then.
    assert_eq!(s.retain(at(65)).unwrap(), 2);
    assert_eq!(s.runs().unwrap(), 1);
    let edges = s.edges(at(0)).unwrap();
    assert_eq!(edges.len(), 1);
    assert_eq!(edges[0].bytes_client_to_server, 500);
    let ids: Vec<String> = s.nodes(at(0)).unwrap().into_iter().map(|n| n.id).collect();
    assert_eq!(
        ids,
        vec!["ds-flows.external-192.0.2.10", "ds-flows.host-node-a"]
    );
    drop(s);
    // Reopening does not migrate again.
    let mut s = Store::open(loc).unwrap();
    assert_eq!(s.version().unwrap(), 3);
    assert_eq!(s.runs().unwrap(), 1);
}

#[test]
fn sqlite_store() {
    let dir = TempDir::new("store");
    let loc = Location::Sqlite(dir.path().join("sub").join("flowmap.db"));
    check_store(&loc);
    // The store is the agent's alone: its directory 0700, the database and
    // its WAL 0600.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let sub = dir.path().join("sub");
    assert_eq!(mode(&sub), 0o700);
    assert_eq!(mode(&sub.join("flowmap.db")), 0o600);
    let open = Store::open(&loc).unwrap();
    assert_eq!(mode(&sub.join("flowmap.db-wal")), 0o600);
    drop(open);
}

#[test]
fn postgres_store() {
    if !flowmap_testkit::net::privileged("postgres_store") {
        return;
    }
    let Some(pg) = flowmap_testkit::postgres::Pg::start("postgres_store") else {
        return;
    };
    check_store(&Location::Postgres(pg.connection_string()));
}

#[test]
fn a_store_newer_than_flowmap_is_refused() {
    let dir = TempDir::new("store-new");
    let path = dir.path().join("f.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch("CREATE TABLE flowmap_schema (version INTEGER NOT NULL); INSERT INTO flowmap_schema VALUES (99);").unwrap();
    }
    let err = Store::open(&Location::Sqlite(path)).err().expect("refused");
    assert_eq!(
        format!("{err:#}"),
        "the store's schema version 99 is newer than this flowmap (3); use a newer flowmap"
    );
}

/// Version 1 of the schema (before edge health), as flowmap wrote it.
const SCHEMA_V1: &str = "
CREATE TABLE flowmap_schema (version INTEGER NOT NULL);
INSERT INTO flowmap_schema VALUES (1);
CREATE TABLE crawl_runs (id INTEGER PRIMARY KEY AUTOINCREMENT, data_source_id TEXT NOT NULL,
  interval_start_ms BIGINT NOT NULL, interval_end_ms BIGINT NOT NULL, endpoints BIGINT NOT NULL, edges BIGINT NOT NULL);
CREATE INDEX crawl_runs_end ON crawl_runs (interval_end_ms);
CREATE TABLE elements (id TEXT PRIMARY KEY, type TEXT NOT NULL, name TEXT NOT NULL, payload TEXT NOT NULL,
  first_seen_ms BIGINT NOT NULL, last_seen_ms BIGINT NOT NULL);
CREATE TABLE relationships (source_id TEXT NOT NULL, destination_id TEXT NOT NULL, first_seen_ms BIGINT NOT NULL,
  last_seen_ms BIGINT NOT NULL, PRIMARY KEY (source_id, destination_id));
CREATE TABLE edge_stats (run_id BIGINT NOT NULL REFERENCES crawl_runs(id) ON DELETE CASCADE,
  source_id TEXT NOT NULL, destination_id TEXT NOT NULL, protocol TEXT NOT NULL, port BIGINT NOT NULL,
  connections_opened BIGINT NOT NULL, connections_active BIGINT NOT NULL, packets_c2s BIGINT NOT NULL,
  bytes_c2s BIGINT NOT NULL, packets_s2c BIGINT NOT NULL, bytes_s2c BIGINT NOT NULL,
  handshake_count BIGINT NOT NULL, handshake_min_us DOUBLE PRECISION, handshake_mean_us DOUBLE PRECISION,
  handshake_max_us DOUBLE PRECISION, tcp_resets BIGINT NOT NULL, first_seen_ms BIGINT NOT NULL,
  last_seen_ms BIGINT NOT NULL);
CREATE INDEX edge_stats_run ON edge_stats (run_id);
INSERT INTO crawl_runs VALUES (1, 'ds', 1800000000000, 1800000030000, 2, 1);
INSERT INTO edge_stats VALUES (1, 'a', 'b', 'tcp', 443, 1, 1, 10, 1000, 8, 800, 0, NULL, NULL, NULL, 0,
  1800000000000, 1800000030000);
";

#[test]
fn a_version_1_store_is_migrated_and_keeps_its_rows() {
    let dir = TempDir::new("store-v1");
    let path = dir.path().join("f.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(SCHEMA_V1)
        .unwrap();
    let mut s = Store::open(&Location::Sqlite(path)).unwrap();
    assert_eq!(s.version().unwrap(), 3);
    let old = s.edges(at(0)).unwrap();
    assert_eq!(
        (old.len(), old[0].bytes(), &old[0].health),
        (1, 1800, &Default::default())
    );
    fill(&mut s);
    assert_eq!(s.runs().unwrap(), 4);
}

/// Issue 13's store part: an edge's kernel drops by reason and the smoothed
/// RTT of its connections are kept per interval and summed over a window;
/// `top` and `graph` show them.
fn check_drops_and_srtt(loc: &Location) {
    let mut s = Store::open(loc).unwrap();
    let h = host();
    let r = ServerResolver {
        data_source_id: "ds",
        host: &h,
    };
    let with = |t: u64, drops: &[(&str, u64)], srtt: Option<u32>| FlowRecord {
        drops: drops
            .iter()
            .map(|(k, v)| (std::sync::Arc::from(*k), *v))
            .collect(),
        srtt_us: srtt,
        ..rec("192.0.2.10", 443, "tcp", 1000, 2000, t, None)
    };
    let intervals = [
        vec![
            with(0, &[("NETFILTER_DROP", 3)], Some(100)),
            with(1, &[], Some(300)),
        ],
        vec![with(
            31,
            &[("NETFILTER_DROP", 2), ("TCP_CSUM", 1)],
            Some(800),
        )],
        vec![with(61, &[], None)],
    ];
    for (i, recs) in intervals.iter().enumerate() {
        let g = Graph::build(recs, &r);
        let i = i as u64;
        s.write("ds", at(i * 30), at(i * 30 + 30), &g, &[r.host_endpoint()])
            .unwrap();
    }
    let e = s.edges(at(0)).unwrap().remove(0);
    assert_eq!(
        serde_json::to_value(&e.health.drops).unwrap(),
        serde_json::json!({"NETFILTER_DROP": 5, "TCP_CSUM": 1})
    );
    let srtt = e.health.srtt_us.unwrap();
    assert_eq!(
        (srtt.samples, srtt.min, srtt.mean, srtt.max),
        (3, 100, 400.0, 800)
    );
    let v = serde_json::to_value(&e).unwrap();
    assert_eq!(
        v["drops"],
        serde_json::json!({"NETFILTER_DROP": 5, "TCP_CSUM": 1})
    );
    assert_eq!(
        v["srtt_us"],
        serde_json::json!({"samples": 3, "min": 100, "mean": 400.0, "max": 800})
    );
    // The last interval alone: neither.
    let late = s.edges(at(85)).unwrap().remove(0);
    assert_eq!((late.health.drops.len(), late.health.srtt_us), (0, None));
    let (top, nodes) = view::top(&mut s, at(0), By::Bytes, 10).unwrap();
    assert_eq!(
        view::top_table(&top, &nodes),
        "CLIENT                       SERVER                        PROTO/PORT    CONNS    PACKETS          BYTES     RTT_US  FAILED  RESETS   DROPS    SRTT_US STATUS\n\
         node-a                       192.0.2.10                       tcp/443        4        120          12000          -       0       0       6      400.0 NoStatus\n"
    );
    let v = view::graph(&mut s, at(0), &Filter::default()).unwrap();
    assert_eq!(
        view::to_mermaid(&v),
        "flowchart LR\n  n0[\"192.0.2.10\"]\n  n1[\"node-a\"]\n  n1 -->|\"tcp/443 12000 B, 6 dropped, srtt 400 us\"| n0\n"
    );
}

#[test]
fn sqlite_store_keeps_drops_and_srtt() {
    let dir = TempDir::new("store-health");
    check_drops_and_srtt(&Location::Sqlite(dir.path().join("f.db")));
}

#[test]
fn postgres_store_keeps_drops_and_srtt() {
    if !flowmap_testkit::net::privileged("postgres_store_keeps_drops_and_srtt") {
        return;
    }
    let Some(pg) = flowmap_testkit::postgres::Pg::start("postgres_store_keeps_drops_and_srtt")
    else {
        return;
    };
    check_drops_and_srtt(&Location::Postgres(pg.connection_string()));
}

/// Version 2 (edge health, before the agents' identity, drops and RTT).
#[test]
fn a_version_2_store_is_migrated_and_keeps_its_rows() {
    let dir = TempDir::new("store-v2");
    let path = dir.path().join("f.db");
    let v2 = SCHEMA_V1.replace("VALUES (1);", "VALUES (2);")
        + "ALTER TABLE edge_stats ADD COLUMN connections_attempted BIGINT NOT NULL DEFAULT 0;
ALTER TABLE edge_stats ADD COLUMN failed_refused BIGINT NOT NULL DEFAULT 0;
ALTER TABLE edge_stats ADD COLUMN failed_unanswered BIGINT NOT NULL DEFAULT 0;
ALTER TABLE edge_stats ADD COLUMN failed_unreachable BIGINT NOT NULL DEFAULT 0;
ALTER TABLE edge_stats ADD COLUMN syn_retransmits BIGINT NOT NULL DEFAULT 0;
ALTER TABLE edge_stats ADD COLUMN resets_client BIGINT NOT NULL DEFAULT 0;
ALTER TABLE edge_stats ADD COLUMN resets_server BIGINT NOT NULL DEFAULT 0;
ALTER TABLE edge_stats ADD COLUMN status_rank BIGINT NOT NULL DEFAULT 0;
ALTER TABLE edge_stats ADD COLUMN retrans_c2s BIGINT NOT NULL DEFAULT 0;
ALTER TABLE edge_stats ADD COLUMN retrans_s2c BIGINT NOT NULL DEFAULT 0;
UPDATE edge_stats SET failed_refused = 2, status_rank = 3;";
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(&v2)
        .unwrap();
    let mut s = Store::open(&Location::Sqlite(path)).unwrap();
    assert_eq!(s.version().unwrap(), 3);
    let old = s.edges(at(0)).unwrap();
    assert_eq!(old.len(), 1);
    assert_eq!(
        (
            old[0].bytes(),
            old[0].health.connections_failed.refused,
            old[0].health.status,
            old[0].last_interval_end_ms,
            old[0].node.as_str()
        ),
        (1800, 2, flowmap::status::Status::Red, 1_800_000_030_000, "")
    );
}

/// Rollups (issue 15): intervals every 10 minutes over 5 hours, then the
/// writer's maintenance: raw rows older than 2 h go once rolled up into
/// 5-minute and hourly rows, and windows of every length still read exact
/// totals at their grain.
fn check_rollups(loc: &Location) {
    use flowmap::sinks::store::{unix_ms, Window};
    use std::time::{Duration, SystemTime};
    let mut s = Store::open(loc).unwrap();
    let h = host();
    let r = ServerResolver {
        data_source_id: "ds",
        host: &h,
    };
    let now = SystemTime::now();
    let now_ms = unix_ms(now);
    for k in 0..31u64 {
        let end = now - Duration::from_secs(600 * k);
        let rec = FlowRecord {
            src_to_dst: flowmap::flow::Counters {
                packets: 10,
                bytes: 1000,
            },
            dst_to_src: flowmap::flow::Counters {
                packets: 1,
                bytes: 100,
            },
            drops: [(std::sync::Arc::from("NETFILTER_DROP"), 1)]
                .into_iter()
                .collect(),
            srtt_us: Some(100 + k as u32),
            ..flowmap_testkit::records::between(
                "tcp",
                ("10.0.0.1".parse().unwrap(), 40000),
                ("192.0.2.10".parse().unwrap(), 443),
                end - Duration::from_secs(10),
            )
        };
        let g = Graph::build(&[rec], &r);
        s.write(
            "ds",
            end - Duration::from_secs(30),
            end,
            &g,
            &[r.host_endpoint()],
        )
        .unwrap();
    }
    assert!(s.maintain(now_ms, Duration::from_secs(24 * 3600)).unwrap());
    let [five, hour] = s.rolled().unwrap();
    assert_eq!(five, (now_ms - 120_000).div_euclid(300_000) * 300_000);
    assert_eq!(hour, five.div_euclid(3_600_000) * 3_600_000);
    // (intervals, bytes, drops, srtt samples) of a window.
    let totals = |s: &mut Store, from_ms: i64, to_ms: i64| {
        let w = Window::between(from_ms, to_ms);
        let e = s.edges_in(&w, None).unwrap().0;
        assert_eq!(e.len(), 1, "{e:?}");
        let e = &e[0];
        (
            e.connections_active,
            e.bytes(),
            e.health.drops.values().sum::<u64>(),
            e.health.srtt_us.map(|s| s.samples).unwrap_or(0),
        )
    };
    let min = 60_000;
    // 15 minutes: raw rows, the intervals at now and now - 10 min.
    assert_eq!(totals(&mut s, now_ms - 15 * min, now_ms), (2, 2200, 2, 2));
    // 4 hours: 5-minute rows (raw rows past 2 h are gone), k = 0..=24.
    assert_eq!(
        totals(&mut s, now_ms - 240 * min, now_ms),
        (25, 27500, 25, 25)
    );
    // 12 hours: hourly rows, then 5-minute, then raw: every interval.
    assert_eq!(
        totals(&mut s, now_ms - 720 * min, now_ms),
        (31, 34100, 31, 31)
    );
    // An old window: its raw rows are gone, 5-minute rows remain (k = 28,
    // at now - 280 min, in the bucket that ends within 5 minutes after).
    assert_eq!(totals(&mut s, now_ms - 281 * min, now_ms - 275 * min).0, 1);
    // A second run changes nothing.
    assert!(s.maintain(now_ms, Duration::from_secs(24 * 3600)).unwrap());
    assert_eq!(
        totals(&mut s, now_ms - 720 * min, now_ms),
        (31, 34100, 31, 31)
    );
}

#[test]
fn sqlite_rollups() {
    let dir = TempDir::new("store-rollup");
    check_rollups(&Location::Sqlite(dir.path().join("f.db")));
}

#[test]
fn postgres_rollups() {
    if !flowmap_testkit::net::privileged("postgres_rollups") {
        return;
    }
    let Some(pg) = flowmap_testkit::postgres::Pg::start("postgres_rollups") else {
        return;
    };
    check_rollups(&Location::Postgres(pg.connection_string()));
}
