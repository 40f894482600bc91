//! Validated configuration: the only config the rest of tokenproxy sees.
//!
//! [`from_str`] parses TOML into the raw mirror in `file.rs` (`schema.rs` reads
//! past each unknown key or wrong type to find them all), then converts it once
//! into the types below: `${VAR}`s expanded, secrets read from `*_file`s and
//! wrapped in [`Secret`], durations, sizes, addresses and URLs parsed, defaults
//! applied and cross-field rules checked. [`load`] only reads the file first.
//! A failure is a [`ConfigError`] holding every problem found, each naming the
//! file, line:column, the dotted key and a fix (`examples.rs` says how to
//! write each key).

mod admin;
mod assertion;
mod authorize;
mod build;
mod connect;
mod dpop;
mod egress;
mod env;
mod error;
mod examples;
mod file;
mod quirk;
mod safety;
mod schema;
mod store;
mod subjects;
mod summary;
mod table;
mod text;
mod tls;
mod token;

pub use admin::AdminConfig;
pub use authorize::AuthorizeConfig;
pub use connect::ConnectConfig;
pub use dpop::DpopConfig;
pub use egress::{EgressProxy, ProxySource};
pub use env::{Env, MapEnv, SystemEnv};
pub use error::{ConfigError, ConfigProblem, MAX_SHOWN};
pub use quirk::{ErrorMeaning, ErrorRule, FieldPath, ResponseMapping, TimestampUnit};
pub use safety::Insecure;
pub use store::{
    FileStoreConfig, NodeAddr, RedisStoreConfig, RedisTopology, SentinelConfig, StoreConfig,
    StoreKey,
};
pub use subjects::{SubjectFallback, SubjectsConfig};
pub use tls::{TlsConfig, TlsVersion};

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use http::uri::{Authority, Scheme};
use http::{HeaderName, HeaderValue, StatusCode, Uri};

use crate::jose::SigningKey;
use crate::secret::Secret;
use admin::{build_admin, host_list};
use authorize::build_authorize;
use build::*;
use egress::build_proxy;
use env::Expander;
use error::Problems;
use file::{RawClient, RawConfig, RawInject, RawLimits, RawLog, RawRuntime, RawToken, Scalar};
use schema::Removed;
use store::build_store;
use summary::*;
use table::Table;
use tls::build_tls;
use token::build_token;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
/// Longest duration any key accepts, and the longest token lifetime kept
/// (`token::response::MAX_LIFETIME`): 10 × 365 days.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
const DURATION_HINT: &str = "write it like \"30s\", \"15m\" or \"1h 30m\"";
const SIZE_HINT: &str = "write it like \"1MiB\", \"32KiB\" or \"512\"";
const LISTEN_HINT: &str = "write it like \"127.0.0.1:8080\"; hostnames are not resolved";
const UPSTREAM_HINT: &str = "write it like \"https://api.pay.example/v1\"";
const TOKEN_URL_HINT: &str = "write it like \"https://auth.example/oauth2/token\"";
/// Grant parameters tokenproxy sets itself; `params` may not override them.
const RESERVED_PARAMS: [&str; 7] = [
    "grant_type",
    "client_id",
    "client_secret",
    "username",
    "password",
    "refresh_token",
    "scope",
];

/// Reads the config file at `path` through `env`, then parses it with [`from_str`].
pub fn load(path: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
    let text = env
        .read_file(path)
        .map_err(|e| ConfigError::unreadable(path, &e))?;
    from_str(&text, Some(path), env)
}

