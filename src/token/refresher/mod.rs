//! The refresher: one task per client that owns every token request.
//!
//! Because only this task talks to the token endpoint, there is never more than
//! one token request per client in flight (single flight), and a rotating refresh
//! token is used exactly once: the task replaces it with the new one before it
//! can start another request.
//!
//! It is a state machine driven by two kinds of event: commands from the request
//! path ([`Command`]) and its own wake-ups, all of them planned in one
//! [`Schedule`](schedule::Schedule) it owns. Its parts:
//!
//! | module | job |
//! |---|---|
//! | `mod.rs` | the task: events, state, token requests, backoff, `needs_authorization` |
//! | `schedule.rs` | every planned wake-up and which comes first; backoff and margin arithmetic |
//! | `endpoint.rs` | the token endpoint behind [`TokenSource`]; [`TokenError`] |
//! | `install.rs` | an answer checked, persisted, then published to the request path |
//! | `link.rs` | where it stands with the store; returns [`StorePlan`]s, never plans wake-ups |
//! | `stored.rs` | store coordination: adopt, lead or follow, persist, write back |
//! | `tests.rs` | the state machine on tokio's paused clock with a scripted endpoint |

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::dialect::GrantKind;
use super::response::MAX_LIFETIME;
use super::state::{LastFailure, LastRefresh, State, StateCell, Status};
use super::{Command, Outcome, Shared, Token, Trigger};
use crate::clock::{epoch_seconds, rfc3339, SharedClock};
use crate::config::{ClientConfig, Grant, InjectConfig, TokenConfig};
use crate::metrics::ClientMetrics;
use crate::secret::Secret;
use crate::store::{ClientStore, Lease};

mod endpoint;
mod install;
mod link;
mod schedule;
mod stored;
#[cfg(test)]
mod tests;

pub(crate) use endpoint::error_chain;
pub(crate) use endpoint::TokenSource;
pub use endpoint::{TokenEndpoint, TokenError};
pub(crate) use schedule::{backoff_delay, refresh_margin};
use schedule::{sleep_until_opt, Schedule, StorePlan, Wake};

use crate::token::lifetime::MIN_LIFETIME;

struct HeldRefreshToken {
    value: Secret,
    usable_until: Option<Instant>,
    expires_wall: Option<SystemTime>,
}

/// The raw access token behind the current header, kept to be persisted.
struct HeldAccessToken {
    value: Secret,
    expires_wall: Option<SystemTime>,
    lifetime: Option<Duration>,
}

/// Where a published token came from.
enum Origin {
    /// A token endpoint call.
    Provider {
        trigger: Trigger,
        grant: &'static str,
        source: &'static str,
    },
    /// The store: written by an earlier run or another replica.
    Store { generation: u64 },
}

/// The token state a stopping refresher hands to the refresher of the reloaded
/// client, so that a reload never starts again from a bootstrap refresh token
/// the provider rotated long ago. Holds secrets; never printed.
pub struct Handover {
    refresh_token: Option<HeldRefreshToken>,
    access: Option<HeldAccessToken>,
    current: Option<Arc<Token>>,
    generation: u64,
    /// The proactive refresh and the backoff carry over; the store's wake-ups
    /// are planned again from `store`.
    schedule: Schedule,
    needs_authorization: Option<Option<String>>,
    store: link::StoreHandover,
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover")
            .field("has_refresh_token", &self.refresh_token.is_some())
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// How a refresher's task ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It was asked to stop (reload, removal, shutdown) and handed its state over.
    Stopped,
    /// Its command channel closed: no request can reach it any more.
    Orphaned,
}

/// The background task that obtains and renews one client's token.
pub struct Refresher {
    client: String,
    config: Arc<TokenConfig>,
    inject: InjectConfig,
    /// Tokens are DPoP-bound (`[dpop]`): the token_type must say so, and the
    /// request path signs proofs with `ath` over each token.
    dpop: bool,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    endpoint: Arc<dyn TokenSource>,
    metrics: ClientMetrics,
    clock: SharedClock,
    refresh_token: Option<HeldRefreshToken>,
    access: Option<HeldAccessToken>,
    current: Option<Arc<Token>>,
    generation: u64,
    /// Every wake-up planned (refresh, backoff, store).
    schedule: Schedule,
    needs_authorization: bool,
    store: link::StoreLink,
    /// What a person does to leave `needs_authorization`, naming the command.
    recovery: String,
    /// Started from a predecessor's [`Handover`].
    taken_over: bool,
}

