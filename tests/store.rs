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
    assert_eq!(s.version().unwrap(), 5, "migrated from an empty database");
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
    assert_eq!(s.version().unwrap(), 5);
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
        "the store's schema version 99 is newer than this flowmap (5); use a newer flowmap"
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
    assert_eq!(s.version().unwrap(), 5);
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
    let with = |t: u64, drops: &[(&str, u64)], srtt: Option<u32>| {
        FlowRecord {
            srtt_us: srtt,
            ..rec("192.0.2.10", 443, "tcp", 1000, 2000, t, None)
        }
        .with_drops(
            drops
                .iter()
                .map(|(k, v)| (std::sync::Arc::from(*k), *v))
                .collect(),
        )
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
    assert_eq!(s.version().unwrap(), 5);
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
/// writer's maintenance: interval rows older than 30 minutes go, 5-minute
/// rows (written with each interval) are rolled into hourly rows, and
/// windows of every length still read exact totals at their grain.
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
            srtt_us: Some(100 + k as u32),
            ..flowmap_testkit::records::between(
                "tcp",
                ("10.0.0.1".parse().unwrap(), 40000),
                ("192.0.2.10".parse().unwrap(), 443),
                end - Duration::from_secs(10),
            )
        }
        .with_drops(
            [(std::sync::Arc::from("NETFILTER_DROP"), 1)]
                .into_iter()
                .collect(),
        );
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
    // 15 minutes: 5-minute rows (written with each interval), the
    // intervals at now and now - 10 min.
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

