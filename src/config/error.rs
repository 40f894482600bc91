//! `ConfigError`: every problem of a configuration, each with where it is,
//! what is wrong and how to fix it.
//!
//! Every [`ConfigProblem`] names the file, the dotted key
//! (`clients.payments.token.url`), the problem and, when there is an obvious
//! fix, a hint. Messages are built so that they never contain a secret value:
//! TOML type errors are stripped of the offending value, and secret keys are
//! reported without their content.

use std::fmt::{self, Write as _};
use std::io;
use std::path::{Path, PathBuf};

use super::examples;
use super::text::{key_path_at, line_column};

/// The most problems an error shows; the rest are counted ("and 3 more").
pub const MAX_SHOWN: usize = 20;

/// One configuration problem: file, line:column, dotted key, problem and an optional hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    file: Option<PathBuf>,
    location: Option<(usize, usize)>,
    key: String,
    problem: String,
    hint: Option<String>,
}

impl ConfigProblem {
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

    /// 1-based line and column in the file, when the key is written there.
    pub fn location(&self) -> Option<(usize, usize)> {
        self.location
    }
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.location) {
            (Some(file), Some((line, col))) => write!(f, "{}:{line}:{col}: ", file.display())?,
            (Some(file), None) => write!(f, "{}: ", file.display())?,
            (None, Some((line, col))) => write!(f, "line {line}, column {col}: ")?,
            (None, None) => {}
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.problem)?;
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

/// What is wrong with a configuration: one or more [`ConfigProblem`]s.
///
/// The accessors ([`key`](Self::key), [`problem`](Self::problem), ...) describe
/// the first problem (the earliest in the file); [`errors`](Self::errors)
/// yields all of them. Displayed, it is one problem per line, at most
/// [`MAX_SHOWN`] of them and then how many more there are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    /// Never empty.
    problems: Vec<ConfigProblem>,
    /// The search stopped before the end of the file: there may be more.
    incomplete: bool,
}

impl ConfigError {
    /// An error about `key` (dotted; empty for the file as a whole).
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![ConfigProblem {
                file: None,
                location: None,
                key: key.into(),
                problem: problem.into(),
                hint: None,
            }],
            incomplete: false,
        }
    }

    /// Adds a hint saying how to fix the (first) problem.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        if let Some(first) = self.problems.first_mut() {
            first.hint = Some(hint.into());
        }
        self
    }

    /// Names the file the configuration came from, in every problem that names none yet.
    pub fn with_file(mut self, file: Option<&Path>) -> Self {
        for p in self.problems.iter_mut().filter(|p| p.file.is_none()) {
            p.file = file.map(Path::to_path_buf);
        }
        self
    }

    /// Places the (first) problem at a line and column, unless it has a place.
    pub(super) fn at(mut self, location: (usize, usize)) -> Self {
        if let Some(first) = self.problems.first_mut() {
            first.location = first.location.or(Some(location));
        }
        self
    }

    /// The config file could not be read at all.
    pub(super) fn unreadable(path: &Path, err: &io::Error) -> Self {
        ConfigError::new("", format!("cannot read the config file: {}", io_text(err)))
            .with_file(Some(path))
    }

    /// The first problem.
    fn first(&self) -> &ConfigProblem {
        // `problems` is never empty: every constructor makes one, and
        // `Problems::into_error` makes one when it has none.
        &self.problems[0]
    }

    /// The file the configuration came from, if it came from a file.
    pub fn file(&self) -> Option<&Path> {
        self.first().file()
    }

    /// The dotted key of the first problem (`clients.payments.token.url`); empty for the whole file.
    pub fn key(&self) -> &str {
        self.first().key()
    }

    /// What is wrong (the first problem), lower-case, without the file or key.
    pub fn problem(&self) -> &str {
        self.first().problem()
    }

    /// How to fix the first problem, when there is an obvious fix.
    pub fn hint(&self) -> Option<&str> {
        self.first().hint()
    }

    /// 1-based line and column of the first problem in the file.
    pub fn location(&self) -> Option<(usize, usize)> {
        self.first().location()
    }

    /// Every problem found, in file order.
    pub fn errors(&self) -> std::slice::Iter<'_, ConfigProblem> {
        self.problems.iter()
    }

    /// How many problems were found.
    pub fn count(&self) -> usize {
        self.problems.len()
    }

    /// The closing line of a report: "3 problems in config.toml".
    pub fn tally(&self) -> String {
        let n = self.count();
        let at_least = if self.incomplete { "at least " } else { "" };
        let noun = if n == 1 && !self.incomplete {
            "problem"
        } else {
            "problems"
        };
        match self.file() {
            Some(file) => format!("{at_least}{n} {noun} in {}", file.display()),
            None => format!("{at_least}{n} {noun} in the configuration"),
        }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for (i, p) in self.problems.iter().take(MAX_SHOWN).enumerate() {
            if i > 0 {
                out.push('\n');
            }
            // Writing to a String cannot fail.
            let _ = write!(out, "{p}");
        }
        let hidden = self.count().saturating_sub(MAX_SHOWN);
        if hidden > 0 {
            let _ = write!(out, "\nand {hidden} more");
        }
        out
    }
}

