//! The customer twin: one per customer. It merges what the customer's device twins
//! conclude into cases — one per root cause — and runs each case's playbook: a remote
//! remedy first, orders and bookings once each, questions to the customer, and a handoff
//! to a human with the whole context when a machine should not decide alone.
//!
//! It protects the customer: it notifies only with consent, outside quiet hours and inside
//! the weekly budget (safety alarms excepted), and it never uses an insight drawn from data
//! the customer has not consented to.
//!
//! # How a case runs
//! An insight with a failure mode opens a case (or joins the open case of the same device
//! and mode). The playbook's steps run in order; a step whose condition does not hold is
//! skipped. A step that waits — a remote command (until its wait is over), a question
//! (until answered or timed out), an order (until the desk confirms), a booking (until the
//! scheduler answers) — parks the case; the matching mail or timer resumes it. Every
//! effect carries an idempotency key made of the case id and the step, so replays of the
//! same mail produce nothing new.

use crate::catalogue::playbook::{Action, CONFIRM_VISIT, DECLINE_VISIT, Facts, Remedy, Reply};
use crate::catalogue::{Catalogue, DeviceModel, FailureMode};
use crate::host::{Ctx, Twin};
use crate::mail::{Address, Body, CaseContext, DeviceCommand, Mail, tenant_of};
use crate::model::{ConsentScope, DAY_MS, Insight, InsightKind, Priority, TimeMs};
use crate::policy::{
    Consent, NotifyDecision, Preferences, SentLog, ValueTier, civil_time, decide_notification,
    local_time,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// Insights kept per case for the agent's context.
const MAX_CASE_INSIGHTS: usize = 32;
/// Closed cases kept in the history.
const MAX_HISTORY: usize = 32;
/// A case opened with less confidence than this goes to a person at once.
const HANDOFF_BELOW_CONFIDENCE: f64 = 0.35;
/// How long a one-tap approval request stays open.
const APPROVAL_TIMEOUT_MS: u64 = 2 * DAY_MS;
/// The answer that approves an order.
pub const APPROVE: &str = "Order";

/// How far ahead technician availability is offered to the scheduler.
const BOOKING_HORIZON_MS: u64 = 30 * DAY_MS;

/// What every customer twin shares.
pub struct CustomerEnv {
    /// The device models.
    pub catalogue: Arc<Catalogue>,
}

/// Who the customer is to the system.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Service region (for technicians).
    pub region: String,
    /// Value tier and its service level.
    pub tier: ValueTier,
    /// Channels, quiet hours, budget, availability, standing approvals.
    pub preferences: Preferences,
    /// What the customer consented to.
    pub consent: Consent,
}

impl Default for Profile {
    fn default() -> Self {
        Self {
            region: "default".into(),
            tier: ValueTier::Standard,
            preferences: Preferences::default(),
            consent: Consent::of(&[ConsentScope::Diagnostics, ConsentScope::Contact]),
        }
    }
}

/// What a customer twin is sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CustomerMsg {
    /// Mail from another twin (delivered at least once; de-duplicated here).
    Mail(Mail),
    /// Set the customer's profile (provisioning, or the customer editing it).
    SetProfile(Profile),
    /// A device of this customer, of a catalogue model.
    AddDevice {
        /// The device twin's id.
        device: String,
        /// Its model id.
        model: String,
    },
    /// Grant and withdraw consent scopes.
    SetConsent {
        /// Scopes to grant.
        grant: Vec<ConsentScope>,
        /// Scopes to withdraw.
        withdraw: Vec<ConsentScope>,
    },
    /// Erase the customer (the right to be forgotten): the twin forgets the profile, the
    /// devices, the cases and the notification history, and stays a tombstone that takes
    /// nothing any more, so later mail cannot bring the customer back.
    Erase,
}

/// A customer twin's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CustomerReply {
    /// Taken (or a duplicate, ignored).
    Ok,
    /// Refused for good, with the reason.
    Rejected(String),
}

/// Where a case stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaseState {
    /// The playbook is running.
    Open,
    /// A person has it.
    HandedOff,
    /// Done.
    Closed,
}

/// What a parked case waits for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Wait {
    /// Nothing: the playbook may go on.
    Nothing,
    /// A remote command's effect, judged when `due` comes.
    Remedy {
        /// The command.
        command_id: String,
        /// When to judge.
        due: TimeMs,
    },
    /// The customer's answer, until `due`.
    Answer {
        /// The question.
        question_id: String,
        /// When it times out.
        due: TimeMs,
    },
    /// The parts desk's answer about an order.
    Part {
        /// The order's key.
        key: String,
    },
    /// The scheduler's answer about a booking.
    Booking {
        /// The booking's key.
        key: String,
    },
}

/// The customer's reply to the latest question, as the case remembers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// Nothing asked yet.
    NotAsked,
    /// The question timed out.
    NoAnswer,
    /// This option was picked.
    Answered(String),
}

