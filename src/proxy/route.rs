//! Which client a request belongs to: one table per listen address, matched by
//! `path_prefix` (longest first, on a path-segment boundary, then stripped).
//! CONNECT and absolute-form URIs naming another host are refused, so the
//! sidecar can never be used as an open proxy; TRACE is refused, since an
//! upstream that echoes it would echo the injected credential; and a path that
//! any hop could resolve to somewhere else (dot segments, `//`, encoded
//! separators) is refused before the token is attached ([`check_path`]).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request};

use super::ClientRuntime;
use crate::error::ProxyError;

/// One client on a listener, under an optional path prefix.
pub type Route = (Option<String>, Arc<ClientRuntime>);

/// The clients served on one listen address.
pub struct ListenerRoutes {
    addr: SocketAddr,
    /// Sorted by prefix length, longest first; `None` (no prefix) last.
    routes: Vec<Route>,
}

impl ListenerRoutes {
    /// A table for `addr` holding `routes` (prefix, client).
    pub fn new(addr: SocketAddr, mut routes: Vec<Route>) -> Self {
        routes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.as_ref().map_or(0, |p| p.len())));
        ListenerRoutes { addr, routes }
    }

    /// The listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The clients served here, longest path prefix first.
    pub fn client_names(&self) -> Vec<&str> {
        self.routes.iter().map(|(_, c)| c.name.as_str()).collect()
    }

    /// The client for `req` and the path-and-query to send upstream (prefix stripped).
    pub fn route<B>(
        &self,
        req: &Request<B>,
    ) -> Result<(&Arc<ClientRuntime>, PathAndQuery), ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::BadRequest(
                "CONNECT is not supported: tokenproxy forwards only to its configured upstream"
                    .into(),
            ));
        }
        if req.method() == Method::TRACE {
            return Err(ProxyError::MethodNotAllowed(Method::TRACE));
        }
        let uri = req.uri();
        // An HTTP/2 request always names its `:authority` (the Host of HTTP/1, checked
        // by the listener's host rule); only an HTTP/1 absolute form names a target.
        let absolute_form = req.version() < http::Version::HTTP_2;
        if let Some(authority) = uri.authority().filter(|_| absolute_form) {
            if !self.is_own_authority(authority)
                && !self.routes.iter().any(|(_, c)| &c.authority == authority)
            {
                return Err(ProxyError::BadRequest(format!(
                    "absolute-form request for host {} refused: tokenproxy forwards only to its configured upstream",
                    authority.host()
                )));
            }
        }
        let path = uri.path();
        check_path(path).map_err(|p| ProxyError::BadRequest(p.as_str().into()))?;
        for (prefix, client) in &self.routes {
            let rest = match prefix {
                None => Some(path),
                Some(p) => path
                    .strip_prefix(p.as_str())
                    .filter(|rest| rest.is_empty() || rest.starts_with('/')),
            };
            if let Some(rest) = rest {
                // The common case, no prefix and no base path: the app's request target
                // as it is (a reference count, no copy).
                if let Some(pq) = uri.path_and_query() {
                    let joined_len = path.len() + uri.query().map_or(0, |q| q.len() + 1);
                    if client.base_path.is_empty()
                        && rest.len() == path.len()
                        && pq.as_str().len() == joined_len
                    {
                        return Ok((client, pq.clone()));
                    }
                }
                let joined = join(&client.base_path, rest, uri.query());
                let pq = PathAndQuery::from_maybe_shared(Bytes::from(joined)).map_err(|_| {
                    ProxyError::BadRequest("request target is not a valid path".into())
                })?;
                return Ok((client, pq));
            }
        }
        Err(ProxyError::NoRoute {
            path: path.to_owned(),
        })
    }

    fn is_own_authority(&self, authority: &Authority) -> bool {
        let port_matches = authority.port_u16() == Some(self.addr.port());
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        port_matches
            && (host.eq_ignore_ascii_case("localhost")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip == self.addr.ip() || ip.is_loopback()))
    }
}

/// `base` + `rest` (+ `?query`), with exactly one `/` between them.
fn join(base: &str, rest: &str, query: Option<&str>) -> String {
    let mut out =
        String::with_capacity(base.len() + rest.len() + query.map_or(0, |q| q.len() + 1) + 1);
    out.push_str(base);
    if rest.is_empty() {
        if base.is_empty() {
            out.push('/');
        }
    } else {
        out.push_str(rest);
    }
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Why a request path is refused before anything is sent upstream.
///
/// The path is joined to the upstream's base path as it is, so a segment that
/// any hop behind the sidecar may resolve (a gateway that normalizes paths, a
/// framework that decodes `%2F`, Tomcat's `..;`) could climb out of the base
/// path or another client's prefix with the token attached. Rather than guess
/// how each hop normalizes, every form that could move the path is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathProblem {
    /// Not an absolute path (`*`, or no leading `/`).
    NotAbsolute,
    /// `.` or `..`, raw or percent-encoded (in any case, encoded more than once,
    /// or followed by `;params`).
    DotSegment,
    /// `//`: an empty segment some servers collapse and others do not.
    EmptySegment,
    /// `\`, raw or encoded, or an encoded `/`: separators some servers honour.
    Separator,
    /// An encoded NUL or other control character.
    Control,
    /// Still percent-encoded after three decodings.
    OverEncoded,
}

