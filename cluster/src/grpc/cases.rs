//! `CaseService`: the handoff of cases to human agents over gRPC.
//!
//! The source of truth is each tenant's durable case log (`cases/<tenant>`), which the
//! handoff queue twin appends to in the same batch as its decisions. This module keeps a
//! projection of it per tenant — every case with its events and their log indexes — rebuilt
//! from the log on first use and brought up to date whenever the log grows (the node's
//! [`Watched`](crate::store::watch::Watched) store signals appends). A delivery's cursor is
//! the log index of its event, so a subscription resumes exactly where it stopped; the
//! case it carries is folded from the case's events up to that cursor ("as of this
//! event"). Agents' actions (accept, resolve) are mail to the tenant's handoff queue, which
//! decides; nothing here changes a case by itself.

use super::auth::{Principal, Scope};
use super::convert;
use super::projection::{Book, Fold, Projection, Retention, Span};
use crate::pii::Vault;
use crate::store::watch::LogSignals;
use caretwin_actors::host::clock::Clock;
use caretwin_actors::mail::{Address, AgentWork, Body, Mail};
use caretwin_actors::services::Status as DeskStatus;
use caretwin_actors::services::handoff::{CaseEvent, CaseEventKind, MAX_NOTE_CHARS, cases_log};
use caretwin_actors::store::{Key, Store};
use caretwin_actors::system::System;
use caretwin_proto::v1::{self, case_service_server::CaseService};
use futures::Stream;
use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

/// Deliveries buffered per subscriber before the stream waits for the client.
const STREAM_BUFFER: usize = 256;
/// How long a resolved case stays in the case log by default.
pub const CASE_RETENTION: Retention = Retention::days(90);

/// One tenant's cases as the log tells them.
#[derive(Debug, Default)]
pub(crate) struct CaseBook {
    /// Every case's events with their indexes, in log order.
    cases: HashMap<String, Vec<(u64, CaseEvent)>>,
    /// Log index → case id, for deliveries in order.
    order: BTreeMap<u64, String>,
}

impl Fold for CaseBook {
    type Event = CaseEvent;
    const WHAT: &'static str = "case event";

    fn apply(&mut self, index: u64, ev: CaseEvent) {
        self.order.insert(index, ev.case_id.clone());
        self.cases
            .entry(ev.case_id.clone())
            .or_default()
            .push((index, ev));
    }

    fn spans(&self) -> Vec<Span> {
        self.cases
            .values()
            .filter_map(|evs| {
                let (first, _) = evs.first()?;
                let (last, ev) = evs.last()?;
                Some(Span {
                    first: *first,
                    last: *last,
                    last_at_ms: ev.at_ms,
                    finished: evs.iter().any(|(_, e)| e.event == CaseEventKind::Resolved),
                })
            })
            .collect()
    }

    fn forget_before(&mut self, from: u64) {
        self.cases
            .retain(|_, evs| evs.last().is_some_and(|(i, _)| *i >= from));
        self.order = self.order.split_off(&from);
    }
}

/// The projection of every tenant's case log.
pub struct Cases {
    system: Arc<System>,
    signals: Arc<LogSignals>,
    log: Projection<CaseBook>,
    /// Becomes true when the node shuts down: every subscription stream then ends, so the
    /// server's drain does not wait for clients that never hang up.
    closing: Option<tokio::sync::watch::Receiver<bool>>,
    /// Where agents' free text is sealed with the customer's key (crypto-shredding), and
    /// the customer's name read from; `None`: notes are kept in clear.
    vault: Option<Arc<Vault>>,
}

use super::internal;

fn subscriber_key(tenant: &str, subscriber: &str) -> Key {
    Key::new(format!("grpc/cases-cursor/{tenant}/{subscriber}"))
}

impl Cases {
    /// The service over `system`'s handoff queues and `store`'s case logs; `signals` must
    /// be those of the store the twins write through.
    pub fn new(system: Arc<System>, store: Arc<dyn Store>, signals: Arc<LogSignals>) -> Self {
        Self {
            system,
            signals,
            log: Projection::new(store, cases_log, CASE_RETENTION),
            closing: None,
            vault: None,
        }
    }