/// Outcome of the latest remote remedy, as the case remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemedyOutcome {
    /// None judged yet.
    NotTried,
    /// The indication cleared.
    Succeeded,
    /// The indication persisted, or the command failed.
    Failed,
}

/// One customer problem from first signal to resolution, with every action taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Case {
    /// `customer/n`.
    pub id: String,
    /// The device.
    pub device: String,
    /// Its model.
    pub model: String,
    /// The failure mode: the root cause.
    pub mode: String,
    /// How urgent.
    pub priority: Priority,
    /// The strongest confidence among its insights.
    pub confidence: f64,
    /// When it opened.
    pub opened_at: TimeMs,
    /// The insights behind it, oldest first (bounded).
    pub insights: Vec<Insight>,
    /// What was done, oldest first.
    pub actions: Vec<String>,
    /// The next playbook step to consider.
    pub next_step: usize,
    /// What it is parked on.
    pub wait: Wait,
    /// The latest remedy's outcome.
    pub remedy: RemedyOutcome,
    /// The latest question's answer.
    pub answer: Answer,
    /// Whether the device reported the indication cleared since the latest remedy.
    pub cleared: bool,
    /// When the ordered part arrives.
    pub part_arrives_at: Option<TimeMs>,
    /// An order waiting for the customer's one-tap approval: (part number, quantity).
    #[serde(default)]
    pub pending_order: Option<(String, u32)>,
    /// The latest technician visit the case asked for.
    #[serde(default)]
    pub visit: Option<Visit>,
    /// Whether it went to a person.
    pub handed_off: bool,
    /// Where it stands.
    pub state: CaseState,
}

/// A technician visit a case asked the scheduler for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Visit {
    /// The booking's idempotency key.
    pub key: String,
    /// Booked confirmed (a standing approval), or confirmed by the customer since.
    pub confirmed: bool,
}

impl Visit {
    /// The id of the one-tap question that asks the customer to confirm the visit.
    pub fn question_id(&self) -> String {
        format!("{}/confirm", self.key)
    }
}

/// A notification held back by quiet hours or the budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PendingNote {
    n: u64,
    due: TimeMs,
    text: String,
    priority: Priority,
    question_id: Option<String>,
}

/// The customer twin's state (its snapshot).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomerTwin {
    id: String,
    profile: Profile,
    /// device id → model id
    devices: BTreeMap<String, String>,
    cases: Vec<Case>,
    history: VecDeque<Case>,
    sent: SentLog,
    pending: Vec<PendingNote>,
    /// Highest mail sequence seen per sender, for de-duplication.
    seen: BTreeMap<String, u64>,
    mail_seq: u64,
    case_seq: u64,
    note_seq: u64,
    /// Insights not used because the customer did not consent to their data.
    withheld: u64,
    /// Erased: a tombstone that takes no mail, timers or changes.
    #[serde(default)]
    erased: bool,
}

/// The sender key and sequence of a mail id `sender/seq`.
fn mail_seq(id: &str) -> Option<(&str, u64)> {
    let (sender, seq) = id.rsplit_once('/')?;
    Some((sender, seq.parse().ok()?))
}

impl CustomerTwin {
    /// The customer's profile.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Open cases.
    pub fn cases(&self) -> &[Case] {
        &self.cases
    }

    /// Closed cases, oldest first.
    pub fn history(&self) -> impl Iterator<Item = &Case> {
        self.history.iter()
    }

    /// Insights not used for lack of consent.
    pub fn withheld(&self) -> u64 {
        self.withheld
    }

    /// The customer's devices: (device id, model id), by device id.
    pub fn devices(&self) -> impl Iterator<Item = (&str, &str)> {
        self.devices.iter().map(|(d, m)| (d.as_str(), m.as_str()))
    }

    /// Whether the customer was erased (the twin is a tombstone).
    pub fn is_erased(&self) -> bool {
        self.erased
    }

    /// Forgets everything about the customer but the counters that keep this twin's mail
    /// and case ids unique, and becomes a tombstone.
    fn erase(&mut self, ctx: &mut Ctx) {
        let (id, mail_seq, case_seq, note_seq) =
            (self.id.clone(), self.mail_seq, self.case_seq, self.note_seq);
        // Pending timers (deferred notes, case waits) find nothing when they fire.
        *self = Self {
            id,
            profile: Profile {
                consent: Consent::default(),
                ..Profile::default()
            },
            devices: BTreeMap::new(),
            cases: Vec::new(),
            history: VecDeque::new(),
            sent: SentLog::default(),
            pending: Vec::new(),
            seen: BTreeMap::new(),
            mail_seq,
            case_seq,
            note_seq,
            withheld: 0,
            erased: true,
        };
        ctx.changed();
    }

