//! The storage port: everything the deciding code needs to keep, and nothing more.
//!
//! Backends (embedded, PostgreSQL, FoundationDB) live in `caretwin-cluster` and implement
//! [`Store`]. Every backend passes the same conformance suite (`conformance` feature).
//!
//! # Model
//! - **Twin snapshots** under a [`Key`], each with a version. A write names the version it
//!   expects (0: absent) and fails with [`Error::VersionConflict`] otherwise.
//! - **High-water marks**: per device, the highest reading sequence number applied to its
//!   twin. They only move forward, by compare-and-set, in the same batch as the effect of the
//!   readings, so a replayed reading can never be applied twice.
//! - **Logs**: append-only, per log key, indexed from 1 by the store, read by range.
//! - **Idempotency records**: the recorded intent or outcome of a side effect.
//! - **Outbox queues**: outbound effects enqueued atomically with the state change that
//!   caused them, delivered by a dispatcher, then acknowledged (removed).
//! - **Timers**: per schedule, items due at a time, read back earliest first, so a twin's
//!   "wait six hours" survives passivation and restarts.
//! - **Leases** with expiry and a fencing token. A [`WriteBatch`] may carry a [`Fence`]; the
//!   store refuses the whole batch when the fence's token is not the lease's current one,
//!   so a stale owner can never overwrite the new owner's state.
//!
//! Every mutation is a [`WriteBatch`], applied atomically: all of its operations or none.
//! A batch is acknowledged only once it is durable.
//!
//! # Limits
//! Shaped so every backend can honour them, FoundationDB included (keys ≤ 10 kB,
//! values ≤ 100 kB, transactions ≤ 10 MB and ≤ 5 s): see [`MAX_KEY_BYTES`],
//! [`MAX_VALUE_BYTES`], [`MAX_BATCH_BYTES`], [`MAX_BATCH_OPS`], [`MAX_RANGE`].
//!
//! # Time
//! The store has no clock: lease operations take `now_ms` from the caller, so the same
//! code runs under a real clock and in virtual time.

use crate::{Error, Result};
use async_trait::async_trait;

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest value, in bytes (FoundationDB's limit is 100,000; this leaves room for framing).
pub const MAX_VALUE_BYTES: usize = 96 * 1024;
/// Largest write batch, summing keys and values, in bytes (FoundationDB: 10 MB a transaction).
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Most operations in one write batch.
pub const MAX_BATCH_OPS: usize = 10_000;
/// Most entries one range read returns.
pub const MAX_RANGE: usize = 10_000;
/// Longest lease a holder may take, in milliseconds (an hour).
pub const MAX_LEASE_TTL_MS: u64 = 3_600_000;

/// A key in one of the store's namespaces: a twin, a device, a log, a queue, a lease.
///
/// Any string may be wrapped; the store refuses invalid ones (empty, longer than
/// [`MAX_KEY_BYTES`], or holding a NUL byte) with [`Error::InvalidKey`] and changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

impl Key {
    /// Wraps a string as a key. It is validated where it is used.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The key's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Checks the key against the store's rules.
    pub fn validate(&self) -> Result<()> {
        let reason = if self.0.is_empty() {
            "empty"
        } else if self.0.len() > MAX_KEY_BYTES {
            "longer than 1024 bytes"
        } else if self.0.as_bytes().contains(&0) {
            "contains a NUL byte"
        } else {
            return Ok(());
        };
        Err(Error::InvalidKey {
            key: self.display_prefix(),
            reason,
        })
    }

    /// The key shortened for error messages.
    fn display_prefix(&self) -> String {
        let mut end = self.0.len().min(64);
        while !self.0.is_char_boundary(end) {
            end -= 1;
        }
        self.0[..end].to_owned()
    }
}

impl From<&str> for Key {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<String> for Key {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A stored value with its version (versions start at 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The version of this value.
    pub version: u64,
    /// The value.
    pub value: Vec<u8>,
}

/// One entry of a log or an outbox queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Position in its log or queue, from 1, increasing by one per append.
    pub index: u64,
    /// The entry.
    pub value: Vec<u8>,
}

/// A lease: a named, expiring claim with a fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The lease's name (e.g. `shard/17`).
    pub name: Key,
    /// Who holds it (e.g. a node id).
    pub holder: String,
    /// The fencing token, increased each time the lease changes hands.
    pub token: u64,
    /// When the lease expires, Unix ms. A released lease has expiry 0.
    pub expires_at_ms: u64,
}

impl Lease {
    /// The fence to attach to writes made under this lease.
    pub fn fence(&self) -> Fence {
        Fence {
            lease: self.name.clone(),
            token: self.token,
        }
    }
}

/// Proof of ownership a writer attaches to a batch: the batch is refused unless `token`
/// is the current token of lease `lease`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The lease.
    pub lease: Key,
    /// The token the writer was granted.
    pub token: u64,
}

