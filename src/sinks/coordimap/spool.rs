//! The on-disk spool every batch goes through, so a batch survives a
//! collector outage and an agent restart. Bounded in bytes; oldest first.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::VecDeque;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

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

/// Writes `name` in `dir` as a whole or not at all: a 0600 temporary file,
/// synced, renamed over the old one, and the directory synced so the new
/// name survives a crash.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    drop(f);
    fs::rename(&tmp, dir.join(name))?;
    fs::File::open(dir)?.sync_all()
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
        write_atomic(&self.dir, &file_name(seq), body)?;
        self.last_seq = seq;
        write_atomic(&self.dir, "last_seq", seq.to_string().as_bytes())?;
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
        // Batches and the sequence file are the agent's alone.
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: PathBuf| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(d.join("last_seq")), 0o600);
        assert_eq!(mode(d.clone()), 0o700);
        // Sequence numbers continue after a restart with an empty spool.
        let mut s = Spool::open(&d, 25, stats).unwrap();
        assert!(s.is_empty());
        assert_eq!(s.push(b"d").unwrap(), 4);
        assert_eq!(mode(d.join(file_name(4))), 0o600);
        let _ = fs::remove_dir_all(&d);
    }
}
