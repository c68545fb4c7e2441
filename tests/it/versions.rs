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

/// What `check` prints for the configuration `cfg`.
fn check_output(cfg: &std::path::Path, state: &TestDb, central: &Central) -> String {
    let toml = std::fs::read_to_string(cfg).unwrap();
    let env = vec![
        ("DB_URL", state.url_as("postgres")),
        ("WAREHOUSE_API_ENDPOINT", central.endpoint()),
    ];
    crate::cli::run_check(&toml, &env).1
}

/// The demo schema in `wh`, published, with 40 products and 6 locations.
async fn demo_warehouse(wh: &TestDb) {
    wh.exec(include_str!("../../sql/demo_schema.sql")).await;
    wh.exec(
        "CREATE PUBLICATION inventorysync FOR TABLE products, locations, stock_levels;
         INSERT INTO products (sku, name) SELECT 'SKU-' || g, 'p' || g FROM generate_series(0, 39) g;
         INSERT INTO locations (location_code, zone) SELECT 'L-' || g, 'z' FROM generate_series(0, 5) g;",
    )
    .await;
}

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
    demo_warehouse(&wh).await;
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
    let out = check_output(&cfg, &state, &central);
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

/// A primary and a hot standby (`hot_standby_feedback`, physical slot `{name}_standby`),
/// or `None` (saying so) before PostgreSQL 16, which cannot decode on a standby.
fn standby_pair(name: &str) -> Option<(Pg, Pg)> {
    if pg_major() < 16 {
        eprintln!(
            "skipped: decoding on a standby needs PostgreSQL 16 (this is {})",
            pg_major()
        );
        return None;
    }
    let primary = Pg::start(&format!("{name}-primary"), "wal_level = logical\n");
    let standby = primary.standby(
        &format!("{name}-standby"),
        &format!("{name}_standby"),
        "hot_standby_feedback = on\n",
    );
    Some((primary, standby))
}

/// Writes a configuration in `dir` for warehouse `id` (the demo mapping), decoded on
/// `standby` from slot `slot`, with `primary` as its `primary_url`; returns its path.
fn standby_config(
    dir: &std::path::Path,
    wh: &TestDb,
    primary: &Pg,
    standby: &Pg,
    id: &str,
    slot: &str,
) -> std::path::PathBuf {
    let url = |port: u16| {
        format!(
            "postgres://postgres@127.0.0.1:{port}/{}?sslmode=disable",
            wh.name
        )
    };
    let cfg = dir.join("inventorysync.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}\n[[warehouses]]\nid = '{id}'\nurl = '{}'\nprimary_url = '{}'\nslot = '{slot}'\n",
            include_str!("../../sql/demo_mapping.toml"),
            url(standby.port),
            url(primary.port),
        ),
    )
    .unwrap();
    cfg
}

