//! Lock-free time stamps shared between tasks: an upstream's "skip until", a tunnel's
//! last activity, Redis's last good answer. Kept as milliseconds since a fixed start in
//! one atomic, so the hot path pays a relaxed store instead of a lock or a timer reset.
//! Uses tokio's clock, so tests with a paused clock see the same time. Also the one way
//! durations are written in logs and reports ([`millis`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// `duration` in milliseconds with microsecond precision, for logs and JSON reports:
/// `172.53`, never `172.53000000000002` (whole microseconds divided once are printed in
/// their shortest form).
#[allow(clippy::cast_precision_loss)]
pub fn millis(duration: Duration) -> f64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX) as f64 / 1000.0
}

/// `duration` in whole milliseconds, as a number (not a string) in JSON logs.
pub fn whole_millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

const MAX_MILLIS: u64 = 30 * 365 * 24 * 3600 * 1000;

/// An [`Instant`] that many tasks read and update at once (millisecond resolution).
#[derive(Debug)]
pub struct AtomicInstant {
    start: Instant,
    millis: AtomicU64,
}

impl AtomicInstant {
    /// A time stamp holding now.
    pub fn now() -> AtomicInstant {
        AtomicInstant {
            start: Instant::now(),
            millis: AtomicU64::new(0),
        }
    }

    /// The stored instant.
    pub fn get(&self) -> Instant {
        self.start + Duration::from_millis(self.millis.load(Ordering::Relaxed))
    }

    /// Stores `at` (instants before the start are stored as the start, beyond about 30
    /// years as 30 years: "never" in practice, and within `Instant`'s range).
    pub fn set(&self, at: Instant) {
        let millis = u64::try_from(at.saturating_duration_since(self.start).as_millis())
            .unwrap_or(u64::MAX)
            .min(MAX_MILLIS);
        // Read first: a stamp shared by many tasks is written at most once a millisecond.
        if self.millis.load(Ordering::Relaxed) != millis {
            self.millis.store(millis, Ordering::Relaxed);
        }
    }

    /// Stores the current time.
    pub fn set_now(&self) {
        self.set(Instant::now());
    }

    /// Time since the stored instant (zero if it lies in the future).
    pub fn elapsed(&self) -> Duration {
        Instant::now().saturating_duration_since(self.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn follows_the_paused_clock() {
        let stamp = AtomicInstant::now();
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(stamp.elapsed(), Duration::from_secs(3));
        stamp.set_now();
        assert_eq!(stamp.elapsed(), Duration::ZERO);
        stamp.set(Instant::now() + Duration::from_secs(5));
        assert!(stamp.get() > Instant::now());
        assert_eq!(stamp.elapsed(), Duration::ZERO);
    }
}