/// Parses and validates TOML `text`; `source` names the file in errors and anchors relative `*_file` paths.
///
/// Every problem is reported, not just the first: schema errors (unknown
/// keys, wrong types) across the file, and validation problems of each part
/// that can be judged on its own (each section, each client).
pub fn from_str(text: &str, source: Option<&Path>, env: &dyn Env) -> Result<Config, ConfigError> {
    text::check_shape(text).map_err(|e| e.with_file(source))?;
    let read = schema::read(text).map_err(|e| e.with_file(source))?;
    let mut problems = read.problems;
    if let Some(raw) = read.raw {
        let x = Expander::new(env, source.and_then(Path::parent));
        match build(raw, source, &x, &read.removed) {
            Ok(config) if problems.is_empty() => return Ok(config),
            Ok(_) => {}
            Err(e) => {
                let mut found = Problems::default();
                found.add(e);
                found.retain(|p| !read.removed.covers(p.key()));
                found.place(|key| {
                    text::key_position(text, key).map(|at| text::line_column(text, at))
                });
                problems.extend(found);
            }
        }
    }
    Err(problems.into_error().with_file(source))
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was loaded from, if any.
    pub source: Option<PathBuf>,
    /// `[admin]`: the metrics/health listener.
    pub admin: AdminConfig,
    /// `[log]`.
    pub log: LogConfig,
    /// `[limits]`: apply to every listener.
    pub limits: Limits,
    /// `[runtime]`: threads.
    pub runtime: RuntimeConfig,
    /// `[store]`: where token state lives.
    pub store: StoreConfig,
    /// `[clients.NAME]`, sorted by name; never empty.
    pub clients: Vec<ClientConfig>,
    /// `[connect]`: the public listener of connect sessions, when configured.
    pub connect: Option<ConnectConfig>,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// An `EnvFilter` directive (validated by the logging setup); default `info`.
    pub level: String,
    /// Output format; default text.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// `log.format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The config spelling: `"text"` or `"json"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// `[limits]`: protection of every listener against slow or oversized clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The whole request head must arrive within this (slowloris); default 10s.
    pub header_read_timeout: Duration,
    /// Largest request head in bytes, 8KiB..=1MiB (hyper's buffer minimum is 8KiB); default 32KiB.
    pub max_header_bytes: usize,
    /// Most headers in one request, 1..=1000; default 100.
    pub max_headers: usize,
    /// Keep-alive connections idle longer than this are closed; default 60s.
    pub idle_timeout: Duration,
    /// Open connections per listener, at least 1; default 1024.
    pub max_connections: usize,
    /// How long SIGTERM waits for in-flight requests; default 25s.
    pub shutdown_grace: Duration,
    /// Longest a request body may keep the sidecar waiting for its next bytes
    /// (and the most waiting credit it can build up); default 10s.
    pub body_timeout: Duration,
    /// Bytes per second that earn a slow request body more waiting; default 1KiB.
    pub body_min_rate: usize,
    /// Replay buffers of all requests together, process-wide; beyond it a body
    /// streams once and is not replayable; default 64MiB.
    pub max_buffered_bytes: usize,
    /// Requests in flight at once on one HTTP/2 connection, 1..=10000; default 100.
    pub http2_max_concurrent_streams: u32,
    /// How often an HTTP/2 connection is pinged to find a dead peer (`None`: never);
    /// default 30s.
    pub http2_keepalive_interval: Option<Duration>,
    /// An upgraded connection (a WebSocket) that moves no byte either way for
    /// this long is closed; default 5m.
    pub upgrade_idle_timeout: Duration,
    /// HTTP/1 header names keep the case the app and the upstream wrote them
    /// in, both ways; default false (hyper then records a case map per message).
    pub preserve_header_case: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 32 * KIB,
            max_headers: 100,
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(25),
            body_timeout: Duration::from_secs(10),
            body_min_rate: KIB,
            max_buffered_bytes: 64 * MIB,
            http2_max_concurrent_streams: 100,
            http2_keepalive_interval: Some(Duration::from_secs(30)),
            upgrade_idle_timeout: Duration::from_secs(5 * 60),
            preserve_header_case: false,
        }
    }
}

/// `[runtime]`: how many threads serve the proxy listeners.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Proxy worker threads, 1..=256; `None` (`"auto"`, the default) means
    /// `TOKIO_WORKER_THREADS` when set, else the CPUs this process may use.
    pub workers: Option<usize>,
}

/// Most proxy worker threads accepted in `runtime.workers`.
pub const MAX_WORKERS: usize = 256;

impl RuntimeConfig {
    /// The worker count to start: `workers`, else `env_override` (the value of
    /// `TOKIO_WORKER_THREADS`, used when it is a whole number in range), else
    /// `cpus`, at least 1.
    pub fn resolve_workers(&self, env_override: Option<&str>, cpus: usize) -> usize {
        if let Some(n) = self.workers {
            return n;
        }
        env_override
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|n| (1..=MAX_WORKERS).contains(n))
            .unwrap_or(cpus)
            .clamp(1, MAX_WORKERS)
    }
}

