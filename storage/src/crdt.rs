//! Last-writer-wins map CRDT with tombstones and TTLs.
//!
//! Each key holds one [`Versioned`] record. The record with the greater version
//! `(hlc, origin)` wins; a deletion is a record without a value (a tombstone), so a delete
//! ordered after a write wins on every replica. When both sides hold the same version (the same
//! write seen twice, possibly with TTLs extended separately) the expiry merges to the longest
//! (Redis semantics: no expiry beats any expiry). Should two different payloads ever carry the same
//! version, the greater payload wins with its own expiry (a value beats a tombstone), so merge stays
//! deterministic: over any set of records the result is the greatest version, then the greatest
//! payload, then the longest expiry among the records carrying both.
//!
//! Laws (proved by the property tests below): merge is commutative, associative and idempotent,
//! for single records and for whole maps.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::hlc::Hlc;

/// The version of a record: its HLC timestamp, then the writing node as a tie-breaker.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    pub hlc: Hlc,
    pub origin: String,
}

/// One LWW register value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned<V> {
    pub version: Version,
    /// `None` is a tombstone.
    pub value: Option<V>,
    /// Wall-clock ms after which the record reads as absent; `None` never expires.
    pub expires_at: Option<u64>,
}

impl<V: Ord + Clone> Versioned<V> {
    /// The merge of two records for the same key.
    pub fn merge(&self, other: &Self) -> Self {
        use std::cmp::Ordering::*;
        match self.version.cmp(&other.version) {
            Greater => self.clone(),
            Less => other.clone(),
            Equal => match self.value.cmp(&other.value) {
                Greater => self.clone(),
                Less => other.clone(),
                Equal => {
                    let mut winner = self.clone();
                    winner.expires_at = longest_ttl(self.expires_at, other.expires_at);
                    winner
                }
            },
        }
    }

    /// Whether the record is live (a value, not expired) at `now_ms`.
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.value.is_some() && self.expires_at.is_none_or(|e| e > now_ms)
    }
}

fn longest_ttl(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        _ => None,
    }
}

/// A whole LWW map, for the laws and for replicas held in memory.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LwwMap<V> {
    pub entries: BTreeMap<String, Versioned<V>>,
}

impl<V: Ord + Clone> LwwMap<V> {
    /// Apply one record (a local write or a delta from a peer).
    pub fn apply(&mut self, key: &str, rec: Versioned<V>) {
        let merged = match self.entries.get(key) {
            Some(cur) => cur.merge(&rec),
            None => rec,
        };
        self.entries.insert(key.to_string(), merged);
    }

    pub fn merge(&self, other: &Self) -> Self {
        let mut out = self.clone();
        for (k, v) in &other.entries {
            out.apply(k, v.clone());
        }
        out
    }

    /// The live value of `key` at `now_ms`.
    pub fn get(&self, key: &str, now_ms: u64) -> Option<&V> {
        self.entries
            .get(key)
            .filter(|r| r.is_live(now_ms))
            .and_then(|r| r.value.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec() -> impl Strategy<Value = Versioned<u8>> {
        (
            0u64..6,
            prop_oneof![Just("a".to_string()), Just("b".to_string())],
            proptest::option::of(0u8..4),
            proptest::option::of(0u64..5),
        )
            .prop_map(|(h, origin, value, expires_at)| Versioned {
                version: Version {
                    hlc: Hlc(h),
                    origin,
                },
                value,
                expires_at,
            })
    }

    fn map() -> impl Strategy<Value = LwwMap<u8>> {
        proptest::collection::vec((prop_oneof![Just("x"), Just("y"), Just("z")], rec()), 0..8)
            .prop_map(|ops| {
                let mut m = LwwMap::default();
                for (k, r) in ops {
                    m.apply(k, r);
                }
                m
            })
    }

    proptest! {
        #[test]
        fn record_merge_commutes(a in rec(), b in rec()) {
            prop_assert_eq!(a.merge(&b), b.merge(&a));
        }

        #[test]
        fn record_merge_associates(a in rec(), b in rec(), c in rec()) {
            prop_assert_eq!(a.merge(&b).merge(&c), a.merge(&b.merge(&c)));
        }

        #[test]
        fn record_merge_is_idempotent(a in rec()) {
            prop_assert_eq!(a.merge(&a), a);
        }

        #[test]
        fn map_merge_laws(a in map(), b in map(), c in map()) {
            prop_assert_eq!(a.merge(&b), b.merge(&a));
            prop_assert_eq!(a.merge(&b).merge(&c), a.merge(&b.merge(&c)));
            prop_assert_eq!(a.merge(&a), a.clone());
        }

        /// Any order of delivery, with duplicates, converges to the same map.
        #[test]
        fn delivery_order_does_not_matter(
            ops in proptest::collection::vec((prop_oneof![Just("x"), Just("y")], rec()), 0..12),
            seed in any::<u64>(),
        ) {
            let mut forward = LwwMap::default();
            for (k, r) in &ops {
                forward.apply(k, r.clone());
            }
            let mut shuffled: Vec<_> = ops.iter().chain(ops.iter()).cloned().collect();
            let mut s = seed | 1;
            for i in (1..shuffled.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                let j = (s % (i as u64 + 1)) as usize;
                shuffled.swap(i, j);
            }
            let mut other = LwwMap::default();
            for (k, r) in shuffled {
                other.apply(k, r);
            }
            prop_assert_eq!(forward, other);
        }
    }

    #[test]
    fn later_delete_wins_and_expiry_hides() {
        let v = |h, value, expires_at| Versioned {
            version: Version {
                hlc: Hlc(h),
                origin: "n".into(),
            },
            value,
            expires_at,
        };
        let mut m = LwwMap::default();
        m.apply("k", v(1, Some(1u8), None));
        m.apply("k", v(2, None, None));
        m.apply("k", v(1, Some(1u8), None)); // a stale duplicate arrives late
        assert_eq!(m.get("k", 0), None);
        m.apply("t", v(3, Some(9u8), Some(100)));
        assert_eq!(m.get("t", 99), Some(&9));
        assert_eq!(m.get("t", 100), None);
        // Same version with a longer TTL: the longest wins; no TTL beats any TTL.
        m.apply("t", v(3, Some(9u8), Some(200)));
        assert_eq!(m.get("t", 150), Some(&9));
        m.apply("t", v(3, Some(9u8), None));
        assert_eq!(m.get("t", u64::MAX - 1), Some(&9));
    }
}
