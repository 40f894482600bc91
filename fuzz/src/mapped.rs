//! Properties of `tokenproxy::token::response::parse_success_with` (a
//! `[token.response]` mapping) and of `parse_error_with` (`[[token.errors]]` rules).
//!
//! The input is a structured case: for each field of the mapping nothing or a
//! dotted path of member names (the standard names, other providers', odd ones,
//! any string), a unit for each absolute expiry, a body that puts values of
//! every shape providers send (`json::Json`) at the mapped paths, under the
//! standard names and elsewhere (sometimes cut short), a clock, a status and
//! error rules. For every case:
//! - neither function panics, nor do `Display`/`Debug` of what they return;
//! - a token set holds the access token found where the mapping says (under a
//!   standard name when it maps none), of visible ASCII; lifetimes of at most
//!   `MAX_LIFETIME`, from `expires_in` when present, else `expires_at`; a
//!   whole-number `expires_at` in an epoch unit read in that unit; the refresh
//!   token found where the mapping says;
//! - an error about a field names that field, which is in the body, and says
//!   where it was read when the mapping moved it; "no access token" only when
//!   there is none (or a blank one) where it was looked for; "not JSON" only
//!   for a body that is not a JSON object;
//! - no access or refresh token of 8 or more characters shows in an error or
//!   a token set's `Debug` (the same differential check as `token`), unless
//!   the mapping has another field read where a token is read, which `check`
//!   refuses (the token would show as, say, a lifetime);
//! - the first rule whose every condition holds decides what a refusal means;
//!   a rule's verdict overrides the built-in one (rejected and
//!   needs_authorization are rejections, transient is not), and with no
//!   matching rule the built-in one stands.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arbitrary::Arbitrary;
use http::StatusCode;
use serde_json::{Map, Value};
use tokenproxy::config::{ErrorMeaning, ErrorRule, FieldPath, ResponseMapping, TimestampUnit};
use tokenproxy::token::response::{
    parse_error, parse_error_with, parse_success_with, LifetimeSource, ResponseError, TokenSet,
    MAX_LIFETIME,
};

use crate::json::{write_json, Json};
use crate::token::{rotate, MIN_SECRET_CHARS};

/// Member names paths are made of, besides arbitrary ones.
const NAMES: [&str; 16] = [
    "access_token",
    "accessToken",
    "refresh_token",
    "expires_in",
    "expires_at",
    "expiresAt",
    "access_token_expiration",
    "refresh_token_expiration",
    "data",
    "result",
    "token",
    "auth",
    "value",
    "0",
    "é",
    "with space",
];

/// The mapping's fields: key, standard names.
const FIELDS: [(&str, &[&str]); 8] = [
    ("access_token", &["access_token", "accessToken"]),
    ("refresh_token", &["refresh_token", "refreshToken"]),
    ("token_type", &["token_type", "tokenType"]),
    ("scope", &["scope"]),
    ("expires_in", &["expires_in", "expiresIn"]),
    ("expires_at", &["expires_at", "expiresAt"]),
    (
        "refresh_token_expires_in",
        &["refresh_token_expires_in", "refreshTokenExpiresIn"],
    ),
    (
        "refresh_token_expires_at",
        &["refresh_token_expires_at", "refreshTokenExpiresAt"],
    ),
];

const ACCESS_TOKEN: usize = 0;
const REFRESH_TOKEN: usize = 1;
const EXPIRES_IN: usize = 4;
const EXPIRES_AT: usize = 5;

/// One fuzz case.
#[derive(Arbitrary, Debug)]
pub struct Case {
    paths: [Vec<Name>; 8],
    units: [Option<Unit>; 2],
    /// Values for fields: at the field's mapped path (else a standard name).
    placed: Vec<(u8, Json)>,
    /// Values anywhere.
    elsewhere: Vec<(Vec<Name>, Json)>,
    cut: Option<u16>,
    clock: Clock,
    status: u16,
    rules: Vec<Rule>,
}

