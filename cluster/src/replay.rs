//! Replaying recorded run data through twins in virtual time (C-MAPSS turbofans).
//!
//! The I/O edge of remaining-useful-life estimation: it parses C-MAPSS text, turns a
//! training file into [`TrainingRun`]s for [`caretwin_actors::rul::fit`], and feeds a
//! recording cycle by cycle, in file order and as fast as it can, to a [`ReplaySink`]:
//! cycle `n` of a unit happens at [`virtual_ts`]`(n)`, `n` hours after [`EPOCH_MS`].
//! Afterwards every unit's estimate at its last cycle is read back.
//!
//! The sink is the boundary where twins plug in: [`RulSink`] applies cycles straight to
//! a [`RulFeatures`] + [`RulModel`] per unit; a sink that routes each cycle to the unit's
//! DeviceTwin in its shard replaces it without touching the loop.

use crate::store::{EmbeddedConfig, EmbeddedStore};
use caretwin_actors::catalogue::Catalogue;
use caretwin_actors::host::clock::ManualClock;
use caretwin_actors::host::dispatch::{Delivery, Router};
use caretwin_actors::host::registry::HostConfig;
use caretwin_actors::mail::Mail;
use caretwin_actors::model::{HOUR_MS, TimeMs};
use caretwin_actors::rul::{CHANNELS, RulFeatures, RulModel, TrainingRun, channel_name};
use caretwin_actors::system::{Components, ServicesConfig, System};
use caretwin_actors::twins::device::{DeviceEnv, DeviceItem, DeviceMsg, DeviceReply, ItemKind};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

/// Columns of a C-MAPSS row: unit, cycle, then the [`CHANNELS`] values.
pub const COLUMNS: usize = 2 + CHANNELS;

/// The virtual epoch of a replay: 2026-01-01T00:00:00Z, in Unix ms.
pub const EPOCH_MS: TimeMs = 1_767_225_600_000;

/// When cycle `cycle` happens in a replay: `cycle` hours after [`EPOCH_MS`].
pub fn virtual_ts(cycle: u32) -> TimeMs {
    EPOCH_MS + u64::from(cycle) * HOUR_MS
}

