//! Authentication: JWT bearer tokens and API keys, and the token revocation list.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use swarm_storage::{Engine, StorageError, trees};

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
            AuthError::Token(JwtError::Expired) => "token_expired",
            AuthError::Token(JwtError::Algorithm(_)) => "token_algorithm",
            AuthError::Token(JwtError::Signature | JwtError::UnknownKey) => "token_signature",
            AuthError::Token(_) => "invalid_token",
            AuthError::Revoked => "token_revoked",
            AuthError::ApiKeyInvalid => "invalid_api_key",
            AuthError::ApiKeyExpired => "api_key_expired",
            AuthError::ApiKeyRevoked => "api_key_revoked",
            AuthError::Store => "auth_store",
        }
    }
}

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
    pub revoked: bool,
}

const API_KEY_PREFIX: &str = "swk_";
/// Most verified tokens remembered; past it the cache starts over.
const TOKEN_CACHE_MAX: usize = 8192;

/// Checks credentials. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Authenticator {
    verifier: Arc<Verifier>,
    engine: Arc<dyn Engine>,
    revoked: Arc<RwLock<HashSet<String>>>,
    /// Tokens whose signature, issuer and audience were verified, keyed by the exact token text:
    /// an Ed25519 verification costs more than the rest of a small request. Expiry and revocation
    /// are still checked on every request.
    verified: Arc<RwLock<HashMap<String, Claims>>>,
}

impl Authenticator {
    /// Load the revocation list from the store.
    pub fn new(verifier: Verifier, engine: Arc<dyn Engine>) -> Result<Self, StorageError> {
        let mut revoked = HashSet::new();
        engine.for_each(trees::REVOKED, b"", None, 1024, &mut |k, _| {
            revoked.insert(String::from_utf8_lossy(&k).into_owned());
            Ok(true)
        })?;
        Ok(Self {
            verifier: Arc::new(verifier),
            engine,
            revoked: Arc::new(RwLock::new(revoked)),
            verified: Arc::new(RwLock::new(HashMap::new())),
        })
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
        if self.is_revoked(&claims.jti) {
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
        if let Ok(mut c) = self.verified.write() {
            if c.len() >= TOKEN_CACHE_MAX {
                c.clear();
            }
            c.insert(token.to_string(), claims.clone());
        }
        Ok(claims)
    }

    /// Decode a token's claims after full verification (for revoking by token).
    pub fn verify_token(&self, token: &str, now_s: u64) -> Result<Claims, AuthError> {
        self.verifier.verify(token, now_s).map_err(AuthError::Token)
    }

    fn is_revoked(&self, jti: &str) -> bool {
        self.revoked.read().map(|r| r.contains(jti)).unwrap_or(true)
    }

    /// Add a token id to the revocation list (durable after the next sync).
    pub fn revoke_token(&self, jti: &str, exp: u64) -> Result<(), StorageError> {
        self.engine
            .put(trees::REVOKED, jti.as_bytes(), &exp.to_be_bytes())?;
        if let Ok(mut r) = self.revoked.write() {
            r.insert(jti.to_string());
        }
        Ok(())
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
        if rec.revoked {
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

    /// Create an API key; returns the record and the full key, which is never stored.
    pub fn create_api_key(
        &self,
        name: &str,
        role: &str,
        owner: &str,
        now_s: u64,
        ttl_s: u64,
    ) -> Result<(ApiKeyRecord, String), StorageError> {
        let mut id = [0u8; 8];
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut id);
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let id = hex::encode(id);
        let secret = B64.encode(secret);
        let rec = ApiKeyRecord {
            id: id.clone(),
            name: name.to_string(),
            role: role.to_string(),
            owner: owner.to_string(),
            secret_hash: hex::encode(Sha256::digest(secret.as_bytes())),
            created_at: now_s,
            expires_at: now_s.saturating_add(ttl_s),
            revoked: false,
        };
        self.put_api_key(&rec)?;
        Ok((rec, format!("{API_KEY_PREFIX}{id}_{secret}")))
    }

    pub fn get_api_key(&self, id: &str) -> Result<Option<ApiKeyRecord>, StorageError> {
        match self.engine.get(trees::API_KEYS, id.as_bytes())? {
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| StorageError::Corrupt(format!("api key {id}: {e}"))),
            None => Ok(None),
        }
    }

    pub fn put_api_key(&self, rec: &ApiKeyRecord) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(rec).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        self.engine.put(trees::API_KEYS, rec.id.as_bytes(), &bytes)
    }

