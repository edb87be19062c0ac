//! Envelope encryption: XChaCha20-Poly1305 with a random 24-byte nonce per value; per-namespace and
//! per-subject data keys, each wrapped by the node's master key; a destroyed subject key can
//! never be recreated (crypto-shredding).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
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
        rand::rngs::OsRng.fill_bytes(&mut b);
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
    rand::thread_rng().fill_bytes(&mut nonce);
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

/// Identifies a data key: a namespace's or a subject's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum KeyId {
    Namespace(String),
    Subject(String),
}

impl KeyId {
    fn storage_key(&self) -> Vec<u8> {
        match self {
            KeyId::Namespace(n) => format!("ns:{n}").into_bytes(),
            KeyId::Subject(s) => format!("subject:{s}").into_bytes(),
        }
    }
}

/// Data keys, wrapped by the master key and cached unwrapped in memory.
#[derive(Debug)]
pub struct Keyring {
    master: SecretKey,
    engine: Arc<dyn Engine>,
    cache: RwLock<HashMap<KeyId, Arc<SecretKey>>>,
}

impl Keyring {
    pub fn new(master: SecretKey, engine: Arc<dyn Engine>) -> Self {
        Self {
            master,
            engine,
            cache: RwLock::new(HashMap::new()),
        }
    }

    pub fn master(&self) -> &SecretKey {
        &self.master
    }

    /// Whether the key has been destroyed (a grow-only set).
    pub fn is_destroyed(&self, id: &KeyId) -> Result<bool> {
        Ok(self
            .engine
            .get(DESTROYED_TREE, &id.storage_key())?
            .is_some())
    }

    /// The data key, created (and wrapped and stored) on first use. Refuses a destroyed key.
    pub fn get_or_create(&self, id: &KeyId) -> Result<Arc<SecretKey>> {
        if let Some(k) = self.cached(id) {
            return Ok(k);
        }
        let mut cache = self
            .cache
            .write()
            .map_err(|_| StorageError::Engine("keyring lock poisoned".into()))?;
        if let Some(k) = cache.get(id) {
            return Ok(k.clone());
        }
        if self.is_destroyed(id)? {
            return Err(erased(id));
        }
        let key = match self.load(id)? {
            Some(k) => k,
            None => {
                let k = SecretKey::generate();
                let wrapped = seal(&self.master, &wrap_aad(id), k.bytes())?;
                let bytes = postcard::to_stdvec(&wrapped)
                    .map_err(|e| StorageError::Corrupt(e.to_string()))?;
                self.engine.put(KEYS_TREE, &id.storage_key(), &bytes)?;
                k
            }
        };
        let key = Arc::new(key);
        cache.insert(id.clone(), key.clone());
        Ok(key)
    }

    /// The data key if it exists and is not destroyed.
    pub fn get(&self, id: &KeyId) -> Result<Arc<SecretKey>> {
        if let Some(k) = self.cached(id) {
            return Ok(k);
        }
        if self.is_destroyed(id)? {
            return Err(erased(id));
        }
        match self.load(id)? {
            Some(k) => {
                let k = Arc::new(k);
                let mut cache = self
                    .cache
                    .write()
                    .map_err(|_| StorageError::Engine("keyring lock poisoned".into()))?;
                // `destroy` marks before it takes this lock to forget: check again under it, so
                // a key destroyed meanwhile is never cached again.
                if self.is_destroyed(id)? {
                    return Err(erased(id));
                }
                cache.insert(id.clone(), k.clone());
                Ok(k)
            }
            None => Err(StorageError::Decrypt(format!("no data key for {id:?}"))),
        }
    }

    /// Refuses a destroyed key. Cheap for a key in use: a cached key is not destroyed, or is
    /// being destroyed by a call that has not yet returned.
    pub fn ensure_not_destroyed(&self, id: &KeyId) -> Result<()> {
        if self.cached(id).is_some() || !self.is_destroyed(id)? {
            Ok(())
        } else {
            Err(erased(id))
        }
    }

    /// The destroyed subjects, in name order (the grow-only set that replicas exchange).
    pub fn destroyed_subjects(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        self.engine
            .for_each(DESTROYED_TREE, b"subject:", None, 1024, &mut |k, _| {
                out.push(String::from_utf8_lossy(&k[b"subject:".len()..]).into_owned());
                Ok(true)
            })?;
        Ok(out)
    }

    fn cached(&self, id: &KeyId) -> Option<Arc<SecretKey>> {
        self.cache.read().ok().and_then(|c| c.get(id).cloned())
    }

    fn load(&self, id: &KeyId) -> Result<Option<SecretKey>> {
        let Some(bytes) = self.engine.get(KEYS_TREE, &id.storage_key())? else {
            return Ok(None);
        };
        let wrapped: Sealed = postcard::from_bytes(&bytes)
            .map_err(|e| StorageError::Corrupt(format!("wrapped key: {e}")))?;
        let mut plain = open(&self.master, &wrap_aad(id), &wrapped, "data key")?;
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
        let sk = id.storage_key();
        self.engine
            .put(DESTROYED_TREE, &sk, &now_ms.to_be_bytes())?;
        let existed = self.engine.get(KEYS_TREE, &sk)?.is_some();
        self.engine.remove(KEYS_TREE, &sk)?;
        if let Ok(mut cache) = self.cache.write() {
            cache.remove(id);
        }
        Ok(existed)
    }
}

fn erased(id: &KeyId) -> StorageError {
    match id {
        KeyId::Subject(s) => StorageError::Erased(s.clone()),
        KeyId::Namespace(n) => StorageError::Erased(format!("namespace {n}")),
    }
}

fn wrap_aad(id: &KeyId) -> Vec<u8> {
    let mut aad = b"swarm-keywrap-v1:".to_vec();
    aad.extend_from_slice(&id.storage_key());
    aad
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
            .get(KEYS_TREE, b"subject:alice")
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
