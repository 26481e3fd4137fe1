//! The clock port. The deciding code never reads a clock; hosts ask one of these.
//!
//! The real clock lives with the binaries (`caretwin-cluster`); here is the virtual one.

use crate::model::TimeMs;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where the host gets `now`.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> TimeMs;
}

/// Virtual time: stands still until told to move. For tests, replay and simulation.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock showing `now_ms`.
    pub fn new(now_ms: TimeMs) -> Self {
        Self(AtomicU64::new(now_ms))
    }

    /// Moves the clock to `now_ms`; it never goes back.
    pub fn set(&self, now_ms: TimeMs) {
        self.0.fetch_max(now_ms, Ordering::SeqCst);
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> TimeMs {
        self.0.load(Ordering::SeqCst)
    }
}
