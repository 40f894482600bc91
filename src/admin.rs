//! The admin listener: `/healthz`, `/readyz`, `/status`, `/metrics`, and
//! `POST /clients/NAME/refresh-token` for an operator to put in a new refresh token.
//!
//! It runs on its own listener so it answers while the data path is loaded, and
//! it never shows a token or a secret.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::json;

use crate::secret::Secret;
use crate::server::PeerAddr;

const MAX_REFRESH_TOKEN_BYTES: usize = 16 * 1024;

use crate::metrics::Metrics;
use crate::proxy::body::{full, Body};
use crate::token::TokenHandle;

/// What the admin endpoints report on.
pub struct Admin {
    clients: ArcSwap<Vec<(String, TokenHandle)>>,
    metrics: Metrics,
    draining: Arc<AtomicBool>,
}

impl Admin {
    /// An admin view of `clients`.
    pub fn new(
        clients: Vec<(String, TokenHandle)>,
        metrics: Metrics,
        draining: Arc<AtomicBool>,
    ) -> Self {
        Admin {
            clients: ArcSwap::from_pointee(clients),
            metrics,
            draining,
        }
    }

    /// Replaces the client list (after a reload).
    pub fn set_clients(&self, clients: Vec<(String, TokenHandle)>) {
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
    /// client (e.g. one in `needs_authorization`). Accepted from loopback peers only,
    /// since whoever sets the refresh token chooses whose account the API sees.
    async fn post(&self, req: Request<Incoming>, peer: PeerAddr) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let Some(name) = path
            .strip_prefix("/clients/")
            .and_then(|rest| rest.strip_suffix("/refresh-token"))
        else {
            return json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"}));
        };
        let loopback = peer.0.ip().is_loopback();
        if !loopback {
            return json_response(
                StatusCode::FORBIDDEN,
                &json!({"error": "forbidden", "detail": "refresh tokens are accepted from loopback only"}),
            );
        }
        let clients = self.clients.load();
        let Some((_, handle)) = clients.iter().find(|(n, _)| n == name) else {
            return json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": "no_such_client", "client": name}),
            );
        };
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
            .filter(|(_, handle)| !handle.is_ready())
            .map(|(name, handle)| {
                let status = handle.status();
                json!({"client": name, "state": status.state().as_str(), "reason": status.describe()})
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
        for (name, handle) in self.clients.load().iter() {
            let mut value = serde_json::to_value(handle.status()).unwrap_or_default();
            if let Some(obj) = value.as_object_mut() {
                obj.insert("ready".into(), json!(handle.is_ready()));
            }
            clients.insert(name.clone(), value);
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
