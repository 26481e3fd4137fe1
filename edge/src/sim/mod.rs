//! The built-in device simulator: the catalogue's products, behaving like the real ones.
//!
//! The edge node runs it as a device adapter, and tests and the demo drive it in virtual
//! time. Every signal of a device is read every `reading_interval`: level signals wander
//! around the centre of their normal range with seeded noise unless a [`Profile`] moves
//! them (a steady drift towards the failure threshold, a step past it at a chosen time);
//! cumulative counters only grow, at a typical or configured rate, and use up the
//! consumables they gauge. Scenario events raise alarms, diagnostic codes and product
//! questions at chosen times. Devices react to commands as the catalogue's playbooks
//! expect: `descale` restores the scale-affected signals, `restart`/`reset` clear transient
//! faults, self-tests pass or fail, actuators report their new state.
//!
//! Pure and deterministic: no I/O, no clock, no threads. Time comes in as `now_ms`; the
//! same configuration, seeds and sequence of calls give the same outputs, bit for bit,
//! whether time is advanced in one call or in many.
//!
//! # Layout
//! - [`config`] — [`SimConfig`]: devices, profiles, fleets, scenario events (TOML).
//! - this module — [`Simulator`], [`SimOutput`], [`SimError`].

pub mod config;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;

use caretwin_actors::catalogue::{
    Action, Catalogue, DeviceModel, DurationError, parse_duration_ms,
};
use caretwin_actors::model::{HOUR_MS, TimeMs};
use caretwin_actors::twins::device::ItemKind;

pub use config::{DeviceSpec, EventSpec, FleetSpec, Profile, Profiles, SimConfig};

