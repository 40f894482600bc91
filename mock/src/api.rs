//! The mock payments API: a bearer-protected echo server that records every request.
//!
//! Tokens are checked with the provider's [`TokenValidator`]; a missing or invalid one gets the
//! RFC 6750 401 with `WWW-Authenticate: Bearer … error="invalid_token"`. A token bound to a DPoP
//! key (RFC 9449) passes only as `Authorization: DPoP …` with a fresh proof of that key for this
//! request (`dpop.rs` checks it), never as Bearer; with [`MockApi::set_dpop_nonce`] every proof
//! must carry the API's nonce. Valid requests reach a
//! few routes that let tests exercise latency (`/slow`), streaming (`/big`) and arbitrary
//! upstream statuses (`/status/NNN`); everything else echoes what arrived.
//!
//! One page needs no token and is not recorded: [`CONNECTED_PATH`], where a browser lands
//! after a connect session (the demo's `return_to`), saying which merchant connected.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::json;
use tokio::net::TcpListener;

use super::dpop::{self, Expected, Refused, SeenJtis};
use super::provider::{html_escape, TokenValidator};
use super::{full, json_response, lock, query_param, Closed, MockBody, Server, Shutdown};

/// Where a browser lands after a connect session (`?subject=…&status=…&error=…`): a
/// page for people, answered without a token and not recorded.
pub const CONNECTED_PATH: &str = "/connected/";

/// Chunk size of `/big` responses.
const CHUNK: usize = 64 * 1024;

/// The merchant a `/merchants/ID/...` path names.
fn merchant_in_path(path: &str) -> Option<&str> {
    path.strip_prefix("/merchants/")?.split('/').next()
}

/// One request as the mock API received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// Request method.
    pub method: Method,
    /// URI path.
    pub path: String,
    /// URI query, without the `?`.
    pub query: Option<String>,
    /// Request headers, as received.
    pub headers: HeaderMap,
    /// The whole request body.
    pub body: Bytes,
    /// Serial of the presented access token, when the validator accepted it.
    pub token_serial: Option<u64>,
    /// The account the presented token belongs to, when it was issued for one.
    pub token_account: Option<String>,
    /// The thumbprint of the key of the DPoP proof that passed every check.
    pub dpop_jkt: Option<String>,
    /// Status the API answered with.
    pub status: u16,
}

#[derive(Default)]
struct ApiState {
    recorded: Vec<RecordedRequest>,
    reject_next: usize,
    /// The nonce every DPoP proof must carry, once one is demanded.
    dpop_nonce: Option<String>,
    /// Every 401 offers a Bearer challenge before the DPoP one, in one header.
    bearer_challenge_first: bool,
    /// The `jti` of every proof whose signature verified.
    seen: SeenJtis,
    counts: DpopCounts,
}

/// What the API's DPoP checks decided so far, as the oidc peer's `/healthz` counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DpopCounts {
    /// Requests that passed every DPoP check.
    pub ok: usize,
    /// Requests refused for a DPoP reason: the proof, the token's binding, or a
    /// bound token sent as Bearer.
    pub rejected: usize,
    /// Refusals because the proof's `jti` was seen before.
    pub replayed: usize,
    /// 401 `use_dpop_nonce` answers.
    pub nonce_challenges: usize,
    /// Bound tokens sent with the Bearer scheme.
    pub bound_as_bearer: usize,
}

struct Shared {
    validator: TokenValidator,
    state: Mutex<ApiState>,
}

/// A running mock payments API on loopback; stops when dropped.
pub struct MockApi {
    shared: Arc<Shared>,
    server: Server,
}

impl std::fmt::Debug for MockApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockApi")
            .field("addr", &self.server.addr())
            .finish_non_exhaustive()
    }
}

