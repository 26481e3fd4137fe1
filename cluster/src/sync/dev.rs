//! A development PKI for the edge sync: a CA, the cluster's server certificate and one
//! client certificate per site, written as PEM files (`caretwin-cluster dev`).
//!
//! For development and tests only. Production takes its certificates from files named in
//! the configuration ([`super::tls::server_config_from_files`]) and its CA lives outside
//! CareTwin.
//!
//! Files written into the output directory:
//!
//! | file | what |
//! |---|---|
//! | `ca.pem` | the development CA certificate, trusted by both sides |
//! | `ca.dev-only.key` | its private key, kept so more sites can be issued later |
//! | `cluster.pem`, `cluster.key` | the cluster's server certificate (SANs: the cluster name, `localhost`, `127.0.0.1`) and key |
//! | `site-<id>.pem`, `site-<id>.key` | a site's client certificate and key; in the file name `:` becomes `+` ([`site_file_stem`]) |
//!
//! A site certificate names its site in the URI subject alternative name
//! `caretwin://site/<site-id>` (the canonical place, see [`super::tls`]) and, for people,
//! in its CN. Keys are written with mode 0600, certificates 0644.
//!
//! Nothing is overwritten without `force`. When `ca.pem` and its key already exist, they
//! are reused to sign the new site certificates (and an existing `cluster.pem`/`cluster.key`
//! pair is kept), so sites can be added to a directory later; only the site files must be
//! new. With `force` everything is generated afresh.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};

use super::tls::{Result, SiteIdentity, TlsError, load_certs, load_key};

/// The CA certificate.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA's private key; development only, never to be deployed.
pub const CA_KEY_FILE: &str = "ca.dev-only.key";
/// The cluster's server certificate.
pub const CLUSTER_CERT_FILE: &str = "cluster.pem";
/// The cluster's private key.
pub const CLUSTER_KEY_FILE: &str = "cluster.key";

const CA_KEY_WARNING: &str = "\
# DEVELOPMENT CA KEY, made by `caretwin-cluster dev`. Whoever holds it can issue site
# certificates the cluster accepts. Never deploy it.
";

const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const LEAF_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// Certificates start an hour in the past so a peer whose clock lags still accepts them.
const BACKDATE: Duration = Duration::from_secs(3600);

/// What to generate.
#[derive(Debug, Clone)]
pub struct DevPki {
    /// Directory the files go to; created if missing.
    pub out: PathBuf,
    /// DNS name or IP address edges dial the cluster by; a SAN of the server certificate
    /// besides `localhost` and `127.0.0.1`.
    pub cluster_name: String,
    /// One client certificate is issued per site.
    pub sites: Vec<SiteIdentity>,
    /// Replace existing files (and so the CA) instead of refusing.
    pub force: bool,
}

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileAction {
    /// Newly written (or overwritten with `force`).
    Written,
    /// Already there and reused.
    Kept,
}

/// One file of the development PKI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevFile {
    /// Where it is.
    pub path: PathBuf,
    /// What it holds, for people.
    pub what: String,
    /// Whether it was written or kept.
    pub action: FileAction,
}

/// The file name of a site's files without extension: `site-` and the id with `:`
/// replaced by `+` (`t1:home-1` → `site-t1+home-1`). `+` is not allowed in site ids, so
/// two sites never share files, and the name needs no quoting in shells or on Windows.
pub fn site_file_stem(site: &SiteIdentity) -> String {
    format!("site-{}", site.as_str().replace(':', "+"))
}

/// A file to write: path, contents, whether it is secret, and a description.
struct Output {
    path: PathBuf,
    contents: String,
    secret: bool,
    what: String,
}