/// What can fail while reading or replaying a recording.
///
/// Kept apart from [`crate::Error`], whose variants are the node's own failures: these
/// are about an operator's data file, and name the line at fault.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A row of the input is malformed; `line` counts from 1.
    #[error("line {line}: {reason}")]
    Line {
        /// The line, from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The input holds no rows.
    #[error("no readings in the input")]
    Empty,
    /// Fitting or reading a model failed.
    #[error(transparent)]
    Rul(#[from] caretwin_actors::Error),
    /// The sink refused a cycle.
    #[error("unit {unit} cycle {cycle}: {source}")]
    Apply {
        /// The unit.
        unit: u32,
        /// The cycle.
        cycle: u32,
        /// Why.
        source: caretwin_actors::Error,
    },
}

/// The built-in catalogue's turbofan, whose `[rul.params]` the replay uses by default.
pub const TURBOFAN_MODEL: &str = "turbofan.cmapss-fd001";

/// Reads fitted RUL parameters from TOML text: a bare table (as `fit` prints it, with or
/// without its `[rul.params]` header) or a whole catalogue entry holding `[rul.params]`.
pub fn rul_model_from_toml(text: &str) -> Result<RulModel, ReplayError> {
    let invalid = |reason: String| {
        ReplayError::Rul(caretwin_actors::Error::InvalidArgument {
            name: "rul params",
            reason,
        })
    };
    let mut table: toml::Table = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
    let params = match table.remove("rul") {
        Some(toml::Value::Table(mut rul)) => rul
            .remove("params")
            .ok_or_else(|| invalid("[rul] holds no fitted params".to_owned()))?,
        Some(_) => return Err(invalid("rul is not a table".to_owned())),
        None => toml::Value::Table(table),
    };
    params
        .try_into()
        .map_err(|e: toml::de::Error| invalid(e.to_string().trim_end().to_owned()))
}

/// The fitted parameters of the built-in catalogue's [`TURBOFAN_MODEL`], if it holds
/// them.
pub fn builtin_rul_model() -> Result<Option<RulModel>, ReplayError> {
    let catalogue = Catalogue::builtin();
    let Some(params) = catalogue
        .model(TURBOFAN_MODEL)
        .and_then(|m| m.rul())
        .and_then(|r| r.params.clone())
    else {
        return Ok(None);
    };
    let model = params.try_into().map_err(|e: toml::de::Error| {
        ReplayError::Rul(caretwin_actors::Error::InvalidArgument {
            name: "rul params",
            reason: format!("built-in {TURBOFAN_MODEL}: {}", e.to_string().trim_end()),
        })
    })?;
    Ok(Some(model))
}

/// One row: a unit's values at one cycle.
#[derive(Debug, Clone, PartialEq)]
pub struct CycleRow {
    /// The unit (engine).
    pub unit: u32,
    /// The cycle, increasing within a unit.
    pub cycle: u32,
    /// setting1..setting3, s1..s21.
    pub values: [f64; CHANNELS],
}

/// Parses C-MAPSS text: one row per line, `unit cycle setting1..3 s1..s21`, separated by
/// spaces or tabs (the NASA files use both, with `\n` or `\r\n`); blank lines are skipped.
///
/// Refuses, naming the line: a wrong column count, a unit or cycle that is not a whole
/// number, a value that is not a number or not finite, and a cycle that does not come
/// after the unit's previous one. Rows stay in file order (units may interleave).
pub fn parse_cmapss(text: &str) -> Result<Vec<CycleRow>, ReplayError> {
    let mut rows = Vec::new();
    let mut last: HashMap<u32, u32> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let bad = |reason: String| ReplayError::Line { line: n, reason };
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        if fields.len() != COLUMNS {
            return Err(bad(format!(
                "expected {COLUMNS} columns (unit cycle setting1..3 s1..s21), found {}",
                fields.len()
            )));
        }
        let whole = |what: &str, s: &str| {
            s.parse::<u32>()
                .map_err(|_| bad(format!("{what} {s:?} is not a whole number")))
        };
        let unit = whole("unit", fields[0])?;
        let cycle = whole("cycle", fields[1])?;
        let mut values = [0.0; CHANNELS];
        for (c, (slot, s)) in values.iter_mut().zip(&fields[2..]).enumerate() {
            let v: f64 = s.parse().map_err(|_| {
                bad(format!(
                    "column {} ({}) {s:?} is not a number",
                    c + 3,
                    channel_name(c)
                ))
            })?;
            if !v.is_finite() {
                return Err(bad(format!(
                    "column {} ({}) is {s}, not a finite number",
                    c + 3,
                    channel_name(c)
                )));
            }
            *slot = v;
        }
        if let Some(&prev) = last.get(&unit)
            && cycle <= prev
        {
            return Err(bad(format!(
                "unit {unit} cycle {cycle} comes after its cycle {prev}: cycles must increase \
                 within a unit"
            )));
        }
        last.insert(unit, cycle);
        rows.push(CycleRow {
            unit,
            cycle,
            values,
        });
    }
    if rows.is_empty() {
        return Err(ReplayError::Empty);
    }
    Ok(rows)
}

/// Groups rows into one run per unit, by unit id, each in cycle order: a run-to-failure
/// training file's engines, each failing at its last row.
pub fn training_runs(rows: &[CycleRow]) -> Vec<TrainingRun> {
    let mut runs: BTreeMap<u32, Vec<Vec<f64>>> = BTreeMap::new();
    for row in rows {
        runs.entry(row.unit).or_default().push(row.values.to_vec());
    }
    runs.into_iter()
        .map(|(unit, readings)| TrainingRun { unit, readings })
        .collect()
}

/// Where replayed cycles go: a twin per unit that estimates its remaining life.
#[async_trait::async_trait]
pub trait ReplaySink: Send {
    /// Applies unit `unit`'s values at `cycle`, happening at `ts_ms` (virtual time).
    async fn apply(
        &mut self,
        unit: u32,
        cycle: u32,
        ts_ms: TimeMs,
        values: &[f64],
    ) -> Result<(), ReplayError>;

    /// The unit's current remaining-life estimate, in cycles, if it has one.
    async fn rul(&self, unit: u32) -> Option<f64>;
}

