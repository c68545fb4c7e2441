//! Apache Kafka as users run it, a cluster (issue 40): three KRaft nodes on loopback, the
//! topic replicated three times with `min.insync.replicas=2`, the engine producing with
//! `acks=all` and idempotence. A 200,000-row initial load and a random workload run while
//! the leader of a partition is killed -9 and started again later, a consumer process is
//! killed -9 and restarted, another consumer process joins and leaves, and a second broker
//! stops for a while (writes wait until the ISR drops it). Then a sync cycle must succeed,
//! and central must equal the warehouse field by field, with no key's versions out of order
//! in a request. The changes central got twice are counted against what the consumers had
//! unsettled at each fault, and each partition's time without a consumer is measured from
//! the consumers' logs. `INVENTORYSYNC_CLUSTER_SEED` picks another workload and other
//! victims.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use inventorysync::central::server::Faults;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::Value;

use crate::api::{Api, KEY};
use crate::chaos::{
    MAPPING, assert_equal, assert_no_skipped_offsets, chaos_warehouse, random_workload,
};
use crate::consumer::{Central, conflicts, dead_letters, log_tail, run_command_on, start};
use crate::harness::{KafkaNode, free_port};

/// Three KRaft nodes, each broker and controller.
struct Cluster {
    nodes: Vec<KafkaNode>,
}

