//! The reference central's state: per warehouse and entity the last applied version and its
//! data (a tombstone after a delete, so an older upsert stays stale), in memory or in a
//! Postgres table, and the verdict on each change (DESIGN §3) with central's own rules.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use sqlx::PgPool;
use tokio::sync::Mutex;

use super::{Faults, Item, WireChange};
use crate::central::{ChangeOp, ChangeResult, Entity, ResultStatus};

/// A stock level's quantities, as central's own rule reads them.
#[derive(Deserialize)]
struct Quantities {
    on_hand: Option<i64>,
    reserved: Option<i64>,
    available: Option<i64>,
}

/// What the memory store keeps per entity: the version applied last and the data as JSON
/// text (`None` once deleted — the version stays, so an older upsert stays stale). Compact on
/// purpose: a benchmark run holds hundreds of thousands of entities.
pub struct Stored {
    version: Box<str>,
    data: Option<Box<str>>,
}

/// Where the server keeps its state.
pub enum CentralStore {
    /// In this process: entities by warehouse and [`item_key`], in key order (the listing
    /// walks them in pages).
    Memory(Mutex<HashMap<String, BTreeMap<String, Stored>>>),
    /// In a Postgres table `central_inventory`.
    Postgres(PgPool),
}

impl CentralStore {
    /// An empty in-memory store.
    pub fn memory() -> Self {
        CentralStore::Memory(Mutex::new(HashMap::new()))
    }

