//! `inventorysync run`: wires one pipeline per warehouse and owns shutdown.
//!
//! ```text
//!  per warehouse (while holding its lease):
//!    source::stream::run ──items──▶ bus::publish ──commit acks──▶ acker
//!          ▲                                                           │ all events acked
//!          └────────── durable LSN ◀── checkpoint committed ◀──────────┘
//! ```
//!
//! A failing warehouse is retried with backoff and reported; it never stops the others. A
//! definite error (bad setup, lost slot) stops that warehouse only, with the error logged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Lsn;
use crate::bus::{self, Bus, BusError, CommitAck};
use crate::ownership;
use crate::pg::ConnInfo;
use crate::source::SourceError;
use crate::source::slot::SlotHealth;
use crate::source::stream::{self, InitialLoad, LoadHook, LoadNeeded, OriginGuard, SourceOptions};
use crate::store::{Leases, StateDb, StoreError, WarehouseLease, WorkerIdentity, WorkerRow};

/// Which pgoutput protocol to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Streaming {
    /// Protocol 1: whole transactions after commit.
    Off,
    /// Protocol 2 with `streaming 'on'`: large transactions in progress.
    On,
}

/// One warehouse database to stream (read from the environment and TOML by `config`).
#[derive(Debug, Clone)]
pub struct WarehouseConfig {
    /// Warehouse id, used in events and keys.
    pub id: String,
    /// Connection to the warehouse database.
    pub conn: ConnInfo,
    /// Publication name.
    pub publication: String,
    /// Replication slot name.
    pub slot: String,
    /// Protocol choice.
    pub streaming: Streaming,
    /// How often `run` writes a heartbeat message into the warehouse's WAL (none: never).
    pub heartbeat_interval: Option<std::time::Duration>,
    /// Whether the slot is a failover slot (PostgreSQL 17+), kept on standbys that
    /// synchronize slots, so that a promoted standby has it.
    pub failover: bool,
    /// The primary of the standby `conn` points at (PostgreSQL 16+ decodes on a standby):
    /// where heartbeats, sync-cycle markers and resync watermarks are written.
    pub primary: Option<ConnInfo>,
}

/// Commits handed to the bus and not yet acknowledged, at most. The bus and the consumer
/// stage's budget bound what is in flight, in events; this only bounds the acks' memory (a
/// small future each). At 1,024, transactions of 10 rows capped the pipeline at about
/// 10,000 events in flight, too few to keep central busy while the next batch was prepared.
const UNACKED_COMMITS: usize = 65_536;
/// How often a standby asks for a warehouse it does not own.
const LEASE_POLL: Duration = Duration::from_secs(3);
/// A handover waits for the outcome of everything its stream handed on, however long that
/// takes (central down: until it answers), unless the process is stopped meanwhile.
const HANDOVER_FOREVER: Duration = Duration::from_secs(100 * 365 * 86_400);
/// Checkpoints of a busy stream are written at most this often.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);
/// At shutdown, how long a pipeline waits for the outcome of what its stream handed on
/// before it stops without it (replayed at the next start).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why a warehouse pipeline stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The bus failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The state DB failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A task of the pipeline panicked or vanished.
    #[error("pipeline task failed: {0}")]
    Task(String),
    /// The lease connection dropped: another process may own the warehouse now.
    #[error("the lease connection to the state DB dropped")]
    LeaseLost,
}

impl PipelineError {
    /// Whether restarting the pipeline can help.
    pub fn is_transient(&self) -> bool {
        match self {
            // The slot's walsender of a previous owner lives on up to `wal_sender_timeout`
            // after it died or was fenced: it lets go in time, so the warehouse is retried
            // with backoff, never stopped for good (`tail` still reports it at once).
            PipelineError::Source(SourceError::SlotInUse { .. }) => true,
            PipelineError::Source(e) => e.is_transient(),
            PipelineError::Bus(e) => e.is_transient(),
            PipelineError::Store(_) | PipelineError::Task(_) | PipelineError::LeaseLost => true,
        }
    }
}

/// Where one warehouse's pipeline is, as this process sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamState {
    /// Not started yet.
    Starting,
    /// Another process holds the warehouse's lease; this one stands by.
    Standby,
    /// This process owns the warehouse and streams it.
    Streaming,
    /// The pipeline failed and restarts after a backoff.
    Retrying(String),
    /// The pipeline stopped on an error a restart cannot fix.
    Failed(String),
}

