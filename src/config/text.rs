//! The TOML text itself: the shape refused before parsing (size, depth), and
//! positions in it: the dotted key at a byte, the byte of a dotted key, the
//! statement around a byte, and line:column.
//!
//! toml reports schema errors with a byte span but not the key path, and the
//! validator knows the dotted key of a problem but not its place, so both
//! directions walk the document (headers, dotted keys, inline tables, arrays,
//! strings) with one small walker.

use std::ops::Range;

use super::error::ConfigError;

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
        ConfigError::new("", format!("{what} more than {MAX_NESTING} levels deep"))
            .with_hint("a configuration never needs this; check the file is the one meant")
            .at((line, 1))
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

/// 1-based line and column (in characters) of byte `offset` of `src`.
pub(super) fn line_column(src: &str, offset: usize) -> (usize, usize) {
    let before = src.get(..offset.min(src.len())).unwrap_or(src);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The dotted key path of whatever is at byte `target` of a TOML document:
/// walks the document until `target` falls inside a key or a value.
pub(super) fn key_path_at(src: &str, target: usize) -> Option<String> {
    match Walker::new(src, Probe::At(target)).document() {
        Err(Stop::Found(path, _)) => Some(path.join(".")),
        _ => None,
    }
}

/// The byte where the dotted `key` is written, else where its nearest written
/// ancestor is (a missing key points at its table); `None` when neither is.
pub(super) fn key_position(src: &str, key: &str) -> Option<usize> {
    let mut key = key;
    while !key.is_empty() {
        if let Err(Stop::Found(_, start)) = Walker::new(src, Probe::Key(key)).document() {
            return Some(start);
        }
        key = key.rsplit_once('.').map_or("", |(parent, _)| parent);
    }
    None
}

/// The top-level statement holding byte `target` and its dotted key: a
/// `key = value` line (with every line of its value), or a table header with
/// the key/value lines below it up to the next header.
pub(super) fn statement_at(src: &str, target: usize) -> Option<(Range<usize>, String)> {
    let mut walker = Walker::new(src, Probe::Nothing);
    if !matches!(walker.document(), Err(Stop::End)) {
        return None;
    }
    let statements = walker.statements;
    let (i, found) = statements
        .iter()
        .enumerate()
        .find(|(_, s)| s.range.contains(&target))?;
    let end = match found.header {
        false => found.range.end,
        true => statements[i + 1..]
            .iter()
            .find(|s| s.header)
            .map_or(src.len(), |s| s.range.start),
    };
    Some((found.range.start..end, found.key.join(".")))
}

/// The path of element `n` of the array of tables at `path`: `errors[n]`.
fn indexed(path: &[String], n: usize) -> Vec<String> {
    let mut path = path.to_vec();
    if let Some(last) = path.last_mut() {
        last.push_str(&format!("[{n}]"));
    }
    path
}

/// What the walk looks for.
enum Probe<'k> {
    /// The key or value holding this byte.
    At(usize),
    /// Where this dotted key is first written.
    Key(&'k str),
    /// Nothing: walk to the end, recording the statements.
    Nothing,
}

enum Stop {
    /// The path found and the byte its key or value starts at.
    Found(Vec<String>, usize),
    /// The walker met something it does not understand.
    Lost,
    /// The end of the document.
    End,
}

struct Statement {
    range: Range<usize>,
    header: bool,
    key: Vec<String>,
}

struct Walker<'a> {
    s: &'a [u8],
    i: usize,
    probe: Probe<'a>,
    statements: Vec<Statement>,
}

impl<'a> Walker<'a> {
    fn new(src: &'a str, probe: Probe<'a>) -> Self {
        Walker {
            s: src.as_bytes(),
            i: 0,
            probe,
            statements: Vec::new(),
        }
    }

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

