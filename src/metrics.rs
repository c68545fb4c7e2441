//! Every Prometheus metric of the engine, declared in one place (`inventorysync_*`), so the
//! names an operator alerts on are listed, documented and never duplicated.
//!
//! Counters and histograms are updated where things happen; gauges that describe state
//! (lag, retained WAL, jobs by status) are read from their sources when `/metrics` is
//! scraped, so they are never stale.

use std::sync::LazyLock;

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The engine's metrics and the registry that holds them.
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Row changes decoded from each warehouse's slot.
    pub events_decoded: IntCounterVec,
    /// Row changes acknowledged by the bus.
    pub events_published: IntCounterVec,
    /// Changes with an outcome, by warehouse and outcome (`applied`, `duplicate`,
    /// `superseded`, `stale`, `rejected`, `invalid`, `skipped`).
    pub changes_delivered: IntCounterVec,
    /// Conflicts recorded, by warehouse and kind.
    pub conflicts: IntCounterVec,
    /// Changes dead-lettered, by warehouse and rule.
    pub dead_letters: IntCounterVec,
    /// Requests to central by answer (`200`, `429`, `503`, …, `timeout`, `connect`).
    pub central_responses: IntCounterVec,
    /// Requests to central that will be retried.
    pub central_retries: IntCounterVec,
    /// Central request durations.
    pub central_request_seconds: HistogramVec,
    /// Changes per central request.
    pub batch_changes: HistogramVec,
    /// Bus acknowledgement latency per transaction, from its commit being queued to every
    /// event acknowledged (Kafka: the broker's acks; embedded: the consumer stage's outcomes).
    pub produce_seconds: HistogramVec,
    /// Times the circuit breaker opened.
    pub breaker_opened: IntCounterVec,
    /// Requests to central sent a second time because the first was stuck.
    pub central_hedged: IntCounterVec,
    /// 1 while central refuses every request of a warehouse (delivery paused), else 0.
    pub central_refusing: IntGaugeVec,
    /// Drift a verify job found, by kind.
    pub verify_findings: IntCounterVec,
    /// The adaptive limit of requests in the air to central.
    pub central_in_flight_limit: IntGaugeVec,
    /// Changes in requests sent to central and not yet answered: those a crash leaves in
    /// doubt (central may hold them; a restart sends them again).
    pub central_changes_in_air: IntGaugeVec,
    /// Changes central answered whose lane position is not yet in `consumer_lanes`: those a
    /// crash sends again although central holds them.
    pub central_changes_unsettled: IntGaugeVec,
    /// Records a Kafka consumer read whose offsets are not stored for commit yet, per
    /// topic: what a rebalance or a crash makes the partition's next consumer read again.
    pub consumer_records_uncommitted: IntGaugeVec,
    /// Commit time (Unix seconds) of the newest change with an outcome, per warehouse.
    pub delivered_commit_time: IntGaugeVec,
    /// Bytes of WAL between the warehouse's current position and the slot's confirmed flush.
    pub replication_lag_bytes: IntGaugeVec,
    /// Seconds between now and the commit time of the newest change with an outcome (0 when
    /// nothing is pending).
    pub replication_lag_seconds: IntGaugeVec,
    /// WAL the slot keeps.
    pub retained_wal_bytes: IntGaugeVec,
    /// 1 for the slot's current `wal_status`.
    pub wal_status: IntGaugeVec,
    /// Events waiting for the consumer stage (embedded queue length, or Kafka records
    /// between the group's committed offsets and the topics' ends).
    pub consumer_lag: IntGaugeVec,
    /// Sync jobs by kind and status.
    pub jobs: IntGaugeVec,
    /// 1 when the warehouse is served (streamed by this process, or by the lease holder
    /// while this one stands by), 0 while it starts, restarts or has stopped.
    pub warehouse_ready: IntGaugeVec,
    /// 1 while this process owns the warehouse (holds its lease and streams it).
    pub warehouse_owned: IntGaugeVec,
    /// Times this process stopped a Kafka partition at a change of a warehouse its
    /// configuration does not list, by that warehouse.
    pub consumer_stopped_partitions: IntCounterVec,
    /// Offsets a Kafka partition skipped between two records read without a rebalance in
    /// between, by topic: records the broker did not hand out (a compacted topic, transaction
    /// markers, or a broker that lost them).
    pub consumer_offset_gaps: IntCounterVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric");
    r.register(Box::new(h.clone())).expect("registered once");
    h
}

const SECONDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        Self {
            events_decoded: counter(
                &r,
                "inventorysync_events_decoded_total",
                "Row changes decoded from the warehouse's replication slot.",
                &["warehouse"],
            ),
            events_published: counter(
                &r,
                "inventorysync_events_published_total",
                "Row changes acknowledged by the bus.",
                &["warehouse"],
            ),
            changes_delivered: counter(
                &r,
                "inventorysync_changes_delivered_total",
                "Changes with an outcome, by outcome.",
                &["warehouse", "outcome"],
            ),
            conflicts: counter(
                &r,
                "inventorysync_conflicts_total",
                "Conflicts recorded in sync_conflicts, by kind.",
                &["warehouse", "kind"],
            ),
            dead_letters: counter(
                &r,
                "inventorysync_dead_letters_total",
                "Changes sent to the dead-letter queue, by rule.",
                &["warehouse", "rule"],
            ),
            central_responses: counter(
                &r,
                "inventorysync_central_responses_total",
                "Requests to the central API by answer (HTTP status, timeout or connect).",
                &["warehouse", "status"],
            ),
            central_retries: counter(
                &r,
                "inventorysync_central_retries_total",
                "Requests to the central API that will be retried.",
                &["warehouse"],
            ),
            central_request_seconds: histogram(
                &r,
                "inventorysync_central_request_duration_seconds",
                "Duration of requests to the central API.",
                &["warehouse"],
                SECONDS.to_vec(),
            ),
            batch_changes: histogram(
                &r,
                "inventorysync_batch_changes",
                "Changes per request to the central API.",
                &["warehouse"],
                vec![1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
            ),
            produce_seconds: histogram(
                &r,
                "inventorysync_produce_duration_seconds",
                "Per transaction, from its commit being queued on the bus to every event acknowledged (Kafka: broker acks; embedded: consumer outcomes).",
                &["warehouse", "bus"],
                SECONDS.to_vec(),
            ),
            breaker_opened: counter(
                &r,
                "inventorysync_central_breaker_opened_total",
                "Times the circuit breaker opened (consumption paused).",
                &[],
            ),
            central_hedged: counter(
                &r,
                "inventorysync_central_hedged_total",
                "Requests to the central API sent a second time (same Idempotency-Key) because the first had no answer after several times the usual answer time.",
                &["warehouse"],
            ),
            verify_findings: counter(
                &r,
                "inventorysync_verify_findings_total",
                "Rows a verify job found to differ between a warehouse and central, by kind: missing_at_central, only_at_central, differs, older_at_central.",
                &["kind"],
            ),
            central_refusing: gauge(
                &r,
                "inventorysync_central_refusing",
                "1 while the central API refuses every request of the warehouse (400/413/422 to all, e.g. a gateway): its delivery is paused and retried instead of dead-lettering; 0 otherwise.",
                &["warehouse"],
            ),
            central_in_flight_limit: gauge(
                &r,
                "inventorysync_central_in_flight_limit",
                "How many requests (of 64 changes or more) may be in the air to the central API at once; adapts to central's answer times.",
                &[],
            ),
            central_changes_in_air: gauge(
                &r,
                "inventorysync_central_changes_in_air",
                "Changes in requests sent to the central API and not yet answered (after a crash, central may hold them and they are sent again).",
                &["warehouse"],
            ),
            central_changes_unsettled: gauge(
                &r,
                "inventorysync_central_changes_unsettled",
                "Changes the central API answered whose lane position is not yet stored in the state DB (after a crash they are sent again although central holds them).",
                &["warehouse"],
            ),
            consumer_records_uncommitted: gauge(
                &r,
                "inventorysync_consumer_records_uncommitted",
                "Records this consumer read from Kafka whose offsets are not stored for commit yet (not delivered yet, or behind one that is not): a rebalance or a crash makes the partition's next consumer read them again (what central already has is answered as duplicate).",
                &["topic"],
            ),
            delivered_commit_time: gauge(
                &r,
                "inventorysync_delivered_commit_timestamp_seconds",
                "Commit time of the newest change with an outcome.",
                &["warehouse"],
            ),
            replication_lag_bytes: gauge(
                &r,
                "inventorysync_replication_lag_bytes",
                "WAL between the warehouse's current position and the slot's confirmed flush.",
                &["warehouse"],
            ),
            replication_lag_seconds: gauge(
                &r,
                "inventorysync_replication_lag_seconds",
                "Age of the newest change with an outcome while WAL is pending (0 when caught up).",
                &["warehouse"],
            ),
            retained_wal_bytes: gauge(
                &r,
                "inventorysync_retained_wal_bytes",
                "WAL the replication slot keeps from being removed.",
                &["warehouse"],
            ),
            wal_status: gauge(
                &r,
                "inventorysync_slot_wal_status",
                "1 for the replication slot's current wal_status.",
                &["warehouse", "status"],
            ),
            consumer_lag: gauge(
                &r,
                "inventorysync_consumer_lag_events",
                "Events waiting for the consumer stage.",
                &["source"],
            ),
            jobs: gauge(
                &r,
                "inventorysync_jobs",
                "Sync jobs by kind and status.",
                &["kind", "status"],
            ),
            warehouse_ready: gauge(
                &r,
                "inventorysync_warehouse_ready",
                "1 when the warehouse is served (streamed here or by the lease holder), 0 while it starts, restarts or has stopped.",
                &["warehouse"],
            ),
            warehouse_owned: gauge(
                &r,
                "inventorysync_warehouse_owned",
                "1 while this process owns the warehouse (holds its lease and streams it), 0 while another process does or nobody does yet.",
                &["warehouse"],
            ),
            consumer_stopped_partitions: counter(
                &r,
                "inventorysync_consumer_partitions_stopped_total",
                "Kafka partitions stopped (uncommitted) at a change of a warehouse this process's configuration does not list.",
                &["warehouse"],
            ),
            consumer_offset_gaps: counter(
                &r,
                "inventorysync_consumer_offset_gaps_total",
                "Offsets a Kafka partition skipped between two records read without a rebalance in between (a compacted topic, transaction markers, or records the broker did not hand out).",
                &["topic"],
            ),
            registry: r,
        }
    }

    /// Prometheus text of every metric.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }
}

/// A share of a gauge: `n` added while it lives (a count of changes somewhere on their way).
pub struct Held {
    gauge: prometheus::IntGauge,
    n: i64,
}

impl Held {
    /// Adds `n` to `gauge` until the share is dropped.
    pub fn new(gauge: prometheus::IntGauge, n: usize) -> Self {
        let n = n as i64;
        gauge.add(n);
        Self { gauge, n }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gauge.sub(self.n);
    }
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics (shorthand for instrumentation).
pub fn metrics() -> &'static Metrics {
    &METRICS
}
