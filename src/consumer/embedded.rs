//! The consumer side of the embedded bus: one task per warehouse queue.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Stage;
use crate::bus::embedded::EmbeddedReceiver;

/// How many changes go into one batch at most, and how long to wait for a batch to fill.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Changes per batch.
    pub max_changes: usize,
    /// Wait for more changes at most this long after the first one.
    pub linger: Duration,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_changes: 500,
            linger: Duration::from_millis(50),
        }
    }
}

/// Consumes one warehouse's queue until `cancel`: batches events, hands them to the stage
/// and reports their outcomes back to the bus.
pub async fn run(
    mut rx: EmbeddedReceiver,
    stage: Arc<Stage>,
    limits: BatchLimits,
    cancel: CancellationToken,
) {
    let mut batch = Vec::with_capacity(limits.max_changes);
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
                    batch.push(d.event);
                }
            }
            if batch.len() >= limits.max_changes {
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
        stage.handle(&batch).await;
        rx.outcome_through(last_seq);
        batch.clear();
    }
}
