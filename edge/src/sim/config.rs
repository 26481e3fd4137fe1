//! The simulator's configuration, as the edge's TOML writes it.
//!
//! ```toml
//! seed = 42                                   # for devices that name no seed of their own
//!
//! [[devices]]
//! id = "kitchen-coffee"
//! model = "coffee.barista-200"
//! reading_interval = "1h"                     # durations: <integer><s|m|h|d>
//! profile = [
//!   { degrading = { signal = "brew_pressure", rate_per_hour = -0.02 } },
//!   { degrading = { signal = "heating_time", rate_per_hour = 0.3 } },
//!   { consumption = { signal = "water_through", rate_per_hour = 0.2 } },
//! ]
//!
//! [[devices]]
//! id = "boiler"
//! model = "boiler.combi-30"
//! # A leak: no remote remedy restores the pressure for long.
//! profile = { degrading = { signal = "system_pressure", rate_per_hour = -0.01, cured_by = [] } }
//!
//! [[devices]]
//! id = "hub"
//! model = "hub.guardian-1"
//! profile = "healthy"
//!
//! [[fleets]]                                  # story 5: a shop with 200 devices
//! prefix = "store-42"
//! count = 200
//! models = ["retail.freezer-rf700", "retail.hvac-rt12", "coffee.barista-200"]
//! weights = [6, 1, 3]
//! reading_interval = "1s"
//!
//! [[events]]
//! device = "hub"
//! at = "2h"                                   # after the simulation's start
//! event = "smoke"                             # or alarm:<kind>, question:<id>, code:<code>,
//!                                             #    reported:<field>=<value>
//! ```

use std::fmt;

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer, StrDeserializer};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use super::SimError;

/// What the simulator runs: single devices, generated fleets, and scenario events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// Seed of the noise of every device that names no seed of its own; each such device
    /// mixes it with its id, so devices differ from each other but not from run to run.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Devices, one by one, each with its own profile.
    #[serde(default)]
    pub devices: Vec<DeviceSpec>,
    /// Shortcuts for many healthy devices of a mix of models (a shop's freezers, HVAC and
    /// coffee machines).
    #[serde(default)]
    pub fleets: Vec<FleetSpec>,
    /// Things that happen at a chosen time: alarms, questions, diagnostic codes.
    #[serde(default)]
    pub events: Vec<EventSpec>,
}

/// Default [`SimConfig::seed`].
pub fn default_seed() -> u64 {
    1
}

/// Default reading interval of devices and fleets: `"1m"`.
pub fn default_reading_interval() -> String {
    "1m".into()
}

/// Default [`DeviceSpec::noise`]: `1.0`, the usual noise of the model's signals.
pub fn default_noise() -> f64 {
    1.0
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: default_seed(),
            devices: Vec::new(),
            fleets: Vec::new(),
            events: Vec::new(),
        }
    }
}

impl SimConfig {
    /// Parses a configuration from TOML text (the shape is checked here; models, signals
    /// and durations are checked by [`super::Simulator::new`]).
    pub fn from_toml(text: &str) -> Result<Self, SimError> {
        toml::from_str(text).map_err(|e| SimError {
            device: None,
            field: e.span().map_or_else(String::new, |span| {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}")
            }),
            message: e.message().to_owned(),
        })
    }

    /// Every device the configuration describes: the single devices, then each fleet's
    /// devices, in order. Fails on a fleet with no devices or no models, or with weights
    /// that do not match its models.
    pub fn all_devices(&self) -> Result<Vec<DeviceSpec>, SimError> {
        let mut all = self.devices.clone();
        for (i, fleet) in self.fleets.iter().enumerate() {
            all.extend(fleet.expand(i)?);
        }
        Ok(all)
    }
}

/// One simulated device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    /// The device's id, unique in the configuration.
    pub id: String,
    /// Its model id in the catalogue (`coffee.barista-200`).
    pub model: String,
    /// How it behaves beyond healthy noise: one profile, or a list of them. Healthy when
    /// absent.
    #[serde(default)]
    pub profile: Profiles,
    /// How often every signal is read (`"1s"`, `"1h"`).
    #[serde(default = "default_reading_interval")]
    pub reading_interval: String,
    /// Seed of this device's noise; derived from [`SimConfig::seed`] and the id when absent.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Multiplies the usual noise of every level signal: `0` for exact values, `2` for a
    /// noisy device. Finite and not negative.
    #[serde(default = "default_noise")]
    pub noise: f64,
}

