//! Which `Host` and browser origin a listener accepts: the defence against DNS
//! rebinding and cross-site requests from a web page.
//!
//! A page on another site can make a browser send requests to `127.0.0.1:8080`
//! (a form POST, or `fetch` in `no-cors` mode), and a page on a name the
//! attacker re-points at 127.0.0.1 can even read the answers. Both carry
//! something an app calling the sidecar does not: a `Host` that is not the
//! listener's, or an `Origin` / `Sec-Fetch-Site: cross-site` naming another
//! site. [`HostRule::check`] refuses those before a request is routed, so
//! nothing reaches the upstream with the client's token.
//!
//! Accepted as `Host` (and as an `Origin`'s host): the listener's own
//! `ip:port`, any loopback IP with the listener's port, `localhost` with it,
//! any IP with it when the listener is bound to every address, and the
//! configured aliases (`host` matches any port, `host:port` only that port).
//! IP literals are safe: a rebinding attack needs a name.

use std::net::{IpAddr, SocketAddr};

use http::header::{HOST, ORIGIN};
use http::{HeaderMap, HeaderName, Response};
use tracing::info;

use crate::error::ProxyError;
use crate::http::body::Body;

/// `Sec-Fetch-Site` (Fetch Metadata): what a browser says about the request's initiator.
static SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

/// The Host names and origins one listener accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRule {
    addr: SocketAddr,
    /// Configured names (lower case, without brackets) and their port, if given.
    aliases: Vec<(String, Option<u16>)>,
    allow_cross_site: bool,
    /// `Host` values accepted as they are, without parsing (lower case): the
    /// listener's own address, `localhost` and `127.0.0.1`, each with and
    /// without the port — what an app beside the sidecar sends on every
    /// request. Each is also accepted by the full check; this only skips the
    /// parsing and allocating it does.
    usual: Vec<String>,
}

impl HostRule {
    /// The rule for a listener bound at `addr`, with extra `aliases`; with
    /// `allow_cross_site`, requests a browser marks as cross-site pass too.
    pub fn new(addr: SocketAddr, aliases: Vec<String>, allow_cross_site: bool) -> Self {
        let aliases = aliases
            .iter()
            .filter_map(|a| a.parse::<http::uri::Authority>().ok())
            .map(|a| (bare_host(&a), a.port_u16()))
            .collect();
        let port = addr.port();
        let own = match addr.ip().to_canonical() {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        };
        let usual = [own, "localhost".to_owned(), "127.0.0.1".to_owned()]
            .into_iter()
            .flat_map(|host| [format!("{host}:{port}"), host])
            .collect();
        HostRule {
            addr,
            aliases,
            allow_cross_site,
            usual,
        }
    }

    /// Whether `authority`, a `Host` value, names this listener. The port is
    /// not compared: DNS rebinding needs the attacker's name, and a client may
    /// reach the listener through a forwarded port.
    pub fn accepts_host(&self, authority: &str) -> bool {
        self.usual
            .iter()
            .any(|usual| usual.eq_ignore_ascii_case(authority))
            || self.names_listener(authority, None)
    }

    /// Whether `authority`, an origin's `host[:port]` (a missing port is
    /// `default_port`), is this listener: also the port must be its own, since
    /// a page on another local port is another origin.
    pub fn accepts_origin(&self, authority: &str, default_port: u16) -> bool {
        self.names_listener(authority, Some(default_port))
    }

    fn names_listener(&self, authority: &str, port_of_origin: Option<u16>) -> bool {
        let Ok(parsed) = authority.parse::<http::uri::Authority>() else {
            return false;
        };
        if parsed.as_str().contains('@') {
            return false;
        }
        let host = bare_host(&parsed);
        let port = parsed.port_u16().or(port_of_origin);
        let alias = self
            .aliases
            .iter()
            .any(|(h, p)| *h == host && (p.is_none() || port.is_none() || *p == port));
        if alias {
            return true;
        }
        if port_of_origin.is_some() && port != Some(self.addr.port()) {
            return false;
        }
        if host == "localhost" {
            return true;
        }
        match host.parse::<IpAddr>() {
            Ok(ip) => {
                let ip = ip.to_canonical();
                ip.is_loopback() || ip == self.addr.ip() || self.addr.ip().is_unspecified()
            }
            Err(_) => false,
        }
    }

