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
    /// Outbound integrations: the parts supplier and the field-service scheduler.
    #[serde(default)]
    pub integrations: IntegrationsConfig,
    /// Membership of a cluster of nodes sharing the store.
    #[serde(default)]
    pub cluster: MembershipConfig,
}

/// Membership of a cluster (`[cluster]`). Off, the node hosts every shard itself (one node
/// on its own embedded store); on a shared store (PostgreSQL, FoundationDB) a node is
/// always a member, whatever `enabled` says. On, it hosts only the shards whose leases it holds (`lease_ttl`,
/// renewed every `renew_every`, both also the member lease's), and forwards calls for the
/// others to their hosts over the peer channel (QUIC, mutual TLS with the sync
/// endpoint's certificates; the node certificate must carry a `caretwin://node` URI).
///
/// ```toml
/// lease_ttl = "1500ms"
/// renew_every = "250ms"
/// [cluster]
/// enabled = true
/// listen = "0.0.0.0:7300"
/// advertise = "10.0.0.5:7300"
/// ```
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MembershipConfig {
    /// Join a cluster.
    #[serde(default)]
    pub enabled: bool,
    /// UDP address of the peer endpoint (port 0: any free port).
    #[serde(default = "default_peer_listen")]
    pub listen: SocketAddr,
    /// The address other nodes reach this one at (default: the bound peer address).
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// The name node certificates are verified against (a DNS name or IP they carry).
    #[serde(default = "default_peer_server_name")]
    pub server_name: String,
}

fn default_peer_listen() -> SocketAddr {
    "127.0.0.1:0".parse().expect("a valid address")
}

fn default_peer_server_name() -> String {
    "localhost".into()
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: default_peer_listen(),
            advertise: None,
            server_name: default_peer_server_name(),
        }
    }
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
    /// The address edges reach this node's sync endpoint at, `host:port` (a name edges
    /// resolve, or an IP). A cluster member announces it, and every session's `Welcome`
    /// lists the live members' addresses, so an edge configured with one node learns the
    /// others and moves to them when its node fails. Default: the bound address when it
    /// is a specific IP; none when the node listens on a wildcard address (`0.0.0.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
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
    /// How long a resolved case stays in the tenant's case log (`90d`); open cases are
    /// never dropped.
    #[serde(default = "default_case_retention", with = "humantime_serde")]
    pub case_retention: Duration,
    /// How long a finished command stays in the tenant's command log (`30d`); a command
    /// still under way is never dropped.
    #[serde(default = "default_command_retention", with = "humantime_serde")]
    pub command_retention: Duration,
}

fn default_grpc_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7401))
}
fn default_tokens() -> PathBuf {
    PathBuf::from("certs/tokens.toml")
}
fn default_case_retention() -> Duration {
    Duration::from_millis(crate::grpc::cases::CASE_RETENTION.keep_ms)
}
fn default_command_retention() -> Duration {
    Duration::from_millis(crate::grpc::commands::COMMAND_RETENTION.keep_ms)
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            listen: default_grpc_listen(),
            tokens: default_tokens(),
            case_retention: default_case_retention(),
            command_retention: default_command_retention(),
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
            advertise: None,
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
            integrations: IntegrationsConfig::default(),
            cluster: MembershipConfig::default(),
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
        if let Some(a) = &self.sync.advertise {
            let port_ok = a
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && matches!(p.parse::<u16>(), Ok(p) if p > 0));
            if !port_ok || a.len() > 300 || a.contains(char::is_whitespace) || a.contains(',') {
                return Err(crate::Error::Config(format!(
                    "sync.advertise {a:?} must be host:port (edges dial it)"
                )));
            }
        }
        if let Some(t) = self.store.postgres.idle_in_transaction_timeout
            && (t.is_zero() || t >= self.lease_ttl)
        {
            return Err(crate::Error::Config(format!(
                "store.postgres.idle_in_transaction_timeout ({t:?}) must be non-zero and below \
                 lease_ttl ({:?}): a transaction left by a node cut off from the database \
                 would hold its shard's lease past the lease",
                self.lease_ttl
            )));
        }
        if self
            .store
            .postgres
            .tcp_user_timeout
            .is_some_and(|t| t.is_zero())
        {
            return Err(crate::Error::Config(
                "store.postgres.tcp_user_timeout must be non-zero (leave it out for the default)"
                    .into(),
            ));
        }
        self.integrations.validate()
    }
}

