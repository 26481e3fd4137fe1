//! Trend: robust Holt linear smoothing on irregular timestamps, with forecast bands.

use serde::{Deserialize, Serialize};

use super::ewma::{sum_sq_weights, weight};
use super::robust::{HUBER_K, HUBER_MEAN_ABS, clip_at, huber_scale_step};
use crate::model::{Direction, TimeMs};

/// The two-sided 95% standard normal quantile, `Φ⁻¹(0.975)`.
pub const Z95: f64 = 1.959_963_984_540_054;

/// Standard deviation of a standard normal clipped at ±[`HUBER_K`]:
/// `√((2Φ(2) − 1) − 2·2·φ(2) + 4·2(1 − Φ(2)))` = √0.920 537… .
const CLIPPED_Z_SD: f64 = 0.959_446_155_673_325_4;

/// Tuning of a [`Holt`] smoother.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrendParams {
    /// Brown's smoothing constant per reading, in `(0, 1)`: memory ≈ `2/alpha` readings.
    pub alpha: f64,
    /// Floor of the noise scale, in the signal's unit (see
    /// [`super::AnomalyParams::min_scale`]).
    pub min_scale: f64,
    /// Readings to see before forecasting.
    pub warmup: u32,
    /// Forecasts further than this from `now` are not made, in ms.
    pub horizon_ms: u64,
}

/// An expected time of an event with its 95% band and a confidence.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Eta {
    /// Expected time of the event (Unix ms).
    pub eta_ms: TimeMs,
    /// Earliest plausible time: lower end of the 95% band (Unix ms).
    pub early_ms: TimeMs,
    /// Latest plausible time: upper end of the 95% band (Unix ms).
    pub late_ms: TimeMs,
    /// How sure, in `0..=1`: high when the band is narrow relative to the time to go and
    /// the model has been forecasting without bias.
    pub confidence: f64,
}

impl Eta {
    /// Builds an ETA from offsets in ms after `from`, confidence
    /// `consistency / (1 + (late − early)/point)`.
    pub(crate) fn from_offsets(
        from: TimeMs,
        point: f64,
        early: f64,
        late: f64,
        consistency: f64,
    ) -> Eta {
        let at = |off: f64| from.saturating_add(off.max(0.0).round() as u64);
        let width = (late - early).max(0.0) / point.max(1.0);
        Eta {
            eta_ms: at(point),
            early_ms: at(early),
            late_ms: at(late),
            confidence: (consistency / (1.0 + width)).clamp(0.0, 1.0),
        }
    }
}

/// Covariance of the (level, trend-per-interval) estimation errors in units of the noise
/// variance σ²: `(Var L, Cov(L, T), Var T)`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Cov {
    ll: f64,
    lt: f64,
    tt: f64,
}

impl Cov {
    /// Variance of the path `L + T·q`, `q` intervals ahead, in σ².
    fn path(&self, q: f64) -> f64 {
        self.ll + 2.0 * q * self.lt + q * q * self.tt
    }
}

/// Holt's level and trend gains `(a, b)` equivalent to Brown's double exponential smoothing
/// with constant `alpha`: `a = α(2 − α)`, `b = α/(2 − α)` (Gardner 1985, "Exponential
/// smoothing: the state of the art", J. Forecasting 4(1)). Their product, the trend's gain
/// on the forecast error, is `α²`.
fn brown_gains(alpha: f64) -> (f64, f64) {
    (alpha * (2.0 - alpha), alpha / (2.0 - alpha))
}

/// Gains of ordinary least squares on the `n` readings so far, as Holt updates (level gain
/// `2(2n − 1)/(n(n + 1))`, trend gain `6/(n(n + 1))`): with them Holt's recursion reproduces
/// the least-squares line exactly for evenly spaced readings, so the smoother starts from a
/// fitted line rather than from its first two readings.
fn ols_gains(n: u32) -> (f64, f64) {
    let n = f64::from(n.max(2));
    (
        2.0 * (2.0 * n - 1.0) / (n * (n + 1.0)),
        6.0 / (n * (n + 1.0)),
    )
}

/// Covariance of the OLS line's end level and slope after `n ≥ 2` evenly spaced readings:
/// `Var L = 2(2n − 1)/(n(n + 1))`, `Cov = 6/(n(n + 1))`, `Var T = 12/(n(n² − 1))`.
fn ols_cov(n: u32) -> Cov {
    if n < 2 {
        return Cov {
            ll: f64::INFINITY,
            lt: f64::INFINITY,
            tt: f64::INFINITY,
        };
    }
    let (ll, lt) = ols_gains(n);
    let n = f64::from(n);
    Cov {
        ll,
        lt,
        tt: 12.0 / (n * (n * n - 1.0)),
    }
}

