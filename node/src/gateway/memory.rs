//! `/v1/memory` routes.

use axum::Extension;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use swarm_storage::{MemoryItem, MemoryType, PutRequest};

use super::extract::{ApiPath, ApiQuery, json_body};
use super::{AppState, AuditCtx, Class, blocking, now_ms};
use crate::auth::Principal;
use crate::error::AppError;

/// Body of a PUT.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PutBody {
    /// Any JSON value.
    value: Value,
    #[serde(default)]
    #[schema(value_type = super::openapi::schemas::MemoryType)]
    memory_type: MemoryType,
    /// Lifetime, e.g. `"30s"`, `"24h"`.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "24h")]
    ttl: Option<swarm_config::HumanDuration>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
}

/// A value as returned by the API.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct ItemView {
    namespace: String,
    key: String,
    value: Value,
    /// HLC timestamp and origin node of the version returned.
    version: String,
    origin: String,
    #[schema(value_type = super::openapi::schemas::MemoryType)]
    memory_type: MemoryType,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    tags: Vec<String>,
}

impl ItemView {
    fn from_item(i: MemoryItem) -> Result<Self, AppError> {
        let value = serde_json::from_str(&i.value_json)
            .map_err(|e| AppError::Internal(format!("stored value is not JSON: {e}")))?;
        Ok(ItemView {
            namespace: i.namespace,
            key: i.key,
            value,
            version: i.version.hlc.to_string(),
            origin: i.version.origin,
            memory_type: i.memory_type,
            expires_at: i.expires_at,
            subject: i.subject,
            tags: i.tags,
        })
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    /// Only keys that start with this.
    #[serde(default)]
    prefix: String,
    /// Items per page: 100 by default, at most `limits.max_list`.
    #[serde(default)]
    #[param(minimum = 1)]
    limit: Option<usize>,
    /// Start after this key (the previous page's `next`).
    #[serde(default)]
    after: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct ListView {
    items: Vec<ItemView>,
    /// Pass as `after` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
    /// The page stopped at its byte budget (`limits.max_list_bytes`) before `limit` items;
    /// present (and `true`) only then.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    truncated: bool,
}

/// Query of a PUT: `w=2` waits until one peer also has the write durable.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct PutQuery {
    /// Write concern: 1 (durable here, the default) or 2 (also durable on one peer).
    #[serde(default)]
    #[param(minimum = 1, maximum = 2)]
    w: Option<u8>,
}

/// Write a value: durable here, then pushed to every peer (`w=2`: also durable on one peer).
#[utoipa::path(
    put,
    path = "/v1/memory/{namespace}/{key}",
    tag = "memory",
    params(super::openapi::schemas::MemoryPath, PutQuery),
    request_body = PutBody,
    responses(
        (status = 200, description = "The value as stored", body = ItemView),
        (status = 410, description = "The subject has been erased (`subject_erased`)", body = super::openapi::schemas::Error)
    ),
    extensions(("x-permission" = json!("memory.write")))
)]
pub(super) async fn put_value(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
    ApiPath((ns, key)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<PutQuery>,
    body: Body,
) -> Result<Json<ItemView>, AppError> {
    s.authorize(
        &ctx,
        &who,
        "memory.write",
        &format!("memory/{ns}/{key}"),
        None,
    )?;
    let w2 = match q.w {
        None | Some(1) => false,
        Some(2) => true,
        Some(_) => return Err(AppError::invalid_field("w", "write concern is 1 or 2")),
    };
    // The body first, within its deadline: a stalled upload holds no permit.
    let b: PutBody = json_body(body, s.body_limit, s.body_deadline(Class::Memory)).await?;
    let _permit = s.permit(Class::Memory, &who)?;
    let st = s.clone();
    s.timed(Class::Memory, async move {
        let value_json =
            serde_json::to_string(&b.value).map_err(|e| AppError::Internal(e.to_string()))?;
        let mut ttl_ms = b
            .ttl
            .map(|d| u64::try_from(d.0.as_millis()).unwrap_or(u64::MAX));
        // An agent's namespace keeps values no longer than the agent's retention; the expiry
        // travels with the value, so every replica drops it at the same time.
        if let Some(&keep) = st.retention.get(&ns) {
            let asked = ttl_ms
                .or(b.memory_type.default_ttl_ms())
                .unwrap_or(u64::MAX);
            ttl_ms = Some(asked.min(keep));
        }
        let req = PutRequest {
            value_json,
            memory_type: b.memory_type,
            ttl_ms,
            subject: b.subject,
            tags: b.tags,
        };
        // Durable and audited here, then to the peers (with w=2, until one of them has it).
        let (memory, caller) = st.memory_for(&ctx);
        let item = memory
            .put(caller, ns, key, req, w2)
            .await
            .map_err(|e| memory_error(&e))?;
        ItemView::from_item(item).map(Json)
    })
    .await
}

/// Read a value.
#[utoipa::path(
    get,
    path = "/v1/memory/{namespace}/{key}",
    tag = "memory",
    params(super::openapi::schemas::MemoryPath),
    responses(
        (status = 200, description = "The value", body = ItemView),
        (status = 410, description = "Its subject has been erased (`subject_erased`)", body = super::openapi::schemas::Error)
    ),
    extensions(("x-permission" = json!("memory.read")))
)]
pub(super) async fn get_value(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
    ApiPath((ns, key)): ApiPath<(String, String)>,
) -> Result<Json<ItemView>, AppError> {
    s.authorize(
        &ctx,
        &who,
        "memory.read",
        &format!("memory/{ns}/{key}"),
        None,
    )?;
    let _permit = s.permit(Class::Memory, &who)?;
    let item = s.storage.memory.get(&ns, &key, now_ms())?;
    match item {
        Some(i) => ItemView::from_item(i).map(Json),
        None => Err(AppError::NotFound(format!("memory/{ns}/{key}"))),
    }
}

