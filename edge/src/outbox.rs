//! The edge's durable outbox: the device log of every device of the site, on disk.
//!
//! A device adapter hands items (readings, alarms, diagnostics, questions, command
//! results, reported state) to [`Outbox::accept`]. The outbox gives each item the next
//! number of its device's log (`seq`, from 1 without gaps, surviving restarts) and answers
//! only once the item is on disk: an accepted item survives any crash of the edge. The
//! sync client reads what is pending ([`Outbox::devices`], [`Outbox::pending`]), sends it,
//! and trims by the cluster's watermarks ([`Outbox::acknowledge`]). Nothing else ever
//! deletes an item.
//!
//! # Group commit
//! Every mutation goes through a bounded queue to one writer thread. The writer takes
//! whatever has queued up (at most `max_group` requests), checks and applies each request
//! in order against the database plus the group's earlier writes, writes the whole group
//! as one fjall batch with one fsync, and only then answers everyone in it. A request that
//! is refused leaves no trace in the group. One thread assigning every `seq` is what keeps
//! each device log contiguous under concurrent callers. An fsync failure poisons the
//! outbox: every later call fails until the edge restarts, since the state on disk is then
//! unknown.
//!
//! # Disk budget
//! Each item costs its encoded key and value plus [`ITEM_OVERHEAD_BYTES`] (an estimate of
//! the store's own per-entry cost; journals and not-yet-compacted tables come on top). A
//! call to `accept` is judged by its most urgent item:
//! - [`Priority::Safety`] (alarms): always accepted, even past the limit;
//! - [`Priority::High`] (command results, product questions): accepted while the bytes
//!   used stay within the limit plus a 10 % reserve;
//! - [`Priority::Normal`] (readings, reported state, diagnostics): accepted while the bytes
//!   used stay within the limit, otherwise refused with [`OutboxError::Full`], which the
//!   adapter turns into a signal to the device (HTTP 507, an MQTT reason code).
//!
//! A call is atomic, so readings that arrive in the same call as an alarm are accepted with
//! it (they are usually its context); splitting the call would break atomicity and
//! refusing it would drop the alarm. Accepted items are never deleted to make room.
//!
//! # On-disk layout (fjall keyspaces)
//! - `items`: len(device) (u8) ++ device ++ seq (u64 BE) → encoded item (see
//!   [`encode_item`]); one device's items are adjacent and in `seq` order.
//! - `devices`: device → last_seq ++ first pending seq ++ bytes ++ oldest pending device
//!   time (4 × u64 BE). Kept after the device's items are gone, so numbering continues.
//! - `commands`: command id → JSON of the stored command and the `seq` of its result.
//! - `meta`: `last_command` → position (u64 BE) ++ command id.
//!
//! # Commands
//! Commands pushed down by the cluster are stored with [`Outbox::store_command`] before
//! the edge confirms SENT_TO_EDGE. Accepting a [`ItemKind::CommandResult`] for a stored
//! command marks it finished in the same write, so the result enters the device log
//! exactly once (a second result is refused); the command is forgotten once the cluster
//! acknowledged its result. [`Outbox::cancel_command`] ends a command the device has not
//! got yet with a CANCELLED result, decided and written in the writer like any result, so
//! a cancel racing the adapter's [`Outbox::set_command_state`] has exactly one winner.

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};
use tokio::sync::{mpsc, oneshot};

/// Longest device id, signal name, alarm kind, code, field name or other identifier, in
/// bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Longest free text of an item (diagnostic text, command detail, local action), in bytes.
pub const MAX_TEXT_BYTES: usize = 4096;
/// Longest text value of a reported field, in bytes (as `SignalValue.text` in the protocol).
pub const MAX_FIELD_TEXT_BYTES: usize = 1024;
/// Most items in one call to [`Outbox::accept`].
pub const MAX_ITEMS_PER_CALL: usize = 10_000;
/// Largest opaque payload of a stored command, in bytes.
pub const MAX_COMMAND_PAYLOAD_BYTES: usize = 96 * 1024;
/// Bytes counted per item on top of its key and value: an estimate of the store's own
/// per-entry cost.
pub const ITEM_OVERHEAD_BYTES: u64 = 32;

/// fjall's journals are not counted in the budget; keep them at fjall's minimum.
const MAX_JOURNAL_BYTES: u64 = 64 * 1024 * 1024;

/// Errors of the outbox.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OutboxError {
    /// An item is malformed; nothing of the call was written.
    #[error("item {index} of device {device:?} refused: {reason}")]
    InvalidItem {
        /// Position of the item in the call.
        index: usize,
        /// Its device.
        device: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Too many items in one call; nothing was written.
    #[error("{count} items in one call, at most {max} allowed")]
    TooManyItems {
        /// Items in the call.
        count: usize,
        /// The most allowed.
        max: usize,
    },
    /// An argument other than an item is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The disk budget does not allow items of this priority now; nothing was written.
    /// Alarms are never refused this way.
    #[error("outbox full: {used} bytes used, {limit} allowed for this priority")]
    Full {
        /// Bytes used now.
        used: u64,
        /// Bytes allowed for the priority of the refused call.
        limit: u64,
    },
    /// The command already has its result in the device log; nothing was written.
    #[error("command {command_id:?} already has its result in the device log")]
    ResultAlreadyRecorded {
        /// The command.
        command_id: String,
    },
    /// No stored command has this id.
    #[error("unknown command {command_id:?}")]
    UnknownCommand {
        /// The id asked for.
        command_id: String,
    },
    /// A device's sequence number would pass `u64::MAX`.
    #[error("sequence of device {device:?} would pass u64::MAX")]
    SequenceOverflow {
        /// The device.
        device: String,
    },
    /// The configuration is unusable.
    #[error("outbox config: {0}")]
    Config(String),
    /// The storage engine failed.
    #[error("outbox storage: {0}")]
    Storage(String),
    /// A record on disk cannot be decoded or contradicts another.
    #[error("corrupt outbox record: {0}")]
    Corrupt(String),
    /// A write failed earlier, so the state on disk is unknown.
    #[error("outbox is poisoned after a failed write; restart the edge")]
    Poisoned,
    /// The outbox is shutting down.
    #[error("outbox is closed")]
    Closed,
}

/// Result of outbox operations.
pub type Result<T, E = OutboxError> = std::result::Result<T, E>;

fn storage(e: fjall::Error) -> OutboxError {
    OutboxError::Storage(format!("fjall: {e}"))
}

/// Settings of the outbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// Directory of the outbox database; created if missing.
    #[serde(default = "default_path")]
    pub path: PathBuf,
    /// Disk budget in bytes (approximate, see the module docs). Past it, readings are
    /// refused; command results and questions may use 10 % more; alarms are always
    /// accepted.
    #[serde(default = "default_limit_bytes")]
    pub limit_bytes: u64,
    /// Most requests written with one fsync.
    #[serde(default = "default_max_group")]
    pub max_group: usize,
    /// Requests that may wait for the writer; callers beyond it wait (back-pressure).
    #[serde(default = "default_queue_depth")]
    pub queue_depth: usize,
}

fn default_path() -> PathBuf {
    PathBuf::from("data/edge/outbox")
}
fn default_limit_bytes() -> u64 {
    1024 * 1024 * 1024
}
fn default_max_group() -> usize {
    1024
}
fn default_queue_depth() -> usize {
    4096
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self::at(default_path())
    }
}

impl OutboxConfig {
    /// Default settings for an outbox at `path`.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            limit_bytes: default_limit_bytes(),
            max_group: default_max_group(),
            queue_depth: default_queue_depth(),
        }
    }
}

/// How urgent an item or a command is; decides what the disk budget lets in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Priority {
    /// Can wait; only commands from the cluster carry it.
    Low,
    /// Readings, reported state, diagnostics: refused when the outbox is full.
    Normal,
    /// Command results and product questions: may use a reserve past the limit.
    High,
    /// Safety alarms: always accepted.
    Safety,
}

/// The value of a reported state field (`SignalValue` in the protocol).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FieldValue {
    /// A floating-point number; must be finite.
    Number(f64),
    /// A whole number.
    Integer(i64),
    /// A flag.
    Flag(bool),
    /// Text, at most [`MAX_FIELD_TEXT_BYTES`].
    Text(String),
}

/// What a device produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ItemKind {
    /// A reading of one signal.
    Reading {
        /// Signal name as in the device model catalogue.
        signal: String,
        /// The reading; must be finite.
        value: f64,
    },
    /// A safety or security alarm.
    Alarm {
        /// What kind of alarm, for example smoke.
        kind: String,
        /// What the edge did at once on its own, if anything.
        local_action: Option<String>,
    },
    /// A diagnostic report.
    Diagnostic {
        /// Manufacturer's code, for example E42.
        code: String,
        /// Text of the report.
        text: String,
    },
    /// A question from the product to its owner.
    Question {
        /// Id of the question, unique per device.
        question_id: String,
    },
    /// The final result of a command.
    CommandResult {
        /// The command.
        command_id: String,
        /// Whether it was carried out successfully.
        succeeded: bool,
        /// It was never started: its time to live ran out before the device got it
        /// (`succeeded` is then false).
        expired: bool,
        /// It was never started: the cluster cancelled it before the device got it
        /// (`succeeded` is then false).
        #[serde(default)]
        cancelled: bool,
        /// Explanation, may be empty.
        detail: String,
    },
    /// A change of reported state.
    Reported {
        /// Field name.
        field: String,
        /// The value the device now has.
        value: FieldValue,
    },
}

/// An item a device produced, before it has its place in the device log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// The device, 1 to [`MAX_ID_BYTES`] bytes.
    pub device: String,
    /// Device clock when it happened, Unix epoch ms; never 0.
    pub ts_ms: u64,
    /// What happened.
    pub kind: ItemKind,
}

impl Item {
    /// An item of `device` at `ts_ms`.
    pub fn new(device: impl Into<String>, ts_ms: u64, kind: ItemKind) -> Self {
        Self {
            device: device.into(),
            ts_ms,
            kind,
        }
    }

    /// A reading of `signal`.
    pub fn reading(device: impl Into<String>, ts_ms: u64, signal: &str, value: f64) -> Self {
        Self::new(
            device,
            ts_ms,
            ItemKind::Reading {
                signal: signal.into(),
                value,
            },
        )
    }

    /// An alarm of `kind`, with the local action taken, if any.
    pub fn alarm(
        device: impl Into<String>,
        ts_ms: u64,
        kind: &str,
        local_action: Option<&str>,
    ) -> Self {
        Self::new(
            device,
            ts_ms,
            ItemKind::Alarm {
                kind: kind.into(),
                local_action: local_action.map(Into::into),
            },
        )
    }

