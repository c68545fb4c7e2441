//! The consumer stage: takes change events off the bus in source order, maps and validates
//! them, pushes them to the central inventory system in batches, and gives each one an
//! outcome (DESIGN §3, §4).
//!
//! ```text
//!  bus ──events──▶ map (unmapped: skipped) ──▶ validate ──▶ batch ──▶ central client
//!                                               │ fails        ▲           │ stale / rejected / 400-422
//!                                               ▼              │           ▼
//!                              dead-letter queue + sync_conflicts ◀────────┘
//! ```
//!
//! Only an outcome lets the bus count an event as delivered: the embedded bus then
//! acknowledges the commit to the source, the Kafka consumer stores the offset. Outcomes are
//! written (conflict rows, dead letters) before that, and are idempotent, so a crash replays
//! and never loses.

pub mod bindings;
pub mod embedded;
pub mod kafka;
pub mod mapping;
pub mod settings;
pub mod toast;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::bus::kafka::KafkaBus;
use crate::central::client::{Cancelled, CentralClient, Verdict};
use crate::central::{ChangeOp, ChangeResult, Outgoing, ResultStatus};
use crate::event::ChangeEvent;
use crate::metrics::Held;
use crate::store::{LaneMark, NewConflict, NewDeadLetter, StateDb, StoreError};
use mapping::{EventView, Mapped, MappedChange, RawEvent, Violation, map_change_event, map_event};
use settings::ConsumerSettings;
use toast::{ToastReader, Want};

pub use crate::bus::kafka::DEFAULT_DLQ_TOPIC;

/// One change event as the bus delivers it.
#[derive(Debug)]
pub enum Incoming {
    /// From the embedded bus.
    Event(Box<ChangeEvent>),
    /// From Kafka: the record's key, value and `table` header.
    Record {
        /// `schema.table` from the `table` header (shared by the records of one table).
        table: std::sync::Arc<str>,
        /// The relation's OID from the `relation_oid` header (0 when the record has none).
        oid: u32,
        /// The JSON key.
        key: Vec<u8>,
        /// The JSON envelope.
        value: Vec<u8>,
        /// Its partition (`topic/partition`, shared by the partition's records): the ordered
        /// stream whose lanes' progress it counts toward.
        stream: std::sync::Arc<str>,
    },
}

impl Incoming {
    /// The event's view (for conflict rows and dead letters; none if it does not parse, which
    /// was refused already).
    fn view(&self, m: &settings::TableMapping) -> Option<EventView> {
        match self {
            Incoming::Event(ev) => Some(EventView::from_event(ev, m)),
            Incoming::Record { value, .. } => EventView::parse(value).ok(),
        }
    }

    /// The ordered stream the item came in on: `""` for the embedded bus (one queue per
    /// warehouse), its partition on Kafka.
    fn stream(&self) -> &str {
        match self {
            Incoming::Event(_) => "",
            Incoming::Record { stream, .. } => stream,
        }
    }

    /// The relation's OID at the warehouse (0 when unknown).
    fn oid(&self) -> u32 {
        match self {
            Incoming::Event(ev) => ev.source.table.oid(),
            Incoming::Record { oid, .. } => *oid,
        }
    }

    fn table(&self) -> Cow<'_, str> {
        match self {
            Incoming::Event(ev) => Cow::Borrowed(ev.source.table.qualified_name()),
            Incoming::Record { table, .. } => Cow::Borrowed(table),
        }
    }

    fn value(&self) -> Cow<'_, [u8]> {
        match self {
            Incoming::Event(ev) => {
                let mut out = Vec::with_capacity(640);
                ev.write_json(&mut out);
                Cow::Owned(out)
            }
            Incoming::Record { value, .. } => Cow::Borrowed(value),
        }
    }

    /// The table's key columns and their values (the event's `pk`); none for a table keyed
    /// by the whole row.
    fn row_key(&self) -> Option<Vec<(String, Value)>> {
        match self {
            Incoming::Event(ev) => ev.key.as_ref().map(|k| {
                k.iter()
                    .map(|(n, v)| (n.to_string(), mapping::json_value(v)))
                    .collect()
            }),
            Incoming::Record { key, .. } => {
                let key: Value = crate::json::from_bytes(key).ok()?;
                match key.get("pk")? {
                    Value::Object(pk) => Some(pk.clone().into_iter().collect()),
                    _ => None,
                }
            }
        }
    }

    fn key(&self) -> Cow<'_, [u8]> {
        match self {
            Incoming::Event(ev) => {
                let mut out = Vec::with_capacity(128);
                ev.write_key_json(&mut out);
                Cow::Owned(out)
            }
            Incoming::Record { key, .. } => Cow::Borrowed(key),
        }
    }
}

/// Where dead letters go.
pub enum DeadLetters {
    /// A Kafka topic (with the Kafka bus).
    Kafka {
        /// The producer.
        bus: Arc<KafkaBus>,
        /// The topic (`inventorysync.dlq`).
        topic: String,
    },
    /// The state DB's `sync_dead_letters` only (with the embedded bus; with Kafka each dead
    /// letter is recorded there too).
    StateDb,
}

/// What came of sending a dead letter again ([`Stage::replay`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// `applied`, `duplicate`, `stale`, `rejected`, `refused` (central refused the request)
    /// or `invalid` (it still breaks a rule here and was not sent).
    pub outcome: &'static str,
    /// The outcome in words: the version, and central's answer or the rule.
    pub detail: String,
}

/// Maps, validates and delivers changes; shared by every warehouse's consumer.
pub struct Stage {
    settings: ConsumerSettings,
    client: Option<Arc<CentralClient>>,
    state: StateDb,
    dead_letters: DeadLetters,
    cancel: CancellationToken,
    /// Per warehouse, the highest version sent (mirrors `consumer_progress`).
    sent: tokio::sync::Mutex<HashMap<String, Option<String>>>,
    /// Per warehouse and ordered stream, each lane's last position handed to a delivery (read
    /// from `consumer_lanes` when first needed): a change at or below it is a replay.
    lanes: tokio::sync::Mutex<HashMap<String, HashMap<Arc<str>, LaneMarks>>>,
    /// Per warehouse and lane, the batch shares its worker has yet to send, in source order.
    queues: std::sync::Mutex<HashMap<String, Vec<LaneQueue>>>,
    /// Per warehouse, where its lanes' settled positions go to be written.
    settlers: std::sync::Mutex<HashMap<String, tokio::sync::mpsc::UnboundedSender<Settled>>>,
    /// The tasks writing those positions (awaited by [`Stage::stopped`]).
    writers: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Reads back unchanged TOAST values, so that an upsert always carries the whole row.
    toast: ToastReader,
    /// Which relation each mapping is bound to, per warehouse (a mapping follows its table
    /// across a rename).
    bindings: bindings::Bindings,
    /// Tables whose changes were skipped as unmapped, said once each (warehouse, table).
    unmapped: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
}

/// A batch mapped and validated by [`Stage::prepare`], ready for [`Stage::deliver`].
pub struct Prepared {
    /// (Its changes to deliver: see [`Prepared::len`].)
    warehouse_id: String,
    items: Vec<Incoming>,
    pending: Vec<Pending>,
    /// Every pending change's JSON, back to back: rendered once while the change is fresh in
    /// the cache, copied into requests as it is.
    rendered: Vec<u8>,
}

