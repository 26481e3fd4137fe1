//! The handoff queue: cases handed to human agents, with their whole context, and the
//! service-level clock that escalates them when nobody picks them up.
//!
//! # Delivery
//! Each event of a case is appended to the tenant's durable log [`cases_log`]
//! (`cases/{tenant}`) as a JSON [`CaseEvent`], in the same batch as the decision. The log
//! index is the delivery cursor: an integrator (the gRPC stream to come) reads from the
//! index after the last one it acknowledged, so delivery is at least once, and
//! `(case_id, event, level)` identifies an event for de-duplication.
//!
//! # Life of a case
//! ```text
//!  Handoff ─► handed_off (level 0), SLA timer by priority
//!               │ timer, not accepted ─► escalated (level + 1), timer again (until max_level)
//!               │                        └─► HandoffUpdate{escalated} to the customer twin
//!               ├ accepted ─► timer stopped ─► HandoffUpdate{accepted} to the customer twin
//!               └ resolved (from open or accepted) ─► HandoffUpdate{resolved} to the customer twin
//! ```
//! A case is known by its id: a repeated `Handoff` changes nothing and emits nothing.

use super::{
    Settings, Span, Status, Tenants, admit, body_name, check_key, check_limits, claim,
    decode_snapshot, default_max_records, default_retain, make_room, refuse, send, tenant_id,
};
use crate::host::{Ctx, Twin};
use crate::mail::{Address, AgentWork, Body, CaseContext, Mail, tenant_of};
use crate::model::{Priority, TimeMs};
use crate::store::{Key, MAX_VALUE_BYTES, Op};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The durable log of a tenant's case events, read by integrators from a cursor.
pub fn cases_log(tenant: &str) -> Key {
    Key::new(format!("cases/{tenant}"))
}

/// A handoff queue's settings (per tenant, see [`Tenants`]).
///
/// ```toml
/// max_level = 3
/// [sla]
/// safety = "5m"
/// high = "30m"
/// normal = "4h"
/// low = "24h"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoffConfig {
    /// How long a case may wait for an agent, by priority, before it is escalated (and
    /// again at the same interval after each escalation).
    #[serde(default)]
    pub sla: SlaConfig,
    /// Highest escalation level; a case at it is not escalated further (0: never).
    #[serde(default = "default_max_level")]
    pub max_level: u32,
    /// Resolved cases are forgotten this long after they were resolved; a repeat of a
    /// forgotten case is still refused by its idempotency record.
    #[serde(default = "default_retain")]
    pub retain: Span,
    /// Most cases kept; beyond it the oldest resolved ones are forgotten, and new cases
    /// are refused while this many are open.
    #[serde(default = "default_max_records")]
    pub max_records: usize,
}

/// Time to acceptance, by priority.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlaConfig {
    /// Safety cases (smoke, leak, break-in).
    #[serde(default = "default_safety")]
    pub safety: Span,
    /// High priority.
    #[serde(default = "default_high")]
    pub high: Span,
    /// Normal priority.
    #[serde(default = "default_normal")]
    pub normal: Span,
    /// Low priority.
    #[serde(default = "default_low")]
    pub low: Span,
}

fn default_max_level() -> u32 {
    3
}
fn default_safety() -> Span {
    Span::minutes(5)
}
fn default_high() -> Span {
    Span::minutes(30)
}
fn default_normal() -> Span {
    Span::hours(4)
}
fn default_low() -> Span {
    Span::hours(24)
}

impl Default for SlaConfig {
    fn default() -> Self {
        Self {
            safety: default_safety(),
            high: default_high(),
            normal: default_normal(),
            low: default_low(),
        }
    }
}

impl SlaConfig {
    /// The time to acceptance for `priority`, ms.
    pub fn of(&self, priority: Priority) -> u64 {
        match priority {
            Priority::Safety => self.safety,
            Priority::High => self.high,
            Priority::Normal => self.normal,
            Priority::Low => self.low,
        }
        .ms()
    }
}

