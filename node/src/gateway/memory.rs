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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PutBody {
    value: Value,
    #[serde(default)]
    memory_type: MemoryType,
    /// Lifetime, e.g. `"30s"`, `"24h"`.
    #[serde(default)]
    ttl: Option<swarm_config::HumanDuration>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
}

/// A value as returned by the API.
#[derive(Debug, Serialize)]
pub(super) struct ItemView {
    namespace: String,
    key: String,
    value: Value,
    /// HLC timestamp and origin node of the version returned.
    version: String,
    origin: String,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    after: Option<String>,
}

#[derive(Debug, Serialize)]
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
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PutQuery {
    #[serde(default)]
    w: Option<u8>,
}

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
        let st2 = st.clone();
        let (item, delta) = blocking(move || {
            let (item, delta) = st2
                .storage
                .memory
                .put_with_delta(&ns, &key, req, now_ms())?;
            st2.commit_blocking(&ctx, 200)?;
            Ok((item, delta))
        })
        .await?;
        // Durable here: now to the peers (and, with w=2, wait for one of them).
        if let Some(r) = &st.replicator {
            r.push(&delta, w2)
                .await
                .map_err(|e| AppError::NotReplicated {
                    code: e.code(),
                    message: format!("written on this node but not confirmed by a peer: {e}"),
                })?;
        } else if w2 {
            return Err(AppError::NotReplicated {
                code: "no_replica",
                message: "this node does not replicate".into(),
            });
        }
        ItemView::from_item(item).map(Json)
    })
    .await
}

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
        let (ns2, key2) = (ns.clone(), key.clone());
        let st2 = st.clone();
        let delta = blocking(move || {
            let delta = st2
                .storage
                .memory
                .delete_with_delta(&ns2, &key2, now_ms())?;
            if delta.is_some() {
                st2.commit_blocking(&ctx, 200)?;
            }
            Ok(delta)
        })
        .await?;
        if let Some(delta) = delta {
            if let Some(r) = &st.replicator {
                // Best effort: anti-entropy carries the tombstone if a push is lost.
                let _ = r.push(&delta, false).await;
            }
            Ok(Json(
                serde_json::json!({"deleted": true, "namespace": ns, "key": key}),
            ))
        } else {
            Err(AppError::NotFound(format!("memory/{ns}/{key}")))
        }
    })
    .await
}

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
