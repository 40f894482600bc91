//! `Table`: one TOML table under validation, with the value parsers that name its dotted keys.

use super::*;

/// One TOML table under validation: its dotted name and the expander.
///
/// The value parsers live here so that every error carries the full dotted key.
pub(super) struct Table<'a> {
    pub(super) x: &'a Expander<'a>,
    pub(super) name: String,
}

impl<'a> Table<'a> {
    pub(super) fn new(x: &'a Expander<'a>, name: impl Into<String>) -> Self {
        Table {
            x,
            name: name.into(),
        }
    }

    /// The dotted key of `k` in this table; `""` is the table itself.
    pub(super) fn key(&self, k: &str) -> String {
        match (self.name.is_empty(), k.is_empty()) {
            (true, _) => k.to_owned(),
            (false, true) => self.name.clone(),
            (false, false) => format!("{}.{k}", self.name),
        }
    }

    pub(super) fn err(&self, k: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::new(self.key(k), problem)
    }

    /// "write it like KEY = EXAMPLE" for `k` (see `examples.rs`), else `fallback`.
    pub(super) fn write_it_like(&self, k: &str, fallback: &str) -> String {
        super::examples::write_it_like(&self.key(k)).unwrap_or_else(|| fallback.to_owned())
    }

    fn duration_hint(&self, k: &str) -> String {
        match super::examples::write_it_like(&self.key(k)) {
            Some(like) => format!("{like}; the units are ms, s, m, h and d"),
            None => DURATION_HINT.to_owned(),
        }
    }

    fn size_hint(&self, k: &str) -> String {
        match super::examples::write_it_like(&self.key(k)) {
            Some(like) => format!("{like}, or a number of bytes"),
            None => SIZE_HINT.to_owned(),
        }
    }

    pub(super) fn string(&self, k: &str, raw: &str) -> Result<String, ConfigError> {
        self.x.string(&self.key(k), raw)
    }

    pub(super) fn opt(&self, k: &str, raw: Option<String>) -> Result<Option<String>, ConfigError> {
        raw.map(|r| self.string(k, &r)).transpose()
    }

    pub(super) fn non_empty(
        &self,
        k: &str,
        raw: Option<String>,
    ) -> Result<Option<String>, ConfigError> {
        match self.opt(k, raw)? {
            Some(v) if v.is_empty() => Err(self
                .err(k, "is empty")
                .with_hint("set a value, or remove the key")),
            v => Ok(v),
        }
    }

    pub(super) fn secret(
        &self,
        k: &str,
        inline: Option<String>,
        file: Option<String>,
    ) -> Result<Option<Secret>, ConfigError> {
        self.x.secret(&self.name, k, inline, file)
    }

    pub(super) fn required<T>(
        &self,
        k: &str,
        value: Option<T>,
        hint: &str,
    ) -> Result<T, ConfigError> {
        value.ok_or_else(|| self.err(k, "is required").with_hint(hint))
    }

    /// One of `options` by its config spelling; `default` `None` makes the key required.
    pub(super) fn choice<T: Clone>(
        &self,
        k: &str,
        raw: Option<String>,
        default: Option<T>,
        options: &[(&str, T)],
    ) -> Result<T, ConfigError> {
        let names: Vec<String> = options.iter().map(|(n, _)| format!("{n:?}")).collect();
        let hint = format!("use one of {}", names.join(", "));
        let Some(raw) = raw else {
            return default.ok_or_else(|| self.err(k, "is required").with_hint(hint.clone()));
        };
        let text = self.string(k, &raw)?;
        match options.iter().find(|(n, _)| *n == text) {
            Some((_, v)) => Ok(v.clone()),
            None => Err(self
                .err(k, format!("{text:?} is not an accepted value"))
                .with_hint(hint)),
        }
    }

    pub(super) fn listen(&self, k: &str, raw: &str) -> Result<SocketAddr, ConfigError> {
        let text = self.string(k, raw)?;
        text.trim().parse().map_err(|_| {
            let problem = format!("{text:?} is not an ip:port socket address");
            let hint = format!(
                "{}; hostnames are not resolved",
                self.write_it_like(k, "write it like \"127.0.0.1:8080\"")
            );
            self.err(k, problem).with_hint(hint)
        })
    }