impl MockApi {
    /// Binds 127.0.0.1:0 and starts serving, accepting tokens `validator` accepts.
    pub async fn start(validator: TokenValidator) -> std::io::Result<MockApi> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::start_on(listener, validator).await
    }

    /// Starts serving on an already bound listener.
    pub async fn start_on(
        listener: TcpListener,
        validator: TokenValidator,
    ) -> std::io::Result<MockApi> {
        let shared = Arc::new(Shared {
            validator,
            state: Mutex::new(ApiState::default()),
        });
        let handler_shared = shared.clone();
        let server = Server::start(listener, "api", move |req, shutdown| {
            handle(handler_shared.clone(), req, shutdown)
        })?;
        Ok(MockApi { shared, server })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Every request received so far.
    pub fn requests(&self) -> usize {
        self.state().recorded.len()
    }

    /// Every request received so far, in order of arrival.
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        self.state().recorded.clone()
    }

    /// Makes every DPoP proof carry `nonce`: a proof without it gets 401
    /// `use_dpop_nonce`, and every response carries it in `DPoP-Nonce`. `None`
    /// demands none.
    pub fn set_dpop_nonce(&self, nonce: Option<&str>) {
        self.state().dpop_nonce = nonce.map(str::to_owned);
    }

    /// Makes every 401 offer `Bearer realm="payments"` before its own
    /// challenge, in one `WWW-Authenticate` (RFC 9110 §11.6.1), as an API that
    /// accepts either scheme does.
    pub fn set_bearer_challenge_first(&self, first: bool) {
        self.state().bearer_challenge_first = first;
    }

    /// What the DPoP checks decided so far.
    pub fn dpop_counts(&self) -> DpopCounts {
        self.state().counts
    }

    /// The next `n` requests get 401 `invalid_token` whatever their token.
    pub fn reject_next(&self, n: usize) {
        self.state().reject_next = n;
    }

    fn state(&self) -> MutexGuard<'_, ApiState> {
        lock(&self.shared.state)
    }
}

