//! Where an interval's flows come from: the kernel datapath on a real
//! node, or (in tests, through the testkit) a fake that hands over flows
//! it was given. The pipeline sees only this trait.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tracing::warn;

use crate::datapath::ifaces::{self, Selection};
use crate::datapath::{Datapath, Drained};
use crate::serve::metrics::Metrics;

/// A source of drained flows and the names of the interfaces they came
/// through.
pub trait FlowSource {
    /// Follows the interfaces (attach new ones, detach gone ones); called
    /// every poll period. Returns how many interfaces are attached.
    fn poll(&mut self) -> usize;
    /// The flows since the previous drain, and the kernel's counters.
    fn drain(&mut self) -> Result<Drained>;
    /// The name of an interface by index (kept a while after it vanished).
    fn interface_name(&self, ifindex: u32) -> Arc<str>;
    /// Detaches from everything (at exit).
    fn detach_all(&mut self) {}
}

/// The real source: the loaded kernel program and the interfaces it
/// follows.
pub struct KernelSource {
    pub dp: Datapath,
    sel: Selection,
    /// Interface names by ifindex, with when each was last present; names
    /// of vanished interfaces are kept a while for their last flows.
    names: HashMap<u32, (Arc<str>, Instant)>,
    keep_names: Duration,
    metrics: Arc<Metrics>,
}

impl KernelSource {
    pub fn new(
        dp: Datapath,
        sel: Selection,
        interval: Duration,
        metrics: Arc<Metrics>,
    ) -> KernelSource {
        KernelSource {
            dp,
            sel,
            names: HashMap::new(),
            keep_names: interval * 2 + Duration::from_secs(5),
            metrics,
        }
    }
}

impl FlowSource for KernelSource {
    fn poll(&mut self) -> usize {
        match ifaces::list() {
            Ok(present) => {
                let now = Instant::now();
                for i in &present {
                    match self.names.get_mut(&i.ifindex) {
                        Some((n, seen)) if **n == *i.name => *seen = now,
                        _ => {
                            self.names.insert(i.ifindex, (i.name.as_str().into(), now));
                        }
                    }
                }
                self.dp.reconcile(&self.sel, &present);
                // Interfaces attached in a batch with classic filters move
                // to TCX a few at a time, so a poll is never held long.
                self.dp.hand_over_some(Duration::from_millis(150));
                let keep = self.keep_names;
                self.names.retain(|_, (_, seen)| seen.elapsed() < keep);
            }
            Err(e) => warn!(error = %e, "reading /sys/class/net failed"),
        }
        let n = self.dp.attached().count();
        self.metrics.interfaces_attached.set(n as i64);
        self.metrics
            .health
            .interfaces_attached
            .store(n as u64, Ordering::Relaxed);
        self.dp.poll_overflow();
        n
    }

    fn drain(&mut self) -> Result<Drained> {
        self.dp.drain()
    }

    fn interface_name(&self, ifindex: u32) -> Arc<str> {
        self.names
            .get(&ifindex)
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| format!("if{ifindex}").into())
    }

    fn detach_all(&mut self) {
        self.dp.detach_all();
        self.metrics
            .health
            .interfaces_attached
            .store(0, Ordering::Relaxed);
    }
}
