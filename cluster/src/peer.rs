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
//! # Watches across nodes
//! Streams wait on signals of the node's store wrapper (`store::watch`), but the write
//! they wait for happens on the node hosting the twin. Two signals cross the channel, both
//! batched per peer in one `!tell` message and resent until the peer takes them (while it
//! is in the view): a watched log grew (to every peer; logs grow per case, command or
//! notification, not per reading), and a snapshot changed (only to the peers that watch
//! its key). Which keys a node watches it tells its peers itself ([`sharing`] decides
//! when; `!interest` carries the whole set), so a node nobody watches from sends nothing
//! per reading, and a shard that moves finds its new host already knowing the watchers.
//!
//! # Who may connect
//! TLS 1.3, ALPN `caretwin-peer/1`, a client certificate chaining to the cluster CA *and*
//! naming a cluster member with a URI subject alternative name `caretwin://node…`
//! ([`NODE_URI_PREFIX`]). Site certificates are signed by the same CA but never carry that
//! name, so an edge cannot pose as a node and inject messages for twins of other sites.

pub mod sharing;

use crate::store::watch::{LogSignals, SnapshotSignals};
use crate::{Error, Result};
use caretwin_actors::host::remote::Elsewhere;
use caretwin_actors::placement::{self, Member};
use caretwin_actors::system::System;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

/// ALPN of the peer channel.
pub const PEER_ALPN: &[u8] = b"caretwin-peer/1";

/// Prefix of the URI subject alternative name a node certificate carries.
pub const NODE_URI_PREFIX: &str = "caretwin://node";

/// The request kind that tells a peer what changed here: logs that grew, snapshots it
/// watches (its id is the sender's node id; see [`encode_tell`]).
const TELL: &str = "!tell";

/// The request kind that tells a peer which snapshot keys this node watches (its id is
/// the sender's node id; see [`encode_interest`]); answered with an [`sharing::Ack`].
const INTEREST: &str = "!interest";

/// How often the sharing task looks at the view (new peers, peers gone) and its retries.
const SHARING_ROUND: Duration = Duration::from_millis(50);

/// Least time between two `!tell`s to one peer: changes arriving meanwhile share the
/// next one, so a busy twin costs a peer at most one message per gap.
const TELL_GAP: Duration = Duration::from_millis(2);

/// Most names in one `!tell` (the rest go in the next).
const TELL_MAX: usize = 4_096;

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

/// What changed here that one peer has not been told yet.
#[derive(Debug, Default, PartialEq, Eq)]
struct Outgoing {
    /// Watched logs that grew.
    logs: BTreeSet<String>,
    /// Snapshots the peer watches that were committed.
    keys: BTreeSet<String>,
}

impl Outgoing {
    fn is_empty(&self) -> bool {
        self.logs.is_empty() && self.keys.is_empty()
    }

    /// Takes at most `max` names, logs first.
    fn take(&mut self, max: usize) -> Outgoing {
        let mut out = Outgoing::default();
        while out.logs.len() < max
            && let Some(l) = self.logs.pop_first()
        {
            out.logs.insert(l);
        }
        while out.logs.len() + out.keys.len() < max
            && let Some(k) = self.keys.pop_first()
        {
            out.keys.insert(k);
        }
        out
    }

    /// Puts back what could not be sent.
    fn merge(&mut self, other: Outgoing) {
        self.logs.extend(other.logs);
        self.keys.extend(other.keys);
    }
}

/// One peer's queue of changes, drained by its sender task.
#[derive(Default)]
struct Queue {
    pending: Mutex<Outgoing>,
    wake: tokio::sync::Notify,
    gone: std::sync::atomic::AtomicBool,
}

/// What the node shares about watches, once [`Peers::share`] ran.
struct Shared {
    snapshots: Arc<SnapshotSignals>,
    /// This process's incarnation.
    epoch: u64,
    /// Peers' own sets as they arrive: (node id, epoch), for the sharing task.
    heard: tokio::sync::mpsc::UnboundedSender<(String, u64)>,
}

