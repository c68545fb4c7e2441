//! Warehouse ownership between several `run` processes sharing one state DB.
//!
//! Each warehouse is streamed by one process at a time: the owner holds a session-level
//! advisory lock on the state DB. All of a process's locks live on one connection, its
//! lease connection ([`Leases`]), kept alive by a ping every [`PING_EVERY`] and by server-side
//! TCP keepalives (so that a host that vanished frees its locks within seconds, not the
//! kernel's two hours). When the owner dies its connection closes and Postgres releases every
//! lock at once; when the connection drops under a live process, every warehouse it owned
//! stops at once ([`WarehouseLease::lost`]) before anyone else can own it twice.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio::sync::{mpsc, oneshot, watch};

use super::{StateDb, StoreError, connect_options};

/// How often the lease connection is pinged.
pub const PING_EVERY: Duration = Duration::from_secs(2);
/// A ping or lock query that takes longer than this counts as a dropped connection.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Server-side keepalives of the lease connection: a silent peer is dropped after about
/// idle + interval × count seconds, and its locks with it.
const KEEPALIVES: &str =
    "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; SET tcp_keepalives_count = 3";

// The advisory lock key of a warehouse is derived in SQL, so every process agrees on it:
// hashtextextended('inventorysync:warehouse:' || id, 0).
const LOCK: &str =
    "SELECT pg_try_advisory_lock(hashtextextended('inventorysync:warehouse:' || $1, 0))";
const UNLOCK: &str =
    "SELECT pg_advisory_unlock(hashtextextended('inventorysync:warehouse:' || $1, 0))";

/// The lease connection's state: which connection (`epoch`, counting from 1) and whether it
/// is up. Locks taken on one epoch's connection are gone once the epoch changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Link {
    epoch: u64,
    up: bool,
}

enum Command {
    Lock(String, oneshot::Sender<Result<Option<u64>, StoreError>>),
    Unlock(String, oneshot::Sender<()>),
}

/// A process's lease connection: the one state-DB connection that holds all of its
/// warehouse locks (cheap to clone; the connection lives in a task until every clone and
/// lease is dropped).
#[derive(Clone)]
pub struct Leases {
    commands: mpsc::Sender<Command>,
    link: watch::Receiver<Link>,
}

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leases")
            .field("link", &*self.link.borrow())
            .finish()
    }
}

impl Leases {
    /// Opens the lease connection (reconnecting on its own whenever it drops) of the process
    /// whose `sync_workers` row has session `session`: the connection's `application_name`
    /// names it, so that a peer can tell whose session holds a lock (see
    /// [`StateDb::fence_expired`]).
    pub async fn open(db: &StateDb, session: &str) -> Result<Self, StoreError> {
        let name = format!("{LEASE_APPLICATION} {session}");
        let conn = lease_connection(db, &name).await?;
        let (commands, inbox) = mpsc::channel(64);
        let (link_tx, link) = watch::channel(Link { epoch: 1, up: true });
        tokio::spawn(hold(db.clone(), name, conn, inbox, link_tx));
        Ok(Self { commands, link })
    }

    /// Becomes the owner of `warehouse_id`, or returns `None` when another process is (or
    /// the lease connection is down).
    pub async fn try_acquire(
        &self,
        warehouse_id: &str,
    ) -> Result<Option<WarehouseLease>, StoreError> {
        let (tx, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::Lock(warehouse_id.to_string(), tx))
            .await
            .is_err()
        {
            return Ok(None);
        }
        let Ok(got) = rx.await else { return Ok(None) };
        Ok(got?.map(|epoch| WarehouseLease {
            leases: self.clone(),
            warehouse_id: warehouse_id.to_string(),
            epoch,
        }))
    }

    /// Whether the lease connection is up now.
    pub fn is_up(&self) -> bool {
        self.link.borrow().up
    }
}

/// Ownership of one warehouse, held as long as the lease connection that took it lives.
pub struct WarehouseLease {
    leases: Leases,
    warehouse_id: String,
    epoch: u64,
}

impl std::fmt::Debug for WarehouseLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarehouseLease")
            .field("warehouse_id", &self.warehouse_id)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl WarehouseLease {
    /// The warehouse owned.
    pub fn warehouse_id(&self) -> &str {
        &self.warehouse_id
    }

    /// Whether the lease still holds: its connection is the one that took it, and up.
    pub fn holds(&self) -> bool {
        let link = *self.leases.link.borrow();
        link.up && link.epoch == self.epoch
    }

    /// Resolves once the lease is lost (its connection dropped): whatever the warehouse is
    /// doing must stop at once, as another process may own it now.
    pub async fn lost(&self) {
        let mut link = self.leases.link.clone();
        let epoch = self.epoch;
        let _ = link.wait_for(|l| !l.up || l.epoch != epoch).await;
    }

    /// Gives the warehouse up (when the lease still holds; a lost one is gone already).
    pub async fn release(self) {
        if !self.holds() {
            return;
        }
        let (tx, rx) = oneshot::channel();
        if self
            .leases
            .commands
            .send(Command::Unlock(self.warehouse_id.clone(), tx))
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
    }
}

/// How long past its heartbeat's expiry a holder is fenced: a process that is alive but
/// starved of CPU for a while (its heartbeats late) is not fenced for that alone.
const FENCE_GRACE: Duration = Duration::from_secs(10);