impl Refresher {
    /// Builds the handle and refresher for `client`; spawn [`Refresher::run`].
    pub fn new(
        client: &ClientConfig,
        endpoint: TokenEndpoint,
        metrics: ClientMetrics,
        clock: SharedClock,
        store: ClientStore,
    ) -> (super::TokenHandle, Refresher) {
        Refresher::with_source(client, Arc::new(endpoint), metrics, clock, store)
    }

    /// As [`Refresher::new`], with tokens from `endpoint`.
    pub(crate) fn with_source(
        client: &ClientConfig,
        endpoint: Arc<dyn TokenSource>,
        metrics: ClientMetrics,
        clock: SharedClock,
        store: ClientStore,
    ) -> (super::TokenHandle, Refresher) {
        let (handle, shared, commands) = super::channel(client.token_wait_timeout);
        let refresh_token = client
            .token
            .refresh_token
            .clone()
            .map(|value| HeldRefreshToken {
                value,
                usable_until: None,
                expires_wall: None,
            });
        let refresher = Refresher {
            client: client.name.clone(),
            config: Arc::new(client.token.clone()),
            inject: client.inject.clone(),
            dpop: client.dpop.is_some(),
            shared,
            commands,
            endpoint,
            metrics,
            clock,
            refresh_token,
            access: None,
            current: None,
            generation: 0,
            schedule: Schedule::default(),
            needs_authorization: false,
            store: link::StoreLink::new(store),
            taken_over: false,
            recovery: match &client.authorize {
                Some(_) => format!(
                    "a person must log in: run `tokenproxy authorize {} --config <file>`",
                    client.name
                ),
                None => format!(
                    "a person must authorize again, then run `tokenproxy token {} --config <file> --refresh-token-from-stdin` with the new refresh token",
                    client.name
                ),
            },
        };
        refresher.publish(|s| s.has_refresh_token = refresher.refresh_token.is_some());
        (handle, refresher)
    }

    /// Starts from a predecessor's state (a reload of the same account): its
    /// refresh token, which may have been rotated since the configured bootstrap
    /// token, its access token (published at once, so no request of the reloaded
    /// client waits), and where it stood with the store.
    pub fn take_over(&mut self, handover: Handover) {
        self.refresh_token = handover.refresh_token;
        self.access = handover.access;
        self.generation = handover.generation;
        let now = Instant::now();
        if let Some(plan) = self.store.take_over(handover.store, now) {
            self.schedule.apply(plan);
        }
        let kept = handover.current.filter(|t| t.is_usable(now));
        self.schedule
            .continue_from(&handover.schedule, now, kept.is_some());
        self.taken_over =
            self.schedule.retry_at().is_some() || handover.needs_authorization.is_some();
        let wall_now = self.clock.wall_now();
        let rt_held = self.refresh_token.is_some();
        let rt_wall = self.refresh_token.as_ref().and_then(|r| r.expires_wall);
        let access_wall = self.access.as_ref().and_then(|a| a.expires_wall);
        if let Some(token) = kept {
            self.taken_over = true;
            self.shared.current.store(Some(Arc::clone(&token)));
            self.current = Some(token);
            let next_wall = self
                .schedule
                .refresh_at()
                .map(|at| wall_now + at.saturating_duration_since(now));
            let generation = self.generation;
            self.publish(|s| {
                s.state = StateCell(State::Valid);
                s.generation = generation;
                s.access_token_expires_at = access_wall.map(rfc3339);
                s.next_refresh_at = next_wall.map(rfc3339);
            });
            self.metrics.set_state(State::Valid);
            self.metrics
                .set_expiry(access_wall.map(epoch_seconds).unwrap_or(f64::INFINITY));
        }
        self.publish(|s| {
            s.has_refresh_token = rt_held;
            s.refresh_token_expires_at = rt_wall.map(rfc3339);
        });
        if self.current.is_none() {
            if let Some(retry_at) = self.schedule.retry_at() {
                self.publish(|s| s.retry_at = Some(retry_at));
                self.set_state(State::Unavailable);
            }
        }
        if let Some(reason) = handover.needs_authorization {
            self.needs_authorization = true;
            if self.store.client.is_persistent() {
                self.schedule
                    .plan_store_check(now + link::AUTHORIZATION_POLL);
            }
            self.publish(|s| {
                s.reason = reason;
                s.next_refresh_at = None;
            });
            self.set_state(State::NeedsAuthorization);
        }
        info!(client = %self.client, generation = self.generation,
            "reloaded client took over the token state of its previous configuration");
    }

