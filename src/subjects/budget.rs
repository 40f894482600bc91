//! The token-endpoint budget of one client's subjects: at most
//! `max_concurrent_token_requests` at once and `max_token_requests_per_minute`
//! in any 60 seconds, so that a herd (thousands of subjects expiring together
//! after an outage) queues here instead of hammering the provider.
//!
//! The rate is a token bucket of one request refilled at the budget's pace
//! (`per_minute` / 60 per second): requests leave at least 60 / `per_minute`
//! seconds apart once the one in the bucket is spent, so no 60-second window
//! holds more than the budget.

use std::sync::Mutex;
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

/// A held place in the budget: one token request may be made.
pub(crate) struct Spend<'a> {
    _permit: SemaphorePermit<'a>,
}

pub(super) struct Budget {
    concurrent: Semaphore,
    /// Token bucket: (tokens, last refill), refilled at `refill` per second up
    /// to `burst`.
    bucket: Mutex<(f64, Instant)>,
    refill: f64,
    burst: f64,
    waiting: IntGauge,
}

impl Budget {
    pub(super) fn new(concurrent: usize, per_minute: usize, waiting: IntGauge) -> Budget {
        let per_minute = per_minute.max(1) as f64;
        let burst = 1.0;
        let refill = per_minute / 60.0;
        Budget {
            concurrent: Semaphore::new(concurrent.max(1)),
            bucket: Mutex::new((burst, Instant::now())),
            refill,
            burst,
            waiting,
        }
    }

    /// Waits for a place in the budget; `None` when the budget is closed.
    pub(super) async fn spend(&self) -> Option<Spend<'_>> {
        self.waiting.inc();
        let _waiting = Waiting(&self.waiting);
        let permit = self.concurrent.acquire().await.ok()?;
        loop {
            match self.take_token() {
                Ok(()) => return Some(Spend { _permit: permit }),
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// Takes one request from the bucket, or says how long until one is there.
    fn take_token(&self) -> Result<(), Duration> {
        let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(bucket.1).as_secs_f64() * self.refill;
        bucket.0 = (bucket.0 + refill).min(self.burst);
        bucket.1 = now;
        if bucket.0 >= 1.0 {
            bucket.0 -= 1.0;
            Ok(())
        } else {
            let missing = 1.0 - bucket.0;
            Err(Duration::from_secs_f64(missing / self.refill))
        }
    }
}

struct Waiting<'a>(&'a IntGauge);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spends as fast as the budget allows for `secs` seconds and returns when
    /// each request left.
    async fn spend_for(budget: &Budget, secs: u64) -> Vec<Duration> {
        let started = Instant::now();
        let mut at = Vec::new();
        while started.elapsed() < Duration::from_secs(secs) {
            let _spend = budget.spend().await.unwrap();
            at.push(started.elapsed());
        }
        at
    }

    /// The most requests in any `window` of `at`.
    fn busiest(at: &[Duration], window: Duration) -> usize {
        (0..at.len())
            .map(|i| at[i..].iter().take_while(|t| **t < at[i] + window).count())
            .max()
            .unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn no_60_second_window_holds_more_than_the_budget() {
        for per_minute in [1, 7, 60, 600, 6000] {
            let budget = Budget::new(1000, per_minute, IntGauge::new("w", "w").unwrap());
            let at = spend_for(&budget, 300).await;
            let most = busiest(&at, Duration::from_secs(60));
            assert!(
                most <= per_minute,
                "{per_minute}/min: {most} requests in one 60 s window"
            );
            assert!(
                at.len() as f64 >= per_minute as f64 * 5.0 * 0.95,
                "{per_minute}/min: only {} requests in 5 minutes",
                at.len()
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_is_bounded_and_waiters_are_counted() {
        let gauge = IntGauge::new("w", "w").unwrap();
        let budget = std::sync::Arc::new(Budget::new(2, 6000, gauge.clone()));
        let a = budget.spend().await.unwrap();
        let _b = budget.spend().await.unwrap();
        let waiter = {
            let budget = std::sync::Arc::clone(&budget);
            tokio::spawn(async move {
                let _c = budget.spend().await;
            })
        };
        tokio::task::yield_now().await;
        assert_eq!(gauge.get(), 1, "the third request waits for a place");
        assert!(!waiter.is_finished());
        drop(a);
        waiter.await.unwrap();
        assert_eq!(gauge.get(), 0);
    }
}
