//! TLS of the edge sync, cluster side: the QUIC server configuration (TLS 1.3, mutual
//! authentication, ALPN `caretwin-sync/1`) and the site identity read from a verified client
//! certificate.
//!
//! # Where the site lives in the certificate
//! The one canonical place is a URI subject alternative name `caretwin://site/<site-id>`
//! ([`SITE_URI_PREFIX`]). A certificate must carry exactly one such name; the subject CN
//! (which the dev PKI also sets to the site id) is for people reading the certificate and
//! is never used to decide anything. Nothing the edge says on the wire (`Hello.site_id`)
//! is trusted.
//!
//! # Crypto provider
//! Every configuration here is built with the aws-lc-rs provider passed explicitly, so no
//! process-wide default provider has to be installed and `ring` is never needed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicServerConfig};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use super::transport;

/// Prefix of the URI subject alternative name that names a site: the whole name is
/// `caretwin://site/<site-id>`.
pub const SITE_URI_PREFIX: &str = "caretwin://site/";

/// Longest site id, in bytes.
pub const MAX_SITE_ID_BYTES: usize = 128;

/// What can fail while loading credentials, building TLS configurations, issuing
/// development certificates or reading a peer's identity.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read, written or created.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done (`cannot read`, `cannot write`, …).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A PEM file could not be parsed.
    #[error("cannot parse PEM file {}: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("no certificate in {}", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the configuration (for example a key that does not match its
    /// certificate).
    #[error("tls configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client certificate verifier could not be built (for example no CA certificate).
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The TLS configuration cannot carry QUIC.
    #[error("tls configuration unusable for quic: {0}")]
    Quic(#[from] NoInitialCipherSuite),
    /// A certificate or key could not be generated or reloaded.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// A site id breaks the rules of [`SiteIdentity::new`].
    #[error("invalid site id {id:?}: {reason}")]
    InvalidSiteId {
        /// The refused id.
        id: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// The peer presented no certificate (it cannot happen after a completed handshake
    /// with [`server_tls_config`], which requires one).
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    /// The peer certificate could not be parsed as X.509.
    #[error("cannot parse peer certificate: {0}")]
    BadCertificate(String),
    /// The peer certificate names no site, or more than one.
    #[error("certificate names {found} sites in `{SITE_URI_PREFIX}…` URIs, expected exactly 1")]
    SiteNotNamed {
        /// How many `caretwin://site/` names it has.
        found: usize,
    },
    /// `dev` would overwrite files and `force` was not given.
    #[error("refusing to overwrite {} (pass --force to replace)", list(.0))]
    WouldOverwrite(Vec<PathBuf>),
    /// A development CA key does not belong to the CA certificate beside it.
    #[error("key {} does not belong to certificate {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate.
        cert: PathBuf,
        /// The key.
        key: PathBuf,
    },
    /// Two sites would be written to the same files.
    #[error("site {0} is given twice")]
    DuplicateSite(String),
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Results of this module.
pub type Result<T, E = TlsError> = std::result::Result<T, E>;

/// A site's identity as the cluster knows it: taken from a verified client certificate,
/// or typed by an operator (and then checked).
///
/// Site ids look like `tenant:site` (`t1:home-1`): 1 to [`MAX_SITE_ID_BYTES`] bytes of
/// ASCII letters, digits and `:._-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SiteIdentity(String);

impl SiteIdentity {
    /// Checks `id` and wraps it.
    pub fn new(id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        let reason = if id.is_empty() {
            Some("it is empty")
        } else if id.len() > MAX_SITE_ID_BYTES {
            Some("it is longer than 128 bytes")
        } else if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'.' | b'_' | b'-'))
        {
            Some("only ASCII letters, digits and `:._-` are allowed")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(TlsError::InvalidSiteId { id, reason }),
            None => Ok(Self(id)),
        }
    }

    /// The site id, e.g. `t1:home-1`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the first `:`, which by convention is the tenant; `None` when the
    /// id has no `:`. The tenant registry, not this, is the authority on a site's tenant.
    pub fn tenant_prefix(&self) -> Option<&str> {
        self.0.split_once(':').map(|(tenant, _)| tenant)
    }

    /// The URI subject alternative name that carries this identity in a certificate.
    pub fn uri(&self) -> String {
        format!("{SITE_URI_PREFIX}{}", self.0)
    }
}

impl std::fmt::Display for SiteIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for SiteIdentity {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

/// The crypto provider of the whole workspace, aws-lc-rs, as rustls wants it.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Every certificate in a PEM file, in order (leaf first for a chain). Fails if there is
/// none.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = |source| TlsError::Pem {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Pem {
        path: path.to_owned(),
        source,
    })
}

