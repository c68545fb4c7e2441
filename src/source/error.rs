//! Source errors, split into what retrying can fix and what it cannot.

use super::pgoutput::DecodeError;
use crate::Lsn;
use crate::values::ValueError;

/// An error reported by the Postgres server (ErrorResponse).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// SQLSTATE code.
    pub code: String,
    /// Primary message.
    pub message: String,
    /// Detail, if any.
    pub detail: Option<String>,
    /// Hint, if any.
    pub hint: Option<String>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)?;
        if let Some(d) = &self.detail {
            write!(f, "; {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

/// Everything that can go wrong reading a warehouse.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The server's `wal_level` is not `logical`.
    #[error(
        "wal_level is {found:?} on the warehouse server, logical decoding needs 'logical': set wal_level = logical in postgresql.conf and restart the server"
    )]
    WalLevelNotLogical {
        /// The current setting.
        found: String,
    },
    /// The publication does not exist in the warehouse database.
    #[error(
        "publication {publication:?} does not exist in the warehouse database: create it with CREATE PUBLICATION {publication} FOR TABLE … (see sql/warehouse_setup.sql)"
    )]
    PublicationMissing {
        /// Publication name.
        publication: String,
    },
    /// The slot is used by another process, even after retrying.
    #[error(
        "replication slot {slot:?} is in use by another process ({detail}); stop the other consumer or use another slot"
    )]
    SlotInUse {
        /// Slot name.
        slot: String,
        /// The server's words.
        detail: String,
    },
    /// The slot does not exist and was not to be created.
    #[error("replication slot {slot:?} does not exist: create it, or pass --create-slot")]
    SlotMissing {
        /// Slot name.
        slot: String,
    },
    /// The slot lost WAL it needed.
    #[error(
        "replication slot {slot:?} has been invalidated (wal_status lost): the WAL it needed was removed; drop it, create a new slot and run a forced resync of the warehouse"
    )]
    SlotInvalidated {
        /// Slot name.
        slot: String,
    },
    /// The role may not open a replication connection.
    #[error(
        "role {user:?} lacks the REPLICATION attribute: ALTER ROLE {user} WITH REPLICATION ({server})"
    )]
    NoReplicationPrivilege {
        /// Role name.
        user: String,
        /// The server's words.
        server: String,
    },
    /// The server refused the credentials.
    #[error("authentication failed for role {user:?}: {server}")]
    AuthFailed {
        /// Role name.
        user: String,
        /// The server's words.
        server: String,
    },
    /// A pgoutput or replication message could not be decoded.
    #[error("undecodable replication message near {lsn}: {source}")]
    Decode {
        /// The decoder's words.
        source: DecodeError,
        /// Position of the message.
        lsn: Lsn,
    },
    /// A row refers to a relation never described.
    #[error("row for relation oid {oid} at {lsn} arrived before its Relation message")]
    UnknownRelation {
        /// Relation OID.
        oid: u32,
        /// Position.
        lsn: Lsn,
    },
    /// A column value could not be converted.
    #[error("column {column} of {table} at {lsn}: {source}")]
    Value {
        /// `schema.table`.
        table: String,
        /// Column.
        column: String,
        /// Position.
        lsn: Lsn,
        /// What was wrong.
        source: ValueError,
    },
    /// The server broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Whatever takes the events (the bus publisher, the durable-position reporter) went
    /// away: its own error says why; restarting the pipeline is the remedy.
    #[error("the event consumer stopped")]
    DownstreamGone,
    /// The warehouse's WAL history is not the one the checkpoint belongs to (a restore or a
    /// point-in-time recovery).
    #[error(
        "warehouse {warehouse} no longer has the WAL history its checkpoint belongs to: {what}. Streaming it would confirm positions it never reached, and central holds versions of the lost history. The way back: `inventorysync rebase {warehouse}` (it moves the warehouse's WAL past every version central holds and reloads every row, so central takes them again), then restart run"
    )]
    HistoryChanged {
        /// The warehouse.
        warehouse: String,
        /// What differs.
        what: String,
    },
    /// The configuration cannot work.
    #[error("{0}")]
    Config(String),
    /// Writing or reading the spill file of a streamed transaction failed.
    #[error("spill file of a streamed transaction: {0}")]
    Spill(std::io::Error),
    /// The server answered with an error.
    #[error("server error: {0}")]
    Server(ServerError),
    /// TLS could not be set up.
    #[error("TLS: {0}")]
    Tls(String),
    /// The server sent nothing, not even a keepalive it was asked for, for this long: the
    /// connection is dead (a network partition drops packets without a word).
    #[error(
        "no message from the warehouse server for {secs} s, not even a keepalive it was asked for (wal_sender_timeout): the connection is dead; reconnecting"
    )]
    Silent {
        /// Seconds of silence.
        secs: u64,
    },
    /// A query of the streaming session got no answer in time: its connection is dead.
    #[error(
        "the warehouse's SQL session did not answer within {secs} s ({what}): the connection is dead; reconnecting"
    )]
    SqlTimeout {
        /// What the query was for.
        what: &'static str,
        /// Seconds waited.
        secs: u64,
    },
    /// The network failed.
    #[error("connection to {target}: {source}")]
    Io {
        /// `host:port`.
        target: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A SQL query on the warehouse failed.
    #[error("query on the warehouse failed: {}", crate::pg::error_text(.0))]
    Sql(#[from] tokio_postgres::Error),
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Output(std::io::Error),
}

impl From<crate::pg::ConnectError> for SourceError {
    fn from(e: crate::pg::ConnectError) -> Self {
        use crate::pg::ConnectError;
        match e {
            ConnectError::Tls(reason) => SourceError::Tls(reason),
            ConnectError::Io { target, source } => SourceError::Io { target, source },
            ConnectError::Sql(e) => SourceError::Sql(e),
        }
    }
}

impl SourceError {
    /// Whether retrying (after a backoff) can fix it.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Io { .. }
            | SourceError::Sql(_)
            | SourceError::Silent { .. }
            | SourceError::SqlTimeout { .. }
            | SourceError::DownstreamGone => true,
            SourceError::Server(e) => {
                // Connection exceptions, resource problems, operator intervention, system errors.
                ["08", "53", "57", "58", "40"]
                    .iter()
                    .any(|class| e.code.starts_with(class))
                    && e.code != "57014"
            }
            _ => false,
        }
    }

    /// Process exit code for this error: 2 for configuration or setup the user must fix,
    /// 3 for data the pipeline cannot read, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            SourceError::WalLevelNotLogical { .. }
            | SourceError::PublicationMissing { .. }
            | SourceError::SlotInUse { .. }
            | SourceError::SlotMissing { .. }
            | SourceError::SlotInvalidated { .. }
            | SourceError::NoReplicationPrivilege { .. }
            | SourceError::AuthFailed { .. }
            | SourceError::Config(_)
            | SourceError::Tls(_) => 2,
            SourceError::Decode { .. }
            | SourceError::UnknownRelation { .. }
            | SourceError::Value { .. }
            | SourceError::Protocol(_) => 3,
            _ => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_errors_are_definite_with_exit_code_2() {
        let slot = || "s".to_string();
        let definite = [
            SourceError::WalLevelNotLogical {
                found: "replica".into(),
            },
            SourceError::PublicationMissing {
                publication: "p".into(),
            },
            SourceError::SlotInUse {
                slot: slot(),
                detail: "pid 1".into(),
            },
            SourceError::SlotMissing { slot: slot() },
            SourceError::SlotInvalidated { slot: slot() },
            SourceError::NoReplicationPrivilege {
                user: "u".into(),
                server: "x".into(),
            },
            SourceError::AuthFailed {
                user: "u".into(),
                server: "x".into(),
            },
        ];
        for e in definite {
            assert_eq!(e.exit_code(), 2, "{e}");
            assert!(!e.is_transient(), "{e}");
        }
    }

    #[test]
    fn a_downstream_that_went_away_is_transient() {
        // A failed publisher closes the source's channel: the warehouse is restarted, never
        // marked failed for good.
        assert!(SourceError::DownstreamGone.is_transient());
        assert!(!SourceError::Protocol("bad frame".into()).is_transient());
    }

    #[test]
    fn network_and_shutdown_errors_are_transient() {
        let io = SourceError::Io {
            target: "h:1".into(),
            source: std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"),
        };
        assert!(io.is_transient());
        let server = |code: &str| {
            SourceError::Server(ServerError {
                code: code.into(),
                message: "m".into(),
                detail: None,
                hint: None,
            })
        };
        assert!(server("57P01").is_transient(), "admin shutdown");
        assert!(server("08006").is_transient(), "connection failure");
        assert!(!server("42601").is_transient(), "syntax error");
        assert!(!server("57014").is_transient(), "query canceled");
    }
}
