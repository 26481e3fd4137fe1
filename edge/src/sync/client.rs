//! The edge's side of the sync: one session at a time with the cluster, reconnecting
//! with backoff, sending everything in the outbox above the cluster's watermarks and
//! trimming what the cluster acknowledged.
//!
//! Nothing is deleted from the outbox except on the cluster's word (a watermark in a
//! `Welcome` or an `Ack`), so a crash of either side, a lost connection or a lost ack
//! means items are sent again — and the cluster skips what it already has.
//!
//! The edge may know several cluster nodes; which one it dials and when is decided by
//! [`super::dial::Dialer`]. A session on another node resumes exactly where the last one
//! stood: its `Welcome` carries the twins' high-water marks from the store every node
//! shares, and each session starts from those, not from what the edge sent before.

use super::dial::{Backoff, Dialer};
use super::transport::{FrameReader, TransportError, connect, send_frame};
use crate::error::{Error, Result};
use crate::outbox::{
    CancelOutcome, CommandState, FieldValue, ItemKind, Outbox, Priority, Sequenced, StoredCommand,
};
use caretwin_actors::host::clock::{Clock, SystemClock};
use caretwin_proto::frame::Codec;
use caretwin_proto::v1::{
    self, ClusterFrame, Compression, DeviceEvent, DeviceResume, EdgeFrame, ErrorCode, Hello,
    Reading, ReadingBatch, ReportedState, cluster_frame, device_event, edge_frame,
};
use futures::StreamExt as _;
use prost::Message as _;
use quinn::{Endpoint, SendStream};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, Notify, Semaphore, mpsc};

/// The outbox's urgency of a command from the cluster (unspecified: normal).
fn priority_of(p: i32) -> Priority {
    match v1::Priority::try_from(p) {
        Ok(v1::Priority::Low) => Priority::Low,
        Ok(v1::Priority::High) => Priority::High,
        Ok(v1::Priority::Safety) => Priority::Safety,
        _ => Priority::Normal,
    }
}

/// A command received from the cluster, for the device adapters.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingCommand {
    /// The command.
    pub command_id: String,
    /// The device.
    pub device: String,
    /// The remedy's name, or the kind of command (see `command_of`).
    pub name: String,
    /// Its arguments.
    pub args: BTreeMap<String, String>,
    /// When it expires, Unix ms.
    pub expires_at_ms: i64,
}

/// A command's payload as the device adapters take it: a name and its arguments. A remedy
/// is itself; firmware (`firmware_update`: version, url, sha256, size_bytes), an answer
/// (`answer_question`: question_id, option_id) and a configuration (`configure`: each
/// field with its value) are named by their kind.
fn command_of(kind: v1::command_payload::Kind) -> (String, BTreeMap<String, String>) {
    use v1::command_payload::Kind;
    let named = |name: &str, args: &[(&str, String)]| {
        let args = args.iter().map(|(k, v)| ((*k).to_owned(), v.clone()));
        (name.to_owned(), args.collect())
    };
    match kind {
        Kind::RemoteRemedy(r) => (r.name, r.args.into_iter().collect()),
        Kind::FirmwareUpdate(f) => named(
            "firmware_update",
            &[
                ("version", f.version),
                ("url", f.url),
                ("sha256", f.sha256),
                ("size_bytes", f.size_bytes.to_string()),
            ],
        ),
        Kind::AnswerQuestion(a) => named(
            "answer_question",
            &[("question_id", a.question_id), ("option_id", a.option_id)],
        ),
        Kind::Configuration(c) => {
            let args = c.entries.into_iter().map(|(field, entry)| {
                let value = match entry.value.and_then(|v| v.value) {
                    Some(v1::signal_value::Value::Text(t)) => t,
                    Some(v1::signal_value::Value::Number(n)) => n.to_string(),
                    Some(v1::signal_value::Value::Integer(i)) => i.to_string(),
                    Some(v1::signal_value::Value::Flag(b)) => b.to_string(),
                    None => String::new(),
                };
                (field, value)
            });
            ("configure".to_owned(), args.collect())
        }
    }
}

/// What the cluster sends down for the devices.
#[derive(Debug, Clone, PartialEq)]
pub enum Downlink {
    /// A command, stored durably at the edge before it was confirmed.
    Command(IncomingCommand),
    /// A device's complete desired state: (field, value, version). The adapter applies a
    /// field only if its version is newer than the one the device holds.
    Desired {
        /// The device.
        device: String,
        /// Every desired field.
        fields: Vec<(String, String, u64)>,
    },
}

/// Where and how to reach the cluster.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// The site (for logs and for its choice of node; the cluster reads the site from the
    /// certificate).
    pub site_id: String,
    /// The cluster nodes' sync addresses, `host:port` (at least one), resolved at every
    /// attempt.
    pub nodes: Vec<String>,
    /// The name on the cluster's certificates (every node's).
    pub server_name: String,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// Offer zstd compression of frames; used when the cluster agrees.
    pub compress: bool,
}

/// Counters of the client, for logs and tests.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// Sessions opened.
    pub sessions: AtomicU64,
    /// Items acknowledged by the cluster.
    pub acknowledged: AtomicU64,
    /// Device log frames sent.
    pub frames_sent: AtomicU64,
    /// Bytes of device log frames as written to the streams (after compression).
    pub bytes_sent: AtomicU64,
    /// Command cancels from the cluster handled (whatever their outcome).
    pub cancels: AtomicU64,
    /// Microseconds from sending a frame to reading its ack.
    ack_latency_us: std::sync::Mutex<Option<hdrhistogram::Histogram<u64>>>,
}

