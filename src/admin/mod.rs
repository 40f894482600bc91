//! The admin listener: `/healthz`, `/readyz`, `/status`, `/metrics`, and
//! `POST /clients/NAME/refresh-token` for an operator to put in a new refresh token.
//!
//! It runs on its own listener so it answers while the data path is loaded, and
//! it never shows a token or a secret.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::json;

use crate::error::ERROR_HEADER;
use crate::http::body::{full, Body};
use crate::metrics::Metrics;
use crate::origin::HostRule;
use crate::secret::Secret;
use crate::server::PeerAddr;
use crate::token::TokenHandle;

mod subjects;

const MAX_REFRESH_TOKEN_BYTES: usize = 16 * 1024;

/// One client as the admin endpoints see it.
#[derive(Clone)]
pub struct AdminClient {
    /// The client's name.
    pub name: String,
    /// Its token.
    pub token: TokenHandle,
    /// `token.grant`: only `refresh_token` clients take a refresh token from an operator.
    pub grant: &'static str,
    /// Its subjects, when it holds a token per subject.
    pub subjects: Option<crate::subjects::Subjects>,
    /// Whether it has a token of its own (not when every request names a subject).
    pub own_token: bool,
}

/// What the admin endpoints report on.
pub struct Admin {
    clients: ArcSwap<Vec<AdminClient>>,
    metrics: Metrics,
    draining: Arc<AtomicBool>,
    /// `admin.api_key`: every write needs it; `None` refuses every write.
    api_key: Option<Secret>,
    /// Host and origin a write must come with (reads are open to any Host:
    /// kubelet probes send the pod IP, scrapers whatever name they use).
    hosts: HostRule,
    /// Connect sessions, when `[connect]` is configured.
    connect: Option<Arc<crate::connect::Connect>>,
}

impl Admin {
    /// An admin view of `clients`; writes need `api_key` (without one they are
    /// refused) and a Host and origin `hosts` accepts.
    pub fn new(
        clients: Vec<AdminClient>,
        metrics: Metrics,
        draining: Arc<AtomicBool>,
        api_key: Option<Secret>,
        hosts: HostRule,
    ) -> Self {
        Admin {
            clients: ArcSwap::from_pointee(clients),
            metrics,
            draining,
            api_key,
            hosts,
            connect: None,
        }
    }

    /// Makes connect links with `connect` (`POST .../subjects/SUBJECT/connect`).
    pub fn with_connect(mut self, connect: Option<Arc<crate::connect::Connect>>) -> Self {
        self.connect = connect;
        self
    }

    /// Replaces the client list (after a reload).
    pub fn set_clients(&self, clients: Vec<AdminClient>) {
        self.clients.store(Arc::new(clients));
    }