/// Stationary covariance of Holt's estimation errors with level gain `a` and trend gain
/// `c = a·b`, for a true line plus white noise, evenly spaced.
///
/// With `u` the level error and `v` the trend error, one step is
/// `u' = (1 − a)(u + v) + a·ε`, `v' = −c·u + (1 − c)·v + c·ε`, i.e. `y' = A·y + g·ε`; the
/// stationary covariance solves the Lyapunov equation `P = A·P·Aᵀ + g·gᵀ`, three linear
/// equations in `(Var u, Cov, Var v)` solved here by Cramer's rule.
fn steady_cov(a: f64, c: f64) -> Cov {
    let p = 1.0 - a;
    let m = [
        [1.0 - p * p, -2.0 * p * p, -p * p],
        [p * c, 1.0 - p + 2.0 * p * c, -p * (1.0 - c)],
        [-c * c, 2.0 * c * (1.0 - c), 1.0 - (1.0 - c) * (1.0 - c)],
    ];
    let rhs = [a * a, a * c, c * c];
    let det = det3(m);
    let with = |col: usize| {
        let mut mc = m;
        for (row, r) in mc.iter_mut().zip(rhs) {
            row[col] = r;
        }
        det3(mc) / det
    };
    Cov {
        ll: with(0),
        lt: with(1),
        tt: with(2),
    }
}

fn det3(m: [[f64; 3]; 3]) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

/// Robust Holt linear (double exponential) smoothing on irregular timestamps.
///
/// One-parameter form: Brown's double exponential smoothing with constant `alpha`,
/// expressed as Holt's (1957) level/trend recursion with level gain `a = α(2 − α)` and
/// trend gain `b = α/(2 − α)` (Gardner 1985), in error-correction form, with the trend
/// kept *per millisecond*:
///
/// ```text
/// pred = L + T·Δt            e = x − pred            e* = clip(e, ±2σ̂·√(1 + v))
/// L ← pred + a_q·e*          T ← T + c_q·e*/Δt
/// ```
///
/// - **Irregular time** (after Wright 1986, "Forecasting data published at irregular time
///   intervals using an extension of Holt's method", and Eckner's time-consistent EMA):
///   the gains scale with the gap, `a_q = 1 − (1 − a)^q`, `b_q = 1 − (1 − b)^q`,
///   `c_q = a_q·b_q`, with `q = Δt/Δ̄` and `Δ̄` the geometric mean interval (an EWMA of
///   `ln Δt`, so one long outage barely moves it). A burst of readings close together
///   moves the trend little; a reading after a long gap counts for more.
/// - **Warm start**: while they are larger, the gains of ordinary least squares on the `n`
///   readings so far are used (`2(2n − 1)/(n(n + 1))` for the level, `6/(n(n + 1))` for
///   the trend), so the first `≈ 2.5/alpha` readings give the least-squares line. The same
///   happens after [`Holt::restart_level`].
/// - **Robust** (Gelper, Fried & Croux 2010, "Robust forecasting with exponential and
///   Holt–Winters smoothing"): the forecast error is Huber-clipped before it updates the
///   level and trend, so a spike neither drags the level nor tilts the trend. `σ̂` is the
///   Huber-clipped scale of [`super::RobustZ`] applied to the *studentised* forecast errors
///   `e/√(1 + v)`, `v` being the variance of the prediction `L + T·Δt` in units of σ², so
///   `σ̂` estimates the noise σ whatever the warm-up stage or gap.
/// - **Uncertainty**: `v` and the forecast bands come from the covariance of the level and
///   trend errors: the least-squares covariance while warming up, then the stationary
///   solution of the error recursion (the Lyapunov equation `P = A·P·Aᵀ + g·gᵀ`), whichever
///   is larger. This is used rather than an EWMA variance of successive trend estimates, which
///   are correlated over `≈ 2/alpha` readings and would understate the slope's uncertainty.
/// - **Consistency**: Trigg's (1964) tracking signal, the smoothed error over the mean
///   absolute error, here `TS = EWMA(clipped z)/E|clipped z|`: near 0 while the model
///   forecasts without bias, near ±1 when the signal has left the straight line. Used as
///   Trigg used it, as a test: within its own 95% noise band (`±1.96·se`, from the clipped
///   z's standard deviation and the EWMA's `Σw²`) the model counts as fully consistent;
///   beyond, consistency falls linearly to 0 at `|TS| = 1`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Holt {
    level: f64,
    /// Per ms.
    trend: f64,
    scale: f64,
    /// Smoothed clipped z (Trigg's numerator).
    bias: f64,
    ln_dt: f64,
    last_ts: TimeMs,
    /// Readings seen.
    n: u32,
    /// Readings in the current line fit: since the first, or since the last restart.
    m: u32,
}

