//! Storage backends behind the [`caretwin_actors::store::Store`] port.
//!
//! - [`embedded`] — fjall on local disk, group commit; the default for one node.
//! - [`watch`] — a wrapper that signals when logs grow (the gRPC streams wait on it).
//!
//! PostgreSQL and FoundationDB backends come with the multi-node cluster.

pub mod embedded;
pub mod watch;

use caretwin_actors::store::Store;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub use embedded::{EmbeddedConfig, EmbeddedStore};

/// The storage backends.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The embedded store (fjall) in a local directory: one node.
    #[default]
    Embedded,
}

/// Which backend holds the node's state, and each backend's settings
/// (`[store] backend = "embedded"`, `[store.embedded] path = "…"`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// The backend in use.
    #[serde(default)]
    pub backend: Backend,
    /// Settings of the embedded backend.
    #[serde(default)]
    pub embedded: EmbeddedConfig,
}

impl StoreConfig {
    /// The embedded backend at `path`, with default settings.
    pub fn embedded_at(path: impl Into<std::path::PathBuf>) -> Self {
        Self {
            backend: Backend::Embedded,
            embedded: EmbeddedConfig::at(path),
        }
    }
}

/// Opens the configured backend.
pub fn open(config: &StoreConfig) -> crate::Result<Arc<dyn Store>> {
    match config.backend {
        Backend::Embedded => Ok(Arc::new(EmbeddedStore::open(&config.embedded)?)),
    }
}
