//! What verify jobs keep in the state DB: their options and per-warehouse report, the
//! findings they record (`sync_conflicts` rows of kind `drift`), and the warehouses' xid
//! positions that tell how old a row's last change is.

use serde_json::Value;

use super::{NewConflict, StateDb, StoreError};
use crate::Lsn;

/// The `sync_jobs.kind` of a verify job.
pub const VERIFY_JOB: &str = "verify";

impl StateDb {
    /// Creates a queued verify job of `warehouses` with its `options` (JSON).
    pub async fn create_verify_job(
        &self,
        id: &str,
        warehouses: &[String],
        options: &Value,
        timeout: std::time::Duration,
    ) -> Result<(), StoreError> {
        self.create_job(id, VERIFY_JOB, warehouses, timeout).await?;
        self.set_job_options(id, options).await
    }

    /// Sets job `id`'s options.
    pub async fn set_job_options(&self, id: &str, options: &Value) -> Result<(), StoreError> {
        sqlx::query("UPDATE sync_jobs SET options = $2 WHERE id = $1")
            .bind(id)
            .bind(options)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Seconds since the newest verify job of `warehouse_id` was queued, if there is one.
    pub async fn last_verify_age(&self, warehouse_id: &str) -> Result<Option<f64>, StoreError> {
        let row: (Option<f64>,) = sqlx::query_as(
            "SELECT extract(epoch FROM now() - max(j.created_at))::float8
               FROM sync_jobs j JOIN sync_job_warehouses w ON w.job_id = j.id
              WHERE j.kind = 'verify' AND w.warehouse_id = $1",
        )
        .bind(warehouse_id)
        .fetch_one(self.pool())
        .await?;
        Ok(row.0)
    }

    /// Job `id`'s options, if it has any.
    pub async fn job_options(&self, id: &str) -> Result<Option<Value>, StoreError> {
        let row: Option<(Option<Value>,)> =
            sqlx::query_as("SELECT options FROM sync_jobs WHERE id = $1")
                .bind(id)
                .fetch_optional(self.pool())
                .await?;
        Ok(row.and_then(|r| r.0))
    }

    /// A verify job's report for one warehouse, as last saved.
    pub async fn verify_report(
        &self,
        job_id: &str,
        warehouse_id: &str,
    ) -> Result<Option<Value>, StoreError> {
        let row: Option<(Option<Value>,)> = sqlx::query_as(
            "SELECT verify FROM sync_job_warehouses WHERE job_id = $1 AND warehouse_id = $2",
        )
        .bind(job_id)
        .bind(warehouse_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.and_then(|r| r.0))
    }

    /// Saves a verify job's report for one warehouse.
    pub async fn save_verify_report(
        &self,
        job_id: &str,
        warehouse_id: &str,
        report: &Value,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE sync_job_warehouses SET verify = $3 WHERE job_id = $1 AND warehouse_id = $2",
        )
        .bind(job_id)
        .bind(warehouse_id)
        .bind(report)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Saves one chunk of a verify (its table's position, and the report with what the
    /// chunk found) in one transaction: a verify resumed after a crash neither counts a chunk
    /// twice nor loses one.
    #[allow(clippy::too_many_arguments)]
    pub async fn save_verify_chunk(
        &self,
        job_id: &str,
        warehouse_id: &str,
        table: &str,
        last_key: Option<&str>,
        read: u64,
        found: u64,
        done: bool,
        report: &Value,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query(super::jobs::SAVE_CHUNK)
            .bind(job_id)
            .bind(warehouse_id)
            .bind(table)
            .bind(last_key.map(|k| serde_json::json!([k])))
            .bind(read as i64)
            .bind(found as i64)
            .bind(done)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE sync_job_warehouses SET verify = $3 WHERE job_id = $1 AND warehouse_id = $2",
        )
        .bind(job_id)
        .bind(warehouse_id)
        .bind(report)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records a finding (a conflict of kind `drift`) unless an open one already says the
    /// same of the same entity; returns the open finding's id either way.
    pub async fn record_finding(&self, c: &NewConflict) -> Result<Option<i64>, StoreError> {
        self.record_conflict(c).await?;
        let row: Option<(i64,)> = sqlx::query_as(
            "SELECT id FROM sync_conflicts
              WHERE warehouse_id = $1 AND table_name = $2 AND entity_key = $3
                AND kind = $4 AND rule IS NOT DISTINCT FROM $5 AND status = 'open'
              ORDER BY id DESC LIMIT 1",
        )
        .bind(&c.warehouse_id)
        .bind(&c.table_name)
        .bind(&c.entity_key)
        .bind(c.kind)
        .bind(&c.rule)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|r| r.0))
    }

    /// Records that on `warehouse_id`, a transaction with an xid at or above `next_xid`
    /// commits after `lsn` (kept: the newest 10,000 per warehouse).
    pub async fn record_xid_position(
        &self,
        warehouse_id: &str,
        next_xid: u64,
        lsn: Lsn,
    ) -> Result<(), StoreError> {
        let Ok(next_xid) = i64::try_from(next_xid) else {
            return Ok(());
        };
        sqlx::query(
            "INSERT INTO warehouse_xid_positions (warehouse_id, next_xid, lsn)
             VALUES ($1, $2, $3::text::pg_lsn) ON CONFLICT DO NOTHING",
        )
        .bind(warehouse_id)
        .bind(next_xid)
        .bind(lsn.to_string())
        .execute(self.pool())
        .await?;
        sqlx::query(
            "DELETE FROM warehouse_xid_positions WHERE warehouse_id = $1 AND next_xid <
                (SELECT min(next_xid) FROM (SELECT next_xid FROM warehouse_xid_positions
                  WHERE warehouse_id = $1 ORDER BY next_xid DESC LIMIT 10000) newest)",
        )
        .bind(warehouse_id)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Forgets `warehouse_id`'s xid positions (its history was replaced by a restore).
    pub async fn forget_xid_positions(&self, warehouse_id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM warehouse_xid_positions WHERE warehouse_id = $1")
            .bind(warehouse_id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// `warehouse_id`'s xid positions, by xid.
    pub async fn xid_positions(&self, warehouse_id: &str) -> Result<Vec<(u64, Lsn)>, StoreError> {
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT next_xid, lsn::text FROM warehouse_xid_positions
              WHERE warehouse_id = $1 ORDER BY next_xid",
        )
        .bind(warehouse_id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(x, l)| Some((u64::try_from(x).ok()?, l.parse().ok()?)))
            .collect())
    }
}
