//! The token engine: one [`Refresher`] task per client owns every token request;
//! requests read the current token through a [`TokenHandle`].
//!
//! The hot path is one atomic load of an `ArcSwapOption<Token>`: no lock is shared
//! by all requests. Only the refresher publishes tokens. A request that saw a 401
//! asks for a new token through [`TokenHandle::on_unauthorized`], which decides
//! whether the token is plausibly the cause (see [`Unauthorized`]); a burst of
//! 401s causes at most one refresh, 401-triggered refreshes are rate-limited, and
//! the old token keeps serving until a new one is installed.

mod assertion;
mod dialect;
pub mod dpop;
pub(crate) mod lifetime;
mod redact;
mod refresher;
pub mod response;
mod revoke;
mod state;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

pub use crate::metrics::{Outcome, State, Trigger};
pub(crate) use dialect::GrantKind;
pub use dpop::{Dpop, LazyProofKey};
pub(crate) use refresher::{backoff_delay, error_chain, refresh_margin};
pub use refresher::{Exit, Handover, Refresher, TokenEndpoint, TokenError};
use state::StateCell;
pub use state::{LastFailure, LastRefresh, Status, StoreStatus};

/// An access token ready to inject.
pub struct Token {
    /// Increases by one with every token the refresher publishes.
    pub generation: u64,
    /// The complete injected header value (`Bearer …`), marked sensitive.
    pub header: HeaderValue,
    /// For a DPoP-bound token, the `ath` of its proofs: base64url(SHA-256(token)).
    pub dpop_ath: Option<String>,
    /// A subject's token: the key of its proofs (the client's own key otherwise).
    pub dpop_key: Option<Arc<LazyProofKey>>,
    /// After this instant the token is not used any more.
    pub usable_until: Option<Instant>,
    /// When it was installed (published by the refresher).
    pub installed_at: Instant,
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
            .field("installed_at", &self.installed_at)
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
    /// Stop between token requests and hand the state to a successor (reload).
    Stop(tokio::sync::oneshot::Sender<Handover>),
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

/// A 401 retires a token without `invalid_token` only once it is this old (or
/// past half its lifetime): a 401 to a token just issued is about the request
/// (permissions, a wrong account), not the token.
pub const UNAUTHORIZED_MIN_AGE: Duration = Duration::from_secs(30);
/// At most one 401-triggered token request per client in this interval, so an
/// API that answers 401 for reasons of its own cannot drive the token endpoint
/// into its rate limit.
pub const UNAUTHORIZED_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// What to do after the API answered 401 to a token.
#[derive(Debug)]
pub enum Unauthorized {
    /// A newer token is already current: replay with it.
    Newer(Arc<Token>),
    /// A new token is on its way ([`TokenHandle::get_newer`] waits for it).
    Refreshing,
    /// The 401 is not plausibly about the token, or the client just refreshed
    /// after a 401: the token stays, and the 401 goes back to the app.
    Kept(&'static str),
}

pub(crate) struct Shared {
    current: ArcSwapOption<Token>,
    status: watch::Sender<Status>,
    commands: mpsc::Sender<Command>,
    /// The newest generation a 401 asked to replace (asks once per generation).
    rejected: AtomicU64,
    /// The newest generation whose replay also got a 401: 401s up to it are not
    /// about the token (unless the API says `invalid_token`).
    not_the_token: AtomicU64,
    /// Earliest time of the next 401-triggered refresh.
    next_unauthorized_refresh: Mutex<Option<Instant>>,
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

