//! The change event and its JSON envelope (DESIGN §2).
//!
//! The envelope is Debezium-compatible so that services written for Debezium topics can read
//! ours. It is written by hand rather than through serde because it sits on the hot path of
//! every row: field order is fixed, numbers and embedded JSON are copied as they came from
//! Postgres, and one output buffer is reused for every event.

use std::sync::Arc;

use crate::Lsn;

/// UTF-8 text of a value: up to 24 bytes inline (most keys, numbers, names), longer ones on
/// the heap. A copy, not a slice of the received message, so that an event held downstream
/// does not keep the whole read buffer it came in alive, and moving one costs no reference
/// count.
pub type Text = compact_str::CompactString;

/// A converted column value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// `bool`.
    Bool(bool),
    /// A JSON number, kept as the exact text Postgres sent.
    Number(Text),
    /// A JSON string.
    String(Text),
    /// Embedded JSON (json/jsonb), minified and known to be valid.
    Json(Text),
    /// An array of values.
    Array(Vec<Value>),
}

/// Column names of one relation shape, shared by every row of that shape.
pub type ColumnNames = Arc<[Arc<str>]>;

/// A row: values of some of a relation's columns, in column order. The names are shared with
/// every other row of the relation, so building a row costs one reference count, not one
/// per column.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Row {
    names: ColumnNames,
    fields: Vec<(u16, Value)>,
}

impl Row {
    /// An empty row over `names`, with room for `capacity` values.
    pub fn new(names: ColumnNames, capacity: usize) -> Self {
        Self {
            names,
            fields: Vec::with_capacity(capacity),
        }
    }

    /// A row from name/value pairs (names not shared with anything).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, Value)>) -> Self {
        let (names, values): (Vec<Arc<str>>, Vec<Value>) =
            pairs.into_iter().map(|(n, v)| (Arc::from(n), v)).unzip();
        let mut row = Row::new(names.into(), values.len());
        for (i, v) in values.into_iter().enumerate() {
            row.push(i, v);
        }
        row
    }

    /// Adds the value of column `column` (an index into the names).
    pub fn push(&mut self, column: usize, value: Value) {
        // A relation has at most 1,600 columns.
        self.fields.push((column as u16, value));
    }

    /// The value of the named column.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// The value of column `column`, if the row has it.
    pub fn value_at(&self, column: usize) -> Option<&Value> {
        self.fields
            .iter()
            .find(|(c, _)| usize::from(*c) == column)
            .map(|(_, v)| v)
    }

    /// Name and value of each column present, in column order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.fields
            .iter()
            .map(|(c, v)| (self.names.get(usize::from(*c)).map_or("", |n| &**n), v))
    }

    /// Number of columns present.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// Whether no column is present.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }
}

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Insert (`c`).
    Create,
    /// Update (`u`).
    Update,
    /// Delete (`d`).
    Delete,
    /// Snapshot read (`r`).
    Read,
    /// Truncate (`t`).
    Truncate,
}

impl Op {
    /// The one-letter code of the envelope.
    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Truncate => "t",
        }
    }
}

/// The `source.snapshot` marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMarker {
    /// Streaming (`"false"`).
    False,
    /// Initial load (`"true"`).
    True,
    /// The last row of the initial load (`"last"`).
    Last,
    /// A row read by a forced resync (`"incremental"`).
    Incremental,
}

impl SnapshotMarker {
    /// The envelope's text.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotMarker::False => "false",
            SnapshotMarker::True => "true",
            SnapshotMarker::Last => "last",
            SnapshotMarker::Incremental => "incremental",
        }
    }
}

/// Where the events of one table come from. Shared by reference by every event of the table,
/// with the constant head of its JSON `source` block rendered once.
#[derive(Debug, PartialEq, Eq)]
pub struct TableSource {
    /// The relation's OID at the warehouse (0 when unknown): a mapping follows it across a
    /// rename or a move to another schema.
    oid: u32,
    warehouse_id: Arc<str>,
    db: Arc<str>,
    schema: Arc<str>,
    table: Arc<str>,
    qualified: String,
    header: String,
}

