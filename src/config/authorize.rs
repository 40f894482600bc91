//! `[clients.NAME.authorize]`: how `tokenproxy authorize` gets a refresh token
//! through the authorization-code flow, for providers that need a person to log
//! in once.

use std::collections::BTreeMap;

use http::Uri;
use serde::Deserialize;

use super::{ConfigError, Table};

const AUTHORIZE_URL_HINT: &str = "write it like \"https://auth.example/oauth2/authorize\"";
const REDIRECT_HINT: &str =
    "write it like \"http://127.0.0.1:8765/callback\"; it must be registered with the provider";
/// Parameters `authorize` sets itself.
const RESERVED: [&str; 7] = [
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
];

/// The raw table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuthorize {
    pub(super) url: Option<String>,
    pub(super) scope: Option<String>,
    pub(super) redirect_port: Option<i64>,
    pub(super) redirect_uri: Option<String>,
    pub(super) pkce: Option<bool>,
    pub(super) params: Option<BTreeMap<String, String>>,
}

/// `[clients.NAME.authorize]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizeConfig {
    /// The provider's authorization endpoint.
    pub url: Uri,
    /// Scope to request; `token.scope` when unset.
    pub scope: Option<String>,
    /// Where the provider sends the browser back (registered with the provider).
    pub redirect_uri: Uri,
    /// Whether `authorize` can receive the redirect itself: an `http` URI on a
    /// loopback address with a port.
    pub redirect_listen: Option<std::net::SocketAddr>,
    /// PKCE with S256 (default true).
    pub pkce: bool,
    /// Extra parameters for the authorization request (sorted by name).
    pub params: Vec<(String, String)>,
}

/// `connect_callback` is the `[connect]` callback of a client with subjects:
/// without `redirect_port` or `redirect_uri` it is the redirect URI.
pub(super) fn build_authorize(
    raw: RawAuthorize,
    t: &Table<'_>,
    connect_callback: Option<&str>,
) -> Result<AuthorizeConfig, ConfigError> {
    let mut p = super::Problems::default();
    let url = p.take(
        t.required("url", raw.url, AUTHORIZE_URL_HINT)
            .and_then(|text| t.url("url", &text, AUTHORIZE_URL_HINT))
            .map(|(url, _, _)| url),
    );
    let redirect_uri = p.take(redirect_uri(
        raw.redirect_port,
        raw.redirect_uri,
        t,
        connect_callback,
    ));
    let mut params = Vec::new();
    for (name, value) in raw.params.unwrap_or_default() {
        let key = format!("params.{name}");
        if RESERVED.contains(&name.as_str()) {
            p.add(
                t.err(&key, format!("{name} is set by tokenproxy authorize"))
                    .with_hint("remove it (scope has its own key)"),
            );
        } else if let Some(value) = p.take(t.string(&key, &value)) {
            params.push((name, value));
        }
    }
    let scope = p.take(t.non_empty("scope", raw.scope));
    let (Some(url), Some(redirect_uri), Some(scope), true) =
        (url, redirect_uri, scope, p.is_empty())
    else {
        return Err(p.into_error());
    };
    // The connect listener, not `tokenproxy authorize`, receives the connect callback.
    let via_connect = connect_callback.is_some_and(|c| redirect_uri == c);
    let redirect_listen = (!via_connect)
        .then(|| loopback_listen(&redirect_uri))
        .flatten();
    Ok(AuthorizeConfig {
        url,
        scope,
        redirect_uri,
        redirect_listen,
        pkce: raw.pkce.unwrap_or(true),
        params,
    })
}

/// `redirect_port` or `redirect_uri` (or, for a client with subjects, the
/// `[connect]` callback): where the provider sends the browser back.
fn redirect_uri(
    port: Option<i64>,
    uri: Option<String>,
    t: &Table<'_>,
    connect_callback: Option<&str>,
) -> Result<Uri, ConfigError> {
    let uri = match (port, uri) {
        (Some(_), Some(_)) => {
            return Err(t
                .err("redirect_port", "is set together with redirect_uri")
                .with_hint("set only one of them"))
        }
        (Some(port), None) => {
            let port = u16::try_from(port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    t.err("redirect_port", format!("{port} is not a port number (1-65535)"))
                        .with_hint("use the port of the redirect URI registered with the provider")
                })?;
            format!("http://127.0.0.1:{port}/callback")
                .parse::<Uri>()
                .map_err(|_| t.err("redirect_port", "does not make a valid URI"))?
        }
        (None, Some(text)) => {
            let text = t.string("redirect_uri", &text)?;
            let uri: Uri = text.parse().map_err(|_| {
                t.err("redirect_uri", format!("{text:?} is not a valid URI"))
                    .with_hint(REDIRECT_HINT)
            })?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
                return Err(t
                    .err("redirect_uri", format!("{text:?} is not an absolute http(s) URI"))
                    .with_hint(REDIRECT_HINT));
            }
            if text.contains('#') {
                return Err(t
                    .err("redirect_uri", "must not have a fragment")
                    .with_hint(REDIRECT_HINT));
            }
            uri
        }
        (None, None) => match connect_callback {
            Some(callback) => callback.parse::<Uri>().map_err(|_| {
                t.err("redirect_uri", "the [connect] callback is not a valid URI")
            })?,
            None => return Err(t
                .err("redirect_port", "is required (or redirect_uri)")
                .with_hint(
                    "set redirect_port = 8765 for http://127.0.0.1:8765/callback, or redirect_uri; it must match a redirect URI registered with the provider",
                )),
        },
    };
    Ok(uri)
}

/// The address to listen on for `uri`, when it is plain http on a loopback address.
fn loopback_listen(uri: &Uri) -> Option<std::net::SocketAddr> {
    if uri.scheme_str() != Some("http") {
        return None;
    }
    let authority = uri.authority()?;
    let port = authority.port_u16()?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let ip: std::net::IpAddr = match host {
        "localhost" => std::net::Ipv4Addr::LOCALHOST.into(),
        h => h.parse().ok()?,
    };
    ip.is_loopback()
        .then_some(std::net::SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_redirects_can_be_listened_on() {
        let l = |s: &str| loopback_listen(&s.parse().unwrap());
        assert_eq!(
            l("http://127.0.0.1:8765/callback"),
            Some("127.0.0.1:8765".parse().unwrap())
        );
        assert_eq!(
            l("http://localhost:9000/cb"),
            Some("127.0.0.1:9000".parse().unwrap())
        );
        assert_eq!(
            l("http://[::1]:9000/cb"),
            Some("[::1]:9000".parse().unwrap())
        );
        assert_eq!(l("https://127.0.0.1:8765/cb"), None);
        assert_eq!(l("http://app.example:8765/cb"), None);
        assert_eq!(l("http://127.0.0.1/cb"), None);
    }
}
