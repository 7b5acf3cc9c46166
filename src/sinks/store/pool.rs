//! Reads of the store for the map page's API: a bounded pool of
//! connections kept open between requests, a deadline per read (SQLite:
//! the statement is interrupted; PostgreSQL: the server's
//! statement_timeout), and queries whose rows are bounded.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Result;
use tokio::sync::Semaphore;

use super::{unix_ms, Conn, Location, NodeRow, Store, Val};

/// Why a read gave no answer.
#[derive(Debug)]
pub enum ReadError {
    /// Every connection stayed busy for the whole deadline.
    Busy,
    /// The read ran past the deadline and was stopped.
    Timeout,
    Failed(anyhow::Error),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Busy => f.write_str("every store connection is busy; try again"),
            ReadError::Timeout => {
                f.write_str("the store read ran past its deadline; narrow the window")
            }
            ReadError::Failed(e) => write!(f, "{e:#}"),
        }
    }
}

/// At most `size` connections, opened when first needed and reused; a
/// connection that broke is dropped and a new one opened next time.
pub struct ReadPool {
    loc: Location,
    idle: Arc<Mutex<Vec<Store>>>,
    permits: Arc<Semaphore>,
    timeout: Duration,
}

impl ReadPool {
    pub fn new(loc: Location, size: usize, timeout: Duration) -> ReadPool {
        ReadPool {
            loc,
            idle: Arc::new(Mutex::new(Vec::new())),
            permits: Arc::new(Semaphore::new(size.max(1))),
            timeout,
        }
    }

    /// Connections open now (idle ones; a read holds one more).
    pub fn idle(&self) -> usize {
        self.idle.lock().map(|v| v.len()).unwrap_or(0)
    }

    /// Runs `f` on a connection of the pool, off the runtime, within the
    /// deadline: waiting for a connection and reading share it. A read
    /// past the deadline is stopped (and holds its connection until it
    /// has, so the pool stays bounded).
    pub async fn read<T, F>(&self, f: F) -> Result<T, ReadError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T> + Send + 'static,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let permit = tokio::time::timeout_at(deadline, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| ReadError::Busy)?
            .map_err(|_| ReadError::Busy)?;
        let idle = self.idle.clone();
        let loc = self.loc.clone();
        let timeout = self.timeout;
        let interrupt: Arc<Mutex<Option<rusqlite::InterruptHandle>>> = Arc::default();
        let handle = interrupt.clone();
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut store = match idle.lock().ok().and_then(|mut v| v.pop()) {
                Some(s) => s,
                None => open_reader(&loc, timeout)?,
            };
            if let Conn::Sqlite(c) = &store.conn {
                if let Ok(mut h) = handle.lock() {
                    *h = Some(c.get_interrupt_handle());
                }
            }
            let out = f(&mut store);
            if !store.is_broken() {
                if let Ok(mut v) = idle.lock() {
                    v.push(store);
                }
            }
            out
        });
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(r)) => r.map_err(|e| {
                // The server's statement_timeout (equal to the deadline) may
                // answer a moment before the deadline does: the same cause.
                if stopped_at_deadline(&e) {
                    ReadError::Timeout
                } else {
                    ReadError::Failed(e)
                }
            }),
            Ok(Err(e)) => Err(ReadError::Failed(anyhow::anyhow!("store read: {e}"))),
            Err(_) => {
                if let Ok(h) = interrupt.lock() {
                    if let Some(h) = h.as_ref() {
                        h.interrupt();
                    }
                }
                Err(ReadError::Timeout)
            }
        }
    }
}

/// Whether a read failed because it was stopped at its deadline: a
/// PostgreSQL statement cancelled (SQLSTATE 57014, statement_timeout) or
/// an interrupted SQLite statement.
fn stopped_at_deadline(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<postgres::Error>()
            .and_then(|p| p.code())
            .is_some_and(|code| *code == postgres::error::SqlState::QUERY_CANCELED)
            || c.downcast_ref::<rusqlite::Error>().is_some_and(|r| {
                r.sqlite_error_code() == Some(rusqlite::ErrorCode::OperationInterrupted)
            })
    })
}

/// The values as the PostgreSQL driver binds them.
pub(crate) fn pg_params(vals: &[Val]) -> Vec<Box<dyn postgres::types::ToSql + Sync>> {
    vals.iter()
        .map(|v| -> Box<dyn postgres::types::ToSql + Sync> {
            match v {
                Val::I(i) => Box::new(*i),
                Val::F(f) => Box::new(*f),
                Val::T(t) => Box::new(t.clone()),
                Val::O(v) => Box::new(*v),
                Val::S(v) => Box::new(v.clone()),
            }
        })
        .collect()
}

/// A connection for reads; on PostgreSQL the server cancels its
/// statements after `timeout` (after the request's own deadline, which
/// began before the statement: the request answers first).
fn open_reader(loc: &Location, timeout: Duration) -> Result<Store> {
    let mut s = Store::open(loc)?;
    if let Conn::Postgres(c) = &mut s.conn {
        let ms = timeout.as_millis().clamp(1, u32::MAX as u128);
        c.batch_execute(&format!("SET statement_timeout = {ms}"))?;
    }
    Ok(s)
}

impl Store {
    /// The elements with these IDs (at most 500 per statement).
    pub fn nodes_by_ids(&mut self, ids: &[&str]) -> Result<Vec<NodeRow>> {
        let mut out = Vec::new();
        for chunk in ids.chunks(500) {
            let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "SELECT id, type, name, payload, first_seen_ms, last_seen_ms FROM elements WHERE id IN ({}) ORDER BY id",
                marks.join(", ")
            );
            let vals: Vec<Val> = chunk.iter().map(|s| Val::T(s.to_string())).collect();
            out.extend(self.query_vals(&sql, &vals, super::node_row)?);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// At most `limit` elements of these types seen at or after `since`.
    pub fn nodes_of_types(
        &mut self,
        since: SystemTime,
        types: &[&str],
        limit: usize,
    ) -> Result<Vec<NodeRow>> {
        let marks: Vec<String> = (2..types.len() + 2).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT id, type, name, payload, first_seen_ms, last_seen_ms FROM elements WHERE last_seen_ms >= $1 AND type IN ({}) ORDER BY id LIMIT {limit}",
            marks.join(", ")
        );
        let mut vals = vec![Val::I(unix_ms(since))];
        vals.extend(types.iter().map(|t| Val::T(t.to_string())));
        self.query_vals(&sql, &vals, super::node_row)
    }
}
