//! Storage backends behind the [`caretwin_actors::store::Store`] port.
//!
//! - [`embedded`] — fjall on local disk, group commit; the default for one node.
//! - [`postgres`] — PostgreSQL through a connection pool; one transaction per batch.
//! - [`watch`] — a wrapper that signals when logs grow (the gRPC streams wait on it).

pub mod embedded;
pub mod postgres;
pub mod watch;

use caretwin_actors::store::Store;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub use embedded::{EmbeddedConfig, EmbeddedStore};
pub use postgres::{PostgresConfig, PostgresStore};

/// The storage backends.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The embedded store (fjall) in a local directory: one node.
    #[default]
    Embedded,
    /// PostgreSQL (`[store.postgres] url = "postgres://…"`): nodes share one database.
    Postgres,
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
    /// Settings of the PostgreSQL backend.
    #[serde(default)]
    pub postgres: PostgresConfig,
}

impl StoreConfig {
    /// The embedded backend at `path`, with default settings.
    pub fn embedded_at(path: impl Into<std::path::PathBuf>) -> Self {
        Self {
            backend: Backend::Embedded,
            embedded: EmbeddedConfig::at(path),
            postgres: PostgresConfig::default(),
        }
    }

    /// The PostgreSQL backend at `url`, with default settings.
    pub fn postgres_at(url: impl Into<String>) -> Self {
        Self {
            backend: Backend::Postgres,
            embedded: EmbeddedConfig::default(),
            postgres: PostgresConfig::at(url),
        }
    }
}

/// Opens the configured backend (for PostgreSQL: connects and migrates the schema).
pub async fn open(config: &StoreConfig) -> crate::Result<Arc<dyn Store>> {
    match config.backend {
        Backend::Embedded => Ok(Arc::new(EmbeddedStore::open(&config.embedded)?)),
        Backend::Postgres => Ok(Arc::new(PostgresStore::open(&config.postgres).await?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClusterConfig;

    #[test]
    fn postgres_backend_from_file_and_environment() {
        let text = "[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = \"postgres://ct@db:5432/ct\"\npool_size = 32\n";
        let c = ClusterConfig::load(text, []).unwrap();
        let mut want = StoreConfig::postgres_at("postgres://ct@db:5432/ct");
        want.postgres.pool_size = 32;
        assert_eq!(c.store, want);
        // The password comes from the environment, as a secret should.
        let env = [
            (
                "CARETWIN_CLUSTER__STORE__BACKEND".to_string(),
                "postgres".to_string(),
            ),
            (
                "CARETWIN_CLUSTER__STORE__POSTGRES__URL".to_string(),
                "postgres://ct:secret@db/ct".to_string(),
            ),
        ];
        let c = ClusterConfig::load("", env).unwrap();
        assert_eq!(c.store.backend, Backend::Postgres);
        assert_eq!(
            c.store.postgres,
            PostgresConfig::at("postgres://ct:secret@db/ct")
        );
        assert!(ClusterConfig::load("[store.postgres]\npool = 3", []).is_err());
        assert!(ClusterConfig::load("[store.postgres]\npool_size = \"many\"", []).is_err());
    }
}
