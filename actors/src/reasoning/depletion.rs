//! Consumable depletion from a cumulative usage counter.

use serde::{Deserialize, Serialize};

use super::ewma::{Ewma, sum_sq_weights, weight};
use super::holt::{Eta, Z95};
use crate::model::TimeMs;

/// Tuning of a [`Depletion`] estimate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DepletionParams {
    /// Smoothing constant of the usage rate, per reading, in `(0, 1)`.
    pub alpha: f64,
    /// Usage increments to see before estimating times.
    pub warmup: u32,
    /// What a fresh consumable holds, in the counter's unit (litres, cups).
    pub capacity: f64,
    /// Remaining fraction at which to reorder (e.g. 0.2), if any.
    pub reorder_fraction: Option<f64>,
}

/// What a counter reading meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CounterEvent {
    /// The first reading: nothing to compare with.
    First,
    /// The counter rose (or stayed): usage since the last reading.
    Usage,
    /// The counter dropped: the consumable was replaced and its counter reset.
    Replaced,
}

/// How much of a consumable is left, and when it runs out.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DepletionEta {
    /// Remaining fraction of capacity, `0..=1`.
    pub remaining_fraction: f64,
    /// When it runs out, if the usage rate is known and significantly above zero.
    pub empty: Option<Eta>,
    /// When it reaches the reorder point (now, if already below it), under the same
    /// conditions and only if a reorder fraction is set.
    pub reorder: Option<Eta>,
}

/// Usage rate and remaining life of a consumable whose usage a device reports as a
/// cumulative counter since the consumable was fitted (litres through the filter, cups
/// since the last descale). A drop of the counter means the consumable was replaced.
///
/// The rate is the ratio estimator `R = EWMA(Δcounter)/EWMA(Δt)` (units per ms), i.e. an
/// exponentially weighted `ΣΔc/ΣΔt`: unbiased when a device reports on each use at
/// irregular times, where averaging per-reading rates `Δc/Δt` would overstate it (Jensen).
/// Its standard error is the ratio estimator's (Cochran, *Sampling Techniques*, §6.3):
/// `se(R)² ≈ Σw²·E[u²]/EWMA(Δt)²` with `u = Δc − R·Δt` the residual of each increment
/// against the rate known before it, tracked by an [`Ewma`], and `1/Σw²` the effective
/// number of readings. The rate survives a replacement: the household uses the new
/// filter as it used the old one.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Depletion {
    last_value: f64,
    last_ts: TimeMs,
    usage: f64,
    interval: f64,
    resid: Ewma,
    /// Readings seen.
    n: u32,
    /// Usage increments averaged into the rate.
    k: u32,
}

impl Depletion {
    /// A counter never read.
    pub const fn new() -> Self {
        Depletion {
            last_value: 0.0,
            last_ts: 0,
            usage: 0.0,
            interval: 0.0,
            resid: Ewma::new(),
            n: 0,
            k: 0,
        }
    }

    /// Learns counter reading `value` at `ts`. Returns `None`, changing nothing, when
    /// `value` is not finite or `ts` is not after the last reading's.
    pub fn observe(&mut self, alpha: f64, ts: TimeMs, value: f64) -> Option<CounterEvent> {
        if !value.is_finite() || (self.n > 0 && ts <= self.last_ts) {
            return None;
        }
        let event = if self.n == 0 {
            CounterEvent::First
        } else if value < self.last_value {
            // Usage between the last reading and the reset is unknown: the rate stays.
            CounterEvent::Replaced
        } else {
            let dv = value - self.last_value;
            let dt = (ts - self.last_ts) as f64;
            if let Some(rate) = self.rate_per_ms() {
                self.resid.update(alpha, dv - rate * dt);
            }
            self.k = self.k.saturating_add(1);
            let w = weight(alpha, self.k);
            self.usage += w * (dv - self.usage);
            self.interval += w * (dt - self.interval);
            CounterEvent::Usage
        };
        self.last_value = value;
        self.last_ts = ts;
        self.n = self.n.saturating_add(1);
        Some(event)
    }

