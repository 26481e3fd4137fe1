//! The fitted model: normalisation, a health-indicator projection and boosted oblivious
//! trees; its plain-number parameter form; prediction.

use super::SENSORS;
use super::features::{FEATURE_VERSION, RulFeatures, SCALES};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// Number of features the trees see (see [`feature_names`]).
pub const FEATURES: usize = 1 + 3 * SCALES + 2 + 4 * SENSORS;

/// Deepest tree a model may hold (2^depth leaves per tree).
pub const MAX_DEPTH: u32 = 8;

/// Most trees a model may hold: keeps parameters small and prediction in microseconds.
pub const MAX_TREES: usize = 2_000;

/// Time scale (index into [`super::LAMBDAS`]) of the per-sensor level feature and of the
/// level the health indicator is fitted on.
pub(crate) const FAST: usize = 1;
/// Time scale of the per-sensor mean, slope and drift features.
pub(crate) const SLOW: usize = 2;

/// Names of the [`FEATURES`] features, in the order the trees index them.
pub fn feature_names() -> Vec<String> {
    let mut names = vec!["cycles".to_owned()];
    for what in ["level", "slope", "mean"] {
        for l in super::LAMBDAS {
            names.push(format!("hi_{what}@{l}"));
        }
    }
    names.push("hi_baseline".to_owned());
    names.push("hi_drift".to_owned());
    for what in ["level", "mean", "slope", "drift"] {
        for s in super::SENSOR_NAMES {
            names.push(format!("{s}_{what}"));
        }
    }
    debug_assert_eq!(names.len(), FEATURES);
    names
}

/// The fitted parameters as plain numbers and arrays: the form a catalogue entry holds
/// (a TOML table) and [`RulModel`] is read from and written as.
///
/// A model predicts `clamp(base + Σ_t leaves[t][index_t(x)], 0, cap)`, where `x` are the
/// [`FEATURES`] features computed from [`RulFeatures`] with `mean`, `std` and the health
/// indicator `hi = hi_bias + Σ hi_weights[s]·(v[s] − mean[s]) / std[s]`, and tree `t`'s
/// leaf index has bit `d` set when `x[split_features[t·depth + d]] >
/// split_thresholds[t·depth + d]` (oblivious trees: one split per level).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulParams {
    /// The feature definition the model was fitted for ([`FEATURE_VERSION`]).
    pub feature_version: u32,
    /// RUL cap of the training targets, in cycles: the most the model ever predicts.
    pub cap: f64,
    /// Per informative sensor: mean over the training cycles.
    pub mean: Vec<f64>,
    /// Per informative sensor: standard deviation over the training cycles.
    pub std: Vec<f64>,
    /// Health indicator: weights on the normalised sensors (an RUL estimate in cycles).
    pub hi_weights: Vec<f64>,
    /// Health indicator: intercept.
    pub hi_bias: f64,
    /// Prediction before any tree (the mean training target).
    pub base: f64,
    /// Levels per tree.
    pub depth: u32,
    /// Feature index of each tree's split at each level, tree-major.
    pub split_features: Vec<u32>,
    /// Threshold of each tree's split at each level, tree-major.
    pub split_thresholds: Vec<f64>,
    /// 2^depth leaf values per tree, tree-major.
    pub leaves: Vec<f64>,
}

/// A fitted remaining-useful-life model, checked when built or read.
///
/// Serializes as [`RulParams`]; reading one that does not hold together (wrong lengths,
/// non-finite numbers, a feature index out of range, another feature version) fails.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RulParams", into = "RulParams")]
pub struct RulModel {
    p: RulParams,
    trees: usize,
}

impl TryFrom<RulParams> for RulModel {
    type Error = Error;

