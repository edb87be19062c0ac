#![no_main]
//! Replication stream frames and deltas from a peer: any bytes decode or are refused, never a
//! panic.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = swarm_actors::fuzz_decode_frames(data);
    let _ = swarm_storage::decode_delta(data);
});
