//! Verify jobs (`POST /sync/verify`, `inventorysync verify`): proof that central *holds* what
//! the warehouse holds, and a repair of what it does not.
//!
//! A sync cycle proves that every change has an outcome; a dead letter is an outcome, and
//! central also drifts for reasons the engine never sees (a hand edit, a restored backup, a
//! bug that drops writes). A verify walks each mapped table and central's listing of its
//! entity (DESIGN §3) side by side, in the listing's key order: the byte order of each key's
//! canonical JSON. The warehouse is read in that order by a cursor over an expression that
//! writes the key's canonical JSON in SQL (`ORDER BY … COLLATE "C"`); each row is also mapped
//! as the consumer maps it, and a row whose key the two write differently stops the table
//! with the reason (never a wrong finding).
//!
//! Changes stream on meanwhile; they must not count as drift. Per *epoch* (one cursor, whose
//! snapshot is held at most [`EPOCH`] and given up at once when DDL waits for the table):
//! 1. a logical message marks `low` in the WAL; once the transactions in flight at that point
//!    are done (as a resync chunk's low watermark), the cursor's snapshot sees every commit
//!    before `low`, and any change it does not see commits after `low`;
//! 2. a second message marks `high`, after the snapshot; the verify waits until everything
//!    before `high` has an outcome at central;
//! 3. then the rows are fetched and compared with central's listing, read now. A central row
//!    whose version is at or after `low` was changed meanwhile: not a finding. A row missing at
//!    central is confirmed by reading it again (after a third message): if its row version
//!    (`xmin`) changed or it is gone, the stream is on it.
//!
//! What is left is drift: `missing_at_central`, `only_at_central`, `differs` (with the fields),
//! or `older_at_central` (central's version is from before the row's last change: a row whose
//! `xmin` is at or above an xid recorded with a WAL position committed after that position).
//! Each finding is a `sync_conflicts` row of kind `drift` (its `rule` names the kind).
//!
//! A repair re-reads the rows it fixes after a fresh message `r` (they must be unchanged
//! since the snapshot), and sends upserts and deletes at version `(r − 1, i)`: above what
//! central holds (before `low`), below any change committed after the re-read (at or after
//! `r`), so it never undoes a newer streamed change.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::Lsn;
use crate::central::client::{CentralClient, ListError, Verdict};
use crate::central::{
    Change, ChangeOp, ChangeSource, Entity, ListedEntity, Outgoing, ResultStatus,
};
use crate::consumer::mapping::{Mapped, map_change_event};
use crate::consumer::settings::{ConsumerSettings, Convert, TableMapping};
use crate::event::{ChangeEvent, Op, SnapshotMarker, SourceInfo};
use crate::jobs::{Delivery, Stop, Warehouse};
use crate::pg::quote_ident;
use crate::source::SourceError;
use crate::source::marker::Markers;
use crate::source::snapshot::PublishedTable;
use crate::store::{ActiveWarehouse, NewConflict, StateDb, VERIFY_JOB};

/// Rows fetched from the cursor per round trip: one chunk (progress is saved per chunk).
pub const CHUNK_ROWS: usize = 5_000;
/// Rows per page of central's listing.
const PAGE_ROWS: usize = 5_000;
/// Longest a cursor's snapshot is held before the next epoch takes a new one.
pub const EPOCH: Duration = Duration::from_secs(30);
/// Changes per repair request.
const REPAIR_BATCH: usize = 500;
/// The logical message prefix of a verify's marks.
pub const MARK_PREFIX: &str = "inventorysync.verify";
/// The cursor's name.
const CURSOR: &str = "inventorysync_verify";
/// How a reason starts when one table cannot be checked (the walk goes on with the others).
const UNCHECKABLE: &str = "cannot check: ";

/// `[verify]`: a read-only verify of each warehouse now and then, throttled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifySchedule {
    /// How often each warehouse is verified (`every = "24h"`); `None`: only when asked.
    pub every: Option<std::time::Duration>,
    /// Rows per second a scheduled verify reads at most (`max_rows_per_second`).
    pub max_rows_per_second: u64,
}

/// A scheduled verify's default pace: a small share of what streaming reads.
pub const DEFAULT_VERIFY_ROWS_PER_SECOND: u64 = 5_000;

impl Default for VerifySchedule {
    fn default() -> Self {
        Self {
            every: None,
            max_rows_per_second: DEFAULT_VERIFY_ROWS_PER_SECOND,
        }
    }
}

/// What a verify needs besides the warehouse: the mappings, the rules and central.
pub struct Verifier {
    /// The consumer's settings (mappings and rules).
    pub settings: ConsumerSettings,
    /// Central's client.
    pub central: Arc<CentralClient>,
}

/// The kind of a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finding {
    /// A warehouse row central does not hold.
    MissingAtCentral,
    /// A central row the warehouse does not hold.
    OnlyAtCentral,
    /// Both hold the row; fields differ.
    Differs,
    /// Central's version is from before the warehouse row's last change.
    OlderAtCentral,
}

impl Finding {
    /// The name the API, the metric and `sync_conflicts.rule` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Finding::MissingAtCentral => "missing_at_central",
            Finding::OnlyAtCentral => "only_at_central",
            Finding::Differs => "differs",
            Finding::OlderAtCentral => "older_at_central",
        }
    }

    /// What a repair does about it.
    fn hint(self) -> &'static str {
        match self {
            Finding::MissingAtCentral => {
                "repair (POST /sync/verify with \"repair\": true) upserts the warehouse's row at central"
            }
            Finding::OnlyAtCentral => {
                "repair (POST /sync/verify with \"repair\": true) deletes the row at central: the warehouse does not have it"
            }
            Finding::Differs => {
                "repair (POST /sync/verify with \"repair\": true) upserts the warehouse's row over central's"
            }
            Finding::OlderAtCentral => {
                "central missed the row's last change; repair (POST /sync/verify with \"repair\": true) upserts the warehouse's row at a newer version"
            }
        }
    }
}

/// A verify job's options (`sync_jobs.options`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Options {
    /// Fix what is found.
    #[serde(default)]
    pub repair: bool,
    /// A sync cycle with verify: the job fails unless central equals the warehouse.
    #[serde(default)]
    pub strict: bool,
    /// Only these mapped tables (configured names); all when absent.
    #[serde(default)]
    pub tables: Option<Vec<String>>,
    /// Read at most this many warehouse rows per second (a scheduled verify's pace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows_per_second: Option<u64>,
    /// Queued by the `[verify] every` schedule.
    #[serde(default)]
    pub scheduled: bool,
}