/// Live rows (issue 15, schema version 5): the map's windows that end now
/// (15 minutes, 1 hour, 24 hours) are read from one row per edge and span,
/// and give exactly what the bucket rows give. Edge A every minute for 90
/// minutes, then one late interval and one after a restart (the writer's
/// cache empty); edge B 50 and 8 minutes ago (idle in the latest bucket:
/// summed from its bucket rows); edge D once, 70 minutes ago; a second
/// agent (node-c) with edge C every 5 minutes for 2 hours. Then the rows
/// of version 4 (no live rows) are migrated: the same windows, read live,
/// the same totals. Then a retention of 20 minutes: the live rows older
/// than it are deleted, the 15-minute window is still read live and the
/// same, the longer ones from the bucket rows.
fn check_live(loc: &Location, exec: &dyn Fn(&str), count: &dyn Fn(&str) -> i64) {
    use flowmap::sinks::store::{rollup, unix_ms, Window};
    use std::time::{Duration, SystemTime};
    let h = host();
    let r = ServerResolver {
        data_source_id: "ds",
        host: &h,
    };
    let now = SystemTime::now() - Duration::from_secs(1);
    let now_ms = unix_ms(now);
    let h2 = HostView {
        hostname: "node-c".into(),
        addrs: vec!["10.0.0.3".parse::<IpAddr>().unwrap()],
        ..Default::default()
    };
    let r2 = ServerResolver {
        data_source_id: "ds",
        host: &h2,
    };
    let flow = |src: &str, dst: &str, port: u16, c2s: u64, s2c: u64, end: SystemTime| FlowRecord {
        src_to_dst: flowmap::flow::Counters {
            packets: 10,
            bytes: c2s,
        },
        dst_to_src: flowmap::flow::Counters {
            packets: 1,
            bytes: s2c,
        },
        srtt_us: Some(200),
        ..flowmap_testkit::records::between(
            "tcp",
            (src.parse().unwrap(), 40000),
            (dst.parse().unwrap(), port),
            end - Duration::from_secs(10),
        )
    };
    let write = |s: &mut Store, end: SystemTime, b: bool, d: bool| {
        let mut recs = vec![flow("10.0.0.1", "192.0.2.10", 443, 1000, 100, end)];
        if b {
            recs.push(flow("10.0.0.1", "192.0.2.20", 80, 7000, 0, end));
        }
        if d {
            recs.push(flow("10.0.0.1", "192.0.2.40", 22, 20, 0, end));
        }
        let g = Graph::build(&recs, &r);
        s.write(
            "ds",
            end - Duration::from_secs(30),
            end,
            &g,
            &[r.host_endpoint()],
        )
        .unwrap();
    };
    let mut a_ends = Vec::new();
    let mut s = Store::open(loc).unwrap();
    for k in (0..90u64).rev() {
        let end = now - Duration::from_secs(60 * k + 30);
        write(&mut s, end, k == 50 || k == 8, k == 70);
        a_ends.push(unix_ms(end));
    }
    // The second agent.
    let mut c_ends = Vec::new();
    let mut s2 = Store::open(loc).unwrap();
    s2.set_agent(flowmap::sinks::store::Agent {
        node: "node-c".into(),
        instance_id: "c-1".into(),
    });
    for k in (0..24u64).rev() {
        let end = now - Duration::from_secs(300 * k + 45);
        let g = Graph::build(&[flow("10.0.0.3", "192.0.2.30", 8080, 50, 0, end)], &r2);
        s2.write(
            "ds",
            end - Duration::from_secs(30),
            end,
            &g,
            &[r2.host_endpoint()],
        )
        .unwrap();
        c_ends.push(unix_ms(end));
    }
    drop(s2);
    // Late: an interval of 20 minutes ago, after the others.
    let late = now - Duration::from_secs(20 * 60 + 15);
    write(&mut s, late, false, false);
    a_ends.push(unix_ms(late));
    drop(s);
    // A restarted writer (no cache).
    let mut s = Store::open(loc).unwrap();
    write(&mut s, now, false, false);
    a_ends.push(now_ms);
    assert!(s.maintain(now_ms, Duration::from_secs(7 * 86_400)).unwrap());
    let b_ends = [now_ms - 50 * 60_000 - 30_000, now_ms - 8 * 60_000 - 30_000];
    let d_ends = [now_ms - 70 * 60_000 - 30_000];
    // (edge's server, bytes) of a window, and the same from the bucket
    // rows (a window that ends later is not read live).
    let check = |s: &mut Store, len: u64, grain: i64| {
        // The window that ends with the last interval written.
        let w = Window {
            from_ms: now_ms - len as i64 * 1000,
            to_ms: i64::MAX,
            live: true,
        };
        assert!(s.reads_live(&w).unwrap(), "{len} s");
        let live = s.edges_in(&w, None).unwrap().0;
        let wide = Window {
            to_ms: unix_ms(SystemTime::now()) + 3_600_000,
            ..w
        };
        assert!(!s.reads_live(&wide).unwrap());
        assert_eq!(live, s.edges_in(&wide, None).unwrap().0, "{len} s");
        // Every interval in a bucket that ends at or after the start.
        let first = rollup::bucket(w.from_ms, grain);
        let n = |ends: &[i64]| {
            ends.iter()
                .filter(|e| rollup::bucket(**e, grain) >= first)
                .count() as u64
        };
        let got: Vec<(String, u64, u64)> = live
            .iter()
            .map(|e| {
                (
                    e.target.clone(),
                    e.bytes(),
                    e.health.srtt_us.map_or(0, |x| x.samples),
                )
            })
            .collect();
        let mut want = vec![(
            "ds-flows.external-192.0.2.10".to_string(),
            1100 * n(&a_ends),
            n(&a_ends),
        )];
        if n(&b_ends) > 0 {
            want.push((
                "ds-flows.external-192.0.2.20".to_string(),
                7000 * n(&b_ends),
                n(&b_ends),
            ));
        }
        want.push((
            "ds-flows.external-192.0.2.30".to_string(),
            50 * n(&c_ends),
            n(&c_ends),
        ));
        if n(&d_ends) > 0 {
            want.push((
                "ds-flows.external-192.0.2.40".to_string(),
                20 * n(&d_ends),
                n(&d_ends),
            ));
        }
        assert_eq!(got, want, "{len} s");
        // The busiest k (the live read's narrow top, with the edges of
        // rows of another bucket), and whether there were more.
        for k in 1..=live.len() + 1 {
            let (top, more) = s.edges_in(&w, Some(k)).unwrap();
            assert_eq!(top, live[..k.min(live.len())], "{len} s, {k}");
            assert_eq!(more, k < live.len(), "{len} s, {k}");
        }
        n(&a_ends)
    };
    let spans = |s: &mut Store| {
        [
            check(s, 900, 300_000),
            check(s, 3600, 300_000),
            check(s, 86_400, 3_600_000),
        ]
    };
    let counts = spans(&mut s);
    // 15 minutes: 3 or 4 buckets, 15 to 20 intervals plus the late one;
    // a day: every interval.
    assert!((16..=21).contains(&counts[0]), "{counts:?}");
    assert_eq!(counts[2], 92);
    // Not live: a 5-minute window (interval rows), an older window.
    assert!(!s
        .reads_live(&Window {
            from_ms: now_ms - 300_000,
            to_ms: i64::MAX,
            live: true
        })
        .unwrap());
    assert!(!s
        .reads_live(&Window::since(now - Duration::from_secs(7200)))
        .unwrap());
    drop(s);
    // Version 4: no live rows; migrated, the same.
    exec(TO_V4);
    let mut s = Store::open(loc).unwrap();
    assert_eq!(s.version().unwrap(), 5);
    assert_eq!(spans(&mut s), counts);
    // Retention: 20 minutes.
    let cut = now_ms - 20 * 60_000;
    let old = format!("SELECT COUNT(*) FROM edge_live WHERE gen_ms < {cut}");
    assert!(count(&old) > 0);
    assert!(s.maintain(now_ms, Duration::from_secs(20 * 60)).unwrap());
    assert_eq!(count(&old), 0);
    assert_eq!(check(&mut s, 900, 300_000), counts[0]);
    for len in [3600, 86_400] {
        assert!(!s
            .reads_live(&Window {
                from_ms: now_ms - len * 1000,
                to_ms: i64::MAX,
                live: true
            })
            .unwrap());
    }
    // An agent still on version 4 (a fleet being upgraded) writes an
    // interval with a new edge and no live rows: what such an agent leaves
    // is made here from a version 5 write, its live rows taken away. The
    // live window is then read from the buckets, with that edge.
    let w = Window {
        from_ms: now_ms - 900_000,
        to_ms: i64::MAX,
        live: true,
    };
    assert!(s.reads_live(&w).unwrap());
    let g = Graph::build(&[flow("10.0.0.3", "192.0.2.50", 443, 900, 100, now)], &r2);
    let mut s2 = Store::open(loc).unwrap();
    s2.set_agent(flowmap::sinks::store::Agent {
        node: "node-c".into(),
        instance_id: "c-2".into(),
    });
    s2.write(
        "ds",
        now - Duration::from_secs(30),
        now,
        &g,
        &[r2.host_endpoint()],
    )
    .unwrap();
    drop(s2);
    exec(&format!(
        "DELETE FROM edge_live WHERE edge_id IN (SELECT id FROM edge_keys WHERE destination_id = 'ds-flows.external-192.0.2.50');
UPDATE crawl_runs SET live_rows = 0 WHERE node = 'node-c' AND interval_end_ms = {now_ms};"
    ));
    assert!(!s.reads_live(&w).unwrap());
    let got: Vec<(String, u64)> = s
        .edges_in(&w, None)
        .unwrap()
        .0
        .iter()
        .map(|e| (e.target.clone(), e.bytes()))
        .filter(|(t, _)| t.ends_with("192.0.2.50"))
        .collect();
    assert_eq!(got, [("ds-flows.external-192.0.2.50".to_string(), 1000)]);
}

