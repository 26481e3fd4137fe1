//! From TOML text to a validated, indexed [`DeviceModel`].
//!
//! Validation does not stop at the first problem: it checks everything it can and
//! reports every problem, each naming the model, the entry (`signals[2] "pressure"`) and
//! the field, so a service team fixes a file in one pass.

use std::collections::HashMap;
use std::fmt::Display;

use super::duration::parse_duration_ms;
use super::error::Problem;
use super::playbook::{Action, ArgValue, CONFIRM_VISIT, Condition, DECLINE_VISIT, Step};
use super::raw::{
    RawAlarm, RawConsumable, RawDiagnosticCode, RawFailureMode, RawModel, RawPart, RawQuestion,
    RawRul, RawSignal, RawStep,
};
use super::types::{
    Alarm, Consumable, DiagnosticCode, FailureMode, Gauge, Part, Price, Question, ReorderPoint,
    RulSpec, Signal, SignalIndicator,
};
use super::{DeviceModel, ModelIndex, insight_slot};
use crate::model::{ConsentScope, Direction, InsightKind, Priority};

/// Longest id, name or part number accepted.
const MAX_ID_LEN: usize = 64;

/// Parses one model file and validates it.
pub(super) fn parse_model(source: &str, text: &str) -> Result<DeviceModel, Vec<Problem>> {
    let raw: RawModel = toml::from_str(text).map_err(|e| {
        let path = e
            .span()
            .map(|span| {
                let (line, column) = line_column(text, span.start);
                format!("line {line}, column {column}")
            })
            .unwrap_or_default();
        vec![Problem {
            source: source.to_owned(),
            model: peek_id(text),
            path,
            message: e.message().trim().to_owned(),
        }]
    })?;
    let id = raw.id.clone();
    Checker::new(source, &id).model(raw)
}

/// The model id, read leniently so a parse error can still name the model: from the
/// parsed document when it parses, else from a top-level `id = "..."` line.
fn peek_id(text: &str) -> Option<String> {
    if let Ok(table) = text.parse::<toml::Table>() {
        return table.get("id")?.as_str().map(str::to_owned);
    }
    text.lines()
        .map(str::trim)
        .take_while(|line| !line.starts_with('['))
        .find_map(|line| {
            let value = line
                .strip_prefix("id")?
                .trim_start()
                .strip_prefix('=')?
                .trim();
            let id = value.strip_prefix('"')?.strip_suffix('"')?;
            (!id.contains(['"', '\\'])).then(|| id.to_owned())
        })
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Name of a direction as the catalogue writes it.
fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::Rising => "rising",
        Direction::Falling => "falling",
    }
}

fn priority_name(p: Priority) -> &'static str {
    match p {
        Priority::Low => "low",
        Priority::Normal => "normal",
        Priority::High => "high",
        Priority::Safety => "safety",
    }
}

fn insight_name(k: InsightKind) -> &'static str {
    match k {
        InsightKind::Anomaly => "anomaly",
        InsightKind::Drift => "drift",
        InsightKind::Forecast => "forecast",
        InsightKind::ConsumableLow => "consumable_low",
        InsightKind::FailureNow => "failure_now",
        InsightKind::RemainingLife => "remaining_life",
        InsightKind::Alarm => "alarm",
        InsightKind::Diagnostic => "diagnostic",
    }
}

fn scope_name(s: ConsentScope) -> &'static str {
    match s {
        ConsentScope::Diagnostics => "diagnostics",
        ConsentScope::UsageAnalytics => "usage_analytics",
        ConsentScope::Marketing => "marketing",
        ConsentScope::Contact => "contact",
    }
}

/// Indexes the entries of one section by name, reporting empty and duplicate names.
fn index_names<'a>(
    chk: &mut Checker,
    section: &str,
    field: &str,
    names: impl Iterator<Item = &'a str>,
) -> HashMap<String, usize> {
    let mut index = HashMap::new();
    for (i, name) in names.enumerate() {
        let entry = format!("{section}[{i}] {name:?}");
        chk.ident(&entry, field, name);
        if let Some(first) = index.get(name) {
            chk.fail(
                &entry,
                format!("{field} {name:?} duplicates {section}[{first}]"),
            );
        } else {
            index.insert(name.to_owned(), i);
        }
    }
    index
}

/// What a playbook step may refer to, learnt from the steps before it.
#[derive(Default)]
struct StepsSoFar {
    /// 1-based number of the latest remote_command step.
    remote: Option<usize>,
    /// 1-based number and options of the latest ask_customer step.
    ask: Option<(usize, Vec<String>)>,
    /// 1-based number of the first order_part step.
    order_part: Option<usize>,
}

struct Checker<'a> {
    source: &'a str,
    model: &'a str,
    problems: Vec<Problem>,
}

impl<'a> Checker<'a> {
    fn new(source: &'a str, model: &'a str) -> Self {
        Self {
            source,
            model,
            problems: Vec::new(),
        }
    }

