//! Every Prometheus family tokenproxy exports, registered on an owned registry.
//!
//! Names and labels are the contract in PRODUCT.md. Children for configured
//! clients are created at start so dashboards see zeros instead of gaps.

use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use serde::Serialize;

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const WAIT_BUCKETS: &[f64] = &[
    0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// The metric families, registered on one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    token_refreshes: IntCounterVec,
    token_request_duration: HistogramVec,
    token_expiry: prometheus::GaugeVec,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    token_wait: HistogramVec,
    unauthorized_retries: IntCounterVec,
    dpop_nonce_retries: IntCounterVec,
    inflight: IntGaugeVec,
    client_state: IntGaugeVec,
    config_reloads: IntCounterVec,
    config_last_success: prometheus::Gauge,
    sidecar_errors: IntCounterVec,
    connection_errors: IntCounterVec,
    upgrades: IntCounterVec,
    upgraded_connections: IntGaugeVec,
    store: StoreFamilies,
    subjects: SubjectFamilies,
}

/// The families of clients with subjects (never a subject label).
#[derive(Clone)]
struct SubjectFamilies {
    subjects: IntGaugeVec,
    cache: IntCounterVec,
    connects: IntCounterVec,
    budget_waiting: IntGaugeVec,
}

impl SubjectFamilies {
    fn new(registry: &Registry) -> Result<SubjectFamilies, prometheus::Error> {
        let subjects = IntGaugeVec::new(
            Opts::new(
                "tokenproxy_subjects",
                "Subjects by state: valid (a usable access token in memory), idle (stored, none in memory), refreshing, needs_authorization.",
            ),
            &["client", "state"],
        )?;
        let cache = IntCounterVec::new(
            Opts::new(
                "tokenproxy_subject_cache_total",
                "Subject token lookups: hit (memory), store (read from the store), miss (a token request was needed).",
            ),
            &["client", "result"],
        )?;
        let connects = IntCounterVec::new(
            Opts::new("tokenproxy_connects_total", "Connect sessions by outcome."),
            &["client", "outcome"],
        )?;
        let budget_waiting = IntGaugeVec::new(
            Opts::new(
                "tokenproxy_token_budget_waiting",
                "Subject token requests waiting for the client's token-endpoint budget.",
            ),
            &["client"],
        )?;
        registry.register(Box::new(subjects.clone()))?;
        registry.register(Box::new(cache.clone()))?;
        registry.register(Box::new(connects.clone()))?;
        registry.register(Box::new(budget_waiting.clone()))?;
        Ok(SubjectFamilies {
            subjects,
            cache,
            connects,
            budget_waiting,
        })
    }
}

/// The `tokenproxy_store_*` families.
#[derive(Clone)]
struct StoreFamilies {
    available: IntGaugeVec,
    unavailable_since: prometheus::GaugeVec,
    errors: IntCounterVec,
    adopted: IntCounterVec,
    conflicts: IntCounterVec,
}

