//! Retention at fleet scale: each interval's rows (`edge_stats`) for a
//! recent window, then 5-minute rows (`edge_rollup_5m`), then hourly rows
//! (`edge_rollup_1h`), and a window read at the grain its length needs.
//!
//! - Every minute the writer rolls the raw rows of finished 5-minute
//!   buckets (ended `LAG` ago, for intervals still queued) into
//!   `edge_rollup_5m`, and finished hours of those into `edge_rollup_1h`;
//!   `flowmap_rollups` keeps how far each grain is done. A row of a bucket
//!   is summed per (edge, node) like a window is; its `interval_end_ms` is
//!   the bucket's end.
//! - Raw rows are kept `RAW_KEEP`, 5-minute rows `FIVE_KEEP`, hourly rows
//!   for the whole retention (each no longer than the retention), and a
//!   finer row goes only once it is rolled up.
//! - A window of at most `RAW_MAX` is read from the raw rows; one of at
//!   most `FIVE_MAX` from 5-minute rows; a longer one from hourly rows.
//!   Also when its start is older than what the finer grain keeps. The
//!   part of the window the coarser grain has not rolled yet is read from
//!   the finer rows, so the latest minutes are always there. A window's
//!   edges are rounded out to its grain.
//! - On PostgreSQL one agent at a time does this (an advisory lock tried,
//!   not waited for): a fleet of agents shares one store.

use std::time::Duration;

use anyhow::Result;

use super::{Conn, Store, Val, Window};

/// The grains: table, bucket length (ms).
pub const GRAINS: [(&str, i64); 2] = [("edge_rollup_5m", 300_000), ("edge_rollup_1h", 3_600_000)];
/// How long each grain's rows are kept (no longer than the retention).
pub const RAW_KEEP: Duration = Duration::from_secs(2 * 3600);
pub const FIVE_KEEP: Duration = Duration::from_secs(26 * 3600);
/// Windows up to this long read raw rows; up to FIVE_MAX, 5-minute rows.
pub const RAW_MAX: Duration = Duration::from_secs(2 * 3600);
pub const FIVE_MAX: Duration = Duration::from_secs(6 * 3600);
/// A bucket is rolled up this long after it ended (intervals arrive late).
pub const LAG: Duration = Duration::from_secs(120);

/// The maintenance lock: one agent of a fleet at a time.
const MAINT_LOCK: i64 = 0x666c_6f77_6d61_71;

/// The columns of edge_stats a window reads, in the rollup tables' order.
pub const COLS: &str = "source_id, destination_id, protocol, port, node, client_node, server_node, interval_end_ms,
  connections_opened, connections_active, packets_c2s, bytes_c2s, packets_s2c, bytes_s2c, handshake_count,
  handshake_min_us, handshake_mean_us, handshake_max_us, tcp_resets, first_seen_ms, last_seen_ms,
  connections_attempted, failed_refused, failed_unanswered, failed_unreachable, syn_retransmits, resets_client,
  resets_server, status_rank, retrans_c2s, retrans_s2c, drops, srtt_samples, srtt_min_us, srtt_mean_us, srtt_max_us";

/// A rollup table (schema version 3).
pub fn create_table(name: &str) -> String {
    format!(
        "CREATE TABLE {name} (
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
CREATE INDEX {name}_end ON {name} (interval_end_ms);
"
    )
}

