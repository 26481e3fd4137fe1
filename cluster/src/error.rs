//! The crate's error type.

/// What can fail in a cluster node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The storage port or a backend failed.
    #[error(transparent)]
    Store(#[from] caretwin_actors::Error),
    /// A sync connection or stream failed.
    #[error(transparent)]
    Transport(#[from] crate::sync::transport::TransportError),
    /// A sync session ended: the edge broke the protocol or went silent.
    #[error("sync session: {0}")]
    Session(String),
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Another process holds this node's identity.
    #[error("node id {node_id:?} is already live (held by {holder:?} until {expires_at_ms} ms)")]
    NodeIdTaken {
        /// The node id.
        node_id: String,
        /// Who holds it.
        holder: String,
        /// Until when.
        expires_at_ms: u64,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
