//! JSON Web Tokens signed with Ed25519 (`alg: EdDSA`). The algorithm is pinned: any other `alg`
//! (including `none` and HMAC ones) is refused before the signature is even looked at. `kid`
//! selects among the current and retired verification keys, so keys can rotate.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Claims carried by a swarm token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: String,
    pub iss: String,
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    pub jti: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    kid: Option<String>,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm `{0}` is not accepted (EdDSA only)")]
    Algorithm(String),
    #[error("token signed by an unknown key")]
    UnknownKey,
    #[error("token signature is invalid")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("token issuer is not accepted")]
    Issuer,
    #[error("token audience is not accepted")]
    Audience,
    #[error("token lifetime (exp - iat) is longer than the {max_s}s allowed")]
    Lifetime { max_s: u64 },
    #[error("token issued in the future (iat)")]
    IssuedInFuture,
}

impl JwtError {
    /// Stable short code for logs, metrics and API errors (the same codes `AuthError::code`
    /// gives the older variants).
    pub fn code(&self) -> &'static str {
        match self {
            JwtError::Malformed | JwtError::NotYetValid | JwtError::Issuer | JwtError::Audience => {
                "invalid_token"
            }
            JwtError::Algorithm(_) => "token_algorithm",
            JwtError::UnknownKey | JwtError::Signature => "token_signature",
            JwtError::Expired => "token_expired",
            JwtError::Lifetime { .. } => "token_lifetime",
            JwtError::IssuedInFuture => "token_issued_in_future",
        }
    }
}

