//! The edge sync's transport over real UDP sockets on 127.0.0.1: mutual TLS decides who
//! may connect, the cluster learns the site from the certificate alone, and frames cross
//! bidirectional streams with the helpers of both crates. Certificates come from the
//! development PKI (`caretwin_cluster::sync::dev` and the `caretwin-cluster dev` binary).
//!
//! With TLS 1.3 over QUIC the client may finish its side of the handshake before the
//! server has judged the client certificate, so a refusal is awaited on whichever comes
//! first: the connect, or the connection's close. A timeout only guards against a hang.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use caretwin_cluster::sync::{dev, tls as cluster_tls, transport as cluster_transport};
use caretwin_edge::sync::{tls as edge_tls, transport as edge_transport};
use caretwin_proto::frame::FrameError;
use caretwin_proto::v1::{ClusterFrame, EdgeFrame, Hello, Welcome, cluster_frame, edge_frame};
use quinn::{ConnectionError, Endpoint, TransportErrorCode, VarInt};

const EXE: &str = env!("CARGO_BIN_EXE_caretwin-cluster");
/// Guards awaits that must end; never reached when the feature works.
const GUARD: Duration = Duration::from_secs(10);
const MAX_FRAME: usize = 64 * 1024;

/// TLS alerts (RFC 8446 §6) as QUIC carries them (RFC 9001 §4.8).
const UNKNOWN_CA: u8 = 48;
const CERTIFICATE_REQUIRED: u8 = 116;

