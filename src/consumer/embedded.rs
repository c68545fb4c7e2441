//! The consumer side of the embedded bus: one task per warehouse queue.

use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Incoming, Stage};
use crate::bus::embedded::EmbeddedReceiver;

/// Consumes one warehouse's queue until `cancel`: batches events (by the stage's count and
/// linger), hands them to the stage and reports their outcomes back to the bus.
pub async fn run(
    warehouse_id: String,
    mut rx: EmbeddedReceiver,
    stage: Arc<Stage>,
    cancel: CancellationToken,
) {
    // What an earlier consumer of this queue had in flight is replayed by the source.
    stage.forget_lanes(Some(&warehouse_id)).await;
    let limits = stage.settings().batch;
    // Enough for a full request in each lane.
    let max_items = limits.max_changes * super::LANES;
    // The batch being delivered and its last sequence number: the next batch is gathered
    // and prepared meanwhile, and delivered once this one is done (keys stay in order).
    let mut inflight: Option<Inflight> = None;
    loop {
        let first = loop {
            tokio::select! {
                c = rx.recv() => break c,
                (r, seq) = wait(&mut inflight) => {
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
            // load the batch grows while the previous one is delivered and goes as soon as
            // that one is done (or it is full, or the linger passed).
            chunk = match rx.try_recv() {
                Some(c) => Some(c),
                None if inflight.is_none() => break,
                None => tokio::select! {
                    c = rx.recv() => match c { Some(c) => Some(c), None => break },
                    (r, seq) = wait(&mut inflight) => {
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
        if inflight.is_some() {
            let (r, seq) = wait(&mut inflight).await;
            if !matches!(r, Ok(Ok(()))) {
                return;
            }
            rx.outcome_through(seq);
        }
        let stage = stage.clone();
        inflight = Some((
            tokio::spawn(async move { stage.deliver(prepared).await }),
            last_seq,
        ));
    }
}

type Inflight = (
    tokio::task::JoinHandle<Result<(), crate::central::client::Cancelled>>,
    u64,
);

/// The in-flight delivery's result and last sequence number; never resolves without one.
async fn wait(
    inflight: &mut Option<Inflight>,
) -> (
    Result<Result<(), crate::central::client::Cancelled>, tokio::task::JoinError>,
    u64,
) {
    match inflight {
        Some((handle, seq)) => {
            let seq = *seq;
            let r = handle.await;
            *inflight = None;
            (r, seq)
        }
        None => std::future::pending().await,
    }
}
