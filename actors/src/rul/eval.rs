//! Validation on engines held out of fitting, scored the way the C-MAPSS test sets are.

use super::features::RulFeatures;
use super::fit::{FitOptions, TrainingRun, fit};
use super::model::RulModel;
use crate::rng::Rng;
use crate::{Error, Result};

/// Fewest cycles a held-out engine keeps: the shortest engine of test_FD001 has 31.
pub const HOLDOUT_MIN_CYCLES: usize = 31;

/// Range of the true remaining life a held-out engine is cut at, in cycles. The true
/// RULs of test_FD001 run from 7 to 145; drawing uniformly from 5..=150 keeps the
/// validation close to that and does not score the model where every model, capped at
/// ~125, must fail (engines cut 300 cycles before failure).
pub const HOLDOUT_RUL: (u64, u64) = (5, 150);

/// One held-out engine's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Holdout {
    /// The engine.
    pub unit: u32,
    /// Cycles it was fed before the prediction.
    pub cycles_seen: usize,
    /// Its true remaining life at that point.
    pub true_rul: f64,
    /// What the model said.
    pub predicted: f64,
}

/// Result of [`cross_validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Validation {
    /// Folds the engines were split into.
    pub folds: usize,
    /// Seed of the split and of the cut points.
    pub seed: u64,
    /// One entry per engine, each predicted by the model fitted without it.
    pub holdouts: Vec<Holdout>,
    /// Root-mean-square error over the engines, in cycles.
    pub rmse: f64,
    /// PHM08 score summed over the engines (lower is better; late costs more).
    pub phm08: f64,
}

/// K-fold cross-validation by engine: the runs are shuffled (seeded) into `folds` groups;
/// each group is held out in turn while a model is fitted on the others with `options`;
/// each held-out engine is cut at a random point (seeded, see [`HOLDOUT_RUL`] and
/// [`HOLDOUT_MIN_CYCLES`]), fed cycle by cycle up to it, and its prediction at its last
/// fed cycle is compared with the true remaining life, uncapped, as on the test set.
pub fn cross_validate(
    runs: &[TrainingRun],
    options: &FitOptions,
    folds: usize,
    seed: u64,
) -> Result<Validation> {
    if folds < 2 || folds > runs.len() {
        return Err(Error::InvalidArgument {
            name: "folds",
            reason: format!("{folds} folds for {} runs: need 2..=runs", runs.len()),
        });
    }
    let mut rng = Rng::new(seed);
    let mut order: Vec<usize> = (0..runs.len()).collect();
    rng.shuffle(&mut order);
    let cuts: Vec<usize> = order
        .iter()
        .map(|&i| cut_point(runs[i].readings.len(), &mut rng))
        .collect();
    let mut holdouts = Vec::with_capacity(runs.len());
    for k in 0..folds {
        let train: Vec<TrainingRun> = order
            .iter()
            .enumerate()
            .filter(|(pos, _)| pos % folds != k)
            .map(|(_, &i)| runs[i].clone())
            .collect();
        let model = fit(&train, options)?;
        for (pos, &i) in order.iter().enumerate().filter(|(pos, _)| pos % folds == k) {
            let run = &runs[i];
            let keep = cuts[pos];
            let predicted = predict_run(&model, &run.readings[..keep])?;
            holdouts.push(Holdout {
                unit: run.unit,
                cycles_seen: keep,
                true_rul: (run.readings.len() - keep) as f64,
                predicted,
            });
        }
    }
    holdouts.sort_by_key(|h| h.unit);
    let errors: Vec<f64> = holdouts.iter().map(|h| h.predicted - h.true_rul).collect();
    Ok(Validation {
        folds,
        seed,
        rmse: rmse(&errors),
        phm08: phm08_score(&errors),
        holdouts,
    })
}

/// How many cycles of a run of `len` cycles a held-out engine keeps.
fn cut_point(len: usize, rng: &mut Rng) -> usize {
    let most = (len.saturating_sub(HOLDOUT_MIN_CYCLES) as u64).min(HOLDOUT_RUL.1);
    let rul = if most >= HOLDOUT_RUL.0 {
        rng.range(HOLDOUT_RUL.0, most)
    } else {
        // Short (synthetic) runs: any point that leaves at least one cycle fed.
        rng.range(0, len.saturating_sub(1) as u64)
    };
    len - rul as usize
}

/// Feeds `readings` to a fresh engine and predicts at the last one.
pub fn predict_run(model: &RulModel, readings: &[Vec<f64>]) -> Result<f64> {
    let mut f = RulFeatures::new();
    for values in readings {
        f.push(values)?;
    }
    Ok(model.predict(&f))
}

/// Root-mean-square of `errors` (0 when empty).
pub fn rmse(errors: &[f64]) -> f64 {
    if errors.is_empty() {
        return 0.0;
    }
    (errors.iter().map(|d| d * d).sum::<f64>() / errors.len() as f64).sqrt()
}

/// The PHM08 score of errors `d = predicted − true`: `Σ exp(−d/13) − 1` for `d < 0`,
/// `exp(d/10) − 1` for `d ≥ 0`. Late predictions cost more than early ones.
pub fn phm08_score(errors: &[f64]) -> f64 {
    errors
        .iter()
        .map(|&d| {
            if d < 0.0 {
                (-d / 13.0).exp() - 1.0
            } else {
                (d / 10.0).exp() - 1.0
            }
        })
        .sum()
}