    /// Answers one admin request.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: PeerAddr,
    ) -> Result<Response<Body>, Infallible> {
        if subjects::is_subjects_path(req.uri().path()) {
            return Ok(self.subjects_call(req, peer).await);
        }
        if req.method() == Method::POST {
            return Ok(self.post(req, peer).await);
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Ok(json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": "method_not_allowed"}),
            ));
        }
        Ok(match req.uri().path() {
            "/healthz" => json_response(StatusCode::OK, &json!({"status": "ok"})),
            "/readyz" => self.readyz(),
            "/status" => self.status(),
            "/metrics" => {
                let mut r = Response::new(full(self.metrics.render()));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"})),
        })
    }

    /// `POST /clients/NAME/refresh-token`: the body is a new refresh token for a
    /// client (e.g. one in `needs_authorization`). Whoever sets the refresh token
    /// chooses whose account the API sees, so it takes the admin key (every
    /// container of a pod shares loopback), a loopback peer, and a client whose
    /// grant uses refresh tokens.
    async fn post(&self, req: Request<Incoming>, peer: PeerAddr) -> Response<Body> {
        match self.refresh_token_write(req, peer).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        }
    }

    async fn refresh_token_write(
        &self,
        req: Request<Incoming>,
        peer: PeerAddr,
    ) -> Result<Response<Body>, AdminError> {
        let path = req.uri().path().to_owned();
        let name = path
            .strip_prefix("/clients/")
            .and_then(|rest| rest.strip_suffix("/refresh-token"))
            .ok_or(AdminError::NotFound)?;
        // On a `[::]` listener an IPv4 peer shows as `::ffff:a.b.c.d`.
        if !peer.0.ip().to_canonical().is_loopback() {
            return Err(AdminError::Forbidden(
                "refresh tokens are accepted from loopback only",
            ));
        }
        // A page in a browser cannot set Authorization without a CORS preflight,
        // which is never answered here; refusing foreign Host and origin also
        // covers DNS rebinding and a key a browser might hold.
        self.hosts
            .check_host(req.headers())
            .and_then(|()| self.hosts.check_same_origin(req.headers()))
            .map_err(AdminError::Browser)?;
        self.check_key(req.headers())?;
        let clients = self.clients.load();
        let client = clients
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| AdminError::NoSuchClient(name.to_owned()))?;
        if client.grant != "refresh_token" {
            return Err(AdminError::GrantMismatch {
                client: name.to_owned(),
                grant: client.grant.to_owned(),
            });
        }
        let body = Limited::new(req.into_body(), MAX_REFRESH_TOKEN_BYTES)
            .collect()
            .await
            .map_err(|_| AdminError::BadRequest("body unreadable or over 16 KiB"))?
            .to_bytes();
        let token = match std::str::from_utf8(&body).map(str::trim) {
            Ok(t) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()) => Secret::new(t),
            _ => {
                return Err(AdminError::BadRequest(
                    "the body must be the refresh token (printable ASCII)",
                ))
            }
        };
        client
            .token
            .provide_refresh_token(token)
            .map_err(|e| AdminError::Busy(e.reason))?;
        Ok(json_response(
            StatusCode::ACCEPTED,
            &json!({"client": name, "accepted": true}),
        ))
    }

    /// A write goes on only with `Authorization: Bearer <admin.api_key>`.
    fn check_key(&self, headers: &HeaderMap) -> Result<(), AdminError> {
        let key = self.api_key.as_ref().ok_or(AdminError::WritesDisabled)?;
        let presented = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        match presented {
            Some(token) if keys_match(token.as_bytes(), key.expose().as_bytes()) => Ok(()),
            _ => Err(AdminError::Unauthorized),
        }
    }

    fn readyz(&self) -> Response<Body> {
        if self.draining.load(Ordering::Relaxed) {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"ready": false, "draining": true, "clients": []}),
            );
        }
        let not_ready: Vec<_> = self
            .clients
            .load()
            .iter()
            .filter(|c| c.own_token && !c.token.is_ready())
            .map(|c| {
                let status = c.token.status();
                json!({"client": c.name, "state": status.state().as_str(), "reason": status.describe()})
            })
            .collect();
        if not_ready.is_empty() {
            json_response(StatusCode::OK, &json!({"ready": true, "clients": []}))
        } else {
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"ready": false, "clients": not_ready}),
            )
        }
    }

    fn status(&self) -> Response<Body> {
        let mut clients = serde_json::Map::new();
        for c in self.clients.load().iter() {
            let mut value = if c.own_token {
                serde_json::to_value(c.token.status()).unwrap_or_default()
            } else {
                json!({})
            };
            if let Some(obj) = value.as_object_mut() {
                obj.insert("ready".into(), json!(!c.own_token || c.token.is_ready()));
                if let Some(subjects) = &c.subjects {
                    obj.insert("subjects".into(), subjects.status());
                }
            }
            clients.insert(c.name.clone(), value);
        }
        json_response(
            StatusCode::OK,
            &json!({"draining": self.draining.load(Ordering::Relaxed), "clients": clients}),
        )
    }
}

