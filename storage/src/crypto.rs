//! Envelope encryption: XChaCha20-Poly1305 with a random 24-byte nonce per value; per-namespace and
//! per-subject data keys, each wrapped by the node's master key; a destroyed subject key can
//! never be recreated (crypto-shredding).
//!
//! Subject names never reach the engine in plaintext: a subject's key, its destroyed mark and the
//! records sealed under it are found by its keyed id (HMAC-SHA256 of the name under a key derived
//! from the master key, see [`Keyring::subject_id`]); the destroyed set, which replicas exchange
//! by name, keeps each name sealed (XChaCha20-Poly1305 under another master-derived key) in the
//! mark's value. Stores written before keyed ids (`subject:NAME` keys) are rewritten by
//! [`Keyring::migrate_legacy`] when they are opened.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroize;

use crate::engine::Engine;
use crate::error::{Result, StorageError};

pub(crate) const KEYS_TREE: &str = "keys";
pub(crate) const DESTROYED_TREE: &str = "destroyed";

/// A 256-bit key that is wiped from memory on drop.
#[derive(Clone)]
pub struct SecretKey([u8; 32]);

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    pub fn from_bytes(b: [u8; 32]) -> Self {
        SecretKey(b)
    }

    pub fn generate() -> Self {
        let mut b = [0u8; 32];
        // Straight from the OS: this is a long-lived key. `UnwrapErr` panics only if the OS has
        // no entropy to give at all, which no caller could recover from.
        rand::rand_core::UnwrapErr(rand::rngs::SysRng).fill_bytes(&mut b);
        SecretKey(b)
    }

    /// Parse 64 hex characters.
    pub fn from_hex(s: &str) -> Result<Self> {
        let bytes = hex::decode(s.trim())
            .map_err(|e| StorageError::BadMasterKey(format!("not hex: {e}")))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| StorageError::BadMasterKey("expected 32 bytes (64 hex chars)".into()))?;
        Ok(SecretKey(arr))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Derive a purpose-specific subkey (HMAC-SHA256 as a PRF).
    pub fn derive(&self, purpose: &str) -> SecretKey {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(b"swarm-kdf-v1:");
        mac.update(purpose.as_bytes());
        SecretKey(mac.finalize().into_bytes().into())
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// A sealed value: nonce and ciphertext (with the Poly1305 tag at the end).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Sealed {
    pub nonce: [u8; 24],
    pub ct: Vec<u8>,
}

/// Encrypt `plain` under `key`, binding `aad`.
pub fn seal(key: &SecretKey, aad: &[u8], plain: &[u8]) -> Result<Sealed> {
    let cipher = XChaCha20Poly1305::new(key.bytes().into());
    // ThreadRng is a CSPRNG (ChaCha12) seeded and periodically reseeded from the OS: random
    // 192-bit nonces without a system call per value.
    let mut nonce = [0u8; 24];
    rand::rng().fill_bytes(&mut nonce);
    let ct = cipher
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad })
        .map_err(|_| StorageError::Engine("encryption failed".into()))?;
    Ok(Sealed { nonce, ct })
}

/// Decrypt and authenticate; `what` names the record in the error.
pub fn open(key: &SecretKey, aad: &[u8], sealed: &Sealed, what: &str) -> Result<Vec<u8>> {
    let cipher = XChaCha20Poly1305::new(key.bytes().into());
    cipher
        .decrypt(
            XNonce::from_slice(&sealed.nonce),
            Payload {
                msg: &sealed.ct,
                aad,
            },
        )
        .map_err(|_| StorageError::Decrypt(what.to_string()))
}

/// Identifies a data key by name: a namespace's or a subject's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum KeyId {
    Namespace(String),
    Subject(String),
}

/// A subject's keyed id: HMAC-SHA256 of its name under a key derived from the master key.
pub type SubjectId = [u8; 32];

/// How a stored record names the data key that sealed it: never by a subject's name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum KeyRef {
    /// The namespace's key (the namespace is in the record's key anyway).
    Namespace(String),
    /// A subject by name, as stores before keyed ids wrote it; only read, and rewritten by
    /// `MemoryStore::migrate_legacy` on open.
    LegacySubject(String),
    /// A subject by its keyed id.
    Subject(SubjectId),
}

impl KeyRef {
    /// The key of its data key in the `keys` tree (and of its mark in `destroyed`).
    pub(crate) fn slot(&self) -> Vec<u8> {
        match self {
            KeyRef::Namespace(n) => [NS_SLOT, n.as_bytes()].concat(),
            KeyRef::LegacySubject(s) => [LEGACY_SUBJECT_SLOT, s.as_bytes()].concat(),
            KeyRef::Subject(h) => [SUBJECT_SLOT, h.as_slice()].concat(),
        }
    }

