//! The device twin: one per device. It applies the device's readings and events exactly
//! once, in sequence order, reasons about every signal as it streams, and tells the
//! customer twin what it concluded.
//!
//! # Exactly once
//! Readings and events share one sequence per device (from 1, no gaps). The twin applies
//! only the next one after its high-water mark: a duplicate or replay changes nothing; a
//! gap stops the batch there and is noted (the edge resends from the mark). The new mark
//! is committed with the twin's snapshot by compare-and-set (`AdvanceHighWater`), so even
//! two hosts that both believed they owned the twin could not both apply a reading.
//!
//! An item that is malformed — a NaN, a timestamp far in the future, an unknown signal —
//! is refused with its reason and changes no state, but the mark moves past it, so one
//! bad reading never blocks a device.
//!
//! # Consent
//! Readings of a signal whose consent scope the customer has not granted are counted and
//! dropped: not stored, not reasoned about.

use crate::catalogue::{Catalogue, DeviceModel, Gauge, Signal};
use crate::host::{Ctx, Twin};
use crate::mail::{Address, Body, CommandAction, DeviceCommand, Mail, tenant_of};
use crate::model::{ConsentScope, Insight, InsightKind, Priority, TimeMs};
use crate::policy::Consent;
use crate::reasoning::{
    Assessment, Debounce, Edge, ReasonerParams, SignalState, health_index, min_health,
};
use crate::rul::{RulFeatures, RulModel};
use crate::store::{Key, Op};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// How far ahead of the twin's clock a device timestamp may be.
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
/// Most items applied in one message (the protocol's batch limit).
pub const MAX_ITEMS: usize = 10_000;
/// Raw health at which a signal counts as recovered from a concern.
const RECOVERED_HEALTH: f64 = 0.75;
/// Commands remembered per device.
const MAX_COMMANDS: usize = 32;
/// Pages of a tenant's device index. A device's entries go to the page its id hashes to,
/// so provisioning many devices at once appends to many logs instead of contending on the
/// tail of one (a hot key in FoundationDB or PostgreSQL).
pub const DEVICE_INDEX_PAGES: u32 = 64;

/// The log of page `page` of `tenant`'s device index.
pub fn device_index_log(tenant: &str, page: u32) -> Key {
    Key::new(format!("device-index/{tenant}/{page}"))
}

/// The index page a device's entries go to.
pub fn device_index_page(device: &str) -> u32 {
    crate::host::shard_of(device, DEVICE_INDEX_PAGES)
}

/// An entry of a tenant's device index: who a device belongs to, where it is and what it
/// is, as of this entry. The device twin appends one whenever these change (and once for
/// a device provisioned before the index existed); a device's latest entry wins. Nothing
/// here is personal: ids only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceIndexEntry {
    /// The device.
    pub device: String,
    /// Its site; `None` once detached (its customer erased).
    pub site: Option<String>,
    /// Its customer; `None` once detached.
    pub customer: Option<String>,
    /// Its catalogue model.
    pub model: Option<String>,
}

/// What every device twin of one model shares: the reasoning parameters per signal and
/// the fitted remaining-life model.
pub struct ModelRuntime {
    params: Vec<ReasonerParams>,
    rul: Option<Arc<RulModel>>,
}

/// What every device twin shares: the catalogue and each model's runtime.
pub struct DeviceEnv {
    /// The device models.
    pub catalogue: Arc<Catalogue>,
    runtimes: HashMap<String, ModelRuntime>,
}

/// Reasoning parameters for one catalogue signal.
pub fn reasoner_params(model: &DeviceModel, index: usize, signal: &Signal) -> ReasonerParams {
    let mut p = ReasonerParams::default();
    if let Some(n) = signal.normal {
        p.normal_min = n.min;
        p.normal_max = n.max;
    }
    if let Some(f) = signal.failure {
        p.threshold = Some(f.threshold);
        p.direction = Some(f.direction);
    }
    p.alpha = signal.detector.ewma_alpha;
    p.z_threshold = signal.detector.anomaly_z;
    // Higher sensitivity, lower alarm threshold for the drift detector.
    p.drift_lambda = (p.drift_lambda / signal.detector.drift_sensitivity.max(0.1)).max(1.0);
    p.persistence = signal.detector.persistence.clamp(1, u32::from(u16::MAX)) as u16;
    p.cumulative = signal.cumulative;
    if let Some(&c) = model.consumables_gauged_by(index).first() {
        let c = &model.consumables()[c];
        if c.gauge == Gauge::Usage {
            p.cumulative = true;
            p.capacity = Some(c.capacity);
            p.reorder_fraction = Some((c.reorder_level() / c.capacity).clamp(0.0, 1.0));
        }
    }
    p
}

impl DeviceEnv {
    /// Builds each model's runtime from the catalogue; fitted RUL parameters in a model's
    /// `[rul]` section are loaded.
    pub fn new(catalogue: Arc<Catalogue>) -> crate::Result<Self> {
        let mut runtimes = HashMap::new();
        for m in catalogue.models() {
            let params = m
                .signals()
                .iter()
                .enumerate()
                .map(|(i, s)| reasoner_params(m, i, s).validated())
                .collect::<crate::Result<Vec<_>>>()
                .map_err(|e| crate::Error::Config(format!("model {:?}: {e}", m.id())))?;
            let rul = match m.rul().and_then(|r| r.params.clone()) {
                Some(v) => {
                    let bad = |e: String| {
                        crate::Error::Config(format!("model {:?}: rul params: {e}", m.id()))
                    };
                    let params = v
                        .try_into()
                        .map_err(|e: toml::de::Error| bad(e.to_string()))?;
                    Some(Arc::new(
                        RulModel::from_params(params).map_err(|e| bad(e.to_string()))?,
                    ))
                }
                None => None,
            };
            runtimes.insert(m.id().to_owned(), ModelRuntime { params, rul });
        }
        Ok(Self {
            catalogue,
            runtimes,
        })
    }

    /// Uses `model` as model `id`'s remaining-life estimator (e.g. one just fitted).
    pub fn with_rul(mut self, id: &str, model: RulModel) -> crate::Result<Self> {
        let rt = self
            .runtimes
            .get_mut(id)
            .ok_or_else(|| crate::Error::Config(format!("unknown device model {id:?}")))?;
        rt.rul = Some(Arc::new(model));
        Ok(self)
    }
}

/// One item of a device's log: a reading or an event, with its sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceItem {
    /// Per-device sequence number, from 1, shared by readings and events.
    pub seq: u64,
    /// The device's timestamp, Unix ms.
    pub ts_ms: TimeMs,
    /// What it is.
    pub kind: ItemKind,
}

