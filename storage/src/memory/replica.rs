//! Replication of the memory store: deltas out of local writes, deltas in from peers, digests and
//! bucket summaries for anti-entropy, tombstone collection, and erasure that reaches every replica.
//!
//! A peer's [`Delta`] is plaintext; applying it seals the value under this node's own key for its
//! subject or namespace, exactly as a local put does. The merge is the LWW merge of
//! [`Versioned`] over the *logical* records (plaintext values, shredded values as tombstones), so
//! replicas agree although each holds different ciphertext.
//!
//! Erasure: the destroyed set is grow-only and exchanged between replicas
//! ([`MemoryStore::destroyed_subjects`], [`MemoryStore::merge_destroyed`]). Erasing a subject
//! marks its key destroyed, then shreds every value sealed under it: the record keeps its version
//! but loses its ciphertext, reads as erased, and replicates as a tombstone at that version. A
//! delta carrying a destroyed subject is refused, so no replica can bring the data back; a
//! replica that refused it learns the tombstone from anti-entropy.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use super::{
    MEMORY_TREE, MemoryItem, MemoryStore, PutRequest, StoredRecord, StoredValue, decode_record,
    entry_of, key_id_for, lock, record_key, validate_name, value_aad,
};
use crate::crdt::Versioned;
use crate::crypto::{self, KeyId, KeyRef, Sealed};
use crate::delta::{ApplyOutcome, Delta, DeltaValue};
use crate::digest::{BUCKETS, DigestState, NamespaceDigest, bucket_of};
use crate::error::{Result, StorageError};
use crate::memory::{Plain, Protection};

/// Longest accepted origin (node name) in a delta's version.
const MAX_ORIGIN_LEN: usize = 255;

impl MemoryStore {
    /// [`MemoryStore::put`], and the delta to send to peers.
    pub fn put_with_delta(
        &self,
        ns: &str,
        key: &str,
        req: PutRequest,
        now_ms: u64,
    ) -> Result<(MemoryItem, Delta)> {
        let item = self.put(ns, key, req, now_ms)?;
        let delta = Delta {
            namespace: item.namespace.clone(),
            key: item.key.clone(),
            version: item.version.clone(),
            expires_at: item.expires_at,
            value: Some(DeltaValue {
                value_json: item.value_json.clone(),
                memory_type: item.memory_type,
                subject: item.subject.clone(),
                tags: item.tags.clone(),
            }),
        };
        Ok((item, delta))
    }

    /// [`MemoryStore::delete`]; the tombstone to send to peers when a live value was deleted
    /// (`None`, and nothing written, when the key is absent, deleted or expired).
    pub fn delete_with_delta(&self, ns: &str, key: &str, now_ms: u64) -> Result<Option<Delta>> {
        self.delete_inner(ns, key, now_ms)
    }

