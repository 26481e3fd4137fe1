//! Storage backends behind the [`caretwin_actors::store::Store`] port.
//!
//! - [`embedded`] — fjall on local disk, group commit; the default for one node.
//! - [`postgres`] — PostgreSQL through a connection pool; one transaction per batch.
//! - [`watch`] — a wrapper that signals when logs grow (the gRPC streams wait on it).
//! - `fdb` — FoundationDB, one transaction per batch; only with the cargo feature `fdb`
//!   (it links the FoundationDB client library). Its settings, [`FdbConfig`], always parse,
//!   so a node built without the feature refuses `backend = "foundationdb"` clearly.

pub mod embedded;
#[cfg(feature = "fdb")]
pub mod fdb;
pub mod postgres;
pub mod watch;

use caretwin_actors::store::Store;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub use embedded::{EmbeddedConfig, EmbeddedStore};
#[cfg(feature = "fdb")]
pub use fdb::{FdbNetwork, FdbStore};
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
    /// FoundationDB (`"foundationdb"`); needs a node built with the `fdb` feature.
    FoundationDb,
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
    /// Settings of the FoundationDB backend.
    #[serde(default)]
    pub foundationdb: FdbConfig,
}

/// Settings of the FoundationDB backend (`[store.foundationdb]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FdbConfig {
    /// The cluster file; unset: FoundationDB's default (`FDB_CLUSTER_FILE`, then
    /// `/etc/foundationdb/fdb.cluster`).
    #[serde(default)]
    pub cluster_file: Option<std::path::PathBuf>,
    /// The tuple-layer root every key lives under, so deployments can share a cluster.
    #[serde(default = "default_fdb_root")]
    pub root: String,
    /// How long one batch or read may take with its retries, in ms, before it fails
    /// (FoundationDB itself ends each attempt after 5 s; this bounds the retries, e.g.
    /// while the cluster is unreachable).
    #[serde(default = "default_fdb_timeout_ms")]
    pub transaction_timeout_ms: u64,
}

fn default_fdb_root() -> String {
    "caretwin".into()
}
fn default_fdb_timeout_ms() -> u64 {
    10_000
}

impl Default for FdbConfig {
    fn default() -> Self {
        Self {
            cluster_file: None,
            root: default_fdb_root(),
            transaction_timeout_ms: default_fdb_timeout_ms(),
        }
    }
}

impl StoreConfig {
    /// The embedded backend at `path`, with default settings.
    pub fn embedded_at(path: impl Into<std::path::PathBuf>) -> Self {
        Self {
            backend: Backend::Embedded,
            embedded: EmbeddedConfig::at(path),
            postgres: PostgresConfig::default(),
            foundationdb: FdbConfig::default(),
        }
    }

    /// The PostgreSQL backend at `url`, with default settings.
    pub fn postgres_at(url: impl Into<String>) -> Self {
        Self {
            backend: Backend::Postgres,
            embedded: EmbeddedConfig::default(),
            postgres: PostgresConfig::at(url),
            foundationdb: FdbConfig::default(),
        }
    }
}

/// Opens the configured backend (for PostgreSQL: connects and migrates the schema).
pub async fn open(config: &StoreConfig) -> crate::Result<Arc<dyn Store>> {
    match config.backend {
        Backend::Embedded => Ok(Arc::new(EmbeddedStore::open(&config.embedded)?)),
        Backend::Postgres => Ok(Arc::new(PostgresStore::open(&config.postgres).await?)),
        Backend::FoundationDb => open_fdb(&config.foundationdb),
    }
}

#[cfg(feature = "fdb")]
fn open_fdb(config: &FdbConfig) -> crate::Result<Arc<dyn Store>> {
    Ok(Arc::new(fdb::FdbStore::open(config)?))
}

#[cfg(not(feature = "fdb"))]
fn open_fdb(_: &FdbConfig) -> crate::Result<Arc<dyn Store>> {
    Err(crate::Error::Config(
        "store backend \"foundationdb\" is not available: caretwin-cluster was built without \
         the fdb feature (build with `--features fdb`, which needs libfdb_c)"
            .into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foundationdb_settings_parse() {
        let c: StoreConfig = toml::from_str(
            r#"
            backend = "foundationdb"
            [foundationdb]
            cluster_file = "/etc/foundationdb/fdb.cluster"
            root = "caretwin-eu"
            "#,
        )
        .unwrap();
        assert_eq!(c.backend, Backend::FoundationDb);
        assert_eq!(
            c.foundationdb.cluster_file.as_deref(),
            Some(std::path::Path::new("/etc/foundationdb/fdb.cluster"))
        );
        assert_eq!(c.foundationdb.root, "caretwin-eu");
        assert_eq!(c.foundationdb.transaction_timeout_ms, 10_000);
        assert!(toml::from_str::<StoreConfig>("[foundationdb]\nroots = \"x\"").is_err());
    }

    #[cfg(not(feature = "fdb"))]
    #[test]
    fn foundationdb_without_the_feature_is_refused_clearly() {
        let c = StoreConfig {
            backend: Backend::FoundationDb,
            ..StoreConfig::default()
        };
        let err = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(open(&c))
            .err()
            .expect("no fdb backend in this build");
        assert!(
            err.to_string().contains("built without the fdb feature"),
            "{err}"
        );
    }

    #[test]
    fn postgres_backend_from_file_and_environment() {
        let text = "[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = \"postgres://ct@db:5432/ct\"\npool_size = 32\n";
        let c = crate::config::ClusterConfig::load(text, []).unwrap();
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
        let c = crate::config::ClusterConfig::load("", env).unwrap();
        assert_eq!(c.store.backend, Backend::Postgres);
        assert_eq!(
            c.store.postgres,
            PostgresConfig::at("postgres://ct:secret@db/ct")
        );
        assert!(crate::config::ClusterConfig::load("[store.postgres]\npool = 3", []).is_err());
        assert!(
            crate::config::ClusterConfig::load("[store.postgres]\npool_size = \"many\"", [])
                .is_err()
        );
    }
}
