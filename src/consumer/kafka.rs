//! The consumer side of the Kafka bus: a consumer group on the change topic(s). Several
//! `run` processes share the partitions; each change's offset is stored only once the stage
//! has an outcome for it, and stored offsets are committed in the background (and at stop).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::join_all;
use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{ClientContext, TopicPartitionList};
use secrecy::ExposeSecret;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Incoming, Stage};
use crate::bus::BusError;
use crate::bus::kafka::KafkaSettings;

/// How far the records read from one partition reach. A delivery covers everything read
/// before it, so its offsets are stored once per partition, not once per record.
struct Partition {
    topic: String,
    partition: i32,
    /// `topic/partition`: the ordered stream its records' lane progress is kept for.
    stream: Arc<str>,
    /// Highest offset read.
    read: i64,
    /// The offset read last.
    last: i64,
    /// Whether records were read since the last [`Partitions::take_marks`].
    fresh: bool,
    /// The group's assignment when `last` was read (see [`GroupEvents`]).
    assignment: u64,
    /// The offset stored for commit last (the next to read after a rebalance); where
    /// reading started before any was stored.
    stored: i64,
}

/// The partitions read so far (a consumer holds a few; a linear scan beats hashing the
/// topic name per record).
#[derive(Default)]
struct Partitions(Vec<Partition>);

impl Partitions {
    /// Notes a record at `offset`, read during the group's assignment `assignment`; returns
    /// the partition's stream id, and true the first time the partition is seen.
    fn read(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        assignment: u64,
    ) -> (Arc<str>, bool) {
        if let Some(p) = self
            .0
            .iter_mut()
            .find(|p| p.partition == partition && p.topic == topic)
        {
            if offset > p.last + 1 && assignment == p.assignment {
                // Offsets of our topics have no holes: the broker did not hand these out.
                let skipped = offset - p.last - 1;
                tracing::warn!(
                    topic,
                    partition,
                    offset,
                    after = p.last,
                    skipped,
                    "the broker skipped offsets of a partition being read (fine on a compacted topic or one with transaction markers; otherwise the broker lost those records)"
                );
                crate::metrics::metrics()
                    .consumer_offset_gaps
                    .with_label_values(&[topic])
                    .inc_by(u64::try_from(skipped).unwrap_or_default());
            } else if offset != p.last + 1 {
                tracing::debug!(
                    topic,
                    partition,
                    offset,
                    after = p.last,
                    "records read out of sequence (the partition moved and came back)"
                );
            }
            p.assignment = assignment;
            p.last = offset;
            p.read = p.read.max(offset);
            p.fresh = true;
            return (p.stream.clone(), false);
        }
        let stream: Arc<str> = Arc::from(format!("{topic}/{partition}"));
        self.0.push(Partition {
            topic: topic.to_string(),
            partition,
            stream: stream.clone(),
            last: offset,
            read: offset,
            fresh: true,
            assignment,
            stored: offset,
        });
        (stream, true)
    }

    /// Notes that `offset` (the next to read) was stored for commit on `topic/partition`.
    fn stored(&mut self, topic: &str, partition: i32, offset: i64) {
        if let Some(p) = self
            .0
            .iter_mut()
            .find(|p| p.partition == partition && p.topic == topic)
        {
            p.stored = p.stored.max(offset);
        }
    }

    /// Sets [`crate::metrics::Metrics::consumer_records_uncommitted`]: per topic, the
    /// records read whose offsets are not stored yet.
    fn gauge_uncommitted(&self) {
        let mut per_topic: Vec<(&str, i64)> = Vec::new();
        for p in &self.0 {
            let n = (p.read + 1 - p.stored).max(0);
            match per_topic.iter_mut().find(|(t, _)| *t == p.topic) {
                Some((_, sum)) => *sum += n,
                None => per_topic.push((&p.topic, n)),
            }
        }
        let gauge = &crate::metrics::metrics().consumer_records_uncommitted;
        for (topic, n) in per_topic {
            gauge.with_label_values(&[topic]).set(n);
        }
    }

