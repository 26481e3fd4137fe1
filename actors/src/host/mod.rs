//! Hosting twins: many twins per ractor shard actor, activated on demand, passivated when
//! idle, with write-through snapshots and durable timers.
//!
//! A twin is an actor in behaviour — its own state, its messages handled one at a time,
//! addressed by id wherever it lives — but not one ractor actor per twin: a ractor actor
//! costs ~7.8 KB and a million twins must fit in ~2 GiB. So twins are state machines
//! ([`Twin`]) held by [`shard::Shard`] actors, many per shard. A shard handles one
//! message at a time, which gives each of its twins the one-at-a-time guarantee.
//!
//! # Write-through
//! Every message a twin handles ends in one atomic [`WriteBatch`]: the twin's extra
//! operations (high-water marks, log appends, idempotency records, outbox entries), its
//! timers, and its new snapshot when it changed, fenced by the shard's lease when there is
//! one. The reply goes out only after that batch is durable. If the batch is refused (a
//! stale fence, a conflicting version), the twin's in-memory state is dropped, so the next
//! message reloads what the store holds: memory never runs ahead of the store.
//!
//! So passivation needs no save: an idle twin is simply dropped from memory.
//!
//! # Timers
//! A twin arms a timer through its [`Ctx`]; the timer is a row of the shard's schedule in
//! the store, written in the same batch, so it survives passivation and restarts. On each
//! [`shard::ShardMsg::Tick`] the shard reads what is due, activates those twins and fires
//! their timers, each in its own batch that also disarms the timer.
//!
//! # Layout
//! - [`Twin`], [`Ctx`] — the contract a hosted twin implements, and its step output.
//! - [`clock`] — the clock port: [`clock::ManualClock`] for virtual time.
//! - [`shard`] — the shard actor.
//! - [`registry`] — routes a twin id to its shard: hosted here, or forwarded to the node
//!   that hosts it.
//! - [`remote`] — the port to other nodes (forwarding) and the wire form of answers.
//! - [`dispatch`] — delivers outbox mail in order, at least once, then removes it.

pub mod clock;
pub mod dispatch;
pub mod registry;
pub mod remote;
pub mod shard;

use crate::model::TimeMs;
use crate::store::{Key, Op, WriteBatch};

/// A hosted twin: a state machine the host feeds messages and timers, one at a time.
///
/// It does no I/O: time comes in `ctx.now()`, and everything it wants stored or done goes
/// out through `ctx`.
pub trait Twin: Sized + Send + 'static {
    /// What the twin is sent. Serializable and clonable: a message for a twin hosted on
    /// another node is forwarded there, and sent again if its shard moved on the way.
    type Msg: Clone + Send + serde::Serialize + serde::de::DeserializeOwned + 'static;
    /// What the twin answers, once its effects are durable (serializable: it may come back
    /// from another node).
    type Reply: Send + serde::Serialize + serde::de::DeserializeOwned + 'static;
    /// Read-only context shared by every twin of this kind (catalogue, policies).
    type Env: Send + Sync + 'static;

    /// The kind's name, the first part of its keys (`device`, `customer`).
    const KIND: &'static str;

    /// A twin seen for the first time.
    fn create(id: &str, env: &Self::Env) -> crate::Result<Self>;

    /// A twin restored from its snapshot.
    fn restore(id: &str, snapshot: &[u8], env: &Self::Env) -> crate::Result<Self>;

    /// The twin's snapshot, written when a step marks it changed.
    fn snapshot(&self) -> Vec<u8>;

    /// Handles one message.
    fn handle(&mut self, msg: Self::Msg, ctx: &mut Ctx, env: &Self::Env) -> Self::Reply;

    /// A timer armed earlier is due.
    fn on_timer(&mut self, tag: &str, ctx: &mut Ctx, env: &Self::Env);
}

/// What one step of a twin produced: store operations, timers, and whether its snapshot
/// changed. Built by the host, filled by the twin.
#[derive(Debug)]
pub struct Ctx {
    now: TimeMs,
    id: String,
    schedule: Key,
    outbox: Key,
    ops: Vec<Op>,
    changed: bool,
}

