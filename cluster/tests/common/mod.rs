//! One node for the gRPC tests, wired as `Node::start` wires it: the embedded store
//! behind `Watched`, the desks and twins in virtual time, mail to the outside through the
//! edge gateway, the notification recorder (texts sealed) and, when asked, the
//! integrations with their built-in partners; every service from `Services::new`, served
//! over real tonic with TLS on a loopback port. A test adds tokens and provisioning.

#![allow(dead_code)] // each test binary uses its own part of the harness

use caretwin_actors::catalogue::Catalogue;
use caretwin_actors::host::clock::{Clock, ManualClock};
use caretwin_actors::host::dispatch::{Delivery, Router};
use caretwin_actors::host::registry::HostConfig;
use caretwin_actors::mail::Mail;
use caretwin_actors::model::HOUR_MS;
use caretwin_actors::services::Tenants;
use caretwin_actors::services::scheduler::SchedulerConfig;
use caretwin_actors::store::Store;
use caretwin_actors::system::{Components, ServicesConfig, System};
use caretwin_cluster::config::IntegrationsConfig;
use caretwin_cluster::grpc::auth::{Scope, TokenEntry, Tokens, mint};
use caretwin_cluster::grpc::notifications::Recorder;
use caretwin_cluster::grpc::{Parts, Services, WATCHED_LOGS, identity, serve};
use caretwin_cluster::ingest::{CommandSignals, EdgeGateway};
use caretwin_cluster::integrations::{self, Started};
use caretwin_cluster::pii::Vault;
use caretwin_cluster::store::watch::Watched;
use caretwin_cluster::store::{EmbeddedConfig, EmbeddedStore};
use caretwin_cluster::sync::dev::{DevPki, generate};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tonic::Request;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// Where mail goes once past the node's gateways (notifications, partner mail with no
/// partner): kept, so a test can see what left.
#[derive(Default)]
pub struct Outside(pub Mutex<Vec<Mail>>);

