//! The edge rows at three grains, and retention at fleet scale (schema
//! version 4):
//!
//! - `edge_keys`: one row per (client, server, protocol, port, node): the
//!   edge's text once, and the integer key every statistics row carries.
//! - `edge_stats`: each interval's numbers per edge key (a zero counter is
//!   stored as NULL, which takes no room), kept `RAW_KEEP`.
//! - `edge_rollup_5m`: the same numbers per 5-minute bucket, added up by
//!   the writer in the transaction that writes the interval (an upsert per
//!   edge: the latest minutes are always there), kept `FIVE_KEEP`.
//! - `edge_rollup_1h`: hourly rows, rolled from finished 5-minute buckets
//!   (ended `LAG` ago, for intervals still queued) by the maintenance every
//!   minute; `flowmap_rollups` keeps how far. Kept for the whole retention.
//!
//! A bucket's row has the bucket's end as `interval_end_ms` and the end of
//! its latest interval as `last_end_ms`. A window of at most `RAW_MAX` is
//! read from the interval rows, exactly; one of at most `FIVE_MAX` from
//! 5-minute rows; a longer one (or one older than the finer grain keeps)
//! from hourly rows, then 5-minute rows after the last hour rolled. A
//! window read from buckets takes every bucket that overlaps it.
//!
//! On PostgreSQL the three tables are partitioned by time (partition.rs):
//! expired partitions are dropped whole. On PostgreSQL one agent at a time
//! maintains (an advisory lock tried, not waited for): a fleet of agents
//! shares one store.

use std::time::Duration;

use anyhow::Result;

use super::{Conn, Store, Val, Window};

/// The grains rolled up: table, bucket length (ms).
pub const GRAINS: [(&str, i64); 2] = [("edge_rollup_5m", 300_000), ("edge_rollup_1h", 3_600_000)];
/// How long each grain's rows are kept (no longer than the retention;
/// hourly rows for all of it).
pub const RAW_KEEP: Duration = Duration::from_secs(30 * 60);
pub const FIVE_KEEP: Duration = Duration::from_secs(6 * 3600);
/// Windows up to this long read interval rows; up to FIVE_MAX, 5-minute rows.
pub const RAW_MAX: Duration = Duration::from_secs(5 * 60);
pub const FIVE_MAX: Duration = Duration::from_secs(6 * 3600);
/// A 5-minute bucket is rolled into its hour this long after it ended
/// (intervals arrive late).
pub const LAG: Duration = Duration::from_secs(120);
/// A writer refreshes an edge key's `last_seen_ms` at least this often;
/// keys unused this long past the retention are deleted.
pub const KEY_REFRESH_MS: i64 = 3_600_000;

/// The maintenance lock: one agent of a fleet at a time.
const MAINT_LOCK: i64 = 0x0066_6c6f_776d_6171;

/// How a column of an edge row adds up over intervals.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Agg {
    Sum,
    Min,
    Max,
    /// Text joined by `;` (each interval's drops).
    Concat,
}

/// The numbers of an edge row (after `interval_end_ms, edge_id`), in the
/// order the writer binds them: name, SQL type, how it adds up.
pub const METRICS: &[(&str, &str, Agg)] = &[
    ("first_seen_ms", "BIGINT NOT NULL", Agg::Min),
    ("last_seen_ms", "BIGINT NOT NULL", Agg::Max),
    ("connections_opened", "BIGINT", Agg::Sum),
    ("connections_active", "BIGINT", Agg::Sum),
    ("packets_c2s", "BIGINT", Agg::Sum),
    ("bytes_c2s", "BIGINT", Agg::Sum),
    ("packets_s2c", "BIGINT", Agg::Sum),
    ("bytes_s2c", "BIGINT", Agg::Sum),
    ("handshake_count", "BIGINT", Agg::Sum),
    ("handshake_min_us", "DOUBLE PRECISION", Agg::Min),
    // The handshakes' mean times their count (a window's mean is the sum
    // of these over the sum of the counts).
    ("handshake_sum_us", "DOUBLE PRECISION", Agg::Sum),
    ("handshake_max_us", "DOUBLE PRECISION", Agg::Max),
    ("tcp_resets", "BIGINT", Agg::Sum),
    ("connections_attempted", "BIGINT", Agg::Sum),
    ("failed_refused", "BIGINT", Agg::Sum),
    ("failed_unanswered", "BIGINT", Agg::Sum),
    ("failed_unreachable", "BIGINT", Agg::Sum),
    ("syn_retransmits", "BIGINT", Agg::Sum),
    ("resets_client", "BIGINT", Agg::Sum),
    ("resets_server", "BIGINT", Agg::Sum),
    ("status_rank", "BIGINT", Agg::Max),
    ("retrans_c2s", "BIGINT", Agg::Sum),
    ("retrans_s2c", "BIGINT", Agg::Sum),
    ("drops", "TEXT", Agg::Concat),
    ("srtt_samples", "BIGINT", Agg::Sum),
    ("srtt_min_us", "DOUBLE PRECISION", Agg::Min),
    ("srtt_sum_us", "DOUBLE PRECISION", Agg::Sum),
    ("srtt_max_us", "DOUBLE PRECISION", Agg::Max),
];

