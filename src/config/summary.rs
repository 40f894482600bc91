//! The redacted summary `tokenproxy check` prints.

use super::*;

impl Config {
    /// A multi-line summary for `tokenproxy check`; secrets show as `[redacted]`.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_summary(&mut out);
        out
    }

    fn write_summary(&self, out: &mut String) -> fmt::Result {
        let source = self
            .source
            .as_ref()
            .map_or_else(|| "(inline)".to_owned(), |p| p.display().to_string());
        let n = self.clients.len();
        let plural = if n == 1 { "" } else { "s" };
        writeln!(out, "config {source}: ok, {n} client{plural}")?;
        writeln!(out, "admin")?;
        row(out, "listen", self.admin.listen)?;
        row(out, "api_key", secret_text(self.admin.api_key.as_ref()))?;
        row(out, "max_connections", self.admin.max_connections)?;
        row(
            out,
            "max_connections_per_ip",
            self.admin.max_connections_per_ip,
        )?;
        writeln!(out, "log")?;
        row(out, "level", &self.log.level)?;
        row(out, "format", self.log.format.as_str())?;
        let l = &self.limits;
        writeln!(out, "limits")?;
        row(out, "header_read_timeout", dur(l.header_read_timeout))?;
        row(out, "max_header_bytes", size_text(l.max_header_bytes))?;
        row(out, "max_headers", l.max_headers)?;
        row(out, "idle_timeout", dur(l.idle_timeout))?;
        row(out, "max_connections", l.max_connections)?;
        row(out, "shutdown_grace", dur(l.shutdown_grace))?;
        row(out, "body_timeout", dur(l.body_timeout))?;
        row(
            out,
            "body_min_rate",
            format!("{}/s", size_text(l.body_min_rate)),
        )?;
        row(out, "max_buffered_bytes", size_text(l.max_buffered_bytes))?;
        row(
            out,
            "http2_max_concurrent_streams",
            l.http2_max_concurrent_streams,
        )?;
        match l.http2_keepalive_interval {
            Some(d) => row(out, "http2_keepalive_interval", dur(d))?,
            None => row(out, "http2_keepalive_interval", "off")?,
        }
        row(out, "upgrade_idle_timeout", dur(l.upgrade_idle_timeout))?;
        row(out, "preserve_header_case", l.preserve_header_case)?;
        writeln!(out, "runtime")?;
        match self.runtime.workers {
            Some(n) => row(out, "workers", n)?,
            None => row(out, "workers", "auto")?,
        }
        writeln!(out, "store")?;
        row(out, "kind", self.store.kind())?;
        match &self.store {
            StoreConfig::Memory => {}
            StoreConfig::File(f) => {
                row(out, "path", f.path.display())?;
                row(out, "key", "[redacted]")?;
            }
            StoreConfig::Redis(r) => {
                row(out, r.location_key(), &r.display_url)?;
                row(out, "key_prefix", &r.key_prefix)?;
                row(out, "key", "[redacted]")?;
                if let Some(u) = &r.username {
                    row(out, "username", u)?;
                }
                if r.password.is_some() {
                    row(out, "password", "[redacted]")?;
                }
                if r.ca_pem.is_some() {
                    row(out, "ca_file", "set")?;
                }
            }
        }
        if let Some(c) = &self.connect {
            writeln!(out, "connect")?;
            row(out, "listen", c.listen)?;
            row(out, "public_url", &c.public_url)?;
            row(out, "redirect_uri", &c.redirect_uri)?;
            row(out, "return_to", format!("[{}]", c.return_to.join(", ")))?;
            row(out, "session_ttl", dur(c.session_ttl))?;
        }
        for c in &self.clients {
            c.write_summary(out)?;
        }
        Ok(())
    }
}

