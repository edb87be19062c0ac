//! Authentication: JWT bearer tokens and API keys, and the token revocation list.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ed25519_dalek::{Signer as _, SigningKey};
use rand::TryRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use swarm_storage::{Delta, Engine, MemoryStore, PutRequest, Storage, StorageError, trees};

use crate::jwt::{Claims, JwtError, Verifier};

/// How the caller proved who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthType {
    Jwt,
    ApiKey,
    /// Only in the bench-only build without authentication.
    Disabled,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Principal {
    pub subject: String,
    pub role: String,
    pub auth_type: AuthType,
    /// Token id (JWT) or key id (API key).
    pub credential_id: String,
    /// Seconds since the epoch.
    pub expires_at: u64,
}

/// Why a request is not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required: send `Authorization: Bearer <token>` or `X-API-Key`")]
    Missing,
    #[error("unsupported authorization scheme (use Bearer)")]
    Scheme,
    #[error("{0}")]
    Token(JwtError),
    #[error("token has been revoked")]
    Revoked,
    #[error("invalid API key")]
    ApiKeyInvalid,
    #[error("API key expired")]
    ApiKeyExpired,
    #[error("API key revoked")]
    ApiKeyRevoked,
    #[error("authentication store unavailable")]
    Store,
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "unauthenticated",
            AuthError::Scheme => "unsupported_auth_scheme",
            AuthError::Token(e) => e.code(),
            AuthError::Revoked => "token_revoked",
            AuthError::ApiKeyInvalid => "invalid_api_key",
            AuthError::ApiKeyExpired => "api_key_expired",
            AuthError::ApiKeyRevoked => "api_key_revoked",
            AuthError::Store => "auth_store",
        }
    }
}

/// The reserved memory namespace of API-key records (`apikey:ID`). The cluster's authentication
/// state replicates like any namespace (pushed at once, repaired by anti-entropy) and is sealed at
/// rest like any namespace; clients can neither read nor write it, and every record in it is
/// signed with the cluster's token-signing key (which every node holds), so a record that did not
/// come from a node (say, one a client of an older version wrote) is ignored.
pub const AUTH_NAMESPACE: &str = "_sys.auth";
/// The reserved namespace of revoked credentials (`revoked:HASH`), apart from the keys so that no
/// number of keys can fill it. Nothing in it is deleted before the credential it names has
/// expired: a grow-only set.
pub const REVOKED_NAMESPACE: &str = "_sys.revoked";
/// Namespaces starting with this are the node's own, never a client's.
pub const RESERVED_NAMESPACE_PREFIX: &str = "_sys";

/// Longest chain of credentials behind a key (a key made with a key made with a token ...).
pub const MAX_KEY_CHAIN: usize = 8;
/// Keys one owner may hold (unexpired, unrevoked) at once.
pub const MAX_KEYS_PER_OWNER: usize = 64;
/// Revocations and key records are kept this long past the expiry of what they name, so clock
/// skew and verification leeway never see a credential without its revocation.
const KEEP_PAST_EXPIRY_MS: u64 = 86_400_000;

/// A stored API key: only the hash of its secret is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub id: String,
    pub name: String,
    pub role: String,
    /// The subject that created it (the owner).
    pub owner: String,
    /// SHA-256 of the secret part, hex.
    pub secret_hash: String,
    pub created_at: u64,
    pub expires_at: u64,
    /// The credentials it was made with, parent first (`jwt:JTI`, `key:ID`): revoking any of them
    /// revokes this key.
    #[serde(default)]
    pub parents: Vec<String>,
}

impl ApiKeyRecord {
    /// This key as a credential (`key:ID`).
    pub fn credential(&self) -> String {
        format!("key:{}", self.id)
    }
}

/// A revocation as stored (the sled key is a hash of the credential).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Revocation {
    credential: String,
    /// Seconds since the epoch; `u64::MAX` when unknown (a bare `jti`).
    expires_at: u64,
    revoked_at_ms: u64,
}

/// The credential a principal authenticated with (`jwt:JTI`, `key:ID`), for revocation.
pub fn credential_of(p: &Principal) -> Option<String> {
    match p.auth_type {
        AuthType::Jwt => Some(format!("jwt:{}", p.credential_id)),
        AuthType::ApiKey => Some(format!("key:{}", p.credential_id)),
        AuthType::Disabled => None,
    }
}

fn revocation_key(credential: &str) -> String {
    format!(
        "revoked:{}",
        hex::encode(&Sha256::digest(credential.as_bytes())[..16])
    )
}

