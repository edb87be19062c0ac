//! `/v1/cluster/*`: the member list, a graceful leave and a ping over the actor session.

use axum::Extension;
use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use swarm_membership::Membership;

use super::extract::json_body;
use super::{AppState, AuditCtx, Class};
use crate::auth::Principal;
use crate::error::AppError;

fn membership(s: &AppState) -> Result<&Membership, AppError> {
    s.membership
        .as_ref()
        .ok_or_else(|| AppError::Unavailable("this node runs without cluster membership".into()))
}

/// Every member this node knows, itself included: name, gossip address, state, metadata.
#[utoipa::path(
    get,
    path = "/v1/cluster/members",
    tag = "cluster",
    responses((status = 200, description = "Every member with its state (alive, suspect, down, left) and metadata", body = super::openapi::schemas::Members)),
    extensions(("x-permission" = json!("cluster.read")))
)]
pub(super) async fn members(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
) -> Result<Json<Value>, AppError> {
    s.authorize(&ctx, &who, "cluster.read", "cluster/members", None)?;
    let view = membership(&s)?.view();
    Ok(Json(json!({
        "node": s.node,
        "joined": view.active,
        "alive": view.alive(),
        "members": view.members,
    })))
}

/// Leave the cluster gracefully (peers see `left` at once), then stop this node.
#[utoipa::path(
    post,
    path = "/v1/cluster/leave",
    tag = "cluster",
    responses((status = 200, description = "Left; the node stops right after answering", body = super::openapi::schemas::Left)),
    extensions(("x-permission" = json!("cluster.admin")))
)]
pub(super) async fn leave(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
) -> Result<Json<Value>, AppError> {
    s.authorize(&ctx, &who, "cluster.admin", "cluster/leave", None)?;
    let _permit = s.permit(Class::Orchestration, &who)?;
    let m = membership(&s)?.clone();
    s.timed(Class::Orchestration, async move {
        m.leave()
            .await
            .map_err(|e| AppError::Unavailable(format!("leave: {e}")))?;
        Ok(())
    })
    .await?;
    // Answer first; the node stops right after.
    let stop = s.stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        stop.notify_one();
    });
    Ok(Json(
        json!({"node": s.node, "state": "left", "stopping": true}),
    ))
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PingBody {
    /// The peer's node name (1-63 letters, digits, `-` or `_`).
    #[schema(min_length = 1, max_length = 63, pattern = "^[A-Za-z0-9_-]+$")]
    node: String,
    /// Milliseconds to wait for the answer (default 2000, at most 10000).
    #[schema(minimum = 1, maximum = 10000)]
    timeout_ms: Option<u64>,
}

/// Longest node name (the config's rule for `node.name`).
const MAX_NODE_NAME: usize = 63;

/// Whether `name` could name a node at all: the config's rule for `node.name` (1 to 63 ASCII
/// letters, digits, `-` or `_`). A name that fails it is the client's mistake (400), not a peer
/// that cannot be reached (503).
fn possible_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NODE_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A remote actor RPC to `node`'s router over the actor session: proves the path and measures it.
#[utoipa::path(
    post,
    path = "/v1/cluster/ping",
    tag = "cluster",
    request_body = PingBody,
    responses((status = 200, description = "The peer answered", body = super::openapi::schemas::Pong)),
    extensions(("x-permission" = json!("cluster.read")))
)]
pub(super) async fn ping(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
    body: axum::body::Body,
) -> Result<Json<Value>, AppError> {
    s.authorize(&ctx, &who, "cluster.read", "cluster/ping", None)?;
    let b: PingBody = json_body(body, s.body_limit, s.body_deadline(Class::Orchestration)).await?;
    let timeout_ms = b.timeout_ms.unwrap_or(2000);
    if timeout_ms == 0 || timeout_ms > 10_000 {
        return Err(AppError::invalid_field("timeout_ms", "must be 1 to 10000"));
    }
    if !possible_node_name(&b.node) {
        return Err(AppError::invalid_field(
            "node",
            format!("not a node name: use 1-{MAX_NODE_NAME} letters, digits, `-` or `_`"),
        ));
    }
    let actors = s
        .actors
        .as_ref()
        .ok_or_else(|| AppError::Unavailable("this node runs without actor sessions".into()))?;
    if b.node == s.node {
        return Err(AppError::invalid_field(
            "node",
            "that is this node; name a peer",
        ));
    }
    match actors
        .ping(&b.node, std::time::Duration::from_millis(timeout_ms))
        .await
    {
        Ok(rtt) => Ok(Json(json!({
            "node": s.node,
            "peer": b.node,
            "rtt_us": rtt.as_micros() as u64,
        }))),
        Err(e) => Err(AppError::Unavailable(format!("{} ({})", e, e.kind()))),
    }
}
