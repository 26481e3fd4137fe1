//! The cluster node's configuration: a TOML file with `CARETWIN_CLUSTER__…` overrides.

use crate::store::StoreConfig;
use caretwin_actors::host::registry::HostConfig;
use caretwin_actors::system::ServicesConfig;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Prefix of the environment overrides (`CARETWIN_CLUSTER__STORE__EMBEDDED__PATH=/data`).
pub const ENV_PREFIX: &str = "CARETWIN_CLUSTER";

/// Everything a cluster node is configured with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id, unique in the cluster.
    #[serde(default = "default_node_id")]
    pub node_id: String,
    /// Where the node's state lives.
    #[serde(default)]
    pub store: StoreConfig,
    /// How long the node's membership lease lasts without renewal.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How often the membership lease is renewed; well under `lease_ttl`.
    #[serde(default = "default_renew_every", with = "humantime_serde")]
    pub renew_every: Duration,
    /// The edge sync endpoint.
    #[serde(default)]
    pub sync: SyncConfig,
    /// The integrator gRPC endpoint.
    #[serde(default)]
    pub grpc: GrpcConfig,
    /// Shards and passivation of the twins.
    #[serde(default)]
    pub host: HostConfig,
    /// The service desks (stock, technicians, SLAs), per tenant.
    #[serde(default)]
    pub services: ServicesConfig,
    /// How often due timers fire and outbox mail is delivered.
    #[serde(default = "default_tick", with = "humantime_serde")]
    pub tick: Duration,
    /// A TOML file of devices to provision at start (`[[devices]] id, site, customer,
    /// model`); idempotent. Until the admin API exists this is how devices are registered.
    #[serde(default)]
    pub provision: Option<PathBuf>,
}

/// The edge sync endpoint: QUIC with mutual TLS.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// UDP address to listen on (port 0: any free port, logged at start).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The CA that signs site certificates (PEM).
    #[serde(default = "default_ca")]
    pub ca: PathBuf,
    /// This node's certificate chain (PEM).
    #[serde(default = "default_cert")]
    pub cert: PathBuf,
    /// This node's private key (PEM).
    #[serde(default = "default_key")]
    pub key: PathBuf,
    /// How often edges send heartbeats; either side drops a session after three
    /// intervals without a frame on its control stream.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat: Duration,
}

/// The integrator gRPC endpoint: TLS with the node's certificate (the sync's), bearer
/// tokens with a tenant and scopes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    /// TCP address to listen on (port 0: any free port, logged at start).
    #[serde(default = "default_grpc_listen")]
    pub listen: SocketAddr,
    /// The tokens file (`[[token]] name, sha256, tenant, scopes`); made with
    /// `caretwin-cluster token`. Without it every call is refused.
    #[serde(default = "default_tokens")]
    pub tokens: PathBuf,
}

fn default_grpc_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7401))
}
fn default_tokens() -> PathBuf {
    PathBuf::from("certs/tokens.toml")
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            listen: default_grpc_listen(),
            tokens: default_tokens(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7400))
}
fn default_ca() -> PathBuf {
    PathBuf::from("certs/ca.pem")
}
fn default_cert() -> PathBuf {
    PathBuf::from("certs/cluster.pem")
}
fn default_key() -> PathBuf {
    PathBuf::from("certs/cluster.key")
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(2)
}
fn default_tick() -> Duration {
    Duration::from_millis(200)
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            ca: default_ca(),
            cert: default_cert(),
            key: default_key(),
            heartbeat: default_heartbeat(),
        }
    }
}

fn default_node_id() -> String {
    "node-1".into()
}
fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}
fn default_renew_every() -> Duration {
    Duration::from_secs(3)
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            node_id: default_node_id(),
            store: StoreConfig::default(),
            lease_ttl: default_lease_ttl(),
            renew_every: default_renew_every(),
            sync: SyncConfig::default(),
            grpc: GrpcConfig::default(),
            host: HostConfig::default(),
            services: ServicesConfig::default(),
            tick: default_tick(),
            provision: None,
        }
    }
}

impl ClusterConfig {
    /// Loads a configuration from a TOML text and environment overrides, then checks it.
    pub fn load(
        toml_text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> crate::Result<Self> {
        let c: Self = caretwin_actors::settings::load(toml_text, env, ENV_PREFIX)?;
        c.validate()?;
        Ok(c)
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> crate::Result<()> {
        if self.node_id.is_empty() || self.node_id.len() > 128 {
            return Err(crate::Error::Config(format!(
                "node_id {:?} must be 1..=128 bytes",
                self.node_id
            )));
        }
        if self.renew_every.is_zero() || self.renew_every * 2 > self.lease_ttl {
            return Err(crate::Error::Config(format!(
                "renew_every ({:?}) must be non-zero and at most half of lease_ttl ({:?})",
                self.renew_every, self.lease_ttl
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    #[test]
    fn defaults_then_file_then_environment() {
        assert_eq!(
            ClusterConfig::load("", []).unwrap(),
            ClusterConfig::default()
        );
        let text = "node_id = \"n7\"\nlease_ttl = \"20s\"\n[store]\nbackend = \"embedded\"\n[store.embedded]\npath = \"/srv/ct\"\n";
        let env = [(
            "CARETWIN_CLUSTER__STORE__EMBEDDED__MAX_GROUP".to_string(),
            "64".to_string(),
        )];
        let c = ClusterConfig::load(text, env).unwrap();
        assert_eq!(c.node_id, "n7");
        assert_eq!(c.lease_ttl, Duration::from_secs(20));
        let mut want = StoreConfig::embedded_at("/srv/ct");
        want.embedded.max_group = 64;
        assert_eq!(c.store, want);
        // One field from the environment, the rest defaults.
        let env = [(
            "CARETWIN_CLUSTER__STORE__EMBEDDED__PATH".to_string(),
            "/x".to_string(),
        )];
        let c = ClusterConfig::load("", env).unwrap();
        assert_eq!(c.store, StoreConfig::embedded_at("/x"));
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(ClusterConfig::load("renew_every = \"9s\"", []).is_err());
        assert!(ClusterConfig::load("node_id = \"\"", []).is_err());
        assert!(ClusterConfig::load("[store]\nbackend = \"floppy\"", []).is_err());
        assert!(ClusterConfig::load("lease_ttl = \"soon\"", []).is_err());
    }

    #[test]
    fn shipped_example_is_valid_and_matches_defaults() {
        let text = include_str!("../../deploy/config/cluster.toml");
        assert_eq!(
            ClusterConfig::load(text, []).unwrap(),
            ClusterConfig::default()
        );
    }
}
