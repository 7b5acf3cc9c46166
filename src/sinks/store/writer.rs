//! The store's writer thread: intervals queue here (bounded) and are
//! written off the agent loop, so a slow disk or database never holds it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, Result};
use prometheus_client::metrics::counter::Counter;
use tracing::{info, warn};

use super::{Agent, Location, Store, Unreachable};
use crate::graph::Graph;

/// One interval to store.
pub struct Job {
    pub data_source_id: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub graph: Arc<Graph>,
    pub always: Vec<crate::enrich::Endpoint>,
}

/// The bytes the intervals waiting for the store may hold (an estimate of
/// their graphs' memory, `graph::fold::approx_bytes`), whatever their
/// number.
pub const QUEUE_MAX_BYTES: usize = 32 << 20;

/// The intervals waiting, each with its estimated size, and their total.
#[derive(Default)]
struct Jobs {
    q: VecDeque<(Job, usize)>,
    bytes: usize,
}

impl Jobs {
    fn len(&self) -> usize {
        self.q.len()
    }
    fn is_empty(&self) -> bool {
        self.q.is_empty()
    }
    fn pop_front(&mut self) -> Option<Job> {
        let (j, n) = self.q.pop_front()?;
        self.bytes -= n;
        Some(j)
    }
    fn push_front(&mut self, job: Job) {
        let n = crate::graph::fold::approx_bytes(&job.graph);
        self.bytes += n;
        self.q.push_front((job, n));
    }
}

struct Queue {
    jobs: Jobs,
    closed: bool,
}

/// Queues a job; while `cap` jobs already wait, or the queue would hold
/// more than `max_bytes`, the oldest is dropped. The number dropped (the
/// new job itself is always kept: an interval is bounded on its own).
fn push_bounded(jobs: &mut Jobs, job: Job, cap: usize, max_bytes: usize) -> u64 {
    let n = crate::graph::fold::approx_bytes(&job.graph);
    let mut dropped = 0;
    while !jobs.is_empty() && (jobs.len() >= cap || jobs.bytes + n > max_bytes) {
        jobs.pop_front();
        dropped += 1;
    }
    jobs.bytes += n;
    jobs.q.push_back((job, n));
    dropped
}

/// Writes on a thread of its own, so a slow disk or database never holds
/// up the agent loop. The queue is bounded; when it is full the oldest
/// interval waiting is dropped and counted.
pub struct Writer {
    q: Arc<(Mutex<Queue>, Condvar)>,
    cap: usize,
    /// Intervals dropped because the queue was full.
    dropped: Counter,
    /// Says the thread has ended.
    done: std::sync::mpsc::Receiver<()>,
}

/// The writer's counters on /metrics, and its health flag for /healthz.
pub struct Counters {
    pub written: Counter,
    pub errors: Counter,
    pub dropped: Counter,
    pub healthy: Arc<AtomicBool>,
}

/// How long a stopping agent waits for the store to take what is queued.
pub const CLOSE_DEADLINE: Duration = Duration::from_secs(10);

/// Longest wait between two attempts to reach an unreachable store.
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// How often old intervals are deleted (on a timer of its own, not after
/// writes, so retention runs while the agent sees no traffic).
const RETAIN_EVERY: Duration = Duration::from_secs(60);

impl Writer {
    /// Opens the store on the writer's own thread (its drivers block, and
    /// the PostgreSQL driver must not run inside an async runtime) and
    /// waits for the result: a bad location or a store newer than this
    /// flowmap is an error before anything is attached. A PostgreSQL
    /// server that cannot be reached yet is not: the writer keeps trying,
    /// with backoff, and the intervals wait in the bounded queue.
    pub fn start(loc: Location, retention: Duration, cap: usize, c: Counters) -> Result<Writer> {
        Writer::start_as(loc, Agent::default(), retention, cap, c)
    }