/// What an idempotency write does when the key exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdempotencyMode {
    /// Fail the batch with [`Error::IdempotencyExists`]: the effect was already claimed.
    CreateOnly,
    /// Replace the record (e.g. intent → outcome).
    Overwrite,
}

/// One operation of a [`WriteBatch`].
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Write a twin snapshot if its version is `expected_version` (0: absent); the new
    /// version is `expected_version + 1`.
    PutSnapshot {
        /// The twin.
        key: Key,
        /// The version the writer read (0: none).
        expected_version: u64,
        /// The new snapshot.
        value: Vec<u8>,
    },
    /// Delete a twin snapshot if its version is `expected_version`.
    DeleteSnapshot {
        /// The twin.
        key: Key,
        /// The version the writer read.
        expected_version: u64,
    },
    /// Move a device's applied high-water mark from `from` to `to` (`to > from`).
    AdvanceHighWater {
        /// The device.
        device: Key,
        /// The mark the writer read (0: nothing applied yet).
        from: u64,
        /// The new mark.
        to: u64,
    },
    /// Append an entry to a log; the store assigns the index.
    Append {
        /// The log.
        log: Key,
        /// The entry.
        value: Vec<u8>,
    },
    /// Drop a log's entries with an index below `before` (retention). Indexes are never
    /// reused: later appends go on counting from the log's last index, and reads from an
    /// index that was trimmed start at the first entry kept. Trimming what is already gone
    /// is not an error.
    TrimLog {
        /// The log.
        log: Key,
        /// The first index kept.
        before: u64,
    },
    /// Record an idempotency record.
    PutIdempotency {
        /// The idempotency key (e.g. `part-order/<case>/<part>`).
        key: Key,
        /// The record (intent or outcome).
        value: Vec<u8>,
        /// What happens if the key exists.
        mode: IdempotencyMode,
    },
    /// Enqueue an outbound effect; the store assigns its index in the queue.
    Enqueue {
        /// The outbox queue.
        queue: Key,
        /// The effect.
        value: Vec<u8>,
    },
    /// Remove a delivered effect from its queue. Removing an absent entry is not an error,
    /// so a retried acknowledgement is harmless.
    Dequeue {
        /// The outbox queue.
        queue: Key,
        /// The entry's index.
        index: u64,
    },
    /// Arm a timer: `item` becomes due at `due_ms` in `schedule`. Arming the same
    /// (due, item) twice keeps one timer.
    Schedule {
        /// The schedule (e.g. one per shard).
        schedule: Key,
        /// When it is due, Unix ms.
        due_ms: u64,
        /// What is due (e.g. a twin id and a timer tag); at most [`MAX_KEY_BYTES`].
        item: Vec<u8>,
    },
    /// Disarm a timer (fired or cancelled). Disarming an absent timer is not an error.
    Unschedule {
        /// The schedule.
        schedule: Key,
        /// When it was due.
        due_ms: u64,
        /// What was due.
        item: Vec<u8>,
    },
}