/// The names of METRICS, comma-separated.
pub fn metric_names() -> String {
    METRICS.iter().map(|m| m.0).collect::<Vec<_>>().join(", ")
}

/// The edge dictionary and the three tables of edge rows (PostgreSQL:
/// partitioned by `interval_end_ms`, partitions made by partition.rs).
pub fn create_tables(pg: bool) -> String {
    let id = if pg {
        "id BIGSERIAL PRIMARY KEY"
    } else {
        "id INTEGER PRIMARY KEY AUTOINCREMENT"
    };
    let metrics: String = METRICS
        .iter()
        .map(|(n, t, _)| format!(", {n} {t}"))
        .collect();
    let part = if pg {
        " PARTITION BY RANGE (interval_end_ms)"
    } else {
        ""
    };
    // Interval rows and hourly rows are appended in time order: PostgreSQL
    // finds a window's with a BRIN index (a few pages); SQLite a B-tree.
    let by_time = |t: &str| {
        if pg {
            format!("CREATE INDEX {t}_at ON {t} USING brin (interval_end_ms);\n")
        } else {
            format!("CREATE INDEX {t}_at ON {t} (interval_end_ms);\n")
        }
    };
    format!(
        "CREATE TABLE edge_keys ({id}, source_id TEXT NOT NULL, destination_id TEXT NOT NULL,
  protocol TEXT NOT NULL, port BIGINT NOT NULL, node TEXT NOT NULL, client_node TEXT NOT NULL,
  server_node TEXT NOT NULL, last_seen_ms BIGINT NOT NULL);
CREATE UNIQUE INDEX edge_keys_edge ON edge_keys (source_id, destination_id, protocol, port, node);
CREATE INDEX edge_keys_seen ON edge_keys (last_seen_ms);
CREATE TABLE edge_stats (interval_end_ms BIGINT NOT NULL, edge_id BIGINT NOT NULL{metrics}){part};
{raw_at}CREATE TABLE edge_rollup_5m (interval_end_ms BIGINT NOT NULL, edge_id BIGINT NOT NULL{metrics},
  last_end_ms BIGINT NOT NULL, PRIMARY KEY (interval_end_ms, edge_id)){part};
CREATE TABLE edge_rollup_1h (interval_end_ms BIGINT NOT NULL, edge_id BIGINT NOT NULL{metrics},
  last_end_ms BIGINT NOT NULL){part};
{hour_at}",
        raw_at = by_time("edge_stats"),
        hour_at = by_time("edge_rollup_1h"),
    )
}

/// `a` and `b` (columns of one metric) added up as `agg` says, either
/// possibly NULL; a zero sum stays NULL.
pub(super) fn combine(agg: Agg, a: &str, b: &str) -> String {
    match agg {
        Agg::Sum => format!("NULLIF(COALESCE({a}, 0) + COALESCE({b}, 0), 0)"),
        Agg::Min => format!("LEAST(COALESCE({a}, {b}), COALESCE({b}, {a}))"),
        Agg::Max => format!("GREATEST(COALESCE({a}, {b}), COALESCE({b}, {a}))"),
        Agg::Concat => format!(
            "CASE WHEN {a} IS NULL THEN {b} WHEN {b} IS NULL THEN {a} ELSE {a} || ';' || {b} END"
        ),
    }
}

/// An aggregate of a column over rows.
pub fn aggregate(agg: Agg, col: &str) -> String {
    match agg {
        Agg::Sum => format!("SUM({col})"),
        Agg::Min => format!("MIN({col})"),
        Agg::Max => format!("MAX({col})"),
        Agg::Concat => format!("group_concat({col}, ';')"),
    }
}

