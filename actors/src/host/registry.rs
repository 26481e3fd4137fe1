//! The registry: a fixed set of shards for one kind of twin, and the routing of a twin id
//! to its shard.

use super::clock::Clock;
use super::remote::{self, Elsewhere, Monitor};
use super::shard::{Shard, ShardArgs, ShardMsg, ShardStats};
use super::{Twin, shard_of};
use crate::store::{Fence, Store};
use crate::{Error, Result};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// How twins of one kind are hosted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Shards on this node (fixed for the life of the data: a twin's shard is a hash of its
    /// id modulo this number).
    #[serde(default = "default_shards")]
    pub shards: u32,
    /// A twin idle this long is dropped from memory (its state is already stored).
    #[serde(default = "default_idle_ms")]
    pub idle_ms: u64,
}

fn default_shards() -> u32 {
    64
}
fn default_idle_ms() -> u64 {
    10 * 60 * 1000
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            shards: default_shards(),
            idle_ms: default_idle_ms(),
        }
    }
}

/// How long a call waits for its twin's shard to be hosted somewhere (it is moving, or
/// its node failed and the lease has to run out) before it fails with
/// [`Error::NotHosted`].
pub const HOSTING_WAIT: Duration = Duration::from_secs(15);

/// A shard hosted here.
struct Hosted<T: Twin> {
    actor: ActorRef<ShardMsg<T>>,
    handle: tokio::task::JoinHandle<()>,
    token: u64,
}

/// What the registry needs to start a shard.
struct Parts<T: Twin> {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    env: Arc<T::Env>,
    idle_ms: u64,
}

/// The twins of kind `T`: the shards hosted on this node, and the way to the others.
///
/// On a single node every shard is hosted here for the life of the registry
/// ([`Registry::start`]). In a cluster ([`Registry::start_placed`]) the node's membership
/// loop hosts and drops shards as it gains and loses their leases; a call for a twin whose
/// shard is hosted elsewhere goes through [`Elsewhere`], and a call for a shard hosted
/// nowhere yet waits for it (up to [`HOSTING_WAIT`]).
pub struct Registry<T: Twin> {
    count: u32,
    parts: Parts<T>,
    hosted: std::sync::RwLock<Vec<Option<Hosted<T>>>>,
    elsewhere: std::sync::OnceLock<Arc<dyn Elsewhere>>,
    monitor: std::sync::OnceLock<Arc<dyn Monitor>>,
}

fn call_result<R>(r: CallResult<R>) -> Result<R> {
    match r {
        CallResult::Success(v) => Ok(v),
        CallResult::Timeout => Err(Error::Host("shard did not answer in time".into())),
        CallResult::SenderError => Err(Error::Host("shard stopped before answering".into())),
    }
}

impl<T: Twin> Registry<T> {
    /// Starts all `config.shards` shards here, with no lease (one node).
    pub async fn start(
        config: HostConfig,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        env: Arc<T::Env>,
    ) -> Result<Self> {
        let r = Self::start_placed(config, store, clock, env)?;
        for shard in 0..config.shards {
            r.host(shard, None).await?;
        }
        Ok(r)
    }

    /// A registry hosting no shard yet: the node's membership loop hosts them
    /// ([`Registry::host`]) as it acquires their leases.
    pub fn start_placed(
        config: HostConfig,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        env: Arc<T::Env>,
    ) -> Result<Self> {
        if config.shards == 0 {
            return Err(Error::Config("shards must be at least 1".into()));
        }
        Ok(Self {
            count: config.shards,
            parts: Parts {
                store,
                clock,
                env,
                idle_ms: config.idle_ms,
            },
            hosted: std::sync::RwLock::new((0..config.shards).map(|_| None).collect()),
            elsewhere: std::sync::OnceLock::new(),
            monitor: std::sync::OnceLock::new(),
        })
    }

    /// Sets where calls for shards hosted on other nodes go (once).
    pub fn set_elsewhere(&self, elsewhere: Arc<dyn Elsewhere>) {
        let _ = self.elsewhere.set(elsewhere);
    }

    /// Sets who learns of shards hosted and dropped here (once, before hosting any).
    pub fn set_monitor(&self, monitor: Arc<dyn Monitor>) {
        let _ = self.monitor.set(monitor);
    }

    /// The number of shards of this kind (the same on every node).
    pub fn shard_count(&self) -> u32 {
        self.count
    }

