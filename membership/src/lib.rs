//! Cluster membership for swarm (filled by the cluster issue): the QUIC endpoint with mutual TLS
//! from the cluster CA, foca SWIM driven sans-IO over QUIC datagrams, and node metadata.
//!
//! Today it holds the node metadata that gossip will carry, so the gateway and later crates share
//! one definition.

use serde::{Deserialize, Serialize};

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