    /// Stops the walk when the key or value that started at `start` (and ends
    /// here) is what the probe looks for.
    fn found_if(&self, start: usize, path: &[String]) -> Result<(), Stop> {
        let hit = match self.probe {
            Probe::At(target) => (start..self.i).contains(&target),
            Probe::Key(key) => path.join(".") == key,
            Probe::Nothing => false,
        };
        if hit {
            return Err(Stop::Found(path.to_vec(), start));
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
        // `[[x]]` headers seen so far per path: the next one is element `x[n]`.
        let mut elements: Vec<(Vec<String>, usize)> = Vec::new();
        loop {
            self.skip(true);
            let start = self.i;
            match self.peek() {
                None => return Err(Stop::End),
                Some(b'[') => {
                    self.i += 1;
                    let double = self.eat(b'[');
                    let keys = self.dotted_key(&[])?;
                    if !self.eat(b']') || (double && !self.eat(b']')) {
                        return Err(Stop::Lost);
                    }
                    self.found_if(start, &keys)?;
                    let keys = if double {
                        let n = match elements.iter_mut().find(|(k, _)| *k == keys) {
                            Some((_, n)) => {
                                *n += 1;
                                *n
                            }
                            None => {
                                elements.push((keys.clone(), 0));
                                0
                            }
                        };
                        let element = indexed(&keys, n);
                        self.found_if(start, &element)?;
                        element
                    } else {
                        keys
                    };
                    self.statements.push(Statement {
                        range: start..self.i,
                        header: true,
                        key: keys.clone(),
                    });
                    table = keys;
                }
                Some(_) => {
                    let keys = self.dotted_key(&table)?;
                    if !self.eat(b'=') {
                        return Err(Stop::Lost);
                    }
                    self.value(&keys)?;
                    self.statements.push(Statement {
                        range: start..self.i,
                        header: false,
                        key: keys,
                    });
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
                for n in 0.. {
                    self.skip(true);
                    if self.eat(b']') {
                        break;
                    }
                    // A table in an array is one element of a list of rules;
                    // plain values all belong to the array's key.
                    if self.peek() == Some(b'{') {
                        self.value(&indexed(path, n))?;
                    } else {
                        self.value(path)?;
                    }
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
                // A bare value ends before the blanks that precede its comment.
                while self.i > start && matches!(self.s[self.i - 1], b' ' | b'\t' | b'\r') {
                    self.i -= 1;
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

    const SRC: &str = "# c\n[clients.payments]\nlisten = \"a\" # x\ntoken.url = 'b'\n\
                       unauthorized_status = [\n 401,\n true ]\n[clients.payments.token]\n\
                       params = { a = \"x\", \"b c\" = 1 }\nscope = \"\"\"\nmulti\n\"\"\"\n\
                       [[arr]]\n";

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

    fn at(needle: &str) -> Option<String> {
        key_path_at(SRC, SRC.find(needle).expect("needle in test src"))
    }

    #[test]
    fn key_path_is_found_in_headers_dotted_keys_inline_tables_and_arrays() {
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
    fn a_key_is_found_where_written_and_a_missing_one_at_its_table() {
        let pos = |key: &str| key_position(SRC, key).map(|p| line_column(SRC, p));
        assert_eq!(pos("clients.payments.listen"), Some((3, 1)));
        assert_eq!(pos("clients.payments.token.url"), Some((4, 7)));
        assert_eq!(pos("clients.payments.token.params.b c"), Some((9, 21)));
        assert_eq!(
            pos("clients.payments.upstream"),
            Some((2, 10)),
            "a missing key points at its table's header"
        );
        assert_eq!(pos("admin.listen"), None, "nothing of [admin] is written");
    }

    /// Rules written as `[[x]]` tables or as an array of inline tables are
    /// told apart by their index, so a problem in the second rule points there.
    #[test]
    fn each_element_of_an_array_of_tables_has_an_indexed_key() {
        let src = "[c.token]\nurl = 'u'\n[[c.token.errors]]\nstatus = 500\n\
                   [[c.token.errors]]\nmeans = 'x'\n[d]\nrules = [{ a = 1 }, { a = 2 }]\n";
        let pos = |key: &str| key_position(src, key).map(|p| line_column(src, p));
        assert_eq!(pos("c.token.errors[0].status"), Some((4, 1)));
        assert_eq!(pos("c.token.errors[1].means"), Some((6, 1)));
        assert_eq!(
            pos("c.token.errors[1].status"),
            Some((5, 1)),
            "a key missing from the second rule points at that rule's header"
        );
        assert_eq!(pos("d.rules[1].a"), Some((8, 23)));
        assert_eq!(
            pos("d.rules[1].b"),
            Some((8, 21)),
            "at the second inline table"
        );
        let at = |needle: &str| key_path_at(src, src.find(needle).expect("needle in src"));
        assert_eq!(at("'x'").as_deref(), Some("c.token.errors[1].means"));
        assert_eq!(at("2 }").as_deref(), Some("d.rules[1].a"));
        let key = |needle: &str| statement_at(src, src.find(needle).expect("needle")).map(|s| s.1);
        assert_eq!(key("means").as_deref(), Some("c.token.errors[1].means"));
    }

    #[test]
    fn the_statement_of_a_byte_is_its_key_value_or_its_whole_table() {
        let around = |needle: &str| {
            let (range, _) = statement_at(SRC, SRC.find(needle).expect("needle in test src"))
                .expect("a statement holds the needle");
            &SRC[range]
        };
        let key = |needle: &str| statement_at(SRC, SRC.find(needle).expect("needle")).map(|s| s.1);
        assert_eq!(key("'b'").as_deref(), Some("clients.payments.token.url"));
        assert_eq!(
            key("params").as_deref(),
            Some("clients.payments.token.params")
        );
        assert_eq!(key("token]").as_deref(), Some("clients.payments.token"));
        assert_eq!(around("\"a\""), "listen = \"a\"", "a comment stays");
        assert_eq!(around("true"), "unauthorized_status = [\n 401,\n true ]");
        assert_eq!(
            around("token]"),
            "[clients.payments.token]\nparams = { a = \"x\", \"b c\" = 1 }\n\
             scope = \"\"\"\nmulti\n\"\"\"\n",
            "a header takes its table up to the next header"
        );
        assert_eq!(around("arr"), "[[arr]]\n", "the last table runs to the end");
        assert_eq!(statement_at(SRC, 0), None, "a comment is no statement");
    }
}