/// What a device reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ItemKind {
    /// A signal's value.
    Reading {
        /// The signal's name in the catalogue.
        signal: String,
        /// Its value.
        value: f64,
    },
    /// A safety alarm.
    Alarm {
        /// The alarm kind (`smoke`, `leak`…).
        kind: String,
        /// What the edge did locally, if anything.
        local_action: Option<String>,
    },
    /// A diagnostic code.
    Diagnostic {
        /// The code (`F28`).
        code: String,
    },
    /// A question from the product.
    Question {
        /// The question's id in the catalogue.
        question_id: String,
    },
    /// Non-numeric fields of the device's reported state (firmware version, mode…),
    /// reported together.
    Reported {
        /// (field, value) pairs.
        fields: Vec<(String, String)>,
    },
    /// The outcome of a remote command.
    CommandResult {
        /// The command.
        command_id: String,
        /// Whether it succeeded.
        succeeded: bool,
        /// It was never started: its time to live ran out before the device got it
        /// (`succeeded` is then false).
        expired: bool,
        /// It was never started: the edge cancelled it before the device got it
        /// (`succeeded` is then false).
        cancelled: bool,
        /// What the device said.
        detail: String,
    },
}

/// What a device twin is sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeviceMsg {
    /// The device belongs to this customer and site, and is of this model.
    Provision {
        /// The customer twin's id.
        customer: String,
        /// The site.
        site: String,
        /// The catalogue model.
        model: String,
    },
    /// Readings and events from the device, in sequence order (a trusted path: replay,
    /// tests; sessions use [`DeviceMsg::FromSite`]).
    Apply(Vec<DeviceItem>),
    /// Readings and events sent by a site's edge: applied only if the device is
    /// provisioned and belongs to that site.
    FromSite {
        /// The site, from its client certificate.
        site: String,
        /// The items, in sequence order.
        items: Vec<DeviceItem>,
    },
    /// The edge reports how far a command got (`sent_to_edge`, `delivered_to_device`).
    CommandStatus {
        /// The site, from its client certificate.
        site: String,
        /// The command.
        command_id: String,
        /// Its new state.
        state: String,
    },
    /// Mail from another twin (boxed: mail is large next to the other messages).
    Mail(Box<Mail>),
    /// Forget this customer: their erasure. The device stays registered (model kept) with
    /// no owner and no site, and what its twin learnt while it was theirs is dropped.
    /// Nothing happens if the device is not (or no longer) theirs.
    Detach {
        /// The customer twin's id.
        customer: String,
    },
    /// An integrator's command (boxed like mail).
    Issue(Box<IssuedCommand>),
    /// Cancel a command: one the edge has not confirmed yet ends at once; for one stored
    /// on the edge the edge is asked, and the command ends when it answers.
    CancelCommand {
        /// The command.
        command_id: String,
        /// Why, for the record.
        reason: String,
        /// The caller's idempotency key, recorded with the cancel (may be empty).
        key: String,
    },
    /// Set a field of the device's desired state (from an integrator or operator). With
    /// `expected_version`, only if the field is at that version (0: not set yet).
    SetDesired {
        /// The field.
        field: String,
        /// The value.
        value: String,
        /// The version the writer read, for compare-and-set.
        expected_version: Option<u64>,
    },
}

/// A field of the desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    /// The value.
    pub value: String,
    /// Its version: the cloud's latest version wins.
    pub version: u64,
}

/// A non-numeric field of the reported state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedField {
    /// The value.
    pub value: String,
    /// The device's timestamp.
    pub ts_ms: TimeMs,
    /// The item's sequence number: the device's latest by its own sequence wins.
    pub seq: u64,
}

/// Most desired or reported fields per device, and their longest name and value.
pub const MAX_FIELDS: usize = 64;
const MAX_FIELD_BYTES: usize = 256;

/// Why an item was refused, in the protocol's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectKind {
    /// NaN, infinite, overflowing, out of order, or otherwise unusable.
    InvalidValue,
    /// The device timestamp is too far ahead of the twin's clock.
    TimestampInFuture,
    /// The model has no such signal.
    UnknownSignal,
    /// The model has no such alarm, code or question.
    UnknownEvent,
}

/// An item refused (the high-water mark moved past it), with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// The item's sequence number.
    pub seq: u64,
    /// What kind of refusal.
    pub kind: RejectKind,
    /// What was wrong, for the device's owner.
    pub reason: String,
}

/// What happened to a batch of items.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ApplyReport {
    /// Items applied.
    pub applied: u32,
    /// Readings among the applied items.
    pub readings: u32,
    /// Items at or below the high-water mark, ignored.
    pub duplicates: u32,
    /// Items refused (the mark moved past them), with the reason.
    pub rejected: Vec<Rejection>,
    /// Items dropped for lack of consent (the mark moved past them).
    pub withheld: u32,
    /// The first missing sequence number, when the batch had a gap.
    pub gap_at: Option<u64>,
    /// The high-water mark after the batch.
    pub high_water: u64,
}

/// A device twin's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeviceReply {
    /// Items applied.
    Applied(ApplyReport),
    /// Taken.
    Ok,
    /// A desired field now has this version.
    Version(u64),
    /// The device is not provisioned (unknown to the cluster).
    UnknownDevice,
    /// The device belongs to another site.
    NotOwner,
    /// Refused, with the reason.
    Rejected(String),
}

/// A signal's last reported value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reported {
    /// The value.
    pub value: f64,
    /// The device's timestamp.
    pub ts_ms: TimeMs,
    /// The item's sequence number (the field's version).
    pub seq: u64,
}

/// A remote command as the twin knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandEntry {
    /// The command.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Where it stands: `queued` (not yet confirmed by the edge), `sent_to_edge` (stored
    /// on the edge), `delivered_to_device`, then one of `succeeded`, `failed`, `expired`,
    /// `cancelled`. It only moves forward (see [`command_rank`]).
    pub state: String,
    /// When it expires if the device has not started it, Unix ms (its expiry timer).
    #[serde(default)]
    pub expires_at_ms: TimeMs,
    /// A cancel was asked of the edge, which has not answered yet.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_requested: bool,
    /// A configuration command: the (field, value) pairs the device must report for it
    /// to succeed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub awaits: Vec<(String, String)>,
}

/// How far a command state is along its lifecycle: `queued` 0, `sent_to_edge` 1,
/// `delivered_to_device` 2, a final state 3. A command only moves to a higher rank, so a
/// late or repeated report never takes it back.
pub fn command_rank(state: &str) -> u8 {
    match state {
        "queued" => 0,
        "sent_to_edge" => 1,
        "delivered_to_device" => 2,
        _ => 3,
    }
}

/// What a cancel does to a command, by where it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelStep {
    /// Not confirmed by the edge: it ends as cancelled at once (the edge is told too, in
    /// case it stored the command while its confirmation was on the way).
    EndNow,
    /// Stored on the edge: the edge is asked; it ends when the edge answers.
    AskEdge,
    /// Already cancelled, or already asked: nothing changes.
    Nothing,
    /// The device has it, or it ended otherwise: too late.
    Refuse,
}

