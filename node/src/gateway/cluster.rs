//! `/v1/cluster/*`: the member list and a graceful leave.

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

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PingBody {
    node: String,
    /// Milliseconds to wait for the answer (default 2000, at most 10000).
    timeout_ms: Option<u64>,
}

/// A remote actor RPC to `node`'s router over the actor session: proves the path and measures it.
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
        Err(e) => Err(AppError::Unavailable(format!("{} ({})", e, e.code()))),
    }
}