/// A table or entity a verify could not check, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unchecked {
    /// `schema.table`.
    pub table: String,
    /// The central entity.
    pub entity: String,
    /// Why.
    pub reason: String,
}

/// A verify's report for one warehouse (`sync_job_warehouses.verify`, saved per chunk).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Warehouse rows compared with central.
    pub compared: u64,
    /// Central rows read.
    pub central_rows: u64,
    /// Findings by kind.
    pub findings: BTreeMap<String, u64>,
    /// Findings repaired (central now holds the warehouse's row, or a newer one).
    pub repaired: u64,
    /// Findings a repair could not fix (central refused the change).
    pub unrepaired: u64,
    /// Rows changed while they were compared: the stream is on them, not findings.
    pub racing: u64,
    /// Warehouse rows that break a rule of the mapping (they are `invalid` conflicts, never
    /// sent): central cannot equal them.
    pub invalid_rows: u64,
    /// Tables done.
    pub tables_done: Vec<String>,
    /// What could not be checked, and why.
    pub unchecked: Vec<Unchecked>,
    /// Where the time went, in seconds.
    #[serde(default)]
    pub seconds: Seconds,
    /// Once done: `equal`, `drift`, `repaired` or `incomplete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
}

/// Where a verify's time went, in seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Seconds {
    /// Marks and the waits for central to have everything before them.
    pub waiting: f64,
    /// Reading the warehouse's rows (the cursor's sort included) and mapping them.
    pub warehouse: f64,
    /// Reading central's listing.
    pub central: f64,
    /// Re-reading, recording and repairing what was found.
    pub findings: f64,
}

impl Report {
    /// Findings of every kind.
    pub fn total_findings(&self) -> u64 {
        self.findings.values().sum()
    }

    /// The verdict once every table was walked.
    fn conclude(&mut self, repair: bool) -> &str {
        let verdict = if !self.unchecked.is_empty() {
            "incomplete"
        } else if self.total_findings() == 0 && self.invalid_rows == 0 {
            "equal"
        } else if repair && self.unrepaired == 0 && self.invalid_rows == 0 {
            "repaired"
        } else {
            "drift"
        };
        self.verdict = Some(verdict.to_string());
        verdict
    }

    fn found(&mut self, kind: Finding) {
        *self.findings.entry(kind.as_str().to_string()).or_default() += 1;
        crate::metrics::metrics()
            .verify_findings
            .with_label_values(&[kind.as_str()])
            .inc();
    }
}

/// Runs one warehouse of verify job `w` to its end (or until interrupted: a later run goes
/// on after the last chunk saved).
pub(crate) async fn run_job(
    state: &StateDb,
    wh: &Warehouse,
    w: &ActiveWarehouse,
    mapped: &crate::jobs::MappedTables,
    verifier: &Verifier,
    delivery: &Delivery,
    cancel: &CancellationToken,
) {
    let outcome = verify_warehouse(state, wh, w, mapped, verifier, delivery, cancel).await;
    let failed = match outcome {
        Ok(None) => None,
        Ok(Some(reason)) | Err(Stop::Failed(reason)) => Some(reason),
        Err(Stop::Cancelled) => return,
        Err(Stop::Store(e)) => {
            tracing::warn!(job = %w.job_id, error = %e, "verify: state DB unavailable; retrying");
            return;
        }
    };
    let settled = async {
        match &failed {
            None => {
                state.update_job_warehouse(w, None, true, None).await?;
                state.settle_jobs(None).await
            }
            Some(reason) => {
                tracing::warn!(job = %w.job_id, warehouse = %w.warehouse_id, %reason, "verify failed");
                state
                    .update_job_warehouse(w, None, false, Some(reason))
                    .await?;
                state.settle_jobs(Some((&w.job_id, reason))).await
            }
        }
    };
    if let Err(e) = settled.await {
        tracing::warn!(error = %e, "cannot record the verify's end");
    }
}

/// One table to walk.
struct Plan {
    table: PublishedTable,
    mapping: TableMapping,
    /// SQL writing a row's central key as canonical JSON.
    canonical: String,
    /// The primary key's columns (indexes into the published columns).
    pk: Vec<usize>,
}

/// What the walk of one warehouse shares.
struct Walk<'a> {
    state: &'a StateDb,
    wh: &'a Warehouse,
    w: &'a ActiveWarehouse,
    verifier: &'a Verifier,
    delivery: &'a Delivery,
    cancel: &'a CancellationToken,
    options: Options,
    /// For marks, re-reads and the DDL check.
    sql: tokio_postgres::Client,
    /// For the cursor.
    cur: Arc<tokio_postgres::Client>,
    markers: Markers,
    /// (next xid, WAL position) pairs of the warehouse, by xid.
    positions: Vec<(u64, Lsn)>,
    /// The current cursor snapshot's `xmax` (a full xid): rows' `xmin`s are read near it.
    xmax: u64,
    /// With a pace: when this run started reading, and the rows it read since.
    paced: (tokio::time::Instant, u64),
    report: Report,
}

