//! The HTTP API of `run`: auth, JSON errors, readiness and the conflicts listing, against a
//! real `run` process on the embedded bus.

use std::time::Duration;

use inventorysync::central::server::Faults;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::consumer::{
    Central, config, conflicts, demo_warehouse, log_tail, run_command, start, wait_streaming,
};
use crate::harness::{free_port, pg};

const KEY: &str = "it-api-key-0123456789";
const HASHED_KEY: &str = "it-hashed-key-abcdefghij";

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    async fn get(&self, path: &str, key: Option<&str>) -> (u16, Option<String>, Value) {
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
