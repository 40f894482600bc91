//! `Location` and `Content-Location` of upstream responses, rewritten so that an
//! app following them comes back through the sidecar, as nginx's default
//! `proxy_redirect` does.
//!
//! An absolute URL naming the upstream's origin (scheme, host and port, the
//! default port when none is written) under its base path becomes
//! `http://` + the host the app addressed + the client's path prefix + the rest
//! of the path, query and fragment unchanged. Anything else stays as the
//! upstream wrote it: a relative reference (it resolves against the URL the app
//! used, which already is the sidecar's), another host, another path on the
//! upstream's host, a URL with userinfo. The sidecar itself never follows one.

use std::net::SocketAddr;

use http::header::{HeaderMap, HeaderValue, CONTENT_LOCATION, LOCATION};
use http::uri::{Authority, Scheme};

/// How the app addressed the sidecar: its `Host`, or the `:authority` of an
/// HTTP/2 request.
#[derive(Debug, Default)]
pub enum AppHost {
    /// Neither (an HTTP/1.0 request without `Host`): the listen address is used.
    #[default]
    Unknown,
    /// The request's `Host` header.
    Header(HeaderValue),
    /// The request's `:authority`.
    Authority(Authority),
}

impl AppHost {
    fn as_str(&self) -> Option<&str> {
        match self {
            AppHost::Unknown => None,
            AppHost::Header(value) => value.to_str().ok(),
            AppHost::Authority(authority) => Some(authority.as_str()),
        }
    }
}

/// The rewrite rule of one client.
#[derive(Debug)]
pub struct LocationRewrite {
    scheme: Scheme,
    host: String,
    port: u16,
    base_path: String,
    path_prefix: String,
    listen: String,
}

impl LocationRewrite {
    /// The rule for an upstream at `scheme://authority` + `base_path` (no
    /// trailing `/`), served to the app under `path_prefix` on `listen`.
    pub fn new(
        scheme: &Scheme,
        authority: &Authority,
        base_path: &str,
        path_prefix: Option<&str>,
        listen: SocketAddr,
    ) -> Self {
        LocationRewrite {
            scheme: scheme.clone(),
            host: authority.host().to_ascii_lowercase(),
            port: authority
                .port_u16()
                .unwrap_or_else(|| default_port(scheme.as_str())),
            base_path: base_path.to_owned(),
            path_prefix: path_prefix.unwrap_or("").to_owned(),
            listen: listen.to_string(),
        }
    }

    /// Rewrites the `Location` and `Content-Location` of `headers` that name
    /// the upstream, for an app that addressed the sidecar as `app`.
    pub fn apply(&self, headers: &mut HeaderMap, app: &AppHost) {
        for name in [LOCATION, CONTENT_LOCATION] {
            let Some(value) = headers.get(&name) else {
                continue;
            };
            let host = app.as_str().unwrap_or(&self.listen);
            if let Some(rewritten) = self.rewrite(value.as_bytes(), host) {
                headers.insert(name, rewritten);
            }
        }
    }

    /// `location` pointed at the sidecar reached as `host`, if it names the upstream.
    fn rewrite(&self, location: &[u8], host: &str) -> Option<HeaderValue> {
        let location = std::str::from_utf8(location).ok()?;
        let (scheme, rest) = location.split_once("://")?;
        if !scheme.eq_ignore_ascii_case(self.scheme.as_str()) {
            return None;
        }
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, rest) = rest.split_at(authority_end);
        if authority.contains('@') {
            return None;
        }
        let authority: Authority = authority.parse().ok()?;
        let port = authority.port_u16().unwrap_or_else(|| default_port(scheme));
        if !authority.host().eq_ignore_ascii_case(&self.host) || port != self.port {
            return None;
        }
        let path_end = rest.find(['?', '#']).unwrap_or(rest.len());
        let (path, tail) = rest.split_at(path_end);
        let under = path.strip_prefix(self.base_path.as_str())?;
        if !(under.is_empty() || under.starts_with('/')) {
            return None;
        }
        let mut out = String::with_capacity(
            "http://".len() + host.len() + self.path_prefix.len() + under.len() + tail.len() + 1,
        );
        out.push_str("http://");
        out.push_str(host);
        out.push_str(&self.path_prefix);
        out.push_str(under);
        if self.path_prefix.is_empty() && under.is_empty() {
            out.push('/');
        }
        out.push_str(tail);
        HeaderValue::from_str(&out).ok()
    }
}

