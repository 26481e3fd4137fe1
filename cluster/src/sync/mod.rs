//! The edge sync, cluster side: QUIC with mutual TLS, one connection per site, frames of
//! `caretwin_proto::frame` on its streams (see `EdgeFrame` in `sync.proto`).
//!
//! Only glue lives here: sockets, TLS and byte streams. The protocol's decisions belong to
//! the pure state machines it drives.
//!
//! # Layout
//! - [`dev`] — a development PKI (`caretwin-cluster dev`): CA, cluster and site certificates.
//! - [`tls`] — the server TLS configuration, PEM loaders, and the site identity read from a
//!   verified client certificate.
//! - [`transport`] — the QUIC endpoint, transport settings, handshake to site, and frame
//!   reading and writing on streams.
//! - [`server`] — the sessions: control and data streams glued to `crate::ingest`.

pub mod dev;
pub mod server;
pub mod tls;
pub mod transport;
