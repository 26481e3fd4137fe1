//! What the cluster does with a site's sync frames, whatever carries them.
//!
//! The QUIC session hands every frame from an authenticated site to [`Ingest`] and sends
//! back what it returns; tests drive it directly. It authorizes every device write against
//! the site from the client certificate (a device must be provisioned and belong to that
//! site), converts the protocol's items into the device twins' log items, applies them
//! through the host (each reply comes after the twin's write is durable), and turns the
//! outcome into an `Ack` with per-device watermarks and protocol error codes.
//!
//! Commands and desired state for a site's devices are appended to the site's durable log
//! (`edge/<site>`), whose index is the protocol's command `position`: a session sends what
//! lies after the edge's `last_command_position`, so a command sent while the site is
//! offline goes down when it reconnects.

use caretwin_actors::host::dispatch::{Delivery, Router};
use caretwin_actors::mail::{Body, Mail, tenant_of};
use caretwin_actors::model::TimeMs;
use caretwin_actors::store::{Key, Op, Store, WriteBatch};
use caretwin_actors::system::System;
use caretwin_actors::twins::device::{
    ApplyReport, DeviceItem, DeviceMsg, DeviceReply, ItemKind, RejectKind,
};
use caretwin_proto::v1::{
    self, Ack, ClusterFrame, DeviceWatermark, EdgeFrame, ErrorCode, Hello, SessionLimits,
    SyncError, Welcome, cluster_frame, device_event, edge_frame,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Who is on the other end: the site named by its client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SiteId {
    /// The site id (`tenant:site`).
    pub site: String,
}

impl SiteId {
    /// The site's tenant.
    pub fn tenant(&self) -> &str {
        tenant_of(&self.site)
    }
}

/// The limits this node sets for every session.
pub fn default_limits() -> SessionLimits {
    SessionLimits {
        max_batch_readings: 4096,
        max_frame_bytes: 1 << 20,
        heartbeat_interval_ms: 2_000,
        max_data_streams: 4,
        max_in_flight_frames: 8,
        max_clock_skew_ms: caretwin_actors::twins::device::MAX_CLOCK_SKEW_MS as i64,
    }
}

/// A command as kept in a site's command log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedCommand {
    /// The device.
    pub device: String,
    /// The command, as the twin issued it.
    pub command: caretwin_actors::mail::DeviceCommand,
}

/// A device's desired state as kept in a site's command log: (field, value, version).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedDesired {
    /// The device.
    pub device: String,
    /// Every desired field with its version (a complete snapshot).
    pub desired: Vec<(String, String, u64)>,
}

/// A cancel of a command as kept in a site's command log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedCancel {
    /// The device.
    pub device: String,
    /// The command to cancel.
    pub cancel: String,
    /// Why, for the edge's logs.
    pub reason: String,
}

/// What a site's log holds, in the order it must reach the edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SiteLogEntry {
    /// A command.
    Command(LoggedCommand),
    /// A desired state.
    Desired(LoggedDesired),
    /// A cancel: after its command in the log, so the edge hears it after the command.
    Cancel(LoggedCancel),
}

/// The key of a site's command log.
pub fn command_log(site: &str) -> Key {
    Key::new(format!("edge/{site}"))
}

/// Wakes a site's session when its command log grows.
#[derive(Default)]
pub struct CommandSignals(Mutex<HashMap<String, Arc<Notify>>>);

impl CommandSignals {
    /// The signal of `site`.
    pub fn of(&self, site: &str) -> Arc<Notify> {
        self.0
            .lock()
            .expect("signal map lock")
            .entry(site.to_owned())
            .or_default()
            .clone()
    }
}

/// Routes mail leaving the system: commands and desired state for a site go to its
/// durable command log (always accepted, so a site that is offline does not hold up the
/// outbox behind it); the rest goes to `rest`.
pub struct EdgeGateway {
    store: Arc<dyn Store>,
    signals: Arc<CommandSignals>,
    rest: Arc<dyn Router>,
}

