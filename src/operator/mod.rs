//! Operator commands that talk to a running sidecar's admin listener, such as
//! putting in a new refresh token without a restart, and `tokenproxy token`.
//! The subjects commands (`tokenproxy subjects ...`) live in `subjects.rs`.

mod subjects;

pub use subjects::{
    connect_link, delete_subject, import_subjects, list_subjects, ConnectLink, ImportSummary,
};

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::secret::Secret;

/// Why an operator command failed.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The admin listener could not be reached.
    #[error("cannot reach the running sidecar's admin listener at {addr}: {detail}")]
    Unreachable {
        /// Admin address tried.
        addr: SocketAddr,
        /// Cause.
        detail: String,
    },
    /// The sidecar refused the request.
    #[error("the sidecar refused: {status} {body}")]
    Refused {
        /// Status.
        status: StatusCode,
        /// Its JSON answer.
        body: String,
    },
    /// The configuration names no admin key, so the sidecar refuses admin writes.
    #[error("admin writes need a key: set admin.api_key_file (or admin.api_key) in the config, the same key the running sidecar uses")]
    NoApiKey,
    /// Reading the input or writing the answer failed.
    #[error("cannot read the input or write the answer: {0}")]
    Io(#[from] std::io::Error),
    /// The new refresh token did not produce a token in time.
    #[error("client {client} is {state} after the new refresh token: {reason}")]
    NotRecovered {
        /// Client name.
        client: String,
        /// Its state.
        state: String,
        /// Why.
        reason: String,
    },
}

/// The address to connect to for a configured admin `listen` (unspecified → loopback).
pub fn admin_target(listen: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        let ip = if listen.is_ipv4() {
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
        } else {
            std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
        };
        SocketAddr::new(ip, listen.port())
    } else {
        listen
    }
}

