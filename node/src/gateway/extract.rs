//! Extractors whose rejections are [`AppError`]s, so every bad input gets our JSON error.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::AppError;

/// Path parameters; a bad segment (invalid UTF-8, wrong type) is a 400 naming the parameter.
#[derive(Debug)]
pub(super) struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(e) => Err(AppError::invalid_field("path", e.body_text())),
        }
    }
}

/// Query parameters; a bad one is a 400 naming it.
#[derive(Debug)]
pub(super) struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(ApiQuery(v)),
            Err(e) => Err(AppError::invalid_field("query", e.body_text())),
        }
    }
}

/// Read a JSON body of at most `limit` bytes into `T` within `deadline` (else 408
/// `body_timeout`), naming the offending field on error. Handlers read the body before they take
/// a bulkhead permit, so a client that stalls its upload holds no capacity.
pub(super) async fn json_body<T: DeserializeOwned>(
    body: Body,
    limit: usize,
    deadline: Duration,
) -> Result<T, AppError> {
    let bytes = match tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => return Err(AppError::PayloadTooLarge { limit }),
        Err(_) => {
            return Err(AppError::BodyTimeout {
                timeout_ms: u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
            });
        }
    };
    parse_json(&bytes)
}

/// Parse JSON bytes into `T`: invalid UTF-8, syntax errors, wrong types and unknown fields are
/// 400s that name the field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
    if bytes.is_empty() {
        return Err(AppError::bad_request(
            "invalid_json",
            "request body is empty; expected JSON",
        ));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| AppError::bad_request("invalid_utf8", format!("body is not UTF-8: {e}")))?;
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            AppError::bad_request("invalid_json", format!("malformed JSON: {inner}"))
        } else {
            AppError::invalid_field(
                if path == "." { "body".into() } else { path },
                inner.to_string(),
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct T {
        a: u32,
        b: Option<String>,
    }

    #[test]
    fn errors_name_the_field() {
        let code = |b: &[u8]| parse_json::<T>(b).expect_err("error").code();
        assert_eq!(code(b""), "invalid_json");
        assert_eq!(code(b"{"), "invalid_json");
        assert_eq!(code(b"\xff\xfe"), "invalid_utf8");
        let e = parse_json::<T>(br#"{"a":"x"}"#).expect_err("type");
        assert!(
            matches!(e, AppError::BadRequest { field: Some(ref f), .. } if f == "a"),
            "{e:?}"
        );
        let e = parse_json::<T>(br#"{"a":1,"zz":1}"#).expect_err("unknown");
        assert_eq!(e.code(), "invalid_field");
        assert!(parse_json::<T>(br#"{"a":1}"#).is_ok());
    }
}