/// Delete a value (a tombstone, pushed to every peer).
#[utoipa::path(
    delete,
    path = "/v1/memory/{namespace}/{key}",
    tag = "memory",
    params(super::openapi::schemas::MemoryPath),
    responses((status = 200, description = "Deleted", body = super::openapi::schemas::Deleted)),
    extensions(("x-permission" = json!("memory.write")))
)]
pub(super) async fn delete_value(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
    ApiPath((ns, key)): ApiPath<(String, String)>,
) -> Result<Json<Value>, AppError> {
    s.authorize(
        &ctx,
        &who,
        "memory.write",
        &format!("memory/{ns}/{key}"),
        None,
    )?;
    let _permit = s.permit(Class::Memory, &who)?;
    let st = s.clone();
    s.timed(Class::Memory, async move {
        // The tombstone's push is best effort: anti-entropy carries it if a push is lost.
        let (memory, caller) = st.memory_for(&ctx);
        memory
            .delete(caller, ns.clone(), key.clone())
            .await
            .map_err(|e| memory_error(&e))?;
        Ok(Json(
            serde_json::json!({"deleted": true, "namespace": ns, "key": key}),
        ))
    })
    .await
}

/// List values, a page at a time, in key order.
#[utoipa::path(
    get,
    path = "/v1/memory/{namespace}",
    tag = "memory",
    params(super::openapi::schemas::NamespacePath, ListQuery),
    responses((status = 200, description = "One page of values", body = ListView)),
    extensions(("x-permission" = json!("memory.read")))
)]
pub(super) async fn list_values(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
    ApiPath(ns): ApiPath<String>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<ListView>, AppError> {
    s.authorize(&ctx, &who, "memory.read", &format!("memory/{ns}"), None)?;
    let _permit = s.permit(Class::Memory, &who)?;
    let limit = s.list_limit(q.limit)?;
    let max_bytes = s.limits.max_list_bytes;
    let st = s.clone();
    s.timed(Class::Memory, async move {
        let page = blocking(move || {
            Ok(st.storage.memory.list_page(
                &ns,
                &q.prefix,
                q.after.as_deref(),
                limit,
                max_bytes,
                now_ms(),
            )?)
        })
        .await?;
        let next = page
            .more
            .then(|| page.items.last().map(|i| i.key.clone()))
            .flatten();
        let truncated = page.truncated;
        let items = page
            .items
            .into_iter()
            .map(ItemView::from_item)
            .collect::<Result<_, _>>()?;
        Ok(Json(ListView {
            items,
            next,
            truncated,
        }))
    })
    .await
}

/// What a client gets for an outcome of the memory service: the store's refusals as any
/// handler maps them, a write no peer confirmed as `503` with the push's code.
pub(super) fn memory_error(e: &swarm_actors::Error) -> AppError {
    use swarm_actors::Error;
    match e {
        Error::Storage(e) => AppError::from_storage(e),
        Error::NotFound(what) => AppError::NotFound(what.clone()),
        Error::NotReplicated(push) => AppError::NotReplicated {
            code: push.kind(),
            message: match **push {
                Error::NoReplicator => "this node does not replicate".into(),
                _ => format!("written on this node but not confirmed by a peer: {push}"),
            },
        },
        other => AppError::Internal(other.to_string()),
    }
}

/// The status and code the memory service audits a refusal with: those of the response, so
/// the entry reads as the request's own would.
pub(super) fn refusal_codes(e: &swarm_actors::Error) -> (u16, &'static str) {
    let a = memory_error(e);
    (a.status().as_u16(), a.code())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use swarm_actors::Error;
    use swarm_storage::StorageError;

    use super::*;

    #[test]
    fn memory_outcomes_answer_as_the_handlers_did() {
        let answer = |e: Error| {
            let a = memory_error(&e);
            (a.status().as_u16(), a.code(), a.to_string())
        };
        let pushed = |e: Error| Error::NotReplicated(Box::new(e));
        assert_eq!(
            answer(pushed(Error::NoReplicator)),
            (503, "no_replica", "this node does not replicate".into())
        );
        assert_eq!(
            answer(pushed(Error::Timeout(Duration::from_secs(2)))),
            (
                503,
                "replication_timeout",
                "written on this node but not confirmed by a peer: no peer acknowledged the \
                 write as durable within 2s"
                    .into()
            )
        );
        assert_eq!(
            answer(Error::NotFound("memory/ns/k".into())),
            (404, "not_found", "memory/ns/k not found".into())
        );
        // The store's refusals answer as everywhere else in the gateway.
        for (e, same) in [
            (
                StorageError::TooLarge { size: 9, limit: 1 },
                StorageError::TooLarge { size: 9, limit: 1 },
            ),
            (
                StorageError::Erased("s".into()),
                StorageError::Erased("s".into()),
            ),
            (
                StorageError::NamespaceFull("ns".into()),
                StorageError::NamespaceFull("ns".into()),
            ),
            (
                StorageError::Engine("disk".into()),
                StorageError::Engine("disk".into()),
            ),
        ] {
            let direct = AppError::from(same);
            assert_eq!(
                answer(Error::Storage(e)),
                (direct.status().as_u16(), direct.code(), direct.to_string())
            );
        }
        // The audit entry of a refusal records what the client got.
        assert_eq!(
            refusal_codes(&Error::Storage(StorageError::TooLarge {
                size: 9,
                limit: 1
            })),
            (400, "value_too_large")
        );
    }
}
