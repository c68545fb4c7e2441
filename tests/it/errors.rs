//! Each setup mistake gives its definite, clear error; a slow consumer is not disconnected.

use std::time::Duration;

use inventorysync::source::SourceError;

use crate::harness::{PASSWORD, drain, pg, pg_replica_level, pg_small_keep};

#[tokio::test]
async fn wal_level_not_logical_is_definite() {
    let db = pg_replica_level().new_db("wl").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION inventorysync FOR ALL TABLES")
        .await;
    let mut o = db.options("s", "inventorysync");
    o.create_slot = true;
    let err = drain(o).await.unwrap_err();
    assert!(
        matches!(err, SourceError::WalLevelNotLogical { ref found } if found == "replica"),
        "{err}"
    );
    assert!(!err.is_transient());
    assert!(err.to_string().contains("wal_level = logical"), "{err}");
}

#[tokio::test]
async fn missing_publication_is_definite() {
    let db = pg().new_db("nopub").await;
    let mut o = db.options("s", "nosuchpub");
    o.create_slot = true;
    let err = drain(o).await.unwrap_err();
    assert!(
        matches!(err, SourceError::PublicationMissing { ref publication } if publication == "nosuchpub"),
        "{err}"
    );
    assert!(
        err.to_string().contains("CREATE PUBLICATION nosuchpub"),
        "{err}"
    );
}

#[tokio::test]
async fn missing_slot_without_create_is_definite() {
    let db = pg().new_db("noslot").await;
    db.exec("CREATE PUBLICATION inventorysync FOR ALL TABLES")
        .await;
    let err = drain(db.options("absent", "inventorysync"))
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::SlotMissing { .. }), "{err}");
}

