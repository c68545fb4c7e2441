//! Lanes and flights: a prepared batch is split by key hash into lanes, each with a worker
//! of its own that sends its queue to central in requests (flights), up to
//! [`LANE_PIPELINE`] at once with no key in two of them. A lane central keeps waiting holds
//! back only its own keys, and a key's changes reach central in source order.

use super::*;

/// A change queued for its lane's worker, with the event it came from (shared with the
/// event's other changes, freed with the last of them).
pub(super) struct Queued {
    pub(super) item: Arc<Incoming>,
    /// Its index among its event's changes (with the version, its position in the stream).
    pub(super) sub: u8,
    /// Its JSON is in its [`LanePart`]'s `rendered`.
    pub(super) change: MappedChange,
}

/// A lane's share of a batch, queued for the lane's worker.
pub(super) struct LanePart {
    /// Its changes, in source order.
    pub(super) changes: Vec<Queued>,
    /// Their JSON, back to back.
    pub(super) rendered: Vec<u8>,
    /// What the batch's changes share.
    pub(super) batch: Arc<BatchNote>,
    /// Told how many of its changes were sent once each has an outcome; dropped unsent when
    /// the worker was cancelled.
    pub(super) done: tokio::sync::oneshot::Sender<i64>,
    /// Its share of the consumer's budget of changes in flight, freed with it.
    pub(super) _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// What one batch's lane shares have in common.
pub(super) struct BatchNote {
    /// The batch's highest version.
    pub(super) high: String,
    /// Set once `high` is recorded as sent (by whichever lane goes first); false when that
    /// was cancelled.
    pub(super) noted: tokio::sync::OnceCell<bool>,
}

/// One lane's queue of batch shares, whether its worker runs, and its wake-up.
#[derive(Default)]
pub(super) struct LaneQueue {
    pub(super) parts: std::collections::VecDeque<LanePart>,
    pub(super) running: bool,
    pub(super) wake: Arc<tokio::sync::Notify>,
}

impl LaneQueue {
    /// Whether it holds a full request: `max_changes` changes, or `max_bytes` of JSON.
    fn holds_a_request(&self, max_changes: usize, max_bytes: usize) -> bool {
        let (mut changes, mut bytes) = (0, 0);
        self.parts.iter().any(|p| {
            changes += p.changes.len();
            bytes += p.rendered.len();
            changes >= max_changes || bytes >= max_bytes
        })
    }
}

/// Lane shares on their way in one go (their changes in `send`, by part and index).
pub(super) struct Flight {
    pub(super) parts: Vec<LanePart>,
    /// The changes to send (not replays), in source order.
    pub(super) send: Vec<(usize, usize)>,
    /// Per part, how many of its changes are sent.
    pub(super) counts: Vec<i64>,
    /// Per stream, the lane's position once the flight landed.
    pub(super) marks: StreamMarks,
    /// The highest version that may be at central from us when it left.
    pub(super) sent_high: String,
}

/// A flight back: its number, the flight, and per part how many changes it sent.
pub(super) type Landed = (u64, Flight, Result<Vec<i64>, Cancelled>);

/// Flights in the air at once per lane (their keys disjoint).
pub(super) const LANE_PIPELINE: usize = 16;

/// With this many flights in the air, a lane sends only full requests.
pub(super) const BUSY: usize = 2;

/// A queued change about to be sent: which of the worker's parts it is of, and its JSON.
pub(super) struct Sending<'a> {
    pub(super) part: usize,
    /// Its index among the part's changes.
    pub(super) index: usize,
    pub(super) queued: &'a Queued,
    pub(super) json: &'a [u8],
}