impl StoreFamilies {
    fn new(registry: &Registry) -> Result<StoreFamilies, MetricsError> {
        let available = IntGaugeVec::new(
            Opts::new(
                "tokenproxy_store_available",
                "1 while the token store (file or redis) answers for the client, 0 while it does not (tokens are then kept in memory).",
            ),
            &["client"],
        )?;
        let unavailable_since = prometheus::GaugeVec::new(
            Opts::new(
                "tokenproxy_store_unavailable_since_timestamp_seconds",
                "Since when (Unix time) the token store has not answered for the client; 0 while it answers.",
            ),
            &["client"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "tokenproxy_store_errors_total",
                "Failed token store operations by operation (read, write, lease; open: a stored record that does not open, counted once).",
            ),
            &["client", "operation"],
        )?;
        let adopted = IntCounterVec::new(
            Opts::new(
                "tokenproxy_store_tokens_adopted_total",
                "Access tokens taken from the store (written by an earlier run or another replica) instead of asking the provider.",
            ),
            &["client"],
        )?;
        let conflicts = IntCounterVec::new(
            Opts::new(
                "tokenproxy_store_write_conflicts_total",
                "Token state writes refused because the store already held a newer generation.",
            ),
            &["client"],
        )?;
        registry.register(Box::new(available.clone()))?;
        registry.register(Box::new(unavailable_since.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(adopted.clone()))?;
        registry.register(Box::new(conflicts.clone()))?;
        Ok(StoreFamilies {
            available,
            unavailable_since,
            errors,
            adopted,
            conflicts,
        })
    }
}

/// Why a metric family could not be registered (a programming error, surfaced at start).
pub type MetricsError = prometheus::Error;

impl Metrics {
    /// Registers every family (and the process collector) on a new registry.
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new();
        let token_refreshes = IntCounterVec::new(
            Opts::new(
                "tokenproxy_token_refreshes_total",
                "Token endpoint calls by trigger, grant and outcome.",
            ),
            &["client", "trigger", "grant", "outcome"],
        )?;
        let token_request_duration = HistogramVec::new(
            HistogramOpts::new(
                "tokenproxy_token_request_duration_seconds",
                "Duration of token endpoint calls.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["client", "grant"],
        )?;
        let token_expiry = prometheus::GaugeVec::new(
            Opts::new(
                "tokenproxy_token_expiry_timestamp_seconds",
                "Unix time at which the current access token expires (0: none; +Inf: no expiry known).",
            ),
            &["client"],
        )?;
        let requests = IntCounterVec::new(
            Opts::new(
                "tokenproxy_requests_total",
                "Proxied requests by response status code.",
            ),
            &["client", "code"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "tokenproxy_request_duration_seconds",
                "Time from request head to response head for proxied requests.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["client"],
        )?;
        let token_wait = HistogramVec::new(
            HistogramOpts::new(
                "tokenproxy_token_wait_seconds",
                "Time requests waited for a token (0 when a valid token was cached).",
            )
            .buckets(WAIT_BUCKETS.to_vec()),
            &["client"],
        )?;
        let unauthorized_retries = IntCounterVec::new(
            Opts::new(
                "tokenproxy_unauthorized_retries_total",
                "Upstream 401s handled by refreshing and replaying once.",
            ),
            &["client", "outcome"],
        )?;
        let dpop_nonce_retries = IntCounterVec::new(
            Opts::new(
                "tokenproxy_dpop_nonce_retries_total",
                "Requests sent once more with a new DPoP proof carrying the nonce a server demanded (use_dpop_nonce), by where: token (the token endpoint) or upstream (the API).",
            ),
            &["client", "where"],
        )?;
        let inflight = IntGaugeVec::new(
            Opts::new(
                "tokenproxy_inflight_requests",
                "Proxied requests in flight.",
            ),
            &["client"],
        )?;
        let client_state = IntGaugeVec::new(
            Opts::new(
                "tokenproxy_client_state",
                "1 for the state each client is in (starting, valid, refreshing, unavailable, needs_authorization).",
            ),
            &["client", "state"],
        )?;
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "tokenproxy_config_reloads_total",
                "Configuration reloads (SIGHUP) by outcome.",
            ),
            &["outcome"],
        )?;
        let config_last_success = prometheus::Gauge::new(
            "tokenproxy_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load.",
        )?;
        let sidecar_errors = IntCounterVec::new(
            Opts::new(
                "tokenproxy_errors_total",
                "Responses the sidecar made itself, by error code (token_unavailable, upstream_unreachable, upstream_timeout, bad_request); the API's own errors are not counted here.",
            ),
            &["client", "error"],
        )?;
        registry.register(Box::new(sidecar_errors.clone()))?;
        let connection_errors = IntCounterVec::new(
            Opts::new(
                "tokenproxy_connection_errors_total",
                "Connections that ended with an error before or beside any request the sidecar saw, by listener (proxy, admin, connect) and kind (parse, too_large, timeout, incomplete, io, response_body, http2, other); parse and too_large got hyper's bare 400 or 431.",
            ),
            &["listener", "kind"],
        )?;
        registry.register(Box::new(connection_errors.clone()))?;
        let upgrades = IntCounterVec::new(
            Opts::new(
                "tokenproxy_upgrades_total",
                "Upgrade requests (WebSocket and the other protocols a client lists) by protocol and outcome: upgraded (a tunnel opened), refused (the upstream answered without switching), failed (no answer, or the switch could not be completed), not_allowed (a protocol the client does not list, protocol \"other\"; served as a plain request).",
            ),
            &["client", "protocol", "outcome"],
        )?;
        let upgraded_connections = IntGaugeVec::new(
            Opts::new(
                "tokenproxy_upgraded_connections",
                "Upgraded connections (tunnels) open now.",
            ),
            &["client"],
        )?;
        registry.register(Box::new(upgrades.clone()))?;
        registry.register(Box::new(upgraded_connections.clone()))?;
        let store = StoreFamilies::new(&registry)?;
        let subjects = SubjectFamilies::new(&registry)?;
        registry.register(Box::new(config_reloads.clone()))?;
        registry.register(Box::new(config_last_success.clone()))?;
        for outcome in ["success", "failure"] {
            config_reloads.with_label_values(&[outcome]);
        }
        registry.register(Box::new(token_refreshes.clone()))?;
        registry.register(Box::new(token_request_duration.clone()))?;
        registry.register(Box::new(token_expiry.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(token_wait.clone()))?;
        registry.register(Box::new(unauthorized_retries.clone()))?;
        registry.register(Box::new(dpop_nonce_retries.clone()))?;
        registry.register(Box::new(inflight.clone()))?;
        registry.register(Box::new(client_state.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Metrics {
            registry,
            token_refreshes,
            token_request_duration,
            token_expiry,
            requests,
            request_duration,
            token_wait,
            unauthorized_retries,
            dpop_nonce_retries,
            inflight,
            client_state,
            config_reloads,
            config_last_success,
            sidecar_errors,
            connection_errors,
            upgrades,
            upgraded_connections,
            store,
            subjects,
        })
    }

    /// Records that a configuration was loaded and applied (at start or by reload).
    pub fn config_loaded(&self) {
        self.config_last_success
            .set(crate::clock::epoch_seconds(std::time::SystemTime::now()));
    }

    /// Counts a reload attempt.
    pub fn config_reload(&self, success: bool) {
        let outcome = if success { "success" } else { "failure" };
        self.config_reloads.with_label_values(&[outcome]).inc();
    }

    /// Handles for one client, with its children pre-created.
    pub fn client(&self, client: &str) -> ClientMetrics {
        let m = ClientMetrics {
            name: client.to_owned(),
            families: self.clone(),
            request_duration: self.request_duration.with_label_values(&[client]),
            token_wait: self.token_wait.with_label_values(&[client]),
            inflight: self.inflight.with_label_values(&[client]),
            expiry: self.token_expiry.with_label_values(&[client]),
            retry_recovered: self
                .unauthorized_retries
                .with_label_values(&[client, RetryOutcome::Recovered.as_str()]),
            retry_failed: self
                .unauthorized_retries
                .with_label_values(&[client, RetryOutcome::Failed.as_str()]),
            retry_not_replayable: self
                .unauthorized_retries
                .with_label_values(&[client, RetryOutcome::NotReplayable.as_str()]),
            upgraded_connections: self.upgraded_connections.with_label_values(&[client]),
            codes: (0..1000).map(|_| OnceLock::new()).collect(),
        };
        m.set_state(State::Starting);
        for code in [
            "token_unavailable",
            "upstream_unreachable",
            "upstream_timeout",
            "bad_request",
        ] {
            self.sidecar_errors.with_label_values(&[client, code]);
        }
        m
    }

    /// The connection error counters of the listeners called `listener`, each
    /// kind's child created now.
    pub fn connection_errors(&self, listener: &'static str) -> ConnectionErrors {
        ConnectionErrors {
            by_kind: Arc::new(ConnectionErrorKind::ALL.map(|kind| {
                self.connection_errors
                    .with_label_values(&[listener, kind.as_str()])
            })),
        }
    }

    /// The text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * 1024);
        let families = self.registry.gather();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

// The label sets below belong to the families above; the token engine uses
// them, so they live here, beneath it.

/// What started a token request (a label of `tokenproxy_token_refreshes_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// The first token after start.
    Startup,
    /// Ahead of expiry, in the background.
    Proactive,
    /// A request found no usable token.
    Expired,
    /// The API answered 401 to the current token.
    Unauthorized,
    /// The sweeper renewing an idle subject.
    Sweep,
}

impl Trigger {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Startup => "startup",
            Trigger::Proactive => "proactive",
            Trigger::Expired => "expired",
            Trigger::Unauthorized => "unauthorized",
            Trigger::Sweep => "sweep",
        }
    }
}