impl TableSource {
    /// Describes table `schema.table` of database `db` in warehouse `warehouse_id`, its
    /// relation OID unknown.
    pub fn new(warehouse_id: &str, db: &str, schema: &str, table: &str) -> Arc<Self> {
        Self::with_oid(warehouse_id, db, schema, table, 0)
    }

    /// Describes table `schema.table` (relation `oid`) of database `db` in warehouse
    /// `warehouse_id`.
    pub fn with_oid(
        warehouse_id: &str,
        db: &str,
        schema: &str,
        table: &str,
        oid: u32,
    ) -> Arc<Self> {
        let mut out = Vec::with_capacity(160);
        out.extend_from_slice(b"{\"version\":\"");
        out.extend_from_slice(env!("CARGO_PKG_VERSION").as_bytes());
        out.extend_from_slice(b"\",\"connector\":\"inventorysync\",\"name\":");
        write_str(&mut out, warehouse_id);
        out.extend_from_slice(b",\"warehouse_id\":");
        write_str(&mut out, warehouse_id);
        out.extend_from_slice(b",\"db\":");
        write_str(&mut out, db);
        out.extend_from_slice(b",\"schema\":");
        write_str(&mut out, schema);
        out.extend_from_slice(b",\"table\":");
        write_str(&mut out, table);
        Arc::new(Self {
            oid,
            warehouse_id: warehouse_id.into(),
            db: db.into(),
            schema: schema.into(),
            table: table.into(),
            qualified: format!("{schema}.{table}"),
            header: String::from_utf8(out).unwrap_or_default(),
        })
    }

    /// The relation's OID at the warehouse (0 when unknown).
    pub fn oid(&self) -> u32 {
        self.oid
    }

    /// Warehouse id.
    pub fn warehouse_id(&self) -> &str {
        &self.warehouse_id
    }

    /// Database name.
    pub fn db(&self) -> &str {
        &self.db
    }

    /// Schema name.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// `schema.table` (rendered once per relation: it is read for every event).
    pub fn qualified_name(&self) -> &str {
        &self.qualified
    }
}

/// Where the event came from: the `source` block.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceInfo {
    /// Warehouse, database and table.
    pub table: Arc<TableSource>,
    /// Commit time in milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// Commit time in microseconds since the Unix epoch (for `committed_at`).
    pub ts_us: i64,
    /// Snapshot marker.
    pub snapshot: SnapshotMarker,
    /// Transaction id; none for snapshot rows.
    pub tx_id: Option<u32>,
    /// LSN of the change (the XLogData start, or the snapshot point).
    pub lsn: Lsn,
    /// LSN of the transaction's commit record (the snapshot point for snapshot rows).
    pub commit_lsn: Lsn,
    /// 0-based index of the change in its transaction.
    pub sequence: u64,
    /// Columns left out of `after` because their TOASTed value did not change.
    pub unchanged_toast: Vec<Arc<str>>,
}

/// The `transaction` block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransactionInfo {
    /// Position of the change among all of its transaction's changes, 1-based.
    pub total_order: u64,
    /// Position among the transaction's changes to the same table, 1-based.
    pub data_collection_order: u64,
}

/// One row change, ready for the bus.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    /// Old row, when the replica identity provides it.
    pub before: Option<Row>,
    /// New row.
    pub after: Option<Row>,
    /// Source block.
    pub source: SourceInfo,
    /// Operation.
    pub op: Op,
    /// Processing time in milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// Transaction block; none for snapshot rows.
    pub transaction: Option<TransactionInfo>,
    /// The key columns and their values (none for truncate).
    pub key: Option<Row>,
}