    fn me(&self) -> Address {
        Address::Customer(self.id.clone())
    }

    fn tenant(&self) -> &str {
        tenant_of(&self.id)
    }

    fn send(&mut self, ctx: &mut Ctx, to: Address, body: Body) {
        self.mail_seq += 1;
        let mail = Mail {
            id: format!("{}/{}", self.id, self.mail_seq),
            from: self.me(),
            to,
            body,
        };
        ctx.emit(mail.encode());
    }

    /// Sends, defers or suppresses a notification by the policy.
    fn notify(
        &mut self,
        ctx: &mut Ctx,
        text: String,
        priority: Priority,
        question_id: Option<String>,
    ) -> String {
        let prefs = &self.profile.preferences;
        match decide_notification(prefs, self.profile.consent, &self.sent, priority, ctx.now()) {
            NotifyDecision::Send(channel) => {
                if priority != Priority::Safety {
                    self.sent.record(ctx.now(), prefs.budget_per_week);
                }
                let body = Body::Notify {
                    customer: self.id.clone(),
                    channel: channel.name().into(),
                    text: text.clone(),
                    priority,
                    question_id,
                };
                self.send(ctx, Address::Notifier(self.tenant().to_owned()), body);
                format!("notified via {}: {text}", channel.name())
            }
            NotifyDecision::DeferUntil(due) => {
                self.note_seq += 1;
                let n = self.note_seq;
                ctx.arm(due, &format!("note:{n}"));
                self.pending.push(PendingNote {
                    n,
                    due,
                    text: text.clone(),
                    priority,
                    question_id,
                });
                let when = civil_time(due, self.profile.preferences.utc_offset_min);
                format!("notification deferred to {when}: {text}")
            }
            NotifyDecision::Suppress(why) => format!("notification suppressed ({why}): {text}"),
        }
    }

    fn handle_mail(&mut self, mail: Mail, ctx: &mut Ctx, env: &CustomerEnv) -> CustomerReply {
        if mail.from.tenant() != self.tenant() {
            return CustomerReply::Rejected(format!("mail {} from another tenant", mail.id));
        }
        if let Some((sender, seq)) = mail_seq(&mail.id) {
            // Keyed by the sender's address too: the tenant's desks share one twin id.
            let key = format!(
                "{}|{sender}",
                serde_json::to_string(&mail.from).unwrap_or_default()
            );
            match self.seen.get(&key) {
                Some(&last) if seq <= last => return CustomerReply::Ok, // a redelivery
                _ => {
                    self.seen.insert(key, seq);
                }
            }
        }
        ctx.changed();
        match mail.body {
            Body::Insight {
                device,
                model,
                insight,
            } => self.on_insight(device, model, insight, ctx, env),
            Body::InsightCleared {
                device,
                failure_mode,
                ..
            } => {
                for c in self.cases.iter_mut() {
                    if c.device == device && failure_mode.as_deref().is_none_or(|m| m == c.mode) {
                        c.cleared = true;
                    }
                }
            }
            Body::CommandOutcome {
                command_id,
                succeeded,
                detail,
                ..
            } => {
                if let Some(i) = self.cases.iter().position(
                    |c| matches!(&c.wait, Wait::Remedy { command_id: id, .. } if *id == command_id),
                ) {
                    let c = &mut self.cases[i];
                    c.actions.push(
                        format!(
                            "command {command_id}: {}",
                            if succeeded { "ran" } else { "failed" }
                        ) + &format!(" ({detail})"),
                    );
                    if !succeeded {
                        if let Wait::Remedy { due, .. } = c.wait {
                            ctx.disarm(due, &format!("case:{}:remedy", c.id));
                        }
                        c.remedy = RemedyOutcome::Failed;
                        c.wait = Wait::Nothing;
                        self.walk(i, ctx, env);
                    }
                }
            }
            Body::CustomerAnswer {
                question_id,
                answer,
            } => self.on_answer(&question_id, answer, ctx, env),
            Body::PartOrderUpdate {
                key,
                placed,
                arrives_at_ms,
                detail,
            } => {
                if let Some(i) = self
                    .cases
                    .iter()
                    .position(|c| matches!(&c.wait, Wait::Part { key: k } if *k == key))
                {
                    let c = &mut self.cases[i];
                    c.wait = Wait::Nothing;
                    if placed {
                        c.part_arrives_at = arrives_at_ms;
                        c.actions.push(format!("order {key} placed ({detail})"));
                        self.walk(i, ctx, env);
                    } else {
                        c.actions.push(format!("order {key} failed ({detail})"));
                        self.hand_off(i, "a part could not be ordered", ctx, env);
                    }
                }
            }
            Body::Booking {
                key,
                technician,
                slot,
                detail,
            } => {
                if let Some(i) = self
                    .cases
                    .iter()
                    .position(|c| matches!(&c.wait, Wait::Booking { key: k } if *k == key))
                {
                    self.cases[i].wait = Wait::Nothing;
                    match (technician, slot) {
                        (Some(t), Some((start, _))) => {
                            let when = civil_time(start, self.profile.preferences.utc_offset_min);
                            self.cases[i]
                                .actions
                                .push(format!("technician {t} booked for {when} ({detail})"));
                            if self.ask_to_confirm_visit(i, start, &when, ctx) {
                                return CustomerReply::Ok;
                            }
                            self.walk(i, ctx, env);
                        }
                        _ => {
                            self.cases[i]
                                .actions
                                .push(format!("no technician ({detail})"));
                            self.hand_off(i, "no technician slot fits", ctx, env);
                        }
                    }
                }
            }
            Body::HandoffUpdate {
                case_id,
                state,
                agent,
            } => {
                if let Some(i) = self.cases.iter().position(|c| c.id == case_id) {
                    let who = agent.unwrap_or_default();
                    self.cases[i].actions.push(format!("agent {who}: {state}"));
                    if state == "resolved" {
                        self.close(i);
                    }
                }
            }
            other => {
                return CustomerReply::Rejected(format!(
                    "a customer twin does not take {}",
                    serde_json::to_value(&other)
                        .ok()
                        .and_then(|v| v.get("type").and_then(|t| t.as_str().map(str::to_owned)))
                        .unwrap_or_default()
                ));
            }
        }
        CustomerReply::Ok
    }