impl ClientConfig {
    fn write_summary(&self, out: &mut String) -> fmt::Result {
        let t = &self.token;
        writeln!(out, "client {}", self.name)?;
        let prefix = self.path_prefix.as_deref().unwrap_or("");
        let route = format!("{}{prefix} -> {}", self.listen, self.upstream.as_string());
        row(out, "listen", route)?;
        row(out, "timeout", dur(self.timeout))?;
        row(out, "token_wait_timeout", dur(self.token_wait_timeout))?;
        row(out, "retry_body_limit", size_text(self.retry_body_limit))?;
        let codes: Vec<String> = self
            .unauthorized_status
            .iter()
            .map(|c| c.as_u16().to_string())
            .collect();
        row(
            out,
            "unauthorized_status",
            format!("[{}]", codes.join(", ")),
        )?;
        let keys: Vec<&str> = self
            .idempotency_headers
            .iter()
            .map(|h| h.as_str())
            .collect();
        row(out, "idempotency_headers", format!("[{}]", keys.join(", ")))?;
        row(
            out,
            "replay_non_idempotent",
            self.replay_non_idempotent.to_string(),
        )?;
        if self.http2 {
            row(out, "http2", "true")?;
        }
        if !self.rewrite_location {
            row(out, "rewrite_location", "false")?;
        }
        let upgrades = if self.upgrades.is_empty() {
            "(none)".to_owned()
        } else {
            format!("[{}]", self.upgrades.join(", "))
        };
        row(out, "upgrades", upgrades)?;
        if !self.allow_insecure.is_empty() {
            let waived: Vec<&str> = self.allow_insecure.iter().map(|v| v.as_str()).collect();
            row(out, "allow_insecure", format!("[{}]", waived.join(", ")))?;
        }
        row(out, "token.url", crate::secret::display_url(&t.url))?;
        row(out, "token.grant", t.grant.as_str())?;
        if let Grant::Password { username, password } = &t.grant {
            row(out, "token.username", username)?;
            row(out, "token.password", password)?;
        }
        row(
            out,
            "token.client_id",
            t.client_id.as_deref().unwrap_or("(none)"),
        )?;
        row(
            out,
            "token.client_secret",
            secret_text(t.client_secret.as_ref()),
        )?;
        row(out, "token.client_auth", t.client_auth.as_str())?;
        write_assertion(out, t.assertion.as_ref())?;
        row(out, "token.body", t.body.as_str())?;
        row(out, "token.scope", t.scope.as_deref().unwrap_or("(none)"))?;
        row(
            out,
            "token.refresh_token",
            secret_text(t.refresh_token.as_ref()),
        )?;
        let refresh_url = t
            .refresh_url
            .as_ref()
            .map_or_else(|| "(token.url)".to_owned(), crate::secret::display_url);
        row(out, "token.refresh_url", refresh_url)?;
        let before = t
            .refresh_before
            .map_or_else(|| "(computed)".to_owned(), dur);
        row(out, "token.refresh_before", before)?;
        let lifetime = t.default_lifetime.map_or_else(|| "(none)".to_owned(), dur);
        row(out, "token.default_lifetime", lifetime)?;
        let rt_lifetime = t
            .refresh_token_lifetime
            .map_or_else(|| "(until rejected)".to_owned(), dur);
        row(out, "token.refresh_token_lifetime", rt_lifetime)?;
        // Only the names: a parameter value may well be a credential.
        let names: Vec<&str> = t.params.iter().map(|(k, _)| k.as_str()).collect();
        let params = if names.is_empty() {
            "(none)".to_owned()
        } else {
            format!("{} (values not shown)", names.join(", "))
        };
        row(out, "token.params", params)?;
        row(out, "token.timeout", dur(t.timeout))?;
        write_quirks(out, t)?;
        row(out, "token.tls", t.tls.summary())?;
        row(out, "tls", self.tls.summary())?;
        row(out, "proxy", self.proxy.summary())?;
        if let Some(a) = &self.authorize {
            let url = format!(
                "{}://{}{}",
                a.url.scheme_str().unwrap_or("https"),
                a.url.authority().map(|x| x.as_str()).unwrap_or(""),
                a.url.path()
            );
            row(out, "authorize.url", url)?;
            row(out, "authorize.redirect_uri", &a.redirect_uri)?;
            row(out, "authorize.pkce", if a.pkce { "S256" } else { "off" })?;
        }
        if let Some(s) = &self.subjects {
            row(out, "subjects.header", s.header.as_str())?;
            let fallback = match s.fallback {
                SubjectFallback::None => "none (subject_required)",
                SubjectFallback::Client => "client (the client's own token)",
            };
            row(out, "subjects.fallback", fallback)?;
            row(out, "subjects.max_cached", s.max_cached)?;
            row(out, "subjects.active_window", dur(s.active_window))?;
            let every = s.refresh_every.map_or_else(|| "(not set)".to_owned(), dur);
            row(out, "subjects.refresh_every", every)?;
            let budget = format!(
                "{} at once, {} per minute",
                s.max_concurrent_token_requests, s.max_token_requests_per_minute
            );
            row(out, "subjects.token budget", budget)?;
            let revoke = s
                .revoke_url
                .as_ref()
                .map_or_else(|| "(none)".to_owned(), crate::secret::display_url);
            row(out, "subjects.revoke_url", revoke)?;
        }
        if let Some(d) = &self.dpop {
            let key = format!(
                "{} key, made once and sealed in the store; a new proof per request",
                d.alg
            );
            row(out, "dpop", key)?;
        }
        let i = &self.inject;
        row(
            out,
            "inject",
            format!("{}: {}<token>{}", i.header, i.prefix, i.suffix),
        )
    }
}

