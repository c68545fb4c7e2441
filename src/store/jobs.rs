//! `sync_jobs` and `sync_job_warehouses`: sync cycles and resyncs, kept in the state DB so
//! they survive restarts and any `run` process can report or finish them.

/// The job kind of a slot's initial load: the published tables read in chunks through the
/// stream, as a forced resync reads the mapped ones.
pub const LOAD_JOB: &str = "load";

/// A resync (or load) fails unless done within this long.
pub const RESYNC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A new job id: `sync-` and 16 random hex digits.
pub fn new_job_id() -> String {
    format!("sync-{:016x}", rand::random::<u64>())
}

use serde::Serialize;

use super::{StateDb, StoreError};
use crate::Lsn;

/// A job as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    /// `sync-…`.
    pub job_id: String,
    /// `cycle`, `resync`, `load` or `verify`.
    pub kind: String,
    /// `queued`, `running`, `succeeded` or `failed`.
    pub status: String,
    /// Why it failed.
    pub error: Option<String>,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// When a process started working on it.
    pub started_at: Option<String>,
    /// When it succeeded or failed.
    pub finished_at: Option<String>,
    /// When it fails unless done.
    pub deadline: String,
    /// Per warehouse.
    pub warehouses: Vec<JobWarehouse>,
}

/// One warehouse of a job.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobWarehouse {
    /// Warehouse id.
    pub warehouse_id: String,
    /// The WAL position captured when the job started (`pg_current_wal_lsn()`).
    pub target_lsn: Option<String>,
    /// Everything committed before this position has an outcome at central.
    pub delivered_lsn: Option<String>,
    /// Changes with an outcome at central since the job started.
    pub changes_delivered: i64,
    /// Conflicts recorded since the job started.
    pub conflicts: i64,
    /// Of those, changes dead-lettered.
    pub dead_letters: i64,
    /// Open conflicts (of any time) of changes committed up to the target: changes that did
    /// not simply apply at central, though the cycle counts them as having an outcome.
    /// `null` until the target is captured.
    pub unapplied_conflicts: Option<i64>,
    /// Of those, changes dead-lettered.
    pub unapplied_dead_letters: Option<i64>,
    /// Whether this warehouse reached its target.
    pub done: bool,
    /// What went wrong, if anything.
    pub error: Option<String>,
    /// A verify job's report: rows compared, findings per kind, repairs, what could not be
    /// checked and why, and its verdict (`equal`, `drift`, `repaired`, `incomplete`).
    #[schema(value_type = Option<Object>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<serde_json::Value>,
    /// Tables a load or resync skipped because they vanished while it ran (dropped, or no
    /// longer published), and why.
    #[sqlx(skip)]
    pub skipped_tables: Vec<SkippedTable>,
}

/// A table a load or resync skipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SkippedTable {
    /// `schema.table`.
    pub table: String,
    /// Why.
    pub reason: String,
}

/// Which jobs to list, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobQuery {
    /// Only with this status.
    pub status: Option<String>,
    /// Only of this kind.
    pub kind: Option<String>,
    /// Only older than this job (the previous page's `next`).
    pub before: Option<String>,
    /// At most this many.
    pub limit: i64,
}

/// A running job's warehouse, as the job runner needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveWarehouse {
    /// Job id.
    pub job_id: String,
    /// Warehouse id.
    pub warehouse_id: String,
    /// The target, once captured.
    pub target: Option<Lsn>,
    /// The progress counter's value when the job started.
    pub baseline: Option<i64>,
    /// When the job started (for counting conflicts), RFC 3339.
    pub since: String,
    /// Whether the job is past its deadline.
    pub overdue: bool,
}

/// SQL rendering a timestamptz column as RFC 3339 UTC text.
macro_rules! utc {
    ($column:literal) => {
        concat!(
            "to_char(",
            $column,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
        )
    };
}

/// The columns of a [`JobRow`].
macro_rules! job_columns {
    () => {
        concat!(
            "id, kind, status, error, ",
            utc!("created_at"),
            ", ",
            utc!("started_at"),
            ", ",
            utc!("finished_at"),
            ", ",
            utc!("deadline")
        )
    };
}

fn lsn(text: Option<String>) -> Result<Option<Lsn>, StoreError> {
    text.map(|t| {
        t.parse().map_err(|_| StoreError::Corrupt {
            what: "target_lsn",
            value: t.clone(),
        })
    })
    .transpose()
}

type JobRow = (
    String,
    String,
    String,
    Option<String>,
    String,
    Option<String>,
    Option<String>,
    String,
);