/// A simulator configuration was refused: which device, which field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimError {
    /// The device concerned, when there is one.
    pub device: Option<String>,
    /// Where in the configuration (`model`, `profile[1].signal`, `events[3].event`,
    /// `fleets[0].weights`); `line L` when the TOML itself was refused.
    pub field: String,
    /// What is wrong, lowercase, naming the offending value.
    pub message: String,
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("simulator: ")?;
        if let Some(device) = &self.device {
            write!(f, "device {device:?}: ")?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for SimError {}

/// Something a simulated device produced.
#[derive(Debug, Clone, PartialEq)]
pub struct SimOutput {
    /// The device's id.
    pub device: String,
    /// The device's timestamp, Unix ms.
    pub ts_ms: TimeMs,
    /// What: a reading, an alarm (with no local action: the edge decides those), a
    /// diagnostic code, a product question, a reported field, or a command's result.
    pub kind: ItemKind,
}

/// Commands that undo a degradation, when a playbook sends them for the failure mode a
/// drifting signal indicates. `restart`, `reset` and self-tests are not among them: they
/// clear transient faults or test, they do not remove scale or refill a circuit.
const MAINTENANCE: &[&str] = &["descale", "repressurise_prompt", "defrost"];

/// Commands that test the device and pass or fail.
const SELF_TESTS: &[&str] = &[
    "seal_check",
    "door_heater_test",
    "economiser_test",
    "self_test",
];

/// Command results a device remembers, so a command delivered twice acts once.
const RESULT_MEMORY: usize = 64;

/// Units of counters that advance continuously; other counters (cups, draws, openings)
/// count whole events.
const CONTINUOUS_UNITS: &[&str] = &["l", "h", "s", "min", "kWh", "m3", "m³", "kg", "km"];

/// The usual noise of a level signal, as a fraction of its normal range's width. With the
/// bounded noise below, a healthy reading never strays more than 0.087 of the width from
/// the centre, so it always lies inside the normal range.
const NOISE_OF_WIDTH: f64 = 1.0 / 40.0;

/// The simulated devices of one site.
#[derive(Debug, Clone)]
pub struct Simulator {
    devices: Vec<Device>,
    index: HashMap<String, usize>,
}

impl Simulator {
    /// Builds the devices of `config` against `catalogue`, starting at `start_ms`: the
    /// first readings are at `start_ms`, event times count from it. Refuses unknown models,
    /// signals, commands, codes, questions and alarms, malformed durations, duplicate ids
    /// and profiles that make no sense (a counter that drifts, a rate away from the
    /// threshold), naming the device and the field.
    pub fn new(catalogue: &Catalogue, config: &SimConfig, start_ms: u64) -> Result<Self, SimError> {
        for (i, fleet) in config.fleets.iter().enumerate() {
            for (j, model) in fleet.models.iter().enumerate() {
                if catalogue.model(model).is_none() {
                    return Err(SimError {
                        device: None,
                        field: format!("fleets[{i}].models[{j}]"),
                        message: format!("unknown model {model:?}"),
                    });
                }
            }
        }
        let specs = config.all_devices()?;
        let mut models: HashMap<&str, Arc<ModelSim>> = HashMap::new();
        let mut devices = Vec::with_capacity(specs.len());
        let mut index = HashMap::with_capacity(specs.len());
        for spec in &specs {
            let fail = |field: &str, message: String| SimError {
                device: Some(spec.id.clone()),
                field: field.to_owned(),
                message,
            };
            if spec.id.is_empty() {
                return Err(fail("id", "must not be empty".into()));
            }
            if index.insert(spec.id.clone(), devices.len()).is_some() {
                return Err(fail("id", "is used by another device".into()));
            }
            let model = catalogue
                .model(&spec.model)
                .ok_or_else(|| fail("model", format!("unknown model {:?}", spec.model)))?;
            let shared = models
                .entry(model.id())
                .or_insert_with(|| Arc::new(ModelSim::new(model)))
                .clone();
            let seed = spec.seed.unwrap_or_else(|| mix_seed(config.seed, &spec.id));
            devices.push(Device::new(spec, model, shared, seed, start_ms)?);
        }
        for (i, event) in config.events.iter().enumerate() {
            let &d = index.get(&event.device).ok_or_else(|| SimError {
                device: Some(event.device.clone()),
                field: format!("events[{i}].device"),
                message: "no such device".into(),
            })?;
            let fail = |field: &str, message: String| SimError {
                device: Some(event.device.clone()),
                field: format!("events[{i}].{field}"),
                message,
            };
            let at = parse_offset(&event.at).map_err(|e| fail("at", e.to_string()))?;
            let model = catalogue
                .model(&devices[d].model.id)
                .expect("the device's model was found above");
            let kind = parse_event(model, &event.event).map_err(|m| fail("event", m))?;
            devices[d].events.push((start_ms.saturating_add(at), kind));
        }
        for device in &mut devices {
            // Stable: events at the same time keep the configuration's order.
            device.events.sort_by_key(|e| e.0);
        }
        Ok(Self { devices, index })
    }

    /// Everything the devices produced after the previous call (or from the start) up to
    /// and including `now_ms`, in time order; at equal times, in the configuration's device
    /// order. A `now_ms` earlier than a previous call's returns nothing new. Call it often:
    /// what it returns is held in memory (200 devices read every second make about a
    /// thousand outputs a second of simulated time).
    pub fn advance(&mut self, now_ms: u64) -> Vec<SimOutput> {
        let mut out = Vec::new();
        for device in &mut self.devices {
            let due = device.pending.partition_point(|o| o.ts_ms <= now_ms);
            out.extend(device.pending.drain(..due));
            device.generate_until(now_ms, &mut out);
        }
        // Each device's outputs are already in time order; a stable sort interleaves them.
        out.sort_by_key(|o| o.ts_ms);
        out
    }

    /// Sends a command to a device and returns its result ([`ItemKind::CommandResult`])
    /// at `now_ms`, or `None` when there is no such device. What changed (a signal back to
    /// healthy, a cleared fault, a siren now on) shows in the outputs after `now_ms`, so
    /// `now_ms` should not be earlier than the last [`Simulator::advance`]. A command id
    /// seen before gets the same result again, and acts only once.
    pub fn command(
        &mut self,
        device: &str,
        command_id: &str,
        name: &str,
        now_ms: u64,
    ) -> Option<SimOutput> {
        let &i = self.index.get(device)?;
        let device = &mut self.devices[i];
        let remembered = device
            .results
            .iter()
            .find(|(id, _, _)| id == command_id)
            .map(|(_, ok, detail)| (*ok, detail.clone()));
        let (succeeded, detail) = match remembered {
            Some(result) => result,
            None => {
                // What the device produced before the command saw it as it was.
                let mut pending = std::mem::take(&mut device.pending);
                device.generate_until(now_ms, &mut pending);
                device.pending = pending;
                let result = device.react(name, now_ms);
                if device.results.len() == RESULT_MEMORY {
                    device.results.pop_front();
                }
                device
                    .results
                    .push_back((command_id.to_owned(), result.0, result.1.clone()));
                result
            }
        };
        Some(SimOutput {
            device: device.id.clone(),
            ts_ms: now_ms,
            kind: ItemKind::CommandResult {
                command_id: command_id.to_owned(),
                succeeded,
                expired: false,
                cancelled: false,
                detail,
            },
        })
    }

    /// The devices, as `(id, model id)`, in the configuration's order (single devices,
    /// then fleets): what the edge provisions.
    pub fn devices(&self) -> impl Iterator<Item = (&str, &str)> {
        self.devices
            .iter()
            .map(|d| (d.id.as_str(), d.model.id.as_str()))
    }

    /// How many devices.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// True when there are no devices.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// When the next output is due, if any: how long the adapter may sleep.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.devices.iter().map(Device::next_due_ms).min()
    }
}

