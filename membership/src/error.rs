//! The crate's one error type.
//!
//! Gossip (frame and record checks), transport (PEM, TLS, QUIC) and service failures share one
//! flat enum, so callers match on one type and metrics count by one stable [`kind`] string.
//!
//! [`kind`]: MembershipError::kind

use std::net::SocketAddr;

/// Why a membership operation, frame or connection failed. [`MembershipError::kind`] is stable
/// (logs, metrics, the refused-frame counters).
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    // Gossip: frames and commands refused by the SWIM state machine.
    #[error("empty frame")]
    Empty,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame of {size} bytes is over the {limit}-byte limit")]
    TooBig { size: usize, limit: usize },
    #[error("cannot decode frame: {0}")]
    Decode(String),
    #[error("peer `{peer}` claims to be `{claimed}`")]
    IdentityMismatch { peer: String, claimed: String },
    #[error("metadata is {size} bytes encoded; the limit is {limit}")]
    MetaTooLarge { size: usize, limit: usize },
    #[error("peer `{peer}` relayed a claim about `{about}` that `{about}` did not sign")]
    ForgedClaim { peer: String, about: String },
    #[error("cannot make the record-signing key: {0}")]
    KeyGen(String),
    #[error("gossip: {0}")]
    Foca(String),

    // Transport: the node's TLS identity and the QUIC endpoint.
    #[error("cannot read {path}: {message}")]
    Pem { path: String, message: String },
    #[error("certificate has no node name (DNS subject alternative name)")]
    NoName,
    #[error(
        "certificate carries {count} DNS subject alternative names; a node certificate must carry exactly one, its node name"
    )]
    SeveralNames { count: usize },
    #[error(
        "certificate's extended key usage lacks TLS client authentication: it is not a node certificate (a gateway's, say)"
    )]
    NotNodeCertificate,
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("cannot bind QUIC (UDP) to {addr}: {source} (is another node using this port?)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connect to {addr}: {message}")]
    Connect { addr: SocketAddr, message: String },
    #[error("peer {0} presented no certificate")]
    NoPeerCertificate(SocketAddr),

    // Service: the running membership task and its connections.
    #[error("no connection to `{0}`")]
    NoConnection(String),
    #[error("stream to `{peer}`: {message}")]
    Stream { peer: String, message: String },
    #[error("the membership service has stopped")]
    Stopped,
}

impl MembershipError {
    /// Stable short code for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            MembershipError::Empty => "empty",
            MembershipError::UnknownKind(_) => "unknown_kind",
            MembershipError::TooBig { .. } => "too_big",
            MembershipError::Decode(_) => "decode",
            MembershipError::IdentityMismatch { .. } => "identity_mismatch",
            MembershipError::MetaTooLarge { .. } => "meta_too_large",
            MembershipError::ForgedClaim { .. } => "forged_claim",
            MembershipError::KeyGen(_) => "keygen",
            MembershipError::Foca(_) => "foca",
            MembershipError::Pem { .. } => "pem",
            MembershipError::NoName => "no_name",
            MembershipError::SeveralNames { .. } => "several_names",
            MembershipError::NotNodeCertificate => "not_node_certificate",
            MembershipError::Tls(_) => "tls",
            MembershipError::Bind { .. } => "bind",
            MembershipError::Connect { .. } => "connect",
            MembershipError::NoPeerCertificate(_) => "no_peer_certificate",
            MembershipError::NoConnection(_) => "no_connection",
            MembershipError::Stream { .. } => "stream",
            MembershipError::Stopped => "stopped",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The codes are what metrics and logs have always counted (they predate this enum, when
    /// gossip, transport and service had one each): they must not change.
    #[test]
    fn kinds_are_stable_and_distinct() {
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let s = || "x".to_string();
        let all = [
            (MembershipError::Empty, "empty"),
            (MembershipError::UnknownKind(9), "unknown_kind"),
            (MembershipError::TooBig { size: 2, limit: 1 }, "too_big"),
            (MembershipError::Decode(s()), "decode"),
            (
                MembershipError::IdentityMismatch {
                    peer: s(),
                    claimed: s(),
                },
                "identity_mismatch",
            ),
            (
                MembershipError::MetaTooLarge { size: 2, limit: 1 },
                "meta_too_large",
            ),
            (
                MembershipError::ForgedClaim {
                    peer: s(),
                    about: s(),
                },
                "forged_claim",
            ),
            (MembershipError::KeyGen(s()), "keygen"),
            (MembershipError::Foca(s()), "foca"),
            (
                MembershipError::Pem {
                    path: s(),
                    message: s(),
                },
                "pem",
            ),
            (MembershipError::NoName, "no_name"),
            (MembershipError::SeveralNames { count: 2 }, "several_names"),
            (MembershipError::NotNodeCertificate, "not_node_certificate"),
            (MembershipError::Tls(s()), "tls"),
            (
                MembershipError::Bind {
                    addr,
                    source: std::io::ErrorKind::AddrInUse.into(),
                },
                "bind",
            ),
            (MembershipError::Connect { addr, message: s() }, "connect"),
            (
                MembershipError::NoPeerCertificate(addr),
                "no_peer_certificate",
            ),
            (MembershipError::NoConnection(s()), "no_connection"),
            (
                MembershipError::Stream {
                    peer: s(),
                    message: s(),
                },
                "stream",
            ),
            (MembershipError::Stopped, "stopped"),
        ];
        let mut seen = std::collections::HashSet::new();
        for (e, kind) in &all {
            assert_eq!(e.kind(), *kind, "{e}");
            assert!(seen.insert(*kind), "{kind} used twice");
        }
    }
}
