//! Robust z-scores: a Huber-clipped exponentially weighted centre and scale.

use serde::{Deserialize, Serialize};

use super::ewma::{sum_sq_weights, weight};

/// Residuals beyond `HUBER_K` robust standard deviations are clipped to it before they
/// update a centre or a scale (Huber's ψ, Huber 1964; `k = 2` as in the robust
/// Holt–Winters of Gelper, Fried & Croux 2010). A reading's influence is thus bounded: an
/// outlier moves the scale by at most a factor `1 + w·(k/E[min(|Z|, k)] − 1)` ≈ `1 + 1.56·w`.
pub const HUBER_K: f64 = 2.0;

/// `E[min(|Z|, 2)]` for a standard normal `Z`:
/// `2(φ(0) − φ(2)) + 2·2·(1 − Φ(2))` = 0.780 903 155 6…, the mean absolute deviation
/// that a clipped residual has when the scale is right. Dividing by it makes the scale a
/// consistent estimator of the Gaussian σ (for the unclipped mean absolute deviation the
/// constant would be √(2/π) = 0.7979, i.e. σ = 1.2533·MeanAD; the familiar 1.4826 belongs
/// to the *median* absolute deviation, which this is not).
pub const HUBER_MEAN_ABS: f64 = 0.780_903_155_569_206;

/// Clipping starts with the `CLIP_AFTER`-th residual. Before, the scale rests on too few
/// residuals to clip against: one that happened to be near zero would freeze it, since a
/// clipped update can grow the scale by at most a factor `1 + 1.56·w`. Outliers among the
/// first readings are therefore learnt as they are (and nothing fires during warm-up).
pub const CLIP_AFTER: u32 = 10;

/// The clip for the `j`-th residual: `k·max(s, min_scale)·infl`, or infinite before
/// [`CLIP_AFTER`] residuals.
pub(crate) fn clip_at(j: u32, scale: f64, min_scale: f64, infl: f64) -> f64 {
    let s = scale.max(min_scale);
    if j >= CLIP_AFTER && s > 0.0 {
        HUBER_K * s * infl
    } else {
        f64::INFINITY
    }
}

/// One step of the Huber-clipped scale: an exponentially weighted mean (weight `w`) of
/// `min(|r|, clip)/E[min(|Z|, k)]`, where `r` is a residual already divided by its own
/// standard deviation factor. Before [`CLIP_AFTER`] residuals the divisor is `√(2/π)`,
/// the unclipped Gaussian mean absolute deviation.
pub(crate) fn huber_scale_step(scale: f64, w: f64, abs_resid: f64, clip: f64) -> f64 {
    let c = if clip.is_finite() {
        HUBER_MEAN_ABS
    } else {
        MEAN_ABS
    };
    scale + w * (abs_resid.min(clip) / c - scale)
}

/// `E|Z| = √(2/π)` for a standard normal `Z`.
const MEAN_ABS: f64 = 0.797_884_560_802_865_4;

/// Tuning of a [`RobustZ`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AnomalyParams {
    /// Smoothing constant of centre and scale, per reading, in `(0, 1)`.
    pub alpha: f64,
    /// `|z|` at or above which a reading is anomalous.
    pub z_threshold: f64,
    /// Readings to see before any can be anomalous.
    pub warmup: u32,
    /// Floor of the scale, in the signal's unit: a constant or coarsely quantised signal
    /// would otherwise have a zero scale and call every change infinitely anomalous.
    pub min_scale: f64,
}

/// Robust z-score anomaly detector for a signal that is stationary around a slowly
/// moving centre.
///
/// `z = (x − centre) / (σ̂ · √(1 + v))`, where `centre` is a Huber-clipped exponentially
/// weighted mean, `σ̂` a Huber-clipped mean absolute deviation made consistent for the
/// Gaussian σ (see [`HUBER_MEAN_ABS`]), and `v = Σw²` the variance of the centre itself in
/// units of σ² (so early readings, compared with a centre estimated from few samples, are
/// not over-scored). Fires when `|z| ≥ z_threshold` after `warmup` readings.
///
/// Outliers cannot hide the next one: from the [`CLIP_AFTER`]-th reading on, every update
/// uses the residual clipped at [`HUBER_K`]·σ̂, so a run of `r` outliers inflates σ̂ by at most `(1 + 1.56·alpha)^r`
/// (≈ 1.36 for 10 outliers at `alpha = 0.02`) and moves the centre by at most
/// `r·alpha·2σ̂`. A lasting change of level or spread is still learnt, at that bounded rate.
///
/// [`super::Holt`] applies the same scale to its one-step forecast errors; the
/// [`super::SignalReasoner`] uses that, so a trending signal is not called anomalous for
/// trending. This type is the detector for signals without a trend.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RobustZ {
    center: f64,
    scale: f64,
    n: u32,
}

impl RobustZ {
    /// A detector that has seen nothing.
    pub const fn new() -> Self {
        RobustZ {
            center: 0.0,
            scale: 0.0,
            n: 0,
        }
    }

    /// The z-score `x` would get, without learning from it; `None` before the first reading
    /// or while the floored scale is zero.
    pub fn z(&self, p: &AnomalyParams, x: f64) -> Option<f64> {
        if self.n == 0 || !x.is_finite() {
            return None;
        }
        let sd = self.scale.max(p.min_scale) * self.inflation(p.alpha);
        (sd > 0.0).then(|| (x - self.center) / sd)
    }

