//! flowmap: an eBPF network-flow agent, a drop-in implementation of
//! Coordimap's `flows` data source. See DESIGN.md for the map of the parts.

pub mod agent;
pub mod config;
pub mod coordimap;
pub mod datapath;
pub mod delivery;
pub mod flow;
pub mod frames;
pub mod graph;
pub mod host;
pub mod k8s;
pub mod metrics;
pub mod scale;
pub mod store;
pub mod view;
pub mod web;
