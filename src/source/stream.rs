//! The replication loop: one warehouse slot in, batches of `StreamItem`s out.
//!
//! ```text
//!   socket ──frames──▶ decode ──▶ assemble ──batches──▶ out (bounded channel)
//!      ▲                                                    │
//!      └── standby status (flush = durable) ◀── durable ◀───┘ (watch: highest delivered commit end)
//! ```
//!
//! One `select!` serves the socket, a feedback timer and the durable position reported by
//! the consumer. Status updates go out when the server asks, on the timer (at most
//! `min(10 s, wal_sender_timeout / 2)` apart, as the walsender expects, see
//! <https://www.postgresql.org/docs/15/protocol-replication.html>) and whenever the durable
//! position moves. While the consumer is slow the loop stops reading the socket, which makes
//! the walsender wait, but it keeps sending status updates so the server never times it out.
//! `flush_lsn` is only ever what the consumer says is durable: a crash replays, never loses.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::assemble::{Assembler, Next, SourceIdentity, StreamItem};
use super::conn::{Frame, FrameReader, FrameWriter, ReplicationConnection};
use super::marker::Markers;
use super::pgoutput::{
    LogicalMessage, PG_EPOCH_OFFSET_MICROS, PgOutputDecoder, ReplicationMessage,
    decode_logical_message, decode_replication_message, encode_standby_status_update,
};
use super::snapshot::{SnapshotTarget, initial_load, primary_key, published_tables};
use super::{SourceError, slot};
use crate::Lsn;
use crate::pg::ConnInfo;
use crate::pg::tls;
use crate::store::Origin;

/// Events per batch handed downstream at most.
const MAX_BATCH_ITEMS: usize = 1024;
/// How long a stop waits for the stream to read to the commit of the transaction it is
/// inside: handed on in part, the next owner would send that part again.
const STOP_AT_COMMIT_LIMIT: Duration = Duration::from_secs(60);

/// How often an idle stream confirms the position a keepalive reports.
const IDLE_CONFIRM_EVERY: Duration = Duration::from_secs(1);
/// How far a keepalive's position may run ahead before it is confirmed at once.
const IDLE_CONFIRM_BYTES: u64 = 16 << 20;

/// What to stream and how.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Warehouse id for events.
    pub warehouse_id: String,
    /// Warehouse connection.
    pub conn: ConnInfo,
    /// Slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// Create the slot (with an initial load) when it does not exist.
    pub create_slot: bool,
    /// The slot is a failover slot (PostgreSQL 17+), synchronized to standbys: created as
    /// one, or altered into one when it is not.
    pub failover: bool,
    /// Protocol 2 with streaming of in-progress transactions.
    pub streaming: bool,
    /// Stop once everything committed up to here is delivered.
    pub endpos: Option<Lsn>,
    /// Memory for in-progress streamed transactions before spilling to disk.
    pub stream_memory_bytes: usize,
    /// How long to wait for a slot held by another process.
    pub slot_busy_wait: Duration,
    /// Reconnect attempts on transient errors before giving up (none: forever).
    pub max_reconnects: Option<u32>,
    /// How often the slot's health is read while streaming.
    pub health_interval: Duration,
    /// Where the latest slot health goes (for metrics and readiness).
    pub health: Option<Arc<watch::Sender<Option<slot::SlotHealth>>>>,
    /// Called each time the server has opened the replication stream (after
    /// `START_REPLICATION`): from then on the warehouse streams, not before.
    pub on_streaming: Option<OnStreaming>,
    /// How a slot's tables are read before (or while) its changes stream.
    pub initial_load: InitialLoad,
    /// Write a heartbeat into the warehouse's WAL this often (none: never; `tail` writes
    /// nothing to the database).
    pub heartbeat_interval: Option<Duration>,
    /// The primary of the standby `conn` points at, where logical messages are written (see
    /// [`super::marker`]).
    pub primary: Option<ConnInfo>,
    /// Where forced-resync chunk requests come from (none: `tail`, which never resyncs).
    pub chunks: Option<super::resync::ChunkInbox>,
    /// Checks, at each connection, that the server still has the WAL history the checkpoint
    /// belongs to (none: `tail`, which keeps no checkpoint).
    pub origin: Option<OriginGuard>,
}

/// The WAL history check of a stream with a checkpoint (see [`check_origin`]).
#[derive(Clone)]
pub struct OriginGuard {
    /// The history the stored checkpoint belongs to, if one was recorded.
    pub expected: Option<Origin>,
    /// Records the server's history durably before anything streams; the error is retried.
    pub record: OriginHook,
}

impl std::fmt::Debug for OriginGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OriginGuard")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

/// Told each time the replication stream opens (see [`SourceOptions::on_streaming`]).
#[derive(Clone)]
pub struct OnStreaming(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for OnStreaming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnStreaming")
    }
}

/// Records the WAL history a stream reads (see [`OriginGuard`]).
pub type OriginHook = Arc<
    dyn Fn(Origin) -> futures_util::future::BoxFuture<'static, Result<(), String>> + Send + Sync,
>;

impl SourceOptions {
    /// Options with the defaults for everything but the names.
    pub fn new(warehouse_id: &str, conn: ConnInfo, slot: &str, publication: &str) -> Self {
        Self {
            warehouse_id: warehouse_id.to_string(),
            conn,
            slot: slot.to_string(),
            publication: publication.to_string(),
            create_slot: false,
            failover: false,
            streaming: false,
            endpos: None,
            stream_memory_bytes: 64 << 20,
            slot_busy_wait: Duration::from_secs(10),
            max_reconnects: None,
            heartbeat_interval: None,
            primary: None,
            health_interval: Duration::from_secs(10),
            health: None,
            on_streaming: None,
            initial_load: InitialLoad::Snapshot,
            chunks: None,
            origin: None,
        }
    }
}