/// Mixes a seed with a device id, so devices seeded alike still differ.
pub(crate) fn mix_seed(seed: u64, id: &str) -> u64 {
    // FNV-1a of the id, then one SplitMix64 step: stable across builds and platforms,
    // unlike `std`'s hashers.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    SplitMix64(seed ^ h).next_u64()
}

/// An offset from the start (`"2h"`); unlike a duration, `"0s"` is allowed.
fn parse_offset(text: &str) -> Result<u64, DurationError> {
    match parse_duration_ms(text) {
        Err(DurationError::Zero(_)) => Ok(0),
        other => other,
    }
}

fn parse_event(model: &DeviceModel, text: &str) -> Result<ItemKind, String> {
    let (prefix, rest) = text.split_once(':').unwrap_or(("", text));
    let missing = |what: &str| Err(format!("model {:?} has no {what} {rest:?}", model.id()));
    match prefix {
        "alarm" | "" if model.alarm(rest).is_some() => Ok(ItemKind::Alarm {
            kind: rest.to_owned(),
            local_action: None,
        }),
        "alarm" => missing("alarm"),
        "question" if model.question(rest).is_some() => Ok(ItemKind::Question {
            question_id: rest.to_owned(),
        }),
        "question" => missing("question"),
        "code" if model.diagnostic_code(rest).is_some() => Ok(ItemKind::Diagnostic {
            code: rest.to_owned(),
        }),
        "code" => missing("diagnostic code"),
        "reported" => {
            let mut fields = Vec::new();
            for pair in rest.split(',') {
                match pair.split_once('=') {
                    Some((field, value)) if !field.is_empty() => {
                        fields.push((field.to_owned(), value.to_owned()));
                    }
                    _ => {
                        return Err(format!(
                            "{text:?} must be reported:<field>=<value>[,<field>=<value>…]"
                        ));
                    }
                }
            }
            Ok(ItemKind::Reported { fields })
        }
        _ => {
            let kinds: Vec<&str> = model.alarms().iter().map(|a| a.kind.as_str()).collect();
            Err(format!(
                "unknown event {text:?}: expected an alarm kind of model {:?} ({}), \
                 alarm:<kind>, question:<id>, code:<code> or reported:<field>=<value>",
                model.id(),
                if kinds.is_empty() {
                    "none".into()
                } else {
                    kinds.join(", ")
                },
            ))
        }
    }
}

