//! Agent memory: namespaced LWW records, each value sealed under its subject's or namespace's key.
//!
//! Every write goes through `commit`, under the stripe lock of its key, which also keeps the
//! namespace's anti-entropy digest and record count in step. Replication (deltas, digests,
//! tombstone collection, erasure across replicas) is in `memory/replica.rs`. An [`Observer`]
//! of a namespace hears of every change `commit` makes through a write, a delete or a peer's
//! delta.

mod legacy;
mod replica;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

use crate::crdt::{Version, Versioned};
use crate::crypto::{self, KeyId, KeyRef, Keyring, Sealed};
use crate::delta::{Delta, MemoryType};
use crate::digest::{DigestState, Entry};
use crate::engine::Engine;
use crate::error::{Result, StorageError};
use crate::hlc::HlcClock;
use crate::plain_cache::PlainCache;

pub(crate) const MEMORY_TREE: &str = "memory";
const LOCK_STRIPES: usize = 64;
/// Most bytes of decrypted values the read cache holds.
const READ_CACHE_BYTES: usize = 64 << 20;

/// Told of every change of a record of one namespace made through a write, a delete or a peer's
/// delta, in commit order per key: the key and its new value as JSON (`None`: deleted). It runs
/// under the key's lock, so it must be quick and must not call the store. Expiries and
/// erasures (which never touch values without a subject's key) are not reported.
pub type Observer = Arc<dyn Fn(&str, Option<&str>) + Send + Sync>;

/// The observers of each namespace (see [`MemoryStore::observe`]).
#[derive(Default)]
struct Observers(RwLock<Vec<(String, Observer)>>);

impl std::fmt::Debug for Observers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.read().map(|v| v.len()).unwrap_or(0);
        f.debug_tuple("Observers").field(&n).finish()
    }
}

impl Observers {
    fn watches(&self, ns: &str) -> bool {
        let v = self.0.read().unwrap_or_else(|p| p.into_inner());
        v.iter().any(|(n, _)| n == ns)
    }

    fn notify(&self, ns: &str, key: &str, value: Option<&str>) {
        let v = self.0.read().unwrap_or_else(|p| p.into_inner());
        for (_, f) in v.iter().filter(|(n, _)| n == ns) {
            f(key, value);
        }
    }
}

/// What is stored for a live value: which key sealed it (a subject by its keyed id, never by
/// name) and the sealed JSON.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StoredValue {
    pub key_id: KeyRef,
    pub memory_type: MemoryType,
    pub sealed: Sealed,
}

impl StoredValue {
    /// Whether the value was crypto-shredded: its subject was erased, and the ciphertext dropped.
    /// Such a record keeps its version (so nothing older can come back) and reads as erased; for
    /// replication it is a tombstone. A sealed value is never empty (it carries a 16-byte tag).
    pub fn is_shredded(&self) -> bool {
        self.sealed.ct.is_empty()
    }
}

/// The record stored under `namespace \0 key`.
pub type StoredRecord = Versioned<StoredValue>;

/// What the digest covers of a record: a shredded value counts as a tombstone, and tombstones never
/// expire.
pub(crate) fn entry_of(rec: &StoredRecord) -> Entry {
    let tombstone = rec.value.as_ref().is_none_or(StoredValue::is_shredded);
    Entry {
        version: rec.version.clone(),
        expires_at: if tombstone { None } else { rec.expires_at },
        tombstone,
    }
}

/// The plaintext inside [`StoredValue::sealed`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Plain {
    /// The value as JSON text.
    value: String,
    tags: Vec<String>,
    /// The data subject: kept here, sealed, as the record only has its keyed id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
}

/// A write.
#[derive(Debug, Clone, Default)]
pub struct PutRequest {
    /// JSON text of the value.
    pub value_json: String,
    pub memory_type: MemoryType,
    /// Lifetime; the memory type's default when absent.
    pub ttl_ms: Option<u64>,
    /// The data subject the value belongs to (for erasure); sealed under the namespace key if none.
    pub subject: Option<String>,
    pub tags: Vec<String>,
}

/// A value read back.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryItem {
    pub namespace: String,
    pub key: String,
    /// JSON text of the value.
    pub value_json: String,
    pub version: Version,
    pub memory_type: MemoryType,
    pub expires_at: Option<u64>,
    pub subject: Option<String>,
    pub tags: Vec<String>,
}