/// The cancel rule of a command in `state`, `requested` telling whether the edge was
/// asked already.
pub fn cancel_step(state: &str, requested: bool) -> CancelStep {
    match state {
        "queued" => CancelStep::EndNow,
        "sent_to_edge" if requested => CancelStep::Nothing,
        "sent_to_edge" => CancelStep::AskEdge,
        "cancelled" => CancelStep::Nothing,
        _ => CancelStep::Refuse,
    }
}

/// The tenant's log of command transitions: every state a command of one of its devices
/// enters, appended in the same batch as the twin's decision (integrators read it).
pub fn commands_log(tenant: &str) -> Key {
    Key::new(format!("commands/{tenant}"))
}

/// A command's states that never change again.
pub fn command_final(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "expired" | "cancelled")
}

/// What a command is, as told once with its first transition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandInfo {
    /// The device's site when the command was issued.
    #[serde(rename = "si")]
    pub site: String,
    /// The remedy's name.
    #[serde(rename = "n")]
    pub name: String,
    /// Its arguments.
    #[serde(rename = "a", default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<(String, String)>,
    /// When it expires if the device has not started it.
    #[serde(rename = "e")]
    pub expires_at_ms: TimeMs,
    /// Urgency.
    #[serde(rename = "p")]
    pub priority: Priority,
    /// Who issued it: the customer twin, or an integrator.
    #[serde(rename = "b")]
    pub issued_by: String,
    /// The idempotency key it was issued with (empty for a twin's command).
    #[serde(rename = "k", default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    /// The case it belongs to, if any.
    #[serde(rename = "z", default, skip_serializing_if = "String::is_empty")]
    pub case_id: String,
    /// Why it was sent, for people.
    #[serde(rename = "r", default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// What it does when it is not the remedy `name`.
    #[serde(rename = "y", default, skip_serializing_if = "Option::is_none")]
    pub action: Option<CommandAction>,
}

/// One entry of [`commands_log`]: a command entered a state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandEvent {
    /// The command.
    #[serde(rename = "c")]
    pub command_id: String,
    /// Its device.
    #[serde(rename = "d")]
    pub device: String,
    /// The state entered: `queued`, `sent_to_edge`, `delivered_to_device`, `succeeded`,
    /// `failed`, `expired` or `cancelled`.
    #[serde(rename = "s")]
    pub state: String,
    /// When (cluster clock), Unix ms.
    #[serde(rename = "t")]
    pub at: TimeMs,
    /// Free text from the edge, the device or whoever cancelled it.
    #[serde(rename = "x", default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// What the command is: on its first (`queued`) entry only.
    #[serde(rename = "i", default, skip_serializing_if = "Option::is_none")]
    pub info: Option<CommandInfo>,
    /// On the entry a cancel made (the `cancelled` of a command the edge did not hold
    /// yet, or the request to the edge, logged in the state the command stays in until
    /// the edge answers): the cancel's idempotency key (may be empty).
    #[serde(rename = "q", default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<String>,
}

/// A command an integrator issues to a device (the gRPC `SendCommand`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IssuedCommand {
    /// The command (its id derived from the key by the caller).
    pub command: DeviceCommand,
    /// The idempotency key: the key is claimed once, with the command.
    pub key: String,
    /// The integrator.
    pub issued_by: String,
    /// Urgency.
    pub priority: Priority,
    /// The case it belongs to, if any.
    pub case_id: String,
    /// Why, for people.
    pub reason: String,
}

/// Remaining-life state for models that define one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RulState {
    features: RulFeatures,
    /// The timestamp whose values are being collected.
    ts_ms: TimeMs,
    values: Vec<f64>,
    seen: Vec<bool>,
    /// The latest estimate.
    estimate: Option<f64>,
    /// Whether maintenance was already asked for.
    maintenance_raised: bool,
}

/// The device twin's state (its snapshot).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceTwin {
    id: String,
    customer: Option<String>,
    site: Option<String>,
    model: Option<String>,
    high_water: u64,
    gaps: u32,
    reported: Vec<Option<Reported>>,
    signals: Vec<SignalState>,
    concern: Vec<Debounce>,
    health: Vec<f64>,
    consent: Consent,
    commands: Vec<CommandEntry>,
    desired: BTreeMap<String, Desired>,
    reported_fields: BTreeMap<String, ReportedField>,
    /// Boxed: only models with a remaining-life estimator carry it, and it is large.
    rul: Option<Box<RulState>>,
    withheld: u64,
    last_seen_ms: TimeMs,
    mail_seq: u64,
    /// Whether the tenant's device index has this twin's current site, customer and model
    /// (false in snapshots older than the index: the next provisioning adds them).
    #[serde(default)]
    indexed: bool,
}

impl DeviceTwin {
    /// The applied high-water mark.
    pub fn high_water(&self) -> u64 {
        self.high_water
    }

    /// Gaps seen in the device's sequence.
    pub fn gaps(&self) -> u32 {
        self.gaps
    }

    /// The model, once provisioned.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// The customer, once provisioned.
    pub fn customer(&self) -> Option<&str> {
        self.customer.as_deref()
    }

    /// The site, once provisioned.
    pub fn site(&self) -> Option<&str> {
        self.site.as_deref()
    }

    /// When the last item from the device was applied (cluster clock, Unix ms; 0: never).
    pub fn last_seen_ms(&self) -> TimeMs {
        self.last_seen_ms
    }

    /// Last reported value per signal (catalogue order).
    pub fn reported(&self) -> &[Option<Reported>] {
        &self.reported
    }

    /// The device's health, 0..=1 (1 when nothing is known yet).
    pub fn health(&self) -> f64 {
        if self.health.is_empty() {
            1.0
        } else {
            min_health(self.health.iter().copied())
        }
    }

    /// The latest remaining-life estimate, for models that define one.
    pub fn remaining_life(&self) -> Option<f64> {
        self.rul.as_ref().and_then(|r| r.estimate)
    }

    /// Commands the twin knows of.
    pub fn commands(&self) -> &[CommandEntry] {
        &self.commands
    }

    /// Readings dropped for lack of consent.
    pub fn withheld(&self) -> u64 {
        self.withheld
    }

    /// The desired state.
    pub fn desired(&self) -> &BTreeMap<String, Desired> {
        &self.desired
    }

    /// The reported non-numeric fields.
    pub fn reported_fields(&self) -> &BTreeMap<String, ReportedField> {
        &self.reported_fields
    }

    /// Desired fields the device does not report at their desired value yet:
    /// (field, desired value, reported value if any).
    pub fn delta(&self) -> Vec<(&str, &str, Option<&str>)> {
        self.desired
            .iter()
            .filter_map(|(f, d)| {
                let reported = self.reported_fields.get(f).map(|r| r.value.as_str());
                (reported != Some(d.value.as_str())).then_some((
                    f.as_str(),
                    d.value.as_str(),
                    reported,
                ))
            })
            .collect()
    }

