//! The peer channel: nodes forward messages for twins hosted elsewhere over QUIC, with
//! mutual TLS.
//!
//! One QUIC connection per peer, one bidirectional stream per forwarded call (quinn
//! streams cost a few hundred bytes and no round trip, so calls never queue behind each
//! other). A request is `kind`, twin id and the message in wire form
//! ([`caretwin_actors::host::remote`]); the answer is the outcome in wire form. The
//! receiver only handles calls for shards it hosts ([`System::call_here`]); anything else
//! comes back as `NotHosted` and the sender looks again, so a call follows its shard while
//! it moves and is never handled by a node without the shard's lease.
//!
//! # Who may connect
//! TLS 1.3, ALPN `caretwin-peer/1`, a client certificate chaining to the cluster CA *and*
//! naming a cluster member with a URI subject alternative name `caretwin://node…`
//! ([`NODE_URI_PREFIX`]). Site certificates are signed by the same CA but never carry that
//! name, so an edge cannot pose as a node and inject messages for twins of other sites.

use crate::{Error, Result};
use caretwin_actors::host::remote::Elsewhere;
use caretwin_actors::placement::{self, Member};
use caretwin_actors::system::System;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

/// ALPN of the peer channel.
pub const PEER_ALPN: &[u8] = b"caretwin-peer/1";

/// Prefix of the URI subject alternative name a node certificate carries.
pub const NODE_URI_PREFIX: &str = "caretwin://node";

/// The request kind that tells a peer a watched log grew (its id is the log's name).
const GREW: &str = "!grew";

/// What a node does when a peer says a watched log grew there.
pub type OnGrew = Arc<dyn Fn(&str) + Send + Sync>;

/// Largest request or answer on the peer channel.
const MAX_FRAME: usize = 8 * 1024 * 1024;

/// How long a handshake with a peer may take. A peer that died answers nothing, and a
/// caller waits for its shard to move: a short limit lets it look again (the view may
/// have moved on) instead of waiting out QUIC's idle timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How long a forwarded call may take before the sender gives up on the peer.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The members as this node sees them (kept by the membership loop, read by the router).
#[derive(Debug, Default)]
pub struct View {
    /// The live members.
    pub live: Vec<Member>,
    /// Every member whose lease is still read each round: the live ones and those dead
    /// for less than `forget_after` (they may come back).
    pub known: Vec<String>,
}

impl View {
    /// The member that hosts `shard` in this view.
    pub fn owner(&self, shard: u32) -> Option<&Member> {
        let id = placement::owner(shard, self.live.iter().map(|m| m.node_id.as_str()))?;
        self.live.iter().find(|m| m.node_id == id)
    }
}

/// The peer channel's TLS, both ways, from the node's certificate and the cluster CA.
#[derive(Clone)]
pub struct PeerTls {
    server: quinn::ServerConfig,
    client: quinn::ClientConfig,
    server_name: String,
}

impl PeerTls {
    /// From PEM files: the cluster CA, this node's certificate chain (it must be usable
    /// for both server and client authentication and carry a `caretwin://node` URI) and
    /// its key; `server_name` is a DNS name or IP the node certificates carry.
    pub fn from_files(
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
        server_name: &str,
    ) -> Result<Self> {
        let tls = |e: crate::sync::tls::TlsError| Error::Config(format!("peer TLS: {e}"));
        let cas = crate::sync::tls::load_certs(ca).map_err(tls)?;
        let chain = crate::sync::tls::load_certs(cert).map_err(tls)?;
        let key = crate::sync::tls::load_key(key).map_err(tls)?;
        Self::new(&cas, chain, key, server_name)
    }

    /// From certificates in memory.
    pub fn new(
        cas: &[CertificateDer<'static>],
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        server_name: &str,
    ) -> Result<Self> {
        let bad = |e: &dyn std::fmt::Display| Error::Config(format!("peer TLS: {e}"));
        let mut roots = RootCertStore::empty();
        for ca in cas {
            roots.add(ca.clone()).map_err(|e| bad(&e))?;
        }
        let roots = Arc::new(roots);
        let provider = crate::sync::tls::provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| bad(&e))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad(&e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| bad(&e))?;
        server.alpn_protocols = vec![PEER_ALPN.to_vec()];
        server.max_early_data_size = 0;
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad(&e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| bad(&e))?;
        client.alpn_protocols = vec![PEER_ALPN.to_vec()];
        let mut transport = quinn::TransportConfig::default();
        transport
            .keep_alive_interval(Some(Duration::from_secs(1)))
            .max_idle_timeout(Some(
                Duration::from_secs(5)
                    .try_into()
                    .expect("idle timeout fits a quic varint"),
            ))
            .max_concurrent_bidi_streams(quinn::VarInt::from_u32(4096))
            .max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
        let transport = Arc::new(transport);
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(
            QuicServerConfig::try_from(server).map_err(|e| bad(&e))?,
        ));
        server.transport_config(transport.clone());
        let mut client = quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(client).map_err(|e| bad(&e))?,
        ));
        client.transport_config(transport);
        ServerName::try_from(server_name.to_owned()).map_err(|e| bad(&e))?;
        Ok(Self {
            server,
            client,
            server_name: server_name.to_owned(),
        })
    }
}

