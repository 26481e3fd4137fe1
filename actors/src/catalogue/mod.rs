//! The device model catalogue: configuration, not code.
//!
//! A service team adds a product by writing one TOML file per device model; the deciding
//! code (twins, policies) reads it as immutable data. This module parses TOML *text* (the
//! caller reads the files, this crate does no I/O), validates it, and precomputes the
//! indexes the twins use on hot paths, so every lookup is O(1).
//!
//! # A model file
//! ```toml
//! id = "coffee.barista-200"          # unique across the catalogue
//! name = "Barista 200"
//! category = "coffee_machine"
//! commands = ["descale", "restart"]  # what remote_command and local_actions may send
//!
//! [[signals]]
//! name = "brew_pressure"
//! unit = "bar"
//! normal = { min = 8.5, max = 10.0 }
//! failure = { threshold = 7.5, direction = "falling" }   # beyond normal, optional
//! scope = "diagnostics"                                   # or "usage_analytics"
//! detector = { persistence = 5 }     # ewma_alpha, anomaly_z, drift_sensitivity, persistence
//!
//! [[signals]]
//! name = "water_through"
//! unit = "l"
//! scope = "usage_analytics"
//! cumulative = true                  # a counter; needs no normal range
//!
//! [[parts]]
//! number = "DESC-250"
//! name = "Descaler, 250 ml"
//! lead_time = "2d"                   # durations: <integer><s|m|h|d>
//! price = { amount = 12.90, currency = "EUR" }
//!
//! [[consumables]]
//! name = "descaler"
//! capacity = 60                      # in the gauge signal's unit
//! usage_signal = "water_through"     # a cumulative counter (or level_signal = a level)
//! reorder_at = { fraction = 0.2 }    # or { remaining = 10 }
//! part = "DESC-250"
//! auto_order = true
//!
//! [[failure_modes]]
//! id = "scale"
//! name = "Limescale build-up"
//! severity = "normal"                # low, normal, high, safety
//! indicators = [{ signal = "brew_pressure", insights = ["drift", "forecast"] }]
//! playbook = [
//!   { do = "remote_command", command = "descale", wait = "6h" },
//!   { do = "order_consumable", consumable = "descaler", when = "standing_approval" },
//!   { do = "handoff", reason = "descaling did not help", when = "remedy_failed" },
//! ]
//! ```
//! Further sections: `[[diagnostic_codes]]` (code → failure mode), `[[questions]]`
//! (questions the product asks → failure mode), `[[alarms]]` (kind → safety failure mode
//! and the edge's offline `local_actions`) and `[rul]` (remaining useful life). The files
//! shipped with CareTwin live in `actors/catalogue/` and load with [`Catalogue::builtin`].
//!
//! # What validation enforces
//! Every problem is reported at once, each as `source: model "id": entry: field problem`.
//! - No unknown keys anywhere; ids, names, codes and part numbers are unique and made of
//!   letters, digits, `.`, `_`, `-`; every number is finite (no `nan`, no `inf`).
//! - `normal.min < normal.max`; a failure threshold lies beyond the normal range in its
//!   direction; readings fall under `diagnostics` or `usage_analytics`; counters
//!   (`cumulative`) have no threshold and indicate no failure mode directly.
//! - Durations are positive; confidences and fractions lie in `0..=1`; detector tuning is
//!   in range.
//! - Every reference resolves: signals, parts, consumables, commands, failure modes,
//!   relayed questions; a `usage_signal` is a counter, a `level_signal` is not.
//! - Playbooks: see [`playbook`]. Safety modes notify at priority `safety` and hand off,
//!   unconditionally; only they may notify at priority `safety`. Alarms point to safety
//!   modes and name at least one local action.
//! - Every failure mode is indicated by something, and at most one mode claims a given
//!   (signal, insight kind), so an insight names a single root cause.
//!
//! # Layout
//! - [`types`] — the validated entries: signals, consumables, parts, failure modes…
//! - [`playbook`] — playbook steps, their conditions, and how a playbook runs.
//! - [`duration`] — the strict duration parser (`"6h"`).
//! - `error` — [`CatalogueError`]: every problem found, each naming source, model and field.
//! - `raw`, `validate` — the TOML shape and its validation (private).

