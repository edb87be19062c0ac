#![no_main]
//! Frames on the inference stream between peers (requests and the replies coming back): decoding
//! arbitrary bytes never panics.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    swarm_actors::fuzz_decode_inference_frames(data);
});