impl Op {
    /// Keys and values in bytes, for the batch size limit.
    fn byte_len(&self) -> usize {
        match self {
            Op::PutSnapshot { key, value, .. } | Op::PutIdempotency { key, value, .. } => {
                key.0.len() + value.len()
            }
            Op::Append { log: key, value } | Op::Enqueue { queue: key, value } => {
                key.0.len() + value.len()
            }
            Op::DeleteSnapshot { key, .. } => key.0.len(),
            Op::Schedule { schedule, item, .. } | Op::Unschedule { schedule, item, .. } => {
                schedule.0.len() + item.len() + 8
            }
            Op::AdvanceHighWater { device, .. } => device.0.len() + 8,
            Op::Dequeue { queue, .. } => queue.0.len() + 8,
            Op::TrimLog { log, .. } => log.0.len() + 8,
        }
    }

    fn validate(&self) -> Result<()> {
        let check_value = |key: &Key, value: &[u8]| {
            if value.len() > MAX_VALUE_BYTES {
                return Err(Error::ValueTooLarge {
                    key: key.display_prefix(),
                    len: value.len(),
                    max: MAX_VALUE_BYTES,
                });
            }
            Ok(())
        };
        match self {
            Op::PutSnapshot { key, value, .. } | Op::PutIdempotency { key, value, .. } => {
                key.validate()?;
                check_value(key, value)
            }
            Op::Append { log: key, value } | Op::Enqueue { queue: key, value } => {
                key.validate()?;
                check_value(key, value)
            }
            Op::DeleteSnapshot {
                key,
                expected_version,
            } => {
                key.validate()?;
                if *expected_version == 0 {
                    return Err(Error::InvalidArgument {
                        name: "expected_version",
                        reason: format!("deleting {key:?} needs the version read, not 0"),
                    });
                }
                Ok(())
            }
            Op::AdvanceHighWater { device, from, to } => {
                device.validate()?;
                if to <= from {
                    return Err(Error::InvalidArgument {
                        name: "to",
                        reason: format!(
                            "high-water mark of {device:?} must move forward, {from} -> {to}"
                        ),
                    });
                }
                Ok(())
            }
            Op::Schedule { schedule, item, .. } | Op::Unschedule { schedule, item, .. } => {
                schedule.validate()?;
                if item.is_empty() || item.len() > MAX_KEY_BYTES {
                    return Err(Error::InvalidArgument {
                        name: "item",
                        reason: format!(
                            "timer items in {schedule:?} must be 1..={MAX_KEY_BYTES} bytes, got {}",
                            item.len()
                        ),
                    });
                }
                Ok(())
            }
            Op::TrimLog { log, before } => {
                log.validate()?;
                if *before == 0 {
                    return Err(Error::InvalidArgument {
                        name: "before",
                        reason: "log indexes start at 1; trimming before 0 means nothing".into(),
                    });
                }
                Ok(())
            }
            Op::Dequeue { queue, index } => {
                queue.validate()?;
                if *index == 0 {
                    return Err(Error::InvalidArgument {
                        name: "index",
                        reason: "queue indexes start at 1".into(),
                    });
                }
                Ok(())
            }
        }
    }
}

/// A set of operations applied atomically, optionally fenced by a lease.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WriteBatch {
    /// When set, the batch is refused unless this fence is current.
    pub fence: Option<Fence>,
    /// The operations, applied in order.
    pub ops: Vec<Op>,
}

impl WriteBatch {
    /// An empty, unfenced batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty batch fenced by `fence`.
    pub fn fenced(fence: Fence) -> Self {
        Self {
            fence: Some(fence),
            ops: Vec::new(),
        }
    }

    /// Adds an operation.
    pub fn push(&mut self, op: Op) -> &mut Self {
        self.ops.push(op);
        self
    }

