//! PostgreSQL time partitions of the edge rows: declarative range
//! partitions on `interval_end_ms`, one per `SLOTS` length of time, named
//! `<table>_p<start in Unix seconds>`. The maintenance makes the next ones
//! ahead of time; a writer makes the one an interval needs when it is
//! missing (an older interval, a clock ahead); expired partitions are
//! dropped whole. Creating one takes a transaction-scoped advisory lock,
//! so agents never race at it. SQLite has none of this: its rows are
//! deleted.

use std::collections::HashSet;

use anyhow::{Context, Result};

use super::{Conn, Store};

/// Each partitioned table and the time one partition holds (ms): interval
/// rows 15 minutes (they are kept 30), 5-minute rows an hour, hourly rows
/// a day.
pub const SLOTS: [(&str, i64); 3] = [
    ("edge_stats", 900_000),
    ("edge_rollup_5m", 3_600_000),
    ("edge_rollup_1h", 86_400_000),
];

/// How many partitions past the current one the maintenance makes.
const AHEAD: i64 = 2;

/// The lock taken while a partition is made.
const PARTITION_LOCK: i64 = 0x0066_6c6f_776d_6172;

fn slot_of(table: &str) -> i64 {
    SLOTS
        .iter()
        .find(|(t, _)| *t == table)
        .map(|s| s.1)
        .unwrap_or(86_400_000)
}

/// The partition of `table` holding rows that end at `end_ms`: its name
/// and bounds `[lo, hi)`.
pub fn partition(table: &str, end_ms: i64) -> (String, i64, i64) {
    let len = slot_of(table);
    let lo = end_ms.div_euclid(len) * len;
    (format!("{table}_p{}", lo.div_euclid(1000)), lo, lo + len)
}

/// The partitions this connection knows exist.
#[derive(Default)]
pub struct Known(HashSet<String>);

impl Store {
    /// Makes sure `table` has a partition for rows ending at each of
    /// `ends` (PostgreSQL; nothing on SQLite). Run outside a transaction
    /// of the caller's.
    pub(super) fn partitions_at(&mut self, table: &str, ends: &[i64]) -> Result<()> {
        let Conn::Postgres(c) = &mut self.conn else {
            return Ok(());
        };
        for &end in ends {
            let (name, lo, hi) = partition(table, end);
            if self.known.0.contains(&name) {
                continue;
            }
            let create = format!(
                "CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} FOR VALUES FROM ({lo}) TO ({hi})"
            );
            if self.in_migration {
                // The migration's transaction, under the migration lock.
                c.batch_execute(&create)
            } else {
                let mut tx = c.transaction()?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])?;
                tx.batch_execute(&create)?;
                tx.commit()
            }
            .with_context(|| format!("creating the partition {name}"))?;
            if self.known.0.len() > 10_000 {
                self.known.0.clear();
            }
            self.known.0.insert(name);
        }
        Ok(())
    }

    /// Partitions for the current time and the next ones, every table.
    pub(super) fn partitions_ahead(&mut self, now_ms: i64) -> Result<()> {
        for (t, len) in SLOTS {
            let ends: Vec<i64> = (0..=AHEAD).map(|i| now_ms + i * len).collect();
            self.partitions_at(t, &ends)?;
        }
        Ok(())
    }

    /// Partitions of `table` for the buckets rolled in `(lo, hi]` (a day
    /// each for hourly rows).
    pub(super) fn partitions_for(&mut self, table: &str, lo: i64, hi: i64) -> Result<()> {
        let len = slot_of(table);
        let mut ends = Vec::new();
        let mut t = lo + 1;
        while t < hi && ends.len() < 10_000 {
            ends.push(t);
            t += len;
        }
        ends.push(hi);
        self.partitions_at(table, &ends)
    }

    /// Partitions of `table` for rows that end in `(lo_ms, hi_ms]`
    /// (PostgreSQL; nothing on SQLite), as the maintenance makes them.
    pub fn make_partitions(&mut self, table: &str, lo_ms: i64, hi_ms: i64) -> Result<()> {
        self.partitions_for(table, lo_ms, hi_ms)
    }

    /// The partitions of `table`, as (name, start ms), oldest first.
    pub fn partitions(&mut self, table: &str) -> Result<Vec<(String, i64)>> {
        let Conn::Postgres(c) = &mut self.conn else {
            return Ok(Vec::new());
        };
        let rows = c.query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = $1::text::regclass",
            &[&table],
        )?;
        let prefix = format!("{table}_p");
        let mut out: Vec<(String, i64)> = rows
            .iter()
            .filter_map(|r| {
                let name: String = r.get(0);
                let start = name.strip_prefix(&prefix)?.parse::<i64>().ok()?;
                Some((name, start * 1000))
            })
            .collect();
        out.sort_by_key(|p| p.1);
        Ok(out)
    }

    /// Drops the partitions of `table` whose rows all ended before `cutoff`.
    pub(super) fn drop_partitions(&mut self, table: &str, cutoff: i64) -> Result<u64> {
        let len = slot_of(table);
        let mut n = 0;
        for (name, start) in self.partitions(table)? {
            if start + len > cutoff {
                break;
            }
            if let Conn::Postgres(c) = &mut self.conn {
                c.batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
                    .with_context(|| format!("dropping the partition {name}"))?;
            }
            self.known.0.remove(&name);
            n += 1;
        }
        Ok(n)
    }
}
