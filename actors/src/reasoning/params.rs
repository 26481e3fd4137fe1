//! The composite's tuning: plain data the catalogue maps its signals into.

use serde::{Deserialize, Serialize};

use super::{AnomalyParams, DepletionParams, TrendParams};
use crate::error::{Error, Result};
use crate::model::{DAY_MS, Direction};

/// Tuning of one signal's [`super::SignalReasoner`]; plain data, `Copy`.
///
/// Rates and times are per reading or in ms. Units of values are the signal's own.
/// Missing fields take their defaults when deserialised.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReasonerParams {
    /// Lower end of the normal range.
    pub normal_min: f64,
    /// Upper end of the normal range; must be above `normal_min`.
    pub normal_max: f64,
    /// Failure threshold, if the signal has one: past it (in `direction`) the device
    /// fails; the trend forecasts when it will be reached.
    pub threshold: Option<f64>,
    /// Which way the signal goes bad. Inferred by [`ReasonerParams::validated`] when
    /// `threshold` is set and lies outside the normal range.
    pub direction: Option<Direction>,
    /// Smoothing constant per reading, in `(0, 1)`, for every estimate (level, trend,
    /// scale, usage rate). Memory ≈ `2/alpha` readings: pick `alpha ≈ 2 × reading
    /// interval / the time scale the trend should see` (0.02: the last ≈ 100 readings).
    pub alpha: f64,
    /// `|z|` at or above which a reading is anomalous (robust z of the one-step forecast
    /// error).
    pub z_threshold: f64,
    /// CUSUM slack in σ: half the level shift worth reporting as drift.
    pub drift_delta: f64,
    /// CUSUM decision interval in σ; larger is fewer false drifts and slower detection.
    pub drift_lambda: f64,
    /// Consecutive readings a condition must hold to turn failure-now or a forecast on
    /// (and fail to turn it off); anomalies turn on at once and off after this many
    /// normal readings.
    pub persistence: u16,
    /// Readings to see before anomalies, drift and forecasts (usage increments before
    /// depletion times).
    pub warmup: u16,
    /// Forecasts and depletion times further ahead than this are not reported, in ms.
    pub horizon_ms: u64,
    /// A forecast is raised as an insight only at or above this confidence.
    pub min_confidence: f64,
    /// The signal is a cumulative usage counter of a consumable (litres through the
    /// filter), which drops when the consumable is replaced.
    pub cumulative: bool,
    /// What a fresh consumable holds, in the counter's unit (cumulative signals).
    pub capacity: Option<f64>,
    /// Remaining fraction at which to reorder, in `(0, 1)`; reaching it raises
    /// consumable-low. Without it, consumable-low is raised when the consumable runs out
    /// within `horizon_ms`.
    pub reorder_fraction: Option<f64>,
}

impl Default for ReasonerParams {
    fn default() -> Self {
        ReasonerParams {
            normal_min: 0.0,
            normal_max: 1.0,
            threshold: None,
            direction: None,
            alpha: 0.02,
            z_threshold: 4.0,
            drift_delta: 0.5,
            drift_lambda: 10.0,
            persistence: 3,
            warmup: 30,
            horizon_ms: 30 * DAY_MS,
            min_confidence: 0.5,
            cumulative: false,
            capacity: None,
            reorder_fraction: None,
        }
    }
}

fn invalid(name: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidArgument {
        name,
        reason: reason.into(),
    }
}

impl ReasonerParams {
    /// Checks every field and fills in `direction` from `threshold` when it is missing
    /// (above the normal range: rising; below: falling).
    pub fn validated(mut self) -> Result<Self> {
        if !self.normal_min.is_finite() || !self.normal_max.is_finite() {
            return Err(invalid("normal_min", "normal range must be finite"));
        }
        if self.normal_max <= self.normal_min {
            return Err(invalid(
                "normal_max",
                format!(
                    "{} is not above normal_min {}",
                    self.normal_max, self.normal_min
                ),
            ));
        }
        match (self.threshold, self.direction) {
            (Some(t), _) if !t.is_finite() => return Err(invalid("threshold", "must be finite")),
            (Some(t), None) if t > self.normal_max => self.direction = Some(Direction::Rising),
            (Some(t), None) if t < self.normal_min => self.direction = Some(Direction::Falling),
            (Some(t), None) => {
                return Err(invalid(
                    "direction",
                    format!("threshold {t} inside the normal range needs a direction"),
                ));
            }
            (Some(t), Some(d))
                if (t - 0.5 * (self.normal_min + self.normal_max)) * d.sign() <= 0.0 =>
            {
                return Err(invalid(
                    "threshold",
                    format!("{t} is not beyond the normal range's centre going {d:?}"),
                ));
            }
            (None, Some(_)) => return Err(invalid("direction", "set without a threshold")),
            _ => {}
        }
        let open01 = |v: f64| v > 0.0 && v < 1.0;
        if !open01(self.alpha) {
            return Err(invalid("alpha", format!("{} is not in (0, 1)", self.alpha)));
        }
        if !(self.z_threshold.is_finite() && self.z_threshold > 0.0) {
            return Err(invalid(
                "z_threshold",
                format!("{} is not positive", self.z_threshold),
            ));
        }
        if !(self.drift_delta.is_finite() && self.drift_delta >= 0.0) {
            return Err(invalid(
                "drift_delta",
                format!("{} is negative", self.drift_delta),
            ));
        }
        if !(self.drift_lambda.is_finite() && self.drift_lambda > 0.0) {
            return Err(invalid(
                "drift_lambda",
                format!("{} is not positive", self.drift_lambda),
            ));
        }
        if self.persistence == 0 {
            return Err(invalid("persistence", "must be at least 1"));
        }
        if self.warmup < 3 {
            return Err(invalid("warmup", format!("{} is below 3", self.warmup)));
        }
        if self.horizon_ms == 0 {
            return Err(invalid("horizon_ms", "must be positive"));
        }
        if !(0.0..=1.0).contains(&self.min_confidence) {
            return Err(invalid(
                "min_confidence",
                format!("{} is not in 0..=1", self.min_confidence),
            ));
        }
        if let Some(c) = self.capacity
            && !(c.is_finite() && c > 0.0)
        {
            return Err(invalid("capacity", format!("{c} is not positive")));
        }
        if let Some(f) = self.reorder_fraction {
            if !open01(f) {
                return Err(invalid("reorder_fraction", format!("{f} is not in (0, 1)")));
            }
            if self.capacity.is_none() {
                return Err(invalid("reorder_fraction", "set without a capacity"));
            }
        }
        Ok(self)
    }