    /// Every API key (most deployments hold a handful).
    pub fn list_api_keys(&self, limit: usize) -> Result<Vec<ApiKeyRecord>, StorageError> {
        self.engine
            .scan(trees::API_KEYS, b"", None, limit)?
            .into_iter()
            .map(|(_, v)| {
                serde_json::from_slice(&v).map_err(|e| StorageError::Corrupt(e.to_string()))
            })
            .collect()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::sign;
    use ed25519_dalek::SigningKey;
    use swarm_storage::MemEngine;

    fn setup() -> (SigningKey, Authenticator) {
        let k = SigningKey::generate(&mut rand::rngs::OsRng);
        let v = Verifier::new(vec![k.verifying_key()], "swarm".into(), "swarm".into(), 0);
        let a = Authenticator::new(v, Arc::new(MemEngine::new())).expect("auth");
        (k, a)
    }

    fn token(k: &SigningKey, jti: &str) -> String {
        sign(
            k,
            &Claims {
                sub: "alice".into(),
                role: "user".into(),
                iss: "swarm".into(),
                aud: "swarm".into(),
                iat: 0,
                exp: 1000,
                nbf: None,
                jti: jti.into(),
            },
        )
    }

    #[test]
    fn bearer_token_and_revocation() {
        let (k, a) = setup();
        let t = token(&k, "j1");
        let p = a
            .authenticate(Some(&format!("Bearer {t}")), None, 1)
            .expect("ok");
        assert_eq!((p.subject.as_str(), p.role.as_str()), ("alice", "user"));
        // A cached token still expires.
        assert!(
            a.authenticate(Some(&format!("Bearer {t}")), None, 999)
                .is_ok()
        );
        assert_eq!(
            a.authenticate(Some(&format!("Bearer {t}")), None, 1000),
            Err(AuthError::Token(JwtError::Expired))
        );
        a.revoke_token("j1", 1000).expect("revoke");
        assert_eq!(
            a.authenticate(Some(&format!("Bearer {t}")), None, 1),
            Err(AuthError::Revoked)
        );
        assert_eq!(a.authenticate(None, None, 1), Err(AuthError::Missing));
        assert_eq!(
            a.authenticate(Some(&format!("Basic {t}")), None, 1),
            Err(AuthError::Scheme)
        );
    }

    proptest::proptest! {
        /// API key records read back from disk: garbage is an error, never a panic or a principal.
        #[test]
        fn garbage_api_key_records_are_errors(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let (_, a) = setup();
            a.engine.put(trees::API_KEYS, b"0123456789abcdef", &bytes).expect("put");
            let looked_up = a.get_api_key("0123456789abcdef");
            proptest::prop_assert!(looked_up.is_err() || looked_up.is_ok_and(|r| r.is_some()));
            proptest::prop_assert!(a.authenticate(None, Some("swk_0123456789abcdef_secret"), 1).is_err());
        }
    }

    #[test]
    fn api_keys_hashed_expiring_revocable() {
        let (_, a) = setup();
        let (rec, key) = a
            .create_api_key("ci", "viewer", "alice", 100, 50)
            .expect("create");
        assert!(!rec.secret_hash.is_empty());
        let secret = key.rsplit_once('_').expect("secret").1;
        assert_ne!(rec.secret_hash, secret, "stored hashed");
        let p = a.authenticate(None, Some(&key), 120).expect("valid");
        assert_eq!((p.role.as_str(), p.auth_type), ("viewer", AuthType::ApiKey));
        assert!(
            a.authenticate(Some(&format!("Bearer {key}")), None, 120)
                .is_ok()
        );
        assert_eq!(
            a.authenticate(None, Some(&key), 150),
            Err(AuthError::ApiKeyExpired)
        );
        let wrong = format!("{}x", &key[..key.len() - 1]);
        assert_eq!(
            a.authenticate(None, Some(&wrong), 120),
            Err(AuthError::ApiKeyInvalid)
        );
        let mut r = a.get_api_key(&rec.id).expect("get").expect("some");
        r.revoked = true;
        a.put_api_key(&r).expect("put");
        assert_eq!(
            a.authenticate(None, Some(&key), 120),
            Err(AuthError::ApiKeyRevoked)
        );
        for junk in ["", "swk_", "swk_zz_x", "swk_0123456789abcdef_", "nope"] {
            assert!(a.authenticate(None, Some(junk), 120).is_err(), "{junk}");
        }
    }
}
