//! The initial load under a crash loop: `run` killed -9 at random moments while it reads a
//! large table must resume with the next chunk, never from the start, and central must end
//! up equal to the warehouse. The rows read from the warehouse are counted by PostgreSQL
//! itself (`pg_stat_user_tables`), not by the engine.
//!
//! `INVENTORYSYNC_LOAD_ROWS` (default 100,000) and `INVENTORYSYNC_LOAD_KILLS` (default 4) size
//! it; the figure is 1,000,000 rows and 10 kills:
//! `INVENTORYSYNC_LOAD_ROWS=1000000 INVENTORYSYNC_LOAD_KILLS=10 cargo test --test it -- load:: --nocapture`.

use std::time::{Duration, Instant};

use inventorysync::central::server::Faults;
use serde_json::Value;

use crate::consumer::{
    Central, assert_converges, config, conflicts, demo_warehouse, load_delivered, log_tail,
    run_command, start,
};
use crate::harness::{TestDb, pg};

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Rows PostgreSQL has handed out of `table` (sequential and index scans).
async fn rows_read(db: &TestDb, table: &str) -> i64 {
    db.client
        .batch_execute("SELECT pg_stat_clear_snapshot()")
        .await
        .unwrap();
    db.client
        .query_one(
            "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) FROM pg_stat_user_tables WHERE relname = $1",
            &[&table],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_during_the_initial_load_resumes_it_and_reads_each_row_about_once() {
    let rows = env_number("INVENTORYSYNC_LOAD_ROWS", 100_000);
    let kills = env_number("INVENTORYSYNC_LOAD_KILLS", 4);
    let db = demo_warehouse("lcrash").await;
    let per_location = 1000;
    db.exec(&format!(
        "INSERT INTO products (sku, name) SELECT 'SKU-' || i, 'p' || i FROM generate_series(0, {per_location} - 1) i;
         INSERT INTO locations SELECT 'L-' || i, 'z' FROM generate_series(0, ({rows} - 1) / {per_location}) i;
         INSERT INTO stock_levels (sku, location_code, qty_on_hand, qty_reserved)
           SELECT 'SKU-' || (i % {per_location}), 'L-' || (i / {per_location}), i % 100, 0
             FROM generate_series(0, {rows} - 1) i;
         ANALYZE;"
    ))
    .await;
    // Give the statistics collector time to settle what the inserts read.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let read_before = rows_read(&db, "stock_levels").await;
    let state = pg().new_db("lcrashstate").await;
    let central = Central::start(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &db, "wh-lcrash", "");
    let delivered = || async {
        central
            .stats()
            .await
            .get("applied")
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    // Kills at moments drawn from a fixed seed, each after the load has moved on since the
    // last one (so every kill lands inside the load, not before it started).
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut started_at = Vec::new();
    for i in 0..kills {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let log = dir.path().join(format!("run{i}.log"));
        let before = delivered().await;
        let mut run = start(run_command(&cfg, &state, &central, None), log.clone());
        let t = Instant::now();
        while delivered().await <= before {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "run {i} delivered nothing; log:\n{}",
                log_tail(&log)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(x % 1500)).await;
        run.child.kill().unwrap(); // SIGKILL
        run.child.wait().unwrap();
        started_at.push(delivered().await);
        assert!(
            !load_delivered(&state, "wh-lcrash").await,
            "the table is large enough for every kill to land inside the load"
        );
    }
    let log = dir.path().join("run.log");
    let _run = start(run_command(&cfg, &state, &central, None), log.clone());
    for _ in 0..3000 {
        if load_delivered(&state, "wh-lcrash").await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        load_delivered(&state, "wh-lcrash").await,
        "the load finished; log:\n{}",
        log_tail(&log)
    );
    // The backends of the killed processes flush their statistics as they exit.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let read = rows_read(&db, "stock_levels").await - read_before;
    let ratio = read as f64 / rows as f64;
    eprintln!(
        "initial load of {rows} rows with {kills} kills (central's applied count at each kill: {started_at:?}): {read} rows read from the warehouse = {ratio:.3} x the table"
    );
    assert!(
        ratio <= 1.2,
        "{read} rows read for a {rows}-row table ({ratio:.3} x)"
    );
    // Compared after counting: the comparison reads the table too.
    assert_converges(&central, &db, "wh-lcrash", &log).await;
    assert_eq!(conflicts(&state).await, Vec::<Value>::new());

    // Every load job but one ended, and that one succeeded: no reload was ever started.
    let jobs = state
        .client
        .query_one("SELECT count(*) FROM sync_jobs WHERE kind = 'load'", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(jobs, 1, "one load, resumed after each kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_and_created_again_gets_its_initial_load() {
    let db = demo_warehouse("lrecreate").await;
    crate::consumer::workload(&db.client, 21, 40).await;
    let state = pg().new_db("lrecreatestate").await;
    let central = Central::start(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &db, "wh-recreate", "");
    let first = dir.path().join("first.log");
    {
        let _run = start(run_command(&cfg, &state, &central, None), first.clone());
        crate::consumer::wait_streaming(&state, "wh-recreate", &first).await;
        assert_converges(&central, &db, "wh-recreate", &first).await;
    }
    // While run is down a DBA drops the slot; changes are made that no slot records; then
    // the slot is created again under the same name.
    let slot = db.slot("run");
    // (The stopped run's walsender may still hold the slot for a moment.)
    db.drop_slot_when_free(&slot).await;
    // (Only upserts: central keeps an entity the warehouse deleted while no slot recorded it,
    // since a load can only send rows that exist; see docs/RUNBOOK.md.)
    db.exec(
        "UPDATE stock_levels SET qty_on_hand = qty_on_hand + 7;
         INSERT INTO products (sku, name) VALUES ('SKU-GAP', 'written while no slot existed');",
    )
    .await;
    db.exec(&format!(
        "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"
    ))
    .await;
    let log = dir.path().join("run.log");
    let _run = start(run_command(&cfg, &state, &central, None), log.clone());
    assert_converges(&central, &db, "wh-recreate", &log).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("dropped and created again"),
        "{}",
        log_tail(&log)
    );
    // Central holds the rows once the last chunk is delivered; the job is marked a moment later.
    let mut loads = 0;
    for _ in 0..300 {
        loads = state
            .client
            .query_one(
                "SELECT count(*) FROM sync_jobs WHERE kind = 'load' AND status = 'succeeded'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        if loads >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(loads, 2, "a second load for the new slot");
}
