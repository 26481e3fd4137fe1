//! The embedded storage backend, on fjall (an LSM-tree), with group commit.
//!
//! Every mutation goes to one writer thread through a bounded queue. The writer takes
//! whatever has queued up (up to `max_group` requests), checks and applies each request in
//! order against the store plus the group's earlier writes, then writes the whole group
//! as one fjall batch with one fsync, and only then answers every request in it. Many
//! writes, one fsync: throughput grows with load while each write still waits for its
//! own durability. Readers see a group only once its fsync returned.
//!
//! Because a single thread checks every condition (versions, fences, high-water marks,
//! create-only records), two racing writers are serialised: exactly one wins.
//!
//! An fsync failure poisons the store: every later call fails with a backend error, since
//! the state on disk is no longer known (what PostgreSQL learnt the hard way in 2018).
//!
//! # On-disk layout (fjall keyspaces)
//! - `snapshots`: twin key → version (u64 BE) ++ value
//! - `high_water`: device key → u64 BE
//! - `logs`: len(log) (u16 BE) ++ log ++ index (u64 BE) → entry
//! - `outbox`: len(queue) (u16 BE) ++ queue ++ index (u64 BE) → entry
//! - `idempotency`: key → record
//! - `leases`: name → token (u64 BE) ++ expires_at_ms (u64 BE) ++ holder
//! - `schedule`: len(schedule) (u16 BE) ++ schedule ++ due_ms (u64 BE) ++ item → empty
//! - `meta`: `l` ++ log → last index; `o` ++ queue → last index (never reused)

use caretwin_actors::store::{
    self, Applied, Due, Entry, IdempotencyMode, Key, Lease, Op, Store, Versioned, WriteBatch,
};
use caretwin_actors::{Error, Result};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot};

/// Settings of the embedded store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// Directory of the database; created if missing.
    #[serde(default = "default_path")]
    pub path: PathBuf,
    /// Most requests written with one fsync.
    #[serde(default = "default_max_group")]
    pub max_group: usize,
    /// Requests that may wait for the writer; callers beyond it wait (back-pressure).
    #[serde(default = "default_queue_depth")]
    pub queue_depth: usize,
    /// Block cache size in MiB.
    #[serde(default = "default_cache_mib")]
    pub cache_mib: u64,
}

fn default_path() -> PathBuf {
    PathBuf::from("data/cluster")
}
fn default_max_group() -> usize {
    1024
}
fn default_queue_depth() -> usize {
    8192
}
fn default_cache_mib() -> u64 {
    64
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self::at(default_path())
    }
}

impl EmbeddedConfig {
    /// Default settings for a database at `path`.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            max_group: default_max_group(),
            queue_depth: default_queue_depth(),
            cache_mib: default_cache_mib(),
        }
    }
}

/// Counters of the writer, for benchmarks and metrics.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Groups written (one fsync each).
    pub groups: AtomicU64,
    /// Requests answered.
    pub requests: AtomicU64,
}

struct Tables {
    db: Database,
    snapshots: Keyspace,
    high_water: Keyspace,
    logs: Keyspace,
    outbox: Keyspace,
    idempotency: Keyspace,
    leases: Keyspace,
    meta: Keyspace,
    schedule: Keyspace,
    poisoned: AtomicBool,
}

/// Which keyspace a pending write goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Table {
    Snapshots,
    HighWater,
    Logs,
    Outbox,
    Idempotency,
    Leases,
    Meta,
    Schedule,
}

impl Tables {
    fn table(&self, t: Table) -> &Keyspace {
        match t {
            Table::Snapshots => &self.snapshots,
            Table::HighWater => &self.high_water,
            Table::Logs => &self.logs,
            Table::Outbox => &self.outbox,
            Table::Idempotency => &self.idempotency,
            Table::Leases => &self.leases,
            Table::Meta => &self.meta,
            Table::Schedule => &self.schedule,
        }
    }

    fn get(&self, t: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.check_poison()?;
        Ok(self.table(t).get(key).map_err(backend)?.map(|v| v.to_vec()))
    }