/// What a request is answered with, decided before any waiting.
#[derive(Clone)]
enum Route {
    /// 401 with this `WWW-Authenticate` and `error`.
    Unauthorized(String, &'static str),
    BadRequest(&'static str),
    Slow(Duration),
    Big(u64),
    Status(StatusCode),
    Echo(StatusCode),
}

impl Route {
    /// Whether the request passed the token checks.
    fn passed(&self) -> bool {
        !matches!(self, Route::Unauthorized(..) | Route::BadRequest(_))
    }

    fn status(&self) -> StatusCode {
        match self {
            Route::Unauthorized(..) => StatusCode::UNAUTHORIZED,
            Route::BadRequest(_) => StatusCode::BAD_REQUEST,
            Route::Slow(_) | Route::Big(_) => StatusCode::OK,
            Route::Status(status) | Route::Echo(status) => *status,
        }
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    _shutdown: Shutdown,
) -> Result<Response<MockBody>, Closed> {
    let path = req.uri().path();
    if req.method() == Method::GET
        && (path == CONNECTED_PATH.trim_end_matches('/') || path.starts_with(CONNECTED_PATH))
    {
        return Ok(connected_page(req.uri().query()));
    }
    let (parts, body) = req.into_parts();
    let (body, body_ok) = match body.collect().await {
        Ok(collected) => (collected.to_bytes(), true),
        Err(_) => (Bytes::new(), false),
    };
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().map(str::to_owned);
    let presented = credentials(&parts.headers);
    let token = presented.map(|(_, token)| token);
    let token_serial = token.and_then(|t| shared.validator.check(t));
    let token_account = token.and_then(|t| shared.validator.account(t));
    let binding = token.and_then(|t| shared.validator.binding(t));

    let (route, nonce, bearer_first) = {
        let mut state = lock(&shared.state);
        let dpop = match presented {
            Some((Scheme::Dpop, token)) => {
                dpop_verdict(&mut state, &parts, &path, token, binding.as_deref())
            }
            _ => Ok(None),
        };
        let scheme = presented.map(|(scheme, _)| scheme);
        let route = if !body_ok {
            Route::BadRequest("request body could not be read")
        } else if state.reject_next > 0 {
            state.reject_next -= 1;
            invalid_token(scheme, None)
        } else if let Err(refusal) = &dpop {
            refusal.clone()
        } else if token_serial.is_none() {
            invalid_token(scheme, Some("token is not active"))
        } else if let Some(why) = binding_problem(scheme, binding.is_some(), &mut state.counts) {
            invalid_token(scheme, Some(why))
        } else if merchant_in_path(&path).is_some_and(|m| token_account.as_deref() != Some(m)) {
            // The API's own check that a merchant's token is used for that merchant.
            Route::Echo(StatusCode::FORBIDDEN)
        } else {
            route(&parts.method, &path, query.as_deref())
        };
        state.recorded.push(RecordedRequest {
            method: parts.method.clone(),
            path: path.clone(),
            query: query.clone(),
            headers: parts.headers.clone(),
            body: body.clone(),
            token_serial,
            token_account: token_account.clone(),
            dpop_jkt: dpop.ok().flatten().filter(|_| route.passed()),
            status: route.status().as_u16(),
        });
        if route.passed() && scheme == Some(Scheme::Dpop) {
            state.counts.ok += 1;
        }
        (
            route,
            state.dpop_nonce.clone(),
            state.bearer_challenge_first,
        )
    };

    let mut response = match route {
        Route::Unauthorized(challenge, error) => {
            let challenge = if bearer_first && !challenge.starts_with("Bearer") {
                format!("Bearer realm=\"payments\", {challenge}")
            } else {
                challenge
            };
            let mut response = json_response(StatusCode::UNAUTHORIZED, &json!({"error": error}));
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, value);
            }
            response
        }
        Route::BadRequest(problem) => json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "bad_request", "detail": problem}),
        ),
        Route::Slow(wait) => {
            tokio::time::sleep(wait).await;
            echo_response(StatusCode::OK, &parts, &path, &query, &body, token_serial)
        }
        Route::Big(len) => {
            let mut response = Response::new(BigBody { remaining: len }.boxed());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            response
        }
        Route::Status(status) => {
            if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
                // These statuses cannot carry a body.
                let mut response = Response::new(full(Bytes::new()));
                *response.status_mut() = status;
                response
            } else {
                json_response(status, &json!({"status": status.as_u16()}))
            }
        }
        Route::Echo(status) => echo_response(status, &parts, &path, &query, &body, token_serial),
    };
    response
        .headers_mut()
        .insert("x-mock-api", HeaderValue::from_static("1"));
    if let Some(value) = nonce.and_then(|n| HeaderValue::from_str(&n).ok()) {
        response.headers_mut().insert(dpop::NONCE_HEADER, value);
    }
    Ok(response)
}

/// How a request presented its token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scheme {
    Bearer,
    Dpop,
}

/// The scheme and token of an `Authorization: Bearer|DPoP <token>` header.
fn credentials(headers: &HeaderMap) -> Option<(Scheme, &str)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    let scheme = if scheme.eq_ignore_ascii_case("bearer") {
        Scheme::Bearer
    } else if scheme.eq_ignore_ascii_case("dpop") {
        Scheme::Dpop
    } else {
        return None;
    };
    (!token.is_empty()).then_some((scheme, token))
}

/// What is wrong with presenting a live token with `scheme`: a bound token as
/// Bearer, or an unbound one as DPoP.
fn binding_problem(
    scheme: Option<Scheme>,
    bound: bool,
    counts: &mut DpopCounts,
) -> Option<&'static str> {
    let why = match (scheme, bound) {
        (Some(Scheme::Bearer), true) => {
            counts.bound_as_bearer += 1;
            "DPoP-bound token presented as a Bearer token"
        }
        (Some(Scheme::Dpop), false) => "token is not DPoP-bound",
        _ => return None,
    };
    counts.rejected += 1;
    Some(why)
}