/// Problems collected from independent parts of a configuration, so that one
/// run reports all of them rather than the first.
#[derive(Debug, Default)]
pub(super) struct Problems {
    list: Vec<ConfigProblem>,
    incomplete: bool,
}

impl Problems {
    /// The value of `result`, or `None` with its problems kept.
    pub(super) fn take<T>(&mut self, result: Result<T, ConfigError>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(e) => {
                self.add(e);
                None
            }
        }
    }

    /// Keeps every problem of `e`.
    pub(super) fn add(&mut self, e: ConfigError) {
        self.incomplete |= e.incomplete;
        self.list.extend(e.problems);
    }

    /// Keeps one problem.
    pub(super) fn push(&mut self, p: ConfigProblem) {
        self.list.push(p);
    }

    /// Marks the search as stopped early.
    pub(super) fn stop_early(&mut self) {
        self.incomplete = true;
    }

    pub(super) fn len(&self) -> usize {
        self.list.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub(super) fn contains(&self, p: &ConfigProblem) -> bool {
        self.list
            .iter()
            .any(|q| q.key == p.key && q.problem == p.problem)
    }

    /// Keeps the problems of `other` too.
    pub(super) fn extend(&mut self, other: Problems) {
        self.incomplete |= other.incomplete;
        self.list.extend(other.list);
    }

    /// Keeps only the problems `keep` accepts.
    pub(super) fn retain(&mut self, keep: impl Fn(&ConfigProblem) -> bool) {
        self.list.retain(|p| keep(p));
    }

    /// Places every problem without a line and column where `place` says.
    pub(super) fn place(&mut self, place: impl Fn(&str) -> Option<(usize, usize)>) {
        for p in self.list.iter_mut().filter(|p| p.location.is_none()) {
            p.location = place(&p.key);
        }
    }

    /// `Err` with every problem, in file order, unless there is none.
    pub(super) fn finish(self) -> Result<(), ConfigError> {
        if self.list.is_empty() {
            return Ok(());
        }
        Err(self.into_error())
    }

    /// Every problem, in file order (problems without a place keep their
    /// order, after the placed ones).
    pub(super) fn into_error(self) -> ConfigError {
        let mut problems = self.list;
        if problems.is_empty() {
            problems = ConfigError::new("", "the configuration is not valid").problems;
        }
        problems.sort_by_key(|p| p.location.unwrap_or((usize::MAX, usize::MAX)));
        ConfigError {
            problems,
            incomplete: self.incomplete,
        }
    }
}

