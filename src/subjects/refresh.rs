//! One subject's token request, in single flight: per process through the
//! flight map, across replicas through the subject's lease in the store.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::{FlightResult, Inner, SubjectError};
use crate::metrics::{Outcome, Trigger};
use crate::secret::Secret;
use crate::store::{
    to_ms, Saved, SubjectLoad, SubjectMeta, SubjectRecord, SubjectStatus, TokenState,
};
use crate::token::lifetime::{access_lifetime, stated_refresh_token_lifetime};
use crate::token::{GrantKind, Token, TokenError};

/// How often a replica waiting for another one's refresh looks at the store.
const FOLLOW_POLL: Duration = Duration::from_millis(100);
/// A store that cannot be read: ask again after this long.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// Removes the flight when the task ends, however it ends.
struct FlightGuard {
    inner: Arc<Inner>,
    subject: String,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.inner.flights.remove(&self.subject);
    }
}

impl Inner {
    /// The subject's flight: joins the one under way, or starts one for
    /// `trigger`. `rejected`: the store generation of a token the API refused
    /// (it is not taken from the store again).
    pub(super) fn flight(
        this: &Arc<Inner>,
        subject: &str,
        trigger: Trigger,
        rejected: Option<u64>,
    ) -> watch::Receiver<FlightResult> {
        use dashmap::mapref::entry::Entry;
        match this.flights.entry(subject.to_owned()) {
            Entry::Occupied(e) => e.get().clone(),
            Entry::Vacant(v) => {
                let (tx, rx) = watch::channel(None);
                v.insert(rx.clone());
                let inner = Arc::clone(this);
                let subject = subject.to_owned();
                // Its own task: a request that goes away must not cancel a token
                // request whose rotated refresh token is still to be stored.
                tokio::spawn(async move {
                    let guard = FlightGuard {
                        inner: Arc::clone(&inner),
                        subject: subject.clone(),
                    };
                    let result = inner.resolve(&subject, trigger, rejected).await;
                    drop(guard);
                    let _nobody_waits = tx.send(Some(result));
                });
                rx
            }
        }
    }

    /// The newest record of `subject`: one the store has not taken yet, else the store's.
    async fn read(&self, subject: &str) -> Result<Option<SubjectRecord>, SubjectError> {
        if let Some(pending) = self.pending.get(subject) {
            return Ok(Some(pending.clone()));
        }
        match self.store.get(subject).await {
            Ok(SubjectLoad::Found(record)) => Ok(Some(*record)),
            Ok(SubjectLoad::Missing) => Ok(None),
            Ok(SubjectLoad::NotOpened { problem, .. }) => {
                warn!(client = %self.client, subject, problem = %problem,
                    "the subject's stored record does not open; it is kept, and nothing is spent over it");
                Err(SubjectError::unavailable(
                    format!("the stored record of subject {subject:?} does not open: {problem}"),
                    Duration::from_secs(30),
                ))
            }
            Err(e) => Err(SubjectError::unavailable(
                format!("the {} store cannot be read: {e}", self.store.kind()),
                STORE_RETRY,
            )),
        }
    }