const TO_V4: &str = "DROP TABLE edge_live; DROP INDEX edge_rollup_1h_edge; DROP INDEX crawl_runs_without_live;
ALTER TABLE crawl_runs DROP COLUMN live_rows;
DELETE FROM flowmap_schema WHERE version = 5; DELETE FROM flowmap_rollups WHERE grain LIKE 'edge_live_%';";

#[test]
fn sqlite_live_rows() {
    let dir = TempDir::new("store-live");
    let path = dir.path().join("f.db");
    check_live(
        &Location::Sqlite(path.clone()),
        &|sql| {
            rusqlite::Connection::open(&path)
                .unwrap()
                .execute_batch(sql)
                .unwrap()
        },
        &|sql| {
            rusqlite::Connection::open(&path)
                .unwrap()
                .query_row(sql, [], |r| r.get(0))
                .unwrap()
        },
    );
}

#[test]
fn postgres_live_rows() {
    if !flowmap_testkit::net::privileged("postgres_live_rows") {
        return;
    }
    let Some(pg) = flowmap_testkit::postgres::Pg::start("postgres_live_rows") else {
        return;
    };
    let cs = pg.connection_string();
    check_live(
        &Location::Postgres(cs.clone()),
        &|sql| {
            postgres::Client::connect(&cs, postgres::NoTls)
                .unwrap()
                .batch_execute(sql)
                .unwrap()
        },
        &|sql| {
            postgres::Client::connect(&cs, postgres::NoTls)
                .unwrap()
                .query_one(sql, &[])
                .unwrap()
                .get(0)
        },
    );
}

