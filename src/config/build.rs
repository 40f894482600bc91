//! Builders: each raw (serde) section into its validated type, naming the dotted key of every problem.

use super::*;

pub(super) fn build(
    raw: RawConfig,
    source: Option<&Path>,
    x: &Expander<'_>,
) -> Result<Config, ConfigError> {
    let top = Table::new(x, "");
    let admin = build_admin(raw.admin.unwrap_or_default(), &Table::new(x, "admin"))?;
    let log = build_log(raw.log.unwrap_or_default(), &Table::new(x, "log"))?;
    let limits = build_limits(raw.limits.unwrap_or_default(), &Table::new(x, "limits"))?;
    let runtime = build_runtime(raw.runtime.unwrap_or_default(), &Table::new(x, "runtime"))?;
    let store = build_store(raw.store.unwrap_or_default(), &Table::new(x, "store"))?;
    let connect = raw
        .connect
        .map(|c| connect::build_connect(c, &Table::new(x, "connect")))
        .transpose()?;
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
        .map(|(name, c)| build_client(&name, c, x, connect.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    check_listeners(&admin, &clients)?;
    if let Some(connect) = &connect {
        check_connect_listener(connect, &admin, &clients)?;
    }
    admin::check_cross_site(&clients)?;
    Ok(Config {
        source: source.map(Path::to_path_buf),
        admin,
        log,
        limits,
        runtime,
        store,
        clients,
        connect,
    })
}

pub(super) fn build_log(raw: RawLog, t: &Table<'_>) -> Result<LogConfig, ConfigError> {
    let level = match t.opt("level", raw.level)?.map(|l| l.trim().to_owned()) {
        Some(level) if level.is_empty() => {
            let hint = "write a level like \"info\" or a filter like \"info,tokenproxy=debug\"";
            return Err(t.err("level", "is empty").with_hint(hint));
        }
        Some(level) => check_log_level(t, level)?,
        None => LogConfig::default().level,
    };
    let formats = [("text", LogFormat::Text), ("json", LogFormat::Json)];
    let format = t.choice("format", raw.format, Some(LogFormat::Text), &formats)?;
    Ok(LogConfig { level, format })
}

/// `log.level` as the logging setup will read it: an `EnvFilter` directive
/// list whose bare words are level names. `EnvFilter` takes a bare word as a
/// target, so a misspelled level ("verbose") would silence every line.
fn check_log_level(t: &Table<'_>, level: String) -> Result<String, ConfigError> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let hint = "write a level (trace, debug, info, warn, error or off) or a filter like \"info,tokenproxy=debug\"";
    let bare = level
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty() && !d.contains(['=', '[']))
        .find(|d| !LEVELS.contains(&d.to_ascii_lowercase().as_str()));
    if let Some(word) = bare {
        let problem = format!("{word:?} is not a log level, so nothing would be logged");
        return Err(t.err("level", problem).with_hint(hint));
    }
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&level) {
        let problem = format!("{level:?} is not a valid filter: {e}");
        return Err(t.err("level", problem).with_hint(hint));
    }
    Ok(level)
}

pub(super) fn build_runtime(raw: RawRuntime, t: &Table<'_>) -> Result<RuntimeConfig, ConfigError> {
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

pub(super) fn build_limits(raw: RawLimits, t: &Table<'_>) -> Result<Limits, ConfigError> {
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
        http2_max_concurrent_streams: u32::try_from(t.count(
            "http2_max_concurrent_streams",
            raw.http2_max_concurrent_streams,
            d.http2_max_concurrent_streams as usize,
            1..=10_000,
        )?)
        .unwrap_or(d.http2_max_concurrent_streams),
        http2_keepalive_interval: match raw.http2_keepalive_interval {
            None => d.http2_keepalive_interval,
            // "0s" turns the pings off.
            raw => t
                .opt_duration("http2_keepalive_interval", raw, true)?
                .filter(|d| !d.is_zero()),
        },
    })
}

