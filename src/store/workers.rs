//! The `run` processes sharing the state DB (`sync_workers`): each writes a heartbeat with
//! an expiry and the warehouses it owns, and reads everyone's, to balance ownership (see
//! [`crate::ownership`]) and to answer `GET /sync/workers`.

use serde::Serialize;

use super::{StateDb, StoreError};

/// One process as this process introduces itself.
#[derive(Debug, Clone)]
pub struct WorkerIdentity {
    /// The worker id (`WORKER_ID`, or host and API port).
    pub worker_id: String,
    /// This start of the process (another start under the same id takes the row over).
    pub session: String,
    /// Host name.
    pub host: String,
    /// OS process id.
    pub pid: u32,
    /// The address its HTTP API listens on.
    pub api: String,
}

/// One process as the state DB knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct WorkerRow {
    /// The worker id.
    pub worker_id: String,
    /// Host name.
    pub host: String,
    /// OS process id.
    pub pid: i32,
    /// The address its HTTP API listens on.
    pub api: String,
    /// Its InventorySync version.
    pub version: String,
    /// When it started (RFC 3339, UTC).
    pub started_at: String,
    /// Its latest heartbeat (RFC 3339, UTC).
    pub heartbeat_at: String,
    /// When its heartbeat expires (RFC 3339, UTC): after that it counts as gone.
    pub expires_at: String,
    /// Whether its heartbeat is current.
    pub alive: bool,
    /// Whether it is handing its warehouses over (SIGTERM).
    pub draining: bool,
    /// The warehouses it owns, by id.
    pub owned: Vec<String>,
}

/// Every row, by worker id, with whether it is alive.
const SELECT_ALL: &str = concat!(
    "SELECT worker_id, host, pid, api, version, ",
    "to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), ",
    "to_char(heartbeat_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), ",
    "to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), ",
    "expires_at > now(), draining, owned FROM sync_workers ORDER BY worker_id"
);

type Row = (
    String,
    String,
    i32,
    String,
    String,
    String,
    String,
    String,
    bool,
    bool,
    Vec<String>,
);

fn worker(r: Row) -> WorkerRow {
    WorkerRow {
        worker_id: r.0,
        host: r.1,
        pid: r.2,
        api: r.3,
        version: r.4,
        started_at: r.5,
        heartbeat_at: r.6,
        expires_at: r.7,
        alive: r.8,
        draining: r.9,
        owned: r.10,
    }
}

/// Rows expired this long ago are removed (a process that never came back).
const FORGET_AFTER_SECS: i64 = 3600;

impl StateDb {
    /// Writes this process's row at its start, taking over a row of the same worker id (its
    /// own earlier start, which died before its heartbeat expired).
    pub async fn register_worker(
        &self,
        me: &WorkerIdentity,
        expiry_secs: f64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sync_workers (worker_id, session, host, pid, api, version, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7))
             ON CONFLICT (worker_id) DO UPDATE SET
               session = EXCLUDED.session, host = EXCLUDED.host, pid = EXCLUDED.pid,
               api = EXCLUDED.api, version = EXCLUDED.version, started_at = now(),
               heartbeat_at = now(), expires_at = EXCLUDED.expires_at, draining = false",
        )
        .bind(&me.worker_id)
        .bind(&me.session)
        .bind(&me.host)
        .bind(me.pid as i32)
        .bind(&me.api)
        .bind(env!("CARGO_PKG_VERSION"))
        .bind(expiry_secs)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Renews this process's heartbeat with what it owns, and returns every row; `None`
    /// when another start of the same worker id took the row over.
    pub async fn heartbeat(
        &self,
        me: &WorkerIdentity,
        owned: &[String],
        draining: bool,
        expiry_secs: f64,
    ) -> Result<Option<Vec<WorkerRow>>, StoreError> {
        let updated = sqlx::query(
            "UPDATE sync_workers SET heartbeat_at = now(),
               expires_at = now() + make_interval(secs => $3), owned = $4, draining = $5
             WHERE worker_id = $1 AND session = $2",
        )
        .bind(&me.worker_id)
        .bind(&me.session)
        .bind(expiry_secs)
        .bind(owned)
        .bind(draining)
        .execute(self.pool())
        .await?;
        if updated.rows_affected() == 0 {
            return Ok(None);
        }
        sqlx::query(
            "DELETE FROM sync_workers WHERE expires_at < now() - make_interval(secs => $1)",
        )
        .bind(FORGET_AFTER_SECS as f64)
        .execute(self.pool())
        .await?;
        self.workers().await.map(Some)
    }

    /// Every process the state DB knows, by worker id.
    pub async fn workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        let rows: Vec<Row> = sqlx::query_as(SELECT_ALL).fetch_all(self.pool()).await?;
        Ok(rows.into_iter().map(worker).collect())
    }

    /// Removes this process's row (a clean stop, after its warehouses were handed over).
    pub async fn retire_worker(&self, me: &WorkerIdentity) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM sync_workers WHERE worker_id = $1 AND session = $2")
            .bind(&me.worker_id)
            .bind(&me.session)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}
