//! `[admin]`: the admin listener, the key its writes need, and its own small
//! connection limits; and the Host names a client's listener answers to.
//!
//! The admin listener is often bound to every interface (kubelet probes and
//! Prometheus come from the pod network), so it gets its own connection cap, a
//! per-peer cap and short timeouts instead of the proxy listeners' `[limits]`:
//! one neighbour holding idle connections must not starve the probes.

use std::net::SocketAddr;

use super::{ConfigError, Table};
use crate::secret::Secret;

const MAX_ADMIN_CONNECTIONS: usize = 64;
const MAX_ADMIN_CONNECTIONS_PER_IP: usize = 8;
const HOST_HINT: &str =
    "write a host name or host:port the app uses to reach this listener, like \"payments.internal\"";

/// `[admin]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Address of `/metrics`, `/healthz`, `/readyz`, `/status`; default `127.0.0.1:9090`.
    pub listen: SocketAddr,
    /// From `api_key` or `api_key_file`: the bearer key every admin write needs.
    /// Without one, admin writes are refused.
    pub api_key: Option<Secret>,
    /// Open admin connections, 1..=4096; default 64.
    pub max_connections: usize,
    /// Open admin connections from one peer IP, 1..=`max_connections`; default 8.
    pub max_connections_per_ip: usize,
    /// Extra Host names accepted for admin writes (lower case, `host` or `host:port`).
    pub allowed_hosts: Vec<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            api_key: None,
            max_connections: MAX_ADMIN_CONNECTIONS,
            max_connections_per_ip: MAX_ADMIN_CONNECTIONS_PER_IP,
            allowed_hosts: Vec::new(),
        }
    }
}

pub(super) fn build_admin(
    raw: super::file::RawAdmin,
    t: &Table<'_>,
) -> Result<AdminConfig, ConfigError> {
    let d = AdminConfig::default();
    let mut p = super::Problems::default();
    let listen = match raw.listen {
        Some(listen) => p.take(t.listen("listen", &listen)),
        None => Some(d.listen),
    };
    let api_key = p.take(api_key(raw.api_key, raw.api_key_file, t));
    let max_connections = p.take(t.count(
        "max_connections",
        raw.max_connections,
        d.max_connections,
        1..=4096,
    ));
    // Checked against the default limit when max_connections itself is wrong.
    let limit = max_connections.unwrap_or(d.max_connections);
    let max_connections_per_ip = p.take(t.count(
        "max_connections_per_ip",
        raw.max_connections_per_ip,
        d.max_connections_per_ip.min(limit),
        1..=limit,
    ));
    let allowed_hosts = p.take(host_list(t, "allowed_hosts", raw.allowed_hosts));
    let (
        Some(listen),
        Some(api_key),
        Some(max_connections),
        Some(max_connections_per_ip),
        Some(allowed_hosts),
    ) = (
        listen,
        api_key,
        max_connections,
        max_connections_per_ip,
        allowed_hosts,
    )
    else {
        return Err(p.into_error());
    };
    Ok(AdminConfig {
        listen,
        api_key,
        max_connections,
        max_connections_per_ip,
        allowed_hosts,
    })
}

/// `api_key` or `api_key_file`: a key compared as bytes from an
/// Authorization header, so it must be one.
fn api_key(
    value: Option<String>,
    file: Option<String>,
    t: &Table<'_>,
) -> Result<Option<Secret>, ConfigError> {
    let key_name = if file.is_some() {
        "api_key_file"
    } else {
        "api_key"
    };
    let api_key = t.secret("api_key", value, file)?;
    if let Some(key) = &api_key {
        if key.expose().len() < 16 || !key.expose().bytes().all(|b| b.is_ascii_graphic()) {
            return Err(t
                .err(
                    key_name,
                    "must be at least 16 printable ASCII characters without spaces",
                )
                .with_hint("make one with: openssl rand -base64 32"));
        }
    }
    Ok(api_key)
}