    /// The shards hosted here now.
    pub fn hosted(&self) -> Vec<u32> {
        let hosted = self.hosted.read().expect("registry lock");
        (0..self.count)
            .filter(|&s| hosted[s as usize].is_some())
            .collect()
    }

    /// Hosts shard `shard` here; every write of its twins carries `fence` (the shard
    /// lease's token). Hosting a shard that is already hosted is an error.
    pub async fn host(&self, shard: u32, fence: Option<Fence>) -> Result<()> {
        self.check_shard(shard)?;
        if self.hosted.read().expect("registry lock")[shard as usize].is_some() {
            return Err(Error::Host(format!(
                "shard {shard} of {} is hosted already",
                T::KIND
            )));
        }
        let token = fence.as_ref().map_or(0, |f| f.token);
        let args = ShardArgs {
            shard,
            store: self.parts.store.clone(),
            clock: self.parts.clock.clone(),
            env: self.parts.env.clone(),
            idle_ms: self.parts.idle_ms,
            fence,
        };
        let (actor, handle) = Actor::spawn(None, Shard::<T>::default(), args)
            .await
            .map_err(|e| Error::Host(format!("cannot start shard {shard}: {e}")))?;
        if let Some(m) = self.monitor.get() {
            m.hosted(T::KIND, shard, token);
        }
        self.hosted.write().expect("registry lock")[shard as usize] = Some(Hosted {
            actor,
            handle,
            token,
        });
        Ok(())
    }

    /// Stops hosting shard `shard`. With `drain`, what is queued for it is handled first
    /// (a hand-over); without, it stops at once and queued messages fail back to their
    /// callers, who send them again (its lease can no longer be counted on). Returns when
    /// nothing of the shard runs here any more; a shard not hosted is a no-op.
    pub async fn unhost(&self, shard: u32, drain: bool) {
        if shard >= self.count {
            return;
        }
        let Some(h) = self.hosted.write().expect("registry lock")[shard as usize].take() else {
            return;
        };
        if drain {
            let _ = h.actor.drain();
        } else {
            h.actor.kill();
        }
        let _ = h.handle.await;
        if let Some(m) = self.monitor.get() {
            m.unhosted(T::KIND, shard, h.token);
        }
    }

    fn check_shard(&self, shard: u32) -> Result<()> {
        if shard >= self.count {
            return Err(Error::InvalidArgument {
                name: "shard",
                reason: format!("{shard} is not below {}", self.count),
            });
        }
        Ok(())
    }

    fn local(&self, shard: u32) -> Option<ActorRef<ShardMsg<T>>> {
        self.hosted.read().expect("registry lock")[shard as usize]
            .as_ref()
            .map(|h| h.actor.clone())
    }

    fn shard_of(&self, id: &str) -> u32 {
        shard_of(id, self.count)
    }

