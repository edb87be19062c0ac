//! The route table and its description agree: every documented operation is routed (it never
//! reaches the 404/405 fallbacks), and what the description promises about refusals holds.

use axum::http::StatusCode;
use serde_json::{Value, json};

use super::{code, fixture};
use crate::gateway::openapi::document;

/// Every documented operation reaches its handler: whatever it answers, it is not the router's
/// "no such route" 404 nor its 405.
#[tokio::test]
async fn every_documented_operation_is_routed() {
    let f = fixture();
    let admin = f.token("root", "admin");
    let doc = serde_json::to_value(document()).expect("document");
    let paths = doc["paths"].as_object().expect("paths");
    let mut n = 0;
    for (template, item) in paths {
        // Fill each `{param}` with a plausible value.
        let path: String = template
            .split('/')
            .map(|seg| if seg.starts_with('{') { "x" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        for method in ["get", "put", "post", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            // Leaving would stop the fixture's node; it is routed like the others.
            if path == "/v1/cluster/leave" {
                continue;
            }
            n += 1;
            let m = method.to_uppercase();
            let (s, v, _) = f.call(&m, &path, Some(&admin), Some(b"{}".to_vec())).await;
            assert_ne!(s, StatusCode::METHOD_NOT_ALLOWED, "{m} {path}: {v}");
            let fallback = s == StatusCode::NOT_FOUND
                && v["error"]["message"]
                    .as_str()
                    .is_some_and(|msg| msg.starts_with("route "));
            assert!(!fallback, "{m} {path} is documented but not routed: {v}");
        }
    }
    assert!(n >= 20, "{n} operations tried");
}

/// `POST /v1/cluster/ping` with a name no node can have is the client's mistake: 400
/// `invalid_field` naming `node`, not 503.
#[tokio::test]
async fn ping_refuses_impossible_node_names() {
    let f = fixture();
    let admin = f.token("root", "admin");
    let long = "n".repeat(64);
    for node in ["", "node/1", "nöde", "a b", long.as_str()] {
        let body = serde_json::to_vec(&json!({ "node": node })).expect("json");
        let (s, v, _) = f
            .call("POST", "/v1/cluster/ping", Some(&admin), Some(body))
            .await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::BAD_REQUEST, "invalid_field"),
            "{node:?}: {v}"
        );
        assert_eq!(v["error"]["field"], "node", "{node:?}: {v}");
    }
    // A possible name gets past validation (this fixture has no actor sessions: 503).
    let body = serde_json::to_vec(&json!({ "node": "node-2" })).expect("json");
    let (s, v, _) = f
        .call("POST", "/v1/cluster/ping", Some(&admin), Some(body))
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
}

/// `/openapi.json` is served without credentials and is the generated document.
#[tokio::test]
async fn the_served_document_is_the_generated_one() {
    let f = fixture();
    let (s, v, _) = f.call("GET", "/openapi.json", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let want: Value = serde_json::to_value(document()).expect("document");
    assert_eq!(v, want);
}
