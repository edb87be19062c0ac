//! `/openapi.json`: the API description, written by hand next to the routes it describes.

use axum::Json;
use serde_json::{Value, json};

fn op(summary: &str, permission: &str) -> Value {
    json!({
        "summary": summary,
        "x-permission": permission,
        "security": if permission == "public" { json!([]) } else { json!([{"bearer": []}, {"apiKey": []}]) },
        "responses": {
            "200": {"description": "OK"},
            "400": {"$ref": "#/components/responses/Error"},
            "401": {"$ref": "#/components/responses/Error"},
            "403": {"$ref": "#/components/responses/Error"},
            "404": {"$ref": "#/components/responses/Error"},
            "408": {"$ref": "#/components/responses/Error"},
            "409": {"$ref": "#/components/responses/Error"},
            "413": {"$ref": "#/components/responses/Error"},
            "429": {"$ref": "#/components/responses/Error"},
            "503": {"$ref": "#/components/responses/Error"}
        }
    })
}

fn with_body(mut v: Value, schema: Value) -> Value {
    v["requestBody"] =
        json!({"required": true, "content": {"application/json": {"schema": schema}}});
    v
}

fn message_schema() -> Value {
    json!({"type": "object", "required": ["role"], "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]}
    }})
}

fn chat_schema() -> Value {
    let sampling = json!({
        "max_tokens": {"type": "integer", "minimum": 1}, "max_completion_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2}, "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": 0}, "seed": {"type": "integer"},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "maxItems": 4, "items": {"type": "string"}}]},
        "stream": {"type": "boolean"}, "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "n": {"type": "integer", "const": 1}, "ignore_eos": {"type": "boolean"}
    });
    let mut props = sampling;
    props["model"] = json!({"type": "string"});
    props["messages"] = json!({"type": "array", "minItems": 1, "items": message_schema()});
    json!({"type": "object", "required": ["model", "messages"], "properties": props})
}

pub(super) async fn openapi() -> Json<Value> {
    let chat_schema = chat_schema();
    let completion_schema = json!({
        "type": "object", "required": ["model", "prompt"],
        "properties": {"model": {"type": "string"}, "prompt": {"type": "string"}, "max_tokens": {"type": "integer", "minimum": 1},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2}, "stream": {"type": "boolean"}}
    });
    let ns_key = json!([
        {"name": "namespace", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^[A-Za-z0-9_:-][A-Za-z0-9._:-]*$", "maxLength": 128}},
        {"name": "key", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^[A-Za-z0-9_:-][A-Za-z0-9._:-]*$", "maxLength": 128}}
    ]);
    let put_schema = json!({
        "type": "object", "required": ["value"], "additionalProperties": false,
        "properties": {
            "value": {},
            "memory_type": {"type": "string", "enum": ["session", "semantic", "agent", "trace"]},
            "ttl": {"type": "string", "example": "24h"},
            "subject": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}}
        }
    });
    let mut put = with_body(
        op(
            "Write a value (durable here, then pushed to every peer; w=2: also durable on one peer)",
            "memory.write",
        ),
        put_schema,
    );
    let mut put_params = ns_key.clone();
    if let Some(a) = put_params.as_array_mut() {
        a.push(json!({"name": "w", "in": "query", "required": false, "schema": {"type": "integer", "enum": [1, 2]}}));
    }
    put["parameters"] = put_params;
    let mut get = op("Read a value", "memory.read");
    get["parameters"] = ns_key.clone();
    let mut del = op("Delete a value (tombstone)", "memory.write");
    del["parameters"] = ns_key;
    Json(json!({
        "openapi": "3.0.3",
        "info": {"title": "swarm gateway", "version": env!("CARGO_PKG_VERSION")},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT (EdDSA)"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}
            },
            "responses": {
                "Error": {
                    "description": "Error",
                    "content": {"application/json": {"schema": {
                        "type": "object",
                        "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
                            "code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": "string"}
                        }}}
                    }}}
                }
            }
        },
        "paths": {
            "/health": {"get": op("Node health", "public")},
            "/metrics": {"get": op("Prometheus metrics (public on loopback)", "metrics.read")},
            "/openapi.json": {"get": op("This document", "public")},
            "/v1/me": {"get": op("The caller", "any")},
            "/v1/memory/{namespace}/{key}": {"put": put, "get": get, "delete": del},
            "/v1/memory/{namespace}": {"get": {
                "summary": "List values", "x-permission": "memory.read",
                "parameters": [
                    {"name": "namespace", "in": "path", "required": true, "schema": {"type": "string"}},
                    {"name": "prefix", "in": "query", "schema": {"type": "string"}},
                    {"name": "after", "in": "query", "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}}
                ],
                "responses": {"200": {"description": "OK"}}
            }},
            "/v1/subjects/{id}/erase": {"post": op("Crypto-shred a data subject", "subjects.erase")},
            "/v1/audit": {"get": op("Audit entries (after, limit)", "audit.read")},
            "/v1/audit/verify": {"get": op("Verify the audit hash chain", "audit.read")},
            "/v1/keys": {
                "post": with_body(op("Create an API key (shown once)", "keys.manage"), json!({
                    "type": "object", "required": ["name"], "additionalProperties": false,
                    "properties": {"name": {"type": "string"}, "role": {"type": "string"}, "ttl": {"type": "string"}}
                })),
                "get": op("List API keys (own, or all for admins)", "keys.manage")
            },
            "/v1/keys/{id}": {"delete": op("Revoke an API key (owner or admin)", "keys.manage")},
            "/v1/tokens/revoke": {"post": with_body(op("Revoke a JWT by token or jti", "tokens.admin or own token"), json!({
                "type": "object", "additionalProperties": false,
                "properties": {"token": {"type": "string"}, "jti": {"type": "string"}}
            }))},
            "/v1/cluster/members": {"get": op("Every member with its state (alive, suspect, down, left) and metadata", "cluster.read")},
            "/v1/cluster/leave": {"post": op("Leave the cluster gracefully, then stop this node", "cluster.admin")},
            "/v1/cluster/ping": {"post": with_body(op("Remote actor call to a peer's router over the QUIC actor session", "cluster.read"), json!({
                "type": "object", "additionalProperties": false, "required": ["node"],
                "properties": {"node": {"type": "string"}, "timeout_ms": {"type": "integer", "minimum": 1, "maximum": 10000}}
            }))},
            "/v1/models": {"get": op("Models served anywhere in the cluster (OpenAI list), with the nodes serving each", "inference.use")},
            "/v1/chat/completions": {"post": with_body(op("OpenAI chat completion on the least-loaded node serving the model; `stream: true` answers server-sent events ending in [DONE]", "inference.use"), chat_schema)},
            "/v1/completions": {"post": with_body(op("OpenAI text completion (one prompt); same sampling fields as chat", "inference.use"), completion_schema)}
        }
    }))
}
