//! Wall-clock access behind a trait, so tests can move time.
//!
//! Scheduling (refresh deadlines, backoff, timeouts) uses `tokio::time::Instant`,
//! which tokio's paused test clock controls. Only values that must be shown or
//! compared to a provider's absolute times (`expires_at`, the expiry gauge,
//! `/status`) come from the wall clock, and always through [`Clock`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Source of wall-clock time.
pub trait Clock: Send + Sync + 'static {
    /// The current wall-clock time.
    fn wall_now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn wall_now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A wall clock that follows tokio's (possibly paused) clock from a fixed origin.
///
/// Tests that pause tokio time use it so that wall-clock values advance
/// together with `tokio::time::advance`.
#[derive(Clone, Debug)]
pub struct TokioClock {
    origin_wall: SystemTime,
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// A clock whose wall time is `origin_wall` now and advances with tokio time.
    pub fn new(origin_wall: SystemTime) -> Self {
        TokioClock {
            origin_wall,
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn wall_now(&self) -> SystemTime {
        self.origin_wall + self.origin.elapsed()
    }
}

/// Shared clock handle.
pub type SharedClock = Arc<dyn Clock>;

/// Seconds since the Unix epoch as a float, for gauges.
pub fn epoch_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

/// RFC 3339 rendering (seconds precision, UTC), for `/status`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
