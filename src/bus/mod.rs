//! The bus between the source and the consumer stage: one trait, two implementations.
//!
//! ```text
//!  source ──Vec<StreamItem>──▶ publish ──events──▶ Publisher (Kafka, or the embedded queue)
//!                                  │ per commit: one acknowledgement, in commit order
//!                                  ▼
//!                               acker ──▶ checkpoint (state DB) ──▶ durable LSN ──▶ source
//! ```
//!
//! The delivery rule of DESIGN §4 lives here: a commit's end LSN becomes durable only once
//! every event of that commit, and of every commit before it, is acknowledged by the bus and
//! the checkpoint row is committed. Kafka acknowledges with `acks=all`; the embedded bus
//! acknowledges once the consumer stage has an outcome for the event. A delivery failure
//! stops the pipeline with a transient error; the source then restarts from the durable
//! position and replays (at-least-once).

pub mod embedded;
pub mod kafka;
pub mod topic;

use std::future::Future;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use crate::Lsn;
use crate::event::ChangeEvent;
use crate::event::StreamItem;

/// A bus the engine can publish change events to.
pub trait Bus: Send + Sync + 'static {
    /// One warehouse's sending side.
    type Publisher: Publisher;
    /// A publisher for `warehouse_id`'s events (one per pipeline run).
    fn publisher(&self, warehouse_id: &str) -> Result<Self::Publisher, BusError>;
}

/// The acknowledgement of one commit: resolves to its end LSN once all its events are
/// delivered, or to the error that stopped one of them.
pub type CommitAck = BoxFuture<'static, Result<Lsn, BusError>>;

/// Sends one warehouse's events in source order.
pub trait Publisher: Send + 'static {
    /// Queues one event; waits while the bus is full (backpressure).
    fn send(&mut self, ev: Box<ChangeEvent>) -> impl Future<Output = Result<(), BusError>> + Send;
    /// Closes the commit ending at `end_lsn`: every event sent since the previous commit
    /// belongs to it.
    fn commit(&mut self, end_lsn: Lsn) -> impl Future<Output = Result<CommitAck, BusError>> + Send;
    /// The bus's name for metrics (`kafka`, `embedded`).
    fn bus_name(&self) -> &'static str;
}

/// Sends every event from `items` through `publisher`, handing each commit's acknowledgement
/// to `acks` in commit order. Ends when `items` closes or `acks` is dropped.
pub async fn publish<P: Publisher>(
    mut publisher: P,
    mut items: mpsc::Receiver<Vec<StreamItem>>,
    acks: mpsc::Sender<CommitAck>,
) -> Result<(), BusError> {
    let m = crate::metrics::metrics();
    // Events of the open transaction, and the labels of its warehouse.
    let mut in_commit: u64 = 0;
    let mut labels: Option<(String, &'static str)> = None;
    while let Some(batch) = items.recv().await {
        for item in batch {
            match item {
                StreamItem::Change(ev) => {
                    if labels.is_none() {
                        let w = ev.source.table.warehouse_id().to_string();
                        labels = Some((w, publisher.bus_name()));
                    }
                    in_commit += 1;
                    publisher.send(ev).await?
                }
                StreamItem::Commit { end_lsn, .. } => {
                    let ack = publisher.commit(end_lsn).await?;
                    let ack: CommitAck = match &labels {
                        Some((warehouse, bus)) if in_commit > 0 => {
                            let published = m.events_published.with_label_values(&[warehouse]);
                            m.events_decoded
                                .with_label_values(&[warehouse])
                                .inc_by(in_commit);
                            let timer = m
                                .produce_seconds
                                .with_label_values(&[warehouse.as_str(), bus])
                                .start_timer();
                            let n = in_commit;
                            Box::pin(async move {
                                let end = ack.await?;
                                timer.observe_duration();
                                published.inc_by(n);
                                Ok(end)
                            })
                        }
                        _ => ack,
                    };
                    in_commit = 0;
                    if acks.send(ack).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
    Ok(())
}

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
    /// The consumer stage behind the embedded bus has stopped.
    #[error("the consumer stage stopped: {0}")]
    ConsumerGone(String),
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
