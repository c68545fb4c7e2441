//! The central inventory system's REST contract (DESIGN §3): the request and response
//! bodies, the client the consumer stage pushes with, and the reference server that
//! implements the contract for the demo and the tests.

pub mod air;
pub mod client;
pub mod server;

pub use client::CentralSettings;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The central entity a warehouse table maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entity {
    /// Stock of one SKU at one location.
    StockLevel,
    /// A product.
    Product,
    /// A location.
    Location,
}

impl Entity {
    /// The contract's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Entity::StockLevel => "stock_level",
            Entity::Product => "product",
            Entity::Location => "location",
        }
    }
}

/// What a change does to its entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeOp {
    /// Create or replace.
    Upsert,
    /// Remove.
    Delete,
}

/// Where a change came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeSource {
    /// `schema.table`.
    pub table: String,
    /// The change's LSN in `X/X` form.
    pub lsn: String,
    /// Commit time, RFC 3339 UTC with microseconds.
    pub committed_at: String,
    /// Whether it was read by a snapshot (initial load or resync) rather than streamed.
    pub snapshot: bool,
}

/// One change in a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// Entity kind.
    pub entity: Entity,
    /// Upsert or delete.
    pub op: ChangeOp,
    /// Key fields.
    pub key: Map<String, Value>,
    /// Data fields; `None` for a delete.
    pub data: Option<Map<String, Value>>,
    /// The event's version (`{commit_lsn:016X}:{sequence:08X}`); grows per key.
    pub version: String,
    /// Origin.
    pub source: ChangeSource,
}

/// The body of `POST {endpoint}/{warehouse_id}/changes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeBatch {
    /// Warehouse id.
    pub warehouse_id: String,
    /// `<warehouse>:<first version>-<last version>`.
    pub batch_id: String,
    /// Changes in source order.
    pub changes: Vec<Change>,
}

/// The `batch_id` (and `Idempotency-Key`) of a request made of `changes`:
/// `<warehouse>:<first version>-<last version>:<digest>`, where the digest (128 bits, hex)
/// covers every change's JSON. A replay can cut batches differently (other lanes, other
/// sizes; a key move gives two changes one version), so the same first and last versions
/// can frame different content: the digest keeps a key from ever naming two contents.
pub fn batch_id_of(warehouse_id: &str, changes: &[Outgoing<'_>]) -> String {
    use std::hash::{BuildHasher, Hasher};
    let first = changes.first().map_or("", |c| c.version);
    let last = changes.last().map_or("", |c| c.version);
    let mut digest = [0u64; 2];
    for (d, seed) in digest.iter_mut().zip([0x1d_e9_70_c3, 0x5b_2f_84_a1]) {
        let mut h = foldhash::quality::FixedState::with_seed(seed).build_hasher();
        for c in changes {
            h.write_usize(c.json.len());
            h.write(c.json);
        }
        *d = h.finish();
    }
    format!(
        "{warehouse_id}:{first}-{last}:{:016x}{:016x}",
        digest[0], digest[1]
    )
}

/// [`batch_id_of`] for changes not rendered yet (renders them as requests would).
pub fn batch_id(warehouse_id: &str, changes: &[&Change]) -> String {
    let json: Vec<Vec<u8>> = changes
        .iter()
        // Serializing plain structs and JSON maps into a Vec cannot fail.
        .map(|c| serde_json::to_vec(c).unwrap_or_default())
        .collect();
    let out: Vec<Outgoing<'_>> = changes
        .iter()
        .zip(&json)
        .map(|(c, j)| Outgoing {
            version: &c.version,
            json: j,
        })
        .collect();
    batch_id_of(warehouse_id, &out)
}

/// A change ready to send: its version, and its JSON as serde renders it (rendered once, when
/// it was mapped; requests copy it as it is).
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    /// The change's version.
    pub version: &'a str,
    /// The change's JSON (`serde_json::to_vec` of a [`Change`]).
    pub json: &'a [u8],
}

/// The JSON body of a [`ChangeBatch`] made of `changes`, written from their rendered JSON.
pub fn request_body(warehouse_id: &str, batch_id: &str, changes: &[Outgoing<'_>]) -> Vec<u8> {
    let size: usize = changes.iter().map(|c| c.json.len() + 1).sum();
    let mut out = Vec::with_capacity(64 + warehouse_id.len() + batch_id.len() + size);
    out.extend_from_slice(b"{\"warehouse_id\":");
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, warehouse_id);
    out.extend_from_slice(b",\"batch_id\":");
    let _ = serde_json::to_writer(&mut out, batch_id);
    out.extend_from_slice(b",\"changes\":[");
    for (i, c) in changes.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(c.json);
    }
    out.extend_from_slice(b"]}");
    out
}

/// Central's verdict on one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultStatus {
    /// Applied now.
    Applied,
    /// This version was applied before.
    Duplicate,
    /// Central holds a newer version.
    Stale,
    /// Central refuses the change.
    Rejected,
}

