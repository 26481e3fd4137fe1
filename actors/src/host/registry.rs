//! The registry: a fixed set of shards for one kind of twin, and the routing of a twin id
//! to its shard.

use super::clock::Clock;
use super::shard::{Shard, ShardArgs, ShardMsg, ShardStats};
use super::{Twin, shard_of};
use crate::store::Store;
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

/// The shards hosting every twin of kind `T` on this node.
pub struct Registry<T: Twin> {
    shards: Vec<ActorRef<ShardMsg<T>>>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

fn call_result<R>(r: CallResult<R>) -> Result<R> {
    match r {
        CallResult::Success(v) => Ok(v),
        CallResult::Timeout => Err(Error::Host("shard did not answer in time".into())),
        CallResult::SenderError => Err(Error::Host("shard stopped before answering".into())),
    }
}

impl<T: Twin> Registry<T> {
    /// Starts `config.shards` shard actors.
    pub async fn start(
        config: HostConfig,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        env: Arc<T::Env>,
    ) -> Result<Self> {
        if config.shards == 0 {
            return Err(Error::Config("shards must be at least 1".into()));
        }
        let mut shards = Vec::with_capacity(config.shards as usize);
        let mut handles = Vec::with_capacity(config.shards as usize);
        for shard in 0..config.shards {
            let args = ShardArgs {
                shard,
                store: store.clone(),
                clock: clock.clone(),
                env: env.clone(),
                idle_ms: config.idle_ms,
                fence: None,
            };
            let (actor, handle) = Actor::spawn(None, Shard::<T>::default(), args)
                .await
                .map_err(|e| Error::Host(format!("cannot start shard {shard}: {e}")))?;
            shards.push(actor);
            handles.push(handle);
        }
        Ok(Self { shards, handles })
    }

    fn shard(&self, id: &str) -> &ActorRef<ShardMsg<T>> {
        &self.shards[shard_of(id, self.shards.len() as u32) as usize]
    }

    /// Sends `msg` to twin `id` and waits until its effects are durable.
    pub async fn call(&self, id: &str, msg: T::Msg) -> Result<T::Reply> {
        let id = id.to_owned();
        let r = self
            .shard(&id)
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

    /// Sends `msg` to twin `id` without waiting.
    pub fn cast(&self, id: &str, msg: T::Msg) -> Result<()> {
        let id = id.to_owned();
        self.shard(&id).cast(ShardMsg::Deliver {
            id,
            msg,
            reply: None,
        })?;
        Ok(())
    }

    /// Looks at twin `id` (`None` if it never existed) without changing it.
    pub async fn inspect<R: Send + 'static>(
        &self,
        id: &str,
        f: impl FnOnce(Option<&T>) -> R + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.shard(id).cast(ShardMsg::Inspect {
            id: id.to_owned(),
            f: Box::new(move |t| {
                let _ = tx.send(f(t));
            }),
        })?;
        rx.await
            .map_err(|_| Error::Host("shard stopped before answering".into()))
    }

    /// Fires due timers and passivates idle twins on every shard; returns when all are done.
    pub async fn tick(&self) -> Result<()> {
        for s in &self.shards {
            let r = s.call(|reply| ShardMsg::Tick(Some(reply)), None).await?;
            call_result(r)??;
        }
        Ok(())
    }

    /// Counters summed over the shards.
    pub async fn stats(&self) -> Result<ShardStats> {
        let mut total = ShardStats::default();
        for s in &self.shards {
            let r = s
                .call(ShardMsg::Stats, Some(Duration::from_secs(30)))
                .await?;
            total += call_result(r)?;
        }
        Ok(total)
    }

    /// Stops every shard after the messages already queued, and waits for them.
    pub async fn stop(self) {
        for s in &self.shards {
            // Drain: what is queued is handled, then the shard stops.
            let _ = s.drain();
        }
        for h in self.handles {
            let _ = h.await;
        }
    }
}
