//! The PostgreSQL storage backend, on tokio-postgres with a deadpool connection pool.
//!
//! Every [`WriteBatch`] is one transaction at READ COMMITTED, and every condition a batch
//! checks is checked on a locked row, so the answer cannot change before the commit:
//!
//! - **Fence:** the lease row is read `FOR SHARE` first. A takeover updates that row, and
//!   an `UPDATE` waits for every `FOR SHARE` holder to end (and vice versa), so either
//!   the takeover committed first — then the share lock, taken after waiting, reads the
//!   new token and the batch is refused — or the batch commits before the takeover can
//!   change the row. A stale owner's batch can never commit after the lease changed hands.
//! - **Compare-and-set** (snapshot versions, high-water marks) is one conditional
//!   statement: `UPDATE … WHERE version = $expected`, or `INSERT … ON CONFLICT DO
//!   NOTHING` when the row must be absent. A racing writer waits on the row lock (or on
//!   the other's uncommitted insert), then re-checks the condition against the committed
//!   row and finds it changed: exactly one of two racing writers wins.
//! - **Log and outbox indexes** come from a per-name counter row, bumped by an upsert
//!   that holds its row lock until commit: appenders to one log queue there, indexes are
//!   contiguous, and an aborted batch gives its indexes back.
//! - **Create-only idempotency records** are `INSERT … ON CONFLICT DO NOTHING`.
//!
//! Leases are read `FOR UPDATE`, decided by the port's shared [`store::decide_acquire`],
//! [`store::decide_renew`] and [`store::decide_release`], and written in one transaction.
//!
//! Deadlocks (two batches locking the same rows in opposite orders), serialization
//! failures, and connections lost before the commit was sent are retried with backoff
//! inside the store: the transaction was rolled back, so a retry is safe, and callers
//! never see them as data errors. A connection lost *during* `COMMIT` is different: the
//! outcome is unknown, and the caller gets [`Error::Backend`] saying so.
//!
//! A client that vanishes mid-transaction — cut off by the network, its packets dropped —
//! leaves the transaction open on the server, and with it the share lock on its shard's
//! lease row: a takeover's `FOR UPDATE` would wait for it until the server's TCP keep-alive
//! gives up on the client, hours later, and every other lease call of the taking node with
//! it. `idle_in_transaction_timeout` has the server end such a transaction; a node sets it
//! to half its lease, so the lock is gone before the lease runs out.
//!
//! Durability: a commit is acknowledged after PostgreSQL flushed its WAL. Every
//! connection sets `synchronous_commit = on`, whatever the server's default; a server
//! running with `fsync = off` is reported at open.
//!
//! Connections are plain TCP or a unix socket, without TLS: the workspace links one
//! crypto provider (aws-lc-rs) and the usual PostgreSQL TLS crates would bring another.
//! Run the database on the node's machine or a private network.
//!
//! # Schema
//! Versioned migrations ([`MIGRATIONS`]) run at open under an advisory lock, so nodes
//! opening one database at once apply each migration exactly once. Keys are `TEXT
//! COLLATE "C"` (the port's keys are UTF-8 without NUL), values `BYTEA`. Numbers are
//! `BIGINT`: a `u64` is stored bit for bit as an `i64`, except timer due times, which are
//! compared by order and stored with the sign bit flipped so order is kept.

use backon::{ExponentialBuilder, Retryable};
use caretwin_actors::store::{
    self, Applied, Due, Entry, IdempotencyMode, Key, Lease, Op, Store, Versioned, WriteBatch,
};
use caretwin_actors::{Error, Result};
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Row};

