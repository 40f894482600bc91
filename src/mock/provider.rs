//! The mock OAuth2 provider: an RFC 6749 token endpoint with counters and injectable faults.
//!
//! It issues opaque random access tokens recorded in a table that [`TokenValidator`] shares
//! with the mock API, so the API accepts exactly the tokens this provider issued and still
//! considers live. Refresh tokens optionally rotate; presenting a rotated-away one is
//! counted, because the OAuth 2.0 Security BCP lets a real provider revoke the whole token
//! family when that happens.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::Instant;

use super::{form_decode, full, json_response, lock, Closed, MockBody, Server, Shutdown};

/// Path of the token endpoint.
const TOKEN_PATH: &str = "/oauth2/token";

/// The largest token request body the mock reads.
const MAX_BODY: usize = 64 * 1024;

/// How the mock provider behaves when nothing is injected.
#[derive(Clone, Debug)]
pub struct ProviderConfig {
    /// The one client the provider knows (default `demo-client`).
    pub client_id: String,
    /// That client's secret (default `demo-secret`).
    pub client_secret: String,
    /// Access token lifetime (default 20 s); `expires_in` states it in whole seconds.
    pub lifetime: Duration,
    /// Whether grants also return a refresh token (default false).
    pub refresh_tokens: bool,
    /// Whether each refresh returns a new refresh token and kills the old one (default true);
    /// when false, a refresh answers without a refresh token and the old one stays valid.
    pub rotate_refresh_tokens: bool,
    /// Username/password pairs accepted by the password grant.
    pub users: Vec<(String, String)>,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        ProviderConfig {
            client_id: "demo-client".to_owned(),
            client_secret: "demo-secret".to_owned(),
            lifetime: Duration::from_secs(20),
            refresh_tokens: false,
            rotate_refresh_tokens: true,
            users: vec![("alice".to_owned(), "alice-password".to_owned())],
        }
    }
}

/// What the token endpoint does instead of answering normally.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    /// Answer normally.
    #[default]
    None,
    /// Answer with this status, body and content type (and `Retry-After` seconds, if set),
    /// e.g. a 500 HTML page or a 400 `{"error":"invalid_grant"}`; nothing is issued.
    Status {
        /// HTTP status code (an invalid one becomes 500).
        status: u16,
        /// Response body.
        body: String,
        /// `Content-Type` of the body.
        content_type: &'static str,
        /// `Retry-After` header value in seconds.
        retry_after: Option<u64>,
    },
    /// Process the request at once but send the answer only after this delay, like a provider
    /// whose response is slow to come back: a client that gives up meanwhile has still
    /// consumed (rotated) its refresh token.
    Delay(Duration),
    /// Accept the request and never answer (until the mock is dropped, which closes the
    /// connection); nothing is issued.
    Hang,
    /// Answer 200 `application/json` with a truncated JSON body; nothing is issued.
    Garbage,
}

/// What one token request looked like, as the provider received it.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    /// Request headers.
    pub headers: HeaderMap,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// Body parameters, in order: form pairs, or a JSON object's members flattened to strings.
    pub params: Vec<(String, String)>,
    /// HTTP Basic client credentials, base64- and then form-urlencoding-decoded.
    pub basic_auth: Option<(String, String)>,
}

impl TokenRequest {
    /// The first body parameter named `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Checks access tokens against those the provider issued; cheap to clone.
#[derive(Clone)]
pub struct TokenValidator {
    table: Arc<Mutex<TokenTable>>,
}

impl std::fmt::Debug for TokenValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenValidator").finish_non_exhaustive()
    }
}

impl TokenValidator {
    /// The token's serial number while it is issued, not revoked and younger than its lifetime.
    pub fn check(&self, token: &str) -> Option<u64> {
        let table = lock(&self.table);
        let issued = table.tokens.get(token)?;
        (issued.issued_at.elapsed() < issued.lifetime).then_some(issued.serial)
    }
}

/// Issued access tokens.
#[derive(Default)]
struct TokenTable {
    tokens: HashMap<String, Issued>,
    last_serial: u64,
}

struct Issued {
    serial: u64,
    issued_at: Instant,
    lifetime: Duration,
}

