//! The state DB: migrations, forward-only checkpoints, warehouse leases, `migrate`.

use std::process::Command;
use std::time::Duration;

use inventorysync::Lsn;
use inventorysync::config::ConnInfo;
use inventorysync::store::{LaneMark, Leases, StateDb};

use crate::harness::pg;

async fn state_db(prefix: &str) -> (crate::harness::TestDb, StateDb) {
    let db = pg().new_db(prefix).await;
    let state = StateDb::connect(&ConnInfo::parse("DB_URL", &db.url_as("postgres")).unwrap())
        .await
        .unwrap();
    state.migrate().await.unwrap();
    (db, state)
}

#[tokio::test]
async fn migrations_are_idempotent_and_checkpoints_only_move_forward() {
    let (_db, state) = state_db("ckpt").await;
    state.migrate().await.unwrap();
    assert_eq!(state.checkpoint("wh-1").await.unwrap(), None);
    state
        .advance_checkpoint("wh-1", "slot_a", Lsn(0x10))
        .await
        .unwrap();
    state
        .advance_checkpoint("wh-1", "slot_a", Lsn(0x5))
        .await
        .unwrap();
    assert_eq!(
        state.checkpoint("wh-1").await.unwrap().unwrap().flush_lsn,
        Lsn(0x10)
    );
    state
        .advance_checkpoint("wh-1", "slot_a", Lsn(0x1_0000_0020))
        .await
        .unwrap();
    let c = state.checkpoint("wh-1").await.unwrap().unwrap();
    assert_eq!(
        (c.slot_name.as_str(), c.flush_lsn),
        ("slot_a", Lsn(0x1_0000_0020))
    );
    assert_eq!(state.checkpoint("wh-2").await.unwrap(), None);
}

#[tokio::test]
async fn one_process_owns_a_warehouse_and_a_standby_takes_over_when_it_goes() {
    let (_db, state) = state_db("lease").await;
    let id = format!("wh-{}", std::process::id());
    // Two processes: each holds all of its locks on one lease connection.
    let first = Leases::open(&state, "it-session").await.unwrap();
    let second = Leases::open(&state, "it-session").await.unwrap();
    let owner = first.try_acquire(&id).await.unwrap().expect("first owner");
    assert!(owner.holds());
    assert!(
        second.try_acquire(&id).await.unwrap().is_none(),
        "taken by the first process"
    );
    let again = first.try_acquire(&id).await.unwrap().expect("its own lock");
    drop(again);
    assert!(
        second
            .try_acquire(&format!("{id}-other"))
            .await
            .unwrap()
            .is_some()
    );
    owner.release().await;
    let standby = second.try_acquire(&id).await.unwrap().expect("free again");
    // A lock is taken once per connection however often it is asked for: one release frees it.
    standby.release().await;
    let taken = first
        .try_acquire(&id)
        .await
        .unwrap()
        .expect("free after one release");
    // A process that dies without releasing: its lease connection closes and every lock
    // goes with it.
    drop(taken);
    drop(first);
    let mut taken = None;
    for _ in 0..50 {
        taken = second.try_acquire(&id).await.unwrap();
        if taken.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        taken.is_some(),
        "the locks of a closed lease connection are released"
    );
}

#[tokio::test]
async fn a_dropped_lease_connection_stops_its_leases_and_comes_back() {
    let (db, state) = state_db("leaselost").await;
    let leases = Leases::open(&state, "it-session").await.unwrap();
    let lease = leases.try_acquire("wh-lost").await.unwrap().expect("owner");
    // The state DB ends the lease connection (a failover, an operator, a network cut).
    db.client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'inventorysync lease %' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), lease.lost())
        .await
        .expect("the lease is lost within a ping");
    assert!(!lease.holds());
    // The connection comes back; the warehouse can be owned again (by whoever asks first).
    let mut again = None;
    for _ in 0..100 {
        again = leases.try_acquire("wh-lost").await.unwrap();
        if again.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(again.expect("owned again").holds());
}

fn migrate(db_url: Option<&str>) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_inventorysync"));
    // Each process its own API port (the default 8080 would collide between tests).
    c.env("API_LISTEN", "127.0.0.1:0");
    c.args(["--config", "/nonexistent/inventorysync.toml", "migrate"]);
    match db_url {
        Some(u) => c.env("DB_URL", u),
        None => c.env_remove("DB_URL"),
    };
    let o = c.output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test]
