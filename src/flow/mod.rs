//! The flow model: connections keyed by what the kernel saw (`key`),
//! merged across drains and interfaces (`table`), oriented client → server
//! (`orient`), and the per-interval records (`record`) the agent prints and
//! the graph builder aggregates. Plain types only: the datapath hands over
//! `Observed` entries, never libbpf types.

pub mod health;
pub mod key;
pub mod names;
pub mod orient;
pub mod record;
pub mod table;

pub use health::*;
pub use key::*;
pub use names::EndNames;
pub use orient::*;
pub use record::*;
pub use table::*;
