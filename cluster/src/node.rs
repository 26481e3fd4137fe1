//! The cluster node's lifecycle: open the store, register, serve, drain.
//!
//! This is the I/O edge around the deciding code: it owns the clock, the store handle and
//! the tasks.

use crate::config::ClusterConfig;
use crate::ingest::{CommandSignals, EdgeGateway, Ingest};
use crate::sync::server::SyncServer;
use crate::{Error, Result};
use caretwin_actors::catalogue::Catalogue;
use caretwin_actors::host::clock::Clock;
use caretwin_actors::host::dispatch::{Delivery, Router};
use caretwin_actors::mail::Mail;
use caretwin_actors::store::{Key, Lease, Store};
use caretwin_actors::system::{Components, System};
use caretwin_actors::twins::customer::{CustomerMsg, CustomerReply};
use caretwin_actors::twins::device::{DeviceMsg, DeviceReply};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// A member whose lease ran out this many lease lifetimes ago is removed from the view
/// (`membership::Timing::forget_after`): long enough that a node merely slow to renew is
/// never removed, short enough that departed nodes stop costing a read per round.
const FORGET_AFTER_LEASES: u32 = 10;

/// Wall-clock time in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The membership lease's name for a node.
pub fn member_key(node_id: &str) -> Key {
    Key::new(format!("member/{node_id}"))
}

/// Customers and devices to provision at start.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionFile {
    /// The customers (those only named by a device are created without a profile).
    #[serde(default)]
    pub customers: Vec<ProvisionCustomer>,
    /// The devices.
    #[serde(default)]
    pub devices: Vec<ProvisionDevice>,
}

/// One customer to provision. Personal fields are written once, when the customer has no
/// personal record yet (afterwards the customer service owns them); an erased customer is
/// skipped, never created again.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionCustomer {
    /// The customer id (`tenant:customer`).
    pub id: String,
    /// Name to address the customer by.
    #[serde(default)]
    pub display_name: String,
    /// The customer's id in the tenant's CRM.
    #[serde(default)]
    pub external_ref: String,
    /// Language and region for messages (BCP 47).
    #[serde(default)]
    pub locale: String,
    /// Addresses on each channel.
    #[serde(default)]
    pub contacts: Vec<crate::pii::Contact>,
    /// Service level (set on every start when given).
    #[serde(default)]
    pub tier: Option<caretwin_actors::policy::ValueTier>,
    /// Service region for technicians (set on every start when given).
    #[serde(default)]
    pub region: Option<String>,
}

/// One device to provision.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionDevice {
    /// The device id (`tenant:device`).
    pub id: String,
    /// Its site (`tenant:site`).
    pub site: String,
    /// Its customer (`tenant:customer`).
    pub customer: String,
    /// Its catalogue model.
    pub model: String,
}

/// Logs what leaves the system for channels this node has no integration for yet
/// (notifications), and accepts it.
struct LogOutside;

#[async_trait::async_trait]
impl Router for LogOutside {
    async fn deliver(&self, mail: Mail) -> caretwin_actors::Result<Delivery> {
        tracing::info!(to = ?mail.to, id = %mail.id, body = ?mail.body, "outbound");
        Ok(Delivery::Delivered)
    }
}

pub use caretwin_actors::host::clock::SystemClock;

/// What a caller embedding a node may choose; the binary uses [`NodeOptions::default`].
pub struct NodeOptions {
    /// Where the node reads `now`: the wall clock, or (the demo) a scaled clock shared with
    /// the edges. Leases always use the wall clock: they are about processes being alive.
    pub clock: Arc<dyn Clock>,
    /// Where effects with no integration of their own go (notifications): by default the
    /// log. Part orders and bookings go to the partners of `[integrations]`.
    pub outside: Arc<dyn Router>,
    /// Who learns when shards are hosted and dropped here (the chaos tools' single
    /// activation monitor); nobody by default.
    pub monitor: Option<Arc<dyn caretwin_actors::host::remote::Monitor>>,
    /// A store to use instead of opening `[store]` (nodes of one process sharing a store
    /// in tests).
    pub store: Option<Arc<dyn Store>>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            outside: Arc::new(LogOutside),
            monitor: None,
            store: None,
        }
    }
}