async fn migrate_accepts_the_jdbc_form_and_reports_bad_urls_clearly() {
    let db = pg().new_db("migrate").await;
    let jdbc = format!(
        "jdbc:postgresql://127.0.0.1:{}/{}?user=postgres&sslmode=disable",
        db.port, db.name
    );
    let (code, out, err) = migrate(Some(&jdbc));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("is up to date"), "{out}");
    let n: i64 = db
        .client
        .query_one("SELECT count(*) FROM replication_checkpoints", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);

    let (code, _, err) = migrate(None);
    assert_eq!(code, 2);
    assert!(err.contains("DB_URL is not set"), "{err}");

    let missing = format!(
        "postgres://postgres:hunter2@127.0.0.1:{}/no_such_db?sslmode=disable",
        db.port
    );
    let (code, _, err) = migrate(Some(&missing));
    assert_eq!(code, 1);
    assert!(
        err.contains("state DB postgres://postgres:***@127.0.0.1"),
        "{err}"
    );
    assert!(err.contains("no_such_db"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");

    let (code, _, err) = migrate(Some("mysql://x/y"));
    assert_eq!(code, 2);
    assert!(err.contains("configuration key DB_URL"), "{err}");
}

#[tokio::test]
async fn a_conflict_that_repeats_an_open_one_is_recorded_once() {
    use inventorysync::store::{ConflictQuery, NewConflict};
    let (_db, state) = state_db("conflictonce").await;
    let conflict = |version: &str, qty: i64| NewConflict {
        warehouse_id: "wh-1".into(),
        table_name: "public.stock_levels".into(),
        entity: Some("stock_level".into()),
        entity_key: serde_json::json!({"sku": "SKU-1", "location": "A-1"}),
        kind: "invalid",
        rule: Some("quantity_non_negative".into()),
        reason: format!("{qty} is negative"),
        source_version: version.into(),
        central_version: None,
        source_value: Some(serde_json::json!({"on_hand": qty})),
        central_value: None,
        dead_lettered: true,
        hint: "fix the row".into(),
    };
    let open = || async {
        state
            .list_conflicts(&ConflictQuery {
                warehouse: Some("wh-1".into()),
                status: Some("open".into()),
                kind: None,
                before_id: None,
                limit: 100,
            })
            .await
            .unwrap()
            .len()
    };
    state
        .record_conflict(&conflict("0000000000000010:00000000", -1))
        .await
        .unwrap();
    // A resync reads the same still-invalid row at a new version: nothing new to tell.
    state
        .record_conflict(&conflict("0000000000000020:00000000", -1))
        .await
        .unwrap();
    assert_eq!(open().await, 1);
    // Another bad value is news.
    state
        .record_conflict(&conflict("0000000000000030:00000000", -2))
        .await
        .unwrap();
    assert_eq!(open().await, 2);
    // Once resolved, the same bad value again is a new conflict.
    state
        .resolve_conflicts(
            "wh-1",
            &[(
                "stock_level".into(),
                serde_json::json!({"sku": "SKU-1", "location": "A-1"}),
            )],
        )
        .await
        .unwrap();
    assert_eq!(open().await, 0);
    state
        .record_conflict(&conflict("0000000000000040:00000000", -1))
        .await
        .unwrap();
    assert_eq!(open().await, 1);
}

/// Lane positions only rise, and their writes commit without waiting for the WAL flush
/// (they only spare replays) while every other write of the pool's connections still waits:
/// on a server whose synchronous commits wait for a standby that never comes, they go through
/// and the connections still say `synchronous_commit = on`.
#[tokio::test]
async fn lane_positions_only_rise_and_commit_without_waiting_for_the_flush() {
    let db = crate::harness::pg_sync_standby().new_db("lanes").await;
    let conn = ConnInfo::parse("DB_URL", &db.url_as("postgres")).unwrap();
    StateDb::connect(&conn)
        .await
        .unwrap()
        .migrate()
        .await
        .unwrap();
    db.exec(&format!(
        "ALTER DATABASE {} SET synchronous_commit = on",
        db.name
    ))
    .await;
    let state = StateDb::connect(&conn).await.unwrap();
    let mark = |lane, settled: &str| LaneMark {
        stream: "",
        lane,
        settled: settled.to_string(),
    };
    for round in [
        vec![
            mark(0, "0000000000000020:00000001/00"),
            mark(1, "0000000000000010:00000001/00"),
        ],
        vec![
            mark(0, "0000000000000018:00000001/00"),
            mark(1, "0000000000000030:00000002/01"),
        ],
    ] {
        // Sixteen at once: over every connection of the pool.
        let writes = (0..16).map(|_| state.settle_lanes("wh-1", 32, &round));
        let written = tokio::time::timeout(
            Duration::from_secs(10),
            futures_util::future::join_all(writes),
        )
        .await
        .expect("lane positions wait for a synchronous commit");
        for w in written {
            w.unwrap();
        }
    }
    let mut marks = state.lane_marks("wh-1", "", 32).await.unwrap();
    marks.sort();
    assert_eq!(
        marks,
        vec![
            (0, "0000000000000020:00000001/00".to_string()),
            (1, "0000000000000030:00000002/01".to_string())
        ]
    );
    assert!(state.lane_marks("wh-1", "", 16).await.unwrap().is_empty());
    // Every connection the pool holds.
    let held = futures_util::future::join_all((0..8).map(|_| state.pool().acquire())).await;
    for conn in held {
        let mut conn = conn.unwrap();
        let (setting,): (String,) = sqlx::query_as("SHOW synchronous_commit")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(setting, "on");
    }
}