    /// Starts after a predecessor that did not stop in time: it may have sent
    /// its refresh token without seeing the answer, so the configured bootstrap
    /// refresh token is not sent (the store, if any, still has the newest).
    pub fn take_over_unknown(&mut self) {
        if self.refresh_token.take().is_some() {
            warn!(client = %self.client,
                "the previous refresher of this client stopped in an unknown state: its refresh token is not sent again");
            self.publish(|s| s.has_refresh_token = false);
        }
    }

    fn into_handover(self) -> Handover {
        let reason = self.shared.status.borrow().reason.clone();
        Handover {
            refresh_token: self.refresh_token,
            access: self.access,
            current: self.current,
            generation: self.generation,
            schedule: self.schedule,
            needs_authorization: self.needs_authorization.then_some(reason),
            store: self.store.into_handover(),
        }
    }

    /// Names the configuration file in the command shown to leave `needs_authorization`.
    pub fn set_config_path(&mut self, path: &std::path::Path) {
        self.recovery = self.recovery.replace("<file>", &path.display().to_string());
    }

    /// Runs until stopped: obtains the first token, then renews ahead of expiry,
    /// on demand and after a 401. Says how it ended, so that its supervisor can
    /// tell a stop from a refresher that ended on its own.
    pub async fn run(mut self) -> Exit {
        if self.store.client.is_persistent() {
            self.metrics.store_init();
            self.publish_store();
        }
        // A refresher that took over from its predecessor starts with its token
        // (or its needs_authorization) and asks for nothing until it is due.
        let mut trigger = (!self.taken_over).then_some(Trigger::Startup);
        loop {
            if let Some(t) = trigger.take() {
                self.obtain(t).await;
            }
            let wake = self.schedule.next(
                self.needs_authorization,
                self.current.as_deref(),
                Instant::now(),
            );
            tokio::select! {
                () = sleep_until_opt(wake.map(|w| w.0)) => match wake.map(|w| w.1) {
                    Some(Wake::Refresh(t)) => trigger = Some(t),
                    Some(Wake::WriteBack) => self.write_back().await,
                    Some(Wake::CheckStore) => trigger = self.check_store_for_authorization().await,
                    None => {}
                },
                command = self.commands.recv() => match command {
                    None => return Exit::Orphaned,
                    Some(Command::Need) => trigger = self.on_need(),
                    Some(Command::Rejected(generation)) => trigger = self.on_rejected(generation),
                    Some(Command::NewRefreshToken(token)) => trigger = self.on_new_refresh_token(token),
                    Some(Command::Stop(reply)) => {
                        info!(client = %self.client, "refresher stopped between token requests (reload, removal or shutdown)");
                        // A successor that is gone (the reload failed) loses nothing the
                        // store does not have: it is written before every use.
                        let _successor_gone = reply.send(self.into_handover());
                        return Exit::Stopped;
                    }
                }
            }
        }
    }

    fn has_primary_grant(&self) -> bool {
        !matches!(self.config.grant, Grant::RefreshToken)
    }

    fn token_usable(&self, now: Instant) -> bool {
        self.current.as_ref().is_some_and(|t| t.is_usable(now))
    }

    fn on_need(&mut self) -> Option<Trigger> {
        let now = Instant::now();
        if self.token_usable(now) {
            // Wake the waiter so it re-reads the cell.
            self.publish(|_| {});
            return None;
        }
        if self.needs_authorization {
            self.set_state(State::NeedsAuthorization);
            return None;
        }
        if self.following() || self.waiting() {
            // Another replica is refreshing, or the store is down and only it may
            // let this client refresh: the next look at the store is planned.
            return None;
        }
        if self.schedule.backing_off(now) {
            self.set_state(State::Unavailable);
            return None;
        }
        Some(Trigger::Expired)
    }

    fn on_rejected(&mut self, generation: u64) -> Option<Trigger> {
        let is_current = self
            .current
            .as_ref()
            .is_some_and(|t| t.generation == generation);
        if !is_current {
            self.publish(|_| {});
            return None;
        }
        if self.needs_authorization {
            self.set_state(State::NeedsAuthorization);
            return None;
        }
        if self.schedule.backing_off(Instant::now()) {
            // Backing off (a provider's Retry-After among others): the token keeps
            // serving, and waiters for a newer one are answered at once.
            self.publish(|_| {});
            return None;
        }
        // The token keeps serving until the next one is installed: a 401 may be
        // about one resource only, and a failed refresh must not blank the client.
        info!(client = %self.client, generation, "upstream rejected the token; refreshing");
        Some(Trigger::Unauthorized)
    }