impl ChangeEvent {
    /// The event's version: `commit_lsn:sequence` in fixed-width hex, ordered like the source.
    pub fn version(&self) -> String {
        format_version(self.source.commit_lsn, self.source.sequence)
    }

    /// Appends the JSON envelope (one line, no trailing newline) to `out`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"before\":");
        write_row(out, self.before.as_ref());
        out.extend_from_slice(b",\"after\":");
        write_row(out, self.after.as_ref());
        let s = &self.source;
        out.extend_from_slice(b",\"source\":");
        out.extend_from_slice(s.table.header.as_bytes());
        out.extend_from_slice(b",\"ts_ms\":");
        write_int(out, s.ts_ms);
        // Debezium 2's microsecond commit time: the central contract's `committed_at`.
        out.extend_from_slice(b",\"ts_us\":");
        write_int(out, s.ts_us);
        out.extend_from_slice(b",\"snapshot\":\"");
        out.extend_from_slice(s.snapshot.as_str().as_bytes());
        out.extend_from_slice(b"\",\"txId\":");
        match s.tx_id {
            Some(x) => write_int(out, x),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"lsn\":");
        write_int(out, s.lsn.0);
        out.extend_from_slice(b",\"commit_lsn\":");
        write_int(out, s.commit_lsn.0);
        out.extend_from_slice(b",\"sequence\":");
        write_int(out, s.sequence);
        out.extend_from_slice(b",\"unchanged_toast\":[");
        for (i, c) in s.unchanged_toast.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_str(out, c);
        }
        out.extend_from_slice(b"]},\"op\":\"");
        out.extend_from_slice(self.op.code().as_bytes());
        out.extend_from_slice(b"\",\"ts_ms\":");
        write_int(out, self.ts_ms);
        out.extend_from_slice(b",\"transaction\":");
        match (&self.transaction, s.tx_id) {
            (Some(t), Some(xid)) => {
                out.extend_from_slice(b"{\"id\":\"");
                write_int(out, xid);
                out.push(b':');
                write_int(out, s.commit_lsn.0);
                out.extend_from_slice(b"\",\"total_order\":");
                write_int(out, t.total_order);
                out.extend_from_slice(b",\"data_collection_order\":");
                write_int(out, t.data_collection_order);
                out.push(b'}');
            }
            _ => out.extend_from_slice(b"null"),
        }
        out.push(b'}');
    }

    /// The event as a JSON string.
    pub fn to_json(&self) -> String {
        let mut out = Vec::with_capacity(512);
        self.write_json(&mut out);
        // Every byte written comes from UTF-8 strings or ASCII literals.
        String::from_utf8(out).unwrap_or_default()
    }

    /// Appends the Kafka key `{"warehouse_id","table","pk"}` to `out`.
    pub fn write_key_json(&self, out: &mut Vec<u8>) {
        let t = &self.source.table;
        out.extend_from_slice(b"{\"warehouse_id\":");
        write_str(out, &t.warehouse_id);
        out.extend_from_slice(b",\"table\":\"");
        escape_into(out, &t.schema);
        out.push(b'.');
        escape_into(out, &t.table);
        out.extend_from_slice(b"\",\"pk\":");
        write_row(out, self.key.as_ref());
        out.push(b'}');
    }
}

/// The fixed-width text form of a position: `{commit_lsn:016X}:{sequence:08X}`.
pub fn format_version(commit_lsn: Lsn, sequence: u64) -> String {
    let mut buf = [0u8; 33];
    let n = crate::lsn::push_upper_hex(&mut buf, 0, commit_lsn.0, 16);
    buf[n] = b':';
    let n = crate::lsn::push_upper_hex(&mut buf, n + 1, sequence, 8);
    // Only ASCII hex digits and ':' were written.
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn write_int(out: &mut Vec<u8>, v: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

fn write_row(out: &mut Vec<u8>, row: Option<&Row>) {
    let Some(row) = row else {
        out.extend_from_slice(b"null");
        return;
    };
    out.push(b'{');
    for (i, (name, value)) in row.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, name);
        out.push(b':');
        write_value(out, value);
    }
    out.push(b'}');
}