    /// Sends `msg` to twin `id` and waits until its effects are durable, wherever the twin
    /// is hosted. A shard that moves on the way is followed; one hosted nowhere is waited
    /// for (up to [`HOSTING_WAIT`]).
    pub async fn call(&self, id: &str, msg: T::Msg) -> Result<T::Reply> {
        let shard = self.shard_of(id);
        let deadline = tokio::time::Instant::now() + HOSTING_WAIT;
        let mut pause = Duration::from_millis(2);
        loop {
            let r = match self.local(shard) {
                Some(actor) => Self::call_actor(&actor, id, msg.clone()).await,
                None => match self.elsewhere.get() {
                    Some(e) => {
                        let wire = remote::encode(&msg)?;
                        match e.forward(T::KIND, shard, id, wire).await {
                            Ok(bytes) => remote::decode_answer(T::KIND, shard, &bytes),
                            Err(e) => Err(e),
                        }
                    }
                    None => Err(self.not_hosted(shard, "no node hosts it")),
                },
            };
            match r {
                // The shard stopped or moved between the lookup and the call: follow it.
                Err(e @ (Error::NotHosted { .. } | Error::Host(_)))
                    if self.moving(shard, &e) && tokio::time::Instant::now() < deadline =>
                {
                    tracing::debug!(kind = T::KIND, shard, error = %e, "shard moving, call sent again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                r => return r,
            }
        }
    }

    /// Whether `e` from a call to `shard` means the shard is moving (try again), rather
    /// than a failure of the step itself.
    fn moving(&self, _shard: u32, e: &Error) -> bool {
        match e {
            Error::NotHosted { .. } => true,
            Error::Host(why) => why.starts_with("shard stopped") || why == "shard channel closed",
            _ => false,
        }
    }

    fn not_hosted(&self, shard: u32, reason: &str) -> Error {
        Error::NotHosted {
            kind: T::KIND.to_owned(),
            shard,
            reason: reason.to_owned(),
        }
    }

    async fn call_actor(actor: &ActorRef<ShardMsg<T>>, id: &str, msg: T::Msg) -> Result<T::Reply> {
        let id = id.to_owned();
        let r = actor
            .call(
                |reply| ShardMsg::Deliver {
                    id,
                    msg,
                    reply: Some(reply),
                },
                None,
            )
            .await?;
        call_result(r)?
    }

    /// Handles a call forwarded by another node: only a shard hosted here takes it
    /// ([`Error::NotHosted`] otherwise, so the sender looks again); never forwarded on.
    pub async fn call_here(&self, id: &str, msg: T::Msg) -> Result<T::Reply> {
        let shard = self.shard_of(id);
        match self.local(shard) {
            Some(actor) => match Self::call_actor(&actor, id, msg).await {
                Err(e) if self.moving(shard, &e) => {
                    Err(self.not_hosted(shard, "it stopped being hosted here"))
                }
                r => r,
            },
            None => Err(self.not_hosted(shard, "it is not hosted on this node")),
        }
    }

    /// A forwarded call in wire form: decodes `msg`, handles it here, encodes the answer.
    pub async fn call_here_wire(&self, id: &str, msg: &[u8]) -> Vec<u8> {
        let answer = match remote::decode::<T::Msg>(msg) {
            Ok(msg) => self.call_here(id, msg).await,
            Err(e) => Err(e),
        };
        remote::encode_answer(&answer)
    }

    /// Sends `msg` to twin `id` without waiting (hosted here; otherwise forwarded in the
    /// background).
    pub fn cast(&self, id: &str, msg: T::Msg) -> Result<()> {
        let shard = self.shard_of(id);
        match self.local(shard) {
            Some(actor) => {
                actor.cast(ShardMsg::Deliver {
                    id: id.to_owned(),
                    msg,
                    reply: None,
                })?;
                Ok(())
            }
            None => Err(self.not_hosted(shard, "casting needs the shard hosted here")),
        }
    }

    /// Looks at twin `id` (`None` if it never existed) without changing it. A twin hosted
    /// elsewhere is read from its stored snapshot, which is never behind the twin in
    /// memory (write-through).
    pub async fn inspect<R: Send + 'static>(
        &self,
        id: &str,
        f: impl FnOnce(Option<&T>) -> R + Send + 'static,
    ) -> Result<R> {
        let Some(actor) = self.local(self.shard_of(id)) else {
            let key = super::shard::snapshot_key::<T>(id);
            let twin = match self.parts.store.snapshot(&key).await? {
                Some(v) => Some(T::restore(id, &v.value, &self.parts.env)?),
                None => None,
            };
            return Ok(f(twin.as_ref()));
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        actor.cast(ShardMsg::Inspect {
            id: id.to_owned(),
            f: Box::new(move |t| {
                let _ = tx.send(f(t));
            }),
        })?;
        rx.await
            .map_err(|_| Error::Host("shard stopped before answering".into()))
    }

    fn actors(&self) -> Vec<ActorRef<ShardMsg<T>>> {
        self.hosted
            .read()
            .expect("registry lock")
            .iter()
            .flatten()
            .map(|h| h.actor.clone())
            .collect()
    }

    /// Fires due timers and passivates idle twins on every shard hosted here; returns when
    /// all are done.
    pub async fn tick(&self) -> Result<()> {
        for s in self.actors() {
            match s.call(|reply| ShardMsg::Tick(Some(reply)), None).await {
                Ok(r) => call_result(r)??,
                // Dropped meanwhile: its timers fire wherever it is hosted next.
                Err(ractor::MessagingErr::SendErr(_) | ractor::MessagingErr::ChannelClosed) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Counters summed over the shards hosted here.
    pub async fn stats(&self) -> Result<ShardStats> {
        let mut total = ShardStats::default();
        for s in self.actors() {
            let r = s
                .call(ShardMsg::Stats, Some(Duration::from_secs(30)))
                .await?;
            total += call_result(r)?;
        }
        Ok(total)
    }

    /// Stops every shard hosted here after the messages already queued, and waits for
    /// them.
    pub async fn stop(self) {
        for shard in 0..self.count {
            self.unhost(shard, true).await;
        }
    }
}
