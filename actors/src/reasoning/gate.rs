//! Persistence gates and insight de-duplication: signal versus noise.

use serde::{Deserialize, Serialize};

use super::holt::Eta;
use crate::model::{HOUR_MS, TimeMs};

/// A change of a [`Debounce`]'s state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Edge {
    /// No change.
    Held,
    /// Turned on.
    Rose,
    /// Turned off.
    Fell,
}

/// Hysteresis by persistence: a condition must hold for `on_after` consecutive
/// observations to turn the gate on, and fail for `off_after` consecutive ones to turn it
/// off, so a noisy signal hovering at a threshold does not flap. The counts are passed to
/// each call rather than stored (a million twins, several gates each). 4 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Debounce {
    on: bool,
    /// Consecutive observations contradicting `on`.
    run: u16,
}

impl Debounce {
    /// A gate that is off.
    pub const fn new() -> Self {
        Debounce { on: false, run: 0 }
    }

    /// Feeds one observation of the condition. `on_after`/`off_after` of 0 act as 1.
    pub fn update(&mut self, condition: bool, on_after: u16, off_after: u16) -> Edge {
        if condition == self.on {
            self.run = 0;
            return Edge::Held;
        }
        self.run = self.run.saturating_add(1);
        let needed = if self.on { off_after } else { on_after };
        if self.run < needed.max(1) {
            return Edge::Held;
        }
        self.on = condition;
        self.run = 0;
        if condition { Edge::Rose } else { Edge::Fell }
    }

    /// Whether the gate is on.
    pub fn is_on(&self) -> bool {
        self.on
    }
}

/// A reported ETA counts as changed when it moves by more than this fraction of the time
/// that was left when it was last reported…
pub const ETA_CHANGE_FRACTION: f64 = 0.25;
/// …and by more than this, in ms, so ETAs close to now do not re-report on jitter.
pub const MIN_ETA_CHANGE_MS: u64 = HOUR_MS;
/// Confidence bands: low below the first bound, medium below the second, high above.
pub const CONFIDENCE_BANDS: [f64; 2] = [0.5, 0.8];
/// Confidence must pass a band bound by this much to change band, so a confidence
/// hovering at a bound is not re-reported.
pub const CONFIDENCE_HYSTERESIS: f64 = 0.05;

const NO_BAND: u8 = u8::MAX;

fn band_of(confidence: f64) -> u8 {
    CONFIDENCE_BANDS
        .iter()
        .filter(|&&b| confidence >= b)
        .count() as u8
}

/// De-duplicates an insight: reports it once when it turns on, and again only after it
/// turned off in between, or when it changed materially while on:
///
/// - its ETA moved by more than [`ETA_CHANGE_FRACTION`] (25%) of the time that was left
///   when last reported, and by more than [`MIN_ETA_CHANGE_MS`] (an hour), or
/// - its confidence moved to another band of [`CONFIDENCE_BANDS`] (low < 0.5 ≤ medium <
///   0.8 ≤ high), by more than [`CONFIDENCE_HYSTERESIS`] past the bound, or
/// - it had no ETA when reported and has one now.
///
/// 24 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InsightLatch {
    reported: bool,
    band: u8,
    reported_at_ms: TimeMs,
    eta_ms: TimeMs,
}

impl Default for InsightLatch {
    fn default() -> Self {
        InsightLatch::new()
    }
}

impl InsightLatch {
    /// A latch with nothing reported.
    pub const fn new() -> Self {
        InsightLatch {
            reported: false,
            band: NO_BAND,
            reported_at_ms: 0,
            eta_ms: 0,
        }
    }

    /// Feeds the insight's state at `now`: whether it holds (`on`) and its current ETA.
    /// Returns true when it should be reported now.
    pub fn observe(&mut self, now: TimeMs, on: bool, eta: Option<&Eta>) -> bool {
        if !on {
            self.reported = false;
            return false;
        }
        let was_reported = self.reported;
        let report = !was_reported || eta.is_some_and(|e| self.changed(e));
        if report {
            (self.eta_ms, self.band) = match eta {
                Some(e) if was_reported => (e.eta_ms, self.next_band(e.confidence)),
                Some(e) => (e.eta_ms, band_of(e.confidence)),
                None => (0, NO_BAND),
            };
            self.reported = true;
            self.reported_at_ms = now;
        }
        report
    }

    /// Whether the insight is currently reported (on, and reported since it turned on).
    pub fn is_reported(&self) -> bool {
        self.reported
    }

    fn changed(&self, eta: &Eta) -> bool {
        if self.band == NO_BAND {
            return true;
        }
        let left = self.eta_ms.saturating_sub(self.reported_at_ms) as f64;
        let moved = eta.eta_ms.abs_diff(self.eta_ms);
        let eta_moved = moved > MIN_ETA_CHANGE_MS && moved as f64 > ETA_CHANGE_FRACTION * left;
        eta_moved || self.next_band(eta.confidence) != self.band
    }

