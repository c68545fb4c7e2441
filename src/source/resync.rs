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
use super::conn::quote_literal;
use super::marker::Markers;
use super::snapshot::PublishedTable;
use crate::Lsn;
use crate::event::{ChangeEvent, Op, Row, SnapshotMarker, SourceInfo};
use crate::pg::quote_ident;

/// The logical message prefix of resync watermarks.
pub const WATERMARK_PREFIX: &str = "inventorysync.resync";

/// A request for the next chunk of one table.
#[derive(Debug)]
pub struct ChunkRequest {
    /// Unique per request (job, table, position and a nonce): the watermarks name it, so a
    /// request never takes an earlier request's watermarks, replayed after a restart, for its own.
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
    pub reply: oneshot::Sender<Result<ChunkDone, ChunkRefused>>,
}

/// Why a chunk was not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkRefused {
    /// The table is not there to read (dropped, or no longer published): the job records
    /// it as skipped, with this reason, and goes on with the other tables.
    Vanished(String),
    /// The job cannot go on, for this reason.
    Failed(String),
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
    /// Rows (by index) whose row version has a writer (`xmax`) the SELECT did not see:
    /// see [`OpenChunk::open_window`].
    writers: Vec<(u32, usize)>,
    /// Rows emitted at the high watermark, waiting for its transaction's commit.
    emitted: Option<u64>,
    reply: Option<oneshot::Sender<Result<ChunkDone, ChunkRefused>>>,
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

    /// Opens the window (the low watermark went by). `committed_before` tells whether the
    /// stream has decoded a commit of a transaction before this point.
    ///
    /// Why rows go here: a transaction's commit record is written (and decoded) before the
    /// transaction leaves the process array, and a synchronous-commit wait can hold it there
    /// for seconds. If its commit precedes the low watermark, its change is streamed before
    /// the window opens, and the SELECT, not seeing it, returned the row as it was before the
    /// change: emitted at the chunk's newer version, that row would undo the change at
    /// central (a deleted row would come back). Such a row version carries the writer's xid
    /// as its `xmax`, a writer the SELECT's snapshot does not see; once the low watermark is
    /// reached, the stream knows whether that writer committed before it. If so the row is
    /// left out (the stream carried its newer value); a writer that commits later is inside
    /// the window or after the chunk (both fine), and one that aborts leaves the row right as
    /// read. An insert not yet visible is simply not read: the stream carried it. Not
    /// covered: a writer in a subtransaction (its xid is not the one pgoutput names), which
    /// only the short wait before the SELECT guards against.
    pub(crate) fn open_window(&mut self, committed_before: impl Fn(u32) -> bool) {
        self.window_open = true;
        for (xid, i) in std::mem::take(&mut self.writers) {
            if committed_before(xid)
                && let Some(row) = self.rows.get_mut(i)
            {
                *row = None;
            }
        }
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

/// Writes a watermark into the warehouse's WAL (on the primary, for a standby) and returns
/// its position.
pub(crate) async fn watermark(
    sql: &tokio_postgres::Client,
    markers: &Markers,
    which: &str,
    id: &str,
) -> Result<Lsn, SourceError> {
    let at = markers
        .emit(sql, WATERMARK_PREFIX, &format!("{which} {id}"))
        .await?;
    at.ok_or_else(|| {
        SourceError::Config("a standby without primary_url writes no watermark".into())
    })
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
pub(crate) async fn settle_commits_before_low_watermark(
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

/// Writes the low watermark, reads the chunk, writes the high watermark. `keyless`: the
/// table has no primary key (a resync refuses it; a load reads it by row position).
pub(crate) async fn start_chunk(
    sql: &tokio_postgres::Client,
    markers: &Markers,
    table: &PublishedTable,
    keyless: bool,
    req: ChunkRequest,
) -> Result<Option<OpenChunk>, SourceError> {
    let rel = &table.info;
    // A table without a primary key cannot be read in key order: a forced resync refuses
    // it; an initial load reads it in chunks of pages (a TID range scan, `ctid` from page p
    // to p + span: no sort, PostgreSQL 14+), with its replica identity, if any, still
    // letting streamed changes remove rows from a chunk, in bounded memory and with the
    // stream going on between chunks. A row that an update moves to a later page between two
    // chunks is read again (the stream carried its change, and the later read is newer); one
    // moved to an earlier page is not, and the stream carried its change. Only a partitioned
    // root, whose partitions repeat positions, is read whole.
    let by_position = keyless && !table.partitioned;
    let whole = keyless && table.partitioned;
    if keyless && req.marker == SnapshotMarker::Incremental {
        let _ = req.reply.send(Err(ChunkRefused::Failed(format!(
            "{} has no primary key: a resync reads tables in primary-key order",
            rel.table.qualified_name()
        ))));
        return Ok(None);
    }
    let key_idx = &rel.key_columns;
    let key_names: Vec<Arc<str>> = key_idx
        .iter()
        .map(|&i| rel.columns[i].name.clone())
        .collect();
    watermark(sql, markers, "low", &req.id).await?;
    // On a standby the chunk's read must see everything committed before the low watermark's
    // own commit, which was written on the primary.
    markers.caught_up(sql).await?;
    settle_commits_before_low_watermark(sql).await?;
    let cols: Vec<String> = rel.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let key_list: Vec<String> = key_names.iter().map(|n| quote_ident(n)).collect();
    let mut conditions: Vec<String> = Vec::new();
    if let Some(f) = &table.row_filter {
        conditions.push(format!("({f})"));
    }
    // By position: the pages [from, to) of the table's `pages`.
    let pages = if by_position {
        let from: i64 = req
            .after
            .as_ref()
            .and_then(|a| a.first())
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let (to, size) = page_span(sql, rel.oid, from, req.limit).await?;
        conditions.push(format!(
            "inventorysync_row.ctid >= '({from},0)'::tid AND inventorysync_row.ctid < '({to},0)'::tid"
        ));
        Some((to, size))
    } else {
        None
    };
    match (&req.after, by_position) {
        (_, true) | (None, _) => {}
        (Some(after), false) => {
            let values: Vec<String> = after.iter().map(|v| quote_literal(v)).collect();
            conditions.push(format!(
                "({}) > ({})",
                key_list.join(", "),
                values.join(", ")
            ));
        }
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    let order = if whole || by_position {
        String::new()
    } else {
        format!(" ORDER BY {} LIMIT {}", key_list.join(", "), req.limit)
    };
    // Besides the columns: the row version's xmax when the transaction behind it is in
    // progress for this SELECT's snapshot (see `OpenChunk::open_window`).
    let n_cols = cols.len().max(1);
    let query = format!(
        "WITH inventorysync_snap AS MATERIALIZED (SELECT pg_current_snapshot() AS s, \
                pg_snapshot_xmax(pg_current_snapshot())::text::numeric AS n) \
         SELECT {}, CASE WHEN inventorysync_row.xmax <> '0'::xid AND NOT pg_visible_in_snapshot({}, \
                (SELECT s FROM inventorysync_snap)) \
           THEN inventorysync_row.xmax::text END \
         FROM {} AS inventorysync_row{filter}{order}",
        if cols.is_empty() {
            "NULL".into()
        } else {
            cols.join(", ")
        },
        full_xid(
            "inventorysync_row.xmax::text::numeric",
            "(SELECT n FROM inventorysync_snap)"
        ),
        table.from_item(),
    );
    let msgs = sql.simple_query(&query).await?;
    let fetched: Vec<tokio_postgres::SimpleQueryRow> = msgs
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect();
    let mut writers: Vec<(u32, usize)> = Vec::new();
    let mut rows = Vec::new();
    let mut index = HashMap::new();
    let mut last_key = None;
    for r in &fetched {
        if !by_position {
            last_key = Some(
                key_idx
                    .iter()
                    .map(|&i| r.get(i).unwrap_or_default().to_string())
                    .collect(),
            );
        }
        if let Some(xid) = r.get(n_cols).and_then(|x| x.parse().ok()) {
            writers.push((xid, rows.len()));
        }
        let after = super::snapshot::row_from_text(rel, r, Lsn::ZERO)?;
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
    watermark(sql, markers, "high", &req.id).await?;
    let read = fetched.len() as u64;
    let exhausted = match pages {
        // The next chunk starts at `to`: done once it is past the table's last page.
        Some((to, size)) => {
            last_key = Some(vec![to.to_string()]);
            to >= size
        }
        None => whole || (read as usize) < req.limit,
    };
    Ok(Some(OpenChunk {
        id: req.id,
        table: req.table,
        key_names,
        exhausted,
        rows,
        index,
        read,
        last_key: last_key.or(req.after),
        window_open: false,
        writers,
        emitted: None,
        reply: Some(req.reply),
    }))
}

/// Rows per page assumed for a table never analyzed (no `reltuples`): narrow rows.
const ROWS_PER_PAGE_UNKNOWN: f64 = 200.0;

/// The end page of a chunk of about `limit` rows from page `from` of relation `oid` (by its
/// statistics' rows per page), and the relation's size in pages now.
async fn page_span(
    sql: &tokio_postgres::Client,
    oid: u32,
    from: i64,
    limit: usize,
) -> Result<(i64, i64), SourceError> {
    let row = sql
        .query_one(
            "SELECT (pg_relation_size(c.oid) / current_setting('block_size')::bigint)::bigint,
                    CASE WHEN c.relpages > 0 AND c.reltuples > 0
                         THEN (c.reltuples / c.relpages)::float8 ELSE 0 END
               FROM pg_class c WHERE c.oid = $1",
            &[&oid],
        )
        .await?;
    let (size, per_page): (i64, f64) = (row.get(0), row.get(1));
    let per_page = if per_page >= 1.0 {
        per_page
    } else {
        ROWS_PER_PAGE_UNKNOWN
    };
    let span = ((limit as f64 / per_page).ceil() as i64).max(1);
    Ok((from + span, size))
}

/// SQL for the full (epoch-qualified) `xid8` of the 32-bit xid `xid` (a numeric
/// expression), taken relative to `reference`, a nearby full xid (numeric): the one with the
/// same low 32 bits within 2^31 of it (live xids are, by wraparound protection).
fn full_xid(xid: &str, reference: &str) -> String {
    format!(
        "(floor({r} / 4294967296) * 4294967296 + {x} \
          + CASE WHEN floor({r} / 4294967296) * 4294967296 + {x} > {r} + 2147483648 THEN -4294967296 \
                 WHEN floor({r} / 4294967296) * 4294967296 + {x} < {r} - 2147483648 THEN 4294967296 \
                 ELSE 0 END)::text::xid8",
        r = reference,
        x = xid
    )
}
