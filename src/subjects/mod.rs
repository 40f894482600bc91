//! Subjects: one token pair per merchant, customer or user of a client, chosen
//! per request by a header the app sets.
//!
//! The request path reads a subject's token from a bounded in-memory cache (a
//! sharded map, no lock shared by all requests). A miss reads the store; a
//! missing or expiring token is refreshed in single flight per subject: one
//! task per subject in this process, and across replicas the subject's lease in
//! the store. The rotated refresh token is written to the store before its
//! access token is used; a refused refresh re-reads the store and adopts a
//! sibling's newer tokens before it declares the subject in need of
//! authorization. Subjects used within `active_window` are refreshed ahead of
//! expiry in the background; idle ones are renewed by the sweeper
//! (`maintain.rs`). Every token request of the client's subjects passes through
//! one budget (`budget.rs`).
//!
//! A token is cached under its subject's id and handed out only for that id:
//! a request for subject A never carries subject B's token, whatever races,
//! evictions or reloads happen. With `[dpop]`, each subject's tokens are bound
//! to a key of its own, which the cached token carries (`key.rs`).

mod budget;
mod key;
mod maintain;
mod refresh;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use http::{HeaderMap, HeaderName, HeaderValue};
use prometheus::IntCounter;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::clock::SharedClock;
use crate::config::{ClientConfig, InjectConfig, SubjectsConfig, TokenConfig};
use crate::metrics::{ClientMetrics, Trigger};
use crate::secret::Secret;
use crate::store::{SubjectRecord, SubjectStore};
use crate::token::{Token, TokenEndpoint, Unauthorized, UNAUTHORIZED_MIN_AGE};

pub use key::KeyPair;
pub use maintain::maintain;

/// The longest subject id.
pub const MAX_SUBJECT_LEN: usize = 128;

/// Whether `id` is a subject id: 1–128 characters of `A-Za-z0-9._:@-`.
pub fn is_valid_subject(id: &str) -> bool {
    (1..=MAX_SUBJECT_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'))
}

/// Why a subject's request gets no token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// The store has no such subject.
    #[error("subject {0:?} is not connected")]
    Unknown(String),
    /// The subject's refresh token died: a person must connect again.
    #[error("subject {subject:?} needs authorization: {reason}")]
    NeedsAuthorization {
        /// The subject.
        subject: String,
        /// Why (provider error code and text, never a secret).
        reason: String,
    },
    /// A transient failure.
    #[error("{reason}")]
    Unavailable {
        /// Why, without secrets.
        reason: String,
        /// When it is worth trying again.
        retry_after: Duration,
    },
}

impl SubjectError {
    fn unavailable(reason: impl Into<String>, retry_after: Duration) -> SubjectError {
        SubjectError::Unavailable {
            reason: reason.into(),
            retry_after,
        }
    }
}

/// One subject's cached token.
struct Cached {
    token: Arc<Token>,
    /// When to renew it in the background (if the subject is active).
    refresh_at: Option<Instant>,
    /// The store generation the token came from.
    store_generation: u64,
    /// When a request last used it, in ms since [`Inner::epoch`].
    last_used: AtomicU64,
    /// A 401 already asked to replace it.
    rejected: AtomicBool,
    /// A replay with a fresh token also got a 401: 401s are not about the token.
    refused_again: AtomicBool,
}

type FlightResult = Option<Result<Arc<Token>, SubjectError>>;