/// What the service knows about one warehouse's stream, for logs, metrics and readiness.
pub struct WarehouseStatus {
    /// Warehouse id.
    pub id: String,
    /// The latest slot health read while streaming.
    pub slot_health: Arc<watch::Sender<Option<SlotHealth>>>,
    /// The pipeline's state.
    pub state: watch::Sender<StreamState>,
    /// The worker id of the process that owns the warehouse (this one or another), as far as
    /// this process knows; none while nobody does.
    pub owner: watch::Sender<Option<String>>,
    /// Forced-resync chunk requests for this warehouse's stream.
    pub chunks: mpsc::Sender<crate::source::resync::ChunkRequest>,
    /// The stream's end of `chunks` (each stream session holds it while it runs).
    pub chunk_inbox: crate::source::resync::ChunkInbox,
    /// Counts pipeline starts: what a pipeline had in flight is gone once it changes.
    generation: std::sync::atomic::AtomicU64,
}

impl WarehouseStatus {
    /// A status for warehouse `id`, starting.
    pub fn new(id: &str) -> Arc<Self> {
        let (chunks, inbox) = mpsc::channel(1);
        Arc::new(Self {
            id: id.to_string(),
            slot_health: Arc::new(watch::Sender::new(None)),
            state: watch::Sender::new(StreamState::Starting),
            owner: watch::Sender::new(None),
            chunks,
            chunk_inbox: Arc::new(tokio::sync::Mutex::new(inbox)),
            generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The current pipeline's number: resync chunks answered by one pipeline are delivered
    /// only by it (their rows are not in the WAL), so a change means "read them again".
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether this process owns the warehouse (streams it, or restarts or stopped its
    /// pipeline), as opposed to starting or standing by.
    pub fn owned_here(&self) -> bool {
        matches!(
            &*self.state.borrow(),
            StreamState::Streaming | StreamState::Retrying(_) | StreamState::Failed(_)
        )
    }

    /// Whether the warehouse is served (streamed here or by the lease holder), and if not,
    /// why.
    pub fn readiness(&self) -> (bool, Option<String>) {
        let lost = self
            .slot_health
            .borrow()
            .as_ref()
            .is_some_and(|h| h.wal_status == "lost");
        match &*self.state.borrow() {
            _ if lost => (
                false,
                Some(format!(
                    "the replication slot is lost (wal_status = lost): POST /sync/warehouses/{} creates a new slot and resyncs",
                    self.id
                )),
            ),
            StreamState::Streaming => (true, None),
            StreamState::Standby => (true, None),
            StreamState::Starting => (false, Some("starting".into())),
            StreamState::Retrying(e) => (false, Some(format!("restarting after: {e}"))),
            StreamState::Failed(e) => (false, Some(format!("stopped: {e}"))),
        }
    }
}

/// What this process is among the `run` processes sharing the state DB, and what it does
/// when it comes to own a warehouse.
pub struct Membership {
    /// This process in `sync_workers`.
    pub me: WorkerIdentity,
    /// Called when this process comes to own a warehouse, before its pipeline starts (the
    /// embedded consumer forgets what it knew of the warehouse's lanes: another process may
    /// have moved them on meanwhile).
    pub on_owned:
        Option<Arc<dyn Fn(String) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>>,
}

impl Membership {
    /// A process known by `me` that needs no hook.
    pub fn new(me: WorkerIdentity) -> Self {
        Self { me, on_owned: None }
    }
}

/// A warehouse this process owns: its pipeline's task and how to hand it over.
struct Owned {
    /// Cancelled to hand the warehouse over (a child of the shutdown token).
    release: CancellationToken,
    /// Handing over: counts as owned (the lock is held) but no longer as kept.
    releasing: bool,
    task: tokio::task::JoinHandle<()>,
}

/// Runs this process's share of the warehouses until `cancel`, balancing ownership with the
/// other processes of the state DB (see [`crate::ownership`]); at `cancel` hands every owned
/// warehouse over (or stops it, with [`SHUTDOWN_GRACE`] for its outcomes) and waits a while
/// for the others to take them. `statuses` holds one status per warehouse (by id); missing
/// ones are created.
pub async fn run<B: Bus + Clone>(
    warehouses: Vec<WarehouseConfig>,
    statuses: &[Arc<WarehouseStatus>],
    state: StateDb,
    bus: B,
    membership: Membership,
    cancel: CancellationToken,
) {
    let statuses: Vec<Arc<WarehouseStatus>> = warehouses
        .iter()
        .map(|w| {
            statuses
                .iter()
                .find(|s| s.id == w.id)
                .cloned()
                .unwrap_or_else(|| WarehouseStatus::new(&w.id))
        })
        .collect();
    let me = &membership.me;
    let expiry = ownership::HEARTBEAT_EXPIRY.as_secs_f64();
    // The lease connection and this process's row, retried until the state DB answers.
    let leases = loop {
        match register(&state, me, expiry).await {
            Ok(l) => break l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the state DB to own warehouses; retrying")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(LEASE_POLL) => {}
            _ = cancel.cancelled() => return,
        }
    };
    tracing::info!(worker = %me.worker_id, warehouses = warehouses.len(), "balancing warehouses with the other run processes of this state DB");
    let mut owned: HashMap<String, Owned> = HashMap::new();
    let mut tick = tokio::time::interval(ownership::HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => break,
        }
        owned.retain(|id, o| {
            if o.task.is_finished() {
                ownership_ended(id, &statuses);
                false
            } else {
                true
            }
        });
        let held: Vec<String> = owned.keys().cloned().collect();
        let rows = match state.heartbeat(me, &held, false, expiry).await {
            Ok(Some(rows)) => rows,
            Ok(None) => {
                tracing::error!(worker = %me.worker_id, "another run process took this process's row in sync_workers: two processes share one worker id (set WORKER_ID to tell them apart); taking it back");
                if let Err(e) = state.register_worker(me, expiry).await {
                    tracing::warn!(error = %e, "cannot write this process's heartbeat");
                }
                continue;
            }
            Err(e) => {
                // Without the rows nothing is balanced; what is owned stays owned (the locks
                // say so, not the rows).
                tracing::warn!(error = %e, "cannot write this process's heartbeat; keeping what it owns");
                continue;
            }
        };
        show_owners(&rows, &me.worker_id, &owned, &statuses);
        if !leases.is_up() {
            continue;
        }
        let mut live: Vec<(&str, usize)> = rows
            .iter()
            .filter(|r| r.alive && !r.draining && r.worker_id != me.worker_id)
            .map(|r| (r.worker_id.as_str(), r.owned.len()))
            .collect();
        live.push((me.worker_id.as_str(), owned.len()));
        let target = ownership::target(&me.worker_id, &live, warehouses.len());
        let kept = owned.values().filter(|o| !o.releasing).count();
        if kept > target {
            // The least preferred go; each stops at a commit boundary, gets the outcome of
            // everything in flight and its checkpoint written, then unlocks.
            let mut keep: Vec<&String> = owned
                .iter()
                .filter(|(_, o)| !o.releasing)
                .map(|(id, _)| id)
                .collect();
            keep.sort_by_key(|id| ownership::preference(&me.worker_id, id));
            let give: Vec<String> = keep[..kept - target].iter().map(|s| (*s).clone()).collect();
            for id in give {
                if let Some(o) = owned.get_mut(&id) {
                    tracing::info!(warehouse = %id, worker = %me.worker_id, target, processes = live.len(), "handing the warehouse over to balance the processes");
                    o.releasing = true;
                    o.release.cancel();
                }
            }
        } else if kept < target {
            // Warehouses nobody live owns, the preferred first.
            let taken: std::collections::HashSet<&str> = rows
                .iter()
                .filter(|r| r.alive && r.worker_id != me.worker_id)
                .flat_map(|r| r.owned.iter().map(String::as_str))
                .collect();
            let mut free: Vec<&WarehouseConfig> = warehouses
                .iter()
                .filter(|w| !owned.contains_key(&w.id) && !taken.contains(w.id.as_str()))
                .collect();
            free.sort_by_key(|w| std::cmp::Reverse(ownership::preference(&me.worker_id, &w.id)));
            let mut want = target - kept;
            for w in free {
                if want == 0 {
                    break;
                }
                let lease = match leases.try_acquire(&w.id).await {
                    Ok(Some(l)) => l,
                    // No live process claims it, yet its lock is held: by a process whose
                    // heartbeat expired (paused, stuck), which is fenced.
                    Ok(None) => match fence(&state, &leases, &w.id).await {
                        Some(l) => l,
                        None => continue,
                    },
                    Err(e) => {
                        tracing::warn!(warehouse = %w.id, error = %e, "cannot take the warehouse's lease");
                        break;
                    }
                };
                want -= 1;
                if let Some(hook) = &membership.on_owned {
                    hook(w.id.clone()).await;
                }
                let Some(status) = statuses.iter().find(|s| s.id == w.id).cloned() else {
                    continue;
                };
                let release = cancel.child_token();
                let task = tokio::spawn(supervise(
                    w.clone(),
                    state.clone(),
                    bus.clone(),
                    status,
                    lease,
                    release.clone(),
                    cancel.clone(),
                ));
                owned.insert(
                    w.id.clone(),
                    Owned {
                        release,
                        releasing: false,
                        task,
                    },
                );
            }
        }
    }
    // Shutdown: the others take over as soon as each warehouse is unlocked.
    let handed: Vec<String> = owned.keys().cloned().collect();
    if let Err(e) = state.heartbeat(me, &handed, true, expiry).await {
        tracing::warn!(error = %e, "cannot tell the other processes that this one stops");
    }
    for (id, o) in owned {
        let _ = o.task.await;
        ownership_ended(&id, &statuses);
    }
    let _ = state.heartbeat(me, &[], true, expiry).await;
    wait_for_handover(&state, me, &handed).await;
    if let Err(e) = state.retire_worker(me).await {
        tracing::warn!(error = %e, "cannot remove this process's row from sync_workers; it expires");
    }
}

/// Fences the expired holder of `warehouse_id`'s lock (see [`StateDb::fence_expired`]) and
/// takes the lock once it is free.
async fn fence(state: &StateDb, leases: &Leases, warehouse_id: &str) -> Option<WarehouseLease> {
    let (worker, pid) = match state.fence_expired(warehouse_id).await {
        Ok(Some(fenced)) => fenced,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(warehouse = %warehouse_id, error = %e, "cannot fence the expired holder of the warehouse's lease");
            return None;
        }
    };
    tracing::warn!(warehouse = %warehouse_id, %worker, lease_pid = pid, "the warehouse's owner stopped heartbeating (paused or stuck) but kept its lease: its lease session is terminated, and this process takes the warehouse over");
    // The lock goes once the terminated backend has exited.
    for _ in 0..20 {
        if let Ok(Some(l)) = leases.try_acquire(warehouse_id).await {
            return Some(l);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Opens the lease connection and writes this process's row.
async fn register(state: &StateDb, me: &WorkerIdentity, expiry: f64) -> Result<Leases, StoreError> {
    let leases = Leases::open(state, &me.session).await?;
    state.register_worker(me, expiry).await?;
    Ok(leases)
}

/// A warehouse's pipeline ended here (handed over, lease lost, or stopped).
fn ownership_ended(id: &str, statuses: &[Arc<WarehouseStatus>]) {
    crate::metrics::metrics()
        .warehouse_owned
        .with_label_values(&[id])
        .set(0);
    if let Some(s) = statuses.iter().find(|s| s.id == id) {
        s.owner.send_replace(None);
        s.state.send_if_modified(|st| {
            if matches!(st, StreamState::Failed(_)) {
                false
            } else {
                *st = StreamState::Standby;
                true
            }
        });
    }
}

/// Tells each warehouse's status who owns it, as the rows say (this process's own from what
/// it holds).
fn show_owners(
    rows: &[WorkerRow],
    me: &str,
    owned: &HashMap<String, Owned>,
    statuses: &[Arc<WarehouseStatus>],
) {
    for s in statuses {
        let owner = if owned.contains_key(&s.id) {
            Some(me.to_string())
        } else {
            rows.iter()
                .find(|r| r.alive && r.worker_id != me && r.owned.contains(&s.id))
                .map(|r| r.worker_id.clone())
        };
        s.owner.send_if_modified(|o| {
            if *o == owner {
                false
            } else {
                *o = owner;
                true
            }
        });
        if !owned.contains_key(&s.id) {
            s.state.send_if_modified(|st| {
                if *st == StreamState::Starting {
                    *st = StreamState::Standby;
                    true
                } else {
                    false
                }
            });
        }
    }
}

/// After a stop, waits (up to [`ownership::HANDOVER_WAIT`]) until another live process owns
/// each warehouse this one handed over, when there is one.
async fn wait_for_handover(state: &StateDb, me: &WorkerIdentity, handed: &[String]) {
    if handed.is_empty() {
        return;
    }
    let deadline = Instant::now() + ownership::HANDOVER_WAIT;
    while Instant::now() < deadline {
        let Ok(rows) = state.workers().await else {
            return;
        };
        let others: Vec<&WorkerRow> = rows
            .iter()
            .filter(|r| r.alive && !r.draining && r.worker_id != me.worker_id)
            .collect();
        if others.is_empty() {
            return;
        }
        let waiting: Vec<&String> = handed
            .iter()
            .filter(|id| !others.iter().any(|r| r.owned.contains(id)))
            .collect();
        if waiting.is_empty() {
            tracing::info!(
                warehouses = handed.len(),
                "every warehouse this process owned is owned by another process now"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tracing::warn!(
        wait_s = ownership::HANDOVER_WAIT.as_secs(),
        "stopping before another process owned every warehouse this one handed over; they take them over on their next balance"
    );
}

/// Runs and restarts one warehouse's pipeline while this process owns it: until `release`
/// (handing it over, or the process stopping: `cancel`) or until the lease is lost; then
/// unlocks it.
async fn supervise<B: Bus>(
    w: WarehouseConfig,
    state: StateDb,
    bus: B,
    status: Arc<WarehouseStatus>,
    lease: WarehouseLease,
    release: CancellationToken,
    cancel: CancellationToken,
) {
    tracing::info!(warehouse = %w.id, "owning warehouse");
    crate::metrics::metrics()
        .warehouse_owned
        .with_label_values(&[&w.id])
        .set(1);
    // Streaming once the replication stream is open (the pipeline says so), not before.
    status.state.send_replace(StreamState::Starting);
    let mut backoff = crate::backoff::Backoff::new();
    let result = loop {
        let started = Instant::now();
        // Why the pipeline is restarted from the checkpoint (after a backoff), if it is.
        let retry = match run_pipeline(&w, &state, &bus, &status, &lease, &release, &cancel).await {
            Ok(()) if release.is_cancelled() => break Ok(()),
            // A pipeline only ends cleanly when asked to; ending otherwise (a stream or bus
            // that closed without saying why) is restarted, never a silent stop of the
            // warehouse (with one warehouse, that ended the whole process with status 0).
            Ok(()) => "the pipeline ended without an error".to_string(),
            Err(PipelineError::LeaseLost) => break Err(PipelineError::LeaseLost),
            // This process owns the warehouse: whoever holds its slot is the walsender of a
            // previous owner, dead or fenced, which would hold it up to wal_sender_timeout.
            Err(e @ PipelineError::Source(SourceError::SlotInUse { .. })) if lease.holds() => {
                end_stale_walsender(&w).await;
                e.to_string()
            }
            Err(e) if e.is_transient() => e.to_string(),
            Err(PipelineError::Source(SourceError::SlotInvalidated { slot })) => {
                if let Err(e) = recover_lost_slot(&w, &slot, &state, &status, &release).await {
                    break Err(e);
                }
                if release.is_cancelled() {
                    break Ok(());
                }
                continue;
            }
            Err(e) => break Err(e),
        };
        status
            .state
            .send_replace(StreamState::Retrying(retry.clone()));
        let wait = backoff.next_delay(started.elapsed());
        tracing::warn!(warehouse = %w.id, error = %retry, retry_in_ms = wait.as_millis() as u64, "pipeline failed; restarting from the checkpoint");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = release.cancelled() => break Ok(()),
            _ = lease.lost() => break Err(PipelineError::LeaseLost),
        }
    };
    match result {
        Ok(()) => {
            lease.release().await;
            tracing::info!(warehouse = %w.id, "warehouse released");
        }
        Err(PipelineError::LeaseLost) => {
            tracing::error!(warehouse = %w.id, "lease lost: the warehouse stopped at once; whoever owns it next resumes from its checkpoint");
        }
        Err(e) => {
            // Kept (locked) while failed: a restart of the process, after the cause is fixed,
            // tries it again; another process taking it would fail the same way.
            tracing::error!(warehouse = %w.id, error = %e, "warehouse stopped; fix the cause and restart");
            status
                .state
                .send_replace(StreamState::Failed(e.to_string()));
            tokio::select! {
                _ = release.cancelled() => {}
                _ = lease.lost() => {}
            }
            lease.release().await;
        }
    }
}

/// Terminates the walsender that holds `w`'s slot (this process holds the warehouse's lease).
async fn end_stale_walsender(w: &WarehouseConfig) {
    let ended = async {
        let sql = crate::pg::connect_sql(&w.conn)
            .await
            .map_err(|e| e.to_string())?;
        sql.query(
            "SELECT active_pid, pg_terminate_backend(active_pid) FROM pg_replication_slots
              WHERE slot_name = $1 AND active AND active_pid IS NOT NULL",
            &[&w.slot],
        )
        .await
        .map_err(|e| e.to_string())
        .map(|rows| rows.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>())
    };
    match ended.await {
        Ok(pids) if !pids.is_empty() => {
            tracing::warn!(warehouse = %w.id, slot = %w.slot, walsender_pids = ?pids, "this process owns the warehouse, and a previous owner's walsender still held its slot: terminated")
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(warehouse = %w.id, slot = %w.slot, error = %e, "cannot terminate the walsender that holds the slot (the engine's role needs to be the walsender's role, or hold pg_signal_backend); it lets go after wal_sender_timeout")
        }
    }
}

/// The slot lost WAL it needed: the warehouse waits, reported as failed, until an operator
/// asks for a forced resync (`POST /sync/warehouses/{id}`); then the lost slot is dropped, so
/// the pipeline creates a new one with a full load, and the resync runs on the new stream.
async fn recover_lost_slot(
    w: &WarehouseConfig,
    slot: &str,
    state: &StateDb,
    status: &WarehouseStatus,
    cancel: &CancellationToken,
) -> Result<(), PipelineError> {
    let message = format!(
        "replication slot {slot} is lost (the WAL it needed was removed); POST /sync/warehouses/{} creates a new slot and resyncs",
        w.id
    );
    tracing::error!(warehouse = %w.id, "{message}");
    status.state.send_replace(StreamState::Failed(message));
    loop {
        match state.active_job_for("resync", &w.id).await {
            Ok(Some(job)) => {
                tracing::info!(warehouse = %w.id, %job, %slot, "dropping the lost slot; a new slot and a full load follow");
                let sql = crate::pg::connect_sql(&w.conn)
                    .await
                    .map_err(SourceError::from)?;
                crate::source::slot::drop_slot(&sql, slot).await?;
                status.state.send_replace(StreamState::Starting);
                return Ok(());
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(warehouse = %w.id, error = %e, "cannot read jobs from the state DB")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(LEASE_POLL) => {}
            _ = cancel.cancelled() => return Ok(()),
        }
    }
}

async fn run_pipeline<B: Bus>(
    w: &WarehouseConfig,
    state: &StateDb,
    bus: &B,
    status: &Arc<WarehouseStatus>,
    lease: &WarehouseLease,
    release: &CancellationToken,
    cancel: &CancellationToken,
) -> Result<(), PipelineError> {
    // A checkpoint of another slot (the configuration named a new one) says nothing of this
    // slot: it starts, and gets its initial load, as a new one.
    let stored = state.checkpoint(&w.id).await?;
    let expected_origin = stored.as_ref().and_then(|c| c.origin.clone());
    let checkpoint = stored
        .filter(|c| c.slot_name == w.slot)
        .map_or(Lsn::ZERO, |c| c.flush_lsn);
    // Before anything of this pipeline can become durable.
    status
        .generation
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let (items_tx, items_rx) = mpsc::channel(16);
    let (acks_tx, mut acks_rx) = mpsc::channel::<CommitAck>(UNACKED_COMMITS);
    let (durable_tx, durable_rx) = watch::channel(checkpoint);
    let child = release.child_token();
    let mut opts = SourceOptions::new(&w.id, w.conn.clone(), &w.slot, &w.publication);
    opts.create_slot = true;
    opts.initial_load = InitialLoad::Incremental(load_hook(state.clone(), w.id.clone()));
    opts.streaming = w.streaming == Streaming::On;
    opts.heartbeat_interval = w.heartbeat_interval;
    opts.primary = w.primary.clone();
    opts.failover = w.failover;
    opts.health = Some(status.slot_health.clone());
    opts.on_streaming = Some({
        let state = status.clone();
        stream::OnStreaming(Arc::new(move || {
            state.state.send_replace(StreamState::Streaming);
        }))
    });
    opts.chunks = Some(status.chunk_inbox.clone());
    opts.origin = Some(OriginGuard {
        expected: expected_origin,
        record: {
            let (state, id, slot) = (state.clone(), w.id.clone(), w.slot.clone());
            Arc::new(move |origin| {
                let (state, id, slot) = (state.clone(), id.clone(), slot.clone());
                Box::pin(async move {
                    tracing::info!(warehouse = %id, system_id = %origin.system_id, timeline = origin.timeline, "recording the warehouse's WAL history with its checkpoint");
                    state
                        .record_origin(&id, &slot, &origin)
                        .await
                        .map_err(|e| e.to_string())
                })
            })
        },
    });
    // A lost connection ends the pipeline: the warehouse reads Retrying (in /ready and the
    // metrics) until the restarted pipeline streams again, instead of "streaming" while the
    // source reconnects on its own.
    opts.max_reconnects = Some(0);
    let source_cancel = child.clone();
    let mut source =
        tokio::spawn(async move { stream::run(&opts, items_tx, durable_rx, source_cancel).await });
    let mut publisher = tokio::spawn(bus::publish(bus.publisher(&w.id)?, items_rx, acks_tx));
    let mut last_write = Instant::now();
    let mut unwritten: Option<Lsn> = None;
    // Set when handing over or stopping: the source stops reading, and what it handed on
    // still gets its outcome (the consumer stage runs on until the pipelines are done): a
    // handover waits for all of it (so that the next owner finds the checkpoint at the last
    // commit handed on and nothing of this one in flight), a shutdown until the deadline.
    let mut draining: Option<Instant> = None;
    let (mut source_done, mut publisher_done) = (false, false);
    let result: Result<(), PipelineError> = loop {
        let deadline = draining.unwrap_or_else(Instant::now);
        tokio::select! {
            // Biased: shutdown first; then the publisher, because when it failed the source
            // soon fails too (its consumer is gone) and the publisher's error says why; the
            // lease check before the acks, which may be ready all the time.
            biased;
            _ = release.cancelled(), if draining.is_none() => {
                draining = Some(stop_reading(&w.id, &child, cancel));
            }
            _ = cancel.cancelled(), if draining.is_some_and(|d| d > Instant::now() + SHUTDOWN_GRACE) => {
                draining = Some(Instant::now() + SHUTDOWN_GRACE);
            }
            _ = lease.lost() => break Err(PipelineError::LeaseLost),
            _ = tokio::time::sleep_until(deadline), if draining.is_some() => {
                gave_up(&w.id);
                break Ok(());
            }
            r = &mut publisher, if !publisher_done => {
                publisher_done = true;
                match flatten(r) {
                    // The publisher ends cleanly when the source closed its channel: the
                    // source's own result says why (when stopping, the acks still due are
                    // read on).
                    Ok(()) if draining.is_some() => {}
                    Ok(()) => break flatten((&mut source).await),
                    Err(e) => break Err(e),
                }
            }
            ack = acks_rx.recv() => {
                // The acks close when the publisher ended, which may be a moment before its
                // task reads as finished here (it runs on another thread): its result, and
                // then the source's, say why (a source that failed closes the publisher).
                // When stopping, every ack due has come: done.
                let Some(ack) = ack else {
                    if draining.is_some() {
                        break Ok(());
                    }
                    break match flatten((&mut publisher).await) {
                        Ok(()) => flatten((&mut source).await),
                        Err(e) => Err(e),
                    };
                };
                // An ack may never come (a consumer stage that stops gives no outcome to
                // what it was delivering): stopping waits for it only until the deadline.
                // What it covers stays unconfirmed and is replayed.
                let mut ack = ack;
                let answer = loop {
                    let deadline = draining.unwrap_or_else(Instant::now);
                    tokio::select! {
                        r = &mut ack => break Ok(Some(r)),
                        _ = release.cancelled(), if draining.is_none() => {
                            draining = Some(stop_reading(&w.id, &child, cancel));
                        }
                        _ = cancel.cancelled(), if draining.is_some_and(|d| d > Instant::now() + SHUTDOWN_GRACE) => {
                            draining = Some(Instant::now() + SHUTDOWN_GRACE);
                        }
                        _ = lease.lost() => break Err(PipelineError::LeaseLost),
                        _ = tokio::time::sleep_until(deadline), if draining.is_some() => break Ok(None),
                    }
                };
                let end = match answer {
                    Err(e) => break Err(e),
                    Ok(Some(Ok(end))) => end,
                    Ok(Some(Err(e))) => break Err(e.into()),
                    Ok(None) => {
                        gave_up(&w.id);
                        break Ok(());
                    }
                };
                unwritten = Some(end);
                if acks_rx.is_empty() || last_write.elapsed() >= CHECKPOINT_INTERVAL {
                    if let Err(e) = state.advance_checkpoint(&w.id, &w.slot, end).await {
                        break Err(e.into());
                    }
                    unwritten = None;
                    last_write = Instant::now();
                    let _ = durable_tx.send(end);
                }
            }
            r = &mut source, if !source_done => {
                source_done = true;
                if draining.is_none() {
                    break flatten(r);
                }
                if let Err(e) = flatten(r) {
                    tracing::debug!(warehouse = %w.id, error = %e, "the stream ended with an error while stopping");
                }
            }
        }
    };
    child.cancel();
    // Whatever was acknowledged but not yet written is written now, so a clean stop loses
    // no progress.
    if let Some(end) = unwritten {
        state.advance_checkpoint(&w.id, &w.slot, end).await?;
    }
    source.abort();
    publisher.abort();
    result
}

/// Stopping or handing over: the pipeline's stream stops reading; returns the deadline for
/// the outcomes of what it handed on (a handover has none: the next owner must not start
/// while this one still delivers).
fn stop_reading(
    warehouse: &str,
    source: &CancellationToken,
    shutdown: &CancellationToken,
) -> Instant {
    source.cancel();
    if shutdown.is_cancelled() {
        tracing::info!(%warehouse, grace_s = SHUTDOWN_GRACE.as_secs(), "stopping: the stream stops reading; what it handed on gets its outcome first");
        Instant::now() + SHUTDOWN_GRACE
    } else {
        tracing::info!(%warehouse, "handing over: the stream stops reading; what it handed on gets its outcome and its checkpoint first");
        Instant::now() + HANDOVER_FOREVER
    }
}

/// The shutdown's deadline passed with outcomes still due.
fn gave_up(warehouse: &str) {
    tracing::warn!(%warehouse, grace_s = SHUTDOWN_GRACE.as_secs(), "stopping without the outcome of everything handed on; it is replayed at the next start");
}

/// Schedules a slot's initial load as a `load` job (read in chunks through the stream by
/// [`crate::jobs::run_resyncs`]), unless one is already queued or running: a restarted load
/// resumes from its saved chunks instead of starting again.
fn load_hook(state: StateDb, warehouse: String) -> LoadHook {
    Arc::new(move |needed: LoadNeeded| {
        let (state, warehouse) = (state.clone(), warehouse.clone());
        Box::pin(async move {
            if needed.lost {
                // A load under way belongs to the slot that is gone: the tables it finished
                // missed what changed since. It starts again, whole.
                let failed = state
                    .fail_loads_of(
                        &warehouse,
                        "superseded: the slot was lost while it ran (a new load follows)",
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                if failed > 0 {
                    tracing::warn!(%warehouse, jobs = failed, "the slot was lost during its load: the load starts again");
                }
            } else if let Some(job) = state
                .active_job_for(crate::store::LOAD_JOB, &warehouse)
                .await
                .map_err(|e| e.to_string())?
            {
                tracing::info!(%warehouse, %job, "the initial load is already scheduled; it resumes where it stopped");
                return Ok(());
            }
            let id = crate::store::new_job_id();
            state
                .create_job(
                    &id,
                    crate::store::LOAD_JOB,
                    std::slice::from_ref(&warehouse),
                    crate::store::RESYNC_TIMEOUT,
                )
                .await
                .map_err(|e| e.to_string())?;
            if needed.lost {
                // Rows deleted while no slot watched are still at central: the load only
                // upserts. A verify-and-repair follows it (see `crate::jobs::run_job`).
                state
                    .set_job_options(&id, &serde_json::json!({"then_verify_repair": true}))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            tracing::info!(%warehouse, job = %id, slot = %needed.slot, start = %needed.start, reason = %needed.reason, then_verify_repair = needed.lost, "initial load scheduled");
            Ok(())
        })
    })
}

fn flatten<E>(r: Result<Result<(), E>, tokio::task::JoinError>) -> Result<(), PipelineError>
where
    PipelineError: From<E>,
{
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(PipelineError::Task(e.to_string())),
    }
}