    /// Merge a peer's delta (idempotent, in any order). Refuses, changing nothing: invalid names
    /// or values (as a put would), a version more than the clock's max skew ahead of `now_ms`
    /// (`clock_skew`), a destroyed subject (`subject_erased`), a new key in a full namespace
    /// (`namespace_full`). The remote timestamp moves the local clock forward.
    pub fn apply_delta(&self, d: &Delta, now_ms: u64) -> Result<ApplyOutcome> {
        let (ns, key) = (d.namespace.as_str(), d.key.as_str());
        validate_name("namespace", ns, self.limits.max_name_len)?;
        validate_name("key", key, self.limits.max_name_len)?;
        if d.version.origin.is_empty() || d.version.origin.len() > MAX_ORIGIN_LEN {
            return Err(StorageError::InvalidInput {
                field: "origin",
                message: format!("must be 1..={MAX_ORIGIN_LEN} bytes"),
            });
        }
        let key_id = match &d.value {
            Some(v) => {
                self.validate_value(&v.value_json, v.subject.as_deref(), &v.tags)?;
                let id = key_id_for(ns, v.subject.as_deref());
                self.keyring.ensure_not_destroyed(&id)?;
                Some(id)
            }
            None => None,
        };
        self.clock.check(d.version.hlc, now_ms)?;

        let incoming = d.to_versioned();
        let slot = self.ns_state(ns)?;
        let _guard = self.stripe(ns, key);
        let rkey = record_key(ns, key);
        let existing = self.read_record(&rkey)?;
        // The merge over logical records; `keep` is the stored value when only the expiry moves.
        let (merged, keep) = match &existing {
            None => (incoming, None),
            Some(cur) if cur.version > d.version => return self.stale(d, now_ms),
            Some(cur) if cur.version < d.version => (incoming, None),
            Some(cur) => {
                let logical = self.logical(ns, key, &rkey, cur)?;
                let merged = logical.merge(&incoming);
                if merged == logical {
                    return self.stale(d, now_ms);
                }
                let keep = (merged.value == logical.value)
                    .then(|| cur.value.clone())
                    .flatten();
                (merged, keep)
            }
        };
        // What an observer of the namespace hears: the new logical value.
        let report = self
            .observers
            .watches(ns)
            .then(|| merged.value.as_ref().map(|v| v.value_json.clone()));
        let value = match (merged.value, keep) {
            (None, _) => None,
            (Some(_), Some(stored)) => Some(stored),
            (Some(v), None) => {
                let key_id = key_id.unwrap_or_else(|| key_id_for(ns, v.subject.as_deref()));
                // Refuses a key destroyed since the check above; an erase waits for this write.
                let data_key = self.keyring.get_or_create(&key_id)?;
                let key_ref = self.keyring.key_ref(&key_id);
                let plain = serde_json::to_vec(&Plain {
                    value: v.value_json,
                    tags: v.tags,
                    subject: v.subject,
                })
                .map_err(|e| StorageError::Corrupt(e.to_string()))?;
                let sealed = match self.protection {
                    Protection::Encrypted => crypto::seal(
                        &data_key,
                        &value_aad(ns, key, &merged.version, &key_ref),
                        &plain,
                    )?,
                    Protection::PlaintextForBenchmarks => Sealed {
                        nonce: [0; 24],
                        ct: plain,
                    },
                };
                Some(StoredValue {
                    key_id: key_ref,
                    memory_type: v.memory_type,
                    sealed,
                })
            }
        };
        let rec = StoredRecord {
            version: merged.version,
            expires_at: value.as_ref().and(merged.expires_at),
            value,
        };
        self.commit(&slot, ns, key, &rkey, existing.as_ref(), Some(&rec))?;
        if let Some(value) = report {
            self.observers.notify(ns, key, value.as_deref());
        }
        self.clock.observe(d.version.hlc, now_ms)?;
        Ok(ApplyOutcome::Applied)
    }

    fn stale(&self, d: &Delta, now_ms: u64) -> Result<ApplyOutcome> {
        self.clock.observe(d.version.hlc, now_ms)?;
        Ok(ApplyOutcome::Stale)
    }

    /// The record of `ns`/`key` as a delta (tombstones included; a shredded value is a
    /// tombstone); `None` when there is no record.
    pub fn delta(&self, ns: &str, key: &str) -> Result<Option<Delta>> {
        validate_name("namespace", ns, self.limits.max_name_len)?;
        validate_name("key", key, self.limits.max_name_len)?;
        let rkey = record_key(ns, key);
        match self.read_record(&rkey)? {
            Some(rec) => {
                let logical = self.logical(ns, key, &rkey, &rec)?;
                Ok(Some(Delta::from_versioned(ns, key, logical)))
            }
            None => Ok(None),
        }
    }

    /// The record as plaintext: a shredded value is a tombstone, tombstones never expire.
    fn logical(
        &self,
        ns: &str,
        key: &str,
        rkey: &[u8],
        rec: &StoredRecord,
    ) -> Result<Versioned<DeltaValue>> {
        if entry_of(rec).tombstone {
            return Ok(Versioned {
                version: rec.version.clone(),
                value: None,
                expires_at: None,
            });
        }
        let item = self.decode_item(ns, key, rkey.to_vec(), rec.clone())?;
        Ok(Versioned {
            version: item.version,
            expires_at: item.expires_at,
            value: Some(DeltaValue {
                value_json: item.value_json,
                memory_type: item.memory_type,
                subject: item.subject,
                tags: item.tags,
            }),
        })
    }

