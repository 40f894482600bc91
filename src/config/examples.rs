//! "write it like ...": an example line for every key of the file, so that a
//! value of the wrong type or form is answered with one that works.
//!
//! Examples are made-up values (never the user's: it may be a secret), in the
//! spelling of the PRODUCT.md examples and the defaults where there are some.

/// A key pattern (`*` stands for any one segment, a client's name) and an
/// example value as it would be written in the file.
const EXAMPLES: &[(&str, &str)] = &[
    ("admin.listen", "\"127.0.0.1:9090\""),
    ("admin.api_key", "\"${TOKENPROXY_ADMIN_KEY}\""),
    ("admin.api_key_file", "\"/run/secrets/tokenproxy-admin\""),
    ("admin.max_connections", "64"),
    ("admin.max_connections_per_ip", "8"),
    ("admin.allowed_hosts", "[\"tokenproxy.internal\"]"),
    ("log.level", "\"info\""),
    ("log.format", "\"text\""),
    ("limits.header_read_timeout", "\"10s\""),
    ("limits.max_header_bytes", "\"32KiB\""),
    ("limits.max_headers", "100"),
    ("limits.idle_timeout", "\"60s\""),
    ("limits.max_connections", "1024"),
    ("limits.shutdown_grace", "\"25s\""),
    ("limits.body_timeout", "\"10s\""),
    ("limits.body_min_rate", "\"1KiB\""),
    ("limits.max_buffered_bytes", "\"64MiB\""),
    ("limits.http2_max_concurrent_streams", "100"),
    ("limits.http2_keepalive_interval", "\"30s\""),
    ("limits.upgrade_idle_timeout", "\"5m\""),
    ("limits.preserve_header_case", "true"),
    ("runtime.workers", "2"),
    ("store.kind", "\"file\""),
    ("store.path", "\"/var/lib/tokenproxy/tokens.json\""),
    ("store.url", "\"redis://127.0.0.1:6379/0\""),
    ("store.key_prefix", "\"tokenproxy\""),
    ("store.key", "\"${TOKENPROXY_STORE_KEY}\""),
    ("store.key_file", "\"/run/secrets/tokenproxy-store-key\""),
    ("store.previous_keys", "[\"${TOKENPROXY_OLD_STORE_KEY}\"]"),
    (
        "store.previous_key_files",
        "[\"/run/secrets/tokenproxy-old-store-key\"]",
    ),
    ("store.allow_plaintext_password", "true"),
    ("store.username", "\"tokenproxy\""),
    ("store.password", "\"${REDIS_PASSWORD}\""),
    ("store.password_file", "\"/run/secrets/redis-password\""),
    ("store.ca_file", "\"/etc/tokenproxy/redis-ca.pem\""),
    ("store.tls", "true"),
    (
        "store.sentinels",
        "[\"10.0.0.1:26379\", \"10.0.0.2:26379\"]",
    ),
    ("store.service_name", "\"mymaster\""),
    ("store.sentinel_username", "\"sentinel\""),
    ("store.sentinel_password", "\"${SENTINEL_PASSWORD}\""),
    (
        "store.sentinel_password_file",
        "\"/run/secrets/sentinel-password\"",
    ),
    ("store.sentinel_tls", "true"),
    ("store.cluster", "[\"10.0.0.1:6379\", \"10.0.0.2:6379\"]"),
    ("store.min_replicas_acked", "1"),
    ("connect.listen", "\"0.0.0.0:8443\""),
    ("connect.public_url", "\"https://connect.platform.example\""),
    ("connect.return_to", "[\"https://app.platform.example/\"]"),
    ("connect.session_ttl", "\"15m\""),
    ("clients.*.listen", "\"127.0.0.1:8080\""),
    ("clients.*.upstream", "\"https://api.pay.example\""),
    ("clients.*.path_prefix", "\"/payments\""),
    ("clients.*.allowed_hosts", "[\"payments.internal\"]"),
    ("clients.*.allow_cross_site", "true"),
    ("clients.*.retry_body_limit", "\"1MiB\""),
    ("clients.*.timeout", "\"30s\""),
    ("clients.*.token_wait_timeout", "\"2s\""),
    ("clients.*.unauthorized_status", "[401]"),
    ("clients.*.idempotency_headers", "[\"Idempotency-Key\"]"),
    ("clients.*.replay_non_idempotent", "true"),
    ("clients.*.http2", "true"),
    ("clients.*.upgrades", "[\"websocket\"]"),
    ("clients.*.rewrite_location", "false"),
    ("clients.*.proxy", "\"http://proxy.corp:3128\""),
    ("clients.*.allow_insecure", "[\"public_listen\"]"),
    (
        "clients.*.token.url",
        "\"https://auth.example/oauth2/token\"",
    ),
    ("clients.*.token.grant", "\"client_credentials\""),
    ("clients.*.token.client_id", "\"${PAY_CLIENT_ID}\""),
    ("clients.*.token.client_secret", "\"${PAY_CLIENT_SECRET}\""),
    ("clients.*.token.client_secret_file", "\"/run/secrets/pay\""),
    ("clients.*.token.client_auth", "\"basic\""),
    (
        "clients.*.token.signing_key_file",
        "\"/run/secrets/pay-signing-key.pem\"",
    ),
    ("clients.*.token.signing_alg", "\"ES256\""),
    ("clients.*.token.key_id", "\"pay-2026\""),
    (
        "clients.*.token.certificate_file",
        "\"/run/secrets/pay-signing-cert.pem\"",
    ),
    (
        "clients.*.token.assertion_audience",
        "\"https://auth.example\"",
    ),
    (
        "clients.*.token.client_assertion_file",
        "\"/var/run/secrets/tokens/pay-token\"",
    ),
    (
        "clients.*.token.client_assertion_type",
        "\"urn:ietf:params:oauth:client-assertion-type:jwt-bearer\"",
    ),
    ("clients.*.token.body", "\"form\""),
    ("clients.*.token.scope", "\"payments\""),
    ("clients.*.token.username", "\"svc-payments\""),
    ("clients.*.token.password", "\"${PAY_PASSWORD}\""),
    (
        "clients.*.token.password_file",
        "\"/run/secrets/pay-password\"",
    ),
    ("clients.*.token.refresh_token", "\"${PAY_REFRESH_TOKEN}\""),
    (
        "clients.*.token.refresh_token_file",
        "\"/run/secrets/pay-refresh-token\"",
    ),
    (
        "clients.*.token.refresh_url",
        "\"https://auth.example/oauth2/refresh\"",
    ),
    ("clients.*.token.refresh_before", "\"60s\""),
    ("clients.*.token.default_lifetime", "\"5m\""),
    ("clients.*.token.refresh_token_lifetime", "\"24h\""),
    ("clients.*.token.params", "{ audience = \"payments-api\" }"),
    ("clients.*.token.params.*", "\"payments-api\""),
    ("clients.*.token.timeout", "\"10s\""),
    (
        "clients.*.token.headers",
        "{ \"Square-Version\" = \"2026-01-22\" }",
    ),
    ("clients.*.token.headers.*", "\"2026-01-22\""),
    ("clients.*.token.response.access_token", "\"accessToken\""),
    ("clients.*.token.response.refresh_token", "\"refreshToken\""),
    ("clients.*.token.response.token_type", "\"tokenType\""),
    ("clients.*.token.response.scope", "\"scopes\""),
    ("clients.*.token.response.expires_in", "\"data.expiresIn\""),
    (
        "clients.*.token.response.expires_at",
        "\"access_token_expiration\"",
    ),
    (
        "clients.*.token.response.expires_at_unit",
        "\"epoch_seconds\"",
    ),
    (
        "clients.*.token.response.refresh_token_expires_in",
        "\"refreshExpiresIn\"",
    ),
    (
        "clients.*.token.response.refresh_token_expires_at",
        "\"refresh_token_expiration\"",
    ),
    (
        "clients.*.token.response.refresh_token_expires_at_unit",
        "\"epoch_seconds\"",
    ),
    ("clients.*.token.errors.status", "500"),
    ("clients.*.token.errors.error", "\"INVALID_CREDENTIALS\""),
    (
        "clients.*.token.errors.body_contains",
        "\"INVALID_CREDENTIALS\"",
    ),
    ("clients.*.token.errors.means", "\"rejected\""),
    ("clients.*.inject.header", "\"Authorization\""),
    ("clients.*.inject.format", "\"Bearer {token}\""),
    ("clients.*.dpop.alg", "\"ES256\""),
    (
        "clients.*.authorize.url",
        "\"https://auth.example/oauth2/authorize\"",
    ),
    ("clients.*.authorize.scope", "\"offline_access payments\""),
    ("clients.*.authorize.redirect_port", "8765"),
    (
        "clients.*.authorize.redirect_uri",
        "\"http://127.0.0.1:8765/callback\"",
    ),
    ("clients.*.authorize.pkce", "true"),
    ("clients.*.authorize.params", "{ prompt = \"consent\" }"),
    ("clients.*.authorize.params.*", "\"consent\""),
    ("clients.*.subjects.header", "\"x-tokenproxy-subject\""),
    ("clients.*.subjects.fallback", "\"none\""),
    ("clients.*.subjects.max_cached", "10000"),
    ("clients.*.subjects.active_window", "\"10m\""),
    ("clients.*.subjects.refresh_every", "\"7d\""),
    ("clients.*.subjects.max_concurrent_token_requests", "4"),
    ("clients.*.subjects.max_token_requests_per_minute", "600"),
    (
        "clients.*.subjects.revoke_url",
        "\"https://auth.example/oauth2/revoke\"",
    ),
    (
        "clients.*.tls.ca_file",
        "\"/etc/tokenproxy/private-ca.pem\"",
    ),
    ("clients.*.tls.system_roots", "false"),
    (
        "clients.*.tls.client_cert_file",
        "\"/run/secrets/client.pem\"",
    ),
    (
        "clients.*.tls.client_key_file",
        "\"/run/secrets/client-key.pem\"",
    ),
    ("clients.*.tls.server_name", "\"api.pay.example\""),
    ("clients.*.tls.min_version", "\"1.3\""),
    (
        "clients.*.token.tls.ca_file",
        "\"/etc/tokenproxy/private-ca.pem\"",
    ),
    ("clients.*.token.tls.system_roots", "false"),
    (
        "clients.*.token.tls.client_cert_file",
        "\"/run/secrets/client.pem\"",
    ),
    (
        "clients.*.token.tls.client_key_file",
        "\"/run/secrets/client-key.pem\"",
    ),
    ("clients.*.token.tls.server_name", "\"auth.example\""),
    ("clients.*.token.tls.min_version", "\"1.3\""),
];