/// Generates the development PKI described by `spec` and writes it. Returns every file
/// written or reused, in order. Refuses (writing nothing) if a file would be overwritten
/// without `spec.force`.
pub fn generate(spec: &DevPki) -> Result<Vec<DevFile>> {
    let mut seen = std::collections::HashSet::new();
    for site in &spec.sites {
        if !seen.insert(site) {
            return Err(TlsError::DuplicateSite(site.to_string()));
        }
    }
    std::fs::create_dir_all(&spec.out).map_err(|source| TlsError::Io {
        action: "cannot create directory",
        path: spec.out.clone(),
        source,
    })?;
    let path = |name: &str| spec.out.join(name);
    let (ca_cert, ca_key) = (path(CA_CERT_FILE), path(CA_KEY_FILE));
    let (cluster_cert, cluster_key) = (path(CLUSTER_CERT_FILE), path(CLUSTER_KEY_FILE));
    let site_files: Vec<(PathBuf, PathBuf)> = spec
        .sites
        .iter()
        .map(|s| {
            let stem = site_file_stem(s);
            (path(&format!("{stem}.pem")), path(&format!("{stem}.key")))
        })
        .collect();

    let reuse_ca = !spec.force && ca_cert.exists() && ca_key.exists();
    let keep_cluster = reuse_ca && cluster_cert.exists() && cluster_key.exists();
    if !spec.force {
        let mut targets: Vec<&PathBuf> = Vec::new();
        if !reuse_ca {
            targets.extend([&ca_cert, &ca_key]);
        }
        if !keep_cluster {
            targets.extend([&cluster_cert, &cluster_key]);
        }
        targets.extend(site_files.iter().flat_map(|(c, k)| [c, k]));
        let existing: Vec<PathBuf> = targets
            .into_iter()
            .filter(|p| p.exists())
            .cloned()
            .collect();
        if !existing.is_empty() {
            return Err(TlsError::WouldOverwrite(existing));
        }
    }

    let mut report = Vec::new();
    let mut outputs = Vec::new();
    let issuer = if reuse_ca {
        let issuer = load_issuer(&ca_cert, &ca_key)?;
        report.push(kept(&ca_cert, "development CA certificate"));
        report.push(kept(&ca_key, "development CA key"));
        issuer
    } else {
        let key = KeyPair::generate()?;
        let params = ca_params(&key);
        let cert = params.self_signed(&key)?;
        outputs.push(Output {
            path: ca_cert.clone(),
            contents: cert.pem(),
            secret: false,
            what: "development CA certificate".into(),
        });
        outputs.push(Output {
            path: ca_key.clone(),
            contents: format!("{CA_KEY_WARNING}{}", key.serialize_pem()),
            secret: true,
            what: "development CA key (dev only, never deploy)".into(),
        });
        Issuer::new(params, key)
    };

    if keep_cluster {
        report.push(kept(&cluster_cert, "cluster server certificate"));
        report.push(kept(&cluster_key, "cluster server key"));
    } else {
        let key = KeyPair::generate()?;
        let sans = server_names(&spec.cluster_name);
        let cert = server_params(&spec.cluster_name, &sans)?.signed_by(&key, &issuer)?;
        outputs.push(Output {
            path: cluster_cert,
            contents: cert.pem(),
            secret: false,
            what: format!("cluster server certificate for {}", sans.join(", ")),
        });
        outputs.push(Output {
            path: cluster_key,
            contents: key.serialize_pem(),
            secret: true,
            what: "cluster server key".into(),
        });
    }

    for (site, (cert_path, key_path)) in spec.sites.iter().zip(site_files) {
        let key = KeyPair::generate()?;
        let cert = site_params(site)?.signed_by(&key, &issuer)?;
        outputs.push(Output {
            path: cert_path,
            contents: cert.pem(),
            secret: false,
            what: format!("client certificate of site {site} ({})", site.uri()),
        });
        outputs.push(Output {
            path: key_path,
            contents: key.serialize_pem(),
            secret: true,
            what: format!("client key of site {site}"),
        });
    }

    for out in outputs {
        write_file(&out.path, &out.contents, out.secret, spec.force)?;
        report.push(DevFile {
            path: out.path,
            what: out.what,
            action: FileAction::Written,
        });
    }
    Ok(report)
}

fn kept(path: &Path, what: &str) -> DevFile {
    DevFile {
        path: path.to_owned(),
        what: what.into(),
        action: FileAction::Kept,
    }
}

/// Reloads an existing development CA, checking that the key belongs to the certificate.
fn load_issuer(cert_path: &Path, key_path: &Path) -> Result<Issuer<'static, KeyPair>> {
    let cert = load_certs(cert_path)?.swap_remove(0);
    let key = KeyPair::try_from(&load_key(key_path)?)?;
    let (_, x509) = x509_parser::parse_x509_certificate(&cert)
        .map_err(|e| TlsError::BadCertificate(format!("{}: {e}", cert_path.display())))?;
    if x509.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(TlsError::KeyMismatch {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
        });
    }
    Ok(Issuer::from_ca_cert_der(&cert, key)?)
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + lifetime).into();
}

fn ca_params(key: &KeyPair) -> CertificateParams {
    let mut params = CertificateParams::default();
    // Each development CA gets its own name (from its key), so a certificate of another
    // one is reported as an unknown issuer rather than as a bad signature.
    let id: String = params.key_identifier(key)[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "CareTwin (development only)");
    params
        .distinguished_name
        .push(DnType::CommonName, format!("CareTwin development CA {id}"));
    // Signs leaf certificates only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, CA_VALIDITY);
    params
}