#[tokio::test]
async fn slot_held_by_another_process_is_reported_after_retrying() {
    let db = pg().new_db("busy").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION inventorysync FOR ALL TABLES")
        .await;
    let mut o = db.options("s", "inventorysync");
    o.create_slot = true;
    db.drain_now(o).await;
    // A first consumer holds the slot.
    let holder_opts = db.options("s", "inventorysync");
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let (_dtx, drx) = tokio::sync::watch::channel(inventorysync::Lsn::ZERO);
    let cancel = tokio_util::sync::CancellationToken::new();
    let c2 = cancel.clone();
    let holder =
        tokio::spawn(
            async move { inventorysync::source::stream::run(&holder_opts, tx, drx, c2).await },
        );
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    for _ in 0..50 {
        let n: i64 = db
            .client
            .query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND active AND database = current_database()", &[&db.slot("s")])
            .await
            .unwrap()
            .get(0);
        if n == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = std::time::Instant::now();
    let err = drain(db.options("s", "inventorysync")).await.unwrap_err();
    assert!(matches!(err, SourceError::SlotInUse { .. }), "{err}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "it waited for the holder first"
    );
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
    cancel.cancel();
    holder.await.unwrap().unwrap();
}

#[tokio::test]
async fn role_without_replication_privilege_is_definite() {
    let db = pg().new_db("norepl").await;
    let role = format!("{}_user", db.name);
    db.exec(&format!("CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'; CREATE PUBLICATION inventorysync FOR ALL TABLES")).await;
    let mut o = db.options("s", "inventorysync");
    o.conn = inventorysync::config::ConnInfo::parse("test", &db.url_as(&role)).unwrap();
    let err = drain(o).await.unwrap_err();
    assert!(
        matches!(err, SourceError::NoReplicationPrivilege { .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains(&format!("ALTER ROLE {role} WITH REPLICATION")),
        "{err}"
    );
}

#[tokio::test]
async fn wrong_password_is_definite_and_secret_free() {
    let db = pg().new_db("badpw").await;
    let role = format!("{}_user", db.name);
    db.exec(&format!(
        "CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{PASSWORD}'"
    ))
    .await;
    let url = format!(
        "postgres://{role}:not-the-password@127.0.0.1:{}/{}?sslmode=disable",
        db.port, db.name
    );
    let mut o = db.options("s", "inventorysync");
    o.conn = inventorysync::config::ConnInfo::parse("test", &url).unwrap();
    let err = drain(o).await.unwrap_err();
    assert!(matches!(err, SourceError::AuthFailed { .. }), "{err}");
    assert!(!err.to_string().contains("not-the-password"));
}

/// A role without `SELECT` on a published table: the initial load's query fails, and the
/// error says what the server said (message and SQLSTATE), not tokio-postgres's bare
/// "db error" (as the first run on PostgreSQL 14 said of a missing catalog column).
#[tokio::test]
async fn a_refused_query_says_the_servers_message_and_sqlstate() {
    let db = pg().new_db("nosel").await;
    let role = format!("{}_user", db.name);
    db.exec(&format!(
        "CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{PASSWORD}';
         CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);
         CREATE PUBLICATION inventorysync FOR TABLE t;"
    ))
    .await;
    let url = format!(
        "postgres://{role}:{PASSWORD}@127.0.0.1:{}/{}?sslmode=disable",
        db.port, db.name
    );
    let mut o = db.options("s", "inventorysync");
    o.conn = inventorysync::config::ConnInfo::parse("test", &url).unwrap();
    o.create_slot = true;
    let err = drain(o).await.unwrap_err().to_string();
    assert!(
        err.contains("permission denied for table t") && err.contains("SQLSTATE 42501"),
        "{err}"
    );
    assert!(!err.contains(PASSWORD), "{err}");
}

#[tokio::test]
async fn scram_md5_and_cleartext_passwords_all_stream() {
    let db = pg().new_db("auth").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1); CREATE PUBLICATION inventorysync FOR ALL TABLES").await;
    let scram = format!("{}_user", db.name);
    db.exec(&format!(
        "CREATE ROLE {scram} LOGIN REPLICATION PASSWORD '{PASSWORD}';
         SET password_encryption = 'md5';
         CREATE ROLE md5_user LOGIN REPLICATION PASSWORD '{PASSWORD}';
         RESET password_encryption;
         CREATE ROLE clear_user LOGIN REPLICATION PASSWORD '{PASSWORD}';
         GRANT SELECT ON t TO {scram}, md5_user, clear_user;"
    ))
    .await;
    for (i, role) in [scram.as_str(), "md5_user", "clear_user"]
        .into_iter()
        .enumerate()
    {
        let mut o = db.options(&format!("s{i}"), "inventorysync");
        o.conn = inventorysync::config::ConnInfo::parse("test", &db.url_as(role)).unwrap();
        o.create_slot = true;
        let events = db.drain_now(o).await;
        assert_eq!(events.len(), 1, "{role}");
    }
}

#[tokio::test]
async fn invalidated_slot_is_definite_and_names_the_way_back() {
    let db = pg_small_keep().new_db("lost").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, pad text); CREATE PUBLICATION inventorysync FOR ALL TABLES").await;
    let mut o = db.options("s", "inventorysync");
    o.create_slot = true;
    db.drain_now(o).await;
    for _ in 0..6 {
        db.exec("INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g ON CONFLICT (id) DO UPDATE SET pad = excluded.pad || '1'; SELECT pg_switch_wal();").await;
    }
    db.exec("CHECKPOINT").await;
    let status: String = db
        .client
        .query_one("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()", &[&db.slot("s")])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "lost");
    let err = drain(db.options("s", "inventorysync")).await.unwrap_err();
    assert!(matches!(err, SourceError::SlotInvalidated { .. }), "{err}");
    assert!(err.to_string().contains("forced resync"), "{err}");
}

#[tokio::test]
async fn a_consumer_slower_than_wal_sender_timeout_is_not_disconnected() {
    let db = pg().new_db("slow").await;
    db.exec(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, pad text); CREATE PUBLICATION inventorysync FOR ALL TABLES;
         ALTER DATABASE {} SET wal_sender_timeout = '2s';",
        db.name
    ))
    .await;
    let mut o = db.options("s", "inventorysync");
    o.create_slot = true;
    db.drain_now(o).await;
    db.exec("INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, 50000) g")
        .await;
    let mut o = db.options("s", "inventorysync");
    o.endpos = Some(db.current_lsn().await);
    // Stall for three times the timeout before reading anything.
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sink = count.clone();
    crate::harness::stream_with(o, Duration::from_secs(6), move |_| {
        sink.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    })
    .await
    .expect("no disconnect: max_reconnects is 0, so a drop would fail the run");
    let n = count.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(n, 50000);
}

