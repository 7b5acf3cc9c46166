//! flowmap's test kit (a dev-dependency only; never in the agent binary):
//! frame builders, the stand-in Kubernetes API server, network namespaces
//! (`net::Netns`), the agent as a child process (`agent::Agent`), a
//! private PostgreSQL, a loopback collector, temp directories, a fake
//! flow source, flow records on a fixed clock, and known traffic through
//! a veth with an AF_PACKET capture to check the agent's counts against
//! (`traffic`), a synthetic cluster's intervals written into a store
//! (`mapstore`), and headless Chromium through WebDriver (`browser`).

pub mod agent;
pub mod browser;
pub mod collector;
pub mod dns;
pub mod frames;
pub mod mapstore;
pub mod net;
pub mod postgres;
pub mod records;
pub mod source;
pub mod standin;
pub mod tempdir;
pub mod traffic;
