//! A structured token-endpoint response for `token_response_json`: JSON objects built from
//! the field names the parser knows, with values of the shapes providers send (numbers,
//! numeric strings, RFC 3339 timestamps, JWTs with an `exp`, error arrays, ...), written
//! out by hand so that duplicate keys and unusual number spellings stay possible.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arbitrary::Arbitrary;
use http::StatusCode;

/// One fuzz case: the clock, the status and the body.
#[derive(Arbitrary, Debug)]
pub struct Case {
    now: Clock,
    status: u16,
    top: Top,
    members: Vec<(Key, Json)>,
}

#[derive(Arbitrary, Debug)]
enum Clock {
    /// 2023-11-14T22:13:20Z, the time the unit tests use.
    Fixed,
    /// Seconds after 1970 (bounded so that `SystemTime` arithmetic here cannot fail).
    After(u32, u16),
    /// Seconds before 1970.
    Before(u32),
    /// Far in the future.
    Far(u8),
}

#[derive(Arbitrary, Debug)]
enum Top {
    Object,
    /// `[{...}]`: some error bodies are arrays.
    ArrayOfObject,
    /// The object followed by garbage or cut short.
    Truncated(u16),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Key {
    AccessToken,
    AccessTokenCamel,
    TokenType,
    TokenTypeCamel,
    ExpiresIn,
    ExpiresInCamel,
    ExpiresAt,
    ExpiresAtCamel,
    RefreshToken,
    RefreshTokenCamel,
    RefreshExpiresIn,
    RefreshExpiresInCamel,
    RefreshExpiresAt,
    RefreshExpiresAtCamel,
    Scope,
    Error,
    ErrorDescription,
    ErrorDescriptionCamel,
    Errors,
    Message,
    Detail,
    Description,
    Code,
    ErrorCode,
    ErrorCodeCamel,
    ErrorMessage,
    ErrorMessageCamel,
    Category,
    Type,
    Status,
    Exp,
    Other(u8),
}

impl Key {
    fn name(self) -> String {
        match self {
            Key::AccessToken => "access_token",
            Key::AccessTokenCamel => "accessToken",
            Key::TokenType => "token_type",
            Key::TokenTypeCamel => "tokenType",
            Key::ExpiresIn => "expires_in",
            Key::ExpiresInCamel => "expiresIn",
            Key::ExpiresAt => "expires_at",
            Key::ExpiresAtCamel => "expiresAt",
            Key::RefreshToken => "refresh_token",
            Key::RefreshTokenCamel => "refreshToken",
            Key::RefreshExpiresIn => "refresh_token_expires_in",
            Key::RefreshExpiresInCamel => "refreshTokenExpiresIn",
            Key::RefreshExpiresAt => "refresh_token_expires_at",
            Key::RefreshExpiresAtCamel => "refreshTokenExpiresAt",
            Key::Scope => "scope",
            Key::Error => "error",
            Key::ErrorDescription => "error_description",
            Key::ErrorDescriptionCamel => "errorDescription",
            Key::Errors => "errors",
            Key::Message => "message",
            Key::Detail => "detail",
            Key::Description => "description",
            Key::Code => "code",
            Key::ErrorCode => "error_code",
            Key::ErrorCodeCamel => "errorCode",
            Key::ErrorMessage => "error_message",
            Key::ErrorMessageCamel => "errorMessage",
            Key::Category => "category",
            Key::Type => "type",
            Key::Status => "status",
            Key::Exp => "exp",
            Key::Other(n) => return format!("x{n}"),
        }
        .to_owned()
    }
}

#[derive(Arbitrary, Debug)]
pub enum Json {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    /// A number spelled by hand: sign, digits, fraction, exponent.
    Number(bool, u64, Option<u32>, Option<i16>),
    Str(Text),
    Array(Vec<Json>),
    Object(Vec<(Key, Json)>),
}

#[derive(Arbitrary, Debug)]
pub enum Text {
    Raw(String),
    /// A realistic opaque token: [A-Za-z0-9-._~+/] characters.
    Token(Vec<u8>),
    /// `digits[.digits]`, as expires_in strings are sent.
    Decimal(u64, Option<u32>),
    Rfc3339(Rfc3339),
    Jwt(Jwt),
    /// A known text with whitespace and control characters around and inside it.
    Noisy(Box<Text>, Vec<Noise>),
    /// One character many times (long descriptions, truncation at 200 characters).
    Repeat(char, u16),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Noise {
    Space,
    Tab,
    Newline,
    Nul,
    Escape,
    ZeroWidth,
    BidiOverride,
    Bom,
    Ellipsis,
    NonAscii,
}

impl Noise {
    fn as_str(self) -> &'static str {
        match self {
            Noise::Space => " ",
            Noise::Tab => "\t",
            Noise::Newline => "\r\n",
            Noise::Nul => "\u{0}",
            Noise::Escape => "\u{1b}[31m",
            Noise::ZeroWidth => "\u{200b}",
            Noise::BidiOverride => "\u{202e}",
            Noise::Bom => "\u{feff}",
            Noise::Ellipsis => "…",
            Noise::NonAscii => "é",
        }
    }
}

#[derive(Arbitrary, Debug)]
pub struct Rfc3339 {
    year: u16,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    separator: u8,
    fraction: Option<(u8, u64)>,
    offset: Offset,
}

#[derive(Arbitrary, Debug)]
pub enum Offset {
    Missing,
    Z,
    LowerZ,
    Colon(bool, u8, u8),
    NoColon(bool, u8, u8),
    HoursOnly(bool, u8),
    Garbage(String),
}

#[derive(Arbitrary, Debug)]
pub struct Jwt {
    header: Option<String>,
    /// The payload's `exp` claim, or none.
    exp: Option<Box<Json>>,
    other_claims: Vec<(Key, Json)>,
    padded: bool,
    segments: u8,
}

const MAX_DEPTH: usize = 6;

impl Case {
    /// The wall clock to parse against.
    pub fn now(&self) -> SystemTime {
        let t = match self.now {
            Clock::Fixed => Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            Clock::After(s, n) => {
                UNIX_EPOCH.checked_add(Duration::from_secs(u64::from(s) * u64::from(n % 64 + 1)))
            }
            Clock::Before(s) => UNIX_EPOCH.checked_sub(Duration::from_secs(u64::from(s))),
            Clock::Far(n) => UNIX_EPOCH.checked_add(Duration::from_secs(u64::from(n) << 34)),
        };
        t.unwrap_or(UNIX_EPOCH)
    }

