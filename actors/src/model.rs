//! The domain's shared vocabulary: ids, directions, consent scopes, priorities, insights.
//!
//! Plain data, no behaviour beyond small helpers, so every module (catalogue, reasoning,
//! twins, policy, services) speaks the same types.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, on the clock the caller passes in (real or virtual).
pub type TimeMs = u64;

/// Milliseconds in an hour.
pub const HOUR_MS: u64 = 3_600_000;
/// Milliseconds in a day.
pub const DAY_MS: u64 = 24 * HOUR_MS;

/// Which way a signal goes bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Failure when the value rises to the threshold (temperature, heating time).
    Rising,
    /// Failure when the value falls to the threshold (pressure, flow).
    Falling,
}

impl Direction {
    /// True when `value` is at or past `threshold` in this direction.
    pub fn crossed(self, value: f64, threshold: f64) -> bool {
        match self {
            Direction::Rising => value >= threshold,
            Direction::Falling => value <= threshold,
        }
    }

    /// +1 for rising, −1 for falling: multiplies a slope so "towards failure" is positive.
    pub fn sign(self) -> f64 {
        match self {
            Direction::Rising => 1.0,
            Direction::Falling => -1.0,
        }
    }
}

/// What a customer may allow their data to be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentScope {
    /// Device health: diagnostics, failure prediction, repairs.
    Diagnostics,
    /// How the customer uses the product (cups a day, door openings): consumables,
    /// usage-based predictions.
    UsageAnalytics,
    /// Offers beyond service.
    Marketing,
    /// Being contacted at all (notifications, calls). Safety alarms are exempt.
    Contact,
}

/// How urgent something is.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Can wait.
    Low,
    /// The usual.
    #[default]
    Normal,
    /// Soon.
    High,
    /// Life or property at risk: overrides quiet hours and budgets.
    Safety,
}

/// What a twin concluded about a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InsightKind {
    /// A reading far outside what this signal usually does.
    Anomaly,
    /// A sustained shift in a signal's level.
    Drift,
    /// The signal's trend crosses its failure threshold in about `eta`.
    Forecast,
    /// A consumable runs out in about `eta`.
    ConsumableLow,
    /// The signal is past its failure threshold now.
    FailureNow,
    /// Remaining useful life of the whole device (models that define one).
    RemainingLife,
    /// A safety alarm (smoke, leak, break-in…) reported by the device.
    Alarm,
    /// A diagnostic code or question from the product that maps to a failure mode.
    Diagnostic,
}

/// An insight: what, about which signal, how sure, and by when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Insight {
    /// What kind of conclusion.
    pub kind: InsightKind,
    /// The signal, consumable or event code it is about.
    pub subject: String,
    /// The failure mode it points to, when the catalogue maps it to one.
    pub failure_mode: Option<String>,
    /// How sure, 0..=1.
    pub confidence: f64,
    /// When the predicted event happens (Unix ms), for forecasts and depletion.
    pub eta_ms: Option<TimeMs>,
    /// Early and late bounds of `eta_ms`.
    pub eta_band_ms: Option<(TimeMs, TimeMs)>,
    /// The value behind it (the reading, the level, the RUL in the model's unit).
    pub value: f64,
    /// When it was raised.
    pub raised_at_ms: TimeMs,
    /// Which consent scope the data behind it falls under.
    pub scope: ConsentScope,
}