/// How the published tables are read for a slot that has not delivered them.
#[derive(Clone)]
pub enum InitialLoad {
    /// A slot created here is created with an exported snapshot, and the tables are read in
    /// it before streaming starts from the consistent point (`tail`: nothing to resume, no
    /// state DB).
    Snapshot,
    /// Streaming starts at once, and the tables are read through the stream in chunks, as a
    /// forced resync reads them (see [`super::resync`]), with progress saved per chunk: a
    /// crash during the load resumes with the next chunk. The hook is awaited before
    /// streaming whenever the slot needs its load: created here, or found without a
    /// checkpoint of its own, or confirmed past the checkpoint (dropped and created again
    /// by someone else). It must durably schedule the load (once; it is called again after
    /// a reconnect until a checkpoint exists).
    Incremental(LoadHook),
}

impl std::fmt::Debug for InitialLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InitialLoad::Snapshot => "Snapshot",
            InitialLoad::Incremental(_) => "Incremental",
        })
    }
}

/// Schedules a slot's initial load (see [`InitialLoad::Incremental`]); the error is retried.
pub type LoadHook = Arc<
    dyn Fn(LoadNeeded) -> futures_util::future::BoxFuture<'static, Result<(), String>>
        + Send
        + Sync,
>;

/// Why a slot needs its initial load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadNeeded {
    /// The slot.
    pub slot: String,
    /// Where its stream starts.
    pub start: Lsn,
    /// Why, for the log.
    pub reason: String,
    /// The slot had streamed before (a checkpoint exists): it was lost, dropped or created
    /// again, so rows deleted meanwhile may still be at central.
    pub lost: bool,
}