    /// The highest offset read per partition since the last call: what a delivery of
    /// everything read covers. A partition with nothing new is left out, so an offset is
    /// never stored again after the partition moved away and came back.
    fn take_marks(&mut self) -> Vec<Position> {
        self.0
            .iter_mut()
            .filter_map(|p| {
                std::mem::take(&mut p.fresh).then(|| (p.topic.clone(), p.partition, p.read))
            })
            .collect()
    }
}

/// The highest offset per partition that a delivery covers.
type Position = (String, i32, i64);

/// A partition stopped at the first record of a warehouse this process does not know.
#[derive(Debug, Clone, PartialEq)]
struct Stopped {
    topic: String,
    partition: i32,
    /// The unknown warehouse's first record: neither it nor anything after it is given an
    /// outcome or committed here.
    offset: i64,
    warehouse: String,
}

/// Partitions stopped at a record of an unknown warehouse. Committing such a record's offset
/// without delivering it would lose it (a consumer whose configuration lacks a warehouse,
/// as in a rolling deploy): the partition waits at that record instead, until a consumer
/// that knows the warehouse takes the partition over (or this one restarts with it).
#[derive(Default)]
struct StoppedPartitions(Vec<Stopped>);

impl StoppedPartitions {
    /// Whether the record at `offset` lies at or after where its partition stopped. Records
    /// before it (read again after the partition moved away and came back) go on as usual.
    fn holds(&self, topic: &str, partition: i32, offset: i64) -> bool {
        self.0
            .iter()
            .any(|s| s.partition == partition && s.topic == topic && offset >= s.offset)
    }

    /// Stops the partition at `offset`; returns false when it already was stopped there or
    /// earlier.
    fn stop(&mut self, topic: &str, partition: i32, offset: i64, warehouse: &str) -> bool {
        if let Some(s) = self
            .0
            .iter_mut()
            .find(|s| s.partition == partition && s.topic == topic)
        {
            if s.offset <= offset {
                return false;
            }
            s.offset = offset;
            s.warehouse = warehouse.to_string();
            return true;
        }
        self.0.push(Stopped {
            topic: topic.to_string(),
            partition,
            offset,
            warehouse: warehouse.to_string(),
        });
        true
    }
}

/// The subscription for a topic template: the name, or a regex when it has placeholders.
fn subscription(template: &str) -> String {
    if !template.contains('{') {
        return template.to_string();
    }
    let mut re = String::from("^");
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        re.push_str(&regex::escape(&rest[..start]));
        let end = rest[start..]
            .find('}')
            .map_or(rest.len(), |e| start + e + 1);
        re.push_str(".+");
        rest = &rest[end..];
    }
    re.push_str(&regex::escape(rest));
    re.push('$');
    re
}

/// The consumer's default `session.timeout.ms` (see [`member`]).
pub const SESSION_TIMEOUT_MS: &str = "10000";

/// Fences within [`FENCE_WINDOW`] after which a consumer stops (see [`run`]).
const FENCES_BEFORE_STOP: usize = 3;

/// See [`FENCES_BEFORE_STOP`].
const FENCE_WINDOW: Duration = Duration::from_secs(300);

/// How a group member ended.
enum Ended {
    /// `cancel` (the process stops).
    Cancelled,
    /// The group coordinator fenced its `group.instance.id`.
    Fenced,
}

