//! The streams peers open to each other: every kind in one enum, one frame codec for all.
//!
//! A peer opens a bidirectional QUIC stream on the mutually authenticated connection and writes
//! one byte, its [`StreamKind`]; the accepting node hands the stream to the service of that kind
//! ([`crate::Services::dispatch`]). After the kind byte every protocol but ractor's own speaks
//! frames: a 4-byte big-endian length and a body of at most [`MAX_FRAME`] bytes
//! (tokio-util's `LengthDelimitedCodec`). A frame over the limit fails the stream before its body
//! is read, so a peer cannot make this node allocate more than one frame's worth.

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::Error;

/// Largest frame body on any stream. Replication sends its entries in chunks well below this
/// ([`crate::replication`]), inference one request or text chunk per frame.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// What a stream carries, named by the byte its opener writes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StreamKind {
    /// A ractor_cluster session (ractor's own framing).
    Ractor = 1,
    /// A long-lived stream of pushed memory deltas and their acknowledgements.
    Deltas = 2,
    /// One anti-entropy round.
    AntiEntropy = 3,
    /// One inference request and its chunks.
    Inference = 4,
    /// One task-service call (a forwarded submission, a stage run on an agent's home node and
    /// its text, a cancel, an agent query, a batch of events). JSON bodies: task records carry
    /// free-form JSON context, which postcard cannot encode.
    Tasks = 5,
}

impl StreamKind {
    pub const ALL: [StreamKind; 5] = [
        StreamKind::Ractor,
        StreamKind::Deltas,
        StreamKind::AntiEntropy,
        StreamKind::Inference,
        StreamKind::Tasks,
    ];

    /// The byte on the wire.
    pub fn byte(self) -> u8 {
        self as u8
    }

    /// The kind a byte names, if any.
    pub fn from_byte(b: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.byte() == b)
    }

    /// For logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            StreamKind::Ractor => "ractor",
            StreamKind::Deltas => "deltas",
            StreamKind::AntiEntropy => "anti_entropy",
            StreamKind::Inference => "inference",
            StreamKind::Tasks => "tasks",
        }
    }
}

/// The one frame codec: u32 big-endian length, then the body; bodies over `max` are refused.
pub fn codec(max: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .big_endian()
        .max_frame_length(max)
        .new_codec()
}

/// The receiving half of a framed stream.
pub struct FrameReader<R> {
    inner: FramedRead<R, LengthDelimitedCodec>,
    peer: String,
}

impl<R> std::fmt::Debug for FrameReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReader").finish_non_exhaustive()
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(read: R, peer: &str) -> Self {
        Self::with_max(read, peer, MAX_FRAME)
    }

    pub fn with_max(read: R, peer: &str, max: usize) -> Self {
        Self {
            inner: FramedRead::new(read, codec(max)),
            peer: peer.to_string(),
        }
    }

    /// The next frame; `None` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<BytesMut>, Error> {
        match self.inner.next().await {
            None => Ok(None),
            Some(Ok(b)) => Ok(Some(b)),
            Some(Err(e)) => Err(Error::Stream {
                peer: self.peer.clone(),
                message: e.to_string(),
            }),
        }
    }

    /// The next frame decoded as `T` (postcard); `None` at a clean end of stream.
    /// The next frame as JSON (the task service's frames).
    pub async fn next_json<T: DeserializeOwned>(&mut self) -> Result<Option<T>, Error> {
        match self.next().await? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::Frame {
                    peer: self.peer.clone(),
                    message: e.to_string(),
                }),
        }
    }

    pub async fn next_msg<T: DeserializeOwned>(&mut self) -> Result<Option<T>, Error> {
        match self.next().await? {
            None => Ok(None),
            Some(b) => decode(&b).map(Some).map_err(|message| Error::Frame {
                peer: self.peer.clone(),
                message,
            }),
        }
    }
}

/// The sending half of a framed stream.
pub struct FrameWriter<W> {
    inner: FramedWrite<W, LengthDelimitedCodec>,
    peer: String,
}

impl<W> std::fmt::Debug for FrameWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameWriter").finish_non_exhaustive()
    }
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(write: W, peer: &str) -> Self {
        Self {
            inner: FramedWrite::new(write, codec(MAX_FRAME)),
            peer: peer.to_string(),
        }
    }

    /// Write one frame and flush it.
    pub async fn send(&mut self, frame: Bytes) -> Result<(), Error> {
        self.inner.send(frame).await.map_err(|e| Error::Stream {
            peer: self.peer.clone(),
            message: e.to_string(),
        })
    }

    /// Encode `msg` (postcard) and send it.
    /// Send `msg` as one JSON frame (the task service's frames).
    pub async fn send_json<T: Serialize>(&mut self, msg: &T) -> Result<(), Error> {
        let body = serde_json::to_vec(msg).map_err(|e| Error::Encode(e.to_string()))?;
        if body.len() > MAX_FRAME {
            return Err(Error::FrameTooLarge {
                size: body.len(),
                max: MAX_FRAME,
            });
        }
        self.send(Bytes::from(body)).await
    }

    pub async fn send_msg<T: Serialize>(&mut self, msg: &T) -> Result<(), Error> {
        self.send(encode(msg)?).await
    }

    /// The stream underneath (to finish or reset it).
    pub fn get_mut(&mut self) -> &mut W {
        self.inner.get_mut()
    }
}

/// A message as a frame body.
pub fn encode<T: Serialize>(msg: &T) -> Result<Bytes, Error> {
    let body = postcard::to_stdvec(msg).map_err(|e| Error::Encode(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(Error::FrameTooLarge {
            size: body.len(),
            max: MAX_FRAME,
        });
    }
    Ok(Bytes::from(body))
}

/// A frame body as a message; the error says what was wrong.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    postcard::from_bytes(body).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_byte() {
        for k in StreamKind::ALL {
            assert_eq!(StreamKind::from_byte(k.byte()), Some(k));
        }
        assert_eq!(StreamKind::from_byte(0), None);
        assert_eq!(StreamKind::from_byte(200), None);
    }

    #[tokio::test]
    async fn frames_round_trip_and_an_oversized_one_fails_the_stream() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut w = FrameWriter::new(a, "peer");
        let mut r = FrameReader::with_max(b, "peer", 1024);
        w.send_msg(&("hello".to_string(), 7u32))
            .await
            .expect("send");
        let got: (String, u32) = r.next_msg().await.expect("read").expect("a frame");
        assert_eq!(got, ("hello".to_string(), 7));
        // 2 KiB announced against a 1 KiB limit: refused from the length alone.
        w.send(Bytes::from(vec![0u8; 2048])).await.expect("send");
        assert!(matches!(r.next().await, Err(Error::Stream { .. })));
    }

    #[tokio::test]
    async fn garbage_is_a_frame_error_and_eof_is_none() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut w = FrameWriter::new(a, "peer");
        let mut r = FrameReader::new(b, "peer");
        w.send(Bytes::from_static(&[0xff, 0xff, 0xff]))
            .await
            .expect("send");
        assert!(matches!(
            r.next_msg::<(String, u64)>().await,
            Err(Error::Frame { .. })
        ));
        drop(w);
        assert!(r.next().await.expect("clean end").is_none());
    }
}
