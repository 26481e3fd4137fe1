//! Storage backends behind the [`caretwin_actors::store::Store`] port.
//!
//! - [`embedded`] — fjall on local disk, group commit; the default for one node.
//!
//! PostgreSQL and FoundationDB backends come with the multi-node cluster.

pub mod embedded;

use caretwin_actors::store::Store;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub use embedded::{EmbeddedConfig, EmbeddedStore};

/// Which backend holds the node's state, and its settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "backend", rename_all = "lowercase")]
pub enum StoreConfig {
    /// The embedded store (fjall) in a local directory.
    Embedded(EmbeddedConfig),
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig::Embedded(EmbeddedConfig::at("data/cluster"))
    }
}

/// Opens the configured backend.
pub fn open(config: &StoreConfig) -> crate::Result<Arc<dyn Store>> {
    match config {
        StoreConfig::Embedded(c) => Ok(Arc::new(EmbeddedStore::open(c)?)),
    }
}