/// Version 3 (the agents' identity, drops and RTT; rollups with text
/// columns per row), as flowmap wrote it, on top of version 2.
fn schema_v3() -> String {
    let rollup = |t: &str| {
        format!(
            "CREATE TABLE {t} (
  source_id TEXT NOT NULL, destination_id TEXT NOT NULL, protocol TEXT NOT NULL, port BIGINT NOT NULL,
  node TEXT NOT NULL, client_node TEXT NOT NULL, server_node TEXT NOT NULL, interval_end_ms BIGINT NOT NULL,
  connections_opened BIGINT NOT NULL, connections_active BIGINT NOT NULL, packets_c2s BIGINT NOT NULL,
  bytes_c2s BIGINT NOT NULL, packets_s2c BIGINT NOT NULL, bytes_s2c BIGINT NOT NULL, handshake_count BIGINT NOT NULL,
  handshake_min_us DOUBLE PRECISION, handshake_mean_us DOUBLE PRECISION, handshake_max_us DOUBLE PRECISION,
  tcp_resets BIGINT NOT NULL, first_seen_ms BIGINT NOT NULL, last_seen_ms BIGINT NOT NULL,
  connections_attempted BIGINT NOT NULL, failed_refused BIGINT NOT NULL, failed_unanswered BIGINT NOT NULL,
  failed_unreachable BIGINT NOT NULL, syn_retransmits BIGINT NOT NULL, resets_client BIGINT NOT NULL,
  resets_server BIGINT NOT NULL, status_rank BIGINT NOT NULL, retrans_c2s BIGINT NOT NULL, retrans_s2c BIGINT NOT NULL,
  drops TEXT NOT NULL, srtt_samples BIGINT NOT NULL, srtt_min_us DOUBLE PRECISION, srtt_mean_us DOUBLE PRECISION,
  srtt_max_us DOUBLE PRECISION
);
CREATE INDEX {t}_end ON {t} (interval_end_ms);
"
        )
    };
    let mut v = SCHEMA_V1.replace("VALUES (1);", "VALUES (3);");
    for c in [
        "connections_attempted",
        "failed_refused",
        "failed_unanswered",
        "failed_unreachable",
        "syn_retransmits",
        "resets_client",
        "resets_server",
        "status_rank",
        "retrans_c2s",
        "retrans_s2c",
    ] {
        v += &format!("ALTER TABLE edge_stats ADD COLUMN {c} BIGINT NOT NULL DEFAULT 0;\n");
    }
    v += "
