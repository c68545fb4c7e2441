//! The consistent initial load: every published table read in the slot's exported snapshot.
//!
//! The slot is created with `EXPORT_SNAPSHOT`; that snapshot sees exactly the transactions
//! committed before the slot's consistent point, and streaming from the consistent point
//! delivers exactly those after it. Reading the tables in that snapshot (a REPEATABLE READ
//! transaction with `SET TRANSACTION SNAPSHOT`) therefore neither misses nor doubles a row,
//! and takes no lock stronger than ACCESS SHARE. Rows are fetched through a cursor in
//! chunks so memory stays flat whatever the table size.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::SourceError;
use super::assemble::{SourceIdentity, StreamItem, key_of, now_ms};
use super::conn::quote_literal;
use super::pgoutput::{Relation, RelationColumn, ReplicaIdentity};
use super::relation::RelationInfo;
use crate::Lsn;
use crate::event::{ChangeEvent, Op, Row, SnapshotMarker, SourceInfo, Value};
use crate::pg::quote_ident;
use crate::values::convert_text;

/// Rows fetched per round trip.
const FETCH_ROWS: usize = 5_000;

/// A published table as the catalog describes it.
#[derive(Debug, Clone)]
pub struct PublishedTable {
    /// What events need.
    pub info: Arc<RelationInfo>,
    /// Row filter of the publication (Postgres 15+), if any.
    pub row_filter: Option<String>,
    /// A partitioned table published through its root (`publish_via_partition_root`): its
    /// rows are in its partitions, and they carry the root's name.
    pub partitioned: bool,
}

impl PublishedTable {
    /// The table as a `FROM` item that reads exactly the rows published under its name: a
    /// plain table `ONLY` (the children of table inheritance are published as themselves),
    /// a partitioned root with its partitions.
    pub fn from_item(&self) -> String {
        let t = &self.info.table;
        format!(
            "{}{}.{}",
            if self.partitioned { "" } else { "ONLY " },
            quote_ident(t.schema()),
            quote_ident(t.table())
        )
    }
}

/// Lists the publication's tables with their published columns and primary keys.
pub async fn published_tables(
    sql: &tokio_postgres::Client,
    publication: &str,
    source: &SourceIdentity,
) -> Result<Vec<PublishedTable>, SourceError> {
    let rows = sql
        .query(
            // Column lists and row filters are PostgreSQL 15+ (`attnames`, `rowfilter`):
            // read through jsonb, they are null before, where every column is published.
            "SELECT c.oid, pt.schemaname::text, pt.tablename::text, \
                    CASE WHEN to_jsonb(pt) ? 'attnames' THEN ARRAY(SELECT jsonb_array_elements_text(to_jsonb(pt) -> 'attnames')) END, \
                    to_jsonb(pt) ->> 'rowfilter', c.relreplident::text, \
                    c.relkind = 'p' \
             FROM pg_publication_tables pt \
             JOIN pg_namespace n ON n.nspname = pt.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename \
             WHERE pt.pubname = $1 ORDER BY 2, 3",
            &[&publication],
        )
        .await?;
    let mut out = Vec::new();
    for row in rows {
        let oid: u32 = row.get(0);
        let schema: String = row.get(1);
        let table: String = row.get(2);
        let attnames: Option<Vec<String>> = row.get(3);
        let row_filter: Option<String> = row.get(4);
        let ident: String = row.get(5);
        let partitioned: bool = row.get(6);
        let cols = sql
            .query(
                "SELECT a.attname::text, a.atttypid, a.atttypmod, \
                        coalesce(a.attnum = ANY(i.indkey), false) \
                 FROM pg_attribute a \
                 LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisreplident \
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
                 ORDER BY a.attnum",
                &[&oid],
            )
            .await?;
        let pk = primary_key(sql, oid).await?;
        let identity = ReplicaIdentity::from_byte(ident.bytes().next().unwrap_or(b'd'))
            .unwrap_or(ReplicaIdentity::Default);
        let columns = cols
            .iter()
            .filter(|c| {
                let name: String = c.get(0);
                attnames.as_ref().is_none_or(|a| a.contains(&name))
            })
            .map(|c| {
                let name: String = c.get(0);
                let in_index: bool = c.get(3);
                let is_key = match identity {
                    ReplicaIdentity::Full => true,
                    ReplicaIdentity::Default => pk.contains(&name),
                    ReplicaIdentity::Index => in_index,
                    ReplicaIdentity::Nothing => false,
                };
                RelationColumn {
                    is_key,
                    name,
                    type_oid: c.get(1),
                    type_modifier: c.get(2),
                }
            })
            .collect();
        let rel = Relation {
            xid: None,
            oid,
            namespace: schema,
            name: table,
            replica_identity: identity,
            columns,
        };
        out.push(PublishedTable {
            info: Arc::new(RelationInfo::new(&rel, &pk, source)),
            row_filter,
            partitioned,
        });
    }
    Ok(out)
}

