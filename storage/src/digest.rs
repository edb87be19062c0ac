//! Anti-entropy digests: a cheap summary of one namespace that two replicas compare to find the
//! few keys on which they differ.
//!
//! Every record (tombstones included) has an entry hash: SHA-256 over its key, version, expiry and
//! whether it is a tombstone, truncated to 64 bits. Each key falls in one of [`BUCKETS`] buckets
//! (SHA-256 of the key); a bucket is the XOR of the entry hashes of its records, and the root a
//! hash of the count and all buckets. XOR makes the digest incremental: a write XORs the old entry
//! out and the new one in. SHA-256 makes it identical on every process and platform. Replicas
//! holding the same records (in the logical sense: each seals with its own keys) have the same
//! digest; equal roots mean nothing to repair, else only the differing buckets are exchanged.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::crdt::Version;

/// Buckets per namespace digest.
pub const BUCKETS: usize = 1024;

/// The digest of one namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceDigest {
    /// Records, tombstones included.
    pub count: u64,
    /// A hash of `count` and every bucket.
    pub root: u64,
    /// [`BUCKETS`] values, each the XOR of the entry hashes of its records.
    pub buckets: Vec<u64>,
}

impl NamespaceDigest {
    /// The buckets in which `self` and `other` differ (every bucket when either is malformed).
    pub fn differing_buckets(&self, other: &NamespaceDigest) -> Vec<u16> {
        if self.buckets.len() != BUCKETS || other.buckets.len() != BUCKETS {
            return all_buckets();
        }
        if self.root == other.root && self.count == other.count {
            return Vec::new();
        }
        (0..BUCKETS)
            .filter(|&i| self.buckets[i] != other.buckets[i])
            // BUCKETS fits in u16.
            .map(|i| i as u16)
            .collect()
    }
}

fn all_buckets() -> Vec<u16> {
    // BUCKETS fits in u16.
    (0..BUCKETS).map(|i| i as u16).collect()
}

/// The bucket of a key.
pub fn bucket_of(key: &str) -> u16 {
    let mut h = Sha256::new();
    h.update(b"swarm-bucket-v1\0");
    h.update(key.as_bytes());
    // The modulo keeps it below BUCKETS, which fits in u16.
    (first_u64(&h.finalize()) % BUCKETS as u64) as u16
}

/// What of a record the digest covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) version: Version,
    pub(crate) expires_at: Option<u64>,
    pub(crate) tombstone: bool,
}

/// The entry hash of a record.
pub(crate) fn entry_hash(key: &str, e: &Entry) -> u64 {
    let mut h = Sha256::new();
    h.update(b"swarm-entry-v1\0");
    for part in [key.as_bytes(), e.version.origin.as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(e.version.hlc.0.to_be_bytes());
    match e.expires_at {
        Some(t) => {
            h.update([1]);
            h.update(t.to_be_bytes());
        }
        None => h.update([0]),
    }
    h.update([u8::from(e.tombstone)]);
    first_u64(&h.finalize())
}

fn first_u64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(b)
}

/// The digest of a namespace, kept up to date by every write, and the slots reserved by writes of
/// new keys in flight (so the namespace limit holds under concurrent writers).
#[derive(Debug, Clone)]
pub(crate) struct DigestState {
    count: u64,
    reserved: u64,
    buckets: Vec<u64>,
}

impl Default for DigestState {
    fn default() -> Self {
        Self {
            count: 0,
            reserved: 0,
            buckets: vec![0; BUCKETS],
        }
    }
}

impl DigestState {
    /// Count a record found by the initial scan; `None` when it could not be decoded.
    pub(crate) fn add_scanned(&mut self, key: &str, entry: Option<&Entry>) {
        self.count += 1;
        if let Some(e) = entry {
            self.toggle(key, e);
        }
    }

    /// Reserve a slot for a new key, unless the namespace holds `max` records already.
    pub(crate) fn reserve(&mut self, max: usize) -> bool {
        if self.count.saturating_add(self.reserved) >= max as u64 {
            return false;
        }
        self.reserved += 1;
        true
    }

