//! Mappings follow their tables: a mapping names a table (`schema.table`), but binds to the
//! relation (its OID at the warehouse), so that a rename (`ALTER TABLE … RENAME`) or a move to
//! another schema (`SET SCHEMA`) does not turn the table's changes into "unmapped" changes,
//! skipped and confirmed without a trace.
//!
//! ```text
//!  event (relation OID, name) ──▶ bound OID? ──yes──▶ its mapping (renamed: warned once)
//!                                     │ no
//!                                     ▼
//!                              mapping by name ──▶ the OID is bound to it from then on
//! ```
//!
//! The bindings live in the state DB (`mapping_bindings`), so that they hold across restarts:
//! a table renamed while the engine was down is still found by its OID. When a warehouse is
//! first seen, each configured name is looked up in its catalog and bound; a bound relation
//! whose name no longer is the configured one is warned about, with the name to put in the
//! configuration. Events carry the OID (the embedded bus in the event, Kafka in the
//! `relation_oid` header); a record without one is mapped by name alone.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::settings::TableMapping;
use super::toast::ToastReader;
use crate::store::StateDb;

/// How long a warehouse whose catalog could not be read is mapped by what the state DB holds
/// before its catalog is read again.
const RETRY_CATALOG: Duration = Duration::from_secs(30);

/// One warehouse's bound relations: OID → the configured table of its mapping.
#[derive(Debug, Default, Clone)]
pub struct Bound {
    by_oid: HashMap<u32, Arc<str>>,
    /// Whether the warehouse's catalog was read (else only the state DB's rows are known,
    /// and the catalog is read again after [`RETRY_CATALOG`]).
    resolved: bool,
    at: Option<Instant>,
}

impl Bound {
    /// The configured table the relation `oid` is bound to.
    pub fn mapped_table(&self, oid: u32) -> Option<&Arc<str>> {
        self.by_oid.get(&oid)
    }

    fn fresh(&self) -> bool {
        self.resolved || self.at.is_some_and(|at| at.elapsed() < RETRY_CATALOG)
    }
}

/// A relation whose name is no longer the one its mapping names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renamed {
    /// The mapping's table, as the configuration names it.
    pub mapped_table: String,
    /// The relation's name now.
    pub current_name: String,
}

/// The bindings of every warehouse this stage delivers, read once per warehouse.
#[derive(Default)]
pub struct Bindings {
    warehouses: std::sync::RwLock<HashMap<String, Arc<Bound>>>,
    /// One reader of the catalog at a time.
    resolving: tokio::sync::Mutex<()>,
    /// (warehouse, OID, name) already warned about.
    warned: std::sync::Mutex<HashSet<(String, u32, String)>>,
}

impl Bindings {
    /// `warehouse_id`'s bindings: read from the state DB and the warehouse's catalog the
    /// first time (and again while the catalog could not be read).
    pub async fn of(
        &self,
        warehouse_id: &str,
        state: &StateDb,
        reader: &ToastReader,
        mappings: &HashMap<String, TableMapping>,
    ) -> Arc<Bound> {
        if let Some(b) = self.cached(warehouse_id).filter(|b| b.fresh()) {
            return b;
        }
        let _one = self.resolving.lock().await;
        if let Some(b) = self.cached(warehouse_id).filter(|b| b.fresh()) {
            return b;
        }
        let bound = Arc::new(resolve(warehouse_id, state, reader, mappings).await);
        self.warehouses
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(warehouse_id.to_string(), bound.clone());
        bound
    }

    fn cached(&self, warehouse_id: &str) -> Option<Arc<Bound>> {
        self.warehouses
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(warehouse_id)
            .cloned()
    }

    /// Binds relation `oid`, met under the configured name `table`, to that mapping (a table
    /// created again under the name, or one the catalog did not show yet).
    pub async fn bind_seen(
        &self,
        warehouse_id: &str,
        oid: u32,
        (table, mapping): (&str, &TableMapping),
        state: &StateDb,
    ) {
        {
            let mut all = self.warehouses.write().unwrap_or_else(|p| p.into_inner());
            let mut bound = all
                .get(warehouse_id)
                .map(|b| (**b).clone())
                .unwrap_or_default();
            bound.by_oid.insert(oid, Arc::from(table));
            all.insert(warehouse_id.to_string(), Arc::new(bound));
        }
        let print = mapping.fingerprint();
        if let Err(e) = state.bind(warehouse_id, oid, table, table, &print).await {
            tracing::warn!(warehouse = %warehouse_id, %table, oid, error = %e, "cannot record the mapping's binding to the table; it holds in this process, and is recorded at the next start");
        }
    }

