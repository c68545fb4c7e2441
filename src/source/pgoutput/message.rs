//! Typed pgoutput messages: small structs over the decoded fields.

use bytes::Bytes;

use crate::Lsn;

/// One message of the streaming replication protocol's `CopyData` sub-protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// WAL data: one pgoutput message.
    XLogData {
        /// WAL position this message starts at.
        wal_start: Lsn,
        /// Current end of WAL on the server.
        wal_end: Lsn,
        /// Server clock at send time, microseconds since 2000-01-01.
        send_time_micros: i64,
        /// The pgoutput message.
        data: Bytes,
    },
    /// A keepalive from the server.
    PrimaryKeepalive {
        /// Current end of WAL on the server.
        wal_end: Lsn,
        /// Server clock at send time, microseconds since 2000-01-01.
        send_time_micros: i64,
        /// The server wants a status update now, or it may disconnect.
        reply_requested: bool,
    },
}

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogicalMessage {
    /// Start of a transaction.
    Begin(Begin),
    /// End of a transaction.
    Commit(Commit),
    /// The transaction came from another origin.
    Origin(Origin),
    /// A generic logical decoding message.
    Message(Message),
    /// A table's shape, sent before its first row and after DDL.
    Relation(Relation),
    /// A non-builtin type's name.
    Type(Type),
    /// An inserted row.
    Insert(Insert),
    /// An updated row.
    Update(Update),
    /// A deleted row.
    Delete(Delete),
    /// Truncated tables.
    Truncate(Truncate),
    /// Start of a block of an in-progress transaction (protocol 2).
    StreamStart(StreamStart),
    /// End of a block of an in-progress transaction (protocol 2).
    StreamStop,
    /// A streamed transaction committed (protocol 2).
    StreamCommit(StreamCommit),
    /// A streamed transaction or subtransaction aborted (protocol 2).
    StreamAbort(StreamAbort),
}

/// Begin message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01.
    pub commit_time_micros: i64,
    /// Transaction id.
    pub xid: u32,
}

/// Commit message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Unused flags.
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record: the position to confirm.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01.
    pub commit_time_micros: i64,
}

/// Origin message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Commit LSN on the origin server.
    pub commit_lsn: Lsn,
    /// Origin name.
    pub name: String,
}

/// Logical decoding message from `pg_logical_emit_message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Transaction id, inside a streamed block.
    pub xid: Option<u32>,
    /// Whether the message is part of its transaction.
    pub transactional: bool,
    /// LSN of the message.
    pub lsn: Lsn,
    /// Prefix given by the emitter.
    pub prefix: String,
    /// Content given by the emitter.
    pub content: Bytes,
}

/// Replica identity setting of a relation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// Primary key (`d`).
    Default,
    /// Nothing (`n`).
    Nothing,
    /// All columns (`f`).
    Full,
    /// A chosen unique index (`i`).
    Index,
}

impl ReplicaIdentity {
    /// Parses the byte pgoutput uses.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'd' => Some(Self::Default),
            b'n' => Some(Self::Nothing),
            b'f' => Some(Self::Full),
            b'i' => Some(Self::Index),
            _ => None,
        }
    }
}

/// One column of a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity key.
    pub is_key: bool,
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier (`atttypmod`).
    pub type_modifier: i32,
}

/// Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Transaction id, inside a streamed block.
    pub xid: Option<u32>,
    /// Relation OID.
    pub oid: u32,
    /// Schema name.
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Replica identity.
    pub replica_identity: ReplicaIdentity,
    /// Published columns in order.
    pub columns: Vec<RelationColumn>,
}

/// Type message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Type {
    /// Transaction id, inside a streamed block.
    pub xid: Option<u32>,
    /// Type OID.
    pub oid: u32,
    /// Schema name.
    pub namespace: String,
    /// Type name.
    pub name: String,
}

/// Insert message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// Transaction id, inside a streamed block.
    pub xid: Option<u32>,
    /// Relation OID.
    pub relation_oid: u32,
    /// The new row.
    pub new: TupleData,
}

