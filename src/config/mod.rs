//! Validated configuration: the only config the rest of tokenproxy sees.
//!
//! [`from_str`] parses TOML into the raw mirror in `file.rs` (unknown keys and
//! syntax errors fail with their line and key), then converts it once into the
//! types below: `${VAR}`s expanded, secrets read from `*_file`s and wrapped in
//! [`Secret`], durations, sizes, addresses and URLs parsed, defaults applied and
//! cross-field rules checked. [`load`] only reads the file first. Every failure
//! is a [`ConfigError`] naming the file, the dotted key and a fix.

mod admin;
mod authorize;
mod egress;
mod env;
mod error;
mod file;
mod store;
mod tls;

pub use admin::AdminConfig;
pub use authorize::AuthorizeConfig;
pub use egress::{EgressProxy, ProxySource};
pub use env::{Env, MapEnv, SystemEnv};
pub use error::ConfigError;
pub use store::{
    FileStoreConfig, NodeAddr, RedisStoreConfig, RedisTopology, SentinelConfig, StoreConfig,
    StoreKey,
};
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

use crate::secret::Secret;
use admin::{build_admin, host_list};
use authorize::build_authorize;
use egress::build_proxy;
use env::Expander;
use file::{RawClient, RawConfig, RawInject, RawLimits, RawLog, RawRuntime, RawToken, Scalar};
use store::build_store;
use tls::build_tls;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
/// Longest duration any key accepts (10 × 365 days, as the longest token lifetime kept).
const MAX_DURATION: Duration = crate::token::response::MAX_LIFETIME;
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
pub fn from_str(text: &str, source: Option<&Path>, env: &dyn Env) -> Result<Config, ConfigError> {
    error::check_shape(text).map_err(|e| e.with_file(source))?;
    let raw: RawConfig =
        toml::from_str(text).map_err(|e| ConfigError::from_toml(&e, text).with_file(source))?;
    let x = Expander::new(env, source.and_then(Path::parent));
    build(raw, source, &x).map_err(|e| e.with_file(source))
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
    /// Required when `client_auth` is basic or body.
    pub client_id: Option<String>,
    /// From `client_secret` or `client_secret_file` (trailing newlines trimmed).
    pub client_secret: Option<Secret>,
    /// How the client authenticates to the token endpoint; default basic.
    pub client_auth: ClientAuth,
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
}

impl ClientAuth {
    /// The config spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            ClientAuth::Basic => "basic",
            ClientAuth::Body => "body",
            ClientAuth::Both => "both",
            ClientAuth::None => "none",
        }
    }
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

impl Config {
    /// A multi-line summary for `tokenproxy check`; secrets show as `[redacted]`.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_summary(&mut out);
        out
    }

    fn write_summary(&self, out: &mut String) -> fmt::Result {
        let source = self
            .source
            .as_ref()
            .map_or_else(|| "(inline)".to_owned(), |p| p.display().to_string());
        let n = self.clients.len();
        let plural = if n == 1 { "" } else { "s" };
        writeln!(out, "config {source}: ok, {n} client{plural}")?;
        writeln!(out, "admin")?;
        row(out, "listen", self.admin.listen)?;
        row(out, "api_key", secret_text(self.admin.api_key.as_ref()))?;
        row(out, "max_connections", self.admin.max_connections)?;
        row(
            out,
            "max_connections_per_ip",
            self.admin.max_connections_per_ip,
        )?;
        writeln!(out, "log")?;
        row(out, "level", &self.log.level)?;
        row(out, "format", self.log.format.as_str())?;
        let l = &self.limits;
        writeln!(out, "limits")?;
        row(out, "header_read_timeout", dur(l.header_read_timeout))?;
        row(out, "max_header_bytes", size_text(l.max_header_bytes))?;
        row(out, "max_headers", l.max_headers)?;
        row(out, "idle_timeout", dur(l.idle_timeout))?;
        row(out, "max_connections", l.max_connections)?;
        row(out, "shutdown_grace", dur(l.shutdown_grace))?;
        row(out, "body_timeout", dur(l.body_timeout))?;
        row(
            out,
            "body_min_rate",
            format!("{}/s", size_text(l.body_min_rate)),
        )?;
        row(out, "max_buffered_bytes", size_text(l.max_buffered_bytes))?;
        writeln!(out, "runtime")?;
        match self.runtime.workers {
            Some(n) => row(out, "workers", n)?,
            None => row(out, "workers", "auto")?,
        }
        writeln!(out, "store")?;
        row(out, "kind", self.store.kind())?;
        match &self.store {
            StoreConfig::Memory => {}
            StoreConfig::File(f) => {
                row(out, "path", f.path.display())?;
                row(out, "key", "[redacted]")?;
            }
            StoreConfig::Redis(r) => {
                row(out, r.location_key(), &r.display_url)?;
                row(out, "key_prefix", &r.key_prefix)?;
                row(out, "key", "[redacted]")?;
                if let Some(u) = &r.username {
                    row(out, "username", u)?;
                }
                if r.password.is_some() {
                    row(out, "password", "[redacted]")?;
                }
                if r.ca_pem.is_some() {
                    row(out, "ca_file", "set")?;
                }
            }
        }
        for c in &self.clients {
            c.write_summary(out)?;
        }
        Ok(())
    }
}

impl ClientConfig {
    fn write_summary(&self, out: &mut String) -> fmt::Result {
        let t = &self.token;
        writeln!(out, "client {}", self.name)?;
        let prefix = self.path_prefix.as_deref().unwrap_or("");
        let route = format!("{}{prefix} -> {}", self.listen, self.upstream.as_string());
        row(out, "listen", route)?;
        row(out, "timeout", dur(self.timeout))?;
        row(out, "token_wait_timeout", dur(self.token_wait_timeout))?;
        row(out, "retry_body_limit", size_text(self.retry_body_limit))?;
        let codes: Vec<String> = self
            .unauthorized_status
            .iter()
            .map(|c| c.as_u16().to_string())
            .collect();
        row(
            out,
            "unauthorized_status",
            format!("[{}]", codes.join(", ")),
        )?;
        let keys: Vec<&str> = self
            .idempotency_headers
            .iter()
            .map(|h| h.as_str())
            .collect();
        row(out, "idempotency_headers", format!("[{}]", keys.join(", ")))?;
        row(
            out,
            "replay_non_idempotent",
            self.replay_non_idempotent.to_string(),
        )?;
        row(out, "token.url", crate::secret::display_url(&t.url))?;
        row(out, "token.grant", t.grant.as_str())?;
        if let Grant::Password { username, password } = &t.grant {
            row(out, "token.username", username)?;
            row(out, "token.password", password)?;
        }
        row(
            out,
            "token.client_id",
            t.client_id.as_deref().unwrap_or("(none)"),
        )?;
        row(
            out,
            "token.client_secret",
            secret_text(t.client_secret.as_ref()),
        )?;
        row(out, "token.client_auth", t.client_auth.as_str())?;
        row(out, "token.body", t.body.as_str())?;
        row(out, "token.scope", t.scope.as_deref().unwrap_or("(none)"))?;
        row(
            out,
            "token.refresh_token",
            secret_text(t.refresh_token.as_ref()),
        )?;
        let refresh_url = t
            .refresh_url
            .as_ref()
            .map_or_else(|| "(token.url)".to_owned(), crate::secret::display_url);
        row(out, "token.refresh_url", refresh_url)?;
        let before = t
            .refresh_before
            .map_or_else(|| "(computed)".to_owned(), dur);
        row(out, "token.refresh_before", before)?;
        let lifetime = t.default_lifetime.map_or_else(|| "(none)".to_owned(), dur);
        row(out, "token.default_lifetime", lifetime)?;
        let rt_lifetime = t
            .refresh_token_lifetime
            .map_or_else(|| "(until rejected)".to_owned(), dur);
        row(out, "token.refresh_token_lifetime", rt_lifetime)?;
        // Only the names: a parameter value may well be a credential.
        let names: Vec<&str> = t.params.iter().map(|(k, _)| k.as_str()).collect();
        let params = if names.is_empty() {
            "(none)".to_owned()
        } else {
            format!("{} (values not shown)", names.join(", "))
        };
        row(out, "token.params", params)?;
        row(out, "token.timeout", dur(t.timeout))?;
        row(out, "token.tls", t.tls.summary())?;
        row(out, "tls", self.tls.summary())?;
        row(out, "proxy", self.proxy.summary())?;
        if let Some(a) = &self.authorize {
            let url = format!(
                "{}://{}{}",
                a.url.scheme_str().unwrap_or("https"),
                a.url.authority().map(|x| x.as_str()).unwrap_or(""),
                a.url.path()
            );
            row(out, "authorize.url", url)?;
            row(out, "authorize.redirect_uri", &a.redirect_uri)?;
            row(out, "authorize.pkce", if a.pkce { "S256" } else { "off" })?;
        }
        let i = &self.inject;
        row(
            out,
            "inject",
            format!("{}: {}<token>{}", i.header, i.prefix, i.suffix),
        )
    }
}

