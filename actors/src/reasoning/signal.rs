//! The composite: one signal's reasoning, one reading at a time.

use serde::{Deserialize, Serialize};

use super::{
    Cusum, Debounce, Depletion, DepletionEta, Edge, Eta, Holt, InsightLatch, ReasonerParams,
    health_index,
};
use crate::error::Result;
use crate::model::{Direction, InsightKind, TimeMs};

/// Why a reading was refused; the state is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum RejectReason {
    /// The value is NaN or infinite.
    #[error("reading value {value} is not finite")]
    NonFinite {
        /// The value.
        value: f64,
    },
    /// The timestamp is not after the last accepted reading's.
    #[error("reading at {ts_ms} ms is not after the last one at {last_ms} ms")]
    OutOfOrder {
        /// The reading's timestamp.
        ts_ms: TimeMs,
        /// The last accepted reading's timestamp.
        last_ms: TimeMs,
    },
    /// The value is finite but so extreme that learning it would overflow the state.
    #[error("reading value {value} would overflow the signal's state")]
    Overflow {
        /// The value.
        value: f64,
    },
}

/// A level shift the drift detector confirmed on this reading.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Drift {
    /// Which way the level moved.
    pub direction: Direction,
    /// Estimated shift in noise standard deviations (at most [`super::CUSUM_CLIP`]).
    pub sigmas: f64,
    /// The same in the signal's unit.
    pub magnitude: f64,
}

/// Which insights turned on with this reading and should be raised now: each is true
/// once per episode (see [`super::InsightLatch`]), not on every reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Raised {
    /// An anomaly episode began.
    pub anomaly: bool,
    /// A level shift was confirmed (not within the refractory period of one the same way).
    pub drift: bool,
    /// A confident forecast began, or its ETA or confidence changed materially.
    pub forecast: bool,
    /// The consumable reached its reorder point (or runs out within the horizon), or its
    /// ETA changed materially.
    pub consumable_low: bool,
    /// The signal has been past its failure threshold for `persistence` readings.
    pub failure_now: bool,
}

impl Raised {
    /// True when any insight is raised.
    pub fn any(&self) -> bool {
        self.kinds().next().is_some()
    }

    /// The raised insights' kinds.
    pub fn kinds(&self) -> impl Iterator<Item = InsightKind> + use<> {
        [
            (self.anomaly, InsightKind::Anomaly),
            (self.drift, InsightKind::Drift),
            (self.forecast, InsightKind::Forecast),
            (self.consumable_low, InsightKind::ConsumableLow),
            (self.failure_now, InsightKind::FailureNow),
        ]
        .into_iter()
        .filter_map(|(on, kind)| on.then_some(kind))
    }
}

/// What one reading told about its signal. Small and `Copy`; the current estimates on
/// every reading, and in [`Assessment::raised`] which insights to raise now.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Assessment {
    /// The reading's robust z-score when it is anomalous.
    pub anomaly: Option<f64>,
    /// The level shift confirmed on this reading, if any.
    pub drift: Option<Drift>,
    /// The signal is past its failure threshold, gated by persistence.
    pub failure_now: bool,
    /// When the trend reaches the failure threshold, whatever its confidence (raise it
    /// when [`Raised::forecast`] says so).
    pub forecast: Option<Eta>,
    /// The consumable's state (cumulative signals with a capacity).
    pub depletion: Option<DepletionEta>,
    /// Health of the signal, `0..=1` (see [`super::health_index`]); for a consumable, its
    /// remaining fraction.
    pub health: f64,
    /// The smoothed level (for a counter, its value): the insight's `value`.
    pub level: f64,
    /// The insights to raise now.
    pub raised: Raised,
}

impl Assessment {
    fn quiet(health: f64, level: f64) -> Self {
        Assessment {
            anomaly: None,
            drift: None,
            failure_now: false,
            forecast: None,
            depletion: None,
            health,
            level,
            raised: Raised::default(),
        }
    }
}

/// State of a level signal (temperature, pressure, heating time).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
struct LevelState {
    holt: Holt,
    cusum: Cusum,
    forecast_latch: InsightLatch,
    anomaly_gate: Debounce,
    failure_gate: Debounce,
    forecast_gate: Debounce,
    /// Readings since the last drift alarm (saturating).
    drift_quiet: u16,
    drift_last: Option<Direction>,
}