/// job id, warehouse, target, baseline, started, overdue.
type ActiveRow = (String, String, Option<String>, Option<i64>, String, bool);

impl StateDb {
    /// Creates a queued job of `kind` for `warehouses`, failing after `timeout`.
    pub async fn create_job(
        &self,
        id: &str,
        kind: &str,
        warehouses: &[String],
        timeout: std::time::Duration,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query(
            "INSERT INTO sync_jobs (id, kind, deadline)
             VALUES ($1, $2, now() + make_interval(secs => $3))",
        )
        .bind(id)
        .bind(kind)
        .bind(timeout.as_secs_f64())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            // The baseline of changesDelivered is taken when the job is asked for: a job
            // that waits in the queue still counts what was delivered meanwhile.
            "INSERT INTO sync_job_warehouses (job_id, warehouse_id, delivered_baseline)
             SELECT $1, w, coalesce(
                    (SELECT delivered FROM consumer_progress WHERE warehouse_id = w), 0)
               FROM unnest($2::text[]) AS w",
        )
        .bind(id)
        .bind(warehouses)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Creates a queued `load` job of `warehouse`'s `tables` alone (tables that joined the
    /// publication, or whose mapping is new or changed).
    pub async fn create_table_load(
        &self,
        id: &str,
        warehouse: &str,
        tables: &[String],
    ) -> Result<(), StoreError> {
        self.create_job(id, LOAD_JOB, &[warehouse.to_string()], RESYNC_TIMEOUT)
            .await?;
        sqlx::query("UPDATE sync_jobs SET tables = $2 WHERE id = $1")
            .bind(id)
            .bind(tables)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// The tables job `id` reads, when it reads some only (a load of new tables).
    pub async fn job_tables(&self, id: &str) -> Result<Option<Vec<String>>, StoreError> {
        let row: Option<(Option<Vec<String>>,)> =
            sqlx::query_as("SELECT tables FROM sync_jobs WHERE id = $1")
                .bind(id)
                .fetch_optional(self.pool())
                .await?;
        Ok(row.and_then(|r| r.0))
    }

    /// The job `id`, if it exists.
    pub async fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let row: Option<JobRow> = sqlx::query_as(concat!(
            "SELECT ",
            job_columns!(),
            " FROM sync_jobs WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        match row {
            Some(r) => Ok(Some(self.with_warehouses(r).await?)),
            None => Ok(None),
        }
    }

    /// Jobs matching `q`, newest first.
    pub async fn list_jobs(&self, q: &JobQuery) -> Result<Vec<Job>, StoreError> {
        let rows: Vec<JobRow> = sqlx::query_as(concat!(
            "SELECT ",
            job_columns!(),
            " FROM sync_jobs
              WHERE ($1::text IS NULL OR status = $1)
                AND ($2::text IS NULL OR kind = $2)
                AND ($3::text IS NULL OR seq < (SELECT seq FROM sync_jobs WHERE id = $3))
              ORDER BY seq DESC LIMIT $4"
        ))
        .bind(&q.status)
        .bind(&q.kind)
        .bind(&q.before)
        .bind(q.limit)
        .fetch_all(self.pool())
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(self.with_warehouses(r).await?);
        }
        Ok(out)
    }