    fn check_poison(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Backend(
                "embedded store is poisoned after a failed fsync; restart the node".into(),
            ));
        }
        Ok(())
    }

    /// Entries of `t` under `prefix`, with index ≥ `from`, at most `limit`.
    fn range(&self, t: Table, prefix: &[u8], from: u64, limit: usize) -> Result<Vec<Entry>> {
        self.check_poison()?;
        let mut start = prefix.to_vec();
        start.extend_from_slice(&from.to_be_bytes());
        let mut end = prefix.to_vec();
        end.extend_from_slice(&u64::MAX.to_be_bytes());
        let mut out = Vec::new();
        for guard in self.table(t).range(start..=end).take(limit) {
            let (k, v) = guard.into_inner().map_err(backend)?;
            let index = decode_u64(&k[prefix.len()..])?;
            out.push(Entry {
                index,
                value: v.to_vec(),
            });
        }
        Ok(out)
    }
}

impl Tables {
    /// Keys of `t` under `prefix` with an index below `before`.
    fn keys_below(&self, t: Table, prefix: &[u8], before: u64) -> Result<Vec<Vec<u8>>> {
        self.check_poison()?;
        let start = indexed_raw(prefix, 0);
        let end = indexed_raw(prefix, before);
        self.table(t)
            .range(start..end)
            .map(|guard| guard.key().map(|k| k.to_vec()).map_err(backend))
            .collect()
    }

    /// Timers of a schedule due at or before `until_ms`, earliest first.
    fn due(&self, prefix: &[u8], until_ms: u64, limit: usize) -> Result<Vec<Due>> {
        self.check_poison()?;
        let mut out = Vec::new();
        for guard in self.schedule.range(prefix.to_vec()..) {
            let k = guard.key().map_err(backend)?;
            if !k.starts_with(prefix) || out.len() == limit {
                break;
            }
            let rest = &k[prefix.len()..];
            let due_ms = decode_u64(rest.get(..8).unwrap_or_default())?;
            if due_ms > until_ms {
                break;
            }
            out.push(Due {
                due_ms,
                item: rest[8..].to_vec(),
            });
        }
        Ok(out)
    }
}

fn timer_key(schedule: &Key, due_ms: u64, item: &[u8]) -> Vec<u8> {
    let mut k = indexed(schedule, due_ms);
    k.extend_from_slice(item);
    k
}

fn backend(e: fjall::Error) -> Error {
    Error::Backend(format!("fjall: {e}"))
}

pub(super) fn decode_u64(b: &[u8]) -> Result<u64> {
    let arr: [u8; 8] = b
        .try_into()
        .map_err(|_| Error::Backend(format!("corrupt u64 of {} bytes", b.len())))?;
    Ok(u64::from_be_bytes(arr))
}

/// `len ++ name`, so a name that is a prefix of another never shares its range.
fn prefixed(name: &Key) -> Vec<u8> {
    let b = name.as_str().as_bytes();
    debug_assert!(b.len() <= store::MAX_KEY_BYTES);
    let mut out = Vec::with_capacity(2 + b.len() + 8);
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
    out
}

fn indexed(name: &Key, index: u64) -> Vec<u8> {
    indexed_raw(&prefixed(name), index)
}

fn indexed_raw(prefix: &[u8], index: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 8);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

fn meta_key(kind: u8, name: &Key) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.as_str().len());
    k.push(kind);
    k.extend_from_slice(name.as_str().as_bytes());
    k
}

fn encode_lease(l: &Lease) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + l.holder.len());
    v.extend_from_slice(&l.token.to_be_bytes());
    v.extend_from_slice(&l.expires_at_ms.to_be_bytes());
    v.extend_from_slice(l.holder.as_bytes());
    v
}

fn decode_lease(name: &Key, v: &[u8]) -> Result<Lease> {
    if v.len() < 16 {
        return Err(Error::Backend(format!("corrupt lease record for {name}")));
    }
    Ok(Lease {
        name: name.clone(),
        token: decode_u64(&v[..8])?,
        expires_at_ms: decode_u64(&v[8..16])?,
        holder: String::from_utf8(v[16..].to_vec())
            .map_err(|_| Error::Backend(format!("corrupt lease holder for {name}")))?,
    })
}

/// A snapshot record: version (u64 BE) ++ value (the FoundationDB backend's too).
pub(super) fn encode_snapshot(version: u64, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + value.len());
    v.extend_from_slice(&version.to_be_bytes());
    v.extend_from_slice(value);
    v
}

