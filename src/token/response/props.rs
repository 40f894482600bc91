//! A property test of [`parse_success_with`]: many generated response
//! mappings (field names, dotted paths, units) against many generated bodies,
//! well-formed, odd and broken. The fuzz target `token_response_mapped`
//! (fuzz/README.md) checks the same properties for as long as it is let run;
//! this one runs a fixed set of cases in `cargo test`, so a regression shows
//! at once.
//!
//! For every case:
//! - the parser does not panic;
//! - a token set holds the access token found where the mapping says (or
//!   under a standard name when it maps none), of visible ASCII, lifetimes of
//!   at most [`MAX_LIFETIME`], an epoch-seconds or -milliseconds expiry read in
//!   its unit, and the refresh token found where the mapping says;
//! - an error about a field names that field, which is present in the body,
//!   and where it was read when the mapping moved it;
//! - "no access token" only when there is none where it was looked for;
//! - no token value shows in an error or a token set's `Debug`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fastrand::Rng;
use serde_json::{json, Map, Value};

use super::{parse_success_with, LifetimeSource, ResponseError, TokenSet, MAX_LIFETIME};
use crate::config::{FieldPath, ResponseMapping, TimestampUnit};

/// Every generated token contains this, and nothing else does.
const MARKER: &str = "SeCrEt";

const CASES: u64 = 20_000;

/// Member names paths are made of: the standard ones, other providers' and odd ones.
const NAMES: &[&str] = &[
    "access_token",
    "accessToken",
    "refresh_token",
    "refreshToken",
    "expires_in",
    "expiresIn",
    "expires_at",
    "expiresAt",
    "refresh_token_expires_in",
    "refresh_token_expires_at",
    "token_type",
    "scope",
    "access_token_expiration",
    "refresh_token_expiration",
    "data",
    "result",
    "token",
    "auth",
    "value",
    "exp",
    "0",
    "é",
    "with space",
    "$",
];

/// A field of the mapping: its name in errors, its standard names, what it holds.
struct Field {
    name: &'static str,
    aliases: &'static [&'static str],
    holds: Holds,
    mapped: fn(&mut ResponseMapping) -> &mut Option<FieldPath>,
}

#[derive(Clone, Copy, PartialEq)]
enum Holds {
    Token,
    Text,
    Seconds,
    Timestamp,
}

const FIELDS: [Field; 8] = [
    Field {
        name: "access_token",
        aliases: &["access_token", "accessToken"],
        holds: Holds::Token,
        mapped: |m| &mut m.access_token,
    },
    Field {
        name: "refresh_token",
        aliases: &["refresh_token", "refreshToken"],
        holds: Holds::Token,
        mapped: |m| &mut m.refresh_token,
    },
    Field {
        name: "token_type",
        aliases: &["token_type", "tokenType"],
        holds: Holds::Text,
        mapped: |m| &mut m.token_type,
    },
    Field {
        name: "scope",
        aliases: &["scope"],
        holds: Holds::Text,
        mapped: |m| &mut m.scope,
    },
    Field {
        name: "expires_in",
        aliases: &["expires_in", "expiresIn"],
        holds: Holds::Seconds,
        mapped: |m| &mut m.expires_in,
    },
    Field {
        name: "expires_at",
        aliases: &["expires_at", "expiresAt"],
        holds: Holds::Timestamp,
        mapped: |m| &mut m.expires_at,
    },
    Field {
        name: "refresh_token_expires_in",
        aliases: &["refresh_token_expires_in", "refreshTokenExpiresIn"],
        holds: Holds::Seconds,
        mapped: |m| &mut m.refresh_token_expires_in,
    },
    Field {
        name: "refresh_token_expires_at",
        aliases: &["refresh_token_expires_at", "refreshTokenExpiresAt"],
        holds: Holds::Timestamp,
        mapped: |m| &mut m.refresh_token_expires_at,
    },
];

/// The fields whose values are checked (the others are taken when usable).
const CHECKED_FIELDS: [&str; 5] = [
    "access_token",
    "expires_in",
    "expires_at",
    "refresh_token_expires_in",
    "refresh_token_expires_at",
];

const ACCESS_TOKEN: usize = 0;
const REFRESH_TOKEN: usize = 1;
const EXPIRES_IN: usize = 4;
const EXPIRES_AT: usize = 5;

