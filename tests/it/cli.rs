//! The `tail` command as a process: exit codes, crash and restart, memory; the binary's
//! allocator.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{pg, pg_replica_level};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_inventorysync"));
    // Each process its own API port (the default 8080 would collide between tests).
    c.env("API_LISTEN", "127.0.0.1:0");
    c.env("INVENTORYSYNC_LOG", "info");
    c
}

fn run_tail(args: &[&str]) -> (i32, String, String) {
    let out = bin().arg("tail").args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The allocator's options are a symbol jemalloc reads before `main`: a build that stopped
/// exporting it would run with an arena per core and keep freed pages for ten seconds, and
/// nothing else would say so (src/main.rs says why one arena).
#[cfg(feature = "jemalloc")]
#[test]
fn the_binary_runs_jemalloc_with_one_arena_and_quick_purging() {
    let out = bin()
        .arg("--version")
        .env("MALLOC_CONF", "stats_print:true")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stats = String::from_utf8_lossy(&out.stderr);
    for option in [
        "opt.narenas: 1\n",
        "opt.background_thread: true",
        "opt.dirty_decay_ms: 1000",
        "opt.muzzy_decay_ms: 0",
    ] {
        assert!(
            stats.contains(option),
            "{option:?} not in jemalloc's stats:\n{stats}"
        );
    }
}

#[tokio::test]
async fn definite_errors_exit_with_code_2_and_a_clear_message() {
    let db = pg().new_db("cliErr").await;
    db.exec("CREATE PUBLICATION inventorysync FOR ALL TABLES")
        .await;
    let url = db.url_as("postgres");
    let slot = db.slot("s");
    let (code, _, err) = run_tail(&["--source", &url, "--slot", &db.slot("absent")]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!(
            "replication slot \"{}\" does not exist",
            db.slot("absent")
        )),
        "{err}"
    );

    let (code, _, err) = run_tail(&["--source", &url, "--slot", &slot, "--endpos", "bogus"]);
    assert_eq!(code, 2);
    assert!(err.contains("--endpos: invalid LSN \"bogus\""), "{err}");

    let (code, _, err) = run_tail(&["--source", "mysql://nope", "--slot", "s"]);
    assert_eq!(code, 2);
    assert!(err.contains("configuration key --source"), "{err}");

    let (code, _, err) = run_tail(&["--source", &url, "--slot", "Bad-Slot"]);
    assert_eq!(code, 2);
    assert!(err.contains("--slot"), "{err}");

    let other = pg_replica_level().new_db("cliWl").await;
    let (code, _, err) = run_tail(&[
        "--source",
        &other.url_as("postgres"),
        "--slot",
        &slot,
        "--create-slot",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("wal_level is \"replica\""), "{err}");
}

/// Creates `slot` with `tail --create-slot`, writing its initial load to `out`.
fn create_slot_with_tail(url: &str, slot: &str, out: &str) {
    let (code, _, err) = run_tail(&[
        "--source",
        url,
        "--slot",
        slot,
        "--create-slot",
        "--endpos",
        "0/1",
        "-o",
        out,
    ]);
    assert_eq!(code, 0, "{err}");
}

fn positions(path: &std::path::Path) -> Vec<(u64, u64, serde_json::Value)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("line {l:?}: {e}"));
            (
                v["source"]["commit_lsn"].as_u64().unwrap(),
                v["source"]["sequence"].as_u64().unwrap(),
                v,
            )
        })
        .collect()
}