impl Prepared {
    /// How many changes it has to deliver.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether it has nothing to deliver.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// A change on its way, with the event it came from and where its JSON is in `rendered`.
struct Pending {
    item: usize,
    /// Its index among its event's changes (a key move gives two changes one version): with
    /// the version, its position in the stream.
    sub: u8,
    /// Its lane is its key hash modulo [`LANES`]; its JSON is in [`Prepared::rendered`].
    change: MappedChange,
}

/// Per lane, the position (version, index among its event's changes) of the last change
/// handed to a delivery.
type LaneMarks = [Option<(String, u8)>; LANES];

/// A change queued for its lane's worker, with the event it came from (shared with the
/// event's other changes, freed with the last of them).
struct Queued {
    item: Arc<Incoming>,
    /// Its index among its event's changes (with the version, its position in the stream).
    sub: u8,
    /// Its JSON is in its [`LanePart`]'s `rendered`.
    change: MappedChange,
}

/// A lane's share of a batch, queued for the lane's worker.
struct LanePart {
    /// Its changes, in source order.
    changes: Vec<Queued>,
    /// Their JSON, back to back.
    rendered: Vec<u8>,
    /// What the batch's changes share.
    batch: Arc<BatchNote>,
    /// Told how many of its changes were sent once each has an outcome; dropped unsent when
    /// the worker was cancelled.
    done: tokio::sync::oneshot::Sender<i64>,
    /// Its share of the consumer's budget of changes in flight, freed with it.
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// What one batch's lane shares have in common.
struct BatchNote {
    /// The batch's highest version.
    high: String,
    /// Set once `high` is recorded as sent (by whichever lane goes first); false when that
    /// was cancelled.
    noted: tokio::sync::OnceCell<bool>,
}

/// One lane's queue of batch shares, whether its worker runs, and its wake-up.
#[derive(Default)]
struct LaneQueue {
    parts: std::collections::VecDeque<LanePart>,
    running: bool,
    wake: Arc<tokio::sync::Notify>,
}

impl LaneQueue {
    /// Whether it holds a full request: `max_changes` changes, or `max_bytes` of JSON.
    fn holds_a_request(&self, max_changes: usize, max_bytes: usize) -> bool {
        let (mut changes, mut bytes) = (0, 0);
        self.parts.iter().any(|p| {
            changes += p.changes.len();
            bytes += p.rendered.len();
            changes >= max_changes || bytes >= max_bytes
        })
    }
}

/// Lane shares on their way in one go (their changes in `send`, by part and index).
struct Flight {
    parts: Vec<LanePart>,
    /// The changes to send (not replays), in source order.
    send: Vec<(usize, usize)>,
    /// Per part, how many of its changes are sent.
    counts: Vec<i64>,
    /// Per stream, the lane's position once the flight landed.
    marks: StreamMarks,
    /// The highest version that may be at central from us when it left.
    sent_high: String,
}

/// Per stream, a lane's position (see [`position_text`]).
type StreamMarks = Vec<(Arc<str>, String)>;

/// A lane's settled positions, on their way to `consumer_lanes`, with the count of changes
/// they settle (in [`crate::metrics::Metrics::central_changes_unsettled`] until written).
struct Settled {
    lane: usize,
    marks: StreamMarks,
    _landed: Vec<Held>,
}

/// A flight back: its number, the flight, and per part how many changes it sent.
type Landed = (u64, Flight, Result<Vec<i64>, Cancelled>);

/// Flights in the air at once per lane (their keys disjoint).
const LANE_PIPELINE: usize = 16;
/// With this many flights in the air, a lane sends only full requests.
const BUSY: usize = 2;

/// A queued change about to be sent: which of the worker's parts it is of, and its JSON.
struct Sending<'a> {
    part: usize,
    /// Its index among the part's changes.
    index: usize,
    queued: &'a Queued,
    json: &'a [u8],
}

/// A lane position as `consumer_lanes` stores it: `{version}/{index:02X}` (fixed width).
fn position_text(version: &str, sub: u8) -> String {
    format!("{version}/{sub:02X}")
}

/// The lane position stored as `text` (see [`position_text`]); none if it is not one.
fn parse_position(text: &str) -> Option<(String, u8)> {
    let (version, sub) = text.rsplit_once('/')?;
    Some((version.to_string(), u8::from_str_radix(sub, 16).ok()?))
}

/// An upsert whose event lacks TOASTed fields (unchanged under the default replica
/// identity): `pending` indexes the change, `fields` the mapping's data fields to fill.
struct Unfilled<'a> {
    pending: usize,
    /// The configured table of its mapping.
    mapped_table: &'a str,
    fields: Vec<usize>,
    want: Want,
}

