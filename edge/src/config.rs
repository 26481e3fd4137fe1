//! The edge node's configuration: a TOML file with `CARETWIN_EDGE__…` overrides.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Prefix of the environment overrides (`CARETWIN_EDGE__SITE_ID=store-42`).
pub const ENV_PREFIX: &str = "CARETWIN_EDGE";

/// Everything an edge node is configured with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// This site's id. The cluster trusts the identity in the site's client certificate;
    /// this must match it.
    #[serde(default = "default_site_id")]
    pub site_id: String,
    /// The cluster's QUIC address, `host:port`.
    #[serde(default = "default_cluster_addr")]
    pub cluster_addr: String,
    /// Directory of the durable outbox.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Disk the outbox may use, in MiB. When full, new low-priority readings are refused;
    /// alarms are always kept.
    #[serde(default = "default_outbox_limit_mib")]
    pub outbox_limit_mib: u64,
    /// The name on the cluster's certificate.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// The CA that signs the cluster's certificate (PEM).
    #[serde(default = "default_ca")]
    pub ca: PathBuf,
    /// This site's certificate (PEM); it names the site.
    #[serde(default = "default_cert")]
    pub cert: PathBuf,
    /// This site's private key (PEM).
    #[serde(default = "default_key")]
    pub key: PathBuf,
    /// Where devices on the LAN post readings over HTTP/JSON (`POST /v1/readings`); off
    /// when absent.
    #[serde(default)]
    pub http_listen: Option<std::net::SocketAddr>,
    /// Where devices on the LAN connect over MQTT 3.1.1 and publish to
    /// `caretwin/<device-id>/readings` and `…/alarms` (refusals come back on `…/errors`);
    /// off when absent.
    #[serde(default)]
    pub mqtt_listen: Option<std::net::SocketAddr>,
    /// A device simulator's configuration (TOML), run as this edge's device adapter.
    #[serde(default)]
    pub simulator: Option<PathBuf>,
    /// Stop generating simulated readings after this long in device time (for tests and
    /// demos; the demo's clock runs faster than the wall clock); the edge
    /// keeps syncing until everything is acknowledged, then says "outbox drained".
    #[serde(default, with = "humantime_serde")]
    pub simulate_for: Option<std::time::Duration>,
    /// Offer zstd compression of sync frames to the cluster (used when it agrees). Worth it
    /// on slow or metered links; on a fast LAN it costs a little CPU for nothing.
    #[serde(default = "default_compress")]
    pub compress: bool,
}

fn default_compress() -> bool {
    true
}

fn default_site_id() -> String {
    "site-1".into()
}
fn default_cluster_addr() -> String {
    "127.0.0.1:7400".into()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("data/edge")
}
fn default_outbox_limit_mib() -> u64 {
    1024
}
fn default_server_name() -> String {
    "localhost".into()
}
fn default_ca() -> PathBuf {
    PathBuf::from("certs/ca.pem")
}
fn default_cert() -> PathBuf {
    PathBuf::from("certs/site.pem")
}
fn default_key() -> PathBuf {
    PathBuf::from("certs/site.key")
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            site_id: default_site_id(),
            cluster_addr: default_cluster_addr(),
            data_dir: default_data_dir(),
            outbox_limit_mib: default_outbox_limit_mib(),
            server_name: default_server_name(),
            ca: default_ca(),
            cert: default_cert(),
            key: default_key(),
            http_listen: None,
            mqtt_listen: None,
            simulator: None,
            simulate_for: None,
            compress: default_compress(),
        }
    }
}

impl EdgeConfig {
    /// Loads a configuration from a TOML text and environment overrides, then checks it.
    pub fn load(
        toml_text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> caretwin_actors::Result<Self> {
        let c: Self = caretwin_actors::settings::load(toml_text, env, ENV_PREFIX)?;
        let bad = |m: String| Err(caretwin_actors::Error::Config(m));
        if c.site_id.is_empty() || c.site_id.len() > 128 {
            return bad(format!("site_id {:?} must be 1..=128 bytes", c.site_id));
        }
        if c.cluster_addr
            .rsplit_once(':')
            .is_none_or(|(_, p)| p.parse::<u16>().is_err())
        {
            return bad(format!(
                "cluster_addr {:?} must be host:port",
                c.cluster_addr
            ));
        }
        if c.outbox_limit_mib == 0 {
            return bad("outbox_limit_mib must be at least 1".into());
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_defaults_file_and_environment() {
        assert_eq!(EdgeConfig::load("", []).unwrap(), EdgeConfig::default());
        let c = EdgeConfig::load(
            "site_id = \"store-42\"\noutbox_limit_mib = 64",
            [(
                "CARETWIN_EDGE__CLUSTER_ADDR".to_string(),
                "cluster.example:7400".to_string(),
            )],
        )
        .unwrap();
        assert_eq!(c.site_id, "store-42");
        assert_eq!(c.outbox_limit_mib, 64);
        assert_eq!(c.cluster_addr, "cluster.example:7400");
    }

    #[test]
    fn bad_values_are_refused() {
        for text in [
            "site_id = \"\"",
            "cluster_addr = \"nowhere\"",
            "outbox_limit_mib = 0",
            "colour = 1",
        ] {
            assert!(EdgeConfig::load(text, []).is_err(), "{text}");
        }
    }

    #[test]
    fn shipped_example_is_valid_and_matches_defaults() {
        let text = include_str!("../../deploy/config/edge.toml");
        assert_eq!(EdgeConfig::load(text, []).unwrap(), EdgeConfig::default());
    }

    #[test]
    fn shipped_simulator_example_runs() {
        let text = include_str!("../../deploy/config/sim.toml");
        let c = crate::sim::SimConfig::from_toml(text).unwrap();
        let catalogue = caretwin_actors::catalogue::Catalogue::builtin();
        let sim = crate::sim::Simulator::new(&catalogue, &c, 0).unwrap();
        assert_eq!(sim.len(), 3);
    }
}
