//! From a change event (the JSON of DESIGN §2) to the central changes of DESIGN §3, and the
//! business rules every change must pass before it is sent.
//!
//! A change from Kafka is read from its JSON envelope; an in-process change from the embedded
//! queue is read column by column from the event itself, each value converted exactly as the
//! envelope would carry it, so both map the same way (a unit test holds the two together).

use std::borrow::Cow;

use base64::Engine;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::settings::{Convert, FieldSource, Rules, TableMapping};
use crate::Lsn;
use crate::central::{Change, ChangeOp, ChangeSource, Entity};
use crate::event::{ChangeEvent, Row, Value as EventValue};
use crate::time::format_unix_micros;

/// The parts of a change event the consumer stage reads.
#[derive(Debug, Clone, Deserialize)]
pub struct EventView {
    /// Old row (key columns or the full row), if any.
    pub before: Option<Map<String, Value>>,
    /// New row, if any.
    pub after: Option<Map<String, Value>>,
    /// Origin.
    pub source: SourceView,
    /// `c`, `u`, `d`, `r` or `t`.
    pub op: String,
}

/// The event's `source` block.
#[derive(Debug, Clone, Deserialize)]
pub struct SourceView {
    /// Warehouse id.
    pub warehouse_id: String,
    /// Schema.
    pub schema: String,
    /// Table.
    pub table: String,
    /// Commit time in milliseconds.
    #[serde(default)]
    pub ts_ms: i64,
    /// Commit time in microseconds (newer events).
    #[serde(default)]
    pub ts_us: Option<i64>,
    /// `"false"`, `"true"`, `"last"` or `"incremental"`.
    pub snapshot: String,
    /// LSN of the change.
    pub lsn: u64,
    /// LSN of the commit.
    pub commit_lsn: u64,
    /// Index within the transaction.
    pub sequence: u64,
}

impl EventView {
    /// Parses an event; the error says what is missing or malformed.
    pub fn parse(raw: &[u8]) -> Result<Self, Violation> {
        parse_event(raw)
    }

    /// The view of an in-process event, with only the columns `m` reads (no JSON text in
    /// between: values convert as the JSON envelope would parse).
    pub fn from_event(ev: &ChangeEvent, m: &TableMapping) -> Self {
        let row = |r: &Row| {
            let mut out = Map::new();
            for (name, v) in r.iter() {
                if m.key.iter().chain(&m.data).any(|(_, f)| f.column == name) {
                    out.insert(name.to_string(), json_value(v));
                }
            }
            out
        };
        let t = &ev.source.table;
        EventView {
            before: ev.before.as_ref().map(row),
            after: ev.after.as_ref().map(row),
            source: SourceView {
                warehouse_id: t.warehouse_id().to_string(),
                schema: t.schema().to_string(),
                table: t.table().to_string(),
                ts_ms: ev.source.ts_ms,
                ts_us: Some(ev.source.ts_us),
                snapshot: ev.source.snapshot.as_str().to_string(),
                lsn: ev.source.lsn.0,
                commit_lsn: ev.source.commit_lsn.0,
                sequence: ev.source.sequence,
            },
            op: ev.op.code().to_string(),
        }
    }

    /// The version of DESIGN §2.
    pub fn version(&self) -> String {
        crate::event::format_version(Lsn(self.source.commit_lsn), self.source.sequence)
    }
}

/// A change event read from its JSON envelope (a Kafka record) without copying it: strings
/// borrow from the record, and the rows' columns stay raw JSON text until the mapping reads
/// one (a stock level reads four columns; the rest of the row is only scanned).
#[derive(Debug, Deserialize)]
pub struct RawEvent<'a> {
    /// Old row (key columns or the full row), if any.
    #[serde(borrow)]
    pub before: Option<RawRow<'a>>,
    /// New row, if any.
    #[serde(borrow)]
    pub after: Option<RawRow<'a>>,
    /// Origin.
    #[serde(borrow)]
    pub source: RawSource<'a>,
    /// `c`, `u`, `d`, `r` or `t`.
    #[serde(borrow)]
    pub op: Cow<'a, str>,
    /// Set when the change did not fit in a bus record: the rows hold only its key.
    #[serde(default)]
    pub too_large: Option<crate::event::TooLarge>,
}

impl<'a> RawEvent<'a> {
    /// Parses an event; the error says what is missing or malformed.
    pub fn parse(raw: &'a [u8]) -> Result<Self, Violation> {
        parse_event(raw)
    }
}

/// Reads a record's JSON envelope as `T`; a record that is not one breaks `event_format`.
fn parse_event<'a, T: Deserialize<'a>>(raw: &'a [u8]) -> Result<T, Violation> {
    crate::json::from_bytes(raw).map_err(|e| Violation {
        rule: "event_format",
        field: None,
        reason: format!("not a change event: {e}"),
    })
}