/// Outbound integrations (`[integrations]`): where part orders and technician bookings go.
/// Each call is retried with backoff; its intent is recorded durably before it and its
/// outcome after it, so a crash neither repeats nor loses an effect (see
/// [`crate::integrations`]).
///
/// ```toml
/// [integrations]
/// supplier = "builtin"   # the default
/// field_service = { endpoint = "https://fs.example.com:443", ca = "certs/fs-ca.pem" }
/// [integrations.retry]
/// first = "200ms"
/// ```
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IntegrationsConfig {
    /// The parts supplier: `"builtin"` (the default: a stand-in the node serves itself over
    /// gRPC on 127.0.0.1, so orders always take the real client path) or a partner's
    /// `{ endpoint, ca, token, timeout }`.
    #[serde(default)]
    pub supplier: SupplierChoice,
    /// The field-service scheduler: `"desk"` (the default: the in-process scheduler desk
    /// books visits from `[services.scheduler]`, with no network), `"builtin"` (the same
    /// technicians, served over gRPC on 127.0.0.1) or a partner's
    /// `{ endpoint, ca, token, timeout }`.
    #[serde(default)]
    pub field_service: FieldServiceChoice,
    /// Stock and lead times of the built-in supplier.
    #[serde(default)]
    pub builtin_supplier: BuiltinSupplierConfig,
    /// How one call is retried before its mail is given back for later delivery.
    #[serde(default)]
    pub retry: RetryConfig,
}

/// Where part orders go.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(try_from = "Choice", into = "Choice")]
pub enum SupplierChoice {
    /// The built-in stand-in, over gRPC on loopback.
    #[default]
    Builtin,
    /// A partner's supplier.
    Remote(RemoteService),
}

/// Where technician bookings go.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(try_from = "Choice", into = "Choice")]
pub enum FieldServiceChoice {
    /// The in-process scheduler desk (no network).
    #[default]
    Desk,
    /// The built-in stand-in (the desk's technicians), over gRPC on loopback.
    Builtin,
    /// A partner's field-service scheduler.
    Remote(RemoteService),
}

/// How a choice is written: a name, or a table for a partner.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Choice {
    Named(String),
    Remote(RemoteService),
}

impl TryFrom<Choice> for SupplierChoice {
    type Error = String;

    fn try_from(c: Choice) -> Result<Self, String> {
        match c {
            Choice::Named(n) if n == "builtin" => Ok(Self::Builtin),
            Choice::Named(n) => Err(format!(
                "supplier {n:?} must be \"builtin\" or {{ endpoint = \"https://…\", ca = \"…\" }}"
            )),
            Choice::Remote(r) => Ok(Self::Remote(r)),
        }
    }
}

impl From<SupplierChoice> for Choice {
    fn from(c: SupplierChoice) -> Self {
        match c {
            SupplierChoice::Builtin => Choice::Named("builtin".into()),
            SupplierChoice::Remote(r) => Choice::Remote(r),
        }
    }
}

impl TryFrom<Choice> for FieldServiceChoice {
    type Error = String;

    fn try_from(c: Choice) -> Result<Self, String> {
        match c {
            Choice::Named(n) if n == "desk" => Ok(Self::Desk),
            Choice::Named(n) if n == "builtin" => Ok(Self::Builtin),
            Choice::Named(n) => Err(format!(
                "field_service {n:?} must be \"desk\", \"builtin\" or {{ endpoint = \"https://…\", ca = \"…\" }}"
            )),
            Choice::Remote(r) => Ok(Self::Remote(r)),
        }
    }
}

impl From<FieldServiceChoice> for Choice {
    fn from(c: FieldServiceChoice) -> Self {
        match c {
            FieldServiceChoice::Desk => Choice::Named("desk".into()),
            FieldServiceChoice::Builtin => Choice::Named("builtin".into()),
            FieldServiceChoice::Remote(r) => Choice::Remote(r),
        }
    }
}

