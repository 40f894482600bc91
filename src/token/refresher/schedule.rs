//! When the refresher wakes up on its own: one [`Schedule`] holds every
//! planned wake-up, and [`Schedule::next`] says which comes first and why.
//!
//! The refresher owns it. The store link never writes it: where the store
//! side decides a wake-up it returns a [`StorePlan`], which the refresher
//! applies.

use std::time::Duration;

use tokio::time::Instant;

use crate::token::{Token, Trigger};

/// Backoff after the first failure; doubles per failure up to [`BACKOFF_MAX`].
const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Longest backoff between failed token requests.
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Longest wait a provider's `Retry-After` can impose.
pub(super) const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);

/// Why the refresher wakes up on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Wake {
    /// Time to obtain a token.
    Refresh(Trigger),
    /// State the store has not taken yet is to be written again.
    WriteBack,
    /// In `needs_authorization`: look for a refresh token stored by another process.
    CheckStore,
}

/// A wake-up the store side decided on, for the refresher's [`Schedule`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a store decision does nothing until the schedule applies it"]
pub(super) enum StorePlan {
    /// Look at the store again then (following another replica, waiting for
    /// the store to answer, or for a locked record to change).
    Recheck(Instant),
    /// No look at the store is due.
    NoRecheck,
    /// Write the state the store has not taken again then.
    WriteBack(Instant),
    /// The store holds the newest state: nothing to write back.
    Written,
}

/// Every wake-up the refresher has planned.
///
/// A planned look at the store comes before a backoff, and a backoff before
/// the proactive refresh: while following another replica or waiting for the
/// store, the store decides; while backing off, the provider is not asked.
#[derive(Debug, Default)]
pub(super) struct Schedule {
    /// The proactive refresh: the margin before the current token expires.
    refresh_at: Option<Instant>,
    /// The end of the backoff after failed token requests.
    retry_at: Option<Instant>,
    /// Failed token requests in a row.
    failures: u32,
    /// The next look at the store (following, store down, record locked).
    recheck_at: Option<Instant>,
    /// The next attempt to write back state the store has not taken.
    write_back_at: Option<Instant>,
    /// In `needs_authorization`: the next look for a new refresh token.
    store_check_at: Option<Instant>,
}

impl Schedule {
    /// The first wake-up due and why. `needs_authorization`: only the current
    /// token's expiry (to update the state) and the store check wake it, besides
    /// a write back.
    pub(super) fn next(
        &self,
        needs_authorization: bool,
        current: Option<&Token>,
        now: Instant,
    ) -> Option<(Instant, Wake)> {
        let usable = current.filter(|t| t.is_usable(now));
        let refresh = if needs_authorization {
            let expiry = usable
                .and_then(|t| t.usable_until)
                .map(|at| (at, Wake::Refresh(Trigger::Expired)));
            let check = self.store_check_at.map(|at| (at, Wake::CheckStore));
            earliest([expiry, check])
        } else {
            let trigger = if usable.is_some() {
                Trigger::Proactive
            } else {
                Trigger::Expired
            };
            match self.recheck_at.or(self.retry_at) {
                Some(at) => Some((at, Wake::Refresh(trigger))),
                None => self
                    .refresh_at
                    .map(|at| (at, Wake::Refresh(Trigger::Proactive))),
            }
        };
        let write_back = self.write_back_at.map(|at| (at, Wake::WriteBack));
        earliest([refresh, write_back])
    }

    /// Plans the proactive refresh (or none, for a token that never expires).
    pub(super) fn plan_refresh(&mut self, at: Option<Instant>) {
        self.refresh_at = at;
    }

    /// The planned proactive refresh.
    pub(super) fn refresh_at(&self) -> Option<Instant> {
        self.refresh_at
    }