    /// How urgent the item is: alarms are [`Priority::Safety`], command results and
    /// questions [`Priority::High`], the rest [`Priority::Normal`].
    pub fn priority(&self) -> Priority {
        match self.kind {
            ItemKind::Alarm { .. } => Priority::Safety,
            ItemKind::CommandResult { .. } | ItemKind::Question { .. } => Priority::High,
            ItemKind::Reading { .. } | ItemKind::Diagnostic { .. } | ItemKind::Reported { .. } => {
                Priority::Normal
            }
        }
    }

    /// Why the item cannot be accepted, if it cannot.
    fn check(&self) -> Result<(), String> {
        check_id("device id", &self.device)?;
        if self.ts_ms == 0 || self.ts_ms > i64::MAX as u64 {
            return Err(format!("timestamp {} ms is not a valid time", self.ts_ms));
        }
        match &self.kind {
            ItemKind::Reading { signal, value } => {
                check_id("signal", signal)?;
                if !value.is_finite() {
                    return Err(format!("value {value} of signal {signal:?} is not finite"));
                }
            }
            ItemKind::Alarm { kind, local_action } => {
                check_id("alarm kind", kind)?;
                if let Some(a) = local_action {
                    check_text("local action", a, MAX_TEXT_BYTES)?;
                }
            }
            ItemKind::Diagnostic { code, text } => {
                check_id("diagnostic code", code)?;
                check_text("diagnostic text", text, MAX_TEXT_BYTES)?;
            }
            ItemKind::Question { question_id } => check_id("question id", question_id)?,
            ItemKind::CommandResult {
                command_id, detail, ..
            } => {
                check_id("command id", command_id)?;
                check_text("command detail", detail, MAX_TEXT_BYTES)?;
            }
            ItemKind::Reported { field, value } => {
                check_id("field", field)?;
                match value {
                    FieldValue::Number(v) if !v.is_finite() => {
                        return Err(format!("value {v} of field {field:?} is not finite"));
                    }
                    FieldValue::Text(t) => check_text("field text", t, MAX_FIELD_TEXT_BYTES)?,
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

fn check_id(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_ID_BYTES {
        return Err(format!(
            "{what} {s:?} must be 1 to {MAX_ID_BYTES} bytes, has {}",
            s.len()
        ));
    }
    Ok(())
}

fn check_text(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!(
            "{what} has {} bytes, at most {max} allowed",
            s.len()
        ));
    }
    Ok(())
}

/// Where an accepted item went: its place in its device's log.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Accepted {
    /// The device.
    pub device: String,
    /// The item's position in the device log.
    pub seq: u64,
}

/// An item with its place in the device log, as read back for sending.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequenced {
    /// Position in the device log.
    pub seq: u64,
    /// The item.
    pub item: Item,
}

/// What the outbox holds for one device (what `Hello.devices` is made of).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceBacklog {
    /// The device.
    pub device: String,
    /// Lowest `seq` not yet acknowledged by the cluster.
    pub first_pending_seq: u64,
    /// Highest `seq` assigned (`DeviceResume.last_seq`).
    pub last_seq: u64,
    /// Items pending: `last_seq - first_pending_seq + 1`.
    pub count: u64,
}

/// Health of the outbox, for the heartbeat and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxStats {
    /// Items not yet acknowledged, all devices together.
    pub backlog_items: u64,
    /// Bytes the items use, as counted by the budget.
    pub bytes_used: u64,
    /// The budget (`OutboxConfig::limit_bytes`).
    pub bytes_limit: u64,
    /// Device time of the oldest pending item: the earliest of each device's first pending
    /// item, Unix epoch ms; `None` when nothing is pending.
    pub oldest_pending_ts_ms: Option<u64>,
    /// Groups written since open, one fsync each.
    pub fsync_groups: u64,
    /// Write requests answered since open.
    pub requests: u64,
    /// Readings durably accepted since open (all devices).
    pub readings_accepted: u64,
}

/// Where a command stands on the edge. It only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CommandState {
    /// Stored on the edge; not yet handed to the device.
    SentToEdge,
    /// Handed to the device, which is carrying it out.
    DeliveredToDevice,
    /// Carried out successfully.
    Succeeded,
    /// Tried and failed, or refused.
    Failed,
    /// Not started before it expired.
    Expired,
    /// Cancelled before it reached the device.
    Cancelled,
}

/// What a cancel from the cluster did to a stored command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was not handed to the device yet: it ended as cancelled, its result is in the
    /// device log.
    Cancelled,
    /// It had ended already, or the device has it: the cancel changed nothing, the command
    /// keeps (or runs to) this outcome.
    TooLate(CommandState),
    /// No stored command has this id (never received, or finished and forgotten).
    Unknown,
}

/// What a cancel does to a command in `state` (`None`: not stored). Only a command still
/// waiting for its device can be cancelled; once the adapter recorded it delivered, the
/// device's outcome wins.
pub fn cancel_verdict(state: Option<CommandState>) -> CancelOutcome {
    match state {
        None => CancelOutcome::Unknown,
        Some(CommandState::SentToEdge) => CancelOutcome::Cancelled,
        Some(s) => CancelOutcome::TooLate(s),
    }
}

impl CommandState {
    /// Whether the command has ended.
    pub fn is_terminal(self) -> bool {
        self.rank() == 2
    }

    fn rank(self) -> u8 {
        match self {
            CommandState::SentToEdge => 0,
            CommandState::DeliveredToDevice => 1,
            _ => 2,
        }
    }
}

/// A command from the cluster, as the edge keeps it until its result is acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCommand {
    /// Globally unique id; the idempotency key on the edge.
    pub command_id: String,
    /// `Command.position` in the site's command sequence, from 1.
    pub position: u64,
    /// Target device.
    pub device: String,
    /// Urgency; the edge delivers SAFETY commands first.
    pub priority: Priority,
    /// When the cluster accepted it, Unix epoch ms.
    pub issued_at_ms: u64,
    /// If the device has not started it by then it ends as expired, Unix epoch ms.
    pub expires_at_ms: u64,
    /// What to do, opaque to the outbox (for example the encoded `CommandPayload`).
    pub payload: Vec<u8>,
    /// Where it stands.
    pub state: CommandState,
}

/// A stored command and the `seq` of its result in the device log, once accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CommandRecord {
    command: StoredCommand,
    result_seq: Option<u64>,
}

/// Where a device's log stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DeviceMeta {
    /// Highest `seq` assigned.
    last_seq: u64,
    /// Lowest `seq` still held; `last_seq + 1` when nothing is.
    first_seq: u64,
    /// Bytes of the held items, as counted by the budget.
    bytes: u64,
    /// Device time of the item at `first_seq`; 0 when nothing is held.
    first_ts: u64,
}

impl DeviceMeta {
    const NEW: Self = Self {
        last_seq: 0,
        first_seq: 1,
        bytes: 0,
        first_ts: 0,
    };

    fn count(&self) -> u64 {
        debug_assert!(self.last_seq < u64::MAX && self.first_seq <= self.last_seq + 1);
        (self.last_seq + 1).saturating_sub(self.first_seq)
    }

    fn encode(&self) -> Vec<u8> {
        [self.last_seq, self.first_seq, self.bytes, self.first_ts]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect()
    }

    fn decode(device: &str, v: &[u8]) -> Result<Self> {
        let word = |i: usize| -> Result<u64> {
            v.get(i * 8..i * 8 + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| {
                    OutboxError::Corrupt(format!(
                        "device record of {device:?} has {} bytes",
                        v.len()
                    ))
                })
        };
        let m = Self {
            last_seq: word(0)?,
            first_seq: word(1)?,
            bytes: word(2)?,
            first_ts: word(3)?,
        };
        if v.len() != 32
            || m.first_seq == 0
            || seq_after(m.last_seq, 0).is_none()
            || m.first_seq > m.last_seq + 1
        {
            return Err(OutboxError::Corrupt(format!(
                "device record of {device:?}: {m:?}"
            )));
        }
        Ok(m)
    }
}

// ---- encoding ----------------------------------------------------------------------------

const FORMAT_V1: u8 = 1;
const LAST_COMMAND_KEY: &[u8] = b"last_command";

/// Key of an item: len(device) ++ device ++ seq (BE), so a device's items are adjacent and
/// in order, and no device id is a prefix of another's keys.
fn item_key(device: &str, seq: u64) -> Vec<u8> {
    debug_assert!(!device.is_empty() && device.len() <= MAX_ID_BYTES);
    let mut k = Vec::with_capacity(1 + device.len() + 8);
    k.push(device.len() as u8);
    k.extend_from_slice(device.as_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn decode_key(k: &[u8]) -> Result<(String, u64)> {
    let corrupt = || OutboxError::Corrupt(format!("item key {k:?}"));
    let len = usize::from(*k.first().ok_or_else(corrupt)?);
    if k.len() != 1 + len + 8 {
        return Err(corrupt());
    }
    let device = std::str::from_utf8(&k[1..1 + len]).map_err(|_| corrupt())?;
    let seq = u64::from_be_bytes(k[1 + len..].try_into().map_err(|_| corrupt())?);
    Ok((device.to_owned(), seq))
}

/// `seq + n`, if it stays below `u64::MAX` (kept free so `last_seq + 1` always fits).
fn seq_after(seq: u64, n: u64) -> Option<u64> {
    seq.checked_add(n).filter(|&s| s < u64::MAX)
}

/// Bytes an item is counted for in the budget.
fn entry_size(device: &str, value_len: usize) -> u64 {
    (1 + device.len() + 8 + value_len) as u64 + ITEM_OVERHEAD_BYTES
}

/// Encodes an item's value (the device and `seq` are in its key): format byte, kind tag,
/// `ts_ms` (u64 BE), then the kind's fields in order — strings as u32 BE length ++ UTF-8,
/// numbers as 8 bytes BE (f64 by its bits), flags as one byte, an optional string as a
/// presence byte then the string, a field value as a tag byte then its content.
pub fn encode_item(item: &Item) -> Vec<u8> {
    fn str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut out = Vec::with_capacity(32);
    out.push(FORMAT_V1);
    let tag = match &item.kind {
        ItemKind::Reading { .. } => 1,
        ItemKind::Alarm { .. } => 2,
        ItemKind::Diagnostic { .. } => 3,
        ItemKind::Question { .. } => 4,
        ItemKind::CommandResult { .. } => 5,
        ItemKind::Reported { .. } => 6,
    };
    out.push(tag);
    out.extend_from_slice(&item.ts_ms.to_be_bytes());
    match &item.kind {
        ItemKind::Reading { signal, value } => {
            str(&mut out, signal);
            out.extend_from_slice(&value.to_bits().to_be_bytes());
        }
        ItemKind::Alarm { kind, local_action } => {
            str(&mut out, kind);
            match local_action {
                Some(a) => {
                    out.push(1);
                    str(&mut out, a);
                }
                None => out.push(0),
            }
        }
        ItemKind::Diagnostic { code, text } => {
            str(&mut out, code);
            str(&mut out, text);
        }
        ItemKind::Question { question_id } => str(&mut out, question_id),
        ItemKind::CommandResult {
            command_id,
            succeeded,
            expired,
            cancelled,
            detail,
        } => {
            str(&mut out, command_id);
            // 0 failed, 1 succeeded, 2 expired, 3 cancelled.
            out.push(match (*succeeded, *expired, *cancelled) {
                (true, _, _) => 1,
                (false, true, _) => 2,
                (false, false, true) => 3,
                (false, false, false) => 0,
            });
            str(&mut out, detail);
        }
        ItemKind::Reported { field, value } => {
            str(&mut out, field);
            match value {
                FieldValue::Number(v) => {
                    out.push(1);
                    out.extend_from_slice(&v.to_bits().to_be_bytes());
                }
                FieldValue::Integer(v) => {
                    out.push(2);
                    out.extend_from_slice(&v.to_be_bytes());
                }
                FieldValue::Flag(v) => {
                    out.push(3);
                    out.push(u8::from(*v));
                }
                FieldValue::Text(v) => {
                    out.push(4);
                    str(&mut out, v);
                }
            }
        }
    }
    out
}

/// Reads an encoded value front to back.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.rest.len() < n {
            return Err(OutboxError::Corrupt(format!(
                "item value ends {} bytes early",
                n - self.rest.len()
            )));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes(b.try_into().unwrap_or_default()))
    }

    fn flag(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(OutboxError::Corrupt(format!("flag byte {b}"))),
        }
    }

    fn string(&mut self) -> Result<String> {
        let len = u32::from_be_bytes(self.take(4)?.try_into().unwrap_or_default());
        let b = self.take(len as usize)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| OutboxError::Corrupt("item string is not UTF-8".into()))
    }
}

