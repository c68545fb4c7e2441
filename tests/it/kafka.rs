//! `inventorysync run` into a real Kafka-protocol broker (tansu).

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;

use crate::harness::{TestDb, broker, pg};

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

struct Service {
    child: Child,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_config(dir: &std::path::Path, db: &TestDb, id: &str) -> std::path::PathBuf {
    let cfg = dir.join("inventorysync.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[warehouses]]\nid = '{id}'\nurl = '{}'\nslot = '{}'\n",
            db.url_as("postgres"),
            db.slot("run")
        ),
    )
    .unwrap();
    cfg
}

fn service(cfg: &std::path::Path, state: &TestDb, topic: &str, brokers: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_inventorysync"));
    c.arg("--config")
        .arg(cfg)
        .arg("run")
        .env("DB_URL", state.url_as("postgres"))
        .env("KAFKA_BROKERS", brokers)
        .env("KAFKA_TOPIC", topic)
        .env("KAFKA_PARTITIONS", "3")
        .env("INVENTORYSYNC_LOG", "inventorysync=debug");
    c
}

type Received = (String, HashMap<String, String>, serde_json::Value);

async fn consume(topic: &str, expected: usize) -> Vec<Received> {
    let all = consume_until(topic, Duration::from_secs(90), |all| all.len() >= expected).await;
    assert!(
        all.len() >= expected,
        "only {} of {expected} messages on {topic}",
        all.len()
    );
    all
}