/// Walks every mapped table of one warehouse; `Some(reason)` fails the job.
async fn verify_warehouse(
    state: &StateDb,
    wh: &Warehouse,
    w: &ActiveWarehouse,
    mapped: &crate::jobs::MappedTables,
    verifier: &Verifier,
    delivery: &Delivery,
    cancel: &CancellationToken,
) -> Result<Option<String>, Stop> {
    let options: Options = state
        .job_options(&w.job_id)
        .await?
        .and_then(|o| serde_json::from_value(o).ok())
        .unwrap_or_default();
    let mut report: Report = state
        .verify_report(&w.job_id, &w.warehouse_id)
        .await?
        .and_then(|r| serde_json::from_value(r).ok())
        .unwrap_or_default();
    let config = &wh.config;
    let connect = || async {
        crate::pg::connect_sql(&config.conn)
            .await
            .map_err(|e| Stop::Failed(format!("cannot connect to warehouse {}: {e}", config.id)))
    };
    let (sql, cur) = (connect().await?, Arc::new(connect().await?));
    let markers = Markers::open(&sql, config.primary.as_ref(), &config.id)
        .await
        .map_err(|e| Stop::Failed(e.to_string()))?;
    if !markers.available() {
        return Ok(Some(crate::source::marker::refusal(&config.id, "a verify")));
    }
    let current = crate::jobs::mapped_relations(state, config, mapped)
        .await
        .map_err(Stop::Failed)?;
    let identity = crate::source::relation::SourceIdentity {
        warehouse_id: config.id.as_str().into(),
        db: config.conn.dbname.as_str().into(),
    };
    let published = crate::source::snapshot::published_tables(&sql, &config.publication, &identity)
        .await
        .map_err(|e| {
            Stop::Failed(format!(
                "cannot list publication {}: {e}",
                config.publication
            ))
        })?;
    let positions = state.xid_positions(&config.id).await?;
    let mut walk = Walk {
        state,
        wh,
        w,
        verifier,
        delivery,
        cancel,
        options,
        sql,
        cur,
        markers,
        positions,
        xmax: 0,
        paced: (tokio::time::Instant::now(), 0),
        report: Report::default(),
    };
    // Which tables, and whether each can be walked.
    let mut plans = Vec::new();
    let mut unchecked = Vec::new();
    for ((configured, _), name) in mapped.iter().zip(&current) {
        if walk
            .options
            .tables
            .as_ref()
            .is_some_and(|t| !t.contains(configured) && !t.contains(name))
        {
            continue;
        }
        let Some(mapping) = verifier.settings.mappings.get(configured).cloned() else {
            continue;
        };
        let entity = mapping.entity.as_str().to_string();
        let Some(table) = published
            .iter()
            .find(|t| t.info.table.qualified_name() == name)
        else {
            unchecked.push(Unchecked {
                table: configured.clone(),
                entity,
                reason: format!("{name} is not in publication {}", config.publication),
            });
            continue;
        };
        match plan(&walk.sql, table, mapping).await {
            Ok(p) => plans.push(p),
            Err(reason) => unchecked.push(Unchecked {
                table: name.clone(),
                entity,
                reason,
            }),
        }
    }
    // Central lists by entity: two mapped tables of one entity (whether this job reads both
    // or not) cannot be told apart there, and the other's rows would look like drift.
    let all: Vec<Entity> = verifier
        .settings
        .mappings
        .values()
        .map(|m| m.entity)
        .collect();
    let shared: Vec<Entity> = plans
        .iter()
        .map(|p| p.mapping.entity)
        .filter(|e| all.iter().filter(|x| *x == e).count() > 1)
        .collect();
    plans.retain(|p| {
        if shared.contains(&p.mapping.entity) {
            unchecked.push(Unchecked {
                table: p.table.info.table.qualified_name().to_string(),
                entity: p.mapping.entity.as_str().into(),
                reason: format!(
                    "more than one mapped table is entity {}: central's listing cannot tell which table a row of it belongs to",
                    p.mapping.entity.as_str()
                ),
            });
            false
        } else {
            true
        }
    });
    for u in unchecked {
        if !report.unchecked.contains(&u) {
            report.unchecked.push(u);
        }
    }
    walk.report = report;
    for p in &plans {
        let name = p.table.info.table.qualified_name().to_string();
        if walk.report.tables_done.contains(&name)
            || walk.report.unchecked.iter().any(|u| u.table == name)
        {
            continue;
        }
        match walk_table(&mut walk, p).await {
            Ok(()) => walk.report.tables_done.push(name),
            Err(Stop::Failed(reason)) if reason.starts_with(UNCHECKABLE) => {
                let reason = reason[UNCHECKABLE.len()..].to_string();
                // This table cannot be walked (central without a listing, a key the two sides
                // write differently): the others still can.
                let _ = walk.cur.batch_execute("ROLLBACK").await;
                tracing::warn!(job = %w.job_id, table = %name, %reason, "verify cannot check this table");
                walk.report.unchecked.push(Unchecked {
                    table: name,
                    entity: p.mapping.entity.as_str().into(),
                    reason,
                });
            }
            Err(e) => return Err(e),
        }
        walk.save().await?;
    }
    let repair = walk.options.repair;
    let verdict = walk.report.conclude(repair).to_string();
    walk.save().await?;
    let r = &walk.report;
    tracing::info!(job = %w.job_id, warehouse = %w.warehouse_id, compared = r.compared, findings = r.total_findings(), repaired = r.repaired, racing = r.racing, %verdict, "verify done");
    Ok(match verdict.as_str() {
        "incomplete" => Some(format!(
            "could not check {}: {}",
            r.unchecked
                .iter()
                .map(|u| format!("{} ({})", u.table, u.entity))
                .collect::<Vec<_>>()
                .join(", "),
            r.unchecked
                .iter()
                .map(|u| u.reason.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        )),
        "drift" if walk.options.strict => Some(format!(
            "central differs from warehouse {}: {} finding(s) ({}){}",
            w.warehouse_id,
            r.total_findings(),
            r.findings
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            if r.invalid_rows > 0 {
                format!(", {} row(s) break a rule of the mapping", r.invalid_rows)
            } else {
                String::new()
            }
        )),
        _ => None,
    })
}

impl Walk<'_> {
    async fn save(&self) -> Result<(), Stop> {
        let report = serde_json::to_value(&self.report).unwrap_or(Value::Null);
        self.state
            .save_verify_report(&self.w.job_id, &self.w.warehouse_id, &report)
            .await?;
        Ok(())
    }

    /// Writes a mark into the WAL and returns its position once every transaction that
    /// committed before it is visible to a new snapshot here.
    async fn mark(&self, what: &str) -> Result<Lsn, Stop> {
        let failed = |e: SourceError| {
            Stop::Failed(format!(
                "warehouse {}: cannot write a verify mark: {e}",
                self.wh.config.id
            ))
        };
        let at = self
            .markers
            .emit(&self.sql, MARK_PREFIX, &format!("{what} {}", self.w.job_id))
            .await
            .map_err(failed)?
            .ok_or_else(|| {
                Stop::Failed(crate::source::marker::refusal(
                    &self.wh.config.id,
                    "a verify",
                ))
            })?;
        self.markers.caught_up(&self.sql).await.map_err(failed)?;
        crate::source::resync::settle_commits_before_low_watermark(&self.sql)
            .await
            .map_err(failed)?;
        Ok(at)
    }

    fn lower_bound(&self, xmin: u64) -> Option<Lsn> {
        let i = self.positions.partition_point(|(x, _)| *x <= xmin);
        i.checked_sub(1).map(|i| self.positions[i].1)
    }

    fn sql_failed(&self, e: tokio_postgres::Error) -> Stop {
        Stop::Failed(format!(
            "warehouse {}: {}",
            self.wh.config.id,
            crate::pg::error_text(&e)
        ))
    }
}

