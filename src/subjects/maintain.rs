//! The background work of one client's subjects: renew active subjects ahead
//! of expiry, drop idle tokens from memory, write records the store did not
//! take, publish the subject counts, and sweep idle subjects whose refresh
//! token must be renewed (`refresh_every`, refresh-token expiry), within the
//! client's token-endpoint budget and, with a shared store, on one replica at
//! a time (the sweeper holds a lease).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info};

use super::{Inner, Subjects};
use crate::metrics::Trigger;
use crate::store::SubjectStatus;

/// How often active subjects are looked at.
const TICK: Duration = Duration::from_secs(1);
/// How often the subject counts are published.
const COUNT_EVERY: Duration = Duration::from_secs(15);
/// How often the sweeper looks for subjects due, at most: with a short
/// `refresh_every`, four times per period.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// How long the sweeper's lease lasts: a replica that dies while it sweeps
/// hands the sweep to another one after this long.
const SWEEP_LEASE: Duration = Duration::from_secs(600);
/// How long a subject whose sweep failed is left out of the next sweeps.
const SWEEP_PAUSE: Duration = Duration::from_secs(60);
/// The lease name of the sweeper: not a valid subject id, so never a subject's.
const SWEEPER: &str = "#sweeper";

/// Runs until aborted (reload, shutdown). The sweeper runs in a task of its
/// own (a long sweep must not hold up the renewal of active subjects), which
/// ends with this one.
pub async fn maintain(subjects: Subjects) {
    let inner = subjects.inner;
    let sweep_every = inner
        .config
        .refresh_every
        .map_or(SWEEP_EVERY, |every| (every / 4).clamp(TICK, SWEEP_EVERY));
    let _sweeper = AbortOnDrop(tokio::spawn(sweep_loop(Arc::clone(&inner), sweep_every)));
    let mut last_count: Option<Instant> = None;
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let now = Instant::now();
        inner.renew_active(now);
        if !inner.pending.is_empty() {
            inner.write_pending().await;
        }
        if last_count.is_none_or(|t| now.duration_since(t) >= COUNT_EVERY) {
            last_count = Some(now);
            inner.publish_counts().await;
        }
    }
}

async fn sweep_loop(inner: Arc<Inner>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        inner.sweep().await;
    }
}

/// Aborts the task when dropped (its owner was aborted or ended).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Inner {
    /// Starts a background refresh of every active subject whose token is
    /// due, and drops tokens of subjects that are no longer used.
    fn renew_active(self: &Arc<Self>, now: Instant) {
        let now_ms = self.now_ms(now);
        let window = self.config.active_window.as_millis() as u64;
        let mut due = Vec::new();
        let mut idle = Vec::new();
        for entry in self.cache.iter() {
            let cached = entry.value();
            let active = now_ms.saturating_sub(cached.last_used.load(Ordering::Relaxed)) <= window;
            if active && cached.refresh_at.is_some_and(|at| at <= now) {
                due.push(entry.key().clone());
            } else if !active && !cached.token.is_usable(now) {
                idle.push(entry.key().clone());
            }
        }
        for subject in idle {
            self.cache
                .remove_if(&subject, |_, c| !c.token.is_usable(now));
        }
        for subject in due {
            if !self.flights.contains_key(&subject) && !self.backing_off(&subject, now) {
                drop(Inner::flight(self, &subject, Trigger::Proactive, None));
            }
        }
    }

    /// Publishes `tokenproxy_subjects{state}` (and keeps the counts for `/status`).
    async fn publish_counts(&self) {
        let now = Instant::now();
        let valid_in_memory = self
            .cache
            .iter()
            .filter(|e| e.value().token.is_usable(now))
            .count() as u64;
        let refreshing = self.flights.len() as u64;
        let mut counts = vec![("valid", valid_in_memory), ("refreshing", refreshing)];
        match self.store.count().await {
            Ok(stored) => {
                let stored_valid = stored.get(&SubjectStatus::Valid).copied().unwrap_or(0);
                let dead = stored
                    .get(&SubjectStatus::NeedsAuthorization)
                    .copied()
                    .unwrap_or(0);
                counts.push(("idle", stored_valid.saturating_sub(valid_in_memory)));
                counts.push(("needs_authorization", dead));
            }
            Err(e) => debug!(client = %self.client, error = %e, "cannot count the subjects"),
        }
        for (state, n) in &counts {
            self.metrics.set_subjects(state, *n);
        }
        *self.counts.lock().unwrap_or_else(|p| p.into_inner()) = counts;
    }

    /// Renews idle subjects that are due, a batch at a time, within the budget.
    pub(super) async fn sweep(self: &Arc<Self>) {
        let lease = match self.store.try_lease(SWEEPER, SWEEP_LEASE).await {
            Ok(Some(lease)) => lease,
            Ok(None) => return,
            Err(e) => {
                debug!(client = %self.client, error = %e, "the sweeper cannot reach the store");
                return;
            }
        };
        // Batches as large as the budget's concurrency: a request whose subject
        // needs a token waits behind one batch at most.
        let batch_size = self.config.max_concurrent_token_requests.max(1);
        let mut swept = 0usize;
        let mut outcomes: BTreeMap<&'static str, usize> = BTreeMap::new();
        loop {
            let now = Instant::now();
            self.sweep_skip.retain(|_, until| *until > now);
            // Subjects whose last sweep failed stay due (their record is
            // unchanged), but wait out a pause so that they do not hold up the
            // others: ask for as many more as are paused, and leave them out.
            let wanted = batch_size + self.sweep_skip.len();
            let due = match self.store.due(self.clock.wall_now(), wanted).await {
                Ok(due) => due,
                Err(e) => {
                    debug!(client = %self.client, error = %e, "the sweeper cannot read the store");
                    break;
                }
            };
            let listed = due.len();
            let due: Vec<String> = due
                .into_iter()
                .filter(|s| !self.sweep_skip.contains_key(s))
                .take(batch_size)
                .collect();
            if due.is_empty() {
                break;
            }
            let batch = due.len();
            let mut flights = Vec::with_capacity(batch);
            for subject in &due {
                flights.push(Inner::flight(self, subject, Trigger::Sweep, None));
            }
            for (subject, mut flight) in due.iter().zip(flights) {
                let outcome = match flight.wait_for(Option::is_some).await {
                    Ok(result) => match result.as_ref() {
                        Some(Ok(_)) => "renewed",
                        Some(Err(super::SubjectError::NeedsAuthorization { .. })) => {
                            "needs_authorization"
                        }
                        _ => "failed",
                    },
                    Err(_) => "failed",
                };
                if outcome == "failed" {
                    self.sweep_skip
                        .insert(subject.clone(), Instant::now() + SWEEP_PAUSE);
                }
                *outcomes.entry(outcome).or_default() += 1;
            }
            swept += batch;
            if listed < wanted {
                break;
            }
        }
        if let Err(e) = self.store.release(SWEEPER, lease).await {
            debug!(client = %self.client, error = %e, "releasing the sweeper's lease failed");
        }
        if swept > 0 {
            info!(client = %self.client, swept, outcomes = ?outcomes, "idle subjects renewed");
        }
    }
}