    /// A Postgres store; creates its table if missing.
    pub async fn postgres(pool: PgPool) -> Result<Self, sqlx::Error> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS central_inventory (
                 warehouse_id text NOT NULL,
                 item_key     text COLLATE \"C\" NOT NULL,
                 entity       text NOT NULL,
                 key          jsonb NOT NULL,
                 version      text NOT NULL,
                 data         jsonb,
                 updated_at   timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (warehouse_id, item_key))",
        )
        .execute(&pool)
        .await?;
        Ok(CentralStore::Postgres(pool))
    }

    /// Judges and applies one request's changes in order; also returns how many of them
    /// repeat a key of the same request at a version not above the earlier one's (the
    /// contract forbids that: per key, versions only grow).
    pub(super) async fn apply(
        &self,
        warehouse_id: &str,
        changes: Vec<WireChange<'_>>,
        faults: &Faults,
    ) -> Result<(Vec<ChangeResult>, u64), sqlx::Error> {
        let mut order = RequestOrder::default();
        let results = match self {
            CentralStore::Memory(m) => {
                let mut all = m.lock().await;
                let items = all.entry(warehouse_id.to_string()).or_default();
                changes
                    .into_iter()
                    .map(|c| {
                        let k = item_key(&c);
                        order.note(&k, c.version.clone());
                        let current = items.get(&k);
                        let (status, reason) =
                            decide(&c, current.map(|s| s.version.as_ref()), faults);
                        let mut result = verdict(status, reason);
                        if status == ResultStatus::Applied {
                            let version = c.version.as_ref().into();
                            let data = stored_data(&c).map(Into::into);
                            items.insert(k, Stored { version, data });
                        } else if let Some(cur) = current {
                            result.current_version = Some(cur.version.to_string());
                            result.current = cur
                                .data
                                .as_deref()
                                .and_then(|t| serde_json::from_str(t).ok());
                        }
                        result
                    })
                    .collect()
            }
            CentralStore::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                let mut results = Vec::with_capacity(changes.len());
                for c in changes {
                    let k = item_key(&c);
                    order.note(&k, c.version.clone());
                    let current: Option<(String, Option<Value>)> = sqlx::query_as(
                        "SELECT version, data FROM central_inventory
                         WHERE warehouse_id = $1 AND item_key = $2 FOR UPDATE",
                    )
                    .bind(warehouse_id)
                    .bind(&k)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let (status, reason) =
                        decide(&c, current.as_ref().map(|(v, _)| v.as_str()), faults);
                    let mut result = verdict(status, reason);
                    if status == ResultStatus::Applied {
                        let entity = c.entity;
                        let key = Value::Object(c.key.clone());
                        let version = c.version.as_ref();
                        sqlx::query(
                            "INSERT INTO central_inventory (warehouse_id, item_key, entity, key, version, data)
                             VALUES ($1, $2, $3, $4, $5, $6::text::jsonb)
                             ON CONFLICT (warehouse_id, item_key) DO UPDATE
                             SET version = EXCLUDED.version, data = EXCLUDED.data, updated_at = now()",
                        )
                        .bind(warehouse_id)
                        .bind(&k)
                        .bind(entity.as_str())
                        .bind(&key)
                        .bind(version)
                        .bind(stored_data(&c))
                        .execute(&mut *tx)
                        .await?;
                    } else if let Some((version, data)) = current {
                        result.current_version = Some(version);
                        result.current = data;
                    }
                    results.push(result);
                }
                tx.commit().await?;
                results
            }
        };
        Ok((results, order.violations))
    }

    /// One page of `warehouse_id`'s live `entity` rows in key order (the bytes of the key's
    /// canonical JSON, DESIGN §3): at most `limit` after the key whose canonical JSON is
    /// `after`, and the cursor of the next page (none after the last row).
    pub(super) async fn page(
        &self,
        warehouse_id: &str,
        entity: Entity,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Item>, Option<String>), sqlx::Error> {
        let prefix = format!("{}:", entity.as_str());
        let from = format!("{prefix}{}", after.unwrap_or_default());
        // One more than asked: whether a next page exists.
        let mut rows: Vec<(String, Item)> = match self {
            CentralStore::Memory(m) => {
                use std::ops::Bound::{Excluded, Included, Unbounded};
                let all = m.lock().await;
                let Some(items) = all.get(warehouse_id) else {
                    return Ok((Vec::new(), None));
                };
                let start = if after.is_some() {
                    Excluded(from)
                } else {
                    Included(from)
                };
                items
                    .range::<String, _>((start, Unbounded))
                    .take_while(|(k, _)| k.starts_with(&prefix))
                    .filter_map(|(k, s)| {
                        let key = &k[prefix.len()..];
                        Some((
                            key.to_string(),
                            Item {
                                entity,
                                key: serde_json::from_str(key).ok()?,
                                version: s.version.to_string(),
                                data: Some(serde_json::from_str(s.data.as_deref()?).ok()?),
                            },
                        ))
                    })
                    .take(limit + 1)
                    .collect()
            }
            CentralStore::Postgres(pool) => {
                let rows: Vec<(String, Value, String, Option<Value>)> = sqlx::query_as(
                    r#"SELECT item_key, key, version, data FROM central_inventory
                        WHERE warehouse_id = $1 AND entity = $2 AND data IS NOT NULL
                          AND item_key COLLATE "C" > $3 COLLATE "C"
                          AND starts_with(item_key, $4)
                        ORDER BY item_key COLLATE "C" LIMIT $5"#,
                )
                .bind(warehouse_id)
                .bind(entity.as_str())
                .bind(if after.is_some() {
                    from.as_str()
                } else {
                    prefix.as_str()
                })
                .bind(&prefix)
                .bind(i64::try_from(limit + 1).unwrap_or(i64::MAX))
                .fetch_all(pool)
                .await?;
                rows.into_iter()
                    .map(|(item_key, key, version, data)| {
                        let canonical = item_key[prefix.len().min(item_key.len())..].to_string();
                        (
                            canonical,
                            Item {
                                entity,
                                key,
                                version,
                                data,
                            },
                        )
                    })
                    .collect()
            }
        };
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next = if more {
            rows.last().map(|(k, _)| k.clone())
        } else {
            None
        };
        Ok((rows.into_iter().map(|(_, i)| i).collect(), next))
    }

    pub(super) async fn list(&self, warehouse_id: &str) -> Result<Vec<Item>, sqlx::Error> {
        match self {
            CentralStore::Memory(m) => {
                let all = m.lock().await;
                let mut live: Vec<(&String, Item)> = all
                    .get(warehouse_id)
                    .map(|items| {
                        items
                            .iter()
                            .filter_map(|(k, s)| {
                                let (entity, key) = k.split_once(':')?;
                                let item = Item {
                                    entity: serde_json::from_value(Value::String(entity.into()))
                                        .ok()?,
                                    key: serde_json::from_str(key).ok()?,
                                    version: s.version.to_string(),
                                    data: Some(serde_json::from_str(s.data.as_deref()?).ok()?),
                                };
                                Some((k, item))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                live.sort_by(|a, b| a.0.cmp(b.0));
                Ok(live.into_iter().map(|(_, i)| i).collect())
            }
            CentralStore::Postgres(pool) => {
                let rows: Vec<(String, Value, String, Option<Value>)> = sqlx::query_as(
                    "SELECT entity, key, version, data FROM central_inventory
                     WHERE warehouse_id = $1 AND data IS NOT NULL ORDER BY item_key",
                )
                .bind(warehouse_id)
                .fetch_all(pool)
                .await?;
                Ok(rows
                    .into_iter()
                    .filter_map(|(entity, key, version, data)| {
                        let entity = serde_json::from_value(Value::String(entity)).ok()?;
                        Some(Item {
                            entity,
                            key,
                            version,
                            data,
                        })
                    })
                    .collect())
            }
        }
    }
}

/// The keys one request has seen so far, by a hash of their store key, with their last
/// version (borrowed from the request body): a key seen again at a version not above that
/// one breaks the contract's order.
#[derive(Default)]
struct RequestOrder<'a> {
    seen: HashMap<u64, Cow<'a, str>, foldhash::fast::FixedState>,
    violations: u64,
}

impl<'a> RequestOrder<'a> {
    fn note(&mut self, key: &str, version: Cow<'a, str>) {
        use std::hash::BuildHasher;
        let h = foldhash::fast::FixedState::with_seed(7).hash_one(key);
        if let Some(v) = self.seen.insert(h, version.clone())
            && version.as_ref() <= v.as_ref()
        {
            self.violations += 1;
        }
    }
}

/// The store's key of a change's entity: entity and key fields, canonical (sorted) JSON.
pub(super) fn item_key(c: &WireChange<'_>) -> String {
    // serde_json's maps are ordered by key: the text is canonical.
    let mut out = String::with_capacity(64);
    out.push_str(c.entity.as_str());
    out.push(':');
    out.push_str(&serde_json::to_string(&c.key).unwrap_or_default());
    out
}

/// The verdict on `c` given the version stored for its entity, with the reason for `stale`
/// and `rejected`.
pub(super) fn decide(
    c: &WireChange<'_>,
    current_version: Option<&str>,
    faults: &Faults,
) -> (ResultStatus, Option<String>) {
    if let Some(reason) = reject_reason(c, faults) {
        return (ResultStatus::Rejected, Some(reason));
    }
    match current_version {
        Some(cur) if c.version == cur => (ResultStatus::Duplicate, None),
        Some(cur) if c.version.as_ref() < cur => (
            ResultStatus::Stale,
            Some(format!(
                "central holds version {cur} (newer than {})",
                c.version
            )),
        ),
        _ => (ResultStatus::Applied, None),
    }
}

fn verdict(status: ResultStatus, reason: Option<String>) -> ChangeResult {
    ChangeResult {
        status,
        reason,
        current_version: None,
        current: None,
    }
}

/// What an applied change leaves stored: its data's JSON text, or nothing for a delete (a
/// tombstone).
pub(super) fn stored_data<'c>(c: &'c WireChange<'_>) -> Option<&'c str> {
    match c.op {
        ChangeOp::Upsert => c.data.map(RawValue::get),
        ChangeOp::Delete => None,
    }
}

/// Central's own business rules, plus the injected rejection.
pub(super) fn reject_reason(c: &WireChange<'_>, faults: &Faults) -> Option<String> {
    if c.key.is_empty() {
        return Some("empty key".into());
    }
    if let Some(s) = &faults.reject_key_substring {
        let key = serde_json::to_string(&c.key).unwrap_or_default();
        if key.contains(s.as_str()) {
            return Some(format!("key {key} is refused by central policy"));
        }
    }
    if c.op == ChangeOp::Upsert {
        let Some(data) = c.data else {
            return Some("upsert without data".into());
        };
        if !data.get().starts_with('{') {
            return Some(format!("data must be an object, got {}", data.get()));
        }
        if c.entity == Entity::StockLevel {
            match serde_json::from_str::<Quantities>(data.get()) {
                Ok(Quantities {
                    on_hand: Some(o),
                    reserved: Some(r),
                    available: Some(a),
                }) if o >= 0 && r >= 0 && a == o - r => {}
                _ => {
                    return Some(format!(
                        "stock_level data must have integers on_hand >= 0, reserved >= 0 and available = on_hand - reserved, got {}",
                        data.get()
                    ));
                }
            }
        }
    }
    None
}

/// An out-of-band edit of a warehouse's entities.
#[derive(Debug, Clone, Copy)]
pub(super) enum Edit {
    Wipe,
    Tamper,
}

impl CentralStore {
    /// Applies `edit` to every entity of `warehouse_id`; returns how many it touched.
    pub(super) async fn edit(&self, warehouse_id: &str, edit: Edit) -> Result<u64, sqlx::Error> {
        match self {
            CentralStore::Memory(m) => {
                let mut all = m.lock().await;
                let Some(items) = all.get_mut(warehouse_id) else {
                    return Ok(0);
                };
                let n = items.len() as u64;
                match edit {
                    Edit::Wipe => items.clear(),
                    Edit::Tamper => {
                        for s in items.values_mut().filter(|s| s.data.is_some()) {
                            s.data = Some(r#"{"tampered":true}"#.into());
                        }
                    }
                }
                Ok(n)
            }
            CentralStore::Postgres(pool) => {
                let q = match edit {
                    Edit::Wipe => "DELETE FROM central_inventory WHERE warehouse_id = $1",
                    Edit::Tamper => {
                        "UPDATE central_inventory SET data = '{\"tampered\": true}'
                          WHERE warehouse_id = $1 AND data IS NOT NULL"
                    }
                };
                Ok(sqlx::query(q)
                    .bind(warehouse_id)
                    .execute(pool)
                    .await?
                    .rows_affected())
            }
        }
    }
}

/// One entity set behind the contract's back (see `plant_item`).
#[derive(Debug, Clone)]
pub(super) struct Planted {
    pub entity: Entity,
    /// The key's canonical JSON.
    pub key: String,
    /// The version to hold (`None`: the one it holds).
    pub version: Option<String>,
    /// The data as JSON text; `None` removes the entity altogether.
    pub data: Option<String>,
}

impl CentralStore {
    /// Sets or removes one entity of `warehouse_id` as `p` says; returns how many it touched.
    pub(super) async fn plant(&self, warehouse_id: &str, p: Planted) -> Result<u64, sqlx::Error> {
        let item_key = format!("{}:{}", p.entity.as_str(), p.key);
        match self {
            CentralStore::Memory(m) => {
                let mut all = m.lock().await;
                let items = all.entry(warehouse_id.to_string()).or_default();
                match p.data {
                    None => Ok(u64::from(items.remove(&item_key).is_some())),
                    Some(data) => {
                        let version = p
                            .version
                            .or_else(|| items.get(&item_key).map(|s| s.version.to_string()))
                            .unwrap_or_else(|| "0000000000000000:00000000".into());
                        items.insert(
                            item_key,
                            Stored {
                                version: version.into(),
                                data: Some(data.into()),
                            },
                        );
                        Ok(1)
                    }
                }
            }
            CentralStore::Postgres(pool) => {
                let r = match p.data {
                    None => {
                        sqlx::query(
                            "DELETE FROM central_inventory WHERE warehouse_id = $1 AND item_key = $2",
                        )
                        .bind(warehouse_id)
                        .bind(&item_key)
                        .execute(pool)
                        .await?
                    }
                    Some(data) => {
                        sqlx::query(
                            "INSERT INTO central_inventory (warehouse_id, item_key, entity, key, version, data)
                             VALUES ($1, $2, $3, $4::jsonb, coalesce($5, '0000000000000000:00000000'), $6::jsonb)
                             ON CONFLICT (warehouse_id, item_key) DO UPDATE
                               SET version = coalesce($5, central_inventory.version), data = $6::jsonb,
                                   updated_at = now()",
                        )
                        .bind(warehouse_id)
                        .bind(&item_key)
                        .bind(p.entity.as_str())
                        .bind(&p.key)
                        .bind(&p.version)
                        .bind(&data)
                        .execute(pool)
                        .await?
                    }
                };
                Ok(r.rows_affected())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RequestOrder;

    #[test]
    fn a_key_repeated_in_a_request_at_a_version_that_does_not_grow_is_counted() {
        let mut o = RequestOrder::default();
        o.note("stock_level:{\"sku\":\"A\"}", "01:00000001".into());
        o.note("stock_level:{\"sku\":\"B\"}", "01:00000000".into());
        o.note("stock_level:{\"sku\":\"A\"}", "01:00000002".into());
        assert_eq!(
            o.violations, 0,
            "growing versions, and other keys in any order"
        );
        o.note("stock_level:{\"sku\":\"A\"}", "01:00000002".into());
        o.note("stock_level:{\"sku\":\"B\"}", "00:00000009".into());
        assert_eq!(o.violations, 2, "the same version again, and a lower one");
    }
}
