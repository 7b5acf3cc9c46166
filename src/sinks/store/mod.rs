//! The embedded store: every interval's graph, kept for a bounded time, in
//! SQLite (default) or PostgreSQL. Read by `flowmap top`, `flowmap graph`
//! and the map page (through a bounded pool of reads, pool.rs).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tracing::info;

use crate::config::{Database, Driver};
use crate::graph::Graph;

pub mod cluster;
mod pg;
mod pool;
pub mod rollup;
mod writer;
pub use pool::{ReadError, ReadPool};
pub use writer::{Counters, Job, Writer};

/// Where the store lives.
#[derive(Debug, Clone, PartialEq)]
pub enum Location {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Location {
    /// From `coordimap.database`, else SQLite at `<state_dir>/flowmap.db`.
    pub fn from_config(db: Option<&Database>, state_dir: &std::path::Path) -> Location {
        match db {
            Some(Database {
                driver: Driver::Postgres,
                connection_string,
            }) => Location::Postgres(connection_string.expose().to_string()),
            Some(Database {
                driver: Driver::Sqlite,
                connection_string,
            }) if !connection_string.expose().is_empty() => {
                Location::Sqlite(PathBuf::from(connection_string.expose()))
            }
            _ => Location::Sqlite(state_dir.join("flowmap.db")),
        }
    }

    /// `--database`: a PostgreSQL connection string (`postgres://…`,
    /// `postgresql://…`, or libpq's `key=value …`), else a SQLite file.
    pub fn parse(s: &str) -> Location {
        let t = s.trim();
        if t.starts_with("postgres://") || t.starts_with("postgresql://") || t.contains('=') {
            Location::Postgres(t.to_string())
        } else {
            Location::Sqlite(PathBuf::from(t))
        }
    }

    /// For logs: never the PostgreSQL connection string (it may hold a password).
    pub fn describe(&self) -> String {
        match self {
            Location::Sqlite(p) => format!("sqlite {}", p.display()),
            Location::Postgres(_) => "postgres (connection string hidden)".into(),
        }
    }
}

enum Conn {
    Sqlite(rusqlite::Connection),
    Postgres(Box<postgres::Client>),
}

pub struct Store {
    conn: Conn,
    /// The agent that writes: its node and instance ID (empty for readers).
    who: Agent,
}

/// The agent that writes rows: the node it runs on (`NODE_NAME`, else the
/// host name) and its instance ID (the UUID the spool directory keeps).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Agent {
    pub node: String,
    pub instance_id: String,
}

/// Creates the store's directory 0700 if it is missing; warns when an
/// existing one lets others in (flow data is not for every local user).
fn private_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    if let Ok(m) = std::fs::metadata(dir) {
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(dir = %dir.display(), mode = %format!("{mode:o}"), "the store's directory is readable by others; 0700 is expected");
        }
    }
    Ok(())
}

/// The SQLite file and its WAL and shared-memory files: 0600 (SQLite gives
/// the journals it creates later the database file's mode).
fn private_files(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let name = path.as_os_str().to_string_lossy().into_owned();
    for p in [name.clone(), format!("{name}-wal"), format!("{name}-shm")] {
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
    }
}

/// The store's server could not be reached (PostgreSQL down, network):
/// worth trying again later, unlike a bad location or schema.
#[derive(Debug)]
pub struct Unreachable(pub String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// One value bound to a statement, for both drivers.
#[derive(Debug, Clone)]
enum Val {
    I(i64),
    F(Option<f64>),
    T(String),
}

impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Val::I(v) => v.to_sql(),
            Val::F(v) => v.to_sql(),
            Val::T(v) => v.to_sql(),
        }
    }
}