/// A partner's gRPC endpoint.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RemoteService {
    /// `https://host:port`; plain `http://` only to a loopback address (a partner's
    /// adapter on this machine), since the token would travel in clear.
    pub endpoint: String,
    /// The CA that signs the partner's certificate (PEM); required for `https`.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Sent as `authorization: Bearer <token>` on every call. Better set from the
    /// environment than written in the file:
    /// `CARETWIN_CLUSTER__INTEGRATIONS__SUPPLIER__TOKEN`.
    #[serde(default)]
    pub token: Option<String>,
    /// Deadline of one call, connecting included.
    #[serde(default = "default_call_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

// The token is a secret: never in logs.
impl std::fmt::Debug for RemoteService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteService")
            .field("endpoint", &self.endpoint)
            .field("ca", &self.ca)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn default_call_timeout() -> Duration {
    Duration::from_secs(2)
}

impl RemoteService {
    /// Refuses endpoints that cannot work or would leak the token.
    pub fn validate(&self, what: &str) -> crate::Result<()> {
        let bad = |why: String| crate::Error::Config(format!("integrations.{what}: {why}"));
        let uri: tonic::transport::Uri = self
            .endpoint
            .parse()
            .map_err(|e| bad(format!("endpoint {:?}: {e}", self.endpoint)))?;
        let host = uri
            .host()
            .ok_or_else(|| bad(format!("endpoint {:?} names no host", self.endpoint)))?;
        match uri.scheme_str() {
            Some("https") if self.ca.is_none() => {
                return Err(bad(format!(
                    "endpoint {:?} is https but no ca file is given",
                    self.endpoint
                )));
            }
            Some("https") => {}
            Some("http") => {
                let ip = host.trim_start_matches('[').trim_end_matches(']');
                let loopback = host == "localhost"
                    || ip
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                if !loopback {
                    return Err(bad(format!(
                        "endpoint {:?} is plain http to a host that is not loopback; use https",
                        self.endpoint
                    )));
                }
            }
            _ => {
                return Err(bad(format!(
                    "endpoint {:?} must start with https:// or http://",
                    self.endpoint
                )));
            }
        }
        if self.timeout.is_zero() {
            return Err(bad("timeout must be positive".into()));
        }
        Ok(())
    }
}

/// Stock and lead times of the built-in supplier: parts listed here run out (and are then
/// refused until restocked); parts not listed are always in stock.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BuiltinSupplierConfig {
    /// How long an order takes to arrive, unless its part says otherwise.
    #[serde(default = "default_supplier_lead_time", with = "humantime_serde")]
    pub lead_time: Duration,
    /// Limited stock, per part number.
    #[serde(default)]
    pub inventory: Vec<BuiltinStock>,
}

/// One part number of the built-in supplier's limited stock.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BuiltinStock {
    /// The part number.
    pub part_number: String,
    /// Units in stock at start.
    pub quantity: u32,
    /// How long an order of it takes to arrive (default: the supplier's `lead_time`).
    #[serde(default, with = "humantime_serde")]
    pub lead_time: Option<Duration>,
}

fn default_supplier_lead_time() -> Duration {
    Duration::from_secs(2 * 86_400)
}

impl Default for BuiltinSupplierConfig {
    fn default() -> Self {
        Self {
            lead_time: default_supplier_lead_time(),
            inventory: Vec::new(),
        }
    }
}

/// Retries of one outbound call: exponential backoff with jitter from `first` to `max`,
/// `attempts` calls in all. After the last, the mail is given back and delivered again on
/// a later round (with the same idempotency key), and calls to that partner fail fast for
/// `pause`, so a partner's outage does not hold up the node's other mail.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Wait after the first failed call; doubled after each further one.
    #[serde(default = "default_retry_first", with = "humantime_serde")]
    pub first: Duration,
    /// Longest wait between two calls.
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub max: Duration,
    /// Calls in all, the first included, at least 1.
    #[serde(default = "default_retry_attempts")]
    pub attempts: u32,
    /// How long calls to a partner fail fast after one gave up.
    #[serde(default = "default_retry_pause", with = "humantime_serde")]
    pub pause: Duration,
}

fn default_retry_first() -> Duration {
    Duration::from_millis(200)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(2)
}
fn default_retry_attempts() -> u32 {
    4
}
fn default_retry_pause() -> Duration {
    Duration::from_secs(10)
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            first: default_retry_first(),
            max: default_retry_max(),
            attempts: default_retry_attempts(),
            pause: default_retry_pause(),
        }
    }
}

