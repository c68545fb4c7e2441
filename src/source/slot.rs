//! Slot and publication checks before streaming: turns setup mistakes into definite errors.
//!
//! Every check reads the catalog and never changes the warehouse, except slot creation when
//! asked for. A slot held by another process is retried for a while first, since a previous
//! connection of our own may still be shutting down on the server.

use std::time::Duration;

use super::SourceError;
use super::conn::{ReplicationConnection, quote_literal};
use crate::Lsn;

/// What we found about the slot.
#[derive(Debug, Clone)]
pub struct SlotState {
    /// `confirmed_flush_lsn`.
    pub confirmed_flush: Lsn,
    /// Whether it is a failover slot (none: the server is older than 17 and has none).
    pub failover: Option<bool>,
}

/// The first server version with failover slots (`server_version_num`).
pub const FAILOVER_SINCE: u32 = 170_000;

/// `failover = true` on a server without failover slots is a configuration error.
pub fn check_failover_support(warehouse: &str, server_version: u32) -> Result<(), SourceError> {
    if server_version < FAILOVER_SINCE {
        return Err(SourceError::Config(format!(
            "warehouses.{warehouse}.failover = true needs PostgreSQL 17 or later (failover slots); this server is PostgreSQL {}: remove failover, or upgrade",
            version_text(server_version)
        )));
    }
    Ok(())
}

/// `150018` as `15.18`, `90624` as `9.6.24`.
pub fn version_text(num: u32) -> String {
    if num >= 100_000 {
        format!("{}.{}", num / 10_000, num % 10_000)
    } else {
        format!("{}.{}.{}", num / 10_000, num / 100 % 100, num % 100)
    }
}

/// Makes an existing slot a failover slot (it must not be streaming).
pub async fn make_failover(
    conn: &mut ReplicationConnection,
    slot: &str,
) -> Result<(), SourceError> {
    conn.simple_query(&format!("ALTER_REPLICATION_SLOT {slot} (FAILOVER true)"))
        .await?;
    tracing::info!(
        slot,
        "the slot is a failover slot now: standbys with sync_replication_slots keep a copy"
    );
    Ok(())
}

/// A slot created by us, with the exported snapshot of its consistent point.
#[derive(Debug, Clone)]
pub struct CreatedSlot {
    /// Where streaming starts.
    pub consistent_point: Lsn,
    /// Exported snapshot name, valid while the creating connection stays idle.
    pub snapshot_name: String,
}

/// Checks `wal_level` through the replication connection.
pub async fn check_wal_level(conn: &mut ReplicationConnection) -> Result<(), SourceError> {
    let rows = conn.simple_query("SHOW wal_level").await?;
    let level = rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .unwrap_or_default();
    if level != "logical" {
        return Err(SourceError::WalLevelNotLogical { found: level });
    }
    Ok(())
}

/// On a standby (`sql`) whose primary is `primary`: while the publication exists on the
/// primary but not yet on the standby (its creation is not replayed yet), waits for the
/// replay, saying so, instead of stopping the warehouse. Returns at once when the standby
/// has it, or when the primary does not have it either (the check that follows says so).
pub async fn await_replayed_publication(
    sql: &tokio_postgres::Client,
    primary: &tokio_postgres::Client,
    publication: &str,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(), SourceError> {
    const ASK: &str = "SELECT 1 FROM pg_publication WHERE pubname = $1";
    let started = std::time::Instant::now();
    let mut said = None::<std::time::Instant>;
    loop {
        if !sql.query(ASK, &[&publication]).await?.is_empty()
            || primary.query(ASK, &[&publication]).await?.is_empty()
        {
            if said.is_some() {
                tracing::info!(%publication, waited_s = started.elapsed().as_secs(), "the standby replayed the publication");
            }
            return Ok(());
        }
        if said.is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(30)) {
            tracing::warn!(%publication, waited_s = started.elapsed().as_secs(), "publication exists on the primary but the standby has not replayed it yet: waiting for the standby to catch up (check its replay lag if this lasts)");
            said = Some(std::time::Instant::now());
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            _ = cancel.cancelled() => return Ok(()),
        }
    }
}

