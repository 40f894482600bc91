//! The token engine: one [`Refresher`] task per client owns every token request;
//! requests read the current token through a [`TokenHandle`].
//!
//! The hot path is one atomic load of an `ArcSwapOption<Token>`: no lock is shared
//! by all requests. Only the refresher publishes tokens; a request that saw a 401
//! may retire the token it used, but only while that exact token is still current
//! (compare-and-swap on the pointer), so a burst of 401s causes one refresh.

mod dialect;
mod redact;
mod refresher;
pub mod response;
mod state;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

pub(crate) use refresher::error_chain;
pub use refresher::{Refresher, TokenEndpoint, TokenError};
use state::StateCell;
pub use state::{LastRefresh, State, Status, StoreStatus};

/// What started a token request (a label of `tokenproxy_token_refreshes_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// The first token after start.
    Startup,
    /// Ahead of expiry, in the background.
    Proactive,
    /// A request found no usable token.
    Expired,
    /// The API answered 401 to the current token.
    Unauthorized,
}

impl Trigger {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Startup => "startup",
            Trigger::Proactive => "proactive",
            Trigger::Expired => "expired",
            Trigger::Unauthorized => "unauthorized",
        }
    }
}

/// How a token endpoint call ended (a label of `tokenproxy_token_refreshes_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A usable token came back.
    Success,
    /// The provider refused (invalid_grant, invalid_client, ...).
    Rejected,
    /// Network failure, timeout, 5xx, 429 or an unusable response.
    Error,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Rejected => "rejected",
            Outcome::Error => "error",
        }
    }
}

/// An access token ready to inject.
pub struct Token {
    /// Increases by one with every token the refresher publishes.
    pub generation: u64,
    /// The complete injected header value (`Bearer …`), marked sensitive.
    pub header: HeaderValue,
    /// After this instant the token is not used any more.
    pub usable_until: Option<Instant>,
}

impl Token {
    /// Whether the token may still be sent.
    pub fn is_usable(&self, now: Instant) -> bool {
        self.usable_until.is_none_or(|t| now < t)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("generation", &self.generation)
            .field("header", &"[redacted]")
            .field("usable_until", &self.usable_until)
            .finish()
    }
}

/// Messages from request handlers to the refresher.
#[derive(Debug)]
pub(crate) enum Command {
    /// A request found no usable token.
    Need,
    /// The API rejected the token of this generation (already retired from the cell).
    Rejected(u64),
    /// An operator supplied a new refresh token (leaves `needs_authorization`).
    NewRefreshToken(crate::secret::Secret),
}

/// Why a request could not get a token.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{reason}")]
pub struct Unavailable {
    /// Human-readable cause, without secrets.
    pub reason: String,
    /// When it is worth trying again.
    pub retry_after: Duration,
}

pub(crate) struct Shared {
    current: ArcSwapOption<Token>,
    status: watch::Sender<Status>,
    commands: mpsc::Sender<Command>,
}

/// The request path's view of one client's token.
#[derive(Clone)]
pub struct TokenHandle {
    shared: Arc<Shared>,
    wait_timeout: Duration,
}

impl TokenHandle {
    /// The current token when it is usable now; never waits.
    pub fn current(&self) -> Option<Arc<Token>> {
        let guard = self.shared.current.load();
        match &*guard {
            Some(t) if t.is_usable(Instant::now()) => Some(Arc::clone(t)),
            _ => None,
        }
    }

    /// A usable token, waiting at most the client's `token_wait_timeout`.
    pub async fn get(&self) -> Result<Arc<Token>, Unavailable> {
        if let Some(t) = self.current() {
            return Ok(t);
        }
        self.wait_for(0).await
    }

    /// A usable token newer than `generation` (after that one was rejected).
    pub async fn get_newer(&self, generation: u64) -> Result<Arc<Token>, Unavailable> {
        if let Some(t) = self.current() {
            if t.generation > generation {
                return Ok(t);
            }
        }
        self.wait_for(generation).await
    }