#[derive(Arbitrary, Debug)]
enum Name {
    Known(u8),
    Any(String),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Unit {
    EpochSeconds,
    EpochMillis,
    Rfc3339,
}

#[derive(Arbitrary, Debug)]
enum Clock {
    Fixed,
    After(u32),
    Epoch,
}

#[derive(Arbitrary, Debug)]
struct Rule {
    status: Option<u16>,
    error: Option<Name>,
    body_contains: Option<Name>,
    means: u8,
}

impl Name {
    fn text(&self) -> String {
        match self {
            Name::Known(n) => NAMES[usize::from(*n) % NAMES.len()].to_owned(),
            Name::Any(s) => s.clone(),
        }
    }
}

impl Case {
    /// The mapping: a path with an empty part, or none, maps nothing.
    pub fn mapping(&self) -> ResponseMapping {
        let path =
            |i: usize| FieldPath::from_segments(self.paths[i].iter().map(Name::text).collect());
        let unit = |u: Option<Unit>| {
            u.map(|u| match u {
                Unit::EpochSeconds => TimestampUnit::EpochSeconds,
                Unit::EpochMillis => TimestampUnit::EpochMillis,
                Unit::Rfc3339 => TimestampUnit::Rfc3339,
            })
        };
        ResponseMapping {
            access_token: path(0),
            refresh_token: path(1),
            token_type: path(2),
            scope: path(3),
            expires_in: path(4),
            expires_at: path(5),
            expires_at_unit: unit(self.units[0]),
            refresh_token_expires_in: path(6),
            refresh_token_expires_at: path(7),
            refresh_token_expires_at_unit: unit(self.units[1]),
        }
    }

    /// The wall clock to parse against.
    pub fn now(&self) -> SystemTime {
        match self.clock {
            Clock::Fixed => UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            Clock::After(s) => UNIX_EPOCH + Duration::from_secs(u64::from(s) << 8),
            Clock::Epoch => UNIX_EPOCH,
        }
    }

    /// The status of a refusal.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(400 + self.status % 200).unwrap_or(StatusCode::BAD_REQUEST)
    }

    /// The `[[token.errors]]` rules.
    pub fn rules(&self) -> Vec<ErrorRule> {
        const MEANINGS: [ErrorMeaning; 3] = [
            ErrorMeaning::Rejected,
            ErrorMeaning::Transient,
            ErrorMeaning::NeedsAuthorization,
        ];
        self.rules
            .iter()
            .map(|r| ErrorRule {
                status: r
                    .status
                    .and_then(|s| StatusCode::from_u16(400 + s % 200).ok()),
                error: r.error.as_ref().map(Name::text),
                body_contains: r.body_contains.as_ref().map(Name::text),
                means: MEANINGS[usize::from(r.means) % MEANINGS.len()],
            })
            .collect()
    }

    /// The body: every value placed, written out, perhaps cut short.
    pub fn body(&self, mapping: &ResponseMapping) -> Vec<u8> {
        let mut root = Vec::new();
        for (field, value) in &self.placed {
            let i = usize::from(*field) % FIELDS.len();
            let path = match mapped(mapping, i) {
                Some(path) => path.segments().to_vec(),
                None => {
                    let aliases = FIELDS[i].1;
                    vec![aliases[usize::from(*field / 8) % aliases.len()].to_owned()]
                }
            };
            place(&mut root, &path, value);
        }
        for (path, value) in &self.elsewhere {
            let path: Vec<String> = path.iter().map(Name::text).collect();
            place(&mut root, &path, value);
        }
        let mut out = String::new();
        write_members(&mut out, &root);
        let mut bytes = out.into_bytes();
        if let Some(cut) = self.cut {
            bytes.truncate(usize::from(cut));
        }
        bytes
    }
}

/// A body under construction: members in order, each a value's text or an object.
enum Node {
    Leaf(String),
    Object(Vec<(String, Node)>),
}

/// Puts `value` at `path`, making objects on the way; a step that is a value
/// already stops it (the path cannot be followed there).
fn place(members: &mut Vec<(String, Node)>, path: &[String], value: &Json) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        let mut text = String::new();
        write_json(&mut text, value, 1);
        members.push((first.clone(), Node::Leaf(text)));
        return;
    }
    let at = match members.iter().position(|(name, _)| name == first) {
        Some(at) => at,
        None => {
            members.push((first.clone(), Node::Object(Vec::new())));
            members.len() - 1
        }
    };
    if let Node::Object(inner) = &mut members[at].1 {
        place(inner, rest, value);
    }
}

fn write_members(out: &mut String, members: &[(String, Node)]) {
    out.push('{');
    for (i, (name, node)) in members.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(name).unwrap_or_default());
        out.push(':');
        match node {
            Node::Leaf(text) => out.push_str(text),
            Node::Object(inner) => write_members(out, inner),
        }
    }
    out.push('}');
}

fn mapped(mapping: &ResponseMapping, i: usize) -> Option<&FieldPath> {
    match i {
        0 => mapping.access_token.as_ref(),
        1 => mapping.refresh_token.as_ref(),
        2 => mapping.token_type.as_ref(),
        3 => mapping.scope.as_ref(),
        4 => mapping.expires_in.as_ref(),
        5 => mapping.expires_at.as_ref(),
        6 => mapping.refresh_token_expires_in.as_ref(),
        _ => mapping.refresh_token_expires_at.as_ref(),
    }
}

