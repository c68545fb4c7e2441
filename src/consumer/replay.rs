//! Replay positions: per warehouse, ordered stream and key lane, the position of the last
//! change handed to a delivery (`consumer_lanes` keeps those with an outcome), so that a
//! replay after a restart, or a Kafka partition holding a replay after what it replays,
//! sends central nothing it already has from us, and no request holds a key's versions out
//! of order (DESIGN §3). Also the highest version sent (`consumer_progress`), which tells a
//! replay central answers `stale` from a conflict.

use super::*;

/// Per lane, the position (version, index among its event's changes) of the last change
/// handed to a delivery.
pub(super) type LaneMarks = [Option<(String, u8)>; LANES];

/// Per stream, a lane's position (see [`position_text`]).
pub(super) type StreamMarks = Vec<(Arc<str>, String)>;

/// A lane's settled positions, on their way to `consumer_lanes`, with the count of changes
/// they settle (in [`crate::metrics::Metrics::central_changes_unsettled`] until written).
pub(super) struct Settled {
    pub(super) lane: usize,
    pub(super) marks: StreamMarks,
    pub(super) _landed: Vec<Held>,
}

/// A lane position as `consumer_lanes` stores it: `{version}/{index:02X}` (fixed width).
pub(super) fn position_text(version: &str, sub: u8) -> String {
    format!("{version}/{sub:02X}")
}

/// The lane position stored as `text` (see [`position_text`]); none if it is not one.
pub(super) fn parse_position(text: &str) -> Option<(String, u8)> {
    let (version, sub) = text.rsplit_once('/')?;
    Some((version.to_string(), u8::from_str_radix(sub, 16).ok()?))
}

impl Stage {
    /// Forgets the lane positions handed to deliveries (of `warehouse_id`, or of every
    /// warehouse): a consumer that starts (again) reads them from `consumer_lanes`, where
    /// only positions with an outcome are, since what an ended consumer had in flight is
    /// replayed. It forgets the highest version sent too: another process that owned the
    /// warehouse meanwhile sent newer ones, and a replay that central answers `stale` with
    /// one of those is superseded, not a conflict (read again from `consumer_progress`).
    pub async fn forget_lanes(&self, warehouse_id: Option<&str>) {
        {
            let mut lanes = self.lanes.lock().await;
            match warehouse_id {
                Some(w) => drop(lanes.remove(w)),
                None => lanes.clear(),
            }
        }
        let mut sent = self.sent.lock().await;
        match warehouse_id {
            Some(w) => drop(sent.remove(w)),
            None => sent.clear(),
        }
    }

