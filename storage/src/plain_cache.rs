//! A bounded cache of decrypted values, so that reading a hot key does not open its box again.
//!
//! Entries are keyed by record key and valid for one version only: a newer write or a tombstone
//! is a miss. Erasing a subject drops its entries and bumps an epoch under the same lock; a
//! decryption that started before the erase carries the old epoch and is not cached, so no
//! plaintext of an erased subject survives in the cache. Eviction is first in, first out (the
//! cache is a bound, not an LRU); capacity 0 disables it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::crdt::Version;
use crate::crypto::KeyRef;

#[derive(Debug)]
struct Entry<T> {
    version: Version,
    key_id: KeyRef,
    value: Arc<T>,
    size: usize,
}

#[derive(Debug)]
struct Inner<T> {
    epoch: u64,
    map: HashMap<Vec<u8>, Entry<T>>,
    /// Insertion order, for first-in first-out eviction; may hold keys already removed.
    order: VecDeque<Vec<u8>>,
    bytes: usize,
}

/// Decrypted values by record key.
#[derive(Debug)]
pub(crate) struct PlainCache<T> {
    capacity: usize,
    max_bytes: usize,
    inner: Mutex<Inner<T>>,
}

impl<T> PlainCache<T> {
    /// At most `capacity` entries holding at most `max_bytes` of values.
    pub(crate) fn new(capacity: usize, max_bytes: usize) -> Self {
        Self {
            capacity,
            max_bytes,
            inner: Mutex::new(Inner {
                epoch: 0,
                map: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<T>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached value of `key` at exactly `version`.
    pub(crate) fn get(&self, key: &[u8], version: &Version) -> Option<Arc<T>> {
        if self.capacity == 0 {
            return None;
        }
        let g = self.lock();
        g.map
            .get(key)
            .filter(|e| &e.version == version)
            .map(|e| e.value.clone())
    }

    /// The epoch to pass to [`PlainCache::insert`] for a decryption that starts now.
    pub(crate) fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Cache a value of `size` bytes decrypted since `epoch`; skipped if an erase happened
    /// meanwhile or the value alone exceeds the byte budget.
    pub(crate) fn insert(
        &self,
        epoch: u64,
        key: Vec<u8>,
        version: Version,
        key_id: KeyRef,
        value: Arc<T>,
        size: usize,
    ) {
        if self.capacity == 0 || size > self.max_bytes {
            return;
        }
        let mut g = self.lock();
        if g.epoch != epoch {
            return;
        }
        if let Some(old) = g.map.remove(&key) {
            g.bytes -= old.size;
        } else {
            g.order.push_back(key.clone());
        }
        while g.map.len() >= self.capacity || g.bytes + size > self.max_bytes {
            let Some(victim) = g.order.pop_front() else {
                break;
            };
            if victim != key
                && let Some(old) = g.map.remove(&victim)
            {
                g.bytes -= old.size;
            }
        }
        g.bytes += size;
        g.map.insert(
            key,
            Entry {
                version,
                key_id,
                value,
                size,
            },
        );
        // Keys removed by `remove`/`purge` linger in `order`; keep it bounded.
        if g.order.len() > 2 * self.capacity {
            let Inner { map, order, .. } = &mut *g;
            order.retain(|k| map.contains_key(k));
        }
    }

    pub(crate) fn remove(&self, key: &[u8]) {
        let mut g = self.lock();
        if let Some(old) = g.map.remove(key) {
            g.bytes -= old.size;
        }
    }

    /// Drop every value sealed under `key_id` and invalidate decryptions in flight.
    pub(crate) fn purge(&self, key_id: &KeyRef) {
        let mut g = self.lock();
        g.epoch += 1;
        let mut freed = 0;
        g.map.retain(|_, e| {
            let keep = &e.key_id != key_id;
            if !keep {
                freed += e.size;
            }
            keep
        });
        g.bytes -= freed;
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;

    fn v(h: u64) -> Version {
        Version {
            hlc: Hlc(h),
            origin: "n".into(),
        }
    }

    #[test]
    fn version_bound_bounded_and_purged() {
        let c = PlainCache::new(2, 1000);
        let alice = KeyRef::LegacySubject("alice".into());
        let e = c.epoch();
        c.insert(e, b"a".to_vec(), v(1), alice.clone(), Arc::new(1), 1);
        assert_eq!(c.get(b"a", &v(1)).as_deref(), Some(&1));
        assert_eq!(c.get(b"a", &v(2)), None, "another version is a miss");
        c.insert(
            e,
            b"b".to_vec(),
            v(1),
            KeyRef::Namespace("ns".into()),
            Arc::new(2),
            1,
        );
        c.insert(
            e,
            b"c".to_vec(),
            v(1),
            KeyRef::Namespace("ns".into()),
            Arc::new(3),
            1,
        );
        assert_eq!(c.len(), 2, "bounded");
        // A decryption that began before an erase is not cached after it.
        let before = c.epoch();
        c.purge(&alice);
        c.insert(before, b"a".to_vec(), v(1), alice, Arc::new(1), 1);
        assert_eq!(c.get(b"a", &v(1)), None);
        assert!(PlainCache::<u8>::new(0, 1000).get(b"a", &v(1)).is_none());
    }

    #[test]
    fn byte_budget_is_kept() {
        let c = PlainCache::new(100, 10);
        let ns = KeyRef::Namespace("ns".into());
        for i in 0..20u8 {
            c.insert(c.epoch(), vec![i], v(1), ns.clone(), Arc::new(i), 4);
        }
        assert_eq!(c.len(), 2, "10 bytes hold two 4-byte values");
        assert!(c.get(&[19], &v(1)).is_some(), "the newest stays");
        c.insert(c.epoch(), vec![99], v(1), ns, Arc::new(0), 11);
        assert!(
            c.get(&[99], &v(1)).is_none(),
            "a value over the budget is not cached"
        );
    }
}