/// Checks that the publication exists.
pub async fn check_publication(
    sql: &tokio_postgres::Client,
    publication: &str,
) -> Result<(), SourceError> {
    let n = sql
        .query(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .len();
    if n == 0 {
        return Err(SourceError::PublicationMissing {
            publication: publication.to_string(),
        });
    }
    Ok(())
}

/// Looks the slot up; waits up to `busy_wait` for another holder to let go.
pub async fn inspect_slot(
    sql: &tokio_postgres::Client,
    slot: &str,
    busy_wait: Duration,
) -> Result<Option<SlotState>, SourceError> {
    let deadline = tokio::time::Instant::now() + busy_wait;
    loop {
        let rows = sql
            .query(
                // `failover` is a column from PostgreSQL 17 on: read through jsonb, it is
                // null before.
                "SELECT active_pid, wal_status, confirmed_flush_lsn::text, plugin, database = current_database(), \
                        (to_jsonb(s) ->> 'failover')::bool \
                 FROM pg_replication_slots s WHERE slot_name = $1",
                &[&slot],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let pid: Option<i32> = row.get(0);
        let wal_status: Option<String> = row.get(1);
        let flush: Option<String> = row.get(2);
        let plugin: Option<String> = row.get(3);
        let same_db: Option<bool> = row.get(4);
        let failover: Option<bool> = row.get(5);
        if plugin.as_deref() != Some("pgoutput") || same_db != Some(true) {
            return Err(SourceError::Config(format!(
                "replication slot {slot:?} already exists for another database or output plugin (plugin {}); choose another slot name",
                plugin.as_deref().unwrap_or("none")
            )));
        }
        if wal_status.as_deref() == Some("lost") {
            return Err(SourceError::SlotInvalidated {
                slot: slot.to_string(),
            });
        }
        match pid {
            Some(pid) if tokio::time::Instant::now() < deadline => {
                tracing::info!(slot, pid, "slot is held by another process; waiting");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Some(pid) => {
                return Err(SourceError::SlotInUse {
                    slot: slot.to_string(),
                    detail: format!("active for PID {pid}"),
                });
            }
            None => {
                let confirmed_flush = flush
                    .as_deref()
                    .map(str::parse)
                    .transpose()
                    .map_err(|e| SourceError::Protocol(format!("confirmed_flush_lsn: {e}")))?
                    .unwrap_or(Lsn::ZERO);
                return Ok(Some(SlotState {
                    confirmed_flush,
                    failover,
                }));
            }
        }
    }
}

/// Creates the slot with an exported snapshot.
pub async fn create_slot(
    conn: &mut ReplicationConnection,
    slot: &str,
    temporary: bool,
    failover: bool,
) -> Result<CreatedSlot, SourceError> {
    let temporary = if temporary { " TEMPORARY" } else { "" };
    // The option list is PostgreSQL 15+ syntax (failover slots are 17+); the old keyword
    // works on every version.
    let options = if failover {
        "(SNAPSHOT 'export', FAILOVER)"
    } else {
        "EXPORT_SNAPSHOT"
    };
    let rows = conn
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {slot}{temporary} LOGICAL pgoutput {options}"
        ))
        .await
        .map_err(|e| match e {
            SourceError::Server(s) if s.code == "42710" => SourceError::Config(format!(
                "replication slot {slot:?} was created by someone else meanwhile: {}",
                s.message
            )),
            other => other,
        })?;
    let row = rows
        .first()
        .ok_or_else(|| SourceError::Protocol("CREATE_REPLICATION_SLOT returned no row".into()))?;
    let consistent_point = row
        .get(1)
        .cloned()
        .flatten()
        .unwrap_or_default()
        .parse()
        .map_err(|e| SourceError::Protocol(format!("consistent_point: {e}")))?;
    let snapshot_name = row
        .get(2)
        .cloned()
        .flatten()
        .ok_or_else(|| SourceError::Protocol("no exported snapshot".into()))?;
    Ok(CreatedSlot {
        consistent_point,
        snapshot_name,
    })
}

/// What the server says about a slot's hold on WAL (`pg_replication_slots`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotHealth {
    /// `wal_status`: reserved, extended, unreserved or lost.
    pub wal_status: String,
    /// WAL the slot keeps from being removed: current WAL position minus `restart_lsn`.
    pub retained_wal_bytes: i64,
    /// `safe_wal_size`: bytes that can still be written before the slot is in danger
    /// (none when `max_slot_wal_keep_size` is unlimited).
    pub safe_wal_size: Option<i64>,
    /// WAL between the current position and the slot's `confirmed_flush_lsn`: what is not
    /// yet confirmed as delivered.
    pub lag_bytes: i64,
    /// The publication's tables (relation OID, `schema.table`), read with the health: what
    /// the load check compares with the tables loaded so far, with no connection of its own.
    pub published: Vec<(u32, String)>,
    /// This database's other slots with the engine's prefix, read with the health: a slot
    /// no configured warehouse uses (left by a renamed or removed one) retains WAL for ever.
    pub other_slots: Vec<OtherSlot>,
}

/// The prefix of the slots the engine names by default (`inventorysync_<warehouse>`).
pub const SLOT_PREFIX: &str = "inventorysync_";

/// A logical slot of the same database with the engine's prefix (see [`other_slots`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherSlot {
    /// Its name.
    pub name: String,
    /// Whether some process streams from it now.
    pub active: bool,
    /// WAL it keeps from being removed.
    pub retained_wal_bytes: i64,
}

