//! The pgoutput wire format, decoded without I/O.
//!
//! ```text
//!  CopyData payload ──▶ ReplicationMessage::{XLogData, PrimaryKeepalive}
//!                                  │ XLogData.data
//!                                  ▼
//!                        PgOutputDecoder::decode ──▶ LogicalMessage::{Begin, Insert, …}
//! ```
//!
//! Postgres streams logical changes inside `CopyData` messages of the streaming replication
//! protocol (<https://www.postgresql.org/docs/15/protocol-replication.html>); the payload of
//! each `XLogData` is one message of the pgoutput plugin
//! (<https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html>).
//! This module turns bytes into typed messages and nothing else: no sockets, no clocks, so
//! every case is testable by feeding bytes, and a malformed message is an error that names
//! the message tag and the field, never a panic.
//!
//! Protocol versions 1 and 2 are covered. Version 2 adds streamed (in-progress)
//! transactions: inside a Stream Start / Stream Stop block every data message is prefixed by
//! the (sub)transaction id, so the decoder tracks whether it is inside such a block.

mod cursor;
mod message;

pub use cursor::DecodeError;
pub use message::*;

use bytes::Bytes;
use cursor::Cursor;

/// Tag of an `XLogData` replication message.
pub const XLOG_DATA_TAG: u8 = b'w';
/// Tag of a primary keepalive replication message.
pub const PRIMARY_KEEPALIVE_TAG: u8 = b'k';
/// Tag of the standby status update the client sends.
pub const STANDBY_STATUS_UPDATE_TAG: u8 = b'r';

/// Tag of a Begin message.
pub const BEGIN_TAG: u8 = b'B';
/// Tag of a logical decoding Message (`pg_logical_emit_message`).
pub const MESSAGE_TAG: u8 = b'M';
/// Tag of a Commit message.
pub const COMMIT_TAG: u8 = b'C';
/// Tag of an Origin message.
pub const ORIGIN_TAG: u8 = b'O';
/// Tag of a Relation message.
pub const RELATION_TAG: u8 = b'R';
/// Tag of a Type message.
pub const TYPE_TAG: u8 = b'Y';
/// Tag of an Insert message.
pub const INSERT_TAG: u8 = b'I';
/// Tag of an Update message.
pub const UPDATE_TAG: u8 = b'U';
/// Tag of a Delete message.
pub const DELETE_TAG: u8 = b'D';
/// Tag of a Truncate message.
pub const TRUNCATE_TAG: u8 = b'T';
/// Tag of a Stream Start message (protocol 2).
pub const STREAM_START_TAG: u8 = b'S';
/// Tag of a Stream Stop message (protocol 2).
pub const STREAM_STOP_TAG: u8 = b'E';
/// Tag of a Stream Commit message (protocol 2).
pub const STREAM_COMMIT_TAG: u8 = b'c';
/// Tag of a Stream Abort message (protocol 2).
pub const STREAM_ABORT_TAG: u8 = b'A';

/// Microseconds between the Unix epoch and the Postgres epoch (2000-01-01 UTC).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Decodes one `CopyData` payload of a replication stream (the outer framing).
pub fn decode_replication_message(buf: Bytes) -> Result<ReplicationMessage, DecodeError> {
    let mut c = Cursor::new(&buf, b'?');
    let tag = c.u8("replication message tag")?;
    match tag {
        XLOG_DATA_TAG => {
            let mut c = Cursor::new(&buf, tag);
            c.skip(1);
            let wal_start = c.lsn("wal start")?;
            let wal_end = c.lsn("wal end")?;
            let send_time_micros = c.i64("send time")?;
            let offset = c.offset();
            Ok(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                send_time_micros,
                data: buf.slice(offset..),
            })
        }
        PRIMARY_KEEPALIVE_TAG => {
            let mut c = Cursor::new(&buf, tag);
            c.skip(1);
            let wal_end = c.lsn("wal end")?;
            let send_time_micros = c.i64("send time")?;
            let reply_requested = c.u8("reply requested")? != 0;
            Ok(ReplicationMessage::PrimaryKeepalive {
                wal_end,
                send_time_micros,
                reply_requested,
            })
        }
        other => Err(DecodeError::UnknownTag {
            context: "replication message",
            tag: other,
        }),
    }
}

