//! `CommandService`: commands to devices as integrators send and follow them.
//!
//! The source of truth is each tenant's command log (`commands/<tenant>`), which device
//! twins append every command transition to, in the same batch as their decision. This
//! module keeps a projection of it per tenant (every command with its transitions),
//! rebuilt from the log on first use and brought up to date when the log grows (the
//! node's [`Watched`](crate::store::watch::Watched) store signals appends, which wake
//! `WatchCommand` streams). Sending and cancelling are messages to the device twin, which
//! decides; the twin's command reaches the site's edge like the twins' own commands (its
//! outbox, then the site's command log), and so does its cancel of a command the edge
//! holds (the protocol's `CommandCancel`), which ends with the edge's answer.

use super::auth::{Principal, Scope};
use super::projection::{Book, Fold, Projection, Retention, Span};
use crate::store::watch::LogSignals;
use caretwin_actors::catalogue::Catalogue;
use caretwin_actors::host::clock::Clock;
use caretwin_actors::mail::{CommandAction, DeviceCommand};
use caretwin_actors::model::{DAY_MS, Priority};
use caretwin_actors::store::Store;
use caretwin_actors::system::System;
use caretwin_actors::twins::device::{
    CommandEvent, CommandInfo, DeviceMsg, DeviceReply, IssuedCommand, command_final, commands_log,
};
use caretwin_proto::v1::{self, command_service_server::CommandService};
use futures::Stream;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

/// Longest idempotency key, in bytes.
const MAX_KEY: usize = 128;
/// Longest reason, in bytes (it is kept in the device twin's log entry).
const MAX_REASON: usize = 512;
/// Most arguments of a remedy, and their total size in bytes.
const MAX_ARGS: usize = 16;
const MAX_ARGS_BYTES: usize = 1024;
/// Most fields a configuration command sets (the contract's limit).
const MAX_CONFIG_ENTRIES: usize = 256;
/// Longest configuration field name or value, in bytes (the device twin's limit).
const MAX_FIELD_BYTES: usize = 256;
/// Longest firmware address, in bytes.
const MAX_URL: usize = 2048;
/// Largest firmware image, in bytes (8 GiB).
const MAX_FIRMWARE_BYTES: u64 = 8 << 30;
/// Furthest expiry a command may be given.
const MAX_TTL_MS: u64 = 30 * DAY_MS;

/// How long a finished command stays in the command log by default.
pub const COMMAND_RETENTION: Retention = Retention::days(30);

/// A command's payload as the device twin takes it: its name, a remedy's arguments, and
/// what it does when it is not a remedy.
type Payload = (String, Vec<(String, String)>, Option<CommandAction>);

/// One command as the log tells it.
#[derive(Debug, Default)]
struct Tracked {
    /// Log index of its first transition (its order among commands).
    first: u64,
    /// Log index of its latest transition.
    last: u64,
    /// Its transitions, oldest first.
    events: Vec<CommandEvent>,
}

/// One tenant's commands.
#[derive(Debug, Default)]
pub(crate) struct CommandBook {
    commands: HashMap<String, Tracked>,
    /// Idempotency key → command id.
    by_key: HashMap<String, String>,
}

impl Fold for CommandBook {
    type Event = CommandEvent;
    const WHAT: &'static str = "command event";

    fn apply(&mut self, index: u64, ev: CommandEvent) {
        if let Some(key) = ev.info.as_ref().map(|i| &i.key)
            && !key.is_empty()
        {
            self.by_key.insert(key.clone(), ev.command_id.clone());
        }
        let t = self.commands.entry(ev.command_id.clone()).or_default();
        if t.events.is_empty() {
            t.first = index;
        }
        t.last = index;
        t.events.push(ev);
    }

