//! A fake flow source: hands the pipeline the drains it was given, one per
//! interval, so a whole interval runs without root or a kernel.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use anyhow::Result;
use flowmap::agent::source::FlowSource;
use flowmap::datapath::Drained;

#[derive(Default)]
pub struct FakeSource {
    drains: VecDeque<Drained>,
    names: HashMap<u32, Arc<str>>,
    pub polls: usize,
}

impl FakeSource {
    /// A source whose interfaces are `names` (ifindex, name).
    pub fn new(names: &[(u32, &str)]) -> FakeSource {
        FakeSource {
            names: names.iter().map(|(i, n)| (*i, Arc::from(*n))).collect(),
            ..Default::default()
        }
    }

    /// Queues what the next drain returns.
    pub fn push(&mut self, d: Drained) {
        self.drains.push_back(d);
    }
}

impl FlowSource for FakeSource {
    fn poll(&mut self) -> usize {
        self.polls += 1;
        self.names.len()
    }

    /// The next queued drain; an empty one when none is queued.
    fn drain(&mut self) -> Result<Drained> {
        Ok(self.drains.pop_front().unwrap_or_default())
    }

    fn interface_name(&self, ifindex: u32) -> Arc<str> {
        self.names
            .get(&ifindex)
            .cloned()
            .unwrap_or_else(|| format!("if{ifindex}").into())
    }
}
