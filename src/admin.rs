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
        }
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
        let path = req.uri().path().to_owned();
        let Some(name) = path
            .strip_prefix("/clients/")
            .and_then(|rest| rest.strip_suffix("/refresh-token"))
        else {
            return json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"}));
        };
        // On a `[::]` listener an IPv4 peer shows as `::ffff:a.b.c.d`.
        let loopback = peer.0.ip().to_canonical().is_loopback();
        if !loopback {
            return json_response(
                StatusCode::FORBIDDEN,
                &json!({"error": "forbidden", "detail": "refresh tokens are accepted from loopback only"}),
            );
        }
        // A page in a browser cannot set Authorization without a CORS preflight,
        // which is never answered here; refusing foreign Host and origin also
        // covers DNS rebinding and a key a browser might hold.
        let browser = self
            .hosts
            .check_host(req.headers())
            .and_then(|()| self.hosts.check_same_origin(req.headers()));
        if let Err(e) = browser {
            return e.into_response(None);
        }
        if let Some(refused) = self.write_refusal(req.headers()) {
            return refused;
        }
        let clients = self.clients.load();
        let Some(client) = clients.iter().find(|c| c.name == name) else {
            return json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": "no_such_client", "client": name}),
            );
        };
        if client.grant != "refresh_token" {
            let detail = format!(
                "client {name} uses grant = \"{}\"; only grant = \"refresh_token\" clients take a refresh token from an operator",
                client.grant
            );
            return error_response(StatusCode::CONFLICT, "grant_mismatch", Some(name), &detail);
        }
        let handle = &client.token;
        let body = match Limited::new(req.into_body(), MAX_REFRESH_TOKEN_BYTES)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": "bad_request", "detail": "body unreadable or over 16 KiB"}),
                )
            }
        };
        let token = match std::str::from_utf8(&body).map(str::trim) {
            Ok(t) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()) => Secret::new(t),
            _ => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": "bad_request", "detail": "the body must be the refresh token (printable ASCII)"}),
                )
            }
        };
        match handle.provide_refresh_token(token) {
            Ok(()) => json_response(
                StatusCode::ACCEPTED,
                &json!({"client": name, "accepted": true}),
            ),
            Err(e) => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"error": "busy", "detail": e.reason}),
            ),
        }
    }

    /// The refusal of a write, unless `headers` carry `Authorization: Bearer <admin.api_key>`.
    fn write_refusal(&self, headers: &HeaderMap) -> Option<Response<Body>> {
        let Some(key) = &self.api_key else {
            return Some(error_response(
                StatusCode::FORBIDDEN,
                "forbidden",
                None,
                "admin writes are disabled: set admin.api_key_file (or admin.api_key) to enable them",
            ));
        };
        let presented = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        match presented {
            Some(token) if keys_match(token.as_bytes(), key.expose().as_bytes()) => None,
            _ => {
                let mut refused = error_response(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    None,
                    "admin writes need Authorization: Bearer <admin.api_key>",
                );
                refused.headers_mut().insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"tokenproxy-admin\""),
                );
                Some(refused)
            }
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
            .filter(|c| !c.token.is_ready())
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
            let mut value = serde_json::to_value(c.token.status()).unwrap_or_default();
            if let Some(obj) = value.as_object_mut() {
                obj.insert("ready".into(), json!(c.token.is_ready()));
            }
            clients.insert(c.name.clone(), value);
        }
        json_response(
            StatusCode::OK,
            &json!({"draining": self.draining.load(Ordering::Relaxed), "clients": clients}),
        )
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
