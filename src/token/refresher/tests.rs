//! The refresher's state machine on tokio's paused clock, with a scripted token
//! source instead of HTTP: what it asks the provider, when, and what it
//! publishes through the [`TokenHandle`].

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::StatusCode;
use tokio::time::Instant;

use super::endpoint::{TokenFuture, TokenSource};
use super::{Refresher, TokenError};
use crate::clock::Clock;
use crate::config::{ClientConfig, Config, ErrorMeaning, MapEnv, TokenConfig};
use crate::secret::Secret;
use crate::store::{Record, Saved, Store, TokenState};
use crate::token::dialect::GrantKind;
use crate::token::response::{LifetimeSource, ProviderError, TokenSet};
use crate::token::{Command, State, TokenHandle};

const URL: &str = "https://provider.test/token";
const STORE_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// Wall time that moves with tokio's (paused) clock.
struct PausedWallClock {
    base: SystemTime,
    start: Instant,
}

impl Clock for PausedWallClock {
    fn wall_now(&self) -> SystemTime {
        self.base + self.start.elapsed()
    }
}

/// One token request the refresher made.
#[derive(Debug)]
struct Call {
    /// The `grant` label: client_credentials, refresh_token, ...
    grant: &'static str,
    /// The refresh token sent, when the grant was refresh_token.
    refresh_token: Option<String>,
    /// When it was made, from the start of the test.
    at: Duration,
}

/// A token endpoint that answers from a script and records every call.
struct Script {
    start: Instant,
    answers: Mutex<VecDeque<Result<TokenSet, TokenError>>>,
    calls: Mutex<Vec<Call>>,
}

impl Script {
    fn new(answers: impl IntoIterator<Item = Result<TokenSet, TokenError>>) -> Arc<Script> {
        Arc::new(Script {
            start: Instant::now(),
            answers: Mutex::new(answers.into_iter().collect()),
            calls: Mutex::new(Vec::new()),
        })
    }

    fn calls(&self) -> std::sync::MutexGuard<'_, Vec<Call>> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self) -> usize {
        self.calls().len()
    }
}

impl TokenSource for Script {
    fn request<'a>(&'a self, config: &'a TokenConfig, kind: GrantKind<'a>) -> TokenFuture<'a> {
        let refresh_token = match kind {
            GrantKind::Refresh(rt) => Some(rt.expose().to_owned()),
            _ => None,
        };
        self.calls().push(Call {
            grant: kind.label(config),
            refresh_token,
            at: self.start.elapsed(),
        });
        let answer = self
            .answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
            .unwrap_or_else(|| {
                Err(TokenError::Unreachable {
                    url: URL.into(),
                    detail: "the script has no more answers".into(),
                })
            });
        Box::pin(async move { answer })
    }
}

/// A Bearer token living `lifetime_s`, with a refresh token when given.
fn token(access: &str, lifetime_s: u64, refresh: Option<&str>) -> Result<TokenSet, TokenError> {
    Ok(TokenSet {
        access_token: Secret::new(access),
        token_type: Some("Bearer".into()),
        lifetime: Some(Duration::from_secs(lifetime_s)),
        lifetime_source: LifetimeSource::ExpiresIn,
        refresh_token: refresh.map(Secret::new),
        refresh_token_lifetime: None,
        scope: None,
    })
}

/// The provider answered `status` with RFC 6749 `code`.
fn refused(status: u16, code: &str, retry_after: Option<u64>) -> Result<TokenSet, TokenError> {
    Err(TokenError::Provider {
        url: URL.into(),
        error: ProviderError {
            status: StatusCode::from_u16(status).expect("a valid status"),
            error: Some(code.into()),
            description: None,
            meaning: None,
        },
        retry_after: retry_after.map(Duration::from_secs),
    })
}

/// The provider answered `status` with `code`, and a `[[token.errors]]` rule
/// said it means `meaning`.
fn refused_as(status: u16, code: &str, meaning: ErrorMeaning) -> Result<TokenSet, TokenError> {
    match refused(status, code, None) {
        Err(TokenError::Provider {
            url,
            mut error,
            retry_after,
        }) => {
            error.meaning = Some(meaning);
            Err(TokenError::Provider {
                url,
                error,
                retry_after,
            })
        }
        other => other,
    }
}

