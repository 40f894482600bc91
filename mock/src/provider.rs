//! The mock OAuth2 provider: an RFC 6749 token endpoint with counters and injectable faults,
//! and an authorization endpoint for the authorization_code flow with PKCE.
//!
//! It issues opaque random access tokens recorded in a table that [`TokenValidator`] shares
//! with the mock API, so the API accepts exactly the tokens this provider issued and still
//! considers live. Refresh tokens optionally rotate; presenting a rotated-away one is
//! counted, because the OAuth 2.0 Security BCP lets a real provider revoke the whole token
//! family when that happens.
//!
//! The authorization endpoint (`GET`/`POST` [`AUTHORIZE_PATH`]) serves a small sign-in and
//! consent page; approving with a configured user redirects back with a one-time code that
//! lives 60 s and is bound to the client, the redirect URI and an optional S256 PKCE
//! challenge (RFC 7636). Exchanging it always returns a live refresh token, so the refresh
//! grant and rotation work on it; its tokens belong to the account of the user who approved
//! ([`TokenValidator::account`]). Injected [`Fault`]s apply to the token endpoint only.

use std::collections::{HashMap, HashSet};
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

use super::assertion;
use super::dpop::{self, Expected, Refused, SeenJtis};
use super::{form_decode, full, json_response, lock, Closed, MockBody, Server, Shutdown};

/// Path of the token endpoint.
const TOKEN_PATH: &str = "/oauth2/token";

/// Path of the authorization endpoint (`GET` shows the sign-in page, `POST` decides).
pub const AUTHORIZE_PATH: &str = "/oauth2/authorize";

/// How long an authorization code can be exchanged (RFC 6749 §4.1.2 recommends at most 10 min).
const CODE_LIFETIME: Duration = Duration::from_secs(60);

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
    /// Username/password pairs accepted by the password grant and the sign-in page.
    pub users: Vec<(String, String)>,
    /// How a successful token answer names its fields (default RFC 6749).
    pub response_shape: ResponseShape,
    /// How the token endpoint answers a refusal (default RFC 6749).
    pub error_style: ErrorStyle,
}

/// How the token endpoint words a successful answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResponseShape {
    /// RFC 6749 §5.1: `access_token`, `token_type`, `expires_in` in seconds,
    /// `refresh_token`.
    #[default]
    Standard,
    /// A commerce API's: no `expires_in`, but `access_token_expiration` and,
    /// beside a refresh token, `refresh_token_expiration` (a day on), both
    /// in epoch seconds.
    EpochExpirations,
}

/// How the token endpoint answers a refusal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ErrorStyle {
    /// RFC 6749 §5.2: 400 or 401 with `{"error": .., "error_description": ..}`.
    #[default]
    Rfc6749,
    /// A payment gateway's: every refusal is a 500
    /// `{"status": "FAILURE", "errorCode": CODE, "message": ..}`, where CODE is
    /// `INVALID_CREDENTIALS` for a bad client, password or refresh token and
    /// the RFC 6749 code in upper case otherwise. Injected faults are not
    /// reworded.
    Gateway500,
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
            response_shape: ResponseShape::default(),
            error_style: ErrorStyle::default(),
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
    /// Answer 400 `invalid_grant` with an `error_description` that repeats every credential
    /// the request carried (its DPoP proof included), in the given form, as some providers do ("Invalid refresh token:
    /// …"); nothing is issued.
    EchoCredentials(Echo),
}

/// How [`Fault::EchoCredentials`] writes the credentials it received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Echo {
    /// As the provider decoded them.
    Raw,
    /// Form-urlencoded, spaces as `+`.
    FormEncoded,
    /// Percent-encoded, spaces as `%20`.
    PercentEncoded,
    /// The `Authorization` header as received, and the urlencoded `id:secret` inside it.
    Basic,
}

/// Body parameters a provider would consider credentials.
const CREDENTIAL_PARAMS: &[&str] = &[
    "client_secret",
    "password",
    "refresh_token",
    "code",
    "code_verifier",
    "client_assertion",
];

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

    /// The RFC 7638 thumbprint of the DPoP key a live token is bound to
    /// (`cnf.jkt`), when its token request carried a proof.
    pub fn binding(&self, token: &str) -> Option<String> {
        let table = lock(&self.table);
        let issued = table.tokens.get(token)?;
        (issued.issued_at.elapsed() < issued.lifetime)
            .then(|| issued.jkt.clone())
            .flatten()
    }

    /// The account (merchant, customer) a live token was issued for, when it
    /// came from a refresh token issued for one
    /// ([`MockProvider::issue_refresh_token_for`]).
    pub fn account(&self, token: &str) -> Option<String> {
        let table = lock(&self.table);
        let issued = table.tokens.get(token)?;
        (issued.issued_at.elapsed() < issued.lifetime)
            .then(|| issued.account.clone())
            .flatten()
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
    account: Option<String>,
    /// The thumbprint of the DPoP key the token is bound to.
    jkt: Option<String>,
}