/// The `source` block of a [`RawEvent`].
#[derive(Debug, Deserialize)]
pub struct RawSource<'a> {
    /// Schema.
    #[serde(borrow)]
    pub schema: Cow<'a, str>,
    /// Table.
    #[serde(borrow)]
    pub table: Cow<'a, str>,
    /// Commit time in milliseconds.
    #[serde(default)]
    pub ts_ms: i64,
    /// Commit time in microseconds (newer events).
    #[serde(default)]
    pub ts_us: Option<i64>,
    /// `"false"`, `"true"`, `"last"` or `"incremental"`.
    #[serde(borrow)]
    pub snapshot: Cow<'a, str>,
    /// LSN of the change.
    pub lsn: u64,
    /// LSN of the commit.
    pub commit_lsn: u64,
    /// Index within the transaction.
    pub sequence: u64,
    /// Columns of `after` left out because their TOASTed value did not change.
    #[serde(default, borrow)]
    pub unchanged_toast: Vec<Cow<'a, str>>,
}

/// A row of a [`RawEvent`]: column names and their values as raw JSON text, in the
/// envelope's order.
#[derive(Debug, Default)]
pub struct RawRow<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for RawRow<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Name<'a>(Cow<'a, str>);
        impl<'de: 'a, 'a> Deserialize<'de> for Name<'a> {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = Name<'de>;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("a column name")
                    }
                    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                        Ok(Name(Cow::Borrowed(v)))
                    }
                    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                        // A name with escapes cannot borrow from the record.
                        Ok(Name(Cow::Owned(v.to_string())))
                    }
                }
                d.deserialize_str(V)
            }
        }
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawRow<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a row: an object of columns")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut columns = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(Name(name)) = map.next_key()? {
                    columns.push((name, map.next_value::<&'de RawValue>()?));
                }
                Ok(RawRow(columns))
            }
        }
        d.deserialize_map(V)
    }
}

impl Columns for RawRow<'_> {
    fn column(&self, name: &str) -> Option<Cow<'_, Value>> {
        let raw = self.0.iter().find(|(n, _)| n == name)?.1;
        // The text was checked as JSON when the record was parsed.
        Some(Cow::Owned(
            serde_json::from_str(raw.get()).unwrap_or(Value::Null),
        ))
    }
}

/// An event value as JSON, exactly as parsing the envelope would give it.
pub(crate) fn json_value(v: &EventValue) -> Value {
    match v {
        EventValue::Null => Value::Null,
        EventValue::Bool(b) => Value::Bool(*b),
        EventValue::String(s) => Value::String(s.to_string()),
        // Most numbers are integers: no JSON parser for those.
        EventValue::Number(t) => match t.parse::<i64>() {
            Ok(n) => Value::from(n),
            Err(_) => serde_json::from_str(t).unwrap_or_else(|_| Value::String(t.to_string())),
        },
        EventValue::Json(t) => {
            serde_json::from_str(t).unwrap_or_else(|_| Value::String(t.to_string()))
        }
        EventValue::Array(items) => Value::Array(items.iter().map(json_value).collect()),
    }
}

/// A rule a change broke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Rule name (`key_present`, `quantity_integer`, `quantity_non_negative`,
    /// `reserved_le_on_hand`, `string_length`, `sku_pattern`, `utf8`, `event_format`).
    pub rule: &'static str,
    /// The central field concerned.
    pub field: Option<String>,
    /// What was found and what was expected.
    pub reason: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "rule {} on field {field}: {}", self.rule, self.reason),
            None => write!(f, "rule {}: {}", self.rule, self.reason),
        }
    }
}

fn violation(rule: &'static str, field: &str, reason: String) -> Violation {
    Violation {
        rule,
        field: Some(field.to_string()),
        reason,
    }
}

/// A central change mapped, checked and rendered: what the stage needs of it to route, order
/// and settle it. The change itself is its JSON, rendered once into the caller's buffer at
/// `json` (byte for byte what `serde_json` writes for the [`Change`]); [`MappedChange::full`]
/// reads it back for the rare paths that need all of it (a conflict, TOAST values read back).
/// No map of its data fields is built or dropped per change.
#[derive(Debug, Clone, PartialEq)]
pub struct MappedChange {
    /// Entity kind.
    pub entity: Entity,
    /// Upsert or delete.
    pub op: ChangeOp,
    /// Its entity and key, hashed (see [`key_hash`]): which lane it takes.
    pub key_hash: u64,
    /// Where its key's JSON object is in its JSON.
    pub key: std::ops::Range<usize>,
    /// The event's version (`{commit_lsn:016X}:{sequence:08X}`).
    pub version: String,
    /// Whether a snapshot (initial load, resync) read it.
    pub snapshot: bool,
    /// Commit time, microseconds since the Unix epoch.
    pub committed_micros: i64,
    /// Data fields (indices into the mapping's) the row did not hold: left out of the JSON.
    pub missing: Vec<usize>,
    /// Where its JSON is in the buffer that holds it (the one it was rendered into, until the
    /// stage moves it).
    pub json: std::ops::Range<usize>,
}

