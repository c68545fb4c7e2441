//! `inventorysync run` into a real Kafka broker (Apache Kafka, a single KRaft node).

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;

use crate::harness::{Broker, TestDb, broker, pg};

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
    // Each process its own API port (the default 8080 would collide between tests).
    c.env("API_LISTEN", "127.0.0.1:0");
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

pub type Received = (String, HashMap<String, String>, serde_json::Value);

pub async fn consume(topic: &str, expected: usize) -> Vec<Received> {
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
    done: impl FnMut(&[Received]) -> bool,
) -> Vec<Received> {
    consume_from(&broker().address, topic, limit, done).await
}

/// Every record of `topic` whose key (or old row) contains each of `needles`, as
/// "partition/offset op version after", read from the start until the topic falls quiet.
pub async fn records_with(topic: &str, needles: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    read_topic(topic, |msg| {
        let key = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
        let value: serde_json::Value =
            serde_json::from_slice(msg.payload().unwrap_or_default()).unwrap_or_default();
        // A key move is keyed by its new key: its old one is in `before`.
        let before = value["before"].to_string();
        if !needles.iter().all(|n| key.contains(n)) && !needles.iter().all(|n| before.contains(n)) {
            return;
        }
        let version = format!(
            "{:016X}:{:08X}",
            value["source"]["commit_lsn"].as_u64().unwrap_or(0),
            value["source"]["sequence"].as_u64().unwrap_or(0)
        );
        out.push(format!(
            "{}/{} {} {version} snapshot={} key={key} before={} after={}",
            msg.partition(),
            msg.offset(),
            value["op"],
            value["source"]["snapshot"],
            value["before"],
            value["after"]
        ));
    })
    .await;
    out
}

/// Appends to each partition of `topic` a copy of its records from `from_share` of the way
/// on (key, value and headers as they were, in order): what a source that restarts from an
/// older checkpoint publishes again. Returns how many records were copied.
pub async fn replay_tail(topic: &str, from_share: f64) -> usize {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::FutureRecord;
    type Owned = (Vec<u8>, Vec<u8>, Vec<(String, Vec<u8>)>);
    let mut by_partition: std::collections::BTreeMap<i32, Vec<Owned>> = Default::default();
    read_topic(topic, |msg| {
        let headers = msg
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        by_partition.entry(msg.partition()).or_default().push((
            msg.key().unwrap_or_default().to_vec(),
            msg.payload().unwrap_or_default().to_vec(),
            headers,
        ));
    })
    .await;
    let producer: rdkafka::producer::FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker().address)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let mut copied = 0;
    for (partition, records) in &by_partition {
        let from = (records.len() as f64 * from_share) as usize;
        for (key, value, headers) in &records[from..] {
            let mut h = OwnedHeaders::new();
            for (k, v) in headers {
                h = h.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            let record = FutureRecord::to(topic)
                .partition(*partition)
                .key(key)
                .payload(value)
                .headers(h);
            producer
                .send(record, Duration::from_secs(10))
                .await
                .map_err(|(e, _)| e)
                .unwrap();
            copied += 1;
        }
    }
    copied
}

/// A consumer of `topic` from its start, in a group of its own (named from `prefix`), that
/// commits nothing.
fn reader(brokers: &str, topic: &str, prefix: &str) -> StreamConsumer {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{prefix}-{topic}-{}", rand_suffix()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        // The topic may not exist yet when we subscribe: notice it soon after the engine
        // creates it (the default refresh is five minutes).
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    consumer
}

/// Hands every record of `topic` to `each`, from the start, until the topic falls quiet.
async fn read_topic(topic: &str, mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>)) {
    let consumer = reader(&broker().address, topic, "it-read");
    // Joining the group takes seconds (more on a busy broker); then the topic is read until
    // it falls quiet.
    let mut quiet = Duration::from_secs(90);
    while let Ok(next) = tokio::time::timeout(quiet, consumer.recv()).await {
        let Ok(msg) = next else { continue };
        quiet = Duration::from_secs(10);
        each(&msg);
    }
}