/// The primary key's column names in key order; empty when the table has none.
pub async fn primary_key(
    sql: &tokio_postgres::Client,
    relation_oid: u32,
) -> Result<Vec<String>, SourceError> {
    let rows = sql
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord",
            &[&relation_oid],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// A row read with the simple query protocol (text values), converted as the stream
/// converts values; `lsn` names the position in errors.
pub(crate) fn row_from_text(
    rel: &RelationInfo,
    r: &tokio_postgres::SimpleQueryRow,
    lsn: Lsn,
) -> Result<Row, SourceError> {
    let mut after = Row::new(rel.names.clone(), rel.columns.len());
    for (i, c) in rel.columns.iter().enumerate() {
        let v = match r.get(i) {
            None => Value::Null,
            Some(text) => {
                convert_text(c.type_oid, text.as_bytes()).map_err(|source| SourceError::Value {
                    table: rel.table.qualified_name().to_string(),
                    column: c.name.to_string(),
                    lsn,
                    source,
                })?
            }
        };
        after.push(i, v);
    }
    Ok(after)
}

/// Where snapshot events go.
pub struct SnapshotTarget<'a> {
    /// The slot's consistent point: `lsn` of every snapshot row (their `commit_lsn` is the
    /// position just before it, below any streamed commit).
    pub consistent_point: Lsn,
    /// Downstream.
    pub out: &'a mpsc::Sender<Vec<StreamItem>>,
}

/// Reads every table in the exported snapshot and sends `op: "r"` events, the last one
/// marked `"last"`, followed by a commit mark at the consistent point. Returns the row count.
pub async fn initial_load(
    sql: &mut tokio_postgres::Client,
    snapshot_name: &str,
    tables: &[PublishedTable],
    target: SnapshotTarget<'_>,
) -> Result<u64, SourceError> {
    let tx = sql.transaction().await?;
    tx.batch_execute(&format!(
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
        quote_literal(snapshot_name)
    ))
    .await?;
    let mut sequence = 0u64;
    let mut pending: Option<ChangeEvent> = None;
    let mut batch = Vec::with_capacity(FETCH_ROWS);
    let closed = || SourceError::DownstreamGone;
    for t in tables {
        let rel = &t.info;
        let cols: Vec<String> = rel.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let select_list = if cols.is_empty() {
            "NULL".to_string()
        } else {
            cols.join(", ")
        };
        let filter = t
            .row_filter
            .as_ref()
            .map(|f| format!(" WHERE {f}"))
            .unwrap_or_default();
        tx.batch_execute(&format!(
            "DECLARE inventorysync_snap NO SCROLL CURSOR FOR SELECT {select_list} FROM {}{filter}",
            t.from_item()
        ))
        .await?;
        loop {
            let msgs = tx
                .simple_query(&format!("FETCH {FETCH_ROWS} FROM inventorysync_snap"))
                .await?;
            let mut got = 0;
            for m in msgs {
                let tokio_postgres::SimpleQueryMessage::Row(r) = m else {
                    continue;
                };
                got += 1;
                let after = row_from_text(rel, &r, target.consistent_point)?;
                let key = key_of(rel, &after);
                let ev = ChangeEvent {
                    before: None,
                    after: Some(after),
                    source: SourceInfo {
                        table: rel.table.clone(),
                        ts_ms: now_ms(),
                        ts_us: now_ms() * 1000,
                        snapshot: SnapshotMarker::True,
                        tx_id: None,
                        lsn: target.consistent_point,
                        // Just before the consistent point: a transaction whose commit
                        // record starts exactly there is streamed, and its changes must
                        // version above every snapshot row (or central would drop them).
                        commit_lsn: Lsn(target.consistent_point.0.saturating_sub(1)),
                        sequence,
                        unchanged_toast: vec![],
                    },
                    op: Op::Read,
                    ts_ms: now_ms(),
                    transaction: None,
                    key: Some(key),
                };
                sequence += 1;
                if let Some(prev) = pending.replace(ev) {
                    batch.push(StreamItem::Change(Box::new(prev)));
                }
            }
            if !batch.is_empty() {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(FETCH_ROWS));
                target.out.send(full).await.map_err(|_| closed())?;
            }
            if got < FETCH_ROWS {
                break;
            }
        }
        tx.batch_execute("CLOSE inventorysync_snap").await?;
    }
    tx.commit().await?;
    let mut last = Vec::new();
    if let Some(mut ev) = pending {
        ev.source.snapshot = SnapshotMarker::Last;
        last.push(StreamItem::Change(Box::new(ev)));
    }
    // The load's commit mark: once durable, streaming starts at the consistent point.
    last.push(StreamItem::Commit {
        commit_lsn: target.consistent_point,
        end_lsn: target.consistent_point,
    });
    target.out.send(last).await.map_err(|_| closed())?;
    Ok(sequence)
}