/// The schema, one step per version, per driver.
const SQLITE_MIGRATIONS: &[&str] = &[
    "
CREATE TABLE crawl_runs (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  data_source_id TEXT NOT NULL,
  interval_start_ms BIGINT NOT NULL,
  interval_end_ms BIGINT NOT NULL,
  endpoints BIGINT NOT NULL,
  edges BIGINT NOT NULL
);
CREATE INDEX crawl_runs_end ON crawl_runs (interval_end_ms);
CREATE TABLE elements (
  id TEXT PRIMARY KEY,
  type TEXT NOT NULL,
  name TEXT NOT NULL,
  payload TEXT NOT NULL,
  first_seen_ms BIGINT NOT NULL,
  last_seen_ms BIGINT NOT NULL
);
CREATE TABLE relationships (
  source_id TEXT NOT NULL,
  destination_id TEXT NOT NULL,
  first_seen_ms BIGINT NOT NULL,
  last_seen_ms BIGINT NOT NULL,
  PRIMARY KEY (source_id, destination_id)
);
CREATE TABLE edge_stats (
  run_id BIGINT NOT NULL REFERENCES crawl_runs(id) ON DELETE CASCADE,
  source_id TEXT NOT NULL,
  destination_id TEXT NOT NULL,
  protocol TEXT NOT NULL,
  port BIGINT NOT NULL,
  connections_opened BIGINT NOT NULL,
  connections_active BIGINT NOT NULL,
  packets_c2s BIGINT NOT NULL,
  bytes_c2s BIGINT NOT NULL,
  packets_s2c BIGINT NOT NULL,
  bytes_s2c BIGINT NOT NULL,
  handshake_count BIGINT NOT NULL,
  handshake_min_us DOUBLE PRECISION,
  handshake_mean_us DOUBLE PRECISION,
  handshake_max_us DOUBLE PRECISION,
  tcp_resets BIGINT NOT NULL,
  first_seen_ms BIGINT NOT NULL,
  last_seen_ms BIGINT NOT NULL
);
CREATE INDEX edge_stats_run ON edge_stats (run_id);
",
    "
ALTER TABLE edge_stats ADD COLUMN connections_attempted BIGINT NOT NULL DEFAULT 0;
ALTER TABLE edge_stats ADD COLUMN failed_refused BIGINT NOT NULL DEFAULT 0;
ALTER TABLE edge_stats ADD COLUMN failed_unanswered BIGINT NOT NULL DEFAULT 0;
ALTER TABLE edge_stats ADD COLUMN failed_unreachable BIGINT NOT NULL DEFAULT 0;
ALTER TABLE edge_stats ADD COLUMN syn_retransmits BIGINT NOT NULL DEFAULT 0;
ALTER TABLE edge_stats ADD COLUMN resets_client BIGINT NOT NULL DEFAULT 0;
ALTER TABLE edge_stats ADD COLUMN resets_server BIGINT NOT NULL DEFAULT 0;
ALTER TABLE edge_stats ADD COLUMN status_rank BIGINT NOT NULL DEFAULT 0;
ALTER TABLE edge_stats ADD COLUMN retrans_c2s BIGINT NOT NULL DEFAULT 0;
ALTER TABLE edge_stats ADD COLUMN retrans_s2c BIGINT NOT NULL DEFAULT 0;
",
    // Version 3 (issue 15 and 13): rows carry the agent that wrote them (its
    // node and instance ID) and the node each end runs on (for counting a
    // connection once across nodes); edges keep drops and smoothed RTT; the
    // interval's end is on each edge row, so windows read no join.
    "
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
@ROLLUPS@
",
];

/// The schema version this flowmap writes.
pub const SCHEMA_VERSION: u32 = 3;

/// The PostgreSQL advisory lock key migrations hold (any agent of a fleet
/// starting at once waits for the one migrating): "flowmap" in ASCII.
const MIGRATION_LOCK: i64 = 0x0066_6c6f_776d_6170;

/// The steps for SQLite (the rollup tables of rollup.rs filled in).
fn sqlite_migrations() -> Vec<String> {
    let rollups: String = rollup::GRAINS
        .iter()
        .map(|(t, _)| rollup::create_table(t))
        .collect();
    SQLITE_MIGRATIONS
        .iter()
        .map(|m| m.replace("@ROLLUPS@", &rollups))
        .collect()
}

fn postgres_migrations() -> Vec<String> {
    sqlite_migrations()
        .iter()
        .map(|m| {
            m.replace(
                "id INTEGER PRIMARY KEY AUTOINCREMENT",
                "id BIGSERIAL PRIMARY KEY",
            )
        })
        .collect()
}

/// An edge over a time window: the sum of its intervals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EdgeRow {
    pub source: String,
    pub target: String,
    pub protocol: String,
    pub port: u16,
    pub connections_opened: u64,
    pub connections_active: u64,
    pub packets_client_to_server: u64,
    pub bytes_client_to_server: u64,
    pub packets_server_to_client: u64,
    pub bytes_server_to_client: u64,
    pub handshake_count: u64,
    pub handshake_min_us: Option<f64>,
    pub handshake_mean_us: Option<f64>,
    pub handshake_max_us: Option<f64>,
    pub tcp_resets: u64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    /// Health summed over the window; `status` is the worst of its
    /// intervals (in a live window, NoStatus when the edge had no traffic
    /// in its agent's latest interval).
    #[serde(flatten)]
    pub health: crate::status::EdgeHealth,
    /// The node whose agent's counts these are (a connection seen by
    /// several agents is counted once, see cluster.rs).
    pub node: String,
    /// Every node whose agent reported this edge in the window.
    pub seen_by: Vec<String>,
    /// End of the last interval (of `node`'s agent) that had this edge.
    pub last_interval_end_ms: i64,
    /// The nodes its client and server run on (empty when none).
    #[serde(skip)]
    pub client_node: String,
    #[serde(skip)]
    pub server_node: String,
}