pub(super) fn build_client(
    name: &str,
    raw: RawClient,
    x: &Expander<'_>,
    connect: Option<&ConnectConfig>,
) -> Result<ClientConfig, ConfigError> {
    let t = Table::new(x, format!("clients.{name}"));
    let name_ok = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
    if name.is_empty() || !name.bytes().all(name_ok) {
        let problem = format!("client name {name:?} may only contain letters, digits, _ and -");
        let hint = "name the table like [clients.payments]";
        return Err(ConfigError::new(t.key(""), problem).with_hint(hint));
    }
    let allow_insecure = safety::allow_insecure(&t, raw.allow_insecure)?;
    let listen = t.listen("listen", &t.required("listen", raw.listen, LISTEN_HINT)?)?;
    let upstream = upstream_url(&t, &t.required("upstream", raw.upstream, UPSTREAM_HINT)?)?;
    let path_prefix = match raw.path_prefix {
        Some(r) => Some(path_prefix(&t, &r)?),
        None => None,
    };
    let token_hint = format!("add a [{}] table with url and grant", t.key("token"));
    let raw_token = t.required("token", raw.token, &token_hint)?;
    // A client with subjects is connected through `[connect]`, whose callback
    // is the redirect URI: its `[authorize]` then needs none of its own.
    let connect_callback = connect
        .filter(|_| raw.subjects.is_some())
        .map(|c| c.redirect_uri.as_str());
    let authorize = raw
        .authorize
        .map(|a| build_authorize(a, &Table::new(x, t.key("authorize")), connect_callback))
        .transpose()?;
    let subjects = raw
        .subjects
        .map(|s| subjects::build_subjects(s, &Table::new(x, t.key("subjects"))))
        .transpose()?;
    // Subjects bring their own refresh tokens: the client needs none of its own
    // unless requests without a subject use the client's token.
    let own_token_optional = authorize.is_some()
        || subjects
            .as_ref()
            .is_some_and(|s| s.fallback == SubjectFallback::None);
    let client = ClientConfig {
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
        http2: raw.http2.unwrap_or(false),
        rewrite_location: raw.rewrite_location.unwrap_or(true),
        token: build_token(
            raw_token,
            &Table::new(x, t.key("token")),
            own_token_optional,
        )?,
        inject: build_inject(
            raw.inject.unwrap_or_default(),
            &Table::new(x, t.key("inject")),
        )?,
        tls: build_tls(raw.tls, &Table::new(x, t.key("tls")))?,
        proxy: build_proxy(raw.proxy, &t)?,
        authorize,
        subjects,
        allow_insecure,
    };
    safety::check_client(&t, &client, &client.allow_insecure)?;
    Ok(client)
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum GrantKind {
    ClientCredentials,
    Password,
    RefreshToken,
}

/// `[clients.NAME.token]`; with `authorizable` (an `[authorize]` table), `grant =
/// "refresh_token"` may start without a bootstrap refresh token.
pub(super) fn build_token(
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
        ClientAuth::Basic | ClientAuth::Body | ClientAuth::Both if client_secret.is_none() => {
            let problem = format!(
                "is required when client_auth = \"{}\"",
                client_auth.as_str()
            );
            let hint = "set client_secret or client_secret_file, or client_auth = \"none\" if the provider authenticates no client";
            return Err(t.err("client_secret", problem).with_hint(hint));
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
        refresh_before: refresh_before(t, raw.refresh_before)?,
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

/// `refresh_before`: a zero margin would start every refresh only once the
/// token has expired, so requests would wait or fail at each expiry.
fn refresh_before(t: &Table<'_>, raw: Option<Scalar>) -> Result<Option<Duration>, ConfigError> {
    let margin = t.opt_duration("refresh_before", raw, true)?;
    if margin.is_some_and(|d| d.is_zero()) {
        let problem = "is zero: each refresh would start only once the token has expired";
        let hint =
            "remove it to refresh min(60s, 10% of the lifetime) ahead, or write it like \"30s\"";
        return Err(t.err("refresh_before", problem).with_hint(hint));
    }
    Ok(margin)
}

pub(super) fn params(
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

pub(super) fn build_inject(raw: RawInject, t: &Table<'_>) -> Result<InjectConfig, ConfigError> {
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

/// The connect listener has an address of its own.
fn check_connect_listener(
    connect: &ConnectConfig,
    admin: &AdminConfig,
    clients: &[ClientConfig],
) -> Result<(), ConfigError> {
    let hint = "give [connect] listen its own port";
    if connect.listen == admin.listen {
        let problem = format!("{} is also the admin listen address", connect.listen);
        return Err(ConfigError::new("connect.listen", problem).with_hint(hint));
    }
    if let Some(c) = clients.iter().find(|c| c.listen == connect.listen) {
        let problem = format!(
            "{} is also the listen address of client {:?}",
            connect.listen, c.name
        );
        return Err(ConfigError::new("connect.listen", problem).with_hint(hint));
    }
    Ok(())
}

/// Each client listen address is unique, or shared only by clients with distinct path prefixes.
pub(super) fn check_listeners(
    admin: &AdminConfig,
    clients: &[ClientConfig],
) -> Result<(), ConfigError> {
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

pub(super) fn upstream_url(t: &Table<'_>, raw: &str) -> Result<UpstreamUrl, ConfigError> {
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
pub(super) fn path_prefix(t: &Table<'_>, raw: &str) -> Result<String, ConfigError> {
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
pub(super) fn header_names(
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

pub(super) fn statuses(
    t: &Table<'_>,
    raw: Option<Vec<Scalar>>,
) -> Result<Vec<StatusCode>, ConfigError> {
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
