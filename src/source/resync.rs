//! Forced resync chunks, read while streaming goes on (the DBLog method): no table locks, no
//! pause of the stream, and no row that could undo a newer change.
//!
//! For one chunk the stream's own SQL connection writes a low watermark (a transactional
//! logical message), reads the next rows of the table in primary-key order, and writes a high
//! watermark. Between the two watermarks in the replication stream, every change of the table
//! removes its key from the chunk: the stream carries a newer value for it. At the high
//! watermark the remaining rows are emitted as `op: "r"`, `snapshot: "incremental"` events
//! inside the watermark's transaction, so they are versioned after every change committed
//! before it and before every change committed after it. The chunk's reply carries that
//! transaction's end LSN: once it is durable, the chunk's rows have their outcomes.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::SourceError;
use super::snapshot::{PublishedTable, quote_ident};
use crate::Lsn;
use crate::event::{ChangeEvent, Op, Row, SnapshotMarker, SourceInfo};

/// The logical message prefix of resync watermarks.
pub const WATERMARK_PREFIX: &str = "inventorysync.resync";

/// A request for the next chunk of one table.
#[derive(Debug)]
pub struct ChunkRequest {
    /// Unique per chunk (job, table, position): the watermarks name it.
    pub id: String,
    /// `schema.table`.
    pub table: String,
    /// The primary key (text form) of the last row of the previous chunk.
    pub after: Option<Vec<String>>,
    /// Rows per chunk.
    pub limit: usize,
    /// How the rows are marked (`source.snapshot`): `true` for an initial load,
    /// `incremental` for a forced resync.
    pub marker: SnapshotMarker,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Result<ChunkDone, String>>,
}

/// What a chunk came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkDone {
    /// End LSN of the high watermark's transaction: once durable, the chunk is delivered.
    pub end_lsn: Lsn,
    /// Rows read.
    pub read: u64,
    /// Rows emitted (read minus those the stream changed meanwhile).
    pub emitted: u64,
    /// The primary key of the chunk's last row (where the next chunk starts).
    pub last_key: Option<Vec<String>>,
    /// Whether the table has no rows after this chunk.
    pub exhausted: bool,
}

/// The receiving end the stream takes chunk requests from (shared by its restarts).
pub type ChunkInbox = Arc<tokio::sync::Mutex<mpsc::Receiver<ChunkRequest>>>;

/// A chunk between its watermarks.
pub(crate) struct OpenChunk {
    id: String,
    table: String,
    key_names: Vec<Arc<str>>,
    /// Rows by key, in key order (a removed row leaves `None`).
    rows: Vec<Option<ChangeEvent>>,
    index: HashMap<Vec<u8>, usize>,
    read: u64,
    last_key: Option<Vec<String>>,
    exhausted: bool,
    /// The low watermark has gone by: changes of the table now remove rows.
    window_open: bool,
    /// Rows emitted at the high watermark, waiting for its transaction's commit.
    emitted: Option<u64>,
    reply: Option<oneshot::Sender<Result<ChunkDone, String>>>,
}

/// The identity of a row's key columns, as bytes.
fn key_bytes(row: &Row, names: &[Arc<str>]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(32);
    for n in names {
        crate::event::write_value(&mut out, row.get(n)?);
        out.push(0);
    }
    Some(out)
}

impl OpenChunk {
    /// Whether `id` names this chunk.
    pub(crate) fn is(&self, id: &str) -> bool {
        self.id == id
    }

    /// Opens the window (the low watermark went by).
    pub(crate) fn open_window(&mut self) {
        self.window_open = true;
    }

    /// A streamed change: inside the window, its old and new keys leave the chunk.
    pub(crate) fn saw(&mut self, ev: &ChangeEvent) {
        if !self.window_open || ev.source.table.qualified_name() != self.table {
            return;
        }
        for row in [ev.before.as_ref(), ev.after.as_ref()]
            .into_iter()
            .flatten()
        {
            if let Some(k) = key_bytes(row, &self.key_names)
                && let Some(&i) = self.index.get(&k)
            {
                self.rows[i] = None;
            }
        }
    }

    /// The high watermark: the remaining rows, versioned inside the watermark's
    /// transaction (`commit_lsn`, `xid`), from sequence `first_sequence` on.
    pub(crate) fn emit(&mut self, lsn: Lsn, commit_lsn: Lsn, xid: Option<u32>) -> Vec<ChangeEvent> {
        self.window_open = false;
        let mut out = Vec::with_capacity(self.rows.len());
        for (seq, mut ev) in self.rows.drain(..).flatten().enumerate() {
            ev.source.lsn = lsn;
            ev.source.commit_lsn = commit_lsn;
            ev.source.sequence = seq as u64;
            ev.source.tx_id = xid;
            out.push(ev);
        }
        self.index.clear();
        self.emitted = Some(out.len() as u64);
        out
    }

    /// Whether the high watermark has gone by (the next commit ends the chunk).
    pub(crate) fn emitted(&self) -> bool {
        self.emitted.is_some()
    }

    /// The watermark's transaction committed at `end_lsn`: the chunk is done.
    pub(crate) fn finish(mut self, end_lsn: Lsn) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(Ok(ChunkDone {
                end_lsn,
                read: self.read,
                emitted: self.emitted.unwrap_or(0),
                last_key: self.last_key.take(),
                exhausted: self.exhausted,
            }));
        }
    }
}

/// Writes a watermark into the warehouse's WAL.
pub(crate) async fn watermark(
    sql: &tokio_postgres::Client,
    which: &str,
    id: &str,
) -> Result<(), SourceError> {
    sql.execute(
        "SELECT pg_logical_emit_message(true, $1, $2)",
        &[&WATERMARK_PREFIX, &format!("{which} {id}")],
    )
    .await?;
    Ok(())
}