#[test]
fn generated_mappings_and_bodies_keep_every_property() {
    let mut rng = Rng::with_seed(0x5eed_0019);
    let mut seen = Seen::default();
    for case in 0..CASES {
        let mapping = gen_mapping(&mut rng);
        let now = gen_now(&mut rng);
        let body = gen_body(&mut rng, &mapping);
        let result = parse_success_with(&body, now, &mapping);
        seen.count(&result);
        match check(&body, now, &mapping, &result) {
            Ok(epoch_checked) => seen.epoch_unit_checked += u64::from(epoch_checked),
            Err(message) => panic!(
                "case {case}: {message}\n  mapping: {mapping:?}\n  body: {}\n  result: {result:?}",
                String::from_utf8_lossy(&body)
            ),
        }
    }
    // The generator reaches every outcome, or the properties above prove little.
    assert!(
        seen.ok > CASES / 10
            && seen.missing > 100
            && seen.not_json > 100
            && CHECKED_FIELDS
                .iter()
                .all(|f| seen.bad_field.iter().any(|(n, c)| n == f && *c > 20))
            && seen.mapped_bad_field > 100
            && seen.epoch_unit_checked > 100,
        "the generated cases reach too few outcomes: {seen:?}"
    );
}

/// How many cases ended how.
#[derive(Debug, Default)]
struct Seen {
    ok: u64,
    missing: u64,
    not_json: u64,
    bad_field: Vec<(&'static str, u64)>,
    mapped_bad_field: u64,
    epoch_unit_checked: u64,
}

impl Seen {
    fn count(&mut self, result: &Result<TokenSet, ResponseError>) {
        match result {
            Ok(_) => self.ok += 1,
            Err(ResponseError::MissingAccessToken) => self.missing += 1,
            Err(ResponseError::NotJson(_)) => self.not_json += 1,
            Err(ResponseError::BadField { field, reason }) => {
                match self.bad_field.iter_mut().find(|(n, _)| n == field) {
                    Some((_, c)) => *c += 1,
                    None => self.bad_field.push((field, 1)),
                }
                if reason.contains("(read from ") {
                    self.mapped_bad_field += 1;
                }
            }
        }
    }
}

// --- the properties ------------------------------------------------------------------

/// `Ok(true)` when an expiry in an epoch unit was checked too.
fn check(
    body: &[u8],
    now: SystemTime,
    mapping: &ResponseMapping,
    result: &Result<TokenSet, ResponseError>,
) -> Result<bool, String> {
    let shown = match result {
        // A mapping may point scope or token_type at a token; they are shown by design.
        Ok(set) => format!(
            "{:?}",
            TokenSet {
                scope: None,
                token_type: None,
                ..set.clone()
            }
        ),
        Err(e) => format!("{e}\n{e:?}"),
    };
    if shown.contains(MARKER) {
        return Err(format!("a token shows: {shown}"));
    }
    let obj = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(obj)) => obj,
        _ => {
            return match result {
                Err(ResponseError::NotJson(_)) => Ok(false),
                _ => Err("a body that is not a JSON object was not refused as such".into()),
            }
        }
    };
    let found = |i: usize| lookup(&obj, mapping, &FIELDS[i]);
    match result {
        Ok(set) => check_set(set, now, mapping, &found),
        Err(ResponseError::NotJson(_)) => Err("a JSON object was refused as not JSON".into()),
        Err(ResponseError::MissingAccessToken) => match found(ACCESS_TOKEN) {
            None => Ok(false),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(false),
            Some(other) => Err(format!("no access token, but there is {other}")),
        },
        Err(ResponseError::BadField { field, reason }) => {
            let Some(i) = FIELDS.iter().position(|f| f.name == *field) else {
                return Err(format!("an error about {field}, which is no field"));
            };
            if found(i).is_none() {
                return Err(format!("an error about {field}, which is not in the body"));
            }
            let mut mapping = mapping.clone();
            match (FIELDS[i].mapped)(&mut mapping) {
                Some(path) if !reason.ends_with(&format!(" (read from {path})")) => Err(format!(
                    "the reason does not say {field} was read from {path}"
                )),
                None if reason.contains("(read from") => Err(format!(
                    "{field} is not mapped, yet the reason names a path"
                )),
                _ => Ok(false),
            }
        }
    }
}