    /// Gets a usable token of `subject`: from the store when a usable one is
    /// there (written by an earlier run or another replica), else from the
    /// token endpoint with the subject's refresh token.
    async fn resolve(
        self: &Arc<Self>,
        subject: &str,
        trigger: Trigger,
        rejected: Option<u64>,
    ) -> Result<Arc<Token>, SubjectError> {
        let now = Instant::now();
        if let Some(entry) = self.backoff.get(subject) {
            let (until, _, error) = entry.value();
            if *until > now && trigger != Trigger::Sweep {
                return Err(error.clone());
            }
        }
        // A rejected refresh re-reads the store once for a sibling's newer tokens.
        let mut adopted_once = false;
        loop {
            let record = self
                .read(subject)
                .await?
                .ok_or_else(|| SubjectError::Unknown(subject.to_owned()))?;
            if let Some(token) = self.take_stored(subject, &record, trigger, rejected) {
                return Ok(token);
            }
            if record.meta.status == SubjectStatus::NeedsAuthorization {
                self.cache.remove(subject);
                return Err(self.needs_authorization(subject, &record));
            }
            if trigger == Trigger::Expired {
                self.misses.inc();
            }
            let Some(_spend) = self.budget.spend().await else {
                return Err(SubjectError::unavailable("shutting down", STORE_RETRY));
            };
            let lease_ttl = self.token.timeout + Duration::from_secs(5);
            let lease = match self.store.try_lease(subject, lease_ttl).await {
                Ok(Some(lease)) => lease,
                Ok(None) => return self.follow(subject, record.generation, lease_ttl).await,
                Err(e) => {
                    return Err(SubjectError::unavailable(
                        format!("the {} store cannot be reached: {e}", self.store.kind()),
                        STORE_RETRY,
                    ))
                }
            };
            // Another replica may have refreshed between our read and the
            // lease, or the subject may have been deleted and stored again (a
            // new record starts again at generation 1: the generation alone
            // does not tell it from the one read).
            let current = self.read(subject).await;
            let outcome = match current {
                Ok(Some(current)) if !same_record(&current, &record) => None,
                Ok(Some(_)) => Some(self.refresh(subject, &record, trigger).await),
                Ok(None) => Some(Err(Rejected::Error(SubjectError::Unknown(
                    subject.to_owned(),
                )))),
                Err(e) => Some(Err(Rejected::Error(e))),
            };
            if let Err(e) = self.store.release(subject, lease).await {
                debug!(client = %self.client, subject, error = %e, "releasing the subject's lease failed; it expires on its own");
            }
            match outcome {
                None => continue,
                Some(Err(Rejected::Sibling)) if !adopted_once => {
                    adopted_once = true;
                    continue;
                }
                Some(Err(Rejected::Sibling)) => {
                    return Err(SubjectError::unavailable(
                        "the subject's tokens changed twice during one refresh",
                        STORE_RETRY,
                    ))
                }
                Some(Err(Rejected::Error(e))) => return Err(e),
                Some(Ok(token)) => return Ok(token),
            }
        }
    }

    /// The stored access token when this trigger may take it instead of asking
    /// the provider.
    fn take_stored(
        &self,
        subject: &str,
        record: &SubjectRecord,
        trigger: Trigger,
        rejected: Option<u64>,
    ) -> Option<Arc<Token>> {
        if record.meta.status != SubjectStatus::Valid {
            return None;
        }
        let wall_now = self.clock.wall_now();
        let remaining = record
            .tokens
            .access_expires_at
            .map(|at| at.duration_since(wall_now).unwrap_or_default());
        let lifetime = record.tokens.lifetime.or(remaining);
        let fresh = match (remaining, lifetime) {
            (Some(r), Some(l)) => r > crate::token::refresh_margin(l, self.token.refresh_before),
            _ => true,
        };
        let take = match trigger {
            Trigger::Expired | Trigger::Startup => {
                remaining.is_none_or(|r| r >= Duration::from_secs(1))
            }
            Trigger::Proactive => fresh,
            Trigger::Unauthorized => rejected.is_some_and(|g| record.generation > g),
            Trigger::Sweep => fresh && record.meta.due_at_ms.is_none_or(|d| d > to_ms(wall_now)),
        };
        if !take {
            return None;
        }
        let token = self.install(subject, record)?;
        if trigger == Trigger::Expired {
            self.from_store.inc();
        }
        debug!(client = %self.client, subject, generation = record.generation, "subject token taken from the store");
        Some(token)
    }

    /// Another replica holds the subject's lease: wait for the tokens it stores.
    async fn follow(
        &self,
        subject: &str,
        generation: u64,
        lease_ttl: Duration,
    ) -> Result<Arc<Token>, SubjectError> {
        let deadline = Instant::now() + lease_ttl;
        while Instant::now() < deadline {
            tokio::time::sleep(FOLLOW_POLL).await;
            if let Ok(Some(record)) = self.read(subject).await {
                if record.generation > generation {
                    if record.meta.status == SubjectStatus::NeedsAuthorization {
                        return Err(self.needs_authorization(subject, &record));
                    }
                    if let Some(token) = self.install(subject, &record) {
                        return Ok(token);
                    }
                }
            }
        }
        Err(SubjectError::unavailable(
            format!("another replica is refreshing subject {subject:?}"),
            Duration::from_secs(1),
        ))
    }

