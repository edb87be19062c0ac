//! Agents as supervised actors (filled by later issues): ractor / ractor_cluster over QUIC
//! streams, placement, the task queue with anti-collision dispatch, SPARC workflows and memory
//! replication. It will own the `Inference` trait that agents call and `swarm-gpu` implements.
//!
//! - `cluster`: ractor_cluster sessions carried on one QUIC bidirectional stream per peer, the
//!   certificate-name check on every session, and the remotable router ([`ActorCluster`]).

mod cluster;

use serde::{Deserialize, Serialize};

pub use cluster::{
    ActorCluster, ClusterError, ROUTER_GROUP, RouterMsg, RpcError, STREAM_RACTOR,
    fuzz_login_name_check,
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