    fn fail(&mut self, path: impl Display, message: impl Display) {
        self.problems.push(Problem {
            source: self.source.to_owned(),
            model: Some(self.model.to_owned()),
            path: path.to_string(),
            message: message.to_string(),
        });
    }

    /// An id, name, code or part number: 1..=64 of `A-Z a-z 0-9 . _ -`.
    fn ident(&mut self, path: &str, field: &str, value: &str) -> bool {
        let ok = !value.is_empty()
            && value.len() <= MAX_ID_LEN
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            self.fail(
                path,
                format!(
                    "{field} {value:?} must be 1 to {MAX_ID_LEN} characters of letters, digits, '.', '_' or '-'"
                ),
            );
        }
        ok
    }

    /// Text for people: not blank.
    fn text(&mut self, path: &str, field: &str, value: &str) {
        if value.trim().is_empty() {
            self.fail(path, format!("{field} must not be empty"));
        }
    }

    fn finite(&mut self, path: &str, field: &str, value: f64) -> bool {
        if value.is_finite() {
            true
        } else {
            self.fail(path, format!("{field} {value:?} is not a finite number"));
            false
        }
    }

    fn positive(&mut self, path: &str, field: &str, value: f64) {
        if self.finite(path, field, value) && value <= 0.0 {
            self.fail(path, format!("{field} {value:?} must be positive"));
        }
    }

    fn fraction(&mut self, path: &str, field: &str, value: f64) {
        if self.finite(path, field, value) && !(0.0..=1.0).contains(&value) {
            self.fail(path, format!("{field} {value:?} must lie in 0..=1"));
        }
    }

    fn duration(&mut self, path: &str, field: &str, text: &str) -> u64 {
        parse_duration_ms(text).unwrap_or_else(|e| {
            self.fail(path, format!("{field}: {e}"));
            0
        })
    }

    /// Options offered to a customer: at least two, none blank, no repeats.
    fn options(&mut self, path: &str, options: &[String]) {
        if options.len() < 2 {
            self.fail(path, "options must offer at least two answers");
        }
        for (i, option) in options.iter().enumerate() {
            self.text(path, &format!("options[{i}]"), option);
            if options[..i].contains(option) {
                self.fail(path, format!("options[{i}] {option:?} is offered twice"));
            }
        }
    }

    /// Every float anywhere inside an opaque TOML value must be finite.
    fn finite_value(&mut self, path: &str, at: &str, value: &toml::Value) {
        match value {
            toml::Value::Float(f) if !f.is_finite() => {
                self.fail(path, format!("{at} {f:?} is not a finite number"));
            }
            toml::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.finite_value(path, &format!("{at}[{i}]"), item);
                }
            }
            toml::Value::Table(table) => {
                for (key, item) in table {
                    self.finite_value(path, &format!("{at}.{key}"), item);
                }
            }
            _ => {}
        }
    }

    fn model(mut self, raw: RawModel) -> Result<DeviceModel, Vec<Problem>> {
        self.ident("id", "id", &raw.id);
        self.text("name", "name", &raw.name);
        self.ident("category", "category", &raw.category);
        if let Some(d) = &raw.description {
            self.text("description", "description", d);
        }

        let commands = index_names(
            &mut self,
            "commands",
            "command",
            raw.commands.iter().map(String::as_str),
        );
        let signal_index = index_names(
            &mut self,
            "signals",
            "name",
            raw.signals.iter().map(|s| s.name.as_str()),
        );
        let part_index = index_names(
            &mut self,
            "parts",
            "number",
            raw.parts.iter().map(|p| p.number.as_str()),
        );
        let consumable_index = index_names(
            &mut self,
            "consumables",
            "name",
            raw.consumables.iter().map(|c| c.name.as_str()),
        );
        let mode_index = index_names(
            &mut self,
            "failure_modes",
            "id",
            raw.failure_modes.iter().map(|m| m.id.as_str()),
        );
        let question_index = index_names(
            &mut self,
            "questions",
            "id",
            raw.questions.iter().map(|q| q.id.as_str()),
        );

        let signals: Vec<Signal> = raw
            .signals
            .into_iter()
            .enumerate()
            .map(|(i, s)| self.signal(i, s))
            .collect();
        let parts: Vec<Part> = raw
            .parts
            .into_iter()
            .enumerate()
            .map(|(i, p)| self.part(i, p))
            .collect();
        let consumables: Vec<Consumable> = raw
            .consumables
            .into_iter()
            .enumerate()
            .map(|(i, c)| self.consumable(i, c, &signals, &signal_index, &part_index))
            .collect();

        let refs = Refs {
            commands: &commands,
            signals: &signals,
            signal_index: &signal_index,
            parts: &part_index,
            consumables: &consumable_index,
            questions: &raw.questions,
            question_index: &question_index,
        };
        let failure_modes: Vec<FailureMode> = raw
            .failure_modes
            .into_iter()
            .enumerate()
            .map(|(i, m)| self.failure_mode(i, m, &refs))
            .collect();

        // Which modes something points to, to find modes nothing can ever raise.
        let mut indicated = vec![false; failure_modes.len()];
        let mut mode_ref = |chk: &mut Self, path: &str, id: &str| -> Option<usize> {
            let found = mode_index.get(id).copied();
            match found {
                Some(m) => indicated[m] = true,
                None => chk.fail(
                    path,
                    format!("failure_mode {id:?} is not among the model's failure_modes"),
                ),
            }
            found
        };

        let mut codes = HashMap::new();
        let mut diagnostic_codes = Vec::with_capacity(raw.diagnostic_codes.len());
        for (i, c) in raw.diagnostic_codes.into_iter().enumerate() {
            let (code, mode) = self.diagnostic_code(i, c, &mut mode_ref);
            if let Some(&(first, _)) = codes.get(&code.code) {
                self.fail(
                    format!("diagnostic_codes[{i}] {:?}", code.code),
                    format!("code {:?} duplicates diagnostic_codes[{first}]", code.code),
                );
            } else if let Some(m) = mode {
                codes.insert(code.code.clone(), (i, m));
            }
            diagnostic_codes.push(code);
        }

        let mut questions_by_id = HashMap::new();
        let mut questions = Vec::with_capacity(raw.questions.len());
        for (i, q) in raw.questions.into_iter().enumerate() {
            let (question, mode) = self.question(i, q, &mut mode_ref);
            if let Some(m) = mode {
                questions_by_id.entry(question.id.clone()).or_insert((i, m));
            }
            questions.push(question);
        }

        let mut alarms_by_kind = HashMap::new();
        let mut alarms = Vec::with_capacity(raw.alarms.len());
        for (i, a) in raw.alarms.into_iter().enumerate() {
            let (alarm, mode) = self.alarm(i, a, &commands, &failure_modes, &mut mode_ref);
            if let Some(&(first, _)) = alarms_by_kind.get(&alarm.kind) {
                self.fail(
                    format!("alarms[{i}] {:?}", alarm.kind),
                    format!("kind {:?} duplicates alarms[{first}]", alarm.kind),
                );
            } else if let Some(m) = mode {
                alarms_by_kind.insert(alarm.kind.clone(), (i, m));
            }
            alarms.push(alarm);
        }

        let mut rul_mode = None;
        let rul = raw.rul.map(|r| {
            let (rul, mode) = self.rul(r, &signals, &signal_index, &mut mode_ref);
            rul_mode = mode;
            rul
        });

        // One mode per (signal, insight kind), so an insight names its root cause alone.
        let mut signal_modes: Vec<[Option<usize>; 4]> = vec![[None; 4]; signals.len()];
        for (m, mode) in failure_modes.iter().enumerate() {
            if !mode.indicators.is_empty() {
                indicated[m] = true;
            }
            for ind in &mode.indicators {
                for &kind in &ind.insights {
                    let Some(slot) = insight_slot(kind) else {
                        continue;
                    };
                    let cell = &mut signal_modes[ind.signal_index][slot];
                    match *cell {
                        Some(other) if other != m => self.fail(
                            format!("failure_modes[{m}] {:?}", mode.id),
                            format!(
                                "indicators: signal {:?} with insight {} already indicates failure mode {:?}",
                                ind.signal,
                                insight_name(kind),
                                failure_modes[other].id
                            ),
                        ),
                        _ => *cell = Some(m),
                    }
                }
            }
        }
        for (m, mode) in failure_modes.iter().enumerate() {
            if !indicated[m] {
                self.fail(
                    format!("failure_modes[{m}] {:?}", mode.id),
                    "nothing indicates this failure mode: give it indicators, or point a \
                     diagnostic code, question, alarm or the rul section at it",
                );
            }
        }

        let mut gauged = vec![Vec::new(); signals.len()];
        for (c, consumable) in consumables.iter().enumerate() {
            if let Some(list) = gauged.get_mut(consumable.signal_index) {
                list.push(c);
            }
        }

        if !self.problems.is_empty() {
            return Err(self.problems);
        }
        Ok(DeviceModel {
            id: raw.id,
            name: raw.name,
            category: raw.category,
            description: raw.description,
            source: self.source.to_owned(),
            commands: raw.commands,
            signals,
            consumables,
            parts,
            failure_modes,
            diagnostic_codes,
            questions,
            alarms,
            rul,
            index: ModelIndex {
                commands,
                signals: signal_index,
                consumables: consumable_index,
                parts: part_index,
                failure_modes: mode_index,
                codes,
                questions: questions_by_id,
                alarms: alarms_by_kind,
                signal_modes,
                gauged,
                rul_mode,
            },
        })
    }

    fn signal(&mut self, i: usize, s: RawSignal) -> Signal {
        let path = format!("signals[{i}] {:?}", s.name);
        self.text(&path, "unit", &s.unit);
        if let Some(d) = &s.description {
            self.text(&path, "description", d);
        }
        match (&s.normal, s.cumulative) {
            (Some(n), _) => {
                let ok = self.finite(&path, "normal.min", n.min)
                    & self.finite(&path, "normal.max", n.max);
                if ok && n.min >= n.max {
                    self.fail(
                        &path,
                        format!(
                            "normal.min {:?} must be below normal.max {:?}",
                            n.min, n.max
                        ),
                    );
                }
            }
            (None, true) => {}
            (None, false) => self.fail(
                &path,
                "normal is required unless the signal is cumulative (a counter)",
            ),
        }
        if let Some(f) = &s.failure {
            if s.cumulative {
                self.fail(
                    &path,
                    "failure: a cumulative signal (a counter) has no failure threshold; \
                     put its limit on a consumable",
                );
            }
            if self.finite(&path, "failure.threshold", f.threshold)
                && let Some(n) = s.normal.filter(|n| n.min.is_finite() && n.max.is_finite())
            {
                let beyond = match f.direction {
                    Direction::Rising => f.threshold > n.max,
                    Direction::Falling => f.threshold < n.min,
                };
                if !beyond {
                    let place = if n.contains(f.threshold) {
                        "inside"
                    } else if f.threshold < n.min {
                        "below"
                    } else {
                        "above"
                    };
                    self.fail(
                        &path,
                        format!(
                            "failure.threshold {:?} lies {place} the normal range {:?}..={:?} for direction {}",
                            f.threshold,
                            n.min,
                            n.max,
                            direction_name(f.direction)
                        ),
                    );
                }
            }
        }
        if !matches!(
            s.scope,
            ConsentScope::Diagnostics | ConsentScope::UsageAnalytics
        ) {
            self.fail(
                &path,
                format!(
                    "scope {} is not a scope readings fall under (use diagnostics or usage_analytics)",
                    scope_name(s.scope)
                ),
            );
        }
        let d = &s.detector;
        if self.finite(&path, "detector.ewma_alpha", d.ewma_alpha)
            && !(d.ewma_alpha > 0.0 && d.ewma_alpha <= 1.0)
        {
            self.fail(
                &path,
                format!("detector.ewma_alpha {:?} must lie in (0, 1]", d.ewma_alpha),
            );
        }
        self.positive(&path, "detector.anomaly_z", d.anomaly_z);
        self.positive(&path, "detector.drift_sensitivity", d.drift_sensitivity);
        if d.persistence == 0 {
            self.fail(&path, "detector.persistence must be at least 1");
        }
        Signal {
            name: s.name,
            unit: s.unit,
            description: s.description,
            normal: s.normal,
            failure: s.failure,
            scope: s.scope,
            detector: s.detector,
            cumulative: s.cumulative,
        }
    }

    fn part(&mut self, i: usize, p: RawPart) -> Part {
        let path = format!("parts[{i}] {:?}", p.number);
        self.text(&path, "name", &p.name);
        let lead_time_ms = self.duration(&path, "lead_time", &p.lead_time);
        let price = p.price.map(|price| {
            let mut minor_units = 0;
            if self.finite(&path, "price.amount", price.amount) {
                let cents = price.amount * 100.0;
                if !(0.0..=1e15).contains(&cents) {
                    self.fail(
                        &path,
                        format!("price.amount {:?} must lie in 0..=1e13", price.amount),
                    );
                } else if (cents - cents.round()).abs() > 1e-6 {
                    self.fail(
                        &path,
                        format!("price.amount {:?} has more than two decimals", price.amount),
                    );
                } else {
                    // In range and whole: the cast is exact.
                    minor_units = cents.round() as u64;
                }
            }
            if !(price.currency.len() == 3
                && price.currency.bytes().all(|b| b.is_ascii_uppercase()))
            {
                self.fail(
                    &path,
                    format!(
                        "price.currency {:?} must be an ISO 4217 code (three capital letters)",
                        price.currency
                    ),
                );
            }
            Price {
                minor_units,
                currency: price.currency,
            }
        });
        Part {
            number: p.number,
            name: p.name,
            lead_time_ms,
            price,
        }
    }

    fn consumable(
        &mut self,
        i: usize,
        c: RawConsumable,
        signals: &[Signal],
        signal_index: &HashMap<String, usize>,
        parts: &HashMap<String, usize>,
    ) -> Consumable {
        let path = format!("consumables[{i}] {:?}", c.name);
        self.positive(&path, "capacity", c.capacity);
        let (gauge, field, signal) = match (c.usage_signal, c.level_signal) {
            (Some(s), None) => (Gauge::Usage, "usage_signal", s),
            (None, Some(s)) => (Gauge::Level, "level_signal", s),
            _ => {
                self.fail(
                    &path,
                    "exactly one of usage_signal and level_signal is required",
                );
                (Gauge::Usage, "usage_signal", String::new())
            }
        };
        let mut index = usize::MAX;
        if !signal.is_empty() {
            match signal_index.get(&signal) {
                None => self.fail(
                    &path,
                    format!("{field} {signal:?} is not among the model's signals"),
                ),
                Some(&s) => {
                    index = s;
                    match (gauge, signals[s].cumulative) {
                        (Gauge::Usage, false) => self.fail(
                            &path,
                            format!(
                                "usage_signal {signal:?} is not cumulative: a usage gauge needs a counter \
                                 (set cumulative = true on it, or use level_signal)"
                            ),
                        ),
                        (Gauge::Level, true) => self.fail(
                            &path,
                            format!(
                                "level_signal {signal:?} is cumulative: a counter is read with usage_signal"
                            ),
                        ),
                        _ => {}
                    }
                }
            }
        }
        match c.reorder_at {
            ReorderPoint::Fraction(f) => self.fraction(&path, "reorder_at.fraction", f),
            ReorderPoint::Remaining(r) => {
                if self.finite(&path, "reorder_at.remaining", r)
                    && c.capacity.is_finite()
                    && !(0.0..c.capacity).contains(&r)
                {
                    self.fail(
                        &path,
                        format!(
                            "reorder_at.remaining {r:?} must lie in 0..{:?} (below the capacity)",
                            c.capacity
                        ),
                    );
                }
            }
        }
        if !parts.contains_key(&c.part) {
            self.fail(
                &path,
                format!("part {:?} is not among the model's parts", c.part),
            );
        }
        Consumable {
            name: c.name,
            capacity: c.capacity,
            gauge,
            signal,
            signal_index: index,
            reorder_at: c.reorder_at,
            part: c.part,
            auto_order: c.auto_order,
        }
    }

    fn failure_mode(&mut self, i: usize, m: RawFailureMode, refs: &Refs<'_>) -> FailureMode {
        let path = format!("failure_modes[{i}] {:?}", m.id);
        self.text(&path, "name", &m.name);
        if let Some(skill) = &m.skill {
            self.ident(&path, "skill", skill);
        }
        for (j, part) in m.parts.iter().enumerate() {
            if !refs.parts.contains_key(part) {
                self.fail(
                    &path,
                    format!("parts[{j}] {part:?} is not among the model's parts"),
                );
            } else if m.parts[..j].contains(part) {
                self.fail(&path, format!("parts[{j}] {part:?} is listed twice"));
            }
        }

        let mut indicators = Vec::with_capacity(m.indicators.len());
        for (j, ind) in m.indicators.iter().enumerate() {
            let at = format!("indicators[{j}]");
            let Some(&s) = refs.signal_index.get(&ind.signal) else {
                self.fail(
                    &path,
                    format!(
                        "{at}: signal {:?} is not among the model's signals",
                        ind.signal
                    ),
                );
                continue;
            };
            if indicators
                .iter()
                .any(|x: &SignalIndicator| x.signal_index == s)
            {
                self.fail(
                    &path,
                    format!("{at}: signal {:?} is listed twice", ind.signal),
                );
                continue;
            }
            let signal = &refs.signals[s];
            if signal.cumulative {
                self.fail(
                    &path,
                    format!(
                        "{at}: signal {:?} is cumulative (a counter) and cannot indicate a failure mode",
                        ind.signal
                    ),
                );
            }
            let has_threshold = signal.failure.is_some();
            let insights = match &ind.insights {
                Some(list) => {
                    if list.is_empty() {
                        self.fail(&path, format!("{at}: insights must not be empty"));
                    }
                    for (k, &kind) in list.iter().enumerate() {
                        if insight_slot(kind).is_none() {
                            self.fail(
                                &path,
                                format!(
                                    "{at}: insights[{k}] {} is not raised by a signal \
                                     (use anomaly, drift, forecast or failure_now)",
                                    insight_name(kind)
                                ),
                            );
                        } else if list[..k].contains(&kind) {
                            self.fail(
                                &path,
                                format!(
                                    "{at}: insights[{k}] {} is listed twice",
                                    insight_name(kind)
                                ),
                            );
                        } else if !has_threshold
                            && matches!(kind, InsightKind::Forecast | InsightKind::FailureNow)
                        {
                            self.fail(
                                &path,
                                format!(
                                    "{at}: insights[{k}] {} needs a failure threshold, and signal {:?} has none",
                                    insight_name(kind),
                                    ind.signal
                                ),
                            );
                        }
                    }
                    list.clone()
                }
                // By default, every insight the signal can raise.
                None if has_threshold => vec![
                    InsightKind::Anomaly,
                    InsightKind::Drift,
                    InsightKind::Forecast,
                    InsightKind::FailureNow,
                ],
                None => vec![InsightKind::Anomaly, InsightKind::Drift],
            };
            indicators.push(SignalIndicator {
                signal: ind.signal.clone(),
                signal_index: s,
                insights,
            });
        }

        let playbook = self.playbook(&path, &m, refs);
        FailureMode {
            id: m.id,
            name: m.name,
            severity: m.severity,
            skill: m.skill,
            parts: m.parts,
            indicators,
            playbook,
        }
    }

    fn playbook(&mut self, path: &str, m: &RawFailureMode, refs: &Refs<'_>) -> Vec<Step> {
        if m.playbook.is_empty() {
            self.fail(path, "playbook is empty: it needs at least a handoff step");
            return Vec::new();
        }
        let safety = m.severity == Priority::Safety;
        let mut so_far = StepsSoFar::default();
        let mut ended_at: Option<usize> = None;
        let mut hands_off = false;
        let mut safety_notify = false;
        let mut safety_handoff = false;
        let mut steps = Vec::with_capacity(m.playbook.len());
        for (j, raw) in m.playbook.iter().enumerate() {
            let n = j + 1;
            let (action, when) = self.step(path, n, raw, m, refs, &so_far);
            let at = format!("{path}: playbook step {n} ({})", action.name());
            if let Some(h) = ended_at {
                self.fail(
                    &at,
                    format!("is unreachable: step {h} hands off unconditionally"),
                );
            }
            let always = *when == Condition::Always;
            match &action {
                Action::RemoteCommand { .. } => so_far.remote = Some(n),
                Action::OrderPart { .. } => {
                    so_far.order_part.get_or_insert(n);
                }
                Action::AskCustomer { options, .. } => so_far.ask = Some((n, options.clone())),
                // A booking asks the customer to confirm the visit.
                Action::BookTechnician { .. } => {
                    so_far.ask = Some((n, vec![CONFIRM_VISIT.into(), DECLINE_VISIT.into()]))
                }
                Action::NotifyCustomer { priority, .. } => {
                    if *priority == Priority::Safety && !safety {
                        self.fail(
                            &at,
                            format!(
                                "priority safety overrides quiet hours and is kept for safety failure modes; \
                                 this mode's severity is {}",
                                priority_name(m.severity)
                            ),
                        );
                    }
                    safety_notify |= always && *priority == Priority::Safety;
                }
                Action::Handoff { .. } => {
                    hands_off = true;
                    if always {
                        safety_handoff = true;
                        ended_at.get_or_insert(n);
                    }
                }
                Action::OrderConsumable { .. } => {}
            }
            steps.push(Step {
                when: when.clone(),
                action,
            });
        }
        if !hands_off {
            self.fail(
                path,
                "playbook never hands off: add a handoff step (with a when condition if it is a last resort)",
            );
        }
        if safety && !safety_notify {
            self.fail(
                path,
                "a safety failure mode's playbook must notify_customer with priority safety unconditionally",
            );
        }
        if safety && !safety_handoff {
            self.fail(
                path,
                "a safety failure mode's playbook must hand off unconditionally",
            );
        }
        steps
    }

    fn step<'r>(
        &mut self,
        path: &str,
        n: usize,
        raw: &'r RawStep,
        m: &RawFailureMode,
        refs: &Refs<'_>,
        so_far: &StepsSoFar,
    ) -> (Action, &'r Condition) {
        let name = raw_step_name(raw);
        let at = format!("{path}: playbook step {n} ({name})");
        let (action, when) = match raw {
            RawStep::RemoteCommand {
                command,
                args,
                wait,
                when,
            } => {
                if !refs.commands.contains_key(command) {
                    self.fail(
                        &at,
                        format!("command {command:?} is not among the model's commands"),
                    );
                }
                for (key, value) in args {
                    self.ident(&at, "args key", key);
                    if let ArgValue::Float(f) = value {
                        self.finite(&at, &format!("args.{key}"), *f);
                    }
                }
                let wait_ms = self.duration(&at, "wait", wait);
                let action = Action::RemoteCommand {
                    command: command.clone(),
                    args: args.clone(),
                    wait_ms,
                };
                (action, when)
            }
            RawStep::OrderConsumable {
                consumable,
                quantity,
                when,
            } => {
                if !refs.consumables.contains_key(consumable) {
                    self.fail(
                        &at,
                        format!("consumable {consumable:?} is not among the model's consumables"),
                    );
                }
                if *quantity == 0 {
                    self.fail(&at, "quantity must be at least 1");
                }
                let action = Action::OrderConsumable {
                    consumable: consumable.clone(),
                    quantity: *quantity,
                };
                (action, when)
            }
            RawStep::OrderPart {
                part,
                quantity,
                when,
            } => {
                if !refs.parts.contains_key(part) {
                    self.fail(&at, format!("order_part names unknown part {part:?}"));
                } else if !m.parts.contains(part) {
                    self.fail(
                        &at,
                        format!("part {part:?} is not in the failure mode's parts (list it there)"),
                    );
                }
                if *quantity == 0 {
                    self.fail(&at, "quantity must be at least 1");
                }
                let action = Action::OrderPart {
                    part: part.clone(),
                    quantity: *quantity,
                };
                (action, when)
            }
            RawStep::BookTechnician {
                skill,
                duration,
                after_part_arrives,
                when,
            } => {
                let skill = match skill.as_ref().or(m.skill.as_ref()) {
                    Some(s) => {
                        self.ident(&at, "skill", s);
                        s.clone()
                    }
                    None => {
                        self.fail(
                            &at,
                            "skill is missing: set it on the step or on the failure mode",
                        );
                        String::new()
                    }
                };
                let duration_ms = self.duration(&at, "duration", duration);
                if *after_part_arrives && so_far.order_part.is_none() {
                    self.fail(&at, "after_part_arrives needs an earlier order_part step");
                }
                let action = Action::BookTechnician {
                    skill,
                    duration_ms,
                    after_part_arrives: *after_part_arrives,
                };
                (action, when)
            }
            RawStep::AskCustomer {
                question,
                options,
                relay,
                timeout,
                when,
            } => {
                let timeout_ms = self.duration(&at, "timeout", timeout);
                let (question_id, text, options) = match (question, options, relay) {
                    (Some(text), Some(options), None) => {
                        self.text(&at, "question", text);
                        self.options(&at, options);
                        (None, text.clone(), options.clone())
                    }
                    (None, None, Some(id)) => match refs.question_index.get(id) {
                        Some(&q) => {
                            let q = &refs.questions[q];
                            (Some(id.clone()), q.text.clone(), q.options.clone())
                        }
                        None => {
                            self.fail(
                                &at,
                                format!("relay {id:?} is not among the model's questions"),
                            );
                            (Some(id.clone()), String::new(), Vec::new())
                        }
                    },
                    _ => {
                        self.fail(
                            &at,
                            "give either question and options, or relay (the id of a product question)",
                        );
                        (None, String::new(), Vec::new())
                    }
                };
                let action = Action::AskCustomer {
                    question_id,
                    text,
                    options,
                    timeout_ms,
                };
                (action, when)
            }
            RawStep::NotifyCustomer {
                template,
                priority,
                when,
            } => {
                self.ident(&at, "template", template);
                let action = Action::NotifyCustomer {
                    template: template.clone(),
                    priority: *priority,
                };
                (action, when)
            }
            RawStep::Handoff { reason, when } => {
                self.text(&at, "reason", reason);
                let action = Action::Handoff {
                    reason: reason.clone(),
                };
                (action, when)
            }
        };
        let orders = matches!(
            raw,
            RawStep::OrderConsumable { .. }
                | RawStep::OrderPart { .. }
                | RawStep::BookTechnician { .. }
        );
        self.condition(&at, "when", when, orders, so_far);
        (action, when)
    }

    fn condition(
        &mut self,
        at: &str,
        field: &str,
        c: &Condition,
        orders: bool,
        so_far: &StepsSoFar,
    ) {
        match c {
            Condition::Always => {}
            Condition::RemedyFailed | Condition::RemedySucceeded => {
                if so_far.remote.is_none() {
                    let name = if *c == Condition::RemedyFailed {
                        "remedy_failed"
                    } else {
                        "remedy_succeeded"
                    };
                    self.fail(at, format!("{field} {name} needs an earlier remote_command step"));
                }
            }
            Condition::StandingApproval | Condition::NoStandingApproval => {
                if !orders {
                    self.fail(
                        at,
                        format!(
                            "{field}: standing approvals apply only to order_consumable, order_part \
                             and book_technician steps"
                        ),
                    );
                }
            }
            Condition::ConfidenceBelow(x) => {
                self.fraction(at, &format!("{field} confidence_below"), *x);
            }
            Condition::ConfidenceAtLeast(x) => {
                self.fraction(at, &format!("{field} confidence_at_least"), *x);
            }
            Condition::Answer(answer) => match &so_far.ask {
                None => self.fail(at, format!("{field} answer {answer:?} needs an earlier ask_customer step")),
                Some((n, options)) if !options.contains(answer) => self.fail(
                    at,
                    format!(
                        "{field} answer {answer:?} is not an option of the question in step {n} {options:?}"
                    ),
                ),
                Some(_) => {}
            },
            Condition::NoAnswer => {
                if so_far.ask.is_none() {
                    self.fail(at, format!("{field} no_answer needs an earlier ask_customer step"));
                }
            }
            Condition::All(cs) | Condition::Any(cs) => {
                let name = if matches!(c, Condition::All(_)) { "all" } else { "any" };
                if cs.is_empty() {
                    self.fail(at, format!("{field} {name} must not be empty"));
                }
                for (k, inner) in cs.iter().enumerate() {
                    self.condition(at, &format!("{field} {name}[{k}]"), inner, orders, so_far);
                }
            }
        }
    }

    fn diagnostic_code(
        &mut self,
        i: usize,
        c: RawDiagnosticCode,
        mode_ref: &mut impl FnMut(&mut Self, &str, &str) -> Option<usize>,
    ) -> (DiagnosticCode, Option<usize>) {
        let path = format!("diagnostic_codes[{i}] {:?}", c.code);
        self.ident(&path, "code", &c.code);
        self.text(&path, "description", &c.description);
        self.fraction(&path, "confidence", c.confidence);
        let mode = mode_ref(self, &path, &c.failure_mode);
        let code = DiagnosticCode {
            code: c.code,
            description: c.description,
            failure_mode: c.failure_mode,
            confidence: c.confidence,
        };
        (code, mode)
    }

    fn question(
        &mut self,
        i: usize,
        q: RawQuestion,
        mode_ref: &mut impl FnMut(&mut Self, &str, &str) -> Option<usize>,
    ) -> (Question, Option<usize>) {
        let path = format!("questions[{i}] {:?}", q.id);
        self.text(&path, "text", &q.text);
        self.options(&path, &q.options);
        self.fraction(&path, "confidence", q.confidence);
        let mode = mode_ref(self, &path, &q.failure_mode);
        let question = Question {
            id: q.id,
            text: q.text,
            options: q.options,
            failure_mode: q.failure_mode,
            confidence: q.confidence,
        };
        (question, mode)
    }

    fn alarm(
        &mut self,
        i: usize,
        a: RawAlarm,
        commands: &HashMap<String, usize>,
        modes: &[FailureMode],
        mode_ref: &mut impl FnMut(&mut Self, &str, &str) -> Option<usize>,
    ) -> (Alarm, Option<usize>) {
        let path = format!("alarms[{i}] {:?}", a.kind);
        self.ident(&path, "kind", &a.kind);
        let mode = mode_ref(self, &path, &a.failure_mode);
        if let Some(m) = mode
            && !modes[m].is_safety()
        {
            self.fail(
                &path,
                format!(
                    "failure_mode {:?} has severity {}; an alarm must point to a safety failure mode",
                    a.failure_mode,
                    priority_name(modes[m].severity)
                ),
            );
        }
        if a.local_actions.is_empty() {
            self.fail(
                &path,
                "local_actions must name at least one command the edge runs at once, even offline",
            );
        }
        for (j, action) in a.local_actions.iter().enumerate() {
            if !commands.contains_key(action) {
                self.fail(
                    &path,
                    format!("local_actions[{j}] {action:?} is not among the model's commands"),
                );
            } else if a.local_actions[..j].contains(action) {
                self.fail(
                    &path,
                    format!("local_actions[{j}] {action:?} is listed twice"),
                );
            }
        }
        let alarm = Alarm {
            kind: a.kind,
            failure_mode: a.failure_mode,
            local_actions: a.local_actions,
        };
        (alarm, mode)
    }

    fn rul(
        &mut self,
        r: RawRul,
        signals: &[Signal],
        signal_index: &HashMap<String, usize>,
        mode_ref: &mut impl FnMut(&mut Self, &str, &str) -> Option<usize>,
    ) -> (RulSpec, Option<usize>) {
        let path = "rul";
        self.text(path, "unit", &r.unit);
        if r.inputs.is_empty() {
            self.fail(path, "inputs must name at least one signal");
        }
        let mut input_indices = Vec::with_capacity(r.inputs.len());
        for (j, input) in r.inputs.iter().enumerate() {
            match signal_index.get(input) {
                None => self.fail(
                    path,
                    format!("inputs[{j}] {input:?} is not among the model's signals"),
                ),
                Some(&s) if input_indices.contains(&s) => {
                    self.fail(path, format!("inputs[{j}] {input:?} is listed twice"));
                }
                Some(&s) => {
                    if signals[s].cumulative {
                        self.fail(
                            path,
                            format!(
                                "inputs[{j}] {input:?} is cumulative (a counter), not a sensor"
                            ),
                        );
                    }
                    input_indices.push(s);
                }
            }
        }
        self.positive(path, "maintenance_at", r.maintenance_at);
        let mode = mode_ref(self, path, &r.failure_mode);
        if let Some(params) = &r.params {
            self.finite_value(path, "params", params);
        }
        let rul = RulSpec {
            unit: r.unit,
            inputs: r.inputs,
            input_indices,
            maintenance_at: r.maintenance_at,
            failure_mode: r.failure_mode,
            params: r.params,
        };
        (rul, mode)
    }
}

/// What a failure mode's playbook may refer to.
struct Refs<'r> {
    commands: &'r HashMap<String, usize>,
    signals: &'r [Signal],
    signal_index: &'r HashMap<String, usize>,
    parts: &'r HashMap<String, usize>,
    consumables: &'r HashMap<String, usize>,
    questions: &'r [RawQuestion],
    question_index: &'r HashMap<String, usize>,
}

fn raw_step_name(raw: &RawStep) -> &'static str {
    match raw {
        RawStep::RemoteCommand { .. } => "remote_command",
        RawStep::OrderConsumable { .. } => "order_consumable",
        RawStep::OrderPart { .. } => "order_part",
        RawStep::BookTechnician { .. } => "book_technician",
        RawStep::AskCustomer { .. } => "ask_customer",
        RawStep::NotifyCustomer { .. } => "notify_customer",
        RawStep::Handoff { .. } => "handoff",
    }
}
