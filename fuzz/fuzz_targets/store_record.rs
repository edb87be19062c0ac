#![no_main]
//! Memory records read back from disk: decoding arbitrary bytes never panics.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = swarm_storage::decode_record(data);
});
