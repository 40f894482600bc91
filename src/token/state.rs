//! Per-client token state as the outside sees it: `/status`, `/readyz`, waiters.

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::Unavailable;
pub(crate) use crate::metrics::State;

/// The last token endpoint call.
#[derive(Clone, Debug, Serialize)]
pub struct LastRefresh {
    /// Wall-clock time it ended (RFC 3339).
    pub at: String,
    /// startup | proactive | expired | unauthorized.
    pub trigger: &'static str,
    /// The grant used.
    pub grant: &'static str,
    /// success | rejected | error.
    pub outcome: &'static str,
    /// The error, without secrets, when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The error as the app may see it: no provider text (see `TokenError::app_message`).
    #[serde(skip)]
    pub(crate) app_error: Option<String>,
}

/// The last token endpoint call that failed, kept after later successes so an
/// operator still sees why, e.g., a refresh token was dropped for the full grant.
#[derive(Clone, Debug, Serialize)]
pub struct LastFailure {
    /// Wall-clock time it ended (RFC 3339).
    pub at: String,
    /// startup | proactive | expired | unauthorized.
    pub trigger: &'static str,
    /// The grant used.
    pub grant: &'static str,
    /// rejected | error.
    pub outcome: &'static str,
    /// The provider's error code (RFC 6749 `error`, e.g. `invalid_grant`), when it sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The provider's error description, with every credential of the request
    /// scrubbed, control characters removed and cut to 200 characters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The whole failure in one line, as `last_refresh.error` says it.
    pub message: String,
}

/// A snapshot of one client's token state. Holds no secret.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    /// See [`State`].
    pub state: StateCell,
    /// Generation of the newest token (0: none yet).
    pub generation: u64,
    /// When the access token expires (RFC 3339), if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token_expires_at: Option<String>,
    /// Whether a refresh token is held.
    pub has_refresh_token: bool,
    /// When the refresh token expires (RFC 3339), if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token_expires_at: Option<String>,
    /// When the next token request is planned (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_refresh_at: Option<String>,
    /// The last token endpoint call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_refresh: Option<LastRefresh>,
    /// The last token endpoint call that failed, even when a later one succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<LastFailure>,
    /// When the last successful token request ended (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_success_at: Option<String>,
    /// Successful token requests since start.
    pub refreshes_succeeded: u64,
    /// Failed or rejected token requests since start.
    pub refreshes_failed: u64,
    /// Why the client is not ready, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The token store, when state is kept beyond this process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreStatus>,
    #[serde(skip)]
    pub(crate) retry_at: Option<Instant>,
    /// The refresher task died: no token will come until a restart.
    #[serde(skip)]
    pub(crate) refresher_stopped: bool,
}

/// Where a client's token state is persisted or shared, and whether that works.
#[derive(Clone, Debug, Serialize)]
pub struct StoreStatus {
    /// file | redis.
    pub kind: &'static str,
    /// Whether the last store operation succeeded.
    pub available: bool,
    /// The last store error, while it is unavailable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether the newest token state still has to be written back.
    pub write_pending: bool,
    /// The generation of the stored record this process's state matches.
    pub generation: u64,
    /// What this process does for the client: `leader` while it refreshes,
    /// `follower` while another replica does; while a shared store is down,
    /// `local` when it refreshes with a grant that spends nothing, `waiting`
    /// when only the store may let it spend a refresh token; `locked` while
    /// its stored record does not open (see `problem`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// Since when the store has not answered (RFC 3339), while it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable_since: Option<String>,
    /// While the client's stored record does not open (role `locked`): what is
    /// wrong and what an operator does about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// [`State`] with a default, so `Status` can derive `Default`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct StateCell(pub State);

impl Default for StateCell {
    fn default() -> Self {
        StateCell(State::Starting)
    }
}

impl Status {
    /// The client's state.
    pub fn state(&self) -> State {
        self.state.0
    }

    /// When no token can come soon, the error to answer at once instead of waiting.
    pub(crate) fn fail_fast(&self) -> Option<Unavailable> {
        match self.state.0 {
            State::Starting | State::Refreshing | State::Valid => None,
            State::Unavailable => Some(Unavailable {
                reason: self.describe_for_app(),
                retry_after: self
                    .retry_at
                    .map(|t| t.saturating_duration_since(Instant::now()))
                    .unwrap_or(Duration::from_secs(1))
                    .max(Duration::from_secs(1)),
            }),
            State::NeedsAuthorization => Some(Unavailable {
                reason: self.describe_for_app(),
                retry_after: Duration::from_secs(60),
            }),
        }
    }

    /// While the refresher waits out a backoff: the error to answer at once.
    pub(crate) fn backing_off(&self) -> Option<Unavailable> {
        let wait = self
            .retry_at?
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())?;
        Some(Unavailable {
            reason: self.describe_for_app(),
            retry_after: wait.max(Duration::from_secs(1)),
        })
    }

    /// Where the client stands and why, as the app may be told (`token_unavailable`
    /// detail): fixed text and the RFC 6749 code, never the provider's own words.
    pub(crate) fn describe_for_app(&self) -> String {
        let state = self.state.0.as_str();
        let error = self
            .last_refresh
            .as_ref()
            .and_then(|l| l.app_error.as_deref());
        if self.refresher_stopped {
            return format!("{state}: the token refresher stopped");
        }
        match (self.state.0, error) {
            (State::NeedsAuthorization, Some(e)) => {
                format!("{state}: a new refresh token is needed; last token request failed: {e}")
            }
            (State::NeedsAuthorization, None) => {
                format!("{state}: a new refresh token is needed")
            }
            (_, Some(e)) => format!("{state}: last token request failed: {e}"),
            (_, None) => state.to_owned(),
        }
    }

    /// One line saying where the client stands and why (`/readyz`, logs).
    pub fn describe(&self) -> String {
        match (&self.reason, &self.last_refresh) {
            (Some(r), _) => format!("{}: {r}", self.state.0.as_str()),
            (None, Some(LastRefresh { error: Some(e), .. })) => {
                format!("{}: last token request failed: {e}", self.state.0.as_str())
            }
            _ => self.state.0.as_str().to_owned(),
        }
    }
}
