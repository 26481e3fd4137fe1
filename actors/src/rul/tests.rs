//! Tests of the whole path: synthetic degradation, fitting, prediction, parameters.

use super::*;
use crate::Error;
use crate::rng::Rng;

/// Synthetic run-to-failure engines: each has its own life (120..=260 cycles), initial
/// wear and sensor offsets; every sensor follows an exponential degradation towards
/// failure in its own direction, plus Gaussian noise.
fn synthetic(units: u32, seed: u64) -> Vec<TrainingRun> {
    let mut rng = Rng::new(seed);
    let gauss = |rng: &mut Rng| {
        // Box–Muller.
        let (u, v) = (rng.next_f64().max(1e-12), rng.next_f64());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    };
    (1..=units)
        .map(|unit| {
            let life = rng.range(120, 260) as usize;
            let wear = 0.1 * rng.next_f64();
            let offsets: Vec<f64> = (0..CHANNELS).map(|_| 0.3 * gauss(&mut rng)).collect();
            let readings = (0..life)
                .map(|c| {
                    let t = (c + 1) as f64 / life as f64;
                    let health = wear + (1.0 - wear) * ((4.0 * t).exp() - 1.0) / (4f64.exp() - 1.0);
                    (0..CHANNELS)
                        .map(|ch| {
                            let base = 100.0 + 10.0 * ch as f64;
                            if !INFORMATIVE.contains(&ch) {
                                return base;
                            }
                            let dir = if ch % 3 == 0 { -1.0 } else { 1.0 };
                            base + offsets[ch] + dir * 5.0 * health + 0.5 * gauss(&mut rng)
                        })
                        .collect()
                })
                .collect();
            TrainingRun { unit, readings }
        })
        .collect()
}

fn small_options() -> FitOptions {
    FitOptions {
        trees: 60,
        learning_rate: 0.1,
        ..FitOptions::default()
    }
}

#[test]
fn rul_features_are_deterministic_and_constant_in_size() {
    let runs = synthetic(2, 7);
    let mut a = RulFeatures::new();
    let mut b = RulFeatures::new();
    let size = std::mem::size_of::<RulFeatures>();
    let mut early = String::new();
    for (c, values) in runs[0].readings.iter().enumerate() {
        a.push(values).unwrap();
        b.push(values).unwrap();
        if c == 10 {
            early = toml::to_string(&a).unwrap();
        }
    }
    assert_eq!(a, b, "same readings, same state");
    assert_eq!(a.cycles(), runs[0].readings.len() as u64);
    // Fixed-size arrays only: nothing grows with the cycles seen.
    assert_eq!(std::mem::size_of_val(&a), size);
    assert!(size < 2048, "state is {size} bytes");
    // The serialized state (what the snapshot holds) does not grow either, beyond the
    // digits of the numbers.
    let late = toml::to_string(&a).unwrap();
    assert!(
        late.len() < early.len() + 200,
        "{} vs {}",
        late.len(),
        early.len()
    );
    // And it round-trips.
    let back: RulFeatures = toml::from_str(&late).unwrap();
    assert_eq!(back, a);
}

#[test]
fn rul_features_take_all_channels_or_the_informative_sensors() {
    let runs = synthetic(1, 3);
    let mut all = RulFeatures::new();
    let mut informative = RulFeatures::new();
    for values in &runs[0].readings {
        all.push(values).unwrap();
        let only: Vec<f64> = INFORMATIVE.iter().map(|&c| values[c]).collect();
        informative.push(&only).unwrap();
    }
    assert_eq!(all, informative);
}

#[test]
fn rul_bad_input_is_refused_without_touching_state() {
    let runs = synthetic(1, 5);
    let mut f = RulFeatures::new();
    for values in &runs[0].readings[..20] {
        f.push(values).unwrap();
    }
    let before = f.clone();
    let mut nan = runs[0].readings[20].clone();
    nan[INFORMATIVE[3]] = f64::NAN;
    let err = f.push(&nan).unwrap_err();
    assert!(err.to_string().contains("s7 is NaN"), "{err}");
    // A non-finite value in a channel the model ignores is refused too.
    let mut inf = runs[0].readings[20].clone();
    inf[0] = f64::INFINITY;
    assert!(f.push(&inf).unwrap_err().to_string().contains("setting1"));
    let err = f.push(&runs[0].readings[20][..23]).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { reason, .. } if reason.contains("got 23")),
        "{err}"
    );
    assert!(f.push(&[]).is_err());
    assert_eq!(f, before, "refused readings leave the state as it was");
}