/// The tail of the writer's insert into the 5-minute rows: an interval
/// of a bucket already there is added to it.
pub fn upsert_tail() -> String {
    let sets: Vec<String> = METRICS
        .iter()
        .map(|(n, _, a)| {
            format!(
                "{n} = {}",
                combine(*a, &format!("edge_rollup_5m.{n}"), &format!("excluded.{n}"))
            )
        })
        .chain(std::iter::once(
            "last_end_ms = GREATEST(edge_rollup_5m.last_end_ms, excluded.last_end_ms)".to_string(),
        ))
        .collect();
    format!(
        "ON CONFLICT (interval_end_ms, edge_id) DO UPDATE SET {}",
        sets.join(", ")
    )
}

/// The bucket of `g` ms an end time falls in (SQL): `(end - 1) / g + 1) * g`.
pub fn bucket_sql(col: &str, g: i64) -> String {
    format!("(({col} - 1) / {g} + 1) * {g}")
}

/// The bucket of `g` ms that `end_ms` falls in: its end.
pub fn bucket(end_ms: i64, g: i64) -> i64 {
    (end_ms - 1).div_euclid(g) * g + g
}

/// Rolls the 5-minute rows that ended in `($1, $2]` into hourly rows.
fn rollup_sql() -> String {
    let g = GRAINS[1].1;
    let aggs: Vec<String> = METRICS.iter().map(|(n, _, a)| aggregate(*a, n)).collect();
    format!(
        "INSERT INTO edge_rollup_1h (interval_end_ms, edge_id, {}, last_end_ms)
SELECT {b}, edge_id, {}, MAX(last_end_ms)
FROM edge_rollup_5m WHERE interval_end_ms > $1 AND interval_end_ms <= $2
GROUP BY edge_id, {b}",
        metric_names(),
        aggs.join(", "),
        b = bucket_sql("interval_end_ms", g),
    )
}

pub(super) fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// The grain a window is read at: 0 interval rows, 1 5-minute rows, 2
/// hourly rows then 5-minute rows (see the module comment).
pub(super) fn grain_of(w: &Window, now_ms: i64) -> u8 {
    let to = if w.to_ms == i64::MAX { now_ms } else { w.to_ms };
    let len = to.saturating_sub(w.from_ms);
    if len <= ms(RAW_MAX) && w.from_ms >= now_ms - ms(RAW_KEEP) {
        0
    } else if len <= ms(FIVE_MAX) && w.from_ms >= now_ms - ms(FIVE_KEEP) {
        1
    } else {
        2
    }
}

/// Where a window's rows are read from: a FROM clause (alias `s`, with a
/// `last_end_ms` column) whose rows are already limited to the window.
pub(super) struct Source {
    pub from: String,
}

impl Store {
    /// How far each grain is rolled up (Unix ms; 0: nothing yet): the
    /// 5-minute buckets finished (their rows are written with each
    /// interval), and the hours rolled.
    pub fn rolled(&mut self) -> Result<[i64; 2]> {
        let rows = self.query_vals("SELECT grain, done_ms FROM flowmap_rollups", &[], |r| {
            Ok((r.text(0)?, r.int(1)?))
        })?;
        let mut out = [0; 2];
        for (i, (t, _)) in GRAINS.iter().enumerate() {
            out[i] = rows.iter().find(|(g, _)| g == t).map(|r| r.1).unwrap_or(0);
        }
        Ok(out)
    }

    /// Rollups and graded retention at `now_ms` (see the module comment).
    /// False when another agent holds the maintenance (PostgreSQL).
    pub fn maintain(&mut self, now_ms: i64, retention: Duration) -> Result<bool> {
        if let Conn::Postgres(c) = &mut self.conn {
            let got: bool = c
                .query_one("SELECT pg_try_advisory_lock($1)", &[&MAINT_LOCK])?
                .get(0);
            if !got {
                return Ok(false);
            }
            let res = self.maintain_locked(now_ms, retention);
            if let Conn::Postgres(c) = &mut self.conn {
                let _ = c.execute("SELECT pg_advisory_unlock($1)", &[&MAINT_LOCK]);
            }
            return res.map(|_| true);
        }
        self.maintain_locked(now_ms, retention).map(|_| true)
    }

