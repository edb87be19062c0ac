#![no_main]
//! Config files from disk: parsing arbitrary text never panics.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = swarm_config::SwarmFile::from_json("fuzz.json", text);
        let _ = swarm_config::NodeConfig::from_toml("fuzz.toml", text, ".".into());
    }
});