impl Default for HandoffConfig {
    fn default() -> Self {
        Self {
            sla: SlaConfig::default(),
            max_level: default_max_level(),
            retain: default_retain(),
            max_records: default_max_records(),
        }
    }
}

impl Settings for HandoffConfig {
    fn validate(&self) -> Result<()> {
        check_limits(self.max_records)?;
        let s = &self.sla;
        if !(s.safety <= s.high && s.high <= s.normal && s.normal <= s.low) {
            return Err(Error::Config(
                "sla must not give a more urgent priority longer than a less urgent one".into(),
            ));
        }
        Ok(())
    }
}

/// What happened to a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaseEventKind {
    /// Handed to the agents, with its context.
    HandedOff,
    /// Not accepted within its SLA; its level went up.
    Escalated,
    /// An agent took it.
    Accepted,
    /// An agent closed it.
    Resolved,
    /// An agent added a note.
    Noted,
}

impl CaseEventKind {
    /// The state name used in [`Body::HandoffUpdate`].
    pub fn as_str(self) -> &'static str {
        match self {
            CaseEventKind::HandedOff => "handed_off",
            CaseEventKind::Escalated => "escalated",
            CaseEventKind::Accepted => "accepted",
            CaseEventKind::Resolved => "resolved",
            CaseEventKind::Noted => "noted",
        }
    }
}

/// One entry of [`cases_log`]: what integrators receive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseEvent {
    /// The case.
    pub case_id: String,
    /// What happened.
    pub event: CaseEventKind,
    /// How urgent.
    pub priority: Priority,
    /// Escalation level after the event (0: not escalated).
    pub escalation_level: u32,
    /// When, Unix ms.
    pub at_ms: TimeMs,
    /// The customer twin.
    pub customer: String,
    /// Why a human is needed (`handed_off` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Everything the agent needs (`handed_off` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<CaseContext>,
    /// The agent (`accepted`, `resolved`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The context was too large for one log entry: its oldest insights and actions (or,
    /// failing that, the context itself) were left out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// The note (`noted` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<AgentWork>,
    /// How it was resolved (`resolved` by an agent who said so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<AgentWork>,
    /// When an agent must have accepted the case, Unix ms, as of this event (`handed_off`,
    /// `escalated`); absent when no deadline runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_by_ms: Option<TimeMs>,
}

impl CaseEvent {
    /// The event as a log entry, shortened to fit the store's value limit if it must be.
    pub fn encode(mut self) -> Vec<u8> {
        loop {
            let bytes = serde_json::to_vec(&self).expect("plain data always serialises");
            if bytes.len() <= MAX_VALUE_BYTES {
                return bytes;
            }
            self.truncated = true;
            match self.context.as_mut() {
                // The newest insights and actions matter most to the agent.
                Some(c) if !c.insights.is_empty() || !c.actions.is_empty() => {
                    let n = c.insights.len().div_ceil(2);
                    c.insights.drain(..n);
                    let n = c.actions.len().div_ceil(2);
                    c.actions.drain(..n);
                }
                Some(_) => self.context = None,
                None => {
                    let reason = self.reason.get_or_insert_with(String::new);
                    let mut end = reason.len().min(1024);
                    while !reason.is_char_boundary(end) {
                        end -= 1;
                    }
                    reason.truncate(end);
                    debug_assert!(
                        serde_json::to_vec(&self).map_or(0, |b| b.len()) <= MAX_VALUE_BYTES,
                        "case ids and customers are bounded"
                    );
                }
            }
        }
    }
}

/// Where a case stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CaseState {
    /// Waiting for an agent (handed off or escalated).
    #[serde(rename = "o")]
    Open,
    /// An agent has it.
    #[serde(rename = "a")]
    Accepted,
    /// Closed.
    #[serde(rename = "r")]
    Resolved,
}