/// Whether values are sealed. Plaintext exists only to measure what encryption costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    Encrypted,
    PlaintextForBenchmarks,
}

/// Limits applied to writes.
#[derive(Debug, Clone)]
pub struct MemoryLimits {
    /// Largest stored payload: the value's JSON text plus its tags.
    pub max_value_bytes: usize,
    pub max_name_len: usize,
    pub max_namespace_entries: usize,
    /// Decrypted values kept in memory for hot reads; 0 turns the cache off.
    pub read_cache_entries: usize,
    /// Most tags on one value.
    pub max_tags: usize,
    /// Longest tag, in bytes.
    pub max_tag_bytes: usize,
}

/// Default of [`MemoryLimits::max_tags`].
pub const DEFAULT_MAX_TAGS: usize = 32;
/// Default of [`MemoryLimits::max_tag_bytes`].
pub const DEFAULT_MAX_TAG_BYTES: usize = 128;

impl Default for MemoryLimits {
    fn default() -> Self {
        Self {
            max_value_bytes: 256 * 1024,
            max_name_len: 128,
            max_namespace_entries: 1_000_000,
            read_cache_entries: 10_000,
            max_tags: DEFAULT_MAX_TAGS,
            max_tag_bytes: DEFAULT_MAX_TAG_BYTES,
        }
    }
}

/// One page of [`MemoryStore::list_page`].
#[derive(Debug, Clone, PartialEq)]
pub struct ListPage {
    pub items: Vec<MemoryItem>,
    /// The page stopped early, at its item limit or byte budget: more may follow the last key.
    pub more: bool,
    /// The page stopped because the next item would have taken it past the byte budget.
    pub truncated: bool,
}

impl MemoryItem {
    /// What the item weighs in a list page: its names, value and tags.
    pub fn payload_bytes(&self) -> usize {
        self.namespace.len()
            + self.key.len()
            + self.value_json.len()
            + self.subject.as_ref().map_or(0, String::len)
            + self.tags.iter().map(String::len).sum::<usize>()
    }
}

/// The namespaced memory of one node.
#[derive(Debug)]
pub struct MemoryStore {
    engine: Arc<dyn Engine>,
    keyring: Arc<Keyring>,
    clock: Arc<HlcClock>,
    origin: String,
    limits: MemoryLimits,
    protection: Protection,
    stripes: Vec<Mutex<()>>,
    /// Per namespace: its digest and record count, built by one scan on first use.
    digests: Mutex<HashMap<String, NsSlot>>,
    cache: PlainCache<Plain>,
    observers: Observers,
}

/// A namespace's digest; `None` until built.
type NsSlot = Arc<Ns>;