/// The rustls server configuration of the sync endpoint: TLS 1.3 only, ALPN
/// `caretwin-sync/1`, a client certificate chaining to one of `client_cas` required, and
/// this node's `chain` (leaf first) and `key` presented.
///
/// Session resumption is off, so every connection verifies the client certificate afresh
/// (expiry, and revocation once CRLs are configured); a site reconnects rarely enough that
/// the full handshake costs nothing that matters. 0-RTT is off as well.
pub fn server_tls_config(
    client_cas: &[CertificateDer<'static>],
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    for ca in client_cas {
        roots.add(ca.clone())?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![caretwin_proto::frame::ALPN.to_vec()];
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    tls.max_early_data_size = 0;
    Ok(tls)
}

/// The quinn server configuration of the sync endpoint: [`server_tls_config`] with the
/// transport settings of [`transport::server_transport_config`].
pub fn server_config(
    client_cas: &[CertificateDer<'static>],
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<quinn::ServerConfig> {
    let tls = server_tls_config(client_cas, chain, key)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    config.transport_config(Arc::new(transport::server_transport_config()));
    Ok(config)
}

/// [`server_config`] from PEM files: the CA that signs site certificates, this node's
/// certificate chain and its private key.
pub fn server_config_from_files(
    client_ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<quinn::ServerConfig> {
    server_config(&load_certs(client_ca)?, load_certs(cert)?, load_key(key)?)
}

/// The site a connection was authenticated as, read from the client certificate rustls
/// verified during the handshake. Call it only on an established connection.
pub fn site_of(conn: &quinn::Connection) -> Result<SiteIdentity> {
    let certs = conn
        .peer_identity()
        .ok_or(TlsError::NoPeerCertificate)?
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::NoPeerCertificate)?;
    site_of_cert(certs.first().ok_or(TlsError::NoPeerCertificate)?)
}

/// The site named by a certificate: its single `caretwin://site/<id>` URI subject
/// alternative name, with the id checked by [`SiteIdentity::new`]. This does not verify
/// the certificate; [`site_of`] relies on the handshake for that.
pub fn site_of_cert(cert: &CertificateDer<'_>) -> Result<SiteIdentity> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let sites: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => uri.strip_prefix(SITE_URI_PREFIX),
            _ => None,
        })
        .collect();
    match sites.as_slice() {
        [site] => SiteIdentity::new(*site),
        _ => Err(TlsError::SiteNotNamed { found: sites.len() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_ids_are_checked() {
        for good in ["t1:home-1", "a", "T.9_x-y:z", &"x".repeat(128)] {
            assert_eq!(SiteIdentity::new(good).unwrap().as_str(), good);
        }
        for bad in ["", "t1 home", "t1/home", "ä", "t1:home\n", &"x".repeat(129)] {
            assert!(
                matches!(SiteIdentity::new(bad), Err(TlsError::InvalidSiteId { .. })),
                "{bad:?} accepted"
            );
        }
        let site = SiteIdentity::new("t1:home-1").unwrap();
        assert_eq!(site.tenant_prefix(), Some("t1"));
        assert_eq!(site.uri(), "caretwin://site/t1:home-1");
        assert_eq!(SiteIdentity::new("solo").unwrap().tenant_prefix(), None);
    }

    fn cert_with_uris(uris: &[&str]) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        for uri in uris {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI((*uri).try_into().unwrap()));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn the_site_comes_from_exactly_one_uri_name() {
        let one = cert_with_uris(&["https://example.com/", "caretwin://site/t1:home-1"]);
        assert_eq!(site_of_cert(&one).unwrap().as_str(), "t1:home-1");
        let none = cert_with_uris(&["https://example.com/"]);
        assert!(matches!(
            site_of_cert(&none),
            Err(TlsError::SiteNotNamed { found: 0 })
        ));
        let two = cert_with_uris(&["caretwin://site/t1:a", "caretwin://site/t1:b"]);
        assert!(matches!(
            site_of_cert(&two),
            Err(TlsError::SiteNotNamed { found: 2 })
        ));
        let bad = cert_with_uris(&["caretwin://site/t1%2Fa"]);
        assert!(matches!(
            site_of_cert(&bad),
            Err(TlsError::InvalidSiteId { .. })
        ));
        assert!(matches!(
            site_of_cert(&CertificateDer::from(vec![1, 2, 3])),
            Err(TlsError::BadCertificate(_))
        ));
    }
}
