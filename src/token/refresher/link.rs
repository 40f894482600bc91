//! The refresher's record of where it stands with the token store: the
//! generation its state matches, the lease, a pending write, the role shown
//! in `/status`. It plans no wake-ups itself: where it decides one, it returns
//! a [`StorePlan`] for the refresher's schedule.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::{HeldRefreshToken, StorePlan};
use crate::store::{ClientStore, Lease};

/// How often a follower looks at the record while another replica refreshes.
pub(super) const FOLLOW_POLL: Duration = Duration::from_millis(100);
/// How often an unreachable store is tried again while the token is still good.
pub(super) const STORE_RETRY: Duration = Duration::from_secs(1);
/// Longest wait between attempts to write back state the store has not taken.
pub(super) const WRITE_BACK_MAX: Duration = Duration::from_secs(5);
/// How often a state holding a refresh token the store has not taken is
/// written again: the refresh token in the store is spent, and until the new
/// one is there another replica could send the spent one.
pub(super) const WRITE_BACK_ROTATED: Duration = Duration::from_millis(200);
/// After the shared store answers again, how long a replica with nothing to
/// write back leaves the lease to others: a leader whose write was lost in the
/// outage (or a failover) writes its rotated refresh token back within this,
/// and the others take it instead of spending the old one.
pub(super) const RETURN_GRACE: Duration = Duration::from_secs(1);
/// How often a client in `needs_authorization` looks for a new refresh token.
pub(super) const AUTHORIZATION_POLL: Duration = Duration::from_secs(2);
/// How often a client whose stored record does not open looks at it again.
pub(super) const LOCKED_POLL: Duration = Duration::from_secs(2);
/// How much longer than `token.timeout` a lease lasts: the leader's request is
/// over (answered or timed out) well before another replica may take over.
pub(super) const LEASE_SLACK: Duration = Duration::from_secs(2);

/// The refresher's store state.
pub(super) struct StoreLink {
    pub(super) client: ClientStore,
    /// The generation of the stored record this process's state matches.
    pub(super) generation: u64,
    /// The highest generation seen in the store, including ignored records.
    pub(super) seen: u64,
    /// A lease kept through a backoff, so the retry needs no new one.
    pub(super) lease: Option<Lease>,
    /// The store has not taken the newest state yet.
    pub(super) write_pending: bool,
    /// Failed writes in a row, for the write-back delay.
    pub(super) write_back_failures: u32,
    /// Another replica refreshes; the refresher looks at the record again.
    pub(super) following: bool,
    pub(super) available: bool,
    /// Since when the store has not answered.
    pub(super) unavailable_since: Option<SystemTime>,
    /// When the store last answered again after an outage.
    pub(super) answered_again_at: Option<Instant>,
    pub(super) error: Option<String>,
    pub(super) role: Option<&'static str>,
    /// While the stored record does not open: what is wrong and what to do.
    pub(super) locked: Option<String>,
    /// The refresh token came from an operator: use it, do not take the stored one.
    pub(super) operator_trial: Option<OperatorTrial>,
    /// A refresh token this process sent got no answer it could use: the
    /// provider may have spent it, so this process's spending mark stays
    /// when it gives the lease back.
    pub(super) unsettled: bool,
    /// Since when the refresh token held is the stored one under another
    /// process's spending mark (following, waiting for that one's answer).
    pub(super) spent_elsewhere_since: Option<Instant>,
    /// In `needs_authorization` because of such a mark: it ends when the mark
    /// is removed, too.
    pub(super) blocked_by_mark: bool,
}

/// An operator's refresh token on trial: it is used, but it neither replaces
/// the stored chain nor the previous refresh token until the provider has
/// accepted it, so a mistyped or hostile token cannot destroy a working grant.
pub(super) struct OperatorTrial {
    /// The refresh token held before, restored if the provider rejects the new one.
    pub(super) previous: Option<HeldRefreshToken>,
    /// Whether the client was in `needs_authorization` before.
    pub(super) needs_authorization: bool,
    /// The provider accepted it; the state it produced may be stored.
    pub(super) proven: bool,
}