/// A running node: its twins, its endpoints, and the task that serves them.
pub struct Node {
    system: Arc<System>,
    ingest: Arc<Ingest>,
    sync_addr: SocketAddr,
    grpc_addr: SocketAddr,
    supplier: Option<Arc<crate::integrations::supplier::InProcessSupplier>>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<()>>,
    kill: Option<tokio::sync::watch::Sender<bool>>,
    peer_addr: Option<SocketAddr>,
    view: Option<Arc<std::sync::RwLock<crate::peer::View>>>,
}

/// The cluster members as a node sees them ([`Node::members`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Members {
    /// Live members' ids (their member lease held and unexpired), sorted.
    pub live: Vec<String>,
    /// Members still watched: the live ones and those dead for less than the removal
    /// delay (ten lease lifetimes), sorted.
    pub known: Vec<String>,
}

/// Runs a node until `shutdown` resolves (see [`Node::start`] and [`Node::stop`]).
pub async fn run(config: ClusterConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    Node::start(config, NodeOptions::default())
        .await?
        .run_until(shutdown)
        .await
}

/// The store settings a node opens its store with: `config.store`, with PostgreSQL's
/// limit on a transaction waiting for its next statement at half a lease, and on data
/// unacknowledged by the server at a lease, unless set. A
/// node that vanished mid-batch (cut off from the database) leaves its transaction open,
/// holding its shard's lease row; the others can take the shard once its lease ran out
/// *and* the server ended that transaction, which this bounds below the lease.
fn store_config(config: &ClusterConfig) -> crate::store::StoreConfig {
    let mut store = config.store.clone();
    store
        .postgres
        .idle_in_transaction_timeout
        .get_or_insert(config.lease_ttl / 2);
    store
        .postgres
        .tcp_user_timeout
        .get_or_insert(config.lease_ttl);
    store
}