/// Whether a verified peer certificate names a cluster member.
fn is_node(conn: &quinn::Connection) -> bool {
    let Some(certs) = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
    else {
        return false;
    };
    let Some(leaf) = certs.first() else {
        return false;
    };
    let Ok((_, x509)) = x509_parser::parse_x509_certificate(leaf) else {
        return false;
    };
    let Ok(Some(san)) = x509.subject_alternative_name() else {
        return false;
    };
    san.value.general_names.iter().any(|n| {
        matches!(n, x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with(NODE_URI_PREFIX))
    })
}

/// Encodes a request: kind and id, each with a 2-byte length, then the message.
fn encode_request(kind: &str, id: &str, msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + kind.len() + id.len() + msg.len());
    for part in [kind, id] {
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part.as_bytes());
    }
    out.extend_from_slice(msg);
    out
}

fn decode_request(bytes: &[u8]) -> Option<(&str, &str, &[u8])> {
    let mut rest = bytes;
    let mut part = || {
        let len = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
        let s = std::str::from_utf8(rest.get(2..2 + len)?).ok()?;
        rest = &rest[2 + len..];
        Some(s)
    };
    let kind = part()?;
    let id = part()?;
    Some((kind, id, rest))
}

/// The peer endpoint: accepts forwarded calls for the shards hosted here, and makes them
/// for shards hosted elsewhere (it is the system's [`Elsewhere`]).
pub struct Peers {
    me: String,
    endpoint: quinn::Endpoint,
    tls: PeerTls,
    view: Arc<RwLock<View>>,
    conns: tokio::sync::Mutex<HashMap<SocketAddr, quinn::Connection>>,
}

impl Peers {
    /// Binds the peer endpoint on `listen`.
    pub fn bind(
        me: &str,
        listen: SocketAddr,
        tls: PeerTls,
        view: Arc<RwLock<View>>,
    ) -> Result<Self> {
        let (endpoint, _) = crate::sync::transport::bind(listen, tls.server.clone())
            .map_err(|e| Error::Config(format!("peer endpoint: {e}")))?;
        Ok(Self {
            me: me.to_owned(),
            endpoint,
            tls,
            view,
            conns: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Where peers reach this node.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.endpoint
            .local_addr()
            .map_err(|e| Error::Config(format!("peer endpoint: {e}")))
    }

    /// Serves forwarded calls to `system` until `shutdown`; the system is held weakly, so
    /// the node can stop its twins while calls are still arriving (they fail back).
    pub async fn serve(
        self: Arc<Self>,
        system: Weak<System>,
        on_grew: OnGrew,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let incoming = tokio::select! {
                () = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
                i = self.endpoint.accept() => match i {
                    Some(i) => i,
                    None => break,
                },
            };
            let system = system.clone();
            let on_grew = on_grew.clone();
            tokio::spawn(async move {
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "peer handshake failed");
                        return;
                    }
                };
                if !is_node(&conn) {
                    tracing::warn!(remote = %conn.remote_address(), "peer certificate names no cluster node; refused");
                    conn.close(quinn::VarInt::from_u32(10), b"not a cluster node");
                    return;
                }
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(answer(system.clone(), on_grew.clone(), send, recv));
                }
            });
        }
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"node stopping");
    }

    async fn connection(&self, addr: SocketAddr) -> caretwin_actors::Result<quinn::Connection> {
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(&addr)
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let unreachable = |e: &dyn std::fmt::Display| {
            caretwin_actors::Error::Backend(format!("peer {addr}: {e}"))
        };
        let connecting = self
            .endpoint
            .connect_with(self.tls.client.clone(), addr, &self.tls.server_name)
            .map_err(|e| unreachable(&e))?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| unreachable(&"handshake timed out"))?
            .map_err(|e| unreachable(&e))?;
        conns.insert(addr, conn.clone());
        Ok(conn)
    }

    async fn call(&self, addr: SocketAddr, request: Vec<u8>) -> caretwin_actors::Result<Vec<u8>> {
        let conn = self.connection(addr).await?;
        let failed = |e: &dyn std::fmt::Display| {
            caretwin_actors::Error::Backend(format!("peer {addr}: {e}"))
        };
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| failed(&e))?;
        send.write_all(&request).await.map_err(|e| failed(&e))?;
        send.finish().map_err(|e| failed(&e))?;
        recv.read_to_end(MAX_FRAME).await.map_err(|e| failed(&e))
    }
}