/// A sink that feeds every unit's cycles into a real device twin: one twin per engine,
/// hosted in ractor shards exactly as on a cluster node, each reading applied by sequence
/// number and written through to an embedded store (in a temporary directory), in virtual
/// time. The estimate is read back from the twin.
pub struct TwinSink {
    system: System,
    clock: Arc<ManualClock>,
    seq: HashMap<u32, u64>,
    signals: Vec<String>,
    _dir: tempfile::TempDir,
}

/// Mail that would leave the node during a replay (maintenance requests to people) goes
/// nowhere: the replay only reports estimates.
struct Discard;

#[async_trait::async_trait]
impl Router for Discard {
    async fn deliver(&self, _mail: Mail) -> caretwin_actors::Result<Delivery> {
        Ok(Delivery::Delivered)
    }
}

impl TwinSink {
    /// Starts the twins' host with `model` as the turbofan's estimator.
    pub async fn start(model: RulModel) -> Result<Self, ReplayError> {
        let dir = tempfile::Builder::new()
            .prefix("caretwin-replay-")
            .tempdir()
            .map_err(|e| caretwin_actors::Error::Backend(format!("temporary directory: {e}")))?;
        let store = Arc::new(EmbeddedStore::open(&EmbeddedConfig::at(dir.path()))?);
        let catalogue = Arc::new(Catalogue::builtin());
        let signals = catalogue
            .model(TURBOFAN_MODEL)
            .ok_or_else(|| {
                caretwin_actors::Error::Config(format!("no {TURBOFAN_MODEL} in the catalogue"))
            })?
            .signals()
            .iter()
            .map(|s| s.name.clone())
            .collect::<Vec<_>>();
        if signals.len() != CHANNELS {
            return Err(caretwin_actors::Error::Config(format!(
                "{TURBOFAN_MODEL} has {} signals, C-MAPSS rows have {CHANNELS}",
                signals.len()
            ))
            .into());
        }
        let device_env = DeviceEnv::new(catalogue.clone())?.with_rul(TURBOFAN_MODEL, model)?;
        let clock = Arc::new(ManualClock::new(virtual_ts(0)));
        let system = System::start(Components {
            store,
            clock: clock.clone(),
            catalogue,
            device_env: Some(device_env),
            services: ServicesConfig::default(),
            host: HostConfig {
                shards: 16,
                idle_ms: u64::MAX,
            },
            outside: Arc::new(Discard),
            local_supplier: None,
        })
        .await?;
        Ok(Self {
            system,
            clock,
            seq: HashMap::new(),
            signals,
            _dir: dir,
        })
    }

    fn twin(unit: u32) -> String {
        format!("replay:engine-{unit}")
    }

    /// Stops the twins, then removes their store (in that order: the shards hold it).
    pub async fn close(self) {
        let TwinSink {
            system, _dir: dir, ..
        } = self;
        system.stop().await;
        drop(dir);
    }
}

#[async_trait::async_trait]
impl ReplaySink for TwinSink {
    async fn apply(
        &mut self,
        unit: u32,
        cycle: u32,
        ts_ms: TimeMs,
        values: &[f64],
    ) -> Result<(), ReplayError> {
        let fail = |source| ReplayError::Apply {
            unit,
            cycle,
            source,
        };
        let id = Self::twin(unit);
        let devices = self.system.devices();
        if !self.seq.contains_key(&unit) {
            let provision = DeviceMsg::Provision {
                customer: "replay:operator".into(),
                site: "replay:fleet".into(),
                model: TURBOFAN_MODEL.into(),
            };
            match devices.call(&id, provision).await.map_err(fail)? {
                DeviceReply::Ok => {}
                other => {
                    return Err(fail(caretwin_actors::Error::Twin {
                        id,
                        reason: format!("{other:?}"),
                    }));
                }
            }
        }
        self.clock.set(ts_ms);
        let seq = self.seq.entry(unit).or_insert(0);
        let items = values
            .iter()
            .zip(&self.signals)
            .map(|(v, s)| {
                *seq += 1;
                DeviceItem {
                    seq: *seq,
                    ts_ms,
                    kind: ItemKind::Reading {
                        signal: s.clone(),
                        value: *v,
                    },
                }
            })
            .collect();
        match devices
            .call(&id, DeviceMsg::Apply(items))
            .await
            .map_err(fail)?
        {
            DeviceReply::Applied(r) if r.rejected.is_empty() && r.gap_at.is_none() => Ok(()),
            other => Err(fail(caretwin_actors::Error::Twin {
                id,
                reason: format!("{other:?}"),
            })),
        }
    }