/// Checks that `table` can be walked in central's key order with `mapping`, and how.
async fn plan(
    sql: &tokio_postgres::Client,
    table: &PublishedTable,
    mapping: TableMapping,
) -> Result<Plan, String> {
    let rel = &table.info;
    let pk_names = crate::source::snapshot::primary_key(sql, rel.oid)
        .await
        .map_err(|e| e.to_string())?;
    if pk_names.is_empty() {
        return Err(format!(
            "{} has no primary key: a verify reads a row again by its primary key",
            rel.table.qualified_name()
        ));
    }
    let pk: Vec<usize> = pk_names
        .iter()
        .filter_map(|n| rel.columns.iter().position(|c| &*c.name == n.as_str()))
        .collect();
    if pk.len() != pk_names.len() {
        return Err(format!(
            "{}: the publication's column list leaves out a primary key column",
            rel.table.qualified_name()
        ));
    }
    let mut fields: Vec<&(String, crate::consumer::settings::FieldSource)> =
        mapping.key.iter().collect();
    fields.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut parts = Vec::new();
    for (i, (name, source)) in fields.iter().enumerate() {
        let Some(col) = rel.columns.iter().find(|c| *c.name == *source.column) else {
            return Err(format!(
                "key field {name} reads column {}, which {} does not publish",
                source.column,
                rel.table.qualified_name()
            ));
        };
        let json = key_json_sql(&quote_ident(&col.name), col.type_oid, source.convert).ok_or_else(|| {
            format!(
                "key field {name} (column {}, type oid {}) cannot be walked in central's key order in SQL; verify supports integer, boolean, numeric, text-like, uuid, enum, date and time keys",
                col.name, col.type_oid
            )
        })?;
        let label = serde_json::to_string(name).unwrap_or_default();
        parts.push(format!(
            "{} || coalesce({json}, 'null')",
            crate::source::conn::quote_literal(&format!(
                "{}{label}:",
                if i == 0 { "{" } else { "," }
            ))
        ));
    }
    let canonical = format!("({} || '}}')", parts.join(" || "));
    Ok(Plan {
        table: table.clone(),
        mapping,
        canonical,
        pk,
    })
}

/// SQL writing column `col` (of type `oid`) as the JSON the consumer sends for it, for the
/// types whose JSON SQL writes alike; `None` for the others.
fn key_json_sql(col: &str, oid: u32, convert: Convert) -> Option<String> {
    use crate::values::oid as t;
    if convert == Convert::ByteaUtf8 {
        return Some(format!("to_json(convert_from({col}, 'UTF8'))::text"));
    }
    Some(match oid {
        t::INT2 | t::INT4 | t::INT8 | t::OID => format!("{col}::text"),
        t::BOOL => format!("CASE WHEN {col} THEN 'true' ELSE 'false' END"),
        // Blank-padded: its output form, as pgoutput sends it (a cast to text trims it).
        t::BPCHAR => format!("to_json({col})::text"),
        t::TIMESTAMP => format!("to_json(regexp_replace({col}::text, ' ', 'T'))::text"),
        t::FLOAT4 | t::FLOAT8 | t::JSON | t::JSONB | t::TIMESTAMPTZ | t::BYTEA => return None,
        o if crate::values::array_element(o).is_some() => return None,
        // Text, numbers kept exact, uuid, enums, dates: their text form, as a JSON string.
        _ => format!("to_json({col}::text)::text"),
    })
}

/// Central fields by name.
type Fields = Map<String, Value>;

/// A warehouse row as the walk holds it.
struct WarehouseRow {
    canonical: String,
    key: Map<String, Value>,
    /// `None`: the row breaks a rule of the mapping.
    data: Option<Map<String, Value>>,
    pk: Vec<String>,
    xmin: String,
}

/// Something that may be drift, until it is confirmed.
struct Candidate {
    kind: Finding,
    canonical: String,
    key: Map<String, Value>,
    warehouse: Option<WarehouseRow>,
    central: Option<ListedEntity>,
    fields: Vec<String>,
}

/// A page of central's listing, each row with its key's canonical JSON, and the next cursor.
type Page = (Vec<(String, ListedEntity)>, Option<String>);

/// Central's side of the walk: a buffer of its listing, and the next page already asked for
/// (read and parsed on another task while the warehouse's rows are read and compared).
struct CentralSide {
    items: VecDeque<(String, ListedEntity)>,
    /// Cursor of the next page; `None` with `done` once read to the end.
    after: Option<String>,
    done: bool,
    next: Option<tokio::task::JoinHandle<Result<Page, ListError>>>,
}

impl CentralSide {
    fn new(after: Option<String>) -> Self {
        Self {
            items: VecDeque::new(),
            after,
            done: false,
            next: None,
        }
    }

    /// Asks for the page after the current cursor, on its own task.
    fn ask(&mut self, walk: &Walk<'_>, entity: Entity) {
        if self.done || self.next.is_some() {
            return;
        }
        let (central, warehouse, after, cancel) = (
            walk.verifier.central.clone(),
            walk.w.warehouse_id.clone(),
            self.after.clone(),
            walk.cancel.clone(),
        );
        self.next = Some(tokio::spawn(async move {
            let page = central
                .list_entities(&warehouse, entity, after.as_deref(), PAGE_ROWS, &cancel)
                .await?;
            let items = page
                .items
                .into_iter()
                .map(|item| (serde_json::to_string(&item.key).unwrap_or_default(), item))
                .collect();
            Ok((items, page.next))
        }));
    }