impl ClientStats {
    fn record_ack(&self, latency: Duration) {
        let mut h = self.ack_latency_us.lock().expect("stats lock");
        let h = h.get_or_insert_with(|| {
            hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
        });
        // Saturates rather than fails on an absurd value: a statistic must not stop a sync.
        h.saturating_record(latency.as_micros().min(u128::from(u64::MAX)) as u64);
    }

    /// Acknowledgement latency so far: (frames, p50, p99), or `None` before the first ack.
    pub fn ack_latency(&self) -> Option<(u64, Duration, Duration)> {
        let h = self.ack_latency_us.lock().expect("stats lock");
        h.as_ref().filter(|h| !h.is_empty()).map(|h| {
            (
                h.len(),
                Duration::from_micros(h.value_at_quantile(0.5)),
                Duration::from_micros(h.value_at_quantile(0.99)),
            )
        })
    }

    /// A copy of the acknowledgement latency histogram (µs), to merge several clients'.
    pub fn ack_histogram(&self) -> Option<hdrhistogram::Histogram<u64>> {
        self.ack_latency_us.lock().expect("stats lock").clone()
    }

    /// Forgets the latencies recorded so far (a benchmark's warm-up).
    pub fn reset_ack_latency(&self) {
        *self.ack_latency_us.lock().expect("stats lock") = None;
    }
}

/// The sync client.
pub struct SyncClient {
    settings: ClientSettings,
    /// One endpoint per address family the edge can dial (IPv4, and IPv6 when it has
    /// one).
    endpoints: Vec<Endpoint>,
    /// Where the addresses learned from the cluster are kept across restarts.
    known_nodes: Option<PathBuf>,
    outbox: Arc<Outbox>,
    /// Signalled when the outbox has new items to send.
    new_items: Arc<Notify>,
    commands: mpsc::Sender<Downlink>,
    stats: Arc<ClientStats>,
    instance: String,
    /// Signalled by the device adapters when a command reached its device (they record
    /// it with `Outbox::set_command_state` first); the session then tells the cluster.
    progress: Arc<Notify>,
    /// Device time.
    clock: Arc<dyn Clock>,
    /// When the client was made (monotonic).
    started: Instant,
}

/// Longest wait for a node to resolve and answer a connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait for the `Welcome` once connected: a node that takes the connection but
/// never answers (stuck, or still starting) must not hold the edge. Generous, since the
/// node reads every device's high-water mark before answering.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);
/// Items read from the outbox per device per round.
const PER_DEVICE: usize = 512;
/// Most data streams the edge opens, whatever the cluster allows.
const MAX_LANES: u32 = 16;
/// Most frames in flight per data stream, whatever the cluster allows.
const MAX_WINDOW: u32 = 64;

/// What the session needs to know of the cluster's `Welcome`.
struct Agreed {
    limits: v1::SessionLimits,
    compression: Compression,
}

impl Agreed {
    fn max_frame(&self) -> usize {
        (self.limits.max_frame_bytes as usize).clamp(4096, 64 << 20)
    }
    fn codec(&self) -> Codec {
        Codec::new(self.compression, self.max_frame())
    }
}

/// A connection that got its `Welcome`: the control stream and the cluster's answer.
struct Opening {
    control: SendStream,
    reader: FrameReader,
    welcome: v1::Welcome,
    /// Devices the `Hello` listed.
    devices: usize,
}

/// A frame in flight on a data stream: when it went, and where each of its devices
/// started, so a frame refused whole is sent again from there.
struct InFlight {
    at: Instant,
    starts: Vec<(String, u64)>,
}

impl SyncClient {
    /// A client that sends `outbox`'s items and passes commands to `commands`.
    pub fn new(
        settings: ClientSettings,
        endpoint: Endpoint,
        outbox: Arc<Outbox>,
        new_items: Arc<Notify>,
        commands: mpsc::Sender<Downlink>,
    ) -> Self {
        let instance = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        Self {
            settings,
            endpoints: vec![endpoint],
            known_nodes: None,
            outbox,
            new_items,
            commands,
            stats: Arc::new(ClientStats::default()),
            instance,
            progress: Arc::new(Notify::new()),
            clock: Arc::new(SystemClock),
            started: Instant::now(),
        }
    }

    /// Reads device time (command states, command expiry) from `clock` instead of the
    /// machine's; heartbeats and backoff stay in real time.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Also dials with `endpoint`: one of the other address family than the first (an
    /// IPv6 one beside an IPv4 one), used for the addresses only it can reach.
    pub fn with_endpoint(mut self, endpoint: Endpoint) -> Self {
        self.endpoints.push(endpoint);
        self
    }

    /// Keeps the node addresses the cluster announces in `path` (one per line), and
    /// starts with those found there: an edge configured with one node that is down
    /// when the edge restarts still reaches the others.
    pub fn with_known_nodes(mut self, path: PathBuf) -> Self {
        self.known_nodes = Some(path);
        self
    }

    /// What the device adapters signal after recording that a command reached its device
    /// (`Outbox::set_command_state(.., DeliveredToDevice)`), so the cluster hears of it.
    pub fn command_progress(&self) -> Arc<Notify> {
        self.progress.clone()
    }

    /// The client's counters.
    pub fn stats(&self) -> Arc<ClientStats> {
        self.stats.clone()
    }

