//! The integrator gRPC endpoint: tonic over TLS, bearer tokens with a tenant and scopes on
//! every call, the standard health service and server reflection (so grpcurl or Python's
//! grpcio work without our `.proto` files).
//!
//! # Layout
//! - [`auth`] — tokens, scopes, the interceptor and the tenant check.
//! - [`cases`] — `CaseService`: the handoff stream with its resume cursor, accept, resolve.
//! - [`commands`] — `CommandService`: send, follow, cancel commands to devices.
//! - [`catalogue`] — `CatalogueService`: the device model catalogue.
//! - [`customers`] — `CustomerService`: profiles, preferences, consent, export, erasure.
//! - [`notifications`] — `NotificationService`: the durable notification log, its stream
//!   for channel gateways, delivery reports and customers' answers.
//! - [`projection`] — the per-tenant fold of a log (cases, commands, notifications) and
//!   its retention.
//! - `stream` — what the log-backed streams share: waiting for more, durable cursors.
//! - [`twins`] — `TwinService`: get, query (through the device index) and watch twins,
//!   set desired state.
//! - [`work`] — `WorkService`: work orders, appointments, part orders, technicians.
//! - [`convert`] — the deciding code's types on the wire.
//!
//! Services not listed are not served yet (issue 5 continues); the health service reports
//! each served one as SERVING.

pub mod auth;
pub mod cases;
pub mod catalogue;
pub mod commands;
pub mod convert;
pub mod customers;
pub mod notifications;
pub mod projection;
mod stream;
pub mod twins;
pub mod work;

use crate::pii::Vault;
use crate::store::watch::{LogSignals, SnapshotSignals};
use crate::{Error, Result};
use auth::Tokens;
use caretwin_actors::catalogue::Catalogue;
use caretwin_actors::host::clock::Clock;
use caretwin_actors::services::Tenants;
use caretwin_actors::services::scheduler::SchedulerConfig;
use caretwin_actors::store::Store;
use caretwin_actors::system::System;
use caretwin_proto::v1::case_service_server::CaseServiceServer;
use caretwin_proto::v1::catalogue_service_server::CatalogueServiceServer;
use caretwin_proto::v1::command_service_server::CommandServiceServer;
use caretwin_proto::v1::customer_service_server::CustomerServiceServer;
use caretwin_proto::v1::notification_service_server::NotificationServiceServer;
use caretwin_proto::v1::twin_service_server::TwinServiceServer;
use caretwin_proto::v1::work_service_server::WorkServiceServer;
use projection::Retention;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use tonic::transport::{Identity, Server, ServerTlsConfig};

/// What the endpoint serves.
pub struct Services {
    /// The handoff of cases.
    pub cases: cases::CaseApi,
    /// The twins.
    pub twins: twins::TwinApi,
    /// The catalogue.
    pub catalogue: catalogue::CatalogueApi,
    /// The customers.
    pub customers: customers::CustomerApi,
    /// Work orders, appointments, part orders.
    pub work: work::WorkApi,
    /// Commands to devices.
    pub commands: commands::CommandApi,
    /// The notifications for channel gateways.
    pub notifications: notifications::NotificationApi,
}

/// The log families the node's `store::watch::Watched` signals: the services' streams
/// wake on their appends, and so does a site's command stream (`edge/`); in a cluster the
/// appends are told to the peers too.
pub const WATCHED_LOGS: &[&str] = &[
    "cases/",
    "commands/",
    "device-index/",
    "notifications/",
    "edge/",
];

/// What the services are made of: one node's system, store and signals.
pub struct Parts {
    /// The twins and desks.
    pub system: Arc<System>,
    /// The node's store, wrapped in `store::watch::Watched` (the signals below are its).
    pub store: Arc<dyn Store>,
    /// Appends to the watched log families (`cases/`, `commands/`, `device-index/`,
    /// `notifications/`).
    pub logs: Arc<LogSignals>,
    /// Committed snapshot writes, for twin watches.
    pub snapshots: Arc<SnapshotSignals>,
    /// The node's one vault of customers' personal data.
    pub vault: Arc<Vault>,
    /// Where `now` comes from.
    pub clock: Arc<dyn Clock>,
    /// The device models.
    pub catalogue: Arc<Catalogue>,
    /// The scheduler desks' settings (technicians), as the system runs them.
    pub scheduler: Tenants<SchedulerConfig>,
    /// Which sites have a sync session now.
    pub sites_online: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
    /// Becomes true when the node shuts down: every stream then ends.
    pub closing: tokio::sync::watch::Receiver<bool>,
}

impl Services {
    /// Every service over one node's `parts`, wired as the node serves them (the one
    /// place a new service is added, for the node and the tests alike).
    pub fn new(parts: Parts) -> Self {
        Self::with_retention(parts, cases::CASE_RETENTION, commands::COMMAND_RETENTION)
    }