impl Node {
    /// Starts a node: opens its store, takes its membership lease (refusing to start if
    /// another process is live under the same id), hosts the twins, serves the edge sync
    /// and the integrator gRPC endpoint, fires timers and delivers mail.
    pub async fn start(config: ClusterConfig, options: NodeOptions) -> Result<Self> {
        config.validate()?;
        let backend = match options.store {
            Some(store) => store,
            None => crate::store::open(&store_config(&config)).await?,
        };
        // The twins write through the watched store, so the gRPC case streams wake as soon
        // as a case event or command transition is durable, and twin watches as soon as a
        // twin changed.
        let watched = crate::store::watch::Watched::new(backend, crate::grpc::WATCHED_LOGS);
        let log_signals = watched.signals();
        let snapshot_signals = watched.snapshot_signals();
        let mail = watched.mail_signal();
        let watched = Arc::new(watched);
        let store: Arc<dyn Store> = watched.clone();
        let lease = register(&*store, &config).await?;
        tracing::info!(node = %config.node_id, token = lease.token, "node registered");

        let signals = Arc::new(CommandSignals::default());
        let clock = options.clock;
        let catalogue = Arc::new(Catalogue::builtin());
        // Notifications are recorded for the gateways before the outside router sees them;
        // orders and bookings go to the partners first.
        let now_clock = clock.clone();
        // One vault for the whole node: its key cache is evicted on erasure.
        let vault = Arc::new(crate::pii::Vault::new(store.clone()));
        let recorder = Arc::new(
            crate::grpc::notifications::Recorder::new(
                store.clone(),
                options.outside,
                Arc::new(move || now_clock.now_ms()),
            )
            .with_vault(vault.clone()),
        );
        let integrations = crate::integrations::start(
            &config.integrations,
            &config.services.scheduler,
            store.clone(),
            clock.clone(),
            recorder,
        )
        .await?;
        let partners = integrations.router.clone();
        let outside = Arc::new(EdgeGateway::new(
            store.clone(),
            signals.clone(),
            partners.clone(),
        ));
        let field_service = integrations.booking_router();
        // A store other nodes can share is always used as a member of a cluster (of one,
        // maybe): two nodes on it must never both host every shard.
        let clustered =
            config.cluster.enabled || config.store.backend != crate::store::Backend::Embedded;
        let hosting = if clustered {
            caretwin_actors::system::Hosting::Placed
        } else {
            caretwin_actors::system::Hosting::Everything
        };
        let system = Arc::new(
            System::start_hosting(
                Components {
                    store: store.clone(),
                    clock: clock.clone(),
                    catalogue: catalogue.clone(),
                    device_env: None,
                    services: config.services.clone(),
                    host: config.host,
                    outside,
                    local_supplier: None,
                },
                field_service,
                hosting,
            )
            .await?,
        );
        partners.bind(&system);
        ensure_dev_pki(&config.sync)?;
        let server_config = crate::sync::tls::server_config_from_files(
            &config.sync.ca,
            &config.sync.cert,
            &config.sync.key,
        )
        .map_err(|e| Error::Config(format!("sync TLS: {e}")))?;
        // Bound before joining, so the node can announce where edges reach it; sessions
        // are served only once the node is ready.
        let (endpoint, sync_addr) = crate::sync::transport::bind(config.sync.listen, server_config)
            .map_err(|e| Error::Config(format!("sync endpoint: {e}")))?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut cluster = if clustered {
            let wake = Wake {
                logs: log_signals.clone(),
                sites: signals.clone(),
            };
            Some(
                join_cluster(
                    &config,
                    (&store, &watched),
                    &system,
                    (wake, sync_advertised(&config.sync, sync_addr)),
                    options.monitor,
                    stop_rx.clone(),
                )
                .await?,
            )
        } else {
            None
        };
        let kill = cluster.as_mut().map(|c| c.kill.clone());
        let peer_addr = cluster.as_ref().map(|c| c.addr);
        let view = cluster.as_ref().map(|c| c.view.clone());
        if let Some(path) = &config.provision {
            provision(&system, &vault, path).await?;
        }
        tracing::info!(addr = %sync_addr, "sync listening");
        let ingest = Arc::new(
            Ingest::new(system.clone(), store.clone(), &config.node_id)
                .with_heartbeat(config.sync.heartbeat),
        );
        let server = SyncServer::new(ingest.clone(), signals.clone(), clock.clone());
        if let Some(c) = &cluster {
            server.tell_members(c.sync_addrs.clone());
            let here = server.clone();
            c.presence.set_local(Arc::new(move || here.live_sites()));
        }

        let grpc_listener = tokio::net::TcpListener::bind(config.grpc.listen)
            .await
            .map_err(|e| Error::Config(format!("gRPC endpoint {}: {e}", config.grpc.listen)))?;
        let grpc_addr = grpc_listener
            .local_addr()
            .map_err(|e| Error::Config(format!("gRPC endpoint: {e}")))?;
        let tokens = if config.grpc.tokens.exists() {
            crate::grpc::auth::Tokens::load(&config.grpc.tokens)
                .map_err(|e| Error::Config(e.to_string()))?
        } else {
            crate::grpc::auth::Tokens::default()
        };
        tracing::info!(addr = %grpc_addr, tokens = tokens.len(), "gRPC listening");
        // A site may be connected to any member: online is what the cluster knows.
        let sites_online: crate::presence::LocalSites = match &cluster {
            Some(c) => {
                let presence = c.presence.clone();
                Arc::new(move || presence.online())
            }
            None => {
                let sites = server.clone();
                Arc::new(move || sites.live_sites())
            }
        };
        let services = crate::grpc::Services::with_retention(
            crate::grpc::Parts {
                system: system.clone(),
                store: store.clone(),
                logs: log_signals,
                snapshots: snapshot_signals,
                vault: vault.clone(),
                clock: clock.clone(),
                catalogue: catalogue.clone(),
                scheduler: config.services.scheduler.clone(),
                sites_online,
                closing: stop_rx.clone(),
            },
            crate::grpc::projection::Retention::keeping(config.grpc.case_retention),
            crate::grpc::projection::Retention::keeping(config.grpc.command_retention),
        );
        let identity = crate::grpc::identity(&config.sync.cert, &config.sync.key)?;

        let mut stop_server = stop_rx.clone();
        let serving = tokio::spawn(server.serve(endpoint, async move {
            let _ = stop_server.wait_for(|s| *s).await;
        }));
        let mut stop_grpc = stop_rx.clone();
        let grpc = tokio::spawn(crate::grpc::serve(
            grpc_listener,
            identity,
            Arc::new(tokens),
            services,
            async move {
                let _ = stop_grpc.wait_for(|s| *s).await;
            },
        ));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let builtin_supplier = integrations.supplier.clone();
        let twins = system.clone();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            // A cluster member's lease is renewed by its membership loop, which rides out
            // a store outage (dropping shards in time) and announces the node again after.
            let renews = !clustered;
            let lease = serve(&*store, &twins, &config, (lease, renews), &mail, shutdown).await;
            let _ = stop_tx.send(true);
            let _ = serving.await;
            // A member hands its shards over (drained, leases released) before it stops.
            if let Some(c) = cluster {
                let _ = c.membership.await;
                let _ = c.peers.await;
            }
            // Calls in flight get a moment to finish; streams end by themselves on shutdown.
            let abort = grpc.abort_handle();
            match tokio::time::timeout(std::time::Duration::from_secs(5), grpc).await {
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC endpoint failed"),
                Ok(Err(e)) => tracing::warn!(error = %e, "gRPC endpoint task failed"),
                Ok(Ok(Ok(()))) => {}
                Err(_) => {
                    tracing::warn!("gRPC calls still running after 5 s; cut off");
                    abort.abort();
                }
            }
            let lease = lease?;
            match Arc::try_unwrap(twins) {
                Ok(system) => system.stop().await,
                Err(_) => tracing::warn!("twins still referenced at shutdown; dropping them"),
            }
            // The built-in partners stop last: nothing calls them any more.
            drop(integrations.servers);
            store.release_lease(&lease).await?;
            tracing::info!(node = %config.node_id, "node left the cluster");
            drain(store);
            Ok(())
        });
        Ok(Self {
            system,
            ingest,
            sync_addr,
            grpc_addr,
            supplier: builtin_supplier,
            stop,
            task,
            kill,
            peer_addr,
            view,
        })
    }

    /// The twins and desks this node hosts.
    pub fn system(&self) -> &Arc<System> {
        &self.system
    }

    /// Where edges connect (QUIC).
    pub fn sync_addr(&self) -> SocketAddr {
        self.sync_addr
    }

    /// Where integrators connect (gRPC over TLS).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The members this node sees, when it is a cluster member.
    pub fn members(&self) -> Option<Members> {
        let view = self.view.as_ref()?.read().expect("view lock");
        Some(Members {
            live: view.live.iter().map(|m| m.node_id.clone()).collect(),
            known: view.known.clone(),
        })
    }

    /// Where the node's peers reach it (QUIC), when it is a cluster member.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_addr
    }

    /// The built-in parts supplier, when `[integrations] supplier = "builtin"`.
    pub fn builtin_supplier(
        &self,
    ) -> Option<&Arc<crate::integrations::supplier::InProcessSupplier>> {
        self.supplier.as_ref()
    }

    /// Readings the twins applied since the node started.
    pub fn readings_applied(&self) -> u64 {
        self.ingest.readings_applied()
    }

    /// Readings the twins set aside for lack of consent since the node started.
    pub fn readings_withheld(&self) -> u64 {
        self.ingest.readings_withheld()
    }

    /// Serves until `shutdown` resolves, then stops; returns early with the error if the
    /// node fails (its lease lost, its store gone).
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        tokio::select! {
            () = shutdown => self.stop().await,
            r = &mut self.task => r.map_err(|e| Error::Config(format!("node task: {e}")))?,
        }
    }

    /// Ends the node the way a crash would, for the chaos tools and tests of one process:
    /// its shards stop at once without draining, nothing is released (its member and shard
    /// leases run out by themselves), its membership, timers and mail stop. Only for a
    /// node in a cluster (a crash of the only node is a process kill).
    pub async fn kill(self) {
        let Self {
            system, task, kill, ..
        } = self;
        if let Some(kill) = kill {
            let _ = kill.send(true);
            // Wait (explicitly, no sleep) until nothing is hosted here any more.
            let mut wait = std::time::Duration::from_millis(1);
            while !system.hosted_shards().is_empty() {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_millis(20));
            }
        }
        task.abort();
        let _ = task.await;
    }

    /// Stops the node: it stops accepting sites and calls, drains the twins, releases its
    /// lease and closes the store cleanly.
    pub async fn stop(self) -> Result<()> {
        let Self {
            system,
            ingest,
            stop,
            task,
            ..
        } = self;
        // The serving task holds the last handles of the twins once these are gone.
        drop((system, ingest));
        let _ = stop.send(());
        task.await
            .map_err(|e| Error::Config(format!("node task: {e}")))?
    }
}

