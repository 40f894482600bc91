//! Unit tests of loading and validation.

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
pub(super) const MIN: &str = r#"
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

pub(super) fn fail(text: &str) -> ConfigError {
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
    assert!(p.rewrite_location, "Location rewriting is on by default");
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
    let both = format!("{MIN}{second}").replace("upstream =", "path_prefix = \"/p\"\nupstream =");
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
        format!(
            "{}[clients.payments.inject]\nformat = \"x\"\n",
            inline(ENV_SECRET)
        ),
        MIN.replace("client_id = \"id-123\"\n", "client_auth = \"none\"\n"),
        // Errors about the secret keys themselves.
        inline(&format!("{FILE_SECRET}${{NOPE}}")),
        inline(&format!("{FILE_SECRET}${{bad name}}")),
        inline(&format!("{FILE_SECRET}${{unterminated")),
        MIN.replace(
            "client_secret = \"${PAY_CLIENT_SECRET}\"",
            &format!("client_secret = {{ v = \"{PASSWORD}\" }}"),
        ),
        MIN.replace(
            "client_secret = \"${PAY_CLIENT_SECRET}\"",
            "client_secret = 8675309",
        ),
        format!(
            "{MIN}refresh_token = \"{PASSWORD}\"\nrefresh_token_file = \"/run/secrets/wallet\"\n"
        ),
    ];
    for text in failing {
        let err = fail(&text);
        let shown = format!("{err} / {err:?}");
        for s in secrets.iter().copied().chain(["8675309"]) {
            assert!(!shown.contains(s), "error leaks a secret: {shown}");
        }
    }
}

/// A marketplace client with subjects, its `[authorize]` without a redirect
/// port, and `[connect]`; `{connect}` is replaced by the connect table's body.
const CONNECT: &str = r#"
[clients.pos]
listen = "127.0.0.1:8080"
upstream = "https://connect.pos.example"

[clients.pos.token]
url = "https://connect.pos.example/oauth2/token"
grant = "refresh_token"
client_id = "pos-id"
client_secret = "${PAY_CLIENT_SECRET}"

[clients.pos.authorize]
url = "https://connect.pos.example/oauth2/authorize"
scope = "PAYMENTS_READ"
params = { prompt = "consent" }

[clients.pos.subjects]

[connect]
{connect}
"#;

pub(super) fn connect_config(body: &str) -> String {
    CONNECT.replace("{connect}", body)
}

const CONNECT_OK: &str = r#"listen = "0.0.0.0:8443"
public_url = "https://connect.platform.example"
return_to = ["https://app.platform.example/"]"#;

#[test]
fn connect_gives_subject_clients_its_callback_as_redirect_uri() {
    let c = parse(&connect_config(CONNECT_OK));
    let connect = c.connect.as_ref().expect("[connect] is loaded");
    assert_eq!(connect.public_url, "https://connect.platform.example");
    assert_eq!(
        connect.redirect_uri,
        "https://connect.platform.example/callback"
    );
    assert_eq!(connect.session_ttl, Duration::from_secs(15 * 60));
    assert!(connect.secure);
    let a = c.clients[0].authorize.as_ref().expect("authorize");
    assert_eq!(
        a.redirect_uri.to_string(),
        "https://connect.platform.example/callback"
    );
    assert_eq!(a.redirect_listen, None, "the connect listener receives it");
    assert!(c.summary().contains("session_ttl"), "{}", c.summary());
}

#[test]
fn authorize_without_a_redirect_still_needs_one_without_connect_or_subjects() {
    let without_connect = connect_config("").replace("\n[connect]\n", "\n");
    assert_error(
        &fail(&without_connect),
        "clients.pos.authorize.redirect_port",
        "is required",
    );
    let without_subjects = connect_config(CONNECT_OK).replace("[clients.pos.subjects]\n", "");
    let without_subjects = without_subjects.replace(
        "grant = \"refresh_token\"",
        "grant = \"refresh_token\"\nrefresh_token = \"bootstrap\"",
    );
    assert_error(
        &fail(&without_subjects),
        "clients.pos.authorize.redirect_port",
        "is required",
    );
}