/// Settings of the PostgreSQL backend (`[store.postgres]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection URL, `postgres://user:password@host:port/database` (or `host=/run/…`
    /// for a unix socket). Any libpq connection parameter tokio-postgres knows may be
    /// appended (`?connect_timeout=5`). The password is best given through the
    /// environment (`CARETWIN_CLUSTER__STORE__POSTGRES__URL`).
    #[serde(default = "default_url")]
    pub url: String,
    /// Most connections the node keeps open; more concurrent calls wait for one.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// How long the server lets a transaction of ours wait for its next statement before
    /// it ends the session (PostgreSQL's `idle_in_transaction_session_timeout`). A node cut
    /// off mid-batch leaves its transaction open on the server, holding the share lock on
    /// its shard's lease row, and no other node can take that lease until the transaction
    /// ends: without a limit, not before the server's TCP keep-alive gives up on the node
    /// (hours). Unset: the server's setting; a node sets half its `lease_ttl` (and refuses
    /// a value that is not below it).
    #[serde(default, with = "humantime_serde")]
    pub idle_in_transaction_timeout: Option<Duration>,
    /// How long data we sent may go unacknowledged by the server before the connection
    /// is closed (TCP_USER_TIMEOUT, Linux). Behind a network cut a connection otherwise
    /// waits out TCP's retransmissions (minutes) before it fails and is replaced, and a
    /// node whose cut healed waits with it before it can rejoin. Unset: the URL's
    /// `tcp_user_timeout` if it has one, else the system's; a node sets its `lease_ttl`
    /// (a connection that cannot deliver for a whole lease is of no use to it).
    #[serde(default, with = "humantime_serde")]
    pub tcp_user_timeout: Option<Duration>,
}

fn default_url() -> String {
    "postgres://caretwin@127.0.0.1:5432/caretwin".into()
}
fn default_pool_size() -> usize {
    16
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self::at(default_url())
    }
}

impl PostgresConfig {
    /// Default settings for the database at `url`.
    pub fn at(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: default_pool_size(),
            idle_in_transaction_timeout: None,
            tcp_user_timeout: None,
        }
    }
}

/// A schema migration: its version (applied in order, each once) and its SQL.
pub struct Migration {
    /// The schema version this migration brings the database to.
    pub version: i32,
    /// What it does, recorded beside the version.
    pub name: &'static str,
    /// The statements.
    pub sql: &'static str,
}

/// The schema, as migrations from an empty database. Append new ones; never edit one
/// that has shipped.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "storage port tables",
    sql: r#"
CREATE TABLE snapshots (
    key     TEXT COLLATE "C" PRIMARY KEY,
    version BIGINT NOT NULL,
    value   BYTEA NOT NULL
);
CREATE TABLE high_water (
    device TEXT COLLATE "C" PRIMARY KEY,
    seq    BIGINT NOT NULL
);
CREATE TABLE counters (
    kind       TEXT NOT NULL,
    name       TEXT COLLATE "C" NOT NULL,
    last_index BIGINT NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE log_entries (
    log   TEXT COLLATE "C" NOT NULL,
    idx   BIGINT NOT NULL,
    value BYTEA NOT NULL,
    PRIMARY KEY (log, idx)
);
CREATE TABLE outbox (
    queue TEXT COLLATE "C" NOT NULL,
    idx   BIGINT NOT NULL,
    value BYTEA NOT NULL,
    PRIMARY KEY (queue, idx)
);
CREATE TABLE idempotency (
    key   TEXT COLLATE "C" PRIMARY KEY,
    value BYTEA NOT NULL
);
CREATE TABLE leases (
    name          TEXT COLLATE "C" PRIMARY KEY,
    holder        TEXT NOT NULL,
    token         BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
CREATE TABLE timers (
    schedule TEXT COLLATE "C" NOT NULL,
    due      BIGINT NOT NULL,
    item     BYTEA NOT NULL,
    PRIMARY KEY (schedule, due, item)
);
"#,
}];

/// The advisory lock that serialises migrations across nodes ("caretwn" in ASCII).
const MIGRATION_LOCK: i64 = 0x0063_6172_6574_776e;

const FENCE: &str = "SELECT holder, token, expires_at_ms FROM leases WHERE name = $1 FOR SHARE";
const LEASE_FOR_UPDATE: &str =
    "SELECT holder, token, expires_at_ms FROM leases WHERE name = $1 FOR UPDATE";
