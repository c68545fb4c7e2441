//! Sync cycles (`POST /sync/trigger`): proof that everything committed at the warehouses
//! before a moment has an outcome at the central system.
//!
//! A cycle writes a logical message into each warehouse's WAL (on its primary, when the
//! warehouse URL points at a standby) and takes the message's position as the target, so a
//! commit past the target reaches the stream even when the warehouse is otherwise idle. A warehouse is done once its checkpoint passes the target: with the
//! embedded bus a commit is checkpointed only after each of its changes has an outcome; with
//! Kafka the checkpoint means "published", so the job then records the change topics' ends
//! and waits for the consumer group's committed offsets to reach them. Jobs live in the state
//! DB; every `run` process works on them, so they survive restarts.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::Lsn;
use crate::app::WarehouseConfig;
use crate::app::{StreamState, WarehouseStatus};
use crate::consumer::kafka::{GroupProgress, PartitionEnd};
use crate::event::SnapshotMarker;
use crate::source::SourceError;
use crate::source::marker::Markers;
use crate::source::resync::ChunkDone;
use crate::store::{ActiveWarehouse, StateDb, StoreError};

/// How often running jobs are checked.
const TICK: Duration = Duration::from_millis(250);

/// How the runner learns that published changes have outcomes.
pub enum Delivery {
    /// The embedded bus: a checkpoint is written only after the outcomes.
    Embedded,
    /// Kafka: the consumer group's committed offsets.
    Kafka(Arc<GroupProgress>),
}

/// One configured warehouse, as the runner needs it.
pub struct Warehouse {
    /// Its connection settings.
    pub config: WarehouseConfig,
    /// Its pipeline's status in this process.
    pub status: Arc<WarehouseStatus>,
}