    fn set_rolled(&mut self, table: &str, done: i64) -> Result<()> {
        self.run(
            "DELETE FROM flowmap_rollups WHERE grain = $1",
            &[Val::T(table.to_string())],
        )?;
        self.run(
            "INSERT INTO flowmap_rollups (grain, done_ms) VALUES ($1, $2)",
            &[Val::T(table.to_string()), Val::I(done)],
        )?;
        Ok(())
    }

    fn maintain_locked(&mut self, now_ms: i64, retention: Duration) -> Result<()> {
        let ret = ms(retention);
        // Partitions for the next hours, made before the writers need them.
        self.partitions_ahead(now_ms)?;
        let mut done = self.rolled()?;
        // The 5-minute buckets finished: written with their intervals.
        let five = (now_ms - ms(LAG)).div_euclid(GRAINS[0].1) * GRAINS[0].1;
        // Hours from finished 5-minute buckets.
        let (g, table) = (GRAINS[1].1, GRAINS[1].0);
        let hi = five.div_euclid(g) * g;
        if hi > done[1] {
            // Nothing older than the retention is worth rolling.
            let lo = done[1].max((now_ms - ret).div_euclid(g) * g);
            self.partitions_for(table, lo, hi)?;
            let sql = self.dialect(&rollup_sql()).into_owned();
            self.exec_batch("BEGIN")?;
            let res = self
                .run(&sql, &[Val::I(lo), Val::I(hi)])
                .and_then(|_| self.set_rolled(table, hi))
                .and_then(|_| self.set_rolled(GRAINS[0].0, five.max(done[0])));
            match res {
                Ok(_) => self.exec_batch("COMMIT")?,
                Err(e) => {
                    let _ = self.exec_batch("ROLLBACK");
                    return Err(e);
                }
            }
            done[1] = hi;
        } else if five > done[0] {
            self.set_rolled(GRAINS[0].0, five)?;
        }
        // Each grain for its time; 5-minute rows only once rolled into hours.
        let keep = |k: Duration, rolled: i64| {
            if ret <= ms(k) {
                now_ms - ret
            } else {
                (now_ms - ms(k)).min(rolled)
            }
        };
        self.expire("edge_stats", keep(RAW_KEEP, i64::MAX), false)?;
        self.expire("edge_rollup_5m", keep(FIVE_KEEP, done[1]), false)?;
        self.retain(std::time::UNIX_EPOCH + Duration::from_millis((now_ms - ret).max(0) as u64))?;
        self.expire_live(now_ms, now_ms - ret)?;
        Ok(())
    }

    /// Rows of `table` that ended before `cutoff` go: on PostgreSQL each
    /// partition wholly before it is dropped, and with `exact` the rows of
    /// the partition it falls in are deleted; SQLite deletes the rows.
    pub(super) fn expire(&mut self, table: &str, cutoff: i64, exact: bool) -> Result<()> {
        if let Conn::Postgres(_) = self.conn {
            self.drop_partitions(table, cutoff)?;
            if !exact {
                return Ok(());
            }
        }
        self.run(
            &format!("DELETE FROM {table} WHERE interval_end_ms < {cutoff}"),
            &[],
        )?;
        Ok(())
    }

    /// The rows a window reads (see the module comment).
    pub(super) fn edge_source(&mut self, w: &Window, now_ms: i64) -> Result<Source> {
        let grain = grain_of(w, now_ms);
        let m = metric_names();
        // Buckets of `g` ms that overlap the window.
        let overlap = |g: i64| {
            format!(
                "interval_end_ms >= {} AND interval_end_ms < {}",
                w.from_ms,
                w.to_ms.saturating_add(g)
            )
        };
        let from = match grain {
            0 => format!(
                "(SELECT interval_end_ms, edge_id, {m}, interval_end_ms AS last_end_ms FROM edge_stats
  WHERE interval_end_ms >= {} AND interval_end_ms <= {}) s",
                w.from_ms, w.to_ms
            ),
            1 => format!(
                "(SELECT * FROM edge_rollup_5m WHERE {}) s",
                overlap(GRAINS[0].1)
            ),
            _ => {
                let hours = self.rolled()?[1];
                format!(
                    "(SELECT * FROM edge_rollup_1h WHERE {} AND interval_end_ms <= {hours}
  UNION ALL SELECT * FROM edge_rollup_5m WHERE {} AND interval_end_ms > {hours}) s",
                    overlap(GRAINS[1].1),
                    overlap(GRAINS[0].1)
                )
            }
        };
        Ok(Source { from })
    }
}