    /// One refresh-grant request with the record's refresh token, then the
    /// new record stored before its access token is used.
    async fn refresh(
        &self,
        subject: &str,
        record: &SubjectRecord,
        trigger: Trigger,
    ) -> Result<Arc<Token>, Rejected> {
        let Some(refresh_token) = record.tokens.refresh_token.clone() else {
            let reason = "no refresh token is stored for the subject".to_owned();
            self.mark_needs_authorization(subject, record, reason.clone())
                .await;
            return Err(Rejected::Error(SubjectError::NeedsAuthorization {
                subject: subject.to_owned(),
                reason,
            }));
        };
        let key = self.refresh_key(subject, record).map_err(Rejected::Error)?;
        let started = Instant::now();
        let result = self
            .endpoint
            .call_signed(
                &self.token,
                GrantKind::Refresh(&refresh_token),
                key.as_ref().map(|(_, k)| &**k),
            )
            .await;
        let elapsed = started.elapsed().as_secs_f64();
        let set = match result {
            Ok(set) => set,
            Err(e) => {
                self.metrics
                    .token_request(trigger, "refresh_token", e.outcome(), elapsed);
                return Err(self.refresh_failed(subject, record, e).await);
            }
        };
        // A token that cannot be sent (bound to no key, or too short-lived)
        // counts as a failure and backs off, but the refresh token it came
        // with is stored: the provider may have rotated the one just spent.
        let lifetime = access_lifetime(&set, &self.token, &self.client);
        let unusable = self.unusable(subject, &set, lifetime.as_ref().err());
        let outcome = if unusable.is_some() {
            Outcome::Error
        } else {
            Outcome::Success
        };
        self.metrics
            .token_request(trigger, "refresh_token", outcome, elapsed);
        if unusable.is_none() {
            self.backoff.remove(subject);
        }
        let rotated = set.refresh_token.is_some();
        let stated_rt_lifetime = stated_refresh_token_lifetime(&set, &self.client);
        let rt_lifetime = if rotated {
            stated_rt_lifetime.or(self.token.refresh_token_lifetime)
        } else {
            stated_rt_lifetime
        };
        let mut new = self.record_for(
            record.generation,
            Some((set.access_token, lifetime.ok().flatten())),
            set.refresh_token.or(Some(refresh_token)),
            rt_lifetime,
            Some(crate::store::from_ms(record.meta.connected_at_ms)),
        );
        new.dpop_key = key.map(|(stored, _)| stored);
        if unusable.is_some() {
            new.tokens.access_token = None;
            new.tokens.access_expires_at = None;
            new.meta.access_expires_at_ms = None;
            new.meta.last_outcome = Some("error".to_owned());
        }
        if !rotated && stated_rt_lifetime.is_none() {
            // The refresh token was not renewed: its expiry stays what it was.
            new.tokens.refresh_expires_at = record.tokens.refresh_expires_at;
            new.meta.refresh_expires_at_ms = record.meta.refresh_expires_at_ms;
        }
        match self.store.update(subject, &new).await {
            Ok(Saved::Written) => {
                self.pending.remove(subject);
            }
            Ok(Saved::Stale { generation: 0 }) => {
                // Deleted while its token was requested: it stays deleted.
                info!(client = %self.client, subject, "the subject was deleted while its token was requested; the new tokens are dropped");
                self.pending.remove(subject);
                self.cache.remove(subject);
                return Err(Rejected::Error(SubjectError::Unknown(subject.to_owned())));
            }
            Ok(Saved::Stale { generation }) => {
                // Only a replica that lost its lease gets here: the store holds
                // another record (a sibling's tokens, or an import or connect
                // made meanwhile, perhaps of another account). Its tokens are
                // the subject's; the ones just obtained are never served.
                error!(client = %self.client, subject, stored_generation = generation,
                    "the subject's record changed while it was refreshed under a lease; keeping the store's");
                self.pending.remove(subject);
                return Err(Rejected::Sibling);
            }
            Err(e) => {
                warn!(client = %self.client, subject, error = %e,
                    "the subject's new tokens could not be stored; they are kept in memory and written again");
                self.pending.insert(subject.to_owned(), new.clone());
            }
        }
        if let Some(e) = unusable {
            return Err(self.refresh_failed(subject, &new, e).await);
        }
        info!(client = %self.client, subject, trigger = trigger.as_str(), generation = new.generation,
            rotated, "subject token obtained");
        self.install(subject, &new).ok_or_else(|| {
            Rejected::Error(SubjectError::unavailable(
                "the provider's access token is already expired or not a header value",
                Duration::from_secs(1),
            ))
        })
    }