/// What every device of a model shares.
#[derive(Debug)]
struct ModelSim {
    id: String,
    commands: Vec<String>,
    signals: Vec<String>,
}

impl ModelSim {
    fn new(model: &DeviceModel) -> Self {
        Self {
            id: model.id().to_owned(),
            commands: model.commands().to_vec(),
            signals: model.signals().iter().map(|s| s.name.clone()).collect(),
        }
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014). Written out, as in `caretwin-actors` (whose copy
/// is crate-private): a simulation must replay bit for bit on every machine and every
/// future build, which no generator crate promises across versions.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Mean 0, standard deviation 1, bounded to ±√12/2 ≈ ±3.46: the sum of four uniforms
    /// (Irwin–Hall). Bounded, so a healthy device provably stays in its normal range and a
    /// failed one past its threshold; and no `ln`/`cos`, whose last bits differ between
    /// platforms' maths libraries.
    fn noise(&mut self) -> f64 {
        let sum = self.next_f64() + self.next_f64() + self.next_f64() + self.next_f64();
        (sum - 2.0) * 3f64.sqrt()
    }
}

/// Largest |noise| in standard deviations.
const NOISE_BOUND: f64 = 3.465;

#[derive(Debug, Clone)]
struct Device {
    id: String,
    model: Arc<ModelSim>,
    interval_ms: u64,
    rng: SplitMix64,
    next_reading_ms: u64,
    last_reading_ms: Option<u64>,
    signals: Vec<SignalState>,
    /// Scenario events and fault codes, in time order once built.
    events: Vec<(u64, ItemKind)>,
    next_event: usize,
    failing_commands: Vec<String>,
    firmware: u32,
    /// Reported fields and their current values (`siren` → `on`).
    state: Vec<(&'static str, &'static str)>,
    /// Outputs produced ahead of `advance` (up to a command's time), in time order.
    pending: Vec<SimOutput>,
    results: VecDeque<(String, bool, String)>,
}

#[derive(Debug, Clone)]
enum SignalState {
    Level(Level),
    Counter(Counter),
}

#[derive(Debug, Clone)]
struct Level {
    centre: f64,
    sigma: f64,
    /// Readings never go below this (a pressure, a current, a percentage).
    floor: Option<f64>,
    drift: Option<Drift>,
    fault: Option<Fault>,
}

#[derive(Debug, Clone)]
struct Drift {
    rate_per_hour: f64,
    /// The drift counts from here: its start, or the last cure.
    since_ms: u64,
    max_offset: f64,
    cured_by: Vec<String>,
}

#[derive(Debug, Clone)]
struct Fault {
    at_ms: u64,
    value: f64,
    transient: bool,
    cleared: bool,
}

impl Fault {
    fn active(&self, t: u64) -> bool {
        t >= self.at_ms && !self.cleared
    }
}

#[derive(Debug, Clone)]
struct Counter {
    rate_per_hour: f64,
    total: f64,
    integral: bool,
}

impl Level {
    fn value(&self, t: u64, noise: f64) -> f64 {
        let base = match &self.fault {
            Some(f) if f.active(t) => f.value,
            _ => self.centre + self.drift.as_ref().map_or(0.0, |d| d.offset(t)),
        };
        let v = base + self.sigma * noise;
        self.floor.map_or(v, |f| v.max(f))
    }
}

impl Drift {
    fn offset(&self, t: u64) -> f64 {
        if t <= self.since_ms {
            return 0.0;
        }
        let hours = (t - self.since_ms) as f64 / HOUR_MS as f64;
        (self.rate_per_hour * hours).clamp(-self.max_offset, self.max_offset)
    }
}

/// A counter's typical rate per hour when no `consumption` profile sets it.
fn typical_rate(category: &str, signal: &str, unit: &str) -> f64 {
    match (category, signal) {
        (_, "cups_brewed") => 0.25,   // six drinks a day
        (_, "water_through") => 0.05, // 1.2 l a day
        (_, "burner_hours") => 0.3,
        (_, "hot_water_draws") => 0.5,
        ("commercial_freezer", "door_openings") => 20.0, // shoppers
        (_, "door_openings") => 2.0,
        (_, "water_dispensed") => 0.05,
        (_, "fan_hours") => 0.6,
        (_, "arm_events") => 0.08,
        _ if unit == "h" => 0.5,
        _ => 1.0,
    }
}

impl Device {
    fn new(
        spec: &DeviceSpec,
        model: &DeviceModel,
        shared: Arc<ModelSim>,
        seed: u64,
        start_ms: u64,
    ) -> Result<Self, SimError> {
        let fail = |field: String, message: String| SimError {
            device: Some(spec.id.clone()),
            field,
            message,
        };
        let interval_ms = parse_duration_ms(&spec.reading_interval)
            .map_err(|e| fail("reading_interval".into(), e.to_string()))?;
        if !spec.noise.is_finite() || spec.noise < 0.0 {
            return Err(fail(
                "noise".into(),
                format!("{} must be finite and not negative", spec.noise),
            ));
        }
        let mut rng = SplitMix64(seed);
        let mut signals = Vec::with_capacity(model.signals().len());
        for s in model.signals() {
            signals.push(match (s.cumulative, s.normal) {
                (false, Some(normal)) => {
                    let width = normal.max - normal.min;
                    SignalState::Level(Level {
                        centre: (normal.min + normal.max) / 2.0,
                        sigma: width * NOISE_OF_WIDTH * spec.noise,
                        floor: (normal.min >= 0.0).then_some(0.0),
                        drift: None,
                        fault: None,
                    })
                }
                _ => {
                    let rate = typical_rate(model.category(), &s.name, &s.unit);
                    SignalState::Counter(Counter {
                        rate_per_hour: rate,
                        // The device is up to a year old.
                        total: (rate * 8760.0 * rng.next_f64()).floor(),
                        integral: !CONTINUOUS_UNITS.contains(&s.unit.as_str()),
                    })
                }
            });
        }
        let mut device = Self {
            id: spec.id.clone(),
            model: shared,
            interval_ms,
            rng,
            next_reading_ms: start_ms,
            last_reading_ms: None,
            signals,
            events: vec![(
                start_ms,
                ItemKind::Reported {
                    fields: vec![("firmware".into(), firmware_version(0))],
                },
            )],
            next_event: 0,
            failing_commands: Vec::new(),
            firmware: 0,
            state: Vec::new(),
            pending: Vec::new(),
            results: VecDeque::new(),
        };
        for (j, profile) in spec.profile.0.iter().enumerate() {
            device
                .apply_profile(model, profile, start_ms)
                .map_err(|(field, message)| fail(format!("profile[{j}].{field}"), message))?;
        }
        Ok(device)
    }