const LEASE: &str = "SELECT holder, token, expires_at_ms FROM leases WHERE name = $1";
const INSERT_LEASE: &str = "INSERT INTO leases (name, holder, token, expires_at_ms) \
     VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING";
const UPDATE_LEASE: &str =
    "UPDATE leases SET holder = $2, token = $3, expires_at_ms = $4 WHERE name = $1";
const INSERT_SNAPSHOT: &str = "INSERT INTO snapshots (key, version, value) VALUES ($1, 1, $2) \
     ON CONFLICT (key) DO NOTHING";
const UPDATE_SNAPSHOT: &str =
    "UPDATE snapshots SET version = version + 1, value = $2 WHERE key = $1 AND version = $3";
const DELETE_SNAPSHOT: &str = "DELETE FROM snapshots WHERE key = $1 AND version = $2";
const SNAPSHOT: &str = "SELECT version, value FROM snapshots WHERE key = $1";
const SNAPSHOT_VERSION: &str = "SELECT version FROM snapshots WHERE key = $1";
const INSERT_HIGH_WATER: &str =
    "INSERT INTO high_water (device, seq) VALUES ($1, $2) ON CONFLICT (device) DO NOTHING";
const UPDATE_HIGH_WATER: &str = "UPDATE high_water SET seq = $2 WHERE device = $1 AND seq = $3";
const HIGH_WATER: &str = "SELECT seq FROM high_water WHERE device = $1";
const NEXT_LOG_INDEX: &str = "INSERT INTO counters (kind, name, last_index) VALUES ('log', $1, 1) \
     ON CONFLICT (kind, name) DO UPDATE SET last_index = counters.last_index + 1 \
     RETURNING last_index";
const NEXT_OUTBOX_INDEX: &str = "INSERT INTO counters (kind, name, last_index) \
     VALUES ('outbox', $1, 1) \
     ON CONFLICT (kind, name) DO UPDATE SET last_index = counters.last_index + 1 \
     RETURNING last_index";
const INSERT_LOG: &str = "INSERT INTO log_entries (log, idx, value) VALUES ($1, $2, $3)";
const TRIM_LOG: &str = "DELETE FROM log_entries WHERE log = $1 AND idx < $2";
const READ_LOG: &str =
    "SELECT idx, value FROM log_entries WHERE log = $1 AND idx >= $2 ORDER BY idx LIMIT $3";
const INSERT_OUTBOX: &str = "INSERT INTO outbox (queue, idx, value) VALUES ($1, $2, $3)";
const DELETE_OUTBOX: &str = "DELETE FROM outbox WHERE queue = $1 AND idx = $2";
const READ_OUTBOX: &str =
    "SELECT idx, value FROM outbox WHERE queue = $1 AND idx >= $2 ORDER BY idx LIMIT $3";
const CREATE_IDEMPOTENCY: &str =
    "INSERT INTO idempotency (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING";
const PUT_IDEMPOTENCY: &str = "INSERT INTO idempotency (key, value) VALUES ($1, $2) \
     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value";
const IDEMPOTENCY: &str = "SELECT value FROM idempotency WHERE key = $1";
const SCHEDULE: &str = "INSERT INTO timers (schedule, due, item) VALUES ($1, $2, $3) \
     ON CONFLICT DO NOTHING";
const UNSCHEDULE: &str = "DELETE FROM timers WHERE schedule = $1 AND due = $2 AND item = $3";
const READ_DUE: &str = "SELECT due, item FROM timers WHERE schedule = $1 AND due <= $2 \
     ORDER BY due, item LIMIT $3";

/// A `u64` as the `BIGINT` that holds it, bit for bit (compared for equality only).
fn int(x: u64) -> i64 {
    x as i64
}

/// A `BIGINT` read back as the `u64` it holds.
fn uint(x: i64) -> u64 {
    x as u64
}

/// A `u64` as a `BIGINT` that sorts like it: the sign bit flipped.
fn ordered(x: u64) -> i64 {
    (x ^ (1 << 63)) as i64
}