/// Where a stopping refresher stood with the store, for its successor: the
/// generation its state matches (so an older record is never adopted over the
/// newer state in memory), and whether that state still has to be written.
pub(super) struct StoreHandover {
    pub(super) generation: u64,
    pub(super) seen: u64,
    pub(super) write_pending: bool,
    pub(super) operator_trial: Option<OperatorTrial>,
    pub(super) unsettled: bool,
}

impl StoreLink {
    pub(super) fn into_handover(self) -> StoreHandover {
        StoreHandover {
            generation: self.generation,
            seen: self.seen,
            write_pending: self.write_pending,
            operator_trial: self.operator_trial,
            unsettled: self.unsettled,
        }
    }

    /// Continues from a predecessor's store state; a write it left pending
    /// is to be done at once.
    pub(super) fn take_over(&mut self, h: StoreHandover, now: Instant) -> Option<StorePlan> {
        self.generation = h.generation;
        self.seen = h.seen;
        self.operator_trial = h.operator_trial;
        self.unsettled = h.unsettled;
        if h.write_pending && self.client.is_persistent() {
            self.write_pending = true;
            return Some(StorePlan::WriteBack(now));
        }
        None
    }

    pub(super) fn new(client: ClientStore) -> StoreLink {
        StoreLink {
            client,
            generation: 0,
            seen: 0,
            lease: None,
            write_pending: false,
            write_back_failures: 0,
            following: false,
            available: true,
            unavailable_since: None,
            answered_again_at: None,
            error: None,
            role: None,
            locked: None,
            operator_trial: None,
            unsettled: false,
            spent_elsewhere_since: None,
            blocked_by_mark: false,
        }
    }

    /// After a token request: whether the answer to it is known. `None`: no
    /// refresh token was sent (not connected), nothing changes.
    pub(super) fn settle(&mut self, settled: Option<bool>) {
        if let Some(settled) = settled {
            self.unsettled = !settled;
        }
    }

    /// Another replica refreshes: look at the record again shortly.
    pub(super) fn follow(&mut self, now: Instant) -> StorePlan {
        self.following = true;
        self.role = Some("follower");
        StorePlan::Recheck(now + FOLLOW_POLL)
    }

    /// No longer following or waiting: the refresher decides again.
    pub(super) fn stop_following(&mut self) -> StorePlan {
        self.following = false;
        self.role = None;
        StorePlan::NoRecheck
    }

    /// The stored record does not open: nothing is spent until it changes,
    /// and it is looked at again shortly.
    pub(super) fn lock(&mut self, problem: String, now: Instant) -> StorePlan {
        self.following = false;
        self.role = Some("locked");
        self.locked = Some(problem);
        StorePlan::Recheck(now + LOCKED_POLL)
    }

    /// The stored record opens (again); `None` when it was not locked.
    pub(super) fn unlock(&mut self) -> Option<StorePlan> {
        self.locked.take()?;
        self.role = None;
        Some(StorePlan::NoRecheck)
    }

    /// The store took the state at `generation`.
    pub(super) fn written(&mut self, generation: u64) -> StorePlan {
        self.generation = generation;
        self.seen = generation;
        self.write_pending = false;
        self.write_back_failures = 0;
        StorePlan::Written
    }

    /// A newer stored state was taken instead of writing ours.
    pub(super) fn superseded(&mut self) -> StorePlan {
        self.write_pending = false;
        StorePlan::Written
    }

    /// The store did not take the state: write it again later, soon when a
    /// rotated refresh token is at stake in a shared store (until it is there,
    /// another replica could send the spent one), else after a growing delay.
    pub(super) fn write_failed(&mut self, rotated_at_stake: bool, now: Instant) -> StorePlan {
        self.write_pending = true;
        self.write_back_failures = self.write_back_failures.saturating_add(1);
        let delay = if rotated_at_stake {
            WRITE_BACK_ROTATED
        } else {
            (STORE_RETRY * self.write_back_failures).min(WRITE_BACK_MAX)
        };
        StorePlan::WriteBack(now + delay)
    }

    pub(super) fn set_role(&mut self, role: Option<&'static str>) {
        self.role = role;
        if role.is_none() {
            self.following = false;
        }
    }

    pub(super) fn lease_ttl(config: &crate::config::TokenConfig) -> Duration {
        config.timeout + LEASE_SLACK
    }
}