/// The peer endpoint: accepts forwarded calls for the shards hosted here, and makes them
/// for shards hosted elsewhere (it is the system's [`Elsewhere`]).
pub struct Peers {
    me: String,
    endpoint: quinn::Endpoint,
    tls: PeerTls,
    view: Arc<RwLock<View>>,
    conns: tokio::sync::Mutex<HashMap<SocketAddr, quinn::Connection>>,
    /// Per peer, the changes to tell it.
    queues: Mutex<HashMap<String, Arc<Queue>>>,
    shared: OnceLock<Shared>,
    /// Becomes true when [`Peers::serve`] ends: the sharing and telling tasks stop.
    stopping: tokio::sync::watch::Sender<bool>,
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
            queues: Mutex::new(HashMap::new()),
            shared: OnceLock::new(),
            stopping: tokio::sync::watch::channel(false).0,
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
            let me = self.clone();
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
                    tokio::spawn(answer(
                        me.clone(),
                        system.clone(),
                        on_grew.clone(),
                        send,
                        recv,
                    ));
                }
            });
        }
        self.stopping.send_replace(true);
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
    peers: Arc<Peers>,
    system: Weak<System>,
    on_grew: OnGrew,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let answer = match recv.read_to_end(MAX_FRAME).await {
        Ok(bytes) => match (decode_request(&bytes), system.upgrade()) {
            (Some((TELL, _, msg)), _) => {
                match decode_tell(msg) {
                    Some(told) => {
                        for log in &told.logs {
                            on_grew(log);
                        }
                        if let Some(shared) = peers.shared.get() {
                            for key in &told.keys {
                                shared.snapshots.changed_here(key);
                            }
                        }
                    }
                    None => tracing::debug!("malformed tell from a peer; ignored"),
                }
                Vec::new()
            }
            (Some((INTEREST, from, msg)), _) => peers.interest_from(from, msg),
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
    /// on it (gRPC streams, a site's command stream) wake. Queued per peer and batched;
    /// resent until the peer takes it, while it is in the view.
    pub fn tell_grew(self: &Arc<Self>, log: &str) {
        let peers: Vec<String> = self
            .view
            .read()
            .expect("view lock")
            .live
            .iter()
            .filter(|m| m.node_id != self.me)
            .map(|m| m.node_id.clone())
            .collect();
        for peer in peers {
            self.queue_for(&peer, |o| {
                o.logs.insert(log.to_owned());
            });
        }
    }

    /// Tells `peer`, which watches it, that the snapshot `key` was committed here.
    fn tell_changed(self: &Arc<Self>, peer: &str, key: &str) {
        self.queue_for(peer, |o| {
            o.keys.insert(key.to_owned());
        });
    }

    /// Adds to `peer`'s queue (starting its sender on first use) and wakes the sender.
    fn queue_for(self: &Arc<Self>, peer: &str, add: impl FnOnce(&mut Outgoing)) {
        let queue = {
            let mut queues = self.queues.lock().expect("queues lock");
            match queues.get(peer) {
                Some(q) => q.clone(),
                None => {
                    if *self.stopping.borrow() {
                        return;
                    }
                    let q = Arc::new(Queue::default());
                    queues.insert(peer.to_owned(), q.clone());
                    tokio::spawn(send_tells(
                        Arc::downgrade(self),
                        peer.to_owned(),
                        q.clone(),
                        self.stopping.subscribe(),
                    ));
                    q
                }
            }
        };
        add(&mut queue.pending.lock().expect("queue lock"));
        queue.wake.notify_one();
    }

    /// Drops what is queued for `peer` and stops its sender (it left the cluster).
    fn forget_queue(&self, peer: &str) {
        if let Some(q) = self.queues.lock().expect("queues lock").remove(peer) {
            q.gone.store(true, std::sync::atomic::Ordering::SeqCst);
            q.wake.notify_one();
        }
    }

    /// The address of live member `peer` in this node's view.
    fn addr_of(&self, peer: &str) -> Option<SocketAddr> {
        let view = self.view.read().expect("view lock");
        let m = view.live.iter().find(|m| m.node_id == peer)?;
        m.peer_addr.parse().ok()
    }

    /// Shares this node's twin watches with its peers, and relays commits of the keys
    /// theirs watch, until the endpoint stops (see [`sharing`]). `snapshots` and `logs`
    /// are the signals of the store the twins write through.
    pub fn share(
        self: &Arc<Self>,
        snapshots: Arc<SnapshotSignals>,
        logs: Arc<LogSignals>,
    ) -> tokio::task::JoinHandle<()> {
        let (heard, heard_rx) = tokio::sync::mpsc::unbounded_channel();
        let epoch = random_epoch();
        let _ = self.shared.set(Shared {
            snapshots: snapshots.clone(),
            epoch,
            heard,
        });
        // Weak: the signals outlive nothing of the endpoint's.
        let me = Arc::downgrade(self);
        snapshots.relay_to(Arc::new(
            move |peer: &str, key: &caretwin_actors::store::Key| {
                if let Some(me) = me.upgrade() {
                    me.tell_changed(peer, key.as_str());
                }
            },
        ));
        tokio::spawn(self.clone().sharing(snapshots, logs, heard_rx))
    }

    /// Answers a peer's `!interest`: installs its set, and says whether it was new here.
    fn interest_from(&self, from: &str, msg: &[u8]) -> Vec<u8> {
        let Some(shared) = self.shared.get() else {
            return Vec::new(); // not sharing: the sender counts it as not delivered
        };
        let Some((epoch, version, keys)) = decode_interest(msg) else {
            tracing::debug!(peer = from, "malformed interest from a peer; ignored");
            return Vec::new();
        };
        let fresh = shared.snapshots.install(from, epoch, version, keys);
        let _ = shared.heard.send((from.to_owned(), epoch));
        encode_ack(sharing::Ack {
            epoch: shared.epoch,
            fresh,
        })
    }

    /// The sharing task: runs [`sharing::Sharing`]'s decisions.
    async fn sharing(
        self: Arc<Self>,
        snapshots: Arc<SnapshotSignals>,
        logs: Arc<LogSignals>,
        mut heard: tokio::sync::mpsc::UnboundedReceiver<(String, u64)>,
    ) {
        let start = tokio::time::Instant::now();
        let now_ms = || start.elapsed().as_millis() as u64;
        let epoch = self.shared.get().map_or(0, |s| s.epoch);
        let mut state = sharing::Sharing::default();
        let mut interest = snapshots.interest_changed();
        let mut stopping = self.stopping.subscribe();
        let (done_tx, mut done) =
            tokio::sync::mpsc::unbounded_channel::<(String, u64, Option<sharing::Ack>)>();
        let mut round = tokio::time::interval(SHARING_ROUND);
        round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut actions = Vec::new();
            tokio::select! {
                _ = stopping.wait_for(|s| *s) => return,
                _ = round.tick() => {}
                changed = interest.changed() => if changed.is_err() { return },
                Some((peer, epoch)) = heard.recv() => state.heard(&peer, epoch),
                Some((peer, version, ack)) = done.recv() => {
                    actions.extend(state.sent(&peer, version, ack, now_ms()));
                }
            }
            let live: Vec<(String, String)> = self
                .view
                .read()
                .expect("view lock")
                .live
                .iter()
                .filter(|m| m.node_id != self.me)
                .map(|m| (m.node_id.clone(), m.peer_addr.clone()))
                .collect();
            let now = now_ms();
            actions.extend(state.view(live.iter().map(|(i, a)| (i.as_str(), a.as_str())), now));
            state.interest(*interest.borrow_and_update());
            actions.extend(state.poll(now));
            // The set is read once per round, at its latest, for every send of the round.
            let mut request: Option<(u64, Arc<Vec<u8>>)> = None;
            for action in actions {
                match action {
                    sharing::Action::Send { peer, addr, .. } => {
                        let (version, request) = request
                            .get_or_insert_with(|| {
                                let (version, keys) = snapshots.interest();
                                let msg = encode_interest(epoch, version, &keys);
                                if msg.len() > MAX_FRAME {
                                    tracing::warn!(
                                        keys = keys.len(),
                                        bytes = msg.len(),
                                        "twins watched here exceed one peer message; peers cannot learn them"
                                    );
                                }
                                (version, Arc::new(encode_request(INTEREST, &self.me, &msg)))
                            })
                            .clone();
                        let (me, done) = (self.clone(), done_tx.clone());
                        tokio::spawn(async move {
                            let ack = match addr.parse::<SocketAddr>() {
                                Ok(addr) => match tokio::time::timeout(
                                    CALL_TIMEOUT,
                                    me.call(addr, request.to_vec()),
                                )
                                .await
                                {
                                    Ok(Ok(answer)) => decode_ack(&answer),
                                    Ok(Err(e)) => {
                                        tracing::debug!(%peer, error = %e, "interest not delivered");
                                        None
                                    }
                                    Err(_) => None,
                                },
                                Err(_) => None,
                            };
                            let _ = done.send((peer, version, ack));
                        });
                    }
                    sharing::Action::Synced { version, relook } => {
                        snapshots.synced(version, relook);
                    }
                    sharing::Action::RelookAll => {
                        snapshots.relook_all();
                        logs.wake_all();
                    }
                    sharing::Action::Forget { peer } => {
                        tracing::debug!(%peer, "peer gone; its watches forgotten");
                        snapshots.forget(&peer);
                        self.forget_queue(&peer);
                    }
                }
            }
        }
    }
}