impl Holt {
    /// A smoother that has seen nothing.
    pub const fn new() -> Self {
        Holt {
            level: 0.0,
            trend: 0.0,
            scale: 0.0,
            bias: 0.0,
            ln_dt: 0.0,
            last_ts: 0,
            n: 0,
            m: 0,
        }
    }

    /// Learns reading `x` at `ts`. Returns the studentised one-step forecast error
    /// `z = (x − pred)/(max(σ̂, min_scale)·√(1 + v))` of `x` (computed before learning from
    /// it), or `None` on the first two readings and the first after a restart. A
    /// non-finite `x`, or `ts` not after the last reading's, is ignored and returns `None`.
    pub fn observe(&mut self, p: &TrendParams, ts: TimeMs, x: f64) -> Option<f64> {
        if !x.is_finite() || (self.n > 0 && ts <= self.last_ts) {
            return None;
        }
        if self.n == 0 {
            *self = Holt {
                level: x,
                last_ts: ts,
                n: 1,
                m: 1,
                ..Holt::new()
            };
            return None;
        }
        let dt = (ts - self.last_ts) as f64;
        // Geometric mean interval: weight of the n-th interval (n readings seen → n intervals).
        self.ln_dt += weight(p.alpha, self.n) * (dt.ln() - self.ln_dt);
        let q = dt / self.ln_dt.exp();

        let pred = self.level + self.trend * dt;
        let e = x - pred;
        // With one point in the line fit the prediction's variance is unbounded (the first
        // reading has no trend yet; after a restart the old trend is only a starting value):
        // no score, no scale update, no clipping.
        let scored = self.m >= 2;
        let infl = (1.0 + self.cov(p.alpha).path(q)).sqrt();
        let s = self.scale.max(p.min_scale);
        let z = (scored && s > 0.0).then(|| e / (s * infl));
        // Residual j = n − 1 (the first scored one is the third reading's).
        let clip = if scored {
            clip_at(self.n - 1, self.scale, p.min_scale, infl)
        } else {
            f64::INFINITY
        };
        let ec = e.clamp(-clip, clip);

        let (a, b) = brown_gains(p.alpha);
        let (a_q, b_q) = (1.0 - (1.0 - a).powf(q), 1.0 - (1.0 - b).powf(q));
        let (a_ols, c_ols) = ols_gains(self.m.saturating_add(1));
        let gain_level = a_q.max(a_ols);
        let gain_trend = (a_q * b_q).max(c_ols * q.min(1.0));
        // The convex form when unclipped, so a gain of 1 (a long gap) gives exactly `x`.
        self.level = if ec == e {
            (1.0 - gain_level) * pred + gain_level * x
        } else {
            pred + gain_level * ec
        };
        self.trend += gain_trend * ec / dt;

        if scored {
            let w = weight(p.alpha, self.n - 1);
            self.scale = huber_scale_step(self.scale, w, e.abs() / infl, clip / infl);
            if let Some(z) = z {
                self.bias += w * (z.clamp(-HUBER_K, HUBER_K) - self.bias);
            }
        }
        self.last_ts = ts;
        self.n = self.n.saturating_add(1);
        self.m = self.m.saturating_add(1);
        z
    }

    /// Restarts the line fit at level `x` after a detected level shift, keeping the scale
    /// and the current trend as a starting value: the next readings re-fit level and trend
    /// by least squares (the warm-start gains), so the part of the step the smoother had
    /// already mistaken for a trend is not extrapolated into a false forecast, and a ramp
    /// that began with the shift is learnt from the new readings alone.
    pub fn restart_level(&mut self, x: f64) {
        if x.is_finite() && self.n > 0 {
            self.level = x;
            self.m = 1;
        }
    }

