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
    let pg = Pg::start("bench scale store").context("PostgreSQL is not installed")?;
    let loc = Location::Postgres(pg.connection_string());
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
    for k in 0..intervals {
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
    maint.maintain(unix_ms(SystemTime::now()), Duration::from_secs(7 * 86_400))?;
    // Size: the database, and each table's bytes per row.
    let mut c = postgres::Client::connect(&pg.connection_string(), postgres::NoTls)?;
    c.batch_execute("VACUUM ANALYZE")?;
    let db: i64 = c
        .query_one("SELECT pg_database_size(current_database())", &[])?
        .get(0);
    let mut per_row = Vec::new();
    for t in [
        "edge_stats",
        "edge_rollup_5m",
        "edge_rollup_1h",
        "crawl_runs",
        "elements",
    ] {
        let n: i64 = c
            .query_one(&format!("SELECT COUNT(*) FROM {t}"), &[])?
            .get(0);
        let b: i64 = c
            .query_one(&format!("SELECT pg_total_relation_size('{t}')"), &[])?
            .get(0);
        writeln!(out, "bench scale store table name={t} rows={n} bytes={b}")?;
        per_row.push((t, n, b));
    }
    // A day at steady state (7-day retention): raw rows for RAW_KEEP, 5-minute
    // rows for FIVE_KEEP, hourly rows for every hour, by the measured bytes
    // per row (the raw table's where a rollup table is still empty).
    let raw_bpr = per_row[0].2 as f64 / per_row[0].1.max(1) as f64;
    let bpr = |i: usize| {
        if per_row[i].1 > 0 {
            per_row[i].2 as f64 / per_row[i].1 as f64
        } else {
            raw_bpr
        }
    };
    let fleet = agents as f64 * edges as f64;
    let per_interval = 86_400.0 / interval.as_secs_f64();
    let raw = fleet * store::rollup::RAW_KEEP.as_secs_f64() / interval.as_secs_f64() * raw_bpr;
    let five = fleet * store::rollup::FIVE_KEEP.as_secs_f64() / 300.0 * bpr(1);
    let hourly_day = fleet * 24.0 * bpr(2);
    let runs_day =
        agents as f64 * per_interval * (per_row[3].2 as f64 / per_row[3].1.max(1) as f64);
    writeln!(
        out,
        "bench scale store size db_bytes={db} raw_bytes_per_row={raw_bpr:.0} rollup_5m_bytes_per_row={:.0} rollup_1h_bytes_per_row={:.0} steady_raw_bytes={raw:.0} steady_5m_bytes={five:.0} hourly_bytes_per_day={hourly_day:.0} runs_bytes_per_day={runs_day:.0} seven_days_bytes={:.0}",
        bpr(1),
        bpr(2),
        raw + five + 7.0 * (hourly_day + runs_day),
    )?;
    // The cluster map, as the page reads it.
    let mut s = Store::open(&loc)?;
    for (name, d) in [("15m", 900u64), ("1h", 3600), ("24h", 86_400)] {
        let mut ms = Vec::new();
        let mut n = 0;
        for _ in 0..queries.max(1) {
            let t = Instant::now();
            let v = view::graph_bounded(
                &mut s,
                &Window::live(Duration::from_secs(d)),
                &Default::default(),
                5000,
            )?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            n = v.edges.len();
        }
        writeln!(
            out,
            "bench scale store query window={name} runs={} edges={n} p95_ms={:.0} p50_ms={:.0}",
            ms.len(),
            percentile(&ms, 0.95),
            percentile(&ms, 0.5)
        )?;
    }
    Ok(())
}