/// Decodes a value written by [`encode_item`], for `device`.
pub fn decode_item(device: &str, value: &[u8]) -> Result<Item> {
    let mut c = Cursor { rest: value };
    let format = c.u8()?;
    if format != FORMAT_V1 {
        return Err(OutboxError::Corrupt(format!(
            "unknown item format {format}"
        )));
    }
    let tag = c.u8()?;
    let ts_ms = c.u64()?;
    let kind = match tag {
        1 => ItemKind::Reading {
            signal: c.string()?,
            value: f64::from_bits(c.u64()?),
        },
        2 => ItemKind::Alarm {
            kind: c.string()?,
            local_action: if c.flag()? { Some(c.string()?) } else { None },
        },
        3 => ItemKind::Diagnostic {
            code: c.string()?,
            text: c.string()?,
        },
        4 => ItemKind::Question {
            question_id: c.string()?,
        },
        5 => {
            let command_id = c.string()?;
            let (succeeded, expired, cancelled) = match c.u8()? {
                0 => (false, false, false),
                1 => (true, false, false),
                2 => (false, true, false),
                3 => (false, false, true),
                o => return Err(OutboxError::Corrupt(format!("unknown command outcome {o}"))),
            };
            ItemKind::CommandResult {
                command_id,
                succeeded,
                expired,
                cancelled,
                detail: c.string()?,
            }
        }
        6 => ItemKind::Reported {
            field: c.string()?,
            value: match c.u8()? {
                1 => FieldValue::Number(f64::from_bits(c.u64()?)),
                2 => FieldValue::Integer(c.u64()? as i64),
                3 => FieldValue::Flag(c.flag()?),
                4 => FieldValue::Text(c.string()?),
                t => return Err(OutboxError::Corrupt(format!("unknown field value tag {t}"))),
            },
        },
        t => return Err(OutboxError::Corrupt(format!("unknown item kind tag {t}"))),
    };
    if !c.rest.is_empty() {
        return Err(OutboxError::Corrupt(format!(
            "{} bytes after the item",
            c.rest.len()
        )));
    }
    Ok(Item {
        device: device.to_owned(),
        ts_ms,
        kind,
    })
}

fn encode_last_command(position: u64, id: &str) -> Vec<u8> {
    let mut v = position.to_be_bytes().to_vec();
    v.extend_from_slice(id.as_bytes());
    v
}

fn decode_last_command(v: &[u8]) -> Result<(u64, String)> {
    let corrupt = || OutboxError::Corrupt("last command record".into());
    let position = u64::from_be_bytes(
        v.get(..8)
            .ok_or_else(corrupt)?
            .try_into()
            .map_err(|_| corrupt())?,
    );
    let id = String::from_utf8(v[8..].to_vec()).map_err(|_| corrupt())?;
    Ok((position, id))
}

// ---- shared state --------------------------------------------------------------------------

/// What is on disk, mirrored in memory; changed only by the writer, after its fsync.
#[derive(Debug, Default)]
struct State {
    devices: HashMap<String, DeviceMeta>,
    commands: HashMap<String, CommandRecord>,
    last_command: (u64, String),
    used: u64,
    backlog: u64,
}

struct Shared {
    db: Database,
    items: Keyspace,
    devices: Keyspace,
    commands: Keyspace,
    meta: Keyspace,
    state: RwLock<State>,
    poisoned: AtomicBool,
    groups: AtomicU64,
    requests: AtomicU64,
    /// Readings durably accepted since open.
    readings: AtomicU64,
}

impl Shared {
    fn state(&self) -> RwLockReadGuard<'_, State> {
        // Only the writer takes the write lock, and it does not panic while holding it.
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_poison(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(OutboxError::Poisoned);
        }
        Ok(())
    }

    /// Loads the in-memory mirror from disk and checks it against the items.
    fn load(&self) -> Result<State> {
        let mut s = State::default();
        for g in self.devices.iter() {
            let (k, v) = g.into_inner().map_err(storage)?;
            let device = String::from_utf8(k.to_vec())
                .map_err(|_| OutboxError::Corrupt(format!("device key {k:?}")))?;
            let m = DeviceMeta::decode(&device, &v)?;
            // The first and last held items must be there; anything else means the record
            // and the items disagree.
            for seq in [m.first_seq, m.last_seq] {
                if m.count() > 0
                    && self
                        .items
                        .get(item_key(&device, seq))
                        .map_err(storage)?
                        .is_none()
                {
                    return Err(OutboxError::Corrupt(format!(
                        "device {device:?} lacks item {seq} of {}..={}",
                        m.first_seq, m.last_seq
                    )));
                }
            }
            s.used += m.bytes;
            s.backlog += m.count();
            s.devices.insert(device, m);
        }
        for g in self.commands.iter() {
            let (k, v) = g.into_inner().map_err(storage)?;
            let r: CommandRecord = serde_json::from_slice(&v)
                .map_err(|e| OutboxError::Corrupt(format!("command {k:?}: {e}")))?;
            s.commands.insert(r.command.command_id.clone(), r);
        }
        if let Some(v) = self.meta.get(LAST_COMMAND_KEY).map_err(storage)? {
            s.last_command = decode_last_command(&v)?;
        }
        Ok(s)
    }
}

// ---- the writer -----------------------------------------------------------------------------

/// A request to the writer thread.
enum Request {
    Accept {
        items: Vec<Item>,
        values: Vec<Vec<u8>>,
        reply: oneshot::Sender<Result<Vec<Accepted>>>,
    },
    Acknowledge {
        device: String,
        persisted_seq: u64,
        reply: oneshot::Sender<Result<u64>>,
    },
    StoreCommand {
        command: Box<StoredCommand>,
        reply: oneshot::Sender<Result<bool>>,
    },
    SetCommandState {
        command_id: String,
        state: CommandState,
        reply: oneshot::Sender<Result<bool>>,
    },
    CancelCommand {
        command_id: String,
        detail: String,
        now_ms: u64,
        reply: oneshot::Sender<Result<CancelOutcome>>,
    },
    /// Tests: the writer says it is held, then waits for the release, so that requests
    /// pile up in the queue deterministically.
    #[cfg(test)]
    Hold {
        held: oneshot::Sender<()>,
        release: std::sync::mpsc::Receiver<()>,
    },
}

/// Answers a caller once its group's fate is known.
type Answer = Box<dyn FnOnce(Option<&OutboxError>) + Send>;

/// The answer to send after the group is written: a success turns into the group's error
/// if the group could not be written.
fn later<T: Send + 'static>(tx: oneshot::Sender<Result<T>>, r: Result<T>) -> Answer {
    Box::new(move |group_error| {
        let r = match (r, group_error) {
            (Ok(_), Some(e)) => Err(e.clone()),
            (r, _) => r,
        };
        // A caller that went away no longer wants the answer; that is not an error here.
        let _ = tx.send(r);
    })
}

/// Changes of the current group, over the committed state.
#[derive(Default)]
struct Group {
    /// Item writes (`None` deletes), ordered so a device's range can be read.
    items: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    devices: HashMap<String, DeviceMeta>,
    commands: HashMap<String, Option<CommandRecord>>,
    last_command: Option<(u64, String)>,
    used: u64,
    backlog: u64,
}

impl Group {
    fn is_empty(&self) -> bool {
        self.items.is_empty()
            && self.devices.is_empty()
            && self.commands.is_empty()
            && self.last_command.is_none()
    }
}

struct Writer {
    shared: Arc<Shared>,
    limit: u64,
    group: Group,
    answers: Vec<Answer>,
}

impl Writer {
    /// Drain, apply, one fsync, answer.
    fn run(mut self, mut rx: mpsc::Receiver<Request>, max_group: usize) {
        while let Some(first) = rx.blocking_recv() {
            self.start_group();
            self.handle(first);
            while self.answers.len() < max_group {
                match rx.try_recv() {
                    Ok(req) => self.handle(req),
                    Err(_) => break,
                }
            }
            self.commit();
        }
    }

    fn start_group(&mut self) {
        let s = self.shared.state();
        self.group = Group {
            used: s.used,
            backlog: s.backlog,
            ..Group::default()
        };
    }