    /// `start`, the rows written carrying `who` (node and instance ID).
    pub fn start_as(
        loc: Location,
        who: Agent,
        retention: Duration,
        cap: usize,
        c: Counters,
    ) -> Result<Writer> {
        let q = Arc::new((
            Mutex::new(Queue {
                jobs: Jobs::default(),
                closed: false,
            }),
            Condvar::new(),
        ));
        let (opened_tx, opened_rx) = std::sync::mpsc::channel();
        let (done_tx, done) = std::sync::mpsc::channel();
        let st = WriterThread {
            loc,
            who,
            store: None,
            q: q.clone(),
            retention,
            written: c.written,
            errors: c.errors,
            healthy: c.healthy,
        };
        std::thread::Builder::new()
            .name("flowmap-store".into())
            .spawn(move || {
                let mut st = st;
                match st.first_open() {
                    Ok(()) => {
                        let _ = opened_tx.send(Ok(()));
                        st.run();
                    }
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                    }
                }
                let _ = done_tx.send(());
            })?;
        opened_rx
            .recv()
            .map_err(|_| anyhow!("the store thread ended before opening the store"))??;
        Ok(Writer {
            q,
            cap: cap.max(1),
            dropped: c.dropped,
            done,
        })
    }

    pub fn submit(&self, job: Job) {
        let (m, cv) = &*self.q;
        if let Ok(mut g) = m.lock() {
            let dropped = push_bounded(&mut g.jobs, job, self.cap, QUEUE_MAX_BYTES);
            if dropped > 0 {
                self.dropped.inc_by(dropped);
                warn!(
                    dropped,
                    queue = self.cap,
                    queue_bytes = g.jobs.bytes,
                    max_bytes = QUEUE_MAX_BYTES,
                    "store too slow or unreachable: oldest intervals waiting to be stored dropped"
                );
            }
            cv.notify_one();
        }
    }

    /// Writes what is queued, then stops the thread; gives up after
    /// `deadline` (a hung database never blocks shutdown).
    pub fn close_within(self, deadline: Duration) {
        let (m, cv) = &*self.q;
        if let Ok(mut g) = m.lock() {
            g.closed = true;
            cv.notify_one();
        }
        if self.done.recv_timeout(deadline).is_err() {
            let left = m.lock().map(|g| g.jobs.len()).unwrap_or(0);
            warn!(intervals = left, deadline = ?deadline, "the store did not finish in time; stopping without it");
        }
    }

    /// `close_within(CLOSE_DEADLINE)`.
    pub fn close(self) {
        self.close_within(CLOSE_DEADLINE)
    }
}

/// The writer thread's state: the store when connected, and the queue.
struct WriterThread {
    loc: Location,
    who: Agent,
    store: Option<Store>,
    q: Arc<(Mutex<Queue>, Condvar)>,
    retention: Duration,
    written: Counter,
    errors: Counter,
    healthy: Arc<AtomicBool>,
}

enum Next {
    Job(Job),
    /// Nothing queued for a while: time for retention.
    Idle,
    Closed,
}