    /// The usage rate in counter units per ms, once one increment has been seen.
    pub fn rate_per_ms(&self) -> Option<f64> {
        (self.k > 0 && self.interval > 0.0).then(|| self.usage / self.interval)
    }

    /// The standard error of [`Depletion::rate_per_ms`], once two increments have been seen.
    pub fn rate_std_err(&self, alpha: f64) -> Option<f64> {
        (self.resid.count() > 0 && self.interval > 0.0).then(|| {
            let mean_sq = self.resid.variance() + self.resid.mean().powi(2);
            (mean_sq * sum_sq_weights(alpha, self.resid.count())).sqrt() / self.interval
        })
    }

    /// The last counter value.
    pub fn value(&self) -> f64 {
        self.last_value
    }

    /// Timestamp of the last reading (0 before the first).
    pub fn last_ts(&self) -> TimeMs {
        self.last_ts
    }

    /// Readings seen (saturating).
    pub fn count(&self) -> u32 {
        self.n
    }

    /// Remaining fraction, and when the consumable is expected to reach the reorder point
    /// and run out, with 95% bands from `R ± 1.96·se(R)` and confidence
    /// `1/(1 + band width/time to go)`. `None` before the first reading or when
    /// `capacity` is not positive. Times are `None` before `warmup` increments or while the
    /// rate is not significantly above zero.
    pub fn estimate(&self, p: &DepletionParams) -> Option<DepletionEta> {
        if self.n == 0 || p.capacity <= 0.0 || !p.capacity.is_finite() {
            return None;
        }
        let remaining = (p.capacity - self.last_value).clamp(0.0, p.capacity);
        let remaining_fraction = remaining / p.capacity;
        let band = (self.k >= p.warmup.max(2))
            .then(|| Some((self.rate_per_ms()?, self.rate_std_err(p.alpha)?)))
            .flatten()
            .filter(|&(r, se)| r - Z95 * se > 0.0);
        let eta_for = |amount: f64| {
            band.map(|(r, se)| {
                let amount = amount.max(0.0);
                Eta::from_offsets(
                    self.last_ts,
                    amount / r,
                    amount / (r + Z95 * se),
                    amount / (r - Z95 * se),
                    1.0,
                )
            })
        };
        Some(DepletionEta {
            remaining_fraction,
            empty: eta_for(remaining),
            reorder: p
                .reorder_fraction
                .and_then(|f| eta_for(remaining - f * p.capacity)),
        })
    }

    pub(crate) fn is_finite(&self) -> bool {
        [self.last_value, self.usage, self.interval]
            .iter()
            .all(|v| v.is_finite())
            && self.resid.is_finite()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DAY_MS, HOUR_MS};
    use crate::rng::Rng;

    const P: DepletionParams = DepletionParams {
        alpha: 0.05,
        warmup: 10,
        capacity: 1_000.0,
        reorder_fraction: Some(0.2),
    };

    #[test]
    fn constant_rate_gives_the_empty_eta_within_5_percent() {
        // 2 litres/hour, hourly readings with ±20% jitter on the reading times.
        let mut rng = Rng::new(1);
        let mut d = Depletion::new();
        let rate = 2.0 / HOUR_MS as f64;
        let mut ts = 0u64;
        for _ in 0..100 {
            ts += (HOUR_MS as f64 * (0.8 + 0.4 * rng.uniform())) as u64;
            d.observe(P.alpha, ts, rate * ts as f64);
        }
        let used = rate * ts as f64;
        let est = d.estimate(&P).unwrap();
        assert!((est.remaining_fraction - (1.0 - used / 1_000.0)).abs() < 1e-12);
        let truth = (1_000.0 / rate) as u64;
        let eta = est.empty.unwrap();
        let err = (eta.eta_ms as f64 - truth as f64).abs() / (truth - ts) as f64;
        assert!(err < 0.05, "{err}");
        assert!(eta.confidence > 0.9, "{}", eta.confidence);
        assert!(eta.early_ms <= truth && truth <= eta.late_ms + 1);
        let reorder = est.reorder.unwrap();
        let truth_reorder = 800.0 / rate;
        assert!((reorder.eta_ms as f64 - truth_reorder).abs() / (truth_reorder - ts as f64) < 0.05);
    }