impl IntegrationsConfig {
    /// Checks endpoints, stock and retry values.
    pub fn validate(&self) -> crate::Result<()> {
        if let SupplierChoice::Remote(r) = &self.supplier {
            r.validate("supplier")?;
        }
        if let FieldServiceChoice::Remote(r) = &self.field_service {
            r.validate("field_service")?;
        }
        let bad = |why: String| crate::Error::Config(format!("integrations: {why}"));
        let r = &self.retry;
        if r.attempts == 0 || r.first.is_zero() || r.max < r.first {
            return Err(bad(format!(
                "retry needs attempts >= 1 and 0 < first <= max, got attempts {}, first {:?}, max {:?}",
                r.attempts, r.first, r.max
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &self.builtin_supplier.inventory {
            if s.part_number.is_empty() || !seen.insert(&s.part_number) {
                return Err(bad(format!(
                    "builtin_supplier part number {:?} is empty or listed twice",
                    s.part_number
                )));
            }
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
        for bad in ["nowhere", "n1:0", ":7400", "n1 .example:7400", "a:1,b:2"] {
            let text = format!("[sync]\nadvertise = \"{bad}\"");
            let e = ClusterConfig::load(&text, []).unwrap_err().to_string();
            assert!(e.contains("sync.advertise"), "{bad}: {e}");
        }
        let c = ClusterConfig::load("[sync]\nadvertise = \"n1.example:7400\"", []).unwrap();
        assert_eq!(c.sync.advertise.as_deref(), Some("n1.example:7400"));
        let idle = |t: &str| {
            ClusterConfig::load(
                &format!(
                    "lease_ttl = \"4s\"\nrenew_every = \"1s\"\n[store.postgres]\nidle_in_transaction_timeout = \"{t}\""
                ),
                [],
            )
        };
        assert!(idle("4s").is_err(), "not below the lease");
        assert!(
            ClusterConfig::load("[store.postgres]\ntcp_user_timeout = \"0s\"", [])
                .unwrap_err()
                .to_string()
                .contains("tcp_user_timeout")
        );
        assert!(idle("0s").is_err());
        assert_eq!(
            idle("1500ms")
                .unwrap()
                .store
                .postgres
                .idle_in_transaction_timeout,
            Some(Duration::from_millis(1500))
        );
    }

    #[test]
    fn integrations_are_builtin_names_or_partner_tables() {
        let c = ClusterConfig::load("", []).unwrap();
        assert_eq!(c.integrations.supplier, SupplierChoice::Builtin);
        assert_eq!(c.integrations.field_service, FieldServiceChoice::Desk);
        let text = r#"
            [integrations]
            supplier = { endpoint = "https://supplier.example:443", ca = "certs/sup.pem" }
            field_service = "builtin"
            [integrations.retry]
            attempts = 2
        "#;
        // The token comes from the environment, as a secret should.
        let env = [(
            "CARETWIN_CLUSTER__INTEGRATIONS__SUPPLIER__TOKEN".to_string(),
            "s3cret".to_string(),
        )];
        let c = ClusterConfig::load(text, env).unwrap();
        match &c.integrations.supplier {
            SupplierChoice::Remote(r) => {
                assert_eq!(r.endpoint, "https://supplier.example:443");
                assert_eq!(r.token.as_deref(), Some("s3cret"));
                assert_eq!(r.timeout, Duration::from_secs(2));
                assert!(!format!("{c:?}").contains("s3cret"), "never logged");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.integrations.field_service, FieldServiceChoice::Builtin);
        assert_eq!(c.integrations.retry.attempts, 2);
        // Written back, it reads the same.
        let again: IntegrationsConfig =
            toml::from_str(&toml::to_string(&c.integrations).unwrap()).unwrap();
        assert_eq!(again, c.integrations);

        for (text, want) in [
            (
                "[integrations]\nsupplier = \"local\"",
                "must be \"builtin\"",
            ),
            (
                "[integrations]\nfield_service = \"crm\"",
                "must be \"desk\"",
            ),
            (
                "[integrations]\nsupplier = { endpoint = \"http://192.0.2.1:80\" }",
                "not loopback",
            ),
            (
                "[integrations]\nsupplier = { endpoint = \"https://x.example\" }",
                "no ca",
            ),
            ("[integrations.retry]\nattempts = 0", "attempts >= 1"),
        ] {
            let err = ClusterConfig::load(text, []).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
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
