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
}

impl StateDb {
    /// The checkpoint of `warehouse_id`, if any.
    pub async fn checkpoint(&self, warehouse_id: &str) -> Result<Option<Checkpoint>, StoreError> {
        let row: Option<(String, String)> = sqlx::query_as(
            "SELECT slot_name, flush_lsn::text FROM replication_checkpoints WHERE warehouse_id = $1",
        )
        .bind(warehouse_id)
        .fetch_optional(self.pool())
        .await?;
        row.map(|(slot_name, lsn)| {
            let flush_lsn = lsn.parse().map_err(|_| StoreError::Corrupt {
                what: "flush_lsn",
                value: lsn.clone(),
            })?;
            Ok(Checkpoint {
                slot_name,
                flush_lsn,
            })
        })
        .transpose()
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
