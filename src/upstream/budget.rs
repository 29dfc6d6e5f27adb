//! The retry budget of one group: a token bucket that every request sent fills by
//! `retry_budget` (0.2: a fifth of a retry) and every retry empties by one, so retries
//! add at most that share of load when every instance fails, instead of multiplying it
//! by the number of instances. A reserve of [`RESERVE`] retries lets a quiet site
//! still fail over when an instance dies.

use std::sync::atomic::{AtomicU64, Ordering};

/// Retries the bucket holds at most (and starts with).
pub const RESERVE: u64 = 10;

/// Thousandths of a retry per whole retry.
const UNIT: u64 = 1000;

/// Tokens in thousandths of a retry.
#[derive(Debug)]
pub(super) struct RetryBudget {
    tokens: AtomicU64,
    /// Thousandths of a retry each request adds.
    per_request: u64,
}

impl RetryBudget {
    /// A full bucket; `share` 0 never allows a retry.
    pub(super) fn new(share: f64) -> RetryBudget {
        // `share` is validated to 0..=1, so this is at most UNIT.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let per_request = (share.clamp(0.0, 1.0) * UNIT as f64).round() as u64;
        RetryBudget {
            tokens: AtomicU64::new(if per_request == 0 { 0 } else { RESERVE * UNIT }),
            per_request,
        }
    }

    /// A request was sent.
    pub(super) fn deposit(&self) {
        let _ = self
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tokens| {
                Some((tokens + self.per_request).min(RESERVE * UNIT))
            });
    }

    /// Takes one retry, if the budget allows it.
    pub(super) fn withdraw(&self) -> bool {
        self.tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tokens| {
                tokens.checked_sub(UNIT)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_the_reserve_plus_the_share_of_requests() {
        let budget = RetryBudget::new(0.2);
        let mut retries = 0;
        for _ in 0..1000 {
            budget.deposit();
            // Every request fails and asks for a retry.
            if budget.withdraw() {
                retries += 1;
            }
        }
        assert!((200..=200 + RESERVE).contains(&retries), "{retries}");
    }

    #[test]
    fn zero_share_never_retries() {
        let budget = RetryBudget::new(0.0);
        budget.deposit();
        assert!(!budget.withdraw());
    }
}