    /// Sets one field of the desired state and sends the desired state to the edge.
    fn set_desired(
        &mut self,
        field: String,
        value: String,
        expected: Option<u64>,
        ctx: &mut Ctx,
    ) -> DeviceReply {
        let changes = [(field, value, expected)];
        let version = match self.change_desired(&changes, ctx) {
            Ok(versions) => versions[0],
            Err(why) => return DeviceReply::Rejected(why),
        };
        self.send_desired(ctx);
        DeviceReply::Version(version)
    }

    /// Sets the desired `(field, value, expected version)`s, all or none (every change is
    /// checked before any is made); the version each got.
    fn change_desired(
        &mut self,
        changes: &[(String, String, Option<u64>)],
        ctx: &mut Ctx,
    ) -> Result<Vec<u64>, String> {
        let mut new = 0;
        for (field, value, expected) in changes {
            if field.is_empty() || field.len() > MAX_FIELD_BYTES || value.len() > MAX_FIELD_BYTES {
                return Err(format!(
                    "desired field {field:?} needs a name of 1..={MAX_FIELD_BYTES} bytes and a value of at most {MAX_FIELD_BYTES}"
                ));
            }
            let current = self.desired.get(field).map_or(0, |d| d.version);
            if let Some(e) = expected
                && *e != current
            {
                return Err(format!(
                    "desired field {field:?} is at version {current}, not {e}"
                ));
            }
            if changes.iter().filter(|(f, ..)| f == field).count() > 1 {
                return Err(format!("desired field {field:?} is set twice"));
            }
            new += usize::from(current == 0);
        }
        if self.desired.len() + new > MAX_FIELDS {
            return Err(format!("at most {MAX_FIELDS} desired fields"));
        }
        let mut versions = Vec::with_capacity(changes.len());
        for (field, value, _) in changes {
            let version = self.desired.get(field).map_or(0, |d| d.version) + 1;
            self.desired.insert(
                field.clone(),
                Desired {
                    value: value.clone(),
                    version,
                },
            );
            versions.push(version);
        }
        ctx.changed();
        Ok(versions)
    }

    /// Sends the whole desired state to the device's edge.
    fn send_desired(&mut self, ctx: &mut Ctx) {
        if let Some(site) = self.site.clone() {
            let fields = self
                .desired
                .iter()
                .map(|(f, d)| (f.clone(), d.value.clone(), d.version))
                .collect();
            self.send(
                ctx,
                Address::Edge(site),
                Body::DesiredState {
                    device: self.id.clone(),
                    fields,
                },
            );
        }
    }

    /// `Some(refusal)` unless the device is provisioned and belongs to `site`.
    fn check_site(&self, site: &str) -> Option<DeviceReply> {
        match self.site.as_deref() {
            None => Some(DeviceReply::UnknownDevice),
            Some(own) if own != site => Some(DeviceReply::NotOwner),
            Some(_) => None,
        }
    }

    /// Appends the twin's identity to its tenant's device index when it changed since the
    /// last entry, in the same batch as the change.
    fn index(&mut self, ctx: &mut Ctx) {
        if self.indexed || self.model.is_none() {
            return;
        }
        let entry = DeviceIndexEntry {
            device: self.id.clone(),
            site: self.site.clone(),
            customer: self.customer.clone(),
            model: self.model.clone(),
        };
        ctx.op(Op::Append {
            log: device_index_log(tenant_of(&self.id), device_index_page(&self.id)),
            value: serde_json::to_vec(&entry).expect("an index entry is plain data"),
        });
        self.indexed = true;
        ctx.changed();
    }

    fn send(&mut self, ctx: &mut Ctx, to: Address, body: Body) {
        self.mail_seq += 1;
        let mail = Mail {
            id: format!("{}/{}", self.id, self.mail_seq),
            from: Address::Device(self.id.clone()),
            to,
            body,
        };
        ctx.emit(mail.encode());
    }

    fn tell_customer(&mut self, ctx: &mut Ctx, body: Body) {
        if let Some(c) = self.customer.clone() {
            self.send(ctx, Address::Customer(c), body);
        }
    }

    fn provision(
        &mut self,
        customer: String,
        site: String,
        model: &DeviceModel,
        env: &DeviceEnv,
    ) -> DeviceReply {
        if tenant_of(&customer) != tenant_of(&self.id) {
            return DeviceReply::Rejected(format!("customer {customer} is of another tenant"));
        }
        if self.model.as_deref().is_some_and(|m| m != model.id()) {
            return DeviceReply::Rejected(format!(
                "device is already a {:?}; a device does not change model",
                self.model.as_deref().unwrap_or_default()
            ));
        }
        if self.model.is_none() {
            self.reset_learning(model, env);
        }
        self.model = Some(model.id().to_owned());
        self.customer = Some(customer);
        self.site = Some(site);
        self.indexed = false;
        DeviceReply::Ok
    }

    /// Starts the reasoning state of `model` afresh, as for a new device.
    fn reset_learning(&mut self, model: &DeviceModel, env: &DeviceEnv) {
        let rt = &env.runtimes[model.id()];
        self.signals = rt.params.iter().map(SignalState::new).collect();
        self.concern = vec![Debounce::default(); rt.params.len()];
        self.reported = vec![None; rt.params.len()];
        self.health = vec![1.0; rt.params.len()];
        self.rul = model.rul().map(|_| {
            Box::new(RulState {
                features: RulFeatures::new(),
                ts_ms: 0,
                values: vec![f64::NAN; model.signals().len()],
                seen: vec![false; model.signals().len()],
                estimate: None,
                maintenance_raised: false,
            })
        });
    }

    /// Forgets `customer` (their erasure): the owner, the site (their home), and all the
    /// twin learnt from the device while it was theirs. The model and the high-water mark
    /// stay, so the device remains registered and a replayed reading is still refused.
    fn detach(&mut self, customer: &str, ctx: &mut Ctx, env: &DeviceEnv) -> DeviceReply {
        if self.customer.as_deref() != Some(customer) {
            return DeviceReply::Ok; // not theirs (any more): nothing to forget
        }
        if let Some(model) = self.model.as_deref().and_then(|m| env.catalogue.model(m)) {
            self.reset_learning(model, env);
        }
        self.customer = None;
        self.site = None;
        self.indexed = false;
        self.consent = Consent::of(&[ConsentScope::Diagnostics]);
        self.commands.clear();
        self.desired.clear();
        self.reported_fields.clear();
        self.withheld = 0;
        self.last_seen_ms = 0;
        ctx.changed();
        DeviceReply::Ok
    }

