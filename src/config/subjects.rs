//! `[clients.NAME.subjects]`: one token pair per merchant, customer or user of
//! a client, named by the app in a request header.

use std::time::Duration;

use http::{HeaderName, Uri};

use super::file::RawSubjects;
use super::{ConfigError, Table};

const HEADER_HINT: &str = "write it like \"x-tokenproxy-subject\"";
const REVOKE_URL_HINT: &str = "write it like \"https://auth.example/oauth2/revoke\"";

/// Headers that cannot name the subject: credentials, routing, framing, hop-by-hop.
const RESERVED: [&str; 11] = [
    "authorization",
    "proxy-authorization",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "x-request-id",
];

/// What a request without the subject header gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectFallback {
    /// 400 `subject_required`.
    None,
    /// The client's own token (the client has a grant of its own).
    Client,
}

/// `[clients.NAME.subjects]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectsConfig {
    /// The request header naming the subject; stripped before forwarding.
    pub header: HeaderName,
    /// Requests without the header.
    pub fallback: SubjectFallback,
    /// Access tokens held in memory; the rest are read from the store.
    pub max_cached: usize,
    /// Subjects used this recently are refreshed ahead of expiry.
    pub active_window: Duration,
    /// Idle subjects are refreshed at least this often (the sweeper).
    pub refresh_every: Option<Duration>,
    /// Token requests of this client's subjects at once.
    pub max_concurrent_token_requests: usize,
    /// Token requests of this client's subjects per minute.
    pub max_token_requests_per_minute: usize,
    /// RFC 7009 revocation endpoint, called when a subject is deleted.
    pub revoke_url: Option<Uri>,
}

pub(super) fn build_subjects(
    raw: RawSubjects,
    t: &Table<'_>,
) -> Result<SubjectsConfig, ConfigError> {
    let mut p = super::Problems::default();
    let header = match raw.header {
        None => Some(HeaderName::from_static("x-tokenproxy-subject")),
        Some(raw) => p.take(subject_header(&raw, t)),
    };
    let fallbacks = [
        ("none", SubjectFallback::None),
        ("client", SubjectFallback::Client),
    ];
    let fallback = p.take(t.choice(
        "fallback",
        raw.fallback,
        Some(SubjectFallback::None),
        &fallbacks,
    ));
    let max_cached = p.take(t.count("max_cached", raw.max_cached, 10_000, 1..=10_000_000));
    let active_window =
        p.take(t.duration("active_window", raw.active_window, Duration::from_secs(600)));
    let refresh_every = p.take(t.opt_duration("refresh_every", raw.refresh_every, false));
    let max_concurrent_token_requests = p.take(t.count(
        "max_concurrent_token_requests",
        raw.max_concurrent_token_requests,
        4,
        1..=1024,
    ));
    let max_token_requests_per_minute = p.take(t.count(
        "max_token_requests_per_minute",
        raw.max_token_requests_per_minute,
        600,
        1..=1_000_000,
    ));
    let revoke_url = match raw.revoke_url {
        Some(r) => p
            .take(t.url("revoke_url", &r, REVOKE_URL_HINT))
            .map(|(url, _, _)| Some(url)),
        None => Some(None),
    };
    let (
        Some(header),
        Some(fallback),
        Some(max_cached),
        Some(active_window),
        Some(refresh_every),
        Some(max_concurrent_token_requests),
        Some(max_token_requests_per_minute),
        Some(revoke_url),
    ) = (
        header,
        fallback,
        max_cached,
        active_window,
        refresh_every,
        max_concurrent_token_requests,
        max_token_requests_per_minute,
        revoke_url,
    )
    else {
        return Err(p.into_error());
    };
    Ok(SubjectsConfig {
        header,
        fallback,
        max_cached,
        active_window,
        refresh_every,
        max_concurrent_token_requests,
        max_token_requests_per_minute,
        revoke_url,
    })
}

/// `header`: a header name the sidecar neither sets nor manages.
fn subject_header(raw: &str, t: &Table<'_>) -> Result<HeaderName, ConfigError> {
    let text = t.string("header", raw)?;
    let name = HeaderName::from_bytes(text.trim().as_bytes()).map_err(|_| {
        t.err("header", format!("{text:?} is not a header name"))
            .with_hint(HEADER_HINT)
    })?;
    if RESERVED.contains(&name.as_str()) {
        let problem = format!("{name} is a header the sidecar sets or manages itself");
        return Err(t.err("header", problem).with_hint(HEADER_HINT));
    }
    Ok(name)
}