/// Keys whose value is a table of their own.
const TABLES: &[&str] = &[
    "admin",
    "log",
    "limits",
    "runtime",
    "store",
    "connect",
    "clients.*",
    "clients.*.token",
    "clients.*.inject",
    "clients.*.dpop",
    "clients.*.tls",
    "clients.*.token.tls",
    "clients.*.token.response",
    "clients.*.authorize",
    "clients.*.subjects",
];

fn matches(pattern: &str, key: &str) -> bool {
    let (mut p, mut k) = (pattern.split('.'), key.split('.'));
    loop {
        match (p.next(), k.next()) {
            (None, None) => return true,
            (Some(ps), Some(ks)) if ps == "*" || ps == ks => {}
            _ => return false,
        }
    }
}

/// `key` without the element indexes of arrays of tables (`errors[1].means`
/// is written like any `errors.means`), and whether it had one.
fn without_indexes(key: &str) -> (String, bool) {
    let mut plain = String::with_capacity(key.len());
    let mut indexed = false;
    for segment in key.split('.') {
        let name = match segment.split_once('[') {
            Some((name, rest)) if rest.ends_with(']') => {
                indexed = true;
                name
            }
            _ => segment,
        };
        if !plain.is_empty() {
            plain.push('.');
        }
        plain.push_str(name);
    }
    (plain, indexed)
}

