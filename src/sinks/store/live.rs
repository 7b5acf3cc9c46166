//! Live totals (schema version 5, issue 15): the map page's windows that
//! end now (15 minutes, 1 hour, 24 hours) read about one row per edge
//! instead of summing every bucket of the window.
//!
//! `edge_live` has one row per (span, edge key): the edge's numbers summed
//! over the buckets of one live window of that span, the one whose last
//! bucket is `gen_ms`: the buckets that end in `[gen_ms - span, gen_ms]`
//! (5-minute buckets for 15 minutes and 1 hour; for 24 hours hourly
//! buckets, read as any 24-hour window is: hourly rows up to the last
//! hour rolled, then 5-minute rows). Exactly the buckets a window that
//! ends now reads when `gen_ms` is the current bucket.
//!
//! Only the agent that writes an edge key writes its rows (the key names
//! the node), in the transaction that writes the interval: an interval of
//! the bucket `gen_ms` is added to the row (as the 5-minute rows are
//! upserted); the first interval of a new bucket, or one the row does not
//! expect (a late interval, a restart), makes the row again from the
//! bucket rows, which that transaction has just written. So a row always
//! equals its buckets' rows.
//!
//! A window that ends now reads the rows of its span whose `gen_ms` is the
//! window's last bucket; an edge whose row is of another bucket (idle
//! lately, or written by a clock ahead) is summed from its bucket rows
//! (a few index probes each). The result is the one the bucket rows give.
//! A window with an interval of a writer that keeps no live rows (an
//! agent still on schema 4: its `crawl_runs.live_rows` is 0) is read from
//! the bucket rows.
//! The maintenance deletes rows older than twice their span and records
//! how far (`flowmap_rollups`, `edge_live_<span>`): an older window reads
//! the bucket rows.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::Result;

use super::rollup::{self, aggregate, Agg, METRICS};
use super::{Store, Val, Window};

/// The live spans: (length, grain of its buckets), ms.
pub const SPANS: [(i64, i64); 3] = [
    (900_000, 300_000),
    (3_600_000, 300_000),
    (86_400_000, 3_600_000),
];

const FIVE: i64 = 300_000;

/// An edge key and its interval's numbers (in the order of METRICS).
type EdgeVals = (i64, Vec<Val>);
const HOUR: i64 = 3_600_000;

/// Rows older than this before now are deleted (their windows are past).
fn keep(span: i64, grain: i64) -> i64 {
    2 * span + 2 * grain
}

/// The `flowmap_rollups` row that says from which bucket on a span's rows
/// are whole.
fn cut_name(span: i64) -> String {
    format!("edge_live_{span}")
}

/// The table, its index by bucket, and the hourly rows' index for the
/// probes of one edge's buckets.
pub fn create_sql(pg: bool) -> String {
    let metrics: String = METRICS
        .iter()
        .map(|(n, t, _)| format!(", {n} {t}"))
        .collect();
    // Rows are updated in place every interval: room on the page keeps
    // the updates HOT (no index entry per update).
    let ff = if pg { " WITH (fillfactor = 70)" } else { "" };
    format!(
        "CREATE TABLE edge_live (span_ms BIGINT NOT NULL, gen_ms BIGINT NOT NULL, edge_id BIGINT NOT NULL{metrics},
  last_end_ms BIGINT NOT NULL, PRIMARY KEY (span_ms, edge_id)){ff};
CREATE INDEX edge_live_gen ON edge_live (span_ms, gen_ms);
CREATE INDEX edge_rollup_1h_edge ON edge_rollup_1h (interval_end_ms, edge_id);
"
    )
}

/// `lo, lo + step, …` up to `hi`, comma-separated (empty when none).
fn steps(lo: i64, hi: i64, step: i64) -> Vec<String> {
    let mut out = Vec::new();
    let mut t = lo;
    while t <= hi && out.len() < 10_000 {
        out.push(t.to_string());
        t += step;
    }
    out
}

