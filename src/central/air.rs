//! How many requests central holds unanswered at once, and when one that takes too long is
//! sent a second time.
//!
//! A request central has not answered is what a crash leaves in doubt: after a restart its
//! changes are sent again, and central answers `duplicate` for what it had applied. Beyond
//! what central works on in parallel, more requests in the air add no speed: they wait in
//! its queue (measured: 128 requests in the air against the reference central drained a
//! backlog at 87,000 changes/s and left 20,000–34,000 changes in doubt at a kill -9; 4 in the
//! air drained it at 108,000/s and left 552). So the client limits them, and finds the limit
//! as TCP Vegas finds its window: from the shortest answer time seen lately (central with no
//! queue) and the latest one, it estimates how many requests wait at central; it adds one
//! while fewer than [`ALPHA`] wait and the limit is what holds requests back, and takes one
//! away when more than [`BETA`] do. A far central (a long round trip, many cores) thus gets
//! many requests in the air, a near and busy one few.
//!
//! Requests of fewer than [`SMALL`] changes (a quiet lane) pass without a slot: they leave
//! little in doubt, and waiting for a slot would add latency where there is no load.
//!
//! A request whose answer takes [`SLOW_FACTOR`] times longer than usual gives its slot up
//! (held there for as long, 5 % of slow answers kept the others waiting for slots: a 200,000
//! change backlog took 15 s instead of 5). One that takes [`HEDGE_FACTOR`] times longer
//! (at least [`HEDGE_FLOOR`]) is stuck at central: the same request (same
//! `Idempotency-Key`) goes a second time; the first answer of the two counts and the other
//! request is dropped. One slow answer then holds back neither the other requests nor its
//! own changes.
//!
//! That holds for a slow answer of its own, not for central slow on every request (overloaded,
//! say): then giving slots up and sending requests again would only pile more on it
//! (measured: with `max_in_flight_requests = 4`, a central that turned slow held 36 requests
//! at once and got 1,056 changes twice). So a request gives its slot up only while few of
//! the latest requests went slow ([`OUTLIERS`]); past that it waits for its answer in its slot,
//! goes a second time only once others answer quickly again, and its answer time shrinks the
//! limit. And whatever the slots do, every request of [`SMALL`] changes or more, a second try
//! too, holds one of `max_in_flight_requests` places until its answer: the configured most is
//! never exceeded.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Requests of fewer changes pass without a slot.
pub const SMALL: usize = 64;
/// The limit a client starts with.
const INITIAL: usize = 8;
/// The limit never goes below this (or the configured most, if lower).
const MIN: usize = 2;
/// Fewer requests than this waiting at central: the limit may grow. (Every waiting request
/// is in doubt at a crash. Since a backlog goes in full requests, 2 to 4 waiting left 1,600 to
/// 1,730 changes to send again after a kill -9 in the middle of one, three runs; 1 to 2 left
/// 890 to 1,420, five runs, for a backlog drained 10 % slower: 1.43 s against 1.20 to 1.30 s
/// for 200,000 changes, still faster than the 1.50 s of requests formed as changes came.)
const ALPHA: f64 = 1.0;
/// More requests than this waiting at central: the limit shrinks.
const BETA: f64 = 2.0;
/// Answers (of one size) after which the shortest answer time is learned again (central may
/// have become slower for good).
const MIN_WINDOW: u32 = 250;
/// Sizes of requests whose answer times are compared with each other: 64–127 changes,
/// 128–255, 256–511, and more (a request of 500 changes takes ten times one of 64).
const SIZES: usize = 4;

/// The size class of a request of `changes` changes (at least [`SMALL`]).
fn size_class(changes: usize) -> usize {
    ((changes / SMALL).max(1).ilog2() as usize).min(SIZES - 1)
}

/// The shortest answer time of requests of one size, in the previous window and this one.
#[derive(Debug, Default)]
struct Shortest {
    before: Option<Duration>,
    now: Option<Duration>,
    samples: u32,
}