/// The `u64` an [`ordered`] `BIGINT` holds.
fn unordered(x: i64) -> u64 {
    (x as u64) ^ (1 << 63)
}

/// A range bound as a `BIGINT`: log and queue indexes never reach 2^63, so a larger
/// bound means the same as `i64::MAX`.
fn bound(x: u64) -> i64 {
    i64::try_from(x).unwrap_or(i64::MAX)
}

/// Why one attempt failed: an answer for the caller, or a transient fault to retry.
#[derive(Debug)]
enum Fail {
    /// The caller's answer (a conflict, a stale fence, a backend fault that is final).
    Port(Error),
    /// Rolled back and worth another attempt (deadlock, serialization failure, lost
    /// connection before the commit).
    Transient(String),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Port(e)
    }
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        if is_transient(&e) {
            Fail::Transient(e.to_string())
        } else {
            Fail::Port(backend(&e))
        }
    }
}

impl From<PoolError> for Fail {
    fn from(e: PoolError) -> Self {
        match e {
            // Cannot connect (yet), or every connection is busy for too long: try again.
            PoolError::Backend(e) => Fail::Transient(format!("connect: {e}")),
            PoolError::Timeout(t) => Fail::Transient(format!("pool timeout: {t:?}")),
            e => Fail::Port(Error::Backend(format!("postgres pool: {e}"))),
        }
    }
}

impl Fail {
    fn into_error(self) -> Error {
        match self {
            Fail::Port(e) => e,
            Fail::Transient(e) => Error::Backend(format!("postgres: gave up retrying: {e}")),
        }
    }
}

/// Errors after which the transaction is known to be rolled back and a retry is safe.
fn is_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        Some(code) => {
            *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                // Class 08: connection exceptions.
                || code.code().starts_with("08")
        }
        None => e.is_closed(),
    }
}

fn backend(e: &tokio_postgres::Error) -> Error {
    match e.as_db_error() {
        Some(db) => Error::Backend(format!("postgres {}: {}", db.code().code(), db.message())),
        None => Error::Backend(format!("postgres: {e}")),
    }
}

/// The outcome of a failed `COMMIT`. When the server answered with an error, it rolled
/// the transaction back: a serialization failure or deadlock is retried, anything else
/// is final. When the connection failed instead, nobody knows whether it committed.
fn commit_failed(e: tokio_postgres::Error) -> Fail {
    match e.code() {
        Some(code)
            if *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED =>
        {
            Fail::Transient(e.to_string())
        }
        Some(_) if !is_transient(&e) => Fail::Port(backend(&e)),
        _ => Fail::Port(Error::Backend(format!(
            "postgres: commit outcome unknown, the connection failed during COMMIT: {e}"
        ))),
    }
}

fn lease_from_row(name: &Key, row: &Row) -> Lease {
    Lease {
        name: name.clone(),
        holder: row.get(0),
        token: uint(row.get(1)),
        expires_at_ms: uint(row.get(2)),
    }
}

fn entries(rows: Vec<Row>) -> Vec<Entry> {
    rows.iter()
        .map(|r| Entry {
            index: uint(r.get(0)),
            value: r.get(1),
        })
        .collect()
}

/// The PostgreSQL store. Cheap to share behind an `Arc`; the pool is closed when it is
/// dropped.
pub struct PostgresStore {
    pool: Pool,
}

