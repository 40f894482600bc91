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
