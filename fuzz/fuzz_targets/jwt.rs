#![no_main]
//! Bearer tokens from the network: verification of arbitrary text never panics and never accepts.
use std::sync::OnceLock;

use swarm_node::jwt::Verifier;

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        Verifier::new(
            vec![key.verifying_key()],
            "swarm".into(),
            "swarm".into(),
            0,
            365 * 86_400,
        )
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        assert!(verifier().verify(text, 1).is_err(), "fuzzed token accepted");
    }
});
