//! The request flow: route, take the token, forward, replay once after a 401,
//! answer.
//!
//! Request bodies up to `retry_body_limit` are buffered so that a 401 can be
//! answered by one refresh and one replay; larger bodies stream once, and a 401
//! to them goes back to the app (`not_replayable`). Responses always stream.
//!
//! A replay sends the request twice, so it is made only when repeating it is
//! safe: an idempotent method (RFC 9110 §9.2.2), an idempotency key header, or a
//! client that opted in. A payment POST without a key gets the API's 401 back
//! rather than a second charge. A replayed response carries
//! `x-tokenproxy-replayed: 1`.
//!
//! A request to switch protocols (a WebSocket) is forwarded once, unbuffered,
//! and a `101` turns the two connections into a tunnel: see `upgrade`.

pub mod body;
mod expect;
pub mod headers;
pub mod location;
pub mod pool;
pub mod route;
mod upgrade;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{
    Extensions, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri,
    Version,
};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::{debug, info};

use self::body::{Body, BufferBudget, Pace, Paced, RequestBody};
use self::location::{AppHost, LocationRewrite};
use self::pool::Http1Pool;
use self::route::ListenerRoutes;
use crate::config::{ClientConfig, Limits};
use crate::error::ProxyError;
use crate::http::client::{self as upstream, HttpClient, UpgradeConnector};
use crate::metrics::{ClientMetrics, NonceWhere, RetryOutcome, UpgradeOutcome, OTHER_PROTOCOL};
use crate::subjects::{SubjectError, Subjects};
use crate::token::dpop::{demands_nonce, offers_usable_nonce, DPOP_HEADER};
use crate::token::{Dpop, Token, TokenHandle, Unauthorized, Unavailable};

/// One configured client as the request path sees it.
pub struct ClientRuntime {
    /// The client's name (the `[clients.NAME]` table).
    pub name: String,
    scheme: Scheme,
    authority: Authority,
    base_path: String,
    host_header: HeaderValue,
    upstream_display: String,
    inject_header: HeaderName,
    retry_body_limit: usize,
    timeout: Duration,
    unauthorized: Vec<StatusCode>,
    idempotency_headers: Vec<HeaderName>,
    replay_non_idempotent: bool,
    pace: Pace,
    budget: Arc<BufferBudget>,
    /// The client's token.
    pub token: TokenHandle,
    /// The client's subjects, when it holds a token per subject.
    pub subjects: Option<Subjects>,
    metrics: ClientMetrics,
    http: HttpClient,
    /// For `http://` upstreams: our own HTTP/1.1 pool instead of `http`.
    pool: Option<Http1Pool>,
    /// How `Location` headers naming the upstream are pointed back at the
    /// sidecar (`rewrite_location`, on by default).
    location: Option<LocationRewrite>,
    /// Whether an upload that streams carries the app's `Expect: 100-continue`
    /// upstream (not to an `http2` upstream, whose `100` hyper does not report).
    forwards_expect: bool,
    /// Upgrade passthrough, when the client forwards any protocol.
    upgrades: Option<upgrade::Upgrades>,
    /// DPoP (`[dpop]`): a proof of its key beside every token sent.
    dpop: Option<Arc<Dpop>>,
}

/// The ways a client reaches its upstream.
pub struct UpstreamClients {
    /// The shared, pooled client.
    pub http: HttpClient,
    /// The connector of upgrade requests; `None` when the client forwards none.
    pub upgrade: Option<UpgradeConnector>,
}