/// A case the queue knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Case {
    /// The customer twin told about it.
    #[serde(rename = "c")]
    pub customer: String,
    /// How urgent.
    #[serde(rename = "p")]
    pub priority: Priority,
    /// Escalation level.
    #[serde(rename = "l")]
    pub level: u32,
    /// Where it stands.
    #[serde(rename = "s")]
    pub state: CaseState,
    /// When the armed SLA timer is due, if one is armed.
    #[serde(rename = "d", default, skip_serializing_if = "Option::is_none")]
    pub sla_due: Option<TimeMs>,
    /// When it last changed.
    #[serde(rename = "t")]
    pub at: TimeMs,
    /// Ids of its notes, to take each once.
    #[serde(rename = "n", default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// Mail counter.
    #[serde(rename = "n")]
    seq: u64,
    /// Cases by id (their context lives in the log, not here).
    #[serde(rename = "c")]
    cases: BTreeMap<String, Case>,
}

/// The handoff queue of one tenant (twin id = tenant id).
#[derive(Debug)]
pub struct HandoffQueue {
    tenant: String,
    me: Address,
    state: State,
}

fn sla_tag(case_id: &str) -> String {
    format!("sla/{case_id}")
}

impl HandoffQueue {
    /// Every case the queue still keeps, by id.
    pub fn cases(&self) -> impl Iterator<Item = &Case> {
        self.state.cases.values()
    }

    /// A case, by id.
    pub fn case(&self, case_id: &str) -> Option<&Case> {
        self.state.cases.get(case_id)
    }

    /// Appends `event` of `case_id` to the log and, unless it is the handoff itself, tells
    /// the customer twin.
    fn record(&mut self, ctx: &mut Ctx, case_id: &str, event: CaseEvent) {
        let tell = !matches!(event.event, CaseEventKind::HandedOff | CaseEventKind::Noted);
        let update = tell.then(|| Body::HandoffUpdate {
            case_id: case_id.to_owned(),
            state: event.event.as_str().to_owned(),
            agent: event.agent.clone(),
        });
        let to = Address::Customer(event.customer.clone());
        ctx.op(Op::Append {
            log: cases_log(&self.tenant),
            value: event.encode(),
        });
        if let Some(body) = update {
            send(ctx, &mut self.state.seq, &self.me, Self::KIND, to, body);
        }
        ctx.changed();
    }

    fn event(&self, case_id: &str, kind: CaseEventKind, now: TimeMs) -> CaseEvent {
        let case = &self.state.cases[case_id];
        CaseEvent {
            case_id: case_id.to_owned(),
            event: kind,
            priority: case.priority,
            escalation_level: case.level,
            at_ms: now,
            customer: case.customer.clone(),
            reason: None,
            context: None,
            agent: None,
            truncated: false,
            note: None,
            resolution: None,
            accept_by_ms: case.sla_due,
        }
    }

    fn hand_off(
        &mut self,
        ctx: &mut Ctx,
        config: &HandoffConfig,
        case_id: String,
        priority: Priority,
        reason: String,
        context: CaseContext,
    ) -> std::result::Result<Status, String> {
        check_key("case id", &case_id)?;
        check_key("customer", &context.customer)?;
        if tenant_of(&context.customer) != self.tenant || !context.customer.contains(':') {
            return Err(format!(
                "case {case_id:?} is about customer {:?}, not one of tenant {}",
                context.customer, self.tenant
            ));
        }
        if self.state.cases.contains_key(&case_id) {
            return Ok(Status::Duplicate);
        }
        let now = ctx.now();
        let resolved = |c: &Case| (c.state == CaseState::Resolved).then_some(c.at);
        let room = make_room(
            &mut self.state.cases,
            now,
            config.retain,
            config.max_records,
            resolved,
        );
        if room.forgot {
            ctx.changed();
        }
        if !room.fits {
            return Err(format!(
                "the desk is full: {} cases are open",
                self.state.cases.len()
            ));
        }
        claim(ctx, Self::KIND, &self.tenant, &case_id);
        let sla_due = (config.max_level > 0).then(|| now.saturating_add(config.sla.of(priority)));
        if let Some(due) = sla_due {
            ctx.arm(due, &sla_tag(&case_id));
        }
        self.state.cases.insert(
            case_id.clone(),
            Case {
                customer: context.customer.clone(),
                priority,
                level: 0,
                state: CaseState::Open,
                sla_due,
                at: now,
                notes: Vec::new(),
            },
        );
        let mut event = self.event(&case_id, CaseEventKind::HandedOff, now);
        event.reason = Some(reason);
        event.context = Some(context);
        self.record(ctx, &case_id, event);
        Ok(Status::Done)
    }

