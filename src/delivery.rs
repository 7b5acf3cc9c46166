//! Delivery to the Coordimap collector: an on-disk spool that every batch
//! goes through (so a batch survives a collector outage and an agent
//! restart), and a sender that posts the oldest batch until the collector
//! accepts it, in order, one at a time.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::VecDeque;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{watch, Notify};
use tracing::{error, info, warn};

use crate::config::Secret;
use crate::coordimap::Reply;

/// Counters of the delivery path (exported on /metrics).
#[derive(Debug, Default)]
pub struct DeliveryStats {
    pub batches_spooled: Counter,
    pub batches_delivered: Counter,
    pub attempts_failed: Counter,
    pub batches_dropped: Counter,
    pub batches_rejected: Counter,
    /// Unix seconds of the last accepted batch (0: never).
    pub last_delivery_unix: Gauge,
    /// Batches waiting in the spool now.
    pub spool_batches: Gauge,
}

/// Batches waiting for the collector, oldest first, bounded in bytes.
/// Each batch is one file `<seq>.json` holding the exact request body.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    files: VecDeque<(u64, u64)>,
    bytes: u64,
    last_seq: u64,
    stats: Arc<DeliveryStats>,
}

fn file_name(seq: u64) -> String {
    format!("{seq:020}.json")
}

impl Spool {
    /// Opens (creating) the spool directory and finds what an earlier run left.
    pub fn open(dir: &Path, max_bytes: u64, stats: Arc<DeliveryStats>) -> std::io::Result<Spool> {
        fs::create_dir_all(dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        }
        let mut files = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
                continue;
            }
            if let Some(seq) = name
                .strip_suffix(".json")
                .and_then(|s| s.parse::<u64>().ok())
            {
                files.push((seq, entry.metadata()?.len()));
            }
        }
        files.sort_unstable();
        let saved = fs::read_to_string(dir.join("last_seq"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let last_seq = files.last().map(|(s, _)| *s).unwrap_or(0).max(saved);
        let bytes = files.iter().map(|(_, b)| b).sum();
        if !files.is_empty() {
            info!(batches = files.len(), bytes, dir = %dir.display(), "undelivered batches found in the spool; they go first");
        }
        Ok(Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            files: files.into(),
            bytes,
            last_seq,
            stats,
        })
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Stores a batch; returns its sequence number. When the spool is over
    /// its size, the oldest batches are dropped (counted and logged); the
    /// newest is always kept.
    pub fn push(&mut self, body: &[u8]) -> std::io::Result<u64> {
        let seq = self.last_seq + 1;
        let tmp = self.dir.join(format!("{seq}.tmp"));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(body)?;
        f.sync_data()?;
        drop(f);
        fs::rename(&tmp, self.dir.join(file_name(seq)))?;
        self.last_seq = seq;
        fs::write(self.dir.join("last_seq"), seq.to_string())?;
        self.files.push_back((seq, body.len() as u64));
        self.bytes += body.len() as u64;
        self.stats.spool_batches.set(self.files.len() as i64);
        self.stats.batches_spooled.inc();
        while self.bytes > self.max_bytes && self.files.len() > 1 {
            if let Some((old, size)) = self.files.pop_front() {
                let _ = fs::remove_file(self.dir.join(file_name(old)));
                self.bytes -= size;
                self.stats.batches_dropped.inc();
                warn!(
                    seq = old,
                    bytes = size,
                    max_bytes = self.max_bytes,
                    "spool full: oldest undelivered batch dropped"
                );
            }
        }
        Ok(seq)
    }

    /// The oldest batch and its body.
    pub fn oldest(&self) -> Option<(u64, Vec<u8>)> {
        let (seq, _) = *self.files.front()?;
        fs::read(self.dir.join(file_name(seq)))
            .ok()
            .map(|b| (seq, b))
    }

    pub fn remove(&mut self, seq: u64) {
        if let Some(pos) = self.files.iter().position(|(s, _)| *s == seq) {
            if let Some((_, size)) = self.files.remove(pos) {
                self.bytes -= size;
            }
            let _ = fs::remove_file(self.dir.join(file_name(seq)));
        }
        self.stats.spool_batches.set(self.files.len() as i64);
    }
}

