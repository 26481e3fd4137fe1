//! A cluster of nodes in one process, sharing one store: for the chaos tests and the
//! cluster benchmark.
//!
//! Every node's shard hosting is reported to one [`Activations`] monitor, which checks
//! single activation: no shard hosted on two nodes at once, and every new host holding a
//! newer fencing token than the last. A node can be stopped (it hands its shards over),
//! killed (its shards stop at once and its leases are left to run out) or cut off from
//! the store ([`Cut`]).

use caretwin_actors::host::remote::Monitor;
use caretwin_actors::store::{Applied, Due, Entry, Key, Lease, Store, Versioned, WriteBatch};
use caretwin_cluster::config::{ClusterConfig, GrpcConfig, MembershipConfig, SyncConfig};
use caretwin_cluster::node::{Node, NodeOptions};
use caretwin_cluster::store::{EmbeddedConfig, EmbeddedStore};
use caretwin_cluster::sync::dev::{DevPki, generate};
use std::collections::BTreeMap;

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Records every shard hosted and dropped, by node, and checks single activation.
/// Every shard hosted and dropped, by node, with the single-activation violations seen.
#[derive(Default)]
pub struct Activations {
    /// (kind, shard) → the node hosting it now and its token.
    now: Mutex<BTreeMap<(String, u32), (String, u64)>>,
    /// (kind, shard) → highest token seen.
    tokens: Mutex<BTreeMap<(String, u32), u64>>,
    violations: Mutex<Vec<String>>,
    hosted_total: Mutex<u64>,
}

/// One node's reports to the shared [`Activations`].
struct NodeMonitor {
    node: String,
    all: Arc<Activations>,
}

impl Monitor for NodeMonitor {
    fn hosted(&self, kind: &'static str, shard: u32, token: u64) {
        let key = (kind.to_owned(), shard);
        let mut now = self.all.now.lock().unwrap();
        if let Some((other, t)) = now.get(&key) {
            self.all.violations.lock().unwrap().push(format!(
                "{kind}/{shard} hosted on {} (token {token}) while on {other} (token {t})",
                self.node
            ));
        }
        let mut tokens = self.all.tokens.lock().unwrap();
        let last = tokens.entry(key.clone()).or_insert(0);
        if token <= *last {
            self.all.violations.lock().unwrap().push(format!(
                "{kind}/{shard} hosted on {} with token {token}, not above {last}",
                self.node
            ));
        }
        *last = token;
        now.insert(key, (self.node.clone(), token));
        *self.all.hosted_total.lock().unwrap() += 1;
    }

    fn unhosted(&self, kind: &'static str, shard: u32, token: u64) {
        let key = (kind.to_owned(), shard);
        let mut now = self.all.now.lock().unwrap();
        match now.get(&key) {
            Some((node, t)) if *node == self.node && *t == token => {
                now.remove(&key);
            }
            other => self.all.violations.lock().unwrap().push(format!(
                "{kind}/{shard} dropped by {} (token {token}) but hosted as {other:?}",
                self.node
            )),
        }
    }
}

/// A node's way to the store, which the test can cut (a network partition between the
/// node and the database): every call then fails as an unreachable database would
/// ([`Cut::set`]), or — as on a real cut, where packets vanish — neither answers nor fails
/// until the way is healed ([`Cut::silence`]).
pub struct Cut {
    inner: Arc<dyn Store>,
    state: tokio::sync::watch::Sender<Way>,
}

/// The state of a [`Cut`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Open,
    Failing,
    Silent,
}

