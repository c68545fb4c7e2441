//! Kafka through `rdkafka`: an idempotent producer with `acks=all`, topics created through
//! the admin API (the engine never relies on auto-creation), and the commit-ordered
//! acknowledgement that feeds checkpoints.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use secrecy::{ExposeSecret, SecretString};

use super::topic::TopicTemplate;
use super::{BusError, CommitAck, Record};
use crate::Lsn;
use crate::event::{ChangeEvent, TooLarge};

/// Kafka settings (DESIGN §7): `KAFKA_BROKERS` and the producer's knobs.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// Bootstrap servers.
    pub brokers: String,
    /// Topic name or template.
    pub topic: TopicTemplate,
    /// Partitions of topics the engine creates.
    pub partitions: i32,
    /// Replication factor of topics the engine creates.
    pub replication_factor: i32,
    /// `linger.ms`.
    pub linger_ms: u32,
    /// `batch.size` in bytes.
    pub batch_bytes: u32,
    /// `compression.type`.
    pub compression: String,
    /// `message.timeout.ms`: how long the producer retries one message before reporting it
    /// undelivered (the pipeline then replays from the checkpoint).
    pub message_timeout_ms: u32,
    /// Extra librdkafka properties (`security.protocol`, `sasl.*`, `ssl.*`); values are secret.
    pub properties: Vec<(String, SecretString)>,
    /// The consumer stage's group (`KAFKA_GROUP_ID`).
    pub group_id: String,
    /// Static group membership (`KAFKA_GROUP_INSTANCE_ID`): a restarted member with the same
    /// id gets its partitions back at once instead of after `session.timeout.ms`.
    pub group_instance_id: Option<String>,
    /// The dead-letter topic (`KAFKA_DLQ_TOPIC`).
    pub dlq_topic: String,
}

/// The default dead-letter topic (`KAFKA_DLQ_TOPIC`).
pub const DEFAULT_DLQ_TOPIC: &str = "inventorysync.dlq";

/// The record header that carries the table's relation OID at the warehouse (besides
/// `warehouse_id`, `table`, `op` and `version`, DESIGN §2): a mapping follows it.
pub const RELATION_OID_HEADER: &str = "relation_oid";

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MAX_RECORD_BYTES: usize = 1_000_000;

impl KafkaSettings {
    /// Defaults for everything but the brokers.
    pub fn new(brokers: &str) -> Self {
        Self {
            brokers: brokers.to_string(),
            topic: TopicTemplate::default(),
            partitions: 6,
            replication_factor: 1,
            // librdkafka's default is 5 ms: measured on Apache Kafka 4.4 at 200 changes/s,
            // commit -> applied at central p50 10.5 ms and p99 18.8 ms at 5, p50 6.2-6.4 and
            // p99 15.9-17.2 at 1, while a backlog drained as fast at either (batches fill while
            // requests are in flight). scripts/bench-consumer, docs/PERFORMANCE.md.
            linger_ms: 1,
            batch_bytes: 1 << 20,
            compression: "lz4".into(),
            message_timeout_ms: 30_000,
            properties: Vec::new(),
            group_id: "inventorysync".into(),
            group_instance_id: None,
            dlq_topic: DEFAULT_DLQ_TOPIC.into(),
        }
    }

    /// The largest record the producer takes: `message.max.bytes` from the Kafka
    /// properties, else librdkafka's default.
    pub fn max_record_bytes(&self) -> usize {
        self.properties
            .iter()
            .find(|(k, _)| k == "message.max.bytes")
            .and_then(|(_, v)| v.expose_secret().trim().parse().ok())
            .unwrap_or(DEFAULT_MAX_RECORD_BYTES)
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", "inventorysync")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", &self.compression)
            .set("linger.ms", self.linger_ms.to_string())
            .set("batch.size", self.batch_bytes.to_string())
            .set("message.timeout.ms", self.message_timeout_ms.to_string())
            .set("allow.auto.create.topics", "false")
            // The producer's queue is the bus's buffer: bounded, so a stopped broker holds
            // the source back instead of growing memory (default 1 GiB, 100,000 messages).
            .set("queue.buffering.max.kbytes", "32768")
            .set("queue.buffering.max.messages", "50000");
        for (k, v) in &self.properties {
            c.set(k, v.expose_secret());
        }
        c
    }
}

