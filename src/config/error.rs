//! `ConfigError`: what is wrong with the configuration, where, and how to fix it.
//!
//! Every error names the file, the dotted key (`clients.payments.token.url`),
//! the problem and, when there is an obvious fix, a hint. Messages are built
//! so that they never contain a secret value: TOML type errors are stripped of
//! the offending value, and secret keys are reported without their content.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

/// A configuration problem: file, dotted key, problem and an optional hint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    file: Option<PathBuf>,
    location: Option<(usize, usize)>,
    key: String,
    problem: String,
    hint: Option<String>,
}

impl ConfigError {
    /// An error about `key` (dotted; empty for the file as a whole).
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            file: None,
            location: None,
            key: key.into(),
            problem: problem.into(),
            hint: None,
        }
    }

    /// Adds a hint saying how to fix the problem.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Names the file the configuration came from, unless one is already named.
    pub fn with_file(mut self, file: Option<&Path>) -> Self {
        if self.file.is_none() {
            self.file = file.map(Path::to_path_buf);
        }
        self
    }

    /// The config file could not be read at all.
    pub(super) fn unreadable(path: &Path, err: &io::Error) -> Self {
        ConfigError::new("", format!("cannot read the config file: {}", io_text(err)))
            .with_file(Some(path))
    }

    /// Translates a TOML syntax or schema error, locating its dotted key in `src`.
    pub(super) fn from_toml(err: &toml::de::Error, src: &str) -> Self {
        let (location, key) = match err.span() {
            Some(span) => (
                Some(line_column(src, span.start)),
                key_path_at(src, span.start).unwrap_or_default(),
            ),
            None => (None, String::new()),
        };
        let (problem, hint) = describe_toml_message(err.message());
        ConfigError {
            file: None,
            location,
            key,
            problem,
            hint,
        }
    }

    /// The file the configuration came from, if it came from a file.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The dotted key at fault (`clients.payments.token.url`); empty for the whole file.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// What is wrong, lower-case, without the file or key.
    pub fn problem(&self) -> &str {
        &self.problem
    }

    /// How to fix it, when there is an obvious fix.
    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }

    /// 1-based line and column in the file, for syntax and schema errors.
    pub fn location(&self) -> Option<(usize, usize)> {
        self.location
    }

    fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = match (&self.file, self.location) {
            (Some(file), Some((line, col))) => write!(out, "{}:{line}:{col}: ", file.display()),
            (Some(file), None) => write!(out, "{}: ", file.display()),
            (None, Some((line, col))) => write!(out, "line {line}, column {col}: "),
            (None, None) => Ok(()),
        };
        if !self.key.is_empty() {
            out.push_str(&self.key);
            out.push_str(": ");
        }
        out.push_str(&self.problem);
        if let Some(hint) = &self.hint {
            out.push_str(" (hint: ");
            out.push_str(hint);
            out.push(')');
        }
        out
    }
}