#[test]
fn connect_errors_name_their_key() {
    let cases = [
        (
            r#"public_url = "https://c.example"
return_to = ["https://app.example/"]"#,
            "connect.listen",
            "is required",
        ),
        (
            r#"listen = "0.0.0.0:8443"
public_url = "https://c.example/"
return_to = ["https://app.example/"]"#,
            "connect.public_url",
            "ends with /",
        ),
        (
            r#"listen = "0.0.0.0:8443"
public_url = "http://connect.example"
return_to = ["https://app.example/"]"#,
            "connect.public_url",
            "not loopback",
        ),
        (
            r#"listen = "0.0.0.0:8443"
public_url = "https://c.example"
return_to = []"#,
            "connect.return_to",
            "is empty",
        ),
        (
            r#"listen = "0.0.0.0:8443"
public_url = "https://c.example""#,
            "connect.return_to",
            "is required",
        ),
        (
            r#"listen = "0.0.0.0:8443"
public_url = "https://c.example"
return_to = ["https://app.example/", "https://app.example"]"#,
            "connect.return_to[1]",
            "does not end its host with /",
        ),
        (
            r#"listen = "0.0.0.0:8443"
public_url = "https://c.example"
return_to = ["https://app.example/"]
session_ttl = "2d""#,
            "connect.session_ttl",
            "longer than 24h",
        ),
        (
            r#"listen = "127.0.0.1:8080"
public_url = "https://c.example"
return_to = ["https://app.example/"]"#,
            "connect.listen",
            "client \"pos\"",
        ),
    ];
    for (body, key, needle) in cases {
        assert_error(&fail(&connect_config(body)), key, needle);
    }
}

#[test]
fn connect_accepts_http_on_loopback_for_tests_and_demos() {
    let c = parse(&connect_config(
        r#"listen = "127.0.0.1:8443"
public_url = "http://127.0.0.1:8443"
return_to = ["http://localhost:3000/connected"]
session_ttl = "1s""#,
    ));
    let connect = c.connect.expect("[connect]");
    assert!(!connect.secure);
    assert_eq!(connect.session_ttl, Duration::from_secs(1));
    assert!(connect.allows_return_to("http://localhost:3000/connected?x=1"));
}

#[test]
fn cleartext_token_urls_to_a_remote_host_are_refused_unless_allowed() {
    let cases = [
        (
            MIN.replace(
                "url = \"https://api.pay.example/oauth2/token\"",
                "url = \"http://auth.pay.example/oauth2/token?key=k\"",
            ),
            "clients.payments.token.url",
        ),
        (
            MIN.replace(
                "grant = \"client_credentials\"",
                "grant = \"client_credentials\"\nrefresh_url = \"http://10.1.2.3/refresh\"",
            ),
            "clients.payments.token.refresh_url",
        ),
    ];
    for (text, key) in cases {
        let err = fail(&text);
        assert_error(&err, key, "plain http to a host that is not loopback");
        assert!(
            err.hint()
                .is_some_and(|h| h.contains("cleartext_token_url")),
            "the hint should name the allow value: {err}"
        );
        assert!(
            !err.to_string().contains("key=k"),
            "the query must not be echoed: {err}"
        );
        let allowed = text.replace(
            "[clients.payments.token]",
            "allow_insecure = [\"cleartext_token_url\"]\n\n[clients.payments.token]",
        );
        let c = parse(&allowed);
        assert_eq!(c.clients[0].allow_insecure, [Insecure::CleartextTokenUrl]);
        assert!(
            c.summary().contains("[cleartext_token_url]"),
            "check's summary should show the waiver: {}",
            c.summary()
        );
    }
    for host in ["127.0.0.1:9000", "localhost", "[::1]:8443"] {
        parse(&MIN.replace(
            "https://api.pay.example/oauth2/token",
            &format!("http://{host}/oauth2/token"),
        ));
    }
}

#[test]
fn cleartext_upstream_to_a_remote_host_is_refused_unless_allowed() {
    let text = MIN.replace(
        "upstream = \"https://api.pay.example\"",
        "upstream = \"http://api.pay.example\"",
    );
    let err = fail(&text);
    assert_error(&err, "clients.payments.upstream", "every bearer token");
    assert!(
        err.hint().is_some_and(|h| h.contains("cleartext_upstream")),
        "the hint should name the allow value: {err}"
    );
    parse(&text.replace(
        "[clients.payments.token]",
        "allow_insecure = [\"cleartext_upstream\"]\n\n[clients.payments.token]",
    ));
    parse(&MIN.replace("https://api.pay.example\"", "http://127.0.0.1:8000\""));
}

