//! The refresher: one task per client that owns every token request.
//!
//! Because only this task talks to the token endpoint, there is never more than
//! one token request per client in flight (single flight), and a rotating refresh
//! token is used exactly once: the task replaces it with the new one before it
//! can start another request.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Limited};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::dialect::{build_request, redactor, GrantKind};
use super::response::{
    parse_error_redacted, parse_success, LifetimeSource, ProviderError, ResponseError, TokenSet,
    MAX_LIFETIME,
};
use super::state::{LastRefresh, State, StateCell, Status};
use super::{Command, Outcome, Shared, Token, Trigger};
use crate::clock::{epoch_seconds, rfc3339, wall_after, SharedClock};
use crate::config::{ClientConfig, Grant, InjectConfig, TokenConfig};
use crate::http::client::HttpClient;
use crate::metrics::ClientMetrics;
use crate::secret::Secret;
use crate::store::{ClientStore, Lease};

mod stored;

/// Largest token endpoint response read; anything longer is an error.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Backoff after the first failure; doubles per failure up to [`BACKOFF_MAX`].
const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Longest backoff between failed token requests.
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Longest wait a provider's `Retry-After` can impose.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);
/// Shortest access token lifetime the sidecar will use.
const MIN_LIFETIME: Duration = Duration::from_secs(1);
/// Lifetime assumed when a provider's absolute expiry is already past on our clock.
const SKEW_FALLBACK_LIFETIME: Duration = Duration::from_secs(60);

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

    fn outcome(&self) -> Outcome {
        if self.is_rejection() {
            Outcome::Rejected
        } else {
            Outcome::Error
        }
    }

    fn retry_after(&self) -> Option<Duration> {
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
}

impl TokenEndpoint {
    /// An endpoint caller using `http` and reading wall time from `clock`.
    pub fn new(http: HttpClient, clock: SharedClock) -> Self {
        TokenEndpoint { http, clock }
    }

    /// One token request as a fresh start would make it: the refresh grant with the
    /// configured refresh token for `grant = "refresh_token"`, else the primary grant.
    pub async fn obtain_once(&self, config: &TokenConfig) -> Result<TokenSet, TokenError> {
        match (&config.grant, &config.refresh_token) {
            (Grant::RefreshToken, Some(rt)) => self.call(config, GrantKind::Refresh(rt)).await,
            _ => self.call(config, GrantKind::Primary).await,
        }
    }

    /// Exchanges an authorization code (`tokenproxy authorize`).
    pub async fn exchange_code(
        &self,
        config: &TokenConfig,
        code: &Secret,
        redirect_uri: &str,
        verifier: Option<&Secret>,
    ) -> Result<TokenSet, TokenError> {
        let kind = GrantKind::AuthorizationCode {
            code,
            redirect_uri,
            verifier,
        };
        self.call(config, kind).await
    }

    /// One token request of `kind`, bounded by `config.timeout`.
    pub(crate) async fn call(
        &self,
        config: &TokenConfig,
        kind: GrantKind<'_>,
    ) -> Result<TokenSet, TokenError> {
        let url_ref = match kind {
            GrantKind::Refresh(_) => config.refresh_url.as_ref().unwrap_or(&config.url),
            GrantKind::Primary | GrantKind::AuthorizationCode { .. } => &config.url,
        };
        let url = display_url(url_ref);
        // Provider text that repeats a credential of this request is scrubbed once, here.
        let redactor = redactor(config, kind);
        let request = build_request(config, kind).map_err(|e| TokenError::Unusable {
            url: url.clone(),
            reason: format!("cannot build request: {e}"),
        })?;
        let exchange = async {
            let response = self.http.request(request).await.map_err(|e| {
                let detail = error_chain(&e);
                if e.is_connect() {
                    TokenError::Unreachable {
                        url: url.clone(),
                        detail,
                    }
                } else {
                    TokenError::Broken {
                        url: url.clone(),
                        detail,
                    }
                }
            })?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body: Bytes = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| TokenError::Broken {
                    url: url.clone(),
                    detail: format!("reading the response body: {e}"),
                })?
                .to_bytes();
            if status.is_success() {
                parse_success(&body, self.clock.wall_now()).map_err(|source| TokenError::Response {
                    url: url.clone(),
                    source,
                })
            } else if status.is_redirection() {
                Err(TokenError::Redirect {
                    url: url.clone(),
                    status,
                })
            } else {
                Err(TokenError::Provider {
                    url: url.clone(),
                    error: parse_error_redacted(status, &body, &redactor),
                    retry_after,
                })
            }
        };
        match tokio::time::timeout(config.timeout, exchange).await {
            Ok(result) => result,
            Err(_elapsed) => Err(TokenError::Timeout {
                url,
                timeout: humantime::format_duration(config.timeout).to_string(),
            }),
        }
    }
}

