//! `flowmap-bench scale store`: a fleet of agents writing into one real
//! PostgreSQL on this machine through the store's real write path
//! (`Store::write`, the call the agent's writer thread makes), then the
//! cluster map read over windows of 15 minutes, 1 hour and 24 hours (the
//! map page's read, `graph_bounded`, with the cluster rule).
//!
//! Synthetic rows: agent `a` is host `node-a` (10.a.a.1) with `edges`
//! TCP edges to distinct external servers, the same edges every interval.
//! Wall time is compressed: the intervals of `intervals × interval`
//! simulated seconds, ending now, are written as fast as the database
//! takes them, by `writers` connections; the rollups run every simulated
//! minute, as the agents' maintenance does.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use flowmap::enrich::host::HostView;
use flowmap::enrich::server::ServerResolver;
use flowmap::graph::Graph;
use flowmap::serve::view;
use flowmap::sinks::store::{self, unix_ms, Location, Store, Window};
use flowmap_testkit::postgres::Pg;

fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// One agent's interval graph: `edges` edges from its host.
fn agent_graph(a: u32, edges: u32) -> (Graph, flowmap::enrich::Endpoint) {
    let host = HostView {
        hostname: format!("node-{a}"),
        addrs: vec![format!("10.{}.{}.1", a / 250, a % 250).parse().unwrap()],
        ..Default::default()
    };
    let r = ServerResolver {
        data_source_id: "fleet",
        host: &host,
    };
    let now = SystemTime::now();
    let recs: Vec<_> = (0..edges)
        .map(|i| {
            let mut rec = flowmap_testkit::records::between(
                "tcp",
                (host.addrs[0], 40000),
                (
                    format!("172.{}.{}.{}", 16 + a % 16, (i / 250) % 250, i % 250 + 1)
                        .parse()
                        .unwrap(),
                    443 + (i % 7) as u16,
                ),
                now,
            );
            rec.src_to_dst.packets = 10 + i as u64;
            rec.src_to_dst.bytes = 1000 * (1 + i as u64);
            rec.dst_to_src.packets = 8;
            rec.dst_to_src.bytes = 4000;
            rec
        })
        .collect();
    let mut g = Graph::build(&recs, &r);
    flowmap::status::apply(&mut g, &Default::default());
    (g, r.host_endpoint())
}