/// A development PKI in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new(sites: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        dev::generate(&dev::DevPki {
            out: dir.path().to_owned(),
            cluster_name: "localhost".into(),
            sites: sites
                .iter()
                .map(|s| cluster_tls::SiteIdentity::new(*s))
                .collect::<Result<_, _>>()?,
            force: false,
        })?;
        Ok(Self { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ca(&self) -> PathBuf {
        self.path(dev::CA_CERT_FILE)
    }

    fn site(&self, site: &str) -> (PathBuf, PathBuf) {
        let stem = dev::site_file_stem(&cluster_tls::SiteIdentity::new(site).unwrap());
        (
            self.path(&format!("{stem}.pem")),
            self.path(&format!("{stem}.key")),
        )
    }

    /// The cluster's configuration: this PKI's server certificate, accepting sites signed
    /// by `client_ca`.
    fn server_config(&self, client_ca: &Path) -> anyhow::Result<quinn::ServerConfig> {
        Ok(cluster_tls::server_config_from_files(
            client_ca,
            &self.path(dev::CLUSTER_CERT_FILE),
            &self.path(dev::CLUSTER_KEY_FILE),
        )?)
    }

    /// An edge of `site` of this PKI, trusting `cluster_ca`.
    fn edge_config(&self, site: &str, cluster_ca: &Path) -> anyhow::Result<quinn::ClientConfig> {
        let (cert, key) = self.site(site);
        Ok(edge_tls::client_config_from_files(cluster_ca, &cert, &key)?)
    }
}

fn server(config: quinn::ServerConfig) -> anyhow::Result<(Endpoint, SocketAddr)> {
    Ok(cluster_transport::bind("127.0.0.1:0".parse()?, config)?)
}

fn edge(config: quinn::ClientConfig) -> anyhow::Result<Endpoint> {
    Ok(edge_transport::client_endpoint(
        "127.0.0.1:0".parse()?,
        config,
    )?)
}

/// The cluster side of one connection attempt: the next incoming handshake, to a site.
async fn accept_one(
    endpoint: &Endpoint,
) -> Result<(quinn::Connection, cluster_tls::SiteIdentity), cluster_transport::TransportError> {
    let incoming = endpoint.accept().await.expect("endpoint open");
    cluster_transport::accept_site(incoming).await
}

/// How the edge learns that the cluster refused it: the connect fails, or it succeeds
/// (the edge's half of the handshake was done) and the connection then closes.
async fn refusal_seen_by_edge(endpoint: &Endpoint, addr: SocketAddr) -> ConnectionError {
    let result = tokio::time::timeout(GUARD, async {
        match edge_transport::connect(endpoint, addr, "localhost").await {
            Err(edge_transport::TransportError::Connection(e)) => e,
            Err(other) => panic!("unexpected connect error: {other}"),
            Ok(conn) => conn.closed().await,
        }
    })
    .await;
    result.expect("the refusal arrives, not a hang")
}

fn is_alert(e: &ConnectionError, alert: u8) -> bool {
    let code = match e {
        ConnectionError::ConnectionClosed(close) => close.error_code,
        ConnectionError::TransportError(t) => t.code,
        _ => return false,
    };
    code == TransportErrorCode::crypto(alert)
}

fn hello(claimed_site: &str) -> EdgeFrame {
    EdgeFrame {
        body: Some(edge_frame::Body::Hello(Hello {
            protocol_version: 1,
            site_id: claimed_site.into(),
            edge_software_version: "0.1.0".into(),
            edge_instance_id: "instance-7".into(),
            ..Default::default()
        })),
    }
}

#[tokio::test]
async fn a_site_connects_and_the_cluster_names_it_from_the_certificate() -> anyhow::Result<()> {
    let pki = Pki::new(&["t1:home-1", "t1:shop-7"])?;
    let (cluster, addr) = server(pki.server_config(&pki.ca())?)?;

    let cluster_side = tokio::spawn(async move {
        let (conn, site) = accept_one(&cluster).await?;
        let (mut send, recv) = conn.accept_bi().await?;
        let mut frames = cluster_transport::FrameReader::new(recv, MAX_FRAME);
        let hello: EdgeFrame = frames.next().await?.context("a hello")?;
        let welcome = ClusterFrame {
            body: Some(cluster_frame::Body::Welcome(Welcome {
                site_id: site.to_string(),
                protocol_version: 1,
                ..Default::default()
            })),
        };
        cluster_transport::send_frame(&mut send, &welcome).await?;
        send.finish()?;
        // The edge finishes its side only after it has read the welcome.
        let end: Option<EdgeFrame> = frames.next().await?;
        anyhow::ensure!(end.is_none(), "clean end of stream expected, got {end:?}");
        anyhow::Ok((site, hello))
    });

    let endpoint = edge(pki.edge_config("t1:home-1", &pki.ca())?)?;
    let conn = edge_transport::connect(&endpoint, addr, "localhost").await?;
    let (mut send, recv) = conn.open_bi().await?;
    // The edge claims to be another site; the claim must change nothing.
    let sent = hello("t1:shop-7");
    edge_transport::send_frame(&mut send, &sent).await?;
    let mut frames = edge_transport::FrameReader::new(recv, MAX_FRAME);
    let reply: ClusterFrame = frames.next().await?.context("a welcome")?;
    send.finish()?;
    assert!(frames.next::<ClusterFrame>().await?.is_none());

    let (site, received) = tokio::time::timeout(GUARD, cluster_side).await???;
    assert_eq!(site.as_str(), "t1:home-1");
    assert_eq!(received, sent, "the hello crosses unchanged");
    let Some(cluster_frame::Body::Welcome(welcome)) = reply.body else {
        panic!("expected a welcome, got {reply:?}");
    };
    assert_eq!(welcome.site_id, "t1:home-1");
    conn.close(VarInt::from_u32(0), b"done");
    Ok(())
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() -> anyhow::Result<()> {
    let pki = Pki::new(&["t1:home-1"])?;
    let (cluster, addr) = server(pki.server_config(&pki.ca())?)?;
    let cluster_side = tokio::spawn(async move { accept_one(&cluster).await.map(|(_, s)| s) });

    let mut roots = rustls::RootCertStore::empty();
    for ca in cluster_tls::load_certs(&pki.ca())? {
        roots.add(ca)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(cluster_tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![caretwin_proto::frame::ALPN.to_vec()];
    let endpoint = edge(edge_tls::with_transport(tls)?)?;

    let seen = refusal_seen_by_edge(&endpoint, addr).await;
    assert!(is_alert(&seen, CERTIFICATE_REQUIRED), "{seen:?}");
    let cluster_saw = tokio::time::timeout(GUARD, cluster_side).await??;
    assert!(
        matches!(
            cluster_saw,
            Err(cluster_transport::TransportError::Connection(_))
        ),
        "{cluster_saw:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() -> anyhow::Result<()> {
    let ours = Pki::new(&["t1:home-1"])?;
    let theirs = Pki::new(&["t1:home-1"])?;
    let (cluster, addr) = server(ours.server_config(&ours.ca())?)?;
    let cluster_side = tokio::spawn(async move { accept_one(&cluster).await.map(|(_, s)| s) });

    // Trusts our cluster, but its site certificate (same site name) is signed elsewhere.
    let endpoint = edge(theirs.edge_config("t1:home-1", &ours.ca())?)?;

    let seen = refusal_seen_by_edge(&endpoint, addr).await;
    assert!(is_alert(&seen, UNKNOWN_CA), "{seen:?}");
    let cluster_saw = tokio::time::timeout(GUARD, cluster_side).await??;
    assert!(cluster_saw.is_err(), "{cluster_saw:?}");
    Ok(())
}

#[tokio::test]
async fn the_cluster_certificate_cannot_log_in_as_a_site() -> anyhow::Result<()> {
    // Signed by the right CA and good for client authentication (nodes present it to their
    // peers), but it names a cluster member, no site.
    let pki = Pki::new(&["t1:home-1"])?;
    let (cluster, addr) = server(pki.server_config(&pki.ca())?)?;
    let cluster_side = tokio::spawn(async move { accept_one(&cluster).await.map(|(_, s)| s) });
    let endpoint = edge(edge_tls::client_config_from_files(
        &pki.ca(),
        &pki.path(dev::CLUSTER_CERT_FILE),
        &pki.path(dev::CLUSTER_KEY_FILE),
    )?)?;

    let seen = refusal_seen_by_edge(&endpoint, addr).await;
    let unauthenticated = caretwin_proto::v1::ErrorCode::Unauthenticated as u32;
    assert!(
        matches!(&seen, ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from_u32(unauthenticated)),
        "{seen:?}"
    );
    let cluster_saw = tokio::time::timeout(GUARD, cluster_side).await??;
    assert!(
        matches!(
            cluster_saw,
            Err(cluster_transport::TransportError::Tls(
                cluster_tls::TlsError::SiteNotNamed { found: 0 }
            ))
        ),
        "{cluster_saw:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_ca_signed_client_certificate_naming_no_site_is_closed_unauthenticated()
-> anyhow::Result<()> {
    let pki = Pki::new(&["t1:home-1"])?;
    // Issue a client certificate with the dev CA but without the site URI.
    let ca_key = rcgen::KeyPair::try_from(&cluster_tls::load_key(&pki.path(dev::CA_KEY_FILE))?)?;
    let issuer = rcgen::Issuer::from_ca_cert_der(&cluster_tls::load_certs(&pki.ca())?[0], ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "t1:home-1");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer)?;
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| anyhow::anyhow!(e))?;

    let (cluster, addr) = server(pki.server_config(&pki.ca())?)?;
    let cluster_side = tokio::spawn(async move { accept_one(&cluster).await.map(|(_, s)| s) });
    let config = edge_tls::client_config(
        &cluster_tls::load_certs(&pki.ca())?,
        vec![cert.der().clone()],
        key_der,
    )?;
    let endpoint = edge(config)?;

    let seen = refusal_seen_by_edge(&endpoint, addr).await;
    let unauthenticated = caretwin_proto::v1::ErrorCode::Unauthenticated as u32;
    assert!(
        matches!(&seen, ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from_u32(unauthenticated)),
        "{seen:?}"
    );
    let cluster_saw = tokio::time::timeout(GUARD, cluster_side).await??;
    assert!(
        matches!(
            cluster_saw,
            Err(cluster_transport::TransportError::Tls(
                cluster_tls::TlsError::SiteNotNamed { found: 0 }
            ))
        ),
        "{cluster_saw:?}"
    );
    Ok(())
}

#[tokio::test]
async fn the_edge_refuses_a_cluster_certificate_from_another_ca() -> anyhow::Result<()> {
    let ours = Pki::new(&["t1:home-1"])?;
    let impostor = Pki::new(&[])?;
    // The impostor accepts our sites, but presents a certificate from its own CA.
    let (cluster, addr) = server(impostor.server_config(&ours.ca())?)?;
    let cluster_side = tokio::spawn(async move { accept_one(&cluster).await.map(|(_, s)| s) });
    let endpoint = edge(ours.edge_config("t1:home-1", &ours.ca())?)?;

    let result =
        tokio::time::timeout(GUARD, edge_transport::connect(&endpoint, addr, "localhost")).await?;
    // The edge judges the server certificate inside its own handshake: connect fails.
    match result {
        Err(edge_transport::TransportError::Connection(ConnectionError::TransportError(e))) => {
            assert_eq!(e.code, TransportErrorCode::crypto(UNKNOWN_CA), "{e}");
        }
        other => panic!("expected a local tls failure, got {other:?}"),
    }
    let cluster_saw = tokio::time::timeout(GUARD, cluster_side).await??;
    assert!(cluster_saw.is_err(), "{cluster_saw:?}");
    Ok(())
}

#[tokio::test]
async fn oversized_and_truncated_frames_are_reader_errors() -> anyhow::Result<()> {
    let pki = Pki::new(&["t1:home-1"])?;
    let (cluster, addr) = server(pki.server_config(&pki.ca())?)?;
    let cluster_side = tokio::spawn(async move {
        let (conn, _) = accept_one(&cluster).await?;
        // Stream 1: a frame above the 16-byte limit.
        let (_send, recv) = conn.accept_bi().await?;
        let mut frames = cluster_transport::FrameReader::new(recv, 16);
        let too_large = frames.next::<EdgeFrame>().await;
        let after = frames.next::<EdgeFrame>().await;
        // Stream 2: half a frame, then the end of the stream.
        let (_send2, recv2) = conn.accept_bi().await?;
        let mut frames2 = cluster_transport::FrameReader::new(recv2, MAX_FRAME);
        let truncated = frames2.next::<EdgeFrame>().await;
        conn.close(VarInt::from_u32(0), b"done");
        anyhow::Ok((too_large, after, truncated))
    });

    let endpoint = edge(pki.edge_config("t1:home-1", &pki.ca())?)?;
    let conn = edge_transport::connect(&endpoint, addr, "localhost").await?;
    let big = hello(&"x".repeat(100));
    let (mut send, _recv) = conn.open_bi().await?;
    edge_transport::send_frame(&mut send, &big).await?;
    let (mut send2, _recv2) = conn.open_bi().await?;
    let bytes = caretwin_proto::frame::encode(&big);
    send2.write_all(&bytes[..bytes.len() / 2]).await?;
    send2.finish()?;

    let (too_large, after, truncated) = tokio::time::timeout(GUARD, cluster_side).await???;
    assert!(
        matches!(
            too_large,
            Err(cluster_transport::TransportError::Frame(
                FrameError::TooLarge { max: 16, .. }
            ))
        ),
        "{too_large:?}"
    );
    assert!(
        matches!(after, Err(cluster_transport::TransportError::ReaderFailed)),
        "{after:?}"
    );
    assert!(
        matches!(
            truncated,
            Err(cluster_transport::TransportError::Truncated { buffered }) if buffered == bytes.len() / 2
        ),
        "{truncated:?}"
    );
    Ok(())
}

#[test]
fn dev_writes_the_pki_and_refuses_to_overwrite_without_force() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("pki");
    let run = |extra: &[&str]| {
        std::process::Command::new(EXE)
            .args(["dev", "--out"])
            .arg(&out)
            .args(["--site", "t1:home-1", "--site", "t1:shop-7"])
            .args(extra)
            .output()
    };

    let first = run(&[])?;
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(first.status.success(), "{first:?}");
    let names = [
        "ca.pem",
        "ca.dev-only.key",
        "cluster.pem",
        "cluster.key",
        "site-t1+home-1.pem",
        "site-t1+home-1.key",
        "site-t1+shop-7.pem",
        "site-t1+shop-7.key",
    ];
    for name in names {
        let path = out.join(name);
        assert!(path.is_file(), "{name} missing");
        assert!(stdout.contains(&path.display().to_string()), "{stdout}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
            if name.ends_with(".key") {
                assert_eq!(mode, 0o600, "{name}");
            }
        }
    }
    // The files are what the sync loads: the site is named in its certificate.
    let cert = cluster_tls::load_certs(&out.join("site-t1+shop-7.pem"))?;
    assert_eq!(cluster_tls::site_of_cert(&cert[0])?.as_str(), "t1:shop-7");
    cluster_tls::server_config_from_files(
        &out.join("ca.pem"),
        &out.join("cluster.pem"),
        &out.join("cluster.key"),
    )?;
    let ca = std::fs::read(out.join("ca.pem"))?;

    let again = run(&[])?;
    assert!(!again.status.success(), "{again:?}");
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("refusing to overwrite"), "{stderr}");
    assert_eq!(std::fs::read(out.join("ca.pem"))?, ca, "nothing replaced");

    let forced = run(&["--force"])?;
    assert!(forced.status.success(), "{forced:?}");
    assert_ne!(std::fs::read(out.join("ca.pem"))?, ca, "a new CA");

    let bad = std::process::Command::new(EXE)
        .args(["dev", "--out"])
        .arg(&out)
        .args(["--site", "t1/home"])
        .output()?;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid site id"));
    Ok(())
}

#[test]
fn configurations_need_no_process_wide_provider() {
    // Building configurations installs no process-wide provider: aws-lc-rs is passed in.
    let pki = Pki::new(&["t1:home-1"]).unwrap();
    pki.server_config(&pki.ca()).unwrap();
    pki.edge_config("t1:home-1", &pki.ca()).unwrap();
    assert!(rustls::crypto::CryptoProvider::get_default().is_none());
    let _: Arc<rustls::crypto::CryptoProvider> = cluster_tls::provider();
}