    /// Counts a failed token request and plans the retry after a backoff
    /// (see [`backoff_delay`]); returns the delay.
    pub(super) fn back_off(&mut self, retry_after: Option<Duration>, now: Instant) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let delay = backoff_delay(self.failures, retry_after);
        self.retry_at = Some(now + delay);
        delay
    }

    /// Continues a predecessor's schedule (a reload): its failures, its
    /// backoff while that runs (a provider's `Retry-After` holds across the
    /// reload too), and its proactive refresh when its token is kept. The
    /// store's wake-ups are planned again from the store's handover.
    pub(super) fn continue_from(&mut self, previous: &Schedule, now: Instant, token_kept: bool) {
        self.failures = previous.failures;
        self.retry_at = previous.retry_at.filter(|at| *at > now);
        if token_kept {
            self.refresh_at = previous.refresh_at;
        }
    }

    /// A token came (or an operator acted): no failures, no backoff.
    pub(super) fn clear_backoff(&mut self) {
        self.failures = 0;
        self.retry_at = None;
    }

    /// The end of the backoff, if one is planned.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Whether a backoff runs past `now`.
    pub(super) fn backing_off(&self, now: Instant) -> bool {
        self.retry_at.is_some_and(|at| at > now)
    }

    /// Failed token requests in a row.
    pub(super) fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether a look at the store is planned.
    pub(super) fn recheck_planned(&self) -> bool {
        self.recheck_at.is_some()
    }

    /// Whether a look at the store is planned after `now`.
    pub(super) fn recheck_after(&self, now: Instant) -> bool {
        self.recheck_at.is_some_and(|at| at > now)
    }

    /// Plans a look at the store for a new refresh token (`needs_authorization`).
    pub(super) fn plan_store_check(&mut self, at: Instant) {
        self.store_check_at = Some(at);
    }

    /// No more looks for a new refresh token.
    pub(super) fn clear_store_check(&mut self) {
        self.store_check_at = None;
    }

    /// No write back is due.
    pub(super) fn clear_write_back(&mut self) {
        self.write_back_at = None;
    }

    /// No look at the store is due.
    pub(super) fn clear_recheck(&mut self) {
        self.recheck_at = None;
    }

    /// Applies what the store side decided.
    pub(super) fn apply(&mut self, plan: StorePlan) {
        match plan {
            StorePlan::Recheck(at) => self.recheck_at = Some(at),
            StorePlan::NoRecheck => self.recheck_at = None,
            StorePlan::WriteBack(at) => self.write_back_at = Some(at),
            StorePlan::Written => self.write_back_at = None,
        }
    }
}

/// The earliest of the planned wake-ups; the first listed among equals.
fn earliest<const N: usize>(wakes: [Option<(Instant, Wake)>; N]) -> Option<(Instant, Wake)> {
    wakes.into_iter().flatten().min_by_key(|w| w.0)
}

/// Sleeps until `at`; forever when nothing is planned.
pub(super) async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How far ahead of expiry to refresh: `refresh_before`, or by default the
/// smaller of 60 s and 10 % of the lifetime; never under 1 s, never over half
/// the lifetime (so a short token is not refreshed the moment it arrives).
pub(crate) fn refresh_margin(lifetime: Duration, configured: Option<Duration>) -> Duration {
    let margin = configured
        .unwrap_or_else(|| (lifetime / 10).min(Duration::from_secs(60)))
        .max(Duration::from_secs(1));
    margin.min(lifetime / 2)
}