/// The example value of the dotted `key`, as written in the file.
pub(super) fn example_value(key: &str) -> Option<&'static str> {
    let (key, _) = without_indexes(key);
    EXAMPLES
        .iter()
        .find(|(pattern, _)| matches(pattern, &key))
        .map(|(_, value)| *value)
}

/// "write it like KEY = VALUE" for the dotted `key`, or how to write its
/// table; `None` for a key without an example.
pub(super) fn write_it_like(key: &str) -> Option<String> {
    let leaf = key.rsplit('.').next().unwrap_or(key);
    if let Some(value) = example_value(key) {
        return Some(format!("write it like {leaf} = {value}"));
    }
    if key == "clients" {
        return Some("write each client as a table of its own, like [clients.payments]".to_owned());
    }
    let (plain, indexed) = without_indexes(key);
    if matches("clients.*.token.errors", &plain) {
        let lead = if indexed {
            "write it"
        } else {
            "write each rule"
        };
        return Some(format!(
            "{lead} as a table: a [[{plain}]] line with its keys (status, error, body_contains, means) on the lines below it"
        ));
    }
    if TABLES.iter().any(|pattern| matches(pattern, key)) {
        return Some(format!(
            "write it as a table: a [{key}] line with its keys on the lines below it"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_follow_the_key_with_any_client_name() {
        assert_eq!(
            write_it_like("clients.wallet.unauthorized_status").as_deref(),
            Some("write it like unauthorized_status = [401]")
        );
        assert_eq!(
            write_it_like("clients.wallet.token.timeout").as_deref(),
            Some("write it like timeout = \"10s\""),
            "the token endpoint's timeout, not the client's"
        );
        assert_eq!(
            write_it_like("admin.listen").as_deref(),
            Some("write it like listen = \"127.0.0.1:9090\"")
        );
        assert_eq!(
            write_it_like("clients.wallet.token").as_deref(),
            Some(
                "write it as a table: a [clients.wallet.token] line with its keys on the lines below it"
            )
        );
        assert_eq!(write_it_like("clients.wallet.nonsense"), None);
    }

    #[test]
    fn a_rule_of_an_array_of_tables_is_written_like_any_rule() {
        assert_eq!(
            write_it_like("clients.pay.token.errors[2].means").as_deref(),
            Some("write it like means = \"rejected\"")
        );
        assert_eq!(
            write_it_like("clients.pay.token.errors").as_deref(),
            Some(
                "write each rule as a table: a [[clients.pay.token.errors]] line with its keys (status, error, body_contains, means) on the lines below it"
            )
        );
        assert_eq!(
            write_it_like("clients.pay.token.headers.Square-Version").as_deref(),
            Some("write it like Square-Version = \"2026-01-22\"")
        );
    }

    /// Every key the raw mirror knows has an example; a key added to
    /// `file.rs` without one fails here.
    #[test]
    fn every_key_of_the_file_has_an_example() {
        let file = include_str!("file.rs");
        let tls = include_str!("tls.rs");
        let authorize = include_str!("authorize.rs");
        let fields = |src: &str, structure: &str| -> Vec<String> {
            let start = src
                .find(&format!("struct {structure} {{"))
                .unwrap_or_else(|| panic!("struct {structure} in the source"));
            let body = &src[start..];
            let body = &body[..body.find("\n}").unwrap_or(body.len())];
            body.lines()
                .filter_map(|l| l.trim().strip_prefix("pub(super) "))
                .filter_map(|l| l.split(':').next())
                .map(str::to_owned)
                .collect()
        };
        let sections = [
            (file, "RawConfig", ""),
            (file, "RawAdmin", "admin"),
            (file, "RawLog", "log"),
            (file, "RawLimits", "limits"),
            (file, "RawRuntime", "runtime"),
            (file, "RawStore", "store"),
            (file, "RawConnect", "connect"),
            (file, "RawClient", "clients.a"),
            (file, "RawToken", "clients.a.token"),
            (file, "RawInject", "clients.a.inject"),
            (file, "RawSubjects", "clients.a.subjects"),
            (file, "RawResponse", "clients.a.token.response"),
            (file, "RawErrorRule", "clients.a.token.errors[0]"),
            (file, "RawDpop", "clients.a.dpop"),
            (tls, "RawTls", "clients.a.tls"),
            (tls, "RawTls", "clients.a.token.tls"),
            (authorize, "RawAuthorize", "clients.a.authorize"),
        ];
        for (src, structure, table) in sections {
            let keys = fields(src, structure);
            assert!(!keys.is_empty(), "{structure} has fields");
            for key in keys {
                let dotted = match table {
                    "" => key,
                    _ => format!("{table}.{key}"),
                };
                assert!(
                    write_it_like(&dotted).is_some(),
                    "{dotted} should have an example in examples.rs"
                );
            }
        }
    }
}
