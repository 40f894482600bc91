//! The refresher's side of the token store (file or Redis).
//!
//! Before a token request the refresher reads the stored record: a newer one
//! (from an earlier run, another replica, or `tokenproxy token`) is taken
//! instead of calling the provider when its access token is fresh, and its
//! refresh token is taken in any case, since it is the newest of a rotating
//! chain. With Redis, only the replica holding the client's lease calls the
//! provider; the others follow, looking at the record every [`FOLLOW_POLL`]
//! until the new token appears or the lease is free.
//!
//! Every new state is written before its token is used. When the store cannot
//! be reached, the token in memory keeps serving and the refresher looks again
//! every [`STORE_RETRY`]. With a shared store (Redis) a refresh token is spent
//! only under the lease, so while the store is down a client that can only
//! refresh with it waits (role `waiting`): its token serves until it expires,
//! then requests get `token_unavailable`. Two replicas refreshing on their own
//! with one rotating refresh token would make the provider revoke the grant,
//! a full outage caused by a blip. A grant that spends nothing
//! (client_credentials, password) is used on its own when the token is about
//! to die (role `local`), and the state is written back once the store answers
//! (newest generation wins). A store of one process (file) refreshes on its own
//! as before.
//!
//! A leader whose answer never reached the store (the primary died with it)
//! may lose its lease before it writes the answer back. The next leader then
//! finds its spending mark on the record (see `store/redis.rs`) and never
//! sends that record's refresh token, which the provider may have rotated
//! already: it refreshes with the primary grant when there is one, else it
//! follows, waiting for the write-back, for up to twice the lease, and then
//! the client needs authorization, which ends when the answer (or another
//! refresh token) is stored or the mark is removed. A process's own mark
//! changes nothing for it (it knows what it sent); it removes the mark when
//! it gives the lease back without a refresh token in flight or unstored.
//!
//! A stored record that does not open with any configured key (another key, a
//! copy of another client's record, damaged) may hold the newest refresh token
//! of the chain: the client is then `locked`. It spends nothing (not the
//! bootstrap refresh token, which that chain spent long ago) and overwrites
//! nothing; the held token serves until it expires, `/status` and the log say
//! what is wrong and what to do, and the record is looked at every
//! [`LOCKED_POLL`]. An operator's refresh token (or login) that the provider
//! accepts replaces the record. A record that does not parse at all is not
//! tokenproxy's; the next fenced write replaces it.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::link::{OperatorTrial, StoreLink, AUTHORIZATION_POLL, RETURN_GRACE, STORE_RETRY};
use super::{HeldAccessToken, HeldRefreshToken, Origin, Refresher, TokenError, Trigger};
use crate::secret::Secret;
use crate::store::{next_generation, Lease, Loaded, Record, Saved, StoreError, TokenState};
use crate::token::state::{State, StoreStatus};

/// What the store says before a token request.
pub(super) enum Coordination {
    /// A fresh token came from the store; no request is needed.
    Adopted,
    /// This process calls the provider (holding the lease, with Redis);
    /// `primary_only`: with the primary grant, never with the refresh token
    /// held, which another replica may have spent (see [`Loaded::spent_elsewhere`]).
    Lead { lease: Lease, primary_only: bool },
    /// Another replica holds the lease: look again shortly.
    Follow,
    /// The store cannot be used now (already recorded).
    Unreachable,
    /// The stored record does not open: nothing may be spent (already recorded).
    Locked,
    /// The refresh token held may have been spent by another replica, and it
    /// is the only grant: the client needs authorization (already recorded).
    SpentElsewhere,
}

/// What to do while the store cannot be reached.
pub(super) enum StoreWait {
    /// Keep the token and look at the store again at `recheck_at`.
    Wait { recheck_at: Instant },
    /// Refresh here and now, without the store (no look at it is planned);
    /// `spend_nothing`: with the primary grant only, never with the refresh token.
    Local { spend_nothing: bool },
}