/// Why an admin write was refused, mapped once to status, code and body.
#[derive(Debug, thiserror::Error)]
enum AdminError {
    #[error("no such admin endpoint")]
    NotFound,
    #[error("no client {0} is configured")]
    NoSuchClient(String),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("admin writes are disabled: set admin.api_key_file (or admin.api_key) to enable them")]
    WritesDisabled,
    #[error("admin writes need Authorization: Bearer <admin.api_key>")]
    Unauthorized,
    #[error("client {client} uses grant = \"{grant}\"; only grant = \"refresh_token\" clients take a refresh token from an operator")]
    GrantMismatch { client: String, grant: String },
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("{0}")]
    Busy(String),
    #[error("method not allowed here")]
    MethodNotAllowed,
    #[error("a subject id is 1 to 128 characters of A-Za-z0-9._:@-")]
    BadSubject,
    #[error("client {0} has no [subjects] table")]
    NoSubjects(String),
    #[error("connect links need a [connect] section in the configuration")]
    NoConnect,
    #[error("{0}")]
    Connect(crate::connect::CreateError),
    #[error(transparent)]
    Browser(crate::error::ProxyError),
}

impl AdminError {
    fn into_response(self) -> Response<Body> {
        let this = match self {
            // Host and origin refusals keep the request path's codes.
            AdminError::Browser(e) => return e.into_response(None),
            other => other,
        };
        let (status, code, client) = match &this {
            AdminError::Browser(_) => (StatusCode::BAD_REQUEST, "bad_request", None),
            AdminError::NotFound => (StatusCode::NOT_FOUND, "not_found", None),
            AdminError::NoSuchClient(name) => {
                (StatusCode::NOT_FOUND, "no_such_client", Some(name.as_str()))
            }
            AdminError::Forbidden(_) | AdminError::WritesDisabled => {
                (StatusCode::FORBIDDEN, "forbidden", None)
            }
            AdminError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", None),
            AdminError::GrantMismatch { client, .. } => (
                StatusCode::CONFLICT,
                "grant_mismatch",
                Some(client.as_str()),
            ),
            AdminError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request", None),
            AdminError::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy", None),
            AdminError::MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", None)
            }
            AdminError::BadSubject => (StatusCode::BAD_REQUEST, "bad_subject", None),
            AdminError::NoSubjects(name) => {
                (StatusCode::NOT_FOUND, "no_subjects", Some(name.as_str()))
            }
            AdminError::NoConnect => (StatusCode::NOT_FOUND, "no_connect", None),
            AdminError::Connect(e) => match e {
                crate::connect::CreateError::NoAuthorize(name) => {
                    (StatusCode::CONFLICT, "no_authorize", Some(name.as_str()))
                }
                crate::connect::CreateError::ReturnTo => {
                    (StatusCode::BAD_REQUEST, "bad_request", None)
                }
                crate::connect::CreateError::Unavailable(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, "busy", None)
                }
            },
        };
        let mut r = error_response(status, code, client, &this.to_string());
        if matches!(this, AdminError::Unauthorized) {
            r.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tokenproxy-admin\""),
            );
        }
        r
    }
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(value.to_string()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// A refusal: `{"error": CODE, "client": NAME, "detail": …}` with `x-tokenproxy-error`.
fn error_response(
    status: StatusCode,
    code: &'static str,
    client: Option<&str>,
    detail: &str,
) -> Response<Body> {
    let mut r = json_response(
        status,
        &json!({"error": code, "client": client, "detail": detail}),
    );
    r.headers_mut()
        .insert(ERROR_HEADER.clone(), HeaderValue::from_static(code));
    r
}

/// Compares the SHA-256 digests of both in constant time, so neither the
/// content nor the length of the key leaks through the time a refusal takes.
fn keys_match(presented: &[u8], key: &[u8]) -> bool {
    let a = ring::digest::digest(&ring::digest::SHA256, presented);
    let b = ring::digest::digest(&ring::digest::SHA256, key);
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::keys_match;

    #[test]
    fn keys_match_only_the_same_bytes() {
        assert!(keys_match(b"s3cret-admin-key", b"s3cret-admin-key"));
        assert!(!keys_match(b"s3cret-admin-kez", b"s3cret-admin-key"));
        assert!(!keys_match(b"s3cret", b"s3cret-admin-key"));
        assert!(!keys_match(b"", b"s3cret-admin-key"));
    }
}