impl PostgresStore {
    /// Connects to the database at `config.url`, brings its schema up to date, and keeps
    /// up to `config.pool_size` connections.
    pub async fn open(config: &PostgresConfig) -> Result<Self> {
        if config.pool_size == 0 {
            return Err(Error::Config(
                "postgres pool_size must be at least 1".into(),
            ));
        }
        let mut pg: tokio_postgres::Config = config
            .url
            .parse()
            .map_err(|e| Error::Config(format!("postgres url: {e}")))?;
        // Acknowledge only what is flushed, whatever the server's default says.
        let mut options = format!(
            "{} -c synchronous_commit=on",
            pg.get_options().unwrap_or_default()
        );
        if let Some(t) = config.idle_in_transaction_timeout {
            // In ms; 0 would switch the limit off.
            let ms = t.as_millis().max(1);
            options.push_str(&format!(" -c idle_in_transaction_session_timeout={ms}"));
        }
        pg.options(options.trim_start());
        if let Some(t) = config.tcp_user_timeout
            && pg.get_tcp_user_timeout().is_none()
        {
            pg.tcp_user_timeout(t);
        }
        if pg.get_application_name().is_none() {
            pg.application_name("caretwin");
        }
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                // A closed connection is noticed and replaced; one that dies between
                // uses fails its next statement, which is retried on a fresh one.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .create_timeout(Some(Duration::from_secs(10)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Config(format!("postgres pool: {e}")))?;
        let store = Self { pool };
        store.migrate().await?;
        Ok(store)
    }

    /// Applies the migrations the database lacks, under an advisory lock.
    async fn migrate(&self) -> Result<()> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| Error::Backend(format!("postgres: cannot connect: {e}")))?;
        let q = |e: tokio_postgres::Error| backend(&e);
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(q)?;
        let result = async {
            client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (
                        version    INTEGER PRIMARY KEY,
                        name       TEXT NOT NULL,
                        applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
                    )",
                )
                .await
                .map_err(q)?;
            let current: i32 = client
                .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[])
                .await
                .map_err(q)?
                .get(0);
            let known = MIGRATIONS.last().map_or(0, |m| m.version);
            if current > known {
                return Err(Error::Config(format!(
                    "postgres schema is at version {current}, newer than this build's {known}; \
                     run a newer caretwin-cluster"
                )));
            }
            for m in MIGRATIONS.iter().filter(|m| m.version > current) {
                // Each migration and its record commit together, or not at all.
                client.batch_execute("BEGIN").await.map_err(q)?;
                let applied = async {
                    client.batch_execute(m.sql).await?;
                    client
                        .execute(
                            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                            &[&m.version, &m.name],
                        )
                        .await?;
                    client.batch_execute("COMMIT").await
                }
                .await;
                if let Err(e) = applied {
                    let _ = client.batch_execute("ROLLBACK").await;
                    return Err(Error::Backend(format!(
                        "postgres migration {} ({}) failed: {}",
                        m.version,
                        m.name,
                        backend(&e)
                    )));
                }
                tracing::info!(version = m.version, name = m.name, "postgres schema migrated");
            }
            let fsync: String = client.query_one("SHOW fsync", &[]).await.map_err(q)?.get(0);
            if fsync != "on" {
                tracing::warn!(fsync = %fsync, "postgres runs without fsync: acknowledged writes may be lost in a crash");
            }
            Ok(())
        }
        .await;
        // The lock is the session's: should unlocking fail, dropping the connection frees it.
        if client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await
            .is_err()
        {
            drop(deadpool_postgres::Object::take(client));
        }
        result
    }

    /// Runs `attempt` until it succeeds or fails for good, retrying transient faults
    /// with exponential backoff (a few seconds in all).
    async fn retrying<T, F, Fut>(&self, what: &'static str, attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, Fail>>,
    {
        let backoff = ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(2))
            .with_max_delay(Duration::from_millis(500))
            .with_max_times(12)
            .with_jitter();
        attempt
            .retry(backoff)
            .when(|f: &Fail| matches!(f, Fail::Transient(_)))
            .notify(|f: &Fail, wait: Duration| {
                tracing::debug!(call = what, error = ?f, ?wait, "postgres call failed, retrying");
            })
            .await
            .map_err(Fail::into_error)
    }

    async fn try_commit(&self, batch: &WriteBatch) -> std::result::Result<Vec<Applied>, Fail> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        if let Some(fence) = &batch.fence {
            let row = tx
                .query_opt(&tx.prepare_cached(FENCE).await?, &[&fence.lease.as_str()])
                .await?;
            let current = row.map(|r| lease_from_row(&fence.lease, &r));
            store::check_fence(current.as_ref(), fence)?;
        }
        let mut applied = Vec::with_capacity(batch.ops.len());
        for op in &batch.ops {
            applied.push(apply(&tx, op).await?);
        }
        tx.commit().await.map_err(commit_failed)?;
        Ok(applied)
    }

    /// One lease transaction: read the row `FOR UPDATE`, decide, write.
    async fn try_lease(
        &self,
        name: &Key,
        decide: &(dyn Fn(Option<&Lease>) -> Result<Lease> + Sync),
    ) -> std::result::Result<Lease, Fail> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let row = tx
            .query_opt(
                &tx.prepare_cached(LEASE_FOR_UPDATE).await?,
                &[&name.as_str()],
            )
            .await?;
        let current = row.map(|r| lease_from_row(name, &r));
        let next = decide(current.as_ref())?;
        let params: [Param<'_>; 4] = [
            &name.as_str(),
            &next.holder,
            &int(next.token),
            &int(next.expires_at_ms),
        ];
        if current.is_some() {
            tx.execute(&tx.prepare_cached(UPDATE_LEASE).await?, &params)
                .await?;
        } else if tx
            .execute(&tx.prepare_cached(INSERT_LEASE).await?, &params)
            .await?
            == 0
        {
            // Another acquirer created the row after our read found none: read it again.
            return Err(Fail::Transient(format!(
                "lease {name} created concurrently"
            )));
        }
        tx.commit().await.map_err(commit_failed)?;
        Ok(next)
    }

    /// A range of a log or an outbox queue (`sql` is [`READ_LOG`] or [`READ_OUTBOX`]).
    async fn read_entries(
        &self,
        what: &'static str,
        sql: &'static str,
        name: &Key,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        store::validate_range(name, from, limit)?;
        let (from, limit) = (bound(from), limit as i64);
        self.read(what, sql, &[&name.as_str(), &from, &limit], entries)
            .await
    }

    /// A read on a pooled connection, retried like the writes.
    async fn read<T>(
        &self,
        what: &'static str,
        sql: &'static str,
        params: &[Param<'_>],
        map: impl Fn(Vec<Row>) -> T,
    ) -> Result<T> {
        self.retrying(what, || async {
            let client = self.pool.get().await?;
            let rows = client
                .query(&client.prepare_cached(sql).await?, params)
                .await?;
            Ok(map(rows))
        })
        .await
    }
}

