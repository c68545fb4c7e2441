//! Several `run` processes sharing one state DB: warehouses balanced between them, handed
//! over without loss when one joins or stops, taken over when one dies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use inventorysync::central::server::Faults;
use serde_json::Value;

use crate::consumer::{
    Central, Run, conflicts, dead_letters, demo_warehouse, expected_state, log_tail, run_command,
    start, wait_streaming, workload,
};
use crate::harness::{TestDb, free_port, pg};

const KEY: &str = "workers-test-key-0123456789";

/// A configuration for every warehouse of `dbs` (ids `{prefix}-{i}`) with the demo mapping.
fn config_for(dir: &Path, prefix: &str, dbs: &[TestDb]) -> PathBuf {
    let mut text = include_str!("../../sql/demo_mapping.toml").to_string();
    for (i, db) in dbs.iter().enumerate() {
        text.push_str(&format!(
            "\n[[warehouses]]\nid = '{prefix}-{i}'\nurl = '{}'\nslot = '{}'\n",
            db.url_as("postgres"),
            db.slot("run")
        ));
    }
    let cfg = dir.join("inventorysync.toml");
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// `n` demo warehouses (databases `{prefix}{i}`) with 40 products and 6 locations each, for
/// the workload.
async fn seeded_warehouses(prefix: &str, n: usize) -> Vec<TestDb> {
    let mut dbs = Vec::new();
    for i in 0..n {
        let db = demo_warehouse(&format!("{prefix}{i}")).await;
        db.exec(
            "INSERT INTO products (sku, name) SELECT 'SKU-' || g, 'p' || g FROM generate_series(0, 39) g;
             INSERT INTO locations (location_code, zone) SELECT 'L-' || g, 'z' FROM generate_series(0, 5) g;",
        )
        .await;
        dbs.push(db);
    }
    dbs
}

/// Live (not draining) workers and how many warehouses each owns; panics when two list one
/// warehouse.
async fn split(state: &TestDb) -> BTreeMap<String, usize> {
    let rows = state
        .client
        .query(
            "SELECT worker_id, owned FROM sync_workers WHERE expires_at > now() AND NOT draining",
            &[],
        )
        .await
        .unwrap_or_default();
    let mut seen = std::collections::HashSet::new();
    let mut out = BTreeMap::new();
    for r in rows {
        let owned: Vec<String> = r.get(1);
        for w in &owned {
            assert!(seen.insert(w.clone()), "{w} is owned twice");
        }
        out.insert(r.get::<_, String>(0), owned.len());
    }
    out
}

/// Waits until the live workers own exactly `want` warehouses each (by worker id); returns
/// how long that took, or panics after `limit` with the split and the logs.
async fn wait_split(
    state: &TestDb,
    want: &[(&str, usize)],
    limit: Duration,
    logs: &[PathBuf],
) -> Duration {
    let started = Instant::now();
    let want: BTreeMap<String, usize> = want.iter().map(|(w, n)| (w.to_string(), *n)).collect();
    let mut got = BTreeMap::new();
    while started.elapsed() < limit {
        got = split(state).await;
        if got == want {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tails: Vec<String> = logs.iter().map(|l| log_tail(l)).collect();
    panic!(
        "after {limit:?} the split is {got:?}, not {want:?}; logs:\n{}",
        tails.join("\n---\n")
    );
}

/// Waits until central holds exactly each warehouse's state.
async fn converge_all(central: &Central, dbs: &[TestDb], prefix: &str, logs: &[PathBuf]) {
    for (i, db) in dbs.iter().enumerate() {
        let id = format!("{prefix}-{i}");
        let want = expected_state(db).await;
        let mut got = BTreeMap::new();
        for _ in 0..600 {
            got = central.state(&id).await;
            if got == want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if got != want {
            let tails: Vec<String> = logs.iter().map(|l| log_tail(l)).collect();
            panic!(
                "{id}: central holds {} entities, the warehouse {}; logs:\n{}",
                got.len(),
                want.len(),
                tails.join("\n---\n")
            );
        }
    }
}

/// Central's count of changes it already had (answered `duplicate` or `stale`) that came in
/// a new request: replays. A second try of a request central applied (the same
/// `Idempotency-Key`: the client hedged a slow answer, or lost one) is not one; a loaded
/// machine makes those (one clean-clone CI run saw a request of 10 changes hedged during a
/// join).
async fn again(central: &Central) -> u64 {
    let s = central.stats().await;
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    (n("duplicate") + n("stale")).saturating_sub(n("second_tries"))
}

/// Waits (up to 60 s in all) until warehouses `{prefix}-0..n` each delivered their initial
/// load and hold a checkpoint; panics naming those that did not, with what every process
/// logged about ownership, handovers and failures.
async fn wait_all_streaming(state: &TestDb, prefix: &str, n: usize, logs: &[PathBuf]) {
    let started = Instant::now();
    let mut waiting: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    while !waiting.is_empty() && started.elapsed() < Duration::from_secs(60) {
        let mut still = Vec::new();
        for id in waiting {
            let done = crate::consumer::load_delivered(state, &id).await
                && crate::kafka::checkpoint(state, &id).await.is_some();
            if !done {
                still.push(id);
            }
        }
        waiting = still;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !waiting.is_empty() {
        let said: Vec<String> = logs
            .iter()
            .map(|l| format!("--- {}:\n{}", l.display(), notable_lines(l)))
            .collect();
        panic!(
            "{waiting:?} never checkpointed their initial load within 60 s; split {:?}\n{}",
            split(state).await,
            said.join("\n")
        );
    }
}

/// The warnings, errors and ownership moves a process logged.
fn notable_lines(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| {
            [
                "WARN",
                "ERROR",
                "lease",
                "handing over",
                "owning",
                "reading on to the commit",
                "initial load",
            ]
            .iter()
            .any(|w| l.contains(w))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// State-DB connections of the lease connections (one per process).
async fn lease_connections(state: &TestDb) -> i64 {
    state
        .client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'inventorysync lease %' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twelve_warehouses_balance_over_the_processes_and_move_without_loss() {
    const PREFIX: &str = "wh-own";
    let dbs = seeded_warehouses("own", 12).await;
    let dbs = Arc::new(dbs);
    let state = pg().new_db("ownstate").await;
    let central = Central::start(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_for(dir.path(), PREFIX, &dbs);
    let logs: Vec<PathBuf> = (1..=4)
        .map(|i| dir.path().join(format!("p{i}.log")))
        .collect();
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let spawn = |i: usize| -> Run {
        let mut c = run_command(&cfg, &state, &central, None);
        c.env("WORKER_ID", format!("p{i}"))
            .env("API_LISTEN", format!("127.0.0.1:{}", ports[i - 1]))
            .env("API_KEYS", KEY);
        start(c, logs[i - 1].clone())
    };
    let p1 = spawn(1);
    let mut p2 = spawn(2);
    let mut p3 = spawn(3);
    wait_split(
        &state,
        &[("p1", 4), ("p2", 4), ("p3", 4)],
        Duration::from_secs(60),
        &logs,
    )
    .await;
    wait_all_streaming(&state, PREFIX, 12, &logs).await;
    assert_eq!(
        lease_connections(&state).await,
        3,
        "one lease connection per process"
    );
    // Who owns what, as each process tells it: /sync/workers (Bearer), /ready, /metrics.
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{}", ports[0]);
    let refused = http
        .get(format!("{base}/sync/workers"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401, "/sync/workers needs the key");
    let workers: Value = http
        .get(format!("{base}/sync/workers"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = workers["items"].as_array().expect("items");
    let listed: Vec<(&str, bool, usize)> = items
        .iter()
        .map(|w| {
            (
                w["worker_id"].as_str().unwrap_or_default(),
                w["alive"].as_bool().unwrap_or(false),
                w["owned"].as_array().map_or(0, Vec::len),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [("p1", true, 4), ("p2", true, 4), ("p3", true, 4)],
        "{workers}"
    );
    assert_eq!(workers["unowned"], serde_json::json!([]), "{workers}");
    // Each process learns the others' warehouses from their rows at its next heartbeat.
    let mut ready = Value::Null;
    for _ in 0..50 {
        ready = http
            .get(format!("{base}/ready"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let known = ready["warehouses"]
            .as_object()
            .is_some_and(|w| w.values().all(|w| w["owner"].is_string()));
        if known {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let owners: BTreeMap<String, (String, bool)> = ready["warehouses"]
        .as_object()
        .expect("warehouses")
        .iter()
        .map(|(id, w)| {
            (
                id.clone(),
                (
                    w["owner"].as_str().unwrap_or("nobody").to_string(),
                    w["ownedHere"].as_bool().unwrap_or(false),
                ),
            )
        })
        .collect();
    assert_eq!(owners.len(), 12, "{ready}");
    assert_eq!(
        owners
            .values()
            .filter(|(o, here)| o == "p1" && *here)
            .count(),
        4,
        "{ready}"
    );
    assert!(
        owners
            .values()
            .all(|(o, _)| ["p1", "p2", "p3"].contains(&o.as_str())),
        "{ready}"
    );
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let owned_here = metrics
        .lines()
        .filter(|l| l.starts_with("inventorysync_warehouse_owned{") && l.ends_with(" 1"))
        .count();
    assert_eq!(owned_here, 4, "{metrics}");

    // At each warehouse: its owner's replication connection and at most one SQL connection
    // (the standbys hold none).
    for db in dbs.iter() {
        let n: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            n <= 2,
            "{}: {n} connections from the run processes",
            db.name
        );
    }

    // A workload on every warehouse from here on.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for i in 0..12 {
        let (dbs, stop) = (dbs.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut seed = 1000 * i as u64;
            while !stop.load(Ordering::Relaxed) {
                workload(&dbs[i].client, seed, 3).await;
                seed += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    let pause = |stop: Arc<AtomicBool>, writers: Vec<tokio::task::JoinHandle<()>>| async move {
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.await.unwrap();
        }
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A fourth process joins: 3/3/3/3, handed over gracefully: central gets nothing twice.
    let before = again(&central).await;
    let _p4 = spawn(4);
    let took = wait_split(
        &state,
        &[("p1", 3), ("p2", 3), ("p3", 3), ("p4", 3)],
        Duration::from_secs(30),
        &logs,
    )
    .await;
    eprintln!("a fourth process had its share after {took:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    pause(stop.clone(), writers).await;
    converge_all(&central, &dbs, PREFIX, &logs).await;
    // A graceful handover resumes at the last outcome: nothing is replayed.
    let sent_again = again(&central).await - before;
    if sent_again > 0 {
        for l in &logs {
            eprintln!("--- {}:\n{}", l.display(), notable_lines(l));
        }
    }
    assert_eq!(
        sent_again, 0,
        "a graceful handover sends central nothing it has (second tries aside)"
    );

    // kill -9 of one, restarted at once under its worker id: it takes its own share back and
    // nothing else moves (its row had not expired).
    p2.child.kill().unwrap();
    p2.child.wait().unwrap();
    let mut p2 = spawn(2);
    let quick = Instant::now();
    while quick.elapsed() < Duration::from_secs(8) {
        let s = split(&state).await;
        assert!(
            s.iter().all(|(w, n)| w == "p2" || *n <= 3),
            "a quick restart moves nothing to the others: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_split(
        &state,
        &[("p1", 3), ("p2", 3), ("p3", 3), ("p4", 3)],
        Duration::from_secs(15),
        &logs,
    )
    .await;

    // kill -9 of one: the three others take its share within 15 s.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for i in 0..12 {
        let (dbs, stop) = (dbs.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut seed = 5000 + 1000 * i as u64;
            while !stop.load(Ordering::Relaxed) {
                workload(&dbs[i].client, seed, 3).await;
                seed += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    p2.child.kill().unwrap();
    p2.child.wait().unwrap();
    let took = wait_split(
        &state,
        &[("p1", 4), ("p3", 4), ("p4", 4)],
        Duration::from_secs(15),
        &logs,
    )
    .await;
    eprintln!("the others took a killed process's share after {took:?}");

    // SIGTERM of another: it hands its warehouses over and waits for the others to own them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    pause(stop.clone(), writers).await;
    converge_all(&central, &dbs, PREFIX, &logs).await;
    let before = again(&central).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for i in 0..12 {
        let (dbs, stop) = (dbs.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut seed = 9000 + 1000 * i as u64;
            while !stop.load(Ordering::Relaxed) {
                workload(&dbs[i].client, seed, 3).await;
                seed += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sigterm = Instant::now();
    assert_eq!(
        unsafe { libc::kill(p3.child.id() as i32, libc::SIGTERM) },
        0
    );
    let status = p3.child.wait().unwrap();
    assert!(status.success(), "SIGTERM ends run cleanly: {status:?}");
    let split_at_exit = split(&state).await;
    eprintln!(
        "p3 stopped after {:?}, the split then: {split_at_exit:?}",
        sigterm.elapsed()
    );
    assert_eq!(
        split_at_exit.values().sum::<usize>(),
        12,
        "SIGTERM waits until the others own what it handed over: {split_at_exit:?}\n{}",
        log_tail(&logs[2])
    );
    wait_split(
        &state,
        &[("p1", 6), ("p4", 6)],
        Duration::from_secs(15),
        &logs,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    pause(stop, writers).await;
    converge_all(&central, &dbs, PREFIX, &logs).await;
    assert_eq!(
        again(&central).await - before,
        0,
        "a SIGTERM handover sends central nothing it has"
    );
    assert_eq!(conflicts(&state).await, Vec::<Value>::new());
    assert_eq!(dead_letters(&state).await, Vec::<Value>::new());
    drop(p1);
}

/// Two seeded warehouses (ids `{prefix}-0`, `{prefix}-1`, databases `{db}0`, `{db}1`), a
/// state DB and a healthy central, with process p1 owning and streaming both; p2 is spawned
/// by the test.
struct TwoWarehouses {
    dbs: Vec<TestDb>,
    state: TestDb,
    central: Central,
    cfg: PathBuf,
    logs: Vec<PathBuf>,
    _p1: Run,
    _dir: tempfile::TempDir,
}

impl TwoWarehouses {
    async fn start(prefix: &str, db: &str) -> Self {
        let dbs = seeded_warehouses(db, 2).await;
        let state = pg().new_db(&format!("{db}state")).await;
        let central = Central::start(Faults::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = config_for(dir.path(), prefix, &dbs);
        let logs: Vec<PathBuf> = (1..=2)
            .map(|i| dir.path().join(format!("p{i}.log")))
            .collect();
        let p1 = spawn_worker(&cfg, &state, &central, &logs, 1);
        wait_split(&state, &[("p1", 2)], Duration::from_secs(30), &logs).await;
        for i in 0..2 {
            wait_streaming(&state, &format!("{prefix}-{i}"), &logs[0]).await;
        }
        Self {
            dbs,
            state,
            central,
            cfg,
            logs,
            _p1: p1,
            _dir: dir,
        }
    }

    /// Starts process `p{i}`.
    fn spawn(&self, i: usize) -> Run {
        spawn_worker(&self.cfg, &self.state, &self.central, &self.logs, i)
    }
}

/// Starts `run` as process `p{i}` (worker id), logging to `logs[i - 1]`.
fn spawn_worker(cfg: &Path, state: &TestDb, central: &Central, logs: &[PathBuf], i: usize) -> Run {
    let mut c = run_command(cfg, state, central, None);
    c.env("WORKER_ID", format!("p{i}"));
    start(c, logs[i - 1].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_waits_for_central_to_answer_what_is_in_flight() {
    const PREFIX: &str = "wh-wait";
    let setup = TwoWarehouses::start(PREFIX, "ownwait").await;
    let TwoWarehouses {
        dbs,
        state,
        central,
        logs,
        ..
    } = &setup;
    let spawn = |i| setup.spawn(i);
    // Central goes down with changes in flight; then a second process joins.
    central
        .set_faults(Faults {
            error_rate: 1.0,
            error_status: Some(503),
            ..Faults::default()
        })
        .await;
    for (i, db) in dbs.iter().enumerate() {
        workload(&db.client, 77 + i as u64, 40).await;
    }
    let before = again(central).await;
    let _p2 = spawn(2);
    // The first process may hand one over only once central answered what it handed on: for
    // as long as central is down, it keeps both.
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(12) {
        let s = split(state).await;
        assert_eq!(
            s.get("p2").copied().unwrap_or(0),
            0,
            "the handover waits for central: {s:?}\n{}",
            log_tail(&logs[0])
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    central.set_faults(Faults::default()).await;
    wait_split(
        state,
        &[("p1", 1), ("p2", 1)],
        Duration::from_secs(30),
        logs,
    )
    .await;
    for (i, db) in dbs.iter().enumerate() {
        workload(&db.client, 99 + i as u64, 20).await;
    }
    converge_all(central, dbs, PREFIX, logs).await;
    assert_eq!(
        again(central).await - before,
        0,
        "the new owner starts where the old one's outcomes end: nothing is sent twice"
    );
    assert_eq!(conflicts(state).await, Vec::<Value>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_lease_connection_stops_every_warehouse_at_once_and_loses_nothing() {
    const PREFIX: &str = "wh-lease";
    let dbs = seeded_warehouses("ownlease", 2).await;
    let state = pg().new_db("ownleasestate").await;
    let central = Central::start(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_for(dir.path(), PREFIX, &dbs);
    let logs = vec![dir.path().join("p1.log")];
    let mut c = run_command(&cfg, &state, &central, None);
    c.env("WORKER_ID", "p1");
    let _p1 = start(c, logs[0].clone());
    wait_split(&state, &[("p1", 2)], Duration::from_secs(30), &logs).await;
    for i in 0..2 {
        wait_streaming(&state, &format!("{PREFIX}-{i}"), &logs[0]).await;
    }
    for (i, db) in dbs.iter().enumerate() {
        workload(&db.client, 31 + i as u64, 20).await;
    }
    // The state DB ends the lease connection (a failover, an operator, a cut).
    state
        .client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'inventorysync lease %' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap();
    for (i, db) in dbs.iter().enumerate() {
        workload(&db.client, 41 + i as u64, 20).await;
    }
    let text = || std::fs::read_to_string(&logs[0]).unwrap_or_default();
    for _ in 0..100 {
        if text()
            .matches("lease lost: the warehouse stopped at once")
            .count()
            == 2
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        text().contains("every warehouse this process owned stops now"),
        "{}",
        log_tail(&logs[0])
    );
    assert_eq!(
        text()
            .matches("lease lost: the warehouse stopped at once")
            .count(),
        2,
        "both warehouses stopped: {}",
        log_tail(&logs[0])
    );
    // Back on a new lease connection, it owns both again and central misses nothing.
    let mut leases = 0;
    for _ in 0..100 {
        leases = lease_connections(&state).await;
        if leases == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(leases, 1, "a new lease connection: {}", log_tail(&logs[0]));
    wait_split(&state, &[("p1", 2)], Duration::from_secs(30), &logs).await;
    converge_all(&central, &dbs, PREFIX, &logs).await;
    assert_eq!(conflicts(&state).await, Vec::<Value>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_hands_over_a_warehouse_at_a_commit_boundary_not_inside_a_transaction() {
    const PREFIX: &str = "wh-big";
    const ROWS: i64 = 100_000;
    let setup = TwoWarehouses::start(PREFIX, "ownbig").await;
    let TwoWarehouses {
        dbs,
        state,
        central,
        logs,
        ..
    } = &setup;
    let spawn = |i| setup.spawn(i);
    // A slow central, and one large transaction per warehouse: the stream is still inside
    // it (held back by the full bus) when a second process joins and one warehouse moves.
    // Handing it over there would leave part of the transaction delivered and the rest to
    // the next owner, which resumes at the last commit: the old owner reads on to the commit
    // first.
    central
        .set_faults(Faults {
            latency_ms: 600,
            ..Faults::default()
        })
        .await;
    for db in dbs.iter() {
        db.exec(&format!(
            "INSERT INTO products (sku, name, unit_price) SELECT 'BIG-' || g, 'big ' || g, g % 500 FROM generate_series(1, {ROWS}) g"
        ))
        .await;
    }
    let before = again(central).await;
    let _p2 = spawn(2);
    wait_split(
        state,
        &[("p1", 1), ("p2", 1)],
        Duration::from_secs(120),
        logs,
    )
    .await;
    let moved = central.stats().await;
    eprintln!(
        "moved with {} of {} changes applied",
        moved["applied"],
        2 * ROWS
    );
    central.set_faults(Faults::default()).await;
    for (i, db) in dbs.iter().enumerate() {
        workload(&db.client, 7 + i as u64, 10).await;
    }
    converge_all(central, dbs, PREFIX, logs).await;
    let sent_again = again(central).await - before;
    assert_eq!(
        sent_again,
        0,
        "the old owner reads its open transaction to the commit before it hands over; the new one starts after it\n{}",
        log_tail(&logs[0])
    );
    assert_eq!(conflicts(state).await, Vec::<Value>::new());
}

/// Issue 39, point 5: the owner paused (SIGSTOP, as a suspended VM or a stuck process) keeps
/// its lease connection open (the kernel answers TCP keepalives) and so every lock: no peer
/// could take its warehouse, however long the pause. Now a peer fences it once its heartbeat
/// expired (terminates its lease session and the walsender still holding the slot), and a
/// change committed during the freeze reaches central within 45 s of it. After SIGCONT the
/// paused process finds its lease gone and stops; nothing is lost or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_is_fenced_and_a_peer_delivers_what_is_committed_during_the_pause() {
    const PREFIX: &str = "wh-pause";
    let setup = TwoWarehouses::start(PREFIX, "ownpause").await;
    let _p2 = setup.spawn(2);
    wait_split(
        &setup.state,
        &[("p1", 1), ("p2", 1)],
        Duration::from_secs(60),
        &setup.logs,
    )
    .await;
    let owned: Vec<String> = setup
        .state
        .client
        .query_one("SELECT owned FROM sync_workers WHERE worker_id = 'p1'", &[])
        .await
        .unwrap()
        .get(0);
    let i: usize = owned[0]
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap();
    let db = &setup.dbs[i];
    let pid = setup._p1.child.id().to_string();
    let signal = |s: &str| {
        assert!(
            std::process::Command::new("kill")
                .args([s, &pid])
                .status()
                .unwrap()
                .success()
        )
    };
    signal("-STOP");
    let frozen = Instant::now();
    db.exec("INSERT INTO products (sku, name) VALUES ('PAUSED-1', 'written during the pause')")
        .await;
    let key = "product {\"sku\":\"PAUSED-1\"}";
    let id = format!("{PREFIX}-{i}");
    let mut applied = None;
    while frozen.elapsed() < Duration::from_secs(90) {
        if setup.central.state(&id).await.contains_key(key) {
            applied = Some(frozen.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    signal("-CONT");
    let Some(applied) = applied else {
        let tails: Vec<String> = setup.logs.iter().map(|l| log_tail(l)).collect();
        panic!(
            "the change committed during the pause never reached central:\n{}",
            tails.join("\n---\n")
        );
    };
    println!("a change committed during the owner's pause reached central after {applied:?}");
    assert!(
        applied < Duration::from_secs(45),
        "{applied:?} after the freeze"
    );
    // The woken process finds its lease gone and stops that warehouse.
    let p1 = || std::fs::read_to_string(&setup.logs[0]).unwrap_or_default();
    for _ in 0..100 {
        if p1().contains("lease lost") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(p1().contains("lease lost"), "{}", log_tail(&setup.logs[0]));
    for (n, db) in setup.dbs.iter().enumerate() {
        workload(&db.client, 61 + n as u64, 30).await;
    }
    converge_all(&setup.central, &setup.dbs, PREFIX, &setup.logs).await;
    assert_eq!(conflicts(&setup.state).await, Vec::<Value>::new());
}