/// The 401 for a token that is not good, in the scheme it came with; a plain
/// Bearer challenge unless a DPoP matter (`why`) is the reason.
fn invalid_token(scheme: Option<Scheme>, why: Option<&str>) -> Route {
    let challenge = match (scheme, why) {
        (Some(Scheme::Dpop), why) => format!(
            "DPoP error=\"invalid_token\", error_description=\"{}\", algs=\"ES256 EdDSA\"",
            why.unwrap_or("token rejected")
        ),
        (_, Some(why)) if scheme == Some(Scheme::Bearer) && why.contains("DPoP") => format!(
            "Bearer realm=\"payments\", error=\"invalid_token\", error_description=\"{why}\""
        ),
        _ => "Bearer realm=\"payments\", error=\"invalid_token\"".to_owned(),
    };
    Route::Unauthorized(challenge, "invalid_token")
}

/// The DPoP checks of a request that presented `token` with the DPoP scheme
/// (RFC 9449 §7.1): its one proof, then the token's binding to the proof's
/// key. The thumbprint of that key when all pass; the 401 otherwise.
fn dpop_verdict(
    state: &mut ApiState,
    parts: &http::request::Parts,
    path: &str,
    token: &str,
    binding: Option<&str>,
) -> Result<Option<String>, Route> {
    let refuse = |state: &mut ApiState, error: &'static str, why: &str| {
        state.counts.rejected += 1;
        Err(Route::Unauthorized(
            format!("DPoP error=\"{error}\", error_description=\"{why}\", algs=\"ES256 EdDSA\""),
            error,
        ))
    };
    let mut proofs = parts.headers.get_all(dpop::HEADER).iter();
    let proof = match (proofs.next(), proofs.next()) {
        (Some(one), None) => one.to_str().ok(),
        _ => None,
    };
    let Some(proof) = proof else {
        return refuse(state, "invalid_dpop_proof", "one DPoP proof is required");
    };
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let htu = format!("http://{host}{path}");
    let ath = dpop::sha256_b64(token.as_bytes());
    let nonce = state.dpop_nonce.clone();
    let expected = Expected {
        htm: parts.method.as_str(),
        htu: &htu,
        ath: Some(&ath),
        nonces: nonce.as_ref().map(std::slice::from_ref),
    };
    let passed = match dpop::check(proof, &expected, &mut state.seen) {
        Ok(passed) => passed,
        Err(Refused::NeedsNonce) => {
            state.counts.nonce_challenges += 1;
            return refuse(
                state,
                "use_dpop_nonce",
                "Resource server requires nonce in DPoP proof",
            );
        }
        Err(refused) => {
            if refused == Refused::Replayed {
                state.counts.replayed += 1;
            }
            return refuse(state, "invalid_dpop_proof", &refused.description());
        }
    };
    match binding {
        // Unbound, or not a live token: decided by the caller.
        None => Ok(None),
        Some(jkt) if jkt == passed.jkt => Ok(Some(passed.jkt)),
        Some(_) => refuse(state, "invalid_token", "token is bound to another key"),
    }
}

/// The route of an authorized request.
fn route(method: &Method, path: &str, query: Option<&str>) -> Route {
    if path == "/slow" && (method == Method::GET || method == Method::HEAD) {
        return match query_param(query, "ms").map(|ms| ms.parse::<u64>()) {
            None => Route::Slow(Duration::ZERO),
            Some(Ok(ms)) => Route::Slow(Duration::from_millis(ms)),
            Some(Err(_)) => Route::BadRequest("ms must be a whole number of milliseconds"),
        };
    }
    if path == "/big" && method == Method::GET {
        return match query_param(query, "bytes").map(|n| n.parse::<u64>()) {
            None => Route::Big(0),
            Some(Ok(n)) => Route::Big(n),
            Some(Err(_)) => Route::BadRequest("bytes must be a whole number"),
        };
    }
    if let Some(code) = path.strip_prefix("/status/") {
        return match code.parse::<u16>().ok().filter(|c| (200..=599).contains(c)) {
            Some(code) => StatusCode::from_u16(code)
                .map(Route::Status)
                .unwrap_or(Route::BadRequest("status must be 200..=599")),
            None => Route::BadRequest("status must be 200..=599"),
        };
    }
    if method == Method::POST && path.ends_with("payments") {
        Route::Echo(StatusCode::CREATED)
    } else {
        Route::Echo(StatusCode::OK)
    }
}

