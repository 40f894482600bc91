//! Errors the sidecar answers itself, and their single mapping to a response:
//! status, contract code, JSON body and `x-tokenproxy-error`.
//!
//! Who failed decides the class: the app (4xx), the provider
//! (`token_unavailable`), the upstream (502/504).

use std::time::Duration;

use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::http::body::{full, Body};

/// Header naming the error code on every response the sidecar makes itself.
pub static ERROR_HEADER: HeaderName = HeaderName::from_static("x-tokenproxy-error");

/// A failure answered by the sidecar instead of the API.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No usable token within `token_wait_timeout`.
    #[error("no access token available: {reason}")]
    TokenUnavailable {
        /// Why, without secrets.
        reason: String,
        /// Suggested wait before retrying.
        retry_after: Duration,
    },
    /// The upstream could not be reached or broke the exchange.
    #[error("upstream {upstream} unreachable: {detail}")]
    UpstreamUnreachable {
        /// scheme://authority of the upstream.
        upstream: String,
        /// Cause.
        detail: String,
    },
    /// The upstream did not answer within the client's `timeout`.
    #[error("upstream {upstream} did not answer within {timeout}")]
    UpstreamTimeout {
        /// scheme://authority of the upstream.
        upstream: String,
        /// The configured timeout, human readable.
        timeout: String,
    },
    /// No client is configured for this listener and path.
    #[error("no client is configured for path {path}")]
    NoRoute {
        /// The request path (without query).
        path: String,
    },
    /// The request is not one the sidecar forwards.
    #[error("{0}")]
    BadRequest(String),
    /// The app's request body stopped arriving (`limits.body_timeout`, `body_min_rate`).
    #[error("{0}")]
    BodyTimeout(String),
    /// A method the sidecar never forwards (TRACE would echo the credential).
    #[error("method {0} is not forwarded")]
    MethodNotAllowed(http::Method),
    /// The `Host` header names something other than this listener (DNS rebinding).
    #[error("Host {0:?} is not this listener; tokenproxy answers to its listen address, localhost and configured allowed_hosts")]
    MisdirectedHost(String),
    /// The client holds one token per subject and the request names none.
    #[error("this client holds a token per subject: name one in the {header} header")]
    SubjectRequired {
        /// The header.
        header: String,
    },
    /// The subject header is not one valid subject id.
    #[error("{0}")]
    BadSubject(String),
    /// The store has no such subject.
    #[error("subject {0:?} is not connected: connect it (POST /clients/CLIENT/subjects/SUBJECT/connect on the admin listener) or import its tokens")]
    SubjectUnknown(String),
    /// The subject's refresh token died: a person must connect again.
    #[error("subject {subject:?} needs authorization ({reason}): connect it again (POST /clients/CLIENT/subjects/SUBJECT/connect on the admin listener, or tokenproxy subjects connect)")]
    NeedsAuthorization {
        /// The subject.
        subject: String,
        /// Why.
        reason: String,
    },
    /// A browser sent the request on behalf of a page from another site.
    #[error("cross-site request refused ({0}); set allow_cross_site = true on the client if browsers may call it")]
    CrossSite(String),
}

impl ProxyError {
    /// The contract code.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::TokenUnavailable { .. } => "token_unavailable",
            ProxyError::UpstreamUnreachable { .. } => "upstream_unreachable",
            ProxyError::UpstreamTimeout { .. } => "upstream_timeout",
            ProxyError::NoRoute { .. } => "no_route",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::MethodNotAllowed(_) => "method_not_allowed",
            ProxyError::BodyTimeout(_) => "body_timeout",
            ProxyError::MisdirectedHost(_) => "misdirected_request",
            ProxyError::CrossSite(_) => "cross_site_request",
            ProxyError::SubjectRequired { .. } => "subject_required",
            ProxyError::BadSubject(_) => "bad_subject",
            ProxyError::SubjectUnknown(_) => "subject_unknown",
            ProxyError::NeedsAuthorization { .. } => "needs_authorization",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::TokenUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamUnreachable { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::MisdirectedHost(_) => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::CrossSite(_) => StatusCode::FORBIDDEN,
            ProxyError::SubjectRequired { .. } | ProxyError::BadSubject(_) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::SubjectUnknown(_) => StatusCode::NOT_FOUND,
            ProxyError::NeedsAuthorization { .. } => StatusCode::FORBIDDEN,
        }
    }

    /// The response: `{"error": CODE, "client": NAME, "detail": …}` plus `x-tokenproxy-error`.
    pub fn into_response(self, client: Option<&str>) -> Response<Body> {
        let body = serde_json::json!({
            "error": self.code(),
            "client": client,
            "detail": self.to_string(),
        });
        let mut response = Response::new(full(body.to_string()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(ERROR_HEADER.clone(), HeaderValue::from_static(self.code()));
        if let ProxyError::TokenUnavailable { retry_after, .. } = &self {
            headers.insert(RETRY_AFTER, HeaderValue::from(retry_after.as_secs().max(1)));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_its_contract_status_code_and_header() {
        let cases = [
            (
                ProxyError::TokenUnavailable {
                    reason: "x".into(),
                    retry_after: Duration::from_secs(3),
                },
                503,
                "token_unavailable",
            ),
            (
                ProxyError::UpstreamUnreachable {
                    upstream: "u".into(),
                    detail: "d".into(),
                },
                502,
                "upstream_unreachable",
            ),
            (
                ProxyError::UpstreamTimeout {
                    upstream: "u".into(),
                    timeout: "1s".into(),
                },
                504,
                "upstream_timeout",
            ),
            (ProxyError::NoRoute { path: "/".into() }, 404, "no_route"),
            (ProxyError::BadRequest("b".into()), 400, "bad_request"),
            (
                ProxyError::MethodNotAllowed(http::Method::TRACE),
                405,
                "method_not_allowed",
            ),
            (ProxyError::BodyTimeout("slow".into()), 408, "body_timeout"),
            (
                ProxyError::MisdirectedHost("h".into()),
                421,
                "misdirected_request",
            ),
            (ProxyError::CrossSite("o".into()), 403, "cross_site_request"),
            (
                ProxyError::SubjectRequired {
                    header: "x-tokenproxy-subject".into(),
                },
                400,
                "subject_required",
            ),
            (ProxyError::BadSubject("b".into()), 400, "bad_subject"),
            (
                ProxyError::SubjectUnknown("m1".into()),
                404,
                "subject_unknown",
            ),
            (
                ProxyError::NeedsAuthorization {
                    subject: "m1".into(),
                    reason: "r".into(),
                },
                403,
                "needs_authorization",
            ),
        ];
        for (err, status, code) in cases {
            let r = err.into_response(Some("payments"));
            assert_eq!(r.status().as_u16(), status, "{code}");
            assert_eq!(r.headers()[&ERROR_HEADER], code);
        }
    }

    #[test]
    fn token_unavailable_carries_retry_after() {
        let r = ProxyError::TokenUnavailable {
            reason: "x".into(),
            retry_after: Duration::from_secs(7),
        }
        .into_response(None);
        assert_eq!(r.headers()[RETRY_AFTER], "7");
    }
}