    async fn with_warehouses(&self, r: JobRow) -> Result<Job, StoreError> {
        let mut warehouses: Vec<JobWarehouse> = sqlx::query_as(
            "SELECT w.warehouse_id, w.target_lsn::text AS target_lsn, w.delivered_lsn::text AS delivered_lsn,
                    w.changes_delivered, w.conflicts, w.dead_letters, w.done, w.error, w.verify,
                    u.conflicts AS unapplied_conflicts, u.dead_letters AS unapplied_dead_letters
               FROM sync_job_warehouses w
               LEFT JOIN LATERAL (
                    SELECT count(*) AS conflicts, count(*) FILTER (WHERE c.dead_lettered) AS dead_letters
                      FROM sync_conflicts c
                     WHERE c.warehouse_id = w.warehouse_id AND c.status = 'open' AND c.kind <> 'drift'
                       AND c.source_version <= lpad(upper(to_hex((w.target_lsn - '0/0'::pg_lsn)::bigint)), 16, '0') || ':FFFFFFFF'
                    ) u ON w.target_lsn IS NOT NULL
              WHERE w.job_id = $1 ORDER BY w.warehouse_id",
        )
        .bind(&r.0)
        .fetch_all(self.pool())
        .await?;
        let skipped: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT warehouse_id, table_name, skipped FROM sync_resync_progress
              WHERE job_id = $1 AND skipped IS NOT NULL ORDER BY table_name",
        )
        .bind(&r.0)
        .fetch_all(self.pool())
        .await?;
        for (w, table, reason) in skipped {
            if let Some(jw) = warehouses.iter_mut().find(|jw| jw.warehouse_id == w) {
                jw.skipped_tables.push(SkippedTable { table, reason });
            }
        }
        Ok(Job {
            job_id: r.0,
            kind: r.1,
            status: r.2,
            error: r.3,
            created_at: r.4,
            started_at: r.5,
            finished_at: r.6,
            deadline: r.7,
            warehouses,
        })
    }

    /// Whether a job of `kind` for `warehouse_id` is queued or running; its id.
    pub async fn active_job_for(
        &self,
        kind: &str,
        warehouse_id: &str,
    ) -> Result<Option<String>, StoreError> {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT j.id FROM sync_jobs j JOIN sync_job_warehouses w ON w.job_id = j.id
              WHERE j.kind = $1 AND w.warehouse_id = $2 AND j.status IN ('queued', 'running')
              ORDER BY j.seq LIMIT 1",
        )
        .bind(kind)
        .bind(warehouse_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|r| r.0))
    }

    /// Marks queued jobs of `kind` running, and returns the unfinished warehouses of every
    /// running job of that kind.
    pub async fn active_warehouses(&self, kind: &str) -> Result<Vec<ActiveWarehouse>, StoreError> {
        sqlx::query(
            "UPDATE sync_jobs SET status = 'running', started_at = now()
              WHERE kind = $1 AND status = 'queued'",
        )
        .bind(kind)
        .execute(self.pool())
        .await?;
        let rows: Vec<ActiveRow> = sqlx::query_as(concat!(
            "SELECT j.id, w.warehouse_id, w.target_lsn::text, w.delivered_baseline, ",
            utc!("j.started_at"),
            ", j.deadline < now()
                   FROM sync_jobs j JOIN sync_job_warehouses w ON w.job_id = j.id
                  WHERE j.kind = $1 AND j.status = 'running' AND NOT w.done
                  ORDER BY j.seq, w.warehouse_id"
        ))
        .bind(kind)
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|(job_id, warehouse_id, target, baseline, since, overdue)| {
                Ok(ActiveWarehouse {
                    job_id,
                    warehouse_id,
                    target: lsn(target)?,
                    baseline,
                    since,
                    overdue,
                })
            })
            .collect()
    }

    /// Sets a job warehouse's target once (a second capture by another process keeps the
    /// first), and its progress baseline if the job was created without one.
    pub async fn set_job_target(
        &self,
        job_id: &str,
        warehouse_id: &str,
        target: Lsn,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE sync_job_warehouses
                SET target_lsn = $3::text::pg_lsn,
                    delivered_baseline = coalesce(delivered_baseline,
                        (SELECT delivered FROM consumer_progress WHERE warehouse_id = $2), 0),
                    error = NULL
              WHERE job_id = $1 AND warehouse_id = $2 AND target_lsn IS NULL",
        )
        .bind(job_id)
        .bind(warehouse_id)
        .bind(target.to_string())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Records a job warehouse's progress: how far it is delivered, the counters since the
    /// job started, whether it is done and the last error.
    pub async fn update_job_warehouse(
        &self,
        w: &ActiveWarehouse,
        delivered: Option<Lsn>,
        done: bool,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE sync_job_warehouses jw
                SET delivered_lsn = coalesce($3::text::pg_lsn, jw.delivered_lsn),
                    changes_delivered = greatest(0, coalesce(
                        (SELECT delivered FROM consumer_progress WHERE warehouse_id = $2), 0)
                        - coalesce(jw.delivered_baseline, 0)),
                    conflicts = (SELECT count(*) FROM sync_conflicts c
                                  WHERE c.warehouse_id = $2 AND c.created_at >= $4::timestamptz),
                    dead_letters = (SELECT count(*) FROM sync_conflicts c
                                     WHERE c.warehouse_id = $2 AND c.created_at >= $4::timestamptz
                                       AND c.dead_lettered),
                    done = $5,
                    error = $6
              WHERE job_id = $1 AND warehouse_id = $2",
        )
        .bind(&w.job_id)
        .bind(&w.warehouse_id)
        .bind(delivered.map(|l| l.to_string()))
        .bind(&w.since)
        .bind(done)
        .bind(error)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Finishes running jobs whose warehouses are all done (succeeded), and fails `job_id`
    /// with `error` when given.
    pub async fn settle_jobs(&self, failed: Option<(&str, &str)>) -> Result<(), StoreError> {
        if let Some((job_id, error)) = failed {
            sqlx::query(
                "UPDATE sync_jobs SET status = 'failed', error = $2, finished_at = now()
                  WHERE id = $1 AND status IN ('queued', 'running')",
            )
            .bind(job_id)
            .bind(error)
            .execute(self.pool())
            .await?;
        }
        sqlx::query(
            "UPDATE sync_jobs j SET status = 'succeeded', finished_at = now()
              WHERE status = 'running'
                AND NOT EXISTS (SELECT 1 FROM sync_job_warehouses w WHERE w.job_id = j.id AND NOT w.done)",
        )
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Fails the queued or running loads and resyncs of `warehouse_id` with `reason` (their
    /// saved chunks belong to a history that is gone); returns how many.
    pub async fn fail_reads_of(&self, warehouse_id: &str, reason: &str) -> Result<u64, StoreError> {
        self.fail_jobs_of(warehouse_id, &[LOAD_JOB, "resync"], reason)
            .await
    }

    /// Fails the queued or running loads of `warehouse_id` with `reason` (their slot is gone:
    /// the tables they finished missed what changed since); returns how many.
    pub async fn fail_loads_of(&self, warehouse_id: &str, reason: &str) -> Result<u64, StoreError> {
        self.fail_jobs_of(warehouse_id, &[LOAD_JOB], reason).await
    }

    async fn fail_jobs_of(
        &self,
        warehouse_id: &str,
        kinds: &[&str],
        reason: &str,
    ) -> Result<u64, StoreError> {
        let r = sqlx::query(
            "UPDATE sync_jobs j SET status = 'failed', error = $2, finished_at = now()
              WHERE status IN ('queued', 'running') AND kind = ANY($3)
                AND EXISTS (SELECT 1 FROM sync_job_warehouses w
                             WHERE w.job_id = j.id AND w.warehouse_id = $1)",
        )
        .bind(warehouse_id)
        .bind(reason)
        .bind(kinds)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected())
    }

    /// Counts `n` more changes with an outcome at central for `warehouse_id`.
    pub async fn add_delivered(&self, warehouse_id: &str, n: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE consumer_progress SET delivered = delivered + $2 WHERE warehouse_id = $1",
        )
        .bind(warehouse_id)
        .bind(n)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Jobs by kind and status: `(kind, status, count)`.
    pub async fn job_counts(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        Ok(
            sqlx::query_as("SELECT kind, status, count(*) FROM sync_jobs GROUP BY kind, status")
                .fetch_all(self.pool())
                .await?,
        )
    }
}

