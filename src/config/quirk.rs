//! Provider quirks, by configuration: extra headers on every token request
//! (`token.headers`), where a non-standard token response keeps its fields
//! (`[clients.NAME.token.response]`), and what a provider's error answers mean
//! when their status says otherwise (`[[clients.NAME.token.errors]]`).

use super::file::{RawErrorRule, RawResponse};
use super::*;

/// `[clients.NAME.token.response]`: where a token response keeps each field and
/// in which unit it states absolute expiries. An unset field is looked up under
/// its standard names (snake_case and camelCase); a set one only where it says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseMapping {
    /// `access_token`.
    pub access_token: Option<FieldPath>,
    /// `refresh_token`.
    pub refresh_token: Option<FieldPath>,
    /// `token_type`.
    pub token_type: Option<FieldPath>,
    /// `scope`.
    pub scope: Option<FieldPath>,
    /// `expires_in`: the access token's lifetime in seconds.
    pub expires_in: Option<FieldPath>,
    /// `expires_at`: when the access token expires.
    pub expires_at: Option<FieldPath>,
    /// `expires_at_unit`; `None` reads RFC 3339 or epoch seconds (milliseconds
    /// when too large for seconds), whichever the value looks like.
    pub expires_at_unit: Option<TimestampUnit>,
    /// `refresh_token_expires_in`: the refresh token's lifetime in seconds.
    pub refresh_token_expires_in: Option<FieldPath>,
    /// `refresh_token_expires_at`: when the refresh token expires.
    pub refresh_token_expires_at: Option<FieldPath>,
    /// `refresh_token_expires_at_unit`; `None` as for `expires_at_unit`.
    pub refresh_token_expires_at_unit: Option<TimestampUnit>,
}

impl ResponseMapping {
    /// Every mapped field as (key, path).
    pub fn fields(&self) -> impl Iterator<Item = (&'static str, &FieldPath)> {
        [
            ("access_token", &self.access_token),
            ("refresh_token", &self.refresh_token),
            ("token_type", &self.token_type),
            ("scope", &self.scope),
            ("expires_in", &self.expires_in),
            ("expires_at", &self.expires_at),
            ("refresh_token_expires_in", &self.refresh_token_expires_in),
            ("refresh_token_expires_at", &self.refresh_token_expires_at),
        ]
        .into_iter()
        .filter_map(|(key, path)| path.as_ref().map(|p| (key, p)))
    }

    /// True when nothing is mapped: the response is read the standard way.
    pub fn is_standard(&self) -> bool {
        self.fields().next().is_none()
            && self.expires_at_unit.is_none()
            && self.refresh_token_expires_at_unit.is_none()
    }
}

/// Where a field is in a JSON response: a member name, or a dotted path
/// through nested objects (`data.token`). Dots always separate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    segments: Vec<String>,
}

impl FieldPath {
    /// `text` split at its dots; `None` when it or any part of it is empty.
    pub fn parse(text: &str) -> Option<FieldPath> {
        let segments: Vec<String> = text.split('.').map(str::to_owned).collect();
        FieldPath::from_segments(segments)
    }

    /// A path of these member names; `None` when there is none or one is empty.
    pub fn from_segments(segments: Vec<String>) -> Option<FieldPath> {
        if segments.is_empty() || segments.iter().any(String::is_empty) {
            return None;
        }
        Some(FieldPath { segments })
    }

    /// The member names, outermost first; never empty.
    pub fn segments(&self) -> &[String] {
        &self.segments
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.segments.join("."))
    }
}

/// How a response states an absolute expiry (`expires_at_unit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestampUnit {
    /// Seconds since 1970 (a number or a numeric string), however large.
    EpochSeconds,
    /// Milliseconds since 1970 (a number or a numeric string).
    EpochMillis,
    /// An RFC 3339 / ISO 8601 timestamp string.
    Rfc3339,
}

impl TimestampUnit {
    /// The config spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            TimestampUnit::EpochSeconds => "epoch_seconds",
            TimestampUnit::EpochMillis => "epoch_millis",
            TimestampUnit::Rfc3339 => "rfc3339",
        }
    }
}

/// One `[[clients.NAME.token.errors]]` rule: an error answer it matches (every
/// condition set must hold) and what that answer means. Rules are tried in
/// order before the built-in classification; the first match decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorRule {
    /// `status`: the answer's status, 400..=599.
    pub status: Option<StatusCode>,
    /// `error`: the error code the answer names (RFC 6749 `error`, or the
    /// provider's own code field), compared ignoring case.
    pub error: Option<String>,
    /// `body_contains`: text the raw body contains, compared exactly.
    pub body_contains: Option<String>,
    /// `means`.
    pub means: ErrorMeaning,
}

/// What a matching [`ErrorRule`] says an error answer means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorMeaning {
    /// The provider refused the credential, as a 400 `invalid_grant` says: a
    /// refresh token is dropped (then the full grant, else
    /// needs_authorization); a full grant is counted rejected and backs off.
    Rejected,
    /// The provider failed, as a 503 says: back off and try the same again.
    Transient,
    /// The refresh token is dead and only a person can issue a new one: as
    /// `Rejected`, but a refresh never falls back to the full grant.
    NeedsAuthorization,
}