    fn on_insight(
        &mut self,
        device: String,
        model: String,
        insight: Insight,
        ctx: &mut Ctx,
        env: &CustomerEnv,
    ) {
        // Safety alarms are used whatever the consent: they protect life and property.
        let vital = insight.kind == InsightKind::Alarm;
        if !vital && !self.profile.consent.allows(insight.scope) {
            self.withheld += 1;
            return;
        }
        let Some(mode_id) = insight.failure_mode.clone() else {
            // Signal versus noise: an insight that points to no failure mode opens no case.
            return;
        };
        let Some(m) = env.catalogue.model(&model) else {
            return;
        };
        let Some(mode) = m.failure_mode(&mode_id) else {
            return;
        };
        if let Some(c) = self
            .cases
            .iter_mut()
            .find(|c| c.device == device && c.mode == mode_id)
        {
            // The same root cause again: one case, more evidence.
            c.confidence = c.confidence.max(insight.confidence);
            if c.insights.len() < MAX_CASE_INSIGHTS {
                c.insights.push(insight);
            }
            return;
        }
        self.case_seq += 1;
        let priority = if insight.kind == InsightKind::Alarm {
            Priority::Safety
        } else {
            mode.severity
        };
        let case = Case {
            id: format!("{}/case-{}", self.id, self.case_seq),
            device,
            model,
            mode: mode_id,
            priority,
            confidence: insight.confidence,
            opened_at: ctx.now(),
            insights: vec![insight],
            actions: Vec::new(),
            next_step: 0,
            wait: Wait::Nothing,
            remedy: RemedyOutcome::NotTried,
            answer: Answer::NotAsked,
            cleared: false,
            part_arrives_at: None,
            pending_order: None,
            visit: None,
            handed_off: false,
            state: CaseState::Open,
        };
        self.cases.push(case);
        let i = self.cases.len() - 1;
        if priority == Priority::Safety {
            // A safety alarm reaches the customer and a person at once, whatever else the
            // playbook does.
            let text = format!("Safety alarm: {} on {}", mode.name, self.cases[i].device);
            let done = self.notify(ctx, text, Priority::Safety, None);
            self.cases[i].actions.push(done);
            self.hand_off(i, "safety alarm", ctx, env);
        } else if self.cases[i].confidence < HANDOFF_BELOW_CONFIDENCE {
            self.hand_off(i, "low confidence: a person should judge", ctx, env);
            return;
        } else if self.profile.tier.human_on_every_case() {
            self.hand_off(i, "premium customer: a person follows up", ctx, env);
        }
        self.walk(i, ctx, env);
    }

    fn on_answer(&mut self, question_id: &str, answer: String, ctx: &mut Ctx, env: &CustomerEnv) {
        if answer.eq_ignore_ascii_case("talk to a person") {
            if let Some(i) = self
                .cases
                .iter()
                .position(|c| question_id.starts_with(&c.id))
            {
                self.hand_off(i, "the customer asked for a person", ctx, env);
            }
            return;
        }
        if let Some(i) = self.cases.iter().position(
            |c| matches!(&c.wait, Wait::Answer { question_id: q, .. } if q == question_id),
        ) {
            let c = &mut self.cases[i];
            if let Wait::Answer { due, .. } = c.wait {
                ctx.disarm(due, &format!("case:{}:answer", c.id));
            }
            c.actions.push(format!("customer answered {answer:?}"));
            c.wait = Wait::Nothing;
            if let Some(visit) = c.visit.clone().filter(|v| v.question_id() == question_id) {
                self.on_visit_answer(i, visit, answer, ctx, env);
                return;
            }
            let c = &mut self.cases[i];
            if let Some((part, quantity)) = c.pending_order.take() {
                // An approval, not a playbook question: it decides the order only.
                if answer == APPROVE {
                    self.order(i, &part, quantity, ctx);
                    return;
                }
            } else {
                c.answer = Answer::Answered(answer);
            }
            self.walk(i, ctx, env);
        }
    }