    /// The token endpoint's status (for `parse_error`).
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(100 + self.status % 900).unwrap_or(StatusCode::BAD_REQUEST)
    }

    /// The response body.
    pub fn body(&self) -> Vec<u8> {
        let mut out = String::new();
        write_object(&mut out, &self.members, 0);
        match self.top {
            Top::Object => out.into_bytes(),
            Top::ArrayOfObject => format!("[{out}]").into_bytes(),
            Top::Truncated(n) => {
                let mut bytes = out.into_bytes();
                let cut = usize::from(n) % (bytes.len() + 8);
                if cut < bytes.len() {
                    bytes.truncate(cut);
                } else {
                    bytes.extend_from_slice(&b"}]\",\\\x00"[..(cut - bytes.len()).min(6)]);
                }
                bytes
            }
        }
    }
}

fn write_object(out: &mut String, members: &[(Key, Json)], depth: usize) {
    out.push('{');
    for (i, (k, v)) in members.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(out, &k.name());
        out.push(':');
        write_json(out, v, depth + 1);
    }
    out.push('}');
}

/// Writes `v` as JSON text, as a member value `depth` levels deep.
pub fn write_json(out: &mut String, v: &Json, depth: usize) {
    if depth > MAX_DEPTH {
        out.push_str("null");
        return;
    }
    match v {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::U64(n) => {
            let _ = write!(out, "{n}");
        }
        Json::I64(n) => {
            let _ = write!(out, "{n}");
        }
        Json::F64(f) if f.is_finite() => {
            let _ = write!(out, "{f:?}");
        }
        Json::F64(_) => out.push_str("1e999"),
        Json::Number(negative, whole, fraction, exponent) => {
            if *negative {
                out.push('-');
            }
            let _ = write!(out, "{whole}");
            if let Some(f) = fraction {
                let _ = write!(out, ".{f}");
            }
            if let Some(e) = exponent {
                let _ = write!(out, "e{e}");
            }
        }
        Json::Str(t) => write_string(out, &text(t, depth)),
        Json::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(out, item, depth + 1);
            }
            out.push(']');
        }
        Json::Object(members) => write_object(out, members, depth),
    }
}