fn row(out: &mut String, key: &str, value: impl fmt::Display) -> fmt::Result {
    writeln!(out, "  {key:<30}{value}")
}

fn dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn secret_text(s: Option<&Secret>) -> String {
    s.map_or_else(|| "(none)".to_owned(), |s| s.to_string())
}

/// A size as a round, re-parsable bytesize string.
fn size_text(n: usize) -> String {
    match n {
        0 => "0".to_owned(),
        n if n % MIB == 0 => format!("{}MiB", n / MIB),
        n if n % KIB == 0 => format!("{}KiB", n / KIB),
        n => n.to_string(),
    }
}

fn build(raw: RawConfig, source: Option<&Path>, x: &Expander<'_>) -> Result<Config, ConfigError> {
    let top = Table::new(x, "");
    let admin = build_admin(raw.admin.unwrap_or_default(), &Table::new(x, "admin"))?;
    let log = build_log(raw.log.unwrap_or_default(), &Table::new(x, "log"))?;
    let limits = build_limits(raw.limits.unwrap_or_default(), &Table::new(x, "limits"))?;
    let runtime = build_runtime(raw.runtime.unwrap_or_default(), &Table::new(x, "runtime"))?;
    let store = build_store(raw.store.unwrap_or_default(), &Table::new(x, "store"))?;
    let raw_clients = raw.clients.unwrap_or_default();
    if raw_clients.is_empty() {
        let hint =
            "add a [clients.NAME] table with listen and upstream, and a [clients.NAME.token] table";
        return Err(top
            .err("clients", "no client is configured")
            .with_hint(hint));
    }
    let clients = raw_clients
        .into_iter()
        .map(|(name, c)| build_client(&name, c, x))
        .collect::<Result<Vec<_>, _>>()?;
    check_listeners(&admin, &clients)?;
    admin::check_cross_site(&clients)?;
    Ok(Config {
        source: source.map(Path::to_path_buf),
        admin,
        log,
        limits,
        runtime,
        store,
        clients,
    })
}

fn build_log(raw: RawLog, t: &Table<'_>) -> Result<LogConfig, ConfigError> {
    let level = match t.opt("level", raw.level)?.map(|l| l.trim().to_owned()) {
        Some(level) if level.is_empty() => {
            let hint = "write a level like \"info\" or a filter like \"info,tokenproxy=debug\"";
            return Err(t.err("level", "is empty").with_hint(hint));
        }
        Some(level) => level,
        None => LogConfig::default().level,
    };
    let formats = [("text", LogFormat::Text), ("json", LogFormat::Json)];
    let format = t.choice("format", raw.format, Some(LogFormat::Text), &formats)?;
    Ok(LogConfig { level, format })
}

fn build_runtime(raw: RawRuntime, t: &Table<'_>) -> Result<RuntimeConfig, ConfigError> {
    let n = match raw.workers {
        None => return Ok(RuntimeConfig::default()),
        Some(Scalar::Int(n)) => n,
        Some(Scalar::Text(raw)) => {
            let text = t.string("workers", &raw)?;
            match text.trim() {
                "auto" => return Ok(RuntimeConfig::default()),
                n => n.parse::<i64>().map_err(|_| {
                    t.err(
                        "workers",
                        format!("{text:?} is not a whole number or \"auto\""),
                    )
                    .with_hint("write a thread count like 2, or \"auto\" for one per CPU")
                })?,
            }
        }
    };
    let workers = Some(t.count("workers", Some(Scalar::Int(n)), 1, 1..=MAX_WORKERS)?);
    Ok(RuntimeConfig { workers })
}

fn build_limits(raw: RawLimits, t: &Table<'_>) -> Result<Limits, ConfigError> {
    let d = Limits::default();
    Ok(Limits {
        header_read_timeout: t.duration(
            "header_read_timeout",
            raw.header_read_timeout,
            d.header_read_timeout,
        )?,
        // hyper refuses a read buffer below 8KiB.
        max_header_bytes: t.size(
            "max_header_bytes",
            raw.max_header_bytes,
            d.max_header_bytes,
            8 * KIB..=MIB,
        )?,
        max_headers: t.count("max_headers", raw.max_headers, d.max_headers, 1..=1000)?,
        idle_timeout: t.duration("idle_timeout", raw.idle_timeout, d.idle_timeout)?,
        max_connections: t.count(
            "max_connections",
            raw.max_connections,
            d.max_connections,
            1..=usize::MAX,
        )?,
        shutdown_grace: t
            .opt_duration("shutdown_grace", raw.shutdown_grace, true)?
            .unwrap_or(d.shutdown_grace),
        body_timeout: t.duration("body_timeout", raw.body_timeout, d.body_timeout)?,
        body_min_rate: t.size(
            "body_min_rate",
            raw.body_min_rate,
            d.body_min_rate,
            1..=usize::MAX,
        )?,
        max_buffered_bytes: t.size(
            "max_buffered_bytes",
            raw.max_buffered_bytes,
            d.max_buffered_bytes,
            0..=usize::MAX,
        )?,
    })
}