    fn spans(&self) -> Vec<Span> {
        self.commands
            .values()
            .filter_map(|t| {
                let last = t.events.last()?;
                Some(Span {
                    first: t.first,
                    last: t.last,
                    last_at_ms: last.at,
                    finished: t.events.iter().any(|e| command_final(&e.state)),
                })
            })
            .collect()
    }

    fn forget_before(&mut self, from: u64) {
        self.commands.retain(|_, t| t.last >= from);
        let commands = &self.commands;
        self.by_key.retain(|_, id| commands.contains_key(id));
    }
}

/// The projection of every tenant's command log.
pub struct Commands {
    system: Arc<System>,
    signals: Arc<LogSignals>,
    catalogue: Arc<Catalogue>,
    clock: Arc<dyn Clock>,
    log: Projection<CommandBook>,
    /// Becomes true when the node shuts down: watch streams then end.
    closing: Option<tokio::sync::watch::Receiver<bool>>,
}

use super::internal;

fn state_of(s: &str) -> v1::CommandState {
    match s {
        "queued" => v1::CommandState::Queued,
        "sent_to_edge" => v1::CommandState::SentToEdge,
        "delivered_to_device" => v1::CommandState::DeliveredToDevice,
        "succeeded" => v1::CommandState::Succeeded,
        "failed" => v1::CommandState::Failed,
        "expired" => v1::CommandState::Expired,
        "cancelled" => v1::CommandState::Cancelled,
        _ => v1::CommandState::Unspecified,
    }
}

fn priority_of(p: Priority) -> v1::Priority {
    super::convert::priority(p)
}

/// Whether a state on the wire is terminal.
fn is_final(state: i32) -> bool {
    matches!(
        v1::CommandState::try_from(state),
        Ok(v1::CommandState::Succeeded
            | v1::CommandState::Failed
            | v1::CommandState::Expired
            | v1::CommandState::Cancelled)
    )
}

fn transition(e: &CommandEvent) -> v1::CommandTransition {
    v1::CommandTransition {
        command_id: e.command_id.clone(),
        state: state_of(&e.state) as i32,
        at_ms: e.at as i64,
        detail: e.detail.clone(),
    }
}

/// A command's record from its transitions.
fn fold(id: &str, t: &Tracked) -> v1::CommandRecord {
    let first = t.events.first();
    let info: Option<&CommandInfo> = t.events.iter().find_map(|e| e.info.as_ref());
    let last = t.events.last();
    v1::CommandRecord {
        command_id: id.to_owned(),
        device_id: first.map(|e| e.device.clone()).unwrap_or_default(),
        site_id: info.map(|i| i.site.clone()).unwrap_or_default(),
        payload: info.map(|i| super::convert::command_payload(&i.name, &i.args, i.action.as_ref())),
        state: last.map_or(v1::CommandState::Unspecified, |e| state_of(&e.state)) as i32,
        priority: info.map_or(v1::Priority::Normal, |i| priority_of(i.priority)) as i32,
        issued_at_ms: first.map_or(0, |e| e.at as i64),
        expires_at_ms: info.map_or(0, |i| i.expires_at_ms as i64),
        updated_at_ms: last.map_or(0, |e| e.at as i64),
        history: t.events.iter().map(transition).collect(),
        issued_by: info.map(|i| i.issued_by.clone()).unwrap_or_default(),
        case_id: info.map(|i| i.case_id.clone()).unwrap_or_default(),
        reason: info.map(|i| i.reason.clone()).unwrap_or_default(),
        idempotency_key: info.map(|i| i.key.clone()).unwrap_or_default(),
        cancel_requested_at_ms: t
            .events
            .iter()
            .find(|e| e.cancel.is_some())
            .map(|e| e.at as i64),
    }
}

impl Commands {
    /// The service over `system`'s device twins and `store`'s command logs; `signals` must
    /// be those of the store the twins write through, watching `commands/`.
    pub fn new(
        system: Arc<System>,
        store: Arc<dyn Store>,
        signals: Arc<LogSignals>,
        catalogue: Arc<Catalogue>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let mut log = Projection::new(store, commands_log, COMMAND_RETENTION);
        log.set_clock(clock.clone());
        Self {
            system,
            signals,
            catalogue,
            clock,
            log,
            closing: None,
        }
    }

