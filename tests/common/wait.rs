//! Waiting for events: [`eventually`] polls a check until it holds and panics with what
//! was awaited and the last observation. Tests wait on the event that proves something
//! happened (a log line, a metric, a served serial, a closed socket), never for a fixed
//! time.

use std::fmt::{Debug, Display};
use std::future::Future;
use std::time::{Duration, Instant};

/// What a check passed to [`eventually`] may return: `bool`, `Option<T>` or
/// `Result<T, E>` (the error is the last observation shown when the wait times out).
pub trait Check {
    type Output;
    fn into_result(self) -> Result<Self::Output, String>;
}

impl Check for bool {
    type Output = ();
    fn into_result(self) -> Result<(), String> {
        if self {
            Ok(())
        } else {
            Err("false".to_owned())
        }
    }
}

impl<T> Check for Option<T> {
    type Output = T;
    fn into_result(self) -> Result<T, String> {
        self.ok_or_else(|| "None".to_owned())
    }
}

impl<T, E: Debug> Check for Result<T, E> {
    type Output = T;
    fn into_result(self) -> Result<T, String> {
        self.map_err(|err| format!("{err:?}"))
    }
}

/// Runs `check` until it holds (`true`, `Some`, `Ok`) and returns what it produced,
/// pausing 5 ms between attempts at first and backing off to 100 ms. Panics after
/// `timeout` with "timed out after … waiting until {what}" and the last observation; a
/// check still running at the deadline is abandoned.
pub async fn eventually<F, Fut, C>(timeout: Duration, what: impl Display, mut check: F) -> C::Output
where
    F: FnMut() -> Fut,
    Fut: Future<Output = C>,
    C: Check,
{
    let started = Instant::now();
    let mut pause = Duration::from_millis(5);
    let mut last = String::from("(no check completed)");
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, check()).await {
            Ok(outcome) => match outcome.into_result() {
                Ok(value) => return value,
                Err(observed) => last = observed,
            },
            Err(_) => last = format!("{last} (then a check was still running at the deadline)"),
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting until {what}; last check: {last}"
        );
        tokio::time::sleep(pause.min(timeout.saturating_sub(started.elapsed()))).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}