impl TokenTable {
    /// Records a new access token and returns it.
    fn issue(
        &mut self,
        lifetime: Duration,
        account: Option<String>,
        jkt: Option<String>,
    ) -> String {
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
                account,
                jkt,
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

/// An authorization code waiting to be exchanged, and what it is bound to.
struct AuthorizationCode {
    client_id: String,
    redirect_uri: String,
    code_challenge: Option<String>,
    scope: Option<String>,
    issued_at: Instant,
    /// The user who approved: the account the tokens it brings belong to.
    account: String,
}

impl AuthorizationCode {
    /// Checks a token request against the code (RFC 6749 §4.1.3, RFC 7636 §4.6); the error
    /// is the `error_description` of an `invalid_grant`.
    fn redeem(&self, client_id: &str, request: &TokenRequest) -> Result<(), &'static str> {
        if self.issued_at.elapsed() >= CODE_LIFETIME {
            return Err("authorization code has expired");
        }
        if self.client_id != client_id {
            return Err("authorization code was issued to another client");
        }
        if request.param("redirect_uri") != Some(self.redirect_uri.as_str()) {
            return Err("redirect_uri does not match the authorization request");
        }
        match (&self.code_challenge, request.param("code_verifier")) {
            (None, None) => Ok(()),
            (Some(challenge), Some(verifier)) if pkce_s256(verifier) == *challenge => Ok(()),
            (Some(_), Some(_)) => Err("code_verifier does not match the code_challenge"),
            (Some(_), None) => Err("code_verifier is required"),
            // A verifier for a code issued without a challenge is a PKCE downgrade attempt.
            (None, Some(_)) => Err("the authorization request had no code_challenge"),
        }
    }
}

/// Counters and injected behaviour.
#[derive(Default)]
struct ProviderState {
    fault: Fault,
    /// Whether `fault` applies to the next token request only.
    fault_once: bool,
    /// The last token request a fault answered.
    last_faulted: Option<TokenRequest>,
    token_requests: usize,
    grants: HashMap<String, usize>,
    refresh_token_reuse: usize,
    last_request: Option<TokenRequest>,
    refresh_tokens: HashMap<String, RefreshState>,
    /// The account each refresh token issued for one belongs to.
    accounts: HashMap<String, String>,
    codes: HashMap<String, AuthorizationCode>,
    codes_issued: usize,
    /// The `jti` of every client assertion accepted so far.
    assertion_jtis: HashSet<String>,
    /// Client assertions refused because their `jti` was seen before.
    assertion_reuse: usize,
    /// DPoP (RFC 9449) at the token endpoint.
    dpop: ProviderDpop,
}

/// The token endpoint's DPoP state.
#[derive(Default)]
struct ProviderDpop {
    /// Proofs are ignored and tokens are Bearer, as by a provider without DPoP.
    ignored: bool,
    /// The nonce every proof must carry, once one is demanded.
    nonce: Option<String>,
    /// The `jti` of proofs whose signature verified.
    seen: SeenJtis,
    /// Tokens issued bound to a proof's key.
    bound: usize,
    /// Proofs refused (not `use_dpop_nonce`), replays included.
    refused: usize,
    /// Proofs refused because their `jti` was seen before.
    replayed: usize,
    /// `use_dpop_nonce` answers.
    nonce_challenges: usize,
}

struct Shared {
    config: ProviderConfig,
    /// The token endpoint URL, the `aud` client assertions must name.
    token_url: String,
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
        let token_url = format!("http://{}{TOKEN_PATH}", listener.local_addr()?);
        let shared = Arc::new(Shared {
            config,
            token_url,
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

    /// The authorization endpoint URL, `http://127.0.0.1:PORT/oauth2/authorize`.
    pub fn authorize_url(&self) -> String {
        format!("http://{}{AUTHORIZE_PATH}", self.addr())
    }

    /// Makes the token endpoint misbehave from the next request on (`Fault::None` restores it).
    pub fn set_fault(&self, fault: Fault) {
        let mut state = self.state();
        state.fault = fault;
        state.fault_once = false;
    }

    /// Makes the next token request misbehave, and the ones after it answer normally.
    pub fn set_fault_once(&self, fault: Fault) {
        let mut state = self.state();
        state.fault = fault;
        state.fault_once = true;
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

    /// Authorization codes issued so far by approving on the sign-in page.
    pub fn authorization_codes_issued(&self) -> usize {
        self.state().codes_issued
    }

    /// Client assertions accepted so far (`client_secret_jwt`).
    pub fn assertions_accepted(&self) -> usize {
        self.state().assertion_jtis.len()
    }

    /// Client assertions refused because their `jti` had been accepted before.
    pub fn assertion_reuse(&self) -> usize {
        self.state().assertion_reuse
    }

    /// Makes the token endpoint ignore DPoP proofs and issue Bearer tokens, as
    /// a provider that does not support DPoP does (`true`), or bind tokens to
    /// the key of a request's proof again (`false`, the default).
    pub fn ignore_dpop(&self, ignored: bool) {
        self.state().dpop.ignored = ignored;
    }

    /// Makes every DPoP proof carry `nonce` (RFC 9449 §8): a proof without it
    /// gets 400 `use_dpop_nonce` and the nonce in `DPoP-Nonce`, which every
    /// token response carries from then on. `None` demands none.
    pub fn set_dpop_nonce(&self, nonce: Option<&str>) {
        self.state().dpop.nonce = nonce.map(str::to_owned);
    }

    /// Access tokens issued bound to the key of their request's DPoP proof.
    pub fn dpop_bound(&self) -> usize {
        self.state().dpop.bound
    }

    /// DPoP proofs refused (`invalid_dpop_proof`), replayed ones included.
    pub fn dpop_refused(&self) -> usize {
        self.state().dpop.refused
    }

    /// DPoP proofs refused because their `jti` had been seen before.
    pub fn dpop_replayed(&self) -> usize {
        self.state().dpop.replayed
    }

    /// Token requests answered `use_dpop_nonce`.
    pub fn dpop_nonce_challenges(&self) -> usize {
        self.state().dpop.nonce_challenges
    }

    /// What the last token request looked like.
    pub fn last_request(&self) -> Option<TokenRequest> {
        self.state().last_request.clone()
    }

    /// What the last token request answered by a fault (not normally) looked like.
    pub fn last_faulted_request(&self) -> Option<TokenRequest> {
        self.state().last_faulted.clone()
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
        self.state().live_refresh_token()
    }

    /// Issues a live refresh token of `account` (a merchant or customer who
    /// authorized the app): access tokens it and its successors obtain belong
    /// to that account ([`TokenValidator::account`]).
    pub fn issue_refresh_token_for(&self, account: &str) -> String {
        let mut state = self.state();
        let token = state.live_refresh_token();
        state.accounts.insert(token.clone(), account.to_owned());
        token
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
    if path == AUTHORIZE_PATH {
        return Ok(authorize(&shared, req).await);
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
        let fault = if state.fault_once {
            state.fault_once = false;
            std::mem::take(&mut state.fault)
        } else {
            state.fault.clone()
        };
        if fault != Fault::None {
            state.last_faulted = Some(parsed.request.clone());
        }
        fault
    };

    match fault {
        Fault::None => {
            let response = answer(&shared, &parsed);
            let response = match shared.config.error_style {
                ErrorStyle::Rfc6749 => response,
                ErrorStyle::Gateway500 => gateway_refusal(response).await,
            };
            Ok(with_dpop_nonce(&shared, response))
        }
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
        Fault::EchoCredentials(form) => Ok(error_response(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            Some(&echo_credentials(&parsed.request, form)),
        )),
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

/// An RFC 6749 refusal reworded as [`ErrorStyle::Gateway500`] says; any
/// other answer as it is.
async fn gateway_refusal(response: Response<MockBody>) -> Response<MockBody> {
    if !response.status().is_client_error() {
        return response;
    }
    let body = match response.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(never) => match never {},
    };
    let refusal: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let error = refusal["error"].as_str().unwrap_or("server_error");
    let code = match error {
        "invalid_client" | "invalid_grant" => "INVALID_CREDENTIALS".to_owned(),
        other => other.to_ascii_uppercase(),
    };
    let message = refusal["error_description"]
        .as_str()
        .unwrap_or("The request failed.");
    let mut response = json_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        &json!({ "status": "FAILURE", "errorCode": code, "message": message }),
    );
    no_store(response.headers_mut());
    response
}

/// "Invalid credentials: name=value …" for every credential `request` carried, in `form`.
fn echo_credentials(request: &TokenRequest, form: Echo) -> String {
    let encode = |value: &str| -> String {
        match form {
            Echo::Raw | Echo::Basic => value.to_owned(),
            Echo::FormEncoded => form_urlencoded::byte_serialize(value.as_bytes()).collect(),
            Echo::PercentEncoded => form_urlencoded::byte_serialize(value.as_bytes())
                .collect::<String>()
                .replace('+', "%20"),
        }
    };
    let mut echoed: Vec<String> = Vec::new();
    if form == Echo::Basic {
        if let Some(value) = request.headers.get(header::AUTHORIZATION) {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            let inside = value
                .split_once(' ')
                .and_then(|(_, b64)| {
                    base64::engine::general_purpose::STANDARD
                        .decode(b64.trim())
                        .ok()
                })
                .map(|raw| String::from_utf8_lossy(&raw).into_owned());
            echoed.push(format!("authorization={value}"));
            if let Some(inside) = inside {
                echoed.push(format!("client={inside}"));
            }
        }
    } else if let Some((_, secret)) = &request.basic_auth {
        echoed.push(format!("client_secret={}", encode(secret)));
    }
    for (name, value) in &request.params {
        if CREDENTIAL_PARAMS.contains(&name.as_str()) {
            echoed.push(format!("{name}={}", encode(value)));
        }
    }
    if let Some(proof) = request.headers.get(dpop::HEADER) {
        echoed.push(format!(
            "dpop={}",
            encode(&String::from_utf8_lossy(proof.as_bytes()))
        ));
    }
    format!("Invalid credentials: {}", echoed.join(" "))
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
    let authenticated = if request.param("client_assertion_type") == Some(assertion::JWT_BEARER) {
        accept_assertion(shared, request)
    } else {
        credentials == Some((config.client_id.as_str(), config.client_secret.as_str()))
    };
    if !authenticated {
        return invalid_client();
    }
    if let Some(problem) = parsed.malformed {
        return error_response(StatusCode::BAD_REQUEST, "invalid_request", Some(problem));
    }
    // After client authentication, as oidc-provider: a challenged request has
    // spent its client assertion.
    let jkt = match dpop_binding(shared, request) {
        Ok(jkt) => jkt,
        Err((error, why)) => return error_response(StatusCode::BAD_REQUEST, error, Some(&why)),
    };

    let grant = match request.param("grant_type") {
        Some("client_credentials") => Grant::Direct,
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
            if !config.knows_user(username, password) {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    Some("Invalid credentials given."),
                );
            }
            Grant::Direct
        }
        Some("refresh_token") => {
            let Some(presented) = request.param("refresh_token") else {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    Some("refresh_token is required"),
                );
            };
            Grant::Refresh(presented)
        }
        Some("authorization_code") => {
            let Some(code) = request.param("code") else {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    Some("code is required"),
                );
            };
            Grant::Code(code)
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
    // refreshes with one rotating token, or two exchanges of one code, cannot both succeed.
    let (new_refresh, scope, account) = {
        let mut state = lock(&shared.state);
        let requested_scope = request.param("scope").map(str::to_owned);
        let mut account = match grant {
            Grant::Refresh(presented) => state.accounts.get(presented).cloned(),
            _ => None,
        };
        let (new_refresh, scope) = match grant {
            Grant::Refresh(presented) => match state.refresh_tokens.get(presented).copied() {
                Some(RefreshState::Live) if config.rotate_refresh_tokens => {
                    state
                        .refresh_tokens
                        .insert(presented.to_owned(), RefreshState::Rotated);
                    let fresh = state.live_refresh_token();
                    if let Some(account) = &account {
                        state.accounts.insert(fresh.clone(), account.clone());
                    }
                    (Some(fresh), requested_scope)
                }
                Some(RefreshState::Live) => (None, requested_scope),
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
            Grant::Code(presented) => {
                // RFC 6749 §4.1.2: a code is single-use, so presenting it spends it even
                // when the exchange then fails.
                let Some(code) = state.codes.remove(presented) else {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        Some("authorization code is invalid"),
                    );
                };
                if let Err(problem) = code.redeem(&config.client_id, request) {
                    return error_response(StatusCode::BAD_REQUEST, "invalid_grant", Some(problem));
                }
                let fresh = state.live_refresh_token();
                state.accounts.insert(fresh.clone(), code.account.clone());
                account = Some(code.account);
                (Some(fresh), code.scope)
            }
            Grant::Direct if config.refresh_tokens => {
                (Some(state.live_refresh_token()), requested_scope)
            }
            Grant::Direct => (None, requested_scope),
        };
        (new_refresh, scope, account)
    };

    let token_type = if jkt.is_some() { "DPoP" } else { "Bearer" };
    let access_token = lock(&shared.table).issue(config.lifetime, account, jkt);
    let mut body = json!({
        "access_token": access_token,
        "token_type": token_type,
    });
    let epoch = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
    };
    match config.response_shape {
        ResponseShape::Standard => body["expires_in"] = json!(config.lifetime.as_secs()),
        ResponseShape::EpochExpirations => {
            // Rounded down: the token is never said to live longer than it does.
            body["access_token_expiration"] = json!((epoch() + config.lifetime).as_secs());
        }
    }
    if let Some(refresh) = new_refresh {
        body["refresh_token"] = json!(refresh);
        if config.response_shape == ResponseShape::EpochExpirations {
            body["refresh_token_expiration"] = json!(epoch().as_secs() + 86_400);
        }
    }
    if let Some(scope) = scope {
        body["scope"] = json!(scope);
    }
    let mut response = json_response(StatusCode::OK, &body);
    no_store(response.headers_mut());
    response
}

/// What a grant asks of the provider's refresh token and code state.
enum Grant<'a> {
    /// client_credentials or password: a refresh token only when configured.
    Direct,
    /// refresh_token: the presented refresh token.
    Refresh(&'a str),
    /// authorization_code: the presented code.
    Code(&'a str),
}

impl ProviderConfig {
    /// Whether `username`/`password` is one of the configured users.
    fn knows_user(&self, username: &str, password: &str) -> bool {
        self.users
            .iter()
            .any(|(u, p)| u.as_str() == username && p.as_str() == password)
    }
}

impl ProviderState {
    /// Issues a new live refresh token.
    fn live_refresh_token(&mut self) -> String {
        let fresh = random_token();
        self.refresh_tokens
            .insert(fresh.clone(), RefreshState::Live);
        fresh
    }
}

/// RFC 7636 §4.2 S256: `BASE64URL-NOPAD(SHA256(ASCII(code_verifier)))`.
fn pkce_s256(verifier: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
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

/// A `client_secret_jwt` assertion (with no Basic credentials beside it) whose `jti`
/// was never accepted before.
fn accept_assertion(shared: &Shared, request: &TokenRequest) -> bool {
    let config = &shared.config;
    let checked = request.param("client_assertion").map(|jwt| {
        assertion::check(
            jwt,
            &config.client_id,
            &config.client_secret,
            &shared.token_url,
        )
    });
    let (Some(Ok(jti)), None) = (checked, &request.basic_auth) else {
        return false;
    };
    let mut state = lock(&shared.state);
    if state.assertion_jtis.insert(jti) {
        true
    } else {
        state.assertion_reuse += 1;
        false
    }
}

/// The key a token request's DPoP proof binds its token to (RFC 9449 §5):
/// none without a proof (or when proofs are ignored), else the proof is
/// checked as at an API, with `htm` POST, `htu` the token URL and no `ath`.
/// A refusal is the `error` and `error_description` of a 400.
fn dpop_binding(
    shared: &Shared,
    request: &TokenRequest,
) -> Result<Option<String>, (&'static str, String)> {
    let mut proofs = request.headers.get_all(dpop::HEADER).iter();
    let (first, second) = (proofs.next(), proofs.next());
    let mut state = lock(&shared.state);
    let state = &mut state.dpop;
    if state.ignored {
        return Ok(None);
    }
    let refused = |state: &mut ProviderDpop, why: &str| {
        state.refused += 1;
        Err(("invalid_dpop_proof", why.to_owned()))
    };
    let proof = match (first, second) {
        (None, _) => return Ok(None),
        (Some(_), Some(_)) => return refused(state, "more than one DPoP header"),
        (Some(proof), None) => match proof.to_str() {
            Ok(proof) => proof,
            Err(_) => return refused(state, "DPoP proof is not text"),
        },
    };
    let nonce = state.nonce.clone();
    let expected = Expected {
        htm: "POST",
        htu: &shared.token_url,
        ath: None,
        nonces: nonce.as_ref().map(std::slice::from_ref),
    };
    match dpop::check(proof, &expected, &mut state.seen) {
        Ok(passed) => {
            state.bound += 1;
            Ok(Some(passed.jkt))
        }
        Err(Refused::NeedsNonce) => {
            state.nonce_challenges += 1;
            Err(("use_dpop_nonce", Refused::NeedsNonce.description()))
        }
        Err(Refused::Replayed) => {
            state.replayed += 1;
            refused(state, &Refused::Replayed.description())
        }
        Err(invalid @ Refused::Invalid(_)) => refused(state, &invalid.description()),
    }
}

/// `response` with the nonce the token endpoint demands, if any, in `DPoP-Nonce`.
fn with_dpop_nonce(shared: &Shared, mut response: Response<MockBody>) -> Response<MockBody> {
    let state = lock(&shared.state);
    if let Some(value) = state
        .dpop
        .nonce
        .as_deref()
        .and_then(|n| HeaderValue::from_str(n).ok())
    {
        response.headers_mut().insert(dpop::NONCE_HEADER, value);
    }
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

/// A validated authorization request (RFC 6749 §4.1.1, RFC 7636 §4.3).
struct AuthorizationRequest {
    client_id: String,
    redirect_uri: String,
    state: Option<String>,
    scope: Option<String>,
    code_challenge: Option<String>,
}

/// Why an authorization request is refused.
enum Refusal {
    /// The client or redirect URI cannot be trusted, so the error is shown and the browser
    /// never redirected (RFC 6749 §4.1.2.1): the endpoint is no open redirector.
    Page(String),
    /// The redirect URI can be trusted: the error goes back to the client there.
    Redirect {
        redirect_uri: String,
        state: Option<String>,
        error: &'static str,
        description: &'static str,
    },
}

/// Parameters the sign-in form adds; they are not carried over as hidden inputs.
const FORM_FIELDS: [&str; 3] = ["username", "password", "decision"];

/// Serves the authorization endpoint: `GET` shows the sign-in page, `POST` decides.
async fn authorize(shared: &Shared, req: Request<Incoming>) -> Response<MockBody> {
    let outcome = match *req.method() {
        Method::GET => {
            let params: Vec<(String, String)> = req
                .uri()
                .query()
                .map(|query| {
                    form_urlencoded::parse(query.as_bytes())
                        .into_owned()
                        .collect()
                })
                .unwrap_or_default();
            show_sign_in(&shared.config, &params)
        }
        Method::POST => {
            let body = http_body_util::Limited::new(req.into_body(), MAX_BODY)
                .collect()
                .await;
            match body {
                Ok(body) => {
                    let params: Vec<(String, String)> = form_urlencoded::parse(&body.to_bytes())
                        .into_owned()
                        .collect();
                    decide(shared, &params)
                }
                Err(_) => Err(Refusal::Page("the form could not be read".to_owned())),
            }
        }
        _ => {
            let mut response = html_response(
                StatusCode::METHOD_NOT_ALLOWED,
                message_page("Use GET or POST."),
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, POST"));
            return response;
        }
    };
    match outcome {
        Ok(response) => response,
        Err(Refusal::Page(problem)) => refusal_page(&problem),
        Err(Refusal::Redirect {
            redirect_uri,
            state,
            error,
            description,
        }) => redirect_response(
            &redirect_uri,
            state.as_deref(),
            &[("error", error), ("error_description", description)],
        ),
    }
}

/// `GET`: the sign-in and consent page for a valid request.
fn show_sign_in(
    config: &ProviderConfig,
    params: &[(String, String)],
) -> Result<Response<MockBody>, Refusal> {
    let request = authorization_request(config, params)?;
    Ok(html_response(
        StatusCode::OK,
        sign_in_page(&request, params, "", None),
    ))
}

/// `POST`: deny, or approve with a configured user and issue a code.
fn decide(shared: &Shared, params: &[(String, String)]) -> Result<Response<MockBody>, Refusal> {
    let request = authorization_request(&shared.config, params)?;
    match single(params, "decision")? {
        Some("deny") => Ok(redirect_response(
            &request.redirect_uri,
            request.state.as_deref(),
            &[
                ("error", "access_denied"),
                ("error_description", "the user denied the request"),
            ],
        )),
        Some("approve") => {
            let username = single(params, "username")?.unwrap_or_default();
            let password = single(params, "password")?.unwrap_or_default();
            if !shared.config.knows_user(username, password) {
                let page = sign_in_page(
                    &request,
                    params,
                    username,
                    Some("Wrong username or password."),
                );
                return Ok(html_response(StatusCode::OK, page));
            }
            let code = issue_code(shared, &request, username);
            Ok(redirect_response(
                &request.redirect_uri,
                request.state.as_deref(),
                &[("code", &code)],
            ))
        }
        _ => Err(Refusal::Page("decision must be approve or deny".to_owned())),
    }
}

/// Validates the parameters both `GET` and `POST` carry.
fn authorization_request(
    config: &ProviderConfig,
    params: &[(String, String)],
) -> Result<AuthorizationRequest, Refusal> {
    let client_id = single(params, "client_id")?;
    let redirect_uri = single(params, "redirect_uri")?;
    let response_type = single(params, "response_type")?;
    let state = single(params, "state")?;
    let scope = single(params, "scope")?;
    let code_challenge = single(params, "code_challenge")?;
    let code_challenge_method = single(params, "code_challenge_method")?;

    let Some(client_id) = client_id else {
        return Err(Refusal::Page("client_id is missing".to_owned()));
    };
    if client_id != config.client_id {
        return Err(Refusal::Page(format!("unknown client_id {client_id:?}")));
    }
    let Some(redirect_uri) = redirect_uri else {
        return Err(Refusal::Page("redirect_uri is missing".to_owned()));
    };
    if !is_redirect_uri(redirect_uri) {
        return Err(Refusal::Page(
            "redirect_uri must be an absolute http or https URL without a fragment".to_owned(),
        ));
    }
    if response_type != Some("code") {
        return Err(Refusal::Page("response_type must be code".to_owned()));
    }
    let refuse_pkce = |description| Refusal::Redirect {
        redirect_uri: redirect_uri.to_owned(),
        state: state.map(str::to_owned),
        error: "invalid_request",
        description,
    };
    // RFC 7636 §4.3: a challenge without a method is `plain`, which this provider refuses.
    let code_challenge = match (code_challenge, code_challenge_method) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(refuse_pkce(
                "code_challenge_method was given without code_challenge",
            ))
        }
        (Some(challenge), Some("S256")) if is_s256_challenge(challenge) => {
            Some(challenge.to_owned())
        }
        (Some(_), Some("S256")) => {
            return Err(refuse_pkce(
                "code_challenge must be 43 base64url characters",
            ))
        }
        (Some(_), _) => return Err(refuse_pkce("code_challenge_method must be S256")),
    };
    Ok(AuthorizationRequest {
        client_id: client_id.to_owned(),
        redirect_uri: redirect_uri.to_owned(),
        state: state.map(str::to_owned),
        scope: scope.map(str::to_owned),
        code_challenge,
    })
}

/// The value of parameter `name`; empty counts as absent and a repeat is refused
/// (RFC 6749 §3.1).
fn single<'a>(params: &'a [(String, String)], name: &str) -> Result<Option<&'a str>, Refusal> {
    let mut values = params
        .iter()
        .filter(|(key, value)| key == name && !value.is_empty())
        .map(|(_, value)| value.as_str());
    let first = values.next();
    if values.next().is_some() {
        return Err(Refusal::Page(format!("parameter {name} is repeated")));
    }
    Ok(first)
}

/// RFC 6749 §3.1.2: an absolute URI without a fragment; only http(s) is useful here.
fn is_redirect_uri(raw: &str) -> bool {
    if raw.contains('#') {
        return false;
    }
    let Ok(uri) = raw.parse::<http::Uri>() else {
        return false;
    };
    matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some_and(|h| !h.is_empty())
}

/// RFC 7636 §4.2: an S256 challenge is a SHA-256 digest in unpadded base64url.
fn is_s256_challenge(challenge: &str) -> bool {
    challenge.len() == 43
        && challenge
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Records a new one-time code for `request` and returns it.
fn issue_code(shared: &Shared, request: &AuthorizationRequest, account: &str) -> String {
    let mut state = lock(&shared.state);
    // Forget expired codes so a long demo does not grow the map without bound.
    state
        .codes
        .retain(|_, code| code.issued_at.elapsed() < CODE_LIFETIME);
    let code = random_token();
    state.codes.insert(
        code.clone(),
        AuthorizationCode {
            client_id: request.client_id.clone(),
            redirect_uri: request.redirect_uri.clone(),
            code_challenge: request.code_challenge.clone(),
            scope: request.scope.clone(),
            issued_at: Instant::now(),
            account: account.to_owned(),
        },
    );
    state.codes_issued += 1;
    code
}

/// A 302 back to the client with `pairs` (and `state`, if the request had one) appended to
/// the redirect URI's query (RFC 6749 §4.1.2).
fn redirect_response(
    redirect_uri: &str,
    state: Option<&str>,
    pairs: &[(&str, &str)],
) -> Response<MockBody> {
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.extend_pairs(pairs);
    if let Some(state) = state {
        query.append_pair("state", state);
    }
    let separator = match redirect_uri.as_bytes().last() {
        Some(b'?' | b'&') => "",
        _ if redirect_uri.contains('?') => "&",
        _ => "?",
    };
    let location = [redirect_uri, separator, &query.finish()].concat();
    // The redirect URI was parsed as a `Uri` and the query is percent-encoded, so this only
    // fails on a bug; answer a page rather than panic.
    let Ok(location) = HeaderValue::from_str(&location) else {
        return refusal_page("redirect_uri cannot be used in a Location header");
    };
    let mut response = Response::new(full(""));
    *response.status_mut() = StatusCode::FOUND;
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, location);
    no_store(headers);
    response
}

/// A 400 page saying what is wrong with the request.
fn refusal_page(problem: &str) -> Response<MockBody> {
    html_response(StatusCode::BAD_REQUEST, message_page(problem))
}

/// An HTML response that is neither cached nor framed (a consent page must not be
/// clickjacked).
fn html_response(status: StatusCode, html: String) -> Response<MockBody> {
    let mut response = Response::new(full(html));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    no_store(headers);
    response
}

/// A page with one message (`text` is escaped).
fn message_page(text: &str) -> String {
    [
        PAGE_HEAD,
        "<h1>Mock provider: authorization request refused</h1>\n<p>",
        &html_escape(text),
        "</p>\n</body>\n</html>\n",
    ]
    .concat()
}

const PAGE_HEAD: &str = "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
    <title>Mock provider</title>\n</head>\n<body>\n";

/// The sign-in and consent page: one form carrying `params` (minus the form's own fields)
/// as hidden inputs, every value escaped.
fn sign_in_page(
    request: &AuthorizationRequest,
    params: &[(String, String)],
    username: &str,
    problem: Option<&str>,
) -> String {
    let mut page = String::from(PAGE_HEAD);
    page.push_str("<h1>Mock provider: sign in to authorize ");
    page.push_str(&html_escape(&request.client_id));
    page.push_str("</h1>\n");
    match &request.scope {
        Some(scope) => {
            page.push_str("<p>Requested scope: <code>");
            page.push_str(&html_escape(scope));
            page.push_str("</code></p>\n");
        }
        None => page.push_str("<p>No scope requested.</p>\n"),
    }
    page.push_str("<p>You will be sent back to <code>");
    page.push_str(&html_escape(&request.redirect_uri));
    page.push_str("</code>.</p>\n");
    if let Some(problem) = problem {
        page.push_str("<p role=\"alert\">");
        page.push_str(&html_escape(problem));
        page.push_str("</p>\n");
    }
    page.push_str("<form method=\"post\" action=\"");
    page.push_str(AUTHORIZE_PATH);
    page.push_str("\">\n");
    for (name, value) in params {
        if FORM_FIELDS.contains(&name.as_str()) {
            continue;
        }
        page.push_str("<input type=\"hidden\" name=\"");
        page.push_str(&html_escape(name));
        page.push_str("\" value=\"");
        page.push_str(&html_escape(value));
        page.push_str("\">\n");
    }
    page.push_str("<p><label>Username <input type=\"text\" name=\"username\" value=\"");
    page.push_str(&html_escape(username));
    page.push_str("\" autocomplete=\"username\"></label></p>\n");
    page.push_str(
        "<p><label>Password <input type=\"password\" name=\"password\" \
         autocomplete=\"current-password\"></label></p>\n",
    );
    page.push_str(
        "<p><button name=\"decision\" value=\"approve\">Approve</button>\n\
         <button name=\"decision\" value=\"deny\">Deny</button></p>\n",
    );
    page.push_str("</form>\n</body>\n</html>\n");
    page
}

/// Escapes text for HTML content and double- or single-quoted attribute values.
pub(crate) fn html_escape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{client, send, Reply};
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

