//! The relation cache: what pgoutput told us about each table, plus its event key.
//!
//! pgoutput sends a Relation message before the first change of a table in a session and
//! again after DDL, so rows are always decoded by the shape they were written with. The
//! event key (DESIGN §2) prefers the primary key, which pgoutput does not send when the
//! replica identity is FULL or an index; the caller looks it up once per Relation message.

use std::collections::HashMap;
use std::sync::Arc;

use super::pgoutput::{Relation, ReplicaIdentity};
use crate::event::{ColumnNames, TableSource};

/// Identifies the source database in every event.
#[derive(Debug, Clone)]
pub struct SourceIdentity {
    /// Warehouse id.
    pub warehouse_id: Arc<str>,
    /// Database name.
    pub db: Arc<str>,
}

/// One published column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    /// Column name, shared by every event.
    pub name: Arc<str>,
    /// Type OID.
    pub type_oid: u32,
    /// Part of the replica identity.
    pub is_identity: bool,
}

/// What we know of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationInfo {
    /// Relation OID.
    pub oid: u32,
    /// Warehouse, database, schema and table, shared with every event.
    pub table: Arc<TableSource>,
    /// Replica identity.
    pub identity: ReplicaIdentity,
    /// Published columns in order.
    pub columns: Vec<ColumnInfo>,
    /// The column names, shared with every row.
    pub names: ColumnNames,
    /// Indexes of the event-key columns; every column when the table has no key.
    pub key_columns: Vec<usize>,
}

impl RelationInfo {
    /// Builds the info from a Relation message and the table's primary key column names
    /// (empty when it has none), for events of `source`.
    pub fn new(rel: &Relation, primary_key: &[String], source: &SourceIdentity) -> Self {
        let columns: Vec<ColumnInfo> = rel
            .columns
            .iter()
            .map(|c| ColumnInfo {
                name: Arc::from(c.name.as_str()),
                type_oid: c.type_oid,
                is_identity: c.is_key,
            })
            .collect();
        let by_name = |n: &String| columns.iter().position(|c| &*c.name == n.as_str());
        let pk: Option<Vec<usize>> = if primary_key.is_empty() {
            None
        } else {
            primary_key.iter().map(by_name).collect()
        };
        let identity_cols: Vec<usize> = columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_identity)
            .map(|(i, _)| i)
            .collect();
        let key_columns = match pk {
            Some(pk) => pk,
            // FULL marks every column; that is the whole-row key.
            None if !identity_cols.is_empty() => identity_cols,
            None => (0..columns.len()).collect(),
        };
        Self {
            oid: rel.oid,
            table: TableSource::with_oid(
                &source.warehouse_id,
                &source.db,
                &rel.namespace,
                &rel.name,
                rel.oid,
            ),
            names: columns.iter().map(|c| c.name.clone()).collect(),
            identity: rel.replica_identity,
            columns,
            key_columns,
        }
    }
}

/// Relations by OID.
#[derive(Debug, Default)]
pub struct RelationCache {
    by_oid: HashMap<u32, Arc<RelationInfo>>,
}

impl RelationCache {
    /// Records (or replaces) a relation.
    pub fn insert(&mut self, info: RelationInfo) {
        self.by_oid.insert(info.oid, Arc::new(info));
    }

    /// The relation with this OID.
    pub fn get(&self, oid: u32) -> Option<&Arc<RelationInfo>> {
        self.by_oid.get(&oid)
    }
}