/// The compare-and-set check of a snapshot write: the version read must be the one stored.
pub(super) fn check_version(key: &Key, expected: u64, actual: u64) -> Result<()> {
    if actual == expected {
        return Ok(());
    }
    Err(Error::VersionConflict {
        key: key.to_string(),
        expected,
        actual,
    })
}

pub(super) fn decode_snapshot(v: &[u8]) -> Result<Versioned> {
    if v.len() < 8 {
        return Err(Error::Backend("corrupt snapshot record".into()));
    }
    Ok(Versioned {
        version: decode_u64(&v[..8])?,
        value: v[8..].to_vec(),
    })
}

/// A request to the writer thread.
enum Request {
    Commit(WriteBatch, oneshot::Sender<Result<Vec<Applied>>>),
    Acquire {
        name: Key,
        holder: String,
        ttl_ms: u64,
        now_ms: u64,
        reply: oneshot::Sender<Result<Lease>>,
    },
    Renew {
        lease: Lease,
        ttl_ms: u64,
        now_ms: u64,
        reply: oneshot::Sender<Result<Lease>>,
    },
    Release {
        lease: Lease,
        reply: oneshot::Sender<Result<()>>,
    },
}

/// A request's result, held until its group is durable.
enum Outcome {
    Commit(oneshot::Sender<Result<Vec<Applied>>>, Result<Vec<Applied>>),
    Lease(oneshot::Sender<Result<Lease>>, Result<Lease>),
    Unit(oneshot::Sender<Result<()>>, Result<()>),
}

impl Outcome {
    fn succeeded(&self) -> bool {
        match self {
            Outcome::Commit(_, r) => r.is_ok(),
            Outcome::Lease(_, r) => r.is_ok(),
            Outcome::Unit(_, r) => r.is_ok(),
        }
    }

    /// Answers the caller; a failed group turns successes into the group's error.
    fn answer(self, group_error: Option<&Error>) {
        match self {
            Outcome::Commit(tx, r) => reply(tx, r, group_error),
            Outcome::Lease(tx, r) => reply(tx, r, group_error),
            Outcome::Unit(tx, r) => reply(tx, r, group_error),
        }
    }
}

/// Sends a request's result, or the group's error if the group failed to be written.
fn reply<T>(tx: oneshot::Sender<Result<T>>, r: Result<T>, group_error: Option<&Error>) {
    let r = match (r, group_error) {
        (Ok(_), Some(e)) => Err(e.clone()),
        (r, _) => r,
    };
    // A caller that went away no longer wants the answer; that is not an error here.
    let _ = tx.send(r);
}

/// Writes pending in the current group, layered over the database.
type Pending = HashMap<(Table, Vec<u8>), Option<Vec<u8>>>;

/// One request's view: its own writes, over the group's, over the database. Its writes
/// join the group only if the whole request succeeds.
struct Txn<'a> {
    tables: &'a Tables,
    group: &'a Pending,
    own: Pending,
}

impl<'a> Txn<'a> {
    fn new(tables: &'a Tables, group: &'a Pending) -> Self {
        Self {
            tables,
            group,
            own: HashMap::new(),
        }
    }

    fn get(&self, t: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let k = (t, key.to_vec());
        if let Some(v) = self.own.get(&k).or_else(|| self.group.get(&k)) {
            return Ok(v.clone());
        }
        self.tables.get(t, key)
    }

    fn put(&mut self, t: Table, key: Vec<u8>, value: Vec<u8>) {
        self.own.insert((t, key), Some(value));
    }

    fn delete(&mut self, t: Table, key: Vec<u8>) {
        self.own.insert((t, key), None);
    }

    fn get_u64(&self, t: Table, key: &[u8]) -> Result<u64> {
        self.get(t, key)?.map_or(Ok(0), |v| decode_u64(&v))
    }

    fn lease(&self, name: &Key) -> Result<Option<Lease>> {
        self.get(Table::Leases, name.as_str().as_bytes())?
            .map(|v| decode_lease(name, &v))
            .transpose()
    }

    fn next_index(&mut self, kind: u8, name: &Key) -> Result<u64> {
        let mk = meta_key(kind, name);
        let next = self.get_u64(Table::Meta, &mk)? + 1;
        self.put(Table::Meta, mk, next.to_be_bytes().to_vec());
        Ok(next)
    }