    /// Ends every watch stream when `closing` becomes true (the node's shutdown).
    pub fn with_shutdown(mut self, closing: tokio::sync::watch::Receiver<bool>) -> Self {
        self.closing = Some(closing);
        self
    }

    /// Keeps finished commands in the log for `retention` (default
    /// [`COMMAND_RETENTION`]).
    pub fn with_retention(mut self, retention: Retention) -> Self {
        self.log.set_retention(retention);
        self
    }

    async fn catch_up(&self, tenant: &str) -> Result<Arc<Mutex<Book<CommandBook>>>, Status> {
        self.log.catch_up(tenant).await
    }

    /// A request's payload as the device twin takes it: (name, arguments, action), every
    /// field checked (INVALID_ARGUMENT otherwise).
    fn payload(&self, model: &str, payload: Option<v1::CommandPayload>) -> Result<Payload, Status> {
        use v1::command_payload::Kind;
        let action = match payload.and_then(|p| p.kind) {
            None => return Err(Status::invalid_argument("payload must be set")),
            Some(Kind::RemoteRemedy(remedy)) => {
                if !self
                    .catalogue
                    .model(model)
                    .is_some_and(|m| m.has_command(&remedy.name))
                {
                    return Err(Status::invalid_argument(format!(
                        "model {model} has no remedy {:?}",
                        remedy.name
                    )));
                }
                let args_bytes: usize = remedy.args.iter().map(|(k, v)| k.len() + v.len()).sum();
                if remedy.args.len() > MAX_ARGS || args_bytes > MAX_ARGS_BYTES {
                    return Err(Status::invalid_argument(format!(
                        "at most {MAX_ARGS} arguments of {MAX_ARGS_BYTES} bytes in all"
                    )));
                }
                let mut args: Vec<(String, String)> = remedy.args.into_iter().collect();
                args.sort();
                return Ok((remedy.name, args, None));
            }
            Some(Kind::Configuration(c)) => {
                if c.entries.is_empty() || c.entries.len() > MAX_CONFIG_ENTRIES {
                    return Err(Status::invalid_argument(format!(
                        "a configuration sets 1 to {MAX_CONFIG_ENTRIES} fields"
                    )));
                }
                let mut fields = Vec::with_capacity(c.entries.len());
                for (field, entry) in c.entries {
                    check_text("configuration field name", &field, MAX_FIELD_BYTES)?;
                    let value = super::twins::desired_value(&field, entry.value)?;
                    if value.len() > MAX_FIELD_BYTES {
                        return Err(Status::invalid_argument(format!(
                            "field {field:?}: the value is over {MAX_FIELD_BYTES} bytes"
                        )));
                    }
                    fields.push((field, value, entry.version));
                }
                fields.sort();
                CommandAction::Configure { fields }
            }
            Some(Kind::FirmwareUpdate(f)) => {
                check_text("firmware version", &f.version, 64)?;
                check_text("firmware url", &f.url, MAX_URL)?;
                if !f.url.starts_with("https://")
                    || f.url.len() <= "https://".len()
                    || f.url.chars().any(char::is_whitespace)
                {
                    return Err(Status::invalid_argument(format!(
                        "firmware url {:?} must be an https:// address without spaces",
                        f.url
                    )));
                }
                if f.sha256.len() != 64
                    || !f
                        .sha256
                        .chars()
                        .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
                {
                    return Err(Status::invalid_argument(
                        "sha256 must be 64 lowercase hexadecimal characters",
                    ));
                }
                if f.size_bytes == 0 || f.size_bytes > MAX_FIRMWARE_BYTES {
                    return Err(Status::invalid_argument(format!(
                        "size_bytes must be 1 to {MAX_FIRMWARE_BYTES}, not {}",
                        f.size_bytes
                    )));
                }
                CommandAction::Firmware {
                    version: f.version,
                    url: f.url,
                    sha256: f.sha256,
                    size_bytes: f.size_bytes,
                }
            }
            Some(Kind::AnswerQuestion(a)) => {
                check_text("question_id", &a.question_id, MAX_KEY)?;
                check_text("option_id", &a.option_id, MAX_REASON)?;
                CommandAction::Answer {
                    question_id: a.question_id,
                    option_id: a.option_id,
                }
            }
        };
        Ok((action.name().to_owned(), Vec::new(), Some(action)))
    }

