//! The consumer stage's configuration, from the TOML file: `[[mappings]]` (which warehouse
//! table is which central entity, column by column), `[rules]` (validation), `[batch]` and
//! `[central]`.
//!
//! ```toml
//! [[mappings]]
//! table  = "public.stock_levels"
//! entity = "stock_level"
//! key    = { sku = "sku", location = "location_code" }
//! data   = { on_hand = "qty_on_hand", reserved = "qty_reserved" }
//! ```
//!
//! A field is a column name, or `{ column = "…", from = "bytea_utf8" }` for a bytea column
//! holding text (its bytes must be UTF-8). Stock levels get `available = on_hand - reserved`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Deserialize;

use crate::central::Entity;
use crate::setting::ConfigError;

/// How a central field is read from the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldSource {
    /// Column name.
    pub column: String,
    /// Conversion applied to the column's event value.
    pub convert: Convert,
}

/// A conversion from the event's value to the central field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Convert {
    /// The value as it is in the event.
    #[default]
    AsIs,
    /// A bytea column (base64 in the event) whose bytes are UTF-8 text.
    ByteaUtf8,
}

/// One mapped table.
#[derive(Debug, Clone, PartialEq)]
pub struct TableMapping {
    /// `schema.table`.
    pub table: String,
    /// Central entity.
    pub entity: Entity,
    /// Key fields, in order.
    pub key: Vec<(String, FieldSource)>,
    /// Data fields, in order.
    pub data: Vec<(String, FieldSource)>,
}

impl TableMapping {
    /// What the mapping makes of its table's rows, as 16 hex digits: its entity, key and data
    /// fields with their columns and conversions (not the table's name, which a rename
    /// changes). A new fingerprint means central needs the table's rows again, and that the
    /// keys' lanes may have moved.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let shape = format!("{:?}|{:?}|{:?}", self.entity, self.key, self.data);
        let digest = sha2::Sha256::digest(shape.as_bytes());
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Business rules checked before anything is sent.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Longest string (in characters) any key or data field may hold.
    pub max_string_chars: usize,
    /// Fields that must be integers ≥ 0 when present.
    pub quantity_fields: Vec<String>,
    /// When set, the `sku` key or data field must match it.
    pub sku_pattern: Option<regex::Regex>,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            max_string_chars: 1024,
            quantity_fields: vec!["on_hand".into(), "reserved".into()],
            sku_pattern: None,
        }
    }
}

/// Batching per warehouse (DESIGN §3 requests).
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// Changes per request at most.
    pub max_changes: usize,
    /// Request body bytes at most (a single larger change is still sent alone).
    pub max_bytes: usize,
    /// How long to wait for a batch to fill after its first change.
    pub linger: Duration,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            max_changes: 500,
            max_bytes: 1 << 20,
            linger: Duration::from_millis(50),
        }
    }
}

pub use crate::central::CentralSettings;

/// Everything the consumer stage reads from the TOML file.
#[derive(Debug, Clone, Default)]
pub struct ConsumerSettings {
    /// Mapped tables by `schema.table`.
    pub mappings: HashMap<String, TableMapping>,
    /// Validation.
    pub rules: Rules,
    /// Batching.
    pub batch: BatchSettings,
    /// The central client.
    pub central: CentralSettings,
}

