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
            AppError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::Overloaded { .. } | AppError::RateLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            AppError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            AppError::Timeout { .. }
            | AppError::Unavailable(_)
            | AppError::NotReplicated { .. }
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
            | AppError::RateLimited { retry_after_s } => {
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