    /// Applies one profile; an error is `(field within the profile, message)`.
    fn apply_profile(
        &mut self,
        model: &DeviceModel,
        profile: &Profile,
        start_ms: u64,
    ) -> Result<(), (&'static str, String)> {
        let level_index = |signal: &str| {
            let i = model.signal_index(signal).ok_or_else(|| {
                (
                    "signal",
                    format!("model {:?} has no signal {signal:?}", model.id()),
                )
            })?;
            if model.signals()[i].cumulative {
                return Err((
                    "signal",
                    format!("{signal:?} is a cumulative counter; use a consumption profile"),
                ));
            }
            Ok(i)
        };
        let check_command = |command: &String| {
            if model.has_command(command) {
                Ok(())
            } else {
                Err((
                    "command",
                    format!("model {:?} has no command {command:?}", model.id()),
                ))
            }
        };
        match profile {
            Profile::Healthy => {}
            Profile::Degrading {
                signal,
                rate_per_hour,
                after,
                cured_by,
            } => {
                let i = level_index(signal)?;
                let rate = *rate_per_hour;
                if !rate.is_finite() || rate == 0.0 {
                    return Err(("rate_per_hour", format!("{rate} must be finite and not 0")));
                }
                let def = &model.signals()[i];
                let width = def.normal.map_or(1.0, |n| n.max - n.min);
                let centre = def.normal.map_or(0.0, |n| (n.min + n.max) / 2.0);
                let max_offset = match def.failure {
                    Some(f) if rate.signum() != f.direction.sign() => {
                        return Err((
                            "rate_per_hour",
                            format!(
                                "{rate} moves {signal:?} away from its failure threshold {} \
                                 ({:?})",
                                f.threshold, f.direction
                            ),
                        ));
                    }
                    Some(f) => (f.threshold - centre).abs() + width,
                    None => 2.0 * width,
                };
                let after = match after {
                    Some(text) => parse_offset(text).map_err(|e| ("after", e.to_string()))?,
                    None => 0,
                };
                let cured_by = match cured_by {
                    Some(list) => {
                        for command in list {
                            check_command(command).map_err(|(_, m)| ("cured_by", m))?;
                        }
                        list.clone()
                    }
                    None => default_cures(model, i),
                };
                let SignalState::Level(level) = &mut self.signals[i] else {
                    unreachable!("level_index returns level signals only")
                };
                if level.drift.is_some() {
                    return Err(("signal", format!("{signal:?} already degrades")));
                }
                level.drift = Some(Drift {
                    rate_per_hour: rate,
                    since_ms: start_ms.saturating_add(after),
                    max_offset,
                    cured_by,
                });
            }
            Profile::FailsAt {
                at,
                signal,
                transient,
                code,
            } => {
                let i = level_index(signal)?;
                let at_ms =
                    start_ms.saturating_add(parse_offset(at).map_err(|e| ("at", e.to_string()))?);
                let def = &model.signals()[i];
                let Some(failure) = def.failure else {
                    return Err(("signal", format!("{signal:?} has no failure threshold")));
                };
                if let Some(code) = code {
                    if model.diagnostic_code(code).is_none() {
                        return Err((
                            "code",
                            format!("model {:?} has no diagnostic code {code:?}", model.id()),
                        ));
                    }
                    self.events
                        .push((at_ms, ItemKind::Diagnostic { code: code.clone() }));
                }
                let width = def.normal.map_or(1.0, |n| n.max - n.min);
                let SignalState::Level(level) = &mut self.signals[i] else {
                    unreachable!("level_index returns level signals only")
                };
                if level.fault.is_some() {
                    return Err(("signal", format!("{signal:?} already fails")));
                }
                // Past the threshold by a tenth of the normal width, plus the largest
                // noise, so no reading of a failed device looks healthy.
                let margin = 0.1 * width + NOISE_BOUND * level.sigma;
                level.fault = Some(Fault {
                    at_ms,
                    value: failure.threshold + failure.direction.sign() * margin,
                    transient: *transient,
                    cleared: false,
                });
            }
            Profile::Consumption {
                signal,
                rate_per_hour,
            } => {
                let i = model.signal_index(signal).ok_or_else(|| {
                    (
                        "signal",
                        format!("model {:?} has no signal {signal:?}", model.id()),
                    )
                })?;
                let SignalState::Counter(counter) = &mut self.signals[i] else {
                    return Err(("signal", format!("{signal:?} is not a cumulative counter")));
                };
                if !rate_per_hour.is_finite() || *rate_per_hour < 0.0 {
                    return Err((
                        "rate_per_hour",
                        format!("{rate_per_hour} must be finite and not negative"),
                    ));
                }
                counter.rate_per_hour = *rate_per_hour;
            }
            Profile::CommandFails { command } => {
                check_command(command)?;
                self.failing_commands.push(command.clone());
            }
        }
        Ok(())
    }

