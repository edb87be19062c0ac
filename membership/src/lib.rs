//! Cluster membership for swarm.
//!
//! - [`transport`](Endpoint): the QUIC endpoint (quinn + rustls, ring provider passed explicitly)
//!   with mutual TLS 1.3 against the cluster CA written by `swarm init`. A peer's identity is the
//!   node name in its certificate; connections from another CA, or to a peer whose certificate
//!   names another node, are refused.
//! - [`Gossip`]: SWIM (foca) driven sans-IO, with node metadata as versioned records and graceful
//!   leave, each signed by the node it is about and verified before it is applied; no sockets,
//!   no clock.
//! - [`Membership`]: the running service: one endpoint, foca packets on QUIC datagrams, one
//!   connection per peer, the member view as a watch channel, member events, incoming streams.
//! - [`MembershipError`]: the crate's one error type, with a stable [`kind`](MembershipError::kind).
//! - `sim` (feature `sim`): many [`Gossip`] members in one process with virtual time, loss, delay
//!   and partitions.

mod error;
mod faults;
mod gossip;
mod service;
#[cfg(feature = "sim")]
pub mod sim;
#[cfg(test)]
mod testpki;
mod transport;

use serde::{Deserialize, Serialize};

/// Lock a mutex, taking the data even if a panicking holder poisoned it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub use error::MembershipError;
pub use gossip::{
    FRAME_DOWN_DIGEST, FRAME_FOCA, FRAME_META, FRAME_META_REQUEST, FRAME_SUSPECT, Gossip,
    GossipSettings, MAX_META_BYTES, MAX_PACKET, MemberEvent, MemberInfo, NodeId,
};
pub use service::{IncomingStream, Membership, MembershipConfig, Refusal, Stats, View};
pub use transport::{
    ALPN, Accepted, Endpoint, PeerConnection, PendingPeer, TlsIdentity, cert_name,
};

/// What a node tells its peers about itself (kept small: the encoded record must fit
/// [`MAX_META_BYTES`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMeta {
    /// The gateway's address, as clients reach it.
    pub gateway: String,
    pub roles: Vec<String>,
    /// Accelerators and their memory.
    pub devices: Vec<DeviceMeta>,
    /// Requests in flight at the gateway.
    pub load: u32,
    /// The swarm version the node runs.
    pub version: String,
    /// Models this node serves now, with their engine load.
    pub models: Vec<ModelMeta>,
}

/// A model a node serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelMeta {
    pub name: String,
    /// Sequences running plus waiting.
    pub load: u32,
    /// Most sequences it runs at once.
    pub slots: u32,
}

/// One compute device a node offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMeta {
    /// `cpu` or `cuda`.
    pub kind: String,
    pub name: String,
    pub memory_total: u64,
    pub memory_free: u64,
}

/// The state of a member as the membership layer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    Alive,
    Suspect,
    Down,
    Left,
}