    fn on_new_refresh_token(&mut self, token: Secret) -> Option<Trigger> {
        info!(client = %self.client, "a new refresh token was provided; using it now");
        self.start_operator_trial(HeldRefreshToken {
            value: token,
            usable_until: None,
            expires_wall: None,
        });
        self.needs_authorization = false;
        self.schedule.clear_store_check();
        self.schedule.clear_backoff();
        self.publish(|s| {
            s.has_refresh_token = true;
            s.refresh_token_expires_at = None;
            s.reason = None;
            s.retry_at = None;
        });
        Some(Trigger::Startup)
    }

    async fn obtain(&mut self, trigger: Trigger) {
        if self.needs_authorization {
            return;
        }
        let starting = self.generation == 0 && self.schedule.failures() == 0;
        if !starting && !self.following() {
            self.set_state(State::Refreshing);
        }
        let mut lease = None;
        let mut primary_only = false;
        if self.store.client.is_persistent() {
            match self.coordinate().await {
                stored::Coordination::Adopted
                | stored::Coordination::Locked
                | stored::Coordination::SpentElsewhere => return,
                stored::Coordination::Follow => {
                    self.follow();
                    return;
                }
                stored::Coordination::Lead {
                    lease: l,
                    primary_only: p,
                } => {
                    lease = Some(l);
                    primary_only = p;
                }
                stored::Coordination::Unreachable => match self.wait_for_store() {
                    stored::StoreWait::Wait { recheck_at } => {
                        self.schedule.apply(StorePlan::Recheck(recheck_at));
                        return;
                    }
                    stored::StoreWait::Local { spend_nothing } => {
                        self.schedule.apply(StorePlan::NoRecheck);
                        primary_only = spend_nothing;
                    }
                },
            }
        }
        let outcome = self
            .request_token(trigger, lease.as_ref(), primary_only)
            .await;
        if let Some(lease) = lease {
            self.finish_lease(lease, outcome).await;
        }
    }

    /// Calls the token endpoint until a token is installed or a failure backs
    /// off; `Err` carries the backoff delay. With `primary_only` (a shared
    /// store that cannot be reached) the held refresh token is kept, unspent,
    /// and the primary grant is used.
    async fn request_token(
        &mut self,
        trigger: Trigger,
        lease: Option<&Lease>,
        primary_only: bool,
    ) -> Result<(), Duration> {
        self.store
            .set_role(if lease.is_some() && self.store.client.is_shared() {
                Some("leader")
            } else if self.store.client.is_shared() {
                Some("local")
            } else {
                None
            });
        let mut first = true;
        loop {
            if !first {
                self.keep_lease(lease).await;
            }
            first = false;
            let now = Instant::now();
            let refresh = self
                .refresh_token
                .as_ref()
                .filter(|rt| rt.usable_until.is_none_or(|t| now < t))
                .map(|rt| rt.value.clone());
            if refresh.is_none() && self.refresh_token.is_some() {
                debug!(client = %self.client, "refresh token expired; dropping it");
                self.refresh_token = None;
            }
            let refresh = refresh.filter(|_| !primary_only);
            let kind = match &refresh {
                Some(rt) => GrantKind::Refresh(rt),
                None if self.has_primary_grant() => GrantKind::Primary,
                None => {
                    self.enter_needs_authorization(
                        "no usable refresh token and no other credential configured".into(),
                    );
                    return Ok(());
                }
            };
            let grant = kind.label(&self.config);
            let started = Instant::now();
            let result = self.endpoint.request(&self.config, kind).await;
            let result = match result {
                Ok(set) => self.install(set, trigger, grant).await,
                Err(e) => Err(e),
            };
            // A refresh token sent without an answer to use stays marked as
            // spending in the store (see `store/redis.rs`).
            self.store.settle(match &result {
                Ok(()) | Err(TokenError::Provider { .. } | TokenError::Redirect { .. }) => {
                    Some(true)
                }
                Err(TokenError::Unreachable { .. } | TokenError::ClientAuthentication { .. }) => {
                    None
                }
                Err(_) => matches!(kind, GrantKind::Refresh(_)).then_some(false),
            });
            let elapsed = started.elapsed().as_secs_f64();
            match result {
                Ok(()) => {
                    self.metrics
                        .token_request(trigger, grant, Outcome::Success, elapsed);
                    return Ok(());
                }
                Err(e) => {
                    let outcome = e.outcome();
                    self.metrics.token_request(trigger, grant, outcome, elapsed);
                    self.record_failure(trigger, grant, outcome, &e);
                    let was_refresh = matches!(kind, GrantKind::Refresh(_));
                    if was_refresh && e.is_rejection() {
                        match self.end_operator_trial(&e) {
                            Some(true) => continue,
                            Some(false) => return Ok(()),
                            None => {}
                        }
                        warn!(client = %self.client, error = %e, "refresh token rejected; dropping it");
                        self.drop_refresh_token();
                        // A rule may say only a person can mend this; the full
                        // grant would not bring the refresh token back.
                        if self.has_primary_grant() && !e.needs_authorization() {
                            continue;
                        }
                        self.enter_needs_authorization(format!("refresh token rejected: {e}"));
                        // Tell the store, so that replicas and restarts do not send it again.
                        self.persist().await;
                        return Ok(());
                    }
                    if was_refresh && e.is_ambiguous() && self.has_primary_grant() {
                        // The provider may have rotated the refresh token without our
                        // seeing the answer; sending it again could look like reuse and
                        // revoke the whole grant. The primary grant is safe to repeat.
                        warn!(client = %self.client, error = %e,
                            "refresh outcome unknown; not reusing the refresh token, the next attempt uses the full grant");
                        self.drop_refresh_token();
                        self.persist().await;
                    }
                    return Err(self.back_off(&e));
                }
            }
        }
    }