mod error;
mod raw;
mod validate;

pub mod duration;
pub mod playbook;
pub mod types;

use std::collections::HashMap;

pub use duration::{DurationError, parse_duration_ms};
pub use error::{CatalogueError, Problem};
pub use playbook::{Action, ArgValue, Condition, Facts, Remedy, Reply, Step};
pub use types::{
    Alarm, Consumable, DetectorTuning, DiagnosticCode, FailureMode, FailureThreshold, Gauge,
    NormalRange, Part, Price, Question, ReorderPoint, RulSpec, Signal, SignalIndicator,
};

use crate::model::InsightKind;

/// The catalogue files shipped with CareTwin, as `(source name, TOML text)`.
const BUILTIN: &[(&str, &str)] = &[
    (
        "coffee-barista-200.toml",
        include_str!("../../catalogue/coffee-barista-200.toml"),
    ),
    (
        "boiler-combi-30.toml",
        include_str!("../../catalogue/boiler-combi-30.toml"),
    ),
    (
        "fridge-coolline-350.toml",
        include_str!("../../catalogue/fridge-coolline-350.toml"),
    ),
    (
        "alarm-hub-guardian.toml",
        include_str!("../../catalogue/alarm-hub-guardian.toml"),
    ),
    (
        "turbofan-cmapss-fd001.toml",
        include_str!("../../catalogue/turbofan-cmapss-fd001.toml"),
    ),
    (
        "retail-freezer-rf700.toml",
        include_str!("../../catalogue/retail-freezer-rf700.toml"),
    ),
    (
        "retail-hvac-rt12.toml",
        include_str!("../../catalogue/retail-hvac-rt12.toml"),
    ),
];

/// Every device model the system knows, validated and indexed. Immutable once built;
/// share it behind an `Arc`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Catalogue {
    models: Vec<DeviceModel>,
    by_id: HashMap<String, usize>,
}

impl Catalogue {
    /// Parses and validates one model file's text. Problems are reported against the
    /// source name `catalogue`; use [`Catalogue::from_sources`] to name the file.
    pub fn from_toml(text: &str) -> Result<Self, CatalogueError> {
        Self::from_sources(&[("catalogue", text)])
    }

    /// Parses and validates several model files, given as `(source name, TOML text)`,
    /// one model per file. Reports every problem in every source, then refuses the lot;
    /// model ids must be unique across sources.
    pub fn from_sources(sources: &[(&str, &str)]) -> Result<Self, CatalogueError> {
        let mut problems = Vec::new();
        let mut models = Vec::with_capacity(sources.len());
        for (source, text) in sources {
            match validate::parse_model(source, text) {
                Ok(model) => models.push(model),
                Err(mut found) => problems.append(&mut found),
            }
        }
        let catalogue = Self::index(models, &mut problems);
        if problems.is_empty() {
            Ok(catalogue)
        } else {
            Err(CatalogueError::new(problems))
        }
    }

    /// Joins two catalogues; refuses a model id that both hold.
    pub fn merge(self, other: Catalogue) -> Result<Self, CatalogueError> {
        let mut problems = Vec::new();
        let mut models = self.models;
        models.extend(other.models);
        let catalogue = Self::index(models, &mut problems);
        if problems.is_empty() {
            Ok(catalogue)
        } else {
            Err(CatalogueError::new(problems))
        }
    }

    /// The catalogue shipped with CareTwin (`actors/catalogue/*.toml`, compiled in).
    ///
    /// Parses and validates on every call: call it once and share the result.
    ///
    /// # Panics
    /// If a shipped file is invalid, which `builtin_catalogue_is_valid` guards against.
    pub fn builtin() -> Self {
        match Self::from_sources(BUILTIN) {
            Ok(catalogue) => catalogue,
            Err(e) => panic!("the built-in catalogue is invalid:\n{e}"),
        }
    }