/// Sends `queue`'s changes to `peer`, batched, until it is forgotten or the endpoint
/// stops. A failed send is put back and tried again (with backoff): the queue is a set,
/// so it never holds more than the logs and keys there are.
async fn send_tells(
    peers: Weak<Peers>,
    peer: String,
    queue: Arc<Queue>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    let mut last: Option<tokio::time::Instant> = None;
    let mut missing_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            () = queue.wake.notified() => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
        loop {
            if queue.gone.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            if let Some(last) = last {
                tokio::time::sleep_until(last + TELL_GAP).await;
            }
            let out = queue.pending.lock().expect("queue lock").take(TELL_MAX);
            if out.is_empty() {
                break;
            }
            let Some(me) = peers.upgrade() else {
                return;
            };
            let sent = match me.addr_of(&peer) {
                Some(addr) => {
                    missing_since = None;
                    let request = encode_request(TELL, &me.me, &encode_tell(&out));
                    matches!(
                        tokio::time::timeout(CALL_TIMEOUT, me.call(addr, request)).await,
                        Ok(Ok(_))
                    )
                }
                // Not in the view (yet, or for a moment); gone for good after a while.
                None => {
                    let since = *missing_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed().as_millis() as u64 >= sharing::FORGET_AFTER_MS {
                        let mut queues = me.queues.lock().expect("queues lock");
                        if queues.get(&peer).is_some_and(|q| Arc::ptr_eq(q, &queue)) {
                            queues.remove(&peer);
                        }
                        return;
                    }
                    false
                }
            };
            drop(me);
            last = Some(tokio::time::Instant::now());
            if sent {
                failures = 0;
                continue;
            }
            queue.pending.lock().expect("queue lock").merge(out);
            failures = failures.saturating_add(1);
            let wait = Duration::from_millis(10 << failures.min(8)).min(Duration::from_secs(2));
            tracing::debug!(%peer, failures, "changes not delivered; retrying");
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stopping.wait_for(|s| *s) => return,
            }
        }
    }
}