/// What one POST came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Delivered,
    /// Connect error, timeout, 5xx, 429, 408, or a reply that is not
    /// Coordimap's: retried with backoff.
    Transient(String),
    /// 401 / 403: the API key was refused. Retried slowly.
    Credentials(String),
    /// Another 4xx, or status.http_code other than 200: the collector
    /// will not take this batch; it is dropped and counted.
    Rejected(String),
}

pub fn classify(http: u16, body: &[u8]) -> Outcome {
    let text = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    match http {
        200..=299 => match serde_json::from_slice::<Reply>(body) {
            Ok(r) if r.status.http_code == 200 => Outcome::Delivered,
            Ok(r) if r.status.http_code == 401 || r.status.http_code == 403 => {
                Outcome::Credentials(format!(
                    "status.http_code {}: {}",
                    r.status.http_code, r.status.message
                ))
            }
            Ok(r) if r.status.http_code >= 500 || r.status.http_code == 429 => {
                Outcome::Transient(format!(
                    "status.http_code {}: {}",
                    r.status.http_code, r.status.message
                ))
            }
            Ok(r) => Outcome::Rejected(format!(
                "status.http_code {}: {}",
                r.status.http_code, r.status.message
            )),
            Err(_) => Outcome::Transient(format!(
                "HTTP {http} with a reply that is not Coordimap's: {}",
                text()
            )),
        },
        401 | 403 => Outcome::Credentials(format!("HTTP {http}")),
        408 | 429 | 500..=599 => Outcome::Transient(format!("HTTP {http}: {}", text())),
        _ => Outcome::Rejected(format!("HTTP {http}: {}", text())),
    }
}

/// Retry timing.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub first: Duration,
    pub max: Duration,
    /// Wait after a refused API key.
    pub credentials: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            first: Duration::from_millis(500),
            max: Duration::from_secs(60),
            credentials: Duration::from_secs(60),
        }
    }
}

impl Retry {
    /// Exponential backoff with jitter: a random wait between half and all
    /// of first × 2^(attempt-1), capped at max.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .first
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let d = exp.min(self.max);
        d.mul_f64(0.5 + fastrand::f64() * 0.5)
    }
}

pub struct Collector {
    client: reqwest::Client,
    endpoint: String,
    api_key: Secret,
}

impl Collector {
    pub fn new(endpoint: &str, api_key: Secret) -> anyhow::Result<Collector> {
        // reqwest is built without a default TLS provider; ring is ours.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .user_agent(concat!("flowmap/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Collector {
            client,
            endpoint: endpoint.to_string(),
            api_key,
        })
    }

    pub async fn post(&self, seq: u64, body: Vec<u8>) -> Outcome {
        let res = self
            .client
            .post(&self.endpoint)
            .header("Api-Key", self.api_key.expose())
            .header("Content-Type", "application/json")
            .header("X-Flowmap-Batch", seq.to_string())
            .body(body)
            .send()
            .await;
        match res {
            Err(e) => Outcome::Transient(format!("{}", e.without_url())),
            Ok(r) => {
                let status = r.status().as_u16();
                match r.bytes().await {
                    Ok(b) => classify(status, &b),
                    Err(e) => Outcome::Transient(format!("reading the reply: {}", e.without_url())),
                }
            }
        }
    }
}