    /// The mapped tables of `warehouse_id` whose bound relation is published under another
    /// name now (`published`: OID and name), as far as this process has bound them.
    pub fn renamed(&self, warehouse_id: &str, published: &[(u32, String)]) -> Vec<Renamed> {
        let Some(bound) = self.cached(warehouse_id) else {
            return Vec::new();
        };
        let mut renamed: Vec<Renamed> = published
            .iter()
            .filter_map(|(oid, name)| {
                let mapped = bound.by_oid.get(oid)?;
                (**mapped != **name).then(|| Renamed {
                    mapped_table: mapped.to_string(),
                    current_name: name.clone(),
                })
            })
            .collect();
        renamed.sort_by(|a, b| a.mapped_table.cmp(&b.mapped_table));
        renamed
    }

    /// Says once that relation `oid`, bound to the mapping of `mapped`, is now named `now`,
    /// and records the name with the binding (for `check` and the console).
    pub async fn warn_renamed(
        &self,
        warehouse_id: &str,
        oid: u32,
        (mapped, mapping): (&str, &TableMapping),
        now: &str,
        state: &StateDb,
    ) {
        let first = self
            .warned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((warehouse_id.to_string(), oid, now.to_string()));
        if first {
            tracing::warn!(warehouse = %warehouse_id, mapped_table = %mapped, current_name = %now, oid, "a mapped table was renamed or moved: its changes keep flowing under the mapping of {mapped}; update the configuration's [[mappings]] table to {now:?}");
            if let Err(e) = state
                .bind(warehouse_id, oid, mapped, now, &mapping.fingerprint())
                .await
            {
                tracing::warn!(warehouse = %warehouse_id, error = %e, "cannot record the table's new name with its binding");
            }
        }
    }
}

/// Reads `warehouse_id`'s bindings from the state DB, binds each configured name the
/// warehouse's catalog has, and warns about bound relations renamed since.
async fn resolve(
    warehouse_id: &str,
    state: &StateDb,
    reader: &ToastReader,
    mappings: &HashMap<String, TableMapping>,
) -> Bound {
    let mut bound = Bound {
        at: Some(Instant::now()),
        ..Bound::default()
    };
    let stored = match state.bindings(warehouse_id).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(warehouse = %warehouse_id, error = %e, "cannot read the mappings' bindings from the state DB; mapping by name until it answers");
            return bound;
        }
    };
    for b in &stored {
        if let (Ok(oid), true) = (
            u32::try_from(b.relation_oid),
            mappings.contains_key(&b.mapped_table),
        ) {
            bound.by_oid.insert(oid, Arc::from(b.mapped_table.as_str()));
        }
    }
    // A mapping whose entity, key or data changed since it was bound: its keys' lanes may
    // have moved, and a lane position stored under the old mapping would skip changes that
    // never reached central under the new one.
    let mut changed: Vec<(&str, String)> = Vec::new();
    for b in &stored {
        let (Some(m), Some(before)) = (mappings.get(&b.mapped_table), b.fingerprint.as_deref())
        else {
            continue;
        };
        let now = m.fingerprint();
        if before != now && !changed.iter().any(|(t, _)| *t == b.mapped_table) {
            changed.push((b.mapped_table.as_str(), now));
        }
    }
    if !changed.is_empty() {
        match state.reset_lanes(warehouse_id, &changed).await {
            Ok(n) => {
                let tables: Vec<&str> = changed.iter().map(|(t, _)| *t).collect();
                tracing::warn!(warehouse = %warehouse_id, ?tables, lanes = n, "a mapping changed since the last run: the lane positions are reset, so replays are sent again (central answers what it has as duplicates); the tables are loaded again by a load job")
            }
            Err(e) => {
                tracing::warn!(warehouse = %warehouse_id, error = %e, "cannot reset the lane positions after a mapping changed; trying again later");
                return bound;
            }
        }
    }
    let print = |table: &str| {
        mappings
            .get(table)
            .map(|m| m.fingerprint())
            .unwrap_or_default()
    };
    match catalog(warehouse_id, reader, mappings, &stored).await {
        Ok(found) => {
            for (oid, mapped, current) in found.named {
                if let Err(e) = state
                    .bind(warehouse_id, oid, &mapped, &current, &print(&mapped))
                    .await
                {
                    tracing::warn!(warehouse = %warehouse_id, table = %mapped, error = %e, "cannot record the mapping's binding");
                }
                bound.by_oid.insert(oid, Arc::from(mapped.as_str()));
            }
            for (oid, r) in found.renamed {
                tracing::warn!(warehouse = %warehouse_id, mapped_table = %r.mapped_table, current_name = %r.current_name, oid, "the table of a mapping was renamed or moved: its changes flow under the mapping; update the configuration's [[mappings]] table to {:?}", r.current_name);
                let _ = state
                    .bind(
                        warehouse_id,
                        oid,
                        &r.mapped_table,
                        &r.current_name,
                        &print(&r.mapped_table),
                    )
                    .await;
            }
            for table in found.missing {
                tracing::warn!(warehouse = %warehouse_id, %table, "a mapped table is not at the warehouse, and no table it was bound to is there: its changes cannot come; check the configuration's [[mappings]]");
            }
            bound.resolved = true;
        }
        Err(e) => {
            tracing::warn!(warehouse = %warehouse_id, error = %e, "cannot read the warehouse's catalog to bind the mappings to their tables; using the bindings stored, trying again in {} s", RETRY_CATALOG.as_secs());
        }
    }
    bound
}