/// Consumes the change topic(s) in group `kafka.group_id` until `cancel`, delivering the
/// changes of `warehouses` (records of other warehouses are skipped).
///
/// A static member is fenced when another member joins with its `group.instance.id`: a
/// second process given the same id, or this very process rejoining after its session ran
/// out while the coordinator was out of reach (a broker stopped longer than
/// `session.timeout.ms`: seen on a 3-broker cluster). The fenced client is unusable, so the
/// consumer joins again with a new one, from the committed offsets (the lane positions skip
/// what it delivered since). Fenced [`FENCES_BEFORE_STOP`] times within [`FENCE_WINDOW`],
/// two processes share the id: it stops with a configuration error that says so.
pub async fn run(
    kafka: KafkaSettings,
    warehouses: HashSet<String>,
    stage: Arc<Stage>,
    cancel: CancellationToken,
) -> Result<(), BusError> {
    let mut fences: VecDeque<Instant> = VecDeque::new();
    loop {
        match member(&kafka, &warehouses, &stage, &cancel).await? {
            Ended::Cancelled => return Ok(()),
            Ended::Fenced => {
                fences.push_back(Instant::now());
                while fences.front().is_some_and(|t| t.elapsed() > FENCE_WINDOW) {
                    fences.pop_front();
                }
                let id = kafka.group_instance_id.as_deref().unwrap_or_default();
                if fences.len() >= FENCES_BEFORE_STOP {
                    return Err(BusError::Config {
                        key: "KAFKA_GROUP_INSTANCE_ID".into(),
                        reason: format!(
                            "fenced {} times within {} s in group {}: another consumer joins with the same group.instance.id {id:?}; give each run process its own KAFKA_GROUP_INSTANCE_ID (the default is the host name and the API_LISTEN port)",
                            fences.len(),
                            FENCE_WINDOW.as_secs(),
                            kafka.group_id,
                        ),
                    });
                }
                let wait = Duration::from_secs(2 * fences.len() as u64);
                tracing::warn!(group = %kafka.group_id, group_instance_id = %id, wait_s = wait.as_secs(), "the group coordinator fenced this consumer: its session ran out while the coordinator was out of reach, or another process uses the same group.instance.id; joining again from the committed offsets");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = cancel.cancelled() => return Ok(()),
                }
            }
        }
    }
}