#[test]
fn a_client_listening_beyond_loopback_is_refused_unless_allowed() {
    for addr in ["0.0.0.0:18080", "[::]:18080", "192.0.2.10:18080"] {
        let text = MIN.replace("127.0.0.1:8080", addr);
        let err = fail(&text);
        assert_error(
            &err,
            "clients.payments.listen",
            "can spend this client's credential",
        );
        assert!(
            err.hint().is_some_and(|h| h.contains("public_listen")),
            "the hint should name the allow value: {err}"
        );
        parse(&text.replace(
            "[clients.payments.token]",
            "allow_insecure = [\"public_listen\"]\n\n[clients.payments.token]",
        ));
    }
    parse(&MIN.replace("127.0.0.1:8080", "[::1]:8080"));
}

#[test]
fn allow_insecure_accepts_only_the_known_values() {
    let err = fail(&MIN.replace(
        "[clients.payments.token]",
        "allow_insecure = [\"public_listen\", \"everything\"]\n\n[clients.payments.token]",
    ));
    assert_error(
        &err,
        "clients.payments.allow_insecure",
        "\"everything\" is not an accepted value",
    );
    for value in ["cleartext_token_url", "cleartext_upstream", "public_listen"] {
        assert!(
            err.hint().is_some_and(|h| h.contains(value)),
            "the hint should list {value}: {err}"
        );
    }
}

#[test]
fn a_log_level_that_is_no_level_or_filter_is_refused() {
    let with_level = |level: &str| format!("[log]\nlevel = \"{level}\"\n{MIN}");
    for bad in ["verbose", "info,verbose", "info,tokenproxy=loud"] {
        let err = fail(&with_level(bad));
        assert_error(&err, "log.level", "not");
        assert!(
            err.hint().is_some_and(|h| h.contains("tokenproxy=debug")),
            "the hint should show a filter: {err}"
        );
    }
    let err = fail(&with_level("verbose"));
    assert!(
        err.problem().contains("nothing would be logged"),
        "the problem should say what the level would do: {err}"
    );
    for good in [
        "debug",
        "WARN",
        "info,tokenproxy=debug",
        "off",
        "info,hyper[conn]=trace",
    ] {
        assert_eq!(parse(&with_level(good)).log.level, good);
    }
}

#[test]
fn a_zero_refresh_margin_is_refused() {
    let err = fail(&format!("{MIN}refresh_before = \"0s\"\n"));
    assert_error(&err, "clients.payments.token.refresh_before", "is zero");
    assert!(
        err.hint().is_some_and(|h| h.contains("remove it")),
        "the hint should offer the default: {err}"
    );
    let c = parse(&format!("{MIN}refresh_before = \"1s\"\n"));
    assert_eq!(
        c.clients[0].token.refresh_before,
        Some(Duration::from_secs(1))
    );
}

#[test]
fn client_auth_that_sends_a_secret_needs_one() {
    let without = MIN.replace("client_secret = \"${PAY_CLIENT_SECRET}\"\n", "");
    for auth in ["basic", "body", "both"] {
        let err = fail(&format!("{without}client_auth = \"{auth}\"\n"));
        assert_error(
            &err,
            "clients.payments.token.client_secret",
            &format!("is required when client_auth = \"{auth}\""),
        );
        assert!(
            err.hint()
                .is_some_and(|h| h.contains("client_auth = \"none\"")),
            "the hint should offer client_auth = \"none\": {err}"
        );
    }
    // The default client_auth is basic.
    assert_error(
        &fail(&without),
        "clients.payments.token.client_secret",
        "is required",
    );
    let c = parse(&format!("{without}client_auth = \"none\"\n"));
    assert_eq!(c.clients[0].token.client_auth, ClientAuth::None);
}

#[test]
fn a_variable_without_braces_is_refused_with_the_braced_form() {
    let err = fail(&MIN.replace("\"id-123\"", "\"$PAY_CLIENT_ID\""));
    assert_error(
        &err,
        "clients.payments.token.client_id",
        "write it like ${PAY_CLIENT_ID}",
    );
    let c = parse(&MIN.replace("\"id-123\"", "\"id$$123\""));
    assert_eq!(c.clients[0].token.client_id.as_deref(), Some("id$123"));
}

