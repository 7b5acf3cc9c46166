//! Stdout: `--output flows` prints one JSON object per connection per
//! interval; `--output graph` prints each data source's Coordimap batch,
//! one JSON document per line.

use std::io::Write;

use anyhow::Result;

use super::{Sink, SourceGraph};
use crate::flow::FlowRecord;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Print {
    Flows,
    Graph,
}

pub struct Stdout(pub Print);

impl Sink for Stdout {
    fn records(&mut self, records: &[FlowRecord]) -> Result<()> {
        if self.0 != Print::Flows {
            return Ok(());
        }
        let mut w = std::io::BufWriter::new(std::io::stdout().lock());
        for r in records {
            serde_json::to_writer(&mut w, r)?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
        Ok(())
    }

    fn graph(&mut self, g: &SourceGraph) -> Result<()> {
        if self.0 != Print::Graph {
            return Ok(());
        }
        let (body, _) = g.body()?;
        let mut w = std::io::stdout().lock();
        w.write_all(body)?;
        w.write_all(b"\n")?;
        w.flush()?;
        Ok(())
    }
}