    /// The band of `confidence`, staying in the current band unless it is passed by more
    /// than the hysteresis.
    fn next_band(&self, confidence: f64) -> u8 {
        if self.band == NO_BAND {
            return band_of(confidence);
        }
        let up = band_of(confidence - CONFIDENCE_HYSTERESIS);
        let down = band_of(confidence + CONFIDENCE_HYSTERESIS);
        if up > self.band {
            up
        } else if down < self.band {
            down
        } else {
            self.band
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DAY_MS;

    #[test]
    fn alternating_signal_never_turns_on_and_never_flaps() {
        let mut g = Debounce::new();
        let transitions = (0..1_000)
            .filter(|i| g.update(i % 2 == 0, 3, 3) != Edge::Held)
            .count();
        assert_eq!(transitions, 0);
        assert!(!g.is_on());
    }

    #[test]
    fn mostly_true_noisy_signal_turns_on_once_and_stays_on() {
        // True except every 4th observation: on after 3, never off (off needs 3 falses).
        let mut g = Debounce::new();
        let edges: Vec<_> = (0..1_000)
            .map(|i| g.update(i % 4 != 3, 3, 3))
            .filter(|e| *e != Edge::Held)
            .collect();
        assert_eq!(edges, vec![Edge::Rose]);
    }

    #[test]
    fn sustained_condition_turns_on_after_exactly_on_after_and_off_after_off_after() {
        let mut g = Debounce::new();
        assert_eq!(g.update(true, 5, 2), Edge::Held);
        for _ in 0..3 {
            assert_eq!(g.update(true, 5, 2), Edge::Held);
        }
        assert_eq!(g.update(true, 5, 2), Edge::Rose, "5th consecutive");
        assert_eq!(g.update(false, 5, 2), Edge::Held);
        assert_eq!(
            g.update(true, 5, 2),
            Edge::Held,
            "a true resets the off count"
        );
        assert_eq!(g.update(false, 5, 2), Edge::Held);
        assert_eq!(g.update(false, 5, 2), Edge::Fell);
        let mut now = Debounce::new();
        assert_eq!(now.update(true, 0, 0), Edge::Rose, "0 acts as 1");
    }

    fn eta(at: TimeMs, confidence: f64) -> Eta {
        Eta {
            eta_ms: at,
            early_ms: at,
            late_ms: at,
            confidence,
        }
    }

    #[test]
    fn reported_once_not_every_reading_then_again_after_clearing() {
        let mut l = InsightLatch::new();
        let reports = (0..100)
            .filter(|&i| l.observe(i * 1_000, true, Some(&eta(10 * DAY_MS, 0.9))))
            .count();
        assert_eq!(reports, 1);
        assert!(!l.observe(200_000, false, None));
        assert!(
            l.observe(201_000, true, Some(&eta(10 * DAY_MS, 0.9))),
            "returned"
        );
        let mut plain = InsightLatch::new();
        assert!(plain.observe(0, true, None));
        assert!(!plain.observe(1, true, None));
    }

    #[test]
    fn material_eta_change_reports_again_small_change_does_not() {
        let mut l = InsightLatch::new();
        assert!(l.observe(0, true, Some(&eta(10 * DAY_MS, 0.9))));
        assert!(
            !l.observe(HOUR_MS, true, Some(&eta(12 * DAY_MS, 0.9))),
            "20%"
        );
        assert!(
            l.observe(2 * HOUR_MS, true, Some(&eta(13 * DAY_MS, 0.9))),
            "30%"
        );
        // Now measured from the new report: 13 days left; 7 days earlier is > 25%.
        assert!(l.observe(3 * HOUR_MS, true, Some(&eta(6 * DAY_MS, 0.9))));
        // Near the end, jitter under an hour never re-reports.
        let mut near = InsightLatch::new();
        assert!(near.observe(0, true, Some(&eta(2 * HOUR_MS, 0.9))));
        assert!(!near.observe(1, true, Some(&eta(HOUR_MS + HOUR_MS / 2, 0.9))));
    }

    #[test]
    fn confidence_band_changes_report_again_with_hysteresis() {
        let mut l = InsightLatch::new();
        let at = 10 * DAY_MS;
        assert!(l.observe(0, true, Some(&eta(at, 0.6))));
        assert!(
            !l.observe(1, true, Some(&eta(at, 0.82))),
            "inside hysteresis"
        );
        assert!(!l.observe(2, true, Some(&eta(at, 0.78))));
        assert!(l.observe(3, true, Some(&eta(at, 0.86))), "medium → high");
        assert!(
            !l.observe(4, true, Some(&eta(at, 0.77))),
            "inside hysteresis"
        );
        assert!(l.observe(5, true, Some(&eta(at, 0.4))), "high → low");
    }
}