fn leaf_params(common_name: &str, eku: ExtendedKeyUsagePurpose) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // The purpose is explicit so a site certificate cannot serve as the cluster's and the
    // cluster's cannot log in as a site.
    params.extended_key_usages = vec![eku];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, LEAF_VALIDITY);
    params
}

/// The cluster's name, `localhost` and `127.0.0.1`, each once.
fn server_names(cluster_name: &str) -> Vec<&str> {
    let mut names = vec![cluster_name];
    for name in ["localhost", "127.0.0.1"] {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

fn server_params(cluster_name: &str, names: &[&str]) -> Result<CertificateParams> {
    let mut params = leaf_params(cluster_name, ExtendedKeyUsagePurpose::ServerAuth);
    // The node certificate also authenticates the node to its peers (the peer channel),
    // named as a cluster member, which no site certificate is.
    params
        .extended_key_usages
        .push(ExtendedKeyUsagePurpose::ClientAuth);
    params
        .subject_alt_names
        .push(SanType::URI(crate::peer::NODE_URI_PREFIX.try_into()?));
    for &name in names {
        params.subject_alt_names.push(match name.parse() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.try_into()?),
        });
    }
    Ok(params)
}

fn site_params(site: &SiteIdentity) -> Result<CertificateParams> {
    let mut params = leaf_params(site.as_str(), ExtendedKeyUsagePurpose::ClientAuth);
    params
        .subject_alt_names
        .push(SanType::URI(site.uri().try_into()?));
    Ok(params)
}

/// Writes a new file (mode 0600 when `secret`), replacing an existing one only when
/// `force`. Removing first, then creating exclusively, means a key never keeps the looser
/// mode of a file it replaces.
fn write_file(path: &Path, contents: &str, secret: bool, force: bool) -> Result<()> {
    let io = |action| {
        move |source| TlsError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    };
    if force {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("cannot replace")(e));
            }
            _ => {}
        }
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path).map_err(io("cannot create"))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io("cannot write"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, sites: &[&str], force: bool) -> DevPki {
        DevPki {
            out: dir.to_owned(),
            cluster_name: "cluster.example".into(),
            sites: sites
                .iter()
                .map(|s| SiteIdentity::new(*s).unwrap())
                .collect(),
            force,
        }
    }

    #[test]
    fn writes_everything_then_refuses_then_adds_sites_with_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let files = generate(&spec(dir.path(), &["t1:home-1"], false)).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "ca.pem",
                "ca.dev-only.key",
                "cluster.pem",
                "cluster.key",
                "site-t1+home-1.pem",
                "site-t1+home-1.key"
            ]
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in &files {
                let mode = std::fs::metadata(&f.path).unwrap().permissions().mode() & 0o777;
                let expect = if f.path.extension().unwrap() == "key" {
                    0o600
                } else {
                    0o644
                };
                assert_eq!(mode, expect, "{}", f.path.display());
            }
        }
        let ca_before = std::fs::read(dir.path().join(CA_CERT_FILE)).unwrap();
        let cert = load_certs(&dir.path().join("site-t1+home-1.pem")).unwrap();
        assert_eq!(
            super::super::tls::site_of_cert(&cert[0]).unwrap().as_str(),
            "t1:home-1"
        );

        // The same site again: refused, nothing changed.
        let err = generate(&spec(dir.path(), &["t1:home-1"], false)).unwrap_err();
        assert!(
            matches!(&err, TlsError::WouldOverwrite(p) if p.len() == 2),
            "{err}"
        );

        // A new site: signed by the existing CA, which is kept.
        let files = generate(&spec(dir.path(), &["t1:shop-7"], false)).unwrap();
        let written: Vec<_> = files
            .iter()
            .filter(|f| f.action == FileAction::Written)
            .collect();
        assert_eq!(written.len(), 2);
        assert_eq!(
            std::fs::read(dir.path().join(CA_CERT_FILE)).unwrap(),
            ca_before
        );

        // Force: a new CA.
        generate(&spec(dir.path(), &["t1:home-1"], true)).unwrap();
        assert_ne!(
            std::fs::read(dir.path().join(CA_CERT_FILE)).unwrap(),
            ca_before
        );
    }

    #[test]
    fn a_ca_key_of_another_ca_is_refused() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        generate(&spec(a.path(), &["t1:a"], false)).unwrap();
        generate(&spec(b.path(), &["t1:b"], false)).unwrap();
        std::fs::copy(b.path().join(CA_KEY_FILE), a.path().join(CA_KEY_FILE)).unwrap();
        let err = generate(&spec(a.path(), &["t1:c"], false)).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn duplicate_sites_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = generate(&spec(dir.path(), &["t1:a", "t1:a"], false)).unwrap_err();
        assert!(matches!(err, TlsError::DuplicateSite(_)), "{err}");
    }
}