impl OtherSlot {
    /// What `check` and the console say of it when no configured warehouse uses it.
    pub fn detail(&self) -> String {
        format!(
            "{} is no configured warehouse's slot and retains {} MB of WAL{}",
            self.name,
            self.retained_wal_bytes / (1 << 20),
            if self.active {
                " (in use by some process)"
            } else {
                ""
            }
        )
    }

    /// The statement that drops it (the slot's name quoted as a literal).
    pub fn drop_statement(&self) -> String {
        format!(
            "SELECT pg_drop_replication_slot('{}');",
            self.name.replace('\'', "''")
        )
    }
}

/// This database's logical slots named with [`SLOT_PREFIX`], but for those in `except`, in
/// name order.
pub async fn other_slots(
    sql: &tokio_postgres::Client,
    except: &[&str],
) -> Result<Vec<OtherSlot>, tokio_postgres::Error> {
    let rows = sql
        .query(
            "SELECT slot_name::text, active,
                    coalesce(pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, restart_lsn), 0)::bigint
               FROM pg_replication_slots
              WHERE database = current_database() AND slot_type = 'logical'
                AND starts_with(slot_name::text, $1) AND NOT slot_name::text = ANY($2)
              ORDER BY slot_name",
            &[&SLOT_PREFIX, &except],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| OtherSlot {
            name: r.get(0),
            active: r.get(1),
            retained_wal_bytes: r.get(2),
        })
        .collect())
}

/// The tables of `publication` in this database: relation OID and `schema.table`, in name
/// order.
pub async fn published_relations(
    sql: &tokio_postgres::Client,
    publication: &str,
) -> Result<Vec<(u32, String)>, tokio_postgres::Error> {
    let rows = sql
        .query(
            "SELECT c.oid, p.schemaname::text || '.' || p.tablename::text
               FROM pg_publication_tables p
               JOIN pg_namespace n ON n.nspname = p.schemaname
               JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename
              WHERE p.pubname = $1 ORDER BY 2",
            &[&publication],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Drops this database's slot `slot` if it exists; true when one was dropped (an active
/// slot is an error: its walsender holds it).
pub async fn drop_slot(sql: &tokio_postgres::Client, slot: &str) -> Result<bool, SourceError> {
    let rows = sql
        .query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
              WHERE slot_name = $1 AND database = current_database()",
            &[&slot],
        )
        .await?;
    Ok(rows.len() == 1)
}

/// Reads the slot's health; `None` when the slot does not exist.
pub async fn slot_health(
    sql: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<SlotHealth>, SourceError> {
    let row = sql
        .query_opt(
            "SELECT coalesce(wal_status, 'unknown'), \
                    coalesce(pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, restart_lsn), 0)::bigint, \
                    safe_wal_size, \
                    coalesce(pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, confirmed_flush_lsn), 0)::bigint \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| SlotHealth {
        wal_status: r.get(0),
        retained_wal_bytes: r.get(1),
        safe_wal_size: r.get(2),
        lag_bytes: r.get(3),
        published: Vec::new(),
        other_slots: Vec::new(),
    }))
}

/// Maps errors of `START_REPLICATION` to what the user must do.
pub fn classify_start_error(e: SourceError, slot: &str, publication: &str) -> SourceError {
    match e {
        SourceError::Server(s) => {
            let msg = s.message.to_lowercase();
            if msg.contains("publication") && msg.contains("does not exist") {
                SourceError::PublicationMissing {
                    publication: publication.to_string(),
                }
            } else if s.code == "55006" {
                SourceError::SlotInUse {
                    slot: slot.to_string(),
                    detail: s.message,
                }
            } else if s.code == "42704" {
                SourceError::SlotMissing {
                    slot: slot.to_string(),
                }
            } else if msg.contains("invalidated")
                // The slot still exists, but WAL it needs is gone: lost all the same.
                || (s.code == "58P01" && msg.contains("has already been removed"))
                || s.detail
                    .as_deref()
                    .is_some_and(|d| d.contains("invalidated"))
            {
                SourceError::SlotInvalidated {
                    slot: slot.to_string(),
                }
            } else {
                SourceError::Server(s)
            }
        }
        other => other,
    }
}

/// The `START_REPLICATION` command.
pub fn start_replication_sql(slot: &str, start: Lsn, publication: &str, streaming: bool) -> String {
    let pubs = quote_literal(&format!("\"{publication}\""));
    let mut opts = format!(
        "proto_version '{}', publication_names {pubs}, messages 'true'",
        if streaming { 2 } else { 1 }
    );
    if streaming {
        opts.push_str(", streaming 'on'");
    }
    format!("START_REPLICATION SLOT {slot} LOGICAL {start} ({opts})")
}