/// How a token endpoint call ended (a label of `tokenproxy_token_refreshes_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A usable token came back.
    Success,
    /// The provider refused (invalid_grant, invalid_client, ...).
    Rejected,
    /// Network failure, timeout, 5xx, 429 or an unusable response.
    Error,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Rejected => "rejected",
            Outcome::Error => "error",
        }
    }
}

/// Where a client stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// No token yet; the first request to the token endpoint is under way.
    Starting,
    /// A usable token is held.
    Valid,
    /// A token request is under way.
    Refreshing,
    /// The last token request failed and no usable token is held; retrying after a backoff.
    Unavailable,
    /// The refresh token is dead and no other credential is configured: a person must authorize.
    NeedsAuthorization,
}

impl State {
    /// Every state, for metric children.
    pub const ALL: [State; 5] = [
        State::Starting,
        State::Valid,
        State::Refreshing,
        State::Unavailable,
        State::NeedsAuthorization,
    ];

    /// The label / JSON value.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Valid => "valid",
            State::Refreshing => "refreshing",
            State::Unavailable => "unavailable",
            State::NeedsAuthorization => "needs_authorization",
        }
    }
}

/// Outcome of a 401 replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryOutcome {
    /// The replay with a new token got a non-401 answer.
    Recovered,
    /// The replay got a 401 again, or no new token could be had.
    Failed,
    /// The request body was too large to buffer, so the 401 went back to the app.
    NotReplayable,
}