impl PathProblem {
    /// The explanation given to the app.
    pub fn as_str(self) -> &'static str {
        match self {
            PathProblem::NotAbsolute => "the request path must start with /",
            PathProblem::DotSegment => {
                "the request path has a . or .. segment (raw or percent-encoded)"
            }
            PathProblem::EmptySegment => "the request path has an empty segment (//)",
            PathProblem::Separator => "the request path has a backslash or an encoded / or \\",
            PathProblem::Control => "the request path has an encoded control character",
            PathProblem::OverEncoded => "the request path is percent-encoded more than three times",
        }
    }
}

/// Checks that `path` names exactly the resource it spells: see [`PathProblem`].
/// A trailing `/` is allowed.
pub fn check_path(path: &str) -> Result<(), PathProblem> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathProblem::NotAbsolute);
    }
    // The common path has none of the bytes any rule looks at, and no `//`: one
    // pass over the bytes (a substring search costs more than the whole check).
    let mut after_slash = false;
    let plain = bytes.iter().all(|&b| {
        let slash = b == b'/';
        let plain = !(matches!(b, b'.' | b'%' | b'\\' | b';') || slash && after_slash);
        after_slash = slash;
        plain
    });
    if plain {
        return Ok(());
    }
    let segments = path[1..].split('/');
    let count = path[1..].split('/').count();
    for (i, segment) in segments.enumerate() {
        if segment.is_empty() {
            if i + 1 == count {
                continue; // a trailing slash
            }
            return Err(PathProblem::EmptySegment);
        }
        check_segment(segment.as_bytes())?;
    }
    Ok(())
}

