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

/// The last second RFC 3339 can write (9999-12-31T23:59:59Z).
const LAST_RFC3339_SECOND: Duration = Duration::from_secs(253_402_300_799);

/// RFC 3339 rendering (seconds precision, UTC), for `/status`.
///
/// Times before 1970 or after the year 9999 are shown as those bounds: the formatter
/// cannot write them, and a panic here would kill the task that asked.
pub fn rfc3339(t: SystemTime) -> String {
    let last = SystemTime::UNIX_EPOCH + LAST_RFC3339_SECOND;
    humantime::format_rfc3339_seconds(t.clamp(SystemTime::UNIX_EPOCH, last)).to_string()
}

/// `t + d`, or the latest time the formatter can show when that is later (or overflows).
pub fn wall_after(t: SystemTime, d: Duration) -> SystemTime {
    let last = SystemTime::UNIX_EPOCH + LAST_RFC3339_SECOND;
    t.checked_add(d).map_or(last, |later| later.min(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Security review (low): formatting a far-future or pre-epoch time must not panic.
    #[test]
    fn times_outside_what_rfc3339_can_write_are_clamped_not_a_panic() {
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000 * 366 * 24 * 3600);
        assert_eq!(rfc3339(far), "9999-12-31T23:59:59Z");
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(rfc3339(before), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            "2023-11-14T22:13:20Z"
        );
        assert_eq!(
            wall_after(far, Duration::MAX),
            SystemTime::UNIX_EPOCH + LAST_RFC3339_SECOND
        );
    }
}