impl RetryOutcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryOutcome::Recovered => "recovered",
            RetryOutcome::Failed => "failed",
            RetryOutcome::NotReplayable => "not_replayable",
        }
    }
}

/// Why a connection ended with an error (a label of
/// `tokenproxy_connection_errors_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionErrorKind {
    /// A malformed request head (hyper answered 400, or 414 / 505).
    Parse,
    /// A request head over `max_header_bytes` or `max_headers` (hyper answered 431).
    TooLarge,
    /// No (complete) request head within `header_read_timeout`, or an HTTP/2
    /// keep-alive ping unanswered.
    Timeout,
    /// The app closed the connection in the middle of a request.
    Incomplete,
    /// The socket failed: reset, broken pipe.
    Io,
    /// A response body failed while it was sent (the upstream broke it off).
    ResponseBody,
    /// An HTTP/2 protocol error.
    Http2,
    /// Anything else.
    Other,
}

impl ConnectionErrorKind {
    /// Every kind, for metric children.
    pub const ALL: [ConnectionErrorKind; 8] = [
        ConnectionErrorKind::Parse,
        ConnectionErrorKind::TooLarge,
        ConnectionErrorKind::Timeout,
        ConnectionErrorKind::Incomplete,
        ConnectionErrorKind::Io,
        ConnectionErrorKind::ResponseBody,
        ConnectionErrorKind::Http2,
        ConnectionErrorKind::Other,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionErrorKind::Parse => "parse",
            ConnectionErrorKind::TooLarge => "too_large",
            ConnectionErrorKind::Timeout => "timeout",
            ConnectionErrorKind::Incomplete => "incomplete",
            ConnectionErrorKind::Io => "io",
            ConnectionErrorKind::ResponseBody => "response_body",
            ConnectionErrorKind::Http2 => "http2",
            ConnectionErrorKind::Other => "other",
        }
    }
}

/// How an upgrade request ended (a label of `tokenproxy_upgrades_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpgradeOutcome {
    /// The upstream switched protocols and the tunnel opened.
    Upgraded,
    /// The upstream answered without switching (its answer went to the app).
    Refused,
    /// No answer from the upstream, a switch to a protocol not asked for, or a
    /// side that went away before the tunnel opened.
    Failed,
    /// A protocol the client does not list: served as a plain request.
    NotAllowed,
}

impl UpgradeOutcome {
    /// The outcomes of a listed protocol, for metric children.
    pub const LISTED: [UpgradeOutcome; 3] = [
        UpgradeOutcome::Upgraded,
        UpgradeOutcome::Refused,
        UpgradeOutcome::Failed,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            UpgradeOutcome::Upgraded => "upgraded",
            UpgradeOutcome::Refused => "refused",
            UpgradeOutcome::Failed => "failed",
            UpgradeOutcome::NotAllowed => "not_allowed",
        }
    }
}