fn api_key_key(id: &str) -> String {
    format!("apikey:{id}")
}

/// A lifetime that ends `KEEP_PAST_EXPIRY_MS` after `expires_at_s`; `None` (kept for good) when
/// the expiry is unknown.
fn ttl_until(expires_at_s: u64, now_ms: u64) -> Option<u64> {
    (expires_at_s != u64::MAX).then(|| {
        expires_at_s
            .saturating_mul(1000)
            .saturating_add(KEEP_PAST_EXPIRY_MS)
            .saturating_sub(now_ms)
            .max(1)
    })
}

const API_KEY_PREFIX: &str = "swk_";
/// Most entries each of the authenticator's caches holds; past it the cache starts over.
const CACHE_MAX: usize = 8192;

/// Remember `value` under `key` in one of the authenticator's bounded caches.
fn remember<V>(cache: &RwLock<HashMap<String, V>>, key: String, value: V) {
    if let Ok(mut c) = cache.write() {
        if c.len() >= CACHE_MAX {
            c.clear();
        }
        c.insert(key, value);
    }
}

/// Checks credentials against the replicated authentication state. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Authenticator {
    verifier: Arc<Verifier>,
    memory: Arc<MemoryStore>,
    /// Tokens whose signature, issuer and audience were verified, keyed by the exact token text:
    /// an Ed25519 verification costs more than the rest of a small request. Expiry and revocation
    /// are still checked on every request.
    verified: Arc<RwLock<HashMap<String, Claims>>>,
    /// Credentials found not revoked, with the change count of [`REVOKED_NAMESPACE`] they were
    /// checked at: while that count stands still, nothing was revoked since, and the check costs
    /// no store read.
    not_revoked: Arc<RwLock<HashMap<String, u64>>>,
    /// The change count of [`REVOKED_NAMESPACE`] (read without a lock on every request).
    revocations: Arc<AtomicU64>,
    /// Signs the records this node writes (the cluster's token-signing key).
    signer: Arc<SigningKey>,
    /// Stored records whose signature was verified (store key → the stored text), so a record
    /// read again costs a comparison, not an Ed25519 verification.
    signed_ok: Arc<RwLock<HashMap<String, String>>>,
}

/// A signed record of the authentication state, ready to be written: the gateway hands it to the
/// memory service ([`swarm_actors::Memory::put_record`]), which writes, audits and pushes it.
#[derive(Debug)]
pub struct RecordWrite {
    /// [`AUTH_NAMESPACE`] or [`REVOKED_NAMESPACE`].
    pub namespace: &'static str,
    pub key: String,
    pub request: PutRequest,
}

/// A record as stored in the reserved namespaces: its JSON and a node's signature over it and
/// the key it is stored under.
#[derive(Debug, Serialize, Deserialize)]
struct SignedRecord {
    kid: String,
    record: String,
    sig: String,
}

fn signing_input(key: &str, record: &str) -> Vec<u8> {
    let mut m = b"swarm-auth-record-v1\0".to_vec();
    m.extend_from_slice(key.as_bytes());
    m.push(0);
    m.extend_from_slice(record.as_bytes());
    m
}

/// The first 4 bytes of an owner's hash, in hex: the first half of each of its key ids, so one
/// owner's keys are one prefix.
fn owner_prefix(owner: &str) -> String {
    hex::encode(&Sha256::digest(owner.as_bytes())[..4])
}

impl Authenticator {
    /// Over the node's store, signing what it writes with `signer` (the cluster's token-signing
    /// key; records signed with it or with a retired key the verifier still accepts are valid).
    /// Moves what an older version kept in node-local trees (revoked token ids, API-key records
    /// in plaintext) into the replicated, sealed namespaces.
    pub fn new(
        verifier: Verifier,
        signer: SigningKey,
        storage: &Storage,
    ) -> Result<Self, StorageError> {
        let a = Self {
            verifier: Arc::new(verifier),
            memory: storage.memory.clone(),
            verified: Arc::new(RwLock::new(HashMap::new())),
            not_revoked: Arc::new(RwLock::new(HashMap::new())),
            revocations: storage.memory.change_counter(REVOKED_NAMESPACE),
            signer: Arc::new(signer),
            signed_ok: Arc::new(RwLock::new(HashMap::new())),
        };
        a.migrate(&*storage.engine, now_ms())?;
        Ok(a)
    }

