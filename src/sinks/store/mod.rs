//! The embedded store: every interval's graph, kept for a bounded time, in
//! SQLite (default) or PostgreSQL. Read by `flowmap top`, `flowmap graph`
//! and the map page (through a bounded pool of reads, pool.rs).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tracing::{info, warn};

use crate::config::{Database, Driver};
use crate::graph::Graph;

pub mod cluster;
pub mod live;
mod partition;
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
    /// The edge keys this connection wrote lately: their integer key, the
    /// nodes of their ends, and when their `last_seen_ms` was last set.
    keys: HashMap<KeyOf, Key>,
    /// The PostgreSQL partitions known to exist.
    known: partition::Known,
    /// A migration is running (partitions are made in its transaction).
    in_migration: bool,
    /// The bucket of each edge key's live row per span (live.rs), as this
    /// connection last wrote it.
    live: HashMap<i64, [i64; live::SPANS.len()]>,
    /// Those of the interval being written (remembered once committed).
    live_pending: Vec<(i64, usize, i64)>,
}

/// An edge key as the cache finds it: node, client, server, protocol, port.
type KeyOf = (String, String, String, String, u16);

#[derive(Debug, Clone, PartialEq)]
struct Key {
    id: i64,
    ends: [String; 2],
    refreshed_ms: i64,
}

/// Edge keys a connection remembers at most (then it starts over).
const KEYS_MAX: usize = 1 << 20;

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
    /// An integer that may be NULL (a zero counter is stored as NULL).
    O(Option<i64>),
    S(Option<String>),
}

impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Val::I(v) => v.to_sql(),
            Val::F(v) => v.to_sql(),
            Val::T(v) => v.to_sql(),
            Val::O(v) => v.to_sql(),
            Val::S(v) => v.to_sql(),
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
    // Version 4 (issue 15, scale): edges interned in `edge_keys`, rows of
    // numbers only, 5-minute rows written with each interval, PostgreSQL
    // time partitions (rollup.rs, partition.rs); the unread relationships
    // table goes. Made by `migrate_to_4`, which keeps every row.
    "@V4@",
    // Version 5 (issue 15, reads): per-edge totals of the live windows
    // (live.rs), made from the rows already there by `migrate_to_5`.
    "@V5@",
];

/// The schema version this flowmap writes.
pub const SCHEMA_VERSION: u32 = 5;

/// The PostgreSQL advisory lock key migrations hold (any agent of a fleet
/// starting at once waits for the one migrating): "flowmap" in ASCII.
const MIGRATION_LOCK: i64 = 0x0066_6c6f_776d_6170;

