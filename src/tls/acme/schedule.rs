//! When the next ACME attempt runs: the renewal time of a certificate (with a random
//! jitter, so replicas and restarts spread out), the backoff after failures (minutes,
//! then hours), and the wait that a forced renewal or shutdown cuts short.

use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::acme::AcmeConfig;

/// Waits after 1, 2, 3... consecutive failures; the last repeats.
const BACKOFF: [Duration; 8] = [
    Duration::from_secs(60),
    Duration::from_secs(2 * 60),
    Duration::from_secs(5 * 60),
    Duration::from_secs(15 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(3600),
    Duration::from_secs(3 * 3600),
    Duration::from_secs(6 * 3600),
];

/// The most a renewal is moved earlier by jitter (and never more than a twentieth of
/// the certificate's lifetime).
const MAX_RENEWAL_JITTER: Duration = Duration::from_secs(3600);

/// The wait after `failures` consecutive failed attempts (1 for the first), made up to
/// a tenth longer by `unit` (a random number in `[0, 1)`).
pub fn backoff(failures: u32, unit: f64) -> Duration {
    let index = usize::try_from(failures.saturating_sub(1)).unwrap_or(usize::MAX);
    let base = BACKOFF[index.min(BACKOFF.len() - 1)];
    base + base.mul_f64(unit.clamp(0.0, 1.0) / 10.0)
}

/// The CA's `Retry-After` wait when it is longer than the `backoff` a failure would
/// wait anyway (rate limits ask for hours; the backoff starts at a minute).
pub fn ca_wait_beyond(backoff: Duration, asked: Option<Duration>) -> Option<Duration> {
    asked.filter(|asked| *asked > backoff)
}

/// The wait after `failures` consecutive attempts that could not reach Redis to
/// coordinate (1 for the first): 2 s, doubling to a minute. Short, because nothing is
/// asked of the CA, and the instance should order as soon as Redis is back.
pub fn coordination_backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(5);
    (Duration::from_secs(2) * (1 << doublings)).min(Duration::from_secs(60))
}

/// When a certificate valid from `not_before` to `not_after` is renewed: with
/// `min(renew_before, lifetime / 3)` left, moved earlier by up to a twentieth of the
/// lifetime (at most [`MAX_RENEWAL_JITTER`]) times `unit` (random, `[0, 1)`).
pub fn renew_at(
    not_before: SystemTime,
    not_after: SystemTime,
    config: &AcmeConfig,
    unit: f64,
) -> SystemTime {
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    let jitter = (lifetime / 20)
        .min(MAX_RENEWAL_JITTER)
        .mul_f64(unit.clamp(0.0, 1.0));
    not_after
        .checked_sub(config.renew_margin(lifetime) + jitter)
        .unwrap_or(not_before)
}

/// RFC 9773 §4.2: a random time within the CA's suggested window `[start, end]`, or now
/// when the window has begun (the part already past is skipped) or ended.
pub fn ari_renew_at(start: SystemTime, end: SystemTime, now: SystemTime, unit: f64) -> SystemTime {
    if end <= now {
        return now;
    }
    let from = start.max(now);
    from + end
        .duration_since(from)
        .unwrap_or(Duration::ZERO)
        .mul_f64(unit.clamp(0.0, 1.0))
}

/// How long until the renewal information is asked again: the CA's `Retry-After`,
/// kept between an hour and a day.
pub fn ari_recheck(retry_after: Duration) -> Duration {
    retry_after.clamp(Duration::from_secs(3600), Duration::from_secs(86_400))
}

/// A random number in `[0, 1)` from the crypto provider (0 if it fails).
pub(crate) fn random_unit(provider: &CryptoProvider) -> f64 {
    let mut bytes = [0u8; 4];
    if provider.secure_random.fill(&mut bytes).is_err() {
        return 0.0;
    }
    f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0)
}

/// Why [`wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// The time came.
    Due,
    /// A renewal was requested.
    Forced,
    /// The served certificate changed (another instance shared one): schedule again.
    Rescheduled,
    /// The gateway is shutting down.
    Shutdown,
}