    fn next_due_ms(&self) -> u64 {
        let mut due = self.next_reading_ms;
        if let Some((t, _)) = self.events.get(self.next_event) {
            due = due.min(*t);
        }
        if let Some(o) = self.pending.first() {
            due = due.min(o.ts_ms);
        }
        due
    }

    /// Appends everything due up to and including `t`, in time order (events before
    /// readings at the same time).
    fn generate_until(&mut self, t: u64, out: &mut Vec<SimOutput>) {
        loop {
            let reading = self.next_reading_ms;
            match self.events.get(self.next_event) {
                Some((at, kind)) if *at <= t && *at <= reading => {
                    out.push(SimOutput {
                        device: self.id.clone(),
                        ts_ms: *at,
                        kind: kind.clone(),
                    });
                    self.next_event += 1;
                }
                _ if reading <= t => {
                    self.read(reading, out);
                    self.last_reading_ms = Some(reading);
                    match reading.checked_add(self.interval_ms) {
                        Some(next) => self.next_reading_ms = next,
                        None => {
                            // The end of time: no further readings.
                            self.next_reading_ms = u64::MAX;
                            if reading == u64::MAX {
                                break;
                            }
                        }
                    }
                }
                _ => break,
            }
        }
    }

    /// One reading of every signal at `t`.
    fn read(&mut self, t: u64, out: &mut Vec<SimOutput>) {
        let hours = self
            .last_reading_ms
            .map_or(0.0, |last| (t - last) as f64 / HOUR_MS as f64);
        let rng = &mut self.rng;
        for (state, name) in self.signals.iter_mut().zip(&self.model.signals) {
            let value = match state {
                SignalState::Level(level) => level.value(t, rng.noise()),
                SignalState::Counter(c) => {
                    // Usage comes in uneven amounts: uniform in 0..2× the mean.
                    c.total += c.rate_per_hour * hours * 2.0 * rng.next_f64();
                    if c.integral {
                        c.total.floor()
                    } else {
                        (c.total * 1000.0).floor() / 1000.0
                    }
                }
            };
            out.push(SimOutput {
                device: self.id.clone(),
                ts_ms: t,
                kind: ItemKind::Reading {
                    signal: name.clone(),
                    value,
                },
            });
        }
    }

