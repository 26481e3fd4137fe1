//! Streaming per-signal reasoning: pure, constant memory, no allocation per reading.
//!
//! A DeviceTwin keeps one [`SignalReasoner`] (or, leaner, one [`SignalState`] plus the
//! device model's shared [`ReasonerParams`]) per signal and feeds it every reading:
//!
//! ```text
//!  (ts, value) ─► SignalReasoner::observe ─► Assessment { anomaly, drift, failure_now,
//!                  (robust Holt, CUSUM,          forecast, depletion, health, level,
//!                   gates, latches)              raised: which insights to raise now }
//! ```
//!
//! Nothing here reads a clock or allocates: time is the reading's timestamp (ms), state
//! is a fixed-size `Copy` struct that serialises into the twin's snapshot, and bad input
//! (non-finite, out of order) is refused without touching the state. Every detector
//! stores only its state and takes its tuning per call, so a million twins do not hold a
//! million copies of the catalogue's numbers.
//!
//! All rates are per millisecond ([`Holt::trend_per_ms`], [`Depletion::rate_per_ms`]);
//! smoothing constants are per reading.
//!
//! # Layout
//! - [`ewma`](Ewma) — exponentially weighted mean and variance (West/Finch).
//! - [`robust`](RobustZ) — Huber-clipped robust z-scores for stationary signals.
//! - [`cusum`](Cusum) — drift: Page's two-sided CUSUM, winsorised.
//! - [`holt`](Holt) — trend: robust Holt/Brown smoothing on irregular timestamps, ETAs
//!   with 95% bands and confidence.
//! - [`depletion`](Depletion) — consumables: usage rate, replacement, time to reorder and
//!   to empty.
//! - [`health`](health_index) — health index per signal and per device.
//! - [`gate`](Debounce) — persistence gates and the [`InsightLatch`] that raises each
//!   insight once.
//! - [`params`](ReasonerParams) and [`signal`](SignalReasoner) — the composite.

mod cusum;
mod depletion;
mod ewma;
mod gate;
mod health;
mod holt;
mod params;
mod robust;
mod signal;

#[cfg(test)]
mod tests;

pub use cusum::{CUSUM_CLIP, Cusum, Shift};
pub use depletion::{CounterEvent, Depletion, DepletionEta, DepletionParams};
pub use ewma::Ewma;
pub use gate::{
    CONFIDENCE_BANDS, CONFIDENCE_HYSTERESIS, Debounce, ETA_CHANGE_FRACTION, Edge, InsightLatch,
    MIN_ETA_CHANGE_MS,
};
pub use health::{health_index, min_health, weighted_health};
pub use holt::{Eta, Holt, TrendParams, Z95};
pub use params::ReasonerParams;
pub use robust::{AnomalyParams, CLIP_AFTER, HUBER_K, HUBER_MEAN_ABS, RobustZ};
pub use signal::{Assessment, Drift, Raised, RejectReason, SignalReasoner, SignalState};
