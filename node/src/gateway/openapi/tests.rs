//! The generated document is a valid OpenAPI 3.1 description: it parses strictly, every `$ref`
//! resolves, every path parameter is declared, and every operation carries what clients and
//! schemathesis rely on (permission, security, the error responses).

use std::collections::BTreeSet;

use serde_json::Value;

use super::{ERROR_STATUSES, document};

const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

fn doc_json() -> Value {
    serde_json::to_value(document()).expect("the document serializes")
}

/// Every `(path, method, operation)` of the document.
fn operations(doc: &Value) -> Vec<(String, &'static str, &Value)> {
    let paths = doc["paths"].as_object().expect("paths");
    let mut out = Vec::new();
    for (path, item) in paths {
        for m in METHODS {
            if let Some(op) = item.get(m) {
                out.push((path.clone(), m, op));
            }
        }
    }
    out
}

/// Every value under `key` anywhere in `v`.
fn find_all<'a>(v: &'a Value, key: &str, out: &mut Vec<&'a Value>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == key {
                    out.push(x);
                }
                find_all(x, key, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| find_all(x, key, out)),
        _ => {}
    }
}

#[test]
fn the_document_parses_as_openapi_3_1() {
    let text = serde_json::to_string(document()).expect("serializes");
    let spec = oas3::from_json(&text).expect("a valid OpenAPI 3.1 document");
    let version = spec.validate_version().expect("a supported version");
    assert_eq!((version.major, version.minor), (3, 1));
    // Every operation's parameters, body, responses and schemas resolve.
    let mut n = 0;
    for (path, method, op) in spec.operations() {
        n += 1;
        let params = op
            .parameters(&spec)
            .unwrap_or_else(|e| panic!("{method} {path}: parameters: {e}"));
        assert_eq!(params.len(), op.parameters.len(), "{method} {path}");
        if let Some(body) = &op.request_body {
            body.resolve(&spec)
                .unwrap_or_else(|e| panic!("{method} {path}: request body: {e}"));
        }
        let responses = op.responses(&spec);
        assert_eq!(
            responses.len(),
            op.responses.as_ref().map_or(0, |r| r.len()),
            "{method} {path}: every response resolves"
        );
        for (status, r) in responses {
            for media in r.content.values() {
                if let Some(s) = &media.schema {
                    s.resolve(&spec)
                        .unwrap_or_else(|e| panic!("{method} {path} {status}: {e}"));
                }
            }
        }
    }
    assert!(n >= 20, "{n} operations");
    for (name, s) in spec
        .components
        .as_ref()
        .map(|c| &c.schemas)
        .into_iter()
        .flatten()
    {
        s.resolve(&spec)
            .unwrap_or_else(|e| panic!("schema {name}: {e}"));
    }
}

#[test]
fn every_ref_resolves_and_bounds_are_numbers() {
    let doc = doc_json();
    let mut refs = Vec::new();
    find_all(&doc, "$ref", &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        let r = r.as_str().expect("a $ref is a string");
        let pointer = r.strip_prefix('#').expect("a local $ref");
        assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
    }
    // OpenAPI 3.1 (JSON Schema 2020-12): exclusive bounds are numbers, never 3.0's booleans.
    for key in ["exclusiveMinimum", "exclusiveMaximum"] {
        let mut found = Vec::new();
        find_all(&doc, key, &mut found);
        for v in found {
            assert!(v.is_number(), "{key}: {v}");
        }
    }
}

#[test]
fn every_path_parameter_is_declared() {
    let doc = doc_json();
    for (path, method, op) in operations(&doc) {
        let in_template: BTreeSet<&str> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        let declared: BTreeSet<&str> = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "path")
            .inspect(|p| assert_eq!(p["required"], true, "{method} {path}: {p}"))
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert_eq!(in_template, declared, "{method} {path}");
    }
}

#[test]
fn every_operation_names_its_permission_security_and_errors() {
    let doc = doc_json();
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["apiKey"]["name"], "X-API-Key");
    let error = &doc["components"]["schemas"]["Error"];
    assert_eq!(error["required"], serde_json::json!(["error"]), "{error}");
    let mut ids = BTreeSet::new();
    for (path, method, op) in operations(&doc) {
        let id = op["operationId"].as_str().expect("operationId");
        assert!(ids.insert(id.to_string()), "duplicate operationId {id}");
        let permission = op["x-permission"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path}: no x-permission"));
        let security = op["security"].as_array().expect("security");
        if permission == "public" {
            assert!(security.is_empty(), "{method} {path}");
        } else {
            assert_eq!(security.len(), 2, "{method} {path}: bearer or apiKey");
        }
        let success = op["responses"]
            .as_object()
            .is_some_and(|r| r.keys().any(|status| status.starts_with('2')));
        assert!(success, "{method} {path}: no success response");
        for status in ERROR_STATUSES {
            assert_eq!(
                op["responses"][status]["$ref"], "#/components/responses/Error",
                "{method} {path} {status}"
            );
        }
    }
    for public in ["/health", "/openapi.json"] {
        assert_eq!(doc["paths"][public]["get"]["x-permission"], "public");
    }
}
