//! Token endpoint responses: a 2xx body becomes a normalized [`TokenSet`], a refusal
//! becomes a [`ProviderError`].
//!
//! This module owns every provider quirk on the response side (PRODUCT.md, "How real
//! providers behave"): snake_case or camelCase field names, `expires_in` as a number or a
//! numeric string, `expires_at` as RFC 3339 / ISO 8601 or epoch seconds (or milliseconds),
//! the unverified JWT `exp` fallback when no expiry is stated, RFC 6749 §5.2 errors, and
//! point-of-sale style `errors` arrays. It does no I/O and reads the wall clock only through
//! the `now` argument.
//!
//! Nothing produced here (errors, `Display`, `Debug`) contains a token value or raw body
//! text: tokens are wrapped in [`Secret`] at once, and provider error text is sanitized and
//! truncated before it is kept.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use http::StatusCode;
use serde_json::{Map, Value};

use super::redact::Redactor;
use crate::config::{ErrorMeaning, ErrorRule, FieldPath, ResponseMapping, TimestampUnit};
use crate::secret::Secret;

/// Longest lifetime kept (10 × 365 days); longer stated lifetimes are clamped to it.
///
/// A provider that says "expires in 10^12 seconds" or "expires in the year 9999" means
/// "does not expire"; clamping keeps deadline arithmetic far from overflow. A clamped
/// value equals this constant exactly, so the caller can detect and log it
/// (see [`TokenSet::clamped`]).
pub const MAX_LIFETIME: Duration = crate::config::MAX_DURATION;

/// Longest provider error text kept, in characters (including a trailing ellipsis).
const MAX_TEXT_CHARS: usize = 200;

/// Epoch values above this many seconds (the year 5138) are taken as milliseconds.
const EPOCH_MILLIS_THRESHOLD: Duration = Duration::from_secs(100_000_000_000);

/// base64url as JWTs use it (RFC 7515 §2), but lenient: padding optional, trailing bits ignored.
const JWT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// A response field: its canonical (snake_case) name, used in errors and as its
/// key in `[token.response]`; its standard names; and where a configured
/// [`ResponseMapping`] puts it instead.
struct Field {
    name: &'static str,
    aliases: &'static [&'static str],
    mapped: fn(&ResponseMapping) -> Option<&FieldPath>,
}

const ACCESS_TOKEN: Field = Field {
    name: "access_token",
    aliases: &["access_token", "accessToken"],
    mapped: |m| m.access_token.as_ref(),
};
const TOKEN_TYPE: Field = Field {
    name: "token_type",
    aliases: &["token_type", "tokenType"],
    mapped: |m| m.token_type.as_ref(),
};
const EXPIRES_IN: Field = Field {
    name: "expires_in",
    aliases: &["expires_in", "expiresIn"],
    mapped: |m| m.expires_in.as_ref(),
};
const EXPIRES_AT: Field = Field {
    name: "expires_at",
    aliases: &["expires_at", "expiresAt"],
    mapped: |m| m.expires_at.as_ref(),
};
const REFRESH_TOKEN: Field = Field {
    name: "refresh_token",
    aliases: &["refresh_token", "refreshToken"],
    mapped: |m| m.refresh_token.as_ref(),
};
const REFRESH_EXPIRES_IN: Field = Field {
    name: "refresh_token_expires_in",
    aliases: &["refresh_token_expires_in", "refreshTokenExpiresIn"],
    mapped: |m| m.refresh_token_expires_in.as_ref(),
};
const REFRESH_EXPIRES_AT: Field = Field {
    name: "refresh_token_expires_at",
    aliases: &["refresh_token_expires_at", "refreshTokenExpiresAt"],
    mapped: |m| m.refresh_token_expires_at.as_ref(),
};
const SCOPE: Field = Field {
    name: "scope",
    aliases: &["scope"],
    mapped: |m| m.scope.as_ref(),
};

/// A successful token response, normalized.
#[derive(Clone, Debug)]
pub struct TokenSet {
    /// The access token, never empty.
    pub access_token: Secret,
    /// `token_type` as sent, e.g. "Bearer", "bearer"; `None` when absent or empty.
    pub token_type: Option<String>,
    /// How long the access token lives from `now`, clamped to [`MAX_LIFETIME`].
    pub lifetime: Option<Duration>,
    /// Where `lifetime` came from.
    pub lifetime_source: LifetimeSource,
    /// The refresh token; `None` when absent, empty or not a string.
    pub refresh_token: Option<Secret>,
    /// How long the refresh token lives from `now`, clamped to [`MAX_LIFETIME`].
    pub refresh_token_lifetime: Option<Duration>,
    /// `scope` as sent (a JSON array of strings is joined with spaces).
    pub scope: Option<String>,
}

/// Where [`TokenSet::lifetime`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifetimeSource {
    /// `expires_in` / `expiresIn`.
    ExpiresIn,
    /// `expires_at` / `expiresAt`, minus `now`.
    ExpiresAt,
    /// The `exp` claim of a JWT access token (read, not verified), minus `now`.
    JwtExp,
    /// The response states no expiry.
    None,
}

impl LifetimeSource {
    /// Stable lower-case name for logs, metrics and `/status`.
    pub fn as_str(&self) -> &'static str {
        match self {
            LifetimeSource::ExpiresIn => "expires_in",
            LifetimeSource::ExpiresAt => "expires_at",
            LifetimeSource::JwtExp => "jwt_exp",
            LifetimeSource::None => "none",
        }
    }
}

impl fmt::Display for LifetimeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TokenSet {
    /// True when token_type is absent or equals "bearer" in any case.
    pub fn is_bearer(&self) -> bool {
        match self.token_type.as_deref() {
            None => true,
            Some(t) => t.trim().eq_ignore_ascii_case("bearer"),
        }
    }

    /// True when token_type is "DPoP" in any case (RFC 9449 §5): the token is
    /// bound to the key of the request's proof.
    pub fn is_dpop(&self) -> bool {
        self.token_type
            .as_deref()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("dpop"))
    }

    /// True when either lifetime was clamped to [`MAX_LIFETIME`] (the caller logs it).
    pub fn clamped(&self) -> bool {
        self.lifetime == Some(MAX_LIFETIME) || self.refresh_token_lifetime == Some(MAX_LIFETIME)
    }
}

/// Why a 2xx token response could not be used; never contains a token value or body text.
#[derive(Debug, thiserror::Error)]
pub enum ResponseError {
    /// The body is not a JSON object (the message is serde_json's, without body content).
    #[error("response is not JSON: {0}")]
    NotJson(String),
    /// The object has no (or an empty) `access_token`.
    #[error("response has no access_token")]
    MissingAccessToken,
    /// A field we use has a value we cannot interpret.
    #[error("{field} has an invalid value: {reason}")]
    BadField {
        /// Canonical (snake_case) field name.
        field: &'static str,
        /// What is wrong, without the value itself.
        reason: String,
    },
}

/// Parses a 2xx body, reading each field under its standard names.
/// `now` is the wall clock (injected, for expires_at and JWT exp).
pub fn parse_success(body: &[u8], now: SystemTime) -> Result<TokenSet, ResponseError> {
    parse_success_with(body, now, &ResponseMapping::default())
}

/// Parses a 2xx body as `mapping` says: a mapped field is read only at its
/// path, in its unit; the others under their standard names.
pub fn parse_success_with(
    body: &[u8],
    now: SystemTime,
    mapping: &ResponseMapping,
) -> Result<TokenSet, ResponseError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ResponseError::NotJson(e.to_string()))?;
    let obj = match value {
        Value::Object(obj) => obj,
        other => {
            return Err(ResponseError::NotJson(format!(
                "expected an object, found {}",
                kind(&other)
            )))
        }
    };
    let r = Reader { obj: &obj, mapping };

    let access_token = access_token(&r)?;

    let access_unit = mapping.expires_at_unit;
    let (lifetime, lifetime_source) =
        match stated_lifetime(&r, &EXPIRES_IN, &EXPIRES_AT, access_unit, now)? {
            Some((lifetime, source)) => (Some(lifetime), source),
            None => match jwt_exp(access_token.expose()) {
                Some(exp) => (Some(clamp(remaining(exp, now))), LifetimeSource::JwtExp),
                None => (None, LifetimeSource::None),
            },
        };
    let refresh_unit = mapping.refresh_token_expires_at_unit;
    let refresh_token_lifetime = stated_lifetime(
        &r,
        &REFRESH_EXPIRES_IN,
        &REFRESH_EXPIRES_AT,
        refresh_unit,
        now,
    )?
    .map(|(d, _)| d);

    let refresh_token = match r.get(&REFRESH_TOKEN) {
        Some(Value::String(s)) if !s.is_empty() => Some(Secret::new(s.as_str())),
        _ => None,
    };

    Ok(TokenSet {
        access_token,
        token_type: non_empty_string(r.get(&TOKEN_TYPE)),
        lifetime,
        lifetime_source,
        refresh_token,
        refresh_token_lifetime,
        scope: scope(r.get(&SCOPE)),
    })
}

/// One response object, read as a mapping says.
struct Reader<'a> {
    obj: &'a Map<String, Value>,
    mapping: &'a ResponseMapping,
}

impl<'a> Reader<'a> {
    /// The field's value at its mapped path, else under the first standard
    /// name present; `null` counts as absent.
    fn get(&self, field: &Field) -> Option<&'a Value> {
        let found = match (field.mapped)(self.mapping) {
            Some(path) => at_path(self.obj, path),
            None => field
                .aliases
                .iter()
                .find_map(|name| self.obj.get(*name).filter(|v| !v.is_null())),
        };
        found.filter(|v| !v.is_null())
    }

    /// A field whose value cannot be used; a mapped one names where it was read.
    fn bad(&self, field: &Field, reason: impl Into<String>) -> ResponseError {
        let reason = reason.into();
        let reason = match (field.mapped)(self.mapping) {
            Some(path) => format!("{reason} (read from {path})"),
            None => reason,
        };
        ResponseError::BadField {
            field: field.name,
            reason,
        }
    }
}

/// The value at `path` through nested objects; `None` when a step is missing
/// or not an object.
fn at_path<'a>(obj: &'a Map<String, Value>, path: &FieldPath) -> Option<&'a Value> {
    let (last, parents) = path.segments().split_last()?;
    let mut current = obj;
    for name in parents {
        current = current.get(name)?.as_object()?;
    }
    current.get(last)
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn access_token(r: &Reader<'_>) -> Result<Secret, ResponseError> {
    let token = match r.get(&ACCESS_TOKEN) {
        None => return Err(ResponseError::MissingAccessToken),
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(r.bad(
                &ACCESS_TOKEN,
                format!("expected a string, found {}", kind(other)),
            ))
        }
    };
    if token.trim().is_empty() {
        return Err(ResponseError::MissingAccessToken);
    }
    // RFC 6749 §A.12: VSCHAR only. Anything else could not be injected into a header
    // (and a CR/LF would be header injection).
    if !token.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(r.bad(
            &ACCESS_TOKEN,
            "contains characters that cannot be sent in an HTTP header",
        ));
    }
    Ok(Secret::new(token.as_str()))
}