    fn apply(&mut self, mut items: Vec<DeviceItem>, ctx: &mut Ctx, env: &DeviceEnv) -> DeviceReply {
        let Some(model) = self.model.as_deref().and_then(|m| env.catalogue.model(m)) else {
            return DeviceReply::Rejected("device is not provisioned".into());
        };
        if items.len() > MAX_ITEMS {
            return DeviceReply::Rejected(format!(
                "batch of {} items, the limit is {MAX_ITEMS}",
                items.len()
            ));
        }
        let rt = &env.runtimes[model.id()];
        items.sort_by_key(|i| i.seq);
        let start = self.high_water;
        let mut report = ApplyReport::default();
        for item in items {
            if item.seq <= self.high_water {
                report.duplicates += 1;
                continue;
            }
            if item.seq > self.high_water + 1 {
                // A gap is noted, not papered over: nothing after it is applied.
                self.gaps += 1;
                report.gap_at = Some(self.high_water + 1);
                break;
            }
            self.high_water = item.seq;
            match self.apply_item(&item, model, rt, ctx) {
                Ok(()) => {
                    report.applied += 1;
                    report.readings += u32::from(matches!(item.kind, ItemKind::Reading { .. }));
                }
                Err(why) => match why {
                    Refusal::Withheld => report.withheld += 1,
                    Refusal::Invalid(kind, reason) => report.rejected.push(Rejection {
                        seq: item.seq,
                        kind,
                        reason,
                    }),
                },
            }
        }
        if self.high_water > start {
            ctx.op(Op::AdvanceHighWater {
                device: Key::new(self.id.clone()),
                from: start,
                to: self.high_water,
            });
            self.last_seen_ms = ctx.now();
            ctx.changed();
        }
        report.high_water = self.high_water;
        DeviceReply::Applied(report)
    }

