//! The on-disk spool every batch goes through, so a batch survives a
//! collector outage and an agent restart. Bounded in bytes; oldest first.
//! A file that cannot be read or parsed goes to a bounded quarantine, so it
//! cannot stop delivery. The agent's instance ID (part of each batch's
//! idempotency key) is kept here too.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::VecDeque;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{error, info, warn};

/// Counters of the delivery path (exported on /metrics).
#[derive(Debug, Default)]
pub struct DeliveryStats {
    pub batches_spooled: Counter,
    pub batches_delivered: Counter,
    pub attempts_failed: Counter,
    pub batches_dropped: Counter,
    pub batches_rejected: Counter,
    /// Batches that could not be written to the spool (never sent).
    pub batches_lost: Counter,
    /// Spool files that could not be read or parsed, moved aside.
    pub spool_quarantined: Counter,
    /// Unix seconds of the last accepted batch (0: never).
    pub last_delivery_unix: Gauge,
    /// Batches waiting in the spool now.
    pub spool_batches: Gauge,
}

/// The quarantine (`<spool>/quarantine/`) keeps at most this many files…
pub const QUARANTINE_MAX_FILES: usize = 16;
/// …and at most this many bytes; the oldest go first.
pub const QUARANTINE_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// A spool file larger than this is not read (it cannot be a batch: one
/// batch's body is far smaller); it is quarantined.
pub const BATCH_READ_MAX: u64 = 64 * 1024 * 1024;

/// Batches waiting for the collector, oldest first, bounded in bytes.
/// Each batch is one file `<seq>.json` holding the exact request body.
///
/// Order rule: the sequence file is advanced (synced) *before* a batch's
/// file appears under that number, and a batch file exists only once it
/// is complete (renamed from a synced temporary file). So a batch whose
/// write failed leaves no file and burns its number; it is counted as lost
/// and nothing with a lower number can turn up later, after a restart or
/// otherwise: batches go out in increasing sequence order.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    files: VecDeque<(u64, u64)>,
    bytes: u64,
    last_seq: u64,
    instance: String,
    stats: Arc<DeliveryStats>,
}

/// Writes `name` in `dir` as a whole or not at all: a 0600 temporary file,
/// synced, renamed over the old one. On error nothing is left behind.
/// The directory is then synced so the new name survives a crash; a
/// failure there is logged (the file is in place, only its durability is
/// in doubt).
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!("{name}.tmp"));
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        drop(f);
        fs::rename(&tmp, dir.join(name))
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if let Err(e) = fs::File::open(dir).and_then(|d| d.sync_all()) {
        warn!(dir = %dir.display(), error = %e, "syncing the spool directory failed");
    }
    Ok(())
}

fn file_name(seq: u64) -> String {
    format!("{seq:020}.json")
}

/// A fresh random (version 4) UUID, from the kernel's random source.
fn new_uuid() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The agent instance ID kept in `dir/instance_id` (0600), made on first
/// use. It stays across restarts, so with the node name and the sequence
/// number it makes each batch's idempotency key unique.
fn instance_id(dir: &Path) -> std::io::Result<String> {
    let path = dir.join("instance_id");
    match fs::read_to_string(&path) {
        Ok(s) if is_uuid(s.trim()) => return Ok(s.trim().to_string()),
        Ok(_) => {
            warn!(path = %path.display(), "the instance ID file is not a UUID; a new one is made")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            warn!(path = %path.display(), error = %e, "the instance ID file cannot be read; a new one is made")
        }
    }
    let id = new_uuid()?;
    write_atomic(dir, "instance_id", id.as_bytes())?;
    info!(instance_id = %id, path = %path.display(), "new agent instance ID");
    Ok(id)
}

/// The agent instance ID of the spool directory `dir` (created 0700 when
/// missing), also when nothing is delivered: the store's rows carry it.
pub fn agent_instance_id(dir: &Path) -> std::io::Result<String> {
    private_dir(dir)?;
    instance_id(dir)
}

/// Creates `dir` 0700; an existing one that lets others in is named in a
/// warning and tightened. Files in it that are not 0600 are named too.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        warn!(path = %dir.display(), mode = %format!("{mode:o}"), "the spool directory is open to others (0700 expected); set to 0700");
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    for entry in fs::read_dir(dir)?.flatten() {
        let Ok(m) = entry.metadata() else { continue };
        let mode = m.permissions().mode() & 0o777;
        if m.is_file() && mode & 0o077 != 0 {
            warn!(path = %entry.path().display(), mode = %format!("{mode:o}"), "a spool file is open to others (0600 expected)");
        }
    }
    Ok(())
}

