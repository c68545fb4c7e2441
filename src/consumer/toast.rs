//! Unchanged TOAST values, read back from the warehouse so that central always receives the
//! complete mapped row.
//!
//! Under the default replica identity an `UPDATE` that leaves a TOASTed column alone carries
//! no value for it (pgoutput's `u` column kind): the event leaves the column out of `after`
//! and lists it in `source.unchanged_toast`. Central replaces `data` on upsert (DESIGN §3),
//! so an upsert without the field would erase it there. Before a batch is sent, the stage
//! reads the current values of such columns for the batch's keys from the warehouse, one
//! query per table and batch:
//!
//! ```text
//!   batch ──upserts lacking TOASTed fields──▶ SELECT key, columns FROM [ONLY] table
//!                                              JOIN unnest(keys) ──▶ fill data ──▶ send
//! ```
//!
//! The value read is the row as it is at the change's version or later. A later change of
//! the row carries its own value (or is filled the same way) and a newer version, so central
//! converges on the warehouse. A row that is gone by the time it is read was deleted, or
//! moved to another key, by a later change that follows in the stream: its upsert is not
//! sent. Under `REPLICA IDENTITY FULL` the source fills the values from the old tuple and
//! nothing is read here.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use crate::pg::ConnInfo;
use crate::pg::quote_ident;

/// Why values could not be read. Retried by the caller (nothing is sent meanwhile) unless
/// [`FillError::is_definite`]: then no retry can read them, and the changes that want them
/// are dead-lettered with the reason.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    /// The batch's warehouse has no connection settings in this process.
    #[error(
        "warehouse {0} is not configured in this process: unchanged TOAST values cannot be read from it"
    )]
    UnknownWarehouse(String),
    /// The table is not there (or not visible to the engine's role).
    #[error("table {0} is not found at the warehouse")]
    UnknownTable(String),
    /// A key or wanted column is not a column of the table.
    #[error("column {column:?} is not a column of {table}")]
    UnknownColumn {
        /// `schema.table`.
        table: String,
        /// The column.
        column: String,
    },
    /// Connecting or querying failed.
    #[error("cannot read unchanged TOAST values of {table} from warehouse {warehouse}: {source}")]
    Sql {
        /// The warehouse.
        warehouse: String,
        /// `schema.table`.
        table: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A value read is not valid in the engine's encoding.
    #[error("column {column:?} of {table}: {source}")]
    Value {
        /// `schema.table`.
        table: String,
        /// The column.
        column: String,
        /// The cause.
        #[source]
        source: crate::values::ValueError,
    },
}

impl FillError {
    /// Whether the values can never be read as asked: the table or a column is gone, or the
    /// warehouse refuses the query for what it holds (a key that its column's type does not
    /// take, say). Connection errors, timeouts and a server shutting down are worth a retry.
    pub fn is_definite(&self) -> bool {
        match self {
            FillError::UnknownWarehouse(_) => false,
            FillError::UnknownTable(_) | FillError::UnknownColumn { .. } => true,
            FillError::Value { .. } => true,
            FillError::Sql { source, .. } => source
                .downcast_ref::<tokio_postgres::Error>()
                .and_then(|e| e.code())
                .is_some_and(|c| {
                    // Class 42 (undefined table or column, no privilege), 22 (data
                    // exception: a key its type refuses), 0A (not supported).
                    let class = &c.code()[..2];
                    matches!(class, "42" | "22" | "0A")
                }),
        }
    }
}

/// One row whose columns are wanted: its key (the table's key columns and their event
/// values) and the columns to read.
#[derive(Debug, Clone, PartialEq)]
pub struct Want {
    /// Key column names and values, as the event's key carries them.
    pub key: Vec<(String, Value)>,
    /// Columns whose current values are needed.
    pub columns: Vec<String>,
}

/// A column of a warehouse table: its type, for casting keys and converting values.
#[derive(Debug, Clone)]
struct Column {
    name: String,
    type_oid: u32,
    /// `format_type` of the column (casts a key given as text).
    type_sql: String,
}

/// Reads current column values from the warehouses, keeping one connection per warehouse.
pub struct ToastReader {
    warehouses: HashMap<String, ConnInfo>,
    clients: tokio::sync::Mutex<HashMap<String, Arc<tokio_postgres::Client>>>,
    columns: std::sync::Mutex<HashMap<(String, String, u32), TableColumns>>,
}

/// A table's columns, by (warehouse, `schema.table`, OID) in the cache.
type TableColumns = Arc<TableShape>;

/// What the reader needs to know of a table.
#[derive(Debug)]
struct TableShape {
    /// Its schema and name now (a renamed table is read by its OID's current name).
    schema: String,
    name: String,
    columns: Vec<Column>,
    /// A partitioned table holds no rows itself: it is read with its partitions (a plain
    /// table is read `ONLY`, without the children of table inheritance, which are published
    /// under their own names).
    partitioned: bool,
}

