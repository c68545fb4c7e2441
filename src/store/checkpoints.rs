//! `replication_checkpoints`: per warehouse, the position everything before which is durable.

use super::{StateDb, StoreError};
use crate::Lsn;

/// A stored checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Slot the position belongs to.
    pub slot_name: String,
    /// Highest commit end LSN fully delivered.
    pub flush_lsn: Lsn,
    /// The cluster and timeline the position belongs to (none before it was first recorded).
    pub origin: Option<Origin>,
}

/// Which WAL history a position belongs to: the warehouse cluster's system identifier and
/// its timeline (`IDENTIFY_SYSTEM`). Positions compare only within one history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// `pg_control_system().system_identifier`, as text.
    pub system_id: String,
    /// The server's current timeline.
    pub timeline: u32,
}

impl StateDb {
    /// The checkpoint of `warehouse_id`, if any.
    pub async fn checkpoint(&self, warehouse_id: &str) -> Result<Option<Checkpoint>, StoreError> {
        let row: Option<(String, String, Option<String>, Option<i32>)> = sqlx::query_as(
            "SELECT slot_name, flush_lsn::text, system_id, timeline FROM replication_checkpoints WHERE warehouse_id = $1",
        )
        .bind(warehouse_id)
        .fetch_optional(self.pool())
        .await?;
        row.map(|(slot_name, lsn, system_id, timeline)| {
            let flush_lsn = lsn.parse().map_err(|_| StoreError::Corrupt {
                what: "flush_lsn",
                value: lsn.clone(),
            })?;
            let origin = match (system_id, timeline) {
                (Some(system_id), Some(t)) => Some(Origin {
                    system_id,
                    timeline: u32::try_from(t).map_err(|_| StoreError::Corrupt {
                        what: "timeline",
                        value: t.to_string(),
                    })?,
                }),
                _ => None,
            };
            Ok(Checkpoint {
                slot_name,
                flush_lsn,
                origin,
            })
        })
        .transpose()
    }

    /// Records which WAL history `warehouse_id`'s positions belong to (before the first
    /// checkpoint, a row at position 0/0 holds it).
    pub async fn record_origin(
        &self,
        warehouse_id: &str,
        slot_name: &str,
        origin: &Origin,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO replication_checkpoints (warehouse_id, slot_name, flush_lsn, system_id, timeline) \
             VALUES ($1, $2, '0/0', $3, $4) \
             ON CONFLICT (warehouse_id) DO UPDATE \
               SET system_id = EXCLUDED.system_id, timeline = EXCLUDED.timeline, updated_at = now()",
        )
        .bind(warehouse_id)
        .bind(slot_name)
        .bind(&origin.system_id)
        .bind(i32::try_from(origin.timeline).unwrap_or(i32::MAX))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Records that `warehouse_id` is durable up to `flush_lsn`. Older positions are ignored,
    /// so a late or replayed write can never move a checkpoint back.
    pub async fn advance_checkpoint(
        &self,
        warehouse_id: &str,
        slot_name: &str,
        flush_lsn: Lsn,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO replication_checkpoints AS c (warehouse_id, slot_name, flush_lsn) \
             VALUES ($1, $2, $3::text::pg_lsn) \
             ON CONFLICT (warehouse_id) DO UPDATE \
               SET flush_lsn = EXCLUDED.flush_lsn, slot_name = EXCLUDED.slot_name, updated_at = now() \
               WHERE c.flush_lsn < EXCLUDED.flush_lsn",
        )
        .bind(warehouse_id)
        .bind(slot_name)
        .bind(flush_lsn.to_string())
        .execute(self.pool())
        .await?;
        Ok(())
    }
}
