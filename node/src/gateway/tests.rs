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
    fixture_full(body_limit, swarm, LimitsConfig::default())
}

fn fixture_full(body_limit: usize, swarm: SwarmFile, limits: LimitsConfig) -> Fixture {
    fixture_parts(body_limit, swarm, limits, None)
}

/// The gateway with `tasks` as its task service (`None`: a node without one).
fn fixture_parts(
    body_limit: usize,
    swarm: SwarmFile,
    limits: LimitsConfig,
    tasks: Option<Arc<dyn TaskApi>>,
) -> Fixture {
    let key = SigningKey::from_bytes(&rand::random());
    let storage = Storage::with_engine(
        Arc::new(MemEngine::new()),
        SecretKey::generate(),
        StorageOptions::new("n1"),
    )
    .expect("storage");
    let verifier = Verifier::new(
        vec![key.verifying_key()],
        "swarm".into(),
        "swarm".into(),
        0,
        365 * 86_400,
    );
    let auth = Authenticator::new(verifier, key.clone(), &storage).expect("auth");
    let mut roles = BTreeMap::new();
    roles.insert("auditor".to_string(), vec!["audit.read".to_string()]);
    let state = Inner::new(GatewayParts {
        node: "n1".into(),
        storage,
        auth,
        policy: Policy::new(&roles),
        swarm,
        limits,
        body_limit,
        max_token_ttl_s: 365 * 86_400,
        signing_key: key.clone(),
        issuer: "swarm".into(),
        audience: "swarm".into(),
        membership: None,
        actors: None,
        replicator: None,
        inference: crate::inference::Inference::standalone("n1"),
        tasks,
        workflows: BTreeMap::new(),
    })
    .expect("gateway state");
    Fixture { state, key }
}

fn fixture() -> Fixture {
    fixture_with(4096, SwarmFile::preset().expect("preset"))
}