impl Stage {
    /// A stage. Without a central client every mapped table is an error at start (the caller
    /// checks), so `client` may be `None` only when nothing is mapped.
    pub fn new(
        settings: ConsumerSettings,
        client: Option<Arc<CentralClient>>,
        state: StateDb,
        dead_letters: DeadLetters,
        toast: ToastReader,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            settings,
            client,
            state,
            dead_letters,
            cancel,
            sent: tokio::sync::Mutex::new(HashMap::new()),
            lanes: tokio::sync::Mutex::new(HashMap::new()),
            queues: std::sync::Mutex::new(HashMap::new()),
            settlers: std::sync::Mutex::new(HashMap::new()),
            writers: std::sync::Mutex::new(Vec::new()),
            toast,
            bindings: bindings::Bindings::default(),
            unmapped: Default::default(),
        }
    }

    /// Binds `warehouse_id`'s mappings to their tables now (at start), rather than with its
    /// first change: a table renamed before its first change is then still followed.
    pub async fn bind_mappings(&self, warehouse_id: &str) {
        if self.settings.mappings.is_empty() {
            return;
        }
        self.bindings
            .of(
                warehouse_id,
                &self.state,
                &self.toast,
                &self.settings.mappings,
            )
            .await;
    }

    /// The mapping of `item` (by its relation's binding, else by its table's name), and the
    /// configured table that names it.
    async fn mapping_of<'a>(
        &'a self,
        warehouse_id: &str,
        bound: &bindings::Bound,
        item: &Incoming,
    ) -> Option<(&'a str, &'a settings::TableMapping)> {
        let table = item.table();
        let oid = item.oid();
        if oid != 0
            && let Some(mapped) = bound.mapped_table(oid)
            && let Some((name, m)) = self.settings.mappings.get_key_value(&**mapped)
        {
            if **mapped != *table {
                self.bindings
                    .warn_renamed(warehouse_id, oid, mapped, &table);
            }
            return Some((name.as_str(), m));
        }
        match self.settings.mappings.get_key_value(table.as_ref()) {
            Some((name, m)) => {
                if oid != 0 && bound.mapped_table(oid).is_none() {
                    self.bindings
                        .bind_seen(warehouse_id, oid, (name, m), &self.state)
                        .await;
                }
                Some((name.as_str(), m))
            }
            None => {
                let first = self
                    .unmapped
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert((warehouse_id.to_string(), table.to_string()));
                if first {
                    tracing::info!(warehouse = %warehouse_id, %table, oid, "changes of a table no [[mappings]] entry names are skipped (counted as skipped)");
                }
                None
            }
        }
    }

    /// A budget of [`IN_FLIGHT_CHANGES`] for one consumer: [`Stage::deliver`] takes a
    /// batch's share of it and frees it lane by lane.
    pub fn budget() -> Arc<tokio::sync::Semaphore> {
        Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_CHANGES))
    }

    /// The settings.
    pub fn settings(&self) -> &ConsumerSettings {
        &self.settings
    }

    /// Once the stage is cancelled: waits until the lane positions settled last are written
    /// (one attempt each), so that a restart does not send what this process delivered.
    pub async fn stopped(&self) {
        if !self.cancel.is_cancelled() {
            // The writers run until the stage is cancelled: nothing to wait for yet.
            return;
        }
        let writers = std::mem::take(&mut *self.writers.lock().unwrap_or_else(|p| p.into_inner()));
        for w in writers {
            let _ = w.await;
        }
    }

    /// The central client, if one is configured.
    pub fn client(&self) -> Option<&Arc<CentralClient>> {
        self.client.as_ref()
    }

    /// Maps and validates `items` (one warehouse's, in source order): skipped and refused
    /// changes get their outcome here, the rest is ready for [`Stage::deliver`]. Preparing the
    /// next batch while the previous one is delivered keeps the CPU busy; delivering batches
    /// one after the other keeps each key's changes in order.
    pub async fn prepare(
        &self,
        warehouse_id: &str,
        items: Vec<Incoming>,
    ) -> Result<Prepared, Cancelled> {
        let mut pending: Vec<Pending> = Vec::new();
        let mut rendered: Vec<u8> = Vec::with_capacity(items.len() * 320);
        let mut unfilled: Vec<Unfilled> = Vec::new();
        let mut skipped = 0;
        let bound = if self.settings.mappings.is_empty() {
            Arc::default()
        } else {
            self.bindings
                .of(
                    warehouse_id,
                    &self.state,
                    &self.toast,
                    &self.settings.mappings,
                )
                .await
        };
        for (i, item) in items.iter().enumerate() {
            let table = item.table();
            let Some((mapped_table, m)) = self.mapping_of(warehouse_id, &bound, item).await else {
                skipped += 1;
                continue;
            };
            let rules = &self.settings.rules;
            // Columns the event lacks because their TOASTed value did not change.
            let (mapped, unchanged): (_, Vec<String>) = match item {
                Incoming::Event(ev) => (
                    map_change_event(ev, m, rules, &mut rendered),
                    ev.source
                        .unchanged_toast
                        .iter()
                        .map(|c| c.to_string())
                        .collect(),
                ),
                Incoming::Record { value, .. } => match RawEvent::parse(value) {
                    Ok(RawEvent {
                        too_large: Some(t), ..
                    }) => {
                        let v = Violation {
                            rule: "too_large",
                            field: t.column.clone(),
                            reason: t.reason(),
                        };
                        let mapped = item
                            .view(m)
                            .map(|view| (m.entity.as_str(), view_key(&view, m), view.version()));
                        self.refuse(warehouse_id, item, &table, mapped, None, v)
                            .await?;
                        continue;
                    }
                    Ok(view) => (
                        map_event(&view, m, rules, &mut rendered),
                        view.source
                            .unchanged_toast
                            .iter()
                            .map(|c| c.to_string())
                            .collect(),
                    ),
                    Err(v) => {
                        self.refuse(warehouse_id, item, &table, None, None, v)
                            .await?;
                        continue;
                    }
                },
            };
            match mapped {
                Ok(Mapped::Changes(changes)) => {
                    for (sub, change) in changes.into_iter().enumerate() {
                        let sub = sub as u8;
                        let fields = unfilled_fields(&change, m, &unchanged);
                        if !fields.is_empty() {
                            let Some(key) = item.row_key() else {
                                let v = Violation {
                                    rule: "unchanged_toast",
                                    field: Some(m.data[fields[0]].0.clone()),
                                    reason: format!(
                                        "column {:?} was not sent (its TOASTed value did not change) and {table} has no key to read it back by; set REPLICA IDENTITY FULL on the table",
                                        m.data[fields[0]].1.column
                                    ),
                                };
                                let view_key = change.key_value(&rendered[change.json.clone()]);
                                self.refuse(
                                    warehouse_id,
                                    item,
                                    &table,
                                    Some((m.entity.as_str(), view_key, change.version.clone())),
                                    None,
                                    v,
                                )
                                .await?;
                                continue;
                            };
                            let columns =
                                fields.iter().map(|&f| m.data[f].1.column.clone()).collect();
                            unfilled.push(Unfilled {
                                pending: pending.len(),
                                mapped_table,
                                fields,
                                want: Want { key, columns },
                            });
                            // Rendered again once its fields are filled.
                        }
                        pending.push(Pending {
                            item: i,
                            sub,
                            change,
                        });
                    }
                }
                Ok(Mapped::Truncate) => {
                    let Some(view) = item.view(m) else { continue };
                    let conflict = NewConflict {
                        warehouse_id: warehouse_id.to_string(),
                        table_name: table.to_string(),
                        entity: Some(m.entity.as_str().to_string()),
                        entity_key: Value::Object(Default::default()),
                        kind: "truncate",
                        rule: None,
                        reason: format!(
                            "{table} was truncated at the warehouse; central cannot apply a truncate"
                        ),
                        source_version: view.version(),
                        central_version: None,
                        source_value: None,
                        central_value: None,
                        dead_lettered: false,
                        hint: format!(
                            "central still holds the table's entities: run a forced resync (POST /sync/warehouses/{warehouse_id}) to reconcile"
                        ),
                    };
                    self.conflict(&conflict).await?;
                }
                Err(v) => {
                    let Some(view) = item.view(m) else { continue };
                    let key = view_key(&view, m);
                    let value_json = view
                        .after
                        .clone()
                        .or(view.before.clone())
                        .map(Value::Object);
                    self.refuse(
                        warehouse_id,
                        item,
                        &table,
                        Some((m.entity.as_str(), key, view.version())),
                        value_json,
                        v,
                    )
                    .await?;
                }
            }
        }
        if skipped > 0 {
            crate::metrics::metrics()
                .changes_delivered
                .with_label_values(&[warehouse_id, "skipped"])
                .inc_by(skipped);
        }
        if !unfilled.is_empty() {
            self.fill_unchanged_toast(warehouse_id, &items, &mut pending, &mut rendered, unfilled)
                .await?;
        }
        Ok(Prepared {
            warehouse_id: warehouse_id.to_string(),
            items,
            pending,
            rendered,
        })
    }

    /// Sends a dead-lettered change event of `table` again, as the stage sends any change:
    /// mapped and checked with the rules in force now, unchanged TOAST columns read back,
    /// through the central client with its retries and breaker. One that still breaks a
    /// rule is not sent. Nothing is recorded here (no conflict, no dead letter): what came
    /// of it is the caller's to record. Central's versions decide as always: a change older
    /// than what central holds is answered `stale`, and central keeps the newer one.
    pub async fn replay(
        &self,
        warehouse_id: &str,
        table: &str,
        raw: &[u8],
    ) -> Result<Replayed, Cancelled> {
        let invalid = |detail: String| {
            Ok(Replayed {
                outcome: "invalid",
                detail,
            })
        };
        let Some(m) = self.settings.mappings.get(table) else {
            return invalid(format!(
                "{table} is not mapped (any more): there is nothing to send it as"
            ));
        };
        let Some(client) = &self.client else {
            return invalid("no central endpoint (WAREHOUSE_API_ENDPOINT) is configured".into());
        };
        let view = match RawEvent::parse(raw) {
            Ok(v) => v,
            Err(v) => return invalid(v.to_string()),
        };
        if let Some(t) = &view.too_large {
            return invalid(t.reason());
        }
        match map_event(&view, m, &self.settings.rules, &mut Vec::new()) {
            Err(v) => return invalid(v.to_string()),
            Ok(Mapped::Truncate) => {
                return invalid("a truncate has no change to send to central".into());
            }
            Ok(Mapped::Changes(_)) => {}
        }
        let item = Incoming::Record {
            table: Arc::from(table),
            oid: 0,
            key: Vec::new(),
            value: raw.to_vec(),
            stream: Arc::from(""),
        };
        let prepared = self.prepare(warehouse_id, vec![item]).await?;
        let Some(high) = prepared
            .pending
            .iter()
            .map(|p| p.change.version.as_str())
            .max()
        else {
            return invalid(
                "it could not be prepared for central: its conflict (GET /sync/conflicts) says why"
                    .into(),
            );
        };
        self.note_sent(warehouse_id, high).await?;
        let outgoing: Vec<Outgoing<'_>> = prepared
            .pending
            .iter()
            .map(|p| Outgoing {
                version: &p.change.version,
                json: &prepared.rendered[p.change.json.clone()],
            })
            .collect();
        let verdicts = client
            .deliver(warehouse_id, &outgoing, &self.cancel)
            .await?;
        // One event is one change, or two for a key move (a delete and an upsert): the
        // replay counts as its worst.
        let mut worst = Replayed {
            outcome: "applied",
            detail: String::new(),
        };
        let rank = |o: &str| {
            ["applied", "duplicate", "stale", "rejected", "refused"]
                .iter()
                .position(|r| *r == o)
        };
        for (change, verdict) in outgoing.iter().zip(verdicts) {
            let version = change.version;
            let (outcome, detail) = match verdict {
                Verdict::Result(r) => match r.status {
                    ResultStatus::Applied => {
                        ("applied", format!("central applied version {version}"))
                    }
                    ResultStatus::Duplicate => (
                        "duplicate",
                        format!("central already had version {version}"),
                    ),
                    ResultStatus::Stale => (
                        "stale",
                        format!(
                            "central holds version {}, newer than {version}: it keeps that one",
                            r.current_version.as_deref().unwrap_or("(not given)")
                        ),
                    ),
                    ResultStatus::Rejected => (
                        "rejected",
                        format!(
                            "central rejected version {version}: {}",
                            r.reason.as_deref().unwrap_or("(no reason given)")
                        ),
                    ),
                },
                Verdict::Invalid { status, message } => (
                    "refused",
                    format!("central refused version {version} with {status}: {message}"),
                ),
            };
            if rank(outcome) > rank(worst.outcome) {
                worst.outcome = outcome;
            }
            if !worst.detail.is_empty() {
                worst.detail.push_str("; ");
            }
            worst.detail.push_str(&detail);
        }
        tracing::info!(warehouse = %warehouse_id, %table, outcome = worst.outcome, detail = %worst.detail, "dead letter replayed");
        Ok(worst)
    }

    /// Forgets the lane positions handed to deliveries (of `warehouse_id`, or of every
    /// warehouse): a consumer that starts (again) reads them from `consumer_lanes`, where
    /// only positions with an outcome are, since what an ended consumer had in flight is
    /// replayed. It forgets the highest version sent too: another process that owned the
    /// warehouse meanwhile sent newer ones, and a replay that central answers `stale` with
    /// one of those is superseded, not a conflict (read again from `consumer_progress`).
    pub async fn forget_lanes(&self, warehouse_id: Option<&str>) {
        {
            let mut lanes = self.lanes.lock().await;
            match warehouse_id {
                Some(w) => drop(lanes.remove(w)),
                None => lanes.clear(),
            }
        }
        let mut sent = self.sent.lock().await;
        match warehouse_id {
            Some(w) => drop(sent.remove(w)),
            None => sent.clear(),
        }
    }

    /// Drops from `changes` (one lane's, in source order) those a replay brings again: one
    /// at or below its lane's position in its stream was handed to a delivery before (by
    /// this consumer, or by one before it, which recorded its outcome in `consumer_lanes`).
    /// One lane's changes reach central in stream order, so what is at or below that
    /// position has an outcome already (or is in flight, and would be replayed again if that
    /// delivery failed). So a restart sends central nothing it has from us, and no request
    /// holds a key's versions out of order (a Kafka partition holds a replay after what it
    /// replays).
    async fn skip_replayed(
        &self,
        warehouse_id: &str,
        lane: usize,
        changes: &mut Vec<Sending<'_>>,
    ) -> Result<(), Cancelled> {
        // The streams this lane's changes came in on (one, or a few Kafka partitions), each
        // with the position of its last change kept here.
        let mut kept: Vec<(&str, Option<(&str, u8)>)> = Vec::new();
        for c in changes.iter() {
            let stream = c.queued.item.stream();
            if !kept.iter().any(|(s, _)| *s == stream) {
                kept.push((stream, None));
            }
        }
        let mut lanes = self.lanes.lock().await;
        if !lanes.contains_key(warehouse_id) {
            lanes.insert(warehouse_id.to_string(), HashMap::new());
        }
        let Some(streams) = lanes.get_mut(warehouse_id) else {
            return Ok(());
        };
        for &(stream, _) in &kept {
            if !streams.contains_key(stream) {
                let marks = self.stored_lane_marks(warehouse_id, stream).await?;
                streams.insert(Arc::from(stream), marks);
            }
        }
        let mut replayed = 0u64;
        changes.retain(|c| {
            let q = c.queued;
            let stream = q.item.stream();
            let Some((_, last)) = kept.iter_mut().find(|(s, _)| *s == stream) else {
                return true;
            };
            // Above the last change kept here, or else above the mark from before.
            let mark = match *last {
                Some(m) => Some(m),
                None => streams
                    .get(stream)
                    .and_then(|m| m[lane].as_ref())
                    .map(|(v, s)| (v.as_str(), *s)),
            };
            let seen = mark.is_some_and(|m| (q.change.version.as_str(), q.sub) <= m);
            if seen {
                replayed += 1;
                tracing::trace!(warehouse = %warehouse_id, stream, lane, version = %q.change.version, sub = q.sub, mark = ?mark, key = q.change.key_text(c.json), entity = q.change.entity.as_str(), "replayed: skipped");
            } else {
                *last = Some((q.change.version.as_str(), q.sub));
            }
            !seen
        });
        // Each stream's mark moves once, to the last change kept (the lane is in source order).
        for (stream, last) in kept {
            if let (Some((v, s)), Some(m)) = (last, streams.get_mut(stream)) {
                m[lane] = Some((v.to_string(), s));
            }
        }
        drop(lanes);
        if replayed > 0 {
            crate::metrics::metrics()
                .changes_delivered
                .with_label_values(&[warehouse_id, "replayed"])
                .inc_by(replayed);
        }
        Ok(())
    }
    /// The lane positions `consumer_lanes` holds for `warehouse_id`'s `stream`.
    async fn stored_lane_marks(
        &self,
        warehouse_id: &str,
        stream: &str,
    ) -> Result<LaneMarks, Cancelled> {
        let stored = self
            .retry("cannot read the consumer's lane progress", || {
                self.state.lane_marks(warehouse_id, stream, LANES as i32)
            })
            .await?;
        let mut marks: LaneMarks = Default::default();
        for (lane, text) in stored {
            match (
                usize::try_from(lane).ok().filter(|&l| l < LANES),
                parse_position(&text),
            ) {
                (Some(l), Some(pos)) => marks[l] = Some(pos),
                _ => {
                    tracing::warn!(warehouse = %warehouse_id, stream, lane, settled = %text, "consumer_lanes holds a row this version did not write; ignored (its changes are sent again)")
                }
            }
        }
        Ok(marks)
    }

    /// Fills the upserts in `unfilled` with the current values of their TOASTed fields, read
    /// from the warehouse in one query per table (see [`toast`]), and renders them in place.
    /// An upsert whose row is gone is dropped (the later delete or key move follows); one
    /// whose value breaks a rule is refused, and so is one whose values can never be read
    /// (its table or column dropped since): a data problem of that change, never a retry
    /// without end that stops the warehouse. A renamed table is read by its relation's OID.
    async fn fill_unchanged_toast(
        &self,
        warehouse_id: &str,
        items: &[Incoming],
        pending: &mut Vec<Pending>,
        rendered: &mut Vec<u8>,
        unfilled: Vec<Unfilled<'_>>,
    ) -> Result<(), Cancelled> {
        // By relation: its name in the event, and its OID.
        let mut by_table: HashMap<(String, u32), Vec<&Unfilled>> = HashMap::new();
        for u in &unfilled {
            let item = &items[pending[u.pending].item];
            by_table
                .entry((item.table().to_string(), item.oid()))
                .or_default()
                .push(u);
        }
        let mut dropped = vec![false; pending.len()];
        let mut superseded = 0;
        for ((table, oid), group) in by_table {
            let Some(m) = self.settings.mappings.get(group[0].mapped_table) else {
                continue;
            };
            let wants: Vec<&Want> = group.iter().map(|u| &u.want).collect();
            let (toast, name, asked) = (&self.toast, table.as_str(), &wants[..]);
            let read = self
                .retry(
                    "cannot read unchanged TOAST values from the warehouse",
                    move || async move {
                        match toast.read(warehouse_id, name, oid, asked).await {
                            Err(e) if e.is_definite() => Ok(Err(e)),
                            other => other.map(Ok),
                        }
                    },
                )
                .await?;
            let current = match read {
                Ok(current) => current,
                Err(e) => {
                    tracing::warn!(warehouse = %warehouse_id, %table, oid, error = %e, changes = group.len(), "unchanged TOAST values can never be read as asked; the changes that lack them are dead-lettered");
                    for u in &group {
                        dropped[u.pending] = true;
                        let p = &pending[u.pending];
                        let change = p.change.full(&rendered[p.change.json.clone()]);
                        let v = Violation {
                            rule: "unchanged_toast",
                            field: u.fields.first().map(|&f| m.data[f].0.clone()),
                            reason: format!(
                                "the unchanged TOAST value of column(s) {} cannot be read back from the warehouse ({e}); the rest of the row is in the dead letter. Fix the table or the mapping, then run a forced resync (POST /sync/warehouses/{warehouse_id})",
                                u.want.columns.join(", ")
                            ),
                        };
                        self.refuse(
                            warehouse_id,
                            &items[p.item],
                            &table,
                            Some((
                                m.entity.as_str(),
                                Value::Object(change.key.clone()),
                                p.change.version.clone(),
                            )),
                            change.data.clone().map(Value::Object),
                            v,
                        )
                        .await?;
                    }
                    continue;
                }
            };
            for (u, values) in group.iter().zip(current) {
                let p = &mut pending[u.pending];
                let Some(values) = values else {
                    // Deleted or moved since: that later change follows in the stream.
                    dropped[u.pending] = true;
                    superseded += 1;
                    continue;
                };
                // Read back whole, filled, and rendered again (at the end of `rendered`).
                let mut change = p.change.full(&rendered[p.change.json.clone()]);
                let mut refused = None;
                for &f in &u.fields {
                    let (name, src) = &m.data[f];
                    let value = values.get(&src.column).cloned().unwrap_or(Value::Null);
                    match mapping::checked_value(name, src, Cow::Owned(value), &self.settings.rules)
                    {
                        Ok(v) => {
                            if let Some(data) = change.data.as_mut() {
                                data.insert(name.clone(), v);
                            }
                        }
                        Err(v) => {
                            refused = Some(v);
                            break;
                        }
                    }
                }
                if let Some(v) = refused {
                    dropped[u.pending] = true;
                    let key = Value::Object(change.key.clone());
                    let version = p.change.version.clone();
                    self.refuse(
                        warehouse_id,
                        &items[p.item],
                        &table,
                        Some((m.entity.as_str(), key, version)),
                        None,
                        v,
                    )
                    .await?;
                    continue;
                }
                let p = &mut pending[u.pending];
                let start = rendered.len();
                // Serializing plain structs and JSON maps into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut *rendered, &change);
                p.change.json = start..rendered.len();
            }
        }
        if superseded > 0 {
            crate::metrics::metrics()
                .changes_delivered
                .with_label_values(&[warehouse_id, "superseded"])
                .inc_by(superseded);
        }
        let mut i = 0;
        pending.retain(|_| {
            i += 1;
            !dropped[i - 1]
        });
        Ok(())
    }

    /// Delivers a prepared batch and records each outcome; the future resolves once each
    /// change has one. Calls are ordered: each lane's changes go after those of every batch
    /// handed over before (call this in source order). Each lane has a worker of its own that
    /// sends its queue in requests, one at a time, so a lane central keeps waiting (a slow
    /// answer, a `Retry-After`) holds back no other lane; a lane that fell behind sends what
    /// queued up meanwhile in full requests. A lane's share of the batch (and `budget`'s
    /// share of it) is freed as soon as that lane is done, not with the whole batch.
    pub fn deliver(
        self: Arc<Self>,
        prepared: Prepared,
        budget: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> impl std::future::Future<Output = Result<(), Cancelled>> + Send + 'static {
        let Prepared {
            warehouse_id,
            items,
            pending,
            rendered,
        } = prepared;
        let high = pending
            .iter()
            .map(|p| p.change.version.as_str())
            .max()
            .unwrap_or_default()
            .to_string();
        let batch = Arc::new(BatchNote {
            high,
            noted: tokio::sync::OnceCell::new(),
        });
        // Lanes by key: one key's changes stay in one lane, in source order, so they are
        // never reordered; the lanes' requests are in flight together.
        let items: Vec<Arc<Incoming>> = items.into_iter().map(Arc::new).collect();
        // Each lane's share sized exactly: it is held until its changes have outcomes, and a
        // grown vector's spare room would be held with it (up to half of it).
        let mut sizes = [0usize; LANES];
        for p in &pending {
            sizes[lane(p.change.key_hash)] += 1;
        }
        let mut lanes: Vec<Vec<Queued>> = sizes.iter().map(|&n| Vec::with_capacity(n)).collect();
        for p in pending {
            lanes[lane(p.change.key_hash)].push(Queued {
                item: items[p.item].clone(),
                sub: p.sub,
                change: p.change,
            });
        }
        drop(items);
        let mut budget = budget;
        let mut done = Vec::new();
        {
            let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            let queues = queues
                .entry(warehouse_id.clone())
                .or_insert_with(|| (0..LANES).map(|_| LaneQueue::default()).collect());
            for (lane, mut changes) in lanes.into_iter().enumerate() {
                if changes.is_empty() {
                    continue;
                }
                // Its own JSON, so that it is freed with the lane's share.
                let mut own = Vec::with_capacity(changes.iter().map(|q| q.change.json.len()).sum());
                for q in &mut changes {
                    let start = own.len();
                    own.extend_from_slice(&rendered[q.change.json.clone()]);
                    q.change.json = start..own.len();
                }
                let permit = budget
                    .as_mut()
                    .and_then(|b| b.split(changes.len().min(b.num_permits())));
                let (tx, rx) = tokio::sync::oneshot::channel();
                done.push(rx);
                let queue = &mut queues[lane];
                queue.parts.push_back(LanePart {
                    changes,
                    rendered: own,
                    batch: batch.clone(),
                    done: tx,
                    _permit: permit,
                });
                if queue.running {
                    queue.wake.notify_one();
                } else {
                    queue.running = true;
                    tokio::spawn(self.clone().lane_worker(warehouse_id.clone(), lane));
                }
            }
        }
        drop((rendered, budget));
        async move {
            let mut delivered = 0;
            for rx in done {
                // A share dropped unanswered: its lane's worker was cancelled.
                delivered += rx.await.map_err(|_| Cancelled)?;
            }
            if delivered == 0 {
                return Ok(());
            }
            // One count per batch, not per request: the lanes' requests would queue on the row.
            self.persist(|| self.state.add_delivered(&warehouse_id, delivered))
                .await
        }
    }

    /// Sends lane `lane` of `warehouse_id`'s queue until it is empty: up to
    /// [`LANE_PIPELINE`] flights at once, each as full as the queue allows, so long as no
    /// key is in two of them (a key's changes go one flight after the other, in order). A
    /// quiet lane's changes go at once; one with flights out sends the next once central has
    /// room, and with [`BUSY`] flights out only a full request, so a backlog goes in full
    /// requests (fewer requests: less work per change, and fewer faults' waits on its path).
    /// The lane's position in `consumer_lanes` moves in order, as the oldest flights land.
    async fn lane_worker(self: Arc<Self>, warehouse_id: String, lane: usize) {
        let Some(wake) = self.lane_wake(&warehouse_id, lane) else {
            return;
        };
        let limit = self.settings.batch.max_changes;
        let max_bytes = self.settings.batch.max_bytes;
        let mut flights = futures_util::stream::FuturesUnordered::new();
        // Flights by number, oldest first, with the lane positions of those that landed (and
        // their changes, counted as unsettled from their answer on).
        let mut order: std::collections::VecDeque<(u64, Option<(StreamMarks, Held)>)> =
            Default::default();
        let unsettled = crate::metrics::metrics()
            .central_changes_unsettled
            .with_label_values(&[&warehouse_id]);
        // Keys in flight, with how many flights hold each.
        let mut busy: HashMap<u64, u32> = HashMap::new();
        let mut next = 0u64;
        let stop =
            |flights: &futures_util::stream::FuturesUnordered<tokio::task::JoinHandle<Landed>>| {
                // Nothing more goes from this lane: what is queued has no outcome (the bus
                // replays it), and the batches waiting on it learn so.
                for f in flights.iter() {
                    f.abort();
                }
                let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(queue) = queues.get_mut(&warehouse_id).map(|q| &mut q[lane]) {
                    queue.parts.clear();
                    queue.running = false;
                }
            };
        loop {
            let mut blocked = false;
            // The queue waits for central to have room for one more request.
            let mut wants_room = false;
            while flights.len() < LANE_PIPELINE {
                let parts = {
                    let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                    let Some(queue) = queues.get_mut(&warehouse_id).map(|q| &mut q[lane]) else {
                        return;
                    };
                    // With flights in the air, the next one goes once central has room: what
                    // queues meanwhile goes with it (see `InAir::room`).
                    if !flights.is_empty()
                        && !queue.parts.is_empty()
                        && self.client.as_ref().is_some_and(|c| !c.has_room())
                    {
                        wants_room = true;
                        break;
                    }
                    // A lane with flights out (a backlog, or central keeping it waiting) sends
                    // only full requests: what is short of one waits for more, or for a
                    // flight to land.
                    if flights.len() >= BUSY && !queue.holds_a_request(limit, max_bytes) {
                        break;
                    }
                    let mut parts = Vec::new();
                    let mut n = 0;
                    while let Some(part) = queue.parts.front() {
                        if !parts.is_empty() && n + part.changes.len() > limit {
                            break;
                        }
                        if part
                            .changes
                            .iter()
                            .any(|q| busy.contains_key(&q.change.key_hash))
                        {
                            blocked = true;
                            break;
                        }
                        n += part.changes.len();
                        parts.extend(queue.parts.pop_front());
                    }
                    if parts.is_empty() && flights.is_empty() {
                        queue.running = false;
                        return;
                    }
                    parts
                };
                if parts.is_empty() {
                    break;
                }
                let Ok(flight) = self.plan(&warehouse_id, lane, parts).await else {
                    stop(&flights);
                    return;
                };
                for part in &flight.parts {
                    for q in &part.changes {
                        *busy.entry(q.change.key_hash).or_default() += 1;
                    }
                }
                order.push_back((next, None));
                flights.push(tokio::spawn(self.clone().fly(
                    warehouse_id.clone(),
                    next,
                    flight,
                )));
                next += 1;
            }
            tokio::select! {
                landed = futures_util::StreamExt::next(&mut flights), if !flights.is_empty() => {
                    let Some(Ok((number, flight, Ok(counts)))) = landed else {
                        stop(&flights);
                        return;
                    };
                    for part in &flight.parts {
                        for q in &part.changes {
                            if let Some(n) = busy.get_mut(&q.change.key_hash) {
                                *n -= 1;
                                if *n == 0 {
                                    busy.remove(&q.change.key_hash);
                                }
                            }
                        }
                    }
                    if let Some(entry) = order.iter_mut().find(|(n, _)| *n == number) {
                        entry.1 = Some((flight.marks, Held::new(unsettled.clone(), flight.send.len())));
                    }
                    for (part, n) in flight.parts.into_iter().zip(counts) {
                        let _ = part.done.send(n);
                    }
                    // The oldest flights that landed: the lane's position in each stream
                    // moves to their last change there (later flights hold later changes).
                    let mut settled: StreamMarks = Vec::new();
                    let mut landed = Vec::new();
                    while let Some((_, Some((marks, held)))) = order.pop_front_if(|(_, m)| m.is_some()) {
                        landed.push(held);
                        for (stream, at) in marks {
                            match settled.iter_mut().find(|(s, _)| *s == stream) {
                                Some(s) => s.1 = at,
                                None => settled.push((stream, at)),
                            }
                        }
                    }
                    if !settled.is_empty() {
                        self.settle_later(&warehouse_id, lane, settled, landed);
                    }
                }
                _ = wake.notified(), if !blocked && !wants_room => {}
                _ = async { if let Some(c) = &self.client { c.room().await } }, if wants_room => {}
            }
        }
    }

    /// Hands a lane's settled positions to the warehouse's writer of `consumer_lanes`, which
    /// writes what the lanes settled meanwhile in one statement. The positions only spare
    /// central replays after a restart (what the bus acknowledges does not wait for them), so
    /// they may trail; one write per request kept the state DB's pool busy and delayed the
    /// writes that come before a request goes.
    fn settle_later(
        self: &Arc<Self>,
        warehouse_id: &str,
        lane: usize,
        marks: StreamMarks,
        landed: Vec<Held>,
    ) {
        let mut writers = self.settlers.lock().unwrap_or_else(|p| p.into_inner());
        let tx = writers.entry(warehouse_id.to_string()).or_insert_with(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let writer = tokio::spawn(self.clone().settle_lanes(warehouse_id.to_string(), rx));
            self.writers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(writer);
            tx
        });
        let _ = tx.send(Settled {
            lane,
            marks,
            _landed: landed,
        });
    }

    /// Writes the positions `rx` brings for `warehouse_id`, what is there at once in one
    /// statement, until the stage is cancelled.
    async fn settle_lanes(
        self: Arc<Self>,
        warehouse_id: String,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<Settled>,
    ) {
        let mut got = Vec::new();
        loop {
            got.clear();
            // Once the stage stops, what is here is written (once) and the writer ends: a
            // restart then skips what this process settled last.
            let stopping = tokio::select! {
                n = rx.recv_many(&mut got, 4096) => {
                    if n == 0 {
                        return;
                    }
                    false
                }
                _ = self.cancel.cancelled() => {
                    while let Ok(m) = rx.try_recv() {
                        got.push(m);
                    }
                    true
                }
            };
            // One row per stream and lane (a statement may not touch a row twice): the highest.
            let mut latest: Vec<(usize, &Arc<str>, &String)> = Vec::new();
            for (lane, stream, at) in got
                .iter()
                .flat_map(|s| s.marks.iter().map(move |(stream, at)| (s.lane, stream, at)))
            {
                match latest
                    .iter_mut()
                    .find(|(l, s, _)| *l == lane && *s == stream)
                {
                    Some(m) if *m.2 < *at => m.2 = at,
                    Some(_) => {}
                    None => latest.push((lane, stream, at)),
                }
            }
            let marks: Vec<LaneMark<'_>> = latest
                .iter()
                .map(|(lane, stream, at)| LaneMark {
                    stream,
                    lane: *lane as i32,
                    settled: (*at).clone(),
                })
                .collect();
            let written = marks.is_empty()
                || self
                    .persist(|| self.state.settle_lanes(&warehouse_id, LANES as i32, &marks))
                    .await
                    .is_ok();
            if stopping || !written {
                return;
            }
        }
    }

    /// The wake-up of `warehouse_id`'s lane `lane` (told when a share is queued).
    fn lane_wake(&self, warehouse_id: &str, lane: usize) -> Option<Arc<tokio::sync::Notify>> {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues.get(warehouse_id).map(|q| q[lane].wake.clone())
    }

    /// Readies `parts` (lane `lane`'s, in source order) for a flight: records their batches
    /// as sent, drops what a replay brings again, and puts the rest in source order.
    async fn plan(
        &self,
        warehouse_id: &str,
        lane: usize,
        parts: Vec<LanePart>,
    ) -> Result<Flight, Cancelled> {
        // Versions up to each batch's highest may be at central from now on (recorded once
        // per batch, before any of its changes is sent).
        for part in &parts {
            part.batch
                .noted
                .get_or_init(|| async {
                    self.note_sent(warehouse_id, &part.batch.high).await.is_ok()
                })
                .await;
            if !part.batch.noted.get().is_some_and(|ok| *ok) {
                return Err(Cancelled);
            }
        }
        // The highest version that may be at central from us, read now, not when a batch was
        // noted: another lane may have noted this batch before this lane's earlier batches
        // went, and one of those may hold a newer version of a key this request replays (on
        // Kafka a key's versions can come from two partitions). Read then, a replay central
        // answers `stale` would look like a conflict instead of superseded.
        let sent_high = self.sent_high(warehouse_id).await;
        let mut changes: Vec<Sending<'_>> = parts
            .iter()
            .enumerate()
            .flat_map(|(i, part)| {
                part.changes
                    .iter()
                    .enumerate()
                    .map(move |(index, queued)| Sending {
                        part: i,
                        index,
                        queued,
                        json: &part.rendered[queued.change.json.clone()],
                    })
            })
            .collect();
        // Here, in the lane's order, not in `prepare` (Kafka prepares batches concurrently).
        self.skip_replayed(warehouse_id, lane, &mut changes).await?;
        // Requests in source order (version, then index in the event), each stream's changes
        // staying as they were: on Kafka one key can come from two partitions (a key move is
        // keyed by its new key, so the old key's delete shares the new key's partition), and
        // the parts of one request from two batches can hold them in either order.
        fn position<'a>(c: &Sending<'a>) -> (&'a str, u8) {
            (c.queued.change.version.as_str(), c.queued.sub)
        }
        if !changes.is_sorted_by(|a, b| position(a) <= position(b)) {
            changes.sort_by(|a, b| position(a).cmp(&position(b)));
        }
        let mut counts = vec![0i64; parts.len()];
        // Per stream, the position of its last change here.
        let mut marks: Vec<(Arc<str>, String)> = Vec::new();
        for c in changes.iter().rev() {
            let stream = c.queued.item.stream();
            if !marks.iter().any(|(s, _)| **s == *stream) {
                marks.push((
                    Arc::from(stream),
                    position_text(&c.queued.change.version, c.queued.sub),
                ));
            }
        }
        for c in &changes {
            counts[c.part] += 1;
        }
        let send = changes.iter().map(|c| (c.part, c.index)).collect();
        drop(changes);
        Ok(Flight {
            parts,
            send,
            counts,
            marks,
            sent_high,
        })
    }

    /// Sends a flight's changes and records their outcomes; hands the flight back.
    async fn fly(self: Arc<Self>, warehouse_id: String, number: u64, flight: Flight) -> Landed {
        let Some(client) = &self.client else {
            // The caller refuses to start with mappings but no central endpoint.
            return (number, flight, Err(Cancelled));
        };
        let changes: Vec<Sending<'_>> = flight
            .send
            .iter()
            .map(|&(part, index)| {
                let p = &flight.parts[part];
                let queued = &p.changes[index];
                Sending {
                    part,
                    index,
                    queued,
                    json: &p.rendered[queued.change.json.clone()],
                }
            })
            .collect();
        let r = self
            .deliver_lane(&warehouse_id, client, &changes, &flight.sent_high)
            .await;
        drop(changes);
        let counts = flight.counts.clone();
        (number, flight, r.map(|()| counts))
    }

    /// Delivers one lane's changes, in order, in requests bounded by count and bytes, and
    /// records each outcome (the lane's position is the caller's to record).
    async fn deliver_lane(
        &self,
        warehouse_id: &str,
        client: &CentralClient,
        queue: &[Sending<'_>],
        sent_high: &str,
    ) -> Result<(), Cancelled> {
        let limits = self.settings.batch;
        let mut start = 0;
        while start < queue.len() {
            let mut end = start;
            let mut bytes = 0;
            let size = |i: usize| queue[i].json.len() + 1;
            while end < queue.len()
                && end - start < limits.max_changes
                && (end == start || bytes + size(end) <= limits.max_bytes)
            {
                bytes += size(end);
                end += 1;
            }
            let changes: Vec<Outgoing<'_>> = queue[start..end]
                .iter()
                .map(|c| Outgoing {
                    version: &c.queued.change.version,
                    json: c.json,
                })
                .collect();
            let verdicts = client.deliver(warehouse_id, &changes, &self.cancel).await?;
            // Snapshot rows (initial load, resync) central now holds: their open conflicts
            // are resolved.
            let mut landed = Vec::new();
            let mut outcomes: Vec<(&'static str, u64)> = Vec::new();
            for (c, verdict) in queue[start..end].iter().zip(verdicts) {
                let q = c.queued;
                if q.change.snapshot
                    && let Verdict::Result(r) = &verdict
                    && matches!(r.status, ResultStatus::Applied | ResultStatus::Duplicate)
                {
                    landed.push((
                        q.change.entity.as_str().to_string(),
                        q.change.key_value(c.json),
                    ));
                }
                let outcome = self
                    .settle(warehouse_id, &q.item, &q.change, c.json, verdict, sent_high)
                    .await?;
                match outcomes.iter_mut().find(|(o, _)| *o == outcome) {
                    Some((_, n)) => *n += 1,
                    None => outcomes.push((outcome, 1)),
                }
            }
            for (outcome, n) in outcomes {
                crate::metrics::metrics()
                    .changes_delivered
                    .with_label_values(&[warehouse_id, outcome])
                    .inc_by(n);
            }
            if !landed.is_empty() {
                let resolved = self
                    .retry("cannot resolve conflicts in the state DB", || {
                        self.state.resolve_conflicts(warehouse_id, &landed)
                    })
                    .await?;
                if resolved > 0 {
                    tracing::info!(warehouse = %warehouse_id, resolved, "conflicts resolved: central now holds the warehouse's values");
                }
            }
            if let Some(last) = queue[start..end].last() {
                let micros = last.queued.change.committed_micros;
                let g = crate::metrics::metrics()
                    .delivered_commit_time
                    .with_label_values(&[warehouse_id]);
                if micros / 1_000_000 > g.get() {
                    g.set(micros / 1_000_000);
                }
            }
            start = end;
        }
        Ok(())
    }
    /// The highest version recorded as sent for `warehouse_id` (by [`Stage::note_sent`], in
    /// this process or in one before it): any of our own changes at central is at or below it.
    async fn sent_high(&self, warehouse_id: &str) -> String {
        self.sent
            .lock()
            .await
            .get(warehouse_id)
            .cloned()
            .flatten()
            .unwrap_or_default()
    }

    /// Records (before sending) that versions up to `high` may be at central.
    async fn note_sent(&self, warehouse_id: &str, high: &str) -> Result<(), Cancelled> {
        let mut sent = self.sent.lock().await;
        if !sent.contains_key(warehouse_id) {
            let stored = self
                .retry("cannot read the consumer's progress", || {
                    self.state.sent_version(warehouse_id)
                })
                .await?;
            sent.insert(warehouse_id.to_string(), stored);
        }
        let known = sent.get(warehouse_id).and_then(Option::as_deref);
        if known.is_none_or(|k| high > k) {
            self.persist(|| self.state.raise_sent_version(warehouse_id, high))
                .await?;
            sent.insert(warehouse_id.to_string(), Some(high.to_string()));
        }
        Ok(())
    }

    /// Records the outcome of one delivered change; `sent_high` is the highest version that
    /// may be at central from us. Returns the outcome's metric label (counted per request by
    /// the caller, not per change).
    async fn settle(
        &self,
        warehouse_id: &str,
        item: &Incoming,
        mapped: &MappedChange,
        json: &[u8],
        verdict: Verdict,
        sent_high: &str,
    ) -> Result<&'static str, Cancelled> {
        let outcome;
        // 413 for the change alone: the change itself is too large for central.
        let mut rule = "central_rejected";
        let result = match verdict {
            Verdict::Result(r) => r,
            Verdict::Invalid { status, message } => {
                let size = if status == 413 {
                    rule = "too_large";
                    format!(" (the change is {} bytes as JSON)", json.len())
                } else {
                    String::new()
                };
                ChangeResult {
                    status: ResultStatus::Rejected,
                    reason: Some(format!(
                        "central answered {status} for this change alone{size}: {message}"
                    )),
                    current_version: None,
                    current: None,
                }
            }
        };
        let reason = result.reason.clone().unwrap_or_default();
        match result.status {
            ResultStatus::Applied => {
                outcome = "applied";
            }
            ResultStatus::Duplicate => {
                outcome = "duplicate";
            }
            ResultStatus::Stale
                if result
                    .current_version
                    .as_deref()
                    .is_some_and(|v| v <= sent_high) =>
            {
                // Central holds a newer version we sent before (a replay after a restart).
                outcome = "superseded";
            }
            ResultStatus::Stale => {
                outcome = "stale";
                let change = &mapped.full(json);
                let central = result
                    .current_version
                    .clone()
                    .unwrap_or_else(|| "unknown".into());
                let conflict = NewConflict {
                    warehouse_id: warehouse_id.to_string(),
                    table_name: change.source.table.clone(),
                    entity: Some(change.entity.as_str().to_string()),
                    entity_key: Value::Object(change.key.clone()),
                    kind: "stale_version",
                    rule: None,
                    reason: if reason.is_empty() {
                        format!(
                            "central holds version {central}, newer than {}",
                            change.version
                        )
                    } else {
                        reason
                    },
                    source_version: change.version.clone(),
                    central_version: result.current_version.clone(),
                    source_value: change.data.clone().map(Value::Object),
                    central_value: result.current.clone(),
                    dead_lettered: false,
                    hint: format!(
                        "central holds version {central} of {} {}, newer than the warehouse's {}. If the warehouse row is the truth, run a forced resync (POST /sync/warehouses/{warehouse_id}); if central is right, nothing to do — mark the row resolved.",
                        change.entity.as_str(),
                        Value::Object(change.key.clone()),
                        change.version
                    ),
                };
                self.conflict(&conflict).await?;
            }
            ResultStatus::Rejected => {
                outcome = "rejected";
                let change = &mapped.full(json);
                let violation = Violation {
                    rule,
                    field: None,
                    reason: if reason.is_empty() {
                        "central rejected the change".into()
                    } else {
                        reason
                    },
                };
                self.dead_letter(
                    warehouse_id,
                    item,
                    &change.source.table,
                    &change.version,
                    &violation,
                )
                .await?;
                let conflict = NewConflict {
                    warehouse_id: warehouse_id.to_string(),
                    table_name: change.source.table.clone(),
                    entity: Some(change.entity.as_str().to_string()),
                    entity_key: Value::Object(change.key.clone()),
                    kind: "rejected",
                    rule: Some(violation.rule.to_string()),
                    reason: violation.reason.clone(),
                    source_version: change.version.clone(),
                    central_version: result.current_version.clone(),
                    source_value: change.data.clone().map(Value::Object),
                    central_value: result.current.clone(),
                    dead_lettered: true,
                    hint: format!(
                        "central refused {} {}: {}. Fix the row in {} at the warehouse (its next change is sent again) or central's rule, then run a forced resync (POST /sync/warehouses/{warehouse_id}); the event is kept in {}.",
                        change.entity.as_str(),
                        Value::Object(change.key.clone()),
                        violation.reason,
                        change.source.table,
                        self.dead_letter_place()
                    ),
                };
                self.conflict(&conflict).await?;
            }
        }
        Ok(outcome)
    }

    /// A change that broke a rule before sending: dead letter and conflict row.
    async fn refuse(
        &self,
        warehouse_id: &str,
        item: &Incoming,
        table: &str,
        mapped: Option<(&str, Value, String)>,
        value: Option<Value>,
        v: Violation,
    ) -> Result<(), Cancelled> {
        crate::metrics::metrics()
            .changes_delivered
            .with_label_values(&[warehouse_id, "invalid"])
            .inc();
        let (entity, key, version) = match mapped {
            Some((e, k, ver)) => (Some(e.to_string()), k, ver),
            None => (
                None,
                Value::Object(Default::default()),
                String::from("unknown"),
            ),
        };
        tracing::warn!(warehouse = %warehouse_id, table, version = %version, rule = v.rule, field = ?v.field, reason = %v.reason, "change breaks a rule; dead-lettered");
        self.dead_letter(warehouse_id, item, table, &version, &v)
            .await?;
        let reason = match &v.field {
            Some(f) => format!("field {f}: {}", v.reason),
            None => v.reason.clone(),
        };
        let conflict = NewConflict {
            warehouse_id: warehouse_id.to_string(),
            table_name: table.to_string(),
            entity,
            entity_key: key,
            kind: "invalid",
            rule: Some(v.rule.to_string()),
            reason: reason.clone(),
            source_version: version,
            central_version: None,
            // A 1 MB text is not copied into the conflict row: the dead letter keeps it.
            source_value: value.filter(|v| v.to_string().len() <= 64 * 1024),
            central_value: None,
            dead_lettered: true,
            hint: format!(
                "the row breaks rule {} ({reason}); fix it in {table} at the warehouse — its next change is sent again — or relax [rules]; the event is kept in {}.",
                v.rule,
                self.dead_letter_place()
            ),
        };
        self.conflict(&conflict).await
    }

    /// Dead-letters a record on a change topic that is not a change event of ours (no
    /// `warehouse_id`/`table` headers): rule `event_format`, no warehouse, no conflict row.
    pub async fn dead_letter_foreign(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        reason: String,
    ) -> Result<(), Cancelled> {
        let item = Incoming::Record {
            table: std::sync::Arc::from(""),
            oid: 0,
            key,
            value,
            stream: std::sync::Arc::from(""),
        };
        let v = Violation {
            rule: "event_format",
            field: None,
            reason,
        };
        self.dead_letter("", &item, "", "unknown", &v).await
    }

    fn dead_letter_place(&self) -> String {
        match &self.dead_letters {
            DeadLetters::Kafka { topic, .. } => format!("the {topic} topic"),
            DeadLetters::StateDb => "sync_dead_letters".into(),
        }
    }

    async fn dead_letter(
        &self,
        warehouse_id: &str,
        item: &Incoming,
        table: &str,
        version: &str,
        v: &Violation,
    ) -> Result<(), Cancelled> {
        crate::metrics::metrics()
            .dead_letters
            .with_label_values(&[warehouse_id, v.rule])
            .inc();
        let value = item.value();
        if let DeadLetters::Kafka { bus, topic } = &self.dead_letters {
            let key = item.key();
            let op = match item {
                Incoming::Event(ev) => ev.op.code().to_string(),
                Incoming::Record { .. } => RawEvent::parse(&value)
                    .map(|e| e.op.into_owned())
                    .unwrap_or_default(),
            };
            let field = v.field.clone().unwrap_or_default();
            let headers = [
                ("warehouse_id", warehouse_id),
                ("table", table),
                ("op", op.as_str()),
                ("version", version),
                ("dlq_rule", v.rule),
                ("dlq_field", field.as_str()),
                ("dlq_reason", v.reason.as_str()),
            ];
            self.retry("cannot write to the dead-letter topic", || {
                bus.send_and_wait(topic, &key, &value, &headers)
            })
            .await?;
        }
        // Also in the state DB with either bus: `GET /sync/dead-letters` lists it and
        // `POST /sync/dead-letters/{id}/replay` sends it again.
        let d = NewDeadLetter {
            warehouse_id: warehouse_id.to_string(),
            table_name: table.to_string(),
            source_version: version.to_string(),
            rule: v.rule.to_string(),
            reason: v.reason.clone(),
            raw_event: value.into_owned(),
        };
        self.persist(|| self.state.record_dead_letter(&d)).await
    }

    /// Records a conflict (counted in the metrics) until it is stored.
    async fn conflict(&self, c: &NewConflict) -> Result<(), Cancelled> {
        crate::metrics::metrics()
            .conflicts
            .with_label_values(&[c.warehouse_id.as_str(), c.kind])
            .inc();
        self.persist(|| self.state.record_conflict(c)).await
    }

    /// Runs a state DB write until it succeeds (or cancel): an outcome must be recorded
    /// before it counts.
    async fn persist<'a, F, Fut>(&'a self, write: F) -> Result<(), Cancelled>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), StoreError>> + 'a,
    {
        self.retry("cannot record an outcome in the state DB", write)
            .await
    }

    /// Runs `attempt` until it succeeds, waiting with backoff between failures (logged with
    /// `what`); only `cancel` ends it early.
    async fn retry<'a, T, E, F, Fut>(&'a self, what: &str, attempt: F) -> Result<T, Cancelled>
    where
        E: std::fmt::Display,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>> + 'a,
    {
        let mut backoff = Backoff::new();
        loop {
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let wait = backoff.next_delay(std::time::Duration::ZERO);
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "{what}; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.cancel.cancelled() => return Err(Cancelled),
                    }
                }
            }
        }
    }
}

