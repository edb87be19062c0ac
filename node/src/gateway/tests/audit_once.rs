//! Changes go through the memory service, which audits their outcome; the request middleware
//! audits the rest. Whichever writes it, every request has exactly one entry, and it reads as
//! the response did.

use std::sync::atomic::Ordering;

use axum::http::StatusCode;
use serde_json::Value;

use super::{Fixture, code, fixture};

/// What one request was audited as: (action, resource, outcome, status, code).
type Seen = (String, String, String, u16, Option<String>);

impl Fixture {
    /// Make a request; returns its status, body and its one audit entry (fails when the request
    /// has none or several).
    async fn audited(
        &self,
        method: &str,
        uri: &str,
        auth: &str,
        body: Option<&str>,
    ) -> (StatusCode, Value, Seen) {
        let (s, v, headers) = self
            .call(method, uri, Some(auth), body.map(|b| b.as_bytes().to_vec()))
            .await;
        let id = headers
            .get("x-request-id")
            .and_then(|h| h.to_str().ok())
            .expect("request id")
            .to_string();
        self.state.flush_audit();
        let mine: Vec<_> = self
            .state
            .storage
            .audit
            .list(0, 100_000)
            .expect("audit")
            .into_iter()
            .filter(|e| e.event.request_id == id)
            .collect();
        assert_eq!(mine.len(), 1, "{method} {uri}: {mine:?}");
        let e = mine.into_iter().next().expect("one").event;
        (s, v, (e.action, e.resource, e.outcome, e.status, e.code))
    }
}

fn seen(action: &str, resource: &str, outcome: &str, status: u16, code: Option<&str>) -> Seen {
    (
        action.into(),
        resource.into(),
        outcome.into(),
        status,
        code.map(String::from),
    )
}

#[tokio::test]
async fn every_change_and_refusal_is_audited_once_as_answered() {
    let f = fixture();
    let alice = f.token("alice", "user");
    let admin = f.token("root", "admin");
    let write = "memory.write";

    let (s, v, a) = f
        .audited("PUT", "/v1/memory/ns/k", &alice, Some(r#"{"value":1}"#))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(a, seen(write, "memory/ns/k", "ok", 200, None));

    // Refused by the store: nothing written, audited with the response's status and code.
    let (s, v, a) = f
        .audited(
            "PUT",
            "/v1/memory/ns/k2",
            &alice,
            Some(r#"{"value":1,"subject":"../x"}"#),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_field"));
    assert_eq!(
        a,
        seen(write, "memory/ns/k2", "error", 400, Some("invalid_field"))
    );

    // w=2 on a node that does not replicate: durable here (its `ok` entry), 503 to the client.
    let (s, v, a) = f
        .audited("PUT", "/v1/memory/ns/w?w=2", &alice, Some(r#"{"value":1}"#))
        .await;
    assert_eq!(
        (s, code(&v), v["error"]["message"].as_str()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no_replica",
            Some("this node does not replicate")
        )
    );
    assert_eq!(a, seen(write, "memory/ns/w", "ok", 200, None));

    let (s, v, a) = f.audited("DELETE", "/v1/memory/ns/k", &alice, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["deleted"], true);
    assert_eq!(a, seen(write, "memory/ns/k", "ok", 200, None));
    let (s, v, a) = f.audited("DELETE", "/v1/memory/ns/k", &alice, None).await;
    assert_eq!(
        (s, code(&v), v["error"]["message"].as_str()),
        (
            StatusCode::NOT_FOUND,
            "not_found",
            Some("memory/ns/k not found")
        )
    );
    assert_eq!(
        a,
        seen(write, "memory/ns/k", "error", 404, Some("not_found"))
    );

    let (s, v, a) = f
        .audited("POST", "/v1/subjects/alice/erase", &admin, None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(a, seen("subjects.erase", "subjects/alice", "ok", 200, None));

    // The authentication state: its records are written through the memory service too.
    let (s, v, a) = f
        .audited("POST", "/v1/keys", &alice, Some(r#"{"name":"ci"}"#))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    let resource = format!("keys/{id}");
    assert_eq!(a, seen("keys.manage", &resource, "ok", 200, None));
    let uri = format!("/v1/keys/{id}");
    let (s, v, a) = f.audited("DELETE", &uri, &alice, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(a, seen("keys.manage", &resource, "ok", 200, None));
    // Revoked already: nothing written, the request audited as any other.
    let (s, v, a) = f.audited("DELETE", &uri, &alice, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(a, seen("keys.manage", &resource, "ok", 200, None));

    // Every entry so far is counted in `/metrics`, and nothing was lost.
    let entries = f.state.storage.audit.list(0, 100_000).expect("audit").len() as u64;
    assert_eq!(
        f.state.metrics.audit_entries.load(Ordering::Relaxed),
        entries
    );
    assert_eq!(f.state.metrics.audit_failures.load(Ordering::Relaxed), 0);
}