impl ErrorMeaning {
    /// The config spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorMeaning::Rejected => "rejected",
            ErrorMeaning::Transient => "transient",
            ErrorMeaning::NeedsAuthorization => "needs_authorization",
        }
    }
}

/// Headers tokenproxy writes itself, or that only make sense hop by hop.
const OWNED_HEADERS: &[(&str, &str)] = &[
    ("content-type", "follows token.body"),
    ("content-length", "is computed for each request"),
    ("host", "follows token.url"),
    ("transfer-encoding", "is hop-by-hop"),
    ("connection", "is hop-by-hop"),
    ("keep-alive", "is hop-by-hop"),
    ("proxy-connection", "is hop-by-hop"),
    ("te", "is hop-by-hop"),
    ("trailer", "is hop-by-hop"),
    ("upgrade", "is hop-by-hop"),
    ("proxy-authenticate", "is hop-by-hop"),
    (
        "proxy-authorization",
        "is hop-by-hop (the egress proxy's credentials go in proxy)",
    ),
    ("expect", "would change how the request is sent"),
    ("dpop", "is a proof made for each request"),
];

/// Header names whose values are credentials more often than not: marked
/// sensitive, never shown by `check`, scrubbed from provider text.
const CREDENTIAL_WORDS: &[&str] = &[
    "auth",
    "key",
    "token",
    "secret",
    "password",
    "cookie",
    "signature",
    "session",
];

const HEADERS_HINT: &str = "write it like headers = { \"Square-Version\" = \"2026-01-22\" }";

/// `token.headers`, after refusing every header tokenproxy owns: the
/// framing and hop-by-hop headers always, `Authorization` when `client_auth`
/// sends client credentials in it.
pub(super) fn build_headers(
    t: &Table<'_>,
    raw: BTreeMap<String, String>,
    client_auth: Option<ClientAuth>,
) -> Result<Vec<(HeaderName, HeaderValue)>, ConfigError> {
    let mut p = Problems::default();
    let mut out: Vec<(HeaderName, HeaderValue)> = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        let key = format!("headers.{name}");
        let Ok(header) = HeaderName::from_bytes(name.as_bytes()) else {
            let problem = format!("{name:?} is not a header name");
            p.add(t.err(&key, problem).with_hint(HEADERS_HINT));
            continue;
        };
        if let Some((_, why)) = OWNED_HEADERS.iter().find(|(n, _)| *n == header.as_str()) {
            let problem = format!("{name} is set by tokenproxy: it {why}");
            p.add(t.err(&key, problem).with_hint("remove it from headers"));
            continue;
        }
        if header == http::header::AUTHORIZATION
            && matches!(client_auth, Some(ClientAuth::Basic | ClientAuth::Both))
        {
            let problem = format!(
                "Authorization carries the client credentials when client_auth = \"{}\"",
                client_auth.map_or("basic", |a| a.as_str())
            );
            let hint = "remove it; to send another Authorization, set client_auth to a method that sends none (\"body\", \"none\", ...)";
            p.add(t.err(&key, problem).with_hint(hint));
            continue;
        }
        if out.iter().any(|(h, _)| *h == header) {
            let problem = format!("{name} is given twice (header names ignore case)");
            p.add(t.err(&key, problem).with_hint("keep one of them"));
            continue;
        }
        let Some(text) = p.take(t.string(&key, &value)) else {
            continue;
        };
        if text.trim().is_empty() {
            p.add(
                t.err(&key, "is empty")
                    .with_hint("set a value, or remove the header"),
            );
            continue;
        }
        let Ok(mut value) = HeaderValue::from_str(text.trim()) else {
            // Not echoed: a value from ${VAR} may be anything.
            let problem = "is not a valid header value (control characters or non-ASCII text)";
            p.add(t.err(&key, problem).with_hint(HEADERS_HINT));
            continue;
        };
        let lower = header.as_str();
        value.set_sensitive(CREDENTIAL_WORDS.iter().any(|w| lower.contains(w)));
        out.push((header, value));
    }
    p.finish()?;
    Ok(out)
}

const PATH_HINT: &str =
    "name the response member, like \"accessToken\", or a dotted path like \"data.token\"";

