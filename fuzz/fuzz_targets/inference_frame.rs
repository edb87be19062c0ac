#![no_main]
//! Frames on the inference stream between peers (requests and the chunks coming back): decoding
//! arbitrary bytes never panics.
use swarm_node::inference::{Chunk, WireRequest, decode_frame};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = decode_frame::<WireRequest>(data);
    let _ = decode_frame::<Chunk>(data);
});