/// Sends `token` to the sidecar at `admin` for `client`, authenticated with
/// `api_key` (`admin.api_key`), then waits up to `wait` for the client to hold a
/// valid token. Returns the client's `/status` entry.
pub async fn provide_refresh_token(
    admin: SocketAddr,
    api_key: Option<&Secret>,
    client: &str,
    token: Secret,
    wait: Duration,
) -> Result<serde_json::Value, OperatorError> {
    let authorization = bearer(api_key)?;
    let http: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let before = status_of(&http, admin, client).await?;
    let before_generation = before["generation"].as_u64().unwrap_or(0);
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{admin}/clients/{client}/refresh-token"))
        .header("content-type", "text/plain")
        .header(http::header::AUTHORIZATION, authorization)
        .body(Full::new(Bytes::copy_from_slice(token.expose().as_bytes())))
        .map_err(|e| unreachable(admin, e))?;
    let (status, body) = call(&http, admin, req).await?;
    if status != StatusCode::ACCEPTED {
        return Err(OperatorError::Refused {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = status_of(&http, admin, client).await?;
        let state = now["state"].as_str().unwrap_or("").to_owned();
        let generation = now["generation"].as_u64().unwrap_or(0);
        if state == "valid" && generation > before_generation {
            return Ok(now);
        }
        let gave_up = state == "needs_authorization" || state == "unavailable";
        if gave_up || tokio::time::Instant::now() >= deadline {
            let reason = now["reason"]
                .as_str()
                .or_else(|| now["last_refresh"]["error"].as_str())
                .unwrap_or("no new token yet")
                .to_owned();
            return Err(OperatorError::NotRecovered {
                client: client.to_owned(),
                state,
                reason,
            });
        }
    }
}

/// `Authorization: Bearer <api_key>`, marked sensitive.
fn bearer(api_key: Option<&Secret>) -> Result<http::HeaderValue, OperatorError> {
    let api_key = api_key.ok_or(OperatorError::NoApiKey)?;
    http::HeaderValue::try_from(format!("Bearer {}", api_key.expose()))
        .map(|mut v| {
            v.set_sensitive(true);
            v
        })
        .map_err(|_| OperatorError::NoApiKey)
}

/// `s` percent-encoded for one path segment.
fn path_segment(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn status_of(
    http: &Client<HttpConnector, Full<Bytes>>,
    admin: SocketAddr,
    client: &str,
) -> Result<serde_json::Value, OperatorError> {
    let req = Request::get(format!("http://{admin}/status"))
        .body(Full::new(Bytes::new()))
        .map_err(|e| unreachable(admin, e))?;
    let (status, body) = call(http, admin, req).await?;
    let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    match value["clients"].get(client) {
        Some(c) if status.is_success() => Ok(c.clone()),
        _ => Err(OperatorError::Refused {
            status,
            body: format!("no client {client:?} in the running sidecar's /status"),
        }),
    }
}

async fn call(
    http: &Client<HttpConnector, Full<Bytes>>,
    admin: SocketAddr,
    req: Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes), OperatorError> {
    let fut = async {
        let response = http.request(req).await.map_err(|e| unreachable(admin, e))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(admin, e))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| {
            Err(OperatorError::Unreachable {
                addr: admin,
                detail: "no answer within 10 s".into(),
            })
        })
}

fn unreachable(addr: SocketAddr, e: impl std::fmt::Display) -> OperatorError {
    OperatorError::Unreachable {
        addr,
        detail: e.to_string(),
    }
}

/// Why `tokenproxy token` could not show a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenCommandError {
    /// No client of that name.
    #[error("no client {client:?} in the configuration; configured: {configured}")]
    NoClient {
        /// The name asked for.
        client: String,
        /// The configured names.
        configured: String,
    },
    /// Obtaining a token would spend a rotating refresh token.
    #[error("client {0:?} uses grant = \"refresh_token\": obtaining a token spends the configured refresh token, and a rotating provider kills it; pass --spend-refresh-token --show-token to do it anyway and see the new one")]
    WouldSpend(String),
    /// The HTTP client could not be built (TLS settings).
    #[error(transparent)]
    Http(#[from] crate::http::client::UpstreamError),
    /// The token endpoint failed or refused.
    #[error(transparent)]
    Token(#[from] crate::token::TokenError),
    /// Writing the answer failed.
    #[error("cannot write the answer: {0}")]
    Io(#[from] std::io::Error),
}

/// `tokenproxy token CLIENT`: one token request as a fresh start would make it,
/// and its metadata written to `out`; the tokens themselves only with `show`.
pub async fn token(
    config: &crate::config::Config,
    client: &str,
    show: bool,
    spend: bool,
    out: &mut dyn std::io::Write,
) -> Result<(), TokenCommandError> {
    let Some(c) = config.clients.iter().find(|c| c.name == client) else {
        let names: Vec<_> = config.clients.iter().map(|c| c.name.as_str()).collect();
        return Err(TokenCommandError::NoClient {
            client: client.to_owned(),
            configured: names.join(", "),
        });
    };
    if matches!(c.token.grant, crate::config::Grant::RefreshToken) && !spend {
        return Err(TokenCommandError::WouldSpend(client.to_owned()));
    }
    let http = crate::http::client::build_token_client(&c.token.tls, &c.proxy)?;
    // A DPoP client's token is bound to a key made for this one request (the
    // command does not touch the store): enough to see the provider answer.
    let dpop = crate::store::Store::open(&crate::config::StoreConfig::Memory)
        .ok()
        .and_then(|memory| crate::token::Dpop::for_command(c, &memory));
    let endpoint =
        crate::token::TokenEndpoint::new(http, std::sync::Arc::new(crate::clock::SystemClock))
            .with_dpop(dpop);
    let set = endpoint.obtain_once(&c.token).await?;
    writeln!(out, "client:         {client}")?;
    writeln!(
        out,
        "token endpoint: {}",
        crate::secret::display_url(&c.token.url)
    )?;
    writeln!(out, "grant:          {}", c.token.grant.as_str())?;
    writeln!(
        out,
        "token_type:     {}",
        set.token_type.as_deref().unwrap_or("(none)")
    )?;
    match set.lifetime {
        Some(l) => writeln!(
            out,
            "expires_in:     {} (from {})",
            humantime::format_duration(l),
            set.lifetime_source.as_str()
        )?,
        None => writeln!(
            out,
            "expires_in:     (not stated; valid until the API rejects it)"
        )?,
    }
    let refresh = match (&set.refresh_token, set.refresh_token_lifetime) {
        (None, _) => "none".to_owned(),
        (Some(_), Some(l)) => format!("issued, expires in {}", humantime::format_duration(l)),
        (Some(_), None) => "issued".to_owned(),
    };
    writeln!(out, "refresh_token:  {refresh}")?;
    writeln!(
        out,
        "scope:          {}",
        set.scope.as_deref().unwrap_or("(none)")
    )?;
    if show {
        writeln!(out, "access_token:   {}", set.access_token.expose())?;
        if let Some(rt) = &set.refresh_token {
            writeln!(out, "refresh_token:  {}", rt.expose())?;
        }
    }
    Ok(())
}