fn unreachable() -> Result<TokenSet, TokenError> {
    Err(TokenError::Unreachable {
        url: URL.into(),
        detail: "connection refused".into(),
    })
}

/// A client `payments` with `token_lines` in its `[token]` table and
/// `store` (TOML lines) as `[store]`.
fn config(token_lines: &str, store: &str) -> Config {
    let text = format!(
        "{store}\n[clients.payments]\nlisten = \"127.0.0.1:8080\"\nupstream = \"https://api.pay.example\"\n\n[clients.payments.token]\nurl = \"{URL}\"\nclient_id = \"id-123\"\n{token_lines}\n"
    );
    match crate::config::from_str(&text, None, &MapEnv::new()) {
        Ok(c) => c,
        Err(e) => panic!("the test configuration should be valid: {e}"),
    }
}

const CLIENT_CREDENTIALS: &str = "grant = \"client_credentials\"\nclient_secret = \"s3cret\"";

/// `[store]` lines for a file store at `path`.
fn file_store(path: &Path) -> String {
    format!(
        "[store]\nkind = \"file\"\npath = \"{}\"\nkey = \"{STORE_KEY}\"",
        path.display()
    )
}

/// A directory for one test's state file, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "tokenproxy-refresher-{name}-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).expect("create the test directory");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .expect("make the test directory private");
        }
        TempDir(dir)
    }

    fn file(&self) -> PathBuf {
        self.0.join("tokens.json")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _best_effort = std::fs::remove_dir_all(&self.0);
    }
}

/// A refresher of the only client in `config`, on `script`.
struct Harness {
    handle: TokenHandle,
    script: Arc<Script>,
    clock: Arc<PausedWallClock>,
    client: ClientConfig,
    store: Store,
    _task: tokio::task::JoinHandle<()>,
}

impl Harness {
    fn start(config: &Config, script: Arc<Script>) -> Harness {
        Harness::start_with(config, script, |_| {})
    }

    /// As [`Harness::start`], after `prepare` had the refresher before it runs.
    fn start_with(
        config: &Config,
        script: Arc<Script>,
        prepare: impl FnOnce(&mut Refresher),
    ) -> Harness {
        let client = config.clients[0].clone();
        let store = Store::open(&config.store).expect("the test store opens");
        let metrics = crate::metrics::Metrics::new()
            .expect("metrics")
            .client(&client.name);
        let clock = Arc::new(PausedWallClock {
            base: SystemTime::now(),
            start: Instant::now(),
        });
        let source: Arc<dyn TokenSource> = script.clone();
        let (handle, mut refresher) = Refresher::with_source(
            &client,
            source,
            metrics.clone(),
            clock.clone(),
            store.client(&client),
        );
        prepare(&mut refresher);
        let task = crate::token::spawn(&client.name, refresher, handle.clone(), metrics);
        Harness {
            handle,
            script,
            clock,
            client,
            store,
            _task: task,
        }
    }

    /// The current header, as the request path would send it.
    fn header(&self) -> Option<String> {
        self.handle
            .current()
            .map(|t| String::from_utf8_lossy(t.header.as_bytes()).into_owned())
    }

    fn state(&self) -> State {
        self.handle.status().state()
    }

    fn last_trigger(&self) -> Option<&'static str> {
        self.handle.status().last_refresh.map(|r| r.trigger)
    }
}

async fn sleep(secs: f64) {
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
}

/// With no token and nothing planned, the refresher is idle; the first
/// request's Need makes it obtain one (one call), and the waiter gets it.
#[tokio::test(start_paused = true)]
async fn a_need_without_a_token_obtains_one() {
    let script = Script::new([token("a1", 300, None)]);
    // Taken over with nothing: no startup request, no token.
    let h = Harness::start_with(&config(CLIENT_CREDENTIALS, ""), script, |r| {
        r.taken_over = true;
    });
    sleep(3600.0).await;
    assert_eq!(
        h.script.count(),
        0,
        "an idle refresher without a token asks for nothing until a request needs one"
    );
    assert!(h.header().is_none(), "no token yet");

    let token = h
        .handle
        .get()
        .await
        .expect("a request's Need obtains a token");
    assert_eq!(token.generation, 1);
    assert_eq!(h.header().as_deref(), Some("Bearer a1"));
    let calls = h.script.calls();
    assert_eq!(calls.len(), 1, "one token request for one Need: {calls:?}");
    assert_eq!(calls[0].grant, "client_credentials");
    assert_eq!(h.state(), State::Valid);
    assert_eq!(
        h.last_trigger(),
        Some("expired"),
        "a Need is an expired trigger"
    );
}

