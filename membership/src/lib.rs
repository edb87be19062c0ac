//! Cluster membership for swarm.
//!
//! - `transport`: the QUIC endpoint (quinn + rustls, ring provider passed explicitly) with mutual
//!   TLS 1.3 against the cluster CA written by `swarm init`. A peer's identity is the node name in
//!   its certificate; connections from another CA, or to a peer whose certificate names another
//!   node, are refused.
//! - Node metadata and member states ([`NodeMeta`], [`MemberState`]), which gossip will carry.
//!
//! SWIM membership over foca, the member view and the simulator come with the rest of the
//! cluster issue.

mod transport;

use serde::{Deserialize, Serialize};

pub use transport::{ALPN, Endpoint, PeerConnection, TlsIdentity, TransportError, cert_name};

/// What a node tells its peers about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMeta {
    pub name: String,
    /// The gateway's address, as clients reach it.
    pub gateway: String,
    pub roles: Vec<String>,
    pub version: String,
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
