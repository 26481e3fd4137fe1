//! The streaming feature extractor: constant memory, fed once per cycle.

use super::{CHANNELS, INFORMATIVE, SENSOR_NAMES, SENSORS};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Forgetting factors of the exponentially weighted least-squares fits, one per time
/// scale (effective windows of about 5, 10, 20 and 50 cycles).
///
/// Part of the feature definition: changing them changes what a fitted model sees, so
/// it bumps [`FEATURE_VERSION`].
pub const LAMBDAS: [f64; SCALES] = [0.8, 0.9, 0.95, 0.98];

/// How many time scales [`LAMBDAS`] holds.
pub const SCALES: usize = 4;

/// Cycles averaged into an engine's baseline (its own healthy level).
pub const BASELINE_CYCLES: u64 = 20;

/// Version of the feature definition; a model fitted for another version is refused.
pub const FEATURE_VERSION: u32 = 1;

/// One engine's streaming state: for each informative sensor and each time scale, an
/// exponentially weighted least-squares line through its recent readings (its level and
/// slope now), plus the engine's baseline and the number of cycles seen.
///
/// Fixed-size arrays only: memory is constant however long the engine runs, and feeding a
/// cycle allocates nothing. Independent of any fitted model (the model normalises and
/// projects at prediction time), so a twin keeps it in its snapshot and may change model
/// without losing history.
///
/// The fits work on the age `k` of each reading (0 for the newest), so the sums stay
/// bounded: with weight `λ^k`, a new reading ages every earlier one by one cycle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RulFeatures {
    /// Cycles fed so far.
    cycles: u64,
    /// First reading of each sensor: the origin the sums are taken from, which keeps them
    /// small (s9 sits near 9,050 and moves by tenths).
    origin: [f64; SENSORS],
    /// Per time scale: Σλ^k, Σλ^k·k, Σλ^k·k².
    w0: [f64; SCALES],
    wk: [f64; SCALES],
    wkk: [f64; SCALES],
    /// Per sensor and time scale: Σλ^k·y and Σλ^k·k·y, with y relative to `origin`.
    sy: [[f64; SCALES]; SENSORS],
    sky: [[f64; SCALES]; SENSORS],
    /// Per sensor: sum of the first [`BASELINE_CYCLES`] readings relative to `origin`.
    baseline_sum: [f64; SENSORS],
}

impl Default for RulFeatures {
    fn default() -> Self {
        Self::new()
    }
}

impl RulFeatures {
    /// A fresh engine: nothing seen yet.
    pub fn new() -> Self {
        Self {
            cycles: 0,
            origin: [0.0; SENSORS],
            w0: [0.0; SCALES],
            wk: [0.0; SCALES],
            wkk: [0.0; SCALES],
            sy: [[0.0; SCALES]; SENSORS],
            sky: [[0.0; SCALES]; SENSORS],
            baseline_sum: [0.0; SENSORS],
        }
    }

    /// Cycles fed so far.
    pub fn cycles(&self) -> u64 {
        self.cycles
    }

    /// Feeds one cycle: either all [`CHANNELS`] values in C-MAPSS order (setting1..3,
    /// s1..s21) or only the [`SENSORS`] informative ones in [`SENSOR_NAMES`] order.
    ///
    /// Refuses a wrong number of values, or a value that is NaN or infinite, with
    /// [`Error::InvalidArgument`] and the state untouched.
    pub fn push(&mut self, values: &[f64]) -> Result<()> {
        let y = select(values)?;
        if self.cycles == 0 {
            self.origin = y;
        }
        for (j, &l) in LAMBDAS.iter().enumerate() {
            // Every earlier reading ages by one: k → k + 1, then the new one enters at 0.
            self.wkk[j] = l * (self.wkk[j] + 2.0 * self.wk[j] + self.w0[j]);
            self.wk[j] = l * (self.wk[j] + self.w0[j]);
            self.w0[j] = l * self.w0[j] + 1.0;
        }
        for (s, &value) in y.iter().enumerate() {
            let d = value - self.origin[s];
            for (j, &l) in LAMBDAS.iter().enumerate() {
                self.sky[s][j] = l * (self.sky[s][j] + self.sy[s][j]);
                self.sy[s][j] = l * self.sy[s][j] + d;
            }
            if self.cycles < BASELINE_CYCLES {
                self.baseline_sum[s] += d;
            }
        }
        self.cycles += 1;
        Ok(())
    }

    /// Sensor `s`'s fitted line at time scale `j`, in raw units: (level now, slope per
    /// cycle). Flat (slope 0, level the weighted mean) until two cycles are seen.
    pub(crate) fn line(&self, s: usize, j: usize) -> (f64, f64) {
        let w0 = self.w0[j];
        if w0 <= 0.0 {
            return (self.origin[s], 0.0);
        }
        let mean_k = self.wk[j] / w0;
        let mean_y = self.sy[s][j] / w0;
        let var_k = self.wkk[j] / w0 - mean_k * mean_k;
        // Slope against age; a reading's age runs backwards in time, hence the sign.
        let slope_age = if var_k > 1e-9 {
            (self.sky[s][j] / w0 - mean_k * mean_y) / var_k
        } else {
            0.0
        };
        let level = mean_y - slope_age * mean_k;
        (self.origin[s] + level, -slope_age)
    }

    /// Sensor `s`'s exponentially weighted mean at time scale `j`, in raw units.
    pub(crate) fn mean(&self, s: usize, j: usize) -> f64 {
        let w0 = self.w0[j];
        if w0 <= 0.0 {
            return self.origin[s];
        }
        self.origin[s] + self.sy[s][j] / w0
    }

    /// Sensor `s`'s baseline: the mean of its first [`BASELINE_CYCLES`] readings (of those
    /// seen so far, while fewer).
    pub(crate) fn baseline(&self, s: usize) -> f64 {
        let n = self.cycles.min(BASELINE_CYCLES);
        if n == 0 {
            return self.origin[s];
        }
        self.origin[s] + self.baseline_sum[s] / n as f64
    }
}

/// Picks the informative sensors out of a cycle's values, checking count and finiteness.
pub(crate) fn select(values: &[f64]) -> Result<[f64; SENSORS]> {
    let mut y = [0.0; SENSORS];
    match values.len() {
        CHANNELS => {
            for (slot, &c) in y.iter_mut().zip(INFORMATIVE.iter()) {
                *slot = values[c];
            }
        }
        SENSORS => y.copy_from_slice(values),
        n => {
            return Err(Error::InvalidArgument {
                name: "values",
                reason: format!(
                    "expected {CHANNELS} channel values (setting1..3, s1..s21) or the \
                     {SENSORS} informative sensors, got {n}"
                ),
            });
        }
    }
    // Every channel is checked, not only the informative ones: a NaN anywhere says the
    // row is broken.
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        let name = if values.len() == CHANNELS {
            channel_name(i)
        } else {
            SENSOR_NAMES[i].to_owned()
        };
        return Err(Error::InvalidArgument {
            name: "values",
            reason: format!("{name} is {}, not a finite number", values[i]),
        });
    }
    Ok(y)
}

/// `setting1`..`setting3`, `s1`..`s21` for a channel index in C-MAPSS order.
pub fn channel_name(i: usize) -> String {
    if i < 3 {
        format!("setting{}", i + 1)
    } else {
        format!("s{}", i - 2)
    }
}
