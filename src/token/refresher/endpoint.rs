//! The token endpoint: one HTTP request per call, its answer parsed into a
//! [`TokenSet`] or a [`TokenError`] that never holds a secret or a response body.
//!
//! The refresher reaches it through [`TokenSource`], so its state machine can be
//! driven by a scripted source in tests, without HTTP.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Limited};

use crate::clock::SharedClock;
use crate::config::{Grant, TokenConfig};
use crate::http::client::HttpClient;
use crate::jose::ProofKey;
use crate::metrics::NonceWhere;
use crate::secret::Secret;
use crate::token::assertion;
use crate::token::dialect::{build_request, redactor, GrantKind};
use crate::token::dpop::{Dpop, DPOP_HEADER, USE_DPOP_NONCE};
use crate::token::response::{
    parse_error_redacted, parse_success_with, ProviderError, ResponseError, TokenSet,
};
use crate::token::Outcome;

/// Largest token endpoint response read; anything longer is an error.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// The answer to one token request, boxed so [`TokenSource`] is object safe.
pub(crate) type TokenFuture<'a> =
    Pin<Box<dyn Future<Output = Result<TokenSet, TokenError>> + Send + 'a>>;

/// Where the refresher gets its tokens: the provider's endpoint in the sidecar,
/// a scripted source in the refresher's tests.
pub(crate) trait TokenSource: Send + Sync + 'static {
    /// One token request of `kind` as `config` describes it.
    fn request<'a>(&'a self, config: &'a TokenConfig, kind: GrantKind<'a>) -> TokenFuture<'a>;
}

impl TokenSource for TokenEndpoint {
    fn request<'a>(&'a self, config: &'a TokenConfig, kind: GrantKind<'a>) -> TokenFuture<'a> {
        Box::pin(self.call(config, kind))
    }
}

/// Why a token endpoint call failed. Never holds a secret or a response body.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The connection could not be made; the request was not sent.
    #[error("cannot connect to token endpoint {url}: {detail}")]
    Unreachable {
        /// Endpoint URL.
        url: String,
        /// Cause.
        detail: String,
    },
    /// The request may have reached the provider, but no answer came back.
    #[error("token endpoint {url} failed before answering: {detail}")]
    Broken {
        /// Endpoint URL.
        url: String,
        /// Cause.
        detail: String,
    },
    /// No answer within `token.timeout`.
    #[error("token endpoint {url} did not answer within {timeout}")]
    Timeout {
        /// Endpoint URL.
        url: String,
        /// The configured timeout, human readable.
        timeout: String,
    },
    /// The provider answered with an error status.
    #[error("token endpoint {url} answered {error}")]
    Provider {
        /// Endpoint URL.
        url: String,
        /// What it said.
        error: ProviderError,
        /// Its `Retry-After`, if any.
        retry_after: Option<Duration>,
    },
    /// A 3xx: redirects are never followed with credentials.
    #[error("token endpoint {url} answered {status}; redirects are not followed")]
    Redirect {
        /// Endpoint URL.
        url: String,
        /// The status.
        status: StatusCode,
    },
    /// A 2xx whose body is not a usable token response.
    #[error("token endpoint {url} sent an unusable response: {source}")]
    Response {
        /// Endpoint URL.
        url: String,
        /// What was wrong.
        #[source]
        source: ResponseError,
    },
    /// The client's assertion could not be made or read; nothing was sent.
    #[error("cannot authenticate to token endpoint {url}: {reason}")]
    ClientAuthentication {
        /// Endpoint URL.
        url: String,
        /// Why (never the assertion or a key).
        reason: String,
    },
    /// The token came back but cannot be used as configured.
    #[error("token from {url} cannot be used: {reason}")]
    Unusable {
        /// Endpoint URL.
        url: String,
        /// Why.
        reason: String,
    },
}

impl TokenError {
    /// Whether the provider refused (as opposed to failing).
    pub fn is_rejection(&self) -> bool {
        matches!(self, TokenError::Provider { error, .. } if error.is_rejection())
    }

    /// Whether a `[[token.errors]]` rule says a person must authorize again.
    pub fn needs_authorization(&self) -> bool {
        matches!(self, TokenError::Provider { error, .. } if error.needs_authorization())
    }