/// Encodes a standby status update (`r`) with the given positions.
pub fn encode_standby_status_update(
    write_lsn: crate::Lsn,
    flush_lsn: crate::Lsn,
    apply_lsn: crate::Lsn,
    client_time_micros: i64,
    reply_requested: bool,
) -> [u8; 34] {
    let mut out = [0u8; 34];
    out[0] = STANDBY_STATUS_UPDATE_TAG;
    out[1..9].copy_from_slice(&write_lsn.0.to_be_bytes());
    out[9..17].copy_from_slice(&flush_lsn.0.to_be_bytes());
    out[17..25].copy_from_slice(&apply_lsn.0.to_be_bytes());
    out[25..33].copy_from_slice(&client_time_micros.to_be_bytes());
    out[33] = u8::from(reply_requested);
    out
}

/// A stateful pgoutput decoder: it remembers whether it is inside a streamed block, where
/// data messages carry a transaction id.
#[derive(Debug, Default, Clone)]
pub struct PgOutputDecoder {
    in_stream_block: bool,
}

impl PgOutputDecoder {
    /// A decoder outside any streamed block.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the last message opened a streamed block that has not been stopped yet.
    pub fn in_stream_block(&self) -> bool {
        self.in_stream_block
    }

    /// Decodes one pgoutput message (the payload of an `XLogData`).
    pub fn decode(&mut self, buf: &Bytes) -> Result<LogicalMessage, DecodeError> {
        let msg = decode_logical_message(buf, self.in_stream_block)?;
        match msg {
            LogicalMessage::StreamStart(_) => self.in_stream_block = true,
            LogicalMessage::StreamStop => self.in_stream_block = false,
            _ => {}
        }
        Ok(msg)
    }
}

