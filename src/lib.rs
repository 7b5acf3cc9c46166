//! flowmap: an eBPF network-flow agent, a drop-in implementation of
//! Coordimap's `flows` data source. The modules follow the path of a
//! packet (see the README's "Architecture"):
//! datapath → flow → enrich → graph (+ status) → sinks, served by serve, driven by
//! agent, commanded by cli; config is read by all of them.

pub mod agent;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod enrich;
pub mod flow;
pub mod graph;
pub mod mem;
pub mod serve;
pub mod sinks;
pub mod status;