pub(crate) struct Inner {
    client: String,
    config: SubjectsConfig,
    token: Arc<TokenConfig>,
    inject: InjectConfig,
    /// `[dpop]`: the alg of the keys made for subjects.
    dpop: Option<crate::jose::Alg>,
    wait_timeout: Duration,
    store: SubjectStore,
    endpoint: TokenEndpoint,
    metrics: ClientMetrics,
    clock: SharedClock,
    epoch: Instant,
    cache: DashMap<String, Arc<Cached>>,
    flights: DashMap<String, watch::Receiver<FlightResult>>,
    /// Subjects whose last token request failed transiently: when to try again, and why.
    backoff: DashMap<String, (Instant, u32, SubjectError)>,
    /// Records the store has not taken yet (it was down): written again by
    /// the maintenance task, and preferred over the store's older record.
    pending: DashMap<String, SubjectRecord>,
    budget: budget::Budget,
    /// Subjects whose last sweep failed, left out of sweeps until then.
    sweep_skip: DashMap<String, Instant>,
    /// The subject counts by state last published (`tokenproxy_subjects`), for `/status`.
    counts: std::sync::Mutex<Vec<(&'static str, u64)>>,
    generation: AtomicU64,
    hits: IntCounter,
    from_store: IntCounter,
    misses: IntCounter,
}

/// One client's subjects, as the request path and the admin API see them.
#[derive(Clone)]
pub struct Subjects {
    inner: Arc<Inner>,
}

impl Subjects {
    /// The subjects of `client` (which has a `[subjects]` table).
    pub fn new(
        client: &ClientConfig,
        config: SubjectsConfig,
        store: SubjectStore,
        endpoint: TokenEndpoint,
        metrics: ClientMetrics,
        clock: SharedClock,
    ) -> Subjects {
        let budget = budget::Budget::new(
            config.max_concurrent_token_requests,
            config.max_token_requests_per_minute,
            metrics.budget_waiting(),
        );
        Subjects {
            inner: Arc::new(Inner {
                client: client.name.clone(),
                token: Arc::new(client.token.clone()),
                inject: client.inject.clone(),
                dpop: client.dpop.as_ref().map(|d| d.alg),
                wait_timeout: client.token_wait_timeout,
                store,
                endpoint,
                hits: metrics.subject_cache_counter("hit"),
                from_store: metrics.subject_cache_counter("store"),
                misses: metrics.subject_cache_counter("miss"),
                metrics,
                clock,
                epoch: Instant::now(),
                cache: DashMap::new(),
                flights: DashMap::new(),
                backoff: DashMap::new(),
                pending: DashMap::new(),
                budget,
                sweep_skip: DashMap::new(),
                counts: std::sync::Mutex::new(Vec::new()),
                generation: AtomicU64::new(0),
                config,
            }),
        }
    }

    /// The request header naming the subject.
    pub fn header(&self) -> &HeaderName {
        &self.inner.config.header
    }

    /// Whether requests without the header use the client's own token.
    pub fn falls_back_to_client(&self) -> bool {
        self.inner.config.fallback == crate::config::SubjectFallback::Client
    }

    /// Waits for a place in the client's token-endpoint budget (a token
    /// request made outside the subjects' own refreshes, such as a connect
    /// session's code exchange); the place is given back when dropped.
    pub(crate) async fn token_request_slot(&self) -> Option<budget::Spend<'_>> {
        self.inner.budget.spend().await
    }

    /// The store view of these subjects.
    pub fn store(&self) -> &SubjectStore {
        &self.inner.store
    }

    /// Takes the subject header (and any `_` spelling of it) out of `headers`:
    /// `Ok(None)` without one, `Err` with the reason when it is not one valid id.
    pub fn take_subject(&self, headers: &mut HeaderMap) -> Result<Option<String>, String> {
        let name = &self.inner.config.header;
        let mut values = headers.get_all(name).iter();
        let first = values.next().cloned();
        let more = values.next().is_some();
        headers.remove(name);
        // An alias with `_` for `-` could reach an upstream that reads it as the header.
        if headers.keys().any(|k| k.as_str().contains('_')) {
            let dashed = |k: &HeaderName| k.as_str().replace('_', "-") == name.as_str();
            let aliases: Vec<HeaderName> = headers.keys().filter(|k| dashed(k)).cloned().collect();
            for alias in aliases {
                headers.remove(alias);
            }
        }
        let Some(value) = first else { return Ok(None) };
        if more {
            return Err(format!("the {name} header is sent more than once"));
        }
        match value.to_str() {
            Ok(id) if is_valid_subject(id) => Ok(Some(id.to_owned())),
            _ => Err(format!(
                "the {name} header must be 1 to {MAX_SUBJECT_LEN} characters of A-Za-z0-9._:@-"
            )),
        }
    }