    /// Adds an operation, builder style.
    pub fn with(mut self, op: Op) -> Self {
        self.ops.push(op);
        self
    }

    /// Checks the batch against the limits and every key and value in it. Backends call
    /// this before touching anything.
    pub fn validate(&self) -> Result<()> {
        if self.ops.is_empty() {
            return Err(Error::InvalidBatch {
                reason: "no operations".into(),
            });
        }
        if self.ops.len() > MAX_BATCH_OPS {
            return Err(Error::InvalidBatch {
                reason: format!(
                    "{} operations, the limit is {MAX_BATCH_OPS}",
                    self.ops.len()
                ),
            });
        }
        if let Some(fence) = &self.fence {
            fence.lease.validate()?;
        }
        let mut bytes = 0usize;
        for op in &self.ops {
            op.validate()?;
            bytes += op.byte_len();
        }
        if bytes > MAX_BATCH_BYTES {
            return Err(Error::InvalidBatch {
                reason: format!("{bytes} bytes, the limit is {MAX_BATCH_BYTES}"),
            });
        }
        Ok(())
    }
}

/// What one operation of a committed batch produced, in the order of the batch's ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// A snapshot now has this version.
    Snapshot {
        /// The new version.
        version: u64,
    },
    /// A snapshot was deleted.
    Deleted,
    /// A high-water mark now stands here.
    HighWater {
        /// The new mark.
        seq: u64,
    },
    /// A log entry or outbox entry was given this index.
    Index {
        /// The entry's index.
        index: u64,
    },
    /// An idempotency record was written.
    Recorded,
    /// An outbox entry was removed (or was already gone).
    Dequeued,
    /// A log's entries below an index were dropped (or were already gone).
    Trimmed,
    /// A timer was armed.
    Scheduled,
    /// A timer was disarmed (or was already gone).
    Unscheduled,
}

/// A timer read back from a schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// When it is due, Unix ms.
    pub due_ms: u64,
    /// What is due.
    pub item: Vec<u8>,
}

/// The storage port. Every method validates its input and refuses bad input with a clear
/// error and no change.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies a batch atomically and durably, or not at all. Returns what each operation
    /// produced.
    async fn commit(&self, batch: WriteBatch) -> Result<Vec<Applied>>;

    /// Reads a twin snapshot.
    async fn snapshot(&self, key: &Key) -> Result<Option<Versioned>>;

    /// Reads a device's applied high-water mark (0: nothing applied).
    async fn high_water(&self, device: &Key) -> Result<u64>;

    /// Reads up to `limit` entries of a log, from index `from` on, in index order.
    async fn read_log(&self, log: &Key, from: u64, limit: usize) -> Result<Vec<Entry>>;

    /// Reads an idempotency record.
    async fn idempotency(&self, key: &Key) -> Result<Option<Vec<u8>>>;

    /// Reads up to `limit` pending entries of an outbox queue, oldest first, from index
    /// `from` on.
    async fn read_outbox(&self, queue: &Key, from: u64, limit: usize) -> Result<Vec<Entry>>;

    /// Reads up to `limit` timers of `schedule` due at or before `until_ms`, earliest first
    /// (ties in item order).
    async fn read_due(&self, schedule: &Key, until_ms: u64, limit: usize) -> Result<Vec<Due>>;

    /// Takes a lease for `ttl_ms` if it is free, expired, or already held by `holder`
    /// (then it is extended, keeping its token). Taking it from another holder, or after
    /// it expired or was released, increases the token.
    async fn acquire_lease(
        &self,
        name: &Key,
        holder: &str,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<Lease>;

    /// Extends a held lease. Fails with [`Error::LeaseLost`] if its token is no longer
    /// current.
    async fn renew_lease(&self, lease: &Lease, ttl_ms: u64, now_ms: u64) -> Result<Lease>;

    /// Gives a lease up so another holder can take it at once. Fails with
    /// [`Error::LeaseLost`] if its token is no longer current.
    async fn release_lease(&self, lease: &Lease) -> Result<()>;

    /// Reads a lease.
    async fn lease(&self, name: &Key) -> Result<Option<Lease>>;
}