    /// The first buffered row, reading a page when the buffer is empty.
    async fn front(&mut self, walk: &mut Walk<'_>, entity: Entity) -> Result<Option<&str>, Stop> {
        while self.items.is_empty() && !self.done {
            let began = std::time::Instant::now();
            self.ask(walk, entity);
            let Some(next) = self.next.take() else {
                break;
            };
            let (items, next) = next
                .await
                .map_err(|e| Stop::Failed(format!("{UNCHECKABLE}reading central's listing: {e}")))?
                .map_err(|e| match e {
                    ListError::Cancelled => Stop::Cancelled,
                    e => Stop::Failed(format!("{UNCHECKABLE}{e}")),
                })?;
            walk.report.central_rows += items.len() as u64;
            walk.report.seconds.central += began.elapsed().as_secs_f64();
            for (canonical, item) in items {
                let last = self
                    .items
                    .back()
                    .map(|(k, _)| k.as_str())
                    .or(self.after.as_deref());
                if last.is_some_and(|l| l.as_bytes() >= canonical.as_bytes()) {
                    return Err(Stop::Failed(format!(
                        "{UNCHECKABLE}central's listing of {} is not in key order: {canonical} after {}",
                        entity.as_str(),
                        last.unwrap_or_default()
                    )));
                }
                self.items.push_back((canonical, item));
            }
            match next {
                Some(n) if !self.items.is_empty() => self.after = Some(n),
                _ => self.done = true,
            }
            // The page after this one is read while this one is compared.
            self.ask(walk, entity);
        }
        Ok(self.items.front().map(|(k, _)| k.as_str()))
    }
}

impl Drop for CentralSide {
    fn drop(&mut self) {
        if let Some(next) = self.next.take() {
            next.abort();
        }
    }
}

/// Reads a table's cursor chunk by chunk, each row converted and mapped as the stream and
/// the consumer would (on its own task, beside the comparison).
struct ChunkReader {
    cur: Arc<tokio_postgres::Client>,
    rel: Arc<crate::source::relation::RelationInfo>,
    mapping: TableMapping,
    settings: ConsumerSettings,
    pk: Vec<usize>,
    chunk: usize,
    name: String,
}

impl ChunkReader {
    /// The cursor's next rows, in key order.
    async fn read(self: Arc<Self>) -> Result<Vec<WarehouseRow>, String> {
        let msgs = self
            .cur
            .simple_query(&format!("FETCH {} FROM {CURSOR}", self.chunk))
            .await
            .map_err(|e| format!("{}: {}", self.name, crate::pg::error_text(&e)))?;
        let n_cols = self.rel.columns.len().max(1);
        let mut rows: Vec<WarehouseRow> = Vec::with_capacity(self.chunk);
        for m in msgs {
            let tokio_postgres::SimpleQueryMessage::Row(r) = m else {
                continue;
            };
            let canonical = r.get(n_cols).unwrap_or_default().to_string();
            if let Some(before) = rows.last()
                && before.canonical.as_bytes() >= canonical.as_bytes()
            {
                return Err(format!(
                    "{UNCHECKABLE}{}: rows came out of key order ({canonical} after {})",
                    self.name, before.canonical
                ));
            }
            let row = crate::source::snapshot::row_from_text(&self.rel, &r, Lsn::ZERO)
                .map_err(|e| e.to_string())?;
            let (key, data) = match map_row(&self.mapping, &self.settings, &self.rel, row) {
                Ok((k, d)) => (k, Some(d)),
                Err(_) => (Map::new(), None),
            };
            if data.is_some() {
                let written = serde_json::to_string(&key).unwrap_or_default();
                if written != canonical {
                    return Err(format!(
                        "{UNCHECKABLE}{}: the key {written} is written {canonical} in SQL; verify cannot walk this table in central's order",
                        self.name
                    ));
                }
            }
            rows.push(WarehouseRow {
                canonical,
                key,
                data,
                pk: self
                    .pk
                    .iter()
                    .map(|&i| r.get(i).unwrap_or_default().to_string())
                    .collect(),
                xmin: r.get(n_cols + 1).unwrap_or_default().to_string(),
            });
        }
        Ok(rows)
    }
}

/// Walks one table to its end, epoch after epoch.
async fn walk_table(walk: &mut Walk<'_>, p: &Plan) -> Result<(), Stop> {
    let name = p.table.info.table.qualified_name().to_string();
    loop {
        let progress = walk
            .state
            .resync_progress(&walk.w.job_id, &walk.w.warehouse_id, &name)
            .await?;
        if progress.done {
            return Ok(());
        }
        let after = progress.last_key.and_then(|k| k.into_iter().next());
        if epoch(walk, p, after).await? {
            return Ok(());
        }
    }
}