/// The data fields of an upsert whose columns the event left out as unchanged TOAST.
fn unfilled_fields(
    change: &MappedChange,
    m: &settings::TableMapping,
    unchanged: &[String],
) -> Vec<usize> {
    if change.op != ChangeOp::Upsert || unchanged.is_empty() {
        return Vec::new();
    }
    change
        .missing
        .iter()
        .copied()
        .filter(|&f| unchanged.contains(&m.data[f].1.column))
        .collect()
}

/// Key lanes per warehouse, each with its own worker and one request in flight: a lane that
/// waits on central (a slow answer, a `Retry-After`) holds back only its own keys.
pub const LANES: usize = 32;

/// A batch holds up to this many full requests' worth of changes (its lanes' shares are
/// smaller; a lane that fell behind sends several shares in one request).
pub const BATCH_REQUESTS: usize = 8;

/// Changes a consumer may have prepared and not yet delivered (their memory is freed lane
/// by lane as each lane's share gets its outcomes): enough for the other lanes to go on
/// while some wait on central. It is the pipeline's window, about 2 KB of memory per
/// change: at 32,768 an outage's backlog of small transactions took run's peak RSS to 154
/// MB (129 MB at 16,384, but then a handover under a slow central could not read its open
/// transaction on to the commit within the limit: 2 of 3 CI runs failed that test).
pub const IN_FLIGHT_CHANGES: usize = 32_768;