/// The bucket rows (columns edge_id, METRICS, last_end_ms) of the edges
/// `ids` that a window starting at `from_ms` reads at `grain`, up to the
/// bucket `hi`: 5-minute rows; or hourly rows up to `rolled`, then
/// 5-minute rows. Each bucket is an index probe.
fn probe_rows(grain: i64, from_ms: i64, hi: i64, rolled: i64, ids: &str) -> String {
    let m = rollup::metric_names();
    let part = |table: &str, ends: Vec<String>| {
        (!ends.is_empty()).then(|| {
            format!(
                "SELECT edge_id, {m}, last_end_ms FROM {table} WHERE interval_end_ms IN ({}) AND edge_id IN ({ids})",
                ends.join(", ")
            )
        })
    };
    let parts: Vec<String> = if grain == HOUR {
        let five_lo = rollup::bucket(from_ms, FIVE).max(rolled + FIVE);
        [
            part(
                "edge_rollup_1h",
                steps(rollup::bucket(from_ms, HOUR), hi.min(rolled), HOUR),
            ),
            part("edge_rollup_5m", steps(five_lo, hi, FIVE)),
        ]
        .into_iter()
        .flatten()
        .collect()
    } else {
        part(
            "edge_rollup_5m",
            steps(rollup::bucket(from_ms, FIVE), hi, FIVE),
        )
        .into_iter()
        .collect()
    };
    if parts.is_empty() {
        format!("SELECT edge_id, {m}, last_end_ms FROM edge_rollup_5m WHERE 1 = 0")
    } else {
        parts.join(" UNION ALL ")
    }
}

/// Per-edge sums of rows `src` (alias s), as the rows of `edge_live` hold
/// them (a zero counter NULL).
fn sums(src: &str) -> String {
    let aggs: Vec<String> = METRICS
        .iter()
        .map(|(n, t, a)| {
            let e = aggregate(*a, n);
            // (PostgreSQL's SUM of BIGINT is NUMERIC.)
            if *a == Agg::Sum && t.starts_with("BIGINT") {
                format!("CAST({e} AS BIGINT) AS {n}")
            } else {
                format!("{e} AS {n}")
            }
        })
        .collect();
    format!(
        "SELECT s.edge_id, {}, MAX(s.last_end_ms) AS last_end_ms FROM ({src}) s WHERE 1 = 1 GROUP BY s.edge_id",
        aggs.join(", ")
    )
}

