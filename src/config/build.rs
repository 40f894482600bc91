//! Builders: each raw (serde) section into its validated type, naming the dotted key of every problem.

use super::*;

/// Validates every section, and every client on its own, so that one run
/// reports the problems of all of them; checks across clients judge those
/// that validated and lost nothing to `removed` (see `schema.rs`).
pub(super) fn build(
    raw: RawConfig,
    source: Option<&Path>,
    x: &Expander<'_>,
    removed: &Removed,
) -> Result<Config, ConfigError> {
    let mut p = Problems::default();
    let top = Table::new(x, "");
    let admin = p.take(build_admin(
        raw.admin.unwrap_or_default(),
        &Table::new(x, "admin"),
    ));
    let log = p.take(build_log(
        raw.log.unwrap_or_default(),
        &Table::new(x, "log"),
    ));
    let limits = p.take(build_limits(
        raw.limits.unwrap_or_default(),
        &Table::new(x, "limits"),
    ));
    let runtime = p.take(build_runtime(
        raw.runtime.unwrap_or_default(),
        &Table::new(x, "runtime"),
    ));
    let store = p.take(build_store(
        raw.store.unwrap_or_default(),
        &Table::new(x, "store"),
    ));
    let connect_written = raw.connect.is_some();
    let connect = p.take(
        raw.connect
            .map(|c| connect::build_connect(c, &Table::new(x, "connect")))
            .transpose(),
    );
    let raw_clients = raw.clients.unwrap_or_default();
    if raw_clients.is_empty() {
        let hint =
            "add a [clients.NAME] table with listen and upstream, and a [clients.NAME.token] table";
        p.add(
            top.err("clients", "no client is configured")
                .with_hint(hint),
        );
    }
    let mut clients = Vec::with_capacity(raw_clients.len());
    for (name, c) in raw_clients {
        // A client with subjects takes its redirect URI from [connect]: with
        // [connect] in error, its [authorize] cannot be judged.
        let unjudged_authorize = (connect_written && connect.is_none() && c.subjects.is_some())
            .then(|| format!("clients.{name}.authorize"));
        match build_client(&name, c, x, connect.as_ref().and_then(Option::as_ref)) {
            Ok(client) => clients.push(client),
            Err(e) => {
                let mut found = Problems::default();
                found.add(e);
                if let Some(scope) = &unjudged_authorize {
                    found.retain(|p| !Removed::within(scope, p.key()));
                }
                p.extend(found);
            }
        }
    }
    let judged: Vec<&ClientConfig> = clients
        .iter()
        .filter(|c| !removed.covers(&format!("clients.{}", c.name)))
        .collect();
    p.extend(check_listeners(admin.as_ref(), &judged));
    if let Some(Some(connect)) = &connect {
        p.extend(check_connect_listener(connect, admin.as_ref(), &judged));
    }
    p.extend(admin::check_cross_site(&judged));
    let (Some(admin), Some(log), Some(limits), Some(runtime), Some(store), Some(connect)) =
        (admin, log, limits, runtime, store, connect)
    else {
        return Err(p.into_error());
    };
    p.finish()?;
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
    let mut p = Problems::default();
    let header_read_timeout = p.take(t.duration(
        "header_read_timeout",
        raw.header_read_timeout,
        d.header_read_timeout,
    ));
    // hyper refuses a read buffer below 8KiB.
    let max_header_bytes = p.take(t.size(
        "max_header_bytes",
        raw.max_header_bytes,
        d.max_header_bytes,
        8 * KIB..=MIB,
    ));
    let max_headers = p.take(t.count("max_headers", raw.max_headers, d.max_headers, 1..=1000));
    let idle_timeout = p.take(t.duration("idle_timeout", raw.idle_timeout, d.idle_timeout));
    let max_connections = p.take(t.count(
        "max_connections",
        raw.max_connections,
        d.max_connections,
        1..=usize::MAX,
    ));
    let shutdown_grace = p.take(t.opt_duration("shutdown_grace", raw.shutdown_grace, true));
    let body_timeout = p.take(t.duration("body_timeout", raw.body_timeout, d.body_timeout));
    let body_min_rate = p.take(t.size(
        "body_min_rate",
        raw.body_min_rate,
        d.body_min_rate,
        1..=usize::MAX,
    ));
    let max_buffered_bytes = p.take(t.size(
        "max_buffered_bytes",
        raw.max_buffered_bytes,
        d.max_buffered_bytes,
        0..=usize::MAX,
    ));
    let http2_max_concurrent_streams = p.take(t.count(
        "http2_max_concurrent_streams",
        raw.http2_max_concurrent_streams,
        d.http2_max_concurrent_streams as usize,
        1..=10_000,
    ));
    // "0s" turns the pings off.
    let http2_keepalive_interval = match raw.http2_keepalive_interval {
        None => Some(d.http2_keepalive_interval),
        raw => p
            .take(t.opt_duration("http2_keepalive_interval", raw, true))
            .map(|d| d.filter(|d| !d.is_zero())),
    };
    let upgrade_idle_timeout = p.take(t.duration(
        "upgrade_idle_timeout",
        raw.upgrade_idle_timeout,
        d.upgrade_idle_timeout,
    ));
    let (
        Some(header_read_timeout),
        Some(max_header_bytes),
        Some(max_headers),
        Some(idle_timeout),
        Some(max_connections),
        Some(shutdown_grace),
        Some(body_timeout),
        Some(body_min_rate),
        Some(max_buffered_bytes),
        Some(http2_max_concurrent_streams),
        Some(http2_keepalive_interval),
        Some(upgrade_idle_timeout),
    ) = (
        header_read_timeout,
        max_header_bytes,
        max_headers,
        idle_timeout,
        max_connections,
        shutdown_grace,
        body_timeout,
        body_min_rate,
        max_buffered_bytes,
        http2_max_concurrent_streams.map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        http2_keepalive_interval,
        upgrade_idle_timeout,
    )
    else {
        return Err(p.into_error());
    };
    Ok(Limits {
        header_read_timeout,
        max_header_bytes,
        max_headers,
        idle_timeout,
        max_connections,
        shutdown_grace: shutdown_grace.unwrap_or(d.shutdown_grace),
        body_timeout,
        body_min_rate,
        max_buffered_bytes,
        http2_max_concurrent_streams,
        http2_keepalive_interval,
        upgrade_idle_timeout,
        preserve_header_case: raw.preserve_header_case.unwrap_or(d.preserve_header_case),
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
    // Each key is judged on its own, so that one run names every problem.
    let mut p = Problems::default();
    let allow_insecure = p.take(safety::allow_insecure(&t, raw.allow_insecure));
    let listen = p.take(
        t.required("listen", raw.listen, LISTEN_HINT)
            .and_then(|l| t.listen("listen", &l)),
    );
    let upstream = p.take(
        t.required("upstream", raw.upstream, UPSTREAM_HINT)
            .and_then(|u| upstream_url(&t, &u)),
    );
    let path_prefix = p.take(raw.path_prefix.map(|r| path_prefix(&t, &r)).transpose());
    let token_hint = format!("add a [{}] table with url and grant", t.key("token"));
    let raw_token = p.take(t.required("token", raw.token, &token_hint));
    // A client with subjects is connected through `[connect]`, whose callback
    // is the redirect URI: its `[authorize]` then needs none of its own.
    let connect_callback = connect
        .filter(|_| raw.subjects.is_some())
        .map(|c| c.redirect_uri.as_str());
    let authorize = p.take(
        raw.authorize
            .map(|a| build_authorize(a, &Table::new(x, t.key("authorize")), connect_callback))
            .transpose(),
    );
    let subjects = p.take(
        raw.subjects
            .map(|s| subjects::build_subjects(s, &Table::new(x, t.key("subjects"))))
            .transpose(),
    );
    let allowed_hosts = p.take(host_list(&t, "allowed_hosts", raw.allowed_hosts));
    let retry_body_limit = p.take(t.size(
        "retry_body_limit",
        raw.retry_body_limit,
        MIB,
        0..=usize::MAX,
    ));
    let timeout = p.take(t.duration("timeout", raw.timeout, Duration::from_secs(30)));
    let token_wait_timeout = p.take(t.duration(
        "token_wait_timeout",
        raw.token_wait_timeout,
        Duration::from_secs(2),
    ));
    let unauthorized_status = p.take(statuses(&t, raw.unauthorized_status));
    let idempotency_headers = p.take(header_names(
        &t,
        "idempotency_headers",
        raw.idempotency_headers,
    ));
    // Subjects bring their own refresh tokens: the client needs none of its own
    // unless requests without a subject use the client's token. Which it is
    // is only known once [authorize] and [subjects] are valid.
    let token = match (raw_token, &authorize, &subjects) {
        (Some(raw_token), Some(authorize), Some(subjects)) => {
            let own_token_optional = authorize.is_some()
                || subjects
                    .as_ref()
                    .is_some_and(|s| s.fallback == SubjectFallback::None);
            p.take(build_token(
                raw_token,
                &Table::new(x, t.key("token")),
                own_token_optional,
            ))
        }
        _ => None,
    };
    let dpop = p.take(
        raw.dpop
            .map(|d| dpop::build_dpop(d, &Table::new(x, t.key("dpop"))))
            .transpose(),
    );
    let inject = match (&dpop, raw.inject) {
        // A DPoP-bound token goes in `Authorization` with the scheme its
        // token_type names (RFC 9449 §7.1), beside its proof.
        (Some(Some(_)), Some(_)) => {
            let problem = format!(
                "cannot be set with [{}]: a DPoP-bound token is sent as \"Authorization: DPoP <token>\" beside its proof",
                t.key("dpop")
            );
            let hint = format!("remove [{}]", t.key("inject"));
            p.add(t.err("inject", problem).with_hint(hint));
            None
        }
        (Some(Some(_)), None) => Some(InjectConfig {
            header: http::header::AUTHORIZATION,
            prefix: "DPoP ".to_owned(),
            suffix: String::new(),
            format_is_default: true,
        }),
        (_, raw_inject) => p.take(build_inject(
            raw_inject.unwrap_or_default(),
            &Table::new(x, t.key("inject")),
        )),
    };
    let tls = p.take(build_tls(raw.tls, &Table::new(x, t.key("tls"))));
    let proxy = p.take(build_proxy(raw.proxy, &t));
    let http2 = raw.http2.unwrap_or(false);
    let upgrades = p.take(upgrade_protocols(&t, raw.upgrades, http2));
    if let Some(allowed) = &allow_insecure {
        let exposure = safety::Exposure {
            listen,
            upstream: upstream.as_ref(),
            token: token.as_ref(),
            authorize: authorize.as_ref().and_then(Option::as_ref),
            subjects: subjects.as_ref().and_then(Option::as_ref),
        };
        p.take(safety::check_client(&t, &exposure, allowed));
    }
    let (
        Some(allow_insecure),
        Some(listen),
        Some(upstream),
        Some(path_prefix),
        Some(authorize),
        Some(subjects),
        Some(allowed_hosts),
        Some(retry_body_limit),
        Some(timeout),
        Some(token_wait_timeout),
        Some(unauthorized_status),
        Some(idempotency_headers),
        Some(token),
        Some(inject),
        Some(tls),
        Some(proxy),
        Some(upgrades),
        Some(dpop),
    ) = (
        allow_insecure,
        listen,
        upstream,
        path_prefix,
        authorize,
        subjects,
        allowed_hosts,
        retry_body_limit,
        timeout,
        token_wait_timeout,
        unauthorized_status,
        idempotency_headers,
        token,
        inject,
        tls,
        proxy,
        upgrades,
        dpop,
    )
    else {
        return Err(p.into_error());
    };
    p.finish()?;
    Ok(ClientConfig {
        name: name.to_owned(),
        listen,
        upstream,
        path_prefix,
        allowed_hosts,
        allow_cross_site: raw.allow_cross_site.unwrap_or(false),
        retry_body_limit,
        timeout,
        token_wait_timeout,
        unauthorized_status,
        idempotency_headers,
        replay_non_idempotent: raw.replay_non_idempotent.unwrap_or(false),
        http2,
        rewrite_location: raw.rewrite_location.unwrap_or(true),
        upgrades,
        token,
        inject,
        tls,
        proxy,
        authorize,
        subjects,
        dpop,
        allow_insecure,
    })
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
    admin: Option<&AdminConfig>,
    clients: &[&ClientConfig],
) -> Problems {
    let mut p = Problems::default();
    let hint = "give [connect] listen its own port";
    if admin.is_some_and(|a| a.listen == connect.listen) {
        let problem = format!("{} is also the admin listen address", connect.listen);
        p.add(ConfigError::new("connect.listen", problem).with_hint(hint));
    }
    if let Some(c) = clients.iter().find(|c| c.listen == connect.listen) {
        let problem = format!(
            "{} is also the listen address of client {:?}",
            connect.listen, c.name
        );
        p.add(ConfigError::new("connect.listen", problem).with_hint(hint));
    }
    p
}

/// Each client listen address is unique, or shared only by clients with
/// distinct path prefixes; none is the admin listen address.
pub(super) fn check_listeners(admin: Option<&AdminConfig>, clients: &[&ClientConfig]) -> Problems {
    let mut p = Problems::default();
    for (i, c) in clients.iter().enumerate() {
        if admin.is_some_and(|a| a.listen == c.listen) {
            let problem = format!(
                "{} is also the listen address of client {:?}",
                c.listen, c.name
            );
            let hint = "give [admin] listen its own port; the default is 127.0.0.1:9090";
            p.add(ConfigError::new("admin.listen", problem).with_hint(hint));
        }
        let key = format!("clients.{}.listen", c.name);
        // One problem per client: the first other client it clashes with.
        let clash = clients[..i].iter().filter(|o| o.listen == c.listen).find_map(|other| {
            match (&other.path_prefix, &c.path_prefix) {
                (Some(a), Some(b)) if a != b => None,
                (Some(a), Some(_)) => Some((
                    format!("{} is shared with client {:?} and both use path_prefix {a:?}", c.listen, other.name),
                    "give each client sharing a listen address a distinct path_prefix, or its own port",
                )),
                _ => Some((
                    format!("{} is also the listen address of client {:?}", c.listen, other.name),
                    "clients sharing a listen address each need a distinct path_prefix; set one on both, or use another port",
                )),
            }
        });
        if let Some((problem, hint)) = clash {
            p.add(ConfigError::new(key, problem).with_hint(hint));
        }
    }
    p
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

/// `upgrades`: the `Upgrade` protocol names forwarded, lower case, each once.
/// By default WebSocket alone, and none to an HTTP/2 upstream (an HTTP/2
/// connection carries no `Upgrade`). `h2c` (and `h2`) never: the connection
/// would carry further requests past the sidecar, all with one token.
pub(super) fn upgrade_protocols(
    t: &Table<'_>,
    raw: Option<Vec<String>>,
    http2: bool,
) -> Result<Vec<String>, ConfigError> {
    const K: &str = "upgrades";
    let Some(list) = raw else {
        return Ok(if http2 {
            Vec::new()
        } else {
            vec!["websocket".to_owned()]
        });
    };
    let hint = "write it like [\"websocket\"], or [] to forward no upgrade";
    let mut out: Vec<String> = Vec::with_capacity(list.len());
    for item in list {
        let text = t.string(K, &item)?;
        let name = text.trim().to_ascii_lowercase();
        // RFC 9110 §5.6.2 token characters; the version (`name/1`) is the app's.
        let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if name.is_empty() || !name.bytes().all(tchar) {
            let problem = format!("{text:?} is not an Upgrade protocol name");
            return Err(t.err(K, problem).with_hint(hint));
        }
        if name == "h2c" || name == "h2" {
            let problem = format!(
                "{text:?} is never forwarded: an HTTP/2 connection would carry further requests past the sidecar"
            );
            let hint =
                "remove it; apps that speak HTTP/2 to the sidecar open with the HTTP/2 preface";
            return Err(t.err(K, problem).with_hint(hint));
        }
        if !out.contains(&name) {
            out.push(name);
        }
    }
    if http2 && !out.is_empty() {
        let problem =
            "is set but http2 = true: an HTTP/2 upstream connection cannot carry an Upgrade";
        let hint = "remove upgrades (or set it to []), or remove http2";
        return Err(t.err(K, problem).with_hint(hint));
    }
    Ok(out)
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
    let hint = "write it like unauthorized_status = [401] or [401, 403]";
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
