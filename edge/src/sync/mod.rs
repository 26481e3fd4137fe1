//! The edge sync, edge side: QUIC with mutual TLS to the cluster, one connection per site,
//! frames of `caretwin_proto::frame` on its streams (see `EdgeFrame` in `sync.proto`).
//!
//! Only glue lives here: sockets, TLS and byte streams. The protocol's decisions belong to
//! the pure state machines it drives.
//!
//! # Layout
//! - [`client`] — the session loop: Hello with resume positions, sending the outbox above
//!   the watermarks, trimming by acks, receiving commands, reconnecting.
//! - [`dial`] — which cluster node to dial next and after how long (pure): the site's
//!   rendezvous order of the known nodes, jittered and capped backoff, nodes learned from
//!   the cluster.
//! - [`tls`] — the client TLS configuration (the site's certificate, the cluster's CA)
//!   and PEM loaders.
//! - [`transport`] — the client endpoint, transport settings, connecting, and frame
//!   reading and writing on streams.

pub mod client;
pub mod dial;
pub mod tls;
pub mod transport;