    /// The shipped catalogue files as `(source name, TOML text)`, e.g. to merge with a
    /// site's own files or to write out as examples.
    pub fn builtin_sources() -> &'static [(&'static str, &'static str)] {
        BUILTIN
    }

    /// The model with this id.
    pub fn model(&self, id: &str) -> Option<&DeviceModel> {
        self.by_id.get(id).map(|&i| &self.models[i])
    }

    /// Every model, in the order the sources were given.
    pub fn models(&self) -> &[DeviceModel] {
        &self.models
    }

    /// How many models.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    /// True when the catalogue holds no model.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    fn index(models: Vec<DeviceModel>, problems: &mut Vec<Problem>) -> Self {
        let mut by_id = HashMap::with_capacity(models.len());
        for (i, model) in models.iter().enumerate() {
            if let Some(&first) = by_id.get(&model.id) {
                let first: &DeviceModel = &models[first];
                problems.push(Problem {
                    source: model.source.clone(),
                    model: Some(model.id.clone()),
                    path: "id".into(),
                    message: format!("is already defined in {}", first.source),
                });
            } else {
                by_id.insert(model.id.clone(), i);
            }
        }
        Self { models, by_id }
    }
}

/// One device model: its signals, consumables, parts, failure modes with their playbooks,
/// diagnostic codes, product questions, alarms and, optionally, remaining useful life.
///
/// Built only by validation; lookups by name go through indexes computed at load.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceModel {
    id: String,
    name: String,
    category: String,
    description: Option<String>,
    source: String,
    commands: Vec<String>,
    signals: Vec<Signal>,
    consumables: Vec<Consumable>,
    parts: Vec<Part>,
    failure_modes: Vec<FailureMode>,
    diagnostic_codes: Vec<DiagnosticCode>,
    questions: Vec<Question>,
    alarms: Vec<Alarm>,
    rul: Option<RulSpec>,
    index: ModelIndex,
}

/// Lookups computed once at load. Entry → index into the model's vectors; for codes,
/// questions and alarms also the index of the failure mode they point to.
#[derive(Debug, Clone, Default, PartialEq)]
struct ModelIndex {
    commands: HashMap<String, usize>,
    signals: HashMap<String, usize>,
    consumables: HashMap<String, usize>,
    parts: HashMap<String, usize>,
    failure_modes: HashMap<String, usize>,
    codes: HashMap<String, (usize, usize)>,
    questions: HashMap<String, (usize, usize)>,
    alarms: HashMap<String, (usize, usize)>,
    /// Per signal, per insight slot (see [`insight_slot`]), the mode it indicates.
    signal_modes: Vec<[Option<usize>; 4]>,
    /// Per signal, the consumables it gauges.
    gauged: Vec<Vec<usize>>,
    rul_mode: Option<usize>,
}

/// The insight kinds a signal can raise, and their slot in `ModelIndex::signal_modes`.
fn insight_slot(kind: InsightKind) -> Option<usize> {
    match kind {
        InsightKind::Anomaly => Some(0),
        InsightKind::Drift => Some(1),
        InsightKind::Forecast => Some(2),
        InsightKind::FailureNow => Some(3),
        InsightKind::ConsumableLow
        | InsightKind::RemainingLife
        | InsightKind::Alarm
        | InsightKind::Diagnostic => None,
    }
}

impl DeviceModel {
    /// The model id (`coffee.barista-200`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Name for people.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Product category (`coffee_machine`, `boiler`).
    pub fn category(&self) -> &str {
        &self.category
    }

    /// Longer description, if the entry has one.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// The source (file name) the model was loaded from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Commands the device accepts (remote commands and the edge's local actions).
    pub fn commands(&self) -> &[String] {
        &self.commands
    }

    /// True when the device accepts this command.
    pub fn has_command(&self, command: &str) -> bool {
        self.index.commands.contains_key(command)
    }

    /// Every signal; a signal's index is its position here.
    pub fn signals(&self) -> &[Signal] {
        &self.signals
    }

    /// The index of the signal with this name.
    pub fn signal_index(&self, name: &str) -> Option<usize> {
        self.index.signals.get(name).copied()
    }

    /// The signal with this name.
    pub fn signal(&self, name: &str) -> Option<&Signal> {
        self.signal_index(name).map(|i| &self.signals[i])
    }