fn non_empty_string(value: Option<&Value>) -> Option<String> {
    match value {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// `scope` is a space-separated string (RFC 6749 §3.3); some providers send an array.
fn scope(value: Option<&Value>) -> Option<String> {
    match value {
        Some(Value::Array(items)) => {
            let joined = items
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" ");
            (!joined.trim().is_empty()).then_some(joined)
        }
        other => non_empty_string(other),
    }
}

/// Lifetime from `*_expires_in`, else `*_expires_at` (read in `unit`);
/// `expires_in` wins because it is immune to clock skew between us and the
/// provider.
fn stated_lifetime(
    r: &Reader<'_>,
    expires_in: &Field,
    expires_at: &Field,
    unit: Option<TimestampUnit>,
    now: SystemTime,
) -> Result<Option<(Duration, LifetimeSource)>, ResponseError> {
    if let Some(value) = r.get(expires_in) {
        let secs = seconds(r, value, expires_in)?;
        return Ok(Some((clamp(secs), LifetimeSource::ExpiresIn)));
    }
    if let Some(value) = r.get(expires_at) {
        let at = timestamp(r, value, expires_at, unit)?;
        return Ok(Some((clamp(remaining(at, now)), LifetimeSource::ExpiresAt)));
    }
    Ok(None)
}

fn clamp(lifetime: Duration) -> Duration {
    lifetime.min(MAX_LIFETIME)
}

/// Time from `now` until `at`; zero when `at` is past, `MAX` when beyond `SystemTime`.
fn remaining(at: Option<SystemTime>, now: SystemTime) -> Duration {
    match at {
        Some(at) => at.duration_since(now).unwrap_or(Duration::ZERO),
        None => Duration::MAX,
    }
}

/// An `expires_in`-style value: whole seconds, fractions truncated.
fn seconds(r: &Reader<'_>, value: &Value, field: &Field) -> Result<Duration, ResponseError> {
    let exact = match value {
        Value::Number(n) => non_negative(n)
            .ok_or_else(|| r.bad(field, "must be a non-negative number of seconds"))?,
        // Django-OAuth-Toolkit style servers document expires_in as a string.
        Value::String(s) => decimal(s.trim()).ok_or_else(|| {
            r.bad(
                field,
                "must be a non-negative number of seconds or a numeric string",
            )
        })?,
        other => {
            return Err(r.bad(
                field,
                format!("expected a number of seconds, found {}", kind(other)),
            ))
        }
    };
    Ok(Duration::from_secs(exact.as_secs()))
}

/// An `expires_at`-style value in `unit`. Without one: RFC 3339 / ISO 8601,
/// or epoch seconds (milliseconds when above [`EPOCH_MILLIS_THRESHOLD`]) as a
/// number or numeric string. `None` inside `Ok` means "later than
/// `SystemTime` can represent".
fn timestamp(
    r: &Reader<'_>,
    value: &Value,
    field: &Field,
    unit: Option<TimestampUnit>,
) -> Result<Option<SystemTime>, ResponseError> {
    let numeric = match value {
        Value::Number(n) => {
            Some(non_negative(n).ok_or_else(|| r.bad(field, "must be a non-negative epoch time"))?)
        }
        Value::String(s) => decimal(s.trim()),
        other => {
            return Err(r.bad(
                field,
                format!("expected a timestamp, found {}", kind(other)),
            ))
        }
    };
    let text = value.as_str().map(str::trim);
    let since_epoch = match (unit, numeric, text) {
        (None, Some(d), _) if d > EPOCH_MILLIS_THRESHOLD => d / 1000,
        (None | Some(TimestampUnit::EpochSeconds), Some(d), _) => d,
        (Some(TimestampUnit::EpochMillis), Some(d), _) => d / 1000,
        (None | Some(TimestampUnit::Rfc3339), None, Some(text)) => {
            let unit_name = if unit.is_some() {
                "must be an RFC 3339 timestamp"
            } else {
                "must be an RFC 3339 timestamp or epoch seconds"
            };
            return parse_rfc3339(text)
                .map(Some)
                .ok_or_else(|| r.bad(field, unit_name));
        }
        (Some(TimestampUnit::Rfc3339), _, _) => {
            return Err(r.bad(field, "must be an RFC 3339 timestamp, as its unit says"))
        }
        (Some(TimestampUnit::EpochSeconds), None, _) => {
            return Err(r.bad(field, "must be epoch seconds, as its unit says"))
        }
        (Some(TimestampUnit::EpochMillis), None, _) => {
            return Err(r.bad(field, "must be epoch milliseconds, as its unit says"))
        }
        // A number is always numeric, so only a non-numeric string is left.
        (None, None, None) => {
            return Err(r.bad(field, "must be an RFC 3339 timestamp or epoch seconds"))
        }
    };
    Ok(UNIX_EPOCH.checked_add(since_epoch))
}

/// A non-negative JSON number as a `Duration` of seconds (fraction kept, huge values
/// saturate); `None` when negative.
fn non_negative(n: &serde_json::Number) -> Option<Duration> {
    if let Some(u) = n.as_u64() {
        return Some(Duration::from_secs(u));
    }
    let f = n.as_f64()?;
    if f.is_nan() || f < 0.0 {
        return None;
    }
    if f >= u64::MAX as f64 {
        return Some(Duration::MAX);
    }
    let whole = f.trunc();
    // `as` saturates; the fraction of a finite f64 below 2^64 is well within 0..1.
    let nanos = (((f - whole) * 1e9) as u32).min(999_999_999);
    Some(Duration::new(whole as u64, nanos))
}

/// `digits[.digits]` as seconds (huge values saturate); no sign, exponent, inf or NaN.
fn decimal(s: &str) -> Option<Duration> {
    let (whole, fraction) = match s.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (s, None),
    };
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs = whole.parse::<u64>().unwrap_or(u64::MAX);
    let nanos = match fraction {
        None => 0,
        Some(f) => fraction_nanos(f)?,
    };
    Some(Duration::new(secs, nanos))
}

/// One or more digits after a decimal point as nanoseconds (digits beyond 9 ignored).
fn fraction_nanos(digits: &str) -> Option<u32> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut nanos = 0u32;
    for i in 0..9 {
        let d = digits.as_bytes().get(i).map_or(0, |b| u32::from(b - b'0'));
        nanos = nanos * 10 + d;
    }
    Some(nanos)
}

/// The `exp` claim of a JWT-looking token (three dot-separated base64url segments whose
/// middle one is a JSON object), read without verifying anything. `Some(None)` means an
/// `exp` beyond what `SystemTime` represents.
fn jwt_exp(token: &str) -> Option<Option<SystemTime>> {
    let mut segments = token.split('.');
    let (header, payload) = (segments.next()?, segments.next()?);
    segments.next()?;
    if segments.next().is_some() || header.is_empty() || payload.is_empty() {
        return None;
    }
    let claims: Value = serde_json::from_slice(&JWT_BASE64.decode(payload).ok()?).ok()?;
    let exp = match claims.get("exp")? {
        Value::Number(n) => n,
        _ => return None,
    };
    // A negative exp (before 1970) is simply expired.
    let since_epoch = non_negative(exp).unwrap_or(Duration::ZERO);
    Some(UNIX_EPOCH.checked_add(since_epoch))
}

/// Parses an RFC 3339 timestamp, leniently in the ISO 8601 direction.
///
/// Accepts `YYYY-MM-DD`, `T`/`t`/space, `hh:mm:ss`, an optional `.` or `,` fraction of
/// any length (nanosecond precision), then `Z`/`z`, `±hh:mm`, `±hhmm`, `±hh`, or nothing
/// (taken as UTC, as providers that omit the offset mean). Second 60 (a leap second) is
/// accepted and lands on the next minute. `None` when malformed or out of range.
pub(crate) fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let mut c = Cursor {
        bytes: s.as_bytes(),
    };
    let year = c.digits(4)?;
    c.eat(b'-')?;
    let month = c.digits(2)?;
    c.eat(b'-')?;
    let day = c.digits(2)?;
    match c.next()? {
        b'T' | b't' | b' ' => {}
        _ => return None,
    }
    let hour = c.digits(2)?;
    c.eat(b':')?;
    let minute = c.digits(2)?;
    c.eat(b':')?;
    let second = c.digits(2)?;
    let mut nanos = 0;
    if let Some(b'.' | b',') = c.peek() {
        c.next();
        nanos = fraction_nanos(c.take_digits())?;
    }
    let offset_secs: i64 = match c.next() {
        None | Some(b'Z' | b'z') => 0,
        Some(sign @ (b'+' | b'-')) => {
            let hours = c.digits(2)?;
            if c.peek() == Some(b':') {
                c.next();
            }
            let minutes = if c.peek().is_some() { c.digits(2)? } else { 0 };
            if hours > 23 || minutes > 59 {
                return None;
            }
            let secs = i64::from(hours * 3600 + minutes * 60);
            if sign == b'-' {
                -secs
            } else {
                secs
            }
        }
        Some(_) => return None,
    };
    if c.peek().is_some()
        || !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86_400
        + i64::from(hour * 3600 + minute * 60 + second)
        - offset_secs;
    let whole = Duration::from_secs(secs.unsigned_abs());
    let base = if secs >= 0 {
        UNIX_EPOCH.checked_add(whole)
    } else {
        UNIX_EPOCH.checked_sub(whole)
    };
    base?.checked_add(Duration::from_nanos(u64::from(nanos)))
}

/// A forward-only reader over ASCII bytes for [`parse_rfc3339`].
struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.first().copied()
    }

    fn next(&mut self) -> Option<u8> {
        let (first, rest) = self.bytes.split_first()?;
        self.bytes = rest;
        Some(*first)
    }

    fn eat(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    /// Exactly `n` ASCII digits as a number.
    fn digits(&mut self, n: usize) -> Option<u32> {
        let mut value = 0u32;
        for _ in 0..n {
            let b = self.next()?;
            if !b.is_ascii_digit() {
                return None;
            }
            value = value * 10 + u32::from(b - b'0');
        }
        Some(value)
    }

    /// All leading ASCII digits (possibly none), as text.
    fn take_digits(&mut self) -> &'a str {
        let len = self.bytes.iter().take_while(|b| b.is_ascii_digit()).count();
        let (digits, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        // ASCII digits are always valid UTF-8.
        std::str::from_utf8(digits).unwrap_or("")
    }
}