/// The page a browser lands on after a connect session, from the outcome in `query`.
fn connected_page(query: Option<&str>) -> Response<MockBody> {
    let subject = query_param(query, "subject").unwrap_or_default();
    let subject = html_escape(&subject);
    let (title, text) = match query_param(query, "status").as_deref() {
        Some("connected") => (
            format!("{subject} is connected"),
            format!(
                "tokenproxy now holds {subject}'s tokens: requests that name \
                 <code>x-tokenproxy-subject: {subject}</code> carry them. You can close this page."
            ),
        ),
        _ => (
            format!("{subject} was not connected"),
            format!(
                "The sign-in ended with <code>{}</code>. Ask for a new link and try again.",
                html_escape(&query_param(query, "error").unwrap_or_else(|| "no outcome".into()))
            ),
        ),
    };
    let page = format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>{title}</title>\n</head>\n<body>\n<h1>{title}</h1>\n<p>{text}</p>\n</body>\n</html>\n"
    );
    let mut response = Response::new(full(page));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert("x-mock-api", HeaderValue::from_static("1"));
    response
}

fn echo_response(
    status: StatusCode,
    parts: &http::request::Parts,
    path: &str,
    query: &Option<String>,
    body: &Bytes,
    token_serial: Option<u64>,
) -> Response<MockBody> {
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let value = if name == header::AUTHORIZATION {
            "<elided>".to_owned()
        } else {
            parts
                .headers
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect::<Vec<_>>()
                .join(", ")
        };
        headers.insert(name.as_str().to_owned(), json!(value));
    }
    let body = json!({
        "ok": true,
        "method": parts.method.as_str(),
        "path": path,
        "query": query,
        "token_serial": token_serial,
        "headers": headers,
        "body": String::from_utf8_lossy(body),
        "payments": [
            {"id": "pay_0001", "amount": 1250, "currency": "EUR", "status": "settled"}
        ],
    });
    json_response(status, &body)
}

/// A body of `remaining` bytes generated in 64 KiB chunks as hyper asks for them.
struct BigBody {
    remaining: u64,
}