/// Exponential backoff with jitter: uniform in [d/2, d] where d doubles per
/// failure from 1 s to 60 s; a provider's `Retry-After` (up to 5 min) is a floor.
pub(crate) fn backoff_delay(failures: u32, retry_after: Option<Duration>) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let ceiling = BACKOFF_BASE.saturating_mul(1u32 << exp).min(BACKOFF_MAX);
    let half = ceiling / 2;
    let jitter = half.mul_f64(fastrand::f64());
    let delay = half + jitter;
    match retry_after {
        Some(ra) => delay.max(ra.min(RETRY_AFTER_MAX)),
        None => delay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_margin_is_ten_percent_capped_at_a_minute_and_at_least_a_second() {
        assert_eq!(
            refresh_margin(Duration::from_secs(900), None),
            Duration::from_secs(60)
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(300), None),
            Duration::from_secs(30)
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(3), None),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn margin_never_exceeds_half_the_lifetime() {
        assert_eq!(
            refresh_margin(Duration::from_secs(10), Some(Duration::from_secs(60))),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        for _ in 0..100 {
            let first = backoff_delay(1, None);
            assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1));
            let third = backoff_delay(3, None);
            assert!(third >= Duration::from_secs(2) && third <= Duration::from_secs(4));
            let many = backoff_delay(50, None);
            assert!(many >= Duration::from_secs(30) && many <= Duration::from_secs(60));
        }
    }

    fn token_until(until: Option<Instant>) -> Token {
        Token {
            generation: 1,
            header: http::HeaderValue::from_static("Bearer t"),
            dpop_ath: None,
            dpop_key: None,
            usable_until: until,
            installed_at: Instant::now(),
        }
    }

    /// A planned look at the store comes before a backoff, a backoff before
    /// the proactive refresh, whichever is earlier; a write back wakes on its own.
    #[tokio::test(start_paused = true)]
    async fn the_store_decides_before_a_backoff_and_a_backoff_before_the_refresh() {
        let now = Instant::now();
        let at = |s: u64| now + Duration::from_secs(s);
        let token = token_until(Some(at(100)));
        let mut schedule = Schedule::default();
        assert_eq!(
            schedule.next(false, Some(&token), now),
            None,
            "nothing planned"
        );
        schedule.plan_refresh(Some(at(90)));
        assert_eq!(
            schedule.next(false, Some(&token), now),
            Some((at(90), Wake::Refresh(Trigger::Proactive)))
        );
        let delay = schedule.back_off(Some(Duration::from_secs(120)), now);
        assert_eq!(delay, Duration::from_secs(120), "Retry-After is a floor");
        assert_eq!(
            schedule.next(false, Some(&token), now),
            Some((at(120), Wake::Refresh(Trigger::Proactive))),
            "a backoff holds back even an earlier proactive refresh"
        );
        schedule.apply(StorePlan::Recheck(at(200)));
        assert_eq!(
            schedule.next(false, None, now),
            Some((at(200), Wake::Refresh(Trigger::Expired))),
            "a planned look at the store decides; without a token it is an expired trigger"
        );
        schedule.apply(StorePlan::WriteBack(at(5)));
        assert_eq!(
            schedule.next(false, Some(&token), now),
            Some((at(5), Wake::WriteBack))
        );
        schedule.apply(StorePlan::Written);
        schedule.apply(StorePlan::NoRecheck);
        schedule.clear_backoff();
        assert_eq!(
            schedule.next(false, Some(&token), now),
            Some((at(90), Wake::Refresh(Trigger::Proactive)))
        );
    }

    /// In `needs_authorization` only the token's expiry and the store check wake it.
    #[tokio::test(start_paused = true)]
    async fn needs_authorization_wakes_for_expiry_and_the_store_check_only() {
        let now = Instant::now();
        let at = |s: u64| now + Duration::from_secs(s);
        let mut schedule = Schedule::default();
        schedule.plan_refresh(Some(at(10)));
        schedule.back_off(None, now);
        let token = token_until(Some(at(30)));
        assert_eq!(
            schedule.next(true, Some(&token), now),
            Some((at(30), Wake::Refresh(Trigger::Expired)))
        );
        schedule.plan_store_check(at(2));
        assert_eq!(
            schedule.next(true, Some(&token), now),
            Some((at(2), Wake::CheckStore))
        );
        schedule.clear_store_check();
        assert_eq!(schedule.next(true, None, now), None);
    }

    #[test]
    fn retry_after_is_a_floor_but_bounded() {
        assert_eq!(
            backoff_delay(1, Some(Duration::from_secs(20))),
            Duration::from_secs(20)
        );
        assert_eq!(
            backoff_delay(1, Some(Duration::from_secs(100_000))),
            RETRY_AFTER_MAX
        );
    }
}
