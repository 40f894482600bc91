//! Properties of `tokenproxy::token::response::{parse_success, parse_error}`.
//!
//! For every body:
//! - neither function panics;
//! - a successful parse has a non-empty access token made of visible ASCII (it goes into a
//!   header as is), the token the body names first (`access_token`, else `accessToken`),
//!   lifetimes of at most `MAX_LIFETIME`, a lifetime source that matches the lifetime, and
//!   `expires_in` taken literally when it is a whole number;
//! - a `ProviderError`'s code and description are sanitized text (no control or invisible
//!   formatting characters, single spaces, no surrounding space, at most 200 characters),
//!   and a body that is not JSON is described, never quoted;
//! - no access or refresh token of 8 or more characters from a JSON object body shows in
//!   the `Display` or `Debug` of the error, the `ProviderError` or the `TokenSet`.
//!
//! The leak check is differential, so that legitimate coincidences do not count: when a
//! token's text shows in the output, the body is parsed again with only that token's
//! value changed (letters rotated by 13, digits by 5: same length, same character
//! classes, so the same code path). If the token's text is then gone from the output, it
//! came from the token, and that is a leak; if it is still there, it came from elsewhere
//! (another field with the same text, or fixed wording such as "Bad Request").

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, StatusCode};
use serde_json::{Map, Value};
use tokenproxy::token::response::{
    parse_error, parse_success, LifetimeSource, ProviderError, ResponseError, TokenSet,
    MAX_LIFETIME,
};

/// Keys whose string values are credentials (aliases as `response.rs` lists them).
const ACCESS_KEYS: [&str; 2] = ["access_token", "accessToken"];
const REFRESH_KEYS: [&str; 2] = ["refresh_token", "refreshToken"];
const EXPIRES_IN_KEYS: [&str; 2] = ["expires_in", "expiresIn"];

/// Shorter values are too likely to occur in fixed wording to be worth checking.
pub const MIN_SECRET_CHARS: usize = 8;

/// Longest kept provider text, in characters (`MAX_TEXT_CHARS` in response.rs).
const MAX_TEXT_CHARS: usize = 200;

/// What `parse_error` says about a body that is not JSON; nothing else is allowed.
const NON_JSON_NOTES: [&str; 4] = [
    "empty body",
    "non-JSON body (text/html?)",
    "non-JSON body (truncated JSON?)",
    "non-JSON body",
];

/// The wall clock used by the raw-bytes target: 2023-11-14T22:13:20Z.
pub fn default_now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

/// A status for the raw-bytes target, picked without consuming input bytes.
pub fn status_for(body: &[u8]) -> StatusCode {
    const STATUSES: [u16; 10] = [400, 401, 403, 429, 500, 502, 503, 200, 404, 408];
    StatusCode::from_u16(STATUSES[body.len() % STATUSES.len()]).unwrap_or(StatusCode::BAD_REQUEST)
}

/// Runs both parsers on `body` and checks every property above.
pub fn check(body: &[u8], now: SystemTime, status: StatusCode) {
    let success = parse_success(body, now);
    let provider = parse_error(status, body);
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let object = match &json {
        Some(Value::Object(obj)) => Some(obj),
        _ => None,
    };

    match &success {
        Ok(set) => check_token_set(set, object),
        Err(e) => check_response_error(e, object),
    }
    check_provider_error(&provider, json.as_ref());

    if let Some(obj) = object {
        let rendered = render(&success, &provider);
        for secret in secrets(obj) {
            if !rendered.contains(secret.as_str()) {
                continue;
            }
            let changed = rotate(&secret);
            if changed == secret {
                continue; // no letter or digit to change: cannot tell where it came from
            }
            let other = with_secret_replaced(obj, &secret, &changed);
            let again = render(&parse_success(&other, now), &parse_error(status, &other));
            assert!(
                again.contains(secret.as_str()),
                "a token from the body shows in formatted output\n  token: {secret:?}\n  output: {rendered}"
            );
        }
    }
}

fn check_token_set(set: &TokenSet, object: Option<&Map<String, Value>>) {
    let token = set.access_token.expose();
    assert!(
        !token.is_empty(),
        "a successful parse has an empty access token"
    );
    assert!(
        !token.trim().is_empty(),
        "a successful parse has a blank access token"
    );
    assert!(
        token.bytes().all(|b| (0x20..=0x7e).contains(&b)),
        "access token has bytes outside VSCHAR: {:?}",
        token.len()
    );
    assert!(
        HeaderValue::from_str(&format!("Bearer {token}")).is_ok(),
        "access token cannot be sent in a header"
    );
    assert!(
        set.lifetime.is_none_or(|d| d <= MAX_LIFETIME),
        "lifetime {:?} exceeds MAX_LIFETIME",
        set.lifetime
    );
    assert!(
        set.refresh_token_lifetime.is_none_or(|d| d <= MAX_LIFETIME),
        "refresh_token_lifetime {:?} exceeds MAX_LIFETIME",
        set.refresh_token_lifetime
    );
    assert_eq!(
        set.lifetime.is_some(),
        set.lifetime_source != LifetimeSource::None,
        "lifetime {:?} does not match its source {}",
        set.lifetime,
        set.lifetime_source
    );
    assert!(
        set.refresh_token.as_ref().is_none_or(|t| !t.is_empty()),
        "refresh token is Some but empty"
    );
    assert!(
        set.token_type
            .as_deref()
            .is_none_or(|t| !t.trim().is_empty()),
        "token_type is Some but blank"
    );
    assert!(
        set.scope.as_deref().is_none_or(|t| !t.trim().is_empty()),
        "scope is Some but blank"
    );
    let _ = set.is_bearer();
    let _ = set.clamped();

    let Some(obj) = object else {
        panic!("parse_success accepted a body that is not a JSON object");
    };
    match first_present(obj, &ACCESS_KEYS) {
        Some(Value::String(s)) => assert_eq!(
            s, token,
            "the access token is not the first non-null alias's value"
        ),
        other => panic!("parse_success found a token where the body has {other:?}"),
    }
    if let Some(Value::Number(n)) = first_present(obj, &EXPIRES_IN_KEYS) {
        if let Some(secs) = n.as_u64() {
            let want = Duration::from_secs(secs).min(MAX_LIFETIME);
            assert_eq!(
                (set.lifetime, set.lifetime_source),
                (Some(want), LifetimeSource::ExpiresIn),
                "expires_in = {secs} was not taken literally"
            );
        }
    }
}