    /// Deletes the entries of `t` under `prefix` with an index below `before`: those on
    /// disk and those written earlier in this group or request.
    fn trim(&mut self, t: Table, prefix: &[u8], before: u64) -> Result<()> {
        let below = |k: &[u8]| {
            k.len() == prefix.len() + 8
                && k.starts_with(prefix)
                && decode_u64(&k[prefix.len()..]).is_ok_and(|i| i < before)
        };
        let mut doomed: Vec<Vec<u8>> = self
            .group
            .keys()
            .chain(self.own.keys())
            .filter(|(table, k)| *table == t && below(k))
            .map(|(_, k)| k.clone())
            .collect();
        doomed.extend(self.tables.keys_below(t, prefix, before)?);
        for k in doomed {
            self.delete(t, k);
        }
        Ok(())
    }

    fn apply_batch(&mut self, batch: &WriteBatch) -> Result<Vec<Applied>> {
        batch.validate()?;
        if let Some(fence) = &batch.fence {
            store::check_fence(self.lease(&fence.lease)?.as_ref(), fence)?;
        }
        let mut applied = Vec::with_capacity(batch.ops.len());
        for op in &batch.ops {
            applied.push(self.apply_op(op)?);
        }
        Ok(applied)
    }

    fn apply_op(&mut self, op: &Op) -> Result<Applied> {
        Ok(match op {
            Op::PutSnapshot {
                key,
                expected_version,
                value,
            } => {
                let k = key.as_str().as_bytes();
                let actual = self
                    .get(Table::Snapshots, k)?
                    .map_or(Ok(0), |v| decode_snapshot(&v).map(|s| s.version))?;
                check_version(key, *expected_version, actual)?;
                let version = actual + 1;
                self.put(
                    Table::Snapshots,
                    k.to_vec(),
                    encode_snapshot(version, value),
                );
                Applied::Snapshot { version }
            }
            Op::DeleteSnapshot {
                key,
                expected_version,
            } => {
                let k = key.as_str().as_bytes();
                let actual = self
                    .get(Table::Snapshots, k)?
                    .map_or(Ok(0), |v| decode_snapshot(&v).map(|s| s.version))?;
                check_version(key, *expected_version, actual)?;
                self.delete(Table::Snapshots, k.to_vec());
                Applied::Deleted
            }
            Op::AdvanceHighWater { device, from, to } => {
                let k = device.as_str().as_bytes();
                let actual = self.get_u64(Table::HighWater, k)?;
                if actual != *from {
                    return Err(Error::HighWaterConflict {
                        device: device.to_string(),
                        expected: *from,
                        actual,
                    });
                }
                self.put(Table::HighWater, k.to_vec(), to.to_be_bytes().to_vec());
                Applied::HighWater { seq: *to }
            }
            Op::Append { log, value } => {
                let index = self.next_index(b'l', log)?;
                self.put(Table::Logs, indexed(log, index), value.clone());
                Applied::Index { index }
            }
            Op::Enqueue { queue, value } => {
                let index = self.next_index(b'o', queue)?;
                self.put(Table::Outbox, indexed(queue, index), value.clone());
                Applied::Index { index }
            }
            Op::Dequeue { queue, index } => {
                self.delete(Table::Outbox, indexed(queue, *index));
                Applied::Dequeued
            }
            Op::TrimLog { log, before } => {
                self.trim(Table::Logs, &prefixed(log), *before)?;
                Applied::Trimmed
            }
            Op::Schedule {
                schedule,
                due_ms,
                item,
            } => {
                self.put(
                    Table::Schedule,
                    timer_key(schedule, *due_ms, item),
                    Vec::new(),
                );
                Applied::Scheduled
            }
            Op::Unschedule {
                schedule,
                due_ms,
                item,
            } => {
                self.delete(Table::Schedule, timer_key(schedule, *due_ms, item));
                Applied::Unscheduled
            }
            Op::PutIdempotency { key, value, mode } => {
                let k = key.as_str().as_bytes();
                if *mode == IdempotencyMode::CreateOnly
                    && self.get(Table::Idempotency, k)?.is_some()
                {
                    return Err(Error::IdempotencyExists {
                        key: key.to_string(),
                    });
                }
                self.put(Table::Idempotency, k.to_vec(), value.clone());
                Applied::Recorded
            }
        })
    }

