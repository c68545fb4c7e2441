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
    let limits = stage.settings().batch;
    // Enough for a full request in each lane.
    let max_items = limits.max_changes * super::LANES;
    let mut batch = Vec::with_capacity(max_items);
    let mut last_seq = 0;
    loop {
        let first = tokio::select! {
            c = rx.recv() => c,
            _ = cancel.cancelled() => return,
        };
        let Some(first) = first else { return };
        let deadline = Instant::now() + limits.linger;
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
            chunk = match rx.try_recv() {
                Some(c) => Some(c),
                None => tokio::select! {
                    c = rx.recv() => match c { Some(c) => Some(c), None => break },
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = cancel.cancelled() => return,
                },
            };
        }
        if stage.handle(&warehouse_id, &batch).await.is_err() {
            // Cancelled: these events have no outcome; the source replays them.
            return;
        }
        rx.outcome_through(last_seq);
        batch.clear();
    }
}