    async fn rul(&self, unit: u32) -> Option<f64> {
        self.system
            .devices()
            .inspect(&Self::twin(unit), |t| t.and_then(|t| t.remaining_life()))
            .await
            .ok()
            .flatten()
    }
}

/// A sink that applies cycles straight to one [`RulFeatures`] per unit and predicts with
/// a [`RulModel`] after every cycle, as a turbofan's twin does, without the twin around
/// it.
#[derive(Debug, Clone)]
pub struct RulSink {
    model: RulModel,
    units: HashMap<u32, (RulFeatures, f64)>,
}

impl RulSink {
    /// A sink with no units yet.
    pub fn new(model: RulModel) -> Self {
        Self {
            model,
            units: HashMap::new(),
        }
    }
}

#[async_trait::async_trait]
impl ReplaySink for RulSink {
    async fn apply(
        &mut self,
        unit: u32,
        cycle: u32,
        _ts_ms: TimeMs,
        values: &[f64],
    ) -> Result<(), ReplayError> {
        let (features, rul) = self
            .units
            .entry(unit)
            .or_insert_with(|| (RulFeatures::new(), self.model.cap()));
        features.push(values).map_err(|source| ReplayError::Apply {
            unit,
            cycle,
            source,
        })?;
        *rul = self.model.predict(features);
        Ok(())
    }

    async fn rul(&self, unit: u32) -> Option<f64> {
        self.units.get(&unit).map(|&(_, rul)| rul)
    }
}

/// A unit's estimate at the end of a replay.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitRul {
    /// The unit.
    pub unit: u32,
    /// Its last cycle in the recording.
    pub last_cycle: u32,
    /// The sink's estimate after it, in cycles (`None` if the sink had none).
    pub predicted_rul: Option<f64>,
}

/// Feeds `rows` to `sink` in order, each at its virtual time, calling `progress` with the
/// number of rows applied so far every 1,024 rows and at the end; then reads every unit's
/// estimate, by unit id.
pub async fn replay<S: ReplaySink>(
    rows: &[CycleRow],
    sink: &mut S,
    mut progress: impl FnMut(usize),
) -> Result<Vec<UnitRul>, ReplayError> {
    let mut last_cycle: BTreeMap<u32, u32> = BTreeMap::new();
    for (i, row) in rows.iter().enumerate() {
        sink.apply(row.unit, row.cycle, virtual_ts(row.cycle), &row.values)
            .await?;
        last_cycle.insert(row.unit, row.cycle);
        if (i + 1) % 1024 == 0 {
            progress(i + 1);
        }
    }
    progress(rows.len());
    let mut out = Vec::with_capacity(last_cycle.len());
    for (unit, last_cycle) in last_cycle {
        out.push(UnitRul {
            unit,
            last_cycle,
            predicted_rul: sink.rul(unit).await,
        });
    }
    Ok(out)
}

