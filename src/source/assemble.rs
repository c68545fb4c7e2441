//! Transaction assembly: pgoutput messages in, `ChangeEvent`s and commit marks out.
//!
//! Without streaming, Postgres sends each transaction whole, in commit order, after it
//! committed; Begin already carries the commit LSN, so events are emitted as rows arrive and
//! a 200k-row transaction never sits in memory. With protocol 2 and `streaming 'on'`, large
//! in-progress transactions arrive in interleaved blocks before their fate is known: they are
//! kept per top-level xid, as the raw messages, within a memory bound past which they spill
//! to a temporary file, and are replayed through the same path at Stream Commit. Aborted
//! transactions and aborted subtransactions are dropped.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use bytes::Bytes;

use super::SourceError;
use super::pgoutput::{
    Begin, Delete, Insert, LogicalMessage, OldTuple, PG_EPOCH_OFFSET_MICROS, TupleData, TupleValue,
    Update,
};
pub use super::relation::SourceIdentity;
use super::relation::{RelationCache, RelationInfo};
use crate::Lsn;
use crate::event::{ChangeEvent, Op, Row, SnapshotMarker, SourceInfo, TransactionInfo, Value};
use crate::values::{convert_binary, convert_text};

pub use crate::event::StreamItem;

/// What the caller must do after a message.
#[derive(Debug)]
pub enum Next {
    /// Nothing more.
    Done,
    /// A streamed transaction committed: replay its buffered messages with
    /// [`Assembler::replay_message`] (Relation messages through [`Assembler::relation`]), then
    /// call [`Assembler::finish_replay`].
    Replay(StreamedTransaction),
}

struct OpenTransaction {
    xid: u32,
    commit_lsn: Lsn,
    commit_time_unix_us: i64,
    sequence: u64,
    /// Changes so far per relation OID; a transaction touches few tables, so a list wins.
    per_table: Vec<(u32, u64)>,
    end_lsn: Option<Lsn>,
    /// Processing time stamped on events, refreshed every few hundred changes.
    now_ms: i64,
}

/// The assembler: relation cache, the open transaction and buffered streamed ones.
pub struct Assembler {
    identity: SourceIdentity,
    relations: RelationCache,
    open: Option<OpenTransaction>,
    streams: StreamBuffers,
    streaming_xid: Option<u32>,
}

impl Assembler {
    /// A new assembler; streamed transactions may hold `stream_memory_bytes` in memory.
    pub fn new(identity: SourceIdentity, stream_memory_bytes: usize) -> Self {
        Self {
            identity,
            relations: RelationCache::default(),
            open: None,
            streams: StreamBuffers::new(stream_memory_bytes),
            streaming_xid: None,
        }
    }

    /// Records a Relation message with the table's primary key column names.
    pub fn relation(&mut self, rel: &super::pgoutput::Relation, primary_key: &[String]) {
        self.relations
            .insert(RelationInfo::new(rel, primary_key, &self.identity));
    }

    /// Whether a streamed transaction is open (buffered in memory or spilled).
    pub fn has_open_streams(&self) -> bool {
        !self.streams.by_xid.is_empty()
    }

    /// Bytes of streamed transactions held in memory now.
    pub fn buffered_bytes(&self) -> usize {
        self.streams.mem_bytes
    }

