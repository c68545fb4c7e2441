//! Mapping bindings (`mapping_bindings`): which relation (OID) at a warehouse each configured
//! mapping is bound to, so that a mapping follows its table across a rename or a move to
//! another schema, also across restarts (issue 39; see [`crate::consumer::bindings`]).

use super::{StateDb, StoreError};

/// One relation bound to a mapping.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Binding {
    /// The relation's OID at the warehouse.
    pub relation_oid: i64,
    /// The mapping's table as the configuration names it (`schema.table`).
    pub mapped_table: String,
    /// The relation's name when it was last seen (`schema.table`).
    pub current_name: String,
    /// The mapping's fingerprint when it was last bound.
    pub fingerprint: Option<String>,
}

impl StateDb {
    /// The relations bound to mappings at `warehouse_id`.
    pub async fn bindings(&self, warehouse_id: &str) -> Result<Vec<Binding>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT relation_oid, mapped_table, current_name, fingerprint FROM mapping_bindings
              WHERE warehouse_id = $1 ORDER BY relation_oid",
        )
        .bind(warehouse_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// Binds relation `oid` at `warehouse_id` to the mapping of `mapped_table` (whose
    /// fingerprint is `fingerprint`), now named `current_name` (a relation is bound to one
    /// mapping: the latest binding wins).
    pub async fn bind(
        &self,
        warehouse_id: &str,
        oid: u32,
        mapped_table: &str,
        current_name: &str,
        fingerprint: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO mapping_bindings
                    (warehouse_id, relation_oid, mapped_table, current_name, fingerprint)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (warehouse_id, relation_oid) DO UPDATE
                SET mapped_table = EXCLUDED.mapped_table, current_name = EXCLUDED.current_name,
                    fingerprint = EXCLUDED.fingerprint,
                    bound_at = CASE WHEN mapping_bindings.mapped_table = EXCLUDED.mapped_table
                                    THEN mapping_bindings.bound_at ELSE now() END,
                    seen_at = now()",
        )
        .bind(warehouse_id)
        .bind(i64::from(oid))
        .bind(mapped_table)
        .bind(current_name)
        .bind(fingerprint)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Forgets `warehouse_id`'s lane positions (`consumer_lanes`) because the mappings of
    /// `changed` (mapped table, fingerprint now) changed: keys may sit in other lanes now,
    /// and a position would skip changes it never covered (what central has is sent again
    /// once, and answered as a duplicate). Their bindings take the new fingerprints, in the
    /// same transaction. The count of positions forgotten.
    pub async fn reset_lanes(
        &self,
        warehouse_id: &str,
        changed: &[(&str, String)],
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool().begin().await?;
        let n = sqlx::query("DELETE FROM consumer_lanes WHERE warehouse_id = $1")
            .bind(warehouse_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        for (table, print) in changed {
            sqlx::query(
                "UPDATE mapping_bindings SET fingerprint = $3
                  WHERE warehouse_id = $1 AND mapped_table = $2",
            )
            .bind(warehouse_id)
            .bind(table)
            .bind(print)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(n)
    }
}
