//! Fitting a [`RulModel`] from run-to-failure records.

use super::SENSORS;
use super::features::{FEATURE_VERSION, RulFeatures, select};
use super::gbdt::{BoostOptions, boost};
use super::linalg::Ridge;
use super::model::{FAST, FEATURES, RulModel, RulParams, features_into};
use crate::rng::Rng;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// One engine's record from healthy to failure: its last reading is the cycle it failed
/// in (remaining life 0).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingRun {
    /// The engine's id (for reports only).
    pub unit: u32,
    /// One entry per cycle, in order: all channels or the informative sensors (see
    /// [`RulFeatures::push`]).
    pub readings: Vec<Vec<f64>>,
}

/// How to fit. The defaults are what the FD001 figures in BENCHMARKS.md were measured
/// with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FitOptions {
    /// Cap of the piecewise-linear training target, in cycles: an engine further than
    /// this from failure counts as healthy.
    pub cap: f64,
    /// Number of boosted trees.
    pub trees: usize,
    /// Levels per tree (2^depth leaves).
    pub depth: usize,
    /// Shrinkage of each tree.
    pub learning_rate: f64,
    /// L2 penalty on leaf values (in training rows).
    pub l2: f64,
    /// Fraction of training rows each tree sees.
    pub subsample: f64,
    /// Fewest training rows on either side of a split in any leaf.
    pub min_leaf: usize,
    /// Histogram bins per feature.
    pub bins: usize,
    /// Ridge penalty of the health-indicator regression.
    pub ridge: f64,
    /// Seed of the row sampling: same data and seed, same model.
    pub seed: u64,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            cap: default_cap(),
            trees: 150,
            depth: 4,
            learning_rate: 0.07,
            l2: 1.0,
            subsample: 0.8,
            min_leaf: 5,
            bins: 64,
            ridge: 1e-3,
            seed: 1,
        }
    }
}

fn default_cap() -> f64 {
    125.0
}

impl FitOptions {
    fn check(&self) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::InvalidArgument {
                name: "fit options",
                reason,
            })
        };
        if !(self.cap.is_finite() && self.cap > 0.0) {
            return bad(format!("cap {} must be a positive number", self.cap));
        }
        if self.trees == 0 || self.trees > super::model::MAX_TREES {
            return bad(format!(
                "trees {} must be 1..={}",
                self.trees,
                super::model::MAX_TREES
            ));
        }
        if self.depth == 0 || self.depth > super::model::MAX_DEPTH as usize {
            return bad(format!(
                "depth {} must be 1..={}",
                self.depth,
                super::model::MAX_DEPTH
            ));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate <= 1.0) {
            return bad(format!(
                "learning_rate {} must be in (0, 1]",
                self.learning_rate
            ));
        }
        if !(self.subsample > 0.0 && self.subsample <= 1.0) {
            return bad(format!("subsample {} must be in (0, 1]", self.subsample));
        }
        if !(self.l2.is_finite() && self.l2 >= 0.0 && self.ridge.is_finite() && self.ridge >= 0.0) {
            return bad(format!(
                "l2 {} and ridge {} must be non-negative",
                self.l2, self.ridge
            ));
        }
        if !(2..=256).contains(&self.bins) {
            return bad(format!("bins {} must be 2..=256", self.bins));
        }
        Ok(())
    }
}

/// Fits a model to run-to-failure records: normalisation from all training cycles, a
/// ridge-regressed health indicator, then boosted oblivious trees on the streaming
/// features of every cycle with target `min(remaining cycles, cap)`.
///
/// Deterministic: the same runs and options give the same model, bit for bit. Refuses
/// an empty set, a run without readings, and bad readings (naming the run and cycle).
pub fn fit(runs: &[TrainingRun], options: &FitOptions) -> Result<RulModel> {
    options.check()?;
    if runs.is_empty() {
        return Err(Error::InvalidArgument {
            name: "runs",
            reason: "no training runs".to_owned(),
        });
    }
    // Pass 1: check every reading; mean and deviation of each sensor.
    let mut sum = [0.0; SENSORS];
    let mut sum2 = [0.0; SENSORS];
    let mut n = 0usize;
    for run in runs {
        if run.readings.is_empty() {
            return Err(Error::InvalidArgument {
                name: "runs",
                reason: format!("unit {} has no readings", run.unit),
            });
        }
        for (c, values) in run.readings.iter().enumerate() {
            let y = select(values).map_err(|e| Error::InvalidArgument {
                name: "runs",
                reason: format!("unit {} reading {}: {e}", run.unit, c + 1),
            })?;
            for s in 0..SENSORS {
                sum[s] += y[s];
            }
            n += 1;
        }
    }
    let mean: Vec<f64> = sum.iter().map(|s| s / n as f64).collect();
    for run in runs {
        for values in &run.readings {
            let y = select(values)?;
            for s in 0..SENSORS {
                sum2[s] += (y[s] - mean[s]).powi(2);
            }
        }
    }
    let std: Vec<f64> = (0..SENSORS)
        .map(|s| {
            let sd = (sum2[s] / n as f64).sqrt();
            // A constant sensor carries nothing; any positive scale keeps it harmless.
            if sd > 1e-9 * (1.0 + mean[s].abs()) {
                sd
            } else {
                1.0
            }
        })
        .collect();
    let target = |len: usize, c: usize| ((len - 1 - c) as f64).min(options.cap);

    // Pass 2: the health indicator, a ridge regression of the target on the normalised
    // sensors' short-scale levels.
    let mut ridge = Ridge::new(SENSORS);
    let mut z = [0.0; SENSORS];
    for run in runs {
        let mut f = RulFeatures::new();
        for (c, values) in run.readings.iter().enumerate() {
            f.push(values)?;
            for s in 0..SENSORS {
                z[s] = (f.line(s, FAST).0 - mean[s]) / std[s];
            }
            ridge.add(&z, target(run.readings.len(), c));
        }
    }
    let (hi_bias, hi_weights) = ridge.solve(options.ridge).unwrap_or_else(|| {
        (
            runs.iter().map(|r| r.readings.len() as f64).sum::<f64>() / runs.len() as f64,
            vec![0.0; SENSORS],
        )
    });
    let mut params = RulParams {
        feature_version: FEATURE_VERSION,
        cap: options.cap,
        mean,
        std,
        hi_weights,
        hi_bias,
        base: 0.0,
        depth: options.depth as u32,
        split_features: Vec::new(),
        split_thresholds: Vec::new(),
        leaves: Vec::new(),
    };

    // Pass 3: every cycle's features, then the trees.
    let mut x = Vec::with_capacity(n * FEATURES);
    let mut y = Vec::with_capacity(n);
    let mut row = [0.0; FEATURES];
    for run in runs {
        let mut f = RulFeatures::new();
        for (c, values) in run.readings.iter().enumerate() {
            f.push(values)?;
            features_into(&params, &f, &mut row);
            x.extend_from_slice(&row);
            y.push(target(run.readings.len(), c));
        }
    }
    let boosted = boost(
        &x,
        FEATURES,
        &y,
        &BoostOptions {
            trees: options.trees,
            depth: options.depth,
            learning_rate: options.learning_rate,
            l2: options.l2,
            subsample: options.subsample,
            bins: options.bins,
            min_leaf: options.min_leaf as f64,
        },
        &mut Rng::new(options.seed),
    );
    params.base = boosted.base;
    params.split_features = boosted.split_features;
    params.split_thresholds = boosted.split_thresholds;
    params.leaves = boosted.leaves;
    RulModel::from_params(params)
}
