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
//! A lease is refilled by one request at a time per key: while one asks Redis, the others
//! wait for its answer (at most `decision_timeout`) instead of each asking for a lease of
//! their own, which under load would mean a round trip every few requests again.
//!
//! Lifecycle of an entry: *none* → (grant of more than one token) *leased* → (spent, or
//! void) *none*; *none* → (refusal) *refused* → (retry time passed) *none*. Of a key's
//! refill: *none* → (a request finds no lease) *asking* → (answer recorded, Redis failed,
//! or the request dropped) *none*, waking the requests that waited.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

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
    state: Mutex<State<K>>,
}

struct State<K> {
    entries: HashMap<K, Entry>,
    /// Keys whose lease a request is asking Redis for, and how its waiters are woken.
    refills: HashMap<K, Arc<Notify>>,
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

/// What a request does about the limit.
pub enum Lookup<'a, K: Hash + Eq> {
    /// Decided by a lease or a remembered refusal.
    Decided(Decision),
    /// Ask Redis, within the time given (what is left of `decision_timeout` after
    /// waiting). With a [`Refill`], this request asks for every request of the key, which
    /// wait for its answer: record the answer through it.
    Ask(Option<Refill<'a, K>>, Duration),
    /// Another request's answer did not come within `decision_timeout`: Redis is too
    /// slow, decide as when it fails.
    Unanswered,
}

/// The right to refill a key's lease. Dropping it (answer recorded, Redis failed, or the
/// request gone) wakes the requests that waited for it.
pub struct Refill<'a, K: Hash + Eq> {
    leases: &'a Leases<K>,
    key: K,
}

impl<K> Default for Leases<K> {
    fn default() -> Self {
        Leases {
            state: Mutex::new(State {
                entries: HashMap::new(),
                refills: HashMap::new(),
            }),
        }
    }
}

impl<K: Hash + Eq + Clone> Leases<K> {
    fn lock(&self) -> MutexGuard<'_, State<K>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What to do for a request of `key`: decided by what Redis granted or refused
    /// earlier, or ask Redis. For a policy leasing more than one token, one request at a
    /// time asks; the others wait for its answer. `budget` (`decision_timeout`) bounds the
    /// waiting and the asking together, so no request waits longer than without leases.
    pub async fn lookup(&self, key: &K, lease_size: u32, budget: Duration) -> Lookup<'_, K> {
        let deadline = tokio::time::Instant::now() + budget;
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        for _ in 0..2 {
            let asking = {
                let mut state = self.lock();
                if let Some(decided) = state.decide(key, Instant::now()) {
                    return Lookup::Decided(decided);
                }
                if lease_size <= 1 {
                    return Lookup::Ask(None, left());
                }
                if let Some(asking) = state.refills.get(key) {
                    asking.clone()
                } else {
                    state.refills.insert(key.clone(), Arc::new(Notify::new()));
                    return Lookup::Ask(
                        Some(Refill {
                            leases: self,
                            key: key.clone(),
                        }),
                        left(),
                    );
                }
            };
            let answered = asking.notified();
            tokio::pin!(answered);
            answered.as_mut().enable();
            // The answer may have come between the lock above and `enable`.
            let pending = self
                .lock()
                .refills
                .get(key)
                .is_some_and(|current| Arc::ptr_eq(current, &asking));
            if pending && tokio::time::timeout_at(deadline, answered).await.is_err() {
                return Lookup::Unanswered;
            }
        }
        match left() {
            Duration::ZERO => Lookup::Unanswered,
            left => Lookup::Ask(None, left),
        }
    }

    /// A decision from what Redis granted or refused earlier, if that still holds.
    #[cfg(test)]
    fn decide(&self, key: &K, now: Instant) -> Option<Decision> {
        self.lock().decide(key, now)
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
        let mut state = self.lock();
        let entries = &mut state.entries;
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

impl<K: Hash + Eq> State<K> {
    fn decide(&mut self, key: &K, now: Instant) -> Option<Decision> {
        let entry = self.entries.get_mut(key)?;
        if entry.until <= now {
            self.entries.remove(key);
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
            self.entries.remove(key);
        }
        Some(decision)
    }
}

impl<K: Hash + Eq + Clone> Refill<'_, K> {
    /// Records Redis's answer (see [`Leases::record`]); the waiting requests then find it.
    pub fn record(
        self,
        granted: u32,
        redis: Decision,
        interval: Duration,
        now: Instant,
    ) -> Decision {
        self.leases
            .record(self.key.clone(), granted, redis, interval, now)
    }
}

impl<K: Hash + Eq> Drop for Refill<'_, K> {
    fn drop(&mut self) {
        let asking = self
            .leases
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .refills
            .remove(&self.key);
        if let Some(asking) = asking {
            asking.notify_waiters();
        }
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

    #[tokio::test]
    async fn one_request_refills_a_lease_while_the_others_wait_for_it() {
        let leases: Leases<&str> = Leases::default();
        let wait = Duration::from_secs(30);
        let Lookup::Ask(Some(refill), _) = leases.lookup(&"k", 10, wait).await else {
            panic!("the first request asks Redis");
        };
        let waiter = leases.lookup(&"k", 10, wait);
        tokio::pin!(waiter);
        assert!(
            futures_util::poll!(waiter.as_mut()).is_pending(),
            "a second request waits for the first one's answer"
        );
        let now = Instant::now();
        refill.record(10, answer(true, 100, 0), Duration::from_secs(1), now);
        let Lookup::Decided(decided) = waiter.await else {
            panic!("the waiter is served from the new lease");
        };
        assert!(decided.allowed);
    }

    #[tokio::test]
    async fn a_refill_that_fails_lets_the_waiters_ask_themselves() {
        let leases: Leases<&str> = Leases::default();
        let wait = Duration::from_secs(30);
        let Lookup::Ask(Some(refill), _) = leases.lookup(&"k", 10, wait).await else {
            panic!("the first request asks Redis");
        };
        let waiter = leases.lookup(&"k", 10, wait);
        tokio::pin!(waiter);
        assert!(futures_util::poll!(waiter.as_mut()).is_pending());
        drop(refill);
        assert!(
            matches!(waiter.await, Lookup::Ask(Some(_), _)),
            "the next request refills instead"
        );
        assert!(
            matches!(leases.lookup(&"k", 1, wait).await, Lookup::Ask(None, _)),
            "no lease, no waiting"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_a_slow_answer_takes_no_longer_than_the_decision_timeout() {
        let leases: Leases<&str> = Leases::default();
        let budget = Duration::from_millis(20);
        let Lookup::Ask(Some(_asking), _) = leases.lookup(&"k", 10, budget).await else {
            panic!("the first request asks Redis");
        };
        let started = tokio::time::Instant::now();
        assert!(matches!(
            leases.lookup(&"k", 10, budget).await,
            Lookup::Unanswered
        ));
        assert_eq!(started.elapsed(), budget);
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
