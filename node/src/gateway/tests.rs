//! Gateway tests: the real router, in process, over the in-memory engine.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ed25519_dalek::SigningKey;
use serde_json::{Value, json};
use swarm_config::{LimitsConfig, SwarmFile};
use swarm_storage::{MemEngine, SecretKey, Storage, StorageOptions, trees};
use tower::ServiceExt;

use super::*;
use crate::init::mint;
use crate::jwt::Verifier;

struct Fixture {
    state: AppState,
    key: SigningKey,
}

fn fixture_with(body_limit: usize, swarm: SwarmFile) -> Fixture {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let storage = Storage::with_engine(
        Arc::new(MemEngine::new()),
        SecretKey::generate(),
        StorageOptions::new("n1"),
    )
    .expect("storage");
    let verifier = Verifier::new(vec![key.verifying_key()], "swarm".into(), "swarm".into(), 0);
    let auth = Authenticator::new(verifier, storage.engine.clone()).expect("auth");
    let mut roles = BTreeMap::new();
    roles.insert("auditor".to_string(), vec!["audit.read".to_string()]);
    let state = Inner::new(GatewayParts {
        node: "n1".into(),
        storage,
        auth,
        policy: Policy::new(&roles),
        swarm,
        limits: LimitsConfig::default(),
        body_limit,
        max_token_ttl_s: 365 * 86_400,
        signing_key: key.clone(),
        issuer: "swarm".into(),
        audience: "swarm".into(),
        membership: None,
        actors: None,
        replicator: None,
        inference: crate::inference::Inference::new(
            "n1",
            Vec::new(),
            Default::default(),
            16,
            None,
            None,
        ),
    })
    .expect("gateway state");
    Fixture { state, key }
}

fn fixture() -> Fixture {
    fixture_with(4096, SwarmFile::preset().expect("preset"))
}

impl Fixture {
    fn token(&self, sub: &str, role: &str) -> String {
        mint(&self.key, sub, role, 3600, "swarm", "swarm").expect("mint")
    }