fn is_leap_year(year: u32) -> bool {
    // Every 4th year, except centuries, except every 4th century.
    match (year % 400, year % 100, year % 4) {
        (0, _, _) => true,
        (_, 0, _) => false,
        (_, _, r) => r == 0,
    }
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a proleptic Gregorian date (`month` 1..=12, `year` 0..=9999).
fn days_from_civil(year: u32, month: u32, day: u32) -> i64 {
    // Count from 0000-03-01 so the leap day is the last day of the counting year.
    let (year, month, day) = (i64::from(year), i64::from(month), i64::from(day));
    let y = if month <= 2 { year - 1 } else { year };
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let leap_days = y.div_euclid(4) - y.div_euclid(100) + y.div_euclid(400);
    // 719_468 = days from 0000-03-01 to 1970-01-01.
    y * 365 + leap_days + day_of_year - 719_468
}

/// What the provider said when it refused (RFC 6749 §5.2, or an `errors` array).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderError {
    /// HTTP status of the token endpoint's answer.
    pub status: StatusCode,
    /// RFC 6749 `error` code, e.g. "invalid_grant"; or the first `errors[].code` / `category`.
    pub error: Option<String>,
    /// `error_description` / `errors[].detail` / `message`, sanitized: control characters
    /// removed, at most 200 characters; or a note such as "non-JSON body".
    pub description: Option<String>,
    /// What a `[[token.errors]]` rule says the answer means; it decides
    /// before the status and code do ([`ProviderError::is_rejection`]).
    pub meaning: Option<ErrorMeaning>,
}

/// RFC 6749 §5.2 codes (plus RFC 6750's invalid_token) that mean "this grant or client
/// will not work": retrying the same request is pointless.
const REJECTION_CODES: &[&str] = &[
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
    "access_denied",
    "invalid_token",
];

/// RFC 6749 §4.1.2.1 codes that mean the provider is failing, not refusing.
const TRANSIENT_CODES: &[&str] = &["temporarily_unavailable", "server_error"];

/// RFC 9449 §5, §8 codes that refuse the DPoP proof, not the grant: the
/// provider did not look at the grant (a refresh token is not spent), and the
/// next attempt, with a new proof, may pass. A rejection would drop a good
/// refresh token and wait for a person.
const PROOF_CODES: &[&str] = &["use_dpop_nonce", "invalid_dpop_proof"];

impl ProviderError {
    /// True when the provider refused the grant or client (4xx, or an RFC 6749 error code such as invalid_grant / invalid_client / unauthorized_client / invalid_scope / access_denied) as opposed to failing (5xx, 429).
    ///
    /// A matching `[[token.errors]]` rule decides first (for a refused DPoP
    /// proof, only one that names its code). Otherwise 408, 429 and
    /// 5xx are failures whatever the body says; a temporarily_unavailable /
    /// server_error code, or one that refuses the DPoP proof (use_dpop_nonce,
    /// invalid_dpop_proof), is a failure, a rejection code is a rejection, and
    /// any other 4xx is a rejection.
    pub fn is_rejection(&self) -> bool {
        match self.meaning {
            Some(ErrorMeaning::Rejected | ErrorMeaning::NeedsAuthorization) => return true,
            Some(ErrorMeaning::Transient) => return false,
            None => {}
        }
        let status = self.status;
        if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
        {
            return false;
        }
        let code_in = |codes: &[&str]| {
            self.error
                .as_deref()
                .is_some_and(|e| codes.iter().any(|c| e.eq_ignore_ascii_case(c)))
        };
        if code_in(TRANSIENT_CODES) || code_in(PROOF_CODES) {
            return false;
        }
        code_in(REJECTION_CODES) || status.is_client_error()
    }
}

impl ProviderError {
    /// True when a `[[token.errors]]` rule says only a person can issue a new
    /// refresh token: a refused refresh does not fall back to the full grant.
    pub fn needs_authorization(&self) -> bool {
        self.meaning == Some(ErrorMeaning::NeedsAuthorization)
    }

    /// The same answer, with what the first of `rules` matching it (status,
    /// error code, raw `body`) says it means. A refused DPoP proof
    /// ([`PROOF_CODES`]) is decided only by a rule that names its code: a
    /// rule written for a status (`status = 400, means = "rejected"`) is about
    /// the grant, and would drop a good refresh token over a proof.
    pub fn classified(mut self, rules: &[ErrorRule], body: &[u8]) -> ProviderError {
        let proof = self
            .error
            .as_deref()
            .is_some_and(|e| PROOF_CODES.iter().any(|c| e.eq_ignore_ascii_case(c)));
        self.meaning = rules
            .iter()
            .filter(|rule| !proof || rule.error.is_some())
            .find(|rule| rule_matches(rule, self.status, self.error.as_deref(), body))
            .map(|rule| rule.means);
        self
    }
}

/// Whether every condition `rule` sets holds for the answer.
fn rule_matches(rule: &ErrorRule, status: StatusCode, code: Option<&str>, body: &[u8]) -> bool {
    rule.status.is_none_or(|s| s == status)
        && rule
            .error
            .as_deref()
            .is_none_or(|want| code.is_some_and(|c| c.eq_ignore_ascii_case(want)))
        && rule.body_contains.as_deref().is_none_or(|text| {
            let text = text.as_bytes();
            text.is_empty() || body.windows(text.len()).any(|w| w == text)
        })
}

/// What the app may be told about an RFC 6749 §5.2 code: fixed text, never the provider's.
fn fixed_description(code: &str) -> Option<&'static str> {
    Some(match code {
        "invalid_request" => "the provider found the token request malformed",
        "invalid_client" => "the provider did not accept the client credentials",
        "invalid_grant" => {
            "the provider refused the grant (credentials, refresh token or code invalid, expired or revoked)"
        }
        "unauthorized_client" => "the client may not use this grant",
        "unsupported_grant_type" => "the provider does not support this grant",
        "invalid_scope" => "the provider refused the requested scope",
        "access_denied" => "the provider denied access",
        "invalid_token" => "the provider rejected the token",
        "temporarily_unavailable" => "the provider is temporarily unavailable",
        "server_error" => "the provider failed",
        "use_dpop_nonce" => "the provider wants a newer DPoP nonce in the proof",
        "invalid_dpop_proof" => "the provider refused the DPoP proof",
        _ => return None,
    })
}

impl ProviderError {
    /// The refusal as the app may see it: the status, the RFC 6749 code when it is a
    /// registered one, and a fixed description; never the provider's own text.
    pub fn app_summary(&self) -> String {
        let code = self
            .error
            .as_deref()
            .map(str::to_ascii_lowercase)
            .and_then(|c| fixed_description(&c).map(|d| (c, d)));
        match code {
            Some((code, description)) => format!("{}: {code} ({description})", self.status),
            None if self.is_rejection() => {
                format!("{}: the provider refused the request", self.status)
            }
            None => format!("{}: the provider failed", self.status),
        }
    }
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.status)?;
        match (&self.error, &self.description) {
            (Some(error), Some(description)) => write!(f, ": {error} ({description})")?,
            (Some(error), None) => write!(f, ": {error}")?,
            (None, Some(description)) => write!(f, ": {description}")?,
            (None, None) => f.write_str(": no error details")?,
        }
        match self.meaning {
            Some(meaning) => write!(f, "; {} by token.errors", meaning.as_str()),
            None => Ok(()),
        }
    }
}

impl std::error::Error for ProviderError {}

/// Parses a non-2xx body into what the provider said; never fails.
pub fn parse_error(status: StatusCode, body: &[u8]) -> ProviderError {
    parse_error_redacted(status, body, &Redactor::default())
}

/// [`parse_error`], then classified by `rules` ([`ProviderError::classified`]).
pub fn parse_error_with(status: StatusCode, body: &[u8], rules: &[ErrorRule]) -> ProviderError {
    parse_error(status, body).classified(rules, body)
}

/// [`parse_error`], with every credential in `redactor` scrubbed from the kept text.
pub(crate) fn parse_error_redacted(
    status: StatusCode,
    body: &[u8],
    redactor: &Redactor,
) -> ProviderError {
    let (error, description) = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(obj)) => error_fields(&obj, redactor),
        Ok(Value::Array(items)) => match items.first() {
            Some(Value::Object(first)) => error_fields(first, redactor),
            _ => (
                None,
                Some("unexpected JSON body (not an object)".to_owned()),
            ),
        },
        Ok(_) => (
            None,
            Some("unexpected JSON body (not an object)".to_owned()),
        ),
        Err(_) => (None, Some(non_json_description(body).to_owned())),
    };
    ProviderError {
        status,
        error,
        description,
        meaning: None,
    }
}

/// `error` and description from an error object, most specific source first.
fn error_fields(obj: &Map<String, Value>, r: &Redactor) -> (Option<String>, Option<String>) {
    // {"error": {"code": .., "message": ..}} is common outside RFC 6749.
    let nested = obj.get("error").and_then(Value::as_object);
    // Point-of-sale style: {"errors": [{"category": .., "code": .., "detail": ..}]}.
    let first_error = obj
        .get("errors")
        .and_then(Value::as_array)
        .and_then(|errors| errors.first());
    let first_object = first_error.and_then(Value::as_object);

    let error = text(obj, &["error"], r)
        .or_else(|| nested.and_then(|o| text(o, &["code", "error", "type", "status"], r)))
        .or_else(|| first_object.and_then(|o| text(o, &["code", "category"], r)))
        .or_else(|| text(obj, &["code", "error_code", "errorCode"], r));
    let description = text(obj, &["error_description", "errorDescription"], r)
        .or_else(|| nested.and_then(|o| text(o, &["message", "description", "detail"], r)))
        .or_else(|| first_object.and_then(|o| text(o, &["detail", "message", "description"], r)))
        .or_else(|| {
            first_error
                .and_then(Value::as_str)
                .and_then(|s| kept_text(s, r))
        })
        .or_else(|| {
            text(
                obj,
                &["message", "detail", "error_message", "errorMessage"],
                r,
            )
        });
    (error, description)
}

/// The first of `names` holding a string (or number) that is non-empty once sanitized.
fn text(obj: &Map<String, Value>, names: &[&str], r: &Redactor) -> Option<String> {
    names.iter().find_map(|name| match obj.get(*name)? {
        Value::String(s) => kept_text(s, r),
        Value::Number(n) => kept_text(&n.to_string(), r),
        _ => None,
    })
}

/// Provider text as it may be kept: credentials scrubbed (before and after removing
/// characters, which could otherwise join the pieces of a split credential), then
/// sanitized and bounded.
fn kept_text(s: &str, r: &Redactor) -> Option<String> {
    let normalized = sanitize(&r.scrub(s), usize::MAX)?;
    sanitize(&r.scrub(&normalized), MAX_TEXT_CHARS)
}

/// A note on a body that is not JSON; never any of its content.
fn non_json_description(body: &[u8]) -> &'static str {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        None => "empty body",
        Some(b'<') => "non-JSON body (text/html?)",
        Some(b'{' | b'[') => "non-JSON body (truncated JSON?)",
        Some(_) => "non-JSON body",
    }
}