/// What this replica keeps per namespace in memory.
#[derive(Debug, Default)]
struct Ns {
    /// The digest and record count; `None` until built by one scan.
    state: Mutex<Option<DigestState>>,
    /// Moves after every change of a record of the namespace (see [`MemoryStore::change_counter`]).
    changes: Arc<AtomicU64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryStore {
    pub fn new(
        engine: Arc<dyn Engine>,
        keyring: Arc<Keyring>,
        clock: Arc<HlcClock>,
        origin: String,
        limits: MemoryLimits,
        protection: Protection,
    ) -> Self {
        Self {
            engine,
            keyring,
            clock,
            origin,
            protection,
            stripes: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            digests: Mutex::new(HashMap::new()),
            cache: PlainCache::new(
                match protection {
                    Protection::Encrypted => limits.read_cache_entries,
                    Protection::PlaintextForBenchmarks => 0,
                },
                READ_CACHE_BYTES,
            ),
            limits,
            observers: Observers::default(),
        }
    }

    /// Tell `observer` of every later change of a record of `ns` (see [`Observer`]).
    pub fn observe(&self, ns: &str, observer: Observer) {
        let mut v = self.observers.0.write().unwrap_or_else(|p| p.into_inner());
        v.push((ns.to_string(), observer));
    }

    /// Write a value. It is visible at once; call [`Engine::sync`] before acknowledging.
    pub fn put(&self, ns: &str, key: &str, req: PutRequest, now_ms: u64) -> Result<MemoryItem> {
        validate_name("namespace", ns, self.limits.max_name_len)?;
        validate_name("key", key, self.limits.max_name_len)?;
        self.validate_value(&req.value_json, req.subject.as_deref(), &req.tags)?;
        let key_id = key_id_for(ns, req.subject.as_deref());
        let data_key = self.keyring.get_or_create(&key_id)?;
        let key_ref = self.keyring.key_ref(&key_id);
        let ttl = req.ttl_ms.or(req.memory_type.default_ttl_ms());
        let expires_at = ttl.map(|t| now_ms.saturating_add(t));

        let slot = self.ns_state(ns)?;
        let _guard = self.stripe(ns, key);
        // Under the stripe lock: an erase that has marked the key waits for this write to end
        // before it shreds (see `shred`), or this write sees the mark.
        self.keyring.ensure_not_destroyed(&key_id)?;
        let rkey = record_key(ns, key);
        let existing = self.read_record(&rkey)?;
        if let Some(cur) = &existing {
            // A restarted node whose wall clock went back still orders after what it stored.
            self.clock.observe(cur.version.hlc, u64::MAX)?;
        }
        let version = Version {
            hlc: self.clock.tick(now_ms),
            origin: self.origin.clone(),
        };
        let plain = serde_json::to_vec(&Plain {
            value: req.value_json.clone(),
            tags: req.tags.clone(),
            subject: req.subject.clone(),
        })
        .map_err(|e| StorageError::Corrupt(e.to_string()))?;
        let sealed = match self.protection {
            Protection::Encrypted => {
                crypto::seal(&data_key, &value_aad(ns, key, &version, &key_ref), &plain)?
            }
            Protection::PlaintextForBenchmarks => Sealed {
                nonce: [0; 24],
                ct: plain,
            },
        };
        let rec = StoredRecord {
            version: version.clone(),
            value: Some(StoredValue {
                key_id: key_ref,
                memory_type: req.memory_type,
                sealed,
            }),
            expires_at,
        };
        let merged = match &existing {
            Some(cur) => cur.merge(&rec),
            None => rec,
        };
        self.commit(&slot, ns, key, &rkey, existing.as_ref(), Some(&merged))?;
        self.observers.notify(ns, key, Some(&req.value_json));
        Ok(MemoryItem {
            namespace: ns.to_string(),
            key: key.to_string(),
            value_json: req.value_json,
            version,
            memory_type: req.memory_type,
            expires_at,
            subject: req.subject,
            tags: req.tags,
        })
    }

    /// Read a live value.
    pub fn get(&self, ns: &str, key: &str, now_ms: u64) -> Result<Option<MemoryItem>> {
        validate_name("namespace", ns, self.limits.max_name_len)?;
        validate_name("key", key, self.limits.max_name_len)?;
        let rkey = record_key(ns, key);
        match self.read_record(&rkey)? {
            Some(rec) if rec.is_live(now_ms) => self.decode_item(ns, key, rkey, rec).map(Some),
            _ => Ok(None),
        }
    }

    /// Delete: write a tombstone over a live value. Returns whether a live value was there.
    pub fn delete(&self, ns: &str, key: &str, now_ms: u64) -> Result<bool> {
        Ok(self.delete_inner(ns, key, now_ms)?.is_some())
    }

    /// Delete; the tombstone written, if a live value was there (nothing is written for a key that
    /// is absent, deleted or expired: an expiry is the same instant on every replica).
    fn delete_inner(&self, ns: &str, key: &str, now_ms: u64) -> Result<Option<Delta>> {
        validate_name("namespace", ns, self.limits.max_name_len)?;
        validate_name("key", key, self.limits.max_name_len)?;
        let rkey = record_key(ns, key);
        let live = |rec: &Option<StoredRecord>| rec.as_ref().is_some_and(|r| r.is_live(now_ms));
        // Without taking state for a namespace nobody wrote to.
        if !live(&self.read_record(&rkey)?) {
            return Ok(None);
        }
        let slot = self.ns_state(ns)?;
        let _guard = self.stripe(ns, key);
        let existing = self.read_record(&rkey)?;
        let Some(cur) = existing.as_ref().filter(|_| live(&existing)) else {
            return Ok(None);
        };
        self.clock.observe(cur.version.hlc, u64::MAX)?;
        let tomb = StoredRecord {
            version: Version {
                hlc: self.clock.tick(now_ms),
                origin: self.origin.clone(),
            },
            value: None,
            expires_at: None,
        };
        let merged = cur.merge(&tomb);
        self.commit(&slot, ns, key, &rkey, Some(cur), Some(&merged))?;
        self.observers.notify(ns, key, None);
        let delta = Delta {
            namespace: ns.to_string(),
            key: key.to_string(),
            version: merged.version,
            expires_at: None,
            value: None,
        };
        Ok(Some(delta))
    }

    /// Live values of a namespace whose key starts with `prefix`, in key order, after `after`.
    /// Values of erased subjects are skipped.
    pub fn list(
        &self,
        ns: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        now_ms: u64,
    ) -> Result<Vec<MemoryItem>> {
        Ok(self
            .list_page(ns, prefix, after, limit, usize::MAX, now_ms)?
            .items)
    }

    /// [`MemoryStore::list`] within a byte budget: the page stops before the item that would take
    /// the sum of [`MemoryItem::payload_bytes`] past `max_bytes` (the first item is always
    /// returned, so a page always moves forward).
    pub fn list_page(
        &self,
        ns: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        max_bytes: usize,
        now_ms: u64,
    ) -> Result<ListPage> {
        validate_name("namespace", ns, self.limits.max_name_len)?;
        if !prefix.is_empty() {
            validate_prefix(prefix, self.limits.max_name_len)?;
        }
        let scan_prefix = record_key(ns, prefix);
        let after = after.map(|a| record_key(ns, a));
        let mut page = ListPage {
            items: Vec::new(),
            more: false,
            truncated: false,
        };
        if limit == 0 {
            return Ok(page);
        }
        let mut bytes = 0usize;
        self.engine.for_each(
            MEMORY_TREE,
            &scan_prefix,
            after.as_deref(),
            256,
            &mut |k, v| {
                let key = String::from_utf8_lossy(&k[ns.len() + 1..]).into_owned();
                let rec = decode_record(&v)?;
                if rec.is_live(now_ms) {
                    match self.decode_item(ns, &key, k, rec) {
                        Ok(item) => {
                            let size = item.payload_bytes();
                            if !page.items.is_empty() && bytes.saturating_add(size) > max_bytes {
                                page.more = true;
                                page.truncated = true;
                                return Ok(false);
                            }
                            bytes = bytes.saturating_add(size);
                            page.items.push(item);
                        }
                        Err(StorageError::Erased(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                if page.items.len() >= limit {
                    page.more = true;
                    return Ok(false);
                }
                Ok(true)
            },
        )?;
        if page.truncated {
            tracing::debug!(
                namespace = ns,
                items = page.items.len(),
                bytes,
                "list page cut at its byte budget"
            );
        }
        Ok(page)
    }

    /// Crypto-shred a subject: its key is destroyed, its values can no longer be read (they read
    /// as erased), and their ciphertext is dropped; for replication they become tombstones at
    /// their versions. Returns whether the subject had a key.
    pub fn erase_subject(&self, subject: &str, now_ms: u64) -> Result<bool> {
        validate_name("subject", subject, self.limits.max_name_len)?;
        let id = KeyId::Subject(subject.to_string());
        let existed = self.keyring.destroy(&id, now_ms)?;
        self.cache.purge(&self.keyring.key_ref(&id));
        // Again even when erased before: shredding is idempotent and repairs an interrupted erase.
        self.shred(&[subject.to_string()])?;
        Ok(existed)
    }

    /// The raw stored record (for replication and tests).
    pub fn record(&self, ns: &str, key: &str) -> Result<Option<StoredRecord>> {
        self.read_record(&record_key(ns, key))
    }

    /// `rkey` is the record key of `ns`/`key` (the caller has it already).
    fn decode_item(
        &self,
        ns: &str,
        key: &str,
        rkey: Vec<u8>,
        rec: StoredRecord,
    ) -> Result<MemoryItem> {
        let Some(stored) = rec.value else {
            return Err(StorageError::Corrupt("tombstone has no value".into()));
        };
        if stored.is_shredded() {
            return Err(stored.key_id.erased());
        }
        let plain = match self.cache.get(&rkey, &rec.version) {
            Some(p) => p,
            None => {
                let epoch = self.cache.epoch();
                let bytes = match self.protection {
                    Protection::Encrypted => {
                        let data_key = self.keyring.get_ref(&stored.key_id)?;
                        let aad = value_aad(ns, key, &rec.version, &stored.key_id);
                        crypto::open(&data_key, &aad, &stored.sealed, "memory value")?
                    }
                    Protection::PlaintextForBenchmarks => stored.sealed.ct,
                };
                let size = bytes.len();
                let plain: Arc<Plain> = Arc::new(
                    serde_json::from_slice(&bytes)
                        .map_err(|e| StorageError::Corrupt(format!("{ns}/{key}: {e}")))?,
                );
                self.cache.insert(
                    epoch,
                    rkey,
                    rec.version.clone(),
                    stored.key_id.clone(),
                    plain.clone(),
                    size,
                );
                plain
            }
        };
        Ok(MemoryItem {
            namespace: ns.to_string(),
            key: key.to_string(),
            value_json: plain.value.clone(),
            version: rec.version,
            memory_type: stored.memory_type,
            expires_at: rec.expires_at,
            subject: match stored.key_id {
                KeyRef::Namespace(_) => None,
                KeyRef::LegacySubject(s) => Some(s),
                KeyRef::Subject(_) => plain.subject.clone(),
            },
            tags: plain.tags.clone(),
        })
    }

    fn read_record(&self, rkey: &[u8]) -> Result<Option<StoredRecord>> {
        match self.engine.get(MEMORY_TREE, rkey)? {
            Some(bytes) => decode_record(&bytes).map(Some),
            None => Ok(None),
        }
    }

    fn write_record(&self, rkey: &[u8], rec: &StoredRecord) -> Result<()> {
        let bytes = postcard::to_stdvec(rec).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        self.engine.put(MEMORY_TREE, rkey, &bytes)
    }

    fn stripe(&self, ns: &str, key: &str) -> std::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (ns, key).hash(&mut h);
        // The modulo keeps the index within the stripe count.
        let i = (h.finish() % LOCK_STRIPES as u64) as usize;
        lock(&self.stripes[i])
    }

    /// Check a value as a write of it would.
    fn validate_value(
        &self,
        value_json: &str,
        subject: Option<&str>,
        tags: &[String],
    ) -> Result<()> {
        if let Some(s) = subject {
            validate_name("subject", s, self.limits.max_name_len)?;
        }
        let limit = self.limits.max_value_bytes;
        if value_json.len() > limit {
            return Err(StorageError::TooLarge {
                size: value_json.len(),
                limit,
            });
        }
        let bad_tags = |message: String| StorageError::InvalidInput {
            field: "tags",
            message,
        };
        if tags.len() > self.limits.max_tags {
            return Err(bad_tags(format!(
                "{} tags, at most {} allowed",
                tags.len(),
                self.limits.max_tags
            )));
        }
        let mut total = value_json.len();
        for t in tags {
            if t.len() > self.limits.max_tag_bytes {
                return Err(bad_tags(format!(
                    "a tag is longer than {} bytes",
                    self.limits.max_tag_bytes
                )));
            }
            total = total.saturating_add(t.len());
        }
        // Tags are stored with the value: together they stay within the value limit.
        if total > limit {
            return Err(bad_tags(format!(
                "value and tags take {total} bytes, more than the limit of {limit}"
            )));
        }
        Ok(())
    }

    /// The digest state of `ns`, built by one scan on first use. Every write calls this before it
    /// touches a record, so no write can race the scan (writes wait for it on the slot's lock).
    fn ns_state(&self, ns: &str) -> Result<NsSlot> {
        let slot = lock(&self.digests)
            .entry(ns.to_string())
            .or_default()
            .clone();
        let mut state = lock(&slot.state);
        if state.is_none() {
            let mut d = DigestState::default();
            self.engine.for_each(
                MEMORY_TREE,
                &record_key(ns, ""),
                None,
                1024,
                &mut |k, v| {
                    let key = String::from_utf8_lossy(&k[ns.len() + 1..]).into_owned();
                    match decode_record(&v) {
                        Ok(rec) => d.add_scanned(&key, Some(&entry_of(&rec))),
                        Err(e) => {
                            tracing::warn!(namespace = ns, key, error = %e, "undecodable memory record");
                            d.add_scanned(&key, None);
                        }
                    }
                    Ok(true)
                },
            )?;
            *state = Some(d);
        }
        drop(state);
        Ok(slot)
    }

    /// Replace the record `old` of `ns`/`key` by `new` (`None` removes it), keeping the digest and
    /// the count of `slot` (from [`Self::ns_state`]) in step. A new key takes a slot of the
    /// namespace first, or fails with `NamespaceFull`. The caller holds the key's stripe lock and
    /// read `old` under it.
    fn commit(
        &self,
        slot: &NsSlot,
        ns: &str,
        key: &str,
        rkey: &[u8],
        old: Option<&StoredRecord>,
        new: Option<&StoredRecord>,
    ) -> Result<()> {
        let reserved = old.is_none() && new.is_some();
        if reserved {
            let mut state = lock(&slot.state);
            let d = state
                .as_mut()
                .ok_or_else(|| StorageError::Engine(format!("digest of `{ns}` not built")))?;
            if !d.reserve(self.limits.max_namespace_entries) {
                return Err(StorageError::NamespaceFull(ns.to_string()));
            }
        }
        let res = match new {
            Some(rec) => self.write_record(rkey, rec),
            None => self.engine.remove(MEMORY_TREE, rkey),
        };
        self.cache.remove(rkey);
        let mut state = lock(&slot.state);
        if let Some(d) = state.as_mut() {
            if reserved {
                d.release();
            }
            if res.is_ok() {
                d.replace(key, old.map(entry_of).as_ref(), new.map(entry_of).as_ref());
            }
        }
        // After the write is visible: a reader that saw the old count reads again.
        if res.is_ok() {
            slot.changes.fetch_add(1, Ordering::Release);
        }
        res
    }
}

fn key_id_for(ns: &str, subject: Option<&str>) -> KeyId {
    match subject {
        Some(s) => KeyId::Subject(s.to_string()),
        None => KeyId::Namespace(ns.to_string()),
    }
}

/// Decode a stored record; never panics on arbitrary bytes.
pub fn decode_record(bytes: &[u8]) -> Result<StoredRecord> {
    postcard::from_bytes(bytes).map_err(|e| StorageError::Corrupt(format!("memory record: {e}")))
}

fn record_key(ns: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(ns.len() + key.len() + 1);
    k.extend_from_slice(ns.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

/// Authenticated data: binds the ciphertext to its namespace, key, version and key reference.
pub(crate) fn value_aad(ns: &str, key: &str, v: &Version, key_ref: &KeyRef) -> Vec<u8> {
    let (kind, id): (&[u8], &[u8]) = match key_ref {
        KeyRef::Namespace(n) => (b"ns:", n.as_bytes()),
        KeyRef::LegacySubject(s) => (b"subject:", s.as_bytes()),
        KeyRef::Subject(h) => (b"sid:", h.as_slice()),
    };
    let mut aad = Vec::with_capacity(64 + ns.len() + key.len() + v.origin.len() + id.len());
    aad.extend_from_slice(b"swarm-mem-v1");
    for part in [ns.as_bytes(), key.as_bytes(), v.origin.as_bytes()] {
        aad.extend_from_slice(&(part.len() as u64).to_be_bytes());
        aad.extend_from_slice(part);
    }
    aad.extend_from_slice(&v.hlc.0.to_be_bytes());
    aad.extend_from_slice(kind);
    aad.extend_from_slice(id);
    aad
}

/// Names (namespaces, keys, subjects): 1..=max bytes of `A-Z a-z 0-9 . _ : -`, not starting with
/// `.` and never containing `..`, so no name can climb out of anything path-like.
pub fn validate_name(field: &'static str, name: &str, max: usize) -> Result<()> {
    let bad = |message: String| StorageError::InvalidInput { field, message };
    if name.is_empty() {
        return Err(bad("must not be empty".into()));
    }
    if name.len() > max {
        return Err(bad(format!("longer than {max} bytes")));
    }
    if name.starts_with('.') || name.contains("..") {
        return Err(bad("must not start with `.` or contain `..`".into()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(bad(format!(
            "character {c:?} not allowed (use letters, digits, `.`, `_`, `:`, `-`)"
        )));
    }
    Ok(())
}

fn validate_prefix(prefix: &str, max: usize) -> Result<()> {
    if prefix.len() > max
        || !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
    {
        return Err(StorageError::InvalidInput {
            field: "prefix",
            message: "use letters, digits, `.`, `_`, `:`, `-`".into(),
        });
    }
    Ok(())
}