    /// When the smoothed level is expected to reach `threshold` going `direction`, as seen
    /// at `now`, with a 95% band and a confidence.
    ///
    /// The band is where the 95% confidence band of the fitted line `L + T·t` touches the
    /// threshold: the roots in `t` of `(D − s·t)² = 1.96²·σ̂²·(Var L + 2t·Cov + t²·Var T)`,
    /// `D` the distance to go and `s` the slope towards the threshold. `None` before
    /// `warmup` readings (and at least three), when the level is at or past the threshold,
    /// when the slope does not point at it or is not significant (its 95% interval includes
    /// zero, so the late end would be unbounded), or when the expected time is further than
    /// `horizon_ms` after `now`. Times are measured from the last reading.
    pub fn time_to_threshold(
        &self,
        p: &TrendParams,
        threshold: f64,
        direction: Direction,
        now: TimeMs,
    ) -> Option<Eta> {
        if self.n < p.warmup.max(3) || !threshold.is_finite() {
            return None;
        }
        let sign = direction.sign();
        let dbar = self.ln_dt.exp();
        let d = (threshold - self.level) * sign;
        let s = self.trend * sign * dbar; // per interval
        if d <= 0.0 || s <= 0.0 {
            return None;
        }
        let cov = self.cov(p.alpha);
        let k2 = Z95 * Z95 * self.scale.max(p.min_scale).powi(2);
        let qa = s * s - k2 * cov.tt;
        if qa <= 0.0 {
            return None;
        }
        let qb = d * s + k2 * cov.lt;
        let qc = d * d - k2 * cov.ll;
        let r = (qb * qb - qa * qc).max(0.0).sqrt();
        let point = d / s;
        // Stable forms of the two roots (their product is qc/qa).
        let early = if qc <= 0.0 { 0.0 } else { qc / (qb + r) };
        let late = (qb + r) / qa;
        let eta = Eta::from_offsets(
            self.last_ts,
            point * dbar,
            early.min(point) * dbar,
            late.max(point) * dbar,
            self.consistency(p.alpha),
        );
        (eta.eta_ms.saturating_sub(now) <= p.horizon_ms).then_some(eta)
    }

    /// How consistently the model has been forecasting, in `0..=1`: 1 while Trigg's
    /// tracking signal is within its 95% noise band, falling linearly to 0 at `|TS| = 1`.
    pub fn consistency(&self, alpha: f64) -> f64 {
        let ts = (self.bias / HUBER_MEAN_ABS).abs().min(1.0);
        let noise = Z95 * CLIPPED_Z_SD / HUBER_MEAN_ABS
            * sum_sq_weights(alpha, self.n.saturating_sub(2)).sqrt();
        if noise >= 1.0 {
            return 1.0;
        }
        1.0 - ((ts - noise) / (1.0 - noise)).clamp(0.0, 1.0)
    }

    /// The smoothed level at the last reading.
    pub fn level(&self) -> f64 {
        self.level
    }

    /// The trend, in the signal's unit per ms.
    pub fn trend_per_ms(&self) -> f64 {
        self.trend
    }

    /// The robust noise scale σ̂, before flooring.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Readings seen (saturating).
    pub fn count(&self) -> u32 {
        self.n
    }

    /// Timestamp of the last reading (0 before the first).
    pub fn last_ts(&self) -> TimeMs {
        self.last_ts
    }

    /// The geometric mean interval between readings, in ms (1 before the second reading).
    pub fn mean_interval_ms(&self) -> f64 {
        self.ln_dt.exp()
    }

    /// The standard deviation of the trend estimate, per ms, from the error covariance.
    pub fn trend_std_per_ms(&self, p: &TrendParams) -> f64 {
        self.scale.max(p.min_scale) * self.cov(p.alpha).tt.sqrt() / self.mean_interval_ms()
    }

    /// Error covariance of the current (level, trend-per-interval), in σ².
    fn cov(&self, alpha: f64) -> Cov {
        let (a, b) = brown_gains(alpha);
        let ss = steady_cov(a, a * b);
        let ols = ols_cov(self.m);
        Cov {
            ll: ss.ll.max(ols.ll),
            lt: ss.lt.max(ols.lt),
            tt: ss.tt.max(ols.tt),
        }
    }

