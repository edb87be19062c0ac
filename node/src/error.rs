//! The one error type of the gateway: a stable code, a safe message and the right status.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use swarm_storage::StorageError;

use crate::auth::AuthError;

/// Every error a client can get. `code()` is stable; messages are safe to show.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{message}")]
    BadRequest {
        code: &'static str,
        message: String,
        field: Option<String>,
    },
    #[error("{0}")]
    Unauthorized(AuthError),
    #[error("missing permission `{0}`")]
    Forbidden(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    #[error("subject `{0}` has been erased")]
    Gone(String),
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    Unprocessable(String),
    #[error("too many concurrent {class} requests; retry later")]
    Overloaded {
        class: &'static str,
        retry_after_s: u64,
    },
    /// This source (IP address) sent more requests than its rate allows.
    #[error("too many requests from this address; retry later")]
    RateLimited { retry_after_s: u64 },
    /// The client did not send its request body within the deadline.
    #[error("request body not received within {timeout_ms} ms")]
    BodyTimeout { timeout_ms: u64 },
    #[error("{class} request took longer than {timeout_ms} ms")]
    Timeout {
        class: &'static str,
        timeout_ms: u64,
    },
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// A `w=2` write is durable here but no peer confirmed it (`no_replica`,
    /// `replication_timeout`).
    #[error("{message}")]
    NotReplicated { code: &'static str, message: String },
    /// No node of the cluster serves the model (OpenAI: 404 `model_not_found`).
    #[error("{0}")]
    ModelNotFound(String),
    /// The model is served here but not loaded (missing or corrupt file, still loading, engine
    /// stopped).
    #[error("{0}")]
    ModelUnavailable(String),
    /// The task queue is full (`queue_full`): try again after `retry_after_s`.
    #[error("the task queue is full; retry later")]
    QueueFull { retry_after_s: u64 },
    /// The task is not in a state the operation can act on: `task_finished`, `task_state`,
    /// `stale_epoch`.
    #[error("{message}")]
    TaskConflict { code: &'static str, message: String },
    /// Well-formed, but the swarm cannot do it: `no_capable_agent` (naming the field),
    /// `budget_exceeded`.
    #[error("{message}")]
    Unsatisfiable {
        code: &'static str,
        message: String,
        field: Option<String>,
    },
    /// The task service refused the caller for a reason of its own (not a missing permission).
    #[error("forbidden: {0}")]
    Refused(String),
    /// An agent's generation failed (`stage_failed`).
    #[error("{0}")]
    StageFailed(String),
    /// What the task service needs is not reachable now (no session with the task's owner, no
    /// peer to confirm, a peer call that timed out); the code is the service's.
    #[error("{message}")]
    Upstream { code: &'static str, message: String },
    #[error("internal error")]
    Internal(String),
}

impl AppError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        AppError::BadRequest {
            code,
            message: message.into(),
            field: None,
        }
    }

    pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        AppError::BadRequest {
            code: "invalid_field",
            message: message.into(),
            field: Some(field.into()),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::NotFound(_) | AppError::ModelNotFound(_) => StatusCode::NOT_FOUND,
            AppError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            AppError::Conflict(_) => StatusCode::CONFLICT,
            AppError::Gone(_) => StatusCode::GONE,
            AppError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::Unprocessable(_) | AppError::Unsatisfiable { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            AppError::Overloaded { .. }
            | AppError::RateLimited { .. }
            | AppError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            AppError::TaskConflict { .. } => StatusCode::CONFLICT,
            AppError::Refused(_) => StatusCode::FORBIDDEN,
            AppError::StageFailed(_) => StatusCode::BAD_GATEWAY,
            AppError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            AppError::Timeout { .. }
            | AppError::Unavailable(_)
            | AppError::NotReplicated { .. }
            | AppError::Upstream { .. }
            | AppError::ModelUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            AppError::BadRequest { code, .. } => code,
            AppError::Unauthorized(e) => e.code(),
            AppError::Forbidden(_) => "forbidden",
            AppError::NotFound(_) => "not_found",
            AppError::MethodNotAllowed => "method_not_allowed",
            AppError::Conflict(_) => "conflict",
            AppError::Gone(_) => "subject_erased",
            AppError::PayloadTooLarge { .. } => "payload_too_large",
            AppError::Unprocessable(_) => "unprocessable",
            AppError::Overloaded { .. } => "overloaded",
            AppError::RateLimited { .. } => "rate_limited",
            AppError::BodyTimeout { .. } => "body_timeout",
            AppError::Timeout { .. } => "timeout",
            AppError::Unavailable(_) => "unavailable",
            AppError::NotReplicated { code, .. } => code,
            AppError::ModelNotFound(_) => "model_not_found",
            AppError::ModelUnavailable(_) => "model_unavailable",
            AppError::QueueFull { .. } => "queue_full",
            AppError::TaskConflict { code, .. }
            | AppError::Unsatisfiable { code, .. }
            | AppError::Upstream { code, .. } => code,
            AppError::Refused(_) => "forbidden",
            AppError::StageFailed(_) => "stage_failed",
            AppError::Internal(_) => "internal",
        }
    }
}

impl AppError {
    /// The JSON body clients get: OpenAI's error shape (`message`, `type`, `param`, `code`),
    /// plus `field` when a request field is at fault. Also sent as the last event of a stream
    /// that fails after it started.
    pub fn body(&self) -> serde_json::Value {
        let message = match self {
            AppError::Internal(_) => "internal error".to_string(),
            other => other.to_string(),
        };
        let kind = match self.status().as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        let mut body = json!({"error": {"code": self.code(), "message": message, "type": kind, "param": null}});
        if let AppError::BadRequest {
            field: Some(field), ..
        }
        | AppError::Unsatisfiable {
            field: Some(field), ..
        } = self
        {
            body["error"]["field"] = json!(field);
            body["error"]["param"] = json!(field);
        }
        body
    }
}

impl From<StorageError> for AppError {
    fn from(e: StorageError) -> Self {
        AppError::from_storage(&e)
    }
}

impl AppError {
    /// What a client gets for a store error (by reference: the memory service audits a refusal
    /// with the same status and code before the handler answers).
    pub fn from_storage(e: &StorageError) -> Self {
        match e {
            StorageError::InvalidInput { field, message } => AppError::BadRequest {
                code: "invalid_field",
                message: format!("invalid {field}: {message}"),
                field: Some(field.to_string()),
            },
            StorageError::TooLarge { size, limit } => AppError::BadRequest {
                code: "value_too_large",
                message: format!("value is {size} bytes, limit {limit}"),
                field: Some("value".into()),
            },
            StorageError::NamespaceFull(ns) => {
                AppError::Conflict(format!("namespace `{ns}` is full"))
            }
            StorageError::Erased(s) => AppError::Gone(s.clone()),
            StorageError::ClockSkew { .. } => AppError::Unprocessable(e.to_string()),
            other => AppError::Internal(other.to_string()),
        }
    }
}

impl AppError {
    /// What a client gets for an error of the task service ([`swarm_actors::tasks::TaskApi`]):
    /// the service's stable code with the status that fits it. Every variant is named, so a
    /// new kind of error needs a decision here before it can reach a client.
    pub fn from_task(e: &swarm_actors::Error) -> Self {
        use swarm_actors::Error as E;
        match e {
            E::Invalid { field, .. } => AppError::BadRequest {
                code: e.kind(),
                message: e.to_string(),
                field: Some(field.clone()),
            },
            E::QueueFull { retry_after_s } => AppError::QueueFull {
                retry_after_s: (*retry_after_s).max(1),
            },
            E::NoCapableAgent { field, .. } => AppError::Unsatisfiable {
                code: e.kind(),
                message: e.to_string(),
                field: Some(field.clone()),
            },
            E::BudgetExceeded { .. } => AppError::Unsatisfiable {
                code: e.kind(),
                message: e.to_string(),
                field: None,
            },
            E::TaskFinished { .. } | E::TaskState { .. } | E::StaleEpoch { .. } => {
                AppError::TaskConflict {
                    code: e.kind(),
                    message: e.to_string(),
                }
            }
            E::NotFound(what) => AppError::NotFound(what.clone()),
            E::Forbidden(why) => AppError::Refused(why.clone()),
            E::StageFailed { .. } => AppError::StageFailed(e.to_string()),
            E::Unavailable(why) => AppError::Unavailable(why.clone()),
            E::Storage(s) => AppError::from_storage(s),
            // The cluster between this node and the task's owner: transient, retry later.
            E::NoReplica
            | E::Timeout(_)
            | E::Stream { .. }
            | E::Refused { .. }
            | E::Stopped
            | E::NotReplicated(_)
            | E::NoReplicator
            | E::ClusterStart(_)
            | E::ClusterStopped
            | E::SessionClosed(_)
            | E::SessionTimeout(_)
            | E::Connect(..)
            | E::NoSession(_)
            | E::NoRouter(_)
            | E::RpcTimeout(_)
            | E::PeerGone(_)
            | E::OwnerUnreachable { .. } => AppError::Upstream {
                code: e.kind(),
                message: e.to_string(),
            },
            // Bugs or corruption, not the client's business: logged, answered as 500.
            E::Frame { .. }
            | E::FrameTooLarge { .. }
            | E::Encode(_)
            | E::NameMismatch { .. }
            | E::NotLoopback(_)
            | E::BadReply(_) => AppError::Internal(e.to_string()),
        }
    }
}

impl From<AuthError> for AppError {
    fn from(e: AuthError) -> Self {
        AppError::Unauthorized(e)
    }
}

/// The cause of an internal error, kept for the logging middleware.
#[derive(Debug, Clone)]
pub struct ErrorCause(pub String);

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = self.body();
        let mut resp = (status, axum::Json(body)).into_response();
        match &self {
            AppError::Overloaded { retry_after_s, .. }
            | AppError::RateLimited { retry_after_s }
            | AppError::QueueFull { retry_after_s } => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
            }
            AppError::Unauthorized(_) => {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"swarm\""),
                );
            }
            _ => {}
        }
        resp.extensions_mut().insert(ErrorCode(self.code()));
        if let AppError::Internal(cause) = &self {
            resp.extensions_mut().insert(ErrorCause(cause.clone()));
        }
        resp
    }
}

