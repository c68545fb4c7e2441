//! Warehouse ownership between several `run` processes sharing one state DB.
//!
//! Each warehouse is streamed by one process at a time: the owner holds a session-level
//! advisory lock on a dedicated state-DB connection. When the owner dies its connection
//! closes and Postgres releases the lock at once, so a standby polling every few seconds
//! takes over, resuming from the checkpoint. No lease table, no clocks to trust.

use sqlx::{Connection, PgConnection};

use super::{StateDb, StoreError, connect_options};

/// Ownership of one warehouse, held as long as this value and its connection live.
pub struct WarehouseLease {
    conn: PgConnection,
    warehouse_id: String,
}

impl std::fmt::Debug for WarehouseLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarehouseLease")
            .field("warehouse_id", &self.warehouse_id)
            .finish()
    }
}

// The advisory lock key of a warehouse is derived in SQL, so every process agrees on it:
// hashtextextended('inventorysync:warehouse:' || id, 0).

impl WarehouseLease {
    /// Becomes the owner of `warehouse_id`, or returns `None` when another process is.
    pub async fn try_acquire(db: &StateDb, warehouse_id: &str) -> Result<Option<Self>, StoreError> {
        let mut conn = PgConnection::connect_with(&connect_options(db.conn_info()))
            .await
            .map_err(|source| StoreError::Connect {
                target: db.conn_info().redacted(),
                source,
            })?;
        let (got,): (bool,) = sqlx::query_as(
            "SELECT pg_try_advisory_lock(hashtextextended('inventorysync:warehouse:' || $1, 0))",
        )
        .bind(warehouse_id)
        .fetch_one(&mut conn)
        .await?;
        if !got {
            let _ = conn.close().await;
            return Ok(None);
        }
        Ok(Some(Self {
            conn,
            warehouse_id: warehouse_id.to_string(),
        }))
    }

    /// The warehouse owned.
    pub fn warehouse_id(&self) -> &str {
        &self.warehouse_id
    }

    /// Checks that the lease still holds: the connection that owns the lock is alive.
    pub async fn check(&mut self) -> Result<(), StoreError> {
        self.conn.ping().await?;
        Ok(())
    }

    /// Gives the warehouse up.
    pub async fn release(mut self) -> Result<(), StoreError> {
        sqlx::query(
            "SELECT pg_advisory_unlock(hashtextextended('inventorysync:warehouse:' || $1, 0))",
        )
        .bind(&self.warehouse_id)
        .execute(&mut self.conn)
        .await?;
        let _ = self.conn.close().await;
        Ok(())
    }
}
