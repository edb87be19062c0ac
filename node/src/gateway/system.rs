//! `/health` and `/metrics`.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::{AppState, AuditCtx};
use crate::auth::Principal;
use crate::error::AppError;

pub(super) async fn health(State(s): State<AppState>) -> Json<Value> {
    let storage = match s.storage.engine.get("meta", b"health") {
        Ok(_) => "ok",
        Err(_) => "error",
    };
    Json(json!({
        "status": if storage == "ok" { "ok" } else { "degraded" },
        "node": s.node,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": s.started.elapsed().as_secs(),
        "members_alive": 1,
        "services": {
            "storage": storage,
            "membership": "standalone",
            "inference": "disabled",
        },
    }))
}

pub(super) async fn metrics(
    State(s): State<AppState>,
    req: Request,
) -> Result<impl IntoResponse, AppError> {
    let ext = req.extensions();
    let loopback = ext
        .get::<ConnectInfo<SocketAddr>>()
        .is_some_and(|c| c.0.ip().is_loopback());
    if !loopback {
        match (ext.get::<Principal>(), ext.get::<AuditCtx>()) {
            (Some(p), Some(c)) => s.authorize(c, p, "metrics.read", "metrics", None)?,
            _ => return Err(AppError::Forbidden("metrics.read".into())),
        }
    }
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(&s.node),
    ))
}