impl TokenTable {
    /// Records a new access token and returns it.
    fn issue(&mut self, lifetime: Duration) -> String {
        let now = Instant::now();
        // Forget expired tokens so a long demo does not grow the table without bound.
        self.tokens
            .retain(|_, issued| now.duration_since(issued.issued_at) < issued.lifetime);
        self.last_serial += 1;
        let token = random_token();
        self.tokens.insert(
            token.clone(),
            Issued {
                serial: self.last_serial,
                issued_at: now,
                lifetime,
            },
        );
        token
    }
}

/// State of a refresh token the provider issued.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RefreshState {
    Live,
    /// Replaced by rotation; presenting it again is reuse.
    Rotated,
}

/// Counters and injected behaviour.
#[derive(Default)]
struct ProviderState {
    fault: Fault,
    token_requests: usize,
    grants: HashMap<String, usize>,
    refresh_token_reuse: usize,
    last_request: Option<TokenRequest>,
    refresh_tokens: HashMap<String, RefreshState>,
}

struct Shared {
    config: ProviderConfig,
    state: Mutex<ProviderState>,
    table: Arc<Mutex<TokenTable>>,
}

/// A running mock OAuth2 provider on loopback; stops when dropped.
pub struct MockProvider {
    shared: Arc<Shared>,
    server: Server,
}

impl std::fmt::Debug for MockProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockProvider")
            .field("addr", &self.server.addr())
            .finish_non_exhaustive()
    }
}

impl MockProvider {
    /// Binds 127.0.0.1:0 and starts serving.
    pub async fn start(config: ProviderConfig) -> std::io::Result<MockProvider> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::start_on(listener, config).await
    }

    /// Starts serving on an already bound listener.
    pub async fn start_on(
        listener: TcpListener,
        config: ProviderConfig,
    ) -> std::io::Result<MockProvider> {
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(ProviderState::default()),
            table: Arc::new(Mutex::new(TokenTable::default())),
        });
        let handler_shared = shared.clone();
        let server = Server::start(listener, "provider", move |req, shutdown| {
            handle(handler_shared.clone(), req, shutdown)
        })?;
        Ok(MockProvider { shared, server })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// The token endpoint URL, `http://127.0.0.1:PORT/oauth2/token`.
    pub fn token_url(&self) -> String {
        format!("http://{}{TOKEN_PATH}", self.addr())
    }

    /// Makes the token endpoint misbehave from the next request on (`Fault::None` restores it).
    pub fn set_fault(&self, fault: Fault) {
        self.state().fault = fault;
    }

    /// Every POST to the token path so far, whatever its outcome.
    pub fn token_requests(&self) -> usize {
        self.state().token_requests
    }

    /// Token requests so far whose `grant_type` was `grant`, whatever their outcome.
    pub fn grant_requests(&self, grant: &str) -> usize {
        self.state().grants.get(grant).copied().unwrap_or(0)
    }

    /// Refresh grants that presented an already rotated (dead) refresh token.
    pub fn refresh_token_reuse(&self) -> usize {
        self.state().refresh_token_reuse
    }

    /// What the last token request looked like.
    pub fn last_request(&self) -> Option<TokenRequest> {
        self.state().last_request.clone()
    }

    /// A validator for the access tokens this provider issues, for [`super::MockApi`].
    pub fn validator(&self) -> TokenValidator {
        TokenValidator {
            table: self.shared.table.clone(),
        }
    }

    /// Issues a live refresh token without a token request, as if a person had
    /// authorized once (a bootstrap `refresh_token` for tests and the demo).
    pub fn issue_refresh_token(&self) -> String {
        let fresh = random_token();
        self.state()
            .refresh_tokens
            .insert(fresh.clone(), RefreshState::Live);
        fresh
    }

    /// Invalidates every access token issued so far (the API answers 401 to them).
    pub fn revoke_all(&self) {
        lock(&self.shared.table).tokens.clear();
    }

    fn state(&self) -> MutexGuard<'_, ProviderState> {
        lock(&self.shared.state)
    }
}