    /// A usable token of `subject`, waiting at most the client's `token_wait_timeout`.
    pub async fn token(&self, subject: &str) -> Result<Arc<Token>, SubjectError> {
        let inner = &self.inner;
        let now = Instant::now();
        if let Some(cached) = inner.cached(subject) {
            if cached.token.is_usable(now) {
                cached.last_used.store(inner.now_ms(now), Ordering::Relaxed);
                inner.hits.inc();
                if cached.refresh_at.is_some_and(|at| at <= now)
                    && !inner.flights.contains_key(subject)
                    && !inner.backing_off(subject, now)
                {
                    // Renewed in the background; this request goes on with the current one.
                    drop(Inner::flight(inner, subject, Trigger::Proactive, None));
                }
                return Ok(Arc::clone(&cached.token));
            }
        }
        let flight = Inner::flight(inner, subject, Trigger::Expired, None);
        inner.wait(subject, flight, 0).await
    }

    /// What to do after the API answered 401 to `token` of `subject`.
    pub fn on_unauthorized(
        &self,
        subject: &str,
        token: &Arc<Token>,
        invalid_token: bool,
    ) -> Unauthorized {
        let inner = &self.inner;
        let now = Instant::now();
        let Some(cached) = inner.cached(subject) else {
            // Evicted meanwhile: start from the store, never from the refused token.
            drop(Inner::flight(
                inner,
                subject,
                Trigger::Unauthorized,
                Some(0),
            ));
            return Unauthorized::Refreshing;
        };
        if cached.token.generation != token.generation {
            if cached.token.is_usable(now) && cached.token.generation > token.generation {
                return Unauthorized::Newer(Arc::clone(&cached.token));
            }
            return Unauthorized::Kept("the refused token is no longer the subject's token");
        }
        if !invalid_token {
            if cached.refused_again.load(Ordering::Relaxed) {
                return Unauthorized::Kept("a fresh token of this subject was refused too");
            }
            let age = now.saturating_duration_since(token.installed_at);
            let half_life = token
                .usable_until
                .map(|u| u.saturating_duration_since(token.installed_at) / 2);
            if age < UNAUTHORIZED_MIN_AGE && half_life.is_none_or(|h| age < h) {
                return Unauthorized::Kept("the token is young: the 401 is about the request");
            }
        }
        if cached.rejected.swap(true, Ordering::AcqRel) {
            // Another request already asked; wait for its token.
            return Unauthorized::Refreshing;
        }
        drop(Inner::flight(
            inner,
            subject,
            Trigger::Unauthorized,
            Some(cached.store_generation),
        ));
        Unauthorized::Refreshing
    }

    /// A token of `subject` newer than `generation` (after a 401).
    pub async fn get_newer(
        &self,
        subject: &str,
        generation: u64,
    ) -> Result<Arc<Token>, SubjectError> {
        let inner = &self.inner;
        if let Some(cached) = inner.cached(subject) {
            if cached.token.generation > generation && cached.token.is_usable(Instant::now()) {
                return Ok(Arc::clone(&cached.token));
            }
        }
        let flight = match inner.flights.get(subject) {
            Some(f) => f.clone(),
            None => Inner::flight(inner, subject, Trigger::Unauthorized, Some(0)),
        };
        inner.wait(subject, flight, generation).await
    }