/// [`consume_until`] on the broker at `brokers`.
async fn consume_from(
    brokers: &str,
    topic: &str,
    limit: Duration,
    mut done: impl FnMut(&[Received]) -> bool,
) -> Vec<Received> {
    let consumer = reader(brokers, topic, "it");
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
        let key = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
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
        // A record that is not JSON (a dead-lettered foreign record) as its text.
        let payload = msg.payload().unwrap_or_default();
        let value: serde_json::Value = serde_json::from_slice(payload).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(payload).into_owned())
        });
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
    assert_eq!(
        names,
        ["op", "relation_oid", "table", "version", "warehouse_id"]
    );
    // The relation's OID at the warehouse: a mapping follows it across a rename.
    let oid: u32 = db
        .client
        .query_one("SELECT 'public.stock_levels'::regclass::oid", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(headers["relation_oid"], oid.to_string());
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

    // A token that cannot go in a header (a line break inside, say) was left out of every
    // request, and central's 401s blamed the credential: it is refused at start, unshown.
    let mut c = service(&cfg, &state, "it.bad", &broker().address);
    c.env("WAREHOUSE_API_TOKEN", "s3cret-part\nX-Other: 1");
    let (code, err) = run(c);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("WAREHOUSE_API_TOKEN") && err.contains("line feed") && !err.contains("s3cret"),
        "{err}"
    );

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

/// The warehouse's checkpoint in the state DB, if any (none before `run` created the table).
pub async fn checkpoint(state: &TestDb, warehouse_id: &str) -> Option<u64> {
    state
        .client
        .query_opt(
            "SELECT (flush_lsn - '0/0')::bigint FROM replication_checkpoints WHERE warehouse_id = $1",
            &[&warehouse_id],
        )
        .await
        .ok()
        .flatten()
        .map(|r| r.get::<_, i64>(0) as u64)
}

