//! The source stage: everything that reads a warehouse database.
pub mod pgoutput;