impl Cluster {
    fn start() -> Cluster {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let voters = ports
            .iter()
            .enumerate()
            .map(|(i, (_, c))| format!("{}@127.0.0.1:{c}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        // A stopped follower leaves the ISR after 5 s (30 s by default), so that writes wait
        // for it a while, not for half a minute.
        let extra = "min.insync.replicas=2\ndefault.replication.factor=3\n\
                     unclean.leader.election.enable=false\nreplica.lag.time.max.ms=5000\n";
        let nodes: Vec<KafkaNode> = ports
            .iter()
            .enumerate()
            .map(|(i, (p, c))| KafkaNode::configure(i as u32 + 1, *p, *c, &voters, extra))
            .collect();
        // Together: a node's broker serves once the quorum has a leader.
        for n in &nodes {
            n.spawn();
        }
        for n in &nodes {
            n.wait_listening();
        }
        Cluster { nodes }
    }

    fn brokers(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.address.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn node(&self, id: i32) -> &KafkaNode {
        self.nodes
            .iter()
            .find(|n| n.id as i32 == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// The node leading each partition of `topic` (-1: none now), as the cluster says.
    fn leaders(&self, topic: &str) -> Vec<i32> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .create()
            .unwrap();
        for _ in 0..100 {
            if let Ok(md) = c.fetch_metadata(Some(topic), Duration::from_secs(10))
                && let Some(t) = md.topics().first()
                && !t.partitions().is_empty()
            {
                return t.partitions().iter().map(|p| p.leader()).collect();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("no metadata for {topic}");
    }
}

/// The sum of gauge `name` (all labels) of the `run` process whose API is on `port`; none
/// while it does not answer.
async fn gauge(port: u16, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// The consumers' changes in doubt, sampled every 50 ms: read from Kafka with their offsets
/// not yet stored for commit (the next consumer of the partition reads them again; those in
/// the air at central among them), and answered with their lane positions not written yet.
/// What a fault may make them send again.
#[derive(Clone, Default)]
struct Unsettled(Arc<Mutex<Vec<(Instant, f64)>>>);

impl Unsettled {
    fn sample(&self, ports: Vec<u16>, until: Instant) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            while Instant::now() < until {
                let mut sum = 0.0;
                for p in &ports {
                    for g in [
                        "inventorysync_consumer_records_uncommitted",
                        "inventorysync_central_changes_unsettled",
                    ] {
                        sum += gauge(*p, g).await.unwrap_or(0.0);
                    }
                }
                this.0.lock().unwrap().push((Instant::now(), sum));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    }

    /// The most in doubt over the last second, and at least the latest sample (the sampler
    /// may lag on two loaded cores).
    fn recent(&self) -> f64 {
        let samples = self.0.lock().unwrap();
        let latest = samples.last().map_or(0.0, |(_, n)| *n);
        samples
            .iter()
            .rev()
            .take_while(|(at, _)| at.elapsed() < Duration::from_secs(1))
            .map(|(_, n)| *n)
            .fold(latest, f64::max)
    }
}

/// Seconds since the epoch of a log line's RFC 3339 UTC timestamp
/// (`2026-12-07T03:10:00.123456Z …`).
fn log_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let (date, time) = stamp.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut t = time.split(':');
    let (h, min, s) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// What happened to partitions: assigned to or revoked from a consumer (from its log), or
/// the consumer's end (kill -9 or SIGTERM, noted by the test).
enum Happened {
    Assigned(String, Vec<i32>),
    Revoked(String, Vec<i32>),
    Ended(String),
}

/// The assignments and revocations in consumer `name`'s log, for partitions of `topic`.
fn group_events(name: &str, log: &Path, topic: &str) -> Vec<(f64, Happened)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let needle = format!("{topic}[");
    text.lines()
        .filter_map(|l| {
            let assigned = l.contains("partitions assigned");
            if !assigned && !l.contains("partitions revoked") {
                return None;
            }
            let parts: Vec<i32> = l
                .split(&needle)
                .skip(1)
                .filter_map(|p| p.split(']').next()?.parse().ok())
                .collect();
            let at = log_time(l)?;
            Some((
                at,
                if assigned {
                    Happened::Assigned(name.to_string(), parts)
                } else {
                    Happened::Revoked(name.to_string(), parts)
                },
            ))
        })
        .collect()
}

/// Per partition, the spans without a consumer after its first assignment, until `end`:
/// (start, seconds).
fn outages(mut events: Vec<(f64, Happened)>, end: f64) -> BTreeMap<i32, Vec<(f64, f64)>> {
    events.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Per partition: its consumer, and since when it has none.
    let mut owner: HashMap<i32, String> = HashMap::new();
    let mut without: HashMap<i32, f64> = HashMap::new();
    let mut gaps: BTreeMap<i32, Vec<(f64, f64)>> = BTreeMap::new();
    for (at, e) in events {
        let lost: Vec<i32> = match e {
            Happened::Assigned(who, parts) => {
                for p in parts {
                    if let Some(from) = without.remove(&p) {
                        gaps.entry(p).or_default().push((from, at - from));
                    }
                    owner.insert(p, who.clone());
                }
                continue;
            }
            Happened::Revoked(who, parts) => parts
                .into_iter()
                .filter(|p| owner.get(p) == Some(&who))
                .collect(),
            Happened::Ended(who) => owner
                .iter()
                .filter(|(_, o)| **o == who)
                .map(|(p, _)| *p)
                .collect(),
        };
        for p in lost {
            owner.remove(&p);
            without.insert(p, at);
        }
    }
    for (p, from) in without {
        gaps.entry(p).or_default().push((from, end - from));
    }
    gaps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "three brokers for two minutes: scripts/test runs it on its own (cargo test --test it cluster:: -- --ignored), after the PostgreSQL version matrix"]
async fn a_three_broker_cluster_loses_nothing_through_leader_kills_a_stopped_broker_and_consumers_coming_and_going()
 {
    let seed: u64 = std::env::var("INVENTORYSYNC_CLUSTER_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    eprintln!("cluster: seed {seed}");
    let cluster = Cluster::start();
    let db = chaos_warehouse("kcluster").await;
    // 200,000 stock levels for the initial load (6,000 are there).
    db.exec(
        "INSERT INTO locations SELECT 'L-' || i, 'zone ' || (i % 4) FROM generate_series(20, 149) i;
         INSERT INTO stock_levels (sku, location_code, qty_on_hand, qty_reserved)
           SELECT 'SKU-' || (i % 1500), 'L-' || (20 + i / 1500), 5 + i % 70, i % 5
             FROM generate_series(0, 193999) i;",
    )
    .await;
    let state = crate::harness::pg().new_db("kclusterstate").await;
    let central = Central::start(Faults::default()).await;
    let keep = std::env::var_os("INVENTORYSYNC_KEEP_LOGS").is_some();
    let tmp = tempfile::Builder::new()
        .disable_cleanup(keep)
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_path_buf();
    let cfg = dir.join("inventorysync.toml");
    std::fs::write(
        &cfg,
        format!(
            "{MAPPING}\n[[warehouses]]\nid = 'wh-cluster'\nurl = '{}'\nslot = '{}'\n",
            db.url_as("postgres"),
            db.slot("run"),
        ),
    )
    .unwrap();
    let topic = format!("it.{}", db.name);
    let brokers = cluster.brokers();
    let (port_a, port_b, port_c) = (free_port(), free_port(), free_port());
    let command = |port: u16, stages: Option<&str>| {
        let mut c = run_command_on(&cfg, &state, &central, Some((&topic, &brokers)));
        if let Some(s) = stages {
            c.arg("--stages").arg(s);
        }
        c.env("API_LISTEN", format!("127.0.0.1:{port}"))
            .env("API_KEYS", KEY)
            .env("KAFKA_REPLICATION_FACTOR", "3")
            .env("SYNC_JOB_TIMEOUT_SECS", "240");
        c
    };
    let log = |name: &str| dir.join(format!("{name}.log"));
    let mut logs: Vec<(String, PathBuf)> = Vec::new();
    let mut events: Vec<(f64, Happened)> = Vec::new();

    // A streams and consumes; B consumes.
    let _a = start(command(port_a, None), log("a"));
    logs.push(("a".into(), log("a")));
    let mut b = start(command(port_b, Some("consumer")), log("b1"));
    logs.push(("b1".into(), log("b1")));
    let until = Instant::now() + Duration::from_secs(600);
    let unsettled = Unsettled::default();
    let sampler = unsettled.sample(vec![port_a, port_b, port_c], until);
    let stop_writing = Instant::now() + Duration::from_secs(50);
    let writer = tokio::spawn(random_workload(db.url_as("postgres"), seed, stop_writing));
    let applied = || async { central.stats().await["applied"].as_u64().unwrap_or(0) };
    let wait_applied = |n: u64, what: &'static str| {
        let central = &central;
        let a = log("a");
        async move {
            let started = Instant::now();
            while central.stats().await["applied"].as_u64().unwrap_or(0) < n {
                assert!(
                    started.elapsed() < Duration::from_secs(180),
                    "central did not reach {n} applied changes ({what}); a's log:\n{}",
                    log_tail(&a)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let mut in_flight_at_faults: Vec<(String, f64)> = Vec::new();
    // Central's count of changes sent twice at each fault, to tell which fault sent what.
    let twice_now = || async {
        let s = central.stats().await;
        s["duplicate"].as_u64().unwrap_or(0) + s["stale"].as_u64().unwrap_or(0)
    };
    let mut twice_at: Vec<u64> = Vec::new();
    let mut fault_times: Vec<f64> = Vec::new();
    let began = unix_now();
    let mut pick = {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        move |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        }
    };

    // 1. In the middle of the load, kill -9 the leader of a partition.
    wait_applied(20_000 + 10_000 * pick(4) as u64, "before the leader's kill").await;
    let leaders = cluster.leaders(&topic);
    let victim = leaders[pick(leaders.len())];
    twice_at.push(twice_now().await);
    fault_times.push(unix_now());
    in_flight_at_faults.push((
        format!("kill -9 of node {victim}, a leader"),
        unsettled.recent(),
    ));
    cluster.node(victim).kill();
    let killed_at = Instant::now();
    eprintln!(
        "cluster: killed node {victim} (leaders were {leaders:?}) at {} changes applied",
        applied().await
    );

    // 2. Kill -9 the consumer B a little later, and start it again (same API port: the same
    // static member).
    tokio::time::sleep(Duration::from_millis(1000 + 500 * pick(4) as u64)).await;
    twice_at.push(twice_now().await);
    fault_times.push(unix_now());
    in_flight_at_faults.push(("kill -9 of consumer b".into(), unsettled.recent()));
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    events.push((unix_now(), Happened::Ended("b1".into())));
    tokio::time::sleep(Duration::from_secs(3)).await;
    b = start(command(port_b, Some("consumer")), log("b2"));
    logs.push(("b2".into(), log("b2")));

    // 3. The killed node comes back 12 s after its kill.
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(killed_at.elapsed())).await;
    cluster.node(victim).run();
    eprintln!(
        "cluster: node {victim} is back at {} changes applied",
        applied().await
    );

    // 4. A consumer C joins while the load or the workload runs, and leaves again.
    twice_at.push(twice_now().await);
    fault_times.push(unix_now());
    in_flight_at_faults.push(("consumer c joins".into(), unsettled.recent()));
    let mut c = start(command(port_c, Some("consumer")), log("c"));
    logs.push(("c".into(), log("c")));
    let joined = Instant::now();
    while !std::fs::read_to_string(log("c"))
        .unwrap_or_default()
        .contains("partitions assigned")
    {
        assert!(
            joined.elapsed() < Duration::from_secs(60),
            "consumer c got no partition within 60 s; its log:\n{}",
            log_tail(&log("c"))
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    twice_at.push(twice_now().await);
    fault_times.push(unix_now());
    in_flight_at_faults.push(("consumer c leaves (SIGTERM)".into(), unsettled.recent()));
    assert_eq!(unsafe { libc::kill(c.child.id() as i32, libc::SIGTERM) }, 0);
    c.child.wait().unwrap();
    events.push((unix_now(), Happened::Ended("c".into())));

    // 5. Another node stops for 15 s (SIGSTOP): writes to the partitions it follows wait
    // until the ISR drops it; those it leads move to another leader.
    let leaders = cluster.leaders(&topic);
    let others: Vec<i32> = leaders
        .iter()
        .copied()
        .filter(|l| *l != victim && *l > 0)
        .collect();
    let stopped = if others.is_empty() {
        (1..=3).find(|n| *n != victim).unwrap()
    } else {
        others[pick(others.len())]
    };
    twice_at.push(twice_now().await);
    fault_times.push(unix_now());
    in_flight_at_faults.push((format!("SIGSTOP of node {stopped}"), unsettled.recent()));
    cluster.node(stopped).signal("STOP");
    tokio::time::sleep(Duration::from_secs(15)).await;
    cluster.node(stopped).signal("CONT");
    eprintln!(
        "cluster: node {stopped} resumed at {} changes applied",
        applied().await
    );

    let txs = writer.await.unwrap();
    assert!(txs > 100, "the workload ran: {txs} transactions");

    // A sync cycle: every change committed before it has an outcome at central.
    let api = Api::new(port_a);
    let job = api.trigger("").await;
    let started = Instant::now();
    let job = loop {
        let (_, _, j) = api.get(&format!("/sync/status/{job}"), Some(KEY)).await;
        if j["status"] == "succeeded" || j["status"] == "failed" {
            break j;
        }
        assert!(
            started.elapsed() < Duration::from_secs(245),
            "the sync cycle did not finish: {j}; a's log:\n{}",
            log_tail(&log("a"))
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        job["status"],
        "succeeded",
        "{job}; a's log:\n{}",
        log_tail(&log("a"))
    );
    let end = unix_now();
    sampler.abort();

    // Central equals the warehouse, field by field.
    assert_equal(&central, &db, "wh-cluster", Some(&topic)).await;
    assert_eq!(conflicts(&state).await, Vec::<Value>::new());
    assert_eq!(dead_letters(&state).await, Vec::<Value>::new());
    let stats = central.stats().await;
    assert_eq!(
        stats["reordered"], 0,
        "per key, versions only grow in a request: {stats}"
    );
    assert_no_skipped_offsets(logs.iter().map(|(_, p)| p.clone()));

    // Sent twice: at most what the consumers had unsettled at the faults.
    let twice = stats["duplicate"].as_u64().unwrap() + stats["stale"].as_u64().unwrap();
    let bound: f64 = in_flight_at_faults.iter().map(|(_, n)| n).sum();
    eprintln!(
        "cluster: central applied {}, sent twice {twice} (duplicate {}, stale {}); unsettled at each fault: {in_flight_at_faults:?}",
        stats["applied"], stats["duplicate"], stats["stale"]
    );
    twice_at.push(twice);
    for (i, (fault, _)) in in_flight_at_faults.iter().enumerate() {
        eprintln!(
            "cluster: sent twice from {fault} to the next fault: {}",
            twice_at[i + 1] - twice_at[i]
        );
    }
    assert!(
        twice as f64 <= bound,
        "central got {twice} changes twice, more than the {bound} unsettled at the faults: {in_flight_at_faults:?}"
    );

    // How long each partition went without a consumer.
    for (name, path) in &logs {
        events.extend(group_events(name, path, &topic));
    }
    let outages = outages(events, end);
    let faults: Vec<String> = in_flight_at_faults
        .iter()
        .zip(&fault_times)
        .map(|((f, _), t)| format!("{f} at +{:.1} s", t - began))
        .collect();
    eprintln!("cluster: faults: {}", faults.join("; "));
    for (p, spans) in &outages {
        let each: Vec<String> = spans
            .iter()
            .map(|(from, s)| format!("{s:.1} s from +{:.1} s", from - began))
            .collect();
        eprintln!(
            "cluster: partition {p} without a consumer {} time(s), {:.1} s in all: {}",
            spans.len(),
            spans.iter().map(|(_, s)| s).sum::<f64>(),
            each.join(", ")
        );
    }
    drop(b);
}
