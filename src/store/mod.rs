//! The state DB (`DB_URL`): checkpoints now, sync jobs and conflicts as the stages arrive.
//!
//! Migrations live in `migrations/` and are embedded in the binary, applied at start and by
//! `inventorysync migrate`. Table names are the ones ops type by hand (DESIGN §5).

mod bindings;
mod checkpoints;
mod conflicts;
mod jobs;
mod lease;
mod progress;
mod verify;
mod workers;

pub use bindings::Binding;
pub use checkpoints::{Checkpoint, Origin};
pub use conflicts::{
    Closing, ConflictQuery, ConflictRow, DeadLetterQuery, DeadLetterRow, NewConflict, NewDeadLetter,
};
pub use jobs::{
    ActiveWarehouse, Job, JobQuery, JobWarehouse, LOAD_JOB, RESYNC_TIMEOUT, ResyncProgress,
    SkippedTable, new_job_id,
};
pub use lease::{Leases, WarehouseLease};
pub use progress::LaneMark;
pub use verify::VERIFY_JOB;
pub use workers::{WorkerIdentity, WorkerRow};

use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{PgPool, Postgres};

use crate::pg::{ConnInfo, SslMode};

/// What can go wrong with the state DB.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state DB cannot be reached or refused us.
    #[error("state DB {target}: {source}")]
    Connect {
        /// The redacted URL.
        target: String,
        /// The driver's error.
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("state DB migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A query failed.
    #[error("state DB query failed: {0}")]
    Query(#[from] sqlx::Error),
    /// A stored value is not what we wrote.
    #[error("state DB holds an invalid {what}: {value:?}")]
    Corrupt {
        /// Which value.
        what: &'static str,
        /// The value found.
        value: String,
    },
}

impl StoreError {
    /// Whether retrying can help (the server or network, not our data).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Connect { .. }
                | StoreError::Query(
                    sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
                )
        )
    }
}

/// Connection options for sqlx from our parsed URL (so `jdbc:postgresql://` works too).
pub fn connect_options(conn: &ConnInfo) -> PgConnectOptions {
    let mut o = PgConnectOptions::new()
        .host(&conn.host)
        .port(conn.port)
        .username(&conn.user)
        .database(&conn.dbname)
        .application_name("inventorysync")
        .ssl_mode(match conn.sslmode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require => PgSslMode::Require,
            SslMode::VerifyFull => PgSslMode::VerifyFull,
        });
    if let Some(p) = &conn.password {
        o = o.password(p.expose_secret());
    }
    if let Some(ca) = &conn.sslrootcert {
        o = o.ssl_root_cert(ca);
    }
    o
}

/// The state DB.
#[derive(Clone, Debug)]
pub struct StateDb {
    pool: PgPool,
    conn: ConnInfo,
}

impl StateDb {
    /// Connects (a small pool) without migrating.
    pub async fn connect(conn: &ConnInfo) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(conn.connect_timeout_secs.max(1)))
            .connect_with(connect_options(conn))
            .await
            .map_err(|source| StoreError::Connect {
                target: conn.redacted(),
                source,
            })?;
        Ok(Self {
            pool,
            conn: conn.clone(),
        })
    }

    /// Applies the embedded migrations that are not applied yet.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations").run(&self.pool).await?;
        Ok(())
    }

    /// The pool, for queries of other modules.
    pub fn pool(&self) -> &sqlx::Pool<Postgres> {
        &self.pool
    }

    /// The connection settings (for dedicated connections such as leases).
    pub fn conn_info(&self) -> &ConnInfo {
        &self.conn
    }
}
