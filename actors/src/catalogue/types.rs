//! The validated entries of a device model: signals, consumables, parts, failure modes,
//! diagnostic codes, product questions, alarms and the remaining-useful-life section.
//!
//! Every value here has passed validation: names resolve, numbers are finite, durations
//! are positive milliseconds. Fields are public for reading; a model is only ever handed
//! out by shared reference, so they cannot be changed behind its indexes.

use serde::{Deserialize, Serialize};

use super::playbook::Step;
use crate::model::{ConsentScope, Direction, InsightKind, Priority};

/// A measured quantity a device reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Signal {
    /// Name, unique within the model (`brew_pressure`, `s11`).
    pub name: String,
    /// Unit of the readings (`bar`, `°C`, `l`, `psia`, `-` for a ratio).
    pub unit: String,
    /// What the signal measures, for people reading a case.
    pub description: Option<String>,
    /// Where a healthy device's readings lie. `None` only for cumulative counters.
    pub normal: Option<NormalRange>,
    /// Where the device fails, if it fails on this signal; lies beyond `normal` in its
    /// direction.
    pub failure: Option<FailureThreshold>,
    /// The consent scope the readings fall under: `Diagnostics` or `UsageAnalytics`.
    pub scope: ConsentScope,
    /// Tuning of the streaming detectors for this signal (defaults filled in).
    pub detector: DetectorTuning,
    /// A counter that only grows (cups brewed, litres through a filter): usage, not level.
    pub cumulative: bool,
}

/// The closed range `min..=max` a healthy device's readings lie in (`min < max`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NormalRange {
    /// Lowest normal value.
    pub min: f64,
    /// Highest normal value.
    pub max: f64,
}

impl NormalRange {
    /// True when `value` lies in `min..=max`.
    pub fn contains(&self, value: f64) -> bool {
        (self.min..=self.max).contains(&value)
    }
}

/// The value at which a signal means failure, and which way it goes bad.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureThreshold {
    /// The failure value, in the signal's unit.
    pub threshold: f64,
    /// Failure when the value rises to the threshold, or falls to it.
    pub direction: Direction,
}

impl FailureThreshold {
    /// True when `value` is at or past the threshold in its direction.
    pub fn crossed(&self, value: f64) -> bool {
        self.direction.crossed(value, self.threshold)
    }
}

/// Tuning of a signal's streaming detectors. Every field has a default, so a catalogue
/// entry names only what it changes: `detector = { persistence = 5 }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectorTuning {
    /// Weight of the newest reading in the exponentially weighted mean and variance,
    /// in `(0, 1]`; smaller follows the level more slowly.
    pub ewma_alpha: f64,
    /// A reading this many standard deviations from the weighted mean is an anomaly (> 0).
    pub anomaly_z: f64,
    /// The smallest sustained shift of the level, in standard deviations, that counts as
    /// drift (> 0); smaller is more sensitive.
    pub drift_sensitivity: f64,
    /// Consecutive readings a condition must hold before an insight is raised, and must
    /// be absent before it is withdrawn (hysteresis, ≥ 1).
    pub persistence: u32,
}

/// Default [`DetectorTuning::ewma_alpha`].
pub const fn default_ewma_alpha() -> f64 {
    0.1
}
/// Default [`DetectorTuning::anomaly_z`].
pub const fn default_anomaly_z() -> f64 {
    4.0
}
/// Default [`DetectorTuning::drift_sensitivity`].
pub const fn default_drift_sensitivity() -> f64 {
    1.0
}
/// Default [`DetectorTuning::persistence`].
pub const fn default_persistence() -> u32 {
    3
}

impl Default for DetectorTuning {
    fn default() -> Self {
        Self {
            ewma_alpha: default_ewma_alpha(),
            anomaly_z: default_anomaly_z(),
            drift_sensitivity: default_drift_sensitivity(),
            persistence: default_persistence(),
        }
    }
}

/// Something the device uses up and the customer re-orders (descaler, filter, battery).
#[derive(Debug, Clone, PartialEq)]
pub struct Consumable {
    /// Name, unique within the model (`descaler`).
    pub name: String,
    /// How much one unit lasts, in the gauge signal's unit (litres of water, percent).
    pub capacity: f64,
    /// How the amount left is read.
    pub gauge: Gauge,
    /// The gauge signal's name.
    pub signal: String,
    /// The gauge signal's index in [`super::DeviceModel::signals`].
    pub signal_index: usize,
    /// When to re-order.
    pub reorder_at: ReorderPoint,
    /// The part number to order (one of the model's parts).
    pub part: String,
    /// Whether it may be ordered without a person at all. Whether a given customer has a
    /// standing approval is theirs to say, not the catalogue's.
    pub auto_order: bool,
}

impl Consumable {
    /// The amount left, in the gauge's unit, at or below which to re-order.
    pub fn reorder_level(&self) -> f64 {
        match self.reorder_at {
            ReorderPoint::Fraction(f) => f * self.capacity,
            ReorderPoint::Remaining(r) => r,
        }
    }
}