impl EdgeGateway {
    /// A gateway over `store`, waking sessions through `signals`.
    pub fn new(store: Arc<dyn Store>, signals: Arc<CommandSignals>, rest: Arc<dyn Router>) -> Self {
        Self {
            store,
            signals,
            rest,
        }
    }
}

#[async_trait::async_trait]
impl Router for EdgeGateway {
    async fn deliver(&self, mail: Mail) -> caretwin_actors::Result<Delivery> {
        let caretwin_actors::mail::Address::Edge(site) = &mail.to else {
            return self.rest.deliver(mail).await;
        };
        let entry = match &mail.body {
            Body::Command(command) => SiteLogEntry::Command(LoggedCommand {
                device: command.device.clone(),
                command: command.clone(),
            }),
            Body::DesiredState { device, fields } => SiteLogEntry::Desired(LoggedDesired {
                device: device.clone(),
                desired: fields.clone(),
            }),
            Body::CancelCommand {
                device,
                command_id,
                reason,
            } => SiteLogEntry::Cancel(LoggedCancel {
                device: device.clone(),
                cancel: command_id.clone(),
                reason: reason.clone(),
            }),
            _ => {
                return Ok(Delivery::Rejected(format!(
                    "edge mail {} is neither a command, a cancel nor desired state",
                    mail.id
                )));
            }
        };
        let value = serde_json::to_vec(&entry).expect("a log entry is plain data");
        self.store
            .commit(WriteBatch::new().with(Op::Append {
                log: command_log(site),
                value,
            }))
            .await?;
        self.signals.of(site).notify_waiters();
        Ok(Delivery::Delivered)
    }
}

/// The cluster side of the sync for every session on this node.
pub struct Ingest {
    system: Arc<System>,
    store: Arc<dyn Store>,
    node_id: String,
    limits: SessionLimits,
    /// Agree on zstd when the edge offers it.
    compression: bool,
    /// Readings applied by the twins, for the node's counters.
    readings_applied: AtomicU64,
    /// Items the twins set aside for lack of consent.
    readings_withheld: AtomicU64,
}

fn error(code: ErrorCode, message: impl Into<String>) -> SyncError {
    SyncError {
        code: code as i32,
        message: message.into(),
        ..Default::default()
    }
}

fn item_error(code: ErrorCode, device: &str, seq: u64, message: impl Into<String>) -> SyncError {
    SyncError {
        code: code as i32,
        message: message.into(),
        device_id: Some(device.to_owned()),
        seq: Some(seq),
        retry_after_ms: None,
    }
}

fn alarm_kind(kind: i32) -> String {
    v1::AlarmKind::try_from(kind)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("ALARM_KIND_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| "other".into())
}

fn signal_text(v: &Option<v1::SignalValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(v1::signal_value::Value::Number(n)) => n.to_string(),
        Some(v1::signal_value::Value::Integer(i)) => i.to_string(),
        Some(v1::signal_value::Value::Flag(b)) => b.to_string(),
        Some(v1::signal_value::Value::Text(t)) => t.clone(),
        None => String::new(),
    }
}

/// A timestamp from the wire: negative times are refused like far-future ones.
fn wire_ts(ms: i64) -> TimeMs {
    u64::try_from(ms).unwrap_or(0)
}

impl Ingest {
    /// Ingest for node `node_id` over the system's twins.
    pub fn new(system: Arc<System>, store: Arc<dyn Store>, node_id: &str) -> Self {
        Self {
            system,
            store,
            node_id: node_id.to_owned(),
            limits: default_limits(),
            compression: true,
            readings_applied: AtomicU64::new(0),
            readings_withheld: AtomicU64::new(0),
        }
    }

    /// Readings the twins have applied (durably) through this ingest since it started.
    pub fn readings_applied(&self) -> u64 {
        self.readings_applied.load(Ordering::Relaxed)
    }

    /// Readings the twins durably set aside, unused, because the customer had not
    /// consented to their scope.
    pub fn readings_withheld(&self) -> u64 {
        self.readings_withheld.load(Ordering::Relaxed)
    }