    /// An absolute http(s) URL with a host and without userinfo or fragment.
    pub(super) fn url(
        &self,
        k: &str,
        raw: &str,
        hint: &str,
    ) -> Result<(Uri, Scheme, Authority), ConfigError> {
        let text = self.string(k, raw)?;
        let bad = |problem: String| self.err(k, problem).with_hint(hint);
        let after_scheme = text
            .split_once("://")
            .map_or(text.as_str(), |(_, rest)| rest);
        let authority_part = after_scheme.split(['/', '?', '#']).next().unwrap_or("");
        // Checked first and never echoed: userinfo may hold a password.
        if authority_part.contains('@') {
            return Err(bad(
                "must not contain credentials (user:password@)".to_owned()
            ));
        }
        if text.contains('#') {
            return Err(bad(format!(
                "{text:?} has a fragment (#...), which is never sent"
            )));
        }
        if text.contains("://") && authority_part.is_empty() {
            return Err(bad(format!("{text:?} has no host")));
        }
        let uri: Uri = text
            .parse()
            .map_err(|_| bad(format!("{text:?} is not a valid URL")))?;
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(bad(format!(
                "{text:?} is not an absolute http or https URL"
            )));
        };
        if !matches!(scheme.as_str(), "http" | "https") {
            return Err(bad(format!("{text:?} is not an http or https URL")));
        }
        if authority.host().is_empty() {
            return Err(bad(format!("{text:?} has no host")));
        }
        if authority.port().is_some() && authority.port_u16().is_none() {
            return Err(bad(format!("{text:?} has an invalid port")));
        }
        let (scheme, authority) = (scheme.clone(), authority.clone());
        Ok((uri, scheme, authority))
    }

    /// A duration greater than zero, `default` when unset.
    pub(super) fn duration(
        &self,
        k: &str,
        raw: Option<Scalar>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        Ok(self.opt_duration(k, raw, false)?.unwrap_or(default))
    }

    pub(super) fn opt_duration(
        &self,
        k: &str,
        raw: Option<Scalar>,
        allow_zero: bool,
    ) -> Result<Option<Duration>, ConfigError> {
        let d = match raw {
            None => return Ok(None),
            Some(Scalar::Int(n)) => {
                return Err(self
                    .err(k, format!("{n} has no unit"))
                    .with_hint(self.duration_hint(k)))
            }
            Some(Scalar::Text(raw)) => {
                let text = self.string(k, &raw)?;
                humantime::parse_duration(text.trim()).map_err(|_| {
                    self.err(k, format!("{text:?} is not a duration"))
                        .with_hint(self.duration_hint(k))
                })?
            }
        };
        if d.is_zero() && !allow_zero {
            return Err(self
                .err(k, "must be greater than zero")
                .with_hint(self.duration_hint(k)));
        }
        if d > MAX_DURATION {
            // Deadlines and /status times are computed from these; nothing needs longer.
            return Err(self
                .err(
                    k,
                    format!("{} is longer than 10 years", humantime::format_duration(d)),
                )
                .with_hint(self.duration_hint(k)));
        }
        Ok(Some(d))
    }

    pub(super) fn size(
        &self,
        k: &str,
        raw: Option<Scalar>,
        default: usize,
        range: RangeInclusive<usize>,
    ) -> Result<usize, ConfigError> {
        let bytes = match raw {
            None => return Ok(default),
            Some(Scalar::Int(n)) => u64::try_from(n).map_err(|_| {
                self.err(k, format!("{n} is negative"))
                    .with_hint(self.size_hint(k))
            })?,
            Some(Scalar::Text(raw)) => {
                let text = self.string(k, &raw)?;
                let bad = || {
                    self.err(k, format!("{text:?} is not a size"))
                        .with_hint(self.size_hint(k))
                };
                text.trim().parse::<ByteSize>().map_err(|_| bad())?.as_u64()
            }
        };
        let n = usize::try_from(bytes).unwrap_or(usize::MAX);
        self.in_range(k, n, &range, size_text)
    }

    pub(super) fn count(
        &self,
        k: &str,
        raw: Option<Scalar>,
        default: usize,
        range: RangeInclusive<usize>,
    ) -> Result<usize, ConfigError> {
        let n = match raw {
            None => return Ok(default),
            Some(Scalar::Int(n)) => n,
            Some(Scalar::Text(raw)) => {
                let text = self.string(k, &raw)?;
                let bad = || self.err(k, format!("{text:?} is not a whole number"));
                text.trim()
                    .parse::<i64>()
                    .map_err(|_| bad().with_hint(self.write_it_like(k, "write it like 100")))?
            }
        };
        // A negative count is below every range we accept.
        let n = usize::try_from(n).unwrap_or(0);
        self.in_range(k, n, &range, |v| v.to_string())
    }

    pub(super) fn in_range(
        &self,
        k: &str,
        n: usize,
        range: &RangeInclusive<usize>,
        show: fn(usize) -> String,
    ) -> Result<usize, ConfigError> {
        let (min, max) = (*range.start(), *range.end());
        let hint = if max == usize::MAX {
            format!("use a value of at least {}", show(min))
        } else {
            format!("use a value between {} and {}", show(min), show(max))
        };
        if n < min {
            return Err(self
                .err(k, format!("must be at least {}", show(min)))
                .with_hint(hint));
        }
        if n > max {
            return Err(self
                .err(k, format!("must be at most {}", show(max)))
                .with_hint(hint));
        }
        Ok(n)
    }
}
