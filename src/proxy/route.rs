//! Which client a request belongs to: one table per listen address, matched by
//! `path_prefix` (longest first, on a path-segment boundary, then stripped).
//! CONNECT and absolute-form URIs naming another host are refused, so the
//! sidecar can never be used as an open proxy.

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
        let uri = req.uri();
        if let Some(authority) = uri.authority() {
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

#[cfg(test)]
mod tests {
    use super::join;

    #[test]
    fn join_keeps_single_slashes_and_the_query() {
        assert_eq!(join("", "/a/b", Some("x=1")), "/a/b?x=1");
        assert_eq!(join("/v1", "/a", None), "/v1/a");
        assert_eq!(join("/v1", "", None), "/v1");
        assert_eq!(join("", "", None), "/");
    }
}