/// One member of the group, from joining until `cancel` or a fence (see [`run`]).
async fn member(
    kafka: &KafkaSettings,
    warehouses: &HashSet<String>,
    stage: &Arc<Stage>,
    cancel: &CancellationToken,
) -> Result<Ended, BusError> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", &kafka.group_id)
        .set("client.id", "inventorysync-consumer")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Changes are small and latency matters: a fetch returns after at most 20 ms.
        .set("fetch.wait.max.ms", "20")
        // Prefetch at most 16 MiB (default 64 MiB per partition set): memory stays bounded.
        .set("queued.max.messages.kbytes", "16384")
        .set("fetch.max.bytes", "8388608")
        .set("queued.min.messages", "10000")
        // A full prefetch queue postpones the partition's next fetch by this much (default
        // 1 s): with the default the consumer drained the queue and then idled for up to a
        // second (measured: stalls of 400-700 ms every ~50,000 records), so fetch again soon.
        .set("fetch.queue.backoff.ms", "10")
        // Per-table topics appear as tables change; find them soon.
        .set("topic.metadata.refresh.interval.ms", "2000")
        // A static member (KAFKA_GROUP_INSTANCE_ID) sends no LeaveGroup when it stops, so a
        // process taken away for good holds its partitions until this runs out: 45 s by
        // default, measured as 56.8 s without a consumer for its partition on a 3-broker
        // cluster (tests/it/cluster.rs). A restarted process is back well within 10 s, and
        // keeps its partitions without a rebalance. KAFKA_PROPERTY_SESSION_TIMEOUT_MS
        // overrides it (a slower restart, e.g. a container rescheduled elsewhere).
        .set("session.timeout.ms", SESSION_TIMEOUT_MS);
    match &kafka.group_instance_id {
        Some(id) => {
            config.set("group.instance.id", id);
        }
        None => tracing::warn!(
            "no KAFKA_GROUP_INSTANCE_ID (and API_LISTEN has port 0): this consumer joins as a dynamic member, so after a crash its partitions wait for session.timeout.ms"
        ),
    }
    for (k, v) in &kafka.properties {
        config.set(k, v.expose_secret());
    }
    let events = GroupEvents::default();
    let assignment = events.assignment.clone();
    let consumer: Group = config
        .create_with_context(events)
        .map_err(|e| BusError::Config {
            key: "KAFKA_BROKERS / kafka properties".into(),
            reason: e.to_string(),
        })?;
    let topic = subscription(kafka.topic.as_str());
    consumer.subscribe(&[topic.as_str()])?;
    tracing::info!(group = %kafka.group_id, topic = %topic, "consuming");
    // What an earlier consumer had in flight is read again from the committed offsets.
    stage.forget_lanes(None).await;
    let limits = stage.settings().batch;
    let mut batches: HashMap<String, Vec<Incoming>> = HashMap::new();
    let mut partitions = Partitions::default();
    let mut stopped = StoppedPartitions::default();
    let mut tables = Tables::default();
    let mut first_at: Option<Instant> = None;
    let mut buffered = 0usize;
    let mut inflight: VecDeque<Inflight> = VecDeque::new();
    let budget = Stage::budget();
    let preparing = Arc::new(tokio::sync::Semaphore::new(2));
    // Resolves once the newest batch in flight took its lanes' turns (true) or gave up.
    let mut last_turns: Option<tokio::sync::oneshot::Receiver<bool>> = None;
    let mut ended = Ended::Cancelled;
    'consume: loop {
        let flush_due = first_at.map(|t| t + limits.linger);
        let msg = tokio::select! {
            m = consumer.recv() => Some(m),
            _ = sleep_until_opt(flush_due) => None,
            (ok, done) = wait(&mut inflight) => {
                if !ok {
                    break;
                }
                store(&consumer, done, &mut partitions);
                // What lingered behind that delivery goes now.
                if buffered == 0 {
                    continue;
                }
                None
            }
            _ = cancel.cancelled() => break,
        };
        if let Some(first) = msg {
            // Take what the client has already fetched without going round the select! (and
            // its timer) once per record.
            let cap = limits.max_changes * super::BATCH_REQUESTS;
            let mut next = Some(first);
            while let Some(m) = next.take() {
                match m {
                    Ok(m) => {
                        // Skipped records too: their offsets are stored with the next delivery.
                        first_at.get_or_insert_with(Instant::now);
                        match read_record(
                            &m,
                            assignment.load(Ordering::Relaxed),
                            &mut partitions,
                            &stopped,
                            &kafka.dlq_topic,
                            warehouses,
                            &mut tables,
                        ) {
                            Read::Deliver(warehouse, item) => {
                                match batches.get_mut(warehouse) {
                                    Some(batch) => batch.push(item),
                                    None => {
                                        batches.insert(warehouse.to_string(), vec![item]);
                                    }
                                }
                                buffered += 1;
                            }
                            Read::Skip | Read::Held => {}
                            Read::Foreign => {
                                tracing::warn!(
                                    topic = m.topic(),
                                    partition = m.partition(),
                                    offset = m.offset(),
                                    "record without warehouse_id/table headers: not a change event of ours; dead-lettered (event_format)"
                                );
                                let reason = format!(
                                    "record {}/{}@{} on a change topic has no warehouse_id/table headers: not a change event of InventorySync",
                                    m.topic(),
                                    m.partition(),
                                    m.offset()
                                );
                                let (key, value) = (
                                    m.key().unwrap_or_default().to_vec(),
                                    m.payload().unwrap_or_default().to_vec(),
                                );
                                if stage.dead_letter_foreign(key, value, reason).await.is_err() {
                                    break;
                                }
                            }
                            Read::Unknown(warehouse) => {
                                if stopped.stop(m.topic(), m.partition(), m.offset(), warehouse) {
                                    stop_partition(&consumer, &m, warehouse, &kafka.group_id);
                                }
                            }
                        }
                    }
                    Err(e)
                        if e.rdkafka_error_code() == Some(RDKafkaErrorCode::FencedInstanceId) =>
                    {
                        ended = Ended::Fenced;
                        break 'consume;
                    }
                    Err(e) => tracing::debug!(error = %e, "consumer"),
                }
                if buffered >= cap {
                    break;
                }
                next = consumer.recv().now_or_never();
            }
            partitions.gauge_uncommitted();
            // Linger only behind a delivery in flight: with nothing in flight the records
            // read go at once (low latency when quiet); under load the batch grows while the
            // previous one is delivered.
            if buffered < cap && !inflight.is_empty() {
                continue;
            }
        }
        // Nothing in flight, linger passed or the batch is full: the batch is prepared and
        // delivered by a task of its own while the next records are read. Its lanes take
        // their turns once the previous batch's lanes took theirs (so one key's changes stay
        // in order), and each lane then waits only for its own earlier turns: a lane central
        // keeps waiting holds back no other. Offsets are stored in order, once a batch and
        // every batch before it are delivered.
        // Its share of the budget, while earlier batches complete (in order).
        let wanted = buffered.min(super::IN_FLIGHT_CHANGES) as u32;
        let permit = loop {
            if inflight.len() < MAX_IN_FLIGHT
                && let Ok(p) = budget.clone().try_acquire_many_owned(wanted)
            {
                break Some(p);
            }
            tokio::select! {
                (ok, done) = wait(&mut inflight) => {
                    if !ok {
                        break None;
                    }
                    store(&consumer, done, &mut partitions);
                }
                p = budget.clone().acquire_many_owned(wanted), if inflight.len() < MAX_IN_FLIGHT => {
                    break p.ok();
                }
                _ = cancel.cancelled() => break None,
            }
        };
        let Some(permit) = permit else { break };
        let work = std::mem::take(&mut batches);
        let stage = stage.clone();
        let previous = last_turns.take();
        let (turns_tx, turns_rx) = tokio::sync::oneshot::channel();
        last_turns = Some(turns_rx);
        let preparing = preparing.clone();
        let handle = tokio::spawn(async move {
            let mut permit = permit;
            // Two batches prepared at once at most: more only delays the oldest (and with it
            // the first delivery after a restart) while they share the CPU.
            let Ok(turn) = preparing.acquire_owned().await else {
                return false;
            };
            let prepared = join_all(work.into_iter().map(|(w, items)| {
                let stage = &stage;
                async move { stage.prepare(&w, items).await }
            }))
            .await;
            drop(turn);
            let prepared = match prepared.into_iter().collect::<Result<Vec<_>, _>>() {
                Err(_) => return false,
                Ok(prepared) => prepared,
            };
            // Turns in batch order: after the previous batch took its turns.
            if let Some(rx) = previous
                && !matches!(rx.await, Ok(true))
            {
                return false;
            }
            let deliveries: Vec<_> = prepared
                .into_iter()
                .map(|p| {
                    let share = permit.split(p.len().min(permit.num_permits()));
                    stage.clone().deliver(p, share)
                })
                .collect();
            // What the prepared changes did not take is free again.
            drop(permit);
            let _ = turns_tx.send(true);
            join_all(deliveries).await.into_iter().all(|r| r.is_ok())
        });
        inflight.push_back((handle, partitions.take_marks()));
        first_at = None;
        buffered = 0;
    }
    while !inflight.is_empty() && !cancel.is_cancelled() {
        let (ok, done) = wait(&mut inflight).await;
        if !ok {
            break;
        }
        store(&consumer, done, &mut partitions);
    }
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(error = %e, "final offset commit");
    }
    Ok(ended)
}