/// A URL for messages: scheme, authority and path, never the query.
fn display_url(uri: &http::Uri) -> String {
    format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or("http"),
        uri.authority().map(|a| a.as_str()).unwrap_or(""),
        uri.path()
    )
}

/// A provider's `token_type` for messages: quoted when it looks like a scheme name,
/// else not shown (it is provider text and could carry anything).
fn shown_token_type(token_type: Option<&str>) -> String {
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

struct HeldRefreshToken {
    value: Secret,
    usable_until: Option<Instant>,
    expires_wall: Option<SystemTime>,
}

/// The raw access token behind the current header, kept to be persisted.
struct HeldAccessToken {
    value: Secret,
    expires_wall: Option<SystemTime>,
    lifetime: Option<Duration>,
}

/// Where a published token came from.
enum Origin {
    /// A token endpoint call.
    Provider {
        trigger: Trigger,
        grant: &'static str,
        source: &'static str,
    },
    /// The store: written by an earlier run or another replica.
    Store { generation: u64 },
}

/// Why the refresher wakes up on its own.
#[derive(Clone, Copy, Debug)]
enum Wake {
    /// Time to obtain a token.
    Refresh(Trigger),
    /// State the store has not taken yet is to be written again.
    WriteBack,
    /// In `needs_authorization`: look for a refresh token stored by another process.
    CheckStore,
}

/// The token state a stopping refresher hands to the refresher of the reloaded
/// client, so that a reload never starts again from a bootstrap refresh token
/// the provider rotated long ago. Holds secrets; never printed.
pub struct Handover {
    refresh_token: Option<HeldRefreshToken>,
    access: Option<HeldAccessToken>,
    current: Option<Arc<Token>>,
    refresh_at: Option<Instant>,
    generation: u64,
    failures: u32,
    retry_at: Option<Instant>,
    needs_authorization: Option<Option<String>>,
    store: stored::StoreHandover,
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover")
            .field("has_refresh_token", &self.refresh_token.is_some())
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// The background task that obtains and renews one client's token.
pub struct Refresher {
    client: String,
    config: Arc<TokenConfig>,
    inject: InjectConfig,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    endpoint: TokenEndpoint,
    metrics: ClientMetrics,
    clock: SharedClock,
    refresh_token: Option<HeldRefreshToken>,
    access: Option<HeldAccessToken>,
    current: Option<Arc<Token>>,
    refresh_at: Option<Instant>,
    generation: u64,
    failures: u32,
    retry_at: Option<Instant>,
    needs_authorization: bool,
    store: stored::StoreLink,
    /// What a person does to leave `needs_authorization`, naming the command.
    recovery: String,
    /// Started from a predecessor's [`Handover`].
    taken_over: bool,
}

impl Refresher {
    /// Builds the handle and refresher for `client`; spawn [`Refresher::run`].
    pub fn new(
        client: &ClientConfig,
        endpoint: TokenEndpoint,
        metrics: ClientMetrics,
        clock: SharedClock,
        store: ClientStore,
    ) -> (super::TokenHandle, Refresher) {
        let (handle, shared, commands) = super::channel(client.token_wait_timeout);
        let refresh_token = client
            .token
            .refresh_token
            .clone()
            .map(|value| HeldRefreshToken {
                value,
                usable_until: None,
                expires_wall: None,
            });
        let refresher = Refresher {
            client: client.name.clone(),
            config: Arc::new(client.token.clone()),
            inject: client.inject.clone(),
            shared,
            commands,
            endpoint,
            metrics,
            clock,
            refresh_token,
            access: None,
            current: None,
            refresh_at: None,
            generation: 0,
            failures: 0,
            retry_at: None,
            needs_authorization: false,
            store: stored::StoreLink::new(store),
            taken_over: false,
            recovery: match &client.authorize {
                Some(_) => format!(
                    "a person must log in: run `tokenproxy authorize {} --config <file>`",
                    client.name
                ),
                None => format!(
                    "a person must authorize again, then run `tokenproxy token {} --config <file> --refresh-token-from-stdin` with the new refresh token",
                    client.name
                ),
            },
        };
        refresher.publish(|s| s.has_refresh_token = refresher.refresh_token.is_some());
        (handle, refresher)
    }

    /// Starts from a predecessor's state (a reload of the same account): its
    /// refresh token, which may have been rotated since the configured bootstrap
    /// token, its access token (published at once, so no request of the reloaded
    /// client waits), and where it stood with the store.
    pub fn take_over(&mut self, handover: Handover) {
        self.refresh_token = handover.refresh_token;
        self.access = handover.access;
        self.generation = handover.generation;
        self.failures = handover.failures;
        self.store.take_over(handover.store);
        let now = Instant::now();
        // A provider's Retry-After is honoured across the reload too.
        self.retry_at = handover.retry_at.filter(|at| *at > now);
        self.taken_over = self.retry_at.is_some() || handover.needs_authorization.is_some();
        let wall_now = self.clock.wall_now();
        let rt_held = self.refresh_token.is_some();
        let rt_wall = self.refresh_token.as_ref().and_then(|r| r.expires_wall);
        let access_wall = self.access.as_ref().and_then(|a| a.expires_wall);
        if let Some(token) = handover.current.filter(|t| t.is_usable(now)) {
            self.taken_over = true;
            self.shared.current.store(Some(Arc::clone(&token)));
            self.current = Some(token);
            self.refresh_at = handover.refresh_at;
            let next_wall = self
                .refresh_at
                .map(|at| wall_now + at.saturating_duration_since(now));
            let generation = self.generation;
            self.publish(|s| {
                s.state = StateCell(State::Valid);
                s.generation = generation;
                s.access_token_expires_at = access_wall.map(rfc3339);
                s.next_refresh_at = next_wall.map(rfc3339);
            });
            self.metrics.set_state(State::Valid);
            self.metrics
                .set_expiry(access_wall.map(epoch_seconds).unwrap_or(f64::INFINITY));
        }
        self.publish(|s| {
            s.has_refresh_token = rt_held;
            s.refresh_token_expires_at = rt_wall.map(rfc3339);
        });
        if self.current.is_none() {
            if let Some(retry_at) = self.retry_at {
                self.publish(|s| s.retry_at = Some(retry_at));
                self.set_state(State::Unavailable);
            }
        }
        if let Some(reason) = handover.needs_authorization {
            self.needs_authorization = true;
            if self.store.client.is_persistent() {
                self.store.check_at = Some(now + stored::AUTHORIZATION_POLL);
            }
            self.publish(|s| {
                s.reason = reason;
                s.next_refresh_at = None;
            });
            self.set_state(State::NeedsAuthorization);
        }
        info!(client = %self.client, generation = self.generation,
            "reloaded client took over the token state of its previous configuration");
    }

    /// Starts after a predecessor that did not stop in time: it may have sent
    /// its refresh token without seeing the answer, so the configured bootstrap
    /// refresh token is not sent (the store, if any, still has the newest).
    pub fn take_over_unknown(&mut self) {
        if self.refresh_token.take().is_some() {
            warn!(client = %self.client,
                "the previous refresher of this client stopped in an unknown state: its refresh token is not sent again");
            self.publish(|s| s.has_refresh_token = false);
        }
    }

    fn into_handover(self) -> Handover {
        let reason = self.shared.status.borrow().reason.clone();
        Handover {
            refresh_token: self.refresh_token,
            access: self.access,
            current: self.current,
            refresh_at: self.refresh_at,
            generation: self.generation,
            failures: self.failures,
            retry_at: self.retry_at,
            needs_authorization: self.needs_authorization.then_some(reason),
            store: self.store.into_handover(),
        }
    }

    /// Names the configuration file in the command shown to leave `needs_authorization`.
    pub fn set_config_path(&mut self, path: &std::path::Path) {
        self.recovery = self.recovery.replace("<file>", &path.display().to_string());
    }

    /// Runs until aborted: obtains the first token, then renews ahead of expiry,
    /// on demand and after a 401.
    pub async fn run(mut self) {
        if self.store.client.is_persistent() {
            self.metrics.store_init();
            self.publish_store();
        }
        // A refresher that took over from its predecessor starts with its token
        // (or its needs_authorization) and asks for nothing until it is due.
        let mut trigger = (!self.taken_over).then_some(Trigger::Startup);
        loop {
            if let Some(t) = trigger.take() {
                self.obtain(t).await;
            }
            let wake = self.next_wake();
            tokio::select! {
                () = sleep_until_opt(wake.map(|w| w.0)) => match wake.map(|w| w.1) {
                    Some(Wake::Refresh(t)) => trigger = Some(t),
                    Some(Wake::WriteBack) => self.write_back().await,
                    Some(Wake::CheckStore) => trigger = self.check_store_for_authorization().await,
                    None => {}
                },
                command = self.commands.recv() => match command {
                    None => return,
                    Some(Command::Need) => trigger = self.on_need(),
                    Some(Command::Rejected(generation)) => trigger = self.on_rejected(generation),
                    Some(Command::NewRefreshToken(token)) => trigger = self.on_new_refresh_token(token),
                    Some(Command::Stop(reply)) => {
                        info!(client = %self.client, "refresher stopped between token requests (reload, removal or shutdown)");
                        // A successor that is gone (the reload failed) loses nothing the
                        // store does not have: it is written before every use.
                        let _successor_gone = reply.send(self.into_handover());
                        return;
                    }
                }
            }
        }
    }

    fn has_primary_grant(&self) -> bool {
        !matches!(self.config.grant, Grant::RefreshToken)
    }

    fn token_usable(&self, now: Instant) -> bool {
        self.current.as_ref().is_some_and(|t| t.is_usable(now))
    }

    fn next_wake(&self) -> Option<(Instant, Wake)> {
        let write_back = self.store.write_back_at.map(|at| (at, Wake::WriteBack));
        [self.next_refresh(), write_back]
            .into_iter()
            .flatten()
            .min_by_key(|w| w.0)
    }

    fn next_refresh(&self) -> Option<(Instant, Wake)> {
        let now = Instant::now();
        if self.needs_authorization {
            // Keep serving the last token; wake when it dies to update the state,
            // and look in the store for a refresh token another process put there.
            let expiry = self
                .current
                .as_ref()
                .filter(|t| t.is_usable(now))
                .and_then(|t| t.usable_until)
                .map(|at| (at, Wake::Refresh(Trigger::Expired)));
            let check = self.store.check_at.map(|at| (at, Wake::CheckStore));
            return [expiry, check].into_iter().flatten().min_by_key(|w| w.0);
        }
        let trigger = if self.token_usable(now) {
            Trigger::Proactive
        } else {
            Trigger::Expired
        };
        if let Some(at) = self.store.recheck_at {
            return Some((at, Wake::Refresh(trigger)));
        }
        if let Some(at) = self.retry_at {
            return Some((at, Wake::Refresh(trigger)));
        }
        self.refresh_at
            .map(|at| (at, Wake::Refresh(Trigger::Proactive)))
    }

    fn on_need(&mut self) -> Option<Trigger> {
        let now = Instant::now();
        if self.token_usable(now) {
            // Wake the waiter so it re-reads the cell.
            self.publish(|_| {});
            return None;
        }
        if self.needs_authorization {
            self.set_state(State::NeedsAuthorization);
            return None;
        }
        if self.store.following() || self.store.waiting() {
            // Another replica is refreshing, or the store is down and only it may
            // let this client refresh: the next look at the store is planned.
            return None;
        }
        if self.retry_at.is_some_and(|at| at > now) {
            self.set_state(State::Unavailable);
            return None;
        }
        Some(Trigger::Expired)
    }

    fn on_rejected(&mut self, generation: u64) -> Option<Trigger> {
        let is_current = self
            .current
            .as_ref()
            .is_some_and(|t| t.generation == generation);
        if !is_current {
            self.publish(|_| {});
            return None;
        }
        if self.needs_authorization {
            self.set_state(State::NeedsAuthorization);
            return None;
        }
        if self.retry_at.is_some_and(|at| at > Instant::now()) {
            // Backing off (a provider's Retry-After among others): the token keeps
            // serving, and waiters for a newer one are answered at once.
            self.publish(|_| {});
            return None;
        }
        // The token keeps serving until the next one is installed: a 401 may be
        // about one resource only, and a failed refresh must not blank the client.
        info!(client = %self.client, generation, "upstream rejected the token; refreshing");
        Some(Trigger::Unauthorized)
    }

    fn on_new_refresh_token(&mut self, token: Secret) -> Option<Trigger> {
        info!(client = %self.client, "a new refresh token was provided; using it now");
        self.start_operator_trial(HeldRefreshToken {
            value: token,
            usable_until: None,
            expires_wall: None,
        });
        self.needs_authorization = false;
        self.store.check_at = None;
        self.failures = 0;
        self.retry_at = None;
        self.publish(|s| {
            s.has_refresh_token = true;
            s.refresh_token_expires_at = None;
            s.reason = None;
            s.retry_at = None;
        });
        Some(Trigger::Startup)
    }

    async fn obtain(&mut self, trigger: Trigger) {
        if self.needs_authorization {
            return;
        }
        let starting = self.generation == 0 && self.failures == 0;
        if !starting && !self.store.following() {
            self.set_state(State::Refreshing);
        }
        let mut lease = None;
        let mut primary_only = false;
        if self.store.client.is_persistent() {
            match self.coordinate().await {
                stored::Coordination::Adopted
                | stored::Coordination::Locked
                | stored::Coordination::SpentElsewhere => return,
                stored::Coordination::Follow => {
                    self.follow();
                    return;
                }
                stored::Coordination::Lead {
                    lease: l,
                    primary_only: p,
                } => {
                    lease = Some(l);
                    primary_only = p;
                }
                stored::Coordination::Unreachable => match self.wait_for_store() {
                    stored::StoreWait::Wait => return,
                    stored::StoreWait::Local { spend_nothing } => primary_only = spend_nothing,
                },
            }
        }
        let outcome = self
            .request_token(trigger, lease.as_ref(), primary_only)
            .await;
        if let Some(lease) = lease {
            self.finish_lease(lease, outcome).await;
        }
    }

    /// Calls the token endpoint until a token is installed or a failure backs
    /// off; `Err` carries the backoff delay. With `primary_only` (a shared
    /// store that cannot be reached) the held refresh token is kept, unspent,
    /// and the primary grant is used.
    async fn request_token(
        &mut self,
        trigger: Trigger,
        lease: Option<&Lease>,
        primary_only: bool,
    ) -> Result<(), Duration> {
        self.store
            .set_role(if lease.is_some() && self.store.client.is_shared() {
                Some("leader")
            } else if self.store.client.is_shared() {
                Some("local")
            } else {
                None
            });
        let mut first = true;
        loop {
            if !first {
                self.keep_lease(lease).await;
            }
            first = false;
            let now = Instant::now();
            let refresh = self
                .refresh_token
                .as_ref()
                .filter(|rt| rt.usable_until.is_none_or(|t| now < t))
                .map(|rt| rt.value.clone());
            if refresh.is_none() && self.refresh_token.is_some() {
                debug!(client = %self.client, "refresh token expired; dropping it");
                self.refresh_token = None;
            }
            let refresh = refresh.filter(|_| !primary_only);
            let kind = match &refresh {
                Some(rt) => GrantKind::Refresh(rt),
                None if self.has_primary_grant() => GrantKind::Primary,
                None => {
                    self.enter_needs_authorization(
                        "no usable refresh token and no other credential configured".into(),
                    );
                    return Ok(());
                }
            };
            let grant = kind.label(&self.config);
            let started = Instant::now();
            let result = self.endpoint.call(&self.config, kind).await;
            let result = match result {
                Ok(set) => self.install(set, trigger, grant).await,
                Err(e) => Err(e),
            };
            // A refresh token sent without an answer to use stays marked as
            // spending in the store (see `store/redis.rs`).
            self.store.settle(match &result {
                Ok(()) | Err(TokenError::Provider { .. } | TokenError::Redirect { .. }) => {
                    Some(true)
                }
                Err(TokenError::Unreachable { .. }) => None,
                Err(_) => matches!(kind, GrantKind::Refresh(_)).then_some(false),
            });
            let elapsed = started.elapsed().as_secs_f64();
            match result {
                Ok(()) => {
                    self.metrics
                        .token_request(trigger, grant, Outcome::Success, elapsed);
                    return Ok(());
                }
                Err(e) => {
                    let outcome = e.outcome();
                    self.metrics.token_request(trigger, grant, outcome, elapsed);
                    self.record_failure(trigger, grant, outcome, &e);
                    let was_refresh = matches!(kind, GrantKind::Refresh(_));
                    if was_refresh && e.is_rejection() {
                        match self.end_operator_trial(&e) {
                            Some(true) => continue,
                            Some(false) => return Ok(()),
                            None => {}
                        }
                        warn!(client = %self.client, error = %e, "refresh token rejected; dropping it");
                        self.drop_refresh_token();
                        if self.has_primary_grant() {
                            continue;
                        }
                        self.enter_needs_authorization(format!("refresh token rejected: {e}"));
                        // Tell the store, so that replicas and restarts do not send it again.
                        self.persist().await;
                        return Ok(());
                    }
                    if was_refresh && e.is_ambiguous() && self.has_primary_grant() {
                        // The provider may have rotated the refresh token without our
                        // seeing the answer; sending it again could look like reuse and
                        // revoke the whole grant. The primary grant is safe to repeat.
                        warn!(client = %self.client, error = %e,
                            "refresh outcome unknown; not reusing the refresh token, the next attempt uses the full grant");
                        self.drop_refresh_token();
                        self.persist().await;
                    }
                    return Err(self.back_off(&e));
                }
            }
        }
    }

    fn drop_refresh_token(&mut self) {
        self.refresh_token = None;
        self.publish(|s| {
            s.has_refresh_token = false;
            s.refresh_token_expires_at = None;
        });
    }

    /// Installs a token from a successful response: the new state is persisted
    /// first (a rotated refresh token must outlive a crash right after), then
    /// the token is published.
    async fn install(
        &mut self,
        set: TokenSet,
        trigger: Trigger,
        grant: &'static str,
    ) -> Result<(), TokenError> {
        let url = display_url(&self.config.url);
        if !set.is_bearer() && self.inject.format_is_default {
            return Err(TokenError::Unusable {
                url,
                reason: format!(
                    "token_type is {}, not Bearer; set clients.{}.inject.format to say how to send it",
                    shown_token_type(set.token_type.as_deref()),
                    self.client
                ),
            });
        }
        let lifetime = self.checked_lifetime(&set);
        if let Some(l) = lifetime {
            if l < MIN_LIFETIME {
                return Err(TokenError::Unusable {
                    url,
                    reason: format!(
                        "the token's lifetime ({} ms) is shorter than {} s",
                        l.as_millis(),
                        MIN_LIFETIME.as_secs()
                    ),
                });
            }
        }
        let header = self
            .header_for(&set.access_token)
            .ok_or_else(|| TokenError::Unusable {
                url: url.clone(),
                reason: "the access token has characters not allowed in an HTTP header".into(),
            })?;

        let now = Instant::now();
        let wall_now = self.clock.wall_now();
        // Rotation: hold the new refresh token before anything else can run.
        if let Some(rt) = set.refresh_token {
            let rt_lifetime = match set.refresh_token_lifetime {
                // An expiry already past on our clock is skew, not a dead token just issued.
                Some(l) if l.is_zero() => {
                    warn!(client = %self.client, "refresh token expiry is in the past by our clock; ignoring it");
                    self.config.refresh_token_lifetime
                }
                Some(l) => Some(l),
                None => self.config.refresh_token_lifetime,
            }
            .map(|l| l.min(MAX_LIFETIME));
            self.refresh_token = Some(HeldRefreshToken {
                value: rt,
                usable_until: rt_lifetime.and_then(|l| now.checked_add(l)),
                expires_wall: rt_lifetime.map(|l| wall_after(wall_now, l)),
            });
        }
        self.access = Some(HeldAccessToken {
            value: set.access_token,
            expires_wall: lifetime.map(|l| wall_after(wall_now, l)),
            lifetime,
        });
        if let Some(trial) = &mut self.store.operator_trial {
            trial.proven = true;
        }
        if self.persist().await {
            // Another replica stored a newer token meanwhile, and it was taken instead.
            return Ok(());
        }
        self.store.operator_trial = None;
        let origin = Origin::Provider {
            trigger,
            grant,
            source: set.lifetime_source.as_str(),
        };
        // The lifetime runs from the answer, not from the end of the write
        // (up to a replica acknowledgement timeout later): the token is never
        // sent after the provider's expiry.
        let remaining = lifetime.map(|l| l.saturating_sub(now.elapsed()));
        self.publish_token(header, remaining, lifetime, origin);
        Ok(())
    }

    /// The header value to inject for `access_token`, marked sensitive.
    fn header_for(&self, access_token: &Secret) -> Option<http::HeaderValue> {
        let mut header = http::HeaderValue::from_str(&format!(
            "{}{}{}",
            self.inject.prefix,
            access_token.expose(),
            self.inject.suffix
        ))
        .ok()?;
        header.set_sensitive(true);
        Some(header)
    }

    /// Makes `header` the current token: usable for `remaining`, refreshed ahead
    /// of that by the margin for a token of `lifetime`.
    fn publish_token(
        &mut self,
        header: http::HeaderValue,
        remaining: Option<Duration>,
        lifetime: Option<Duration>,
        origin: Origin,
    ) {
        let now = Instant::now();
        let wall_now = self.clock.wall_now();
        self.generation += 1;
        let token = Arc::new(Token {
            generation: self.generation,
            header,
            usable_until: remaining.and_then(|l| now.checked_add(l)),
            installed_at: now,
        });
        self.shared.current.store(Some(Arc::clone(&token)));
        self.current = Some(token);
        self.refresh_at = remaining.and_then(|r| {
            let margin = refresh_margin(lifetime.unwrap_or(r), self.config.refresh_before);
            now.checked_add(r.saturating_sub(margin))
        });
        self.failures = 0;
        self.retry_at = None;
        self.store.recheck_at = None;
        self.store.set_role(None);
        let expires_wall = remaining.map(|l| wall_after(wall_now, l));
        self.metrics
            .set_expiry(expires_wall.map(epoch_seconds).unwrap_or(f64::INFINITY));
        let next_wall = self
            .refresh_at
            .map(|at| wall_after(wall_now, at.saturating_duration_since(now)));
        let generation = self.generation;
        let last_refresh = match origin {
            Origin::Provider {
                trigger,
                grant,
                source,
            } => {
                info!(
                    client = %self.client,
                    trigger = trigger.as_str(),
                    grant,
                    generation,
                    expires_in_s = remaining.map(|l| l.as_secs()),
                    lifetime_source = source,
                    "token obtained"
                );
                Some(LastRefresh {
                    at: crate::clock::rfc3339(wall_now),
                    trigger: trigger.as_str(),
                    grant,
                    outcome: Outcome::Success.as_str(),
                    error: None,
                    app_error: None,
                })
            }
            Origin::Store {
                generation: stored_generation,
            } => {
                info!(
                    client = %self.client,
                    generation,
                    stored_generation,
                    store = self.store.client.kind(),
                    expires_in_s = remaining.map(|l| l.as_secs()),
                    "token taken from the store"
                );
                self.metrics.store_adopted();
                None
            }
        };
        let (rt_held, rt_wall) = match &self.refresh_token {
            Some(rt) => (true, rt.expires_wall),
            None => (false, None),
        };
        self.publish(|s| {
            s.state = StateCell(State::Valid);
            s.generation = generation;
            s.access_token_expires_at = expires_wall.map(rfc3339);
            s.has_refresh_token = rt_held;
            s.refresh_token_expires_at = rt_wall.map(rfc3339);
            s.next_refresh_at = next_wall.map(rfc3339);
            if let Some(lr) = last_refresh {
                s.last_refresh = Some(lr);
                s.last_success_at = Some(rfc3339(wall_now));
                s.refreshes_succeeded += 1;
            }
            s.reason = None;
            s.retry_at = None;
        });
        self.metrics.set_state(State::Valid);
        self.publish_store();
    }

    /// The access token lifetime to schedule by, measured from now (the moment
    /// the response arrived, on tokio's monotonic clock): the response's, else
    /// `default_lifetime`. A provider's `expires_at` already past on our clock
    /// means clock skew; it is replaced by `default_lifetime` (or 60 s) and logged.
    fn checked_lifetime(&self, set: &TokenSet) -> Option<Duration> {
        match set.lifetime {
            Some(l) if l.is_zero() && set.lifetime_source != LifetimeSource::ExpiresIn => {
                let fallback = self
                    .config
                    .default_lifetime
                    .unwrap_or(SKEW_FALLBACK_LIFETIME);
                warn!(client = %self.client, source = set.lifetime_source.as_str(),
                    fallback_s = fallback.as_secs(),
                    "token expiry is already past by our clock (clock skew?); assuming a fallback lifetime");
                Some(fallback.min(MAX_LIFETIME))
            }
            Some(l) => {
                if set.clamped() {
                    warn!(client = %self.client, source = set.lifetime_source.as_str(),
                        "token expiry is implausibly far away; clamped");
                }
                Some(l)
            }
            // Config validation bounds it too; clamping here keeps deadline and
            // formatting arithmetic safe whatever the config holds.
            None => self.config.default_lifetime.map(|l| l.min(MAX_LIFETIME)),
        }
    }

    fn record_failure(
        &mut self,
        trigger: Trigger,
        grant: &'static str,
        outcome: Outcome,
        e: &TokenError,
    ) {
        let at = crate::clock::rfc3339(self.clock.wall_now());
        let message = e.to_string();
        let app_message = e.app_message();
        self.publish(|s| {
            s.last_refresh = Some(LastRefresh {
                at,
                trigger: trigger.as_str(),
                grant,
                outcome: outcome.as_str(),
                error: Some(message),
                app_error: Some(app_message),
            });
            s.refreshes_failed += 1;
        });
    }

    fn back_off(&mut self, e: &TokenError) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let delay = backoff_delay(self.failures, e.retry_after());
        let now = Instant::now();
        self.retry_at = Some(now + delay);
        let usable = self.token_usable(now);
        if usable {
            warn!(client = %self.client, error = %e, retry_in_ms = delay.as_millis() as u64,
                "token request failed; the current token is still valid");
        } else {
            error!(client = %self.client, error = %e, retry_in_ms = delay.as_millis() as u64,
                "token request failed; no valid token");
        }
        let retry_at = self.retry_at;
        let next_wall = self.clock.wall_now() + delay;
        self.publish(|s| {
            s.retry_at = retry_at;
            s.next_refresh_at = Some(rfc3339(next_wall));
        });
        self.set_state(if usable {
            State::Valid
        } else {
            State::Unavailable
        });
        delay
    }

    fn enter_needs_authorization(&mut self, reason: String) {
        let reason = format!("{reason}; {}", self.recovery);
        self.needs_authorization = true;
        if self.store.client.is_persistent() {
            self.store.check_at = Some(Instant::now() + stored::AUTHORIZATION_POLL);
        }
        error!(client = %self.client, reason = %reason,
            "client needs authorization: a new refresh token must be provided");
        self.publish(|s| {
            s.reason = Some(reason);
            s.next_refresh_at = None;
        });
        self.set_state(State::NeedsAuthorization);
    }

    fn set_state(&self, state: State) {
        self.publish(|s| s.state = StateCell(state));
        self.metrics.set_state(state);
    }

    fn publish(&self, f: impl FnOnce(&mut Status)) {
        self.shared.status.send_modify(f);
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How far ahead of expiry to refresh: `refresh_before`, or by default the
/// smaller of 60 s and 10 % of the lifetime; never under 1 s, never over half
/// the lifetime (so a short token is not refreshed the moment it arrives).
pub(crate) fn refresh_margin(lifetime: Duration, configured: Option<Duration>) -> Duration {
    let margin = configured
        .unwrap_or_else(|| (lifetime / 10).min(Duration::from_secs(60)))
        .max(Duration::from_secs(1));
    margin.min(lifetime / 2)
}

/// Exponential backoff with jitter: uniform in [d/2, d] where d doubles per
/// failure from 1 s to 60 s; a provider's `Retry-After` (up to 5 min) is a floor.
pub(crate) fn backoff_delay(failures: u32, retry_after: Option<Duration>) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let ceiling = BACKOFF_BASE.saturating_mul(1u32 << exp).min(BACKOFF_MAX);
    let half = ceiling / 2;
    let jitter = half.mul_f64(fastrand::f64());
    let delay = half + jitter;
    match retry_after {
        Some(ra) => delay.max(ra.min(RETRY_AFTER_MAX)),
        None => delay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_margin_is_ten_percent_capped_at_a_minute_and_at_least_a_second() {
        assert_eq!(
            refresh_margin(Duration::from_secs(900), None),
            Duration::from_secs(60)
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(300), None),
            Duration::from_secs(30)
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(3), None),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn margin_never_exceeds_half_the_lifetime() {
        assert_eq!(
            refresh_margin(Duration::from_secs(10), Some(Duration::from_secs(60))),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        for _ in 0..100 {
            let first = backoff_delay(1, None);
            assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1));
            let third = backoff_delay(3, None);
            assert!(third >= Duration::from_secs(2) && third <= Duration::from_secs(4));
            let many = backoff_delay(50, None);
            assert!(many >= Duration::from_secs(30) && many <= Duration::from_secs(60));
        }
    }

    #[test]
    fn retry_after_is_a_floor_but_bounded() {
        assert_eq!(
            backoff_delay(1, Some(Duration::from_secs(20))),
            Duration::from_secs(20)
        );
        assert_eq!(
            backoff_delay(1, Some(Duration::from_secs(100_000))),
            RETRY_AFTER_MAX
        );
    }
}