    /// Drops from `changes` (one lane's, in source order) those a replay brings again: one
    /// at or below its lane's position in its stream was handed to a delivery before (by
    /// this consumer, or by one before it, which recorded its outcome in `consumer_lanes`).
    /// One lane's changes reach central in stream order, so what is at or below that
    /// position has an outcome already (or is in flight, and would be replayed again if that
    /// delivery failed). So a restart sends central nothing it has from us, and no request
    /// holds a key's versions out of order (a Kafka partition holds a replay after what it
    /// replays).
    pub(super) async fn skip_replayed(
        &self,
        warehouse_id: &str,
        lane: usize,
        changes: &mut Vec<Sending<'_>>,
    ) -> Result<(), Cancelled> {
        // The streams this lane's changes came in on (one, or a few Kafka partitions), each
        // with the position of its last change kept here.
        let mut kept: Vec<(&str, Option<(&str, u8)>)> = Vec::new();
        for c in changes.iter() {
            let stream = c.queued.item.stream();
            if !kept.iter().any(|(s, _)| *s == stream) {
                kept.push((stream, None));
            }
        }
        let mut lanes = self.lanes.lock().await;
        if !lanes.contains_key(warehouse_id) {
            lanes.insert(warehouse_id.to_string(), HashMap::new());
        }
        let Some(streams) = lanes.get_mut(warehouse_id) else {
            return Ok(());
        };
        for &(stream, _) in &kept {
            if !streams.contains_key(stream) {
                let marks = self.stored_lane_marks(warehouse_id, stream).await?;
                streams.insert(Arc::from(stream), marks);
            }
        }
        let mut replayed = 0u64;
        changes.retain(|c| {
            let q = c.queued;
            let stream = q.item.stream();
            let Some((_, last)) = kept.iter_mut().find(|(s, _)| *s == stream) else {
                return true;
            };
            // Above the last change kept here, or else above the mark from before.
            let mark = match *last {
                Some(m) => Some(m),
                None => streams
                    .get(stream)
                    .and_then(|m| m[lane].as_ref())
                    .map(|(v, s)| (v.as_str(), *s)),
            };
            let seen = mark.is_some_and(|m| (q.change.version.as_str(), q.sub) <= m);
            if seen {
                replayed += 1;
                tracing::trace!(warehouse = %warehouse_id, stream, lane, version = %q.change.version, sub = q.sub, mark = ?mark, key = q.change.key_text(c.json), entity = q.change.entity.as_str(), "replayed: skipped");
            } else {
                *last = Some((q.change.version.as_str(), q.sub));
            }
            !seen
        });
        // Each stream's mark moves once, to the last change kept (the lane is in source order).
        for (stream, last) in kept {
            if let (Some((v, s)), Some(m)) = (last, streams.get_mut(stream)) {
                m[lane] = Some((v.to_string(), s));
            }
        }
        drop(lanes);
        if replayed > 0 {
            crate::metrics::metrics()
                .changes_delivered
                .with_label_values(&[warehouse_id, "replayed"])
                .inc_by(replayed);
        }
        Ok(())
    }

    /// The lane positions `consumer_lanes` holds for `warehouse_id`'s `stream`.
    pub(super) async fn stored_lane_marks(
        &self,
        warehouse_id: &str,
        stream: &str,
    ) -> Result<LaneMarks, Cancelled> {
        let stored = self
            .retry("cannot read the consumer's lane progress", || {
                self.state.lane_marks(warehouse_id, stream, LANES as i32)
            })
            .await?;
        let mut marks: LaneMarks = Default::default();
        for (lane, text) in stored {
            match (
                usize::try_from(lane).ok().filter(|&l| l < LANES),
                parse_position(&text),
            ) {
                (Some(l), Some(pos)) => marks[l] = Some(pos),
                _ => {
                    tracing::warn!(warehouse = %warehouse_id, stream, lane, settled = %text, "consumer_lanes holds a row this version did not write; ignored (its changes are sent again)")
                }
            }
        }
        Ok(marks)
    }