/// A 401 to the current token's generation refreshes it (trigger
/// unauthorized); a late Rejected for an older generation asks for nothing.
#[tokio::test(start_paused = true)]
async fn a_rejected_current_token_is_refreshed_and_an_old_generation_is_ignored() {
    let script = Script::new([token("a1", 3600, None), token("a2", 3600, None)]);
    let h = Harness::start(&config(CLIENT_CREDENTIALS, ""), script);
    let first = h.handle.get().await.expect("the startup token");
    assert_eq!(first.generation, 1);

    // `invalid_token` from the API: the token is plausibly the cause.
    assert!(matches!(
        h.handle.on_unauthorized(&first, true),
        crate::token::Unauthorized::Refreshing
    ));
    let second = h
        .handle
        .get_newer(first.generation)
        .await
        .expect("a newer token after the 401");
    assert_eq!(second.generation, 2);
    assert_eq!(h.header().as_deref(), Some("Bearer a2"));
    assert_eq!(h.last_trigger(), Some("unauthorized"));
    assert_eq!(h.script.count(), 2, "one refresh for the rejected token");

    // A Rejected for generation 1 arriving now (a slow request) is stale.
    h.handle
        .shared
        .commands
        .send(Command::Rejected(1))
        .await
        .expect("the refresher listens");
    sleep(5.0).await;
    assert_eq!(
        h.script.count(),
        2,
        "a rejection of a token no longer current asks for nothing"
    );
    assert_eq!(h.handle.current().map(|t| t.generation), Some(2));
}

/// A 300 s token is refreshed 30 s (10 %) before it expires, with its
/// refresh token, and the new one is used from then on.
#[tokio::test(start_paused = true)]
async fn the_proactive_refresh_fires_at_the_margin_before_expiry() {
    let script = Script::new([
        token("a1", 300, Some("r1")),
        token("a2", 300, Some("r2")),
        token("a3", 300, None),
    ]);
    let h = Harness::start(&config(CLIENT_CREDENTIALS, ""), script);
    h.handle.get().await.expect("the startup token");
    sleep(269.0).await;
    assert_eq!(h.script.count(), 1, "nothing before the margin");
    sleep(2.0).await;
    assert_eq!(h.script.count(), 2, "the refresh came at the margin");
    sleep(270.0).await;
    let calls = h.script.calls();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert_eq!(calls[1].at - calls[0].at, Duration::from_secs(270));
    assert_eq!(calls[2].at - calls[1].at, Duration::from_secs(270));
    assert_eq!(calls[1].grant, "refresh_token");
    assert_eq!(calls[1].refresh_token.as_deref(), Some("r1"));
    assert_eq!(
        calls[2].refresh_token.as_deref(),
        Some("r2"),
        "the rotated refresh token is the one sent next"
    );
    drop(calls);
    assert_eq!(h.header().as_deref(), Some("Bearer a3"));
    assert_eq!(h.last_trigger(), Some("proactive"));
}

/// Failed requests are retried after growing, jittered delays (1 s, 2 s, 4 s
/// ceilings, each at least half its ceiling); meanwhile the client is
/// unavailable and a request's Need asks for nothing extra.
#[tokio::test(start_paused = true)]
async fn failures_back_off_with_growing_delays() {
    let script = Script::new([
        unreachable(),
        unreachable(),
        unreachable(),
        token("a1", 300, None),
    ]);
    let h = Harness::start(&config(CLIENT_CREDENTIALS, ""), script);
    sleep(0.1).await;
    assert_eq!(h.script.count(), 1);
    assert_eq!(h.state(), State::Unavailable, "no token after a failure");
    let err = h.handle.get().await.expect_err("backing off: no token now");
    assert!(err.retry_after >= Duration::from_secs(1), "{err:?}");
    assert_eq!(
        h.script.count(),
        1,
        "a Need during the backoff asks nothing"
    );

    sleep(10.0).await;
    let calls = h.script.calls();
    assert_eq!(calls.len(), 4, "three failures, then the token: {calls:?}");
    let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1].at - w[0].at).collect();
    let bounds = [(0.5, 1.0), (1.0, 2.0), (2.0, 4.0)];
    for (gap, (low, high)) in gaps.iter().zip(bounds) {
        assert!(
            *gap >= Duration::from_secs_f64(low) && *gap <= Duration::from_secs_f64(high),
            "backoff {gap:?} should lie in [{low} s, {high} s]; all: {gaps:?}"
        );
    }
    drop(calls);
    assert_eq!(h.header().as_deref(), Some("Bearer a1"));
    assert_eq!(h.state(), State::Valid);
    assert_eq!(h.handle.status().refreshes_failed, 3);
}

