#![no_main]
//! Gossip datagrams from an authenticated peer: any bytes are refused or applied, never a panic,
//! and the state machine keeps working afterwards.
//! Wire format: META_REQUEST carries the asker's record-signing key, META a key plus a signed
//! record, and custom broadcasts are signed envelopes (see `membership/src/gossip.rs`); random
//! bytes never carry a valid signature, so this exercises decoding, refusal and the held-record
//! paths, not the applying of records.
use std::net::SocketAddr;

use swarm_membership::{Gossip, GossipSettings, NodeId, NodeMeta};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&sel, frame)) = data.split_first() else {
        return;
    };
    let me = NodeId {
        name: "node-1".into(),
        addr: SocketAddr::from(([127, 0, 0, 1], 7946)),
        incarnation: 1,
    };
    let Ok(mut g) = Gossip::new(me, NodeMeta::default(), &GossipSettings::default(), 1) else {
        return;
    };
    let from = ["node-2", "node-1", "", "mallory"][usize::from(sel % 4)];
    // Twice: the second frame meets whatever state the first left behind.
    let _ = g.handle_frame(from, frame);
    let _ = g.handle_frame(from, frame);
    g.tick();
    let _ = g.members();
    let _ = g.take_output();
    let _ = g.take_timers();
    let _ = g.take_events();
});
