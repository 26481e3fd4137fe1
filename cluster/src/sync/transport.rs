//! QUIC glue of the edge sync, cluster side: the endpoint, the transport settings, the
//! handshake that yields a site, and frames written to and read from streams.
//!
//! Frames are `caretwin_proto::frame`'s length-delimited protobuf; this module only moves
//! bytes between quinn streams and that pure codec. The session logic (which frame may
//! come when) lives elsewhere.
//!
//! The edge crate has the same frame helpers in `caretwin_edge::sync::transport`: the edge
//! must not depend on the cluster, and the protocol crate does no I/O.

use std::net::SocketAddr;
use std::time::Duration;

use caretwin_proto::frame::{FrameDecoder, FrameError, encode};
use quinn::{Connection, Endpoint, Incoming, RecvStream, SendStream, VarInt};

use super::tls::{SiteIdentity, TlsError, site_of};

/// Interval of QUIC keep-alive packets: keeps NAT bindings open on idle links and makes a
/// silent peer visible well within [`IDLE_TIMEOUT`].
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// A connection with nothing received for this long is closed. The edge uses the same
/// value; QUIC takes the smaller of the two sides'.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Bidirectional streams an edge may have open at once: the control stream plus data
/// streams. `SessionLimits.max_data_streams` must stay below this.
pub const MAX_EDGE_BIDI_STREAMS: u32 = 64;

/// Most bytes taken from a stream per read, so a peer announcing a huge frame is refused
/// after at most this much is buffered.
const READ_CHUNK: usize = 64 * 1024;

/// What can fail while moving frames or setting up connections.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The UDP socket could not be bound.
    #[error("cannot bind quic endpoint on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The handshake failed or the connection was lost.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to a stream failed.
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from a stream failed.
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadError),
    /// A received frame is too large or malformed. Answer with `FRAME_TOO_LARGE` or
    /// `MALFORMED_FRAME` and reset the stream.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({buffered} bytes pending)")]
    Truncated {
        /// Bytes of the unfinished frame.
        buffered: usize,
    },
    /// A [`FrameReader`] was used again after it failed; its stream has lost its framing.
    #[error("frame reader used after an error")]
    ReaderFailed,
    /// The peer's identity could not be established.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Results of this module.
pub type Result<T, E = TransportError> = std::result::Result<T, E>;

/// The transport settings of the sync endpoint: keep-alive, idle timeout, and streams as
/// the protocol uses them (bidirectional, opened by the edge; no unidirectional streams,
/// no datagrams).
pub fn server_transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .max_idle_timeout(Some(
            IDLE_TIMEOUT
                .try_into()
                .expect("idle timeout fits a quic varint"),
        ))
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_EDGE_BIDI_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(None);
    t
}

/// Receive buffer asked of the kernel for the sync socket. Many sites handshaking at once
/// overflow the default (~208 KiB on Linux) and QUIC then waits out its retry timers; the
/// kernel caps the request at `net.core.rmem_max`, which operators should raise to match.
pub const RECV_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// Binds the sync endpoint on `addr` (port 0 picks a free port) and returns it with the
/// address it is bound to.
pub fn bind(addr: SocketAddr, config: quinn::ServerConfig) -> Result<(Endpoint, SocketAddr)> {
    let bind_err = |source| TransportError::Bind { addr, source };
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
        .map_err(bind_err)?;
    if let Err(e) = socket.set_recv_buffer_size(RECV_BUFFER_BYTES) {
        tracing::warn!(error = %e, "could not enlarge the sync socket's receive buffer");
    }
    socket.bind(&addr.into()).map_err(bind_err)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| bind_err(std::io::Error::other("no async runtime for quinn")))?;
    let endpoint = Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket.into(),
        runtime,
    )
    .map_err(bind_err)?;
    let local = endpoint.local_addr().map_err(bind_err)?;
    Ok((endpoint, local))
}

/// Completes the handshake of an incoming connection and names its site from the client
/// certificate. A connection whose certificate names no valid site is closed with the
/// application code `ErrorCode::UNAUTHENTICATED` (10).
pub async fn accept_site(incoming: Incoming) -> Result<(Connection, SiteIdentity)> {
    let conn = incoming.await?;
    match site_of(&conn) {
        Ok(site) => Ok((conn, site)),
        Err(e) => {
            let code = caretwin_proto::v1::ErrorCode::Unauthenticated as u32;
            conn.close(
                VarInt::from_u32(code),
                b"client certificate names no valid site",
            );
            Err(e.into())
        }
    }
}

/// Writes `msg` as one frame.
pub async fn send_frame<M: prost::Message>(send: &mut SendStream, msg: &M) -> Result<()> {
    send.write_all(&encode(msg)).await?;
    Ok(())
}

/// Reads frames from a stream.
#[derive(Debug)]
pub struct FrameReader {
    recv: RecvStream,
    decoder: FrameDecoder,
    failed: bool,
}

impl FrameReader {
    /// A reader of `recv` refusing frames longer than `max_frame_bytes` (the session's
    /// `SessionLimits.max_frame_bytes`).
    pub fn new(recv: RecvStream, max_frame_bytes: usize) -> Self {
        Self {
            recv,
            decoder: FrameDecoder::new(max_frame_bytes),
            failed: false,
        }
    }

    /// The next frame; `None` when the peer finished the stream cleanly between frames.
    /// A frame over the limit is refused as soon as its length prefix arrives. After an
    /// error the reader only returns [`TransportError::ReaderFailed`].
    pub async fn next<M: prost::Message + Default>(&mut self) -> Result<Option<M>> {
        if self.failed {
            return Err(TransportError::ReaderFailed);
        }
        let result = self.read_frame().await;
        self.failed = result.is_err();
        result
    }

    async fn read_frame<M: prost::Message + Default>(&mut self) -> Result<Option<M>> {
        loop {
            if let Some(msg) = self.decoder.next_frame()? {
                return Ok(Some(msg));
            }
            match self.recv.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.decoder.push(&chunk.bytes),
                None if self.decoder.buffered() == 0 => return Ok(None),
                None => {
                    return Err(TransportError::Truncated {
                        buffered: self.decoder.buffered(),
                    });
                }
            }
        }
    }

    /// The stream, for example to `stop` it with an error code after a refused frame.
    pub fn stream(&mut self) -> &mut RecvStream {
        &mut self.recv
    }

    /// The stream back.
    pub fn into_inner(self) -> RecvStream {
        self.recv
    }
}