/// Runs both parsers on the case and checks every property above.
pub fn check(case: &Case) {
    let mapping = case.mapping();
    let body = case.body(&mapping);
    let now = case.now();
    let result = parse_success_with(&body, now, &mapping);
    let shown = render(&result);
    let obj = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(obj)) => Some(obj),
        _ => None,
    };
    match (&result, &obj) {
        (Err(ResponseError::NotJson(_)), None) => {}
        (_, None) => panic!("a body that is not a JSON object was not refused as such"),
        (Err(ResponseError::NotJson(_)), Some(_)) => panic!("a JSON object refused as not JSON"),
        (Ok(set), Some(obj)) => check_set(set, obj, &mapping, now),
        (Err(e), Some(obj)) => check_error(e, obj, &mapping),
    }
    if let (Some(obj), false) = (&obj, another_field_reads_a_token(&mapping)) {
        check_no_leak(obj, &mapping, now, &shown);
    }
    check_rules(case, &body);
}

/// The field's value where `mapping` says, else under its first standard name
/// that is not null; null is absence.
fn lookup<'a>(
    obj: &'a Map<String, Value>,
    mapping: &ResponseMapping,
    i: usize,
) -> Option<&'a Value> {
    let value = match mapped(mapping, i) {
        Some(path) => {
            let (last, parents) = path.segments().split_last()?;
            let mut current = obj;
            for name in parents {
                current = current.get(name)?.as_object()?;
            }
            current.get(last)
        }
        None => FIELDS[i]
            .1
            .iter()
            .find_map(|a| obj.get(*a).filter(|v| !v.is_null())),
    };
    value.filter(|v| !v.is_null())
}

fn check_set(set: &TokenSet, obj: &Map<String, Value>, mapping: &ResponseMapping, now: SystemTime) {
    let token = set.access_token.expose();
    assert!(
        !token.trim().is_empty() && token.bytes().all(|b| (0x20..=0x7e).contains(&b)),
        "the access token is blank or not visible ASCII"
    );
    assert_eq!(
        lookup(obj, mapping, ACCESS_TOKEN).and_then(Value::as_str),
        Some(token),
        "the access token is not the one where the mapping says"
    );
    let want_refresh = match lookup(obj, mapping, REFRESH_TOKEN) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.as_str()),
        _ => None,
    };
    assert_eq!(
        set.refresh_token.as_ref().map(|s| s.expose()),
        want_refresh,
        "the refresh token is not the one where the mapping says"
    );
    for lifetime in [set.lifetime, set.refresh_token_lifetime]
        .into_iter()
        .flatten()
    {
        assert!(lifetime <= MAX_LIFETIME, "a lifetime of {lifetime:?}");
    }
    assert_eq!(
        set.lifetime.is_some(),
        set.lifetime_source != LifetimeSource::None,
        "the lifetime does not match its source"
    );
    let source = match (
        lookup(obj, mapping, EXPIRES_IN),
        lookup(obj, mapping, EXPIRES_AT),
    ) {
        (Some(_), _) => LifetimeSource::ExpiresIn,
        (None, Some(_)) => LifetimeSource::ExpiresAt,
        (None, None) if set.lifetime_source == LifetimeSource::JwtExp => LifetimeSource::JwtExp,
        (None, None) => LifetimeSource::None,
    };
    assert_eq!(set.lifetime_source, source, "the lifetime's source");
    if source == LifetimeSource::ExpiresAt {
        let n = lookup(obj, mapping, EXPIRES_AT).and_then(Value::as_u64);
        let at = match (n, mapping.expires_at_unit) {
            (Some(n), Some(TimestampUnit::EpochSeconds)) => Some(Duration::from_secs(n)),
            (Some(n), Some(TimestampUnit::EpochMillis)) => Some(Duration::from_millis(n)),
            _ => None,
        };
        if let (Some(at), Ok(now)) = (at, now.duration_since(UNIX_EPOCH)) {
            let want = at.saturating_sub(now).min(MAX_LIFETIME);
            assert_eq!(set.lifetime, Some(want), "expires_at read in its unit");
        }
    }
}