/// A provider's Retry-After is a floor on the backoff: no request before it,
/// not even for a 401 of the current token.
#[tokio::test(start_paused = true)]
async fn a_retry_after_from_the_provider_is_a_floor() {
    let script = Script::new([
        token("a1", 60, None),
        refused(429, "slow_down", Some(20)),
        token("a2", 3600, None),
    ]);
    let h = Harness::start(&config(CLIENT_CREDENTIALS, ""), script);
    let first = h.handle.get().await.expect("the startup token");
    // The 60 s token is refreshed 6 s ahead; the provider says: in 20 s.
    sleep(54.5).await;
    assert_eq!(h.script.count(), 2, "the proactive refresh was refused");
    assert!(matches!(
        h.handle.on_unauthorized(&first, true),
        crate::token::Unauthorized::Refreshing
    ));
    sleep(19.0).await;
    assert_eq!(
        h.script.count(),
        2,
        "nothing is sent before the provider's Retry-After, not even for a 401"
    );
    sleep(1.0).await;
    let calls = h.script.calls();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert_eq!(
        calls[2].at - calls[1].at,
        Duration::from_secs(20),
        "the retry comes when Retry-After ends, not after the 1 s backoff"
    );
    drop(calls);
    assert_eq!(h.header().as_deref(), Some("Bearer a2"));
}

/// A refresh-token-only client whose refresh token the provider refuses
/// (`invalid_grant`) needs authorization: it drops the token, says what to
/// do, and asks the provider nothing more.
#[tokio::test(start_paused = true)]
async fn invalid_grant_on_a_refresh_token_only_client_needs_authorization() {
    let script = Script::new([refused(400, "invalid_grant", None)]);
    let h = Harness::start(
        &config(
            "grant = \"refresh_token\"\nclient_secret = \"s3cret\"\nrefresh_token = \"r0\"",
            "",
        ),
        script,
    );
    sleep(0.1).await;
    assert_eq!(h.state(), State::NeedsAuthorization);
    let status = h.handle.status();
    assert!(
        !status.has_refresh_token,
        "the refused refresh token is dropped"
    );
    let reason = status.reason.unwrap_or_default();
    assert!(
        reason.contains("refresh token rejected") && reason.contains("tokenproxy token payments"),
        "the reason says what happened and what to do: {reason}"
    );
    let err = h.handle.get().await.expect_err("no token");
    assert!(
        err.reason.contains("a new refresh token is needed"),
        "requests are told at once: {}",
        err.reason
    );
    sleep(3600.0).await;
    let calls = h.script.calls();
    assert_eq!(calls.len(), 1, "nothing is retried: {calls:?}");
    assert_eq!(calls[0].refresh_token.as_deref(), Some("r0"));
}

/// A client with both a refresh token and the full grant.
const REFRESH_AND_FULL_GRANT: &str =
    "grant = \"client_credentials\"\nclient_secret = \"s3cret\"\nrefresh_token = \"r0\"";

/// A gateway's 500 that a rule calls rejected is a refused refresh token:
/// dropped, and the full grant at once, as after a 400 invalid_grant.
#[tokio::test(start_paused = true)]
async fn a_refresh_refused_by_a_rejected_rule_falls_back_to_the_full_grant() {
    let script = Script::new([
        refused_as(500, "INVALID_CREDENTIALS", ErrorMeaning::Rejected),
        token("a1", 300, None),
    ]);
    let h = Harness::start(&config(REFRESH_AND_FULL_GRANT, ""), script);
    sleep(0.1).await;
    let calls = h.script.calls();
    let grants: Vec<&str> = calls.iter().map(|c| c.grant).collect();
    assert_eq!(grants, ["refresh_token", "client_credentials"], "{calls:?}");
    assert_eq!(
        calls[1].at, calls[0].at,
        "the full grant follows at once, without a backoff"
    );
    drop(calls);
    assert_eq!(h.header().as_deref(), Some("Bearer a1"));
    assert!(!h.handle.status().has_refresh_token, "r0 is dropped");
}