    /// The namespaces holding at least one record (tombstones included), in name order.
    pub fn namespaces(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        // One seek per namespace: after `ns`, skip every `ns \0 key` by starting past `ns \x01`.
        while let Some((k, _)) = self
            .engine
            .scan(MEMORY_TREE, b"", after.as_deref(), 1)?
            .into_iter()
            .next()
        {
            let Some(end) = k.iter().position(|&b| b == 0) else {
                return Err(StorageError::Corrupt("memory key without namespace".into()));
            };
            let mut next = k[..end].to_vec();
            out.push(String::from_utf8_lossy(&next).into_owned());
            next.push(1);
            after = Some(next);
        }
        Ok(out)
    }

    /// The anti-entropy digest of a namespace: cheap (kept up to date by every write).
    /// A counter that moves (after the write) on every change of a record of `ns` on this
    /// replica: local writes and deletes, replicated deltas, shredding. For caches of what a
    /// namespace holds: a value read after the counter showed `n` (load it with `Acquire`, before
    /// the read) is current as long as the counter still shows `n`. Lock-free to read.
    pub fn change_counter(&self, ns: &str) -> Arc<AtomicU64> {
        lock(&self.digests)
            .entry(ns.to_string())
            .or_default()
            .changes
            .clone()
    }

    pub fn digest(&self, ns: &str) -> Result<NamespaceDigest> {
        validate_name("namespace", ns, self.limits.max_name_len)?;
        // A namespace never written here gets no state (a peer may name any namespace).
        let known = lock(&self.digests).contains_key(ns);
        if !known
            && self
                .engine
                .scan(MEMORY_TREE, &record_key(ns, ""), None, 1)?
                .is_empty()
        {
            return Ok(DigestState::default().snapshot());
        }
        let slot = self.ns_state(ns)?;
        let state = lock(&slot.state);
        Ok(state
            .as_ref()
            .map(DigestState::snapshot)
            .unwrap_or_else(|| DigestState::default().snapshot()))
    }

    /// `(key, version, expires_at)` of every record (tombstones included, with no expiry) of `ns`
    /// whose key falls in one of `buckets`, in key order.
    pub fn bucket_summaries(
        &self,
        ns: &str,
        buckets: &[u16],
    ) -> Result<Vec<(String, crate::crdt::Version, Option<u64>)>> {
        validate_name("namespace", ns, self.limits.max_name_len)?;
        let mut wanted = vec![false; BUCKETS];
        for &b in buckets {
            let slot =
                wanted
                    .get_mut(usize::from(b))
                    .ok_or_else(|| StorageError::InvalidInput {
                        field: "buckets",
                        message: format!("bucket {b} is not below {BUCKETS}"),
                    })?;
            *slot = true;
        }
        let mut out = Vec::new();
        if buckets.is_empty() {
            return Ok(out);
        }
        self.engine
            .for_each(MEMORY_TREE, &record_key(ns, ""), None, 1024, &mut |k, v| {
                let key = String::from_utf8_lossy(&k[ns.len() + 1..]).into_owned();
                if wanted[usize::from(bucket_of(&key))] {
                    let e = entry_of(&decode_record(&v)?);
                    out.push((key, e.version, e.expires_at));
                }
                Ok(true)
            })?;
        Ok(out)
    }

    /// Drop the tombstones (shredded values included) whose version's wall-clock time is before
    /// `horizon_ms`. The caller picks a horizon every replica has seen all deltas up to. Returns
    /// how many records were dropped.
    pub fn gc_tombstones(&self, horizon_ms: u64) -> Result<usize> {
        let collectable =
            |rec: &StoredRecord| entry_of(rec).tombstone && rec.version.hlc.wall_ms() < horizon_ms;
        let mut dropped = 0;
        self.engine
            .for_each(MEMORY_TREE, b"", None, 1024, &mut |k, v| {
                match decode_record(&v) {
                    Ok(rec) if collectable(&rec) => {}
                    _ => return Ok(true),
                }
                let (ns, key) = split_record_key(&k)?;
                let slot = self.ns_state(&ns)?;
                let _guard = self.stripe(&ns, &key);
                if let Some(cur) = self.read_record(&k)?
                    && collectable(&cur)
                {
                    self.commit(&slot, &ns, &key, &k, Some(&cur), None)?;
                    dropped += 1;
                }
                Ok(true)
            })?;
        Ok(dropped)
    }