impl Stage {
    /// Delivers a prepared batch and records each outcome; the future resolves once each
    /// change has one. Calls are ordered: each lane's changes go after those of every batch
    /// handed over before (call this in source order). Each lane has a worker of its own that
    /// sends its queue in requests, one at a time, so a lane central keeps waiting (a slow
    /// answer, a `Retry-After`) holds back no other lane; a lane that fell behind sends what
    /// queued up meanwhile in full requests. A lane's share of the batch (and `budget`'s
    /// share of it) is freed as soon as that lane is done, not with the whole batch.
    pub fn deliver(
        self: Arc<Self>,
        prepared: Prepared,
        budget: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> impl std::future::Future<Output = Result<(), Cancelled>> + Send + 'static {
        let Prepared {
            warehouse_id,
            items,
            pending,
            rendered,
        } = prepared;
        let high = pending
            .iter()
            .map(|p| p.change.version.as_str())
            .max()
            .unwrap_or_default()
            .to_string();
        let batch = Arc::new(BatchNote {
            high,
            noted: tokio::sync::OnceCell::new(),
        });
        // Lanes by key: one key's changes stay in one lane, in source order, so they are
        // never reordered; the lanes' requests are in flight together.
        let items: Vec<Arc<Incoming>> = items.into_iter().map(Arc::new).collect();
        // Each lane's share sized exactly: it is held until its changes have outcomes, and a
        // grown vector's spare room would be held with it (up to half of it).
        let mut sizes = [0usize; LANES];
        for p in &pending {
            sizes[lane(p.change.key_hash)] += 1;
        }
        let mut lanes: Vec<Vec<Queued>> = sizes.iter().map(|&n| Vec::with_capacity(n)).collect();
        for p in pending {
            lanes[lane(p.change.key_hash)].push(Queued {
                item: items[p.item].clone(),
                sub: p.sub,
                change: p.change,
            });
        }
        drop(items);
        let mut budget = budget;
        let mut done = Vec::new();
        {
            let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            let queues = queues
                .entry(warehouse_id.clone())
                .or_insert_with(|| (0..LANES).map(|_| LaneQueue::default()).collect());
            for (lane, mut changes) in lanes.into_iter().enumerate() {
                if changes.is_empty() {
                    continue;
                }
                // Its own JSON, so that it is freed with the lane's share.
                let mut own = Vec::with_capacity(changes.iter().map(|q| q.change.json.len()).sum());
                for q in &mut changes {
                    let start = own.len();
                    own.extend_from_slice(&rendered[q.change.json.clone()]);
                    q.change.json = start..own.len();
                }
                let permit = budget
                    .as_mut()
                    .and_then(|b| b.split(changes.len().min(b.num_permits())));
                let (tx, rx) = tokio::sync::oneshot::channel();
                done.push(rx);
                let queue = &mut queues[lane];
                queue.parts.push_back(LanePart {
                    changes,
                    rendered: own,
                    batch: batch.clone(),
                    done: tx,
                    _permit: permit,
                });
                if queue.running {
                    queue.wake.notify_one();
                } else {
                    queue.running = true;
                    tokio::spawn(self.clone().lane_worker(warehouse_id.clone(), lane));
                }
            }
        }
        drop((rendered, budget));
        async move {
            let mut delivered = 0;
            for rx in done {
                // A share dropped unanswered: its lane's worker was cancelled.
                delivered += rx.await.map_err(|_| Cancelled)?;
            }
            if delivered == 0 {
                return Ok(());
            }
            // One count per batch, not per request: the lanes' requests would queue on the row.
            self.persist(|| self.state.add_delivered(&warehouse_id, delivered))
                .await
        }
    }