    /// Runs case `i`'s playbook until it waits or ends.
    fn walk(&mut self, i: usize, ctx: &mut Ctx, env: &CustomerEnv) {
        let Some(model) = env.catalogue.model(&self.cases[i].model) else {
            return;
        };
        let Some(mode) = model.failure_mode(&self.cases[i].mode) else {
            return;
        };
        loop {
            let c = &self.cases[i];
            if c.state != CaseState::Open || c.wait != Wait::Nothing {
                return;
            }
            let Some(step) = mode.playbook.get(c.next_step) else {
                // The end without a handoff: handled by the machine.
                self.cases[i].actions.push("playbook done".into());
                self.close(i);
                return;
            };
            let step_no = c.next_step;
            let facts = Facts {
                confidence: c.confidence,
                remedy: match c.remedy {
                    RemedyOutcome::NotTried => Remedy::NotTried,
                    RemedyOutcome::Succeeded => Remedy::Succeeded,
                    RemedyOutcome::Failed => Remedy::Failed,
                },
                reply: match &c.answer {
                    Answer::NotAsked => Reply::NotAsked,
                    Answer::NoAnswer => Reply::NoAnswer,
                    Answer::Answered(a) => Reply::Answered(a),
                },
                standing_approval: self.approved(&step.action, model),
            };
            let holds = step.when.holds(&facts);
            self.cases[i].next_step += 1;
            if !holds {
                continue;
            }
            if !self.run_step(i, step_no, &step.action, model, mode, ctx, env) {
                return;
            }
        }
    }

    /// Whether the customer has a standing approval for an order step's part.
    fn approved(&self, action: &Action, model: &DeviceModel) -> bool {
        let part = match action {
            Action::OrderConsumable { consumable, .. } => {
                model.consumable(consumable).map(|c| c.part.as_str())
            }
            Action::OrderPart { part, .. } => Some(part.as_str()),
            _ => None,
        };
        part.is_some_and(|p| {
            self.profile
                .preferences
                .standing_approvals
                .iter()
                .any(|a| a == p)
        })
    }

    /// Whether the customer approved technician visits of `skill` without being asked.
    fn visit_approved(&self, skill: &str) -> bool {
        self.profile
            .preferences
            .visit_approvals
            .iter()
            .any(|a| a == skill || a == "*")
    }

    /// Case `i`'s visit was booked for `start` (`when` in the customer's time): a visit
    /// booked confirmed is announced; any other is proposed to the customer with one-tap
    /// options, and the case waits for the answer (true) until the visit starts or the
    /// approval timeout, whichever is first.
    fn ask_to_confirm_visit(&mut self, i: usize, start: TimeMs, when: &str, ctx: &mut Ctx) -> bool {
        let Some(visit) = self.cases[i].visit.clone() else {
            return false;
        };
        if visit.confirmed {
            let done = self.notify(
                ctx,
                format!("A technician visits on {when}"),
                Priority::Normal,
                None,
            );
            self.cases[i].actions.push(done);
            return false;
        }
        // The minimum-gesture approval: "we booked X; tap to confirm".
        let qid = visit.question_id();
        let due = (ctx.now() + APPROVAL_TIMEOUT_MS).min(start.max(ctx.now() + 1));
        let text = format!(
            "A technician can visit on {when}; tap to confirm [{CONFIRM_VISIT} / {DECLINE_VISIT}]"
        );
        let done = self.notify(ctx, text, Priority::Normal, Some(qid.clone()));
        let c = &mut self.cases[i];
        ctx.arm(due, &format!("case:{}:answer", c.id));
        c.actions.push(done);
        c.wait = Wait::Answer {
            question_id: qid,
            due,
        };
        true
    }