/// A TOML syntax or schema error translated: the problem, and what the schema
/// pass needs to know about it.
pub(super) struct TomlProblem {
    pub(super) problem: ConfigProblem,
    /// An unknown key, and the known one it probably misspells.
    pub(super) unknown: Option<Option<String>>,
}

impl TomlProblem {
    /// Translates `err`, raised on `doc`: its dotted key is looked up in `doc`
    /// and its line and column in `original` (the same bytes at the same
    /// places, `doc` having some statements blanked).
    pub(super) fn new(err: &toml::de::Error, doc: &str, original: &str, schema: bool) -> Self {
        let (location, key) = match err.span() {
            Some(span) => (
                Some(line_column(original, span.start)),
                key_path_at(doc, span.start).unwrap_or_default(),
            ),
            None => (None, String::new()),
        };
        // What the span starts with tells what serde's words cannot: `map`
        // is also a date, and a `[[table]]` shows as a map expecting a string.
        let written = err
            .span()
            .and_then(|span| doc.get(span.start..))
            .unwrap_or("");
        let described = if schema && written.starts_with("[[") {
            let header = format!("[{key}]");
            Described {
                problem: "is a list of tables ([[...]]), but must be one table".to_owned(),
                hint: Some(format!(
                    "write its header with single brackets, like {header}"
                )),
                unknown: None,
            }
        } else {
            describe_toml_message(err.message(), &key, schema, written)
        };
        TomlProblem {
            problem: ConfigProblem {
                file: None,
                location,
                key,
                problem: described.problem,
                hint: described.hint,
            },
            unknown: described.unknown,
        }
    }
}