ALTER TABLE crawl_runs ADD COLUMN node TEXT NOT NULL DEFAULT '';
ALTER TABLE crawl_runs ADD COLUMN instance_id TEXT NOT NULL DEFAULT '';
ALTER TABLE elements ADD COLUMN node TEXT NOT NULL DEFAULT '';
ALTER TABLE edge_stats ADD COLUMN node TEXT NOT NULL DEFAULT '';
ALTER TABLE edge_stats ADD COLUMN client_node TEXT NOT NULL DEFAULT '';
ALTER TABLE edge_stats ADD COLUMN server_node TEXT NOT NULL DEFAULT '';
ALTER TABLE edge_stats ADD COLUMN interval_end_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE edge_stats ADD COLUMN drops TEXT NOT NULL DEFAULT '';
ALTER TABLE edge_stats ADD COLUMN srtt_samples BIGINT NOT NULL DEFAULT 0;
ALTER TABLE edge_stats ADD COLUMN srtt_min_us DOUBLE PRECISION;
ALTER TABLE edge_stats ADD COLUMN srtt_mean_us DOUBLE PRECISION;
ALTER TABLE edge_stats ADD COLUMN srtt_max_us DOUBLE PRECISION;
UPDATE edge_stats SET interval_end_ms = (SELECT r.interval_end_ms FROM crawl_runs r WHERE r.id = edge_stats.run_id);
CREATE INDEX edge_stats_end ON edge_stats (interval_end_ms);
CREATE INDEX crawl_runs_node ON crawl_runs (node, interval_end_ms);
CREATE INDEX elements_seen ON elements (last_seen_ms);
CREATE TABLE flowmap_rollups (grain TEXT PRIMARY KEY, done_ms BIGINT NOT NULL);
";
    v += &rollup("edge_rollup_5m");
    v += &rollup("edge_rollup_1h");
    // A second node's interval with handshakes, drops and RTT; a 5-minute
    // row and an hourly row rolled before the intervals kept.
    v += "
INSERT INTO crawl_runs VALUES (2, 'ds', 1800000030000, 1800000060000, 2, 1, 'n2', 'i2');
INSERT INTO edge_stats (run_id, source_id, destination_id, protocol, port, connections_opened, connections_active,
  packets_c2s, bytes_c2s, packets_s2c, bytes_s2c, handshake_count, handshake_min_us, handshake_mean_us,
  handshake_max_us, tcp_resets, first_seen_ms, last_seen_ms, node, interval_end_ms, drops, srtt_samples,
  srtt_min_us, srtt_mean_us, srtt_max_us)
VALUES (2, 'c', 'd', 'tcp', 80, 1, 1, 5, 500, 4, 400, 2, 200, 300, 400, 0, 1800000031000, 1800000059000,
  'n2', 1800000060000, '{\"NETFILTER_DROP\":2}', 2, 100, 150, 200);
INSERT INTO edge_rollup_5m VALUES ('a', 'b', 'tcp', 443, '', '', '', 1799999700000, 1, 1, 1, 100, 0, 0, 0,
  NULL, NULL, NULL, 0, 1799999500000, 1799999600000, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, '', 0, NULL, NULL, NULL);
INSERT INTO edge_rollup_1h VALUES ('a', 'b', 'tcp', 443, '', '', '', 1799996400000, 2, 2, 20, 10000, 0, 0, 0,
  NULL, NULL, NULL, 0, 1799993000000, 1799996000000, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, '', 0, NULL, NULL, NULL);
INSERT INTO flowmap_rollups VALUES ('edge_rollup_5m', 1799999700000), ('edge_rollup_1h', 1799996400000);
";
    v
}

