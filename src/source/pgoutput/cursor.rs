//! Checked big-endian reads over one message, with errors that name the field.

use bytes::Bytes;

use super::message::{ColumnKind, ColumnRef, TupleData};
use crate::Lsn;

/// Why a replication or pgoutput message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message had no bytes at all.
    #[error("empty message")]
    Empty,
    /// The first byte is not a known message tag.
    #[error("unknown {context} tag {tag:#04x} ({})", printable(*tag))]
    UnknownTag {
        /// Which layer was decoding.
        context: &'static str,
        /// The byte found.
        tag: u8,
    },
    /// The message ended before a field was complete.
    #[error(
        "message '{}': field '{field}' needs {needed} bytes at offset {offset}, only {available} left",
        printable(*tag)
    )]
    Truncated {
        /// Message tag.
        tag: u8,
        /// Field being read.
        field: &'static str,
        /// Offset of the field.
        offset: usize,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes left in the message.
        available: usize,
    },
    /// A field holds a value outside its domain.
    #[error(
        "message '{}': field '{field}' at offset {offset} has value {found}, expected {expected}",
        printable(*tag)
    )]
    Invalid {
        /// Message tag.
        tag: u8,
        /// Field being read.
        field: &'static str,
        /// Offset of the field.
        offset: usize,
        /// What was found, rendered.
        found: String,
        /// What the protocol allows.
        expected: &'static str,
    },
}

fn printable(b: u8) -> char {
    if b.is_ascii_graphic() { b as char } else { '?' }
}

/// A read position in one message.
pub(super) struct Cursor<'a> {
    buf: &'a Bytes,
    pos: usize,
    tag: u8,
    last_field_at: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(buf: &'a Bytes, tag: u8) -> Self {
        Self {
            buf,
            pos: 0,
            tag,
            last_field_at: 0,
        }
    }

    pub(super) fn skip(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
    }

    pub(super) fn offset(&self) -> usize {
        self.pos
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        self.last_field_at = self.pos;
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                tag: self.tag,
                field,
                offset: self.pos,
                needed: n,
                available: self.remaining(),
            });
        }
        let buf: &'a Bytes = self.buf;
        let s = &buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// An error for the field read last.
    pub(super) fn invalid(&self, field: &'static str, expected: &'static str) -> DecodeError {
        let found = self
            .buf
            .get(self.last_field_at)
            .map(|b| format!("{b:#04x}"))
            .unwrap_or_else(|| "nothing".into());
        DecodeError::Invalid {
            tag: self.tag,
            field,
            offset: self.last_field_at,
            found,
            expected,
        }
    }

    pub(super) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }

    pub(super) fn i16(&mut self, field: &'static str) -> Result<i16, DecodeError> {
        let b = self.take(2, field)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub(super) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(super) fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        Ok(self.u32(field)? as i32)
    }

    pub(super) fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }

    pub(super) fn lsn(&mut self, field: &'static str) -> Result<Lsn, DecodeError> {
        Ok(Lsn(self.i64(field)? as u64))
    }

    /// A NUL-terminated UTF-8 string.
    pub(super) fn cstr(&mut self, field: &'static str) -> Result<String, DecodeError> {
        self.last_field_at = self.pos;
        let rest = &self.buf[self.pos..];
        let Some(end) = memchr::memchr(0, rest) else {
            return Err(DecodeError::Truncated {
                tag: self.tag,
                field,
                offset: self.pos,
                needed: rest.len() + 1,
                available: rest.len(),
            });
        };
        let s = std::str::from_utf8(&rest[..end]).map_err(|e| DecodeError::Invalid {
            tag: self.tag,
            field,
            offset: self.pos,
            found: format!("bytes invalid as UTF-8 after {} bytes", e.valid_up_to()),
            expected: "a UTF-8 string",
        })?;
        let s = s.to_owned();
        self.pos += end + 1;
        Ok(s)
    }

    /// `len` bytes as a cheap slice of the message.
    pub(super) fn bytes(&mut self, len: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        self.take(len, field)?;
        Ok(self.buf.slice(start..start + len))
    }

    /// A TupleData structure: column count, then each column's kind and value.
    pub(super) fn tuple(&mut self) -> Result<TupleData, DecodeError> {
        let n = self.i16("tuple column count")?;
        if n < 0 {
            return Err(self.invalid("tuple column count", "a non-negative count"));
        }
        let mut cols = Vec::with_capacity((n as usize).min(self.remaining()));
        for _ in 0..n {
            let kind = self.u8("tuple column kind")?;
            let col = match kind {
                b'n' => ColumnRef::new(ColumnKind::Null, 0, 0),
                b'u' => ColumnRef::new(ColumnKind::UnchangedToast, 0, 0),
                b't' | b'b' => {
                    let len = self.i32("tuple column length")?;
                    if len < 0 {
                        return Err(self.invalid("tuple column length", "a non-negative length"));
                    }
                    let start = self.pos;
                    self.take(len as usize, "tuple column value")?;
                    let k = if kind == b't' {
                        ColumnKind::Text
                    } else {
                        ColumnKind::Binary
                    };
                    ColumnRef::new(k, start, start + len as usize)
                }
                _ => return Err(self.invalid("tuple column kind", "one of n, u, t, b")),
            };
            cols.push(col);
        }
        Ok(TupleData::new(self.buf.clone(), cols))
    }
}