/// The table names of the records read, shared by the records of one table instead of a
/// string per record.
#[derive(Default)]
struct Tables(Vec<Arc<str>>);

impl Tables {
    /// At most this many names are kept (a linear scan; a consumer sees a few tables).
    const MAX: usize = 64;

    fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(t) = self.0.iter().find(|t| ***t == *name) {
            return t.clone();
        }
        let t: Arc<str> = name.into();
        if self.0.len() < Self::MAX {
            self.0.push(t.clone());
        }
        t
    }
}

/// What becomes of one record.
enum Read<'m> {
    /// A change for the stage: its warehouse and the record.
    Deliver(&'m str, Incoming),
    /// Nothing to deliver, and its offset may be committed with the next delivery (the
    /// dead-letter topic, a record that is not a change event of ours).
    Skip,
    /// Its partition is stopped at or before it: not delivered, never committed here.
    Held,
    /// A change of a warehouse this process does not know: its partition stops here.
    Unknown(&'m str),
    /// On a change topic but not a change event of ours (no `warehouse_id`/`table`
    /// headers): dead-lettered as `event_format` before its offset may be committed.
    Foreign,
}

/// Notes where `m` sits and turns it into a change for the stage (see [`Read`]).
fn read_record<'m>(
    m: &'m BorrowedMessage<'_>,
    assignment: u64,
    partitions: &mut Partitions,
    stopped: &StoppedPartitions,
    dlq_topic: &str,
    warehouses: &HashSet<String>,
    tables: &mut Tables,
) -> Read<'m> {
    if stopped.holds(m.topic(), m.partition(), m.offset()) {
        return Read::Held;
    }
    let dlq = m.topic() == dlq_topic;
    let (mut warehouse, mut table, mut oid) = (None, None, 0);
    if let Some(h) = m.headers().filter(|_| !dlq) {
        for header in h.iter() {
            let v = header.value.and_then(|v| std::str::from_utf8(v).ok());
            match header.key {
                "warehouse_id" => warehouse = v,
                "table" => table = v,
                // Absent from records of versions before it: 0, mapped by name alone.
                crate::bus::kafka::RELATION_OID_HEADER => {
                    oid = v.and_then(|v| v.parse().ok()).unwrap_or(0)
                }
                _ => {}
            }
        }
    }
    // Before the record is noted: its offset must not be stored.
    if let Some(w) = warehouse
        && !warehouses.contains(w)
    {
        return Read::Unknown(w);
    }
    let (stream, first) = partitions.read(m.topic(), m.partition(), m.offset(), assignment);
    if first {
        tracing::info!(
            topic = m.topic(),
            partition = m.partition(),
            offset = m.offset(),
            "consuming partition"
        );
    }
    if dlq {
        return Read::Skip;
    }
    let (Some(warehouse), Some(table)) = (warehouse, table) else {
        return Read::Foreign;
    };
    Read::Deliver(
        warehouse,
        Incoming::Record {
            table: tables.get(table),
            oid,
            key: m.key().unwrap_or_default().to_vec(),
            value: m.payload().unwrap_or_default().to_vec(),
            stream,
        },
    )
}