    /// Retires the token of `generation` if it is still current, and asks for a new one.
    ///
    /// Returns whether this call retired it (false: someone already did, or a newer
    /// token is already in place).
    pub fn reject(&self, generation: u64) -> bool {
        let current = self.shared.current.load_full();
        let Some(cur) = current.as_ref() else {
            return false;
        };
        if cur.generation != generation {
            return false;
        }
        let prev = self.shared.current.compare_and_swap(&current, None);
        let retired = matches!(&*prev, Some(p) if Arc::ptr_eq(p, cur));
        if retired {
            // A full queue means the refresher already has work pending, which will
            // publish a new token: nothing is lost by dropping this message.
            let _ignored = self.shared.commands.try_send(Command::Rejected(generation));
        }
        retired
    }

    /// Hands the refresher a new refresh token from an operator; it is used at once.
    pub fn provide_refresh_token(&self, token: crate::secret::Secret) -> Result<(), Unavailable> {
        self.shared
            .commands
            .try_send(Command::NewRefreshToken(token))
            .map_err(|_| Unavailable {
                reason: "the refresher is busy; try again".into(),
                retry_after: Duration::from_secs(1),
            })
    }

    /// A snapshot of the client's state for `/status` and `/readyz`.
    pub fn status(&self) -> Status {
        self.shared.status.borrow().clone()
    }

    /// Whether a usable token is held right now.
    pub fn is_ready(&self) -> bool {
        self.current().is_some()
    }

    async fn wait_for(&self, newer_than: u64) -> Result<Arc<Token>, Unavailable> {
        let deadline = Instant::now() + self.wait_timeout;
        let mut rx = self.shared.status.subscribe();
        // See the comment in `reject`: a full queue already holds a request for work.
        let _ignored = self.shared.commands.try_send(Command::Need);
        loop {
            // Mark the status as seen *before* reading the cell: the refresher stores
            // the token first and publishes the status second, so a token stored after
            // this point also wakes `changed()` below. The other order can miss it and
            // sleep out the whole timeout with a valid token in the cell.
            let fail = rx.borrow_and_update().fail_fast();
            if let Some(t) = self.current() {
                if t.generation > newer_than {
                    return Ok(t);
                }
            }
            if let Some(err) = fail {
                return Err(err);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_closed)) => {
                    return Err(Unavailable {
                        reason: "token refresher stopped".into(),
                        retry_after: Duration::from_secs(1),
                    })
                }
                Err(_elapsed) => {
                    let status = rx.borrow();
                    return Err(Unavailable {
                        reason: format!(
                            "no token within {}: {}",
                            humantime::format_duration(self.wait_timeout),
                            status.describe_for_app()
                        ),
                        retry_after: Duration::from_secs(1),
                    });
                }
            }
        }
    }
}

/// Watches one client's refresher task until it ends.
///
/// A refresher that dies (a panic) must not leave the client looking healthy: the
/// token is withdrawn, the state becomes `unavailable` with the reason (so `/readyz`
/// answers 503 and requests get `token_unavailable` at once), and it is logged at
/// error level. Dropping (aborting) the supervisor aborts the refresher too.
pub(crate) async fn supervise(
    client: String,
    handle: TokenHandle,
    metrics: crate::metrics::ClientMetrics,
    task: tokio::task::JoinHandle<()>,
) {
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _abort = AbortOnDrop(task.abort_handle());
    let Err(e) = task.await else {
        return;
    };
    if e.is_cancelled() {
        return;
    }
    let cause = match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .map(|s| s.chars().take(200).collect::<String>())
            .unwrap_or_else(|| "a panic".to_owned()),
        Err(_) => "an unknown failure".to_owned(),
    };
    tracing::error!(client = %client, cause = %cause,
        "token refresher stopped unexpectedly; the client has no token until the sidecar restarts");
    handle.shared.current.store(None);
    handle.shared.status.send_modify(|s| {
        s.state = StateCell(State::Unavailable);
        s.refresher_stopped = true;
        s.reason = Some(format!(
            "the token refresher stopped unexpectedly ({cause}); restart the sidecar"
        ));
        s.access_token_expires_at = None;
        s.next_refresh_at = None;
        s.retry_at = None;
    });
    metrics.set_state(State::Unavailable);
    metrics.set_expiry(0.0);
}