/// Works on sync cycles until `cancel`.
pub async fn run(
    state: StateDb,
    warehouses: Vec<Warehouse>,
    delivery: Delivery,
    cancel: CancellationToken,
) {
    let mut runner = Runner {
        state,
        warehouses: warehouses
            .into_iter()
            .map(|w| (w.config.id.clone(), w))
            .collect(),
        delivery,
        ends: HashMap::new(),
    };
    loop {
        if let Err(e) = runner.tick().await {
            tracing::warn!(error = %e, "sync jobs: cannot reach the state DB; retrying");
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

struct Runner {
    state: StateDb,
    warehouses: HashMap<String, Warehouse>,
    delivery: Delivery,
    /// Kafka: the topics' ends recorded per (job, warehouse) once its changes were published.
    ends: HashMap<(String, String), Vec<PartitionEnd>>,
}

impl Runner {
    async fn tick(&mut self) -> Result<(), StoreError> {
        let active = self.state.active_warehouses("cycle").await?;
        for w in &active {
            if let Some(reason) = self.step(w).await? {
                tracing::warn!(job = %w.job_id, warehouse = %w.warehouse_id, reason = %reason, "sync cycle failed");
                self.state
                    .update_job_warehouse(w, None, false, Some(&reason))
                    .await?;
                self.state.settle_jobs(Some((&w.job_id, &reason))).await?;
            }
        }
        self.ends
            .retain(|(job, _), _| active.iter().any(|w| &w.job_id == job));
        self.state.settle_jobs(None).await
    }

    /// Advances one warehouse of a job; `Some(reason)` fails the job.
    async fn step(&mut self, w: &ActiveWarehouse) -> Result<Option<String>, StoreError> {
        let Some(wh) = self.warehouses.get(&w.warehouse_id) else {
            return Ok(Some(format!(
                "warehouse {} is not configured in this process",
                w.warehouse_id
            )));
        };
        if let StreamState::Failed(e) = &*wh.status.state.borrow() {
            return Ok(Some(format!(
                "warehouse {} stopped streaming: {e}",
                w.warehouse_id
            )));
        }
        let Some(target) = w.target else {
            if w.overdue {
                return Ok(Some(format!(
                    "timed out before the WAL position of warehouse {} could be read",
                    w.warehouse_id
                )));
            }
            match capture(&wh.config).await {
                Ok(target) => {
                    tracing::info!(job = %w.job_id, warehouse = %w.warehouse_id, %target, "sync cycle target");
                    self.state
                        .set_job_target(&w.job_id, &w.warehouse_id, target)
                        .await?;
                }
                Err(Capture::Refused(reason)) => return Ok(Some(reason)),
                Err(Capture::Retry(e)) => {
                    self.state
                        .update_job_warehouse(w, None, false, Some(&e))
                        .await?;
                }
            }
            return Ok(None);
        };
        let delivered = self
            .state
            .checkpoint(&w.warehouse_id)
            .await?
            .map(|c| c.flush_lsn);
        // Central cannot equal the warehouse before the slot's initial load is delivered.
        let loading = self
            .state
            .active_job_for(LOAD_JOB, &w.warehouse_id)
            .await?
            .is_some();
        let published = !loading && delivered.is_some_and(|d| d >= target);
        let (done, error) = if !published {
            (false, None)
        } else {
            match &self.delivery {
                Delivery::Embedded => (true, None),
                Delivery::Kafka(progress) => {
                    let key = (w.job_id.clone(), w.warehouse_id.clone());
                    self.kafka_caught_up(progress.clone(), key).await
                }
            }
        };
        if !done && w.overdue {
            let at = delivered.map_or("nothing".to_string(), |d| d.to_string());
            return Ok(Some(format!(
                "timed out: warehouse {} has outcomes up to {at} of target {target}{}",
                w.warehouse_id,
                error.map(|e| format!(" ({e})")).unwrap_or_default()
            )));
        }
        let shown = if done { Some(target) } else { delivered };
        self.state
            .update_job_warehouse(w, shown, done, error.as_deref())
            .await?;
        Ok(None)
    }

    /// Kafka: records the topics' ends the first time, then whether the group reached them.
    async fn kafka_caught_up(
        &mut self,
        progress: Arc<GroupProgress>,
        key: (String, String),
    ) -> (bool, Option<String>) {
        let recorded = self.ends.get(&key).cloned();
        let result = ask_group(&progress, move |p| match recorded {
            Some(ends) => p.behind(&ends).map(|b| (ends, b)),
            None => p.ends().map(|ends| (ends, vec![])),
        })
        .await;
        match result {
            Ok((ends, behind)) => {
                let first = !self.ends.contains_key(&key);
                self.ends.insert(key, ends);
                // The ends just recorded have not been compared yet.
                (!first && behind.is_empty(), None)
            }
            Err(e) => (false, Some(e)),
        }
    }
}

/// Runs one of `progress`'s blocking Kafka requests off the async threads.
async fn ask_group<T: Send + 'static>(
    progress: &Arc<GroupProgress>,
    ask: impl FnOnce(&GroupProgress) -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let progress = progress.clone();
    tokio::task::spawn_blocking(move || ask(&progress))
        .await
        .map_err(|e| e.to_string())?
}

/// Reads the warehouse's current WAL position and writes a logical message after it (on
/// the primary, when the warehouse URL points at a standby).
async fn capture(w: &WarehouseConfig) -> Result<Lsn, Capture> {
    let sql = crate::pg::connect_sql(&w.conn)
        .await
        .map_err(|e| Capture::Retry(format!("cannot connect to warehouse {}: {e}", w.id)))?;
    let markers = Markers::open(&sql, w.primary.as_ref(), &w.id)
        .await
        .map_err(|e| match e {
            SourceError::Config(reason) => Capture::Refused(reason),
            e => Capture::Retry(format!(
                "cannot reach the primary of warehouse {}: {e}",
                w.id
            )),
        })?;
    if !markers.available() {
        return Err(Capture::Refused(crate::source::marker::refusal(
            &w.id,
            "a sync cycle",
        )));
    }
    // A commit after the target: the stream reaches the target even if nothing else is
    // written (pgoutput sends the message's transaction: the slot asks for messages). The
    // message's own position is past every commit the warehouse had when it was written.
    let lsn = markers
        .emit(&sql, "inventorysync", "sync cycle")
        .await
        .map_err(|e| Capture::Retry(format!("cannot write to warehouse {}: {e}", w.id)))?;
    lsn.ok_or_else(|| Capture::Refused(crate::source::marker::refusal(&w.id, "a sync cycle")))
}

/// Why a sync cycle's target could not be captured.
enum Capture {
    /// Worth another try (the warehouse or its primary did not answer).
    Retry(String),
    /// Never works as configured: the job fails with this reason.
    Refused(String),
}

pub use crate::store::{LOAD_JOB, RESYNC_TIMEOUT, new_job_id};

/// Rows per resync chunk.
pub const CHUNK_ROWS: usize = 1000;
/// Chunks read ahead of the oldest one not yet durable (a crash reads at most these again).
const CHUNKS_AHEAD: usize = 4;
/// How often a chunk's wait checks whether the pipeline restarted. There is no timeout: the
/// answer comes once the stream has decoded the chunk's high watermark, which under lag
/// takes as long as the lag (a timeout from the request would drop every chunk once the lag
/// exceeds it). A stream session that ends drops the chunk's reply, and the job's own
/// deadline bounds the whole.
const CHUNK_WAIT_CHECK: Duration = Duration::from_secs(1);

/// Works on forced resyncs (`POST /sync/warehouses/{id}`) of the warehouses this process
/// streams, until `cancel`: each mapped table is read in primary-key chunks by the stream
/// (see [`crate::source::resync`]), and each chunk's position is saved once it is durable,
/// so a restarted resync continues where it stopped. A resync is done once its last chunk
/// has outcomes at central: with Kafka, once the consumer group's committed offsets reach
/// the change topics' ends as they were after the last chunk was published.
pub async fn run_resyncs(
    state: StateDb,
    warehouses: Vec<Warehouse>,
    tables: Vec<String>,
    delivery: Delivery,
    cancel: CancellationToken,
) {
    let warehouses: Arc<HashMap<String, Warehouse>> = Arc::new(
        warehouses
            .into_iter()
            .map(|w| (w.config.id.clone(), w))
            .collect(),
    );
    let (tables, delivery) = (Arc::new(tables), Arc::new(delivery));
    // One job at a time per warehouse, every warehouse at once: one warehouse's load (or
    // its wait for the consumer group) never holds up another's.
    let mut running: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        running.retain(|_, task| !task.is_finished());
        let mut active = Vec::new();
        for kind in [LOAD_JOB, "resync"] {
            match state.active_warehouses(kind).await {
                Ok(a) => active.extend(a.into_iter().map(|w| (kind, w))),
                Err(e) => tracing::warn!(error = %e, "resync: cannot read jobs; retrying"),
            }
        }
        for (kind, w) in active {
            if running.contains_key(&w.warehouse_id) {
                continue;
            }
            let Some(wh) = warehouses.get(&w.warehouse_id) else {
                continue;
            };
            // Only the process that streams the warehouse can read its chunks.
            if *wh.status.state.borrow() != StreamState::Streaming {
                continue;
            }
            let (state, warehouses, tables, delivery, cancel) = (
                state.clone(),
                warehouses.clone(),
                tables.clone(),
                delivery.clone(),
                cancel.clone(),
            );
            let id = w.warehouse_id.clone();
            running.insert(
                id.clone(),
                tokio::spawn(async move {
                    if let Some(wh) = warehouses.get(&id) {
                        run_job(&state, wh, kind, &w, &tables, &delivery, &cancel).await;
                    }
                }),
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK * 2) => {}
            _ = cancel.cancelled() => {
                for task in running.values() {
                    task.abort();
                }
                return;
            }
        }
    }
}

/// Runs one warehouse's load or resync job until it is done, failed or interrupted (a later
/// tick resumes it from its saved chunks).
async fn run_job(
    state: &StateDb,
    wh: &Warehouse,
    kind: &str,
    w: &ActiveWarehouse,
    tables: &[String],
    delivery: &Delivery,
    cancel: &CancellationToken,
) {
    let work = if kind == LOAD_JOB {
        match published_tables(&wh.config).await {
            Ok(tables) => Work {
                kind: LOAD_JOB,
                tables,
                marker: SnapshotMarker::True,
                what: "initial load",
            },
            Err(e) => {
                tracing::warn!(job = %w.job_id, warehouse = %w.warehouse_id, error = %e, "initial load: cannot list the published tables; retrying");
                return;
            }
        }
    } else {
        Work {
            kind: "resync",
            tables: tables.to_vec(),
            marker: SnapshotMarker::Incremental,
            what: "resync",
        }
    };
    match resync(state, wh, w, &work, delivery, cancel).await {
        Ok(()) | Err(Stop::Cancelled) => {}
        Err(Stop::Failed(reason)) => {
            tracing::warn!(job = %w.job_id, warehouse = %w.warehouse_id, reason = %reason, "{} failed", work.what);
            let failed = async {
                state
                    .update_job_warehouse(w, None, false, Some(&reason))
                    .await?;
                state.settle_jobs(Some((&w.job_id, &reason))).await
            };
            if let Err(e) = failed.await {
                tracing::warn!(error = %e, "cannot record the job's failure");
            }
        }
        Err(Stop::Store(e)) => {
            tracing::warn!(error = %e, "{}: state DB unavailable; retrying", work.what)
        }
    }
}

/// What a resync or load job reads, and how its rows are marked.
struct Work {
    kind: &'static str,
    tables: Vec<String>,
    marker: SnapshotMarker,
    what: &'static str,
}

/// The warehouse publication's tables (`schema.table`), in name order.
async fn published_tables(w: &WarehouseConfig) -> Result<Vec<String>, String> {
    let sql = crate::pg::connect_sql(&w.conn)
        .await
        .map_err(|e| format!("cannot connect to warehouse {}: {e}", w.id))?;
    let rows = sql
        .query(
            "SELECT schemaname::text || '.' || tablename::text FROM pg_publication_tables
              WHERE pubname = $1 ORDER BY 1",
            &[&w.publication],
        )
        .await
        .map_err(|e| format!("cannot list publication {}: {e}", w.publication))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Why a resync stopped before it was done.
enum Stop {
    Cancelled,
    Failed(String),
    Store(StoreError),
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        Stop::Store(e)
    }
}

/// Runs one warehouse's resync to its end.
async fn resync(
    state: &StateDb,
    wh: &Warehouse,
    w: &ActiveWarehouse,
    work: &Work,
    delivery: &Delivery,
    cancel: &CancellationToken,
) -> Result<(), Stop> {
    if work.tables.is_empty() && work.marker == SnapshotMarker::Incremental {
        return Err(Stop::Failed(
            "no table is mapped ([[mappings]]): there is nothing to resync".into(),
        ));
    }
    let mut last_end: Option<Lsn> = None;
    for table in &work.tables {
        let mut progress = state
            .resync_progress(&w.job_id, &w.warehouse_id, table)
            .await?;
        // Chunks answered but not yet durable, oldest first: the next one is asked for
        // while the earlier ones are delivered. Only their pipeline can deliver their rows
        // (they are not in the WAL), so a pipeline restart discards them.
        let mut ahead: VecDeque<ChunkDone> = VecDeque::new();
        let mut generation = wh.status.generation();
        while !progress.done {
            if w.overdue {
                return Err(Stop::Failed(format!(
                    "timed out while resyncing {table} after {} chunk(s)",
                    progress.chunks
                )));
            }
            let asked_all = ahead.back().is_some_and(|d| d.exhausted);
            if !asked_all && ahead.len() < CHUNKS_AHEAD {
                let after = match ahead.back() {
                    Some(d) => d.last_key.clone(),
                    None => progress.last_key.clone(),
                };
                let (reply, answer) = tokio::sync::oneshot::channel();
                let req = crate::source::resync::ChunkRequest {
                    // A nonce makes the id this request's alone: the same chunk asked for
                    // again after a restart must not take the watermarks of the earlier
                    // request (replayed from the slot) for its own, which would version its
                    // rows at that earlier point in the stream, below what central was sent
                    // since.
                    id: format!(
                        "{}:{}:{}:{:016x}",
                        w.job_id,
                        table,
                        progress.chunks + ahead.len() as i64,
                        rand::random::<u64>()
                    ),
                    table: table.clone(),
                    after,
                    limit: CHUNK_ROWS,
                    marker: work.marker,
                    reply,
                };
                if wh.status.chunks.send(req).await.is_err() {
                    return Err(Stop::Cancelled);
                }
                let mut answer = std::pin::pin!(answer);
                let mut check = tokio::time::interval(CHUNK_WAIT_CHECK);
                loop {
                    tokio::select! {
                        r = &mut answer => {
                            match r {
                                Ok(Ok(done)) => ahead.push_back(done),
                                Ok(Err(reason)) => return Err(Stop::Failed(reason)),
                                // The stream session that held the chunk ended: ask again
                                // from the saved position.
                                Err(_) => {
                                    tracing::info!(job = %w.job_id, %table, "resync chunk unanswered (the stream restarted); asking again");
                                    ahead.clear();
                                    generation = wh.status.generation();
                                }
                            }
                            break;
                        }
                        _ = check.tick() => {
                            if state
                                .active_warehouses(work.kind)
                                .await?
                                .iter()
                                .any(|a| a.job_id == w.job_id && a.overdue)
                            {
                                return Err(Stop::Failed(format!(
                                    "timed out while resyncing {table} after {} chunk(s): the stream did not reach the chunk's watermark",
                                    progress.chunks
                                )));
                            }
                        }
                        _ = cancel.cancelled() => return Err(Stop::Cancelled),
                    }
                }
                continue;
            }
            let Some(done) = ahead.pop_front() else {
                continue;
            };
            // Saved only once durable in the pipeline that emitted it: a restart before that
            // reads the chunk again.
            let durable = loop {
                let at = state
                    .checkpoint(&w.warehouse_id)
                    .await?
                    .map(|c| c.flush_lsn);
                if wh.status.generation() != generation {
                    break false;
                }
                if at.is_some_and(|a| a >= done.end_lsn) {
                    break true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    _ = cancel.cancelled() => return Err(Stop::Cancelled),
                }
            };
            if !durable {
                tracing::info!(job = %w.job_id, %table, "the pipeline restarted before the chunks read ahead were delivered; reading them again");
                ahead.clear();
                generation = wh.status.generation();
                continue;
            }
            state
                .save_resync_chunk(
                    &w.job_id,
                    &w.warehouse_id,
                    table,
                    done.last_key.as_deref(),
                    done.read,
                    done.emitted,
                    done.exhausted,
                )
                .await?;
            tracing::debug!(job = %w.job_id, %table, read = done.read, emitted = done.emitted, "resync chunk delivered");
            state
                .update_job_warehouse(w, Some(done.end_lsn), false, None)
                .await?;
            last_end = Some(done.end_lsn);
            progress = state
                .resync_progress(&w.job_id, &w.warehouse_id, table)
                .await?;
        }
    }
    if let Delivery::Kafka(progress) = delivery {
        // Every chunk is published (the checkpoint covers it); the job is done once the
        // consumer group has outcomes for everything on the topics now.
        let ends = ask_group(progress, GroupProgress::ends)
            .await
            .map_err(Stop::Failed)?;
        loop {
            let ends = ends.clone();
            match ask_group(progress, move |p| p.behind(&ends)).await {
                Ok(b) if b.is_empty() => break,
                Ok(_) => {}
                Err(e) => tracing::debug!(job = %w.job_id, error = %e, "resync: group progress"),
            }
            if state
                .active_warehouses(work.kind)
                .await?
                .iter()
                .any(|a| a.job_id == w.job_id && a.overdue)
            {
                return Err(Stop::Failed(
                    "timed out waiting for the consumer group to deliver the resync's rows".into(),
                ));
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = cancel.cancelled() => return Err(Stop::Cancelled),
            }
        }
    }
    tracing::info!(job = %w.job_id, warehouse = %w.warehouse_id, "{} done", work.what);
    state.update_job_warehouse(w, last_end, true, None).await?;
    state.settle_jobs(None).await?;
    Ok(())
}