impl MappedChange {
    /// Its key (`json`: what was rendered for it).
    pub fn key_value(&self, json: &[u8]) -> Value {
        json.get(self.key.clone())
            .and_then(|k| serde_json::from_slice(k).ok())
            .unwrap_or_else(|| Value::Object(Map::new()))
    }

    /// Its key as JSON text (`json`: what was rendered for it), for the log.
    pub fn key_text<'a>(&self, json: &'a [u8]) -> &'a str {
        json.get(self.key.clone())
            .and_then(|k| std::str::from_utf8(k).ok())
            .unwrap_or_default()
    }

    /// The whole change, read back from its JSON (`json`: what was rendered for it).
    pub fn full(&self, json: &[u8]) -> Change {
        serde_json::from_slice(json).unwrap_or_else(|_| Change {
            // Not reached: the JSON is ours, written from a Change's fields.
            entity: self.entity,
            op: self.op,
            key: match self.key_value(json) {
                Value::Object(k) => k,
                _ => Map::new(),
            },
            data: None,
            version: self.version.clone(),
            source: ChangeSource {
                table: String::new(),
                lsn: String::new(),
                committed_at: format_unix_micros(self.committed_micros),
                snapshot: self.snapshot,
            },
        })
    }
}

/// What a mapped event becomes.
#[derive(Debug, Clone, PartialEq)]
pub enum Mapped {
    /// Central changes to send (two when an update moved the row to a new key), rendered.
    Changes(Vec<MappedChange>),
    /// A truncate: central cannot express it; recorded for an operator.
    Truncate,
}

/// Maps `ev` with `m` and checks `rules`; the changes' JSON goes to the end of `out`.
pub fn map_event(
    ev: &RawEvent<'_>,
    m: &TableMapping,
    rules: &Rules,
    out: &mut Vec<u8>,
) -> Result<Mapped, Violation> {
    let table = format!("{}.{}", ev.source.schema, ev.source.table);
    let origin = Origin {
        op: &ev.op,
        table: &table,
        lsn: ev.source.lsn,
        commit_lsn: ev.source.commit_lsn,
        sequence: ev.source.sequence,
        micros: ev
            .source
            .ts_us
            .unwrap_or(ev.source.ts_ms.saturating_mul(1000)),
        snapshot: ev.source.snapshot != "false",
    };
    map_rows(
        &origin,
        ev.before.as_ref(),
        ev.after.as_ref(),
        m,
        rules,
        out,
    )
}

/// Maps an in-process event the way [`map_event`] maps its JSON envelope, reading only the
/// mapped columns (no view of the whole event is built).
pub fn map_change_event(
    ev: &ChangeEvent,
    m: &TableMapping,
    rules: &Rules,
    out: &mut Vec<u8>,
) -> Result<Mapped, Violation> {
    let origin = Origin {
        op: ev.op.code(),
        table: ev.source.table.qualified_name(),
        lsn: ev.source.lsn.0,
        commit_lsn: ev.source.commit_lsn.0,
        sequence: ev.source.sequence,
        micros: ev.source.ts_us,
        snapshot: ev.source.snapshot.as_str() != "false",
    };
    map_rows(
        &origin,
        ev.before.as_ref(),
        ev.after.as_ref(),
        m,
        rules,
        out,
    )
}

struct Origin<'a> {
    op: &'a str,
    table: &'a str,
    lsn: u64,
    commit_lsn: u64,
    sequence: u64,
    micros: i64,
    snapshot: bool,
}

/// A row's columns by name, as JSON values.
trait Columns {
    /// The column's value, if the row has it.
    fn column(&self, name: &str) -> Option<Cow<'_, Value>>;
}

impl Columns for Map<String, Value> {
    fn column(&self, name: &str) -> Option<Cow<'_, Value>> {
        self.get(name).map(Cow::Borrowed)
    }
}

impl Columns for Row {
    fn column(&self, name: &str) -> Option<Cow<'_, Value>> {
        self.get(name).map(|v| Cow::Owned(json_value(v)))
    }
}

/// Data fields by name (the mapping's, and those the rules compute), each once.
type Fields<'m> = Vec<(&'m str, Value)>;