/// An agent that wrote intervals in a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentRow {
    pub node: String,
    pub instance_id: String,
    pub last_interval_end_ms: i64,
}

/// A time window of the store: intervals that ended in `[from_ms, to_ms]`.
/// A live window ends now: there an edge idle in its agent's latest
/// interval is NoStatus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from_ms: i64,
    pub to_ms: i64,
    pub live: bool,
}

impl Window {
    /// Every interval that ended at or after `since` (not live).
    pub fn since(since: SystemTime) -> Window {
        Window {
            from_ms: unix_ms(since),
            to_ms: i64::MAX,
            live: false,
        }
    }

    /// The `len` that ends now.
    pub fn live(len: Duration) -> Window {
        let now = SystemTime::now();
        Window {
            from_ms: unix_ms(now.checked_sub(len).unwrap_or(UNIX_EPOCH)),
            to_ms: i64::MAX,
            live: true,
        }
    }

    /// The `len` that ends now, read like a past window: each edge has the
    /// worst status of its intervals (`flowmap top` and `graph`, where a
    /// failure of the last minutes must not read as idle).
    pub fn last(len: Duration) -> Window {
        Window {
            live: false,
            ..Window::live(len)
        }
    }

    /// `[from_ms, to_ms]`, a past window.
    pub fn between(from_ms: i64, to_ms: i64) -> Window {
        Window {
            from_ms,
            to_ms,
            live: false,
        }
    }
}