/// Waits `delay`, or less when a renewal is requested, the certificate changed, or
/// shutdown starts.
pub(crate) async fn wait(
    delay: Duration,
    renew: &Notify,
    rescheduled: &Notify,
    shutdown: &CancellationToken,
) -> Wake {
    tokio::select! {
        () = tokio::time::sleep(delay) => Wake::Due,
        () = renew.notified() => Wake::Forced,
        () = rescheduled.notified() => Wake::Rescheduled,
        () = shutdown.cancelled() => Wake::Shutdown,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::*;
    use crate::config::acme::{AcmeChallenge, DEFAULT_RENEW_BEFORE};

    const DAY: Duration = Duration::from_secs(86_400);

    fn config() -> AcmeConfig {
        AcmeConfig {
            email: "ops@example.com".to_owned(),
            names: vec!["example.com".to_owned()],
            directory: "https://acme.test/dir".to_owned(),
            directory_ca_file: None,
            storage: PathBuf::from("/tmp"),
            challenge: AcmeChallenge::Http01,
            renew_before: DEFAULT_RENEW_BEFORE,
        }
    }

    #[test]
    fn backoff_grows_from_minutes_to_hours_and_stays_there() {
        let waits: Vec<u64> = (1..=10).map(|n| backoff(n, 0.0).as_secs()).collect();
        assert_eq!(
            waits,
            [60, 120, 300, 900, 1800, 3600, 10_800, 21_600, 21_600, 21_600]
        );
        assert_eq!(backoff(0, 0.0), Duration::from_secs(60));
        // Jitter adds at most a tenth.
        assert_eq!(
            backoff(1, 0.999_999),
            Duration::from_secs(60) + Duration::from_secs(6).mul_f64(0.999_999)
        );
    }

    #[test]
    fn the_cas_retry_after_wins_when_longer_than_the_backoff() {
        let minute = Duration::from_secs(60);
        assert_eq!(ca_wait_beyond(minute, None), None);
        assert_eq!(ca_wait_beyond(minute, Some(Duration::from_secs(10))), None);
        assert_eq!(
            ca_wait_beyond(minute, Some(Duration::from_secs(3 * 3600))),
            Some(Duration::from_secs(3 * 3600))
        );
    }

    #[test]
    fn redis_outages_are_retried_within_seconds_then_every_minute() {
        let waits: Vec<u64> = (1..=8).map(|n| coordination_backoff(n).as_secs()).collect();
        assert_eq!(waits, [2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn renewal_is_at_the_smaller_margin_minus_bounded_jitter() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        // 90 days: renew with 30 days left; jitter at most one hour earlier.
        let end = start + 90 * DAY;
        assert_eq!(renew_at(start, end, &config(), 0.0), end - 30 * DAY);
        assert_eq!(
            renew_at(start, end, &config(), 1.0),
            end - 30 * DAY - Duration::from_secs(3600)
        );
        // 6 days: a third of the lifetime (2 days) is smaller than 30 days.
        let end = start + 6 * DAY;
        assert_eq!(renew_at(start, end, &config(), 0.0), end - 2 * DAY);
        // 60 seconds (a test CA): renew with 20 s left, jitter at most 3 s.
        let end = start + Duration::from_secs(60);
        assert_eq!(
            renew_at(start, end, &config(), 0.0),
            end - Duration::from_secs(20)
        );
        assert_eq!(
            renew_at(start, end, &config(), 1.0),
            end - Duration::from_secs(23)
        );
    }

    /// A renewalInfo response as RFC 9773 §4.2 shows it (what Let's Encrypt serves).
    const RENEWAL_INFO: &str = r#"{
        "suggestedWindow": {
            "start": "2025-01-02T04:00:00Z",
            "end": "2025-01-03T04:00:00Z"
        },
        "explanationURL": "https://acme.example.com/docs/ari"
    }"#;

    #[test]
    fn ari_picks_a_time_in_the_suggested_window() {
        let info: instant_acme::RenewalInfo = serde_json::from_str(RENEWAL_INFO).unwrap();
        let start: SystemTime = info.suggested_window.start.into();
        let end: SystemTime = info.suggested_window.end.into();
        assert_eq!(
            start,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_735_790_400)
        );
        let before = start - DAY;
        assert_eq!(ari_renew_at(start, end, before, 0.0), start);
        assert_eq!(ari_renew_at(start, end, before, 0.5), start + DAY / 2);
        // Inside the window: only what is left of it.
        let inside = start + DAY / 2;
        assert_eq!(ari_renew_at(start, end, inside, 0.5), inside + DAY / 4);
        // After it (e.g. a revocation moved it into the past): now.
        assert_eq!(ari_renew_at(start, end, end + DAY, 0.7), end + DAY);
        assert_eq!(
            ari_recheck(Duration::from_secs(21_600)),
            Duration::from_secs(21_600)
        );
        assert_eq!(
            ari_recheck(Duration::from_secs(5)),
            Duration::from_secs(3600)
        );
        assert_eq!(ari_recheck(7 * DAY), DAY);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_ends_when_due_unless_renewal_or_shutdown_comes_first() {
        let renew = Arc::new(Notify::new());
        let rescheduled = Notify::new();
        let shutdown = CancellationToken::new();

        let started = tokio::time::Instant::now();
        let wake = wait(backoff(3, 0.5), &renew, &rescheduled, &shutdown).await;
        assert_eq!(wake, Wake::Due);
        assert_eq!(started.elapsed(), Duration::from_secs(315));

        let started = tokio::time::Instant::now();
        let trigger = renew.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(42)).await;
            trigger.notify_one();
        });
        let wake = wait(backoff(8, 0.0), &renew, &rescheduled, &shutdown).await;
        assert_eq!(wake, Wake::Forced);
        assert_eq!(started.elapsed(), Duration::from_secs(42));

        rescheduled.notify_one();
        assert_eq!(
            wait(DAY, &renew, &rescheduled, &shutdown).await,
            Wake::Rescheduled
        );

        shutdown.cancel();
        assert_eq!(
            wait(DAY, &renew, &rescheduled, &shutdown).await,
            Wake::Shutdown
        );
    }
}
