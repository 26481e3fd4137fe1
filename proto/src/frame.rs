//! Framing of the edge sync: each frame is a protobuf varint length followed by that many
//! bytes of an encoded message (prost's length-delimited encoding).
//!
//! Pure codec, no I/O: the transport feeds received bytes into a [`FrameDecoder`] and
//! takes whole frames out, so a frame split across reads, or many frames in one read,
//! decode the same. A length above the session's limit is refused before anything is
//! buffered, so a peer cannot make the other side allocate without bound.

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
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge { len, max } => {
                write!(f, "frame of {len} bytes, the limit is {max}")
            }
            FrameError::Malformed(why) => write!(f, "malformed frame: {why}"),
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