/// The rollup tables of schema version 3.
fn create_rollup_v3(name: &str) -> String {
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

/// A version 4 metric from a version 3 row `o`.
fn metric_v3(name: &str) -> String {
    match name {
        "handshake_sum_us" => {
            "NULLIF(COALESCE(o.handshake_mean_us, 0) * o.handshake_count, 0)".into()
        }
        "srtt_sum_us" => "NULLIF(COALESCE(o.srtt_mean_us, 0) * o.srtt_samples, 0)".into(),
        "drops" => "NULLIF(o.drops, '')".into(),
        n if n.ends_with("_us") || n.ends_with("_seen_ms") => format!("o.{n}"),
        n => format!("NULLIF(o.{n}, 0)"),
    }
}

/// The steps for SQLite (the rollup tables of rollup.rs filled in).
fn sqlite_migrations() -> Vec<String> {
    let rollups: String = ["edge_rollup_5m", "edge_rollup_1h"]
        .iter()
        .map(|t| create_rollup_v3(t))
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
    /// The order of "busiest first": bytes, then the edge's key and node.
    pub fn busiest_first(a: &EdgeRow, b: &EdgeRow) -> std::cmp::Ordering {
        b.bytes().cmp(&a.bytes()).then_with(|| {
            (&a.source, &a.target, a.port, &a.protocol, &a.node).cmp(&(
                &b.source,
                &b.target,
                b.port,
                &b.protocol,
                &b.node,
            ))
        })
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

/// Each edge of a window's rows `src` (rollup.rs), summed per edge key
/// (an edge as one node reported it); cluster.rs makes one edge of them.
/// The columns are those `edge_row` reads. With `limit`, the busiest that
/// many.
fn edge_query(src: &str, limit: Option<usize>) -> String {
    use rollup::{aggregate, Agg, METRICS};
    let sum = |n: &str| format!("CAST(COALESCE(SUM({n}), 0) AS BIGINT)");
    let agg: Vec<String> = METRICS
        .iter()
        .map(|(n, _, a)| {
            let e = match a {
                Agg::Sum if !n.ends_with("_us") => sum(n),
                Agg::Max if *n == "status_rank" => {
                    format!("CAST(COALESCE(MAX({n}), 0) AS BIGINT)")
                }
                a => aggregate(*a, n),
            };
            format!("{e} AS {n}")
        })
        .collect();
    // With a limit, the busiest edges are found first on their bytes
    // alone, and only their rows are summed in full.
    let (only, order) = match limit {
        None => (String::new(), String::new()),
        Some(n) => (
            format!(
                "\n  WHERE s.edge_id IN (SELECT t.edge_id FROM (SELECT s.edge_id,
    COALESCE(SUM(s.bytes_c2s), 0) + COALESCE(SUM(s.bytes_s2c), 0) AS bytes FROM {src} GROUP BY s.edge_id) t
    ORDER BY t.bytes DESC, t.edge_id LIMIT {})",
                n + 1
            ),
            format!(
                "\nORDER BY a.bytes_c2s + a.bytes_s2c DESC, a.edge_id\nLIMIT {}",
                n + 1
            ),
        ),
    };
    select_edges(
        &format!(
            "(SELECT s.edge_id, {}, MAX(s.last_end_ms) AS last_end_ms FROM {src}{only} GROUP BY s.edge_id)",
            agg.join(", ")
        ),
        &order,
    )
}

/// The window's per-edge rows from the live rows (live.rs: columns
/// edge_id, METRICS with a zero counter NULL, last_end_ms), as
/// `edge_query` gives them; with `limit`, of the busiest that many (and
/// one more), in no order.
fn live_query(l: &live::LiveRows, limit: Option<usize>) -> String {
    use rollup::{Agg, METRICS};
    let cols: Vec<String> = METRICS
        .iter()
        .map(|(n, t, a)| match a {
            Agg::Sum | Agg::Max if t.starts_with("BIGINT") => {
                format!("CAST(COALESCE(u.{n}, 0) AS BIGINT) AS {n}")
            }
            _ => format!("u.{n}"),
        })
        .collect();
    let (with, rows) = l.rows(limit);
    format!(
        "{with}{}",
        select_edges(
            &format!(
                "(SELECT u.edge_id, {}, u.last_end_ms FROM ({rows}) u)",
                cols.join(", ")
            ),
            "",
        )
    )
}

/// The columns `edge_row` reads, of the per-edge sums `a` joined to their
/// keys.
fn select_edges(a: &str, order: &str) -> String {
    format!(
        "SELECT k.source_id, k.destination_id, k.protocol, k.port,
  a.connections_opened, a.connections_active, a.packets_c2s, a.bytes_c2s, a.packets_s2c, a.bytes_s2c,
  a.handshake_count, a.handshake_min_us, a.handshake_sum_us, a.handshake_max_us, a.tcp_resets,
  a.first_seen_ms, a.last_seen_ms, a.connections_attempted, a.failed_refused, a.failed_unanswered,
  a.failed_unreachable, a.syn_retransmits, a.resets_client, a.resets_server, a.status_rank,
  a.retrans_c2s, a.retrans_s2c, k.node, k.client_node, k.server_node, a.last_end_ms, a.drops,
  a.srtt_samples, a.srtt_min_us, a.srtt_sum_us, a.srtt_max_us
FROM {a} a
JOIN edge_keys k ON k.id = a.edge_id{order}"
    )
}

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
            keys: HashMap::new(),
            known: Default::default(),
            in_migration: false,
            live: HashMap::new(),
            live_pending: Vec::new(),
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
        // (Made only when missing: a role that may only read, a hub's,
        // opens a store that is current.)
        let have = match &mut self.conn {
            Conn::Sqlite(_) => false,
            Conn::Postgres(c) => c
                .query_one("SELECT to_regclass('flowmap_schema') IS NOT NULL", &[])?
                .get(0),
        };
        if !have {
            self.exec_batch(
                "CREATE TABLE IF NOT EXISTS flowmap_schema (version INTEGER NOT NULL)",
            )?;
        }
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
            if step == "@V4@" || step == "@V5@" {
                self.exec_batch("BEGIN")?;
                self.in_migration = true;
                let res = if step == "@V4@" {
                    self.migrate_to_4()
                } else {
                    self.migrate_to_5()
                };
                let res = res.and_then(|_| {
                    self.exec_batch(&format!(
                        "INSERT INTO flowmap_schema (version) VALUES ({v}); COMMIT;"
                    ))
                });
                self.in_migration = false;
                if res.is_err() {
                    let _ = self.exec_batch("ROLLBACK");
                    self.known = Default::default();
                }
                res.with_context(|| format!("store migration to version {v}"))?;
            } else {
                self.exec_batch(&format!(
                    "BEGIN; {step}; INSERT INTO flowmap_schema (version) VALUES ({v}); COMMIT;"
                ))
                .with_context(|| format!("store migration to version {v}"))?;
            }
            info!(version = v, "store schema migrated");
        }
        self.ensure_indexes()
    }

    /// Indexes that change nothing a schema version reads or writes, so a
    /// store gets them without a new version (binaries of the same version
    /// keep working with it): the endpoints by type, for the agents' hosts
    /// and the nodes every map read asks for.
    fn ensure_indexes(&mut self) -> Result<()> {
        const INDEXES: [(&str, &str); 1] = [(
            "elements_type",
            "CREATE INDEX elements_type ON elements (type, last_seen_ms)",
        )];
        for (name, sql) in INDEXES {
            let have = self.query_vals(
                match self.conn {
                    Conn::Sqlite(_) => {
                        "SELECT name FROM sqlite_master WHERE type = 'index' AND name = $1"
                    }
                    Conn::Postgres(_) => {
                        "SELECT c.relname FROM pg_class c WHERE c.oid = to_regclass($1)"
                    }
                },
                &[Val::T(name.into())],
                |r| r.text(0),
            )?;
            // (A role that may not make it, a read-only hub's, reads
            // without it.)
            if have.is_empty() {
                match self.exec_batch(sql) {
                    Ok(()) => info!(index = name, "store index made"),
                    Err(e) => {
                        warn!(index = name, error = %format!("{e:#}"), "store index not made; reads are slower without it")
                    }
                }
            }
        }
        Ok(())
    }

    /// Version 3 to 4, in the caller's transaction: the version 3 edge
    /// tables are renamed, the new ones made, every row carried over (the
    /// interval rows not yet in a 5-minute row are added up into one),
    /// and the old tables dropped.
    fn migrate_to_4(&mut self) -> Result<()> {
        let pg = matches!(self.conn, Conn::Postgres(_));
        self.exec_batch(
            "ALTER TABLE edge_stats RENAME TO edge_stats_v3;
ALTER TABLE edge_rollup_5m RENAME TO edge_rollup_5m_v3;
ALTER TABLE edge_rollup_1h RENAME TO edge_rollup_1h_v3;
DROP TABLE relationships;",
        )?;
        self.exec_batch(&rollup::create_tables(pg))?;
        let key_cols = "source_id, destination_id, protocol, port, node, client_node, server_node, interval_end_ms";
        self.exec_batch(&format!(
            "INSERT INTO edge_keys (source_id, destination_id, protocol, port, node, client_node, server_node, last_seen_ms)
SELECT source_id, destination_id, protocol, port, node, MAX(client_node), MAX(server_node), MAX(interval_end_ms)
FROM (SELECT {key_cols} FROM edge_stats_v3 UNION ALL SELECT {key_cols} FROM edge_rollup_5m_v3
  UNION ALL SELECT {key_cols} FROM edge_rollup_1h_v3) o
GROUP BY source_id, destination_id, protocol, port, node"
        ))?;
        let five: i64 = self
            .query_vals(
                "SELECT done_ms FROM flowmap_rollups WHERE grain = 'edge_rollup_5m'",
                &[],
                |r| r.int(0),
            )?
            .first()
            .copied()
            .unwrap_or(0);
        let bucket = rollup::bucket_sql("interval_end_ms", rollup::GRAINS[0].1);
        if pg {
            for (table, slots) in [
                ("edge_stats", "SELECT interval_end_ms FROM edge_stats_v3".to_string()),
                (
                    "edge_rollup_5m",
                    format!("SELECT interval_end_ms FROM edge_rollup_5m_v3 UNION ALL SELECT {bucket} FROM edge_stats_v3 WHERE interval_end_ms > {five}"),
                ),
                ("edge_rollup_1h", "SELECT interval_end_ms FROM edge_rollup_1h_v3".to_string()),
            ] {
                let len = partition::SLOTS
                    .iter()
                    .find(|s| s.0 == table)
                    .map(|s| s.1)
                    .unwrap_or(86_400_000);
                let ends = self.query_vals(
                    &format!("SELECT DISTINCT (interval_end_ms / {len}) * {len} FROM ({slots}) x(interval_end_ms)"),
                    &[],
                    |r| r.int(0),
                )?;
                self.partitions_at(table, &ends)?;
            }
        }
        let m = rollup::metric_names();
        let old: Vec<String> = rollup::METRICS
            .iter()
            .map(|(n, _, _)| format!("{} AS {n}", metric_v3(n)))
            .collect();
        let old = old.join(", ");
        let join =
            "JOIN edge_keys k ON k.source_id = o.source_id AND k.destination_id = o.destination_id
  AND k.protocol = o.protocol AND k.port = o.port AND k.node = o.node";
        let aggs: Vec<String> = rollup::METRICS
            .iter()
            .map(|(n, _, a)| rollup::aggregate(*a, n))
            .collect();
        let sql = format!(
            "INSERT INTO edge_stats (interval_end_ms, edge_id, {m})
SELECT o.interval_end_ms, k.id, {old} FROM edge_stats_v3 o {join};
INSERT INTO edge_rollup_5m (interval_end_ms, edge_id, {m}, last_end_ms)
SELECT {bucket}, edge_id, {aggs}, MAX(last_end_ms) FROM (
  SELECT o.interval_end_ms, k.id AS edge_id, {old}, o.interval_end_ms AS last_end_ms FROM edge_rollup_5m_v3 o {join}
  UNION ALL
  SELECT o.interval_end_ms, k.id AS edge_id, {old}, o.interval_end_ms AS last_end_ms FROM edge_stats_v3 o {join}
  WHERE o.interval_end_ms > {five}) x
GROUP BY edge_id, {bucket};
INSERT INTO edge_rollup_1h (interval_end_ms, edge_id, {m}, last_end_ms)
SELECT o.interval_end_ms, k.id, {old}, o.interval_end_ms FROM edge_rollup_1h_v3 o {join};
DROP TABLE edge_stats_v3;
DROP TABLE edge_rollup_5m_v3;
DROP TABLE edge_rollup_1h_v3;",
            aggs = aggs.join(", "),
        );
        let sql = self.dialect(&sql).into_owned();
        self.exec_batch(&sql)?;
        Ok(())
    }

    /// Version 4 to 5, in the caller's transaction: the live rows, made
    /// for every edge with rows in the last two days (the longest span's
    /// keep).
    fn migrate_to_5(&mut self) -> Result<()> {
        let pg = matches!(self.conn, Conn::Postgres(_));
        self.exec_batch(&live::create_sql(pg))?;
        // Which intervals a writer of version 5 wrote (it keeps the live
        // rows); the rows there now are in the live rows made below. An
        // agent still on version 4 writes 0: a live window with its
        // intervals is read from the buckets.
        self.exec_batch(
            "ALTER TABLE crawl_runs ADD COLUMN live_rows BIGINT NOT NULL DEFAULT 0;
UPDATE crawl_runs SET live_rows = 1;
CREATE INDEX crawl_runs_without_live ON crawl_runs (interval_end_ms) WHERE live_rows = 0;",
        )?;
        let now = unix_ms(SystemTime::now());
        self.rebuild_live(now - 2 * 86_400_000 - 2 * 3_600_000, &[])
    }

    fn run(&mut self, sql: &str, vals: &[Val]) -> Result<u64> {
        let sql = &*self.dialect(sql).into_owned();
        match &mut self.conn {
            Conn::Sqlite(c) => Ok(c.execute(sql, rusqlite::params_from_iter(vals.iter()))? as u64),
            Conn::Postgres(c) => {
                let owned = pool::pg_params(vals);
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
        if !graph.edges.is_empty() {
            self.partitions_at("edge_stats", &[end_ms])?;
            self.partitions_at(
                "edge_rollup_5m",
                &[rollup::bucket(end_ms, rollup::GRAINS[0].1)],
            )?;
        }
        self.exec_batch("BEGIN")?;
        let mut pending = Vec::new();
        self.live_pending.clear();
        let res = self.write_inner(ds, start_ms, end_ms, graph, always, &mut pending);
        match res {
            Ok(id) => {
                self.exec_batch("COMMIT")?;
                // Keys are remembered once they are committed.
                if self.keys.len() + pending.len() > KEYS_MAX {
                    self.keys.clear();
                }
                self.keys.extend(pending);
                let pending_live = std::mem::take(&mut self.live_pending);
                if self.live.len() + pending_live.len() > KEYS_MAX {
                    self.live.clear();
                }
                for (id, span, gen) in pending_live {
                    self.live.entry(id).or_default()[span] = gen;
                }
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
        pending: &mut Vec<(KeyOf, Key)>,
    ) -> Result<i64> {
        // `live_rows` 1: this writer keeps the live rows (live.rs).
        let ins = "INSERT INTO crawl_runs (data_source_id, interval_start_ms, interval_end_ms, endpoints, edges, node, instance_id, live_rows) VALUES ($1, $2, $3, $4, $5, $6, $7, 1)";
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
        // Each edge's key, from the cache or written (and read back).
        let node = self.who.node.clone();
        let mut ids: Vec<Option<i64>> = Vec::with_capacity(graph.edges.len());
        let mut missing = Vec::new();
        let mut all_ends = Vec::with_capacity(graph.edges.len());
        for k in graph.edges.keys() {
            let ends = [&k.client, &k.server].map(|id| {
                graph
                    .endpoints
                    .get(id)
                    .map(|ep| self.node_of(ep))
                    .unwrap_or_default()
            });
            let of: KeyOf = (
                node.clone(),
                k.client.to_string(),
                k.server.to_string(),
                k.protocol.to_string(),
                k.port,
            );
            match self.keys.get(&of) {
                Some(c)
                    if c.ends == ends
                        && end_ms >= c.refreshed_ms
                        && end_ms - c.refreshed_ms < rollup::KEY_REFRESH_MS =>
                {
                    ids.push(Some(c.id))
                }
                _ => {
                    ids.push(None);
                    missing.push((ids.len() - 1, of));
                }
            }
            all_ends.push(ends);
        }
        if !missing.is_empty() {
            let rows: Vec<Vec<Val>> = missing
                .iter()
                .map(|(i, (n, c, s, p, port))| {
                    let [cn, sn] = all_ends[*i].clone();
                    vec![
                        Val::T(c.clone()),
                        Val::T(s.clone()),
                        Val::T(p.clone()),
                        Val::I(*port as i64),
                        Val::T(n.clone()),
                        Val::T(cn),
                        Val::T(sn),
                        Val::I(end_ms),
                    ]
                })
                .collect();
            let got = self.insert_returning(
                "INSERT INTO edge_keys (source_id, destination_id, protocol, port, node, client_node, server_node, last_seen_ms)",
                rows,
                "ON CONFLICT (source_id, destination_id, protocol, port, node) DO UPDATE SET client_node = excluded.client_node,
  server_node = excluded.server_node, last_seen_ms = GREATEST(edge_keys.last_seen_ms, excluded.last_seen_ms)
RETURNING id, source_id, destination_id, protocol, port, node",
            )?;
            let by: HashMap<KeyOf, i64> = got.into_iter().map(|(id, of)| (of, id)).collect();
            for (i, of) in missing {
                let id = *by
                    .get(&of)
                    .ok_or_else(|| anyhow::anyhow!("edge key {of:?} not returned"))?;
                ids[i] = Some(id);
                pending.push((
                    of,
                    Key {
                        id,
                        ends: all_ends[i].clone(),
                        refreshed_ms: end_ms,
                    },
                ));
            }
        }
        let five_end = rollup::bucket(end_ms, rollup::GRAINS[0].1);
        let mut raw = Vec::with_capacity(graph.edges.len());
        let mut five = Vec::with_capacity(graph.edges.len());
        let mut by_key = Vec::with_capacity(graph.edges.len());
        for ((_, e), id) in graph.edges.iter().zip(ids) {
            let id = id.unwrap_or_default();
            let vals = edge_vals(e)?;
            by_key.push((id, vals.clone()));
            let mut r = Vec::with_capacity(vals.len() + 2);
            r.push(Val::I(end_ms));
            r.push(Val::I(id));
            r.extend(vals.iter().cloned());
            raw.push(r);
            let mut f = Vec::with_capacity(vals.len() + 3);
            f.push(Val::I(five_end));
            f.push(Val::I(id));
            f.extend(vals);
            f.push(Val::I(end_ms));
            five.push(f);
        }
        let m = rollup::metric_names();
        self.insert_many(
            &format!("INSERT INTO edge_stats (interval_end_ms, edge_id, {m})"),
            raw,
            "",
        )?;
        self.insert_many(
            &format!("INSERT INTO edge_rollup_5m (interval_end_ms, edge_id, {m}, last_end_ms)"),
            five,
            &rollup::upsert_tail(),
        )?;
        let mut pending_live = std::mem::take(&mut self.live_pending);
        let res = self.write_live(end_ms, &by_key, &mut pending_live);
        self.live_pending = pending_live;
        res?;
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
            let sql = values_sql(head, chunk.len(), width, tail);
            let vals: Vec<Val> = chunk.iter().flatten().cloned().collect();
            self.run(&sql, &vals)?;
        }
        Ok(())
    }

    /// `insert_many` of edge keys whose `tail` ends in `RETURNING id,
    /// source_id, destination_id, protocol, port, node`: the keys written.
    fn insert_returning(
        &mut self,
        head: &str,
        rows: Vec<Vec<Val>>,
        tail: &str,
    ) -> Result<Vec<(i64, KeyOf)>> {
        let Some(width) = rows.first().map(Vec::len) else {
            return Ok(Vec::new());
        };
        let per = (30_000 / width).max(1);
        let mut out = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(per) {
            let sql = values_sql(head, chunk.len(), width, tail);
            let sql = self.dialect(&sql).into_owned();
            let vals: Vec<Val> = chunk.iter().flatten().cloned().collect();
            out.extend(self.query_vals(&sql, &vals, |r| {
                Ok((
                    r.int(0)?,
                    (
                        r.text(5)?,
                        r.text(1)?,
                        r.text(2)?,
                        r.text(3)?,
                        r.int(4)? as u16,
                    ),
                ))
            })?);
        }
        Ok(out)
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

    /// Deletes what ended before `cutoff` (PostgreSQL: partitions wholly
    /// before it are dropped). Returns the intervals deleted.
    pub fn retain(&mut self, cutoff: SystemTime) -> Result<u64> {
        let c = unix_ms(cutoff);
        self.expire("edge_stats", c, true)?;
        for (t, _) in rollup::GRAINS {
            self.expire(t, c, true)?;
        }
        let runs = self.run(
            "DELETE FROM crawl_runs WHERE interval_end_ms < $1",
            &[Val::I(c)],
        )?;
        self.run("DELETE FROM elements WHERE last_seen_ms < $1", &[Val::I(c)])?;
        // A key is refreshed by its writer at least every KEY_REFRESH_MS.
        self.run(
            "DELETE FROM edge_keys WHERE last_seen_ms < $1",
            &[Val::I(c.saturating_sub(rollup::KEY_REFRESH_MS))],
        )?;
        Ok(runs)
    }

    /// `sql` in this driver's dialect (the one difference the queries
    /// meet: SQLite's group_concat is PostgreSQL's string_agg).
    fn dialect<'a>(&self, sql: &'a str) -> std::borrow::Cow<'a, str> {
        match self.conn {
            Conn::Sqlite(_) => sql
                .replace("LEAST(", "MIN(")
                .replace("GREATEST(", "MAX(")
                .into(),
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
        let now = unix_ms(SystemTime::now());
        let (sql, ordered) = match self.live_source(w, now)? {
            Some(l) => (live_query(&l, limit), false),
            None => (edge_query(&self.edge_source(w, now)?.from, limit), true),
        };
        let mut rows = self.query_vals(&sql, &[], edge_row)?;
        let truncated = limit.is_some_and(|n| rows.len() > n);
        if let Some(n) = limit {
            // The busiest first: the live rows come in no order.
            if !ordered {
                rows.sort_by(EdgeRow::busiest_first);
            }
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

/// `head VALUES ($1, …), (…) tail` for `rows` rows of `width` values.
fn values_sql(head: &str, rows: usize, width: usize, tail: &str) -> String {
    let mut sql = String::with_capacity(head.len() + rows * width * 6 + tail.len());
    sql.push_str(head);
    sql.push_str(" VALUES ");
    let mut n = 0;
    for i in 0..rows {
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
    sql
}

/// One edge's numbers of one interval, in the order of rollup::METRICS
/// (a zero counter as NULL).
fn edge_vals(e: &crate::graph::EdgeStats) -> Result<Vec<Val>> {
    let h = e.handshake.as_ref();
    let srtt = e.health.srtt_us.as_ref();
    let f = &e.health.connections_failed;
    let hl = &e.health;
    let n = |v: u64| Val::O((v != 0).then_some(v as i64));
    let rank = crate::status::Status::ALL
        .iter()
        .position(|s| *s == hl.status)
        .unwrap_or(0);
    let drops = if hl.drops.is_empty() {
        None
    } else {
        Some(serde_json::to_string(&hl.drops)?)
    };
    let hs = h.map(|h| h.count).unwrap_or(0);
    let samples = srtt.map(|s| s.samples).unwrap_or(0);
    Ok(vec![
        Val::I(unix_ms(e.first_seen)),
        Val::I(unix_ms(e.last_seen)),
        n(e.connections_opened),
        n(e.connections_active),
        n(e.packets_client_to_server),
        n(e.bytes_client_to_server),
        n(e.packets_server_to_client),
        n(e.bytes_server_to_client),
        n(hs),
        Val::F(h.map(|h| h.min_us)),
        Val::F(h.filter(|_| hs > 0).map(|h| h.mean_us * hs as f64)),
        Val::F(h.map(|h| h.max_us)),
        n(e.tcp_resets),
        n(hl.connections_attempted),
        n(f.refused),
        n(f.unanswered),
        n(f.unreachable),
        n(hl.syn_retransmits),
        n(hl.resets_client),
        n(hl.resets_server),
        n(rank as u64),
        n(hl.retransmits_client_to_server),
        n(hl.retransmits_server_to_client),
        Val::S(drops),
        n(samples),
        Val::F(srtt.map(|s| s.min as f64)),
        Val::F(
            srtt.filter(|_| samples > 0)
                .map(|s| s.mean * samples as f64),
        ),
        Val::F(srtt.map(|s| s.max as f64)),
    ])
}

/// A row of `edge_query`: one node's view of one edge over the window.
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

/// The health columns of `edge_query`, from column `at` on.
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