/// The stable code of an error response, for the audit middleware.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use swarm_actors::Error;

    use super::*;

    /// (status, code, field) a client gets for an error of the task service.
    fn answer(e: Error) -> (u16, &'static str, Option<String>) {
        let a = AppError::from_task(&e);
        let field = a.body()["error"]["field"].as_str().map(String::from);
        (a.status().as_u16(), a.code(), field)
    }

    #[test]
    fn task_errors_keep_their_code_and_field() {
        let field = |f: &str| Some(f.to_string());
        let cases = [
            (
                Error::Invalid {
                    field: "priority".into(),
                    message: "no such priority".into(),
                },
                (400, "invalid_request", field("priority")),
            ),
            (
                Error::QueueFull { retry_after_s: 3 },
                (429, "queue_full", None),
            ),
            (
                Error::NoCapableAgent {
                    field: "capabilities[1]".into(),
                    capability: "x".into(),
                },
                (422, "no_capable_agent", field("capabilities[1]")),
            ),
            (
                Error::BudgetExceeded { budget: 10 },
                (422, "budget_exceeded", None),
            ),
            (
                Error::TaskFinished {
                    id: "t".into(),
                    status: "completed".into(),
                },
                (409, "task_finished", None),
            ),
            (
                Error::TaskState {
                    id: "t".into(),
                    status: "pending".into(),
                    message: "not dead".into(),
                },
                (409, "task_state", None),
            ),
            (
                Error::StaleEpoch {
                    task: "t".into(),
                    stage: "s".into(),
                    epoch: 1,
                    current: 2,
                },
                (409, "stale_epoch", None),
            ),
            (Error::NotFound("task t".into()), (404, "not_found", None)),
            (
                Error::Forbidden("not yours".into()),
                (403, "forbidden", None),
            ),
            (
                Error::StageFailed {
                    code: "model_unavailable".into(),
                    message: "gone".into(),
                },
                (502, "stage_failed", None),
            ),
            (
                Error::Unavailable("no owner".into()),
                (503, "unavailable", None),
            ),
            (Error::RpcTimeout("node-2".into()), (503, "timeout", None)),
            (
                Error::OwnerUnreachable {
                    first: "node-2".into(),
                    next: "node-3".into(),
                },
                (503, "owner_unreachable", None),
            ),
            (
                Error::Timeout(Duration::from_secs(1)),
                (503, "replication_timeout", None),
            ),
            (Error::NoSession("node-2".into()), (503, "no_session", None)),
            (Error::BadReply("node-2".into()), (500, "internal", None)),
        ];
        for (e, want) in cases {
            let what = format!("{e:?}");
            assert_eq!(answer(e), want, "{what}");
        }
        let full = AppError::from_task(&Error::QueueFull { retry_after_s: 0 }).into_response();
        assert_eq!(
            full.headers().get(header::RETRY_AFTER),
            Some(&HeaderValue::from(1)),
            "never `Retry-After: 0`"
        );
    }
}