    /// The customer answered case `i`'s visit confirmation: a yes confirms the booking
    /// and the playbook goes on; anything else cancels it (its slot is freed) and a
    /// person arranges another time.
    fn on_visit_answer(
        &mut self,
        i: usize,
        visit: Visit,
        answer: String,
        ctx: &mut Ctx,
        env: &CustomerEnv,
    ) {
        let scheduler = Address::Scheduler(self.tenant().to_owned());
        let confirmed = answer.eq_ignore_ascii_case(CONFIRM_VISIT);
        self.cases[i].answer = Answer::Answered(answer);
        if confirmed {
            self.send(
                ctx,
                scheduler,
                Body::ConfirmVisit {
                    key: visit.key.clone(),
                },
            );
            let c = &mut self.cases[i];
            c.actions.push(format!("visit {} confirmed", visit.key));
            c.visit = Some(Visit {
                confirmed: true,
                ..visit
            });
            self.walk(i, ctx, env);
        } else {
            self.send(
                ctx,
                scheduler,
                Body::CancelVisit {
                    key: visit.key.clone(),
                    reason: "declined by the customer".into(),
                },
            );
            self.cases[i]
                .actions
                .push(format!("visit {} declined: cancelled", visit.key));
            self.hand_off(i, "the customer declined the technician visit", ctx, env);
        }
    }

    /// Runs one step; false when the case now waits or ended.
    #[allow(clippy::too_many_arguments)]
    fn run_step(
        &mut self,
        i: usize,
        step_no: usize,
        action: &Action,
        model: &DeviceModel,
        mode: &FailureMode,
        ctx: &mut Ctx,
        env: &CustomerEnv,
    ) -> bool {
        let case_id = self.cases[i].id.clone();
        let device = self.cases[i].device.clone();
        match action {
            Action::RemoteCommand {
                command,
                args,
                wait_ms,
            } => {
                let command_id = format!("{case_id}/step-{step_no}");
                let due = ctx.now() + wait_ms;
                let cmd = DeviceCommand {
                    command_id: command_id.clone(),
                    device: device.clone(),
                    name: command.clone(),
                    args: args
                        .iter()
                        .map(|(k, v)| (k.clone(), serde_json::to_string(v).unwrap_or_default()))
                        .collect(),
                    expires_at_ms: due,
                    priority: Default::default(),
                    action: None,
                };
                self.send(ctx, Address::Device(device), Body::Command(cmd));
                ctx.arm(due, &format!("case:{case_id}:remedy"));
                let c = &mut self.cases[i];
                c.cleared = false;
                c.actions
                    .push(format!("remote command {command} sent ({command_id})"));
                c.wait = Wait::Remedy { command_id, due };
                false
            }
            Action::OrderConsumable {
                consumable,
                quantity,
            } => {
                let Some(part) = model.consumable(consumable).map(|c| c.part.clone()) else {
                    return true;
                };
                if self.approved(action, model) {
                    self.order(i, &part, *quantity, ctx);
                } else {
                    // No standing approval: the minimum gesture, "we believe X; tap to
                    // confirm", and the order only on a yes.
                    let qid = format!("{case_id}/approve-{part}");
                    let due = ctx.now() + APPROVAL_TIMEOUT_MS;
                    let text = format!(
                        "We believe your {} needs {consumable}; tap to order it [{APPROVE} / Not now]",
                        model.name()
                    );
                    let done = self.notify(ctx, text, Priority::Normal, Some(qid.clone()));
                    ctx.arm(due, &format!("case:{case_id}:answer"));
                    let c = &mut self.cases[i];
                    c.actions
                        .push(format!("asked to approve ordering {part} ({done})"));
                    c.pending_order = Some((part, *quantity));
                    c.wait = Wait::Answer {
                        question_id: qid,
                        due,
                    };
                }
                false
            }
            Action::OrderPart { part, quantity } => {
                self.order(i, part, *quantity, ctx);
                false
            }
            Action::BookTechnician {
                skill,
                duration_ms,
                after_part_arrives,
            } => {
                let key = format!("{case_id}/visit-{step_no}");
                let confirmed = self.visit_approved(skill);
                let not_before = if *after_part_arrives {
                    self.cases[i].part_arrives_at.unwrap_or(ctx.now())
                } else {
                    ctx.now()
                };
                let body = Body::Book {
                    key: key.clone(),
                    customer: self.id.clone(),
                    case_id: case_id.clone(),
                    skill: skill.clone(),
                    region: self.profile.region.clone(),
                    not_before_ms: not_before,
                    windows: self.availability_windows(not_before),
                    duration_ms: *duration_ms,
                    confirmed,
                };
                self.send(ctx, Address::Scheduler(self.tenant().to_owned()), body);
                let c = &mut self.cases[i];
                c.actions
                    .push(format!("technician ({skill}) requested ({key})"));
                c.visit = Some(Visit {
                    key: key.clone(),
                    confirmed,
                });
                c.wait = Wait::Booking { key };
                false
            }
            Action::AskCustomer {
                question_id,
                text,
                options,
                timeout_ms,
            } => {
                let qid = format!(
                    "{case_id}/{}",
                    question_id
                        .clone()
                        .unwrap_or_else(|| format!("q-{step_no}"))
                );
                let due = ctx.now() + timeout_ms;
                let priority = self.cases[i].priority.min(Priority::High);
                let done = self.notify(
                    ctx,
                    format!("{text} [{}]", options.join(" / ")),
                    priority,
                    Some(qid.clone()),
                );
                ctx.arm(due, &format!("case:{case_id}:answer"));
                let c = &mut self.cases[i];
                c.actions
                    .push(format!("asked the customer: {text} ({done})"));
                c.wait = Wait::Answer {
                    question_id: qid,
                    due,
                };
                false
            }
            Action::NotifyCustomer { template, priority } => {
                let priority = if *priority == Priority::Safety && !mode.is_safety() {
                    Priority::High
                } else {
                    *priority
                };
                let done = self.notify(
                    ctx,
                    format!("{template}: {} on {device}", mode.name),
                    priority,
                    None,
                );
                self.cases[i].actions.push(done);
                true
            }
            Action::Handoff { reason } => {
                self.hand_off(i, reason, ctx, env);
                false
            }
        }
    }