/// Waits until `standby` has replayed everything `primary` (a database on its primary) had
/// written, and sees a publication in each of `dbs`: an engine started earlier could find
/// no publication there yet. The insert position, not the write position: the test clusters
/// run with `synchronous_commit = off`, so a commit that returned may not be written yet.
async fn standby_ready(primary: &TestDb, standby: &Pg, dbs: &[&str]) {
    let setup: String = primary
        .client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let setup: Lsn = setup.parse().unwrap();
    let standby_admin = standby.db("postgres").await;
    let since = Instant::now();
    loop {
        let at: Option<String> = standby_admin
            .client
            .query_one("SELECT pg_last_wal_replay_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        if at
            .and_then(|t| t.parse::<Lsn>().ok())
            .is_some_and(|at| at >= setup)
        {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "the standby never replayed the setup"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for db in dbs {
        let copy = standby.db(db).await;
        while copy
            .client
            .query_one("SELECT count(*) FROM pg_publication", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 0
        {
            assert!(
                since.elapsed() < Duration::from_secs(30),
                "the standby never replayed {db}'s publication"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Issue 18: resyncs read on a standby while writers race their watermarks undo no write. A
/// watermark is a transactional message, decoded at its transaction's commit, so a write
/// that commits between the message record and that commit comes before the chunk's window
/// in the stream: the chunk's read must see it. A standby that has replayed only the
/// message record may not see it yet, and the chunk would send the row as it was before, at
/// a newer version. (The window is microseconds: this test guards the wait, it did not catch
/// the race before the fix.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resyncs_read_on_a_standby_while_writers_race_their_watermarks_undo_no_write() {
    let Some((primary, standby)) = standby_pair("sbr") else {
        return;
    };
    let wh = primary.new_db("sbr").await;
    wh.exec(include_str!("../../sql/demo_schema.sql")).await;
    wh.exec("CREATE PUBLICATION inventorysync FOR TABLE products, locations, stock_levels")
        .await;
    crate::api::seed_stock(&wh, 300, 10).await;
    standby_ready(&wh, &standby, &[&wh.name]).await;
    let state = pg().new_db("sbrstate").await;
    let central = Central::start(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = standby_config(dir.path(), &wh, &primary, &standby, "wh-sbr", "sbr_run");
    let log = dir.path().join("run.log");
    let (_run, api) = crate::api::run_with_api(&cfg, &state, &central, log.clone(), &[]);
    wait_streaming(&state, "wh-sbr", &log).await;
    let copy = standby.db(&wh.name).await;
    for round in 0..3 {
        let stop = CancellationToken::new();
        let writers: Vec<_> = (0..4)
            .map(|w| crate::api::keep_writing(&wh, stop.clone(), 1 + 997 * w))
            .collect();
        let (status, v) = api.post("/sync/warehouses/wh-sbr", "").await;
        assert_eq!(status, 202, "{v}");
        let job = api.finished(v["jobId"].as_str().unwrap(), &log).await;
        stop.cancel();
        for w in writers {
            assert!(w.await.unwrap() > 0);
        }
        assert_eq!(
            job["status"],
            "succeeded",
            "round {round}: {job}\n{}",
            log_tail(&log)
        );
        // What the standby holds is what central should: once it replayed the last writes.
        standby_ready(&wh, &standby, &[]).await;
        assert_converges(&central, &copy, "wh-sbr", &log).await;
    }
    assert_eq!(conflicts(&state).await, Vec::<Value>::new());
}

/// Issue 18: a warehouse whose URL points at a hot standby (PostgreSQL 16+) streams from a
/// slot on the standby, so the primary carries no decoding load. Heartbeats and sync-cycle
/// markers are logical messages, which a standby cannot write: with `primary_url` they are
/// written on the primary and reach the standby's slot through the WAL. Without it the
/// stream still works and a sync cycle fails with a message that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_streams_from_its_own_slot_and_markers_go_through_the_primary() {
    let Some((primary, standby)) = standby_pair("sb") else {
        return;
    };
    let wh = primary.new_db("sb").await;
    demo_warehouse(&wh).await;
    // wh-sb-alone starts empty: without primary_url its initial load is refused.
    let alone = primary.new_db("sbalone").await;
    alone.exec(include_str!("../../sql/demo_schema.sql")).await;
    alone
        .exec("CREATE PUBLICATION inventorysync FOR TABLE products, locations, stock_levels;")
        .await;
    standby_ready(&wh, &standby, &[&wh.name, &alone.name]).await;
    let state = pg().new_db("sbstate").await;
    let central = Central::start(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("inventorysync.toml");
    let url =
        |port: u16, db: &str| format!("postgres://postgres@127.0.0.1:{port}/{db}?sslmode=disable");
    std::fs::write(
        &cfg,
        format!(
            "{}\n[[warehouses]]\nid = 'wh-sb'\nurl = '{}'\nprimary_url = '{}'\nslot = 'sb_run'\nheartbeat_secs = 1\n\
             [[warehouses]]\nid = 'wh-sb-alone'\nurl = '{}'\nslot = 'sb_alone'\n\
             [[warehouses]]\nid = 'wh-sb-wrong'\nurl = '{}'\nprimary_url = '{}'\nslot = 'sb_wrong'\n",
            include_str!("../../sql/demo_mapping.toml"),
            url(standby.port, &wh.name),
            url(primary.port, &wh.name),
            url(standby.port, &alone.name),
            url(standby.port, &alone.name),
            url(standby.port, &alone.name),
        ),
    )
    .unwrap();
    let log = dir.path().join("run.log");
    let (_run, api) = crate::api::run_with_api(&cfg, &state, &central, log.clone(), &[]);
    wait_streaming(&state, "wh-sb", &log).await;
    // Without primary_url the chunked initial load has no watermarks: it fails saying so,
    // and the stream goes on.
    let refused = Instant::now();
    loop {
        let row = state
            .client
            .query_opt(
                "SELECT coalesce(w.error, j.error) FROM sync_jobs j JOIN sync_job_warehouses w ON w.job_id = j.id
                  WHERE j.kind = 'load' AND j.status = 'failed' AND w.warehouse_id = 'wh-sb-alone'",
                &[],
            )
            .await
            .unwrap();
        if let Some(r) = row {
            let error: Option<String> = r.get(0);
            let error = error.unwrap_or_default();
            assert!(
                error.contains("standby") && error.contains("primary_url"),
                "{error}"
            );
            break;
        }
        assert!(
            refused.elapsed() < Duration::from_secs(30),
            "wh-sb-alone's load never failed: {}",
            log_tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    while crate::kafka::checkpoint(&state, "wh-sb-alone")
        .await
        .is_none()
    {
        assert!(
            refused.elapsed() < Duration::from_secs(30),
            "{}",
            log_tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A primary_url that is no primary is a configuration error that names it.
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("warehouses[wh-sb-wrong].primary_url")
            && text.contains("is a standby too, expected the primary")
        {
            break;
        }
        assert!(
            refused.elapsed() < Duration::from_secs(30),
            "{}",
            log_tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // `check` says which of them decode on a standby, and what each lacks.
    let out = check_output(&cfg, &state, &central);
    for want in [
        "decoding on a standby; heartbeats, sync-cycle markers and chunk watermarks are written on primary_url",
        "the URL points at a standby and no primary_url is set",
        "is a standby too, expected the primary",
    ] {
        assert!(out.contains(want), "check says {want:?}: {out}");
    }
    // The slots are on the standby, none on the primary but its physical one.
    let copy = standby.db(&wh.name).await;
    let alone_copy = standby.db(&alone.name).await;
    let on_standby: i64 = copy
        .client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name IN ('sb_run', 'sb_alone')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(on_standby, 2);
    let on_primary: i64 = wh
        .client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_type = 'logical'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(on_primary, 0, "no logical slot on the primary");
    workload(&wh.client, 1, 30).await;
    alone
        .exec(
            "INSERT INTO products (sku, name) SELECT 'SKU-' || g, 'p' || g FROM generate_series(0, 19) g;
             INSERT INTO locations (location_code, zone) SELECT 'L-' || g, 'z' FROM generate_series(0, 3) g;",
        )
        .await;
    workload(&alone.client, 2, 20).await;
    // Central equals the standby (which equals the primary) field by field, for both, once
    // the standby replayed the workloads (before, it would hold older rows than central).
    standby_ready(&wh, &standby, &[]).await;
    standby_ready(&alone, &standby, &[]).await;
    assert_converges(&central, &copy, "wh-sb", &log).await;
    assert_converges(&central, &alone_copy, "wh-sb-alone", &log).await;
    // A heartbeat goes through the primary: a quiet slot moves on past the primary's WAL.
    let before: String = wh
        .client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let before: Lsn = before.parse().unwrap();
    let moved = Instant::now();
    loop {
        let row = copy
            .client
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'sb_run'",
                &[],
            )
            .await
            .unwrap();
        let at: Option<String> = row.get(0);
        if at
            .and_then(|t| t.parse::<Lsn>().ok())
            .is_some_and(|l| l > before)
        {
            break;
        }
        assert!(
            moved.elapsed() < Duration::from_secs(30),
            "the standby's slot never moved past {before}: {}",
            log_tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A sync cycle: its marker goes through the primary for wh-sb; wh-sb-alone has no
    // primary_url, and its cycle fails saying so.
    let id = api.trigger(r#"{"warehouses": ["wh-sb"]}"#).await;
    let job = api.finished(&id, &log).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", log_tail(&log));
    let id = api.trigger(r#"{"warehouses": ["wh-sb-alone"]}"#).await;
    let job = api.finished(&id, &log).await;
    assert_eq!(job["status"], "failed", "{job}");
    let text = job.to_string();
    assert!(
        text.contains("standby") && text.contains("primary_url"),
        "the failure says the standby needs primary_url: {job}"
    );
    assert_eq!(conflicts(&state).await, Vec::<Value>::new());
}

/// Issue 39: on a standby, a publication created on the primary that the standby has not
/// replayed yet is waited for, with a log line that says so; the warehouse stopped (a
/// definite "publication does not exist") until someone restarted the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_the_standby_has_not_replayed_yet_is_waited_for() {
    let Some((primary, standby)) = standby_pair("sbpub") else {
        return;
    };
    let wh = primary.new_db("sbpub").await;
    wh.exec(include_str!("../../sql/demo_schema.sql")).await;
    crate::api::seed_stock(&wh, 50, 4).await;
    standby_ready(&wh, &standby, &[]).await;
    // The standby stops replaying; the publication is created on the primary meanwhile.
    let standby_admin = standby.db("postgres").await;
    standby_admin.exec("SELECT pg_wal_replay_pause()").await;
    wh.exec("CREATE PUBLICATION inventorysync FOR TABLE products, locations, stock_levels")
        .await;
    let state = pg().new_db("sbpubstate").await;
    let central = Central::start(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = standby_config(dir.path(), &wh, &primary, &standby, "wh-sbpub", "sbpub_run");
    let log = dir.path().join("run.log");
    let (_run, api) = crate::api::run_with_api(&cfg, &state, &central, log.clone(), &[]);
    let said = "the standby has not replayed it yet: waiting";
    for _ in 0..150 {
        if std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(said)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, _, ready) = api.get("/ready", None).await;
    let reason = ready["warehouses"]["wh-sbpub"]["reason"].to_string();
    assert!(
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(said)
            && !reason.contains("stopped"),
        "{ready}\n{}",
        log_tail(&log)
    );
    standby_admin.exec("SELECT pg_wal_replay_resume()").await;
    wh.exec("SELECT pg_log_standby_snapshot()").await;
    wait_streaming(&state, "wh-sbpub", &log).await;
    crate::consumer::workload(&wh.client, 71, 30).await;
    standby_ready(&wh, &standby, &[]).await;
    let copy = standby.db(&wh.name).await;
    assert_converges(&central, &copy, "wh-sbpub", &log).await;
}
