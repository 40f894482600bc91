//! Refusals of setups that would leak a credential, and `allow_insecure`, the
//! per-client key that accepts them knowingly.
//!
//! A client secret or password sent over plain http, bearer tokens forwarded
//! over plain http, or a listener others can reach each hand the credential to
//! whoever is on the path; `check` refuses them unless the client lists the
//! matching [`Insecure`] value.

use super::*;

/// One value of `clients.NAME.allow_insecure`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insecure {
    /// `cleartext_token_url`: token, refresh, revoke or authorize URLs over plain http to another host.
    CleartextTokenUrl,
    /// `cleartext_upstream`: an `http://` upstream on another host.
    CleartextUpstream,
    /// `public_listen`: a client listener on a non-loopback address.
    PublicListen,
}

impl Insecure {
    const ALL: [Insecure; 3] = [
        Insecure::CleartextTokenUrl,
        Insecure::CleartextUpstream,
        Insecure::PublicListen,
    ];

    /// The config spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Insecure::CleartextTokenUrl => "cleartext_token_url",
            Insecure::CleartextUpstream => "cleartext_upstream",
            Insecure::PublicListen => "public_listen",
        }
    }
}

/// `allow_insecure`: a list of [`Insecure`] spellings, without duplicates.
pub(super) fn allow_insecure(
    t: &Table<'_>,
    raw: Option<Vec<String>>,
) -> Result<Vec<Insecure>, ConfigError> {
    const K: &str = "allow_insecure";
    let mut out = Vec::new();
    for item in raw.unwrap_or_default() {
        let text = t.string(K, &item)?;
        let Some(value) = Insecure::ALL.iter().find(|v| v.as_str() == text.trim()) else {
            let names: Vec<String> = Insecure::ALL
                .iter()
                .map(|v| format!("{:?}", v.as_str()))
                .collect();
            return Err(t
                .err(K, format!("{text:?} is not an accepted value"))
                .with_hint(format!("use any of {}", names.join(", "))));
        };
        if !out.contains(value) {
            out.push(*value);
        }
    }
    Ok(out)
}

/// True for `localhost` and addresses in 127.0.0.0/8 or ::1; any other name may resolve anywhere.
pub(super) fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => bare.eq_ignore_ascii_case("localhost"),
    }
}

fn allow_hint(t: &Table<'_>, safe: &str, value: Insecure) -> String {
    format!(
        "{safe}, or, if that network path is trusted, add \"{}\" to {}",
        value.as_str(),
        t.key("allow_insecure")
    )
}

/// What of a client the refusals judge; `None` for a part that did not
/// validate (it is not judged).
pub(super) struct Exposure<'a> {
    pub(super) listen: Option<SocketAddr>,
    pub(super) upstream: Option<&'a UpstreamUrl>,
    pub(super) token: Option<&'a TokenConfig>,
    pub(super) authorize: Option<&'a AuthorizeConfig>,
    pub(super) subjects: Option<&'a SubjectsConfig>,
}

/// The client's own refusals, every one of them: cleartext token endpoints
/// and upstream, a public listener.
pub(super) fn check_client(
    t: &Table<'_>,
    c: &Exposure<'_>,
    allowed: &[Insecure],
) -> Result<(), ConfigError> {
    let mut p = Problems::default();
    if let Some(listen) = c.listen {
        if !allowed.contains(&Insecure::PublicListen) && !listen.ip().is_loopback() {
            let problem = format!(
                "{listen} is not a loopback address: anyone who can reach it can spend this client's credential"
            );
            let hint = allow_hint(
                t,
                "listen on 127.0.0.1 beside the app",
                Insecure::PublicListen,
            );
            p.add(t.err("listen", problem).with_hint(hint));
        }
    }
    if let Some(upstream) = c.upstream {
        if !allowed.contains(&Insecure::CleartextUpstream)
            && upstream.scheme == Scheme::HTTP
            && !is_loopback_host(upstream.authority.host())
        {
            let problem = format!(
                "http://{} is plain http to a host that is not loopback: every bearer token would cross the network in cleartext",
                upstream.authority.host()
            );
            let hint = allow_hint(t, "use https://", Insecure::CleartextUpstream);
            p.add(t.err("upstream", problem).with_hint(hint));
        }
    }
    if allowed.contains(&Insecure::CleartextTokenUrl) {
        return p.finish();
    }
    let urls = [
        ("token.url", c.token.map(|t| &t.url)),
        (
            "token.refresh_url",
            c.token.and_then(|t| t.refresh_url.as_ref()),
        ),
        ("authorize.url", c.authorize.map(|a| &a.url)),
        (
            "subjects.revoke_url",
            c.subjects.and_then(|s| s.revoke_url.as_ref()),
        ),
    ];
    for (k, url) in urls {
        let Some(url) = url else { continue };
        let host = url.host().unwrap_or("");
        if url.scheme() == Some(&Scheme::HTTP) && !is_loopback_host(host) {
            // Only scheme and host: a query may carry a key.
            let problem = format!(
                "http://{host} is plain http to a host that is not loopback: credentials and tokens would cross the network in cleartext"
            );
            let hint = allow_hint(t, "use https://", Insecure::CleartextTokenUrl);
            p.add(t.err(k, problem).with_hint(hint));
        }
    }
    p.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_localhost_127_0_0_0_8_and_ipv6_one() {
        for host in [
            "localhost",
            "LOCALHOST",
            "127.0.0.1",
            "127.9.8.7",
            "[::1]",
            "::1",
        ] {
            assert!(is_loopback_host(host), "{host} should count as loopback");
        }
        for host in [
            "10.0.0.1",
            "0.0.0.0",
            "[::]",
            "auth.example",
            "localhost.example",
            "128.0.0.1",
        ] {
            assert!(
                !is_loopback_host(host),
                "{host} should not count as loopback"
            );
        }
    }
}