    /// Scores `x`, then learns from it. Returns `Some(z)` when `x` is anomalous
    /// (`|z| ≥ z_threshold` after warm-up). A non-finite `x` is ignored.
    pub fn observe(&mut self, p: &AnomalyParams, x: f64) -> Option<f64> {
        if !x.is_finite() {
            return None;
        }
        if self.n == 0 {
            self.center = x;
            self.n = 1;
            return None;
        }
        let z = self.z(p, x);
        let infl = self.inflation(p.alpha);
        let e = x - self.center;
        // The n-th residual (n readings seen before this one).
        let clip = clip_at(self.n, self.scale, p.min_scale, infl);
        self.center += weight(p.alpha, self.n.saturating_add(1)) * e.clamp(-clip, clip);
        let clip_std = clip / infl;
        self.scale = huber_scale_step(
            self.scale,
            weight(p.alpha, self.n),
            e.abs() / infl,
            clip_std,
        );
        self.n = self.n.saturating_add(1);
        z.filter(|z| self.n > p.warmup && z.abs() >= p.z_threshold)
    }

    /// The robust centre.
    pub fn center(&self) -> f64 {
        self.center
    }

    /// The robust scale σ̂ (an estimate of the Gaussian σ), before flooring.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Readings seen (saturating).
    pub fn count(&self) -> u32 {
        self.n
    }

    /// `√(1 + Σw²)`: the standard deviation of `x − centre` in units of σ.
    fn inflation(&self, alpha: f64) -> f64 {
        (1.0 + sum_sq_weights(alpha, self.n)).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    const P: AnomalyParams = AnomalyParams {
        alpha: 0.02,
        z_threshold: 4.0,
        warmup: 30,
        min_scale: 1e-6,
    };

    #[test]
    fn huber_constant_is_the_clipped_mean_absolute_deviation() {
        // Simpson's rule on E[min(|Z|, 2)] = ∫ min(|z|, 2) φ(z) dz over [-12, 12].
        let phi = |z: f64| (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let f = |z: f64| z.abs().min(HUBER_K) * phi(z);
        let (a, b, n) = (-12.0, 12.0, 24_000);
        let h = (b - a) / n as f64;
        let mut s = f(a) + f(b);
        for i in 1..n {
            s += f(a + i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        let integral = s * h / 3.0;
        assert!((integral - HUBER_MEAN_ABS).abs() < 1e-9, "{integral}");
    }

    #[test]
    fn scale_is_consistent_for_gaussian_sigma_within_5_percent() {
        let mut rng = Rng::new(3);
        let mut d = RobustZ::new();
        let mut sum = 0.0;
        for i in 0..20_000 {
            d.observe(&P, 50.0 + 2.0 * rng.gauss());
            if i >= 10_000 {
                sum += d.scale();
            }
        }
        let mean_scale = sum / 10_000.0;
        assert!((mean_scale / 2.0 - 1.0).abs() < 0.05, "{mean_scale}");
        assert!((d.center() - 50.0).abs() < 0.5);
    }

    #[test]
    fn an_8_sigma_spike_fires_on_that_reading() {
        let mut rng = Rng::new(11);
        let mut d = RobustZ::new();
        for _ in 0..300 {
            assert!(d.observe(&P, rng.gauss()).is_none_or(|z| z.abs() < 8.0));
        }
        let z = d.observe(&P, 8.0).expect("spike fires");
        assert!(z > 6.0, "{z}");
    }

    #[test]
    fn gaussian_noise_alone_fires_in_under_half_a_percent_of_10000_readings() {
        for seed in 1..=5 {
            let mut rng = Rng::new(seed);
            let mut d = RobustZ::new();
            let fired = (0..10_000)
                .filter(|_| d.observe(&P, rng.gauss()).is_some())
                .count();
            assert!(fired < 50, "seed {seed}: {fired} false alarms");
        }
    }

    #[test]
    fn a_run_of_ten_outliers_does_not_hide_the_next_spike() {
        let mut rng = Rng::new(5);
        let mut d = RobustZ::new();
        for _ in 0..500 {
            d.observe(&P, rng.gauss());
        }
        let before = d.scale();
        for _ in 0..10 {
            assert!(d.observe(&P, 50.0).is_some(), "each outlier fires");
        }
        // Bounded inflation: (1 + 1.562·0.02)^10 ≈ 1.36.
        assert!(d.scale() < before * 1.37, "{} -> {}", before, d.scale());
        for _ in 0..5 {
            d.observe(&P, rng.gauss());
        }
        let z = d.observe(&P, 8.0).expect("next 8σ spike still fires");
        assert!(z >= P.z_threshold, "{z}");
    }

    #[test]
    fn nothing_fires_during_warm_up() {
        let mut d = RobustZ::new();
        for i in 0..P.warmup {
            let x = if i % 2 == 0 { 0.0 } else { 1.0 };
            assert!(d.observe(&P, x).is_none());
        }
        assert!(d.observe(&P, 1e6).is_some(), "armed after warm-up");
    }

    #[test]
    fn a_constant_signal_uses_the_scale_floor() {
        let p = AnomalyParams {
            min_scale: 0.1,
            ..P
        };
        let mut d = RobustZ::new();
        for _ in 0..100 {
            d.observe(&p, 5.0);
        }
        // A constant signal has scale 0; the floor keeps z finite and small steps quiet.
        assert!(d.z(&p, 5.05).is_some_and(|z| z.abs() < 1.0));
        assert!(d.observe(&p, 5.05).is_none());
        assert!(d.observe(&p, 9.0).is_some());
    }
}