/// Checks a range read's arguments. Backends call this first.
pub fn validate_range(key: &Key, from: u64, limit: usize) -> Result<()> {
    key.validate()?;
    if from == 0 {
        return Err(Error::InvalidArgument {
            name: "from",
            reason: "indexes start at 1".into(),
        });
    }
    if limit == 0 || limit > MAX_RANGE {
        return Err(Error::InvalidArgument {
            name: "limit",
            reason: format!("{limit} is outside 1..={MAX_RANGE}"),
        });
    }
    Ok(())
}

/// Checks a due-timer read's arguments. Backends call this first.
pub fn validate_due(schedule: &Key, limit: usize) -> Result<()> {
    schedule.validate()?;
    if limit == 0 || limit > MAX_RANGE {
        return Err(Error::InvalidArgument {
            name: "limit",
            reason: format!("{limit} is outside 1..={MAX_RANGE}"),
        });
    }
    Ok(())
}

/// Checks a lease request's arguments. Backends call this first.
pub fn validate_lease_request(name: &Key, holder: &str, ttl_ms: u64) -> Result<()> {
    name.validate()?;
    if holder.is_empty() || holder.len() > MAX_KEY_BYTES || holder.contains('\0') {
        return Err(Error::InvalidArgument {
            name: "holder",
            reason: format!("{holder:?} must be 1..={MAX_KEY_BYTES} bytes with no NUL"),
        });
    }
    if ttl_ms == 0 || ttl_ms > MAX_LEASE_TTL_MS {
        return Err(Error::InvalidArgument {
            name: "ttl_ms",
            reason: format!("{ttl_ms} is outside 1..={MAX_LEASE_TTL_MS}"),
        });
    }
    Ok(())
}

/// The lease decision every backend applies inside its transaction: given the current
/// lease (if any), what a request by `holder` at `now_ms` yields.
pub fn decide_acquire(
    current: Option<&Lease>,
    name: &Key,
    holder: &str,
    ttl_ms: u64,
    now_ms: u64,
) -> Result<Lease> {
    let expires_at_ms = now_ms.saturating_add(ttl_ms);
    let token = match current {
        None => 1,
        Some(l) if l.holder == holder && l.expires_at_ms > now_ms => l.token,
        Some(l) if l.expires_at_ms <= now_ms => l.token + 1,
        Some(l) => {
            return Err(Error::LeaseHeld {
                name: name.0.clone(),
                holder: l.holder.clone(),
                expires_at_ms: l.expires_at_ms,
            });
        }
    };
    Ok(Lease {
        name: name.clone(),
        holder: holder.to_owned(),
        token,
        expires_at_ms,
    })
}

/// The renewal decision: the lease is extended only if its token is still current.
pub fn decide_renew(
    current: Option<&Lease>,
    held: &Lease,
    ttl_ms: u64,
    now_ms: u64,
) -> Result<Lease> {
    match current {
        Some(c) if c.token == held.token && c.holder == held.holder && c.expires_at_ms != 0 => {
            Ok(Lease {
                expires_at_ms: now_ms.saturating_add(ttl_ms),
                ..c.clone()
            })
        }
        _ => Err(Error::LeaseLost {
            name: held.name.0.clone(),
            token: held.token,
        }),
    }
}

/// The release decision: the released lease keeps its token and expires at once.
pub fn decide_release(current: Option<&Lease>, held: &Lease) -> Result<Lease> {
    match current {
        Some(c) if c.token == held.token && c.holder == held.holder && c.expires_at_ms != 0 => {
            Ok(Lease {
                expires_at_ms: 0,
                ..c.clone()
            })
        }
        _ => Err(Error::LeaseLost {
            name: held.name.0.clone(),
            token: held.token,
        }),
    }
}