/// A node's part in a cluster: its membership loop and its peer endpoint, running.
struct Joined {
    addr: SocketAddr,
    view: Arc<std::sync::RwLock<crate::peer::View>>,
    /// The live members' sync addresses, for the edges.
    sync_addrs: Arc<crate::membership::SyncAddrs>,
    /// The sites online across the cluster.
    presence: Arc<crate::presence::Presence>,
    membership: tokio::task::JoinHandle<()>,
    peers: tokio::task::JoinHandle<()>,
    kill: tokio::sync::watch::Sender<bool>,
}

/// Binds the peer endpoint, announces the node, takes its first shards and starts the
/// membership loop.
/// The waiters a peer's "log grew" wakes here.
struct Wake {
    logs: Arc<crate::store::watch::LogSignals>,
    sites: Arc<CommandSignals>,
}

async fn join_cluster(
    config: &ClusterConfig,
    (store, watched): (&Arc<dyn Store>, &Arc<crate::store::watch::Watched>),
    system: &Arc<System>,
    (wake, sync_advertise): (Wake, Option<String>),
    monitor: Option<Arc<dyn caretwin_actors::host::remote::Monitor>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Joined> {
    let c = &config.cluster;
    let tls = crate::peer::PeerTls::from_files(
        &config.sync.ca,
        &config.sync.cert,
        &config.sync.key,
        &c.server_name,
    )?;
    let view = Arc::new(std::sync::RwLock::new(crate::peer::View::default()));
    let seen = view.clone();
    let peers = Arc::new(crate::peer::Peers::bind(
        &config.node_id,
        c.listen,
        tls,
        view.clone(),
    )?);
    let bound = peers.local_addr()?;
    let advertise = c.advertise.unwrap_or(bound);
    system.connect(peers.clone(), monitor);
    // Waiters on a watched log (gRPC streams, a site's command stream) may be on any node;
    // appends here are told to the peers, and theirs wake ours.
    let teller = peers.clone();
    watched.also_tell(Arc::new(move |log: &Key| teller.tell_grew(log.as_str())));
    // Twin watches too: the peers learn which twins are watched here and relay their
    // changes (the task ends with the peer endpoint).
    peers.share(watched.snapshot_signals(), wake.logs.clone());
    let on_grew: crate::peer::OnGrew = Arc::new(move |log: &str| {
        wake.logs.grew(&Key::new(log));
        if let Some(site) = log.strip_prefix("edge/") {
            wake.sites.of(site).notify_waiters();
        }
    });
    let serving = tokio::spawn(peers.serve(Arc::downgrade(system), on_grew, stop.clone()));
    let timing = crate::membership::Timing {
        lease_ttl: config.lease_ttl,
        round: config.renew_every,
        margin: config.lease_ttl / 3,
        forget_after: config.lease_ttl * FORGET_AFTER_LEASES,
    };
    let addresses = crate::membership::Addresses {
        peer: advertise.to_string(),
        sync: sync_advertise,
    };
    let mut membership = crate::membership::Membership::join(
        &config.node_id,
        &addresses,
        store.clone(),
        system.clone(),
        view,
        timing,
    )
    .await?;
    // The first rounds before serving: the node starts with its shards (as far as their
    // previous holders let go of them in time).
    let settled = membership.settle(config.lease_ttl * 2).await;
    tracing::info!(node = %config.node_id, peer = %advertise, sync = ?addresses.sync, shards = membership.held().len(), settled, "joined the cluster");
    let sync_addrs = membership.sync_addrs();
    let presence = membership.presence();
    let (kill, killed) = tokio::sync::watch::channel(false);
    Ok(Joined {
        addr: bound,
        view: seen,
        sync_addrs,
        presence,
        membership: tokio::spawn(membership.run(stop, killed)),
        peers: serving,
        kill,
    })
}

/// The sync address this node announces to edges: `[sync] advertise`, else the bound
/// address when it is a specific IP (an edge cannot dial `0.0.0.0`), else none.
fn sync_advertised(sync: &crate::config::SyncConfig, bound: SocketAddr) -> Option<String> {
    match &sync.advertise {
        Some(a) => Some(a.clone()),
        None if bound.ip().is_unspecified() => None,
        None => Some(bound.to_string()),
    }
}

/// On a fresh checkout, `run` must work with no manual step: when the sync certificates
/// are the defaults and none exists, a development PKI is created for them (with a warning
/// saying so). Certificates configured elsewhere are never invented: missing ones are an
/// error, reported when they are loaded.
fn ensure_dev_pki(sync: &crate::config::SyncConfig) -> Result<()> {
    let defaults = crate::config::SyncConfig::default();
    let is_default =
        sync.ca == defaults.ca && sync.cert == defaults.cert && sync.key == defaults.key;
    let none_exists = !sync.ca.exists() && !sync.cert.exists() && !sync.key.exists();
    if !(is_default && none_exists) {
        return Ok(());
    }
    let out = sync
        .ca
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    crate::sync::dev::generate(&crate::sync::dev::DevPki {
        out: out.clone(),
        cluster_name: "localhost".into(),
        sites: Vec::new(),
        force: false,
    })
    .map_err(|e| Error::Config(format!("creating development certificates: {e}")))?;
    tracing::warn!(
        dir = %out.display(),
        "DEVELOPMENT certificates created for the sync endpoint; never use them in production \
         (issue site certificates with `caretwin-cluster dev --out {} --site <tenant:site>`)",
        out.display()
    );
    Ok(())
}

async fn provision(
    system: &System,
    vault: &crate::pii::Vault,
    path: &std::path::Path,
) -> Result<()> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
    let mut file: ProvisionFile =
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    let bad_id = |id: &str| {
        !id.split_once(':')
            .is_some_and(|(t, r)| !t.is_empty() && !r.is_empty())
    };
    for c in &file.customers {
        if bad_id(&c.id) {
            return Err(Error::Config(format!(
                "{}: customer id {:?} is not tenant:customer",
                path.display(),
                c.id
            )));
        }
        provision_customer(system, vault, c).await?;
    }
    // An erased customer's devices are not linked to them again.
    let mut kept = Vec::with_capacity(file.devices.len());
    for d in file.devices {
        if vault.is_erased(&d.customer).await? {
            tracing::warn!(device = %d.id, customer = %d.customer, "customer erased; device not linked");
            continue;
        }
        vault.index_customer(&d.customer, now_ms()).await?;
        kept.push(d);
    }
    file.devices = kept;
    // Devices of different customers go in parallel; one customer's, one at a time (they
    // all write that customer's twin anyway).
    let mut by_customer: std::collections::BTreeMap<&str, Vec<&ProvisionDevice>> =
        Default::default();
    for d in &file.devices {
        by_customer.entry(d.customer.as_str()).or_default().push(d);
    }
    for (customer, devices) in by_customer {
        for d in &devices {
            let add = CustomerMsg::AddDevice {
                device: d.id.clone(),
                model: d.model.clone(),
            };
            if let CustomerReply::Rejected(why) = system.customers().call(customer, add).await? {
                return Err(Error::Config(format!(
                    "{}: device {}: {why}",
                    path.display(),
                    d.id
                )));
            }
        }
        for chunk in devices.chunks(64) {
            let calls = chunk.iter().map(|d| async move {
                let prov = DeviceMsg::Provision {
                    customer: d.customer.clone(),
                    site: d.site.clone(),
                    model: d.model.clone(),
                };
                (system.devices().call(&d.id, prov).await, d.id.as_str())
            });
            for (reply, id) in futures::future::join_all(calls).await {
                match reply? {
                    DeviceReply::Ok => {}
                    other => {
                        return Err(Error::Config(format!(
                            "{}: device {id}: {other:?}",
                            path.display()
                        )));
                    }
                }
            }
        }
    }
    tracing::info!(devices = file.devices.len(), "devices provisioned");
    Ok(())
}

