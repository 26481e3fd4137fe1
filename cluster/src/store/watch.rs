//! A store that says when logs grow: the node wraps its backend in [`Watched`] so the
//! gRPC streams (the handoff's case log) wake as soon as an entry is durable, instead of
//! polling the store.
//!
//! Only logs whose name starts with one of the watched prefixes are signalled; every other
//! call passes straight through. Snapshot writes are signalled to the [`Inbox`]es that
//! asked for their key ([`SnapshotSignals`]): the twin watches wake on them. In a cluster
//! the signals also hold the keys the peers' watches asked for, and a commit of one is
//! handed to the peer channel, which tells that peer (`crate::peer`); what the peers
//! commit of the keys watched here comes back the same way.

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

impl LogSignals {
    /// Wakes every waiter on every log (a peer learnt this node afresh: what grew there
    /// while it did not know this node may not have been told).
    pub fn wake_all(&self) {
        for tx in self.logs.lock().expect("log signals lock").values() {
            tx.send_modify(|n| *n += 1);
        }
        for tx in self.families.lock().expect("log signals lock").values() {
            tx.send_modify(|n| *n += 1);
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

/// Who elsewhere watches which snapshot keys: each peer's latest interest as it told it
/// (its incarnation's `epoch` and the `version` of its set), and the index key → peers
/// that a commit looks up. No I/O: the peer channel fills it and reads it.
#[derive(Debug, Default)]
struct Remote {
    by_peer: HashMap<String, Told>,
    by_key: HashMap<String, Vec<Arc<str>>>,
}

#[derive(Debug)]
struct Told {
    epoch: u64,
    version: u64,
    keys: Vec<String>,
}

impl Remote {
    /// Replaces what `peer` watches with `keys` (its set `version` of incarnation
    /// `epoch`); an older or equal version of the same incarnation changes nothing.
    /// Returns whether nothing of this incarnation was held before: whatever changed
    /// here before it was told is then unknown to it, and it must look again.
    fn install(&mut self, peer: &str, epoch: u64, version: u64, keys: Vec<String>) -> bool {
        let fresh = match self.by_peer.get(peer) {
            Some(t) if t.epoch == epoch && t.version >= version => return false,
            Some(t) => t.epoch != epoch,
            None => true,
        };
        self.forget(peer);
        let name: Arc<str> = peer.into();
        for k in &keys {
            let peers = self.by_key.entry(k.clone()).or_default();
            if !peers.iter().any(|p| **p == *peer) {
                peers.push(name.clone());
            }
        }
        self.by_peer.insert(
            peer.to_owned(),
            Told {
                epoch,
                version,
                keys,
            },
        );
        fresh
    }

    /// Forgets everything `peer` watches.
    fn forget(&mut self, peer: &str) {
        let Some(told) = self.by_peer.remove(peer) else {
            return;
        };
        for k in told.keys {
            if let Some(peers) = self.by_key.get_mut(&k) {
                peers.retain(|p| **p != *peer);
                if peers.is_empty() {
                    self.by_key.remove(&k);
                }
            }
        }
    }

    fn peers_of(&self, key: &str) -> &[Arc<str>] {
        self.by_key.get(key).map_or(&[], Vec::as_slice)
    }
}

/// This node's watchers: key → the inboxes watching it, the version of the set of keys
/// (raised each time a key is first watched or last unwatched) and, in a cluster, the
/// keys first watched at a version the peers may not know yet.
#[derive(Debug, Default)]
struct Local {
    keys: HashMap<String, Vec<std::sync::Weak<Inbox>>>,
    version: u64,
    /// Key → the version it was first watched at: to look at again once every peer knows
    /// that version (a change a peer made before it knew was not relayed). Only watched
    /// keys, so it stays bounded however long a peer takes to answer.
    unsynced: HashMap<String, u64>,
}

/// Who is told of a snapshot that changed here, for the peers that watch it: the peer's
/// node id and the key.
pub type ChangedHook = Arc<dyn Fn(&str, &Key) + Send + Sync>;

/// Who waits for which snapshot keys, here and (in a cluster) on the peers.
///
/// A twin is written on the node hosting its shard, while its watchers may be on any
/// node. Each node shares the set of keys it watches with its peers (the peer channel's
/// `sharing`); each node keeps the peers' sets here, and a commit of a key a peer
/// watches is passed to the [`ChangedHook`], which relays it. A node nobody watches from
/// pays two atomic loads per commit.
#[derive(Default)]
pub struct SnapshotSignals {
    local: Mutex<Local>,
    remote: Mutex<Remote>,
    /// How many keys are watched here and by peers; commits skip the locks while both
    /// are 0.
    watched_here: std::sync::atomic::AtomicUsize,
    watched_elsewhere: std::sync::atomic::AtomicUsize,
    /// The version of the set of keys watched here.
    version: VersionSignal,
    /// Relays changes to peers (set when the node joins a cluster).
    relay: std::sync::OnceLock<ChangedHook>,
}

/// A watch channel of the local interest's version (`Default` for `watch::Sender`).
#[derive(Debug)]
struct VersionSignal(watch::Sender<u64>);

impl Default for VersionSignal {
    fn default() -> Self {
        Self(watch::channel(0).0)
    }
}

impl std::fmt::Debug for SnapshotSignals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotSignals")
            .field("watched_here", &self.watched_here)
            .field("watched_elsewhere", &self.watched_elsewhere)
            .field("relayed", &self.relay.get().is_some())
            .finish_non_exhaustive()
    }
}

impl SnapshotSignals {
    /// Puts `key` in `inbox` each time a snapshot under it is committed (here, or on a
    /// peer that knows this node watches it).
    pub fn watch(&self, key: &str, inbox: &Arc<Inbox>) {
        let mut local = self.local.lock().expect("snapshot signals lock");
        let l = &mut *local;
        let new = !l.keys.contains_key(key);
        let v = l.keys.entry(key.to_owned()).or_default();
        v.retain(|w| w.strong_count() > 0);
        if !v
            .iter()
            .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(inbox)))
        {
            v.push(Arc::downgrade(inbox));
        }
        if new {
            l.version += 1;
            if self.relay.get().is_some() {
                l.unsynced.insert(key.to_owned(), l.version);
            }
        }
        self.counted(l);
    }

    /// Stops putting `key` in `inbox`.
    pub fn unwatch(&self, key: &str, inbox: &Arc<Inbox>) {
        let mut local = self.local.lock().expect("snapshot signals lock");
        let l = &mut *local;
        if let Some(v) = l.keys.get_mut(key) {
            v.retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), Arc::as_ptr(inbox)));
            if v.is_empty() {
                l.keys.remove(key);
                l.unsynced.remove(key);
                l.version += 1;
            }
        }
        self.counted(l);
    }

    /// Publishes the count and version of `l` (its lock held).
    fn counted(&self, l: &Local) {
        self.watched_here
            .store(l.keys.len(), std::sync::atomic::Ordering::SeqCst);
        self.version.0.send_if_modified(|v| {
            let changed = *v != l.version;
            *v = l.version;
            changed
        });
    }

    /// Whether any key is watched, here or elsewhere.
    fn any(&self) -> bool {
        self.watched_here.load(std::sync::atomic::Ordering::SeqCst)
            + self
                .watched_elsewhere
                .load(std::sync::atomic::Ordering::SeqCst)
            > 0
    }

    /// A snapshot under `key` was committed here: its watchers here and elsewhere learn.
    fn changed(&self, key: &Key) {
        self.changed_here(key.as_str());
        if self
            .watched_elsewhere
            .load(std::sync::atomic::Ordering::SeqCst)
            == 0
        {
            return;
        }
        let Some(relay) = self.relay.get() else {
            return;
        };
        let remote = self.remote.lock().expect("snapshot signals lock");
        for peer in remote.peers_of(key.as_str()) {
            relay(peer, key);
        }
    }

    /// A snapshot under `key` changed (here, or a peer says so there): the inboxes
    /// watching it here learn.
    pub fn changed_here(&self, key: &str) {
        let mut local = self.local.lock().expect("snapshot signals lock");
        let l = &mut *local;
        let Some(v) = l.keys.get_mut(key) else {
            return;
        };
        v.retain(|w| match w.upgrade() {
            Some(inbox) => {
                inbox.put(key);
                true
            }
            None => false,
        });
        if v.is_empty() {
            l.keys.remove(key);
            l.unsynced.remove(key);
            l.version += 1;
            self.counted(l);
        }
    }

    /// Relays commits of keys that peers watch to `hook` (once; a cluster member passes
    /// its peer channel). From then on, keys first watched here are looked at again once
    /// the peers know of them ([`SnapshotSignals::synced`]).
    pub fn relay_to(&self, hook: ChangedHook) {
        let _ = self.relay.set(hook);
    }

    /// The keys watched here and the version of that set.
    pub fn interest(&self) -> (u64, Vec<String>) {
        let local = self.local.lock().expect("snapshot signals lock");
        let mut keys: Vec<String> = local.keys.keys().cloned().collect();
        keys.sort_unstable();
        (local.version, keys)
    }

    /// Changes each time the set of keys watched here changes (its value is the version).
    pub fn interest_changed(&self) -> watch::Receiver<u64> {
        self.version.0.subscribe()
    }

    /// Every peer knows the keys watched here up to `version`: keys first watched up to
    /// it are looked at again when `relook` (a change a peer committed before it knew
    /// was not relayed, and the watcher's first look may have been before that change).
    pub fn synced(&self, version: u64, relook: bool) {
        let mut keys = Vec::new();
        {
            let mut local = self.local.lock().expect("snapshot signals lock");
            local.unsynced.retain(|key, v| {
                if *v <= version {
                    keys.push(key.clone());
                    return false;
                }
                true
            });
        }
        if relook {
            for key in keys {
                self.changed_here(&key);
            }
        }
    }

    /// Every watcher here looks at every key again (a peer learnt this node's interest
    /// afresh, so what it changed before was not relayed).
    pub fn relook_all(&self) {
        let keys: Vec<String> = self
            .local
            .lock()
            .expect("snapshot signals lock")
            .keys
            .keys()
            .cloned()
            .collect();
        for key in keys {
            self.changed_here(&key);
        }
    }

    /// `peer` (incarnation `epoch`) watches `keys` now, as of its set's `version`; an
    /// older version changes nothing. Returns whether nothing of this incarnation was
    /// known here before (it then looks at everything again).
    pub fn install(&self, peer: &str, epoch: u64, version: u64, keys: Vec<String>) -> bool {
        let mut remote = self.remote.lock().expect("snapshot signals lock");
        let fresh = remote.install(peer, epoch, version, keys);
        self.watched_elsewhere
            .store(remote.by_key.len(), std::sync::atomic::Ordering::SeqCst);
        fresh
    }

    /// Forgets what `peer` watches (it left the cluster).
    pub fn forget(&self, peer: &str) {
        let mut remote = self.remote.lock().expect("snapshot signals lock");
        remote.forget(peer);
        self.watched_elsewhere
            .store(remote.by_key.len(), std::sync::atomic::Ordering::SeqCst);
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
        // The keys are taken whether or not anyone watches now: a watch that starts while
        // this batch is in flight must still hear of it (the check is after the commit).
        let written: Vec<Key> = batch
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::PutSnapshot { key, .. } | Op::DeleteSnapshot { key, .. } => Some(key.clone()),
                _ => None,
            })
            .collect();
        let applied = self.inner.commit(batch).await?;
        for log in &grown {
            self.signals.grew(log);
            if let Some(also) = self.also.get() {
                also(log);
            }
        }
        if self.snapshots.any() {
            for key in &written {
                self.snapshots.changed(key);
            }
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
    /// A store whose commits wait at a gate until the test opens it.
    struct Gated {
        inner: Arc<dyn Store>,
        entered: tokio::sync::Notify,
        open: tokio::sync::Semaphore,
    }

    #[async_trait::async_trait]
    impl Store for Gated {
        async fn commit(&self, batch: WriteBatch) -> Result<Vec<Applied>> {
            self.entered.notify_one();
            self.open.acquire().await.expect("gate").forget();
            self.inner.commit(batch).await
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

    fn put(key: &str, v: u64) -> WriteBatch {
        WriteBatch {
            fence: None,
            ops: vec![Op::PutSnapshot {
                key: Key::new(key),
                expected_version: v,
                value: b"s".to_vec(),
            }],
        }
    }

    #[tokio::test]
    async fn a_watch_that_starts_while_a_write_is_in_flight_hears_of_it() {
        use futures::FutureExt as _;
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&EmbeddedConfig::at(dir.path())).unwrap());
        let gated = Arc::new(Gated {
            inner,
            entered: tokio::sync::Notify::new(),
            open: tokio::sync::Semaphore::new(0),
        });
        let store = Arc::new(Watched::new(gated.clone(), &[]));
        // Nobody watches when the write starts...
        let writing = tokio::spawn({
            let store = store.clone();
            async move { store.commit(put("device/t1:a", 0)).await }
        });
        gated.entered.notified().await;
        // ...a watch starts (and would look before the write lands)...
        let inbox = Arc::new(Inbox::default());
        store.snapshot_signals().watch("device/t1:a", &inbox);
        gated.open.add_permits(1);
        writing.await.unwrap().unwrap();
        // ...and still hears of it.
        assert!(inbox.changed().now_or_never().is_some());
        assert_eq!(
            inbox.take().into_iter().collect::<Vec<_>>(),
            ["device/t1:a"]
        );
    }

    #[tokio::test]
    async fn commits_of_keys_peers_watch_are_relayed_to_those_peers_only() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&EmbeddedConfig::at(dir.path())).unwrap());
        let store = Watched::new(inner, &[]);
        let signals = store.snapshot_signals();
        let relayed = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
        let r = relayed.clone();
        signals.relay_to(Arc::new(move |peer: &str, key: &Key| {
            r.lock()
                .unwrap()
                .push((peer.to_owned(), key.as_str().to_owned()));
        }));
        let take = || std::mem::take(&mut *relayed.lock().unwrap());
        // Nobody watches: nothing relayed.
        store.commit(put("device/t1:a", 0)).await.unwrap();
        assert!(take().is_empty());
        // b watches a, c watches a and b.
        assert!(signals.install("b", 1, 1, vec!["device/t1:a".into()]));
        assert!(signals.install("c", 5, 1, vec!["device/t1:a".into(), "device/t1:b".into()]));
        store.commit(put("device/t1:a", 1)).await.unwrap();
        store.commit(put("device/t1:b", 0)).await.unwrap();
        store.commit(put("device/t1:z", 0)).await.unwrap();
        let mut got = take();
        got.sort();
        assert_eq!(
            got,
            [
                ("b".to_owned(), "device/t1:a".to_owned()),
                ("c".to_owned(), "device/t1:a".to_owned()),
                ("c".to_owned(), "device/t1:b".to_owned()),
            ]
        );
        // An older set of the same incarnation changes nothing; a newer one replaces.
        assert!(!signals.install("b", 1, 0, vec!["device/t1:z".into()]));
        assert!(!signals.install("b", 1, 2, vec!["device/t1:b".into()]));
        store.commit(put("device/t1:a", 2)).await.unwrap();
        assert_eq!(take(), [("c".to_owned(), "device/t1:a".to_owned())]);
        // A new incarnation is fresh (it must look again), even with an older version.
        assert!(signals.install("b", 2, 1, vec![]));
        store.commit(put("device/t1:b", 1)).await.unwrap();
        assert_eq!(take(), [("c".to_owned(), "device/t1:b".to_owned())]);
        signals.forget("c");
        store.commit(put("device/t1:b", 2)).await.unwrap();
        assert!(take().is_empty(), "c left");
        assert!(signals.install("c", 5, 1, vec![]), "forgotten, so fresh");
    }

    #[tokio::test]
    async fn keys_first_watched_are_looked_at_again_once_every_peer_knows_them() {
        use futures::FutureExt as _;
        let signals = SnapshotSignals::default();
        let mut version = signals.interest_changed();
        let inbox = Arc::new(Inbox::default());
        // Before the node shares its watches, nothing waits for the peers.
        signals.watch("device/t1:a", &inbox);
        assert!(version.has_changed().unwrap());
        assert_eq!(*version.borrow_and_update(), 1);
        signals.relay_to(Arc::new(|_: &str, _: &Key| {}));
        signals.watch("device/t1:b", &inbox);
        signals.watch("device/t1:b", &inbox);
        signals.watch("customer/t1:x", &inbox);
        assert_eq!(
            signals.interest(),
            (
                3,
                vec![
                    "customer/t1:x".to_owned(),
                    "device/t1:a".to_owned(),
                    "device/t1:b".to_owned()
                ]
            )
        );
        signals.synced(2, true);
        assert!(inbox.changed().now_or_never().is_some());
        assert_eq!(
            inbox.take().into_iter().collect::<Vec<_>>(),
            ["device/t1:b"]
        );
        signals.synced(3, false);
        assert!(
            inbox.take().is_empty(),
            "no peers: nothing to look at again"
        );
        // A peer learnt everything afresh: every key once.
        signals.relook_all();
        assert_eq!(inbox.take().len(), 3);
        // The last inbox of a key unwatching it changes the set.
        signals.unwatch("device/t1:a", &inbox);
        assert_eq!(signals.interest().0, 4);
        assert!(version.has_changed().unwrap());
    }
}