    /// Hands a lane's settled positions to the warehouse's writer of `consumer_lanes`, which
    /// writes what the lanes settled meanwhile in one statement. The positions only spare
    /// central replays after a restart (what the bus acknowledges does not wait for them), so
    /// they may trail; one write per request kept the state DB's pool busy and delayed the
    /// writes that come before a request goes.
    pub(super) fn settle_later(
        self: &Arc<Self>,
        warehouse_id: &str,
        lane: usize,
        marks: StreamMarks,
        landed: Vec<Held>,
    ) {
        let mut writers = self.settlers.lock().unwrap_or_else(|p| p.into_inner());
        let tx = writers.entry(warehouse_id.to_string()).or_insert_with(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let writer = tokio::spawn(self.clone().settle_lanes(warehouse_id.to_string(), rx));
            self.writers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(writer);
            tx
        });
        let _ = tx.send(Settled {
            lane,
            marks,
            _landed: landed,
        });
    }

    /// Writes the positions `rx` brings for `warehouse_id`, what is there at once in one
    /// statement, until the stage is cancelled.
    pub(super) async fn settle_lanes(
        self: Arc<Self>,
        warehouse_id: String,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<Settled>,
    ) {
        let mut got = Vec::new();
        loop {
            got.clear();
            // Once the stage stops, what is here is written (once) and the writer ends: a
            // restart then skips what this process settled last.
            let stopping = tokio::select! {
                n = rx.recv_many(&mut got, 4096) => {
                    if n == 0 {
                        return;
                    }
                    false
                }
                _ = self.cancel.cancelled() => {
                    while let Ok(m) = rx.try_recv() {
                        got.push(m);
                    }
                    true
                }
            };
            // One row per stream and lane (a statement may not touch a row twice): the highest.
            let mut latest: Vec<(usize, &Arc<str>, &String)> = Vec::new();
            for (lane, stream, at) in got
                .iter()
                .flat_map(|s| s.marks.iter().map(move |(stream, at)| (s.lane, stream, at)))
            {
                match latest
                    .iter_mut()
                    .find(|(l, s, _)| *l == lane && *s == stream)
                {
                    Some(m) if *m.2 < *at => m.2 = at,
                    Some(_) => {}
                    None => latest.push((lane, stream, at)),
                }
            }
            let marks: Vec<LaneMark<'_>> = latest
                .iter()
                .map(|(lane, stream, at)| LaneMark {
                    stream,
                    lane: *lane as i32,
                    settled: (*at).clone(),
                })
                .collect();
            let written = marks.is_empty()
                || self
                    .persist(|| self.state.settle_lanes(&warehouse_id, LANES as i32, &marks))
                    .await
                    .is_ok();
            if stopping || !written {
                return;
            }
        }
    }

    /// The highest version recorded as sent for `warehouse_id` (by [`Stage::note_sent`], in
    /// this process or in one before it): any of our own changes at central is at or below it.
    pub(super) async fn sent_high(&self, warehouse_id: &str) -> String {
        self.sent
            .lock()
            .await
            .get(warehouse_id)
            .cloned()
            .flatten()
            .unwrap_or_default()
    }

    /// Whether `version`, which central holds, was sent by another consumer of this
    /// warehouse: each raises `consumer_progress.sent_version` before it sends, and this
    /// process read it only when it first sent. A partition taken over in a rebalance
    /// replays what its consumer before delivered, at older versions than that one sent
    /// since: central answers `stale` with a version of ours, not someone else's. The state
    /// DB is asked only for a version above the highest known here, which it then raises.
    pub(super) async fn sent_by_another(
        &self,
        warehouse_id: &str,
        version: &str,
    ) -> Result<bool, Cancelled> {
        let mut sent = self.sent.lock().await;
        if let Some(Some(known)) = sent.get(warehouse_id)
            && version <= known.as_str()
        {
            return Ok(true);
        }
        let stored = self
            .retry("cannot read the consumer's progress", || {
                self.state.sent_version(warehouse_id)
            })
            .await?;
        let by_another = stored.as_deref().is_some_and(|s| version <= s);
        if let Some(s) = stored {
            let known = sent.entry(warehouse_id.to_string()).or_default();
            if known.as_deref().is_none_or(|k| s.as_str() > k) {
                *known = Some(s);
            }
        }
        Ok(by_another)
    }

    /// Records (before sending) that versions up to `high` may be at central.
    pub(super) async fn note_sent(&self, warehouse_id: &str, high: &str) -> Result<(), Cancelled> {
        let mut sent = self.sent.lock().await;
        if !sent.contains_key(warehouse_id) {
            let stored = self
                .retry("cannot read the consumer's progress", || {
                    self.state.sent_version(warehouse_id)
                })
                .await?;
            sent.insert(warehouse_id.to_string(), stored);
        }
        let known = sent.get(warehouse_id).and_then(Option::as_deref);
        if known.is_none_or(|k| high > k) {
            self.persist(|| self.state.raise_sent_version(warehouse_id, high))
                .await?;
            sent.insert(warehouse_id.to_string(), Some(high.to_string()));
        }
        Ok(())
    }
}
