//! `inventorysync rebase <warehouse>`: the way back after a warehouse was restored or
//! recovered to an earlier point (see [`crate::source::stream::check_origin`]).
//!
//! Versions are positions in the warehouse's WAL, and central keeps the highest it has seen
//! per key. After a restore, the new history's positions are lower than the versions central
//! holds, so every change would be "stale". Rebasing moves the warehouse's WAL forward past
//! every version central may hold (a WAL segment switch at a time: cheap, each switch ends a
//! segment), records the new history with the checkpoint, and drops the slot. The next `run`
//! creates the slot and loads every published table again, at versions above anything
//! central has, so central takes the restored rows; changes stream from there.

use crate::Lsn;
use crate::app::WarehouseConfig;
use crate::source::conn::ReplicationConnection;
use crate::store::{Origin, StateDb};

/// What a rebase did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebased {
    /// The warehouse's WAL position before.
    pub from: Lsn,
    /// The position it was moved past: the checkpoint or the highest version sent, whichever
    /// is higher.
    pub past: Lsn,
    /// Its position after.
    pub to: Lsn,
    /// WAL segment switches it took.
    pub switches: u64,
    /// Whether the engine's slot existed and was dropped.
    pub dropped_slot: bool,
    /// Loads and resyncs under way that were failed (a fresh load replaces them).
    pub failed_jobs: u64,
    /// The history now recorded with the checkpoint.
    pub origin: Origin,
}

/// Rebases `w` (see the module docs). Errors say what failed and what to do.
pub async fn rebase(state: &StateDb, w: &WarehouseConfig) -> Result<Rebased, String> {
    let checkpoint = state
        .checkpoint(&w.id)
        .await
        .map_err(|e| format!("cannot read the checkpoint: {e}"))?;
    let sent = state
        .sent_version(&w.id)
        .await
        .map_err(|e| format!("cannot read the consumer's progress: {e}"))?;
    let sent_lsn = sent
        .as_deref()
        .and_then(|v| v.split(':').next())
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .map_or(Lsn::ZERO, Lsn);
    let past = checkpoint
        .as_ref()
        .map_or(Lsn::ZERO, |c| c.flush_lsn)
        .max(sent_lsn);
    let sql = crate::pg::connect_sql(&w.conn)
        .await
        .map_err(|e| format!("cannot connect to warehouse {}: {e}", w.id))?;
    let current = || async {
        sql.query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(|e| format!("cannot read the WAL position: {e}"))
            .and_then(|r| {
                r.get::<_, String>(0)
                    .parse::<Lsn>()
                    .map_err(|e| format!("WAL position: {e}"))
            })
    };
    let from = current().await?;
    let mut to = from;
    let mut switches = 0u64;
    while to <= past {
        // A segment switch needs WAL written since the last one.
        sql.batch_execute(
            "SELECT pg_logical_emit_message(false, 'inventorysync', 'rebase'); SELECT pg_switch_wal();",
        )
        .await
        .map_err(|e| {
            format!(
                "cannot switch the WAL segment on warehouse {}: {e} (pg_switch_wal needs a superuser, or GRANT EXECUTE ON FUNCTION pg_switch_wal() TO {})",
                w.id, w.conn.user
            )
        })?;
        switches += 1;
        to = current().await?;
        if switches.is_multiple_of(1000) {
            tracing::info!(warehouse = %w.id, at = %to, target = %past, switches, "moving the WAL forward");
        }
    }
    let dropped_slot = crate::source::slot::drop_slot(&sql, &w.slot)
        .await
        .map_err(|e| {
            format!(
                "cannot drop slot {} (stop the run process that streams it first): {e}",
                w.slot
            )
        })?;
    // A load or resync under way read chunks of the lost history: the next run starts a
    // fresh load of every table instead of resuming it.
    let failed_jobs = state
        .fail_reads_of(
            &w.id,
            "superseded by a rebase of the warehouse (a new load follows)",
        )
        .await
        .map_err(|e| format!("cannot fail the warehouse's loads and resyncs: {e}"))?;
    // Xids recorded in the lost history say nothing of the restored one's (its xid counter
    // went back): a verify would date rows wrongly (`older_at_central`).
    state
        .forget_xid_positions(&w.id)
        .await
        .map_err(|e| format!("cannot forget the warehouse's xid positions: {e}"))?;
    let mut repl = ReplicationConnection::connect(&w.conn)
        .await
        .map_err(|e| format!("cannot connect for replication: {e}"))?;
    let (system_id, timeline, _) = repl
        .identify_system()
        .await
        .map_err(|e| format!("IDENTIFY_SYSTEM: {e}"))?;
    let origin = Origin {
        system_id,
        timeline,
    };
    state
        .record_origin(&w.id, &w.slot, &origin)
        .await
        .map_err(|e| format!("cannot record the warehouse's WAL history: {e}"))?;
    Ok(Rebased {
        from,
        past,
        to,
        switches,
        dropped_slot,
        failed_jobs,
        origin,
    })
}