    /// After the API answered 401 to `token`: decides whether the token is
    /// plausibly the cause and, when it is, asks the refresher for a new one.
    ///
    /// `invalid_token` is whether the API said so (`WWW-Authenticate: Bearer
    /// error="invalid_token"`, RFC 6750 §3.1). Without it, a token younger than
    /// [`UNAUTHORIZED_MIN_AGE`] (or half its lifetime) is kept; so is a young one
    /// of a generation whose replay with a fresh token was answered 401 as well,
    /// even with it. At most one refresh per [`UNAUTHORIZED_REFRESH_INTERVAL`]
    /// is asked for. The token is never taken out of service here: it serves
    /// until the refresher installs the next one.
    pub fn on_unauthorized(&self, token: &Token, invalid_token: bool) -> Unauthorized {
        let now = Instant::now();
        if let Some(current) = self.current() {
            if current.generation > token.generation {
                return Unauthorized::Newer(current);
            }
        }
        if self.shared.rejected.load(Ordering::Acquire) >= token.generation {
            return Unauthorized::Refreshing;
        }
        if self.shared.status.borrow().state() == State::Refreshing {
            // A refresh is under way (a provider that revokes the old token when it
            // issues the new one answers 401 in this window): its token is newer.
            return Unauthorized::Refreshing;
        }
        // A token of a generation whose replay was refused as well is retired only
        // once it is old, whatever the API says: an API that answers invalid_token
        // to every token (a wrong audience) must not drive a refresh per request.
        let age = now.saturating_duration_since(token.installed_at);
        let half_life = token
            .usable_until
            .map(|u| u.saturating_duration_since(token.installed_at) / 2);
        let old = age >= half_life.map_or(UNAUTHORIZED_MIN_AGE, |h| h.min(UNAUTHORIZED_MIN_AGE));
        if self.shared.not_the_token.load(Ordering::Acquire) >= token.generation && !old {
            return Unauthorized::Kept("a fresh token was refused as well");
        }
        if !invalid_token && !old {
            return Unauthorized::Kept("the token is too new to be the cause");
        }
        let previous = {
            // The rate limit and the mark that this generation is being replaced
            // change together: a request that sees the limit set also sees the
            // mark, and waits for the new token instead of passing its 401 on.
            let mut next = self
                .shared
                .next_unauthorized_refresh
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if self.shared.rejected.load(Ordering::Acquire) >= token.generation {
                return Unauthorized::Refreshing;
            }
            if next.is_some_and(|at| now < at) {
                return Unauthorized::Kept("a token was refreshed after a 401 moments ago");
            }
            *next = Some(now + UNAUTHORIZED_REFRESH_INTERVAL);
            self.shared
                .rejected
                .fetch_max(token.generation, Ordering::AcqRel)
        };
        if previous < token.generation {
            // A full queue means the refresher already has work pending, which will
            // publish a new token: nothing is lost by dropping this message.
            let _ignored = self
                .shared
                .commands
                .try_send(Command::Rejected(token.generation));
        }
        Unauthorized::Refreshing
    }

    /// The replay of a request with the token of `generation` (newer than the one
    /// first refused) was answered 401 too: the 401 is about the request, so
    /// further 401s to tokens up to this generation retire nothing.
    pub fn refused_again(&self, generation: u64) {
        self.shared
            .not_the_token
            .fetch_max(generation, Ordering::AcqRel);
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

    /// Stops the refresher between token requests (a request under way is
    /// answered first, so a rotated refresh token is never lost) and returns
    /// its state, for the refresher of the reloaded client. `None` when it has
    /// already stopped.
    pub async fn stop(&self) -> Option<Handover> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.shared.commands.send(Command::Stop(reply)).await.ok()?;
        answer.await.ok()
    }

