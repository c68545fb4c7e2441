//! The embedded bus: an in-process, bounded queue per warehouse between the source and the
//! consumer stage, used when no `KAFKA_BROKERS` is configured (one node, same guarantees).
//!
//! Every event gets a sequence number in its warehouse's queue. The consumer stage reports the
//! highest sequence number it has an outcome for (applied, conflict, dead-lettered or skipped);
//! a commit's acknowledgement resolves once that reaches the commit's last event. So a
//! position becomes durable only after the consumer stage is done with it, and a crash
//! replays from the checkpoint exactly as with Kafka.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use super::{BusError, CommitAck};
use crate::Lsn;
use crate::event::ChangeEvent;

/// Events handed to the consumer in one message of the queue (at most).
const CHUNK_EVENTS: usize = 256;

/// One event and its place in its warehouse's queue.
#[derive(Debug)]
pub struct Delivery {
    /// 1-based sequence number within the warehouse's queue.
    pub seq: u64,
    /// The event.
    pub event: Box<ChangeEvent>,
}

/// A chunk in the queue with its share of the queue's room, given back when it is taken.
type Chunk = (Vec<Delivery>, OwnedSemaphorePermit);

struct Queue {
    tx: mpsc::UnboundedSender<Chunk>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Chunk>>>,
    /// Room for events, not chunks: a commit hands its events on at once, so with
    /// transactions of a few rows a bound of 64 chunks held 640 events, and the source
    /// waited whenever the consumer stage was busy preparing a batch (an outage's backlog of
    /// 10-row transactions caught up at 0.65 of `tail`'s drain).
    room: Arc<Semaphore>,
    /// The room a queue starts with (a chunk takes at most all of it).
    capacity: u32,
    /// Sequence number of the last event sent.
    sent: AtomicU64,
    /// Highest sequence number the consumer has an outcome for.
    done: watch::Sender<u64>,
}

/// The in-process bus: one bounded queue per warehouse.
pub struct EmbeddedBus {
    queues: Mutex<HashMap<String, Arc<Queue>>>,
    capacity_events: u32,
}

impl EmbeddedBus {
    /// A bus whose queues hold at most `capacity_events` events each (at least one chunk).
    pub fn new(capacity_events: usize) -> Arc<Self> {
        Arc::new(Self {
            queues: Mutex::new(HashMap::new()),
            capacity_events: u32::try_from(capacity_events.max(1)).unwrap_or(u32::MAX),
        })
    }

    fn queue(&self, warehouse_id: &str) -> Arc<Queue> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues
            .entry(warehouse_id.to_string())
            .or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                Arc::new(Queue {
                    tx,
                    rx: Mutex::new(Some(rx)),
                    room: Arc::new(Semaphore::new(self.capacity_events as usize)),
                    capacity: self.capacity_events,
                    sent: AtomicU64::new(0),
                    done: watch::Sender::new(0),
                })
            })
            .clone()
    }

    /// Per warehouse, events published but without an outcome yet (the consumer's lag).
    pub fn pending(&self) -> Vec<(String, u64)> {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues
            .iter()
            .map(|(w, q)| {
                let sent = q.sent.load(Ordering::Relaxed);
                (w.clone(), sent.saturating_sub(*q.done.borrow()))
            })
            .collect()
    }

    /// The consumer side of `warehouse_id`'s queue; there is one consumer per queue, so a
    /// second call returns `None`.
    pub fn subscribe(&self, warehouse_id: &str) -> Option<EmbeddedReceiver> {
        let queue = self.queue(warehouse_id);
        let rx = queue.rx.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        Some(EmbeddedReceiver { rx, queue })
    }
}

impl super::Bus for Arc<EmbeddedBus> {
    type Publisher = EmbeddedPublisher;

    fn publisher(&self, warehouse_id: &str) -> Result<EmbeddedPublisher, BusError> {
        Ok(EmbeddedPublisher {
            queue: self.queue(warehouse_id),
            chunk: Vec::new(),
        })
    }
}

/// One pipeline's sending side of a warehouse queue.
pub struct EmbeddedPublisher {
    queue: Arc<Queue>,
    chunk: Vec<Delivery>,
}

impl EmbeddedPublisher {
    async fn flush(&mut self) -> Result<(), BusError> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let closed = || BusError::ConsumerGone("its queue is closed".into());
        let chunk = std::mem::take(&mut self.chunk);
        let wanted = u32::try_from(chunk.len())
            .unwrap_or(u32::MAX)
            .min(self.queue.capacity);
        let room = self
            .queue
            .room
            .clone()
            .acquire_many_owned(wanted)
            .await
            .map_err(|_| closed())?;
        self.queue.tx.send((chunk, room)).map_err(|_| closed())
    }
}

impl super::Publisher for EmbeddedPublisher {
    fn bus_name(&self) -> &'static str {
        "embedded"
    }

    async fn send(&mut self, ev: Box<ChangeEvent>) -> Result<(), BusError> {
        let seq = self.queue.sent.fetch_add(1, Ordering::Relaxed) + 1;
        self.chunk.push(Delivery { seq, event: ev });
        if self.chunk.len() >= CHUNK_EVENTS {
            self.flush().await?;
        }
        Ok(())
    }

    async fn commit(&mut self, end_lsn: Lsn) -> Result<CommitAck, BusError> {
        self.flush().await?;
        let last = self.queue.sent.load(Ordering::Relaxed);
        let mut done = self.queue.done.subscribe();
        Ok(Box::pin(async move {
            done.wait_for(|d| *d >= last)
                .await
                .map_err(|_| BusError::ConsumerGone("the bus was dropped".into()))?;
            Ok(end_lsn)
        }))
    }
}

