//! The cluster's actor services: a ractor_cluster actor cluster whose sessions run over QUIC
//! streams between members, CRDT memory replication between peers, the memory service and
//! inference across the cluster.
//!
//! - `cluster`: ractor_cluster sessions carried on one QUIC bidirectional stream per peer, the
//!   certificate-name check on every session, and the remotable router ([`ActorCluster`]).
//! - `replication`: CRDT memory between peers: delta pushes (optionally `w=2`), anti-entropy
//!   by digests, erasures and tombstone GC ([`Replicator`]).
//! - `memory`: the [`Memory`] service, one memory operation as a whole (write, audit commit,
//!   push, outcome) for the gateway and agents.
//! - `inference`: the [`Inference`] trait agents and the gateway call, and its cluster
//!   implementation ([`ClusterInference`]): routing by load, the peer protocol's client and server.

pub mod agents;
mod cluster;
mod dispatch;
mod error;
pub mod inference;
mod memory;
pub mod replication;
pub mod stream;
pub mod tasks;

pub use cluster::{ActorCluster, ROUTER_GROUP, RouterMsg, spawn_sessions};
pub use dispatch::{Services, StreamService};
pub use error::Error;
pub use inference::{ClusterInference, Inference};
pub use memory::{Caller, Memory, Put, RefusalCodes};
pub use replication::protocol::Limits as RoundLimits;
pub use replication::{
    Duplex, FrameRx, FrameTx, MemIncoming, MemNet, MemPeers, Peers, RefusalHook, ReplStats,
    Replicator,
};
pub use stream::StreamKind;
// Fuzzing hooks into the frame decoders (feature `fuzzing`, for fuzz/; not an API).
#[cfg(feature = "fuzzing")]
pub use cluster::fuzz_login_name_check;
#[cfg(feature = "fuzzing")]
pub use inference::fuzz_decode_frames as fuzz_decode_inference_frames;
#[cfg(feature = "fuzzing")]
pub use replication::fuzz_decode_frames;
#[cfg(feature = "fuzzing")]
pub use tasks::wire::fuzz_decode_frames as fuzz_decode_task_frames;