    /// The failure threshold and direction, when both are set.
    pub fn failure(&self) -> Option<(f64, Direction)> {
        self.threshold.zip(self.direction)
    }

    /// Floor of the noise scale: 1% of the normal range's width. Changes smaller than that
    /// are never anomalous, however quiet the signal has been.
    pub fn min_scale(&self) -> f64 {
        0.01 * (self.normal_max - self.normal_min)
    }

    /// Readings after a drift alarm during which another in the same direction is the same
    /// shift still being absorbed, and is not raised again: `⌈2/alpha⌉`.
    pub fn drift_refractory(&self) -> u16 {
        (2.0 / self.alpha).ceil().min(f64::from(u16::MAX)) as u16
    }

    /// The parameters of the composite's [`super::Holt`].
    pub fn trend_params(&self) -> TrendParams {
        TrendParams {
            alpha: self.alpha,
            min_scale: self.min_scale(),
            warmup: u32::from(self.warmup),
            horizon_ms: self.horizon_ms,
        }
    }

    /// The same tuning for a standalone [`super::RobustZ`].
    pub fn anomaly_params(&self) -> AnomalyParams {
        AnomalyParams {
            alpha: self.alpha,
            z_threshold: self.z_threshold,
            warmup: u32::from(self.warmup),
            min_scale: self.min_scale(),
        }
    }

    /// The parameters of the composite's [`super::Depletion`], when a capacity is set.
    pub fn depletion_params(&self) -> Option<DepletionParams> {
        self.capacity.map(|capacity| DepletionParams {
            alpha: self.alpha,
            warmup: u32::from(self.warmup),
            capacity,
            reorder_fraction: self.reorder_fraction,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_direction_is_inferred() {
        assert!(ReasonerParams::default().validated().is_ok());
        let p = ReasonerParams {
            normal_min: 8.0,
            normal_max: 10.0,
            threshold: Some(6.0),
            ..Default::default()
        };
        assert_eq!(p.validated().unwrap().direction, Some(Direction::Falling));
    }

    #[test]
    fn bad_fields_are_named() {
        let name = |p: ReasonerParams| match p.validated() {
            Err(Error::InvalidArgument { name, .. }) => name,
            other => panic!("{other:?}"),
        };
        let d = ReasonerParams::default();
        assert_eq!(name(ReasonerParams { alpha: 0.0, ..d }), "alpha");
        assert_eq!(
            name(ReasonerParams {
                normal_max: 0.0,
                ..d
            }),
            "normal_max"
        );
        assert_eq!(
            name(ReasonerParams {
                threshold: Some(0.5),
                ..d
            }),
            "direction"
        );
        assert_eq!(
            name(ReasonerParams {
                threshold: Some(0.2),
                direction: Some(Direction::Rising),
                ..d
            }),
            "threshold"
        );
        assert_eq!(
            name(ReasonerParams {
                reorder_fraction: Some(0.2),
                ..d
            }),
            "reorder_fraction"
        );
        assert_eq!(
            name(ReasonerParams {
                persistence: 0,
                ..d
            }),
            "persistence"
        );
        assert_eq!(
            name(ReasonerParams {
                capacity: Some(f64::NAN),
                ..d
            }),
            "capacity"
        );
    }

    #[test]
    fn missing_fields_deserialise_to_defaults() {
        let p: ReasonerParams =
            toml::from_str("normal_min = 8.0\nnormal_max = 10.0\nthreshold = 6.0\n").unwrap();
        assert_eq!(p.alpha, ReasonerParams::default().alpha);
        assert_eq!(p.threshold, Some(6.0));
    }
}