fn check_set(
    set: &TokenSet,
    now: SystemTime,
    mapping: &ResponseMapping,
    found: &dyn Fn(usize) -> Option<Value>,
) -> Result<bool, String> {
    let token = set.access_token.expose();
    if token.trim().is_empty() || !token.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err("the access token is blank or not visible ASCII".into());
    }
    if found(ACCESS_TOKEN).as_ref().and_then(Value::as_str) != Some(token) {
        return Err("the access token is not the one where the mapping says".into());
    }
    let want_refresh = found(REFRESH_TOKEN).and_then(|v| match v {
        Value::String(s) if !s.is_empty() => Some(s),
        _ => None,
    });
    if set.refresh_token.as_ref().map(|s| s.expose()) != want_refresh.as_deref() {
        return Err("the refresh token is not the one where the mapping says".into());
    }
    for lifetime in [set.lifetime, set.refresh_token_lifetime]
        .into_iter()
        .flatten()
    {
        if lifetime > MAX_LIFETIME {
            return Err(format!("a lifetime of {lifetime:?} is over MAX_LIFETIME"));
        }
    }
    if set.lifetime.is_some() != (set.lifetime_source != LifetimeSource::None) {
        return Err("the lifetime does not match its source".into());
    }
    let source = match (found(EXPIRES_IN), found(EXPIRES_AT)) {
        (Some(_), _) => LifetimeSource::ExpiresIn,
        (None, Some(_)) => LifetimeSource::ExpiresAt,
        (None, None) if set.lifetime_source == LifetimeSource::JwtExp => LifetimeSource::JwtExp,
        (None, None) => LifetimeSource::None,
    };
    if set.lifetime_source != source {
        return Err(format!("the lifetime came from {}", set.lifetime_source));
    }
    if source != LifetimeSource::ExpiresAt {
        return Ok(false);
    }
    match epoch_lifetime(found(EXPIRES_AT), mapping.expires_at_unit, now) {
        Some(want) if set.lifetime != Some(want) => {
            Err(format!("expires_at read in its unit gives {want:?}"))
        }
        Some(_) => Ok(true),
        None => Ok(false),
    }
}

/// The lifetime a whole-number `expires_at` in an epoch unit gives.
fn epoch_lifetime(
    value: Option<Value>,
    unit: Option<TimestampUnit>,
    now: SystemTime,
) -> Option<Duration> {
    let n = value?.as_u64()?;
    let at = match unit? {
        TimestampUnit::EpochSeconds => Duration::from_secs(n),
        TimestampUnit::EpochMillis => Duration::from_millis(n),
        TimestampUnit::Rfc3339 => return None,
    };
    let now = now.duration_since(UNIX_EPOCH).ok()?;
    Some(at.saturating_sub(now).min(MAX_LIFETIME))
}

/// The field's value where `mapping` says, else under its first standard name
/// that is not null; null is absence.
fn lookup(obj: &Map<String, Value>, mapping: &ResponseMapping, field: &Field) -> Option<Value> {
    let mut mapping = mapping.clone();
    let value = match (field.mapped)(&mut mapping) {
        Some(path) => {
            let mut current = obj;
            let (last, parents) = path.segments().split_last()?;
            for name in parents {
                current = current.get(name)?.as_object()?;
            }
            current.get(last)
        }
        None => field
            .aliases
            .iter()
            .find_map(|a| obj.get(*a).filter(|v| !v.is_null())),
    };
    value.filter(|v| !v.is_null()).cloned()
}

// --- the generator -------------------------------------------------------------------

fn gen_mapping(rng: &mut Rng) -> ResponseMapping {
    let mut mapping = ResponseMapping::default();
    if rng.u8(..4) == 0 {
        return mapping;
    }
    for field in &FIELDS {
        if rng.bool() {
            let segments = (0..rng.usize(1..=3))
                .map(|_| NAMES[rng.usize(..NAMES.len())].to_owned())
                .collect();
            *(field.mapped)(&mut mapping) = FieldPath::from_segments(segments);
        }
    }
    mapping.expires_at_unit = gen_unit(rng);
    mapping.refresh_token_expires_at_unit = gen_unit(rng);
    mapping
}

fn gen_unit(rng: &mut Rng) -> Option<TimestampUnit> {
    match rng.u8(..4) {
        0 => None,
        1 => Some(TimestampUnit::EpochSeconds),
        2 => Some(TimestampUnit::EpochMillis),
        _ => Some(TimestampUnit::Rfc3339),
    }
}

fn gen_now(rng: &mut Rng) -> SystemTime {
    match rng.u8(..4) {
        0 => UNIX_EPOCH,
        1 => UNIX_EPOCH + Duration::from_secs(rng.u64(..1 << 40)),
        _ => UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    }
}

