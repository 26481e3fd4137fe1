//! The cluster's sync endpoint: QUIC sessions with edge sites, glued to [`Ingest`].
//!
//! Per connection: the handshake names the site from its client certificate; the first
//! bidirectional stream is the control stream (`Hello` → `Welcome`, heartbeats, command
//! status, and commands pushed from the site's durable command log as they appear); every
//! further bidirectional stream is a data stream whose device log frames are answered with
//! one `Ack` each, after the twins' writes are durable. A second connection of the same
//! site supersedes the first (which is closed with `SESSION_SUPERSEDED`).
//!
//! In a cluster the `Welcome` also lists the live members' sync addresses
//! ([`crate::membership::SyncAddrs`]), so edges learn every node they may move to. Any
//! node serves any site: the watermarks of a `Welcome` are read from the shared store,
//! so an edge that moves to another node resumes exactly where its twins stand.

use super::transport::{FrameReader, TransportError, accept_site};
use crate::error::{Error, Result};
use crate::ingest::{CommandSignals, Ingest, SiteId};
use caretwin_actors::host::clock::Clock;
use caretwin_proto::frame::Codec;
use caretwin_proto::v1::{
    ClusterFrame, Compression, EdgeFrame, ErrorCode, SyncError, cluster_frame, edge_frame,
};
use quinn::{Connection, Endpoint, SendStream, VarInt};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tracing::Instrument;

/// What every session of this node shares.
pub struct SyncServer {
    ingest: Arc<Ingest>,
    signals: Arc<CommandSignals>,
    clock: Arc<dyn Clock>,
    sessions: Mutex<HashMap<String, Connection>>,
    next_session: AtomicU64,
    /// The cluster's members' sync addresses, told to edges; unset on a single node.
    members: std::sync::OnceLock<Arc<crate::membership::SyncAddrs>>,
}

fn close_code(code: ErrorCode) -> VarInt {
    VarInt::from_u32(code as u32)
}

fn error_frame(code: ErrorCode, message: &str) -> ClusterFrame {
    ClusterFrame {
        body: Some(cluster_frame::Body::Error(SyncError {
            code: code as i32,
            message: message.to_owned(),
            ..Default::default()
        })),
    }
}

impl SyncServer {
    /// A server over `ingest`, woken for commands by `signals`.
    pub fn new(
        ingest: Arc<Ingest>,
        signals: Arc<CommandSignals>,
        clock: Arc<dyn Clock>,
    ) -> Arc<Self> {
        Arc::new(Self {
            ingest,
            signals,
            clock,
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            members: std::sync::OnceLock::new(),
        })
    }

    /// Lists `members`' sync addresses in every `Welcome` from now on (a cluster member's
    /// server; set once, before serving).
    pub fn tell_members(&self, members: Arc<crate::membership::SyncAddrs>) {
        if self.members.set(members).is_err() {
            tracing::warn!("the members' sync addresses were already set; kept the first");
        }
    }

