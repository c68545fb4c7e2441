//! Verify jobs (`POST /sync/verify`, issue 41): drift planted at central while a workload
//! streams is found exactly (streamed changes that race the verify are not findings), each
//! kind named; a repair makes central equal field by field; a central without the listing is
//! reported as not checkable, never as "no drift".

use std::time::Duration;

use inventorysync::central::server::Faults;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::api::{Api, seed_stock, start_with_api};
use crate::consumer::{Central, assert_converges, conflicts, demo_warehouse, log_tail};
use crate::harness::{TestDb, pg};

/// Keeps changing stock levels, products and locations of SKU-1 to SKU-150 (updates, deletes,
/// inserts) until `stop`; returns how many rounds it made. Rows of SKU-200 and above are left
/// alone: drift is planted there.
fn workload(db: &TestDb, stop: CancellationToken) -> tokio::task::JoinHandle<u64> {
    let url = db.url_as("postgres");
    tokio::spawn(async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut n: u64 = 0;
        while !stop.is_cancelled() {
            n += 1;
            client
                .batch_execute(&format!(
                    "UPDATE stock_levels SET qty_on_hand = qty_on_hand + 1 WHERE sku = 'SKU-{a}';
                     DELETE FROM stock_levels WHERE sku = 'SKU-{b}' AND location_code = 'L-{l}';
                     INSERT INTO stock_levels (sku, location_code, qty_on_hand)
                       VALUES ('SKU-{c}', 'L-{m}', {q}) ON CONFLICT DO NOTHING;
                     UPDATE products SET name = 'product {a} round {n}' WHERE sku = 'SKU-{a}';",
                    a = 1 + n % 150,
                    b = 1 + (n * 7) % 150,
                    l = 1 + n % 10,
                    c = 1 + (n * 11) % 150,
                    m = 1 + (n * 3) % 10,
                    q = n % 50,
                ))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        n
    })
}