fn map_rows<R: Columns>(
    ev: &Origin<'_>,
    before: Option<&R>,
    after: Option<&R>,
    m: &TableMapping,
    rules: &Rules,
    out: &mut Vec<u8>,
) -> Result<Mapped, Violation> {
    let version = crate::event::format_version(Lsn(ev.commit_lsn), ev.sequence);
    let mut rendered = |op: ChangeOp,
                        key: &[(&str, Value)],
                        data: Option<&[(&str, Value)]>,
                        missing: Vec<usize>,
                        version: String| {
        let start = out.len();
        let key_at = render(out, m.entity, op, key, data, &version, ev);
        MappedChange {
            entity: m.entity,
            op,
            key_hash: key_hash(m.entity.as_str(), key.iter().map(|(n, v)| (*n, v))),
            key: key_at.start - start..key_at.end - start,
            version,
            snapshot: ev.snapshot,
            committed_micros: ev.micros,
            missing,
            json: start..out.len(),
        }
    };
    match ev.op {
        "t" => Ok(Mapped::Truncate),
        "d" => {
            let row = before.ok_or_else(|| {
                violation(
                    "key_present",
                    "key",
                    "a delete without the old row's key columns (check the replica identity)"
                        .into(),
                )
            })?;
            let key = key_fields(&m.key, row, rules)?;
            Ok(Mapped::Changes(vec![rendered(
                ChangeOp::Delete,
                &key,
                None,
                Vec::new(),
                version,
            )]))
        }
        "c" | "u" | "r" => {
            let row = after.ok_or_else(|| {
                violation(
                    "key_present",
                    "key",
                    format!("op {:?} without a new row", ev.op),
                )
            })?;
            let key = key_fields(&m.key, row, rules)?;
            let mut missing = Vec::new();
            let mut data = field_values(&m.data, row, rules, false, Some(&mut missing))?;
            check_data(m.entity, &mut data, rules)?;
            // A field the rules filled in is not missing.
            missing.retain(|&f| !data.iter().any(|(n, _)| *n == m.data[f].0));
            data.sort_unstable_by(|a, b| a.0.cmp(b.0));
            if let Some(sku_pattern) = &rules.sku_pattern
                && let Some((_, sku)) = key.iter().chain(data.iter()).find(|(n, _)| *n == "sku")
            {
                let text = sku.as_str().unwrap_or_default();
                if !sku_pattern.is_match(text) {
                    return Err(violation(
                        "sku_pattern",
                        "sku",
                        format!("{sku} does not match {:?}", sku_pattern.as_str()),
                    ));
                }
            }
            // An update that changed the key columns moves the entity: the old key goes.
            if ev.op == "u"
                && let Some(before) = before
                && let Ok(old_key) = key_fields(&m.key, before, rules)
                && old_key != key
            {
                let gone = rendered(
                    ChangeOp::Delete,
                    &old_key,
                    None,
                    Vec::new(),
                    version.clone(),
                );
                let moved = rendered(ChangeOp::Upsert, &key, Some(&data), missing, version);
                return Ok(Mapped::Changes(vec![gone, moved]));
            }
            Ok(Mapped::Changes(vec![rendered(
                ChangeOp::Upsert,
                &key,
                Some(&data),
                missing,
                version,
            )]))
        }
        other => Err(Violation {
            rule: "event_format",
            field: Some("op".into()),
            reason: format!("unknown op {other:?}; expected c, u, d, r or t"),
        }),
    }
}

/// Writes a change's JSON as `serde_json` writes the [`Change`] (fields in declaration order,
/// map keys sorted), without building it; returns where its key's object went. Writing into a
/// `Vec` cannot fail.
fn render(
    out: &mut Vec<u8>,
    entity: Entity,
    op: ChangeOp,
    key: &[(&str, Value)],
    data: Option<&[(&str, Value)]>,
    version: &str,
    ev: &Origin<'_>,
) -> std::ops::Range<usize> {
    use std::io::Write;
    fn object(out: &mut Vec<u8>, fields: &[(&str, Value)]) {
        out.push(b'{');
        for (i, (name, value)) in fields.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let _ = serde_json::to_writer(&mut *out, name);
            out.push(b':');
            let _ = serde_json::to_writer(&mut *out, value);
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"{\"entity\":");
    let _ = serde_json::to_writer(&mut *out, &entity);
    out.extend_from_slice(b",\"op\":");
    let _ = serde_json::to_writer(&mut *out, &op);
    out.extend_from_slice(b",\"key\":");
    let key_start = out.len();
    object(out, key);
    let key_at = key_start..out.len();
    out.extend_from_slice(b",\"data\":");
    match data {
        None => out.extend_from_slice(b"null"),
        Some(fields) => object(out, fields),
    }
    out.extend_from_slice(b",\"version\":");
    let _ = serde_json::to_writer(&mut *out, version);
    out.extend_from_slice(b",\"source\":{\"table\":");
    let _ = serde_json::to_writer(&mut *out, ev.table);
    let _ = write!(
        out,
        ",\"lsn\":\"{}\",\"committed_at\":\"{}\",\"snapshot\":{}}}}}",
        Lsn(ev.lsn),
        format_unix_micros(ev.micros),
        ev.snapshot
    );
    key_at
}