    /// Sets the heartbeat interval edges are asked to keep.
    pub fn with_heartbeat(mut self, every: std::time::Duration) -> Self {
        self.limits.heartbeat_interval_ms = every.as_millis().max(1) as i64;
        self
    }

    /// Sets every session limit (tests use small windows to see back-pressure).
    pub fn with_limits(mut self, limits: SessionLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Whether sessions may agree on zstd compression when the edge offers it (default:
    /// yes).
    pub fn with_compression(mut self, allow: bool) -> Self {
        self.compression = allow;
        self
    }

    /// The session limits.
    pub fn limits(&self) -> &SessionLimits {
        &self.limits
    }

    /// Opens a session: the watermark of every device the edge has items for.
    pub async fn hello(
        &self,
        site: &SiteId,
        session_id: &str,
        hello: &Hello,
        now: TimeMs,
    ) -> Result<Welcome, SyncError> {
        if hello.protocol_version != v1::SyncProtocolVersion::V1 as u32 {
            return Err(error(
                ErrorCode::UnsupportedVersion,
                format!(
                    "protocol version {} is not supported",
                    hello.protocol_version
                ),
            ));
        }
        let mut watermarks = Vec::new();
        for d in &hello.devices {
            // Another tenant's device ids are never even looked up.
            if tenant_of(&d.device_id) != site.tenant()
                || d.device_id.is_empty()
                || d.device_id.len() > 256
            {
                continue;
            }
            let persisted = self
                .store
                .high_water(&Key::new(d.device_id.clone()))
                .await
                .map_err(|e| error(ErrorCode::Internal, e.to_string()))?;
            watermarks.push(DeviceWatermark {
                device_id: d.device_id.clone(),
                persisted_seq: persisted,
            });
        }
        Ok(Welcome {
            cluster_node_id: self.node_id.clone(),
            session_id: session_id.to_owned(),
            protocol_version: v1::SyncProtocolVersion::V1 as u32,
            site_id: site.site.clone(),
            tenant_id: site.tenant().to_owned(),
            watermarks,
            limits: Some(self.limits),
            compression: if self.compression
                && hello.compression.contains(&(v1::Compression::Zstd as i32))
            {
                v1::Compression::Zstd
            } else {
                v1::Compression::None
            } as i32,
            server_time_ms: now as i64,
            // The sync endpoint adds the cluster's members (`SyncServer::tell_members`).
            sync_addrs: Vec::new(),
        })
    }

    /// Handles one frame of a data stream; returns the frame to send back (an `Ack`, or an
    /// error for a frame that has no place there).
    pub async fn data_frame(&self, site: &SiteId, frame: EdgeFrame) -> ClusterFrame {
        let body = match frame.body {
            Some(edge_frame::Body::Batch(b)) => self.batch(site, b).await,
            Some(edge_frame::Body::Event(e)) => self.event(site, e).await,
            Some(edge_frame::Body::ReportedState(r)) => self.reported(site, r).await,
            Some(_) => cluster_frame::Body::Error(error(
                ErrorCode::ProtocolViolation,
                "only device log frames belong on a data stream",
            )),
            None => cluster_frame::Body::Error(error(ErrorCode::MalformedFrame, "empty frame")),
        };
        ClusterFrame { body: Some(body) }
    }

    async fn batch(&self, site: &SiteId, batch: v1::ReadingBatch) -> cluster_frame::Body {
        let mut ack = Ack {
            batch_id: batch.batch_id,
            ..Default::default()
        };
        if batch.readings.len() > self.limits.max_batch_readings as usize {
            ack.frame_error = Some(error(
                ErrorCode::BatchTooLarge,
                format!(
                    "{} readings, the limit is {}",
                    batch.readings.len(),
                    self.limits.max_batch_readings
                ),
            ));
            return cluster_frame::Body::Ack(ack);
        }
        // Group by device, keeping each device's order.
        let mut runs: BTreeMap<String, Vec<DeviceItem>> = BTreeMap::new();
        for r in batch.readings {
            runs.entry(r.device_id).or_default().push(DeviceItem {
                seq: r.seq,
                ts_ms: wire_ts(r.device_time_ms),
                kind: ItemKind::Reading {
                    signal: r.signal,
                    value: r.value,
                },
            });
        }
        // Devices live in different twins (often different shards): apply them together, so
        // their writes share the store's group commits instead of waiting for each other.
        let parts = futures::future::join_all(runs.into_iter().map(|(device, items)| async move {
            let mut part = Ack::default();
            self.apply(site, &device, items, &mut part).await;
            part
        }))
        .await;
        for part in parts {
            ack.watermarks.extend(part.watermarks);
            ack.rejections.extend(part.rejections);
            ack.accepted_count += part.accepted_count;
            ack.duplicate_count += part.duplicate_count;
            if part.frame_error.is_some() {
                ack.frame_error = part.frame_error;
            }
        }
        cluster_frame::Body::Ack(ack)
    }

    async fn event(&self, site: &SiteId, e: v1::DeviceEvent) -> cluster_frame::Body {
        let kind = match e.kind {
            Some(device_event::Kind::Alarm(a)) if a.cleared => ItemKind::Reported {
                fields: vec![(format!("alarm:{}", alarm_kind(a.kind)), "cleared".into())],
            },
            Some(device_event::Kind::Alarm(a)) => ItemKind::Alarm {
                kind: alarm_kind(a.kind),
                local_action: (!a.local_action_taken.is_empty()).then_some(a.local_action_taken),
            },
            Some(device_event::Kind::Diagnostic(d)) => ItemKind::Diagnostic { code: d.code },
            Some(device_event::Kind::Question(q)) => ItemKind::Question {
                question_id: q.question_id,
            },
            Some(device_event::Kind::CommandResult(r)) => ItemKind::CommandResult {
                command_id: r.command_id,
                succeeded: r.outcome == v1::CommandOutcome::Succeeded as i32,
                expired: r.outcome == v1::CommandOutcome::Expired as i32,
                cancelled: r.outcome == v1::CommandOutcome::Cancelled as i32,
                detail: r.detail,
            },
            None => {
                return cluster_frame::Body::Error(error(
                    ErrorCode::MalformedFrame,
                    "device event without a kind",
                ));
            }
        };
        let mut ack = Ack::default();
        let item = DeviceItem {
            seq: e.seq,
            ts_ms: wire_ts(e.device_time_ms),
            kind,
        };
        self.apply(site, &e.device_id, vec![item], &mut ack).await;
        cluster_frame::Body::Ack(ack)
    }

    async fn reported(&self, site: &SiteId, r: v1::ReportedState) -> cluster_frame::Body {
        let fields = r
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), signal_text(&v.value)))
            .collect();
        let item = DeviceItem {
            seq: r.seq,
            ts_ms: wire_ts(r.device_time_ms),
            kind: ItemKind::Reported { fields },
        };
        let mut ack = Ack::default();
        self.apply(site, &r.device_id, vec![item], &mut ack).await;
        cluster_frame::Body::Ack(ack)
    }

    /// Applies one device's items and adds the outcome to `ack`.
    async fn apply(&self, site: &SiteId, device: &str, items: Vec<DeviceItem>, ack: &mut Ack) {
        let first_seq = items.first().map_or(0, |i| i.seq);
        if tenant_of(device) != site.tenant() || device.is_empty() || device.len() > 256 {
            ack.rejections.push(item_error(
                ErrorCode::NotOwner,
                device,
                first_seq,
                format!("site {} may not write device {device:?}", site.site),
            ));
            return;
        }
        let msg = DeviceMsg::FromSite {
            site: site.site.clone(),
            items,
        };
        match self.system.devices().call(device, msg).await {
            Ok(DeviceReply::Applied(report)) => {
                self.readings_applied
                    .fetch_add(u64::from(report.readings), Ordering::Relaxed);
                self.readings_withheld
                    .fetch_add(u64::from(report.withheld), Ordering::Relaxed);
                Self::report(device, report, ack);
            }
            Ok(DeviceReply::UnknownDevice) => ack.rejections.push(item_error(
                ErrorCode::UnknownDevice,
                device,
                first_seq,
                format!("device {device:?} is not provisioned"),
            )),
            Ok(DeviceReply::NotOwner) => ack.rejections.push(item_error(
                ErrorCode::NotOwner,
                device,
                first_seq,
                format!("device {device:?} belongs to another site"),
            )),
            Ok(other) => ack.rejections.push(item_error(
                ErrorCode::Internal,
                device,
                first_seq,
                format!("{other:?}"),
            )),
            // The store or host failed: nothing is acknowledged, the edge retries later.
            Err(e) => {
                let mut err = error(ErrorCode::Overloaded, e.to_string());
                err.retry_after_ms = Some(1_000);
                ack.frame_error = Some(err);
            }
        }
    }

    fn report(device: &str, r: ApplyReport, ack: &mut Ack) {
        ack.watermarks.push(DeviceWatermark {
            device_id: device.to_owned(),
            persisted_seq: r.high_water,
        });
        ack.accepted_count += r.applied + r.withheld + r.rejected.len() as u32;
        ack.duplicate_count += r.duplicates;
        if r.duplicates > 0 {
            ack.rejections.push(item_error(
                ErrorCode::Duplicate,
                device,
                r.high_water,
                format!("{} items at or below the watermark skipped", r.duplicates),
            ));
        }
        for x in r.rejected {
            let code = match x.kind {
                RejectKind::InvalidValue | RejectKind::UnknownEvent => ErrorCode::InvalidValue,
                RejectKind::TimestampInFuture => ErrorCode::TimestampInFuture,
                RejectKind::UnknownSignal => ErrorCode::UnknownSignal,
            };
            ack.rejections
                .push(item_error(code, device, x.seq, x.reason));
        }
        if let Some(missing) = r.gap_at {
            ack.rejections.push(item_error(
                ErrorCode::SequenceGap,
                device,
                missing,
                format!("expected seq {missing}; resend from there"),
            ));
        }
    }

    /// Handles a control-stream frame other than `Hello`; `None` when nothing is sent back.
    pub async fn control_frame(
        &self,
        site: &SiteId,
        frame: EdgeFrame,
        now: TimeMs,
    ) -> Option<ClusterFrame> {
        let body = match frame.body {
            Some(edge_frame::Body::Heartbeat(h)) => {
                cluster_frame::Body::HeartbeatAck(v1::HeartbeatAck {
                    echo_sent_at_ms: h.sent_at_ms,
                    server_time_ms: now as i64,
                })
            }
            Some(edge_frame::Body::CommandStatus(s)) => {
                self.command_status(site, s).await;
                return None;
            }
            Some(edge_frame::Body::Hello(_)) => {
                cluster_frame::Body::Error(error(ErrorCode::ProtocolViolation, "a second Hello"))
            }
            Some(_) => cluster_frame::Body::Error(error(
                ErrorCode::ProtocolViolation,
                "device log frames belong on a data stream",
            )),
            None => cluster_frame::Body::Error(error(ErrorCode::MalformedFrame, "empty frame")),
        };
        Some(ClusterFrame { body: Some(body) })
    }

    async fn command_status(&self, site: &SiteId, s: v1::CommandStatus) {
        let Ok(Some(entry)) = self.logged_command(site, s.position).await else {
            return;
        };
        if entry.command.command_id != s.command_id {
            return;
        }
        let state = match v1::CommandState::try_from(s.state) {
            Ok(v1::CommandState::SentToEdge) => "sent_to_edge",
            Ok(v1::CommandState::DeliveredToDevice) => "delivered_to_device",
            _ => return,
        };
        let msg = DeviceMsg::CommandStatus {
            site: site.site.clone(),
            command_id: s.command_id,
            state: state.into(),
        };
        if let Err(e) = self.system.devices().call(&entry.device, msg).await {
            tracing::warn!(site = %site.site, error = %e, "command status not recorded");
        }
    }

    async fn logged_command(
        &self,
        site: &SiteId,
        position: u64,
    ) -> caretwin_actors::Result<Option<LoggedCommand>> {
        if position == 0 {
            return Ok(None);
        }
        let entries = self
            .store
            .read_log(&command_log(&site.site), position, 1)
            .await?;
        Ok(entries
            .first()
            .filter(|e| e.index == position)
            .and_then(|e| serde_json::from_slice::<SiteLogEntry>(&e.value).ok())
            .and_then(|e| match e {
                SiteLogEntry::Command(c) => Some(c),
                SiteLogEntry::Desired(_) | SiteLogEntry::Cancel(_) => None,
            }))
    }

    /// Whether the device twin cancelled `c` before the edge confirmed it (it is then
    /// never sent down).
    async fn cancelled(&self, c: &LoggedCommand) -> caretwin_actors::Result<bool> {
        let id = c.command.command_id.clone();
        self.system
            .devices()
            .inspect(&c.device, move |t| {
                t.and_then(|t| t.commands().iter().find(|x| x.id == id))
                    .is_some_and(|x| x.state == "cancelled")
            })
            .await
    }

    /// The site's commands after `position`, not yet expired at `now` nor cancelled, as
    /// frames; with the desired states and the cancels logged after it. A cancel is always
    /// sent: the edge ignores one for a command it does not hold or already finished.
    pub async fn commands_after(
        &self,
        site: &SiteId,
        position: u64,
        now: TimeMs,
    ) -> caretwin_actors::Result<(Vec<ClusterFrame>, u64)> {
        let mut frames = Vec::new();
        let mut last = position;
        loop {
            let page = self
                .store
                .read_log(&command_log(&site.site), last + 1, 256)
                .await?;
            let n = page.len();
            for e in page {
                last = e.index;
                let c = match serde_json::from_slice::<SiteLogEntry>(&e.value) {
                    Ok(SiteLogEntry::Command(c)) => c,
                    Ok(SiteLogEntry::Desired(d)) => {
                        frames.push(ClusterFrame {
                            body: Some(cluster_frame::Body::DesiredState(v1::DesiredState {
                                device_id: d.device,
                                fields: d
                                    .desired
                                    .into_iter()
                                    .map(|(f, value, version)| {
                                        let value = v1::DesiredValue {
                                            value: Some(v1::SignalValue {
                                                value: Some(v1::signal_value::Value::Text(value)),
                                            }),
                                            version,
                                            set_at_ms: 0,
                                        };
                                        (f, value)
                                    })
                                    .collect(),
                                snapshot: true,
                            })),
                        });
                        continue;
                    }
                    Ok(SiteLogEntry::Cancel(x)) => {
                        frames.push(ClusterFrame {
                            body: Some(cluster_frame::Body::CancelCommand(v1::CommandCancel {
                                command_id: x.cancel,
                                reason: x.reason,
                            })),
                        });
                        continue;
                    }
                    Err(_) => continue,
                };
                if c.command.expires_at_ms <= now || self.cancelled(&c).await? {
                    continue;
                }
                let payload = crate::grpc::convert::command_payload(
                    &c.command.name,
                    &c.command.args,
                    c.command.action.as_ref(),
                );
                frames.push(ClusterFrame {
                    body: Some(cluster_frame::Body::Command(v1::Command {
                        command_id: c.command.command_id,
                        position: e.index,
                        device_id: c.device,
                        payload: Some(payload),
                        priority: crate::grpc::convert::priority(c.command.priority) as i32,
                        issued_at_ms: now as i64,
                        expires_at_ms: c.command.expires_at_ms as i64,
                    })),
                });
            }
            if n < 256 {
                return Ok((frames, last));
            }
        }
    }
}