impl Refresher {
    /// Whether another replica is refreshing and a look at the store is planned.
    pub(super) fn following(&self) -> bool {
        self.store.following && self.schedule.recheck_planned()
    }

    /// Whether the store is down (or the record locked) and only it may let
    /// the client refresh; the next look at it is planned.
    pub(super) fn waiting(&self) -> bool {
        matches!(self.store.role, Some("waiting" | "locked"))
            && self.schedule.recheck_after(Instant::now())
    }

    /// Reads the store and decides who calls the provider.
    pub(super) async fn coordinate(&mut self) -> Coordination {
        let ttl = StoreLink::lease_ttl(&self.config);
        let loaded = match self.load_store().await {
            Ok(l) => l,
            Err(e) => {
                self.store_failed("read", &e);
                return Coordination::Unreachable;
            }
        };
        self.store_ok();
        if self.lock_if_unreadable(&loaded) {
            if let Some(lease) = self.store.lease.take() {
                self.release(lease).await;
            }
            return Coordination::Locked;
        }
        let marked = marked_refresh_token(&loaded);
        if self.take_loaded(loaded) {
            if let Some(lease) = self.store.lease.take() {
                self.release(lease).await;
            }
            return Coordination::Adopted;
        }
        let mut spent_elsewhere = self.spent_elsewhere(marked);
        // Without the lease, the lease decides: its holder (perhaps the one
        // that set the mark, backing off) refreshes, and this one follows.
        if let Some(marked_at) = spent_elsewhere.filter(|_| !self.has_primary_grant()) {
            if let Some(lease) = self.store.lease.take() {
                self.release(lease).await;
                return self.wait_for_the_spender(marked_at);
            }
        }
        if self.store.client.is_shared() && !self.store.write_pending && self.store.lease.is_none()
        {
            let grace_until = self.store.answered_again_at.map(|t| t + RETURN_GRACE);
            if grace_until.is_some_and(|until| Instant::now() < until) {
                // Right after an outage: a leader may still be writing back the
                // refresh token it rotated; look at the record again shortly.
                return Coordination::Follow;
            }
        }
        if let Some(lease) = self.store.lease.take() {
            match self.store.client.extend_lease(&lease, ttl).await {
                Ok(true) => {
                    return Coordination::Lead {
                        lease,
                        primary_only: spent_elsewhere.is_some(),
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    self.store_failed("lease", &e);
                    return Coordination::Unreachable;
                }
            }
        }
        let lease = match self.store.client.try_lease(ttl).await {
            Ok(Some(lease)) => lease,
            Ok(None) => return Coordination::Follow,
            Err(e) => {
                self.store_failed("lease", &e);
                return Coordination::Unreachable;
            }
        };
        if self.store.client.is_shared() {
            // The previous leader may have written between our read and our lease.
            match self.load_store().await {
                Ok(l) => {
                    if self.lock_if_unreadable(&l) {
                        self.release(lease).await;
                        return Coordination::Locked;
                    }
                    let marked = marked_refresh_token(&l);
                    if self.take_loaded(l) {
                        self.release(lease).await;
                        return Coordination::Adopted;
                    }
                    spent_elsewhere = self.spent_elsewhere(marked);
                    if let Some(marked_at) = spent_elsewhere.filter(|_| !self.has_primary_grant()) {
                        self.release(lease).await;
                        return self.wait_for_the_spender(marked_at);
                    }
                }
                Err(e) => {
                    self.store_failed("read", &e);
                    self.release(lease).await;
                    return Coordination::Unreachable;
                }
            }
        }
        if spent_elsewhere.is_some() {
            warn!(client = %self.client,
                "the stored refresh token may have been spent by another replica whose answer was lost; refreshing with the configured grant instead");
        }
        Coordination::Lead {
            lease,
            primary_only: spent_elsewhere.is_some(),
        }
    }

    /// When the refresh token held is the stored one and another process's
    /// spending mark is on it: since when (the store's clock). Anything else
    /// (no mark, this process's own, or a refresh token of ours the store has
    /// not taken yet) ends a wait for the spender.
    fn spent_elsewhere(&mut self, marked: Option<(SystemTime, Secret)>) -> Option<SystemTime> {
        let held = self.refresh_token.as_ref().map(|rt| &rt.value);
        let found = marked.and_then(|(at, stored)| (held == Some(&stored)).then_some(at));
        if found.is_none() {
            self.store.spent_elsewhere_since = None;
        }
        found
    }

    /// The refresh token held may have been spent by another replica whose
    /// answer is not stored, and it is the only grant: follow (that replica
    /// writes its answer back within a second or so once the store answers),
    /// for at most twice the lease; then the client needs authorization, which
    /// ends when the answer or another refresh token is stored, or the mark
    /// is removed.
    fn wait_for_the_spender(&mut self, marked_at: SystemTime) -> Coordination {
        let now = Instant::now();
        let bound = StoreLink::lease_ttl(&self.config) * 2;
        let first = *self.store.spent_elsewhere_since.get_or_insert(now);
        let age = self
            .clock
            .wall_now()
            .duration_since(marked_at)
            .unwrap_or(Duration::ZERO);
        if now.duration_since(first) < bound && age < bound {
            if first == now {
                warn!(client = %self.client,
                    "the stored refresh token may have been spent by another replica that has not stored its answer; waiting for it instead of sending it again");
            }
            return Coordination::Follow;
        }
        self.store.spent_elsewhere_since = None;
        let plan = self.store.stop_following();
        self.schedule.apply(plan);
        self.publish_store();
        self.enter_needs_authorization(
            "the refresh token may have been spent by another replica whose answer was lost; sending it again could make the provider revoke the grant, so it is not sent"
                .to_owned(),
        );
        self.store.blocked_by_mark = true;
        Coordination::SpentElsewhere
    }

    /// Another replica refreshes: look at the store again shortly.
    pub(super) fn follow(&mut self) {
        if !self.store.following {
            debug!(client = %self.client, "another replica is refreshing the token; waiting for it");
        }
        let plan = self.store.follow(Instant::now());
        self.schedule.apply(plan);
        self.publish_store();
    }

    /// The store is unreachable: wait for it while the token is still good for
    /// a while; when it is about to die, refresh here if that spends no refresh
    /// token another replica may hold too, else keep waiting (see the module docs).
    pub(super) fn wait_for_store(&mut self) -> StoreWait {
        self.store.following = false;
        let now = Instant::now();
        let due = self
            .local_refresh_deadline()
            .is_none_or(|deadline| now >= deadline);
        if !due {
            let deadline = self.local_refresh_deadline().unwrap_or(now);
            self.store.role = Some(
                if self.store.client.is_shared() && !self.has_primary_grant() {
                    "waiting"
                } else {
                    "local"
                },
            );
            self.publish_store();
            return StoreWait::Wait {
                recheck_at: (now + STORE_RETRY).min(deadline),
            };
        }
        if !self.store.client.is_shared() {
            return StoreWait::Local {
                spend_nothing: false,
            };
        }
        if self.has_primary_grant() {
            return StoreWait::Local {
                spend_nothing: true,
            };
        }
        // Only the store's lease may let this client spend its refresh token.
        let retry_at = now + STORE_RETRY;
        if self.store.role != Some("waiting") || self.token_usable(now) {
            warn!(client = %self.client,
                "token store unreachable: the refresh token is spent only under the store's lease; serving the held token until it expires");
        }
        self.store.role = Some("waiting");
        self.publish_store();
        if !self.token_usable(now) {
            let reason = "the token store is unreachable; a refresh token is spent only under its lease, so no new token until it answers".to_owned();
            self.publish(|s| {
                s.reason = Some(reason);
                s.retry_at = Some(retry_at);
            });
            self.set_state(State::Unavailable);
        }
        StoreWait::Wait {
            recheck_at: retry_at,
        }
    }

    /// When a token that cannot be refreshed through the store must be refreshed
    /// here: a quarter of the refresh margin (at least 0.5 s) before it dies.
    fn local_refresh_deadline(&self) -> Option<Instant> {
        let token = self.current.as_ref()?;
        let until = token.usable_until?;
        let remaining = until.saturating_duration_since(Instant::now());
        let lifetime = self
            .access
            .as_ref()
            .and_then(|a| a.lifetime)
            .unwrap_or(remaining);
        let margin = super::refresh_margin(lifetime, self.config.refresh_before);
        let local = (margin / 4).max(Duration::from_millis(500)).min(margin);
        until.checked_sub(local)
    }

    /// After a token request: give the lease back, or keep it through the
    /// backoff so the other replicas wait instead of trying themselves.
    pub(super) async fn finish_lease(&mut self, lease: Lease, outcome: Result<(), Duration>) {
        match outcome {
            // The new state is not stored yet: the lease stays ours (the write
            // back extends it) so no other replica spends the old refresh token.
            Ok(()) if self.store.write_pending => self.store.lease = Some(lease),
            Ok(()) => self.release(lease).await,
            Err(delay) => match self.store.client.extend_lease(&lease, delay).await {
                Ok(true) => self.store.lease = Some(lease),
                Ok(false) => {}
                Err(e) => self.store_failed("lease", &e),
            },
        }
    }

    /// Extends the lease before another token request in the same attempt.
    pub(super) async fn keep_lease(&mut self, lease: Option<&Lease>) {
        let Some(lease) = lease else { return };
        let ttl = StoreLink::lease_ttl(&self.config);
        if let Err(e) = self.store.client.extend_lease(lease, ttl).await {
            self.store_failed("lease", &e);
        }
    }

    /// Gives the lease back, with this process's spending mark unless a
    /// refresh token it sent may be spent without its answer stored.
    async fn release(&mut self, lease: Lease) {
        let released = if self.store.unsettled || self.store.write_pending {
            self.store.client.release_keeping_mark(lease).await
        } else {
            self.store.client.release(lease).await
        };
        if let Err(e) = released {
            self.store_failed("lease", &e);
        }
    }

    /// Writes the current state. Returns true when the store held a newer state
    /// from another replica with a fresh token, which was taken instead.
    pub(super) async fn persist(&mut self) -> bool {
        if !self.store.client.is_persistent() {
            return false;
        }
        for _attempt in 0..2 {
            let generation = match next_generation(self.store.generation.max(self.store.seen)) {
                Ok(g) => g,
                Err(e) => {
                    self.store_failed("write", &e);
                    break;
                }
            };
            let record = Record {
                generation,
                state: self.current_state(),
            };
            // An operator's refresh token the provider accepted may replace a
            // record that does not open; nothing else may.
            let saved = if self.store.operator_trial.as_ref().is_some_and(|t| t.proven) {
                self.store.client.save_replacing(&record).await
            } else {
                self.store.client.save(&record).await
            };
            match saved {
                Ok(Saved::Written) => {
                    if self.store.write_pending {
                        info!(client = %self.client, generation, "token state written back to the store");
                    }
                    let plan = self.store.written(generation);
                    self.schedule.apply(plan);
                    self.store_ok();
                    return false;
                }
                Ok(Saved::Stale { generation: theirs }) => {
                    self.metrics.store_conflict();
                    // `theirs` may belong to a record that does not open; only
                    // the reload below says which generation can be trusted.
                    warn!(client = %self.client, ours = generation, theirs,
                        "the store holds a newer token state than the one just obtained (another replica refreshed too)");
                    match self.load_store().await {
                        Ok(loaded) => {
                            self.store_ok();
                            if self.lock_if_unreadable(&loaded) {
                                break;
                            }
                            if self.take_loaded(loaded) {
                                let plan = self.store.superseded();
                                self.schedule.apply(plan);
                                return true;
                            }
                        }
                        Err(e) => {
                            self.store_failed("read", &e);
                            break;
                        }
                    }
                }
                Err(e) => {
                    self.store_failed("write", &e);
                    break;
                }
            }
        }
        let rotated_at_stake = self.store.client.is_shared() && self.refresh_token.is_some();
        let plan = self.store.write_failed(rotated_at_stake, Instant::now());
        self.schedule.apply(plan);
        self.publish_store();
        false
    }

    /// Tries again to write state the store has not taken.
    pub(super) async fn write_back(&mut self) {
        self.schedule.clear_write_back();
        if let Some(lease) = &self.store.lease {
            let ttl = StoreLink::lease_ttl(&self.config);
            // Best effort: a lease that cannot be extended is written over below.
            if let Err(e) = self.store.client.extend_lease(lease, ttl).await {
                debug!(client = %self.client, error = %e, "lease not extended before the write back");
            }
        }
        if self.store.write_pending && self.persist().await {
            debug!(client = %self.client, "a newer stored state was taken instead of writing back");
        }
        if !self.store.write_pending {
            if let Some(lease) = self.store.lease.take() {
                self.release(lease).await;
            }
        }
    }

    /// In `needs_authorization`: a newer record with a refresh token (from
    /// `tokenproxy token`, `authorize` or another replica) ends it.
    pub(super) async fn check_store_for_authorization(&mut self) -> Option<Trigger> {
        self.schedule
            .plan_store_check(Instant::now() + AUTHORIZATION_POLL);
        let loaded = match self.load_store().await {
            Ok(l) => l,
            Err(e) => {
                self.store_failed("read", &e);
                return None;
            }
        };
        self.store_ok();
        let usable = loaded.record.as_ref().is_some_and(|r| {
            r.generation > self.store.generation
                && (r.state.refresh_token.is_some() || r.state.access_token.is_some())
        });
        // Waiting for another replica's answer: its mark is gone, so the
        // refresh token held was not spent after all.
        let unmarked = self.store.blocked_by_mark
            && loaded.spent_elsewhere.is_none()
            && loaded
                .record
                .as_ref()
                .is_some_and(|r| r.state.refresh_token.is_some());
        if !usable && !unmarked {
            self.store.seen = self.store.seen.max(loaded.generation);
            return None;
        }
        info!(client = %self.client, "the store holds new token state; leaving needs_authorization");
        self.needs_authorization = false;
        self.store.blocked_by_mark = false;
        self.schedule.clear_store_check();
        self.schedule.clear_backoff();
        self.publish(|s| {
            s.reason = None;
            s.retry_at = None;
        });
        if self.take_loaded(loaded) {
            return None;
        }
        Some(Trigger::Startup)
    }

    /// Reads the client's record, counting one that does not open (once).
    async fn load_store(&mut self) -> Result<Loaded, StoreError> {
        let loaded = self.store.client.load().await?;
        if loaded.not_opened.as_ref().is_some_and(|n| n.first_seen) {
            self.metrics.store_error("open");
        }
        Ok(loaded)
    }

    /// A stored record that does not open stops the client (see the module
    /// docs) unless an operator's refresh token is on trial; true when it does.
    /// Otherwise a lock from an earlier read ends.
    /// A record that does not parse is not tokenproxy's and is replaced under
    /// the lease, but not with the configured bootstrap refresh token: the
    /// chain that record stands for may have spent it long ago.
    fn lock_if_unreadable(&mut self, loaded: &Loaded) -> bool {
        match &loaded.not_opened {
            Some(n) if self.store.operator_trial.is_none() && n.locked => {
                let problem = format!(
                    "the stored token state does not open: {}; nothing is spent or overwritten until an operator acts: {}",
                    n.problem,
                    self.store.client.locked_hint()
                );
                self.store_locked(problem);
                true
            }
            Some(n) if self.store.operator_trial.is_none() && self.holds_only_bootstrap() => {
                let problem = format!(
                    "the stored token state does not parse: {}; the only refresh token held is the configured bootstrap one, which the stored chain may have spent, so nothing is spent until an operator acts: {}",
                    n.problem,
                    self.store.client.locked_hint()
                );
                self.store_locked(problem);
                true
            }
            _ => {
                self.store_unlocked();
                false
            }
        }
    }

    /// Whether the refresh token held is the configured bootstrap one, and no
    /// other grant is configured.
    fn holds_only_bootstrap(&self) -> bool {
        !self.has_primary_grant()
            && self.config.refresh_token.is_some()
            && self.refresh_token.as_ref().map(|r| &r.value) == self.config.refresh_token.as_ref()
    }

    fn store_locked(&mut self, problem: String) {
        let now = Instant::now();
        let plan = self.store.lock(problem.clone(), now);
        self.schedule.apply(plan);
        self.publish_store();
        if self.token_usable(now) {
            self.set_state(State::Valid);
        } else {
            self.publish(|s| {
                s.reason = Some(problem);
                s.retry_at = None;
            });
            self.set_state(State::Unavailable);
        }
    }

    fn store_unlocked(&mut self) {
        let Some(plan) = self.store.unlock() else {
            return;
        };
        info!(client = %self.client, "the stored token state no longer blocks the client; carrying on");
        self.schedule.apply(plan);
        self.publish(|s| s.reason = None);
        self.publish_store();
    }

    /// Takes a loaded record when it is newer than ours; true when its access
    /// token is fresh enough that no token request is needed.
    fn take_loaded(&mut self, loaded: Loaded) -> bool {
        self.store.seen = self.store.seen.max(loaded.generation);
        if self.store.operator_trial.is_some() {
            return false;
        }
        match loaded.record {
            Some(record) if record.generation > self.store.generation => self.adopt(record),
            _ => false,
        }
    }

    fn adopt(&mut self, record: Record) -> bool {
        self.store.generation = record.generation;
        self.store.unsettled = false;
        self.store.blocked_by_mark = false;
        let state = record.state;
        let now = Instant::now();
        let wall_now = self.clock.wall_now();
        let until = |t: SystemTime| {
            let left = t.duration_since(wall_now).unwrap_or(Duration::ZERO);
            now + left.min(super::MAX_LIFETIME)
        };
        // The stored refresh token is the newest of its chain: take it, or its absence.
        self.refresh_token = state.refresh_token.map(|value| HeldRefreshToken {
            value,
            usable_until: state.refresh_expires_at.map(until),
            expires_wall: state.refresh_expires_at,
        });
        let rt_held = self.refresh_token.is_some();
        let rt_wall = state.refresh_expires_at;
        self.publish(|s| {
            s.has_refresh_token = rt_held;
            s.refresh_token_expires_at = rt_wall.map(crate::clock::rfc3339);
        });
        let Some(access_token) = state.access_token else {
            return false;
        };
        let remaining = match state.access_expires_at {
            Some(at) => match at.duration_since(wall_now) {
                Ok(d) if d >= super::MIN_LIFETIME => Some(d),
                _ => return false,
            },
            None => None,
        };
        let Some(header) = self.header_for(&access_token) else {
            return false;
        };
        let lifetime = state.lifetime.or(remaining);
        self.access = Some(HeldAccessToken {
            value: access_token,
            expires_wall: state.access_expires_at,
            lifetime,
        });
        self.publish_token(
            header,
            remaining,
            lifetime,
            Origin::Store {
                generation: record.generation,
            },
        );
        self.schedule.refresh_at().is_none_or(|at| at > now)
    }

    fn current_state(&self) -> TokenState {
        TokenState {
            access_token: self.access.as_ref().map(|a| a.value.clone()),
            access_expires_at: self.access.as_ref().and_then(|a| a.expires_wall),
            lifetime: self.access.as_ref().and_then(|a| a.lifetime),
            refresh_token: self.stored_refresh_token().map(|r| r.value.clone()),
            refresh_expires_at: self.stored_refresh_token().and_then(|r| r.expires_wall),
            obtained_at: self.clock.wall_now(),
        }
    }

    /// The refresh token to store: an operator's one only once it has worked.
    fn stored_refresh_token(&self) -> Option<&HeldRefreshToken> {
        match &self.store.operator_trial {
            Some(trial) if !trial.proven => trial.previous.as_ref(),
            _ => self.refresh_token.as_ref(),
        }
    }

    /// Puts an operator's refresh token on trial in place of the current one.
    pub(super) fn start_operator_trial(&mut self, token: HeldRefreshToken) {
        let previous = self.refresh_token.replace(token);
        self.store.blocked_by_mark = false;
        // A second token before the first was tried replaces it; the one held
        // before the first stays the fallback.
        if self.store.operator_trial.is_none() {
            self.store.operator_trial = Some(OperatorTrial {
                previous,
                needs_authorization: self.needs_authorization,
                proven: false,
            });
        }
    }

    /// After the provider rejected a refresh token: if it was an operator's on
    /// trial, the previous refresh token is held again and nothing is stored.
    /// `None`: no trial was on. `Some(true)`: no usable token is held, so the
    /// previous refresh token is to be used now. `Some(false)`: done.
    pub(super) fn end_operator_trial(&mut self, e: &TokenError) -> Option<bool> {
        let trial = self.store.operator_trial.take_if(|t| !t.proven)?;
        warn!(client = %self.client, error = %e,
            "the provided refresh token was rejected; keeping the previous one");
        self.refresh_token = trial.previous;
        let held = self.refresh_token.is_some();
        let expires = self
            .refresh_token
            .as_ref()
            .and_then(|r| r.expires_wall)
            .map(crate::clock::rfc3339);
        self.publish(|s| {
            s.has_refresh_token = held;
            s.refresh_token_expires_at = expires;
        });
        if trial.needs_authorization || !held {
            self.enter_needs_authorization(format!("the provided refresh token was rejected: {e}"));
            return Some(false);
        }
        if self.token_usable(Instant::now()) {
            self.set_state(State::Valid);
            return Some(false);
        }
        Some(true)
    }

    fn store_ok(&mut self) {
        if !self.store.available {
            info!(client = %self.client, store = self.store.client.kind(), "token store answers again");
            self.store.available = true;
            self.store.answered_again_at = Some(Instant::now());
            self.store.unavailable_since = None;
            self.store.error = None;
            if self.store.role == Some("waiting") {
                self.store.role = None;
                // The reason was the store; the refresh that follows sets the state.
                self.publish(|s| s.reason = None);
            }
            self.metrics.store_available(true, None);
            self.publish_store();
        }
    }

    fn store_failed(&mut self, operation: &str, e: &StoreError) {
        self.metrics.store_error(operation);
        if self.store.available {
            warn!(client = %self.client, store = self.store.client.kind(), operation, error = %e,
                "token store unavailable; the token is kept in memory until the store answers");
        } else {
            debug!(client = %self.client, operation, error = %e, "token store still unavailable");
        }
        self.store.available = false;
        let since = *self
            .store
            .unavailable_since
            .get_or_insert_with(|| self.clock.wall_now());
        self.store.error = Some(e.to_string());
        self.metrics
            .store_available(false, Some(crate::clock::epoch_seconds(since)));
        self.publish_store();
    }

    /// Puts the store's state into `/status`.
    pub(super) fn publish_store(&self) {
        if !self.store.client.is_persistent() {
            return;
        }
        let status = StoreStatus {
            kind: self.store.client.kind(),
            available: self.store.available,
            error: self.store.error.clone(),
            write_pending: self.store.write_pending,
            generation: self.store.generation,
            role: self.store.role,
            unavailable_since: self.store.unavailable_since.map(crate::clock::rfc3339),
            problem: self.store.locked.clone(),
        };
        self.publish(|s| s.store = Some(status));
    }
}

/// The stored refresh token, with since when, when the record carries another
/// process's spending mark at its generation.
fn marked_refresh_token(loaded: &Loaded) -> Option<(SystemTime, Secret)> {
    let at = loaded.spent_elsewhere?;
    let stored = loaded.record.as_ref()?.state.refresh_token.clone()?;
    Some((at, stored))
}
