//! The PostgreSQL backend against a real server: the whole storage conformance suite
//! (each test in a database of its own, so they run in parallel), a server crash, the
//! schema migrations, and the lock ordering that keeps a stale owner's batch from
//! committing after a takeover.
//!
//! The server: `scripts/test.sh` starts one and exports `CARETWIN_TEST_PG_URL`; without
//! it the tests start a shared one themselves through `scripts/postgres.sh` (see
//! `caretwin_tests::postgres`).

use caretwin_actors::Error;
use caretwin_actors::conformance::Harness;
use caretwin_actors::store::{Key, Op, Store, WriteBatch};
use caretwin_cluster::store::{PostgresConfig, PostgresStore, StoreConfig};
use caretwin_tests::postgres::{self as pg, PrivateServer};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn server() -> String {
    pg::server_url(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("postgres"))
}

/// A fresh database per harness, made on first open.
struct Postgres {
    server: String,
    db: Option<(String, String)>,
}

impl Postgres {
    fn new() -> Self {
        Self {
            server: server(),
            db: None,
        }
    }

    async fn config(&mut self) -> PostgresConfig {
        if self.db.is_none() {
            self.db = Some(pg::fresh_database(&self.server).await.expect("database"));
        }
        let mut c = PostgresConfig::at(&self.db.as_ref().expect("database").1);
        c.pool_size = 8;
        c
    }
}

#[async_trait::async_trait]
impl Harness for Postgres {
    async fn open(&mut self) -> Arc<dyn Store> {
        let config = self.config().await;
        Arc::new(PostgresStore::open(&config).await.expect("open"))
    }

    /// The node dies: its pool is gone and the server ends whatever connection was left.
    async fn crash(&mut self, store: Arc<dyn Store>) {
        drop(store);
        let db = &self.db.as_ref().expect("opened before").0;
        pg::terminate_connections(&self.server, db)
            .await
            .expect("terminate");
    }
}

caretwin_actors::store_conformance!(Postgres::new());

fn put(key: &str, expected_version: u64, value: &[u8]) -> Op {
    Op::PutSnapshot {
        key: key.into(),
        expected_version,
        value: value.to_vec(),
    }
}

/// Polls `cond` until it holds; fails after the harness deadline.
async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + caretwin_tests::DEADLINE;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn admin(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Backends of database `db` waiting for a lock.
async fn waiting_on_locks(client: &tokio_postgres::Client, db: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
            &[&db],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// A fenced batch that passed its fence check holds the lease row: a takeover waits
/// until the batch has committed, so the stale owner's write can never land after the
/// lease changed hands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_waits_for_a_fenced_batch_in_flight() {
    let mut h = Postgres::new();
    let config = h.config().await;
    let (db, url) = h.db.clone().unwrap();
    let store = Arc::new(PostgresStore::open(&config).await.unwrap());
    let lease_name = Key::from("shard/7");
    let old = store
        .acquire_lease(&lease_name, "node-a", 100, 0)
        .await
        .unwrap();
    store
        .commit(WriteBatch::fenced(old.fence()).with(put("t1/d/1", 0, b"v1")))
        .await
        .unwrap();

    // Hold the snapshot's row, so node-a's next batch stops after its fence check.
    let mut blocker = admin(&url).await;
    let tx = blocker.transaction().await.unwrap();
    tx.query(
        "SELECT 1 FROM snapshots WHERE key = 't1/d/1' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    let watcher = admin(&url).await;

    let stale = tokio::spawn({
        let (store, fence) = (store.clone(), old.fence());
        async move {
            store
                .commit(WriteBatch::fenced(fence).with(put("t1/d/1", 1, b"from node-a")))
                .await
        }
    });
    wait_until("node-a's batch to wait on the row", || async {
        waiting_on_locks(&watcher, &db).await == 1
    })
    .await;
    // node-a's lease has expired; node-b takes the shard. It must wait for node-a's batch.
    let takeover = tokio::spawn({
        let (store, name) = (store.clone(), lease_name.clone());
        async move { store.acquire_lease(&name, "node-b", 100, 500).await }
    });
    wait_until("the takeover to wait on the lease row", || async {
        waiting_on_locks(&watcher, &db).await == 2
    })
    .await;
    assert!(!takeover.is_finished() && !stale.is_finished());

    tx.commit().await.unwrap();
    let stale = stale.await.unwrap();
    let new = takeover.await.unwrap().unwrap();
    // node-a's batch committed while its lease was still current, before the takeover.
    stale.unwrap();
    assert_eq!(new.token, old.token + 1);
    let snap = store.snapshot(&"t1/d/1".into()).await.unwrap().unwrap();
    assert_eq!(
        (snap.version, snap.value.as_slice()),
        (2, &b"from node-a"[..])
    );
    // From now on node-a is fenced off.
    let err = store
        .commit(WriteBatch::fenced(old.fence()).with(put("t1/d/1", 2, b"too late")))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::StaleFence { .. }), "{err}");
}