/// A bus whose publisher fails every send with a transient delivery error.
#[derive(Clone)]
struct FailingBus;

struct FailingPublisher;

impl inventorysync::bus::Publisher for FailingPublisher {
    async fn send(
        &mut self,
        _ev: Box<inventorysync::event::ChangeEvent>,
    ) -> Result<(), inventorysync::bus::BusError> {
        Err(inventorysync::bus::BusError::Delivery {
            topic: "changes".into(),
            reason: "broker went away (injected)".into(),
        })
    }

    async fn commit(
        &mut self,
        end_lsn: inventorysync::Lsn,
    ) -> Result<inventorysync::bus::CommitAck, inventorysync::bus::BusError> {
        Ok(Box::pin(async move { Ok(end_lsn) }))
    }

    fn bus_name(&self) -> &'static str {
        "failing"
    }
}

impl inventorysync::bus::Bus for FailingBus {
    type Publisher = FailingPublisher;

    fn publisher(&self, _: &str) -> Result<FailingPublisher, inventorysync::bus::BusError> {
        Ok(FailingPublisher)
    }
}

/// Issue 14, item 3: a publisher that fails with a transient error makes the warehouse
/// `Retrying` (restarted with backoff), never `Failed`, however the pipeline's tasks race
/// (the source then fails too: its consumer is gone). Fifty runs, each to its first restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_publisher_always_retries_and_never_fails_the_warehouse() {
    use inventorysync::app::{StreamState, WarehouseStatus};
    let db = pg().new_db("failpub").await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION inventorysync FOR TABLE t;
         INSERT INTO t VALUES (1);",
    )
    .await;
    let state_db = pg().new_db("failpubstate").await;
    let state = inventorysync::store::StateDb::connect(
        &inventorysync::config::ConnInfo::parse("DB_URL", &state_db.url_as("postgres")).unwrap(),
    )
    .await
    .unwrap();
    state.migrate().await.unwrap();
    let warehouse = inventorysync::config::WarehouseConfig {
        id: "wh-failpub".into(),
        conn: db.conn(),
        publication: "inventorysync".into(),
        slot: db.slot("run"),
        streaming: inventorysync::config::Streaming::Off,
        heartbeat_interval: None,
        failover: false,
        primary: None,
    };
    // The slot exists before the first change, so that every change is streamed.
    db.exec(&format!(
        "SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
        db.slot("run")
    ))
    .await;
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for round in 0..50 {
        // The unconfirmed change is replayed on every run; a new one gives each run a fresh
        // change to fail on as well.
        db.exec(&format!("INSERT INTO t VALUES ({})", round + 2))
            .await;
        let status = WarehouseStatus::new("wh-failpub");
        let cancel = tokio_util::sync::CancellationToken::new();
        let run = tokio::spawn({
            let (w, status, state, cancel) = (
                warehouse.clone(),
                status.clone(),
                state.clone(),
                cancel.clone(),
            );
            let me = inventorysync::store::WorkerIdentity {
                worker_id: format!("failpub-{round}"),
                session: format!("{round}"),
                host: "test".into(),
                pid: std::process::id(),
                api: "-".into(),
            };
            let membership = inventorysync::app::Membership::new(me);
            async move {
                inventorysync::app::run(vec![w], &[status], state, FailingBus, membership, cancel)
                    .await
            }
        });
        let mut seen = status.state.subscribe();
        let settled = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let s = seen.borrow_and_update().clone();
                if matches!(s, StreamState::Retrying(_) | StreamState::Failed(_)) {
                    return s;
                }
                if seen.changed().await.is_err() {
                    return seen.borrow().clone();
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("round {round}: no restart within 20 s"));
        cancel.cancel();
        run.await.unwrap();
        match &settled {
            StreamState::Retrying(why) => {
                *outcomes.entry(why.clone()).or_default() += 1;
            }
            other => panic!("round {round}: the warehouse is {other:?}, not Retrying"),
        }
    }
    // The publisher's own error is what the restart reports (it names the cause).
    assert!(
        outcomes.keys().all(|why| why.contains("broker went away")),
        "{outcomes:?}"
    );
}