#[test]
fn rul_fit_recovers_remaining_life_on_synthetic_engines() {
    let runs = synthetic(40, 11);
    let options = small_options();
    let model = fit(&runs, &options).unwrap();
    // Unseen engines from the same process.
    let test = synthetic(20, 99);
    let mut errors = Vec::new();
    for run in &test {
        let len = run.readings.len();
        for keep in [len - 100, len - 60, len - 20, len - 1] {
            let p = predict_run(&model, &run.readings[..keep]).unwrap();
            let truth = ((len - keep) as f64).min(options.cap);
            errors.push(p - truth);
        }
    }
    let rmse = rmse(&errors);
    assert!(rmse < 15.0, "held-out rmse {rmse} on synthetic engines");
    // And near failure it knows the engine is nearly done.
    let run = &test[0];
    let p = predict_run(&model, &run.readings[..run.readings.len() - 5]).unwrap();
    assert!(p < 30.0, "5 cycles before failure it says {p}");
}

#[test]
fn rul_fit_is_deterministic() {
    let runs = synthetic(10, 2);
    let a = fit(&runs, &small_options()).unwrap();
    let b = fit(&runs, &small_options()).unwrap();
    assert_eq!(a, b);
    let c = fit(
        &runs,
        &FitOptions {
            seed: 2,
            ..small_options()
        },
    )
    .unwrap();
    assert_ne!(a, c, "the seed matters");
}

#[test]
fn rul_model_round_trips_through_toml() {
    let runs = synthetic(10, 4);
    let model = fit(&runs, &small_options()).unwrap();
    let text = model.to_toml();
    let back = RulModel::from_toml(&text).unwrap();
    assert_eq!(back, model, "bit-for-bit");
    assert!(text.contains("split_thresholds = [\n"), "{}", &text[..200]);
    assert!(text.lines().all(|l| l.len() <= 100), "wrapped");
    // The same table as serde writes it.
    let plain: RulModel = toml::from_str(&toml::to_string(&model).unwrap()).unwrap();
    assert_eq!(plain, model);
    // It is a plain table, so it embeds under any key of a larger document.
    let doc = format!("[turbofan.rul.params]\n{text}");
    let table: toml::Table = toml::from_str(&doc).unwrap();
    let embedded: RulModel = table["turbofan"]["rul"]["params"]
        .clone()
        .try_into()
        .unwrap();
    assert_eq!(embedded, model);
    assert!(
        model.parameter_count() < 5_000,
        "{}",
        model.parameter_count()
    );
}

#[test]
fn rul_params_that_do_not_hold_together_are_refused() {
    let model = fit(&synthetic(5, 1), &small_options()).unwrap();
    let mut p = model.params().clone();
    p.leaves.pop();
    assert!(
        RulModel::from_params(p)
            .unwrap_err()
            .to_string()
            .contains("leaves")
    );
    let mut p = model.params().clone();
    p.split_features[0] = FEATURES as u32;
    assert!(
        RulModel::from_params(p)
            .unwrap_err()
            .to_string()
            .contains("out of range")
    );
    let mut p = model.params().clone();
    p.feature_version += 1;
    assert!(RulModel::from_params(p).is_err());
    let mut p = model.params().clone();
    p.std[2] = 0.0;
    assert!(RulModel::from_params(p).is_err());
    let text = model.to_toml().replace("cap = 125.0", "cap = nan");
    assert!(RulModel::from_toml(&text).is_err());
    assert!(RulModel::from_toml("cap = 125.0").is_err());
}

#[test]
fn rul_predictions_are_finite_and_within_the_cap() {
    let runs = synthetic(10, 8);
    let model = fit(&runs, &small_options()).unwrap();
    assert_eq!(
        model.predict(&RulFeatures::new()),
        model.cap(),
        "new engine"
    );
    // Far outside anything seen in training, in both directions.
    for scale in [-1e6, -1.0, 0.0, 1.0, 1e6] {
        let mut f = RulFeatures::new();
        for c in 0..300 {
            let values: Vec<f64> = (0..CHANNELS).map(|ch| scale * (c * ch) as f64).collect();
            f.push(&values).unwrap();
            let p = model.predict(&f);
            assert!(p.is_finite() && (0.0..=model.cap()).contains(&p), "{p}");
        }
    }
}

#[test]
fn rul_cross_validation_scores_held_out_engines() {
    let runs = synthetic(15, 21);
    let v = cross_validate(&runs, &small_options(), 3, 5).unwrap();
    assert_eq!(v.holdouts.len(), 15);
    assert!(
        v.holdouts
            .iter()
            .all(|h| h.cycles_seen >= 1 && h.true_rul >= 0.0)
    );
    let errors: Vec<f64> = v
        .holdouts
        .iter()
        .map(|h| h.predicted - h.true_rul)
        .collect();
    assert_eq!(v.rmse, rmse(&errors));
    assert!(v.rmse < 40.0, "{}", v.rmse);
    assert!(cross_validate(&runs, &small_options(), 1, 5).is_err());
}

#[test]
fn rul_scores_match_their_definitions() {
    assert_eq!(rmse(&[3.0, -4.0]), (12.5f64).sqrt());
    let s = phm08_score(&[-13.0, 10.0, 0.0]);
    assert!((s - ((1f64.exp() - 1.0) * 2.0)).abs() < 1e-12, "{s}");
}