/// Handles one forwarded call (or signal).
async fn answer(
    system: Weak<System>,
    on_grew: OnGrew,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let answer = match recv.read_to_end(MAX_FRAME).await {
        Ok(bytes) => match (decode_request(&bytes), system.upgrade()) {
            (Some((GREW, log, _)), _) => {
                on_grew(log);
                Vec::new()
            }
            (Some((kind, id, msg)), Some(system)) => system.call_here(kind, id, msg).await,
            (None, _) => caretwin_actors::host::remote::encode_answer::<()>(&Err(
                caretwin_actors::Error::InvalidBatch {
                    reason: "malformed peer request".into(),
                },
            )),
            (_, None) => caretwin_actors::host::remote::encode_answer::<()>(&Err(
                caretwin_actors::Error::NotHosted {
                    kind: String::new(),
                    shard: 0,
                    reason: "the node is stopping".into(),
                },
            )),
        },
        Err(e) => {
            tracing::debug!(error = %e, "peer request unreadable");
            return;
        }
    };
    if send.write_all(&answer).await.is_ok() {
        let _ = send.finish();
    }
}

impl Peers {
    /// Tells every other live member that watched log `log` grew here, so their waiters
    /// on it (gRPC streams, a site's command stream) wake. Fire and forget: a peer that
    /// misses it catches up at its waiters' next wake-up.
    pub fn tell_grew(self: &Arc<Self>, log: &str) {
        let peers: Vec<String> = self
            .view
            .read()
            .expect("view lock")
            .live
            .iter()
            .filter(|m| m.node_id != self.me)
            .map(|m| m.peer_addr.clone())
            .collect();
        for addr in peers {
            let Ok(addr) = addr.parse::<SocketAddr>() else {
                continue;
            };
            let me = self.clone();
            let request = encode_request(GREW, log, &[]);
            tokio::spawn(async move {
                if let Err(e) = tokio::time::timeout(CALL_TIMEOUT, me.call(addr, request)).await {
                    tracing::debug!(peer = %addr, error = %e, "log signal not delivered");
                }
            });
        }
    }
}

#[async_trait::async_trait]
impl Elsewhere for Peers {
    async fn forward(
        &self,
        kind: &'static str,
        shard: u32,
        id: &str,
        msg: Vec<u8>,
    ) -> caretwin_actors::Result<Vec<u8>> {
        let not_hosted = |reason: String| caretwin_actors::Error::NotHosted {
            kind: kind.to_owned(),
            shard,
            reason,
        };
        let addr = {
            let view = self.view.read().expect("view lock");
            match view.owner(shard) {
                None => return Err(not_hosted("no live member".into())),
                Some(m) if m.node_id == self.me => {
                    return Err(not_hosted("it is moving to this node".into()));
                }
                Some(m) => m.peer_addr.clone(),
            }
        };
        let addr: SocketAddr = addr
            .parse()
            .map_err(|e| not_hosted(format!("owner's address {addr:?}: {e}")))?;
        match tokio::time::timeout(
            CALL_TIMEOUT,
            self.call(addr, encode_request(kind, id, &msg)),
        )
        .await
        {
            Ok(Ok(bytes)) => Ok(bytes),
            // An unreachable owner is, for the caller, a shard not hosted: it waits for the
            // owner to come back or for its lease to run out and the shard to move.
            Ok(Err(e)) => {
                self.conns.lock().await.remove(&addr);
                Err(not_hosted(e.to_string()))
            }
            Err(_) => Err(not_hosted(format!("peer {addr} did not answer in time"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_garbage_is_refused() {
        let r = encode_request("device", "t1:dev-1", b"\x81\xa1a\x01");
        assert_eq!(
            decode_request(&r),
            Some(("device", "t1:dev-1", &b"\x81\xa1a\x01"[..]))
        );
        assert_eq!(decode_request(b"\x00"), None);
        assert_eq!(decode_request(b"\x00\x09dev"), None);
    }
}