/// An entity's key, hashed: a fixed-seed hash over the entity and the key's fields in name
/// order (one key always lands in one lane; foldhash reads eight bytes at a time where FNV-1a
/// took one). Stored lane positions (`consumer_lanes`) depend on it: it must not change.
pub(crate) fn key_hash<'a>(
    entity: &str,
    key: impl IntoIterator<Item = (&'a str, &'a Value)>,
) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = foldhash::fast::FixedState::with_seed(0x1a7e).build_hasher();
    h.write(entity.as_bytes());
    for (k, v) in key {
        h.write_u8(0xff);
        h.write(k.as_bytes());
        h.write_u8(0xfe);
        match v {
            Value::String(s) => h.write(s.as_bytes()),
            Value::Number(n) => match n.as_i64() {
                Some(i) => h.write_i64(i),
                None => h.write(n.to_string().as_bytes()),
            },
            other => h.write(other.to_string().as_bytes()),
        }
    }
    h.finish()
}

/// The key fields of `row`, in name order: each must be present and non-empty.
fn key_fields<'m, R: Columns>(
    spec: &'m [(String, FieldSource)],
    row: &R,
    rules: &Rules,
) -> Result<Fields<'m>, Violation> {
    let mut key = field_values(spec, row, rules, true, None)?;
    key.sort_unstable_by(|a, b| a.0.cmp(b.0));
    Ok(key)
}

/// Reads the mapped fields from `row`; key fields must be present and non-empty. A data field
/// the row does not hold (unchanged TOAST, or not in the row) is left out, its index noted in
/// `missing`.
fn field_values<'m, R: Columns>(
    spec: &'m [(String, FieldSource)],
    row: &R,
    rules: &Rules,
    is_key: bool,
    mut missing: Option<&mut Vec<usize>>,
) -> Result<Fields<'m>, Violation> {
    let mut out = Vec::with_capacity(spec.len() + 1);
    for (i, (name, src)) in spec.iter().enumerate() {
        let value = match row.column(&src.column) {
            Some(v) => v,
            None if is_key => {
                return Err(violation(
                    "key_present",
                    name,
                    format!("key column {:?} is missing from the row", src.column),
                ));
            }
            // Unchanged TOAST (listed in source.unchanged_toast) or not in the row.
            None => {
                if let Some(m) = missing.as_deref_mut() {
                    m.push(i);
                }
                continue;
            }
        };
        let value = checked_value(name, src, value, rules)?;
        if is_key {
            let empty = match &value {
                Value::Null => true,
                Value::String(s) => s.trim().is_empty(),
                _ => false,
            };
            if empty {
                return Err(violation(
                    "key_present",
                    name,
                    format!(
                        "key column {:?} is {value}; a key must not be empty",
                        src.column
                    ),
                ));
            }
        }
        out.push((name.as_str(), value));
    }
    Ok(out)
}

/// Converts one mapped field's value and checks the string-length rule; the stage uses it
/// for values read back from the warehouse too (unchanged TOAST).
pub(crate) fn checked_value(
    name: &str,
    src: &FieldSource,
    value: Cow<'_, Value>,
    rules: &Rules,
) -> Result<Value, Violation> {
    let value = convert(name, &src.column, value, src.convert)?;
    if let Value::String(s) = &value {
        let chars = s.chars().count();
        if chars > rules.max_string_chars {
            return Err(violation(
                "string_length",
                name,
                format!(
                    "column {:?} holds {chars} characters; at most {} are allowed",
                    src.column, rules.max_string_chars
                ),
            ));
        }
    }
    Ok(value)
}

fn convert(name: &str, column: &str, v: Cow<'_, Value>, how: Convert) -> Result<Value, Violation> {
    match how {
        Convert::AsIs => Ok(v.into_owned()),
        Convert::ByteaUtf8 => match v.as_ref() {
            Value::Null => Ok(Value::Null),
            Value::String(b64) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| {
                        violation(
                            "utf8",
                            name,
                            format!("column {column:?} is not bytea (base64): {e}"),
                        )
                    })?;
                String::from_utf8(bytes).map(Value::String).map_err(|e| {
                    violation(
                        "utf8",
                        name,
                        format!(
                            "column {column:?} is not valid UTF-8 text: invalid byte at offset {}",
                            e.utf8_error().valid_up_to()
                        ),
                    )
                })
            }
            other => Err(violation(
                "utf8",
                name,
                format!("column {column:?} holds {other}, not bytea"),
            )),
        },
    }
}