    /// Sites connected now.
    pub fn live_sites(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .sessions
            .lock()
            .expect("sessions lock")
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Accepts sites on `endpoint` until `shutdown` resolves, then closes every session.
    pub async fn serve(self: Arc<Self>, endpoint: Endpoint, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let me = self.clone();
                    tasks.spawn(async move { me.connection(incoming).await });
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        endpoint.close(VarInt::from_u32(0), b"node shutting down");
        while tasks.join_next().await.is_some() {}
        // Let the close frames go out; a peer that vanished without a word would otherwise
        // hold the drain for its whole idle timeout.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), endpoint.wait_idle()).await;
    }

    async fn connection(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let (conn, identity) = match accept_site(incoming).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(%remote, error = %e, "site refused");
                return;
            }
        };
        let site = SiteId {
            site: identity.as_str().to_owned(),
        };
        let session = format!(
            "{}-{}",
            site.site,
            self.next_session.fetch_add(1, Ordering::Relaxed)
        );
        let span = tracing::info_span!("session", site = %site.site, %session);
        self.clone()
            .session(conn, site, session)
            .instrument(span)
            .await;
    }

    async fn session(self: Arc<Self>, conn: Connection, site: SiteId, session: String) {
        if let Some(old) = self
            .sessions
            .lock()
            .expect("sessions lock")
            .insert(site.site.clone(), conn.clone())
        {
            old.close(
                close_code(ErrorCode::SessionSuperseded),
                b"a newer session of this site",
            );
        }
        tracing::info!("site connected");
        let result = self.run_session(&conn, &site, &session).await;
        {
            let mut sessions = self.sessions.lock().expect("sessions lock");
            if sessions
                .get(&site.site)
                .is_some_and(|c| c.stable_id() == conn.stable_id())
            {
                sessions.remove(&site.site);
            }
        }
        match result {
            Ok(()) => tracing::info!("site disconnected"),
            Err(e) => tracing::info!(reason = %e, "session ended"),
        }
    }

    async fn run_session(&self, conn: &Connection, site: &SiteId, session: &str) -> Result<()> {
        let max = self.ingest.limits().max_frame_bytes as usize;
        let (send, recv) = conn.accept_bi().await.map_err(TransportError::from)?;
        let mut reader = FrameReader::new(recv, max);
        // Until the Welcome is out nothing is agreed: the first frames go uncompressed.
        let control = tokio::sync::Mutex::new((send, Codec::new(Compression::None, max)));
        let hello = match reader.next::<EdgeFrame>().await? {
            Some(EdgeFrame {
                body: Some(edge_frame::Body::Hello(h)),
            }) => h,
            _ => {
                let e = error_frame(
                    ErrorCode::ProtocolViolation,
                    "the first frame must be Hello",
                );
                send_control(&control, &e).await?;
                conn.close(close_code(ErrorCode::ProtocolViolation), b"no hello");
                return Err(Error::Session("no Hello".into()));
            }
        };
        let now = self.clock.now_ms();
        let mut welcome = match self.ingest.hello(site, session, &hello, now).await {
            Ok(w) => w,
            Err(e) => {
                let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Internal);
                let message = e.message.clone();
                let frame = ClusterFrame {
                    body: Some(cluster_frame::Body::Error(e)),
                };
                send_control(&control, &frame).await?;
                conn.close(close_code(code), b"hello refused");
                return Err(Error::Session(format!("hello refused: {message}")));
            }
        };
        if let Some(members) = self.members.get() {
            welcome.sync_addrs = members.get();
        }
        let agreed = Compression::try_from(welcome.compression).unwrap_or(Compression::None);
        let welcome = ClusterFrame {
            body: Some(cluster_frame::Body::Welcome(welcome)),
        };
        send_control(&control, &welcome).await?;
        control.lock().await.1 = Codec::new(agreed, max);
        tracing::info!(devices = hello.devices.len(), compression = ?agreed, "session open");

        let commands = self.push_commands(&control, site.clone(), hello.last_command_position);
        let control_loop = self.control_loop(&control, reader, site, Codec::new(agreed, max));
        let data = self.data_streams(conn, site, max, agreed);
        tokio::select! {
            r = commands => r,
            r = control_loop => r,
            r = data => r,
        }
    }

    /// Sends the site's commands after `position`, then each new one as it is logged.
    async fn push_commands(
        &self,
        control: &tokio::sync::Mutex<(SendStream, Codec)>,
        site: SiteId,
        mut position: u64,
    ) -> Result<()> {
        let signal = self.signals.of(&site.site);
        loop {
            // Register for the wake-up before reading, so an append in between is not missed.
            let notified = signal.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (frames, last) = self
                .ingest
                .commands_after(&site, position, self.clock.now_ms())
                .await?;
            if !frames.is_empty() {
                let mut guard = control.lock().await;
                let (send, codec) = &mut *guard;
                for f in &frames {
                    send.write_all(&codec.encode(f))
                        .await
                        .map_err(TransportError::from)?;
                }
                tracing::debug!(count = frames.len(), "commands sent");
            }
            position = last;
            notified.await;
        }
    }

    async fn control_loop(
        &self,
        control: &tokio::sync::Mutex<(SendStream, Codec)>,
        mut reader: FrameReader,
        site: &SiteId,
        mut codec: Codec,
    ) -> Result<()> {
        // Three heartbeat intervals of silence: the edge is gone (its process died, or the
        // path did), whatever QUIC's own idle timer says.
        let silence = std::time::Duration::from_millis(
            3 * self.ingest.limits().heartbeat_interval_ms.max(1) as u64,
        );
        loop {
            let Ok(next) = tokio::time::timeout(silence, reader.next::<EdgeFrame>()).await else {
                return Err(Error::Session(format!(
                    "no frame from the edge for {silence:?}"
                )));
            };
            let Some(frame) = next? else { return Ok(()) };
            let frame = match codec.expand(frame) {
                Ok(f) => f,
                Err(e) => {
                    send_control(control, &error_frame(e.code(), &e.to_string())).await?;
                    return Err(Error::Session(e.to_string()));
                }
            };
            if let Some(reply) = self
                .ingest
                .control_frame(site, frame, self.clock.now_ms())
                .await
            {
                send_control(control, &reply).await?;
            }
        }
    }

    /// Serves every data stream the edge opens; returns when the connection ends.
    async fn data_streams(
        &self,
        conn: &Connection,
        site: &SiteId,
        max: usize,
        agreed: Compression,
    ) -> Result<()> {
        let window = self.ingest.limits().max_in_flight_frames.clamp(1, 64) as usize;
        let mut streams = tokio::task::JoinSet::new();
        loop {
            let (send, recv) = conn.accept_bi().await.map_err(TransportError::from)?;
            let stream = DataStream {
                ingest: self.ingest.clone(),
                site: site.clone(),
                max,
                window,
                agreed,
            };
            streams.spawn(stream.serve(send, recv));
            // Reap finished streams as we go, so a long session does not keep them all.
            while streams.try_join_next().is_some() {}
        }
    }
}

