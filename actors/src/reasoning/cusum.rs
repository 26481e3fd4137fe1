//! Drift: Page's two-sided CUSUM on a standardised residual.

use serde::{Deserialize, Serialize};

use crate::model::Direction;

/// Standardised residuals are winsorised to `±CUSUM_CLIP` before they enter the sums, so
/// one wild reading adds at most `CUSUM_CLIP − delta` and cannot raise a drift alarm on its
/// own (the robust CUSUM of Lucas & Crosier 1982). Anomalies are the anomaly detector's job.
pub const CUSUM_CLIP: f64 = 3.0;

/// A detected shift of level.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Shift {
    /// Which way the level moved.
    pub direction: Direction,
    /// Estimated size of the shift in standard deviations, `delta + S/N` (Montgomery,
    /// *Introduction to Statistical Quality Control*, §9.1.2: the new mean is
    /// `μ₀ + K + C⁺/N⁺`, `N⁺` the readings since the sum last left zero). Because inputs are
    /// winsorised it is at most [`CUSUM_CLIP`]: read it as "at least this much" for large
    /// shifts.
    pub sigmas: f64,
}

/// Page's (1954) two-sided tabular CUSUM for a change of mean in a standardised stream.
///
/// For each standardised residual `z` (in-control mean 0, standard deviation 1):
///
/// ```text
/// S⁺ ← max(0, S⁺ + z − δ)        S⁻ ← max(0, S⁻ − z − δ)
/// ```
///
/// and an alarm when `S⁺ > λ` (level rose) or `S⁻ > λ` (level fell); both sums then reset
/// to zero. `δ` (`delta`) is the slack: half the shift worth detecting, in σ; `λ`
/// (`lambda`) the decision interval. With `δ = 0.5`, Siegmund's approximation gives an
/// in-control average run length of ≈ 70 000 readings per alarm for `λ = 10` (two-sided),
/// and ≈ 7 readings to detect a 2σ shift.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Cusum {
    up: f64,
    down: f64,
    n_up: u32,
    n_down: u32,
}

impl Cusum {
    /// Both sums at zero.
    pub const fn new() -> Self {
        Cusum {
            up: 0.0,
            down: 0.0,
            n_up: 0,
            n_down: 0,
        }
    }

    /// Adds the standardised residual `z`; returns the shift when an alarm fires, after
    /// which both sums are back at zero. A non-finite `z` is ignored.
    pub fn observe(&mut self, delta: f64, lambda: f64, z: f64) -> Option<Shift> {
        if !z.is_finite() {
            return None;
        }
        let z = z.clamp(-CUSUM_CLIP, CUSUM_CLIP);
        (self.up, self.n_up) = step(self.up, self.n_up, z - delta);
        (self.down, self.n_down) = step(self.down, self.n_down, -z - delta);
        let shift = if self.up > lambda && self.up >= self.down {
            Some(Shift {
                direction: Direction::Rising,
                sigmas: delta + self.up / f64::from(self.n_up.max(1)),
            })
        } else if self.down > lambda {
            Some(Shift {
                direction: Direction::Falling,
                sigmas: delta + self.down / f64::from(self.n_down.max(1)),
            })
        } else {
            None
        };
        if shift.is_some() {
            *self = Cusum::new();
        }
        shift
    }

    /// The upper and lower sums, `(S⁺, S⁻)`.
    pub fn sums(&self) -> (f64, f64) {
        (self.up, self.down)
    }

    pub(crate) fn is_finite(&self) -> bool {
        self.up.is_finite() && self.down.is_finite()
    }
}

fn step(sum: f64, run: u32, incr: f64) -> (f64, u32) {
    let s = (sum + incr).max(0.0);
    if s > 0.0 {
        (s, run.saturating_add(1))
    } else {
        (0.0, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    const DELTA: f64 = 0.5;
    const LAMBDA: f64 = 10.0;

    #[test]
    fn a_2_sigma_step_is_caught_within_20_readings_and_never_before_it() {
        let mut worst = 0;
        for seed in 1..=50 {
            let mut rng = Rng::new(seed);
            let mut c = Cusum::new();
            for _ in 0..1_000 {
                assert!(
                    c.observe(DELTA, LAMBDA, rng.gauss()).is_none(),
                    "seed {seed}"
                );
            }
            let delay = (1..=100)
                .find(|_| c.observe(DELTA, LAMBDA, 2.0 + rng.gauss()).is_some())
                .expect("detected");
            worst = worst.max(delay);
        }
        assert!(worst <= 20, "worst delay {worst}");
    }

    #[test]
    fn reports_direction_and_a_magnitude_near_the_shift() {
        let mut rng = Rng::new(9);
        let mut c = Cusum::new();
        let shift = (0..100)
            .find_map(|_| c.observe(DELTA, LAMBDA, -2.0 + rng.gauss()))
            .expect("detected");
        assert_eq!(shift.direction, Direction::Falling);
        assert!((shift.sigmas - 2.0).abs() < 0.8, "{}", shift.sigmas);
        assert_eq!(c.sums(), (0.0, 0.0), "reset after the alarm");
    }

    #[test]
    fn in_control_false_alarms_are_rare() {
        // ARL₀ ≈ 70 000: 200 000 in-control readings give a handful of alarms, not dozens.
        let mut rng = Rng::new(4);
        let mut c = Cusum::new();
        let alarms = (0..200_000)
            .filter(|_| c.observe(DELTA, LAMBDA, rng.gauss()).is_some())
            .count();
        assert!(alarms <= 10, "{alarms}");
    }

    #[test]
    fn a_single_wild_reading_cannot_alarm() {
        let mut c = Cusum::new();
        assert!(c.observe(DELTA, LAMBDA, 1e9).is_none());
        assert_eq!(c.sums(), (CUSUM_CLIP - DELTA, 0.0));
        assert!(c.observe(DELTA, LAMBDA, f64::NAN).is_none());
        assert_eq!(c.sums(), (CUSUM_CLIP - DELTA, 0.0));
    }
}