/// Saves one chunk of a table's read: ($1 job, $2 warehouse, $3 table, $4 last key, $5 rows
/// read, $6 rows emitted, $7 done).
pub(super) const SAVE_CHUNK: &str = "INSERT INTO sync_resync_progress
         (job_id, warehouse_id, table_name, last_key, chunks, rows_read, rows_emitted, done)
     VALUES ($1, $2, $3, $4, 1, $5, $6, $7)
     ON CONFLICT (job_id, warehouse_id, table_name) DO UPDATE
     SET last_key = EXCLUDED.last_key,
         chunks = sync_resync_progress.chunks + 1,
         rows_read = sync_resync_progress.rows_read + EXCLUDED.rows_read,
         rows_emitted = sync_resync_progress.rows_emitted + EXCLUDED.rows_emitted,
         done = EXCLUDED.done";

/// A resync's saved position in one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResyncProgress {
    /// The primary key of the last row delivered.
    pub last_key: Option<Vec<String>>,
    /// Chunks delivered.
    pub chunks: i64,
    /// Whether the table is done.
    pub done: bool,
}

impl StateDb {
    /// The saved position of `job_id`'s resync of `table` (the start when none).
    pub async fn resync_progress(
        &self,
        job_id: &str,
        warehouse_id: &str,
        table: &str,
    ) -> Result<ResyncProgress, StoreError> {
        let row: Option<(Option<serde_json::Value>, i64, bool)> = sqlx::query_as(
            "SELECT last_key, chunks, done FROM sync_resync_progress
              WHERE job_id = $1 AND warehouse_id = $2 AND table_name = $3",
        )
        .bind(job_id)
        .bind(warehouse_id)
        .bind(table)
        .fetch_optional(self.pool())
        .await?;
        Ok(match row {
            None => ResyncProgress::default(),
            Some((key, chunks, done)) => ResyncProgress {
                last_key: key.and_then(|k| serde_json::from_value(k).ok()),
                chunks,
                done,
            },
        })
    }