/// Creates a customer: personal record (once), index entry, tier and region.
async fn provision_customer(
    system: &System,
    vault: &crate::pii::Vault,
    c: &ProvisionCustomer,
) -> Result<()> {
    if vault.is_erased(&c.id).await? {
        tracing::warn!(customer = %c.id, "customer erased; not provisioned again");
        return Ok(());
    }
    if vault.personal(&c.id).await?.is_none() {
        vault
            .update_personal(&c.id, |r| {
                r.display_name = c.display_name.clone();
                r.external_ref = c.external_ref.clone();
                r.locale = c.locale.clone();
                r.contact_points = c.contacts.clone();
            })
            .await?;
    }
    vault.index_customer(&c.id, now_ms()).await?;
    if c.tier.is_some() || c.region.is_some() {
        let current = system
            .customers()
            .inspect(&c.id, |t| t.map(|t| t.profile().clone()))
            .await?
            .unwrap_or_default();
        let mut profile = current.clone();
        if let Some(tier) = c.tier {
            profile.tier = tier;
        }
        if let Some(region) = &c.region {
            profile.region = region.clone();
        }
        if profile != current
            && let CustomerReply::Rejected(why) = system
                .customers()
                .call(&c.id, CustomerMsg::SetProfile(profile))
                .await?
        {
            return Err(Error::Config(format!("customer {}: {why}", c.id)));
        }
    }
    Ok(())
}