    /// Sends lane `lane` of `warehouse_id`'s queue until it is empty: up to
    /// [`LANE_PIPELINE`] flights at once, each as full as the queue allows, so long as no
    /// key is in two of them (a key's changes go one flight after the other, in order). A
    /// quiet lane's changes go at once; one with flights out sends the next once central has
    /// room, and with [`BUSY`] flights out only a full request, so a backlog goes in full
    /// requests (fewer requests: less work per change, and fewer faults' waits on its path).
    /// The lane's position in `consumer_lanes` moves in order, as the oldest flights land.
    pub(super) async fn lane_worker(self: Arc<Self>, warehouse_id: String, lane: usize) {
        let Some(wake) = self.lane_wake(&warehouse_id, lane) else {
            return;
        };
        let limit = self.settings.batch.max_changes;
        let max_bytes = self.settings.batch.max_bytes;
        let mut flights = futures_util::stream::FuturesUnordered::new();
        // Flights by number, oldest first, with the lane positions of those that landed (and
        // their changes, counted as unsettled from their answer on).
        let mut order: std::collections::VecDeque<(u64, Option<(StreamMarks, Held)>)> =
            Default::default();
        let unsettled = crate::metrics::metrics()
            .central_changes_unsettled
            .with_label_values(&[&warehouse_id]);
        // Keys in flight, with how many flights hold each.
        let mut busy: HashMap<u64, u32> = HashMap::new();
        let mut next = 0u64;
        let stop =
            |flights: &futures_util::stream::FuturesUnordered<tokio::task::JoinHandle<Landed>>| {
                // Nothing more goes from this lane: what is queued has no outcome (the bus
                // replays it), and the batches waiting on it learn so.
                for f in flights.iter() {
                    f.abort();
                }
                let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(queue) = queues.get_mut(&warehouse_id).map(|q| &mut q[lane]) {
                    queue.parts.clear();
                    queue.running = false;
                }
            };
        loop {
            let mut blocked = false;
            // The queue waits for central to have room for one more request.
            let mut wants_room = false;
            while flights.len() < LANE_PIPELINE {
                let parts = {
                    let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                    let Some(queue) = queues.get_mut(&warehouse_id).map(|q| &mut q[lane]) else {
                        return;
                    };
                    // With flights in the air, the next one goes once central has room: what
                    // queues meanwhile goes with it (see `InAir::room`).
                    if !flights.is_empty()
                        && !queue.parts.is_empty()
                        && self.client.as_ref().is_some_and(|c| !c.has_room())
                    {
                        wants_room = true;
                        break;
                    }
                    // A lane with flights out (a backlog, or central keeping it waiting) sends
                    // only full requests: what is short of one waits for more, or for a
                    // flight to land.
                    if flights.len() >= BUSY && !queue.holds_a_request(limit, max_bytes) {
                        break;
                    }
                    let mut parts = Vec::new();
                    let mut n = 0;
                    while let Some(part) = queue.parts.front() {
                        if !parts.is_empty() && n + part.changes.len() > limit {
                            break;
                        }
                        if part
                            .changes
                            .iter()
                            .any(|q| busy.contains_key(&q.change.key_hash))
                        {
                            blocked = true;
                            break;
                        }
                        n += part.changes.len();
                        parts.extend(queue.parts.pop_front());
                    }
                    if parts.is_empty() && flights.is_empty() {
                        queue.running = false;
                        return;
                    }
                    parts
                };
                if parts.is_empty() {
                    break;
                }
                let Ok(flight) = self.plan(&warehouse_id, lane, parts).await else {
                    stop(&flights);
                    return;
                };
                for part in &flight.parts {
                    for q in &part.changes {
                        *busy.entry(q.change.key_hash).or_default() += 1;
                    }
                }
                order.push_back((next, None));
                flights.push(tokio::spawn(self.clone().fly(
                    warehouse_id.clone(),
                    next,
                    flight,
                )));
                next += 1;
            }
            tokio::select! {
                landed = futures_util::StreamExt::next(&mut flights), if !flights.is_empty() => {
                    let Some(Ok((number, flight, Ok(counts)))) = landed else {
                        stop(&flights);
                        return;
                    };
                    for part in &flight.parts {
                        for q in &part.changes {
                            if let Some(n) = busy.get_mut(&q.change.key_hash) {
                                *n -= 1;
                                if *n == 0 {
                                    busy.remove(&q.change.key_hash);
                                }
                            }
                        }
                    }
                    if let Some(entry) = order.iter_mut().find(|(n, _)| *n == number) {
                        entry.1 = Some((flight.marks, Held::new(unsettled.clone(), flight.send.len())));
                    }
                    for (part, n) in flight.parts.into_iter().zip(counts) {
                        let _ = part.done.send(n);
                    }
                    // The oldest flights that landed: the lane's position in each stream
                    // moves to their last change there (later flights hold later changes).
                    let mut settled: StreamMarks = Vec::new();
                    let mut landed = Vec::new();
                    while let Some((_, Some((marks, held)))) = order.pop_front_if(|(_, m)| m.is_some()) {
                        landed.push(held);
                        for (stream, at) in marks {
                            match settled.iter_mut().find(|(s, _)| *s == stream) {
                                Some(s) => s.1 = at,
                                None => settled.push((stream, at)),
                            }
                        }
                    }
                    if !settled.is_empty() {
                        self.settle_later(&warehouse_id, lane, settled, landed);
                    }
                }
                _ = wake.notified(), if !blocked && !wants_room => {}
                _ = async { if let Some(c) = &self.client { c.room().await } }, if wants_room => {}
            }
        }
    }

