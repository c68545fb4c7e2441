//! `sync_conflicts` and `sync_dead_letters`: what the consumer stage could not simply apply.

use serde_json::Value;

use super::{StateDb, StoreError};

/// One conflict row to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewConflict {
    /// Warehouse id.
    pub warehouse_id: String,
    /// `schema.table`.
    pub table_name: String,
    /// Central entity, when the table is mapped.
    pub entity: Option<String>,
    /// Key fields (the central key, or the row's key columns).
    pub entity_key: Value,
    /// `stale_version`, `rejected`, `invalid` or `truncate`.
    pub kind: &'static str,
    /// The rule that failed (for `invalid` and central refusals).
    pub rule: Option<String>,
    /// What happened, in words.
    pub reason: String,
    /// The change's version.
    pub source_version: String,
    /// The version central holds, when known.
    pub central_version: Option<String>,
    /// The warehouse's value.
    pub source_value: Option<Value>,
    /// Central's value, when known.
    pub central_value: Option<Value>,
    /// Whether the change went to the dead-letter queue.
    pub dead_lettered: bool,
    /// What an operator can do.
    pub hint: String,
}

/// One dead letter for the state DB (the embedded bus's dead-letter queue).
#[derive(Debug, Clone, PartialEq)]
pub struct NewDeadLetter {
    /// Warehouse id.
    pub warehouse_id: String,
    /// `schema.table`.
    pub table_name: String,
    /// The change's version.
    pub source_version: String,
    /// The rule that failed.
    pub rule: String,
    /// Why.
    pub reason: String,
    /// The original event, byte for byte.
    pub raw_event: Vec<u8>,
}

/// Which conflicts to list (`GET /sync/conflicts`), newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConflictQuery {
    /// Only this warehouse's.
    pub warehouse: Option<String>,
    /// Only with this status (`open`, `resolved`).
    pub status: Option<String>,
    /// Only of this kind (`stale_version`, `rejected`, `invalid`, `truncate`).
    pub kind: Option<String>,
    /// Only with an id below this one (the previous page's `next`).
    pub before_id: Option<i64>,
    /// At most this many.
    pub limit: i64,
}

/// One `sync_conflicts` row as the API shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConflictRow {
    /// Row id.
    pub id: i64,
    /// Warehouse id.
    pub warehouse_id: String,
    /// `schema.table`.
    pub table_name: String,
    /// Central entity.
    pub entity: Option<String>,
    /// Key fields.
    #[schema(value_type = Object)]
    pub entity_key: Value,
    /// `stale_version`, `rejected`, `invalid` or `truncate`.
    pub kind: String,
    /// The rule that failed.
    pub rule: Option<String>,
    /// What happened.
    pub reason: String,
    /// The change's version.
    pub source_version: String,
    /// The version central holds.
    pub central_version: Option<String>,
    /// The warehouse's value.
    #[schema(value_type = Option<Object>)]
    pub source_value: Option<Value>,
    /// Central's value.
    #[schema(value_type = Option<Object>)]
    pub central_value: Option<Value>,
    /// Whether the change was dead-lettered.
    pub dead_lettered: bool,
    /// What an operator can do.
    pub hint: String,
    /// `open`, `resolved` or `ignored`.
    pub status: String,
    /// When it was recorded (RFC 3339, UTC).
    pub created_at: String,
    /// When it was resolved or ignored.
    pub resolved_at: Option<String>,
    /// Who closed it: the API key's fingerprint (`key sha256:…`), or `inventorysync` when
    /// central came to hold the warehouse's value.
    pub resolved_by: Option<String>,
    /// Why, in the closer's words.
    pub resolution_note: Option<String>,
}

/// The columns of a [`ConflictRow`] (a macro: queries are `concat!`ed at compile time).
macro_rules! conflict_columns {
    () => {
        r#"id, warehouse_id, table_name, entity, entity_key, kind, rule, reason,
    source_version, central_version, source_value, central_value, dead_lettered, hint, status,
    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS created_at,
    to_char(resolved_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS resolved_at,
    resolved_by, resolution_note"#
    };
}

/// What closing a conflict did.
#[derive(Debug, Clone, PartialEq)]
pub enum Closing {
    /// It is now (or already was) in the status asked for.
    Closed(ConflictRow),
    /// Someone closed it otherwise before.
    ClosedOtherwise(ConflictRow),
    /// No conflict has this id.
    Unknown,
}

/// Which dead letters to list (`GET /sync/dead-letters`), newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterQuery {
    /// Only this warehouse's.
    pub warehouse: Option<String>,
    /// Only of this `schema.table`.
    pub table: Option<String>,
    /// Only those that broke this rule.
    pub rule: Option<String>,
    /// Only those replayed at least once (`true`) or never (`false`).
    pub replayed: Option<bool>,
    /// Only with an id below this one (the previous page's `next`).
    pub before_id: Option<i64>,
    /// At most this many.
    pub limit: i64,
}