    /// Keeps a session with the cluster until `shutdown` resolves, reconnecting with
    /// exponential backoff after every failure.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        // Commands stored before a restart but never handed to their device (the process
        // stopped in between) go to the adapters now; the cluster will not send them again.
        match self.outbox.commands_pending().await {
            Ok(pending) => {
                for c in pending {
                    if c.state == CommandState::SentToEdge
                        && let Err(e) = self.deliver(&c).await
                    {
                        tracing::warn!(command = %c.command_id, error = %e, "stored command not handed over");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read stored commands"),
        }
        // Jitter differs per edge process, even for edges started at the same instant.
        let seed = std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            &self.instance,
        );
        let backoff = Backoff {
            max: self.settings.max_backoff,
            ..Backoff::default()
        };
        let mut dialer = Dialer::new(
            &self.settings.site_id,
            self.settings.nodes.clone(),
            backoff,
            seed,
        );
        if let Some(path) = &self.known_nodes {
            let known = read_known_nodes(path);
            if dialer.learn(&known) {
                tracing::info!(nodes = ?dialer.known(), "cluster nodes known from the last run");
            }
        }
        let dialer = std::sync::Mutex::new(dialer);
        let mut dial = dialer.lock().expect("dialer lock").first();
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(dial.wait) => {}
            }
            let outcome = tokio::select! {
                () = &mut shutdown => return,
                r = self.session(&dial.addr, &dialer) => r,
            };
            let last = std::mem::take(&mut dial.addr);
            dial = dialer.lock().expect("dialer lock").ended(self.uptime_ms());
            match outcome {
                Ok(()) => {
                    tracing::info!(site = %self.settings.site_id, addr = %last, next = %dial.addr, retry_in = ?dial.wait, "sync session closed by the cluster");
                }
                Err(e) => {
                    tracing::warn!(site = %self.settings.site_id, addr = %last, error = %e, next = %dial.addr, retry_in = ?dial.wait, "sync session ended");
                }
            }
        }
    }

    /// Monotonic milliseconds since the client was made: the dialer's clock (a session's
    /// length must not jump with the wall clock).
    fn uptime_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Resolves `addr` and connects to it with the endpoint of its address family.
    async fn connect(&self, addr: &str) -> Result<quinn::Connection> {
        let mut resolved: Vec<SocketAddr> = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| Error::io(format!("cannot resolve {addr}"), e))?
            .collect();
        // A name with both kinds of address is dialled over IPv4: a node listens on IPv4 by
        // default (`0.0.0.0:7400`), and an address nobody answers on costs a whole timeout.
        resolved.sort_by_key(SocketAddr::is_ipv6);
        let family = |e: &Endpoint| e.local_addr().map(|l| l.is_ipv6()).ok();
        let (endpoint, target) = resolved
            .iter()
            .find_map(|r| {
                let e = self
                    .endpoints
                    .iter()
                    .find(|e| family(e) == Some(r.is_ipv6()))?;
                Some((e, *r))
            })
            .ok_or_else(|| Error::Unreachable {
                addr: addr.to_owned(),
                reason: format!(
                    "it resolves to {resolved:?}, no address family this edge can dial"
                ),
            })?;
        Ok(connect(endpoint, target, &self.settings.server_name).await?)
    }

    async fn session(&self, addr: &str, dialer: &std::sync::Mutex<Dialer>) -> Result<()> {
        // A node that is not listening never answers; do not wait out QUIC's idle timer.
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, self.connect(addr))
            .await
            .map_err(|_| {
                Error::Silent(format!("no answer from {addr} in {CONNECT_TIMEOUT:?}"))
            })??;
        let opening = tokio::time::timeout(WELCOME_TIMEOUT, self.hello(&conn))
            .await
            .map_err(|_| {
                Error::Silent(format!("no Welcome from {addr} in {WELCOME_TIMEOUT:?}"))
            })??;
        let learned = {
            let mut d = dialer.lock().expect("dialer lock");
            d.opened(self.uptime_ms());
            d.learn(&opening.welcome.sync_addrs)
                .then(|| d.learned().to_vec())
        };
        if let Some(learned) = learned {
            tracing::info!(nodes = ?learned, "cluster nodes learned");
            if let Some(path) = &self.known_nodes
                && let Err(e) = write_known_nodes(path, &learned)
            {
                // Only a hint for the next start: the session carries on.
                tracing::warn!(path = %path.display(), error = %e, "cluster nodes not kept");
            }
        }
        self.open_session(addr, &conn, opening).await
    }

    /// Opens the control stream, says `Hello` and reads the cluster's answer.
    async fn hello(&self, conn: &quinn::Connection) -> Result<Opening> {
        let (mut csend, crecv) = conn.open_bi().await.map_err(TransportError::from)?;
        let devices = self.outbox.devices().await?;
        let hello = Hello {
            protocol_version: v1::SyncProtocolVersion::V1 as u32,
            site_id: self.settings.site_id.clone(),
            edge_software_version: env!("CARGO_PKG_VERSION").into(),
            edge_instance_id: self.instance.clone(),
            devices: devices
                .iter()
                .map(|d| DeviceResume {
                    device_id: d.device.clone(),
                    last_seq: d.last_seq,
                })
                .collect(),
            last_command_position: self.outbox.last_command_position().await?.0,
            compression: if self.settings.compress {
                vec![Compression::Zstd as i32]
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        // Hello is never compressed: nothing is agreed yet.
        send_frame(
            &mut csend,
            &EdgeFrame {
                body: Some(edge_frame::Body::Hello(hello)),
            },
        )
        .await?;
        let mut creader = FrameReader::new(crecv, 1 << 20);
        let welcome = match creader.next::<ClusterFrame>().await? {
            Some(ClusterFrame {
                body: Some(cluster_frame::Body::Welcome(w)),
            }) => w,
            Some(ClusterFrame {
                body: Some(cluster_frame::Body::Error(e)),
            }) => return Err(refused(&e)),
            other => return Err(Error::Protocol(format!("expected Welcome, got {other:?}"))),
        };
        Ok(Opening {
            control: csend,
            reader: creader,
            welcome,
            devices: devices.len(),
        })
    }

    /// Runs the session the `Welcome` opened, until it fails.
    async fn open_session(
        &self,
        addr: &str,
        conn: &quinn::Connection,
        opening: Opening,
    ) -> Result<()> {
        let Opening {
            control: csend,
            reader: creader,
            welcome,
            devices,
        } = opening;
        let compression = Compression::try_from(welcome.compression).unwrap_or(Compression::None);
        if compression != Compression::None && !self.settings.compress {
            return Err(Error::Protocol(format!(
                "the cluster chose {compression:?}, which this edge did not offer"
            )));
        }
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        let agreed = Agreed {
            limits: welcome.limits.unwrap_or_default(),
            compression,
        };
        // What the cluster already has: trim it, and send from just above it.
        let mut sent: HashMap<String, u64> = HashMap::new();
        for w in &welcome.watermarks {
            self.outbox
                .acknowledge(&w.device_id, w.persisted_seq)
                .await?;
            sent.insert(w.device_id.clone(), w.persisted_seq);
        }
        tracing::info!(addr = %addr, node = %welcome.cluster_node_id, site = %welcome.site_id, session = %welcome.session_id, devices, compression = ?compression, "sync session open");
        let control = Mutex::new((csend, agreed.codec()));
        let heard = AtomicU64::new(now_ms());
        let every_ms = agreed.limits.heartbeat_interval_ms.max(100) as u64;
        tokio::select! {
            r = self.control(&control, creader, &agreed, &heard) => r,
            r = self.heartbeats(&control, every_ms, &heard) => r,
            r = self.data(conn, sent, &agreed, &heard) => r,
        }
    }

    /// Receives commands: stores each durably, confirms it, hands it to the devices.
    async fn control(
        &self,
        control: &Mutex<(SendStream, Codec)>,
        mut reader: FrameReader,
        agreed: &Agreed,
        heard: &AtomicU64,
    ) -> Result<()> {
        let mut codec = agreed.codec();
        // The latest status of every unfinished command, once per session (the protocol:
        // after every Welcome), then each command that reaches its device.
        let mut reported: HashMap<String, CommandState> = HashMap::new();
        self.report_progress(control, &mut reported).await?;
        loop {
            let frame = tokio::select! {
                frame = reader.next::<ClusterFrame>() => frame?,
                () = self.progress.notified() => {
                    self.report_progress(control, &mut reported).await?;
                    continue;
                }
            };
            let Some(frame) = frame else { break };
            let frame = codec.expand(frame)?;
            heard.store(now_ms(), Ordering::Relaxed);
            match frame.body {
                Some(cluster_frame::Body::Command(c)) => {
                    let payload = c.payload.clone().unwrap_or_default();
                    if payload.kind.is_none() {
                        continue;
                    }
                    let stored = StoredCommand {
                        command_id: c.command_id.clone(),
                        position: c.position,
                        device: c.device_id.clone(),
                        priority: priority_of(c.priority),
                        issued_at_ms: u64::try_from(c.issued_at_ms).unwrap_or(0),
                        expires_at_ms: u64::try_from(c.expires_at_ms).unwrap_or(0),
                        payload: payload.encode_to_vec(),
                        state: CommandState::SentToEdge,
                    };
                    // Stored durably before it is confirmed; confirmed even when already
                    // known, since the cluster resends until it hears back.
                    let new = self.outbox.store_command(stored.clone()).await?;
                    let status = EdgeFrame {
                        body: Some(edge_frame::Body::CommandStatus(v1::CommandStatus {
                            command_id: c.command_id.clone(),
                            position: c.position,
                            state: v1::CommandState::SentToEdge as i32,
                            at_ms: self.clock.now_ms() as i64,
                            detail: String::new(),
                        })),
                    };
                    send_control(control, &status).await?;
                    reported.insert(c.command_id.clone(), CommandState::SentToEdge);
                    if new && !self.deliver(&stored).await? {
                        // The adapters went away: the edge is shutting down.
                        return Ok(());
                    }
                }
                Some(cluster_frame::Body::CancelCommand(x)) => {
                    // Resent by the cluster after every reconnect until the command ends:
                    // every outcome here is final and a repeat changes nothing.
                    let now = self.clock.now_ms();
                    let detail = if x.reason.is_empty() {
                        "cancelled by the cluster".to_owned()
                    } else {
                        format!("cancelled: {}", x.reason)
                    };
                    let outcome = match self
                        .outbox
                        .cancel_command(&x.command_id, &detail, now)
                        .await
                    {
                        Ok(outcome) => outcome,
                        // An id no command could have: nothing to cancel, the session goes on.
                        Err(crate::outbox::OutboxError::InvalidArgument(why)) => {
                            tracing::warn!(command = %x.command_id, error = %why, "cancel ignored");
                            CancelOutcome::Unknown
                        }
                        Err(e) => return Err(e.into()),
                    };
                    match outcome {
                        CancelOutcome::Cancelled => {
                            self.new_items.notify_waiters();
                            tracing::info!(command = %x.command_id, "command cancelled before delivery");
                        }
                        CancelOutcome::TooLate(state) => {
                            tracing::info!(command = %x.command_id, state = ?state, "cancel came too late, the command keeps its course");
                        }
                        CancelOutcome::Unknown => {
                            tracing::debug!(command = %x.command_id, "cancel for a command not held");
                        }
                    }
                    self.stats.cancels.fetch_add(1, Ordering::Relaxed);
                }
                Some(cluster_frame::Body::DesiredState(d)) => {
                    let fields = d
                        .fields
                        .into_iter()
                        .map(|(f, v)| {
                            let text = match v.value.and_then(|v| v.value) {
                                Some(v1::signal_value::Value::Text(t)) => t,
                                Some(v1::signal_value::Value::Number(n)) => n.to_string(),
                                Some(v1::signal_value::Value::Integer(i)) => i.to_string(),
                                Some(v1::signal_value::Value::Flag(b)) => b.to_string(),
                                None => String::new(),
                            };
                            (f, text, v.version)
                        })
                        .collect();
                    let down = Downlink::Desired {
                        device: d.device_id,
                        fields,
                    };
                    if self.commands.send(down).await.is_err() {
                        return Ok(());
                    }
                }
                Some(cluster_frame::Body::Error(e)) => return Err(refused(&e)),
                _ => {}
            }
        }
        Ok(())
    }

    /// Hands a stored command to the device adapters, or, when its time to live has run
    /// out, ends it as expired with a result in the device's log (so the cluster learns
    /// it exactly once). Returns false when the adapters are gone.
    async fn deliver(&self, c: &StoredCommand) -> Result<bool> {
        let now = self.clock.now_ms();
        if c.expires_at_ms != 0 && c.expires_at_ms <= now {
            let result = crate::outbox::Item::new(
                c.device.clone(),
                now,
                ItemKind::CommandResult {
                    command_id: c.command_id.clone(),
                    succeeded: false,
                    expired: true,
                    cancelled: false,
                    detail: format!(
                        "expired at {} before it reached the device",
                        c.expires_at_ms
                    ),
                },
            );
            match self.outbox.accept(vec![result]).await {
                Ok(_) | Err(crate::outbox::OutboxError::ResultAlreadyRecorded { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            self.new_items.notify_waiters();
            tracing::info!(command = %c.command_id, device = %c.device, "command expired before delivery");
            return Ok(true);
        }
        let payload = v1::CommandPayload::decode(c.payload.as_slice()).unwrap_or_default();
        let Some((name, args)) = payload.kind.map(command_of) else {
            return Ok(true);
        };
        let cmd = IncomingCommand {
            command_id: c.command_id.clone(),
            device: c.device.clone(),
            name,
            args,
            expires_at_ms: c.expires_at_ms as i64,
        };
        Ok(self.commands.send(Downlink::Command(cmd)).await.is_ok())
    }

    /// Tells the cluster where each unfinished command stands, if it has not heard it in
    /// this session yet (SENT_TO_EDGE, DELIVERED_TO_DEVICE; outcomes travel in the device
    /// log).
    async fn report_progress(
        &self,
        control: &Mutex<(SendStream, Codec)>,
        reported: &mut HashMap<String, CommandState>,
    ) -> Result<()> {
        for c in self.outbox.commands_pending().await? {
            let wire = match c.state {
                CommandState::SentToEdge => v1::CommandState::SentToEdge,
                CommandState::DeliveredToDevice => v1::CommandState::DeliveredToDevice,
                _ => continue,
            };
            if reported.get(&c.command_id) == Some(&c.state) {
                continue;
            }
            let status = EdgeFrame {
                body: Some(edge_frame::Body::CommandStatus(v1::CommandStatus {
                    command_id: c.command_id.clone(),
                    position: c.position,
                    state: wire as i32,
                    at_ms: self.clock.now_ms() as i64,
                    detail: String::new(),
                })),
            };
            send_control(control, &status).await?;
            reported.insert(c.command_id, c.state);
        }
        Ok(())
    }

    /// Sends a heartbeat every interval, and ends the session when the cluster has been
    /// silent for three (the protocol's liveness rule: a restarted cluster cannot reset the
    /// old connection, and QUIC's idle timer is much longer).
    async fn heartbeats(
        &self,
        control: &Mutex<(SendStream, Codec)>,
        every_ms: u64,
        heard: &AtomicU64,
    ) -> Result<()> {
        let mut tick = tokio::time::interval(Duration::from_millis(every_ms));
        loop {
            tick.tick().await;
            let silent = now_ms().saturating_sub(heard.load(Ordering::Relaxed));
            if silent > 3 * every_ms {
                return Err(Error::Silent(format!("no frame for {silent} ms")));
            }
            let stats = self.outbox.stats();
            let hb = EdgeFrame {
                body: Some(edge_frame::Body::Heartbeat(v1::Heartbeat {
                    sent_at_ms: now_ms() as i64,
                    backlog_items: stats.backlog_items,
                    outbox_bytes_used: stats.bytes_used,
                    outbox_bytes_limit: stats.bytes_limit,
                    ..Default::default()
                })),
            };
            send_control(control, &hb).await?;
        }
    }

    /// Sends the outbox above `sent` on the session's data streams ("lanes"), each device
    /// always on the same lane so the cluster sees its log in order, and trims the outbox
    /// by the watermarks of the acks. Every lane drives itself: lanes never wait for each
    /// other.
    async fn data(
        &self,
        conn: &quinn::Connection,
        sent: HashMap<String, u64>,
        agreed: &Agreed,
        heard: &AtomicU64,
    ) -> Result<()> {
        let lanes = agreed.limits.max_data_streams.clamp(1, MAX_LANES) as usize;
        let mut per_lane: Vec<HashMap<String, u64>> = (0..lanes).map(|_| HashMap::new()).collect();
        for (device, at) in sent {
            per_lane[lane_of(&device, lanes)].insert(device, at);
        }
        let mut running = futures::stream::FuturesUnordered::new();
        for (lane, sent) in per_lane.into_iter().enumerate() {
            let (send, recv) = conn.open_bi().await.map_err(TransportError::from)?;
            let lane = Lane {
                index: lane,
                of: lanes,
                window: agreed.limits.max_in_flight_frames.clamp(1, MAX_WINDOW) as usize,
                max_batch: agreed.limits.max_batch_readings.max(1) as usize,
            };
            running.push(self.lane(lane, send, recv, sent, agreed, heard));
        }
        // A lane only ends with an error: the session ends with it.
        match running.next().await {
            Some(r) => r,
            None => Ok(()),
        }
    }

    /// One data stream. Its writer waits until the window has room, then builds as many
    /// frames as there are free slots from everything pending for its devices, and sends
    /// them; its reader handles the acks in order and opens the window again.
    ///
    /// Back-pressure end to end: at most `max_in_flight_frames` frames per lane wait for
    /// an ack, and nothing is read from the outbox while the window is full, so a slow
    /// cluster slows the sending and the outbox on disk (within its budget) absorbs the
    /// difference; nothing in memory grows. Under load a frame is built only when a slot
    /// opens, from everything accepted meanwhile, so frames grow with the backlog (as
    /// Nagle's algorithm does for TCP), while an idle lane sends at once.
    async fn lane(
        &self,
        lane: Lane,
        mut send: SendStream,
        recv: quinn::RecvStream,
        mut sent: HashMap<String, u64>,
        agreed: &Agreed,
        heard: &AtomicU64,
    ) -> Result<()> {
        let permits = Semaphore::new(lane.window);
        let in_flight: std::sync::Mutex<VecDeque<InFlight>> =
            std::sync::Mutex::new(VecDeque::with_capacity(lane.window));
        // Devices to send again from a position, on a frame refused whole or a gap.
        let rewinds: std::sync::Mutex<HashMap<String, u64>> = Default::default();
        let rewound = Notify::new();
        let acked = Notify::new();
        let write = async {
            let mut codec = agreed.codec();
            let mut batch_id = lane.index as u64;
            let mut round = 0usize;
            loop {
                // Register before looking, so items accepted meanwhile wake us.
                let notified = self.new_items.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let Ok(first) = permits.acquire().await else {
                    return Err::<(), _>(Error::Protocol("lane closed".into()));
                };
                first.forget();
                let mut slots = 1;
                while slots < lane.window {
                    match permits.try_acquire() {
                        Ok(p) => {
                            p.forget();
                            slots += 1;
                        }
                        Err(_) => break,
                    }
                }
                for (device, from) in rewinds.lock().expect("rewinds lock").drain() {
                    let at = sent.entry(device).or_insert(from);
                    *at = (*at).min(from);
                }
                // Nagle's rule: while frames are in flight, a frame goes out only when it
                // is full; the others wait for the next ack, gathering what arrives.
                let busy = !in_flight.lock().expect("in-flight lock").is_empty();
                let frames = self
                    .next_frames(&mut sent, &lane, slots, busy, &mut batch_id, round)
                    .await?;
                round = round.wrapping_add(1);
                permits.add_permits(slots - frames.len());
                if frames.is_empty() {
                    tokio::select! {
                        () = &mut notified, if !busy => {}
                        () = acked.notified(), if busy => {}
                        () = rewound.notified() => {}
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
                for frame in &frames {
                    let bytes = codec.encode(frame);
                    in_flight
                        .lock()
                        .expect("in-flight lock")
                        .push_back(InFlight {
                            at: Instant::now(),
                            starts: starts_of(frame),
                        });
                    send.write_all(&bytes).await.map_err(TransportError::from)?;
                    self.stats.frames_sent.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .bytes_sent
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                }
            }
        };
        let read = async {
            let mut codec = agreed.codec();
            let mut reader = FrameReader::new(recv, agreed.max_frame());
            loop {
                let Some(reply) = reader.next::<ClusterFrame>().await? else {
                    return Err::<(), _>(Error::Protocol("cluster closed the data stream".into()));
                };
                let reply = codec.expand(reply)?;
                // Acks come in the order the frames went out.
                let Some(frame) = in_flight.lock().expect("in-flight lock").pop_front() else {
                    return Err(Error::Protocol("an ack for no frame".into()));
                };
                self.stats.record_ack(frame.at.elapsed());
                // An ack is as good a sign of life as a heartbeat ack.
                heard.store(now_ms(), Ordering::Relaxed);
                match reply.body {
                    Some(cluster_frame::Body::Ack(ack)) => {
                        if self.on_ack(ack, frame, &rewinds).await? {
                            rewound.notify_one();
                        }
                    }
                    Some(cluster_frame::Body::Error(e)) => return Err(refused(&e)),
                    other => {
                        return Err(Error::Protocol(format!(
                            "unexpected frame on a data stream: {other:?}"
                        )));
                    }
                }
                permits.add_permits(1);
                acked.notify_one();
            }
        };
        tokio::try_join!(write, read).map(|_| ())
    }

    /// Trims the outbox by an ack's watermarks, and arranges resending what it refused;
    /// returns whether something must be sent again.
    async fn on_ack(
        &self,
        ack: v1::Ack,
        frame: InFlight,
        rewinds: &std::sync::Mutex<HashMap<String, u64>>,
    ) -> Result<bool> {
        // All of an ack's trims at once: the outbox writes them with one fsync.
        let trims = ack
            .watermarks
            .iter()
            .map(|w| self.outbox.acknowledge(&w.device_id, w.persisted_seq));
        for trimmed in futures::future::join_all(trims).await {
            self.stats
                .acknowledged
                .fetch_add(trimmed?, Ordering::Relaxed);
        }
        let mut again = false;
        for r in &ack.rejections {
            let code = ErrorCode::try_from(r.code).unwrap_or(ErrorCode::Unspecified);
            if code == ErrorCode::SequenceGap
                && let (Some(d), Some(seq)) = (&r.device_id, r.seq)
            {
                // Resend from where the cluster stands.
                let mut rw = rewinds.lock().expect("rewinds lock");
                let at = rw.entry(d.clone()).or_insert(u64::MAX);
                *at = (*at).min(seq.saturating_sub(1));
                again = true;
            } else if code != ErrorCode::Duplicate {
                tracing::warn!(device = ?r.device_id, seq = ?r.seq, code = ?code, message = %r.message, "item refused by the cluster");
            }
        }
        if let Some(e) = ack.frame_error {
            // Nothing of the frame was kept: send its devices again from where it started,
            // after the wait the cluster asked for (this lane's acks wait meanwhile).
            let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified);
            tracing::warn!(code = ?code, message = %e.message, "frame refused; resending");
            {
                let mut rw = rewinds.lock().expect("rewinds lock");
                for (device, first) in frame.starts {
                    let at = rw.entry(device).or_insert(u64::MAX);
                    *at = (*at).min(first.saturating_sub(1));
                }
            }
            let wait = e.retry_after_ms.unwrap_or(500).clamp(10, 10_000) as u64;
            tokio::time::sleep(Duration::from_millis(wait)).await;
            again = true;
        }
        Ok(again)
    }

    /// Up to `slots` frames of the lane's pending items, every device's in sequence
    /// order; none when `only_full` and less than a full batch is pending. Devices are
    /// visited from a different one each round, so a long backlog of the first devices
    /// does not starve the others.
    async fn next_frames(
        &self,
        sent: &mut HashMap<String, u64>,
        lane: &Lane,
        slots: usize,
        only_full: bool,
        batch_id: &mut u64,
        round: usize,
    ) -> Result<Vec<EdgeFrame>> {
        let mut frames: Vec<EdgeFrame> = Vec::new();
        let mut readings: Vec<Reading> = Vec::new();
        let next_id = |id: &mut u64| {
            let this = *id;
            *id += lane.of as u64;
            this
        };
        let mut devices: Vec<_> = self
            .outbox
            .devices()
            .await?
            .into_iter()
            .filter(|d| lane_of(&d.device, lane.of) == lane.index)
            .collect();
        if only_full {
            let pending: u64 = devices
                .iter()
                .map(|d| {
                    let after = sent
                        .get(&d.device)
                        .copied()
                        .unwrap_or(0)
                        .max(d.first_pending_seq.saturating_sub(1));
                    d.last_seq.saturating_sub(after)
                })
                .sum();
            if pending < lane.max_batch as u64 {
                return Ok(Vec::new());
            }
        }
        if !devices.is_empty() {
            let n = devices.len();
            devices.rotate_left(round % n);
        }
        'devices: for d in devices {
            let after = *sent.get(&d.device).unwrap_or(&0);
            let after = after.max(d.first_pending_seq.saturating_sub(1));
            if d.last_seq <= after {
                continue;
            }
            let items = self
                .outbox
                .pending(&d.device, after, PER_DEVICE.min(lane.max_batch))
                .await?;
            for item in items {
                if frames.len() >= slots {
                    break 'devices;
                }
                sent.insert(d.device.clone(), item.seq);
                debug_assert!(item.seq > after);
                match to_frame(&d.device, item) {
                    Piece::Reading(r) => {
                        readings.push(r);
                        if readings.len() >= lane.max_batch {
                            let id = next_id(batch_id);
                            frames.push(batch_frame(id, std::mem::take(&mut readings)));
                        }
                    }
                    Piece::Frame(f) => {
                        // Keep the device's order: its readings so far go first.
                        if !readings.is_empty() {
                            let id = next_id(batch_id);
                            frames.push(batch_frame(id, std::mem::take(&mut readings)));
                            if frames.len() >= slots {
                                // No slot left for the event: send it next time.
                                sent.insert(d.device.clone(), f_seq(&f).saturating_sub(1));
                                break 'devices;
                            }
                        }
                        frames.push(f);
                    }
                }
            }
        }
        if !readings.is_empty() && frames.len() < slots {
            let id = next_id(batch_id);
            frames.push(batch_frame(id, readings));
        } else if !readings.is_empty() {
            // No slot left: these readings go next time, from the first of each device.
            for (device, first) in first_seqs(&readings) {
                let at = sent.entry(device).or_insert(first);
                *at = (*at).min(first.saturating_sub(1));
            }
        }
        Ok(frames)
    }
}

/// A data stream's place among the session's.
struct Lane {
    /// Which lane.
    index: usize,
    /// How many lanes.
    of: usize,
    /// Frames in flight at most.
    window: usize,
    /// Readings per batch at most.
    max_batch: usize,
}

/// The sequence number of a device log frame that is not a batch.
fn f_seq(f: &EdgeFrame) -> u64 {
    match &f.body {
        Some(edge_frame::Body::Event(e)) => e.seq,
        Some(edge_frame::Body::ReportedState(r)) => r.seq,
        _ => 0,
    }
}

/// Each device of `readings` with its first sequence number there.
fn first_seqs(readings: &[Reading]) -> Vec<(String, u64)> {
    let mut firsts: Vec<(String, u64)> = Vec::new();
    for r in readings {
        if !firsts.iter().any(|(d, _)| *d == r.device_id) {
            firsts.push((r.device_id.clone(), r.seq));
        }
    }
    firsts
}

/// The data stream a device's items travel on, for the whole session.
fn lane_of(device: &str, lanes: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    device.hash(&mut h);
    (h.finish() % lanes as u64) as usize
}

/// Each device of a device log frame with the first sequence number it has there.
fn starts_of(frame: &EdgeFrame) -> Vec<(String, u64)> {
    match &frame.body {
        Some(edge_frame::Body::Batch(b)) => first_seqs(&b.readings),
        Some(edge_frame::Body::Event(e)) => vec![(e.device_id.clone(), e.seq)],
        Some(edge_frame::Body::ReportedState(r)) => vec![(r.device_id.clone(), r.seq)],
        _ => Vec::new(),
    }
}

async fn send_control(control: &Mutex<(SendStream, Codec)>, frame: &EdgeFrame) -> Result<()> {
    let mut guard = control.lock().await;
    let (send, codec) = &mut *guard;
    let bytes = codec.encode(frame);
    send.write_all(&bytes).await.map_err(TransportError::from)?;
    Ok(())
}

fn refused(e: &v1::SyncError) -> Error {
    Error::Refused {
        code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
        message: e.message.clone(),
    }
}

enum Piece {
    Reading(Reading),
    Frame(EdgeFrame),
}

fn batch_frame(id: u64, readings: Vec<Reading>) -> EdgeFrame {
    EdgeFrame {
        body: Some(edge_frame::Body::Batch(ReadingBatch {
            batch_id: id,
            readings,
        })),
    }
}

fn to_frame(device: &str, s: Sequenced) -> Piece {
    let item = s.item;
    let seq = s.seq;
    let ts = item.ts_ms as i64;
    let event = |kind| {
        Piece::Frame(EdgeFrame {
            body: Some(edge_frame::Body::Event(DeviceEvent {
                device_id: device.to_owned(),
                seq,
                device_time_ms: ts,
                kind: Some(kind),
            })),
        })
    };
    match item.kind {
        ItemKind::Reading { signal, value } => Piece::Reading(Reading {
            device_id: device.to_owned(),
            signal,
            value,
            device_time_ms: ts,
            seq,
            unit: None,
        }),
        ItemKind::Alarm { kind, local_action } => event(device_event::Kind::Alarm(v1::Alarm {
            alarm_id: format!("{device}/{seq}"),
            kind: alarm_kind(&kind) as i32,
            local_action_taken: local_action.unwrap_or_default(),
            ..Default::default()
        })),
        ItemKind::Diagnostic { code, text } => {
            event(device_event::Kind::Diagnostic(v1::DiagnosticReport {
                code,
                text,
                ..Default::default()
            }))
        }
        ItemKind::Question { question_id } => {
            event(device_event::Kind::Question(v1::ProductQuestion {
                question_id,
                ..Default::default()
            }))
        }
        ItemKind::CommandResult {
            command_id,
            succeeded,
            expired,
            cancelled,
            detail,
        } => event(device_event::Kind::CommandResult(v1::CommandResult {
            command_id,
            outcome: match (succeeded, expired, cancelled) {
                (true, _, _) => v1::CommandOutcome::Succeeded,
                (false, true, _) => v1::CommandOutcome::Expired,
                (false, false, true) => v1::CommandOutcome::Cancelled,
                (false, false, false) => v1::CommandOutcome::Failed,
            } as i32,
            detail,
            finished_at_ms: ts,
        })),
        ItemKind::Reported { field, value } => Piece::Frame(EdgeFrame {
            body: Some(edge_frame::Body::ReportedState(ReportedState {
                device_id: device.to_owned(),
                seq,
                device_time_ms: ts,
                fields: [(
                    field,
                    v1::ReportedField {
                        value: Some(v1::SignalValue {
                            value: Some(match value {
                                FieldValue::Number(n) => v1::signal_value::Value::Number(n),
                                FieldValue::Integer(i) => v1::signal_value::Value::Integer(i),
                                FieldValue::Flag(b) => v1::signal_value::Value::Flag(b),
                                FieldValue::Text(t) => v1::signal_value::Value::Text(t),
                            }),
                        }),
                        applied_version: None,
                    },
                )]
                .into_iter()
                .collect(),
            })),
        }),
    }
}

fn alarm_kind(kind: &str) -> v1::AlarmKind {
    v1::AlarmKind::from_str_name(&format!("ALARM_KIND_{}", kind.to_ascii_uppercase()))
        .unwrap_or(v1::AlarmKind::Other)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The node addresses kept in `path` by an earlier run; none when there is no such file
/// or it cannot be read (it is only a hint: the configured addresses always work).
fn read_known_nodes(path: &Path) -> Vec<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cluster nodes from the last run unreadable");
            Vec::new()
        }
    }
}

/// Keeps `addrs` in `path`, one per line, replacing the file whole (written beside it,
/// then renamed), so a crash leaves the old list or the new one, never half of one.
fn write_known_nodes(path: &Path, addrs: &[String]) -> std::io::Result<()> {
    let mut text =
        String::from("# cluster nodes' sync addresses, as the cluster last announced them\n");
    for a in addrs {
        text.push_str(a);
        text.push('\n');
    }
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_nodes_survive_in_their_file_and_a_missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster-nodes");
        assert!(read_known_nodes(&path).is_empty());
        let nodes = vec!["10.0.0.1:7400".to_owned(), "n2.example:7400".to_owned()];
        write_known_nodes(&path, &nodes).unwrap();
        assert_eq!(read_known_nodes(&path), nodes);
        // Replaced whole, nothing left beside it.
        write_known_nodes(&path, &nodes[1..]).unwrap();
        assert_eq!(read_known_nodes(&path), nodes[1..]);
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 1);
        // A garbled line is the dialer's to refuse (`Dialer::learn`), not a failure here.
        std::fs::write(&path, "10.0.0.1:7400\nnot an address\n").unwrap();
        assert_eq!(read_known_nodes(&path).len(), 2);
    }
}