/// Quantities are integers ≥ 0; for stock levels `reserved ≤ on_hand` and
/// `available = on_hand - reserved`.
fn check_data(entity: Entity, data: &mut Fields<'_>, rules: &Rules) -> Result<(), Violation> {
    fn get<'a>(data: &'a Fields<'_>, name: &str) -> Option<&'a Value> {
        data.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
    fn set(data: &mut Fields<'_>, name: &'static str, value: Value) {
        match data.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => *v = value,
            None => data.push((name, value)),
        }
    }
    for q in &rules.quantity_fields {
        let Some((_, v)) = data.iter_mut().find(|(n, _)| *n == q.as_str()) else {
            continue;
        };
        let n = integer(v)
            .ok_or_else(|| violation("quantity_integer", q, format!("{v} is not an integer")))?;
        if n < 0 {
            return Err(violation(
                "quantity_non_negative",
                q,
                format!("{n} is negative; quantities must be >= 0"),
            ));
        }
        *v = Value::from(n);
    }
    if entity == Entity::StockLevel {
        let on_hand = get(data, "on_hand")
            .and_then(integer)
            .ok_or_else(|| violation("quantity_integer", "on_hand", "on_hand is missing".into()))?;
        let reserved = get(data, "reserved").and_then(integer).unwrap_or(0);
        if reserved > on_hand {
            return Err(violation(
                "reserved_le_on_hand",
                "reserved",
                format!("reserved {reserved} exceeds on_hand {on_hand}"),
            ));
        }
        set(data, "reserved", Value::from(reserved));
        set(data, "available", Value::from(on_hand - reserved));
    }
    Ok(())
}

