//! The crate's error type: what can stop the edge node or end a sync session.
//!
//! The modules keep their own precise errors ([`OutboxError`], [`TlsError`],
//! [`TransportError`], [`SimError`]); this one gathers them with what the node and the
//! session add: a refusal from the cluster, a frame the protocol does not allow, a peer
//! that stopped answering.

use crate::outbox::OutboxError;
use crate::sim::SimError;
use crate::sync::tls::TlsError;
use crate::sync::transport::TransportError;
use caretwin_proto::frame::FrameError;
use caretwin_proto::v1::ErrorCode;

/// What can fail in the edge node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The durable outbox failed.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A connection or stream failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A received frame could not be expanded (compression the session did not agree on, a
    /// payload that inflates beyond its size).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The simulator's configuration is invalid.
    #[error(transparent)]
    Sim(#[from] SimError),
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The cluster refused the session or a stream, with the protocol's code.
    #[error("cluster refused ({code:?}): {message}")]
    Refused {
        /// The protocol's code.
        code: ErrorCode,
        /// The cluster's explanation.
        message: String,
    },
    /// The cluster sent something the protocol does not allow there.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The cluster did not answer in time.
    #[error("cluster silent: {0}")]
    Silent(String),
    /// A node's address cannot be dialled (it resolves to no address family the edge
    /// has an endpoint for).
    #[error("cannot dial {addr}: {reason}")]
    Unreachable {
        /// The node's address as configured or learned.
        addr: String,
        /// Why.
        reason: String,
    },
    /// A task of the node failed.
    #[error("task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl Error {
    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
