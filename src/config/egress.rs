//! `clients.NAME.proxy`: the egress (forward) proxy used to reach the upstream
//! and the token endpoint, as corporate networks require.
//!
//! Without the key, the conventional environment variables apply (`https_proxy`,
//! `http_proxy`, `all_proxy`, `no_proxy`, upper or lower case), read through the
//! injected lookup. `proxy = "none"` ignores them.

use super::{ConfigError, Table};
use crate::secret::Secret;

/// Where the proxy setting came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProxySource {
    /// No proxy: connect directly.
    #[default]
    None,
    /// The client's `proxy` key.
    Config,
    /// `https_proxy` and friends.
    Environment,
}

/// The validated egress proxy of a client. Proxy URLs may carry credentials, so
/// they are secrets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressProxy {
    /// Proxy for `http://` destinations.
    pub http: Option<Secret>,
    /// Proxy for `https://` destinations.
    pub https: Option<Secret>,
    /// Hosts reached directly (`no_proxy` syntax).
    pub no_proxy: String,
    /// Where this came from.
    pub source: ProxySource,
}

impl EgressProxy {
    /// Whether any destination goes through a proxy.
    pub fn is_direct(&self) -> bool {
        self.http.is_none() && self.https.is_none()
    }

    /// One line for `check`: proxy hosts, never credentials.
    pub fn summary(&self) -> String {
        if self.is_direct() {
            return "direct".to_owned();
        }
        let show = |s: &Option<Secret>| {
            s.as_ref()
                .and_then(|u| u.expose().parse::<http::Uri>().ok())
                .and_then(|u| {
                    u.authority().map(|a| {
                        a.host().to_owned() + &a.port().map(|p| format!(":{p}")).unwrap_or_default()
                    })
                })
                .unwrap_or_else(|| "-".to_owned())
        };
        let from = match self.source {
            ProxySource::Config => "config",
            _ => "environment",
        };
        let mut out = format!(
            "https via {}, http via {} (from {from})",
            show(&self.https),
            show(&self.http)
        );
        if !self.no_proxy.is_empty() {
            out.push_str(&format!(", no_proxy {}", self.no_proxy));
        }
        out
    }
}

pub(super) fn build_proxy(raw: Option<String>, t: &Table<'_>) -> Result<EgressProxy, ConfigError> {
    match raw {
        Some(raw) => {
            let text = t.x.string(&t.key("proxy"), &raw)?;
            if text.trim().eq_ignore_ascii_case("none") {
                return Ok(EgressProxy::default());
            }
            let url = proxy_url(t, "proxy", &text)?;
            Ok(EgressProxy {
                http: Some(url.clone()),
                https: Some(url),
                no_proxy: String::new(),
                source: ProxySource::Config,
            })
        }
        None => {
            let first = |names: &[&str]| {
                names
                    .iter()
                    .find_map(|n| t.x.var(n))
                    .filter(|v| !v.trim().is_empty())
            };
            let all = first(&["ALL_PROXY", "all_proxy"]);
            let https = first(&["HTTPS_PROXY", "https_proxy"]).or_else(|| all.clone());
            let http = first(&["HTTP_PROXY", "http_proxy"]).or(all);
            let no_proxy = first(&["NO_PROXY", "no_proxy"]).unwrap_or_default();
            let https = https
                .map(|v| proxy_url(t, "proxy", &v))
                .transpose()
                .map_err(from_env)?;
            let http = http
                .map(|v| proxy_url(t, "proxy", &v))
                .transpose()
                .map_err(from_env)?;
            let source = if https.is_some() || http.is_some() {
                ProxySource::Environment
            } else {
                ProxySource::None
            };
            Ok(EgressProxy {
                http,
                https,
                no_proxy,
                source,
            })
        }
    }
}

fn from_env(e: ConfigError) -> ConfigError {
    e.with_hint("the value came from https_proxy/http_proxy/all_proxy; fix it, or set proxy = \"none\" on this client")
}

/// `http://[user:password@]host:port`; the whole URL is a secret because of the userinfo.
fn proxy_url(t: &Table<'_>, k: &str, text: &str) -> Result<Secret, ConfigError> {
    let text = text.trim();
    let with_scheme = if text.contains("://") {
        text.to_owned()
    } else {
        format!("http://{text}")
    };
    let uri: http::Uri = with_scheme.parse().map_err(|_| {
        t.err(k, "is not a valid proxy URL").with_hint(
            "write it like \"http://proxy.corp:3128\" or \"http://user:password@proxy.corp:3128\"",
        )
    })?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(t
            .err(k, "must be an http:// proxy URL with a host")
            .with_hint("tokenproxy tunnels through the proxy with CONNECT over plain HTTP"));
    }
    Ok(Secret::new(with_scheme))
}

#[cfg(test)]
mod tests {
    use crate::config::{from_str, MapEnv};

    const BASE: &str = "[clients.c]\nlisten = \"127.0.0.1:8080\"\nupstream = \"https://api\"\n";
    const TOKEN: &str = "[clients.c.token]\nurl = \"https://auth/token\"\nclient_id = \"id\"\nclient_secret = \"s\"\n";

    #[test]
    fn proxy_credentials_never_show_in_the_summary() {
        let text = format!("{BASE}proxy = \"http://u:hunter2-proxy@proxy.corp:3128\"\n{TOKEN}");
        let c = from_str(&text, None, &MapEnv::new()).expect("valid");
        let summary = c.summary();
        assert!(summary.contains("proxy.corp:3128"), "{summary}");
        assert!(!summary.contains("hunter2-proxy"), "{summary}");
    }

    #[test]
    fn a_bad_proxy_names_the_key_and_an_https_proxy_is_refused() {
        for bad in ["http://", "socks5://proxy:1080", "https://proxy:443"] {
            let text = format!("{BASE}proxy = \"{bad}\"\n{TOKEN}");
            let err = from_str(&text, None, &MapEnv::new()).expect_err("rejected");
            assert_eq!(err.key(), "clients.c.proxy", "{bad}: {err}");
        }
        let env = MapEnv::new().var("HTTPS_PROXY", "ftp://nope");
        let err = from_str(&format!("{BASE}{TOKEN}"), None, &env).expect_err("rejected");
        assert!(
            err.to_string().contains("https_proxy"),
            "says where it came from: {err}"
        );
    }
}
