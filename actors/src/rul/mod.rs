//! Remaining-useful-life estimation for engines that run in cycles (turbofans, C-MAPSS).
//!
//! Fitted offline from run-to-failure records, applied per reading in microseconds:
//!
//! ```text
//!  cycle's values ─► RulFeatures::push ─► RulModel::predict ─► cycles left (0..=cap)
//!   (24 channels      constant-memory      normalise, health
//!    or 14 sensors)   per-engine state     indicator, boosted trees
//! ```
//!
//! - [`RulFeatures`] is one engine's state, kept in its twin's snapshot: for each
//!   informative sensor, exponentially weighted least-squares lines at four time scales
//!   ([`LAMBDAS`]) give its level and slope now; plus the engine's baseline (its first
//!   [`BASELINE_CYCLES`] cycles) and the cycle count. Fixed-size, no allocation per cycle,
//!   independent of the model.
//! - [`RulModel`] turns that state into [`FEATURES`] features (normalised levels, means,
//!   slopes and drifts per sensor, and the same for a health indicator: a ridge-regressed
//!   linear combination of the sensors) and sums boosted oblivious trees over them. Its
//!   parameters ([`RulParams`]) are a few thousand plain numbers, held by the catalogue
//!   as a TOML table.
//! - [`fit`] trains a model from [`TrainingRun`]s, deterministically from a seed;
//!   [`cross_validate`] scores one on engines held out of fitting.
//!
//! No I/O: records come in as values, parameters as TOML text.
//!
//! # Layout
//! - `features` — [`RulFeatures`], the streaming extractor.
//! - `model` — [`RulModel`], [`RulParams`], prediction.
//! - `fit` — [`fit`], [`FitOptions`], [`TrainingRun`].
//! - `eval` — [`cross_validate`], [`rmse`], [`phm08_score`].
//! - `gbdt`, `linalg` — the booster and a ridge solve (private); the seeded generator is
//!   the crate's `rng`.

mod eval;
mod features;
mod fit;
mod gbdt;
mod linalg;
mod model;

pub use eval::{
    HOLDOUT_MIN_CYCLES, HOLDOUT_RUL, Holdout, Validation, cross_validate, phm08_score, predict_run,
    rmse,
};
pub use features::{BASELINE_CYCLES, FEATURE_VERSION, LAMBDAS, RulFeatures, SCALES, channel_name};
pub use fit::{FitOptions, TrainingRun, fit};
pub use model::{FEATURES, MAX_DEPTH, MAX_TREES, RulModel, RulParams, feature_names};

/// Channels in a C-MAPSS cycle: setting1..setting3, then sensors s1..s21.
pub const CHANNELS: usize = 24;

/// Informative sensors of FD001 (the others are constant there).
pub const SENSORS: usize = 14;

/// Names of the informative sensors, in the order [`RulFeatures::push`] takes them when
/// given only those.
pub const SENSOR_NAMES: [&str; SENSORS] = [
    "s2", "s3", "s4", "s7", "s8", "s9", "s11", "s12", "s13", "s14", "s15", "s17", "s20", "s21",
];

/// Index of each informative sensor among the [`CHANNELS`] (s*k* is channel 2 + *k*).
pub const INFORMATIVE: [usize; SENSORS] = [4, 5, 6, 9, 10, 11, 13, 14, 15, 16, 17, 19, 22, 23];

#[cfg(test)]
mod tests;