    fn drop_refresh_token(&mut self) {
        self.refresh_token = None;
        self.publish(|s| {
            s.has_refresh_token = false;
            s.refresh_token_expires_at = None;
        });
    }

    fn record_failure(
        &mut self,
        trigger: Trigger,
        grant: &'static str,
        outcome: Outcome,
        e: &TokenError,
    ) {
        let at = crate::clock::rfc3339(self.clock.wall_now());
        let message = e.to_string();
        let app_message = e.app_message();
        let (code, description) = match e {
            TokenError::Provider { error, .. } => (error.error.clone(), error.description.clone()),
            _ => (None, None),
        };
        self.publish(|s| {
            s.last_failure = Some(LastFailure {
                at: at.clone(),
                trigger: trigger.as_str(),
                grant,
                outcome: outcome.as_str(),
                error: code,
                description,
                message: message.clone(),
            });
            s.last_refresh = Some(LastRefresh {
                at,
                trigger: trigger.as_str(),
                grant,
                outcome: outcome.as_str(),
                error: Some(message),
                app_error: Some(app_message),
            });
            s.refreshes_failed += 1;
        });
    }

    fn back_off(&mut self, e: &TokenError) -> Duration {
        let now = Instant::now();
        let delay = self.schedule.back_off(e.retry_after(), now);
        let usable = self.token_usable(now);
        if usable {
            warn!(client = %self.client, error = %e, retry_in_ms = delay.as_millis() as u64,
                "token request failed; the current token is still valid");
        } else {
            error!(client = %self.client, error = %e, retry_in_ms = delay.as_millis() as u64,
                "token request failed; no valid token");
        }
        let retry_at = self.schedule.retry_at();
        let next_wall = self.clock.wall_now() + delay;
        self.publish(|s| {
            s.retry_at = retry_at;
            s.next_refresh_at = Some(rfc3339(next_wall));
        });
        self.set_state(if usable {
            State::Valid
        } else {
            State::Unavailable
        });
        delay
    }

    fn enter_needs_authorization(&mut self, reason: String) {
        let reason = format!("{reason}; {}", self.recovery);
        self.needs_authorization = true;
        if self.store.client.is_persistent() {
            self.schedule
                .plan_store_check(Instant::now() + link::AUTHORIZATION_POLL);
        }
        error!(client = %self.client, reason = %reason,
            "client needs authorization: a new refresh token must be provided");
        self.publish(|s| {
            s.reason = Some(reason);
            s.next_refresh_at = None;
        });
        self.set_state(State::NeedsAuthorization);
    }

    fn set_state(&self, state: State) {
        self.publish(|s| s.state = StateCell(state));
        self.metrics.set_state(state);
    }

    fn publish(&self, f: impl FnOnce(&mut Status)) {
        self.shared.status.send_modify(f);
    }
}