    /// Seals agents' notes and resolution summaries with the customer's key in `vault`,
    /// so erasing the customer makes them unreadable in the append-only case log.
    pub fn with_vault(mut self, vault: Arc<Vault>) -> Self {
        self.vault = Some(vault);
        self
    }

    /// `text` as it goes into the case log: sealed for `customer` when there is a vault.
    /// `None` when the customer was erased: nothing personal is written for them again.
    async fn seal(&self, customer: &str, text: String) -> Result<Option<String>, Status> {
        match &self.vault {
            None => Ok(Some(text)),
            Some(_) if customer.is_empty() => Ok(None),
            Some(v) => v.seal(customer, &text).await.map_err(internal),
        }
    }

    /// Opens a case's sealed fields, names its customer, and, once the customer is
    /// erased, shows the case without them: the case stays (the service history), but
    /// whose it was and what agents wrote about them do not.
    async fn reveal(&self, mut case: v1::Case) -> Result<v1::Case, Status> {
        let Some(vault) = &self.vault else {
            return Ok(case);
        };
        let customer = case
            .customer
            .as_ref()
            .map(|c| c.customer_id.clone())
            .unwrap_or_default();
        if customer.is_empty() {
            return Ok(case);
        }
        for n in &mut case.notes {
            n.text = vault.reveal(&customer, &n.text).await.map_err(internal)?;
        }
        if let Some(r) = &mut case.resolution {
            r.summary = vault
                .reveal(&customer, &r.summary)
                .await
                .map_err(internal)?;
        }
        if vault.is_erased(&customer).await.map_err(internal)? {
            case.customer = Some(v1::CaseCustomer::default());
            for d in &mut case.devices {
                d.customer_id.clear();
            }
        } else if let Some(p) = vault.personal(&customer).await.map_err(internal)?
            && let Some(c) = case.customer.as_mut()
        {
            c.display_name = p.display_name;
        }
        Ok(case)
    }