pub fn store(
    agents: u32,
    edges: u32,
    intervals: u32,
    interval: Duration,
    writers: u32,
    queries: u32,
    out: &mut dyn Write,
) -> Result<()> {
    // FLOWMAP_BENCH_DATABASE: an empty database of one's own, kept after
    // the run (to look at its plans); else a private server, removed.
    let (_pg, cs) = match std::env::var("FLOWMAP_BENCH_DATABASE") {
        Ok(cs) if !cs.is_empty() => (None, cs),
        _ => {
            let pg = Pg::start("bench scale store").context("PostgreSQL is not installed")?;
            let cs = pg.connection_string();
            (Some(pg), cs)
        }
    };
    let loc = Location::Postgres(cs.clone());
    Store::open(&loc)?;
    let graphs: Arc<Vec<_>> = Arc::new((0..agents).map(|a| agent_graph(a, edges)).collect());
    let end = SystemTime::now();
    let start = end - interval * intervals;
    let lat: Arc<Mutex<Vec<f64>>> = Arc::default();
    let t0 = Instant::now();
    let writers = writers.clamp(1, agents.max(1));
    let mut last_maint = 0i64;
    let mut maint = Store::open(&loc)?;
    // Interval by interval (every agent's interval k, then k + 1), each
    // writer its share of the agents on a connection of its own.
    let mut conns: Vec<Store> = (0..writers)
        .map(|_| Store::open(&loc))
        .collect::<Result<_>>()?;
    // FLOWMAP_BENCH_READ_ONLY=1 with FLOWMAP_BENCH_DATABASE: the rows of an
    // earlier run (of the same options) are read again; nothing is written.
    let write = std::env::var("FLOWMAP_BENCH_READ_ONLY").as_deref() != Ok("1");
    for k in (0..intervals).filter(|_| write) {
        let t_end = start + interval * (k + 1);
        std::thread::scope(|sc| {
            for (w, st) in conns.iter_mut().enumerate() {
                let graphs = graphs.clone();
                let lat = lat.clone();
                sc.spawn(move || {
                    for a in (w as u32..agents).step_by(writers as usize) {
                        st.set_agent(store::Agent {
                            node: format!("node-{a}"),
                            instance_id: format!("bench-{a}"),
                        });
                        let (g, host) = &graphs[a as usize];
                        let t = Instant::now();
                        st.write(
                            "fleet",
                            t_end - interval,
                            t_end,
                            g,
                            std::slice::from_ref(host),
                        )
                        .expect("write");
                        if let Ok(mut l) = lat.lock() {
                            l.push(t.elapsed().as_secs_f64() * 1e3);
                        }
                    }
                });
            }
        });
        let sim = unix_ms(t_end);
        if sim - last_maint >= 60_000 {
            maint.maintain(sim, Duration::from_secs(7 * 86_400))?;
            last_maint = sim;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let rows = agents as u64 * edges as u64 * intervals as u64;
    let lat = lat.lock().map(|l| l.clone()).unwrap_or_default();
    writeln!(
        out,
        "bench scale store write agents={agents} edges_per_agent={edges} intervals={intervals} interval_s={} simulated_s={} edge_rows={rows} seconds={secs:.1} rows_per_s={:.0} intervals_per_s={:.1} p95_write_ms={:.1} p50_write_ms={:.1}",
        interval.as_secs(),
        (interval * intervals).as_secs(),
        rows as f64 / secs,
        (agents as u64 * intervals as u64) as f64 / secs,
        percentile(&lat, 0.95),
        percentile(&lat, 0.5),
    )?;
    let now_ms = unix_ms(SystemTime::now());
    // The maintenance as at the last interval written (simulated time):
    // the hours before it rolled, nothing expired that a window ending
    // with it reads.
    // (FLOWMAP_BENCH_READ_ONLY: as at the latest interval of the earlier
    // run, and its live rows made again from the bucket rows as the
    // writers had them then, since a maintenance at a later time moved
    // their cut past the windows read.)
    let sim_end = if write {
        unix_ms(end)
    } else {
        let mut c = postgres::Client::connect(&cs, postgres::NoTls)?;
        c.query_one(
            "SELECT CAST(COALESCE(MAX(interval_end_ms), 0) AS BIGINT) FROM crawl_runs",
            &[],
        )?
        .get(0)
    };
    maint.maintain(sim_end.max(last_maint), Duration::from_secs(7 * 86_400))?;
    if !write {
        maint.rebuild_live(sim_end - 2 * 86_400_000, &[])?;
    }
    let mut c = postgres::Client::connect(&cs, postgres::NoTls)?;
    // Size: the database, and each table's bytes per row (a partitioned
    // table's bytes are its partitions').
    c.batch_execute("VACUUM ANALYZE")?;
    let db: i64 = c
        .query_one("SELECT pg_database_size(current_database())", &[])?
        .get(0);
    let mut per_row = Vec::new();
    for t in [
        "edge_stats",
        "edge_rollup_5m",
        "edge_rollup_1h",
        "edge_keys",
        "edge_live",
        "crawl_runs",
        "elements",
    ] {
        let n: i64 = c
            .query_one(&format!("SELECT COUNT(*) FROM {t}"), &[])?
            .get(0);
        let b: i64 = c
            .query_one(
                &format!(
                    "SELECT CAST(pg_total_relation_size('{t}') + COALESCE((SELECT SUM(pg_total_relation_size(inhrelid))
                     FROM pg_inherits WHERE inhparent = '{t}'::regclass), 0) AS BIGINT)"
                ),
                &[],
            )?
            .get(0);
        let parts: i64 = c
            .query_one(
                &format!("SELECT COUNT(*) FROM pg_inherits WHERE inhparent = '{t}'::regclass"),
                &[],
            )?
            .get(0);
        writeln!(
            out,
            "bench scale store table name={t} rows={n} bytes={b} bytes_per_row={:.0} partitions={parts}",
            b as f64 / n.max(1) as f64
        )?;
        per_row.push((n, b));
    }
    // A day at steady state (7-day retention): interval rows for RAW_KEEP
    // plus the partition being filled, 5-minute rows for FIVE_KEEP plus
    // one partition, hourly rows for every hour, runs, keys, endpoints
    // and live rows once; by the measured bytes per row (the interval rows' where a
    // rollup table is still empty).
    let bpr = |i: usize| {
        let (n, b) = per_row[i];
        if n > 0 {
            b as f64 / n as f64
        } else {
            per_row[0].1 as f64 / per_row[0].0.max(1) as f64
        }
    };
    let fleet = agents as f64 * edges as f64;
    let iv = interval.as_secs_f64();
    let raw = fleet * (store::rollup::RAW_KEEP.as_secs_f64() + 900.0) / iv * bpr(0);
    let five = fleet * (store::rollup::FIVE_KEEP.as_secs_f64() + 3600.0) / 300.0 * bpr(1);
    let hourly_day = fleet * 24.0 * bpr(2);
    let runs_day = agents as f64 * 86_400.0 / iv * bpr(5);
    // Live rows: one per edge and span, kept in place (as measured).
    let live = per_row[4].1 as f64;
    let once = (per_row[3].1 + per_row[6].1) as f64 + live;
    writeln!(
        out,
        "bench scale store size db_bytes={db} steady_raw_bytes={raw:.0} steady_5m_bytes={five:.0} hourly_bytes_per_day={hourly_day:.0} runs_bytes_per_day={runs_day:.0} live_bytes={live:.0} keys_endpoints_and_live_bytes={once:.0} one_day_bytes={:.0} seven_days_bytes={:.0}",
        raw + five + hourly_day + runs_day + once,
        raw + five + 7.0 * (hourly_day + runs_day) + once,
    )?;
    // A day of hourly rows for the 24-hour window: the simulated span's
    // hours, copied back in time for the hours it does not cover (rows as
    // the maintenance rolls them; intervals of those hours as crawl runs).
    let span_h = (interval * intervals).as_secs().div_ceil(3600) as i64;
    if span_h < 24 {
        let hour = 3_600_000i64;
        let done = maint.rolled()?[1];
        let first: i64 = c
            .query_one(
                "SELECT CAST(COALESCE(MIN(interval_end_ms), 0) AS BIGINT) FROM edge_rollup_1h",
                &[],
            )?
            .get(0);
        // (Not again when an earlier run of FLOWMAP_BENCH_READ_ONLY did.)
        if first > 0 && first > now_ms - 23 * hour {
            let back = 24 - span_h;
            maint.make_partitions("edge_rollup_1h", first - (back + 1) * hour, first)?;
            for h in 1..=back {
                c.execute(
                    "INSERT INTO edge_rollup_1h SELECT interval_end_ms - $1, edge_id, first_seen_ms - $1, last_seen_ms - $1,
                     connections_opened, connections_active, packets_c2s, bytes_c2s, packets_s2c, bytes_s2c, handshake_count,
                     handshake_min_us, handshake_sum_us, handshake_max_us, tcp_resets, connections_attempted, failed_refused,
                     failed_unanswered, failed_unreachable, syn_retransmits, resets_client, resets_server, status_rank,
                     retrans_c2s, retrans_s2c, drops, srtt_samples, srtt_min_us, srtt_sum_us, srtt_max_us, last_end_ms - $1
                     FROM edge_rollup_1h WHERE interval_end_ms = $2",
                    &[&(h * hour), &first],
                )?;
            }
            c.execute(
                "INSERT INTO crawl_runs (data_source_id, interval_start_ms, interval_end_ms, endpoints, edges, node, instance_id)
                 SELECT data_source_id, interval_start_ms - h * 3600000, interval_end_ms - h * 3600000, endpoints, edges, node,
                 instance_id FROM crawl_runs, generate_series(1, CAST($1 AS BIGINT)) h WHERE interval_end_ms > CAST($2 AS BIGINT) - 3600000 AND interval_end_ms <= CAST($2 AS BIGINT)",
                &[&back, &first],
            )?;
            // The 24-hour live rows as the writers would have them after
            // that day (made again from the bucket rows, now with the
            // copied hours; the 15-minute and 1-hour rows are the writers').
            maint.rebuild_live(now_ms - 2 * 86_400_000, &[86_400_000])?;
            c.batch_execute("ANALYZE")?;
            writeln!(
                out,
                "bench scale store backfill hours={back} hourly_rolled_to_ms={done} note=hourly_rows_copied_back_for_the_24h_window"
            )?;
        }
    }
    let last: i64 = c
        .query_one(
            "SELECT CAST(COALESCE(MAX(interval_end_ms), 0) AS BIGINT) FROM crawl_runs",
            &[],
        )?
        .get(0);
    // The cluster map, as the page reads it.
    let mut s = Store::open(&loc)?;
    for (name, d) in [("15m", 900u64), ("1h", 3600), ("24h", 86_400)] {
        let mut ms = Vec::new();
        let mut n = 0;
        // The window that ends with the latest interval written (now,
        // unless FLOWMAP_BENCH_READ_ONLY reads an older run).
        let w = Window {
            from_ms: last - d as i64 * 1000,
            to_ms: i64::MAX,
            live: true,
        };
        let path = if s.reads_live(&w)? { "live" } else { "buckets" };
        for _ in 0..queries.max(1) {
            let t = Instant::now();
            let v = view::graph_bounded(&mut s, &w, &Default::default(), 5000)?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            n = v.edges.len();
        }
        writeln!(
            out,
            "bench scale store query window={name} path={path} runs={} edges={n} p95_ms={:.0} p50_ms={:.0} min_ms={:.0} max_ms={:.0}",
            ms.len(),
            percentile(&ms, 0.95),
            percentile(&ms, 0.5),
            percentile(&ms, 0.0),
            percentile(&ms, 1.0)
        )?;
    }
    Ok(())
}
