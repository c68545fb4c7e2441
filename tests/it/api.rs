//! The HTTP API of `run`: auth, JSON errors, readiness and the conflicts listing, against a
//! real `run` process on the embedded bus.

use std::time::Duration;

use inventorysync::central::server::Faults;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::consumer::{
    Central, Run, config, conflicts, demo_warehouse, expected_state, log_tail, run_command, start,
    wait_streaming, workload,
};
use crate::harness::{TestDb, free_port, pg};

pub const KEY: &str = "it-api-key-0123456789";
const HASHED_KEY: &str = "it-hashed-key-abcdefghij";

pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(port: u16) -> Api {
        Api {
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        }
    }

    pub async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, body).await
    }

    /// Sends `body` with `method` and the test key; the status and the JSON answer.
    pub async fn send(&self, method: reqwest::Method, path: &str, body: &str) -> (u16, Value) {
        let r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Triggers a cycle and returns its id.
    pub async fn trigger(&self, body: &str) -> String {
        let (status, v) = self.post("/sync/trigger", body).await;
        assert_eq!(status, 202, "{v}");
        assert_eq!(v["status"], "queued");
        let id = v["jobId"].as_str().unwrap().to_string();
        assert!(id.starts_with("sync-"), "{id}");
        id
    }

    /// Waits until job `id` has finished; returns it.
    pub async fn finished(&self, id: &str, log: &std::path::Path) -> Value {
        for _ in 0..600 {
            let (status, _, job) = self.get(&format!("/sync/status/{id}"), Some(KEY)).await;
            assert_eq!(status, 200, "{job}");
            if job["status"] == "succeeded" || job["status"] == "failed" {
                return job;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("job {id} never finished; log:\n{}", log_tail(log));
    }
    pub async fn get(&self, path: &str, key: Option<&str>) -> (u16, Option<String>, Value) {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let auth = r
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string());
        let body = r.json().await.unwrap_or(Value::Null);
        (status, auth, body)
    }
}

fn assert_error(got: &(u16, Option<String>, Value), status: u16, code: &str, text: &str) {
    assert_eq!(got.0, status, "{got:?}");
    assert_eq!(got.2["error"], code, "{got:?}");
    let message = got.2["message"].as_str().unwrap_or_default();
    assert!(message.contains(text), "{message:?} lacks {text:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_authenticates_answers_json_errors_and_lists_conflicts_page_by_page() {
    let db = demo_warehouse("api").await;
    db.exec("INSERT INTO locations VALUES ('A-01', 'north'); INSERT INTO products (sku, name) VALUES ('SKU-1', 'one'), ('SKU-2', 'two'), ('SKU-3', 'three');")
        .await;
    let state = pg().new_db("apistate").await;
    let central = Central::start(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &db, "wh-api", "");
    let log = dir.path().join("run.log");
    let port = free_port();
    let hashed: String = Sha256::digest(HASHED_KEY.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut cmd = run_command(&cfg, &state, &central, None);
    cmd.env("API_LISTEN", format!("127.0.0.1:{port}"))
        .env("API_KEYS", format!("{KEY},sha256:{hashed}"));
    let _run = start(cmd, log.clone());
    let api = Api {
        base: format!("http://127.0.0.1:{port}"),
        http: reqwest::Client::new(),
    };
    wait_streaming(&state, "wh-api", &log).await;

    // Open routes.
    let health = api.get("/health", None).await;
    assert_eq!((health.0, &health.2["status"]), (200, &Value::from("ok")));
    let mut ready = api.get("/ready", None).await;
    for _ in 0..100 {
        if ready.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        ready = api.get("/ready", None).await;
    }
    assert_eq!(ready.0, 200, "{ready:?}\n{}", log_tail(&log));
    assert_eq!(ready.2["warehouses"]["wh-api"]["streaming"], true);
    assert_eq!(ready.2["stateDb"], true);

    // Auth: none, malformed, wrong; then the plain and the hashed key.
    for key in [None, Some("wrong-key-0123456789"), Some("")] {
        let got = api.get("/sync/conflicts", key).await;
        assert_error(&got, 401, "unauthorized", "");
        assert_eq!(got.1.as_deref(), Some("Bearer"), "{got:?}");
    }
    let r = api
        .http
        .get(format!("{}/sync/conflicts", api.base))
        .header("authorization", format!("Basic {KEY}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let plain = api.get("/sync/conflicts", Some(KEY)).await;
    assert_eq!(plain.0, 200, "{plain:?}");
    assert_eq!(plain.2["items"], Value::Array(vec![]));
    assert_eq!(api.get("/sync/conflicts", Some(HASHED_KEY)).await.0, 200);

    // Unknown routes and methods, bad parameters: JSON errors naming the problem.
    assert_error(&api.get("/nope", None).await, 404, "not_found", "GET /nope");
    let post = api
        .http
        .post(format!("{}/health", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status().as_u16(), 405);
    assert_eq!(
        post.json::<Value>().await.unwrap()["error"],
        "method_not_allowed"
    );
    for (query, text) in [
        (
            "status=bogus",
            "status \"bogus\" is not one of open, resolved",
        ),
        ("kind=weird", "kind \"weird\" is not one of"),
        ("limit=0", "limit 0 is out of range: expected 1 to 500"),
        ("limit=ten", "limit"),
        ("colour=red", "colour"),
    ] {
        let got = api
            .get(&format!("/sync/conflicts?{query}"), Some(KEY))
            .await;
        assert_error(&got, 400, "bad_request", text);
    }
    assert_error(
        &api.get("/sync/conflicts?warehouse=wh-nowhere", Some(KEY))
            .await,
        404,
        "not_found",
        "no warehouse \"wh-nowhere\" is configured",
    );

    // Three poison rows make three `invalid` conflicts; list them two at a time.
    for sku in ["SKU-1", "SKU-2", "SKU-3"] {
        db.exec(&format!(
            "INSERT INTO stock_levels (sku, location_code, qty_on_hand) VALUES ('{sku}', 'A-01', -1)"
        ))
        .await;
    }
    for _ in 0..300 {
        if conflicts(&state).await.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = api
        .get(
            "/sync/conflicts?warehouse=wh-api&status=open&kind=invalid&limit=2",
            Some(KEY),
        )
        .await;
    assert_eq!(first.0, 200, "{first:?}");
    let items = first.2["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{first:?}");
    assert!(
        items[0]["id"].as_i64() > items[1]["id"].as_i64(),
        "newest first"
    );
    assert_eq!(items[0]["kind"], "invalid");
    assert_eq!(items[0]["rule"], "quantity_non_negative");
    assert_eq!(items[0]["warehouseId"], "wh-api");
    assert!(items[0]["createdAt"].as_str().unwrap().ends_with('Z'));
    let next = first.2["next"].as_i64().expect("a next page");
    let second = api
        .get(
            &format!("/sync/conflicts?warehouse=wh-api&kind=invalid&limit=2&before={next}"),
            Some(KEY),
        )
        .await;
    let rest = second.2["items"].as_array().unwrap();
    assert_eq!(rest.len(), 1, "{second:?}");
    assert_eq!(second.2["next"], Value::Null);
    let mut skus: Vec<&str> = items
        .iter()
        .chain(rest)
        .map(|c| c["entityKey"]["sku"].as_str().unwrap())
        .collect();
    skus.sort();
    assert_eq!(skus, ["SKU-1", "SKU-2", "SKU-3"]);
    let none = api
        .get("/sync/conflicts?kind=stale_version", Some(KEY))
        .await;
    assert_eq!(none.2["items"], Value::Array(vec![]));
    assert!(
        !std::fs::read_to_string(&log).unwrap().contains(KEY),
        "the key is never logged"
    );
}

/// Starts `run` for warehouse `id` of `db` with the API on a free port (and Kafka topic
/// `kafka` when given).
/// Starts `run` for `cfg` with its API on a port of its own and the test key.
pub(crate) fn run_with_api(
    cfg: &std::path::Path,
    state: &TestDb,
    central: &Central,
    log: std::path::PathBuf,
    env: &[(&str, &str)],
) -> (Run, Api) {
    let port = free_port();
    let mut cmd = run_command(cfg, state, central, None);
    cmd.env("API_LISTEN", format!("127.0.0.1:{port}"))
        .env("API_KEYS", KEY);
    for (k, v) in env {
        cmd.env(k, v);
    }
    (start(cmd, log), Api::new(port))
}

pub(crate) fn start_with_api(
    db: &TestDb,
    state: &TestDb,
    central: &Central,
    id: &str,
    kafka: Option<&str>,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    Run,
    Api,
    std::process::Command,
) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), db, id, "");
    let log = dir.path().join("run.log");
    let port = free_port();
    let command = || {
        let mut cmd = run_command(&cfg, state, central, kafka);
        cmd.env("API_LISTEN", format!("127.0.0.1:{port}"))
            .env("API_KEYS", KEY)
            .env("SYNC_JOB_TIMEOUT_SECS", "120");
        cmd
    };
    let run = start(command(), log.clone());
    (dir, log, run, Api::new(port), command())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_cycle_succeeds_only_once_central_has_every_change_committed_before_it() {
    let db = demo_warehouse("apicycle").await;
    let state = pg().new_db("apicyclestate").await;
    // A slow central: the cycle cannot be done before the changes are.
    let central = Central::start(Faults::default()).await;
    let (_dir, log, _run, api, _) = start_with_api(&db, &state, &central, "wh-cycle", None);
    wait_streaming(&state, "wh-cycle", &log).await;
    central
        .set_faults(Faults {
            latency_ms: 1000,
            ..Faults::default()
        })
        .await;
    workload(&db.client, 7, 40).await;
    let want = expected_state(&db).await;
    let id = api.trigger("").await;
    assert_ne!(
        central.state("wh-cycle").await,
        want,
        "central is still behind when the cycle starts"
    );
    let job = api.finished(&id, &log).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", log_tail(&log));
    // Everything committed before the trigger is at central the moment the job succeeds.
    let got = central.state("wh-cycle").await;
    assert_eq!(got, want, "central lags behind a succeeded cycle");
    central.set_faults(Faults::default()).await;
    let w = &job["warehouses"][0];
    assert_eq!(w["warehouseId"], "wh-cycle");
    assert_eq!(w["done"], true);
    let target: inventorysync::Lsn = w["targetLsn"].as_str().unwrap().parse().unwrap();
    let delivered: inventorysync::Lsn = w["deliveredLsn"].as_str().unwrap().parse().unwrap();
    assert!(delivered >= target, "{job}");
    assert!(w["changesDelivered"].as_i64().unwrap() > 0, "{job}");
    assert_eq!(w["conflicts"], 0);
    for field in ["createdAt", "startedAt", "finishedAt"] {
        assert!(job[field].as_str().unwrap().ends_with('Z'), "{job}");
    }
    // An idle warehouse: a second cycle still finishes (the logical message moves it).
    let again = api
        .finished(&api.trigger(r#"{"warehouses": ["wh-cycle"]}"#).await, &log)
        .await;
    assert_eq!(again["status"], "succeeded", "{again}");
    let (status, _, list) = api
        .get("/sync/jobs?status=succeeded&kind=cycle&limit=1", Some(KEY))
        .await;
    assert_eq!(status, 200);
    assert_eq!(list["items"][0]["jobId"], again["jobId"], "newest first");
    let older = list["next"].as_str().expect("a second page");
    let (_, _, page2) = api
        .get(&format!("/sync/jobs?limit=1&before={older}"), Some(KEY))
        .await;
    assert_eq!(page2["items"][0]["jobId"], Value::from(id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_cycle_survives_a_restart_of_the_service() {
    let db = demo_warehouse("apirestart").await;
    let state = pg().new_db("apirestartstate").await;
    let central = Central::start(Faults {
        latency_ms: 400,
        ..Faults::default()
    })
    .await;
    let (_dir, log, mut run, api, mut again) =
        start_with_api(&db, &state, &central, "wh-restart", None);
    wait_streaming(&state, "wh-restart", &log).await;
    workload(&db.client, 11, 60).await;
    let want = expected_state(&db).await;
    let id = api.trigger("").await;
    // Killed while the job runs (central answers slowly).
    for _ in 0..100 {
        let (_, _, job) = api.get(&format!("/sync/status/{id}"), Some(KEY)).await;
        if job["status"] == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    run.child.kill().unwrap();
    run.child.wait().unwrap();
    let (_restarted, (_, _, job)) = api_after_restart(&api, &mut again, &log, &id).await;
    assert_eq!(job["status"], "running", "{job}");
    let job = api.finished(&id, &log).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", log_tail(&log));
    assert_eq!(central.state("wh-restart").await, want);
}

/// Restarts `run` with `command` and returns job `id` as the new process reports it.
pub(crate) async fn api_after_restart(
    api: &Api,
    command: &mut std::process::Command,
    log: &std::path::Path,
    id: &str,
) -> (Run, (u16, Option<String>, Value)) {
    let child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::OpenOptions::new().append(true).open(log).unwrap())
        .spawn()
        .unwrap();
    let run = Run { child };
    let mut up = false;
    for _ in 0..300 {
        if let Ok(r) = api.http.get(format!("{}/health", api.base)).send().await
            && r.status().is_success()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        up,
        "the restarted run never served its API; log:\n{}",
        log_tail(log)
    );
    (run, api.get(&format!("/sync/status/{id}"), Some(KEY)).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sync_routes_refuse_bad_input_with_the_exact_status() {
    let db = demo_warehouse("apibad").await;
    let state = pg().new_db("apibadstate").await;
    let central = Central::start(Faults::default()).await;
    let (_dir, log, _run, api, _) = start_with_api(&db, &state, &central, "wh-bad", None);
    wait_streaming(&state, "wh-bad", &log).await;
    let err = |got: (u16, Value), status: u16, code: &str, text: &str| {
        assert_error(&(got.0, None, got.1), status, code, text)
    };
    err(
        api.post("/sync/trigger", "{\"warehouses\": [").await,
        400,
        "bad_request",
        "not valid JSON",
    );
    err(
        api.post("/sync/trigger", "[1]").await,
        400,
        "bad_request",
        "not valid JSON",
    );
    // Issue 39: a JSON array holding null is no object, though serde reads a struct from
    // an array (it was accepted with a 202).
    for body in ["[null]", "[]", "\"wh-bad\"", "7"] {
        err(
            api.post("/sync/trigger", body).await,
            400,
            "bad_request",
            "a JSON object or null",
        );
    }
    // A NUL character, which the state DB cannot hold (it answered 500), in a query, a path
    // or a body.
    let nul = api.get("/sync/jobs?before=sync-%00", Some(KEY)).await;
    assert_error(&nul, 400, "bad_request", "NUL");
    let nul = api.get("/sync/status/sync-%00", Some(KEY)).await;
    assert_error(&nul, 400, "bad_request", "NUL");
    err(
        api.post("/sync/trigger", r#"{"warehouses": ["wh-\u0000"]}"#)
            .await,
        400,
        "bad_request",
        "NUL",
    );
    err(
        api.post("/sync/trigger", r#"{"warehouse": ["wh-bad"]}"#)
            .await,
        400,
        "bad_request",
        "unknown field `warehouse`",
    );
    err(
        api.post("/sync/trigger", r#"{"warehouses": ["wh-nowhere"]}"#)
            .await,
        422,
        "unprocessable",
        "warehouse \"wh-nowhere\" is not configured; configured: wh-bad",
    );
    err(
        api.post("/sync/trigger", r#"{"warehouses": []}"#).await,
        422,
        "unprocessable",
        "at least one warehouse",
    );
    let big = format!(r#"{{"warehouses": ["{}"]}}"#, "x".repeat(70_000));
    err(
        api.post("/sync/trigger", &big).await,
        413,
        "payload_too_large",
        "65536 bytes",
    );
    let unknown = api
        .get("/sync/status/sync-0000000000000000", Some(KEY))
        .await;
    assert_error(
        &unknown,
        404,
        "not_found",
        "no job \"sync-0000000000000000\"",
    );
    assert_error(
        &api.get("/sync/status/sync-1", None).await,
        401,
        "unauthorized",
        "API key is required",
    );
    for query in ["status=done", "kind=other", "limit=501"] {
        let got = api.get(&format!("/sync/jobs?{query}"), Some(KEY)).await;
        assert_error(&got, 400, "bad_request", "");
    }
    // Nothing was queued by the refused requests (the slot's initial load is the only job).
    let (_, _, jobs) = api.get("/sync/jobs", Some(KEY)).await;
    let kinds: Vec<&Value> = jobs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| &j["kind"])
        .collect();
    assert_eq!(kinds, [&Value::from("load")], "{jobs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_cycle_through_kafka_waits_for_the_consumer_group() {
    let db = demo_warehouse("apikafka").await;
    let state = pg().new_db("apikafkastate").await;
    let central = Central::start(Faults::default()).await;
    let topic = format!("it.{}", db.name);
    let (_dir, log, _run, api, _) =
        start_with_api(&db, &state, &central, "wh-kcycle", Some(&topic));
    wait_streaming(&state, "wh-kcycle", &log).await;
    central
        .set_faults(Faults {
            latency_ms: 1000,
            ..Faults::default()
        })
        .await;
    workload(&db.client, 5, 40).await;
    let want = expected_state(&db).await;
    let id = api.trigger("").await;
    assert_ne!(
        central.state("wh-kcycle").await,
        want,
        "central is still behind"
    );
    let job = api.finished(&id, &log).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", log_tail(&log));
    let got = central.state("wh-kcycle").await;
    if got != want {
        // A failure seen once in a loaded CI run (session 27): what the topic holds of it.
        let keys: Vec<&String> = want
            .keys()
            .filter(|k| got.get(*k) != want.get(*k))
            .collect();
        crate::consumer::topic_post_mortem(&central, "wh-kcycle", &topic, &keys).await;
        eprintln!("job: {job}\nlog:\n{}", log_tail(&log));
    }
    assert_eq!(got, want, "central lags behind a succeeded cycle");
    assert!(
        job["warehouses"][0]["changesDelivered"].as_i64().unwrap() > 0,
        "{job}"
    );
}

type Samples = Vec<(String, std::collections::BTreeMap<String, String>, f64)>;

/// `/metrics` parsed as Prometheus text: (name, labels, value) of every sample.
async fn scrape(api: &Api) -> Samples {
    let r = api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = r.text().await.unwrap();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
    scrape
        .samples
        .into_iter()
        .map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(h) => h.last().map_or(0.0, |b| b.count),
                prometheus_parse::Value::Summary(_) => 0.0,
            };
            let labels = s
                .labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            (s.metric, labels, value)
        })
        .collect()
}

/// The sum of `name`'s samples carrying `labels`.
fn sample(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.2)
        .sum()
}

/// Scrapes every 20 ms, up to `tries` times, until the sample `name` with `labels` is one that
/// `wanted` takes; the last value read.
async fn poll_sample(
    api: &Api,
    name: &str,
    labels: &[(&str, &str)],
    tries: usize,
    wanted: impl Fn(f64) -> bool,
) -> f64 {
    let mut value = f64::NAN;
    for _ in 0..tries {
        value = sample(&scrape(api).await, name, labels);
        if wanted(value) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_move_when_changes_flow() {
    let db = demo_warehouse("apimetrics").await;
    let state = pg().new_db("apimetricsstate").await;
    let central = Central::start(Faults::default()).await;
    let (_dir, log, _run, api, _) = start_with_api(&db, &state, &central, "wh-metrics", None);
    wait_streaming(&state, "wh-metrics", &log).await;
    let before = scrape(&api).await;
    let w = [("warehouse", "wh-metrics")];
    let applied = [("warehouse", "wh-metrics"), ("outcome", "applied")];
    workload(&db.client, 3, 30).await;
    db.exec(
        "INSERT INTO locations VALUES ('Z-99', 'z');
         INSERT INTO products (sku, name) VALUES ('SKU-M', 'm');
         INSERT INTO stock_levels (sku, location_code, qty_on_hand) VALUES ('SKU-M', 'Z-99', -1);",
    )
    .await;
    let mut after = scrape(&api).await;
    for _ in 0..200 {
        if sample(&after, "inventorysync_conflicts_total", &w) >= 1.0
            && sample(
                &after,
                "inventorysync_consumer_lag_events",
                &[("source", "wh-metrics")],
            ) == 0.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = scrape(&api).await;
    }
    for name in [
        "inventorysync_events_decoded_total",
        "inventorysync_events_published_total",
    ] {
        assert!(
            sample(&after, name, &w) > sample(&before, name, &w),
            "{name} did not move"
        );
    }
    assert!(
        sample(&after, "inventorysync_changes_delivered_total", &applied)
            > sample(&before, "inventorysync_changes_delivered_total", &applied)
    );
    assert!(
        sample(
            &after,
            "inventorysync_central_request_duration_seconds_count",
            &w
        ) > 0.0
    );
    let ok = [("warehouse", "wh-metrics"), ("status", "200")];
    assert!(sample(&after, "inventorysync_central_responses_total", &ok) > 0.0);
    let invalid = [("warehouse", "wh-metrics"), ("kind", "invalid")];
    assert_eq!(
        sample(&after, "inventorysync_conflicts_total", &invalid),
        1.0
    );
    let rule = [
        ("warehouse", "wh-metrics"),
        ("rule", "quantity_non_negative"),
    ];
    assert_eq!(
        sample(&after, "inventorysync_dead_letters_total", &rule),
        1.0
    );
    assert!(sample(&after, "inventorysync_batch_changes_count", &w) > 0.0);
    assert!(sample(&after, "inventorysync_produce_duration_seconds_count", &w) > 0.0);
    assert!(
        sample(
            &after,
            "inventorysync_delivered_commit_timestamp_seconds",
            &w
        ) > 1.7e9,
        "a commit time"
    );
    // Gauges read at scrape time: the slot's health (read by the stream at start and every
    // 10 s), the consumer's lag and the jobs.
    let reserved = [("warehouse", "wh-metrics"), ("status", "reserved")];
    assert_eq!(
        sample(&after, "inventorysync_slot_wal_status", &reserved),
        1.0
    );
    assert!(sample(&after, "inventorysync_retained_wal_bytes", &w) > 0.0);
    let lag = [("source", "wh-metrics")];
    assert_eq!(
        sample(&after, "inventorysync_consumer_lag_events", &lag),
        0.0
    );
    api.finished(&api.trigger("").await, &log).await;
    let jobs = scrape(&api).await;
    let succeeded = [("kind", "cycle"), ("status", "succeeded")];
    assert_eq!(sample(&jobs, "inventorysync_jobs", &succeeded), 1.0);
}

/// `inventorysync_central_changes_in_air` counts the changes of requests central holds
/// without an answer (what a crash would leave in doubt), and none once it answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_changes_in_the_air_at_central_are_counted_until_it_answers() {
    let db = demo_warehouse("apiinair").await;
    let state = pg().new_db("apiinairstate").await;
    let central = Central::start(Faults::default()).await;
    let (_dir, log, _run, api, _) = start_with_api(&db, &state, &central, "wh-air", None);
    wait_streaming(&state, "wh-air", &log).await;
    let w = [("warehouse", "wh-air")];
    let in_air = "inventorysync_central_changes_in_air";
    assert_eq!(sample(&scrape(&api).await, in_air, &w), 0.0);
    // Central applies, then holds its answer for 3 s.
    central
        .set_faults(Faults {
            answer_delay_ms: 3000,
            ..Faults::default()
        })
        .await;
    db.exec("INSERT INTO products (sku, name) VALUES ('SKU-AIR', 'held')")
        .await;
    let seen = poll_sample(&api, in_air, &w, 100, |v| v > 0.0).await;
    // One change (two while a second try of the held request is out too).
    assert!(
        (1.0..=2.0).contains(&seen),
        "{in_air} read {seen} while central held the request\n{}",
        log_tail(&log)
    );
    central.set_faults(Faults::default()).await;
    crate::consumer::assert_converges(&central, &db, "wh-air", &log).await;
    let left = poll_sample(&api, in_air, &w, 250, |v| v == 0.0).await;
    assert_eq!(
        left,
        0.0,
        "{in_air} once central answered\n{}",
        log_tail(&log)
    );
}

/// `inventorysync_central_changes_unsettled` counts the changes central answered whose lane
/// position is not stored yet (what a crash would send again although central holds them),
/// and none once it is: here the state DB holds the write back with a lock on
/// `consumer_lanes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answered_changes_are_counted_unsettled_until_their_lane_position_is_stored() {
    let db = demo_warehouse("apiunsettled").await;
    let state = pg().new_db("apiunsettledstate").await;
    let central = Central::start(Faults::default()).await;
    let (_dir, log, _run, api, _) = start_with_api(&db, &state, &central, "wh-uns", None);
    wait_streaming(&state, "wh-uns", &log).await;
    let w = [("warehouse", "wh-uns")];
    let unsettled = "inventorysync_central_changes_unsettled";
    assert_eq!(sample(&scrape(&api).await, unsettled, &w), 0.0);
    state
        .exec("BEGIN; LOCK TABLE consumer_lanes IN SHARE MODE")
        .await;
    db.exec("INSERT INTO products (sku, name) VALUES ('SKU-UNS', 'answered')")
        .await;
    crate::consumer::assert_converges(&central, &db, "wh-uns", &log).await;
    let seen = poll_sample(&api, unsettled, &w, 250, |v| v > 0.0).await;
    assert_eq!(
        seen,
        1.0,
        "{unsettled} while the state DB held the write back\n{}",
        log_tail(&log)
    );
    state.exec("COMMIT").await;
    let left = poll_sample(&api, unsettled, &w, 250, |v| v == 0.0).await;
    assert_eq!(
        left,
        0.0,
        "{unsettled} once the lane position was stored\n{}",
        log_tail(&log)
    );
    let stored: i64 = state
        .client
        .query_one(
            "SELECT count(*) FROM consumer_lanes WHERE warehouse_id = 'wh-uns'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stored >= 1, "no lane position stored\n{}", log_tail(&log));
}

/// Issue 16: a kill -9 once central had answered everything sent and every lane position was
/// stored (both gauges at 0) sends central nothing again, although the restart reads every
/// change again from the slot's older checkpoint (its writes held back by a lock meanwhile):
/// each is skipped as replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_once_every_outcome_was_stored_sends_central_nothing_again() {
    let db = demo_warehouse("apikillsettled").await;
    let state = pg().new_db("apikillsettledstate").await;
    let central = Central::start(Faults::default()).await;
    let (dir, log, mut run, api, mut again) =
        start_with_api(&db, &state, &central, "wh-settled", None);
    wait_streaming(&state, "wh-settled", &log).await;
    state
        .exec("BEGIN; LOCK TABLE replication_checkpoints IN SHARE MODE")
        .await;
    workload(&db.client, 17, 300).await;
    crate::consumer::assert_converges(&central, &db, "wh-settled", &log).await;
    let w = [("warehouse", "wh-settled")];
    for gauge in [
        "inventorysync_central_changes_in_air",
        "inventorysync_central_changes_unsettled",
    ] {
        let left = poll_sample(&api, gauge, &w, 250, |v| v == 0.0).await;
        assert_eq!(left, 0.0, "{gauge}\n{}", log_tail(&log));
    }
    let sent = |s: &Value| {
        ["applied", "duplicate", "stale", "rejected"]
            .iter()
            .map(|k| s[k].as_u64().unwrap())
            .sum::<u64>()
    };
    let before = central.stats().await;
    run.child.kill().unwrap(); // SIGKILL
    run.child.wait().unwrap();
    state.exec("COMMIT").await;
    let log = dir.path().join("again.log");
    std::fs::write(&log, "").unwrap();
    let (_again, _) = api_after_restart(&api, &mut again, &log, "sync-none").await;
    let replayed = [("outcome", "replayed"), ("warehouse", "wh-settled")];
    let skipped = poll_sample(
        &api,
        "inventorysync_changes_delivered_total",
        &replayed,
        500,
        |v| v >= 300.0,
    )
    .await;
    assert!(
        skipped >= 300.0,
        "the restart read the workload again from the older checkpoint and skipped it: {skipped}\n{}",
        log_tail(&log)
    );
    crate::consumer::assert_converges(&central, &db, "wh-settled", &log).await;
    let after = central.stats().await;
    assert_eq!(
        sent(&after),
        sent(&before),
        "the restart sent central changes it had: {after}\n{}",
        log_tail(&log)
    );
}

/// Stock levels enough for several resync chunks (1,000 rows each).
pub(crate) async fn seed_stock(db: &TestDb, skus: usize, locations: usize) {
    db.exec(&format!(
        "INSERT INTO products (sku, name) SELECT 'SKU-' || g, 'product ' || g FROM generate_series(1, {skus}) g;
         INSERT INTO locations SELECT 'L-' || g, 'zone ' || g FROM generate_series(1, {locations}) g;
         INSERT INTO stock_levels (sku, location_code, qty_on_hand, qty_reserved)
           SELECT 'SKU-' || s, 'L-' || l, (s * l) % 50, 0
             FROM generate_series(1, {skus}) s, generate_series(1, {locations}) l;"
    ))
    .await;
}

/// Keeps changing (and deleting) stock levels until `stop`, from step `from` of the sequence
/// on (writers with different `from` touch different rows at a time).
pub(crate) fn keep_writing(
    db: &TestDb,
    stop: tokio_util::sync::CancellationToken,
    from: u64,
) -> tokio::task::JoinHandle<u64> {
    let url = db.url_as("postgres");
    tokio::spawn(async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut n = from;
        while !stop.is_cancelled() {
            n += 1;
            client
                .batch_execute(&format!(
                    "UPDATE stock_levels SET qty_on_hand = qty_on_hand + 1
                      WHERE sku = 'SKU-{}' AND location_code = 'L-{}';
                     DELETE FROM stock_levels WHERE sku = 'SKU-{}' AND location_code = 'L-{}';",
                    1 + n % 300,
                    1 + n % 10,
                    1 + (n * 7) % 300,
                    1 + (n * 3) % 10
                ))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        n - from
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_repairs_a_wiped_or_tampered_central_while_writes_go_on() {
    let db = demo_warehouse("apiresync").await;
    seed_stock(&db, 300, 10).await;
    let state = pg().new_db("apiresyncstate").await;
    let central = Central::start(Faults::default()).await;
    let (_dir, log, _run, api, _) = start_with_api(&db, &state, &central, "wh-resync", None);
    crate::consumer::assert_converges(&central, &db, "wh-resync", &log).await;
    // Bad inputs first.
    assert_error(
        &{
            let (s, v) = api.post("/sync/warehouses/wh-nowhere", "").await;
            (s, None, v)
        },
        404,
        "not_found",
        "no warehouse \"wh-nowhere\" is configured",
    );
    // An open conflict: a poison row, fixed at the warehouse afterwards.
    db.exec(
        "UPDATE stock_levels SET qty_on_hand = -1 WHERE sku = 'SKU-299' AND location_code = 'L-9'",
    )
    .await;
    for _ in 0..300 {
        if !conflicts(&state).await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    db.exec(
        "UPDATE stock_levels SET qty_on_hand = 4 WHERE sku = 'SKU-299' AND location_code = 'L-9'",
    )
    .await;
    for (round, tamper) in [(0, false), (1, true)] {
        central.damage("wh-resync", tamper).await;
        let stop = tokio_util::sync::CancellationToken::new();
        let writer = keep_writing(&db, stop.clone(), 0);
        let (status, v) = api.post("/sync/warehouses/wh-resync", "").await;
        assert_eq!(status, 202, "{v}");
        let id = v["jobId"].as_str().unwrap().to_string();
        // A second resync of the same warehouse while this one runs: 409 naming it.
        let (status, again) = api.post("/sync/warehouses/wh-resync", "").await;
        assert_eq!(status, 409, "{again}");
        assert_eq!(again["error"], "conflict");
        assert_eq!(again["jobId"], Value::from(id.clone()));
        let job = api.finished(&id, &log).await;
        stop.cancel();
        let writes = writer.await.unwrap();
        assert!(writes > 0);
        assert_eq!(
            job["status"],
            "succeeded",
            "round {round}: {job}\n{}",
            log_tail(&log)
        );
        assert_eq!(job["kind"], "resync");
        // Every row the resync read went through: central equals the warehouse, with the
        // writes made during the resync (none of them undone by an older chunk row).
        crate::consumer::assert_converges(&central, &db, "wh-resync", &log).await;
        let chunks: i64 = state
            .client
            .query_one(
                "SELECT sum(chunks)::bigint FROM sync_resync_progress WHERE job_id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        // stock_levels (about 3,000 rows) takes several chunks; products and locations one.
        assert!(chunks >= 5, "round {round}: {chunks} chunks");
    }
    // The resync delivered the fixed row: its conflict is resolved.
    let c = conflicts(&state).await;
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(c[0]["kind"], "invalid");
    assert_eq!(c[0]["status"], "resolved", "{c:?}");
    assert!(c[0]["resolved_at"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_through_kafka_succeeds_only_once_the_group_delivered_its_rows() {
    let db = demo_warehouse("apikresync").await;
    seed_stock(&db, 100, 10).await;
    let state = pg().new_db("apikresyncstate").await;
    let central = Central::start(Faults::default()).await;
    let topic = format!("it.{}", db.name);
    let (_dir, log, _run, api, _) =
        start_with_api(&db, &state, &central, "wh-kresync", Some(&topic));
    crate::consumer::assert_converges(&central, &db, "wh-kresync", &log).await;
    central.damage("wh-kresync", false).await;
    // Central answers slowly: the rows are on the topic long before they are delivered.
    central
        .set_faults(Faults {
            latency_ms: 400,
            ..Faults::default()
        })
        .await;
    let want = expected_state(&db).await;
    let (status, v) = api.post("/sync/warehouses/wh-kresync", "").await;
    assert_eq!(status, 202, "{v}");
    let id = v["jobId"].as_str().unwrap().to_string();
    let job = api.finished(&id, &log).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", log_tail(&log));
    assert_eq!(
        central.state("wh-kresync").await,
        want,
        "a succeeded resync left central behind the warehouse"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_restarted_in_the_middle_resumes_from_the_saved_chunk() {
    let db = demo_warehouse("apiresume").await;
    seed_stock(&db, 300, 40).await;
    let state = pg().new_db("apiresumestate").await;
    let central = Central::start(Faults::default()).await;
    let (_dir, log, mut run, api, mut again) =
        start_with_api(&db, &state, &central, "wh-resume", None);
    crate::consumer::assert_converges(&central, &db, "wh-resume", &log).await;
    central.damage("wh-resume", false).await;
    // Slow answers: the resync takes several seconds, so it is stopped mid-way.
    central
        .set_faults(Faults {
            latency_ms: 300,
            ..Faults::default()
        })
        .await;
    let (status, v) = api.post("/sync/warehouses/wh-resume", "").await;
    assert_eq!(status, 202, "{v}");
    let id = v["jobId"].as_str().unwrap().to_string();
    let mut chunks_before = 0i64;
    for _ in 0..300 {
        chunks_before = saved(&state, &id).await.get(0);
        if chunks_before >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(chunks_before >= 1, "no chunk saved\n{}", log_tail(&log));
    run.child.kill().unwrap();
    run.child.wait().unwrap();
    central.set_faults(Faults::default()).await;
    let (_restarted, _) = api_after_restart(&api, &mut again, &log, &id).await;
    let job = api.finished(&id, &log).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", log_tail(&log));
    crate::consumer::assert_converges(&central, &db, "wh-resume", &log).await;
    let row = saved(&state, &id).await;
    let (chunks, read): (i64, i64) = (row.get(0), row.get(1));
    let rows: i64 = db
        .client
        .query_one("SELECT count(*) FROM stock_levels", &[])
        .await
        .unwrap()
        .get(0);
    // Resumed, not restarted: every row read once (a restart from the start would read the
    // saved chunks again).
    assert_eq!(read, rows, "{chunks} chunks");
    assert!(chunks > chunks_before);
}

/// Chunks saved and rows read of job `id`'s resync of stock_levels.
async fn saved(state: &TestDb, id: &str) -> tokio_postgres::Row {
    state
        .client
        .query_one(
            "SELECT coalesce(sum(chunks), 0)::bigint, coalesce(sum(rows_read), 0)::bigint
               FROM sync_resync_progress WHERE job_id = $1 AND table_name = 'public.stock_levels'",
            &[&id],
        )
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_exactly_the_routes_the_server_answers() {
    let db = demo_warehouse("apidoc").await;
    let state = pg().new_db("apidocstate").await;
    let central = Central::start(Faults::default()).await;
    let (_dir, log, _run, api, _) = start_with_api(&db, &state, &central, "wh-doc", None);
    wait_streaming(&state, "wh-doc", &log).await;
    let (status, _, doc) = api.get("/openapi.json", None).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    let mut listed: Vec<(String, String)> = paths
        .iter()
        .flat_map(|(p, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.to_uppercase(), p.clone()))
        })
        .collect();
    listed.sort();
    let expected = [
        ("GET", "/console"),
        ("GET", "/console/console.css"),
        ("GET", "/console/console.js"),
        ("GET", "/health"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/ready"),
        ("GET", "/sync/conflicts"),
        ("GET", "/sync/dead-letters"),
        ("GET", "/sync/jobs"),
        ("GET", "/sync/overview"),
        ("GET", "/sync/status/{job_id}"),
        ("GET", "/sync/workers"),
        ("PATCH", "/sync/conflicts/{id}"),
        ("POST", "/sync/dead-letters/{id}/replay"),
        ("POST", "/sync/trigger"),
        ("POST", "/sync/verify"),
        ("POST", "/sync/warehouses/{warehouse_id}"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(listed, expected);
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    // Bodies refuse unknown fields, as declared; a trigger names only configured warehouses.
    let schemas = &doc["components"]["schemas"];
    for body in ["TriggerBody", "CloseBody"] {
        assert_eq!(
            schemas[body]["additionalProperties"], false,
            "{body}: {}",
            schemas[body]
        );
    }
    let list = &schemas["TriggerBody"]["properties"]["warehouses"];
    assert_eq!(
        list["items"]["enum"],
        serde_json::json!(["wh-doc"]),
        "{list}"
    );
    assert_eq!(list["minItems"], 1, "{list}");
    let trigger = &doc["paths"]["/sync/trigger"]["post"];
    assert_ne!(
        trigger["requestBody"]["required"], true,
        "the body is optional: {trigger}"
    );
    assert_eq!(
        trigger["responses"]["202"]["links"]["status"]["operationId"], "job_status",
        "{trigger}"
    );
    for (method, path) in &listed {
        let op = &doc["paths"][path][method.to_lowercase()];
        if path.starts_with("/sync/") && path != "/sync/overview" {
            assert!(
                op["responses"]["500"].is_object(),
                "{method} {path}: 500 documented"
            );
        }
        assert_eq!(
            path.starts_with("/sync/"),
            op["security"].is_array(),
            "{method} {path}: Bearer exactly on /sync routes"
        );
        // The server has each documented route: without a key a /sync route answers 401,
        // never 404 or 405.
        let url = format!(
            "{}{}",
            api.base,
            path.replace("{job_id}", "sync-0")
                .replace("{warehouse_id}", "wh-doc")
                .replace("{id}", "1")
        );
        let r = match method.as_str() {
            "GET" => api.http.get(&url),
            "PATCH" => api.http.patch(&url),
            _ => api.http.post(&url),
        }
        .send()
        .await
        .unwrap();
        let code = r.status().as_u16();
        assert!(code != 404 && code != 405, "{method} {path}: {code}");
        if path.starts_with("/sync/") {
            assert_eq!(code, 401, "{method} {path}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_slot_is_recovered_by_a_forced_resync() {
    let db = crate::harness::pg_small_keep().new_db("apilost").await;
    db.exec(include_str!("../../sql/demo_schema.sql")).await;
    db.exec("CREATE PUBLICATION inventorysync FOR TABLE products, locations, stock_levels; CREATE TABLE filler (id int PRIMARY KEY, pad text);")
        .await;
    seed_stock(&db, 100, 5).await;
    let state = pg().new_db("apiloststate").await;
    let central = Central::start(Faults::default()).await;
    let (_dir, log, mut run, api, mut again) =
        start_with_api(&db, &state, &central, "wh-lost", None);
    crate::consumer::assert_converges(&central, &db, "wh-lost", &log).await;
    run.child.kill().unwrap();
    run.child.wait().unwrap();
    // While the service is down: changes, then so much WAL that the slot loses what it needs.
    db.exec(
        "UPDATE stock_levels SET qty_on_hand = qty_on_hand + 7 WHERE sku IN ('SKU-1', 'SKU-2');
             INSERT INTO products (sku, name) VALUES ('SKU-NEW', 'made while down');",
    )
    .await;
    for _ in 0..6 {
        db.exec("INSERT INTO filler SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g ON CONFLICT (id) DO UPDATE SET pad = excluded.pad || '1'; SELECT pg_switch_wal();")
            .await;
    }
    db.exec("CHECKPOINT").await;
    for _ in 0..50 {
        let status: Option<String> = db
            .client
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.slot("run")],
            )
            .await
            .unwrap()
            .get(0);
        if status.as_deref() == Some("lost") {
            break;
        }
        db.exec("INSERT INTO filler SELECT g, repeat('y', 100) FROM generate_series(1, 20000) g ON CONFLICT (id) DO UPDATE SET pad = excluded.pad || '2'; SELECT pg_switch_wal(); CHECKPOINT;")
            .await;
    }
    let (mut restarted, _) = api_after_restart(&api, &mut again, &log, "sync-none").await;
    // Not ready, and saying why and what to do; the service stays up meanwhile.
    let mut ready = api.get("/ready", None).await;
    for _ in 0..100 {
        if ready.2["warehouses"]["wh-lost"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("lost"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(Some(exit)) = restarted.child.try_wait() {
            panic!(
                "run exited ({exit}) with a lost slot; log:\n{}",
                log_tail(&log)
            );
        }
        ready = api.get("/ready", None).await;
    }
    assert_eq!(ready.0, 503, "{ready:?}\n{}", log_tail(&log));
    let reason = ready.2["warehouses"]["wh-lost"]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("POST /sync/warehouses/wh-lost"), "{reason}");
    let (status, v) = api.post("/sync/warehouses/wh-lost", "").await;
    assert_eq!(status, 202, "{v}");
    let job = api.finished(v["jobId"].as_str().unwrap(), &log).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", log_tail(&log));
    // The changes made while the slot was being lost are at central, and streaming goes on.
    db.exec("UPDATE products SET name = 'after recovery' WHERE sku = 'SKU-NEW'")
        .await;
    crate::consumer::assert_converges(&central, &db, "wh-lost", &log).await;
    assert_eq!(api.get("/ready", None).await.0, 200);
}

/// Issue 14, item 7: a network partition that drops every packet without a word (a proxy
/// that stops forwarding; the server's wal_sender_timeout is 10 s). `/ready` and the metrics
/// say the warehouse is not streaming within 30 s; once healed, the stream resumes within
/// 30 s, a row written during the partition reaches central, and nothing is loaded again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_network_partition_is_noticed_and_the_stream_resumes_after_it() {
    let db = demo_warehouse("netsplit").await;
    db.exec(&format!(
        "ALTER DATABASE {} SET wal_sender_timeout = '10s'",
        db.name
    ))
    .await;
    let proxy = crate::harness::Proxy::start(db.port).await;
    let state = pg().new_db("netsplitstate").await;
    let central = Central::start(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &db, "wh-split", "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("127.0.0.1:{}/", db.port),
        &format!("127.0.0.1:{}/", proxy.port),
    );
    std::fs::write(&cfg, text).unwrap();
    let log = dir.path().join("run.log");
    let (_run, api) = run_with_api(&cfg, &state, &central, log.clone(), &[]);
    wait_streaming(&state, "wh-split", &log).await;
    db.exec("INSERT INTO products (sku, name) VALUES ('SKU-1', 'before')")
        .await;
    crate::consumer::assert_converges(&central, &db, "wh-split", &log).await;
    let streaming = |v: &Value| v["warehouses"]["wh-split"]["streaming"] == true;
    assert!(streaming(&api.get("/ready", None).await.2));

    proxy.partition(true);
    let cut = std::time::Instant::now();
    db.exec("INSERT INTO products (sku, name) VALUES ('SKU-2', 'during the partition')")
        .await;
    let mut ready = Value::Null;
    while cut.elapsed() < Duration::from_secs(30) {
        ready = api.get("/ready", None).await.2;
        if !streaming(&ready) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let noticed = cut.elapsed();
    assert!(
        !streaming(&ready),
        "/ready still says streaming {noticed:?} into the partition: {ready}\n{}",
        log_tail(&log)
    );
    let w = [("warehouse", "wh-split")];
    assert_eq!(
        sample(&scrape(&api).await, "inventorysync_warehouse_ready", &w),
        0.0
    );
    // The partition lasts 30 s in all (several reconnects meet it).
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(cut.elapsed())).await;
    proxy.partition(false);
    let healed = std::time::Instant::now();
    crate::consumer::assert_converges(&central, &db, "wh-split", &log).await;
    let resumed = healed.elapsed();
    assert!(
        resumed <= Duration::from_secs(30),
        "the row written during the partition took {resumed:?} after healing\n{}",
        log_tail(&log)
    );
    assert!(streaming(&api.get("/ready", None).await.2));
    assert_eq!(
        sample(&scrape(&api).await, "inventorysync_warehouse_ready", &w),
        1.0
    );
    let loads: i64 = state
        .client
        .query_one("SELECT count(*) FROM sync_jobs WHERE kind = 'load'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(loads, 1, "no load after the reconnect\n{}", log_tail(&log));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("no message from the warehouse server")
            || text.contains("the warehouse's SQL session did not answer"),
        "the log says why the stream restarted\n{}",
        log_tail(&log)
    );
    assert!(
        !text.contains("the pipeline ended without an error"),
        "{}",
        log_tail(&log)
    );
    eprintln!("noticed after {noticed:?}, resumed {resumed:?} after healing");
}

/// Issue 14, item 8: a resync asked for while the stream lags more than 30 s behind (central
/// slowed down to at most 80 changes a second, a backlog of 45,000) still finishes, without a
/// chunk given up and asked for again: a chunk's answer comes once the stream has decoded its
/// high watermark, however long the lag makes that. (The backlog is larger than the
/// embedded queue, so the stream's decoding lags, not only the delivery.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_under_more_lag_than_a_chunk_used_to_wait_still_finishes() {
    let db = demo_warehouse("laggedresync").await;
    seed_stock(&db, 300, 10).await;
    let state = pg().new_db("laggedresyncstate").await;
    let central = Central::start(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &db, "wh-lag", "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("max_changes = 500", "max_changes = 10");
    std::fs::write(&cfg, text).unwrap();
    let log = dir.path().join("run.log");
    let (_run, api) = run_with_api(
        &cfg,
        &state,
        &central,
        log.clone(),
        &[("SYNC_JOB_TIMEOUT_SECS", "300")],
    );
    crate::consumer::assert_converges(&central, &db, "wh-lag", &log).await;
    // A second per request of at most 10 changes on 8 lanes: 3,000 changes take about 40 s.
    central
        .set_faults(Faults {
            latency_ms: 1000,
            ..Faults::default()
        })
        .await;
    // 45,000 changes: more than the embedded queue and the pipeline's channels hold (about
    // 33,000), so the stream itself falls behind, by more than 30 s at this pace.
    for _ in 0..15 {
        db.exec("UPDATE stock_levels SET qty_on_hand = qty_on_hand + 1")
            .await;
    }
    let (status, v) = api.post("/sync/warehouses/wh-lag", "").await;
    assert_eq!(status, 202, "{v}");
    let id = v["jobId"].as_str().unwrap().to_string();
    // Past the old 30 s chunk timeout, central speeds up again so the test ends soon.
    tokio::time::sleep(Duration::from_secs(36)).await;
    central.set_faults(Faults::default()).await;
    let job = api.finished(&id, &log).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", log_tail(&log));
    crate::consumer::assert_converges(&central, &db, "wh-lag", &log).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("resync chunk unanswered"),
        "a chunk was given up under lag:\n{}",
        log_tail(&log)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_are_closed_by_name_and_dead_letters_replayed_once_their_cause_is_fixed() {
    use reqwest::Method;
    let db = demo_warehouse("flow").await;
    db.exec("INSERT INTO locations VALUES ('A-01', 'north')")
        .await;
    let state = pg().new_db("flowstate").await;
    // Central rejects every change of SKU-2 until told otherwise.
    let central = Central::start(Faults {
        reject_key_substring: Some("SKU-2".into()),
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &db, "wh-flow", "");
    let log = dir.path().join("run.log");
    let (_run, api) = run_with_api(&cfg, &state, &central, log.clone(), &[]);
    wait_streaming(&state, "wh-flow", &log).await;
    // A row that breaks a rule here, and two changes central rejects.
    db.exec(
        "INSERT INTO products (sku, name) VALUES ('SKU-1', 'one'), ('SKU-2', 'two');
         INSERT INTO stock_levels (sku, location_code, qty_on_hand) VALUES ('SKU-1', 'A-01', -1), ('SKU-2', 'A-01', 7);",
    )
    .await;
    let mut letters = Value::Null;
    for _ in 0..300 {
        letters = api
            .get("/sync/dead-letters?warehouse=wh-flow", Some(KEY))
            .await
            .2;
        if letters["items"].as_array().is_some_and(|i| i.len() >= 3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let items = letters["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 3, "{letters}\n{}", log_tail(&log));
    let by_rule = |rule: &str| -> Vec<Value> {
        items
            .iter()
            .filter(|d| d["rule"] == rule)
            .cloned()
            .collect()
    };
    let invalid = by_rule("quantity_non_negative");
    let rejected = by_rule("central_rejected");
    assert_eq!((invalid.len(), rejected.len()), (1, 2), "{letters}");
    assert_eq!(invalid[0]["replays"], 0);
    assert_eq!(invalid[0]["replayOutcome"], Value::Null);
    assert!(invalid[0]["createdAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(invalid[0]["event"]["after"]["qty_on_hand"], -1);

    // Filters and pages.
    let one = api
        .get(
            "/sync/dead-letters?rule=central_rejected&limit=1",
            Some(KEY),
        )
        .await;
    assert_eq!(one.0, 200, "{one:?}");
    assert_eq!(one.2["items"].as_array().unwrap().len(), 1);
    let next = one.2["next"].as_i64().expect("a second page");
    let two = api
        .get(
            &format!("/sync/dead-letters?rule=central_rejected&limit=1&before={next}"),
            Some(KEY),
        )
        .await;
    assert_eq!(two.2["items"].as_array().unwrap().len(), 1, "{two:?}");
    assert_eq!(two.2["next"], Value::Null);
    let table = api
        .get(
            "/sync/dead-letters?table=public.products&replayed=false",
            Some(KEY),
        )
        .await;
    assert_eq!(table.2["items"].as_array().unwrap().len(), 1, "{table:?}");
    for (query, status, text) in [
        ("replayed=maybe", 400, "replayed"),
        (
            "limit=501",
            400,
            "limit 501 is out of range: expected 1 to 500",
        ),
        ("colour=red", 400, "colour"),
        (
            "warehouse=wh-nowhere",
            404,
            "no warehouse \"wh-nowhere\" is configured",
        ),
    ] {
        let got = api
            .get(&format!("/sync/dead-letters?{query}"), Some(KEY))
            .await;
        let code = if status == 400 {
            "bad_request"
        } else {
            "not_found"
        };
        assert_error(&got, status, code, text);
    }
    assert_error(
        &api.get("/sync/dead-letters", None).await,
        401,
        "unauthorized",
        "",
    );

    // Replays: the invalid row still breaks its rule and is not sent; the rejected ones
    // are rejected again until central accepts them, then applied.
    let replay = |id: &Value| format!("/sync/dead-letters/{id}/replay");
    let (status, again) = api.post(&replay(&invalid[0]["id"]), "").await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["replayOutcome"], "invalid", "{again}");
    let detail = again["replayDetail"].as_str().unwrap();
    assert!(
        detail.contains("quantity_non_negative") && detail.contains("on_hand"),
        "{detail}"
    );
    assert_eq!(again["replays"], 1);
    let by = again["replayedBy"].as_str().unwrap().to_string();
    let fingerprint: String = Sha256::digest(KEY.as_bytes())[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(by, format!("key sha256:{fingerprint}"));
    let stock = rejected
        .iter()
        .find(|d| d["tableName"] == "public.stock_levels")
        .unwrap();
    let (_, still) = api.post(&replay(&stock["id"]), "").await;
    assert_eq!(still["replayOutcome"], "rejected", "{still}");
    central.set_faults(Faults::default()).await;
    for d in &rejected {
        let (status, done) = api.post(&replay(&d["id"]), "").await;
        assert_eq!(status, 200, "{done}");
        assert_eq!(done["replayOutcome"], "applied", "{done}");
        assert!(
            done["replayDetail"]
                .as_str()
                .unwrap()
                .contains(d["sourceVersion"].as_str().unwrap())
        );
    }
    let (_, twice) = api.post(&replay(&stock["id"]), "").await;
    assert_eq!(
        (&twice["replayOutcome"], &twice["replays"]),
        (&Value::from("duplicate"), &Value::from(3)),
        "{twice}"
    );
    let held = central.state("wh-flow").await;
    assert_eq!(
        held.get(r#"stock_level {"location":"A-01","sku":"SKU-2"}"#)
            .map(|s| &s["on_hand"]),
        Some(&Value::from(7)),
        "{held:?}"
    );
    assert_eq!(
        held.get(r#"product {"sku":"SKU-2"}"#).map(|p| &p["name"]),
        Some(&Value::from("two")),
        "{held:?}"
    );
    assert!(
        !held
            .keys()
            .any(|k| k.contains("SKU-1") && k.starts_with("stock_level")),
        "{held:?}"
    );
    // Central has them now: the conflicts recorded with them are resolved by the replayer.
    let rejections = api.get("/sync/conflicts?kind=rejected", Some(KEY)).await;
    let rejections = rejections.2["items"].as_array().unwrap().clone();
    assert_eq!(rejections.len(), 2, "{rejections:?}");
    for c in &rejections {
        assert_eq!(
            (&c["status"], &c["resolvedBy"]),
            (&Value::from("resolved"), &Value::from(by.clone())),
            "{c}"
        );
    }
    let replayed = api.get("/sync/dead-letters?replayed=true", Some(KEY)).await;
    assert_eq!(
        replayed.2["items"].as_array().unwrap().len(),
        3,
        "{replayed:?}"
    );
    assert_error(
        &api.post("/sync/dead-letters/999999/replay", "")
            .await
            .into_error(),
        404,
        "not_found",
        "no dead letter has id 999999",
    );
    assert_error(
        &api.post("/sync/dead-letters/abc/replay", "")
            .await
            .into_error(),
        400,
        "bad_request",
        "dead letter id \"abc\" is not a number",
    );

    // Conflicts: closed by name, once; the listing filters by the new status.
    let open = api
        .get("/sync/conflicts?kind=invalid&status=open", Some(KEY))
        .await;
    let conflict = open.2["items"][0].clone();
    assert_eq!(conflict["rule"], "quantity_non_negative", "{open:?}");
    let path = format!("/sync/conflicts/{}", conflict["id"]);
    let note = "the warehouse recounts SKU-1 on Monday";
    let (status, closed) = api
        .send(
            Method::PATCH,
            &path,
            &serde_json::json!({"status": "ignored", "note": note}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{closed}");
    assert_eq!(closed["status"], "ignored");
    assert_eq!(closed["resolvedBy"], Value::from(by.clone()));
    assert_eq!(closed["resolutionNote"], note);
    let at = closed["resolvedAt"].as_str().unwrap().to_string();
    let (status, same) = api
        .send(Method::PATCH, &path, r#"{"status": "ignored"}"#)
        .await;
    assert_eq!(
        (status, same["resolvedAt"].as_str()),
        (200, Some(at.as_str())),
        "{same}"
    );
    assert_eq!(
        same["resolutionNote"], note,
        "a retried close changes nothing"
    );
    let (status, other) = api
        .send(Method::PATCH, &path, r#"{"status": "resolved"}"#)
        .await;
    assert_eq!(status, 409, "{other}");
    let message = other["message"].as_str().unwrap();
    assert!(
        message.contains("is ignored already") && message.contains(&by),
        "{message}"
    );
    let long = "x".repeat(2001);
    for (body, status, code, text) in [
        (
            r#"{"status": "open"}"#.to_string(),
            422,
            "unprocessable",
            "status \"open\" is not one of resolved, ignored",
        ),
        (String::new(), 422, "unprocessable", "a body is required"),
        (
            r#"{"status": "resolved", "colour": 1}"#.to_string(),
            400,
            "bad_request",
            "unknown field `colour`",
        ),
        (
            r#"{"status": "resolved""#.to_string(),
            400,
            "bad_request",
            "not valid JSON",
        ),
        (
            serde_json::json!({"status": "resolved", "note": long}).to_string(),
            422,
            "unprocessable",
            "note has 2001 characters",
        ),
    ] {
        let got = api.send(Method::PATCH, &path, &body).await;
        assert_error(&got.into_error(), status, code, text);
    }
    for (path, status, code, text) in [
        (
            "/sync/conflicts/999999",
            404,
            "not_found",
            "no conflict has id 999999",
        ),
        (
            "/sync/conflicts/x",
            400,
            "bad_request",
            "conflict id \"x\" is not a number",
        ),
    ] {
        let got = api
            .send(Method::PATCH, path, r#"{"status": "resolved"}"#)
            .await;
        assert_error(&got.into_error(), status, code, text);
    }
    let ignored = api.get("/sync/conflicts?status=ignored", Some(KEY)).await;
    assert_eq!(
        ignored.2["items"].as_array().unwrap().len(),
        1,
        "{ignored:?}"
    );
    assert!(
        !std::fs::read_to_string(&log).unwrap().contains(KEY),
        "the key is never logged"
    );
}

/// A `(status, body)` answer in the shape [`assert_error`] reads.
trait IntoError {
    fn into_error(self) -> (u16, Option<String>, Value);
}

impl IntoError for (u16, Value) {
    fn into_error(self) -> (u16, Option<String>, Value) {
        (self.0, None, self.1)
    }
}

/// The schemathesis CLI `scripts/test` installs into a virtual environment (see
/// scripts/lib/schemathesis.sh), found as it leaves it when the variable is not set.
fn schemathesis() -> std::path::PathBuf {
    let st = std::env::var_os("INVENTORYSYNC_TEST_SCHEMATHESIS")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(std::path::PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache"))
                })?;
            Some(cache.join("inventorysync/schemathesis/bin/st"))
        })
        .unwrap_or_default();
    assert!(
        st.exists(),
        "the OpenAPI test needs schemathesis ({}): scripts/test installs it",
        st.display()
    );
    st
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_answer_the_openapi_document_does_not_allow() {
    let st = schemathesis();
    let db = demo_warehouse("fuzz").await;
    db.exec("INSERT INTO locations VALUES ('A-01', 'north'); INSERT INTO products (sku, name) VALUES ('SKU-1', 'one');
             INSERT INTO stock_levels (sku, location_code, qty_on_hand) VALUES ('SKU-1', 'A-01', -1);")
        .await;
    let state = pg().new_db("fuzzstate").await;
    let central = Central::start(Faults::default()).await;
    let (_dir, log, _run, api, _) = start_with_api(&db, &state, &central, "wh-fuzz", None);
    wait_streaming(&state, "wh-fuzz", &log).await;
    for key in [Some(KEY), None] {
        let mut cmd = tokio::process::Command::new(&st);
        cmd.args(["--no-color", "run"])
            .arg(format!("{}/openapi.json", api.base))
            .args(["--checks", "all", "-n", "30"]);
        // CI keeps one fixed seed; INVENTORYSYNC_SCHEMATHESIS_SEED=N runs a fresh one.
        match std::env::var("INVENTORYSYNC_SCHEMATHESIS_SEED") {
            Ok(seed) => cmd.args(["--seed", &seed]),
            Err(_) => cmd.arg("--generation-deterministic"),
        };
        cmd.args(["--request-timeout", "20"]).kill_on_drop(true);
        if let Some(k) = key {
            cmd.args(["-H", &format!("Authorization: Bearer {k}")]);
        }
        let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
            .await
            .expect("schemathesis finished within 5 minutes")
            .expect("schemathesis runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "schemathesis (key: {}) found answers the document does not allow:\n{stdout}\n{}\n{}",
            key.is_some(),
            String::from_utf8_lossy(&out.stderr),
            log_tail(&log)
        );
        // With the key, the stateful phase followed the documented links (a job id from a
        // trigger or a resync into GET /sync/status/{job_id}).
        if key.is_some() {
            let covered = stdout
                .lines()
                .find_map(|l| l.trim().strip_prefix("API Links:"))
                .and_then(|l| l.split_whitespace().next()?.parse::<u32>().ok());
            assert!(
                covered.is_some_and(|n| n >= 1),
                "no link followed:\n{stdout}"
            );
        }
    }
}