async fn register(store: &dyn Store, config: &ClusterConfig) -> Result<Lease> {
    let ttl = config.lease_ttl.as_millis() as u64;
    store
        .acquire_lease(&member_key(&config.node_id), &config.node_id, ttl, now_ms())
        .await
        .map_err(|e| match e {
            caretwin_actors::Error::LeaseHeld {
                holder,
                expires_at_ms,
                ..
            } => Error::NodeIdTaken {
                node_id: config.node_id.clone(),
                holder,
                expires_at_ms,
            },
            e => e.into(),
        })
}

async fn serve(
    store: &dyn Store,
    system: &System,
    config: &ClusterConfig,
    (mut lease, renews): (Lease, bool),
    mail: &tokio::sync::Notify,
    shutdown: impl Future<Output = ()>,
) -> Result<Lease> {
    let ttl = config.lease_ttl.as_millis() as u64;
    let mut renew = tokio::time::interval(config.renew_every);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    // Timers and mail run side by side: a round of timers (which may passivate many idle
    // twins) must not hold up a safety alarm's mail, and mail is delivered as soon as it
    // is durable (the tick is only its fallback).
    let timers = async {
        let mut tick = tokio::time::interval(config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = system.tick().await {
                tracing::warn!(error = %e, "timers failed this round");
            }
            // Timers write mail, which signals the pump; this is the fallback.
            mail.notify_one();
        }
    };
    let delivery = async {
        loop {
            mail.notified().await;
            pump(system).await;
        }
    };
    tokio::pin!(timers, delivery);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(lease),
            _ = renew.tick(), if renews => {
                // Lost to another process under this node's id: this one must stop. Not
                // renewed (the store slow or out of reach, a network cut): again next tick,
                // not waiting longer than that, while the membership loop stops the shards
                // by its own clock; a node that comes back renews and rejoins.
                match tokio::time::timeout(config.renew_every, store.renew_lease(&lease, ttl, now_ms())).await {
                    Ok(Ok(l)) => {
                        lease = l;
                        tracing::debug!(node = %config.node_id, expires_at_ms = lease.expires_at_ms, "lease renewed");
                    }
                    Ok(Err(e @ caretwin_actors::Error::LeaseLost { .. })) => return Err(e.into()),
                    Ok(Err(e)) => tracing::warn!(node = %config.node_id, error = %e, "node lease not renewed this round"),
                    Err(_) => tracing::warn!(node = %config.node_id, "node lease not renewed this round: the store did not answer in time"),
                }
            }
            () = &mut timers => unreachable!("the timers loop never ends"),
            () = &mut delivery => unreachable!("the delivery loop never ends"),
        }
    }
}