    /// Every consumable; a consumable's index is its position here.
    pub fn consumables(&self) -> &[Consumable] {
        &self.consumables
    }

    /// The consumable with this name.
    pub fn consumable(&self, name: &str) -> Option<&Consumable> {
        self.consumable_index(name).map(|i| &self.consumables[i])
    }

    /// The index of the consumable with this name.
    pub fn consumable_index(&self, name: &str) -> Option<usize> {
        self.index.consumables.get(name).copied()
    }

    /// Indexes of the consumables the signal at `signal_index` gauges (empty when none,
    /// or when the index is out of range): what a reading of it updates.
    pub fn consumables_gauged_by(&self, signal_index: usize) -> &[usize] {
        self.index
            .gauged
            .get(signal_index)
            .map_or(&[], Vec::as_slice)
    }

    /// Every part.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// The part with this number.
    pub fn part(&self, number: &str) -> Option<&Part> {
        self.index.parts.get(number).map(|&i| &self.parts[i])
    }

    /// Every failure mode; a mode's index is its position here.
    pub fn failure_modes(&self) -> &[FailureMode] {
        &self.failure_modes
    }

    /// The failure mode with this id.
    pub fn failure_mode(&self, id: &str) -> Option<&FailureMode> {
        self.failure_mode_index(id).map(|i| &self.failure_modes[i])
    }

    /// The index of the failure mode with this id.
    pub fn failure_mode_index(&self, id: &str) -> Option<usize> {
        self.index.failure_modes.get(id).copied()
    }

    /// The failure mode an insight of `kind` on the signal at `signal_index` indicates.
    /// At most one: validation refuses two modes claiming the same signal and kind.
    pub fn mode_for_insight(&self, signal_index: usize, kind: InsightKind) -> Option<&FailureMode> {
        let slot = insight_slot(kind)?;
        let mode = self.index.signal_modes.get(signal_index)?[slot]?;
        Some(&self.failure_modes[mode])
    }

    /// Every diagnostic code.
    pub fn diagnostic_codes(&self) -> &[DiagnosticCode] {
        &self.diagnostic_codes
    }

    /// The diagnostic code entry for `code`.
    pub fn diagnostic_code(&self, code: &str) -> Option<&DiagnosticCode> {
        self.index
            .codes
            .get(code)
            .map(|&(i, _)| &self.diagnostic_codes[i])
    }

    /// The failure mode a diagnostic code means.
    pub fn mode_for_code(&self, code: &str) -> Option<&FailureMode> {
        self.index
            .codes
            .get(code)
            .map(|&(_, m)| &self.failure_modes[m])
    }

    /// Every question the product may ask.
    pub fn questions(&self) -> &[Question] {
        &self.questions
    }

    /// The product question with this id.
    pub fn question(&self, id: &str) -> Option<&Question> {
        self.index
            .questions
            .get(id)
            .map(|&(i, _)| &self.questions[i])
    }

    /// The failure mode a product question is about.
    pub fn mode_for_question(&self, id: &str) -> Option<&FailureMode> {
        self.index
            .questions
            .get(id)
            .map(|&(_, m)| &self.failure_modes[m])
    }

    /// Every alarm the device can raise.
    pub fn alarms(&self) -> &[Alarm] {
        &self.alarms
    }

    /// The alarm entry for `kind` (with its local actions).
    pub fn alarm(&self, kind: &str) -> Option<&Alarm> {
        self.index.alarms.get(kind).map(|&(i, _)| &self.alarms[i])
    }

    /// The safety failure mode an alarm kind means.
    pub fn mode_for_alarm(&self, kind: &str) -> Option<&FailureMode> {
        self.index
            .alarms
            .get(kind)
            .map(|&(_, m)| &self.failure_modes[m])
    }

    /// The remaining-useful-life section, for models that define one.
    pub fn rul(&self) -> Option<&RulSpec> {
        self.rul.as_ref()
    }

    /// The failure mode the remaining useful life runs towards.
    pub fn mode_for_rul(&self) -> Option<&FailureMode> {
        self.index.rul_mode.map(|m| &self.failure_modes[m])
    }
}

#[cfg(test)]
mod tests;