#[tokio::test]
async fn kill_9_mid_stream_then_restart_loses_nothing_and_never_goes_back() {
    let db = pg().new_db("kill").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, pad text); CREATE PUBLICATION inventorysync FOR ALL TABLES").await;
    let url = db.url_as("postgres");
    let slot = db.slot("s");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("events.jsonl");
    let out_s = out.to_str().unwrap();
    create_slot_with_tail(&url, &slot, out_s);
    // Load 400 transactions of 100 rows while tail is killed and restarted.
    let writer_url = url.clone();
    let writer = tokio::spawn(async move {
        let c = crate::harness::connect(&writer_url).await;
        for t in 0..400 {
            c.batch_execute(&format!(
                "INSERT INTO t SELECT g, repeat('x', 120) FROM generate_series({}, {}) g",
                t * 100,
                t * 100 + 99
            ))
            .await
            .unwrap();
        }
    });
    for seed in [150u64, 90, 310, 40, 220] {
        let mut child = bin()
            .args(["tail", "--source", &url, "--slot", &slot, "-o", out_s])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(seed)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    writer.await.unwrap();
    let end = db.current_lsn().await.to_string();
    let (code, _, err) = run_tail(&[
        "--source", &url, "--slot", &slot, "--endpos", &end, "-o", out_s,
    ]);
    assert_eq!(code, 0, "{err}");
    let lines = positions(&out);
    assert!(
        lines
            .windows(2)
            .all(|w| (w[0].0, w[0].1) < (w[1].0, w[1].1)),
        "positions only grow in the file"
    );
    let mut ids: Vec<i64> = lines
        .iter()
        .map(|l| l.2["after"]["id"].as_i64().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids,
        (0..40000).collect::<Vec<i64>>(),
        "every committed row is there"
    );
}