impl ToastReader {
    /// A reader for these warehouses (by id).
    pub fn new(warehouses: HashMap<String, ConnInfo>) -> Self {
        Self {
            warehouses,
            clients: tokio::sync::Mutex::new(HashMap::new()),
            columns: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The current values of each want's columns (JSON as the event would carry them), in
    /// the order of `wants`; `None` where the row is gone. `table` is `schema.table` as the
    /// event names it; `oid` the relation's OID (0 when unknown): a relation renamed since is
    /// read by its current name.
    pub async fn read(
        &self,
        warehouse: &str,
        table: &str,
        oid: u32,
        wants: &[&Want],
    ) -> Result<Vec<Option<HashMap<String, Value>>>, FillError> {
        let result = self.read_once(warehouse, table, oid, wants).await;
        if result.is_err() {
            // A dropped connection or an altered table: start afresh on the next try.
            self.clients.lock().await.remove(warehouse);
            if let Ok(mut c) = self.columns.lock() {
                c.remove(&(warehouse.to_string(), table.to_string(), oid));
            }
        }
        result
    }

    /// A connection to `warehouse` of its own, for a few catalog queries: closed once
    /// dropped, so that a process that does not deliver the warehouse holds none to it.
    pub async fn catalog_client(
        &self,
        warehouse: &str,
    ) -> Result<tokio_postgres::Client, FillError> {
        let conn = self
            .warehouses
            .get(warehouse)
            .ok_or_else(|| FillError::UnknownWarehouse(warehouse.to_string()))?;
        crate::pg::connect_sql(conn)
            .await
            .map_err(|e| FillError::Sql {
                warehouse: warehouse.to_string(),
                table: "pg_catalog".to_string(),
                source: Box::new(e),
            })
    }

    async fn read_once(
        &self,
        warehouse: &str,
        table: &str,
        oid: u32,
        wants: &[&Want],
    ) -> Result<Vec<Option<HashMap<String, Value>>>, FillError> {
        let mut out = vec![None; wants.len()];
        let Some(first) = wants.first() else {
            return Ok(out);
        };
        let client = self.client(warehouse, table).await?;
        let shape = self.table_columns(&client, warehouse, table, oid).await?;
        let column = |name: &str| {
            shape
                .columns
                .iter()
                .find(|c| c.name == name)
                .ok_or_else(|| FillError::UnknownColumn {
                    table: table.to_string(),
                    column: name.to_string(),
                })
        };
        let key_columns: Vec<&Column> = first
            .key
            .iter()
            .map(|(n, _)| column(n))
            .collect::<Result<_, _>>()?;
        let mut wanted: Vec<&Column> = Vec::new();
        for w in wants {
            for c in &w.columns {
                let c = column(c)?;
                if !wanted.iter().any(|w| w.name == c.name) {
                    wanted.push(c);
                }
            }
        }
        // One text array per key column, a want's key at the same index in each.
        let mut keys: Vec<Vec<String>> = vec![Vec::with_capacity(wants.len()); key_columns.len()];
        for w in wants {
            for (i, kc) in key_columns.iter().enumerate() {
                let v = w.key.iter().find(|(n, _)| *n == kc.name).map(|(_, v)| v);
                keys[i].push(v.map(key_text).unwrap_or_default());
            }
        }
        let args: Vec<String> = (1..=key_columns.len())
            .map(|i| format!("${i}::text[]"))
            .collect();
        let aliases: Vec<String> = (0..key_columns.len()).map(|i| format!("k{i}")).collect();
        let join: Vec<String> = key_columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let given = if c.type_sql == "bytea" {
                    format!("decode(k.k{i}, 'base64')")
                } else {
                    format!("k.k{i}::{}", c.type_sql)
                };
                format!("t.{} = {given}", quote_ident(&c.name))
            })
            .collect();
        let selected: Vec<String> = wanted
            .iter()
            .map(|c| format!("t.{}::text", quote_ident(&c.name)))
            .collect();
        let query = format!(
            "SELECT k.ord, {} FROM unnest({}) WITH ORDINALITY AS k({}, ord) \
             JOIN {}{}.{} AS t ON {}",
            selected.join(", "),
            args.join(", "),
            aliases.join(", "),
            if shape.partitioned { "" } else { "ONLY " },
            quote_ident(&shape.schema),
            quote_ident(&shape.name),
            join.join(" AND ")
        );
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = keys
            .iter()
            .map(|k| k as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let rows = client
            .query(&query, &params)
            .await
            .map_err(|e| self.sql_error(warehouse, table, e))?;
        for row in rows {
            let ord: i64 = row.get(0);
            let Some(slot) = usize::try_from(ord - 1).ok().and_then(|i| out.get_mut(i)) else {
                continue;
            };
            let mut values = HashMap::with_capacity(wanted.len());
            for (i, c) in wanted.iter().enumerate() {
                let text: Option<&str> = row.get(i + 1);
                let v = match text {
                    None => Value::Null,
                    Some(t) => {
                        let v = crate::values::convert_text(c.type_oid, t.as_bytes()).map_err(
                            |source| FillError::Value {
                                table: table.to_string(),
                                column: c.name.clone(),
                                source,
                            },
                        )?;
                        super::mapping::json_value(&v)
                    }
                };
                values.insert(c.name.clone(), v);
            }
            *slot = Some(values);
        }
        Ok(out)
    }

    async fn client(
        &self,
        warehouse: &str,
        table: &str,
    ) -> Result<Arc<tokio_postgres::Client>, FillError> {
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(warehouse).filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let conn = self
            .warehouses
            .get(warehouse)
            .ok_or_else(|| FillError::UnknownWarehouse(warehouse.to_string()))?;
        let client = crate::pg::connect_sql(conn)
            .await
            .map_err(|e| FillError::Sql {
                warehouse: warehouse.to_string(),
                table: table.to_string(),
                source: Box::new(e),
            })?;
        let client = Arc::new(client);
        clients.insert(warehouse.to_string(), client.clone());
        Ok(client)
    }

    async fn table_columns(
        &self,
        client: &tokio_postgres::Client,
        warehouse: &str,
        table: &str,
        oid: u32,
    ) -> Result<TableColumns, FillError> {
        let cache_key = (warehouse.to_string(), table.to_string(), oid);
        if let Some(c) = self
            .columns
            .lock()
            .ok()
            .and_then(|c| c.get(&cache_key).cloned())
        {
            return Ok(c);
        }
        // By OID when the event gave one (the name may have changed since); else by the
        // qualified name as events spell it.
        let rows = client
            .query(
                "SELECT a.attname::text, a.atttypid, format_type(a.atttypid, a.atttypmod),
                        c.relkind = 'p', n.nspname::text, c.relname::text
                   FROM pg_attribute a
                   JOIN pg_class c ON c.oid = a.attrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE CASE WHEN $1::oid <> 0 THEN c.oid = $1::oid
                             ELSE n.nspname || '.' || c.relname = $2 END
                    AND a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY a.attnum",
                &[&oid, &table],
            )
            .await
            .map_err(|e| self.sql_error(warehouse, table, e))?;
        if rows.is_empty() {
            return Err(FillError::UnknownTable(table.to_string()));
        }
        let columns: TableColumns = Arc::new(TableShape {
            schema: rows[0].get(4),
            name: rows[0].get(5),
            partitioned: rows[0].get(3),
            columns: rows
                .iter()
                .map(|r| Column {
                    name: r.get(0),
                    type_oid: r.get(1),
                    type_sql: r.get(2),
                })
                .collect(),
        });
        if let Ok(mut c) = self.columns.lock() {
            c.insert(cache_key, columns.clone());
        }
        Ok(columns)
    }

    fn sql_error(&self, warehouse: &str, table: &str, e: tokio_postgres::Error) -> FillError {
        FillError::Sql {
            warehouse: warehouse.to_string(),
            table: table.to_string(),
            source: Box::new(e),
        }
    }
}

/// A key value as the text Postgres parses back into the column's type (bytea stays base64
/// and is decoded in the query).
fn key_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Array(items) => array_literal(items),
        other => other.to_string(),
    }
}

/// An array key value as PostgreSQL's array input reads it: `{"a","b\"c",NULL}` (nested
/// arrays nested), each element quoted with its backslashes and quotes escaped.
fn array_literal(items: &[Value]) -> String {
    let mut out = String::from("{");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match item {
            Value::Null => out.push_str("NULL"),
            Value::Array(inner) => out.push_str(&array_literal(inner)),
            other => {
                out.push('"');
                for c in key_text(other).chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            }
        }
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::key_text;
    use serde_json::json;

    #[test]
    fn keys_are_given_to_postgres_in_their_text_form() {
        assert_eq!(key_text(&json!("SKU-1")), "SKU-1");
        assert_eq!(key_text(&json!(42)), "42");
        assert_eq!(key_text(&json!(true)), "true");
        assert_eq!(key_text(&json!("12.50")), "12.50");
        assert_eq!(
            key_text(&json!(["a", "b\"c\\", null, [1, 2]])),
            r#"{"a","b\"c\\",NULL,{"1","2"}}"#
        );
    }
}