/// Pauses `m`'s partition at `m`, a record of `warehouse`, which this process's
/// configuration lacks, and says so (the offset stays where the last delivery left it).
fn stop_partition(consumer: &Group, m: &BorrowedMessage<'_>, warehouse: &str, group: &str) {
    tracing::error!(
        warehouse,
        topic = m.topic(),
        partition = m.partition(),
        offset = m.offset(),
        group,
        "a change of warehouse {warehouse:?}, which this process's configuration does not list: this partition stops here, uncommitted, until a consumer that knows the warehouse takes it over; give every consumer of the group every warehouse ([[warehouses]])"
    );
    crate::metrics::metrics()
        .consumer_stopped_partitions
        .with_label_values(&[warehouse])
        .inc();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition(m.topic(), m.partition());
    if let Err(e) = consumer.pause(&tpl) {
        tracing::debug!(error = %e, "pause");
    }
}

/// Batches in flight, counted from the oldest without an outcome: those after it that are
/// done wait there too, since outcomes are reported in order. So it is no real bound: one
/// share waiting on central (a `Retry-After`, a slow answer) must not hold back the rest,
/// as 64 did (every lane idle for up to a second, waiting for it). The budget of changes in
/// flight ([`super::IN_FLIGHT_CHANGES`]) is what bounds them.
const MAX_IN_FLIGHT: usize = 4096;

/// A batch in flight (its task: prepare, then deliver) and the positions it covers.
type Inflight = (tokio::task::JoinHandle<bool>, Vec<Position>);

/// Whether the oldest batch in flight was delivered, and its positions; never resolves
/// without one.
async fn wait(inflight: &mut VecDeque<Inflight>) -> (bool, Vec<Position>) {
    match inflight.front_mut() {
        Some((handle, _)) => {
            let ok = matches!(handle.await, Ok(true));
            let done = inflight.pop_front().map(|(_, p)| p).unwrap_or_default();
            (ok, done)
        }
        None => std::future::pending().await,
    }
}

/// The group's consumer, with its rebalances and commits logged.
type Group = StreamConsumer<GroupEvents>;

/// Logs what the group coordinator does to this consumer: which partitions it gets and
/// loses, and whether the background commits of delivered offsets succeed. It counts the
/// rebalances, so that a partition read on without one can tell a hole in its offsets
/// from a resumption somewhere else.
#[derive(Default, Clone)]
struct GroupEvents {
    assignment: Arc<AtomicU64>,
}

impl ClientContext for GroupEvents {}

/// `topic[partition]` for each partition of `tpl`.
fn partition_names(tpl: &TopicPartitionList) -> Vec<String> {
    tpl.elements()
        .iter()
        .map(|e| format!("{}[{}]", e.topic(), e.partition()))
        .collect()
}