    /// Saves a delivered chunk of `job_id`'s resync of `table`.
    #[allow(clippy::too_many_arguments)]
    pub async fn save_resync_chunk(
        &self,
        job_id: &str,
        warehouse_id: &str,
        table: &str,
        last_key: Option<&[String]>,
        read: u64,
        emitted: u64,
        done: bool,
    ) -> Result<(), StoreError> {
        sqlx::query(SAVE_CHUNK)
            .bind(job_id)
            .bind(warehouse_id)
            .bind(table)
            .bind(last_key.map(|k| serde_json::json!(k)))
            .bind(read as i64)
            .bind(emitted as i64)
            .bind(done)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Records that `job_id` skipped `table` (it vanished while the job read it) and why;
    /// the table counts as done.
    pub async fn skip_resync_table(
        &self,
        job_id: &str,
        warehouse_id: &str,
        table: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sync_resync_progress (job_id, warehouse_id, table_name, done, skipped)
             VALUES ($1, $2, $3, true, $4)
             ON CONFLICT (job_id, warehouse_id, table_name) DO UPDATE
             SET done = true, skipped = EXCLUDED.skipped",
        )
        .bind(job_id)
        .bind(warehouse_id)
        .bind(table)
        .bind(reason)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The tables `job_id` began reading at `warehouse_id` and did not finish.
    pub async fn unfinished_tables(
        &self,
        job_id: &str,
        warehouse_id: &str,
    ) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT table_name FROM sync_resync_progress
              WHERE job_id = $1 AND warehouse_id = $2 AND NOT done ORDER BY table_name",
        )
        .bind(job_id)
        .bind(warehouse_id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// What the loads of `warehouse_id` covered: per relation OID, the mapping's fingerprint.
    pub async fn table_loads(&self, warehouse_id: &str) -> Result<Vec<(i64, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT relation_oid, fingerprint FROM table_loads WHERE warehouse_id = $1",
        )
        .bind(warehouse_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// Records that `tables` (OID, name, fingerprint) of `warehouse_id` were loaded (by
    /// `job_id`; none for tables taken as they are).
    pub async fn record_table_loads(
        &self,
        warehouse_id: &str,
        tables: &[(u32, String, String)],
        job_id: Option<&str>,
    ) -> Result<(), StoreError> {
        let oids: Vec<i64> = tables.iter().map(|t| i64::from(t.0)).collect();
        let names: Vec<&str> = tables.iter().map(|t| t.1.as_str()).collect();
        let prints: Vec<&str> = tables.iter().map(|t| t.2.as_str()).collect();
        sqlx::query(
            "INSERT INTO table_loads (warehouse_id, relation_oid, table_name, fingerprint, job_id)
             SELECT $1, o, n, f, $5 FROM unnest($2::bigint[], $3::text[], $4::text[]) AS t(o, n, f)
             ON CONFLICT (warehouse_id, relation_oid) DO UPDATE
             SET table_name = EXCLUDED.table_name, fingerprint = EXCLUDED.fingerprint,
                 job_id = EXCLUDED.job_id, loaded_at = now()",
        )
        .bind(warehouse_id)
        .bind(&oids)
        .bind(&names)
        .bind(&prints)
        .bind(job_id)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Marks the open conflicts of these entities resolved: central now holds the
    /// warehouse's current value for them (a resync or load delivered it). `keys` are
    /// `(entity, key JSON)`.
    pub async fn resolve_conflicts(
        &self,
        warehouse_id: &str,
        keys: &[(String, serde_json::Value)],
    ) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let entities: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
        let values: Vec<&serde_json::Value> = keys.iter().map(|k| &k.1).collect();
        let r = sqlx::query(
            "UPDATE sync_conflicts c SET status = 'resolved', resolved_at = now(), resolved_by = 'inventorysync',
                    resolution_note = 'central now holds the warehouse''s value (delivered by a load or resync)'
               FROM unnest($2::text[], $3::jsonb[]) AS k(entity, key)
              WHERE c.warehouse_id = $1 AND c.status = 'open'
                AND c.entity = k.entity AND c.entity_key = k.key",
        )
        .bind(warehouse_id)
        .bind(&entities)
        .bind(&values)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected())
    }
}