/// One cursor over the table's rows after `after`; `true` once the table is done.
async fn epoch(walk: &mut Walk<'_>, p: &Plan, after: Option<String>) -> Result<bool, Stop> {
    let rel = &p.table.info;
    let name = rel.table.qualified_name().to_string();
    let began = std::time::Instant::now();
    let low = walk.mark("low").await?;
    let low_version = format!("{:016X}:{:08X}", low.0, 0);
    walk.cur
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(|e| walk.sql_failed(e))?;
    let xmax: u64 = walk
        .cur
        .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[])
        .await
        .map_err(|e| walk.sql_failed(e))?
        .get::<_, String>(0)
        .parse()
        .unwrap_or(0);
    // Any transaction at or above `xmax` is not in this snapshot: it committed after `low`.
    walk.state
        .record_xid_position(&walk.w.warehouse_id, xmax, low)
        .await?;
    walk.xmax = xmax;
    let cols: Vec<String> = rel.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let mut conditions = Vec::new();
    if let Some(f) = &p.table.row_filter {
        conditions.push(format!("({f})"));
    }
    if let Some(a) = &after {
        conditions.push(format!(
            "{} COLLATE \"C\" > {}",
            p.canonical,
            crate::source::conn::quote_literal(a)
        ));
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    walk.cur
        .batch_execute(&format!(
            "DECLARE {CURSOR} NO SCROLL CURSOR FOR SELECT {}, {} AS inventorysync_key, xmin::text \
             FROM {} AS inventorysync_row{filter} ORDER BY {} COLLATE \"C\"",
            if cols.is_empty() {
                "NULL".into()
            } else {
                cols.join(", ")
            },
            p.canonical,
            p.table.from_item(),
            p.canonical,
        ))
        .await
        .map_err(|e| walk.sql_failed(e))?;
    let high = walk.mark("high").await?;
    crate::jobs::wait_delivered(
        walk.state,
        walk.wh,
        high,
        walk.delivery,
        (&walk.w.job_id, VERIFY_JOB),
        walk.cancel,
    )
    .await?;
    walk.report.seconds.waiting += began.elapsed().as_secs_f64();
    let started = tokio::time::Instant::now();
    let mut central = CentralSide::new(after.clone());
    let mut last = after;
    // Paced, a chunk is about a second's rows: the pause between two is short.
    let chunk = walk
        .options
        .max_rows_per_second
        .map_or(CHUNK_ROWS, |r| (r as usize).clamp(1, CHUNK_ROWS));
    let reader = Arc::new(ChunkReader {
        cur: walk.cur.clone(),
        rel: rel.clone(),
        mapping: p.mapping.clone(),
        settings: walk.verifier.settings.clone(),
        pk: p.pk.clone(),
        chunk,
        name: name.clone(),
    });
    // The next chunk is fetched and mapped on its own task while this one is compared.
    let mut next = Some(tokio::spawn(reader.clone().read()));
    loop {
        let began = std::time::Instant::now();
        let Some(task) = next.take() else {
            return Ok(true);
        };
        let rows = task
            .await
            .map_err(|e| Stop::Failed(format!("{name}: reading a chunk: {e}")))?
            .map_err(Stop::Failed)?;
        if let (Some(l), Some(first)) = (&last, rows.first())
            && l.as_bytes() >= first.canonical.as_bytes()
        {
            return Err(Stop::Failed(format!(
                "{UNCHECKABLE}{name}: rows came out of key order ({} after {l})",
                first.canonical
            )));
        }
        if rows.len() == chunk {
            next = Some(tokio::spawn(reader.clone().read()));
        }
        if let Some(row) = rows.last() {
            last = Some(row.canonical.clone());
        }
        walk.report.seconds.warehouse += began.elapsed().as_secs_f64();
        let exhausted = rows.len() < chunk;
        let read = rows.len() as u64;
        let mut candidates = Vec::new();
        for row in rows {
            walk.report.compared += 1;
            let mut matched = None;
            while let Some(front) = central.front(walk, p.mapping.entity).await? {
                match front.as_bytes().cmp(row.canonical.as_bytes()) {
                    std::cmp::Ordering::Less => {
                        let (canonical, item) = central.items.pop_front().expect("front");
                        only_at_central(walk, &mut candidates, canonical, item, &low_version);
                    }
                    std::cmp::Ordering::Equal => {
                        matched = central.items.pop_front().map(|(_, item)| item);
                        break;
                    }
                    std::cmp::Ordering::Greater => break,
                }
            }
            compare(walk, &mut candidates, row, matched, &low_version);
        }
        if exhausted {
            while central.front(walk, p.mapping.entity).await?.is_some() {
                let (canonical, item) = central.items.pop_front().expect("front");
                only_at_central(walk, &mut candidates, canonical, item, &low_version);
            }
        }
        let began = std::time::Instant::now();
        let found = settle(walk, p, candidates, &low_version).await?;
        walk.report.seconds.findings += began.elapsed().as_secs_f64();
        let report = serde_json::to_value(&walk.report).unwrap_or(Value::Null);
        walk.state
            .save_verify_chunk(
                &walk.w.job_id,
                &walk.w.warehouse_id,
                &name,
                last.as_deref(),
                read,
                found,
                exhausted,
                &report,
            )
            .await?;
        if exhausted {
            let _ = walk.cur.batch_execute("COMMIT").await;
            return Ok(true);
        }
        if let Some(rate) = walk.options.max_rows_per_second {
            walk.paced.1 += read;
            let due = walk.paced.0 + Duration::from_secs_f64(walk.paced.1 as f64 / rate as f64);
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = walk.cancel.cancelled() => return Err(Stop::Cancelled),
            }
        }
        if started.elapsed() >= EPOCH || ddl_waits(walk, rel.oid).await? {
            // A new snapshot (and central read again) from the last row on; the chunk read
            // ahead is read again then.
            if let Some(task) = next.take() {
                let _ = task.await;
            }
            let _ = walk.cur.batch_execute("COMMIT").await;
            return Ok(false);
        }
    }
}

/// Whether a session waits for a lock on relation `oid` (DDL behind the cursor's lock).
async fn ddl_waits(walk: &Walk<'_>, oid: u32) -> Result<bool, Stop> {
    let n: i64 = walk
        .sql
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE relation = $1 AND NOT granted",
            &[&oid],
        )
        .await
        .map_err(|e| walk.sql_failed(e))?
        .get(0);
    Ok(n > 0)
}

/// Maps a warehouse row as the consumer would: its central key and data.
fn map_row(
    m: &TableMapping,
    settings: &ConsumerSettings,
    rel: &crate::source::relation::RelationInfo,
    row: crate::event::Row,
) -> Result<(Fields, Fields), String> {
    let ev = ChangeEvent {
        before: None,
        after: Some(row),
        source: SourceInfo {
            table: rel.table.clone(),
            ts_ms: 0,
            ts_us: 0,
            snapshot: SnapshotMarker::Incremental,
            tx_id: None,
            lsn: Lsn::ZERO,
            commit_lsn: Lsn::ZERO,
            sequence: 0,
            unchanged_toast: vec![],
        },
        op: Op::Read,
        ts_ms: 0,
        transaction: None,
        key: None,
    };
    let mut out = Vec::with_capacity(256);
    match map_change_event(&ev, m, &settings.rules, &mut out).map_err(|v| v.to_string())? {
        Mapped::Changes(changes) => {
            let c = changes
                .first()
                .ok_or_else(|| "the mapping made nothing of the row".to_string())?
                .full(&out);
            Ok((c.key, c.data.unwrap_or_default()))
        }
        Mapped::Truncate => Err("not a row".into()),
    }
}

/// A central row the warehouse's snapshot does not hold.
fn only_at_central(
    walk: &mut Walk<'_>,
    candidates: &mut Vec<Candidate>,
    canonical: String,
    item: ListedEntity,
    low: &str,
) {
    if item.version.as_str() >= low {
        // Written after the snapshot: an insert the stream carried.
        walk.report.racing += 1;
        return;
    }
    candidates.push(Candidate {
        kind: Finding::OnlyAtCentral,
        canonical,
        key: item.key.clone(),
        warehouse: None,
        central: Some(item),
        fields: vec![],
    });
}