    pub(crate) fn erased(&self) -> StorageError {
        match self {
            KeyRef::Namespace(n) => StorageError::Erased(format!("namespace {n}")),
            KeyRef::LegacySubject(s) => StorageError::Erased(s.clone()),
            // The name is not kept with the record: a short form of the keyed id stands for it.
            KeyRef::Subject(h) => StorageError::Erased(format!("#{}", hex::encode(&h[..6]))),
        }
    }
}

const NS_SLOT: &[u8] = b"ns:";
const LEGACY_SUBJECT_SLOT: &[u8] = b"subject:";
const SUBJECT_SLOT: &[u8] = b"sid:";

/// The value of a mark in the `destroyed` tree.
#[derive(Debug, Serialize, Deserialize)]
struct DestroyedMark {
    at_ms: u64,
    /// A subject's name, sealed (the destroyed set is exchanged by name).
    name: Option<Sealed>,
}

/// Data keys, wrapped by the master key and cached unwrapped in memory.
#[derive(Debug)]
pub struct Keyring {
    master: SecretKey,
    /// Keys subject ids (HMAC).
    id_key: SecretKey,
    /// Seals the names of destroyed subjects.
    name_key: SecretKey,
    engine: Arc<dyn Engine>,
    /// By slot.
    cache: RwLock<HashMap<Vec<u8>, Arc<SecretKey>>>,
}

fn poisoned() -> StorageError {
    StorageError::Engine("keyring lock poisoned".into())
}

impl Keyring {
    pub fn new(master: SecretKey, engine: Arc<dyn Engine>) -> Self {
        Self {
            id_key: master.derive("subject-id"),
            name_key: master.derive("subject-name"),
            master,
            engine,
            cache: RwLock::new(HashMap::new()),
        }
    }

    pub fn master(&self) -> &SecretKey {
        &self.master
    }