/// Decodes `%XX` up to three times (a gateway and the app may each decode once
/// more) and refuses what any of those readings would treat as a dot segment
/// or a separator.
fn check_segment(raw: &[u8]) -> Result<(), PathProblem> {
    let mut current = raw.to_vec();
    for _ in 0..4 {
        if current.contains(&b'\\') || current.contains(&b'/') {
            return Err(PathProblem::Separator);
        }
        if current.iter().any(|&b| b < 0x20 || b == 0x7f) {
            return Err(PathProblem::Control);
        }
        // `..;jsessionid=x` is `..` to servlet containers.
        let name = current
            .split(|&b| b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        if name == b"." || name == b".." {
            return Err(PathProblem::DotSegment);
        }
        if name.is_empty() {
            // `;x` alone: an empty segment to servlet containers.
            return Err(PathProblem::EmptySegment);
        }
        match percent_decode(&current) {
            Some(decoded) => current = decoded,
            None => return Ok(()),
        }
    }
    // Still encoded after three decodings: nothing legitimate looks like that.
    Err(PathProblem::OverEncoded)
}

/// `%XX` decoded once, or `None` when there is nothing to decode.
fn percent_decode(input: &[u8]) -> Option<Vec<u8>> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(input.len());
    let mut changed = false;
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' && i + 2 < input.len() {
            if let (Some(h), Some(l)) = (hex(input[i + 1]), hex(input[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                changed = true;
                continue;
            }
        }
        out.push(input[i]);
        i += 1;
    }
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::{check_path, join, percent_decode, PathProblem};

    /// Security review finding 1: every spelling of a path escape seen in the
    /// review (and its relatives) is refused.
    #[test]
    fn path_escapes_in_every_spelling_are_refused() {
        let refused = [
            ("/pay/../wallet/x", PathProblem::DotSegment),
            ("/../../internal/keys", PathProblem::DotSegment),
            ("/a/./b", PathProblem::DotSegment),
            ("/a/..", PathProblem::DotSegment),
            ("/a/.", PathProblem::DotSegment),
            ("/%2e%2e/x", PathProblem::DotSegment),
            ("/%2E%2E/x", PathProblem::DotSegment),
            ("/.%2e/x", PathProblem::DotSegment),
            ("/%2e./x", PathProblem::DotSegment),
            ("/%2e/x", PathProblem::DotSegment),
            ("/%252e%252e/x", PathProblem::DotSegment),
            ("/..;/x", PathProblem::DotSegment),
            ("/..;jsessionid=1/x", PathProblem::DotSegment),
            ("/..%2Fwallet", PathProblem::Separator),
            ("/..%2fwallet", PathProblem::Separator),
            ("/a%2Fb", PathProblem::Separator),
            ("/a%252Fb", PathProblem::Separator),
            ("/a\\..\\b", PathProblem::Separator),
            ("/a%5cb", PathProblem::Separator),
            ("/a%5Cb", PathProblem::Separator),
            ("//internal/keys", PathProblem::EmptySegment),
            ("/a//b", PathProblem::EmptySegment),
            ("/a%00b", PathProblem::Control),
            ("/%25252525252e", PathProblem::OverEncoded),
            ("*", PathProblem::NotAbsolute),
        ];
        for (path, problem) in refused {
            assert_eq!(check_path(path), Err(problem), "{path} must be refused");
        }
    }

    #[test]
    fn ordinary_paths_pass() {
        for path in [
            "/",
            "/api/v1/payments",
            "/api/v1/payments/",
            "/files/report.v2.pdf",
            "/a/...",
            "/a/.well-known/x",
            "/a/%20b",
            "/search;q=1",
            "/a%2Bb",
            "/100%25",
        ] {
            assert_eq!(check_path(path), Ok(()), "{path} must pass");
        }
    }

    /// RFC 3986 §5.2.4 remove_dot_segments, as a normalizing hop applies it.
    fn remove_dot_segments(path: &str) -> String {
        let mut input = path.to_owned();
        let mut output = String::new();
        while !input.is_empty() {
            if let Some(rest) = input.strip_prefix("../") {
                input = rest.to_owned();
            } else if let Some(rest) = input.strip_prefix("./") {
                input = rest.to_owned();
            } else if input.starts_with("/./") {
                input.replace_range(..3, "/");
            } else if input == "/." {
                input = "/".into();
            } else if input.starts_with("/../") || input == "/.." {
                let len = if input == "/.." { 3 } else { 4 };
                input.replace_range(..len, "/");
                match output.rfind('/') {
                    Some(i) => output.truncate(i),
                    None => output.clear(),
                }
            } else if input == "." || input == ".." {
                input.clear();
            } else {
                let start = usize::from(input.starts_with('/'));
                let end = input[start..].find('/').map_or(input.len(), |i| i + start);
                output.push_str(&input[..end]);
                input.replace_range(..end, "");
            }
        }
        output
    }

    /// The path rule as a property, over every path of up to five characters
    /// from an alphabet of the characters that matter: whatever a hop behind
    /// the sidecar does to an accepted path (decode it up to three times, read
    /// `\` as `/`, drop `;params`, collapse `//`, remove dot segments), the
    /// result keeps every segment and stays under the base path.
    #[test]
    fn an_accepted_path_stays_under_the_base_path_however_it_is_normalized() {
        const ALPHABET: &[u8] = b"/.%2eEf5c;a\\";
        const BASE: &str = "/v2/payments";
        let mut path = vec![b'/'];
        let mut accepted = 0usize;
        fn visit(path: &mut Vec<u8>, depth: usize, accepted: &mut usize) {
            let text = std::str::from_utf8(path).expect("ascii");
            if check_path(text).is_ok() {
                *accepted += 1;
                let mut reading = text.as_bytes().to_vec();
                for _ in 0..4 {
                    let as_text = String::from_utf8_lossy(&reading).replace('\\', "/");
                    let without_params: String = as_text
                        .split('/')
                        .map(|s| s.split(';').next().unwrap_or_default())
                        .collect::<Vec<_>>()
                        .join("/");
                    for candidate in [as_text.clone(), without_params] {
                        let joined = format!("{BASE}{candidate}");
                        let normalized = remove_dot_segments(&joined.replace("//", "/"));
                        assert!(
                            normalized == BASE || normalized.starts_with(&format!("{BASE}/")),
                            "{text} was accepted but a hop can read it as {normalized}"
                        );
                        assert_eq!(
                            normalized[BASE.len()..].matches('/').count(),
                            text.matches('/').count(),
                            "{text} keeps its segments when read as {normalized}"
                        );
                    }
                    match percent_decode(&reading) {
                        Some(next) => reading = next,
                        None => break,
                    }
                }
            }
            if depth == 0 {
                return;
            }
            for &c in ALPHABET {
                path.push(c);
                visit(path, depth - 1, accepted);
                path.pop();
            }
        }
        visit(&mut path, 5, &mut accepted);
        assert!(
            accepted > 10_000,
            "the alphabet exercises accepted paths too ({accepted})"
        );
    }

    #[test]
    fn join_keeps_single_slashes_and_the_query() {
        assert_eq!(join("", "/a/b", Some("x=1")), "/a/b?x=1");
        assert_eq!(join("/v1", "/a", None), "/v1/a");
        assert_eq!(join("/v1", "", None), "/v1");
        assert_eq!(join("", "", None), "/");
    }
}