impl ConsumerContext for GroupEvents {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.assignment.fetch_add(1, Ordering::Relaxed);
        match rebalance {
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = ?partition_names(tpl), "partitions revoked")
            }
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = ?partition_names(tpl), "partitions assigned")
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "consumer group rebalance failed"),
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        let at: Vec<String> = offsets
            .elements()
            .iter()
            .map(|e| format!("{}[{}]@{:?}", e.topic(), e.partition(), e.offset()))
            .collect();
        match result {
            Ok(()) => tracing::debug!(offsets = ?at, "offsets committed"),
            Err(e) => tracing::debug!(error = %e, offsets = ?at, "offset commit failed"),
        }
    }
}

/// Stores the offsets of delivered records (committed in the background).
fn store(consumer: &Group, done: Vec<Position>, partitions: &mut Partitions) {
    for (topic, partition, offset) in done {
        tracing::debug!(topic = %topic, partition, offset, "offset stored");
        // (The client commits offset + 1, the next to read.)
        if let Err(e) = consumer.store_offset(&topic, partition, offset) {
            // The partition moved to another consumer: it replays from the last commit.
            tracing::debug!(error = %e, topic = %topic, partition, "offset not stored");
        }
        partitions.stored(&topic, partition, offset + 1);
    }
    partitions.gauge_uncommitted();
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::{Partitions, StoppedPartitions, subscription};

    #[test]
    fn a_stopped_partition_holds_its_unknown_record_and_everything_after_it_only() {
        let mut s = StoppedPartitions::default();
        assert!(!s.holds("changes", 0, 5));
        assert!(s.stop("changes", 0, 10, "wh-x"));
        assert!(!s.stop("changes", 0, 12, "wh-y"), "already stopped earlier");
        assert!(s.holds("changes", 0, 10) && s.holds("changes", 0, 11));
        // Read again after the partition came back: the records before the stop go on.
        assert!(!s.holds("changes", 0, 9));
        assert!(!s.holds("changes", 1, 10) && !s.holds("other", 0, 10));
        // A replay meets an unknown warehouse earlier: the stop moves back.
        assert!(s.stop("changes", 0, 7, "wh-z"));
        assert!(s.holds("changes", 0, 7) && !s.holds("changes", 0, 6));
    }

    #[test]
    fn offsets_are_stored_once_per_partition_and_only_for_records_read_since() {
        let mut p = Partitions::default();
        assert!(
            p.read("changes", 0, 10, 1).1,
            "first record of the partition"
        );
        assert!(!p.read("changes", 0, 11, 1).1);
        assert!(p.read("changes", 1, 4, 1).1);
        assert!(
            p.read("other", 0, 7, 1).1,
            "same partition number, other topic"
        );
        assert_eq!(
            p.take_marks(),
            vec![
                ("changes".to_string(), 0, 11),
                ("changes".to_string(), 1, 4),
                ("other".to_string(), 0, 7)
            ]
        );
        // Nothing read since: nothing to store (a partition that moved away and came back
        // never gets an old offset stored again).
        assert!(p.take_marks().is_empty());
        p.read("changes", 1, 5, 1);
        assert_eq!(p.take_marks(), vec![("changes".to_string(), 1, 5)]);
    }

    #[test]
    fn a_hole_in_a_partition_read_on_is_counted_and_a_resumption_elsewhere_is_not() {
        let gaps = || {
            crate::metrics::metrics()
                .consumer_offset_gaps
                .with_label_values(&["gaps-test"])
                .get()
        };
        let mut p = Partitions::default();
        p.read("gaps-test", 0, 10, 1);
        p.read("gaps-test", 0, 11, 1);
        p.read("gaps-test", 0, 15, 1);
        assert_eq!(gaps(), 3, "offsets 12, 13 and 14 were not handed out");
        // After a rebalance the partition resumes at its committed offset, wherever that is.
        p.read("gaps-test", 0, 40, 2);
        p.read("gaps-test", 0, 20, 3);
        assert_eq!(gaps(), 3);
    }

    #[test]
    fn a_template_subscribes_by_regex() {
        assert_eq!(
            subscription("inventorysync.changes"),
            "inventorysync.changes"
        );
        assert_eq!(
            subscription("cdc.{warehouse}.{schema}.{table}"),
            r"^cdc\..+\..+\..+$"
        );
    }
}