/// 32 random characters from the URL-safe base64 alphabet.
fn random_token() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    (0..32)
        .map(|_| char::from(ALPHABET[fastrand::usize(..ALPHABET.len())]))
        .collect()
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    shutdown: Shutdown,
) -> Result<Response<MockBody>, Closed> {
    let path = req.uri().path();
    if path == "/healthz" && (req.method() == Method::GET || req.method() == Method::HEAD) {
        return Ok(Response::new(full("ok\n")));
    }
    if path != TOKEN_PATH {
        return Ok(error_response(StatusCode::NOT_FOUND, "not_found", None));
    }
    if req.method() != Method::POST {
        let mut response = error_response(StatusCode::METHOD_NOT_ALLOWED, "invalid_request", None);
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return Ok(response);
    }
    lock(&shared.state).token_requests += 1;

    let (parts, body) = req.into_parts();
    let body = http_body_util::Limited::new(body, MAX_BODY).collect().await;
    let parsed = match body {
        Ok(body) => parse_request(parts.headers, &body.to_bytes()),
        Err(_) => {
            return Ok(error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                Some("request body could not be read"),
            ))
        }
    };

    // Record and count before deciding anything, so faulted requests show up too.
    let fault = {
        let mut state = lock(&shared.state);
        state.last_request = Some(parsed.request.clone());
        if let Some(grant) = parsed.request.param("grant_type") {
            *state.grants.entry(grant.to_owned()).or_default() += 1;
        }
        state.fault.clone()
    };

    match fault {
        Fault::None => Ok(answer(&shared, &parsed)),
        Fault::Status {
            status,
            body,
            content_type,
            retry_after,
        } => {
            let mut response = Response::new(full(body));
            *response.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let headers = response.headers_mut();
            if let Ok(value) = HeaderValue::from_str(content_type) {
                headers.insert(header::CONTENT_TYPE, value);
            }
            if let Some(seconds) = retry_after {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            }
            Ok(response)
        }
        Fault::Delay(delay) => {
            let response = answer(&shared, &parsed);
            tokio::time::sleep(delay).await;
            Ok(response)
        }
        Fault::Hang => {
            shutdown.wait().await;
            Err(Closed)
        }
        Fault::Garbage => {
            let mut response = Response::new(full(r#"{"access_token":"tr"#));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Ok(response)
        }
    }
}

/// A token request after parsing, or the reason it could not be parsed.
struct ParsedRequest {
    request: TokenRequest,
    /// Set when the body or `Authorization` header was malformed.
    malformed: Option<&'static str>,
    /// `Authorization` was present but was not usable Basic credentials.
    bad_basic: bool,
}

fn parse_request(headers: HeaderMap, body: &Bytes) -> ParsedRequest {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    let mut malformed = None;
    let media_type = content_type
        .as_deref()
        .and_then(|ct| ct.split(';').next())
        .map(|ct| ct.trim().to_ascii_lowercase());
    let params = match media_type.as_deref() {
        Some(mt) if mt == "application/json" || mt.ends_with("+json") => match flatten_json(body) {
            Some(params) => params,
            None => {
                malformed = Some("body is not a JSON object");
                Vec::new()
            }
        },
        None | Some("application/x-www-form-urlencoded") => form_urlencoded::parse(body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect(),
        Some(_) => {
            malformed = Some("unsupported content type");
            Vec::new()
        }
    };
    let (basic_auth, bad_basic) = match headers.get(header::AUTHORIZATION) {
        None => (None, false),
        Some(value) => match decode_basic(value) {
            Some(credentials) => (Some(credentials), false),
            None => (None, true),
        },
    };
    ParsedRequest {
        request: TokenRequest {
            headers,
            content_type,
            params,
            basic_auth,
        },
        malformed,
        bad_basic,
    }
}

/// A JSON object's members as strings (nested values as JSON text, nulls skipped).
fn flatten_json(body: &[u8]) -> Option<Vec<(String, String)>> {
    let object = match serde_json::from_slice::<serde_json::Value>(body).ok()? {
        serde_json::Value::Object(object) => object,
        _ => return None,
    };
    Some(
        object
            .into_iter()
            .filter_map(|(key, value)| match value {
                serde_json::Value::Null => None,
                serde_json::Value::String(s) => Some((key, s)),
                other => Some((key, other.to_string())),
            })
            .collect(),
    )
}

/// RFC 6749 §2.3.1: `Basic base64(urlencode(id) ":" urlencode(secret))`.
fn decode_basic(value: &HeaderValue) -> Option<(String, String)> {
    let value = value.to_str().ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((form_decode(id), form_decode(secret)))
}

/// The normal answer to a parsed token request; issues tokens on success.
fn answer(shared: &Shared, parsed: &ParsedRequest) -> Response<MockBody> {
    let config = &shared.config;
    let request = &parsed.request;

    let credentials = match (&request.basic_auth, parsed.bad_basic) {
        (Some((id, secret)), _) => Some((id.as_str(), secret.as_str())),
        (None, true) => None,
        (None, false) => request.param("client_id").map(|id| {
            let secret = request.param("client_secret").unwrap_or_default();
            (id, secret)
        }),
    };
    if credentials != Some((config.client_id.as_str(), config.client_secret.as_str())) {
        return invalid_client();
    }
    if let Some(problem) = parsed.malformed {
        return error_response(StatusCode::BAD_REQUEST, "invalid_request", Some(problem));
    }

    let refresh_token = match request.param("grant_type") {
        Some("client_credentials") => None,
        Some("password") => {
            let (Some(username), Some(password)) =
                (request.param("username"), request.param("password"))
            else {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    Some("username and password are required"),
                );
            };
            let known = config
                .users
                .iter()
                .any(|(u, p)| u.as_str() == username && p.as_str() == password);
            if !known {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    Some("Invalid credentials given."),
                );
            }
            None
        }
        Some("refresh_token") => {
            let Some(presented) = request.param("refresh_token") else {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    Some("refresh_token is required"),
                );
            };
            Some(presented)
        }
        Some(_) => {
            return error_response(StatusCode::BAD_REQUEST, "unsupported_grant_type", None);
        }
        None => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                Some("grant_type is required"),
            );
        }
    };

    // Decide the refresh token to return (if any) under the state lock, so two concurrent
    // refreshes with one rotating token cannot both succeed.
    let new_refresh = {
        let mut state = lock(&shared.state);
        match refresh_token {
            Some(presented) => match state.refresh_tokens.get(presented).copied() {
                Some(RefreshState::Live) if config.rotate_refresh_tokens => {
                    state
                        .refresh_tokens
                        .insert(presented.to_owned(), RefreshState::Rotated);
                    let fresh = random_token();
                    state
                        .refresh_tokens
                        .insert(fresh.clone(), RefreshState::Live);
                    Some(fresh)
                }
                Some(RefreshState::Live) => None,
                dead => {
                    if dead == Some(RefreshState::Rotated) {
                        state.refresh_token_reuse += 1;
                    }
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        Some("refresh token is invalid"),
                    );
                }
            },
            None if config.refresh_tokens => {
                let fresh = random_token();
                state
                    .refresh_tokens
                    .insert(fresh.clone(), RefreshState::Live);
                Some(fresh)
            }
            None => None,
        }
    };

    let access_token = lock(&shared.table).issue(config.lifetime);
    let mut body = json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": config.lifetime.as_secs(),
    });
    if let Some(refresh) = new_refresh {
        body["refresh_token"] = json!(refresh);
    }
    if let Some(scope) = request.param("scope") {
        body["scope"] = json!(scope);
    }
    let mut response = json_response(StatusCode::OK, &body);
    no_store(response.headers_mut());
    response
}

