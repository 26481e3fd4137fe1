//! The dispatcher: delivers the mail twins left in their outboxes, then removes it.
//!
//! Per queue, mail goes out in the order it was written, and an entry is removed only after
//! its delivery succeeded, so a crash anywhere means redelivery, never loss: at least once.
//! Receivers de-duplicate (by mail id or the idempotency key inside), which makes the
//! effect exactly once.
//!
//! A queue stops at its first transient failure and is retried on the next pump, keeping
//! its order. Mail that can never be delivered — undecodable, crossing tenants, or refused
//! by its receiver — is removed and counted, so it cannot block the mail behind it.

use crate::Result;
use crate::mail::Mail;
use crate::store::{Key, Op, Store, WriteBatch};
use async_trait::async_trait;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;

/// Entries read from a queue per round.
const PAGE: usize = 256;

/// Queues pumped at once. Each holds a store connection only while it reads or writes,
/// but a delivery waits for the receiving twin's step, which needs one too: with a
/// bounded pool (PostgreSQL), every queue pumped at once could leave none for the
/// steps they wait on.
const PUMPS_AT_ONCE: usize = 8;

/// What became of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The receiver took it (its effect is durable, or it was a duplicate).
    Delivered,
    /// The receiver refused it for good (unknown recipient, malformed); it is dropped.
    Rejected(String),
}

/// Where mail is delivered: the twins' registries and the ports to the outside.
#[async_trait]
pub trait Router: Send + Sync + 'static {
    /// Delivers one mail. `Err` means "not now": the same mail is offered again later.
    async fn deliver(&self, mail: Mail) -> Result<Delivery>;
}

/// What one pump did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PumpReport {
    /// Mail delivered and removed.
    pub delivered: usize,
    /// Mail dropped for good (undecodable, crossing tenants, rejected).
    pub dropped: usize,
    /// Queues that stopped at a transient failure and keep their mail.
    pub stalled: usize,
}

/// Delivers the mail of a set of outbox queues.
pub struct Dispatcher {
    store: Arc<dyn Store>,
    router: Arc<dyn Router>,
    /// Per queue, the index to read from next (entries before it are gone).
    /// Each queue delivered from here and where its next delivery starts; its own lock,
    /// so queues come and go (shards hosted and dropped) while a pump runs.
    cursors: std::sync::Mutex<HashMap<Key, u64>>,
}

impl Dispatcher {
    /// A dispatcher for `queues`.
    pub fn new(store: Arc<dyn Store>, router: Arc<dyn Router>, queues: Vec<Key>) -> Self {
        Self {
            store,
            router,
            cursors: std::sync::Mutex::new(queues.into_iter().map(|q| (q, 1)).collect()),
        }
    }

    /// Delivers these queues' mail from now on (from their first entry still there).
    pub fn add_queues(&self, queues: impl IntoIterator<Item = Key>) {
        let mut cursors = self.cursors.lock().expect("dispatcher cursors");
        for q in queues {
            cursors.entry(q).or_insert(1);
        }
    }

    /// Stops delivering these queues' mail.
    pub fn remove_queues(&self, queues: &[Key]) {
        let mut cursors = self.cursors.lock().expect("dispatcher cursors");
        for q in queues {
            cursors.remove(q);
        }
    }

    /// Delivers what is waiting in every queue: the queues side by side, each in its own
    /// order. A queue's delivered entries are removed with one write per page, after
    /// their deliveries succeeded (a crash in between only means redelivery).
    pub async fn pump(&self) -> Result<PumpReport> {
        let store = &*self.store;
        let router = &*self.router;
        let queues: Vec<(Key, u64)> = self
            .cursors
            .lock()
            .expect("dispatcher cursors")
            .iter()
            .map(|(q, &from)| (q.clone(), from))
            .collect();
        // At most PUMPS_AT_ONCE queues in flight, the next one starting as soon as one
        // ends (not in chunks waiting for their slowest queue). The items are owned: a
        // stream of futures borrowing the list is not `Send` for every lifetime.
        let runs: Vec<(Key, Result<QueueRun>)> =
            futures::stream::iter(queues.into_iter().map(|(queue, from)| async move {
                let run = pump_queue(store, router, &queue, from).await;
                (queue, run)
            }))
            .buffer_unordered(PUMPS_AT_ONCE)
            .collect()
            .await;
        let mut report = PumpReport::default();
        let mut failed = None;
        for (queue, run) in runs {
            match run {
                Ok(run) => {
                    report.delivered += run.delivered;
                    report.dropped += run.dropped;
                    report.stalled += usize::from(run.stalled);
                    // A queue dropped meanwhile (its shard moved) stays dropped.
                    if let Some(c) = self
                        .cursors
                        .lock()
                        .expect("dispatcher cursors")
                        .get_mut(&queue)
                    {
                        *c = run.next;
                    }
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }
}

/// What pumping one queue did.
struct QueueRun {
    /// The index to read from next.
    next: u64,
    delivered: usize,
    dropped: usize,
    /// Stopped at a transient failure; the rest waits for the next pump.
    stalled: bool,
}

/// Delivers one queue's mail from `from` on, in order, until it is empty or a delivery
/// fails for now.
async fn pump_queue(
    store: &dyn Store,
    router: &dyn Router,
    queue: &Key,
    mut from: u64,
) -> Result<QueueRun> {
    let mut run = QueueRun {
        next: from,
        delivered: 0,
        dropped: 0,
        stalled: false,
    };
    loop {
        let entries = store.read_outbox(queue, from, PAGE).await?;
        let n = entries.len();
        let mut done = WriteBatch::new();
        let (mut delivered, mut dropped) = (0, 0);
        for e in entries {
            let verdict = match Mail::decode(&e.value) {
                Err(err) => Some(format!("{err}")),
                Ok(m) if m.from.tenant() != m.to.tenant() => Some(format!(
                    "mail {} crosses tenants ({} -> {})",
                    m.id,
                    m.from.tenant(),
                    m.to.tenant()
                )),
                Ok(m) => match router.deliver(m).await {
                    Ok(Delivery::Delivered) => None,
                    Ok(Delivery::Rejected(why)) => Some(why),
                    Err(err) => {
                        tracing::debug!(queue = %queue, index = e.index, error = %err, "delivery failed, will retry");
                        run.stalled = true;
                        break;
                    }
                },
            };
            done.push(Op::Dequeue {
                queue: queue.clone(),
                index: e.index,
            });
            from = e.index + 1;
            match verdict {
                None => delivered += 1,
                Some(why) => {
                    tracing::warn!(queue = %queue, index = e.index, reason = %why, "mail dropped");
                    dropped += 1;
                }
            }
        }
        if !done.ops.is_empty() {
            store.commit(done).await?;
            run.next = from;
            run.delivered += delivered;
            run.dropped += dropped;
        }
        if run.stalled || n < PAGE {
            return Ok(run);
        }
    }
}