/// Rolls `src`'s rows that ended in `($1, $2]` into buckets of `g` ms of `dst`.
fn rollup_sql(src: &str, dst: &str, g: i64) -> String {
    format!(
        "INSERT INTO {dst} ({COLS})
SELECT source_id, destination_id, protocol, port, node, MAX(client_node), MAX(server_node),
  ((interval_end_ms - 1) / {g} + 1) * {g} AS bucket_end,
  SUM(connections_opened), SUM(connections_active), SUM(packets_c2s), SUM(bytes_c2s), SUM(packets_s2c),
  SUM(bytes_s2c), SUM(handshake_count), MIN(handshake_min_us),
  CASE WHEN SUM(handshake_count) > 0 THEN SUM(COALESCE(handshake_mean_us, 0) * handshake_count) / SUM(handshake_count) END,
  MAX(handshake_max_us), SUM(tcp_resets), MIN(first_seen_ms), MAX(last_seen_ms), SUM(connections_attempted),
  SUM(failed_refused), SUM(failed_unanswered), SUM(failed_unreachable), SUM(syn_retransmits), SUM(resets_client),
  SUM(resets_server), MAX(status_rank), SUM(retrans_c2s), SUM(retrans_s2c),
  COALESCE(group_concat(NULLIF(drops, ''), ';'), ''), SUM(srtt_samples), MIN(srtt_min_us),
  CASE WHEN SUM(srtt_samples) > 0 THEN SUM(COALESCE(srtt_mean_us, 0) * srtt_samples) / SUM(srtt_samples) END,
  MAX(srtt_max_us)
FROM {src} WHERE interval_end_ms > $1 AND interval_end_ms <= $2
GROUP BY source_id, destination_id, protocol, port, node, ((interval_end_ms - 1) / {g} + 1) * {g}"
    )
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

impl Store {
    /// How far each grain is rolled up (Unix ms; 0: nothing yet).
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

    fn maintain_locked(&mut self, now_ms: i64, retention: Duration) -> Result<()> {
        let ret = ms(retention);
        // 5 minutes from raw, hours from 5 minutes.
        let mut done = self.rolled()?;
        let mut ready = now_ms - ms(LAG);
        for (i, (table, g)) in GRAINS.iter().enumerate() {
            let src = if i == 0 {
                "edge_stats"
            } else {
                GRAINS[i - 1].0
            };
            let hi = ready.div_euclid(*g) * g;
            if hi > done[i] {
                // Nothing older than the retention is worth rolling.
                let lo = done[i].max((now_ms - ret).div_euclid(*g) * g);
                let sql = self.dialect(&rollup_sql(src, table, *g)).into_owned();
                self.exec_batch("BEGIN")?;
                let res = self
                    .run(&sql, &[Val::I(lo), Val::I(hi)])
                    .and_then(|_| {
                        self.run(
                            "DELETE FROM flowmap_rollups WHERE grain = $1",
                            &[Val::T(table.to_string())],
                        )
                    })
                    .and_then(|_| {
                        self.run(
                            "INSERT INTO flowmap_rollups (grain, done_ms) VALUES ($1, $2)",
                            &[Val::T(table.to_string()), Val::I(hi)],
                        )
                    });
                match res {
                    Ok(_) => self.exec_batch("COMMIT")?,
                    Err(e) => {
                        let _ = self.exec_batch("ROLLBACK");
                        return Err(e);
                    }
                }
                done[i] = hi;
            }
            ready = done[i];
        }
        // Each grain for its time, a finer row only once rolled up.
        let keep = |k: Duration, rolled: i64| {
            if ret <= ms(k) {
                now_ms - ret
            } else {
                (now_ms - ms(k)).min(rolled)
            }
        };
        self.run(
            "DELETE FROM edge_stats WHERE interval_end_ms < $1",
            &[Val::I(keep(RAW_KEEP, done[0]))],
        )?;
        self.run(
            "DELETE FROM edge_rollup_5m WHERE interval_end_ms < $1",
            &[Val::I(keep(FIVE_KEEP, done[1]))],
        )?;
        self.retain(std::time::UNIX_EPOCH + Duration::from_millis((now_ms - ret).max(0) as u64))?;
        Ok(())
    }

    /// The rows a window reads (see the module comment): a table, or the
    /// union of a coarse table up to where it is rolled and the finer
    /// ones after.
    pub(super) fn edge_source(&mut self, w: &Window, now_ms: i64) -> Result<String> {
        let to = if w.to_ms == i64::MAX { now_ms } else { w.to_ms };
        let len = to.saturating_sub(w.from_ms);
        let grain = if len <= ms(RAW_MAX) && w.from_ms >= now_ms - ms(RAW_KEEP) {
            0
        } else if len <= ms(FIVE_MAX) && w.from_ms >= now_ms - ms(FIVE_KEEP) {
            1
        } else {
            2
        };
        if grain == 0 {
            return Ok("edge_stats".into());
        }
        let done = self.rolled()?;
        let mut parts = Vec::new();
        let mut after = i64::MIN;
        for g in (0..=grain).rev() {
            let (table, until) = match g {
                0 => ("edge_stats", i64::MAX),
                n => (GRAINS[n - 1].0, done[n - 1]),
            };
            if until <= after {
                continue;
            }
            parts.push(format!(
                "SELECT {COLS} FROM {table} WHERE interval_end_ms > {after} AND interval_end_ms <= {until}"
            ));
            after = until;
        }
        Ok(format!("({})", parts.join("\nUNION ALL\n")))
    }
}