    fn order(&mut self, i: usize, part: &str, quantity: u32, ctx: &mut Ctx) {
        let case_id = self.cases[i].id.clone();
        let key = format!("{case_id}/{part}");
        let body = Body::OrderPart {
            key: key.clone(),
            part_number: part.to_owned(),
            quantity,
            customer: self.id.clone(),
            case_id,
            device: self.cases[i].device.clone(),
        };
        self.send(ctx, Address::Parts(self.tenant().to_owned()), body);
        let c = &mut self.cases[i];
        c.actions
            .push(format!("ordered {quantity} × {part} ({key})"));
        c.wait = Wait::Part { key };
    }

    /// The customer's weekly availability as UTC windows from `from` over the horizon.
    fn availability_windows(&self, from: TimeMs) -> Vec<(TimeMs, TimeMs)> {
        let prefs = &self.profile.preferences;
        if prefs.availability.is_empty() {
            return Vec::new();
        }
        let offset = i64::from(prefs.utc_offset_min) * 60_000;
        let (_, weekday) = local_time(from, prefs.utc_offset_min);
        let local_midnight =
            ((from as i64 + offset).div_euclid(DAY_MS as i64) * DAY_MS as i64) - offset;
        let mut out = Vec::new();
        for day in 0..(BOOKING_HORIZON_MS / DAY_MS) as i64 {
            let wd = ((i64::from(weekday) + day) % 7) as u8;
            let midnight = local_midnight + day * DAY_MS as i64;
            for a in prefs.availability.iter().filter(|a| a.weekday == wd) {
                let start = (midnight + i64::from(a.start_min) * 60_000) as TimeMs;
                let end = (midnight + i64::from(a.end_min) * 60_000) as TimeMs;
                if end > from {
                    out.push((start.max(from), end));
                }
            }
        }
        out
    }

    /// Hands case `i` to a person with its whole context (once).
    fn hand_off(&mut self, i: usize, reason: &str, ctx: &mut Ctx, env: &CustomerEnv) {
        if self.cases[i].handed_off {
            return;
        }
        let c = &self.cases[i];
        let suggested = env
            .catalogue
            .model(&c.model)
            .and_then(|m| m.failure_mode(&c.mode))
            .and_then(|m| m.playbook.get(c.next_step))
            .map_or_else(
                || "a person's judgement".to_owned(),
                |s| s.action.name().to_owned(),
            );
        let withheld = self
            .profile
            .consent
            .missing()
            .into_iter()
            .filter(|s| matches!(s, ConsentScope::Diagnostics | ConsentScope::UsageAnalytics))
            .collect();
        let context = CaseContext {
            customer: self.id.clone(),
            devices: vec![c.device.clone()],
            root_cause: c.mode.clone(),
            insights: c.insights.clone(),
            actions: c.actions.clone(),
            suggested_next_step: suggested,
            withheld,
        };
        let body = Body::Handoff {
            case_id: c.id.clone(),
            priority: c.priority,
            reason: reason.to_owned(),
            context,
        };
        self.send(ctx, Address::Handoff(self.tenant().to_owned()), body);
        let c = &mut self.cases[i];
        c.handed_off = true;
        c.state = CaseState::HandedOff;
        c.actions.push(format!("handed to a person: {reason}"));
    }

    fn close(&mut self, i: usize) {
        let mut c = self.cases.remove(i);
        c.state = CaseState::Closed;
        self.history.push_back(c);
        while self.history.len() > MAX_HISTORY {
            self.history.pop_front();
        }
    }
}

impl Twin for CustomerTwin {
    type Msg = CustomerMsg;
    type Reply = CustomerReply;
    type Env = CustomerEnv;
    const KIND: &'static str = "customer";