impl Shortest {
    /// Learns `took`; the shortest answer time seen lately, if there are enough to tell.
    fn learn(&mut self, took: Duration) -> Option<Duration> {
        self.now = Some(self.now.map_or(took, |m| m.min(took)));
        self.samples += 1;
        if self.samples >= MIN_WINDOW {
            self.before = self.now.take();
            self.samples = 0;
        }
        match (self.before, self.now) {
            (Some(b), Some(n)) => Some(b.min(n)),
            (Some(m), None) => Some(m),
            // Too few answers of this size yet to know central's quickest.
            (None, _) if self.samples < 8 => None,
            (None, n) => n,
        }
    }
}
/// A request gives its slot up once its answer takes this many times the usual (median)
/// answer time...
const SLOW_FACTOR: f64 = 4.0;
/// ...and at least this long.
const SLOW_FLOOR: Duration = Duration::from_millis(10);
/// A request is stuck once its answer takes this many times the usual (median) answer
/// time...
const HEDGE_FACTOR: f64 = 8.0;
/// ...and at least this long.
pub const HEDGE_FLOOR: Duration = Duration::from_millis(500);
/// A slow request gives its slot up (and may go a second time) only while fewer than this
/// share of the latest requests went slow; past it, central is slow, not the request. (Half
/// of them slow is one of two nodes of central stuck: a second try meets the other.)
const OUTLIERS: f64 = 0.75;
/// How much each request moves the share of those that went slow (an average over about
/// the latest 10).
const SLOW_SHARE_STEP: f64 = 0.1;

/// The limit on requests in the air, shared by every warehouse and lane of one client.
pub struct InAir {
    slots: Arc<Semaphore>,
    /// `max` places: every request of [`SMALL`] changes or more holds one until its answer,
    /// with its slot or without (a slow one, a second try).
    places: Arc<Semaphore>,
    state: std::sync::Mutex<State>,
    max: usize,
    /// Told whenever a slot comes back (see [`InAir::room`]).
    freed: tokio::sync::Notify,
}

#[derive(Debug)]
struct State {
    limit: usize,
    /// Slots to take away as they come back (the limit shrank while they were out).
    debt: usize,
    /// Per size (see [`size_class`]), the shortest answer times seen lately.
    shortest: [Shortest; SIZES],
    /// The usual answer time (a running median, seconds), of every answered request.
    usual: Option<f64>,
    /// The share of the latest requests that went slow (see [`OUTLIERS`]).
    slow_share: f64,
}

impl State {
    /// Counts a request in [`State::slow_share`]: one that went slow, or one answered before.
    fn count(&mut self, slow: bool) {
        let step = if slow { SLOW_SHARE_STEP } else { 0.0 };
        self.slow_share = self.slow_share * (1.0 - SLOW_SHARE_STEP) + step;
    }
}

/// A request's place in the air; given back when dropped.
pub struct Slot {
    air: Arc<InAir>,
    /// One of the limit's slots (none for a small request, a second try, or a slow one).
    permit: Option<OwnedSemaphorePermit>,
    /// One of the `max` places (none for a small request).
    place: Option<OwnedSemaphorePermit>,
}