/// Version 3 to 4 (edges interned, rows of numbers, 5-minute rows written
/// with each interval): every interval row, 5-minute row and hourly row is
/// kept, and windows read at each grain give the version 3 totals.
fn check_v3_migration(s: &mut Store) {
    use flowmap::sinks::store::Window;
    assert_eq!(s.version().unwrap(), 5);
    let edges = |s: &mut Store, from_ms: i64, to_ms: i64| {
        let mut e = s
            .edges_in(&Window::between(from_ms, to_ms), None)
            .unwrap()
            .0;
        e.sort_by(|a, b| a.source.cmp(&b.source));
        e
    };
    // A minute: the interval rows.
    let e = edges(s, 1_800_000_000_000, 1_800_000_060_000);
    assert_eq!(
        e.iter()
            .map(|e| (
                e.source.as_str(),
                e.node.as_str(),
                e.bytes(),
                e.last_interval_end_ms
            ))
            .collect::<Vec<_>>(),
        vec![
            ("a", "", 1800, 1_800_000_030_000),
            ("c", "n2", 900, 1_800_000_060_000)
        ]
    );
    let d = &e[1];
    assert_eq!(
        (
            d.handshake_count,
            d.handshake_min_us,
            d.handshake_mean_us,
            d.handshake_max_us
        ),
        (2, Some(200.0), Some(300.0), Some(400.0))
    );
    assert_eq!(
        serde_json::to_value(&d.health.drops).unwrap(),
        serde_json::json!({"NETFILTER_DROP": 2})
    );
    let srtt = d.health.srtt_us.unwrap();
    assert_eq!(
        (srtt.samples, srtt.min, srtt.mean, srtt.max),
        (2, 100, 150.0, 200)
    );
    assert_eq!(
        (d.first_seen_ms, d.last_seen_ms),
        (1_800_000_031_000, 1_800_000_059_000)
    );
    // 11 minutes: 5-minute rows, the old one and the intervals' bucket.
    let e = edges(s, 1_799_999_400_000, 1_800_000_060_000);
    assert_eq!(
        e.iter()
            .map(|e| (e.source.as_str(), e.bytes(), e.connections_opened))
            .collect::<Vec<_>>(),
        vec![("a", 1900, 2), ("c", 900, 1)]
    );
    assert_eq!(e[1].health.srtt_us.unwrap().mean, 150.0);
    // 10 hours: the hourly row, then 5-minute rows.
    let e = edges(s, 1_800_000_060_000 - 36_000_000, 1_800_000_060_000);
    assert_eq!(
        e.iter()
            .map(|e| (e.source.as_str(), e.bytes(), e.connections_opened))
            .collect::<Vec<_>>(),
        vec![("a", 11900, 4), ("c", 900, 1)]
    );
    assert_eq!(s.runs().unwrap(), 2);
    fill(s);
    assert_eq!(s.runs().unwrap(), 5);
    let e = s.edges(at(0)).unwrap();
    assert_eq!(e.len(), 4);
}