    fn create(id: &str, _env: &CustomerEnv) -> crate::Result<Self> {
        Ok(Self {
            id: id.to_owned(),
            profile: Profile::default(),
            devices: BTreeMap::new(),
            cases: Vec::new(),
            history: VecDeque::new(),
            sent: SentLog::default(),
            pending: Vec::new(),
            seen: BTreeMap::new(),
            mail_seq: 0,
            case_seq: 0,
            note_seq: 0,
            withheld: 0,
            erased: false,
        })
    }

    fn restore(id: &str, snapshot: &[u8], _env: &CustomerEnv) -> crate::Result<Self> {
        crate::host::decode_snapshot(id, snapshot)
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("customer twin state is plain data")
    }

    fn handle(&mut self, msg: CustomerMsg, ctx: &mut Ctx, env: &CustomerEnv) -> CustomerReply {
        if self.erased {
            return match msg {
                // Mail still in flight for the customer is dropped: it must not bring
                // personal data back.
                CustomerMsg::Mail(_) | CustomerMsg::Erase => CustomerReply::Ok,
                _ => CustomerReply::Rejected(format!("customer {} is erased", self.id)),
            };
        }
        match msg {
            CustomerMsg::Erase => {
                self.erase(ctx);
                CustomerReply::Ok
            }
            CustomerMsg::Mail(mail) => self.handle_mail(mail, ctx, env),
            CustomerMsg::SetProfile(p) => {
                let consent_changed = p.consent != self.profile.consent;
                self.profile = p;
                ctx.changed();
                if consent_changed {
                    self.tell_devices_consent(ctx);
                }
                CustomerReply::Ok
            }
            CustomerMsg::AddDevice { device, model } => {
                if tenant_of(&device) != self.tenant() {
                    return CustomerReply::Rejected(format!(
                        "device {device} is of another tenant"
                    ));
                }
                if env.catalogue.model(&model).is_none() {
                    return CustomerReply::Rejected(format!("unknown device model {model:?}"));
                }
                if self.devices.get(&device) == Some(&model) {
                    return CustomerReply::Ok; // already known: nothing to write or send
                }
                self.devices.insert(device.clone(), model);
                ctx.changed();
                // Only the new device needs to learn the consent; the others know it.
                let allowed = self.allowed_scopes();
                self.send(
                    ctx,
                    Address::Device(device),
                    Body::ConsentChanged { allowed },
                );
                CustomerReply::Ok
            }
            CustomerMsg::SetConsent { grant, withdraw } => {
                for s in grant {
                    self.profile.consent.grant(s);
                }
                for s in withdraw {
                    self.profile.consent.withdraw(s);
                }
                ctx.changed();
                self.tell_devices_consent(ctx);
                CustomerReply::Ok
            }
        }
    }

    fn on_timer(&mut self, tag: &str, ctx: &mut Ctx, env: &CustomerEnv) {
        if self.erased {
            return;
        }
        ctx.changed();
        if let Some(n) = tag
            .strip_prefix("note:")
            .and_then(|n| n.parse::<u64>().ok())
        {
            if let Some(pos) = self.pending.iter().position(|p| p.n == n) {
                let p = self.pending.remove(pos);
                self.notify(ctx, p.text, p.priority, p.question_id);
            }
            return;
        }
        let Some(rest) = tag.strip_prefix("case:") else {
            return;
        };
        let Some((case_id, what)) = rest.rsplit_once(':') else {
            return;
        };
        let Some(i) = self.cases.iter().position(|c| c.id == case_id) else {
            return;
        };
        let c = &mut self.cases[i];
        match (what, &c.wait) {
            ("remedy", Wait::Remedy { .. }) => {
                c.remedy = if c.cleared {
                    RemedyOutcome::Succeeded
                } else {
                    RemedyOutcome::Failed
                };
                c.actions.push(format!("remedy judged: {:?}", c.remedy));
                c.wait = Wait::Nothing;
            }
            ("answer", Wait::Answer { .. }) => {
                if c.pending_order.take().is_some() {
                    c.actions.push("no approval: nothing ordered".into());
                } else {
                    c.answer = Answer::NoAnswer;
                    c.actions.push("the customer did not answer".into());
                }
                c.wait = Wait::Nothing;
            }
            _ => return,
        }
        self.walk(i, ctx, env);
    }
}

impl CustomerTwin {
    fn allowed_scopes(&self) -> Vec<ConsentScope> {
        [
            ConsentScope::Diagnostics,
            ConsentScope::UsageAnalytics,
            ConsentScope::Marketing,
            ConsentScope::Contact,
        ]
        .into_iter()
        .filter(|s| self.profile.consent.allows(*s))
        .collect()
    }

    fn tell_devices_consent(&mut self, ctx: &mut Ctx) {
        let allowed = self.allowed_scopes();
        let devices: Vec<String> = self.devices.keys().cloned().collect();
        for d in devices {
            self.send(
                ctx,
                Address::Device(d),
                Body::ConsentChanged {
                    allowed: allowed.clone(),
                },
            );
        }
    }
}
