//! A store that says when logs grow: the node wraps its backend in [`Watched`] so the
//! gRPC streams (the handoff's case log) wake as soon as an entry is durable, instead of
//! polling the store.
//!
//! Only logs whose name starts with one of the watched prefixes are signalled; every other
//! call passes straight through.

use caretwin_actors::Result;
use caretwin_actors::store::{Applied, Due, Entry, Key, Lease, Op, Store, Versioned, WriteBatch};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Wakes whoever waits on a log.
#[derive(Debug, Default)]
pub struct LogSignals {
    /// A channel per log: the value is a counter of committed appends.
    logs: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl LogSignals {
    /// A receiver that changes each time `log` grows.
    pub fn subscribe(&self, log: &Key) -> watch::Receiver<u64> {
        self.logs
            .lock()
            .expect("log signals lock")
            .entry(log.as_str().to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn grew(&self, log: &Key) {
        let logs = self.logs.lock().expect("log signals lock");
        if let Some(tx) = logs.get(log.as_str()) {
            tx.send_modify(|n| *n += 1);
        }
    }
}

/// A store whose committed appends to logs named with `prefixes` are signalled, and
/// whose committed mail (outbox enqueues) wakes the mail dispatcher.
pub struct Watched {
    inner: Arc<dyn Store>,
    prefixes: Vec<String>,
    signals: Arc<LogSignals>,
    mail: Arc<tokio::sync::Notify>,
}

impl Watched {
    /// Wraps `inner`, signalling appends to logs starting with one of `prefixes`.
    pub fn new(inner: Arc<dyn Store>, prefixes: &[&str]) -> Self {
        Self {
            inner,
            prefixes: prefixes.iter().map(|p| (*p).to_owned()).collect(),
            signals: Arc::new(LogSignals::default()),
            mail: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Notified after every commit that enqueued mail: the node delivers it at once
    /// instead of at its next tick.
    pub fn mail_signal(&self) -> Arc<tokio::sync::Notify> {
        self.mail.clone()
    }

    /// The signals, to subscribe to.
    pub fn signals(&self) -> Arc<LogSignals> {
        self.signals.clone()
    }
}

#[async_trait::async_trait]
impl Store for Watched {
    async fn commit(&self, batch: WriteBatch) -> Result<Vec<Applied>> {
        let grown: Vec<Key> = batch
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::Append { log, .. }
                    if self.prefixes.iter().any(|p| log.as_str().starts_with(p)) =>
                {
                    Some(log.clone())
                }
                _ => None,
            })
            .collect();
        let mail = batch.ops.iter().any(|op| matches!(op, Op::Enqueue { .. }));
        let applied = self.inner.commit(batch).await?;
        for log in &grown {
            self.signals.grew(log);
        }
        if mail {
            self.mail.notify_one();
        }
        Ok(applied)
    }

    async fn snapshot(&self, key: &Key) -> Result<Option<Versioned>> {
        self.inner.snapshot(key).await
    }

    async fn high_water(&self, device: &Key) -> Result<u64> {
        self.inner.high_water(device).await
    }

    async fn read_log(&self, log: &Key, from: u64, limit: usize) -> Result<Vec<Entry>> {
        self.inner.read_log(log, from, limit).await
    }

    async fn idempotency(&self, key: &Key) -> Result<Option<Vec<u8>>> {
        self.inner.idempotency(key).await
    }

    async fn read_outbox(&self, queue: &Key, from: u64, limit: usize) -> Result<Vec<Entry>> {
        self.inner.read_outbox(queue, from, limit).await
    }

    async fn read_due(&self, schedule: &Key, until_ms: u64, limit: usize) -> Result<Vec<Due>> {
        self.inner.read_due(schedule, until_ms, limit).await
    }

    async fn acquire_lease(
        &self,
        name: &Key,
        holder: &str,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<Lease> {
        self.inner.acquire_lease(name, holder, ttl_ms, now_ms).await
    }

    async fn renew_lease(&self, lease: &Lease, ttl_ms: u64, now_ms: u64) -> Result<Lease> {
        self.inner.renew_lease(lease, ttl_ms, now_ms).await
    }

    async fn release_lease(&self, lease: &Lease) -> Result<()> {
        self.inner.release_lease(lease).await
    }

    async fn lease(&self, name: &Key) -> Result<Option<Lease>> {
        self.inner.lease(name).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{EmbeddedConfig, EmbeddedStore};

    #[tokio::test]
    async fn committed_appends_to_watched_logs_wake_their_watchers_only() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&EmbeddedConfig::at(dir.path())).unwrap());
        let store = Watched::new(inner, &["cases/"]);
        let mut t1 = store.signals().subscribe(&Key::new("cases/t1"));
        let t2 = store.signals().subscribe(&Key::new("cases/t2"));
        let append = |log: &str| WriteBatch {
            fence: None,
            ops: vec![Op::Append {
                log: Key::new(log),
                value: b"x".to_vec(),
            }],
        };
        store.commit(append("events/t1")).await.unwrap();
        store.commit(append("cases/t1")).await.unwrap();
        assert!(t1.has_changed().unwrap(), "the case log grew");
        assert!(!t2.has_changed().unwrap(), "another tenant's log did not");
        t1.borrow_and_update();
        // A refused batch wakes nobody.
        let bad = WriteBatch {
            fence: None,
            ops: vec![
                Op::Append {
                    log: Key::new("cases/t1"),
                    value: b"y".to_vec(),
                },
                Op::AdvanceHighWater {
                    device: Key::new("t1:d"),
                    from: 5,
                    to: 6,
                },
            ],
        };
        assert!(store.commit(bad).await.is_err());
        assert!(!t1.has_changed().unwrap());
        assert_eq!(
            store
                .read_log(&Key::new("cases/t1"), 1, 10)
                .await
                .unwrap()
                .len(),
            1
        );
        // Mail wakes the dispatcher once it is durable, and only mail does.
        use futures::FutureExt as _;
        let mail = store.mail_signal();
        assert!(mail.notified().now_or_never().is_none(), "no mail yet");
        let enqueue = WriteBatch {
            fence: None,
            ops: vec![Op::Enqueue {
                queue: Key::new("outbox/shard-1"),
                value: b"m".to_vec(),
            }],
        };
        store.commit(enqueue).await.unwrap();
        assert!(mail.notified().now_or_never().is_some(), "mail committed");
        store.commit(append("cases/t1")).await.unwrap();
        assert!(
            mail.notified().now_or_never().is_none(),
            "a log append is not mail"
        );
    }
}