    /// Every case of `customer` of `tenant`, as of now, oldest first (for an export or an
    /// erasure report).
    pub async fn of_customer(&self, tenant: &str, customer: &str) -> Result<Vec<v1::Case>, Status> {
        let book = self.catch_up(tenant).await?;
        let ids: Vec<String> = {
            let b = book.lock().await;
            let mut v: Vec<(u64, String)> = b
                .state
                .cases
                .iter()
                .filter(|(_, evs)| evs.iter().any(|(_, e)| e.customer == customer))
                .filter_map(|(id, evs)| evs.first().map(|(i, _)| (*i, id.clone())))
                .collect();
            v.sort();
            v.into_iter().map(|(_, id)| id).collect()
        };
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(c) = self.case_as_of(tenant, &id, u64::MAX).await {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// Ends every subscription stream when `closing` becomes true (the node's shutdown).
    pub fn with_shutdown(mut self, closing: tokio::sync::watch::Receiver<bool>) -> Self {
        self.closing = Some(closing);
        self
    }

    /// Ages resolved cases on `clock` (the node's) for their retention (without a clock
    /// none is trimmed).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.log.set_clock(clock);
        self
    }

    /// Keeps resolved cases in the log for `retention` (default [`CASE_RETENTION`]).
    pub fn with_retention(mut self, retention: Retention) -> Self {
        self.log.set_retention(retention);
        self
    }

    async fn catch_up(&self, tenant: &str) -> Result<Arc<Mutex<Book<CaseBook>>>, Status> {
        self.log.catch_up(tenant).await
    }

    /// The case `case_id` of `tenant` as of log index `upto`.
    async fn case_as_of(&self, tenant: &str, case_id: &str, upto: u64) -> Option<v1::Case> {
        let book = self.log.book(tenant);
        let b = book.lock().await;
        let events = b.state.cases.get(case_id)?;
        let case = fold(tenant, case_id, events, upto)?;
        drop(b);
        let case = self.with_devices(case).await;
        match self.reveal(case).await {
            Ok(c) => Some(c),
            Err(e) => {
                // Never show a sealed field undecided: leave the case out.
                tracing::warn!(tenant, case = case_id, error = %e, "case not revealed");
                None
            }
        }
    }

    /// Adds the devices' current twins (summary) to a case.
    async fn with_devices(&self, mut case: v1::Case) -> v1::Case {
        let ids: Vec<String> = case.devices.iter().map(|d| d.device_id.clone()).collect();
        for (slot, id) in case.devices.iter_mut().zip(ids) {
            let twin = self
                .system
                .devices()
                .inspect(&id, |t| {
                    t.map(|t| {
                        (
                            t.model().map(str::to_owned),
                            t.site().map(str::to_owned),
                            t.health(),
                            t.high_water(),
                        )
                    })
                })
                .await;
            if let Ok(Some((model, site, health, seq))) = twin {
                slot.model_id = model.unwrap_or_default();
                slot.site_id = site.unwrap_or_default();
                slot.health_index = health;
                slot.applied_seq = seq;
            }
        }
        // The site of the devices involved (a case is about one customer's devices, which
        // are at one site in every story; the first device's site otherwise).
        if let Some(site) = case
            .devices
            .iter()
            .map(|d| &d.site_id)
            .find(|s| !s.is_empty())
        {
            case.site_id = site.clone();
        }
        case
    }
}

/// Folds a case's events up to `upto` into the contract's `Case`.
fn fold(tenant: &str, case_id: &str, events: &[(u64, CaseEvent)], upto: u64) -> Option<v1::Case> {
    let mut case = v1::Case {
        case_id: case_id.to_owned(),
        tenant_id: tenant.to_owned(),
        ..Default::default()
    };
    let mut seen = false;
    for (index, ev) in events.iter().filter(|(i, _)| *i <= upto) {
        seen = true;
        case.version = *index;
        case.priority = convert::priority(ev.priority) as i32;
        let (state, text) = match ev.event {
            CaseEventKind::HandedOff => (Some(v1::CaseState::HandedOff), "handed to a human"),
            CaseEventKind::Escalated => (Some(v1::CaseState::HandedOff), "escalated"),
            CaseEventKind::Accepted => (Some(v1::CaseState::Accepted), "accepted"),
            CaseEventKind::Resolved => (Some(v1::CaseState::Resolved), "resolved"),
            CaseEventKind::Noted => (None, "note added"),
        };
        if let Some(state) = state {
            case.state = state as i32;
        }
        case.timeline.push(v1::TimelineEntry {
            at_ms: ev.at_ms as i64,
            kind: if state.is_some() {
                v1::TimelineEntryKind::StateChange
            } else {
                v1::TimelineEntryKind::Note
            } as i32,
            actor: if ev.agent.is_some() {
                v1::Actor::Agent
            } else {
                v1::Actor::Twin
            } as i32,
            actor_id: ev.agent.clone().unwrap_or_default(),
            text: match ev.event {
                CaseEventKind::Escalated => format!("escalated to level {}", ev.escalation_level),
                _ => text.to_owned(),
            },
            reference_id: String::new(),
        });
        if matches!(
            ev.event,
            CaseEventKind::HandedOff | CaseEventKind::Escalated
        ) {
            case.sla_accept_by_ms = ev.accept_by_ms.map(|t| t as i64);
        }
        match ev.event {
            CaseEventKind::HandedOff => {
                case.opened_at_ms = ev.at_ms as i64;
                case.handed_off_at_ms = Some(ev.at_ms as i64);
                case.customer = Some(v1::CaseCustomer {
                    customer_id: ev.customer.clone(),
                    ..Default::default()
                });
                let reason = ev.reason.clone().unwrap_or_default();
                case.handoff_reason = handoff_reason(ev.priority, &reason) as i32;
                case.handoff_detail = reason;
                if let Some(ctx) = &ev.context {
                    let device = ctx.devices.first().cloned().unwrap_or_default();
                    case.title = format!("{} on {device}", ctx.root_cause);
                    case.site_id = String::new();
                    case.root_cause = Some(v1::RootCause {
                        failure_mode_id: ctx.root_cause.clone(),
                        device_id: device.clone(),
                        description: ctx.root_cause.clone(),
                        confidence: ctx
                            .insights
                            .iter()
                            .map(|i| i.confidence)
                            .fold(0.0, f64::max),
                    });
                    case.devices = ctx
                        .devices
                        .iter()
                        .map(|d| v1::Twin {
                            device_id: d.clone(),
                            tenant_id: tenant.to_owned(),
                            customer_id: ev.customer.clone(),
                            ..Default::default()
                        })
                        .collect();
                    case.insights = ctx
                        .insights
                        .iter()
                        .enumerate()
                        .map(|(n, i)| convert::insight(&device, n, i))
                        .collect();
                    case.actions = ctx
                        .actions
                        .iter()
                        .enumerate()
                        .map(|(n, a)| v1::ActionRecord {
                            action_id: format!("{case_id}/action-{n}"),
                            description: a.clone(),
                            actor: v1::Actor::Twin as i32,
                            ..Default::default()
                        })
                        .collect();
                    case.suggested_next_step =
                        (!ctx.suggested_next_step.is_empty()).then(|| v1::SuggestedStep {
                            description: ctx.suggested_next_step.clone(),
                            ..Default::default()
                        });
                    case.withheld_scopes = ctx
                        .withheld
                        .iter()
                        .map(|s| convert::consent_scope(*s) as i32)
                        .collect();
                }
            }
            CaseEventKind::Escalated => {}
            CaseEventKind::Accepted => {
                case.assigned_agent_id = ev.agent.clone().unwrap_or_default();
                case.accepted_at_ms = Some(ev.at_ms as i64);
                case.sla_accept_by_ms = None;
            }
            CaseEventKind::Resolved => {
                let (code, summary) = match &ev.resolution {
                    Some(AgentWork::Resolve { code, summary }) => (
                        v1::ResolutionCode::from_str_name(&format!(
                            "RESOLUTION_CODE_{}",
                            code.to_ascii_uppercase()
                        ))
                        .unwrap_or(v1::ResolutionCode::Other),
                        summary.clone(),
                    ),
                    _ => (v1::ResolutionCode::Other, String::new()),
                };
                case.resolution = Some(v1::Resolution {
                    code: code as i32,
                    summary,
                    resolved_by: ev.agent.clone().unwrap_or_default(),
                    resolved_at_ms: ev.at_ms as i64,
                });
            }
            CaseEventKind::Noted => {
                if let Some(AgentWork::Note {
                    note_id,
                    text,
                    customer_visible,
                }) = &ev.note
                {
                    case.notes.push(v1::Note {
                        note_id: note_id.clone(),
                        author_id: ev.agent.clone().unwrap_or_default(),
                        text: text.clone(),
                        visibility: if *customer_visible {
                            v1::NoteVisibility::CustomerVisible
                        } else {
                            v1::NoteVisibility::Internal
                        } as i32,
                        created_at_ms: ev.at_ms as i64,
                    });
                }
            }
        }
    }
    seen.then_some(case)
}

fn handoff_reason(priority: caretwin_actors::model::Priority, reason: &str) -> v1::HandoffReason {
    let r = reason.to_ascii_lowercase();
    if priority == caretwin_actors::model::Priority::Safety || r.contains("alarm") {
        v1::HandoffReason::SafetyAlarm
    } else if r.contains("confiden") {
        v1::HandoffReason::LowConfidence
    } else if r.contains("answer") || r.contains("respon") {
        v1::HandoffReason::NoCustomerResponse
    } else if r.contains("request") {
        v1::HandoffReason::CustomerRequest
    } else if r.contains("remed") || r.contains("fail") {
        v1::HandoffReason::RemediesExhausted
    } else {
        v1::HandoffReason::Playbook
    }
}

fn event_kind(k: CaseEventKind) -> v1::CaseEventKind {
    match k {
        CaseEventKind::HandedOff => v1::CaseEventKind::HandedOff,
        CaseEventKind::Escalated => v1::CaseEventKind::Escalated,
        CaseEventKind::Accepted => v1::CaseEventKind::Accepted,
        CaseEventKind::Resolved => v1::CaseEventKind::Resolved,
        CaseEventKind::Noted => v1::CaseEventKind::Updated,
    }
}

fn check_name(what: &str, s: &str, max: usize) -> Result<(), Status> {
    if s.is_empty() || s.len() > max || s.chars().any(|c| c.is_control()) {
        return Err(Status::invalid_argument(format!(
            "{what} must be 1 to {max} printable characters, got {s:?}"
        )));
    }
    Ok(())
}

type DeliveryStream = Pin<Box<dyn Stream<Item = Result<v1::CaseDelivery, Status>> + Send>>;

/// The gRPC face of [`Cases`].
#[derive(Clone)]
pub struct CaseApi(pub Arc<Cases>);

#[tonic::async_trait]
impl CaseService for CaseApi {
    type SubscribeCasesStream = DeliveryStream;