    pub(crate) fn release(&mut self) {
        self.reserved = self.reserved.saturating_sub(1);
    }

    /// A record of `key` went from `old` to `new` (`None`: absent).
    pub(crate) fn replace(&mut self, key: &str, old: Option<&Entry>, new: Option<&Entry>) {
        if let Some(o) = old {
            self.toggle(key, o);
        }
        if let Some(n) = new {
            self.toggle(key, n);
        }
        match (old.is_some(), new.is_some()) {
            (false, true) => self.count += 1,
            (true, false) => self.count = self.count.saturating_sub(1),
            _ => {}
        }
    }

    fn toggle(&mut self, key: &str, e: &Entry) {
        self.buckets[usize::from(bucket_of(key))] ^= entry_hash(key, e);
    }

    pub(crate) fn snapshot(&self) -> NamespaceDigest {
        let mut h = Sha256::new();
        h.update(b"swarm-root-v1\0");
        h.update(self.count.to_be_bytes());
        for b in &self.buckets {
            h.update(b.to_be_bytes());
        }
        NamespaceDigest {
            count: self.count,
            root: first_u64(&h.finalize()),
            buckets: self.buckets.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;

    fn entry(h: u64, expires_at: Option<u64>, tombstone: bool) -> Entry {
        Entry {
            version: Version {
                hlc: Hlc(h),
                origin: "n1".into(),
            },
            expires_at,
            tombstone,
        }
    }

    #[test]
    fn hashes_are_stable_across_processes() {
        // Pinned values (also computed with Python's hashlib): a change here breaks digests
        // between nodes of different builds.
        assert_eq!(bucket_of("k"), bucket_of("k"));
        let pinned = (
            bucket_of("alpha"),
            entry_hash("alpha", &entry(7, None, false)),
        );
        assert_eq!(pinned, (PINNED_BUCKET, PINNED_ENTRY));
    }

    const PINNED_BUCKET: u16 = 689;
    const PINNED_ENTRY: u64 = 2_242_079_545_266_242_809;

    #[test]
    fn entry_hash_covers_every_field() {
        let base = entry_hash("k", &entry(1, Some(5), false));
        for (key, e) in [
            ("j", entry(1, Some(5), false)),
            ("k", entry(2, Some(5), false)),
            ("k", entry(1, Some(6), false)),
            ("k", entry(1, None, false)),
            ("k", entry(1, Some(5), true)),
        ] {
            assert_ne!(entry_hash(key, &e), base, "{key} {e:?}");
        }
    }

    #[test]
    fn incremental_equals_rebuilt_and_order_free() {
        let mut a = DigestState::default();
        a.replace("x", None, Some(&entry(1, None, false)));
        a.replace("y", None, Some(&entry(2, Some(9), false)));
        a.replace(
            "x",
            Some(&entry(1, None, false)),
            Some(&entry(3, None, true)),
        );
        a.replace("z", None, Some(&entry(4, None, false)));
        a.replace("z", Some(&entry(4, None, false)), None);
        let mut b = DigestState::default();
        b.add_scanned("y", Some(&entry(2, Some(9), false)));
        b.add_scanned("x", Some(&entry(3, None, true)));
        assert_eq!(a.snapshot(), b.snapshot());
        assert_eq!(a.snapshot().count, 2);
        assert!(a.snapshot().differing_buckets(&b.snapshot()).is_empty());
        b.replace(
            "y",
            Some(&entry(2, Some(9), false)),
            Some(&entry(2, Some(10), false)),
        );
        assert_eq!(
            a.snapshot().differing_buckets(&b.snapshot()),
            [bucket_of("y")]
        );
        assert_ne!(a.snapshot().root, b.snapshot().root);
    }

    #[test]
    fn reservations_bound_the_count() {
        let mut d = DigestState::default();
        assert!(d.reserve(2));
        assert!(d.reserve(2));
        assert!(!d.reserve(2), "two in flight fill a namespace of two");
        d.release();
        d.replace("a", None, Some(&entry(1, None, false)));
        assert!(!d.reserve(2));
        d.release();
        assert!(d.reserve(2));
    }
}