/// A deadlock aborts one transaction; when it is a store's batch, the store retries it
/// and the caller sees only success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlocked_batch_is_retried_not_returned() {
    let mut h = Postgres::new();
    let config = h.config().await;
    let (db, url) = h.db.clone().unwrap();
    let store = Arc::new(PostgresStore::open(&config).await.unwrap());
    let append = |log: &str| Op::Append {
        log: log.into(),
        value: b"x".to_vec(),
    };
    store
        .commit(
            WriteBatch::new()
                .with(append("t1/log/a"))
                .with(append("t1/log/b")),
        )
        .await
        .unwrap();

    // Another client holds log b's counter; the store's batch takes a's, then waits on b.
    let mut other = admin(&url).await;
    // The store's backend, waiting first and with the default timeout, finds the cycle.
    other
        .batch_execute("SET deadlock_timeout = '30s'")
        .await
        .unwrap();
    let tx = other.transaction().await.unwrap();
    tx.query(
        "SELECT 1 FROM counters WHERE name = 't1/log/b' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    let watcher = admin(&url).await;
    let batch = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .commit(
                    WriteBatch::new()
                        .with(append("t1/log/a"))
                        .with(append("t1/log/b")),
                )
                .await
        }
    });
    wait_until("the batch to wait on log b's counter", || async {
        waiting_on_locks(&watcher, &db).await == 1
    })
    .await;
    // Close the cycle. This lock is granted only once the batch's transaction rolled back.
    tx.query(
        "SELECT 1 FROM counters WHERE name = 't1/log/a' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let applied = batch
        .await
        .unwrap()
        .expect("the deadlock was retried, not returned");
    assert_eq!(
        applied,
        vec![
            caretwin_actors::store::Applied::Index { index: 2 },
            caretwin_actors::store::Applied::Index { index: 2 }
        ]
    );
}

/// Acknowledged writes survive a crash of the server itself (`pg_ctl stop -m
/// immediate`: no checkpoint, WAL replay on restart), and the store's pool recovers by
/// itself once the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_server_crash() {
    let server = PrivateServer::start().expect("private server");
    let (_, url) = pg::fresh_database(server.url()).await.unwrap();
    let store = Arc::new(
        PostgresStore::open(&PostgresConfig::at(&url))
            .await
            .unwrap(),
    );
    let lease = store
        .acquire_lease(&"shard/crash".into(), "node-a", 60_000, 1)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for w in 0..100u64 {
        let (store, fence) = (store.clone(), lease.fence());
        tasks.push(tokio::spawn(async move {
            store
                .commit(
                    WriteBatch::fenced(fence)
                        .with(put(&format!("t1/d/{w}"), 0, &w.to_be_bytes()))
                        .with(Op::Append {
                            log: "t1/log".into(),
                            value: w.to_be_bytes().to_vec(),
                        }),
                )
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    server.crash().unwrap();
    // While the server is down, a call fails with a backend error after its retries.
    let down = store.snapshot(&"t1/d/0".into()).await;
    assert!(matches!(down, Err(Error::Backend(_))), "{down:?}");
    server.restart().unwrap();
    for check in [
        store.clone(),
        Arc::new(
            PostgresStore::open(&PostgresConfig::at(&url))
                .await
                .unwrap(),
        ),
    ] {
        for w in 0..100u64 {
            let snap = check.snapshot(&Key::new(format!("t1/d/{w}"))).await;
            assert_eq!(
                snap.unwrap().map(|v| v.value),
                Some(w.to_be_bytes().to_vec())
            );
        }
        assert_eq!(
            check
                .read_log(&"t1/log".into(), 1, 1000)
                .await
                .unwrap()
                .len(),
            100
        );
        assert_eq!(
            check.lease(&"shard/crash".into()).await.unwrap(),
            Some(lease.clone())
        );
    }
    let applied = store
        .commit(WriteBatch::fenced(lease.fence()).with(Op::Append {
            log: "t1/log".into(),
            value: b"after".to_vec(),
        }))
        .await
        .unwrap();
    assert_eq!(
        applied,
        vec![caretwin_actors::store::Applied::Index { index: 101 }]
    );
}

/// Nodes that open one new database at the same moment apply each migration once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_opening_together_migrate_once() {
    let mut h = Postgres::new();
    let config = h.config().await;
    let url = h.db.clone().unwrap().1;
    let opens: Vec<_> = (0..6)
        .map(|_| {
            let config = config.clone();
            tokio::spawn(async move { PostgresStore::open(&config).await })
        })
        .collect();
    for o in opens {
        o.await.unwrap().unwrap();
    }
    let client = admin(&url).await;
    let rows = client
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap();
    let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    let want: Vec<i32> = caretwin_cluster::store::postgres::MIGRATIONS
        .iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(versions, want);
    // Opening again changes nothing.
    PostgresStore::open(&config).await.unwrap();
    let again: i64 = client
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(again as usize, want.len());
}

/// A database migrated by a newer build is refused rather than misread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_newer_than_the_build_is_refused() {
    let mut h = Postgres::new();
    let config = h.config().await;
    PostgresStore::open(&config).await.unwrap();
    let client = admin(&config.url).await;
    client
        .execute(
            "INSERT INTO schema_migrations (version, name) VALUES (9999, 'from the future')",
            &[],
        )
        .await
        .unwrap();
    let err = PostgresStore::open(&config).await.err().expect("refused");
    assert!(
        matches!(err, Error::Config(ref m) if m.contains("9999")),
        "{err}"
    );
}

/// `[store] backend = "postgres"` opens this backend through the node's `open`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_backend_is_opened() {
    let mut h = Postgres::new();
    let url = h.config().await.url;
    let store = caretwin_cluster::store::open(&StoreConfig::postgres_at(&url))
        .await
        .unwrap();
    store
        .commit(WriteBatch::new().with(put("t1/d/cfg", 0, b"x")))
        .await
        .unwrap();
    let direct = PostgresStore::open(&PostgresConfig::at(&url))
        .await
        .unwrap();
    assert_eq!(
        direct
            .snapshot(&"t1/d/cfg".into())
            .await
            .unwrap()
            .unwrap()
            .value,
        b"x"
    );
}

/// A server that cannot be reached is a backend error, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_a_backend_error() {
    // Port 1 on loopback: nothing listens there.
    let c = PostgresConfig::at("postgres://caretwin@127.0.0.1:1/x?connect_timeout=2");
    let err = PostgresStore::open(&c).await.err().expect("refused");
    assert!(matches!(err, Error::Backend(_)), "{err}");
}