/// A warehouse row and central's row of the same key, if any.
fn compare(
    walk: &mut Walk<'_>,
    candidates: &mut Vec<Candidate>,
    row: WarehouseRow,
    central: Option<ListedEntity>,
    low: &str,
) {
    let Some(data) = &row.data else {
        walk.report.invalid_rows += 1;
        return;
    };
    let Some(c) = central else {
        candidates.push(Candidate {
            kind: Finding::MissingAtCentral,
            canonical: row.canonical.clone(),
            key: row.key.clone(),
            warehouse: Some(row),
            central: None,
            fields: vec![],
        });
        return;
    };
    if c.version.as_str() >= low {
        walk.report.racing += 1;
        return;
    }
    let empty = Map::new();
    let theirs = c.data.as_ref().unwrap_or(&empty);
    let mut fields: Vec<String> = data
        .iter()
        .filter(|(k, v)| theirs.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .chain(theirs.keys().filter(|k| !data.contains_key(*k)).cloned())
        .collect();
    fields.sort();
    let central_lsn = c
        .version
        .split(':')
        .next()
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or(0);
    let older = full_xid(&row.xmin, walk.xmax)
        .and_then(|x| walk.lower_bound(x))
        .is_some_and(|bound| central_lsn < bound.0);
    let kind = if older {
        Finding::OlderAtCentral
    } else if !fields.is_empty() {
        Finding::Differs
    } else {
        return;
    };
    candidates.push(Candidate {
        kind,
        canonical: row.canonical.clone(),
        key: row.key.clone(),
        warehouse: Some(row),
        central: Some(c),
        fields,
    });
}

/// The full (epoch-qualified) xid of a row's `xmin`, read as `xmin::text` inside a snapshot
/// whose `xmax` (a full xid) is `reference`: the one with those low 32 bits below it (a
/// visible row's xmin precedes the snapshot's xmax, by less than 2^31). `None` for the
/// special xids (a frozen row reads 2).
fn full_xid(xmin: &str, reference: u64) -> Option<u64> {
    let raw: u32 = xmin.parse().ok()?;
    if raw < 3 {
        return None;
    }
    let full = (reference & !0xFFFF_FFFF) | u64::from(raw);
    if full >= reference {
        full.checked_sub(1 << 32)
    } else {
        Some(full)
    }
}

/// Confirms the chunk's candidates (re-reading what needs it), records the findings and
/// repairs them when asked; returns how many findings it recorded.
async fn settle(
    walk: &mut Walk<'_>,
    p: &Plan,
    mut candidates: Vec<Candidate>,
    low: &str,
) -> Result<u64, Stop> {
    if candidates.is_empty() {
        return Ok(0);
    }
    let repair = walk.options.repair;
    let must_read = repair
        || candidates
            .iter()
            .any(|c| c.kind == Finding::MissingAtCentral);
    let mut at = None;
    if must_read {
        let mark = walk.mark("recheck").await?;
        at = Some(mark);
        let rel = &p.table.info;
        let mut filter = p
            .table
            .row_filter
            .as_ref()
            .map(|f| format!("({f}) AND "))
            .unwrap_or_default();
        // Warehouse rows: unchanged since the snapshot (same row version) or racing.
        let keyed: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| c.warehouse.is_some())
            .collect();
        let mut now: std::collections::HashMap<Vec<String>, String> = Default::default();
        if !keyed.is_empty() {
            let pk_cols: Vec<String> =
                p.pk.iter()
                    .map(|&i| quote_ident(&rel.columns[i].name))
                    .collect();
            let tuples: Vec<String> = keyed
                .iter()
                .filter_map(|c| c.warehouse.as_ref())
                .map(|w| {
                    let v: Vec<String> =
                        w.pk.iter()
                            .map(|v| crate::source::conn::quote_literal(v))
                            .collect();
                    format!("({})", v.join(", "))
                })
                .collect();
            let text_cols: Vec<String> = pk_cols.iter().map(|c| format!("{c}::text")).collect();
            let q = format!(
                "SELECT {}, xmin::text FROM {} AS inventorysync_row WHERE {filter}({}) IN ({})",
                text_cols.join(", "),
                p.table.from_item(),
                pk_cols.join(", "),
                tuples.join(", ")
            );
            for m in walk
                .sql
                .simple_query(&q)
                .await
                .map_err(|e| walk.sql_failed(e))?
            {
                if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                    let pk: Vec<String> = (0..p.pk.len())
                        .map(|i| r.get(i).unwrap_or_default().to_string())
                        .collect();
                    now.insert(pk, r.get(p.pk.len()).unwrap_or_default().to_string());
                }
            }
        }
        // Central rows the snapshot lacked: none in the warehouse now (before a delete).
        let mut present: std::collections::HashSet<String> = Default::default();
        let only: Vec<&str> = candidates
            .iter()
            .filter(|c| c.warehouse.is_none())
            .map(|c| c.canonical.as_str())
            .collect();
        if repair && !only.is_empty() {
            filter.push_str(&format!("{} = ANY($1)", p.canonical));
            let q = format!(
                "SELECT {} FROM {} AS inventorysync_row WHERE {filter}",
                p.canonical,
                p.table.from_item()
            );
            let only: Vec<String> = only.iter().map(|s| s.to_string()).collect();
            for r in walk
                .sql
                .query(&q, &[&only])
                .await
                .map_err(|e| walk.sql_failed(e))?
            {
                present.insert(r.get(0));
            }
        }
        let before = candidates.len();
        candidates.retain(|c| match &c.warehouse {
            Some(w) => now.get(&w.pk) == Some(&w.xmin),
            None => !present.contains(&c.canonical),
        });
        walk.report.racing += (before - candidates.len()) as u64;
    }
    let table = p.table.info.table.qualified_name().to_string();
    let entity = p.mapping.entity;
    let mut ids = Vec::with_capacity(candidates.len());
    for c in &candidates {
        walk.report.found(c.kind);
        let reason = match c.kind {
            Finding::MissingAtCentral => {
                format!("central does not hold {table}'s row {}", c.canonical)
            }
            Finding::OnlyAtCentral => format!(
                "central holds {} {} (version {}), which {table} does not have",
                entity.as_str(),
                c.canonical,
                c.central.as_ref().map_or("", |x| x.version.as_str())
            ),
            Finding::Differs => format!(
                "central's {} {} differs in {}",
                entity.as_str(),
                c.canonical,
                c.fields.join(", ")
            ),
            Finding::OlderAtCentral => format!(
                "central's {} {} is at version {}, from before the row's last change at the warehouse{}",
                entity.as_str(),
                c.canonical,
                c.central.as_ref().map_or("", |x| x.version.as_str()),
                if c.fields.is_empty() {
                    String::new()
                } else {
                    format!("; it differs in {}", c.fields.join(", "))
                }
            ),
        };
        let id = walk
            .state
            .record_finding(&NewConflict {
                warehouse_id: walk.w.warehouse_id.clone(),
                table_name: table.clone(),
                entity: Some(entity.as_str().to_string()),
                entity_key: Value::Object(c.key.clone()),
                kind: "drift",
                rule: Some(c.kind.as_str().to_string()),
                reason,
                source_version: low.to_string(),
                central_version: c.central.as_ref().map(|x| x.version.clone()),
                source_value: c
                    .warehouse
                    .as_ref()
                    .and_then(|w| w.data.clone())
                    .map(Value::Object),
                central_value: c
                    .central
                    .as_ref()
                    .and_then(|x| x.data.clone())
                    .map(Value::Object),
                dead_lettered: false,
                hint: c.kind.hint().to_string(),
            })
            .await?;
        ids.push(id);
    }
    let found = candidates.len() as u64;
    if let (true, Some(at)) = (repair, at) {
        repair_all(walk, &table, entity, &candidates, &ids, at).await?;
    }
    Ok(found)
}