    fn put_lease(&mut self, lease: &Lease) {
        self.put(
            Table::Leases,
            lease.name.as_str().as_bytes().to_vec(),
            encode_lease(lease),
        );
    }
}

/// Applies one request to the group; returns its outcome.
fn apply(tables: &Tables, group: &mut Pending, req: Request) -> Outcome {
    let mut txn = Txn::new(tables, group);
    let outcome = match req {
        Request::Commit(batch, tx) => {
            let r = txn.apply_batch(&batch);
            Outcome::Commit(tx, r)
        }
        Request::Acquire {
            name,
            holder,
            ttl_ms,
            now_ms,
            reply,
        } => {
            let r = store::validate_lease_request(&name, &holder, ttl_ms)
                .and_then(|()| txn.lease(&name))
                .and_then(|cur| store::decide_acquire(cur.as_ref(), &name, &holder, ttl_ms, now_ms))
                .inspect(|l| txn.put_lease(l));
            Outcome::Lease(reply, r)
        }
        Request::Renew {
            lease,
            ttl_ms,
            now_ms,
            reply,
        } => {
            let r = store::validate_lease_request(&lease.name, &lease.holder, ttl_ms)
                .and_then(|()| txn.lease(&lease.name))
                .and_then(|cur| store::decide_renew(cur.as_ref(), &lease, ttl_ms, now_ms))
                .inspect(|l| txn.put_lease(l));
            Outcome::Lease(reply, r)
        }
        Request::Release { lease, reply } => {
            let r = lease
                .name
                .validate()
                .and_then(|()| txn.lease(&lease.name))
                .and_then(|cur| store::decide_release(cur.as_ref(), &lease))
                .map(|l| txn.put_lease(&l));
            Outcome::Unit(reply, r)
        }
    };
    if outcome.succeeded() {
        let own = std::mem::take(&mut txn.own);
        group.extend(own);
    }
    outcome
}

/// The writer thread: drain, apply, one fsync, answer.
fn writer_loop(
    tables: Arc<Tables>,
    mut rx: mpsc::Receiver<Request>,
    max_group: usize,
    stats: Arc<WriterStats>,
) {
    let mut outcomes = Vec::with_capacity(max_group);
    while let Some(first) = rx.blocking_recv() {
        let mut group: Pending = HashMap::new();
        outcomes.clear();
        if let Err(e) = tables.check_poison() {
            // Keep answering, with the error, until the node is restarted.
            apply(&tables, &mut group, first).answer(Some(&e));
            continue;
        }
        outcomes.push(apply(&tables, &mut group, first));
        while outcomes.len() < max_group {
            match rx.try_recv() {
                Ok(req) => outcomes.push(apply(&tables, &mut group, req)),
                Err(_) => break,
            }
        }
        let error = if group.is_empty() {
            None
        } else {
            let mut batch = tables.db.batch().durability(Some(PersistMode::SyncAll));
            for ((t, k), v) in group.drain() {
                match v {
                    Some(v) => batch.insert(tables.table(t), k, v),
                    None => batch.remove(tables.table(t), k),
                }
            }
            match batch.commit() {
                Ok(()) => {
                    stats.groups.fetch_add(1, Ordering::Relaxed);
                    None
                }
                Err(e) => {
                    tracing::error!(error = %e, "embedded store write failed, store poisoned");
                    tables.poisoned.store(true, Ordering::Release);
                    Some(backend(e))
                }
            }
        };
        stats
            .requests
            .fetch_add(outcomes.len() as u64, Ordering::Relaxed);
        for o in outcomes.drain(..) {
            o.answer(error.as_ref());
        }
    }
}

/// One raw entry of [`EmbeddedStore::dump_raw`]: (keyspace, key, value).
pub type RawEntry = (String, Vec<u8>, Vec<u8>);

/// The embedded store. Cheap to share behind an `Arc`.
pub struct EmbeddedStore {
    tables: Arc<Tables>,
    tx: Option<mpsc::Sender<Request>>,
    writer: Option<std::thread::JoinHandle<()>>,
    stats: Arc<WriterStats>,
}

