#![no_main]
//! The login frames of an incoming actor session, in any chunking: refused or accepted, never a
//! panic.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let _ = swarm_actors::fuzz_login_name_check("node-2@swarm", rest, usize::from(chunk));
});
