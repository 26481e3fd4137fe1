//! The shard actor: hosts many twins of one kind, one message at a time.

use super::clock::Clock;
use super::{Ctx, Twin, parse_timer_item, timer_item};
use crate::model::TimeMs;
use crate::store::{Fence, Key, Op, Store, WriteBatch};
use crate::{Error, Result};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;

/// Timers read from the store per round while firing what is due.
const DUE_PAGE: usize = 256;

/// A look at a twin, run inside its shard.
pub type InspectFn<T> = Box<dyn FnOnce(Option<&T>) + Send>;

/// A message to a shard.
pub enum ShardMsg<T: Twin> {
    /// Deliver `msg` to twin `id`, activating it if needed; the reply comes once the
    /// step's effects are durable.
    Deliver {
        /// The twin.
        id: String,
        /// The message.
        msg: T::Msg,
        /// Where the reply goes, if anybody waits for it.
        reply: Option<RpcReplyPort<Result<T::Reply>>>,
    },
    /// Look at a twin without changing it (activating it from its snapshot if needed);
    /// `f` gets `None` for a twin that has never existed.
    Inspect {
        /// The twin.
        id: String,
        /// What to do with it.
        f: InspectFn<T>,
    },
    /// Fire due timers and passivate idle twins, at the clock's time.
    Tick(Option<RpcReplyPort<Result<()>>>),
    /// Report counters.
    Stats(RpcReplyPort<ShardStats>),
}

/// A shard's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardStats {
    /// Twins in memory now.
    pub active: usize,
    /// Activations so far (from a snapshot or new).
    pub activations: u64,
    /// Twins dropped from memory for being idle.
    pub passivations: u64,
    /// Messages handled.
    pub messages: u64,
    /// Timers fired.
    pub timers_fired: u64,
    /// Steps whose batch the store refused (the twin was reloaded).
    pub refused: u64,
}

impl std::ops::AddAssign for ShardStats {
    fn add_assign(&mut self, o: Self) {
        self.active += o.active;
        self.activations += o.activations;
        self.passivations += o.passivations;
        self.messages += o.messages;
        self.timers_fired += o.timers_fired;
        self.refused += o.refused;
    }
}

/// What a shard starts with.
pub struct ShardArgs<T: Twin> {
    /// The shard's number.
    pub shard: u32,
    /// Where twins are kept.
    pub store: Arc<dyn Store>,
    /// Where `now` comes from.
    pub clock: Arc<dyn Clock>,
    /// The kind's shared context.
    pub env: Arc<T::Env>,
    /// A twin idle this long is dropped from memory on the next tick.
    pub idle_ms: u64,
    /// The shard's lease fence, attached to every write (none on a single node).
    pub fence: Option<Fence>,
}

struct Slot<T> {
    twin: T,
    /// The snapshot version in the store (0: none yet).
    version: u64,
    last_active: TimeMs,
}

/// A shard's state: its twins in memory and what it needs to host them.
pub struct ShardState<T: Twin> {
    args: ShardArgs<T>,
    schedule: Key,
    outbox: Key,
    slots: HashMap<String, Slot<T>>,
    /// Earliest armed timer known; `None` until the schedule has been read once.
    next_due: Option<TimeMs>,
    stats: ShardStats,
}

/// The shard actor (behaviour only; its state is [`ShardState`]).
pub struct Shard<T>(PhantomData<fn() -> T>);

impl<T> Default for Shard<T> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

/// The key of twin `id`'s snapshot.
pub(crate) fn snapshot_key<T: Twin>(id: &str) -> Key {
    Key::new(format!("{}/{id}", T::KIND))
}

impl<T: Twin> ShardState<T> {
    fn snapshot_key(id: &str) -> Key {
        snapshot_key::<T>(id)
    }

    async fn activate(&mut self, id: &str, create: bool) -> Result<bool> {
        if self.slots.contains_key(id) {
            return Ok(true);
        }
        let stored = self.args.store.snapshot(&Self::snapshot_key(id)).await?;
        let (twin, version) = match stored {
            Some(v) => (T::restore(id, &v.value, &self.args.env)?, v.version),
            None if create => (T::create(id, &self.args.env)?, 0),
            None => return Ok(false),
        };
        self.slots.insert(
            id.to_owned(),
            Slot {
                twin,
                version,
                last_active: self.args.clock.now_ms(),
            },
        );
        self.stats.activations += 1;
        Ok(true)
    }