    /// Whether the provider may have acted on the request although we saw no
    /// usable answer (so a rotating refresh token may already be spent).
    pub fn is_ambiguous(&self) -> bool {
        matches!(
            self,
            TokenError::Broken { .. } | TokenError::Timeout { .. } | TokenError::Response { .. }
        )
    }

    /// The error as the app may see it (`token_unavailable` detail): the provider's
    /// refusal as its RFC 6749 code and a fixed description, never its own text.
    pub fn app_message(&self) -> String {
        match self {
            TokenError::Provider { url, error, .. } => {
                format!("token endpoint {url} answered {}", error.app_summary())
            }
            other => other.to_string(),
        }
    }

    pub(crate) fn outcome(&self) -> Outcome {
        if self.is_rejection() {
            Outcome::Rejected
        } else {
            Outcome::Error
        }
    }

    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            TokenError::Provider { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Calls a token endpoint over the shared pooled client.
#[derive(Clone)]
pub struct TokenEndpoint {
    http: HttpClient,
    clock: SharedClock,
    /// The client's DPoP state: every request then carries a proof.
    dpop: Option<Arc<Dpop>>,
}

impl TokenEndpoint {
    /// An endpoint caller using `http` and reading wall time from `clock`.
    pub fn new(http: HttpClient, clock: SharedClock) -> Self {
        TokenEndpoint {
            http,
            clock,
            dpop: None,
        }
    }

    /// The same caller, with a DPoP proof of `dpop`'s key on every request.
    pub fn with_dpop(mut self, dpop: Option<Arc<Dpop>>) -> Self {
        self.dpop = dpop;
        self
    }

    /// The HTTP client requests to the provider go through.
    pub(crate) fn http(&self) -> &HttpClient {
        &self.http
    }

    /// The wall clock assertions are dated by.
    pub(crate) fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// One token request as a fresh start would make it: the refresh grant with the
    /// configured refresh token for `grant = "refresh_token"`, else the primary grant.
    pub async fn obtain_once(&self, config: &TokenConfig) -> Result<TokenSet, TokenError> {
        match (&config.grant, &config.refresh_token) {
            (Grant::RefreshToken, Some(rt)) => self.call(config, GrantKind::Refresh(rt)).await,
            _ => self.call(config, GrantKind::Primary).await,
        }
    }

    /// Exchanges an authorization code (`tokenproxy authorize`, connect);
    /// a subject's exchange is signed with the subject's `key`.
    pub async fn exchange_code(
        &self,
        config: &TokenConfig,
        code: &Secret,
        redirect_uri: &str,
        verifier: Option<&Secret>,
        key: Option<&ProofKey>,
    ) -> Result<TokenSet, TokenError> {
        let kind = GrantKind::AuthorizationCode {
            code,
            redirect_uri,
            verifier,
        };
        self.call_signed(config, kind, key).await
    }

    /// One token request of `kind`, bounded by `config.timeout`. A DPoP
    /// client whose proof the endpoint answers with `use_dpop_nonce` (and a
    /// nonce) sends it once more, with a new proof carrying the nonce and a
    /// new client assertion: the first one's `jti` is spent (RFC 9449 §8).
    pub(crate) async fn call(
        &self,
        config: &TokenConfig,
        kind: GrantKind<'_>,
    ) -> Result<TokenSet, TokenError> {
        self.call_signed(config, kind, None).await
    }

    /// As [`TokenEndpoint::call`], the proofs of a DPoP client signed with
    /// `key` (a subject's) instead of the client's own key.
    pub(crate) async fn call_signed(
        &self,
        config: &TokenConfig,
        kind: GrantKind<'_>,
        key: Option<&ProofKey>,
    ) -> Result<TokenSet, TokenError> {
        let url_ref = match kind {
            GrantKind::Refresh(_) => config.refresh_url.as_ref().unwrap_or(&config.url),
            GrantKind::Primary | GrantKind::AuthorizationCode { .. } => &config.url,
            GrantKind::Revoke { url, .. } => url,
        };
        let url = display_url(url_ref);
        let attempts = async {
            let mut challenged = false;
            loop {
                let (result, nonce_demanded) = self.attempt(config, kind, url_ref, &url, key).await;
                match (&self.dpop, nonce_demanded && !challenged) {
                    (Some(dpop), true) => {
                        challenged = true;
                        dpop.nonce_retry(NonceWhere::Token);
                    }
                    _ => return result,
                }
            }
        };
        match tokio::time::timeout(config.timeout, attempts).await {
            Ok(result) => result,
            Err(_elapsed) => Err(TokenError::Timeout {
                url,
                timeout: humantime::format_duration(config.timeout).to_string(),
            }),
        }
    }

    /// One request to `url_ref`; with it, whether the endpoint demanded a
    /// DPoP nonce and sent one that the next proof will carry.
    async fn attempt(
        &self,
        config: &TokenConfig,
        kind: GrantKind<'_>,
        url_ref: &http::Uri,
        url: &str,
        key: Option<&ProofKey>,
    ) -> (Result<TokenSet, TokenError>, bool) {
        let unusable = |reason: String| TokenError::ClientAuthentication {
            url: url.to_owned(),
            reason,
        };
        // A new assertion for every attempt: providers accept each one once.
        let assertion = match assertion::for_request(config, url_ref, self.clock.wall_now()).await {
            Ok(a) => a,
            Err(reason) => return (Err(unusable(reason)), false),
        };
        // Provider text that repeats a credential of this request is scrubbed once, here.
        let mut redactor = redactor(config, kind, assertion.as_ref());
        let mut request = match build_request(config, kind, assertion.as_ref()) {
            Ok(r) => r,
            Err(e) => {
                let reason = format!("cannot build request: {e}");
                let e = TokenError::Unusable {
                    url: url.to_owned(),
                    reason,
                };
                return (Err(e), false);
            }
        };
        // Revocation (RFC 7009) takes no proof.
        let dpop = self
            .dpop
            .as_ref()
            .filter(|_| !matches!(kind, GrantKind::Revoke { .. }));
        if let Some(dpop) = dpop {
            let proof = match key {
                Some(key) => dpop.token_proof_with(key, url_ref),
                None => dpop.token_proof(url_ref).await,
            };
            match proof {
                Ok(proof) => {
                    // A proof is a credential too (usable until its iat is old).
                    if let Ok(text) = proof.to_str() {
                        redactor.secret(text);
                    }
                    request.headers_mut().insert(DPOP_HEADER.clone(), proof);
                }
                Err(e) => return (Err(unusable(e.to_string())), false),
            }
        }
        let response = match self.http.request(request).await {
            Ok(r) => r,
            Err(e) => {
                let detail = error_chain(&e);
                let e = if e.is_connect() {
                    TokenError::Unreachable {
                        url: url.to_owned(),
                        detail,
                    }
                } else {
                    TokenError::Broken {
                        url: url.to_owned(),
                        detail,
                    }
                };
                return (Err(e), false);
            }
        };
        let status = response.status();
        let new_nonce = dpop.is_some_and(|d| d.note_token_nonce(url_ref, response.headers()));
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body: Bytes = match Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                let e = TokenError::Broken {
                    url: url.to_owned(),
                    detail: format!("reading the response body: {e}"),
                };
                return (Err(e), false);
            }
        };
        if status.is_success() {
            let now = self.clock.wall_now();
            let parsed = parse_success_with(&body, now, &config.response).map_err(|source| {
                TokenError::Response {
                    url: url.to_owned(),
                    source,
                }
            });
            return (parsed, false);
        }
        if status.is_redirection() {
            let e = TokenError::Redirect {
                url: url.to_owned(),
                status,
            };
            return (Err(e), false);
        }
        let error =
            parse_error_redacted(status, &body, &redactor).classified(&config.errors, &body);
        let nonce_demanded = new_nonce && error.error.as_deref() == Some(USE_DPOP_NONCE);
        let e = TokenError::Provider {
            url: url.to_owned(),
            error,
            retry_after,
        };
        (Err(e), nonce_demanded)
    }
}

/// A URL for messages: scheme, authority and path, never the query.
pub(super) fn display_url(uri: &http::Uri) -> String {
    format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or("http"),
        uri.authority().map(|a| a.as_str()).unwrap_or(""),
        uri.path()
    )
}

/// A provider's `token_type` for messages: quoted when it looks like a scheme name,
/// else not shown (it is provider text and could carry anything).
pub(super) fn shown_token_type(token_type: Option<&str>) -> String {
    match token_type {
        Some(t)
            if t.len() <= 32
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) =>
        {
            format!("{t:?}")
        }
        Some(_) => "not a scheme name (not shown)".to_owned(),
        None => "missing".to_owned(),
    }
}

/// An error and its sources on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