    /// A snapshot of the client's state for `/status` and `/readyz`.
    pub fn status(&self) -> Status {
        let mut status = self.shared.status.borrow().clone();
        if status.state() == State::Valid && self.current().is_none() {
            // The token ran out while the refresher waits out a backoff: it wakes
            // only when it may ask again, so the state is brought up to date here.
            status.state = state::StateCell(State::Unavailable);
        }
        status
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
            let fail = {
                let status = rx.borrow_and_update();
                status.fail_fast().or_else(|| {
                    // Waiting for a token to replace one the API refused: while the
                    // refresher backs off, none is coming soon.
                    (newer_than > 0).then(|| status.backing_off()).flatten()
                })
            };
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
/// A refresher that dies (a panic) or ends without being asked to stop must not
/// leave the client looking healthy: the token is withdrawn, the state becomes
/// `unavailable` with the reason (so `/readyz` answers 503 and requests get
/// `token_unavailable` at once), and it is logged at error level. Dropping
/// (aborting) the supervisor aborts the refresher too.
pub(crate) async fn supervise(
    client: String,
    handle: TokenHandle,
    metrics: crate::metrics::ClientMetrics,
    task: tokio::task::JoinHandle<Exit>,
) {
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _abort = AbortOnDrop(task.abort_handle());
    let cause = match task.await {
        Ok(Exit::Stopped) => return,
        Ok(Exit::Orphaned) => "it ended on its own: its command channel closed".to_owned(),
        Err(e) if e.is_cancelled() => return,
        Err(e) => match e.try_into_panic() {
            Ok(payload) => payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .map(|s| s.chars().take(200).collect::<String>())
                .unwrap_or_else(|| "a panic".to_owned()),
            Err(_) => "an unknown failure".to_owned(),
        },
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

/// Spawns `refresher` with its supervisor (see [`supervise`]); aborting the
/// returned task (reload, shutdown) aborts the refresher with it.
pub(crate) fn spawn(
    client: &str,
    refresher: Refresher,
    handle: TokenHandle,
    metrics: crate::metrics::ClientMetrics,
) -> tokio::task::JoinHandle<()> {
    use tracing::Instrument as _;
    let span = tracing::info_span!("refresher", client = %client);
    let task = tokio::spawn(refresher.run().instrument(span));
    tokio::spawn(supervise(client.to_owned(), handle, metrics, task))
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
        rejected: AtomicU64::new(0),
        not_the_token: AtomicU64::new(0),
        next_unauthorized_refresh: Mutex::new(None),
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

    /// A token of `generation`, installed now and usable for an hour.
    fn token_now(generation: u64) -> Arc<Token> {
        let now = Instant::now();
        Arc::new(Token {
            generation,
            header: HeaderValue::from_static("Bearer t"),
            dpop_ath: None,
            dpop_key: None,
            usable_until: Some(now + Duration::from_secs(3600)),
            installed_at: now,
        })
    }

    /// A handle whose cell holds a fresh token of `generation`; the receiver
    /// sees what the handle asks of the refresher.
    fn holding(
        generation: u64,
    ) -> (
        TokenHandle,
        Arc<Shared>,
        mpsc::Receiver<Command>,
        Arc<Token>,
    ) {
        let (handle, shared, commands) = channel(Duration::from_secs(2));
        let token = token_now(generation);
        shared.current.store(Some(Arc::clone(&token)));
        (handle, shared, commands, token)
    }

    /// A 401 to a young token without `invalid_token` is about the request: the
    /// token stays and nothing is asked of the refresher.
    #[tokio::test(start_paused = true)]
    async fn a_401_to_a_young_token_without_invalid_token_keeps_it() {
        let (handle, _shared, mut commands, token) = holding(1);
        assert!(matches!(
            handle.on_unauthorized(&token, false),
            Unauthorized::Kept(_)
        ));
        assert!(commands.try_recv().is_err(), "no refresh asked for");
        assert!(handle.current().is_some(), "the token keeps serving");
        // Old enough (30 s), the same 401 is plausibly about the token.
        tokio::time::advance(UNAUTHORIZED_MIN_AGE).await;
        assert!(matches!(
            handle.on_unauthorized(&token, false),
            Unauthorized::Refreshing
        ));
        assert!(matches!(commands.try_recv(), Ok(Command::Rejected(1))));
    }

    /// However many requests see the 401 of one token, one refresh is asked
    /// for; and 401-triggered refreshes come at most once per interval.
    #[tokio::test(start_paused = true)]
    async fn a_burst_of_401s_asks_once_and_the_next_ask_waits_for_the_interval() {
        let (handle, shared, mut commands, token) = holding(1);
        for _ in 0..50 {
            assert!(matches!(
                handle.on_unauthorized(&token, true),
                Unauthorized::Refreshing
            ));
        }
        assert!(matches!(commands.try_recv(), Ok(Command::Rejected(1))));
        assert!(commands.try_recv().is_err(), "one ask for fifty 401s");
        // A new token arrives and is refused at once: rate-limited.
        let second = token_now(2);
        shared.current.store(Some(Arc::clone(&second)));
        assert!(matches!(
            handle.on_unauthorized(&second, true),
            Unauthorized::Kept(_)
        ));
        tokio::time::advance(UNAUTHORIZED_REFRESH_INTERVAL).await;
        assert!(matches!(
            handle.on_unauthorized(&second, true),
            Unauthorized::Refreshing
        ));
        assert!(matches!(commands.try_recv(), Ok(Command::Rejected(2))));
    }

    /// A 401 to an older token while a newer one is current replays with the
    /// newer one; once a fresh token was refused as well, young tokens are kept
    /// even when the API says `invalid_token`.
    #[tokio::test(start_paused = true)]
    async fn a_newer_token_is_used_and_a_refused_fresh_token_stops_retiring() {
        let (handle, shared, mut commands, first) = holding(1);
        let second = token_now(2);
        shared.current.store(Some(Arc::clone(&second)));
        assert!(matches!(
            handle.on_unauthorized(&first, true),
            Unauthorized::Newer(t) if t.generation == 2
        ));
        handle.refused_again(2);
        assert!(matches!(
            handle.on_unauthorized(&second, true),
            Unauthorized::Kept(_)
        ));
        assert!(
            commands.try_recv().is_err(),
            "nothing asked of the refresher"
        );
    }

    /// Logs written while the returned guard lives, at every level.
    pub(super) fn capture_logs() -> (
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
            dpop_ath: None,
            dpop_key: None,
            usable_until: None,
            installed_at: Instant::now(),
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

    /// A refresher task that ends without having been asked to stop (its
    /// command channel closed) leaves nobody renewing the token: it must show
    /// like a panic does. A stop (reload, shutdown) must not.
    #[tokio::test]
    async fn a_refresher_that_ends_unasked_shows_in_state_and_logs_and_a_stop_does_not() {
        let (logs, _guard) = capture_logs();
        let metrics = crate::metrics::Metrics::new()
            .expect("metrics")
            .client("payments");
        let valid = |shared: &Shared| {
            shared.current.store(Some(token_now(1)));
            shared
                .status
                .send_modify(|s| s.state = StateCell(State::Valid));
        };

        let (stopped, shared, _commands) = channel(Duration::from_secs(30));
        valid(&shared);
        let task = tokio::spawn(async { Exit::Stopped });
        supervise("payments".into(), stopped.clone(), metrics.clone(), task).await;
        assert_eq!(
            stopped.status().state(),
            State::Valid,
            "a stop is not a failure"
        );

        let (ended, shared, _commands) = channel(Duration::from_secs(30));
        valid(&shared);
        let task = tokio::spawn(async { Exit::Orphaned });
        supervise("payments".into(), ended.clone(), metrics, task).await;
        let status = ended.status();
        assert_eq!(status.state(), State::Unavailable, "{}", status.describe());
        assert!(
            status.describe().contains("refresher stopped unexpectedly"),
            "/status says why: {}",
            status.describe()
        );
        assert!(!ended.is_ready(), "its client is not ready");
        let text = String::from_utf8_lossy(&logs.lock().expect("logs")).into_owned();
        assert!(
            text.contains("ERROR") && text.contains("token refresher stopped unexpectedly"),
            "the end is logged at error level: {text}"
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
            std::future::pending::<Exit>().await
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