/// RFC 6749 §5.2 error response.
fn error_response(
    status: StatusCode,
    error: &str,
    description: Option<&str>,
) -> Response<MockBody> {
    let mut body = json!({ "error": error });
    if let Some(description) = description {
        body["error_description"] = json!(description);
    }
    let mut response = json_response(status, &body);
    no_store(response.headers_mut());
    response
}

fn invalid_client() -> Response<MockBody> {
    let mut response = error_response(StatusCode::UNAUTHORIZED, "invalid_client", None);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"mock\""),
    );
    response
}

/// RFC 6749 §5.1: token responses must not be cached.
fn no_store(headers: &mut HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::test_support::{client, send, Reply};
    use http_body_util::Full;

    const CREDS: (&str, &str) = ("demo-client", "demo-secret");

    fn basic(id: &str, secret: &str) -> String {
        let raw = format!(
            "{}:{}",
            form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>(),
            form_urlencoded::byte_serialize(secret.as_bytes()).collect::<String>()
        );
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    fn form(pairs: &[(&str, &str)]) -> String {
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish()
    }

    async fn post_form(
        provider: &MockProvider,
        auth: Option<(&str, &str)>,
        pairs: &[(&str, &str)],
    ) -> Reply {
        let mut req = Request::post(provider.token_url())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some((id, secret)) = auth {
            req = req.header(header::AUTHORIZATION, basic(id, secret));
        }
        let req = req
            .body(Full::new(Bytes::from(form(pairs))))
            .expect("valid request");
        send(&client(), req).await
    }

    async fn post_json(provider: &MockProvider, body: serde_json::Value) -> Reply {
        let req = Request::post(provider.token_url())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("valid request");
        send(&client(), req).await
    }

    fn access_token(reply: &Reply) -> String {
        reply.json()["access_token"]
            .as_str()
            .expect("response should carry an access_token")
            .to_owned()
    }

    #[tokio::test]
    async fn client_credentials_with_basic_auth_and_form_body_issues_a_token() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        let reply = post_form(
            &provider,
            Some(CREDS),
            &[("grant_type", "client_credentials"), ("scope", "payments")],
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "a valid grant should succeed");
        assert_eq!(reply.headers[header::CACHE_CONTROL], "no-store");
        let body = reply.json();
        let token = access_token(&reply);
        assert_eq!(token.len(), 32);
        assert!(token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 20);
        assert_eq!(body["scope"], "payments", "the requested scope is echoed");
        assert!(
            body.get("refresh_token").is_none(),
            "refresh tokens are off"
        );
        assert_eq!(provider.validator().check(&token), Some(1));
        assert_eq!(provider.token_requests(), 1);
        assert_eq!(provider.grant_requests("client_credentials"), 1);
        let last = provider.last_request().expect("request was recorded");
        assert_eq!(
            last.basic_auth,
            Some(("demo-client".to_owned(), "demo-secret".to_owned()))
        );
        assert_eq!(
            last.content_type.as_deref(),
            Some("application/x-www-form-urlencoded")
        );
    }

    #[tokio::test]
    async fn basic_credentials_are_form_urlencoded_before_base64() {
        let config = ProviderConfig {
            client_id: "id with:colon".to_owned(),
            client_secret: "s3cr+t/=&%".to_owned(),
            ..ProviderConfig::default()
        };
        let provider = MockProvider::start(config)
            .await
            .expect("the mock provider should start");
        let reply = post_form(
            &provider,
            Some(("id with:colon", "s3cr+t/=&%")),
            &[("grant_type", "client_credentials")],
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "RFC 6749 §2.3.1 encoding should be decoded"
        );
    }

    #[tokio::test]
    async fn client_credentials_in_a_json_body_issue_a_token() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        let reply = post_json(
            &provider,
            json!({"grant_type": "client_credentials", "client_id": CREDS.0, "client_secret": CREDS.1}),
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "JSON body auth should succeed"
        );
        let token = access_token(&reply);
        assert_eq!(provider.validator().check(&token), Some(1));
        let last = provider.last_request().expect("request was recorded");
        assert_eq!(last.param("client_id"), Some("demo-client"));
        assert_eq!(last.basic_auth, None);
    }

    #[tokio::test]
    async fn client_credentials_in_a_form_body_issue_a_token() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        let reply = post_form(
            &provider,
            None,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", CREDS.0),
                ("client_secret", CREDS.1),
            ],
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "form body auth should succeed"
        );
        let second = post_form(
            &provider,
            None,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", CREDS.0),
                ("client_secret", CREDS.1),
            ],
        )
        .await;
        let validator = provider.validator();
        assert_eq!(validator.check(&access_token(&reply)), Some(1));
        assert_eq!(
            validator.check(&access_token(&second)),
            Some(2),
            "serials increase and older tokens stay valid"
        );
    }

    #[tokio::test]
    async fn wrong_or_missing_client_secret_is_invalid_client() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        let wrong = post_form(
            &provider,
            Some(("demo-client", "nope")),
            &[("grant_type", "client_credentials")],
        )
        .await;
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
        assert_eq!(wrong.json()["error"], "invalid_client");
        assert_eq!(
            wrong.headers[header::WWW_AUTHENTICATE],
            "Basic realm=\"mock\""
        );
        let missing = post_form(&provider, None, &[("grant_type", "client_credentials")]).await;
        assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
        assert_eq!(missing.json()["error"], "invalid_client");
        assert_eq!(provider.token_requests(), 2, "failed requests count too");
        assert_eq!(provider.grant_requests("client_credentials"), 2);
    }

    #[tokio::test]
    async fn unsupported_grant_and_malformed_json_are_400() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        let reply = post_form(&provider, Some(CREDS), &[("grant_type", "implicit")]).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert_eq!(reply.json()["error"], "unsupported_grant_type");

        let req = Request::post(provider.token_url())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, basic(CREDS.0, CREDS.1))
            .body(Full::new(Bytes::from_static(b"{not json")))
            .expect("valid request");
        let reply = send(&client(), req).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "bad JSON is a 400");
        assert_eq!(reply.json()["error"], "invalid_request");
    }

    #[tokio::test]
    async fn password_grant_checks_the_user() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        let ok = post_form(
            &provider,
            Some(CREDS),
            &[
                ("grant_type", "password"),
                ("username", "alice"),
                ("password", "alice-password"),
            ],
        )
        .await;
        assert_eq!(ok.status, StatusCode::OK, "alice's password is right");
        let bad = post_form(
            &provider,
            Some(CREDS),
            &[
                ("grant_type", "password"),
                ("username", "alice"),
                ("password", "guess"),
            ],
        )
        .await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        assert_eq!(bad.json()["error"], "invalid_grant");
        assert_eq!(provider.grant_requests("password"), 2);
    }

    #[tokio::test]
    async fn rotated_refresh_token_dies_and_its_reuse_is_counted() {
        let config = ProviderConfig {
            refresh_tokens: true,
            ..ProviderConfig::default()
        };
        let provider = MockProvider::start(config)
            .await
            .expect("the mock provider should start");
        let first = post_form(
            &provider,
            Some(CREDS),
            &[("grant_type", "client_credentials")],
        )
        .await;
        let rt1 = first.json()["refresh_token"]
            .as_str()
            .expect("refresh tokens are on")
            .to_owned();

        let refreshed = post_form(
            &provider,
            Some(CREDS),
            &[("grant_type", "refresh_token"), ("refresh_token", &rt1)],
        )
        .await;
        assert_eq!(
            refreshed.status,
            StatusCode::OK,
            "a live refresh token works"
        );
        let rt2 = refreshed.json()["refresh_token"]
            .as_str()
            .expect("rotation returns a new refresh token")
            .to_owned();
        assert_ne!(rt1, rt2);

        let reused = post_form(
            &provider,
            Some(CREDS),
            &[("grant_type", "refresh_token"), ("refresh_token", &rt1)],
        )
        .await;
        assert_eq!(
            reused.status,
            StatusCode::BAD_REQUEST,
            "the old one is dead"
        );
        assert_eq!(reused.json()["error"], "invalid_grant");
        assert_eq!(
            reused.json()["error_description"],
            "refresh token is invalid"
        );
        assert_eq!(provider.refresh_token_reuse(), 1);

        let unknown = post_form(
            &provider,
            Some(CREDS),
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", "never-issued"),
            ],
        )
        .await;
        assert_eq!(unknown.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            provider.refresh_token_reuse(),
            1,
            "an unknown token is not reuse"
        );

        let again = post_form(
            &provider,
            Some(CREDS),
            &[("grant_type", "refresh_token"), ("refresh_token", &rt2)],
        )
        .await;
        assert_eq!(again.status, StatusCode::OK, "the new one works");
        assert_eq!(provider.grant_requests("refresh_token"), 4);
        assert_eq!(provider.token_requests(), 5);
    }

    #[tokio::test]
    async fn without_rotation_refresh_keeps_the_old_refresh_token() {
        let config = ProviderConfig {
            refresh_tokens: true,
            rotate_refresh_tokens: false,
            ..ProviderConfig::default()
        };
        let provider = MockProvider::start(config)
            .await
            .expect("the mock provider should start");
        let first = post_form(
            &provider,
            Some(CREDS),
            &[("grant_type", "client_credentials")],
        )
        .await;
        let rt = first.json()["refresh_token"]
            .as_str()
            .expect("refresh tokens are on")
            .to_owned();
        for _ in 0..2 {
            let reply = post_form(
                &provider,
                Some(CREDS),
                &[("grant_type", "refresh_token"), ("refresh_token", &rt)],
            )
            .await;
            assert_eq!(reply.status, StatusCode::OK, "the refresh token stays live");
            assert!(reply.json().get("refresh_token").is_none());
        }
        assert_eq!(provider.refresh_token_reuse(), 0);
    }

    #[tokio::test]
    async fn status_fault_answers_as_configured_and_issues_nothing() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        provider.set_fault(Fault::Status {
            status: 503,
            body: "<html>down</html>".to_owned(),
            content_type: "text/html",
            retry_after: Some(7),
        });
        let reply = post_form(
            &provider,
            Some(CREDS),
            &[("grant_type", "client_credentials")],
        )
        .await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.headers[header::CONTENT_TYPE], "text/html");
        assert_eq!(reply.headers[header::RETRY_AFTER], "7");
        assert_eq!(&reply.body[..], b"<html>down</html>");
        assert_eq!(provider.token_requests(), 1, "faulted requests are counted");

        provider.set_fault(Fault::None);
        let reply = post_form(
            &provider,
            Some(CREDS),
            &[("grant_type", "client_credentials")],
        )
        .await;
        assert_eq!(
            provider.validator().check(&access_token(&reply)),
            Some(1),
            "the faulted request issued no token"
        );
    }

    #[tokio::test]
    async fn garbage_fault_sends_truncated_json() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        provider.set_fault(Fault::Garbage);
        let reply = post_form(
            &provider,
            Some(CREDS),
            &[("grant_type", "client_credentials")],
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.headers[header::CONTENT_TYPE], "application/json");
        assert!(
            serde_json::from_slice::<serde_json::Value>(&reply.body).is_err(),
            "garbage should not parse"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn delay_fault_answers_normally_after_the_delay() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        provider.set_fault(Fault::Delay(Duration::from_secs(30)));
        let started = Instant::now();
        let reply = post_form(
            &provider,
            Some(CREDS),
            &[("grant_type", "client_credentials")],
        )
        .await;
        assert!(
            started.elapsed() >= Duration::from_secs(30),
            "the answer should come only after the delay"
        );
        assert_eq!(reply.status, StatusCode::OK);
        // The token was issued when the request arrived, 30 s before the answer.
        let token = access_token(&reply);
        assert_eq!(
            provider.validator().check(&token),
            None,
            "20 s lifetime is over"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn hang_fault_never_answers() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        provider.set_fault(Fault::Hang);
        let req = Request::post(provider.token_url())
            .header(header::AUTHORIZATION, basic(CREDS.0, CREDS.1))
            .body(Full::new(Bytes::from_static(
                b"grant_type=client_credentials",
            )))
            .expect("valid request");
        let http = client();
        let outcome = tokio::time::timeout(Duration::from_secs(3600), http.request(req)).await;
        assert!(outcome.is_err(), "a hung provider should never answer");
        assert_eq!(provider.token_requests(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn access_tokens_expire_after_their_lifetime_and_can_be_revoked() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        let reply = post_form(
            &provider,
            Some(CREDS),
            &[("grant_type", "client_credentials")],
        )
        .await;
        let token = access_token(&reply);
        let validator = provider.validator();
        assert_eq!(validator.check(&token), Some(1));
        tokio::time::advance(Duration::from_secs(19)).await;
        assert_eq!(validator.check(&token), Some(1), "still young at 19 s");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(validator.check(&token), None, "expired at 20 s");

        let reply = post_form(
            &provider,
            Some(CREDS),
            &[("grant_type", "client_credentials")],
        )
        .await;
        let token = access_token(&reply);
        assert_eq!(validator.check(&token), Some(2));
        provider.revoke_all();
        assert_eq!(validator.check(&token), None, "revoked tokens are invalid");
    }

    #[tokio::test]
    async fn healthz_answers_200_and_other_paths_404() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        let http = client();
        let get = |path: &str| {
            Request::get(format!("http://{}{path}", provider.addr()))
                .body(Full::new(Bytes::new()))
                .expect("valid request")
        };
        assert_eq!(send(&http, get("/healthz")).await.status, StatusCode::OK);
        assert_eq!(
            send(&http, get("/nope")).await.status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            send(&http, get(TOKEN_PATH)).await.status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            provider.token_requests(),
            0,
            "only POSTs are token requests"
        );
    }
}