impl ClientRuntime {
    /// The runtime view of `config`, using `token` and `metrics`; request bodies
    /// are paced by `limits` and buffered for replay within `budget`.
    pub fn new(
        config: &ClientConfig,
        limits: &Limits,
        budget: Arc<BufferBudget>,
        token: TokenHandle,
        subjects: Option<Subjects>,
        metrics: ClientMetrics,
        upstream_clients: UpstreamClients,
    ) -> Self {
        let UpstreamClients { http, upgrade } = upstream_clients;
        let authority = config.upstream.authority.clone();
        let host_header = HeaderValue::from_str(authority.as_str())
            .expect("a parsed URI authority is a valid header value");
        // HTTP/2 upstreams multiplex on the shared client's connections.
        let pool = (config.upstream.scheme == Scheme::HTTP && !config.http2).then(|| {
            let mut target = http::uri::Parts::default();
            target.scheme = Some(Scheme::HTTP);
            target.authority = Some(authority.clone());
            target.path_and_query = Some(PathAndQuery::from_static("/"));
            let target = Uri::from_parts(target).expect("scheme, authority and / make a valid URI");
            Http1Pool::new(
                upstream::egress(&config.proxy),
                target,
                limits.preserve_header_case,
            )
        });
        metrics.upgrades_init(&config.upgrades);
        let upgrades = upgrade
            .filter(|_| !config.upgrades.is_empty())
            .map(|connector| {
                upgrade::Upgrades::new(
                    config.upgrades.clone(),
                    connector,
                    config.upstream.scheme.clone(),
                    authority.clone(),
                    limits.upgrade_idle_timeout,
                )
            });
        ClientRuntime {
            name: config.name.clone(),
            scheme: config.upstream.scheme.clone(),
            upstream_display: format!("{}://{}", config.upstream.scheme, authority),
            authority,
            base_path: config.upstream.base_path.clone(),
            host_header,
            inject_header: config.inject.header.clone(),
            retry_body_limit: config.retry_body_limit,
            timeout: config.timeout,
            unauthorized: config.unauthorized_status.clone(),
            idempotency_headers: config.idempotency_headers.clone(),
            replay_non_idempotent: config.replay_non_idempotent,
            pace: Pace {
                idle: limits.body_timeout,
                min_rate: u64::try_from(limits.body_min_rate).unwrap_or(u64::MAX),
            },
            budget,
            token,
            subjects,
            metrics,
            http,
            pool,
            forwards_expect: !config.http2,
            location: config.rewrite_location.then(|| {
                LocationRewrite::new(
                    &config.upstream.scheme,
                    &config.upstream.authority,
                    &config.upstream.base_path,
                    config.path_prefix.as_deref(),
                    config.listen,
                )
            }),
            upgrades,
            dpop: None,
        }
    }

    /// The same runtime, signing a DPoP proof for every request with `dpop`'s key.
    pub fn with_dpop(mut self, dpop: Option<Arc<Dpop>>) -> Self {
        self.dpop = dpop;
        self
    }

    /// The DPoP proof for one send of `outgoing` with `token`: `None` for a
    /// client without DPoP, a new proof (a new `jti`) on every call otherwise.
    fn proof(&self, outgoing: &Outgoing, token: &Token) -> Result<Option<HeaderValue>, ProxyError> {
        let Some(dpop) = &self.dpop else {
            return Ok(None);
        };
        let unavailable = |reason: String| ProxyError::TokenUnavailable {
            reason,
            retry_after: Duration::from_secs(1),
        };
        // A subject's token carries its subject's key; the client's own key
        // is loaded before the first send (`ready_key`).
        let key = match &token.dpop_key {
            Some(key) => key
                .get()
                .map_err(|e| unavailable(format!("cannot sign a DPoP proof: {e}")))?,
            None => dpop
                .loaded_key()
                .ok_or_else(|| unavailable("the DPoP key is not loaded yet".to_owned()))?,
        };
        let ath = token
            .dpop_ath
            .as_deref()
            .ok_or_else(|| unavailable("the token is not DPoP-bound".to_owned()))?;
        dpop.api_proof(key, &outgoing.method, outgoing.uri.path(), ath)
            .map(Some)
            .map_err(|e| unavailable(format!("cannot sign a DPoP proof: {e}")))
    }

    fn is_unauthorized(&self, status: StatusCode) -> bool {
        self.unauthorized.contains(&status)
    }

    /// Whether sending `outgoing` a second time is safe.
    fn may_replay(&self, outgoing: &Outgoing) -> bool {
        self.replay_non_idempotent
            || is_idempotent(&outgoing.method)
            || self
                .idempotency_headers
                .iter()
                .any(|h| outgoing.headers.contains_key(h))
    }
}

