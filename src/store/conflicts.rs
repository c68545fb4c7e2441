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
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
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
    pub source_value: Option<Value>,
    /// Central's value.
    pub central_value: Option<Value>,
    /// Whether the change was dead-lettered.
    pub dead_lettered: bool,
    /// What an operator can do.
    pub hint: String,
    /// `open` or `resolved`.
    pub status: String,
    /// When it was recorded (RFC 3339, UTC).
    pub created_at: String,
    /// When it was resolved.
    pub resolved_at: Option<String>,
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
        Ok(sqlx::query_as(
            r#"SELECT id, warehouse_id, table_name, entity, entity_key, kind, rule, reason,
                      source_version, central_version, source_value, central_value, dead_lettered,
                      hint, status,
                      to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS created_at,
                      to_char(resolved_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS resolved_at
                 FROM sync_conflicts
                WHERE ($1::text IS NULL OR warehouse_id = $1)
                  AND ($2::text IS NULL OR status = $2)
                  AND ($3::text IS NULL OR kind = $3)
                  AND ($4::bigint IS NULL OR id < $4)
                ORDER BY id DESC
                LIMIT $5"#,
        )
        .bind(&q.warehouse)
        .bind(&q.status)
        .bind(&q.kind)
        .bind(q.before_id)
        .bind(q.limit)
        .fetch_all(self.pool())
        .await?)
    }
}
