//! InventorySync: change data capture from warehouse PostgreSQL databases.
//!
//! The crate is organised by pipeline stage; see the README for the architecture.

#![warn(missing_docs)]

pub mod api;
pub mod app;
pub mod backoff;
pub mod bus;
pub mod central;
pub mod check;
pub mod cli;
pub mod config;
pub mod console;
pub mod consumer;
pub mod event;
pub mod jobs;
pub mod json;
pub mod lsn;
pub mod metrics;
pub mod ownership;
pub mod pg;
pub mod rebase;
pub mod service;
pub mod setting;
pub mod source;
pub mod store;
pub mod tail;
pub mod time;
pub mod values;

pub use lsn::Lsn;