/// Polls the warehouse's checkpoint until it reaches `target` (or 30 s pass); returns the
/// last one read.
pub async fn checkpoint_reaching(state: &TestDb, warehouse_id: &str, target: u64) -> u64 {
    let mut at = 0;
    for _ in 0..300 {
        at = checkpoint(state, warehouse_id).await.unwrap_or(0);
        if at >= target {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    at
}

/// The slot's `confirmed_flush_lsn` and whether a walsender is attached to it.
pub async fn slot_state(db: &TestDb, slot: &str) -> (u64, bool) {
    let row = db
        .client
        .query_one(
            "SELECT (confirmed_flush_lsn - '0/0')::bigint, active FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    (row.get::<_, i64>(0) as u64, row.get(1))
}

fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_stopped_broker_holds_the_flush_position_and_everything_arrives_after_it_resumes() {
    let broker = Broker::start();
    let db = pg().new_db("kstop").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, pad text); CREATE PUBLICATION inventorysync FOR ALL TABLES;")
        .await;
    let state = pg().new_db("kstopstate").await;
    let dir = tempfile::tempdir().unwrap();
    let id = "wh-stop";
    let cfg = write_config(dir.path(), &db, id);
    let topic = format!("it.{}", db.name);
    let log_path = dir.path().join("run.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let svc = Service {
        child: service(&cfg, &state, &topic, &broker.address)
            .env("KAFKA_MESSAGE_TIMEOUT_MS", "3000")
            .stderr(log)
            .spawn()
            .unwrap(),
    };
    db.exec("INSERT INTO t SELECT g, 'before' FROM generate_series(0, 99) g")
        .await;
    let before_stop = db.current_lsn().await.0;
    consume_from(
        &broker.address,
        &topic,
        Duration::from_secs(60),
        ids_until(|s| s.len() == 100),
    )
    .await;
    let held = checkpoint_reaching(&state, id, before_stop).await;
    assert!(
        held >= before_stop,
        "checkpoint {held} reaches {before_stop} before the stop"
    );

    broker.signal("STOP");
    for t in 0..50 {
        db.exec(&format!(
            "INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series({}, {}) g",
            100 + t * 1000,
            99 + (t + 1) * 1000
        ))
        .await;
    }
    let total = 50_100;
    let stopped_at = std::time::Instant::now();
    let mut attached = false;
    let mut confirmed_while_stopped = 0;
    let mut checkpoint_while_stopped = 0;
    // Three producer timeouts and more: deliveries fail, the pipeline replays, but nothing
    // may count as delivered. (The checkpoint may pass WAL that holds no change of this
    // slot's, other databases' on this shared server: checked against the commits below.)
    while stopped_at.elapsed() < Duration::from_secs(12) {
        checkpoint_while_stopped =
            checkpoint_while_stopped.max(checkpoint(&state, id).await.unwrap_or(0));
        let (confirmed, active) = slot_state(&db, &db.slot("run")).await;
        confirmed_while_stopped = confirmed_while_stopped.max(confirmed);
        attached |= active && stopped_at.elapsed() > Duration::from_secs(4);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        attached,
        "the replication connection stays up (or comes back) while the broker is stopped"
    );
    let peak_kb = peak_rss_kb(svc.child.id());
    broker.signal("CONT");
    let all = consume_from(
        &broker.address,
        &topic,
        Duration::from_secs(120),
        ids_until(|s| s.len() >= total),
    )
    .await;
    let seen = ids(&all);
    assert_eq!(
        seen.len(),
        total,
        "everything arrives after the broker resumes; run's log ends:\n{}",
        log_tail(&log_path)
    );
    // The slot may confirm WAL the server had read without a commit in it (an open
    // transaction's records: it is decoded again after a restart), never an undelivered commit.
    let first_stopped_commit = all
        .iter()
        .filter(|(_, _, v)| v["after"]["id"].as_i64() >= Some(100))
        .map(|(_, _, v)| v["source"]["commit_lsn"].as_u64().unwrap())
        .min()
        .unwrap();
    assert!(
        checkpoint_while_stopped <= first_stopped_commit,
        "the checkpoint reached {checkpoint_while_stopped} while the broker was stopped, past the undelivered commit at {first_stopped_commit}"
    );
    assert!(checkpoint_while_stopped >= held);
    assert!(
        confirmed_while_stopped <= first_stopped_commit,
        "the slot confirmed {confirmed_while_stopped} while the broker was stopped, past the undelivered commit at {first_stopped_commit}"
    );
    let end = all
        .iter()
        .map(|(_, _, v)| v["source"]["commit_lsn"].as_u64().unwrap())
        .max()
        .unwrap()
        + 1;
    let moved = checkpoint_reaching(&state, id, end).await;
    assert!(
        moved >= end,
        "checkpoint {moved} passes the last commit {end} after the broker resumed"
    );
    assert!(
        peak_kb < 200 * 1024,
        "memory stays bounded while the broker is stopped: peak RSS {peak_kb} kB"
    );
}

fn log_tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[tokio::test]
async fn run_without_kafka_uses_the_embedded_bus_and_checkpoints_after_the_consumer_stage() {
    let db = pg().new_db("emb").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (0); CREATE PUBLICATION inventorysync FOR ALL TABLES;")
        .await;
    let state = pg().new_db("embstate").await;
    let dir = tempfile::tempdir().unwrap();
    let id = "wh-emb";
    let cfg = write_config(dir.path(), &db, id);
    let log_path = dir.path().join("run.log");
    let mut c = service(&cfg, &state, "unused", "unused");
    c.env_remove("KAFKA_BROKERS");
    let _svc = Service {
        child: c
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    };
    let mut before_last = 0;
    for t in 0..20 {
        before_last = db.current_lsn().await.0;
        db.exec(&format!(
            "INSERT INTO t SELECT g FROM generate_series({}, {}) g",
            1 + t * 500,
            (t + 1) * 500
        ))
        .await;
    }
    // Checkpoints are commit end LSNs of this database: only the last insert's is past
    // `before_last` (other tests write WAL to the same server).
    let reached = checkpoint_reaching(&state, id, before_last + 1).await;
    assert!(
        reached > before_last,
        "checkpoint {reached} passes {before_last}; run's log ends:\n{}",
        log_tail(&log_path)
    );
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("bus=\"embedded\""), "{log}");
}

/// An idempotent producer on the test broker that lingers `linger_ms`.
fn idempotent_producer(linger_ms: &str) -> rdkafka::producer::FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &broker().address)
        .set("enable.idempotence", "true")
        .set("linger.ms", linger_ms)
        .create()
        .unwrap()
}