/// One `sync_dead_letters` row as the API shows it (the original bytes apart).
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterRow {
    /// Row id.
    pub id: i64,
    /// Warehouse id (empty for a record that was no change event of ours).
    pub warehouse_id: String,
    /// `schema.table`.
    pub table_name: String,
    /// The change's version.
    pub source_version: String,
    /// The rule it broke.
    pub rule: String,
    /// Why.
    pub reason: String,
    /// The change event, when it is JSON.
    #[schema(value_type = Option<Object>)]
    pub event: Option<Value>,
    /// When it was dead-lettered (RFC 3339, UTC).
    pub created_at: String,
    /// How often it was replayed.
    pub replays: i32,
    /// When it was replayed last.
    pub replayed_at: Option<String>,
    /// Who replayed it last (the API key's fingerprint).
    pub replayed_by: Option<String>,
    /// The last replay's outcome: `applied`, `duplicate`, `stale`, `rejected`, `refused`
    /// or `invalid`.
    pub replay_outcome: Option<String>,
    /// The last replay's outcome in words.
    pub replay_detail: Option<String>,
}

/// The columns of a [`DeadLetterRow`].
macro_rules! dead_letter_columns {
    () => {
        r#"id, warehouse_id, table_name, source_version, rule, reason, event,
    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS created_at,
    replays,
    to_char(replayed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS replayed_at,
    replayed_by, replay_outcome, replay_detail"#
    };
}

impl StateDb {
    /// Records `c` once: a replayed change finds its row already there, and a change that
    /// repeats an open conflict (same entity, kind, rule and warehouse value — a resync
    /// reading a row that is still invalid) adds nothing an operator does not already see.
    pub async fn record_conflict(&self, c: &NewConflict) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sync_conflicts (warehouse_id, table_name, entity, entity_key, kind, rule, reason,
                 source_version, central_version, source_value, central_value, dead_lettered, hint)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13
              WHERE NOT EXISTS (
                    SELECT 1 FROM sync_conflicts
                     WHERE warehouse_id = $1 AND table_name = $2 AND entity_key = $4
                       AND kind = $5 AND rule IS NOT DISTINCT FROM $6
                       AND source_value IS NOT DISTINCT FROM $10 AND status = 'open')
             ON CONFLICT (warehouse_id, table_name, source_version, kind, entity_key) DO NOTHING",
        )
        .bind(&c.warehouse_id)
        .bind(&c.table_name)
        .bind(&c.entity)
        .bind(&c.entity_key)
        .bind(c.kind)
        .bind(&c.rule)
        .bind(&c.reason)
        .bind(&c.source_version)
        .bind(&c.central_version)
        .bind(&c.source_value)
        .bind(&c.central_value)
        .bind(c.dead_lettered)
        .bind(&c.hint)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Stores a dead letter once.
    pub async fn record_dead_letter(&self, d: &NewDeadLetter) -> Result<(), StoreError> {
        let event: Option<Value> = serde_json::from_slice(&d.raw_event).ok();
        sqlx::query(
            "INSERT INTO sync_dead_letters (warehouse_id, table_name, source_version, rule, reason, event, raw_event)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (warehouse_id, table_name, source_version, rule) DO NOTHING",
        )
        .bind(&d.warehouse_id)
        .bind(&d.table_name)
        .bind(&d.source_version)
        .bind(&d.rule)
        .bind(&d.reason)
        .bind(&event)
        .bind(&d.raw_event)
        .execute(self.pool())
        .await?;
        Ok(())
    }
}

impl StateDb {
    /// Conflicts matching `q`, newest first.
    pub async fn list_conflicts(&self, q: &ConflictQuery) -> Result<Vec<ConflictRow>, StoreError> {
        Ok(sqlx::query_as(concat!(
            "SELECT ",
            conflict_columns!(),
            " FROM sync_conflicts
              WHERE ($1::text IS NULL OR warehouse_id = $1)
                AND ($2::text IS NULL OR status = $2)
                AND ($3::text IS NULL OR kind = $3)
                AND ($4::bigint IS NULL OR id < $4)
              ORDER BY id DESC
              LIMIT $5"
        ))
        .bind(&q.warehouse)
        .bind(&q.status)
        .bind(&q.kind)
        .bind(q.before_id)
        .bind(q.limit)
        .fetch_all(self.pool())
        .await?)
    }
}