/// Decodes one pgoutput message; `in_stream_block` says whether data messages carry an xid.
pub fn decode_logical_message(
    buf: &Bytes,
    in_stream_block: bool,
) -> Result<LogicalMessage, DecodeError> {
    let tag = *buf.first().ok_or(DecodeError::Empty)?;
    let mut c = Cursor::new(buf, tag);
    c.skip(1);
    let stream_xid = |c: &mut Cursor<'_>| -> Result<Option<u32>, DecodeError> {
        if in_stream_block {
            Ok(Some(c.u32("xid")?))
        } else {
            Ok(None)
        }
    };
    let msg = match tag {
        BEGIN_TAG => LogicalMessage::Begin(Begin {
            final_lsn: c.lsn("final lsn")?,
            commit_time_micros: c.i64("commit timestamp")?,
            xid: c.u32("xid")?,
        }),
        COMMIT_TAG => LogicalMessage::Commit(Commit {
            flags: c.u8("flags")?,
            commit_lsn: c.lsn("commit lsn")?,
            end_lsn: c.lsn("end lsn")?,
            commit_time_micros: c.i64("commit timestamp")?,
        }),
        ORIGIN_TAG => LogicalMessage::Origin(Origin {
            commit_lsn: c.lsn("origin commit lsn")?,
            name: c.cstr("origin name")?,
        }),
        MESSAGE_TAG => {
            let xid = stream_xid(&mut c)?;
            let flags = c.u8("flags")?;
            let lsn = c.lsn("lsn")?;
            let prefix = c.cstr("prefix")?;
            let len = c.u32("content length")? as usize;
            let content = c.bytes(len, "content")?;
            LogicalMessage::Message(Message {
                xid,
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content,
            })
        }
        RELATION_TAG => {
            let xid = stream_xid(&mut c)?;
            let oid = c.u32("relation oid")?;
            let namespace = c.cstr("namespace")?;
            let name = c.cstr("relation name")?;
            let identity = ReplicaIdentity::from_byte(c.u8("replica identity")?)
                .ok_or_else(|| c.invalid("replica identity", "one of d, n, f, i"))?;
            let ncols = c.i16("column count")?;
            if ncols < 0 {
                return Err(c.invalid("column count", "a non-negative count"));
            }
            let mut columns = Vec::with_capacity((ncols as usize).min(1600));
            for _ in 0..ncols {
                let flags = c.u8("column flags")?;
                let name = c.cstr("column name")?;
                let type_oid = c.u32("column type oid")?;
                let type_modifier = c.i32("column type modifier")?;
                columns.push(RelationColumn {
                    is_key: flags & 1 == 1,
                    name,
                    type_oid,
                    type_modifier,
                });
            }
            LogicalMessage::Relation(Relation {
                xid,
                oid,
                namespace,
                name,
                replica_identity: identity,
                columns,
            })
        }
        TYPE_TAG => LogicalMessage::Type(Type {
            xid: stream_xid(&mut c)?,
            oid: c.u32("type oid")?,
            namespace: c.cstr("namespace")?,
            name: c.cstr("type name")?,
        }),
        INSERT_TAG => {
            let xid = stream_xid(&mut c)?;
            let relation_oid = c.u32("relation oid")?;
            let kind = c.u8("tuple kind")?;
            if kind != b'N' {
                return Err(c.invalid("tuple kind", "N"));
            }
            LogicalMessage::Insert(Insert {
                xid,
                relation_oid,
                new: c.tuple()?,
            })
        }
        UPDATE_TAG => {
            let xid = stream_xid(&mut c)?;
            let relation_oid = c.u32("relation oid")?;
            let mut old = None;
            let mut kind = c.u8("tuple kind")?;
            if kind == b'K' || kind == b'O' {
                let tuple = c.tuple()?;
                old = Some(if kind == b'K' {
                    OldTuple::Key(tuple)
                } else {
                    OldTuple::Full(tuple)
                });
                kind = c.u8("tuple kind")?;
            }
            if kind != b'N' {
                return Err(c.invalid("tuple kind", "K, O or N"));
            }
            LogicalMessage::Update(Update {
                xid,
                relation_oid,
                old,
                new: c.tuple()?,
            })
        }
        DELETE_TAG => {
            let xid = stream_xid(&mut c)?;
            let relation_oid = c.u32("relation oid")?;
            let kind = c.u8("tuple kind")?;
            let tuple = c.tuple();
            let old = match kind {
                b'K' => OldTuple::Key(tuple?),
                b'O' => OldTuple::Full(tuple?),
                _ => return Err(c.invalid("tuple kind", "K or O")),
            };
            LogicalMessage::Delete(Delete {
                xid,
                relation_oid,
                old,
            })
        }
        TRUNCATE_TAG => {
            let xid = stream_xid(&mut c)?;
            let n = c.u32("relation count")?;
            let options = c.u8("options")?;
            let mut relation_oids = Vec::with_capacity((n as usize).min(c.remaining() / 4));
            for _ in 0..n {
                relation_oids.push(c.u32("relation oid")?);
            }
            LogicalMessage::Truncate(Truncate {
                xid,
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
                relation_oids,
            })
        }
        STREAM_START_TAG => LogicalMessage::StreamStart(StreamStart {
            xid: c.u32("xid")?,
            first_segment: c.u8("first segment")? == 1,
        }),
        STREAM_STOP_TAG => LogicalMessage::StreamStop,
        STREAM_COMMIT_TAG => LogicalMessage::StreamCommit(StreamCommit {
            xid: c.u32("xid")?,
            flags: c.u8("flags")?,
            commit_lsn: c.lsn("commit lsn")?,
            end_lsn: c.lsn("end lsn")?,
            commit_time_micros: c.i64("commit timestamp")?,
        }),
        STREAM_ABORT_TAG => LogicalMessage::StreamAbort(StreamAbort {
            xid: c.u32("xid")?,
            subxid: c.u32("subxid")?,
        }),
        other => {
            return Err(DecodeError::UnknownTag {
                context: "pgoutput message",
                tag: other,
            });
        }
    };
    Ok(msg)
}

#[cfg(test)]
mod tests;
