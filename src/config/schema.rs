//! Reading the TOML text into the raw mirror, reporting every schema error of
//! the file (unknown keys, values of the wrong type) rather than the first.
//!
//! toml stops at the first error. The statement holding it (a `key = value`
//! line, or a table header with its lines) is then blanked out, its bytes
//! replaced by spaces so that every later error keeps its line and column, and
//! the text is read again, up to [`MAX_SCHEMA_PROBLEMS`] problems. What was
//! blanked is remembered in [`Removed`]: a validation problem there ("is
//! required") would be a follow-on of the blanking, not the author's.

use std::ops::Range;

use super::error::{ConfigError, Problems, TomlProblem};
use super::file::RawConfig;
use super::text::statement_at;

/// The most schema problems looked for; a file with more is reported as
/// having "at least" this many.
pub(super) const MAX_SCHEMA_PROBLEMS: usize = 100;

/// The most bytes read again while looking: a few hundred rounds of a real
/// config, a few of a huge one, so a SIGHUP with a broken file stays quick.
const MAX_REREAD_BYTES: usize = 8 * 1024 * 1024;

/// The raw configuration read from the text, and the schema problems met.
pub(super) struct Read {
    /// The configuration without the blanked statements; `None` when the
    /// search stopped before every problem was blanked.
    pub(super) raw: Option<RawConfig>,
    /// The schema problems, each with its line and column.
    pub(super) problems: Problems,
    /// What blanking removed.
    pub(super) removed: Removed,
}

/// The dotted keys whose validation would judge what blanking removed, not
/// what the author wrote.
#[derive(Debug, Default)]
pub(super) struct Removed(Vec<String>);

impl Removed {
    /// Whether a validation problem about `key` may be a follow-on of a
    /// blanking: `key` is a removed scope, lies inside one, or is the table
    /// that holds one.
    pub(super) fn covers(&self, key: &str) -> bool {
        self.0.iter().any(|scope| {
            Removed::within(scope, key) || (!key.is_empty() && Removed::within(key, scope))
        })
    }

    /// Whether the dotted `key` is `scope` or lies inside it.
    pub(super) fn within(scope: &str, key: &str) -> bool {
        key.strip_prefix(scope)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
    }

    /// Notes what blanking the statement `statement` (its dotted key) for
    /// `found` removes.
    fn note(&mut self, found: &TomlProblem, statement: &str) {
        let key = found.problem.key();
        let only_the_unknown_key = Removed::within(key, statement);
        if let (Some(suggestion), true) = (&found.unknown, only_the_unknown_key) {
            // Serde would have ignored the unknown key; but a misspelt key
            // leaves the one meant unset ("tokn" for "token": "token is required").
            if let Some(meant) = suggestion {
                let meant = match key.rsplit_once('.') {
                    Some((parent, _)) => format!("{parent}.{meant}"),
                    None => meant.clone(),
                };
                self.0.push(meant);
            }
            return;
        }
        // A value of the wrong type is gone, so its table may judge wrongly
        // (a default grant, a missing allow_insecure): the whole table is
        // left out, or the statement itself when it is a section or a client.
        let parent = statement.rsplit_once('.').map_or("", |(parent, _)| parent);
        let scope = if parent.is_empty() || parent == "clients" {
            statement
        } else {
            parent
        };
        self.0.push(scope.to_owned());
    }
}

/// Reads `text` into the raw mirror, blanking out and noting each schema
/// error until it reads; a syntax error is the one error returned.
pub(super) fn read(text: &str) -> Result<Read, ConfigError> {
    let mut read = Read {
        raw: None,
        problems: Problems::default(),
        removed: Removed::default(),
    };
    let mut err = match toml::from_str::<RawConfig>(text) {
        Ok(raw) => {
            read.raw = Some(raw);
            return Ok(read);
        }
        Err(e) => e,
    };
    if text.parse::<toml::Table>().is_err() {
        // A syntax error: nothing after it can be read with certainty.
        return Err(TomlProblem::new(&err, text, text, false).problem.into());
    }
    let mut doc = text.to_owned();
    let mut budget = MAX_REREAD_BYTES;
    // Each round blanks at least one byte; the bounds keep a file of
    // thousands of errors from taking thousands of parses.
    for _ in 0..MAX_SCHEMA_PROBLEMS * 2 {
        let found = TomlProblem::new(&err, &doc, text, true);
        let statement = err.span().and_then(|span| statement_at(&doc, span.start));
        if !read.problems.contains(&found.problem) {
            read.problems.push(found.problem.clone());
        }
        let Some((range, statement_key)) = statement else {
            break;
        };
        read.removed.note(&found, &statement_key);
        budget = budget.saturating_sub(doc.len());
        if budget == 0 || !blank(&mut doc, range) {
            break;
        }
        err = match toml::from_str::<RawConfig>(&doc) {
            Ok(raw) => {
                read.raw = Some(raw);
                return Ok(read);
            }
            Err(e) => e,
        };
        if read.problems.len() >= MAX_SCHEMA_PROBLEMS || doc.parse::<toml::Table>().is_err() {
            break;
        }
    }
    read.problems.stop_early();
    Ok(read)
}

/// Replaces the bytes of `range` in `doc` by spaces, keeping line ends;
/// false when nothing changed (or the range would split a character).
fn blank(doc: &mut String, range: Range<usize>) -> bool {
    let mut bytes = std::mem::take(doc).into_bytes();
    let mut changed = false;
    if let Some(part) = bytes.get_mut(range) {
        for b in part
            .iter_mut()
            .filter(|b| !matches!(**b, b'\n' | b'\r' | b' '))
        {
            *b = b' ';
            changed = true;
        }
    }
    match String::from_utf8(bytes) {
        Ok(text) => {
            *doc = text;
            changed
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blanking_keeps_every_byte_offset_and_line() {
        let mut doc = "a = \"é\"\nb = [\n 1,\n 2 ]\nc = 3\n".to_owned();
        let len = doc.len();
        let start = doc.find("b =").expect("b in doc");
        let end = doc.find("c =").expect("c in doc") - 1;
        assert!(blank(&mut doc, start..end));
        assert_eq!(doc.len(), len);
        assert_eq!(doc.lines().count(), 5);
        assert!(doc.parse::<toml::Table>().is_ok(), "still TOML: {doc:?}");
        assert!(
            !blank(&mut doc, start..end),
            "a blank range changes nothing"
        );
    }

    #[test]
    fn removed_scopes_cover_the_key_inside_and_the_tables_holding_it() {
        let removed = Removed(vec!["clients.a.token".to_owned()]);
        assert!(removed.covers("clients.a.token"));
        assert!(removed.covers("clients.a.token.client_id"));
        assert!(removed.covers("clients.a"), "the table holding it");
        assert!(!removed.covers("clients.a.timeout"));
        assert!(!removed.covers("clients.a.tokens"));
        assert!(!removed.covers("clients.ab"));
        assert!(!removed.covers(""), "problems of the whole file stay");
    }
}