impl EmbeddedStore {
    /// Opens (or creates) the database at `config.path` and starts its writer thread.
    pub fn open(config: &EmbeddedConfig) -> Result<Self> {
        if config.max_group == 0 || config.queue_depth == 0 {
            return Err(Error::Config(format!(
                "embedded store needs max_group and queue_depth ≥ 1, got {} and {}",
                config.max_group, config.queue_depth
            )));
        }
        std::fs::create_dir_all(&config.path)
            .map_err(|e| Error::Backend(format!("cannot create {}: {e}", config.path.display())))?;
        let db = Database::builder(&config.path)
            .cache_size(config.cache_mib * 1024 * 1024)
            .open()
            .map_err(|e| match e {
                fjall::Error::Locked => Error::Backend(format!(
                    "database {} is in use by another process",
                    config.path.display()
                )),
                e => backend(e),
            })?;
        let ks = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(backend)
        };
        let tables = Arc::new(Tables {
            snapshots: ks("snapshots")?,
            high_water: ks("high_water")?,
            logs: ks("logs")?,
            outbox: ks("outbox")?,
            idempotency: ks("idempotency")?,
            leases: ks("leases")?,
            meta: ks("meta")?,
            schedule: ks("schedule")?,
            db,
            poisoned: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel(config.queue_depth);
        let stats = Arc::new(WriterStats::default());
        let writer = {
            let (tables, stats, max_group) = (tables.clone(), stats.clone(), config.max_group);
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || writer_loop(tables, rx, max_group, stats))
                .map_err(|e| Error::Backend(format!("cannot start the writer thread: {e}")))?
        };
        tracing::info!(path = %config.path.display(), max_group = config.max_group, "embedded store open");
        Ok(Self {
            tables,
            tx: Some(tx),
            writer: Some(writer),
            stats,
        })
    }

    /// Every key and value of every keyspace of the database at `path`, raw, as
    /// (keyspace, key, value): what the store holds, whatever the port lets one read.
    /// Test support, for proofs of what is not stored (an erasure); the database must not
    /// be open elsewhere.
    pub fn dump_raw(path: &std::path::Path) -> Result<Vec<RawEntry>> {
        let db = Database::builder(path).open().map_err(backend)?;
        let mut names: Vec<String> = db
            .list_keyspace_names()
            .iter()
            .map(|n| n.to_string())
            .collect();
        // The backend's own keyspaces, should the listing leave any out.
        for known in [
            "snapshots",
            "high_water",
            "logs",
            "outbox",
            "idempotency",
            "leases",
            "meta",
            "schedule",
        ] {
            if !names.iter().any(|n| n == known) && db.keyspace_exists(known) {
                names.push(known.to_owned());
            }
        }
        let mut out = Vec::new();
        for name in names {
            let ks = db
                .keyspace(&name, KeyspaceCreateOptions::default)
                .map_err(backend)?;
            for guard in ks.iter() {
                let (k, v) = guard.into_inner().map_err(backend)?;
                out.push((name.clone(), k.to_vec(), v.to_vec()));
            }
        }
        Ok(out)
    }

    /// The writer's counters.
    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    async fn send(&self, req: Request) -> Result<()> {
        let tx = self.tx.as_ref().ok_or(Error::Closed)?;
        tx.send(req).await.map_err(|_| Error::Closed)
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Tables) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let tables = self.tables.clone();
        tokio::task::spawn_blocking(move || f(&tables))
            .await
            .map_err(|e| Error::Backend(format!("read task failed: {e}")))?
    }
}