/// Header on a response to a request that was sent twice (after a 401).
pub static REPLAYED_HEADER: HeaderName = HeaderName::from_static("x-tokenproxy-replayed");

/// RFC 9110 §9.2.2 idempotent methods.
fn is_idempotent(method: &Method) -> bool {
    is_safe(method) || matches!(*method, Method::PUT | Method::DELETE)
}

/// Whether the API said the token itself is the problem (RFC 6750 §3.1).
fn says_invalid_token(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            let v = v.to_ascii_lowercase();
            v.contains("error=\"invalid_token\"") || v.contains("error=invalid_token")
        })
}

/// Whether a gRPC answer is a trailers-only UNAUTHENTICATED (16): the gRPC form
/// of a 401.
fn grpc_unauthenticated(headers: &HeaderMap) -> bool {
    headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"16")
}

/// Handles one request on a proxy listener; every failure becomes a response.
///
/// Not an `async fn`: its future captures the request as it is, where an
/// `async fn` would hold it twice (its argument, and the copy it moves on).
#[allow(clippy::manual_async_fn)]
pub fn handle(
    req: Request<Incoming>,
    routes: Arc<ListenerRoutes>,
) -> impl Future<Output = Result<Response<Body>, Infallible>> + Send + 'static {
    async move {
        let started = Instant::now();
        let grpc = crate::error::is_grpc(req.headers());
        let (client, path_and_query) = match routes.route(&req) {
            Ok((client, pq)) => (Arc::clone(client), pq),
            Err(e) => {
                let response = e.into_response_for(grpc, None);
                info!(
                    target: ACCESS_LOG,
                    method = %req.method(),
                    path = %req.uri().path(),
                    status = response.status().as_u16(),
                    error = e_code(&response),
                    "refused"
                );
                return Ok(response);
            }
        };
        let gauge = client.metrics.inflight().clone();
        gauge.inc();
        let _inflight = scopeguard(move || gauge.dec());

        let request_id = headers::request_id(req.headers());
        // Only the path: query strings can carry secrets and are never logged. Copied only
        // when the access log is on (the benchmarks, and some deployments, turn it off).
        let logged = tracing::enabled!(target: ACCESS_LOG, tracing::Level::INFO)
            .then(|| (req.method().clone(), req.uri().path().to_owned()));
        let mut exchange = Exchange {
            logged: logged.is_some(),
            ..Exchange::default()
        };
        let forwarded = forward(
            &client,
            &client.http,
            req,
            path_and_query,
            &request_id,
            &mut exchange,
            grpc,
        )
        .await;
        // The access log's code comes from the error, never from a response header.
        let error_code = forwarded.as_ref().err().map_or("", |e| e.code());
        let response = match forwarded {
            Ok(mut response) => {
                if let Some(location) = &client.location {
                    location.apply(response.headers_mut(), &exchange.app_host);
                }
                response
            }
            Err(e) => {
                // The access line below records every failure with its code; the cause goes
                // to debug so that an outage does not write one warning per request.
                debug!(client = %client.name, request.id = %request_id.to_str().unwrap_or("-"), error = %e, "request failed");
                client.metrics.sidecar_error(e.code());
                e.into_response_for(grpc, Some(&client.name))
            }
        };
        let elapsed = started.elapsed();
        client
            .metrics
            .request(response.status(), elapsed.as_secs_f64());
        let (method, path) = logged
            .as_ref()
            .map_or(("", ""), |(m, p)| (m.as_str(), p.as_str()));
        info!(
            target: ACCESS_LOG,
            client = %client.name,
            subject = exchange.subject.as_deref().unwrap_or(""),
            request.id = %request_id.to_str().unwrap_or("-"),
            method = %method,
            path = %path,
            status = response.status().as_u16(),
            upstream.status = exchange.upstream_status,
            duration_ms = (elapsed.as_secs_f64() * 1000.0 * 10.0).round() / 10.0,
            token_waited = exchange.token_waited,
            replayed = exchange.replayed,
            error = error_code,
            "request"
        );
        Ok(response)
    }
}

/// Log target of the one-line-per-request access log (`RUST_LOG=tokenproxy::access=off` silences it).
pub const ACCESS_LOG: &str = "tokenproxy::access";