    /// The wake-up of `warehouse_id`'s lane `lane` (told when a share is queued).
    pub(super) fn lane_wake(
        &self,
        warehouse_id: &str,
        lane: usize,
    ) -> Option<Arc<tokio::sync::Notify>> {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues.get(warehouse_id).map(|q| q[lane].wake.clone())
    }

    /// Readies `parts` (lane `lane`'s, in source order) for a flight: records their batches
    /// as sent, drops what a replay brings again, and puts the rest in source order.
    pub(super) async fn plan(
        &self,
        warehouse_id: &str,
        lane: usize,
        parts: Vec<LanePart>,
    ) -> Result<Flight, Cancelled> {
        // Versions up to each batch's highest may be at central from now on (recorded once
        // per batch, before any of its changes is sent).
        for part in &parts {
            part.batch
                .noted
                .get_or_init(|| async {
                    self.note_sent(warehouse_id, &part.batch.high).await.is_ok()
                })
                .await;
            if !part.batch.noted.get().is_some_and(|ok| *ok) {
                return Err(Cancelled);
            }
        }
        // The highest version that may be at central from us, read now, not when a batch was
        // noted: another lane may have noted this batch before this lane's earlier batches
        // went, and one of those may hold a newer version of a key this request replays (on
        // Kafka a key's versions can come from two partitions). Read then, a replay central
        // answers `stale` would look like a conflict instead of superseded.
        let sent_high = self.sent_high(warehouse_id).await;
        let mut changes: Vec<Sending<'_>> = parts
            .iter()
            .enumerate()
            .flat_map(|(i, part)| {
                part.changes
                    .iter()
                    .enumerate()
                    .map(move |(index, queued)| Sending {
                        part: i,
                        index,
                        queued,
                        json: &part.rendered[queued.change.json.clone()],
                    })
            })
            .collect();
        // Here, in the lane's order, not in `prepare` (Kafka prepares batches concurrently).
        self.skip_replayed(warehouse_id, lane, &mut changes).await?;
        // Requests in source order (version, then index in the event), each stream's changes
        // staying as they were: on Kafka one key can come from two partitions (a key move is
        // keyed by its new key, so the old key's delete shares the new key's partition), and
        // the parts of one request from two batches can hold them in either order.
        fn position<'a>(c: &Sending<'a>) -> (&'a str, u8) {
            (c.queued.change.version.as_str(), c.queued.sub)
        }
        if !changes.is_sorted_by(|a, b| position(a) <= position(b)) {
            changes.sort_by(|a, b| position(a).cmp(&position(b)));
        }
        let mut counts = vec![0i64; parts.len()];
        // Per stream, the position of its last change here.
        let mut marks: Vec<(Arc<str>, String)> = Vec::new();
        for c in changes.iter().rev() {
            let stream = c.queued.item.stream();
            if !marks.iter().any(|(s, _)| **s == *stream) {
                marks.push((
                    Arc::from(stream),
                    position_text(&c.queued.change.version, c.queued.sub),
                ));
            }
        }
        for c in &changes {
            counts[c.part] += 1;
        }
        let send = changes.iter().map(|c| (c.part, c.index)).collect();
        drop(changes);
        Ok(Flight {
            parts,
            send,
            counts,
            marks,
            sent_high,
        })
    }

    /// Sends a flight's changes and records their outcomes; hands the flight back.
    pub(super) async fn fly(
        self: Arc<Self>,
        warehouse_id: String,
        number: u64,
        flight: Flight,
    ) -> Landed {
        let Some(client) = &self.client else {
            // The caller refuses to start with mappings but no central endpoint.
            return (number, flight, Err(Cancelled));
        };
        let changes: Vec<Sending<'_>> = flight
            .send
            .iter()
            .map(|&(part, index)| {
                let p = &flight.parts[part];
                let queued = &p.changes[index];
                Sending {
                    part,
                    index,
                    queued,
                    json: &p.rendered[queued.change.json.clone()],
                }
            })
            .collect();
        let r = self
            .deliver_lane(&warehouse_id, client, &changes, &flight.sent_high)
            .await;
        drop(changes);
        let counts = flight.counts.clone();
        (number, flight, r.map(|()| counts))
    }

    /// Delivers one lane's changes, in order, in requests bounded by count and bytes, and
    /// records each outcome (the lane's position is the caller's to record).
    pub(super) async fn deliver_lane(
        &self,
        warehouse_id: &str,
        client: &CentralClient,
        queue: &[Sending<'_>],
        sent_high: &str,
    ) -> Result<(), Cancelled> {
        let limits = self.settings.batch;
        let mut start = 0;
        while start < queue.len() {
            let mut end = start;
            let mut bytes = 0;
            let size = |i: usize| queue[i].json.len() + 1;
            while end < queue.len()
                && end - start < limits.max_changes
                && (end == start || bytes + size(end) <= limits.max_bytes)
            {
                bytes += size(end);
                end += 1;
            }
            let changes: Vec<Outgoing<'_>> = queue[start..end]
                .iter()
                .map(|c| Outgoing {
                    version: &c.queued.change.version,
                    json: c.json,
                })
                .collect();
            let verdicts = client.deliver(warehouse_id, &changes, &self.cancel).await?;
            // Snapshot rows (initial load, resync) central now holds: their open conflicts
            // are resolved.
            let mut landed = Vec::new();
            let mut outcomes: Vec<(&'static str, u64)> = Vec::new();
            for (c, verdict) in queue[start..end].iter().zip(verdicts) {
                let q = c.queued;
                if q.change.snapshot
                    && let Verdict::Result(r) = &verdict
                    && matches!(r.status, ResultStatus::Applied | ResultStatus::Duplicate)
                {
                    landed.push((
                        q.change.entity.as_str().to_string(),
                        q.change.key_value(c.json),
                    ));
                }
                let outcome = self
                    .settle(warehouse_id, &q.item, &q.change, c.json, verdict, sent_high)
                    .await?;
                match outcomes.iter_mut().find(|(o, _)| *o == outcome) {
                    Some((_, n)) => *n += 1,
                    None => outcomes.push((outcome, 1)),
                }
            }
            for (outcome, n) in outcomes {
                crate::metrics::metrics()
                    .changes_delivered
                    .with_label_values(&[warehouse_id, outcome])
                    .inc_by(n);
            }
            if !landed.is_empty() {
                let resolved = self
                    .retry("cannot resolve conflicts in the state DB", || {
                        self.state.resolve_conflicts(warehouse_id, &landed)
                    })
                    .await?;
                if resolved > 0 {
                    tracing::info!(warehouse = %warehouse_id, resolved, "conflicts resolved: central now holds the warehouse's values");
                }
            }
            if let Some(last) = queue[start..end].last() {
                let micros = last.queued.change.committed_micros;
                let g = crate::metrics::metrics()
                    .delivered_commit_time
                    .with_label_values(&[warehouse_id]);
                if micros / 1_000_000 > g.get() {
                    g.set(micros / 1_000_000);
                }
            }
            start = end;
        }
        Ok(())
    }
}