    /// Runs one step of twin `id` and makes it durable.
    async fn step<R>(
        &mut self,
        id: &str,
        extra: Option<Op>,
        run: impl FnOnce(&mut T, &mut Ctx, &T::Env) -> R,
    ) -> Result<R> {
        self.activate(id, true).await?;
        let now = self.args.clock.now_ms();
        let mut ctx = Ctx::new(now, id, self.schedule.clone(), self.outbox.clone());
        let slot = self.slots.get_mut(id).expect("activated above");
        let out = run(&mut slot.twin, &mut ctx, &self.args.env);
        if let Some(op) = extra {
            ctx.op(op);
        }
        slot.last_active = now;
        let key = Self::snapshot_key(id);
        let version = slot.version;
        let batch: WriteBatch = ctx.into_batch(self.args.fence.clone(), || {
            Some(Op::PutSnapshot {
                key,
                expected_version: version,
                value: slot.twin.snapshot(),
            })
        });
        if batch.ops.is_empty() {
            return Ok(out);
        }
        let writes_snapshot = batch
            .ops
            .iter()
            .any(|op| matches!(op, Op::PutSnapshot { .. }));
        let earliest_armed = batch
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::Schedule { due_ms, .. } => Some(*due_ms),
                _ => None,
            })
            .min();
        match self.args.store.commit(batch).await {
            Ok(_) => {
                if writes_snapshot {
                    slot.version += 1;
                }
                if let (Some(due), Some(next)) = (earliest_armed, self.next_due) {
                    self.next_due = Some(next.min(due));
                }
                Ok(out)
            }
            Err(e) => {
                // Memory must not run ahead of the store: forget the twin, reload it next time.
                tracing::warn!(shard = self.args.shard, twin = id, error = %e, "step refused, twin reloaded");
                self.slots.remove(id);
                self.stats.refused += 1;
                Err(e)
            }
        }
    }

    async fn tick(&mut self) -> Result<()> {
        let now = self.args.clock.now_ms();
        if self.next_due.is_none_or(|d| d <= now) {
            loop {
                let due = self
                    .args
                    .store
                    .read_due(&self.schedule, now, DUE_PAGE)
                    .await?;
                let n = due.len();
                for d in due {
                    let unschedule = Op::Unschedule {
                        schedule: self.schedule.clone(),
                        due_ms: d.due_ms,
                        item: d.item.clone(),
                    };
                    let Some((id, tag)) = parse_timer_item(&d.item) else {
                        tracing::warn!(shard = self.args.shard, "unreadable timer dropped");
                        self.args
                            .store
                            .commit(WriteBatch::new().with(unschedule))
                            .await?;
                        continue;
                    };
                    let (id, tag) = (id.to_owned(), tag.to_owned());
                    debug_assert_eq!(timer_item(&id, &tag), d.item);
                    self.step(&id, Some(unschedule), |t, ctx, env| {
                        t.on_timer(&tag, ctx, env)
                    })
                    .await?;
                    self.stats.timers_fired += 1;
                }
                if n < DUE_PAGE {
                    break;
                }
            }
            let next = self
                .args
                .store
                .read_due(&self.schedule, u64::MAX, 1)
                .await?;
            self.next_due = Some(next.first().map_or(u64::MAX, |d| d.due_ms));
        }
        let idle_ms = self.args.idle_ms;
        let before = self.slots.len();
        self.slots
            .retain(|_, s| now.saturating_sub(s.last_active) < idle_ms);
        self.stats.passivations += (before - self.slots.len()) as u64;
        Ok(())
    }
}

impl<T: Twin> Actor for Shard<T> {
    type Msg = ShardMsg<T>;
    type State = ShardState<T>;
    type Arguments = ShardArgs<T>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: ShardArgs<T>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(ShardState {
            schedule: Key::new(format!("timers/{}/{}", T::KIND, args.shard)),
            outbox: Key::new(format!("outbox/{}/{}", T::KIND, args.shard)),
            args,
            slots: HashMap::new(),
            next_due: None,
            stats: ShardStats::default(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: ShardMsg<T>,
        state: &mut ShardState<T>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardMsg::Deliver { id, msg, reply } => {
                state.stats.messages += 1;
                let out = state
                    .step(&id, None, |t, ctx, env| t.handle(msg, ctx, env))
                    .await;
                if let Some(reply) = reply {
                    // The caller may have given up; its loss, not the shard's.
                    let _ = reply.send(out);
                }
            }
            ShardMsg::Inspect { id, f } => match state.activate(&id, false).await {
                Ok(true) => f(state.slots.get(&id).map(|s| &s.twin)),
                Ok(false) => f(None),
                Err(e) => {
                    tracing::warn!(twin = %id, error = %e, "inspect failed to activate");
                    f(None);
                }
            },
            ShardMsg::Tick(reply) => {
                let out = state.tick().await;
                if let Err(e) = &out {
                    tracing::warn!(shard = state.args.shard, error = %e, "tick failed");
                }
                if let Some(reply) = reply {
                    let _ = reply.send(out);
                }
            }
            ShardMsg::Stats(reply) => {
                let stats = ShardStats {
                    active: state.slots.len(),
                    ..state.stats
                };
                let _ = reply.send(stats);
            }
        }
        Ok(())
    }
}

impl<T: Twin> From<ractor::MessagingErr<ShardMsg<T>>> for Error {
    fn from(e: ractor::MessagingErr<ShardMsg<T>>) -> Self {
        let what = match e {
            ractor::MessagingErr::SendErr(_) => "shard stopped",
            ractor::MessagingErr::ChannelClosed => "shard channel closed",
            ractor::MessagingErr::InvalidActorType => "wrong actor type",
        };
        Error::Host(what.into())
    }
}