/// The replay's report as CSV: header `unit,last_cycle,predicted_rul`, then one line per
/// unit with the estimate to one decimal (empty when the sink had none).
pub fn to_csv(results: &[UnitRul]) -> String {
    let mut out = String::from("unit,last_cycle,predicted_rul\n");
    for r in results {
        let _ = match r.predicted_rul {
            Some(rul) => writeln!(out, "{},{},{rul:.1}", r.unit, r.last_cycle),
            None => writeln!(out, "{},{},", r.unit, r.last_cycle),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(unit: u32, cycle: u32, base: f64) -> String {
        let mut s = format!("{unit} {cycle}");
        for c in 0..CHANNELS {
            let _ = write!(s, " {}", base + c as f64);
        }
        s
    }

    #[test]
    fn parses_spaces_tabs_and_crlf() {
        let text = format!(
            "{}  \r\n{}\r\n\n{}\n",
            row(1, 1, 0.5),
            row(1, 2, 1.0).replace(' ', "\t"),
            row(2, 1, 2.0)
        );
        let rows = parse_cmapss(&text).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(
            (rows[1].unit, rows[1].cycle, rows[1].values[3]),
            (1, 2, 4.0)
        );
        let runs = training_runs(&rows);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].readings.len(), 2);
    }

    #[test]
    fn malformed_rows_name_their_line() {
        let good = format!("{}\n{}\n", row(1, 1, 0.0), row(1, 2, 0.0));
        let cases = [
            (format!("{good}1 3 0.1\n"), "line 3: expected 26 columns"),
            (
                format!("{good}{}\n", row(1, 2, 0.0)),
                "line 3: unit 1 cycle 2 comes after",
            ),
            (
                format!("{good}{}\n", row(1, 3, 0.5).replacen("5.5", "x", 1)),
                "line 3: column 8 (s3) \"x\" is not a number",
            ),
            (
                format!("{}\n{good}", row(1, 1, 0.0).replacen(" 2", " NaN", 1)),
                "line 1: column 5 (setting3) is NaN",
            ),
            (
                format!("x{good}"),
                "line 1: unit \"x1\" is not a whole number",
            ),
            (
                format!("{}\n", row(1, 1, 0.0).replacen("1 1", "1 -1", 1)),
                "cycle \"-1\"",
            ),
        ];
        for (text, want) in cases {
            let err = parse_cmapss(&text).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
        assert!(matches!(parse_cmapss("\n \n"), Err(ReplayError::Empty)));
    }

    #[test]
    fn parameters_read_bare_under_their_header_or_in_a_catalogue_entry() {
        use caretwin_actors::rul::{FitOptions, fit};
        let text: String = (1..=3)
            .flat_map(|u| (1..=40).map(move |c| row(u, c, f64::from(c) / 10.0) + "\n"))
            .collect();
        let runs = training_runs(&parse_cmapss(&text).unwrap());
        let options = FitOptions {
            trees: 3,
            ..FitOptions::default()
        };
        let model = fit(&runs, &options).unwrap();
        let bare = model.to_toml();
        assert_eq!(rul_model_from_toml(&bare).unwrap(), model);
        let entry = format!("id = \"x\"\n[rul]\nunit = \"cycles\"\n[rul.params]\n{bare}");
        assert_eq!(rul_model_from_toml(&entry).unwrap(), model);
        let err = rul_model_from_toml("[rul]\nunit = \"cycles\"\n").unwrap_err();
        assert!(err.to_string().contains("no fitted params"), "{err}");
        assert!(rul_model_from_toml("cap = 1").is_err());
    }

    #[test]
    fn the_builtin_catalogue_parameters_load_when_present() {
        // Either the turbofan entry holds no params yet, or they load as a model.
        let model = builtin_rul_model().unwrap();
        if let Some(m) = model {
            assert!(m.trees() > 0);
        }
    }

    #[tokio::test]
    async fn replay_reports_each_unit_at_its_last_cycle() {
        struct Counting(BTreeMap<u32, (u32, TimeMs)>);
        #[async_trait::async_trait]
        impl ReplaySink for Counting {
            async fn apply(
                &mut self,
                unit: u32,
                cycle: u32,
                ts: TimeMs,
                _: &[f64],
            ) -> Result<(), ReplayError> {
                self.0.insert(unit, (cycle, ts));
                Ok(())
            }
            async fn rul(&self, unit: u32) -> Option<f64> {
                self.0.get(&unit).map(|&(c, _)| f64::from(c) * 10.0 + 0.44)
            }
        }
        let text = [
            row(2, 1, 0.0),
            row(1, 1, 0.0),
            row(2, 2, 0.0),
            row(2, 3, 0.0),
        ]
        .join("\n");
        let rows = parse_cmapss(&text).unwrap();
        let mut sink = Counting(BTreeMap::new());
        let mut seen = 0;
        let results = replay(&rows, &mut sink, |n| seen = n).await.unwrap();
        assert_eq!(seen, 4);
        assert_eq!(sink.0[&2], (3, EPOCH_MS + 3 * HOUR_MS));
        assert_eq!(
            to_csv(&results),
            "unit,last_cycle,predicted_rul\n1,1,10.4\n2,3,30.4\n"
        );
    }
}