impl Spool {
    /// Opens (creating) the spool directory and finds what an earlier run left.
    pub fn open(dir: &Path, max_bytes: u64, stats: Arc<DeliveryStats>) -> std::io::Result<Spool> {
        private_dir(dir)?;
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
        stats.spool_batches.set(files.len() as i64);
        Ok(Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            files: files.into(),
            bytes,
            last_seq,
            instance: instance_id(dir)?,
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

    /// This agent's instance ID (a UUID kept in the spool directory).
    pub fn instance_id(&self) -> &str {
        &self.instance
    }

    /// Stores a batch; returns its sequence number. When the spool is over
    /// its size, the oldest batches are dropped (counted and logged); the
    /// newest is always kept. On error the batch is not in the spool and
    /// never will be (see the order rule on [`Spool`]); it is counted lost.
    pub fn push(&mut self, body: &[u8]) -> std::io::Result<u64> {
        let seq = self.last_seq + 1;
        // The number is used up whatever happens next.
        self.last_seq = seq;
        let written = write_atomic(&self.dir, "last_seq", seq.to_string().as_bytes())
            .and_then(|()| write_atomic(&self.dir, &file_name(seq), body));
        if let Err(e) = written {
            self.stats.batches_lost.inc();
            return Err(e);
        }
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
        self.stats.spool_batches.set(self.files.len() as i64);
        Ok(seq)
    }

    /// The oldest batch and its body. A file that cannot be read or is not
    /// JSON is quarantined on the way (see [`Spool::quarantine`]).
    pub fn oldest(&mut self) -> Option<(u64, Vec<u8>)> {
        loop {
            let (seq, _) = *self.files.front()?;
            match read_batch(&self.dir.join(file_name(seq))) {
                Ok(body) => return Some((seq, body)),
                Err(why) => self.quarantine(seq, &why),
            }
        }
    }

    /// Moves batch `seq`'s file to `<spool>/quarantine/` (bounded: the
    /// oldest there go past [`QUARANTINE_MAX_FILES`] or
    /// [`QUARANTINE_MAX_BYTES`]), counts and logs it, and goes on without it.
    fn quarantine(&mut self, seq: u64, why: &str) {
        let from = self.dir.join(file_name(seq));
        let qdir = self.dir.join("quarantine");
        let moved = private_dir(&qdir).and_then(|()| fs::rename(&from, qdir.join(file_name(seq))));
        let to = match moved {
            Ok(()) => qdir.display().to_string(),
            Err(e) => {
                let _ = fs::remove_dir_all(&from).or_else(|_| fs::remove_file(&from));
                format!("(not moved: {e}; removed)")
            }
        };
        error!(seq, path = %from.display(), reason = %why, quarantine = %to, "a spool file cannot be read or parsed; moved to the quarantine, delivery goes on");
        self.stats.spool_quarantined.inc();
        self.remove(seq);
        trim_quarantine(&qdir);
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

/// A batch file's body: read whole (up to [`BATCH_READ_MAX`]) and JSON.
fn read_batch(path: &Path) -> Result<Vec<u8>, String> {
    let f = fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut body = Vec::new();
    f.take(BATCH_READ_MAX + 1)
        .read_to_end(&mut body)
        .map_err(|e| format!("cannot read: {e}"))?;
    if body.len() as u64 > BATCH_READ_MAX {
        return Err(format!("larger than {BATCH_READ_MAX} bytes"));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(&body)
        .map_err(|e| format!("not a JSON batch: {e}"))?;
    Ok(body)
}

/// Removes the oldest entries of the quarantine until it is within bounds.
fn trim_quarantine(qdir: &Path) {
    let Ok(rd) = fs::read_dir(qdir) else { return };
    let mut entries: Vec<(String, u64, PathBuf)> = rd
        .flatten()
        .map(|e| {
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            (e.file_name().to_string_lossy().into_owned(), len, e.path())
        })
        .collect();
    entries.sort();
    let mut bytes: u64 = entries.iter().map(|e| e.1).sum();
    let mut count = entries.len();
    for (_, len, path) in entries {
        if count <= QUARANTINE_MAX_FILES && bytes <= QUARANTINE_MAX_BYTES {
            break;
        }
        let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
        warn!(path = %path.display(), "quarantine full: oldest quarantined file removed");
        count -= 1;
        bytes -= len;
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
        assert_eq!(s.push(b"\"aaaaaaaa\"").unwrap(), 1);
        assert_eq!(s.push(b"\"bbbbbbbb\"").unwrap(), 2);
        drop(s);
        let mut s = Spool::open(&d, 25, stats.clone()).unwrap();
        assert_eq!(s.oldest(), Some((1, b"\"aaaaaaaa\"".to_vec())));
        // 30 bytes > 25: batch 1 goes.
        assert_eq!(s.push(b"\"cccccccc\"").unwrap(), 3);
        assert_eq!((s.len(), s.bytes()), (2, 20));
        assert_eq!(stats.batches_dropped.get(), 1);
        s.remove(2);
        assert_eq!(s.oldest(), Some((3, b"\"cccccccc\"".to_vec())));
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
        assert_eq!(s.push(b"4").unwrap(), 4);
        assert_eq!(mode(d.join(file_name(4))), 0o600);
        let _ = fs::remove_dir_all(&d);
    }
}