    async fn call(
        &self,
        method: &str,
        uri: &str,
        auth: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (StatusCode, Value, axum::http::HeaderMap) {
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(t) = auth {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let req = b
            .body(body.map(Body::from).unwrap_or_else(Body::empty))
            .expect("request");
        let resp = router(self.state.clone())
            .oneshot(req)
            .await
            .expect("response");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        let v = serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, v, headers)
    }

    fn memory_records(&self) -> usize {
        self.state
            .storage
            .engine
            .scan(trees::MEMORY, b"", None, 10_000)
            .expect("scan")
            .len()
    }

    fn audit_tail(&self) -> swarm_storage::AuditEntry {
        self.state.flush_audit();
        let all = self.state.storage.audit.list(0, 10_000).expect("audit");
        all.last().cloned().expect("an audit entry")
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn memory_round_trip_and_version() {
    let f = fixture();
    let t = f.token("alice", "user");
    let (s, v, h) = f
        .call(
            "PUT",
            "/v1/memory/notes/k1",
            Some(&t),
            Some(br#"{"value":{"a":[1,2]},"tags":["x"]}"#.to_vec()),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(h.contains_key("x-request-id"));
    let version = v["version"].clone();
    let (s, v, _) = f.call("GET", "/v1/memory/notes/k1", Some(&t), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["value"], json!({"a":[1,2]}));
    assert_eq!(v["version"], version);
    assert_eq!(v["origin"], "n1");
    let (s, v, _) = f
        .call("GET", "/v1/memory/notes?prefix=k&limit=10", Some(&t), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["items"].as_array().map(Vec::len), Some(1));
    let (s, _, _) = f
        .call("DELETE", "/v1/memory/notes/k1", Some(&t), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v, _) = f.call("GET", "/v1/memory/notes/k1", Some(&t), None).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not_found"));
    let (s, _, _) = f
        .call("DELETE", "/v1/memory/notes/k1", Some(&t), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_credentials_are_401_and_audited() {
    let f = fixture();
    let other = SigningKey::generate(&mut rand::rngs::OsRng);
    let foreign = mint(&other, "eve", "admin", 3600, "swarm", "swarm").expect("mint");
    let expired = mint(&f.key, "eve", "admin", 0, "swarm", "swarm").expect("mint");
    let wrong_aud = mint(&f.key, "eve", "admin", 3600, "swarm", "elsewhere").expect("mint");
    let claims = B64.encode(br#"{"sub":"eve","role":"admin","iss":"swarm","aud":"swarm","iat":0,"exp":99999999999,"jti":"x"}"#);
    let none = format!("{}.{claims}.", B64.encode(br#"{"alg":"none"}"#));
    let hs = format!("{}.{claims}.c2ln", B64.encode(br#"{"alg":"HS256"}"#));
    for (tok, want) in [
        (None, "unauthenticated"),
        (Some(foreign.as_str()), "token_signature"),
        (Some(expired.as_str()), "token_expired"),
        (Some(wrong_aud.as_str()), "invalid_token"),
        (Some(none.as_str()), "token_algorithm"),
        (Some(hs.as_str()), "token_algorithm"),
        (Some("garbage"), "invalid_token"),
    ] {
        let (s, v, h) = f
            .call(
                "PUT",
                "/v1/memory/ns/k",
                tok,
                Some(br#"{"value":1}"#.to_vec()),
            )
            .await;
        assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, want), "{tok:?}");
        assert!(h.contains_key("www-authenticate"));
        let a = f.audit_tail();
        assert_eq!((a.event.outcome.as_str(), a.event.status), ("denied", 401));
        assert_eq!(a.event.code.as_deref(), Some(want));
    }
    assert_eq!(f.memory_records(), 0, "no data changed");
}

#[tokio::test]
async fn rbac_forbids_and_allows() {
    let f = fixture();
    let viewer = f.token("vic", "viewer");
    let user = f.token("ursula", "user");
    let auditor = f.token("aud", "auditor");
    let (s, v, _) = f
        .call(
            "PUT",
            "/v1/memory/ns/k",
            Some(&viewer),
            Some(br#"{"value":1}"#.to_vec()),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "forbidden"));
    assert_eq!(f.audit_tail().event.action, "memory.write");
    assert_eq!(f.audit_tail().event.outcome, "denied");
    let (s, _, _) = f.call("GET", "/v1/audit", Some(&user), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, _) = f
        .call("POST", "/v1/subjects/bob/erase", Some(&user), None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, _) = f.call("GET", "/v1/audit", Some(&viewer), None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = f
        .call("GET", "/v1/audit/verify", Some(&auditor), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = f.call("GET", "/v1/memory/ns/k", Some(&auditor), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(f.memory_records(), 0);
}

#[tokio::test]
async fn bad_input_is_a_clear_4xx_and_changes_nothing() {
    let f = fixture();
    let t = f.token("alice", "user");
    f.call(
        "PUT",
        "/v1/memory/ns/keep",
        Some(&t),
        Some(br#"{"value":"v"}"#.to_vec()),
    )
    .await;
    let before = f.memory_records();
    type Case = (
        &'static str,
        &'static str,
        Option<Vec<u8>>,
        StatusCode,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "PUT",
            "/v1/memory/ns/k",
            Some(b"{not json".to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "PUT",
            "/v1/memory/ns/k",
            Some(b"\xff\xfe\xfd".to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_utf8",
        ),
        (
            "PUT",
            "/v1/memory/ns/k",
            Some(br#"{"value":1,"ttl":5}"#.to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            "PUT",
            "/v1/memory/ns/k",
            Some(br#"{"value":1,"memory_type":"dream"}"#.to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            "PUT",
            "/v1/memory/ns/k",
            Some(br#"{"nope":1}"#.to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            "PUT",
            "/v1/memory/ns/k",
            None,
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "PUT",
            "/v1/memory/ns/k",
            Some(format!("{{\"value\":\"{}\"}}", "x".repeat(5000)).into_bytes()),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            "PUT",
            "/v1/memory/%2E%2E%2Fetc/k",
            Some(br#"{"value":1}"#.to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            "PUT",
            "/v1/memory/ns/..",
            Some(br#"{"value":1}"#.to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            "PUT",
            "/v1/memory/ns/%FF%FE",
            Some(br#"{"value":1}"#.to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            "PUT",
            "/v1/memory/ns/k",
            Some(br#"{"value":1,"subject":"../x"}"#.to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            "GET",
            "/v1/memory/ns?limit=0",
            None,
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            "GET",
            "/v1/memory/ns?limit=abc",
            None,
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            "GET",
            "/v1/nowhere",
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "PATCH",
            "/v1/memory/ns/k",
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ];
    for (m, uri, body, want_status, want_code) in cases {
        let (s, v, _) = f.call(m, uri, Some(&t), body).await;
        assert_eq!((s, code(&v)), (want_status, want_code), "{m} {uri}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        let a = f.audit_tail();
        assert_eq!(a.event.status, want_status.as_u16(), "audited: {m} {uri}");
    }
    assert_eq!(f.memory_records(), before, "no stored data changed");
    let (_, v, _) = f.call("GET", "/v1/memory/ns/keep", Some(&t), None).await;
    assert_eq!(v["value"], "v");
}

#[tokio::test]
async fn full_bulkhead_is_429_with_retry_after() {
    let f = fixture();
    let t = f.token("alice", "user");
    let held: Vec<_> = std::iter::from_fn(|| f.state.permit(Class::Memory).ok())
        .take(1000)
        .collect();
    assert_eq!(held.len(), 20, "memory_ops limit from the swarm file");
    let (s, v, h) = f.call("GET", "/v1/memory/ns/k", Some(&t), None).await;
    assert_eq!((s, code(&v)), (StatusCode::TOO_MANY_REQUESTS, "overloaded"));
    assert_eq!(
        h.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    drop(held);
    let (s, _, _) = f.call("GET", "/v1/memory/ns/k", Some(&t), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn slow_work_times_out_with_503() {
    let mut swarm = SwarmFile::preset().expect("preset");
    swarm.performance.response_targets.memory_ops = "20ms".parse().expect("duration");
    let f = fixture_with(4096, swarm);
    let r: Result<(), AppError> = f
        .state
        .timed(Class::Memory, async {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            Ok(())
        })
        .await;
    let e = r.expect_err("timeout");
    assert_eq!(
        (e.status(), e.code()),
        (StatusCode::SERVICE_UNAVAILABLE, "timeout")
    );
}

#[tokio::test]
async fn api_keys_shown_once_hashed_revocable_owner_or_admin() {
    let f = fixture();
    let alice = f.token("alice", "user");
    let bob = f.token("bob", "user");
    let admin = f.token("root", "admin");
    let (s, v, _) = f
        .call(
            "POST",
            "/v1/keys",
            Some(&alice),
            Some(br#"{"name":"ci","ttl":"1h"}"#.to_vec()),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let key = v["key"].as_str().expect("key").to_string();
    let id = v["id"].as_str().expect("id").to_string();
    // Escalation is refused.
    let (s, _, _) = f
        .call(
            "POST",
            "/v1/keys",
            Some(&alice),
            Some(br#"{"name":"x","role":"admin"}"#.to_vec()),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // The key works, via X-API-Key and via Bearer.
    let req = Request::builder()
        .uri("/v1/me")
        .header("x-api-key", &key)
        .body(Body::empty())
        .expect("req");
    let resp = router(f.state.clone()).oneshot(req).await.expect("resp");
    assert_eq!(resp.status(), StatusCode::OK);
    let (s, v, _) = f.call("GET", "/v1/me", Some(&key), None).await;
    assert_eq!(
        (s, v["auth_type"].as_str()),
        (StatusCode::OK, Some("api_key"))
    );
    // Listing never shows the secret.
    let (_, v, _) = f.call("GET", "/v1/keys", Some(&alice), None).await;
    assert!(
        !v.to_string()
            .contains(key.rsplit_once('_').expect("secret").1)
    );
    // Bob may not revoke Alice's key; an admin may.
    let (s, _, _) = f
        .call("DELETE", &format!("/v1/keys/{id}"), Some(&bob), None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, _) = f
        .call("DELETE", &format!("/v1/keys/{id}"), Some(&admin), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v, _) = f.call("GET", "/v1/me", Some(&key), None).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "api_key_revoked"));
}

#[tokio::test]
async fn revoked_token_stops_working() {
    let f = fixture();
    let alice = f.token("alice", "user");
    let (s, _, _) = f.call("GET", "/v1/me", Some(&alice), None).await;
    assert_eq!(s, StatusCode::OK);
    let body = serde_json::to_vec(&json!({"token": alice})).expect("json");
    let (s, v, _) = f
        .call("POST", "/v1/tokens/revoke", Some(&alice), Some(body))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v, _) = f.call("GET", "/v1/me", Some(&alice), None).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "token_revoked"));
    // Revoking someone else's token by jti takes an admin.
    let bob = f.token("bob", "user");
    let (_, me, _) = f.call("GET", "/v1/me", Some(&bob), None).await;
    let body = serde_json::to_vec(&json!({"jti": me["credential_id"]})).expect("json");
    let carol = f.token("carol", "user");
    let (s, _, _) = f
        .call(
            "POST",
            "/v1/tokens/revoke",
            Some(&carol),
            Some(body.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let admin = f.token("root", "admin");
    let (s, _, _) = f
        .call("POST", "/v1/tokens/revoke", Some(&admin), Some(body))
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = f.call("GET", "/v1/me", Some(&bob), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn erase_shreds_subject_values() {
    let f = fixture();
    let t = f.token("alice", "user");
    let admin = f.token("root", "admin");
    f.call(
        "PUT",
        "/v1/memory/ns/a",
        Some(&t),
        Some(br#"{"value":"mine","subject":"alice"}"#.to_vec()),
    )
    .await;
    f.call(
        "PUT",
        "/v1/memory/ns/b",
        Some(&t),
        Some(br#"{"value":"other","subject":"bob"}"#.to_vec()),
    )
    .await;
    let (s, _, _) = f
        .call("POST", "/v1/subjects/alice/erase", Some(&admin), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v, _) = f.call("GET", "/v1/memory/ns/a", Some(&t), None).await;
    assert_eq!((s, code(&v)), (StatusCode::GONE, "subject_erased"));
    let (s, _, _) = f.call("GET", "/v1/memory/ns/b", Some(&t), None).await;
    assert_eq!(s, StatusCode::OK);
    let (_, v, _) = f.call("GET", "/v1/audit/verify", Some(&admin), None).await;
    assert_eq!(v["ok"], true, "audit chain survives shredding");
}

#[tokio::test]
async fn public_routes_and_metrics_permission() {
    let f = fixture();
    let (s, v, _) = f.call("GET", "/health", None, None).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (s, v, _) = f.call("GET", "/openapi.json", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(v["paths"]["/v1/memory/{namespace}/{key}"]["put"].is_object());
    // Not on loopback (no connection info in process): metrics need a principal with metrics.read.
    let (s, _, _) = f.call("GET", "/metrics", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = f
        .call("GET", "/metrics", Some(&f.token("u", "user")), None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v, _) = f
        .call("GET", "/metrics", Some(&f.token("v", "viewer")), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        v.as_str()
            .is_some_and(|t| t.contains("swarm_http_requests_total"))
    );
}

mod decoders {
    use proptest::prelude::*;

    use crate::gateway::parse_json;
    use crate::jwt::Verifier;

    proptest! {
        /// Bodies and tokens from the network: arbitrary bytes never panic, never authenticate.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_json::<serde_json::Value>(&bytes);
            let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
            let v = Verifier::new(vec![key.verifying_key()], "swarm".into(), "swarm".into(), 0);
            let text = String::from_utf8_lossy(&bytes);
            prop_assert!(v.verify(&text, 1).is_err());
        }

        #[test]
        fn token_shaped_garbage_never_authenticates(a in "[A-Za-z0-9_-]{0,60}", b in "[A-Za-z0-9_-]{0,120}", c in "[A-Za-z0-9_-]{0,90}") {
            let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
            let v = Verifier::new(vec![key.verifying_key()], "swarm".into(), "swarm".into(), 0);
            let token = [a, b, c].join(".");
            prop_assert!(v.verify(&token, 1).is_err());
        }
    }
}

#[tokio::test]
async fn an_agents_namespace_keeps_values_no_longer_than_its_retention() {
    let f = fixture();
    let t = f.token("alice", "user");
    let year_ms: u64 = 365 * 86_400_000 + 6 * 3_600_000;
    let before = super::now_ms();
    // testing-qa keeps its memory 1 year: an unbounded value gets that expiry...
    let (s, v, _) = f
        .call(
            "PUT",
            "/v1/memory/testing-qa/k",
            Some(&t),
            Some(br#"{"value":1}"#.to_vec()),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let exp = v["expires_at"].as_u64().expect("expiry");
    assert!(
        exp >= before + year_ms && exp <= super::now_ms() + year_ms,
        "{v}"
    );
    // ...a shorter TTL stays as asked...
    let (_, v, _) = f
        .call(
            "PUT",
            "/v1/memory/testing-qa/k2",
            Some(&t),
            Some(br#"{"value":1,"ttl":"1h"}"#.to_vec()),
        )
        .await;
    assert!(v["expires_at"].as_u64().expect("expiry") <= super::now_ms() + 3_600_000);
    // ...and a permanent agent, or any other namespace, is not capped.
    for ns in ["orchestration-coordinator", "notes"] {
        let (_, v, _) = f
            .call(
                "PUT",
                &format!("/v1/memory/{ns}/k"),
                Some(&t),
                Some(br#"{"value":1}"#.to_vec()),
            )
            .await;
        assert!(v.get("expires_at").is_none(), "{ns}: {v}");
    }
}

#[tokio::test]
async fn write_concern_without_replication_is_a_clear_error() {
    let f = fixture();
    let t = f.token("alice", "user");
    let (s, v, _) = f
        .call(
            "PUT",
            "/v1/memory/notes/k?w=2",
            Some(&t),
            Some(br#"{"value":1}"#.to_vec()),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::SERVICE_UNAVAILABLE, "no_replica"),
        "{v}"
    );
    let (s, v, _) = f
        .call(
            "PUT",
            "/v1/memory/notes/k?w=0",
            Some(&t),
            Some(br#"{"value":1}"#.to_vec()),
        )
        .await;
    assert_eq!(
        (s, v["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("w")),
        "{v}"
    );
}
