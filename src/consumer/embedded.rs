//! The consumer side of the embedded bus: one task per warehouse queue.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Incoming, Stage};
use crate::bus::embedded::EmbeddedReceiver;
use crate::central::client::Cancelled;

/// Batches in flight, counted from the oldest without an outcome: those after it that are
/// done wait there too, since outcomes are reported in order. So it is no real bound: one
/// share waiting on central (a `Retry-After`, a slow answer) must not hold back the rest,
/// as 64 did (every lane idle for up to a second, waiting for it). The budget of changes in
/// flight ([`super::IN_FLIGHT_CHANGES`]) is what bounds them.
const MAX_IN_FLIGHT: usize = 4096;

/// Consumes one warehouse's queue until `cancel`: batches events (by the stage's count and
/// linger), hands them to the stage and reports their outcomes back to the bus, in order.
pub async fn run(
    warehouse_id: String,
    mut rx: EmbeddedReceiver,
    stage: Arc<Stage>,
    cancel: CancellationToken,
) {
    // What an earlier consumer of this queue had in flight is replayed by the source.
    stage.forget_lanes(Some(&warehouse_id)).await;
    let limits = stage.settings().batch;
    let max_items = limits.max_changes * super::BATCH_REQUESTS;
    let budget = Stage::budget();
    // Batches being delivered with their last sequence numbers, oldest first: the next batch
    // is gathered and prepared meanwhile; outcomes reach the bus in order.
    let mut inflight: VecDeque<Inflight> = VecDeque::new();
    loop {
        let first = loop {
            tokio::select! {
                c = rx.recv() => break c,
                (r, seq) = oldest(&mut inflight) => {
                    if !matches!(r, Ok(Ok(()))) {
                        return;
                    }
                    rx.outcome_through(seq);
                }
                _ = cancel.cancelled() => return,
            }
        };
        let Some(first) = first else { return };
        let deadline = Instant::now() + limits.linger;
        let mut batch = Vec::with_capacity(max_items);
        let mut last_seq = 0;
        let mut chunk = Some(first);
        loop {
            if let Some(c) = chunk.take() {
                for d in c {
                    last_seq = d.seq;
                    batch.push(Incoming::Event(d.event));
                }
            }
            if batch.len() >= max_items {
                break;
            }
            // Linger only behind a delivery in flight: a quiet lane sends at once, and under
            // load the batch grows while earlier ones are delivered and goes as soon as the
            // oldest is done (or it is full, or the linger passed).
            chunk = match rx.try_recv() {
                Some(c) => Some(c),
                None if inflight.is_empty() => break,
                None => tokio::select! {
                    c = rx.recv() => match c { Some(c) => Some(c), None => break },
                    (r, seq) = oldest(&mut inflight) => {
                        if !matches!(r, Ok(Ok(()))) {
                            return;
                        }
                        rx.outcome_through(seq);
                        break;
                    }
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = cancel.cancelled() => return,
                },
            };
        }
        let Ok(prepared) = stage.prepare(&warehouse_id, batch).await else {
            // Cancelled: these events have no outcome; the source replays them.
            return;
        };
        // Its share of the budget, while earlier batches complete (in order).
        let wanted = prepared.len().min(super::IN_FLIGHT_CHANGES) as u32;
        let permit = loop {
            if inflight.len() < MAX_IN_FLIGHT
                && let Ok(p) = budget.clone().try_acquire_many_owned(wanted)
            {
                break p;
            }
            tokio::select! {
                (r, seq) = oldest(&mut inflight) => {
                    if !matches!(r, Ok(Ok(()))) {
                        return;
                    }
                    rx.outcome_through(seq);
                }
                p = budget.clone().acquire_many_owned(wanted), if inflight.len() < MAX_IN_FLIGHT => {
                    match p {
                        Ok(p) => break p,
                        Err(_) => return,
                    }
                }
                _ = cancel.cancelled() => return,
            }
        };
        // The lanes' shares are queued here, in source order; the delivery runs on its own.
        let delivery = stage.clone().deliver(prepared, Some(permit));
        inflight.push_back((tokio::spawn(delivery), last_seq));
    }
}

type Inflight = (tokio::task::JoinHandle<Result<(), Cancelled>>, u64);

/// The oldest delivery's result and last sequence number; never resolves without one.
async fn oldest(
    inflight: &mut VecDeque<Inflight>,
) -> (Result<Result<(), Cancelled>, tokio::task::JoinError>, u64) {
    match inflight.front_mut() {
        Some((handle, seq)) => {
            let seq = *seq;
            let r = handle.await;
            inflight.pop_front();
            (r, seq)
        }
        None => std::future::pending().await,
    }
}