/// How long a chunk waits for transactions still listed in progress after its low watermark.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// Waits (briefly) until the transactions in progress right after the low watermark are done.
///
/// Why: a transaction's commit record is written to the WAL before the transaction is
/// marked done in the process array. One whose commit record precedes the low watermark can
/// still be invisible to the chunk's SELECT, and its change is not inside the window (it
/// comes before the low watermark in the stream): the chunk would emit the row as it was
/// before that change, at a newer version, and undo it at central (a delete would be
/// resurrected). Every such transaction is in the `xip` list of a snapshot taken after the
/// low watermark's commit; once those have finished, a later snapshot sees all of them.
/// Transactions still running after the wait are long-running ones whose commit comes
/// after the low watermark: the window takes care of them. (The race lasts as long as a
/// committing backend is descheduled between the two steps, usually microseconds.)
async fn settle_commits_before_low_watermark(
    sql: &tokio_postgres::Client,
) -> Result<(), SourceError> {
    let row = sql
        .query_one(
            "SELECT coalesce(array_agg(x::text), '{}') FROM pg_snapshot_xip(pg_current_snapshot()) x",
            &[],
        )
        .await?;
    let running: Vec<String> = row.get(0);
    if running.is_empty() {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + SETTLE_WAIT;
    loop {
        let left: i64 = sql
            .query_one(
                "SELECT count(*) FROM unnest($1::text[]) x WHERE pg_xact_status(x::xid8) = 'in progress'",
                &[&running],
            )
            .await?
            .get(0);
        if left == 0 || tokio::time::Instant::now() >= deadline {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

/// Parses a watermark's content: (`low` or `high`, chunk id).
pub(crate) fn parse_watermark(content: &[u8]) -> Option<(&str, &str)> {
    std::str::from_utf8(content).ok()?.split_once(' ')
}

/// Writes the low watermark, reads the chunk, writes the high watermark. A table without a
/// primary key cannot be read in chunks: the request is answered with that error.
pub(crate) async fn start_chunk(
    sql: &tokio_postgres::Client,
    table: &PublishedTable,
    req: ChunkRequest,
) -> Result<Option<OpenChunk>, SourceError> {
    let rel = &table.info;
    // A table without a primary key cannot be read in key order: a forced resync refuses
    // it, an initial load reads it whole in one chunk (its replica identity, if any, still
    // lets streamed changes remove rows from the chunk).
    let whole = super::snapshot::primary_key(sql, rel.oid).await?.is_empty();
    if whole && req.marker == SnapshotMarker::Incremental {
        let _ = req.reply.send(Err(format!(
            "{} has no primary key: a resync reads tables in primary-key order",
            rel.table.qualified_name()
        )));
        return Ok(None);
    }
    let key_idx = &rel.key_columns;
    let key_names: Vec<Arc<str>> = key_idx
        .iter()
        .map(|&i| rel.columns[i].name.clone())
        .collect();
    watermark(sql, "low", &req.id).await?;
    settle_commits_before_low_watermark(sql).await?;
    let cols: Vec<String> = rel.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let key_list: Vec<String> = key_names.iter().map(|n| quote_ident(n)).collect();
    let mut conditions: Vec<String> = Vec::new();
    if let Some(f) = &table.row_filter {
        conditions.push(format!("({f})"));
    }
    if let Some(after) = &req.after {
        let values: Vec<String> = after.iter().map(|v| quote_literal(v)).collect();
        conditions.push(format!(
            "({}) > ({})",
            key_list.join(", "),
            values.join(", ")
        ));
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    let order = if whole {
        String::new()
    } else {
        format!(" ORDER BY {} LIMIT {}", key_list.join(", "), req.limit)
    };
    let query = format!(
        "SELECT {} FROM {}{filter}{order}",
        if cols.is_empty() {
            "NULL".into()
        } else {
            cols.join(", ")
        },
        table.from_item(),
    );
    let msgs = sql.simple_query(&query).await?;
    let mut rows = Vec::new();
    let mut index = HashMap::new();
    let mut last_key = None;
    for m in msgs {
        let tokio_postgres::SimpleQueryMessage::Row(r) = m else {
            continue;
        };
        let after = super::snapshot::row_from_text(rel, &r, Lsn::ZERO)?;
        last_key = Some(
            key_idx
                .iter()
                .map(|&i| r.get(i).unwrap_or_default().to_string())
                .collect(),
        );
        let key = super::assemble::key_of(rel, &after);
        if let Some(k) = key_bytes(&after, &key_names) {
            index.insert(k, rows.len());
        }
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        rows.push(Some(ChangeEvent {
            before: None,
            after: Some(after),
            source: SourceInfo {
                table: rel.table.clone(),
                ts_ms: now_us / 1000,
                ts_us: now_us,
                snapshot: req.marker,
                tx_id: None,
                lsn: Lsn::ZERO,
                commit_lsn: Lsn::ZERO,
                sequence: 0,
                unchanged_toast: vec![],
            },
            op: Op::Read,
            ts_ms: now_us / 1000,
            transaction: None,
            key: Some(key),
        }));
    }
    watermark(sql, "high", &req.id).await?;
    let read = rows.len() as u64;
    Ok(Some(OpenChunk {
        id: req.id,
        table: req.table,
        key_names,
        exhausted: whole || (read as usize) < req.limit,
        rows,
        index,
        read,
        last_key: last_key.or(req.after),
        window_open: false,
        emitted: None,
        reply: Some(req.reply),
    }))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