    /// Why a subject's new access token cannot be sent, if it cannot: a
    /// Bearer token answering a DPoP-signed request is bound to no key, and
    /// `too_short` says why its lifetime is refused.
    fn unusable(
        &self,
        subject: &str,
        set: &crate::token::response::TokenSet,
        too_short: Option<&String>,
    ) -> Option<TokenError> {
        let url = || {
            crate::secret::display_url(self.token.refresh_url.as_ref().unwrap_or(&self.token.url))
        };
        if self.dpop.is_some() && !set.is_dpop() {
            return Some(TokenError::Unusable {
                url: url(),
                reason: format!(
                    "token_type is not DPoP: the provider did not bind subject {subject:?}'s token to its DPoP key; remove [clients.{}.dpop] if it does not support DPoP for this client",
                    self.client
                ),
            });
        }
        too_short.map(|reason| TokenError::Unusable {
            url: url(),
            reason: reason.clone(),
        })
    }

    /// After a failed refresh: a refusal re-reads the store (a sibling may
    /// have rotated the refresh token) before the subject needs authorization;
    /// anything else backs off.
    async fn refresh_failed(
        &self,
        subject: &str,
        record: &SubjectRecord,
        e: TokenError,
    ) -> Rejected {
        if e.is_rejection() {
            if let Ok(Some(current)) = self.read(subject).await {
                if current.generation > record.generation {
                    info!(client = %self.client, subject, "refresh refused, but the store holds newer tokens of the subject; adopting them");
                    return Rejected::Sibling;
                }
            }
            let reason = format!("refresh token rejected: {}", e.app_message());
            warn!(client = %self.client, subject, error = %e, "the subject's refresh token was rejected; it needs authorization");
            self.mark_needs_authorization(subject, record, reason.clone())
                .await;
            self.cache.remove(subject);
            return Rejected::Error(SubjectError::NeedsAuthorization {
                subject: subject.to_owned(),
                reason,
            });
        }
        let failures = self.backoff.get(subject).map_or(0, |b| b.1) + 1;
        let delay = crate::token::backoff_delay(failures, e.retry_after());
        warn!(client = %self.client, subject, error = %e, retry_in_ms = delay.as_millis() as u64,
            "the subject's token request failed");
        let error = SubjectError::unavailable(e.app_message(), delay);
        self.backoff.insert(
            subject.to_owned(),
            (Instant::now() + delay, failures, error.clone()),
        );
        Rejected::Error(error)
    }

    async fn mark_needs_authorization(
        &self,
        subject: &str,
        record: &SubjectRecord,
        reason: String,
    ) {
        let mut dead = record.clone();
        dead.generation = record.generation + 1;
        dead.tokens.refresh_token = None;
        dead.meta.status = SubjectStatus::NeedsAuthorization;
        dead.meta.reason = Some(reason);
        dead.meta.last_outcome = Some("rejected".to_owned());
        dead.meta.due_at_ms = None;
        match self.store.update(subject, &dead).await {
            Ok(_) => {
                self.pending.remove(subject);
            }
            Err(e) => {
                warn!(client = %self.client, subject, error = %e, "cannot store that the subject needs authorization; written again later");
                self.pending.insert(subject.to_owned(), dead);
            }
        }
    }

    fn needs_authorization(&self, subject: &str, record: &SubjectRecord) -> SubjectError {
        SubjectError::NeedsAuthorization {
            subject: subject.to_owned(),
            reason: record
                .meta
                .reason
                .clone()
                .unwrap_or_else(|| "its refresh token is no longer valid".to_owned()),
        }
    }

    /// A valid record one generation above `previous` holding these tokens
    /// (and no DPoP key: the caller sets the one they are bound to).
    pub(super) fn record_for(
        &self,
        previous: u64,
        access: Option<(Secret, Option<Duration>)>,
        refresh_token: Option<Secret>,
        refresh_lifetime: Option<Duration>,
        connected_at: Option<SystemTime>,
    ) -> SubjectRecord {
        let wall_now = self.clock.wall_now();
        let lifetime = access.as_ref().and_then(|a| a.1);
        let access_expires_at = lifetime.map(|l| wall_now + l);
        let refresh_expires_at = refresh_lifetime.map(|l| wall_now + l);
        let meta = SubjectMeta {
            status: SubjectStatus::Valid,
            connected_at_ms: to_ms(connected_at.unwrap_or(wall_now)),
            access_expires_at_ms: access_expires_at.map(to_ms),
            refresh_expires_at_ms: refresh_expires_at.map(to_ms),
            last_refresh_at_ms: Some(to_ms(wall_now)),
            last_outcome: Some("success".to_owned()),
            reason: None,
            due_at_ms: self.due_at(wall_now, refresh_lifetime),
        };
        SubjectRecord {
            generation: previous + 1,
            meta,
            tokens: TokenState {
                access_token: access.map(|a| a.0),
                access_expires_at,
                lifetime,
                refresh_token,
                refresh_expires_at,
                obtained_at: wall_now,
            },
            dpop_key: None,
        }
    }

