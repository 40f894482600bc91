//! The token-endpoint budget of one client's subjects: at most
//! `max_concurrent_token_requests` at once and `max_token_requests_per_minute`,
//! so that a herd (thousands of subjects expiring together after an outage)
//! queues here instead of hammering the provider.

use std::sync::Mutex;
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

/// A held place in the budget: one token request may be made.
pub(super) struct Spend<'a> {
    _permit: SemaphorePermit<'a>,
}

pub(super) struct Budget {
    concurrent: Semaphore,
    /// Token bucket: (tokens, last refill), refilled at `per_minute` per minute
    /// up to `per_minute / 6` (ten seconds' worth, at least one).
    bucket: Mutex<(f64, Instant)>,
    per_minute: f64,
    burst: f64,
    waiting: IntGauge,
}

impl Budget {
    pub(super) fn new(concurrent: usize, per_minute: usize, waiting: IntGauge) -> Budget {
        let per_minute = per_minute.max(1) as f64;
        let burst = (per_minute / 6.0).max(1.0);
        Budget {
            concurrent: Semaphore::new(concurrent.max(1)),
            bucket: Mutex::new((burst, Instant::now())),
            per_minute,
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
        let refill = now.duration_since(bucket.1).as_secs_f64() * self.per_minute / 60.0;
        bucket.0 = (bucket.0 + refill).min(self.burst);
        bucket.1 = now;
        if bucket.0 >= 1.0 {
            bucket.0 -= 1.0;
            Ok(())
        } else {
            let missing = 1.0 - bucket.0;
            Err(Duration::from_secs_f64(missing * 60.0 / self.per_minute))
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

    #[tokio::test(start_paused = true)]
    async fn the_rate_never_exceeds_the_budget_after_the_burst() {
        let gauge = IntGauge::new("w", "w").unwrap();
        let budget = Budget::new(100, 60, gauge);
        let started = Instant::now();
        for _ in 0..30 {
            let _spend = budget.spend().await.unwrap();
        }
        // 10 at once (ten seconds' worth), then one per second.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(19) && took <= Duration::from_secs(21),
            "30 requests at 60/min with a burst of 10 should take about 20 s, took {took:?}"
        );
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