    /// Whether a cancel with idempotency key `key` was logged for the command.
    async fn cancelled_with(&self, tenant: &str, id: &str, key: &str) -> Result<bool, Status> {
        let book = self.catch_up(tenant).await?;
        let b = &book.lock().await.state;
        Ok(b.commands
            .get(id)
            .is_some_and(|t| t.events.iter().any(|e| e.cancel.as_deref() == Some(key))))
    }

    async fn record(&self, tenant: &str, id: &str) -> Result<Option<v1::CommandRecord>, Status> {
        let book = self.catch_up(tenant).await?;
        let b = &book.lock().await.state;
        Ok(b.commands.get(id).map(|t| fold(id, t)))
    }

    async fn by_key(&self, tenant: &str, key: &str) -> Result<Option<v1::CommandRecord>, Status> {
        let book = self.catch_up(tenant).await?;
        let b = &book.lock().await.state;
        Ok(b.by_key
            .get(key)
            .and_then(|id| b.commands.get(id).map(|t| fold(id, t))))
    }
}

type TransitionStream = Pin<Box<dyn Stream<Item = Result<v1::CommandTransition, Status>> + Send>>;

/// The gRPC face of [`Commands`].
#[derive(Clone)]
pub struct CommandApi(pub Arc<Commands>);

impl CommandApi {
    async fn current(&self, p: &Principal, id: &str) -> Result<v1::CommandRecord, Status> {
        p.own("command", id)?;
        self.0
            .record(&p.tenant, id)
            .await?
            .ok_or_else(|| Status::not_found(format!("command {id:?} not found")))
    }
}

