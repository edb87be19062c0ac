//! Agents as supervised actors (filled by later issues): ractor / ractor_cluster over QUIC
//! streams, placement, the task queue with anti-collision dispatch, SPARC workflows and memory
//! replication. It will own the `Inference` trait that agents call and `swarm-gpu` implements.
//!
//! - `cluster`: ractor_cluster sessions carried on one QUIC bidirectional stream per peer, the
//!   certificate-name check on every session, and the remotable router ([`ActorCluster`]).
//! - `replication`: CRDT memory between peers: delta pushes (optionally `w=2`), anti-entropy
//!   by digests, erasures and tombstone GC ([`Replicator`]).

mod cluster;
mod replication;

use serde::{Deserialize, Serialize};

pub use cluster::{
    ActorCluster, ClusterError, ROUTER_GROUP, RouterMsg, RpcError, STREAM_RACTOR,
    fuzz_login_name_check,
};
pub use replication::{
    RefusalHook, ReplError, ReplStats, Replicator, STREAM_ANTI_ENTROPY, STREAM_DELTAS,
    fuzz_decode_frames,
};

/// Priorities of the task queue (DESIGN §6), highest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Critical,
    High,
    Normal,
    Low,
    Background,
}