/// A connected producer with its admin client.
///
/// The producer is replaced after a failed delivery: an idempotent producer whose messages
/// timed out may be fenced by the broker for good, and a pipeline restarting on it would
/// fail forever. Each publisher keeps the producer it started with, so one warehouse's
/// failure never disturbs another's deliveries in flight.
pub struct KafkaBus {
    producer: Mutex<(u64, FutureProducer)>,
    admin: AdminClient<DefaultClientContext>,
    settings: KafkaSettings,
    known_topics: Mutex<HashSet<String>>,
}

impl KafkaBus {
    /// Creates the clients and checks that the brokers answer.
    pub async fn connect(settings: KafkaSettings) -> Result<Arc<Self>, BusError> {
        let config = settings.client_config();
        let producer: FutureProducer = config.create().map_err(|e| BusError::Config {
            key: "KAFKA_BROKERS / kafka properties".into(),
            reason: e.to_string(),
        })?;
        let admin: AdminClient<DefaultClientContext> = config.create()?;
        let client = producer.clone();
        let producer_for_bus = producer;
        let metadata = tokio::task::spawn_blocking(move || {
            client
                .client()
                .fetch_metadata(None, Duration::from_secs(10))
                .map(|m| m.brokers().len())
        })
        .await
        .map_err(|e| BusError::Unreachable {
            brokers: settings.brokers.clone(),
            reason: e.to_string(),
        })?;
        match metadata {
            Ok(n) if n > 0 => {}
            Ok(_) => {
                return Err(BusError::Unreachable {
                    brokers: settings.brokers.clone(),
                    reason: "no broker in the cluster metadata".into(),
                });
            }
            Err(e) => {
                return Err(BusError::Unreachable {
                    brokers: settings.brokers.clone(),
                    reason: e.to_string(),
                });
            }
        }
        Ok(Arc::new(Self {
            producer: Mutex::new((0, producer_for_bus)),
            admin,
            settings,
            known_topics: Mutex::new(HashSet::new()),
        }))
    }

    /// The topic template.
    pub fn topics(&self) -> &TopicTemplate {
        &self.settings.topic
    }