    fn handle(&mut self, req: Request) {
        let poisoned = self.shared.check_poison();
        let answer = match req {
            Request::Accept {
                items,
                values,
                reply,
            } => later(reply, poisoned.and_then(|()| self.accept(&items, values))),
            Request::Acknowledge {
                device,
                persisted_seq,
                reply,
            } => later(
                reply,
                poisoned.and_then(|()| self.acknowledge(device, persisted_seq)),
            ),
            Request::StoreCommand { command, reply } => {
                later(reply, poisoned.map(|()| self.store_command(*command)))
            }
            Request::SetCommandState {
                command_id,
                state,
                reply,
            } => later(
                reply,
                poisoned.and_then(|()| self.set_command_state(command_id, state)),
            ),
            Request::CancelCommand {
                command_id,
                detail,
                now_ms,
                reply,
            } => later(
                reply,
                poisoned.and_then(|()| self.cancel_command(command_id, detail, now_ms)),
            ),
            #[cfg(test)]
            Request::Hold { held, release } => {
                let _ = held.send(());
                let _ = release.recv();
                return;
            }
        };
        self.answers.push(answer);
    }

    /// Writes the group with one fsync, publishes it to readers, answers everyone.
    fn commit(&mut self) {
        let group = std::mem::take(&mut self.group);
        let error = if group.is_empty() {
            None
        } else {
            match self.write(&group) {
                Ok(()) => {
                    self.shared.groups.fetch_add(1, Ordering::Relaxed);
                    self.publish(group);
                    None
                }
                Err(e) => {
                    tracing::error!(error = %e, "outbox write failed, outbox poisoned");
                    self.shared.poisoned.store(true, Ordering::Release);
                    Some(e)
                }
            }
        };
        self.shared
            .requests
            .fetch_add(self.answers.len() as u64, Ordering::Relaxed);
        for answer in self.answers.drain(..) {
            answer(error.as_ref());
        }
    }

    fn write(&self, group: &Group) -> Result<()> {
        let sh = &self.shared;
        let mut batch = sh.db.batch().durability(Some(PersistMode::SyncAll));
        for (k, v) in &group.items {
            match v {
                Some(v) => batch.insert(&sh.items, k.as_slice(), v.as_slice()),
                None => batch.remove(&sh.items, k.as_slice()),
            }
        }
        for (device, m) in &group.devices {
            batch.insert(&sh.devices, device.as_bytes(), m.encode());
        }
        for (id, r) in &group.commands {
            match r {
                Some(r) => {
                    let v = serde_json::to_vec(r)
                        .map_err(|e| OutboxError::Storage(format!("encode command {id:?}: {e}")))?;
                    batch.insert(&sh.commands, id.as_bytes(), v);
                }
                None => batch.remove(&sh.commands, id.as_bytes()),
            }
        }
        if let Some((position, id)) = &group.last_command {
            batch.insert(
                &sh.meta,
                LAST_COMMAND_KEY,
                encode_last_command(*position, id),
            );
        }
        // Durable before anyone hears about it: SyncAll makes the journal fsync part of
        // the commit, and the answers are sent only after it returned.
        batch.commit().map_err(storage)
    }

    fn publish(&self, group: Group) {
        let mut s = self
            .shared
            .state
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        s.devices.extend(group.devices);
        for (id, r) in group.commands {
            match r {
                Some(r) => s.commands.insert(id, r),
                None => s.commands.remove(&id),
            };
        }
        if let Some(last) = group.last_command {
            s.last_command = last;
        }
        s.used = group.used;
        s.backlog = group.backlog;
    }

    // -- views over the committed state plus the group --

    fn device(&self, device: &str) -> Option<DeviceMeta> {
        self.group
            .devices
            .get(device)
            .copied()
            .or_else(|| self.shared.state().devices.get(device).copied())
    }

    fn command(&self, id: &str) -> Option<CommandRecord> {
        match self.group.commands.get(id) {
            Some(r) => r.clone(),
            None => self.shared.state().commands.get(id).cloned(),
        }
    }

    /// Ids and result `seq`s of the commands of `device` whose result is in its log.
    fn results_of(&self, device: &str) -> Vec<(String, u64)> {
        let mut out: HashMap<String, u64> = HashMap::new();
        for (id, r) in &self.shared.state().commands {
            if let (true, Some(seq)) = (r.command.device == device, r.result_seq) {
                out.insert(id.clone(), seq);
            }
        }
        for (id, r) in &self.group.commands {
            match r
                .as_ref()
                .and_then(|r| r.result_seq.filter(|_| r.command.device == device))
            {
                Some(seq) => out.insert(id.clone(), seq),
                None => out.remove(id),
            };
        }
        out.into_iter().collect()
    }

    fn item(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.group.items.get(key) {
            return Ok(v.clone());
        }
        let v = self.shared.items.get(key).map_err(storage)?;
        Ok(v.map(|v| v.to_vec()))
    }

    /// The items of `device` with `from <= seq <= to`, keyed by their key.
    fn items(&self, device: &str, from: u64, to: u64) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
        let (lo, hi) = (item_key(device, from), item_key(device, to));
        let mut out = BTreeMap::new();
        for g in self.shared.items.range(lo.as_slice()..=hi.as_slice()) {
            let (k, v) = g.into_inner().map_err(storage)?;
            out.insert(k.to_vec(), v.to_vec());
        }
        for (k, v) in self.group.items.range(lo..=hi) {
            match v {
                Some(v) => out.insert(k.clone(), v.clone()),
                None => out.remove(k),
            };
        }
        Ok(out)
    }

    /// The cap a call of this priority must stay within; `None` for no cap.
    fn cap(&self, p: Priority) -> Option<u64> {
        match p {
            Priority::Safety => None,
            Priority::High => Some(self.limit.saturating_add(self.limit / 10)),
            Priority::Normal | Priority::Low => Some(self.limit),
        }
    }

    // -- requests; each checks everything before it changes the group --

    fn accept(&mut self, items: &[Item], values: Vec<Vec<u8>>) -> Result<Vec<Accepted>> {
        let bytes: u64 = items
            .iter()
            .zip(&values)
            .map(|(i, v)| entry_size(&i.device, v.len()))
            .sum();
        let class = items
            .iter()
            .map(Item::priority)
            .max()
            .unwrap_or(Priority::Normal);
        if let Some(cap) = self.cap(class)
            && self.group.used.saturating_add(bytes) > cap
        {
            return Err(OutboxError::Full {
                used: self.group.used,
                limit: cap,
            });
        }
        let mut results = HashSet::new();
        for (index, item) in items.iter().enumerate() {
            if let ItemKind::CommandResult { command_id, .. } = &item.kind {
                let stored = self.command(command_id);
                if !results.insert(command_id.as_str())
                    || stored.as_ref().is_some_and(|r| r.result_seq.is_some())
                {
                    return Err(OutboxError::ResultAlreadyRecorded {
                        command_id: command_id.clone(),
                    });
                }
                if let Some(r) = stored
                    && r.command.device != item.device
                {
                    return Err(OutboxError::InvalidItem {
                        index,
                        device: item.device.clone(),
                        reason: format!(
                            "command {command_id:?} targets device {:?}",
                            r.command.device
                        ),
                    });
                }
            }
        }
        let mut metas: HashMap<&str, DeviceMeta> = HashMap::new();
        let mut accepted = Vec::with_capacity(items.len());
        for (item, value) in items.iter().zip(&values) {
            let m = match metas.get_mut(item.device.as_str()) {
                Some(m) => m,
                None => metas
                    .entry(&item.device)
                    .or_insert(self.device(&item.device).unwrap_or(DeviceMeta::NEW)),
            };
            let seq = seq_after(m.last_seq, 1).ok_or_else(|| OutboxError::SequenceOverflow {
                device: item.device.clone(),
            })?;
            if m.count() == 0 {
                m.first_ts = item.ts_ms;
            }
            m.last_seq = seq;
            m.bytes += entry_size(&item.device, value.len());
            accepted.push(Accepted {
                device: item.device.clone(),
                seq,
            });
        }
        // Everything checked: join the group.
        for ((item, value), a) in items.iter().zip(values).zip(&accepted) {
            self.group
                .items
                .insert(item_key(&a.device, a.seq), Some(value));
            if let ItemKind::CommandResult {
                command_id,
                succeeded,
                expired,
                cancelled,
                ..
            } = &item.kind
                && let Some(mut r) = self.command(command_id)
            {
                if !r.command.state.is_terminal() {
                    r.command.state = match (*succeeded, *expired, *cancelled) {
                        (true, _, _) => CommandState::Succeeded,
                        (false, true, _) => CommandState::Expired,
                        (false, false, true) => CommandState::Cancelled,
                        (false, false, false) => CommandState::Failed,
                    };
                }
                r.result_seq = Some(a.seq);
                self.group.commands.insert(command_id.clone(), Some(r));
            }
        }
        for (device, m) in metas {
            self.group.devices.insert(device.to_owned(), m);
        }
        self.group.used += bytes;
        self.group.backlog += items.len() as u64;
        Ok(accepted)
    }

    fn acknowledge(&mut self, device: String, w: u64) -> Result<u64> {
        if seq_after(w, 0).is_none() {
            return Err(OutboxError::SequenceOverflow { device });
        }
        let Some(mut m) = self.device(&device) else {
            if w > 0 {
                // The cluster knows this device and we do not (a lost or replaced
                // outbox): our numbering starts after its watermark.
                let m = DeviceMeta {
                    last_seq: w,
                    first_seq: w + 1,
                    ..DeviceMeta::NEW
                };
                self.group.devices.insert(device, m);
            }
            return Ok(0);
        };
        if w <= m.last_seq {
            if w < m.first_seq {
                return Ok(0); // already trimmed: acks are cumulative and may repeat
            }
            let gone = self.items(&device, m.first_seq, w)?;
            let count = w - m.first_seq + 1;
            if gone.len() as u64 != count {
                return Err(OutboxError::Corrupt(format!(
                    "device {device:?} holds {} items in {}..={w}, expected {count}",
                    gone.len(),
                    m.first_seq
                )));
            }
            let freed: u64 = gone
                .iter()
                .map(|(k, v)| (k.len() + v.len()) as u64 + ITEM_OVERHEAD_BYTES)
                .sum();
            m.first_ts = if w < m.last_seq {
                let next = self.item(&item_key(&device, w + 1))?.ok_or_else(|| {
                    OutboxError::Corrupt(format!("device {device:?} lacks item {}", w + 1))
                })?;
                decode_item(&device, &next)?.ts_ms
            } else {
                0
            };
            for (id, seq) in self.results_of(&device) {
                if seq <= w {
                    // The cluster has the result: the command is done on both sides.
                    self.group.commands.insert(id, None);
                }
            }
            for k in gone.into_keys() {
                self.group.items.insert(k, None);
            }
            debug_assert!(m.bytes >= freed, "{m:?} frees {freed}");
            m.bytes = m.bytes.saturating_sub(freed);
            m.first_seq = w + 1;
            self.group.used = self.group.used.saturating_sub(freed);
            self.group.backlog -= count;
            self.group.devices.insert(device, m);
            return Ok(count);
        }
        // The cluster has persisted more of this device than we ever numbered: its items
        // up to `w` come from an outbox we lost or replaced. Ours were never persisted
        // (the cluster skipped them as duplicates), so they move to after the watermark,
        // as the protocol says, instead of being deleted.
        let count = m.count();
        let overflow = || OutboxError::SequenceOverflow {
            device: device.clone(),
        };
        let new_first = w + 1;
        let new_last = seq_after(w, count).ok_or_else(overflow)?;
        let shift = |seq: u64| seq - m.first_seq + new_first;
        let moved = if count > 0 {
            let held = self.items(&device, m.first_seq, m.last_seq)?;
            if held.len() as u64 != count {
                return Err(OutboxError::Corrupt(format!(
                    "device {device:?} holds {} items in {}..={}, expected {count}",
                    held.len(),
                    m.first_seq,
                    m.last_seq
                )));
            }
            held.into_iter()
                .map(|(k, v)| Ok((decode_key(&k)?.1, v)))
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        tracing::warn!(
            device = %device,
            watermark = w,
            last_seq = m.last_seq,
            pending = count,
            "cluster watermark above the outbox's last seq; renumbering pending items"
        );
        for (id, seq) in self.results_of(&device) {
            // A result below `first_seq` was acknowledged, and its command forgotten then.
            if let (true, Some(mut r)) = (seq >= m.first_seq, self.command(&id)) {
                r.result_seq = Some(shift(seq));
                self.group.commands.insert(id, Some(r));
            }
        }
        for (seq, v) in moved {
            self.group.items.insert(item_key(&device, seq), None);
            self.group
                .items
                .insert(item_key(&device, shift(seq)), Some(v));
        }
        m.first_seq = new_first;
        m.last_seq = new_last;
        self.group.devices.insert(device, m);
        Ok(0)
    }

    fn store_command(&mut self, command: StoredCommand) -> bool {
        let last_position = match &self.group.last_command {
            Some((p, _)) => *p,
            None => self.shared.state().last_command.0,
        };
        // Positions only grow, and the cluster resends only above the position we report:
        // an unknown id at or below it is a command we finished and forgot.
        if command.position <= last_position || self.command(&command.command_id).is_some() {
            return false;
        }
        let id = command.command_id.clone();
        self.group.last_command = Some((command.position, id.clone()));
        self.group.commands.insert(
            id,
            Some(CommandRecord {
                command,
                result_seq: None,
            }),
        );
        true
    }

    /// Ends a stored command as cancelled if [`cancel_verdict`] allows: its result joins
    /// the device log in this group, like an accepted result.
    fn cancel_command(
        &mut self,
        command_id: String,
        detail: String,
        now_ms: u64,
    ) -> Result<CancelOutcome> {
        let stored = self.command(&command_id);
        let verdict = cancel_verdict(stored.as_ref().map(|r| r.command.state));
        let Some(r) = stored.filter(|_| verdict == CancelOutcome::Cancelled) else {
            return Ok(verdict);
        };
        let item = Item::new(
            r.command.device,
            now_ms,
            ItemKind::CommandResult {
                command_id,
                succeeded: false,
                expired: false,
                cancelled: true,
                detail,
            },
        );
        let value = encode_item(&item);
        self.accept(&[item], vec![value])?;
        Ok(CancelOutcome::Cancelled)
    }

    fn set_command_state(&mut self, command_id: String, state: CommandState) -> Result<bool> {
        let Some(mut r) = self.command(&command_id) else {
            return Err(OutboxError::UnknownCommand { command_id });
        };
        if state.rank() <= r.command.state.rank() {
            return Ok(false);
        }
        r.command.state = state;
        self.group.commands.insert(command_id, Some(r));
        Ok(true)
    }
}

