//! flowmap's test kit (a dev-dependency only; never in the agent binary):
//! frame builders, the stand-in Kubernetes API server, namespaces joined
//! by veth pairs, the agent as a child process, a private PostgreSQL,
//! a loopback collector and temp files.

pub mod agent;
pub mod collector;
pub mod frames;
pub mod net;
pub mod postgres;
pub mod source;
pub mod standin;
pub mod tempdir;
