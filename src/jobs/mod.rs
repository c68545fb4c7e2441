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
//!
//! The same runners work on loads and forced resyncs (below) and on verify jobs
//! ([`verify`]): proof that central holds what the warehouse holds, which a cycle alone
//! does not give (a dead letter is an outcome).

pub mod verify;

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
use crate::source::resync::{ChunkDone, ChunkRefused};
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

/// How often the publication of a warehouse streamed here is checked for tables that need a
/// load (joined the publication, or their mapping is new or changed).
const LOAD_CHECK: Duration = Duration::from_secs(10);

/// What the fingerprint of a published table that no mapping names reads.
const UNMAPPED: &str = "unmapped";

/// The mapped tables (as configured) and each mapping's fingerprint
/// ([`crate::consumer::settings::TableMapping::fingerprint`]), in name order.
pub type MappedTables = Vec<(String, String)>;

/// Works on forced resyncs (`POST /sync/warehouses/{id}`) and loads of the warehouses this
/// process streams, until `cancel`: each table is read in primary-key chunks by the stream
/// (see [`crate::source::resync`]), and each chunk's position is saved once it is durable,
/// so a restarted resync continues where it stopped. A resync is done once its last chunk
/// has outcomes at central: with Kafka, once the consumer group's committed offsets reach
/// the change topics' ends as they were after the last chunk was published.
///
/// It also schedules loads by itself: a table that joins the publication, or whose mapping
/// is new or changed since its last load, gets a `load` job for that table alone (see
/// [`check_tables`]), while streaming goes on.
pub async fn run_resyncs(
    state: StateDb,
    warehouses: Vec<Warehouse>,
    mapped: MappedTables,
    delivery: Delivery,
    verifier: Option<Arc<verify::Verifier>>,
    schedule: verify::VerifySchedule,
    cancel: CancellationToken,
) {
    let began = tokio::time::Instant::now();
    let mut verify_checked: HashMap<String, tokio::time::Instant> = HashMap::new();
    let warehouses: Arc<HashMap<String, Warehouse>> = Arc::new(
        warehouses
            .into_iter()
            .map(|w| (w.config.id.clone(), w))
            .collect(),
    );
    let (mapped, delivery) = (Arc::new(mapped), Arc::new(delivery));
    // One job at a time per warehouse, every warehouse at once: one warehouse's load (or
    // its wait for the consumer group) never holds up another's.
    let mut running: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut checked: HashMap<String, tokio::time::Instant> = HashMap::new();
    loop {
        // A job of a warehouse this process no longer streams (handed over, or its lease
        // lost) stops here: its new owner goes on with it from the saved chunks.
        running.retain(|id, task| {
            let here = warehouses
                .get(id)
                .is_some_and(|w| *w.status.state.borrow() == StreamState::Streaming);
            if !here {
                task.abort();
            }
            here && !task.is_finished()
        });
        let mut active = Vec::new();
        for kind in [LOAD_JOB, "resync", crate::store::VERIFY_JOB] {
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
            let (state, warehouses, mapped, delivery, verifier, cancel) = (
                state.clone(),
                warehouses.clone(),
                mapped.clone(),
                delivery.clone(),
                verifier.clone(),
                cancel.clone(),
            );
            let id = w.warehouse_id.clone();
            running.insert(
                id.clone(),
                tokio::spawn(async move {
                    let Some(wh) = warehouses.get(&id) else {
                        return;
                    };
                    if kind != crate::store::VERIFY_JOB {
                        run_job(&state, wh, kind, &w, &mapped, &delivery, &cancel).await;
                        return;
                    }
                    match verifier {
                        Some(v) => {
                            verify::run_job(&state, wh, &w, &mapped, &v, &delivery, &cancel)
                                .await
                        }
                        None => {
                            let reason = "a verify needs WAREHOUSE_API_ENDPOINT and [[mappings]]: there is no central to compare with";
                            let failed = async {
                                state.update_job_warehouse(&w, None, false, Some(reason)).await?;
                                state.settle_jobs(Some((&w.job_id, reason))).await
                            };
                            if let Err(e) = failed.await {
                                tracing::warn!(error = %e, "cannot record the verify's failure");
                            }
                        }
                    }
                }),
            );
        }
        // `[verify] every`: a read-only, paced verify of each warehouse streamed here.
        if let (Some(every), true) = (schedule.every, verifier.is_some()) {
            for (id, wh) in warehouses.iter() {
                if *wh.status.state.borrow() != StreamState::Streaming
                    || verify_checked
                        .get(id)
                        .is_some_and(|at| at.elapsed() < LOAD_CHECK.min(every))
                {
                    continue;
                }
                verify_checked.insert(id.clone(), tokio::time::Instant::now());
                if let Err(e) = schedule_verify(&state, id, every, began, schedule).await {
                    tracing::warn!(warehouse = %id, error = %e, "cannot schedule a verify; trying again");
                }
            }
        }
        // Warehouses streamed here with no job running: tables in need of a load?
        for (id, wh) in warehouses.iter() {
            if running.contains_key(id)
                || *wh.status.state.borrow() != StreamState::Streaming
                || checked.get(id).is_some_and(|at| at.elapsed() < LOAD_CHECK)
            {
                continue;
            }
            // The publication as the stream read it with the slot's health: no connection
            // of its own.
            let Some(published) = wh
                .status
                .slot_health
                .borrow()
                .as_ref()
                .map(|h| h.published.clone())
            else {
                continue;
            };
            checked.insert(id.clone(), tokio::time::Instant::now());
            let (state, config, mapped) = (state.clone(), wh.config.clone(), mapped.clone());
            let kafka = matches!(*delivery, Delivery::Kafka(_));
            running.insert(
                id.clone(),
                tokio::spawn(async move {
                    if let Err(e) = check_tables(&state, &config, published, &mapped, kafka).await {
                        tracing::warn!(warehouse = %config.id, error = %e, "cannot check the publication for tables to load; trying again");
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

/// Queues a scheduled verify of `warehouse` when its last verify is `every` old, or, with
/// none yet, once this process has run for a share of `every` that depends on the warehouse
/// (so that warehouses are verified at different times).
async fn schedule_verify(
    state: &StateDb,
    warehouse: &str,
    every: Duration,
    began: tokio::time::Instant,
    schedule: verify::VerifySchedule,
) -> Result<(), StoreError> {
    let due = match state.last_verify_age(warehouse).await? {
        Some(age) => age >= every.as_secs_f64(),
        None => {
            use std::hash::{BuildHasher, Hasher};
            let mut h = foldhash::quality::FixedState::with_seed(41).build_hasher();
            h.write(warehouse.as_bytes());
            let offset = every.mul_f64((h.finish() % 1000) as f64 / 1000.0);
            began.elapsed() >= offset
        }
    };
    if !due
        || state
            .active_job_for(crate::store::VERIFY_JOB, warehouse)
            .await?
            .is_some()
    {
        return Ok(());
    }
    let id = new_job_id();
    let options = serde_json::to_value(verify::Options {
        max_rows_per_second: Some(schedule.max_rows_per_second),
        scheduled: true,
        ..Default::default()
    })
    .unwrap_or_default();
    state
        .create_verify_job(&id, &[warehouse.to_string()], &options, RESYNC_TIMEOUT)
        .await?;
    tracing::info!(%warehouse, job = %id, every_s = every.as_secs(), rows_per_s = schedule.max_rows_per_second, "scheduled verify queued");
    Ok(())
}

/// The fingerprint of the mapping of published table `name` (relation `oid`): the one its
/// relation is bound to, else the one that names it, else [`UNMAPPED`].
fn print_of(
    oid: u32,
    name: &str,
    bound: &[crate::store::Binding],
    mapped: &MappedTables,
) -> String {
    let table = bound
        .iter()
        .find(|b| b.relation_oid == i64::from(oid))
        .map(|b| b.mapped_table.as_str())
        .unwrap_or(name);
    mapped
        .iter()
        .find(|(t, _)| t == table)
        .map_or_else(|| UNMAPPED.to_string(), |(_, print)| print.clone())
}

/// Schedules a `load` job for the published tables of `w` that need one: those no load has
/// covered (they joined the publication since, including under `FOR ALL TABLES`), and those
/// whose mapping's fingerprint differs from the one their last load had (a mapping added or
/// changed). With the embedded bus only mapped tables count (nothing else reaches central);
/// with Kafka every published table does, since the topic is a product of its own.
async fn check_tables(
    state: &StateDb,
    w: &WarehouseConfig,
    published: Vec<(u32, String)>,
    mapped: &MappedTables,
    kafka: bool,
) -> Result<(), String> {
    if state
        .active_job_for(LOAD_JOB, &w.id)
        .await
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Ok(());
    }
    let loaded = state.table_loads(&w.id).await.map_err(|e| e.to_string())?;
    let bound = state.bindings(&w.id).await.map_err(|e| e.to_string())?;
    let prints: Vec<(u32, String, String)> = published
        .into_iter()
        .map(|(oid, name)| {
            let print = print_of(oid, &name, &bound, mapped);
            (oid, name, print)
        })
        .collect();
    if loaded.is_empty() {
        // Nothing recorded yet: the initial load records what it read when it ends. A
        // warehouse streamed before loads were recorded has its checkpoint: its tables are
        // taken as they are.
        if state
            .checkpoint(&w.id)
            .await
            .map_err(|e| e.to_string())?
            .is_some()
        {
            state
                .record_table_loads(&w.id, &prints, None)
                .await
                .map_err(|e| e.to_string())?;
        }
        return Ok(());
    }
    let (mut wanted, mut quiet) = (Vec::new(), Vec::new());
    for (oid, name, print) in prints {
        let before = loaded.iter().find(|(o, _)| *o == i64::from(oid));
        if before.is_some_and(|(_, p)| *p == print) {
            continue;
        }
        if print != UNMAPPED || kafka {
            let why = match before {
                None => "it joined the publication (or is new under FOR ALL TABLES)",
                Some((_, p)) if p == UNMAPPED => "a mapping names it now",
                Some(_) => "its mapping changed",
            };
            tracing::info!(warehouse = %w.id, table = %name, "loading a table while streaming goes on: {why}");
            wanted.push(name);
        } else {
            // Nothing of it reaches central: noted, so that a mapping added later loads it.
            quiet.push((oid, name, print));
        }
    }
    if !quiet.is_empty() {
        state
            .record_table_loads(&w.id, &quiet, None)
            .await
            .map_err(|e| e.to_string())?;
    }
    if !wanted.is_empty() {
        let id = new_job_id();
        state
            .create_table_load(&id, &w.id, &wanted)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(warehouse = %w.id, job = %id, tables = ?wanted, "load of tables scheduled");
    }
    Ok(())
}

/// Runs one warehouse's load or resync job until it is done, failed or interrupted (a later
/// tick resumes it from its saved chunks).
async fn run_job(
    state: &StateDb,
    wh: &Warehouse,
    kind: &str,
    w: &ActiveWarehouse,
    mapped: &MappedTables,
    delivery: &Delivery,
    cancel: &CancellationToken,
) {
    let tables = if kind == LOAD_JOB {
        // A load of some tables, or the initial load of every published one.
        match state.job_tables(&w.job_id).await {
            Ok(Some(tables)) => Ok(tables),
            Ok(None) => published_relations(&wh.config)
                .await
                .map(|p| p.into_iter().map(|(_, name)| name).collect()),
            Err(e) => Err(e.to_string()),
        }
    } else {
        mapped_relations(state, &wh.config, mapped).await
    };
    let tables = match tables {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(job = %w.job_id, warehouse = %w.warehouse_id, error = %e, "{kind}: cannot list the tables to read; retrying");
            return;
        }
    };
    // A table this job began reading that is no longer there to read (dropped or unpublished
    // while the job was interrupted): recorded as skipped, as if a chunk had found it gone.
    match state.unfinished_tables(&w.job_id, &w.warehouse_id).await {
        Ok(begun) => {
            for table in begun.iter().filter(|t| !tables.contains(t)) {
                let reason = format!(
                    "{table} is not in publication {} any more (dropped, renamed or removed from it)",
                    wh.config.publication
                );
                tracing::warn!(job = %w.job_id, warehouse = %w.warehouse_id, %table, %reason, "{kind}: a table vanished while it was read; skipped");
                if let Err(e) = state
                    .skip_resync_table(&w.job_id, &w.warehouse_id, table, &reason)
                    .await
                {
                    tracing::warn!(error = %e, "cannot record the skipped table; retrying");
                    return;
                }
            }
        }
        Err(e) => {
            tracing::warn!(job = %w.job_id, error = %e, "{kind}: cannot read the job's progress; retrying");
            return;
        }
    }
    let work = if kind == LOAD_JOB {
        Work {
            kind: LOAD_JOB,
            tables,
            marker: SnapshotMarker::True,
            what: "initial load",
        }
    } else {
        Work {
            kind: "resync",
            tables,
            marker: SnapshotMarker::Incremental,
            what: "resync",
        }
    };
    match resync(state, wh, w, &work, delivery, cancel).await {
        Ok(()) => {
            if kind == LOAD_JOB
                && let Err(e) =
                    record_loaded(state, &wh.config, &work.tables, &w.job_id, mapped).await
            {
                // Checked again later: a table not recorded is loaded once more.
                tracing::warn!(job = %w.job_id, warehouse = %w.warehouse_id, error = %e, "cannot record the tables the load read");
            }
            if kind == LOAD_JOB
                && let Err(e) = verify_after_lost_slot(state, &w.job_id, &w.warehouse_id).await
            {
                tracing::warn!(job = %w.job_id, warehouse = %w.warehouse_id, error = %e, "cannot queue the verify-and-repair that follows a lost slot's load");
            }
        }
        Err(Stop::Cancelled) => {}
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

/// After the load that follows a lost or recreated slot: queues a verify-and-repair of the
/// warehouse (the load only upserts; rows deleted while no slot watched are still at
/// central, and the repair deletes them).
async fn verify_after_lost_slot(
    state: &StateDb,
    job_id: &str,
    warehouse_id: &str,
) -> Result<(), StoreError> {
    let wanted = state
        .job_options(job_id)
        .await?
        .is_some_and(|o| o["then_verify_repair"] == true);
    if !wanted
        || state
            .active_job_for(crate::store::VERIFY_JOB, warehouse_id)
            .await?
            .is_some()
    {
        return Ok(());
    }
    let id = new_job_id();
    let options = serde_json::json!({"repair": true});
    state
        .create_verify_job(&id, &[warehouse_id.to_string()], &options, RESYNC_TIMEOUT)
        .await?;
    tracing::info!(warehouse = %warehouse_id, job = %id, load = %job_id, "the load after a lost slot is done; a verify-and-repair follows (rows deleted while no slot watched are removed from central)");
    Ok(())
}

/// Records the tables a load read (those still published), with their mappings'
/// fingerprints, so that [`check_tables`] does not load them again.
async fn record_loaded(
    state: &StateDb,
    w: &WarehouseConfig,
    tables: &[String],
    job_id: &str,
    mapped: &MappedTables,
) -> Result<(), String> {
    let bound = state.bindings(&w.id).await.map_err(|e| e.to_string())?;
    let read: Vec<(u32, String, String)> = published_relations(w)
        .await?
        .into_iter()
        .filter(|(_, name)| tables.contains(name))
        .map(|(oid, name)| {
            let print = print_of(oid, &name, &bound, mapped);
            (oid, name, print)
        })
        .collect();
    state
        .record_table_loads(&w.id, &read, Some(job_id))
        .await
        .map_err(|e| e.to_string())
}

/// The mapped tables a resync reads, each under its current name: a mapped table renamed
/// since is found by the relation its mapping is bound to. One that is not published under
/// any name is kept as configured (the resync records it as skipped, and why).
pub(crate) async fn mapped_relations(
    state: &StateDb,
    w: &WarehouseConfig,
    mapped: &MappedTables,
) -> Result<Vec<String>, String> {
    let published = published_relations(w).await?;
    let bound = state.bindings(&w.id).await.map_err(|e| e.to_string())?;
    Ok(mapped
        .iter()
        .map(|(table, _)| {
            if published.iter().any(|(_, name)| name == table) {
                return table.clone();
            }
            bound
                .iter()
                .filter(|b| b.mapped_table == *table)
                .find_map(|b| {
                    published
                        .iter()
                        .find(|(oid, _)| i64::from(*oid) == b.relation_oid)
                })
                .map_or_else(|| table.clone(), |(_, name)| name.clone())
        })
        .collect())
}

/// What a resync or load job reads, and how its rows are marked.
struct Work {
    kind: &'static str,
    tables: Vec<String>,
    marker: SnapshotMarker,
    what: &'static str,
}

/// The warehouse publication's tables: relation OID and `schema.table`, in name order.
async fn published_relations(w: &WarehouseConfig) -> Result<Vec<(u32, String)>, String> {
    let sql = crate::pg::connect_sql(&w.conn)
        .await
        .map_err(|e| format!("cannot connect to warehouse {}: {e}", w.id))?;
    crate::source::slot::published_relations(&sql, &w.publication)
        .await
        .map_err(|e| format!("cannot list publication {}: {e}", w.publication))
}

/// Why a resync stopped before it was done.
pub(crate) enum Stop {
    Cancelled,
    Failed(String),
    Store(StoreError),
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        Stop::Store(e)
    }
}

/// Waits until every change committed on `wh` before `target` has an outcome at central:
/// its checkpoint passes `target` (with the embedded bus, written after the outcomes), and
/// with Kafka the consumer group's committed offsets then reach the topics' ends. Fails
/// once job `job_id` (of `kind`) is past its deadline.
pub(crate) async fn wait_delivered(
    state: &StateDb,
    wh: &Warehouse,
    target: Lsn,
    delivery: &Delivery,
    (job_id, kind): (&str, &str),
    cancel: &CancellationToken,
) -> Result<(), Stop> {
    let overdue = || async {
        Ok::<bool, StoreError>(
            state
                .active_warehouses(kind)
                .await?
                .iter()
                .any(|a| a.job_id == job_id && a.warehouse_id == wh.config.id && a.overdue),
        )
    };
    loop {
        let at = state.checkpoint(&wh.config.id).await?.map(|c| c.flush_lsn);
        if at.is_some_and(|a| a >= target) {
            break;
        }
        if overdue().await? {
            return Err(Stop::Failed(format!(
                "timed out: warehouse {} has outcomes up to {} of {target}",
                wh.config.id,
                at.map_or("nothing".to_string(), |a| a.to_string())
            )));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = cancel.cancelled() => return Err(Stop::Cancelled),
        }
    }
    let Delivery::Kafka(progress) = delivery else {
        return Ok(());
    };
    let ends = ask_group(progress, GroupProgress::ends)
        .await
        .map_err(Stop::Failed)?;
    loop {
        let e = ends.clone();
        match ask_group(progress, move |p| p.behind(&e)).await {
            Ok(b) if b.is_empty() => return Ok(()),
            Ok(_) => {}
            Err(e) => tracing::debug!(job = %job_id, error = %e, "group progress"),
        }
        if overdue().await? {
            return Err(Stop::Failed(
                "timed out waiting for the consumer group to deliver what was published".into(),
            ));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = cancel.cancelled() => return Err(Stop::Cancelled),
        }
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
                                Ok(Err(ChunkRefused::Failed(reason))) => return Err(Stop::Failed(reason)),
                                Ok(Err(ChunkRefused::Vanished(reason))) => {
                                    // The job goes on with the other tables; its status
                                    // names this one and why.
                                    tracing::warn!(job = %w.job_id, warehouse = %w.warehouse_id, %table, %reason, "{}: a table vanished while it was read; skipped", work.what);
                                    state.skip_resync_table(&w.job_id, &w.warehouse_id, table, &reason).await?;
                                    ahead.clear();
                                    progress.done = true;
                                }
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
                // Only by the pipeline that emitted it, still streaming here: a process that
                // lost the warehouse (its lease fenced) must not save what it never delivered,
                // though the new owner's checkpoint passes the chunk's end.
                if wh.status.generation() != generation
                    || *wh.status.state.borrow() != StreamState::Streaming
                {
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
