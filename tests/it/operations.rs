//! What operators and DBAs do on an ordinary day, against a running `run` (issue 39): rename
//! or move a mapped table, drop a column a queued change still needs, key values that break
//! out of a quoted literal. Each test ends with central compared field by field with the
//! warehouse's tables, under their names of the moment.

use std::path::Path;
use std::time::Duration;

use inventorysync::central::server::Faults;
use serde_json::Value;

use crate::consumer::{
    Central, Run, assert_converges, config, conflicts, dead_letters, demo_warehouse, expected_from,
    log_tail, run_command, start, wait_streaming, wide_products, workload,
};
use crate::harness::{TestDb, pg};

/// The query of central's expected state when the demo tables are named `products`,
/// `locations` and `stock` (rows: entity, key JSON, data JSON).
fn expected_query(products: &str, locations: &str, stock: &str) -> String {
    format!(
        "SELECT 'product', json_build_object('sku', sku)::text,
                json_build_object('name', name, 'unit_price', unit_price::text, 'attributes', attributes)::text
           FROM {products}
         UNION ALL
         SELECT 'location', json_build_object('code', location_code)::text,
                json_build_object('zone', zone)::text
           FROM {locations}
         UNION ALL
         SELECT 'stock_level', json_build_object('sku', sku, 'location', location_code)::text,
                json_build_object('on_hand', qty_on_hand, 'reserved', qty_reserved,
                                  'available', qty_on_hand - qty_reserved)::text
           FROM {stock}"
    )
}

/// Waits until central holds exactly what `query` says the warehouse holds; panics with a
/// diff and the log's tail otherwise.
async fn converges_to(central: &Central, db: &TestDb, warehouse: &str, query: &str, log: &Path) {
    converges_but(central, db, warehouse, query, &[], log).await
}

/// [`converges_to`], but for the entities whose key names one of `except` on either side.
async fn converges_but(
    central: &Central,
    db: &TestDb,
    warehouse: &str,
    query: &str,
    except: &[&str],
    log: &Path,
) {
    let kept = |k: &String| !except.iter().any(|e| k.contains(e));
    let mut want = expected_from(db, query).await;
    want.retain(|k, _| kept(k));
    let mut got = Default::default();
    for _ in 0..600 {
        got = central.state(warehouse).await;
        got.retain(|k, _| kept(k));
        if got == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let missing: Vec<_> = want
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(*v))
        .take(5)
        .map(|(k, v)| (k, v, got.get(k)))
        .collect();
    let extra: Vec<_> = got
        .keys()
        .filter(|k| !want.contains_key(*k))
        .take(5)
        .collect();
    panic!(
        "central differs from the warehouse ({} vs {} entities); missing or different (key, warehouse, central): {missing:?}; extra: {extra:?}; run's log ends:\n{}",
        got.len(),
        want.len(),
        log_tail(log)
    );
}

/// Changes on the renamed stock table and the moved locations table (round `n`).
async fn change_renamed_tables(db: &TestDb, n: u32) {
    db.exec(&format!(
        "INSERT INTO moved.locations (location_code, zone) VALUES ('R-{n}', 'renamed {n}')
           ON CONFLICT (location_code) DO UPDATE SET zone = EXCLUDED.zone;
         UPDATE stock SET qty_on_hand = qty_on_hand + 1 + {n};
         INSERT INTO stock (sku, location_code, qty_on_hand, qty_reserved)
           SELECT sku, 'R-{n}', 7 + {n}, 2 FROM products ON CONFLICT DO NOTHING;
         DELETE FROM stock WHERE ctid IN (SELECT ctid FROM stock WHERE location_code <> 'R-{n}' LIMIT 3);
         UPDATE moved.locations SET zone = zone || '+' WHERE location_code LIKE 'L-%';"
    ))
    .await;
}