/// A rule saying needs_authorization: the refresh token is dead and only a
/// person can issue another, so the full grant is not tried either.
#[tokio::test(start_paused = true)]
async fn a_refresh_refused_by_a_needs_authorization_rule_does_not_try_the_full_grant() {
    let script = Script::new([
        refused_as(500, "CONSENT_REVOKED", ErrorMeaning::NeedsAuthorization),
        token("a1", 300, None),
    ]);
    let h = Harness::start(&config(REFRESH_AND_FULL_GRANT, ""), script);
    sleep(0.1).await;
    assert_eq!(h.state(), State::NeedsAuthorization);
    let reason = h.handle.status().reason.unwrap_or_default();
    assert!(
        reason.contains("refresh token rejected")
            && reason.contains("needs_authorization by token.errors"),
        "the reason names the rule's verdict: {reason}"
    );
    sleep(3600.0).await;
    let calls = h.script.calls();
    assert_eq!(calls.len(), 1, "nothing more is asked: {calls:?}");
    assert_eq!(calls[0].grant, "refresh_token");
}

/// A rule saying transient: a 400 invalid_grant is a failure, so the same
/// refresh token is tried again after a backoff, not dropped.
#[tokio::test(start_paused = true)]
async fn a_refusal_a_rule_calls_transient_backs_off_and_keeps_the_refresh_token() {
    let script = Script::new([
        refused_as(400, "invalid_grant", ErrorMeaning::Transient),
        token("a1", 300, None),
    ]);
    let h = Harness::start(&config(REFRESH_AND_FULL_GRANT, ""), script);
    sleep(0.1).await;
    assert_eq!(h.script.count(), 1);
    assert_eq!(h.state(), State::Unavailable, "backing off");
    assert!(h.handle.status().has_refresh_token, "r0 is kept");
    sleep(2.0).await;
    let calls = h.script.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(
        (calls[1].grant, calls[1].refresh_token.as_deref()),
        ("refresh_token", Some("r0")),
        "the same refresh token is tried again"
    );
    assert!(
        calls[1].at - calls[0].at >= Duration::from_millis(500),
        "after a backoff: {calls:?}"
    );
    let outcome = h.handle.status().last_failure.map(|f| f.outcome);
    assert_eq!(outcome, Some("error"), "counted as an error, not rejected");
}

/// Another process writes a newer record to the file store: at the next
/// refresh it is taken instead of calling the provider, and its refresh
/// token is the one sent when that token is due.
#[tokio::test(start_paused = true)]
async fn a_record_another_process_stored_is_adopted() {
    let dir = TempDir::new("adopt");
    let config = config(CLIENT_CREDENTIALS, &file_store(&dir.file()));
    let script = Script::new([token("a1", 300, Some("r1")), token("a3", 3600, None)]);
    let h = Harness::start(&config, script);
    h.handle.get().await.expect("the startup token");
    assert_eq!(h.handle.status().store.map(|s| s.generation), Some(1));

    // Another process (its own Store on the same file) stores generation 2.
    let other = Store::open(&config.store).expect("the file store opens twice");
    let wall = h.clock.wall_now();
    let record = Record {
        generation: 2,
        state: TokenState {
            access_token: Some(Secret::new("stored-a")),
            access_expires_at: Some(wall + Duration::from_secs(600)),
            lifetime: Some(Duration::from_secs(600)),
            refresh_token: Some(Secret::new("stored-r")),
            refresh_expires_at: None,
            obtained_at: wall,
        },
    };
    let saved = other.client(&h.client).save(&record).await;
    assert!(matches!(saved, Ok(Saved::Written)), "{saved:?}");

    // The proactive refresh of a1 (at 270 s) finds it.
    sleep(275.0).await;
    assert_eq!(
        h.script.count(),
        1,
        "the stored token is adopted instead of calling the provider"
    );
    assert_eq!(h.header().as_deref(), Some("Bearer stored-a"));
    let status = h.handle.status();
    assert_eq!(status.store.map(|s| s.generation), Some(2));
    assert_eq!(status.generation, 2, "the adopted token is published");

    // The stored token (600 s from its writing) is refreshed 60 s ahead.
    sleep(600.0).await;
    let calls = h.script.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(
        calls[1].refresh_token.as_deref(),
        Some("stored-r"),
        "the adopted refresh token is the newest of the chain"
    );
    // Stored expiry times have whole seconds.
    let due = calls[1].at.as_secs_f64();
    assert!(
        (538.0..=540.0).contains(&due),
        "the adopted token is refreshed at its own margin (540 s), not a1's: {due}"
    );
}

