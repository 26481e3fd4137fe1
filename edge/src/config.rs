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
    /// The cluster nodes' QUIC sync addresses, `host:port` each (`[v6]:port` for an IPv6
    /// literal; names are resolved at every attempt). Any node serves any site: the edge
    /// starts with its own preferred node (a stable hash of the site id, so sites spread
    /// over the nodes) and moves to the next when a connection fails or is lost. In the
    /// environment also as one comma-separated value
    /// (`CARETWIN_EDGE__CLUSTER_ADDRS=a:7400,b:7400`). At most [`MAX_CLUSTER_ADDRS`].
    #[serde(default, deserialize_with = "one_or_many")]
    pub cluster_addrs: Vec<String>,
    /// One cluster address, `host:port`: the older spelling of a one-element
    /// `cluster_addrs`, kept for existing configurations. [`EdgeConfig::load`] moves it into
    /// `cluster_addrs`; setting both is an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_addr: Option<String>,
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
fn default_cluster_addrs() -> Vec<String> {
    vec!["127.0.0.1:7400".into()]
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
            cluster_addrs: default_cluster_addrs(),
            cluster_addr: None,
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
        let mut c: Self = caretwin_actors::settings::load(toml_text, env, ENV_PREFIX)?;
        let bad = caretwin_actors::Error::Config;
        match (c.cluster_addr.take(), c.cluster_addrs.is_empty()) {
            (Some(one), true) => c.cluster_addrs = vec![one],
            (Some(one), false) => {
                return Err(bad(format!(
                    "cluster_addr ({one:?}) and cluster_addrs ({:?}) are both set; keep \
                     cluster_addrs, which takes one address or several",
                    c.cluster_addrs
                )));
            }
            (None, true) => c.cluster_addrs = default_cluster_addrs(),
            (None, false) => {}
        }
        c.validate().map_err(bad)?;
        Ok(c)
    }

    /// Checks values that serde cannot; the error names the field and the value.
    pub fn validate(&self) -> Result<(), String> {
        if self.site_id.is_empty() || self.site_id.len() > 128 {
            return Err(format!("site_id {:?} must be 1..=128 bytes", self.site_id));
        }
        if let Some(one) = &self.cluster_addr {
            return Err(format!(
                "cluster_addr ({one:?}) is only read from a file or the environment; \
                 set cluster_addrs"
            ));
        }
        if self.cluster_addrs.is_empty() {
            return Err("cluster_addrs must name at least one node".into());
        }
        if self.cluster_addrs.len() > MAX_CLUSTER_ADDRS {
            return Err(format!(
                "cluster_addrs names {} nodes, at most {MAX_CLUSTER_ADDRS} are allowed",
                self.cluster_addrs.len()
            ));
        }
        for (i, a) in self.cluster_addrs.iter().enumerate() {
            check_node_addr(a).map_err(|why| format!("cluster_addrs[{i}]: {why}"))?;
            if self.cluster_addrs[..i].contains(a) {
                return Err(format!("cluster_addrs names {a:?} twice"));
            }
        }
        if self.outbox_limit_mib == 0 {
            return Err("outbox_limit_mib must be at least 1".into());
        }
        Ok(())
    }
}

/// Most cluster addresses an edge is configured with or keeps from the cluster.
pub const MAX_CLUSTER_ADDRS: usize = 64;

/// Checks that `addr` is a node's sync address as an edge dials it: `host:port` with a
/// non-empty host (a name, an IPv4 address or a bracketed IPv6 address) and a port from 1.
pub fn check_node_addr(addr: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{addr:?} is not host:port ({why})"));
    if addr.len() > 300 {
        return bad("longer than 300 bytes");
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return bad("no port");
    };
    if !matches!(port.parse::<u16>(), Ok(p) if p > 0) {
        return bad("the port must be 1..=65535");
    }
    if host.is_empty() {
        return bad("no host");
    }
    if host
        .chars()
        .any(|c| c.is_whitespace() || c == '/' || c == ',')
    {
        return bad("the host has a space, a slash or a comma");
    }
    if let Some(inner) = host.strip_prefix('[') {
        match inner.strip_suffix(']') {
            Some(ip) if ip.parse::<std::net::Ipv6Addr>().is_ok() => {}
            _ => return bad("a bracketed host must be an IPv6 address"),
        }
    } else if host.contains(':') {
        return bad("an IPv6 address needs brackets: [addr]:port");
    }
    Ok(())
}