/// An io error as lower-case text (the OS messages start with a capital).
pub(super) fn io_text(err: &io::Error) -> String {
    let text = err.to_string();
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

fn line_column(src: &str, offset: usize) -> (usize, usize) {
    let before = src.get(..offset.min(src.len())).unwrap_or(src);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Turns serde/toml wording into ours. Type errors lose the offending value:
/// serde quotes it (`integer `12345``), and it may be a password.
fn describe_toml_message(message: &str) -> (String, Option<String>) {
    let message = message.trim();
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (name, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let expected = tail
            .trim_start_matches(", ")
            .strip_prefix("expected one of ")
            .or_else(|| tail.trim_start_matches(", ").strip_prefix("expected "));
        let hint = expected.map(|list| {
            let suggestion = closest_key(name, list)
                .map(|k| format!("did you mean `{k}`? "))
                .unwrap_or_default();
            format!("{suggestion}valid keys here are {list}")
        });
        return (format!("unknown key `{name}`"), hint);
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            if let Some((found, expected)) = rest.rsplit_once(", expected ") {
                let found = found.split(['`', '"']).next().unwrap_or(found).trim();
                return (format!("found {found}, expected {expected}"), None);
            }
            return ("has a value of the wrong type".to_owned(), None);
        }
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let name = rest.split('`').next().unwrap_or(rest);
        return (format!("is missing the required key `{name}`"), None);
    }
    let joined: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    (format!("invalid TOML: {}", joined.join("; ")), None)
}

/// The listed key nearest to `name` by edit distance, if it is a plausible typo.
fn closest_key<'a>(name: &str, list: &'a str) -> Option<&'a str> {
    list.split(", ")
        .map(|k| k.trim_matches('`'))
        .map(|k| (edit_distance(name, k), k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev.last().copied().unwrap_or(0)
}

/// The largest config file parsed.
pub(super) const MAX_CONFIG_BYTES: usize = 1024 * 1024;
/// The deepest nesting of arrays and inline tables, and the most parts of one
/// dotted key, a config may have: far beyond any real one. Deeper documents
/// would take the parser and the key-path walker into deep recursion (10,000
/// levels overflowed the stack of a running sidecar on SIGHUP).
pub(super) const MAX_NESTING: usize = 64;

/// Refuses, before parsing, a document too big or nested too deep (see
/// [`MAX_NESTING`]); strings and comments are skipped.
pub(super) fn check_shape(src: &str) -> Result<(), ConfigError> {
    if src.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::new(
            "",
            format!(
                "the file is {} bytes, above the {MAX_CONFIG_BYTES} a configuration may have",
                src.len()
            ),
        ));
    }
    let s = src.as_bytes();
    let (mut i, mut depth, mut line) = (0, 0usize, 1usize);
    // Dots outside strings in the current line's key (before its `=`), or header.
    let (mut dots, mut in_key) = (0usize, true);
    let too_deep = |what: &str, line: usize| {
        let mut e = ConfigError::new("", format!("{what} more than {MAX_NESTING} levels deep"))
            .with_hint("a configuration never needs this; check the file is the one meant");
        e.location = Some((line, 1));
        e
    };
    while i < s.len() {
        match s[i] {
            b'\n' => {
                line += 1;
                dots = 0;
                in_key = true;
            }
            b'#' => {
                while i < s.len() && s[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            q @ (b'"' | b'\'') => {
                let multi = s[i..].starts_with(if q == b'"' { b"\"\"\"" } else { b"\'\'\'" });
                i += if multi { 3 } else { 1 };
                while i < s.len() {
                    if q == b'"' && s[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if s[i] == b'\n' {
                        line += 1;
                    }
                    if s[i] == q
                        && (!multi
                            || s[i..].starts_with(if q == b'"' { b"\"\"\"" } else { b"\'\'\'" }))
                    {
                        i += if multi { 3 } else { 1 };
                        break;
                    }
                    i += 1;
                }
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(too_deep("arrays or inline tables nest", line));
                }
                if s[i] == b'{' {
                    in_key = true;
                    dots = 0;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'=' => in_key = false,
            b',' => {
                in_key = true;
                dots = 0;
            }
            b'.' if in_key => {
                dots += 1;
                if dots >= MAX_NESTING {
                    return Err(too_deep("a dotted key or table header nests tables", line));
                }
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// The dotted key path of whatever is at byte `target` of a TOML document.
///
/// toml reports schema errors with a byte span but not the key path, so we
/// walk the document (headers, dotted keys, inline tables, arrays, strings)
/// until the span's start falls inside a key or a value.
pub(super) fn key_path_at(src: &str, target: usize) -> Option<String> {
    let mut walker = Walker {
        s: src.as_bytes(),
        i: 0,
        target,
    };
    match walker.document() {
        Err(Stop::Found(path)) => Some(path.join(".")),
        _ => None,
    }
}

enum Stop {
    Found(Vec<String>),
    Lost,
}

struct Walker<'a> {
    s: &'a [u8],
    i: usize,
    target: usize,
}

impl Walker<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        let hit = self.peek() == Some(b);
        if hit {
            self.i += 1;
        }
        hit
    }

    fn starts_with(&self, pat: &[u8]) -> bool {
        self.s
            .get(self.i..)
            .is_some_and(|rest| rest.starts_with(pat))
    }

    fn found_if(&self, start: usize, path: &[String]) -> Result<(), Stop> {
        if (start..self.i).contains(&self.target) {
            return Err(Stop::Found(path.to_vec()));
        }
        Ok(())
    }

    /// Skips blanks and comments, and newlines too when `newlines` is set.
    fn skip(&mut self, newlines: bool) {
        while let Some(b) = self.peek() {
            match b {
                b' ' | b'\t' | b'\r' => self.i += 1,
                b'\n' if newlines => self.i += 1,
                b'#' => {
                    while self.peek().is_some_and(|b| b != b'\n') {
                        self.i += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn document(&mut self) -> Result<(), Stop> {
        let mut table = Vec::new();
        loop {
            self.skip(true);
            match self.peek() {
                None => return Err(Stop::Lost),
                Some(b'[') => {
                    let start = self.i;
                    self.i += 1;
                    let double = self.eat(b'[');
                    let keys = self.dotted_key(&[])?;
                    if !self.eat(b']') || (double && !self.eat(b']')) {
                        return Err(Stop::Lost);
                    }
                    self.found_if(start, &keys)?;
                    table = keys;
                }
                Some(_) => {
                    let keys = self.dotted_key(&table)?;
                    if !self.eat(b'=') {
                        return Err(Stop::Lost);
                    }
                    self.value(&keys)?;
                }
            }
        }
    }

    fn dotted_key(&mut self, base: &[String]) -> Result<Vec<String>, Stop> {
        let mut path = base.to_vec();
        loop {
            self.skip(false);
            let start = self.i;
            let segment = self.simple_key()?;
            path.push(segment);
            self.found_if(start, &path)?;
            self.skip(false);
            if !self.eat(b'.') {
                return Ok(path);
            }
        }
    }

    fn simple_key(&mut self) -> Result<String, Stop> {
        let start = self.i;
        match self.peek() {
            Some(q @ (b'"' | b'\'')) => {
                self.string(q, false)?;
                let inner = self.s.get(start + 1..self.i - 1).unwrap_or_default();
                Ok(String::from_utf8_lossy(inner).into_owned())
            }
            _ => {
                while self
                    .peek()
                    .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                {
                    self.i += 1;
                }
                if self.i == start {
                    return Err(Stop::Lost);
                }
                Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
            }
        }
    }

    /// Skips a string starting at the quote `q`; `multi` allows `"""`/`'''`.
    fn string(&mut self, q: u8, multi: bool) -> Result<(), Stop> {
        let triple = [q, q, q];
        let long = multi && self.starts_with(&triple);
        self.i += if long { 3 } else { 1 };
        loop {
            match self.peek() {
                None => return Err(Stop::Lost),
                Some(b'\\') if q == b'"' => self.i += 2,
                Some(b'\n') if !long => return Err(Stop::Lost),
                Some(b) if b == q => {
                    if !long {
                        self.i += 1;
                        return Ok(());
                    }
                    if self.starts_with(&triple) {
                        self.i += 3;
                        // Up to two more quotes may close a multi-line string.
                        for _ in 0..2 {
                            self.eat(q);
                        }
                        return Ok(());
                    }
                    self.i += 1;
                }
                Some(_) => self.i += 1,
            }
        }
    }

    fn value(&mut self, path: &[String]) -> Result<(), Stop> {
        self.skip(false);
        let start = self.i;
        match self.peek() {
            Some(b'{') => {
                self.i += 1;
                loop {
                    self.skip(false);
                    if self.eat(b'}') {
                        break;
                    }
                    let keys = self.dotted_key(path)?;
                    if !self.eat(b'=') {
                        return Err(Stop::Lost);
                    }
                    self.value(&keys)?;
                    self.skip(false);
                    if !self.eat(b',') && self.peek() != Some(b'}') {
                        return Err(Stop::Lost);
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                loop {
                    self.skip(true);
                    if self.eat(b']') {
                        break;
                    }
                    self.value(path)?;
                    self.skip(true);
                    if !self.eat(b',') && self.peek() != Some(b']') {
                        return Err(Stop::Lost);
                    }
                }
            }
            Some(q @ (b'"' | b'\'')) => self.string(q, true)?,
            Some(_) => {
                while self
                    .peek()
                    .is_some_and(|b| !matches!(b, b',' | b']' | b'}' | b'\n' | b'#'))
                {
                    self.i += 1;
                }
                if self.i == start {
                    return Err(Stop::Lost);
                }
            }
            None => return Err(Stop::Lost),
        }
        self.found_if(start, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Security review (issue 25, low): a deeply nested config (10,000
    /// levels) overflowed the stack of a running sidecar on SIGHUP. It is
    /// refused before parsing, with a clear error; a shallow one is not.
    #[test]
    fn a_deeply_nested_or_huge_config_is_refused_before_parsing() {
        use crate::config::{from_str, MapEnv};
        let n = 10_000;
        let inline = format!("a = {}1{}\n", "{b = ".repeat(n), "}".repeat(n));
        let arrays = format!("a = {}1{}\n", "[".repeat(n), "]".repeat(n));
        let header = format!("[{}]\nx = 1\n", vec!["t"; n].join("."));
        let dotted = format!("{} = 1\n", vec!["t"; n].join("."));
        for (what, text) in [
            ("inline tables", inline),
            ("arrays", arrays),
            ("a table header", header),
            ("a dotted key", dotted),
        ] {
            let err = from_str(&text, None, &MapEnv::new()).expect_err(what);
            assert!(
                err.problem().contains("more than 64 levels deep"),
                "{what}: {err}"
            );
        }
        let huge = format!("# {}\n", "x".repeat(MAX_CONFIG_BYTES));
        let err = from_str(&huge, None, &MapEnv::new()).expect_err("huge");
        assert!(err.problem().contains("bytes, above"), "{err}");
        // Strings, comments and floats do not count.
        assert!(check_shape(&format!(
            "# {}\nk = \"{}\"\nf = 1.5\nt = {{ a.b = 1, c = [[1], [2]] }}\n",
            "[".repeat(100),
            "{".repeat(100)
        ))
        .is_ok());
    }

    #[test]
    fn key_path_is_found_in_headers_dotted_keys_inline_tables_and_arrays() {
        let src = "# c\n[clients.payments]\nlisten = \"a\" # x\ntoken.url = 'b'\n\
                   unauthorized_status = [\n 401,\n true ]\n[clients.payments.token]\n\
                   params = { a = \"x\", \"b c\" = 1 }\nscope = \"\"\"\nmulti\n\"\"\"\n\
                   [[arr]]\n";
        let at = |needle: &str| key_path_at(src, src.find(needle).expect("needle in test src"));
        assert_eq!(at("listen").as_deref(), Some("clients.payments.listen"));
        assert_eq!(at("\"a\"").as_deref(), Some("clients.payments.listen"));
        assert_eq!(at("url").as_deref(), Some("clients.payments.token.url"));
        assert_eq!(
            at("true").as_deref(),
            Some("clients.payments.unauthorized_status")
        );
        assert_eq!(
            at("1 }").as_deref(),
            Some("clients.payments.token.params.b c")
        );
        assert_eq!(at("multi").as_deref(), Some("clients.payments.token.scope"));
        assert_eq!(at("arr").as_deref(), Some("arr"));
        assert_eq!(at("# c"), None, "a comment has no key");
    }

    #[test]
    fn type_errors_never_repeat_the_value() {
        let (problem, _) =
            describe_toml_message("invalid type: integer `12345`, expected a string");
        assert_eq!(problem, "found integer, expected a string");
        let (problem, _) =
            describe_toml_message("invalid type: string \"hunter2\", expected a map");
        assert!(!problem.contains("hunter2"), "got {problem}");
    }

    #[test]
    fn display_names_file_location_key_problem_and_hint() {
        let mut err = ConfigError::new("clients.a.listen", "is required").with_hint("add it");
        err.location = Some((3, 1));
        let err = err.with_file(Some(Path::new("tokenproxy.toml")));
        assert_eq!(
            err.to_string(),
            "tokenproxy.toml:3:1: clients.a.listen: is required (hint: add it)"
        );
    }
}