/// A random incarnation number for this process's peer endpoint.
fn random_epoch() -> u64 {
    use aws_lc_rs::rand::SecureRandom as _;
    let mut b = [0u8; 8];
    if aws_lc_rs::rand::SystemRandom::new().fill(&mut b).is_err() {
        // Never expected; the clock tells incarnations apart well enough then.
        return crate::node::now_ms();
    }
    u64::from_be_bytes(b)
}

/// `!tell`'s message: each name with a one-byte tag (`g` a log that grew, `s` a snapshot
/// key), ended by NUL (store keys never hold one).
fn encode_tell(o: &Outgoing) -> Vec<u8> {
    let mut out = Vec::new();
    for (tag, names) in [(b'g', &o.logs), (b's', &o.keys)] {
        for n in names {
            out.push(tag);
            out.extend_from_slice(n.as_bytes());
            out.push(0);
        }
    }
    out
}

fn decode_tell(bytes: &[u8]) -> Option<Outgoing> {
    let mut o = Outgoing::default();
    if bytes.is_empty() {
        return Some(o);
    }
    let body = bytes.strip_suffix(&[0])?;
    for part in body.split(|b| *b == 0) {
        let (tag, name) = part.split_first()?;
        let name = std::str::from_utf8(name).ok()?.to_owned();
        if name.is_empty() {
            return None;
        }
        match tag {
            b'g' => o.logs.insert(name),
            b's' => o.keys.insert(name),
            _ => return None,
        };
    }
    Some(o)
}

