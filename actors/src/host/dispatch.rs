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
use std::collections::HashMap;
use std::sync::Arc;

/// Entries read from a queue per round.
const PAGE: usize = 256;

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
    cursors: HashMap<Key, u64>,
}

impl Dispatcher {
    /// A dispatcher for `queues`.
    pub fn new(store: Arc<dyn Store>, router: Arc<dyn Router>, queues: Vec<Key>) -> Self {
        Self {
            store,
            router,
            cursors: queues.into_iter().map(|q| (q, 1)).collect(),
        }
    }

    /// Delivers what is waiting in every queue, in order per queue.
    pub async fn pump(&mut self) -> Result<PumpReport> {
        let mut report = PumpReport::default();
        let queues: Vec<Key> = self.cursors.keys().cloned().collect();
        for queue in queues {
            if !self.pump_queue(&queue, &mut report).await? {
                report.stalled += 1;
            }
        }
        Ok(report)
    }

    /// Returns false when the queue stalled on a transient failure.
    async fn pump_queue(&mut self, queue: &Key, report: &mut PumpReport) -> Result<bool> {
        loop {
            let from = self.cursors[queue];
            let entries = self.store.read_outbox(queue, from, PAGE).await?;
            let n = entries.len();
            for e in entries {
                let verdict = match Mail::decode(&e.value) {
                    Err(err) => Some(format!("{err}")),
                    Ok(m) if m.from.tenant() != m.to.tenant() => Some(format!(
                        "mail {} crosses tenants ({} -> {})",
                        m.id,
                        m.from.tenant(),
                        m.to.tenant()
                    )),
                    Ok(m) => match self.router.deliver(m).await {
                        Ok(Delivery::Delivered) => None,
                        Ok(Delivery::Rejected(why)) => Some(why),
                        Err(err) => {
                            tracing::debug!(queue = %queue, index = e.index, error = %err, "delivery failed, will retry");
                            return Ok(false);
                        }
                    },
                };
                let dequeue = Op::Dequeue {
                    queue: queue.clone(),
                    index: e.index,
                };
                self.store.commit(WriteBatch::new().with(dequeue)).await?;
                self.cursors.insert(queue.clone(), e.index + 1);
                match verdict {
                    None => report.delivered += 1,
                    Some(why) => {
                        tracing::warn!(queue = %queue, index = e.index, reason = %why, "mail dropped");
                        report.dropped += 1;
                    }
                }
            }
            if n < PAGE {
                return Ok(true);
            }
        }
    }
}