impl EdgeRow {
    pub fn bytes(&self) -> u64 {
        self.bytes_client_to_server + self.bytes_server_to_client
    }
    pub fn packets(&self) -> u64 {
        self.packets_client_to_server + self.packets_server_to_client
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeRow {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub payload: serde_json::Value,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
}

pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The columns of an edge_stats row, in the order of `edge_vals`.
const EDGE_COLS: &str = "run_id, source_id, destination_id, protocol, port, connections_opened, connections_active,
  packets_c2s, bytes_c2s, packets_s2c, bytes_s2c, handshake_count, handshake_min_us, handshake_mean_us,
  handshake_max_us, tcp_resets, first_seen_ms, last_seen_ms, connections_attempted, failed_refused,
  failed_unanswered, failed_unreachable, syn_retransmits, resets_client, resets_server, status_rank,
  retrans_c2s, retrans_s2c, node, client_node, server_node, interval_end_ms, drops,
  srtt_samples, srtt_min_us, srtt_mean_us, srtt_max_us";

/// Each edge of a window, summed per node that reported it (`$1` ≤ the
/// interval's end ≤ `$2`); cluster.rs makes one edge of them.
const EDGE_QUERY: &str = "
SELECT s.source_id, s.destination_id, s.protocol, s.port,
  CAST(SUM(s.connections_opened) AS BIGINT), CAST(SUM(s.connections_active) AS BIGINT),
  CAST(SUM(s.packets_c2s) AS BIGINT), CAST(SUM(s.bytes_c2s) AS BIGINT),
  CAST(SUM(s.packets_s2c) AS BIGINT), CAST(SUM(s.bytes_s2c) AS BIGINT),
  CAST(SUM(s.handshake_count) AS BIGINT), MIN(s.handshake_min_us),
  SUM(COALESCE(s.handshake_mean_us, 0) * s.handshake_count), MAX(s.handshake_max_us),
  CAST(SUM(s.tcp_resets) AS BIGINT), MIN(s.first_seen_ms), MAX(s.last_seen_ms),
  CAST(SUM(s.connections_attempted) AS BIGINT), CAST(SUM(s.failed_refused) AS BIGINT),
  CAST(SUM(s.failed_unanswered) AS BIGINT), CAST(SUM(s.failed_unreachable) AS BIGINT),
  CAST(SUM(s.syn_retransmits) AS BIGINT), CAST(SUM(s.resets_client) AS BIGINT),
  CAST(SUM(s.resets_server) AS BIGINT), CAST(MAX(s.status_rank) AS BIGINT),
  CAST(SUM(s.retrans_c2s) AS BIGINT), CAST(SUM(s.retrans_s2c) AS BIGINT),
  s.node, MAX(s.client_node), MAX(s.server_node), MAX(s.interval_end_ms),
  group_concat(NULLIF(s.drops, ''), ';'),
  CAST(SUM(s.srtt_samples) AS BIGINT), MIN(s.srtt_min_us),
  SUM(COALESCE(s.srtt_mean_us, 0) * s.srtt_samples), MAX(s.srtt_max_us)
FROM edge_stats s
WHERE s.interval_end_ms >= $1 AND s.interval_end_ms <= $2
GROUP BY s.source_id, s.destination_id, s.protocol, s.port, s.node";

const NODE_QUERY: &str =
    "SELECT id, type, name, payload, first_seen_ms, last_seen_ms FROM elements WHERE last_seen_ms >= $1 ORDER BY id";

impl Store {
    /// Opens the store and brings its schema up to date.
    pub fn open(loc: &Location) -> Result<Store> {
        let conn = match loc {
            Location::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    private_dir(dir)?;
                }
                let c = rusqlite::Connection::open(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                c.busy_timeout(Duration::from_secs(10))?;
                c.pragma_update(None, "journal_mode", "WAL")?;
                c.pragma_update(None, "synchronous", "NORMAL")?;
                c.pragma_update(None, "foreign_keys", "ON")?;
                private_files(path);
                Conn::Sqlite(c)
            }
            Location::Postgres(cs) => Conn::Postgres(Box::new(pg::connect(cs)?)),
        };
        let mut s = Store {
            conn,
            who: Agent::default(),
        };
        s.migrate()?;
        Ok(s)
    }

    /// Says which agent writes through this store (rows carry it).
    pub fn set_agent(&mut self, who: Agent) {
        self.who = who;
    }

    /// True when the connection to the server is gone (PostgreSQL).
    pub fn is_broken(&self) -> bool {
        matches!(&self.conn, Conn::Postgres(c) if c.is_closed())
    }

    fn exec_batch(&mut self, sql: &str) -> Result<()> {
        match &mut self.conn {
            Conn::Sqlite(c) => c.execute_batch(sql)?,
            Conn::Postgres(c) => c.batch_execute(sql)?,
        }
        Ok(())
    }

    /// The schema version; 0 for an empty database.
    pub fn version(&mut self) -> Result<u32> {
        self.exec_batch("CREATE TABLE IF NOT EXISTS flowmap_schema (version INTEGER NOT NULL)")?;
        let v: Option<i64> = match &mut self.conn {
            Conn::Sqlite(c) => {
                c.query_row("SELECT MAX(version) FROM flowmap_schema", [], |r| r.get(0))?
            }
            Conn::Postgres(c) => c
                .query_one(
                    "SELECT CAST(MAX(version) AS BIGINT) FROM flowmap_schema",
                    &[],
                )?
                .get(0),
        };
        Ok(v.unwrap_or(0) as u32)
    }

    /// Brings the schema up to date. On PostgreSQL under an advisory lock,
    /// so a fleet of agents starting at once migrates it once: the others
    /// wait, then find it current.
    fn migrate(&mut self) -> Result<()> {
        if let Conn::Postgres(c) = &mut self.conn {
            c.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
                .context("taking the store's migration lock")?;
            let res = self.migrate_locked();
            if let Conn::Postgres(c) = &mut self.conn {
                let unlocked = c.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
                if let (Ok(()), Err(e)) = (&res, unlocked) {
                    return Err(e).context("releasing the store's migration lock");
                }
            }
            return res;
        }
        self.migrate_locked()
    }

    fn migrate_locked(&mut self) -> Result<()> {
        let have = self.version()?;
        let steps: Vec<String> = match &self.conn {
            Conn::Sqlite(_) => sqlite_migrations(),
            Conn::Postgres(_) => postgres_migrations(),
        };
        if have as usize > steps.len() {
            bail!("the store's schema version {have} is newer than this flowmap ({}); use a newer flowmap", steps.len());
        }
        for (i, step) in steps.iter().enumerate().skip(have as usize) {
            let v = i + 1;
            self.exec_batch(&format!(
                "BEGIN; {step}; INSERT INTO flowmap_schema (version) VALUES ({v}); COMMIT;"
            ))
            .with_context(|| format!("store migration to version {v}"))?;
            info!(version = v, "store schema migrated");
        }
        Ok(())
    }

    fn run(&mut self, sql: &str, vals: &[Val]) -> Result<u64> {
        let sql = &*self.dialect(sql).into_owned();
        match &mut self.conn {
            Conn::Sqlite(c) => Ok(c.execute(sql, rusqlite::params_from_iter(vals.iter()))? as u64),
            Conn::Postgres(c) => {
                let owned: Vec<Box<dyn postgres::types::ToSql + Sync>> = vals
                    .iter()
                    .map(|v| -> Box<dyn postgres::types::ToSql + Sync> {
                        match v {
                            Val::I(i) => Box::new(*i),
                            Val::F(f) => Box::new(*f),
                            Val::T(t) => Box::new(t.clone()),
                        }
                    })
                    .collect();
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                    owned.iter().map(|b| b.as_ref()).collect();
                Ok(c.execute(sql, &refs)?)
            }
        }
    }

    /// Stores one interval's graph of one data source.
    pub fn write(
        &mut self,
        ds: &str,
        start: SystemTime,
        end: SystemTime,
        graph: &Graph,
        always: &[crate::enrich::Endpoint],
    ) -> Result<i64> {
        let (start_ms, end_ms) = (unix_ms(start), unix_ms(end));
        self.exec_batch("BEGIN")?;
        let res = self.write_inner(ds, start_ms, end_ms, graph, always);
        match res {
            Ok(id) => {
                self.exec_batch("COMMIT")?;
                Ok(id)
            }
            Err(e) => {
                let _ = self.exec_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    fn write_inner(
        &mut self,
        ds: &str,
        start_ms: i64,
        end_ms: i64,
        graph: &Graph,
        always: &[crate::enrich::Endpoint],
    ) -> Result<i64> {
        let ins = "INSERT INTO crawl_runs (data_source_id, interval_start_ms, interval_end_ms, endpoints, edges, node, instance_id) VALUES ($1, $2, $3, $4, $5, $6, $7)";
        let vals = [
            Val::T(ds.into()),
            Val::I(start_ms),
            Val::I(end_ms),
            Val::I(graph.endpoints.len() as i64),
            Val::I(graph.edges.len() as i64),
            Val::T(self.who.node.clone()),
            Val::T(self.who.instance_id.clone()),
        ];
        let run_id = match &mut self.conn {
            Conn::Sqlite(c) => {
                c.execute(ins, rusqlite::params_from_iter(vals.iter()))?;
                c.last_insert_rowid()
            }
            Conn::Postgres(c) => c
                .query_one(
                    &format!("{ins} RETURNING id"),
                    &[
                        &ds,
                        &start_ms,
                        &end_ms,
                        &(graph.endpoints.len() as i64),
                        &(graph.edges.len() as i64),
                        &self.who.node,
                        &self.who.instance_id,
                    ],
                )?
                .get(0),
        };
        // Each endpoint once (the host is in `always` and in the graph).
        let mut seen = std::collections::HashSet::new();
        let mut rows = Vec::new();
        for ep in always.iter().chain(graph.endpoints.values()) {
            if !seen.insert(ep.id.as_str()) {
                continue;
            }
            rows.push(vec![
                Val::T(ep.id.clone()),
                Val::T(ep.kind.element_type().into()),
                Val::T(ep.name.clone()),
                Val::T(serde_json::to_string(ep)?),
                Val::I(end_ms),
                Val::I(end_ms),
                Val::T(self.node_of(ep)),
            ]);
        }
        self.insert_many(
            "INSERT INTO elements (id, type, name, payload, first_seen_ms, last_seen_ms, node)",
            rows,
            "ON CONFLICT (id) DO UPDATE SET type = excluded.type, name = excluded.name, payload = excluded.payload, last_seen_ms = excluded.last_seen_ms, node = excluded.node",
        )?;
        let mut pairs: BTreeMap<(&str, &str), i64> = BTreeMap::new();
        let mut rows = Vec::with_capacity(graph.edges.len());
        for (k, e) in &graph.edges {
            let first = unix_ms(e.first_seen);
            let p = pairs.entry((&*k.client, &*k.server)).or_insert(first);
            *p = (*p).min(first);
            let ends = [&k.client, &k.server].map(|id| {
                graph
                    .endpoints
                    .get(id)
                    .map(|ep| self.node_of(ep))
                    .unwrap_or_default()
            });
            rows.push(self.edge_vals(run_id, end_ms, k, e, first, ends)?);
        }
        self.insert_many(&format!("INSERT INTO edge_stats ({EDGE_COLS})"), rows, "")?;
        let rows = pairs
            .into_iter()
            .map(|((src, dst), first)| {
                vec![
                    Val::T(src.into()),
                    Val::T(dst.into()),
                    Val::I(first),
                    Val::I(end_ms),
                ]
            })
            .collect();
        self.insert_many(
            "INSERT INTO relationships (source_id, destination_id, first_seen_ms, last_seen_ms)",
            rows,
            "ON CONFLICT (source_id, destination_id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms",
        )?;
        Ok(run_id)
    }

    /// Inserts `rows` (each of the same columns) with as few statements as
    /// the drivers' limit on bound values allows: `head VALUES (…), (…) tail`.
    fn insert_many(&mut self, head: &str, rows: Vec<Vec<Val>>, tail: &str) -> Result<()> {
        let Some(width) = rows.first().map(Vec::len) else {
            return Ok(());
        };
        // Both drivers take at least 32766 values per statement.
        let per = (30_000 / width).max(1);
        for chunk in rows.chunks(per) {
            let mut sql = String::with_capacity(head.len() + chunk.len() * width * 5 + tail.len());
            sql.push_str(head);
            sql.push_str(" VALUES ");
            let mut n = 0;
            for (i, _) in chunk.iter().enumerate() {
                sql.push_str(if i == 0 { "(" } else { ", (" });
                for j in 0..width {
                    n += 1;
                    if j > 0 {
                        sql.push_str(", ");
                    }
                    sql.push('$');
                    sql.push_str(&n.to_string());
                }
                sql.push(')');
            }
            sql.push(' ');
            sql.push_str(tail);
            let vals: Vec<Val> = chunk.iter().flatten().cloned().collect();
            self.run(&sql, &vals)?;
        }
        Ok(())
    }

    /// The node an endpoint runs on: a pod's node, a Kubernetes node
    /// itself, this agent's node for its own host; empty for the others.
    fn node_of(&self, ep: &crate::enrich::Endpoint) -> String {
        use crate::enrich::EndpointKind;
        match ep.kind {
            EndpointKind::Pod => ep.node.clone().unwrap_or_default(),
            EndpointKind::Node => ep.name.clone(),
            EndpointKind::Host => self.who.node.clone(),
            _ => String::new(),
        }
    }

    /// One edge's statistics of one interval, as the values of EDGE_COLS;
    /// `ends` are the nodes its client and server run on.
    fn edge_vals(
        &self,
        run_id: i64,
        end_ms: i64,
        k: &crate::graph::EdgeKey,
        e: &crate::graph::EdgeStats,
        first: i64,
        ends: [String; 2],
    ) -> Result<Vec<Val>> {
        let h = e.handshake.as_ref();
        let [client_node, server_node] = ends;
        let srtt = e.health.srtt_us.as_ref();
        let drops = if e.health.drops.is_empty() {
            String::new()
        } else {
            serde_json::to_string(&e.health.drops)?
        };
        Ok([
            Val::I(run_id),
            Val::T(k.client.to_string()),
            Val::T(k.server.to_string()),
            Val::T(k.protocol.to_string()),
            Val::I(k.port as i64),
            Val::I(e.connections_opened as i64),
            Val::I(e.connections_active as i64),
            Val::I(e.packets_client_to_server as i64),
            Val::I(e.bytes_client_to_server as i64),
            Val::I(e.packets_server_to_client as i64),
            Val::I(e.bytes_server_to_client as i64),
            Val::I(h.map(|h| h.count as i64).unwrap_or(0)),
            Val::F(h.map(|h| h.min_us)),
            Val::F(h.map(|h| h.mean_us)),
            Val::F(h.map(|h| h.max_us)),
            Val::I(e.tcp_resets as i64),
            Val::I(first),
            Val::I(unix_ms(e.last_seen)),
        ]
        .into_iter()
        .chain(health_vals(&e.health))
        .chain([
            Val::T(self.who.node.clone()),
            Val::T(client_node),
            Val::T(server_node),
            Val::I(end_ms),
            Val::T(drops),
            Val::I(srtt.map(|s| s.samples as i64).unwrap_or(0)),
            Val::F(srtt.map(|s| s.min as f64)),
            Val::F(srtt.map(|s| s.mean)),
            Val::F(srtt.map(|s| s.max as f64)),
        ])
        .collect::<Vec<_>>())
    }

    /// Deletes what ended before `cutoff`. Returns the intervals deleted.
    pub fn retain(&mut self, cutoff: SystemTime) -> Result<u64> {
        let c = unix_ms(cutoff);
        self.run(
            "DELETE FROM edge_stats WHERE interval_end_ms < $1",
            &[Val::I(c)],
        )?;
        for (t, _) in rollup::GRAINS {
            self.run(
                &format!("DELETE FROM {t} WHERE interval_end_ms < $1"),
                &[Val::I(c)],
            )?;
        }
        let runs = self.run(
            "DELETE FROM crawl_runs WHERE interval_end_ms < $1",
            &[Val::I(c)],
        )?;
        self.run("DELETE FROM elements WHERE last_seen_ms < $1", &[Val::I(c)])?;
        self.run(
            "DELETE FROM relationships WHERE last_seen_ms < $1",
            &[Val::I(c)],
        )?;
        Ok(runs)
    }

    /// `sql` in this driver's dialect (the one difference the queries
    /// meet: SQLite's group_concat is PostgreSQL's string_agg).
    fn dialect<'a>(&self, sql: &'a str) -> std::borrow::Cow<'a, str> {
        match self.conn {
            Conn::Sqlite(_) => sql.into(),
            Conn::Postgres(_) => sql.replace("group_concat(", "string_agg(").into(),
        }
    }

    /// Runs `sql` with `vals` bound to `$1…` and reads each row with `each`.
    fn query_vals<T>(
        &mut self,
        sql: &str,
        vals: &[Val],
        each: fn(&dyn Cells) -> Result<T>,
    ) -> Result<Vec<T>> {
        let sql = self.dialect(sql).into_owned();
        let mut out = Vec::new();
        match &mut self.conn {
            Conn::Sqlite(c) => {
                let mut st = c.prepare(&sql)?;
                let mut rows = st.query(rusqlite::params_from_iter(vals.iter()))?;
                while let Some(r) = rows.next()? {
                    out.push(each(r)?);
                }
            }
            Conn::Postgres(c) => {
                let owned = pool::pg_params(vals);
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                    owned.iter().map(|b| b.as_ref()).collect();
                for r in c.query(&sql, &refs)? {
                    out.push(each(&r)?);
                }
            }
        }
        Ok(out)
    }

    /// Edges of the intervals that ended at or after `since`, summed (a
    /// connection several agents saw counted once, cluster.rs).
    pub fn edges(&mut self, since: SystemTime) -> Result<Vec<EdgeRow>> {
        Ok(self.edges_in(&Window::since(since), None)?.0)
    }

    /// Edges of the window, counted once across nodes (cluster.rs),
    /// busiest first. With `limit`, SQL reads at most that many (edge,
    /// node) rows, the busiest; true when the window had more.
    pub fn edges_in(&mut self, w: &Window, limit: Option<usize>) -> Result<(Vec<EdgeRow>, bool)> {
        let src = self.edge_source(w, unix_ms(SystemTime::now()))?;
        let q = EDGE_QUERY.replace("FROM edge_stats s", &format!("FROM {src} s"));
        let sql = match limit {
            None => q,
            Some(n) => format!(
                "{q}\nORDER BY SUM(s.bytes_c2s) + SUM(s.bytes_s2c) DESC, s.source_id, s.destination_id, s.port, s.node\nLIMIT {}",
                n + 1
            ),
        };
        let mut rows = self.query_vals(&sql, &[Val::I(w.from_ms), Val::I(w.to_ms)], edge_row)?;
        let truncated = limit.is_some_and(|n| rows.len() > n);
        if let Some(n) = limit {
            rows.truncate(n);
        }
        let agents = self.agents(w)?;
        let hosts = self.hosts(w)?;
        Ok((cluster::merge(rows, &agents, &hosts, w.live), truncated))
    }

    /// The agents that wrote intervals in the window: node, instance ID,
    /// end of its latest interval there.
    pub fn agents(&mut self, w: &Window) -> Result<Vec<AgentRow>> {
        self.query_vals(
            "SELECT node, MAX(instance_id), MAX(interval_end_ms) FROM crawl_runs
             WHERE interval_end_ms >= $1 AND interval_end_ms <= $2 GROUP BY node ORDER BY node",
            &[Val::I(w.from_ms), Val::I(w.to_ms)],
            |r| {
                Ok(AgentRow {
                    node: r.text(0)?,
                    instance_id: r.text(1)?,
                    last_interval_end_ms: r.int(2)?,
                })
            },
        )
    }

    /// The agents' own hosts (server mode) seen in the window, with their
    /// node and addresses: a peer address of another agent is that host.
    fn hosts(&mut self, w: &Window) -> Result<Vec<(String, String, Vec<String>)>> {
        self.query_vals(
            &format!(
                "SELECT id, node, payload FROM elements WHERE type = '{}' AND node <> '' AND last_seen_ms >= $1
                 ORDER BY id LIMIT {}",
                crate::enrich::server::HOST_TYPE,
                cluster::MAX_HOSTS
            ),
            &[Val::I(w.from_ms)],
            |r| {
                let p: serde_json::Value =
                    serde_json::from_str(&r.text(2)?).unwrap_or(serde_json::Value::Null);
                let addrs = p["addresses"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                Ok((r.text(0)?, r.text(1)?, addrs))
            },
        )
    }

    /// Elements seen at or after `since`.
    pub fn nodes(&mut self, since: SystemTime) -> Result<Vec<NodeRow>> {
        self.query_vals(NODE_QUERY, &[Val::I(unix_ms(since))], node_row)
    }

    /// Number of stored intervals (for tests and health).
    pub fn runs(&mut self) -> Result<u64> {
        let n: i64 = match &mut self.conn {
            Conn::Sqlite(c) => c.query_row("SELECT COUNT(*) FROM crawl_runs", [], |r| r.get(0))?,
            Conn::Postgres(c) => c.query_one("SELECT COUNT(*) FROM crawl_runs", &[])?.get(0),
        };
        Ok(n as u64)
    }
}

/// A row of EDGE_QUERY: one node's view of one edge over the window.
fn edge_row(r: &dyn Cells) -> Result<EdgeRow> {
    let n = |i| r.int(i).map(|v| v as u64);
    let handshakes = n(10)?;
    Ok(EdgeRow {
        source: r.text(0)?,
        target: r.text(1)?,
        protocol: r.text(2)?,
        port: r.int(3)? as u16,
        connections_opened: n(4)?,
        connections_active: n(5)?,
        packets_client_to_server: n(6)?,
        bytes_client_to_server: n(7)?,
        packets_server_to_client: n(8)?,
        bytes_server_to_client: n(9)?,
        handshake_count: handshakes,
        handshake_min_us: r.real(11)?,
        handshake_mean_us: r
            .real(12)?
            .filter(|_| handshakes > 0)
            .map(|w| w / handshakes as f64),
        handshake_max_us: r.real(13)?,
        tcp_resets: n(14)?,
        first_seen_ms: r.int(15)?,
        last_seen_ms: r.int(16)?,
        health: health_of(r, 17)?,
        node: r.text(27)?,
        seen_by: Vec::new(),
        last_interval_end_ms: r.int(30)?,
        client_node: r.text(28)?,
        server_node: r.text(29)?,
    })
    .map(|mut e| {
        e.health.drops = drops_of(r.opt_text(31).ok().flatten().as_deref());
        let samples = r.int(32).unwrap_or(0) as u64;
        if samples > 0 {
            let mut s = crate::status::Srtt::default();
            s.samples = samples;
            s.min = r.real(33).ok().flatten().unwrap_or(0.0) as u32;
            s.mean = r.real(34).ok().flatten().unwrap_or(0.0) / samples as f64;
            s.max = r.real(35).ok().flatten().unwrap_or(0.0) as u32;
            e.health.srtt_us = Some(s);
        }
        e
    })
}

/// The drops of a window: each interval's `{reason: count}`, joined by `;`.
fn drops_of(joined: Option<&str>) -> std::collections::BTreeMap<std::sync::Arc<str>, u64> {
    let mut out = std::collections::BTreeMap::new();
    for part in joined.unwrap_or("").split(';').filter(|p| !p.is_empty()) {
        if let Ok(m) = serde_json::from_str::<BTreeMap<String, u64>>(part) {
            for (k, v) in m {
                *out.entry(std::sync::Arc::from(k.as_str())).or_insert(0) += v;
            }
        }
    }
    out
}

/// A row of `SELECT id, type, name, payload, first_seen_ms, last_seen_ms`.
fn node_row(r: &dyn Cells) -> Result<NodeRow> {
    Ok(NodeRow {
        id: r.text(0)?,
        kind: r.text(1)?,
        name: r.text(2)?,
        payload: serde_json::from_str(&r.text(3)?).unwrap_or(serde_json::Value::Null),
        first_seen_ms: r.int(4)?,
        last_seen_ms: r.int(5)?,
    })
}

/// The health columns of an edge row, in the order of the insert.
fn health_vals(h: &crate::status::EdgeHealth) -> [Val; 10] {
    let f = &h.connections_failed;
    let rank = crate::status::Status::ALL
        .iter()
        .position(|s| *s == h.status)
        .unwrap_or(0);
    [
        Val::I(h.connections_attempted as i64),
        Val::I(f.refused as i64),
        Val::I(f.unanswered as i64),
        Val::I(f.unreachable as i64),
        Val::I(h.syn_retransmits as i64),
        Val::I(h.resets_client as i64),
        Val::I(h.resets_server as i64),
        Val::I(rank as i64),
        Val::I(h.retransmits_client_to_server as i64),
        Val::I(h.retransmits_server_to_client as i64),
    ]
}

/// The health columns of EDGE_QUERY, from column `at` on.
fn health_of(r: &dyn Cells, at: usize) -> Result<crate::status::EdgeHealth> {
    let n = |i: usize| r.int(at + i).map(|v| v as u64);
    Ok(crate::status::EdgeHealth {
        connections_attempted: n(0)?,
        connections_failed: crate::status::Failures {
            refused: n(1)?,
            unanswered: n(2)?,
            unreachable: n(3)?,
        },
        syn_retransmits: n(4)?,
        resets_client: n(5)?,
        resets_server: n(6)?,
        status: crate::status::Status::ALL
            .get(n(7)? as usize)
            .copied()
            .unwrap_or_default(),
        retransmits_client_to_server: n(8)?,
        retransmits_server_to_client: n(9)?,
        drops: Default::default(),
        srtt_us: None,
    })
}

/// One result row, whichever driver read it.
trait Cells {
    fn text(&self, i: usize) -> Result<String>;
    fn opt_text(&self, i: usize) -> Result<Option<String>>;
    fn int(&self, i: usize) -> Result<i64>;
    fn real(&self, i: usize) -> Result<Option<f64>>;
}

impl Cells for rusqlite::Row<'_> {
    fn text(&self, i: usize) -> Result<String> {
        Ok(self.get(i)?)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>> {
        Ok(self.get(i)?)
    }
    fn int(&self, i: usize) -> Result<i64> {
        Ok(self.get(i)?)
    }
    fn real(&self, i: usize) -> Result<Option<f64>> {
        Ok(self.get(i)?)
    }
}

impl Cells for postgres::Row {
    fn text(&self, i: usize) -> Result<String> {
        Ok(self.try_get(i)?)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>> {
        Ok(self.try_get(i)?)
    }
    fn int(&self, i: usize) -> Result<i64> {
        Ok(self.try_get(i)?)
    }
    fn real(&self, i: usize) -> Result<Option<f64>> {
        Ok(self.try_get(i)?)
    }
}