/// `[clients.NAME.token.response]`.
pub(super) fn build_response(
    t: &Table<'_>,
    raw: RawResponse,
) -> Result<ResponseMapping, ConfigError> {
    let mut p = Problems::default();
    let mut path = |k: &str, raw: Option<String>| -> Option<FieldPath> {
        let text = p.take(t.non_empty(k, raw))??;
        match FieldPath::parse(&text) {
            Some(path) => Some(path),
            None => {
                let problem = format!("{text:?} has an empty part");
                p.add(t.err(k, problem).with_hint(PATH_HINT));
                None
            }
        }
    };
    let mut mapping = ResponseMapping {
        access_token: path("access_token", raw.access_token),
        refresh_token: path("refresh_token", raw.refresh_token),
        token_type: path("token_type", raw.token_type),
        scope: path("scope", raw.scope),
        expires_in: path("expires_in", raw.expires_in),
        expires_at: path("expires_at", raw.expires_at),
        expires_at_unit: None,
        refresh_token_expires_in: path("refresh_token_expires_in", raw.refresh_token_expires_in),
        refresh_token_expires_at: path("refresh_token_expires_at", raw.refresh_token_expires_at),
        refresh_token_expires_at_unit: None,
    };
    let units = [
        ("epoch_seconds", Some(TimestampUnit::EpochSeconds)),
        ("epoch_millis", Some(TimestampUnit::EpochMillis)),
        ("rfc3339", Some(TimestampUnit::Rfc3339)),
    ];
    mapping.expires_at_unit = p
        .take(t.choice("expires_at_unit", raw.expires_at_unit, Some(None), &units))
        .flatten();
    mapping.refresh_token_expires_at_unit = p
        .take(t.choice(
            "refresh_token_expires_at_unit",
            raw.refresh_token_expires_at_unit,
            Some(None),
            &units,
        ))
        .flatten();
    let fields: Vec<(&str, &FieldPath)> = mapping.fields().collect();
    let hint = "give each field the member the provider puts it in";
    for (i, (key, path)) in fields.iter().enumerate() {
        if let Some((first, _)) = fields[..i].iter().find(|(_, other)| other == path) {
            let problem = format!("reads \"{path}\", which {first} reads too");
            p.add(t.err(key, problem).with_hint(hint));
        } else if let Some(token) = token_read_at(&mapping, key, path) {
            let problem = format!("reads \"{path}\", where the {token} is read");
            p.add(t.err(key, problem).with_hint(hint));
        }
    }
    p.finish()?;
    Ok(mapping)
}

/// Which token is read under `path` when `key`, a field that is no token,
/// reads there too: a token field left unmapped is read under its standard
/// names. The token would be shown as that field (a token type, a scope, a
/// lifetime) by `tokenproxy token`, `/status` or the log.
fn token_read_at(mapping: &ResponseMapping, key: &str, path: &FieldPath) -> Option<&'static str> {
    const TOKENS: [(&str, &str, [&str; 2]); 2] = [
        (
            "access_token",
            "access token",
            ["access_token", "accessToken"],
        ),
        (
            "refresh_token",
            "refresh token",
            ["refresh_token", "refreshToken"],
        ),
    ];
    let [name] = path.segments() else {
        return None;
    };
    if TOKENS.iter().any(|(token, _, _)| *token == key) {
        return None;
    }
    TOKENS
        .iter()
        .filter(|(token, _, _)| !mapping.fields().any(|(k, _)| k == *token))
        .find(|(_, _, names)| names.contains(&name.as_str()))
        .map(|(_, what, _)| *what)
}

/// `[[clients.NAME.token.errors]]`, each rule judged on its own.
pub(super) fn build_error_rules(
    t: &Table<'_>,
    raw: Vec<RawErrorRule>,
) -> Result<Vec<ErrorRule>, ConfigError> {
    let mut p = Problems::default();
    let mut rules = Vec::with_capacity(raw.len());
    for (i, rule) in raw.into_iter().enumerate() {
        let r = Table::new(t.x, t.key(&format!("errors[{i}]")));
        if let Some(rule) = p.take(error_rule(&r, rule)) {
            rules.push(rule);
        }
    }
    p.finish()?;
    Ok(rules)
}

const MEANINGS: [(&str, ErrorMeaning); 3] = [
    ("rejected", ErrorMeaning::Rejected),
    ("transient", ErrorMeaning::Transient),
    ("needs_authorization", ErrorMeaning::NeedsAuthorization),
];

fn error_rule(r: &Table<'_>, raw: RawErrorRule) -> Result<ErrorRule, ConfigError> {
    let mut p = Problems::default();
    let has_status = raw.status.is_some();
    let status = p.take(match raw.status {
        None => Ok(None),
        Some(s) => r.count("status", Some(s), 0, 400..=599).map(|n| {
            // In range, so a valid status code.
            u16::try_from(n)
                .ok()
                .and_then(|n| StatusCode::from_u16(n).ok())
        }),
    });
    let error = p.take(r.non_empty("error", raw.error));
    let body_contains = p.take(r.non_empty("body_contains", raw.body_contains));
    let means = p.take(r.choice("means", raw.means, None, &MEANINGS));
    if !has_status && unset(&error) && unset(&body_contains) {
        let hint = "add status, error or body_contains: a rule without them would decide every error answer";
        p.add(r.err("", "matches nothing in particular").with_hint(hint));
    }
    let (Some(status), Some(error), Some(body_contains), Some(means)) =
        (status, error, body_contains, means)
    else {
        return Err(p.into_error());
    };
    p.finish()?;
    Ok(ErrorRule {
        status,
        error,
        body_contains,
        means,
    })
}

/// True when a key was not set (an invalid one was set, and is reported apart).
fn unset(value: &Option<Option<String>>) -> bool {
    matches!(value, Some(None))
}
