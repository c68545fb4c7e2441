//! The bus between the source and the consumer stage.
//!
//! ```text
//!  source ──Vec<StreamItem>──▶ publisher ──records──▶ Kafka (acks=all, idempotent)
//!                                  │ per commit: its delivery futures, in commit order
//!                                  ▼
//!                               acker ──▶ checkpoint (state DB) ──▶ durable LSN ──▶ source
//! ```
//!
//! The delivery rule of DESIGN §4 lives here: a commit's end LSN becomes durable only once
//! every event of that commit, and of every commit before it, is acknowledged by the bus and
//! the checkpoint row is committed. A delivery failure stops the pipeline with a transient
//! error; the source then restarts from the durable position and replays (at-least-once).

pub mod kafka;
pub mod topic;

use crate::event::ChangeEvent;

/// What can go wrong on the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The Kafka client reported an error.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A message was not delivered (after the producer's own retries).
    #[error("delivery to topic {topic} failed: {reason}")]
    Delivery {
        /// Topic.
        topic: String,
        /// The client's words.
        reason: String,
    },
    /// A topic could not be created.
    #[error("creating topic {topic}: {reason}")]
    CreateTopic {
        /// Topic.
        topic: String,
        /// The broker's words.
        reason: String,
    },
    /// The brokers cannot be reached.
    #[error("kafka brokers {brokers} unreachable: {reason}")]
    Unreachable {
        /// Bootstrap servers.
        brokers: String,
        /// The client's words.
        reason: String,
    },
    /// A configuration value cannot work.
    #[error("configuration key {key}: {reason}")]
    Config {
        /// Which key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The state DB failed while checkpointing.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl BusError {
    /// Whether retrying (reconnecting, replaying) can fix it.
    pub fn is_transient(&self) -> bool {
        !matches!(self, BusError::Config { .. })
    }
}

/// One event rendered for the bus: topic, key, value and the DESIGN §2 headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Topic name.
    pub topic: String,
    /// JSON key `{"warehouse_id","table","pk"}`.
    pub key: Vec<u8>,
    /// JSON envelope.
    pub value: Vec<u8>,
    /// Header `op`.
    pub op: &'static str,
    /// Header `version`.
    pub version: String,
}

impl Record {
    /// Renders `ev` for `topic`.
    pub fn new(ev: &ChangeEvent, topic: String) -> Self {
        let mut key = Vec::with_capacity(128);
        ev.write_key_json(&mut key);
        let mut value = Vec::with_capacity(640);
        ev.write_json(&mut value);
        Self {
            topic,
            key,
            value,
            op: ev.op.code(),
            version: ev.version(),
        }
    }
}