    fn try_from(p: RulParams) -> Result<Self> {
        let bad = |reason: String| Error::InvalidArgument {
            name: "rul params",
            reason,
        };
        if p.feature_version != FEATURE_VERSION {
            return Err(bad(format!(
                "feature_version {} is not the supported {FEATURE_VERSION}",
                p.feature_version
            )));
        }
        if !(p.cap.is_finite() && p.cap > 0.0) {
            return Err(bad(format!("cap {} must be a positive number", p.cap)));
        }
        for (name, v) in [
            ("mean", &p.mean),
            ("std", &p.std),
            ("hi_weights", &p.hi_weights),
        ] {
            if v.len() != SENSORS {
                return Err(bad(format!(
                    "{name} holds {} numbers, expected {SENSORS}",
                    v.len()
                )));
            }
        }
        if let Some(s) = p.std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(bad(format!("std {s} must be positive")));
        }
        if p.depth == 0 || p.depth > MAX_DEPTH {
            return Err(bad(format!("depth {} must be 1..={MAX_DEPTH}", p.depth)));
        }
        let depth = p.depth as usize;
        if !p.split_features.len().is_multiple_of(depth) {
            return Err(bad(format!(
                "split_features holds {} indexes, not a multiple of depth {depth}",
                p.split_features.len()
            )));
        }
        let trees = p.split_features.len() / depth;
        if trees > MAX_TREES {
            return Err(bad(format!("{trees} trees, the limit is {MAX_TREES}")));
        }
        if p.split_thresholds.len() != trees * depth {
            return Err(bad(format!(
                "split_thresholds holds {} numbers, expected {}",
                p.split_thresholds.len(),
                trees * depth
            )));
        }
        if p.leaves.len() != trees << depth {
            return Err(bad(format!(
                "leaves holds {} numbers, expected {}",
                p.leaves.len(),
                trees << depth
            )));
        }
        if let Some(f) = p.split_features.iter().find(|&&f| f as usize >= FEATURES) {
            return Err(bad(format!(
                "split feature {f} out of range (features 0..{FEATURES})"
            )));
        }
        let numbers = p
            .mean
            .iter()
            .chain(&p.hi_weights)
            .chain(&p.split_thresholds)
            .chain(&p.leaves)
            .chain([&p.hi_bias, &p.base]);
        if let Some(v) = numbers.into_iter().find(|v| !v.is_finite()) {
            return Err(bad(format!("{v} is not a finite number")));
        }
        Ok(Self { p, trees })
    }
}

impl From<RulModel> for RulParams {
    fn from(m: RulModel) -> Self {
        m.p
    }
}

impl RulModel {
    /// Builds a model from its parameters, checking that they hold together.
    pub fn from_params(params: RulParams) -> Result<Self> {
        Self::try_from(params)
    }

    /// The parameters.
    pub fn params(&self) -> &RulParams {
        &self.p
    }

    /// Reads a model from a TOML table (the form [`RulModel::to_toml`] writes).
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e: toml::de::Error| Error::InvalidArgument {
            name: "rul params",
            reason: e.to_string().trim_end().to_owned(),
        })
    }

    /// Writes the model as a TOML table of plain numbers and arrays, the arrays wrapped
    /// at 100 columns so the table reads and diffs well inside a catalogue file. Every
    /// number is written in its shortest form that reads back to the same bits.
    pub fn to_toml(&self) -> String {
        let p = &self.p;
        let mut out = String::new();
        let _ = writeln!(out, "feature_version = {}", p.feature_version);
        let _ = writeln!(out, "cap = {:?}", p.cap);
        wrapped(&mut out, "mean", &p.mean);
        wrapped(&mut out, "std", &p.std);
        wrapped(&mut out, "hi_weights", &p.hi_weights);
        let _ = writeln!(out, "hi_bias = {:?}", p.hi_bias);
        let _ = writeln!(out, "base = {:?}", p.base);
        let _ = writeln!(out, "depth = {}", p.depth);
        wrapped(&mut out, "split_features", &p.split_features);
        wrapped(&mut out, "split_thresholds", &p.split_thresholds);
        wrapped(&mut out, "leaves", &p.leaves);
        out
    }

    /// The RUL cap in cycles: the largest prediction.
    pub fn cap(&self) -> f64 {
        self.p.cap
    }

    /// Number of trees.
    pub fn trees(&self) -> usize {
        self.trees
    }

    /// How many numbers the parameters hold in all.
    pub fn parameter_count(&self) -> usize {
        let p = &self.p;
        4 + 3 * SENSORS + p.split_features.len() + p.split_thresholds.len() + p.leaves.len()
    }

    /// Remaining useful life in cycles after the cycles `features` has seen: finite, in
    /// `0..=cap`. An engine with no cycles seen is taken as new (`cap`).
    pub fn predict(&self, features: &RulFeatures) -> f64 {
        if features.cycles() == 0 {
            return self.p.cap;
        }
        let mut x = [0.0; FEATURES];
        self.features_into(features, &mut x);
        self.predict_row(&x)
    }

    /// The trees' prediction for one feature vector, clamped to `0..=cap`.
    pub(crate) fn predict_row(&self, x: &[f64; FEATURES]) -> f64 {
        let p = &self.p;
        let depth = p.depth as usize;
        let mut sum = p.base;
        for t in 0..self.trees {
            let splits = t * depth..(t + 1) * depth;
            let mut index = 0;
            for (d, (&f, &thr)) in p.split_features[splits.clone()]
                .iter()
                .zip(&p.split_thresholds[splits])
                .enumerate()
            {
                index |= usize::from(x[f as usize] > thr) << d;
            }
            sum += p.leaves[(t << depth) + index];
        }
        // NaN cannot arise from checked inputs, but a clamp of NaN stays NaN: be explicit.
        if sum.is_nan() {
            return p.cap;
        }
        sum.clamp(0.0, p.cap)
    }

    /// Computes the [`FEATURES`] features of `f` (see [`feature_names`]).
    pub(crate) fn features_into(&self, f: &RulFeatures, x: &mut [f64; FEATURES]) {
        features_into(&self.p, f, x);
    }
}

