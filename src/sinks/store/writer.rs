//! The store's writer thread: intervals queue here (bounded) and are
//! written off the agent loop, so a slow disk or database never holds it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Result};
use prometheus_client::metrics::counter::Counter;
use tracing::{info, warn};

use super::{Location, Store};
use crate::graph::Graph;

/// One interval to store.
pub struct Job {
    pub data_source_id: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub graph: Arc<Graph>,
    pub always: Vec<crate::enrich::Endpoint>,
}

struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

/// Queues a job; when `cap` jobs already wait, the oldest is dropped
/// (returns true then).
fn push_bounded(jobs: &mut VecDeque<Job>, job: Job, cap: usize) -> bool {
    let dropped = jobs.len() >= cap;
    if dropped {
        jobs.pop_front();
    }
    jobs.push_back(job);
    dropped
}

/// Writes on a thread of its own, so a slow disk or database never holds
/// up the agent loop. The queue is bounded; when it is full the oldest
/// interval waiting is dropped and counted.
pub struct Writer {
    q: Arc<(Mutex<Queue>, Condvar)>,
    cap: usize,
    pub dropped: Counter,
    pub written: Counter,
    pub errors: Counter,
    pub healthy: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The writer's counters on /metrics, and its health flag for /healthz.
pub struct Counters {
    pub written: Counter,
    pub errors: Counter,
    pub dropped: Counter,
    pub healthy: Arc<AtomicBool>,
}

impl Writer {
    /// Opens the store on the writer's own thread (its drivers block, and
    /// the PostgreSQL driver must not run inside an async runtime) and
    /// waits for the result, so a bad location is an error before anything
    /// is attached.
    pub fn start(loc: Location, retention: Duration, cap: usize, c: Counters) -> Result<Writer> {
        let q = Arc::new((
            Mutex::new(Queue {
                jobs: VecDeque::new(),
                closed: false,
            }),
            Condvar::new(),
        ));
        let (opened_tx, opened_rx) = std::sync::mpsc::channel();
        let (q2, w2, e2, h2) = (
            q.clone(),
            c.written.clone(),
            c.errors.clone(),
            c.healthy.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("flowmap-store".into())
            .spawn(move || {
                let store = match Store::open(&loc) {
                    Ok(s) => {
                        info!(store = %loc.describe(), retention = %crate::config::format_duration(retention), "store ready");
                        h2.store(true, Ordering::Relaxed);
                        let _ = opened_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                        return;
                    }
                };
                write_loop(store, &q2, retention, (&w2, &e2, &h2));
            })?;
        opened_rx
            .recv()
            .map_err(|_| anyhow!("the store thread ended before opening the store"))??;
        Ok(Writer {
            q,
            cap: cap.max(1),
            dropped: c.dropped,
            written: c.written,
            errors: c.errors,
            healthy: c.healthy,
            thread: Some(thread),
        })
    }

    pub fn submit(&self, job: Job) {
        let (m, cv) = &*self.q;
        if let Ok(mut g) = m.lock() {
            if push_bounded(&mut g.jobs, job, self.cap) {
                self.dropped.inc();
                warn!(
                    queue = self.cap,
                    "store too slow: oldest interval waiting to be stored dropped"
                );
            }
            cv.notify_one();
        }
    }

    /// Writes what is queued, then stops the thread.
    pub fn close(mut self) {
        {
            let (m, cv) = &*self.q;
            if let Ok(mut g) = m.lock() {
                g.closed = true;
                cv.notify_one();
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Takes queued intervals and writes them until the queue is closed and
/// empty; applies retention at most once a minute.
fn write_loop(
    mut store: Store,
    q: &(Mutex<Queue>, Condvar),
    retention: Duration,
    (written, errors, healthy): (&Counter, &Counter, &AtomicBool),
) {
    let mut last_retain = SystemTime::UNIX_EPOCH;
    loop {
        let job = {
            let (m, cv) = q;
            let mut g = match m.lock() {
                Ok(g) => g,
                Err(_) => return,
            };
            while g.jobs.is_empty() && !g.closed {
                g = match cv.wait(g) {
                    Ok(g) => g,
                    Err(_) => return,
                };
            }
            match g.jobs.pop_front() {
                Some(j) => j,
                None => return,
            }
        };
        match store.write(
            &job.data_source_id,
            job.start,
            job.end,
            &job.graph,
            &job.always,
        ) {
            Ok(_) => {
                written.inc();
                healthy.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                errors.inc();
                healthy.store(false, Ordering::Relaxed);
                warn!(error = %format!("{e:#}"), "storing the interval failed");
            }
        }
        let now = SystemTime::now();
        if now.duration_since(last_retain).unwrap_or_default() >= Duration::from_secs(60) {
            last_retain = now;
            match store.retain(now.checked_sub(retention).unwrap_or(UNIX_EPOCH)) {
                Ok(n) if n > 0 => {
                    info!(intervals = n, "store retention: old intervals deleted")
                }
                Ok(_) => {}
                Err(e) => warn!(error = %format!("{e:#}"), "store retention failed"),
            }
        }
    }
}

impl crate::sinks::Sink for Writer {
    fn graph(&mut self, g: &crate::sinks::SourceGraph) -> anyhow::Result<()> {
        self.submit(Job {
            data_source_id: g.source.id.clone(),
            start: g.start,
            end: g.end,
            graph: g.graph.clone(),
            always: g.always.clone(),
        });
        Ok(())
    }

    fn close(self: Box<Self>) {
        Writer::close(*self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(n: u64) -> Job {
        Job {
            data_source_id: format!("ds{n}"),
            start: UNIX_EPOCH,
            end: UNIX_EPOCH + Duration::from_secs(n),
            graph: Arc::new(Graph::default()),
            always: Vec::new(),
        }
    }

    #[test]
    fn the_write_queue_is_bounded_and_drops_the_oldest() {
        let mut q = VecDeque::new();
        assert!(!push_bounded(&mut q, job(1), 2));
        assert!(!push_bounded(&mut q, job(2), 2));
        assert!(push_bounded(&mut q, job(3), 2));
        let ids: Vec<&str> = q.iter().map(|j| j.data_source_id.as_str()).collect();
        assert_eq!(ids, vec!["ds2", "ds3"]);
    }
}