/// The lane of a change with this key hash ([`MappedChange::key_hash`]).
fn lane(key_hash: u64) -> usize {
    (key_hash % LANES as u64) as usize
}

/// The lane of an entity's key.
#[cfg(test)]
fn lane_of(entity: &str, key: &serde_json::Map<String, Value>) -> usize {
    let key = key.iter().map(|(k, v)| (k.as_str(), v));
    lane(mapping::key_hash(entity, key))
}

/// The central key of an event that failed validation, as far as it can be read.
fn view_key(view: &EventView, m: &settings::TableMapping) -> Value {
    let row = view.after.as_ref().or(view.before.as_ref());
    let mut key = serde_json::Map::new();
    if let Some(row) = row {
        for (name, src) in &m.key {
            if let Some(v) = row.get(&src.column) {
                let v = match v {
                    Value::String(s) if s.len() > 200 => {
                        Value::String(format!("{}…", &s[..s.floor_char_boundary(200)]))
                    }
                    v => v.clone(),
                };
                key.insert(name.clone(), v);
            }
        }
    }
    Value::Object(key)
}

#[cfg(test)]
mod tests {
    use super::{LANES, lane_of, parse_position, position_text};

    #[test]
    fn a_stored_lane_position_sorts_as_its_source_order_and_reads_back() {
        let positions = [
            ("000000000000FFFF:00000001", 1u8),
            ("0000000000010000:00000000", 0),
            ("0000000000010000:00000000", 1),
            ("0000000000010000:0000000A", 0),
            ("0000000100000000:00000000", 0),
        ];
        let texts: Vec<String> = positions
            .iter()
            .map(|(v, s)| position_text(v, *s))
            .collect();
        assert!(texts.is_sorted(), "{texts:?}");
        for ((v, s), t) in positions.iter().zip(&texts) {
            assert_eq!(parse_position(t), Some((v.to_string(), *s)));
        }
        assert_eq!(parse_position("0000000000010000:00000000"), None);
        assert_eq!(parse_position("0000000000010000:00000000/zz"), None);
    }

    #[test]
    fn one_key_keeps_its_lane_and_keys_spread_over_all_lanes() {
        let key = |sku: String, n: i64| {
            let mut k = serde_json::Map::new();
            k.insert("sku".into(), sku.into());
            k.insert("bin".into(), n.into());
            k
        };
        let a = key("SKU-1".into(), 7);
        assert_eq!(
            lane_of("stock_level", &a),
            lane_of("stock_level", &a.clone())
        );
        let mut per_lane = [0usize; LANES];
        for i in 0..4000 {
            per_lane[lane_of("stock_level", &key(format!("SKU-{i}"), i))] += 1;
        }
        // 4,000 / LANES expected per lane: none starved, none overloaded.
        let expected = 4000 / LANES;
        assert!(
            per_lane
                .iter()
                .all(|&n| (expected * 6 / 10..expected * 14 / 10).contains(&n)),
            "{per_lane:?}"
        );
    }
}