/// What a warehouse's catalog says of the mappings.
struct Catalog {
    /// (OID, configured table, name now) of each configured name the catalog has.
    named: Vec<(u32, String, String)>,
    /// Bound relations whose name is not the configured one any more.
    renamed: Vec<(u32, Renamed)>,
    /// Configured names with no relation by that name and no bound relation left.
    missing: Vec<String>,
}

async fn catalog(
    warehouse_id: &str,
    reader: &ToastReader,
    mappings: &HashMap<String, TableMapping>,
    stored: &[crate::store::Binding],
) -> Result<Catalog, String> {
    let client = reader
        .catalog_client(warehouse_id)
        .await
        .map_err(|e| e.to_string())?;
    let names: Vec<&str> = mappings.keys().map(String::as_str).collect();
    // The qualified name as events spell it (`schema.table`, unquoted).
    let rows = client
        .query(
            "SELECT c.oid, n.nspname || '.' || c.relname FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname || '.' || c.relname = ANY($1) AND c.relkind IN ('r', 'p')",
            &[&names],
        )
        .await
        .map_err(|e| e.to_string())?;
    let named: Vec<(u32, String, String)> = rows
        .iter()
        .map(|r| {
            let name: String = r.get(1);
            (r.get::<_, u32>(0), name.clone(), name)
        })
        .collect();
    let others: Vec<i64> = stored
        .iter()
        .filter(|b| {
            !named
                .iter()
                .any(|(oid, _, _)| i64::from(*oid) == b.relation_oid)
        })
        .map(|b| b.relation_oid)
        .collect();
    let rows = client
        .query(
            "SELECT c.oid::bigint, n.nspname || '.' || c.relname FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid::bigint = ANY($1)",
            &[&others],
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut renamed = Vec::new();
    for r in &rows {
        let (oid, now): (i64, String) = (r.get(0), r.get(1));
        let Some(b) = stored.iter().find(|b| b.relation_oid == oid) else {
            continue;
        };
        if b.mapped_table != now
            && mappings.contains_key(&b.mapped_table)
            && let Ok(oid) = u32::try_from(oid)
        {
            renamed.push((
                oid,
                Renamed {
                    mapped_table: b.mapped_table.clone(),
                    current_name: now,
                },
            ));
        }
    }
    let missing = names
        .iter()
        .filter(|t| {
            !named.iter().any(|(_, m, _)| m == *t)
                && !renamed.iter().any(|(_, r)| r.mapped_table == **t)
        })
        .map(|t| t.to_string())
        .collect();
    Ok(Catalog {
        named,
        renamed,
        missing,
    })
}