impl InAir {
    /// A limit that grows to at most `max` requests.
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        let limit = INITIAL.min(max);
        Self {
            slots: Arc::new(Semaphore::new(limit)),
            places: Arc::new(Semaphore::new(max)),
            state: std::sync::Mutex::new(State {
                limit,
                debt: 0,
                shortest: Default::default(),
                usual: None,
                slow_share: 0.0,
            }),
            max,
            freed: tokio::sync::Notify::new(),
        }
    }

    /// Waits until a slot is free (at once if one is). A sender that has requests in the air
    /// already waits here before it makes the next one: its changes queue up meanwhile and go
    /// in one full request when central has room, not in many small ones formed early that
    /// wait for slots (a 200,000-change backlog went in requests of 133 changes on average;
    /// every request is one more chance of a fault's wait on the backlog's path).
    pub async fn room(&self) {
        let freed = self.freed.notified();
        tokio::pin!(freed);
        // Told from here on: a slot that comes back after the check wakes us.
        freed.as_mut().enable();
        if !self.has_room() {
            freed.await;
        }
    }

    /// Whether a slot (and a place) is free now.
    pub fn has_room(&self) -> bool {
        self.slots.available_permits() > 0 && self.places.available_permits() > 0
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    /// Waits for a slot and a place for a request of `changes` changes (a small one gets
    /// neither).
    pub async fn acquire(self: &Arc<Self>, changes: usize) -> Slot {
        if changes < SMALL {
            return self.slot(None, None);
        }
        // The semaphores are never closed.
        let permit = self.slots.clone().acquire_owned().await.ok();
        let place = self.places.clone().acquire_owned().await.ok();
        self.slot(permit, place)
    }

    /// Waits for a place (no slot) for the second try of a stuck request of `changes`
    /// changes.
    pub async fn acquire_place(self: &Arc<Self>, changes: usize) -> Slot {
        let place = if changes < SMALL {
            None
        } else {
            self.places.clone().acquire_owned().await.ok()
        };
        self.slot(None, place)
    }

    fn slot(
        self: &Arc<Self>,
        permit: Option<OwnedSemaphorePermit>,
        place: Option<OwnedSemaphorePermit>,
    ) -> Slot {
        Slot {
            air: self.clone(),
            permit,
            place,
        }
    }

    /// Counts a request that was answered (with anything) before it went slow.
    pub fn answered_quickly(&self) {
        self.lock().count(false);
    }

    /// How long a request holds its slot: once its answer takes [`SLOW_FACTOR`] times the
    /// usual answer time, it is no longer one of those central works through (a slow answer
    /// holds no capacity there), and its slot goes to the next request.
    pub fn slow_after(&self) -> Duration {
        let usual = self.lock().usual.unwrap_or(0.0);
        SLOW_FLOOR.max(Duration::from_secs_f64(usual * SLOW_FACTOR))
    }

    /// How long a request may take before it counts as stuck, and goes a second time.
    pub fn stuck_after(&self) -> Duration {
        let usual = self.lock().usual.unwrap_or(0.0);
        HEDGE_FLOOR.max(Duration::from_secs_f64(usual * HEDGE_FACTOR))
    }

    /// Learns from central's results for a request, which took `took`; `slot` is the
    /// request's (none if it gave its slot up as stuck, or is small). Only results count: an
    /// error status comes back without the work, a timeout or a refused connection says
    /// nothing about central's queue.
    pub fn answered(&self, slot: &Slot, changes: usize, took: Duration) {
        let mut s = self.lock();
        let secs = took.as_secs_f64();
        // The usual answer time is the median (a few slow answers do not move it; central
        // slower for good does): each answer moves the estimate 2 % of it up or down.
        s.usual = Some(match s.usual {
            Some(u) if secs > u => u * 1.02,
            Some(u) => (u * 0.98).max(secs),
            None => secs,
        });
        if slot.permit.is_none() {
            return;
        }
        let Some(min) = s.shortest[size_class(changes)].learn(took) else {
            return;
        };
        let waiting = s.limit as f64 * (1.0 - min.as_secs_f64() / secs.max(1e-6));
        let before = s.limit;
        // Grow only when the limit is what holds requests back (all slots out).
        // Slots out: those that exist (the limit, and those still to be taken away) but for
        // the free ones.
        let out = (s.limit + s.debt).saturating_sub(self.slots.available_permits());
        if waiting < ALPHA && s.limit < self.max && out >= s.limit {
            s.limit += 1;
            if s.debt > 0 {
                s.debt -= 1;
            } else {
                self.slots.add_permits(1);
            }
        } else if waiting > BETA && s.limit > MIN.min(self.max) {
            s.limit -= 1;
            match self.slots.try_acquire() {
                Ok(p) => p.forget(),
                Err(_) => s.debt += 1,
            }
        }
        if s.limit != before {
            crate::metrics::metrics()
                .central_in_flight_limit
                .with_label_values(&[] as &[&str])
                .set(s.limit as i64);
            tracing::trace!(
                limit = s.limit,
                waiting,
                min_ms = min.as_secs_f64() * 1e3,
                took_ms = secs * 1e3,
                "requests in the air to central"
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Slot {
    /// Counts the request as gone slow; its slot goes to the next request, unless many of
    /// the latest requests went slow too (central is slow: see [`OUTLIERS`]). Whether it
    /// gave the slot up (then a second try may go once it is stuck).
    pub fn went_slow(&mut self) -> bool {
        // Judged by the requests before it.
        let outlier = self.still_slow_alone();
        self.air.lock().count(true);
        outlier
    }

    /// For a slow request that kept its slot: gives it up now if few of the latest requests
    /// went slow after all (quick answers came meanwhile); whether it did.
    pub fn still_slow_alone(&mut self) -> bool {
        let outlier = self.air.lock().slow_share < OUTLIERS;
        if outlier {
            self.release();
        }
        outlier
    }

    /// Gives the slot up (not the place).
    fn release(&mut self) {
        if let Some(p) = self.permit.take() {
            let mut s = self.air.lock();
            if s.debt > 0 {
                s.debt -= 1;
                p.forget();
                return;
            }
            drop(p);
            drop(s);
            self.air.freed.notify_waiters();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.release();
        if self.place.take().is_some() {
            self.air.freed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{BETA, INITIAL, InAir, MIN, SMALL};
    use std::sync::Arc;
    use std::time::Duration;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test]
    async fn the_limit_grows_while_answers_stay_quick_and_shrinks_when_they_queue() {
        let air = Arc::new(InAir::new(64));
        assert_eq!(air.limit(), INITIAL);
        // Every slot out, answers as quick as ever: grows.
        for _ in 0..40 {
            let slots: Vec<_> =
                futures_util::future::join_all((0..air.limit()).map(|_| air.acquire(SMALL))).await;
            air.answered(&slots[0], SMALL, 5 * MS);
        }
        assert!(air.limit() > 40, "{}", air.limit());
        // Answers ten times slower: requests wait at central; it shrinks until no more
        // than BETA are estimated to wait.
        for _ in 0..200 {
            let slot = air.acquire(SMALL).await;
            air.answered(&slot, SMALL, 50 * MS);
        }
        let limit = air.limit();
        assert!((MIN..=BETA as usize + 1).contains(&limit), "{limit}");
        // The slots taken away are gone: only `limit` can be out.
        let held: Vec<_> =
            futures_util::future::join_all((0..limit).map(|_| air.acquire(SMALL))).await;
        assert!(
            tokio::time::timeout(10 * MS, air.acquire(SMALL))
                .await
                .is_err(),
            "a slot beyond the limit"
        );
        drop(held);
    }

    #[tokio::test]
    async fn room_is_waited_for_until_a_slot_comes_back() {
        let air = Arc::new(InAir::new(MIN));
        tokio::time::timeout(10 * MS, air.room())
            .await
            .expect("room while slots are free");
        let mut held: Vec<_> =
            futures_util::future::join_all((0..air.limit()).map(|_| air.acquire(SMALL))).await;
        assert!(!air.has_room());
        let waiter = tokio::spawn({
            let air = air.clone();
            async move { air.room().await }
        });
        tokio::time::sleep(10 * MS).await;
        assert!(!waiter.is_finished(), "room while every slot is out");
        // One slow request gives its slot up: the waiter goes.
        assert!(held[0].went_slow());
        tokio::time::timeout(100 * MS, waiter)
            .await
            .expect("woken when a slot came back")
            .unwrap();
    }

    #[tokio::test]
    async fn a_limit_nobody_reaches_does_not_grow() {
        let air = Arc::new(InAir::new(64));
        for _ in 0..100 {
            let slot = air.acquire(SMALL).await;
            air.answered(&slot, SMALL, 5 * MS);
        }
        assert_eq!(air.limit(), INITIAL);
    }

    #[tokio::test]
    async fn small_requests_and_slow_ones_hold_no_slot() {
        let air = Arc::new(InAir::new(64));
        let mut held: Vec<_> =
            futures_util::future::join_all((0..air.limit()).map(|_| air.acquire(SMALL))).await;
        // A small request passes while every slot is out.
        let small = air.acquire(SMALL - 1).await;
        air.answered(&small, SMALL - 1, 5 * MS);
        assert!(
            tokio::time::timeout(10 * MS, air.acquire(SMALL))
                .await
                .is_err()
        );
        // One gives its slot up as slow: another request goes.
        assert!(held[0].went_slow());
        assert!(
            tokio::time::timeout(10 * MS, air.acquire(SMALL))
                .await
                .is_ok()
        );
        assert_eq!(air.stuck_after(), super::HEDGE_FLOOR);
        assert_eq!(air.slow_after(), 20 * MS);
    }

    #[tokio::test]
    async fn a_slow_request_keeps_its_slot_once_most_of_the_latest_went_slow() {
        let air = Arc::new(InAir::new(64));
        // Now and then one goes slow among quick ones: each gives its slot up.
        for _ in 0..20 {
            for _ in 0..19 {
                air.answered_quickly();
            }
            assert!(air.acquire(SMALL).await.went_slow());
        }
        // Then every request goes slow (central is): a few still give their slots up, until
        // most of the latest went slow; from then on each keeps its own.
        let mut gave_up = 0;
        for _ in 0..30 {
            let mut slot = air.acquire(SMALL).await;
            if slot.went_slow() {
                gave_up += 1;
            }
        }
        assert!((1..=16).contains(&gave_up), "{gave_up} gave their slots up");
        let mut kept = air.acquire(SMALL).await;
        assert!(!kept.went_slow());
        assert!(!kept.still_slow_alone());
        let limit = air.limit();
        // Quick answers again (a stuck node of central, say): the one that kept its slot
        // gives it up now, and the next slow one is an outlier of its own.
        for _ in 0..20 {
            air.answered_quickly();
        }
        assert!(kept.still_slow_alone());
        let others: Vec<_> =
            futures_util::future::join_all((0..limit).map(|_| air.acquire(SMALL))).await;
        drop(others);
        assert!(air.acquire(SMALL).await.went_slow());
    }

    #[tokio::test]
    async fn requests_without_slots_still_hold_places_and_the_most_is_never_exceeded() {
        let max = 3;
        let air = Arc::new(InAir::new(max));
        // Slow requests give their slots up, but keep their places.
        let mut held = Vec::new();
        for _ in 0..max {
            let mut slot = air.acquire(SMALL).await;
            assert!(slot.went_slow());
            held.push(slot);
        }
        assert!(!air.has_room());
        assert!(
            tokio::time::timeout(10 * MS, air.acquire(SMALL))
                .await
                .is_err(),
            "a request beyond the configured most"
        );
        assert!(
            tokio::time::timeout(10 * MS, air.acquire_place(SMALL))
                .await
                .is_err(),
            "a second try beyond the configured most"
        );
        // A small request needs none.
        let _small = air.acquire_place(SMALL - 1).await;
        // One answers: its place goes to the next request, and room is told.
        let waiter = tokio::spawn({
            let air = air.clone();
            async move { air.room().await }
        });
        tokio::time::sleep(10 * MS).await;
        held.pop();
        tokio::time::timeout(100 * MS, waiter)
            .await
            .expect("woken when a place came back")
            .unwrap();
        let _next = tokio::time::timeout(10 * MS, air.acquire(SMALL))
            .await
            .expect("a place came back");
    }
}
