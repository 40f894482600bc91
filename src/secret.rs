//! `Secret`: a credential that cannot be printed by accident.
//!
//! Client secrets, passwords, access tokens and refresh tokens are wrapped in
//! `Secret` from the moment they are read. `Debug` and `Display` print a fixed
//! mask, there is no `Serialize`, and the value is reachable only through
//! [`Secret::expose`], which makes every use of a credential greppable.

use std::fmt;
use std::sync::Arc;

/// A URL for output (`check`, `token`, messages): scheme, host and path, never the
/// query, which may carry a credential (`?api_key=…`).
pub fn display_url(uri: &http::Uri) -> String {
    format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or("https"),
        uri.authority().map(|a| a.as_str()).unwrap_or(""),
        uri.path()
    )
}

/// A credential whose `Debug`/`Display` print `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Arc::from(value.into()))
    }

    /// The credential itself; call only where it is sent to a peer.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the credential is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("hunter2-very-secret");
        assert!(!format!("{s:?}").contains("hunter2"), "Debug must redact");
        assert!(!format!("{s}").contains("hunter2"), "Display must redact");
        assert_eq!(s.expose(), "hunter2-very-secret");
    }
}