impl StateDb {
    /// Closes open conflict `id` as `status` (`resolved` or `ignored`), recording who did it
    /// and why. Closing it again the same way changes nothing (a retried request).
    pub async fn close_conflict(
        &self,
        id: i64,
        status: &str,
        note: Option<&str>,
        by: &str,
    ) -> Result<Closing, StoreError> {
        let closed: Option<ConflictRow> = sqlx::query_as(concat!(
            "UPDATE sync_conflicts SET status = $2, resolved_at = now(), resolved_by = $4,
                    resolution_note = $3
              WHERE id = $1 AND status = 'open'
             RETURNING ",
            conflict_columns!()
        ))
        .bind(id)
        .bind(status)
        .bind(note)
        .bind(by)
        .fetch_optional(self.pool())
        .await?;
        if let Some(row) = closed {
            return Ok(Closing::Closed(row));
        }
        let row: Option<ConflictRow> = sqlx::query_as(concat!(
            "SELECT ",
            conflict_columns!(),
            " FROM sync_conflicts WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        Ok(match row {
            None => Closing::Unknown,
            Some(r) if r.status == status => Closing::Closed(r),
            Some(r) => Closing::ClosedOtherwise(r),
        })
    }

    /// Dead letters matching `q`, newest first.
    pub async fn list_dead_letters(
        &self,
        q: &DeadLetterQuery,
    ) -> Result<Vec<DeadLetterRow>, StoreError> {
        Ok(sqlx::query_as(concat!(
            "SELECT ",
            dead_letter_columns!(),
            " FROM sync_dead_letters
              WHERE ($1::text IS NULL OR warehouse_id = $1)
                AND ($2::text IS NULL OR table_name = $2)
                AND ($3::text IS NULL OR rule = $3)
                AND ($4::boolean IS NULL OR (replays > 0) = $4)
                AND ($5::bigint IS NULL OR id < $5)
              ORDER BY id DESC
              LIMIT $6"
        ))
        .bind(&q.warehouse)
        .bind(&q.table)
        .bind(&q.rule)
        .bind(q.replayed)
        .bind(q.before_id)
        .bind(q.limit)
        .fetch_all(self.pool())
        .await?)
    }

    /// Dead letter `id` with the original event's bytes.
    pub async fn dead_letter(
        &self,
        id: i64,
    ) -> Result<Option<(DeadLetterRow, Vec<u8>)>, StoreError> {
        #[derive(sqlx::FromRow)]
        struct WithRaw {
            #[sqlx(flatten)]
            row: DeadLetterRow,
            raw_event: Vec<u8>,
        }
        let found: Option<WithRaw> = sqlx::query_as(concat!(
            "SELECT ",
            dead_letter_columns!(),
            ", raw_event FROM sync_dead_letters WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        Ok(found.map(|f| (f.row, f.raw_event)))
    }

    /// Resolves the open conflicts recorded with dead letter `d` (same warehouse, table and
    /// version): replayed by `by`, central now has the change. How many there were.
    pub async fn resolve_replayed(&self, d: &DeadLetterRow, by: &str) -> Result<u64, StoreError> {
        let r = sqlx::query(
            "UPDATE sync_conflicts SET status = 'resolved', resolved_at = now(), resolved_by = $4,
                    resolution_note = 'its dead letter was replayed and central has it now'
              WHERE warehouse_id = $1 AND table_name = $2 AND source_version = $3
                AND status = 'open' AND dead_lettered",
        )
        .bind(&d.warehouse_id)
        .bind(&d.table_name)
        .bind(&d.source_version)
        .bind(by)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected())
    }

    /// Records a replay of dead letter `id` by `by` and its outcome; the row as it is now.
    pub async fn record_replay(
        &self,
        id: i64,
        by: &str,
        outcome: &str,
        detail: &str,
    ) -> Result<Option<DeadLetterRow>, StoreError> {
        Ok(sqlx::query_as(concat!("UPDATE sync_dead_letters SET replays = replays + 1, replayed_at = now(), replayed_by = $2,
                    replay_outcome = $3, replay_detail = $4
              WHERE id = $1
             RETURNING ", dead_letter_columns!()))
        .bind(id)
        .bind(by)
        .bind(outcome)
        .bind(detail)
        .fetch_optional(self.pool())
        .await?)
    }
}