/// Reads `topic` from the start until `done` says so, or `limit` passes (the caller's
/// assertions then say what is missing).
async fn consume_until(
    topic: &str,
    limit: Duration,
    mut done: impl FnMut(&[Received]) -> bool,
) -> Vec<Received> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker().address)
        .set("group.id", format!("it-{topic}-{}", rand_suffix()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        // The topic may not exist yet when we subscribe: notice it soon after the engine
        // creates it (the default refresh is five minutes).
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while !done(&out) {
        let Ok(next) = tokio::time::timeout_at(deadline, consumer.recv()).await else {
            break;
        };
        let msg = match next {
            Ok(m) => m,
            // The topic appears once the engine created it.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let key = String::from_utf8(msg.key().unwrap().to_vec()).unwrap();
        let mut headers = HashMap::new();
        if let Some(h) = msg.headers() {
            for i in 0..h.count() {
                let header = h.get(i);
                headers.insert(
                    header.key.to_string(),
                    String::from_utf8(header.value.unwrap_or_default().to_vec()).unwrap(),
                );
            }
        }
        let value: serde_json::Value = serde_json::from_slice(msg.payload().unwrap()).unwrap();
        out.push((key, headers, value));
    }
    out
}

#[tokio::test]
async fn run_publishes_contract_events_to_kafka_and_checkpoints_what_was_acknowledged() {
    let db = pg().new_db("krun").await;
    db.exec(
        "CREATE TABLE stock_levels (sku text, location_code text, qty_on_hand int, PRIMARY KEY (sku, location_code));
         INSERT INTO stock_levels VALUES ('SKU-1', 'A-01', 7), ('SKU-2', 'A-01', 1);
         CREATE PUBLICATION inventorysync FOR ALL TABLES;",
    )
    .await;
    let state = pg().new_db("kstate").await;
    let dir = tempfile::tempdir().unwrap();
    let id = format!("wh-{}", db.name.replace('_', "-"));
    let cfg = write_config(dir.path(), &db, &id);
    let topic = format!("it.{}", db.name);
    let _svc = Service {
        child: service(&cfg, &state, &topic, &broker().address)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    };
    // The initial load, then live changes.
    let first = consume(&topic, 2).await;
    assert!(first.iter().all(|(_, _, v)| v["op"] == "r"));
    db.exec("UPDATE stock_levels SET qty_on_hand = 5 WHERE sku = 'SKU-1'; DELETE FROM stock_levels WHERE sku = 'SKU-2';")
        .await;
    db.exec("INSERT INTO stock_levels VALUES ('SKU-3', 'B-02', 3)")
        .await;
    let all = consume(&topic, 5).await;
    let (key, headers, value) = all.iter().find(|(_, _, v)| v["op"] == "u").unwrap();
    assert_eq!(
        key,
        &format!(
            r#"{{"warehouse_id":"{id}","table":"public.stock_levels","pk":{{"sku":"SKU-1","location_code":"A-01"}}}}"#
        )
    );
    let mut names: Vec<&str> = headers.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["op", "table", "version", "warehouse_id"]);
    assert_eq!(headers["warehouse_id"], id);
    assert_eq!(headers["table"], "public.stock_levels");
    assert_eq!(headers["op"], "u");
    let src = &value["source"];
    assert_eq!(
        headers["version"],
        format!(
            "{:016X}:{:08X}",
            src["commit_lsn"].as_u64().unwrap(),
            src["sequence"].as_u64().unwrap()
        )
    );
    let fields: Vec<&String> = value.as_object().unwrap().keys().collect();
    assert_eq!(
        fields,
        ["after", "before", "op", "source", "transaction", "ts_ms"]
    );
    assert_eq!(value["after"]["qty_on_hand"], 5);
    // Per key, versions never decrease.
    let mut last: HashMap<&str, &str> = HashMap::new();
    for (k, h, _) in &all {
        if let Some(prev) = last.insert(k, &h["version"]) {
            assert!(
                prev <= h["version"].as_str(),
                "{k}: {prev} then {}",
                h["version"]
            );
        }
    }
    // The checkpoint and the slot follow what Kafka acknowledged.
    let last_commit = all
        .iter()
        .map(|(_, _, v)| v["source"]["commit_lsn"].as_u64().unwrap())
        .max()
        .unwrap();
    let mut checkpoint = 0u64;
    for _ in 0..100 {
        if let Some(row) = state
            .client
            .query_opt("SELECT (flush_lsn - '0/0')::bigint FROM replication_checkpoints WHERE warehouse_id = $1", &[&id])
            .await
            .unwrap()
        {
            checkpoint = row.get::<_, i64>(0) as u64;
            if checkpoint > last_commit {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        checkpoint > last_commit,
        "checkpoint {checkpoint} passes the last commit {last_commit}"
    );
    let slot = db.slot("run");
    let mut confirmed = 0u64;
    for _ in 0..150 {
        confirmed = db
            .client
            .query_one("SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await
            .unwrap()
            .get::<_, i64>(0) as u64;
        if confirmed > last_commit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The slot may go further than the checkpoint: when nothing is in flight, the source
    // confirms what the server has decoded (other tables' WAL), which holds none of our commits.
    assert!(
        confirmed > last_commit,
        "slot confirmed {confirmed}, last commit {last_commit}, checkpoint {checkpoint}"
    );
}

#[tokio::test]
async fn bad_configuration_gives_clear_errors() {
    let db = pg().new_db("kbad").await;
    db.exec("CREATE PUBLICATION inventorysync FOR ALL TABLES")
        .await;
    let state = pg().new_db("kbadstate").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &db, "wh-bad");
    let run = |mut c: Command| {
        let o = c.output().unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, err) = run(service(&cfg, &state, "it.{db}", &broker().address));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("KAFKA_TOPIC") && err.contains("{db}"), "{err}");

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (code, err) = run(service(&cfg, &state, "it.bad", &closed.to_string()));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("unreachable"), "{err}");

    let mut c = service(&cfg, &state, "it.bad", &broker().address);
    c.env(
        "DB_URL",
        format!(
            "postgres://postgres:hunter2@127.0.0.1:{}/no_such_db?sslmode=disable",
            state.port
        ),
    );
    let (code, err) = run(c);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("state DB") && err.contains("no_such_db") && !err.contains("hunter2"),
        "{err}"
    );
}

fn ids(received: &[Received]) -> std::collections::BTreeSet<i64> {
    received
        .iter()
        .filter_map(|(_, _, v)| v["after"]["id"].as_i64())
        .collect()
}

/// A `consume_until` predicate over the ids seen so far, updated incrementally (the topic
/// holds over 100,000 messages).
fn ids_until(
    mut done: impl FnMut(&std::collections::BTreeSet<i64>) -> bool,
) -> impl FnMut(&[Received]) -> bool {
    let mut seen = std::collections::BTreeSet::new();
    let mut read = 0;
    move |r: &[Received]| {
        seen.extend(
            r[read..]
                .iter()
                .filter_map(|(_, _, v)| v["after"]["id"].as_i64()),
        );
        read = r.len();
        done(&seen)
    }
}

#[tokio::test]
async fn kill_9_of_run_during_a_load_loses_nothing_and_publishes_no_aborted_rows() {
    let db = pg().new_db("kkill").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, pad text); CREATE PUBLICATION inventorysync FOR ALL TABLES;")
        .await;
    let state = pg().new_db("kkillstate").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &db, "wh-kill");
    let topic = format!("it.{}", db.name);
    let url = db.url_as("postgres");
    let writer = tokio::spawn(async move {
        let c = crate::harness::connect(&url).await;
        for t in 0..100 {
            c.batch_execute(&format!(
                "INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series({}, {}) g",
                t * 1000,
                t * 1000 + 999
            ))
            .await
            .unwrap();
            if t % 25 == 0 {
                c.batch_execute(&format!(
                    "BEGIN; INSERT INTO t SELECT g, 'aborted' FROM generate_series({}, {}) g; ROLLBACK;",
                    1_000_000 + t * 1000,
                    1_000_000 + t * 1000 + 999
                ))
                .await
                .unwrap();
            }
        }
    });
    for seed_ms in [700u64, 1300, 400, 1900] {
        let mut child = service(&cfg, &state, &topic, &broker().address)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(seed_ms)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    writer.await.unwrap();
    let _svc = Service {
        child: service(&cfg, &state, &topic, &broker().address)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    };
    let all = consume_until(
        &topic,
        Duration::from_secs(120),
        ids_until(|s| s.len() >= 100_000 && s.range(..100_000).count() == 100_000),
    )
    .await;
    let seen = ids(&all);
    let missing = 100_000 - seen.range(..100_000).count();
    assert_eq!(
        missing,
        0,
        "every committed row is on the topic ({} messages read)",
        all.len()
    );
    assert!(
        seen.range(1_000_000..).next().is_none(),
        "nothing from aborted transactions"
    );
}