    fn migrate(&self, engine: &dyn Engine, now_ms: u64) -> Result<(), StorageError> {
        let mut revoked = Vec::new();
        engine.for_each(trees::REVOKED, b"", None, 1024, &mut |k, v| {
            let exp = <[u8; 8]>::try_from(v.as_slice())
                .map(u64::from_be_bytes)
                .unwrap_or(u64::MAX);
            revoked.push((k.to_vec(), exp));
            Ok(true)
        })?;
        for (k, exp) in revoked {
            let jti = String::from_utf8_lossy(&k).into_owned();
            self.revoke(&format!("jwt:{jti}"), exp, now_ms)?;
            engine.remove(trees::REVOKED, &k)?;
        }
        let mut keys = Vec::new();
        engine.for_each(trees::API_KEYS, b"", None, 1024, &mut |k, v| {
            keys.push((k.to_vec(), v.to_vec()));
            Ok(true)
        })?;
        for (k, v) in keys {
            #[derive(Deserialize)]
            struct Old {
                #[serde(flatten)]
                rec: ApiKeyRecord,
                #[serde(default)]
                revoked: bool,
            }
            match serde_json::from_slice::<Old>(&v) {
                Ok(old) => {
                    self.write_here(self.api_key_record(&old.rec, now_ms)?, now_ms)?;
                    if old.revoked {
                        self.revoke(&old.rec.credential(), old.rec.expires_at, now_ms)?;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "unreadable API-key record not migrated"),
            }
            engine.remove(trees::API_KEYS, &k)?;
        }
        Ok(())
    }

    /// Authenticate from the `Authorization` and `X-API-Key` header values.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        api_key: Option<&str>,
        now_s: u64,
    ) -> Result<Principal, AuthError> {
        if let Some(key) = api_key {
            return self.check_api_key(key.trim(), now_s);
        }
        let Some(value) = authorization else {
            return Err(AuthError::Missing);
        };
        let (scheme, cred) = value.trim().split_once(' ').ok_or(AuthError::Scheme)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Scheme);
        }
        let cred = cred.trim();
        if cred.starts_with(API_KEY_PREFIX) {
            return self.check_api_key(cred, now_s);
        }
        let claims = self.verify_cached(cred, now_s)?;
        if self
            .is_revoked(&format!("jwt:{}", claims.jti))
            .map_err(|_| AuthError::Store)?
        {
            return Err(AuthError::Revoked);
        }
        Ok(Principal {
            subject: claims.sub,
            role: claims.role,
            auth_type: AuthType::Jwt,
            credential_id: claims.jti,
            expires_at: claims.exp,
        })
    }

    fn verify_cached(&self, token: &str, now_s: u64) -> Result<Claims, AuthError> {
        let hit = self
            .verified
            .read()
            .ok()
            .and_then(|c| c.get(token).cloned());
        if let Some(claims) = hit {
            self.verifier
                .check_times(&claims, now_s)
                .map_err(AuthError::Token)?;
            return Ok(claims);
        }
        let claims = self
            .verifier
            .verify(token, now_s)
            .map_err(AuthError::Token)?;
        remember(&self.verified, token.to_string(), claims.clone());
        Ok(claims)
    }

    /// Decode a token's claims after full verification (for revoking by token).
    pub fn verify_token(&self, token: &str, now_s: u64) -> Result<Claims, AuthError> {
        self.verifier.verify(token, now_s).map_err(AuthError::Token)
    }

    /// Whether a credential (`jwt:JTI`, `key:ID`) is revoked here.
    pub fn is_revoked(&self, credential: &str) -> Result<bool, StorageError> {
        // The count first: a revocation landing after it moves it, and the next check reads.
        let changes = self.revocations.load(Ordering::Acquire);
        let known = self
            .not_revoked
            .read()
            .ok()
            .and_then(|c| c.get(credential).copied());
        if known == Some(changes) {
            return Ok(false);
        }
        let revoked = self
            .read::<Revocation>(REVOKED_NAMESPACE, &revocation_key(credential))?
            .is_some_and(|r| r.credential == credential);
        if !revoked {
            remember(&self.not_revoked, credential.to_string(), changes);
        }
        Ok(revoked)
    }

    /// The signed record that revokes a credential until `expires_at` (seconds; `u64::MAX` for
    /// good), to be written through the memory service (which audits and pushes it); `None`
    /// when it is revoked already (nothing to write again).
    pub fn revocation(
        &self,
        credential: &str,
        expires_at: u64,
        now_ms: u64,
    ) -> Result<Option<RecordWrite>, StorageError> {
        if self.is_revoked(credential)? {
            return Ok(None);
        }
        let value = Revocation {
            credential: credential.to_string(),
            expires_at,
            revoked_at_ms: now_ms,
        };
        self.signed(
            REVOKED_NAMESPACE,
            revocation_key(credential),
            &value,
            ttl_until(expires_at, now_ms),
        )
        .map(Some)
    }

    /// Revoke a credential by writing its record here only (no audit, no push): the start-up
    /// migration, whose records reach the peers by anti-entropy. Returns the delta written, or
    /// `None` when it was revoked already.
    fn revoke(
        &self,
        credential: &str,
        expires_at: u64,
        now_ms: u64,
    ) -> Result<Option<Delta>, StorageError> {
        match self.revocation(credential, expires_at, now_ms)? {
            Some(w) => self.write_here(w, now_ms).map(Some),
            None => Ok(None),
        }
    }

    /// Write a signed record into the local replica only (see [`Authenticator::revoke`]).
    fn write_here(&self, w: RecordWrite, now_ms: u64) -> Result<Delta, StorageError> {
        let (_, delta) = self
            .memory
            .put_with_delta(w.namespace, &w.key, w.request, now_ms)?;
        Ok(delta)
    }

    /// Store `value` under `key`, signed, here only.
    #[cfg(test)]
    fn put<T: Serialize>(
        &self,
        ns: &'static str,
        key: &str,
        value: &T,
        ttl_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<Delta, StorageError> {
        self.write_here(self.signed(ns, key.to_string(), value, ttl_ms)?, now_ms)
    }

    /// `value` as the record to store under `key` of `ns`, signed.
    fn signed<T: Serialize>(
        &self,
        ns: &'static str,
        key: String,
        value: &T,
        ttl_ms: Option<u64>,
    ) -> Result<RecordWrite, StorageError> {
        let record =
            serde_json::to_string(value).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        let signed = SignedRecord {
            kid: crate::jwt::kid(&self.signer.verifying_key()),
            sig: hex::encode(self.signer.sign(&signing_input(&key, &record)).to_bytes()),
            record,
        };
        let request = PutRequest {
            value_json: serde_json::to_string(&signed)
                .map_err(|e| StorageError::Corrupt(e.to_string()))?,
            ttl_ms,
            ..PutRequest::default()
        };
        Ok(RecordWrite {
            namespace: ns,
            key,
            request,
        })
    }

    /// The record stored under `key`, if there is one and a node signed it (with the current or
    /// a retired token-signing key). One that is not signed is ignored, and logged.
    fn read<T: serde::de::DeserializeOwned>(
        &self,
        ns: &str,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        let Some(item) = self.memory.get(ns, key, now_ms())? else {
            return Ok(None);
        };
        let corrupt = |e: serde_json::Error| StorageError::Corrupt(format!("{ns}/{key}: {e}"));
        let Ok(signed) = serde_json::from_str::<SignedRecord>(&item.value_json) else {
            tracing::warn!(
                namespace = ns,
                key,
                "unsigned authentication record ignored"
            );
            return Ok(None);
        };
        let cache_key = format!("{ns}\0{key}");
        let known = self
            .signed_ok
            .read()
            .ok()
            .is_some_and(|c| c.get(&cache_key) == Some(&item.value_json));
        if !known {
            if !self.signature_ok(key, &signed) {
                tracing::warn!(
                    namespace = ns,
                    key,
                    "unsigned or forged authentication record ignored"
                );
                return Ok(None);
            }
            remember(&self.signed_ok, cache_key, item.value_json.clone());
        }
        serde_json::from_str(&signed.record)
            .map(Some)
            .map_err(corrupt)
    }

    fn signature_ok(&self, key: &str, signed: &SignedRecord) -> bool {
        let Some(vk) = self.verifier.key(&signed.kid) else {
            return false;
        };
        let Some(sig) = hex::decode(&signed.sig)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok())
        else {
            return false;
        };
        vk.verify_strict(
            &signing_input(key, &signed.record),
            &ed25519_dalek::Signature::from_bytes(&sig),
        )
        .is_ok()
    }

    fn check_api_key(&self, key: &str, now_s: u64) -> Result<Principal, AuthError> {
        let rest = key
            .strip_prefix(API_KEY_PREFIX)
            .ok_or(AuthError::ApiKeyInvalid)?;
        let (id, secret) = rest.split_once('_').ok_or(AuthError::ApiKeyInvalid)?;
        if id.len() != 16 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(AuthError::ApiKeyInvalid);
        }
        let rec = self
            .get_api_key(id)
            .map_err(|_| AuthError::Store)?
            .ok_or(AuthError::ApiKeyInvalid)?;
        let hash = hex::encode(Sha256::digest(secret.as_bytes()));
        if !constant_time_eq(hash.as_bytes(), rec.secret_hash.as_bytes()) {
            return Err(AuthError::ApiKeyInvalid);
        }
        if self.key_revoked(&rec).map_err(|_| AuthError::Store)? {
            return Err(AuthError::ApiKeyRevoked);
        }
        if rec.expires_at <= now_s {
            return Err(AuthError::ApiKeyExpired);
        }
        Ok(Principal {
            subject: rec.owner.clone(),
            role: rec.role,
            auth_type: AuthType::ApiKey,
            credential_id: rec.id,
            expires_at: rec.expires_at,
        })
    }

    /// Whether the key, or any credential it was made with, is revoked.
    pub fn key_revoked(&self, rec: &ApiKeyRecord) -> Result<bool, StorageError> {
        if self.is_revoked(&rec.credential())? {
            return Ok(true);
        }
        for p in &rec.parents {
            if self.is_revoked(p)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The credentials a new key made by `who` descends from (its parent first), or why it may
    /// not have one.
    pub fn chain_of(&self, who: &Principal) -> Result<Vec<String>, StorageError> {
        let mut chain: Vec<String> = credential_of(who).into_iter().collect();
        if who.auth_type == AuthType::ApiKey
            && let Some(parent) = self.get_api_key(&who.credential_id)?
        {
            chain.extend(parent.parents);
        }
        Ok(chain)
    }

    /// A new API key: its record, the full key (never stored) and the signed record to write
    /// through the memory service (which audits and pushes it). Refused (`None`) when the owner
    /// holds [`MAX_KEYS_PER_OWNER`] usable keys already.
    pub fn new_api_key(
        &self,
        name: &str,
        role: &str,
        owner: &str,
        parents: Vec<String>,
        now_s: u64,
        expires_at: u64,
    ) -> Result<Option<(ApiKeyRecord, String, RecordWrite)>, StorageError> {
        let mut usable = 0;
        for k in self.list_api_keys(Some(owner), MAX_KEYS_PER_OWNER * 4)? {
            if k.owner == owner && k.expires_at > now_s && !self.key_revoked(&k)? {
                usable += 1;
            }
        }
        if usable >= MAX_KEYS_PER_OWNER {
            return Ok(None);
        }
        let mut id = [0u8; 4];
        let mut secret = [0u8; 32];
        let mut os = rand::rngs::SysRng;
        os.try_fill_bytes(&mut id)
            .and_then(|()| os.try_fill_bytes(&mut secret))
            .map_err(|e| StorageError::Engine(format!("OS random generator: {e}")))?;
        let id = format!("{}{}", owner_prefix(owner), hex::encode(id));
        let secret = B64.encode(secret);
        let rec = ApiKeyRecord {
            id: id.clone(),
            name: name.to_string(),
            role: role.to_string(),
            owner: owner.to_string(),
            secret_hash: hex::encode(Sha256::digest(secret.as_bytes())),
            created_at: now_s,
            expires_at,
            parents,
        };
        let record = self.api_key_record(&rec, now_ms())?;
        Ok(Some((
            rec,
            format!("{API_KEY_PREFIX}{id}_{secret}"),
            record,
        )))
    }

    /// [`Authenticator::new_api_key`], written here only (no audit, no push).
    #[cfg(test)]
    fn create_api_key(
        &self,
        name: &str,
        role: &str,
        owner: &str,
        parents: Vec<String>,
        now_s: u64,
        expires_at: u64,
    ) -> Result<Option<(ApiKeyRecord, String, Delta)>, StorageError> {
        let Some((rec, key, w)) =
            self.new_api_key(name, role, owner, parents, now_s, expires_at)?
        else {
            return Ok(None);
        };
        let delta = self.write_here(w, now_ms())?;
        Ok(Some((rec, key, delta)))
    }

    pub fn get_api_key(&self, id: &str) -> Result<Option<ApiKeyRecord>, StorageError> {
        if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Ok(None);
        }
        // The record must be the one stored under this id (a signed record copied under another
        // id does not verify: the signature covers the key it is stored under).
        Ok(self
            .read::<ApiKeyRecord>(AUTH_NAMESPACE, &api_key_key(id))?
            .filter(|r| r.id == id))
    }

    fn api_key_record(&self, rec: &ApiKeyRecord, now_ms: u64) -> Result<RecordWrite, StorageError> {
        self.signed(
            AUTH_NAMESPACE,
            api_key_key(&rec.id),
            rec,
            ttl_until(rec.expires_at, now_ms),
        )
    }

    /// API keys in id order, of `owner` only when given (one owner's keys share a prefix).
    /// Records no node signed are left out.
    pub fn list_api_keys(
        &self,
        owner: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ApiKeyRecord>, StorageError> {
        let prefix = match owner {
            Some(o) => format!("apikey:{}", owner_prefix(o)),
            None => "apikey:".to_string(),
        };
        let mut out = Vec::new();
        for item in self
            .memory
            .list(AUTH_NAMESPACE, &prefix, None, limit, now_ms())?
        {
            if let Some(rec) = self.read::<ApiKeyRecord>(AUTH_NAMESPACE, &item.key)? {
                out.push(rec);
            }
        }
        Ok(out)
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::sign;
    use ed25519_dalek::SigningKey;
    use swarm_storage::{MemEngine, SecretKey, StorageOptions};

    fn storage() -> Storage {
        Storage::with_engine(
            Arc::new(MemEngine::new()),
            SecretKey::generate(),
            StorageOptions::new("node-1"),
        )
        .expect("storage")
    }

    fn verifier(k: &SigningKey) -> Verifier {
        Verifier::new(
            vec![k.verifying_key()],
            "swarm".into(),
            "swarm".into(),
            0,
            86_400,
        )
    }

    fn setup() -> (SigningKey, Authenticator) {
        let k = SigningKey::from_bytes(&rand::random());
        let a = Authenticator::new(verifier(&k), k.clone(), &storage()).expect("auth");
        (k, a)
    }

    /// Now, in seconds: what is stored expires by the wall clock, so tests use real times.
    fn now() -> u64 {
        now_ms() / 1000
    }

    fn token(k: &SigningKey, jti: &str) -> String {
        let t0 = now();
        sign(
            k,
            &Claims {
                sub: "alice".into(),
                role: "user".into(),
                iss: "swarm".into(),
                aud: "swarm".into(),
                iat: t0,
                exp: t0 + 1000,
                nbf: None,
                jti: jti.into(),
            },
        )
    }

    #[test]
    fn bearer_token_and_revocation() {
        let (k, a) = setup();
        let t0 = now();
        let t = token(&k, "j1");
        let p = a
            .authenticate(Some(&format!("Bearer {t}")), None, t0 + 1)
            .expect("ok");
        assert_eq!((p.subject.as_str(), p.role.as_str()), ("alice", "user"));
        // A cached token still expires.
        assert!(
            a.authenticate(Some(&format!("Bearer {t}")), None, t0 + 999)
                .is_ok()
        );
        assert_eq!(
            a.authenticate(Some(&format!("Bearer {t}")), None, t0 + 1000),
            Err(AuthError::Token(JwtError::Expired))
        );
        a.revoke("jwt:j1", t0 + 1000, now_ms()).expect("revoke");
        assert_eq!(
            a.authenticate(Some(&format!("Bearer {t}")), None, t0 + 1),
            Err(AuthError::Revoked)
        );
        assert_eq!(a.authenticate(None, None, 1), Err(AuthError::Missing));
        assert_eq!(
            a.authenticate(Some(&format!("Basic {t}")), None, 1),
            Err(AuthError::Scheme)
        );
    }

    proptest::proptest! {
        /// API key records read back from the store: garbage is an error, never a panic or a
        /// principal.
        #[test]
        fn garbage_api_key_records_are_errors(text in ".{0,200}") {
            let (_, a) = setup();
            let req = PutRequest { value_json: serde_json::to_string(&text).expect("json"), ..PutRequest::default() };
            a.memory.put(AUTH_NAMESPACE, "apikey:0123456789abcdef", req, now_ms()).expect("put");
            proptest::prop_assert!(a.get_api_key("0123456789abcdef").is_ok_and(|r| r.is_none()));
            proptest::prop_assert!(a.authenticate(None, Some("swk_0123456789abcdef_secret"), 1).is_err());
        }
    }

    fn key_for(
        a: &Authenticator,
        role: &str,
        parents: Vec<String>,
        now: u64,
        exp: u64,
    ) -> (ApiKeyRecord, String) {
        let (rec, key, _) = a
            .create_api_key("ci", role, "alice", parents, now, exp)
            .expect("create")
            .expect("under the cap");
        (rec, key)
    }

    #[test]
    fn api_keys_hashed_expiring_revocable() {
        let (_, a) = setup();
        let t0 = now();
        let (rec, key) = key_for(&a, "viewer", vec![], t0, t0 + 50);
        assert!(!rec.secret_hash.is_empty());
        let secret = key.splitn(3, '_').nth(2).expect("secret");
        assert_ne!(rec.secret_hash, secret, "stored hashed");
        let p = a.authenticate(None, Some(&key), t0 + 20).expect("valid");
        assert_eq!((p.role.as_str(), p.auth_type), ("viewer", AuthType::ApiKey));
        assert!(
            a.authenticate(Some(&format!("Bearer {key}")), None, t0 + 20)
                .is_ok()
        );
        assert_eq!(
            a.authenticate(None, Some(&key), t0 + 50),
            Err(AuthError::ApiKeyExpired)
        );
        // Flip one character of the secret (to another character of its alphabet).
        let last = if key.ends_with('A') { "B" } else { "A" };
        let wrong = format!("{}{last}", &key[..key.len() - 1]);
        assert_eq!(
            a.authenticate(None, Some(&wrong), t0 + 20),
            Err(AuthError::ApiKeyInvalid)
        );
        a.revoke(&rec.credential(), rec.expires_at, now_ms())
            .expect("revoke");
        assert_eq!(
            a.authenticate(None, Some(&key), t0 + 20),
            Err(AuthError::ApiKeyRevoked)
        );
        for junk in ["", "swk_", "swk_zz_x", "swk_0123456789abcdef_", "nope"] {
            assert!(a.authenticate(None, Some(junk), t0 + 20).is_err(), "{junk}");
        }
    }

    /// What a client of an older version (which did not reserve `_sys*`) could write, or a
    /// record signed by a key the cluster does not accept: ignored, never a principal.
    #[test]
    fn unsigned_or_forged_records_are_ignored() {
        let (k, a) = setup();
        let t0 = now();
        let rec = ApiKeyRecord {
            id: "0123456789abcdef".into(),
            name: "x".into(),
            role: "admin".into(),
            owner: "mallory".into(),
            secret_hash: hex::encode(Sha256::digest(b"s")),
            created_at: t0,
            expires_at: t0 + 1000,
            parents: vec![],
        };
        let plain = PutRequest {
            value_json: serde_json::to_string(&rec).expect("json"),
            ..PutRequest::default()
        };
        a.memory
            .put(AUTH_NAMESPACE, "apikey:0123456789abcdef", plain, now_ms())
            .expect("put");
        assert_eq!(
            a.authenticate(None, Some("swk_0123456789abcdef_s"), t0),
            Err(AuthError::ApiKeyInvalid)
        );
        // Signed with a key the verifier does not accept.
        let rogue = Authenticator::new(
            verifier(&k),
            SigningKey::from_bytes(&rand::random()),
            &storage(),
        )
        .expect("auth");
        let delta = rogue
            .put(
                AUTH_NAMESPACE,
                "apikey:0123456789abcdef",
                &rec,
                None,
                now_ms(),
            )
            .expect("put");
        a.memory.apply_delta(&delta, now_ms()).expect("apply");
        assert_eq!(
            a.authenticate(None, Some("swk_0123456789abcdef_s"), t0),
            Err(AuthError::ApiKeyInvalid)
        );
        // A forged revocation does not revoke either.
        let delta = rogue
            .revoke("jwt:j9", t0 + 1000, now_ms())
            .expect("revoke")
            .expect("new");
        a.memory.apply_delta(&delta, now_ms()).expect("apply");
        assert!(!a.is_revoked("jwt:j9").expect("read"));
        // Signed by the cluster's key: valid, and a revocation is written once.
        a.put(
            AUTH_NAMESPACE,
            "apikey:0123456789abcdef",
            &rec,
            None,
            now_ms(),
        )
        .expect("put");
        assert!(
            a.authenticate(None, Some("swk_0123456789abcdef_s"), t0)
                .is_ok()
        );
        assert!(
            a.revoke("jwt:j9", t0 + 1000, now_ms())
                .expect("revoke")
                .is_some()
        );
        assert!(
            a.revoke("jwt:j9", t0 + 1000, now_ms())
                .expect("revoke")
                .is_none()
        );
    }

    #[test]
    fn one_owner_holds_a_bounded_number_of_keys() {
        let (_, a) = setup();
        let t0 = now();
        for _ in 0..MAX_KEYS_PER_OWNER {
            key_for(&a, "user", vec![], t0, t0 + 100);
        }
        assert!(
            a.create_api_key("more", "user", "alice", vec![], t0, t0 + 100)
                .expect("create")
                .is_none()
        );
        // Another owner is not affected; a revoked key frees a place.
        assert!(
            a.create_api_key("b", "user", "bob", vec![], t0, t0 + 100)
                .expect("create")
                .is_some()
        );
        let first = a.list_api_keys(Some("alice"), 1000).expect("list");
        assert_eq!(first.len(), MAX_KEYS_PER_OWNER);
        a.revoke(&first[0].credential(), t0 + 100, now_ms())
            .expect("revoke");
        assert!(
            a.create_api_key("again", "user", "alice", vec![], t0, t0 + 100)
                .expect("create")
                .is_some()
        );
    }

    #[test]
    fn a_revocation_from_a_peer_beats_the_not_revoked_cache() {
        let (k, here) = setup();
        let peer = Authenticator::new(verifier(&k), k.clone(), &storage()).expect("auth");
        let t = token(&k, "cached");
        let bearer = format!("Bearer {t}");
        // Checked (and remembered as not revoked) many times here.
        for _ in 0..3 {
            assert!(here.authenticate(Some(&bearer), None, now()).is_ok());
        }
        // Revoked on the peer; its delta applied here, as replication does.
        let delta = peer
            .revoke("jwt:cached", now() + 1000, now_ms())
            .expect("revoke")
            .expect("a new revocation");
        here.memory.apply_delta(&delta, now_ms()).expect("apply");
        assert_eq!(
            here.authenticate(Some(&bearer), None, now()),
            Err(AuthError::Revoked)
        );
    }

    #[test]
    fn revoking_a_token_revokes_the_keys_made_with_it() {
        let (k, a) = setup();
        let t0 = now();
        let t = token(&k, "parent");
        let who = a
            .authenticate(Some(&format!("Bearer {t}")), None, t0)
            .expect("token");
        let chain = a.chain_of(&who).expect("chain");
        assert_eq!(chain, vec!["jwt:parent".to_string()]);
        let (_, child) = key_for(&a, "user", chain, t0, t0 + 900);
        // A key made with that key descends from both.
        let child_p = a.authenticate(None, Some(&child), t0).expect("child");
        let chain2 = a.chain_of(&child_p).expect("chain");
        assert_eq!(chain2.len(), 2);
        let (_, grandchild) = key_for(&a, "user", chain2, t0, t0 + 900);
        assert!(a.authenticate(None, Some(&grandchild), t0).is_ok());
        a.revoke("jwt:parent", t0 + 1000, now_ms()).expect("revoke");
        assert_eq!(
            a.authenticate(None, Some(&child), t0),
            Err(AuthError::ApiKeyRevoked)
        );
        assert_eq!(
            a.authenticate(None, Some(&grandchild), t0),
            Err(AuthError::ApiKeyRevoked)
        );
    }

    #[test]
    fn state_of_an_older_version_is_migrated_into_the_sealed_namespace() {
        let st = storage();
        st.engine
            .put(trees::REVOKED, b"old-jti", &u64::MAX.to_be_bytes())
            .expect("put");
        let old = serde_json::json!({
            "id": "0123456789abcdef", "name": "n", "role": "user", "owner": "bob",
            "secret_hash": hex::encode(Sha256::digest(b"s")), "created_at": 1,
            "expires_at": u64::MAX / 2000, "revoked": false,
        });
        st.engine
            .put(
                trees::API_KEYS,
                b"0123456789abcdef",
                old.to_string().as_bytes(),
            )
            .expect("put");
        let k = SigningKey::from_bytes(&rand::random());
        let a = Authenticator::new(verifier(&k), k.clone(), &st).expect("auth");
        assert!(a.is_revoked("jwt:old-jti").expect("revoked"));
        assert!(
            a.authenticate(None, Some("swk_0123456789abcdef_s"), now())
                .is_ok()
        );
        // Nothing left in the old plaintext trees.
        assert!(
            st.engine
                .scan(trees::API_KEYS, b"", None, 10)
                .expect("scan")
                .is_empty()
        );
        assert!(
            st.engine
                .scan(trees::REVOKED, b"", None, 10)
                .expect("scan")
                .is_empty()
        );
        // The record is sealed: the owner's name is nowhere in the store's bytes.
        let mut found = false;
        for tree in [trees::MEMORY, trees::API_KEYS] {
            st.engine
                .for_each(tree, b"", None, 64, &mut |k, v| {
                    found |= [k.as_slice(), v.as_slice()]
                        .iter()
                        .any(|b| b.windows(3).any(|w| w == b"bob"));
                    Ok(true)
                })
                .expect("scan");
        }
        assert!(!found, "API-key record stored in plaintext");
    }
}