/// `ALTER TABLE … RENAME` and `SET SCHEMA` on mapped tables while `run` streams, then a
/// restart whose configuration still names the old tables: every change keeps flowing under
/// its mapping (they were skipped as unmapped and confirmed), with a warning that names the
/// new name.
async fn a_renamed_and_a_moved_table_keep_flowing_under_their_mappings(kafka: bool) {
    let prefix = if kafka { "opsrenk" } else { "opsrene" };
    let db = demo_warehouse(prefix).await;
    workload(&db.client, 11, 40).await;
    let state = pg().new_db(&format!("{prefix}state")).await;
    let central = Central::start(Faults::default()).await;
    let id = format!("wh-{prefix}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &db, &id, "");
    let topic = format!("it.{}", db.name);
    let command = || run_command(&cfg, &state, &central, kafka.then_some(topic.as_str()));
    let log = dir.path().join("run.log");
    let run = start(command(), log.clone());
    wait_streaming(&state, &id, &log).await;
    db.exec(
        "ALTER TABLE stock_levels RENAME TO stock; CREATE SCHEMA moved;
         ALTER TABLE locations SET SCHEMA moved;",
    )
    .await;
    change_renamed_tables(&db, 0).await;
    let renamed = expected_query("products", "moved.locations", "stock");
    converges_to(&central, &db, &id, &renamed, &log).await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("public.stock") && text.contains("update the configuration"),
        "no warning names the new name:\n{}",
        log_tail(&log)
    );
    // `check` says so too, instead of "mapped but not in the publication".
    let toml = std::fs::read_to_string(&cfg).unwrap();
    let (_, out) = crate::cli::run_check(
        &toml,
        &[
            ("DB_URL", state.url_as("postgres")),
            ("WAREHOUSE_API_ENDPOINT", central.endpoint()),
        ],
    );
    assert!(
        out.contains("public.stock_levels was renamed or moved to public.stock")
            && out.contains("[[mappings]] table = \"moved.locations\""),
        "{out}"
    );
    // A restart: the configuration still names public.stock_levels and public.locations,
    // which are not there any more; the stored bindings find the tables by their OIDs.
    drop::<Run>(run);
    let log = dir.path().join("run2.log");
    let _run = start(command(), log.clone());
    change_renamed_tables(&db, 1).await;
    converges_to(&central, &db, &id, &renamed, &log).await;
    assert_eq!(conflicts(&state).await, Vec::<Value>::new());
    assert_eq!(dead_letters(&state).await, Vec::<Value>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_and_a_moved_table_keep_flowing_on_the_embedded_bus() {
    a_renamed_and_a_moved_table_keep_flowing_under_their_mappings(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_and_a_moved_table_keep_flowing_on_kafka() {
    a_renamed_and_a_moved_table_keep_flowing_under_their_mappings(true).await;
}

/// An update that leaves a TOASTed column alone, then a rename, in one transaction: the
/// change names the old table, which is gone when its value is read back. Then a column a
/// queued change still lacks is dropped. Before, the first read failed without end
/// (`UnknownTable`) and the warehouse's consumer stopped for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_of_a_renamed_table_is_read_by_its_oid_and_a_dropped_column_is_a_dead_letter()
 {
    let db = demo_warehouse("opstoast").await;
    wide_products(&db, 1, 12).await;
    let state = pg().new_db("opstoaststate").await;
    let central = Central::start(Faults::default()).await;
    let id = "wh-opstoast";
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &db, id, "");
    let log = dir.path().join("run.log");
    let _run = start(run_command(&cfg, &state, &central, None), log.clone());
    wait_streaming(&state, id, &log).await;
    db.exec(
        "BEGIN; UPDATE products SET name = name || ' v2'; ALTER TABLE products RENAME TO goods; COMMIT;",
    )
    .await;
    db.exec("UPDATE goods SET unit_price = 3.25 WHERE sku IN ('SKU-2', 'SKU-3')")
        .await;
    let renamed = expected_query("goods", "locations", "stock_levels");
    converges_to(&central, &db, id, &renamed, &log).await;
    let blob = central.state(id).await["product {\"sku\":\"SKU-7\"}"]["attributes"]["blob"]
        .as_str()
        .map(str::len);
    assert_eq!(
        blob,
        Some(120 * 32),
        "the TOASTed value reached central whole"
    );
    assert_eq!(dead_letters(&state).await, Vec::<Value>::new());

    // The column goes in the transaction of an update that left it alone: its value can
    // never be read back. That change is a dead letter with the reason; the rest flows.
    db.exec(
        "BEGIN; UPDATE goods SET name = 'before the drop' WHERE sku = 'SKU-4';
         ALTER TABLE goods DROP COLUMN attributes; COMMIT;",
    )
    .await;
    db.exec("INSERT INTO locations VALUES ('AFTER', 'after the drop')")
        .await;
    let mut letters = Vec::new();
    for _ in 0..300 {
        letters = dead_letters(&state).await;
        let arrived = central
            .state(id)
            .await
            .contains_key("location {\"code\":\"AFTER\"}");
        if arrived && !letters.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(letters.len(), 1, "{letters:?}\n{}", log_tail(&log));
    assert_eq!(letters[0]["rule"], "unchanged_toast", "{letters:?}");
    assert_eq!(letters[0]["event"]["after"]["sku"], "SKU-4", "{letters:?}");
    let reason = letters[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("attributes"), "{reason}");
    assert!(
        central
            .state(id)
            .await
            .contains_key("location {\"code\":\"AFTER\"}"),
        "the warehouse's changes stopped behind the change that cannot be filled:\n{}",
        log_tail(&log)
    );
    let c = conflicts(&state).await;
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(c[0]["kind"], "invalid", "{c:?}");
    assert_eq!(c[0]["dead_lettered"], true, "{c:?}");
}

/// Chunk queries carry the last key of the previous chunk as a literal. A key holding `\'`
/// broke out of a plain `'…'` literal on a server where `standard_conforming_strings` is
/// off, and the initial load failed there. The 1,000th key (a chunk's last) holds one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_holding_a_backslash_and_a_quote_ends_a_chunk_with_standard_conforming_strings_off() {
    let db = demo_warehouse("opsesc").await;
    db.exec(&format!(
        "ALTER DATABASE {} SET standard_conforming_strings = off",
        db.name
    ))
    .await;
    db.exec(
        "INSERT INTO products (sku, name)
           SELECT 'SKU-' || lpad(i::text, 4, '0'), 'p' || i FROM generate_series(1, 999) i;
         INSERT INTO products (sku, name) VALUES (E'SKU-0999\\\\''', E'quote \\\\'' and backslash'), ('SKU-1000', 'after');",
    )
    .await;
    let tricky: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM products WHERE sku = E'SKU-0999\\\\'''",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tricky, 1);
    let state = pg().new_db("opsescstate").await;
    let central = Central::start(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &db, "wh-opsesc", "");
    let log = dir.path().join("run.log");
    let _run = start(run_command(&cfg, &state, &central, None), log.clone());
    wait_streaming(&state, "wh-opsesc", &log).await;
    db.exec("UPDATE products SET name = 'streamed' WHERE sku = 'SKU-1000'")
        .await;
    assert_converges(&central, &db, "wh-opsesc", &log).await;
    assert_eq!(central.state("wh-opsesc").await.len(), 1000 + 1);
}

/// A mapping for `public.bins` (locations by another name; codes `BIN-…`).
const BINS_MAPPING: &str = "[[mappings]]\ntable = 'public.bins'\nentity = 'location'\nkey = { code = 'code' }\ndata = { zone = 'zone' }\n";

/// The demo tables plus `bins`, as central should hold them.
fn with_bins() -> String {
    format!(
        "{} UNION ALL SELECT 'location', json_build_object('code', code)::text,
                json_build_object('zone', zone)::text FROM bins",
        expected_query("products", "locations", "stock_levels")
    )
}

/// The load jobs of warehouse `id` with the tables each read: (status, tables).
async fn loads(state: &TestDb, id: &str) -> Vec<(String, Option<Vec<String>>)> {
    state
        .client
        .query(
            "SELECT j.status, j.tables FROM sync_jobs j JOIN sync_job_warehouses w ON w.job_id = j.id
              WHERE j.kind = 'load' AND w.warehouse_id = $1 ORDER BY j.seq",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// `ALTER PUBLICATION … ADD TABLE` while `run` streams: the table's existing rows reach
/// central through a load of that table alone (they never did: only a new slot was loaded).
/// Then a mapping is added, across a restart, for a table published all along: its rows are
/// loaded too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_to_the_publication_and_a_new_mapping_are_loaded_while_streaming() {
    let db = demo_warehouse("opsadd").await;
    workload(&db.client, 21, 30).await;
    db.exec(
        "CREATE TABLE bins (code text PRIMARY KEY, zone text NOT NULL);
         INSERT INTO bins SELECT 'BIN-' || i, 'bin zone ' || i FROM generate_series(1, 2500) i;",
    )
    .await;
    let state = pg().new_db("opsaddstate").await;
    let central = Central::start(Faults::default()).await;
    let id = "wh-opsadd";
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &db, id, BINS_MAPPING);
    let log = dir.path().join("run.log");
    let run = start(run_command(&cfg, &state, &central, None), log.clone());
    wait_streaming(&state, id, &log).await;
    assert_converges(&central, &db, id, &log).await;
    db.exec("ALTER PUBLICATION inventorysync ADD TABLE bins")
        .await;
    // Streamed changes of the table race its load: neither undoes the other.
    db.exec("UPDATE bins SET zone = 'streamed' WHERE code IN ('BIN-1', 'BIN-2000'); DELETE FROM bins WHERE code = 'BIN-3';")
        .await;
    workload(&db.client, 22, 30).await;
    converges_to(&central, &db, id, &with_bins(), &log).await;
    let jobs = loads(&state, id).await;
    assert_eq!(
        jobs.last(),
        Some(&(
            "succeeded".to_string(),
            Some(vec!["public.bins".to_string()])
        )),
        "{jobs:?}"
    );

    // A table published from the start but mapped only now (the configuration changes
    // across a restart).
    drop::<Run>(run);
    db.exec(
        "CREATE TABLE shelves (code text PRIMARY KEY, zone text NOT NULL);
         INSERT INTO shelves SELECT 'SHELF-' || i, 'shelf ' || i FROM generate_series(1, 1500) i;
         ALTER PUBLICATION inventorysync ADD TABLE shelves;",
    )
    .await;
    let log = dir.path().join("run2.log");
    let _run = start(run_command(&cfg, &state, &central, None), log.clone());
    // Unmapped, the table is noted, not loaded (nothing of it reaches central): the first
    // check comes as soon as the warehouse streams.
    wait_streaming(&state, id, &log).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        loads(&state, id).await.len(),
        jobs.len(),
        "{:?}",
        loads(&state, id).await
    );
    drop::<Run>(_run);
    let cfg = config(
        dir.path(),
        &db,
        id,
        &format!(
            "{BINS_MAPPING}\n[[mappings]]\ntable = 'public.shelves'\nentity = 'location'\nkey = {{ code = 'code' }}\ndata = {{ zone = 'zone' }}\n"
        ),
    );
    let log = dir.path().join("run3.log");
    let _run = start(run_command(&cfg, &state, &central, None), log.clone());
    let shelves = format!(
        "{} UNION ALL SELECT 'location', json_build_object('code', code)::text,
                json_build_object('zone', zone)::text FROM shelves",
        with_bins()
    );
    converges_to(&central, &db, id, &shelves, &log).await;
    assert_eq!(conflicts(&state).await, Vec::<Value>::new());
    assert_eq!(dead_letters(&state).await, Vec::<Value>::new());
}

/// A table dropped while the initial load reads it: the job records it as skipped, with the
/// reason, and loads the tables after it (it failed whole, and the later tables in name
/// order were never read; a sync cycle then succeeded all the same).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_dropped_while_the_load_reads_it_is_skipped_and_the_load_goes_on() {
    let db = demo_warehouse("opsdrop").await;
    workload(&db.client, 31, 40).await;
    db.exec(
        "CREATE TABLE aaa_big (code text PRIMARY KEY, zone text NOT NULL);
         INSERT INTO aaa_big SELECT 'BIG-' || lpad(i::text, 6, '0'), 'big ' || i FROM generate_series(1, 60000) i;
         ALTER PUBLICATION inventorysync ADD TABLE aaa_big;",
    )
    .await;
    let state = pg().new_db("opsdropstate").await;
    // Slow answers: the load of aaa_big (60 chunks) is still going when it is dropped.
    let central = Central::start(Faults {
        latency_ms: 150,
        ..Faults::default()
    })
    .await;
    let id = "wh-opsdrop";
    let dir = tempfile::tempdir().unwrap();
    let mapping = "[[mappings]]\ntable = 'public.aaa_big'\nentity = 'location'\nkey = { code = 'code' }\ndata = { zone = 'zone' }\n";
    let cfg = config(dir.path(), &db, id, mapping);
    let log = dir.path().join("run.log");
    let _run = start(run_command(&cfg, &state, &central, None), log.clone());
    let mut chunks = 0i64;
    for _ in 0..600 {
        chunks = state
            .client
            .query_one(
                "SELECT coalesce(max(chunks), 0) FROM sync_resync_progress WHERE table_name = 'public.aaa_big'",
                &[],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if chunks >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(chunks >= 2, "the load never got going:\n{}", log_tail(&log));
    db.exec("DROP TABLE aaa_big").await;
    central.set_faults(Faults::default()).await;
    wait_streaming(&state, id, &log).await;
    let jobs = loads(&state, id).await;
    assert_eq!(jobs[0].0, "succeeded", "{jobs:?}");
    let skipped: Vec<(String, String)> = state
        .client
        .query(
            "SELECT table_name, skipped FROM sync_resync_progress WHERE skipped IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0].0, "public.aaa_big");
    assert!(skipped[0].1.contains("not in publication"), "{skipped:?}");
    // The tables after it were read: central equals the warehouse but for the dropped
    // table's rows it got before the drop.
    let demo = expected_query("products", "locations", "stock_levels");
    converges_but(&central, &db, id, &demo, &["BIG-"], &log).await;
}

/// A gateway in front of central answers 400 to every request for 20 s while 6,000 changes
/// are written. That is an outage, not 6,000 bad changes: delivery pauses (and `/ready` says
/// why), probes, and resumes by itself; at most 1 % of the changes are dead-lettered (it was
/// every change: each batch was bisected to single changes, and each dead-lettered), and
/// central converges with no manual replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_central_refusing_every_request_for_20_s_is_an_outage_not_a_flood_of_dead_letters() {
    let db = demo_warehouse("opsrefuse").await;
    workload(&db.client, 41, 30).await;
    let state = pg().new_db("opsrefusestate").await;
    let central = Central::start(Faults::default()).await;
    let id = "wh-opsrefuse";
    let (_dir, log, _run, api, _) = crate::api::start_with_api(&db, &state, &central, id, None);
    wait_streaming(&state, id, &log).await;
    let refusing = Faults {
        error_rate: 1.0,
        error_status: Some(400),
        ..Faults::default()
    };
    central.set_faults(refusing).await;
    let started = std::time::Instant::now();
    // 6,000 changes in 60 transactions over about 15 s: inserts, then updates of the rows.
    for t in 0..60 {
        let sql = if t < 30 {
            format!(
                "INSERT INTO products (sku, name, unit_price) SELECT 'GW-' || ({t} * 100 + i), 'gw ' || i, 1.50 FROM generate_series(1, 100) i"
            )
        } else {
            format!(
                "UPDATE products SET unit_price = unit_price + 1 WHERE sku IN (SELECT 'GW-' || (({t} - 30) * 100 + i) FROM generate_series(1, 100) i)"
            )
        };
        db.exec(&sql).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (code, _, ready) = api.get("/ready", None).await;
    assert_eq!(code, 503, "{ready}");
    let problems = ready["problems"].to_string();
    assert!(
        problems.contains("central refuses every request"),
        "{ready}"
    );
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(started.elapsed())).await;
    central.set_faults(Faults::default()).await;
    assert_converges(&central, &db, id, &log).await;
    let letters = dead_letters(&state).await;
    assert!(
        letters.len() <= 60,
        "{} of 6,000 changes dead-lettered: {:?}",
        letters.len(),
        &letters[..letters.len().min(3)]
    );
    let (code, _, ready) = api.get("/ready", None).await;
    assert_eq!(code, 200, "delivery resumed by itself: {ready}");
}

/// A slot still held by another walsender (a previous owner's, which lives on up to
/// `wal_sender_timeout` after that owner died or was fenced): the process that holds the
/// warehouse's lease ends it and streams. It was a definite error: after its 10 s of
/// waiting, the warehouse stopped (`Failed`) until someone restarted the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_held_by_a_lingering_walsender_is_taken_over_by_the_lease_holder() {
    let db = demo_warehouse("opsbusy").await;
    workload(&db.client, 51, 20).await;
    let mut o = db.options("run", "inventorysync");
    o.create_slot = true;
    db.drain_now(o).await;
    // Another session holds the slot, as a lingering walsender does.
    // It does not come back once ended, as a walsender whose client is gone.
    let mut holder_opts = db.options("run", "inventorysync");
    holder_opts.max_reconnects = Some(0);
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let (_dtx, drx) = tokio::sync::watch::channel(inventorysync::Lsn::ZERO);
    let hold = tokio_util::sync::CancellationToken::new();
    let holder = {
        let hold = hold.clone();
        tokio::spawn(async move {
            inventorysync::source::stream::run(&holder_opts, tx, drx, hold).await
        })
    };
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    for _ in 0..100 {
        let active: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&db.slot("run")],
            )
            .await
            .unwrap()
            .get(0);
        if active == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let state = pg().new_db("opsbusystate").await;
    let central = Central::start(Faults::default()).await;
    let id = "wh-opsbusy";
    let (_dir, log, _run, _api, _) = crate::api::start_with_api(&db, &state, &central, id, None);
    wait_streaming(&state, id, &log).await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("a previous owner's walsender still held its slot: terminated"),
        "{}",
        log_tail(&log)
    );
    // The holder was ended (its connection terminated), not stopped by the test.
    let ended = tokio::time::timeout(Duration::from_secs(30), holder).await;
    assert!(
        matches!(ended, Ok(Ok(Err(_)))),
        "the holder's stream ended with an error"
    );
    assert!(!hold.is_cancelled());
    workload(&db.client, 52, 30).await;
    assert_converges(&central, &db, id, &log).await;
}