    /// `Ok` when `headers` name this listener as `Host` (a request without one,
    /// HTTP/1.0, passes) and, unless cross-site requests are allowed, carry no
    /// sign of a page on another site.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ProxyError> {
        self.check_host(headers)?;
        if self.allow_cross_site {
            return Ok(());
        }
        self.check_same_origin(headers)
    }

    /// [`HostRule::check`] for a whole request: an HTTP/2 request names its host
    /// in the `:authority` of its URI, which is checked as `Host` would be.
    pub fn check_request<B>(&self, req: &http::Request<B>) -> Result<(), ProxyError> {
        if req.version() >= http::Version::HTTP_2 && !req.headers().contains_key(HOST) {
            if let Some(authority) = req.uri().authority() {
                self.check_authority(authority.as_str())?;
            }
        }
        self.check(req.headers())
    }

    /// The `Host` part of [`HostRule::check`] alone.
    pub fn check_host(&self, headers: &HeaderMap) -> Result<(), ProxyError> {
        let Some(host) = headers.get(HOST) else {
            return Ok(());
        };
        self.check_authority(host.to_str().unwrap_or(""))
    }

    fn check_authority(&self, text: &str) -> Result<(), ProxyError> {
        if self.accepts_host(text) {
            Ok(())
        } else {
            Err(ProxyError::MisdirectedHost(printable(text)))
        }
    }

    /// The browser part of [`HostRule::check`] alone: `Sec-Fetch-Site` of
    /// `cross-site` or `same-site` (another port or subdomain), or an `Origin`
    /// that is not this listener, is refused.
    pub fn check_same_origin(&self, headers: &HeaderMap) -> Result<(), ProxyError> {
        if let Some(site) = headers.get(&SEC_FETCH_SITE) {
            let site = site.to_str().unwrap_or("").trim();
            if site.eq_ignore_ascii_case("cross-site") || site.eq_ignore_ascii_case("same-site") {
                return Err(ProxyError::CrossSite(format!(
                    "Sec-Fetch-Site: {}",
                    printable(site)
                )));
            }
        }
        if let Some(origin) = headers.get(ORIGIN) {
            let text = origin.to_str().unwrap_or("").trim();
            let accepted = match text.split_once("://") {
                Some(("http", rest)) => self.accepts_origin(rest, 80),
                Some(("https", rest)) => self.accepts_origin(rest, 443),
                _ => false,
            };
            if !accepted {
                return Err(ProxyError::CrossSite(format!(
                    "Origin: {}",
                    printable(text)
                )));
            }
        }
        Ok(())
    }
}

