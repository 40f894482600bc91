//! What a token endpoint's answer does: checked, persisted (a rotated refresh
//! token must outlive a crash right after), then published to the request
//! path with its proactive refresh planned.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::info;

use super::endpoint::{display_url, shown_token_type};
use super::schedule::refresh_margin;
use super::{HeldAccessToken, HeldRefreshToken, Origin, Refresher, TokenError};
use crate::clock::{epoch_seconds, rfc3339, wall_after};
use crate::secret::Secret;
use crate::token::lifetime::{access_lifetime, refresh_token_lifetime};
use crate::token::response::TokenSet;
use crate::token::state::{LastRefresh, State, StateCell};
use crate::token::{Outcome, Token, Trigger};

/// What the request path sends for one access token.
pub(super) struct Injected {
    header: http::HeaderValue,
    dpop_ath: Option<String>,
}

impl Refresher {
    /// Installs a token from a successful response: the new state is persisted
    /// first (a rotated refresh token must outlive a crash right after), then
    /// the token is published.
    pub(super) async fn install(
        &mut self,
        set: TokenSet,
        trigger: Trigger,
        grant: &'static str,
    ) -> Result<(), TokenError> {
        let url = display_url(&self.config.url);
        if self.dpop && !set.is_dpop() {
            // A Bearer token sent with a proof would work, but it is not bound:
            // whoever copies it can use it, which is what [dpop] rules out.
            return Err(TokenError::Unusable {
                url,
                reason: format!(
                    "token_type is {}, not DPoP: the provider did not bind the token to the DPoP key; remove [clients.{}.dpop] if it does not support DPoP for this client",
                    shown_token_type(set.token_type.as_deref()),
                    self.client
                ),
            });
        }
        if !self.dpop && !set.is_bearer() && self.inject.format_is_default {
            return Err(TokenError::Unusable {
                url,
                reason: format!(
                    "token_type is {}, not Bearer; set clients.{}.inject.format to say how to send it",
                    shown_token_type(set.token_type.as_deref()),
                    self.client
                ),
            });
        }
        let lifetime = access_lifetime(&set, &self.config, &self.client).map_err(|reason| {
            TokenError::Unusable {
                url: url.clone(),
                reason,
            }
        })?;
        let injected = self
            .header_for(&set.access_token)
            .ok_or_else(|| TokenError::Unusable {
                url: url.clone(),
                reason: "the access token has characters not allowed in an HTTP header".into(),
            })?;

        let now = Instant::now();
        let wall_now = self.clock.wall_now();
        // Rotation: hold the new refresh token before anything else can run.
        let rt_lifetime = set
            .refresh_token
            .is_some()
            .then(|| refresh_token_lifetime(&set, &self.config, &self.client))
            .flatten();
        if let Some(rt) = set.refresh_token {
            self.refresh_token = Some(HeldRefreshToken {
                value: rt,
                usable_until: rt_lifetime.and_then(|l| now.checked_add(l)),
                expires_wall: rt_lifetime.map(|l| wall_after(wall_now, l)),
            });
        }
        self.access = Some(HeldAccessToken {
            value: set.access_token,
            expires_wall: lifetime.map(|l| wall_after(wall_now, l)),
            lifetime,
        });
        if let Some(trial) = &mut self.store.operator_trial {
            trial.proven = true;
        }
        if self.persist().await {
            // Another replica stored a newer token meanwhile, and it was taken instead.
            return Ok(());
        }
        self.store.operator_trial = None;
        let origin = Origin::Provider {
            trigger,
            grant,
            source: set.lifetime_source.as_str(),
        };
        // The lifetime runs from the answer, not from the end of the write
        // (up to a replica acknowledgement timeout later): the token is never
        // sent after the provider's expiry.
        let remaining = lifetime.map(|l| l.saturating_sub(now.elapsed()));
        self.publish_token(injected, remaining, lifetime, origin);
        Ok(())
    }

    /// The header value to inject for `access_token`, marked sensitive, and
    /// for a DPoP client the `ath` of its proofs.
    pub(super) fn header_for(&self, access_token: &Secret) -> Option<Injected> {
        let mut header = http::HeaderValue::from_str(&format!(
            "{}{}{}",
            self.inject.prefix,
            access_token.expose(),
            self.inject.suffix
        ))
        .ok()?;
        header.set_sensitive(true);
        let dpop_ath = self
            .dpop
            .then(|| crate::jose::access_token_hash(access_token.expose()));
        Some(Injected { header, dpop_ath })
    }

    /// Makes the token `injected` current: usable for `remaining`, refreshed
    /// ahead of that by the margin for a token of `lifetime`.
    pub(super) fn publish_token(
        &mut self,
        injected: Injected,
        remaining: Option<Duration>,
        lifetime: Option<Duration>,
        origin: Origin,
    ) {
        let now = Instant::now();
        let wall_now = self.clock.wall_now();
        self.generation += 1;
        let token = Arc::new(Token {
            generation: self.generation,
            header: injected.header,
            dpop_ath: injected.dpop_ath,
            dpop_key: None,
            usable_until: remaining.and_then(|l| now.checked_add(l)),
            installed_at: now,
        });
        self.shared.current.store(Some(Arc::clone(&token)));
        self.current = Some(token);
        let refresh_at = remaining.and_then(|r| {
            let margin = refresh_margin(lifetime.unwrap_or(r), self.config.refresh_before);
            now.checked_add(r.saturating_sub(margin))
        });
        self.schedule.plan_refresh(refresh_at);
        self.schedule.clear_backoff();
        self.schedule.clear_recheck();
        self.store.set_role(None);
        let expires_wall = remaining.map(|l| wall_after(wall_now, l));
        self.metrics
            .set_expiry(expires_wall.map(epoch_seconds).unwrap_or(f64::INFINITY));
        let next_wall =
            refresh_at.map(|at| wall_after(wall_now, at.saturating_duration_since(now)));
        let generation = self.generation;
        let last_refresh = match origin {
            Origin::Provider {
                trigger,
                grant,
                source,
            } => {
                info!(
                    client = %self.client,
                    trigger = trigger.as_str(),
                    grant,
                    generation,
                    expires_in_s = remaining.map(|l| l.as_secs()),
                    lifetime_source = source,
                    "token obtained"
                );
                Some(LastRefresh {
                    at: crate::clock::rfc3339(wall_now),
                    trigger: trigger.as_str(),
                    grant,
                    outcome: Outcome::Success.as_str(),
                    error: None,
                    app_error: None,
                })
            }
            Origin::Store {
                generation: stored_generation,
            } => {
                info!(
                    client = %self.client,
                    generation,
                    stored_generation,
                    store = self.store.client.kind(),
                    expires_in_s = remaining.map(|l| l.as_secs()),
                    "token taken from the store"
                );
                self.metrics.store_adopted();
                None
            }
        };
        let (rt_held, rt_wall) = match &self.refresh_token {
            Some(rt) => (true, rt.expires_wall),
            None => (false, None),
        };
        self.publish(|s| {
            s.state = StateCell(State::Valid);
            s.generation = generation;
            s.access_token_expires_at = expires_wall.map(rfc3339);
            s.has_refresh_token = rt_held;
            s.refresh_token_expires_at = rt_wall.map(rfc3339);
            s.next_refresh_at = next_wall.map(rfc3339);
            if let Some(lr) = last_refresh {
                s.last_refresh = Some(lr);
                s.last_success_at = Some(rfc3339(wall_now));
                s.refreshes_succeeded += 1;
            }
            s.reason = None;
            s.retry_at = None;
        });
        self.metrics.set_state(State::Valid);
        self.publish_store();
    }
}