impl LevelState {
    fn observe(&mut self, p: &ReasonerParams, ts: TimeMs, x: f64) -> Assessment {
        let tp = p.trend_params();
        let z = self.holt.observe(&tp, ts, x);
        let warm = self.holt.count() > u32::from(p.warmup);
        let z = z.filter(|_| warm);
        let mut raised = Raised::default();

        let anomaly = z.filter(|z| z.abs() >= p.z_threshold);
        raised.anomaly = self
            .anomaly_gate
            .update(anomaly.is_some(), 1, p.persistence)
            == Edge::Rose;

        self.drift_quiet = self.drift_quiet.saturating_add(1);
        let drift = z
            .and_then(|z| self.cusum.observe(p.drift_delta, p.drift_lambda, z))
            .map(|shift| Drift {
                direction: shift.direction,
                sigmas: shift.sigmas,
                magnitude: shift.sigmas * self.holt.scale().max(p.min_scale()),
            });
        if let Some(d) = drift {
            // The level moved: restart the line fit at the estimated new level rather than
            // let the smoother absorb the step over ≈ 1/alpha readings (which would keep the
            // CUSUM alarming and tilt the trend into a false forecast). The estimate, not
            // the reading, so a glitch cannot drag it far; it then weighs as one point of
            // the least-squares re-fit.
            self.holt
                .restart_level(self.holt.level() + d.direction.sign() * d.magnitude);
            raised.drift =
                self.drift_last != Some(d.direction) || self.drift_quiet >= p.drift_refractory();
            self.drift_last = Some(d.direction);
            self.drift_quiet = 0;
        }

        let failure = p.failure();
        let crossed = failure.is_some_and(|(t, d)| d.crossed(x, t));
        raised.failure_now = self
            .failure_gate
            .update(crossed, p.persistence, p.persistence)
            == Edge::Rose;
        let failure_now = self.failure_gate.is_on();

        let forecast = match failure {
            Some((t, d)) if warm && !failure_now => self.holt.time_to_threshold(&tp, t, d, ts),
            _ => None,
        };
        let confident = forecast.is_some_and(|e| e.confidence >= p.min_confidence);
        self.forecast_gate
            .update(confident, p.persistence, p.persistence);
        raised.forecast =
            self.forecast_latch
                .observe(ts, self.forecast_gate.is_on(), forecast.as_ref());

        let level = self.holt.level();
        Assessment {
            anomaly,
            drift,
            failure_now,
            forecast,
            depletion: None,
            // Past the threshold (confirmed) is health 0, whatever the lagging level says.
            health: if failure_now {
                0.0
            } else {
                health_index(level, p.normal_min, p.normal_max, failure)
            },
            level,
            raised,
        }
    }
}

/// State of a cumulative usage counter.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
struct CounterState {
    depletion: Depletion,
    latch: InsightLatch,
}

impl CounterState {
    fn observe(&mut self, p: &ReasonerParams, ts: TimeMs, x: f64) -> Assessment {
        self.depletion.observe(p.alpha, ts, x);
        let est = p
            .depletion_params()
            .and_then(|dp| self.depletion.estimate(&dp));
        let low = est.is_some_and(|e| match p.reorder_fraction {
            Some(f) => e.remaining_fraction <= f,
            None => e
                .empty
                .is_some_and(|eta| eta.eta_ms.saturating_sub(ts) <= p.horizon_ms),
        });
        let empty = est.and_then(|e| e.empty);
        let mut out = Assessment::quiet(est.map_or(1.0, |e| e.remaining_fraction), x);
        out.depletion = est;
        out.raised.consumable_low = self.latch.observe(ts, low, empty.as_ref());
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
enum Core {
    Level(LevelState),
    Counter(CounterState),
}

/// One signal's reasoning state *without* its parameters: the lean form for a twin that
/// keeps [`ReasonerParams`] once per device model (see [`SignalReasoner`] for the form that
/// carries them). Constant size, `Copy`, serde; nothing allocates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SignalState {
    core: Core,
}

impl SignalState {
    /// A fresh state for a signal tuned by `params` (a counter's when
    /// `params.cumulative`).
    pub fn new(params: &ReasonerParams) -> Self {
        let core = if params.cumulative {
            Core::Counter(CounterState::default())
        } else {
            Core::Level(LevelState::default())
        };
        SignalState { core }
    }

    /// Learns one reading and assesses it. `params` must have passed
    /// [`ReasonerParams::validated`]; whether the signal is a counter was fixed by
    /// [`SignalState::new`].
    ///
    /// A non-finite `value`, a `ts_ms` not after the last accepted reading's, or a value
    /// extreme enough to overflow the estimates is refused and leaves the state exactly as
    /// it was. Callers should also refuse timestamps far in the future: one accepted
    /// would make every later reading out of order.
    pub fn observe(
        &mut self,
        params: &ReasonerParams,
        ts_ms: TimeMs,
        value: f64,
    ) -> std::result::Result<Assessment, RejectReason> {
        if !value.is_finite() {
            return Err(RejectReason::NonFinite { value });
        }
        if self.count() > 0 && ts_ms <= self.last_ts() {
            return Err(RejectReason::OutOfOrder {
                ts_ms,
                last_ms: self.last_ts(),
            });
        }
        // Learn on a copy and keep it only if every estimate stayed finite.
        let mut next = *self;
        let out = match &mut next.core {
            Core::Level(s) => s.observe(params, ts_ms, value),
            Core::Counter(s) => s.observe(params, ts_ms, value),
        };
        if !next.is_finite() || !out.health.is_finite() {
            return Err(RejectReason::Overflow { value });
        }
        *self = next;
        Ok(out)
    }

