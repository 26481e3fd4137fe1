//! Remaining-useful-life estimation per reading: what a turbofan twin pays each cycle.
//!
//! `cargo bench -p caretwin-actors --bench rul` (`-- --quick` for a short run)
//!
//! Fits the default model on C-MAPSS train_FD001 (from `$CMAPSS_TRAIN`, else
//! `shared/data/cmapss/` beside the repository; a synthetic set when neither exists),
//! then replays every training engine cycle by cycle and times, per reading:
//! `RulFeatures::push` alone, `RulModel::predict` alone, and both. Five runs, median
//! run; prints the machine first.

use caretwin_actors::rul::{CHANNELS, FitOptions, RulFeatures, RulModel, TrainingRun, fit};
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    print_machine();
    let (source, runs) = load();
    let cycles: usize = runs.iter().map(|r| r.readings.len()).sum();
    let started = Instant::now();
    let model = fit(&runs, &FitOptions::default()).expect("fit");
    println!(
        "data: {source} ({} engines, {cycles} cycles); fit {:.2} s; model: {} trees of depth {}, {} numbers",
        runs.len(),
        started.elapsed().as_secs_f64(),
        model.trees(),
        model.params().depth,
        model.parameter_count()
    );
    let repeats = if quick { 3 } else { 20 };
    let runs_per_row = 5;
    println!("{repeats} passes over every cycle per run, {runs_per_row} runs, median run:");
    for what in [What::Push, What::Predict, What::Both] {
        let mut per_reading: Vec<f64> = (0..runs_per_row)
            .map(|_| time(&runs, &model, what, repeats) / (cycles * repeats) as f64)
            .collect();
        per_reading.sort_by(f64::total_cmp);
        let median = per_reading[per_reading.len() / 2];
        println!(
            "  {:<16} {:>8.3} µs per reading  ({:.0} readings/s on one core; runs {:.3}..{:.3} µs)",
            what.name(),
            median / 1e3,
            1e9 / median,
            per_reading[0] / 1e3,
            per_reading[per_reading.len() - 1] / 1e3
        );
    }
    println!(
        "  state per engine: {} bytes (RulFeatures, fixed)",
        std::mem::size_of::<RulFeatures>()
    );
}

#[derive(Clone, Copy)]
enum What {
    Push,
    Predict,
    Both,
}

impl What {
    fn name(self) -> &'static str {
        match self {
            What::Push => "push",
            What::Predict => "predict",
            What::Both => "push + predict",
        }
    }
}

/// Nanoseconds for `repeats` passes over every cycle of every run.
fn time(runs: &[TrainingRun], model: &RulModel, what: What, repeats: usize) -> f64 {
    // For `predict` alone, the states are prepared outside the clock.
    let states: Vec<Vec<RulFeatures>> = match what {
        What::Predict => runs
            .iter()
            .map(|r| {
                let mut f = RulFeatures::new();
                r.readings
                    .iter()
                    .map(|v| {
                        f.push(v).expect("valid reading");
                        f.clone()
                    })
                    .collect()
            })
            .collect(),
        _ => Vec::new(),
    };
    let started = Instant::now();
    let mut sink = 0.0;
    for _ in 0..repeats {
        match what {
            What::Predict => {
                for engine in &states {
                    for f in engine {
                        sink += model.predict(black_box(f));
                    }
                }
            }
            _ => {
                for run in runs {
                    let mut f = RulFeatures::new();
                    for v in &run.readings {
                        f.push(black_box(v)).expect("valid reading");
                        if matches!(what, What::Both) {
                            sink += model.predict(&f);
                        }
                    }
                    black_box(&f);
                }
            }
        }
    }
    black_box(sink);
    started.elapsed().as_nanos() as f64
}

fn print_machine() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "machine: {cpu}, {cores} cores, load average {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
}

/// train_FD001 when it can be found, else a synthetic run-to-failure set.
fn load() -> (String, Vec<TrainingRun>) {
    let path = std::env::var_os("CMAPSS_TRAIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/data/cmapss/train_FD001.txt")
        });
    match std::fs::read_to_string(&path) {
        Ok(text) => (path.display().to_string(), parse(&text)),
        Err(_) => ("synthetic".to_owned(), synthetic()),
    }
}

/// Just enough of the C-MAPSS format for a benchmark (the checked parser is
/// `caretwin_cluster::replay::parse_cmapss`).
fn parse(text: &str) -> Vec<TrainingRun> {
    let mut runs: Vec<TrainingRun> = Vec::new();
    for line in text.lines() {
        let f: Vec<f64> = line
            .split_ascii_whitespace()
            .map(|s| s.parse().expect("number"))
            .collect();
        if f.len() != 2 + CHANNELS {
            continue;
        }
        let unit = f[0] as u32;
        if runs.last().is_none_or(|r| r.unit != unit) {
            runs.push(TrainingRun {
                unit,
                readings: Vec::new(),
            });
        }
        if let Some(run) = runs.last_mut() {
            run.readings.push(f[2..].to_vec());
        }
    }
    runs
}

fn synthetic() -> Vec<TrainingRun> {
    let mut state = 42u64;
    let mut noise = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    (1..=100)
        .map(|unit| {
            let life = 128 + (unit * 53) % 230;
            let readings = (0..life)
                .map(|c| {
                    let wear = (c as f64 / life as f64).powi(3);
                    (0..CHANNELS)
                        .map(|ch| 100.0 + ch as f64 + 3.0 * wear * (ch % 3) as f64 + noise())
                        .collect()
                })
                .collect();
            TrainingRun { unit, readings }
        })
        .collect()
}