fn build_client(name: &str, raw: RawClient, x: &Expander<'_>) -> Result<ClientConfig, ConfigError> {
    let t = Table::new(x, format!("clients.{name}"));
    let name_ok = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
    if name.is_empty() || !name.bytes().all(name_ok) {
        let problem = format!("client name {name:?} may only contain letters, digits, _ and -");
        let hint = "name the table like [clients.payments]";
        return Err(ConfigError::new(t.key(""), problem).with_hint(hint));
    }
    let listen = t.listen("listen", &t.required("listen", raw.listen, LISTEN_HINT)?)?;
    let upstream = upstream_url(&t, &t.required("upstream", raw.upstream, UPSTREAM_HINT)?)?;
    let path_prefix = match raw.path_prefix {
        Some(r) => Some(path_prefix(&t, &r)?),
        None => None,
    };
    let token_hint = format!("add a [{}] table with url and grant", t.key("token"));
    let raw_token = t.required("token", raw.token, &token_hint)?;
    let authorize = raw
        .authorize
        .map(|a| build_authorize(a, &Table::new(x, t.key("authorize"))))
        .transpose()?;
    Ok(ClientConfig {
        name: name.to_owned(),
        listen,
        upstream,
        path_prefix,
        allowed_hosts: host_list(&t, "allowed_hosts", raw.allowed_hosts)?,
        allow_cross_site: raw.allow_cross_site.unwrap_or(false),
        retry_body_limit: t.size(
            "retry_body_limit",
            raw.retry_body_limit,
            MIB,
            0..=usize::MAX,
        )?,
        timeout: t.duration("timeout", raw.timeout, Duration::from_secs(30))?,
        token_wait_timeout: t.duration(
            "token_wait_timeout",
            raw.token_wait_timeout,
            Duration::from_secs(2),
        )?,
        unauthorized_status: statuses(&t, raw.unauthorized_status)?,
        idempotency_headers: header_names(&t, "idempotency_headers", raw.idempotency_headers)?,
        replay_non_idempotent: raw.replay_non_idempotent.unwrap_or(false),
        token: build_token(
            raw_token,
            &Table::new(x, t.key("token")),
            authorize.is_some(),
        )?,
        inject: build_inject(
            raw.inject.unwrap_or_default(),
            &Table::new(x, t.key("inject")),
        )?,
        tls: build_tls(raw.tls, &Table::new(x, t.key("tls")))?,
        proxy: build_proxy(raw.proxy, &t)?,
        authorize,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum GrantKind {
    ClientCredentials,
    Password,
    RefreshToken,
}

/// `[clients.NAME.token]`; with `authorizable` (an `[authorize]` table), `grant =
/// "refresh_token"` may start without a bootstrap refresh token.
fn build_token(
    raw: RawToken,
    t: &Table<'_>,
    authorizable: bool,
) -> Result<TokenConfig, ConfigError> {
    let url = t
        .url(
            "url",
            &t.required("url", raw.url, TOKEN_URL_HINT)?,
            TOKEN_URL_HINT,
        )?
        .0;
    let grants = [
        ("client_credentials", GrantKind::ClientCredentials),
        ("password", GrantKind::Password),
        ("refresh_token", GrantKind::RefreshToken),
    ];
    let grant_kind = t.choice(
        "grant",
        raw.grant,
        Some(GrantKind::ClientCredentials),
        &grants,
    )?;
    let grant_name = grants
        .iter()
        .find(|g| g.1 == grant_kind)
        .map_or("", |g| g.0);
    let client_id = t.non_empty("client_id", raw.client_id)?;
    let secret_name = if raw.client_secret_file.is_some() {
        "client_secret_file"
    } else {
        "client_secret"
    };
    let client_secret = t.secret("client_secret", raw.client_secret, raw.client_secret_file)?;
    let auths = [
        ("basic", ClientAuth::Basic),
        ("body", ClientAuth::Body),
        ("both", ClientAuth::Both),
        ("none", ClientAuth::None),
    ];
    let client_auth = t.choice(
        "client_auth",
        raw.client_auth,
        Some(ClientAuth::Basic),
        &auths,
    )?;
    let bodies = [("form", BodyFormat::Form), ("json", BodyFormat::Json)];
    let body = t.choice("body", raw.body, Some(BodyFormat::Form), &bodies)?;
    let scope = t.non_empty("scope", raw.scope)?;
    let username = t.non_empty("username", raw.username)?;
    let password_name = if raw.password_file.is_some() {
        "password_file"
    } else {
        "password"
    };
    let password = t.secret("password", raw.password, raw.password_file)?;
    let refresh_token = t.secret("refresh_token", raw.refresh_token, raw.refresh_token_file)?;
    let refresh_url = match raw.refresh_url {
        Some(r) => Some(t.url("refresh_url", &r, TOKEN_URL_HINT)?.0),
        None => None,
    };

    let needs = |k: &str, hint: &str| {
        t.err(k, format!("is required when grant = \"{grant_name}\""))
            .with_hint(hint)
    };
    let has_username = username.is_some();
    let grant = match (grant_kind, username, password) {
        (GrantKind::Password, Some(username), Some(password)) => {
            Grant::Password { username, password }
        }
        (GrantKind::Password, None, _) => {
            return Err(needs(
                "username",
                "set username, and password or password_file",
            ))
        }
        (GrantKind::Password, Some(_), None) => {
            return Err(needs("password", "set password or password_file"))
        }
        (_, Some(_), _) | (_, None, Some(_)) => {
            let stray = if has_username {
                "username"
            } else {
                password_name
            };
            let problem = format!("is only used with grant = \"password\", not \"{grant_name}\"");
            let hint = "remove it, or set grant = \"password\"";
            return Err(t.err(stray, problem).with_hint(hint));
        }
        (GrantKind::RefreshToken, None, None) if refresh_token.is_none() && !authorizable => {
            let hint = "set refresh_token or refresh_token_file to a bootstrap refresh token, or add an [authorize] table and run tokenproxy authorize";
            return Err(needs("refresh_token", hint));
        }
        (GrantKind::RefreshToken, None, None) => Grant::RefreshToken,
        (GrantKind::ClientCredentials, None, None) => Grant::ClientCredentials,
    };
    match client_auth {
        ClientAuth::Basic | ClientAuth::Body | ClientAuth::Both if client_id.is_none() => {
            let problem = format!(
                "is required when client_auth = \"{}\"",
                client_auth.as_str()
            );
            let hint = "set client_id, or client_auth = \"none\" for a provider without client authentication";
            return Err(t.err("client_id", problem).with_hint(hint));
        }
        ClientAuth::None if client_secret.is_some() => {
            let hint = "use client_auth = \"basic\" or \"body\", or remove the secret";
            return Err(t
                .err(
                    secret_name,
                    "is set but client_auth = \"none\" never sends it",
                )
                .with_hint(hint));
        }
        _ => {}
    }
    Ok(TokenConfig {
        url,
        grant,
        client_id,
        client_secret,
        client_auth,
        body,
        scope,
        refresh_token,
        refresh_url,
        refresh_before: t.opt_duration("refresh_before", raw.refresh_before, true)?,
        default_lifetime: t.opt_duration("default_lifetime", raw.default_lifetime, false)?,
        refresh_token_lifetime: t.opt_duration(
            "refresh_token_lifetime",
            raw.refresh_token_lifetime,
            false,
        )?,
        params: params(t, raw.params.unwrap_or_default())?,
        timeout: t.duration("timeout", raw.timeout, Duration::from_secs(10))?,
        tls: build_tls(raw.tls, &Table::new(t.x, t.key("tls")))?,
    })
}

fn params(
    t: &Table<'_>,
    raw: BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        let key = format!("params.{name}");
        if name.is_empty() {
            return Err(t
                .err(&key, "a parameter name is empty")
                .with_hint("remove it"));
        }
        if RESERVED_PARAMS.contains(&name.as_str()) {
            let own = if name == "grant_type" {
                "grant"
            } else {
                name.as_str()
            };
            let hint = format!("use the {own} key of [{}] instead", t.key(""));
            let problem = format!("{name} is set by tokenproxy and cannot be overridden");
            return Err(t.err(&key, problem).with_hint(hint));
        }
        let value = t.string(&key, &value)?;
        out.push((name, value));
    }
    Ok(out)
}

fn build_inject(raw: RawInject, t: &Table<'_>) -> Result<InjectConfig, ConfigError> {
    let header = match t.opt("header", raw.header)? {
        None => http::header::AUTHORIZATION,
        Some(text) => HeaderName::from_bytes(text.trim().as_bytes()).map_err(|_| {
            let hint = "write it like \"Authorization\" or \"X-Api-Token\"";
            t.err("header", format!("{text:?} is not a valid header name"))
                .with_hint(hint)
        })?,
    };
    // Headers the proxy manages itself (framing, routing, hop-by-hop) cannot carry a token.
    const MANAGED: [&str; 8] = [
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
    ];
    if MANAGED.contains(&header.as_str()) {
        let problem = format!("{header} cannot carry the token: the proxy manages it");
        let hint = "use \"Authorization\" or a custom header like \"X-Api-Token\"";
        return Err(t.err("header", problem).with_hint(hint));
    }
    let format_is_default = raw.format.is_none();
    let format = t.opt("format", raw.format)?;
    let format = format.unwrap_or_else(|| "Bearer {token}".to_owned());
    let hint = "write it like \"Bearer {token}\" or \"Token token={token}\"";
    if format.matches("{token}").count() != 1 {
        let problem = format!("{format:?} must contain {{token}} exactly once");
        return Err(t.err("format", problem).with_hint(hint));
    }
    let (prefix, suffix) = format.split_once("{token}").unwrap_or((&format, ""));
    if HeaderValue::from_str(&format!("{prefix}x{suffix}")).is_err() {
        let problem = format!("{format:?} would not make a valid header value");
        let hint = "use visible ASCII characters and spaces only";
        return Err(t.err("format", problem).with_hint(hint));
    }
    Ok(InjectConfig {
        header,
        prefix: prefix.to_owned(),
        suffix: suffix.to_owned(),
        format_is_default,
    })
}

/// Each client listen address is unique, or shared only by clients with distinct path prefixes.
fn check_listeners(admin: &AdminConfig, clients: &[ClientConfig]) -> Result<(), ConfigError> {
    for (i, c) in clients.iter().enumerate() {
        if c.listen == admin.listen {
            let problem = format!(
                "{} is also the listen address of client {:?}",
                c.listen, c.name
            );
            let hint = "give [admin] listen its own port; the default is 127.0.0.1:9090";
            return Err(ConfigError::new("admin.listen", problem).with_hint(hint));
        }
        let key = format!("clients.{}.listen", c.name);
        for other in clients[..i].iter().filter(|o| o.listen == c.listen) {
            let (problem, hint) = match (&other.path_prefix, &c.path_prefix) {
                (Some(a), Some(b)) if a != b => continue,
                (Some(a), Some(_)) => (
                    format!("{} is shared with client {:?} and both use path_prefix {a:?}", c.listen, other.name),
                    "give each client sharing a listen address a distinct path_prefix, or its own port",
                ),
                _ => (
                    format!("{} is also the listen address of client {:?}", c.listen, other.name),
                    "clients sharing a listen address each need a distinct path_prefix; set one on both, or use another port",
                ),
            };
            return Err(ConfigError::new(key, problem).with_hint(hint));
        }
    }
    Ok(())
}

fn upstream_url(t: &Table<'_>, raw: &str) -> Result<UpstreamUrl, ConfigError> {
    let (uri, scheme, authority) = t.url("upstream", raw, UPSTREAM_HINT)?;
    if uri.query().is_some() || raw.contains('?') {
        let hint = "an upstream is scheme://host[:port][/base-path]; request query strings are forwarded as they are";
        return Err(t
            .err("upstream", format!("\"{uri}\" has a query string"))
            .with_hint(hint));
    }
    Ok(UpstreamUrl {
        scheme,
        authority,
        base_path: uri.path().trim_end_matches('/').to_owned(),
    })
}

/// Normalizes to "/a/b": a leading '/', no trailing '/', no empty, "." or ".." segment.
fn path_prefix(t: &Table<'_>, raw: &str) -> Result<String, ConfigError> {
    let text = t.string("path_prefix", raw)?;
    let trimmed = text.trim().trim_matches('/');
    if trimmed.is_empty() {
        let hint = "write it like \"/payments\", or remove path_prefix to route every path";
        return Err(t
            .err("path_prefix", format!("{text:?} is not a prefix"))
            .with_hint(hint));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@%/".contains(c);
    let bad_segment = trimmed
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..");
    if !trimmed.chars().all(allowed) || bad_segment {
        let problem = format!("{text:?} is not a valid URL path prefix");
        return Err(t
            .err("path_prefix", problem)
            .with_hint("write it like \"/payments\""));
    }
    Ok(format!("/{trimmed}"))
}

/// A list of header names; by default `Idempotency-Key` alone.
fn header_names(
    t: &Table<'_>,
    k: &str,
    raw: Option<Vec<String>>,
) -> Result<Vec<HeaderName>, ConfigError> {
    let Some(list) = raw else {
        return Ok(vec![HeaderName::from_static("idempotency-key")]);
    };
    let mut out = Vec::with_capacity(list.len());
    for item in list {
        let text = t.string(k, &item)?;
        let name = HeaderName::from_bytes(text.trim().as_bytes()).map_err(|_| {
            t.err(k, format!("{text:?} is not a header name"))
                .with_hint("write it like [\"Idempotency-Key\", \"X-Request-Nonce\"]")
        })?;
        if !out.contains(&name) {
            out.push(name);
        }
    }
    Ok(out)
}

fn statuses(t: &Table<'_>, raw: Option<Vec<Scalar>>) -> Result<Vec<StatusCode>, ConfigError> {
    const K: &str = "unauthorized_status";
    let Some(list) = raw else {
        return Ok(vec![StatusCode::UNAUTHORIZED]);
    };
    let hint = "write it like [401] or [401, 403]";
    let mut out = Vec::with_capacity(list.len());
    for item in list {
        let n = match item {
            Scalar::Int(n) => n,
            Scalar::Text(raw) => {
                let text = t.string(K, &raw)?;
                let bad = || {
                    t.err(K, format!("{text:?} is not a status code"))
                        .with_hint(hint)
                };
                text.trim().parse().map_err(|_| bad())?
            }
        };
        let code = u16::try_from(n)
            .ok()
            .filter(|c| (400..=599).contains(c))
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or_else(|| {
                t.err(K, format!("{n} is not a 4xx or 5xx status code"))
                    .with_hint(hint)
            })?;
        if !out.contains(&code) {
            out.push(code);
        }
    }
    Ok(out)
}

/// One TOML table under validation: its dotted name and the expander.
///
/// The value parsers live here so that every error carries the full dotted key.
struct Table<'a> {
    x: &'a Expander<'a>,
    name: String,
}

impl<'a> Table<'a> {
    fn new(x: &'a Expander<'a>, name: impl Into<String>) -> Self {
        Table {
            x,
            name: name.into(),
        }
    }

    /// The dotted key of `k` in this table; `""` is the table itself.
    fn key(&self, k: &str) -> String {
        match (self.name.is_empty(), k.is_empty()) {
            (true, _) => k.to_owned(),
            (false, true) => self.name.clone(),
            (false, false) => format!("{}.{k}", self.name),
        }
    }

    fn err(&self, k: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::new(self.key(k), problem)
    }

    fn string(&self, k: &str, raw: &str) -> Result<String, ConfigError> {
        self.x.string(&self.key(k), raw)
    }

    fn opt(&self, k: &str, raw: Option<String>) -> Result<Option<String>, ConfigError> {
        raw.map(|r| self.string(k, &r)).transpose()
    }

    fn non_empty(&self, k: &str, raw: Option<String>) -> Result<Option<String>, ConfigError> {
        match self.opt(k, raw)? {
            Some(v) if v.is_empty() => Err(self
                .err(k, "is empty")
                .with_hint("set a value, or remove the key")),
            v => Ok(v),
        }
    }

    fn secret(
        &self,
        k: &str,
        inline: Option<String>,
        file: Option<String>,
    ) -> Result<Option<Secret>, ConfigError> {
        self.x.secret(&self.name, k, inline, file)
    }

    fn required<T>(&self, k: &str, value: Option<T>, hint: &str) -> Result<T, ConfigError> {
        value.ok_or_else(|| self.err(k, "is required").with_hint(hint))
    }

    /// One of `options` by its config spelling; `default` `None` makes the key required.
    fn choice<T: Clone>(
        &self,
        k: &str,
        raw: Option<String>,
        default: Option<T>,
        options: &[(&str, T)],
    ) -> Result<T, ConfigError> {
        let names: Vec<String> = options.iter().map(|(n, _)| format!("{n:?}")).collect();
        let hint = format!("use one of {}", names.join(", "));
        let Some(raw) = raw else {
            return default.ok_or_else(|| self.err(k, "is required").with_hint(hint.clone()));
        };
        let text = self.string(k, &raw)?;
        match options.iter().find(|(n, _)| *n == text) {
            Some((_, v)) => Ok(v.clone()),
            None => Err(self
                .err(k, format!("{text:?} is not an accepted value"))
                .with_hint(hint)),
        }
    }

    fn listen(&self, k: &str, raw: &str) -> Result<SocketAddr, ConfigError> {
        let text = self.string(k, raw)?;
        text.trim().parse().map_err(|_| {
            let problem = format!("{text:?} is not an ip:port socket address");
            self.err(k, problem).with_hint(LISTEN_HINT)
        })
    }

    /// An absolute http(s) URL with a host and without userinfo or fragment.
    fn url(&self, k: &str, raw: &str, hint: &str) -> Result<(Uri, Scheme, Authority), ConfigError> {
        let text = self.string(k, raw)?;
        let bad = |problem: String| self.err(k, problem).with_hint(hint);
        let after_scheme = text
            .split_once("://")
            .map_or(text.as_str(), |(_, rest)| rest);
        let authority_part = after_scheme.split(['/', '?', '#']).next().unwrap_or("");
        // Checked first and never echoed: userinfo may hold a password.
        if authority_part.contains('@') {
            return Err(bad(
                "must not contain credentials (user:password@)".to_owned()
            ));
        }
        if text.contains('#') {
            return Err(bad(format!(
                "{text:?} has a fragment (#...), which is never sent"
            )));
        }
        if text.contains("://") && authority_part.is_empty() {
            return Err(bad(format!("{text:?} has no host")));
        }
        let uri: Uri = text
            .parse()
            .map_err(|_| bad(format!("{text:?} is not a valid URL")))?;
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(bad(format!(
                "{text:?} is not an absolute http or https URL"
            )));
        };
        if !matches!(scheme.as_str(), "http" | "https") {
            return Err(bad(format!("{text:?} is not an http or https URL")));
        }
        if authority.host().is_empty() {
            return Err(bad(format!("{text:?} has no host")));
        }
        if authority.port().is_some() && authority.port_u16().is_none() {
            return Err(bad(format!("{text:?} has an invalid port")));
        }
        let (scheme, authority) = (scheme.clone(), authority.clone());
        Ok((uri, scheme, authority))
    }

    /// A duration greater than zero, `default` when unset.
    fn duration(
        &self,
        k: &str,
        raw: Option<Scalar>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        Ok(self.opt_duration(k, raw, false)?.unwrap_or(default))
    }

    fn opt_duration(
        &self,
        k: &str,
        raw: Option<Scalar>,
        allow_zero: bool,
    ) -> Result<Option<Duration>, ConfigError> {
        let d = match raw {
            None => return Ok(None),
            Some(Scalar::Int(n)) => {
                return Err(self
                    .err(k, format!("{n} has no unit"))
                    .with_hint(DURATION_HINT))
            }
            Some(Scalar::Text(raw)) => {
                let text = self.string(k, &raw)?;
                humantime::parse_duration(text.trim()).map_err(|_| {
                    self.err(k, format!("{text:?} is not a duration"))
                        .with_hint(DURATION_HINT)
                })?
            }
        };
        if d.is_zero() && !allow_zero {
            return Err(self
                .err(k, "must be greater than zero")
                .with_hint(DURATION_HINT));
        }
        if d > MAX_DURATION {
            // Deadlines and /status times are computed from these; nothing needs longer.
            return Err(self
                .err(
                    k,
                    format!("{} is longer than 10 years", humantime::format_duration(d)),
                )
                .with_hint(DURATION_HINT));
        }
        Ok(Some(d))
    }

    fn size(
        &self,
        k: &str,
        raw: Option<Scalar>,
        default: usize,
        range: RangeInclusive<usize>,
    ) -> Result<usize, ConfigError> {
        let bytes = match raw {
            None => return Ok(default),
            Some(Scalar::Int(n)) => u64::try_from(n)
                .map_err(|_| self.err(k, format!("{n} is negative")).with_hint(SIZE_HINT))?,
            Some(Scalar::Text(raw)) => {
                let text = self.string(k, &raw)?;
                let bad = || {
                    self.err(k, format!("{text:?} is not a size"))
                        .with_hint(SIZE_HINT)
                };
                text.trim().parse::<ByteSize>().map_err(|_| bad())?.as_u64()
            }
        };
        let n = usize::try_from(bytes).unwrap_or(usize::MAX);
        self.in_range(k, n, &range, size_text)
    }

    fn count(
        &self,
        k: &str,
        raw: Option<Scalar>,
        default: usize,
        range: RangeInclusive<usize>,
    ) -> Result<usize, ConfigError> {
        let n = match raw {
            None => return Ok(default),
            Some(Scalar::Int(n)) => n,
            Some(Scalar::Text(raw)) => {
                let text = self.string(k, &raw)?;
                let bad = || self.err(k, format!("{text:?} is not a whole number"));
                text.trim()
                    .parse::<i64>()
                    .map_err(|_| bad().with_hint("write it like 100"))?
            }
        };
        // A negative count is below every range we accept.
        let n = usize::try_from(n).unwrap_or(0);
        self.in_range(k, n, &range, |v| v.to_string())
    }

    fn in_range(
        &self,
        k: &str,
        n: usize,
        range: &RangeInclusive<usize>,
        show: fn(usize) -> String,
    ) -> Result<usize, ConfigError> {
        let (min, max) = (*range.start(), *range.end());
        let hint = if max == usize::MAX {
            format!("use a value of at least {}", show(min))
        } else {
            format!("use a value between {} and {}", show(min), show(max))
        };
        if n < min {
            return Err(self
                .err(k, format!("must be at least {}", show(min)))
                .with_hint(hint));
        }
        if n > max {
            return Err(self
                .err(k, format!("must be at most {}", show(max)))
                .with_hint(hint));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENV_SECRET: &str = "env-secret-Zq81";
    const FILE_SECRET: &str = "file-secret-Kx42";
    const PASSWORD: &str = "pw-secret-Tn07";

    /// The PRODUCT.md example with its ${VAR}s.
    const EXAMPLE: &str = r#"
[admin]
listen = "127.0.0.1:9090"          # /metrics /healthz /readyz /status

[log]
level = "info"
format = "text"

[clients.payments]
listen = "127.0.0.1:8080"
upstream = "https://api.pay.example"

[clients.payments.token]
url = "https://api.pay.example/api/v1/oauth2/token"
grant = "client_credentials"
client_id = "${PAY_CLIENT_ID}"
client_secret = "${PAY_CLIENT_SECRET}"   # or client_secret_file = "/run/secrets/pay"
client_auth = "basic"
body = "form"
"#;

    /// One client with only the required keys; error tests edit it.
    const MIN: &str = r#"
[clients.payments]
listen = "127.0.0.1:8080"
upstream = "https://api.pay.example"

[clients.payments.token]
url = "https://api.pay.example/oauth2/token"
grant = "client_credentials"
client_id = "id-123"
client_secret = "${PAY_CLIENT_SECRET}"
"#;

    fn env() -> MapEnv {
        MapEnv::new()
            .var("PAY_CLIENT_ID", "pay-id")
            .var("PAY_CLIENT_SECRET", ENV_SECRET)
            .var("WALLET_PORT", "8081")
            .file("/run/secrets/wallet", format!("{FILE_SECRET}\n"))
            .file("/run/secrets/wallet-password", format!("{PASSWORD}\r\n"))
    }

    fn parse(text: &str) -> Config {
        match from_str(text, Some(Path::new("tokenproxy.toml")), &env()) {
            Ok(c) => c,
            Err(e) => panic!("config should be valid, got: {e}"),
        }
    }

    fn fail(text: &str) -> ConfigError {
        match from_str(text, Some(Path::new("tokenproxy.toml")), &env()) {
            Ok(c) => panic!("config should be rejected, got: {c:?}"),
            Err(e) => e,
        }
    }

    fn assert_error(err: &ConfigError, key: &str, needle: &str) {
        assert_eq!(err.key(), key, "wrong key in: {err}");
        let text = err.to_string();
        assert!(text.contains(needle), "{text:?} should contain {needle:?}");
        assert!(
            text.starts_with("tokenproxy.toml"),
            "{text:?} should name the file"
        );
    }

    #[test]
    fn product_example_parses_with_env_values_and_defaults() {
        let c = parse(EXAMPLE);
        assert_eq!(c.source.as_deref(), Some(Path::new("tokenproxy.toml")));
        assert_eq!(c.admin.listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.log, LogConfig::default());
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.limits.max_header_bytes, 32 * 1024);
        assert_eq!(c.store, StoreConfig::Memory);
        assert_eq!(c.clients.len(), 1);
        let p = &c.clients[0];
        assert_eq!(p.name, "payments");
        assert_eq!(p.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(p.upstream.scheme, Scheme::HTTPS);
        assert_eq!(p.upstream.authority.as_str(), "api.pay.example");
        assert_eq!(p.upstream.base_path, "");
        assert_eq!(p.upstream.as_string(), "https://api.pay.example");
        assert_eq!(p.path_prefix, None);
        assert_eq!(p.retry_body_limit, 1024 * 1024);
        assert_eq!(p.timeout, Duration::from_secs(30));
        assert_eq!(p.token_wait_timeout, Duration::from_secs(2));
        assert_eq!(p.unauthorized_status, vec![StatusCode::UNAUTHORIZED]);
        let t = &p.token;
        assert_eq!(
            t.url.to_string(),
            "https://api.pay.example/api/v1/oauth2/token"
        );
        assert!(matches!(t.grant, Grant::ClientCredentials));
        assert_eq!(t.grant.as_str(), "client_credentials");
        assert_eq!(t.client_id.as_deref(), Some("pay-id"));
        assert_eq!(
            t.client_secret.as_ref().map(Secret::expose),
            Some(ENV_SECRET)
        );
        assert_eq!(t.client_auth, ClientAuth::Basic);
        assert_eq!(t.body, BodyFormat::Form);
        assert_eq!(
            (
                t.scope.as_ref(),
                t.refresh_token.as_ref(),
                t.refresh_url.as_ref()
            ),
            (None, None, None)
        );
        assert_eq!((t.refresh_before, t.default_lifetime), (None, None));
        assert!(t.params.is_empty());
        assert_eq!(t.timeout, Duration::from_secs(10));
        assert_eq!(p.inject.header, http::header::AUTHORIZATION);
        assert_eq!(
            (p.inject.prefix.as_str(), p.inject.suffix.as_str()),
            ("Bearer ", "")
        );
        assert!(p.inject.format_is_default);
    }

    #[test]
    fn every_key_is_read_and_clients_are_sorted_by_name() {
        let c = parse(
            r#"
[log]
level = "info,tokenproxy=debug"
format = "json"

[limits]
header_read_timeout = "5s"
max_header_bytes = "64KiB"
max_headers = 50
idle_timeout = "2m"
max_connections = "${WALLET_PORT}"
shutdown_grace = "0s"

[store]
kind = "memory"

[clients.wallet]
listen = "127.0.0.1:${WALLET_PORT}"
upstream = "http://127.0.0.1:9000/v1/"
path_prefix = "wallet/"
retry_body_limit = 0
timeout = "1m 30s"
token_wait_timeout = "500ms"
unauthorized_status = [401, "403"]

[clients.wallet.token]
url = "https://auth.wallet.example/o/token/"
grant = "password"
username = "merchant"
password_file = "/run/secrets/wallet-password"
client_id = "w"
client_secret_file = "/run/secrets/wallet"
client_auth = "body"
body = "json"
scope = "read write"
refresh_token = "${PAY_CLIENT_SECRET}"
refresh_url = "https://auth.wallet.example/o/refresh/"
refresh_before = "60s"
default_lifetime = "5m"
refresh_token_lifetime = "24h"
params = { audience = "payments-api", "a" = "$${literal}" }
timeout = "3s"

[clients.wallet.inject]
header = "X-Api-Token"
format = "Token {token};v=1"

[clients.payments]
listen = "127.0.0.1:8081"
path_prefix = "/payments"
upstream = "https://api.pay.example"
[clients.payments.token]
url = "https://api.pay.example/token"
grant = "refresh_token"
refresh_token = "boot"
client_auth = "none"
"#,
        );
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.log.level, "info,tokenproxy=debug");
        assert_eq!(c.limits.max_header_bytes, 64 * 1024);
        assert_eq!(c.limits.max_connections, 8081);
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(120));
        assert_eq!(c.limits.shutdown_grace, Duration::ZERO);
        let names: Vec<&str> = c.clients.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["payments", "wallet"]);
        assert!(matches!(c.clients[0].token.grant, Grant::RefreshToken));
        let w = &c.clients[1];
        assert_eq!(w.listen.port(), 8081);
        assert_eq!(w.upstream.as_string(), "http://127.0.0.1:9000/v1");
        assert_eq!(w.path_prefix.as_deref(), Some("/wallet"));
        assert_eq!(w.retry_body_limit, 0);
        assert_eq!(w.timeout, Duration::from_secs(90));
        assert_eq!(w.token_wait_timeout, Duration::from_millis(500));
        assert_eq!(
            w.unauthorized_status,
            [StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN]
        );
        let t = &w.token;
        match &t.grant {
            Grant::Password { username, password } => {
                assert_eq!(username, "merchant");
                assert_eq!(
                    password.expose(),
                    PASSWORD,
                    "file content loses its trailing \\r\\n"
                );
            }
            other => panic!("expected the password grant, got {other:?}"),
        }
        assert_eq!(
            t.client_secret.as_ref().map(Secret::expose),
            Some(FILE_SECRET)
        );
        assert_eq!(
            (t.client_auth, t.body),
            (ClientAuth::Body, BodyFormat::Json)
        );
        assert_eq!(
            t.refresh_token.as_ref().map(Secret::expose),
            Some(ENV_SECRET)
        );
        assert_eq!(t.refresh_before, Some(Duration::from_secs(60)));
        assert_eq!(t.default_lifetime, Some(Duration::from_secs(300)));
        assert_eq!(t.refresh_token_lifetime, Some(Duration::from_secs(86_400)));
        let params: Vec<(&str, &str)> = t
            .params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(params, [("a", "${literal}"), ("audience", "payments-api")]);
        assert_eq!(t.timeout, Duration::from_secs(3));
        assert_eq!(w.inject.header.as_str(), "x-api-token");
        assert_eq!(
            (w.inject.prefix.as_str(), w.inject.suffix.as_str()),
            ("Token ", ";v=1")
        );
        assert!(!w.inject.format_is_default);
    }

    #[test]
    fn load_reads_the_file_and_names_it_when_unreadable() {
        let e = env().file("/etc/tokenproxy.toml", MIN);
        let c = load(Path::new("/etc/tokenproxy.toml"), &e).expect("config file should load");
        assert_eq!(c.source.as_deref(), Some(Path::new("/etc/tokenproxy.toml")));
        let err = load(Path::new("/etc/missing.toml"), &e).unwrap_err();
        assert_eq!(err.file(), Some(Path::new("/etc/missing.toml")));
        assert!(
            err.to_string()
                .starts_with("/etc/missing.toml: cannot read the config file"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_names_the_key_its_line_and_the_valid_keys() {
        let err = fail(&MIN.replace("listen =", "listn ="));
        assert_error(&err, "clients.payments.listn", "unknown key `listn`");
        assert_eq!(err.location(), Some((3, 1)));
        assert!(
            err.hint().unwrap_or("").contains("did you mean `listen`?"),
            "{err}"
        );
        assert!(
            err.to_string().starts_with("tokenproxy.toml:3:1: "),
            "{err}"
        );
        let err = fail(&MIN.replace("[clients.payments.token]", "[clients.payments.tokn]"));
        assert_error(&err, "clients.payments.tokn", "unknown key `tokn`");
    }

    #[test]
    fn toml_syntax_error_has_a_position() {
        let err = fail(&MIN.replace(
            "grant = \"client_credentials\"",
            "grant = \"client_credentials",
        ));
        assert!(err.problem().starts_with("invalid TOML"), "{err}");
        assert_eq!(err.location().map(|l| l.0), Some(8));
    }

    #[test]
    fn runtime_workers_is_auto_by_default_or_a_count_in_range() {
        assert_eq!(parse(MIN).runtime.workers, None);
        let auto = parse(&format!("[runtime]\nworkers = \"auto\"\n{MIN}"));
        assert_eq!(auto.runtime.workers, None);
        let four = parse(&format!("[runtime]\nworkers = 4\n{MIN}"));
        assert_eq!(four.runtime.workers, Some(4));
        assert!(four.summary().contains("workers"), "{}", four.summary());
        let err = fail(&format!("[runtime]\nworkers = 0\n{MIN}"));
        assert_error(&err, "runtime.workers", "must be at least 1");
        let err = fail(&format!("[runtime]\nworkers = 257\n{MIN}"));
        assert_error(&err, "runtime.workers", "256");
        let err = fail(&format!("[runtime]\nworkers = \"many\"\n{MIN}"));
        assert_error(&err, "runtime.workers", "not a whole number or \"auto\"");
        let err = fail(&format!("[runtime]\nthreads = 2\n{MIN}"));
        assert!(err.to_string().contains("threads"), "{err}");
    }

    #[test]
    fn auto_workers_follow_tokio_worker_threads_then_the_cpu_count() {
        let auto = RuntimeConfig::default();
        assert_eq!(auto.resolve_workers(None, 6), 6);
        assert_eq!(auto.resolve_workers(Some("3"), 6), 3);
        assert_eq!(
            auto.resolve_workers(Some("zero"), 6),
            6,
            "unusable: ignored"
        );
        assert_eq!(auto.resolve_workers(Some("0"), 6), 6, "unusable: ignored");
        assert_eq!(auto.resolve_workers(None, 0), 1);
        let fixed = RuntimeConfig { workers: Some(2) };
        assert_eq!(fixed.resolve_workers(Some("3"), 6), 2, "the config wins");
    }

    #[test]
    fn bad_duration_names_key_value_and_example() {
        let err = fail(&MIN.replace(
            "[clients.payments.token]",
            "timeout = \"30 parsecs\"\n[clients.payments.token]",
        ));
        assert_error(
            &err,
            "clients.payments.timeout",
            "\"30 parsecs\" is not a duration",
        );
        assert!(err.to_string().contains("\"30s\""), "{err}");
        let err = fail(&format!("[limits]\nidle_timeout = 60\n{MIN}"));
        assert_error(&err, "limits.idle_timeout", "60 has no unit");
        let err = fail(&MIN.replace(
            "[clients.payments.token]",
            "token_wait_timeout = \"0s\"\n[clients.payments.token]",
        ));
        assert_error(
            &err,
            "clients.payments.token_wait_timeout",
            "must be greater than zero",
        );
    }

    #[test]
    fn bad_size_names_key_value_and_bounds() {
        let err = fail(&MIN.replace(
            "[clients.payments.token]",
            "retry_body_limit = \"lots\"\n[clients.payments.token]",
        ));
        assert_error(
            &err,
            "clients.payments.retry_body_limit",
            "\"lots\" is not a size",
        );
        assert!(err.to_string().contains("\"1MiB\""), "{err}");
        let err = fail(&format!("[limits]\nmax_header_bytes = \"4KiB\"\n{MIN}"));
        assert_error(&err, "limits.max_header_bytes", "must be at least 8KiB");
        let err = fail(&format!("[limits]\nmax_headers = 0\n{MIN}"));
        assert_error(&err, "limits.max_headers", "must be at least 1");
    }

    #[test]
    fn missing_env_var_names_variable_and_key() {
        let err = fail(&MIN.replace("id-123", "${NOPE_CLIENT_ID}"));
        assert_error(
            &err,
            "clients.payments.token.client_id",
            "environment variable NOPE_CLIENT_ID is not set",
        );
        let err = fail(&MIN.replace("id-123", "${NOPE"));
        assert_error(&err, "clients.payments.token.client_id", "unterminated");
    }

    #[test]
    fn unreadable_secret_file_names_key_path_and_io_error() {
        let err = fail(&MIN.replace(
            "client_secret = \"${PAY_CLIENT_SECRET}\"",
            "client_secret_file = \"/run/secrets/none\"",
        ));
        assert_error(
            &err,
            "clients.payments.token.client_secret_file",
            "cannot read /run/secrets/none: no such file",
        );
    }

    #[test]
    fn both_secret_forms_set_is_an_error() {
        let err = fail(&MIN.replace(
            "grant =",
            "client_secret_file = \"/run/secrets/wallet\"\ngrant =",
        ));
        assert_error(
            &err,
            "clients.payments.token.client_secret",
            "is set together with client_secret_file",
        );
    }

    #[test]
    fn bad_urls_are_rejected_with_an_example() {
        let err = fail(&MIN.replace("https://api.pay.example/oauth2/token", "ftp://x"));
        assert_error(
            &err,
            "clients.payments.token.url",
            "\"ftp://x\" is not an http or https URL",
        );
        assert!(
            err.to_string()
                .contains("(hint: write it like \"https://auth.example/oauth2/token\")"),
            "{err}"
        );
        let err = fail(&MIN.replace(
            "https://api.pay.example/oauth2/token",
            "https:///oauth2/token",
        ));
        assert_error(&err, "clients.payments.token.url", "has no host");
        let err = fail(&MIN.replace(
            "upstream = \"https://api.pay.example\"",
            "upstream = \"api.pay.example\"",
        ));
        assert_error(
            &err,
            "clients.payments.upstream",
            "is not an absolute http or https URL",
        );
        let err = fail(&MIN.replace(
            "upstream = \"https://api.pay.example\"",
            "upstream = \"https://api.pay.example/v1?x=1\"",
        ));
        assert_error(&err, "clients.payments.upstream", "has a query string");
        let err = fail(&MIN.replace(
            "upstream = \"https://api.pay.example\"",
            "upstream = \"https://u:pw@api.pay.example\"",
        ));
        assert_error(
            &err,
            "clients.payments.upstream",
            "must not contain credentials",
        );
        assert!(!err.to_string().contains("u:pw"), "{err}");
    }

    #[test]
    fn bad_listen_is_rejected() {
        let err = fail(&MIN.replace("127.0.0.1:8080", "localhost:8080"));
        assert_error(
            &err,
            "clients.payments.listen",
            "\"localhost:8080\" is not an ip:port socket address",
        );
    }

    #[test]
    fn shared_listen_needs_distinct_path_prefixes() {
        let second = MIN.replace("payments", "refunds");
        let err = fail(&format!("{MIN}{second}"));
        assert_error(
            &err,
            "clients.refunds.listen",
            "is also the listen address of client \"payments\"",
        );
        let both =
            format!("{MIN}{second}").replace("upstream =", "path_prefix = \"/p\"\nupstream =");
        let err = fail(&both);
        assert_error(
            &err,
            "clients.refunds.listen",
            "both use path_prefix \"/p\"",
        );
        let ok = format!(
            "{MIN}{}",
            second.replace("upstream =", "path_prefix = \"/r\"\nupstream =")
        )
        .replacen("upstream =", "path_prefix = \"/p/\"\nupstream =", 1);
        assert_eq!(parse(&ok).clients[0].path_prefix.as_deref(), Some("/p"));
        let err = fail(&format!("[admin]\nlisten = \"127.0.0.1:8080\"\n{MIN}"));
        assert_error(&err, "admin.listen", "client \"payments\"");
    }

    #[test]
    fn password_grant_needs_username_and_password() {
        let err = fail(&MIN.replace("\"client_credentials\"", "\"password\""));
        assert_error(
            &err,
            "clients.payments.token.username",
            "is required when grant = \"password\"",
        );
        let err = fail(&MIN.replace("\"client_credentials\"", "\"password\"\nusername = \"u\""));
        assert_error(
            &err,
            "clients.payments.token.password",
            "is required when grant = \"password\"",
        );
        let err = fail(&MIN.replace("\"client_credentials\"", "\"refresh_token\""));
        assert_error(&err, "clients.payments.token.refresh_token", "is required");
    }

    #[test]
    fn password_credentials_without_the_password_grant_are_rejected() {
        let err = fail(&format!("{MIN}password = \"p\"\n"));
        assert_error(
            &err,
            "clients.payments.token.password",
            "is only used with grant = \"password\"",
        );
        let err = fail(&format!("{MIN}username = \"u\"\n"));
        assert_error(
            &err,
            "clients.payments.token.username",
            "not \"client_credentials\"",
        );
    }

    #[test]
    fn empty_log_level_is_rejected() {
        let err = fail(&format!("[log]\nlevel = \"  \"\n{MIN}"));
        assert_error(&err, "log.level", "is empty");
    }

    #[test]
    fn unknown_enum_values_list_the_accepted_ones() {
        let err = fail(&MIN.replace("\"client_credentials\"", "\"implicit\""));
        assert_error(
            &err,
            "clients.payments.token.grant",
            "\"implicit\" is not an accepted value",
        );
        assert!(
            err.to_string()
                .contains("\"client_credentials\", \"password\", \"refresh_token\""),
            "{err}"
        );
        let err = fail(&format!("[log]\nformat = \"xml\"\n{MIN}"));
        assert_error(&err, "log.format", "use one of \"text\", \"json\"");
        let err = fail(&MIN.replace("grant =", "client_auth = \"digest\"\ngrant ="));
        assert_error(
            &err,
            "clients.payments.token.client_auth",
            "\"basic\", \"body\", \"both\", \"none\"",
        );
    }

    #[test]
    fn client_auth_basic_needs_a_client_id() {
        let err = fail(&MIN.replace("client_id = \"id-123\"\n", ""));
        assert_error(
            &err,
            "clients.payments.token.client_id",
            "is required when client_auth = \"basic\"",
        );
    }

    #[test]
    fn reserved_grant_params_cannot_be_overridden() {
        let err = fail(&format!("{MIN}params = {{ grant_type = \"x\" }}\n"));
        assert_error(
            &err,
            "clients.payments.token.params.grant_type",
            "cannot be overridden",
        );
    }

    #[test]
    fn inject_format_needs_exactly_one_token_placeholder() {
        let err = fail(&format!(
            "{MIN}[clients.payments.inject]\nformat = \"Bearer\"\n"
        ));
        assert_error(
            &err,
            "clients.payments.inject.format",
            "must contain {token} exactly once",
        );
        let err = fail(&format!(
            "{MIN}[clients.payments.inject]\nformat = \"{{token}}{{token}}\"\n"
        ));
        assert_error(&err, "clients.payments.inject.format", "exactly once");
        let err = fail(&format!(
            "{MIN}[clients.payments.inject]\nheader = \"Bad Header\"\n"
        ));
        assert_error(
            &err,
            "clients.payments.inject.header",
            "is not a valid header name",
        );
    }

    const STORE_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    #[test]
    fn file_store_needs_a_path_and_a_32_byte_key() {
        let c = parse(&format!(
            "[store]\nkind = \"file\"\npath = \"state/tokens.json\"\nkey = \"{STORE_KEY}\"\n{MIN}"
        ));
        match &c.store {
            StoreConfig::File(f) => {
                assert_eq!(f.path, Path::new("state/tokens.json"));
                assert_eq!(f.key.expose()[31], 31);
            }
            other => panic!("expected a file store, got {other:?}"),
        }
        let summary = c.summary();
        assert!(
            summary.contains("path") && !summary.contains(STORE_KEY),
            "{summary}"
        );

        let err = fail(&format!(
            "[store]\nkind = \"file\"\nkey = \"{STORE_KEY}\"\n{MIN}"
        ));
        assert_error(&err, "store.path", "is required");
        let err = fail(&format!(
            "[store]\nkind = \"file\"\npath = \"t.json\"\n{MIN}"
        ));
        assert_error(&err, "store.key", "is required");
        assert!(
            err.hint().unwrap_or("").contains("openssl rand -base64 32"),
            "{err}"
        );
        let err = fail(&format!(
            "[store]\nkind = \"file\"\npath = \"t.json\"\nkey = \"c2hvcnQ=\"\n{MIN}"
        ));
        assert_error(&err, "store.key", "decodes to 5 bytes, not 32");
        let err = fail(&format!(
            "[store]\nkind = \"file\"\npath = \"t.json\"\nkey = \"{STORE_KEY}\"\nurl = \"redis://h\"\n{MIN}"
        ));
        assert_error(&err, "store.url", "is not used by kind = \"file\"");
    }

    #[test]
    fn redis_store_checks_its_url_and_hides_credentials() {
        let c = parse(&format!(
            "[store]\nkind = \"redis\"\nurl = \"redis://:s3cret-pw@127.0.0.1:6379/2\"\nkey = \"{STORE_KEY}\"\n{MIN}"
        ));
        match &c.store {
            StoreConfig::Redis(r) => {
                assert_eq!(r.display_url, "redis://127.0.0.1:6379/2");
                assert_eq!(r.key_prefix, "tokenproxy");
            }
            other => panic!("expected a redis store, got {other:?}"),
        }
        let summary = c.summary();
        assert!(!summary.contains("s3cret-pw"), "{summary}");
        assert!(summary.contains("redis://127.0.0.1:6379/2"), "{summary}");

        let err = fail(&format!(
            "[store]\nkind = \"redis\"\nurl = \"http://:s3cret-pw@h:1\"\nkey = \"{STORE_KEY}\"\n{MIN}"
        ));
        assert_error(&err, "store.url", "only redis:// and rediss://");
        assert!(!err.to_string().contains("s3cret-pw"), "{err}");
        let err = fail(&format!(
            "[store]\nkind = \"redis\"\nkey = \"{STORE_KEY}\"\n{MIN}"
        ));
        assert_error(&err, "store.url", "is required");
        let err = fail(&format!(
            "[store]\nkind = \"redis\"\nurl = \"redis://:a@h\"\npassword = \"b\"\nkey = \"{STORE_KEY}\"\n{MIN}"
        ));
        assert_error(&err, "store.url", "credentials");
        let err = fail(&format!(
            "[store]\nkind = \"redis\"\nurl = \"redis://h\"\npath = \"t.json\"\nkey = \"{STORE_KEY}\"\n{MIN}"
        ));
        assert_error(&err, "store.path", "is not used by kind = \"redis\"");
        let err = fail(&format!("[store]\nkind = \"disk\"\n{MIN}"));
        assert_error(&err, "store.kind", "\"disk\" is not an accepted value");
    }

    #[test]
    fn at_least_one_client_is_required() {
        let err = fail("[admin]\nlisten = \"127.0.0.1:9090\"\n");
        assert_error(&err, "clients", "no client is configured");
    }

    #[test]
    fn secrets_never_appear_in_errors_or_summary() {
        let secrets = [ENV_SECRET, FILE_SECRET, PASSWORD];
        let wallet = r#"
[clients.wallet]
listen = "127.0.0.1:8081"
upstream = "https://wallet.example"
[clients.wallet.token]
url = "https://wallet.example/o/token/"
grant = "password"
username = "merchant"
password_file = "/run/secrets/wallet-password"
client_id = "w"
client_secret_file = "/run/secrets/wallet"
refresh_token = "${PAY_CLIENT_SECRET}"
"#;
        let c = parse(&format!("{MIN}{wallet}"));
        let summary = c.summary();
        let debug = format!("{c:?}");
        for s in secrets {
            assert!(!summary.contains(s), "summary leaks a secret:\n{summary}");
            assert!(!debug.contains(s), "Debug leaks a secret: {debug}");
        }
        assert!(
            summary.contains("[redacted]"),
            "summary should show secrets as [redacted]:\n{summary}"
        );
        assert!(
            summary.contains("127.0.0.1:8080 -> https://api.pay.example"),
            "{summary}"
        );

        let inline = |s: &str| MIN.replace("\"${PAY_CLIENT_SECRET}\"", &format!("\"{s}\""));
        let failing = [
            // Errors after the secrets were read.
            format!("{MIN}{wallet}").replace("\"merchant\"", "\"\""),
            format!("{}[clients.payments.inject]\nformat = \"x\"\n", inline(ENV_SECRET)),
            MIN.replace("client_id = \"id-123\"\n", "client_auth = \"none\"\n"),
            // Errors about the secret keys themselves.
            inline(&format!("{FILE_SECRET}${{NOPE}}")),
            inline(&format!("{FILE_SECRET}${{bad name}}")),
            inline(&format!("{FILE_SECRET}${{unterminated")),
            MIN.replace("client_secret = \"${PAY_CLIENT_SECRET}\"", &format!("client_secret = {{ v = \"{PASSWORD}\" }}")),
            MIN.replace("client_secret = \"${PAY_CLIENT_SECRET}\"", "client_secret = 8675309"),
            format!("{MIN}refresh_token = \"{PASSWORD}\"\nrefresh_token_file = \"/run/secrets/wallet\"\n"),
        ];
        for text in failing {
            let err = fail(&text);
            let shown = format!("{err} / {err:?}");
            for s in secrets.iter().copied().chain(["8675309"]) {
                assert!(!shown.contains(s), "error leaks a secret: {shown}");
            }
        }
    }
}