/// `tokenproxy_connection_errors_total` for one listener kind, a child per error kind.
#[derive(Clone)]
pub struct ConnectionErrors {
    by_kind: Arc<[IntCounter; ConnectionErrorKind::ALL.len()]>,
}

impl ConnectionErrors {
    /// Counts one connection that ended with `kind`.
    pub fn count(&self, kind: ConnectionErrorKind) {
        // `ALL` lists the kinds in declaration order, so a kind is its own index.
        self.by_kind[kind as usize].inc();
    }
}

/// Where a server demanded a DPoP nonce (the `where` label of
/// `tokenproxy_dpop_nonce_retries_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonceWhere {
    /// The token endpoint.
    Token,
    /// The API.
    Upstream,
}

impl NonceWhere {
    /// Every value.
    pub const ALL: [NonceWhere; 2] = [NonceWhere::Token, NonceWhere::Upstream];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            NonceWhere::Token => "token",
            NonceWhere::Upstream => "upstream",
        }
    }
}

/// The `protocol` label of upgrades to protocols the client does not list (the
/// app's own names would make the label set open-ended).
pub const OTHER_PROTOCOL: &str = "other";

/// Metric handles for one client.
#[derive(Clone)]
pub struct ClientMetrics {
    name: String,
    families: Metrics,
    request_duration: prometheus::Histogram,
    token_wait: prometheus::Histogram,
    inflight: IntGauge,
    expiry: prometheus::Gauge,
    retry_recovered: IntCounter,
    retry_failed: IntCounter,
    retry_not_replayable: IntCounter,
    upgraded_connections: IntGauge,
    /// `tokenproxy_requests_total{code}` children by status code, looked up once each:
    /// the request path then does no label hashing.
    codes: Arc<[OnceLock<IntCounter>]>,
}

impl ClientMetrics {
    /// Records one token endpoint call.
    pub fn token_request(&self, trigger: Trigger, grant: &str, outcome: Outcome, seconds: f64) {
        self.families
            .token_refreshes
            .with_label_values(&[&self.name, trigger.as_str(), grant, outcome.as_str()])
            .inc();
        self.families
            .token_request_duration
            .with_label_values(&[&self.name, grant])
            .observe(seconds);
    }

    /// Sets the expiry gauge (Unix seconds; +Inf when the token has no known expiry).
    pub fn set_expiry(&self, epoch_seconds: f64) {
        self.expiry.set(epoch_seconds);
    }

    /// Marks `state` as the client's current state.
    pub fn set_state(&self, state: State) {
        for s in State::ALL {
            self.families
                .client_state
                .with_label_values(&[&self.name, s.as_str()])
                .set(i64::from(s == state));
        }
    }

    /// Records a proxied response.
    pub fn request(&self, code: http::StatusCode, seconds: f64) {
        // StatusCode is always 100..=999, within the table.
        if let Some(slot) = self.codes.get(usize::from(code.as_u16())) {
            slot.get_or_init(|| {
                self.families
                    .requests
                    .with_label_values(&[&self.name, code.as_str()])
            })
            .inc();
        }
        self.request_duration.observe(seconds);
    }

    /// Counts a response the sidecar made itself.
    pub fn sidecar_error(&self, code: &str) {
        self.families
            .sidecar_errors
            .with_label_values(&[&self.name, code])
            .inc();
    }

    /// Records how long a request waited for a token.
    pub fn token_wait(&self, seconds: f64) {
        self.token_wait.observe(seconds);
    }

    /// Creates the `tokenproxy_dpop_nonce_retries_total` children of a client with DPoP.
    pub fn dpop_init(&self) {
        for place in NonceWhere::ALL {
            self.families
                .dpop_nonce_retries
                .with_label_values(&[&self.name, place.as_str()]);
        }
    }

    /// Counts a request sent once more with the nonce a server demanded.
    pub fn dpop_nonce_retry(&self, place: NonceWhere) {
        self.families
            .dpop_nonce_retries
            .with_label_values(&[&self.name, place.as_str()])
            .inc();
    }