    /// Timestamp of the last accepted reading (0 before the first).
    pub fn last_ts(&self) -> TimeMs {
        match &self.core {
            Core::Level(s) => s.holt.last_ts(),
            Core::Counter(s) => s.depletion.last_ts(),
        }
    }

    /// Readings accepted (saturating).
    pub fn count(&self) -> u32 {
        match &self.core {
            Core::Level(s) => s.holt.count(),
            Core::Counter(s) => s.depletion.count(),
        }
    }

    /// Whether this is a cumulative counter's state.
    pub fn is_counter(&self) -> bool {
        matches!(self.core, Core::Counter(_))
    }

    /// The level smoother, for a level signal.
    pub fn holt(&self) -> Option<&Holt> {
        match &self.core {
            Core::Level(s) => Some(&s.holt),
            Core::Counter(_) => None,
        }
    }

    /// The usage counter, for a cumulative signal.
    pub fn depletion(&self) -> Option<&Depletion> {
        match &self.core {
            Core::Counter(s) => Some(&s.depletion),
            Core::Level(_) => None,
        }
    }

    fn is_finite(&self) -> bool {
        match &self.core {
            Core::Level(s) => s.holt.is_finite() && s.cusum.is_finite(),
            Core::Counter(s) => s.depletion.is_finite(),
        }
    }
}

/// Streaming reasoning about one signal of one device: anomaly, drift, failure now,
/// forecast to the failure threshold, consumable depletion, health, and which insights
/// to raise, from one reading at a time, in constant memory and without allocating.
///
/// A level signal runs a robust [`Holt`] smoother (its studentised one-step forecast
/// error is the anomaly z-score, so a trending signal is not anomalous for trending), a
/// [`Cusum`] on that z for drift (restarting the line fit on an alarm), a [`Debounce`] on
/// the threshold for failure-now, and the smoother's [`Holt::time_to_threshold`] for the
/// forecast, raised when confident and persistent and de-duplicated by an
/// [`InsightLatch`]. A cumulative signal runs a [`Depletion`] estimate instead.
///
/// `Copy` and serde, for the twin's snapshot; deserialising re-validates the parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Stored")]
pub struct SignalReasoner {
    params: ReasonerParams,
    state: SignalState,
}

/// What deserialisation reads before validation.
#[derive(Deserialize)]
struct Stored {
    params: ReasonerParams,
    state: SignalState,
}

impl TryFrom<Stored> for SignalReasoner {
    type Error = crate::Error;

    fn try_from(s: Stored) -> Result<Self> {
        let params = s.params.validated()?;
        if params.cumulative != s.state.is_counter() {
            return Err(crate::Error::InvalidArgument {
                name: "cumulative",
                reason: "does not match the stored state".into(),
            });
        }
        Ok(SignalReasoner {
            params,
            state: s.state,
        })
    }
}

impl SignalReasoner {
    /// A reasoner with validated `params` (see [`ReasonerParams::validated`]).
    pub fn new(params: ReasonerParams) -> Result<Self> {
        let params = params.validated()?;
        Ok(SignalReasoner {
            params,
            state: SignalState::new(&params),
        })
    }

    /// Learns one reading and assesses it; see [`SignalState::observe`].
    pub fn observe(
        &mut self,
        ts_ms: TimeMs,
        value: f64,
    ) -> std::result::Result<Assessment, RejectReason> {
        self.state.observe(&self.params, ts_ms, value)
    }

    /// The parameters, as validated.
    pub fn params(&self) -> &ReasonerParams {
        &self.params
    }

    /// The state.
    pub fn state(&self) -> &SignalState {
        &self.state
    }

    /// Replaces the parameters (the catalogue entry changed), keeping what was learnt;
    /// the state starts afresh only if the signal changed between level and counter.
    pub fn retune(&mut self, params: ReasonerParams) -> Result<()> {
        let params = params.validated()?;
        if params.cumulative != self.state.is_counter() {
            self.state = SignalState::new(&params);
        }
        self.params = params;
        Ok(())
    }
}