/// One entry of the response, in the batch's order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeResult {
    /// The verdict.
    pub status: ResultStatus,
    /// Why (for `stale` and `rejected`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The version central holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<String>,
    /// The value central holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<Value>,
}

/// One row of central's listing (DESIGN §3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListedEntity {
    /// Key fields.
    pub key: Map<String, Value>,
    /// The version central holds.
    pub version: String,
    /// The data.
    #[serde(default)]
    pub data: Option<Map<String, Value>>,
}

/// A page of central's listing: rows in key order, and the cursor of the next page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntityPage {
    /// The rows.
    pub items: Vec<ListedEntity>,
    /// The canonical JSON of the last key, when more may follow.
    #[serde(default)]
    pub next: Option<String>,
}

/// The body of a `200` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchResponse {
    /// One per change, same order.
    pub results: Vec<ChangeResult>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_batch_id_names_the_warehouse_and_the_first_and_last_versions() {
        let change = |version: &str| Change {
            entity: Entity::Product,
            op: ChangeOp::Upsert,
            key: Map::new(),
            data: None,
            version: version.into(),
            source: ChangeSource {
                table: "public.products".into(),
                lsn: "0/1".into(),
                committed_at: "2026-11-25T00:00:00.000000Z".into(),
                snapshot: false,
            },
        };
        let (a, b) = (
            change("00000000016B3748:00000000"),
            change("00000000016B9000:00000004"),
        );
        let id = batch_id("wh-east", &[&a, &b]);
        assert!(
            id.starts_with("wh-east:00000000016B3748:00000000-00000000016B9000:00000004:"),
            "{id}"
        );
        assert_eq!(id.len(), "wh-east:".len() + 2 * 25 + 2 + 32, "{id}");
        assert_eq!(
            id,
            batch_id("wh-east", &[&a, &b]),
            "the same content, the same key"
        );
    }

    #[test]
    fn two_batches_with_the_same_first_and_last_version_get_different_keys() {
        let change = |sku: &str, version: &str, op: ChangeOp| Change {
            entity: Entity::StockLevel,
            op,
            key: serde_json::from_str(&format!(r#"{{"sku":"{sku}","location":"A"}}"#))
                .expect("key"),
            data: None,
            version: version.into(),
            source: ChangeSource {
                table: "public.stock_levels".into(),
                lsn: "0/1".into(),
                committed_at: "2026-11-25T00:00:00.000000Z".into(),
                snapshot: false,
            },
        };
        let first = change("SKU-1", "0000000000000001:00000000", ChangeOp::Upsert);
        let middle = change("SKU-2", "0000000000000001:00000001", ChangeOp::Upsert);
        let last = change("SKU-3", "0000000000000001:00000002", ChangeOp::Upsert);
        // A replay cut the batch without its middle change (another lane took it).
        assert_ne!(
            batch_id("wh", &[&first, &middle, &last]),
            batch_id("wh", &[&first, &last])
        );
        // A key move: the delete of the old key and the upsert of the new one share a version.
        let moved_from = change("SKU-1", "0000000000000002:00000000", ChangeOp::Delete);
        let moved_to = change("SKU-9", "0000000000000002:00000000", ChangeOp::Upsert);
        assert_ne!(batch_id("wh", &[&moved_from]), batch_id("wh", &[&moved_to]));
    }

    #[test]
    fn a_body_from_rendered_changes_is_the_batch_serde_would_write() {
        let mut a = Change {
            entity: Entity::StockLevel,
            op: ChangeOp::Upsert,
            key: serde_json::from_str(r#"{"sku":"SKU-\"1\"","location":"A-01"}"#).expect("key"),
            data: Some(
                serde_json::from_str(r#"{"on_hand":5,"reserved":1,"available":4}"#).expect("data"),
            ),
            version: "00000000016B3748:00000000".into(),
            source: ChangeSource {
                table: "public.stock_levels".into(),
                lsn: "0/16B3748".into(),
                committed_at: "2026-11-25T00:00:00.000000Z".into(),
                snapshot: false,
            },
        };
        let b = Change {
            op: ChangeOp::Delete,
            data: None,
            version: "00000000016B9000:00000004".into(),
            ..a.clone()
        };
        a.key.insert("note".into(), "ünïcode \u{1}".into());
        let json: Vec<Vec<u8>> = [&a, &b]
            .iter()
            .map(|c| serde_json::to_vec(c).expect("json"))
            .collect();
        let out: Vec<Outgoing<'_>> = [&a, &b]
            .iter()
            .zip(&json)
            .map(|(c, j)| Outgoing {
                version: &c.version,
                json: j,
            })
            .collect();
        let id = batch_id("wh-\"east", &[&a, &b]);
        let body = request_body("wh-\"east", &id, &out);
        let expected = ChangeBatch {
            warehouse_id: "wh-\"east".into(),
            batch_id: id,
            changes: vec![a, b],
        };
        assert_eq!(body, serde_json::to_vec(&expected).expect("json"));
        let parsed: ChangeBatch = serde_json::from_slice(&body).expect("valid JSON");
        assert_eq!(parsed, expected);
    }
}