fn e_code<B>(response: &Response<B>) -> &str {
    response
        .headers()
        .get(&crate::error::ERROR_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// What happened to one request on its way, for the access log.
#[derive(Default)]
struct Exchange {
    /// Whether the access log is on, and so wants the subject.
    logged: bool,
    /// The subject the app named (a validated id), when the access log is on.
    subject: Option<String>,
    upstream_status: Option<u16>,
    token_waited: bool,
    replayed: bool,
    /// How the app addressed the sidecar, kept when `Location`s are rewritten.
    app_host: AppHost,
}

/// The parts of the app's request that are sent (again) upstream.
struct Outgoing {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    /// The app's request extensions. hyper keeps there how an HTTP/1 app spelled
    /// its header names, and writes them so upstream (`preserve_header_case`).
    extensions: Extensions,
}

impl Outgoing {
    /// One attempt that may be followed by another: the template with `token`
    /// and, for a DPoP client, `proof` (a new one for every attempt: an API
    /// accepts each `jti` once).
    fn request(
        &self,
        body: Body,
        token: &Token,
        inject: &HeaderName,
        proof: Option<HeaderValue>,
    ) -> Request<Body> {
        self.build(body, token, inject, proof, self.extensions.clone())
    }

    /// The last attempt: as [`Outgoing::request`], with the extensions moved
    /// into it instead of copied (a copy of the case map is a few allocations).
    fn last_request(
        &mut self,
        body: Body,
        token: &Token,
        inject: &HeaderName,
        proof: Option<HeaderValue>,
    ) -> Request<Body> {
        let extensions = std::mem::take(&mut self.extensions);
        self.build(body, token, inject, proof, extensions)
    }

    fn build(
        &self,
        body: Body,
        token: &Token,
        inject: &HeaderName,
        proof: Option<HeaderValue>,
        extensions: Extensions,
    ) -> Request<Body> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = Version::HTTP_11;
        let mut headers = self.headers.clone();
        headers.insert(inject.clone(), token.header.clone());
        if let Some(proof) = proof {
            headers.insert(DPOP_HEADER.clone(), proof);
        }
        *req.headers_mut() = headers;
        *req.extensions_mut() = extensions;
        req
    }
}

/// Loads the client's DPoP key before the first proof sent with its own
/// `token` (once; then a check). A subject's token carries its own key.
async fn ready_key(client: &ClientRuntime, token: &Token) -> Result<(), ProxyError> {
    if let (Some(dpop), None) = (&client.dpop, &token.dpop_key) {
        dpop.key().await.map_err(|e| ProxyError::TokenUnavailable {
            reason: e.to_string(),
            retry_after: Duration::from_secs(1),
        })?;
    }
    Ok(())
}

async fn forward(
    client: &ClientRuntime,
    http: &HttpClient,
    req: Request<Incoming>,
    path_and_query: PathAndQuery,
    request_id: &HeaderValue,
    exchange: &mut Exchange,
    grpc: bool,
) -> Result<Response<Body>, ProxyError> {
    // In a block: what is left of the app's request once its parts are taken is
    // dropped before the first await, so it is no part of this future's state
    // (which hyper moves twice per request and keeps for the connection's life).
    let (mut outgoing, incoming, subject, upgrade) = {
        let (mut parts, incoming) = req.into_parts();
        let asked = upgrade::asked(client.upgrades.as_ref(), &parts);
        if let upgrade::Asked::NotAllowed = asked {
            client
                .metrics
                .upgrade(OTHER_PROTOCOL, UpgradeOutcome::NotAllowed);
        }
        let mut uri = http::uri::Parts::default();
        if client.pool.is_none() {
            // The shared client wants the absolute form (it picks the pool by it); our own
            // pool sends the origin form as it is.
            uri.scheme = Some(client.scheme.clone());
            uri.authority = Some(client.authority.clone());
        }
        uri.path_and_query = Some(path_and_query);
        let uri = Uri::from_parts(uri)
            .map_err(|e| ProxyError::BadRequest(format!("cannot build upstream URI: {e}")))?;
        let app_host = headers::prepare_request(
            &mut parts.headers,
            &client.host_header,
            &client.inject_header,
            request_id,
        );
        if client.location.is_some() {
            exchange.app_host = match (app_host, parts.uri.authority()) {
                (Some(host), _) => AppHost::Header(host),
                (None, Some(authority)) => AppHost::Authority(authority.clone()),
                (None, None) => AppHost::Unknown,
            };
        }
        let subject = take_subject(client, &mut parts.headers)?;
        if exchange.logged {
            exchange.subject.clone_from(&subject);
        }
        let mut outgoing = Outgoing {
            method: parts.method,
            uri,
            headers: parts.headers,
            extensions: parts.extensions,
        };
        let upgrade = match (asked, &client.upgrades) {
            // `asked` saw the server's hold, which comes with hyper's hand-over.
            (upgrade::Asked::Allowed(offer), Some(_)) => {
                upgrade::AppSide::take(&mut outgoing.extensions).map(|app| (offer, app))
            }
            _ => None,
        };
        (outgoing, incoming, subject, upgrade)
    };
    let subject = subject.as_deref();
    if let (Some((offer, app)), Some(upgrades)) = (upgrade, &client.upgrades) {
        let handshake = upgrade::Handshake {
            outgoing,
            body: incoming,
            app,
            offer,
            subject,
            request_id,
        };
        // Boxed: a tunnel's state would otherwise make every request's future
        // larger, and each is moved (copied) on its way into hyper's task.
        return Box::pin(upgrade::forward(client, upgrades, handshake, exchange)).await;
    }
    // Served as a plain request: the app's connection is not handed over, and
    // nothing of that hand-over goes upstream with the extensions.
    let _not_upgraded = upgrade::AppSide::take(&mut outgoing.extensions);

    // A gRPC call's request may be a stream the client writes as the answers come
    // (and may idle between messages): it is forwarded as it arrives, never held
    // back to be buffered, and never paced. HTTP/2 flow control bounds what it holds.
    // An upload that will stream asks the upstream whether to send its body
    // (see `expect`); one the sidecar reads itself is answered `100` by hyper
    // and goes without `Expect`.
    let expects = expect::expects_continue(&outgoing.headers);
    let held = expects
        && !grpc
        && client.forwards_expect
        && http_body::Body::size_hint(&incoming).lower() > client.retry_body_limit as u64;
    if expects && !held {
        outgoing.headers.remove(http::header::EXPECT);
    }
    let mut gate = None;
    let body = if held {
        let (body, held_by) = expect::hold(Paced::new(incoming, client.pace));
        gate = Some(held_by);
        Ok(RequestBody::Streaming(body))
    } else if grpc {
        Ok(RequestBody::Streaming(body::incoming(incoming)))
    } else {
        RequestBody::read(
            Paced::new(incoming, client.pace),
            client.retry_body_limit,
            &client.budget,
        )
        .await
    };
    let body = body.map_err(|e| {
        if body::is_body_timeout(e.as_ref()) {
            ProxyError::BodyTimeout(e.to_string())
        } else {
            ProxyError::BadRequest(format!("cannot read the request body: {e}"))
        }
    })?;

    let token = take_token(client, subject, exchange).await?;
    ready_key(client, &token).await?;
    // In the template too, so that each copy only replaces the value (a copy has no
    // spare capacity, and adding a header to it would grow it).
    outgoing
        .headers
        .insert(client.inject_header.clone(), token.header.clone());
    if client.dpop.is_some() {
        // The app's own proof, if any, is replaced (and its place kept).
        outgoing
            .headers
            .insert(DPOP_HEADER.clone(), HeaderValue::from_static(""));
    }
    match body {
        RequestBody::Buffered(bytes, _reservation) => {
            let replayable = client.may_replay(&outgoing);
            let mut first =
                send_buffered(client, http, &mut outgoing, &bytes, &token, replayable).await?;
            exchange.upstream_status = Some(first.status().as_u16());
            if client.is_unauthorized(first.status()) && nonce_demanded(client, &first) {
                // The API wants a (newer) DPoP nonce, which send_once kept: the
                // token is not the problem, so it is sent again, with a new proof
                // carrying the nonce, when that is safe; never retired. A nonce
                // no proof may carry is not kept: sending again would only double
                // the request.
                if !client.may_replay(&outgoing) || !offers_usable_nonce(first.headers()) {
                    client
                        .metrics
                        .unauthorized_retry(RetryOutcome::NotReplayable);
                    return Ok(first);
                }
                if let Some(dpop) = &client.dpop {
                    dpop.nonce_retry(NonceWhere::Upstream);
                }
                drop(first);
                exchange.replayed = true;
                first = send_buffered(client, http, &mut outgoing, &bytes, &token, false).await?;
                exchange.upstream_status = Some(first.status().as_u16());
                if client.is_unauthorized(first.status()) && !nonce_demanded(client, &first) {
                    // Replayed once already: the next requests meet a new token.
                    let _decision = on_unauthorized(
                        client,
                        subject,
                        &token,
                        says_invalid_token(first.headers()),
                    );
                }
                first
                    .headers_mut()
                    .insert(REPLAYED_HEADER.clone(), HeaderValue::from_static("1"));
                return Ok(first);
            }
            if !client.is_unauthorized(first.status()) {
                return Ok(first);
            }
            let decision =
                on_unauthorized(client, subject, &token, says_invalid_token(first.headers()));
            if !replayable {
                client
                    .metrics
                    .unauthorized_retry(RetryOutcome::NotReplayable);
                return Ok(first);
            }
            let newer = match decision {
                Unauthorized::Kept(why) => {
                    debug!(client = %client.name, reason = why, "upstream 401 passed on without a refresh");
                    return Ok(first);
                }
                Unauthorized::Newer(newer) => newer,
                Unauthorized::Refreshing => {
                    drop(first);
                    let started = Instant::now();
                    let newer = get_newer(client, subject, token.generation).await;
                    client.metrics.token_wait(started.elapsed().as_secs_f64());
                    match newer {
                        Ok(t) => t,
                        Err(e) => {
                            client.metrics.unauthorized_retry(RetryOutcome::Failed);
                            return Err(e);
                        }
                    }
                }
            };
            exchange.replayed = true;
            let mut second = replay(client, subject, http, &mut outgoing, bytes, &newer).await?;
            exchange.upstream_status = Some(second.status().as_u16());
            second
                .headers_mut()
                .insert(REPLAYED_HEADER.clone(), HeaderValue::from_static("1"));
            Ok(second)
        }
        RequestBody::Streaming(stream) => {
            // The request is made in a block that ends before the await, so
            // that it is held once, by the send, in this future's state.
            let sending = {
                let proof = client.proof(&outgoing, &token)?;
                let mut req = outgoing.last_request(stream, &token, &client.inject_header, proof);
                if let Some(gate) = &gate {
                    gate.attach(&mut req);
                }
                send_once(client, http, req)
            };
            let mut response = sending.await.map_err(Failure::into_error)?;
            if let Some(gate) = gate.filter(expect::Gate::answered_first) {
                response = response.map(|answer| expect::answer_passed_on(answer, gate));
            }
            exchange.upstream_status = Some(response.status().as_u16());
            if client.is_unauthorized(response.status()) && nonce_demanded(client, &response) {
                // Not sent again (nothing was buffered); the nonce is kept for the
                // next request, and the token is not the problem.
                client
                    .metrics
                    .unauthorized_retry(RetryOutcome::NotReplayable);
            } else if client.is_unauthorized(response.status())
                || (grpc && grpc_unauthenticated(response.headers()))
            {
                // Not sent again, but the next requests should not meet the same 401.
                let _decision = on_unauthorized(
                    client,
                    subject,
                    &token,
                    says_invalid_token(response.headers()),
                );
                client
                    .metrics
                    .unauthorized_retry(RetryOutcome::NotReplayable);
            }
            Ok(response)
        }
    }
}

/// Sends the request once more with `newer`, a token newer than the one the API
/// refused. A 401 to the replay goes back to the app as it came, and tells the
/// token handle that the 401 is not about the token.
async fn replay(
    client: &ClientRuntime,
    subject: Option<&str>,
    http: &HttpClient,
    outgoing: &mut Outgoing,
    bytes: Bytes,
    newer: &Token,
) -> Result<Response<Body>, ProxyError> {
    let result = send_buffered(client, http, outgoing, &bytes, newer, false).await;
    let outcome = match &result {
        Ok(r) if client.is_unauthorized(r.status()) => {
            match (subject, &client.subjects) {
                (Some(subject), Some(subjects)) => {
                    subjects.refused_again(subject, newer.generation)
                }
                _ => client.token.refused_again(newer.generation),
            }
            RetryOutcome::Failed
        }
        Ok(_) => RetryOutcome::Recovered,
        Err(_) => RetryOutcome::Failed,
    };
    client.metrics.unauthorized_retry(outcome);
    result
}

/// The subject the request names, taken out of its headers: `None` for a
/// client without subjects, or one that falls back to its own token.
fn take_subject(
    client: &ClientRuntime,
    headers: &mut HeaderMap,
) -> Result<Option<String>, ProxyError> {
    let Some(subjects) = &client.subjects else {
        return Ok(None);
    };
    match subjects.take_subject(headers) {
        Ok(Some(subject)) => Ok(Some(subject)),
        Ok(None) if subjects.falls_back_to_client() => Ok(None),
        Ok(None) => Err(ProxyError::SubjectRequired {
            header: subjects.header().to_string(),
        }),
        Err(reason) => Err(ProxyError::BadSubject(reason)),
    }
}

fn on_unauthorized(
    client: &ClientRuntime,
    subject: Option<&str>,
    token: &Arc<Token>,
    invalid_token: bool,
) -> Unauthorized {
    match (subject, &client.subjects) {
        (Some(subject), Some(subjects)) => subjects.on_unauthorized(subject, token, invalid_token),
        _ => client.token.on_unauthorized(token, invalid_token),
    }
}

async fn get_newer(
    client: &ClientRuntime,
    subject: Option<&str>,
    generation: u64,
) -> Result<Arc<Token>, ProxyError> {
    match (subject, &client.subjects) {
        (Some(subject), Some(subjects)) => subjects
            .get_newer(subject, generation)
            .await
            .map_err(subject_error),
        _ => client
            .token
            .get_newer(generation)
            .await
            .map_err(unavailable),
    }
}

fn subject_error(e: SubjectError) -> ProxyError {
    match e {
        SubjectError::Unknown(subject) => ProxyError::SubjectUnknown(subject),
        SubjectError::NeedsAuthorization { subject, reason } => {
            ProxyError::NeedsAuthorization { subject, reason }
        }
        SubjectError::Unavailable {
            reason,
            retry_after,
        } => ProxyError::TokenUnavailable {
            reason,
            retry_after,
        },
    }
}

async fn take_token(
    client: &ClientRuntime,
    subject: Option<&str>,
    exchange: &mut Exchange,
) -> Result<Arc<Token>, ProxyError> {
    if let (Some(subject), Some(subjects)) = (subject, &client.subjects) {
        let started = Instant::now();
        let result = subjects.token(subject).await;
        let waited = started.elapsed();
        exchange.token_waited = waited > Duration::from_millis(1);
        client.metrics.token_wait(waited.as_secs_f64());
        return result.map_err(subject_error);
    }
    if let Some(token) = client.token.current() {
        client.metrics.token_wait(0.0);
        return Ok(token);
    }
    exchange.token_waited = true;
    let started = Instant::now();
    let result = client.token.get().await;
    client.metrics.token_wait(started.elapsed().as_secs_f64());
    result.map_err(unavailable)
}

fn unavailable(e: Unavailable) -> ProxyError {
    ProxyError::TokenUnavailable {
        reason: e.reason,
        retry_after: e.retry_after,
    }
}

/// Sends a buffered request; a safe method (GET, HEAD, OPTIONS) whose connection
/// broke before any response head is sent once more on a fresh connection.
/// `again`: whether the caller may send it once more after this (a 401 replay).
///
/// A pooled connection the upstream closes just as a request is written (servers
/// close idle keep-alive connections: gunicorn after 2 s) fails that request
/// although the upstream never processed it. For a POST that cannot be proven,
/// so it is never resent: the app gets `upstream_unreachable` and decides.
async fn send_buffered(
    client: &ClientRuntime,
    http: &HttpClient,
    outgoing: &mut Outgoing,
    bytes: &Bytes,
    token: &Token,
    again: bool,
) -> Result<Response<Body>, ProxyError> {
    let retry = is_safe(&outgoing.method);
    // A new DPoP proof for every send, the retry of a broken one included.
    let mut request = |last: bool| -> Result<Request<Body>, ProxyError> {
        let proof = client.proof(outgoing, token)?;
        let body = body::full(bytes.clone());
        Ok(if last {
            outgoing.last_request(body, token, &client.inject_header, proof)
        } else {
            outgoing.request(body, token, &client.inject_header, proof)
        })
    };
    // Each request is made before its send, not in the argument list: a
    // temporary there would stay in this future's state across the await,
    // beside the copy the send holds.
    let first = request(!again && !retry)?;
    match send_once(client, http, first).await {
        Err(Failure::Broken(e)) if retry => {
            debug!(client = %client.name, error = %e, "connection broke before a response; retrying a safe request once");
        }
        other => return other.map_err(Failure::into_error),
    }
    let second = request(!again)?;
    send_once(client, http, second)
        .await
        .map_err(Failure::into_error)
}

/// RFC 9110 §9.2.1 safe methods: sending them twice changes nothing.
fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Why one send failed.
enum Failure {
    /// The exchange broke after the connection was made, before a response head.
    Broken(ProxyError),
    /// Anything else (no connection at all, or a timeout).
    Other(ProxyError),
}

impl Failure {
    fn into_error(self) -> ProxyError {
        match self {
            Failure::Broken(e) | Failure::Other(e) => e,
        }
    }
}

async fn send_once(
    client: &ClientRuntime,
    http: &HttpClient,
    req: Request<Body>,
) -> Result<Response<Body>, Failure> {
    let sent = match &client.pool {
        Some(pool) => tokio::time::timeout(client.timeout, pool.send(req))
            .await
            .map(|r| {
                r.map_err(|e| {
                    let slow_body = body::is_body_timeout(&e);
                    (e.is_connect(), slow_body, crate::token::error_chain(&e))
                })
            }),
        None => tokio::time::timeout(client.timeout, http.request(req))
            .await
            .map(|r| {
                r.map(|response| response.map(body::incoming)).map_err(|e| {
                    let slow_body = body::is_body_timeout(&e);
                    (e.is_connect(), slow_body, crate::token::error_chain(&e))
                })
            }),
    };
    let response = match sent {
        Ok(Ok(response)) => response,
        Ok(Err((_, true, detail))) => {
            // The app's body stalled while it streamed upstream: the app's fault.
            return Err(Failure::Other(ProxyError::BodyTimeout(detail)));
        }
        Ok(Err((is_connect, false, detail))) => {
            let error = ProxyError::UpstreamUnreachable {
                upstream: client.upstream_display.clone(),
                detail,
            };
            return Err(if is_connect {
                Failure::Other(error)
            } else {
                Failure::Broken(error)
            });
        }
        Err(_elapsed) => {
            return Err(Failure::Other(ProxyError::UpstreamTimeout {
                upstream: client.upstream_display.clone(),
                timeout: humantime::format_duration(client.timeout).to_string(),
            }))
        }
    };
    let (mut parts, body) = response.into_parts();
    if let Some(dpop) = &client.dpop {
        // Every answer may carry the API's next nonce, 200s included.
        dpop.note_api_nonce(&parts.headers);
    }
    headers::strip_hop_by_hop(&mut parts.headers);
    headers::strip_sidecar_headers(&mut parts.headers);
    Ok(Response::from_parts(parts, body))
}

/// Whether the API answered a DPoP client's request with `use_dpop_nonce`
/// and a nonce (RFC 9449 §9): the proof, not the token, was refused.
fn nonce_demanded<B>(client: &ClientRuntime, response: &Response<B>) -> bool {
    client.dpop.is_some()
        && demands_nonce(response.headers())
        && response
            .headers()
            .contains_key(&crate::token::dpop::NONCE_HEADER)
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