/// `inventorysync verify --warehouse W ARGS` with the test's configuration: exit code, stdout
/// and stderr.
fn cli_verify(
    dir: &std::path::Path,
    state: &TestDb,
    central: &Central,
    wh: &str,
    args: &[&str],
) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_inventorysync"))
        .arg("--config")
        .arg(dir.join("inventorysync.toml"))
        .args(["verify", "--warehouse", wh])
        .args(args)
        .env("DB_URL", state.url_as("postgres"))
        .env("WAREHOUSE_API_ENDPOINT", central.endpoint())
        .env("INVENTORYSYNC_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Queues a verify with `body`; returns the finished job.
async fn verify(api: &Api, body: &str, log: &std::path::Path) -> Value {
    let (status, v) = api.post("/sync/verify", body).await;
    assert_eq!(status, 202, "{v}");
    let id = v["jobId"].as_str().unwrap().to_string();
    api.finished(&id, log).await
}

/// The one warehouse's verify report of `job`.
fn report(job: &Value) -> &Value {
    &job["warehouses"][0]["verify"]
}

/// Central's row of stock level (`sku`, `location`): (version, data).
async fn central_row(
    central: &Central,
    warehouse: &str,
    sku: &str,
    location: &str,
) -> (String, Value) {
    let key = format!("stock_level {}", json!({"location": location, "sku": sku}));
    let all = central.versions(warehouse).await;
    all.get(&key)
        .cloned()
        .unwrap_or_else(|| panic!("central has no {key}; it has e.g. {:?}", all.keys().next()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_exactly_the_drift_planted_while_a_workload_streams_and_repair_makes_central_equal()
 {
    let db = demo_warehouse("verify").await;
    seed_stock(&db, 300, 10).await;
    let state = pg().new_db("verifystate").await;
    let central = Central::start(Faults::default()).await;
    let wh = "wh-verify";
    let (dir, log, _run, api, _) = start_with_api(&db, &state, &central, wh, None);
    assert_converges(&central, &db, wh, &log).await;

    // Bad input: a table no mapping names, a repair that is not a boolean.
    let (status, v) = api
        .post("/sync/verify", r#"{"tables": ["public.nowhere"]}"#)
        .await;
    assert_eq!(status, 422, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("\"public.nowhere\" is not mapped"),
        "{v}"
    );
    let (status, v) = api.post("/sync/verify", r#"{"repair": "yes"}"#).await;
    assert_eq!(status, 400, "{v}");

    let stop = CancellationToken::new();
    let writer = workload(&db, stop.clone());

    // With nothing planted, a verify under the workload finds nothing: the changes that race
    // it are the stream's, not drift.
    let job = verify(&api, "", &log).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", log_tail(&log));
    assert_eq!(job["kind"], "verify");
    let r = report(&job);
    assert_eq!(r["verdict"], "equal", "{job}");
    assert!(r["compared"].as_u64().unwrap() >= 3000, "{r}");
    eprintln!("clean verify under the workload: {r}");

    // A change of a row after that verify (its xid is above the position the verify
    // recorded), delivered; then central is set back to an old version of it.
    db.exec(
        "UPDATE stock_levels SET qty_on_hand = 41 WHERE sku = 'SKU-252' AND location_code = 'L-3'",
    )
    .await;
    let mut delivered = false;
    for _ in 0..200 {
        if central_row(&central, wh, "SKU-252", "L-3").await.1["on_hand"] == 41 {
            delivered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(delivered, "{}", log_tail(&log));

    // The drift: one row of each kind.
    central
        .plant(
            wh,
            "stock_level",
            json!({"sku": "SKU-250", "location": "L-1"}),
            None,
            None,
        )
        .await;
    central
        .plant(
            wh,
            "stock_level",
            json!({"sku": "SKU-GHOST", "location": "L-1"}),
            Some("0000000000000001:00000000"),
            Some(json!({"on_hand": 1, "reserved": 0, "available": 1})),
        )
        .await;
    let (_, mut edited) = central_row(&central, wh, "SKU-251", "L-2").await;
    edited["on_hand"] = json!(999_999);
    central
        .plant(
            wh,
            "stock_level",
            json!({"sku": "SKU-251", "location": "L-2"}),
            None,
            Some(edited),
        )
        .await;
    let (_, same) = central_row(&central, wh, "SKU-252", "L-3").await;
    central
        .plant(
            wh,
            "stock_level",
            json!({"sku": "SKU-252", "location": "L-3"}),
            Some("0000000000000001:00000000"),
            Some(same),
        )
        .await;

    // Read-only: exactly the planted rows, each of its kind.
    let job = verify(&api, "", &log).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", log_tail(&log));
    let r = report(&job);
    assert_eq!(r["verdict"], "drift", "{job}");
    assert_eq!(
        r["findings"],
        json!({"differs": 1, "missing_at_central": 1, "older_at_central": 1, "only_at_central": 1}),
        "{job}"
    );
    eprintln!("verify with planted drift under the workload: {r}");
    let drift: Vec<Value> = conflicts(&state)
        .await
        .into_iter()
        .filter(|c| c["kind"] == "drift")
        .collect();
    let mut found: Vec<(String, String)> = drift
        .iter()
        .map(|c| {
            (
                c["rule"].as_str().unwrap().to_string(),
                c["entity_key"]["sku"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    found.sort();
    assert_eq!(
        found,
        vec![
            ("differs".to_string(), "SKU-251".to_string()),
            ("missing_at_central".into(), "SKU-250".into()),
            ("older_at_central".into(), "SKU-252".into()),
            ("only_at_central".into(), "SKU-GHOST".into()),
        ],
        "{drift:#?}"
    );
    let differs = drift.iter().find(|c| c["rule"] == "differs").unwrap();
    assert!(
        differs["reason"]
            .as_str()
            .unwrap()
            .contains("differs in on_hand"),
        "{differs}"
    );
    assert!(drift.iter().all(|c| c["status"] == "open"), "{drift:#?}");
    // The same from the command line, for ops without the API: exit code 3, the findings.
    let (code, out, err) = cli_verify(dir.path(), &state, &central, wh, &[]);
    assert_eq!(code, 3, "{out}\n{err}");
    assert!(out.contains("\"verdict\": \"drift\""), "{out}");
    for kind in [
        "missing_at_central",
        "only_at_central",
        "differs",
        "older_at_central",
    ] {
        assert!(
            out.contains("open #") && out.contains(kind),
            "{kind}: {out}"
        );
    }
    let (code, out, err) = cli_verify(
        dir.path(),
        &state,
        &central,
        wh,
        &["--table", "public.nowhere"],
    );
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        err.contains("table \"public.nowhere\" is not mapped"),
        "{err}"
    );

    // Repair, with the workload still going.
    let job = verify(&api, r#"{"repair": true}"#, &log).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", log_tail(&log));
    let r = report(&job);
    assert_eq!(r["verdict"], "repaired", "{job}");
    assert_eq!(r["repaired"], 4, "{job}");
    let drift: Vec<Value> = conflicts(&state)
        .await
        .into_iter()
        .filter(|c| c["kind"] == "drift")
        .collect();
    assert_eq!(drift.len(), 4, "{drift:#?}");
    for c in &drift {
        assert_eq!(c["status"], "resolved", "{c}");
        assert_eq!(c["resolved_by"], "inventorysync", "{c}");
        assert!(
            c["resolution_note"]
                .as_str()
                .unwrap()
                .starts_with("repaired by verify job"),
            "{c}"
        );
    }
    stop.cancel();
    let rounds = writer.await.unwrap();
    assert!(rounds > 10, "{rounds}");
    // Central equals the warehouse field by field, the workload's changes included (no repair
    // undid one).
    assert_converges(&central, &db, wh, &log).await;

    // A sync cycle with verify succeeds now, and fails once central drifts again.
    let id = api.trigger(r#"{"verify": true}"#).await;
    let job = api.finished(&id, &log).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", log_tail(&log));
    assert_eq!(report(&job)["verdict"], "equal", "{job}");
    let (_, mut edited) = central_row(&central, wh, "SKU-260", "L-4").await;
    edited["reserved"] = json!(7);
    central
        .plant(
            wh,
            "stock_level",
            json!({"sku": "SKU-260", "location": "L-4"}),
            None,
            Some(edited),
        )
        .await;
    let id = api.trigger(r#"{"verify": true}"#).await;
    let job = api.finished(&id, &log).await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains("central differs from warehouse wh-verify: 1 finding(s) (differs 1)"),
        "{job}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_against_a_central_without_the_listing_says_it_cannot_check_and_never_no_drift() {
    let db = demo_warehouse("verifynolist").await;
    seed_stock(&db, 20, 3).await;
    let state = pg().new_db("verifynoliststate").await;
    let central = Central::start(Faults {
        no_listing: true,
        ..Faults::default()
    })
    .await;
    let wh = "wh-nolist";
    let (dir, log, _run, api, _) = start_with_api(&db, &state, &central, wh, None);
    assert_converges(&central, &db, wh, &log).await;
    let (code, out, err) = cli_verify(dir.path(), &state, &central, wh, &[]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("does not list its entities"), "{err}");
    assert!(out.contains("\"verdict\": \"incomplete\""), "{out}");
    for body in ["", r#"{"repair": true}"#] {
        let job = verify(&api, body, &log).await;
        assert_eq!(job["status"], "failed", "{job}");
        let error = job["error"].as_str().unwrap();
        assert!(error.contains("could not check"), "{job}");
        assert!(error.contains("does not list its entities"), "{job}");
        let r = report(&job);
        assert_eq!(r["verdict"], "incomplete", "{job}");
        assert_eq!(r["unchecked"].as_array().unwrap().len(), 3, "{job}");
        assert_eq!(r["findings"], json!({}), "{job}");
    }
    let id = api.trigger(r#"{"verify": true}"#).await;
    let job = api.finished(&id, &log).await;
    assert_eq!(job["status"], "failed", "{job}");
    // No finding was made up.
    assert!(
        conflicts(&state).await.iter().all(|c| c["kind"] != "drift"),
        "{:?}",
        conflicts(&state).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_names_the_changes_that_ended_as_dead_letters_and_a_cycle_with_verify_fails_on_them()
 {
    let db = demo_warehouse("verifydead").await;
    seed_stock(&db, 20, 3).await;
    let state = pg().new_db("verifydeadstate").await;
    // Central refuses every change of SKU-2 and SKU-20: they are dead-lettered.
    let central = Central::start(Faults {
        reject_key_substring: Some("SKU-2".into()),
        ..Faults::default()
    })
    .await;
    let wh = "wh-dead";
    let (_dir, log, _run, api, _) = start_with_api(&db, &state, &central, wh, None);
    // Up once the load's rows went through (all but the refused ones).
    crate::consumer::converges_except(&central, &db, wh, &["SKU-2"], &log).await;
    let id = api.trigger("").await;
    let job = api.finished(&id, &log).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", log_tail(&log));
    let w = &job["warehouses"][0];
    // 2 products and 6 stock levels never reached central, and the cycle says so.
    assert_eq!(w["unappliedDeadLetters"], 8, "{job}");
    assert_eq!(w["unappliedConflicts"], 8, "{job}");
    let id = api.trigger(r#"{"verify": true}"#).await;
    let job = api.finished(&id, &log).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(
        report(&job)["findings"],
        json!({"missing_at_central": 8}),
        "{job}"
    );
    assert!(
        job["error"]
            .as_str()
            .unwrap()
            .contains("central differs from warehouse wh-dead: 8 finding(s)"),
        "{job}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_after_a_lost_slot_ends_with_a_verify_that_deletes_rows_deleted_meanwhile() {
    let db = demo_warehouse("verifylost").await;
    seed_stock(&db, 30, 4).await;
    let state = pg().new_db("verifyloststate").await;
    let central = Central::start(Faults::default()).await;
    let wh = "wh-lost";
    let (_dir, log, mut run, _api, mut again) = start_with_api(&db, &state, &central, wh, None);
    assert_converges(&central, &db, wh, &log).await;
    // The process is gone and so is its slot; meanwhile rows are deleted, changed and added.
    run.child.kill().unwrap();
    run.child.wait().unwrap();
    db.drop_slot_when_free(&db.slot("run")).await;
    db.exec(
        "DELETE FROM stock_levels WHERE sku IN ('SKU-3', 'SKU-4');
         UPDATE stock_levels SET qty_on_hand = 33 WHERE sku = 'SKU-5';
         INSERT INTO products (sku, name) VALUES ('SKU-NEW', 'new');",
    )
    .await;
    let _restarted = crate::consumer::Run {
        child: again
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::OpenOptions::new().append(true).open(&log).unwrap())
            .spawn()
            .unwrap(),
    };
    // The load re-sends every row; the verify that follows deletes the 8 stock levels.
    assert_converges(&central, &db, wh, &log).await;
    let mut jobs = Vec::new();
    for _ in 0..300 {
        jobs = crate::consumer::json_rows(
            &state,
            "SELECT j.kind, j.status, j.options, w.verify FROM sync_jobs j
               JOIN sync_job_warehouses w ON w.job_id = j.id ORDER BY j.seq",
        )
        .await;
        if jobs
            .iter()
            .any(|j| j["kind"] == "verify" && j["status"] != "running" && j["status"] != "queued")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let verify = jobs
        .iter()
        .find(|j| j["kind"] == "verify")
        .unwrap_or_else(|| panic!("no verify job: {jobs:#?}\n{}", log_tail(&log)));
    assert_eq!(verify["status"], "succeeded", "{jobs:#?}");
    assert_eq!(verify["options"]["repair"], true, "{jobs:#?}");
    assert_eq!(verify["verify"]["verdict"], "repaired", "{jobs:#?}");
    assert_eq!(
        verify["verify"]["findings"],
        json!({"only_at_central": 8}),
        "{jobs:#?}"
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("a verify-and-repair follows"),
        "{}",
        log_tail(&log)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_verify_runs_by_itself_read_only_and_at_its_pace() {
    let db = demo_warehouse("verifysched").await;
    seed_stock(&db, 300, 10).await;
    let state = pg().new_db("verifyschedstate").await;
    let central = Central::start(Faults::default()).await;
    let wh = "wh-sched";
    let dir = tempfile::tempdir().unwrap();
    let cfg = crate::consumer::config(
        dir.path(),
        &db,
        wh,
        "[verify]\nevery = \"4s\"\nmax_rows_per_second = 1500\n",
    );
    let log = dir.path().join("run.log");
    let _run = crate::consumer::start(
        crate::consumer::run_command(&cfg, &state, &central, None),
        log.clone(),
    );
    assert_converges(&central, &db, wh, &log).await;
    // Drift that a read-only verify reports and leaves alone.
    central
        .plant(
            wh,
            "stock_level",
            json!({"sku": "SKU-7", "location": "L-7"}),
            None,
            None,
        )
        .await;
    let mut jobs = Vec::new();
    for _ in 0..400 {
        jobs = crate::consumer::json_rows(
            &state,
            "SELECT j.status, j.options, w.verify,
                    extract(epoch FROM j.finished_at - j.started_at)::float8 AS took
               FROM sync_jobs j JOIN sync_job_warehouses w ON w.job_id = j.id
              WHERE j.kind = 'verify' ORDER BY j.seq",
        )
        .await;
        if jobs
            .iter()
            .filter(|j| {
                j["status"] == "succeeded" && j["verify"]["findings"]["missing_at_central"] == 1
            })
            .count()
            >= 2
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done: Vec<&Value> = jobs
        .iter()
        .filter(|j| {
            j["status"] == "succeeded" && j["verify"]["findings"]["missing_at_central"] == 1
        })
        .collect();
    assert!(done.len() >= 2, "{jobs:#?}\n{}", log_tail(&log));
    for j in &done {
        assert_eq!(j["options"]["scheduled"], true, "{j}");
        assert_eq!(j["options"]["repair"], false, "{j}");
        assert_eq!(j["options"]["max_rows_per_second"], 1500, "{j}");
        assert_eq!(j["verify"]["verdict"], "drift", "{j}");
        // 3,310 rows at 1,500 a second take two seconds at least.
        assert!(j["took"].as_f64().unwrap() >= 2.0, "{j}");
    }
    // Read-only: central still lacks the row.
    assert!(!central.versions(wh).await.contains_key(&format!(
        "stock_level {}",
        json!({"location": "L-7", "sku": "SKU-7"})
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verify_through_kafka_waits_for_the_consumer_group_before_it_compares() {
    let db = demo_warehouse("verifykafka").await;
    seed_stock(&db, 50, 4).await;
    let state = pg().new_db("verifykafkastate").await;
    // Central answers slowly: what is published is delivered long after.
    let central = Central::start(Faults::default()).await;
    let wh = "wh-kverify";
    let topic = format!("it.{}", db.name);
    let (_dir, log, _run, api, _) = start_with_api(&db, &state, &central, wh, Some(&topic));
    assert_converges(&central, &db, wh, &log).await;
    central
        .set_faults(Faults {
            latency_ms: 300,
            ..Faults::default()
        })
        .await;
    // Changes committed just before the verify are still on the topic when it starts: they
    // must reach central before it compares, or they would be findings.
    db.exec("UPDATE stock_levels SET qty_on_hand = qty_on_hand + 5 WHERE sku IN ('SKU-1', 'SKU-2', 'SKU-3')")
        .await;
    let id = api.trigger(r#"{"verify": true}"#).await;
    let job = api.finished(&id, &log).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", log_tail(&log));
    assert_eq!(report(&job)["verdict"], "equal", "{job}");
    central.set_faults(Faults::default()).await;
    central
        .plant(wh, "product", json!({"sku": "SKU-9"}), None, None)
        .await;
    let id = api.trigger(r#"{"verify": true}"#).await;
    let job = api.finished(&id, &log).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(
        report(&job)["findings"],
        json!({"missing_at_central": 1}),
        "{job}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verify_killed_mid_table_resumes_from_its_last_chunk_and_counts_each_row_once() {
    let db = demo_warehouse("verifyresume").await;
    // 12,000 stock levels: three chunks; in key order location L-1's come first, L-9's last.
    seed_stock(&db, 1000, 12).await;
    let state = pg().new_db("verifyresumestate").await;
    let central = Central::start(Faults::default()).await;
    let wh = "wh-vresume";
    let (_dir, log, mut run, api, mut again) = start_with_api(&db, &state, &central, wh, None);
    assert_converges(&central, &db, wh, &log).await;
    // Drift in the first chunk and in the last.
    let (_, mut edited) = central_row(&central, wh, "SKU-5", "L-1").await;
    edited["on_hand"] = json!(12_345);
    central
        .plant(
            wh,
            "stock_level",
            json!({"sku": "SKU-5", "location": "L-1"}),
            None,
            Some(edited),
        )
        .await;
    central
        .plant(
            wh,
            "stock_level",
            json!({"sku": "SKU-999", "location": "L-9"}),
            None,
            None,
        )
        .await;
    // Slow pages: the verify is still at work when it is killed.
    central
        .set_faults(Faults {
            listing_latency_ms: 1500,
            ..Faults::default()
        })
        .await;
    let (status, v) = api.post("/sync/verify", "").await;
    assert_eq!(status, 202, "{v}");
    let id = v["jobId"].as_str().unwrap().to_string();
    let mut saved = 0i64;
    for _ in 0..300 {
        saved = state
            .client
            .query_one(
                "SELECT coalesce(sum(chunks), 0)::bigint FROM sync_resync_progress
                  WHERE job_id = $1 AND table_name = 'public.stock_levels'",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        if saved >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saved >= 1, "no chunk saved\n{}", log_tail(&log));
    run.child.kill().unwrap();
    run.child.wait().unwrap();
    central.set_faults(Faults::default()).await;
    let (_restarted, _) = crate::api::api_after_restart(&api, &mut again, &log, &id).await;
    let job = api.finished(&id, &log).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", log_tail(&log));
    let r = report(&job);
    // Every row once: 12,000 stock levels, 1,000 products, 12 locations.
    assert_eq!(r["compared"], 13_012, "{job}");
    assert_eq!(
        r["findings"],
        json!({"differs": 1, "missing_at_central": 1}),
        "{job}"
    );
    let chunks: i64 = state
        .client
        .query_one(
            "SELECT sum(chunks)::bigint FROM sync_resync_progress
              WHERE job_id = $1 AND table_name = 'public.stock_levels'",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(chunks, 3, "{job}");
}