/// A refusal made by [`HostRule::check`] on a proxy listener, logged like other
/// refused requests.
pub fn refusal_response(e: ProxyError, method: &http::Method, path: &str) -> Response<Body> {
    let response = e.into_response(None);
    info!(
        target: "tokenproxy::access",
        method = %method,
        path = %path,
        status = response.status().as_u16(),
        error = response
            .headers()
            .get(&crate::error::ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
        "refused"
    );
    response
}

/// The host of `authority`, lower case, IPv6 without brackets.
fn bare_host(authority: &http::uri::Authority) -> String {
    authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

/// At most 100 printable ASCII characters of a header value, for an error.
fn printable(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(100)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(addr: &str, aliases: &[&str]) -> HostRule {
        HostRule::new(
            addr.parse().expect("addr"),
            aliases.iter().map(|a| a.to_string()).collect(),
            false,
        )
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        h
    }

    /// The values accepted without parsing are exactly values the full check
    /// accepts: the shortcut never widens what a listener takes as its name.
    #[test]
    fn hosts_accepted_without_parsing_are_accepted_by_the_full_check() {
        for addr in [
            "127.0.0.1:8080",
            "0.0.0.0:80",
            "10.1.2.3:9000",
            "[::1]:8080",
            "[::]:9000",
        ] {
            let r = rule(addr, &[]);
            assert_eq!(r.usual.len(), 6, "{addr}: {:?}", r.usual);
            for usual in &r.usual {
                assert!(r.names_listener(usual, None), "{addr}: {usual}");
                assert!(
                    r.accepts_host(&usual.to_ascii_uppercase()),
                    "{addr}: {usual}"
                );
            }
        }
        let r = rule("127.0.0.1:8080", &[]);
        assert!(r.usual.contains(&"127.0.0.1:8080".to_owned()));
        assert!(r.usual.contains(&"localhost:8080".to_owned()));
        for refused in [
            "127.0.0.1:8080@evil.example",
            "evil.example",
            "127.0.0.1:8080 ",
        ] {
            assert!(!r.accepts_host(refused), "{refused}");
        }
    }

    /// Security review finding 6: only names of this listener are accepted as Host.
    #[test]
    fn host_must_name_the_listener() {
        let r = rule("127.0.0.1:8080", &["payments.internal", "pay.svc:9000"]);
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "127.0.0.2:8080",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:8080",
            "payments.internal",
            "Payments.Internal:1234",
            "pay.svc:9000",
            "pay.svc",
        ] {
            assert!(r.accepts_host(ok), "{ok} should be accepted as Host");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "10.0.0.5:8080",
            "pay.svc:9001",
            "user@localhost:8080",
            "",
            "x",
            "localhost.evil.example:8080",
        ] {
            assert!(!r.accepts_host(bad), "{bad} should be refused as Host");
        }
        let any = rule("0.0.0.0:8080", &[]);
        assert!(
            any.accepts_host("10.0.0.5:8080"),
            "an IP of a 0.0.0.0 listener"
        );
        assert!(!any.accepts_host("evil.example:8080"));
    }

    /// Security review finding 6: an origin is this listener only on its port.
    #[test]
    fn an_origin_must_be_the_listener_with_its_port() {
        let r = rule("127.0.0.1:8080", &["payments.internal"]);
        assert!(r.accepts_origin("localhost:8080", 80));
        assert!(r.accepts_origin("payments.internal", 80));
        assert!(
            !r.accepts_origin("localhost:3000", 80),
            "another local port"
        );
        assert!(
            !r.accepts_origin("localhost", 80),
            "port 80 is another origin"
        );
        assert!(!r.accepts_origin("evil.example:8080", 80));
    }

    /// Security review finding 6: browser requests from another site are refused.
    #[test]
    fn cross_site_requests_are_refused_unless_allowed() {
        let r = rule("127.0.0.1:8080", &[]);
        let host = ("host", "127.0.0.1:8080");
        assert!(r.check(&headers(&[host])).is_ok(), "an app's request");
        assert!(r
            .check(&headers(&[
                host,
                ("origin", "http://localhost:8080"),
                ("sec-fetch-site", "same-origin")
            ]))
            .is_ok());
        assert!(r
            .check(&headers(&[host, ("sec-fetch-site", "none")]))
            .is_ok());
        for refused in [
            ("origin", "http://evil.example"),
            ("origin", "null"),
            ("origin", "http://localhost:3000"),
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-site", "same-site"),
        ] {
            let e = r.check(&headers(&[host, refused])).expect_err("refused");
            assert_eq!(e.code(), "cross_site_request", "{refused:?}");
        }
        let allowing = HostRule::new("127.0.0.1:8080".parse().expect("addr"), vec![], true);
        assert!(allowing
            .check(&headers(&[host, ("origin", "http://evil.example")]))
            .is_ok());
        let e = allowing
            .check(&headers(&[("host", "evil.example")]))
            .expect_err("Host is checked anyway");
        assert_eq!(e.code(), "misdirected_request");
    }
}