/// The rows of `check` for provider quirks, only when configured: header
/// values unless marked sensitive, the response mapping, the error rules.
fn write_quirks(out: &mut String, t: &TokenConfig) -> fmt::Result {
    if !t.headers.is_empty() {
        let shown: Vec<String> = t
            .headers
            .iter()
            .map(|(name, value)| match value.to_str() {
                Ok(v) if !value.is_sensitive() => format!("{name}: {v}"),
                _ => format!("{name}: [redacted]"),
            })
            .collect();
        row(out, "token.headers", shown.join(", "))?;
    }
    if !t.response.is_standard() {
        let mut shown: Vec<String> = t
            .response
            .fields()
            .map(|(key, path)| format!("{key} <- {path}"))
            .collect();
        let units = [
            ("expires_at_unit", t.response.expires_at_unit),
            (
                "refresh_token_expires_at_unit",
                t.response.refresh_token_expires_at_unit,
            ),
        ];
        for (key, unit) in units {
            if let Some(unit) = unit {
                shown.push(format!("{key} = {}", unit.as_str()));
            }
        }
        row(out, "token.response", shown.join(", "))?;
    }
    for (i, rule) in t.errors.iter().enumerate() {
        let mut when: Vec<String> = Vec::new();
        if let Some(status) = rule.status {
            when.push(format!("status {}", status.as_u16()));
        }
        if let Some(error) = &rule.error {
            when.push(format!("error {error:?}"));
        }
        if let Some(text) = &rule.body_contains {
            when.push(format!("body contains {text:?}"));
        }
        let line = format!("{} -> {}", when.join(" and "), rule.means.as_str());
        row(out, &format!("token.errors[{i}]"), line)?;
    }
    Ok(())
}

/// The assertion rows of `check`: where the key or assertion comes from, never either.
fn write_assertion(out: &mut String, assertion: Option<&ClientAssertion>) -> fmt::Result {
    match assertion {
        None => Ok(()),
        Some(ClientAssertion::File {
            path,
            assertion_type,
        }) => {
            let file = format!("{} (read for every request)", path.display());
            row(out, "token.client_assertion_file", file)?;
            row(out, "token.client_assertion_type", assertion_type)
        }
        Some(ClientAssertion::Signed(s)) => {
            let source = match &s.key_file {
                Some(path) => format!("{} from {}", s.key.kind().as_str(), path.display()),
                None => "token.client_secret".to_owned(),
            };
            let key = format!("{}, {source} [key redacted]", s.key.alg());
            row(out, "token.signing_key", key)?;
            row(out, "token.key_id", s.key_id.as_deref().unwrap_or("(none)"))?;
            if let (Some(path), Some(x5t)) = (&s.certificate_file, &s.x5t_s256) {
                row(out, "token.x5t#S256", format!("{x5t} ({})", path.display()))?;
            }
            let audience = s.audience.as_deref().unwrap_or("(the URL of each request)");
            row(out, "token.assertion_audience", audience)?;
            let lifetime = format!("{}, a new jti for every request", dur(ASSERTION_LIFETIME));
            row(out, "token.assertion lifetime", lifetime)
        }
    }
}

pub(super) fn row(out: &mut String, key: &str, value: impl fmt::Display) -> fmt::Result {
    writeln!(out, "  {key:<30}{value}")
}

pub(super) fn dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

pub(super) fn secret_text(s: Option<&Secret>) -> String {
    s.map_or_else(|| "(none)".to_owned(), |s| s.to_string())
}

/// A size as a round, re-parsable bytesize string.
pub(super) fn size_text(n: usize) -> String {
    match n {
        0 => "0".to_owned(),
        n if n % MIB == 0 => format!("{}MiB", n / MIB),
        n if n % KIB == 0 => format!("{}KiB", n / KIB),
        n => n.to_string(),
    }
}
