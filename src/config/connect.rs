//! `[connect]`: the public listener where merchants and customers connect
//! their accounts (one-time connect links, the provider's redirect back).
//!
//! The listener speaks plain HTTP: in production it sits behind an ingress
//! that terminates TLS for `public_url`.

use std::net::SocketAddr;
use std::time::Duration;

use http::Uri;

use super::file::RawConnect;
use super::safety::is_loopback_host;
use super::{ConfigError, Table, LISTEN_HINT};

const PUBLIC_URL_HINT: &str =
    "write it like \"https://connect.platform.example\" (http only on a loopback address, for tests and demos)";
const RETURN_TO_HINT: &str =
    "write prefixes like [\"https://app.platform.example/\"], each ending its host with /";
/// Longest connect session: a link to send by mail a day ahead is still short.
const MAX_SESSION_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// `[connect]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectConfig {
    /// Where the connect listener accepts browsers (behind the ingress).
    pub listen: SocketAddr,
    /// The address browsers use, without a trailing `/`.
    pub public_url: String,
    /// The path of `public_url` (`""` or like `/connect-base`), which the
    /// listener accepts in front of its own paths.
    pub base_path: String,
    /// Whether `public_url` is https (the cookie is then `Secure`).
    pub secure: bool,
    /// `public_url` + `/callback`: the redirect URI registered with providers.
    pub redirect_uri: String,
    /// Prefixes a session's `return_to` must start with; the first is the default.
    pub return_to: Vec<String>,
    /// How long a connect link, and the sign-in it starts, stays usable.
    pub session_ttl: Duration,
}

impl ConnectConfig {
    /// Whether `url` may be a session's `return_to`: an absolute http(s) URL
    /// without a fragment, starting with one of the allowed prefixes.
    pub fn allows_return_to(&self, url: &str) -> bool {
        url.len() <= 2048
            && !url.contains('#')
            && url
                .parse::<Uri>()
                .is_ok_and(|u| u.scheme().is_some() && u.authority().is_some())
            && self.return_to.iter().any(|p| url.starts_with(p.as_str()))
    }
}

pub(super) fn build_connect(raw: RawConnect, t: &Table<'_>) -> Result<ConnectConfig, ConfigError> {
    let mut p = super::Problems::default();
    let listen = p.take(
        t.required("listen", raw.listen, LISTEN_HINT)
            .and_then(|listen| t.listen("listen", &listen)),
    );
    let public_url = p.take(public_url(raw.public_url, t));
    let return_to = match raw.return_to {
        None => {
            p.add(t.err("return_to", "is required").with_hint(RETURN_TO_HINT));
            None
        }
        Some(list) if list.is_empty() => {
            p.add(t.err("return_to", "is empty").with_hint(RETURN_TO_HINT));
            None
        }
        Some(list) => {
            let prefixes: Vec<Option<String>> = list
                .iter()
                .enumerate()
                .map(|(i, raw)| p.take(return_to_prefix(t, i, raw)))
                .collect();
            prefixes.into_iter().collect::<Option<Vec<_>>>()
        }
    };
    let session_ttl = p.take(
        t.duration("session_ttl", raw.session_ttl, Duration::from_secs(15 * 60))
            .and_then(|ttl| {
                if ttl > MAX_SESSION_TTL {
                    return Err(t.err("session_ttl", "is longer than 24h").with_hint(
                        "a connect link is for one sign-in soon after it is made; use e.g. \"15m\"",
                    ));
                }
                Ok(ttl)
            }),
    );
    let (Some(listen), Some((text, base_path, secure)), Some(return_to), Some(session_ttl)) =
        (listen, public_url, return_to, session_ttl)
    else {
        return Err(p.into_error());
    };
    Ok(ConnectConfig {
        listen,
        redirect_uri: format!("{text}/callback"),
        public_url: text,
        base_path,
        secure,
        return_to,
        session_ttl,
    })
}

/// `public_url`: where browsers reach the connect pages, as its text, its
/// path (the pages' base) and whether it is https.
fn public_url(raw: Option<String>, t: &Table<'_>) -> Result<(String, String, bool), ConfigError> {
    let text = t.required("public_url", raw, PUBLIC_URL_HINT)?;
    let (uri, scheme, authority) = t.url("public_url", &text, PUBLIC_URL_HINT)?;
    let text = t.string("public_url", &text)?.trim().to_owned();
    if uri.query().is_some() || text.contains('?') {
        return Err(t
            .err("public_url", "must not have a query")
            .with_hint(PUBLIC_URL_HINT));
    }
    if text.ends_with('/') {
        return Err(t
            .err("public_url", format!("{text:?} ends with /"))
            .with_hint("remove the trailing /; the callback is public_url + \"/callback\""));
    }
    let secure = scheme.as_str() == "https";
    if !secure && !is_loopback_host(authority.host()) {
        return Err(t
            .err(
                "public_url",
                format!("{text:?} is plain http on a host that is not loopback"),
            )
            .with_hint(
                "browsers carry sign-in codes and cookies here: use https (TLS at the ingress)",
            ));
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    Ok((text, base_path, secure))
}

/// One allowed `return_to` prefix. It must name its whole host (end it with
/// `/`): `https://app.example` would also allow `https://app.example.evil`.
fn return_to_prefix(t: &Table<'_>, i: usize, raw: &str) -> Result<String, ConfigError> {
    let key = format!("return_to[{i}]");
    let (_, scheme, authority) = t.url(&key, raw, RETURN_TO_HINT)?;
    let text = t.string(&key, raw)?.trim().to_owned();
    let after_scheme = text.split_once("://").map_or("", |(_, rest)| rest);
    if !after_scheme.contains('/') {
        return Err(t
            .err(&key, format!("{text:?} does not end its host with /"))
            .with_hint(
                "write it like \"https://app.platform.example/\": without the /, a look-alike host would match too",
            ));
    }
    if scheme.as_str() != "https" && !is_loopback_host(authority.host()) {
        return Err(t
            .err(
                &key,
                format!("{text:?} is plain http on a host that is not loopback"),
            )
            .with_hint("use https"));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(prefixes: &[&str]) -> ConnectConfig {
        ConnectConfig {
            listen: "127.0.0.1:8443".parse().expect("addr"),
            public_url: "https://connect.example".into(),
            base_path: String::new(),
            secure: true,
            redirect_uri: "https://connect.example/callback".into(),
            return_to: prefixes.iter().map(|p| (*p).to_owned()).collect(),
            session_ttl: Duration::from_secs(900),
        }
    }

    #[test]
    fn return_to_must_start_with_an_allowed_prefix_and_be_a_plain_url() {
        let c = config(&["https://app.example/", "https://shop.example/done"]);
        assert!(c.allows_return_to("https://app.example/"));
        assert!(c.allows_return_to("https://app.example/merchants?tab=1"));
        assert!(c.allows_return_to("https://shop.example/done/ok"));
        assert!(!c.allows_return_to("https://app.example.evil/"));
        assert!(!c.allows_return_to("https://evil.example/https://app.example/"));
        assert!(!c.allows_return_to("https://shop.example/other"));
        assert!(!c.allows_return_to("https://app.example/#frag"));
        assert!(!c.allows_return_to("https://app.example/a b"));
        assert!(!c.allows_return_to(""));
    }

    #[test]
    fn loopback_hosts_are_recognised() {
        assert!(is_loopback_host("127.0.0.1"));
        assert!(is_loopback_host("[::1]"));
        assert!(is_loopback_host("LOCALHOST"));
        assert!(!is_loopback_host("connect.example"));
        assert!(!is_loopback_host("10.0.0.1"));
    }
}