    pub(crate) fn is_finite(&self) -> bool {
        [self.level, self.trend, self.scale, self.bias, self.ln_dt]
            .iter()
            .all(|v| v.is_finite())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::HOUR_MS;
    use crate::rng::Rng;

    fn params(alpha: f64) -> TrendParams {
        TrendParams {
            alpha,
            min_scale: 1e-9,
            warmup: 30,
            horizon_ms: 1_000 * HOUR_MS,
        }
    }

    #[test]
    fn ols_warm_start_fits_a_noise_free_line_exactly() {
        let p = params(0.05);
        let mut h = Holt::new();
        for i in 0..10u64 {
            h.observe(&p, 1_000 + i * 60_000, 5.0 + 0.5 * i as f64);
        }
        assert!((h.level() - 9.5).abs() < 1e-9, "{}", h.level());
        assert!((h.trend_per_ms() - 0.5 / 60_000.0).abs() < 1e-15);
    }

    #[test]
    fn ols_warm_start_equals_least_squares_on_noisy_readings() {
        let p = params(0.01); // OLS gains dominate for the first ≈ 250 readings
        let mut rng = Rng::new(2);
        // Ten readings: before CLIP_AFTER, so no residual is clipped.
        let ys: Vec<f64> = (0..10).map(|i| i as f64 * 0.3 + rng.gauss()).collect();
        let mut h = Holt::new();
        for (i, &y) in ys.iter().enumerate() {
            h.observe(&p, 10 * i as u64 + 10, y);
        }
        let n = ys.len() as f64;
        let xbar = (n - 1.0) / 2.0;
        let ybar = ys.iter().sum::<f64>() / n;
        let sxy: f64 = ys
            .iter()
            .enumerate()
            .map(|(i, y)| (i as f64 - xbar) * (y - ybar))
            .sum();
        let sxx: f64 = (0..10).map(|i| (i as f64 - xbar).powi(2)).sum();
        let slope = sxy / sxx;
        let end = ybar + slope * (n - 1.0 - xbar);
        assert!((h.trend_per_ms() * 10.0 - slope).abs() < 1e-9);
        assert!((h.level() - end).abs() < 1e-9);
    }

    #[test]
    fn steady_state_trend_variance_matches_simulation_within_15_percent() {
        // The Lyapunov solution against the empirical variance of the trend error over
        // 40 independent runs of a noisy line.
        let alpha = 0.05;
        let p = params(alpha);
        let (a, b) = brown_gains(alpha);
        let predicted = steady_cov(a, a * b).tt;
        let mut sq = 0.0;
        let mut count = 0.0;
        for seed in 0..40 {
            let mut rng = Rng::new(seed);
            let mut h = Holt::new();
            for i in 0..2_000u64 {
                h.observe(&p, i + 1, 0.01 * i as f64 + rng.gauss());
                if i > 400 && i % 25 == 0 {
                    sq += (h.trend_per_ms() - 0.01).powi(2);
                    count += 1.0;
                }
            }
        }
        let empirical = sq / count;
        assert!(
            (empirical / predicted - 1.0).abs() < 0.15,
            "{empirical} vs {predicted}"
        );
    }

    #[test]
    fn scale_estimates_the_noise_sigma_on_a_ramp_within_5_percent() {
        let p = params(0.02);
        let mut rng = Rng::new(8);
        let mut h = Holt::new();
        let mut sum = 0.0;
        for i in 0..20_000u64 {
            h.observe(&p, i * 1_000, 0.002 * i as f64 + 0.5 * rng.gauss());
            if i >= 10_000 {
                sum += h.scale();
            }
        }
        let s = sum / 10_000.0;
        assert!((s / 0.5 - 1.0).abs() < 0.05, "{s}");
    }

    /// A ramp from 0 rising 0.02 per reading (σ = 1 noise, a reading every 10 min),
    /// threshold at 80: true crossing at reading 4000. At `alpha = 0.01` the slope's
    /// relative standard error is √(0.254·α³)·σ/0.02 ≈ 2.5%, so 10% is ≈ 4 standard
    /// errors. Checked at readings 1500, 2000, …, 3500 on 10 seeds.
    #[test]
    fn ramp_eta_is_within_10_percent_and_the_band_holds_the_true_crossing() {
        let p = params(0.01);
        let dt = 600_000u64;
        let slope = 0.02;
        let threshold = 80.0;
        let truth = |t0: u64| t0 + 4_000 * dt;
        let (mut checks, mut covered) = (0, 0);
        for seed in 1..=10 {
            let mut rng = Rng::new(seed);
            let mut h = Holt::new();
            let t0 = 1_700_000_000_000u64;
            for i in 0..=3_500u64 {
                let ts = t0 + i * dt;
                h.observe(&p, ts, slope * i as f64 + rng.gauss());
                if i >= 1_500 && i % 500 == 0 {
                    let eta = h
                        .time_to_threshold(&p, threshold, Direction::Rising, ts)
                        .expect("forecast");
                    let to_go = (truth(t0) - ts) as f64;
                    let err = (eta.eta_ms as f64 - truth(t0) as f64).abs() / to_go;
                    assert!(err < 0.10, "seed {seed} i {i}: error {err}");
                    assert!(eta.early_ms <= eta.eta_ms && eta.eta_ms <= eta.late_ms);
                    assert!(eta.confidence > 0.5, "{}", eta.confidence);
                    checks += 1;
                    covered += usize::from(eta.early_ms <= truth(t0) && truth(t0) <= eta.late_ms);
                }
            }
        }
        // A 95% band: allow 10% misses over 50 checks.
        assert!(covered * 10 >= checks * 9, "{covered}/{checks}");
    }

    #[test]
    fn falling_signal_forecast_and_none_when_heading_away_or_past() {
        let p = params(0.02);
        let mut h = Holt::new();
        for i in 0..200u64 {
            h.observe(&p, i * 1_000, 10.0 - 0.01 * i as f64);
        }
        // Level 8.01, falling 0.01/s: reaches 7.0 in ≈ 101 s after the last reading.
        let eta = h
            .time_to_threshold(&p, 7.0, Direction::Falling, 199_000)
            .unwrap();
        assert!((eta.eta_ms as f64 - 300_000.0).abs() < 1_000.0, "{eta:?}");
        assert!(eta.confidence > 0.95, "noise-free line: {}", eta.confidence);
        assert_eq!(
            h.time_to_threshold(&p, 12.0, Direction::Rising, 199_000),
            None
        );
        assert_eq!(
            h.time_to_threshold(&p, 9.0, Direction::Falling, 199_000),
            None
        );
        let near = TrendParams {
            horizon_ms: 50_000,
            ..p
        };
        assert_eq!(
            h.time_to_threshold(&near, 7.0, Direction::Falling, 199_000),
            None
        );
    }

    #[test]
    fn flat_noise_gives_no_forecast_most_of_the_time() {
        // No trend: a significant slope towards the threshold appears in ≤ 5% of checks.
        let p = params(0.02);
        let mut rng = Rng::new(21);
        let mut h = Holt::new();
        let mut made = 0;
        for i in 0..10_000u64 {
            h.observe(&p, i * 1_000, rng.gauss());
            if i >= 100
                && h.time_to_threshold(&p, 10.0, Direction::Rising, i * 1_000)
                    .is_some()
            {
                made += 1;
            }
        }
        assert!(made < 500, "{made}");
    }

    #[test]
    fn a_spike_does_not_tilt_the_trend() {
        let p = params(0.02);
        let mut h = Holt::new();
        let mut rng = Rng::new(6);
        for i in 0..500u64 {
            h.observe(&p, i * 1_000, 0.1 * rng.gauss());
        }
        let before = h.trend_per_ms();
        let z = h.observe(&p, 500_000, 100.0).unwrap();
        assert!(z > 100.0);
        // Clipped at 2σ̂: the trend moves by at most α²·2σ̂/Δt.
        let moved = (h.trend_per_ms() - before).abs();
        assert!(moved <= 0.02f64.powi(2) * 2.0 * 0.12 / 1_000.0, "{moved}");
    }

    #[test]
    fn irregular_bursts_do_not_blow_up_the_trend() {
        let p = params(0.02);
        let mut h = Holt::new();
        let mut rng = Rng::new(12);
        let mut ts = 0u64;
        for i in 0..3_000 {
            // Every 10th reading comes 1 ms after the previous one.
            ts += if i % 10 == 0 { 1 } else { 60_000 };
            h.observe(&p, ts, 0.3 * rng.gauss());
        }
        // True slope 0; the estimate stays within 3 standard errors.
        assert!(h.trend_per_ms().abs() < 3.0 * h.trend_std_per_ms(&p) + 1e-12);
        assert!(h.trend_per_ms().abs() * 60_000.0 < 0.01);
    }

    #[test]
    fn rejects_non_finite_and_stale_readings_without_change() {
        let p = params(0.1);
        let mut h = Holt::new();
        h.observe(&p, 10, 1.0);
        h.observe(&p, 20, 2.0);
        let before = h;
        assert_eq!(h.observe(&p, 30, f64::NAN), None);
        assert_eq!(h.observe(&p, 20, 3.0), None);
        assert_eq!(h.observe(&p, 5, 3.0), None);
        assert_eq!(h, before);
    }
}