/// Posts spooled batches, oldest first, until `finish` turns true and the
/// spool is empty (the caller bounds that last phase with a timeout).
pub async fn run_sender(
    spool: Arc<Mutex<Spool>>,
    collector: Collector,
    retry: Retry,
    wake: Arc<Notify>,
    mut finish: watch::Receiver<bool>,
    stats: Arc<DeliveryStats>,
) {
    let mut attempt = 0u32;
    loop {
        let next = spool.lock().ok().and_then(|s| s.oldest());
        let Some((seq, body)) = next else {
            if *finish.borrow() {
                return;
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = finish.changed() => {}
            }
            continue;
        };
        let wait = match collector.post(seq, body).await {
            Outcome::Delivered => {
                if let Ok(mut s) = spool.lock() {
                    s.remove(seq);
                }
                if attempt > 0 {
                    info!(
                        seq,
                        after_failures = attempt,
                        "collector reachable again; batch delivered"
                    );
                }
                attempt = 0;
                stats.batches_delivered.inc();
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                stats.last_delivery_unix.set(now as i64);
                continue;
            }
            Outcome::Rejected(why) => {
                error!(seq, reason = %why, "the collector rejected the batch; dropped");
                if let Ok(mut s) = spool.lock() {
                    s.remove(seq);
                }
                stats.batches_rejected.inc();
                continue;
            }
            Outcome::Transient(why) => {
                attempt += 1;
                stats.attempts_failed.inc();
                let d = retry.delay(attempt);
                warn!(seq, attempt, retry_in_ms = d.as_millis() as u64, reason = %why, "delivery failed; kept in the spool");
                d
            }
            Outcome::Credentials(why) => {
                attempt += 1;
                stats.attempts_failed.inc();
                error!(
                    seq,
                    reason = %why,
                    retry_in_s = retry.credentials.as_secs(),
                    "the collector refused the API key (coordimap.api_key); batches are kept in the spool"
                );
                retry.credentials
            }
        };
        if *finish.borrow() {
            // Shutting down: one more try soon, within the caller's timeout.
            tokio::time::sleep(wait.min(Duration::from_millis(500))).await;
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = finish.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("flowmap-spool-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn spool_keeps_order_across_reopen_and_drops_oldest_when_full() {
        let d = dir("order");
        let stats = Arc::new(DeliveryStats::default());
        let mut s = Spool::open(&d, 25, stats.clone()).unwrap();
        assert_eq!(s.push(b"aaaaaaaaaa").unwrap(), 1);
        assert_eq!(s.push(b"bbbbbbbbbb").unwrap(), 2);
        drop(s);
        let mut s = Spool::open(&d, 25, stats.clone()).unwrap();
        assert_eq!(s.oldest(), Some((1, b"aaaaaaaaaa".to_vec())));
        // 30 bytes > 25: batch 1 goes.
        assert_eq!(s.push(b"cccccccccc").unwrap(), 3);
        assert_eq!((s.len(), s.bytes()), (2, 20));
        assert_eq!(stats.batches_dropped.get(), 1);
        s.remove(2);
        assert_eq!(s.oldest(), Some((3, b"cccccccccc".to_vec())));
        s.remove(3);
        drop(s);
        // Sequence numbers continue after a restart with an empty spool.
        let mut s = Spool::open(&d, 25, stats).unwrap();
        assert!(s.is_empty());
        assert_eq!(s.push(b"d").unwrap(), 4);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn replies_are_classified() {
        let ok = br#"{"status":{"http_code":200,"message":"ok","error_code":""}}"#;
        assert_eq!(classify(200, ok), Outcome::Delivered);
        assert_eq!(classify(201, ok), Outcome::Delivered);
        assert!(matches!(
            classify(200, br#"{"status":{"http_code":500,"message":"db"}}"#),
            Outcome::Transient(_)
        ));
        assert!(matches!(
            classify(200, br#"{"status":{"http_code":400,"message":"bad"}}"#),
            Outcome::Rejected(_)
        ));
        assert!(matches!(
            classify(200, b"<html>proxy</html>"),
            Outcome::Transient(_)
        ));
        assert!(matches!(classify(503, b""), Outcome::Transient(_)));
        assert!(matches!(classify(429, b""), Outcome::Transient(_)));
        assert!(matches!(classify(401, b""), Outcome::Credentials(_)));
        assert!(matches!(classify(403, b""), Outcome::Credentials(_)));
        assert!(matches!(classify(400, b"no"), Outcome::Rejected(_)));
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let r = Retry {
            first: Duration::from_millis(100),
            max: Duration::from_secs(1),
            credentials: Duration::from_secs(60),
        };
        for _ in 0..50 {
            let d1 = r.delay(1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d3 = r.delay(3);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            let d10 = r.delay(10);
            assert!(d10 >= Duration::from_millis(500) && d10 <= Duration::from_secs(1));
        }
    }
}