    fn update(
        &mut self,
        ctx: &mut Ctx,
        case_id: String,
        state: &str,
        agent: Option<String>,
        resolution: Option<AgentWork>,
    ) -> std::result::Result<Status, String> {
        let kind = match state {
            "accepted" => CaseEventKind::Accepted,
            "resolved" => CaseEventKind::Resolved,
            other => {
                return Err(format!(
                    "case {case_id:?}: agents may only report accepted or resolved, not {other:?}"
                ));
            }
        };
        if let Some(a) = &agent {
            check_key("agent", a)?;
        }
        let now = ctx.now();
        let Some(case) = self.state.cases.get_mut(&case_id) else {
            tracing::debug!(tenant = %self.tenant, case = %case_id, "update for an unknown case");
            return Ok(Status::Ignored);
        };
        let next = match (case.state, kind) {
            (CaseState::Open, CaseEventKind::Accepted) => CaseState::Accepted,
            (CaseState::Open | CaseState::Accepted, CaseEventKind::Resolved) => CaseState::Resolved,
            (CaseState::Accepted, CaseEventKind::Accepted)
            | (CaseState::Resolved, CaseEventKind::Resolved) => return Ok(Status::Duplicate),
            _ => return Ok(Status::Ignored),
        };
        if let Some(due) = case.sla_due.take() {
            ctx.disarm(due, &sla_tag(&case_id));
        }
        case.state = next;
        case.at = now;
        let mut event = self.event(&case_id, kind, now);
        event.agent = agent;
        event.resolution = resolution;
        self.record(ctx, &case_id, event);
        Ok(Status::Done)
    }

    /// An agent's note: recorded once per note id, on a case the queue knows.
    fn note(
        &mut self,
        ctx: &mut Ctx,
        case_id: String,
        agent: String,
        note: AgentWork,
    ) -> std::result::Result<Status, String> {
        let AgentWork::Note { note_id, text, .. } = &note else {
            return Err("not a note".into());
        };
        check_key("agent", &agent)?;
        check_key("note id", note_id)?;
        // The agent's text is checked against MAX_NOTE_CHARS where it comes in (the gRPC
        // service); here the bound is what is stored, which may be that text sealed with
        // the customer's key (base64 of nonce, text and tag: longer than the text).
        if text.is_empty() || text.len() > MAX_STORED_NOTE_BYTES {
            return Err(format!(
                "a stored note has 1 to {MAX_STORED_NOTE_BYTES} bytes, not {}",
                text.len()
            ));
        }
        let now = ctx.now();
        let Some(case) = self.state.cases.get_mut(&case_id) else {
            return Ok(Status::Ignored);
        };
        if case.notes.iter().any(|n| n == note_id) {
            return Ok(Status::Duplicate);
        }
        if case.notes.len() >= MAX_NOTES {
            return Err(format!("case {case_id:?} has {MAX_NOTES} notes already"));
        }
        case.notes.push(note_id.clone());
        case.at = now;
        let mut event = self.event(&case_id, CaseEventKind::Noted, now);
        event.agent = Some(agent);
        event.note = Some(note);
        self.record(ctx, &case_id, event);
        Ok(Status::Done)
    }
}