impl Body for BigBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let len = usize::try_from(self.remaining).map_or(CHUNK, |r| r.min(CHUNK));
        self.remaining -= len as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; len])))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dpop::test_key::TestKey;
    use crate::test_support::{client, send, Reply};
    use crate::{MockProvider, ProviderConfig};
    use http_body_util::Full;

    /// A provider, an API in front of its validator, and one fresh token.
    async fn setup() -> (MockProvider, MockApi, String) {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        let api = MockApi::start(provider.validator())
            .await
            .expect("the mock API should start");
        let req = Request::post(provider.token_url())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from_static(
                b"grant_type=client_credentials&client_id=demo-client&client_secret=demo-secret",
            )))
            .expect("valid request");
        let reply = send(&client(), req).await;
        let token = reply.json()["access_token"]
            .as_str()
            .expect("the provider should issue a token")
            .to_owned();
        (provider, api, token)
    }

    async fn call(api: &MockApi, method: Method, path: &str, token: Option<&str>) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", api.url()));
        if let Some(token) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .header("x-app", "legacy")
            .body(Full::new(Bytes::from_static(b"{\"amount\":1250}")))
            .expect("valid request");
        send(&client(), req).await
    }

    /// A token bound to `key` by a proof at the provider.
    async fn bound_token(provider: &MockProvider, key: &TestKey) -> String {
        let proof = key.proof("POST", &provider.token_url(), None, None);
        let req = Request::post(provider.token_url())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header("dpop", proof)
            .body(Full::new(Bytes::from_static(
                b"grant_type=client_credentials&client_id=demo-client&client_secret=demo-secret",
            )))
            .expect("valid request");
        let reply = send(&client(), req).await;
        assert_eq!(reply.json()["token_type"], "DPoP");
        reply.json()["access_token"]
            .as_str()
            .expect("a token")
            .to_owned()
    }

    /// `GET path` with `Authorization: DPoP token` and `proof`.
    async fn dpop_call(api: &MockApi, path: &str, token: &str, proof: &str) -> Reply {
        let req = Request::get(format!("{}{path}", api.url()))
            .header(header::AUTHORIZATION, format!("DPoP {token}"))
            .header("dpop", proof)
            .body(Full::new(Bytes::new()))
            .expect("valid request");
        send(&client(), req).await
    }

    fn challenge(reply: &Reply) -> String {
        reply.headers[header::WWW_AUTHENTICATE]
            .to_str()
            .expect("text")
            .to_owned()
    }

    #[tokio::test]
    async fn a_bound_token_passes_with_a_fresh_proof_of_its_key_only() {
        let (provider, api, bearer) = setup().await;
        let key = TestKey::new();
        let token = bound_token(&provider, &key).await;
        let htu = format!("{}/v1/payments", api.url());
        let proof = key.proof("GET", &htu, Some(&token), None);
        let ok = dpop_call(&api, "/v1/payments?page=2", &token, &proof).await;
        assert_eq!(
            ok.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&ok.body)
        );
        assert_eq!(api.recorded()[0].dpop_jkt, Some(key.jkt()));

        let replayed = dpop_call(&api, "/v1/payments", &token, &proof).await;
        assert_eq!(replayed.status, StatusCode::UNAUTHORIZED);
        assert!(
            challenge(&replayed).contains("replayed"),
            "{}",
            challenge(&replayed)
        );

        let cases = [
            ("htm", key.proof("POST", &htu, Some(&token), None)),
            (
                "htu",
                key.proof(
                    "GET",
                    &format!("{}/v1/other", api.url()),
                    Some(&token),
                    None,
                ),
            ),
            (
                "query in htu",
                key.proof("GET", &format!("{htu}?page=2"), Some(&token), None),
            ),
            ("ath", key.proof("GET", &htu, Some("another token"), None)),
            ("no ath", key.proof("GET", &htu, None, None)),
        ];
        for (what, proof) in cases {
            let reply = dpop_call(&api, "/v1/payments", &token, &proof).await;
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{what}");
            assert!(
                challenge(&reply).contains("invalid_dpop_proof"),
                "{what}: {}",
                challenge(&reply)
            );
        }
        let stranger = TestKey::new();
        let foreign = stranger.proof("GET", &htu, Some(&token), None);
        let reply = dpop_call(&api, "/v1/payments", &token, &foreign).await;
        assert!(
            challenge(&reply).starts_with("DPoP error=\"invalid_token\""),
            "another key"
        );

        let as_bearer = call(&api, Method::GET, "/v1/payments", Some(&token)).await;
        assert_eq!(as_bearer.status, StatusCode::UNAUTHORIZED);
        assert!(challenge(&as_bearer).contains("presented as a Bearer token"));
        let unbound = key.proof("GET", &htu, Some(&bearer), None);
        let reply = dpop_call(&api, "/v1/payments", &bearer, &unbound).await;
        assert!(
            challenge(&reply).contains("not DPoP-bound"),
            "{}",
            challenge(&reply)
        );
        assert_eq!(
            api.dpop_counts(),
            DpopCounts {
                ok: 1,
                rejected: 9,
                replayed: 1,
                nonce_challenges: 0,
                bound_as_bearer: 1,
            }
        );
    }

    #[tokio::test]
    async fn a_demanded_nonce_comes_with_every_answer_and_must_be_in_the_proof() {
        let (provider, api, _) = setup().await;
        let key = TestKey::new();
        let token = bound_token(&provider, &key).await;
        api.set_dpop_nonce(Some("api-1"));
        let htu = format!("{}/v1/payments", api.url());
        let without = dpop_call(
            &api,
            "/v1/payments",
            &token,
            &key.proof("GET", &htu, Some(&token), None),
        )
        .await;
        assert_eq!(without.status, StatusCode::UNAUTHORIZED);
        assert!(challenge(&without).contains("use_dpop_nonce"));
        assert_eq!(without.headers["dpop-nonce"], "api-1");
        let with = dpop_call(
            &api,
            "/v1/payments",
            &token,
            &key.proof("GET", &htu, Some(&token), Some("api-1")),
        )
        .await;
        assert_eq!(with.status, StatusCode::OK);
        assert_eq!(with.headers["dpop-nonce"], "api-1");
        assert_eq!(api.dpop_counts().nonce_challenges, 1);
    }

    #[tokio::test]
    async fn fresh_token_is_accepted_and_echoed() {
        let (_provider, api, token) = setup().await;
        let reply = call(&api, Method::GET, "/v1/balance?currency=EUR", Some(&token)).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "a fresh token should be accepted"
        );
        assert_eq!(reply.headers["x-mock-api"], "1");
        let body = reply.json();
        assert_eq!(body["ok"], true);
        assert_eq!(body["method"], "GET");
        assert_eq!(body["path"], "/v1/balance");
        assert_eq!(body["query"], "currency=EUR");
        assert_eq!(body["token_serial"], 1);
        assert_eq!(body["headers"]["authorization"], "<elided>");
        assert_eq!(body["headers"]["x-app"], "legacy");
        assert_eq!(body["body"], "{\"amount\":1250}");
        assert_eq!(body["payments"][0]["id"], "pay_0001");
        assert!(
            !reply
                .body
                .windows(token.len())
                .any(|w| w == token.as_bytes()),
            "the echo must not contain the token"
        );

        let recorded = api.recorded();
        assert_eq!(api.requests(), 1);
        assert_eq!(recorded[0].token_serial, Some(1));
        assert_eq!(recorded[0].status, 200);
        assert_eq!(recorded[0].query.as_deref(), Some("currency=EUR"));
        assert_eq!(&recorded[0].body[..], b"{\"amount\":1250}");
    }

    #[tokio::test]
    async fn post_to_payments_is_201() {
        let (_provider, api, token) = setup().await;
        let reply = call(&api, Method::POST, "/v1/payments", Some(&token)).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert_eq!(reply.json()["method"], "POST");
    }

    #[tokio::test]
    async fn unknown_or_missing_token_is_401_invalid_token() {
        let (_provider, api, _token) = setup().await;
        for token in [Some("not-a-token"), None] {
            let reply = call(&api, Method::GET, "/v1/balance", token).await;
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "token {token:?}");
            assert_eq!(
                reply.headers[header::WWW_AUTHENTICATE],
                "Bearer realm=\"payments\", error=\"invalid_token\""
            );
            assert_eq!(reply.json()["error"], "invalid_token");
            assert_eq!(reply.headers["x-mock-api"], "1");
        }
        let recorded = api.recorded();
        assert_eq!(recorded.len(), 2, "rejected requests are recorded");
        assert!(recorded
            .iter()
            .all(|r| r.status == 401 && r.token_serial.is_none()));
    }

    #[tokio::test]
    async fn the_connected_page_needs_no_token_escapes_the_outcome_and_is_not_recorded() {
        let (_provider, api, _token) = setup().await;
        let reply = call(
            &api,
            Method::GET,
            "/connected/?subject=merchant-a&status=connected",
            None,
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "the page needs no token");
        let page = String::from_utf8_lossy(&reply.body).into_owned();
        assert!(
            page.contains("<h1>merchant-a is connected</h1>"),
            "the page names the connected merchant: {page}"
        );
        let reply = call(
            &api,
            Method::GET,
            "/connected?subject=%3Cb%3E&status=error&error=access_denied",
            None,
        )
        .await;
        let page = String::from_utf8_lossy(&reply.body).into_owned();
        assert!(
            page.contains("&lt;b&gt; was not connected") && page.contains("access_denied"),
            "an error outcome is shown, escaped: {page}"
        );
        assert!(!page.contains("<b>"), "query text must be escaped: {page}");
        assert_eq!(api.requests(), 0, "the page is not an API request");
    }

    #[tokio::test]
    async fn reject_next_rejects_exactly_n_requests() {
        let (_provider, api, token) = setup().await;
        api.reject_next(2);
        let statuses = [
            call(&api, Method::GET, "/v1/a", Some(&token)).await.status,
            call(&api, Method::GET, "/v1/b", Some(&token)).await.status,
            call(&api, Method::GET, "/v1/c", Some(&token)).await.status,
        ];
        assert_eq!(
            statuses,
            [
                StatusCode::UNAUTHORIZED,
                StatusCode::UNAUTHORIZED,
                StatusCode::OK
            ],
            "only the next two requests should be rejected"
        );
        let recorded = api.recorded();
        assert_eq!(
            recorded[0].token_serial,
            Some(1),
            "the token itself was valid"
        );
        assert_eq!(recorded[0].status, 401);
        assert_eq!(recorded[2].status, 200);
    }

    #[tokio::test]
    async fn big_streams_exactly_n_bytes() {
        let (_provider, api, token) = setup().await;
        let n = 3 * CHUNK + 123;
        let reply = call(&api, Method::GET, &format!("/big?bytes={n}"), Some(&token)).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(
            reply.headers[header::CONTENT_TYPE],
            "application/octet-stream"
        );
        assert_eq!(reply.body.len(), n, "/big should send exactly N bytes");
    }

    #[tokio::test]
    async fn big_body_yields_64_kib_chunks() {
        let mut body = BigBody {
            remaining: (CHUNK + 10) as u64,
        };
        assert_eq!(body.size_hint().exact(), Some((CHUNK + 10) as u64));
        let first = body.frame().await.expect("a frame").expect("infallible");
        assert_eq!(first.data_ref().map(Bytes::len), Some(CHUNK));
        let second = body.frame().await.expect("a frame").expect("infallible");
        assert_eq!(second.data_ref().map(Bytes::len), Some(10));
        assert!(body.frame().await.is_none(), "then the body ends");
    }

    #[tokio::test]
    async fn status_route_answers_that_status() {
        let (_provider, api, token) = setup().await;
        let reply = call(&api, Method::DELETE, "/status/503", Some(&token)).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.json(), json!({"status": 503}));
        let reply = call(&api, Method::GET, "/status/abc", Some(&token)).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "malformed input is a 400"
        );
        let reply = call(&api, Method::GET, "/slow?ms=soon", Some(&token)).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "malformed input is a 400"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn slow_waits_before_answering() {
        let (_provider, api, token) = setup().await;
        let started = tokio::time::Instant::now();
        let reply = call(&api, Method::GET, "/slow?ms=1500", Some(&token)).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(
            started.elapsed() >= Duration::from_millis(1500),
            "/slow should wait ms before answering"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn expired_token_is_rejected_after_its_lifetime() {
        let (provider, api, token) = setup().await;
        let validator = provider.validator();
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(validator.check(&token), None, "the token expired at 20 s");
        let reply = call(&api, Method::GET, "/v1/balance", Some(&token)).await;
        assert_eq!(
            reply.status,
            StatusCode::UNAUTHORIZED,
            "the API rejects it too"
        );
    }
}