/// Provider text made safe to log: control and invisible formatting characters removed,
/// whitespace runs collapsed to one space, at most `max_chars` characters.
fn sanitize(s: &str, max_chars: usize) -> Option<String> {
    let mut chars: Vec<char> = Vec::new();
    let mut space = false;
    for c in s.chars() {
        if c.is_whitespace() {
            space = !chars.is_empty();
        } else if !c.is_control() && !is_invisible_format(c) {
            if space {
                chars.push(' ');
                space = false;
            }
            chars.push(c);
            if chars.len() > max_chars {
                break;
            }
        }
    }
    if chars.is_empty() {
        return None;
    }
    if chars.len() > max_chars {
        chars.truncate(max_chars.saturating_sub(1));
        while chars.last() == Some(&' ') {
            chars.pop();
        }
        chars.push('…');
    }
    Some(chars.into_iter().collect())
}

/// Every format character (Unicode general category Cf, as of Unicode 15.1):
/// zero-width, bidirectional marks and overrides (U+061C among them), tags and
/// the like, which can disguise log lines; plus zero-width space (U+200B).
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{0600}'..='\u{0605}'
            | '\u{061C}'
            | '\u{06DD}'
            | '\u{070F}'
            | '\u{0890}'..='\u{0891}'
            | '\u{08E2}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{110BD}'
            | '\u{110CD}'
            | '\u{13430}'..='\u{1343F}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0001}'
            | '\u{E0020}'..='\u{E007F}'
    )
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    /// Security review (issue 25, low): bidi marks and other format
    /// characters (Unicode Cf) passed the provider-text sanitizer.
    #[test]
    fn every_format_character_is_removed_from_provider_text() {
        for c in [
            '\u{061C}',
            '\u{00AD}',
            '\u{180E}',
            '\u{206A}',
            '\u{FFF9}',
            '\u{E0041}',
            '\u{200E}',
        ] {
            let text = format!("invalid{c}_grant");
            assert_eq!(
                sanitize(&text, 100).as_deref(),
                Some("invalid_grant"),
                "U+{:04X} should have been removed",
                c as u32
            );
        }
    }

    /// 2023-11-14T22:13:20Z.
    const NOW_SECS: u64 = 1_700_000_000;
    const TOKEN: &str = "at-5ecr3t-value";

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW_SECS)
    }

    fn parse(body: &str) -> Result<TokenSet, ResponseError> {
        parse_success(body.as_bytes(), now())
    }

    fn ok(body: &str) -> TokenSet {
        match parse(body) {
            Ok(set) => set,
            Err(e) => panic!("body should parse, got error: {e}"),
        }
    }

    fn bad_field_name(body: &str) -> &'static str {
        match parse(body) {
            Err(ResponseError::BadField { field, .. }) => field,
            other => panic!("expected BadField, got {other:?}"),
        }
    }

    fn rfc3339(s: &str) -> Option<u64> {
        parse_rfc3339(s).map(|t| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
    }

    fn jwt(claims: &str) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.c2lnbmF0dXJl",
            b64.encode(r#"{"alg":"RS256","typ":"JWT"}"#),
            b64.encode(claims)
        )
    }

    fn secs(s: u64) -> Option<Duration> {
        Some(Duration::from_secs(s))
    }

    // --- parse_success: shapes -------------------------------------------------------

    #[test]
    fn snake_case_response_with_expires_in_and_refresh_token() {
        let set = ok(
            r#"{"access_token":"at-5ecr3t-value","token_type":"Bearer","expires_in":900,
                "refresh_token":"rt-value","scope":"payments read"}"#,
        );
        assert_eq!(set.access_token.expose(), TOKEN);
        assert_eq!(set.token_type.as_deref(), Some("Bearer"));
        assert_eq!(set.lifetime, secs(900));
        assert_eq!(set.lifetime_source, LifetimeSource::ExpiresIn);
        assert_eq!(
            set.refresh_token.as_ref().map(Secret::expose),
            Some("rt-value")
        );
        assert_eq!(set.refresh_token_lifetime, None);
        assert_eq!(set.scope.as_deref(), Some("payments read"));
        assert!(set.is_bearer());
        assert!(!set.clamped());
    }

    #[test]
    fn camel_case_response_is_understood() {
        let set = ok(
            r#"{"accessToken":"at-5ecr3t-value","tokenType":"Bearer","expiresIn":3600,
                "refreshToken":"rt-2","refreshTokenExpiresIn":86400}"#,
        );
        assert_eq!(set.access_token.expose(), TOKEN);
        assert_eq!(set.token_type.as_deref(), Some("Bearer"));
        assert_eq!(set.lifetime, secs(3600));
        assert_eq!(set.refresh_token.as_ref().map(Secret::expose), Some("rt-2"));
        assert_eq!(set.refresh_token_lifetime, secs(86_400));
    }

    #[test]
    fn camel_case_expires_at_aliases_are_understood() {
        let set = ok(r#"{"accessToken":"a","expiresAt":"2023-11-14T22:23:20Z",
                "refreshTokenExpiresAt":"2023-11-15T22:13:20Z"}"#);
        assert_eq!(set.lifetime, secs(600));
        assert_eq!(set.lifetime_source, LifetimeSource::ExpiresAt);
        assert_eq!(set.refresh_token_lifetime, secs(86_400));
    }

    #[test]
    fn expires_in_as_numeric_string_is_accepted() {
        assert_eq!(
            ok(r#"{"access_token":"a","expires_in":"3600"}"#).lifetime,
            secs(3600)
        );
    }

    #[test]
    fn expires_in_as_numeric_string_with_spaces_is_accepted() {
        assert_eq!(
            ok(r#"{"access_token":"a","expires_in":" 3600 "}"#).lifetime,
            secs(3600)
        );
    }

    #[test]
    fn expires_in_as_float_is_truncated() {
        assert_eq!(
            ok(r#"{"access_token":"a","expires_in":3599.9}"#).lifetime,
            secs(3599)
        );
        assert_eq!(
            ok(r#"{"access_token":"a","expires_in":"59.99"}"#).lifetime,
            secs(59)
        );
    }

    #[test]
    fn expires_in_zero_means_already_expired() {
        let set = ok(r#"{"access_token":"a","expires_in":0}"#);
        assert_eq!(set.lifetime, Some(Duration::ZERO));
        assert_eq!(set.lifetime_source, LifetimeSource::ExpiresIn);
    }

    #[test]
    fn negative_expires_in_is_rejected() {
        assert_eq!(
            bad_field_name(r#"{"access_token":"a","expires_in":-1}"#),
            "expires_in"
        );
        assert_eq!(
            bad_field_name(r#"{"access_token":"a","expires_in":-0.5}"#),
            "expires_in"
        );
        assert_eq!(
            bad_field_name(r#"{"access_token":"a","expires_in":"-5"}"#),
            "expires_in"
        );
    }

    #[test]
    fn non_numeric_expires_in_string_is_rejected() {
        for v in [
            r#""soon""#,
            r#""""#,
            r#""1e3""#,
            r#""NaN""#,
            r#""3600s""#,
            r#""12.""#,
        ] {
            let body = format!(r#"{{"access_token":"a","expires_in":{v}}}"#);
            assert_eq!(
                bad_field_name(&body),
                "expires_in",
                "{v} should be rejected"
            );
        }
    }

    #[test]
    fn expires_in_of_wrong_json_type_is_rejected() {
        assert_eq!(
            bad_field_name(r#"{"access_token":"a","expires_in":true}"#),
            "expires_in"
        );
        assert_eq!(
            bad_field_name(r#"{"access_token":"a","expiresIn":[1]}"#),
            "expires_in"
        );
    }

    #[test]
    fn null_fields_count_as_absent() {
        let set = ok(
            r#"{"access_token":"a","expires_in":null,"expiresIn":60,"refresh_token":null,
                "token_type":null,"scope":null}"#,
        );
        assert_eq!(set.lifetime, secs(60));
        assert!(set.refresh_token.is_none());
        assert!(set.token_type.is_none());
        assert!(set.scope.is_none());
    }

    #[test]
    fn point_of_sale_response_with_expires_at_and_extra_fields() {
        let set = ok(r#"{
            "access_token":"at-5ecr3t-value","token_type":"bearer",
            "expires_at":"2023-12-14T22:13:20Z","merchant_id":"M123",
            "refresh_token":"rt","refresh_token_expires_at":"2024-01-13T22:13:20Z",
            "short_lived":false,"id_token":"x.y.z","subscription_id":null,"plan_id":{"a":[1]}
        }"#);
        assert_eq!(set.token_type.as_deref(), Some("bearer"));
        assert!(set.is_bearer());
        assert_eq!(set.lifetime, secs(30 * 86_400));
        assert_eq!(set.lifetime_source, LifetimeSource::ExpiresAt);
        assert_eq!(set.refresh_token_lifetime, secs(60 * 86_400));
    }

    #[test]
    fn expires_at_with_fractional_seconds() {
        let set = ok(r#"{"access_token":"a","expires_at":"2023-11-14T22:14:20.750Z"}"#);
        assert_eq!(set.lifetime, Some(Duration::from_millis(60_750)));
    }

    #[test]
    fn expires_at_with_offset() {
        // 23:23:20+01:00 is 22:23:20Z, ten minutes after `now`.
        let set = ok(r#"{"access_token":"a","expires_at":"2023-11-14T23:23:20+01:00"}"#);
        assert_eq!(set.lifetime, secs(600));
        let set = ok(r#"{"access_token":"a","expires_at":"2023-11-14T17:23:20-05:00"}"#);
        assert_eq!(set.lifetime, secs(600));
    }

    #[test]
    fn expires_at_with_lower_case_t_and_z() {
        let set = ok(r#"{"access_token":"a","expires_at":"2023-11-14t22:23:20z"}"#);
        assert_eq!(set.lifetime, secs(600));
    }

    #[test]
    fn expires_at_as_epoch_seconds_number() {
        let body = format!(r#"{{"access_token":"a","expires_at":{}}}"#, NOW_SECS + 120);
        let set = ok(&body);
        assert_eq!(set.lifetime, secs(120));
        assert_eq!(set.lifetime_source, LifetimeSource::ExpiresAt);
    }

    #[test]
    fn expires_at_as_epoch_seconds_string() {
        let body = format!(
            r#"{{"access_token":"a","expires_at":" {} "}}"#,
            NOW_SECS + 120
        );
        assert_eq!(ok(&body).lifetime, secs(120));
    }

    #[test]
    fn expires_at_as_epoch_milliseconds() {
        let body = format!(
            r#"{{"access_token":"a","expires_at":{}}}"#,
            (NOW_SECS + 120) * 1000 + 500
        );
        assert_eq!(ok(&body).lifetime, Some(Duration::from_millis(120_500)));
        let body = format!(
            r#"{{"access_token":"a","expires_at":"{}"}}"#,
            (NOW_SECS + 120) * 1000
        );
        assert_eq!(ok(&body).lifetime, secs(120));
    }

    #[test]
    fn expires_at_in_the_past_saturates_at_zero() {
        let set = ok(r#"{"access_token":"a","expires_at":"2006-01-02T15:04:05Z"}"#);
        assert_eq!(set.lifetime, Some(Duration::ZERO));
        assert_eq!(set.lifetime_source, LifetimeSource::ExpiresAt);
    }

    #[test]
    fn invalid_expires_at_is_rejected() {
        for v in [
            r#""tomorrow""#,
            r#""2023-02-30T00:00:00Z""#,
            r#""2023-11-14T22:23""#,
            r#""""#,
            r#"-5"#,
            r#"true"#,
        ] {
            let body = format!(r#"{{"access_token":"a","expires_at":{v}}}"#);
            assert_eq!(
                bad_field_name(&body),
                "expires_at",
                "{v} should be rejected"
            );
        }
    }

    #[test]
    fn expires_in_wins_over_expires_at() {
        let set =
            ok(r#"{"access_token":"a","expires_in":300,"expires_at":"2030-01-01T00:00:00Z"}"#);
        assert_eq!(set.lifetime, secs(300));
        assert_eq!(set.lifetime_source, LifetimeSource::ExpiresIn);
    }

    #[test]
    fn refresh_token_expires_in_sets_refresh_token_lifetime() {
        let set =
            ok(r#"{"access_token":"a","refresh_token":"r","refresh_token_expires_in":"86400"}"#);
        assert_eq!(set.refresh_token_lifetime, secs(86_400));
        assert_eq!(set.lifetime, None);
    }

    #[test]
    fn refresh_token_expires_at_sets_refresh_token_lifetime() {
        let body = format!(
            r#"{{"access_token":"a","refresh_token":"r","refresh_token_expires_at":{}}}"#,
            NOW_SECS + 7200
        );
        assert_eq!(ok(&body).refresh_token_lifetime, secs(7200));
    }

    #[test]
    fn refresh_token_expires_in_wins_over_expires_at() {
        let set = ok(r#"{"access_token":"a","refresh_token_expires_in":10,
                "refresh_token_expires_at":"2030-01-01T00:00:00Z"}"#);
        assert_eq!(set.refresh_token_lifetime, secs(10));
    }

    #[test]
    fn invalid_refresh_token_expiry_is_rejected() {
        assert_eq!(
            bad_field_name(r#"{"access_token":"a","refresh_token_expires_in":"x"}"#),
            "refresh_token_expires_in"
        );
        assert_eq!(
            bad_field_name(r#"{"access_token":"a","refreshTokenExpiresAt":"x"}"#),
            "refresh_token_expires_at"
        );
    }

    #[test]
    fn jwt_exp_is_used_when_no_expiry_is_stated() {
        let token = jwt(&format!(r#"{{"sub":"c","exp":{}}}"#, NOW_SECS + 1800));
        let set = ok(&format!(r#"{{"access_token":"{token}"}}"#));
        assert_eq!(set.lifetime, secs(1800));
        assert_eq!(set.lifetime_source, LifetimeSource::JwtExp);
    }

    #[test]
    fn jwt_with_padded_segments_is_accepted() {
        let b64 = base64::engine::general_purpose::URL_SAFE;
        let claims = format!(r#"{{"exp":{}}}"#, NOW_SECS + 60);
        let token = format!(
            "{}.{}.sig",
            b64.encode(r#"{"alg":"none"}"#),
            b64.encode(claims)
        );
        assert!(token.contains('='), "the test token should carry padding");
        let set = ok(&format!(r#"{{"access_token":"{token}"}}"#));
        assert_eq!(set.lifetime, secs(60));
        assert_eq!(set.lifetime_source, LifetimeSource::JwtExp);
    }

    #[test]
    fn expired_jwt_gives_zero_lifetime() {
        let token = jwt(r#"{"exp":1000}"#);
        let set = ok(&format!(r#"{{"access_token":"{token}"}}"#));
        assert_eq!(set.lifetime, Some(Duration::ZERO));
        assert_eq!(set.lifetime_source, LifetimeSource::JwtExp);
    }

    #[test]
    fn stated_expiry_wins_over_jwt_exp() {
        let token = jwt(&format!(r#"{{"exp":{}}}"#, NOW_SECS + 1800));
        let set = ok(&format!(r#"{{"access_token":"{token}","expires_in":60}}"#));
        assert_eq!(set.lifetime, secs(60));
        assert_eq!(set.lifetime_source, LifetimeSource::ExpiresIn);
    }

    #[test]
    fn no_expiry_and_opaque_token_gives_no_lifetime() {
        let set = ok(r#"{"access_token":"opaque-token"}"#);
        assert_eq!(set.lifetime, None);
        assert_eq!(set.lifetime_source, LifetimeSource::None);
    }

    #[test]
    fn tokens_that_only_resemble_a_jwt_give_no_lifetime() {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let candidates = [
            "a.b.c".to_owned(),
            "..".to_owned(),
            jwt(r#"{"sub":"no exp"}"#),
            jwt(r#"{"exp":"1700000600"}"#),
            jwt(r#"[1,2,3]"#),
            format!("{}.{}", b64.encode("{}"), b64.encode(r#"{"exp":1}"#)),
            format!("{}.x", jwt(r#"{"exp":1700000600}"#)),
            format!("h.{}.s", b64.encode("not json")),
        ];
        for token in candidates {
            let set = ok(&format!(r#"{{"access_token":"{token}"}}"#));
            assert_eq!(
                set.lifetime_source,
                LifetimeSource::None,
                "{token} is not a usable JWT"
            );
            assert_eq!(set.lifetime, None);
        }
    }

    #[test]
    fn absurd_expires_in_is_clamped_to_ten_years() {
        for v in [
            "1000000000000",
            "1e300",
            r#""99999999999999999999999""#,
            "18446744073709551615",
        ] {
            let set = ok(&format!(r#"{{"access_token":"a","expires_in":{v}}}"#));
            assert_eq!(set.lifetime, Some(MAX_LIFETIME), "{v} should clamp");
            assert!(set.clamped());
        }
    }

    #[test]
    fn absurd_expires_at_is_clamped_to_ten_years() {
        for v in [r#""9999-12-31T23:59:59Z""#, "1e300", "99999999999999999999"] {
            let body = format!(
                r#"{{"access_token":"a","expires_at":{v},"refresh_token_expires_at":{v}}}"#
            );
            let set = ok(&body);
            assert_eq!(set.lifetime, Some(MAX_LIFETIME), "{v} should clamp");
            assert_eq!(
                set.refresh_token_lifetime,
                Some(MAX_LIFETIME),
                "{v} should clamp"
            );
        }
        let far = jwt(r#"{"exp":1e300}"#);
        assert_eq!(
            ok(&format!(r#"{{"access_token":"{far}"}}"#)).lifetime,
            Some(MAX_LIFETIME)
        );
    }

    #[test]
    fn empty_or_non_string_refresh_token_is_absent() {
        assert!(ok(r#"{"access_token":"a","refresh_token":""}"#)
            .refresh_token
            .is_none());
        assert!(ok(r#"{"access_token":"a","refresh_token":42}"#)
            .refresh_token
            .is_none());
        assert!(ok(r#"{"access_token":"a","refreshToken":{}}"#)
            .refresh_token
            .is_none());
    }

    #[test]
    fn missing_null_or_empty_access_token_is_missing() {
        for body in [
            r#"{}"#,
            r#"{"access_token":null}"#,
            r#"{"access_token":""}"#,
            r#"{"access_token":"  "}"#,
            r#"{"token":"a"}"#,
        ] {
            assert!(
                matches!(parse(body), Err(ResponseError::MissingAccessToken)),
                "{body} should have no access token"
            );
        }
    }

    #[test]
    fn non_string_access_token_is_a_bad_field() {
        assert_eq!(bad_field_name(r#"{"access_token":12345}"#), "access_token");
        assert_eq!(
            bad_field_name(r#"{"accessToken":{"v":"x"}}"#),
            "access_token"
        );
    }

    #[test]
    fn access_token_with_control_or_non_ascii_characters_is_rejected() {
        assert_eq!(
            bad_field_name(r#"{"access_token":"abc\r\nX-Evil: 1"}"#),
            "access_token"
        );
        assert_eq!(
            bad_field_name(r#"{"access_token":"abc\u0000"}"#),
            "access_token"
        );
        assert_eq!(
            bad_field_name(r#"{"access_token":"tökén"}"#),
            "access_token"
        );
    }

    #[test]
    fn invalid_json_is_not_json() {
        for body in ["", "not json", "<html></html>", r#"{"access_token":"a""#] {
            assert!(
                matches!(parse(body), Err(ResponseError::NotJson(_))),
                "{body:?} should be NotJson"
            );
        }
    }

    #[test]
    fn json_that_is_not_an_object_is_not_json() {
        for body in ["[]", r#""access_token""#, "42", "null", "true"] {
            assert!(
                matches!(parse(body), Err(ResponseError::NotJson(_))),
                "{body} should be NotJson"
            );
        }
    }

    #[test]
    fn token_type_is_kept_as_sent() {
        let set = ok(r#"{"access_token":"a","token_type":"DPoP"}"#);
        assert_eq!(set.token_type.as_deref(), Some("DPoP"));
        assert!(!set.is_bearer());
        assert!(ok(r#"{"access_token":"a","token_type":"BEARER"}"#).is_bearer());
        assert!(ok(r#"{"access_token":"a"}"#).is_bearer());
        assert!(ok(r#"{"access_token":"a","token_type":""}"#)
            .token_type
            .is_none());
        assert!(ok(r#"{"access_token":"a","token_type":7}"#)
            .token_type
            .is_none());
    }

    #[test]
    fn scope_array_is_joined_with_spaces() {
        let set = ok(r#"{"access_token":"a","scope":["payments","read"]}"#);
        assert_eq!(set.scope.as_deref(), Some("payments read"));
        assert!(ok(r#"{"access_token":"a","scope":[]}"#).scope.is_none());
    }

    #[test]
    fn lifetime_source_names_are_stable() {
        assert_eq!(LifetimeSource::ExpiresIn.as_str(), "expires_in");
        assert_eq!(LifetimeSource::ExpiresAt.as_str(), "expires_at");
        assert_eq!(LifetimeSource::JwtExp.as_str(), "jwt_exp");
        assert_eq!(LifetimeSource::None.as_str(), "none");
        assert_eq!(LifetimeSource::JwtExp.to_string(), "jwt_exp");
    }

    // --- secrets never leak ------------------------------------------------------------

    #[test]
    fn parse_failures_never_show_the_token_value() {
        let bodies = [
            r#"{"access_token":"at-5ecr3t-value","expires_in":"soon"}"#,
            r#"{"access_token":"at-5ecr3t-value","expires_at":"at-5ecr3t-value"}"#,
            r#"{"access_token":"at-5ecr3t-value","expires_in":-1}"#,
            r#"{"access_token":"at-5ecr3t-value","refresh_token_expires_in":"at-5ecr3t-value"}"#,
            r#"{"access_token":"at-5ecr3t-value"#,
            r#"{"access_token":"at-5ecr3t-value",}"#,
            r#"{"access_token":"at-5ecr3t-value\n"}"#,
            r#"["at-5ecr3t-value"]"#,
            r#"{"access_token":["at-5ecr3t-value"]}"#,
        ];
        for body in bodies {
            let err = match parse(body) {
                Err(e) => e,
                Ok(_) => panic!("{body} should fail to parse"),
            };
            assert!(
                !err.to_string().contains("5ecr3t"),
                "Display leaked the token: {err}"
            );
            assert!(
                !format!("{err:?}").contains("5ecr3t"),
                "Debug leaked the token: {err:?}"
            );
        }
    }

    #[test]
    fn token_set_debug_never_shows_tokens() {
        let set = ok(r#"{"access_token":"at-5ecr3t-value","refresh_token":"rt-5ecr3t"}"#);
        let debug = format!("{set:?}");
        assert!(!debug.contains("5ecr3t"), "Debug leaked a token: {debug}");
    }

    // --- RFC 3339 ----------------------------------------------------------------------

    #[test]
    fn rfc3339_utc_values() {
        assert_eq!(rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339("2006-01-02T15:04:05Z"), Some(1_136_214_245));
        assert_eq!(rfc3339("2023-11-14T22:13:20Z"), Some(NOW_SECS));
        assert_eq!(rfc3339("2000-03-01T00:00:00Z"), Some(951_868_800));
        assert_eq!(rfc3339("2038-01-19T03:14:08Z"), Some(1 << 31));
    }

    #[test]
    fn rfc3339_agrees_with_humantime_for_utc() {
        // A tiny xorshift walk over 1970..2400, cross-checked with an independent parser.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let t = UNIX_EPOCH + Duration::new(x % 13_569_465_600, (x % 1_000_000_000) as u32);
            let text = humantime::format_rfc3339_nanos(t).to_string();
            assert_eq!(parse_rfc3339(&text), Some(t), "{text}");
            assert_eq!(humantime::parse_rfc3339(&text).ok(), Some(t), "{text}");
        }
    }

    #[test]
    fn rfc3339_fractions() {
        let t = |s| parse_rfc3339(s).and_then(|t| t.duration_since(UNIX_EPOCH).ok());
        assert_eq!(
            t("1970-01-01T00:00:01.5Z"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            t("1970-01-01T00:00:01,25Z"),
            Some(Duration::from_millis(1250))
        );
        assert_eq!(
            t("1970-01-01T00:00:01.123456789999Z"),
            Some(Duration::new(1, 123_456_789))
        );
        assert_eq!(t("1970-01-01T00:00:01.Z"), None);
    }

    #[test]
    fn rfc3339_offsets() {
        let utc = rfc3339("2006-01-02T15:04:05Z");
        assert_eq!(rfc3339("2006-01-02T16:04:05+01:00"), utc);
        assert_eq!(rfc3339("2006-01-02T16:04:05+0100"), utc);
        assert_eq!(rfc3339("2006-01-02T16:04:05+01"), utc);
        assert_eq!(rfc3339("2006-01-02T08:04:05-07:00"), utc);
        assert_eq!(rfc3339("2006-01-02T20:34:05+05:30"), utc);
        assert_eq!(rfc3339("2006-01-02T15:04:05+00:00"), utc);
        assert_eq!(rfc3339("2006-01-02T15:04:05-00:00"), utc);
        assert_eq!(rfc3339("2006-01-02T15:04:05"), utc, "no offset means UTC");
        assert_eq!(rfc3339("2006-01-02 15:04:05Z"), utc, "space separator");
        assert_eq!(rfc3339("2006-01-02t15:04:05z"), utc, "lower case");
        assert_eq!(
            rfc3339("1970-01-01T00:30:00+01:00"),
            Some(0),
            "before 1970 in UTC"
        );
        assert!(parse_rfc3339("1969-12-31T23:00:00Z").is_some_and(|t| t < UNIX_EPOCH));
    }

    #[test]
    fn rfc3339_calendar_rules() {
        assert!(
            rfc3339("2000-02-29T00:00:00Z").is_some(),
            "2000 is a leap year"
        );
        assert!(
            rfc3339("2024-02-29T00:00:00Z").is_some(),
            "2024 is a leap year"
        );
        assert!(
            rfc3339("1900-02-29T00:00:00Z").is_none(),
            "1900 is not a leap year"
        );
        assert!(
            rfc3339("2023-02-29T00:00:00Z").is_none(),
            "2023 is not a leap year"
        );
        assert!(rfc3339("2023-04-31T00:00:00Z").is_none());
        assert_eq!(
            rfc3339("2016-12-31T23:59:60Z"),
            rfc3339("2017-01-01T00:00:00Z"),
            "a leap second lands on the next minute"
        );
    }

    #[test]
    fn rfc3339_rejects_malformed_input() {
        for s in [
            "",
            "2006",
            "2006-01-02",
            "2006-1-02T15:04:05Z",
            "2006-13-02T15:04:05Z",
            "2006-00-02T15:04:05Z",
            "2006-01-00T15:04:05Z",
            "2006-01-32T15:04:05Z",
            "2006-01-02T24:00:00Z",
            "2006-01-02T23:60:00Z",
            "2006-01-02T23:59:61Z",
            "2006-01-02T15:04Z",
            "2006-01-02X15:04:05Z",
            "2006-01-02T15:04:05ZZ",
            "2006-01-02T15:04:05+24:00",
            "2006-01-02T15:04:05+01:60",
            "2006-01-02T15:04:05+1",
            "2006-01-02T15:04:05+01:0",
            "2006-01-02T15:04:05 UTC",
            "+2006-01-02T15:04:05Z",
            "２００６-01-02T15:04:05Z",
        ] {
            assert_eq!(parse_rfc3339(s), None, "{s:?} should be rejected");
        }
    }

    // --- parse_success_with: a response mapping ---------------------------------------

    fn path(text: &str) -> Option<FieldPath> {
        Some(FieldPath::parse(text).unwrap_or_else(|| panic!("{text:?} is a valid path")))
    }

    fn mapped(body: &str, mapping: &ResponseMapping) -> Result<TokenSet, ResponseError> {
        parse_success_with(body.as_bytes(), now(), mapping)
    }

    fn mapped_ok(body: &str, mapping: &ResponseMapping) -> TokenSet {
        mapped(body, mapping).unwrap_or_else(|e| panic!("body should parse, got error: {e}"))
    }

    /// A commerce API: absolute expiries under its own names, in epoch seconds.
    fn commerce() -> ResponseMapping {
        ResponseMapping {
            expires_at: path("access_token_expiration"),
            expires_at_unit: Some(TimestampUnit::EpochSeconds),
            refresh_token_expires_at: path("refresh_token_expiration"),
            refresh_token_expires_at_unit: Some(TimestampUnit::EpochSeconds),
            ..ResponseMapping::default()
        }
    }

    const COMMERCE: &str = r#"{"access_token":"at-5ecr3t-value","token_type":"Bearer",
        "access_token_expiration":1700000600,"refresh_token":"rt-1",
        "refresh_token_expiration":"1700086400"}"#;

    #[test]
    fn expirations_under_other_names_in_epoch_seconds_are_read_through_the_mapping() {
        let set = mapped_ok(COMMERCE, &commerce());
        assert_eq!(set.access_token.expose(), TOKEN);
        assert_eq!(
            (set.lifetime, set.lifetime_source),
            (secs(600), LifetimeSource::ExpiresAt),
            "access_token_expiration is 600 s after now"
        );
        assert_eq!(
            set.refresh_token_lifetime,
            secs(86_400),
            "refresh_token_expiration (a numeric string) is a day after now"
        );
        let unmapped = ok(COMMERCE);
        assert_eq!(
            (unmapped.lifetime, unmapped.refresh_token_lifetime),
            (None, None),
            "without the mapping these names mean nothing"
        );
    }

    #[test]
    fn dotted_paths_reach_into_nested_objects() {
        let mapping = ResponseMapping {
            access_token: path("data.token"),
            expires_in: path("data.ttl"),
            refresh_token: path("data.refresh.token"),
            refresh_token_expires_in: path("data.refresh.ttl"),
            token_type: path("data.kind"),
            scope: path("grants"),
            ..ResponseMapping::default()
        };
        let set = mapped_ok(
            r#"{"status":"ok","grants":["read","write"],"data":{"token":"at-5ecr3t-value","ttl":"900",
                "kind":"bearer","refresh":{"token":"rt-2","ttl":86400}}}"#,
            &mapping,
        );
        assert_eq!(set.access_token.expose(), TOKEN);
        assert_eq!(
            (set.lifetime, set.lifetime_source),
            (secs(900), LifetimeSource::ExpiresIn)
        );
        assert_eq!(set.refresh_token.as_ref().map(Secret::expose), Some("rt-2"));
        assert_eq!(set.refresh_token_lifetime, secs(86_400));
        assert_eq!(set.token_type.as_deref(), Some("bearer"));
        assert_eq!(set.scope.as_deref(), Some("read write"));
    }

    #[test]
    fn a_mapped_field_is_read_only_where_the_mapping_says() {
        let mapping = ResponseMapping {
            access_token: path("data.token"),
            expires_in: path("data.ttl"),
            ..ResponseMapping::default()
        };
        for body in [
            r#"{"access_token":"std","accessToken":"camel"}"#,
            r#"{"data":"at-5ecr3t-value"}"#,
            r#"{"data":{"token":null},"access_token":"std"}"#,
            r#"{"data":[{"token":"at"}]}"#,
        ] {
            assert!(
                matches!(
                    mapped(body, &mapping),
                    Err(ResponseError::MissingAccessToken)
                ),
                "{body}: the standard names are not read for a mapped field"
            );
        }
        let set = mapped_ok(
            r#"{"data":{"token":"a"},"expires_in":900,"expiresAt":"2023-11-14T22:23:20Z"}"#,
            &mapping,
        );
        assert_eq!(
            (set.lifetime, set.lifetime_source),
            (secs(600), LifetimeSource::ExpiresAt),
            "expires_in is mapped elsewhere (absent here), so the standard expiresAt decides"
        );
    }

    #[test]
    fn expires_at_units_decide_how_a_number_is_read() {
        let unit = |u: TimestampUnit| ResponseMapping {
            expires_at_unit: Some(u),
            ..ResponseMapping::default()
        };
        let millis = unit(TimestampUnit::EpochMillis);
        for body in [
            r#"{"access_token":"a","expires_at":1700000600000}"#,
            r#"{"access_token":"a","expires_at":"1700000600000"}"#,
            r#"{"access_token":"a","expires_at":1700000600000.0}"#,
        ] {
            assert_eq!(mapped_ok(body, &millis).lifetime, secs(600), "{body}");
        }
        assert_eq!(
            mapped_ok(r#"{"access_token":"a","expires_at":1700000600}"#, &millis).lifetime,
            Some(Duration::ZERO),
            "in milliseconds, 1700000600 is January 1970: already expired"
        );

        // Above the threshold at which a number is guessed to be milliseconds.
        let huge = r#"{"access_token":"a","expires_at":100000000001}"#;
        assert_eq!(
            ok(huge).lifetime,
            Some(Duration::ZERO),
            "unstated, it is taken as milliseconds: 1973"
        );
        assert_eq!(
            mapped_ok(huge, &unit(TimestampUnit::EpochSeconds)).lifetime,
            Some(MAX_LIFETIME),
            "in seconds it is the year 5138: clamped, never divided"
        );

        let rfc = unit(TimestampUnit::Rfc3339);
        assert_eq!(
            mapped_ok(
                r#"{"access_token":"a","expires_at":"2023-11-14T22:23:20Z"}"#,
                &rfc
            )
            .lifetime,
            secs(600)
        );
    }

    #[test]
    fn a_value_that_does_not_fit_its_unit_is_a_bad_field_naming_where_it_was_read() {
        let reason = |body: &str, mapping: &ResponseMapping| match mapped(body, mapping) {
            Err(ResponseError::BadField { field, reason }) => format!("{field}: {reason}"),
            other => panic!("{body} should be a bad field, got {other:?}"),
        };
        assert_eq!(
            reason(
                r#"{"access_token":"a","access_token_expiration":"2023-11-14T22:23:20Z"}"#,
                &commerce()
            ),
            "expires_at: must be epoch seconds, as its unit says (read from access_token_expiration)"
        );
        let rfc = ResponseMapping {
            refresh_token_expires_at_unit: Some(TimestampUnit::Rfc3339),
            ..ResponseMapping::default()
        };
        assert_eq!(
            reason(
                r#"{"access_token":"a","refresh_token_expires_at":1700000600}"#,
                &rfc
            ),
            "refresh_token_expires_at: must be an RFC 3339 timestamp, as its unit says"
        );
        assert_eq!(
            reason(
                r#"{"access_token":"a","refresh_token_expires_at":"tomorrow"}"#,
                &rfc
            ),
            "refresh_token_expires_at: must be an RFC 3339 timestamp"
        );
        let millis = ResponseMapping {
            expires_at_unit: Some(TimestampUnit::EpochMillis),
            ..ResponseMapping::default()
        };
        assert_eq!(
            reason(r#"{"access_token":"a","expires_at":"soon"}"#, &millis),
            "expires_at: must be epoch milliseconds, as its unit says"
        );
        let nested = ResponseMapping {
            access_token: path("data.token"),
            ..ResponseMapping::default()
        };
        assert_eq!(
            reason(r#"{"data":{"token":42}}"#, &nested),
            "access_token: expected a string, found a number (read from data.token)"
        );
    }

    #[test]
    fn the_access_and_refresh_units_are_separate() {
        let mapping = ResponseMapping {
            expires_at_unit: Some(TimestampUnit::EpochSeconds),
            refresh_token_expires_at_unit: Some(TimestampUnit::EpochMillis),
            ..ResponseMapping::default()
        };
        let set = mapped_ok(
            r#"{"access_token":"a","expires_at":1700000600,"refresh_token_expires_at":1700086400000}"#,
            &mapping,
        );
        assert_eq!(
            (set.lifetime, set.refresh_token_lifetime),
            (secs(600), secs(86_400))
        );
    }

    #[test]
    fn the_default_mapping_reads_exactly_what_parse_success_reads() {
        let bodies = [
            COMMERCE,
            r#"{"accessToken":"at-5ecr3t-value","expiresIn":"3600","refreshToken":"r"}"#,
            r#"{"access_token":"a","expires_at":"2023-11-14T22:23:20Z","scope":["x"]}"#,
            r#"{"access_token":"","expires_in":-1}"#,
            r#"[1]"#,
        ];
        for body in bodies {
            let plain = format!("{:?}", parse(body));
            let with = format!("{:?}", mapped(body, &ResponseMapping::default()));
            assert_eq!(plain, with, "{body}");
        }
    }

    // --- parse_error -------------------------------------------------------------------

    #[test]
    fn rfc6749_error_body() {
        let e = parse_error(
            StatusCode::BAD_REQUEST,
            br#"{"error":"invalid_grant","error_description":"Invalid credentials given."}"#,
        );
        assert_eq!(e.error.as_deref(), Some("invalid_grant"));
        assert_eq!(e.description.as_deref(), Some("Invalid credentials given."));
        assert_eq!(
            e.to_string(),
            "400 Bad Request: invalid_grant (Invalid credentials given.)"
        );
        assert!(e.is_rejection());
    }

    #[test]
    fn rfc6749_error_without_description() {
        let e = parse_error(StatusCode::UNAUTHORIZED, br#"{"error":"invalid_client"}"#);
        assert_eq!(e.error.as_deref(), Some("invalid_client"));
        assert_eq!(e.description, None);
        assert_eq!(e.to_string(), "401 Unauthorized: invalid_client");
    }

    #[test]
    fn errors_array_body() {
        let e = parse_error(
            StatusCode::UNAUTHORIZED,
            br#"{"errors":[{"category":"AUTHENTICATION_ERROR","code":"UNAUTHORIZED",
                "detail":"The refresh token is expired."},{"code":"OTHER"}]}"#,
        );
        assert_eq!(e.error.as_deref(), Some("UNAUTHORIZED"));
        assert_eq!(
            e.description.as_deref(),
            Some("The refresh token is expired.")
        );
        assert!(e.is_rejection());
    }

    #[test]
    fn errors_array_with_category_only() {
        let e = parse_error(
            StatusCode::BAD_REQUEST,
            br#"{"errors":[{"category":"INVALID_REQUEST_ERROR"}]}"#,
        );
        assert_eq!(e.error.as_deref(), Some("INVALID_REQUEST_ERROR"));
        assert_eq!(e.description, None);
    }

    #[test]
    fn message_body() {
        let e = parse_error(
            StatusCode::FORBIDDEN,
            br#"{"message":"Client is not allowed to use this grant"}"#,
        );
        assert_eq!(e.error, None);
        assert_eq!(
            e.description.as_deref(),
            Some("Client is not allowed to use this grant")
        );
        assert_eq!(
            e.to_string(),
            "403 Forbidden: Client is not allowed to use this grant"
        );
    }

    #[test]
    fn nested_error_object_body() {
        let e = parse_error(
            StatusCode::BAD_REQUEST,
            br#"{"error":{"code":"invalid_scope","message":"scope x is unknown"}}"#,
        );
        assert_eq!(e.error.as_deref(), Some("invalid_scope"));
        assert_eq!(e.description.as_deref(), Some("scope x is unknown"));
    }

    #[test]
    fn json_without_error_fields() {
        let e = parse_error(StatusCode::INTERNAL_SERVER_ERROR, br#"{"ok":false}"#);
        assert_eq!((e.error.as_deref(), e.description.as_deref()), (None, None));
        assert_eq!(e.to_string(), "500 Internal Server Error: no error details");
        let e = parse_error(StatusCode::BAD_GATEWAY, br#""oops""#);
        assert_eq!(e.error, None);
        assert!(e.description.is_some_and(|d| !d.contains("oops")));
    }

    #[test]
    fn html_body_is_described_not_echoed() {
        let e = parse_error(
            StatusCode::BAD_GATEWAY,
            b"<html><body><h1>502 Bad Gateway</h1>nginx secret-internal-host</body></html>",
        );
        assert_eq!(e.error, None);
        assert_eq!(e.to_string(), "502 Bad Gateway: non-JSON body (text/html?)");
        assert!(!e.to_string().contains("nginx"));
        assert!(!e.is_rejection());
    }

    #[test]
    fn empty_body() {
        let e = parse_error(StatusCode::SERVICE_UNAVAILABLE, b"");
        assert_eq!(e.error, None);
        assert_eq!(e.description.as_deref(), Some("empty body"));
        assert_eq!(
            parse_error(StatusCode::BAD_REQUEST, b" \r\n")
                .description
                .as_deref(),
            Some("empty body")
        );
    }

    #[test]
    fn truncated_json_body() {
        let e = parse_error(
            StatusCode::BAD_REQUEST,
            br#"{"error":"invalid_grant","error_description":"refresh tok"#,
        );
        assert_eq!(e.error, None);
        assert_eq!(
            e.description.as_deref(),
            Some("non-JSON body (truncated JSON?)")
        );
        assert!(!e.to_string().contains("refresh tok"));
    }

    #[test]
    fn plain_text_body() {
        let e = parse_error(StatusCode::UNAUTHORIZED, b"Unauthorized: token abc");
        assert_eq!(e.description.as_deref(), Some("non-JSON body"));
        assert!(!e.to_string().contains("abc"));
    }

    #[test]
    fn description_is_sanitized() {
        let e = parse_error(
            StatusCode::BAD_REQUEST,
            "{\"error\":\"invalid\\u0000_grant\",\"error_description\":\"line one\\r\\n\\tline\\u001b[31m two\\u202e \"}"
                .as_bytes(),
        );
        assert_eq!(e.error.as_deref(), Some("invalid_grant"));
        assert_eq!(e.description.as_deref(), Some("line one line[31m two"));
        let e = parse_error(
            StatusCode::BAD_REQUEST,
            br#"{"error":"","error_description":" \n "}"#,
        );
        assert_eq!((e.error, e.description), (None, None));
    }

    /// Security review finding 4: credentials the provider repeats are scrubbed from the
    /// code, the description and a point-of-sale `errors` array, before truncation and
    /// across characters that sanitizing removes.
    #[test]
    fn echoed_credentials_are_scrubbed_from_every_kept_field() {
        let mut r = Redactor::default();
        r.secret("rt-echo-1234");
        let cases: [&[u8]; 5] = [
            br#"{"error":"invalid_grant","error_description":"Invalid refresh token: rt-echo-1234"}"#,
            br#"{"errors":[{"category":"AUTHENTICATION_ERROR","code":"rt-echo-1234","detail":"Invalid refresh token: rt-echo-1234"}]}"#,
            br#"{"errors":["Invalid refresh token: rt-echo-1234"]}"#,
            br#"{"error":{"code":"invalid_grant","message":"Invalid refresh token: rt-echo\u200b-1234"}}"#,
            br#"{"error":"invalid_grant","error_description":"Invalid refresh token: rt-echo\u0000-1234"}"#,
        ];
        for body in cases {
            let e = parse_error_redacted(StatusCode::BAD_REQUEST, body, &r);
            let kept = format!("{e} {e:?}");
            assert!(
                !kept.contains("rt-echo") && kept.contains("[redacted]"),
                "the refresh token should have been scrubbed from {}: {kept}",
                String::from_utf8_lossy(body)
            );
        }
        let long = format!(
            r#"{{"error_description":"{}rt-echo-1234"}}"#,
            "x ".repeat(98)
        );
        let e = parse_error_redacted(StatusCode::BAD_REQUEST, long.as_bytes(), &r);
        let kept = e.description.unwrap_or_default();
        assert!(
            !kept.contains("rt-e"),
            "truncation must not leave the start of a credential: {kept}"
        );
    }

    /// Security review finding 4: the app is told the RFC 6749 code with a fixed
    /// description, never the provider's own text or an unregistered code.
    #[test]
    fn the_app_summary_never_carries_provider_text() {
        let e = parse_error(
            StatusCode::BAD_REQUEST,
            br#"{"error":"INVALID_GRANT","error_description":"provider words"}"#,
        );
        let summary = e.app_summary();
        assert!(
            summary.starts_with("400 Bad Request: invalid_grant (")
                && !summary.contains("provider words"),
            "the app should see the code and a fixed description: {summary}"
        );
        let e = parse_error(StatusCode::BAD_REQUEST, br#"{"error":"secret-ish-code"}"#);
        assert_eq!(
            e.app_summary(),
            "400 Bad Request: the provider refused the request"
        );
        let e = parse_error(StatusCode::BAD_GATEWAY, br#"{"message":"upstream words"}"#);
        assert_eq!(e.app_summary(), "502 Bad Gateway: the provider failed");
    }

    #[test]
    fn description_is_truncated_to_200_characters() {
        let long = "é".repeat(1000);
        let body = format!(r#"{{"error":"invalid_request","error_description":"{long}"}}"#);
        let e = parse_error(StatusCode::BAD_REQUEST, body.as_bytes());
        let description = e.description.unwrap_or_default();
        assert_eq!(description.chars().count(), 200);
        assert!(description.ends_with('…'));
        let exact = "x".repeat(200);
        let body = format!(r#"{{"error_description":"{exact}"}}"#);
        let e = parse_error(StatusCode::BAD_REQUEST, body.as_bytes());
        assert_eq!(
            e.description.as_deref(),
            Some(exact.as_str()),
            "200 chars fit"
        );
    }

    #[test]
    fn is_rejection_by_status_and_code() {
        let cases: &[(u16, Option<&str>, bool)] = &[
            (400, Some("invalid_grant"), true),
            (400, None, true),
            (401, Some("invalid_client"), true),
            (403, Some("access_denied"), true),
            (400, Some("temporarily_unavailable"), false),
            (401, Some("server_error"), false),
            (404, None, true),
            (408, None, false),
            (429, None, false),
            (429, Some("invalid_grant"), false),
            (500, None, false),
            (500, Some("invalid_grant"), false),
            (503, Some("temporarily_unavailable"), false),
            (400, Some("use_dpop_nonce"), false),
            (400, Some("invalid_dpop_proof"), false),
            (401, Some("USE_DPOP_NONCE"), false),
            (200, Some("invalid_grant"), true),
            (200, Some("unauthorized_client"), true),
            (302, None, false),
        ];
        for &(status, code, want) in cases {
            let e = ProviderError {
                status: StatusCode::from_u16(status).unwrap_or(StatusCode::IM_A_TEAPOT),
                error: code.map(str::to_owned),
                description: None,
                meaning: None,
            };
            assert_eq!(e.is_rejection(), want, "{status} {code:?}");
        }
    }

    // --- [[token.errors]] rules ---------------------------------------------------------

    const GATEWAY: &[u8] =
        br#"{"status":"FAILURE","errorCode":"INVALID_CREDENTIALS","message":"Bad refresh token"}"#;

    fn rule(
        status: Option<u16>,
        error: Option<&str>,
        body: Option<&str>,
        means: ErrorMeaning,
    ) -> ErrorRule {
        ErrorRule {
            status: status.and_then(|s| StatusCode::from_u16(s).ok()),
            error: error.map(str::to_owned),
            body_contains: body.map(str::to_owned),
            means,
        }
    }

    #[test]
    fn a_rejected_rule_makes_a_gateways_500_a_rejection_like_a_400() {
        let rules = [rule(
            Some(500),
            None,
            Some("INVALID_CREDENTIALS"),
            ErrorMeaning::Rejected,
        )];
        let plain = parse_error(StatusCode::INTERNAL_SERVER_ERROR, GATEWAY);
        assert!(
            !plain.is_rejection(),
            "without a rule a 500 is a failure, whatever its body says"
        );
        let e = parse_error_with(StatusCode::INTERNAL_SERVER_ERROR, GATEWAY, &rules);
        assert_eq!(e.meaning, Some(ErrorMeaning::Rejected));
        assert!(e.is_rejection(), "the rule decides: rejected");
        assert!(!e.needs_authorization());
        assert_eq!(
            e.to_string(),
            "500 Internal Server Error: INVALID_CREDENTIALS (Bad refresh token); rejected by token.errors"
        );
        assert_eq!(
            e.app_summary(),
            "500 Internal Server Error: the provider refused the request"
        );
        let other = parse_error_with(
            StatusCode::INTERNAL_SERVER_ERROR,
            br#"{"status":"FAILURE","errorCode":"SYSTEM_ERROR"}"#,
            &rules,
        );
        assert_eq!(
            other.meaning, None,
            "an unmatched 500 keeps the built-in meaning"
        );
        assert!(!other.is_rejection());
    }

    #[test]
    fn a_transient_rule_makes_a_refusal_a_failure() {
        let rules = [rule(
            None,
            Some("invalid_grant"),
            Some("try again"),
            ErrorMeaning::Transient,
        )];
        let busy = br#"{"error":"invalid_grant","error_description":"Database busy, try again"}"#;
        let e = parse_error_with(StatusCode::BAD_REQUEST, busy, &rules);
        assert!(!e.is_rejection(), "the rule decides: transient");
        let dead = br#"{"error":"invalid_grant","error_description":"Refresh token revoked"}"#;
        assert!(
            parse_error_with(StatusCode::BAD_REQUEST, dead, &rules).is_rejection(),
            "every condition must hold: without the text it is the usual rejection"
        );
    }

    #[test]
    fn rules_compare_the_code_ignoring_case_and_the_first_match_decides() {
        let rules = [
            rule(
                Some(401),
                Some("invalid_credentials"),
                None,
                ErrorMeaning::Transient,
            ),
            rule(
                None,
                Some("invalid_credentials"),
                None,
                ErrorMeaning::NeedsAuthorization,
            ),
            rule(Some(500), None, None, ErrorMeaning::Rejected),
        ];
        let e = parse_error_with(StatusCode::INTERNAL_SERVER_ERROR, GATEWAY, &rules);
        assert_eq!(
            e.meaning,
            Some(ErrorMeaning::NeedsAuthorization),
            "the first rule wants a 401, so the second decides"
        );
        assert!(e.is_rejection() && e.needs_authorization());
        let e = parse_error_with(StatusCode::UNAUTHORIZED, GATEWAY, &rules);
        assert_eq!(e.meaning, Some(ErrorMeaning::Transient));
        let e = parse_error_with(
            StatusCode::INTERNAL_SERVER_ERROR,
            b"<html>oops</html>",
            &rules,
        );
        assert_eq!(
            e.meaning,
            Some(ErrorMeaning::Rejected),
            "a status-only rule matches whatever the body"
        );
        let e = parse_error_with(StatusCode::BAD_GATEWAY, GATEWAY, &rules[2..]);
        assert_eq!(e.meaning, None);
    }

    #[test]
    fn a_status_only_rule_does_not_make_a_refused_dpop_proof_a_rejection() {
        let rules = [
            rule(Some(400), None, None, ErrorMeaning::Rejected),
            rule(
                Some(401),
                None,
                Some("proof"),
                ErrorMeaning::NeedsAuthorization,
            ),
        ];
        for (status, body) in [
            (
                StatusCode::BAD_REQUEST,
                &br#"{"error":"use_dpop_nonce"}"#[..],
            ),
            (
                StatusCode::BAD_REQUEST,
                br#"{"error":"INVALID_DPOP_PROOF"}"#,
            ),
            (
                StatusCode::UNAUTHORIZED,
                br#"{"error":"invalid_dpop_proof","error_description":"bad proof"}"#,
            ),
        ] {
            let e = parse_error_with(status, body, &rules);
            assert_eq!(
                e.meaning, None,
                "{status}: a proof refusal is not the grant's"
            );
            assert!(!e.is_rejection(), "{status}: a refused proof is a failure");
            assert!(!e.needs_authorization(), "{status}");
        }
        let other = parse_error_with(StatusCode::BAD_REQUEST, br#"{"error":"x"}"#, &rules);
        assert_eq!(
            other.meaning,
            Some(ErrorMeaning::Rejected),
            "other codes: the rule decides"
        );
        let named = [rule(
            None,
            Some("invalid_dpop_proof"),
            None,
            ErrorMeaning::NeedsAuthorization,
        )];
        let e = parse_error_with(
            StatusCode::BAD_REQUEST,
            br#"{"error":"invalid_dpop_proof"}"#,
            &named,
        );
        assert_eq!(
            e.meaning,
            Some(ErrorMeaning::NeedsAuthorization),
            "a rule that names the proof code decides"
        );
    }

    // --- robustness --------------------------------------------------------------------

    #[test]
    fn garbage_bytes_never_panic() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds: [&[u8]; 4] = [
            br#"{"access_token":"a.eyJleHAiOjE3MDAwMDA2MDB9.c","expires_at":"2023-11-14T22:23:20+01:00"}"#,
            br#"{"errors":[{"category":"A","code":"B","detail":"C"}],"error":"x"}"#,
            br#"{"accessToken":"t","expiresIn":"3600","refreshTokenExpiresAt":1700000600000}"#,
            b"\xff\xfe\x00<html>",
        ];
        for round in 0..3000 {
            let mut body: Vec<u8> = if round % 2 == 0 {
                seeds[round % seeds.len()].to_vec()
            } else {
                (0..next() % 200).map(|_| next() as u8).collect()
            };
            for _ in 0..(next() % 4) {
                if body.is_empty() {
                    break;
                }
                let i = (next() as usize) % body.len();
                body[i] = next() as u8;
            }
            let _ = parse_success(&body, now());
            let e = parse_error(StatusCode::BAD_REQUEST, &body);
            let chars = e.description.as_ref().map_or(0, |d| d.chars().count());
            assert!(chars <= 200, "description should be at most 200 chars");
            let _ = e.to_string();
        }
    }

    #[test]
    fn one_mebibyte_bodies_never_panic() {
        let mib = 1 << 20;
        let garbage: Vec<u8> = (0..mib).map(|i| (i * 31 % 251) as u8).collect();
        let _ = parse_success(&garbage, now());
        assert_eq!(parse_error(StatusCode::BAD_GATEWAY, &garbage).error, None);

        let long = format!(
            r#"{{"error":"invalid_grant","error_description":"{}"}}"#,
            "a".repeat(mib)
        );
        let e = parse_error(StatusCode::BAD_REQUEST, long.as_bytes());
        assert_eq!(e.description.map(|d| d.chars().count()), Some(200));

        let nested = "[".repeat(mib);
        assert!(matches!(
            parse_success(nested.as_bytes(), now()),
            Err(ResponseError::NotJson(_))
        ));
        assert_eq!(
            parse_error(StatusCode::BAD_REQUEST, nested.as_bytes()).error,
            None
        );

        let token = format!(r#"{{"access_token":"{}"}}"#, "x.".repeat(mib / 2));
        assert_eq!(ok(&token).lifetime_source, LifetimeSource::None);
    }
}
