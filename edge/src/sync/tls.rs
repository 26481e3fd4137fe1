//! TLS of the edge sync, edge side: the QUIC client configuration (TLS 1.3, ALPN
//! `caretwin-sync/1`, the cluster verified against the configured CA, the site's client
//! certificate presented).
//!
//! The site's identity is whatever its certificate says (a `caretwin://site/<site-id>` URI
//! subject alternative name, read by the cluster); nothing here can claim another.
//!
//! Built with the aws-lc-rs provider passed explicitly, so no process-wide default
//! provider has to be installed and `ring` is never needed. The PEM loaders repeat the
//! cluster's (`caretwin_cluster::sync::tls`) because the edge must not depend on the
//! cluster.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::transport;

/// What can fail while loading credentials or building the TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read PEM file {}: {source}", path.display())]
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
    /// certificate, or an unusable CA certificate).
    #[error("tls configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    /// The TLS configuration cannot carry QUIC.
    #[error("tls configuration unusable for quic: {0}")]
    Quic(#[from] NoInitialCipherSuite),
}

/// Results of this module.
pub type Result<T, E = TlsError> = std::result::Result<T, E>;

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

/// The rustls client configuration of the sync: TLS 1.3 only, ALPN `caretwin-sync/1`, the
/// server certificate verified against `cluster_cas` (and the name dialled), the site's
/// `chain` (leaf first) and `key` presented.
pub fn client_tls_config(
    cluster_cas: &[CertificateDer<'static>],
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ClientConfig> {
    let mut roots = RootCertStore::empty();
    for ca in cluster_cas {
        roots.add(ca.clone())?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    tls.alpn_protocols = vec![caretwin_proto::frame::ALPN.to_vec()];
    Ok(tls)
}

/// The quinn client configuration of the sync: [`client_tls_config`] with the transport
/// settings of [`transport::client_transport_config`].
pub fn client_config(
    cluster_cas: &[CertificateDer<'static>],
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<quinn::ClientConfig> {
    let tls = client_tls_config(cluster_cas, chain, key)?;
    Ok(with_transport(tls)?)
}

/// A quinn client configuration from any rustls configuration, with the sync's transport
/// settings. Tests use it to present other credentials (or none).
pub fn with_transport(
    tls: rustls::ClientConfig,
) -> Result<quinn::ClientConfig, NoInitialCipherSuite> {
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    config.transport_config(Arc::new(transport::client_transport_config()));
    Ok(config)
}

/// [`client_config`] from PEM files: the CA that signs the cluster's certificate, this
/// site's certificate chain and its private key.
pub fn client_config_from_files(
    cluster_ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<quinn::ClientConfig> {
    client_config(&load_certs(cluster_ca)?, load_certs(cert)?, load_key(key)?)
}
