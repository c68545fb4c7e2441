//! The source stage: everything that reads a warehouse database.
//!
//! `conn` speaks the replication protocol, `pgoutput` decodes its payload, `assemble` and
//! `relation` turn messages into change events, `snapshot` reads the initial load, `slot`
//! prepares and checks the slot, and `stream` runs the replication loop.

pub mod assemble;
pub mod conn;
mod error;
pub mod marker;
pub mod pgoutput;
pub mod relation;
pub mod resync;
pub mod slot;
pub mod snapshot;
pub mod stream;

pub use error::{ServerError, SourceError};
