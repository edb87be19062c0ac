#![no_main]
//! Model files from disk: the GGUF header check never panics and never lets through a header
//! whose declared sizes do not fit the bytes (candle then reads only what the check passed).
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = swarm_gpu::check_gguf_bytes(data);
});
