//! NGSI-LD problem types (ETSI GS CIM 009, clause 5.5.2) and the error every layer returns.

use serde_json::{Value, json};
use std::fmt;

/// The kinds of problem Borough reports. Each maps to one HTTP status and one type URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    InvalidRequest,
    BadRequestData,
    AlreadyExists,
    /// 409: the request contradicts what exists (an exclusive registration
    /// overlapping another).
    Conflict,
    OperationNotSupported,
    /// 502: a context source the operation was forwarded to answered with an error.
    BadGateway,
    /// 504: a context source the operation was forwarded to did not answer in time.
    GatewayTimeout,
    /// 508: the operation would be forwarded back to this broker.
    LoopDetected,
    ResourceNotFound,
    InternalError,
    TooComplexQuery,
    TooManyResults,
    LdContextNotAvailable,
    NonexistentTenant,
    /// 406: none of the media types in `Accept` can be produced.
    NotAcceptable,
    /// 415: the body's `Content-Type` is not accepted by this operation.
    UnsupportedMediaType,
    /// 413: the body is larger than the configured limit.
    PayloadTooLarge,
    /// 405: the path exists but not with this method.
    MethodNotAllowed,
    /// 401: no credentials, or credentials that prove nothing.
    Unauthorized,
    /// 403: the caller is known but may not do this (role, tenant, suspension).
    Forbidden,
    /// 403: the tenant's quota does not allow it.
    QuotaExceeded,
    /// 429: too many requests for the caller, the tenant or the address.
    TooManyRequests,
    /// 503: the storage (a database server) cannot be reached for now;
    /// nothing was changed, and the request may be sent again.
    StorageUnavailable,
}

impl ProblemKind {
    pub fn status(self) -> u16 {
        match self {
            Self::InvalidRequest | Self::BadRequestData => 400,
            Self::AlreadyExists | Self::Conflict => 409,
            Self::OperationNotSupported => 422,
            Self::BadGateway => 502,
            Self::GatewayTimeout => 504,
            Self::LoopDetected => 508,
            Self::ResourceNotFound | Self::NonexistentTenant => 404,
            Self::InternalError => 500,
            Self::TooComplexQuery | Self::TooManyResults => 403,
            Self::LdContextNotAvailable => 503,
            Self::NotAcceptable => 406,
            Self::UnsupportedMediaType => 415,
            Self::PayloadTooLarge => 413,
            Self::MethodNotAllowed => 405,
            Self::Unauthorized => 401,
            Self::Forbidden | Self::QuotaExceeded => 403,
            Self::TooManyRequests => 429,
            Self::StorageUnavailable => 503,
        }
    }

    /// The problem type URI. The spec's own types use its error namespace; the
    /// plain HTTP conditions (406, 413, 415, 405) have no spec type, so they are
    /// reported as the closest spec type, `InvalidRequest`.
    pub fn type_uri(self) -> &'static str {
        match self {
            Self::InvalidRequest
            | Self::NotAcceptable
            | Self::UnsupportedMediaType
            | Self::PayloadTooLarge
            | Self::MethodNotAllowed => "https://uri.etsi.org/ngsi-ld/errors/InvalidRequest",
            Self::BadRequestData => "https://uri.etsi.org/ngsi-ld/errors/BadRequestData",
            Self::AlreadyExists => "https://uri.etsi.org/ngsi-ld/errors/AlreadyExists",
            Self::Conflict => "https://uri.etsi.org/ngsi-ld/errors/Conflict",
            Self::OperationNotSupported => {
                "https://uri.etsi.org/ngsi-ld/errors/OperationNotSupported"
            }
            Self::ResourceNotFound => "https://uri.etsi.org/ngsi-ld/errors/ResourceNotFound",
            Self::BadGateway => "https://uri.etsi.org/ngsi-ld/errors/BadGateway",
            Self::GatewayTimeout => "https://uri.etsi.org/ngsi-ld/errors/GatewayTimeout",
            Self::LoopDetected => "https://uri.etsi.org/ngsi-ld/errors/LoopDetected",
            Self::InternalError => "https://uri.etsi.org/ngsi-ld/errors/InternalError",
            Self::TooComplexQuery => "https://uri.etsi.org/ngsi-ld/errors/TooComplexQuery",
            Self::TooManyResults => "https://uri.etsi.org/ngsi-ld/errors/TooManyResults",
            Self::LdContextNotAvailable => {
                "https://uri.etsi.org/ngsi-ld/errors/LdContextNotAvailable"
            }
            Self::NonexistentTenant => "https://uri.etsi.org/ngsi-ld/errors/NonexistentTenant",
            // Access control has no NGSI-LD problem type: Borough names its own.
            Self::Unauthorized => "urn:borough:problem:Unauthorized",
            Self::Forbidden => "urn:borough:problem:Forbidden",
            Self::QuotaExceeded => "urn:borough:problem:QuotaExceeded",
            Self::TooManyRequests => "urn:borough:problem:TooManyRequests",
            Self::StorageUnavailable => "urn:borough:problem:StorageUnavailable",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Self::InvalidRequest => "Invalid request",
            Self::BadRequestData => "Bad request data",
            Self::AlreadyExists => "Already exists",
            Self::Conflict => "Conflict",
            Self::OperationNotSupported => "Operation not supported",
            Self::ResourceNotFound => "Resource not found",
            Self::BadGateway => "Bad gateway",
            Self::GatewayTimeout => "Gateway timeout",
            Self::LoopDetected => "Loop detected",
            Self::InternalError => "Internal error",
            Self::TooComplexQuery => "Too complex query",
            Self::TooManyResults => "Too many results",
            Self::LdContextNotAvailable => "@context not available",
            Self::NonexistentTenant => "Nonexistent tenant",
            Self::NotAcceptable => "Not acceptable",
            Self::UnsupportedMediaType => "Unsupported media type",
            Self::PayloadTooLarge => "Payload too large",
            Self::MethodNotAllowed => "Method not allowed",
            Self::Unauthorized => "Unauthorized",
            Self::Forbidden => "Forbidden",
            Self::QuotaExceeded => "Quota exceeded",
            Self::TooManyRequests => "Too many requests",
            Self::StorageUnavailable => "Storage unavailable",
        }
    }
}

/// An error with the problem kind and a detail that tells the client what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NgsiError {
    pub kind: ProblemKind,
    pub detail: String,
}

pub type NgsiResult<T> = Result<T, NgsiError>;

impl NgsiError {
    pub fn new(kind: ProblemKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }
    pub fn bad_data(detail: impl Into<String>) -> Self {
        Self::new(ProblemKind::BadRequestData, detail)
    }
    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(ProblemKind::InvalidRequest, detail)
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(ProblemKind::ResourceNotFound, detail)
    }
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(ProblemKind::InternalError, detail)
    }

    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// The RFC 7807 problem-details body.
    pub fn to_problem(&self) -> Value {
        json!({
            "type": self.kind.type_uri(),
            "title": self.kind.title(),
            "status": self.kind.status(),
            "detail": self.detail,
        })
    }
}

impl fmt::Display for NgsiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.title(), self.detail)
    }
}

impl std::error::Error for NgsiError {}
