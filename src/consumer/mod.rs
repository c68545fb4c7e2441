//! The consumer stage: takes change events off the bus in source order and gives each one an
//! outcome at the central inventory system (DESIGN §3, §4).
//!
//! Only an outcome lets the bus count an event as delivered: the embedded bus then
//! acknowledges the commit to the source, the Kafka consumer commits the offset.

pub mod embedded;

use std::sync::atomic::{AtomicU64, Ordering};

use crate::event::ChangeEvent;

/// What became of one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Its table is not mapped to a central entity: nothing to send.
    Skipped,
}

/// Counts of outcomes since start, for logs and metrics.
#[derive(Debug, Default)]
pub struct StageCounters {
    /// Changes of unmapped tables.
    pub skipped: AtomicU64,
}

/// Maps, validates and delivers changes; shared by every warehouse's consumer.
#[derive(Debug, Default)]
pub struct Stage {
    counters: StageCounters,
}

impl Stage {
    /// A stage with no table mapped yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The outcome counters.
    pub fn counters(&self) -> &StageCounters {
        &self.counters
    }

    /// Gives every event of `events` (one warehouse's, in source order) an outcome; returns
    /// only once each has one.
    pub async fn handle(&self, events: &[Box<ChangeEvent>]) -> Vec<Outcome> {
        self.counters
            .skipped
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        vec![Outcome::Skipped; events.len()]
    }
}