impl Cut {
    /// `inner`, reachable until [`Cut::set`] or [`Cut::silence`].
    pub fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            state: tokio::sync::watch::Sender::new(Way::Open),
        })
    }

    /// Cuts (`true`: every call fails at once) or heals the way to the store.
    pub fn set(&self, cut: bool) {
        self.state
            .send_replace(if cut { Way::Failing } else { Way::Open });
    }

    /// Cuts (`true`: every call waits, unanswered, until the heal; then it goes through)
    /// or heals the way to the store.
    pub fn silence(&self, silent: bool) {
        self.state
            .send_replace(if silent { Way::Silent } else { Way::Open });
    }

    async fn check(&self) -> caretwin_actors::Result<()> {
        let mut state = self.state.subscribe();
        loop {
            let way = *state.borrow_and_update();
            match way {
                Way::Open => return Ok(()),
                Way::Failing => {
                    return Err(caretwin_actors::Error::Backend(
                        "partitioned from the store".into(),
                    ));
                }
                Way::Silent => {
                    // The sender lives as long as `self`.
                    let _ = state.changed().await;
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Store for Cut {
    async fn commit(&self, batch: WriteBatch) -> caretwin_actors::Result<Vec<Applied>> {
        self.check().await?;
        self.inner.commit(batch).await
    }
    async fn snapshot(&self, key: &Key) -> caretwin_actors::Result<Option<Versioned>> {
        self.check().await?;
        self.inner.snapshot(key).await
    }
    async fn high_water(&self, device: &Key) -> caretwin_actors::Result<u64> {
        self.check().await?;
        self.inner.high_water(device).await
    }
    async fn read_log(
        &self,
        log: &Key,
        from: u64,
        limit: usize,
    ) -> caretwin_actors::Result<Vec<Entry>> {
        self.check().await?;
        self.inner.read_log(log, from, limit).await
    }
    async fn idempotency(&self, key: &Key) -> caretwin_actors::Result<Option<Vec<u8>>> {
        self.check().await?;
        self.inner.idempotency(key).await
    }
    async fn read_outbox(
        &self,
        queue: &Key,
        from: u64,
        limit: usize,
    ) -> caretwin_actors::Result<Vec<Entry>> {
        self.check().await?;
        self.inner.read_outbox(queue, from, limit).await
    }
    async fn read_due(
        &self,
        schedule: &Key,
        until_ms: u64,
        limit: usize,
    ) -> caretwin_actors::Result<Vec<Due>> {
        self.check().await?;
        self.inner.read_due(schedule, until_ms, limit).await
    }
    async fn acquire_lease(
        &self,
        name: &Key,
        holder: &str,
        ttl_ms: u64,
        now_ms: u64,
    ) -> caretwin_actors::Result<Lease> {
        self.check().await?;
        self.inner.acquire_lease(name, holder, ttl_ms, now_ms).await
    }
    async fn renew_lease(
        &self,
        lease: &Lease,
        ttl_ms: u64,
        now_ms: u64,
    ) -> caretwin_actors::Result<Lease> {
        self.check().await?;
        self.inner.renew_lease(lease, ttl_ms, now_ms).await
    }
    async fn release_lease(&self, lease: &Lease) -> caretwin_actors::Result<()> {
        self.check().await?;
        self.inner.release_lease(lease).await
    }
    async fn lease(&self, name: &Key) -> caretwin_actors::Result<Option<Lease>> {
        self.check().await?;
        self.inner.lease(name).await
    }
}

/// Nodes of one process on one embedded store.
pub struct Cluster {
    /// Certificates and data.
    pub dir: tempfile::TempDir,
    /// The shared store.
    pub store: Arc<dyn Store>,
    /// The single-activation monitor.
    pub activations: Arc<Activations>,
    /// The running nodes, by id.
    pub nodes: BTreeMap<String, Node>,
    /// Shards per kind of twin.
    pub shards: u32,
}

impl Cluster {
    /// An empty cluster with `shards` shards, a development PKI (site `t1:home`) and an
    /// embedded store in a temporary directory.
    pub async fn new(shards: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        generate(&DevPki {
            out: dir.path().join("certs"),
            cluster_name: "localhost".into(),
            sites: vec![caretwin_cluster::sync::tls::SiteIdentity::new("t1:home").unwrap()],
            force: true,
        })
        .unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&EmbeddedConfig::at(dir.path().join("data"))).unwrap());
        Self {
            dir,
            store,
            activations: Arc::default(),
            nodes: BTreeMap::new(),
            shards,
        }
    }

    /// The configuration of node `id`: leases of 1 s renewed every 100 ms, endpoints
    /// on free loopback ports.
    pub fn config(&self, id: &str) -> ClusterConfig {
        let dir = self.dir.path();
        let certs = dir.join("certs");
        let mut c = ClusterConfig {
            node_id: id.into(),
            lease_ttl: Duration::from_millis(1000),
            renew_every: Duration::from_millis(100),
            sync: SyncConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                ca: certs.join("ca.pem"),
                cert: certs.join("cluster.pem"),
                key: certs.join("cluster.key"),
                ..SyncConfig::default()
            },
            grpc: GrpcConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                tokens: dir.join("no-tokens.toml"),
                ..Default::default()
            },
            cluster: MembershipConfig {
                enabled: true,
                ..MembershipConfig::default()
            },
            ..ClusterConfig::default()
        };
        c.host.shards = self.shards;
        c
    }

    /// Starts node `id` on the shared store.
    pub async fn start(&mut self, id: &str) {
        self.start_on(id, self.store.clone()).await;
    }

    /// Starts node `id` on `store` (the shared store behind a [`Cut`], say).
    pub async fn start_on(&mut self, id: &str, store: Arc<dyn Store>) {
        let node = Node::start(
            self.config(id),
            NodeOptions {
                monitor: Some(Arc::new(NodeMonitor {
                    node: id.into(),
                    all: self.activations.clone(),
                })),
                store: Some(store),
                ..NodeOptions::default()
            },
        )
        .await
        .expect("node starts");
        self.nodes.insert(id.into(), node);
    }

    /// Node `id`.
    pub fn node(&self, id: &str) -> &Node {
        &self.nodes[id]
    }

    /// Which node hosts each shard now (devices; every kind moves together).
    /// Which nodes host each shard now.
    pub fn hosts(&self) -> BTreeMap<u32, Vec<String>> {
        let mut hosts: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for (id, n) in &self.nodes {
            for s in n.system().hosted_shards() {
                hosts.entry(s).or_default().push(id.clone());
            }
        }
        hosts
    }

    /// Waits until every shard is hosted by exactly one of the running nodes, and each by
    /// the one placement names; fails after `within`.
    pub async fn wait_balanced(&self, within: Duration) -> BTreeMap<u32, String> {
        let ids: Vec<&str> = self.nodes.keys().map(String::as_str).collect();
        let want: BTreeMap<u32, String> = (0..self.shards)
            .map(|s| {
                let owner = caretwin_actors::placement::owner(s, ids.iter().copied()).unwrap();
                (s, owner.to_owned())
            })
            .collect();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let hosts = self.hosts();
            let got: BTreeMap<u32, String> = hosts
                .iter()
                .filter(|(_, h)| h.len() == 1)
                .map(|(s, h)| (*s, h[0].clone()))
                .collect();
            if got == want {
                return got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "shards not placed within {within:?}: hosts {hosts:?}, want {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Single-activation violations seen so far.
    pub fn violations(&self) -> Vec<String> {
        self.activations.violations.lock().unwrap().clone()
    }
}