/// Longest note, in characters.
pub const MAX_NOTE_CHARS: usize = 10_000;
/// Longest note as stored, in bytes: a note of [`MAX_NOTE_CHARS`] characters of up to 4
/// bytes each, sealed (nonce and tag, base64: × 4/3), fits, and so does its case event in
/// one log entry.
pub const MAX_STORED_NOTE_BYTES: usize = 56 * 1024;
/// Most notes on one case.
pub const MAX_NOTES: usize = 1_000;

impl Twin for HandoffQueue {
    type Msg = Mail;
    type Reply = Status;
    type Env = Tenants<HandoffConfig>;
    const KIND: &'static str = "handoff";

    fn create(id: &str, _env: &Self::Env) -> Result<Self> {
        let tenant = tenant_id(Self::KIND, id)?;
        Ok(Self {
            me: Address::Handoff(tenant.clone()),
            tenant,
            state: State::default(),
        })
    }

    fn restore(id: &str, snapshot: &[u8], _env: &Self::Env) -> Result<Self> {
        let tenant = tenant_id(Self::KIND, id)?;
        Ok(Self {
            me: Address::Handoff(tenant.clone()),
            tenant,
            state: decode_snapshot(id, snapshot)?,
        })
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&self.state).expect("plain data always serialises")
    }

    fn handle(&mut self, mail: Mail, ctx: &mut Ctx, env: &Self::Env) -> Status {
        if let Err(why) = admit(&self.me, &mail) {
            return refuse(Self::KIND, &self.tenant, &mail.id, why);
        }
        let config = env.get(&self.tenant);
        let out = match mail.body {
            Body::Handoff {
                case_id,
                priority,
                reason,
                context,
            } => self.hand_off(ctx, config, case_id, priority, reason, context),
            // From agents (through the gRPC service) or any twin of the tenant.
            Body::HandoffUpdate {
                case_id,
                state,
                agent,
            } => self.update(ctx, case_id, &state, agent, None),
            Body::CaseWork {
                case_id,
                agent,
                work,
            } => match work {
                AgentWork::Resolve { .. } => check_key("agent", &agent)
                    .and_then(|()| self.update(ctx, case_id, "resolved", Some(agent), Some(work))),
                AgentWork::Note { .. } => self.note(ctx, case_id, agent, work),
            },
            other => Err(format!(
                "the handoff queue does not take {}",
                body_name(&other)
            )),
        };
        out.unwrap_or_else(|why| refuse(Self::KIND, &self.tenant, &mail.id, why))
    }

    fn on_timer(&mut self, tag: &str, ctx: &mut Ctx, env: &Self::Env) {
        let config = env.get(&self.tenant);
        let now = ctx.now();
        let Some(case_id) = tag.strip_prefix("sla/") else {
            tracing::warn!(tenant = %self.tenant, tag, "unknown timer");
            return;
        };
        let Some(case) = self.state.cases.get_mut(case_id) else {
            return;
        };
        // Only an open case whose clock ran out: an accepted one had its timer disarmed,
        // and a stale timer must not escalate twice.
        if case.state != CaseState::Open
            || case.sla_due.is_none_or(|d| d > now)
            || case.level >= config.max_level
        {
            return;
        }
        case.level += 1;
        case.at = now;
        case.sla_due = (case.level < config.max_level)
            .then(|| now.saturating_add(config.sla.of(case.priority)));
        if let Some(due) = case.sla_due {
            ctx.arm(due, &sla_tag(case_id));
        }
        tracing::info!(tenant = %self.tenant, case = case_id, level = case.level, "case escalated");
        let event = self.event(case_id, CaseEventKind::Escalated, now);
        self.record(ctx, case_id, event);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{ctx, mail, sent};
    use super::*;
    use crate::model::{ConsentScope, Insight, InsightKind};

    const T0: u64 = 1_700_000_000_000;
    const MIN: u64 = 60_000;

    fn env() -> Tenants<HandoffConfig> {
        Tenants::all(HandoffConfig::default())
    }

    fn context() -> CaseContext {
        CaseContext {
            customer: "t1:cust-1".into(),
            devices: vec!["t1:smoke-3".into()],
            root_cause: "smoke".into(),
            insights: vec![],
            actions: vec!["edge sounded the alarm locally".into()],
            suggested_next_step: "call the store".into(),
            withheld: vec![ConsentScope::Marketing],
        }
    }

    fn handoff(case: &str, priority: Priority) -> Mail {
        mail(
            &format!("t1:cust-1/{case}"),
            Address::Customer("t1:cust-1".into()),
            Address::Handoff("t1".into()),
            Body::Handoff {
                case_id: case.into(),
                priority,
                reason: "smoke alarm while offline".into(),
                context: context(),
            },
        )
    }

    fn update(case: &str, state: &str) -> Mail {
        mail(
            &format!("agent/{case}/{state}"),
            Address::Notifier("t1".into()),
            Address::Handoff("t1".into()),
            Body::HandoffUpdate {
                case_id: case.into(),
                state: state.into(),
                agent: Some("agent-7".into()),
            },
        )
    }

    fn appended(c: &Ctx) -> Vec<CaseEvent> {
        c.ops()
            .iter()
            .filter_map(|op| match op {
                Op::Append { log, value } => {
                    assert_eq!(*log, cases_log("t1"));
                    Some(serde_json::from_slice(value).unwrap())
                }
                _ => None,
            })
            .collect()
    }

    fn armed(c: &Ctx) -> Vec<u64> {
        c.ops()
            .iter()
            .filter_map(|op| match op {
                Op::Schedule { due_ms, .. } => Some(*due_ms),
                _ => None,
            })
            .collect()
    }

    fn step(
        q: &mut HandoffQueue,
        env: &Tenants<HandoffConfig>,
        now: u64,
        m: Mail,
    ) -> (Status, Ctx) {
        let mut c = ctx(now);
        let status = q.handle(m, &mut c, env);
        if c.is_changed() {
            *q = HandoffQueue::restore("t1", &q.snapshot(), env).unwrap();
        }
        (status, c)
    }

    fn fire(q: &mut HandoffQueue, env: &Tenants<HandoffConfig>, now: u64, case: &str) -> Ctx {
        let mut c = ctx(now);
        q.on_timer(&sla_tag(case), &mut c, env);
        c
    }

    #[test]
    fn a_case_is_handed_off_once_with_its_context() {
        let env = env();
        let mut q = HandoffQueue::create("t1", &env).unwrap();
        let (status, c) = step(&mut q, &env, T0, handoff("case-9", Priority::Safety));
        assert_eq!(status, Status::Done);
        let events = appended(&c);
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!(
            (e.event, e.escalation_level, e.priority),
            (CaseEventKind::HandedOff, 0, Priority::Safety)
        );
        assert_eq!(e.context.as_ref(), Some(&context()));
        assert_eq!(e.reason.as_deref(), Some("smoke alarm while offline"));
        assert_eq!(armed(&c), [T0 + 5 * MIN], "safety SLA");
        assert!(
            sent(&c).is_empty(),
            "the customer twin knows it handed the case off"
        );
        let raw = c.ops().iter().find_map(|op| match op {
            Op::Append { value, .. } => Some(String::from_utf8(value.clone()).unwrap()),
            _ => None,
        });
        assert!(raw.unwrap().contains(r#""event":"handed_off""#));

        for i in 1..=5 {
            let (status, c) = step(&mut q, &env, T0 + i, handoff("case-9", Priority::Safety));
            assert_eq!(status, Status::Duplicate);
            assert!(c.ops().is_empty() && !c.is_changed(), "nothing new");
        }
    }

    #[test]
    fn sla_escalates_an_unaccepted_case_up_to_the_max_level() {
        let env = env();
        let mut q = HandoffQueue::create("t1", &env).unwrap();
        step(&mut q, &env, T0, handoff("c", Priority::High));
        let mut due = T0 + 30 * MIN;
        for level in 1..=3 {
            // Early (a stale timer): nothing.
            assert!(fire(&mut q, &env, due - 1, "c").ops().is_empty());
            let c = fire(&mut q, &env, due, "c");
            let events = appended(&c);
            assert_eq!(events.len(), 1);
            assert_eq!(
                (events[0].event, events[0].escalation_level),
                (CaseEventKind::Escalated, level)
            );
            assert!(events[0].context.is_none());
            let mails = sent(&c);
            assert_eq!(mails.len(), 1);
            assert_eq!(mails[0].to, Address::Customer("t1:cust-1".into()));
            assert_eq!(
                mails[0].body,
                Body::HandoffUpdate {
                    case_id: "c".into(),
                    state: "escalated".into(),
                    agent: None
                }
            );
            if level < 3 {
                assert_eq!(armed(&c), [due + 30 * MIN], "same interval again");
            } else {
                assert!(
                    armed(&c).is_empty(),
                    "the top level is not escalated further"
                );
            }
            due += 30 * MIN;
        }
        assert_eq!(q.case("c").unwrap().level, 3);
        assert!(fire(&mut q, &env, due + DAY, "c").ops().is_empty());
    }

    const DAY: u64 = 86_400_000;

    #[test]
    fn acceptance_stops_the_clock_and_resolution_closes_the_case() {
        let env = env();
        let mut q = HandoffQueue::create("t1", &env).unwrap();
        step(&mut q, &env, T0, handoff("c", Priority::Normal));
        let due = T0 + 4 * 60 * MIN;
        let (status, c) = step(&mut q, &env, T0 + MIN, update("c", "accepted"));
        assert_eq!(status, Status::Done);
        assert!(c.ops().iter().any(|op| matches!(
            op,
            Op::Unschedule { due_ms, item, .. }
                if *due_ms == due && *item == crate::host::timer_item("t1", "sla/c")
        )));
        let e = &appended(&c)[0];
        assert_eq!(
            (e.event, e.agent.as_deref()),
            (CaseEventKind::Accepted, Some("agent-7"))
        );
        assert_eq!(
            sent(&c)[0].body,
            Body::HandoffUpdate {
                case_id: "c".into(),
                state: "accepted".into(),
                agent: Some("agent-7".into())
            }
        );
        // Accepted twice: nothing. The timer, had it not been disarmed: nothing.
        let (status, c) = step(&mut q, &env, T0 + 2 * MIN, update("c", "accepted"));
        assert_eq!((status, c.ops().len()), (Status::Duplicate, 0));
        assert!(
            fire(&mut q, &env, due, "c").ops().is_empty(),
            "no escalation after accept"
        );

        let (status, c) = step(&mut q, &env, T0 + 3 * MIN, update("c", "resolved"));
        assert_eq!(status, Status::Done);
        assert_eq!(appended(&c)[0].event, CaseEventKind::Resolved);
        assert!(
            !c.ops().iter().any(|op| matches!(op, Op::Unschedule { .. })),
            "no timer left"
        );
        let (status, c) = step(&mut q, &env, T0 + 4 * MIN, update("c", "resolved"));
        assert_eq!((status, c.ops().len()), (Status::Duplicate, 0));
        let (status, c) = step(&mut q, &env, T0 + 5 * MIN, update("c", "accepted"));
        assert_eq!((status, c.ops().len()), (Status::Ignored, 0));
        assert_eq!(q.case("c").unwrap().state, CaseState::Resolved);
    }

    #[test]
    fn resolving_an_open_case_stops_its_clock_too() {
        let env = env();
        let mut q = HandoffQueue::create("t1", &env).unwrap();
        step(&mut q, &env, T0, handoff("c", Priority::Low));
        let c = fire(&mut q, &env, T0 + DAY, "c");
        let due = armed(&c)[0];
        let (_, c) = step(&mut q, &env, T0 + DAY + 1, update("c", "resolved"));
        assert!(
            c.ops()
                .iter()
                .any(|op| matches!(op, Op::Unschedule { due_ms, .. } if *due_ms == due))
        );
        let e = &appended(&c)[0];
        assert_eq!((e.event, e.escalation_level), (CaseEventKind::Resolved, 1));
        assert!(fire(&mut q, &env, due, "c").ops().is_empty());
    }

    #[test]
    fn bad_updates_and_foreign_mail_are_refused() {
        let env = env();
        let mut q = HandoffQueue::create("t1", &env).unwrap();
        step(&mut q, &env, T0, handoff("c", Priority::High));
        let mut foreign = update("c", "accepted");
        foreign.from = Address::Notifier("t2".into());
        let mut foreign_case = handoff("d", Priority::High);
        if let Body::Handoff { context, .. } = &mut foreign_case.body {
            context.customer = "t2:cust-1".into();
        }
        let unexpected = mail(
            "x",
            Address::Customer("t1:cust-1".into()),
            Address::Handoff("t1".into()),
            Body::OrderPart {
                key: "k".into(),
                part_number: "p".into(),
                quantity: 1,
                customer: "t1:cust-1".into(),
                case_id: "c".into(),
                device: String::new(),
            },
        );
        for m in [
            foreign,
            foreign_case,
            unexpected,
            update("c", "escalated"),
            update("c", "done"),
        ] {
            let mut c = ctx(T0);
            let status = q.handle(m.clone(), &mut c, &env);
            assert!(matches!(status, Status::Refused(_)), "{m:?}: {status:?}");
            assert!(c.ops().is_empty() && !c.is_changed());
        }
        assert_eq!(q.case("c").unwrap().state, CaseState::Open);
        assert!(q.case("d").is_none());
        let (status, _) = step(&mut q, &env, T0, update("nope", "accepted"));
        assert_eq!(status, Status::Ignored);
    }

    #[test]
    fn a_huge_context_is_shortened_to_fit_the_log() {
        let insight = |i: u64| Insight {
            kind: InsightKind::Anomaly,
            subject: format!("signal-{i}-{}", "x".repeat(200)),
            failure_mode: None,
            confidence: 0.5,
            eta_ms: None,
            eta_band_ms: None,
            value: i as f64,
            raised_at_ms: T0 + i,
            scope: ConsentScope::Diagnostics,
        };
        let mut context = context();
        context.insights = (0..2_000).map(insight).collect();
        let event = CaseEvent {
            case_id: "c".into(),
            event: CaseEventKind::HandedOff,
            priority: Priority::High,
            escalation_level: 0,
            at_ms: T0,
            customer: "t1:cust-1".into(),
            reason: Some("r".into()),
            context: Some(context),
            agent: None,
            truncated: false,
            note: None,
            resolution: None,
            accept_by_ms: None,
        };
        let bytes = event.encode();
        assert!(bytes.len() <= MAX_VALUE_BYTES);
        let back: CaseEvent = serde_json::from_slice(&bytes).unwrap();
        assert!(back.truncated);
        let kept = back.context.unwrap().insights;
        assert!(!kept.is_empty());
        assert_eq!(
            kept.last().unwrap().raised_at_ms,
            T0 + 1_999,
            "the newest are kept"
        );
    }

    #[test]
    fn settings_load_from_toml() {
        let t: Tenants<HandoffConfig> =
            toml::from_str("[default.sla]\nsafety = \"2m\"\n[tenant.t1]\nmax_level = 1\n").unwrap();
        t.validate().unwrap();
        assert_eq!(t.get("t9").sla.of(Priority::Safety), 2 * MIN);
        assert_eq!(t.get("t9").sla.of(Priority::Low), DAY);
        assert_eq!(t.get("t1").max_level, 1);
        let bad: Tenants<HandoffConfig> =
            toml::from_str("[default.sla]\nsafety = \"1d\"\n").unwrap();
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("default: sla")
        );
    }
}