    /// What the device does with a command at `now`: `(succeeded, detail)`. Changes to
    /// its reported state go to `pending` at `now`.
    fn react(&mut self, name: &str, now: u64) -> (bool, String) {
        let words = name.replace('_', " ");
        if !self.model.commands.iter().any(|c| c == name) {
            return (
                false,
                format!(
                    "unknown command {name:?}: model {:?} accepts {}",
                    self.model.id,
                    self.model.commands.join(", ")
                ),
            );
        }
        if self.failing_commands.iter().any(|c| c == name) {
            return (false, format!("{words} failed"));
        }
        let mut restored = Vec::new();
        for (state, signal) in self.signals.iter_mut().zip(&self.model.signals) {
            if let SignalState::Level(Level {
                drift: Some(drift), ..
            }) = state
                && drift.cured_by.iter().any(|c| c == name)
            {
                drift.since_ms = drift.since_ms.max(now);
                restored.push(signal.as_str());
            }
        }
        let restored = if restored.is_empty() {
            String::new()
        } else {
            format!("; {} back to normal", restored.join(", "))
        };
        let faults = |only_transient: bool, signals: &mut Vec<SignalState>| {
            let mut names = Vec::new();
            for (state, signal) in signals.iter_mut().zip(&self.model.signals) {
                if let SignalState::Level(Level { fault: Some(f), .. }) = state
                    && f.active(now)
                    && (!only_transient || f.transient)
                {
                    names.push(signal.clone());
                    if only_transient {
                        f.cleared = true;
                    }
                }
            }
            names.join(", ")
        };
        let (detail, report): (String, Option<(&'static str, &'static str)>) = match name {
            "restart" | "reset" => {
                let cleared = faults(true, &mut self.signals);
                let persisting = faults(false, &mut self.signals);
                let verb = if name == "restart" {
                    "restarted"
                } else {
                    "reset"
                };
                let mut detail = verb.to_owned();
                if !cleared.is_empty() {
                    detail += &format!("; cleared the fault on {cleared}");
                }
                if !persisting.is_empty() {
                    detail += &format!("; the fault on {persisting} persists");
                }
                (detail, (name == "reset").then_some(("mode", "normal")))
            }
            test if SELF_TESTS.contains(&test) => {
                let faulty = faults(false, &mut self.signals);
                if !faulty.is_empty() {
                    return (false, format!("{words} failed: fault on {faulty}"));
                }
                (format!("{words} passed"), None)
            }
            "firmware_update" => {
                self.firmware += 1;
                let version = firmware_version(self.firmware);
                self.push_pending(now, "firmware", version.clone());
                (format!("firmware updated to {version}"), None)
            }
            "descale" => ("descale cycle complete".into(), None),
            "rinse" => ("rinse cycle complete".into(), None),
            "defrost" => ("defrost cycle complete".into(), None),
            "repressurise_prompt" => ("repressurise prompt shown".into(), None),
            "siren_on" => ("siren on".into(), Some(("siren", "on"))),
            "siren_off" => ("siren off".into(), Some(("siren", "off"))),
            "close_valve" => ("water valve closed".into(), Some(("valve", "closed"))),
            "open_valve" => ("water valve open".into(), Some(("valve", "open"))),
            "lockout" => ("burner locked out".into(), Some(("mode", "lockout"))),
            "service_mode" => ("service mode on".into(), Some(("mode", "service"))),
            "fan_boost" => ("fan boost on".into(), Some(("fan", "boost"))),
            _ => (format!("{words} done"), None),
        };
        if let Some((field, value)) = report {
            let current = self.state.iter_mut().find(|(f, _)| *f == field);
            let changed = match current {
                Some((_, v)) if *v == value => false,
                Some((_, v)) => {
                    *v = value;
                    true
                }
                // A reset of a device never locked out reports nothing new.
                None if field == "mode" && value == "normal" => false,
                None => {
                    self.state.push((field, value));
                    true
                }
            };
            if changed {
                self.push_pending(now, field, value.to_owned());
            }
        }
        (true, detail + &restored)
    }

    fn push_pending(&mut self, ts_ms: u64, field: &str, value: String) {
        let at = self.pending.partition_point(|o| o.ts_ms <= ts_ms);
        self.pending.insert(
            at,
            SimOutput {
                device: self.id.clone(),
                ts_ms,
                kind: ItemKind::Reported {
                    fields: vec![(field.to_owned(), value)],
                },
            },
        );
    }
}

fn firmware_version(updates: u32) -> String {
    format!("1.0.{updates}")
}

/// The maintenance commands that the playbooks of the failure modes this signal indicates
/// send: what undoes its drift unless the profile says otherwise.
fn default_cures(model: &DeviceModel, signal_index: usize) -> Vec<String> {
    let mut cures: Vec<String> = Vec::new();
    for mode in model.failure_modes() {
        if !mode
            .indicators
            .iter()
            .any(|i| i.signal_index == signal_index)
        {
            continue;
        }
        for step in &mode.playbook {
            if let Action::RemoteCommand { command, .. } = &step.action
                && MAINTENANCE.contains(&command.as_str())
                && !cures.contains(command)
            {
                cures.push(command.clone());
            }
        }
    }
    cures
}

#[cfg(test)]
mod tests;