impl Outside {
    /// What left so far.
    pub fn mail(&self) -> Vec<Mail> {
        self.0.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl Router for Outside {
    async fn deliver(&self, m: Mail) -> caretwin_actors::Result<Delivery> {
        self.0.lock().unwrap().push(m);
        Ok(Delivery::Delivered)
    }
}

/// A node under test.
pub struct TestNode {
    /// Data and certificates.
    pub dir: tempfile::TempDir,
    /// The twins and desks.
    pub system: Arc<System>,
    /// The watched store the twins write through.
    pub store: Arc<dyn Store>,
    /// The node's vault of personal data.
    pub vault: Arc<Vault>,
    /// Virtual time.
    pub clock: Arc<ManualClock>,
    /// Records notifications for the gateways (mail can be given to it directly).
    pub recorder: Arc<Recorder>,
    /// What left the node.
    pub outside: Arc<Outside>,
    /// The integrations, when the builder asked for them (their built-in partners).
    pub partners: Option<Started>,
    /// A TLS channel to the gRPC endpoint.
    pub channel: Channel,
    /// Set to true: the node's streams end, as on shutdown.
    pub closing: tokio::sync::watch::Sender<bool>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// How to build a [`TestNode`].
pub struct Builder {
    now: u64,
    scheduler: Tenants<SchedulerConfig>,
    integrations: Option<IntegrationsConfig>,
    tokens: Vec<TokenEntry>,
}

impl TestNode {
    /// A node whose clock reads `now`.
    pub fn builder(now: u64) -> Builder {
        Builder {
            now,
            scheduler: Tenants::default(),
            integrations: None,
            tokens: Vec::new(),
        }
    }
}

impl Builder {
    /// The scheduler desks' technicians (the field service's too).
    pub fn scheduler(mut self, scheduler: Tenants<SchedulerConfig>) -> Self {
        self.scheduler = scheduler;
        self
    }

    /// Runs the node's integrations with `config` (built-in partners on loopback).
    pub fn integrations(mut self, config: IntegrationsConfig) -> Self {
        self.integrations = Some(config);
        self
    }

    /// Mints a token for `tenant` with `scopes`; returns it with the builder.
    pub fn token(mut self, name: &str, tenant: &str, scopes: Vec<Scope>) -> (Self, String) {
        let (token, entry) = mint(name, tenant, scopes);
        self.tokens.push(entry);
        (self, token)
    }

    /// Starts the node and connects to its gRPC endpoint.
    pub async fn start(self) -> TestNode {
        let dir = tempfile::tempdir().unwrap();
        let certs = dev_pki(dir.path());
        let backend: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&EmbeddedConfig::at(dir.path().join("data"))).unwrap());
        let watched = Watched::new(backend, WATCHED_LOGS);
        let (logs, snapshots) = (watched.signals(), watched.snapshot_signals());
        let store: Arc<dyn Store> = Arc::new(watched);
        let clock = Arc::new(ManualClock::new(self.now));
        let vault = Arc::new(Vault::new(store.clone()));
        let outside = Arc::new(Outside::default());
        let now = clock.clone();
        let recorder = Arc::new(
            Recorder::new(
                store.clone(),
                outside.clone(),
                Arc::new(move || now.now_ms()),
            )
            .with_vault(vault.clone()),
        );
        let partners = match &self.integrations {
            Some(config) => Some(
                integrations::start(
                    config,
                    &self.scheduler,
                    store.clone(),
                    clock.clone(),
                    recorder.clone(),
                )
                .await
                .unwrap(),
            ),
            None => None,
        };
        let rest: Arc<dyn Router> = match &partners {
            Some(p) => p.router.clone(),
            None => recorder.clone(),
        };
        let field_service = partners.as_ref().and_then(Started::booking_router);
        let catalogue = Arc::new(Catalogue::builtin());
        let system = Arc::new(
            System::start_with_field_service(
                Components {
                    store: store.clone(),
                    clock: clock.clone(),
                    catalogue: catalogue.clone(),
                    device_env: None,
                    services: ServicesConfig {
                        scheduler: self.scheduler.clone(),
                        ..ServicesConfig::default()
                    },
                    host: HostConfig {
                        shards: 4,
                        idle_ms: HOUR_MS,
                    },
                    outside: Arc::new(EdgeGateway::new(
                        store.clone(),
                        Arc::new(CommandSignals::default()),
                        rest,
                    )),
                    local_supplier: None,
                },
                field_service,
            )
            .await
            .unwrap(),
        );
        if let Some(p) = &partners {
            p.router.bind(&system);
        }
        let (closing, closing_rx) = tokio::sync::watch::channel(false);
        let services = Services::new(Parts {
            system: system.clone(),
            store: store.clone(),
            logs,
            snapshots,
            vault: vault.clone(),
            clock: clock.clone(),
            catalogue,
            scheduler: self.scheduler,
            sites_online: Arc::new(Vec::new),
            closing: closing_rx,
        });
        let tokens = Arc::new(Tokens::from_entries(self.tokens).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let id = identity(&certs.join("cluster.pem"), &certs.join("cluster.key")).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, id, tokens, services, async move {
            let _ = stopped.await;
        }));
        let channel = connect(&certs, &addr.to_string()).await;
        TestNode {
            dir,
            system,
            store,
            vault,
            clock,
            recorder,
            outside,
            partners,
            channel,
            closing,
            _stop: stop,
        }
    }
}

/// A dev PKI for a cluster named `localhost` in `dir/certs`; returns that folder.
pub fn dev_pki(dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    generate(&DevPki {
        out: certs.clone(),
        cluster_name: "localhost".into(),
        sites: vec![],
        force: false,
    })
    .unwrap();
    certs
}

/// A TLS channel to the gRPC endpoint at `addr` whose certificate the dev CA in `certs`
/// signed for `localhost`.
pub async fn connect(certs: &Path, addr: &str) -> Channel {
    let ca = std::fs::read(certs.join("ca.pem")).unwrap();
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// `msg` with `token` as its bearer.
pub fn with<T>(token: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}