impl WriterThread {
    fn first_open(&mut self) -> Result<()> {
        match Store::open(&self.loc) {
            Ok(mut s) => {
                s.set_agent(self.who.clone());
                info!(store = %self.loc.describe(), retention = %crate::config::format_duration(self.retention), "store ready");
                self.store = Some(s);
                self.healthy.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) if e.downcast_ref::<Unreachable>().is_some() => {
                warn!(store = %self.loc.describe(), error = %format!("{e:#}"), "the store cannot be reached yet; intervals wait in the queue and the writer keeps trying");
                self.healthy.store(false, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Waits up to `wait` for a job (or the close).
    fn next(&self, wait: Duration) -> Next {
        let (m, cv) = &*self.q;
        let Ok(mut g) = m.lock() else {
            return Next::Closed;
        };
        let until = Instant::now() + wait;
        while g.jobs.is_empty() && !g.closed {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Next::Idle;
            }
            g = match cv.wait_timeout(g, left) {
                Ok((g, _)) => g,
                Err(_) => return Next::Closed,
            };
        }
        match g.jobs.pop_front() {
            Some(j) => Next::Job(j),
            None => Next::Closed,
        }
    }

    /// Puts a job that could not be written back at the head of the queue
    /// (unless newer ones filled it meanwhile).
    fn requeue(&self, job: Job) {
        if let Ok(mut g) = self.q.0.lock() {
            g.jobs.push_front(job);
        }
    }

    fn closed(&self) -> bool {
        self.q.0.lock().map(|g| g.closed).unwrap_or(true)
    }

    /// The store, reconnecting when it is not connected (or its
    /// connection broke).
    fn connected(&mut self) -> Result<&mut Store> {
        if self.store.as_mut().is_some_and(|s| s.is_broken()) {
            warn!("the store's connection broke; reconnecting");
            self.store = None;
        }
        if self.store.is_none() {
            let mut s = Store::open(&self.loc)?;
            s.set_agent(self.who.clone());
            info!(store = %self.loc.describe(), "store reconnected");
            self.store = Some(s);
        }
        self.store
            .as_mut()
            .ok_or_else(|| anyhow!("the store is not connected"))
    }

    fn run(&mut self) {
        let mut last_retain = Instant::now() - RETAIN_EVERY;
        let mut backoff = Duration::from_secs(1);
        loop {
            let job = match self.next(RETAIN_EVERY.saturating_sub(last_retain.elapsed())) {
                Next::Closed => return,
                Next::Idle => None,
                Next::Job(j) => Some(j),
            };
            if let Some(job) = job {
                if self.write(&job) {
                    backoff = Duration::from_secs(1);
                } else if !self.closed() {
                    // Keep the interval and wait before trying again (a
                    // close ends the wait; then the queue is given up).
                    self.requeue(job);
                    let _ = self.next_wait(backoff);
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                }
            }
            if last_retain.elapsed() >= RETAIN_EVERY {
                last_retain = Instant::now();
                self.retain();
            }
        }
    }

    /// Sleeps `d`, or less when the writer is closed.
    fn next_wait(&self, d: Duration) -> bool {
        let (m, cv) = &*self.q;
        let Ok(g) = m.lock() else { return false };
        if g.closed {
            return false;
        }
        let _ = cv.wait_timeout_while(g, d, |g| !g.closed);
        true
    }

    /// Writes one interval; false when it could not be written because the
    /// store is unreachable (the caller keeps the interval).
    fn write(&mut self, job: &Job) -> bool {
        let res = self.connected().and_then(|s| {
            s.write(
                &job.data_source_id,
                job.start,
                job.end,
                &job.graph,
                &job.always,
            )
        });
        match res {
            Ok(_) => {
                self.written.inc();
                self.healthy.store(true, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.errors.inc();
                self.healthy.store(false, Ordering::Relaxed);
                warn!(error = %format!("{e:#}"), "storing the interval failed");
                let lost_connection = self.store.as_mut().is_none_or(|s| s.is_broken());
                // An interval the store refuses (not a connection problem)
                // is not retried: it would block every later one.
                !lost_connection
            }
        }
    }

    fn retain(&mut self) {
        let Some(store) = self.store.as_mut() else {
            return;
        };
        let now = super::unix_ms(SystemTime::now());
        match store.maintain(now, self.retention) {
            Ok(true) => {}
            Ok(false) => tracing::debug!("store maintenance: another agent is at it"),
            Err(e) => warn!(error = %format!("{e:#}"), "store rollups and retention failed"),
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
    use std::time::UNIX_EPOCH;

    fn job(n: u64) -> Job {
        Job {
            data_source_id: format!("ds{n}"),
            start: UNIX_EPOCH,
            end: UNIX_EPOCH + Duration::from_secs(n),
            graph: Arc::new(Graph::default()),
            always: Vec::new(),
        }
    }

    fn ids(q: &Jobs) -> Vec<&str> {
        q.q.iter().map(|(j, _)| j.data_source_id.as_str()).collect()
    }

    #[test]
    fn the_write_queue_is_bounded_and_drops_the_oldest() {
        let mut q = Jobs::default();
        assert_eq!(push_bounded(&mut q, job(1), 2, usize::MAX), 0);
        assert_eq!(push_bounded(&mut q, job(2), 2, usize::MAX), 0);
        assert_eq!(push_bounded(&mut q, job(3), 2, usize::MAX), 1);
        assert_eq!(ids(&q), vec!["ds2", "ds3"]);
    }

    /// A graph of `n` external endpoints, each with an edge to one host.
    fn big_job(id: u64, n: u32) -> Job {
        use crate::flow::FlowRecord;
        let host = crate::enrich::host::HostView {
            hostname: "h".into(),
            addrs: vec!["10.0.0.1".parse().unwrap()],
            ..Default::default()
        };
        let r = crate::enrich::server::ServerResolver {
            data_source_id: "ds",
            host: &host,
        };
        let recs: Vec<FlowRecord> = (0..n)
            .map(|i| {
                let src = std::net::Ipv4Addr::from(0x0b00_0000 + i).into();
                FlowRecord {
                    interface: "eth0".into(),
                    ifindex: 2,
                    protocol: "tcp".into(),
                    src_ip: src,
                    src_port: 40000,
                    dst_ip: "10.0.0.1".parse().unwrap(),
                    dst_port: 80,
                    src_to_dst: Default::default(),
                    dst_to_src: Default::default(),
                    tcp_flags: Default::default(),
                    first_seen: UNIX_EPOCH,
                    last_seen: UNIX_EPOCH,
                    handshake_rtt_us: None,
                    orientation: crate::flow::Orientation::Syn,
                    opened: true,
                    reset: false,
                    handshake_this_interval: None,
                    health: Default::default(),
                    srtt_us: None,
                    src_process: None,
                    dst_process: None,
                    rare: None,
                }
            })
            .collect();
        Job {
            graph: Arc::new(Graph::build(&recs, &r)),
            ..job(id)
        }
    }

    #[test]
    fn the_write_queue_is_bounded_in_bytes() {
        let one = crate::graph::fold::approx_bytes(&big_job(0, 1000).graph);
        assert!(
            one > 1000 * 500,
            "an estimate of {one} bytes for 1000 endpoints and edges"
        );
        let mut q = Jobs::default();
        // Room for two of them, however many jobs the count allows.
        let max = one * 2 + one / 2;
        assert_eq!(push_bounded(&mut q, big_job(1, 1000), 1024, max), 0);
        assert_eq!(push_bounded(&mut q, job(2), 1024, max), 0);
        assert_eq!(push_bounded(&mut q, big_job(3, 1000), 1024, max), 0);
        // The empty interval weighs nothing; the oldest big one goes.
        assert_eq!(push_bounded(&mut q, big_job(4, 1000), 1024, max), 1);
        assert_eq!(ids(&q), vec!["ds2", "ds3", "ds4"]);
        assert_eq!(q.bytes, one * 2);
        q.pop_front();
        q.pop_front();
        assert_eq!(q.bytes, one);
    }
}