    /// Creates `topic` unless it exists (the engine never relies on auto-creation).
    pub async fn ensure_topic(&self, topic: &str) -> Result<(), BusError> {
        if self
            .known_topics
            .lock()
            .map(|k| k.contains(topic))
            .unwrap_or(false)
        {
            return Ok(());
        }
        let new = NewTopic::new(
            topic,
            self.settings.partitions,
            TopicReplication::Fixed(self.settings.replication_factor),
        );
        let results = self
            .admin
            .create_topics(
                &[new],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
            )
            .await?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(BusError::CreateTopic {
                        topic: name,
                        reason: code.to_string(),
                    });
                }
            }
        }
        if let Ok(mut k) = self.known_topics.lock() {
            k.insert(topic.to_string());
        }
        Ok(())
    }

    /// Produces one message and waits for its acknowledgement (the dead-letter topic).
    pub async fn send_and_wait(
        &self,
        topic: &str,
        key: &[u8],
        value: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<(), BusError> {
        self.ensure_topic(topic).await?;
        let mut h = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let record = FutureRecord::to(topic).key(key).payload(value).headers(h);
        let (generation, producer) = self.current_producer();
        match producer
            .send(
                record,
                Duration::from_millis(u64::from(self.settings.message_timeout_ms)),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err((e, _)) => {
                self.retire(generation);
                Err(BusError::Delivery {
                    topic: topic.to_string(),
                    reason: e.to_string(),
                })
            }
        }
    }

    /// Bootstrap servers.
    pub fn brokers(&self) -> &str {
        &self.settings.brokers
    }

    /// Extra librdkafka properties (for the consumer's client).
    pub fn settings(&self) -> &KafkaSettings {
        &self.settings
    }

    /// Waits until queued messages are delivered or `timeout` passes.
    pub fn flush(&self, timeout: Duration) {
        let _ = self.current_producer().1.flush(timeout);
    }

    fn current_producer(&self) -> (u64, FutureProducer) {
        self.producer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces producer `generation` (after a failed delivery) unless that happened already.
    fn retire(&self, generation: u64) {
        let mut current = self.producer.lock().unwrap_or_else(|p| p.into_inner());
        if current.0 != generation {
            return;
        }
        match self.settings.client_config().create::<FutureProducer>() {
            Ok(fresh) => {
                tracing::info!(
                    generation = generation + 1,
                    "new Kafka producer after a failed delivery"
                );
                *current = (generation + 1, fresh);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot create a new Kafka producer; keeping the old one")
            }
        }
    }
}

impl super::Bus for Arc<KafkaBus> {
    type Publisher = KafkaPublisher;

    fn publisher(&self, _warehouse_id: &str) -> Result<KafkaPublisher, BusError> {
        let (generation, producer) = self.current_producer();
        Ok(KafkaPublisher {
            max_record_bytes: self.settings.max_record_bytes(),
            bus: self.clone(),
            generation,
            producer,
            current: Vec::new(),
        })
    }
}

/// What a record carries besides its key and value (headers, framing), counted against the
/// producer's `message.max.bytes`.
const RECORD_OVERHEAD: usize = 512;

/// The column whose value takes the most room in the event's new (or old) row, and its size.
fn largest_column(ev: &ChangeEvent) -> (Option<&str>, usize) {
    let mut best = (None, 0);
    let mut buf = Vec::new();
    for (name, value) in ev
        .after
        .iter()
        .chain(ev.before.iter())
        .flat_map(|r| r.iter())
    {
        buf.clear();
        crate::event::write_value(&mut buf, value);
        if buf.len() > best.1 {
            best = (Some(name), buf.len());
        }
    }
    best
}

/// The envelope sent in place of a change too large for a record: its rows hold only the key
/// columns, and `too_large` says why (see [`TooLarge`]).
fn too_large_envelope(ev: &ChangeEvent, mark: &TooLarge) -> Vec<u8> {
    let key = ev.key.clone();
    let stand_in = ChangeEvent {
        before: if ev.after.is_none() {
            key.clone()
        } else {
            None
        },
        after: if ev.after.is_some() { key } else { None },
        source: ev.source.clone(),
        op: ev.op,
        ts_ms: ev.ts_ms,
        transaction: ev.transaction,
        key: ev.key.clone(),
    };
    let mut out = Vec::with_capacity(1024);
    stand_in.write_json(&mut out);
    out.pop();
    out.extend_from_slice(b",\"too_large\":");
    // A plain struct of numbers and strings always serializes.
    let _ = serde_json::to_writer(&mut out, mark);
    out.push(b'}');
    out
}

/// One pipeline's sending side: collects each commit's delivery futures.
pub struct KafkaPublisher {
    bus: Arc<KafkaBus>,
    generation: u64,
    producer: FutureProducer,
    current: Vec<(String, DeliveryFuture)>,
    /// The largest record the producer takes (read once, not per event).
    max_record_bytes: usize,
}

impl KafkaPublisher {
    /// Queues one record; waits while the producer's queue is full (backpressure).
    async fn send_record(
        &self,
        rec: &Record,
        source: &crate::event::TableSource,
    ) -> Result<DeliveryFuture, BusError> {
        let oid = source.oid().to_string();
        loop {
            let headers = OwnedHeaders::new_with_capacity(5)
                .insert(Header {
                    key: "warehouse_id",
                    value: Some(source.warehouse_id()),
                })
                .insert(Header {
                    key: "table",
                    value: Some(source.qualified_name()),
                })
                // The mapping of a renamed table follows its relation (issue 39).
                .insert(Header {
                    key: RELATION_OID_HEADER,
                    value: Some(oid.as_str()),
                })
                .insert(Header {
                    key: "op",
                    value: Some(rec.op),
                })
                .insert(Header {
                    key: "version",
                    value: Some(rec.version.as_str()),
                });
            let record = FutureRecord::to(&rec.topic)
                .key(&rec.key)
                .payload(&rec.value)
                .headers(headers);
            match self.producer.send_result(record) {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    self.bus.retire(self.generation);
                    return Err(e.into());
                }
            }
        }
    }
}