/// How a device departs from healthy. In TOML, `"healthy"` or
/// `{ degrading = { signal = "brew_pressure", rate_per_hour = -0.02 } }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Profile {
    /// Level signals stay around the centre of their normal range, with noise.
    Healthy,
    /// A level signal drifts at a steady rate: scale lowering a coffee machine's brew
    /// pressure, a leak lowering a boiler's pressure, a fridge cabinet warming, a pump's
    /// current rising. The drift stops one normal-range width past the failure threshold.
    Degrading {
        /// The level signal that drifts.
        signal: String,
        /// Change per hour, in the signal's unit; must point towards the failure threshold
        /// when the signal has one.
        rate_per_hour: f64,
        /// When the drift starts, after the simulation's start (`"24h"`); at once when absent.
        #[serde(default)]
        after: Option<String>,
        /// Commands that put the signal back to healthy (the drift then starts again from
        /// there: scale builds up again). When absent: the maintenance commands
        /// (`descale`, `repressurise_prompt`, `defrost`) that the catalogue's playbooks send
        /// for a failure mode this signal indicates. `[]`: no command helps.
        #[serde(default)]
        cured_by: Option<Vec<String>>,
    },
    /// A level signal steps past its failure threshold at a chosen time and stays there.
    FailsAt {
        /// When, after the simulation's start (`"36h"`).
        #[serde(alias = "time")]
        at: String,
        /// The level signal; it must have a failure threshold.
        signal: String,
        /// A transient fault, which `restart` or `reset` clears.
        #[serde(default)]
        transient: bool,
        /// A diagnostic code the device reports when it fails (`F28`).
        #[serde(default)]
        code: Option<String>,
    },
    /// A counter advances at this mean rate (cups, litres, hours): what uses up the
    /// consumables it gauges. Counters have a typical rate without this.
    Consumption {
        /// The cumulative signal.
        signal: String,
        /// Mean increase per hour, in the signal's unit; finite and not negative.
        rate_per_hour: f64,
    },
    /// The device reports this command as failed whenever it is sent (a door seal that
    /// fails its `seal_check`, a descale cycle that aborts); the command has no effect.
    CommandFails {
        /// One of the model's commands.
        command: String,
    },
}

/// One profile or several; in TOML a single value or a list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profiles(pub Vec<Profile>);

impl Serialize for Profiles {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(serializer),
            none_or_many => none_or_many.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Profiles {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // A hand-written visitor rather than `#[serde(untagged)]`, so a typo inside a
        // profile is reported as itself and not as "did not match any variant".
        struct OneOrMany;
        impl<'de> Visitor<'de> for OneOrMany {
            type Value = Profiles;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a profile or a list of profiles")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Profiles, E> {
                Profile::deserialize(StrDeserializer::<E>::new(v)).map(|p| Profiles(vec![p]))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Profiles, A::Error> {
                Profile::deserialize(MapAccessDeserializer::new(map)).map(|p| Profiles(vec![p]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Profiles, A::Error> {
                Vec::deserialize(SeqAccessDeserializer::new(seq)).map(Profiles)
            }
        }
        deserializer.deserialize_any(OneOrMany)
    }
}

/// Many healthy devices of a mix of models, with generated ids
/// `{prefix}-{model}-{n}` (`store-42-retail.freezer-rf700-001`), numbered per model from 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSpec {
    /// Start of every generated id, usually the site (`store-42`).
    pub prefix: String,
    /// How many devices, at least 1.
    pub count: usize,
    /// The models, at least one.
    pub models: Vec<String>,
    /// Relative share of each model, in the order of `models`; equal shares when empty.
    #[serde(default)]
    pub weights: Vec<u32>,
    /// How often every signal of every device is read.
    #[serde(default = "default_reading_interval")]
    pub reading_interval: String,
    /// Seed of the fleet's noise (mixed with each id); [`SimConfig::seed`] when absent.
    #[serde(default)]
    pub seed: Option<u64>,
}

impl FleetSpec {
    /// The fleet's devices. `index` is the fleet's position, for error messages.
    fn expand(&self, index: usize) -> Result<Vec<DeviceSpec>, SimError> {
        let fail = |field: &str, message: String| SimError {
            device: None,
            field: format!("fleets[{index}].{field}"),
            message,
        };
        if self.count == 0 {
            return Err(fail("count", "must be at least 1".into()));
        }
        if self.models.is_empty() {
            return Err(fail("models", "must name at least one model".into()));
        }
        let weights: Vec<u64> = if self.weights.is_empty() {
            vec![1; self.models.len()]
        } else if self.weights.len() != self.models.len() {
            return Err(fail(
                "weights",
                format!(
                    "has {} entries for {} models",
                    self.weights.len(),
                    self.models.len()
                ),
            ));
        } else {
            self.weights.iter().map(|&w| u64::from(w)).collect()
        };
        let total: u64 = weights.iter().sum();
        if total == 0 {
            return Err(fail("weights", "must not all be 0".into()));
        }
        // Largest remainder: each model gets its share rounded down, and the devices left
        // over go to the largest fractions (ties to the earlier model), so the counts
        // always add up to `count`.
        let count = self.count as u64;
        let mut counts: Vec<u64> = weights.iter().map(|w| count * w / total).collect();
        let mut order: Vec<usize> = (0..weights.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(count * weights[i] % total));
        let short = count - counts.iter().sum::<u64>();
        for &i in order.iter().take(short as usize) {
            counts[i] += 1;
        }
        let width = self.count.to_string().len().max(3);
        let mut devices = Vec::with_capacity(self.count);
        for (model, &n) in self.models.iter().zip(&counts) {
            for k in 1..=n {
                let id = format!("{}-{model}-{k:0width$}", self.prefix);
                devices.push(DeviceSpec {
                    seed: self.seed.map(|s| super::mix_seed(s, &id)),
                    id,
                    model: model.clone(),
                    profile: Profiles::default(),
                    reading_interval: self.reading_interval.clone(),
                    noise: default_noise(),
                });
            }
        }
        Ok(devices)
    }
}

/// Something a device does at a chosen time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSpec {
    /// The device's id.
    pub device: String,
    /// When, after the simulation's start (`"2h"`; `"0s"` is the start).
    pub at: String,
    /// What: an alarm kind of the device's model (`smoke`) or `alarm:<kind>`,
    /// `question:<id>` (a product question), `code:<code>` (a diagnostic code) or
    /// `reported:<field>=<value>[,<field>=<value>…]` (fields of the reported state).
    pub event: String,
}
