//! QUIC glue of the edge sync, edge side: the client endpoint, the transport settings, the
//! connection to the cluster, and frames written to and read from streams.
//!
//! Frames are `caretwin_proto::frame`'s length-delimited protobuf; this module only moves
//! bytes between quinn streams and that pure codec. The cluster has the same frame helpers
//! in `caretwin_cluster::sync::transport`: the edge must not depend on the cluster, and the
//! protocol crate does no I/O.

use std::net::SocketAddr;
use std::time::Duration;

use caretwin_proto::frame::{FrameDecoder, FrameError, encode};
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};

/// Interval of QUIC keep-alive packets: keeps NAT bindings open on idle links (an edge is
/// usually behind one) and makes a silent cluster visible well within [`IDLE_TIMEOUT`].
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// A connection with nothing received for this long is closed. The cluster uses the same
/// value; QUIC takes the smaller of the two sides'.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// The connection could not be started (for example an invalid server name).
    #[error("cannot connect to {addr} as {server_name:?}: {source}")]
    Connect {
        /// The cluster's address.
        addr: SocketAddr,
        /// The name its certificate must carry.
        server_name: String,
        /// The cause.
        source: quinn::ConnectError,
    },
    /// The handshake failed (for example the cluster's certificate is not from the
    /// configured CA, or the cluster refused this site's) or the connection was lost.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to a stream failed.
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from a stream failed.
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadError),
    /// A received frame is too large or malformed.
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
}

/// Results of this module.
pub type Result<T, E = TransportError> = std::result::Result<T, E>;

/// The transport settings of the edge's connection: keep-alive, idle timeout, and no
/// streams opened by the cluster (the edge opens every stream), no datagrams.
pub fn client_transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .max_idle_timeout(Some(
            IDLE_TIMEOUT
                .try_into()
                .expect("idle timeout fits a quic varint"),
        ))
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(None);
    t
}

/// A client endpoint bound on `addr` (`0.0.0.0:0` or `[::]:0` usually) that dials with
/// `config` (from [`super::tls::client_config`]).
pub fn client_endpoint(addr: SocketAddr, config: quinn::ClientConfig) -> Result<Endpoint> {
    let mut endpoint =
        Endpoint::client(addr).map_err(|source| TransportError::Bind { addr, source })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Connects to the cluster at `addr`, whose certificate must name `server_name`.
///
/// With TLS 1.3 the edge finishes its handshake before the cluster has checked the site's
/// certificate, so a refused certificate may show only afterwards: as the connection
/// closing (`Connection::closed`) or as the first stream operation failing.
pub async fn connect(
    endpoint: &Endpoint,
    addr: SocketAddr,
    server_name: &str,
) -> Result<Connection> {
    let connecting =
        endpoint
            .connect(addr, server_name)
            .map_err(|source| TransportError::Connect {
                addr,
                server_name: server_name.to_owned(),
                source,
            })?;
    Ok(connecting.await?)
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
    /// A reader of `recv` refusing frames longer than `max_frame_bytes`.
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

    /// The stream, for example to `stop` it with an error code.
    pub fn stream(&mut self) -> &mut RecvStream {
        &mut self.recv
    }

    /// The stream back.
    pub fn into_inner(self) -> RecvStream {
        self.recv
    }
}
