//! Where the engine writes its logical messages: heartbeats, sync-cycle markers and resync
//! watermarks.
//!
//! A warehouse URL may point at a hot standby (PostgreSQL 16+ decodes on one), so that the
//! primary carries no decoding load. A standby is read-only and cannot write a message; one
//! written on its primary (`primary_url`) reaches the standby's slot through the WAL, at the
//! same position. Without a primary, the features that need a message are refused with a
//! message that says so, and streaming goes on.

use std::time::Duration;

use crate::lsn::Lsn;
use crate::pg::ConnInfo;

use super::SourceError;

/// How often a wait for the standby's replay looks again.
const REPLAY_POLL: Duration = Duration::from_millis(20);

/// Where a warehouse's logical messages are written.
pub enum Markers {
    /// The warehouse server is a primary: on the server itself.
    Here,
    /// The warehouse server is a standby: on its primary, over this connection.
    Primary(tokio_postgres::Client),
    /// The warehouse server is a standby and no `primary_url` is set: nowhere.
    Refused,
}

impl Markers {
    /// Finds where messages go for the server `here` is connected to (`primary`: the
    /// warehouse's `primary_url`). A `primary_url` that is not the primary of the same
    /// cluster and database is a configuration error.
    pub async fn open(
        here: &tokio_postgres::Client,
        primary: Option<&ConnInfo>,
        warehouse: &str,
    ) -> Result<Markers, SourceError> {
        let row = here
            .query_one("SELECT pg_is_in_recovery(), current_database()::text", &[])
            .await?;
        let (standby, db): (bool, String) = (row.get(0), row.get(1));
        if !standby {
            return Ok(Markers::Here);
        }
        let Some(p) = primary else {
            return Ok(Markers::Refused);
        };
        let client = crate::pg::connect_sql(p).await?;
        let row = client
            .query_one("SELECT pg_is_in_recovery(), current_database()::text", &[])
            .await?;
        let (p_standby, p_db): (bool, String) = (row.get(0), row.get(1));
        // pg_control_system() needs a superuser or pg_monitor: without it, the comparison of
        // the clusters is skipped.
        let (system, p_system) = (system_id(here).await, system_id(&client).await);
        let wrong = if p_standby {
            Some("is a standby too, expected the primary".to_string())
        } else if let (Some(system), Some(p_system)) = (&system, &p_system)
            && p_system != system
        {
            Some(format!(
                "is another cluster (system identifier {p_system}, the standby's is {system})"
            ))
        } else if p_db != db {
            Some(format!(
                "is database {p_db:?}, expected the standby's database {db:?} (a message reaches only the slots of its own database)"
            ))
        } else {
            None
        };
        match wrong {
            Some(why) => Err(SourceError::Config(format!(
                "warehouses[{warehouse}].primary_url ({}:{}/{}) {why}",
                p.host, p.port, p.dbname
            ))),
            None => Ok(Markers::Primary(client)),
        }
    }

    /// Whether messages can be written.
    pub fn available(&self) -> bool {
        !matches!(self, Markers::Refused)
    }

    /// Writes a transactional logical message and returns its position, or `None` when the
    /// server is a standby without a primary to write on.
    pub async fn emit(
        &self,
        here: &tokio_postgres::Client,
        prefix: &str,
        content: &str,
    ) -> Result<Option<Lsn>, SourceError> {
        let client = match self {
            Markers::Here => here,
            Markers::Primary(c) => c,
            Markers::Refused => return Ok(None),
        };
        let row = client
            .query_one(
                "SELECT pg_logical_emit_message(true, $1, $2)::text",
                &[&prefix, &content],
            )
            .await?;
        let text: String = row.get(0);
        text.parse::<Lsn>().map(Some).map_err(|e| {
            SourceError::Protocol(format!("pg_logical_emit_message returned {text:?}: {e}"))
        })
    }

    /// Waits until the server `here` is connected to has replayed everything its primary
    /// had written when this is called, so that a standby's snapshots see every transaction
    /// that committed on the primary before (the message just written and its commit among
    /// them). At once on a primary.
    ///
    /// Why the primary's position now and not the message's own: a message is transactional
    /// and decoded at its transaction's commit, which comes after the message record. A
    /// transaction that commits between the two is decoded before the message, yet a standby
    /// that had replayed only the message record would not see it yet.
    pub async fn caught_up(&self, here: &tokio_postgres::Client) -> Result<(), SourceError> {
        let Markers::Primary(primary) = self else {
            return Ok(());
        };
        let row = primary
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await?;
        let text: String = row.get(0);
        let lsn = text.parse::<Lsn>().map_err(|e| {
            SourceError::Protocol(format!("pg_current_wal_insert_lsn returned {text:?}: {e}"))
        })?;
        loop {
            let row = here
                .query_one("SELECT pg_last_wal_replay_lsn()::text", &[])
                .await?;
            let at: Option<String> = row.get(0);
            if at
                .and_then(|t| t.parse::<Lsn>().ok())
                .is_some_and(|at| at >= lsn)
            {
                return Ok(());
            }
            tokio::time::sleep(REPLAY_POLL).await;
        }
    }
}

/// The server's system identifier, when this role may read it.
async fn system_id(client: &tokio_postgres::Client) -> Option<String> {
    client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .ok()
        .map(|r| r.get(0))
}

/// Why a feature that writes a message is refused on a standby without `primary_url`.
pub fn refusal(warehouse: &str, what: &str) -> String {
    format!(
        "warehouse {warehouse}'s URL points at a standby, which cannot write the logical message {what} needs: set primary_url in its [[warehouses]] entry to the primary (same database)"
    )
}
