//! The operations console: `GET /console`, one page embedded in the binary (HTML, CSS and
//! JavaScript, nothing built at install time), and `GET /sync/overview`, what the page draws.
//!
//! The page shows each warehouse's owner, stream state, lag with a sparkline of the last 15
//! minutes, changes/s, retained WAL and `wal_status`; the jobs; the open conflicts with their
//! hints; the dead letters; and drives the `/sync` routes with the key the operator types in
//! once (kept in `sessionStorage`, sent as a Bearer header, never in a URL or a cookie). The
//! history is sampled here every [`SAMPLE_EVERY`] while `run` runs, so a page opened just now
//! still shows the last 15 minutes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::app::{StreamState, WarehouseStatus};

/// How often each warehouse's figures are sampled for the sparklines.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Samples kept per warehouse: 15 minutes.
pub const KEEP: usize = 90;
/// Outcomes that are no delivery: unmapped tables, and replays skipped as already sent.
const NOT_DELIVERED: [&str; 2] = ["skipped", "replayed"];

/// The page, its style and its script.
pub const PAGE: &str = include_str!("console/index.html");
/// The console's style sheet.
pub const STYLE: &str = include_str!("console/console.css");
/// The console's script.
pub const SCRIPT: &str = include_str!("console/console.js");

/// One warehouse's figures at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sample {
    /// Unix time, seconds.
    pub at: i64,
    /// WAL not yet confirmed as delivered (none while this process does not stream it).
    pub lag_bytes: Option<i64>,
    /// Seconds since the commit of the last change delivered, while there is lag.
    pub lag_seconds: Option<i64>,
    /// WAL the slot keeps.
    pub retained_wal_bytes: Option<i64>,
    /// Changes delivered per second since the sample before.
    pub changes_per_second: f64,
}

/// One warehouse as the console shows it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarehouseView {
    /// Warehouse id.
    pub id: String,
    /// The worker id of the process that owns it, as far as this one knows.
    pub owner: Option<String>,
    /// Whether this process streams it.
    pub owned_here: bool,
    /// `starting`, `standby`, `streaming`, `retrying` or `failed`.
    pub state: &'static str,
    /// Why it is not streaming, in words.
    pub reason: Option<String>,
    /// `wal_status` of its slot (`reserved`, `extended`, `unreserved`, `lost`).
    pub wal_status: Option<String>,
    /// Bytes the slot can still fall behind before it is in danger (none: unlimited).
    pub safe_wal_bytes: Option<i64>,
    /// The figures now.
    pub now: Sample,
    /// The last 15 minutes, oldest first.
    pub history: Vec<Sample>,
    /// What asks the operator to act though the warehouse streams: a slot no configured
    /// warehouse uses, a mapped table renamed.
    pub notices: Vec<Notice>,
}

/// Something about a warehouse that asks the operator to act, though it streams (what
/// `inventorysync check` warns about too).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Notice {
    /// `unused_slot` or `renamed_table`.
    pub kind: &'static str,
    /// What is so, in words.
    pub detail: String,
    /// What to do about it.
    pub fix: String,
}

/// Why a warehouse is not ready, and its notices (see [`History::views`]).
#[derive(Debug, Default)]
pub struct Remarks {
    /// Why it is not served as it should be, if it is not.
    pub reason: Option<String>,
    /// What asks the operator to act.
    pub notices: Vec<Notice>,
}

/// The samples of every warehouse, and the delivery counts they were taken from.
#[derive(Default)]
pub struct History {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    samples: HashMap<String, VecDeque<Sample>>,
    /// Per warehouse, changes delivered so far and when that was read.
    delivered: HashMap<String, (f64, u64)>,
}

/// Seconds since the epoch.
fn unix_now() -> (i64, f64) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.as_secs_f64())
}

/// Changes delivered so far per warehouse (every outcome but [`NOT_DELIVERED`]).
fn delivered_totals() -> HashMap<String, u64> {
    use prometheus::core::Collector;
    let mut totals: HashMap<String, u64> = HashMap::new();
    for family in crate::metrics::metrics().changes_delivered.collect() {
        for m in family.get_metric() {
            let label = |name: &str| {
                m.get_label()
                    .iter()
                    .find(|l| l.name() == name)
                    .map(|l| l.value().to_string())
            };
            let (Some(warehouse), Some(outcome)) = (label("warehouse"), label("outcome")) else {
                continue;
            };
            if NOT_DELIVERED.contains(&outcome.as_str()) {
                continue;
            }
            *totals.entry(warehouse).or_default() += m.get_counter().get_value() as u64;
        }
    }
    totals
}

/// Lag, lag in seconds and retained WAL of `w` now (none while this process reads no slot
/// health for it).
pub fn lag(w: &WarehouseStatus, now: i64) -> (Option<i64>, Option<i64>, Option<i64>) {
    let health = w.slot_health.borrow();
    let Some(h) = health.as_ref() else {
        return (None, None, None);
    };
    let delivered = crate::metrics::metrics()
        .delivered_commit_time
        .with_label_values(&[w.id.as_str()])
        .get();
    let seconds = if h.lag_bytes > 0 && delivered > 0 {
        (now - delivered).max(0)
    } else {
        0
    };
    (Some(h.lag_bytes), Some(seconds), Some(h.retained_wal_bytes))
}