fn default_port(scheme: &str) -> u16 {
    if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        80
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(upstream: &str, prefix: Option<&str>) -> LocationRewrite {
        let uri: http::Uri = upstream.parse().expect("uri");
        LocationRewrite::new(
            uri.scheme().expect("scheme"),
            uri.authority().expect("authority"),
            uri.path().trim_end_matches('/'),
            prefix,
            "127.0.0.1:8080".parse().expect("addr"),
        )
    }

    fn rewritten(rule: &LocationRewrite, location: &str) -> Option<String> {
        rule.rewrite(location.as_bytes(), "localhost:8080")
            .map(|v| v.to_str().expect("text").to_owned())
    }

    #[test]
    fn the_upstreams_own_urls_lead_back_to_the_sidecar() {
        let r = rule("https://api.pay.example/v2", None);
        for (location, expected) in [
            (
                "https://api.pay.example/v2/payments/7",
                "http://localhost:8080/payments/7",
            ),
            (
                "HTTPS://API.Pay.Example:443/v2/p?a=1#f",
                "http://localhost:8080/p?a=1#f",
            ),
            ("https://api.pay.example/v2", "http://localhost:8080/"),
            ("https://api.pay.example/v2?x", "http://localhost:8080/?x"),
            ("https://api.pay.example/v2/", "http://localhost:8080/"),
        ] {
            assert_eq!(
                rewritten(&r, location).as_deref(),
                Some(expected),
                "{location}"
            );
        }
        let prefixed = rule("http://127.0.0.1:9000", Some("/pay"));
        assert_eq!(
            rewritten(&prefixed, "http://127.0.0.1:9000/").as_deref(),
            Some("http://localhost:8080/pay/")
        );
        assert_eq!(
            rewritten(&prefixed, "http://127.0.0.1:9000").as_deref(),
            Some("http://localhost:8080/pay")
        );
    }

    #[test]
    fn other_places_are_left_alone() {
        let r = rule("https://api.pay.example/v2", None);
        for location in [
            "/v2/payments/7",
            "payments/7",
            "//api.pay.example/v2/x",
            "http://api.pay.example/v2/x",
            "https://api.pay.example:8443/v2/x",
            "https://other.example/v2/x",
            "https://api.pay.example.evil/v2/x",
            "https://api.pay.example/v20/x",
            "https://api.pay.example/x",
            "https://user@api.pay.example/v2/x",
            "https://[::1/v2",
        ] {
            assert_eq!(rewritten(&r, location), None, "{location}");
        }
    }

    #[test]
    fn the_app_host_is_the_one_it_used_and_else_the_listen_address() {
        let r = rule("http://127.0.0.1:9000", None);
        let mut headers = HeaderMap::new();
        headers.insert(
            LOCATION,
            HeaderValue::from_static("http://127.0.0.1:9000/a"),
        );
        headers.insert(
            CONTENT_LOCATION,
            HeaderValue::from_static("http://127.0.0.1:9000/b"),
        );
        r.apply(&mut headers, &AppHost::Unknown);
        assert_eq!(headers[LOCATION], "http://127.0.0.1:8080/a");
        assert_eq!(headers[CONTENT_LOCATION], "http://127.0.0.1:8080/b");
        headers.insert(
            LOCATION,
            HeaderValue::from_static("http://127.0.0.1:9000/a"),
        );
        r.apply(
            &mut headers,
            &AppHost::Authority("payments.internal:8080".parse().expect("authority")),
        );
        assert_eq!(headers[LOCATION], "http://payments.internal:8080/a");
    }
}
