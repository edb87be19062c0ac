//! The frames of an inference stream ([`crate::StreamKind::Inference`]), postcard bodies in the
//! crate's frame codec ([`crate::stream`]).
//!
//! The opener sends one [`super::Request`]. The server answers [`Reply::Accepted`] (or a
//! failed chunk), then text chunks and one `Done` or `Failed`, then ends its half. The opener
//! keeps its own sending half open, silent, while it reads: when that half ends (finished or
//! reset: its reader dropped the generation, or its node died) the server cancels the sequence.

use serde::{Deserialize, Serialize};

use super::Chunk;

/// What the server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Reply {
    /// The engine queued the request.
    Accepted { prompt_tokens: u32 },
    /// A piece of the generation; the stream ends after `Done` or `Failed`.
    Chunk(Chunk),
}

/// Decodes arbitrary bytes as each frame of the protocol (fuzz/: decoding never panics).
#[cfg(feature = "fuzzing")]
pub fn fuzz_decode_frames(data: &[u8]) {
    let _ = crate::stream::decode::<super::Request>(data);
    let _ = crate::stream::decode::<Reply>(data);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

    use super::super::{
        Failure, FailureCode, FinishReason, Input, Message, Request, Sampling, Usage,
    };
    use super::*;
    use crate::stream::{decode, encode};

    #[test]
    fn frames_round_trip_and_garbage_is_an_error() {
        let req = Request {
            model: "m".into(),
            input: Input::Chat(vec![Message {
                role: "user".into(),
                content: "hi".into(),
            }]),
            sampling: Sampling {
                max_tokens: Some(3),
                temperature: 0.0,
                seed: Some(1),
                stop: vec!["x".into()],
                ..Sampling::default()
            },
        };
        let body = encode(&req).unwrap();
        assert_eq!(decode::<Request>(&body), Ok(req));
        let replies = [
            Reply::Accepted { prompt_tokens: 7 },
            Reply::Chunk(Chunk::Text("tok".into())),
            Reply::Chunk(Chunk::Done(Usage {
                finish_reason: FinishReason::Stop,
                prompt_tokens: 7,
                completion_tokens: 2,
            })),
            Reply::Chunk(Chunk::Failed(Failure {
                code: FailureCode::InvalidField,
                field: Some("temperature".into()),
                message: "must be between 0 and 2".into(),
            })),
        ];
        for r in replies {
            let body = encode(&r).unwrap();
            assert_eq!(decode::<Reply>(&body), Ok(r));
        }
        assert!(decode::<Reply>(b"\xff\x00{").is_err());
        assert!(decode::<Request>(b"").is_err());
    }
}