/// One partition's end: the offset the next record will get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionEnd {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// High watermark.
    pub high: i64,
}

/// Reads how far the consumer group got, for sync cycles: a job records the change topics'
/// ends once every change it waits for is published, and is done once the group's committed
/// offsets reach them (every record before has an outcome).
pub struct GroupProgress {
    consumer: rdkafka::consumer::BaseConsumer,
    subscription: regex::Regex,
}

/// How long one metadata or offsets request may take.
const PROGRESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl GroupProgress {
    /// A reader for `kafka`'s group and change topics (it never joins the group).
    pub fn new(kafka: &KafkaSettings) -> Result<Self, BusError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &kafka.brokers)
            .set("group.id", &kafka.group_id)
            .set("client.id", "inventorysync-progress")
            .set("enable.auto.commit", "false");
        for (k, v) in &kafka.properties {
            config.set(k, v.expose_secret());
        }
        let consumer = config.create().map_err(|e| BusError::Config {
            key: "KAFKA_BROKERS / kafka properties".into(),
            reason: e.to_string(),
        })?;
        let pattern = subscription(kafka.topic.as_str());
        let pattern = if pattern.starts_with('^') {
            pattern
        } else {
            format!("^{}$", regex::escape(&pattern))
        };
        let subscription = regex::Regex::new(&pattern).map_err(|e| BusError::Config {
            key: "KAFKA_TOPIC".into(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            consumer,
            subscription,
        })
    }

    /// The ends of every partition of the change topics (blocking: call from a blocking
    /// task).
    pub fn ends(&self) -> Result<Vec<PartitionEnd>, String> {
        let meta = self
            .consumer
            .fetch_metadata(None, PROGRESS_TIMEOUT)
            .map_err(|e| format!("Kafka metadata: {e}"))?;
        let mut out = Vec::new();
        for t in meta.topics() {
            if !self.subscription.is_match(t.name()) {
                continue;
            }
            for p in t.partitions() {
                let (_, high) = self
                    .consumer
                    .fetch_watermarks(t.name(), p.id(), PROGRESS_TIMEOUT)
                    .map_err(|e| format!("watermarks of {}[{}]: {e}", t.name(), p.id()))?;
                out.push(PartitionEnd {
                    topic: t.name().to_string(),
                    partition: p.id(),
                    high,
                });
            }
        }
        Ok(out)
    }

    /// The partitions whose committed offset is still below `ends` (blocking).
    pub fn behind(&self, ends: &[PartitionEnd]) -> Result<Vec<PartitionEnd>, String> {
        let mut tpl = rdkafka::TopicPartitionList::new();
        for e in ends.iter().filter(|e| e.high > 0) {
            tpl.add_partition(&e.topic, e.partition);
        }
        if tpl.count() == 0 {
            return Ok(Vec::new());
        }
        let committed = self
            .consumer
            .committed_offsets(tpl, PROGRESS_TIMEOUT)
            .map_err(|e| format!("committed offsets of group: {e}"))?;
        Ok(ends
            .iter()
            .filter(|e| e.high > 0)
            .filter(|e| {
                let at = committed
                    .find_partition(&e.topic, e.partition)
                    .and_then(|p| p.offset().to_raw())
                    .unwrap_or(-1);
                at < e.high
            })
            .cloned()
            .collect())
    }

    /// Per change topic, records between the group's committed offsets and the ends
    /// (blocking).
    pub fn lag(&self) -> Result<Vec<(String, i64)>, String> {
        let ends = self.ends()?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        for e in &ends {
            tpl.add_partition(&e.topic, e.partition);
        }
        let committed = self
            .consumer
            .committed_offsets(tpl, PROGRESS_TIMEOUT)
            .map_err(|e| format!("committed offsets of group: {e}"))?;
        let mut out: std::collections::BTreeMap<String, i64> = Default::default();
        for e in &ends {
            let at = committed
                .find_partition(&e.topic, e.partition)
                .and_then(|p| p.offset().to_raw())
                .filter(|o| *o >= 0)
                .unwrap_or(0);
            *out.entry(e.topic.clone()).or_default() += (e.high - at).max(0);
        }
        Ok(out.into_iter().collect())
    }
}
