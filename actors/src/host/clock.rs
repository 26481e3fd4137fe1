//! The clock port. The deciding code never reads a clock; hosts ask one of these.
//!
//! Three clocks: [`SystemClock`] (the machine's, for the binaries), [`ManualClock`]
//! (virtual time for tests, replay and simulation) and [`ScaledClock`] (fast time the demo
//! shares between the cluster and its edges). Only hosts hold one.

use crate::model::TimeMs;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where the host gets `now`.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> TimeMs;
}

/// The machine's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> TimeMs {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
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

/// Time that runs `speed` times faster than the machine's clock, from the moment it is
/// made: `now = start + elapsed × speed`. The demo gives one to the node and every edge,
/// so days of wear fit in a minute while every part still agrees on the time. It reads
/// the machine's monotonic clock, so only hosts use it; the deciding code still only sees
/// `now`.
#[derive(Debug)]
pub struct ScaledClock {
    start_ms: TimeMs,
    origin: std::time::Instant,
    speed: f64,
}

impl ScaledClock {
    /// A clock showing `start_ms` now and running `speed` times faster than real time
    /// (`speed` finite and at least 1; anything else runs at 1).
    pub fn new(start_ms: TimeMs, speed: f64) -> Self {
        let speed = if speed.is_finite() && speed >= 1.0 {
            speed
        } else {
            1.0
        };
        Self {
            start_ms,
            origin: std::time::Instant::now(),
            speed,
        }
    }

    /// How much faster than real time it runs.
    pub fn speed(&self) -> f64 {
        self.speed
    }

    /// Scaled time after `real` has passed on the machine.
    pub fn at(&self, real: std::time::Duration) -> TimeMs {
        self.start_ms + (real.as_secs_f64() * 1000.0 * self.speed) as u64
    }
}

impl Clock for ScaledClock {
    fn now_ms(&self) -> TimeMs {
        self.at(self.origin.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn scaled_time_runs_faster_and_never_goes_back() {
        let c = ScaledClock::new(1_000, 3600.0);
        assert_eq!(c.at(Duration::ZERO), 1_000);
        assert_eq!(c.at(Duration::from_secs(1)), 1_000 + 3_600_000);
        let (a, b) = (c.now_ms(), c.now_ms());
        assert!(a >= 1_000 && b >= a);
        assert_eq!(ScaledClock::new(0, f64::NAN).speed(), 1.0);
        assert_eq!(ScaledClock::new(0, 0.5).speed(), 1.0);
    }
}