/// A table without a primary key is loaded in chunks by row position while it is written,
/// not read whole in one query held in memory (a big log table made the load time out and
/// start again, for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_table_is_loaded_in_chunks_while_it_is_written() {
    let db = demo_warehouse("opskeyless").await;
    db.exec(
        "CREATE TABLE movements (code text NOT NULL, zone text NOT NULL);
         ALTER TABLE movements REPLICA IDENTITY FULL;
         INSERT INTO movements SELECT 'MV-' || i, 'mv ' || i FROM generate_series(1, 4500) i;
         ALTER PUBLICATION inventorysync ADD TABLE movements;",
    )
    .await;
    let state = pg().new_db("opskeylessstate").await;
    let central = Central::start(Faults::default()).await;
    let id = "wh-opskeyless";
    let dir = tempfile::tempdir().unwrap();
    let mapping = "[[mappings]]\ntable = 'public.movements'\nentity = 'location'\nkey = { code = 'code' }\ndata = { zone = 'zone' }\n";
    let cfg = config(dir.path(), &db, id, mapping);
    let log = dir.path().join("run.log");
    let _run = start(run_command(&cfg, &state, &central, None), log.clone());
    // Updates (which move rows to new positions) and deletes race the load.
    for round in 0..40 {
        db.exec(&format!(
            "UPDATE movements SET zone = 'moved {round}' WHERE code IN (SELECT 'MV-' || (i * 97 + {round}) % 4500 FROM generate_series(1, 40) i);
             DELETE FROM movements WHERE code = 'MV-{}';",
            round * 101 + 7
        ))
        .await;
        if crate::consumer::load_delivered(&state, id).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_streaming(&state, id, &log).await;
    let query = format!(
        "{} UNION ALL SELECT 'location', json_build_object('code', code)::text,
                json_build_object('zone', zone)::text FROM movements",
        expected_query("products", "locations", "stock_levels")
    );
    converges_to(&central, &db, id, &query, &log).await;
    let chunks: i64 = state
        .client
        .query_one(
            "SELECT chunks FROM sync_resync_progress WHERE table_name = 'public.movements'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(chunks >= 3, "read in {chunks} chunk(s)");
}

/// The stock levels' key field `location` renamed `site` across a kill -9 taken while
/// central was slow, so that changes were unsettled: central's keys for stock levels are
/// new, each key may sit in another lane, and the lane positions stored under the old
/// mapping are forgotten (the lane is a function of the entity and central's key, so only
/// changed keys move). What was replayed reaches central under the new keys, the table is
/// loaded again, and central holds the warehouse's stock under the new keys (the old keys
/// stay at central: the contract has no way to list them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_renamed_across_a_kill_with_changes_unsettled_reaches_central_under_the_new_keys() {
    let db = demo_warehouse("opskey").await;
    workload(&db.client, 31, 40).await;
    let state = pg().new_db("opskeystate").await;
    let central = Central::start(Faults::default()).await;
    let id = "wh-opskey";
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &db, id, "");
    let log = dir.path().join("run.log");
    let run = start(run_command(&cfg, &state, &central, None), log.clone());
    wait_streaming(&state, id, &log).await;
    assert_converges(&central, &db, id, &log).await;

    // Slow answers, and a kill while changes are in the air or waiting for their outcome.
    central
        .set_faults(Faults {
            latency_ms: 1500,
            ..Faults::default()
        })
        .await;
    workload(&db.client, 32, 80).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    drop::<Run>(run);
    central.set_faults(Faults::default()).await;
    // Central lacked changes at the kill: they are replayed under the new mapping.
    assert_ne!(
        central.state(id).await,
        expected_from(
            &db,
            &expected_query("products", "locations", "stock_levels")
        )
        .await,
        "changes were unsettled at the kill"
    );

    let old_key = r#"key = { sku = "sku", location = "location_code" }"#;
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains(old_key));
    std::fs::write(
        &cfg,
        text.replace(old_key, r#"key = { sku = "sku", site = "location_code" }"#),
    )
    .unwrap();
    let log = dir.path().join("run2.log");
    let _run = start(run_command(&cfg, &state, &central, None), log.clone());
    workload(&db.client, 33, 40).await;
    let expected = expected_query("products", "locations", "stock_levels").replace(
        "json_build_object('sku', sku, 'location', location_code)",
        "json_build_object('sku', sku, 'site', location_code)",
    );
    converges_but(&central, &db, id, &expected, &["\"location\":"], &log).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("a mapping changed since the last run"),
        "{}",
        log_tail(&log)
    );
    assert_eq!(conflicts(&state).await, Vec::<Value>::new());
    assert_eq!(dead_letters(&state).await, Vec::<Value>::new());
}