    /// Handles one message that is not a Relation. `wal_start` is its XLogData start and
    /// `raw` its bytes (kept when it belongs to a streamed block).
    pub fn handle(
        &mut self,
        msg: LogicalMessage,
        wal_start: Lsn,
        raw: &Bytes,
        out: &mut Vec<StreamItem>,
    ) -> Result<Next, SourceError> {
        if let Some(xid) = self.streaming_xid {
            match msg {
                LogicalMessage::StreamStop => self.streaming_xid = None,
                LogicalMessage::StreamStart(_) => {
                    return Err(SourceError::Protocol(
                        "Stream Start inside a streamed block".into(),
                    ));
                }
                _ => self.streams.push(xid, wal_start, raw)?,
            }
            return Ok(Next::Done);
        }
        match msg {
            LogicalMessage::Begin(b) => self.begin(&b),
            LogicalMessage::Commit(c) => {
                let open = self.open.take().ok_or_else(|| {
                    SourceError::Protocol(format!("Commit at {} without Begin", c.commit_lsn))
                })?;
                out.push(StreamItem::Commit {
                    commit_lsn: open.commit_lsn,
                    end_lsn: c.end_lsn,
                });
            }
            msg @ (LogicalMessage::Insert(_)
            | LogicalMessage::Update(_)
            | LogicalMessage::Delete(_)
            | LogicalMessage::Truncate(_)) => self.replay_message(msg, wal_start, out)?,
            LogicalMessage::StreamStart(s) => {
                self.streaming_xid = Some(s.xid);
            }
            LogicalMessage::StreamAbort(a) => self.streams.abort(a.xid, a.subxid),
            LogicalMessage::StreamCommit(c) => {
                let buffered = self.streams.take(c.xid)?;
                self.open = Some(OpenTransaction {
                    xid: c.xid,
                    commit_lsn: c.commit_lsn,
                    commit_time_unix_us: c.commit_time_micros + PG_EPOCH_OFFSET_MICROS,
                    sequence: 0,
                    per_table: Vec::new(),
                    end_lsn: Some(c.end_lsn),
                    now_ms: now_ms(),
                });
                return Ok(Next::Replay(
                    buffered.unwrap_or_else(|| StreamedTransaction::empty(c.xid)),
                ));
            }
            // Origins, types and logical messages (our heartbeats among them) are not rows.
            LogicalMessage::Origin(_)
            | LogicalMessage::Type(_)
            | LogicalMessage::Message(_)
            | LogicalMessage::StreamStop
            | LogicalMessage::Relation(_) => {}
        }
        Ok(Next::Done)
    }