#[test]
fn secret_files_open_to_group_or_others_are_refused() {
    let text = MIN.replace(
        "client_secret = \"${PAY_CLIENT_SECRET}\"",
        "client_secret_file = \"/run/secrets/wallet\"",
    );
    let admin = format!("[admin]\napi_key_file = \"/run/secrets/wallet\"\n{MIN}");
    let cases = [
        (&text, "clients.payments.token.client_secret_file"),
        (&admin, "admin.api_key_file"),
    ];
    for (text, key) in cases {
        for mode in [0o644, 0o640, 0o604, 0o620] {
            let e = env().mode("/run/secrets/wallet", mode);
            let err = match from_str(text, Some(Path::new("tokenproxy.toml")), &e) {
                Ok(_) => panic!("a secret file with mode {mode:o} should be refused"),
                Err(err) => err,
            };
            assert_error(&err, key, "/run/secrets/wallet is open to group or others");
            let hint = err.hint().unwrap_or("");
            assert!(
                hint.contains("chmod 600 /run/secrets/wallet")
                    && hint.contains("defaultMode: 0400"),
                "the hint should say how to fix the mode: {err}"
            );
            assert!(!err.to_string().contains(FILE_SECRET), "{err}");
        }
        for mode in [0o600, 0o400] {
            let e = env().mode("/run/secrets/wallet", mode);
            if let Err(err) = from_str(text, Some(Path::new("tokenproxy.toml")), &e) {
                panic!("mode {mode:o} is private and should pass: {err}");
            }
        }
    }
}

#[test]
fn a_store_path_in_a_missing_or_unwritable_directory_is_refused() {
    let key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let text = format!(
        "[store]\nkind = \"file\"\npath = \"/var/lib/tp/tokens.json\"\nkey = \"{key}\"\n{MIN}"
    );
    let cases = [
        (
            std::io::ErrorKind::NotFound,
            "directory /var/lib/tp does not exist",
            "mkdir -p /var/lib/tp",
        ),
        (
            std::io::ErrorKind::PermissionDenied,
            "directory /var/lib/tp is not writable",
            "writable volume",
        ),
    ];
    for (kind, problem, hint) in cases {
        let e = env().unwritable_dir("/var/lib/tp", kind);
        let err = match from_str(&text, Some(Path::new("tokenproxy.toml")), &e) {
            Ok(_) => panic!("a store in a directory failing with {kind:?} should be refused"),
            Err(err) => err,
        };
        assert_error(&err, "store.path", problem);
        assert!(
            err.hint().is_some_and(|h| h.contains(hint)),
            "the hint should say {hint:?}: {err}"
        );
    }
    parse(&text);
}

#[test]
fn rewrite_location_can_be_turned_off_and_check_says_so() {
    let off = parse(&EXAMPLE.replace(
        "[clients.payments.token]",
        "rewrite_location = false\n[clients.payments.token]",
    ));
    assert!(!off.clients[0].rewrite_location);
    assert!(
        off.summary().contains("rewrite_location"),
        "{}",
        off.summary()
    );
    let err = fail(&EXAMPLE.replace(
        "[clients.payments.token]",
        "rewrite_location = \"no\"\n[clients.payments.token]",
    ));
    assert!(
        err.to_string().contains("rewrite_location"),
        "the error names the key: {err}"
    );
}

