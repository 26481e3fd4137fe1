//! The cluster's sync endpoint: QUIC sessions with edge sites, glued to [`Ingest`].
//!
//! Per connection: the handshake names the site from its client certificate; the first
//! bidirectional stream is the control stream (`Hello` → `Welcome`, heartbeats, command
//! status, and commands pushed from the site's durable command log as they appear); every
//! further bidirectional stream is a data stream whose device log frames are answered with
//! one `Ack` each, after the twins' writes are durable. A second connection of the same
//! site supersedes the first (which is closed with `SESSION_SUPERSEDED`).

use super::transport::{FrameReader, accept_site, send_frame};
use crate::ingest::{CommandSignals, Ingest, SiteId};
use caretwin_actors::host::clock::Clock;
use caretwin_proto::v1::{
    ClusterFrame, EdgeFrame, ErrorCode, SyncError, cluster_frame, edge_frame,
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
        })
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

    async fn run_session(
        &self,
        conn: &Connection,
        site: &SiteId,
        session: &str,
    ) -> anyhow::Result<()> {
        let max = self.ingest.limits().max_frame_bytes as usize;
        let (send, recv) = conn.accept_bi().await?;
        let control = Arc::new(tokio::sync::Mutex::new(send));
        let mut reader = FrameReader::new(recv, max);
        let hello = match reader.next::<EdgeFrame>().await? {
            Some(EdgeFrame {
                body: Some(edge_frame::Body::Hello(h)),
            }) => h,
            _ => {
                let e = error_frame(
                    ErrorCode::ProtocolViolation,
                    "the first frame must be Hello",
                );
                send_frame(&mut *control.lock().await, &e).await?;
                conn.close(close_code(ErrorCode::ProtocolViolation), b"no hello");
                anyhow::bail!("no Hello");
            }
        };
        let now = self.clock.now_ms();
        let welcome = match self.ingest.hello(site, session, &hello, now).await {
            Ok(w) => w,
            Err(e) => {
                let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Internal);
                let frame = ClusterFrame {
                    body: Some(cluster_frame::Body::Error(e)),
                };
                send_frame(&mut *control.lock().await, &frame).await?;
                conn.close(close_code(code), b"hello refused");
                anyhow::bail!("hello refused");
            }
        };
        let welcome = ClusterFrame {
            body: Some(cluster_frame::Body::Welcome(welcome)),
        };
        send_frame(&mut *control.lock().await, &welcome).await?;
        tracing::info!(devices = hello.devices.len(), "session open");

        let commands =
            self.push_commands(control.clone(), site.clone(), hello.last_command_position);
        let control_loop = self.control_loop(control.clone(), reader, site);
        let data = self.data_streams(conn, site, max);
        tokio::select! {
            r = commands => r,
            r = control_loop => r,
            r = data => r,
        }
    }

    /// Sends the site's commands after `position`, then each new one as it is logged.
    async fn push_commands(
        &self,
        control: Arc<tokio::sync::Mutex<SendStream>>,
        site: SiteId,
        mut position: u64,
    ) -> anyhow::Result<()> {
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
                let mut send = control.lock().await;
                for f in &frames {
                    send_frame(&mut send, f).await?;
                }
                tracing::debug!(count = frames.len(), "commands sent");
            }
            position = last;
            notified.await;
        }
    }

    async fn control_loop(
        &self,
        control: Arc<tokio::sync::Mutex<SendStream>>,
        mut reader: FrameReader,
        site: &SiteId,
    ) -> anyhow::Result<()> {
        // Three heartbeat intervals of silence: the edge is gone (its process died, or the
        // path did), whatever QUIC's own idle timer says.
        let silence = std::time::Duration::from_millis(
            3 * self.ingest.limits().heartbeat_interval_ms.max(1) as u64,
        );
        loop {
            let Ok(next) = tokio::time::timeout(silence, reader.next::<EdgeFrame>()).await else {
                anyhow::bail!("no frame from the edge for {silence:?}");
            };
            let Some(frame) = next? else { return Ok(()) };
            if let Some(reply) = self
                .ingest
                .control_frame(site, frame, self.clock.now_ms())
                .await
            {
                send_frame(&mut *control.lock().await, &reply).await?;
            }
        }
    }

    /// Serves every data stream the edge opens; returns when the connection ends.
    async fn data_streams(
        &self,
        conn: &Connection,
        site: &SiteId,
        max: usize,
    ) -> anyhow::Result<()> {
        let mut streams = tokio::task::JoinSet::new();
        loop {
            let (mut send, recv) = conn.accept_bi().await?;
            let ingest = self.ingest.clone();
            let site = site.clone();
            streams.spawn(async move {
                let mut reader = FrameReader::new(recv, max);
                loop {
                    match reader.next::<EdgeFrame>().await {
                        Ok(Some(frame)) => {
                            let reply = ingest.data_frame(&site, frame).await;
                            if send_frame(&mut send, &reply).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => {
                            let _ = send.finish();
                            return;
                        }
                        Err(e) => {
                            use super::transport::TransportError;
                            let code = match &e {
                                TransportError::Frame(
                                    caretwin_proto::frame::FrameError::TooLarge { .. },
                                ) => ErrorCode::FrameTooLarge,
                                TransportError::Frame(_) | TransportError::Truncated { .. } => {
                                    ErrorCode::MalformedFrame
                                }
                                // The connection went away: nothing to answer.
                                _ => {
                                    tracing::debug!(error = %e, "data stream ended");
                                    return;
                                }
                            };
                            let _ = send_frame(&mut send, &error_frame(code, &e.to_string())).await;
                            let _ = send.finish();
                            reader.stream().stop(close_code(code)).ok();
                            tracing::warn!(error = %e, "data stream refused");
                            return;
                        }
                    }
                }
            });
        }
    }
}
