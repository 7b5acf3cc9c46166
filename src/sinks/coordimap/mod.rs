//! The Coordimap collector: the wire format (`encode`), the on-disk
//! spool every batch goes through, and the sender that delivers it.

pub mod encode;
pub mod sender;
pub mod spool;

pub use encode::*;

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tracing::{info, warn};

use super::{Sink, SourceGraph};

/// The collector as a sink: each graph's batch goes into the spool, and
/// the sender (woken here) delivers it.
pub struct SpoolSink {
    pub spool: Arc<Mutex<spool::Spool>>,
    pub wake: Arc<Notify>,
}

impl Sink for SpoolSink {
    fn graph(&mut self, g: &SourceGraph) -> anyhow::Result<()> {
        let (body, elements) = g.body()?;
        let pushed = self
            .spool
            .lock()
            .map_err(|_| anyhow::anyhow!("spool lock poisoned"))?
            .push(body);
        match pushed {
            Ok(seq) => {
                info!(seq, data_source = %g.source.id, elements, edges = g.graph.edges.len(), "batch spooled");
                self.wake.notify_one();
            }
            Err(e) => warn!(error = %e, "writing the batch to the spool failed; batch lost"),
        }
        Ok(())
    }
}