    /// When the sweeper should renew a subject refreshed at `now`: before
    /// `refresh_every` has passed, and well before its refresh token expires;
    /// jittered so that subjects connected together do not come due together.
    fn due_at(&self, now: SystemTime, refresh_lifetime: Option<Duration>) -> Option<u64> {
        let by_age = self.config.refresh_every;
        let by_expiry =
            refresh_lifetime.map(|l| l.saturating_sub((l / 10).min(Duration::from_secs(86_400))));
        let span = [by_age, by_expiry].into_iter().flatten().min()?;
        let jitter = span.mul_f64(0.05 * fastrand::f64());
        Some(to_ms(now + span.saturating_sub(jitter)))
    }

    /// Deletes `subject`'s record, then waits until no refresh of it is under
    /// way on any replica (its lease is free): such a refresh finds the
    /// record gone and drops its answer, and only then may the subject be
    /// stored again. Without the wait, a refresh's late write could land
    /// over a record stored again after the deletion (a new record starts
    /// at generation 1). Returns whether there was a record, and the refresh
    /// token it held (to revoke).
    pub(super) async fn delete(&self, subject: &str) -> Result<(bool, Option<Secret>), String> {
        let refresh_token = match self.store.get(subject).await {
            Ok(SubjectLoad::Found(r)) => r.tokens.refresh_token,
            Ok(_) => None,
            Err(e) => return Err(format!("the store cannot be read: {e}")),
        };
        let deleted = self
            .store
            .delete(subject)
            .await
            .map_err(|e| format!("the store cannot be written: {e}"))?;
        let lease_ttl = self.token.timeout + Duration::from_secs(5);
        // A lease lasts its ttl at most: a refresh that overruns it finds the
        // record gone when it writes, as any other.
        let deadline = Instant::now() + lease_ttl + FOLLOW_POLL;
        loop {
            match self.store.try_lease(subject, lease_ttl).await {
                Ok(Some(lease)) => {
                    if let Err(e) = self.store.release(subject, lease).await {
                        debug!(client = %self.client, subject, error = %e, "releasing the subject's lease failed; it expires on its own");
                    }
                    break;
                }
                Ok(None) if Instant::now() < deadline => tokio::time::sleep(FOLLOW_POLL).await,
                Ok(None) => break,
                Err(e) => {
                    warn!(client = %self.client, subject, error = %e,
                        "deleted, but cannot tell whether a refresh of the subject is still under way");
                    break;
                }
            }
        }
        Ok((deleted, refresh_token))
    }

    /// Writes records the store did not take when they were made.
    pub(super) async fn write_pending(&self) {
        let subjects: Vec<String> = self.pending.iter().map(|e| e.key().clone()).collect();
        for subject in subjects {
            let Some(record) = self.pending.get(&subject).map(|r| r.clone()) else {
                continue;
            };
            match self.store.update(&subject, &record).await {
                Ok(_) => {
                    self.pending
                        .remove_if(&subject, |_, r| r.generation == record.generation);
                    info!(client = %self.client, subject, "the subject's tokens were written to the store");
                }
                Err(e) => {
                    debug!(client = %self.client, subject, error = %e, "the store still does not take the subject's tokens");
                    return;
                }
            }
        }
    }
}

/// Whether `a` and `b` are one stored record: the same generation of the same
/// connection, with the same refresh token and key. A subject deleted and
/// stored again has a generation of its own, which may be one seen before.
fn same_record(a: &SubjectRecord, b: &SubjectRecord) -> bool {
    a.generation == b.generation
        && a.meta.connected_at_ms == b.meta.connected_at_ms
        && a.tokens.refresh_token == b.tokens.refresh_token
        && a.dpop_key == b.dpop_key
}

/// Why a refresh under the lease did not yield a token.
enum Rejected {
    /// Refused, but a sibling stored newer tokens: read them.
    Sibling,
    /// The request's answer.
    Error(SubjectError),
}