    async fn subscribe_cases(
        &self,
        req: Request<v1::SubscribeCasesRequest>,
    ) -> Result<Response<DeliveryStream>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::CasesRead)?;
        let r = req.into_inner();
        check_name("subscriber_id", &r.subscriber_id, 64)?;
        let cases = self.0.clone();
        let after = cases
            .log
            .resume_after(
                &p.tenant,
                r.after_cursor,
                &subscriber_key(&p.tenant, &r.subscriber_id),
            )
            .await?;
        let priorities: Vec<i32> = r.priorities.clone();
        let kinds: Vec<i32> = r.kinds.clone();
        let log = cases_log(&p.tenant);
        // Subscribe before the first read, so an append in between wakes the loop.
        let grew = cases.signals.subscribe(&log);
        tracing::info!(tenant = %p.tenant, subscriber = %r.subscriber_id, after, "case subscription");
        let tenant = p.tenant.clone();
        let (lister, shower) = (cases.clone(), cases.clone());
        let pending = move |cursor: u64| {
            let (cases, tenant) = (lister.clone(), tenant.clone());
            async move {
                let book = cases.catch_up(&tenant).await?;
                let b = &book.lock().await.state;
                // Each event after the cursor, with what the subscription filters on.
                Ok(b.order
                    .range(cursor + 1..)
                    .filter_map(|(index, case_id)| {
                        let (_, ev) = b.cases.get(case_id)?.iter().find(|(i, _)| i == index)?;
                        let what = (
                            case_id.clone(),
                            event_kind(ev.event),
                            ev.at_ms,
                            convert::priority(ev.priority),
                        );
                        Some((*index, what))
                    })
                    .collect())
            }
        };
        let tenant = p.tenant.clone();
        let deliver = move |index: u64, (case_id, kind, at, prio): (String, _, u64, _)| {
            let (cases, tenant) = (shower.clone(), tenant.clone());
            let (priorities, kinds) = (priorities.clone(), kinds.clone());
            async move {
                if (!priorities.is_empty() && !priorities.contains(&(prio as i32)))
                    || (!kinds.is_empty() && !kinds.contains(&(kind as i32)))
                {
                    return Ok(None);
                }
                let case = cases.case_as_of(&tenant, &case_id, index).await;
                Ok(Some(v1::CaseDelivery {
                    cursor: index,
                    case_id,
                    event: kind as i32,
                    event_at_ms: at as i64,
                    case,
                }))
            }
        };
        let rx = super::stream::follow(
            grew,
            cases.closing.clone(),
            after,
            STREAM_BUFFER,
            pending,
            deliver,
        );
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn acknowledge_delivery(
        &self,
        req: Request<v1::AcknowledgeDeliveryRequest>,
    ) -> Result<Response<v1::AcknowledgeDeliveryResponse>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::CasesHandle)?;
        let r = req.into_inner();
        check_name("subscriber_id", &r.subscriber_id, 64)?;
        let acknowledged = self
            .0
            .log
            .acknowledge(
                &p.tenant,
                subscriber_key(&p.tenant, &r.subscriber_id),
                r.cursor,
            )
            .await?;
        Ok(Response::new(v1::AcknowledgeDeliveryResponse {
            acknowledged_cursor: acknowledged,
        }))
    }

    async fn accept_case(
        &self,
        req: Request<v1::AcceptCaseRequest>,
    ) -> Result<Response<v1::Case>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::CasesHandle)?;
        let r = req.into_inner();
        p.own("case", &r.case_id)?;
        check_name("agent_id", &r.agent_id, 128)?;
        let current = self.current(&p, &r.case_id).await?;
        match v1::CaseState::try_from(current.state) {
            Ok(v1::CaseState::Accepted) if current.assigned_agent_id == r.agent_id => {
                return Ok(Response::new(current));
            }
            Ok(v1::CaseState::Accepted) => {
                return Err(Status::failed_precondition(format!(
                    "case {:?} is owned by agent {:?}",
                    r.case_id, current.assigned_agent_id
                )));
            }
            Ok(v1::CaseState::Resolved) => {
                return Err(Status::failed_precondition(format!(
                    "case {:?} is resolved",
                    r.case_id
                )));
            }
            _ => {}
        }
        if r.idempotency_key.len() > 128 {
            return Err(Status::invalid_argument(
                "idempotency_key is over 128 bytes",
            ));
        }
        let body = Body::HandoffUpdate {
            case_id: r.case_id.clone(),
            state: "accepted".into(),
            agent: Some(r.agent_id.clone()),
        };
        self.tell(
            &p,
            &r.case_id,
            format!("accepted/{}", r.idempotency_key),
            body,
        )
        .await?;
        let after = self.current(&p, &r.case_id).await?;
        if after.assigned_agent_id != r.agent_id {
            return Err(Status::failed_precondition(format!(
                "case {:?} was taken by agent {:?}",
                r.case_id, after.assigned_agent_id
            )));
        }
        Ok(Response::new(after))
    }

    async fn add_note(
        &self,
        req: Request<v1::AddNoteRequest>,
    ) -> Result<Response<v1::Note>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::CasesHandle)?;
        let r = req.into_inner();
        p.own("case", &r.case_id)?;
        check_name("author_id", &r.author_id, 128)?;
        let chars = r.text.chars().count();
        if chars == 0 || chars > MAX_NOTE_CHARS {
            return Err(Status::invalid_argument(format!(
                "text must have 1 to {MAX_NOTE_CHARS} characters, not {chars}"
            )));
        }
        check_name("idempotency_key", &r.idempotency_key, 128)?;
        let current = self.current(&p, &r.case_id).await?;
        let customer = current.customer.map(|c| c.customer_id).unwrap_or_default();
        let Some(text) = self.0.seal(&customer, r.text).await? else {
            return Err(Status::failed_precondition(format!(
                "the customer of case {:?} was erased: no notes about them are taken",
                r.case_id
            )));
        };
        let note_id = format!("note-{}", r.idempotency_key);
        let work = AgentWork::Note {
            note_id: note_id.clone(),
            text,
            customer_visible: r.visibility == v1::NoteVisibility::CustomerVisible as i32,
        };
        self.work(&p, &r.case_id, &r.author_id, work).await?;
        let case = self.current(&p, &r.case_id).await?;
        case.notes
            .into_iter()
            .find(|n| n.note_id == note_id)
            .map(Response::new)
            .ok_or_else(|| Status::internal("the note was taken but is not in the case"))
    }

    async fn resolve_case(
        &self,
        req: Request<v1::ResolveCaseRequest>,
    ) -> Result<Response<v1::Case>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::CasesHandle)?;
        let r = req.into_inner();
        p.own("case", &r.case_id)?;
        check_name("agent_id", &r.agent_id, 128)?;
        let current = self.current(&p, &r.case_id).await?;
        if current.state == v1::CaseState::Resolved as i32 {
            return Ok(Response::new(current));
        }
        let code = v1::ResolutionCode::try_from(r.code)
            .ok()
            .filter(|c| *c != v1::ResolutionCode::Unspecified)
            .ok_or_else(|| {
                Status::invalid_argument(format!("invalid resolution code {}", r.code))
            })?;
        if r.summary.chars().count() > MAX_NOTE_CHARS {
            return Err(Status::invalid_argument(format!(
                "summary is over {MAX_NOTE_CHARS} characters"
            )));
        }
        let customer = current.customer.map(|c| c.customer_id).unwrap_or_default();
        // An erased customer's case is still resolved, without the summary about them.
        let summary = match r.summary.is_empty() {
            true => String::new(),
            false => self.0.seal(&customer, r.summary).await?.unwrap_or_default(),
        };
        let work = AgentWork::Resolve {
            code: code
                .as_str_name()
                .trim_start_matches("RESOLUTION_CODE_")
                .to_ascii_lowercase(),
            summary,
        };
        self.work(&p, &r.case_id, &r.agent_id, work).await?;
        Ok(Response::new(self.current(&p, &r.case_id).await?))
    }

    async fn get_case(
        &self,
        req: Request<v1::GetCaseRequest>,
    ) -> Result<Response<v1::Case>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::CasesRead)?;
        let r = req.into_inner();
        p.own("case", &r.case_id)?;
        Ok(Response::new(self.current(&p, &r.case_id).await?))
    }

    async fn list_cases(
        &self,
        req: Request<v1::ListCasesRequest>,
    ) -> Result<Response<v1::ListCasesResponse>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::CasesRead)?;
        let r = req.into_inner();
        let page = r.page.clone().unwrap_or_default();
        let size = match page.page_size {
            0 => 50,
            n => n.min(1000),
        } as usize;
        // Newest first: the token is the opening index to continue below.
        let below: u64 = if page.page_token.is_empty() {
            u64::MAX
        } else {
            page.page_token
                .parse()
                .map_err(|_| Status::invalid_argument("invalid page_token"))?
        };
        let book = self.0.catch_up(&p.tenant).await?;
        let opened: Vec<(u64, String)> = {
            let b = book.lock().await;
            let mut v: Vec<(u64, String)> = b
                .state
                .cases
                .iter()
                .filter_map(|(id, evs)| evs.first().map(|(i, _)| (*i, id.clone())))
                .filter(|(i, _)| *i < below)
                .collect();
            v.sort_by_key(|x| std::cmp::Reverse(x.0));
            v
        };
        let mut out = Vec::new();
        let mut next_token = String::new();
        for (index, id) in opened {
            if out.len() == size {
                next_token = (index + 1).to_string();
                break;
            }
            let Some(case) = self.0.case_as_of(&p.tenant, &id, u64::MAX).await else {
                continue;
            };
            if matches_filter(&r, &case) {
                out.push(case);
            }
        }
        Ok(Response::new(v1::ListCasesResponse {
            cases: out,
            page: Some(v1::PageResponse {
                next_page_token: next_token,
            }),
        }))
    }
}