/// A new topic of one partition, named from `prefix`.
async fn one_partition_topic(prefix: &str) -> String {
    let topic = format!("it.{prefix}.{}.{}", std::process::id(), rand_suffix());
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new()
            .set("bootstrap.servers", &broker().address)
            .create()
            .unwrap();
    admin
        .create_topics(
            [&rdkafka::admin::NewTopic::new(
                &topic,
                1,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .unwrap();
    topic
}

/// The broker serves a fetch from inside a record batch: a consumer group that resumes
/// at a committed offset in the middle of one of the producer's batches gets exactly the
/// records from that offset on. (A broker that answered with the next whole batch instead
/// would make every restart skip the rest of the batch its commit fell into.)
#[tokio::test]
async fn a_consumer_resuming_inside_a_record_batch_gets_every_record_from_its_offset() {
    use rdkafka::consumer::CommitMode;
    use rdkafka::producer::FutureRecord;
    use rdkafka::{Offset, TopicPartitionList};

    let topic = one_partition_topic("midbatch").await;
    let producer = idempotent_producer("200");
    // 500 records queued at once: they travel in a few large batches.
    let futures: Vec<_> = (0..500)
        .map(|i| {
            let payload = format!("record {i}");
            producer
                .send_result(
                    FutureRecord::<str, str>::to(&topic)
                        .key("k")
                        .payload(&payload),
                )
                .map_err(|(e, _)| e)
        })
        .collect();
    for f in futures {
        f.ok().unwrap().await.unwrap().unwrap();
    }
    let group = format!("it-midbatch-{}", rand_suffix());
    let consumer_in = |group: &str| -> StreamConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", &broker().address)
            .set("group.id", group)
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap()
    };
    for resume_at in [0i64, 1, 57, 251, 499] {
        let group = format!("{group}-{resume_at}");
        let c = consumer_in(&group);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Offset(resume_at))
            .unwrap();
        c.commit(&tpl, CommitMode::Sync).unwrap();
        drop(c);
        let c = consumer_in(&group);
        c.subscribe(&[&topic]).unwrap();
        let m = tokio::time::timeout(Duration::from_secs(30), c.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("a group committed at {resume_at} gets no record within 30 s")
            })
            .unwrap();
        assert_eq!(
            (m.offset(), m.payload()),
            (resume_at, Some(format!("record {resume_at}").as_bytes())),
            "a group committed at {resume_at} resumes there"
        );
    }
}

/// The broker never answers a fetch with a batch from beyond one still being written: a
/// consumer at the tail of a partition that several producers write at once reads every
/// offset, in sequence. (The engine's consumer relies on it: a skipped batch is lost for
/// good. A broker the suite used before lost records so, seen as the Kafka chaos test losing
/// the last changes of a partition; kept as a check of whatever broker the tests run on,
/// `INVENTORYSYNC_TEST_KAFKA_BROKERS` included.)
#[tokio::test]
async fn a_consumer_at_the_tail_reads_every_offset_while_producers_write_at_once() {
    use rdkafka::producer::FutureRecord;

    const PRODUCERS: usize = 8;
    const EACH: usize = 2_000;
    // A few rounds: the race is narrow (one round showed it about one time in four).
    for round in 0..3 {
        let topic = one_partition_topic("tail").await;
        // Assigned, not subscribed (no group join to wait for): it reads while they write.
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &broker().address)
            .set("group.id", format!("it-tail-{}", rand_suffix()))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "5")
            .create()
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, rdkafka::Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let reading = tokio::spawn(async move {
            let mut offsets = Vec::with_capacity(PRODUCERS * EACH);
            while offsets.len() < PRODUCERS * EACH {
                match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await {
                    Ok(Ok(m)) => offsets.push(m.offset()),
                    Ok(Err(_)) => {}
                    Err(_) => break,
                }
            }
            offsets
        });
        // Each producer its own connection, sending small batches as fast as it can.
        let writers: Vec<_> = (0..PRODUCERS)
            .map(|w| {
                let topic = topic.clone();
                tokio::spawn(async move {
                    let producer = idempotent_producer("1");
                    // A few records every few milliseconds, for a few seconds.
                    let mut futures = Vec::with_capacity(EACH);
                    for i in 0..EACH {
                        // Wide values, as TOASTed columns are: storing a batch takes a while.
                        let payload = format!("producer {w} record {i} {}", "x".repeat(2_000));
                        let f = producer.send_result(
                            FutureRecord::<str, str>::to(&topic)
                                .key("k")
                                .payload(&payload),
                        );
                        futures.push(f.map_err(|(e, _)| e).unwrap());
                        if i % 10 == 9 {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                    }
                    for f in futures {
                        f.await.unwrap().unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        let offsets = reading.await.unwrap();
        let gaps: Vec<(i64, i64)> = offsets
            .windows(2)
            .filter(|w| w[1] != w[0] + 1)
            .map(|w| (w[0], w[1]))
            .take(10)
            .collect();
        assert!(
            gaps.is_empty() && offsets.len() == PRODUCERS * EACH && offsets.first() == Some(&0),
            "round {round}: read {} of {} records from offset {:?}; offsets that did not follow each other: {gaps:?}",
            offsets.len(),
            PRODUCERS * EACH,
            offsets.first()
        );
    }
}