fn write_string(out: &mut String, s: &str) {
    // serde_json escapes exactly as JSON requires; a String cannot fail to serialize.
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

fn text(t: &Text, depth: usize) -> String {
    match t {
        Text::Raw(s) => s.clone(),
        Text::Token(bytes) => {
            const ALPHABET: &[u8] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/";
            bytes
                .iter()
                .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
                .collect()
        }
        Text::Decimal(whole, None) => whole.to_string(),
        Text::Decimal(whole, Some(f)) => format!("{whole}.{f}"),
        Text::Rfc3339(r) => rfc3339(r),
        Text::Jwt(j) => jwt(j, depth),
        Text::Noisy(inner, noise) => {
            let inner = text(inner, depth + 1);
            let mut out = String::new();
            let mut chars = inner.chars();
            for n in noise {
                out.push_str(n.as_str());
                out.extend(chars.by_ref().take(3));
            }
            out.extend(chars);
            out
        }
        Text::Repeat(c, n) => std::iter::repeat_n(*c, usize::from(*n % 512)).collect(),
    }
}

fn rfc3339(r: &Rfc3339) -> String {
    let sep = match r.separator % 4 {
        0 | 1 => 'T',
        2 => 't',
        _ => ' ',
    };
    let mut s = format!(
        "{:04}-{:02}-{:02}{sep}{:02}:{:02}:{:02}",
        r.year % 10_000,
        r.month % 14,
        r.day % 33,
        r.hour % 26,
        r.minute % 62,
        r.second % 62
    );
    if let Some((digits, value)) = r.fraction {
        let digits = usize::from(digits % 14);
        let text = format!("{value:020}");
        s.push(if digits % 2 == 0 { '.' } else { ',' });
        s.push_str(&text[..digits.min(text.len())]);
    }
    let sign = |neg: bool| if neg { '-' } else { '+' };
    match &r.offset {
        Offset::Missing => {}
        Offset::Z => s.push('Z'),
        Offset::LowerZ => s.push('z'),
        Offset::Colon(neg, h, m) => {
            let _ = write!(s, "{}{:02}:{:02}", sign(*neg), h % 26, m % 62);
        }
        Offset::NoColon(neg, h, m) => {
            let _ = write!(s, "{}{:02}{:02}", sign(*neg), h % 26, m % 62);
        }
        Offset::HoursOnly(neg, h) => {
            let _ = write!(s, "{}{:02}", sign(*neg), h % 26);
        }
        Offset::Garbage(g) => s.push_str(g),
    }
    s
}

fn jwt(j: &Jwt, depth: usize) -> String {
    let header = j
        .header
        .clone()
        .unwrap_or_else(|| r#"{"alg":"RS256","typ":"JWT"}"#.to_owned());
    let mut payload = String::new();
    if let Some(exp) = &j.exp {
        // Written by hand below so that `exp` comes first and keeps its exact spelling.
        payload.push_str("{\"exp\":");
        write_json(&mut payload, exp, depth + 1);
        if !j.other_claims.is_empty() {
            payload.push(',');
            let mut rest = String::new();
            write_object(&mut rest, &j.other_claims, depth + 1);
            payload.push_str(&rest[1..]);
        } else {
            payload.push('}');
        }
    } else {
        write_object(&mut payload, &j.other_claims, depth + 1);
    }
    let mut segments = vec![
        base64url(header.as_bytes(), j.padded),
        base64url(payload.as_bytes(), j.padded),
        "c2lnbmF0dXJl".to_owned(),
    ];
    match j.segments % 8 {
        0 => {
            segments.pop();
        }
        1 => segments.push("extra".to_owned()),
        2 => segments[0].clear(),
        _ => {}
    }
    segments.join(".")
}

/// base64url (RFC 4648 §5), with or without `=` padding.
pub fn base64url(data: &[u8], padded: bool) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let len = chunk.len() + 1;
        for i in 0..4 {
            if i < len {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else if padded {
                out.push('=');
            }
        }
    }
    out
}