fn matches_filter(r: &v1::ListCasesRequest, c: &v1::Case) -> bool {
    (r.states.is_empty() || r.states.contains(&c.state))
        && (r.customer_id.is_empty()
            || c.customer
                .as_ref()
                .is_some_and(|x| x.customer_id == r.customer_id))
        && (r.device_id.is_empty() || c.devices.iter().any(|d| d.device_id == r.device_id))
        && (r.site_id.is_empty() || c.site_id == r.site_id)
        && (r.min_priority == 0 || c.priority >= r.min_priority)
        && (r.assigned_agent_id.is_empty() || c.assigned_agent_id == r.assigned_agent_id)
        && r.opened_after_ms.is_none_or(|t| c.opened_at_ms >= t)
        && r.opened_before_ms.is_none_or(|t| c.opened_at_ms < t)
}

impl CaseApi {
    async fn current(&self, p: &Principal, case_id: &str) -> Result<v1::Case, Status> {
        self.0.catch_up(&p.tenant).await?;
        self.0
            .case_as_of(&p.tenant, case_id, u64::MAX)
            .await
            .ok_or_else(|| Status::not_found(format!("case {case_id:?} not found")))
    }

    /// An agent's work on a case, for the handoff queue to decide.
    async fn work(
        &self,
        p: &Principal,
        case_id: &str,
        agent: &str,
        work: AgentWork,
    ) -> Result<(), Status> {
        let body = Body::CaseWork {
            case_id: case_id.to_owned(),
            agent: agent.to_owned(),
            work,
        };
        self.tell(p, case_id, format!("work/{agent}"), body).await
    }