    /// The keyed id of a subject.
    pub fn subject_id(&self, subject: &str) -> SubjectId {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.id_key.bytes())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(b"swarm-subject-v1:");
        mac.update(subject.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// How records refer to the key `id`.
    pub fn key_ref(&self, id: &KeyId) -> KeyRef {
        match id {
            KeyId::Namespace(n) => KeyRef::Namespace(n.clone()),
            KeyId::Subject(s) => KeyRef::Subject(self.subject_id(s)),
        }
    }

    /// Whether the key has been destroyed (a grow-only set).
    pub fn is_destroyed(&self, id: &KeyId) -> Result<bool> {
        self.is_destroyed_slot(&self.key_ref(id).slot())
    }

    fn is_destroyed_slot(&self, slot: &[u8]) -> Result<bool> {
        Ok(self.engine.get(DESTROYED_TREE, slot)?.is_some())
    }

    /// The data key, created (and wrapped and stored) on first use. Refuses a destroyed key.
    pub fn get_or_create(&self, id: &KeyId) -> Result<Arc<SecretKey>> {
        let slot = self.key_ref(id).slot();
        if let Some(k) = self.cached(&slot) {
            return Ok(k);
        }
        let mut cache = self.cache.write().map_err(|_| poisoned())?;
        if let Some(k) = cache.get(&slot) {
            return Ok(k.clone());
        }
        if self.is_destroyed_slot(&slot)? {
            return Err(erased(id));
        }
        let key = match self.load(&slot)? {
            Some(k) => k,
            None => {
                let k = SecretKey::generate();
                self.store_wrapped(&slot, &k)?;
                k
            }
        };
        let key = Arc::new(key);
        cache.insert(slot, key.clone());
        Ok(key)
    }

    /// The data key if it exists and is not destroyed.
    pub fn get(&self, id: &KeyId) -> Result<Arc<SecretKey>> {
        self.get_ref(&self.key_ref(id)).map_err(|e| match e {
            StorageError::Erased(_) => erased(id),
            other => other,
        })
    }

    /// [`Keyring::get`] by the reference a record holds.
    pub fn get_ref(&self, r: &KeyRef) -> Result<Arc<SecretKey>> {
        let slot = r.slot();
        if let Some(k) = self.cached(&slot) {
            return Ok(k);
        }
        if self.is_destroyed_slot(&slot)? {
            return Err(r.erased());
        }
        match self.load(&slot)? {
            Some(k) => {
                let k = Arc::new(k);
                let mut cache = self.cache.write().map_err(|_| poisoned())?;
                // `destroy` marks before it takes this lock to forget: check again under it, so
                // a key destroyed meanwhile is never cached again.
                if self.is_destroyed_slot(&slot)? {
                    return Err(r.erased());
                }
                cache.insert(slot, k.clone());
                Ok(k)
            }
            None => Err(StorageError::Decrypt(match r {
                KeyRef::Namespace(n) => format!("no data key for namespace {n}"),
                _ => "no data key for a subject".into(),
            })),
        }
    }

    /// Refuses a destroyed key. Cheap for a key in use: a cached key is not destroyed, or is
    /// being destroyed by a call that has not yet returned.
    pub fn ensure_not_destroyed(&self, id: &KeyId) -> Result<()> {
        let slot = self.key_ref(id).slot();
        if self.cached(&slot).is_some() || !self.is_destroyed_slot(&slot)? {
            Ok(())
        } else {
            Err(erased(id))
        }
    }

    /// The destroyed subjects, in name order (the grow-only set that replicas exchange).
    pub fn destroyed_subjects(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        self.engine
            .for_each(DESTROYED_TREE, SUBJECT_SLOT, None, 1024, &mut |k, v| {
                let mark = decode_mark(&v)?;
                let sealed = mark.name.ok_or_else(|| {
                    StorageError::Corrupt("destroyed subject without its name".into())
                })?;
                let name = open(&self.name_key, &name_aad(&k), &sealed, "destroyed subject")?;
                out.push(
                    String::from_utf8(name)
                        .map_err(|_| StorageError::Corrupt("destroyed subject name".into()))?,
                );
                Ok(true)
            })?;
        out.sort_unstable();
        Ok(out)
    }

    fn cached(&self, slot: &[u8]) -> Option<Arc<SecretKey>> {
        self.cache.read().ok().and_then(|c| c.get(slot).cloned())
    }

    fn store_wrapped(&self, slot: &[u8], k: &SecretKey) -> Result<()> {
        let wrapped = seal(&self.master, &wrap_aad(slot), k.bytes())?;
        let bytes =
            postcard::to_stdvec(&wrapped).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        self.engine.put(KEYS_TREE, slot, &bytes)
    }

    fn load(&self, slot: &[u8]) -> Result<Option<SecretKey>> {
        let Some(bytes) = self.engine.get(KEYS_TREE, slot)? else {
            return Ok(None);
        };
        let wrapped: Sealed = postcard::from_bytes(&bytes)
            .map_err(|e| StorageError::Corrupt(format!("wrapped key: {e}")))?;
        let mut plain = open(&self.master, &wrap_aad(slot), &wrapped, "data key")?;
        let arr: [u8; 32] = plain
            .as_slice()
            .try_into()
            .map_err(|_| StorageError::Corrupt("data key length".into()))?;
        plain.zeroize();
        Ok(Some(SecretKey::from_bytes(arr)))
    }

    /// Destroy a key for good: mark it destroyed first (so it can never be recreated), then delete
    /// the wrapped copy and forget the cached one. Returns whether a key existed.
    pub fn destroy(&self, id: &KeyId, now_ms: u64) -> Result<bool> {
        let slot = self.key_ref(id).slot();
        self.mark_destroyed(&slot, id, now_ms)?;
        let existed = self.engine.get(KEYS_TREE, &slot)?.is_some();
        self.engine.remove(KEYS_TREE, &slot)?;
        if let Ok(mut cache) = self.cache.write() {
            cache.remove(&slot);
        }
        Ok(existed)
    }

    fn mark_destroyed(&self, slot: &[u8], id: &KeyId, now_ms: u64) -> Result<()> {
        let name = match id {
            KeyId::Subject(s) => Some(seal(&self.name_key, &name_aad(slot), s.as_bytes())?),
            KeyId::Namespace(_) => None,
        };
        let mark = DestroyedMark {
            at_ms: now_ms,
            name,
        };
        let bytes = postcard::to_stdvec(&mark).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        self.engine.put(DESTROYED_TREE, slot, &bytes)
    }

    /// Rewrite what a store from before keyed subject ids holds under `subject:NAME`: wrapped keys
    /// move to their keyed slot (wrapped again, the slot is in the wrapping's AAD), destroyed marks
    /// get the sealed name. Idempotent; an interrupted run is finished by the next. Returns how
    /// many entries were rewritten. Memory records are `MemoryStore::migrate_legacy`'s.
    pub fn migrate_legacy(&self) -> Result<usize> {
        let mut done = 0;
        // Each pass removes what it rewrote, so the next scan starts again at the front.
        loop {
            let batch = self
                .engine
                .scan(DESTROYED_TREE, LEGACY_SUBJECT_SLOT, None, 256)?;
            if batch.is_empty() {
                break;
            }
            for (old, v) in batch {
                self.migrate_legacy_mark(&old, &v)?;
                done += 1;
            }
        }
        loop {
            let batch = self
                .engine
                .scan(KEYS_TREE, LEGACY_SUBJECT_SLOT, None, 256)?;
            if batch.is_empty() {
                break;
            }
            for (old, _) in batch {
                self.migrate_legacy_key(&old)?;
                done += 1;
            }
        }
        if done > 0 {
            tracing::info!(
                entries = done,
                "keyring: subject ids rewritten as keyed ids"
            );
        }
        Ok(done)
    }

    fn migrate_legacy_mark(&self, old: &[u8], v: &[u8]) -> Result<()> {
        let id = KeyId::Subject(legacy_name(old)?);
        let at_ms = v.try_into().map(u64::from_be_bytes).unwrap_or_default();
        let slot = self.key_ref(&id).slot();
        self.mark_destroyed(&slot, &id, at_ms)?;
        self.engine.remove(KEYS_TREE, &slot)?;
        self.engine.remove(KEYS_TREE, old)?;
        self.engine.remove(DESTROYED_TREE, old)
    }

    fn migrate_legacy_key(&self, old: &[u8]) -> Result<()> {
        let id = KeyId::Subject(legacy_name(old)?);
        let slot = self.key_ref(&id).slot();
        if self.engine.get(KEYS_TREE, &slot)?.is_none()
            && !self.is_destroyed_slot(&slot)?
            && let Some(k) = self.load(old)?
        {
            self.store_wrapped(&slot, &k)?;
        }
        self.engine.remove(KEYS_TREE, old)
    }
}

fn legacy_name(slot: &[u8]) -> Result<String> {
    String::from_utf8(slot[LEGACY_SUBJECT_SLOT.len()..].to_vec())
        .map_err(|_| StorageError::Corrupt("legacy subject key".into()))
}

fn decode_mark(bytes: &[u8]) -> Result<DestroyedMark> {
    postcard::from_bytes(bytes).map_err(|e| StorageError::Corrupt(format!("destroyed mark: {e}")))
}

fn erased(id: &KeyId) -> StorageError {
    match id {
        KeyId::Subject(s) => StorageError::Erased(s.clone()),
        KeyId::Namespace(n) => StorageError::Erased(format!("namespace {n}")),
    }
}

fn wrap_aad(slot: &[u8]) -> Vec<u8> {
    [b"swarm-keywrap-v1:".as_slice(), slot].concat()
}

fn name_aad(slot: &[u8]) -> Vec<u8> {
    [b"swarm-subject-name-v1:".as_slice(), slot].concat()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::MemEngine;

    #[test]
    fn seal_open_round_trip_and_aad_binding() {
        let k = SecretKey::generate();
        let s = seal(&k, b"aad", b"hello").expect("seal");
        assert_eq!(open(&k, b"aad", &s, "x").expect("open"), b"hello");
        assert!(open(&k, b"other", &s, "x").is_err());
        assert!(open(&SecretKey::generate(), b"aad", &s, "x").is_err());
        let mut t = s.clone();
        t.ct[0] ^= 1;
        assert!(open(&k, b"aad", &t, "x").is_err());
        let s2 = seal(&k, b"aad", b"hello").expect("seal");
        assert_ne!(s.nonce, s2.nonce, "nonces are random");
    }

    #[test]
    fn hex_round_trip() {
        let k = SecretKey::generate();
        let k2 = SecretKey::from_hex(&k.to_hex()).expect("hex");
        assert_eq!(k.bytes(), k2.bytes());
        assert!(SecretKey::from_hex("abcd").is_err());
        assert!(SecretKey::from_hex("zz").is_err());
    }

    #[test]
    fn keys_persist_wrapped_and_destroyed_keys_stay_dead() {
        let engine: Arc<dyn Engine> = Arc::new(MemEngine::new());
        let master = SecretKey::generate();
        let id = KeyId::Subject("alice".into());
        let k1 = Keyring::new(master.clone(), engine.clone())
            .get_or_create(&id)
            .expect("create");
        // A fresh keyring over the same engine unwraps the same key.
        let ring = Keyring::new(master.clone(), engine.clone());
        assert_eq!(ring.get(&id).expect("get").bytes(), k1.bytes());
        // The stored form is not the key.
        let stored = engine
            .get(KEYS_TREE, &ring.key_ref(&id).slot())
            .expect("get")
            .expect("stored");
        assert!(!stored.windows(32).any(|w| w == k1.bytes()));
        // Another master key cannot unwrap it.
        let other = Keyring::new(SecretKey::generate(), engine.clone());
        assert_eq!(
            other.get(&id).expect_err("wrong master").kind(),
            "decrypt_failed"
        );
        // Destroyed: gone, and never recreated.
        assert!(ring.destroy(&id, 1).expect("destroy"));
        assert_eq!(ring.get(&id).expect_err("erased").kind(), "subject_erased");
        assert_eq!(
            ring.get_or_create(&id).expect_err("erased").kind(),
            "subject_erased"
        );
        let fresh = Keyring::new(master, engine);
        assert_eq!(
            fresh.get_or_create(&id).expect_err("erased").kind(),
            "subject_erased"
        );
    }
}
