//! In-process limiter: one governor keyed GCRA limiter per policy, keyed by client IP
//! (already grouped by IPv6 prefix). Decisions are synchronous: a lookup in governor's
//! sharded map and one compare-and-swap, no allocation.
//!
//! Lifecycle: created at startup with one limiter per policy; a background task calls
//! `retain_recent()` every [`RETAIN_EVERY`] so clients whose bucket is full again are
//! forgotten and memory stays bounded by the clients active in the last refill window;
//! the task ends when the owning [`super::RateLimiter`] is dropped.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::Quota;
use tokio_util::sync::CancellationToken;

use super::{Decision, Policy};

/// How often idle keys are dropped.
pub const RETAIN_EVERY: Duration = Duration::from_secs(10);

type Keyed<C> =
    governor::RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, C, StateInformationMiddleware>;

/// One governor limiter with its policy's numbers.
struct Entry<C: Clock> {
    limiter: Keyed<C>,
    interval: Duration,
    burst: u32,
}

/// Governor limiters, indexed like the policy table. The clock is governor's own in
/// production and its fake clock in tests.
pub struct LocalLimiter<C: Clock = DefaultClock> {
    entries: Arc<Vec<Entry<C>>>,
    clock: C,
}

impl LocalLimiter {
    /// One limiter per policy, and the task that keeps their maps small.
    pub(super) fn new<'a>(
        policies: impl Iterator<Item = &'a Policy>,
        stop: &CancellationToken,
    ) -> LocalLimiter {
        LocalLimiter::with_clock(policies, stop, DefaultClock::default())
    }
}

impl<C> LocalLimiter<C>
where
    C: Clock + Clone + Send + Sync + 'static,
{
    fn with_clock<'a>(
        policies: impl Iterator<Item = &'a Policy>,
        stop: &CancellationToken,
        clock: C,
    ) -> LocalLimiter<C> {
        let entries: Arc<Vec<Entry<C>>> = Arc::new(
            policies
                .map(|policy| {
                    let interval = policy.interval();
                    let burst = NonZeroU32::new(policy.burst).unwrap_or(NonZeroU32::MIN);
                    let quota = Quota::with_period(interval)
                        .unwrap_or_else(|| Quota::per_second(burst))
                        .allow_burst(burst);
                    Entry {
                        limiter: governor::RateLimiter::dashmap_with_clock(quota, clock.clone())
                            .with_middleware::<StateInformationMiddleware>(),
                        interval,
                        burst: policy.burst,
                    }
                })
                .collect(),
        );
        let weak = Arc::downgrade(&entries);
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RETAIN_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let Some(entries) = weak.upgrade() else { break };
                retain_recent(&entries);
            }
        });
        LocalLimiter { entries, clock }
    }

    /// One GCRA step for `key` under policy `index`.
    pub fn decide(&self, index: usize, key: IpAddr) -> Decision {
        let Some(entry) = self.entries.get(index) else {
            return Decision {
                allowed: true,
                remaining: 0,
                retry_after: Duration::ZERO,
                reset: Duration::ZERO,
            };
        };
        match entry.limiter.check_key(&key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                // Full again once the spent cells have been re-emitted.
                let reset = entry.interval * entry.burst.saturating_sub(remaining);
                Decision {
                    allowed: true,
                    remaining,
                    retry_after: Duration::ZERO,
                    reset,
                }
            }
            Err(not_until) => {
                let retry_after = not_until.wait_time_from(self.clock.now());
                Decision {
                    allowed: false,
                    remaining: 0,
                    retry_after,
                    reset: retry_after + entry.interval * entry.burst.saturating_sub(1),
                }
            }
        }
    }

    /// Forgets every key whose bucket is full again (what the background task does).
    #[cfg(test)]
    pub fn retain_recent(&self) {
        retain_recent(&self.entries);
    }

    /// Keys held now across policies.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.iter().map(|entry| entry.limiter.len()).sum()
    }

    /// Whether no key is held.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn retain_recent<C: Clock>(entries: &[Entry<C>]) {
    for entry in entries {
        entry.limiter.retain_recent();
        entry.limiter.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use governor::clock::FakeRelativeClock;

    #[tokio::test]
    async fn burst_then_rate() {
        let policy = Policy {
            name: "default".into(),
            requests_per_second: 10.0,
            burst: 5,
        };
        let stop = CancellationToken::new();
        let clock = FakeRelativeClock::default();
        let local = LocalLimiter::with_clock(std::iter::once(&policy), &stop, clock.clone());
        let key: IpAddr = "192.0.2.1".parse().unwrap();
        let decisions: Vec<_> = (0..7).map(|_| local.decide(0, key)).collect();
        assert_eq!(decisions.iter().filter(|d| d.allowed).count(), 5);
        assert_eq!(decisions[0].remaining, 4);
        assert_eq!(decisions[4].remaining, 0);
        assert!(!decisions[5].allowed);
        assert!(decisions[5].retry_after <= Duration::from_millis(100));
        assert!(decisions[5].retry_after > Duration::from_millis(50));
        clock.advance(Duration::from_millis(100));
        assert!(local.decide(0, key).allowed);
        assert!(!local.decide(0, key).allowed);
        assert_eq!(local.len(), 1);
        // Memory is bounded: once the bucket is full again the key is forgotten.
        clock.advance(Duration::from_millis(600));
        local.retain_recent();
        assert!(local.is_empty());
        stop.cancel();
    }
}