/// Writes `name = [ … ]` with the values' `Debug` forms (for `f64`, the shortest text
/// that parses back to the same value; `NaN` and infinities never get here, the model
/// refuses them), several to a line.
fn wrapped<T: std::fmt::Debug>(out: &mut String, name: &str, values: &[T]) {
    let _ = writeln!(out, "{name} = [");
    let mut line = String::new();
    for v in values {
        let item = format!("{v:?},");
        if !line.is_empty() && line.len() + 1 + item.len() > 96 {
            let _ = writeln!(out, "    {line}");
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&item);
    }
    if !line.is_empty() {
        let _ = writeln!(out, "    {line}");
    }
    out.push_str("]\n");
}

/// Computes the features from the raw streaming state, the normalisation and the health
/// indicator in `p` (trees are not used).
pub(crate) fn features_into(p: &RulParams, f: &RulFeatures, x: &mut [f64; FEATURES]) {
    let mut i = 0;
    let mut put = |v: f64| {
        x[i] = v;
        i += 1;
    };
    put(f.cycles() as f64);
    // Health indicator: linear in the sensors, so its level, slope and mean are the same
    // projection of theirs.
    let mut hi_level = [p.hi_bias; SCALES];
    let mut hi_slope = [0.0; SCALES];
    let mut hi_mean = [p.hi_bias; SCALES];
    let mut hi_baseline = p.hi_bias;
    let mut z = [[0.0; 4]; SENSORS];
    for (s, zs) in z.iter_mut().enumerate() {
        let inv = 1.0 / p.std[s];
        let w = p.hi_weights[s] * inv;
        let baseline = f.baseline(s);
        for (j, ((level_j, slope_j), mean_j)) in hi_level
            .iter_mut()
            .zip(&mut hi_slope)
            .zip(&mut hi_mean)
            .enumerate()
        {
            let (level, slope) = f.line(s, j);
            let mean = f.mean(s, j);
            *level_j += w * (level - p.mean[s]);
            *slope_j += w * slope;
            *mean_j += w * (mean - p.mean[s]);
            if j == FAST {
                zs[0] = (level - p.mean[s]) * inv;
            }
            if j == SLOW {
                zs[1] = (mean - p.mean[s]) * inv;
                zs[2] = slope * inv;
                zs[3] = (level - baseline) * inv;
            }
        }
        hi_baseline += w * (baseline - p.mean[s]);
    }
    for v in hi_level.into_iter().chain(hi_slope).chain(hi_mean) {
        put(v);
    }
    put(hi_baseline);
    put(hi_level[SLOW] - hi_baseline);
    for k in 0..4 {
        for zs in &z {
            put(zs[k]);
        }
    }
    debug_assert_eq!(i, FEATURES);
}