/// Streams the slot until cancelled, until `endpos`, or until a definite error. Transient
/// errors reconnect with capped exponential backoff and jitter, resuming from the durable
/// position. `durable` carries the highest commit end LSN the consumer has made durable.
pub async fn run(
    opts: &SourceOptions,
    out: mpsc::Sender<Vec<StreamItem>>,
    mut durable: watch::Receiver<Lsn>,
    cancel: CancellationToken,
) -> Result<(), SourceError> {
    let mut backoff = crate::backoff::Backoff::new();
    // Set while the session is inside a transaction (between its Begin and its Commit): a
    // stop then lets the session read on to the commit on its own, for a while.
    let open_tx = Arc::new(AtomicBool::new(false));
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            r = run_once(opts, &out, &mut durable, &cancel, &open_tx) => r,
            waited = stopped(&cancel, &open_tx) => {
                if waited {
                    tracing::warn!(warehouse = %opts.warehouse_id, limit_s = STOP_AT_COMMIT_LIMIT.as_secs(), "stopping inside a transaction: its commit did not come in time; the next start sends what of it was handed on again");
                }
                Ok(())
            }
        };
        match result {
            Ok(()) => return Ok(()),
            // Reconnecting cannot bring back whoever took the events: the caller decides
            // (run restarts the pipeline, tail stops).
            Err(SourceError::DownstreamGone) => return Err(SourceError::DownstreamGone),
            Err(e) if e.is_transient() => {
                let wait = backoff.next_delay(started.elapsed());
                if opts.max_reconnects.is_some_and(|m| backoff.failures() > m) {
                    return Err(e);
                }
                tracing::warn!(warehouse = %opts.warehouse_id, error = %e, retry_in_ms = wait.as_millis() as u64, "replication connection failed; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = cancel.cancelled() => return Ok(()),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Completes once `cancel` fired and the session cannot stop on its own: at once when it is
/// not inside a transaction (it was still connecting, or stops at the next frame anyway),
/// after [`STOP_AT_COMMIT_LIMIT`] when it is reading on to a commit; whether it waited.
async fn stopped(cancel: &CancellationToken, open_tx: &AtomicBool) -> bool {
    cancel.cancelled().await;
    let inside = open_tx.load(Ordering::SeqCst);
    if inside {
        tokio::time::sleep(STOP_AT_COMMIT_LIMIT).await;
    }
    inside
}

async fn run_once(
    opts: &SourceOptions,
    out: &mpsc::Sender<Vec<StreamItem>>,
    durable: &mut watch::Receiver<Lsn>,
    cancel: &CancellationToken,
    open_tx: &Arc<AtomicBool>,
) -> Result<(), SourceError> {
    let mut conn = ReplicationConnection::connect(&opts.conn).await?;
    let (system_id, timeline, xlogpos) = conn.identify_system().await?;
    tracing::debug!(warehouse = %opts.warehouse_id, system_id, timeline, %xlogpos, server_version = conn.server_version, "connected for replication");
    if let Some(guard) = &opts.origin {
        let current = Origin {
            system_id: system_id.clone(),
            timeline,
        };
        let checkpoint = *durable.borrow();
        check_origin(
            &mut conn,
            &opts.warehouse_id,
            guard.expected.as_ref(),
            &current,
            checkpoint,
            xlogpos,
        )
        .await?;
        if guard.expected.as_ref() != Some(&current) {
            (guard.record)(current).await.map_err(|e| SourceError::Io {
                target: "the state DB".into(),
                source: std::io::Error::other(format!(
                    "cannot record the warehouse's WAL history: {e}"
                )),
            })?;
        }
    }
    slot::check_wal_level(&mut conn).await?;
    if opts.failover {
        slot::check_failover_support(&opts.warehouse_id, conn.server_version)?;
    }
    // On the server the replication connection went to (of several hosts: the one that fit).
    let mut sql = tls::connect_sql(conn.server()).await?;
    // What this session writes (resync watermarks, heartbeats) must reach the walsender at
    // once: with the server's synchronous_commit off, WAL is flushed only every
    // wal_writer_delay (200 ms), and a chunk waits for its high watermark to be decoded.
    // `local`, not `on`: a synchronous standby need not confirm them (the walsender only
    // needs the local flush), so a slow or absent standby never holds a chunk up.
    sql.batch_execute("SET synchronous_commit TO local").await?;
    let markers = Markers::open(&sql, opts.primary.as_ref(), &opts.warehouse_id).await?;
    if let Markers::Primary(primary) = &markers {
        // On a standby, a publication created on the primary may not be replayed yet.
        slot::await_replayed_publication(&sql, primary, &opts.publication, cancel).await?;
    }
    slot::check_publication(&sql, &opts.publication).await?;
    match &markers {
        Markers::Primary(p) => p.batch_execute("SET synchronous_commit TO local").await?,
        Markers::Refused if opts.heartbeat_interval.is_some() => {
            tracing::info!(slot = %opts.slot, "the warehouse URL points at a standby and no primary_url is set: no heartbeats (sync cycles and resyncs are refused)");
        }
        _ => {}
    }
    let identity = SourceIdentity {
        warehouse_id: Arc::from(opts.warehouse_id.as_str()),
        db: Arc::from(opts.conn.dbname.as_str()),
    };
    let existing = slot::inspect_slot(&sql, &opts.slot, opts.slot_busy_wait).await?;
    if opts.failover && existing.as_ref().is_some_and(|s| s.failover == Some(false)) {
        slot::make_failover(&mut conn, &opts.slot).await?;
    }
    // What downstream holds as durable for this slot (zero: nothing yet).
    let checkpoint = *durable.borrow();
    let start = match (existing, &opts.initial_load) {
        (Some(state), InitialLoad::Incremental(hook)) => {
            // Only this engine confirms the slot, and never past its checkpoint: a slot with
            // no checkpoint, or confirmed past it, has changes nobody here delivered (created
            // and crashed before the load was scheduled, or dropped and created again).
            let reason = if checkpoint == Lsn::ZERO {
                Some("the slot has no checkpoint yet".to_string())
            } else if state.confirmed_flush > checkpoint {
                Some(format!(
                    "the slot is confirmed up to {}, past the checkpoint {checkpoint}: it was dropped and created again",
                    state.confirmed_flush
                ))
            } else {
                None
            };
            if let Some(reason) = reason {
                schedule_load(
                    hook,
                    opts,
                    state.confirmed_flush,
                    reason,
                    checkpoint != Lsn::ZERO,
                )
                .await?;
            }
            state.confirmed_flush.max(checkpoint)
        }
        (Some(state), InitialLoad::Snapshot) => state.confirmed_flush.max(checkpoint),
        (None, InitialLoad::Incremental(hook)) if opts.create_slot => {
            let created = create_slot(&mut conn, opts, &markers).await?;
            tracing::info!(slot = %opts.slot, consistent_point = %created.consistent_point, "slot created; its initial load is read in chunks while it streams");
            let (reason, lost) = if checkpoint == Lsn::ZERO {
                ("the slot was created".to_string(), false)
            } else {
                (
                    format!(
                        "the slot was created again: it was lost or dropped after streaming up to {checkpoint}"
                    ),
                    true,
                )
            };
            schedule_load(hook, opts, created.consistent_point, reason, lost).await?;
            created.consistent_point
        }
        (None, InitialLoad::Snapshot) if opts.create_slot => {
            let created = create_slot(&mut conn, opts, &markers).await?;
            tracing::info!(slot = %opts.slot, consistent_point = %created.consistent_point, "slot created; reading the initial load");
            load_published(&mut sql, opts, &identity, &created, out).await?;
            // Stream only once the load is durable downstream, so that nothing confirmed to
            // the slot can run ahead of snapshot rows still in flight.
            wait_durable(durable, created.consistent_point, cancel).await;
            if cancel.is_cancelled() || opts.endpos.is_some_and(|e| e <= created.consistent_point) {
                return Ok(());
            }
            created.consistent_point
        }
        (None, _) => {
            return Err(SourceError::SlotMissing {
                slot: opts.slot.clone(),
            });
        }
    };
    let sender_timeout_ms: i64 = sql
        .query_one(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_sender_timeout'",
            &[],
        )
        .await?
        .get(0);
    let status_interval = if sender_timeout_ms > 0 {
        Duration::from_secs(10).min(Duration::from_millis(sender_timeout_ms as u64 / 2))
    } else {
        Duration::from_secs(10)
    };
    // A live server answers each status update that asks for a reply (one every
    // status_interval); nothing at all for about wal_sender_timeout means the connection is
    // dead (a partition that drops packets silently: TCP would wait for minutes).
    let silence = if sender_timeout_ms > 0 {
        Duration::from_millis(sender_timeout_ms as u64).max(status_interval * 2)
    } else {
        Duration::from_secs(60)
    };
    let sql_cmd = slot::start_replication_sql(&opts.slot, start, &opts.publication, opts.streaming);
    tracing::info!(slot = %opts.slot, %start, "starting replication");
    let (reader, writer) = conn
        .start_replication(&sql_cmd)
        .await
        .map_err(|e| slot::classify_start_error(e, &opts.slot, &opts.publication))?;
    if let Some(streaming) = &opts.on_streaming {
        (streaming.0)();
    }
    let mut ticker = tokio::time::interval(status_interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let flushed = (*durable.borrow_and_update()).max(start);
    let heartbeats = markers.available();
    let mut session = Session {
        reader,
        feedback: Feedback {
            writer,
            ticker,
            durable: durable.clone(),
            flushed,
            received: start,
        },
        out: out.clone(),
        assembler: Assembler::new(identity, opts.stream_memory_bytes),
        decoder: PgOutputDecoder::new(),
        sql,
        markers,
        pending: Vec::with_capacity(MAX_BATCH_ITEMS),
        in_transaction: false,
        open_tx: {
            open_tx.store(false, Ordering::SeqCst);
            open_tx.clone()
        },
        last_commit_end: start,
        last_idle_confirm: Instant::now(),
        endpos: opts.endpos,
        health_tick: {
            let mut i = tokio::time::interval(opts.health_interval);
            i.set_missed_tick_behavior(MissedTickBehavior::Delay);
            i
        },
        slot: opts.slot.clone(),
        health: opts.health.clone(),
        heartbeat: opts.heartbeat_interval.filter(|_| heartbeats).map(|every| {
            let mut i = tokio::time::interval_at(Instant::now() + every, every);
            i.set_missed_tick_behavior(MissedTickBehavior::Delay);
            i
        }),
        chunks: match &opts.chunks {
            Some(inbox) => Some(inbox.clone().lock_owned().await),
            None => None,
        },
        chunk: None,
        chunk_table: None,
        current_tx: None,
        recent_commits: RecentCommits::default(),
        publication: opts.publication.clone(),
        silence,
        last_heard: Instant::now(),
        identity: SourceIdentity {
            warehouse_id: Arc::from(opts.warehouse_id.as_str()),
            db: Arc::from(opts.conn.dbname.as_str()),
        },
    };
    session.run(cancel).await
}

/// Creates the slot. On a standby a new slot is consistent once the standby replays a
/// running-transactions record of the primary's, which the primary writes every 15 s while
/// busy and not at all while idle: with the primary at hand, it is asked for one meanwhile.
async fn create_slot(
    conn: &mut ReplicationConnection,
    opts: &SourceOptions,
    markers: &Markers,
) -> Result<slot::CreatedSlot, SourceError> {
    let nudge = match (markers, &opts.primary) {
        (Markers::Primary(_), Some(primary)) => {
            let primary = primary.clone();
            Some(tokio::spawn(async move {
                let Ok(client) = crate::pg::connect_sql(&primary).await else {
                    return;
                };
                loop {
                    // Needs a superuser or a grant; without it the 15 s record serves.
                    let _ = client
                        .execute("SELECT pg_log_standby_snapshot()", &[])
                        .await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }))
        }
        _ => None,
    };
    let created = slot::create_slot(conn, &opts.slot, false, opts.failover).await;
    if let Some(n) = nudge {
        n.abort();
    }
    created
}

async fn wait_durable(durable: &mut watch::Receiver<Lsn>, target: Lsn, cancel: &CancellationToken) {
    while *durable.borrow_and_update() < target {
        tokio::select! {
            r = durable.changed() => if r.is_err() { return },
            _ = cancel.cancelled() => return,
        }
    }
}

/// Refuses to stream when the server's WAL history is not the one the checkpoint belongs to:
/// another cluster (restored from a dump, or the URL points elsewhere), a WAL position below
/// the checkpoint (restored from a backup, or recovered to an earlier point), or a timeline
/// that branched off before the checkpoint (a point-in-time recovery). Positions of another
/// history are meaningless here: streaming would confirm the stored checkpoint to a slot
/// that never reached it, and central, holding versions of the lost history, would answer
/// every change "stale". A definite error whose message names the way back
/// (`inventorysync rebase <warehouse>`). A promotion that kept the history (a failover whose
/// new timeline branched at or after the checkpoint) passes.
pub async fn check_origin(
    conn: &mut ReplicationConnection,
    warehouse: &str,
    expected: Option<&Origin>,
    current: &Origin,
    checkpoint: Lsn,
    xlogpos: Lsn,
) -> Result<(), SourceError> {
    let mismatch = |what: String| SourceError::HistoryChanged {
        warehouse: warehouse.to_string(),
        what,
    };
    if let Some(e) = expected
        && e.system_id != current.system_id
    {
        return Err(mismatch(format!(
            "it is another database cluster now (system identifier {}, the checkpoint's is {}): restored from a dump, or its URL points elsewhere",
            current.system_id, e.system_id
        )));
    }
    if checkpoint > xlogpos {
        return Err(mismatch(format!(
            "its WAL ends at {xlogpos}, below the checkpoint {checkpoint}: restored from a backup or recovered to an earlier point"
        )));
    }
    if let Some(e) = expected
        && e.timeline != current.timeline
        && checkpoint > Lsn::ZERO
    {
        let branched = if current.timeline > e.timeline {
            conn.timeline_switch(current.timeline, e.timeline).await?
        } else {
            None
        };
        match branched {
            Some(at) if at >= checkpoint => {}
            Some(at) => {
                return Err(mismatch(format!(
                    "timeline {} branched off timeline {} at {at}, before the checkpoint {checkpoint}: a point-in-time recovery dropped changes that were delivered",
                    current.timeline, e.timeline
                )));
            }
            None => {
                return Err(mismatch(format!(
                    "it is on timeline {}, which does not descend from the checkpoint's timeline {}",
                    current.timeline, e.timeline
                )));
            }
        }
    }
    Ok(())
}

/// Calls the load hook; a failure is transient (the next connection asks again).
async fn schedule_load(
    hook: &LoadHook,
    opts: &SourceOptions,
    start: Lsn,
    reason: String,
    lost: bool,
) -> Result<(), SourceError> {
    tracing::info!(slot = %opts.slot, %start, %reason, "the slot needs its initial load; scheduling it");
    hook(LoadNeeded {
        slot: opts.slot.clone(),
        start,
        reason,
        lost,
    })
    .await
    .map_err(|e| SourceError::Io {
        target: "the state DB".into(),
        source: std::io::Error::other(format!("cannot schedule the initial load: {e}")),
    })
}

/// Reads the published tables in `created`'s exported snapshot and hands them downstream,
/// the load's commit mark making the consistent point durable.
async fn load_published(
    sql: &mut tokio_postgres::Client,
    opts: &SourceOptions,
    identity: &SourceIdentity,
    created: &slot::CreatedSlot,
    out: &mpsc::Sender<Vec<StreamItem>>,
) -> Result<(), SourceError> {
    let tables = published_tables(sql, &opts.publication, identity).await?;
    let rows = initial_load(
        sql,
        &created.snapshot_name,
        &tables,
        SnapshotTarget {
            consistent_point: created.consistent_point,
            out,
        },
    )
    .await?;
    tracing::info!(rows, tables = tables.len(), "initial load read");
    Ok(())
}

/// The status-update side: what we have received, what downstream made durable.
struct Feedback {
    writer: FrameWriter,
    ticker: Interval,
    durable: watch::Receiver<Lsn>,
    flushed: Lsn,
    received: Lsn,
}

impl Feedback {
    async fn send_status(&mut self, reply_requested: bool) -> Result<(), SourceError> {
        let now_pg = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0)
            - PG_EPOCH_OFFSET_MICROS;
        let write = self.received.max(self.flushed);
        let msg = encode_standby_status_update(
            write,
            self.flushed,
            self.flushed,
            now_pg,
            reply_requested,
        );
        self.writer.send_copy_data(&msg).await?;
        self.ticker.reset();
        Ok(())
    }

    /// Takes a new durable position; `false` when downstream has gone away.
    async fn durable_moved(&mut self) -> Result<bool, SourceError> {
        let d = *self.durable.borrow_and_update();
        if d > self.flushed {
            self.flushed = d;
            self.send_status(false).await?;
        }
        Ok(true)
    }
}

struct Session {
    reader: FrameReader,
    feedback: Feedback,
    out: mpsc::Sender<Vec<StreamItem>>,
    assembler: Assembler,
    decoder: PgOutputDecoder,
    sql: tokio_postgres::Client,
    /// Where heartbeats and watermarks are written (the primary, for a standby).
    markers: Markers,
    pending: Vec<StreamItem>,
    in_transaction: bool,
    /// Mirrors `in_transaction` for [`run`], which decides how long a stop may wait.
    open_tx: Arc<AtomicBool>,
    last_commit_end: Lsn,
    /// When a keepalive's position was last confirmed as an empty commit.
    last_idle_confirm: Instant,
    endpos: Option<Lsn>,
    heartbeat: Option<Interval>,
    health_tick: Interval,
    slot: String,
    health: Option<Arc<watch::Sender<Option<slot::SlotHealth>>>>,
    /// Resync chunk requests, held for this session's life.
    chunks: Option<tokio::sync::OwnedMutexGuard<mpsc::Receiver<super::resync::ChunkRequest>>>,
    /// The chunk between its watermarks, if any.
    chunk: Option<super::resync::OpenChunk>,
    /// The table the last chunk read, and whether it has no primary key: its catalog is
    /// read once per table, not once per chunk (forgotten at any Relation message, which
    /// comes after DDL).
    chunk_table: Option<(super::snapshot::PublishedTable, bool)>,
    /// The open transaction's commit LSN and xid (from its Begin).
    current_tx: Option<(Lsn, u32)>,
    /// Transactions whose commit this session decoded lately (for resync chunks).
    recent_commits: RecentCommits,
    publication: String,
    /// How long the server may say nothing before the connection counts as dead.
    silence: Duration,
    /// When the server was last heard, or when this session last started waiting for it
    /// (time spent waiting on downstream does not count as the server's silence).
    last_heard: Instant,
    identity: SourceIdentity,
}

/// The xids of the latest commits decoded (at most [`RecentCommits::MAX`]): whether a
/// chunk's unseen writer committed before its low watermark (see
/// [`super::resync::OpenChunk::open_window`]).
#[derive(Default)]
struct RecentCommits {
    order: std::collections::VecDeque<u32>,
    set: std::collections::HashSet<u32>,
}

impl RecentCommits {
    /// Commits remembered: a writer still invisible to a chunk's SELECT committed within
    /// the last moments, long before this many others committed.
    const MAX: usize = 1 << 16;

    fn add(&mut self, xid: u32) {
        if self.set.insert(xid) {
            self.order.push_back(xid);
            if self.order.len() > Self::MAX
                && let Some(old) = self.order.pop_front()
            {
                self.set.remove(&old);
            }
        }
    }

    fn contains(&self, xid: u32) -> bool {
        self.set.contains(&xid)
    }
}

/// The next chunk request, when there is an inbox; never completes otherwise.
async fn next_chunk(
    chunks: &mut Option<tokio::sync::OwnedMutexGuard<mpsc::Receiver<super::resync::ChunkRequest>>>,
) -> super::resync::ChunkRequest {
    match chunks {
        Some(rx) => match rx.recv().await {
            Some(req) => req,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Writes a heartbeat into the warehouse's WAL: a transactional logical message that makes
/// the walsender send a commit, so a slot whose tables are quiet still advances. The message
/// itself is not a row and is never published.
async fn heartbeat(sql: &tokio_postgres::Client, markers: &Markers) -> Result<(), SourceError> {
    markers.emit(sql, "inventorysync", "heartbeat").await?;
    Ok(())
}

/// Runs a SQL step of the session, which must not outlast the server's allowed silence:
/// a dead SQL connection would otherwise hold the session (and its silence check) forever.
async fn sql_within<T>(
    limit: Duration,
    what: &'static str,
    step: impl std::future::Future<Output = Result<T, SourceError>>,
) -> Result<T, SourceError> {
    tokio::time::timeout(limit, step)
        .await
        .unwrap_or(Err(SourceError::SqlTimeout {
            what,
            secs: limit.as_secs(),
        }))
}

/// Ticks `interval` when there is one; never completes otherwise.
async fn tick_opt(interval: &mut Option<Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

impl Session {
    async fn run(&mut self, cancel: &CancellationToken) -> Result<(), SourceError> {
        // Stopping inside a transaction: part of it may be downstream already (a large
        // transaction is handed on in batches, and Kafka takes each event as it comes), and
        // the next start resumes at the last commit, so the stream reads on to the commit.
        let mut stopping = false;
        loop {
            if (stopping || cancel.is_cancelled()) && !self.in_transaction {
                self.deliver().await?;
                let _ = self.feedback.send_status(false).await;
                return Ok(());
            }
            let frame = tokio::select! {
                biased;
                _ = cancel.cancelled(), if !stopping => {
                    stopping = true;
                    tracing::info!(slot = %self.slot, "stopping: reading on to the commit of the open transaction");
                    continue;
                }
                r = self.feedback.durable.changed() => {
                    if r.is_err() {
                        return Err(SourceError::DownstreamGone);
                    }
                    self.feedback.durable_moved().await?;
                    // A commit ending at or past endpos is durable: nothing at or before
                    // endpos can follow it (the server may send no keepalive to say so).
                    if self.endpos.is_some_and(|e| self.last_commit_end >= e) && self.is_idle() {
                        return self.finish(cancel).await;
                    }
                    continue;
                }
                _ = self.feedback.ticker.tick() => {
                    // Asks for a reply: the server's answer is how a dead connection shows.
                    self.feedback.send_status(true).await?;
                    continue;
                }
                _ = self.health_tick.tick() => {
                    let silence = self.silence;
                    sql_within(silence, "reading the slot's health", self.check_health()).await?;
                    continue;
                }
                _ = tick_opt(&mut self.heartbeat) => {
                    sql_within(self.silence, "writing a heartbeat", heartbeat(&self.sql, &self.markers)).await?;
                    continue;
                }
                req = next_chunk(&mut self.chunks), if self.chunk.is_none() && !stopping => {
                    let silence = self.silence;
                    sql_within(silence, "starting a resync chunk", self.begin_chunk(req)).await?;
                    continue;
                }
                // Before the silence check: a frame already here is never taken for silence.
                f = self.reader.next() => f?,
                _ = tokio::time::sleep_until(self.last_heard + self.silence) => {
                    return Err(SourceError::Silent { secs: self.silence.as_secs() });
                }
            };
            match frame {
                Frame::CopyData(data) => {
                    let msg =
                        decode_replication_message(data).map_err(|source| SourceError::Decode {
                            source,
                            lsn: self.feedback.received,
                        })?;
                    let stop = match msg {
                        ReplicationMessage::XLogData {
                            wal_start, data, ..
                        } => {
                            self.feedback.received = self.feedback.received.max(wal_start);
                            self.handle_xlog(wal_start, data).await?
                        }
                        ReplicationMessage::PrimaryKeepalive {
                            wal_end,
                            reply_requested,
                            ..
                        } => {
                            tracing::trace!(%wal_end, reply_requested, "keepalive");
                            let idle = self.is_idle();
                            // At most one a second (or once the WAL moved on a lot): when the
                            // state DB shares the warehouse's cluster, the checkpoint this
                            // writes is WAL too, which the next keepalive reports, and
                            // confirming each at once kept the engine writing checkpoints
                            // for itself.
                            let due = self.last_idle_confirm.elapsed() >= IDLE_CONFIRM_EVERY
                                || wal_end.0 >= self.feedback.flushed.0 + IDLE_CONFIRM_BYTES;
                            if idle && due && wal_end > self.feedback.flushed {
                                self.last_idle_confirm = Instant::now();
                                // Nothing of ours is in flight and the server has decoded up
                                // to wal_end: confirming it lets an idle slot release WAL
                                // that only other tables or databases wrote. It goes
                                // downstream as an empty commit, so the slot is confirmed
                                // only once the checkpoint holds it: a slot confirmed past
                                // its checkpoint was dropped and created by someone else.
                                self.pending.push(StreamItem::Commit {
                                    commit_lsn: wal_end,
                                    end_lsn: wal_end,
                                });
                                self.last_commit_end = wal_end;
                            }
                            if reply_requested {
                                self.feedback.send_status(false).await?;
                            }
                            idle && self.endpos.is_some_and(|e| wal_end >= e)
                        }
                    };
                    if stop {
                        return self.finish(cancel).await;
                    }
                    if self.pending.len() >= MAX_BATCH_ITEMS
                        || (!self.pending.is_empty() && !self.reader.has_buffered_frame())
                    {
                        self.deliver().await?;
                    }
                }
                Frame::CopyDone => {
                    return Err(SourceError::Io {
                        target: format!("{}:{}", "warehouse", self.feedback.received),
                        source: std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "server ended the replication stream",
                        ),
                    });
                }
                Frame::Other(postgres_protocol::message::backend::Message::ErrorResponse(body)) => {
                    return Err(super::conn::error_from_body(&body)?);
                }
                Frame::Other(_) | Frame::CopyBoth => {}
            }
            // Heard from the server; and handing the frame downstream may have waited on a
            // slow consumer, when nothing was read: the server's silence counts from now.
            self.last_heard = Instant::now();
        }
    }

    /// Reads the slot's health, publishes it, and stops with a definite error once the slot
    /// has lost WAL it needed (only a new slot and a forced resync repair that).
    async fn check_health(&mut self) -> Result<(), SourceError> {
        let Some(mut h) = slot::slot_health(&self.sql, &self.slot).await? else {
            return Err(SourceError::SlotMissing {
                slot: self.slot.clone(),
            });
        };
        match h.wal_status.as_str() {
            "lost" => {
                return Err(SourceError::SlotInvalidated {
                    slot: self.slot.clone(),
                });
            }
            "unreserved" | "extended" => tracing::warn!(
                slot = %self.slot,
                wal_status = %h.wal_status,
                retained_wal_bytes = h.retained_wal_bytes,
                safe_wal_size = ?h.safe_wal_size,
                "the slot retains more WAL than the server means to keep"
            ),
            _ => {
                tracing::debug!(slot = %self.slot, wal_status = %h.wal_status, retained_wal_bytes = h.retained_wal_bytes, "slot health")
            }
        }
        if let Some(tx) = &self.health {
            h.published = slot::published_relations(&self.sql, &self.publication).await?;
            h.other_slots = slot::other_slots(&self.sql, &[self.slot.as_str()]).await?;
            tx.send_replace(Some(h));
        }
        Ok(())
    }

    /// Whether nothing is in flight: no open or streamed transaction, nothing pending, and
    /// everything handed downstream is durable.
    fn is_idle(&self) -> bool {
        !self.in_transaction
            && !self.decoder.in_stream_block()
            && !self.assembler.has_open_streams()
            && self.pending.is_empty()
            && self.feedback.flushed >= self.last_commit_end
    }

    /// Handles one pgoutput message; `true` when `endpos` is reached.
    async fn handle_xlog(
        &mut self,
        wal_start: Lsn,
        data: bytes::Bytes,
    ) -> Result<bool, SourceError> {
        let msg = self
            .decoder
            .decode(&data)
            .map_err(|source| SourceError::Decode {
                source,
                lsn: wal_start,
            })?;
        if let Some(endpos) = self.endpos {
            let beyond = match &msg {
                LogicalMessage::Begin(b) => b.final_lsn > endpos,
                LogicalMessage::StreamCommit(c) => c.commit_lsn > endpos,
                _ => !self.in_transaction && !self.decoder.in_stream_block() && wal_start > endpos,
            };
            if beyond {
                tracing::debug!(%wal_start, %endpos, "endpos reached by a message");
                return Ok(true);
            }
        }
        match &msg {
            LogicalMessage::Relation(r) if !self.decoder.in_stream_block() => {
                self.chunk_table = None;
                let pk = primary_key(&self.sql, r.oid).await?;
                self.assembler.relation(r, &pk);
                return Ok(false);
            }
            LogicalMessage::Begin(b) => {
                self.in_transaction = true;
                self.open_tx.store(true, Ordering::SeqCst);
                self.current_tx = Some((b.final_lsn, b.xid));
            }
            LogicalMessage::Commit(c) => {
                self.in_transaction = false;
                self.open_tx.store(false, Ordering::SeqCst);
                self.last_commit_end = c.end_lsn;
                if let Some((_, xid)) = self.current_tx {
                    self.recent_commits.add(xid);
                }
            }
            LogicalMessage::StreamCommit(c) => {
                self.last_commit_end = c.end_lsn;
                self.recent_commits.add(c.xid);
            }
            LogicalMessage::Message(m) if m.prefix == super::resync::WATERMARK_PREFIX => {
                self.watermark(m);
            }
            _ => {}
        }
        let committed = match &msg {
            LogicalMessage::Commit(c) => Some(c.end_lsn),
            _ => None,
        };
        let seen = self.pending.len();
        if let Next::Replay(mut tx) =
            self.assembler
                .handle(msg, wal_start, &data, &mut self.pending)?
        {
            self.chunk_saw(seen);
            let aborted = tx.aborted_set();
            while let Some((lsn, raw)) = tx.next_message()? {
                let seen = self.pending.len();
                self.replay_one(lsn, &raw, &aborted).await?;
                self.chunk_saw(seen);
                if self.pending.len() >= MAX_BATCH_ITEMS {
                    self.deliver().await?;
                }
            }
            self.assembler.finish_replay(&mut self.pending)?;
        } else {
            self.chunk_saw(seen);
        }
        if let Some(end_lsn) = committed
            && self.chunk.as_ref().is_some_and(|c| c.emitted())
            && let Some(chunk) = self.chunk.take()
        {
            chunk.finish(end_lsn);
        }
        Ok(false)
    }

    /// A streamed change inside an open chunk's window removes its key from the chunk.
    fn chunk_saw(&mut self, from: usize) {
        let Some(chunk) = self.chunk.as_mut() else {
            return;
        };
        for item in self.pending.iter().skip(from) {
            if let StreamItem::Change(ev) = item {
                chunk.saw(ev);
            }
        }
    }

    /// A resync watermark: the low one opens the chunk's window, the high one emits its rows
    /// inside the watermark's transaction.
    fn watermark(&mut self, m: &crate::source::pgoutput::Message) {
        let Some((which, id)) = super::resync::parse_watermark(&m.content) else {
            return;
        };
        let Some(chunk) = self.chunk.as_mut().filter(|c| c.is(id)) else {
            // A watermark of a chunk this session does not hold (replayed after a restart).
            return;
        };
        match which {
            "low" => {
                let recent = &self.recent_commits;
                chunk.open_window(|xid| recent.contains(xid));
            }
            "high" if self.in_transaction && !self.decoder.in_stream_block() => {
                let Some((commit_lsn, xid)) = self.current_tx else {
                    return;
                };
                for ev in chunk.emit(m.lsn, commit_lsn, Some(xid)) {
                    self.pending.push(StreamItem::Change(Box::new(ev)));
                }
            }
            _ => {}
        }
    }

    /// Starts a resync chunk: watermarks and the read, on this session's SQL connection.
    async fn begin_chunk(&mut self, req: super::resync::ChunkRequest) -> Result<(), SourceError> {
        if !self.markers.available() {
            let _ = req.reply.send(Err(super::resync::ChunkRefused::Failed(
                super::marker::refusal(&self.identity.warehouse_id, "a chunk's watermarks"),
            )));
            return Ok(());
        }
        let cached = self
            .chunk_table
            .as_ref()
            .is_some_and(|(t, _)| t.info.table.qualified_name() == req.table);
        if !cached {
            let tables = published_tables(&self.sql, &self.publication, &self.identity).await?;
            let Some(table) = tables
                .into_iter()
                .find(|t| t.info.table.qualified_name() == req.table)
            else {
                self.chunk_table = None;
                let _ = req
                    .reply
                    .send(Err(super::resync::ChunkRefused::Vanished(format!(
                        "{} is not in publication {} (dropped, renamed or removed from it)",
                        req.table, self.publication
                    ))));
                return Ok(());
            };
            let keyless = primary_key(&self.sql, table.info.oid).await?.is_empty();
            self.chunk_table = Some((table, keyless));
        }
        let Some((table, keyless)) = &self.chunk_table else {
            return Ok(());
        };
        self.chunk =
            super::resync::start_chunk(&self.sql, &self.markers, table, *keyless, req).await?;
        Ok(())
    }

    async fn replay_one(
        &mut self,
        lsn: Lsn,
        raw: &bytes::Bytes,
        aborted: &std::collections::HashSet<u32>,
    ) -> Result<(), SourceError> {
        let msg = decode_logical_message(raw, true)
            .map_err(|source| SourceError::Decode { source, lsn })?;
        if message_xid(&msg).is_some_and(|x| aborted.contains(&x)) {
            return Ok(());
        }
        if let LogicalMessage::Relation(r) = &msg {
            self.chunk_table = None;
            let pk = primary_key(&self.sql, r.oid).await?;
            self.assembler.relation(r, &pk);
            return Ok(());
        }
        self.assembler.replay_message(msg, lsn, &mut self.pending)
    }

    /// Hands the pending items downstream, serving status updates while it waits.
    async fn deliver(&mut self) -> Result<(), SourceError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = std::mem::replace(&mut self.pending, Vec::with_capacity(MAX_BATCH_ITEMS));
        let out = self.out.clone();
        loop {
            tokio::select! {
                biased;
                permit = out.reserve() => {
                    let permit = permit.map_err(|_| SourceError::DownstreamGone)?;
                    permit.send(batch);
                    return Ok(());
                }
                r = self.feedback.durable.changed() => {
                    if r.is_err() {
                        return Err(SourceError::DownstreamGone);
                    }
                    self.feedback.durable_moved().await?;
                }
                _ = self.feedback.ticker.tick() => self.feedback.send_status(false).await?,
                // A stopped consumer must not hide a slot that is running out of WAL.
                _ = self.health_tick.tick() => {
                    let silence = self.silence;
                    sql_within(silence, "reading the slot's health", self.check_health()).await?
                }
            }
        }
    }

    /// `endpos` reached: deliver, wait until it is durable, confirm, stop.
    async fn finish(&mut self, cancel: &CancellationToken) -> Result<(), SourceError> {
        self.deliver().await?;
        let target = self.last_commit_end;
        while self.feedback.flushed < target {
            tokio::select! {
                r = self.feedback.durable.changed() => {
                    if r.is_err() { break; }
                    self.feedback.durable_moved().await?;
                }
                _ = self.feedback.ticker.tick() => self.feedback.send_status(false).await?,
                _ = cancel.cancelled() => break,
            }
        }
        self.feedback.send_status(false).await?;
        let _ = self.feedback.writer.send_copy_done().await;
        Ok(())
    }
}

fn message_xid(m: &LogicalMessage) -> Option<u32> {
    match m {
        LogicalMessage::Insert(i) => i.xid,
        LogicalMessage::Update(u) => u.xid,
        LogicalMessage::Delete(d) => d.xid,
        LogicalMessage::Truncate(t) => t.xid,
        LogicalMessage::Relation(r) => r.xid,
        LogicalMessage::Type(t) => t.xid,
        LogicalMessage::Message(m) => m.xid,
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::RecentCommits;

    #[test]
    fn recent_commits_keep_the_latest_only() {
        let mut r = RecentCommits::default();
        for xid in 0..(RecentCommits::MAX as u32 + 10) {
            r.add(xid);
        }
        assert!(!r.contains(9), "the oldest are forgotten");
        assert!(r.contains(10) && r.contains(RecentCommits::MAX as u32 + 9));
        assert_eq!(r.order.len(), RecentCommits::MAX);
        r.add(RecentCommits::MAX as u32 + 9);
        assert_eq!(
            r.order.len(),
            RecentCommits::MAX,
            "a repeat is not counted twice"
        );
    }
}
