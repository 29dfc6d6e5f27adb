//! What Redis already decided for a key, kept so the next decisions need no round trip:
//! tokens granted ahead of use (a lease), and refusals until their `Retry-After`.
//!
//! Neither loosens the shared limit. Lease tokens were taken from the key's GCRA state
//! in Redis when granted, so every instance together still takes no more than the
//! limit; a lease is void after `granted × interval` (the time Redis needs to earn the
//! tokens back), so spending late can add at most one lease's worth to a window. A
//! refusal from Redis holds until its retry time whatever any instance does, since
//! GCRA's theoretical arrival time only moves forward. Unspent lease tokens are lost
//! (the limit errs strict), which is why a lease is small: 1% of the burst, and only
//! for bursts of 200 and more, so limits of a few requests per second stay exact.
//!
//! Lifecycle of an entry: *none* → (grant of more than one token) *leased* → (spent, or
//! void) *none*; *none* → (refusal) *refused* → (retry time passed) *none*.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::Decision;

/// Bursts below this get no lease: one Redis round trip per decision.
const LEASE_FROM_BURST: u32 = 200;
/// Entries kept before expired ones are cleared.
const MAX_ENTRIES: usize = 65_536;

/// Tokens asked of Redis at once for a policy with `burst`.
pub fn lease_size(burst: u32) -> u32 {
    if burst < LEASE_FROM_BURST {
        1
    } else {
        burst / 100
    }
}

/// Leases and remembered refusals, per key (a policy and a client).
pub struct Leases<K> {
    entries: Mutex<HashMap<K, Entry>>,
}

impl<K> Default for Leases<K> {
    fn default() -> Self {
        Leases {
            entries: Mutex::new(HashMap::new()),
        }
    }
}

struct Entry {
    /// Tokens left to spend; 0 for a remembered refusal.
    left: u32,
    /// What Redis said remains after the whole grant.
    remaining: u32,
    /// Void from then on (for a refusal: when one request is allowed again).
    until: Instant,
    /// When the burst is full again, as Redis said.
    reset_at: Instant,
}

impl<K: Hash + Eq> Leases<K> {
    /// A decision from what Redis granted or refused earlier, if that still holds.
    pub fn decide(&self, key: &K, now: Instant) -> Option<Decision> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = entries.get_mut(key)?;
        if entry.until <= now {
            entries.remove(key);
            return None;
        }
        let reset = entry.reset_at.saturating_duration_since(now);
        if entry.left == 0 {
            return Some(Decision {
                allowed: false,
                remaining: 0,
                retry_after: entry.until - now,
                reset,
            });
        }
        entry.left -= 1;
        let decision = Decision {
            allowed: true,
            remaining: entry.remaining.saturating_add(entry.left),
            retry_after: Duration::ZERO,
            reset,
        };
        if entry.left == 0 {
            entries.remove(key);
        }
        Some(decision)
    }

    /// Records Redis's answer for `key` (`granted` tokens, one of them for this
    /// request) and returns this request's decision.
    pub fn record(
        &self,
        key: K,
        granted: u32,
        redis: Decision,
        interval: Duration,
        now: Instant,
    ) -> Decision {
        let entry = if granted == 0 {
            (!redis.retry_after.is_zero()).then(|| Entry {
                left: 0,
                remaining: 0,
                until: now + redis.retry_after,
                reset_at: now + redis.reset,
            })
        } else {
            (granted > 1).then(|| Entry {
                left: granted - 1,
                remaining: redis.remaining,
                until: now + interval.saturating_mul(granted),
                reset_at: now + redis.reset,
            })
        };
        let Some(entry) = entry else {
            return redis;
        };
        let decision = Decision {
            remaining: redis.remaining.saturating_add(entry.left),
            ..redis
        };
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, entry| entry.until > now);
        }
        match entries.get_mut(&key) {
            // Concurrent requests each got a grant: their tokens add up (replacing one
            // lease by another would lose the first one's tokens).
            Some(held) if held.left > 0 && held.until > now => {
                if entry.left > 0 {
                    held.left = held.left.saturating_add(entry.left);
                    held.remaining = entry.remaining;
                    held.until = held.until.max(entry.until);
                    held.reset_at = entry.reset_at;
                }
                // A refusal that raced a grant: the granted tokens are still good.
            }
            Some(held) => *held = entry,
            None => {
                entries.insert(key, entry);
            }
        }
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(allowed: bool, remaining: u32, retry_after_ms: u64) -> Decision {
        Decision {
            allowed,
            remaining,
            retry_after: Duration::from_millis(retry_after_ms),
            reset: Duration::from_secs(1),
        }
    }

    #[test]
    fn small_bursts_get_no_lease() {
        assert_eq!(lease_size(5), 1);
        assert_eq!(lease_size(199), 1);
        assert_eq!(lease_size(200), 2);
        assert_eq!(lease_size(1_000_000), 10_000);
    }

    #[test]
    fn a_lease_is_spent_token_by_token_then_gone() {
        let leases: Leases<&str> = Leases::default();
        let now = Instant::now();
        let first = leases.record("k", 3, answer(true, 10, 0), Duration::from_secs(1), now);
        assert!(first.allowed);
        assert_eq!(first.remaining, 12);
        for remaining in [11, 10] {
            let spent = leases.decide(&"k", now).expect("leased");
            assert!(spent.allowed);
            assert_eq!(spent.remaining, remaining);
        }
        assert!(
            leases.decide(&"k", now).is_none(),
            "three tokens, three requests"
        );
    }

    #[test]
    fn a_lease_is_void_once_redis_would_have_earned_it_back() {
        let leases: Leases<&str> = Leases::default();
        let now = Instant::now();
        leases.record("k", 4, answer(true, 0, 0), Duration::from_millis(10), now);
        assert!(leases
            .decide(&"k", now + Duration::from_millis(39))
            .is_some());
        assert!(leases
            .decide(&"k", now + Duration::from_millis(40))
            .is_none());
    }

    #[test]
    fn concurrent_grants_add_up() {
        let leases: Leases<&str> = Leases::default();
        let now = Instant::now();
        let interval = Duration::from_secs(1);
        leases.record("k", 3, answer(true, 10, 0), interval, now);
        leases.record("k", 3, answer(true, 7, 0), interval, now);
        leases.record("k", 0, answer(false, 0, 500), interval, now);
        let spent = (0..10)
            .map_while(|_| leases.decide(&"k", now).filter(|d| d.allowed))
            .count();
        assert_eq!(
            spent, 4,
            "two grants of three, one token of each used at once"
        );
    }

    #[test]
    fn a_refusal_holds_until_its_retry_time_only() {
        let leases: Leases<&str> = Leases::default();
        let now = Instant::now();
        let refused = leases.record(
            "k",
            0,
            answer(false, 0, 100),
            Duration::from_millis(10),
            now,
        );
        assert!(!refused.allowed);
        let again = leases
            .decide(&"k", now + Duration::from_millis(60))
            .expect("still refused");
        assert!(!again.allowed);
        assert_eq!(again.retry_after, Duration::from_millis(40));
        assert!(leases
            .decide(&"k", now + Duration::from_millis(100))
            .is_none());
        assert!(leases.decide(&"other", now).is_none());
    }
}
