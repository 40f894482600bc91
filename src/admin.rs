//! The admin listener: `/healthz`, `/readyz`, `/status`, `/metrics`.
//!
//! It runs on its own listener so it answers while the data path is loaded, and
//! it never shows a token or a secret.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use crate::metrics::Metrics;
use crate::proxy::body::{full, Body};
use crate::token::TokenHandle;

/// What the admin endpoints report on.
pub struct Admin {
    clients: Vec<(String, TokenHandle)>,
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
            clients,
            metrics,
            draining,
        }
    }

    /// Answers one admin request.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
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

    fn readyz(&self) -> Response<Body> {
        if self.draining.load(Ordering::Relaxed) {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"ready": false, "draining": true, "clients": []}),
            );
        }
        let not_ready: Vec<_> = self
            .clients
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
        for (name, handle) in &self.clients {
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