fn peak_rss_kb(stderr: &str) -> u64 {
    let i = stderr.rfind("peak_rss_kb=").expect("summary line") + "peak_rss_kb=".len();
    stderr[i..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn memory_stays_flat_through_a_200k_row_transaction_with_and_without_streaming() {
    let db = pg().new_db("flat").await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, pad text, n numeric, at timestamptz DEFAULT now()); CREATE PUBLICATION inventorysync FOR ALL TABLES").await;
    let url = db.url_as("postgres");
    for (name, extra) in [("plain", None), ("streamed", Some("--streaming"))] {
        let slot = db.slot(name);
        let mut args = vec![
            "--source",
            url.as_str(),
            "--slot",
            slot.as_str(),
            "--create-slot",
            "--endpos",
            "0/1",
            "-o",
            "/dev/null",
        ];
        let (code, _, err) = run_tail(&args);
        assert_eq!(code, 0, "{err}");
        args.truncate(4);
        args.push("--stream-memory-mib");
        args.push("8");
        if let Some(e) = extra {
            args.push(e);
        }
        let _ = &mut args;
        db.exec(
            "INSERT INTO t SELECT g, repeat('p', 150), g * 1.5 FROM generate_series(1, 200000) g",
        )
        .await;
        db.exec("DELETE FROM t").await;
        let end = db.current_lsn().await.to_string();
        let mut full = args.clone();
        full.extend(["--endpos", end.as_str(), "-o", "-"]);
        let child = bin()
            .arg("tail")
            .args(&full)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        let lines = out.stdout.iter().filter(|&&b| b == b'\n').count();
        assert_eq!(lines, 400_000, "{name}");
        let rss = peak_rss_kb(&err);
        eprintln!("{name}: peak RSS {rss} kB");
        // 200k rows of ~200 bytes are 40 MB as data and several times that as events;
        // a pipeline that held the transaction would be far above this bound.
        assert!(rss < 80_000, "{name}: peak RSS {rss} kB");
    }
}

#[tokio::test]
async fn tail_reads_a_warehouse_from_the_configuration_file() {
    let db = pg().new_db("cfg").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (7); CREATE PUBLICATION wh_pub FOR ALL TABLES").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("inventorysync.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[warehouses]]\nid = 'wh-{0}'\nurl = '{1}'\npublication = 'wh_pub'\nslot = '{0}_cfg'\n",
            db.name,
            db.url_as("postgres")
        ),
    )
    .unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let (code, out, err) = {
        let o = bin()
            .args([
                "--config",
                cfg_s,
                "tail",
                "--warehouse",
                &format!("wh-{}", db.name),
                "--create-slot",
                "--endpos",
                "0/1",
            ])
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    assert_eq!(code, 0, "{err}");
    let ev: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(ev["source"]["warehouse_id"], format!("wh-{}", db.name));
    assert_eq!(ev["after"]["id"], 7);
    assert_eq!(ev["source"]["snapshot"], "last");

    std::fs::write(
        &cfg,
        "[[warehouses]]\nid = 'x'\nurl = 'postgres://u:hunter2@h/db'\nslot = 'Bad Slot'\n",
    )
    .unwrap();
    let o = bin()
        .args(["--config", cfg_s, "tail", "--warehouse", "x"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("warehouses[0].slot"), "{err}");
    assert!(!err.contains("hunter2"), "secrets never printed: {err}");
}

#[tokio::test]
async fn positions_are_confirmed_while_a_backlog_drains_not_only_at_the_end() {
    let db = pg().new_db("confirm").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, pad text); CREATE PUBLICATION inventorysync FOR ALL TABLES").await;
    let url = db.url_as("postgres");
    let slot = db.slot("s");
    create_slot_with_tail(&url, &slot, "/dev/null");
    for t in 0..200 {
        db.exec(&format!(
            "INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series({}, {}) g",
            t * 1000,
            t * 1000 + 999
        ))
        .await;
    }
    let end = db.current_lsn().await;
    let confirmed = || async {
        let s: String = db
            .client
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0);
        s.parse::<inventorysync::Lsn>().unwrap()
    };
    let start = confirmed().await;
    let end_s = end.to_string();
    let mut child = bin()
        .args([
            "tail",
            "--source",
            &url,
            "--slot",
            &slot,
            "--endpos",
            &end_s,
            "-o",
            "/dev/null",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = vec![start];
    while child.try_wait().unwrap().is_none() {
        let c = confirmed().await;
        if c != *seen.last().unwrap() {
            seen.push(c);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(child.wait().unwrap().success());
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "confirmed position only grows: {seen:?}"
    );
    assert!(
        seen.len() >= 3,
        "confirmed in steps while draining, not once at the end: {seen:?}"
    );
    assert!(confirmed().await > start);
}

/// `inventorysync check` with `toml` and the environment `env`: exit code and output.
pub(crate) fn run_check(toml: &str, env: &[(&str, String)]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("inventorysync.toml");
    std::fs::write(&cfg, toml).unwrap();
    let mut c = bin();
    c.arg("--config").arg(&cfg).arg("check");
    for k in [
        "DB_URL",
        "KAFKA_BROKERS",
        "WAREHOUSE_API_ENDPOINT",
        "WAREHOUSE_API_TOKEN",
        "API_KEYS",
    ] {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_a_ready_setup_and_names_each_fix_otherwise() {
    use inventorysync::central::server::Faults;
    let db = crate::consumer::demo_warehouse("chk").await;
    let state = pg().new_db("chkstate").await;
    let central = crate::consumer::Central::start(Faults::default()).await;
    let mapping = include_str!("../../sql/demo_mapping.toml");
    let good = format!(
        "{mapping}\n[[warehouses]]\nid = 'wh-chk'\nurl = '{}'\nslot = '{}'\n",
        db.url_as("postgres"),
        db.slot("chk")
    );
    let env = vec![
        ("DB_URL", state.url_as("postgres")),
        ("WAREHOUSE_API_ENDPOINT", central.endpoint()),
        ("API_KEYS", "check-key-0123456789".to_string()),
    ];
    let (code, out) = run_check(&good, &env);
    assert_eq!(code, 0, "{out}");
    for line in [
        "wal_level               ok      logical",
        "ok      postgres may replicate",
        "replica identity public.stock_levels  ok      default (primary key)",
        "not created yet: the first run creates it",
        "answers an empty batch",
        "0 to fix",
    ] {
        let squeezed = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            squeezed(&out).contains(&squeezed(line)),
            "{line:?} missing:\n{out}"
        );
    }
    assert!(!out.contains("FAIL"), "{out}");
    // Loopback needs no certificate.
    assert!(!out.contains("is reached with sslmode"), "{out}");
    // A slot with the engine's prefix that no configured warehouse uses (a warehouse renamed
    // or removed) is named, with its retained WAL and the statement that drops it.
    db.exec("SELECT pg_create_logical_replication_slot('inventorysync_wh_gone', 'pgoutput')")
        .await;
    let (code, out) = run_check(&good, &env);
    db.exec("SELECT pg_drop_replication_slot('inventorysync_wh_gone')")
        .await;
    assert_eq!(code, 0, "a warning, not a failure: {out}");
    assert!(
        out.contains("inventorysync_wh_gone is no configured warehouse's slot and retains")
            && out.contains("SELECT pg_drop_replication_slot('inventorysync_wh_gone');"),
        "{out}"
    );
    // products maps text and jsonb columns under the default replica identity: a warning
    // that says what it costs; stock_levels maps only integers.
    let toast = out
        .lines()
        .find(|l| l.contains("unchanged TOAST public.products"))
        .unwrap_or_else(|| panic!("no TOAST warning:\n{out}"));
    assert!(toast.contains("name, unit_price, attributes"), "{toast}");
    assert!(out.contains("REPLICA IDENTITY FULL"), "{out}");
    assert!(
        !out.contains("unchanged TOAST public.stock_levels"),
        "{out}"
    );

    // A mapped table without a primary key, on a server with wal_level = replica and no
    // publication; no state DB; a central that wants another token.
    let bad_server = pg_replica_level().new_db("chkbad").await;
    let central_locked = crate::consumer::Central::start_with(
        inventorysync::central::server::CentralStore::memory(),
        Some("right-token"),
        Faults::default(),
    )
    .await;
    let bad = format!(
        "{mapping}\n[[warehouses]]\nid = 'wh-bad'\nurl = '{}'\n",
        bad_server.url_as("postgres"),
    );
    // Credentials in the endpoint's URL are never printed either (issue 39: check printed
    // the endpoint verbatim).
    let with_password = central_locked
        .endpoint()
        .replacen("http://", "http://ops:pw-in-url@", 1);
    let env = vec![
        ("WAREHOUSE_API_ENDPOINT", with_password),
        ("WAREHOUSE_API_TOKEN", "wrong-token".to_string()),
    ];
    let (code, out) = run_check(&bad, &env);
    assert_eq!(code, 1, "{out}");
    for text in [
        "replica; logical decoding needs logical",
        "fix: ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL",
        "inventorysync does not exist",
        "fix: CREATE PUBLICATION \"inventorysync\" FOR TABLE public.locations, public.products, public.stock_levels;",
        "fix: set DB_URL",
        "answered 401",
        "fix: set WAREHOUSE_API_TOKEN",
        "API_KEYS",
    ] {
        assert!(out.contains(text), "{text:?} missing:\n{out}");
    }
    assert!(!out.contains("wrong-token"), "the token is never printed");
    assert!(
        !out.contains("pw-in-url"),
        "nor a password in a URL:\n{out}"
    );
    assert!(out.contains("http://ops:***@127.0.0.1:"), "{out}");

    // A warehouse and a state DB off this machine, reached without a verified certificate.
    let remote = format!(
        "{mapping}\n[[warehouses]]\nid = 'wh-far'\nurl = 'postgres://u:p@wh.invalid:5432/db?connect_timeout=1'\n"
    );
    let (_, out) = run_check(
        &remote,
        &[(
            "DB_URL",
            "postgres://u:p@state.invalid:5432/state?sslmode=require&connect_timeout=1".into(),
        )],
    );
    for text in [
        "wh.invalid is reached with sslmode=prefer",
        "state.invalid is reached with sslmode=require",
        "sslmode=verify-full&sslrootcert=",
    ] {
        assert!(out.contains(text), "{text:?} missing:\n{out}");
    }

    // Replica identity: a published, mapped table without a key.
    db.exec(
        "CREATE TABLE nokey (sku text, qty int); ALTER PUBLICATION inventorysync ADD TABLE nokey;",
    )
    .await;
    let nokey = format!(
        "{good}\n[[mappings]]\ntable = 'public.nokey'\nentity = 'product'\nkey = {{ sku = 'sku' }}\n"
    );
    let env = vec![
        ("DB_URL", state.url_as("postgres")),
        ("WAREHOUSE_API_ENDPOINT", central.endpoint()),
    ];
    let (code, out) = run_check(&nokey, &env);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("default without a primary key")
            && out.contains("ALTER TABLE public.nokey REPLICA IDENTITY FULL"),
        "{out}"
    );
}

/// Issue 14, item 5: a warehouse restored to an earlier point (its WAL ends below the
/// checkpoint, the slot is gone, central holds a version of the lost history) is refused with
/// a definite error naming the way back; `inventorysync rebase` takes it, and the next run
/// reloads the warehouse at versions above central's, so central equals the restored rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_warehouse_is_refused_until_rebased_and_then_reloaded_whole() {
    use crate::consumer::{
        Central, assert_converges, config, demo_warehouse, log_tail, run_command, start,
    };
    let db = demo_warehouse("restored").await;
    db.exec("INSERT INTO products (sku, name) SELECT 'SKU-' || g, 'n' || g FROM generate_series(1, 5) g")
        .await;
    let state = pg().new_db("restoredstate").await;
    let central = Central::start(inventorysync::central::server::Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &db, "wh-restored", "");
    let log = dir.path().join("first.log");
    let run = start(run_command(&cfg, &state, &central, None), log.clone());
    assert_converges(&central, &db, "wh-restored", &log).await;
    drop(run);
    // The "restore": the slot is gone, the WAL ends 1 GB below the checkpoint, and central
    // holds SKU-1 at a version of the lost history.
    // (The killed run's walsender may still hold the slot for a moment.)
    db.drop_slot_when_free(&db.slot("run")).await;
    let now = db.current_lsn().await;
    // Far enough ahead that the tests running beside this one (one PostgreSQL cluster) do
    // not write as much WAL meanwhile (64 MB was once passed during the 10 s the killed
    // run's worker row takes to expire).
    let ahead = inventorysync::Lsn(now.0 + (1 << 30));
    state
        .exec(&format!(
            "UPDATE replication_checkpoints SET flush_lsn = '{ahead}' WHERE warehouse_id = 'wh-restored'"
        ))
        .await;
    let lost = inventorysync::event::format_version(inventorysync::Lsn(ahead.0 - (4 << 20)), 0);
    let r = reqwest::Client::new()
        .post(format!("{}/wh-restored/changes", central.endpoint()))
        .json(&serde_json::json!({
            "warehouse_id": "wh-restored",
            "batch_id": "lost-history",
            "changes": [{
                "entity": "product", "op": "upsert", "key": {"sku": "SKU-1"},
                "data": {"name": "of the lost history", "unit_price": null, "attributes": {}},
                "version": lost,
                "source": {"table": "public.products", "lsn": "0/0",
                           "committed_at": "2026-12-01T00:00:00Z", "snapshot": false}
            }]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Refused at once, before a slot is created, naming the way back.
    let log = dir.path().join("refused.log");
    let refused = start(run_command(&cfg, &state, &central, None), log.clone());
    let needle = "no longer has the WAL history its checkpoint belongs to";
    for _ in 0..300 {
        if std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(needle)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains(needle), "{}", log_tail(&log));
    assert!(
        text.contains(&format!("below the checkpoint {ahead}")),
        "{}",
        log_tail(&log)
    );
    assert!(
        text.contains("inventorysync rebase wh-restored"),
        "{}",
        log_tail(&log)
    );
    let slots: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        slots, 0,
        "no slot created for a history that does not match"
    );
    drop(refused);
    // A load of the lost history still under way (its products are done): the rebase must
    // not let the next run resume it.
    state
        .exec(
            "INSERT INTO sync_jobs (id, kind, status, deadline)
               VALUES ('sync-lost', 'load', 'running', now() + interval '1 hour');
             INSERT INTO sync_job_warehouses (job_id, warehouse_id) VALUES ('sync-lost', 'wh-restored');
             INSERT INTO sync_resync_progress (job_id, warehouse_id, table_name, chunks, done)
               VALUES ('sync-lost', 'wh-restored', 'public.products', 1, true),
                      ('sync-lost', 'wh-restored', 'public.locations', 1, true);",
        )
        .await;
    // The way back.
    let out = bin()
        .arg("--config")
        .arg(&cfg)
        .arg("rebase")
        .arg("wh-restored")
        .env("DB_URL", state.url_as("postgres"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("past {ahead}")), "{stdout}");
    // The planted one, and the first run's own load if it was killed before finishing it.
    assert!(
        stdout.contains("load(s)/resync(s) under way failed") && !stdout.contains("; 0 load(s)"),
        "{stdout}"
    );
    assert!(db.current_lsn().await > ahead);
    db.exec("UPDATE products SET name = 'after the restore' WHERE sku = 'SKU-2'")
        .await;
    let log = dir.path().join("rebased.log");
    let _run = start(run_command(&cfg, &state, &central, None), log.clone());
    // Central takes the reloaded rows over the lost history's version.
    assert_converges(&central, &db, "wh-restored", &log).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_run_does_not_feed_its_own_checkpoints() {
    use crate::consumer::{Central, assert_converges, config, run_command, start, wait_streaming};
    // The state DB in the warehouse's cluster (as here): every checkpoint written is WAL that
    // the slot's walsender reports in a keepalive. Confirming each keepalive at once wrote a
    // checkpoint per keepalive, whose WAL brought the next one: thousands of commits a second
    // on an idle warehouse, and a busy engine.
    let db = crate::consumer::demo_warehouse("idle").await;
    let state = pg().new_db("idlestate").await;
    let central = Central::start(inventorysync::central::server::Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &db, "wh-idle", "");
    let log = dir.path().join("run.log");
    let _run = start(run_command(&cfg, &state, &central, None), log.clone());
    wait_streaming(&state, "wh-idle", &log).await;
    assert_converges(&central, &db, "wh-idle", &log).await;
    // Checkpoint writes, counted by a trigger: the statistics views lag by up to the 10 s a
    // pooled connection may keep its counts, which let the load's own writes fall into the
    // idle window.
    state
        .client
        .batch_execute(
            "CREATE TABLE checkpoint_writes (at timestamptz NOT NULL DEFAULT clock_timestamp());
             CREATE FUNCTION count_checkpoint_write() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO checkpoint_writes DEFAULT VALUES; RETURN NULL; END $$;
             CREATE TRIGGER count_writes AFTER INSERT OR UPDATE ON replication_checkpoints
               FOR EACH ROW EXECUTE FUNCTION count_checkpoint_write();",
        )
        .await
        .unwrap();
    let writes = || async {
        state
            .client
            .query_one("SELECT count(*) FROM checkpoint_writes", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = writes().await;
    let wal_before = db.current_lsn().await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let idle = writes().await - before;
    // The tests beside this one write WAL to the same cluster: an idle slot also confirms
    // once the WAL moved 16 MB, so that it releases what others wrote.
    let moved_16mb = (db.current_lsn().await.0 - wal_before.0) >> 24;
    assert!(
        idle as u64 <= 12 + moved_16mb,
        "{idle} checkpoint writes in 6 idle seconds while the WAL moved {moved_16mb} × 16 MB (at most one a second, or one per 16 MB, expected):\n{}",
        crate::consumer::log_tail(&log)
    );
}