/// How a consumable's amount left is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gauge {
    /// From a cumulative counter: left = capacity − (counter − counter at refill).
    Usage,
    /// From a level signal that reads the amount left directly (battery percent).
    Level,
}

/// When to re-order a consumable. In TOML `{ fraction = 0.2 }` or `{ remaining = 10 }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReorderPoint {
    /// When this fraction of the capacity is left, in `0..=1`.
    Fraction(f64),
    /// When this much is left, in the gauge's unit, below the capacity.
    Remaining(f64),
}

/// A spare part or consumable that can be ordered.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    /// Part number, unique within the model (`PUMP-12`).
    pub number: String,
    /// What it is.
    pub name: String,
    /// Usual time from order to delivery, in milliseconds.
    pub lead_time_ms: u64,
    /// List price, if known.
    pub price: Option<Price>,
}

/// A price in a currency's minor units, so no float rounding reaches an order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Price {
    /// Hundredths of the currency unit (cents): TOML `amount = 89.90` is 8990.
    pub minor_units: u64,
    /// ISO 4217 code, three capital letters (`EUR`).
    pub currency: String,
}

/// A way the device fails, what points to it, and what to do about it.
#[derive(Debug, Clone, PartialEq)]
pub struct FailureMode {
    /// Id, unique within the model (`scale`, `pressure-loss`).
    pub id: String,
    /// Name for people.
    pub name: String,
    /// How urgent a case of this mode is; `Priority::Safety` makes it a safety mode
    /// (smoke, CO, leak, break-in) that overrides quiet hours and budgets.
    pub severity: Priority,
    /// The technician skill a repair needs, if a technician may be needed.
    pub skill: Option<String>,
    /// Part numbers a repair needs (reserved with a work order).
    pub parts: Vec<String>,
    /// Which insights on which signals indicate this mode. Diagnostic codes, questions,
    /// alarms and the RUL section point to modes from their own entries.
    pub indicators: Vec<SignalIndicator>,
    /// What to do, in order. See [`super::playbook`] for how steps run.
    pub playbook: Vec<Step>,
}

impl FailureMode {
    /// True for safety modes (smoke, CO, leak, break-in…).
    pub fn is_safety(&self) -> bool {
        self.severity == Priority::Safety
    }
}

/// One signal that indicates a failure mode, and the insights on it that do.
#[derive(Debug, Clone, PartialEq)]
pub struct SignalIndicator {
    /// The signal's name.
    pub signal: String,
    /// The signal's index in [`super::DeviceModel::signals`].
    pub signal_index: usize,
    /// The insight kinds on it that indicate the mode: among `Anomaly`, `Drift`,
    /// `Forecast`, `FailureNow`.
    pub insights: Vec<InsightKind>,
}

/// A diagnostic code the device reports (boiler `F28`) and the failure mode it means.
#[derive(Debug, Clone, PartialEq)]
pub struct DiagnosticCode {
    /// The code as the device sends it, unique within the model.
    pub code: String,
    /// What it means.
    pub description: String,
    /// The failure mode's id.
    pub failure_mode: String,
    /// How sure the code makes that mode, in `0..=1`.
    pub confidence: f64,
}

/// A question the product itself asks (fridge "door seal check failed — is the door
/// closed?") and the failure mode it is about.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    /// Id as the device sends it (`door-seal-check`), unique within the model.
    pub id: String,
    /// The question, as put to the customer.
    pub text: String,
    /// The answers offered (at least two, distinct).
    pub options: Vec<String>,
    /// The failure mode's id.
    pub failure_mode: String,
    /// How sure the question makes that mode, in `0..=1`.
    pub confidence: f64,
}

/// An alarm the device can raise, its safety failure mode, and what the edge does at once.
#[derive(Debug, Clone, PartialEq)]
pub struct Alarm {
    /// Alarm kind as the device sends it (`smoke`, `co`, `leak`, `break_in`, `freeze`).
    pub kind: String,
    /// The failure mode's id; always a safety mode.
    pub failure_mode: String,
    /// Commands the edge sends to the device itself, at once and even when the site is
    /// offline (`siren_on`, `close_valve`); each is one of the model's commands.
    pub local_actions: Vec<String>,
}

/// Remaining useful life: for models that estimate how long the whole device has left.
#[derive(Debug, Clone, PartialEq)]
pub struct RulSpec {
    /// Unit of the estimate (`cycles`, `hours`).
    pub unit: String,
    /// The signals the estimator reads, in order.
    pub inputs: Vec<String>,
    /// Indexes of `inputs` in [`super::DeviceModel::signals`], in the same order.
    pub input_indices: Vec<usize>,
    /// Book maintenance when the estimate reaches this many units.
    pub maintenance_at: f64,
    /// The failure mode the device runs towards.
    pub failure_mode: String,
    /// The estimator's fitted parameters, opaque to the catalogue (every float in it is
    /// finite). `crate::rul` deserializes them into its own type with
    /// `params.clone().try_into()`. `None` until fitted.
    pub params: Option<toml::Value>,
}