// ---- the outbox ---------------------------------------------------------------------------

/// The durable outbox. Share it behind an `Arc`; dropping it stops the writer after it has
/// answered what is queued.
pub struct Outbox {
    shared: Arc<Shared>,
    limit: u64,
    tx: Option<mpsc::Sender<Request>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Outbox {
    /// Opens (or creates) the outbox at `config.path` and starts its writer thread.
    pub fn open(config: &OutboxConfig) -> Result<Self> {
        if config.max_group == 0 || config.queue_depth == 0 || config.limit_bytes == 0 {
            return Err(OutboxError::Config(format!(
                "max_group, queue_depth and limit_bytes must be at least 1, got {}, {} and {}",
                config.max_group, config.queue_depth, config.limit_bytes
            )));
        }
        let path = &config.path;
        std::fs::create_dir_all(path)
            .map_err(|e| OutboxError::Storage(format!("cannot create {}: {e}", path.display())))?;
        let db = Database::builder(path)
            .max_journaling_size(MAX_JOURNAL_BYTES)
            .open()
            .map_err(|e| match e {
                fjall::Error::Locked => OutboxError::Storage(format!(
                    "outbox {} is in use by another process",
                    path.display()
                )),
                e => storage(e),
            })?;
        let ks = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(storage)
        };
        let mut shared = Shared {
            items: ks("items")?,
            devices: ks("devices")?,
            commands: ks("commands")?,
            meta: ks("meta")?,
            db,
            state: RwLock::default(),
            poisoned: AtomicBool::new(false),
            groups: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            readings: AtomicU64::new(0),
        };
        let state = shared.load()?;
        tracing::info!(
            path = %path.display(),
            devices = state.devices.len(),
            backlog = state.backlog,
            bytes_used = state.used,
            limit_bytes = config.limit_bytes,
            "outbox open"
        );
        shared.state = RwLock::new(state);
        let shared = Arc::new(shared);
        let (tx, rx) = mpsc::channel(config.queue_depth);
        let writer = Writer {
            shared: shared.clone(),
            limit: config.limit_bytes,
            group: Group::default(),
            answers: Vec::with_capacity(config.max_group),
        };
        let max_group = config.max_group;
        let writer = std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || writer.run(rx, max_group))
            .map_err(|e| OutboxError::Storage(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            shared,
            limit: config.limit_bytes,
            tx: Some(tx),
            writer: Some(writer),
        })
    }

    async fn call<T>(&self, req: Request, rx: oneshot::Receiver<Result<T>>) -> Result<T> {
        self.shared.check_poison()?;
        let tx = self.tx.as_ref().ok_or(OutboxError::Closed)?;
        tx.send(req).await.map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Gives each item the next `seq` of its device and writes them all durably; returns
    /// where each went, in the order given. All or nothing: a malformed item, a duplicate
    /// command result or a full budget refuses the whole call and writes nothing. Returns
    /// only after the items are on disk (one fsync shared with concurrent callers).
    pub async fn accept(&self, items: Vec<Item>) -> Result<Vec<Accepted>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        if items.len() > MAX_ITEMS_PER_CALL {
            return Err(OutboxError::TooManyItems {
                count: items.len(),
                max: MAX_ITEMS_PER_CALL,
            });
        }
        // Checked and encoded here, so the writer spends its time on writing.
        for (index, item) in items.iter().enumerate() {
            item.check().map_err(|reason| OutboxError::InvalidItem {
                index,
                device: item.device.clone(),
                reason,
            })?;
        }
        let values = items.iter().map(encode_item).collect();
        let readings = items
            .iter()
            .filter(|i| matches!(i.kind, ItemKind::Reading { .. }))
            .count() as u64;
        let (reply, rx) = oneshot::channel();
        let accepted = self
            .call(
                Request::Accept {
                    items,
                    values,
                    reply,
                },
                rx,
            )
            .await?;
        self.shared.readings.fetch_add(readings, Ordering::Relaxed);
        Ok(accepted)
    }

    /// Items of `device` with `seq > after_seq`, in order, at most `limit`.
    pub async fn pending(
        &self,
        device: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Sequenced>> {
        check_id("device id", device).map_err(OutboxError::InvalidArgument)?;
        self.shared.check_poison()?;
        let Some(m) = self.shared.state().devices.get(device).copied() else {
            return Ok(Vec::new());
        };
        // Start at the first held item, past the tombstones of trimmed ones.
        let from = after_seq.saturating_add(1).max(m.first_seq);
        if limit == 0 || after_seq == u64::MAX {
            return Ok(Vec::new());
        }
        let (shared, device) = (self.shared.clone(), device.to_owned());
        tokio::task::spawn_blocking(move || {
            let (lo, hi) = (item_key(&device, from), item_key(&device, u64::MAX));
            let mut out = Vec::new();
            for g in shared.items.range(lo..=hi).take(limit) {
                let (k, v) = g.into_inner().map_err(storage)?;
                let (_, seq) = decode_key(&k)?;
                out.push(Sequenced {
                    seq,
                    item: decode_item(&device, &v)?,
                });
            }
            Ok(out)
        })
        .await
        .map_err(|e| OutboxError::Storage(format!("read task failed: {e}")))?
    }

    /// Every device with pending items, sorted by device (what `Hello.devices` needs).
    pub async fn devices(&self) -> Result<Vec<DeviceBacklog>> {
        self.shared.check_poison()?;
        let mut out: Vec<DeviceBacklog> = self
            .shared
            .state()
            .devices
            .iter()
            .filter(|(_, m)| m.count() > 0)
            .map(|(d, m)| DeviceBacklog {
                device: d.clone(),
                first_pending_seq: m.first_seq,
                last_seq: m.last_seq,
                count: m.count(),
            })
            .collect();
        out.sort_by(|a, b| a.device.cmp(&b.device));
        Ok(out)
    }

    /// Highest `seq` assigned to `device` (0 if none): the next item gets this plus one.
    pub async fn last_seq(&self, device: &str) -> u64 {
        self.shared
            .state()
            .devices
            .get(device)
            .map_or(0, |m| m.last_seq)
    }

    /// Applies the cluster's watermark of `device`: deletes its items with
    /// `seq <= persisted_seq` and frees their budget; returns how many it deleted.
    /// Idempotent, and an older watermark changes nothing. A watermark above the device's
    /// last `seq` means the cluster holds items of a lost or replaced outbox: numbering
    /// continues at `persisted_seq + 1`, and pending items are renumbered from there
    /// rather than deleted (nothing is trimmed, 0 is returned). After that, the sync client
    /// resends from `pending(device, persisted_seq, …)`.
    pub async fn acknowledge(&self, device: &str, persisted_seq: u64) -> Result<u64> {
        check_id("device id", device).map_err(OutboxError::InvalidArgument)?;
        let (reply, rx) = oneshot::channel();
        self.call(
            Request::Acknowledge {
                device: device.to_owned(),
                persisted_seq,
                reply,
            },
            rx,
        )
        .await
    }

    /// Backlog, budget and writer counters.
    pub fn stats(&self) -> OutboxStats {
        let s = self.shared.state();
        OutboxStats {
            backlog_items: s.backlog,
            bytes_used: s.used,
            bytes_limit: self.limit,
            oldest_pending_ts_ms: s
                .devices
                .values()
                .filter(|m| m.count() > 0)
                .map(|m| m.first_ts)
                .min(),
            fsync_groups: self.shared.groups.load(Ordering::Relaxed),
            requests: self.shared.requests.load(Ordering::Relaxed),
            readings_accepted: self.shared.readings.load(Ordering::Relaxed),
        }
    }

    /// Stores a command from the cluster durably; returns whether it is new. A command
    /// whose id is already stored, or whose position is at or below the last stored
    /// position (one finished and forgotten), is ignored: `false`, nothing written.
    /// Confirm SENT_TO_EDGE once this returned.
    pub async fn store_command(&self, command: StoredCommand) -> Result<bool> {
        check_id("command id", &command.command_id).map_err(OutboxError::InvalidArgument)?;
        check_id("device id", &command.device).map_err(OutboxError::InvalidArgument)?;
        if command.position == 0 {
            return Err(OutboxError::InvalidArgument(format!(
                "command {:?} has position 0; positions start at 1",
                command.command_id
            )));
        }
        if command.payload.len() > MAX_COMMAND_PAYLOAD_BYTES {
            return Err(OutboxError::InvalidArgument(format!(
                "command {:?} payload has {} bytes, at most {MAX_COMMAND_PAYLOAD_BYTES} allowed",
                command.command_id,
                command.payload.len()
            )));
        }
        let (reply, rx) = oneshot::channel();
        self.call(
            Request::StoreCommand {
                command: Box::new(command),
                reply,
            },
            rx,
        )
        .await
    }

    /// Highest command position stored and its command id (`Hello.last_command_position`
    /// and `last_command_id`); `(0, "")` if none.
    pub async fn last_command_position(&self) -> Result<(u64, String)> {
        self.shared.check_poison()?;
        Ok(self.shared.state().last_command.clone())
    }

    /// Stored commands whose result is not yet in the device log: safety first, then by
    /// position.
    pub async fn commands_pending(&self) -> Result<Vec<StoredCommand>> {
        self.shared.check_poison()?;
        let mut out: Vec<StoredCommand> = self
            .shared
            .state()
            .commands
            .values()
            .filter(|r| r.result_seq.is_none())
            .map(|r| r.command.clone())
            .collect();
        out.sort_by_key(|c| (std::cmp::Reverse(c.priority), c.position));
        Ok(out)
    }

    /// Moves a stored command forward to `state`, durably; returns whether it changed. A
    /// state not after the current one is ignored (`false`). The command stays pending
    /// until its [`ItemKind::CommandResult`] is accepted.
    pub async fn set_command_state(&self, command_id: &str, state: CommandState) -> Result<bool> {
        check_id("command id", command_id).map_err(OutboxError::InvalidArgument)?;
        let (reply, rx) = oneshot::channel();
        self.call(
            Request::SetCommandState {
                command_id: command_id.to_owned(),
                state,
                reply,
            },
            rx,
        )
        .await
    }

    /// Cancels a stored command the device has not got yet (see [`cancel_verdict`]): it
    /// ends as cancelled, with a CANCELLED result in its device's log (`detail` truncated
    /// to the item limit, `now_ms` its time), written before this returns. A command the
    /// adapter already recorded as delivered, or one that ended, is left as it is. Decided
    /// in the writer, so it and [`Outbox::set_command_state`] never both win.
    pub async fn cancel_command(
        &self,
        command_id: &str,
        detail: &str,
        now_ms: u64,
    ) -> Result<CancelOutcome> {
        check_id("command id", command_id).map_err(OutboxError::InvalidArgument)?;
        let mut detail = detail.to_owned();
        if detail.len() > MAX_TEXT_BYTES {
            let mut end = MAX_TEXT_BYTES;
            while !detail.is_char_boundary(end) {
                end -= 1;
            }
            detail.truncate(end);
        }
        let (reply, rx) = oneshot::channel();
        self.call(
            Request::CancelCommand {
                command_id: command_id.to_owned(),
                detail,
                now_ms,
                reply,
            },
            rx,
        )
        .await
    }

    /// Holds the writer until the returned sender is dropped or sent to.
    #[cfg(test)]
    async fn hold(&self) -> std::sync::mpsc::Sender<()> {
        let (held, held_rx) = oneshot::channel();
        let (release_tx, release) = std::sync::mpsc::channel();
        let tx = self.tx.as_ref().expect("open");
        tx.send(Request::Hold { held, release })
            .await
            .expect("writer");
        held_rx.await.expect("held");
        release_tx
    }

    /// Requests waiting in the writer's queue.
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.tx
            .as_ref()
            .map_or(0, |tx| tx.max_capacity() - tx.capacity())
    }
}