    fn apply_item(
        &mut self,
        item: &DeviceItem,
        model: &DeviceModel,
        rt: &ModelRuntime,
        ctx: &mut Ctx,
    ) -> Result<(), Refusal> {
        if item.ts_ms > ctx.now().saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(Refusal::Invalid(
                RejectKind::TimestampInFuture,
                format!(
                    "timestamp {} is more than {MAX_CLOCK_SKEW_MS} ms in the future",
                    item.ts_ms
                ),
            ));
        }
        match &item.kind {
            ItemKind::Reading { signal, value } => {
                let idx = model.signal_index(signal).ok_or_else(|| {
                    Refusal::Invalid(
                        RejectKind::UnknownSignal,
                        format!("unknown signal {signal:?}"),
                    )
                })?;
                let spec = &model.signals()[idx];
                if !self.consent.allows(spec.scope) {
                    self.withheld += 1;
                    return Err(Refusal::Withheld);
                }
                let a = self.signals[idx]
                    .observe(&rt.params[idx], item.ts_ms, *value)
                    .map_err(|e| Refusal::Invalid(RejectKind::InvalidValue, e.to_string()))?;
                self.reported[idx] = Some(Reported {
                    value: *value,
                    ts_ms: item.ts_ms,
                    seq: item.seq,
                });
                self.health[idx] = a.health;
                self.conclude(idx, spec, *value, &a, model, rt, ctx);
                self.feed_rul(idx, item.ts_ms, *value, model, rt, ctx);
                Ok(())
            }
            ItemKind::Alarm { kind, local_action } => {
                let mode = model.mode_for_alarm(kind).ok_or_else(|| {
                    Refusal::Invalid(
                        RejectKind::UnknownEvent,
                        format!("unknown alarm kind {kind:?}"),
                    )
                })?;
                let insight = Insight {
                    kind: InsightKind::Alarm,
                    subject: match local_action {
                        Some(a) => format!("{kind} (edge acted: {a})"),
                        None => kind.clone(),
                    },
                    failure_mode: Some(mode.id.clone()),
                    confidence: 1.0,
                    eta_ms: None,
                    eta_band_ms: None,
                    value: 1.0,
                    raised_at_ms: item.ts_ms,
                    scope: ConsentScope::Diagnostics,
                };
                self.raise(insight, model, ctx);
                Ok(())
            }
            ItemKind::Diagnostic { code } => {
                let d = model.diagnostic_code(code).ok_or_else(|| {
                    Refusal::Invalid(
                        RejectKind::UnknownEvent,
                        format!("unknown diagnostic code {code:?}"),
                    )
                })?;
                let insight = self.event_insight(code, &d.failure_mode, d.confidence, item.ts_ms);
                self.raise(insight, model, ctx);
                Ok(())
            }
            ItemKind::Question { question_id } => {
                let q = model.question(question_id).ok_or_else(|| {
                    Refusal::Invalid(
                        RejectKind::UnknownEvent,
                        format!("unknown question {question_id:?}"),
                    )
                })?;
                let insight =
                    self.event_insight(question_id, &q.failure_mode, q.confidence, item.ts_ms);
                self.raise(insight, model, ctx);
                Ok(())
            }
            ItemKind::Reported { fields } => {
                let new = fields
                    .iter()
                    .filter(|(f, _)| !self.reported_fields.contains_key(f))
                    .count();
                if let Some((f, _)) = fields.iter().find(|(f, v)| {
                    f.is_empty() || f.len() > MAX_FIELD_BYTES || v.len() > MAX_FIELD_BYTES
                }) {
                    return Err(Refusal::Invalid(
                        RejectKind::InvalidValue,
                        format!("reported field {f:?} is too long or empty"),
                    ));
                }
                if self.reported_fields.len() + new > MAX_FIELDS {
                    return Err(Refusal::Invalid(
                        RejectKind::InvalidValue,
                        format!("at most {MAX_FIELDS} reported fields"),
                    ));
                }
                // Items arrive in sequence order, so these are the device's latest.
                for (field, value) in fields {
                    self.reported_fields.insert(
                        field.clone(),
                        ReportedField {
                            value: value.clone(),
                            ts_ms: item.ts_ms,
                            seq: item.seq,
                        },
                    );
                }
                self.configured(ctx);
                Ok(())
            }
            ItemKind::CommandResult {
                command_id,
                succeeded,
                expired,
                cancelled,
                detail,
            } => {
                if let Some(c) = self.commands.iter_mut().find(|c| c.id == *command_id) {
                    let state = match (*succeeded, *expired, *cancelled) {
                        (true, _, _) => "succeeded",
                        (false, true, _) => "expired",
                        (false, false, true) => "cancelled",
                        (false, false, false) => "failed",
                    };
                    if command_final(&c.state) {
                        // The first ending stands: the edge confirming a cancel the twin
                        // already made, or a device that ran a command cancelled while its
                        // confirmation was on the way (rare; logged).
                        if c.state != state {
                            tracing::warn!(device = %self.id, command = %command_id, was = %c.state, reported = state, "late command result ignored");
                        }
                        return Ok(());
                    }
                    c.state = state.into();
                    c.cancel_requested = false;
                    // Ended: its expiry timer has nothing left to do.
                    ctx.disarm(c.expires_at_ms, &expiry_tag(command_id));
                    self.log_command(ctx, command_id, state, detail, None, None);
                }
                self.tell_customer(
                    ctx,
                    Body::CommandOutcome {
                        device: self.id.clone(),
                        command_id: command_id.clone(),
                        succeeded: *succeeded,
                        detail: detail.clone(),
                    },
                );
                Ok(())
            }
        }
    }

    /// Ends the configuration commands whose every value the device now reports.
    fn configured(&mut self, ctx: &mut Ctx) {
        let reported = &self.reported_fields;
        let done: Vec<String> = self
            .commands
            .iter()
            .filter(|c| !c.awaits.is_empty() && !command_final(&c.state))
            .filter(|c| {
                c.awaits
                    .iter()
                    .all(|(f, v)| reported.get(f).is_some_and(|r| r.value == *v))
            })
            .map(|c| c.id.clone())
            .collect();
        for id in done {
            if let Some(c) = self.commands.iter_mut().find(|c| c.id == id) {
                c.state = "succeeded".into();
                ctx.disarm(c.expires_at_ms, &expiry_tag(&id));
            }
            ctx.changed();
            let detail = "the device reports every value";
            self.log_command(ctx, &id, "succeeded", detail, None, None);
            self.tell_customer(
                ctx,
                Body::CommandOutcome {
                    device: self.id.clone(),
                    command_id: id,
                    succeeded: true,
                    detail: detail.into(),
                },
            );
        }
    }

    fn event_insight(&self, subject: &str, mode: &str, confidence: f64, ts: TimeMs) -> Insight {
        Insight {
            kind: InsightKind::Diagnostic,
            subject: subject.to_owned(),
            failure_mode: Some(mode.to_owned()),
            confidence,
            eta_ms: None,
            eta_band_ms: None,
            value: 1.0,
            raised_at_ms: ts,
            scope: ConsentScope::Diagnostics,
        }
    }

    fn raise(&mut self, insight: Insight, model: &DeviceModel, ctx: &mut Ctx) {
        let body = Body::Insight {
            device: self.id.clone(),
            model: model.id().to_owned(),
            insight,
        };
        self.tell_customer(ctx, body);
    }

    /// Turns what the reasoner raised into insights, and notes conditions that cleared.
    #[allow(clippy::too_many_arguments)]
    fn conclude(
        &mut self,
        idx: usize,
        spec: &Signal,
        reading: f64,
        a: &Assessment,
        model: &DeviceModel,
        rt: &ModelRuntime,
        ctx: &mut Ctx,
    ) {
        for kind in a.raised.kinds() {
            let (confidence, eta, value) = match kind {
                InsightKind::Forecast => match a.forecast {
                    Some(e) => (e.confidence, Some(e), a.level),
                    None => continue,
                },
                InsightKind::ConsumableLow => match a.depletion {
                    Some(d) => {
                        let eta = d.reorder.or(d.empty);
                        (eta.map_or(0.9, |e| e.confidence), eta, d.remaining_fraction)
                    }
                    None => continue,
                },
                InsightKind::FailureNow => (0.95, None, a.level),
                InsightKind::Drift => (0.6, None, a.level),
                _ => (
                    a.anomaly.map_or(0.5, |z| {
                        (z.abs() / (2.0 * rt.params[idx].z_threshold)).clamp(0.3, 0.9)
                    }),
                    None,
                    a.level,
                ),
            };
            let insight = Insight {
                kind,
                subject: spec.name.clone(),
                failure_mode: model.mode_for_insight(idx, kind).map(|m| m.id.clone()),
                confidence,
                eta_ms: eta.map(|e| e.eta_ms),
                eta_band_ms: eta.map(|e| (e.early_ms, e.late_ms)),
                value,
                raised_at_ms: ctx.now(),
                scope: spec.scope,
            };
            self.raise(insight, model, ctx);
        }
        // A concern turns on with a forecast or a failure, and clears once the raw readings
        // are healthy again for `persistence` readings in a row. The raw value, not the
        // smoothed level: after a remedy (a descale cycle) the device recovers at once,
        // while a trend model takes many readings to forget the decline. The customer twin
        // judges remedies by this.
        let p = &rt.params[idx];
        let concerned = if self.concern[idx].is_on() {
            health_index(reading, p.normal_min, p.normal_max, p.failure()) < RECOVERED_HEALTH
        } else {
            a.forecast.is_some() || a.failure_now
        };
        let persistence = p.persistence;
        if self.concern[idx].update(concerned, 1, persistence) == Edge::Fell {
            // A recovery starts a new regime: the trend learnt during the decline would
            // keep forecasting a failure that was fixed. Relearn the signal from here.
            self.signals[idx] = SignalState::new(p);
            let failure_mode = model
                .mode_for_insight(idx, InsightKind::Forecast)
                .or_else(|| model.mode_for_insight(idx, InsightKind::FailureNow))
                .map(|m| m.id.clone());
            self.tell_customer(
                ctx,
                Body::InsightCleared {
                    device: self.id.clone(),
                    subject: spec.name.clone(),
                    failure_mode,
                },
            );
        }
    }

    /// Collects one timestamp's values of every signal, then updates the remaining-life
    /// estimate.
    fn feed_rul(
        &mut self,
        idx: usize,
        ts: TimeMs,
        value: f64,
        model: &DeviceModel,
        rt: &ModelRuntime,
        ctx: &mut Ctx,
    ) {
        let (Some(state), Some(estimator), Some(spec)) =
            (self.rul.as_mut(), rt.rul.as_ref(), model.rul())
        else {
            return;
        };
        if ts != state.ts_ms {
            state.ts_ms = ts;
            state.seen.iter_mut().for_each(|s| *s = false);
        }
        state.values[idx] = value;
        state.seen[idx] = true;
        if !state.seen.iter().all(|&s| s) {
            return;
        }
        state.seen.iter_mut().for_each(|s| *s = false);
        if state.features.push(&state.values).is_err() {
            return;
        }
        let rul = estimator.predict(&state.features);
        state.estimate = Some(rul);
        if rul <= spec.maintenance_at && !state.maintenance_raised {
            state.maintenance_raised = true;
            let insight = Insight {
                kind: InsightKind::RemainingLife,
                subject: format!("remaining life {rul:.0} {}", spec.unit),
                failure_mode: Some(spec.failure_mode.clone()),
                confidence: 0.8,
                eta_ms: None,
                eta_band_ms: None,
                value: rul,
                raised_at_ms: ctx.now(),
                scope: ConsentScope::Diagnostics,
            };
            self.raise(insight, model, ctx);
        }
    }

    fn handle_mail(&mut self, mail: Mail, ctx: &mut Ctx) -> DeviceReply {
        if mail.from.tenant() != tenant_of(&self.id) {
            return DeviceReply::Rejected(format!("mail {} from another tenant", mail.id));
        }
        match mail.body {
            Body::Command(cmd) => self.command(cmd, &mail.from, ctx),
            Body::ConsentChanged { allowed } => {
                if Some(&mail.from) != self.customer.clone().map(Address::Customer).as_ref() {
                    return DeviceReply::Rejected(
                        "consent comes only from the device's customer".into(),
                    );
                }
                self.consent = Consent::of(&allowed);
                ctx.changed();
                DeviceReply::Ok
            }
            _ => DeviceReply::Rejected(format!("a device twin does not take mail {}", mail.id)),
        }
    }

    fn command(&mut self, cmd: DeviceCommand, from: &Address, ctx: &mut Ctx) -> DeviceReply {
        if Some(from) != self.customer.clone().map(Address::Customer).as_ref() {
            return DeviceReply::Rejected("commands come only from the device's customer".into());
        }
        let issued_by = self.customer.clone().unwrap_or_default();
        let info = |site: String, cmd: &DeviceCommand| CommandInfo {
            site,
            name: cmd.name.clone(),
            args: cmd.args.clone(),
            expires_at_ms: cmd.expires_at_ms,
            priority: Priority::Normal,
            issued_by,
            key: String::new(),
            case_id: String::new(),
            reason: String::new(),
            action: cmd.action.clone(),
        };
        self.queue_command(cmd, info, ctx)
    }

    /// An integrator's command: like a customer twin's, and its key is claimed once.
    fn issue(&mut self, issued: IssuedCommand, ctx: &mut Ctx, env: &DeviceEnv) -> DeviceReply {
        let IssuedCommand {
            command,
            key,
            issued_by,
            priority,
            case_id,
            reason,
        } = issued;
        let Some(model) = self.model.as_deref().and_then(|m| env.catalogue.model(m)) else {
            return DeviceReply::UnknownDevice;
        };
        match &command.action {
            None if !model.has_command(&command.name) => {
                return DeviceReply::Rejected(format!(
                    "model {} has no command {:?}",
                    model.id(),
                    command.name
                ));
            }
            Some(CommandAction::Answer {
                question_id,
                option_id,
            }) => match model.question(question_id) {
                None => {
                    return DeviceReply::Rejected(format!(
                        "model {} asks no question {question_id:?}",
                        model.id()
                    ));
                }
                Some(q) if !q.options.contains(option_id) => {
                    return DeviceReply::Rejected(format!(
                        "option {option_id:?} is not one of {:?}",
                        q.options
                    ));
                }
                Some(_) => {}
            },
            _ => {}
        }
        if command.device != self.id || tenant_of(&command.command_id) != tenant_of(&self.id) {
            return DeviceReply::Rejected(format!(
                "command {:?} is not for device {}",
                command.command_id, self.id
            ));
        }
        if command.expires_at_ms <= ctx.now() {
            return DeviceReply::Rejected(format!(
                "command {:?} expired at {}",
                command.command_id, command.expires_at_ms
            ));
        }
        if self.commands.iter().any(|c| c.id == command.command_id) {
            return DeviceReply::Ok; // a retry
        }
        let mut command = command;
        // A configuration becomes the desired state (the same change as a desired field
        // set on its own), all fields or none; the command then follows it to the device.
        if let Some(CommandAction::Configure { fields }) = &mut command.action {
            if self.site.is_none() {
                return DeviceReply::Rejected("device has no site".into());
            }
            let changes: Vec<(String, String, Option<u64>)> = fields
                .iter()
                .map(|(f, v, version)| (f.clone(), v.clone(), version.checked_sub(1)))
                .collect();
            match self.change_desired(&changes, ctx) {
                Ok(versions) => {
                    for (f, v) in fields.iter_mut().zip(versions) {
                        f.2 = v;
                    }
                }
                Err(why) => return DeviceReply::Rejected(why),
            }
            self.send_desired(ctx);
        }
        ctx.op(Op::PutIdempotency {
            key: Key::new(format!("commands/{}/{key}", tenant_of(&self.id))),
            value: command.command_id.clone().into_bytes(),
            mode: crate::store::IdempotencyMode::CreateOnly,
        });
        let info = |site: String, cmd: &DeviceCommand| CommandInfo {
            site,
            name: cmd.name.clone(),
            args: cmd.args.clone(),
            expires_at_ms: cmd.expires_at_ms,
            priority,
            issued_by,
            key,
            case_id,
            reason,
            action: cmd.action.clone(),
        };
        self.queue_command(command, info, ctx)
    }

    /// Cancels a command (see [`cancel_step`]): one the edge has not confirmed ends at
    /// once; for one the edge holds, the edge is asked, once.
    fn cancel_command(
        &mut self,
        command_id: &str,
        reason: String,
        key: String,
        ctx: &mut Ctx,
    ) -> DeviceReply {
        let Some(c) = self.commands.iter_mut().find(|c| c.id == command_id) else {
            return DeviceReply::Rejected(format!("unknown command {command_id:?}"));
        };
        let step = cancel_step(&c.state, c.cancel_requested);
        match step {
            CancelStep::Nothing => return DeviceReply::Ok,
            CancelStep::Refuse => {
                return DeviceReply::Rejected(format!(
                    "command {command_id:?} is {}, it can no longer be cancelled",
                    c.state
                ));
            }
            CancelStep::EndNow => {
                c.state = "cancelled".into();
                ctx.disarm(c.expires_at_ms, &expiry_tag(command_id));
            }
            CancelStep::AskEdge => c.cancel_requested = true,
        }
        let state = c.state.clone();
        ctx.changed();
        // Logged either way: the request stays visible while the edge is asked (in the
        // state the command is in until the edge answers).
        let detail = match step {
            CancelStep::EndNow => reason.clone(),
            _ => format!("cancel requested: {reason}"),
        };
        self.log_command(ctx, command_id, &state, &detail, None, Some(key));
        if step == CancelStep::EndNow {
            let body = Body::CommandOutcome {
                device: self.id.clone(),
                command_id: command_id.to_owned(),
                succeeded: false,
                detail: format!("cancelled: {reason}"),
            };
            self.tell_customer(ctx, body);
        }
        if let Some(site) = self.site.clone() {
            let body = Body::CancelCommand {
                device: self.id.clone(),
                command_id: command_id.to_owned(),
                reason,
            };
            self.send(ctx, Address::Edge(site), body);
        }
        DeviceReply::Ok
    }

    /// Appends a command's transition to the tenant's command log (`cancel`: the key of
    /// the cancel that made it).
    fn log_command(
        &self,
        ctx: &mut Ctx,
        command_id: &str,
        state: &str,
        detail: &str,
        info: Option<CommandInfo>,
        cancel: Option<String>,
    ) {
        let event = CommandEvent {
            command_id: command_id.to_owned(),
            device: self.id.clone(),
            state: state.to_owned(),
            at: ctx.now(),
            detail: detail.to_owned(),
            info,
            cancel,
        };
        ctx.op(Op::Append {
            log: commands_log(tenant_of(&self.id)),
            value: serde_json::to_vec(&event).expect("a command event is plain data"),
        });
    }

    fn queue_command(
        &mut self,
        cmd: DeviceCommand,
        info: impl FnOnce(String, &DeviceCommand) -> CommandInfo,
        ctx: &mut Ctx,
    ) -> DeviceReply {
        if self.commands.iter().any(|c| c.id == cmd.command_id) {
            return DeviceReply::Ok; // a redelivery
        }
        let Some(site) = self.site.clone() else {
            return DeviceReply::Rejected("device has no site".into());
        };
        let info = info(site.clone(), &cmd);
        self.log_command(ctx, &cmd.command_id, "queued", "", Some(info), None);
        let awaits = match &cmd.action {
            Some(CommandAction::Configure { fields }) => fields
                .iter()
                .map(|(f, v, _)| (f.clone(), v.clone()))
                .collect(),
            _ => Vec::new(),
        };
        let configure = !awaits.is_empty();
        self.commands.push(CommandEntry {
            id: cmd.command_id.clone(),
            name: cmd.name.clone(),
            state: "queued".into(),
            expires_at_ms: cmd.expires_at_ms,
            cancel_requested: false,
            awaits,
        });
        if self.commands.len() > MAX_COMMANDS {
            self.commands.remove(0);
        }
        // If the edge never confirms it before its time to live runs out (the site stayed
        // offline), the twin ends it as expired itself; past the edge, the edge decides.
        ctx.arm(cmd.expires_at_ms, &expiry_tag(&cmd.command_id));
        // A configuration travels as the desired state (sent already); the others as
        // commands through the site's command log.
        if !configure {
            self.send(ctx, Address::Edge(site), Body::Command(cmd));
        }
        ctx.changed();
        DeviceReply::Ok
    }
}

