//! Exponentially weighted mean and variance in West/Finch incremental form.

use serde::{Deserialize, Serialize};

/// The weight of the `n`-th sample (1-based) in an exponentially weighted average with
/// smoothing constant `alpha`: `max(alpha, 1/n)`.
///
/// While `1/n > alpha` this is the cumulative mean (every sample weighs the same), so an
/// estimate is not biased towards its first sample; after `1/alpha` samples the weights
/// decay geometrically.
pub(crate) fn weight(alpha: f64, n: u32) -> f64 {
    alpha.max(1.0 / f64::from(n.max(1)))
}

/// The sum of squared normalised weights, `Σw²`, of the average [`weight`] builds after `n`
/// samples: `1/n` while it is the cumulative mean, `alpha/(2 − alpha)` in steady state.
///
/// `1/Σw²` is Kish's effective sample size; the variance of the weighted mean of
/// independent samples of variance `σ²` is `σ²·Σw²`.
pub(crate) fn sum_sq_weights(alpha: f64, n: u32) -> f64 {
    (alpha / (2.0 - alpha)).max(1.0 / f64::from(n.max(1)))
}

/// Exponentially weighted moving mean and variance of a stream, in constant memory.
///
/// The incremental form of Finch (2009), "Incremental calculation of weighted mean and
/// variance", §9, after West (1979):
///
/// ```text
/// d = x − mean;   mean ← mean + w·d;   var ← (1 − w)·(var + w·d²)
/// ```
///
/// with `w = max(alpha, 1/n)` for the `n`-th sample: the first `1/alpha` samples give the
/// cumulative mean and population variance exactly (the recurrence is then Welford's), the
/// later ones an exponentially weighted estimate with memory of about `2/alpha` samples.
/// `alpha` is passed to every call rather than stored, so a million twins do not store it
/// a million times.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Ewma {
    mean: f64,
    var: f64,
    n: u32,
}

impl Ewma {
    /// An empty average.
    pub const fn new() -> Self {
        Ewma {
            mean: 0.0,
            var: 0.0,
            n: 0,
        }
    }

    /// Adds sample `x` with smoothing constant `alpha` in `(0, 1)`. A non-finite `x` is
    /// ignored.
    pub fn update(&mut self, alpha: f64, x: f64) {
        if !x.is_finite() {
            return;
        }
        self.n = self.n.saturating_add(1);
        let w = weight(alpha, self.n);
        let d = x - self.mean;
        self.mean += w * d;
        self.var = (1.0 - w) * (self.var + w * d * d);
    }

    /// The weighted mean (0 before the first sample).
    pub fn mean(&self) -> f64 {
        self.mean
    }

    /// The weighted (population) variance (0 before the second sample).
    pub fn variance(&self) -> f64 {
        self.var
    }

    /// The square root of [`Ewma::variance`].
    pub fn std_dev(&self) -> f64 {
        self.var.sqrt()
    }

    /// How many samples have been added (saturating).
    pub fn count(&self) -> u32 {
        self.n
    }

    /// True once at least `warmup` samples have been added.
    pub fn is_warm(&self, warmup: u32) -> bool {
        self.n >= warmup
    }

    pub(crate) fn is_finite(&self) -> bool {
        self.mean.is_finite() && self.var.is_finite()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn first_samples_give_the_exact_mean_and_population_variance() {
        let xs = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0];
        let mut e = Ewma::new();
        for x in xs {
            e.update(0.01, x); // 1/alpha = 100 > 8 samples: cumulative regime throughout
        }
        assert_eq!(e.count(), 8);
        assert!((e.mean() - 5.0).abs() < 1e-12);
        assert!((e.variance() - 4.0).abs() < 1e-12, "{}", e.variance());
        assert!((e.std_dev() - 2.0).abs() < 1e-12);
    }

    #[test]
    fn steady_state_matches_the_direct_weighted_sums() {
        // After warm-up, mean and variance equal the exponentially weighted sums computed
        // directly (weights renormalised), to 1e-9.
        let alpha = 0.2;
        let mut rng = Rng::new(7);
        let xs: Vec<f64> = (0..200).map(|_| 10.0 + 3.0 * rng.gauss()).collect();
        let mut e = Ewma::new();
        for &x in &xs {
            e.update(alpha, x);
        }
        // Direct: last 150 samples carry weight alpha·(1−alpha)^k; older ones negligible.
        let (mut sw, mut swx) = (0.0, 0.0);
        for (k, &x) in xs.iter().rev().take(150).enumerate() {
            let w = alpha * (1.0 - alpha).powi(k as i32);
            sw += w;
            swx += w * x;
        }
        let mean = swx / sw;
        let var: f64 = xs
            .iter()
            .rev()
            .take(150)
            .enumerate()
            .map(|(k, &x)| alpha * (1.0 - alpha).powi(k as i32) * (x - mean).powi(2))
            .sum::<f64>()
            / sw;
        assert!((e.mean() - mean).abs() < 1e-9, "{} vs {mean}", e.mean());
        assert!(
            (e.variance() - var).abs() < 1e-9,
            "{} vs {var}",
            e.variance()
        );
    }

    #[test]
    fn tracks_a_gaussian_to_within_four_standard_errors() {
        // alpha = 0.002: the mean's standard error is 2·√(α/(2 − α)) ≈ 0.063.
        let mut rng = Rng::new(1);
        let mut e = Ewma::new();
        for _ in 0..20_000 {
            e.update(0.002, 3.0 + 2.0 * rng.gauss());
        }
        assert!((e.mean() - 3.0).abs() < 0.25, "{}", e.mean());
        assert!((e.std_dev() - 2.0).abs() < 0.15, "{}", e.std_dev());
        assert!(e.is_warm(500));
    }

    #[test]
    fn non_finite_samples_are_ignored() {
        let mut e = Ewma::new();
        e.update(0.1, 1.0);
        let before = e;
        e.update(0.1, f64::NAN);
        e.update(0.1, f64::INFINITY);
        assert_eq!(e, before);
    }
}