impl super::Publisher for KafkaPublisher {
    fn bus_name(&self) -> &'static str {
        "kafka"
    }

    async fn send(&mut self, ev: Box<ChangeEvent>) -> Result<(), BusError> {
        let topic = self.bus.topics().topic_for(&ev.source.table);
        self.bus.ensure_topic(&topic).await?;
        let mut rec = Record::new(&ev, topic);
        let limit = self.max_record_bytes;
        let size = rec.value.len() + rec.key.len() + RECORD_OVERHEAD;
        if size > limit {
            let (column, column_bytes) = largest_column(&ev);
            tracing::warn!(
                warehouse = ev.source.table.warehouse_id(),
                table = ev.source.table.qualified_name(),
                version = %ev.version(),
                bytes = size,
                limit,
                column,
                column_bytes,
                "change too large for a Kafka record; sending its key with the reason instead (the consumer stage dead-letters it as too_large)"
            );
            let mark = TooLarge {
                bytes: size as u64,
                limit: limit as u64,
                column: column.map(str::to_string),
                column_bytes: column_bytes as u64,
            };
            rec.value = too_large_envelope(&ev, &mark);
        }
        let fut = self.send_record(&rec, &ev.source.table).await?;
        self.current.push((rec.topic, fut));
        Ok(())
    }

    async fn commit(&mut self, end_lsn: Lsn) -> Result<CommitAck, BusError> {
        let deliveries = std::mem::take(&mut self.current);
        let (bus, generation) = (self.bus.clone(), self.generation);
        Ok(Box::pin(async move {
            let r = await_deliveries(end_lsn, deliveries).await;
            if r.is_err() {
                bus.retire(generation);
            }
            r
        }))
    }
}

/// Awaits one commit's deliveries; an error names the topic and the client's reason.
async fn await_deliveries(
    end_lsn: Lsn,
    deliveries: Vec<(String, DeliveryFuture)>,
) -> Result<Lsn, BusError> {
    for (topic, fut) in deliveries {
        match fut.await {
            Ok(Ok(_)) => {}
            // The broker refuses a record the producer took (the topic's max.message.bytes is
            // below the producer's message.max.bytes): sending it again cannot help.
            Ok(Err((e, _)))
                if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge) =>
            {
                return Err(BusError::Config {
                    key: format!("the max.message.bytes of topic {topic}"),
                    reason: format!(
                        "the broker refuses a record the producer's message.max.bytes allows ({e}): raise the topic's max.message.bytes to at least KAFKA_PROPERTY_MESSAGE_MAX_BYTES (changes above the producer's limit are dead-lettered as too_large), or lower that property"
                    ),
                });
            }
            Ok(Err((e, _))) => {
                return Err(BusError::Delivery {
                    topic,
                    reason: e.to_string(),
                });
            }
            Err(_) => {
                return Err(BusError::Delivery {
                    topic,
                    reason: "the producer was dropped before delivery".into(),
                });
            }
        }
    }
    Ok(end_lsn)
}

#[cfg(test)]
mod tests {
    use super::{TooLarge, largest_column, too_large_envelope};
    use crate::Lsn;
    use crate::event::{ChangeEvent, Op, Row, SnapshotMarker, SourceInfo, TableSource, Value};

    #[test]
    fn a_change_too_large_for_a_record_is_sent_as_its_key_and_the_reason() {
        let ev = ChangeEvent {
            before: None,
            after: Some(Row::from_pairs([
                ("sku", Value::String("SKU-1".into())),
                ("picture", Value::String("x".repeat(5000).into())),
                ("name", Value::String("small".into())),
            ])),
            source: SourceInfo {
                table: TableSource::new("wh", "db", "public", "products"),
                ts_ms: 1,
                ts_us: 1000,
                snapshot: SnapshotMarker::False,
                tx_id: Some(7),
                lsn: Lsn(100),
                commit_lsn: Lsn(200),
                sequence: 0,
                unchanged_toast: vec![],
            },
            op: Op::Update,
            ts_ms: 2,
            transaction: None,
            key: Some(Row::from_pairs([("sku", Value::String("SKU-1".into()))])),
        };
        let (column, bytes) = largest_column(&ev);
        assert_eq!((column, bytes), (Some("picture"), 5002));
        let mark = TooLarge {
            bytes: 6000,
            limit: 1000,
            column: column.map(str::to_string),
            column_bytes: bytes as u64,
        };
        let v: serde_json::Value = serde_json::from_slice(&too_large_envelope(&ev, &mark)).unwrap();
        assert_eq!(v["after"], serde_json::json!({"sku": "SKU-1"}));
        assert_eq!(v["before"], serde_json::Value::Null);
        assert_eq!(v["op"], "u");
        assert_eq!(v["source"]["commit_lsn"], 200);
        assert_eq!(v["too_large"]["column"], "picture");
        assert_eq!(v["too_large"]["limit"], 1000);
        assert!(
            mark.reason()
                .contains("column \"picture\" holds 5002 bytes")
        );
    }
}