    /// Turns one row-change message into events: for live transactions, and for the replay
    /// of a committed streamed transaction's buffered messages.
    pub fn replay_message(
        &mut self,
        msg: LogicalMessage,
        wal_start: Lsn,
        out: &mut Vec<StreamItem>,
    ) -> Result<(), SourceError> {
        match msg {
            LogicalMessage::Insert(i) => self.insert(i, wal_start, out),
            LogicalMessage::Update(u) => self.update(u, wal_start, out),
            LogicalMessage::Delete(d) => self.delete(d, wal_start, out),
            LogicalMessage::Truncate(t) => {
                for oid in t.relation_oids {
                    let rel = Self::relation_info(&self.relations, oid, wal_start)?;
                    let ev = event(
                        &mut self.open,
                        rel,
                        Op::Truncate,
                        None,
                        None,
                        None,
                        wal_start,
                        vec![],
                    )?;
                    out.push(StreamItem::Change(Box::new(ev)));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Ends the replay of a streamed transaction.
    pub fn finish_replay(&mut self, out: &mut Vec<StreamItem>) -> Result<(), SourceError> {
        let open = self
            .open
            .take()
            .ok_or_else(|| SourceError::Protocol("replay finished without a transaction".into()))?;
        out.push(StreamItem::Commit {
            commit_lsn: open.commit_lsn,
            end_lsn: open.end_lsn.unwrap_or(open.commit_lsn),
        });
        Ok(())
    }

    fn begin(&mut self, b: &Begin) {
        self.open = Some(OpenTransaction {
            xid: b.xid,
            commit_lsn: b.final_lsn,
            commit_time_unix_us: b.commit_time_micros + PG_EPOCH_OFFSET_MICROS,
            sequence: 0,
            per_table: Vec::new(),
            end_lsn: None,
            now_ms: now_ms(),
        });
    }

    /// The relation, borrowed: cloning its `Arc` per row would cost two atomic operations.
    fn relation_info(
        relations: &RelationCache,
        oid: u32,
        at: Lsn,
    ) -> Result<&RelationInfo, SourceError> {
        relations
            .get(oid)
            .map(|r| &**r)
            .ok_or(SourceError::UnknownRelation { oid, lsn: at })
    }

    fn insert(&mut self, i: Insert, at: Lsn, out: &mut Vec<StreamItem>) -> Result<(), SourceError> {
        let rel = Self::relation_info(&self.relations, i.relation_oid, at)?;
        let mut toast = Vec::new();
        let after = row_from_tuple(rel, &i.new, None, &mut toast, at)?;
        let ev = change_event(
            &mut self.open,
            rel,
            Op::Create,
            None,
            Some(after),
            at,
            toast,
        )?;
        out.push(StreamItem::Change(Box::new(ev)));
        Ok(())
    }

    fn update(&mut self, u: Update, at: Lsn, out: &mut Vec<StreamItem>) -> Result<(), SourceError> {
        let rel = Self::relation_info(&self.relations, u.relation_oid, at)?;
        let mut toast = Vec::new();
        let full_old = match &u.old {
            Some(OldTuple::Full(t)) => Some(t),
            _ => None,
        };
        let after = row_from_tuple(rel, &u.new, full_old, &mut toast, at)?;
        let before = match &u.old {
            Some(old) => Some(old_row(rel, old, at)?),
            None => None,
        };
        let ev = change_event(
            &mut self.open,
            rel,
            Op::Update,
            before,
            Some(after),
            at,
            toast,
        )?;
        out.push(StreamItem::Change(Box::new(ev)));
        Ok(())
    }

    fn delete(&mut self, d: Delete, at: Lsn, out: &mut Vec<StreamItem>) -> Result<(), SourceError> {
        let rel = Self::relation_info(&self.relations, d.relation_oid, at)?;
        let before = old_row(rel, &d.old, at)?;
        let ev = change_event(
            &mut self.open,
            rel,
            Op::Delete,
            Some(before),
            None,
            at,
            vec![],
        )?;
        out.push(StreamItem::Change(Box::new(ev)));
        Ok(())
    }
}

/// A row change's event, keyed by the new row (the old one for deletes).
fn change_event(
    open: &mut Option<OpenTransaction>,
    rel: &RelationInfo,
    op: Op,
    before: Option<Row>,
    after: Option<Row>,
    at: Lsn,
    unchanged_toast: Vec<Arc<str>>,
) -> Result<ChangeEvent, SourceError> {
    let key = after.as_ref().or(before.as_ref()).map(|r| key_of(rel, r));
    event(open, rel, op, before, after, key, at, unchanged_toast)
}

/// Builds one streamed change event of the open transaction, advancing its sequence.
#[allow(clippy::too_many_arguments)]
fn event(
    open: &mut Option<OpenTransaction>,
    rel: &RelationInfo,
    op: Op,
    before: Option<Row>,
    after: Option<Row>,
    key: Option<Row>,
    at: Lsn,
    unchanged_toast: Vec<Arc<str>>,
) -> Result<ChangeEvent, SourceError> {
    let open = open.as_mut().ok_or_else(|| {
        SourceError::Protocol(format!("row change at {at} outside a transaction"))
    })?;
    let sequence = open.sequence;
    open.sequence += 1;
    if sequence % 256 == 255 {
        open.now_ms = now_ms();
    }
    let data_collection_order = match open.per_table.iter_mut().find(|(oid, _)| *oid == rel.oid) {
        Some((_, n)) => {
            *n += 1;
            *n
        }
        None => {
            open.per_table.push((rel.oid, 1));
            1
        }
    };
    Ok(ChangeEvent {
        before,
        after,
        source: SourceInfo {
            table: rel.table.clone(),
            ts_ms: open.commit_time_unix_us.div_euclid(1000),
            ts_us: open.commit_time_unix_us,
            snapshot: SnapshotMarker::False,
            tx_id: Some(open.xid),
            lsn: at,
            commit_lsn: open.commit_lsn,
            sequence,
            unchanged_toast,
        },
        op,
        ts_ms: open.now_ms,
        transaction: Some(TransactionInfo {
            total_order: sequence + 1,
            data_collection_order,
        }),
        key,
    })
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Converts column `col` of tuple `t`.
fn convert(rel: &RelationInfo, col: usize, t: &TupleData, at: Lsn) -> Result<Value, SourceError> {
    let c = &rel.columns[col];
    match t.get(col) {
        None | Some(TupleValue::Null | TupleValue::UnchangedToast) => Ok(Value::Null),
        Some(TupleValue::Binary(b)) => Ok(convert_binary(b)),
        Some(TupleValue::Text(raw)) => {
            convert_text(c.type_oid, raw).map_err(|source| SourceError::Value {
                table: rel.table.qualified_name().to_string(),
                column: c.name.to_string(),
                lsn: at,
                source,
            })
        }
    }
}

fn check_width(rel: &RelationInfo, t: &TupleData, at: Lsn) -> Result<(), SourceError> {
    if t.len() != rel.columns.len() {
        return Err(SourceError::Protocol(format!(
            "row of {}.{} at {at} has {} columns, its Relation message announced {}",
            rel.table.schema(),
            rel.table.table(),
            t.len(),
            rel.columns.len()
        )));
    }
    Ok(())
}

/// The new row; unchanged TOAST columns come from the full old row when there is one,
/// otherwise they are left out and listed.
pub(crate) fn row_from_tuple(
    rel: &RelationInfo,
    t: &TupleData,
    full_old: Option<&TupleData>,
    unchanged_toast: &mut Vec<Arc<str>>,
    at: Lsn,
) -> Result<Row, SourceError> {
    check_width(rel, t, at)?;
    let mut row = Row::new(rel.names.clone(), t.len());
    for (i, v) in t.iter().enumerate() {
        let source = match (v, full_old) {
            (TupleValue::UnchangedToast, Some(old))
                if matches!(
                    old.get(i),
                    Some(TupleValue::Text(_) | TupleValue::Binary(_))
                ) =>
            {
                old
            }
            (TupleValue::UnchangedToast, _) => {
                unchanged_toast.push(rel.columns[i].name.clone());
                continue;
            }
            _ => t,
        };
        row.push(i, convert(rel, i, source, at)?);
    }
    Ok(row)
}

/// The old image: with a key-only tuple, only the identity columns.
fn old_row(rel: &RelationInfo, old: &OldTuple, at: Lsn) -> Result<Row, SourceError> {
    let t = old.tuple();
    check_width(rel, t, at)?;
    let key_only = matches!(old, OldTuple::Key(_));
    let mut row = Row::new(rel.names.clone(), t.len());
    for (i, v) in t.iter().enumerate() {
        if (key_only && !rel.columns[i].is_identity) || v == TupleValue::UnchangedToast {
            continue;
        }
        row.push(i, convert(rel, i, t, at)?);
    }
    Ok(row)
}

/// The key columns' values taken from `row`, null where the row lacks one.
pub(crate) fn key_of(rel: &RelationInfo, row: &Row) -> Row {
    let mut key = Row::new(rel.names.clone(), rel.key_columns.len());
    for &i in &rel.key_columns {
        key.push(i, row.value_at(i).cloned().unwrap_or(Value::Null));
    }
    key
}

/// A committed streamed transaction's buffered messages, ready to replay in order.
#[derive(Debug)]
pub struct StreamedTransaction {
    /// Top-level xid.
    pub xid: u32,
    mem: std::collections::VecDeque<(Lsn, Bytes)>,
    spill: Option<BufReader<File>>,
    aborted: HashSet<u32>,
}

impl StreamedTransaction {
    fn empty(xid: u32) -> Self {
        Self {
            xid,
            mem: Default::default(),
            spill: None,
            aborted: HashSet::new(),
        }
    }

    /// Whether changes of this (sub)transaction id were rolled back.
    pub fn is_aborted(&self, subxid: u32) -> bool {
        self.aborted.contains(&subxid)
    }

    /// The aborted subtransaction ids.
    pub fn aborted_set(&self) -> HashSet<u32> {
        self.aborted.clone()
    }

    /// The next buffered message in arrival order, from memory then from the spill file.
    // Spilling moves everything buffered so far to the file, so the memory part and the file
    // never interleave: one of them is empty.
    pub fn next_message(&mut self) -> Result<Option<(Lsn, Bytes)>, SourceError> {
        if let Some(item) = self.mem.pop_front() {
            return Ok(Some(item));
        }
        let Some(r) = self.spill.as_mut() else {
            return Ok(None);
        };
        let mut header = [0u8; 12];
        match r.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                self.spill = None;
                return Ok(None);
            }
            Err(e) => return Err(SourceError::Spill(e)),
        }
        let mut lsn = [0u8; 8];
        lsn.copy_from_slice(&header[..8]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&header[8..]);
        let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
        r.read_exact(&mut buf).map_err(SourceError::Spill)?;
        Ok(Some((Lsn(u64::from_be_bytes(lsn)), Bytes::from(buf))))
    }
}

struct XidBuffer {
    mem: Vec<(Lsn, Bytes)>,
    mem_bytes: usize,
    spill: Option<BufWriter<File>>,
    aborted: HashSet<u32>,
}

/// In-progress streamed transactions, bounded in memory.
struct StreamBuffers {
    by_xid: HashMap<u32, XidBuffer>,
    mem_bytes: usize,
    limit_bytes: usize,
}

impl StreamBuffers {
    fn new(limit_bytes: usize) -> Self {
        Self {
            by_xid: HashMap::new(),
            mem_bytes: 0,
            limit_bytes,
        }
    }

    fn push(&mut self, xid: u32, at: Lsn, raw: &Bytes) -> Result<(), SourceError> {
        let buf = self.by_xid.entry(xid).or_insert_with(|| XidBuffer {
            mem: Vec::new(),
            mem_bytes: 0,
            spill: None,
            aborted: HashSet::new(),
        });
        if let Some(w) = buf.spill.as_mut() {
            return write_spilled(w, at, raw);
        }
        // Own the bytes: a slice would pin the whole network read buffer.
        buf.mem.push((at, Bytes::copy_from_slice(raw)));
        buf.mem_bytes += raw.len() + 32;
        self.mem_bytes += raw.len() + 32;
        if self.mem_bytes > self.limit_bytes {
            // Move this transaction's messages to disk; it is the one growing.
            let file = tempfile::tempfile().map_err(SourceError::Spill)?;
            let mut w = BufWriter::with_capacity(1 << 20, file);
            for (lsn, b) in buf.mem.drain(..) {
                write_spilled(&mut w, lsn, &b)?;
            }
            self.mem_bytes -= buf.mem_bytes;
            buf.mem_bytes = 0;
            buf.spill = Some(w);
            tracing::debug!(xid, "streamed transaction spilled to disk");
        }
        Ok(())
    }

    fn abort(&mut self, xid: u32, subxid: u32) {
        if xid == subxid {
            if let Some(b) = self.by_xid.remove(&xid) {
                self.mem_bytes -= b.mem_bytes;
            }
        } else if let Some(b) = self.by_xid.get_mut(&xid) {
            b.aborted.insert(subxid);
        }
    }

    fn take(&mut self, xid: u32) -> Result<Option<StreamedTransaction>, SourceError> {
        let Some(b) = self.by_xid.remove(&xid) else {
            return Ok(None);
        };
        self.mem_bytes -= b.mem_bytes;
        let spill = match b.spill {
            Some(w) => {
                let mut file = w
                    .into_inner()
                    .map_err(|e| SourceError::Spill(e.into_error()))?;
                file.seek(SeekFrom::Start(0)).map_err(SourceError::Spill)?;
                Some(BufReader::with_capacity(1 << 20, file))
            }
            None => None,
        };
        Ok(Some(StreamedTransaction {
            xid,
            mem: b.mem.into(),
            spill,
            aborted: b.aborted,
        }))
    }
}

fn write_spilled(w: &mut BufWriter<File>, at: Lsn, raw: &[u8]) -> Result<(), SourceError> {
    w.write_all(&at.0.to_be_bytes())
        .and_then(|_| w.write_all(&(raw.len() as u32).to_be_bytes()))
        .and_then(|_| w.write_all(raw))
        .map_err(SourceError::Spill)
}