enum Refusal {
    Withheld,
    Invalid(RejectKind, String),
}

impl Twin for DeviceTwin {
    type Msg = DeviceMsg;
    type Reply = DeviceReply;
    type Env = DeviceEnv;
    const KIND: &'static str = "device";

    fn create(id: &str, _env: &DeviceEnv) -> crate::Result<Self> {
        Ok(Self {
            id: id.to_owned(),
            customer: None,
            site: None,
            model: None,
            high_water: 0,
            gaps: 0,
            reported: Vec::new(),
            signals: Vec::new(),
            concern: Vec::new(),
            health: Vec::new(),
            consent: Consent::of(&[ConsentScope::Diagnostics]),
            commands: Vec::new(),
            desired: Default::default(),
            reported_fields: Default::default(),
            rul: None,
            withheld: 0,
            last_seen_ms: 0,
            mail_seq: 0,
            indexed: false,
        })
    }

    fn restore(id: &str, snapshot: &[u8], _env: &DeviceEnv) -> crate::Result<Self> {
        crate::host::decode_snapshot(id, snapshot)
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("device twin state is plain data")
    }

    fn handle(&mut self, msg: DeviceMsg, ctx: &mut Ctx, env: &DeviceEnv) -> DeviceReply {
        match msg {
            DeviceMsg::Provision {
                customer,
                site,
                model,
            } => {
                let Some(m) = env.catalogue.model(&model) else {
                    return DeviceReply::Rejected(format!("unknown device model {model:?}"));
                };
                let unchanged = self.model.as_deref() == Some(m.id())
                    && self.customer.as_deref() == Some(customer.as_str())
                    && self.site.as_deref() == Some(site.as_str());
                if unchanged {
                    // Provisioning again is harmless and free (but indexes a device
                    // provisioned before the index existed).
                    self.index(ctx);
                    return DeviceReply::Ok;
                }
                let r = self.provision(customer, site, m, env);
                if r == DeviceReply::Ok {
                    ctx.changed();
                    self.index(ctx);
                }
                r
            }
            DeviceMsg::Apply(items) => self.apply(items, ctx, env),
            DeviceMsg::FromSite { site, items } => match self.check_site(&site) {
                Some(refusal) => refusal,
                None => self.apply(items, ctx, env),
            },
            DeviceMsg::CommandStatus {
                site,
                command_id,
                state,
            } => {
                if let Some(refusal) = self.check_site(&site) {
                    return refusal;
                }
                match self.commands.iter_mut().find(|c| c.id == command_id) {
                    // Only forward: a late or repeated progress report (a SENT_TO_EDGE
                    // resent after DELIVERED_TO_DEVICE, any report after the result)
                    // changes nothing.
                    Some(c) if command_rank(&state) > command_rank(&c.state) => {
                        c.state = state.clone();
                        self.log_command(ctx, &command_id, &state, "", None, None);
                        ctx.changed();
                        DeviceReply::Ok
                    }
                    Some(_) => DeviceReply::Ok,
                    None => DeviceReply::Rejected(format!("unknown command {command_id:?}")),
                }
            }
            DeviceMsg::Mail(mail) => self.handle_mail(*mail, ctx),
            DeviceMsg::Detach { customer } => {
                let r = self.detach(&customer, ctx, env);
                self.index(ctx);
                r
            }
            DeviceMsg::Issue(issued) => self.issue(*issued, ctx, env),
            DeviceMsg::CancelCommand {
                command_id,
                reason,
                key,
            } => self.cancel_command(&command_id, reason, key, ctx),
            DeviceMsg::SetDesired {
                field,
                value,
                expected_version,
            } => self.set_desired(field, value, expected_version, ctx),
        }
    }

    fn on_timer(&mut self, tag: &str, ctx: &mut Ctx, _env: &DeviceEnv) {
        let Some(command_id) = tag.strip_prefix(EXPIRY_TAG) else {
            tracing::warn!(device = %self.id, tag, "unknown timer");
            return;
        };
        let Some(c) = self.commands.iter_mut().find(|c| c.id == command_id) else {
            return;
        };
        // Only a command the edge never confirmed: one it holds ends with the edge's own
        // result (delivered in time, or expired there).
        if c.state != "queued" {
            return;
        }
        c.state = "expired".into();
        ctx.changed();
        self.log_command(
            ctx,
            command_id,
            "expired",
            "expired before the site received it",
            None,
            None,
        );
        let body = Body::CommandOutcome {
            device: self.id.clone(),
            command_id: command_id.to_owned(),
            succeeded: false,
            detail: "expired before the site received it".into(),
        };
        self.tell_customer(ctx, body);
    }
}

/// Prefix of a command's expiry timer tag.
const EXPIRY_TAG: &str = "cmd-expiry/";

fn expiry_tag(command_id: &str) -> String {
    format!("{EXPIRY_TAG}{command_id}")
}