async fn pump(system: &System) {
    match system.pump().await {
        Ok(r) if r.delivered + r.dropped > 0 => {
            tracing::debug!(
                delivered = r.delivered,
                dropped = r.dropped,
                stalled = r.stalled,
                "mail delivered"
            );
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "mail delivery failed this round"),
    }
}

/// Drops the last handle of the store, which lets its writer finish what is queued.
fn drain(store: Arc<dyn Store>) {
    drop(store);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    #[tokio::test]
    async fn node_registers_and_releases_its_lease() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        crate::sync::dev::generate(&crate::sync::dev::DevPki {
            out: certs.clone(),
            cluster_name: "localhost".into(),
            sites: vec![crate::sync::tls::SiteIdentity::new("t1:home-1").unwrap()],
            force: false,
        })
        .unwrap();
        let config = ClusterConfig {
            store: StoreConfig::embedded_at(dir.path().join("data")),
            sync: crate::config::SyncConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                ca: certs.join("ca.pem"),
                cert: certs.join("cluster.pem"),
                key: certs.join("cluster.key"),
                ..crate::config::SyncConfig::default()
            },
            grpc: crate::config::GrpcConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                tokens: dir.path().join("no-tokens.toml"),
                ..Default::default()
            },
            ..ClusterConfig::default()
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let node = tokio::spawn(run(config.clone(), async move {
            let _ = rx.await;
        }));
        // The embedded database is locked while the node runs, so the lease is checked
        // after shutdown: taken once (token 1), then released.
        tx.send(()).unwrap();
        node.await.unwrap().unwrap();
        let store = crate::store::open(&config.store).await.unwrap();
        let lease = store.lease(&member_key("node-1")).await.unwrap().unwrap();
        assert_eq!(lease.expires_at_ms, 0, "released on shutdown");
        assert_eq!(lease.token, 1);
    }

    #[test]
    fn shipped_provisioning_example_parses() {
        let text = include_str!("../../deploy/config/devices.toml");
        let file: ProvisionFile = toml::from_str(text).unwrap();
        assert_eq!(file.devices.len(), 3);
        let catalogue = Catalogue::builtin();
        assert!(
            file.devices
                .iter()
                .all(|d| catalogue.model(&d.model).is_some())
        );
    }
}