/// Creates the handle and the refresher for one client.
pub(crate) fn channel(
    wait_timeout: Duration,
) -> (TokenHandle, Arc<Shared>, mpsc::Receiver<Command>) {
    let (commands, rx) = mpsc::channel(64);
    let (status, _) = watch::channel(Status::default());
    let shared = Arc::new(Shared {
        current: ArcSwapOption::empty(),
        status,
        commands,
    });
    (
        TokenHandle {
            shared: Arc::clone(&shared),
            wait_timeout,
        },
        shared,
        rx,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logs written while the returned guard lives, at every level.
    fn capture_logs() -> (
        Arc<std::sync::Mutex<Vec<u8>>>,
        tracing::subscriber::DefaultGuard,
    ) {
        let buffer = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&buffer);
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Writer(Arc::clone(&sink)))
            .finish();
        (buffer, tracing::subscriber::set_default(subscriber))
    }

    struct Writer(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Writer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Security review (low): a refresher task that dies (a panic) used to leave the
    /// client "valid" with nobody renewing its token; it must show in the state, in
    /// readiness and in the logs, and requests must fail fast.
    #[tokio::test]
    async fn a_refresher_that_panics_shows_in_state_readiness_and_logs() {
        let (logs, _guard) = capture_logs();
        let (handle, shared, _commands) = channel(Duration::from_secs(30));
        shared.current.store(Some(Arc::new(Token {
            generation: 1,
            header: HeaderValue::from_static("Bearer t"),
            usable_until: None,
        })));
        shared
            .status
            .send_modify(|s| s.state = StateCell(State::Valid));
        let metrics = crate::metrics::Metrics::new()
            .expect("metrics")
            .client("payments");
        let task = tokio::spawn(async { panic!("deadline arithmetic overflowed") });

        supervise("payments".into(), handle.clone(), metrics, task).await;

        assert!(!handle.is_ready(), "a dead refresher's client is not ready");
        let status = handle.status();
        assert_eq!(status.state(), State::Unavailable, "{}", status.describe());
        assert!(
            status.describe().contains("refresher stopped"),
            "/readyz says why: {}",
            status.describe()
        );
        let started = Instant::now();
        let err = handle
            .get()
            .await
            .expect_err("no token from a dead refresher");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "requests fail fast instead of waiting out token_wait_timeout"
        );
        assert!(err.reason.contains("refresher stopped"), "{}", err.reason);
        let text = String::from_utf8_lossy(&logs.lock().expect("logs")).into_owned();
        assert!(
            text.contains("ERROR")
                && text.contains("token refresher stopped unexpectedly")
                && text.contains("payments"),
            "the death is logged at error level: {text}"
        );
    }

    #[tokio::test]
    async fn aborting_the_supervisor_aborts_the_refresher() {
        let (handle, _shared, _commands) = channel(Duration::from_secs(1));
        let metrics = crate::metrics::Metrics::new()
            .expect("metrics")
            .client("payments");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let refresher = tokio::spawn(async move {
            let _held = tx;
            std::future::pending::<()>().await;
        });
        let supervisor = tokio::spawn(supervise("payments".into(), handle, metrics, refresher));
        tokio::task::yield_now().await;
        supervisor.abort();
        assert!(
            tokio::time::timeout(Duration::from_secs(5), rx)
                .await
                .is_ok(),
            "the refresher should have been aborted (its sender dropped)"
        );
    }
}