#[test]
fn upgrades_default_to_websocket_and_take_listed_protocol_names() {
    let c = parse(MIN);
    assert_eq!(c.clients[0].upgrades, vec!["websocket".to_owned()]);
    assert!(c.summary().contains("[websocket]"), "{}", c.summary());
    let with = |list: &str| {
        MIN.replace(
            "upstream = \"https://api.pay.example\"",
            &format!("upstream = \"https://api.pay.example\"\nupgrades = {list}"),
        )
    };
    let c = parse(&with(r#"["WebSocket", " x-tunnel ", "websocket"]"#));
    assert_eq!(
        c.clients[0].upgrades,
        vec!["websocket".to_owned(), "x-tunnel".to_owned()],
        "names are lower-cased, trimmed and listed once"
    );
    let c = parse(&with("[]"));
    assert!(c.clients[0].upgrades.is_empty());
    assert!(c.summary().contains("(none)"), "{}", c.summary());

    for h2 in ["h2c", "H2C", "h2"] {
        let err = fail(&with(&format!("[\"websocket\", \"{h2}\"]")));
        assert_error(&err, "clients.payments.upgrades", "is never forwarded");
    }
    for bad in ["", "web socket", "websocket/13", "a,b"] {
        let err = fail(&with(&format!("[\"{bad}\"]")));
        assert_error(
            &err,
            "clients.payments.upgrades",
            "is not an Upgrade protocol name",
        );
    }
}

#[test]
fn an_http2_upstream_forwards_no_upgrade() {
    let http2 = |extra: &str| {
        MIN.replace(
            "upstream = \"https://api.pay.example\"",
            &format!("upstream = \"https://api.pay.example\"\nhttp2 = true\n{extra}"),
        )
    };
    assert!(parse(&http2("")).clients[0].upgrades.is_empty());
    assert!(parse(&http2("upgrades = []")).clients[0]
        .upgrades
        .is_empty());
    let err = fail(&http2("upgrades = [\"websocket\"]"));
    assert_error(&err, "clients.payments.upgrades", "http2 = true");
}

#[test]
fn upgrade_idle_timeout_is_a_positive_duration_defaulting_to_five_minutes() {
    assert_eq!(
        parse(MIN).limits.upgrade_idle_timeout,
        Duration::from_secs(300)
    );
    let c = parse(&format!("[limits]\nupgrade_idle_timeout = \"90s\"\n{MIN}"));
    assert_eq!(c.limits.upgrade_idle_timeout, Duration::from_secs(90));
    assert!(
        c.summary().contains("upgrade_idle_timeout"),
        "{}",
        c.summary()
    );
    let err = fail(&format!("[limits]\nupgrade_idle_timeout = \"0s\"\n{MIN}"));
    assert_error(&err, "limits.upgrade_idle_timeout", "greater than zero");
    let err = fail(&format!("[limits]\nupgrade_idle_timeout = 30\n{MIN}"));
    assert_error(&err, "limits.upgrade_idle_timeout", "has no unit");
}

#[test]
fn dpop_defaults_to_es256_and_sends_the_token_with_the_dpop_scheme() {
    let c = parse(&format!("{MIN}[clients.payments.dpop]\n"));
    let client = &c.clients[0];
    assert_eq!(
        client.dpop.as_ref().map(|d| d.alg),
        Some(crate::jose::Alg::Es256),
        "ES256 unless alg says otherwise"
    );
    assert_eq!(client.inject.header, http::header::AUTHORIZATION);
    assert_eq!(
        (client.inject.prefix.as_str(), client.inject.suffix.as_str()),
        ("DPoP ", ""),
        "Authorization: DPoP <token>"
    );
    let summary = c.summary();
    assert!(
        summary.contains("ES256 key, made once and sealed in the store")
            && summary.contains("authorization: DPoP <token>"),
        "{summary}"
    );
    let ed = parse(&format!("{MIN}[clients.payments.dpop]\nalg = \"EdDSA\"\n"));
    assert_eq!(
        ed.clients[0].dpop.as_ref().map(|d| d.alg),
        Some(crate::jose::Alg::EdDsa)
    );
    assert!(
        parse(MIN).clients[0].dpop.is_none(),
        "off unless configured"
    );
}

#[test]
fn dpop_refuses_other_algorithms_and_a_custom_inject_but_goes_with_subjects() {
    let err = fail(&format!("{MIN}[clients.payments.dpop]\nalg = \"RS256\"\n"));
    assert_error(
        &err,
        "clients.payments.dpop.alg",
        "\"RS256\" is not an accepted value",
    );
    assert!(err.to_string().contains("\"ES256\", \"EdDSA\""), "{err}");
    let err = fail(&format!(
        "{MIN}[clients.payments.dpop]\n[clients.payments.inject]\nformat = \"Bearer {{token}}\"\n"
    ));
    assert_error(
        &err,
        "clients.payments.inject",
        "cannot be set with [clients.payments.dpop]",
    );
    let with_subjects = connect_config(CONNECT_OK).replace(
        "[clients.pos.subjects]\n",
        "[clients.pos.dpop]\n[clients.pos.subjects]\n",
    );
    let both = parse(&with_subjects);
    let pos = &both.clients[0];
    assert!(
        pos.dpop.is_some() && pos.subjects.is_some(),
        "subjects' tokens are bound to a key per subject"
    );
    let err = fail(&format!("{MIN}[clients.payments.dpop]\nkey = \"x\"\n"));
    assert!(
        err.to_string().contains("clients.payments.dpop.key"),
        "an unknown key in [dpop] is named: {err}"
    );
}

#[test]
fn preserve_header_case_is_off_unless_asked_for() {
    assert!(!parse(MIN).limits.preserve_header_case);
    let c = parse(&format!("[limits]\npreserve_header_case = true\n{MIN}"));
    assert!(c.limits.preserve_header_case);
    assert!(
        c.summary().contains("preserve_header_case"),
        "{}",
        c.summary()
    );
    let err = fail(&format!("[limits]\npreserve_header_case = \"yes\"\n{MIN}"));
    assert_eq!(err.key(), "limits.preserve_header_case", "{err}");
}