/// The fence check: `Ok` when `fence` names the lease's current token.
pub fn check_fence(current: Option<&Lease>, fence: &Fence) -> Result<()> {
    let current_token = current.map_or(0, |l| l.token);
    if current_token == fence.token && current_token != 0 {
        Ok(())
    } else {
        Err(Error::StaleFence {
            lease: fence.lease.0.clone(),
            presented: fence.token,
            current: current_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        assert!(Key::from("shard/1").validate().is_ok());
        assert!(matches!(
            Key::from("").validate(),
            Err(Error::InvalidKey {
                reason: "empty",
                ..
            })
        ));
        assert!(Key::new("x".repeat(MAX_KEY_BYTES + 1)).validate().is_err());
        assert!(Key::from("a\0b").validate().is_err());
        // Error messages never carry a huge key, and never split a character.
        let err = Key::new("é".repeat(MAX_KEY_BYTES)).validate().unwrap_err();
        assert!(err.to_string().len() < 200, "{err}");
    }

    #[test]
    fn batches_are_bounded() {
        assert!(WriteBatch::new().validate().is_err(), "empty batch");
        let big = Op::Append {
            log: "l".into(),
            value: vec![0; MAX_VALUE_BYTES + 1],
        };
        assert!(matches!(
            WriteBatch::new().with(big).validate(),
            Err(Error::ValueTooLarge { .. })
        ));
        let mut many = WriteBatch::new();
        for _ in 0..=MAX_BATCH_OPS {
            many.push(Op::Dequeue {
                queue: "q".into(),
                index: 1,
            });
        }
        assert!(matches!(many.validate(), Err(Error::InvalidBatch { .. })));
        let mut heavy = WriteBatch::new();
        for _ in 0..(MAX_BATCH_BYTES / MAX_VALUE_BYTES + 1) {
            heavy.push(Op::Append {
                log: "l".into(),
                value: vec![0; MAX_VALUE_BYTES],
            });
        }
        assert!(matches!(heavy.validate(), Err(Error::InvalidBatch { .. })));
        let backwards = Op::AdvanceHighWater {
            device: "d".into(),
            from: 5,
            to: 5,
        };
        assert!(WriteBatch::new().with(backwards).validate().is_err());
    }

    #[test]
    fn lease_decisions() {
        let name = Key::from("shard/1");
        let a = decide_acquire(None, &name, "a", 100, 0).unwrap();
        assert_eq!((a.token, a.expires_at_ms), (1, 100));
        // Held by a, not expired: b is refused, a extends with the same token.
        assert!(matches!(
            decide_acquire(Some(&a), &name, "b", 100, 50),
            Err(Error::LeaseHeld { .. })
        ));
        let a2 = decide_acquire(Some(&a), &name, "a", 100, 50).unwrap();
        assert_eq!((a2.token, a2.expires_at_ms), (1, 150));
        // Expired: b takes it with a new token; a's fence is now stale.
        let b = decide_acquire(Some(&a2), &name, "b", 100, 150).unwrap();
        assert_eq!(b.token, 2);
        assert!(check_fence(Some(&b), &a2.fence()).is_err());
        assert!(check_fence(Some(&b), &b.fence()).is_ok());
        assert!(decide_renew(Some(&b), &a2, 100, 160).is_err());
        // Released: the next acquirer gets a new token at once.
        let released = decide_release(Some(&b), &b).unwrap();
        let c = decide_acquire(Some(&released), &name, "c", 100, 151).unwrap();
        assert_eq!(c.token, 3);
        // No lease at all: every fence is stale.
        assert!(
            check_fence(
                None,
                &Fence {
                    lease: name,
                    token: 0
                }
            )
            .is_err()
        );
    }
}