impl From<ConfigProblem> for ConfigError {
    fn from(p: ConfigProblem) -> Self {
        ConfigError {
            problems: vec![p],
            incomplete: false,
        }
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

struct Described {
    problem: String,
    hint: Option<String>,
    unknown: Option<Option<String>>,
}

/// Turns serde/toml wording into ours. Type errors lose the offending value:
/// serde quotes it (`integer `12345``), and it may be a password.
fn describe_toml_message(message: &str, key: &str, schema: bool, written: &str) -> Described {
    let message = message.trim();
    let plain = |problem: String, hint: Option<String>| Described {
        problem,
        hint,
        unknown: None,
    };
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (name, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let expected = tail
            .trim_start_matches(", ")
            .strip_prefix("expected one of ")
            .or_else(|| tail.trim_start_matches(", ").strip_prefix("expected "));
        let suggestion = expected.and_then(|list| closest_key(name, list));
        let hint = expected.map(|list| {
            let suggestion = suggestion
                .map(|k| format!("did you mean `{k}`? "))
                .unwrap_or_default();
            format!("{suggestion}valid keys here are {list}")
        });
        return Described {
            problem: format!("unknown key `{name}`"),
            hint,
            unknown: Some(suggestion.map(str::to_owned)),
        };
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            let Some((found, expected)) = rest.rsplit_once(", expected ") else {
                return plain("has a value of the wrong type".to_owned(), None);
            };
            let found = found.split(['`', '"']).next().unwrap_or(found).trim();
            let dated = found == "map" && written.starts_with(|c: char| c.is_ascii_digit());
            let found = if dated {
                "a date or time"
            } else {
                plain_type(found)
            };
            let expected = plain_type(expected);
            let problem = format!("is {found}, but must be {expected}");
            return plain(problem, Some(type_hint(key, found, expected)));
        }
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let name = rest.split('`').next().unwrap_or(rest);
        return plain(format!("is missing the required key `{name}`"), None);
    }
    if message.contains("too large") {
        let hint = examples::write_it_like(key);
        return plain("is too large a number".to_owned(), hint);
    }
    let joined: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let text = joined.join("; ");
    if schema {
        return plain(text, examples::write_it_like(key));
    }
    plain(format!("invalid TOML: {text}"), None)
}

/// serde's name of a type in words a config author uses.
fn plain_type(serde: &str) -> &str {
    let serde = serde.trim();
    match serde.trim_start_matches("a ").trim_start_matches("an ") {
        "integer" | "i64" | "u64" | "i32" | "u32" | "u16" | "u8" => "a whole number",
        "floating point" | "f64" | "f32" => "a decimal number",
        "string" | "char" | "str" => "a string",
        "boolean" | "bool" => "true or false",
        "sequence" | "tuple" | "array" => "a list",
        "string or an integer" => "a string or a whole number",
        "map" => "a table",
        s if s.starts_with("struct ") || s.starts_with("map") => "a table",
        _ => serde,
    }
}

/// "write it like ..." for a value of the wrong type: the key's example, or
/// one made from the type expected.
fn type_hint(key: &str, found: &str, expected: &str) -> String {
    let leaf = key.rsplit('.').next().unwrap_or(key);
    let mut hint = examples::write_it_like(key).unwrap_or_else(|| match expected {
        "a list" => format!("write it in square brackets, like {leaf} = [\"...\"]"),
        "a string" => format!("write it in quotes, like {leaf} = \"...\""),
        "true or false" => format!("write it like {leaf} = true"),
        "a whole number" => format!("write it like {leaf} = 10"),
        "a table" => {
            format!("write it as a table: a [{key}] line with its keys on the lines below it")
        }
        _ => format!("write {leaf} as {expected}"),
    });
    let number_or_flag = ["true or false", "a whole number", "a decimal number"];
    if found == "a string" && number_or_flag.contains(&expected) {
        hint.push_str(", without quotes");
    } else if expected == "a string" && number_or_flag.contains(&found) {
        hint.push_str(", in quotes");
    } else if expected == "a list" && found != "a table" {
        hint.push_str(", in square brackets even for one value");
    }
    hint
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_errors_never_repeat_the_value() {
        let d = describe_toml_message(
            "invalid type: integer `12345`, expected a string",
            "clients.a.token.client_secret",
            true,
            "12345",
        );
        assert_eq!(d.problem, "is a whole number, but must be a string");
        assert!(!d.hint.unwrap_or_default().contains("12345"));
        let d = describe_toml_message(
            "invalid type: string \"hunter2\", expected a map",
            "clients.a.token",
            true,
            "\"hunter2\"",
        );
        assert!(!d.problem.contains("hunter2"), "got {}", d.problem);
        assert!(!d.hint.unwrap_or_default().contains("hunter2"));
    }

    #[test]
    fn display_names_file_location_key_problem_and_hint() {
        let err = ConfigError::new("clients.a.listen", "is required")
            .with_hint("add it")
            .at((3, 1))
            .with_file(Some(Path::new("tokenproxy.toml")));
        assert_eq!(
            err.to_string(),
            "tokenproxy.toml:3:1: clients.a.listen: is required (hint: add it)"
        );
        assert_eq!(err.tally(), "1 problem in tokenproxy.toml");
    }

    #[test]
    fn many_problems_show_one_per_line_up_to_the_limit_then_a_count() {
        let mut problems = Problems::default();
        for i in 0..MAX_SHOWN + 3 {
            problems.add(
                ConfigError::new(format!("clients.c{i}.listen"), "is required").at((i + 1, 1)),
            );
        }
        let err = problems.into_error().with_file(Some(Path::new("t.toml")));
        let text = err.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), MAX_SHOWN + 1, "{text}");
        assert_eq!(lines[0], "t.toml:1:1: clients.c0.listen: is required");
        assert_eq!(lines[MAX_SHOWN], "and 3 more");
        assert_eq!(err.count(), MAX_SHOWN + 3);
        assert_eq!(
            err.errors().count(),
            MAX_SHOWN + 3,
            "errors() yields every one"
        );
        assert_eq!(err.tally(), format!("{} problems in t.toml", MAX_SHOWN + 3));
    }
}