    /// [`Services::new`], keeping resolved cases in the case log for `cases` and finished
    /// commands in the command log for `commands` (`[grpc] case_retention`,
    /// `command_retention`).
    pub fn with_retention(parts: Parts, cases: Retention, commands: Retention) -> Self {
        let (case_retention, command_retention) = (cases, commands);
        let Parts {
            system,
            store,
            logs,
            snapshots,
            vault,
            clock,
            catalogue,
            scheduler,
            sites_online,
            closing,
        } = parts;
        let cases = Arc::new(
            cases::Cases::new(system.clone(), store.clone(), logs.clone())
                .with_shutdown(closing.clone())
                .with_vault(vault.clone())
                .with_clock(clock.clone())
                .with_retention(case_retention),
        );
        let notifications = Arc::new(
            notifications::Notifications::new(system.clone(), store.clone(), logs.clone())
                .with_vault(vault.clone())
                .with_clock(clock.clone())
                .with_shutdown(closing.clone()),
        );
        let directory = Arc::new(twins::Directory::new(
            store.clone(),
            logs.clone(),
            snapshots,
        ));
        Self {
            customers: customers::CustomerApi::new(
                system.clone(),
                store.clone(),
                vault,
                cases.clone(),
                catalogue.clone(),
            )
            .with_notifications(notifications.clone()),
            notifications: notifications::NotificationApi(notifications),
            cases: cases::CaseApi(cases),
            twins: twins::TwinApi::new(system.clone(), sites_online)
                .with_directory(directory)
                .with_shutdown(closing.clone()),
            catalogue: catalogue::CatalogueApi::new(catalogue.clone()),
            work: work::WorkApi::new(
                system.clone(),
                catalogue.clone(),
                Arc::new(scheduler),
                clock.clone(),
            ),
            commands: commands::CommandApi(Arc::new(
                commands::Commands::new(system, store, logs, catalogue, clock)
                    .with_retention(command_retention)
                    .with_shutdown(closing),
            )),
        }
    }
}

/// The TLS identity of the endpoint from PEM files (the node's certificate and key).
pub fn identity(cert: &Path, key: &Path) -> Result<Identity> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| Error::Config(format!("cannot read {}: {e}", p.display())))
    };
    Ok(Identity::from_pem(read(cert)?, read(key)?))
}

/// Serves `services` on `listener` over TLS with `identity`, admitting `tokens`, until
/// `shutdown` resolves; then stops taking calls and lets running ones finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    identity: Identity,
    tokens: Arc<Tokens>,
    services: Services,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    if tokens.is_empty() {
        tracing::warn!("no integrator tokens configured: every gRPC call will be refused");
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<CaseServiceServer<cases::CaseApi>>()
        .await;
    health
        .set_serving::<TwinServiceServer<twins::TwinApi>>()
        .await;
    health
        .set_serving::<CatalogueServiceServer<catalogue::CatalogueApi>>()
        .await;
    health
        .set_serving::<CustomerServiceServer<customers::CustomerApi>>()
        .await;
    health
        .set_serving::<WorkServiceServer<work::WorkApi>>()
        .await;
    health
        .set_serving::<CommandServiceServer<commands::CommandApi>>()
        .await;
    health
        .set_serving::<NotificationServiceServer<notifications::NotificationApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(caretwin_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Config(format!("gRPC reflection: {e}")))?;
    let check = tokens.interceptor();
    // No Nagle: a response larger than a segment (a page of twins) would otherwise wait
    // for the client's delayed ACK, ~40 ms a call.
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |conn| {
            if let Ok(c) = &conn
                && let Err(e) = c.set_nodelay(true)
            {
                tracing::debug!(error = %e, "gRPC connection: TCP_NODELAY not set");
            }
            conn
        },
    );
    Server::builder()
        .tls_config(ServerTlsConfig::new().identity(identity))
        .map_err(|e| Error::Config(format!("gRPC TLS: {e}")))?
        .add_service(health_service)
        .add_service(reflection)
        .add_service(CaseServiceServer::with_interceptor(
            services.cases,
            check.clone(),
        ))
        .add_service(TwinServiceServer::with_interceptor(
            services.twins,
            check.clone(),
        ))
        .add_service(CatalogueServiceServer::with_interceptor(
            services.catalogue,
            check.clone(),
        ))
        .add_service(CustomerServiceServer::with_interceptor(
            services.customers,
            check.clone(),
        ))
        .add_service(WorkServiceServer::with_interceptor(
            services.work,
            check.clone(),
        ))
        .add_service(CommandServiceServer::with_interceptor(
            services.commands,
            check.clone(),
        ))
        .add_service(NotificationServiceServer::with_interceptor(
            services.notifications,
            check,
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| Error::Config(format!("gRPC server: {e}")))
}

/// A failure of the node as a gRPC status. Where the caller should simply try again — a
/// twin's shard moving between nodes, the store unreachable — it is `UNAVAILABLE` (which
/// stock gRPC clients retry); anything else is `INTERNAL`.
pub(crate) fn internal<E: std::fmt::Display + 'static>(e: E) -> tonic::Status {
    use caretwin_actors::Error as E2;
    let retry = (&e as &dyn std::any::Any)
        .downcast_ref::<E2>()
        .is_some_and(|e| {
            matches!(
                e,
                E2::NotHosted { .. } | E2::Backend(_) | E2::Closed | E2::Host(_)
            )
        });
    if retry {
        tonic::Status::unavailable(e.to_string())
    } else {
        tonic::Status::internal(e.to_string())
    }
}

#[cfg(test)]
mod status_tests {
    use super::internal;

    #[test]
    fn a_moving_shard_or_an_unreachable_store_is_unavailable_the_rest_internal() {
        let moving = caretwin_actors::Error::NotHosted {
            kind: "device".into(),
            shard: 3,
            reason: "moving".into(),
        };
        assert_eq!(internal(moving).code(), tonic::Code::Unavailable);
        let down = caretwin_actors::Error::Backend("connection refused".into());
        assert_eq!(internal(down).code(), tonic::Code::Unavailable);
        let bug = caretwin_actors::Error::Twin {
            id: "t1:x".into(),
            reason: "unreadable snapshot".into(),
        };
        assert_eq!(internal(bug).code(), tonic::Code::Internal);
        assert_eq!(internal("anything else").code(), tonic::Code::Internal);
    }
}