impl Drop for Outbox {
    /// Stops the writer after it has answered what is queued, so the database is free to
    /// be opened again as soon as the outbox is dropped.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn open(dir: &tempfile::TempDir) -> Outbox {
        Outbox::open(&OutboxConfig::at(dir.path())).expect("open outbox")
    }

    fn open_with_limit(dir: &tempfile::TempDir, limit_bytes: u64) -> Outbox {
        let mut c = OutboxConfig::at(dir.path());
        c.limit_bytes = limit_bytes;
        Outbox::open(&c).expect("open outbox")
    }

    fn reading(device: &str, value: f64) -> Item {
        Item::reading(device, 1_700_000_000_000, "temperature", value)
    }

    fn seqs(accepted: &[Accepted], device: &str) -> Vec<u64> {
        accepted
            .iter()
            .filter(|a| a.device == device)
            .map(|a| a.seq)
            .collect()
    }

    async fn held_seqs(outbox: &Outbox, device: &str) -> Vec<u64> {
        let items = outbox.pending(device, 0, usize::MAX).await.unwrap();
        items.iter().map(|s| s.seq).collect()
    }

    fn command(id: &str, position: u64, device: &str) -> StoredCommand {
        StoredCommand {
            command_id: id.into(),
            position,
            device: device.into(),
            priority: Priority::Normal,
            issued_at_ms: 1_700_000_000_000,
            expires_at_ms: 1_700_000_600_000,
            payload: b"descale".to_vec(),
            state: CommandState::SentToEdge,
        }
    }

    fn result(device: &str, command_id: &str, succeeded: bool) -> Item {
        Item::new(
            device,
            1_700_000_000_500,
            ItemKind::CommandResult {
                command_id: command_id.into(),
                succeeded,
                expired: false,
                cancelled: false,
                detail: String::new(),
            },
        )
    }

    #[tokio::test]
    async fn seqs_are_contiguous_per_device_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let outbox = open(&dir);
            let a = outbox
                .accept(vec![
                    reading("a", 1.0),
                    reading("b", 2.0),
                    reading("a", 3.0),
                ])
                .await
                .unwrap();
            assert_eq!(seqs(&a, "a"), [1, 2]);
            assert_eq!(seqs(&a, "b"), [1]);
            let a = outbox.accept(vec![reading("a", 4.0)]).await.unwrap();
            assert_eq!(seqs(&a, "a"), [3]);
        }
        let outbox = open(&dir);
        assert_eq!(outbox.last_seq("a").await, 3);
        assert_eq!(outbox.last_seq("b").await, 1);
        assert_eq!(outbox.last_seq("never-seen").await, 0);
        let a = outbox
            .accept(vec![reading("a", 5.0), reading("b", 6.0)])
            .await
            .unwrap();
        assert_eq!(seqs(&a, "a"), [4]);
        assert_eq!(seqs(&a, "b"), [2]);
        let held = outbox.pending("a", 0, 100).await.unwrap();
        let values: Vec<_> = held
            .iter()
            .map(|s| match s.item.kind {
                ItemKind::Reading { value, .. } => (s.seq, value),
                _ => panic!("not a reading: {s:?}"),
            })
            .collect();
        assert_eq!(values, [(1, 1.0), (2, 3.0), (3, 4.0), (4, 5.0)]);
        let stats = outbox.stats();
        assert_eq!(stats.backlog_items, 6);
        assert!(stats.bytes_used > 0);
        assert_eq!(stats.oldest_pending_ts_ms, Some(1_700_000_000_000));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_accepts_share_fsyncs_and_keep_logs_contiguous() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Arc::new(open(&dir));
        // Hold the writer until every call is queued, so they must share one group.
        let release = outbox.hold().await;
        let mut tasks = Vec::new();
        for t in 0..100u64 {
            let outbox = outbox.clone();
            tasks.push(tokio::spawn(async move {
                let items = (0..3)
                    .map(|i| reading(&format!("dev-{}", (t + i) % 7), t as f64))
                    .collect();
                outbox.accept(items).await
            }));
        }
        while outbox.queued() < 100 {
            tokio::task::yield_now().await;
        }
        release.send(()).unwrap();
        let mut by_device: HashMap<String, BTreeSet<u64>> = HashMap::new();
        for t in tasks {
            for a in t.await.unwrap().expect("accepted") {
                assert!(
                    by_device.entry(a.device.clone()).or_default().insert(a.seq),
                    "{a:?} given twice"
                );
            }
        }
        let total: usize = by_device.values().map(BTreeSet::len).sum();
        assert_eq!(total, 300);
        for (device, got) in &by_device {
            let expected: BTreeSet<u64> = (1..=got.len() as u64).collect();
            assert_eq!(got, &expected, "{device} is not contiguous from 1");
            assert_eq!(
                held_seqs(&outbox, device).await,
                expected.iter().copied().collect::<Vec<_>>()
            );
        }
        let stats = outbox.stats();
        assert_eq!(stats.requests, 100);
        assert_eq!(stats.fsync_groups, 1, "100 queued calls, one fsync");
    }

    #[tokio::test]
    async fn a_full_outbox_refuses_readings_but_never_alarms() {
        let dir = tempfile::tempdir().unwrap();
        let one = entry_size("a", encode_item(&reading("a", 1.0)).len());
        let outbox = open_with_limit(&dir, 10 * one);
        let ten: Vec<Item> = (0..10).map(|i| reading("a", f64::from(i))).collect();
        outbox.accept(ten).await.expect("fits the limit exactly");
        let err = outbox.accept(vec![reading("a", 11.0)]).await.unwrap_err();
        assert_eq!(
            err,
            OutboxError::Full {
                used: 10 * one,
                limit: 10 * one
            }
        );
        // Command results and questions may use the reserve…
        let q = Item::new(
            "a",
            1_700_000_000_000,
            ItemKind::Question {
                question_id: "door".into(),
            },
        );
        assert_eq!(q.priority(), Priority::High);
        outbox
            .accept(vec![q.clone()])
            .await
            .expect("within reserve");
        let mut high_refused = false;
        for _ in 0..100 {
            match outbox.accept(vec![q.clone()]).await {
                Ok(_) => {}
                Err(OutboxError::Full { limit, .. }) => {
                    assert_eq!(limit, 11 * one);
                    high_refused = true;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(high_refused, "high priority has a cap too");
        // …alarms always get in, readings beside them too.
        for _ in 0..50 {
            let alarm = Item::alarm("a", 1_700_000_000_000, "smoke", Some("siren on"));
            assert_eq!(alarm.priority(), Priority::Safety);
            outbox
                .accept(vec![alarm, reading("a", 0.5)])
                .await
                .expect("alarms are never refused");
        }
        let stats = outbox.stats();
        assert!(stats.bytes_used > 11 * one, "{stats:?}");
        // Nothing was deleted to make room: the log is whole from 1.
        let held = held_seqs(&outbox, "a").await;
        assert_eq!(held, (1..=stats.backlog_items).collect::<Vec<_>>());
        assert!(matches!(
            outbox.accept(vec![reading("a", 1.0)]).await,
            Err(OutboxError::Full { .. })
        ));
    }

    #[tokio::test]
    async fn acknowledge_trims_frees_budget_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let one = entry_size("a", encode_item(&reading("a", 1.0)).len());
        let outbox = open_with_limit(&dir, 5 * one);
        let five: Vec<Item> = (0..5).map(|i| reading("a", f64::from(i))).collect();
        outbox.accept(five).await.unwrap();
        outbox.accept(vec![reading("b", 9.0)]).await.unwrap_err();
        assert_eq!(outbox.acknowledge("a", 3).await.unwrap(), 3);
        assert_eq!(outbox.acknowledge("a", 3).await.unwrap(), 0);
        assert_eq!(outbox.acknowledge("a", 2).await.unwrap(), 0);
        assert_eq!(outbox.stats().bytes_used, 2 * one);
        assert_eq!(held_seqs(&outbox, "a").await, [4, 5]);
        assert_eq!(
            outbox.devices().await.unwrap(),
            [DeviceBacklog {
                device: "a".into(),
                first_pending_seq: 4,
                last_seq: 5,
                count: 2
            }]
        );
        let b = outbox.accept(vec![reading("b", 9.0)]).await.unwrap();
        assert_eq!(seqs(&b, "b"), [1], "freed budget lets readings in again");
        assert_eq!(outbox.acknowledge("a", 5).await.unwrap(), 2);
        drop(outbox);
        let outbox = open_with_limit(&dir, 5 * one);
        assert_eq!(outbox.stats().bytes_used, one, "only b's reading is left");
        assert_eq!(outbox.stats().backlog_items, 1);
        assert_eq!(held_seqs(&outbox, "a").await, Vec::<u64>::new());
        let a = outbox.accept(vec![reading("a", 6.0)]).await.unwrap();
        assert_eq!(seqs(&a, "a"), [6], "numbering continues after a full trim");
        assert_eq!(outbox.acknowledge("nobody", 0).await.unwrap(), 0);
        assert_eq!(outbox.last_seq("nobody").await, 0);
    }

    #[tokio::test]
    async fn a_watermark_above_last_seq_renumbers_instead_of_deleting() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = open(&dir);
        // A fresh outbox numbered three readings before it learnt the cluster's watermark.
        outbox
            .accept((1..=3).map(|i| reading("a", f64::from(i))).collect())
            .await
            .unwrap();
        assert_eq!(outbox.acknowledge("a", 1000).await.unwrap(), 0);
        assert_eq!(outbox.last_seq("a").await, 1003);
        let held = outbox.pending("a", 1000, 10).await.unwrap();
        let got: Vec<_> = held
            .iter()
            .map(|s| match s.item.kind {
                ItemKind::Reading { value, .. } => (s.seq, value),
                _ => panic!("{s:?}"),
            })
            .collect();
        assert_eq!(got, [(1001, 1.0), (1002, 2.0), (1003, 3.0)]);
        // A device we never saw continues after the cluster's watermark.
        outbox.acknowledge("b", 42).await.unwrap();
        assert!(
            outbox
                .devices()
                .await
                .unwrap()
                .iter()
                .all(|d| d.device != "b")
        );
        drop(outbox);
        let outbox = open(&dir);
        let a = outbox
            .accept(vec![reading("a", 4.0), reading("b", 1.0)])
            .await
            .unwrap();
        assert_eq!(seqs(&a, "a"), [1004]);
        assert_eq!(seqs(&a, "b"), [43]);
        assert_eq!(outbox.acknowledge("a", 1004).await.unwrap(), 4);
        assert_eq!(outbox.stats().backlog_items, 1);
    }

    #[tokio::test]
    async fn bad_input_is_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = open(&dir);
        let long = "x".repeat(MAX_ID_BYTES + 1);
        let bad = [
            reading("a", f64::NAN),
            reading("a", f64::INFINITY),
            reading("", 1.0),
            reading(&long, 1.0),
            Item::reading("a", 0, "temperature", 1.0),
            Item::reading("a", 1, "", 1.0),
            Item::reading("a", 1, &long, 1.0),
            Item::new(
                "a",
                1,
                ItemKind::Reported {
                    field: "mode".into(),
                    value: FieldValue::Number(f64::NEG_INFINITY),
                },
            ),
            Item::new(
                "a",
                1,
                ItemKind::Diagnostic {
                    code: "E42".into(),
                    text: "x".repeat(MAX_TEXT_BYTES + 1),
                },
            ),
        ];
        for item in bad {
            // The good reading before it is not written either: all or nothing.
            let err = outbox
                .accept(vec![reading("a", 1.0), item.clone()])
                .await
                .unwrap_err();
            assert!(
                matches!(&err, OutboxError::InvalidItem { index: 1, .. }),
                "{item:?}: {err}"
            );
        }
        let many = vec![reading("a", 1.0); MAX_ITEMS_PER_CALL + 1];
        assert!(matches!(
            outbox.accept(many).await,
            Err(OutboxError::TooManyItems { .. })
        ));
        assert!(matches!(
            outbox.pending("", 0, 1).await,
            Err(OutboxError::InvalidArgument(_))
        ));
        assert!(outbox.acknowledge(&long, 1).await.is_err());
        assert_eq!(outbox.last_seq("a").await, 0);
        assert_eq!(outbox.stats().backlog_items, 0);
        assert_eq!(outbox.stats().fsync_groups, 0, "nothing reached the disk");
        assert!(outbox.devices().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn pending_and_devices_describe_the_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = open(&dir);
        let items: Vec<Item> = (0..10u32)
            .map(|i| {
                Item::reading(
                    ["a", "ab", "b"][i as usize % 3],
                    100 + u64::from(i),
                    "t",
                    1.0,
                )
            })
            .collect();
        outbox.accept(items).await.unwrap();
        // "a" is a prefix of "ab": their logs must stay apart.
        assert_eq!(held_seqs(&outbox, "a").await, [1, 2, 3, 4]);
        assert_eq!(held_seqs(&outbox, "ab").await, [1, 2, 3]);
        let page = outbox.pending("a", 1, 2).await.unwrap();
        assert_eq!(page.iter().map(|s| s.seq).collect::<Vec<_>>(), [2, 3]);
        assert!(page.iter().all(|s| s.item.device == "a"));
        assert!(outbox.pending("a", 4, 10).await.unwrap().is_empty());
        assert!(outbox.pending("a", 0, 0).await.unwrap().is_empty());
        assert!(outbox.pending("zzz", 0, 10).await.unwrap().is_empty());
        outbox.acknowledge("b", 3).await.unwrap();
        outbox.acknowledge("a", 1).await.unwrap();
        let devices = outbox.devices().await.unwrap();
        let summary: Vec<_> = devices
            .iter()
            .map(|d| (d.device.as_str(), d.first_pending_seq, d.last_seq, d.count))
            .collect();
        assert_eq!(summary, [("a", 2, 4, 3), ("ab", 1, 3, 3)]);
        // Oldest pending device time: "a" now starts at its item 2 (ts 103), "ab" at 101.
        assert_eq!(outbox.stats().oldest_pending_ts_ms, Some(101));
        outbox.acknowledge("ab", 3).await.unwrap();
        assert_eq!(outbox.stats().oldest_pending_ts_ms, Some(103));
    }

    #[tokio::test]
    async fn every_kind_round_trips_through_the_encoding() {
        let kinds = [
            ItemKind::Reading {
                signal: "brew_pressure".into(),
                value: -0.25,
            },
            ItemKind::Alarm {
                kind: "smoke".into(),
                local_action: Some("siren on".into()),
            },
            ItemKind::Alarm {
                kind: "leak".into(),
                local_action: None,
            },
            ItemKind::Diagnostic {
                code: "E42".into(),
                text: "door seal check failed".into(),
            },
            ItemKind::Question {
                question_id: "door-closed".into(),
            },
            ItemKind::CommandResult {
                command_id: "c-1".into(),
                succeeded: true,
                expired: false,
                cancelled: false,
                detail: "done".into(),
            },
            ItemKind::Reported {
                field: "mode".into(),
                value: FieldValue::Text("eco".into()),
            },
            ItemKind::Reported {
                field: "firmware".into(),
                value: FieldValue::Integer(-7),
            },
            ItemKind::Reported {
                field: "on".into(),
                value: FieldValue::Flag(true),
            },
            ItemKind::Reported {
                field: "setpoint".into(),
                value: FieldValue::Number(4.5),
            },
        ];
        let dir = tempfile::tempdir().unwrap();
        let items: Vec<Item> = kinds
            .into_iter()
            .map(|k| Item::new("dev", 1_700_000_000_123, k))
            .collect();
        {
            let outbox = open(&dir);
            outbox.accept(items.clone()).await.unwrap();
        }
        let outbox = open(&dir);
        let back: Vec<Item> = outbox
            .pending("dev", 0, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.item)
            .collect();
        assert_eq!(back, items);
        let v = encode_item(&items[0]);
        assert!(decode_item("dev", &v[..v.len() - 1]).is_err());
        assert!(decode_item("dev", &[v.as_slice(), &[0]].concat()).is_err());
    }

    #[tokio::test]
    async fn commands_are_stored_once_and_finish_with_exactly_one_result() {
        let dir = tempfile::tempdir().unwrap();
        {
            let outbox = open(&dir);
            assert_eq!(
                outbox.last_command_position().await.unwrap(),
                (0, String::new())
            );
            assert!(outbox.store_command(command("c-1", 5, "a")).await.unwrap());
            assert!(!outbox.store_command(command("c-1", 5, "a")).await.unwrap());
            let mut safety = command("c-2", 7, "a");
            safety.priority = Priority::Safety;
            assert!(outbox.store_command(safety).await.unwrap());
            // A position at or below the last one is a command already handled.
            assert!(!outbox.store_command(command("c-0", 6, "a")).await.unwrap());
            assert!(
                outbox
                    .set_command_state("c-1", CommandState::DeliveredToDevice)
                    .await
                    .unwrap()
            );
            assert!(
                !outbox
                    .set_command_state("c-1", CommandState::SentToEdge)
                    .await
                    .unwrap(),
                "states only move forward"
            );
            assert!(matches!(
                outbox.set_command_state("nope", CommandState::Failed).await,
                Err(OutboxError::UnknownCommand { .. })
            ));
        }
        let outbox = open(&dir);
        assert_eq!(
            outbox.last_command_position().await.unwrap(),
            (7, "c-2".into())
        );
        let pending = outbox.commands_pending().await.unwrap();
        let ids: Vec<_> = pending.iter().map(|c| c.command_id.as_str()).collect();
        assert_eq!(ids, ["c-2", "c-1"], "safety first");
        assert_eq!(pending[1].state, CommandState::DeliveredToDevice);
        // The result enters the device log once, and finishes the command in that write.
        let r = outbox.accept(vec![result("a", "c-1", true)]).await.unwrap();
        assert_eq!(seqs(&r, "a"), [1]);
        assert!(matches!(
            outbox.accept(vec![result("a", "c-1", true)]).await,
            Err(OutboxError::ResultAlreadyRecorded { .. })
        ));
        assert!(matches!(
            outbox
                .accept(vec![result("a", "c-2", false), result("a", "c-2", false)])
                .await,
            Err(OutboxError::ResultAlreadyRecorded { .. })
        ));
        assert!(matches!(
            outbox.accept(vec![result("b", "c-2", false)]).await,
            Err(OutboxError::InvalidItem { .. })
        ));
        let ids: Vec<_> = outbox
            .commands_pending()
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.command_id)
            .collect();
        assert_eq!(ids, ["c-2"]);
        // Once the cluster has the result, the command is forgotten; a resend is ignored.
        outbox.acknowledge("a", 1).await.unwrap();
        assert!(!outbox.store_command(command("c-1", 5, "a")).await.unwrap());
        drop(outbox);
        let outbox = open(&dir);
        assert_eq!(outbox.commands_pending().await.unwrap().len(), 1);
        assert!(
            !outbox.shared.state().commands.contains_key("c-1"),
            "finished and acknowledged commands are dropped"
        );
        assert!(matches!(
            outbox.store_command(command("", 9, "a")).await,
            Err(OutboxError::InvalidArgument(_))
        ));
    }

    #[test]
    fn only_a_command_still_waiting_for_its_device_can_be_cancelled() {
        assert_eq!(cancel_verdict(None), CancelOutcome::Unknown);
        assert_eq!(
            cancel_verdict(Some(CommandState::SentToEdge)),
            CancelOutcome::Cancelled
        );
        for s in [
            CommandState::DeliveredToDevice,
            CommandState::Succeeded,
            CommandState::Failed,
            CommandState::Expired,
            CommandState::Cancelled,
        ] {
            assert_eq!(cancel_verdict(Some(s)), CancelOutcome::TooLate(s));
        }
    }

    #[tokio::test]
    async fn a_cancel_ends_a_waiting_command_with_one_result_and_the_device_never_gets_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let outbox = open(&dir);
            assert!(outbox.store_command(command("c-1", 1, "a")).await.unwrap());
            assert!(outbox.store_command(command("c-2", 2, "a")).await.unwrap());
            assert_eq!(
                outbox
                    .cancel_command("c-1", "cancelled: not needed", 1_700_000_000_900)
                    .await
                    .unwrap(),
                CancelOutcome::Cancelled
            );
            // The adapter comes too late: it must not hand it over.
            assert!(
                !outbox
                    .set_command_state("c-1", CommandState::DeliveredToDevice)
                    .await
                    .unwrap()
            );
            // A repeated cancel (the cluster resends it after a reconnect) writes nothing.
            assert_eq!(
                outbox.cancel_command("c-1", "again", 1).await.unwrap(),
                CancelOutcome::TooLate(CommandState::Cancelled)
            );
            // The device got c-2 first: the cancel loses, c-2 runs to its outcome.
            assert!(
                outbox
                    .set_command_state("c-2", CommandState::DeliveredToDevice)
                    .await
                    .unwrap()
            );
            assert_eq!(
                outbox.cancel_command("c-2", "late", 1).await.unwrap(),
                CancelOutcome::TooLate(CommandState::DeliveredToDevice)
            );
            assert_eq!(
                outbox.cancel_command("nope", "", 1).await.unwrap(),
                CancelOutcome::Unknown
            );
        }
        // Durable: the one result in the device log, and the state, survive a restart.
        let outbox = open(&dir);
        let items = outbox.pending("a", 0, 100).await.unwrap();
        assert_eq!(items.len(), 1, "exactly one result");
        assert_eq!(
            items[0].item.kind,
            ItemKind::CommandResult {
                command_id: "c-1".into(),
                succeeded: false,
                expired: false,
                cancelled: true,
                detail: "cancelled: not needed".into(),
            }
        );
        assert_eq!(items[0].item.ts_ms, 1_700_000_000_900);
        let pending = outbox.commands_pending().await.unwrap();
        let ids: Vec<_> = pending.iter().map(|c| c.command_id.as_str()).collect();
        assert_eq!(ids, ["c-2"], "the cancelled command has its result");
        assert!(matches!(
            outbox.accept(vec![result("a", "c-1", true)]).await,
            Err(OutboxError::ResultAlreadyRecorded { .. })
        ));
        assert_eq!(
            outbox.cancel_command("c-1", "again", 1).await.unwrap(),
            CancelOutcome::TooLate(CommandState::Cancelled)
        );
        assert!(matches!(
            outbox.cancel_command("", "", 1).await,
            Err(OutboxError::InvalidArgument(_))
        ));
    }

    /// Queues calls one by one behind a held writer, so they land in one group in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_sees_its_own_earlier_writes() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Arc::new(open(&dir));
        let release = outbox.hold().await;
        let mut tasks = Vec::new();
        // Each call is polled once here, which puts its request in the writer's queue (the
        // queue has room, so the send completes in that poll), and only then handed to a
        // task to wait for its answer: the order of the queue is the order of the calls.
        macro_rules! queue {
            ($o:ident => $call:expr) => {{
                let queued = outbox.queued();
                let $o = outbox.clone();
                let mut call = Box::pin(async move { format!("{:?}", $call.await) });
                assert!(futures::poll!(&mut call).is_pending());
                assert_eq!(outbox.queued(), queued + 1, "the call is queued");
                tasks.push(tokio::spawn(call));
            }};
        }
        queue!(o => o.accept(vec![reading("a", 1.0), reading("a", 2.0), reading("a", 3.0)]));
        queue!(o => o.acknowledge("a", 2));
        queue!(o => o.accept(vec![reading("a", 4.0)]));
        // Above last seq 4, counting the group's own accepts: items 3 and 4 move to 11, 12.
        queue!(o => o.acknowledge("a", 10));
        queue!(o => o.store_command(command("c-1", 1, "a")));
        queue!(o => o.accept(vec![result("a", "c-1", false)]));
        queue!(o => o.accept(vec![result("a", "c-1", false)]));
        release.send(()).unwrap();
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.unwrap());
        }
        let acc = |seqs: &[u64]| {
            let v: Vec<_> = seqs
                .iter()
                .map(|&seq| Accepted {
                    device: "a".into(),
                    seq,
                })
                .collect();
            format!("{:?}", Ok::<_, OutboxError>(v))
        };
        assert_eq!(answers[0], acc(&[1, 2, 3]));
        assert_eq!(answers[1], "Ok(2)");
        assert_eq!(answers[2], acc(&[4]));
        assert_eq!(answers[3], "Ok(0)");
        assert_eq!(answers[4], "Ok(true)");
        assert_eq!(answers[5], acc(&[13]));
        assert!(
            answers[6].contains("ResultAlreadyRecorded"),
            "{}",
            answers[6]
        );
        assert_eq!(outbox.stats().fsync_groups, 1);
        let check = |outbox: Arc<Outbox>| async move {
            assert_eq!(held_seqs(&outbox, "a").await, [11, 12, 13]);
            assert_eq!(outbox.stats().backlog_items, 3);
            let one = entry_size("a", encode_item(&reading("a", 1.0)).len());
            let result = entry_size("a", encode_item(&result("a", "c-1", false)).len());
            assert_eq!(outbox.stats().bytes_used, 2 * one + result);
            assert!(outbox.commands_pending().await.unwrap().is_empty());
            let c = outbox.shared.state().commands["c-1"].clone();
            assert_eq!(
                (c.command.state, c.result_seq),
                (CommandState::Failed, Some(13))
            );
        };
        check(outbox.clone()).await;
        drop(outbox);
        let outbox = Arc::new(open(&dir));
        check(outbox.clone()).await;
        assert_eq!(outbox.acknowledge("a", 13).await.unwrap(), 3);
        assert!(outbox.shared.state().commands.is_empty());
        assert_eq!(outbox.stats().bytes_used, 0);
    }

    #[tokio::test]
    async fn sequence_numbers_never_wrap() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = open(&dir);
        assert!(matches!(
            outbox.acknowledge("a", u64::MAX).await,
            Err(OutboxError::SequenceOverflow { .. })
        ));
        outbox.acknowledge("a", u64::MAX - 2).await.unwrap();
        let a = outbox.accept(vec![reading("a", 1.0)]).await.unwrap();
        assert_eq!(seqs(&a, "a"), [u64::MAX - 1]);
        assert!(matches!(
            outbox.accept(vec![reading("a", 1.0)]).await,
            Err(OutboxError::SequenceOverflow { .. })
        ));
        assert_eq!(outbox.acknowledge("a", u64::MAX - 1).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn open_refuses_bad_config_and_a_second_opener() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = OutboxConfig::at(dir.path());
        c.max_group = 0;
        assert!(matches!(Outbox::open(&c), Err(OutboxError::Config(_))));
        let _first = open(&dir);
        let second = Outbox::open(&OutboxConfig::at(dir.path()));
        assert!(
            matches!(&second, Err(OutboxError::Storage(m)) if m.contains("in use")),
            "{:?}",
            second.err()
        );
    }
}