/// `[clients.NAME]`: one OAuth client, one route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The table name, `[A-Za-z0-9_-]+`; used as the `client` metric label.
    pub name: String,
    /// Where the app sends its requests.
    pub listen: SocketAddr,
    /// Where requests are forwarded.
    pub upstream: UpstreamUrl,
    /// Set when clients share `listen`: starts with '/', no trailing '/'; stripped before forwarding.
    pub path_prefix: Option<String>,
    /// Host names besides the listen address and `localhost` the app may use for
    /// this listener (lower case, `host` or `host:port`); a listener accepts those
    /// of every client on it.
    pub allowed_hosts: Vec<String>,
    /// Whether browsers may send cross-site requests (`Origin` of another host,
    /// `Sec-Fetch-Site: cross-site`); default false. Clients sharing a listener agree.
    pub allow_cross_site: bool,
    /// Request bodies up to this are buffered so a 401 can be replayed; 0 = never replay; default 1MiB.
    pub retry_body_limit: usize,
    /// The whole upstream request; default 30s.
    pub timeout: Duration,
    /// Longest a request waits for a token before `token_unavailable`; default 2s.
    pub token_wait_timeout: Duration,
    /// Upstream statuses that mean "token rejected", each 4xx/5xx; default `[401]`.
    pub unauthorized_status: Vec<StatusCode>,
    /// Request headers whose presence makes a non-idempotent request (POST,
    /// PATCH) safe to replay after a 401; default `["Idempotency-Key"]`.
    pub idempotency_headers: Vec<HeaderName>,
    /// Replay every buffered request after a 401, POST without an idempotency
    /// key included; default false.
    pub replay_non_idempotent: bool,
    /// Speak HTTP/2 to the upstream: with prior knowledge to an `http://` one
    /// (h2c, as gRPC servers expect), through ALPN only to an `https://` one;
    /// default false (HTTP/1.1, or HTTP/2 when an `https://` upstream offers it).
    pub http2: bool,
    /// Rewrite a `Location` / `Content-Location` naming the upstream (under its
    /// base path) to the sidecar, as the app addressed it; default true.
    pub rewrite_location: bool,
    /// `Upgrade` protocols forwarded to the upstream (lower case, by protocol
    /// name); others are stripped. Default `["websocket"]` (none with `http2`);
    /// never `h2c`.
    pub upgrades: Vec<String>,
    /// `[clients.NAME.token]`.
    pub token: TokenConfig,
    /// `[clients.NAME.inject]`.
    pub inject: InjectConfig,
    /// `[clients.NAME.tls]`: TLS to the upstream.
    pub tls: TlsConfig,
    /// `clients.NAME.proxy` (or the environment): the egress proxy for upstream and token endpoint.
    pub proxy: EgressProxy,
    /// `[clients.NAME.authorize]`: the authorization-code flow of `tokenproxy authorize`.
    pub authorize: Option<AuthorizeConfig>,
    /// `[clients.NAME.subjects]`: one token pair per merchant, customer or user.
    pub subjects: Option<SubjectsConfig>,
    /// `[clients.NAME.dpop]`: DPoP-bound tokens (RFC 9449); the injected
    /// header is then `Authorization: DPoP <token>`, with a proof beside it.
    pub dpop: Option<DpopConfig>,
    /// `allow_insecure`: the refusals this client knowingly waives.
    pub allow_insecure: Vec<Insecure>,
}

/// An upstream `scheme://host[:port][/base-path]`, without query, fragment or userinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and port as written (the port is kept only if given).
    pub authority: Authority,
    /// `""` or a path like `/v1`, without a trailing '/'.
    pub base_path: String,
}

impl UpstreamUrl {
    /// The URL for display: `https://api.pay.example/v1`.
    pub fn as_string(&self) -> String {
        format!("{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

/// `[clients.NAME.token]`: how to obtain and refresh tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenConfig {
    /// The token endpoint, an absolute http(s) URL.
    pub url: Uri,
    /// The grant used for a full token request.
    pub grant: Grant,
    /// Required unless `client_auth` is none or client_assertion.
    pub client_id: Option<String>,
    /// From `client_secret` or `client_secret_file` (trailing newlines trimmed).
    pub client_secret: Option<Secret>,
    /// How the client authenticates to the token endpoint; default basic.
    pub client_auth: ClientAuth,
    /// How each request's `client_assertion` is made: set exactly when
    /// `client_auth` is private_key_jwt, client_secret_jwt or client_assertion.
    pub assertion: Option<ClientAssertion>,
    /// Encoding of the token request body; default form.
    pub body: BodyFormat,
    /// The `scope` parameter, when set.
    pub scope: Option<String>,
    /// Bootstrap refresh token, from `refresh_token` or `refresh_token_file`.
    pub refresh_token: Option<Secret>,
    /// A separate refresh endpoint; `url` when unset.
    pub refresh_url: Option<Uri>,
    /// Proactive refresh margin; `None` lets the refresher compute one.
    pub refresh_before: Option<Duration>,
    /// Lifetime assumed when a response states no expiry.
    pub default_lifetime: Option<Duration>,
    /// How long a refresh token lives when the response does not say
    /// (`refresh_token_expires_in`/`_at`); None = until the provider rejects it.
    pub refresh_token_lifetime: Option<Duration>,
    /// Extra grant parameters sorted by key; never a reserved OAuth parameter.
    pub params: Vec<(String, String)>,
    /// Key `timeout` (an extension of PRODUCT.md's schema): limit of one token endpoint call; default 10s.
    pub timeout: Duration,
    /// `[clients.NAME.token.tls]`: TLS to the token endpoint.
    pub tls: TlsConfig,
    /// `headers`: extra headers on every token request (grants, refreshes,
    /// code exchanges, revocations), sorted by name; never one tokenproxy
    /// sets. Values whose name suggests a credential are marked sensitive.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// `[clients.NAME.token.response]`: where a non-standard response keeps its fields.
    pub response: ResponseMapping,
    /// `[[clients.NAME.token.errors]]`: what error answers mean, tried in
    /// order before the built-in classification.
    pub errors: Vec<ErrorRule>,
}

/// `token.grant`, with the credentials the grant needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// `client_credentials`: the client's own credentials.
    ClientCredentials,
    /// `password`: resource owner credentials.
    Password {
        /// The resource owner's user name.
        username: String,
        /// From `password` or `password_file`.
        password: Secret,
    },
    /// `refresh_token`: only the bootstrap `refresh_token`; a dead one needs a person.
    RefreshToken,
}

impl Grant {
    /// The OAuth `grant_type` value and metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Grant::ClientCredentials => "client_credentials",
            Grant::Password { .. } => "password",
            Grant::RefreshToken => "refresh_token",
        }
    }
}