    /// A client_credentials request with the proof `dpop`.
    async fn post_with_proof(provider: &MockProvider, proof: &str) -> Reply {
        let req = Request::post(provider.token_url())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::AUTHORIZATION, basic(CREDS.0, CREDS.1))
            .header("dpop", proof)
            .body(Full::new(Bytes::from(form(&[(
                "grant_type",
                "client_credentials",
            )]))))
            .expect("valid request");
        send(&client(), req).await
    }

    #[tokio::test]
    async fn a_proof_binds_the_token_to_its_key_once() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("starts");
        let key = crate::dpop::test_key::TestKey::new();
        let url = provider.token_url();
        let proof = key.proof("POST", &url, None, None);
        let reply = post_with_proof(&provider, &proof).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.json());
        assert_eq!(reply.json()["token_type"], "DPoP");
        let token = access_token(&reply);
        assert_eq!(provider.validator().binding(&token), Some(key.jkt()));
        assert_eq!(provider.dpop_bound(), 1);

        let again = post_with_proof(&provider, &proof).await;
        assert_eq!(again.status, StatusCode::BAD_REQUEST);
        assert_eq!(again.json()["error"], "invalid_dpop_proof");
        assert_eq!(provider.dpop_replayed(), 1, "the same jti again");
        let elsewhere = key.proof("POST", "http://other.example/token", None, None);
        assert_eq!(
            post_with_proof(&provider, &elsewhere).await.json()["error"],
            "invalid_dpop_proof"
        );
        assert_eq!(provider.dpop_refused(), 2);

        provider.ignore_dpop(true);
        let ignored = post_with_proof(&provider, &key.proof("POST", &url, None, None)).await;
        assert_eq!(
            ignored.json()["token_type"],
            "Bearer",
            "a provider without DPoP"
        );
        assert_eq!(provider.validator().binding(&access_token(&ignored)), None);
        let bearer = post_form(
            &provider,
            Some(CREDS),
            &[("grant_type", "client_credentials")],
        )
        .await;
        assert_eq!(
            bearer.json()["token_type"],
            "Bearer",
            "no proof, no binding"
        );
    }

    #[tokio::test]
    async fn a_demanded_nonce_is_handed_out_and_then_accepted() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("starts");
        provider.set_dpop_nonce(Some("n-1"));
        let key = crate::dpop::test_key::TestKey::new();
        let url = provider.token_url();
        let first = post_with_proof(&provider, &key.proof("POST", &url, None, None)).await;
        assert_eq!(first.status, StatusCode::BAD_REQUEST);
        assert_eq!(first.json()["error"], "use_dpop_nonce");
        assert_eq!(first.headers["dpop-nonce"], "n-1");
        assert_eq!(provider.dpop_nonce_challenges(), 1);
        let second = post_with_proof(&provider, &key.proof("POST", &url, None, Some("n-1"))).await;
        assert_eq!(second.status, StatusCode::OK);
        assert_eq!(
            second.headers["dpop-nonce"], "n-1",
            "every answer carries it"
        );
        assert_eq!(second.json()["token_type"], "DPoP");
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

    /// RFC 7636 Appendix B.
    const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
    const REDIRECT: &str = "http://127.0.0.1:9/callback";

    /// An authorization request for the demo client with an S256 challenge.
    fn authorization_params<'a>(state: &'a str, scope: &'a str) -> Vec<(&'a str, &'a str)> {
        vec![
            ("response_type", "code"),
            ("client_id", CREDS.0),
            ("redirect_uri", REDIRECT),
            ("state", state),
            ("scope", scope),
            ("code_challenge", CHALLENGE),
            ("code_challenge_method", "S256"),
        ]
    }

    async fn get_authorize(provider: &MockProvider, pairs: &[(&str, &str)]) -> Reply {
        let req = Request::get(format!("{}?{}", provider.authorize_url(), form(pairs)))
            .body(Full::new(Bytes::new()))
            .expect("valid request");
        send(&client(), req).await
    }

    async fn post_authorize(provider: &MockProvider, pairs: &[(&str, &str)]) -> Reply {
        let req = Request::post(provider.authorize_url())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(form(pairs))))
            .expect("valid request");
        send(&client(), req).await
    }

    /// The `Location` of a redirect, split into the part before the added query and its pairs.
    fn location(reply: &Reply) -> (String, Vec<(String, String)>) {
        assert_eq!(reply.status, StatusCode::FOUND, "should redirect");
        let location = reply.headers[header::LOCATION]
            .to_str()
            .expect("Location is ASCII");
        let (base, query) = location
            .split_once('?')
            .expect("Location should carry a query");
        let pairs = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        (base.to_owned(), pairs)
    }

    fn pair<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
        pairs
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    fn html(reply: &Reply) -> String {
        String::from_utf8(reply.body.to_vec()).expect("page should be UTF-8")
    }

    /// Signs alice in and approves `params`, returning the code.
    async fn approve(provider: &MockProvider, params: &[(&str, &str)]) -> String {
        let mut pairs = params.to_vec();
        pairs.extend([
            ("username", "alice"),
            ("password", "alice-password"),
            ("decision", "approve"),
        ]);
        let reply = post_authorize(provider, &pairs).await;
        let (_, query) = location(&reply);
        pair(&query, "code")
            .expect("approval should return a code")
            .to_owned()
    }

    async fn exchange(
        provider: &MockProvider,
        code: &str,
        redirect_uri: &str,
        verifier: Option<&str>,
    ) -> Reply {
        let mut pairs = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
        ];
        if let Some(verifier) = verifier {
            pairs.push(("code_verifier", verifier));
        }
        post_form(provider, Some(CREDS), &pairs).await
    }

    #[test]
    fn pkce_s256_matches_rfc_7636_appendix_b() {
        assert_eq!(pkce_s256(VERIFIER), CHALLENGE);
    }

    #[tokio::test]
    async fn authorization_page_carries_every_parameter_as_escaped_hidden_inputs() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        let hostile = "\"><script>alert('x')</script>&amp;";
        let mut params = authorization_params(hostile, "payments:read");
        params.push(("prompt", "login"));
        let reply = get_authorize(&provider, &params).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "a valid request shows the page"
        );
        assert_eq!(
            reply.headers[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert_eq!(reply.headers[header::CACHE_CONTROL], "no-store");
        let page = html(&reply);
        assert!(page.contains("Mock provider: sign in to authorize demo-client"));
        assert!(page.contains("payments:read"), "the scope is shown");
        assert_eq!(page.matches("<form").count(), 1, "exactly one form: {page}");
        assert!(page.contains("<form method=\"post\" action=\"/oauth2/authorize\">"));
        assert!(
            page.contains(
                "<input type=\"hidden\" name=\"state\" value=\"&quot;&gt;&lt;script&gt;\
                 alert(&#39;x&#39;)&lt;/script&gt;&amp;amp;\">"
            ),
            "the state should be escaped: {page}"
        );
        assert!(!page.contains("<script>"), "nothing unescaped: {page}");
        for (name, value) in [
            ("response_type", "code"),
            ("client_id", "demo-client"),
            ("redirect_uri", REDIRECT),
            ("scope", "payments:read"),
            ("code_challenge", CHALLENGE),
            ("code_challenge_method", "S256"),
            ("prompt", "login"),
        ] {
            let input = format!("<input type=\"hidden\" name=\"{name}\" value=\"{value}\">");
            assert!(page.contains(&input), "missing {input}: {page}");
        }
        assert!(page.contains("name=\"username\""));
        assert!(page.contains("name=\"password\""));
        assert!(page.contains("<button name=\"decision\" value=\"approve\">Approve</button>"));
        assert!(page.contains("<button name=\"decision\" value=\"deny\">Deny</button>"));
        assert_eq!(provider.token_requests(), 0, "the page is no token request");
    }

    #[tokio::test]
    async fn approving_with_the_right_password_redirects_with_a_code_and_the_state() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        let mut pairs = authorization_params("xyz 1&2", "payments");
        pairs.extend([
            ("username", "alice"),
            ("password", "alice-password"),
            ("decision", "approve"),
        ]);
        let reply = post_authorize(&provider, &pairs).await;
        assert_eq!(reply.headers[header::CACHE_CONTROL], "no-store");
        let (base, query) = location(&reply);
        assert_eq!(base, REDIRECT);
        let code = pair(&query, "code").expect("a code should come back");
        assert_eq!(code.len(), 32);
        assert_eq!(
            pair(&query, "state"),
            Some("xyz 1&2"),
            "the state round-trips"
        );
        assert_eq!(query.len(), 2, "only code and state: {query:?}");
        assert_eq!(provider.authorization_codes_issued(), 1);

        // A redirect URI with a query keeps it and gets the code appended.
        let with_query = "http://127.0.0.1:9/cb?app=1";
        let reply = post_authorize(
            &provider,
            &[
                ("response_type", "code"),
                ("client_id", CREDS.0),
                ("redirect_uri", with_query),
                ("username", "alice"),
                ("password", "alice-password"),
                ("decision", "approve"),
            ],
        )
        .await;
        let (base, query) = location(&reply);
        assert_eq!(base, "http://127.0.0.1:9/cb");
        assert_eq!(pair(&query, "app"), Some("1"));
        assert!(pair(&query, "code").is_some());
        assert_eq!(pair(&query, "state"), None, "no state was given");
        assert_eq!(provider.authorization_codes_issued(), 2);
    }

    #[tokio::test]
    async fn denying_redirects_with_access_denied_and_the_state() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        let mut pairs = authorization_params("s-42", "payments");
        pairs.extend([("username", ""), ("password", ""), ("decision", "deny")]);
        let reply = post_authorize(&provider, &pairs).await;
        let (base, query) = location(&reply);
        assert_eq!(base, REDIRECT);
        assert_eq!(pair(&query, "error"), Some("access_denied"));
        assert!(pair(&query, "error_description").is_some());
        assert_eq!(pair(&query, "state"), Some("s-42"));
        assert_eq!(pair(&query, "code"), None);
        assert_eq!(provider.authorization_codes_issued(), 0);
    }

    #[tokio::test]
    async fn a_wrong_password_shows_the_sign_in_page_again() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        let mut pairs = authorization_params("s", "payments");
        pairs.extend([
            ("username", "alice"),
            ("password", "guess"),
            ("decision", "approve"),
        ]);
        let reply = post_authorize(&provider, &pairs).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "no redirect on a wrong password"
        );
        assert!(reply.headers.get(header::LOCATION).is_none());
        let page = html(&reply);
        assert!(page.contains("Wrong username or password."), "{page}");
        assert!(page.contains("<input type=\"hidden\" name=\"state\" value=\"s\">"));
        assert!(!page.contains("guess"), "the password is not echoed");
        assert_eq!(provider.authorization_codes_issued(), 0);
    }

    #[tokio::test]
    async fn a_code_with_the_right_verifier_yields_tokens_that_refresh() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        let code = approve(&provider, &authorization_params("s", "payments")).await;
        let reply = exchange(&provider, &code, REDIRECT, Some(VERIFIER)).await;
        assert_eq!(reply.status, StatusCode::OK, "the exchange should succeed");
        assert_eq!(reply.headers[header::CACHE_CONTROL], "no-store");
        let body = reply.json();
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(
            body["scope"], "payments",
            "the authorized scope is returned"
        );
        assert_eq!(
            provider.validator().check(&access_token(&reply)),
            Some(1),
            "the API accepts the access token"
        );
        let refresh = body["refresh_token"]
            .as_str()
            .expect("the exchange always returns a refresh token")
            .to_owned();
        assert_eq!(provider.grant_requests("authorization_code"), 1);

        // Body client credentials, like the other grants accept.
        let refreshed = post_form(
            &provider,
            None,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &refresh),
                ("client_id", CREDS.0),
                ("client_secret", CREDS.1),
            ],
        )
        .await;
        assert_eq!(
            refreshed.status,
            StatusCode::OK,
            "the refresh token is live"
        );
        assert!(
            refreshed.json()["refresh_token"].as_str().is_some(),
            "it rotates"
        );
        assert_eq!(
            provider.validator().check(&access_token(&refreshed)),
            Some(2)
        );
    }

    #[tokio::test]
    async fn a_code_without_pkce_needs_no_verifier_and_refuses_one() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        let params = [
            ("response_type", "code"),
            ("client_id", CREDS.0),
            ("redirect_uri", REDIRECT),
        ];
        let code = approve(&provider, &params).await;
        let reply = exchange(&provider, &code, REDIRECT, None).await;
        assert_eq!(reply.status, StatusCode::OK, "no challenge, no verifier");
        assert!(
            reply.json().get("scope").is_none(),
            "no scope was requested"
        );

        let code = approve(&provider, &params).await;
        let reply = exchange(&provider, &code, REDIRECT, Some(VERIFIER)).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "a PKCE downgrade is refused"
        );
        assert_eq!(reply.json()["error"], "invalid_grant");
    }

    #[tokio::test]
    async fn wrong_verifier_redirect_uri_or_a_reused_code_is_invalid_grant() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        let params = authorization_params("s", "payments");

        let code = approve(&provider, &params).await;
        let wrong = exchange(
            &provider,
            &code,
            REDIRECT,
            Some(&VERIFIER.replace('d', "e")),
        )
        .await;
        assert_eq!(wrong.status, StatusCode::BAD_REQUEST);
        assert_eq!(wrong.json()["error"], "invalid_grant", "wrong verifier");

        let code = approve(&provider, &params).await;
        let missing = exchange(&provider, &code, REDIRECT, None).await;
        assert_eq!(missing.json()["error"], "invalid_grant", "missing verifier");

        let code = approve(&provider, &params).await;
        let elsewhere =
            exchange(&provider, &code, "http://127.0.0.1:9/other", Some(VERIFIER)).await;
        assert_eq!(elsewhere.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            elsewhere.json()["error"],
            "invalid_grant",
            "wrong redirect_uri"
        );

        let code = approve(&provider, &params).await;
        let bad_client = post_form(
            &provider,
            Some((CREDS.0, "nope")),
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", REDIRECT),
                ("code_verifier", VERIFIER),
            ],
        )
        .await;
        assert_eq!(bad_client.status, StatusCode::UNAUTHORIZED);
        assert_eq!(bad_client.json()["error"], "invalid_client");
        let first = exchange(&provider, &code, REDIRECT, Some(VERIFIER)).await;
        assert_eq!(
            first.status,
            StatusCode::OK,
            "a failed client authentication does not spend the code"
        );
        let again = exchange(&provider, &code, REDIRECT, Some(VERIFIER)).await;
        assert_eq!(again.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            again.json()["error"],
            "invalid_grant",
            "a code is single-use"
        );

        let unknown = exchange(&provider, "never-issued", REDIRECT, Some(VERIFIER)).await;
        assert_eq!(unknown.json()["error"], "invalid_grant");
        assert_eq!(provider.grant_requests("authorization_code"), 7);
        assert_eq!(provider.validator().check(&access_token(&first)), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_code_expires_after_60_seconds() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        let params = authorization_params("s", "payments");
        let code = approve(&provider, &params).await;
        tokio::time::advance(Duration::from_secs(59)).await;
        let young = exchange(&provider, &code, REDIRECT, Some(VERIFIER)).await;
        assert_eq!(young.status, StatusCode::OK, "still valid at 59 s");

        let code = approve(&provider, &params).await;
        tokio::time::advance(CODE_LIFETIME).await;
        let old = exchange(&provider, &code, REDIRECT, Some(VERIFIER)).await;
        assert_eq!(old.status, StatusCode::BAD_REQUEST);
        assert_eq!(old.json()["error"], "invalid_grant", "expired at 60 s");
    }

    #[tokio::test]
    async fn a_bad_client_redirect_uri_or_response_type_gets_a_400_page_and_no_redirect() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        let good = authorization_params("s", "payments");
        let with = |name: &str, value: &'static str| -> Vec<(&'static str, &'static str)> {
            good.iter()
                .map(|&(k, v)| (k, if k == name { value } else { v }))
                .filter(|(_, v)| !v.is_empty())
                .collect()
        };
        let cases = [
            ("unknown client", with("client_id", "evil-client")),
            ("missing client", with("client_id", "")),
            ("missing redirect_uri", with("redirect_uri", "")),
            ("relative redirect_uri", with("redirect_uri", "/callback")),
            (
                "non-http redirect_uri",
                with("redirect_uri", "javascript:alert(1)"),
            ),
            (
                "redirect_uri with fragment",
                with("redirect_uri", "http://127.0.0.1:9/cb#x"),
            ),
            ("implicit response_type", with("response_type", "token")),
            ("missing response_type", with("response_type", "")),
        ];
        for (case, pairs) in cases {
            let reply = get_authorize(&provider, &pairs).await;
            assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{case} is a 400");
            assert!(
                reply.headers.get(header::LOCATION).is_none(),
                "{case} must not redirect"
            );
            assert_eq!(
                reply.headers[header::CONTENT_TYPE],
                "text/html; charset=utf-8"
            );
            assert!(!html(&reply).contains("<form"), "{case} shows no form");

            let mut posted = pairs.clone();
            posted.extend([
                ("username", "alice"),
                ("password", "alice-password"),
                ("decision", "approve"),
            ]);
            let reply = post_authorize(&provider, &posted).await;
            assert_eq!(
                reply.status,
                StatusCode::BAD_REQUEST,
                "{case} is a 400 on POST"
            );
            assert!(reply.headers.get(header::LOCATION).is_none());
        }
        let page = html(&get_authorize(&provider, &with("client_id", "evil-client")).await);
        assert!(
            page.contains("client_id"),
            "the page says what is wrong: {page}"
        );
        assert_eq!(provider.authorization_codes_issued(), 0);
    }

    #[tokio::test]
    async fn plain_or_malformed_pkce_is_sent_back_as_invalid_request() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        let base = [
            ("response_type", "code"),
            ("client_id", CREDS.0),
            ("redirect_uri", REDIRECT),
            ("state", "s"),
        ];
        for pkce in [
            vec![
                ("code_challenge", CHALLENGE),
                ("code_challenge_method", "plain"),
            ],
            vec![("code_challenge", CHALLENGE)],
            vec![
                ("code_challenge", "short"),
                ("code_challenge_method", "S256"),
            ],
            vec![("code_challenge_method", "S256")],
        ] {
            let mut pairs = base.to_vec();
            pairs.extend(pkce.iter().copied());
            let reply = get_authorize(&provider, &pairs).await;
            let (location_base, query) = location(&reply);
            assert_eq!(location_base, REDIRECT);
            assert_eq!(pair(&query, "error"), Some("invalid_request"), "{pkce:?}");
            assert_eq!(pair(&query, "state"), Some("s"));
        }
    }

    #[tokio::test]
    async fn repeated_parameters_and_other_methods_are_refused() {
        let provider = MockProvider::start(ProviderConfig::default())
            .await
            .expect("the mock provider should start");
        let mut pairs = authorization_params("s", "payments");
        pairs.push(("redirect_uri", "http://127.0.0.1:9/evil"));
        let reply = get_authorize(&provider, &pairs).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "RFC 6749 §3.1");
        assert!(reply.headers.get(header::LOCATION).is_none());

        let req = Request::delete(provider.authorize_url())
            .body(Full::new(Bytes::new()))
            .expect("valid request");
        let reply = send(&client(), req).await;
        assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(reply.headers[header::ALLOW], "GET, POST");
    }
}