impl ConsumerSettings {
    /// The consumer's sections (`[[mappings]]`, `[rules]`, `[batch]`, `[central]`) of a TOML
    /// document; other sections are ignored.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let file: FileConsumer =
            toml::from_str(text).map_err(|e| invalid("consumer settings", e.to_string()))?;
        Self::from_file(file)
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum FileField {
    Column(String),
    Spec {
        column: String,
        #[serde(default)]
        from: Option<String>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileMapping {
    table: String,
    entity: String,
    key: BTreeMap<String, FileField>,
    #[serde(default)]
    data: BTreeMap<String, FileField>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileRules {
    max_string_chars: Option<usize>,
    quantity_fields: Option<Vec<String>>,
    sku_pattern: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileBatch {
    max_changes: Option<usize>,
    max_bytes: Option<usize>,
    linger_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileCentral {
    request_timeout_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
    max_backoff_ms: Option<u64>,
    breaker_threshold: Option<u32>,
    breaker_cooldown_ms: Option<u64>,
    breaker_probe_interval_ms: Option<u64>,
    credential_retry_ms: Option<u64>,
    max_in_flight_requests: Option<usize>,
}

/// The consumer's part of the TOML file (the rest is read by `config`).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct FileConsumer {
    #[serde(default)]
    pub(crate) mappings: Vec<FileMapping>,
    #[serde(default)]
    pub(crate) rules: FileRules,
    #[serde(default)]
    pub(crate) batch: FileBatch,
    #[serde(default)]
    pub(crate) central: FileCentral,
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

fn field(key: &str, name: &str, f: FileField) -> Result<(String, FieldSource), ConfigError> {
    let (column, from) = match f {
        FileField::Column(c) => (c, None),
        FileField::Spec { column, from } => (column, from),
    };
    if column.trim().is_empty() {
        return Err(invalid(key, "the column name must not be empty"));
    }
    let convert = match from.as_deref() {
        None => Convert::AsIs,
        Some("bytea_utf8") => Convert::ByteaUtf8,
        Some(other) => {
            return Err(invalid(
                format!("{key}.from"),
                format!("{other:?} is not a conversion; expected \"bytea_utf8\""),
            ));
        }
    };
    Ok((name.to_string(), FieldSource { column, convert }))
}

impl ConsumerSettings {
    pub(crate) fn from_file(file: FileConsumer) -> Result<Self, ConfigError> {
        let mut mappings = HashMap::new();
        for (i, m) in file.mappings.into_iter().enumerate() {
            let key = |f: &str| format!("mappings[{i}].{f}");
            let Some((schema, table)) = m.table.split_once('.') else {
                return Err(invalid(
                    key("table"),
                    format!("{:?} must be schema.table", m.table),
                ));
            };
            if schema.is_empty() || table.is_empty() {
                return Err(invalid(
                    key("table"),
                    format!("{:?} must be schema.table", m.table),
                ));
            }
            let entity = match m.entity.as_str() {
                "stock_level" => Entity::StockLevel,
                "product" => Entity::Product,
                "location" => Entity::Location,
                other => {
                    return Err(invalid(
                        key("entity"),
                        format!("{other:?}; expected stock_level, product or location"),
                    ));
                }
            };
            if m.key.is_empty() {
                return Err(invalid(key("key"), "needs at least one key field"));
            }
            let fields = |section: &str, map: BTreeMap<String, FileField>| {
                map.into_iter()
                    .map(|(name, f)| field(&key(&format!("{section}.{name}")), &name, f))
                    .collect::<Result<Vec<_>, _>>()
            };
            let mapping = TableMapping {
                table: m.table.clone(),
                entity,
                key: fields("key", m.key)?,
                data: fields("data", m.data)?,
            };
            if entity == Entity::StockLevel && !mapping.data.iter().any(|(n, _)| n == "on_hand") {
                return Err(invalid(
                    key("data"),
                    "a stock_level mapping needs an on_hand field",
                ));
            }
            if mappings.insert(m.table.clone(), mapping).is_some() {
                return Err(invalid(
                    key("table"),
                    format!("{:?} is mapped twice", m.table),
                ));
            }
        }
        let defaults = Rules::default();
        let sku_pattern = file
            .rules
            .sku_pattern
            .map(|p| {
                regex::Regex::new(&p)
                    .map_err(|e| invalid("rules.sku_pattern", format!("{p:?} is not a regex: {e}")))
            })
            .transpose()?;
        let rules = Rules {
            max_string_chars: file
                .rules
                .max_string_chars
                .unwrap_or(defaults.max_string_chars),
            quantity_fields: file
                .rules
                .quantity_fields
                .unwrap_or(defaults.quantity_fields),
            sku_pattern,
        };
        let b = BatchSettings::default();
        let batch = BatchSettings {
            max_changes: file.batch.max_changes.unwrap_or(b.max_changes),
            max_bytes: file.batch.max_bytes.unwrap_or(b.max_bytes),
            linger: file.batch.linger_ms.map_or(b.linger, Duration::from_millis),
        };
        if batch.max_changes == 0 {
            return Err(invalid("batch.max_changes", "must be at least 1"));
        }
        let c = CentralSettings::default();
        let ms = |v: Option<u64>, d: Duration| v.map_or(d, Duration::from_millis);
        let central = CentralSettings {
            request_timeout: ms(file.central.request_timeout_ms, c.request_timeout),
            connect_timeout: ms(file.central.connect_timeout_ms, c.connect_timeout),
            max_backoff: ms(file.central.max_backoff_ms, c.max_backoff),
            breaker_threshold: file
                .central
                .breaker_threshold
                .unwrap_or(c.breaker_threshold)
                .max(1),
            breaker_cooldown: ms(file.central.breaker_cooldown_ms, c.breaker_cooldown),
            breaker_probe_interval: ms(
                file.central.breaker_probe_interval_ms,
                c.breaker_probe_interval,
            ),
            credential_retry: ms(file.central.credential_retry_ms, c.credential_retry),
            max_in_flight_requests: file
                .central
                .max_in_flight_requests
                .unwrap_or(c.max_in_flight_requests),
        };
        if central.breaker_probe_interval < Duration::from_millis(10) {
            // Back-to-back probes against a central that refuses connections spin.
            return Err(invalid(
                "central.breaker_probe_interval_ms",
                format!(
                    "{} is too short: must be at least 10",
                    central.breaker_probe_interval.as_millis()
                ),
            ));
        }
        if central.max_in_flight_requests == 0 {
            return Err(invalid(
                "central.max_in_flight_requests",
                "must be at least 1",
            ));
        }
        Ok(Self {
            mappings,
            rules,
            batch,
            central,
        })
    }
}

/// A stock-level mapping with a bytea conversion and an SKU pattern, for unit tests.
#[cfg(test)]
pub(crate) const TEST_MAPPING: &str = r#"
    [[mappings]]
    table = "public.stock_levels"
    entity = "stock_level"
    key = { sku = "sku", location = "location_code" }
    data = { on_hand = "qty_on_hand", reserved = "qty_reserved", label = { column = "raw", from = "bytea_utf8" } }
    [rules]
    sku_pattern = "^SKU-[0-9]+$"
    max_string_chars = 10
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ConsumerSettings, ConfigError> {
        ConsumerSettings::from_file(toml::from_str(text).expect("toml"))
    }

    #[test]
    fn a_mapping_reads_columns_and_conversions() {
        let s = parse(&format!("{TEST_MAPPING}\n[batch]\nmax_changes = 10\n")).expect("valid");
        let m = &s.mappings["public.stock_levels"];
        assert_eq!(m.entity, Entity::StockLevel);
        assert_eq!(m.key.len(), 2);
        let label = m.data.iter().find(|(n, _)| n == "label").expect("label");
        assert_eq!(label.1.convert, Convert::ByteaUtf8);
        assert_eq!(s.batch.max_changes, 10);
        assert!(s.rules.sku_pattern.is_some());
    }

    #[test]
    fn bad_mappings_name_the_key_and_the_problem() {
        let cases = [
            (
                "[[mappings]]\ntable = 'stock'\nentity = 'product'\nkey = { sku = 'sku' }",
                "mappings[0].table",
            ),
            (
                "[[mappings]]\ntable = 'public.p'\nentity = 'widget'\nkey = { sku = 'sku' }",
                "mappings[0].entity",
            ),
            (
                "[[mappings]]\ntable = 'public.p'\nentity = 'product'\nkey = {}",
                "mappings[0].key",
            ),
            (
                "[[mappings]]\ntable = 'public.s'\nentity = 'stock_level'\nkey = { sku = 'sku' }",
                "mappings[0].data",
            ),
            (
                "[[mappings]]\ntable = 'public.p'\nentity = 'product'\nkey = { sku = { column = 'sku', from = 'hex' } }",
                "mappings[0].key.sku.from",
            ),
            ("[rules]\nsku_pattern = '('", "rules.sku_pattern"),
            ("[batch]\nmax_changes = 0", "batch.max_changes"),
            (
                "[central]\nbreaker_probe_interval_ms = 0",
                "central.breaker_probe_interval_ms",
            ),
            (
                "[central]\nmax_in_flight_requests = 0",
                "central.max_in_flight_requests",
            ),
        ];
        for (text, key) in cases {
            let e = parse(text).expect_err(text).to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }
}

#[cfg(test)]
mod shipped {
    #[test]
    fn the_demo_mapping_in_sql_parses() {
        let text = include_str!("../../sql/demo_mapping.toml");
        let s = super::ConsumerSettings::from_file(toml::from_str(text).expect("toml"))
            .expect("valid mapping");
        assert_eq!(s.mappings.len(), 3);
    }
}
