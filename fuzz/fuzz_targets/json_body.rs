#![no_main]
//! Request bodies from the network: parsing arbitrary bytes never panics.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = swarm_node::gateway::parse_json::<serde_json::Value>(data);
});
