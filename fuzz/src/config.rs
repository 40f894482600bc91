//! Properties of `tokenproxy::config::from_str`.
//!
//! The input is TOML text; its first byte picks the environment (which proxy variables
//! are set, with credentials in them) and whether the text has a file name. The
//! environment holds secrets: `SECRET` is [`MARKER`], the files under `/run/secrets/`
//! hold it, the client key file holds [`KEY_BASE64`], and the proxy variables carry the
//! marker as their password. For every input:
//! - `from_str` does not panic, and neither do `Display`/`Debug` of its error or
//!   `Config::summary()`;
//! - neither the marker nor the key material shows in the error (`Display`, `Debug`) or
//!   the summary, unless the text put it there legitimately: the text contains it
//!   literally, or it references `SECRET` from a key that is not a secret (an upstream
//!   URL, a file path, a log level, a proxy's host: those are shown by design).
//!
//! Secret keys are `client_secret`, `password`, `refresh_token`, `[store] key`, every
//! `params` value, and the userinfo part of a `proxy` URL.

use std::path::Path;

use tokenproxy::config::{from_str, MapEnv};

/// The value of every secret the environment holds.
pub const MARKER: &str = "Mk7q-SeCrEt-v4lue-9zX";

/// The base64 body of the client key file (a secret too).
pub const KEY_BASE64: &str =
    "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgmVCrE2GhXmlZ/9u8uVuEqj/SPeh+NN5pRqzCXc2NFMShRANCAAS9GqLUXZNMK8hbQuRzhvaD7IVNHyZDD2Hqc766yol1ASx1RUrT3dzwMrREl9BqLPfsCFpvZLjeNjisM2h8kP4S";

/// A self-signed certificate of the key above (P-256, made for these tests only): the
/// config reads certificates as X.509 and keys as PEM, so placeholders no longer pass.
const CERT_PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIBmzCCAUGgAwIBAgIUSvTXPcRuzCfQsgCIz7hFA3XP314wCgYIKoZIzj0EAwIw\nIjEgMB4GA1UEAwwXZnV6ei50b2tlbnByb3h5LmV4YW1wbGUwIBcNMjYxMjA3MTAw\nMTQ5WhgPMjEyNjExMTMxMDAxNDlaMCIxIDAeBgNVBAMMF2Z1enoudG9rZW5wcm94\neS5leGFtcGxlMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEvRqi1F2TTCvIW0Lk\nc4b2g+yFTR8mQw9h6nO+usqJdQEsdUVK093c8DK0RJfQaiz37Ahab2S43jY4rDNo\nfJD+EqNTMFEwHQYDVR0OBBYEFHFgvz2+7BH9drfmJleKAE/JyCLdMB8GA1UdIwQY\nMBaAFHFgvz2+7BH9drfmJleKAE/JyCLdMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZI\nzj0EAwIDSAAwRQIgDBBQ1x2cuKAGKgZYqnqVqlZypkcdcRc9AqdfZeKqmTACIQDu\n3uUjdnyrGS1/dPSAkON/x78A/jHxjPEjdLGen5pBmQ==\n-----END CERTIFICATE-----\n";

/// Where the config claims to live when the selector asks for a file name.
pub const CONFIG_PATH: &str = "/etc/tokenproxy/tokenproxy.toml";

/// The environment for one case; `selector` is the input's first byte.
pub fn env(selector: u8) -> MapEnv {
    let mut env = MapEnv::new()
        .var("SECRET", MARKER)
        .var("CLIENT_ID", "payments-client")
        .var("API_HOST", "api.pay.example")
        .var("PORT", "8443")
        .var("EMPTY", "")
        .file("/run/secrets/client_secret", format!("{MARKER}\n"))
        .file("/run/secrets/password", format!("{MARKER}\r\n"))
        .file("/run/secrets/refresh_token", MARKER)
        .file("/run/secrets/empty", "\n")
        .file("/etc/tokenproxy/ca.pem", CERT_PEM)
        .file("/etc/tokenproxy/client.pem", CERT_PEM)
        .file(
            "/etc/tokenproxy/client.key",
            format!("-----BEGIN PRIVATE KEY-----\n{KEY_BASE64}\n-----END PRIVATE KEY-----\n"),
        )
        .file(
            "/etc/tokenproxy/bad.key",
            format!("-----BEGIN PRIVATE KEY-----\n!{MARKER}!\n-----END PRIVATE KEY-----\n"),
        );
    if selector & 1 != 0 {
        env = env.var(
            "HTTPS_PROXY",
            format!("http://svc:{MARKER}@proxy.corp:3128"),
        );
    }
    if selector & 2 != 0 {
        env = env.var(
            "http_proxy",
            format!("socks5://svc:{MARKER}@proxy.corp:1080"),
        );
    }
    if selector & 4 != 0 {
        env = env.var("ALL_PROXY", format!("http://svc:{MARKER}@"));
    }
    if selector & 8 != 0 {
        env = env.var("NO_PROXY", "localhost,.internal");
    }
    env
}

/// The file name the text claims to come from (it anchors relative `*_file` paths).
pub fn source(selector: u8) -> Option<&'static Path> {
    (selector & 16 != 0).then(|| Path::new(CONFIG_PATH))
}

/// Parses `text` as a config in the environment `selector` picks and checks the properties.
pub fn check(selector: u8, text: &str) {
    let env = env(selector);
    let source = source(selector);
    let (shown, what) = match from_str(text, source, &env) {
        Ok(config) => (config.summary(), "summary"),
        Err(e) => (format!("{e}\n{e:?}"), "error"),
    };
    for secret in [MARKER, KEY_BASE64] {
        if shown.contains(secret) && !legitimately_shown(text) {
            panic!("a secret shows in the {what}:\n{shown}");
        }
    }
}

/// Whether the text itself makes the marker visible (see the module documentation).
pub(crate) fn legitimately_shown(text: &str) -> bool {
    if text.contains(MARKER) || text.contains(KEY_BASE64) {
        return true;
    }
    // If the text is not TOML, from_str fails before any `${VAR}` is expanded.
    let Ok(table) = toml::from_str::<toml::Table>(text) else {
        return false;
    };
    let mut path = Vec::new();
    table
        .iter()
        .any(|(k, v)| references_secret_in_the_open(&mut path, k, v))
}

/// Whether some string under `key` references `SECRET` from a non-secret position.
fn references_secret_in_the_open(path: &mut Vec<String>, key: &str, value: &toml::Value) -> bool {
    path.push(key.to_owned());
    let found = match value {
        toml::Value::String(s) => s.contains("SECRET") && !is_secret_position(path, s),
        toml::Value::Array(items) => items
            .iter()
            .any(|v| references_secret_in_the_open(path, key, v)),
        toml::Value::Table(t) => t
            .iter()
            .any(|(k, v)| references_secret_in_the_open(path, k, v)),
        _ => false,
    };
    path.pop();
    found
}

fn is_secret_position(path: &[String], value: &str) -> bool {
    let last = path.last().map_or("", String::as_str);
    if matches!(last, "client_secret" | "password" | "refresh_token" | "key") {
        return true;
    }
    if path.iter().any(|k| k == "params") {
        return true;
    }
    if last == "proxy" {
        // Only the userinfo is secret: every reference must come before the last '@'.
        return value
            .rfind('@')
            .is_some_and(|at| !value[at..].contains("SECRET"));
    }
    false
}