/// Reads `cluster_addrs` as a list of strings, or as one string of comma-separated
/// addresses (what an environment variable can carry without TOML quoting).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct Addrs;
    impl<'de> serde::de::Visitor<'de> for Addrs {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(
                "a list of \"host:port\" strings, or one string of them separated by commas",
            )
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
            Ok(s.split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .collect())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut v = Vec::new();
            while let Some(a) = seq.next_element::<String>()? {
                v.push(a);
            }
            Ok(v)
        }
    }
    let addrs = d.deserialize_any(Addrs)?;
    // Absent means the default; present but empty is a mistake worth saying.
    if addrs.is_empty() {
        return Err(serde::de::Error::custom(
            "cluster_addrs is empty; it must name at least one node",
        ));
    }
    Ok(addrs)
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
        assert_eq!(c.cluster_addrs, ["cluster.example:7400"]);
        assert_eq!(c.cluster_addr, None);
    }

    #[test]
    fn one_address_or_several_from_the_file_or_the_environment() {
        let addrs = |text: &str, env: &[(&str, &str)]| {
            let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
            EdgeConfig::load(text, env).map(|c| c.cluster_addrs)
        };
        // An existing configuration with one address keeps working.
        assert_eq!(addrs("cluster_addr = \"a:7400\"", &[]).unwrap(), ["a:7400"]);
        assert_eq!(
            addrs(
                "cluster_addrs = [\"a:7400\", \"10.0.0.2:7400\", \"[::1]:7400\"]",
                &[]
            )
            .unwrap(),
            ["a:7400", "10.0.0.2:7400", "[::1]:7400"]
        );
        // The environment overrides the file, as a TOML list or a comma-separated value.
        let file = "cluster_addrs = [\"a:7400\"]";
        let env = [("CARETWIN_EDGE__CLUSTER_ADDRS", "b:7400, c:7400")];
        assert_eq!(addrs(file, &env).unwrap(), ["b:7400", "c:7400"]);
        let env = [("CARETWIN_EDGE__CLUSTER_ADDRS", "[\"b:7400\", \"c:7400\"]")];
        assert_eq!(addrs(file, &env).unwrap(), ["b:7400", "c:7400"]);
        // Both spellings at once: which one was meant is unclear, so neither is taken.
        let e = addrs(
            "cluster_addr = \"a:7400\"\ncluster_addrs = [\"b:7400\"]",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("both set"), "{e}");
        let env = [("CARETWIN_EDGE__CLUSTER_ADDRS", "b:7400")];
        assert!(addrs("cluster_addr = \"a:7400\"", &env).is_err());
    }

    #[test]
    fn bad_cluster_addresses_are_named_in_the_error() {
        for (text, says) in [
            ("cluster_addrs = []", "at least one"),
            ("cluster_addrs = \"\"", "at least one"),
            (
                "cluster_addrs = [\"a:7400\", \"nowhere\"]",
                "cluster_addrs[1]: \"nowhere\"",
            ),
            ("cluster_addrs = [\"a:0\"]", "port"),
            ("cluster_addrs = [\"a:99999\"]", "port"),
            ("cluster_addrs = [\":7400\"]", "no host"),
            ("cluster_addrs = [\"::1:7400\"]", "brackets"),
            ("cluster_addrs = [\"[nope]:7400\"]", "IPv6"),
            ("cluster_addrs = [\"a b:7400\"]", "space"),
            ("cluster_addrs = [\"a:7400\", \"a:7400\"]", "twice"),
            ("cluster_addrs = 7400", "host:port"),
            ("cluster_addrs = [7400]", "string"),
        ] {
            let e = EdgeConfig::load(text, []).unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
        let many: Vec<String> = (1..=65).map(|i| format!("\"n{i}:7400\"")).collect();
        let e = EdgeConfig::load(&format!("cluster_addrs = [{}]", many.join(",")), [])
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 64"), "{e}");
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
