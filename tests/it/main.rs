//! Integration tests against real PostgreSQL servers started by the harness.

mod api;
mod chaos;
mod cli;
mod cluster;
mod console;
mod consumer;
mod errors;
mod harness;
mod kafka;
mod layers;
mod load;
mod operations;
mod partitions;
mod store;
mod stream;
mod verify;
mod versions;
mod workers;
