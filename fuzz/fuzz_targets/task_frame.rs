#![no_main]
//! Frames on a tasks stream between peers (forwarded submissions, stage runs and their text,
//! cancels, agent questions, relayed events, and the replies): decoding arbitrary bytes never
//! panics.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    swarm_actors::fuzz_decode_task_frames(data);
});
