//! A store that says when logs grow: the node wraps its backend in [`Watched`] so the
//! gRPC streams (the handoff's case log) wake as soon as an entry is durable, instead of
//! polling the store.
//!
//! Only logs whose name starts with one of the watched prefixes are signalled; every other
//! call passes straight through. Snapshot writes are signalled to the [`Inbox`]es that
//! asked for their key ([`SnapshotSignals`]): the twin watches wake on them.

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
    /// A channel per prefix of log names, for a waiter on a family of logs (the pages of
    /// a tenant's device index).
    families: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl LogSignals {
    /// A receiver that changes each time any log whose name starts with `prefix` grows.
    pub fn subscribe_prefix(&self, prefix: &str) -> watch::Receiver<u64> {
        self.families
            .lock()
            .expect("log signals lock")
            .entry(prefix.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// A receiver that changes each time `log` grows.
    pub fn subscribe(&self, log: &Key) -> watch::Receiver<u64> {
        self.logs
            .lock()
            .expect("log signals lock")
            .entry(log.as_str().to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Wakes the waiters on `log` (and on its families): called after a commit that
    /// appended to it here, or when a peer says it appended to it there.
    pub fn grew(&self, log: &Key) {
        let logs = self.logs.lock().expect("log signals lock");
        if let Some(tx) = logs.get(log.as_str()) {
            tx.send_modify(|n| *n += 1);
        }
        drop(logs);
        let families = self.families.lock().expect("log signals lock");
        for (prefix, tx) in families.iter() {
            if log.as_str().starts_with(prefix.as_str()) {
                tx.send_modify(|n| *n += 1);
            }
        }
    }
}

/// One waiter's set of changed keys: filled by the store as snapshots are committed,
/// drained by the waiter. A key changed many times before the waiter looks is in the set
/// once, so a burst costs the waiter one look, and the set never holds more keys than the
/// waiter watches.
#[derive(Debug, Default)]
pub struct Inbox {
    changed: Mutex<std::collections::BTreeSet<String>>,
    wake: tokio::sync::Notify,
}

impl Inbox {
    /// Waits until a watched key changed since the last [`Inbox::take`] (at once if one
    /// did).
    pub async fn changed(&self) {
        self.wake.notified().await;
    }

    /// The keys changed since the last call, emptying the set.
    pub fn take(&self) -> std::collections::BTreeSet<String> {
        std::mem::take(&mut *self.changed.lock().expect("inbox lock"))
    }

    fn put(&self, key: &str) {
        self.changed
            .lock()
            .expect("inbox lock")
            .insert(key.to_owned());
        // A stored permit: a change between the waiter's take and its next wait still
        // wakes it.
        self.wake.notify_one();
    }
}

/// Who waits for which snapshot keys.
#[derive(Debug, Default)]
pub struct SnapshotSignals {
    /// Key → the inboxes watching it (weak: a stream that ended stops counting at once
    /// and is pruned on the key's next change).
    keys: Mutex<HashMap<String, Vec<std::sync::Weak<Inbox>>>>,
    /// How many keys are watched; commits skip the lock while nobody watches.
    watched: std::sync::atomic::AtomicUsize,
}

impl SnapshotSignals {
    /// Puts `key` in `inbox` each time a snapshot under it is committed.
    pub fn watch(&self, key: &str, inbox: &Arc<Inbox>) {
        let mut keys = self.keys.lock().expect("snapshot signals lock");
        let v = keys.entry(key.to_owned()).or_default();
        v.retain(|w| w.strong_count() > 0);
        if !v
            .iter()
            .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(inbox)))
        {
            v.push(Arc::downgrade(inbox));
        }
        self.watched
            .store(keys.len(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Stops putting `key` in `inbox`.
    pub fn unwatch(&self, key: &str, inbox: &Arc<Inbox>) {
        let mut keys = self.keys.lock().expect("snapshot signals lock");
        if let Some(v) = keys.get_mut(key) {
            v.retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), Arc::as_ptr(inbox)));
            if v.is_empty() {
                keys.remove(key);
            }
        }
        self.watched
            .store(keys.len(), std::sync::atomic::Ordering::Relaxed);
    }

    fn changed(&self, key: &Key) {
        let mut keys = self.keys.lock().expect("snapshot signals lock");
        let Some(v) = keys.get_mut(key.as_str()) else {
            return;
        };
        v.retain(|w| match w.upgrade() {
            Some(inbox) => {
                inbox.put(key.as_str());
                true
            }
            None => false,
        });
        if v.is_empty() {
            keys.remove(key.as_str());
            self.watched
                .store(keys.len(), std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// A store whose committed appends to logs named with `prefixes` are signalled, and
/// whose committed mail (outbox enqueues) wakes the mail dispatcher.
pub struct Watched {
    inner: Arc<dyn Store>,
    prefixes: Vec<String>,
    signals: Arc<LogSignals>,
    snapshots: Arc<SnapshotSignals>,
    mail: Arc<tokio::sync::Notify>,
    /// Also told of every watched log that grew (a cluster member tells its peers).
    also: std::sync::OnceLock<GrewHook>,
}

/// Who else hears of a watched log that grew.
pub type GrewHook = Arc<dyn Fn(&Key) + Send + Sync>;

impl Watched {
    /// Wraps `inner`, signalling appends to logs starting with one of `prefixes`.
    pub fn new(inner: Arc<dyn Store>, prefixes: &[&str]) -> Self {
        Self {
            inner,
            prefixes: prefixes.iter().map(|p| (*p).to_owned()).collect(),
            signals: Arc::new(LogSignals::default()),
            snapshots: Arc::new(SnapshotSignals::default()),
            mail: Arc::new(tokio::sync::Notify::new()),
            also: std::sync::OnceLock::new(),
        }
    }

    /// Tells `hook` too of every watched log that grew (once; a cluster member passes its
    /// peers, whose waiters on the log are on other nodes).
    pub fn also_tell(&self, hook: GrewHook) {
        let _ = self.also.set(hook);
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

    /// The snapshot signals, to watch keys with.
    pub fn snapshot_signals(&self) -> Arc<SnapshotSignals> {
        self.snapshots.clone()
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
        let written: Vec<Key> = if self
            .snapshots
            .watched
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
        {
            Vec::new()
        } else {
            batch
                .ops
                .iter()
                .filter_map(|op| match op {
                    Op::PutSnapshot { key, .. } | Op::DeleteSnapshot { key, .. } => {
                        Some(key.clone())
                    }
                    _ => None,
                })
                .collect()
        };
        let applied = self.inner.commit(batch).await?;
        for log in &grown {
            self.signals.grew(log);
            if let Some(also) = self.also.get() {
                also(log);
            }
        }
        for key in &written {
            self.snapshots.changed(key);
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

    #[tokio::test]
    async fn snapshot_writes_fill_the_inboxes_watching_them_and_prefixes_wake() {
        use futures::FutureExt as _;
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&EmbeddedConfig::at(dir.path())).unwrap());
        let store = Watched::new(inner, &["device-index/"]);
        let inbox = Arc::new(Inbox::default());
        let other = Arc::new(Inbox::default());
        store.snapshot_signals().watch("device/t1:a", &inbox);
        store.snapshot_signals().watch("device/t1:b", &other);
        let family = store.signals().subscribe_prefix("device-index/t1/");
        let put = |key: &str, v: u64| WriteBatch {
            fence: None,
            ops: vec![Op::PutSnapshot {
                key: Key::new(key),
                expected_version: v,
                value: b"s".to_vec(),
            }],
        };
        // A burst of writes: one key in the set, one wake.
        for v in 0..5 {
            store.commit(put("device/t1:a", v)).await.unwrap();
        }
        assert!(inbox.changed().now_or_never().is_some());
        assert_eq!(
            inbox.take().into_iter().collect::<Vec<_>>(),
            ["device/t1:a"]
        );
        assert!(other.take().is_empty(), "b was not written");
        assert!(inbox.changed().now_or_never().is_none(), "drained");
        // Unwatched, or dropped: nothing more.
        store.snapshot_signals().unwatch("device/t1:a", &inbox);
        store.commit(put("device/t1:a", 5)).await.unwrap();
        assert!(inbox.take().is_empty());
        drop(other);
        store.commit(put("device/t1:b", 0)).await.unwrap();
        // Any page of the tenant's index wakes the family; another tenant's does not.
        let append = |log: &str| WriteBatch {
            fence: None,
            ops: vec![Op::Append {
                log: Key::new(log),
                value: b"x".to_vec(),
            }],
        };
        store.commit(append("device-index/t2/3")).await.unwrap();
        assert!(!family.has_changed().unwrap());
        store.commit(append("device-index/t1/17")).await.unwrap();
        assert!(family.has_changed().unwrap());
    }
}