#[test]
fn a_version_3_store_is_migrated_and_keeps_its_rows() {
    let dir = TempDir::new("store-v3");
    let path = dir.path().join("f.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(&schema_v3())
        .unwrap();
    let mut s = Store::open(&Location::Sqlite(path.clone())).unwrap();
    check_v3_migration(&mut s);
    drop(s);
    // The version 3 tables are gone.
    let c = rusqlite::Connection::open(&path).unwrap();
    let mut tables: Vec<String> = c
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    tables.sort();
    assert_eq!(
        tables,
        [
            "crawl_runs",
            "edge_keys",
            "edge_live",
            "edge_rollup_1h",
            "edge_rollup_5m",
            "edge_stats",
            "elements",
            "flowmap_rollups",
            "flowmap_schema"
        ]
    );
}

#[test]
fn a_version_3_postgres_store_is_migrated_and_keeps_its_rows() {
    if !flowmap_testkit::net::privileged(
        "a_version_3_postgres_store_is_migrated_and_keeps_its_rows",
    ) {
        return;
    }
    let Some(pg) = flowmap_testkit::postgres::Pg::start("a_version_3_postgres_store_is_migrated")
    else {
        return;
    };
    let mut c = postgres::Client::connect(&pg.connection_string(), postgres::NoTls).unwrap();
    c.batch_execute(
        &(schema_v3().replace(
            "id INTEGER PRIMARY KEY AUTOINCREMENT",
            "id BIGSERIAL PRIMARY KEY",
        ) + "SELECT setval('crawl_runs_id_seq', 2);"),
    )
    .unwrap();
    let mut s = Store::open(&Location::Postgres(pg.connection_string())).unwrap();
    check_v3_migration(&mut s);
    // Each table's rows in their time partitions.
    let parts: Vec<String> = c
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'edge_rollup_1h' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(parts, ["edge_rollup_1h_p1799971200"]);
}

/// PostgreSQL time partitions (issue 15): rows of two days; when the first
/// day expires its partitions are dropped whole (gone from pg_inherits and
/// pg_class), and the second day's rows are all still there.
#[test]
fn postgres_expired_partitions_are_dropped_whole() {
    use flowmap::sinks::store::unix_ms;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};
    if !flowmap_testkit::net::privileged("postgres_expired_partitions_are_dropped_whole") {
        return;
    }
    let Some(pg) = flowmap_testkit::postgres::Pg::start("postgres_expired_partitions") else {
        return;
    };
    let mut s = Store::open(&Location::Postgres(pg.connection_string())).unwrap();
    let mut c = postgres::Client::connect(&pg.connection_string(), postgres::NoTls).unwrap();
    let h = host();
    let r = ServerResolver {
        data_source_id: "ds",
        host: &h,
    };
    const DAY: i64 = 86_400_000;
    const HOUR: i64 = 3_600_000;
    let day = unix_ms(SystemTime::now()).div_euclid(DAY) * DAY;
    let t = |ms: i64| UNIX_EPOCH + Duration::from_millis(ms as u64);
    // One interval an hour after yesterday's start, one after today's.
    for (end, bytes) in [(day - DAY + HOUR, 1000), (day + HOUR, 3000)] {
        let rec = FlowRecord {
            src_to_dst: flowmap::flow::Counters { packets: 10, bytes },
            ..flowmap_testkit::records::between(
                "tcp",
                ("10.0.0.1".parse().unwrap(), 40000),
                ("192.0.2.10".parse().unwrap(), 443),
                t(end - 10_000),
            )
        };
        let g = Graph::build(&[rec], &r);
        s.write("ds", t(end - 30_000), t(end), &g, &[r.host_endpoint()])
            .unwrap();
    }
    let parts = |c: &mut postgres::Client, table: &str| -> Vec<String> {
        c.query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = $1 ORDER BY 1",
            &[&table],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    let rows = |c: &mut postgres::Client, table: &str| -> (i64, i64) {
        let r = c
            .query_one(
                &format!(
                    "SELECT COUNT(*), CAST(COALESCE(SUM(bytes_c2s), 0) AS BIGINT) FROM {table}"
                ),
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    let name = |table: &str, start_ms: i64| format!("{table}_p{}", start_ms / 1000);
    // The maintenance of yesterday, 3 hours in: yesterday's hour is rolled
    // into yesterday's partition of hourly rows.
    assert!(s
        .maintain(day - DAY + 3 * HOUR, Duration::from_secs(2 * 86_400))
        .unwrap());
    assert!(parts(&mut c, "edge_rollup_1h").contains(&name("edge_rollup_1h", day - DAY)));
    assert!(parts(&mut c, "edge_rollup_5m").contains(&name("edge_rollup_5m", day - DAY + HOUR)));
    assert_eq!(rows(&mut c, "edge_rollup_1h"), (1, 1000));
    // Today, 2 hours in, with a retention of 2 hours: yesterday expired.
    assert!(s
        .maintain(day + 2 * HOUR, Duration::from_secs(2 * 3600))
        .unwrap());
    for (table, old) in [
        ("edge_stats", day - DAY + HOUR),
        ("edge_rollup_5m", day - DAY + HOUR),
        ("edge_rollup_1h", day - DAY),
    ] {
        let left = parts(&mut c, table);
        assert!(!left.is_empty(), "{table}");
        for p in &left {
            let start: i64 = p.rsplit_once("_p").unwrap().1.parse().unwrap();
            assert!(
                start * 1000 >= day,
                "{table}: {p} should have been dropped: {left:?}"
            );
        }
        let gone: i64 = c
            .query_one(
                "SELECT COUNT(*) FROM pg_class WHERE relname = $1",
                &[&name(table, old)],
            )
            .unwrap()
            .get(0);
        assert_eq!(gone, 0, "{table}");
    }
    // Today's rows, whole: its 5-minute row and its hour rolled.
    assert_eq!(rows(&mut c, "edge_rollup_5m"), (1, 3000));
    assert_eq!(rows(&mut c, "edge_rollup_1h"), (1, 3000));
    assert!(parts(&mut c, "edge_rollup_1h").contains(&name("edge_rollup_1h", day)));
}