/// Sends the confirmed findings' repairs at versions just below mark `at`, and closes each
/// finding central now settles.
async fn repair_all(
    walk: &mut Walk<'_>,
    table: &str,
    entity: Entity,
    candidates: &[Candidate],
    ids: &[Option<i64>],
    at: Lsn,
) -> Result<(), Stop> {
    let base = Lsn(at.0.saturating_sub(1));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    let changes: Vec<Change> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| Change {
            entity,
            op: if c.warehouse.is_some() {
                ChangeOp::Upsert
            } else {
                ChangeOp::Delete
            },
            key: c.key.clone(),
            data: c.warehouse.as_ref().and_then(|w| w.data.clone()),
            version: format!("{:016X}:{:08X}", base.0, i),
            source: ChangeSource {
                table: table.to_string(),
                lsn: base.to_string(),
                committed_at: crate::time::format_unix_micros(now),
                snapshot: true,
            },
        })
        .collect();
    let json: Vec<Vec<u8>> = changes
        .iter()
        .map(|c| serde_json::to_vec(c).unwrap_or_default())
        .collect();
    for (start, part) in (0..changes.len())
        .step_by(REPAIR_BATCH)
        .map(|s| (s, s..(s + REPAIR_BATCH).min(changes.len())))
    {
        let out: Vec<Outgoing<'_>> = part
            .clone()
            .map(|i| Outgoing {
                version: &changes[i].version,
                json: &json[i],
            })
            .collect();
        let verdicts = walk
            .verifier
            .central
            .deliver(&walk.w.warehouse_id, &out, walk.cancel)
            .await
            .map_err(|_| Stop::Cancelled)?;
        for (j, verdict) in verdicts.into_iter().enumerate() {
            let i = start + j;
            let what = if changes[i].op == ChangeOp::Upsert {
                "upserted the warehouse's row"
            } else {
                "deleted central's row"
            };
            let note = match verdict {
                Verdict::Result(r)
                    if matches!(r.status, ResultStatus::Applied | ResultStatus::Duplicate) =>
                {
                    Some(format!(
                        "repaired by verify job {}: {what} at version {}",
                        walk.w.job_id, changes[i].version
                    ))
                }
                Verdict::Result(r) if r.status == ResultStatus::Stale => Some(format!(
                    "a newer change reached central before verify job {}'s repair (central holds {})",
                    walk.w.job_id,
                    r.current_version.unwrap_or_default()
                )),
                Verdict::Result(r) => {
                    tracing::warn!(job = %walk.w.job_id, key = %candidates[i].canonical, reason = ?r.reason, "central refused a repair");
                    None
                }
                Verdict::Invalid { status, message } => {
                    tracing::warn!(job = %walk.w.job_id, key = %candidates[i].canonical, status, %message, "central refused a repair");
                    None
                }
            };
            match note {
                Some(note) => {
                    walk.report.repaired += 1;
                    if let Some(id) = ids[i] {
                        walk.state
                            .close_conflict(id, "resolved", Some(&note), "inventorysync")
                            .await?;
                    }
                }
                None => walk.report.unrepaired += 1,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_fields_are_written_as_the_consumer_writes_them_or_refused() {
        use crate::values::oid as t;
        assert_eq!(
            key_json_sql("\"n\"", t::INT8, Convert::AsIs).as_deref(),
            Some("\"n\"::text")
        );
        assert_eq!(
            key_json_sql("c", t::BPCHAR, Convert::AsIs).as_deref(),
            Some("to_json(c)::text")
        );
        assert_eq!(
            key_json_sql("c", t::TEXT, Convert::AsIs).as_deref(),
            Some("to_json(c::text)::text")
        );
        assert!(key_json_sql("c", t::FLOAT8, Convert::AsIs).is_none());
        assert!(key_json_sql("c", t::TIMESTAMPTZ, Convert::AsIs).is_none());
        assert!(key_json_sql("c", t::BYTEA, Convert::AsIs).is_none());
        assert!(key_json_sql("c", t::BYTEA, Convert::ByteaUtf8).is_some());
    }

    #[test]
    fn a_verdict_never_says_equal_when_something_was_not_checked() {
        let mut r = Report::default();
        assert_eq!(r.conclude(false), "equal");
        r.unchecked.push(Unchecked {
            table: "public.t".into(),
            entity: "product".into(),
            reason: "404".into(),
        });
        assert_eq!(r.conclude(false), "incomplete");
        let mut r = Report::default();
        r.findings.insert("differs".into(), 2);
        assert_eq!(r.conclude(false), "drift");
        assert_eq!(r.conclude(true), "repaired");
        r.unrepaired = 1;
        assert_eq!(r.conclude(true), "drift");
    }

    #[test]
    fn frozen_rows_have_no_xid_to_date_them_and_others_take_the_snapshot_s_epoch() {
        assert_eq!(full_xid("2", 1000), None);
        assert_eq!(full_xid("745", 1000), Some(745));
        assert_eq!(full_xid("x", 1000), None);
        let epoch3 = 3u64 << 32;
        assert_eq!(full_xid("100", epoch3 + 200), Some(epoch3 + 100));
        // Just before the epoch turned.
        assert_eq!(full_xid("4294967000", epoch3 + 5), Some(epoch3 - 296));
    }
}
