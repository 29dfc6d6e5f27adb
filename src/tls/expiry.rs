//! Certificate expiry: the one place that turns a `notAfter` into seconds and days left and
//! an ok / expiring soon / expired verdict ([`expiry`]), and the daily task that warns
//! about served certificates nearing their end ([`warn_daily`]).
//!
//! Startup, `gatehouse check` and reloads warn through the load report; certificates are
//! often renewed late or not at all after that, so a long-running gateway repeats the
//! warning once a day.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::CertStore;

/// Interval of the expiry warning.
const WARN_EVERY: Duration = Duration::from_secs(24 * 60 * 60);

const SECONDS_PER_DAY: i64 = 86_400;

/// How much life a certificate has left at some moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    /// Seconds until `notAfter`; negative once expired.
    pub seconds_left: i64,
    /// Whole days until `notAfter`, rounded down (so -1 as soon as it has expired).
    pub days_left: i64,
    /// The verdict.
    pub state: ExpiryState,
}

/// Whether a certificate is fine, should be renewed, or is refused by clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryState {
    /// At least `warning_days` left.
    Ok,
    /// Still valid, but fewer than `warning_days` whole days left.
    ExpiringSoon,
    /// Past `notAfter`.
    Expired,
}

/// The life left at `now` in a certificate valid until `not_after_unix` (seconds since the
/// Unix epoch), judged against `warning_days`.
///
/// `notAfter` itself is still valid time (RFC 5280 §4.1.2.5), so a certificate expires
/// one second after it. Days are rounded down so that "expires in 0 days" means less
/// than a day is left, and a warning with `warning_days = N` starts below N whole days.
pub fn expiry(not_after_unix: i64, now: SystemTime, warning_days: u32) -> Expiry {
    let seconds_left = not_after_unix.saturating_sub(unix_seconds(now));
    let days_left = seconds_left.div_euclid(SECONDS_PER_DAY);
    let state = if seconds_left < 0 {
        ExpiryState::Expired
    } else if days_left < i64::from(warning_days) {
        ExpiryState::ExpiringSoon
    } else {
        ExpiryState::Ok
    };
    Expiry {
        seconds_left,
        days_left,
        state,
    }
}

/// `time` as seconds since the Unix epoch (negative before it, saturating far out).
pub(crate) fn unix_seconds(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// Warns once a day, until `shutdown`, about every served certificate with fewer than
/// `warning_days` left (an error once it has expired). The first check is a day after
/// the start, since startup already warned.
pub(crate) async fn warn_daily(
    store: std::sync::Arc<CertStore>,
    warning_days: u32,
    shutdown: CancellationToken,
) {
    let mut daily = tokio::time::interval_at(Instant::now() + WARN_EVERY, WARN_EVERY);
    daily.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = daily.tick() => warn_expiring(&store, SystemTime::now(), warning_days),
        }
    }
}

/// Logs every served certificate that is expired or expiring soon at `now`.
fn warn_expiring(store: &CertStore, now: SystemTime, warning_days: u32) {
    for slot in store.slots() {
        let report = slot.report();
        let left = expiry(report.not_after_unix, now, warning_days);
        match left.state {
            ExpiryState::Ok => {}
            ExpiryState::Expired => tracing::error!(
                certificate = %slot.source.key_path,
                cert = %report.cert_path.display(),
                subject = %report.subject,
                serial = %report.serial,
                not_after = %report.not_after,
                "the served certificate has EXPIRED: clients refuse the site; replace the files with a renewed certificate (no restart needed)"
            ),
            ExpiryState::ExpiringSoon => {
                let days_left = left.days_left;
                tracing::warn!(
                    certificate = %slot.source.key_path,
                    cert = %report.cert_path.display(),
                    subject = %report.subject,
                    serial = %report.serial,
                    not_after = %report.not_after,
                    days_left,
                    "the served certificate expires in {days_left} days: renew it (e.g. `certbot renew`) and replace the files; Gatehouse picks them up without a restart"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;
    const DAY: i64 = SECONDS_PER_DAY;

    fn at(unix: i64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap())
    }

    #[test]
    fn exactly_the_warning_days_left_is_still_ok() {
        let left = expiry(NOW + 30 * DAY, at(NOW), 30);
        assert_eq!(
            left,
            Expiry {
                seconds_left: 30 * DAY,
                days_left: 30,
                state: ExpiryState::Ok
            }
        );
    }

    #[test]
    fn one_second_under_the_warning_days_is_expiring_soon() {
        let left = expiry(NOW + 30 * DAY - 1, at(NOW), 30);
        assert_eq!(left.days_left, 29);
        assert_eq!(left.state, ExpiryState::ExpiringSoon);
    }

    #[test]
    fn not_after_itself_is_still_valid() {
        let left = expiry(NOW, at(NOW), 30);
        assert_eq!((left.seconds_left, left.days_left), (0, 0));
        assert_eq!(left.state, ExpiryState::ExpiringSoon);
        assert_eq!(expiry(NOW, at(NOW), 0).state, ExpiryState::Ok);
    }

    #[test]
    fn expired_by_one_second() {
        let left = expiry(NOW - 1, at(NOW), 30);
        assert_eq!(
            left,
            Expiry {
                seconds_left: -1,
                days_left: -1,
                state: ExpiryState::Expired
            }
        );
        assert_eq!(expiry(NOW - 1, at(NOW), 0).state, ExpiryState::Expired);
    }

    #[test]
    fn long_expired_counts_negative_days_rounded_down() {
        let left = expiry(NOW - 10 * DAY - 1, at(NOW), 30);
        assert_eq!(left.seconds_left, -10 * DAY - 1);
        assert_eq!(left.days_left, -11);
        assert_eq!(left.state, ExpiryState::Expired);
        assert_eq!(expiry(NOW - 10 * DAY, at(NOW), 30).days_left, -10);
    }

    #[test]
    fn zero_warning_days_never_warns_before_expiry() {
        assert_eq!(expiry(NOW + 1, at(NOW), 0).state, ExpiryState::Ok);
    }

    #[test]
    fn extreme_values_saturate_instead_of_overflowing() {
        assert_eq!(expiry(i64::MIN, at(NOW), 30).state, ExpiryState::Expired);
        assert_eq!(expiry(i64::MAX, at(NOW), 30).state, ExpiryState::Ok);
        let before_epoch = UNIX_EPOCH - Duration::from_secs(5);
        assert_eq!(unix_seconds(before_epoch), -5);
        assert_eq!(expiry(0, before_epoch, 0).seconds_left, 5);
    }
}