    /// The destroyed subjects (a grow-only set), in name order.
    pub fn destroyed_subjects(&self) -> Result<Vec<String>> {
        self.keyring.destroyed_subjects()
    }

    /// Merge a peer's destroyed set: erase (as [`MemoryStore::erase_subject`]) every subject not
    /// destroyed here yet. Returns how many were new. Refuses the whole set if a name is invalid.
    pub fn merge_destroyed(&self, subjects: &[String], now_ms: u64) -> Result<usize> {
        for s in subjects {
            validate_name("subject", s, self.limits.max_name_len)?;
        }
        let mut fresh = Vec::new();
        for s in subjects.iter().collect::<BTreeSet<_>>() {
            let id = KeyId::Subject(s.clone());
            if !self.keyring.is_destroyed(&id)? {
                self.keyring.destroy(&id, now_ms)?;
                self.cache.purge(&self.keyring.key_ref(&id));
                fresh.push(s.clone());
            }
        }
        self.shred(&fresh)?;
        Ok(fresh.len())
    }

    /// Drop the ciphertext of every value sealed under one of `subjects`, whose keys are destroyed
    /// already. First a barrier: every stripe lock is taken once, so a write that passed its
    /// destroyed check before the mark has finished; later writes see the mark and fail.
    pub(super) fn shred(&self, subjects: &[String]) -> Result<()> {
        if subjects.is_empty() {
            return Ok(());
        }
        for stripe in &self.stripes {
            drop(lock(stripe));
        }
        let ids: HashSet<crypto::SubjectId> = subjects
            .iter()
            .map(|s| self.keyring.subject_id(s))
            .collect();
        let names: HashSet<&str> = subjects.iter().map(String::as_str).collect();
        let targeted = |rec: &StoredRecord| match &rec.value {
            Some(v) if !v.is_shredded() => match &v.key_id {
                KeyRef::Subject(h) => ids.contains(h),
                KeyRef::LegacySubject(s) => names.contains(s.as_str()),
                KeyRef::Namespace(_) => false,
            },
            _ => false,
        };
        self.engine
            .for_each(MEMORY_TREE, b"", None, 1024, &mut |k, v| {
                match decode_record(&v) {
                    Ok(rec) if targeted(&rec) => {}
                    _ => return Ok(true),
                }
                let (ns, key) = split_record_key(&k)?;
                let slot = self.ns_state(&ns)?;
                let _guard = self.stripe(&ns, &key);
                if let Some(cur) = self.read_record(&k)?
                    && targeted(&cur)
                    && let Some(stored) = &cur.value
                {
                    // A legacy record loses its subject's name with its ciphertext.
                    let key_id = match &stored.key_id {
                        KeyRef::LegacySubject(s) => KeyRef::Subject(self.keyring.subject_id(s)),
                        other => other.clone(),
                    };
                    let shredded = StoredRecord {
                        version: cur.version.clone(),
                        value: Some(StoredValue {
                            key_id,
                            memory_type: stored.memory_type,
                            sealed: Sealed {
                                nonce: [0; 24],
                                ct: Vec::new(),
                            },
                        }),
                        expires_at: None,
                    };
                    self.commit(&slot, &ns, &key, &k, Some(&cur), Some(&shredded))?;
                }
                Ok(true)
            })?;
        Ok(())
    }
}

/// `ns \0 key` back into its parts.
pub(super) fn split_record_key(k: &[u8]) -> Result<(String, String)> {
    let end = k
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| StorageError::Corrupt("memory key without namespace".into()))?;
    Ok((
        String::from_utf8_lossy(&k[..end]).into_owned(),
        String::from_utf8_lossy(&k[end + 1..]).into_owned(),
    ))
}