#[tokio::test]
async fn a_standby_run_takes_over_when_the_owner_dies() {
    let db = pg().new_db("kha").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (0); CREATE PUBLICATION inventorysync FOR ALL TABLES;")
        .await;
    let state = pg().new_db("khastate").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &db, "wh-ha");
    let topic = format!("it.{}", db.name);
    let mut owner = service(&cfg, &state, &topic, &broker().address)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    consume(&topic, 1).await;
    let _standby = Service {
        child: service(&cfg, &state, &topic, &broker().address)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    };
    db.exec("INSERT INTO t SELECT g FROM generate_series(1, 100) g")
        .await;
    consume_until(
        &topic,
        Duration::from_secs(30),
        ids_until(|s| s.len() == 101),
    )
    .await;
    owner.kill().unwrap(); // SIGKILL: no chance to hand over
    owner.wait().unwrap();
    let killed_at = std::time::Instant::now();
    db.exec("INSERT INTO t SELECT g FROM generate_series(101, 200) g")
        .await;
    let all = consume_until(
        &topic,
        Duration::from_secs(60),
        ids_until(|s| s.len() == 201),
    )
    .await;
    let took = killed_at.elapsed();
    let seen = ids(&all);
    let missing: Vec<i64> = (0..=200).filter(|i| !seen.contains(i)).collect();
    let extra: Vec<&i64> = seen.iter().filter(|i| !(0..=200).contains(*i)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "nothing lost across the takeover: missing {missing:?}, extra {extra:?}"
    );
    assert!(
        took < Duration::from_secs(20),
        "the standby took over in {took:?}"
    );
}
