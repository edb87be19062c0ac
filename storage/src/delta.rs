//! The unit of memory replication: one record of one key, in plaintext.
//!
//! A [`Delta`] travels only inside mutually authenticated TLS between peers; each replica seals
//! the value again under its own data keys when it applies it (see `MemoryStore::apply_delta`).
//! The wire form is postcard; [`decode_delta`] never panics, whatever the bytes.
//!
//! [`MemoryType`] lives here, not in `memory`, because a delta carries it: `memory` builds on
//! this module and this module never reaches back into `memory`.

use serde::{Deserialize, Serialize};

use crate::crdt::{Version, Versioned};
use crate::error::{Result, StorageError};

/// The kinds of agent memory, each with its default lifetime.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum MemoryType {
    /// Conversation state: expires after a day unless a TTL says otherwise.
    Session,
    /// Facts and knowledge: kept until deleted.
    #[default]
    Semantic,
    /// An agent's own state: kept until deleted (retention applies).
    Agent,
    /// Execution traces: expire after a week unless a TTL says otherwise.
    Trace,
}

impl MemoryType {
    pub fn default_ttl_ms(self) -> Option<u64> {
        match self {
            MemoryType::Session => Some(86_400_000),
            MemoryType::Trace => Some(7 * 86_400_000),
            MemoryType::Semantic | MemoryType::Agent => None,
        }
    }
}

/// A replicated change: the whole record of `namespace`/`key` at `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub namespace: String,
    pub key: String,
    pub version: Version,
    /// Wall-clock ms after which the value reads as absent; `None` never expires (and always
    /// `None` for a tombstone).
    pub expires_at: Option<u64>,
    /// `None` is a tombstone.
    pub value: Option<DeltaValue>,
}

/// The plaintext of a live value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeltaValue {
    /// The value as JSON text.
    pub value_json: String,
    pub memory_type: MemoryType,
    /// The data subject, whose key seals the value on every replica; else the namespace key.
    pub subject: Option<String>,
    pub tags: Vec<String>,
}

/// What [`apply_delta`](crate::MemoryStore::apply_delta) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApplyOutcome {
    /// The delta changed the replica.
    Applied,
    /// The replica already held this record or a newer one; nothing changed.
    Stale,
}

impl Delta {
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// The record as an LWW register (tombstones never expire).
    pub(crate) fn to_versioned(&self) -> Versioned<DeltaValue> {
        Versioned {
            version: self.version.clone(),
            expires_at: self.value.as_ref().and(self.expires_at),
            value: self.value.clone(),
        }
    }

    pub(crate) fn from_versioned(ns: &str, key: &str, rec: Versioned<DeltaValue>) -> Self {
        Delta {
            namespace: ns.to_string(),
            key: key.to_string(),
            version: rec.version,
            expires_at: rec.value.as_ref().and(rec.expires_at),
            value: rec.value,
        }
    }
}

/// The wire form of a delta.
pub fn encode_delta(d: &Delta) -> Result<Vec<u8>> {
    postcard::to_stdvec(d).map_err(|e| StorageError::Corrupt(format!("delta: {e}")))
}

/// Decode a delta from a peer; never panics on arbitrary bytes.
pub fn decode_delta(bytes: &[u8]) -> Result<Delta> {
    postcard::from_bytes(bytes).map_err(|e| StorageError::Corrupt(format!("delta: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;
    use proptest::prelude::*;

    fn delta() -> impl Strategy<Value = Delta> {
        (
            "[a-z]{1,8}",
            "[a-z0-9:_-]{1,16}",
            any::<u64>(),
            "[a-z0-9-]{0,12}",
            proptest::option::of(any::<u64>()),
            proptest::option::of((
                ".{0,40}",
                0u8..4,
                proptest::option::of("[a-z]{1,8}"),
                proptest::collection::vec("[a-z]{0,6}", 0..3),
            )),
        )
            .prop_map(|(namespace, key, hlc, origin, expires_at, value)| Delta {
                namespace,
                key,
                version: Version {
                    hlc: Hlc(hlc),
                    origin,
                },
                expires_at,
                value: value.map(|(value_json, t, subject, tags)| DeltaValue {
                    value_json,
                    memory_type: [
                        MemoryType::Session,
                        MemoryType::Semantic,
                        MemoryType::Agent,
                        MemoryType::Trace,
                    ][usize::from(t)],
                    subject,
                    tags,
                }),
            })
    }

    proptest! {
        #[test]
        fn round_trips(d in delta()) {
            let bytes = encode_delta(&d).expect("encode");
            prop_assert_eq!(decode_delta(&bytes).expect("decode"), d);
        }

        /// Arbitrary bytes from a peer are an error or a delta, never a panic.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_delta(&bytes);
        }

        /// Truncated and bit-flipped encodings of real deltas too.
        #[test]
        fn decode_survives_damage(d in delta(), cut in any::<usize>(), flip in any::<(usize, u8)>()) {
            let mut bytes = encode_delta(&d).expect("encode");
            let n = bytes.len();
            if n > 0 {
                bytes[flip.0 % n] ^= flip.1;
            }
            let _ = decode_delta(&bytes);
            bytes.truncate(cut % (n + 1));
            let _ = decode_delta(&bytes);
        }
    }
}