/// An integer from a JSON number or an exact numeric string (`"12"`, `"12.00"`).
fn integer(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| f as i64)
        }),
        Value::String(s) => {
            let (int, frac) = s.split_once('.').unwrap_or((s, ""));
            if frac.bytes().all(|b| b == b'0') {
                int.parse().ok()
            } else {
                None
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::consumer::settings::ConsumerSettings;

    fn settings() -> ConsumerSettings {
        let file = toml::from_str(crate::consumer::settings::TEST_MAPPING).expect("toml");
        ConsumerSettings::from_file(file).expect("valid")
    }

    fn event(op: &str, before: Value, after: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "before": before, "after": after, "op": op,
            "source": {"warehouse_id": "wh", "schema": "public", "table": "stock_levels",
                       "ts_ms": 1795557622123i64, "ts_us": 1795557622123456i64, "snapshot": "false",
                       "lsn": 100, "commit_lsn": 0x16B3748, "sequence": 3}
        }))
        .expect("event")
    }

    /// Each change of `mapped` read back whole from its JSON in `out`, which must be
    /// byte for byte what serde_json writes for it.
    fn whole(mapped: Mapped, out: &[u8]) -> Vec<Change> {
        let Mapped::Changes(changes) = mapped else {
            panic!("changes")
        };
        changes
            .iter()
            .map(|c| {
                let json = &out[c.json.clone()];
                let full = c.full(json);
                assert_eq!(
                    String::from_utf8_lossy(&serde_json::to_vec(&full).expect("json")),
                    String::from_utf8_lossy(json),
                    "rendered as serde_json renders the change"
                );
                assert_eq!(
                    (
                        full.entity,
                        full.op,
                        Value::Object(full.key.clone()),
                        &full.version
                    ),
                    (c.entity, c.op, c.key_value(json), &c.version)
                );
                let key: Vec<(&str, &Value)> =
                    full.key.iter().map(|(k, v)| (k.as_str(), v)).collect();
                assert_eq!(c.key_hash, key_hash(c.entity.as_str(), key));
                assert_eq!(full.source.snapshot, c.snapshot);
                full
            })
            .collect()
    }

    fn map_raw(op: &str, before: Value, after: Value) -> Result<Mapped, Violation> {
        let s = settings();
        map_event(
            &RawEvent::parse(&event(op, before, after)).expect("parses"),
            &s.mappings["public.stock_levels"],
            &s.rules,
            &mut Vec::new(),
        )
    }

    fn map(op: &str, before: Value, after: Value) -> Result<Vec<Change>, Violation> {
        let s = settings();
        let mut out = b"(what came before)".to_vec();
        let mapped = map_event(
            &RawEvent::parse(&event(op, before, after)).expect("parses"),
            &s.mappings["public.stock_levels"],
            &s.rules,
            &mut out,
        )?;
        Ok(whole(mapped, &out))
    }

    #[test]
    fn a_stock_level_maps_to_the_contract_with_available_computed() {
        let c = map(
            "u",
            json!({"sku": "SKU-1", "location_code": "A-01"}),
            json!({"sku": "SKU-1", "location_code": "A-01", "qty_on_hand": 5, "qty_reserved": "1", "raw": "b2s="}),
        )
        .expect("maps");
        assert_eq!(c.len(), 1);
        let got = serde_json::to_value(&c[0]).expect("json");
        assert_eq!(
            got,
            json!({"entity": "stock_level", "op": "upsert",
                   "key": {"sku": "SKU-1", "location": "A-01"},
                   "data": {"on_hand": 5, "reserved": 1, "available": 4, "label": "ok"},
                   "version": "00000000016B3748:00000003",
                   "source": {"table": "public.stock_levels", "lsn": "0/64",
                              "committed_at": "2026-11-24T22:00:22.123456Z", "snapshot": false}})
        );
    }

    #[test]
    fn a_delete_uses_the_old_key_and_a_key_change_deletes_the_old_entity() {
        let d = map(
            "d",
            json!({"sku": "SKU-1", "location_code": "A-01"}),
            Value::Null,
        )
        .expect("delete maps");
        assert_eq!((d[0].op, d[0].data.is_none()), (ChangeOp::Delete, true));
        let moved = map(
            "u",
            json!({"sku": "SKU-1", "location_code": "A-01"}),
            json!({"sku": "SKU-1", "location_code": "B-02", "qty_on_hand": 1}),
        )
        .expect("update maps");
        assert_eq!(moved.len(), 2);
        assert_eq!(moved[0].op, ChangeOp::Delete);
        assert_eq!(moved[0].key["location"], "A-01");
        assert_eq!(moved[1].key["location"], "B-02");
    }

    #[test]
    fn poison_rows_name_the_rule_the_field_and_the_value() {
        let row = |extra: Value| {
            let mut r = json!({"sku": "SKU-1", "location_code": "A-01", "qty_on_hand": 5});
            for (k, v) in extra.as_object().expect("object") {
                r[k] = v.clone();
            }
            r
        };
        let cases = [
            (
                row(json!({"qty_on_hand": -3})),
                "quantity_non_negative",
                "-3",
            ),
            (
                row(json!({"qty_on_hand": 5, "qty_reserved": 7})),
                "reserved_le_on_hand",
                "reserved 7 exceeds on_hand 5",
            ),
            (
                row(json!({"qty_on_hand": "2.5"})),
                "quantity_integer",
                "2.5",
            ),
            (row(json!({"sku": ""})), "key_present", "must not be empty"),
            (row(json!({"sku": null})), "key_present", "null"),
            (row(json!({"sku": "BAD-1"})), "sku_pattern", "BAD-1"),
            (
                row(json!({"location_code": "x".repeat(11)})),
                "string_length",
                "11 characters",
            ),
            // 0xC3 0x28: not UTF-8.
            (row(json!({"raw": "wyg="})), "utf8", "not valid UTF-8"),
        ];
        for (after, rule, text) in cases {
            let v = map("c", Value::Null, after.clone()).expect_err(&after.to_string());
            assert_eq!(v.rule, rule, "{after}: {v:?}");
            assert!(v.reason.contains(text), "{after}: {v:?}");
        }
        let missing = map("c", Value::Null, json!({"sku": "SKU-1", "qty_on_hand": 1}))
            .expect_err("no location");
        assert_eq!(
            (missing.rule, missing.field.as_deref()),
            ("key_present", Some("location"))
        );
    }

    #[test]
    fn an_in_process_event_maps_as_its_json_envelope_does() {
        use crate::event::{Op, Row, SnapshotMarker, SourceInfo, TableSource, Value as V};
        let s = settings();
        let m = &s.mappings["public.stock_levels"];
        let ev = ChangeEvent {
            before: Some(Row::from_pairs([
                ("sku", V::String("SKU-1".into())),
                ("location_code", V::String("A-01".into())),
            ])),
            after: Some(Row::from_pairs([
                ("sku", V::String("SKU-1".into())),
                ("location_code", V::String("B-02".into())),
                ("qty_on_hand", V::Number("12".into())),
                ("qty_reserved", V::Number("2.00".into())),
                ("raw", V::String("b2s=".into())),
                ("notes", V::Json("{\"a\":[1,2]}".into())),
            ])),
            source: SourceInfo {
                table: TableSource::new("wh", "inv", "public", "stock_levels"),
                ts_ms: 1_795_557_622_123,
                ts_us: 1_795_557_622_123_456,
                snapshot: SnapshotMarker::False,
                tx_id: Some(7),
                lsn: Lsn(100),
                commit_lsn: Lsn(200),
                sequence: 4,
                unchanged_toast: vec![],
            },
            op: Op::Update,
            ts_ms: 0,
            transaction: None,
            key: None,
        };
        let all_ways = |ev: &ChangeEvent| {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let direct = map_change_event(ev, m, &s.rules, &mut a);
            let json = ev.to_json();
            let via_json = map_event(
                &RawEvent::parse(json.as_bytes()).expect("json"),
                m,
                &s.rules,
                &mut b,
            );
            assert_eq!(direct, via_json);
            assert_eq!(String::from_utf8_lossy(&a), String::from_utf8_lossy(&b));
            direct.map(|d| whole(d, &a))
        };
        let c = all_ways(&ev).expect("maps");
        assert_eq!(c.len(), 2, "a key move: delete and upsert");
        assert_eq!(c[1].data.as_ref().expect("data")["available"], 10);
        // A poison row is refused the same way on both paths.
        let mut poison = ev.clone();
        poison.after = Some(Row::from_pairs([
            ("sku", V::String("SKU-1".into())),
            ("location_code", V::String("B-02".into())),
            ("qty_on_hand", V::Number("-4".into())),
        ]));
        let refused = all_ways(&poison).expect_err("negative quantity");
        assert_eq!(refused.rule, "quantity_non_negative");
    }

    #[test]
    fn a_record_is_read_in_place_and_a_malformed_one_names_the_problem() {
        // Column names with escapes cannot borrow from the record; they still match.
        let raw = br#"{"before":null,"after":{"s\u006bu":"SKU-9","location_code":"A-1",
            "qty_on_hand":"7","qty_reserved":2,"notes":{"deep":[1,{"x":null}]}},"op":"c",
            "source":{"schema":"public","table":"stock_levels","ts_ms":1,"snapshot":"false",
            "lsn":1,"commit_lsn":2,"sequence":0,"txId":9},"transaction":null}"#;
        let ev = RawEvent::parse(raw).expect("parses");
        let s = settings();
        let mut out = Vec::new();
        let mapped =
            map_event(&ev, &s.mappings["public.stock_levels"], &s.rules, &mut out).expect("maps");
        let c = whole(mapped, &out);
        assert_eq!(c[0].key["sku"], "SKU-9");
        assert_eq!(c[0].data.as_ref().expect("data")["available"], 5);
        let missing = RawEvent::parse(br#"{"before":null,"after":{},"op":"c"}"#)
            .expect_err("no source block");
        assert_eq!(missing.rule, "event_format");
        assert!(
            missing.reason.contains("missing field `source`"),
            "{}",
            missing.reason
        );
        let row_not_object = RawEvent::parse(
            br#"{"before":null,"after":[1],"op":"c","source":{"schema":"public","table":"t",
            "snapshot":"false","lsn":1,"commit_lsn":2,"sequence":0}}"#,
        )
        .expect_err("a row is an object");
        assert!(
            row_not_object
                .reason
                .contains("a row: an object of columns"),
            "{}",
            row_not_object.reason
        );
    }

    #[test]
    fn a_truncate_is_reported_not_sent() {
        assert_eq!(map_raw("t", Value::Null, Value::Null), Ok(Mapped::Truncate));
    }

    /// The JSON written without building the change is serde_json's, whatever the values:
    /// escapes, non-ASCII text, decimals, JSON columns, nulls, a snapshot row, a missing
    /// data column (left out, and noted as missing).
    #[test]
    fn a_change_renders_exactly_as_serde_json_renders_it() {
        let file = toml::from_str(
            r#"
            [[mappings]]
            table = "public.products"
            entity = "product"
            key = { sku = "sku" }
            data = { name = "name", unit_price = "unit_price", attributes = "attributes" }
            "#,
        )
        .expect("toml");
        let s = ConsumerSettings::from_file(file).expect("valid");
        let products = &s.mappings["public.products"];
        let raw = |after: Value, snapshot: &str| {
            serde_json::to_vec(&json!({
                "before": null, "after": after, "op": "r",
                "source": {"warehouse_id": "wh", "schema": "public", "table": "products",
                           "ts_ms": 1, "ts_us": 1_795_557_622_000_001i64, "snapshot": snapshot,
                           "lsn": 0x1_0000_0000u64, "commit_lsn": 7, "sequence": 0}
            }))
            .expect("event")
        };
        let cases = [
            (
                json!({"sku": "SKU-\"q\"\n\u{1}", "name": "Äpfel – 🍎", "unit_price": "12.50",
                    "attributes": {"b": [1, 2.5, null], "a": "x"}}),
                "true",
            ),
            (
                json!({"sku": "SKU-2", "name": null, "unit_price": 3, "attributes": null}),
                "false",
            ),
            (
                json!({"sku": "SKU-3", "name": "n", "unit_price": "1e3"}),
                "incremental",
            ),
        ];
        for (after, snapshot) in cases {
            let bytes = raw(after.clone(), snapshot);
            let mut out = Vec::new();
            let mapped = map_event(
                &RawEvent::parse(&bytes).expect("parses"),
                products,
                &s.rules,
                &mut out,
            )
            .expect("maps");
            let c = whole(mapped.clone(), &out);
            assert_eq!(c.len(), 1, "{after}");
            let Mapped::Changes(lean) = mapped else {
                panic!("changes")
            };
            let absent: Vec<&str> = lean[0]
                .missing
                .iter()
                .map(|&f| products.data[f].0.as_str())
                .collect();
            let expected: Vec<&str> = if after.get("attributes").is_some() {
                vec![]
            } else {
                vec!["attributes"]
            };
            assert_eq!(absent, expected, "{after}");
        }
    }

    /// Lanes are stored (`consumer_lanes`): a key's hash must be the one earlier versions
    /// computed from the key's map, or a restart would read another key's position.
    #[test]
    fn a_key_hashes_as_it_always_did() {
        let (loc, sku) = (Value::from("A-01"), Value::from("SKU-1"));
        let h = key_hash("stock_level", [("location", &loc), ("sku", &sku)]);
        // What the map-based hash of the versions before gave (checked against it).
        assert_eq!(h, 580_489_607_395_649_296);
    }
}