/// `!interest`'s message: epoch and version (8 bytes each, big-endian), then the keys,
/// each ended by NUL.
fn encode_interest(epoch: u64, version: u64, keys: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + keys.iter().map(|k| k.len() + 1).sum::<usize>());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&version.to_be_bytes());
    for k in keys {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
    }
    out
}

fn decode_interest(bytes: &[u8]) -> Option<(u64, u64, Vec<String>)> {
    let epoch = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
    let version = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
    let rest = &bytes[16..];
    let mut keys = Vec::new();
    if !rest.is_empty() {
        for k in rest.strip_suffix(&[0])?.split(|b| *b == 0) {
            let k = std::str::from_utf8(k).ok()?;
            if k.is_empty() {
                return None;
            }
            keys.push(k.to_owned());
        }
    }
    Some((epoch, version, keys))
}

fn encode_ack(ack: sharing::Ack) -> Vec<u8> {
    let mut out = ack.epoch.to_be_bytes().to_vec();
    out.push(u8::from(ack.fresh));
    out
}

fn decode_ack(bytes: &[u8]) -> Option<sharing::Ack> {
    let (epoch, fresh) = match bytes {
        [e @ .., f] if e.len() == 8 && *f <= 1 => (e, *f == 1),
        _ => return None,
    };
    Some(sharing::Ack {
        epoch: u64::from_be_bytes(epoch.try_into().ok()?),
        fresh,
    })
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

    #[test]
    fn tells_interests_and_acks_round_trip_and_garbage_is_refused() {
        let mut o = Outgoing::default();
        o.logs.insert("cases/t1".into());
        o.keys.insert("device/t1:a".into());
        o.keys.insert("customer/t1:x".into());
        assert_eq!(decode_tell(&encode_tell(&o)), Some(o));
        assert_eq!(decode_tell(b""), Some(Outgoing::default()));
        assert_eq!(decode_tell(b"gcases/t1"), None, "no terminator");
        assert_eq!(decode_tell(b"xcases/t1\0"), None, "unknown tag");
        assert_eq!(decode_tell(b"g\0"), None, "empty name");
        assert_eq!(decode_tell(b"g\xff\0"), None, "not UTF-8");

        let keys = vec!["device/t1:a".to_owned(), "device/t1:b".to_owned()];
        assert_eq!(
            decode_interest(&encode_interest(7, 3, &keys)),
            Some((7, 3, keys))
        );
        assert_eq!(
            decode_interest(&encode_interest(7, 0, &[])),
            Some((7, 0, vec![]))
        );
        assert_eq!(decode_interest(b"short"), None);
        let mut bad = encode_interest(7, 3, &[]);
        bad.extend_from_slice(b"a\0\0");
        assert_eq!(decode_interest(&bad), None, "empty key");

        let ack = sharing::Ack {
            epoch: u64::MAX - 1,
            fresh: true,
        };
        assert_eq!(decode_ack(&encode_ack(ack)), Some(ack));
        assert_eq!(decode_ack(b""), None, "a node not sharing answers nothing");
        assert_eq!(decode_ack(&[0; 9][..8]), None);
        assert_eq!(decode_ack(&[0, 0, 0, 0, 0, 0, 0, 0, 2]), None);
    }

    #[test]
    fn a_queue_sends_in_bounded_batches_and_takes_back_what_failed() {
        let mut q = Outgoing::default();
        for i in 0..5 {
            q.keys.insert(format!("device/t1:{i}"));
        }
        q.logs.insert("cases/t1".into());
        let first = q.take(4);
        assert_eq!((first.logs.len(), first.keys.len()), (1, 3), "logs first");
        assert_eq!(q.keys.len(), 2);
        q.keys.insert("device/t1:0".into()); // changed again meanwhile
        q.merge(first);
        assert_eq!((q.logs.len(), q.keys.len()), (1, 5), "a set: no duplicates");
    }
}