impl Ctx {
    /// A step context for twin `id` at `now`, with the shard's schedule and outbox.
    pub fn new(now: TimeMs, id: &str, schedule: Key, outbox: Key) -> Self {
        Self {
            now,
            id: id.to_owned(),
            schedule,
            outbox,
            ops: Vec::new(),
            changed: false,
        }
    }

    /// The time of this step.
    pub fn now(&self) -> TimeMs {
        self.now
    }

    /// Marks the twin's state as changed: its snapshot is written with this step.
    pub fn changed(&mut self) {
        self.changed = true;
    }

    /// Whether the snapshot is to be written.
    pub fn is_changed(&self) -> bool {
        self.changed
    }

    /// Adds a store operation to this step's batch.
    pub fn op(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// Enqueues an outbound effect in the shard's durable outbox, atomically with this
    /// step.
    pub fn emit(&mut self, effect: Vec<u8>) {
        self.ops.push(Op::Enqueue {
            queue: self.outbox.clone(),
            value: effect,
        });
    }

    /// Arms timer `tag` for `due_ms`. The twin keeps the (tag, due) pair if it wants to
    /// cancel it.
    pub fn arm(&mut self, due_ms: TimeMs, tag: &str) {
        self.ops.push(Op::Schedule {
            schedule: self.schedule.clone(),
            due_ms,
            item: timer_item(&self.id, tag),
        });
    }

    /// Disarms timer `tag` that was armed for `due_ms`.
    pub fn disarm(&mut self, due_ms: TimeMs, tag: &str) {
        self.ops.push(Op::Unschedule {
            schedule: self.schedule.clone(),
            due_ms,
            item: timer_item(&self.id, tag),
        });
    }

    /// The operations collected so far.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// Turns the step into its batch; `snapshot` is called only if the state changed.
    pub(crate) fn into_batch(
        self,
        fence: Option<crate::store::Fence>,
        snapshot: impl FnOnce() -> Option<Op>,
    ) -> WriteBatch {
        let mut batch = WriteBatch {
            fence,
            ops: self.ops,
        };
        if self.changed
            && let Some(op) = snapshot()
        {
            batch.ops.push(op);
        }
        batch
    }
}

/// Decodes a twin's JSON snapshot, naming the twin when it cannot.
pub fn decode_snapshot<T: serde::de::DeserializeOwned>(id: &str, bytes: &[u8]) -> crate::Result<T> {
    serde_json::from_slice(bytes).map_err(|e| crate::Error::Twin {
        id: id.to_owned(),
        reason: format!("unreadable snapshot: {e}"),
    })
}

/// A timer's item in the schedule: the twin id, a NUL, the tag.
pub(crate) fn timer_item(id: &str, tag: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(id.len() + 1 + tag.len());
    v.extend_from_slice(id.as_bytes());
    v.push(0);
    v.extend_from_slice(tag.as_bytes());
    v
}

/// Splits a timer item into twin id and tag.
pub(crate) fn parse_timer_item(item: &[u8]) -> Option<(&str, &str)> {
    let nul = item.iter().position(|&b| b == 0)?;
    let id = std::str::from_utf8(&item[..nul]).ok()?;
    let tag = std::str::from_utf8(&item[nul + 1..]).ok()?;
    Some((id, tag))
}

/// The stable shard of a twin id: the same on every node, process and version.
pub fn shard_of(id: &str, shards: u32) -> u32 {
    debug_assert!(shards > 0);
    (xxhash_rust::xxh3::xxh3_64(id.as_bytes()) % u64::from(shards)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_items_round_trip() {
        let item = timer_item("t1:dev-9", "remedy-wait");
        assert_eq!(parse_timer_item(&item), Some(("t1:dev-9", "remedy-wait")));
        assert_eq!(parse_timer_item(b"no-separator"), None);
    }

    #[test]
    fn shards_are_stable_and_spread() {
        // Stable: the same id always maps to the same shard (a fixed value guards against a
        // silent change of hash function, which would move every twin on upgrade).
        assert_eq!(
            shard_of("t1:device-42", 1024),
            shard_of("t1:device-42", 1024)
        );
        let first = shard_of("t1:device-42", 1024);
        assert_eq!(
            first,
            (xxhash_rust::xxh3::xxh3_64(b"t1:device-42") % 1024) as u32
        );
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            counts[shard_of(&format!("t1:device-{i}"), 16) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }
}
