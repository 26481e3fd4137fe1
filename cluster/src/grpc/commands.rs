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
use crate::store::watch::LogSignals;
use caretwin_actors::catalogue::Catalogue;
use caretwin_actors::host::clock::Clock;
use caretwin_actors::mail::DeviceCommand;
use caretwin_actors::model::{DAY_MS, Priority};
use caretwin_actors::store::Store;
use caretwin_actors::system::System;
use caretwin_actors::twins::device::{
    CommandEvent, CommandInfo, DeviceMsg, DeviceReply, IssuedCommand, commands_log,
};
use caretwin_proto::v1::{self, command_service_server::CommandService};
use futures::Stream;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

/// Entries read from the log per store call while catching up.
const READ_CHUNK: usize = 1_000;
/// Longest idempotency key, in bytes.
const MAX_KEY: usize = 128;
/// Longest reason, in bytes (it is kept in the device twin's log entry).
const MAX_REASON: usize = 512;
/// Most arguments of a remedy, and their total size in bytes.
const MAX_ARGS: usize = 16;
const MAX_ARGS_BYTES: usize = 1024;
/// Furthest expiry a command may be given.
const MAX_TTL_MS: u64 = 30 * DAY_MS;

/// One command as the log tells it.
#[derive(Debug, Default)]
struct Tracked {
    /// Log index of its first transition (its order among commands).
    first: u64,
    /// Its transitions, oldest first.
    events: Vec<CommandEvent>,
}

/// One tenant's commands.
#[derive(Debug, Default)]
struct Book {
    /// The next log index to read.
    next: u64,
    commands: HashMap<String, Tracked>,
    /// Idempotency key → command id.
    by_key: HashMap<String, String>,
}

/// The projection of every tenant's command log.
pub struct Commands {
    system: Arc<System>,
    store: Arc<dyn Store>,
    signals: Arc<LogSignals>,
    catalogue: Arc<Catalogue>,
    clock: Arc<dyn Clock>,
    books: std::sync::Mutex<HashMap<String, Arc<Mutex<Book>>>>,
    /// Becomes true when the node shuts down: watch streams then end.
    closing: Option<tokio::sync::watch::Receiver<bool>>,
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

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
        payload: info.map(|i| v1::CommandPayload {
            kind: Some(v1::command_payload::Kind::RemoteRemedy(v1::RemoteRemedy {
                name: i.name.clone(),
                args: i.args.iter().cloned().collect(),
            })),
        }),
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
        Self {
            system,
            store,
            signals,
            catalogue,
            clock,
            books: Default::default(),
            closing: None,
        }
    }

    /// Ends every watch stream when `closing` becomes true (the node's shutdown).
    pub fn with_shutdown(mut self, closing: tokio::sync::watch::Receiver<bool>) -> Self {
        self.closing = Some(closing);
        self
    }

    fn book(&self, tenant: &str) -> Arc<Mutex<Book>> {
        self.books
            .lock()
            .expect("books lock")
            .entry(tenant.to_owned())
            .or_insert_with(|| {
                Arc::new(Mutex::new(Book {
                    next: 1,
                    ..Default::default()
                }))
            })
            .clone()
    }

    /// Reads what the tenant's log gained since the last call.
    async fn catch_up(&self, tenant: &str) -> Result<Arc<Mutex<Book>>, Status> {
        let book = self.book(tenant);
        {
            let mut b = book.lock().await;
            loop {
                let entries = self
                    .store
                    .read_log(&commands_log(tenant), b.next, READ_CHUNK)
                    .await
                    .map_err(internal)?;
                let Some(last) = entries.last().map(|e| e.index) else {
                    break;
                };
                for e in entries {
                    match serde_json::from_slice::<CommandEvent>(&e.value) {
                        Ok(ev) => {
                            if let Some(key) = ev.info.as_ref().map(|i| &i.key)
                                && !key.is_empty()
                            {
                                b.by_key.insert(key.clone(), ev.command_id.clone());
                            }
                            let t = b.commands.entry(ev.command_id.clone()).or_default();
                            if t.events.is_empty() {
                                t.first = e.index;
                            }
                            t.events.push(ev);
                        }
                        Err(err) => {
                            tracing::warn!(tenant, index = e.index, error = %err, "unreadable command event skipped");
                        }
                    }
                }
                b.next = last + 1;
            }
        }
        Ok(book)
    }

    async fn record(&self, tenant: &str, id: &str) -> Result<Option<v1::CommandRecord>, Status> {
        let book = self.catch_up(tenant).await?;
        let b = book.lock().await;
        Ok(b.commands.get(id).map(|t| fold(id, t)))
    }

    async fn by_key(&self, tenant: &str, key: &str) -> Result<Option<v1::CommandRecord>, Status> {
        let book = self.catch_up(tenant).await?;
        let b = book.lock().await;
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
        let remedy = match r.payload.and_then(|p| p.kind) {
            Some(v1::command_payload::Kind::RemoteRemedy(remedy)) => remedy,
            Some(v1::command_payload::Kind::Configuration(_)) => {
                return Err(Status::unimplemented(
                    "configuration commands are not supported yet; set the fields with TwinService.SetDesired, the device reports what it applied",
                ));
            }
            Some(v1::command_payload::Kind::FirmwareUpdate(_)) => {
                return Err(Status::unimplemented(
                    "firmware updates are not supported yet",
                ));
            }
            Some(v1::command_payload::Kind::AnswerQuestion(_)) => {
                return Err(Status::unimplemented(
                    "answers to product questions cannot be sent as commands yet",
                ));
            }
            None => return Err(Status::invalid_argument("payload must be set")),
        };
        if !self
            .0
            .catalogue
            .model(&model)
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
        let mut args: Vec<(String, String)> = remedy.args.into_iter().collect();
        args.sort();
        let issued = IssuedCommand {
            command: DeviceCommand {
                command_id: command_id.clone(),
                device: device.clone(),
                name: remedy.name,
                args,
                expires_at_ms: expires,
                priority,
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
        let current = self.current(&p, &r.command_id).await?;
        if r.reason.len() > MAX_REASON {
            return Err(Status::invalid_argument(format!(
                "reason is over {MAX_REASON} bytes"
            )));
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