    /// Records a 401 replay outcome.
    pub fn unauthorized_retry(&self, outcome: RetryOutcome) {
        match outcome {
            RetryOutcome::Recovered => self.retry_recovered.inc(),
            RetryOutcome::Failed => self.retry_failed.inc(),
            RetryOutcome::NotReplayable => self.retry_not_replayable.inc(),
        }
    }

    /// Creates the `tokenproxy_upgrades_total` children of the listed `protocols`
    /// (and of those not listed).
    pub fn upgrades_init(&self, protocols: &[String]) {
        for protocol in protocols {
            for outcome in UpgradeOutcome::LISTED {
                self.families
                    .upgrades
                    .with_label_values(&[&self.name, protocol, outcome.as_str()]);
            }
        }
        self.families.upgrades.with_label_values(&[
            &self.name,
            OTHER_PROTOCOL,
            UpgradeOutcome::NotAllowed.as_str(),
        ]);
    }

    /// Counts an upgrade request to `protocol` (a listed name, or [`OTHER_PROTOCOL`]).
    pub fn upgrade(&self, protocol: &str, outcome: UpgradeOutcome) {
        self.families
            .upgrades
            .with_label_values(&[&self.name, protocol, outcome.as_str()])
            .inc();
    }

    /// The gauge of open tunnels, for a guard around each.
    pub fn upgraded_connections(&self) -> &IntGauge {
        &self.upgraded_connections
    }

    /// The in-flight gauge, for a guard around each request.
    pub fn inflight(&self) -> &IntGauge {
        &self.inflight
    }

    /// Creates the client's `tokenproxy_store_*` children (file and redis stores).
    pub fn store_init(&self) {
        let f = &self.families.store;
        f.available.with_label_values(&[&self.name]).set(1);
        f.unavailable_since
            .with_label_values(&[&self.name])
            .set(0.0);
        for op in ["read", "write", "lease", "open"] {
            f.errors.with_label_values(&[&self.name, op]);
        }
        f.adopted.with_label_values(&[&self.name]);
        f.conflicts.with_label_values(&[&self.name]);
    }

    /// Sets whether the store answers, and since when (Unix time) it has not.
    pub fn store_available(&self, available: bool, unavailable_since: Option<f64>) {
        let f = &self.families.store;
        f.available
            .with_label_values(&[&self.name])
            .set(i64::from(available));
        f.unavailable_since
            .with_label_values(&[&self.name])
            .set(unavailable_since.unwrap_or(0.0));
    }

    /// Counts a failed store operation: read, write, lease, or open (a stored
    /// record that does not open).
    pub fn store_error(&self, operation: &str) {
        self.families
            .store
            .errors
            .with_label_values(&[&self.name, operation])
            .inc();
    }

    /// Counts an access token taken from the store.
    pub fn store_adopted(&self) {
        self.families
            .store
            .adopted
            .with_label_values(&[&self.name])
            .inc();
    }

    /// Counts a write refused because the store held a newer generation.
    pub fn store_conflict(&self) {
        self.families
            .store
            .conflicts
            .with_label_values(&[&self.name])
            .inc();
    }

    /// Counts one subject token lookup: `hit`, `store` or `miss`.
    pub fn subject_cache(&self, result: &'static str) {
        self.families
            .subjects
            .cache
            .with_label_values(&[&self.name, result])
            .inc();
    }

    /// The counter of subject token lookups with `result` (`hit`, `store`, `miss`).
    pub fn subject_cache_counter(&self, result: &'static str) -> IntCounter {
        self.families
            .subjects
            .cache
            .with_label_values(&[&self.name, result])
    }

    /// Sets how many subjects are in `state`.
    pub fn set_subjects(&self, state: &'static str, count: u64) {
        self.families
            .subjects
            .subjects
            .with_label_values(&[&self.name, state])
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Counts one connect session's end: `created`, `opened`, `connected`, `error`, `expired`.
    pub fn connect(&self, outcome: &'static str) {
        self.families
            .subjects
            .connects
            .with_label_values(&[&self.name, outcome])
            .inc();
    }

    /// The gauge of subject token requests waiting for the budget.
    pub fn budget_waiting(&self) -> IntGauge {
        self.families
            .subjects
            .budget_waiting
            .with_label_values(&[&self.name])
    }
}