/// A body: members under standard and other names, each mapped field's value
/// placed at its path most of the time, and sometimes the text broken.
fn gen_body(rng: &mut Rng, mapping: &ResponseMapping) -> Vec<u8> {
    let mut root = Value::Object(Map::new());
    for _ in 0..rng.usize(..4) {
        let name = NAMES[rng.usize(..NAMES.len())];
        let holds = [Holds::Token, Holds::Text, Holds::Seconds, Holds::Timestamp][rng.usize(..4)];
        place(&mut root, &[name.to_owned()], gen_value(rng, holds, 0));
    }
    for field in &FIELDS {
        let mut mapping = mapping.clone();
        let at = match (field.mapped)(&mut mapping) {
            Some(path) => path.segments().to_vec(),
            None => vec![field.aliases[rng.usize(..field.aliases.len())].to_owned()],
        };
        let odds = if field.holds == Holds::Seconds { 4 } else { 7 };
        if rng.u8(..10) < odds {
            place(&mut root, &at, gen_value(rng, field.holds, 0));
        }
    }
    let mut text = serde_json::to_vec(&root).unwrap_or_default();
    match rng.u8(..40) {
        0 => text.truncate(rng.usize(..=text.len())),
        1 if !text.is_empty() => {
            let i = rng.usize(..text.len());
            text[i] = rng.u8(..);
        }
        2 => text = serde_json::to_vec(&json!([root])).unwrap_or_default(),
        3 => text = (0..rng.usize(..64)).map(|_| rng.u8(..)).collect(),
        _ => {}
    }
    text
}

/// Sets `value` at `path`, making the objects on the way (or, now and then,
/// leaving a step that is not an object, so the path cannot be followed).
fn place(root: &mut Value, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut current = root;
    for name in parents {
        let Value::Object(obj) = current else {
            return;
        };
        current = obj
            .entry(name.clone())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if let Value::Object(obj) = current {
        obj.insert(last.clone(), value);
    }
}

fn gen_value(rng: &mut Rng, holds: Holds, depth: u8) -> Value {
    // One time in ten, a value of any shape, fitting or not.
    if rng.u8(..10) == 0 {
        return gen_any(rng, depth);
    }
    match holds {
        Holds::Token => match rng.u8(..16) {
            0 => json!(""),
            1 => json!("   "),
            2 => json!(format!("{MARKER}-ünïcödé")),
            3 => json!(format!("{MARKER}\r\nInjected: 1")),
            _ => json!(format!("{MARKER}-{}", rng.u64(..))),
        },
        Holds::Text => json!(["Bearer", "bearer", "MAC", " ", "read write"][rng.usize(..5)]),
        Holds::Seconds => match rng.u8(..6) {
            0 => json!(rng.u64(..)),
            1 => json!(rng.u64(..100_000)),
            2 => json!(format!("{}", rng.u64(..100_000))),
            3 => json!(-rng.i64(1..)),
            4 => json!(rng.f64() * 1e6),
            _ => json!(format!("{}.{}", rng.u32(..), rng.u32(..))),
        },
        Holds::Timestamp => match rng.u8(..8) {
            0 => json!(1_700_000_000 + rng.u64(..100_000)),
            1 => json!(1_700_000_000_000 + rng.u64(..100_000_000)),
            2 => json!(rng.u64(..)),
            3 => json!(format!("{}", 1_700_000_000 + rng.u64(..100_000))),
            4 => json!("2023-11-14T23:13:20Z"),
            5 => json!(format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}+{:02}:{:02}",
                rng.u16(..10_000),
                rng.u8(..14),
                rng.u8(..33),
                rng.u8(..26),
                rng.u8(..62),
                rng.u8(..62),
                rng.u8(..26),
                rng.u8(..62)
            )),
            6 => json!(-rng.i64(1..)),
            _ => json!(rng.f64() * 2e12),
        },
    }
}

fn gen_any(rng: &mut Rng, depth: u8) -> Value {
    match rng.u8(..if depth > 2 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(rng.bool()),
        2 => json!(rng.i64(..)),
        3 => json!(["", "x", "é\u{202e}", "1e3", "NaN"][rng.usize(..5)]),
        4 => json!(f64::MAX),
        5 => Value::Array(
            (0..rng.usize(..3))
                .map(|_| gen_any(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let mut obj = Map::new();
            for _ in 0..rng.usize(..3) {
                let name = NAMES[rng.usize(..NAMES.len())].to_owned();
                obj.insert(name, gen_any(rng, depth + 1));
            }
            Value::Object(obj)
        }
    }
}
