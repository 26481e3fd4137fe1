//! The CareTwin cluster node.
//!
//! It hosts the twins and owns every I/O edge around them: the storage backends, the
//! clock, the QUIC endpoint for edges and the gRPC endpoint for integrators. The deciding code it runs lives in `caretwin-actors` and never does I/O
//! itself.
//!
//! # Layout
//! - [`config`] — the node's configuration (TOML plus environment overrides).
//! - [`node`] — the node's lifecycle: [`node::run`] takes a config and a shutdown future.
//! - [`replay`] — recorded run data (C-MAPSS) parsed and replayed through twins in virtual time.
//! - [`store`] — storage backends behind the `Store` port: [`store::embedded`] (fjall),
//!   [`store::postgres`] (PostgreSQL); with the cargo feature `fdb`, `store::fdb`
//!   (FoundationDB).
//! - [`sync`] — the edge sync's QUIC and mutual TLS glue, and the development PKI.
//! - [`error`] — the crate's error type.
//! - [`grpc`] — the integrator gRPC endpoint: auth by token and scope, cases, twins,
//!   health and reflection.
//! - [`ingest`] — what the node does with a site's sync frames, whatever carries them.
//! - [`integrations`] — outbound gRPC clients of the parts supplier and the field-service
//!   scheduler, with durable intent and outcome records, and their built-in stand-ins.
//! - [`membership`] — the membership loop: member view, shard leases acquired, renewed,
//!   handed over and dropped as `caretwin_actors::placement` decides.
//! - [`peer`] — the peer channel: calls for twins hosted on other nodes, over QUIC with
//!   mutual TLS.
//! - [`presence`] — which sites have a sync session anywhere in the cluster.
//! - [`pii`] — customers' personal data, sealed with a per-customer key so erasure can
//!   destroy it (crypto-shredding), and the tenants' customer indexes.

// Forbidden, except with feature `fdb`: booting FoundationDB's network thread is unsafe in
// its bindings, and is allowed once, in `store::fdb::boot`.
#![cfg_attr(not(feature = "fdb"), forbid(unsafe_code))]
#![cfg_attr(feature = "fdb", deny(unsafe_code))]

pub mod config;
pub mod error;
pub mod grpc;
pub mod ingest;
pub mod integrations;
pub mod membership;
pub mod node;
pub mod peer;
pub mod pii;
pub mod presence;
pub mod replay;
pub mod store;
pub mod sync;

pub use config::ClusterConfig;
pub use error::{Error, Result};