/// The old row image in an Update or Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// Only the replica identity key columns (`K`); other columns are null.
    Key(TupleData),
    /// The whole old row (`O`, replica identity full).
    Full(TupleData),
}

impl OldTuple {
    /// The tuple, whichever kind.
    pub fn tuple(&self) -> &TupleData {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

/// Update message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// Transaction id, inside a streamed block.
    pub xid: Option<u32>,
    /// Relation OID.
    pub relation_oid: u32,
    /// The old row or key, when the replica identity provides it.
    pub old: Option<OldTuple>,
    /// The new row.
    pub new: TupleData,
}

/// Delete message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// Transaction id, inside a streamed block.
    pub xid: Option<u32>,
    /// Relation OID.
    pub relation_oid: u32,
    /// The old row or key.
    pub old: OldTuple,
}

/// Truncate message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Transaction id, inside a streamed block.
    pub xid: Option<u32>,
    /// `TRUNCATE … CASCADE`.
    pub cascade: bool,
    /// `TRUNCATE … RESTART IDENTITY`.
    pub restart_identity: bool,
    /// Truncated relations.
    pub relation_oids: Vec<u32>,
}

/// Stream Start message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    /// Top-level transaction id.
    pub xid: u32,
    /// First block of this transaction.
    pub first_segment: bool,
}

/// Stream Commit message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommit {
    /// Top-level transaction id.
    pub xid: u32,
    /// Unused flags.
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01.
    pub commit_time_micros: i64,
}

/// Stream Abort message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbort {
    /// Top-level transaction id.
    pub xid: u32,
    /// Aborted (sub)transaction id; equal to `xid` when the whole transaction aborted.
    pub subxid: u32,
}

/// How one column is present in a tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value that was not sent.
    UnchangedToast,
    /// Text-format value.
    Text,
    /// Binary-format value.
    Binary,
}

/// Where one column's value sits in the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnRef {
    kind: ColumnKind,
    start: u32,
    end: u32,
}

impl ColumnRef {
    pub(super) fn new(kind: ColumnKind, start: usize, end: usize) -> Self {
        // Messages are bounded by Postgres' 1 GB allocation limit, so offsets fit in u32.
        Self {
            kind,
            start: start as u32,
            end: end as u32,
        }
    }
}

/// One column's value, borrowed from the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TupleValue<'a> {
    /// SQL NULL.
    Null,
    /// Unchanged TOASTed value, not sent.
    UnchangedToast,
    /// Text-format value.
    Text(&'a [u8]),
    /// Binary-format value.
    Binary(&'a [u8]),
}

/// TupleData: the columns of one row, referring into the message buffer without copying.
#[derive(Clone, PartialEq, Eq)]
pub struct TupleData {
    buf: Bytes,
    cols: Vec<ColumnRef>,
}

impl std::fmt::Debug for TupleData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl TupleData {
    pub(super) fn new(buf: Bytes, cols: Vec<ColumnRef>) -> Self {
        Self { buf, cols }
    }

    /// Number of columns.
    pub fn len(&self) -> usize {
        self.cols.len()
    }

    /// Whether the tuple has no columns.
    pub fn is_empty(&self) -> bool {
        self.cols.is_empty()
    }

    /// The value of column `i`, if there is one.
    pub fn get(&self, i: usize) -> Option<TupleValue<'_>> {
        let c = self.cols.get(i)?;
        let slice = || &self.buf[c.start as usize..c.end as usize];
        Some(match c.kind {
            ColumnKind::Null => TupleValue::Null,
            ColumnKind::UnchangedToast => TupleValue::UnchangedToast,
            ColumnKind::Text => TupleValue::Text(slice()),
            ColumnKind::Binary => TupleValue::Binary(slice()),
        })
    }

    /// All values in column order.
    pub fn iter(&self) -> impl Iterator<Item = TupleValue<'_>> {
        (0..self.cols.len()).filter_map(|i| self.get(i))
    }
}
