//! flowmap's benchmarks as a library: `flowmap-bench` runs them, and the
//! churn test reuses the load harness. Never part of the agent binary.

pub mod datapath;
pub mod drops;
pub mod health;
pub mod names;
pub mod page;
pub mod procs;
pub mod realpath;
pub mod scale;
pub mod store;
