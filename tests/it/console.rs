//! The operations console: its files and their headers, and the page driven in a real
//! browser (Debian's Chromium through playwright-core, see tests/console/drive.mjs) against a
//! running two-warehouse `run`.

use std::path::PathBuf;
use std::time::Duration;

use inventorysync::central::server::Faults;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::api::{KEY, run_with_api};
use crate::consumer::{Central, config, conflicts, demo_warehouse, log_tail, wait_streaming};
use crate::harness::pg;

/// The browser and the playwright-core package `scripts/test` installs (see
/// scripts/lib/browser.sh), found as it leaves them when the variables are not set.
fn browser() -> (PathBuf, PathBuf) {
    let chromium = std::env::var_os("INVENTORYSYNC_TEST_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let playwright = std::env::var_os("INVENTORYSYNC_TEST_PLAYWRIGHT")
        .map(PathBuf::from)
        .or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            Some(cache.join("inventorysync/playwright/node_modules/playwright-core"))
        })
        .unwrap_or_default();
    assert!(
        chromium.exists() && playwright.exists(),
        "the console test needs Chromium ({}) and playwright-core ({}): scripts/test installs both",
        chromium.display(),
        playwright.display()
    );
    (chromium, playwright)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_served_with_a_strict_policy_and_no_cross_origin_access() {
    let db = demo_warehouse("page").await;
    let state = pg().new_db("pagestate").await;
    let central = Central::start(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &db, "wh-page", "");
    let log = dir.path().join("run.log");
    let (_run, api) = run_with_api(&cfg, &state, &central, log.clone(), &[]);
    wait_streaming(&state, "wh-page", &log).await;
    for (path, kind) in [
        ("/console", "text/html"),
        ("/console/console.js", "text/javascript"),
        ("/console/console.css", "text/css"),
    ] {
        let r = api
            .http
            .get(format!("{}{path}", api.base))
            .header("origin", "https://elsewhere.example")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
        let header = |h: &str| {
            r.headers()
                .get(h)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default()
        };
        assert!(
            header("content-type").starts_with(kind),
            "{path}: {}",
            header("content-type")
        );
        let csp = header("content-security-policy");
        assert!(
            csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
            "{path}: {csp}"
        );
        assert_eq!(header("x-content-type-options"), "nosniff");
        assert_eq!(header("access-control-allow-origin"), "", "{path}: no CORS");
    }
    // The data behind it needs the key, and another origin gets no CORS grant for it.
    let r = api
        .http
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/sync/overview", api.base),
        )
        .header("origin", "https://elsewhere.example")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    assert_eq!(api.get("/sync/overview", None).await.0, 401);
    let (status, _, overview) = api.get("/sync/overview", Some(KEY)).await;
    assert_eq!(status, 200, "{overview}");
    let w = &overview["warehouses"][0];
    assert_eq!(w["id"], "wh-page");
    assert_eq!(w["state"], "streaming", "{overview}\n{}", log_tail(&log));
    assert_eq!(w["ownedHere"], true);
    assert!(
        w["now"]["lagBytes"].is_i64() || w["now"]["lagBytes"].is_null(),
        "{w}"
    );
    assert_eq!(overview["sampleEverySeconds"], 10);
    // The first sample is taken at the start.
    assert!(!w["history"].as_array().unwrap().is_empty(), "{w}");
    assert_eq!(w["notices"], serde_json::json!([]), "{w}");

    // A slot left behind by a removed warehouse, and a mapped table renamed: the overview
    // says so, with the way out, as `check` does (read with the slot's health, every 10 s).
    db.exec(
        "SELECT pg_create_logical_replication_slot('inventorysync_removed_wh', 'pgoutput');
         ALTER TABLE locations RENAME TO sites;",
    )
    .await;
    let mut notices = Value::Null;
    for _ in 0..300 {
        let (_, _, overview) = api.get("/sync/overview", Some(KEY)).await;
        notices = overview["warehouses"][0]["notices"].clone();
        if notices.as_array().is_some_and(|n| n.len() == 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    db.exec("SELECT pg_drop_replication_slot('inventorysync_removed_wh')")
        .await;
    let notices = notices.as_array().cloned().unwrap_or_default();
    assert_eq!(notices.len(), 2, "{notices:?}\n{}", log_tail(&log));
    assert_eq!(notices[0]["kind"], "unused_slot");
    assert!(
        notices[0]["detail"]
            .as_str()
            .unwrap()
            .starts_with("inventorysync_removed_wh is no configured warehouse's slot"),
        "{notices:?}"
    );
    assert_eq!(
        notices[0]["fix"],
        "if no other deployment uses it: SELECT pg_drop_replication_slot('inventorysync_removed_wh');"
    );
    assert_eq!(notices[1]["kind"], "renamed_table");
    assert_eq!(
        notices[1]["fix"],
        "update the configuration: [[mappings]] table = \"public.sites\""
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_signs_in_and_works_both_warehouses_from_the_page() {
    let (chromium, playwright) = browser();
    let east = demo_warehouse("coneast").await;
    let west = demo_warehouse("conwest").await;
    east.exec("INSERT INTO locations VALUES ('A-01', 'north')")
        .await;
    let state = pg().new_db("constate").await;
    let central = Central::start(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let second = format!(
        "[[warehouses]]\nid = 'wh-west'\nurl = '{}'\nslot = '{}'\n",
        west.url_as("postgres"),
        west.slot("run")
    );
    let cfg = config(dir.path(), &east, "wh-east", &second);
    let log = dir.path().join("run.log");
    let (_run, api) = run_with_api(&cfg, &state, &central, log.clone(), &[]);
    wait_streaming(&state, "wh-east", &log).await;
    wait_streaming(&state, "wh-west", &log).await;
    // A row that breaks a rule: an open conflict to resolve from the page.
    east.exec(
        "INSERT INTO products (sku, name) VALUES ('SKU-1', 'one');
         INSERT INTO stock_levels (sku, location_code, qty_on_hand) VALUES ('SKU-1', 'A-01', -3);",
    )
    .await;
    for _ in 0..300 {
        if !conflicts(&state).await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(conflicts(&state).await.len(), 1, "{}", log_tail(&log));
    // A slot left behind at the first warehouse: the page shows it and how to drop it.
    east.exec("SELECT pg_create_logical_replication_slot('inventorysync_left_behind', 'pgoutput')")
        .await;

    // INVENTORYSYNC_CONSOLE_SCREENSHOT=docs/console.png renews the README's picture.
    let screenshot = std::env::var_os("INVENTORYSYNC_CONSOLE_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join("console.png"));
    let out = tokio::process::Command::new("node")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/console/drive.mjs"))
        .arg(&api.base)
        .arg(KEY)
        .arg(&screenshot)
        .args(["wh-east", "wh-west"])
        .env("INVENTORYSYNC_TEST_CHROMIUM", &chromium)
        .env("INVENTORYSYNC_TEST_PLAYWRIGHT", &playwright)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), out)
        .await
        .expect("the browser finished within 3 minutes")
        .expect("node runs");
    east.exec("SELECT pg_drop_replication_slot('inventorysync_left_behind')")
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser session failed:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        log_tail(&log)
    );
    let seen: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(seen["keyInUrl"], false, "{seen}");
    assert_eq!(seen["keyInStorage"], true, "{seen}");
    assert_eq!(seen["cookies"], 0, "{seen}");
    assert!(
        seen["phoneOverflow"].as_i64().unwrap() <= 0,
        "sideways scroll on a phone: {seen}"
    );
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");

    // What the page did is in the state DB: the cycle succeeded, the conflict is resolved by
    // the key that signed in, with the note typed in.
    let job = seen["job"].as_str().unwrap();
    let (status, _, j) = api.get(&format!("/sync/status/{job}"), Some(KEY)).await;
    assert_eq!(
        (status, &j["status"]),
        (200, &Value::from("succeeded")),
        "{j}"
    );
    let resync = seen["resync"].as_str().unwrap();
    let (_, _, r) = api.get(&format!("/sync/status/{resync}"), Some(KEY)).await;
    assert_eq!(
        (&r["kind"], &r["status"]),
        (&Value::from("resync"), &Value::from("succeeded")),
        "{r}"
    );
    // The verify the page queued ran, and its row said what it found.
    let verify = seen["verify"].as_str().unwrap();
    let (_, _, v) = api.get(&format!("/sync/status/{verify}"), Some(KEY)).await;
    assert_eq!(
        (&v["kind"], &v["status"]),
        (&Value::from("verify"), &Value::from("succeeded")),
        "{v}"
    );
    let text = seen["verifyText"].as_str().unwrap();
    assert!(
        text.contains("central ") && text.contains(" rows, "),
        "{text}"
    );
    let jobs = api.get("/sync/jobs?kind=resync", Some(KEY)).await.2;
    assert_eq!(
        jobs["items"].as_array().unwrap().len(),
        1,
        "one resync: the cancelled one went nowhere: {jobs}"
    );
    let (_, _, letters) = api.get("/sync/dead-letters?replayed=true", Some(KEY)).await;
    let letter = &letters["items"][0];
    assert_eq!(
        (&letter["id"], &letter["replayOutcome"]),
        (&seen["replayed"], &Value::from("invalid")),
        "{letters}"
    );
    let resolved = conflicts(&state).await;
    let c = resolved
        .iter()
        .find(|c| c["id"] == seen["conflict"])
        .unwrap_or_else(|| panic!("{resolved:?}"));
    let fingerprint: String = Sha256::digest(KEY.as_bytes())[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(c["status"], "resolved", "{c}");
    assert_eq!(c["resolved_by"], format!("key sha256:{fingerprint}"), "{c}");
    assert_eq!(
        c["resolution_note"],
        "fixed at the warehouse: resolved from the console"
    );
    assert!(
        !std::fs::read_to_string(&log).unwrap().contains(KEY),
        "the key is never logged"
    );
}
