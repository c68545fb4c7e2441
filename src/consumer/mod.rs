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
//!
//! This file maps and validates (`prepare`, with the mappings bound to their tables by
//! [`bindings`] and unchanged TOAST read back by [`toast`]); `lanes` sends batches to central
//! lane by lane, `outcomes` records what is not simply applied, and `replay` keeps the
//! positions that spare central what it already has after a restart.

pub mod bindings;
mod lanes;
mod outcomes;
mod replay;

use lanes::*;
use replay::*;
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
        self.bound(warehouse_id).await;
    }

    /// The mapped tables of `warehouse_id` published under another name now (`published`:
    /// the publication's OIDs and names), for the console.
    pub fn renamed_tables(
        &self,
        warehouse_id: &str,
        published: &[(u32, String)],
    ) -> Vec<bindings::Renamed> {
        self.bindings.renamed(warehouse_id, published)
    }

    /// `warehouse_id`'s bindings (none when nothing is mapped).
    async fn bound(&self, warehouse_id: &str) -> Arc<bindings::Bound> {
        if self.settings.mappings.is_empty() {
            return Arc::default();
        }
        self.bindings
            .of(
                warehouse_id,
                &self.state,
                &self.toast,
                &self.settings.mappings,
            )
            .await
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
                    .warn_renamed(warehouse_id, oid, (name, m), &table, &self.state)
                    .await;
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
        let bound = self.bound(warehouse_id).await;
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