fn check_text(what: &str, s: &str, max: usize) -> Result<(), Status> {
    if s.is_empty() || s.len() > max || s.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "{what} must be 1 to {max} printable bytes"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl CommandService for CommandApi {
    type WatchCommandStream = TransitionStream;

    async fn send_command(
        &self,
        req: Request<v1::SendCommandRequest>,
    ) -> Result<Response<v1::CommandRecord>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::CommandsWrite)?;
        let r = req.into_inner();
        check_text("idempotency_key", &r.idempotency_key, MAX_KEY)?;
        if let Some(first) = self.0.by_key(&p.tenant, &r.idempotency_key).await? {
            return Ok(Response::new(first));
        }
        let device = p.own("device", &r.device_id)?.to_owned();
        if device.len() > 256 {
            return Err(Status::invalid_argument("device_id is over 256 bytes"));
        }
        let model = self
            .0
            .system
            .devices()
            .inspect(&device, |t| t.and_then(|t| t.model().map(str::to_owned)))
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("device {device:?} not found")))?;
        let (name, args, action) = self.0.payload(&model, r.payload)?;
        let priority = match v1::Priority::try_from(r.priority) {
            Ok(v1::Priority::Unspecified | v1::Priority::Normal) => Priority::Normal,
            Ok(v1::Priority::Low) => Priority::Low,
            Ok(v1::Priority::High) => Priority::High,
            Ok(v1::Priority::Safety) => Priority::Safety,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "invalid priority {}",
                    r.priority
                )));
            }
        };
        let now = self.0.clock.now_ms();
        let expires = match r.expires_at_ms {
            None => now + DAY_MS,
            Some(t) if t > now as i64 && (t as u64) <= now + MAX_TTL_MS => t as u64,
            Some(t) => {
                return Err(Status::invalid_argument(format!(
                    "expires_at_ms {t} must be after now and within 30 days"
                )));
            }
        };
        if !r.case_id.is_empty() {
            p.own("case", &r.case_id)?;
        }
        if r.reason.len() > MAX_REASON {
            return Err(Status::invalid_argument(format!(
                "reason is over {MAX_REASON} bytes"
            )));
        }
        let command_id = format!("{}:cmd/{}", p.tenant, r.idempotency_key);
        let issued = IssuedCommand {
            command: DeviceCommand {
                command_id: command_id.clone(),
                device: device.clone(),
                name,
                args,
                expires_at_ms: expires,
                priority,
                action,
            },
            key: r.idempotency_key.clone(),
            issued_by: p.name.clone(),
            priority,
            case_id: r.case_id,
            reason: r.reason,
        };
        let reply = self
            .0
            .system
            .devices()
            .call(&device, DeviceMsg::Issue(Box::new(issued)))
            .await;
        match reply {
            Ok(DeviceReply::Ok) => {}
            // A configuration's field was not at the version the caller named.
            Ok(DeviceReply::Rejected(why)) if why.contains(" is at version ") => {
                return Err(Status::failed_precondition(why));
            }
            Ok(DeviceReply::Rejected(why)) => return Err(Status::invalid_argument(why)),
            Ok(DeviceReply::UnknownDevice) => {
                return Err(Status::not_found(format!("device {device:?} not found")));
            }
            Ok(other) => return Err(internal(format!("unexpected reply {other:?}"))),
            // The key was taken by a concurrent call (or long ago): its command is the answer.
            Err(caretwin_actors::Error::IdempotencyExists { .. }) => {}
            Err(e) => return Err(internal(e)),
        }
        let record = self
            .0
            .by_key(&p.tenant, &r.idempotency_key)
            .await?
            .ok_or_else(|| {
                Status::already_exists(
                    "the idempotency key was used for a command that is no longer kept",
                )
            })?;
        tracing::info!(tenant = %p.tenant, command = %record.command_id, device = %device, "command queued");
        Ok(Response::new(record))
    }

    async fn get_command(
        &self,
        req: Request<v1::GetCommandRequest>,
    ) -> Result<Response<v1::CommandRecord>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::CommandsRead)?;
        let r = req.into_inner();
        Ok(Response::new(self.current(&p, &r.command_id).await?))
    }

    async fn watch_command(
        &self,
        req: Request<v1::WatchCommandRequest>,
    ) -> Result<Response<TransitionStream>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::CommandsRead)?;
        let r = req.into_inner();
        p.own("command", &r.command_id)?;
        let commands = self.0.clone();
        // Subscribe before the first read, so a transition in between wakes the loop.
        let mut grew = commands.signals.subscribe(&commands_log(&p.tenant));
        self.current(&p, &r.command_id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut closing = commands.closing.clone();
        let id = r.command_id;
        tokio::spawn(async move {
            let mut sent = 0;
            loop {
                grew.borrow_and_update();
                let record = match commands.record(&p.tenant, &id).await {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                for t in record.history.into_iter().skip(sent) {
                    sent += 1;
                    let last = is_final(t.state);
                    if tx.send(Ok(t)).await.is_err() {
                        return; // the client went away
                    }
                    if last {
                        return;
                    }
                }
                if !super::stream::more(&mut grew, &tx, &mut closing).await {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cancel_command(
        &self,
        req: Request<v1::CancelCommandRequest>,
    ) -> Result<Response<v1::CommandRecord>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::CommandsWrite)?;
        let r = req.into_inner();
        if r.reason.len() > MAX_REASON || r.reason.chars().any(char::is_control) {
            return Err(Status::invalid_argument(format!(
                "reason must be at most {MAX_REASON} printable bytes"
            )));
        }
        if !r.idempotency_key.is_empty() {
            check_text("idempotency_key", &r.idempotency_key, MAX_KEY)?;
        }
        let current = self.current(&p, &r.command_id).await?;
        // A retry of a cancel this key made: the command as it stands, whatever it became
        // since (the first call's answer), and nothing asked or logged again.
        if !r.idempotency_key.is_empty()
            && self
                .0
                .cancelled_with(&p.tenant, &r.command_id, &r.idempotency_key)
                .await?
        {
            return Ok(Response::new(current));
        }
        match v1::CommandState::try_from(current.state) {
            Ok(v1::CommandState::Cancelled) => return Ok(Response::new(current)),
            // Queued: it ends at once. Stored on the edge: the twin asks the edge (once,
            // however often this is called), and the command ends when the edge answers:
            // CANCELLED, or the device's outcome if the device got it first.
            Ok(v1::CommandState::Queued | v1::CommandState::SentToEdge) => {}
            Ok(s) => {
                return Err(Status::failed_precondition(format!(
                    "command {:?} is {}, it can no longer be cancelled",
                    r.command_id,
                    s.as_str_name()
                )));
            }
            Err(_) => return Err(internal("command in an unknown state")),
        }
        let msg = DeviceMsg::CancelCommand {
            command_id: r.command_id.clone(),
            reason: if r.reason.is_empty() {
                format!("cancelled by {}", p.name)
            } else {
                r.reason
            },
            key: r.idempotency_key,
        };
        match self.0.system.devices().call(&current.device_id, msg).await {
            Ok(DeviceReply::Ok) => {}
            Ok(DeviceReply::Rejected(why)) => return Err(Status::failed_precondition(why)),
            Ok(other) => return Err(internal(format!("unexpected reply {other:?}"))),
            Err(e) => return Err(internal(e)),
        }
        Ok(Response::new(self.current(&p, &r.command_id).await?))
    }

    async fn list_commands(
        &self,
        req: Request<v1::ListCommandsRequest>,
    ) -> Result<Response<v1::ListCommandsResponse>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::CommandsRead)?;
        let r = req.into_inner();
        if let Some(s) = r
            .states
            .iter()
            .find(|s| v1::CommandState::try_from(**s).is_err())
        {
            return Err(Status::invalid_argument(format!("invalid state {s}")));
        }
        let page = r.page.clone().unwrap_or_default();
        let size = match page.page_size {
            0 => 50,
            n => n.min(1000),
        } as usize;
        // Newest first: the token is the log index to continue below.
        let below: u64 = if page.page_token.is_empty() {
            u64::MAX
        } else {
            page.page_token
                .parse()
                .map_err(|_| Status::invalid_argument("invalid page_token"))?
        };
        let book = self.0.catch_up(&p.tenant).await?;
        let b = book.lock().await;
        let mut all: Vec<(u64, v1::CommandRecord)> = b
            .state
            .commands
            .iter()
            .filter(|(_, t)| t.first < below)
            .map(|(id, t)| (t.first, fold(id, t)))
            .filter(|(_, c)| {
                (r.device_id.is_empty() || c.device_id == r.device_id)
                    && (r.case_id.is_empty() || c.case_id == r.case_id)
                    && (r.states.is_empty() || r.states.contains(&c.state))
            })
            .collect();
        drop(b);
        all.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        let next = if all.len() > size {
            all[size - 1].0.to_string()
        } else {
            String::new()
        };
        all.truncate(size);
        Ok(Response::new(v1::ListCommandsResponse {
            commands: all.into_iter().map(|(_, c)| c).collect(),
            page: Some(v1::PageResponse {
                next_page_token: next,
            }),
        }))
    }
}