fn check_response_error(e: &ResponseError, object: Option<&Map<String, Value>>) {
    let _ = (e.to_string(), format!("{e:?}"));
    if let (ResponseError::MissingAccessToken, Some(obj)) = (e, object) {
        match first_present(obj, &ACCESS_KEYS) {
            None => {}
            Some(Value::String(s)) => assert!(
                s.trim().is_empty(),
                "MissingAccessToken, but the body has a non-blank access token"
            ),
            Some(other) => panic!("MissingAccessToken, but access_token is {other:?}"),
        }
    }
}

fn check_provider_error(p: &ProviderError, json: Option<&Value>) {
    for text in [&p.error, &p.description].into_iter().flatten() {
        check_sanitized(text);
    }
    match json {
        None => {
            assert_eq!(p.error, None, "an error code from a body that is not JSON");
            let d = p.description.as_deref().unwrap_or("(none)");
            assert!(
                NON_JSON_NOTES.contains(&d),
                "a non-JSON body is described as {d:?}"
            );
        }
        Some(Value::Object(_)) => {}
        Some(Value::Array(items)) if items.first().is_some_and(Value::is_object) => {}
        Some(_) => assert_eq!(
            (p.error.as_deref(), p.description.as_deref()),
            (None, Some("unexpected JSON body (not an object)"))
        ),
    }
    let status = p.status;
    if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
    {
        assert!(!p.is_rejection(), "{status} is a failure, not a rejection");
    }
    let _ = (p.to_string(), format!("{p:?}"));
}

/// Provider text as `sanitize` promises it.
fn check_sanitized(text: &str) {
    let chars = text.chars().count();
    assert!(
        (1..=MAX_TEXT_CHARS).contains(&chars),
        "provider text has {chars} characters"
    );
    assert!(
        !text.starts_with(' ') && !text.ends_with(' ') && !text.contains("  "),
        "provider text has unsanitized spacing: {text:?}"
    );
    for c in text.chars() {
        assert!(
            !c.is_control() && !is_invisible_format(c) && (c == ' ' || !c.is_whitespace()),
            "provider text keeps {c:?}: {text:?}"
        );
    }
}

fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}' | '\u{FEFF}'
    )
}

/// Everything a caller could print: the TokenSet's Debug or the error's Display and
/// Debug, and the ProviderError's Display and Debug.
fn render(success: &Result<TokenSet, ResponseError>, provider: &ProviderError) -> String {
    let first = match success {
        Ok(set) => format!("{set:?}"),
        Err(e) => format!("{e}\n{e:?}"),
    };
    format!("{first}\n{provider}\n{provider:?}")
}

/// The first alias whose value is not null, as `response.rs` looks fields up.
fn first_present<'a>(obj: &'a Map<String, Value>, keys: &[&str]) -> Option<&'a Value> {
    keys.iter()
        .filter_map(|k| obj.get(*k))
        .find(|v| !v.is_null())
}

/// Access and refresh token strings of the top-level object worth checking.
fn secrets(obj: &Map<String, Value>) -> Vec<String> {
    let mut out: Vec<String> = ACCESS_KEYS
        .iter()
        .chain(REFRESH_KEYS.iter())
        .filter_map(|k| obj.get(*k)?.as_str())
        .filter(|s| s.chars().count() >= MIN_SECRET_CHARS)
        .map(str::to_owned)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The body with every credential field whose value is `secret` set to `changed`.
fn with_secret_replaced(obj: &Map<String, Value>, secret: &str, changed: &str) -> Vec<u8> {
    let mut obj = obj.clone();
    for k in ACCESS_KEYS.iter().chain(REFRESH_KEYS.iter()) {
        if let Some(v) = obj.get_mut(*k) {
            if v.as_str() == Some(secret) {
                *v = Value::String(changed.to_owned());
            }
        }
    }
    serde_json::to_vec(&Value::Object(obj)).unwrap_or_default()
}

/// ROT13 on ASCII letters, +5 on ASCII digits, everything else as is.
pub fn rotate(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            'a'..='z' => (b'a' + (c as u8 - b'a' + 13) % 26) as char,
            'A'..='Z' => (b'A' + (c as u8 - b'A' + 13) % 26) as char,
            '0'..='9' => (b'0' + (c as u8 - b'0' + 5) % 10) as char,
            c => c,
        })
        .collect()
}