type Tx<'a> = deadpool_postgres::Transaction<'a>;
type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);

/// Runs a cached statement; returns the rows it changed.
async fn exec(tx: &Tx<'_>, sql: &str, params: &[Param<'_>]) -> Result<u64, tokio_postgres::Error> {
    tx.execute(&tx.prepare_cached(sql).await?, params).await
}

/// Runs a cached statement that returns one row.
async fn one(tx: &Tx<'_>, sql: &str, params: &[Param<'_>]) -> Result<Row, tokio_postgres::Error> {
    tx.query_one(&tx.prepare_cached(sql).await?, params).await
}

/// The first column of the row `sql` finds for `key`, as a `u64` (0: no row).
async fn number(tx: &Tx<'_>, sql: &str, key: &str) -> Result<u64, tokio_postgres::Error> {
    let row = tx
        .query_opt(&tx.prepare_cached(sql).await?, &[&key])
        .await?;
    Ok(row.map_or(0, |r| uint(r.get(0))))
}

/// Applies one operation inside the batch's transaction.
async fn apply(tx: &Tx<'_>, op: &Op) -> std::result::Result<Applied, Fail> {
    Ok(match op {
        Op::PutSnapshot {
            key,
            expected_version,
            value,
        } => {
            let k = key.as_str();
            let written = if *expected_version == 0 {
                exec(tx, INSERT_SNAPSHOT, &[&k, value]).await?
            } else {
                exec(tx, UPDATE_SNAPSHOT, &[&k, value, &int(*expected_version)]).await?
            };
            if written == 0 {
                let actual = number(tx, SNAPSHOT_VERSION, k).await?;
                return Err(Error::VersionConflict {
                    key: key.to_string(),
                    expected: *expected_version,
                    actual,
                }
                .into());
            }
            Applied::Snapshot {
                version: expected_version + 1,
            }
        }
        Op::DeleteSnapshot {
            key,
            expected_version,
        } => {
            let k = key.as_str();
            if exec(tx, DELETE_SNAPSHOT, &[&k, &int(*expected_version)]).await? == 0 {
                let actual = number(tx, SNAPSHOT_VERSION, k).await?;
                return Err(Error::VersionConflict {
                    key: key.to_string(),
                    expected: *expected_version,
                    actual,
                }
                .into());
            }
            Applied::Deleted
        }
        Op::AdvanceHighWater { device, from, to } => {
            let d = device.as_str();
            let written = if *from == 0 {
                exec(tx, INSERT_HIGH_WATER, &[&d, &int(*to)]).await?
            } else {
                exec(tx, UPDATE_HIGH_WATER, &[&d, &int(*to), &int(*from)]).await?
            };
            if written == 0 {
                let actual = number(tx, HIGH_WATER, d).await?;
                return Err(Error::HighWaterConflict {
                    device: device.to_string(),
                    expected: *from,
                    actual,
                }
                .into());
            }
            Applied::HighWater { seq: *to }
        }
        Op::Append { log, value } => {
            let l = log.as_str();
            let index: i64 = one(tx, NEXT_LOG_INDEX, &[&l]).await?.get(0);
            exec(tx, INSERT_LOG, &[&l, &index, value]).await?;
            Applied::Index { index: uint(index) }
        }
        Op::TrimLog { log, before } => {
            exec(tx, TRIM_LOG, &[&log.as_str(), &bound(*before)]).await?;
            Applied::Trimmed
        }
        Op::Enqueue { queue, value } => {
            let q = queue.as_str();
            let index: i64 = one(tx, NEXT_OUTBOX_INDEX, &[&q]).await?.get(0);
            exec(tx, INSERT_OUTBOX, &[&q, &index, value]).await?;
            Applied::Index { index: uint(index) }
        }
        Op::Dequeue { queue, index } => {
            exec(tx, DELETE_OUTBOX, &[&queue.as_str(), &bound(*index)]).await?;
            Applied::Dequeued
        }
        Op::PutIdempotency { key, value, mode } => {
            let k = key.as_str();
            match mode {
                IdempotencyMode::CreateOnly => {
                    if exec(tx, CREATE_IDEMPOTENCY, &[&k, value]).await? == 0 {
                        return Err(Error::IdempotencyExists {
                            key: key.to_string(),
                        }
                        .into());
                    }
                }
                IdempotencyMode::Overwrite => {
                    exec(tx, PUT_IDEMPOTENCY, &[&k, value]).await?;
                }
            }
            Applied::Recorded
        }
        Op::Schedule {
            schedule,
            due_ms,
            item,
        } => {
            exec(tx, SCHEDULE, &[&schedule.as_str(), &ordered(*due_ms), item]).await?;
            Applied::Scheduled
        }
        Op::Unschedule {
            schedule,
            due_ms,
            item,
        } => {
            exec(
                tx,
                UNSCHEDULE,
                &[&schedule.as_str(), &ordered(*due_ms), item],
            )
            .await?;
            Applied::Unscheduled
        }
    })
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    async fn commit(&self, batch: WriteBatch) -> Result<Vec<Applied>> {
        batch.validate()?;
        self.retrying("commit", || self.try_commit(&batch)).await
    }

    async fn snapshot(&self, key: &Key) -> Result<Option<Versioned>> {
        key.validate()?;
        self.read("snapshot", SNAPSHOT, &[&key.as_str()], |rows| {
            rows.first().map(|r| Versioned {
                version: uint(r.get(0)),
                value: r.get(1),
            })
        })
        .await
    }

    async fn high_water(&self, device: &Key) -> Result<u64> {
        device.validate()?;
        self.read("high_water", HIGH_WATER, &[&device.as_str()], |rows| {
            rows.first().map_or(0, |r| uint(r.get(0)))
        })
        .await
    }

    async fn read_log(&self, log: &Key, from: u64, limit: usize) -> Result<Vec<Entry>> {
        self.read_entries("read_log", READ_LOG, log, from, limit)
            .await
    }

    async fn idempotency(&self, key: &Key) -> Result<Option<Vec<u8>>> {
        key.validate()?;
        self.read("idempotency", IDEMPOTENCY, &[&key.as_str()], |rows| {
            rows.first().map(|r| r.get(0))
        })
        .await
    }

    async fn read_outbox(&self, queue: &Key, from: u64, limit: usize) -> Result<Vec<Entry>> {
        self.read_entries("read_outbox", READ_OUTBOX, queue, from, limit)
            .await
    }

    async fn read_due(&self, schedule: &Key, until_ms: u64, limit: usize) -> Result<Vec<Due>> {
        store::validate_due(schedule, limit)?;
        let (until, limit) = (ordered(until_ms), limit as i64);
        self.read(
            "read_due",
            READ_DUE,
            &[&schedule.as_str(), &until, &limit],
            |rows| {
                rows.iter()
                    .map(|r| Due {
                        due_ms: unordered(r.get(0)),
                        item: r.get(1),
                    })
                    .collect()
            },
        )
        .await
    }

    async fn acquire_lease(
        &self,
        name: &Key,
        holder: &str,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<Lease> {
        store::validate_lease_request(name, holder, ttl_ms)?;
        let decide = |cur: Option<&Lease>| store::decide_acquire(cur, name, holder, ttl_ms, now_ms);
        self.retrying("acquire_lease", || self.try_lease(name, &decide))
            .await
    }

    async fn renew_lease(&self, lease: &Lease, ttl_ms: u64, now_ms: u64) -> Result<Lease> {
        store::validate_lease_request(&lease.name, &lease.holder, ttl_ms)?;
        let decide = |cur: Option<&Lease>| store::decide_renew(cur, lease, ttl_ms, now_ms);
        self.retrying("renew_lease", || self.try_lease(&lease.name, &decide))
            .await
    }

    async fn release_lease(&self, lease: &Lease) -> Result<()> {
        lease.name.validate()?;
        let decide = |cur: Option<&Lease>| store::decide_release(cur, lease);
        self.retrying("release_lease", || self.try_lease(&lease.name, &decide))
            .await
            .map(drop)
    }

    async fn lease(&self, name: &Key) -> Result<Option<Lease>> {
        name.validate()?;
        self.read("lease", LEASE, &[&name.as_str()], |rows| {
            rows.first().map(|r| lease_from_row(name, r))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip_and_due_times_keep_their_order() {
        for x in [0, 1, 42, i64::MAX as u64, 1 << 63, u64::MAX - 1, u64::MAX] {
            assert_eq!(uint(int(x)), x);
            assert_eq!(unordered(ordered(x)), x);
        }
        let due = [0, 1, 1_700_000_000_000, i64::MAX as u64, 1 << 63, u64::MAX];
        assert!(due.windows(2).all(|w| ordered(w[0]) < ordered(w[1])));
        assert_eq!(bound(u64::MAX), i64::MAX);
        assert_eq!(bound(7), 7);
    }

    #[test]
    fn migrations_count_up_from_one() {
        for (n, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, n as i32 + 1, "{}", m.name);
        }
    }

    #[tokio::test]
    async fn bad_settings_are_refused_before_connecting() {
        let mut c = PostgresConfig::at("postgres://nobody@127.0.0.1:1/x");
        c.pool_size = 0;
        assert!(matches!(
            PostgresStore::open(&c).await,
            Err(Error::Config(_))
        ));
        let c = PostgresConfig::at("not a url ://");
        assert!(matches!(
            PostgresStore::open(&c).await,
            Err(Error::Config(_))
        ));
    }
}