/// `token.client_auth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// HTTP Basic with `client_id:client_secret`.
    Basic,
    /// `client_id` and `client_secret` in the request body.
    Body,
    /// Both: HTTP Basic and the body parameters (for servers that want both).
    Both,
    /// No client authentication.
    None,
    /// A JWT signed with the client's private key (RFC 7523, OpenID `private_key_jwt`).
    PrivateKeyJwt,
    /// A JWT signed with HMAC keyed by the client secret (OpenID `client_secret_jwt`).
    ClientSecretJwt,
    /// The TLS client certificate of `[clients.NAME.token.tls]`, and
    /// `client_id` in the body (RFC 8705 §2.1).
    TlsClientAuth,
    /// A JWT made by someone else (a Kubernetes projected service-account
    /// token, say), read from `client_assertion_file` for every request.
    ClientAssertion,
}

impl ClientAuth {
    /// The config spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            ClientAuth::Basic => "basic",
            ClientAuth::Body => "body",
            ClientAuth::Both => "both",
            ClientAuth::None => "none",
            ClientAuth::PrivateKeyJwt => "private_key_jwt",
            ClientAuth::ClientSecretJwt => "client_secret_jwt",
            ClientAuth::TlsClientAuth => "tls_client_auth",
            ClientAuth::ClientAssertion => "client_assertion",
        }
    }
}

/// How long an assertion tokenproxy signs is valid (`exp` - `iat`): long enough
/// for a slow token request, short enough for FAPI 2.0's limits.
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(60);

/// `client_assertion_type` of RFC 7523 §2.2, the default.
pub const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How a client's `client_assertion` is made (RFC 7523, RFC 7521 §4.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAssertion {
    /// Signed here, a new one for every request (`private_key_jwt`, `client_secret_jwt`).
    Signed(AssertionSigner),
    /// `client_assertion`: read from `path` for every request, as it is.
    File {
        /// `client_assertion_file`.
        path: PathBuf,
        /// `client_assertion_type`; default [`JWT_BEARER_ASSERTION`].
        assertion_type: String,
    },
}

/// The key and header of the assertions tokenproxy signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssertionSigner {
    /// From `signing_key_file`, or the client secret (HS256/HS512); `signing_alg` chose its algorithm.
    pub key: SigningKey,
    /// `signing_key_file`, for display; `None` for client_secret_jwt.
    pub key_file: Option<PathBuf>,
    /// `key_id`: the JWS `kid`.
    pub key_id: Option<String>,
    /// `certificate_file`, for display.
    pub certificate_file: Option<PathBuf>,
    /// The JWS `x5t#S256`: the SHA-256 thumbprint of `certificate_file`'s first certificate.
    pub x5t_s256: Option<String>,
    /// `assertion_audience`: the `aud`; `None` means the URL each request is sent to.
    pub audience: Option<String>,
}

/// `token.body`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFormat {
    /// `application/x-www-form-urlencoded` (RFC 6749).
    Form,
    /// `application/json` (some providers require it).
    Json,
}

impl BodyFormat {
    /// The config spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            BodyFormat::Form => "form",
            BodyFormat::Json => "json",
        }
    }
}

/// `[clients.NAME.inject]`: where the token goes in forwarded requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// Header carrying the token; default `Authorization`.
    pub header: HeaderName,
    /// Text before `{token}` in `format` (`"Bearer "` by default).
    pub prefix: String,
    /// Text after `{token}` in `format`.
    pub suffix: String,
    /// True when `format` was not set by the user.
    pub format_is_default: bool,
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_quirks;
#[cfg(test)]
mod tests_report;