fn check_error(e: &ResponseError, obj: &Map<String, Value>, mapping: &ResponseMapping) {
    match e {
        ResponseError::NotJson(_) => {}
        ResponseError::MissingAccessToken => match lookup(obj, mapping, ACCESS_TOKEN) {
            None => {}
            Some(Value::String(s)) => assert!(
                s.trim().is_empty(),
                "no access token, but a non-blank one where the mapping says"
            ),
            Some(other) => panic!("no access token, but {other}"),
        },
        ResponseError::BadField { field, reason } => {
            let i = FIELDS
                .iter()
                .position(|(name, _)| name == field)
                .unwrap_or_else(|| panic!("an error about {field}, which is no field"));
            assert!(
                lookup(obj, mapping, i).is_some(),
                "an error about {field}, which is not in the body"
            );
            match mapped(mapping, i) {
                Some(path) => assert!(
                    reason.ends_with(&format!(" (read from {path})")),
                    "the reason does not say {field} was read from {path}: {reason}"
                ),
                None => assert!(
                    !reason.contains("(read from"),
                    "{field} is not mapped, yet: {reason}"
                ),
            }
        }
    }
}

/// Everything a caller could print; scope and token_type are shown by design,
/// and a mapping may point them at a token.
fn render(result: &Result<TokenSet, ResponseError>) -> String {
    match result {
        Ok(set) => format!(
            "{:?}",
            TokenSet {
                scope: None,
                token_type: None,
                ..set.clone()
            }
        ),
        Err(e) => format!("{e}\n{e:?}"),
    }
}

/// As `token::check`'s leak check: a token whose text shows is changed alone
/// (same length and character classes); if the text is then gone, it came
/// from the token.
fn check_no_leak(
    obj: &Map<String, Value>,
    mapping: &ResponseMapping,
    now: SystemTime,
    shown: &str,
) {
    for i in [ACCESS_TOKEN, REFRESH_TOKEN] {
        let Some(secret) = lookup(obj, mapping, i).and_then(Value::as_str) else {
            continue;
        };
        if secret.chars().count() < MIN_SECRET_CHARS || !shown.contains(secret) {
            continue;
        }
        let changed = rotate(secret);
        if changed == secret {
            continue;
        }
        let mut other = Value::Object(obj.clone());
        replace_strings(&mut other, secret, &changed);
        let body = serde_json::to_vec(&other).unwrap_or_default();
        let again = render(&parse_success_with(&body, now, mapping));
        assert!(
            again.contains(secret),
            "a token from the body shows in formatted output\n  output: {shown}"
        );
    }
}

/// Whether a field that is no token reads where a token is read, which
/// `check` refuses (the token would show as a lifetime, say): the same path
/// as a mapped token, or the standard name of an unmapped one.
fn another_field_reads_a_token(mapping: &ResponseMapping) -> bool {
    [ACCESS_TOKEN, REFRESH_TOKEN].into_iter().any(|token| {
        (0..FIELDS.len())
            .filter(|i| ![ACCESS_TOKEN, REFRESH_TOKEN].contains(i))
            .filter_map(|i| mapped(mapping, i))
            .any(|path| match mapped(mapping, token) {
                Some(token_path) => token_path == path,
                None => {
                    matches!(path.segments(), [name] if FIELDS[token].1.contains(&name.as_str()))
                }
            })
    })
}

fn replace_strings(v: &mut Value, from: &str, to: &str) {
    match v {
        Value::String(s) if s == from => *s = to.to_owned(),
        Value::Array(items) => items.iter_mut().for_each(|i| replace_strings(i, from, to)),
        Value::Object(obj) => obj.values_mut().for_each(|i| replace_strings(i, from, to)),
        _ => {}
    }
}

fn check_rules(case: &Case, body: &[u8]) {
    let rules = case.rules();
    let status = case.status();
    let plain = parse_error(status, body);
    let classified = parse_error_with(status, body, &rules);
    let _ = (
        classified.to_string(),
        format!("{classified:?}"),
        classified.app_summary(),
    );
    assert_eq!(
        (&classified.error, &classified.description),
        (&plain.error, &plain.description),
        "rules change what the answer means, not what it says"
    );
    let want = rules
        .iter()
        .find(|r| {
            r.status.is_none_or(|s| s == status)
                && r.error.as_deref().is_none_or(|e| {
                    plain
                        .error
                        .as_deref()
                        .is_some_and(|c| c.eq_ignore_ascii_case(e))
                })
                && r.body_contains
                    .as_deref()
                    .is_none_or(|t| contains(body, t.as_bytes()))
        })
        .map(|r| r.means);
    assert_eq!(classified.meaning, want, "the first matching rule decides");
    let rejection = match want {
        Some(ErrorMeaning::Rejected | ErrorMeaning::NeedsAuthorization) => true,
        Some(ErrorMeaning::Transient) => false,
        None => plain.is_rejection(),
    };
    assert_eq!(classified.is_rejection(), rejection, "{want:?}");
    assert_eq!(
        classified.needs_authorization(),
        want == Some(ErrorMeaning::NeedsAuthorization)
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}