/// Tags count toward the value limit (a 400 naming `tags`), and a list page stops at its byte
/// budget (`limits.max_list_bytes`) with `truncated` and a `next` cursor.
#[tokio::test]
async fn tags_are_limited_and_list_pages_keep_to_their_byte_budget() {
    let limits = LimitsConfig {
        max_list_bytes: 20_000,
        ..LimitsConfig::default()
    };
    let f = fixture_full(64 * 1024, SwarmFile::preset().expect("preset"), limits);
    let user = f.token("alice", "user");
    let tags: Vec<String> = (0..40).map(|i| format!("tag-{i}")).collect();
    let body = serde_json::to_vec(&json!({"value": 1, "tags": tags})).expect("json");
    let (s, v, _) = f
        .call("PUT", "/v1/memory/ns/many", Some(&user), Some(body))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["field"], "tags", "{v}");
    let big = "x".repeat(8_000);
    for i in 0..5 {
        let body = serde_json::to_vec(&json!({"value": big, "tags": ["a"]})).expect("json");
        let (s, v, _) = f
            .call(
                "PUT",
                &format!("/v1/memory/ns/k{i}"),
                Some(&user),
                Some(body),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let (s, v, _) = f
        .call("GET", "/v1/memory/ns?limit=40", Some(&user), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let items = v["items"].as_array().expect("items");
    assert_eq!(items.len(), 2, "two 8 KB values fit in 20 000 bytes: {v}");
    assert_eq!(v["truncated"], true);
    assert_eq!(v["next"], "k1");
    let (s, v, _) = f
        .call("GET", "/v1/memory/ns?limit=40&after=k3", Some(&user), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["items"].as_array().map(Vec::len), Some(1));
    assert!(
        v.get("truncated").is_none() && v.get("next").is_none(),
        "{v}"
    );
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
        self.send(req, 1 << 20).await
    }

    /// Route `req` and read the response (a body of at most `max` bytes) as JSON, or as text.
    async fn send(
        &self,
        req: Request<Body>,
        max: usize,
    ) -> (StatusCode, Value, axum::http::HeaderMap) {
        let resp = router(self.state.clone())
            .oneshot(req)
            .await
            .expect("response");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), max)
            .await
            .expect("body");
        let v = serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, v, headers)
    }

    fn principal(&self, token: &str) -> Principal {
        self.state
            .auth
            .authenticate(Some(&format!("Bearer {token}")), None, now_s())
            .expect("principal")
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
    let other = SigningKey::from_bytes(&rand::random());
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
    // The audit trail is admin's and auditor's, not viewer's (issue 13 item 9).
    let (s, _, _) = f.call("GET", "/v1/audit", Some(&viewer), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, _) = f.call("GET", "/v1/audit/verify", Some(&viewer), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, _) = f.call("GET", "/v1/audit", Some(&auditor), None).await;
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
    let alice = f.principal(&t);
    let held: Vec<_> = std::iter::from_fn(|| f.state.permit(Class::Memory, &alice).ok())
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
            .contains(key.splitn(3, '_').nth(2).expect("secret"))
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
    // This fixture's `auditor` (from its [roles]) has audit.read only.
    let (s, _, _) = f
        .call("GET", "/metrics", Some(&f.token("a", "auditor")), None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, _) = f
        .call("GET", "/metrics", Some(&f.token("u", "user")), None)
        .await;
    assert_eq!(s, StatusCode::OK);
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
            let v = Verifier::new(vec![key.verifying_key()], "swarm".into(), "swarm".into(), 0, 86_400);
            let text = String::from_utf8_lossy(&bytes);
            prop_assert!(v.verify(&text, 1).is_err());
        }

        #[test]
        fn token_shaped_garbage_never_authenticates(a in "[A-Za-z0-9_-]{0,60}", b in "[A-Za-z0-9_-]{0,120}", c in "[A-Za-z0-9_-]{0,90}") {
            let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
            let v = Verifier::new(vec![key.verifying_key()], "swarm".into(), "swarm".into(), 0, 86_400);
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

/// Issue 13 items 3-5: what an anonymous or unprivileged client can make the node store, show
/// or hold.
mod bounded_abuse {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::time::Duration;

    use super::*;

    impl Fixture {
        /// Like `call`, from `ip` (as the real server's connection info says).
        async fn call_from(
            &self,
            ip: &str,
            method: &str,
            uri: &str,
            auth: Option<&str>,
        ) -> (StatusCode, Value, axum::http::HeaderMap) {
            let mut b = Request::builder().method(method).uri(uri);
            if let Some(t) = auth {
                b = b.header("authorization", format!("Bearer {t}"));
            }
            let mut req = b.body(Body::empty()).expect("request");
            let addr = SocketAddr::new(ip.parse().expect("ip"), 40_000);
            req.extensions_mut().insert(ConnectInfo(addr));
            self.send(req, 64 << 20).await
        }

        fn audit_all(&self) -> Vec<swarm_storage::AuditEntry> {
            self.state.flush_audit();
            self.state.storage.audit.list(0, 100_000).expect("audit")
        }
    }

    #[tokio::test]
    async fn anonymous_refusals_are_counted_not_stored_one_by_one() {
        let f = fixture();
        let long = "a".repeat(65_000);
        for i in 0..300 {
            let ip = format!("10.0.{}.{}", i % 3, 1 + i % 3);
            let (s, _, _) = f
                .call_from(&ip, "GET", &format!("/v1/{i}{long}"), None)
                .await;
            assert_eq!(s, StatusCode::UNAUTHORIZED);
        }
        // 405 on a public route, unauthenticated: counted the same way.
        let (s, _, _) = f.call_from("10.0.0.1", "POST", "/health", None).await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
        // An authenticated request with a long resource: its own entry, clipped.
        let t = f.token("alice", "user");
        let (s, _, _) = f
            .call_from(
                "10.0.9.9",
                "DELETE",
                &format!("/v1/memory/ns/{long}"),
                Some(&t),
            )
            .await;
        assert!(s.is_client_error(), "{s}");
        let all = f.audit_all();
        // Per source: its first refusal, then one entry that counts the rest; plus alice's.
        assert!(all.len() <= 7, "{} audit entries", all.len());
        for e in &all {
            let size = serde_json::to_vec(e).expect("json").len();
            assert!(size < 1024, "entry of {size} bytes: {}", e.event.resource);
        }
        let refused: Vec<_> = all
            .iter()
            .filter(|e| e.event.action == "http.refused")
            .collect();
        assert_eq!(refused.len(), 3, "one count per source");
        let first = refused
            .iter()
            .find(|e| e.event.resource.starts_with("source=10.0.0.1 "))
            .expect("10.0.0.1");
        assert!(
            first
                .event
                .resource
                .contains("count=100 statuses=401:99,405:1"),
            "{}",
            first.event.resource
        );
        assert_eq!(first.event.actor, "anonymous");
        assert!(all.iter().any(|e| e.event.actor == "alice"));
        // The first refusal of each source is its own entry, with its code and clipped path.
        let singles = all
            .iter()
            .filter(|e| e.event.action != "http.refused" && e.event.actor == "anonymous")
            .count();
        assert_eq!(singles, 3);
    }

    #[tokio::test]
    async fn a_source_over_its_rate_gets_429_and_others_are_served() {
        let limits = LimitsConfig {
            requests_per_second_per_source: 1,
            burst_per_source: 20,
            ..LimitsConfig::default()
        };
        let f = fixture_full(4096, SwarmFile::preset().expect("preset"), limits);
        let admin = f.token("root", "admin");
        let mut limited = 0;
        for _ in 0..40 {
            let (s, v, h) = f.call_from("10.0.0.66", "GET", "/v1/me", None).await;
            if s == StatusCode::TOO_MANY_REQUESTS {
                limited += 1;
                assert_eq!(code(&v), "rate_limited");
                assert!(h.contains_key("retry-after"));
            } else {
                assert_eq!(s, StatusCode::UNAUTHORIZED);
            }
        }
        assert!(limited >= 19, "{limited} of 40 refused");
        // Checked before authentication: a valid token does not get the source through.
        let (s, _, _) = f
            .call_from("10.0.0.66", "GET", "/v1/me", Some(&admin))
            .await;
        assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
        // Other sources: the node answers /health and an admin.
        let (s, v, _) = f.call_from("10.0.0.7", "GET", "/health", None).await;
        assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("ok")));
        let (s, _, _) = f
            .call_from("10.0.0.8", "GET", "/v1/audit", Some(&admin))
            .await;
        assert_eq!(s, StatusCode::OK);
        // The refusals of the limited source are one audit entry.
        let refused = f
            .audit_all()
            .into_iter()
            .filter(|e| e.event.resource.starts_with("source=10.0.0.66 "))
            .count();
        assert_eq!(refused, 1);
    }

    #[tokio::test]
    async fn junk_methods_and_paths_leave_metrics_bounded() {
        let f = fixture();
        let viewer = f.token("v", "viewer");
        let size = |v: &Value| v.as_str().map_or(0, str::len);
        let (s, v, _) = f
            .call_from("10.0.0.2", "GET", "/metrics", Some(&viewer))
            .await;
        assert_eq!(s, StatusCode::OK);
        let before = size(&v);
        for i in 0..150 {
            let method = format!("J{i}{}", "X".repeat(4000));
            let ip = format!("10.1.0.{}", i % 100);
            f.call_from(&ip, &method, "/v1/me", None).await;
            f.call_from(&ip, "GET", &format!("/nowhere/{i}"), Some(&viewer))
                .await;
        }
        let (s, v, _) = f
            .call_from("10.0.0.2", "GET", "/metrics", Some(&viewer))
            .await;
        assert_eq!(s, StatusCode::OK);
        let text = v.as_str().unwrap_or_default();
        assert!(!text.contains("XXXX") && !text.contains("nowhere"));
        assert!(text.contains("method=\"other\""), "{text}");
        assert!(
            size(&v) < before + 8 * 1024,
            "metrics grew from {before} to {} bytes",
            size(&v)
        );
    }

    /// Send raw bytes and read until the server closes (or `wait` passes).
    fn exchange(addr: SocketAddr, text: &str, wait: Duration) -> String {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(wait)).expect("timeout");
        s.write_all(text.as_bytes()).expect("write");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn status_of(response: &str) -> &str {
        response.split(' ').nth(1).unwrap_or("")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stalled_uploads_do_not_lock_admins_out() {
        let f = fixture();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = router(f.state.clone());
        let server = tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
        });
        let user = f.token("mallory", "user");
        let admin = f.token("root", "admin");
        // 6 key creations and 21 memory writes that announce 100 bytes and send 4.
        let mut stalled = Vec::new();
        for i in 0..27 {
            let head = if i < 6 {
                "POST /v1/keys".to_string()
            } else {
                format!("PUT /v1/memory/ns/k{i}")
            };
            let mut s = TcpStream::connect(addr).expect("connect");
            let req = format!(
                "{head} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {user}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"na"
            );
            s.write_all(req.as_bytes()).expect("write");
            stalled.push(s);
        }
        // Wait until the gateway is serving all of them (bounded).
        for _ in 0..500 {
            if f.state.metrics.in_flight.load(Ordering::Relaxed) >= 27 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(f.state.metrics.in_flight.load(Ordering::Relaxed), 27);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let get = |path: &str, token: &str| {
            format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
            )
        };
        let asks = [
            get("/v1/audit", &admin),
            get("/v1/keys", &admin),
            format!(
                "POST /v1/subjects/bob/erase HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
            get("/v1/memory/ns/other", &user),
            get("/health", &admin),
        ];
        let answers = tokio::task::spawn_blocking(move || {
            asks.iter()
                .map(|a| exchange(addr, a, Duration::from_secs(10)))
                .collect::<Vec<_>>()
        })
        .await
        .expect("client");
        let statuses: Vec<&str> = answers.iter().map(|a| status_of(a)).collect();
        assert_eq!(statuses, ["200", "200", "200", "404", "200"], "{answers:?}");
        // A stalled body ends with 408 at the class's deadline (memory_ops: 3 s).
        let mut s = stalled.pop().expect("a stalled upload");
        let answer = tokio::task::spawn_blocking(move || {
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            String::from_utf8_lossy(&buf[..n]).into_owned()
        })
        .await
        .expect("client");
        assert_eq!(status_of(&answer), "408", "{answer}");
        assert!(answer.contains("body_timeout"), "{answer}");
        drop(stalled);
        server.abort();
    }

    #[tokio::test]
    async fn admins_keep_a_reserve_of_each_bulkhead() {
        let f = fixture();
        let user = f.token("mallory", "user");
        let admin = f.token("root", "admin");
        let who = f.principal(&user);
        let held: Vec<_> = std::iter::from_fn(|| f.state.permit(Class::Security, &who).ok())
            .take(100)
            .collect();
        assert_eq!(held.len(), 5, "security_scanning limit from the swarm file");
        let (s, v, _) = f.call("GET", "/v1/keys", Some(&user), None).await;
        assert_eq!((s, code(&v)), (StatusCode::TOO_MANY_REQUESTS, "overloaded"));
        let (s, _, _) = f.call("GET", "/v1/audit", Some(&admin), None).await;
        assert_eq!(s, StatusCode::OK);
        let (s, _, _) = f.call("GET", "/v1/keys", Some(&admin), None).await;
        assert_eq!(s, StatusCode::OK);
    }
}

mod api_contract;
mod audit_once;
mod tasks;