    #[test]
    fn event_driven_counter_rate_is_unbiased_within_5_percent() {
        // A coffee machine reports on every cup; cups arrive as a Poisson process at 6 a
        // day. Averaging 1/Δt per reading would overstate the rate; the ratio does not.
        let mut rng = Rng::new(2);
        let mut d = Depletion::new();
        let p = DepletionParams { alpha: 0.01, ..P };
        let mean_gap = DAY_MS as f64 / 6.0;
        let mut ts = 0u64;
        let mut cups = 0.0;
        let mut errs = Vec::new();
        for i in 0..3_000 {
            ts += (-mean_gap * rng.uniform().ln()).max(1.0) as u64;
            cups += 1.0;
            d.observe(p.alpha, ts, cups);
            if i > 500 && i % 100 == 0 {
                errs.push(d.rate_per_ms().unwrap() * mean_gap - 1.0);
            }
        }
        let mean_err = errs.iter().sum::<f64>() / errs.len() as f64;
        assert!(mean_err.abs() < 0.05, "bias {mean_err}");
    }

    #[test]
    fn a_replacement_is_detected_and_the_eta_recovers() {
        let mut d = Depletion::new();
        let rate = 45.0 / DAY_MS as f64; // 900 l in 20 days
        let mut ts = 0;
        for _ in 0..80 {
            ts += HOUR_MS * 6;
            d.observe(P.alpha, ts, rate * ts as f64);
        }
        let low = d.estimate(&P).unwrap();
        assert!(low.remaining_fraction < 0.2);
        assert_eq!(
            low.reorder.unwrap().eta_ms,
            ts,
            "below the reorder point: due now"
        );
        // Replaced: the counter restarts from zero; 1.5 litres used since.
        ts += HOUR_MS * 6;
        assert_eq!(d.observe(P.alpha, ts, 1.5), Some(CounterEvent::Replaced));
        let fresh = d.estimate(&P).unwrap();
        assert!((fresh.remaining_fraction - 0.9985).abs() < 1e-12);
        let truth = ts as f64 + 998.5 / rate;
        assert!(
            (d.rate_per_ms().unwrap() / rate - 1.0).abs() < 1e-3,
            "rate survives the swap"
        );
        let eta = fresh.empty.unwrap().eta_ms as f64;
        assert!((eta - truth).abs() / (truth - ts as f64) < 0.05);
    }

    #[test]
    fn no_times_before_warm_up_or_without_usage() {
        let mut d = Depletion::new();
        for i in 1..=5u64 {
            d.observe(P.alpha, i * HOUR_MS, i as f64);
        }
        let est = d.estimate(&P).unwrap();
        assert!(est.empty.is_none(), "5 < warm-up of 10");
        let mut idle = Depletion::new();
        for i in 1..=50u64 {
            idle.observe(P.alpha, i * HOUR_MS, 100.0);
        }
        assert!(
            idle.estimate(&P).unwrap().empty.is_none(),
            "zero rate: never empty"
        );
    }

    #[test]
    fn rejects_non_finite_and_stale_readings_without_change() {
        let mut d = Depletion::new();
        d.observe(P.alpha, 100, 1.0);
        d.observe(P.alpha, 200, 2.0);
        let before = d;
        assert_eq!(d.observe(P.alpha, 300, f64::INFINITY), None);
        assert_eq!(d.observe(P.alpha, 200, 3.0), None);
        assert_eq!(d, before);
    }
}
