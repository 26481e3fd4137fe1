//! Framing of the edge sync: each frame is a protobuf varint length followed by that many
//! bytes of an encoded message (prost's length-delimited encoding).
//!
//! Pure codec, no I/O: the transport feeds received bytes into a [`FrameDecoder`] and
//! takes whole frames out, so a frame split across reads, or many frames in one read,
//! decode the same. A length above the session's limit is refused before anything is
//! buffered, so a peer cannot make the other side allocate without bound.

use crate::v1::{
    ClusterFrame, CompressedFrame, Compression, EdgeFrame, ErrorCode, cluster_frame, edge_frame,
};
use prost::Message;

/// The ALPN protocol name of the edge sync.
pub const ALPN: &[u8] = b"caretwin-sync/1";

/// Why a frame could not be decoded. The connection or stream should then be closed with
/// the matching `ErrorCode` (`FRAME_TOO_LARGE` or `MALFORMED_FRAME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix announces more than the limit.
    TooLarge {
        /// The announced length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// The length prefix or the message is not valid protobuf.
    Malformed(String),
    /// A compressed frame uses an algorithm the session did not agree on.
    UnsupportedCompression(i32),
}

impl FrameError {
    /// The protocol's code for this error, to send before resetting the stream.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::Malformed(_) => ErrorCode::MalformedFrame,
            FrameError::UnsupportedCompression(_) => ErrorCode::UnsupportedCompression,
        }
    }
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge { len, max } => {
                write!(f, "frame of {len} bytes, the limit is {max}")
            }
            FrameError::Malformed(why) => write!(f, "malformed frame: {why}"),
            FrameError::UnsupportedCompression(a) => {
                write!(f, "compression {a} was not agreed for this session")
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// Encodes `msg` as one frame.
pub fn encode<M: Message>(msg: &M) -> Vec<u8> {
    msg.encode_length_delimited_to_vec()
}

/// Reassembles frames from received bytes.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
}

impl FrameDecoder {
    /// A decoder refusing frames longer than `max` bytes (not counting the prefix).
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
        }
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Adds received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, if one has arrived. After an error the decoder must not be
    /// used again: the byte stream has lost its framing.
    pub fn next_frame<M: Message + Default>(&mut self) -> Result<Option<M>, FrameError> {
        let mut view: &[u8] = &self.buf;
        let len = match prost::encoding::decode_varint(&mut view) {
            Ok(len) => len,
            // Not enough bytes for the prefix yet (a varint is at most 10 bytes).
            Err(_) if self.buf.len() < 10 && self.buf.last().is_none_or(|b| b & 0x80 != 0) => {
                return Ok(None);
            }
            Err(e) => return Err(FrameError::Malformed(e.to_string())),
        };
        if len > self.max as u64 {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        let prefix = self.buf.len() - view.len();
        let end = prefix + len as usize;
        if self.buf.len() < end {
            return Ok(None);
        }
        let msg =
            M::decode(&self.buf[prefix..end]).map_err(|e| FrameError::Malformed(e.to_string()))?;
        self.buf.drain(..end);
        Ok(Some(msg))
    }
}

/// A frame envelope that can carry a [`CompressedFrame`]: [`EdgeFrame`] and
/// [`ClusterFrame`].
pub trait Envelope: Message + Default {
    /// The compressed payload, if this frame is one.
    fn compressed(&self) -> Option<&CompressedFrame>;
    /// A frame carrying `c`.
    fn wrap(c: CompressedFrame) -> Self;
}

impl Envelope for EdgeFrame {
    fn compressed(&self) -> Option<&CompressedFrame> {
        match &self.body {
            Some(edge_frame::Body::Compressed(c)) => Some(c),
            _ => None,
        }
    }
    fn wrap(c: CompressedFrame) -> Self {
        EdgeFrame {
            body: Some(edge_frame::Body::Compressed(c)),
        }
    }
}

impl Envelope for ClusterFrame {
    fn compressed(&self) -> Option<&CompressedFrame> {
        match &self.body {
            Some(cluster_frame::Body::Compressed(c)) => Some(c),
            _ => None,
        }
    }
    fn wrap(c: CompressedFrame) -> Self {
        ClusterFrame {
            body: Some(cluster_frame::Body::Compressed(c)),
        }
    }
}

/// Frames smaller than this are sent as they are: compressing them saves a few bytes at
/// the cost of a zstd call.
pub const COMPRESS_MIN_BYTES: usize = 512;

/// zstd level of the sync: the fastest of the standard levels. Reading batches repeat
/// device ids and signal names, which even level 1 removes (see the codec's tests).
const ZSTD_LEVEL: i32 = 1;

