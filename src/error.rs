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

/// Whether `headers` are those of a gRPC call (`content-type: application/grpc...`).
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// `grpc-status` and `grpc-message`, the status of a gRPC call.
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

impl ProxyError {
    /// The gRPC status code a gRPC client understands for this failure.
    pub fn grpc_status(&self) -> u16 {
        // https://grpc.github.io/grpc/core/md_doc_statuscodes.html
        const INVALID_ARGUMENT: u16 = 3;
        const DEADLINE_EXCEEDED: u16 = 4;
        const NOT_FOUND: u16 = 5;
        const PERMISSION_DENIED: u16 = 7;
        const UNIMPLEMENTED: u16 = 12;
        const UNAVAILABLE: u16 = 14;
        const UNAUTHENTICATED: u16 = 16;
        match self {
            ProxyError::TokenUnavailable { .. } | ProxyError::UpstreamUnreachable { .. } => {
                UNAVAILABLE
            }
            ProxyError::UpstreamTimeout { .. } | ProxyError::BodyTimeout(_) => DEADLINE_EXCEEDED,
            ProxyError::NoRoute { .. } | ProxyError::MethodNotAllowed(_) => UNIMPLEMENTED,
            ProxyError::BadRequest(_)
            | ProxyError::SubjectRequired { .. }
            | ProxyError::BadSubject(_) => INVALID_ARGUMENT,
            ProxyError::MisdirectedHost(_) | ProxyError::CrossSite(_) => PERMISSION_DENIED,
            ProxyError::SubjectUnknown(_) => NOT_FOUND,
            ProxyError::NeedsAuthorization { .. } => UNAUTHENTICATED,
        }
    }

    /// The answer to a gRPC call: HTTP 200 with no body and the status in the
    /// headers (gRPC's "trailers-only" response), `grpc-message` starting with the
    /// contract code (`token_unavailable: ...`), and `x-tokenproxy-error` as on
    /// every other answer of the sidecar.
    pub fn into_grpc_response(self, client: Option<&str>) -> Response<Body> {
        let mut message = format!("{}: {self}", self.code());
        if let Some(client) = client {
            message.push_str(" (client ");
            message.push_str(client);
            message.push(')');
        }
        let mut response = Response::new(crate::http::body::empty());
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(GRPC_STATUS.clone(), HeaderValue::from(self.grpc_status()));
        if let Ok(v) = HeaderValue::from_str(&grpc_percent_encode(&message)) {
            headers.insert(GRPC_MESSAGE.clone(), v);
        }
        headers.insert(ERROR_HEADER.clone(), HeaderValue::from_static(self.code()));
        if let ProxyError::TokenUnavailable { retry_after, .. } = &self {
            headers.insert(RETRY_AFTER, HeaderValue::from(retry_after.as_secs().max(1)));
        }
        response
    }

    /// The answer in the form the request expects: gRPC status for a gRPC call,
    /// the JSON error otherwise.
    pub fn into_response_for(self, grpc: bool, client: Option<&str>) -> Response<Body> {
        if grpc {
            self.into_grpc_response(client)
        } else {
            self.into_response(client)
        }
    }
}

/// gRPC's percent-encoding of `grpc-message`: printable ASCII but `%` as is,
/// everything else as `%XX` of its UTF-8 bytes.
fn grpc_percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grpc_call_gets_its_failure_as_a_grpc_status_with_the_code_in_the_message() {
        let e = ProxyError::TokenUnavailable {
            reason: "provider down: 100%".into(),
            retry_after: Duration::from_secs(3),
        };
        let r = e.into_grpc_response(Some("pay"));
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "gRPC carries its status in grpc-status"
        );
        let h = r.headers();
        assert_eq!(h["grpc-status"], "14", "token_unavailable is UNAVAILABLE");
        let message = h["grpc-message"].to_str().expect("ascii");
        assert!(
            message.starts_with("token_unavailable: ") && message.contains("100%25"),
            "the code leads, % is encoded: {message}"
        );
        assert_eq!(h["x-tokenproxy-error"], "token_unavailable");
        assert_eq!(h["content-type"], "application/grpc");
        assert_eq!(h["retry-after"], "3");
    }

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