/// The `application_name` of lease connections, before the process's session.
const LEASE_APPLICATION: &str = "inventorysync lease";

async fn lease_connection(db: &StateDb, name: &str) -> Result<PgConnection, StoreError> {
    let options = connect_options(db.conn_info()).application_name(name);
    let mut conn = PgConnection::connect_with(&options)
        .await
        .map_err(|source| StoreError::Connect {
            target: db.conn_info().redacted(),
            source,
        })?;
    sqlx::raw_sql(KEEPALIVES).execute(&mut conn).await?;
    Ok(conn)
}

/// The lease connection's task: runs lock commands, pings, and reconnects (a new epoch)
/// when the connection drops, until every handle is gone.
async fn hold(
    db: StateDb,
    name: String,
    mut conn: PgConnection,
    mut inbox: mpsc::Receiver<Command>,
    link: watch::Sender<Link>,
) {
    let mut epoch = 1;
    let mut backoff = crate::backoff::Backoff::new();
    loop {
        let mut held: HashSet<String> = HashSet::new();
        let mut ping = tokio::time::interval(PING_EVERY);
        let reason: String = loop {
            tokio::select! {
                c = inbox.recv() => match c {
                    None => {
                        let _ = conn.close().await;
                        return;
                    }
                    Some(Command::Lock(id, reply)) => {
                        if held.contains(&id) {
                            // Advisory locks count per session: never twice.
                            let _ = reply.send(Ok(Some(epoch)));
                            continue;
                        }
                        match timed(sqlx::query_as::<_, (bool,)>(LOCK).bind(&id).fetch_one(&mut conn)).await {
                            Ok((got,)) => {
                                if got {
                                    held.insert(id);
                                }
                                let _ = reply.send(Ok(got.then_some(epoch)));
                            }
                            Err(e) => {
                                let reason = e.to_string();
                                let _ = reply.send(Err(e));
                                break reason;
                            }
                        }
                    }
                    Some(Command::Unlock(id, reply)) => {
                        if held.remove(&id)
                            && let Err(e) = timed(sqlx::query(UNLOCK).bind(&id).execute(&mut conn)).await
                        {
                            let _ = reply.send(());
                            break e.to_string();
                        }
                        let _ = reply.send(());
                    }
                },
                _ = ping.tick() => {
                    if let Err(e) = timed(conn.ping()).await {
                        break e.to_string();
                    }
                }
            }
        };
        link.send_replace(Link { epoch, up: false });
        if !held.is_empty() {
            tracing::error!(error = %reason, warehouses = held.len(), "the lease connection to the state DB dropped: every warehouse this process owned stops now (another process may own it next)");
        } else {
            tracing::warn!(error = %reason, "the lease connection to the state DB dropped; reconnecting");
        }
        drop(conn);
        conn = loop {
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay(Duration::ZERO)) => {}
                _ = link.closed() => return,
            }
            // Lock requests meanwhile get "not taken".
            while let Ok(c) = inbox.try_recv() {
                match c {
                    Command::Lock(_, reply) => {
                        let _ = reply.send(Ok(None));
                    }
                    Command::Unlock(_, reply) => {
                        let _ = reply.send(());
                    }
                }
            }
            match lease_connection(&db, &name).await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the lease connection to the state DB; retrying")
                }
            }
        };
        backoff = crate::backoff::Backoff::new();
        epoch += 1;
        link.send_replace(Link { epoch, up: true });
        tracing::info!(epoch, "the lease connection to the state DB is back");
    }
}

impl StateDb {
    /// Fences the process that holds `warehouse_id`'s lock if its heartbeat expired more than
    /// [`FENCE_GRACE`] ago (a host
    /// suspended, a process stopped or stuck: the kernel still answers TCP keepalives, so
    /// its lease connection stays open and keeps every lock): terminates its lease session,
    /// which releases its locks. A holder whose row is alive, or that is not a lease session
    /// of ours, is left alone. Returns the fenced worker and its session's PID.
    pub async fn fence_expired(
        &self,
        warehouse_id: &str,
    ) -> Result<Option<(String, i32)>, StoreError> {
        let row: Option<(String, i32, bool)> = sqlx::query_as(
            "WITH k AS (SELECT hashtextextended('inventorysync:warehouse:' || $1, 0) AS key)
             SELECT w.worker_id, a.pid, pg_terminate_backend(a.pid)
               FROM k, pg_locks l
               JOIN pg_stat_activity a ON a.pid = l.pid
               JOIN sync_workers w ON a.application_name = $2 || ' ' || w.session
              WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND l.classid = ((k.key >> 32) & 4294967295)::oid
                AND l.objid = (k.key & 4294967295)::oid
                AND w.expires_at < now() - make_interval(secs => $3)
              LIMIT 1",
        )
        .bind(warehouse_id)
        .bind(LEASE_APPLICATION)
        .bind(FENCE_GRACE.as_secs_f64())
        .fetch_optional(self.pool())
        .await?;
        Ok(row.filter(|r| r.2).map(|r| (r.0, r.1)))
    }
}

/// A lease query with [`QUERY_TIMEOUT`]: a connection that hangs is as gone as one that
/// failed.
async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(QUERY_TIMEOUT, f).await {
        Ok(r) => r.map_err(StoreError::from),
        Err(_) => Err(StoreError::Query(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {} s", QUERY_TIMEOUT.as_secs()),
        )))),
    }
}