/// A token source that panics (a bug) kills the refresher task; its client
/// shows it (unavailable, with the reason, not ready) and an error line is
/// logged, instead of a client that looks healthy with nobody renewing it.
#[tokio::test(start_paused = true)]
async fn a_refresher_that_panics_shows_in_its_clients_state_and_the_log() {
    struct Panics;
    impl TokenSource for Panics {
        fn request<'a>(&'a self, _: &'a TokenConfig, _: GrantKind<'a>) -> TokenFuture<'a> {
            Box::pin(async { panic!("deadline arithmetic overflowed") })
        }
    }
    let (logs, _guard) = crate::token::tests::capture_logs();
    let config = config(CLIENT_CREDENTIALS, "");
    let client = config.clients[0].clone();
    let metrics = crate::metrics::Metrics::new()
        .expect("metrics")
        .client(&client.name);
    let store = Store::open(&config.store).expect("the memory store opens");
    let (handle, refresher) = Refresher::with_source(
        &client,
        Arc::new(Panics),
        metrics.clone(),
        Arc::new(crate::clock::SystemClock),
        store.client(&client),
    );
    let supervisor = crate::token::spawn(&client.name, refresher, handle.clone(), metrics);
    tokio::time::timeout(Duration::from_secs(5), supervisor)
        .await
        .expect("the supervisor sees the refresher die")
        .expect("the supervisor itself does not fail");

    let status = handle.status();
    assert_eq!(status.state(), State::Unavailable, "{}", status.describe());
    assert!(
        status.describe().contains("refresher stopped unexpectedly")
            && status.describe().contains("deadline arithmetic overflowed"),
        "/status says why: {}",
        status.describe()
    );
    assert!(
        !handle.is_ready(),
        "a client without a refresher is not ready"
    );
    let text = String::from_utf8_lossy(&logs.lock().expect("logs")).into_owned();
    assert!(
        text.contains("ERROR") && text.contains("token refresher stopped unexpectedly"),
        "the death is logged at error level: {text}"
    );
}

/// A store write that fails leaves the token serving from memory; the state
/// is written back once the store takes it, without a new token request.
#[tokio::test(start_paused = true)]
async fn a_failed_store_write_is_written_back_later() {
    let dir = TempDir::new("write-back");
    let path = dir.file();
    // A directory where the lock file goes: every write fails, reads work.
    let mut lock = path.as_os_str().to_owned();
    lock.push(".lock");
    let lock = PathBuf::from(lock);
    std::fs::create_dir(&lock).expect("block the lock file");
    let config = config(CLIENT_CREDENTIALS, &file_store(&path));
    let script = Script::new([token("a1", 3600, Some("r1"))]);
    let h = Harness::start(&config, script);

    h.handle
        .get()
        .await
        .expect("the token serves although the store did not take it");
    let store = h
        .handle
        .status()
        .store
        .expect("a file store shows in /status");
    assert!(store.write_pending, "{store:?}");
    assert!(!store.available, "{store:?}");

    std::fs::remove_dir(&lock).expect("unblock the lock file");
    sleep(1.5).await;
    let store = h
        .handle
        .status()
        .store
        .expect("a file store shows in /status");
    assert!(
        !store.write_pending,
        "written back within a second: {store:?}"
    );
    assert!(store.available, "{store:?}");
    assert_eq!(store.generation, 1);
    assert_eq!(
        h.script.count(),
        1,
        "the write back asks the provider nothing"
    );

    let loaded = h
        .store
        .client(&h.client)
        .load()
        .await
        .expect("the store reads");
    let record = loaded.record.expect("the record was written back");
    assert_eq!(record.generation, 1);
    assert_eq!(
        record.state.access_token.as_ref().map(|t| t.expose()),
        Some("a1")
    );
    assert_eq!(
        record.state.refresh_token.as_ref().map(|t| t.expose()),
        Some("r1")
    );
}