/// One data stream of a session.
struct DataStream {
    ingest: Arc<Ingest>,
    site: SiteId,
    max: usize,
    window: usize,
    agreed: Compression,
}

impl DataStream {
    /// Reads frames while the previous ones are applied (up to `window` ahead), applies
    /// them one at a time in arrival order — a device's items are on one stream, so its log
    /// stays in order — and answers each with its ack. A frame that cannot be read is
    /// answered with its code after the acks of every frame before it, and the stream is
    /// reset; the session and its other streams carry on.
    async fn serve(self, mut send: SendStream, recv: quinn::RecvStream) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<EdgeFrame>(self.window);
        let mut reader = FrameReader::new(recv, self.max);
        let read = async {
            let mut codec = Codec::new(self.agreed, self.max);
            let refused = loop {
                let frame = match reader.next::<EdgeFrame>().await {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break None,
                    Err(TransportError::Frame(e)) => break Some((e.code(), e.to_string())),
                    Err(e @ TransportError::Truncated { .. }) => {
                        break Some((ErrorCode::MalformedFrame, e.to_string()));
                    }
                    // The connection went away: nothing to answer.
                    Err(e) => {
                        tracing::debug!(error = %e, "data stream ended");
                        return None;
                    }
                };
                match codec.expand(frame) {
                    Ok(frame) => {
                        if tx.send(frame).await.is_err() {
                            return None;
                        }
                    }
                    Err(e) => break Some((e.code(), e.to_string())),
                }
            };
            drop(tx);
            refused.map(|r| (r, reader))
        };
        let apply = async {
            let mut codec = Codec::new(self.agreed, self.max);
            while let Some(frame) = rx.recv().await {
                let reply = self.ingest.data_frame(&self.site, frame).await;
                if send.write_all(&codec.encode(&reply)).await.is_err() {
                    return false;
                }
            }
            true
        };
        let (refused, writable) = tokio::join!(read, apply);
        match refused {
            Some(((code, message), mut reader)) if writable => {
                let frame = error_frame(code, &message);
                let _ = send.write_all(&caretwin_proto::frame::encode(&frame)).await;
                let _ = send.finish();
                reader.stream().stop(close_code(code)).ok();
                tracing::warn!(code = ?code, %message, "data stream refused");
            }
            None if writable => {
                let _ = send.finish();
            }
            _ => {}
        }
    }
}

async fn send_control(
    control: &tokio::sync::Mutex<(SendStream, Codec)>,
    frame: &ClusterFrame,
) -> Result<()> {
    let mut guard = control.lock().await;
    let (send, codec) = &mut *guard;
    send.write_all(&codec.encode(frame))
        .await
        .map_err(TransportError::from)?;
    Ok(())
}