impl Drop for EmbeddedStore {
    /// Stops the writer after it has answered what is queued, so the database is free to
    /// be opened again as soon as the store is dropped.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

async fn answer<T>(rx: oneshot::Receiver<Result<T>>) -> Result<T> {
    rx.await.map_err(|_| Error::Closed)?
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn commit(&self, batch: WriteBatch) -> Result<Vec<Applied>> {
        // Refuse bad input before it takes a place in the writer's queue.
        batch.validate()?;
        let (tx, rx) = oneshot::channel();
        self.send(Request::Commit(batch, tx)).await?;
        answer(rx).await
    }

    async fn snapshot(&self, key: &Key) -> Result<Option<Versioned>> {
        key.validate()?;
        let k = key.clone();
        self.read(move |t| {
            t.get(Table::Snapshots, k.as_str().as_bytes())?
                .map(|v| decode_snapshot(&v))
                .transpose()
        })
        .await
    }

    async fn high_water(&self, device: &Key) -> Result<u64> {
        device.validate()?;
        let k = device.clone();
        self.read(move |t| {
            t.get(Table::HighWater, k.as_str().as_bytes())?
                .map_or(Ok(0), |v| decode_u64(&v))
        })
        .await
    }

    async fn read_log(&self, log: &Key, from: u64, limit: usize) -> Result<Vec<Entry>> {
        store::validate_range(log, from, limit)?;
        let prefix = prefixed(log);
        self.read(move |t| t.range(Table::Logs, &prefix, from, limit))
            .await
    }

    async fn idempotency(&self, key: &Key) -> Result<Option<Vec<u8>>> {
        key.validate()?;
        let k = key.clone();
        self.read(move |t| t.get(Table::Idempotency, k.as_str().as_bytes()))
            .await
    }

    async fn read_outbox(&self, queue: &Key, from: u64, limit: usize) -> Result<Vec<Entry>> {
        store::validate_range(queue, from, limit)?;
        let prefix = prefixed(queue);
        self.read(move |t| t.range(Table::Outbox, &prefix, from, limit))
            .await
    }

    async fn read_due(&self, schedule: &Key, until_ms: u64, limit: usize) -> Result<Vec<Due>> {
        store::validate_due(schedule, limit)?;
        let prefix = prefixed(schedule);
        self.read(move |t| t.due(&prefix, until_ms, limit)).await
    }

    async fn acquire_lease(
        &self,
        name: &Key,
        holder: &str,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<Lease> {
        store::validate_lease_request(name, holder, ttl_ms)?;
        let (reply, rx) = oneshot::channel();
        self.send(Request::Acquire {
            name: name.clone(),
            holder: holder.to_owned(),
            ttl_ms,
            now_ms,
            reply,
        })
        .await?;
        answer(rx).await
    }

    async fn renew_lease(&self, lease: &Lease, ttl_ms: u64, now_ms: u64) -> Result<Lease> {
        store::validate_lease_request(&lease.name, &lease.holder, ttl_ms)?;
        let (reply, rx) = oneshot::channel();
        self.send(Request::Renew {
            lease: lease.clone(),
            ttl_ms,
            now_ms,
            reply,
        })
        .await?;
        answer(rx).await
    }

    async fn release_lease(&self, lease: &Lease) -> Result<()> {
        lease.name.validate()?;
        let (reply, rx) = oneshot::channel();
        self.send(Request::Release {
            lease: lease.clone(),
            reply,
        })
        .await?;
        answer(rx).await
    }

    async fn lease(&self, name: &Key) -> Result<Option<Lease>> {
        name.validate()?;
        let k = name.clone();
        self.read(move |t| {
            t.get(Table::Leases, k.as_str().as_bytes())?
                .map(|v| decode_lease(&k, &v))
                .transpose()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caretwin_actors::conformance::Harness;

    /// Opens an embedded store in a temporary directory kept for the harness's life.
    struct Embedded {
        dir: tempfile::TempDir,
    }

    impl Embedded {
        fn new() -> Self {
            Self {
                dir: tempfile::tempdir().expect("temporary directory"),
            }
        }
    }

    #[async_trait::async_trait]
    impl Harness for Embedded {
        async fn open(&mut self) -> Arc<dyn Store> {
            Arc::new(EmbeddedStore::open(&EmbeddedConfig::at(self.dir.path())).expect("open"))
        }
    }

    caretwin_actors::store_conformance!(Embedded::new());

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_fsyncs() {
        let h = Embedded::new();
        let store = Arc::new(EmbeddedStore::open(&EmbeddedConfig::at(h.dir.path())).unwrap());
        let mut tasks = Vec::new();
        for i in 0..2000u64 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.commit(WriteBatch::new().with(Op::Append {
                    log: "t/log/g".into(),
                    value: i.to_be_bytes().to_vec(),
                }))
                .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let groups = store.stats().groups.load(Ordering::Relaxed);
        assert_eq!(store.stats().requests.load(Ordering::Relaxed), 2000);
        // 2000 writers queued faster than fsyncs complete must share them.
        assert!(
            groups < 2000,
            "{groups} fsyncs for 2000 writes: no group commit"
        );
    }

    #[tokio::test]
    async fn open_refuses_zero_group() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = EmbeddedConfig::at(dir.path());
        c.max_group = 0;
        assert!(matches!(EmbeddedStore::open(&c), Err(Error::Config(_))));
    }
}