/// Appends one value as JSON.
pub fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) | Value::Json(n) => out.extend_from_slice(n.as_bytes()),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
    }
}

/// Appends `s` as a quoted JSON string.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    escape_into(out, s);
    out.push(b'"');
}

const fn needs_escape_table() -> [bool; 256] {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = true;
        i += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
}

static NEEDS_ESCAPE: [bool; 256] = needs_escape_table();

/// Whether any of the 8 bytes is a control character, `"` or `\\` (SWAR: one test per word).
#[inline]
fn word_needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let below_0x20 = w.wrapping_sub(ONES * 0x20) & !w & HIGHS;
    (below_0x20 | has_zero(w ^ (ONES * b'"' as u64)) | has_zero(w ^ (ONES * b'\\' as u64))) != 0
}

fn escape_into(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    // Fast path: most values have nothing to escape; skip them a word at a time.
    let mut clean = 0;
    while clean + 8 <= bytes.len() {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[clean..clean + 8]);
        if word_needs_escape(u64::from_le_bytes(w)) {
            break;
        }
        clean += 8;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate().skip(clean) {
        if !NEEDS_ESCAPE[b as usize] {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(b >> 4) as usize]);
                out.push(HEX[(b & 0xF) as usize]);
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// A small insert into `public.stock_levels` of warehouse `wh`, with `sku` = `SKU-<n>` and
/// `commit_lsn` = `n` (for unit tests of the stages).
#[cfg(test)]
pub(crate) fn test_event(n: u64) -> Box<ChangeEvent> {
    let key = Row::from_pairs([("sku", Value::String(format!("SKU-{n}").into()))]);
    Box::new(ChangeEvent {
        before: None,
        after: Some(key.clone()),
        source: SourceInfo {
            table: TableSource::new("wh", "inv", "public", "stock_levels"),
            ts_ms: 0,
            ts_us: 0,
            snapshot: SnapshotMarker::False,
            tx_id: Some(n as u32),
            lsn: Lsn(n),
            commit_lsn: Lsn(n),
            sequence: 0,
            unchanged_toast: Vec::new(),
        },
        op: Op::Create,
        ts_ms: 0,
        transaction: None,
        key: Some(key),
    })
}

/// What the source hands downstream (through the bus) in source order: row changes, and
/// the end of each transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    /// One row change.
    Change(Box<ChangeEvent>),
    /// Every change of the transaction ending at `end_lsn` has been handed over.
    Commit {
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// LSN just past the commit record: what may be confirmed once delivered.
        end_lsn: Lsn,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_fixed_width_hex_and_widen_only_past_their_width() {
        assert_eq!(format_version(Lsn(0), 0), "0000000000000000:00000000");
        assert_eq!(
            format_version(Lsn(0x16B3748), 0xAB),
            "00000000016B3748:000000AB"
        );
        assert_eq!(
            format_version(Lsn(u64::MAX), 0x1_0000_0000),
            "FFFFFFFFFFFFFFFF:100000000"
        );
    }

    fn sample() -> ChangeEvent {
        let name = |s: &str| -> Arc<str> { Arc::from(s) };
        ChangeEvent {
            before: None,
            after: Some(Row::from_pairs([
                ("sku", Value::String("SKU-\"1\"\n".into())),
                ("qty", Value::Number("5".into())),
                ("attrs", Value::Json("{\"a\":[1,2]}".into())),
                ("tags", Value::Array(vec![Value::Null, Value::Bool(true)])),
            ])),
            source: SourceInfo {
                table: TableSource::new("wh-east", "inv", "public", "stock_levels"),
                ts_ms: 1795557622123,
                ts_us: 1795557622123456,
                snapshot: SnapshotMarker::False,
                tx_id: Some(1234),
                lsn: Lsn(23836472),
                commit_lsn: Lsn(23836600),
                sequence: 3,
                unchanged_toast: vec![name("notes")],
            },
            op: Op::Create,
            ts_ms: 1795557622130,
            transaction: Some(TransactionInfo {
                total_order: 4,
                data_collection_order: 2,
            }),
            key: Some(Row::from_pairs([("sku", Value::String("SKU-1".into()))])),
        }
    }

    #[test]
    fn envelope_has_the_exact_field_names_and_order() {
        let json = sample().to_json();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["after"]["sku"], "SKU-\"1\"\n");
        assert_eq!(v["after"]["attrs"]["a"][1], 2);
        assert_eq!(v["source"]["connector"], "inventorysync");
        assert_eq!(v["source"]["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(v["source"]["warehouse_id"], "wh-east");
        assert_eq!(v["source"]["db"], "inv");
        assert_eq!(v["source"]["schema"], "public");
        assert_eq!(v["source"]["table"], "stock_levels");
        assert_eq!(v["source"]["name"], "wh-east");
        assert_eq!(v["source"]["txId"], 1234);
        assert_eq!(v["source"]["commit_lsn"], 23836600u64);
        assert_eq!(v["source"]["unchanged_toast"][0], "notes");
        assert_eq!(v["transaction"]["id"], "1234:23836600");
        assert_eq!(v["transaction"]["total_order"], 4);
        assert_eq!(v["op"], "c");
        assert!(json.starts_with("{\"before\":null,\"after\":{\"sku\""));
        assert!(!json.contains('\n'));
    }

    #[test]
    fn key_and_version_follow_the_contract() {
        let e = sample();
        let mut k = Vec::new();
        e.write_key_json(&mut k);
        assert_eq!(
            String::from_utf8(k).unwrap(),
            r#"{"warehouse_id":"wh-east","table":"public.stock_levels","pk":{"sku":"SKU-1"}}"#
        );
        assert_eq!(e.version(), "00000000016BB7B8:00000003");
    }

    #[test]
    fn escaping_agrees_with_serde_json_on_every_byte_position() {
        for special in ['"', '\\', '\n', '\u{1}', '\u{1f}', 'é', ' ', '~', '\u{7f}'] {
            for pos in 0..20 {
                let mut s: String = "abcdefghijklmnopqrst".chars().take(pos).collect();
                s.push(special);
                s.push_str("xyz");
                let mut out = Vec::new();
                write_str(&mut out, &s);
                let back: String = serde_json::from_slice(&out).unwrap();
                assert_eq!(back, s);
            }
        }
    }

    #[test]
    fn control_characters_are_escaped() {
        let mut out = Vec::new();
        write_str(&mut out, "a\u{1}b\\");
        assert_eq!(String::from_utf8(out).unwrap(), r#""a\u0001b\\""#);
    }
}

/// The envelope's `too_large` block: the change did not fit in one bus record (Kafka's
/// `message.max.bytes`), so its record carries only the key columns and this; the consumer
/// stage dead-letters it (rule `too_large`) instead of sending central a partial row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TooLarge {
    /// Size of the whole record.
    pub bytes: u64,
    /// The largest record the bus takes.
    pub limit: u64,
    /// The column whose value is the largest.
    pub column: Option<String>,
    /// That value's size, as JSON.
    pub column_bytes: u64,
}

impl TooLarge {
    /// What happened and what to do, for the dead letter and the conflict row.
    pub fn reason(&self) -> String {
        format!(
            "the change's record is {} bytes, above the largest the bus takes ({} bytes, Kafka message.max.bytes){}; the record carries only the key. Raise KAFKA_PROPERTY_MESSAGE_MAX_BYTES (and the topic's max.message.bytes), or leave the column out of the publication",
            self.bytes,
            self.limit,
            match &self.column {
                Some(c) => format!("; column {c:?} holds {} bytes", self.column_bytes),
                None => String::new(),
            }
        )
    }
}