/// The consumer side of one warehouse's queue.
pub struct EmbeddedReceiver {
    rx: mpsc::UnboundedReceiver<Chunk>,
    queue: Arc<Queue>,
}

impl EmbeddedReceiver {
    /// The next chunk of events, in source order; `None` once every publisher is gone.
    pub async fn recv(&mut self) -> Option<Vec<Delivery>> {
        self.rx.recv().await.map(|(chunk, _room)| chunk)
    }

    /// Takes a chunk if one is ready, without waiting.
    pub fn try_recv(&mut self) -> Option<Vec<Delivery>> {
        self.rx.try_recv().ok().map(|(chunk, _room)| chunk)
    }

    /// Records that every event up to `seq` has an outcome.
    pub fn outcome_through(&self, seq: u64) {
        self.queue.done.send_if_modified(|d| {
            if seq > *d {
                *d = seq;
                true
            } else {
                false
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::{Bus, Publisher};
    use super::*;
    use crate::event::test_event;

    #[tokio::test]
    async fn a_commit_is_acknowledged_only_after_the_consumer_has_an_outcome() {
        let bus = EmbeddedBus::new(1024);
        let mut publisher = bus.publisher("wh").expect("publisher");
        let mut consumer = bus.subscribe("wh").expect("first subscriber");
        assert!(bus.subscribe("wh").is_none(), "one consumer per queue");
        publisher.send(test_event(1)).await.expect("send");
        publisher.send(test_event(2)).await.expect("send");
        let mut ack = publisher.commit(Lsn(100)).await.expect("commit");
        let chunk = consumer.recv().await.expect("chunk");
        assert_eq!(chunk.iter().map(|d| d.seq).collect::<Vec<_>>(), [1, 2]);
        consumer.outcome_through(1);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut ack)
                .await
                .is_err(),
            "half the commit has an outcome: not acknowledged"
        );
        consumer.outcome_through(2);
        assert_eq!(ack.await.expect("ack"), Lsn(100));
    }

    #[tokio::test]
    async fn a_full_queue_holds_the_publisher_back() {
        let bus = EmbeddedBus::new(1);
        let mut publisher = bus.publisher("wh").expect("publisher");
        let mut consumer = bus.subscribe("wh").expect("subscriber");
        publisher.send(test_event(1)).await.expect("send");
        let _ack = publisher.commit(Lsn(1)).await.expect("commit");
        publisher.send(test_event(2)).await.expect("send");
        let blocked = tokio::time::timeout(Duration::from_millis(50), publisher.commit(Lsn(2)));
        assert!(blocked.await.is_err(), "the queue is full: commit waits");
        assert_eq!(consumer.recv().await.expect("chunk").len(), 1);
        drop(publisher.commit(Lsn(2)).await.expect("room again"));
    }

    #[tokio::test]
    async fn the_queue_holds_events_not_chunks() {
        // A commit hands its events on at once: with a room of chunks, transactions of one
        // row filled it at one event per chunk.
        let bus = EmbeddedBus::new(4);
        let mut publisher = bus.publisher("wh").expect("publisher");
        let mut consumer = bus.subscribe("wh").expect("subscriber");
        for i in 1..=4 {
            publisher.send(test_event(i)).await.expect("send");
            drop(
                publisher
                    .commit(Lsn(i))
                    .await
                    .expect("room for four events"),
            );
        }
        publisher.send(test_event(5)).await.expect("send");
        let blocked = tokio::time::timeout(Duration::from_millis(50), publisher.commit(Lsn(5)));
        assert!(
            blocked.await.is_err(),
            "four events queued: the fifth waits"
        );
        assert_eq!(consumer.recv().await.expect("chunk").len(), 1);
        drop(publisher.commit(Lsn(5)).await.expect("room again"));
    }

    #[tokio::test]
    async fn a_new_publisher_continues_the_sequence_after_a_restart() {
        let bus = EmbeddedBus::new(1024);
        let mut consumer = bus.subscribe("wh").expect("subscriber");
        {
            let mut first = bus.publisher("wh").expect("publisher");
            first.send(test_event(1)).await.expect("send");
            drop(first.commit(Lsn(1)).await.expect("commit"));
        }
        let mut second = bus.publisher("wh").expect("publisher");
        second.send(test_event(1)).await.expect("send");
        let ack = second.commit(Lsn(1)).await.expect("commit");
        let mut seqs = Vec::new();
        while let Some(chunk) = consumer.try_recv() {
            seqs.extend(chunk.iter().map(|d| d.seq));
        }
        assert_eq!(seqs, [1, 2]);
        consumer.outcome_through(2);
        assert_eq!(ack.await.expect("ack"), Lsn(1));
    }

    #[tokio::test]
    async fn a_gone_consumer_is_an_error_not_a_hang() {
        let bus = EmbeddedBus::new(16);
        let mut publisher = bus.publisher("wh").expect("publisher");
        drop(bus.subscribe("wh"));
        publisher.send(test_event(1)).await.expect("buffered");
        let err = publisher.commit(Lsn(1)).await.err().expect("queue closed");
        assert!(matches!(err, BusError::ConsumerGone(_)), "{err}");
    }
}