    /// A replay with `generation` got a 401 too: later 401s of this token are
    /// not about the token (unless the API says `invalid_token`).
    pub fn refused_again(&self, subject: &str, generation: u64) {
        if let Some(cached) = self.inner.cached(subject) {
            if cached.token.generation == generation {
                cached.refused_again.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Deletes `subject`'s record, fenced against refreshes under way on any
    /// replica, and forgets what memory holds of it. Returns whether there
    /// was a record, and the refresh token it held (to revoke).
    pub async fn delete(&self, subject: &str) -> Result<(bool, Option<Secret>), String> {
        let deleted = self.inner.delete(subject).await?;
        self.forget(subject).await;
        Ok(deleted)
    }

    /// Forgets what memory holds of `subject` (after an admin import or
    /// delete), once a token request under way for it has ended: a token it
    /// installs is dropped too.
    pub async fn forget(&self, subject: &str) {
        let inner = &self.inner;
        inner.cache.remove(subject);
        inner.backoff.remove(subject);
        inner.pending.remove(subject);
        let flight = inner.flights.get(subject).map(|f| f.clone());
        if let Some(mut flight) = flight {
            let bound = inner.token.timeout + Duration::from_secs(5);
            let _ended = tokio::time::timeout(bound, flight.wait_for(Option::is_some)).await;
            inner.cache.remove(subject);
            inner.pending.remove(subject);
        }
    }

    /// Whether `subject` has a token in memory.
    pub fn is_cached(&self, subject: &str) -> bool {
        self.inner.cache.contains_key(subject)
    }

    /// Revokes a deleted subject's refresh token at `url` (RFC 7009).
    pub async fn revoke(&self, url: &http::Uri, token: &Secret) -> Result<(), String> {
        self.inner
            .endpoint
            .revoke(&self.inner.token, url, token)
            .await
    }

    /// What `/status` shows of the subjects: counts only, never an id or a token.
    pub fn status(&self) -> serde_json::Value {
        let inner = &self.inner;
        let now = Instant::now();
        let valid = inner
            .cache
            .iter()
            .filter(|e| e.value().token.is_usable(now))
            .count();
        let by_state: serde_json::Map<String, serde_json::Value> = inner
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(state, n)| ((*state).to_owned(), serde_json::json!(n)))
            .collect();
        serde_json::json!({
            "header": inner.config.header.as_str(),
            "by_state": by_state,
            "cached": inner.cache.len(),
            "valid_in_memory": valid,
            "refreshing": inner.flights.len(),
            "backing_off": inner.backoff.len(),
            "unstored": inner.pending.len(),
        })
    }

    /// How many subjects have a token in memory.
    pub fn cached(&self) -> usize {
        self.inner.cache.len()
    }

    /// The client's token settings (for connect and import).
    pub fn token_config(&self) -> &TokenConfig {
        &self.inner.token
    }

    /// The token endpoint (for connect).
    pub fn endpoint(&self) -> &TokenEndpoint {
        &self.inner.endpoint
    }

    /// The client's metrics.
    pub fn metrics(&self) -> &ClientMetrics {
        &self.inner.metrics
    }

    /// The wall clock.
    pub fn wall_now(&self) -> SystemTime {
        self.inner.clock.wall_now()
    }

    /// The settings.
    pub fn config(&self) -> &SubjectsConfig {
        &self.inner.config
    }

    /// Builds the record to store for tokens a person or an operator brought
    /// (connect, import), one generation above `previous`, with the DPoP key
    /// they are bound to ([`Subjects::key_for_new_tokens`]).
    pub fn new_record(
        &self,
        previous: u64,
        access: Option<(Secret, Option<Duration>)>,
        refresh_token: Option<Secret>,
        refresh_lifetime: Option<Duration>,
        connected_at: Option<SystemTime>,
        dpop_key: Option<crate::store::SubjectKey>,
    ) -> SubjectRecord {
        let mut record = self.inner.record_for(
            previous,
            access,
            refresh_token,
            refresh_lifetime,
            connected_at,
        );
        record.dpop_key = dpop_key;
        record
    }
}

impl Inner {
    fn now_ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Whether the subject's last token request failed and its backoff runs.
    fn backing_off(&self, subject: &str, now: Instant) -> bool {
        self.backoff.get(subject).is_some_and(|b| b.0 > now)
    }

    fn cached(&self, subject: &str) -> Option<Arc<Cached>> {
        self.cache.get(subject).map(|c| Arc::clone(c.value()))
    }

    /// Waits for `flight` to end with a token newer than `newer_than`.
    async fn wait(
        &self,
        subject: &str,
        mut flight: watch::Receiver<FlightResult>,
        newer_than: u64,
    ) -> Result<Arc<Token>, SubjectError> {
        let outcome =
            tokio::time::timeout(self.wait_timeout, flight.wait_for(Option::is_some)).await;
        match outcome {
            Ok(Ok(result)) => match result.as_ref() {
                Some(Ok(token)) if token.generation > newer_than => Ok(Arc::clone(token)),
                Some(Ok(_)) => Err(SubjectError::unavailable(
                    "no newer token of this subject could be had",
                    Duration::from_secs(1),
                )),
                Some(Err(e)) => Err(e.clone()),
                None => Err(SubjectError::unavailable(
                    "token request ended",
                    Duration::from_secs(1),
                )),
            },
            Ok(Err(_closed)) => Err(SubjectError::unavailable(
                "the token request of this subject ended without an answer",
                Duration::from_secs(1),
            )),
            Err(_elapsed) => Err(SubjectError::unavailable(
                format!(
                    "no token for subject {subject:?} within {}",
                    humantime::format_duration(self.wait_timeout)
                ),
                Duration::from_secs(1),
            )),
        }
    }

    /// Makes `record`'s access token the subject's cached token, if it is
    /// usable (with `[dpop]`: if the record holds the key it is bound to).
    fn install(&self, subject: &str, record: &SubjectRecord) -> Option<Arc<Token>> {
        let access = record.tokens.access_token.as_ref()?;
        let (dpop_ath, dpop_key) = self.token_key(subject, record, access.expose())?.unzip();
        let now = Instant::now();
        let wall_now = self.clock.wall_now();
        let remaining = match record.tokens.access_expires_at {
            Some(at) => Some(at.duration_since(wall_now).ok().filter(|r| !r.is_zero())?),
            None => None,
        };
        let mut header = HeaderValue::from_str(&format!(
            "{}{}{}",
            self.inject.prefix,
            access.expose(),
            self.inject.suffix
        ))
        .ok()?;
        header.set_sensitive(true);
        let age = wall_now
            .duration_since(record.tokens.obtained_at)
            .unwrap_or_default();
        let installed_at = now.checked_sub(age).unwrap_or(now);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let token = Arc::new(Token {
            generation,
            header,
            dpop_ath,
            dpop_key,
            usable_until: remaining.and_then(|r| now.checked_add(r)),
            installed_at,
        });
        let refresh_at = remaining.and_then(|r| {
            let lifetime = record.tokens.lifetime.unwrap_or(r);
            let margin = crate::token::refresh_margin(lifetime, self.token.refresh_before);
            now.checked_add(r.saturating_sub(margin))
        });
        let cached = Arc::new(Cached {
            token: Arc::clone(&token),
            refresh_at,
            store_generation: record.generation,
            last_used: AtomicU64::new(self.now_ms(now)),
            rejected: AtomicBool::new(false),
            refused_again: AtomicBool::new(false),
        });
        self.cache.insert(subject.to_owned(), cached);
        self.evict_over_capacity();
        Some(token)
    }

    /// Keeps the cache at `max_cached`: the least recently used of a sample go.
    fn evict_over_capacity(&self) {
        let max = self.config.max_cached;
        let len = self.cache.len();
        if len <= max {
            return;
        }
        // A little more than the excess, so that the next inserts do not each evict.
        let excess = len - max + (max / 100).min(64);
        let sample = (excess * 4).max(64);
        let mut candidates: Vec<(u64, String)> = self
            .cache
            .iter()
            .take(sample)
            .map(|e| (e.value().last_used.load(Ordering::Relaxed), e.key().clone()))
            .collect();
        candidates.sort_unstable();
        for (_, subject) in candidates.into_iter().take(excess) {
            self.cache.remove(&subject);
        }
    }
}

#[cfg(test)]
mod tests;