    /// Sends `body` about `case_id` to the tenant's handoff queue, which decides; its
    /// answer as the call's status.
    async fn tell(
        &self,
        p: &Principal,
        case_id: &str,
        what: String,
        body: Body,
    ) -> Result<(), Status> {
        let mail = Mail {
            id: format!("grpc/{}/{case_id}/{what}", p.name),
            from: Address::Handoff(p.tenant.clone()),
            to: Address::Handoff(p.tenant.clone()),
            body,
        };
        match self.0.system.handoff().call(&p.tenant, mail).await {
            Ok(DeskStatus::Refused(why)) => Err(Status::invalid_argument(why)),
            Ok(DeskStatus::Ignored) => Err(Status::failed_precondition(format!(
                "case {case_id:?} cannot take that now"
            ))),
            Ok(DeskStatus::Done | DeskStatus::Duplicate) => Ok(()),
            Err(e) => Err(internal(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::projection::keep_from;
    use caretwin_actors::model::{DAY_MS, Priority};

    fn event(case_id: &str, event: CaseEventKind, at_ms: u64) -> CaseEvent {
        CaseEvent {
            case_id: case_id.into(),
            event,
            priority: Priority::Normal,
            escalation_level: 0,
            at_ms,
            customer: "t1:alice".into(),
            reason: None,
            context: None,
            agent: None,
            truncated: false,
            note: None,
            resolution: None,
            accept_by_ms: None,
        }
    }

    #[test]
    fn an_open_case_is_never_trimmed_and_holds_back_what_follows_it() {
        let mut book = CaseBook::default();
        // 1-2: case a, resolved long ago; 3: case b, open; 4-5: case c, resolved long ago.
        book.apply(1, event("a", CaseEventKind::HandedOff, 0));
        book.apply(2, event("a", CaseEventKind::Resolved, DAY_MS));
        book.apply(3, event("b", CaseEventKind::HandedOff, DAY_MS));
        book.apply(4, event("c", CaseEventKind::HandedOff, DAY_MS));
        book.apply(5, event("c", CaseEventKind::Resolved, DAY_MS));
        let now = 100 * DAY_MS;
        let from = keep_from(&book.spans(), 6, now, CASE_RETENTION.keep_ms);
        assert_eq!(from, 3, "a goes, the open b and everything after it stay");
        book.forget_before(from);
        assert!(!book.cases.contains_key("a"));
        assert!(book.cases.contains_key("b") && book.cases.contains_key("c"));
        assert_eq!(book.order.keys().copied().collect::<Vec<_>>(), [3, 4, 5]);
        // b resolved: now everything may go.
        book.apply(6, event("b", CaseEventKind::Resolved, 2 * DAY_MS));
        assert_eq!(keep_from(&book.spans(), 7, now, CASE_RETENTION.keep_ms), 7);
        // ... but not while it is younger than the retention.
        assert_eq!(
            keep_from(&book.spans(), 7, 50 * DAY_MS, CASE_RETENTION.keep_ms),
            3
        );
    }
}
