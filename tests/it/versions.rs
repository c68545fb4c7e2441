//! What differs between PostgreSQL versions: failover slots (17+), and streaming on after a
//! primary fails over to its standby. The suite runs on the machine's PostgreSQL; `scripts/test`
//! runs these (with a smoke set) on 14, 16, 17 and 18 too.

use std::time::{Duration, Instant};

use inventorysync::Lsn;
use inventorysync::central::server::Faults;
use inventorysync::source::SourceError;
use inventorysync::source::stream::run;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::consumer::{
    Central, assert_converges, conflicts, log_tail, run_command, start, wait_streaming, workload,
};
use crate::harness::{Pg, TestDb, pg, pg_major};

/// Whether `slot` is a failover slot (none: no such slot, or no failover slots here).
async fn is_failover(db: &TestDb, slot: &str) -> Option<bool> {
    db.client
        .query_opt(
            "SELECT (to_jsonb(s) ->> 'failover')::bool FROM pg_replication_slots s WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .and_then(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_slots_are_made_on_17_and_refused_clearly_before() {
    let db = pg().new_db("fover").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION inventorysync FOR TABLE t;")
        .await;
    let mut opts = db.options("s", "inventorysync");
    opts.failover = true;
    opts.create_slot = true;
    if pg_major() < 17 {
        let (tx, _rx) = mpsc::channel(16);
        let (_durable, durable_rx) = watch::channel(Lsn::ZERO);
        let err = run(&opts, tx, durable_rx, CancellationToken::new())
            .await
            .expect_err("failover = true before 17 is refused");
        let text = err.to_string();
        assert!(matches!(err, SourceError::Config(_)), "{text}");
        assert!(
            text.contains("needs PostgreSQL 17 or later")
                && text.contains(&format!("this server is PostgreSQL {}.", pg_major())),
            "{text}"
        );
        assert_eq!(
            is_failover(&db, &db.slot("s")).await,
            None,
            "no slot is made"
        );
        // `check` says so too, naming the version.
        let toml = format!(
            "[[warehouses]]\nid = 'wh-fover'\nurl = '{}'\nslot = '{}'\nfailover = true\n",
            db.url_as("postgres"),
            db.slot("s")
        );
        let (code, out) = crate::cli::run_check(&toml, &[]);
        assert_ne!(code, 0, "{out}");
        assert!(
            out.contains(&format!(
                "failover = true needs PostgreSQL 17 or later; this server is PostgreSQL {}.",
                pg_major()
            )),
            "{out}"
        );
        return;
    }
    // A new slot is made a failover slot.
    db.exec("INSERT INTO t VALUES (1)").await;
    let events = db.drain_now(opts.clone()).await;
    assert_eq!(events.len(), 1);
    assert_eq!(is_failover(&db, &db.slot("s")).await, Some(true));
    // An existing slot that is not one is altered into one.
    let plain = db.slot("plain");
    db.exec(&format!(
        "SELECT pg_create_logical_replication_slot('{plain}', 'pgoutput')"
    ))
    .await;
    assert_eq!(is_failover(&db, &plain).await, Some(false));
    let mut opts = db.options("plain", "inventorysync");
    opts.failover = true;
    db.exec("INSERT INTO t VALUES (2)").await;
    let events = db.drain_now(opts).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(is_failover(&db, &plain).await, Some(true));
}

/// Issue 18: a primary with a physical standby that synchronizes the engine's failover slot;
/// the primary stops hard under a workload and the standby is promoted. The engine finds the
/// new primary among the URL's hosts (`target_session_attrs=read-write`) and streams on from
/// its checkpoint: central equals the promoted server field by field, with no new slot and
/// no reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_streams_on_from_the_checkpoint_with_nothing_lost_or_reloaded() {
    if pg_major() < 17 {
        eprintln!(
            "skipped: failover slots need PostgreSQL 17 (this is {})",
            pg_major()
        );
        return;
    }
    let primary = Pg::start("fo-primary", "wal_level = logical\n");
    let standby = primary.standby(
        "fo-standby",
        "fo_standby",
        "sync_replication_slots = on\nhot_standby_feedback = on\n",
    );
    // Logical walsenders send only what the standby has: a failover loses nothing central has.
    let admin = crate::harness::connect(&primary.url("postgres", "postgres")).await;
    for sql in [
        "ALTER SYSTEM SET synchronized_standby_slots = 'fo_standby'",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    let wh = primary.new_db("fo").await;
    wh.exec(include_str!("../../sql/demo_schema.sql")).await;
    wh.exec(
        "CREATE PUBLICATION inventorysync FOR TABLE products, locations, stock_levels;
         INSERT INTO products (sku, name) SELECT 'SKU-' || g, 'p' || g FROM generate_series(0, 39) g;
         INSERT INTO locations (location_code, zone) SELECT 'L-' || g, 'z' FROM generate_series(0, 5) g;",
    )
    .await;
    let state = pg().new_db("fostate").await;
    let central = Central::start(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("inventorysync.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}\n[[warehouses]]\nid = 'wh-fo'\nurl = 'postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{}?sslmode=disable&target_session_attrs=read-write&connect_timeout=2'\nslot = 'fo_run'\nfailover = true\n",
            include_str!("../../sql/demo_mapping.toml"),
            primary.port,
            standby.port,
            wh.name
        ),
    )
    .unwrap();
    let log = dir.path().join("run.log");
    let _run = start(run_command(&cfg, &state, &central, None), log.clone());
    wait_streaming(&state, "wh-fo", &log).await;
    workload(&wh.client, 1, 30).await;
    assert_converges(&central, &wh, "wh-fo", &log).await;
    // The standby holds a synchronized copy of the slot.
    let copy = standby.db(&wh.name).await;
    let synced = Instant::now();
    loop {
        let row = copy
            .client
            .query_opt(
                // A synced slot is temporary until the standby has caught up with the
                // primary's copy; a promotion drops the temporary ones.
                "SELECT synced AND NOT temporary FROM pg_replication_slots WHERE slot_name = 'fo_run'",
                &[],
            )
            .await
            .unwrap();
        if row.is_some_and(|r| r.get::<_, bool>(0)) {
            break;
        }
        assert!(
            synced.elapsed() < Duration::from_secs(90),
            "the standby never synchronized the slot: {}",
            std::fs::read_to_string(standby.dir.join("log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // `check` says the slot is a failover slot and a standby synchronizes it.
    let toml = std::fs::read_to_string(&cfg).unwrap();
    let env = vec![
        ("DB_URL", state.url_as("postgres")),
        ("WAREHOUSE_API_ENDPOINT", central.endpoint()),
    ];
    let (_, out) = crate::cli::run_check(&toml, &env);
    assert!(
        out.contains("fo_run is a failover slot")
            && out.contains("1 standby(s) synchronize slots; the slot waits for fo_standby"),
        "{out}"
    );
    // Writes go on while the primary stops hard; then the standby is promoted.
    // (The writer ends with a panic of its own when the primary goes: a workload statement
    // fails.)
    let writer = {
        let url = primary.url("postgres", &wh.name);
        tokio::spawn(async move {
            let client = crate::harness::connect(&url).await;
            for seed in 100.. {
                workload(&client, seed, 1).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        primary.ctl(&["-m", "immediate", "stop"]),
        "the primary stops"
    );
    let _ = writer.await;
    assert!(standby.ctl(&["-w", "promote"]), "the standby is promoted");
    let promoted = standby.db(&wh.name).await;
    workload(&promoted.client, 2, 30).await;
    assert_converges(&central, &promoted, "wh-fo", &log).await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        text.matches("slot created").count(),
        1,
        "no new slot after the failover: {}",
        log_tail(&log)
    );
    let loads: i64 = state
        .client
        .query_one("SELECT count(*) FROM sync_jobs WHERE kind = 'load'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        loads, 1,
        "only the first load, no reload after the failover"
    );
    assert_eq!(conflicts(&state).await, Vec::<Value>::new());
}