/// The key id of a verifying key: the first 8 bytes of its SHA-256, in hex.
pub fn kid(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// Sign claims with `key`.
pub fn sign(key: &SigningKey, claims: &Claims) -> String {
    let header = Header {
        alg: "EdDSA".into(),
        typ: Some("JWT".into()),
        kid: Some(kid(&key.verifying_key())),
    };
    // Serialising these plain structs cannot fail.
    let h = B64.encode(serde_json::to_vec(&header).unwrap_or_default());
    let c = B64.encode(serde_json::to_vec(claims).unwrap_or_default());
    let signing_input = format!("{h}.{c}");
    let sig = key.sign(signing_input.as_bytes());
    format!("{signing_input}.{}", B64.encode(sig.to_bytes()))
}

/// Verifies tokens against a set of keys and the expected issuer and audience.
#[derive(Debug, Clone)]
pub struct Verifier {
    keys: HashMap<String, VerifyingKey>,
    issuer: String,
    audience: String,
    leeway_s: u64,
    max_ttl_s: u64,
}

impl Verifier {
    /// `leeway_s` is the allowed clock skew; `max_ttl_s` the longest lifetime (`exp - iat`) a
    /// token may claim (the node passes `auth.max_token_ttl`, the cap on what it issues).
    pub fn new(
        keys: Vec<VerifyingKey>,
        issuer: String,
        audience: String,
        leeway_s: u64,
        max_ttl_s: u64,
    ) -> Self {
        Self {
            keys: keys.into_iter().map(|k| (kid(&k), k)).collect(),
            issuer,
            audience,
            leeway_s,
            max_ttl_s,
        }
    }

    /// Check structure, algorithm, key, signature, then `iss`, `aud` and the times (see
    /// [`Verifier::check_times`]) at `now_s`.
    pub fn verify(&self, token: &str, now_s: u64) -> Result<Claims, JwtError> {
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let header: Header = B64
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(JwtError::Malformed)?;
        if header.alg != "EdDSA" {
            return Err(JwtError::Algorithm(header.alg.chars().take(16).collect()));
        }
        let key = match &header.kid {
            Some(k) => self.keys.get(k).ok_or(JwtError::UnknownKey)?,
            None if self.keys.len() == 1 => {
                self.keys.values().next().ok_or(JwtError::UnknownKey)?
            }
            None => return Err(JwtError::UnknownKey),
        };
        let sig_bytes: [u8; 64] = B64
            .decode(s)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(JwtError::Malformed)?;
        let signing_input = &token[..h.len() + 1 + c.len()];
        key.verify_strict(signing_input.as_bytes(), &Signature::from_bytes(&sig_bytes))
            .map_err(|_| JwtError::Signature)?;
        let claims: Claims = B64
            .decode(c)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(JwtError::Malformed)?;
        if claims.iss != self.issuer {
            return Err(JwtError::Issuer);
        }
        if claims.aud != self.audience {
            return Err(JwtError::Audience);
        }
        self.check_times(&claims, now_s)?;
        Ok(claims)
    }

    /// The time checks alone, for claims verified earlier: `iat` not in the future (beyond the
    /// leeway), a lifetime `exp - iat` of at most `max_ttl_s`, then `exp` and `nbf`.
    /// The accepted verifying key with this key id (the current one or a retired one).
    pub fn key(&self, kid: &str) -> Option<&VerifyingKey> {
        self.keys.get(kid)
    }

    pub fn check_times(&self, claims: &Claims, now_s: u64) -> Result<(), JwtError> {
        if claims.iat > now_s.saturating_add(self.leeway_s) {
            return Err(JwtError::IssuedInFuture);
        }
        if claims.exp.saturating_sub(claims.iat) > self.max_ttl_s {
            return Err(JwtError::Lifetime {
                max_s: self.max_ttl_s,
            });
        }
        if claims.exp.saturating_add(self.leeway_s) <= now_s {
            return Err(JwtError::Expired);
        }
        if claims
            .nbf
            .is_some_and(|nbf| nbf > now_s.saturating_add(self.leeway_s))
        {
            return Err(JwtError::NotYetValid);
        }
        Ok(())
    }
}

/// Parse a hex Ed25519 seed.
pub fn signing_key_from_hex(s: &str) -> Result<SigningKey, String> {
    let bytes = hex::decode(s.trim()).map_err(|e| format!("not hex: {e}"))?;
    let seed: [u8; 32] = bytes
        .try_into()
        .map_err(|_| "expected a 32-byte Ed25519 seed (64 hex chars)".to_string())?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Parse a hex Ed25519 public key.
pub fn verifying_key_from_hex(s: &str) -> Result<VerifyingKey, String> {
    let bytes = hex::decode(s.trim()).map_err(|e| format!("not hex: {e}"))?;
    let arr: [u8; 32] = bytes
        .try_into()
        .map_err(|_| "expected a 32-byte Ed25519 public key (64 hex chars)".to_string())?;
    VerifyingKey::from_bytes(&arr).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&rand::random())
    }

    const MAX_TTL: u64 = 365 * 86_400;

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "alice".into(),
            role: "user".into(),
            iss: "swarm".into(),
            aud: "swarm".into(),
            iat: 0,
            exp,
            nbf: None,
            jti: "j1".into(),
        }
    }

    fn verifier(keys: Vec<VerifyingKey>) -> Verifier {
        Verifier::new(keys, "swarm".into(), "swarm".into(), 0, MAX_TTL)
    }

    /// Regression (issue 13 item 10): an `exp` at the largest 64-bit value and an `iat` a year
    /// ahead were accepted. Now `exp - iat <= max_ttl` and `iat <= now + leeway`, on the full
    /// and on the cached path (`check_times`).
    #[test]
    fn lifetimes_are_enforced() {
        let k = key();
        let now = 1_700_000_000;
        let v = Verifier::new(
            vec![k.verifying_key()],
            "swarm".into(),
            "swarm".into(),
            30,
            MAX_TTL,
        );
        let at = |iat: u64, exp: u64| Claims { iat, ..claims(exp) };
        // A normal token: issued now, one hour.
        let ok = at(now, now + 3600);
        assert_eq!(v.verify(&sign(&k, &ok), now), Ok(ok.clone()));
        // Issued a little ahead (within the leeway) and exactly max_ttl long: still fine.
        let edge = at(now + 30, now + 30 + MAX_TTL);
        assert_eq!(v.verify(&sign(&k, &edge), now), Ok(edge));
        // exp at u64::MAX.
        let forever = at(now, u64::MAX);
        assert_eq!(
            v.verify(&sign(&k, &forever), now),
            Err(JwtError::Lifetime { max_s: MAX_TTL })
        );
        assert_eq!(
            v.check_times(&forever, now),
            Err(JwtError::Lifetime { max_s: MAX_TTL })
        );
        // One second over the cap.
        let long = at(now, now + MAX_TTL + 1);
        assert_eq!(
            v.verify(&sign(&k, &long), now).map_err(|e| e.code()),
            Err("token_lifetime")
        );
        // iat a year ahead (with a short lifetime, so only iat is wrong).
        let ahead = at(now + 365 * 86_400, now + 365 * 86_400 + 3600);
        assert_eq!(
            v.verify(&sign(&k, &ahead), now),
            Err(JwtError::IssuedInFuture)
        );
        assert_eq!(
            v.check_times(&ahead, now).map_err(|e| e.code()),
            Err("token_issued_in_future")
        );
        // Just past the leeway.
        let early = at(now + 31, now + 3600);
        assert_eq!(
            v.verify(&sign(&k, &early), now),
            Err(JwtError::IssuedInFuture)
        );
    }

    #[test]
    fn round_trip() {
        let k = key();
        let t = sign(&k, &claims(1000));
        assert_eq!(
            verifier(vec![k.verifying_key()]).verify(&t, 500),
            Ok(claims(1000))
        );
    }

    #[test]
    fn expired_and_not_yet_valid() {
        let k = key();
        let v = verifier(vec![k.verifying_key()]);
        assert_eq!(
            v.verify(&sign(&k, &claims(1000)), 1000),
            Err(JwtError::Expired)
        );
        let mut c = claims(1000);
        c.nbf = Some(600);
        assert_eq!(v.verify(&sign(&k, &c), 500), Err(JwtError::NotYetValid));
    }

    #[test]
    fn other_key_and_rotation() {
        let (old, new, rogue) = (key(), key(), key());
        let v = verifier(vec![new.verifying_key(), old.verifying_key()]);
        assert!(
            v.verify(&sign(&old, &claims(1000)), 1).is_ok(),
            "retired key still verifies"
        );
        assert_eq!(
            v.verify(&sign(&rogue, &claims(1000)), 1),
            Err(JwtError::UnknownKey)
        );
        // A rogue signature under a known kid.
        let good = sign(&new, &claims(1000));
        let forged = sign(&rogue, &claims(1000));
        let (gh, _) = good.rsplit_once('.').expect("dot");
        let (_, fs) = forged.rsplit_once('.').expect("dot");
        assert_eq!(v.verify(&format!("{gh}.{fs}"), 1), Err(JwtError::Signature));
    }

    #[test]
    fn tampered_claims_fail() {
        let k = key();
        let t = sign(&k, &claims(1000));
        let parts: Vec<&str> = t.split('.').collect();
        let mut c = claims(1000);
        c.role = "admin".into();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(serde_json::to_vec(&c).expect("json")),
            parts[2]
        );
        assert_eq!(
            verifier(vec![k.verifying_key()]).verify(&forged, 1),
            Err(JwtError::Signature)
        );
    }

    #[test]
    fn alg_none_and_hmac_are_refused() {
        let k = key();
        let v = verifier(vec![k.verifying_key()]);
        let body = B64.encode(serde_json::to_vec(&claims(1000)).expect("json"));
        for alg in ["none", "HS256", "RS256", "eddsa"] {
            let h = B64.encode(format!(
                r#"{{"alg":"{alg}","kid":"{}"}}"#,
                kid(&k.verifying_key())
            ));
            let t = format!("{h}.{body}.");
            assert!(
                matches!(v.verify(&t, 1), Err(JwtError::Algorithm(_))),
                "{alg}"
            );
        }
    }

    #[test]
    fn issuer_and_audience_are_checked() {
        let k = key();
        let v = verifier(vec![k.verifying_key()]);
        let mut c = claims(1000);
        c.iss = "evil".into();
        assert_eq!(v.verify(&sign(&k, &c), 1), Err(JwtError::Issuer));
        let mut c = claims(1000);
        c.aud = "other".into();
        assert_eq!(v.verify(&sign(&k, &c), 1), Err(JwtError::Audience));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let v = verifier(vec![key().verifying_key()]);
        for t in [
            "",
            ".",
            "..",
            "a.b.c",
            "a.b.c.d",
            "eyJ.eyJ.x",
            "\u{0}.\u{0}.\u{0}",
        ] {
            assert!(v.verify(t, 1).is_err(), "{t:?}");
        }
    }
}
