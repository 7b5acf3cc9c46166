//! Sinks: where each interval goes. Every sink takes the same two things
//! through one trait: the interval's connection records, then each data
//! source's graph. The Coordimap collector (encoding, spool, sender), the
//! local store (SQLite, PostgreSQL) and stdout are sinks.

pub mod coordimap;
pub mod stdout;
pub mod store;

use std::cell::OnceCell;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Result;

use crate::config::FlowsSource;
use crate::enrich::Endpoint;
use crate::flow::FlowRecord;
use crate::graph::Graph;

/// One data source's graph of one interval, as every sink receives it.
pub struct SourceGraph<'a> {
    pub source: &'a FlowsSource,
    pub skip_fields: &'a [String],
    pub start: SystemTime,
    pub end: SystemTime,
    pub graph: Arc<Graph>,
    /// Endpoints sent even without an edge (this host or node), so every
    /// interval says the agent is alive.
    pub always: Vec<Endpoint>,
    /// The Coordimap batch, encoded once for every sink that wants it.
    body: OnceCell<(Vec<u8>, usize)>,
}

impl<'a> SourceGraph<'a> {
    pub fn new(
        source: &'a FlowsSource,
        skip_fields: &'a [String],
        (start, end): (SystemTime, SystemTime),
        graph: Arc<Graph>,
        always: Vec<Endpoint>,
    ) -> SourceGraph<'a> {
        SourceGraph {
            source,
            skip_fields,
            start,
            end,
            graph,
            always,
            body: OnceCell::new(),
        }
    }

    /// With its body already encoded (by the pipeline, which measures it):
    /// `body` and `elements` must be what [`SourceGraph::body`] would
    /// encode.
    pub fn with_body(self, body: Vec<u8>, elements: usize) -> SourceGraph<'a> {
        let _ = self.body.set((body, elements));
        self
    }

    /// The Coordimap request body of this graph and its element count,
    /// encoded on first use.
    pub fn body(&self) -> Result<(&[u8], usize)> {
        if self.body.get().is_none() {
            let mut body = Vec::new();
            let n = coordimap::write_body(
                &mut body,
                &self.graph,
                &self.always,
                self.source,
                self.skip_fields,
                (self.start, self.end),
            )?;
            let _ = self.body.set((body, n));
        }
        let (b, n) = self.body.get().expect("set above");
        Ok((b, *n))
    }
}

/// A place the intervals go.
pub trait Sink: Send {
    /// The interval's connection records, before any graph.
    fn records(&mut self, _records: &[FlowRecord]) -> Result<()> {
        Ok(())
    }
    /// One data source's graph.
    fn graph(&mut self, g: &SourceGraph) -> Result<()>;
    /// The interval is complete (flush buffers).
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
    /// The agent stops: write what is queued.
    fn close(self: Box<Self>) {}
}