/// Compression of one stream's frames, in both directions: what the session agreed on,
/// with reusable zstd contexts. Pure computation, no I/O.
pub struct Codec {
    agreed: Compression,
    max: usize,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("agreed", &self.agreed)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl Codec {
    /// A codec for a session that agreed on `agreed` (from `Welcome.compression`) and whose
    /// frames are at most `max_frame_bytes` once decompressed.
    pub fn new(agreed: Compression, max_frame_bytes: usize) -> Self {
        Self {
            agreed,
            max: max_frame_bytes,
            compressor: None,
            decompressor: None,
        }
    }

    /// The agreed algorithm.
    pub fn agreed(&self) -> Compression {
        self.agreed
    }

    /// `msg` as one frame (length prefix included), compressed when the session agreed on
    /// compression, the frame is at least [`COMPRESS_MIN_BYTES`] long and compressing
    /// makes it smaller.
    pub fn encode<M: Envelope>(&mut self, msg: &M) -> Vec<u8> {
        debug_assert!(msg.compressed().is_none(), "a frame is compressed once");
        let plain = msg.encode_to_vec();
        if self.agreed != Compression::Zstd || plain.len() < COMPRESS_MIN_BYTES {
            return frame_of(&plain);
        }
        let compressor = match &mut self.compressor {
            Some(c) => c,
            None => match zstd::bulk::Compressor::new(ZSTD_LEVEL) {
                Ok(c) => self.compressor.insert(c),
                // No context (out of memory): the frame goes uncompressed, which is always
                // allowed.
                Err(_) => return frame_of(&plain),
            },
        };
        match compressor.compress(&plain) {
            Ok(payload) if payload.len() + 16 < plain.len() => encode(&M::wrap(CompressedFrame {
                algorithm: Compression::Zstd as i32,
                uncompressed_size: u32::try_from(plain.len()).unwrap_or(u32::MAX),
                payload: payload.into(),
            })),
            _ => frame_of(&plain),
        }
    }

    /// `msg` itself, or the frame inside it when it is a [`CompressedFrame`]. Refused: an
    /// algorithm the session did not agree on, a declared size over the limit, a payload
    /// that inflates to anything but its declared size, and a compressed frame inside a
    /// compressed frame.
    pub fn expand<M: Envelope>(&mut self, msg: M) -> Result<M, FrameError> {
        let Some(c) = msg.compressed() else {
            return Ok(msg);
        };
        if c.algorithm != self.agreed as i32 || self.agreed == Compression::None {
            return Err(FrameError::UnsupportedCompression(c.algorithm));
        }
        let size = c.uncompressed_size as usize;
        if size > self.max {
            return Err(FrameError::TooLarge {
                len: u64::from(c.uncompressed_size),
                max: self.max,
            });
        }
        let decompressor = match &mut self.decompressor {
            Some(d) => d,
            None => self.decompressor.insert(
                zstd::bulk::Decompressor::new()
                    .map_err(|e| FrameError::Malformed(format!("zstd context: {e}")))?,
            ),
        };
        // The output buffer is the declared size: a payload that inflates further fails
        // here instead of allocating more.
        let plain = decompressor
            .decompress(&c.payload, size)
            .map_err(|e| FrameError::Malformed(format!("zstd payload: {e}")))?;
        if plain.len() != size {
            return Err(FrameError::Malformed(format!(
                "zstd payload inflates to {} bytes, {size} declared",
                plain.len()
            )));
        }
        let inner =
            M::decode(plain.as_slice()).map_err(|e| FrameError::Malformed(e.to_string()))?;
        if inner.compressed().is_some() {
            return Err(FrameError::Malformed(
                "a compressed frame inside a compressed frame".into(),
            ));
        }
        Ok(inner)
    }
}

fn frame_of(plain: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(plain.len() + 5);
    prost::encoding::encode_varint(plain.len() as u64, &mut out);
    out.extend_from_slice(plain);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{EdgeFrame, Heartbeat, edge_frame::Body};

    fn heartbeat(n: i64) -> EdgeFrame {
        EdgeFrame {
            body: Some(Body::Heartbeat(Heartbeat {
                sent_at_ms: n,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn frames_split_and_joined_decode_the_same() {
        let mut bytes = Vec::new();
        for n in 0..50 {
            bytes.extend(encode(&heartbeat(n)));
        }
        // Byte by byte.
        let mut d = FrameDecoder::new(1024);
        let mut got = Vec::new();
        for b in &bytes {
            d.push(std::slice::from_ref(b));
            while let Some(f) = d.next_frame::<EdgeFrame>().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, (0..50).map(heartbeat).collect::<Vec<_>>());
        assert_eq!(d.buffered(), 0);
        // All at once.
        let mut d = FrameDecoder::new(1024);
        d.push(&bytes);
        let mut n = 0;
        while d.next_frame::<EdgeFrame>().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 50);
    }

    fn batch(devices: usize, per_device: u64) -> EdgeFrame {
        use crate::v1::{Reading, ReadingBatch};
        let readings = (0..devices)
            .flat_map(|d| {
                (1..=per_device).map(move |seq| Reading {
                    device_id: format!("t1:coffee-{d:04}"),
                    signal: "brew_pressure".into(),
                    value: 9.0 + (seq as f64 * 0.37).sin(),
                    device_time_ms: 1_790_000_000_000 + seq as i64 * 1000,
                    seq,
                    unit: None,
                })
            })
            .collect();
        EdgeFrame {
            body: Some(Body::Batch(ReadingBatch {
                batch_id: 7,
                readings,
            })),
        }
    }

    fn decode_one<M: Envelope>(bytes: &[u8], max: usize) -> M {
        let mut d = FrameDecoder::new(max);
        d.push(bytes);
        d.next_frame::<M>().unwrap().unwrap()
    }

    #[test]
    fn compressed_frames_round_trip_and_shrink() {
        let frame = batch(10, 100);
        let plain_len = encode(&frame).len();
        let mut tx = Codec::new(Compression::Zstd, 1 << 20);
        let mut rx = Codec::new(Compression::Zstd, 1 << 20);
        let bytes = tx.encode(&frame);
        // Reading batches repeat device ids and signal names: at least 3x smaller.
        assert!(
            bytes.len() * 3 < plain_len,
            "{} vs {plain_len}",
            bytes.len()
        );
        let wire: EdgeFrame = decode_one(&bytes, 1 << 20);
        assert!(wire.compressed().is_some());
        assert_eq!(rx.expand(wire).unwrap(), frame);
        // A small frame goes as it is, and expands to itself.
        let small = heartbeat(5);
        let bytes = tx.encode(&small);
        assert_eq!(bytes, encode(&small));
        assert_eq!(
            rx.expand(decode_one::<EdgeFrame>(&bytes, 1024)).unwrap(),
            small
        );
        // Without agreement nothing is compressed.
        let mut none = Codec::new(Compression::None, 1 << 20);
        assert_eq!(none.encode(&frame), encode(&frame));
    }

    #[test]
    fn compressed_frames_that_break_the_rules_are_refused() {
        let frame = batch(10, 100);
        let mut tx = Codec::new(Compression::Zstd, 1 << 20);
        let wire: EdgeFrame = decode_one(&tx.encode(&frame), 1 << 20);
        // Not agreed.
        let mut none = Codec::new(Compression::None, 1 << 20);
        let e = none.expand(wire.clone()).unwrap_err();
        assert_eq!(e.code(), ErrorCode::UnsupportedCompression);
        // Inflates beyond the session's limit: refused on the declared size.
        let mut small = Codec::new(Compression::Zstd, 1024);
        assert_eq!(
            small.expand(wire.clone()).unwrap_err().code(),
            ErrorCode::FrameTooLarge
        );
        // Declares less than it inflates to (a bomb in disguise).
        let mut lie = wire.compressed().unwrap().clone();
        lie.uncompressed_size = 100;
        let mut rx = Codec::new(Compression::Zstd, 1 << 20);
        assert_eq!(
            rx.expand(EdgeFrame::wrap(lie)).unwrap_err().code(),
            ErrorCode::MalformedFrame
        );
        // Garbage payload.
        let junk = CompressedFrame {
            algorithm: Compression::Zstd as i32,
            uncompressed_size: 64,
            payload: vec![0xAB; 40].into(),
        };
        assert_eq!(
            rx.expand(EdgeFrame::wrap(junk)).unwrap_err().code(),
            ErrorCode::MalformedFrame
        );
        // A compressed frame inside a compressed one.
        let inner = EdgeFrame::wrap(CompressedFrame::default()).encode_to_vec();
        let nested = CompressedFrame {
            algorithm: Compression::Zstd as i32,
            uncompressed_size: inner.len() as u32,
            payload: zstd::bulk::compress(&inner, 1).unwrap().into(),
        };
        assert_eq!(
            rx.expand(EdgeFrame::wrap(nested)).unwrap_err().code(),
            ErrorCode::MalformedFrame
        );
        // The codec still works after every refusal.
        assert_eq!(rx.expand(wire).unwrap(), frame);
    }

    #[test]
    fn oversized_and_malformed_frames_are_refused() {
        let big = {
            let mut v = Vec::new();
            prost::encoding::encode_varint(1 << 30, &mut v);
            v
        };
        let mut d2 = FrameDecoder::new(16);
        d2.push(&big);
        assert!(matches!(
            d2.next_frame::<EdgeFrame>(),
            Err(FrameError::TooLarge { .. })
        ));
        // A length prefix that never ends.
        let mut d3 = FrameDecoder::new(16);
        d3.push(&[0xff; 11]);
        assert!(matches!(
            d3.next_frame::<EdgeFrame>(),
            Err(FrameError::Malformed(_))
        ));
        // A body that is not an EdgeFrame.
        let mut d4 = FrameDecoder::new(16);
        d4.push(&[3, 0xff, 0xff, 0xff]);
        assert!(matches!(
            d4.next_frame::<EdgeFrame>(),
            Err(FrameError::Malformed(_))
        ));
    }
}
