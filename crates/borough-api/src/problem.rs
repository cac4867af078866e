//! Turning errors into `application/problem+json` responses.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use borough_core::{NgsiError, ProblemKind};
use borough_store::StoreError;

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError(pub NgsiError);

pub type ApiResult<T> = Result<T, ApiError>;

impl From<NgsiError> for ApiError {
    fn from(e: NgsiError) -> Self {
        Self(e)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "storage failure");
        let kind = match e {
            StoreError::Unavailable(_) => ProblemKind::StorageUnavailable,
            _ => ProblemKind::InternalError,
        };
        Self(NgsiError::new(kind, e.to_string()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self.0.to_problem()).unwrap_or_default();
        let mut resp = (status, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        resp
    }
}