/// A list of Host names (`host` or `host:port`), lower-cased; `[]` when unset.
pub(super) fn host_list(
    t: &Table<'_>,
    k: &str,
    raw: Option<Vec<String>>,
) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::new();
    let mut p = super::Problems::default();
    for item in raw.unwrap_or_default() {
        let Some(text) = p.take(t.string(k, &item)) else {
            continue;
        };
        let host = text.trim().to_ascii_lowercase();
        let valid = !host.is_empty()
            && host.parse::<http::uri::Authority>().is_ok()
            && !host.contains(['@', '/', '*']);
        if !valid {
            p.add(
                t.err(k, format!("{text:?} is not a host name or host:port"))
                    .with_hint(HOST_HINT),
            );
        } else if !out.contains(&host) {
            out.push(host);
        }
    }
    p.finish()?;
    Ok(out)
}

/// Clients sharing a listen address share its cross-site rule: the check runs
/// before a request is routed, so they must agree on `allow_cross_site`.
pub(super) fn check_cross_site(clients: &[&super::ClientConfig]) -> super::Problems {
    let mut p = super::Problems::default();
    for (i, c) in clients.iter().enumerate() {
        let differs = clients[..i]
            .iter()
            .find(|o| o.listen == c.listen && o.allow_cross_site != c.allow_cross_site);
        if let Some(other) = differs {
            let problem = format!(
                "is {} but client {:?} on the same listen address {} has {}",
                c.allow_cross_site, other.name, c.listen, other.allow_cross_site
            );
            p.add(
                ConfigError::new(format!("clients.{}.allow_cross_site", c.name), problem)
                    .with_hint("set allow_cross_site the same on every client of one listen address, or give the client its own port"),
            );
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{from_str, Config, ConfigError, MapEnv};

    const CLIENT: &str = r#"
[clients.payments]
listen = "127.0.0.1:8080"
upstream = "https://api.pay.example"

[clients.payments.token]
url = "https://api.pay.example/oauth2/token"
client_id = "id-123"
client_secret = "s"
"#;

    fn env() -> MapEnv {
        MapEnv::new().file("/run/secrets/admin", "admin-key-0123456789abcdef\n")
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        from_str(text, Some(Path::new("tokenproxy.toml")), &env())
    }

    #[test]
    fn the_admin_key_comes_from_a_file_and_never_shows() {
        let c = parse(&format!(
            "[admin]\napi_key_file = \"/run/secrets/admin\"\n{CLIENT}"
        ))
        .expect("valid");
        let key = c.admin.api_key.as_ref().expect("a key");
        assert_eq!(key.expose(), "admin-key-0123456789abcdef");
        assert!(!c.summary().contains("admin-key-0123"), "{}", c.summary());
        assert_eq!(c.admin.max_connections, 64);
        assert_eq!(c.admin.max_connections_per_ip, 8);
    }

    #[test]
    fn a_short_admin_key_or_bad_limits_are_refused_with_their_key() {
        let err = parse(&format!("[admin]\napi_key = \"short\"\n{CLIENT}")).expect_err("short");
        assert_eq!(err.key(), "admin.api_key");
        assert!(!err.to_string().contains("short\""), "{err}");
        let err = parse(&format!(
            "[admin]\nmax_connections = 4\nmax_connections_per_ip = 5\n{CLIENT}"
        ))
        .expect_err("per ip above total");
        assert_eq!(err.key(), "admin.max_connections_per_ip");
        let err =
            parse(&format!("[admin]\nallowed_hosts = [\"a b\"]\n{CLIENT}")).expect_err("bad host");
        assert_eq!(err.key(), "admin.allowed_hosts");
    }

    #[test]
    fn clients_sharing_a_listener_agree_on_cross_site_requests() {
        let client = |name: &str, extra: &str| {
            format!(
                "[clients.{name}]\nlisten = \"127.0.0.1:8080\"\nupstream = \"https://{name}.example\"\n\
                 path_prefix = \"/{name}\"\n{extra}\n[clients.{name}.token]\nurl = \"https://{name}.example/token\"\n\
                 client_id = \"x\"\nclient_secret = \"s\"\n"
            )
        };
        let a = client(
            "payments",
            "allow_cross_site = true\nallowed_hosts = [\"Payments.Internal\"]",
        );
        let err = parse(&format!("{a}{}", client("wallet", ""))).expect_err("disagreeing clients");
        assert_eq!(err.key(), "clients.wallet.allow_cross_site", "{err}");
        let c = parse(&format!(
            "{a}{}",
            client("wallet", "allow_cross_site = true")
        ))
        .expect("agreeing clients");
        assert_eq!(c.clients[0].allowed_hosts, ["payments.internal"]);
        assert!(c.clients[1].allow_cross_site);
    }
}
