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

use crate::{Error, Result};
use auth::Tokens;
use caretwin_proto::v1::case_service_server::CaseServiceServer;
use caretwin_proto::v1::catalogue_service_server::CatalogueServiceServer;
use caretwin_proto::v1::command_service_server::CommandServiceServer;
use caretwin_proto::v1::customer_service_server::CustomerServiceServer;
use caretwin_proto::v1::notification_service_server::NotificationServiceServer;
use caretwin_proto::v1::twin_service_server::TwinServiceServer;
use caretwin_proto::v1::work_service_server::WorkServiceServer;
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