fn id_list(ids: &[i64]) -> String {
    ids.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A window's per-edge rows from the live rows: those of `span` whose
/// last bucket is `gen`, and `rest` (a query of the same columns) for
/// the edges whose row is of another bucket.
pub(super) struct LiveRows {
    span: i64,
    gen: i64,
    rest: Option<String>,
}

impl LiveRows {
    /// The rows (columns edge_id, METRICS as `edge_live` holds them,
    /// last_end_ms), as a `WITH` clause (may be empty) to put first and a
    /// query; with `limit`, of the busiest that many edges (and one more)
    /// only: their keys are found on the bytes alone (a narrow sort that
    /// stays in memory), then only their rows are read whole (by primary
    /// key).
    pub(super) fn rows(&self, limit: Option<usize>) -> (String, String) {
        let (span, gen) = (self.span, self.gen);
        let cols = |t: &str| {
            METRICS
                .iter()
                .map(|(n, _, _)| format!("{t}.{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let Some(n) = limit else {
            let live = format!(
                "SELECT edge_id, {}, last_end_ms FROM edge_live WHERE span_ms = {span} AND gen_ms = {gen}",
                rollup::metric_names()
            );
            return match &self.rest {
                None => (String::new(), live),
                Some(rest) => (String::new(), format!("{live} UNION ALL {rest}")),
            };
        };
        let bytes = |t: &str| format!("COALESCE({t}.bytes_c2s, 0) + COALESCE({t}.bytes_s2c, 0)");
        let mut narrow = format!(
            "SELECT l.edge_id, {} AS b FROM edge_live l WHERE l.span_ms = {span} AND l.gen_ms = {gen}",
            bytes("l")
        );
        let mut wide = format!(
            "SELECT u.edge_id, {}, u.last_end_ms FROM top t JOIN edge_live u ON u.span_ms = {span} AND u.gen_ms = {gen} AND u.edge_id = t.edge_id",
            cols("u")
        );
        if let Some(rest) = &self.rest {
            narrow.push_str(&format!(
                " UNION ALL SELECT r.edge_id, {} FROM ({rest}) r",
                bytes("r")
            ));
            wide.push_str(&format!(
                " UNION ALL SELECT r.edge_id, {}, r.last_end_ms FROM top t JOIN ({rest}) r ON r.edge_id = t.edge_id",
                cols("r")
            ));
        }
        (
            format!(
                "WITH top AS (SELECT x.edge_id FROM ({narrow}) x ORDER BY x.b DESC, x.edge_id LIMIT {})\n",
                n + 1
            ),
            wide,
        )
    }
}

impl Store {
    /// How far each span's rows are whole: windows whose first bucket is
    /// older read the bucket rows.
    fn live_cuts(&mut self) -> Result<HashMap<String, i64>> {
        Ok(self
            .query_vals(
                "SELECT grain, done_ms FROM flowmap_rollups WHERE grain LIKE 'edge_live_%'",
                &[],
                |r| Ok((r.text(0)?, r.int(1)?)),
            )?
            .into_iter()
            .collect())
    }

    fn set_live_cut(&mut self, span: i64, cut: i64) -> Result<()> {
        self.run(
            "DELETE FROM flowmap_rollups WHERE grain = $1",
            &[Val::T(cut_name(span))],
        )?;
        self.run(
            "INSERT INTO flowmap_rollups (grain, done_ms) VALUES ($1, $2)",
            &[Val::T(cut_name(span)), Val::I(cut)],
        )?;
        Ok(())
    }

    /// Makes the rows of the spans `only` (all when empty) again from the
    /// bucket rows, for every edge with rows that end at or after
    /// `since_ms` (each edge's row of its latest bucket). The migration to
    /// version 5 runs it; so can a tool that wrote bucket rows itself.
    pub fn rebuild_live(&mut self, since_ms: i64, only: &[i64]) -> Result<()> {
        let rolled = self.rolled()?[1];
        let m = rollup::metric_names();
        for (span, grain) in SPANS {
            if !only.is_empty() && !only.contains(&span) {
                continue;
            }
            let lo = since_ms - span - grain;
            let rows = if grain == HOUR {
                format!(
                    "SELECT edge_id, interval_end_ms, {m}, last_end_ms FROM edge_rollup_1h WHERE interval_end_ms >= {lo} AND interval_end_ms <= {rolled}
  UNION ALL SELECT edge_id, interval_end_ms, {m}, last_end_ms FROM edge_rollup_5m WHERE interval_end_ms >= {lo} AND interval_end_ms > {rolled}"
                )
            } else {
                format!("SELECT edge_id, interval_end_ms, {m}, last_end_ms FROM edge_rollup_5m WHERE interval_end_ms >= {lo}")
            };
            let aggs: Vec<String> = METRICS
                .iter()
                .map(|(n, _, a)| aggregate(*a, &format!("r.{n}")))
                .collect();
            let sql = format!(
                "INSERT INTO edge_live (span_ms, gen_ms, edge_id, {m}, last_end_ms)
SELECT {span}, g.gen, r.edge_id, {}, MAX(r.last_end_ms)
FROM ({rows}) r JOIN (SELECT edge_id, MAX({gb}) AS gen FROM ({rows}) x GROUP BY edge_id HAVING MAX(interval_end_ms) >= {since_ms}) g
  ON g.edge_id = r.edge_id
WHERE r.interval_end_ms > g.gen - {span} - {grain} AND r.interval_end_ms <= g.gen
GROUP BY r.edge_id, g.gen",
                aggs.join(", "),
                gb = rollup::bucket_sql("interval_end_ms", grain),
            );
            self.run("DELETE FROM edge_live WHERE span_ms = $1", &[Val::I(span)])?;
            self.run(&sql, &[])?;
            self.set_live_cut(span, since_ms)?;
        }
        self.live.clear();
        Ok(())
    }

    /// Deletes the rows past their windows (maintenance, at `now_ms`, rows
    /// older than `oldest_ms` in any case).
    pub(super) fn expire_live(&mut self, now_ms: i64, oldest_ms: i64) -> Result<()> {
        let cuts = self.live_cuts()?;
        for (span, grain) in SPANS {
            let cut = (now_ms - keep(span, grain)).max(oldest_ms);
            let was = cuts.get(&cut_name(span)).copied().unwrap_or(0);
            if cut <= was {
                continue;
            }
            // The cut first: a reader that sees it no longer asks for
            // the rows deleted next.
            self.set_live_cut(span, cut)?;
            self.run(
                "DELETE FROM edge_live WHERE span_ms = $1 AND gen_ms < $2",
                &[Val::I(span), Val::I(cut)],
            )?;
        }
        Ok(())
    }

    /// Adds one interval (ending `end_ms`) of the edges `edges` (key,
    /// numbers in the order of METRICS) to their live rows, in the
    /// writer's transaction after the 5-minute rows; `pending` gets each
    /// (edge, span, bucket of its row now), for the cache once committed.
    pub(super) fn write_live(
        &mut self,
        end_ms: i64,
        edges: &[(i64, Vec<Val>)],
        pending: &mut Vec<(i64, usize, i64)>,
    ) -> Result<()> {
        if edges.is_empty() {
            return Ok(());
        }
        let mut rolled = None;
        for (si, (span, grain)) in SPANS.iter().copied().enumerate() {
            let b = rollup::bucket(end_ms, grain);
            let (add, mut other): (Vec<&EdgeVals>, Vec<&EdgeVals>) = edges
                .iter()
                .partition(|(id, _)| self.live.get(id).is_some_and(|g| g[si] == b));
            if !add.is_empty() {
                let done = self.add_live(span, b, end_ms, &add)?;
                for e in add {
                    if done.contains(&e.0) {
                        pending.push((e.0, si, b));
                    } else {
                        other.push(e);
                    }
                }
            }
            if other.is_empty() {
                continue;
            }
            // Rows of a later bucket stay of it (made again, with this
            // late interval in them when it is one of their buckets).
            let ids: Vec<i64> = other.iter().map(|e| e.0).collect();
            let mut target: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
            let mut have: HashMap<i64, i64> = HashMap::new();
            for chunk in ids.chunks(10_000) {
                have.extend(self.query_vals(
                    &format!(
                        "SELECT edge_id, gen_ms FROM edge_live WHERE span_ms = {span} AND edge_id IN ({})",
                        id_list(chunk)
                    ),
                    &[],
                    |r| Ok((r.int(0)?, r.int(1)?)),
                )?);
            }
            for id in ids {
                let g = have.get(&id).copied().unwrap_or(b).max(b);
                target.entry(g).or_default().push(id);
            }
            let hours = if grain == HOUR {
                *rolled.get_or_insert(self.rolled()?[1])
            } else {
                0
            };
            for (g, ids) in target {
                for chunk in ids.chunks(10_000) {
                    self.make_live(span, grain, g, hours, chunk)?;
                    pending.extend(chunk.iter().map(|id| (*id, si, g)));
                }
            }
        }
        Ok(())
    }

    /// Adds the interval to the rows of bucket `gen` (an upsert: one index
    /// probe each); the edges whose row was of it. (A row missing is
    /// written with the interval alone: only rows older than the cut go,
    /// and no window reads those.)
    fn add_live(
        &mut self,
        span: i64,
        gen: i64,
        end_ms: i64,
        add: &[&(i64, Vec<Val>)],
    ) -> Result<HashSet<i64>> {
        let m = rollup::metric_names();
        let sets: Vec<String> = METRICS
            .iter()
            .map(|(n, _, a)| {
                format!(
                    "{n} = {}",
                    rollup::combine(*a, &format!("edge_live.{n}"), &format!("excluded.{n}"))
                )
            })
            .collect();
        let head = format!("INSERT INTO edge_live (span_ms, gen_ms, edge_id, {m}, last_end_ms)");
        let tail = format!(
            "ON CONFLICT (span_ms, edge_id) DO UPDATE SET {},
  last_end_ms = GREATEST(edge_live.last_end_ms, excluded.last_end_ms)
  WHERE edge_live.gen_ms = excluded.gen_ms RETURNING edge_id",
            sets.join(", ")
        );
        let width = METRICS.len() + 4;
        let mut done = HashSet::new();
        for chunk in add.chunks(30_000 / width) {
            let mut vals = Vec::with_capacity(chunk.len() * width);
            for (id, nums) in chunk {
                vals.push(Val::I(span));
                vals.push(Val::I(gen));
                vals.push(Val::I(*id));
                vals.extend(nums.iter().cloned());
                vals.push(Val::I(end_ms));
            }
            let sql = super::values_sql(&head, chunk.len(), width, &tail);
            done.extend(self.query_vals(&sql, &vals, |r| r.int(0))?);
        }
        Ok(done)
    }

    /// Makes the rows of `ids` for bucket `gen` from their bucket rows.
    fn make_live(
        &mut self,
        span: i64,
        grain: i64,
        gen: i64,
        rolled: i64,
        ids: &[i64],
    ) -> Result<()> {
        let m = rollup::metric_names();
        // From the earliest start of a window whose first bucket is
        // `gen - span` (for hours: all of that hour's 5-minute rows while
        // it is not rolled).
        let src = probe_rows(grain, gen - span - grain + 1, gen, rolled, &id_list(ids));
        let sets: Vec<String> = METRICS
            .iter()
            .map(|(n, _, _)| format!("{n} = excluded.{n}"))
            .collect();
        let sql = format!(
            "INSERT INTO edge_live (span_ms, gen_ms, edge_id, {m}, last_end_ms)
SELECT {span}, {gen}, t.edge_id, {m}, t.last_end_ms FROM ({}) t WHERE 1 = 1
ON CONFLICT (span_ms, edge_id) DO UPDATE SET gen_ms = excluded.gen_ms, {}, last_end_ms = excluded.last_end_ms",
            sums(&src),
            sets.join(", ")
        );
        self.run(&sql, &[])?;
        Ok(())
    }

    /// The per-edge rows (columns edge_id, METRICS as `edge_live` holds
    /// them, last_end_ms) that answer the window from the live rows, when
    /// they can: a window that ends now (or later) whose first bucket
    /// begins a span's window, at the grain the window is read at, with
    /// its rows whole.
    pub(super) fn live_source(&mut self, w: &Window, now_ms: i64) -> Result<Option<LiveRows>> {
        if w.to_ms != i64::MAX {
            return Ok(None);
        }
        // An agent still on schema 4 (a fleet being upgraded) wrote
        // intervals in the window but no live rows: read the buckets.
        let old_writer = self.query_vals(
            "SELECT interval_end_ms FROM crawl_runs WHERE live_rows = 0 AND interval_end_ms >= $1 LIMIT 1",
            &[Val::I(w.from_ms - HOUR)],
            |r| r.int(0),
        )?;
        if !old_writer.is_empty() {
            return Ok(None);
        }
        // The span of the window's grain whose rows of the window's last
        // bucket exist: the window's first bucket begins that span's
        // window and its last is the latest written. The longest first:
        // its rows end latest (a shorter span's rows that end earlier
        // give the same sums, but only for the edges idle since).
        let kind = rollup::grain_of(w, now_ms);
        let cuts = self.live_cuts()?;
        let mut found = None;
        for (span, grain) in SPANS.into_iter().rev() {
            if (if grain == HOUR { 2 } else { 1 }) != kind {
                continue;
            }
            let f = rollup::bucket(w.from_ms, grain);
            if f < cuts.get(&cut_name(span)).copied().unwrap_or(i64::MAX) {
                continue;
            }
            // (In the order of the bucket index, so that it is one probe
            // of it: with `gen_ms =` and LIMIT 1 PostgreSQL may walk
            // every row of the span to find none.)
            let next = self.query_vals(
                &format!(
                    "SELECT gen_ms FROM edge_live WHERE span_ms = {span} AND gen_ms >= {}
  ORDER BY span_ms, gen_ms LIMIT 1",
                    f + span
                ),
                &[],
                |r| r.int(0),
            )?;
            if next.first() == Some(&(f + span)) {
                found = Some((span, grain, f));
                break;
            }
        }
        let Some((span, grain, f)) = found else {
            return Ok(None);
        };
        let gen = f + span;
        let rolled = if grain == HOUR {
            let r = self.rolled()?[1];
            // The 5-minute rows of the window's first hour are read
            // only while it is not rolled (a rollup a day behind).
            if r < f {
                return Ok(None);
            }
            r
        } else {
            0
        };
        // Edges whose row is of another bucket, with rows in the window.
        let other = self.query_vals(
            &format!(
                // (Two ranges of the index, not the window's own rows.)
                "SELECT edge_id, gen_ms FROM edge_live WHERE span_ms = {span}
  AND ((gen_ms >= {f} AND gen_ms < {gen}) OR gen_ms > {gen})"
            ),
            &[],
            |r| Ok((r.int(0)?, r.int(1)?)),
        )?;
        if other.is_empty() {
            return Ok(Some(LiveRows {
                span,
                gen,
                rest: None,
            }));
        }
        let hi = other.iter().map(|o| o.1).max().unwrap_or(gen);
        if other.len() > 100_000 || hi > gen + 2 * span {
            return Ok(None);
        }
        let ids: Vec<i64> = other.iter().map(|o| o.0).collect();
        let rest = sums(&probe_rows(grain, w.from_ms, hi, rolled, &id_list(&ids)));
        Ok(Some(LiveRows {
            span,
            gen,
            rest: Some(rest),
        }))
    }

    /// True when the window is read from the live rows (for tests and the
    /// benchmark).
    pub fn reads_live(&mut self, w: &Window) -> Result<bool> {
        Ok(self
            .live_source(w, super::unix_ms(std::time::SystemTime::now()))?
            .is_some())
    }
}
