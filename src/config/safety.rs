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

/// The client's own refusals: cleartext token endpoints and upstream, a public listener.
pub(super) fn check_client(
    t: &Table<'_>,
    c: &ClientConfig,
    allowed: &[Insecure],
) -> Result<(), ConfigError> {
    if !allowed.contains(&Insecure::PublicListen) && !c.listen.ip().is_loopback() {
        let problem = format!(
            "{} is not a loopback address: anyone who can reach it can spend this client's credential",
            c.listen
        );
        let hint = allow_hint(
            t,
            "listen on 127.0.0.1 beside the app",
            Insecure::PublicListen,
        );
        return Err(t.err("listen", problem).with_hint(hint));
    }
    if !allowed.contains(&Insecure::CleartextUpstream)
        && c.upstream.scheme == Scheme::HTTP
        && !is_loopback_host(c.upstream.authority.host())
    {
        let problem = format!(
            "http://{} is plain http to a host that is not loopback: every bearer token would cross the network in cleartext",
            c.upstream.authority.host()
        );
        let hint = allow_hint(t, "use https://", Insecure::CleartextUpstream);
        return Err(t.err("upstream", problem).with_hint(hint));
    }
    if allowed.contains(&Insecure::CleartextTokenUrl) {
        return Ok(());
    }
    let urls = [
        ("token.url", Some(&c.token.url)),
        ("token.refresh_url", c.token.refresh_url.as_ref()),
        ("authorize.url", c.authorize.as_ref().map(|a| &a.url)),
        (
            "subjects.revoke_url",
            c.subjects.as_ref().and_then(|s| s.revoke_url.as_ref()),
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
            return Err(t.err(k, problem).with_hint(hint));
        }
    }
    Ok(())
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