impl History {
    /// Samples every warehouse now.
    pub fn sample(&self, warehouses: &[Arc<WarehouseStatus>]) {
        let (now, now_f) = unix_now();
        let totals = delivered_totals();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for w in warehouses {
            let total = totals.get(&w.id).copied().unwrap_or(0);
            let rate = match inner.delivered.insert(w.id.clone(), (now_f, total)) {
                Some((then, before)) if now_f > then => {
                    total.saturating_sub(before) as f64 / (now_f - then)
                }
                _ => 0.0,
            };
            let (lag_bytes, lag_seconds, retained_wal_bytes) = lag(w, now);
            let samples = inner.samples.entry(w.id.clone()).or_default();
            if samples.len() == KEEP {
                samples.pop_front();
            }
            samples.push_back(Sample {
                at: now,
                lag_bytes,
                lag_seconds,
                retained_wal_bytes,
                changes_per_second: rate,
            });
        }
    }

    /// Samples every [`SAMPLE_EVERY`] until `cancel`.
    pub async fn run(
        self: Arc<Self>,
        warehouses: Vec<Arc<WarehouseStatus>>,
        cancel: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.sample(&warehouses),
                _ = cancel.cancelled() => return,
            }
        }
    }

    /// Each warehouse as the console shows it: its figures now and its history.
    pub fn views(
        &self,
        warehouses: &[Arc<WarehouseStatus>],
        remarks: &dyn Fn(&WarehouseStatus) -> Remarks,
    ) -> Vec<WarehouseView> {
        let (now, now_f) = unix_now();
        let totals = delivered_totals();
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        warehouses
            .iter()
            .map(|w| {
                let history: Vec<Sample> = inner
                    .samples
                    .get(&w.id)
                    .map(|s| s.iter().copied().collect())
                    .unwrap_or_default();
                // The rate since the last sample (the sampler's own reading).
                let rate = match inner.delivered.get(&w.id) {
                    Some((then, before)) if now_f - then >= 1.0 => {
                        totals
                            .get(&w.id)
                            .copied()
                            .unwrap_or(0)
                            .saturating_sub(*before) as f64
                            / (now_f - then)
                    }
                    _ => history.last().map_or(0.0, |s| s.changes_per_second),
                };
                let (lag_bytes, lag_seconds, retained_wal_bytes) = lag(w, now);
                let (wal_status, safe_wal_bytes) = match &*w.slot_health.borrow() {
                    Some(h) => (Some(h.wal_status.clone()), h.safe_wal_size),
                    None => (None, None),
                };
                let Remarks { reason, notices } = remarks(w);
                WarehouseView {
                    id: w.id.clone(),
                    owner: w.owner.borrow().clone(),
                    owned_here: w.owned_here(),
                    state: state_name(&w.state.borrow()),
                    reason,
                    wal_status,
                    safe_wal_bytes,
                    now: Sample {
                        at: now,
                        lag_bytes,
                        lag_seconds,
                        retained_wal_bytes,
                        changes_per_second: rate,
                    },
                    history,
                    notices,
                }
            })
            .collect()
    }
}

/// A stream state's name (its error is in the warehouse's `reason`).
fn state_name(s: &StreamState) -> &'static str {
    match s {
        StreamState::Starting => "starting",
        StreamState::Standby => "standby",
        StreamState::Streaming => "streaming",
        StreamState::Retrying(_) => "retrying",
        StreamState::Failed(_) => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::{History, KEEP};
    use crate::app::WarehouseStatus;

    #[test]
    fn the_history_keeps_the_last_fifteen_minutes_and_counts_deliveries_per_second() {
        let w = WarehouseStatus::new("wh-console-test");
        let history = History::default();
        for _ in 0..KEEP + 5 {
            history.sample(std::slice::from_ref(&w));
        }
        crate::metrics::metrics()
            .changes_delivered
            .with_label_values(&["wh-console-test", "applied"])
            .inc_by(10);
        crate::metrics::metrics()
            .changes_delivered
            .with_label_values(&["wh-console-test", "skipped"])
            .inc_by(1000);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let views = history.views(std::slice::from_ref(&w), &|w| super::Remarks {
            reason: w.readiness().1,
            notices: Vec::new(),
        });
        assert_eq!(views[0].history.len(), KEEP);
        assert_eq!(views[0].state, "starting");
        // 10 delivered (the skipped ones are no delivery) over a little more than a second.
        let rate = views[0].now.changes_per_second;
        assert!(rate > 0.0 && rate <= 10.0, "{rate}");
        // No slot health read here: no lag figures, rather than zeros.
        assert_eq!(views[0].now.lag_bytes, None);
    }
}
